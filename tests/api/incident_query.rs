//! IncidentQuery over the real server: incidents as the projection of the
//! events written through AuditWrite, their timelines, action statistics,
//! filters and paging.
use std::{
    collections::{HashMap, HashSet},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use datastorage::proto::v1::{
    self as pb, audit_event::Payload, get_incident_request::Key, incident_query_client::IncidentQueryClient,
    list_audit_events_request::Scope,
};
use prost_types::{Duration, Timestamp};
use tonic::{transport::Channel, Code, Status};
use uuid::Uuid;

use crate::helpers::*;

type Query = IncidentQueryClient<Channel>;

const ORDERS: [&str; 4] = [
    "last_event_at desc",
    "last_event_at asc",
    "first_seen_at desc",
    "first_seen_at asc",
];

// ---------------------------------------------------------------- events

/// Whole seconds three hours ago: each test's clock origin, so offsets of a
/// few minutes never reach the future.
fn origin() -> i64 {
    (chrono::Utc::now() - chrono::TimeDelta::hours(3)).timestamp()
}

fn at(seconds: i64) -> Timestamp {
    Timestamp { seconds, nanos: 0 }
}

/// A short random tag that keeps this test's ids apart from any other's.
fn run_id() -> String {
    Uuid::new_v4().simple().to_string()[..8].to_owned()
}

fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn target(kind: &str, name: &str, namespace: &str) -> Option<pb::ResourceRef> {
    Some(pb::ResourceRef {
        kind: kind.into(),
        name: name.into(),
        namespace: namespace.into(),
    })
}

fn millis(ms: i64) -> Option<Duration> {
    Some(Duration {
        seconds: ms / 1000,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    })
}

/// An event in namespace `payments`, cluster `prod-eu-1`, without labels.
fn event(rrid: &str, occurred_at: i64, payload: Payload) -> pb::AuditEvent {
    pb::AuditEvent {
        correlation_id: format!("corr-{rrid}"),
        remediation_request_id: rrid.into(),
        occurred_at: Some(at(occurred_at)),
        namespace: "payments".into(),
        cluster: "prod-eu-1".into(),
        labels: HashMap::new(),
        parent_event_id: String::new(),
        payload: Some(payload),
    }
}

fn remediation_audit(signal_name: &str, severity: pb::Severity, phase: pb::Phase) -> pb::RemediationAudit {
    pb::RemediationAudit {
        signal_type: "prometheus-alert".into(),
        signal_name: signal_name.into(),
        severity: severity as i32,
        target: target("Deployment", "api", "payments"),
        phase: phase as i32,
        message: format!("{signal_name} fired"),
        started_at: None,
        completed_at: None,
        priority: String::new(),
    }
}

fn remediation(signal_name: &str, severity: pb::Severity, phase: pb::Phase) -> Payload {
    Payload::Remediation(remediation_audit(signal_name, severity, phase))
}

fn analysis(root_cause: &str) -> Payload {
    Payload::AiAnalysis(pb::AiAnalysisAudit {
        root_cause: root_cause.into(),
        recommended_action: "restart_pod".into(),
        confidence: 0.5,
        reasoning: String::new(),
        model: String::new(),
    })
}

fn execution(action_type: &str, status: pb::ExecutionStatus, duration: Option<Duration>) -> Payload {
    Payload::Execution(pb::ExecutionAudit {
        action_type: action_type.into(),
        target: target("Pod", "api-7d9f", "payments"),
        status: status as i32,
        duration,
        error_message: String::new(),
    })
}

fn workflow(step_name: &str, status: pb::ExecutionStatus, duration: Option<Duration>) -> Payload {
    Payload::Workflow(pb::WorkflowAudit {
        workflow_id: "wf-1".into(),
        step_name: step_name.into(),
        status: status as i32,
        duration,
        error_message: String::new(),
    })
}

/// A custom event without text: stored, not embedded (and so cheap to write).
fn custom(event_type: &str) -> Payload {
    Payload::Custom(pb::CustomAudit {
        event_type: event_type.into(),
        action: String::new(),
        outcome: String::new(),
        data: None,
        text: String::new(),
    })
}

async fn write_batch(app: &TestApp, events: &[pb::AuditEvent]) -> Vec<pb::WriteAuditResponse> {
    let mut client = app.audit_client().await;
    let mut receipts = Vec::new();
    for chunk in events.chunks(500) {
        let replies = client
            .batch_write_audit(pb::BatchWriteAuditRequest {
                requests: chunk.iter().cloned().map(write).collect(),
            })
            .await
            .expect("batch accepted")
            .into_inner()
            .responses;
        assert_eq!(replies.len(), chunk.len());
        receipts.extend(replies);
    }
    receipts
}

// ---------------------------------------------------------------- queries

fn no_filter() -> pb::IncidentFilter {
    pb::IncidentFilter::default()
}

async fn list_page(
    q: &mut Query,
    filter: &pb::IncidentFilter,
    order_by: &str,
    page_size: i32,
    page_token: &str,
) -> Result<pb::ListIncidentsResponse, Status> {
    q.list_incidents(pb::ListIncidentsRequest {
        filter: Some(filter.clone()),
        page_size,
        page_token: page_token.into(),
        order_by: order_by.into(),
    })
    .await
    .map(tonic::Response::into_inner)
}

/// Every page of a listing, concatenated.
async fn list_all(q: &mut Query, filter: &pb::IncidentFilter, order_by: &str, page_size: i32) -> Vec<pb::Incident> {
    let mut incidents = Vec::new();
    let mut token = String::new();
    for _ in 0..200 {
        let page = list_page(q, filter, order_by, page_size, &token)
            .await
            .unwrap_or_else(|status| panic!("listing {filter:?} ({order_by:?}): {status:?}"));
        incidents.extend(page.incidents);
        if page.next_page_token.is_empty() {
            return incidents;
        }
        token = page.next_page_token;
    }
    panic!("more than 200 pages");
}

async fn get_incident(q: &mut Query, key: Key) -> Result<pb::Incident, Status> {
    q.get_incident(pb::GetIncidentRequest { key: Some(key) })
        .await
        .map(tonic::Response::into_inner)
}

async fn timeline_page(
    q: &mut Query,
    scope: Scope,
    kinds: &[pb::AuditKind],
    page_size: i32,
    page_token: &str,
) -> Result<pb::ListAuditEventsResponse, Status> {
    q.list_audit_events(pb::ListAuditEventsRequest {
        scope: Some(scope),
        kinds: kinds.iter().map(|k| *k as i32).collect(),
        page_size,
        page_token: page_token.into(),
    })
    .await
    .map(tonic::Response::into_inner)
}

/// Every page of a timeline, concatenated, and the size of each page.
async fn timeline_all(
    q: &mut Query,
    scope: Scope,
    kinds: &[pb::AuditKind],
    page_size: i32,
) -> (Vec<pb::StoredAuditEvent>, Vec<usize>) {
    let (mut events, mut sizes) = (Vec::new(), Vec::new());
    let mut token = String::new();
    for _ in 0..200 {
        let page = timeline_page(q, scope.clone(), kinds, page_size, &token)
            .await
            .unwrap_or_else(|status| panic!("timeline of {scope:?} {kinds:?}: {status:?}"));
        sizes.push(page.events.len());
        events.extend(page.events);
        if page.next_page_token.is_empty() {
            return (events, sizes);
        }
        token = page.next_page_token;
    }
    panic!("more than 200 pages");
}

async fn action_stats(q: &mut Query, filter: pb::IncidentFilter) -> Result<Vec<pb::ActionStats>, Status> {
    q.get_action_stats(pb::GetActionStatsRequest { filter: Some(filter) })
        .await
        .map(|r| r.into_inner().stats)
}

/// The remediation request ids of `incidents` with `prefix` removed, sorted.
fn names<'a>(incidents: &'a [pb::Incident], prefix: &str) -> Vec<&'a str> {
    let mut names: Vec<&str> = incidents
        .iter()
        .map(|i| {
            i.remediation_request_id
                .strip_prefix(prefix)
                .unwrap_or(&i.remediation_request_id)
        })
        .collect();
    names.sort_unstable();
    names
}

fn ids(incidents: &[pb::Incident]) -> Vec<String> {
    incidents.iter().map(|i| i.id.clone()).collect()
}

fn to_chrono(t: &Timestamp) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp(t.seconds, t.nanos as u32).expect("a valid timestamp")
}

/// `token` with its character at `index` replaced by another one of the same class.
fn flip(token: &str, index: usize) -> String {
    token
        .chars()
        .enumerate()
        .map(|(i, c)| match (i == index, c) {
            (false, c) => c,
            (true, 'z') => 'a',
            (true, 'Z') => 'A',
            (true, '9') => '0',
            (true, c) if c.is_ascii_alphanumeric() => (c as u8 + 1) as char,
            (true, _) => 'A',
        })
        .collect()
}

// ---------------------------------------------------------------- GetIncident

#[tokio::test]
async fn an_incident_carries_every_fact_projected_from_its_events() {
    let app = spawn_app().await;
    let b = origin();
    let run = run_id();
    let rrid = format!("rr-{run}-full");
    let first_remediation = pb::AuditEvent {
        correlation_id: format!("corr-{run}-1"),
        labels: labels(&[("team", "checkout"), ("env", "prod")]),
        ..event(
            &rrid,
            b + 10,
            Payload::Remediation(pb::RemediationAudit {
                started_at: Some(at(b + 5)),
                ..remediation_audit("HighMemoryUsage", pb::Severity::Warning, pb::Phase::Pending)
            }),
        )
    };
    let last_remediation = pb::AuditEvent {
        correlation_id: format!("corr-{run}-2"),
        namespace: "payments-db".into(),
        cluster: "prod-eu-2".into(),
        ..event(
            &rrid,
            b + 70,
            Payload::Remediation(pb::RemediationAudit {
                signal_type: "kubernetes-event".into(),
                target: target("StatefulSet", "db", "payments-db"),
                started_at: Some(at(b + 5)),
                completed_at: Some(at(b + 65)),
                ..remediation_audit("MemoryPressure", pb::Severity::Critical, pb::Phase::Completed)
            }),
        )
    };
    // Written out of order on purpose.
    let events = vec![
        event(&rrid, b + 40, analysis("memory leak in the session cache")),
        first_remediation,
        event(&rrid, b + 80, custom("notification.sent")),
        pb::AuditEvent {
            labels: labels(&[("env", "staging"), ("owner", "sre")]),
            ..event(
                &rrid,
                b + 60,
                execution("scale_deployment", pb::ExecutionStatus::Succeeded, millis(2_000)),
            )
        },
        event(&rrid, b + 20, analysis("first guess: noisy neighbour")),
        last_remediation,
        pb::AuditEvent {
            namespace: "payments-exec".into(),
            ..event(
                &rrid,
                b + 50,
                execution("restart_pod", pb::ExecutionStatus::Running, None),
            )
        },
    ];
    let mut client = app.audit_client().await;
    let mut incident_ids = HashSet::new();
    for event in events {
        let receipt = client.write_audit(write(event)).await.expect("written").into_inner();
        incident_ids.insert(receipt.incident_id);
    }
    assert_eq!(incident_ids.len(), 1, "one remediation request, one incident");
    let id = incident_ids.into_iter().next().unwrap();

    let expected = pb::Incident {
        id: id.clone(),
        remediation_request_id: rrid.clone(),
        correlation_id: format!("corr-{run}-1"),
        alert_name: "MemoryPressure".into(),
        severity: pb::Severity::Critical as i32,
        signal_type: "kubernetes-event".into(),
        namespace: "payments".into(),
        cluster: "prod-eu-1".into(),
        target: target("StatefulSet", "db", "payments-db"),
        root_cause: "memory leak in the session cache".into(),
        action_type: "scale_deployment".into(),
        phase: pb::Phase::Completed as i32,
        execution_status: pb::ExecutionStatus::Succeeded as i32,
        first_seen_at: Some(at(b + 10)),
        last_event_at: Some(at(b + 80)),
        resolved_at: Some(at(b + 65)),
        event_count: 7,
        labels: labels(&[("team", "checkout"), ("env", "staging"), ("owner", "sre")]),
    };
    let mut q = app.incident_query_client().await;
    let by_id = get_incident(&mut q, Key::Id(id.clone())).await.expect("found by id");
    assert_eq!(by_id, expected);
    let by_rrid = get_incident(&mut q, Key::RemediationRequestId(rrid.clone()))
        .await
        .expect("found by remediation request id");
    assert_eq!(by_rrid, expected);
    let listed = list_all(&mut q, &no_filter(), "", 0).await;
    assert_eq!(listed, vec![expected], "the listing shows the same incident");
}

#[tokio::test]
async fn resolved_at_follows_the_latest_remediation_phase() {
    let app = spawn_app().await;
    let b = origin();
    let run = run_id();
    let rr = |name: &str| format!("rr-{run}-{name}");
    use pb::{Phase::*, Severity::*};
    let events = vec![
        // Failed without completed_at: resolved when the failure occurred.
        event(&rr("failed"), b + 10, remediation("DiskFull", Warning, Processing)),
        event(&rr("failed"), b + 30, remediation("DiskFull", Warning, Failed)),
        // Completed, then reopened by a later remediation event.
        event(
            &rr("reopened"),
            b + 10,
            Payload::Remediation(pb::RemediationAudit {
                completed_at: Some(at(b + 10)),
                ..remediation_audit("DiskFull", Warning, Completed)
            }),
        ),
        event(&rr("reopened"), b + 20, remediation("DiskFull", Critical, Processing)),
        // Completed with completed_at, followed by events of other kinds.
        event(
            &rr("completed"),
            b + 10,
            Payload::Remediation(pb::RemediationAudit {
                started_at: Some(at(b + 1)),
                completed_at: Some(at(b + 8)),
                ..remediation_audit("DiskFull", Info, Completed)
            }),
        ),
        event(&rr("completed"), b + 40, custom("postmortem.filed")),
        // Still open.
        event(&rr("open"), b + 10, remediation("DiskFull", Info, Processing)),
    ];
    write_batch(&app, &events).await;
    let mut q = app.incident_query_client().await;
    for (name, phase, resolved_at) in [
        ("failed", Failed, Some(at(b + 30))),
        ("reopened", Processing, None),
        ("completed", Completed, Some(at(b + 8))),
        ("open", Processing, None),
    ] {
        let incident = get_incident(&mut q, Key::RemediationRequestId(rr(name)))
            .await
            .expect("found");
        assert_eq!(incident.phase(), phase, "{name}");
        assert_eq!(incident.resolved_at, resolved_at, "{name}");
    }
}

#[tokio::test]
async fn an_incident_without_remediation_events_has_only_the_facts_its_events_carry() {
    let app = spawn_app().await;
    let b = origin();
    let rrid = format!("rr-{}-custom", run_id());
    let only = pb::AuditEvent {
        namespace: "batch".into(),
        cluster: String::new(),
        labels: labels(&[("job", "nightly")]),
        ..event(&rrid, b + 10, custom("job.started"))
    };
    let receipt = &write_batch(&app, &[only]).await[0];
    let mut q = app.incident_query_client().await;
    let incident = get_incident(&mut q, Key::RemediationRequestId(rrid.clone()))
        .await
        .expect("found");
    assert_eq!(
        incident,
        pb::Incident {
            id: receipt.incident_id.clone(),
            remediation_request_id: rrid.clone(),
            correlation_id: format!("corr-{rrid}"),
            namespace: "batch".into(),
            first_seen_at: Some(at(b + 10)),
            last_event_at: Some(at(b + 10)),
            event_count: 1,
            labels: labels(&[("job", "nightly")]),
            ..pb::Incident::default()
        }
    );
}

#[tokio::test]
async fn get_incident_rejects_a_malformed_or_missing_key_and_reports_unknown_ones_as_not_found() {
    let app = spawn_app().await;
    write_batch(&app, &[event("rr-known", origin(), custom("x"))]).await;
    let mut q = app.incident_query_client().await;

    let status = q.get_incident(pb::GetIncidentRequest { key: None }).await.unwrap_err();
    assert_eq!(violated_fields(&status), ["key"]);
    for malformed in ["not-a-uuid", "", "1234", "' OR '1'='1"] {
        let status = get_incident(&mut q, Key::Id(malformed.into())).await.unwrap_err();
        assert_eq!(violated_fields(&status), ["id"], "id {malformed:?}");
    }
    let status = get_incident(&mut q, Key::Id(Uuid::new_v4().to_string()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    for unknown in ["rr-unknown", "rr-known ", "RR-KNOWN", "' OR '1'='1"] {
        let status = get_incident(&mut q, Key::RemediationRequestId(unknown.into()))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "{unknown:?}: {status:?}");
    }
    get_incident(&mut q, Key::RemediationRequestId("rr-known".into()))
        .await
        .expect("the known one is found");
}

// ---------------------------------------------------------------- projection order

type Stamp = (i64, i32, Uuid);

fn stamp(written: &(pb::AuditEvent, Uuid)) -> Stamp {
    let t = written.0.occurred_at.expect("occurred_at");
    (t.seconds, t.nanos, written.1)
}

/// The incident from scratch: each fact from the event with the greatest
/// (occurred_at, event id) that carries it; correlation id and namespace
/// from the smallest; cluster from the smallest that has one; labels merged
/// with the newest value per key.
fn reference_incident(written: &[(pb::AuditEvent, Uuid)]) -> pb::Incident {
    let mut ordered: Vec<&(pb::AuditEvent, Uuid)> = written.iter().collect();
    ordered.sort_by_key(|w| stamp(w));
    let (first, last) = (&ordered[0].0, &ordered[ordered.len() - 1].0);
    let mut incident = pb::Incident {
        correlation_id: first.correlation_id.clone(),
        namespace: first.namespace.clone(),
        first_seen_at: first.occurred_at,
        last_event_at: last.occurred_at,
        event_count: written.len() as i64,
        ..pb::Incident::default()
    };
    if let Some(clustered) = ordered.iter().find(|w| !w.0.cluster.is_empty()) {
        incident.cluster = clustered.0.cluster.clone();
    }
    for (event, _) in ordered {
        incident.labels.extend(event.labels.clone());
        match event.payload.as_ref().expect("payload") {
            Payload::Remediation(r) => {
                incident.alert_name = r.signal_name.clone();
                incident.severity = r.severity;
                incident.signal_type = r.signal_type.clone();
                incident.target = r.target.clone();
                incident.phase = r.phase;
                incident.resolved_at = matches!(r.phase(), pb::Phase::Completed | pb::Phase::Failed)
                    .then(|| r.completed_at.or(event.occurred_at).unwrap());
            }
            Payload::AiAnalysis(a) => incident.root_cause = a.root_cause.clone(),
            Payload::Execution(x) => {
                incident.action_type = x.action_type.clone();
                incident.execution_status = x.status;
            }
            Payload::Workflow(_) | Payload::Custom(_) => {}
        }
    }
    incident
}

/// Twelve events of every kind for one remediation request, with ties on
/// occurred_at inside each fact group, overlapping labels and a cluster that
/// only later events carry.
fn projection_events(rrid: &str, b: i64) -> Vec<pb::AuditEvent> {
    use pb::{ExecutionStatus as X, Phase::*, Severity::*};
    let with =
        |occurred: i64, namespace: &str, cluster: &str, pairs: &[(&str, &str)], payload: Payload| pb::AuditEvent {
            correlation_id: format!("corr-{rrid}-{namespace}"),
            namespace: namespace.into(),
            cluster: cluster.into(),
            labels: labels(pairs),
            ..event(rrid, occurred, payload)
        };
    vec![
        with(
            b,
            "ns-first-x",
            "",
            &[("team", "a"), ("env", "dev"), ("region", "eu")],
            Payload::Remediation(pb::RemediationAudit {
                target: target("Deployment", "a", "ns-1"),
                ..remediation_audit("AlertA", Info, Pending)
            }),
        ),
        with(b, "ns-first-y", "", &[("team", "b")], custom("ticket.opened")),
        with(b + 10, "ns-later", "", &[], analysis("root cause 1")),
        with(
            b + 20,
            "ns-later",
            "cluster-late-1",
            &[("env", "test")],
            execution("restart_pod", X::Running, millis(1_000)),
        ),
        with(
            b + 30,
            "ns-later",
            "cluster-late-2",
            &[("team", "c")],
            Payload::Remediation(pb::RemediationAudit {
                signal_type: "kubernetes-event".into(),
                target: target("StatefulSet", "b", ""),
                ..remediation_audit("AlertB", Warning, Processing)
            }),
        ),
        with(b + 40, "ns-later", "", &[], analysis("root cause 2")),
        with(b + 40, "ns-later", "", &[("owner", "w")], analysis("root cause 3")),
        with(
            b + 50,
            "ns-later",
            "cluster-late-3",
            &[("env", "prod"), ("owner", "x")],
            execution("scale_deployment", X::Succeeded, millis(2_500)),
        ),
        with(
            b + 50,
            "ns-later",
            "",
            &[("env", "stage")],
            execution("rollback", X::Failed, None),
        ),
        with(
            b + 60,
            "ns-later",
            "",
            &[("owner", "y")],
            Payload::Remediation(pb::RemediationAudit {
                completed_at: Some(at(b + 55)),
                ..remediation_audit("AlertC", Critical, Completed)
            }),
        ),
        with(
            b + 60,
            "ns-later",
            "",
            &[("owner", "z")],
            Payload::Remediation(pb::RemediationAudit {
                target: target("Node", "n-1", ""),
                ..remediation_audit("AlertD", Warning, Failed)
            }),
        ),
        with(
            b + 70,
            "ns-later",
            "",
            &[],
            workflow("verify", X::Succeeded, millis(700)),
        ),
    ]
}

#[tokio::test]
async fn the_incident_does_not_depend_on_the_order_its_events_arrive_in() {
    let app = spawn_app().await;
    let b = origin();
    let run = run_id();
    let mut client = app.audit_client().await;
    let mut q = app.incident_query_client().await;
    let mut winners = HashSet::new();
    for seed in 1..=8u64 {
        let rrid = format!("rr-{run}-perm-{seed}");
        let mut rng = SplitMix(seed);
        let mut events = projection_events(&rrid, b);
        rng.shuffle(&mut events);
        let mut written = Vec::new();
        let mut incident_ids = HashSet::new();
        let mut rest = &events[..];
        while !rest.is_empty() {
            let take = (1 + rng.below(4)).min(rest.len());
            let (chunk, tail) = rest.split_at(take);
            rest = tail;
            let receipts = if take == 1 {
                vec![client
                    .write_audit(write(chunk[0].clone()))
                    .await
                    .expect("written")
                    .into_inner()]
            } else {
                client
                    .batch_write_audit(pb::BatchWriteAuditRequest {
                        requests: chunk.iter().cloned().map(write).collect(),
                    })
                    .await
                    .expect("batch written")
                    .into_inner()
                    .responses
            };
            for (event, receipt) in chunk.iter().zip(receipts) {
                incident_ids.insert(receipt.incident_id.clone());
                written.push((event.clone(), Uuid::parse_str(&receipt.event_id).expect("uuid")));
            }
        }
        assert_eq!(written.len(), 12);
        assert_eq!(incident_ids.len(), 1, "seed {seed}: one incident");

        let got = get_incident(&mut q, Key::RemediationRequestId(rrid.clone()))
            .await
            .expect("found");
        let expected = pb::Incident {
            id: got.id.clone(),
            remediation_request_id: rrid.clone(),
            ..reference_incident(&written)
        };
        assert!(
            incident_ids.contains(&got.id),
            "seed {seed}: the id the writes returned"
        );
        assert_eq!(got, expected, "seed {seed}: arrival order {:?}", order_of(&written, b));
        winners.insert((expected.alert_name.clone(), expected.root_cause.clone()));
    }
    // Not an assertion on the service: a sign that ties were really decided by
    // event ids, so the comparison above exercised them.
    eprintln!("distinct tie winners over 8 permutations: {winners:?}");
}

fn order_of(written: &[(pb::AuditEvent, Uuid)], b: i64) -> Vec<String> {
    written
        .iter()
        .map(|(e, id)| format!("+{}s:{}", e.occurred_at.unwrap().seconds - b, &id.to_string()[..8]))
        .collect()
}

// ---------------------------------------------------------------- ListIncidents filters

#[tokio::test]
async fn incidents_match_every_filter_field_alone_and_combined() {
    use pb::{ExecutionStatus as X, Phase::*, Severity::*};
    let app = spawn_app().await;
    let b = origin();
    let run = run_id();
    let prefix = format!("rr-{run}-");
    let rr = |letter: &str| format!("{prefix}{letter}");
    let events = vec![
        // a: last_event_at b+100
        pb::AuditEvent {
            labels: labels(&[("team", "checkout"), ("env", "prod")]),
            ..event(&rr("a"), b + 10, remediation("HighMemoryUsage", Critical, Processing))
        },
        event(&rr("a"), b + 100, execution("restart_pod", X::Succeeded, None)),
        // b: last_event_at b+200
        pb::AuditEvent {
            cluster: "prod-us-1".into(),
            labels: labels(&[("team", "checkout"), ("env", "staging")]),
            ..event(&rr("b"), b + 20, remediation("HighMemoryUsage", Warning, Completed))
        },
        pb::AuditEvent {
            cluster: "prod-us-1".into(),
            ..event(&rr("b"), b + 200, execution("scale_deployment", X::Succeeded, None))
        },
        // c: last_event_at b+300
        pb::AuditEvent {
            namespace: "storage".into(),
            labels: labels(&[("team", "infra")]),
            ..event(&rr("c"), b + 30, remediation("DiskFull", Critical, Failed))
        },
        pb::AuditEvent {
            namespace: "storage".into(),
            ..event(&rr("c"), b + 300, execution("restart_pod", X::Failed, None))
        },
        // d: last_event_at b+400, no cluster, no labels, no execution
        pb::AuditEvent {
            namespace: "storage".into(),
            cluster: String::new(),
            ..event(&rr("d"), b + 400, remediation("DiskFull", Info, Pending))
        },
        // e: last_event_at b+500, only a custom event
        pb::AuditEvent {
            cluster: String::new(),
            labels: labels(&[("team", "checkout")]),
            ..event(&rr("e"), b + 500, custom("notification.sent"))
        },
        // f: last_event_at b+600; its latest facts differ from its earliest, newest written first
        pb::AuditEvent {
            namespace: "other".into(),
            cluster: String::new(),
            ..event(&rr("f"), b + 600, execution("rollback_release", X::Succeeded, None))
        },
        pb::AuditEvent {
            namespace: "other".into(),
            cluster: "prod-us-1".into(),
            labels: labels(&[("team", "platform")]),
            ..event(&rr("f"), b + 550, remediation("HighLatency", Warning, Completed))
        },
        pb::AuditEvent {
            namespace: "frontend".into(),
            cluster: "prod-ap-1".into(),
            ..event(&rr("f"), b + 50, execution("restart_pod", X::Running, None))
        },
        pb::AuditEvent {
            namespace: "frontend".into(),
            cluster: String::new(),
            labels: labels(&[("team", "web"), ("tier", "edge")]),
            ..event(&rr("f"), b + 40, remediation("CPUThrottling", Critical, Pending))
        },
    ];
    write_batch(&app, &events).await;

    let f = no_filter;
    let sev = |s: &[pb::Severity]| s.iter().map(|s| *s as i32).collect::<Vec<_>>();
    let ph = |p: &[pb::Phase]| p.iter().map(|p| *p as i32).collect::<Vec<_>>();
    let all_of_a = pb::IncidentFilter {
        alert_name: "HighMemoryUsage".into(),
        severities: sev(&[Critical]),
        action_type: "restart_pod".into(),
        namespace: "payments".into(),
        cluster: "prod-eu-1".into(),
        phases: ph(&[Processing]),
        since: Some(at(b + 100)),
        until: Some(at(b + 101)),
        labels: labels(&[("team", "checkout"), ("env", "prod")]),
    };
    let cases: Vec<(pb::IncidentFilter, &[&str])> = vec![
        (f(), &["a", "b", "c", "d", "e", "f"]),
        // alert_name: the latest remediation's signal name, exactly
        (
            pb::IncidentFilter {
                alert_name: "HighMemoryUsage".into(),
                ..f()
            },
            &["a", "b"],
        ),
        (
            pb::IncidentFilter {
                alert_name: "DiskFull".into(),
                ..f()
            },
            &["c", "d"],
        ),
        (
            pb::IncidentFilter {
                alert_name: "HighLatency".into(),
                ..f()
            },
            &["f"],
        ),
        (
            pb::IncidentFilter {
                alert_name: "CPUThrottling".into(),
                ..f()
            },
            &[],
        ),
        (
            pb::IncidentFilter {
                alert_name: "highmemoryusage".into(),
                ..f()
            },
            &[],
        ),
        (
            pb::IncidentFilter {
                alert_name: "HighMemory".into(),
                ..f()
            },
            &[],
        ),
        // severities: any of, the latest remediation's
        (
            pb::IncidentFilter {
                severities: sev(&[Critical]),
                ..f()
            },
            &["a", "c"],
        ),
        (
            pb::IncidentFilter {
                severities: sev(&[Warning, Info]),
                ..f()
            },
            &["b", "d", "f"],
        ),
        (
            pb::IncidentFilter {
                severities: sev(&[Info, Warning, Critical]),
                ..f()
            },
            &["a", "b", "c", "d", "f"],
        ),
        // action_type: the latest execution's
        (
            pb::IncidentFilter {
                action_type: "restart_pod".into(),
                ..f()
            },
            &["a", "c"],
        ),
        (
            pb::IncidentFilter {
                action_type: "rollback_release".into(),
                ..f()
            },
            &["f"],
        ),
        (
            pb::IncidentFilter {
                action_type: "scale_deployment".into(),
                ..f()
            },
            &["b"],
        ),
        // namespace: the earliest event's
        (
            pb::IncidentFilter {
                namespace: "payments".into(),
                ..f()
            },
            &["a", "b", "e"],
        ),
        (
            pb::IncidentFilter {
                namespace: "storage".into(),
                ..f()
            },
            &["c", "d"],
        ),
        (
            pb::IncidentFilter {
                namespace: "frontend".into(),
                ..f()
            },
            &["f"],
        ),
        (
            pb::IncidentFilter {
                namespace: "other".into(),
                ..f()
            },
            &[],
        ),
        // cluster: the earliest event's that has one
        (
            pb::IncidentFilter {
                cluster: "prod-eu-1".into(),
                ..f()
            },
            &["a", "c"],
        ),
        (
            pb::IncidentFilter {
                cluster: "prod-us-1".into(),
                ..f()
            },
            &["b"],
        ),
        (
            pb::IncidentFilter {
                cluster: "prod-ap-1".into(),
                ..f()
            },
            &["f"],
        ),
        // phases: any of, the latest remediation's
        (
            pb::IncidentFilter {
                phases: ph(&[Completed, Failed]),
                ..f()
            },
            &["b", "c", "f"],
        ),
        (
            pb::IncidentFilter {
                phases: ph(&[Pending]),
                ..f()
            },
            &["d"],
        ),
        (
            pb::IncidentFilter {
                phases: ph(&[Processing]),
                ..f()
            },
            &["a"],
        ),
        // labels: every pair, on the merged labels (newest value per key)
        (
            pb::IncidentFilter {
                labels: labels(&[("team", "checkout")]),
                ..f()
            },
            &["a", "b", "e"],
        ),
        (
            pb::IncidentFilter {
                labels: labels(&[("team", "checkout"), ("env", "prod")]),
                ..f()
            },
            &["a"],
        ),
        (
            pb::IncidentFilter {
                labels: labels(&[("team", "web")]),
                ..f()
            },
            &[],
        ),
        (
            pb::IncidentFilter {
                labels: labels(&[("tier", "edge")]),
                ..f()
            },
            &["f"],
        ),
        (
            pb::IncidentFilter {
                labels: labels(&[("team", "platform"), ("tier", "edge")]),
                ..f()
            },
            &["f"],
        ),
        (
            pb::IncidentFilter {
                labels: labels(&[("team", "infra"), ("env", "prod")]),
                ..f()
            },
            &[],
        ),
        (
            pb::IncidentFilter {
                labels: labels(&[("env", "")]),
                ..f()
            },
            &[],
        ),
        // since (inclusive) and until (exclusive) on last_event_at
        (
            pb::IncidentFilter {
                since: Some(at(b + 200)),
                until: Some(at(b + 500)),
                ..f()
            },
            &["b", "c", "d"],
        ),
        (
            pb::IncidentFilter {
                since: Some(at(b + 500)),
                ..f()
            },
            &["e", "f"],
        ),
        (
            pb::IncidentFilter {
                since: Some(at(b + 501)),
                ..f()
            },
            &["f"],
        ),
        (
            pb::IncidentFilter {
                until: Some(at(b + 200)),
                ..f()
            },
            &["a"],
        ),
        (
            pb::IncidentFilter {
                until: Some(at(b + 201)),
                ..f()
            },
            &["a", "b"],
        ),
        (
            pb::IncidentFilter {
                since: Some(at(b + 100)),
                until: Some(at(b + 101)),
                ..f()
            },
            &["a"],
        ),
        (
            pb::IncidentFilter {
                since: Some(at(b + 99)),
                until: Some(at(b + 100)),
                ..f()
            },
            &[],
        ),
        (
            pb::IncidentFilter {
                since: Some(at(b + 40)),
                until: Some(at(b + 50)),
                ..f()
            },
            &[],
        ),
        // combinations
        (all_of_a.clone(), &["a"]),
        (
            pb::IncidentFilter {
                alert_name: "DiskFull".into(),
                ..all_of_a.clone()
            },
            &[],
        ),
        (
            pb::IncidentFilter {
                severities: sev(&[Warning]),
                ..all_of_a.clone()
            },
            &[],
        ),
        (
            pb::IncidentFilter {
                action_type: "scale_deployment".into(),
                ..all_of_a.clone()
            },
            &[],
        ),
        (
            pb::IncidentFilter {
                namespace: "storage".into(),
                ..all_of_a.clone()
            },
            &[],
        ),
        (
            pb::IncidentFilter {
                cluster: "prod-us-1".into(),
                ..all_of_a.clone()
            },
            &[],
        ),
        (
            pb::IncidentFilter {
                phases: ph(&[Completed]),
                ..all_of_a.clone()
            },
            &[],
        ),
        (
            pb::IncidentFilter {
                since: Some(at(b + 101)),
                until: Some(at(b + 200)),
                ..all_of_a.clone()
            },
            &[],
        ),
        (
            pb::IncidentFilter {
                labels: labels(&[("env", "staging")]),
                ..all_of_a.clone()
            },
            &[],
        ),
        (
            pb::IncidentFilter {
                namespace: "payments".into(),
                severities: sev(&[Warning]),
                ..f()
            },
            &["b"],
        ),
        (
            pb::IncidentFilter {
                alert_name: "HighMemoryUsage".into(),
                cluster: "prod-us-1".into(),
                ..f()
            },
            &["b"],
        ),
        (
            pb::IncidentFilter {
                severities: sev(&[Critical, Warning]),
                phases: ph(&[Completed, Failed]),
                labels: labels(&[("team", "infra")]),
                ..f()
            },
            &["c"],
        ),
    ];
    let mut q = app.incident_query_client().await;
    for (index, (filter, expected)) in cases.iter().enumerate() {
        let listed = list_all(&mut q, filter, "", 0).await;
        assert_eq!(names(&listed, &prefix), *expected, "case {index}: {filter:?}");
        // The same filter picks the incidents action statistics are taken over.
        let stats = action_stats(&mut q, filter.clone()).await.expect("stats");
        let executions: i64 = stats.iter().map(|s| s.total).sum();
        let expected_executions = expected
            .iter()
            .map(|name| match *name {
                "a" | "b" | "c" => 1,
                "f" => 2,
                _ => 0,
            })
            .sum::<i64>();
        assert_eq!(executions, expected_executions, "case {index}: stats over {filter:?}");
    }
}

#[tokio::test]
async fn unspecified_enums_an_empty_time_window_and_a_negative_page_size_are_rejected() {
    let app = spawn_app().await;
    let b = origin();
    write_batch(&app, &[event("rr-one", b, custom("x"))]).await;
    let mut q = app.incident_query_client().await;
    let f = no_filter;
    let cases: Vec<(pb::IncidentFilter, &str)> = vec![
        (
            pb::IncidentFilter {
                severities: vec![0],
                ..f()
            },
            "filter.severities[0]",
        ),
        (
            pb::IncidentFilter {
                severities: vec![pb::Severity::Critical as i32, 0],
                ..f()
            },
            "filter.severities[1]",
        ),
        (pb::IncidentFilter { phases: vec![0], ..f() }, "filter.phases[0]"),
        (
            pb::IncidentFilter {
                phases: vec![pb::Phase::Completed as i32, pb::Phase::Failed as i32, 0],
                ..f()
            },
            "filter.phases[2]",
        ),
        (
            pb::IncidentFilter {
                since: Some(at(b)),
                until: Some(at(b)),
                ..f()
            },
            "filter.until",
        ),
        (
            pb::IncidentFilter {
                since: Some(at(b)),
                until: Some(at(b - 60)),
                ..f()
            },
            "filter.until",
        ),
    ];
    for (filter, field) in cases {
        let status = list_page(&mut q, &filter, "", 10, "").await.unwrap_err();
        assert_eq!(violated_fields(&status), [field], "ListIncidents {filter:?}");
        let status = action_stats(&mut q, filter.clone()).await.unwrap_err();
        assert_eq!(violated_fields(&status), [field], "GetActionStats {filter:?}");
    }
    for page_size in [-1, i32::MIN] {
        let status = list_page(&mut q, &f(), "", page_size, "").await.unwrap_err();
        assert_eq!(violated_fields(&status), ["page_size"], "page_size {page_size}");
    }
}

#[tokio::test]
async fn an_unknown_order_is_rejected() {
    let app = spawn_app().await;
    write_batch(&app, &[event("rr-one", origin(), custom("x"))]).await;
    let mut q = app.incident_query_client().await;
    for order_by in [
        "severity desc",
        "last_event_at",
        "last_event_at sideways",
        "first_seen_at desc, id asc",
        "id desc",
        "last_event_at desc; DROP TABLE incidents; --",
        "desc",
    ] {
        let status = list_page(&mut q, &no_filter(), order_by, 10, "").await.unwrap_err();
        assert_eq!(violated_fields(&status), ["order_by"], "{order_by:?}");
    }
    for order_by in [""].into_iter().chain(ORDERS) {
        let page = list_page(&mut q, &no_filter(), order_by, 10, "")
            .await
            .unwrap_or_else(|s| panic!("{order_by:?}: {s:?}"));
        assert_eq!(page.incidents.len(), 1, "{order_by:?}");
    }
    assert_eq!(app.count("incidents").await, 1);
}

#[tokio::test]
async fn sql_metacharacters_in_string_filters_are_plain_text_that_matches_nothing() {
    let app = spawn_app().await;
    let b = origin();
    let run = run_id();
    let rrid = format!("rr-{run}-plain");
    let literal = format!("rr-{run}-literal");
    let events = vec![
        pb::AuditEvent {
            labels: labels(&[("team", "checkout")]),
            ..event(
                &rrid,
                b,
                remediation("HighMemoryUsage", pb::Severity::Critical, pb::Phase::Processing),
            )
        },
        event(
            &rrid,
            b + 10,
            execution("restart_pod", pb::ExecutionStatus::Succeeded, millis(1_000)),
        ),
        // Values that are themselves full of metacharacters match exactly.
        pb::AuditEvent {
            namespace: "ns_%\\'".into(),
            cluster: "c'; --".into(),
            labels: labels(&[("k%_\\'", "v%_\\'")]),
            ..event(
                &literal,
                b + 20,
                remediation("50%_done\\'", pb::Severity::Info, pb::Phase::Pending),
            )
        },
        pb::AuditEvent {
            namespace: "ns_%\\'".into(),
            cluster: "c'; --".into(),
            ..event(
                &literal,
                b + 30,
                execution("act%_\\'", pb::ExecutionStatus::Failed, None),
            )
        },
    ];
    write_batch(&app, &events).await;
    let events_before = app.count("audit_events").await;
    let mut q = app.incident_query_client().await;

    let hostile = |value: &str| {
        let mut strings: Vec<String> = [
            "' OR '1'='1",
            "' OR 1=1 --",
            "x'; DROP TABLE incidents; --",
            "\") OR true --",
            "%",
            "%%",
            "_",
            "\\",
            "\\%",
            "*",
            ".*",
            "$1",
            "NULL",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        strings.push(format!("{}%", &value[..3]));
        strings.push(format!("{}_", &value[..value.len() - 1]));
        strings.push(format!("%{}", &value[1..]));
        strings.push(value.to_uppercase());
        strings.push(format!("{value}' OR '1'='1"));
        strings
    };
    type Build = fn(String) -> pb::IncidentFilter;
    // (field, the value the plain incident has there, whether that value alone
    // selects it, how to put a string there)
    let fields: Vec<(&str, &str, bool, Build)> = vec![
        ("alert_name", "HighMemoryUsage", true, |s| pb::IncidentFilter {
            alert_name: s,
            ..no_filter()
        }),
        ("action_type", "restart_pod", true, |s| pb::IncidentFilter {
            action_type: s,
            ..no_filter()
        }),
        ("namespace", "payments", true, |s| pb::IncidentFilter {
            namespace: s,
            ..no_filter()
        }),
        ("cluster", "prod-eu-1", true, |s| pb::IncidentFilter {
            cluster: s,
            ..no_filter()
        }),
        ("label key", "team", true, |s| pb::IncidentFilter {
            labels: [(s, "checkout".to_owned())].into(),
            ..no_filter()
        }),
        ("label value", "checkout", true, |s| pb::IncidentFilter {
            labels: [("team".to_owned(), s)].into(),
            ..no_filter()
        }),
        ("label key and value", "team", false, |s| pb::IncidentFilter {
            labels: [(s.clone(), s)].into(),
            ..no_filter()
        }),
    ];
    for (field, value, selects, build) in &fields {
        if *selects {
            // The real value matches, so the hostile ones below could have matched too.
            let listed = list_all(&mut q, &build(value.to_string()), "", 0).await;
            assert_eq!(names(&listed, ""), [rrid.as_str()], "{field} = {value:?}");
        }
        for string in hostile(value) {
            let filter = build(string.clone());
            let page = list_page(&mut q, &filter, "", 0, "")
                .await
                .unwrap_or_else(|s| panic!("{field} {string:?}: {s:?}"));
            assert!(
                page.incidents.is_empty(),
                "{field} {string:?} matched {:?}",
                page.incidents
            );
            assert!(page.next_page_token.is_empty(), "{field} {string:?}");
            let stats = action_stats(&mut q, filter)
                .await
                .unwrap_or_else(|s| panic!("stats {field} {string:?}: {s:?}"));
            assert!(stats.is_empty(), "stats {field} {string:?}: {stats:?}");
        }
    }

    let literal_filters = [
        pb::IncidentFilter {
            alert_name: "50%_done\\'".into(),
            ..no_filter()
        },
        pb::IncidentFilter {
            action_type: "act%_\\'".into(),
            ..no_filter()
        },
        pb::IncidentFilter {
            namespace: "ns_%\\'".into(),
            ..no_filter()
        },
        pb::IncidentFilter {
            cluster: "c'; --".into(),
            ..no_filter()
        },
        pb::IncidentFilter {
            labels: labels(&[("k%_\\'", "v%_\\'")]),
            ..no_filter()
        },
    ];
    for filter in literal_filters {
        let listed = list_all(&mut q, &filter, "", 0).await;
        assert_eq!(names(&listed, ""), [literal.as_str()], "{filter:?}");
    }

    for string in hostile("corr-x") {
        let page = timeline_page(&mut q, Scope::CorrelationId(string.clone()), &[], 0, "")
            .await
            .unwrap_or_else(|s| panic!("correlation {string:?}: {s:?}"));
        assert!(page.events.is_empty(), "correlation {string:?}");
        let status = timeline_page(&mut q, Scope::RemediationRequestId(string.clone()), &[], 0, "")
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "timeline of {string:?}: {status:?}");
        let status = get_incident(&mut q, Key::RemediationRequestId(string.clone()))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "incident {string:?}: {status:?}");
    }

    // Nothing was dropped or changed.
    assert_eq!(list_all(&mut q, &no_filter(), "", 0).await.len(), 2);
    assert_eq!(app.count("incidents").await, 2);
    assert_eq!(app.count("audit_events").await, events_before);
}

// ---------------------------------------------------------------- ListIncidents paging

#[tokio::test]
async fn every_order_pages_through_all_incidents_without_duplicates_or_gaps() {
    let app = spawn_app().await;
    let b = origin();
    let run = run_id();
    // Offsets from b of each incident's first and last event: ties on both keys.
    let first = [0, 0, 10, 10, 10, 20, 30, 30, 40, 50];
    let last = [100, 90, 90, 80, 100, 70, 60, 90, 60, 50];
    let mut events = Vec::new();
    for i in 0..first.len() {
        let rrid = format!("rr-{run}-{i}");
        events.push(event(&rrid, b + last[i], custom("incident.updated")));
        if last[i] != first[i] {
            events.push(event(&rrid, b + first[i], custom("incident.opened")));
        }
    }
    let receipts = write_batch(&app, &events).await;
    let mut incident_of = HashMap::new();
    for (event, receipt) in events.iter().zip(&receipts) {
        incident_of.insert(event.remediation_request_id.clone(), receipt.incident_id.clone());
    }
    assert_eq!(incident_of.len(), 10);
    // (id, first_seen_at, last_event_at)
    let rows: Vec<(Uuid, i64, i64)> = (0..first.len())
        .map(|i| {
            let id = &incident_of[&format!("rr-{run}-{i}")];
            (Uuid::parse_str(id).unwrap(), b + first[i], b + last[i])
        })
        .collect();

    let mut q = app.incident_query_client().await;
    for order_by in ORDERS {
        let mut expected = rows.clone();
        if order_by.starts_with("last_event_at") {
            expected.sort_by_key(|&(id, _, last)| (last, id));
        } else {
            expected.sort_by_key(|&(id, first, _)| (first, id));
        }
        if order_by.ends_with("desc") {
            expected.reverse();
        }

        let (mut listed, mut sizes, mut token) = (Vec::new(), Vec::new(), String::new());
        loop {
            let page = list_page(&mut q, &no_filter(), order_by, 3, &token)
                .await
                .unwrap_or_else(|s| panic!("{order_by}: {s:?}"));
            sizes.push(page.incidents.len());
            listed.extend(page.incidents);
            token = page.next_page_token;
            if token.is_empty() || sizes.len() > 10 {
                break;
            }
        }
        assert_eq!(sizes, [3, 3, 3, 1], "{order_by}: page sizes");
        let listed_ids: Vec<Uuid> = listed.iter().map(|i| Uuid::parse_str(&i.id).unwrap()).collect();
        let expected_ids: Vec<Uuid> = expected.iter().map(|r| r.0).collect();
        assert_eq!(
            listed_ids, expected_ids,
            "{order_by}: order, ties by id in the same direction"
        );
        for (incident, (_, first_seen, last_event)) in listed.iter().zip(&expected) {
            assert_eq!(incident.first_seen_at, Some(at(*first_seen)), "{order_by}");
            assert_eq!(incident.last_event_at, Some(at(*last_event)), "{order_by}");
        }
    }

    // The default order is last_event_at desc.
    let default = list_all(&mut q, &no_filter(), "", 4).await;
    let explicit = list_all(&mut q, &no_filter(), "last_event_at desc", 10).await;
    assert_eq!(ids(&default), ids(&explicit));
    // A last page that is exactly full carries no token.
    let page = list_page(&mut q, &no_filter(), "first_seen_at asc", 5, "")
        .await
        .unwrap();
    assert!(!page.next_page_token.is_empty());
    let page = list_page(&mut q, &no_filter(), "first_seen_at asc", 5, &page.next_page_token)
        .await
        .unwrap();
    assert_eq!(page.incidents.len(), 5);
    assert_eq!(page.next_page_token, "", "the last page has no token");
    let page = list_page(&mut q, &no_filter(), "", 10, "").await.unwrap();
    assert_eq!(page.incidents.len(), 10);
    assert_eq!(page.next_page_token, "", "one exactly full page has no token");
}

#[tokio::test]
async fn page_size_defaults_to_50_is_clamped_to_1000_and_must_not_be_negative() {
    let app = spawn_app().await;
    let b = origin();
    let run = run_id();
    let correlation = format!("corr-{run}-bulk");
    let events: Vec<pb::AuditEvent> = (0..1001)
        .map(|i| pb::AuditEvent {
            correlation_id: correlation.clone(),
            ..event(&format!("rr-{run}-{i}"), b + i, custom("bulk"))
        })
        .collect();
    write_batch(&app, &events).await;
    let mut q = app.incident_query_client().await;

    let page = list_page(&mut q, &no_filter(), "", 0, "").await.unwrap();
    assert_eq!(page.incidents.len(), 50, "default page size");
    assert!(!page.next_page_token.is_empty());
    for page_size in [1001, 5000, i32::MAX] {
        let page = list_page(&mut q, &no_filter(), "", page_size, "").await.unwrap();
        assert_eq!(page.incidents.len(), 1000, "page_size {page_size} is clamped");
        assert!(!page.next_page_token.is_empty());
    }
    let first = list_page(&mut q, &no_filter(), "", 5000, "").await.unwrap();
    let second = list_page(&mut q, &no_filter(), "", 5000, &first.next_page_token)
        .await
        .unwrap();
    assert_eq!(second.incidents.len(), 1);
    assert_eq!(second.next_page_token, "");
    let distinct: HashSet<String> = ids(&first.incidents)
        .into_iter()
        .chain(ids(&second.incidents))
        .collect();
    assert_eq!(distinct.len(), 1001);
    let status = list_page(&mut q, &no_filter(), "", -1, "").await.unwrap_err();
    assert_eq!(violated_fields(&status), ["page_size"]);

    // The same rules for timelines.
    let scope = Scope::CorrelationId(correlation.clone());
    let page = timeline_page(&mut q, scope.clone(), &[], 0, "").await.unwrap();
    assert_eq!(page.events.len(), 50, "default page size");
    assert!(!page.next_page_token.is_empty());
    let page = timeline_page(&mut q, scope.clone(), &[], i32::MAX, "").await.unwrap();
    assert_eq!(page.events.len(), 1000, "clamped");
    let rest = timeline_page(&mut q, scope.clone(), &[], 1000, &page.next_page_token)
        .await
        .unwrap();
    assert_eq!(rest.events.len(), 1);
    assert_eq!(rest.next_page_token, "");
    let status = timeline_page(&mut q, scope, &[], -5, "").await.unwrap_err();
    assert_eq!(violated_fields(&status), ["page_size"]);
}

#[tokio::test]
async fn page_tokens_are_tamper_evident_and_bound_to_their_listing() {
    let app = spawn_app().await;
    let b = origin();
    let run = run_id();
    let rrid = format!("rr-{run}-0");
    let events: Vec<pb::AuditEvent> = (0..5)
        .map(|i| event(&format!("rr-{run}-{i}"), b + i, custom("incident.opened")))
        .chain((1..5).map(|i| event(&rrid, b + 10 + i, custom("incident.updated"))))
        .collect();
    write_batch(&app, &events).await;
    let mut q = app.incident_query_client().await;

    let first = list_page(&mut q, &no_filter(), "", 2, "").await.unwrap();
    let token = first.next_page_token.clone();
    assert!(!token.is_empty());
    let second = list_page(&mut q, &no_filter(), "", 2, &token)
        .await
        .expect("the token works");
    assert_eq!(second.incidents.len(), 2);
    assert!(ids(&second.incidents)
        .iter()
        .all(|id| !ids(&first.incidents).contains(id)));
    // A token does not pin the page size.
    let rest = list_page(&mut q, &no_filter(), "", 10, &token).await.unwrap();
    assert_eq!(rest.incidents.len(), 3);

    let timeline = timeline_page(&mut q, Scope::RemediationRequestId(rrid.clone()), &[], 2, "")
        .await
        .unwrap();
    let timeline_token = timeline.next_page_token.clone();
    assert!(!timeline_token.is_empty());
    timeline_page(
        &mut q,
        Scope::RemediationRequestId(rrid.clone()),
        &[],
        2,
        &timeline_token,
    )
    .await
    .expect("the timeline token works");

    let expect_rejected = |result: Result<pb::ListIncidentsResponse, Status>, what: &str| {
        let status = result.expect_err(what);
        assert_eq!(violated_fields(&status), ["page_token"], "{what}");
    };
    for index in 0..token.len() {
        let flipped = flip(&token, index);
        assert_ne!(flipped, token);
        expect_rejected(
            list_page(&mut q, &no_filter(), "", 2, &flipped).await,
            &format!("character {index} of {token} changed"),
        );
    }
    let mut reversed: Vec<char> = token.chars().collect();
    reversed.reverse();
    let others = [
        format!("{token}A"),
        token[..token.len() - 1].to_owned(),
        token[1..].to_owned(),
        reversed.into_iter().collect(),
        "garbage".to_owned(),
        "%%%".to_owned(),
        "' OR '1'='1".to_owned(),
        timeline_token.clone(),
    ];
    for other in &others {
        expect_rejected(
            list_page(&mut q, &no_filter(), "", 2, other).await,
            &format!("token {other:?}"),
        );
    }
    // The token pins the filter and the order of its first page.
    let same_results_other_filter = pb::IncidentFilter {
        namespace: "payments".into(),
        ..no_filter()
    };
    expect_rejected(
        list_page(&mut q, &same_results_other_filter, "", 2, &token).await,
        "another filter",
    );
    let narrower = pb::IncidentFilter {
        labels: labels(&[("team", "x")]),
        ..no_filter()
    };
    expect_rejected(list_page(&mut q, &narrower, "", 2, &token).await, "a narrower filter");
    for order_by in ["last_event_at asc", "first_seen_at desc", "first_seen_at asc"] {
        expect_rejected(
            list_page(&mut q, &no_filter(), order_by, 2, &token).await,
            &format!("order {order_by}"),
        );
    }

    // Timeline tokens: tampered or foreign.
    for index in 0..timeline_token.len() {
        let status = timeline_page(
            &mut q,
            Scope::RemediationRequestId(rrid.clone()),
            &[],
            2,
            &flip(&timeline_token, index),
        )
        .await
        .expect_err("tampered timeline token");
        assert_eq!(
            violated_fields(&status),
            ["page_token"],
            "character {index} of {timeline_token} changed"
        );
    }
    for other in [token.clone(), "garbage".to_owned()] {
        let status = timeline_page(&mut q, Scope::RemediationRequestId(rrid.clone()), &[], 2, &other)
            .await
            .expect_err("foreign token");
        assert_eq!(violated_fields(&status), ["page_token"], "{other:?}");
    }
    // A timeline token pins its scope and kinds.
    let other_rrid = format!("rr-{run}-1");
    let incident_id = list_all(&mut q, &no_filter(), "", 0)
        .await
        .into_iter()
        .find(|i| i.remediation_request_id == other_rrid)
        .unwrap()
        .id;
    for (scope, kinds) in [
        (Scope::RemediationRequestId(other_rrid.clone()), vec![]),
        (Scope::CorrelationId(format!("corr-{rrid}")), vec![]),
        (Scope::IncidentId(incident_id), vec![]),
        (Scope::RemediationRequestId(rrid.clone()), vec![pb::AuditKind::Custom]),
    ] {
        let status = timeline_page(&mut q, scope.clone(), &kinds, 2, &timeline_token)
            .await
            .expect_err("a token of another timeline");
        assert_eq!(violated_fields(&status), ["page_token"], "{scope:?} {kinds:?}");
    }

    // Another server (another signing key) does not accept these tokens.
    let elsewhere = spawn_app().await;
    write_batch(&elsewhere, &events).await;
    let mut q2 = elsewhere.incident_query_client().await;
    let status = list_page(&mut q2, &no_filter(), "", 2, &token).await.unwrap_err();
    assert_eq!(violated_fields(&status), ["page_token"], "a token of another server");
    let status = timeline_page(
        &mut q2,
        Scope::RemediationRequestId(rrid.clone()),
        &[],
        2,
        &timeline_token,
    )
    .await
    .unwrap_err();
    assert_eq!(
        violated_fields(&status),
        ["page_token"],
        "a timeline token of another server"
    );
}

#[tokio::test]
async fn paging_lists_the_first_pages_snapshot_while_incidents_change_and_new_ones_arrive() {
    let app = spawn_app().await;
    let b = origin();
    let run = run_id();
    let initial: Vec<pb::AuditEvent> = (0..10)
        .map(|i| event(&format!("rr-{run}-{i}"), b + 100 * i, custom("incident.opened")))
        .collect();
    write_batch(&app, &initial).await;
    let initial_rrids: Vec<String> = initial.iter().map(|e| e.remediation_request_id.clone()).collect();
    let mut q = app.incident_query_client().await;
    let mut writer = app.audit_client().await;
    let mut n = 0i64;

    for (round, order_by) in ORDERS.into_iter().enumerate() {
        let expected = list_all(&mut q, &no_filter(), order_by, 1000).await;
        assert!(expected.len() >= 10);

        let first = list_page(&mut q, &no_filter(), order_by, 3, "").await.unwrap();
        let mut listed = first.incidents;
        let mut token = first.next_page_token;

        // Someone keeps writing while we page.
        let stop = Arc::new(AtomicBool::new(false));
        let background = {
            let stop = stop.clone();
            let mut client = app.audit_client().await;
            let rrids = initial_rrids.clone();
            let run = run.clone();
            tokio::spawn(async move {
                let mut written = 0usize;
                while !stop.load(Ordering::Relaxed) && written < 30 {
                    let k = written as i64;
                    let bump = event(
                        &rrids[written % rrids.len()],
                        origin() + 3 * 3600 - 1,
                        custom("bg.bump"),
                    );
                    let sink = event(&rrids[(written + 5) % rrids.len()], b - 100_000 - k, custom("bg.sink"));
                    let mut requests = vec![write(bump), write(sink)];
                    if written.is_multiple_of(3) {
                        requests.push(write(event(
                            &format!("rr-{run}-bg-{round}-{k}"),
                            b + 450,
                            custom("bg.new"),
                        )));
                    }
                    client
                        .batch_write_audit(pb::BatchWriteAuditRequest { requests })
                        .await
                        .expect("background write");
                    written += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(3)).await;
                }
                written
            })
        };

        let mut pages = 1;
        while !token.is_empty() && pages < 1000 {
            // Move a listed and a not yet listed incident to both ends of
            // either order, and add an incident in the middle.
            n += 1;
            let unlisted = &expected[listed.len().min(expected.len() - 1)].remediation_request_id;
            let seen = &listed[listed.len() - 1].remediation_request_id;
            let newest = origin() + 3 * 3600 - 1;
            let requests = vec![
                write(event(unlisted, newest, custom("bump"))),
                write(event(unlisted, b - 10_000 - n, custom("sink"))),
                write(event(seen, newest, custom("bump"))),
                write(event(seen, b - 20_000 - n, custom("sink"))),
                write(event(&format!("rr-{run}-new-{n}"), b + 450, custom("new"))),
            ];
            writer
                .batch_write_audit(pb::BatchWriteAuditRequest { requests })
                .await
                .expect("written");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;

            let page = list_page(&mut q, &no_filter(), order_by, 3, &token)
                .await
                .unwrap_or_else(|s| panic!("{order_by} page {pages}: {s:?}"));
            listed.extend(page.incidents);
            token = page.next_page_token;
            pages += 1;
        }
        stop.store(true, Ordering::Relaxed);
        let background_writes = background.await.unwrap();
        assert!(background_writes > 0, "the background writer ran");

        assert_eq!(
            ids(&listed),
            ids(&expected),
            "{order_by}: exactly the incidents of the first page's snapshot, each once, in their positions then"
        );
        assert_eq!(pages, expected.len().div_ceil(3), "{order_by}");
        // Without the snapshot the listing would have been different: the
        // writes above really moved incidents and added new ones.
        let now = list_all(&mut q, &no_filter(), order_by, 1000).await;
        assert!(now.len() > expected.len(), "{order_by}: new incidents arrived");
        let still_there: Vec<String> = ids(&now).into_iter().filter(|id| ids(&expected).contains(id)).collect();
        assert_ne!(still_there, ids(&expected), "{order_by}: incidents moved");
    }
}

#[tokio::test]
async fn a_time_filtered_listing_keeps_incidents_that_leave_the_window_while_paging() {
    let app = spawn_app().await;
    let b = origin();
    let run = run_id();
    let initial: Vec<pb::AuditEvent> = (0..10)
        .map(|i| event(&format!("rr-{run}-{i}"), b + 100 * i, custom("incident.opened")))
        .collect();
    write_batch(&app, &initial).await;
    write_batch(&app, &[event(&format!("rr-{run}-outside"), b + 5000, custom("x"))]).await;
    let window = pb::IncidentFilter {
        since: Some(at(b)),
        until: Some(at(b + 1000)),
        ..no_filter()
    };
    let mut q = app.incident_query_client().await;
    let mut writer = app.audit_client().await;
    for (round, order_by) in ORDERS.into_iter().enumerate() {
        let expected = list_all(&mut q, &window, order_by, 1000).await;
        assert!(!expected.is_empty(), "{order_by}");
        let first = list_page(&mut q, &window, order_by, 3, "").await.unwrap();
        let (mut listed, mut token) = (first.incidents, first.next_page_token);
        let mut n = 0;
        while !token.is_empty() && n < 100 {
            n += 1;
            // The next incident leaves the window, and a new one enters it.
            let leaving = &expected[listed.len().min(expected.len() - 1)].remediation_request_id;
            let requests = vec![
                write(event(leaving, origin() + 3 * 3600 - 1, custom("bump"))),
                write(event(&format!("rr-{run}-new-{round}-{n}"), b + 450, custom("new"))),
            ];
            writer
                .batch_write_audit(pb::BatchWriteAuditRequest { requests })
                .await
                .expect("written");
            let page = list_page(&mut q, &window, order_by, 3, &token)
                .await
                .unwrap_or_else(|s| panic!("{order_by}: {s:?}"));
            listed.extend(page.incidents);
            token = page.next_page_token;
        }
        assert_eq!(
            ids(&listed),
            ids(&expected),
            "{order_by}: the window as of the first page, each once, in place"
        );
    }
}

#[tokio::test]
async fn a_write_still_in_flight_at_the_first_page_does_not_change_later_pages() {
    let app = spawn_app().await;
    let b = origin();
    let run = run_id();
    let initial: Vec<pb::AuditEvent> = (0..10)
        .map(|i| event(&format!("rr-{run}-{i}"), b + 100 * i, custom("incident.opened")))
        .collect();
    write_batch(&app, &initial).await;
    // Widen the window in which a write has taken its place in the change
    // order but not committed: the projection of the marker incident, which
    // sorts after every other incident of the batch, sleeps before the commit.
    sqlx::raw_sql(
        "CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN PERFORM pg_sleep(2); RETURN NULL; END $$; \
         CREATE TRIGGER slow_commit AFTER INSERT ON incidents FOR EACH ROW \
         WHEN (NEW.remediation_request_id LIKE 'zzz-slow%') EXECUTE FUNCTION slow_commit();",
    )
    .execute(&app.db)
    .await
    .unwrap();
    let mut q = app.incident_query_client().await;
    let expected = list_all(&mut q, &no_filter(), "", 1000).await;
    assert_eq!(expected.len(), 10);
    // Not on the first page (last_event_at desc, 3 a page): moves to the top.
    let moved = expected[6].remediation_request_id.clone();

    let mut client = app.audit_client().await;
    let slow = tokio::spawn(async move {
        let requests = vec![
            write(event(&moved, origin() + 3 * 3600 - 1, custom("bump"))),
            write(event(&format!("rr-{run}-new"), b + 450, custom("new"))),
            write(event(&format!("zzz-slow-{run}"), b + 350, custom("marker"))),
        ];
        client
            .batch_write_audit(pb::BatchWriteAuditRequest { requests })
            .await
            .expect("the slow write commits")
    });
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let first = list_page(&mut q, &no_filter(), "", 3, "").await.unwrap();
    assert!(!slow.is_finished(), "the write was still in flight at the first page");
    assert_eq!(ids(&first.incidents), ids(&expected[..3]));
    slow.await.unwrap();

    let mut listed = first.incidents;
    let mut token = first.next_page_token;
    while !token.is_empty() && listed.len() < 100 {
        let page = list_page(&mut q, &no_filter(), "", 3, &token).await.unwrap();
        listed.extend(page.incidents);
        token = page.next_page_token;
    }
    assert_eq!(
        names(&listed, ""),
        names(&expected, ""),
        "exactly the incidents committed at the first page"
    );
    assert_eq!(ids(&listed), ids(&expected), "each in the position it had then");
}

// ---------------------------------------------------------------- ListAuditEvents

fn rich_data() -> prost_types::Struct {
    use prost_types::{value::Kind, ListValue, Struct, Value};
    let v = |kind| Value { kind: Some(kind) };
    Struct {
        fields: [
            ("channel".to_owned(), v(Kind::StringValue("#oncall".into()))),
            ("attempts".to_owned(), v(Kind::NumberValue(3.0))),
            ("ratio".to_owned(), v(Kind::NumberValue(0.125))),
            ("acked".to_owned(), v(Kind::BoolValue(true))),
            ("escalation".to_owned(), v(Kind::NullValue(0))),
            (
                "recipients".to_owned(),
                v(Kind::ListValue(ListValue {
                    values: vec![v(Kind::StringValue("alice".into())), v(Kind::NumberValue(-2.5))],
                })),
            ),
            (
                "meta".to_owned(),
                v(Kind::StructValue(Struct {
                    fields: [
                        ("unicode".to_owned(), v(Kind::StringValue("café ✓ \"quoted\"".into()))),
                        (
                            "nested".to_owned(),
                            v(Kind::StructValue(Struct {
                                fields: [("depth".to_owned(), v(Kind::NumberValue(2.0)))].into(),
                            })),
                        ),
                    ]
                    .into(),
                })),
            ),
        ]
        .into(),
    }
}

struct Written {
    event: pb::AuditEvent,
    receipt: pb::WriteAuditResponse,
    state: pb::EmbeddingState,
}

fn sorted_by_occurrence(written: &[&Written]) -> Vec<String> {
    let mut items: Vec<(i64, i32, Uuid)> = written
        .iter()
        .map(|w| {
            let t = w.event.occurred_at.unwrap();
            (t.seconds, t.nanos, Uuid::parse_str(&w.receipt.event_id).unwrap())
        })
        .collect();
    items.sort();
    items.into_iter().map(|(_, _, id)| id.to_string()).collect()
}

fn event_ids(stored: &[pb::StoredAuditEvent]) -> Vec<String> {
    stored.iter().map(|s| s.event_id.clone()).collect()
}

#[tokio::test]
async fn timelines_return_each_event_exactly_as_written_with_what_the_service_recorded() {
    use pb::{AuditKind as K, EmbeddingState as E, ExecutionStatus as X};
    let app = spawn_app().await;
    let b = origin();
    let run = run_id();
    let rrid = format!("rr-{run}-timeline");
    let other = format!("rr-{run}-other");
    let (corr_x, corr_y) = (format!("corr-{run}-x"), format!("corr-{run}-y"));
    let started = chrono::Utc::now();
    let mut client = app.audit_client().await;

    let e1 = pb::AuditEvent {
        correlation_id: corr_x.clone(),
        remediation_request_id: rrid.clone(),
        occurred_at: Some(Timestamp {
            seconds: b + 10,
            nanos: 123_456_000,
        }),
        namespace: "payments".into(),
        cluster: "prod-eu-1".into(),
        labels: labels(&[("team", "checkout"), ("env", "prod"), ("app.kubernetes.io/name", "api")]),
        parent_event_id: String::new(),
        payload: Some(Payload::Remediation(pb::RemediationAudit {
            signal_type: "prometheus-alert".into(),
            signal_name: "HighMemoryUsage".into(),
            severity: pb::Severity::Critical as i32,
            target: target("Deployment", "api", "payments"),
            phase: pb::Phase::Processing as i32,
            message: format!("container api OOMKilled ({run})"),
            started_at: Some(Timestamp {
                seconds: b + 5,
                nanos: 500_000_000,
            }),
            completed_at: Some(at(b + 9)),
            priority: "P1".into(),
        })),
    };
    let r1 = client.write_audit(write(e1.clone())).await.unwrap().into_inner();

    let on = |correlation: &str, occurred: i64, payload: Payload| pb::AuditEvent {
        correlation_id: correlation.into(),
        cluster: String::new(),
        ..event(&rrid, occurred, payload)
    };
    let e2 = on(
        &corr_x,
        b + 20,
        Payload::AiAnalysis(pb::AiAnalysisAudit {
            root_cause: format!("session cache leak ({run})"),
            recommended_action: "scale_deployment".into(),
            confidence: 0.87,
            reasoning: "heap grows linearly with sessions".into(),
            model: "gpt-4o".into(),
        }),
    );
    let e3 = on(
        &corr_x,
        b + 30,
        Payload::Workflow(pb::WorkflowAudit {
            workflow_id: format!("wf-{run}"),
            step_name: "drain-node".into(),
            status: X::Failed as i32,
            duration: millis(12_250),
            error_message: "node cordoned".into(),
        }),
    );
    let e4 = pb::AuditEvent {
        parent_event_id: r1.event_id.clone(),
        labels: labels(&[("attempt", "2")]),
        ..on(
            &corr_x,
            b + 30,
            Payload::Execution(pb::ExecutionAudit {
                action_type: "restart_pod".into(),
                target: target("Pod", "api-7d9f", "payments"),
                status: X::Failed as i32,
                duration: millis(3_500),
                error_message: format!("CrashLoopBackOff ({run})"),
            }),
        )
    };
    let e5 = on(
        &corr_x,
        b + 40,
        Payload::Custom(pb::CustomAudit {
            event_type: "notification.sent".into(),
            action: "page".into(),
            outcome: "success".into(),
            data: Some(rich_data()),
            text: String::new(),
        }),
    );
    let e6 = on(
        &corr_y,
        b + 5,
        Payload::Custom(pb::CustomAudit {
            event_type: "note.added".into(),
            action: String::new(),
            outcome: String::new(),
            data: None,
            text: format!("paged the on-call engineer ({run})"),
        }),
    );
    let e7 = pb::AuditEvent {
        namespace: "payments-2".into(),
        ..on(
            &corr_y,
            b + 50,
            Payload::Remediation(pb::RemediationAudit {
                signal_type: "prometheus-alert".into(),
                signal_name: format!("Resolved-{run}"),
                severity: pb::Severity::Info as i32,
                target: target("Deployment", "api", ""),
                phase: pb::Phase::Completed as i32,
                message: String::new(),
                started_at: None,
                completed_at: None,
                priority: String::new(),
            }),
        )
    };
    let e8 = pb::AuditEvent {
        remediation_request_id: other.clone(),
        ..on(&corr_y, b + 45, custom("elsewhere"))
    };
    let mut vector = vec![0.0f32; 384];
    vector[7] = 1.0;
    let requests = vec![
        write(e2.clone()),
        write(e3.clone()),
        write(e4.clone()),
        write(e5.clone()),
        pb::WriteAuditRequest {
            embedding: Some(pb::Vector { values: vector }),
            ..write(e6.clone())
        },
        write(e7.clone()),
        write(e8.clone()),
    ];
    let receipts = client
        .batch_write_audit(pb::BatchWriteAuditRequest { requests })
        .await
        .unwrap()
        .into_inner()
        .responses;
    let finished = chrono::Utc::now();
    let states = [
        E::Generated,
        E::Generated,
        E::Generated,
        E::Unspecified,
        E::Provided,
        E::Generated,
        E::Unspecified,
    ];
    let mut written: Vec<Written> = vec![Written {
        event: e1,
        receipt: r1,
        state: E::Generated,
    }];
    for ((event, receipt), state) in [e2, e3, e4, e5, e6, e7, e8].into_iter().zip(receipts).zip(states) {
        written.push(Written { event, receipt, state });
    }
    for (i, w) in written.iter().enumerate() {
        assert_eq!(w.receipt.embedding_state(), w.state, "receipt of e{}", i + 1);
    }
    let incident_id = written[0].receipt.incident_id.clone();
    let by_id: HashMap<&str, &Written> = written.iter().map(|w| (w.receipt.event_id.as_str(), w)).collect();
    let of_incident: Vec<&Written> = written[..7].iter().collect();

    let mut q = app.incident_query_client().await;
    let (timeline, _) = timeline_all(&mut q, Scope::RemediationRequestId(rrid.clone()), &[], 0).await;
    assert_eq!(
        event_ids(&timeline),
        sorted_by_occurrence(&of_incident),
        "occurred_at order, ties by event id"
    );
    for stored in &timeline {
        let w = by_id[stored.event_id.as_str()];
        assert_eq!(stored.event.as_ref(), Some(&w.event), "the event exactly as written");
        assert_eq!(stored.incident_id, incident_id);
        assert_eq!(stored.source, "anonymous");
        assert_eq!(stored.embedding_state(), w.state, "{:?}", w.event.payload);
        let received = to_chrono(stored.received_at.as_ref().expect("received_at is set"));
        assert!(
            received >= started - chrono::TimeDelta::seconds(2) && received <= finished + chrono::TimeDelta::seconds(2),
            "received_at {received} between {started} and {finished}"
        );
    }

    // The same timeline by incident id, and in pages.
    let (by_incident, _) = timeline_all(&mut q, Scope::IncidentId(incident_id.clone()), &[], 0).await;
    assert_eq!(by_incident, timeline);
    let (paged, sizes) = timeline_all(&mut q, Scope::IncidentId(incident_id.clone()), &[], 2).await;
    assert_eq!(sizes, [2, 2, 2, 1]);
    assert_eq!(paged, timeline);

    // A correlation id spans incidents.
    let (by_y, _) = timeline_all(&mut q, Scope::CorrelationId(corr_y.clone()), &[], 0).await;
    let y: Vec<&Written> = written.iter().filter(|w| w.event.correlation_id == corr_y).collect();
    assert_eq!(event_ids(&by_y), sorted_by_occurrence(&y));
    assert_eq!(by_y.len(), 3);
    for stored in &by_y {
        let w = by_id[stored.event_id.as_str()];
        assert_eq!(stored.event.as_ref(), Some(&w.event));
        assert_eq!(stored.incident_id, w.receipt.incident_id);
    }
    assert_ne!(written[7].receipt.incident_id, incident_id);
    let (by_x, _) = timeline_all(&mut q, Scope::CorrelationId(corr_x.clone()), &[], 0).await;
    let x: Vec<&Written> = written.iter().filter(|w| w.event.correlation_id == corr_x).collect();
    assert_eq!(event_ids(&by_x), sorted_by_occurrence(&x));

    // Kinds.
    let kind_of = |w: &Written| match w.event.payload.as_ref().unwrap() {
        Payload::Remediation(_) => K::Remediation,
        Payload::AiAnalysis(_) => K::AiAnalysis,
        Payload::Workflow(_) => K::Workflow,
        Payload::Execution(_) => K::Execution,
        Payload::Custom(_) => K::Custom,
    };
    for kinds in [
        vec![K::Execution],
        vec![K::Remediation, K::Custom],
        vec![K::AiAnalysis, K::Workflow],
        vec![K::Workflow],
        vec![K::Remediation, K::AiAnalysis, K::Workflow, K::Execution, K::Custom],
    ] {
        let matching: Vec<&Written> = of_incident
            .iter()
            .copied()
            .filter(|w| kinds.contains(&kind_of(w)))
            .collect();
        let (got, _) = timeline_all(&mut q, Scope::RemediationRequestId(rrid.clone()), &kinds, 0).await;
        assert_eq!(event_ids(&got), sorted_by_occurrence(&matching), "kinds {kinds:?}");
        let (got, _) = timeline_all(&mut q, Scope::RemediationRequestId(rrid.clone()), &kinds, 1).await;
        assert_eq!(
            event_ids(&got),
            sorted_by_occurrence(&matching),
            "kinds {kinds:?} one per page"
        );
    }
    let (customs_y, _) = timeline_all(&mut q, Scope::CorrelationId(corr_y.clone()), &[K::Custom], 0).await;
    assert_eq!(customs_y.len(), 2);
}

#[tokio::test]
async fn timelines_need_a_valid_scope_and_known_kinds() {
    let app = spawn_app().await;
    let receipt = write_batch(&app, &[event("rr-known", origin(), custom("x"))])
        .await
        .remove(0);
    let mut q = app.incident_query_client().await;

    let status = q
        .list_audit_events(pb::ListAuditEventsRequest {
            scope: None,
            kinds: vec![],
            page_size: 0,
            page_token: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["scope"]);

    let known = Scope::RemediationRequestId("rr-known".into());
    for (kinds, field) in [
        (vec![0], "kinds[0]"),
        (vec![pb::AuditKind::Remediation as i32, 0], "kinds[1]"),
    ] {
        let status = q
            .list_audit_events(pb::ListAuditEventsRequest {
                scope: Some(known.clone()),
                kinds,
                page_size: 0,
                page_token: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(violated_fields(&status), [field]);
    }
    for malformed in ["not-a-uuid", "", "rr-known"] {
        let status = timeline_page(&mut q, Scope::IncidentId(malformed.into()), &[], 0, "")
            .await
            .unwrap_err();
        assert_eq!(violated_fields(&status), ["incident_id"], "{malformed:?}");
    }
    for unknown in [
        Scope::IncidentId(Uuid::new_v4().to_string()),
        Scope::RemediationRequestId("rr-unknown".into()),
    ] {
        let status = timeline_page(&mut q, unknown.clone(), &[], 0, "").await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "{unknown:?}: {status:?}");
    }
    let nothing = timeline_page(&mut q, Scope::CorrelationId("corr-nobody".into()), &[], 0, "")
        .await
        .expect("an unknown correlation id lists nothing");
    assert!(nothing.events.is_empty());
    assert_eq!(nothing.next_page_token, "");

    // A known incident with no events of the asked kinds lists nothing, too.
    let none = timeline_page(
        &mut q,
        Scope::IncidentId(receipt.incident_id.clone()),
        &[pb::AuditKind::Execution],
        0,
        "",
    )
    .await
    .expect("known incident");
    assert!(none.events.is_empty());
    let all = timeline_page(&mut q, Scope::IncidentId(receipt.incident_id), &[], 0, "")
        .await
        .unwrap();
    assert_eq!(event_ids(&all.events), [receipt.event_id]);
}

// ---------------------------------------------------------------- GetActionStats

struct Want {
    action_type: &'static str,
    total: i64,
    succeeded: i64,
    failed: i64,
    success_rate: f64,
    /// Mean, p50 and p95 in seconds; None when no event carries a duration.
    durations: Option<(f64, f64, f64)>,
}

fn seconds(d: &Option<Duration>) -> Option<f64> {
    d.as_ref().map(|d| d.seconds as f64 + d.nanos as f64 / 1e9)
}

fn assert_stats(got: &[pb::ActionStats], want: &[Want], context: &str) {
    assert_eq!(
        got.iter().map(|s| s.action_type.as_str()).collect::<Vec<_>>(),
        want.iter().map(|w| w.action_type).collect::<Vec<_>>(),
        "{context}: one entry per action type, ordered by action type"
    );
    for (g, w) in got.iter().zip(want) {
        let what = format!("{context}: {}", w.action_type);
        assert_eq!(g.total, w.total, "{what}: total");
        assert_eq!(g.succeeded, w.succeeded, "{what}: succeeded");
        assert_eq!(g.failed, w.failed, "{what}: failed");
        assert!(
            (g.success_rate - w.success_rate).abs() < 1e-9,
            "{what}: success_rate {} want {}",
            g.success_rate,
            w.success_rate
        );
        let got_durations = [
            seconds(&g.mean_duration),
            seconds(&g.p50_duration),
            seconds(&g.p95_duration),
        ];
        match w.durations {
            None => assert_eq!(got_durations, [None, None, None], "{what}: no durations"),
            Some((mean, p50, p95)) => {
                for (name, got, want) in [
                    ("mean", got_durations[0], mean),
                    ("p50", got_durations[1], p50),
                    ("p95", got_durations[2], p95),
                ] {
                    let got = got.unwrap_or_else(|| panic!("{what}: {name} is unset"));
                    // Percentiles come from duration buckets with 1% relative accuracy.
                    let tolerance = if name == "mean" { 0.001 } else { 0.001 + want * 0.01 };
                    assert!(
                        (got - want).abs() <= tolerance,
                        "{what}: {name} is {got}s, want {want}s"
                    );
                }
            }
        }
    }
}

#[tokio::test]
async fn action_stats_count_every_execution_of_the_matching_incidents() {
    use pb::ExecutionStatus::*;
    let app = spawn_app().await;
    let b = origin();
    let run = run_id();
    let prefix = format!("rr-{run}-");
    let (one, two, three) = (format!("{prefix}1"), format!("{prefix}2"), format!("{prefix}3"));
    let elsewhere = |e: pb::AuditEvent| pb::AuditEvent {
        namespace: "other".into(),
        ..e
    };
    let events = vec![
        event(
            &one,
            b,
            remediation("HighMemoryUsage", pb::Severity::Critical, pb::Phase::Processing),
        ),
        event(&one, b + 10, execution("restart-pod", Succeeded, millis(1_000))),
        event(&one, b + 20, execution("restart-pod", Succeeded, millis(2_000))),
        event(&one, b + 30, execution("scale", Failed, millis(10_000))),
        event(&one, b + 35, workflow("not-an-execution", Succeeded, millis(50_000))),
        event(&two, b + 10, execution("restart-pod", Failed, millis(3_000))),
        event(&two, b + 20, execution("restart-pod", Running, millis(4_000))),
        event(&two, b + 40, execution("rollback", Skipped, None)),
        elsewhere(event(
            &three,
            b + 10,
            execution("restart-pod", Succeeded, millis(100_000)),
        )),
        elsewhere(event(&three, b + 20, execution("restart-pod", Failed, None))),
        elsewhere(event(&three, b + 21, execution("drain", Succeeded, millis(100)))),
        elsewhere(event(&three, b + 22, execution("drain", Succeeded, millis(200)))),
        elsewhere(event(&three, b + 23, execution("drain", Succeeded, millis(300)))),
        elsewhere(event(&three, b + 24, execution("drain", Succeeded, millis(400)))),
        elsewhere(event(&three, b + 25, execution("drain", Succeeded, millis(500)))),
        elsewhere(event(&three, b + 26, execution("drain", Running, None))),
    ];
    write_batch(&app, &events).await;
    let mut q = app.incident_query_client().await;

    let payments = pb::IncidentFilter {
        namespace: "payments".into(),
        ..no_filter()
    };
    assert_stats(
        &action_stats(&mut q, payments).await.unwrap(),
        &[
            Want {
                action_type: "restart-pod",
                total: 4,
                succeeded: 2,
                failed: 1,
                success_rate: 2.0 / 3.0,
                durations: Some((2.5, 2.5, 3.85)),
            },
            Want {
                action_type: "rollback",
                total: 1,
                succeeded: 0,
                failed: 0,
                success_rate: 0.0,
                durations: None,
            },
            Want {
                action_type: "scale",
                total: 1,
                succeeded: 0,
                failed: 1,
                success_rate: 0.0,
                durations: Some((10.0, 10.0, 10.0)),
            },
        ],
        "namespace payments",
    );

    assert_stats(
        &action_stats(&mut q, no_filter()).await.unwrap(),
        &[
            Want {
                action_type: "drain",
                total: 6,
                succeeded: 5,
                failed: 0,
                success_rate: 1.0,
                durations: Some((0.3, 0.3, 0.48)),
            },
            Want {
                action_type: "restart-pod",
                total: 6,
                succeeded: 3,
                failed: 2,
                success_rate: 0.6,
                durations: Some((22.0, 3.0, 80.8)),
            },
            Want {
                action_type: "rollback",
                total: 1,
                succeeded: 0,
                failed: 0,
                success_rate: 0.0,
                durations: None,
            },
            Want {
                action_type: "scale",
                total: 1,
                succeeded: 0,
                failed: 1,
                success_rate: 0.0,
                durations: Some((10.0, 10.0, 10.0)),
            },
        ],
        "no filter",
    );

    // action_type picks incidents by their latest execution; the stats cover
    // all of those incidents' executions.
    let latest_rollback = pb::IncidentFilter {
        action_type: "rollback".into(),
        ..no_filter()
    };
    assert_stats(
        &action_stats(&mut q, latest_rollback).await.unwrap(),
        &[
            Want {
                action_type: "restart-pod",
                total: 2,
                succeeded: 0,
                failed: 1,
                success_rate: 0.0,
                durations: Some((3.5, 3.5, 3.95)),
            },
            Want {
                action_type: "rollback",
                total: 1,
                succeeded: 0,
                failed: 0,
                success_rate: 0.0,
                durations: None,
            },
        ],
        "latest action rollback",
    );

    let critical = pb::IncidentFilter {
        severities: vec![pb::Severity::Critical as i32],
        ..no_filter()
    };
    assert_stats(
        &action_stats(&mut q, critical).await.unwrap(),
        &[
            Want {
                action_type: "restart-pod",
                total: 2,
                succeeded: 2,
                failed: 0,
                success_rate: 1.0,
                durations: Some((1.5, 1.5, 1.95)),
            },
            Want {
                action_type: "scale",
                total: 1,
                succeeded: 0,
                failed: 1,
                success_rate: 0.0,
                durations: Some((10.0, 10.0, 10.0)),
            },
        ],
        "severity critical",
    );

    let nobody = pb::IncidentFilter {
        alert_name: "NoSuchAlert".into(),
        ..no_filter()
    };
    assert!(action_stats(&mut q, nobody).await.unwrap().is_empty());
    let until_before = pb::IncidentFilter {
        until: Some(at(b + 10)),
        ..no_filter()
    };
    assert!(action_stats(&mut q, until_before).await.unwrap().is_empty());
}

/// PostgreSQL text cannot hold a NUL byte, but a protobuf string can: such a
/// filter must be answered as the caller's mistake or as matching nothing,
/// never as an internal error.
#[tokio::test]
async fn a_nul_byte_in_a_string_filter_is_not_an_internal_error() {
    let app = spawn_app().await;
    write_batch(&app, &[event("rr-nul", origin(), custom("x"))]).await;
    let mut q = app.incident_query_client().await;
    let nul = "payments\0".to_owned();
    let filters = [
        (
            "filter.alert_name",
            pb::IncidentFilter {
                alert_name: nul.clone(),
                ..no_filter()
            },
        ),
        (
            "filter.action_type",
            pb::IncidentFilter {
                action_type: nul.clone(),
                ..no_filter()
            },
        ),
        (
            "filter.namespace",
            pb::IncidentFilter {
                namespace: nul.clone(),
                ..no_filter()
            },
        ),
        (
            "filter.cluster",
            pb::IncidentFilter {
                cluster: nul.clone(),
                ..no_filter()
            },
        ),
        (
            "filter.labels",
            pb::IncidentFilter {
                labels: [(nul.clone(), "x".to_owned())].into(),
                ..no_filter()
            },
        ),
        (
            "filter.labels",
            pb::IncidentFilter {
                labels: [("team".to_owned(), nul.clone())].into(),
                ..no_filter()
            },
        ),
    ];
    // OK and empty, or INVALID_ARGUMENT naming the field.
    let acceptable = |status: &Status, field: &str| {
        status.code() == Code::InvalidArgument && violated_fields(status).iter().all(|f| f.starts_with(field))
    };
    for (field, filter) in filters {
        match list_page(&mut q, &filter, "", 0, "").await {
            Ok(page) => assert!(page.incidents.is_empty(), "ListIncidents {field}"),
            Err(status) => assert!(acceptable(&status, field), "ListIncidents {field}: {status:?}"),
        }
        match action_stats(&mut q, filter).await {
            Ok(stats) => assert!(stats.is_empty(), "GetActionStats {field}"),
            Err(status) => assert!(acceptable(&status, field), "GetActionStats {field}: {status:?}"),
        }
    }
    let status = get_incident(&mut q, Key::RemediationRequestId(nul.clone()))
        .await
        .unwrap_err();
    assert!(
        status.code() == Code::NotFound || acceptable(&status, "remediation_request_id"),
        "GetIncident: {status:?}"
    );
    let status = timeline_page(&mut q, Scope::RemediationRequestId(nul.clone()), &[], 0, "")
        .await
        .unwrap_err();
    assert!(
        status.code() == Code::NotFound || acceptable(&status, "remediation_request_id"),
        "ListAuditEvents by remediation_request_id: {status:?}"
    );
    match timeline_page(&mut q, Scope::CorrelationId(nul.clone()), &[], 0, "").await {
        Ok(page) => assert!(page.events.is_empty()),
        Err(status) => assert!(
            acceptable(&status, "correlation_id"),
            "ListAuditEvents by correlation_id: {status:?}"
        ),
    }
}
