//! OTLP trace export against a real OTLP/gRPC receiver.
//!
//! A binary of its own: telemetry installs a process-global subscriber, which
//! would leak into every test of `tests/api`.
#[allow(dead_code)]
#[path = "api/helpers.rs"]
mod helpers;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use datastorage::{config::LogFormat, proto::v1 as pb, telemetry::Telemetry};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        trace_service_server::{TraceService, TraceServiceServer},
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    },
    common::v1::{any_value::Value, KeyValue},
    trace::v1::{span::SpanKind, Span},
};
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;

use helpers::{remediation_event, spawn_app, write, TestApp};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_SPAN_ID: &str = "00f067aa0ba902b7";
const RPC_SPAN: &str = "datastorage.v1.AuditWrite/WriteAudit";
/// How long spans may take to reach the receiver.
const EXPORT_WAIT: Duration = Duration::from_secs(10);

/// A span as received, with the `service.name` of its resource.
#[derive(Debug, Clone)]
struct Received {
    span: Span,
    service_name: Option<String>,
}

/// An OTLP trace receiver that keeps every span it is sent.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Received>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let service_name = resource_spans
                .resource
                .as_ref()
                .and_then(|resource| string_attribute(&resource.attributes, "service.name"));
            for scope_spans in resource_spans.scope_spans {
                spans.extend(scope_spans.spans.into_iter().map(|span| Received {
                    span,
                    service_name: service_name.clone(),
                }));
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Receiver {
    /// Serves OTLP/gRPC on a free port of 127.0.0.1; returns the port.
    async fn start(&self) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let service = TraceServiceServer::new(self.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpIncoming::from(listener)),
        );
        port
    }

    fn spans(&self) -> Vec<Received> {
        self.spans.lock().unwrap().clone()
    }

    /// Flushes and polls until a received span matches, for at most [`EXPORT_WAIT`].
    async fn wait_for(&self, telemetry: &Telemetry, what: &str, matches: impl Fn(&Span) -> bool) -> Received {
        let deadline = Instant::now() + EXPORT_WAIT;
        loop {
            // The batch processor exports on its own thread through the
            // exporter's client on this runtime: block this worker only.
            tokio::task::block_in_place(|| telemetry.force_flush());
            if let Some(found) = self.spans().into_iter().find(|received| matches(&received.span)) {
                return found;
            }
            assert!(
                Instant::now() < deadline,
                "no {what} span reached the receiver within {EXPORT_WAIT:?}; got {:#?}",
                self.spans().iter().map(|r| &r.span.name).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn attribute<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a Value> {
    attributes
        .iter()
        .find(|attribute| attribute.key == key)
        .and_then(|attribute| attribute.value.as_ref()?.value.as_ref())
}

fn string_attribute(attributes: &[KeyValue], key: &str) -> Option<String> {
    match attribute(attributes, key)? {
        Value::StringValue(value) => Some(value.clone()),
        _ => None,
    }
}

fn int_attribute(attributes: &[KeyValue], key: &str) -> Option<i64> {
    match attribute(attributes, key)? {
        Value::IntValue(value) => Some(*value),
        _ => None,
    }
}

fn is_rpc_span_of(span: &Span, correlation_id: &str) -> bool {
    span.name == RPC_SPAN && string_attribute(&span.attributes, "correlation_id").as_deref() == Some(correlation_id)
}

/// Whether `ancestor` is on the parent chain of `span` among `spans` (one trace).
fn descends_from(span: &Span, ancestor: &Span, spans: &[Span]) -> bool {
    let by_id: HashMap<&[u8], &Span> = spans.iter().map(|s| (s.span_id.as_slice(), s)).collect();
    let mut parent = span.parent_span_id.as_slice();
    // A cycle cannot go on longer than the trace has spans.
    for _ in 0..=spans.len() {
        if parent == ancestor.span_id.as_slice() {
            return true;
        }
        match by_id.get(parent) {
            Some(next) => parent = next.parent_span_id.as_slice(),
            None => return false,
        }
    }
    false
}

async fn write_audit(app: &TestApp, event: pb::AuditEvent, traceparent: Option<String>) {
    let mut request = tonic::Request::new(write(event));
    if let Some(traceparent) = traceparent {
        request
            .metadata_mut()
            .insert("traceparent", traceparent.parse().unwrap());
    }
    app.audit_client().await.write_audit(request).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rpc_spans_reach_an_otlp_receiver_and_continue_the_callers_trace() {
    let receiver = Receiver::default();
    let port = receiver.start().await;
    // Set before anything else runs: the exporter reads them when it is built.
    std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://127.0.0.1:{port}"));
    std::env::set_var("OTEL_SERVICE_NAME", "datastorage-test");
    std::env::set_var("OTEL_BSP_SCHEDULE_DELAY", "100");
    // The spans under test are at info level.
    std::env::set_var("RUST_LOG", "info");
    let telemetry = datastorage::telemetry::init(LogFormat::Json);

    let app = spawn_app().await;
    let event = remediation_event("rr-otlp-traced");
    let correlation_id = event.correlation_id.clone();
    write_audit(&app, event, Some(format!("00-{TRACE_ID}-{PARENT_SPAN_ID}-01"))).await;

    let trace_id = hex::decode(TRACE_ID).unwrap();
    let rpc = receiver
        .wait_for(&telemetry, RPC_SPAN, |span| is_rpc_span_of(span, &correlation_id))
        .await;
    let span = &rpc.span;
    assert_eq!(hex::encode(&span.trace_id), TRACE_ID, "the caller's trace continues");
    assert_eq!(
        hex::encode(&span.parent_span_id),
        PARENT_SPAN_ID,
        "the caller's span is the parent"
    );
    assert_eq!(span.kind, SpanKind::Server as i32);
    assert_eq!(
        string_attribute(&span.attributes, "rpc.system").as_deref(),
        Some("grpc")
    );
    assert_eq!(
        string_attribute(&span.attributes, "rpc.service").as_deref(),
        Some("datastorage.v1.AuditWrite")
    );
    assert_eq!(
        string_attribute(&span.attributes, "rpc.method").as_deref(),
        Some("WriteAudit")
    );
    assert_eq!(int_attribute(&span.attributes, "rpc.grpc.status_code"), Some(0));
    assert_eq!(rpc.service_name.as_deref(), Some("datastorage-test"));

    // The children end before the RPC span, so they were exported with it or earlier.
    let children = ["validate", "embedding", "db.transaction"];
    for name in children {
        receiver
            .wait_for(&telemetry, name, |s| s.name == name && s.trace_id == trace_id)
            .await;
    }
    let trace: Vec<Span> = receiver
        .spans()
        .into_iter()
        .map(|received| received.span)
        .filter(|s| s.trace_id == trace_id)
        .collect();
    for name in children {
        let child = trace.iter().find(|s| s.name == name).unwrap();
        assert!(
            descends_from(child, span, &trace),
            "{name} is not under the RPC span: {trace:#?}"
        );
    }
    let validate = trace.iter().find(|s| s.name == "validate").unwrap();
    assert_eq!(
        validate.parent_span_id, span.span_id,
        "validate is the RPC span's child"
    );

    // The stored event keeps the caller's trace id.
    let stored = app
        .incident_query_client()
        .await
        .list_audit_events(pb::ListAuditEventsRequest {
            scope: Some(pb::list_audit_events_request::Scope::CorrelationId(
                correlation_id.clone(),
            )),
            page_size: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(stored.len(), 1, "{stored:#?}");
    assert_eq!(stored[0].trace_id, TRACE_ID);

    // Without a traceparent the call starts a trace of its own.
    let event = remediation_event("rr-otlp-untraced");
    let correlation_id = event.correlation_id.clone();
    write_audit(&app, event, None).await;
    let rpc = receiver
        .wait_for(&telemetry, RPC_SPAN, |span| is_rpc_span_of(span, &correlation_id))
        .await;
    assert_eq!(rpc.span.trace_id.len(), 16);
    assert_ne!(rpc.span.trace_id, trace_id, "a fresh trace");
    assert!(rpc.span.trace_id.iter().any(|b| *b != 0), "a valid trace id");
    assert!(
        rpc.span.parent_span_id.is_empty(),
        "a root span: {:?}",
        rpc.span.parent_span_id
    );

    tokio::task::block_in_place(|| telemetry.shutdown());
}
