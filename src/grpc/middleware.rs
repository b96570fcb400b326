//! The tower layers every gRPC call passes before its handler:
//!
//! 1. [`Observe`] (outermost): one span per RPC following the OpenTelemetry
//!    RPC conventions, continuing the caller's W3C `traceparent`; the
//!    grpc_server_* metrics; one log line whose level follows the status.
//! 2. [`Gate`]: load shedding, authentication, the scope check, the
//!    per-caller rate limit, the call's deadline, and where its reads go
//!    (`datastorage-read-from: primary`, see `storage::replica`). Health and reflection
//!    skip shedding and authentication, so probes and grpcurl keep working.
//!
//! Refusals are [`CoreError`]s, rendered by the one mapping in `grpc::status`.
use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{ready, Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body as HttpBody, Frame};
use opentelemetry::trace::TraceContextExt;
use tokio::sync::Semaphore;
use tonic::{body::Body, Code, Status};
use tower::{Layer, Service};
use tracing::{field::Empty, Instrument, Span};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::{
    auth::{
        policy::{self, Access, MethodPolicy},
        AuthError, Authenticator, Principal, Scope,
    },
    error::CoreError,
    metrics::{GRPC_HANDLED, GRPC_HANDLING_SECONDS, GRPC_STARTED, RATE_LIMITED},
    ratelimit::{RateLimiter, RetryAfter},
    storage::{read_from_primary, READ_FROM_HEADER},
};

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// The W3C trace id a caller sent in `traceparent`, stored with the events it writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallerTraceId(pub String);

/// Answers the call with `error` instead of running it.
fn refuse(error: CoreError) -> http::Response<Body> {
    Status::from(error).into_http()
}

// ---------------------------------------------------------------------------
// Gate

/// Admission of a call: see the module docs.
#[derive(Clone)]
pub struct Gate {
    authenticator: Arc<dyn Authenticator>,
    rate_limiter: Option<Arc<dyn RateLimiter>>,
    call_slots: Arc<Semaphore>,
    default_timeout: Duration,
}

impl Gate {
    pub fn new(
        authenticator: Arc<dyn Authenticator>,
        rate_limiter: Option<Arc<dyn RateLimiter>>,
        max_concurrent_calls: usize,
        default_timeout: Duration,
    ) -> Self {
        Gate {
            authenticator,
            rate_limiter,
            call_slots: Arc::new(Semaphore::new(max_concurrent_calls)),
            default_timeout,
        }
    }

    async fn authorize(&self, headers: &HeaderMap, scope: Scope) -> Result<Principal, CoreError> {
        let principal = match bearer_token(headers) {
            Ok(token) => self.authenticator.authenticate(token).await,
            Err(error) => Err(error),
        }
        .map_err(|error| {
            // The detail never includes the token; it stays in the logs.
            tracing::info!(reason = error.reason(), detail = %error, "call not authenticated");
            match error {
                AuthError::KeysUnavailable(detail) => CoreError::Unavailable {
                    what: "token verification keys",
                    source: anyhow::anyhow!(detail),
                },
                other => CoreError::Unauthenticated { reason: other.reason() },
            }
        })?;
        Span::current().record("enduser.id", principal.subject());
        if !principal.has(scope) {
            return Err(CoreError::PermissionDenied { required: scope });
        }
        if let Some(limiter) = &self.rate_limiter {
            if let Err(RetryAfter(retry_after)) = limiter.check(principal.subject(), scope).await {
                metrics::counter!(RATE_LIMITED, "scope" => scope.as_str()).increment(1);
                return Err(CoreError::RateLimited { retry_after });
            }
        }
        Ok(principal)
    }

    async fn admit<S>(self, request: http::Request<Body>, inner: S) -> Result<http::Response<Body>, S::Error>
    where
        S: Service<http::Request<Body>, Response = http::Response<Body>>,
    {
        let Some(method) = policy::for_path(request.uri().path()) else {
            return Ok(Status::unimplemented("unknown method").into_http());
        };
        // The deadline counts from arrival, as tonic's own timer does:
        // authentication (a JWKS fetch) and the rate limit are inside it.
        let Some(limit) = call_deadline(request.headers(), method, self.default_timeout) else {
            return self.admitted(method, request, inner).await;
        };
        match tokio::time::timeout(limit, self.admitted(method, request, inner)).await {
            Ok(response) => response,
            Err(_) => Ok(refuse(CoreError::DeadlineExceeded { after: limit })),
        }
    }

    async fn admitted<S>(
        &self,
        method: &'static MethodPolicy,
        mut request: http::Request<Body>,
        mut inner: S,
    ) -> Result<http::Response<Body>, S::Error>
    where
        S: Service<http::Request<Body>, Response = http::Response<Body>>,
    {
        let mut _call_slot = None;
        if let Access::Requires(scope) = method.access {
            match self.call_slots.clone().try_acquire_owned() {
                Ok(slot) => _call_slot = Some(slot),
                Err(_) => return Ok(refuse(CoreError::Overloaded)),
            }
            match self.authorize(request.headers(), scope).await {
                Ok(principal) => {
                    request.extensions_mut().insert(principal);
                }
                Err(error) => return Ok(refuse(error)),
            }
        }
        let primary_reads = request
            .headers()
            .get(READ_FROM_HEADER)
            .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"primary"));
        if primary_reads {
            read_from_primary(inner.call(request)).await
        } else {
            inner.call(request).await
        }
    }
}

impl<S> Layer<S> for Gate {
    type Service = GateService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GateService {
            gate: self.clone(),
            inner,
        }
    }
}

#[derive(Clone)]
pub struct GateService<S> {
    gate: Gate,
    inner: S,
}

impl<S> Service<http::Request<Body>> for GateService<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        // The service that was polled ready serves this call; its clone waits for the next.
        let clone = self.inner.clone();
        let ready = std::mem::replace(&mut self.inner, clone);
        Box::pin(self.gate.clone().admit(request, ready))
    }
}

/// `authorization: Bearer <token>`: Ok(None) without the header.
fn bearer_token(headers: &HeaderMap) -> Result<Option<&str>, AuthError> {
    let Some(value) = headers.get(http::header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .map_err(|_| AuthError::InvalidToken("authorization is not ASCII".into()))?;
    match value.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() => {
            Ok(Some(token.trim()))
        }
        _ => Err(AuthError::InvalidToken("authorization is not a bearer token".into())),
    }
}

/// The most a caller's deadline is shortened by (see `call_deadline`).
const DEADLINE_MARGIN: Duration = Duration::from_millis(10);

/// How long the call may run: the caller's `grpc-timeout`, capped by the
/// server's default for unary calls; streams only by the caller's.
///
/// tonic enforces `grpc-timeout` itself and answers CANCELLED when it
/// passes, against the gRPC spec's DEADLINE_EXCEEDED, and the caller gives
/// up at the same moment. Ending the call a little earlier here makes the
/// answer the right one. One millisecond was not always enough on a loaded
/// machine, where both timers can fire in the same tick of the runtime (a
/// CI run once counted no DEADLINE_EXCEEDED); a tenth of the deadline, at
/// most 10 ms, leaves room.
fn call_deadline(headers: &HeaderMap, method: &MethodPolicy, default_timeout: Duration) -> Option<Duration> {
    let requested = headers
        .get("grpc-timeout")
        .and_then(|value| value.to_str().ok())
        .and_then(parse_grpc_timeout)
        .map(|timeout| timeout.saturating_sub((timeout / 10).min(DEADLINE_MARGIN)));
    match (requested, method.streaming) {
        (requested, true) => requested,
        (Some(requested), false) => Some(requested.min(default_timeout)),
        (None, false) => Some(default_timeout),
    }
}

/// The gRPC-over-HTTP/2 `grpc-timeout` value: at most 8 digits and a unit.
fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let split = value.len().checked_sub(1)?;
    let (digits, unit) = value.split_at(split);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

// ---------------------------------------------------------------------------
// Observe

/// Spans, metrics and the call log: see the module docs.
#[derive(Clone, Copy, Default)]
pub struct Observe;

impl<S> Layer<S> for Observe {
    type Service = ObserveService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ObserveService { inner }
    }
}

#[derive(Clone)]
pub struct ObserveService<S> {
    inner: S,
}

impl<S> Service<http::Request<Body>> for ObserveService<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<ObservedBody>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        let method = policy::for_path(request.uri().path());
        // Unknown paths are client-chosen strings: one label for all of them.
        let (service, name, grpc_type) = match method {
            Some(m) => (m.service, m.method, m.grpc_type()),
            None => ("unknown", "unknown", "unary"),
        };
        metrics::counter!(GRPC_STARTED, "grpc_type" => grpc_type, "grpc_service" => service, "grpc_method" => name)
            .increment(1);
        let span = if service == "grpc.health.v1.Health" {
            // Probes every few seconds would drown the traces.
            Span::none()
        } else {
            rpc_span(&mut request, service, name)
        };
        let call = CallRecord {
            span: span.clone(),
            service,
            method: name,
            grpc_type,
            started: Instant::now(),
            finished: false,
        };
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let response = inner.call(request).instrument(span).await?;
            let (mut parts, body) = response.into_parts();
            size_limit_is_resource_exhausted(&mut parts.headers);
            let mut call = call;
            if let Some(code) = grpc_status(&parts.headers) {
                // Trailers-only response: the status is already final.
                call.finish(code);
            }
            Ok(http::Response::from_parts(parts, ObservedBody { inner: body, call }))
        })
    }
}

/// The RPC's span, child of the caller's `traceparent` when it sent one.
fn rpc_span(request: &mut http::Request<Body>, service: &'static str, method: &'static str) -> Span {
    let span = tracing::info_span!(
        "grpc.server",
        otel.name = format!("{service}/{method}"),
        otel.kind = "server",
        otel.status_code = Empty,
        rpc.system = "grpc",
        rpc.service = service,
        rpc.method = method,
        rpc.grpc.status_code = Empty,
        enduser.id = Empty,
        correlation_id = Empty,
    );
    let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&HeaderExtractor(request.headers()))
    });
    let remote = parent.span().span_context().clone();
    if remote.is_valid() {
        request
            .extensions_mut()
            .insert(CallerTraceId(remote.trace_id().to_string()));
        // Made here, before the span is entered: the parent must be set
        // before the OpenTelemetry span starts, or it would not link.
        let _ = span.set_parent(parent);
    }
    span
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl opentelemetry::propagation::Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// tonic answers a message over `grpc.max_message_bytes` with OUT_OF_RANGE;
/// the gRPC status-code table (and this service's contract) says
/// RESOURCE_EXHAUSTED. This service sends OUT_OF_RANGE for nothing else, and
/// only tonic's size checks say "message length too large" (percent-encoded
/// in `grpc-message`, as every status message is).
fn size_limit_is_resource_exhausted(headers: &mut HeaderMap) {
    let too_large = grpc_status(headers) == Some(Code::OutOfRange)
        && headers
            .get("grpc-message")
            .and_then(|m| m.to_str().ok())
            .is_some_and(|m| m.replace("%20", " ").contains("message length too large"));
    if too_large {
        headers.insert("grpc-status", http::HeaderValue::from(Code::ResourceExhausted as i32));
    }
}

fn grpc_status(headers: &HeaderMap) -> Option<Code> {
    let code: i32 = headers.get("grpc-status")?.to_str().ok()?.trim().parse().ok()?;
    Some(Code::from_i32(code))
}

/// One call from start to its final status. A call dropped before it has
/// one (the client went away) is recorded as CANCELLED.
struct CallRecord {
    span: Span,
    service: &'static str,
    method: &'static str,
    grpc_type: &'static str,
    started: Instant,
    finished: bool,
}

impl Drop for CallRecord {
    fn drop(&mut self) {
        self.finish(Code::Cancelled);
    }
}

impl CallRecord {
    /// Records the call's outcome; only the first status counts.
    fn finish(&mut self, code: Code) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        let elapsed = self.started.elapsed();
        let code_name = code_name(code);
        metrics::counter!(
            GRPC_HANDLED,
            "grpc_type" => self.grpc_type,
            "grpc_service" => self.service,
            "grpc_method" => self.method,
            "grpc_code" => code_name,
        )
        .increment(1);
        metrics::histogram!(
            GRPC_HANDLING_SECONDS,
            "grpc_type" => self.grpc_type,
            "grpc_service" => self.service,
            "grpc_method" => self.method,
        )
        .record(elapsed.as_secs_f64());
        self.span.record("rpc.grpc.status_code", code as i32);
        let server_fault = is_server_fault(code);
        if server_fault {
            self.span.record("otel.status_code", "ERROR");
        }
        let _entered = self.span.enter();
        let millis = elapsed.as_secs_f64() * 1000.0;
        let (service, method) = (self.service, self.method);
        // The level follows the status: a client's mistake is not the server's error.
        if server_fault {
            tracing::warn!(service, method, code = code_name, millis, "call failed");
        } else if code == Code::Ok {
            tracing::debug!(service, method, code = code_name, millis, "call served");
        } else {
            tracing::info!(service, method, code = code_name, millis, "call refused");
        }
    }
}

/// The OpenTelemetry RPC conventions' server-side error codes.
fn is_server_fault(code: Code) -> bool {
    matches!(
        code,
        Code::Unknown
            | Code::DeadlineExceeded
            | Code::Unimplemented
            | Code::Internal
            | Code::Unavailable
            | Code::DataLoss
    )
}

/// Status names as go-grpc-prometheus writes them (`codes.Code.String()`).
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

pin_project_lite::pin_project! {
    /// The response body, watched for the trailers that carry the final
    /// status; a body dropped before them was cancelled by the client.
    pub struct ObservedBody {
        #[pin]
        inner: Body,
        call: CallRecord,
    }
}

impl HttpBody for ObservedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.project();
        let mut frame = ready!(this.inner.poll_frame(cx));
        if let Some(trailers) = frame
            .as_mut()
            .and_then(|f| f.as_mut().ok())
            .and_then(Frame::trailers_mut)
        {
            size_limit_is_resource_exhausted(trailers);
        }
        let finished = match &frame {
            Some(Ok(frame)) => frame
                .trailers_ref()
                .map(|trailers| grpc_status(trailers).unwrap_or(Code::Unknown)),
            Some(Err(status)) => Some(status.code()),
            None => Some(Code::Ok),
        };
        if let Some(code) = finished {
            this.call.finish(code);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The principal the gate admitted; every guarded RPC has one.
pub fn caller<T>(request: &tonic::Request<T>) -> Result<&Principal, Status> {
    request.extensions().get::<Principal>().ok_or_else(|| {
        Status::from(CoreError::Unauthenticated {
            reason: "TOKEN_MISSING",
        })
    })
}

/// The caller's W3C trace id, when it sent a `traceparent`.
pub fn caller_trace_id<T>(request: &tonic::Request<T>) -> Option<String> {
    request.extensions().get::<CallerTraceId>().map(|id| id.0.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unary() -> &'static MethodPolicy {
        policy::for_path("/datastorage.v1.AuditWrite/WriteAudit").unwrap()
    }

    fn stream() -> &'static MethodPolicy {
        policy::for_path("/datastorage.v1.JobStatus/WatchJob").unwrap()
    }

    fn timeout_header(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("grpc-timeout", value.parse().unwrap());
        headers
    }

    #[test]
    fn grpc_timeouts_parse_by_unit_and_refuse_nonsense() {
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("999999999m"), None);
        assert_eq!(parse_grpc_timeout("m"), None);
        assert_eq!(parse_grpc_timeout("12x"), None);
        assert_eq!(parse_grpc_timeout("-1S"), None);
    }

    #[test]
    fn unary_calls_get_the_shorter_deadline_and_streams_only_the_callers() {
        let default = Duration::from_secs(30);
        assert_eq!(call_deadline(&HeaderMap::new(), unary(), default), Some(default));
        assert_eq!(
            call_deadline(&timeout_header("100m"), unary(), default),
            Some(Duration::from_millis(90))
        );
        assert_eq!(call_deadline(&timeout_header("1M"), unary(), default), Some(default));
        assert_eq!(call_deadline(&HeaderMap::new(), stream(), default), None);
        assert_eq!(
            call_deadline(&timeout_header("2S"), stream(), default),
            Some(Duration::from_millis(1990))
        );
        assert_eq!(
            call_deadline(&timeout_header("20m"), unary(), default),
            Some(Duration::from_millis(18))
        );
    }

    #[test]
    fn bearer_tokens_need_the_bearer_scheme() {
        let mut headers = HeaderMap::new();
        assert!(matches!(bearer_token(&headers), Ok(None)));
        headers.insert("authorization", "Bearer abc.def.ghi".parse().unwrap());
        assert_eq!(bearer_token(&headers).unwrap(), Some("abc.def.ghi"));
        headers.insert("authorization", "bearer   abc".parse().unwrap());
        assert_eq!(bearer_token(&headers).unwrap(), Some("abc"));
        headers.insert("authorization", "Basic dXNlcjpwYXNz".parse().unwrap());
        assert!(bearer_token(&headers).is_err());
        headers.insert("authorization", "Bearer ".parse().unwrap());
        assert!(bearer_token(&headers).is_err());
    }
}
