//! VectorSearch over the real server: "have we seen this before?" over the
//! events written through AuditWrite. Geometry tests write their own vectors
//! (WriteAuditRequest.embedding), so similarities are known exactly; the
//! text tests use the real local model (all-MiniLM-L6-v2).
use std::{
    collections::{HashMap, HashSet},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Instant,
};

use datastorage::proto::v1::{
    self as pb, audit_event::Payload, search_similar_request::Query, vector_search_client::VectorSearchClient,
};
use prost_types::Timestamp;
use tonic::{transport::Channel, Code, Status};

use crate::helpers::*;

type Search = VectorSearchClient<Channel>;

const DIMS: usize = 384;
const MODEL: &str = "all-MiniLM-L6-v2";

// ---------------------------------------------------------------- vectors

/// Σ weight · e_axis in the model's 384 dimensions: a caller vector whose
/// geometry the test knows.
fn vector(components: &[(usize, f32)]) -> Vec<f32> {
    let mut values = vec![0.0; DIMS];
    for &(axis, weight) in components {
        values[axis] += weight;
    }
    values
}

fn axis(i: usize) -> Vec<f32> {
    vector(&[(i, 1.0)])
}

/// A unit vector whose cosine similarity to e0 is `similarity`; `axis` (not
/// 0) carries the rest, so vectors built on different axes differ.
fn at_similarity(similarity: f32, axis: usize) -> Vec<f32> {
    assert_ne!(axis, 0);
    vector(&[(0, similarity), (axis, (1.0 - similarity * similarity).max(0.0).sqrt())])
}

// ---------------------------------------------------------------- events

/// Whole seconds three hours ago: each test's clock origin.
fn origin() -> i64 {
    (chrono::Utc::now() - chrono::TimeDelta::hours(3)).timestamp()
}

fn at(seconds: i64) -> Timestamp {
    Timestamp { seconds, nanos: 0 }
}

fn resource(kind: &str, name: &str, namespace: &str) -> Option<pb::ResourceRef> {
    Some(pb::ResourceRef {
        kind: kind.into(),
        name: name.into(),
        namespace: namespace.into(),
    })
}

/// An event of incident `rrid` in namespace `payments`, cluster `prod-eu-1`,
/// an hour ago, without labels.
fn event(rrid: &str, payload: Payload) -> pb::AuditEvent {
    pb::AuditEvent {
        correlation_id: format!("corr-{rrid}"),
        remediation_request_id: rrid.into(),
        occurred_at: Some(timestamp_ago(3600)),
        namespace: "payments".into(),
        cluster: "prod-eu-1".into(),
        labels: HashMap::new(),
        parent_event_id: String::new(),
        payload: Some(payload),
    }
}

fn custom(text: &str) -> Payload {
    Payload::Custom(pb::CustomAudit {
        event_type: "note".into(),
        action: String::new(),
        outcome: String::new(),
        data: None,
        text: text.into(),
    })
}

fn remediation(signal_name: &str, severity: pb::Severity, phase: pb::Phase, message: &str) -> Payload {
    Payload::Remediation(pb::RemediationAudit {
        signal_type: "prometheus-alert".into(),
        signal_name: signal_name.into(),
        severity: severity as i32,
        target: resource("Deployment", "api", "payments"),
        phase: phase as i32,
        message: message.into(),
        started_at: None,
        completed_at: None,
        priority: String::new(),
    })
}

fn analysis(root_cause: &str, recommended_action: &str) -> Payload {
    Payload::AiAnalysis(pb::AiAnalysisAudit {
        root_cause: root_cause.into(),
        recommended_action: recommended_action.into(),
        confidence: 0.8,
        reasoning: String::new(),
        model: String::new(),
    })
}

fn execution(action_type: &str, error_message: &str) -> Payload {
    Payload::Execution(pb::ExecutionAudit {
        action_type: action_type.into(),
        target: resource("Pod", "api-7d9f", "payments"),
        status: pb::ExecutionStatus::Succeeded as i32,
        duration: None,
        error_message: error_message.into(),
    })
}

/// A write that brings its own embedding (EMBEDDING_STATE_PROVIDED).
fn with_vector(event: pb::AuditEvent, values: Vec<f32>) -> pb::WriteAuditRequest {
    pb::WriteAuditRequest {
        event: Some(event),
        request_id: String::new(),
        embedding: Some(pb::Vector { values }),
    }
}

/// Writes in batches; the receipts in request order.
async fn write_all(app: &TestApp, requests: Vec<pb::WriteAuditRequest>) -> Vec<pb::WriteAuditResponse> {
    let mut client = app.audit_client().await;
    let mut receipts = Vec::new();
    for chunk in requests.chunks(500) {
        let replies = client
            .batch_write_audit(pb::BatchWriteAuditRequest {
                requests: chunk.to_vec(),
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

/// Writes `named` events, each with its own vector; their event ids by name.
async fn write_named(app: &TestApp, named: Vec<(&str, pb::AuditEvent, Vec<f32>)>) -> HashMap<String, String> {
    let names: Vec<String> = named.iter().map(|(n, _, _)| n.to_string()).collect();
    let requests = named.into_iter().map(|(_, e, v)| with_vector(e, v)).collect();
    let receipts = write_all(app, requests).await;
    for receipt in &receipts {
        assert_eq!(receipt.embedding_state(), pb::EmbeddingState::Provided);
    }
    names
        .into_iter()
        .zip(receipts.into_iter().map(|r| r.event_id))
        .collect()
}

// ---------------------------------------------------------------- queries

fn by_vector(values: Vec<f32>) -> pb::SearchSimilarRequest {
    pb::SearchSimilarRequest {
        query: Some(Query::Vector(pb::Vector { values })),
        ..Default::default()
    }
}

fn by_text(text: &str) -> pb::SearchSimilarRequest {
    pb::SearchSimilarRequest {
        query: Some(Query::Text(text.into())),
        ..Default::default()
    }
}

fn by_event(event_id: &str) -> pb::SearchSimilarRequest {
    pb::SearchSimilarRequest {
        query: Some(Query::EventId(event_id.into())),
        ..Default::default()
    }
}

async fn search(client: &mut Search, request: pb::SearchSimilarRequest) -> Result<pb::SearchSimilarResponse, Status> {
    client.search_similar(request).await.map(tonic::Response::into_inner)
}

/// The hits of a search that must succeed.
async fn hits(client: &mut Search, request: pb::SearchSimilarRequest) -> Vec<pb::SearchHit> {
    let what = format!("{request:?}");
    let response = search(client, request)
        .await
        .unwrap_or_else(|status| panic!("searching {what}: {status:?}"));
    assert_eq!(response.model, MODEL, "{what}");
    response.hits
}

/// Names of `hits`, given the event ids by name (unknown ids by their id).
fn named(hits: &[pb::SearchHit], ids: &HashMap<String, String>) -> Vec<String> {
    let names: HashMap<&str, &str> = ids.iter().map(|(n, id)| (id.as_str(), n.as_str())).collect();
    hits.iter()
        .map(|h| {
            names
                .get(h.event_id.as_str())
                .copied()
                .unwrap_or(&h.event_id)
                .to_owned()
        })
        .collect()
}

fn assert_ordered(hits: &[pb::SearchHit], what: &str) {
    for pair in hits.windows(2) {
        assert!(
            pair[0].similarity >= pair[1].similarity,
            "{what}: hits not ordered by similarity: {} before {}",
            pair[0].similarity,
            pair[1].similarity
        );
    }
    for hit in hits {
        assert!(
            (-1.0..=1.0).contains(&hit.similarity),
            "{what}: similarity {}",
            hit.similarity
        );
    }
}

fn assert_close(actual: f32, expected: f32, what: &str) {
    assert!(
        (actual - expected).abs() < 1e-4,
        "{what}: similarity {actual}, expected {expected}"
    );
}

fn stored(hit: &pb::SearchHit) -> &pb::AuditEvent {
    hit.event
        .as_ref()
        .and_then(|s| s.event.as_ref())
        .expect("hit carries its event")
}

// ---------------------------------------------------------------- basics

#[tokio::test]
async fn a_text_query_finds_the_event_that_says_the_same_and_returns_everything_stored_about_it() {
    let app = spawn_app().await;
    let mut audit = app.audit_client().await;
    let oom = remediation_event("rr-oom");
    let dns = event(
        "rr-dns",
        analysis(
            "CoreDNS could not resolve the database hostname after the resolver config change",
            "rollback_config",
        ),
    );
    let restart = event(
        "rr-restart",
        execution("restart_pod", "readiness probe failed after restart"),
    );
    let mut receipts = Vec::new();
    for e in [&oom, &dns, &restart] {
        receipts.push(audit.write_audit(write(e.clone())).await.unwrap().into_inner());
    }
    let mut client = app.search_client().await;

    let found = hits(
        &mut client,
        by_text("container api OOMKilled: memory limit 512Mi exceeded"),
    )
    .await;
    assert_eq!(
        found.len(),
        3,
        "all three events are embedded and within the default top_k"
    );
    assert_ordered(&found, "text query");
    let best = &found[0];
    assert_eq!(
        best.event_id, receipts[0].event_id,
        "the OOM event comes first: {found:?}"
    );
    assert_eq!(best.incident_id, receipts[0].incident_id);
    assert!(best.similarity > 0.7, "near-identical text: {}", best.similarity);
    assert!(
        best.similarity > found[1].similarity + 0.2,
        "unrelated events are clearly less similar: {found:?}"
    );
    let stored_event = best.event.as_ref().expect("the hit carries the stored event");
    assert_eq!(stored_event.event_id, receipts[0].event_id);
    assert_eq!(stored_event.incident_id, receipts[0].incident_id);
    assert_eq!(stored_event.event.as_ref(), Some(&oom), "the event exactly as written");
    assert_eq!(stored_event.embedding_state(), pb::EmbeddingState::Generated);
    assert!(stored_event.received_at.is_some());
    // Every hit names its own event and incident.
    let by_id: HashMap<&str, (&pb::WriteAuditResponse, &pb::AuditEvent)> = receipts
        .iter()
        .zip([&oom, &dns, &restart])
        .map(|(r, e)| (r.event_id.as_str(), (r, e)))
        .collect();
    for hit in &found {
        let (receipt, written) = by_id[hit.event_id.as_str()];
        assert_eq!(hit.incident_id, receipt.incident_id);
        let s = hit.event.as_ref().unwrap();
        assert_eq!(
            (s.event_id.as_str(), s.incident_id.as_str()),
            (hit.event_id.as_str(), hit.incident_id.as_str())
        );
        assert_eq!(s.event.as_ref(), Some(written));
    }

    // The active model may be named, or left out: the same answer.
    for model in ["", MODEL] {
        let again = hits(
            &mut client,
            pb::SearchSimilarRequest {
                model: model.into(),
                ..by_text("container api OOMKilled: memory limit 512Mi exceeded")
            },
        )
        .await;
        let ids = |h: &[pb::SearchHit]| h.iter().map(|h| h.event_id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&again), ids(&found), "model {model:?}");
    }
}

/// The reference geometry around the query 2·e0 (not a unit vector: cosine
/// similarity ignores length), best first.
fn reference_events() -> Vec<(&'static str, pb::AuditEvent, Vec<f32>, f32)> {
    let e = |name: &str| event(&format!("rr-{name}"), custom(&format!("event {name}")));
    vec![
        ("same", e("same"), axis(0), 1.0),
        (
            "diagonal",
            e("diagonal"),
            vector(&[(0, 1.0), (1, 1.0)]),
            std::f32::consts::FRAC_1_SQRT_2,
        ),
        ("longer", e("longer"), vector(&[(0, 3.0), (1, 4.0)]), 0.6),
        ("orthogonal", e("orthogonal"), axis(1), 0.0),
        ("leaning away", e("leaning-away"), vector(&[(0, -0.6), (2, 0.8)]), -0.6),
        ("opposite", e("opposite"), vector(&[(0, -1.0)]), -1.0),
    ]
}

async fn write_reference(app: &TestApp) -> (HashMap<String, String>, HashMap<String, f32>) {
    let events = reference_events();
    let expected = events.iter().map(|(n, _, _, s)| (n.to_string(), *s)).collect();
    let ids = write_named(app, events.into_iter().map(|(n, e, v, _)| (n, e, v)).collect()).await;
    (ids, expected)
}

#[tokio::test]
async fn a_vector_query_scores_each_event_by_its_exact_cosine_similarity_best_first() {
    let app = spawn_app().await;
    let (ids, expected) = write_reference(&app).await;
    let mut client = app.search_client().await;
    let found = hits(&mut client, by_vector(vector(&[(0, 2.0)]))).await;
    assert_eq!(
        named(&found, &ids),
        ["same", "diagonal", "longer", "orthogonal", "leaning away", "opposite"]
    );
    for (hit, name) in found.iter().zip(named(&found, &ids)) {
        assert_close(hit.similarity, expected[&name], &name);
    }
}

#[tokio::test]
async fn min_similarity_drops_every_hit_below_it() {
    let app = spawn_app().await;
    let (ids, _) = write_reference(&app).await;
    let mut client = app.search_client().await;
    let cases: [(f32, &[&str]); 6] = [
        (0.5, &["same", "diagonal", "longer"]),
        (0.65, &["same", "diagonal"]),
        // The boundary is kept: e0 and e1 are exactly orthogonal.
        (0.0, &["same", "diagonal", "longer", "orthogonal"]),
        (-0.7, &["same", "diagonal", "longer", "orthogonal", "leaning away"]),
        (
            -1.0,
            &["same", "diagonal", "longer", "orthogonal", "leaning away", "opposite"],
        ),
        (1.0, &["same"]),
    ];
    for (min, expected) in cases {
        let found = hits(
            &mut client,
            pb::SearchSimilarRequest {
                min_similarity: Some(min),
                ..by_vector(axis(0))
            },
        )
        .await;
        assert_eq!(named(&found, &ids), expected, "min_similarity {min}");
    }
    // Without a threshold, the least similar events are hits too.
    let found = hits(&mut client, by_vector(axis(0))).await;
    assert_eq!(found.len(), 6);
}

#[tokio::test]
async fn a_threshold_no_event_meets_answers_promptly_with_no_hits() {
    let app = spawn_app().await;
    // 400 events, none closer than 0.5 to e0.
    let requests = (0..400)
        .map(|i| {
            with_vector(
                event(&format!("rr-far-{i}"), custom("far away")),
                on_arc(0.5 * (i as f32) / 400.0, 0.015 * i as f32),
            )
        })
        .collect();
    write_all(&app, requests).await;
    let mut client = app.search_client().await;
    for (min, top_k, group_by_incident) in [(0.9, 10, false), (0.9, 100, true), (0.51, 100, false)] {
        let started = Instant::now();
        let response = search(
            &mut client,
            pb::SearchSimilarRequest {
                min_similarity: Some(min),
                top_k,
                group_by_incident,
                ..by_vector(axis(0))
            },
        )
        .await
        .expect("an unmet threshold is not an error");
        assert!(response.hits.is_empty(), "min {min}: {:?}", response.hits.len());
        assert!(
            started.elapsed().as_secs_f64() < 5.0,
            "min {min}: took {:?}",
            started.elapsed()
        );
    }
    // The same events are found below the threshold.
    let found = hits(
        &mut client,
        pb::SearchSimilarRequest {
            min_similarity: Some(0.449),
            top_k: 100,
            ..by_vector(axis(0))
        },
    )
    .await;
    assert_eq!(found.len(), 40, "similarities 0.45..0.49875, step 0.00125");
}

#[tokio::test]
async fn top_k_defaults_to_ten_and_bounds_the_number_of_hits() {
    let app = spawn_app().await;
    // Event i has similarity 1/sqrt(1 + (0.1·i)²) to e0: strictly decreasing.
    let named_events: Vec<(String, pb::AuditEvent, Vec<f32>)> = (0..15)
        .map(|i| {
            (
                format!("e{i:02}"),
                event(&format!("rr-{i}"), custom("ranked")),
                vector(&[(0, 1.0), (1 + i, 0.1 * i as f32)]),
            )
        })
        .collect();
    let ids = write_named(
        &app,
        named_events
            .iter()
            .map(|(n, e, v)| (n.as_str(), e.clone(), v.clone()))
            .collect(),
    )
    .await;
    let all: Vec<String> = (0..15).map(|i| format!("e{i:02}")).collect();
    let mut client = app.search_client().await;
    for (top_k, expected) in [(0, 10), (1, 1), (3, 3), (10, 10), (14, 14), (15, 15), (100, 15)] {
        let found = hits(
            &mut client,
            pb::SearchSimilarRequest {
                top_k,
                ..by_vector(axis(0))
            },
        )
        .await;
        assert_eq!(named(&found, &ids), all[..expected], "top_k {top_k}");
        for (hit, i) in found.iter().zip(0..) {
            assert_close(
                hit.similarity,
                1.0 / (1.0 + (0.1 * i as f32).powi(2)).sqrt(),
                &format!("e{i}"),
            );
        }
    }
}

// ---------------------------------------------------------------- validation

#[tokio::test]
async fn malformed_requests_are_rejected_naming_the_offending_field() {
    let app = spawn_app().await;
    write_reference(&app).await;
    let mut client = app.search_client().await;
    let valid = || by_vector(axis(0));
    let nan_at_7 = {
        let mut v = axis(0);
        v[7] = f32::NAN;
        v
    };
    let inf_at_0 = {
        let mut v = axis(1);
        v[0] = f32::INFINITY;
        v
    };
    let neg_inf_at_383 = {
        let mut v = axis(0);
        v[383] = f32::NEG_INFINITY;
        v
    };
    let b = origin();
    // (request, the field; for a non-finite value, its index may be named too)
    let cases: Vec<(pb::SearchSimilarRequest, &str, Option<usize>)> = vec![
        (pb::SearchSimilarRequest { query: None, ..valid() }, "query", None),
        (by_vector(vec![0.5; 383]), "vector.values", None),
        (by_vector(vec![0.5; 385]), "vector.values", None),
        (by_vector(vec![]), "vector.values", None),
        (by_vector(vec![0.0; DIMS]), "vector.values", None),
        (by_vector(nan_at_7), "vector.values", Some(7)),
        (by_vector(inf_at_0), "vector.values", Some(0)),
        (by_vector(neg_inf_at_383), "vector.values", Some(383)),
        (by_text(""), "text", None),
        (by_text("  \n\t "), "text", None),
        (by_text(&"disk full ".repeat(2048)), "text", None),
        (by_event("not-a-uuid"), "event_id", None),
        (by_event(""), "event_id", None),
        (pb::SearchSimilarRequest { top_k: 101, ..valid() }, "top_k", None),
        (pb::SearchSimilarRequest { top_k: -1, ..valid() }, "top_k", None),
        (
            pb::SearchSimilarRequest {
                top_k: i32::MIN,
                ..valid()
            },
            "top_k",
            None,
        ),
        (
            pb::SearchSimilarRequest {
                min_similarity: Some(1.5),
                ..valid()
            },
            "min_similarity",
            None,
        ),
        (
            pb::SearchSimilarRequest {
                min_similarity: Some(-1.01),
                ..valid()
            },
            "min_similarity",
            None,
        ),
        (
            pb::SearchSimilarRequest {
                min_similarity: Some(f32::NAN),
                ..valid()
            },
            "min_similarity",
            None,
        ),
        (
            pb::SearchSimilarRequest {
                min_similarity: Some(f32::INFINITY),
                ..valid()
            },
            "min_similarity",
            None,
        ),
        (
            pb::SearchSimilarRequest {
                kinds: vec![0],
                ..valid()
            },
            "kinds[0]",
            None,
        ),
        (
            pb::SearchSimilarRequest {
                kinds: vec![pb::AuditKind::Remediation as i32, 0],
                ..valid()
            },
            "kinds[1]",
            None,
        ),
        (
            pb::SearchSimilarRequest {
                filter: Some(pb::IncidentFilter {
                    severities: vec![0],
                    ..Default::default()
                }),
                ..valid()
            },
            "filter.severities[0]",
            None,
        ),
        (
            pb::SearchSimilarRequest {
                filter: Some(pb::IncidentFilter {
                    phases: vec![pb::Phase::Failed as i32, 0],
                    ..Default::default()
                }),
                ..valid()
            },
            "filter.phases[1]",
            None,
        ),
        (
            pb::SearchSimilarRequest {
                filter: Some(pb::IncidentFilter {
                    since: Some(at(b)),
                    until: Some(at(b)),
                    ..Default::default()
                }),
                ..valid()
            },
            "filter.until",
            None,
        ),
        (
            pb::SearchSimilarRequest {
                filter: Some(pb::IncidentFilter {
                    since: Some(at(b)),
                    until: Some(at(b - 60)),
                    ..Default::default()
                }),
                ..valid()
            },
            "filter.until",
            None,
        ),
        (
            pb::SearchSimilarRequest {
                model: "text-embedding-3-small".into(),
                ..valid()
            },
            "model",
            None,
        ),
        (
            pb::SearchSimilarRequest {
                model: "text-embedding-3-small".into(),
                ..by_text("disk full")
            },
            "model",
            None,
        ),
        (
            pb::SearchSimilarRequest {
                mode: pb::SearchMode::Hybrid as i32,
                ..valid()
            },
            "mode",
            None,
        ),
        (pb::SearchSimilarRequest { mode: 7, ..valid() }, "mode", None),
    ];
    for (request, field, index) in cases {
        let what = format!("{request:?}");
        let what = &what[..what.len().min(300)];
        let status = search(&mut client, request)
            .await
            .expect_err(&format!("{what} is rejected"));
        let fields = violated_fields(&status);
        match index {
            None => assert_eq!(fields, [field], "{what}"),
            // Writes name the index (embedding.values[7]); either is precise.
            Some(i) => assert!(
                fields == [field.to_owned()] || fields == [format!("{field}[{i}]")],
                "{what}: {fields:?}"
            ),
        }
    }

    // A zero vector cannot be written either: it has no direction to compare.
    let status = app
        .audit_client()
        .await
        .write_audit(with_vector(event("rr-zero", custom("zero")), vec![0.0; DIMS]))
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["embedding.values"]);
}

// ---------------------------------------------------------------- event_id

#[tokio::test]
async fn an_event_id_query_finds_events_like_that_event_but_never_the_event_itself() {
    let app = spawn_app().await;
    let e = |name: &str| event(&format!("rr-{name}"), custom(&format!("event {name}")));
    let ids = write_named(
        &app,
        vec![
            ("query", e("query"), axis(0)),
            ("twin", e("twin"), axis(0)),
            ("related", e("related"), vector(&[(0, 0.6), (1, 0.8)])),
            ("unrelated", e("unrelated"), axis(1)),
        ],
    )
    .await;
    let mut client = app.search_client().await;
    let found = hits(&mut client, by_event(&ids["query"])).await;
    assert_eq!(named(&found, &ids), ["twin", "related", "unrelated"]);
    for (hit, expected) in found.iter().zip([1.0, 0.6, 0.0]) {
        assert_close(hit.similarity, expected, &hit.event_id);
    }
    // The twin's own search finds the original instead.
    let found = hits(&mut client, by_event(&ids["twin"])).await;
    assert_eq!(named(&found, &ids), ["query", "related", "unrelated"]);
    // Excluding the event does not cost a hit.
    let found = hits(
        &mut client,
        pb::SearchSimilarRequest {
            top_k: 2,
            ..by_event(&ids["query"])
        },
    )
    .await;
    assert_eq!(named(&found, &ids), ["twin", "related"]);
}

#[tokio::test]
async fn an_unknown_event_is_not_found_and_an_event_without_embedding_cannot_be_a_query() {
    let app = spawn_app().await;
    write_reference(&app).await;
    let no_text = app
        .audit_client()
        .await
        .write_audit(write(event("rr-silent", custom(""))))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(no_text.embedding_state(), pb::EmbeddingState::Unspecified);
    let mut client = app.search_client().await;

    let status = search(&mut client, by_event(&uuid::Uuid::new_v4().to_string()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let status = search(&mut client, by_event(&no_text.event_id)).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    // The event without embedding is never a hit either.
    let found = hits(
        &mut client,
        pb::SearchSimilarRequest {
            top_k: 100,
            ..by_vector(axis(0))
        },
    )
    .await;
    assert_eq!(found.len(), 6);
    assert!(found.iter().all(|h| h.event_id != no_text.event_id));
}

// ---------------------------------------------------------------- filters

/// Three incidents that differ in every filterable field; every event close
/// to e0. Incident a: HighMemoryUsage, critical, processing, payments,
/// prod-eu-1, team=checkout, restart_pod, last event at b-3500. Incident b:
/// DiskPressure, warning, completed, storage, prod-us-1, team=infra,
/// scale_deployment, last event at b-7100. Incident c: HighMemoryUsage, info,
/// failed, payments, prod-us-1, team=checkout tier=web, no execution, last
/// event at b-30.
async fn write_filter_incidents(app: &TestApp, b: i64) -> HashMap<String, String> {
    let ev = |rrid: &str, ns: &str, cluster: &str, labels: &[(&str, &str)], occurred_at: i64, payload: Payload| {
        pb::AuditEvent {
            namespace: ns.into(),
            cluster: cluster.into(),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            occurred_at: Some(at(occurred_at)),
            ..event(rrid, payload)
        }
    };
    let a = [("team", "checkout")];
    let bl = [("team", "infra")];
    let c = [("team", "checkout"), ("tier", "web")];
    use pb::{Phase, Severity};
    write_named(
        app,
        vec![
            (
                "a-rem",
                ev(
                    "rr-a",
                    "payments",
                    "prod-eu-1",
                    &a,
                    b - 3600,
                    remediation("HighMemoryUsage", Severity::Critical, Phase::Processing, "memory high"),
                ),
                at_similarity(0.95, 1),
            ),
            (
                "a-exec",
                ev(
                    "rr-a",
                    "payments",
                    "prod-eu-1",
                    &a,
                    b - 3500,
                    execution("restart_pod", ""),
                ),
                at_similarity(0.9, 2),
            ),
            (
                "b-rem",
                ev(
                    "rr-b",
                    "storage",
                    "prod-us-1",
                    &bl,
                    b - 7200,
                    remediation("DiskPressure", Severity::Warning, Phase::Completed, "disk full"),
                ),
                at_similarity(0.85, 3),
            ),
            (
                "b-exec",
                ev(
                    "rr-b",
                    "storage",
                    "prod-us-1",
                    &bl,
                    b - 7100,
                    execution("scale_deployment", ""),
                ),
                at_similarity(0.8, 4),
            ),
            (
                "c-rem",
                ev(
                    "rr-c",
                    "payments",
                    "prod-us-1",
                    &c,
                    b - 60,
                    remediation("HighMemoryUsage", Severity::Info, Phase::Failed, "memory high again"),
                ),
                at_similarity(0.75, 5),
            ),
            (
                "c-ai",
                ev(
                    "rr-c",
                    "payments",
                    "prod-us-1",
                    &c,
                    b - 30,
                    analysis("a leak in the cache", "restart_pod"),
                ),
                at_similarity(0.7, 6),
            ),
        ],
    )
    .await
}

fn filtered(filter: pb::IncidentFilter, kinds: &[pb::AuditKind]) -> pb::SearchSimilarRequest {
    pb::SearchSimilarRequest {
        filter: Some(filter),
        kinds: kinds.iter().map(|k| *k as i32).collect(),
        top_k: 100,
        ..by_vector(axis(0))
    }
}

#[tokio::test]
async fn every_incident_filter_field_and_kinds_restrict_the_hits() {
    let app = spawn_app().await;
    let b = origin();
    let ids = write_filter_incidents(&app, b).await;
    let f = pb::IncidentFilter::default;
    let labels = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    use pb::{AuditKind as K, Phase, Severity};
    let a = ["a-rem", "a-exec"];
    let bb = ["b-rem", "b-exec"];
    let c = ["c-rem", "c-ai"];
    let cases: Vec<(pb::IncidentFilter, Vec<K>, Vec<&str>)> = vec![
        (f(), vec![], [a, bb, c].concat()),
        (
            pb::IncidentFilter {
                alert_name: "HighMemoryUsage".into(),
                ..f()
            },
            vec![],
            [a, c].concat(),
        ),
        (
            pb::IncidentFilter {
                severities: vec![Severity::Critical as i32, Severity::Warning as i32],
                ..f()
            },
            vec![],
            [a, bb].concat(),
        ),
        (
            pb::IncidentFilter {
                severities: vec![Severity::Info as i32],
                ..f()
            },
            vec![],
            c.to_vec(),
        ),
        (
            pb::IncidentFilter {
                action_type: "restart_pod".into(),
                ..f()
            },
            vec![],
            a.to_vec(),
        ),
        (
            pb::IncidentFilter {
                namespace: "storage".into(),
                ..f()
            },
            vec![],
            bb.to_vec(),
        ),
        (
            pb::IncidentFilter {
                cluster: "prod-us-1".into(),
                ..f()
            },
            vec![],
            [bb, c].concat(),
        ),
        (
            pb::IncidentFilter {
                phases: vec![Phase::Failed as i32],
                ..f()
            },
            vec![],
            c.to_vec(),
        ),
        (
            pb::IncidentFilter {
                phases: vec![Phase::Processing as i32, Phase::Completed as i32],
                ..f()
            },
            vec![],
            [a, bb].concat(),
        ),
        // since is inclusive, until exclusive, both on the incident's last event.
        (
            pb::IncidentFilter {
                since: Some(at(b - 3500)),
                ..f()
            },
            vec![],
            [a, c].concat(),
        ),
        (
            pb::IncidentFilter {
                until: Some(at(b - 3500)),
                ..f()
            },
            vec![],
            bb.to_vec(),
        ),
        (
            pb::IncidentFilter {
                since: Some(at(b - 7100)),
                until: Some(at(b - 30)),
                ..f()
            },
            vec![],
            [a, bb].concat(),
        ),
        (
            pb::IncidentFilter {
                labels: labels(&[("team", "checkout")]),
                ..f()
            },
            vec![],
            [a, c].concat(),
        ),
        (
            pb::IncidentFilter {
                labels: labels(&[("team", "checkout"), ("tier", "web")]),
                ..f()
            },
            vec![],
            c.to_vec(),
        ),
        (
            pb::IncidentFilter {
                alert_name: "HighMemoryUsage".into(),
                cluster: "prod-eu-1".into(),
                ..f()
            },
            vec![],
            a.to_vec(),
        ),
        (
            pb::IncidentFilter {
                namespace: "nowhere".into(),
                ..f()
            },
            vec![],
            vec![],
        ),
        (f(), vec![K::Execution], vec!["a-exec", "b-exec"]),
        (
            f(),
            vec![K::Remediation, K::AiAnalysis],
            vec!["a-rem", "b-rem", "c-rem", "c-ai"],
        ),
        (f(), vec![K::Workflow], vec![]),
        (
            pb::IncidentFilter {
                namespace: "payments".into(),
                ..f()
            },
            vec![K::Execution],
            vec!["a-exec"],
        ),
    ];
    let mut client = app.search_client().await;
    for (filter, kinds, expected) in cases {
        let what = format!("{filter:?} kinds {kinds:?}");
        let found = hits(&mut client, filtered(filter, &kinds)).await;
        assert_ordered(&found, &what);
        // The events are written best first, so the expected order is theirs.
        assert_eq!(named(&found, &ids), expected, "{what}");
    }
}

/// 200 events that are closer to the query than any of the 12 that match
/// the filter: the search must look past them, not filter its top 10.
async fn a_selective_filter_still_fills_top_k(app: &TestApp) {
    let mut requests: Vec<pb::WriteAuditRequest> = (0..200)
        .map(|i| {
            let e = pb::AuditEvent {
                namespace: "noise".into(),
                labels: [("team".to_owned(), "noise".to_owned())].into(),
                ..event(&format!("rr-noise-{i}"), custom("noise"))
            };
            with_vector(e, on_arc(0.99 - 0.0001 * i as f32, 0.01 * i as f32))
        })
        .collect();
    // Matching: similarities 0.5, 0.49, ... 0.39, each its own incident.
    let matching: Vec<pb::AuditEvent> = (0..12)
        .map(|i| pb::AuditEvent {
            namespace: "target".into(),
            labels: [("team".to_owned(), "target".to_owned())].into(),
            ..event(
                &format!("rr-match-{i}"),
                remediation("HighMemoryUsage", pb::Severity::Warning, pb::Phase::Pending, "match"),
            )
        })
        .collect();
    requests.extend(
        matching
            .iter()
            .enumerate()
            .map(|(i, e)| with_vector(e.clone(), on_arc(0.5 - 0.01 * i as f32, 3.5 + 0.1 * i as f32))),
    );
    let receipts = write_all(app, requests).await;
    let expected: Vec<&str> = receipts[200..210].iter().map(|r| r.event_id.as_str()).collect();
    let mut client = app.search_client().await;
    let f = pb::IncidentFilter::default;
    let requests = [
        filtered(
            pb::IncidentFilter {
                namespace: "target".into(),
                ..f()
            },
            &[],
        ),
        filtered(
            pb::IncidentFilter {
                labels: [("team".into(), "target".into())].into(),
                ..f()
            },
            &[],
        ),
        filtered(
            pb::IncidentFilter {
                severities: vec![pb::Severity::Warning as i32],
                ..f()
            },
            &[],
        ),
        filtered(f(), &[pb::AuditKind::Remediation]),
    ];
    for request in requests {
        let request = pb::SearchSimilarRequest { top_k: 10, ..request };
        let what = format!("{:?} kinds {:?}", request.filter, request.kinds);
        let found = hits(&mut client, request.clone()).await;
        let ids: Vec<&str> = found.iter().map(|h| h.event_id.as_str()).collect();
        assert_eq!(ids, expected, "{what}");
        for (hit, i) in found.iter().zip(0..) {
            assert_close(hit.similarity, 0.5 - 0.01 * i as f32, &what);
            assert_eq!(stored(hit).namespace, "target", "{what}");
        }
        // With grouping as well: every match is its own incident.
        let found = hits(
            &mut client,
            pb::SearchSimilarRequest {
                group_by_incident: true,
                ..request
            },
        )
        .await;
        let ids: Vec<&str> = found.iter().map(|h| h.event_id.as_str()).collect();
        assert_eq!(ids, expected, "{what}, grouped");
    }
}

#[tokio::test]
async fn a_selective_filter_still_fills_top_k_with_events_that_match_it() {
    a_selective_filter_still_fills_top_k(&spawn_app().await).await;
}

/// The same, when the filtered search walks the vector index rather than
/// comparing the few matching events one by one.
#[tokio::test]
async fn a_selective_filter_still_fills_top_k_when_searching_the_index() {
    let app = spawn_app_with(|s| s.search.exact_scan_threshold = 0, local_model()).await;
    a_selective_filter_still_fills_top_k(&app).await;
}

// ---------------------------------------------------------------- grouping

/// A unit vector with cosine similarity `similarity` to e0 whose remainder
/// points at `angle` (radians) in the e1/e2 plane: families of such vectors
/// are close to each other in an orderly way, as near-duplicate texts are.
fn on_arc(similarity: f32, angle: f32) -> Vec<f32> {
    let rest = (1.0 - similarity * similarity).max(0.0).sqrt();
    vector(&[(0, similarity), (1, rest * angle.cos()), (2, rest * angle.sin())])
}

#[tokio::test]
async fn grouping_by_incident_returns_the_best_hit_of_each_of_top_k_distinct_incidents() {
    let app = spawn_app().await;
    let mut named_events: Vec<(String, pb::AuditEvent, Vec<f32>)> = Vec::new();
    // Three hot incidents, twenty near-identical events each (0.99..0.931);
    // the best of each is its event 7 (0.995, 0.994, 0.993).
    for (n, hot) in ["hot-a", "hot-b", "hot-c"].into_iter().enumerate() {
        for j in 0..20 {
            let similarity = if j == 7 {
                0.995 - 0.001 * n as f32
            } else {
                0.99 - 0.001 * (j + 20 * n) as f32
            };
            named_events.push((
                format!("{hot}-{j}"),
                event(&format!("rr-{hot}"), custom(&format!("{hot} again"))),
                on_arc(similarity, n as f32 + 0.01 * j as f32),
            ));
        }
    }
    // Ten other incidents, one event each, 0.9..0.81.
    for i in 0..10 {
        named_events.push((
            format!("other-{i}"),
            event(&format!("rr-other-{i}"), custom("other")),
            on_arc(0.9 - 0.01 * i as f32, 3.0 + 0.3 * i as f32),
        ));
    }
    let ids = write_named(
        &app,
        named_events
            .iter()
            .map(|(n, e, v)| (n.as_str(), e.clone(), v.clone()))
            .collect(),
    )
    .await;
    let mut client = app.search_client().await;

    let found = hits(
        &mut client,
        pb::SearchSimilarRequest {
            top_k: 5,
            group_by_incident: true,
            ..by_vector(axis(0))
        },
    )
    .await;
    assert_eq!(
        named(&found, &ids),
        ["hot-a-7", "hot-b-7", "hot-c-7", "other-0", "other-1"]
    );
    let incidents: HashSet<&str> = found.iter().map(|h| h.incident_id.as_str()).collect();
    assert_eq!(incidents.len(), 5, "distinct incidents");
    assert_ordered(&found, "grouped");

    // Every incident, once each, when top_k allows.
    let found = hits(
        &mut client,
        pb::SearchSimilarRequest {
            top_k: 100,
            group_by_incident: true,
            ..by_vector(axis(0))
        },
    )
    .await;
    assert_eq!(found.len(), 13, "{:?}", named(&found, &ids));
    assert_eq!(
        found
            .iter()
            .map(|h| h.incident_id.as_str())
            .collect::<HashSet<_>>()
            .len(),
        13
    );

    // Without grouping, the hot incidents fill the page.
    let found = hits(
        &mut client,
        pb::SearchSimilarRequest {
            top_k: 5,
            ..by_vector(axis(0))
        },
    )
    .await;
    assert_eq!(
        named(&found, &ids),
        ["hot-a-7", "hot-b-7", "hot-c-7", "hot-a-0", "hot-a-1"]
    );
}

/// The same alert firing again and again: texts that differ only in pod
/// names and times embed to near-identical vectors (real model). Each of
/// them must still be findable, and grouping must still reach the other
/// incidents behind them.
#[tokio::test]
async fn repeated_near_identical_alerts_are_all_found_and_grouping_reaches_past_them() {
    let app = spawn_app().await;
    let mut requests = Vec::new();
    for (n, rrid) in ["rr-oom-a", "rr-oom-b", "rr-oom-c"].into_iter().enumerate() {
        for j in 0..8 {
            let pod = format!("checkout-{:x}{:04x}", 7 + n, (j * 7919 + n * 104_729) % 65_536);
            requests.push(write(event(
                rrid,
                custom(&format!(
                    "pod {pod} OOMKilled at 0{}:{:02}:{:02}: memory limit 512Mi exceeded",
                    n + 1,
                    (j * 7) % 60,
                    (j * 13) % 60
                )),
            )));
        }
    }
    let others = [
        "the JVM heap of the orders service kept growing until it ran out of memory",
        "billing worker exhausted its RAM while resizing images",
        "cart service memory usage climbed past its limit and the kernel killed it",
        "node worker-3 ran out of memory and evicted several pods",
        "a cache leak made the session store use far more memory than allowed",
        "the payments API process consumed all available memory",
        "recommendation model server was OOM killed during a traffic spike",
        "out of memory error in the reporting job after the 2.3 rollout",
    ];
    for (i, text) in others.iter().enumerate() {
        requests.push(write(event(&format!("rr-other-{i}"), custom(text))));
    }
    let receipts = write_all(&app, requests).await;
    let hot: HashSet<&str> = receipts[..24].iter().map(|r| r.incident_id.as_str()).collect();
    assert_eq!(hot.len(), 3);
    let mut client = app.search_client().await;
    let query = "pod checkout-7 OOMKilled: memory limit 512Mi exceeded";

    // Every event, when top_k asks for more than there are.
    let found = hits(
        &mut client,
        pb::SearchSimilarRequest {
            top_k: 100,
            ..by_text(query)
        },
    )
    .await;
    assert_ordered(&found, "ungrouped");
    assert_eq!(found.len(), 32, "every embedded event is a hit");
    let top: HashSet<&str> = found[..24].iter().map(|h| h.incident_id.as_str()).collect();
    assert_eq!(top, hot, "the repeated alert is nearer the query than the others");

    let grouped = hits(
        &mut client,
        pb::SearchSimilarRequest {
            top_k: 5,
            group_by_incident: true,
            ..by_text(query)
        },
    )
    .await;
    let incidents: Vec<&str> = grouped.iter().map(|h| h.incident_id.as_str()).collect();
    assert_eq!(
        incidents.iter().collect::<HashSet<_>>().len(),
        5,
        "five distinct incidents: {incidents:?}"
    );
    // The best hit of each incident, in the order of the ungrouped ranking.
    let mut seen = HashSet::new();
    let best: Vec<&str> = found
        .iter()
        .filter(|h| seen.insert(h.incident_id.as_str()))
        .map(|h| h.event_id.as_str())
        .take(5)
        .collect();
    assert_eq!(grouped.iter().map(|h| h.event_id.as_str()).collect::<Vec<_>>(), best);
}

// ---------------------------------------------------------------- months

#[tokio::test]
async fn events_of_different_months_are_searched_together_and_ranked_globally() {
    let app = spawn_app().await;
    let day = 86_400;
    let now = origin();
    // (days ago, similarity to e0)
    let spread = [(2, 0.2), (33, 0.9), (64, 0.5), (95, 1.0), (126, 0.7)];
    let ids = write_named(
        &app,
        spread
            .iter()
            .enumerate()
            .map(|(i, &(days, similarity))| {
                let name: &'static str = ["d2", "d33", "d64", "d95", "d126"][i];
                let e = pb::AuditEvent {
                    occurred_at: Some(at(now - days * day)),
                    ..event(&format!("rr-{name}"), custom(&format!("{days} days ago")))
                };
                (name, e, at_similarity(similarity, 1 + i))
            })
            .collect(),
    )
    .await;
    let mut client = app.search_client().await;
    let found = hits(&mut client, by_vector(axis(0))).await;
    assert_eq!(named(&found, &ids), ["d95", "d33", "d126", "d64", "d2"]);
    for (hit, expected) in found.iter().zip([1.0, 0.9, 0.7, 0.5, 0.2]) {
        assert_close(hit.similarity, expected, &hit.event_id);
    }
    let found = hits(
        &mut client,
        pb::SearchSimilarRequest {
            top_k: 2,
            ..by_vector(axis(0))
        },
    )
    .await;
    assert_eq!(named(&found, &ids), ["d95", "d33"]);
    // A time window on last_event_at spanning two months.
    let found = hits(
        &mut client,
        pb::SearchSimilarRequest {
            filter: Some(pb::IncidentFilter {
                since: Some(at(now - 100 * day)),
                until: Some(at(now - 30 * day)),
                ..Default::default()
            }),
            ..by_vector(axis(0))
        },
    )
    .await;
    assert_eq!(named(&found, &ids), ["d95", "d33", "d64"]);
}

// ---------------------------------------------------------------- hybrid

/// Events about failed TLS handshakes; only one carries the code
/// ERR_CERT_4471, inside a long text about something else, so its vector is
/// further from the query than the short look-alikes.
fn handshake_corpus() -> Vec<(&'static str, pb::AuditEvent)> {
    let e = |rrid: &str, text: &str| event(rrid, custom(text));
    let mut corpus = vec![(
        "coded",
        pb::AuditEvent {
            namespace: "edge".into(),
            ..e(
                "rr-coded",
                "Nightly invoice export to the partner SFTP bridge stopped: TLS handshake failed with ERR_CERT_4471. \
                 The batch job was retried three times, the archive was rotated and finance was told the \
                 reports would be late.",
            )
        },
    )];
    let look_alikes = [
        ("l01", "TLS handshake failed: ERR_CERT_4412"),
        ("l02", "TLS handshake failed with ERR_CERT_9920"),
        ("l03", "TLS handshake failed, error ERR_CERT_1187"),
        ("l04", "the TLS handshake failed: ERR_CERT_3305"),
        ("l05", "TLS handshake failed (ERR_CERT_7702)"),
        ("l06", "TLS handshake failed with code ERR_CERT_5519"),
        ("l07", "TLS handshake to the upstream failed: ERR_CERT_2264"),
        ("l08", "TLS handshake failed ERR_CERT_8841"),
        ("l09", "TLS handshake failed again: ERR_CERT_6630"),
        ("l10", "client TLS handshake failed: ERR_CERT_4417"),
        ("l11", "TLS handshake failed during connect: ERR_CERT_0093"),
        ("l12", "TLS handshake failed at the gateway, ERR_CERT_3871"),
    ];
    corpus.extend(look_alikes.iter().map(|(n, t)| (*n, e(&format!("rr-{n}"), t))));
    corpus
}

const CODED_QUERY: &str = "TLS handshake failed ERR_CERT_4471";

async fn write_handshake_corpus(app: &TestApp) -> HashMap<String, String> {
    let corpus = handshake_corpus();
    let receipts = write_all(app, corpus.iter().map(|(_, e)| write(e.clone())).collect()).await;
    corpus
        .iter()
        .zip(receipts)
        .map(|((n, _), r)| (n.to_string(), r.event_id))
        .collect()
}

#[tokio::test]
async fn hybrid_search_ranks_the_event_with_a_rare_exact_token_near_the_top_where_vector_search_does_not() {
    let app = spawn_app().await;
    let ids = write_handshake_corpus(&app).await;
    let mut client = app.search_client().await;
    let query = || pb::SearchSimilarRequest {
        top_k: 100,
        ..by_text(CODED_QUERY)
    };
    let vector_hits = hits(
        &mut client,
        pb::SearchSimilarRequest {
            mode: pb::SearchMode::Vector as i32,
            ..query()
        },
    )
    .await;
    let vector_names = named(&vector_hits, &ids);
    assert_eq!(vector_hits.len(), 13);
    assert_ordered(&vector_hits, "vector mode");
    let vector_rank = vector_names.iter().position(|n| n == "coded").unwrap();
    assert!(
        vector_rank > 0,
        "the premise: vector search alone does not rank it first: {vector_names:?}"
    );

    let hybrid_hits = hits(
        &mut client,
        pb::SearchSimilarRequest {
            mode: pb::SearchMode::Hybrid as i32,
            ..query()
        },
    )
    .await;
    let hybrid_names = named(&hybrid_hits, &ids);
    let hybrid_rank = hybrid_names
        .iter()
        .position(|n| n == "coded")
        .unwrap_or_else(|| panic!("hybrid hits {hybrid_names:?}"));
    assert!(
        hybrid_rank < 3,
        "hybrid ranks the exact token in the top 3: {hybrid_names:?}"
    );
    assert!(hybrid_rank < vector_rank, "{hybrid_names:?} vs {vector_names:?}");
    // Hybrid hits carry their cosine similarity, not a fused score.
    let similarity: HashMap<&str, f32> = vector_hits
        .iter()
        .map(|h| (h.event_id.as_str(), h.similarity))
        .collect();
    for hit in &hybrid_hits {
        assert_close(hit.similarity, similarity[hit.event_id.as_str()], &hit.event_id);
    }
    // ...and they are ordered by the fused rank: a more similar event follows.
    let coded = &hybrid_hits[hybrid_rank];
    assert!(
        hybrid_hits[hybrid_rank + 1..]
            .iter()
            .any(|h| h.similarity > coded.similarity),
        "{hybrid_hits:?}"
    );
}

#[tokio::test]
async fn hybrid_search_applies_the_filters_to_both_rankings() {
    let app = spawn_app().await;
    let ids = write_handshake_corpus(&app).await;
    let mut client = app.search_client().await;
    let hybrid = |filter: pb::IncidentFilter, kinds: Vec<i32>| pb::SearchSimilarRequest {
        top_k: 100,
        mode: pb::SearchMode::Hybrid as i32,
        filter: Some(filter),
        kinds,
        ..by_text(CODED_QUERY)
    };
    // The coded event is the only one in namespace "edge".
    let found = hits(
        &mut client,
        hybrid(
            pb::IncidentFilter {
                namespace: "payments".into(),
                ..Default::default()
            },
            vec![],
        ),
    )
    .await;
    let names = named(&found, &ids);
    assert_eq!(names.len(), 12, "{names:?}");
    assert!(!names.contains(&"coded".to_owned()), "{names:?}");
    assert!(found.iter().all(|h| stored(h).namespace == "payments"));

    let found = hits(
        &mut client,
        hybrid(
            pb::IncidentFilter {
                namespace: "edge".into(),
                ..Default::default()
            },
            vec![],
        ),
    )
    .await;
    assert_eq!(named(&found, &ids), ["coded"]);

    let found = hits(
        &mut client,
        hybrid(pb::IncidentFilter::default(), vec![pb::AuditKind::Remediation as i32]),
    )
    .await;
    assert!(found.is_empty(), "{:?}", named(&found, &ids));

    // An event_id query ranks by that event's words; the event is left out.
    let found = hits(
        &mut client,
        pb::SearchSimilarRequest {
            mode: pb::SearchMode::Hybrid as i32,
            top_k: 100,
            ..by_event(&ids["coded"])
        },
    )
    .await;
    let names = named(&found, &ids);
    assert_eq!(names.len(), 12, "{names:?}");
    assert!(!names.contains(&"coded".to_owned()), "{names:?}");
}

// ---------------------------------------------------------------- model

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Family {
    Oom,
    CrashLoop,
    Disk,
    Certificate,
    Dns,
    Timeout,
}

fn labelled_corpus() -> Vec<(Family, pb::AuditEvent)> {
    use pb::{Phase::Processing as P, Severity::Critical as C};
    use Family::*;
    let e = |payload: Payload| event("rr-corpus", payload);
    vec![
        (
            Oom,
            e(remediation(
                "KubePodOOMKilled",
                C,
                P,
                "container checkout was OOMKilled after exceeding its 512Mi memory limit",
            )),
        ),
        (
            Oom,
            e(analysis(
                "the JVM heap grew past the container memory limit and the kernel killed the process",
                "increase_memory_limit",
            )),
        ),
        (
            Oom,
            e(custom(
                "worker pod terminated with exit code 137 because it ran out of memory",
            )),
        ),
        (
            Oom,
            e(custom(
                "memory usage of the cache service climbed until the out-of-memory killer stopped it",
            )),
        ),
        (
            Oom,
            e(analysis(
                "a leak in the image resizing library exhausted RAM on the node, triggering OOM kills",
                "restart_pod",
            )),
        ),
        (
            CrashLoop,
            e(remediation(
                "KubePodCrashLooping",
                C,
                P,
                "pod api restarted 14 times in 10 minutes: back-off restarting failed container",
            )),
        ),
        (
            CrashLoop,
            e(analysis(
                "the container exits immediately on startup because a required environment variable is missing, so the kubelet keeps restarting it",
                "rollback_deployment",
            )),
        ),
        (
            CrashLoop,
            e(custom(
                "CrashLoopBackOff: orders-service fails during startup and is restarted over and over",
            )),
        ),
        (
            CrashLoop,
            e(custom(
                "the process panics during initialisation and the pod restarts repeatedly",
            )),
        ),
        (
            CrashLoop,
            e(custom(
                "restart count of the ledger pod keeps increasing; it dies seconds after every start",
            )),
        ),
        (
            Disk,
            e(remediation(
                "KubeNodeDiskPressure",
                C,
                P,
                "node worker-3 reports DiskPressure: root filesystem 95% full",
            )),
        ),
        (
            Disk,
            e(analysis(
                "log files filled the node's ephemeral storage, so the kubelet started evicting pods",
                "clean_logs",
            )),
        ),
        (
            Disk,
            e(custom("persistent volume for postgres is almost out of space: 2% free")),
        ),
        (Disk, e(custom("no space left on device while writing the build cache"))),
        (
            Disk,
            e(custom(
                "the disk on node worker-7 filled up with container images and writes began to fail",
            )),
        ),
        (
            Certificate,
            e(remediation(
                "CertificateExpiringSoon",
                C,
                P,
                "TLS certificate for api.example.com expires in 3 days",
            )),
        ),
        (
            Certificate,
            e(analysis(
                "the ingress serves an expired certificate because cert-manager failed to renew it",
                "renew_certificate",
            )),
        ),
        (
            Certificate,
            e(custom(
                "clients reject the connection: x509 certificate has expired or is not yet valid",
            )),
        ),
        (
            Certificate,
            e(custom(
                "the mutual TLS client certificate of the billing service is past its validity date",
            )),
        ),
        (
            Certificate,
            e(custom(
                "HTTPS handshake fails since the server's SSL cert lapsed yesterday",
            )),
        ),
        (
            Dns,
            e(remediation(
                "CoreDNSErrors",
                C,
                P,
                "coredns returns SERVFAIL for upstream lookups",
            )),
        ),
        (
            Dns,
            e(analysis(
                "service discovery broke because the cluster DNS could not resolve internal hostnames",
                "restart_coredns",
            )),
        ),
        (
            Dns,
            e(custom("lookup of payments.svc.cluster.local failed: no such host")),
        ),
        (
            Dns,
            e(custom(
                "name resolution timed out for external domains after the resolver config change",
            )),
        ),
        (
            Dns,
            e(custom(
                "NXDOMAIN answers for the database hostname left the app unable to connect",
            )),
        ),
        (
            Timeout,
            e(remediation(
                "UpstreamTimeouts",
                C,
                P,
                "requests to the inventory service time out after 30s",
            )),
        ),
        (
            Timeout,
            e(analysis(
                "packet loss between availability zones caused slow responses and connection timeouts",
                "failover_zone",
            )),
        ),
        (
            Timeout,
            e(custom(
                "gateway returns 504 because the upstream did not answer in time",
            )),
        ),
        (
            Timeout,
            e(custom(
                "TCP connections to the payment provider hang and are dropped by the firewall",
            )),
        ),
        (
            Timeout,
            e(custom(
                "high network latency between the app and redis makes calls exceed their deadline",
            )),
        ),
    ]
}

#[tokio::test]
async fn a_paraphrased_question_finds_incidents_of_the_same_kind_with_the_real_model() {
    let app = spawn_app().await;
    let corpus = labelled_corpus();
    let receipts = write_all(&app, corpus.iter().map(|(_, e)| write(e.clone())).collect()).await;
    let family: HashMap<String, Family> = corpus
        .iter()
        .zip(&receipts)
        .map(|((f, _), r)| (r.event_id.clone(), *f))
        .collect();
    let queries = [
        (Family::Oom, "the app was killed for using too much RAM"),
        (Family::CrashLoop, "service keeps rebooting right after it launches"),
        (Family::Disk, "storage volume has run out of free capacity"),
        (
            Family::Certificate,
            "secure connection refused because the site's certificate is stale",
        ),
        (Family::Dns, "hostnames cannot be translated to IP addresses"),
        (
            Family::Timeout,
            "calls to the backend take too long and never get a reply",
        ),
    ];
    let mut client = app.search_client().await;
    let mut failures = Vec::new();
    for (expected, query) in queries {
        let found = hits(
            &mut client,
            pb::SearchSimilarRequest {
                top_k: 3,
                ..by_text(query)
            },
        )
        .await;
        assert_eq!(found.len(), 3);
        assert_ordered(&found, query);
        let families: Vec<Family> = found.iter().map(|h| family[&h.event_id]).collect();
        let right = families.iter().filter(|f| **f == expected).count();
        if families[0] != expected || right < 2 {
            failures.push(format!(
                "{query:?} ({expected:?}): {families:?} {:?}",
                found.iter().map(|h| h.similarity).collect::<Vec<_>>()
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

// ---------------------------------------------------------------- index shortfalls

/// Vectors that each point along their own axis are all equally far apart:
/// an HNSW graph over them leaves many unreachable from the entry point, and
/// an index scan returns only some. The search must notice the shortfall and
/// still return every event that exists.
#[tokio::test]
async fn events_the_vector_index_cannot_reach_are_still_found() {
    let app = spawn_app_with(|s| s.search.exact_scan_threshold = 0, local_model()).await;
    let requests = (1..=70)
        .map(|i| with_vector(event(&format!("rr-axis-{i}"), custom("")), at_similarity(0.5, i)))
        .collect();
    write_all(&app, requests).await;
    let mut client = app.search_client().await;
    let mut request = by_vector(axis(0));
    request.top_k = 70;
    let found = hits(&mut client, request.clone()).await;
    assert_eq!(found.len(), 70, "every one of the 70 events is a hit");
    request.group_by_incident = true;
    request.top_k = 60;
    assert_eq!(hits(&mut client, request).await.len(), 60, "60 distinct incidents");
}

/// Creating a month's partitions takes exclusive locks on the parent
/// tables, and a search holds a share lock on one parent while it waits for
/// the other; PostgreSQL broke such deadlocks by failing the search.
#[tokio::test]
async fn searches_never_fail_while_new_months_are_partitioned() {
    const MONTHS: i64 = 18;
    let app = spawn_app().await;
    let mut audit = app.audit_client().await;
    audit.write_audit(write(remediation_event("rr-month-0"))).await.unwrap();
    let writing = Arc::new(AtomicBool::new(true));
    let mut searchers = tokio::task::JoinSet::new();
    for _ in 0..6 {
        let (mut client, writing) = (app.search_client().await, writing.clone());
        searchers.spawn(async move {
            let mut failures = Vec::new();
            while writing.load(Ordering::Relaxed) {
                let mut request = by_text("container OOMKilled");
                request.filter = Some(pb::IncidentFilter {
                    namespace: "payments".into(),
                    ..Default::default()
                });
                if let Err(status) = search(&mut client, request).await {
                    failures.push(status);
                }
                if let Err(status) = search(&mut client, by_text("container OOMKilled")).await {
                    failures.push(status);
                }
            }
            failures
        });
    }
    // Each event falls in an older month, so each write creates partitions.
    for month in 1..=MONTHS {
        let mut event = remediation_event(&format!("rr-month-{month}"));
        event.occurred_at = Some(timestamp_ago(month * 31 * 86_400));
        audit
            .write_audit(write(event))
            .await
            .expect("the write creates its month");
    }
    writing.store(false, Ordering::Relaxed);
    let mut failures = Vec::new();
    while let Some(found) = searchers.join_next().await {
        failures.extend(found.unwrap());
    }
    assert!(failures.is_empty(), "{failures:#?}");
}
