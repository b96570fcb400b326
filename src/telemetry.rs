//! Logs and traces.
//!
//! - Logs: JSON for machines (with the trace and span ids of the call they
//!   belong to, and the fields of the spans around them, such as
//!   `correlation_id`), pretty for people; level from RUST_LOG.
//! - Traces: tracing spans become OpenTelemetry spans. The W3C trace-context
//!   propagator is always installed, so a caller's `traceparent` continues its
//!   trace and reaches the logs even when nothing is exported. OTLP/gRPC export
//!   is on when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `…_TRACES_ENDPOINT`) is set;
//!   `OTEL_SERVICE_NAME` names the service (default `datastorage`).
use std::fmt;

use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::{propagation::TraceContextPropagator, trace::SdkTracerProvider, Resource};
use serde_json::{Map, Value};
use tracing::{Event, Subscriber};
use tracing_subscriber::{
    fmt::{
        format::{JsonFields, Writer},
        FmtContext, FormatEvent, FormatFields, FormattedFields,
    },
    prelude::*,
    registry::LookupSpan,
    EnvFilter,
};

use crate::config::LogFormat;

/// Flushes buffered spans when the process ends.
#[must_use = "dropping the handle does not flush; call shutdown()"]
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Telemetry {
    /// Exports what is still buffered (bounded by the SDK's export timeout).
    pub fn force_flush(&self) {
        if let Err(error) = self.provider.force_flush() {
            tracing::warn!(%error, "flushing traces failed");
        }
    }

    pub fn shutdown(self) {
        if let Err(error) = self.provider.shutdown() {
            eprintln!("shutting down trace export failed: {error}");
        }
    }
}

/// Whether the environment asks for OTLP export.
pub fn otlp_configured() -> bool {
    ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
        .iter()
        .any(|name| std::env::var_os(name).is_some_and(|value| !value.is_empty()))
}

/// Installs logging and tracing for this process. Call inside the Tokio
/// runtime (the OTLP exporter's client lives on it). A second call (tests
/// start many servers in one process) keeps the first subscriber.
pub fn init(format: LogFormat) -> Telemetry {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let mut resource = Resource::builder();
    let named = std::env::var_os("OTEL_SERVICE_NAME").is_some()
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|attributes| attributes.contains("service.name="));
    if !named {
        resource = resource.with_service_name("datastorage");
    }
    let mut provider = SdkTracerProvider::builder().with_resource(resource.build());
    if otlp_configured() {
        match opentelemetry_otlp::SpanExporter::builder().with_tonic().build() {
            Ok(exporter) => provider = provider.with_batch_exporter(exporter),
            Err(error) => eprintln!("OTLP trace export is off: {error}"),
        }
    }
    let provider = provider.build();
    let tracer = provider.tracer("datastorage");

    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let traces = tracing_opentelemetry::layer().with_tracer(tracer);
    let registry = tracing_subscriber::registry().with(filter).with(traces);
    let _ = match format {
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .fmt_fields(JsonFields::new())
                    .event_format(JsonWithTraceIds),
            )
            .try_init(),
        LogFormat::Pretty => registry.with(tracing_subscriber::fmt::layer()).try_init(),
    };
    Telemetry { provider }
}

/// One JSON object per line: time, level, target, the event's fields, the
/// fields of its spans (outermost first, inner ones win), and the trace and
/// span ids of the innermost span.
struct JsonWithTraceIds;

impl<S, N> FormatEvent<S, N> for JsonWithTraceIds
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let mut line = Map::new();
        line.insert(
            "timestamp".into(),
            chrono::Utc::now()
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
                .into(),
        );
        line.insert("level".into(), event.metadata().level().as_str().into());
        line.insert("target".into(), event.metadata().target().into());
        if let Some(scope) = ctx.event_scope() {
            let mut innermost = None;
            for span in scope.from_root() {
                if let Some(fields) = span.extensions().get::<FormattedFields<N>>() {
                    if let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(fields) {
                        // `otel.*` fields steer the exporter; they say nothing to a reader.
                        line.extend(fields.into_iter().filter(|(name, _)| !name.starts_with("otel.")));
                    }
                }
                innermost = Some(span.id());
            }
            if let Some(id) = innermost {
                let otel = if ctx.lookup_current().is_some_and(|current| current.id() == id) {
                    // The OpenTelemetry layer attached the span's context when it was entered.
                    // Asking the dispatcher for it fails once any thread has set a scoped
                    // default (`with_default`, `set_default`): inside an event, a nested
                    // `get_default` then gets `Dispatch::none`.
                    Some(opentelemetry::Context::current())
                } else {
                    // An event with an explicit parent that is not entered.
                    tracing::dispatcher::get_default(|dispatch| tracing_opentelemetry::get_otel_context(&id, dispatch))
                };
                if let Some(otel) = otel {
                    let span = otel.span();
                    let context = span.span_context();
                    if context.is_valid() {
                        line.insert("trace_id".into(), context.trace_id().to_string().into());
                        line.insert("span_id".into(), context.span_id().to_string().into());
                    }
                }
            }
        }
        let mut visitor = JsonVisitor(&mut line);
        event.record(&mut visitor);
        let text = serde_json::to_string(&line).map_err(|_| fmt::Error)?;
        writeln!(writer, "{text}")
    }
}

struct JsonVisitor<'a>(&'a mut Map<String, Value>);

impl tracing::field::Visit for JsonVisitor<'_> {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().into(), format!("{value:?}").into());
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    use super::*;

    const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

    /// The log lines, as the fmt layer writes them.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn json_lines_carry_the_trace_and_span_ids_and_the_span_fields() {
        let provider = SdkTracerProvider::builder().build();
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")))
            .with(
                tracing_subscriber::fmt::layer()
                    .fmt_fields(JsonFields::new())
                    .event_format(JsonWithTraceIds)
                    .with_writer(move || writer.clone()),
            );
        let remote = SpanContext::new(
            TraceId::from_hex(TRACE_ID).unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        );

        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("call", otel.name = "Service/Method", correlation_id = "corr-1");
            span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote))
                .unwrap();
            span.in_scope(|| tracing::info!(attempt = 2, "written"));
        });

        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1, "{text}");
        let line: Map<String, Value> = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(line.get("trace_id").and_then(Value::as_str), Some(TRACE_ID), "{line:?}");
        let span_id = line.get("span_id").and_then(Value::as_str).expect("a span_id");
        assert_eq!(span_id.len(), 16, "{span_id}");
        assert!(span_id.bytes().all(|b| b.is_ascii_hexdigit()), "{span_id}");
        assert_ne!(span_id, "00f067aa0ba902b7", "the span's own id, not the caller's");
        assert_ne!(span_id, "0000000000000000");
        assert_eq!(line["correlation_id"], "corr-1");
        assert_eq!(line["message"], "written");
        assert_eq!(line["attempt"], 2);
        assert_eq!(line["level"], "INFO");
        assert!(line.keys().all(|key| !key.starts_with("otel.")), "{line:?}");
    }
}
