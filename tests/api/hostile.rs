//! Hostile requests over the real server: messages over the size limit,
//! every contract limit at and just past its edge, non-finite and degenerate
//! vectors, timestamps at the ends of the protobuf range, unknown enum numbers,
//! garbage ids and page tokens, undecodable bytes, and SQL / JSON / regex
//! metacharacters in every string field.
//!
//! Each case names what it must be answered with (see [`Expect`]); whatever it
//! expects, INTERNAL and UNKNOWN are always failures. Every test shares one
//! server among its cases and ends by checking that the server still serves
//! (health SERVING, a normal WriteAudit and GetIncident) and that refused
//! writes stored nothing.
use std::collections::{HashMap, HashSet};

use bytes::{Buf, BufMut};
use datastorage::proto::v1::{
    self as pb, audit_event::Payload, audit_write_client::AuditWriteClient, get_incident_request::Key,
    incident_query_client::IncidentQueryClient, job_status_client::JobStatusClient, list_audit_events_request::Scope,
    search_similar_request::Query, start_job_request::Spec, vector_search_client::VectorSearchClient,
};
use prost::Message;
use prost_types::{value::Kind, ListValue, Struct, Timestamp, Value};
use tonic::{
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    transport::Channel,
    Code, Status,
};
use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest};
use tonic_types::StatusExt;

use crate::helpers::*;

/// all-MiniLM-L6-v2's dimension: the active model in every test server.
const DIMENSIONS: usize = 384;
/// The smallest `grpc.max_message_bytes` the server accepts.
const SMALL_MESSAGE_LIMIT: usize = 64 * 1024;
/// What the test clients may send and receive: above every server limit used
/// here, so the server, not the client, is the one that refuses.
const CLIENT_MESSAGE_LIMIT: usize = 128 * 1024 * 1024;
/// protobuf Timestamp's range: 0001-01-01T00:00:00Z ..= 9999-12-31T23:59:59Z.
const YEAR_1: i64 = -62_135_596_800;
const YEAR_9999: i64 = 253_402_300_799;

// ---------------------------------------------------------------------------
// The table machinery

/// What a case must be answered with. INTERNAL and UNKNOWN never pass.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// INVALID_ARGUMENT with a BadRequest violation whose field starts with this.
    Invalid(&'static str),
    /// INVALID_ARGUMENT, with or without BadRequest details.
    InvalidAnyField,
    /// RESOURCE_EXHAUSTED: the message is larger than `grpc.max_message_bytes`.
    TooLarge,
    /// Exactly this status code.
    Code(Code),
    /// Served.
    Served,
    /// Served or refused, but no server error: the contract does not decide.
    NoServerError,
}

/// One RPC of the contract, with its request.
#[derive(Clone)]
enum Call {
    Write(pb::WriteAuditRequest),
    Batch(pb::BatchWriteAuditRequest),
    PlaceHold(pb::PlaceLegalHoldRequest),
    ListIncidents(pb::ListIncidentsRequest),
    GetIncident(pb::GetIncidentRequest),
    ListEvents(pb::ListAuditEventsRequest),
    ActionStats(pb::GetActionStatsRequest),
    VerifyChain(pb::VerifyAuditChainRequest),
    ListHolds(pb::ListLegalHoldsRequest),
    Search(pb::SearchSimilarRequest),
    StartJob(pb::StartJobRequest),
    GetJob(pb::GetJobRequest),
    CancelJob(pb::CancelJobRequest),
    WatchJob(pb::WatchJobRequest),
    ListJobs(pb::ListJobsRequest),
    /// Already-encoded request bytes for `path`, sent as they are.
    Raw {
        path: &'static str,
        body: Vec<u8>,
    },
}

macro_rules! call_from {
    ($($variant:ident($request:ty)),* $(,)?) => {
        $(impl From<$request> for Call {
            fn from(request: $request) -> Self {
                Call::$variant(request)
            }
        })*
    };
}

call_from!(
    Write(pb::WriteAuditRequest),
    Batch(pb::BatchWriteAuditRequest),
    PlaceHold(pb::PlaceLegalHoldRequest),
    ListIncidents(pb::ListIncidentsRequest),
    GetIncident(pb::GetIncidentRequest),
    ListEvents(pb::ListAuditEventsRequest),
    ActionStats(pb::GetActionStatsRequest),
    VerifyChain(pb::VerifyAuditChainRequest),
    ListHolds(pb::ListLegalHoldsRequest),
    Search(pb::SearchSimilarRequest),
    StartJob(pb::StartJobRequest),
    GetJob(pb::GetJobRequest),
    CancelJob(pb::CancelJobRequest),
    WatchJob(pb::WatchJobRequest),
    ListJobs(pb::ListJobsRequest),
);

struct Case {
    name: String,
    call: Call,
    expect: Expect,
}

fn case(name: impl Into<String>, call: impl Into<Call>, expect: Expect) -> Case {
    Case {
        name: name.into(),
        call: call.into(),
        expect,
    }
}

/// A client of every service, all over one connection, with message limits
/// far above the server's. Remembers what the served writes stored.
struct Clients {
    channel: Channel,
    audit: AuditWriteClient<Channel>,
    incidents: IncidentQueryClient<Channel>,
    search: VectorSearchClient<Channel>,
    jobs: JobStatusClient<Channel>,
    /// Events stored by served writes (duplicates of earlier writes excluded).
    stored_events: i64,
    /// Incidents those events belong to.
    stored_incidents: HashSet<String>,
}

impl Clients {
    async fn new(app: &TestApp) -> Self {
        let channel = app.channel().await;
        Clients {
            audit: AuditWriteClient::new(channel.clone())
                .max_encoding_message_size(CLIENT_MESSAGE_LIMIT)
                .max_decoding_message_size(CLIENT_MESSAGE_LIMIT),
            incidents: IncidentQueryClient::new(channel.clone())
                .max_encoding_message_size(CLIENT_MESSAGE_LIMIT)
                .max_decoding_message_size(CLIENT_MESSAGE_LIMIT),
            search: VectorSearchClient::new(channel.clone())
                .max_encoding_message_size(CLIENT_MESSAGE_LIMIT)
                .max_decoding_message_size(CLIENT_MESSAGE_LIMIT),
            jobs: JobStatusClient::new(channel.clone())
                .max_encoding_message_size(CLIENT_MESSAGE_LIMIT)
                .max_decoding_message_size(CLIENT_MESSAGE_LIMIT),
            channel,
            stored_events: 0,
            stored_incidents: HashSet::new(),
        }
    }

    fn record(&mut self, responses: &[pb::WriteAuditResponse]) {
        for response in responses.iter().filter(|r| !r.duplicate) {
            self.stored_events += 1;
            self.stored_incidents.insert(response.incident_id.clone());
        }
    }

    async fn call(&mut self, call: Call) -> Result<(), Status> {
        match call {
            Call::Write(r) => {
                let response = self.audit.write_audit(r).await?.into_inner();
                self.record(&[response]);
            }
            Call::Batch(r) => {
                let responses = self.audit.batch_write_audit(r).await?.into_inner().responses;
                self.record(&responses);
            }
            Call::PlaceHold(r) => ignore(self.audit.place_legal_hold(r).await?),
            Call::ListIncidents(r) => ignore(self.incidents.list_incidents(r).await?),
            Call::GetIncident(r) => ignore(self.incidents.get_incident(r).await?),
            Call::ListEvents(r) => ignore(self.incidents.list_audit_events(r).await?),
            Call::ActionStats(r) => ignore(self.incidents.get_action_stats(r).await?),
            Call::VerifyChain(r) => ignore(self.incidents.verify_audit_chain(r).await?),
            Call::ListHolds(r) => ignore(self.incidents.list_legal_holds(r).await?),
            Call::Search(r) => ignore(self.search.search_similar(r).await?),
            Call::StartJob(r) => ignore(self.jobs.start_job(r).await?),
            Call::GetJob(r) => ignore(self.jobs.get_job(r).await?),
            Call::CancelJob(r) => ignore(self.jobs.cancel_job(r).await?),
            Call::WatchJob(r) => ignore(self.jobs.watch_job(r).await?),
            Call::ListJobs(r) => ignore(self.jobs.list_jobs(r).await?),
            Call::Raw { path, body } => ignore(raw_unary(self.channel.clone(), path, body).await?),
        }
        Ok(())
    }
}

/// Only the status of these calls matters, not the reply.
fn ignore<T>(_reply: T) {}

/// Why `outcome` does not meet `expect`, if it does not.
fn judge(expect: Expect, outcome: &Result<(), Status>) -> Result<(), String> {
    let status = match (outcome, expect) {
        (Ok(()), Expect::Served | Expect::NoServerError) => return Ok(()),
        (Ok(()), _) => return Err(format!("served, expected {expect:?}")),
        (Err(status), _) => status,
    };
    let code = status.code();
    if matches!(code, Code::Internal | Code::Unknown) {
        return Err(format!("server error {code:?}: {:?}", status.message()));
    }
    match expect {
        Expect::Invalid(field) => names_field(status, field),
        Expect::InvalidAnyField => wanted_code(status, Code::InvalidArgument),
        Expect::TooLarge => wanted_code(status, Code::ResourceExhausted),
        Expect::Code(wanted) => wanted_code(status, wanted),
        Expect::Served => Err(format!("refused {code:?}: {:?}", status.message())),
        Expect::NoServerError => Ok(()),
    }
}

fn wanted_code(status: &Status, wanted: Code) -> Result<(), String> {
    if status.code() == wanted {
        Ok(())
    } else {
        Err(format!(
            "{:?} ({:?}), expected {wanted:?}",
            status.code(),
            status.message()
        ))
    }
}

/// INVALID_ARGUMENT whose BadRequest names a field starting with `field`.
fn names_field(status: &Status, field: &str) -> Result<(), String> {
    wanted_code(status, Code::InvalidArgument)?;
    if status.get_details_bad_request().is_none() {
        return Err(format!("INVALID_ARGUMENT without BadRequest: {:?}", status.message()));
    }
    let fields = violated_fields(status);
    if fields.iter().any(|f| f.starts_with(field)) {
        Ok(())
    } else {
        Err(format!("names {fields:?}, expected {field}…"))
    }
}

/// Runs every case in order on the shared clients, then fails once, naming
/// each case that was not answered as expected.
async fn run(clients: &mut Clients, cases: Vec<Case>) {
    let total = cases.len();
    assert_no_failures(total, run_collecting(clients, cases).await);
}

/// Runs every case in order; returns one line per case answered wrongly.
async fn run_collecting(clients: &mut Clients, cases: Vec<Case>) -> Vec<String> {
    let mut failures = Vec::new();
    for Case { name, call, expect } in cases {
        let outcome = clients.call(call).await;
        if let Err(why) = judge(expect, &outcome) {
            failures.push(format!("{name}: {why}"));
        }
    }
    failures
}

fn assert_no_failures(total: usize, failures: Vec<String>) {
    assert!(
        failures.is_empty(),
        "{} of {total} check(s) failed:\n  {}",
        failures.len(),
        failures.join("\n  ")
    );
}

/// Refused writes stored nothing: the tables hold exactly what served writes
/// reported.
async fn assert_only_served_writes_stored(app: &TestApp, clients: &Clients) {
    assert_eq!(
        app.count("audit_events").await,
        clients.stored_events,
        "audit_events holds exactly the events of served writes"
    );
    assert_eq!(
        app.count("incidents").await,
        clients.stored_incidents.len() as i64,
        "incidents holds exactly the incidents of served writes"
    );
}

/// After the abuse the server still serves: health is SERVING, and a normal
/// write (embedded by the model) and a read of its incident work.
async fn assert_still_healthy(app: &TestApp, clients: &mut Clients) {
    let health = HealthClient::new(app.channel().await)
        .check(HealthCheckRequest { service: String::new() })
        .await
        .expect("health answers")
        .into_inner();
    assert_eq!(health.status(), ServingStatus::Serving);
    let rr = unique("healthy");
    let written = clients
        .audit
        .write_audit(write(remediation_event(&rr)))
        .await
        .expect("a normal write is served")
        .into_inner();
    assert_eq!(written.write_state(), pb::WriteState::Committed);
    let incident = clients
        .incidents
        .get_incident(pb::GetIncidentRequest {
            key: Some(Key::Id(written.incident_id)),
        })
        .await
        .expect("its incident is served")
        .into_inner();
    assert_eq!(incident.remediation_request_id, rr);
}

// ---------------------------------------------------------------------------
// Raw bytes: what no generated client would send

/// A codec that sends request bytes as they are and returns the response's.
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

async fn raw_unary(channel: Channel, path: &'static str, body: Vec<u8>) -> Result<Vec<u8>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|error| Status::unavailable(format!("connection not ready: {error}")))?;
    grpc.unary(
        tonic::Request::new(body),
        http::uri::PathAndQuery::from_static(path),
        RawCodec,
    )
    .await
    .map(tonic::Response::into_inner)
}

const WRITE_AUDIT: &str = "/datastorage.v1.AuditWrite/WriteAudit";
const GET_INCIDENT: &str = "/datastorage.v1.IncidentQuery/GetIncident";
const SEARCH_SIMILAR: &str = "/datastorage.v1.VectorSearch/SearchSimilar";
/// Stands in a string field for the bytes a test patches in after encoding.
const MARKER: &str = "@@@@";

/// `message` encoded, with the first [`MARKER`] replaced by `bytes` (as long
/// as the marker, so every length prefix stays right).
fn patched(message: &impl Message, bytes: [u8; 4]) -> Vec<u8> {
    let mut encoded = message.encode_to_vec();
    let at = encoded
        .windows(MARKER.len())
        .position(|w| w == MARKER.as_bytes())
        .expect("the marker is in the message");
    encoded[at..at + MARKER.len()].copy_from_slice(&bytes);
    encoded
}

/// Byte sequences that are not UTF-8, each four bytes long.
const NOT_UTF8: [(&str, [u8; 4]); 5] = [
    ("0xFF bytes", [b'a', 0xFF, 0xFE, b'b']),
    ("a lone continuation byte", [b'a', b'b', 0x80, b'c']),
    ("a truncated 3-byte sequence", [b'a', b'b', 0xE2, 0x82]),
    ("an overlong '/'", [b'a', 0xC0, 0xAF, b'b']),
    ("a UTF-16 surrogate", [b'a', 0xED, 0xA0, 0x80]),
];

/// Requests whose bytes no protobuf decoder accepts as their message: string
/// fields that are not UTF-8, a Struct nested past prost's recursion limit, a
/// message cut short.
fn undecodable_cases(expect: Expect) -> Vec<Case> {
    let mut cases = Vec::new();
    for (what, bytes) in NOT_UTF8 {
        let mut event = remediation_event(&unique("utf8"));
        event.correlation_id = format!("corr-{MARKER}");
        cases.push(case(
            format!("WriteAudit event.correlation_id with {what}"),
            Call::Raw {
                path: WRITE_AUDIT,
                body: patched(&with_vector(write(event)), bytes),
            },
            expect,
        ));
    }
    let mut event = remediation_event(&unique("utf8"));
    event.labels.insert(format!("key{MARKER}"), "value".into());
    cases.push(case(
        "WriteAudit label key not UTF-8",
        Call::Raw {
            path: WRITE_AUDIT,
            body: patched(&with_vector(write(event)), NOT_UTF8[0].1),
        },
        expect,
    ));
    cases.push(case(
        "GetIncident id not UTF-8",
        Call::Raw {
            path: GET_INCIDENT,
            body: patched(
                &pb::GetIncidentRequest {
                    key: Some(Key::Id(MARKER.into())),
                },
                NOT_UTF8[1].1,
            ),
        },
        expect,
    ));
    cases.push(case(
        "SearchSimilar text not UTF-8",
        Call::Raw {
            path: SEARCH_SIMILAR,
            body: patched(
                &pb::SearchSimilarRequest {
                    query: Some(Query::Text(format!("memory {MARKER}"))),
                    ..Default::default()
                },
                NOT_UTF8[4].1,
            ),
        },
        expect,
    ));
    cases.push(case(
        "WriteAudit custom.data nested 200 deep (past the decoder's recursion limit)",
        Call::Raw {
            path: WRITE_AUDIT,
            body: with_vector(write(custom_event(nested_struct(200)))).encode_to_vec(),
        },
        expect,
    ));
    let mut cut = with_vector(write(remediation_event(&unique("cut")))).encode_to_vec();
    cut.truncate(cut.len() / 2);
    cases.push(case(
        "WriteAudit cut off in the middle",
        Call::Raw {
            path: WRITE_AUDIT,
            body: cut,
        },
        expect,
    ));
    cases
}

// ---------------------------------------------------------------------------
// Request builders

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// A direction no other vector here has, so no model run is needed.
fn vector(seed: usize) -> pb::Vector {
    pb::Vector {
        values: (0..DIMENSIONS)
            .map(|i| ((i * 7 + seed * 13) % 17) as f32 - 8.0)
            .collect(),
    }
}

fn filled(value: f32, len: usize) -> pb::Vector {
    pb::Vector {
        values: vec![value; len],
    }
}

/// A vector with `value` at `index`.
fn with_value_at(index: usize, value: f32) -> pb::Vector {
    let mut v = vector(index);
    v.values[index] = value;
    v
}

fn with_vector(mut request: pb::WriteAuditRequest) -> pb::WriteAuditRequest {
    request.embedding = Some(vector(1));
    request
}

/// A valid write of a fresh incident, with a caller-computed vector, changed by `f`.
fn write_with(f: impl FnOnce(&mut pb::WriteAuditRequest)) -> pb::WriteAuditRequest {
    let mut request = with_vector(write(remediation_event(&unique("rr"))));
    f(&mut request);
    request
}

fn event_of(request: &mut pb::WriteAuditRequest) -> &mut pb::AuditEvent {
    request.event.as_mut().expect("an event")
}

fn remediation_of(request: &mut pb::WriteAuditRequest) -> &mut pb::RemediationAudit {
    match event_of(request).payload.as_mut() {
        Some(Payload::Remediation(r)) => r,
        _ => panic!("a remediation event"),
    }
}

fn target_of(request: &mut pb::WriteAuditRequest) -> &mut pb::ResourceRef {
    remediation_of(request).target.as_mut().expect("a target")
}

fn set_payload(request: &mut pb::WriteAuditRequest, payload: Payload) {
    event_of(request).payload = Some(payload);
}

fn custom_payload(data: Option<Struct>) -> pb::CustomAudit {
    pb::CustomAudit {
        event_type: "notification.sent".into(),
        action: "notify".into(),
        outcome: "success".into(),
        data,
        text: String::new(),
    }
}

fn custom_event(data: Struct) -> pb::AuditEvent {
    let mut event = remediation_event(&unique("custom"));
    event.payload = Some(Payload::Custom(custom_payload(Some(data))));
    event
}

fn execution_payload(duration: prost_types::Duration) -> Payload {
    Payload::Execution(pb::ExecutionAudit {
        action_type: "restart_pod".into(),
        target: Some(pb::ResourceRef {
            kind: "Deployment".into(),
            name: "api".into(),
            namespace: "payments".into(),
        }),
        status: pb::ExecutionStatus::Succeeded as i32,
        duration: Some(duration),
        error_message: String::new(),
    })
}

fn workflow_payload(status: i32, duration: Option<prost_types::Duration>) -> Payload {
    Payload::Workflow(pb::WorkflowAudit {
        workflow_id: "wf-1".into(),
        step_name: "scale".into(),
        status,
        duration,
        error_message: String::new(),
    })
}

fn ai_payload(confidence: f64) -> Payload {
    Payload::AiAnalysis(pb::AiAnalysisAudit {
        root_cause: "a leak".into(),
        recommended_action: "restart_pod".into(),
        confidence,
        reasoning: String::new(),
        model: String::new(),
    })
}

fn value(kind: Kind) -> Value {
    Value { kind: Some(kind) }
}

/// A Struct `depth` levels deep: `{"n": {"n": … {"leaf": true}}}`.
fn nested_struct(depth: usize) -> Struct {
    let mut data = Struct {
        fields: [("leaf".to_owned(), value(Kind::BoolValue(true)))].into(),
    };
    for _ in 1..depth {
        data = Struct {
            fields: [("n".to_owned(), value(Kind::StructValue(data)))].into(),
        };
    }
    data
}

/// A Struct `depth` levels deep through lists: `{"l": [[…[true]…]]}`.
fn nested_list(depth: usize) -> Struct {
    let mut item = value(Kind::BoolValue(true));
    for _ in 1..depth {
        item = value(Kind::ListValue(ListValue { values: vec![item] }));
    }
    Struct {
        fields: [("l".to_owned(), item)].into(),
    }
}

fn one_field(key: &str, v: Kind) -> Struct {
    Struct {
        fields: [(key.to_owned(), value(v))].into(),
    }
}

fn ts(seconds: i64, nanos: i32) -> Timestamp {
    Timestamp { seconds, nanos }
}

fn in_future(seconds: i64) -> Timestamp {
    ts(chrono::Utc::now().timestamp() + seconds, 0)
}

fn dur(seconds: i64, nanos: i32) -> prost_types::Duration {
    prost_types::Duration { seconds, nanos }
}

/// `n` labels with keys and values of the longest length allowed.
fn max_labels(n: usize) -> HashMap<String, String> {
    (0..n).map(|i| (format!("{i:0>63}"), format!("{i:v>255}"))).collect()
}

fn search(query: Query) -> pb::SearchSimilarRequest {
    pb::SearchSimilarRequest {
        query: Some(query),
        ..Default::default()
    }
}

fn search_vector(values: pb::Vector) -> pb::SearchSimilarRequest {
    search(Query::Vector(values))
}

fn list_events(rr: &str) -> pb::ListAuditEventsRequest {
    pb::ListAuditEventsRequest {
        scope: Some(Scope::RemediationRequestId(rr.into())),
        ..Default::default()
    }
}

fn get_incident(id: &str) -> pb::GetIncidentRequest {
    pb::GetIncidentRequest {
        key: Some(Key::Id(id.into())),
    }
}

/// Strings that are not UUIDs, for every id field.
fn malformed_ids() -> Vec<(&'static str, String)> {
    vec![
        ("empty", String::new()),
        ("plain words", "not-a-uuid".into()),
        ("a non-hex digit", "00000000-0000-0000-0000-00000000000g".into()),
        ("one digit short", "00000000-0000-0000-0000-00000000000".into()),
        ("one digit long", "00000000-0000-0000-0000-0000000000000".into()),
        ("SQL", "'; DROP TABLE incidents; --".into()),
        ("NUL", "00000000-0000-0000-0000-000000000000\0".into()),
        ("10 KiB", "0".repeat(10 * 1024)),
        ("emoji", "🔥".repeat(36)),
    ]
}

/// Page tokens no listing ever issued.
fn garbage_tokens() -> Vec<(&'static str, String)> {
    vec![
        (
            "random base64",
            "c29tZSByYW5kb20gYnl0ZXMgdGhhdCBhcmUgbm90IGEgdG9rZW4".into(),
        ),
        ("not base64", "%%%%not-base64!!".into()),
        ("SQL", "' OR 1=1; --".into()),
        ("JSON", r#"{"after":{"$gt":""}}"#.into()),
        ("NUL", "abc\0def".into()),
        ("10 KiB", "A".repeat(10 * 1024)),
        ("whitespace", "   ".into()),
    ]
}

// ---------------------------------------------------------------------------
// Writes

fn write_cases() -> Vec<Case> {
    use Expect::*;
    let mut cases = vec![
        // The event itself.
        case("no event", write_with(|r| r.event = None), Invalid("event")),
        case(
            "no payload",
            write_with(|r| event_of(r).payload = None),
            Invalid("event.payload"),
        ),
        case(
            "correlation_id of 255 chars",
            write_with(|r| event_of(r).correlation_id = "c".repeat(255)),
            Served,
        ),
        case(
            "correlation_id of 256 chars",
            write_with(|r| event_of(r).correlation_id = "c".repeat(256)),
            Invalid("event.correlation_id"),
        ),
        case(
            "correlation_id of 255 four-byte chars",
            write_with(|r| event_of(r).correlation_id = "𝕏".repeat(255)),
            Served,
        ),
        case(
            "correlation_id only whitespace",
            write_with(|r| event_of(r).correlation_id = " \t\n ".into()),
            Invalid("event.correlation_id"),
        ),
        case(
            "request_id of 256 chars",
            write_with(|r| r.request_id = "k".repeat(256)),
            Invalid("request_id"),
        ),
        case(
            "message of exactly 10 KiB",
            write_with(|r| remediation_of(r).message = "m".repeat(10 * 1024)),
            Served,
        ),
        case(
            "message of 10 KiB + 1 byte",
            write_with(|r| remediation_of(r).message = "m".repeat(10 * 1024 + 1)),
            Invalid("event.remediation.message"),
        ),
        case(
            "message of 2561 four-byte chars (10 KiB + 4 bytes)",
            write_with(|r| remediation_of(r).message = "🔥".repeat(2561)),
            Invalid("event.remediation.message"),
        ),
        // Labels.
        case(
            "64 labels of the longest key and value",
            write_with(|r| event_of(r).labels = max_labels(64)),
            Served,
        ),
        case(
            "65 labels",
            write_with(|r| event_of(r).labels = max_labels(65)),
            Invalid("event.labels"),
        ),
        case(
            "label key of 64 chars",
            write_with(|r| {
                event_of(r).labels.insert("k".repeat(64), "v".into());
            }),
            Invalid("event.labels["),
        ),
        case(
            "label value of 256 chars",
            write_with(|r| {
                event_of(r).labels.insert("k".into(), "v".repeat(256));
            }),
            Invalid("event.labels["),
        ),
        case(
            "empty label key",
            write_with(|r| {
                event_of(r).labels.insert(String::new(), "v".into());
            }),
            Invalid("event.labels[\"\"]"),
        ),
        case(
            "label key of 63 four-byte chars, value of 255",
            write_with(|r| {
                event_of(r).labels.insert("🔥".repeat(63), "🔥".repeat(255));
            }),
            Served,
        ),
        // Custom data.
        case(
            "custom.data nested 10 deep",
            write_with(|r| set_payload(r, Payload::Custom(custom_payload(Some(nested_struct(10)))))),
            Served,
        ),
        case(
            "custom.data nested 11 deep",
            write_with(|r| set_payload(r, Payload::Custom(custom_payload(Some(nested_struct(11)))))),
            Invalid("event.custom.data"),
        ),
        case(
            "custom.data nested 11 deep through lists",
            write_with(|r| set_payload(r, Payload::Custom(custom_payload(Some(nested_list(11)))))),
            Invalid("event.custom.data"),
        ),
        case(
            "custom.data nested 40 deep through lists (inside the decoder's limit)",
            write_with(|r| set_payload(r, Payload::Custom(custom_payload(Some(nested_list(40)))))),
            Invalid("event.custom.data"),
        ),
        case(
            "custom.data of 200 KiB",
            write_with(|r| {
                let data = one_field("blob", Kind::StringValue("x".repeat(200 * 1024)));
                set_payload(r, Payload::Custom(custom_payload(Some(data))))
            }),
            Served,
        ),
        case(
            "custom.data over 256 KiB",
            write_with(|r| {
                let data = one_field("blob", Kind::StringValue("x".repeat(257 * 1024)));
                set_payload(r, Payload::Custom(custom_payload(Some(data))))
            }),
            Invalid("event.custom.data"),
        ),
        case(
            "custom.data of 10 000 small fields over 256 KiB",
            write_with(|r| {
                let data = Struct {
                    fields: (0..10_000)
                        .map(|i| (format!("field-{i:05}"), value(Kind::StringValue("y".repeat(20)))))
                        .collect(),
                };
                set_payload(r, Payload::Custom(custom_payload(Some(data))))
            }),
            Invalid("event.custom.data"),
        ),
        case(
            "custom.data with NaN and infinite numbers",
            write_with(|r| {
                let data = Struct {
                    fields: [
                        ("nan".to_owned(), value(Kind::NumberValue(f64::NAN))),
                        ("inf".to_owned(), value(Kind::NumberValue(f64::INFINITY))),
                    ]
                    .into(),
                };
                set_payload(r, Payload::Custom(custom_payload(Some(data))))
            }),
            NoServerError,
        ),
        case(
            "custom.data with an empty key and a Mongo operator",
            write_with(|r| {
                let data = Struct {
                    fields: [
                        (String::new(), value(Kind::NullValue(0))),
                        ("$gt".to_owned(), value(Kind::StringValue(String::new()))),
                    ]
                    .into(),
                };
                set_payload(r, Payload::Custom(custom_payload(Some(data))))
            }),
            Served,
        ),
        case(
            "custom.data with NUL in a key",
            write_with(|r| {
                let data = one_field("a\0b", Kind::BoolValue(true));
                set_payload(r, Payload::Custom(custom_payload(Some(data))))
            }),
            Invalid("event.custom.data"),
        ),
        case(
            "custom.data with NUL in a nested string",
            write_with(|r| {
                let inner = one_field("s", Kind::StringValue("a\0b".into()));
                let data = one_field("o", Kind::StructValue(inner));
                set_payload(r, Payload::Custom(custom_payload(Some(data))))
            }),
            Invalid("event.custom.data"),
        ),
        case(
            "custom.event_type of 101 chars",
            write_with(|r| {
                let mut c = custom_payload(None);
                c.event_type = "e".repeat(101);
                set_payload(r, Payload::Custom(c))
            }),
            Invalid("event.custom.event_type"),
        ),
        case(
            "custom.action of 51 chars",
            write_with(|r| {
                let mut c = custom_payload(None);
                c.action = "a".repeat(51);
                set_payload(r, Payload::Custom(c))
            }),
            Invalid("event.custom.action"),
        ),
        case(
            "custom.outcome of 21 chars",
            write_with(|r| {
                let mut c = custom_payload(None);
                c.outcome = "o".repeat(21);
                set_payload(r, Payload::Custom(c))
            }),
            Invalid("event.custom.outcome"),
        ),
        // Caller-computed vectors.
        case(
            "embedding with NaN",
            write_with(|r| r.embedding = Some(with_value_at(5, f32::NAN))),
            Invalid("embedding.values"),
        ),
        case(
            "embedding with +Inf",
            write_with(|r| r.embedding = Some(with_value_at(0, f32::INFINITY))),
            Invalid("embedding.values"),
        ),
        case(
            "embedding with -Inf",
            write_with(|r| r.embedding = Some(with_value_at(383, f32::NEG_INFINITY))),
            Invalid("embedding.values"),
        ),
        case(
            "embedding all zeros",
            write_with(|r| r.embedding = Some(filled(0.0, DIMENSIONS))),
            Invalid("embedding.values"),
        ),
        case(
            "embedding all negative zeros",
            write_with(|r| r.embedding = Some(filled(-0.0, DIMENSIONS))),
            Invalid("embedding.values"),
        ),
        case(
            "embedding of 383 values",
            write_with(|r| r.embedding = Some(filled(0.5, 383))),
            Invalid("embedding.values"),
        ),
        case(
            "embedding of 385 values",
            write_with(|r| r.embedding = Some(filled(0.5, 385))),
            Invalid("embedding.values"),
        ),
        case(
            "embedding of no values",
            write_with(|r| r.embedding = Some(filled(0.5, 0))),
            Invalid("embedding.values"),
        ),
        // A denormal is finite: the contract allows it.
        case(
            "embedding all denormals",
            write_with(|r| r.embedding = Some(filled(f32::MIN_POSITIVE / 2.0, DIMENSIONS))),
            NoServerError,
        ),
        case(
            "embedding one denormal, the rest zeros",
            write_with(|r| {
                let mut v = filled(0.0, DIMENSIONS);
                v.values[9] = f32::MIN_POSITIVE / 2.0;
                r.embedding = Some(v)
            }),
            NoServerError,
        ),
        case(
            "embedding all f32::MAX",
            write_with(|r| r.embedding = Some(filled(f32::MAX, DIMENSIONS))),
            NoServerError,
        ),
        // Timestamps.
        case(
            "occurred_at 0001-01-01T00:00:00Z",
            write_with(|r| event_of(r).occurred_at = Some(ts(YEAR_1, 0))),
            Served,
        ),
        case(
            "occurred_at one second before year 1",
            write_with(|r| event_of(r).occurred_at = Some(ts(YEAR_1 - 1, 0))),
            Invalid("event.occurred_at"),
        ),
        case(
            "occurred_at 9999-12-31T23:59:59Z",
            write_with(|r| event_of(r).occurred_at = Some(ts(YEAR_9999, 999_999_999))),
            Invalid("event.occurred_at"),
        ),
        case(
            "occurred_at past year 9999",
            write_with(|r| event_of(r).occurred_at = Some(ts(YEAR_9999 + 1, 0))),
            Invalid("event.occurred_at"),
        ),
        case(
            "occurred_at seconds i64::MIN",
            write_with(|r| event_of(r).occurred_at = Some(ts(i64::MIN, 0))),
            Invalid("event.occurred_at"),
        ),
        case(
            "occurred_at seconds i64::MAX",
            write_with(|r| event_of(r).occurred_at = Some(ts(i64::MAX, 0))),
            Invalid("event.occurred_at"),
        ),
        case(
            "occurred_at nanos -1",
            write_with(|r| event_of(r).occurred_at = Some(ts(1_700_000_000, -1))),
            Invalid("event.occurred_at"),
        ),
        case(
            "occurred_at nanos 1 000 000 000",
            write_with(|r| event_of(r).occurred_at = Some(ts(1_700_000_000, 1_000_000_000))),
            Invalid("event.occurred_at"),
        ),
        case(
            "occurred_at nanos 999 999 999",
            write_with(|r| event_of(r).occurred_at = Some(ts(1_700_000_000, 999_999_999))),
            Served,
        ),
        case(
            "occurred_at 4 minutes ahead",
            write_with(|r| event_of(r).occurred_at = Some(in_future(4 * 60))),
            Served,
        ),
        case(
            "occurred_at 10 minutes ahead",
            write_with(|r| event_of(r).occurred_at = Some(in_future(10 * 60))),
            Invalid("event.occurred_at"),
        ),
        case(
            "no occurred_at",
            write_with(|r| event_of(r).occurred_at = None),
            Invalid("event.occurred_at"),
        ),
        case(
            "started_at after completed_at",
            write_with(|r| {
                let remediation = remediation_of(r);
                remediation.started_at = Some(ts(1_700_000_100, 0));
                remediation.completed_at = Some(ts(1_700_000_000, 0));
            }),
            Invalid("event.remediation.completed_at"),
        ),
        case(
            "started_at year 1, completed_at year 9999",
            write_with(|r| {
                let remediation = remediation_of(r);
                remediation.started_at = Some(ts(YEAR_1, 0));
                remediation.completed_at = Some(ts(YEAR_9999, 999_999_999));
            }),
            Served,
        ),
        case(
            "started_at nanos -1",
            write_with(|r| remediation_of(r).started_at = Some(ts(1_700_000_000, -1))),
            Invalid("event.remediation.started_at"),
        ),
        case(
            "completed_at seconds i64::MAX",
            write_with(|r| remediation_of(r).completed_at = Some(ts(i64::MAX, 0))),
            Invalid("event.remediation.completed_at"),
        ),
        // Durations.
        case(
            "workflow duration of -1 s",
            write_with(|r| {
                set_payload(
                    r,
                    workflow_payload(pb::ExecutionStatus::Running as i32, Some(dur(-1, 0))),
                )
            }),
            Invalid("event.workflow.duration"),
        ),
        case(
            "workflow duration nanos 1 000 000 000",
            write_with(|r| {
                set_payload(
                    r,
                    workflow_payload(pb::ExecutionStatus::Running as i32, Some(dur(0, 1_000_000_000))),
                )
            }),
            Invalid("event.workflow.duration"),
        ),
        case(
            "execution duration of i64::MAX seconds",
            write_with(|r| set_payload(r, execution_payload(dur(i64::MAX, 999_999_999)))),
            Invalid("event.execution.duration"),
        ),
        case(
            "GetActionStats over an execution of i64::MAX seconds",
            pb::GetActionStatsRequest::default(),
            Served,
        ),
        // Numbers.
        case(
            "ai_analysis confidence NaN",
            write_with(|r| set_payload(r, ai_payload(f64::NAN))),
            Invalid("event.ai_analysis.confidence"),
        ),
        case(
            "ai_analysis confidence +Inf",
            write_with(|r| set_payload(r, ai_payload(f64::INFINITY))),
            Invalid("event.ai_analysis.confidence"),
        ),
        case(
            "ai_analysis confidence just above 1",
            write_with(|r| set_payload(r, ai_payload(1.0 + f64::EPSILON))),
            Invalid("event.ai_analysis.confidence"),
        ),
        case(
            "ai_analysis confidence -0.0",
            write_with(|r| set_payload(r, ai_payload(-0.0))),
            Served,
        ),
        // Enum numbers.
        case(
            "severity 99",
            write_with(|r| remediation_of(r).severity = 99),
            Invalid("event.remediation.severity"),
        ),
        case(
            "severity -1",
            write_with(|r| remediation_of(r).severity = -1),
            Invalid("event.remediation.severity"),
        ),
        case(
            "phase -1",
            write_with(|r| remediation_of(r).phase = -1),
            Invalid("event.remediation.phase"),
        ),
        case(
            "phase UNSPECIFIED",
            write_with(|r| remediation_of(r).phase = 0),
            Invalid("event.remediation.phase"),
        ),
        case(
            "workflow status 42",
            write_with(|r| set_payload(r, workflow_payload(42, None))),
            Invalid("event.workflow.status"),
        ),
        case(
            "execution status i32::MIN",
            write_with(|r| {
                let mut payload = execution_payload(dur(1, 0));
                if let Payload::Execution(e) = &mut payload {
                    e.status = i32::MIN;
                }
                set_payload(r, payload)
            }),
            Invalid("event.execution.status"),
        ),
        // parent_event_id.
        case(
            "parent_event_id of an event that does not exist",
            write_with(|r| event_of(r).parent_event_id = uuid::Uuid::new_v4().to_string()),
            Invalid("event.parent_event_id"),
        ),
    ];
    for (what, id) in malformed_ids().into_iter().filter(|(_, id)| !id.is_empty()) {
        cases.push(case(
            format!("parent_event_id {what}"),
            write_with(|r| event_of(r).parent_event_id = id),
            Invalid("event.parent_event_id"),
        ));
    }

    // NUL in every string field: PostgreSQL text cannot hold it (README).
    type Mutate = fn(&mut pb::WriteAuditRequest);
    let nul_fields: [(&'static str, Mutate); 20] = [
        ("event.correlation_id", |r| event_of(r).correlation_id = "a\0b".into()),
        ("event.remediation_request_id", |r| {
            event_of(r).remediation_request_id = "a\0b".into()
        }),
        ("event.namespace", |r| event_of(r).namespace = "a\0b".into()),
        ("event.cluster", |r| event_of(r).cluster = "a\0b".into()),
        ("event.labels[", |r| {
            event_of(r).labels.insert("a\0b".into(), "v".into());
        }),
        ("event.labels[", |r| {
            event_of(r).labels.insert("k".into(), "a\0b".into());
        }),
        ("event.remediation.signal_type", |r| {
            remediation_of(r).signal_type = "a\0b".into()
        }),
        ("event.remediation.signal_name", |r| {
            remediation_of(r).signal_name = "a\0b".into()
        }),
        ("event.remediation.target.kind", |r| target_of(r).kind = "a\0b".into()),
        ("event.remediation.target.name", |r| target_of(r).name = "a\0b".into()),
        ("event.remediation.target.namespace", |r| {
            target_of(r).namespace = "a\0b".into()
        }),
        ("event.remediation.message", |r| {
            remediation_of(r).message = "a\0b".into()
        }),
        ("event.remediation.priority", |r| {
            remediation_of(r).priority = "a\0b".into()
        }),
        ("request_id", |r| r.request_id = "a\0b".into()),
        ("event.custom.event_type", |r| {
            let mut c = custom_payload(None);
            c.event_type = "a\0b".into();
            set_payload(r, Payload::Custom(c))
        }),
        ("event.custom.text", |r| {
            let mut c = custom_payload(None);
            c.text = "a\0b".into();
            set_payload(r, Payload::Custom(c))
        }),
        ("event.ai_analysis.root_cause", |r| {
            set_payload(
                r,
                Payload::AiAnalysis(pb::AiAnalysisAudit {
                    root_cause: "a\0b".into(),
                    recommended_action: "restart_pod".into(),
                    confidence: 0.5,
                    reasoning: String::new(),
                    model: String::new(),
                }),
            )
        }),
        ("event.ai_analysis.reasoning", |r| {
            set_payload(
                r,
                Payload::AiAnalysis(pb::AiAnalysisAudit {
                    root_cause: "a leak".into(),
                    recommended_action: "restart_pod".into(),
                    confidence: 0.5,
                    reasoning: "a\0b".into(),
                    model: "a\0b".into(),
                }),
            )
        }),
        ("event.workflow.error_message", |r| {
            let mut payload = workflow_payload(pb::ExecutionStatus::Failed as i32, None);
            if let Payload::Workflow(w) = &mut payload {
                w.error_message = "a\0b".into();
            }
            set_payload(r, payload)
        }),
        ("event.execution.action_type", |r| {
            let mut payload = execution_payload(dur(1, 0));
            if let Payload::Execution(e) = &mut payload {
                e.action_type = "a\0b".into();
            }
            set_payload(r, payload)
        }),
    ];
    for (field, mutate) in nul_fields {
        cases.push(case(format!("NUL in {field}"), write_with(mutate), Invalid(field)));
    }
    cases
}

fn batch(requests: Vec<pb::WriteAuditRequest>) -> pb::BatchWriteAuditRequest {
    pb::BatchWriteAuditRequest { requests }
}

fn batch_cases() -> Vec<Case> {
    use Expect::*;
    let ok = || write_with(|_| {});
    let keyed = |key: &str, rr: &str| {
        let mut request = with_vector(write(remediation_event(rr)));
        request.request_id = key.into();
        request
    };
    let same_key = unique("key");
    // Built once: two builds could straddle a second and differ in occurred_at.
    let twice = keyed(&unique("key"), &unique("rr"));
    vec![
        case("empty batch", batch(vec![]), Invalid("requests")),
        case(
            "1001 requests",
            batch((0..1001).map(|_| ok()).collect()),
            Invalid("requests"),
        ),
        case(
            "one bad item among good ones",
            batch(vec![ok(), write_with(|r| event_of(r).labels = max_labels(65)), ok()]),
            Invalid("requests[1].event.labels"),
        ),
        case(
            "a NaN vector in the last item",
            batch(vec![
                ok(),
                ok(),
                write_with(|r| r.embedding = Some(with_value_at(1, f32::NAN))),
            ]),
            Invalid("requests[2].embedding.values"),
        ),
        case(
            "a missing parent in the second item",
            batch(vec![
                ok(),
                write_with(|r| event_of(r).parent_event_id = uuid::Uuid::new_v4().to_string()),
            ]),
            Invalid("requests[1].event.parent_event_id"),
        ),
        case(
            "NUL in the first item",
            batch(vec![write_with(|r| event_of(r).namespace = "\0".into()), ok()]),
            Invalid("requests[0].event.namespace"),
        ),
        case(
            "one idempotency key for two different events",
            batch(vec![keyed(&same_key, &unique("rr")), keyed(&same_key, &unique("rr"))]),
            Code(tonic::Code::AlreadyExists),
        ),
        case(
            "one idempotency key twice for the same event",
            batch(vec![twice.clone(), twice]),
            Served,
        ),
    ]
}

/// Every write-side case on one server; afterwards only what was served is
/// stored, and the server still serves.
#[tokio::test]
async fn hostile_writes_are_refused_cleanly_and_store_nothing() {
    let app = spawn_app().await;
    let mut clients = Clients::new(&app).await;
    let mut cases = write_cases();
    cases.extend(batch_cases());
    // Undecodable bytes are the caller's error (src/grpc/codec.rs).
    cases.extend(undecodable_cases(Expect::InvalidAnyField));
    run(&mut clients, cases).await;
    assert_only_served_writes_stored(&app, &clients).await;
    assert_still_healthy(&app, &mut clients).await;
}

// ---------------------------------------------------------------------------
// Reads, searches and jobs

/// Writes `n` events of one incident with caller vectors; returns the incident id.
async fn seed(clients: &mut Clients, rr: &str, n: usize) -> String {
    let requests = (0..n)
        .map(|i| pb::WriteAuditRequest {
            embedding: Some(vector(i + 2)),
            ..write(remediation_event(rr))
        })
        .collect();
    let responses = clients
        .audit
        .batch_write_audit(batch(requests))
        .await
        .expect("seed events")
        .into_inner()
        .responses;
    clients.record(&responses);
    responses[0].incident_id.clone()
}

fn query_cases(incident_id: &str, incidents_token: &str, events_token: &str, rr: &str) -> Vec<Case> {
    use Expect::*;
    let filter = |f: fn(&mut pb::IncidentFilter)| {
        let mut filter = pb::IncidentFilter::default();
        f(&mut filter);
        Some(filter)
    };
    let with_filter = |f: fn(&mut pb::IncidentFilter)| pb::SearchSimilarRequest {
        filter: filter(f),
        ..search_vector(vector(3))
    };
    let mut cases = vec![
        // SearchSimilar: the query vector.
        case(
            "vector with NaN",
            search_vector(with_value_at(2, f32::NAN)),
            Invalid("vector.values"),
        ),
        case(
            "vector with +Inf",
            search_vector(with_value_at(0, f32::INFINITY)),
            Invalid("vector.values"),
        ),
        case(
            "vector with -Inf",
            search_vector(with_value_at(383, f32::NEG_INFINITY)),
            Invalid("vector.values"),
        ),
        case(
            "vector all zeros",
            search_vector(filled(0.0, DIMENSIONS)),
            Invalid("vector.values"),
        ),
        case(
            "vector of 383 values",
            search_vector(filled(0.5, 383)),
            Invalid("vector.values"),
        ),
        case(
            "vector of 385 values",
            search_vector(filled(0.5, 385)),
            Invalid("vector.values"),
        ),
        case(
            "vector of no values",
            search_vector(filled(0.5, 0)),
            Invalid("vector.values"),
        ),
        case(
            "vector of 100 000 values",
            search_vector(filled(0.5, 100_000)),
            Invalid("vector.values"),
        ),
        case(
            "vector all denormals",
            search_vector(filled(f32::MIN_POSITIVE / 2.0, DIMENSIONS)),
            NoServerError,
        ),
        case(
            "vector one denormal, the rest zeros",
            search_vector({
                let mut v = filled(0.0, DIMENSIONS);
                v.values[0] = f32::MIN_POSITIVE / 2.0;
                v
            }),
            NoServerError,
        ),
        case(
            "vector all f32::MAX",
            search_vector(filled(f32::MAX, DIMENSIONS)),
            NoServerError,
        ),
        case("no query", pb::SearchSimilarRequest::default(), Invalid("query")),
        case("empty text", search(Query::Text(String::new())), Invalid("text")),
        case(
            "text with NUL",
            search(Query::Text("oom\0kill".into())),
            Invalid("text"),
        ),
        case(
            "text of 10 KiB + 1",
            search(Query::Text("t".repeat(10 * 1024 + 1))),
            Invalid("text"),
        ),
        case(
            "hybrid mode with a vector query",
            pb::SearchSimilarRequest {
                mode: pb::SearchMode::Hybrid as i32,
                ..search_vector(vector(3))
            },
            Invalid("mode"),
        ),
        case(
            "event_id of an event that does not exist",
            search(Query::EventId(uuid::Uuid::new_v4().to_string())),
            Code(tonic::Code::NotFound),
        ),
    ];
    // top_k and min_similarity.
    for (top_k, expect) in [
        (-1, Invalid("top_k")),
        (0, Served),
        (1, Served),
        (100, Served),
        (101, Invalid("top_k")),
        (i32::MAX, Invalid("top_k")),
        (i32::MIN, Invalid("top_k")),
    ] {
        cases.push(case(
            format!("top_k {top_k}"),
            pb::SearchSimilarRequest {
                top_k,
                ..search_vector(vector(3))
            },
            expect,
        ));
    }
    for (min, expect) in [
        (f32::NAN, Invalid("min_similarity")),
        (f32::INFINITY, Invalid("min_similarity")),
        (f32::NEG_INFINITY, Invalid("min_similarity")),
        (1.5, Invalid("min_similarity")),
        (-1.5, Invalid("min_similarity")),
        (1.0, Served),
        (-1.0, Served),
    ] {
        cases.push(case(
            format!("min_similarity {min}"),
            pb::SearchSimilarRequest {
                min_similarity: Some(min),
                ..search_vector(vector(3))
            },
            expect,
        ));
    }
    // Enum numbers.
    for (name, kinds, field) in [
        ("kinds [42]", vec![42], "kinds[0]"),
        ("kinds [UNSPECIFIED]", vec![0], "kinds[0]"),
        ("kinds [REMEDIATION, -5]", vec![1, -5], "kinds[1]"),
    ] {
        cases.push(case(
            format!("SearchSimilar {name}"),
            pb::SearchSimilarRequest {
                kinds: kinds.clone(),
                ..search_vector(vector(3))
            },
            Invalid(field),
        ));
        cases.push(case(
            format!("ListAuditEvents {name}"),
            pb::ListAuditEventsRequest {
                kinds,
                ..list_events(rr)
            },
            Invalid(field),
        ));
    }
    for mode in [7, -1, i32::MAX] {
        cases.push(case(
            format!("SearchMode {mode}"),
            pb::SearchSimilarRequest {
                mode,
                ..search_vector(vector(3))
            },
            Invalid("mode"),
        ));
    }
    cases.extend([
        case(
            "filter severities [99]",
            with_filter(|f| f.severities = vec![99]),
            Invalid("filter.severities[0]"),
        ),
        case(
            "filter phases [-1]",
            with_filter(|f| f.phases = vec![-1]),
            Invalid("filter.phases[0]"),
        ),
        case(
            "filter with 65 labels",
            with_filter(|f| f.labels = max_labels(65)),
            Invalid("filter.labels"),
        ),
        case(
            "filter since before year 1",
            with_filter(|f| f.since = Some(ts(YEAR_1 - 1, 0))),
            Invalid("filter.since"),
        ),
        case(
            "filter until nanos -1",
            with_filter(|f| f.until = Some(ts(0, -1))),
            Invalid("filter.until"),
        ),
        case(
            "filter until before since",
            with_filter(|f| {
                f.since = Some(ts(1_700_000_100, 0));
                f.until = Some(ts(1_700_000_000, 0));
            }),
            Invalid("filter.until"),
        ),
        case(
            "filter since year 1, until year 9999",
            with_filter(|f| {
                f.since = Some(ts(YEAR_1, 0));
                f.until = Some(ts(YEAR_9999, 999_999_999));
            }),
            Served,
        ),
        case(
            "filter namespace with NUL",
            with_filter(|f| f.namespace = "pay\0ments".into()),
            Invalid("filter.namespace"),
        ),
        case(
            "model of 256 chars",
            pb::SearchSimilarRequest {
                model: "m".repeat(256),
                ..search_vector(vector(3))
            },
            Invalid("model"),
        ),
        case(
            "a model that is not configured",
            pb::SearchSimilarRequest {
                model: "'; DROP TABLE embedding_models; --".into(),
                ..search_vector(vector(3))
            },
            Invalid("model"),
        ),
        case(
            "GetActionStats filter severities [99]",
            pb::GetActionStatsRequest {
                filter: filter(|f| f.severities = vec![99]),
            },
            Invalid("filter.severities[0]"),
        ),
        case(
            "ListIncidents filter phases [i32::MIN]",
            pb::ListIncidentsRequest {
                filter: filter(|f| f.phases = vec![i32::MIN]),
                ..Default::default()
            },
            Invalid("filter.phases[0]"),
        ),
    ]);

    // page_size and page tokens.
    for page_size in [-1, i32::MIN] {
        cases.extend([
            case(
                format!("ListIncidents page_size {page_size}"),
                pb::ListIncidentsRequest {
                    page_size,
                    ..Default::default()
                },
                Invalid("page_size"),
            ),
            case(
                format!("ListAuditEvents page_size {page_size}"),
                pb::ListAuditEventsRequest {
                    page_size,
                    ..list_events(rr)
                },
                Invalid("page_size"),
            ),
            case(
                format!("ListJobs page_size {page_size}"),
                pb::ListJobsRequest {
                    page_size,
                    ..Default::default()
                },
                Invalid("page_size"),
            ),
            case(
                format!("ListLegalHolds page_size {page_size}"),
                pb::ListLegalHoldsRequest {
                    page_size,
                    page_token: String::new(),
                },
                Invalid("page_size"),
            ),
        ]);
    }
    cases.extend([
        case(
            "ListIncidents page_size i32::MAX (clamped)",
            pb::ListIncidentsRequest {
                page_size: i32::MAX,
                ..Default::default()
            },
            Served,
        ),
        case(
            "ListAuditEvents page_size i32::MAX (clamped)",
            pb::ListAuditEventsRequest {
                page_size: i32::MAX,
                ..list_events(rr)
            },
            Served,
        ),
        case(
            "ListIncidents empty page_token (the first page)",
            pb::ListIncidentsRequest::default(),
            Served,
        ),
        case(
            "ListIncidents order_by with SQL",
            pb::ListIncidentsRequest {
                order_by: "last_event_at desc; DROP TABLE incidents; --".into(),
                ..Default::default()
            },
            Invalid("order_by"),
        ),
        case(
            "ListIncidents order_by a column not offered",
            pb::ListIncidentsRequest {
                order_by: "id".into(),
                ..Default::default()
            },
            Invalid("order_by"),
        ),
    ]);
    for (what, token) in garbage_tokens() {
        cases.extend([
            case(
                format!("ListIncidents page_token {what}"),
                pb::ListIncidentsRequest {
                    page_token: token.clone(),
                    ..Default::default()
                },
                Invalid("page_token"),
            ),
            case(
                format!("ListAuditEvents page_token {what}"),
                pb::ListAuditEventsRequest {
                    page_token: token.clone(),
                    ..list_events(rr)
                },
                Invalid("page_token"),
            ),
            case(
                format!("ListJobs page_token {what}"),
                pb::ListJobsRequest {
                    page_token: token.clone(),
                    ..Default::default()
                },
                Invalid("page_token"),
            ),
            case(
                format!("ListLegalHolds page_token {what}"),
                pb::ListLegalHoldsRequest {
                    page_size: 0,
                    page_token: token,
                },
                Invalid("page_token"),
            ),
        ]);
    }
    // Real tokens, misused.
    let mut flipped = incidents_token.to_owned().into_bytes();
    let middle = flipped.len() / 2;
    flipped[middle] = if flipped[middle] == b'A' { b'B' } else { b'A' };
    let flipped = String::from_utf8(flipped).unwrap();
    cases.extend([
        case(
            "ListIncidents page_token with one character changed",
            pb::ListIncidentsRequest {
                page_size: 1,
                page_token: flipped,
                ..Default::default()
            },
            Invalid("page_token"),
        ),
        case(
            "ListIncidents page_token with a character cut off",
            pb::ListIncidentsRequest {
                page_size: 1,
                page_token: incidents_token[..incidents_token.len() - 1].to_owned(),
                ..Default::default()
            },
            Invalid("page_token"),
        ),
        case(
            "ListIncidents page_token under another filter",
            pb::ListIncidentsRequest {
                page_size: 1,
                page_token: incidents_token.to_owned(),
                filter: filter(|f| f.namespace = "elsewhere".into()),
                ..Default::default()
            },
            Invalid("page_token"),
        ),
        case(
            "ListIncidents page_token under another order",
            pb::ListIncidentsRequest {
                page_size: 1,
                page_token: incidents_token.to_owned(),
                order_by: "first_seen_at asc".into(),
                ..Default::default()
            },
            Invalid("page_token"),
        ),
        case(
            "ListIncidents page_token given to ListAuditEvents",
            pb::ListAuditEventsRequest {
                page_size: 1,
                page_token: incidents_token.to_owned(),
                ..list_events(rr)
            },
            Invalid("page_token"),
        ),
        case(
            "ListAuditEvents page_token given to ListIncidents",
            pb::ListIncidentsRequest {
                page_size: 1,
                page_token: events_token.to_owned(),
                ..Default::default()
            },
            Invalid("page_token"),
        ),
        case(
            "ListAuditEvents page_token given to ListLegalHolds",
            pb::ListLegalHoldsRequest {
                page_size: 1,
                page_token: events_token.to_owned(),
            },
            Invalid("page_token"),
        ),
        case(
            "ListAuditEvents page_token for another scope",
            pb::ListAuditEventsRequest {
                page_size: 1,
                page_token: events_token.to_owned(),
                scope: Some(Scope::IncidentId(incident_id.to_owned())),
                ..Default::default()
            },
            Invalid("page_token"),
        ),
        case(
            "ListAuditEvents page_token with other kinds",
            pb::ListAuditEventsRequest {
                page_size: 1,
                page_token: events_token.to_owned(),
                kinds: vec![pb::AuditKind::Custom as i32],
                ..list_events(rr)
            },
            Invalid("page_token"),
        ),
        case(
            "ListAuditEvents page_token as issued (control)",
            pb::ListAuditEventsRequest {
                page_size: 1,
                page_token: events_token.to_owned(),
                ..list_events(rr)
            },
            Served,
        ),
    ]);

    // Ids.
    for (what, id) in malformed_ids() {
        cases.extend([
            case(format!("GetIncident id {what}"), get_incident(&id), Invalid("id")),
            case(
                format!("ListAuditEvents incident_id {what}"),
                pb::ListAuditEventsRequest {
                    scope: Some(Scope::IncidentId(id.clone())),
                    ..Default::default()
                },
                Invalid("incident_id"),
            ),
            case(
                format!("SearchSimilar event_id {what}"),
                search(Query::EventId(id.clone())),
                Invalid("event_id"),
            ),
            case(
                format!("GetJob id {what}"),
                pb::GetJobRequest { id: id.clone() },
                Invalid("id"),
            ),
            case(
                format!("CancelJob id {what}"),
                pb::CancelJobRequest { id: id.clone() },
                Invalid("id"),
            ),
            case(format!("WatchJob id {what}"), pb::WatchJobRequest { id }, Invalid("id")),
        ]);
    }
    let nobody = uuid::Uuid::new_v4().to_string();
    cases.extend([
        case(
            "GetIncident no key",
            pb::GetIncidentRequest { key: None },
            Invalid("key"),
        ),
        case(
            "GetIncident id that does not exist",
            get_incident(&nobody),
            Code(tonic::Code::NotFound),
        ),
        case(
            "GetIncident remediation_request_id of 256 chars",
            pb::GetIncidentRequest {
                key: Some(Key::RemediationRequestId("r".repeat(256))),
            },
            Invalid("remediation_request_id"),
        ),
        case(
            "GetIncident remediation_request_id with NUL",
            pb::GetIncidentRequest {
                key: Some(Key::RemediationRequestId("rr\0".into())),
            },
            Invalid("remediation_request_id"),
        ),
        case(
            "ListAuditEvents no scope",
            pb::ListAuditEventsRequest::default(),
            Invalid("scope"),
        ),
        case(
            "ListAuditEvents correlation_id of 256 chars",
            pb::ListAuditEventsRequest {
                scope: Some(Scope::CorrelationId("c".repeat(256))),
                ..Default::default()
            },
            Invalid("correlation_id"),
        ),
        case(
            "GetJob id that does not exist",
            pb::GetJobRequest { id: nobody.clone() },
            Code(tonic::Code::NotFound),
        ),
        case(
            "ListJobs states [42]",
            pb::ListJobsRequest {
                states: vec![42],
                ..Default::default()
            },
            Invalid("states[0]"),
        ),
        case(
            "ListJobs type of 65 chars",
            pb::ListJobsRequest {
                r#type: "t".repeat(65),
                ..Default::default()
            },
            Invalid("type"),
        ),
        case("StartJob no spec", pb::StartJobRequest::default(), Invalid("spec")),
        case(
            "StartJob purge older_than seconds i64::MAX",
            pb::StartJobRequest {
                spec: Some(Spec::Purge(pb::PurgeJob {
                    older_than: Some(ts(i64::MAX, 0)),
                })),
                request_id: String::new(),
            },
            Invalid("purge.older_than"),
        ),
        case(
            "StartJob purge older_than nanos -1",
            pb::StartJobRequest {
                spec: Some(Spec::Purge(pb::PurgeJob {
                    older_than: Some(ts(0, -1)),
                })),
                request_id: String::new(),
            },
            Invalid("purge.older_than"),
        ),
        case(
            "StartJob purge older_than in the future",
            pb::StartJobRequest {
                spec: Some(Spec::Purge(pb::PurgeJob {
                    older_than: Some(in_future(3600)),
                })),
                request_id: String::new(),
            },
            Invalid("purge.older_than"),
        ),
        case(
            "StartJob reembed with an empty model",
            pb::StartJobRequest {
                spec: Some(Spec::Reembed(pb::ReembedJob { model: String::new() })),
                request_id: String::new(),
            },
            Invalid("reembed.model"),
        ),
        case(
            "StartJob request_id with NUL",
            pb::StartJobRequest {
                spec: Some(Spec::Reembed(pb::ReembedJob { model: "x".into() })),
                request_id: "a\0".into(),
            },
            Invalid("request_id"),
        ),
        case(
            "VerifyAuditChain correlation_id with NUL",
            pb::VerifyAuditChainRequest {
                correlation_id: "c\0".into(),
            },
            Invalid("correlation_id"),
        ),
        case(
            "VerifyAuditChain correlation_id of 256 chars",
            pb::VerifyAuditChainRequest {
                correlation_id: "c".repeat(256),
            },
            Invalid("correlation_id"),
        ),
        case(
            "PlaceLegalHold reason with NUL",
            pb::PlaceLegalHoldRequest {
                correlation_id: "corr".into(),
                reason: "court\0order".into(),
            },
            Invalid("reason"),
        ),
        case(
            "PlaceLegalHold reason of 1001 chars",
            pb::PlaceLegalHoldRequest {
                correlation_id: "corr".into(),
                reason: "r".repeat(1001),
            },
            Invalid("reason"),
        ),
        case(
            "PlaceLegalHold correlation_id of 256 chars",
            pb::PlaceLegalHoldRequest {
                correlation_id: "c".repeat(256),
                reason: "court order".into(),
            },
            Invalid("correlation_id"),
        ),
    ]);
    cases
}

/// Every read-side case on one server holding a few events.
#[tokio::test]
async fn hostile_queries_are_refused_cleanly() {
    let app = spawn_app().await;
    let mut clients = Clients::new(&app).await;
    let rr = unique("seeded");
    let incident_id = seed(&mut clients, &rr, 3).await;
    seed(&mut clients, &unique("seeded"), 1).await;
    let incidents_token = clients
        .incidents
        .list_incidents(pb::ListIncidentsRequest {
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .next_page_token;
    let events_token = clients
        .incidents
        .list_audit_events(pb::ListAuditEventsRequest {
            page_size: 1,
            ..list_events(&rr)
        })
        .await
        .unwrap()
        .into_inner()
        .next_page_token;
    assert!(
        !incidents_token.is_empty() && !events_token.is_empty(),
        "two pages each"
    );

    run(
        &mut clients,
        query_cases(&incident_id, &incidents_token, &events_token, &rr),
    )
    .await;
    assert_only_served_writes_stored(&app, &clients).await;
    assert_still_healthy(&app, &mut clients).await;
}

// ---------------------------------------------------------------------------
// Metacharacters

/// Strings that break naive SQL, LIKE, regex, JSON, tsquery or terminal
/// handling. None holds NUL (refused, see above).
const METACHARACTERS: [(&str, &str); 14] = [
    ("SQL", "'; DROP TABLE audit_events; --"),
    ("SQL quotes", "\" ' ` $$ $tag$ E'\\x00'"),
    ("LIKE", "%_%"),
    ("regex", ".*( [a-"),
    ("JSON", r#"{"$gt":""}"#),
    ("JSON path", "$.a[*] ? (@ > 1)"),
    ("backslashes", r"\\ \u0000 \x00 \n"),
    ("tsquery", "a & !b | (c:* <-> d)"),
    ("emoji", "🔥💥 𝕏 👩‍👩‍👧 \u{10FFFF}"),
    ("RTL overrides", "\u{202E}gnp.exe\u{202C} \u{2066}x\u{2069}"),
    ("zero-width", "a\u{200B}b\u{FEFF}c\u{200D}"),
    ("control characters", "line1\nline2\r\n\t\u{7}\u{1B}[31m"),
    ("HTML", "<script>alert(1)</script>&amp;"),
    ("format strings", "%s %n {0} ${x} {{"),
];

fn first_chars(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

/// A remediation event with `text` in every string field.
fn remediation_everywhere(index: usize, text: &str) -> pb::WriteAuditRequest {
    let mut event = remediation_event(&format!("{text}#rr{index}"));
    event.correlation_id = format!("{text}#corr{index}");
    event.namespace = text.into();
    event.cluster = text.into();
    event.labels = [
        (first_chars(text, 63), text.to_owned()),
        ("plain".to_owned(), text.to_owned()),
    ]
    .into();
    event.payload = Some(Payload::Remediation(pb::RemediationAudit {
        signal_type: text.into(),
        signal_name: text.into(),
        severity: pb::Severity::Warning as i32,
        target: Some(pb::ResourceRef {
            kind: text.into(),
            name: text.into(),
            namespace: text.into(),
        }),
        phase: pb::Phase::Pending as i32,
        message: text.into(),
        started_at: Some(timestamp_ago(120)),
        completed_at: Some(timestamp_ago(90)),
        priority: text.into(),
    }));
    pb::WriteAuditRequest {
        event: Some(event),
        request_id: format!("{text}#key{index}"),
        embedding: None,
    }
}

/// A custom event of the same incident with `text` in every string field and
/// in its data's keys and values.
fn custom_everywhere(index: usize, text: &str) -> pb::WriteAuditRequest {
    let mut event = remediation_event(&format!("{text}#rr{index}"));
    event.correlation_id = format!("{text}#corr{index}");
    event.namespace = text.into();
    let inner = one_field(
        text,
        Kind::ListValue(ListValue {
            values: vec![value(Kind::StringValue(text.into()))],
        }),
    );
    event.payload = Some(Payload::Custom(pb::CustomAudit {
        event_type: first_chars(text, 100),
        action: first_chars(text, 50),
        outcome: first_chars(text, 20),
        data: Some(Struct {
            fields: [
                (text.to_owned(), value(Kind::StringValue(text.into()))),
                ("nested".to_owned(), value(Kind::StructValue(inner))),
            ]
            .into(),
        }),
        text: text.into(),
    }));
    pb::WriteAuditRequest {
        event: Some(event),
        request_id: String::new(),
        embedding: None,
    }
}

/// An execution event of the same incident with `text` as its action type.
fn execution_everywhere(index: usize, text: &str) -> pb::WriteAuditRequest {
    let mut event = remediation_event(&format!("{text}#rr{index}"));
    event.correlation_id = format!("{text}#corr{index}");
    event.namespace = text.into();
    event.payload = Some(Payload::Execution(pb::ExecutionAudit {
        action_type: text.into(),
        target: Some(pb::ResourceRef {
            kind: text.into(),
            name: text.into(),
            namespace: String::new(),
        }),
        status: pb::ExecutionStatus::Failed as i32,
        duration: Some(dur(12, 500_000_000)),
        error_message: text.into(),
    }));
    with_vector(write(event))
}

/// Metacharacters in every string field are stored verbatim and read back
/// identical, and searching and filtering by them matches them literally.
#[tokio::test]
async fn metacharacters_are_stored_verbatim_and_matched_literally() {
    let app = spawn_app().await;
    let mut clients = Clients::new(&app).await;

    let mut failures = Vec::new();
    for (index, (what, text)) in METACHARACTERS.into_iter().enumerate() {
        let rr = format!("{text}#rr{index}");
        let sent = [
            remediation_everywhere(index, text),
            custom_everywhere(index, text),
            execution_everywhere(index, text),
        ];
        let responses = match clients.audit.batch_write_audit(batch(sent.to_vec())).await {
            Ok(reply) => reply.into_inner().responses,
            Err(status) => {
                failures.push(format!("{what}: write refused: {status:?}"));
                continue;
            }
        };
        clients.record(&responses);

        // Read back through the incident's timeline, by the hostile rr id.
        let stored = clients
            .incidents
            .list_audit_events(list_events(&rr))
            .await
            .map(|r| r.into_inner().events);
        match stored {
            Ok(stored) => {
                let got: Vec<_> = stored.into_iter().map(|e| e.event.expect("an event")).collect();
                let wanted: Vec<_> = sent.iter().map(|r| r.event.clone().unwrap()).collect();
                for want in &wanted {
                    if !got.contains(want) {
                        failures.push(format!("{what}: not read back verbatim: sent {want:?}, read {got:?}"));
                    }
                }
            }
            Err(status) => failures.push(format!("{what}: ListAuditEvents: {status:?}")),
        }

        // The same request id again is a duplicate, not a new event.
        match clients.audit.write_audit(sent[0].clone()).await {
            Ok(reply) if reply.get_ref().duplicate => {}
            other => failures.push(format!("{what}: idempotent retry: {other:?}")),
        }

        // Filters match literally: `%_%` or `.*` must not match other incidents.
        let listed = clients
            .incidents
            .list_incidents(pb::ListIncidentsRequest {
                filter: Some(pb::IncidentFilter {
                    alert_name: text.into(),
                    namespace: text.into(),
                    labels: [("plain".to_owned(), text.to_owned())].into(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().incidents);
        match listed {
            Ok(incidents) if incidents.len() == 1 && incidents[0].remediation_request_id == rr => {}
            other => failures.push(format!(
                "{what}: ListIncidents by alert_name/namespace/label: {other:?}"
            )),
        }
        let stats = clients
            .incidents
            .get_action_stats(pb::GetActionStatsRequest {
                filter: Some(pb::IncidentFilter {
                    action_type: text.into(),
                    ..Default::default()
                }),
            })
            .await
            .map(|r| r.into_inner().stats);
        match stats {
            Ok(stats) if stats.iter().all(|s| s.action_type == text) && stats.len() == 1 => {}
            other => failures.push(format!("{what}: GetActionStats by action_type: {other:?}")),
        }
        match clients
            .incidents
            .get_incident(pb::GetIncidentRequest {
                key: Some(Key::RemediationRequestId(rr.clone())),
            })
            .await
        {
            Ok(incident) if incident.get_ref().id == responses[0].incident_id => {}
            other => failures.push(format!("{what}: GetIncident by remediation_request_id: {other:?}")),
        }
        match clients
            .incidents
            .verify_audit_chain(pb::VerifyAuditChainRequest {
                correlation_id: format!("{text}#corr{index}"),
            })
            .await
        {
            Ok(report) if report.get_ref().valid && report.get_ref().total_events == 3 => {}
            other => failures.push(format!("{what}: VerifyAuditChain: {other:?}")),
        }

        // Searching by the text, in both modes and filtered by it, is served.
        for mode in [pb::SearchMode::Vector, pb::SearchMode::Hybrid] {
            let searched = clients
                .search
                .search_similar(pb::SearchSimilarRequest {
                    mode: mode as i32,
                    filter: Some(pb::IncidentFilter {
                        namespace: text.into(),
                        labels: [("plain".to_owned(), text.to_owned())].into(),
                        ..Default::default()
                    }),
                    ..search(Query::Text(text.into()))
                })
                .await
                .map(|r| r.into_inner().hits);
            match searched {
                Ok(hits) if !hits.is_empty() && hits.iter().all(|h| h.incident_id == responses[0].incident_id) => {}
                other => failures.push(format!("{what}: SearchSimilar {mode:?}: {other:?}")),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_only_served_writes_stored(&app, &clients).await;
    assert_still_healthy(&app, &mut clients).await;
}

// ---------------------------------------------------------------------------
// Size

/// A remediation event with every field at its longest: ~33 KiB encoded.
fn max_size_write(index: usize, incidents: usize) -> pb::WriteAuditRequest {
    let mut event = remediation_event(&format!("{:r>255}", index % incidents));
    event.correlation_id = format!("{index:c>255}");
    event.namespace = "n".repeat(255);
    event.cluster = "k".repeat(255);
    event.labels = max_labels(64);
    event.payload = Some(Payload::Remediation(pb::RemediationAudit {
        signal_type: "t".repeat(255),
        signal_name: "s".repeat(255),
        severity: pb::Severity::Critical as i32,
        target: Some(pb::ResourceRef {
            kind: "K".repeat(255),
            name: "N".repeat(255),
            namespace: "S".repeat(255),
        }),
        phase: pb::Phase::Processing as i32,
        message: "m".repeat(10 * 1024),
        started_at: Some(timestamp_ago(600)),
        completed_at: Some(timestamp_ago(300)),
        priority: "p".repeat(255),
    }));
    pb::WriteAuditRequest {
        event: Some(event),
        request_id: format!("{index:q>255}"),
        embedding: Some(vector(index)),
    }
}

/// Requests (and a response) over `grpc.max_message_bytes` are
/// RESOURCE_EXHAUSTED (tonic says OUT_OF_RANGE; grpc::middleware corrects
/// it), store nothing and leave the server serving.
#[tokio::test]
async fn oversized_messages_are_resource_exhausted_and_leave_the_server_serving() {
    let app = spawn_app_with(|s| s.grpc.max_message_bytes = SMALL_MESSAGE_LIMIT, local_model()).await;
    let mut clients = Clients::new(&app).await;
    let cases = oversized_cases(&mut clients, Expect::TooLarge).await;
    run(&mut clients, cases).await;
    assert_only_served_writes_stored(&app, &clients).await;
    assert_still_healthy(&app, &mut clients).await;
}

/// Requests (and one response) over [`SMALL_MESSAGE_LIMIT`]. Writes, first,
/// the events whose listing is too large to send back.
async fn oversized_cases(clients: &mut Clients, expect: Expect) -> Vec<Case> {
    // 12 events of ~11 KiB each: each write fits, their listing does not.
    let rr = unique("big-listing");
    for i in 0..12 {
        let mut request = with_vector(write(remediation_event(&rr)));
        remediation_of(&mut request).message = char::from(b'a' + i).to_string().repeat(10 * 1024);
        clients.call(request.into()).await.expect("each write fits the limit");
    }
    let big_text = |bytes: usize| {
        write_with(|r| {
            let mut c = custom_payload(None);
            c.text = "x".repeat(bytes);
            set_payload(r, Payload::Custom(c))
        })
    };
    vec![
        case("WriteAudit of 100 KiB", big_text(100 * 1024), expect),
        case("WriteAudit of 10 MiB", big_text(10 * 1024 * 1024), expect),
        case(
            "BatchWriteAudit of 20 max-size items (~660 KiB)",
            batch((0..20).map(|i| max_size_write(i, 20)).collect()),
            expect,
        ),
        case(
            "SearchSimilar text of 1 MiB",
            search(Query::Text("t".repeat(1024 * 1024))),
            expect,
        ),
        case(
            "ListIncidents page_token of 100 KiB",
            pb::ListIncidentsRequest {
                page_token: "A".repeat(100 * 1024),
                ..Default::default()
            },
            expect,
        ),
        case(
            "ListAuditEvents whose response is ~130 KiB",
            pb::ListAuditEventsRequest {
                page_size: 1000,
                ..list_events(&rr)
            },
            expect,
        ),
    ]
}

/// The largest batch the contract allows, every field at its longest (about
/// 33 MB), is written whole or refused whole; one more item is refused.
#[tokio::test]
async fn a_thousand_max_size_items_are_written_whole_and_one_more_is_refused() {
    let app = spawn_app_with(|s| s.grpc.max_message_bytes = 64 * 1024 * 1024, local_model()).await;
    let mut clients = Clients::new(&app).await;
    let items: Vec<_> = (0..1000).map(|i| max_size_write(i, 10)).collect();
    assert!(batch(items.clone()).encoded_len() > 32 * 1024 * 1024);

    let mut over = items.clone();
    over.push(max_size_write(1000, 10));
    run(
        &mut clients,
        vec![
            case("1001 max-size items", batch(over), Expect::Invalid("requests")),
            case("1000 max-size items", batch(items), Expect::NoServerError),
        ],
    )
    .await;
    assert!(
        [0, 1000].contains(&clients.stored_events),
        "all or nothing: {} stored",
        clients.stored_events
    );
    assert_only_served_writes_stored(&app, &clients).await;
    if clients.stored_events == 1000 {
        assert_eq!(clients.stored_incidents.len(), 10);
        let incident = clients
            .incidents
            .get_incident(pb::GetIncidentRequest {
                key: Some(Key::RemediationRequestId(format!("{:r>255}", 7))),
            })
            .await
            .expect("a max-size incident reads back")
            .into_inner();
        assert_eq!(incident.event_count, 100);
        assert_eq!(incident.labels, max_labels(64));
    }
    assert_still_healthy(&app, &mut clients).await;
}

// ---------------------------------------------------------------------------
// What tonic's defaults answered differently, and the server now answers as
// the contract says (src/grpc/codec.rs, grpc::middleware, grpc::convert)

/// Bytes that do not decode as the request message are the caller's fault:
/// INVALID_ARGUMENT (tonic-prost's own codec answers INTERNAL).
#[tokio::test]
async fn undecodable_requests_are_invalid_argument() {
    let app = spawn_app().await;
    let mut clients = Clients::new(&app).await;
    let mut cases = vec![case(
        "the raw path with valid bytes (control)",
        Call::Raw {
            path: WRITE_AUDIT,
            body: with_vector(write(remediation_event(&unique("raw")))).encode_to_vec(),
        },
        Expect::Served,
    )];
    cases.extend(undecodable_cases(Expect::InvalidAnyField));
    run(&mut clients, cases).await;
}

/// protobuf's Duration spans ±315 576 000 000 s (10 000 years), as Timestamp
/// spans the years 1..=9999.
const MAX_DURATION_SECONDS: i64 = 315_576_000_000;

/// Durations past protobuf's range are refused: an execution of "i64::MAX
/// seconds" used to be stored, and GetActionStats then answered a negative
/// mean (the f64 mean rounded up to 2^63 s and wrapped to i64::MIN).
#[tokio::test]
async fn durations_past_the_protobuf_range_are_refused() {
    let app = spawn_app().await;
    let mut clients = Clients::new(&app).await;
    // Each its own action type, so that each has its own stats.
    let execution = |action_type: &str, seconds| {
        write_with(|r| {
            let mut payload = execution_payload(dur(seconds, 999_999_999));
            if let Payload::Execution(e) = &mut payload {
                e.action_type = action_type.into();
            }
            set_payload(r, payload)
        })
    };
    let cases = vec![
        case(
            "execution of the longest valid Duration",
            execution("longest", MAX_DURATION_SECONDS),
            Expect::Served,
        ),
        case(
            "execution one second past it",
            execution("past", MAX_DURATION_SECONDS + 1),
            Expect::Invalid("event.execution.duration"),
        ),
        case(
            "execution of i64::MAX seconds",
            execution("forever", i64::MAX),
            Expect::Invalid("event.execution.duration"),
        ),
        case(
            "workflow of i64::MAX seconds",
            write_with(|r| {
                set_payload(
                    r,
                    workflow_payload(pb::ExecutionStatus::Succeeded as i32, Some(dur(i64::MAX, 0))),
                )
            }),
            Expect::Invalid("event.workflow.duration"),
        ),
    ];
    let mut failures = run_collecting(&mut clients, cases).await;
    let stats = clients
        .incidents
        .get_action_stats(pb::GetActionStatsRequest::default())
        .await
        .expect("action stats are served")
        .into_inner()
        .stats;
    for s in &stats {
        let durations = [&s.mean_duration, &s.p50_duration, &s.p95_duration];
        if durations
            .into_iter()
            .flatten()
            .any(|d| d.seconds < 0 || !(0..1_000_000_000).contains(&d.nanos))
        {
            failures.push(format!("GetActionStats: a negative or invalid Duration in {s:?}"));
        }
    }
    assert_no_failures(5, failures);
}
