//! Audit integrity over the real server and database: hash chains, what the
//! database refuses, tampering, legal holds, retention floors, signed export
//! and PII redaction.
use std::collections::HashMap;

use chrono::{DateTime, TimeDelta, Utc};
use datastorage::{
    config::{RetentionPolicySettings, Settings},
    domain::AuditKind,
    integrity::export::{generate_key_pair, verify_saved_export, DetachedSignature},
    proto::v1::{self as pb, export_audit_events_response::Item},
};
use sqlx::{Executor, PgConnection};
use tonic::Code;

use crate::{
    helpers::{local_model, remediation_event, spawn_app, spawn_app_with, violated_fields, write, TestApp},
    jobs::{jobs_client, start, watch_to_end},
};

fn event_at(correlation_id: &str, rrid: &str, at: DateTime<Utc>) -> pb::AuditEvent {
    let mut event = remediation_event(rrid);
    event.correlation_id = correlation_id.into();
    event.occurred_at = Some(prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: at.timestamp_subsec_nanos() as i32,
    });
    event
}

fn custom_event(correlation_id: &str, text: &str) -> pb::AuditEvent {
    let mut event = event_at(
        correlation_id,
        &format!("rr-{correlation_id}"),
        Utc::now() - TimeDelta::minutes(1),
    );
    event.payload = Some(pb::audit_event::Payload::Custom(pb::CustomAudit {
        event_type: "operator_note".into(),
        text: text.into(),
        ..Default::default()
    }));
    event
}

async fn write_all(app: &TestApp, events: Vec<pb::AuditEvent>) -> Vec<String> {
    let mut client = app.audit_client().await;
    let mut ids = Vec::new();
    for event in events {
        ids.push(
            client
                .write_audit(write(event))
                .await
                .expect("write")
                .into_inner()
                .event_id,
        );
    }
    ids
}

async fn verify(app: &TestApp, correlation_id: &str) -> pb::VerifyAuditChainResponse {
    app.incident_query_client()
        .await
        .verify_audit_chain(pb::VerifyAuditChainRequest {
            correlation_id: correlation_id.into(),
        })
        .await
        .expect("verify")
        .into_inner()
}

async fn timeline(app: &TestApp, correlation_id: &str) -> Vec<pb::StoredAuditEvent> {
    app.incident_query_client()
        .await
        .list_audit_events(pb::ListAuditEventsRequest {
            scope: Some(pb::list_audit_events_request::Scope::CorrelationId(
                correlation_id.into(),
            )),
            page_size: 1000,
            ..Default::default()
        })
        .await
        .expect("timeline")
        .into_inner()
        .events
}

/// A session of its own, not returned to the pool (its settings stay with it).
async fn own_connection(app: &TestApp) -> PgConnection {
    app.db.acquire().await.unwrap().detach()
}

/// A superuser session with triggers off: what an attacker with database access can do.
async fn attacker(app: &TestApp) -> PgConnection {
    let mut conn = own_connection(app).await;
    conn.execute("SET session_replication_role = replica").await.unwrap();
    conn
}

#[tokio::test]
async fn each_event_links_to_the_previous_one_of_its_correlation_id() {
    let app = spawn_app().await;
    let now = Utc::now();
    // Written out of occurred_at order: the chain follows the order of writes.
    write_all(
        &app,
        vec![
            event_at("corr-a", "rr-1", now - TimeDelta::minutes(1)),
            event_at("corr-b", "rr-2", now - TimeDelta::minutes(9)),
            event_at("corr-a", "rr-1", now - TimeDelta::minutes(5)),
            event_at("corr-a", "rr-3", now - TimeDelta::minutes(2)),
        ],
    )
    .await;
    let mut events = timeline(&app, "corr-a").await;
    assert_eq!(events.len(), 3);
    events.sort_by_key(|e| e.received_at.map(|t| (t.seconds, t.nanos)));
    let mut by_previous: HashMap<&str, &str> = HashMap::new();
    for event in &events {
        assert_eq!(event.event_hash.len(), 64, "hex SHA-256");
        by_previous.insert(&event.previous_event_hash, &event.event_hash);
    }
    // Following the links from the genesis visits every event once.
    let mut link = "";
    let mut visited = 0;
    while let Some(next) = by_previous.get(link) {
        link = next;
        visited += 1;
    }
    assert_eq!(visited, 3);

    for (correlation_id, total) in [("corr-a", 3), ("corr-b", 1)] {
        let report = verify(&app, correlation_id).await;
        assert!(report.valid, "{report:?}");
        assert_eq!((report.total_events, report.verified_events), (total, total));
    }
    let unknown = app
        .incident_query_client()
        .await
        .verify_audit_chain(pb::VerifyAuditChainRequest {
            correlation_id: "nobody".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    let missing = app
        .incident_query_client()
        .await
        .verify_audit_chain(pb::VerifyAuditChainRequest::default())
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&missing), ["correlation_id"]);
}

#[tokio::test]
async fn the_database_refuses_to_rewrite_or_delete_events() {
    let app = spawn_app().await;
    // One event in the current month, one in a month whose partition the write creates.
    let ids = write_all(
        &app,
        vec![
            event_at("corr-x", "rr-x", Utc::now() - TimeDelta::minutes(1)),
            event_at("corr-x", "rr-x", Utc::now() - TimeDelta::days(400)),
        ],
    )
    .await;
    for id in &ids {
        let id: uuid::Uuid = id.parse().unwrap();
        for statement in [
            "UPDATE audit_events SET payload = jsonb_set(payload, '{message}', '\"edited\"') WHERE id = $1",
            "UPDATE audit_events SET event_hash = NULL WHERE id = $1",
            "DELETE FROM audit_events WHERE id = $1",
        ] {
            let error = sqlx::query(statement).bind(id).execute(&app.db).await.unwrap_err();
            assert!(error.to_string().contains("immutable"), "{statement}: {error}");
        }
        // The embedding state is not evidence: the backfill completes it.
        sqlx::query("UPDATE audit_events SET embedding_state = 4 WHERE id = $1")
            .bind(id)
            .execute(&app.db)
            .await
            .expect("embedding state may change");
    }
    let error = sqlx::query("TRUNCATE audit_events").execute(&app.db).await.unwrap_err();
    assert!(error.to_string().contains("immutable"), "{error}");
    assert_eq!(app.count("audit_events").await, 2);
    assert!(verify(&app, "corr-x").await.valid);
}

#[tokio::test]
async fn tampering_behind_the_service_is_named_by_verification_and_export() {
    let key_dir = signing_key_dir();
    let app = spawn_app_with(|s| with_signing_key(s, &key_dir), local_model()).await;
    let ids = write_all(
        &app,
        (0..4)
            .map(|i| event_at("corr-t", "rr-t", Utc::now() - TimeDelta::minutes(10 - i)))
            .collect(),
    )
    .await;
    let mut conn = attacker(&app).await;
    sqlx::query("UPDATE audit_events SET payload = jsonb_set(payload, '{message}', '\"all fine\"') WHERE id = $1")
        .bind(ids[1].parse::<uuid::Uuid>().unwrap())
        .execute(&mut conn)
        .await
        .unwrap();

    let report = verify(&app, "corr-t").await;
    assert!(!report.valid);
    assert_eq!(report.tampered_event_ids, [ids[1].clone()]);
    assert_eq!((report.total_events, report.verified_events), (4, 3));

    let (events, summary, _) = export(&app, "corr-t", false).await;
    let flags: Vec<(String, bool)> = events
        .iter()
        .map(|e| (e.event.as_ref().unwrap().event_id.clone(), e.chain_verified))
        .collect();
    assert_eq!(
        flags,
        ids.iter()
            .enumerate()
            .map(|(i, id)| (id.clone(), i != 1))
            .collect::<Vec<_>>(),
        "chain order, the edited event flagged"
    );
    assert_eq!(summary.tampered_event_ids, [ids[1].clone()]);

    // Deleting an event outright breaks the link after it.
    sqlx::query("DELETE FROM audit_events WHERE id = $1")
        .bind(ids[2].parse::<uuid::Uuid>().unwrap())
        .execute(&mut conn)
        .await
        .unwrap();
    let report = verify(&app, "corr-t").await;
    assert!(!report.valid);
    assert_eq!(report.tampered_event_ids, [ids[1].clone(), ids[3].clone()]);
}

#[tokio::test]
async fn concurrent_batches_over_shared_correlation_ids_keep_every_chain_whole() {
    let app = spawn_app().await;
    let correlation_ids: Vec<String> = (0..5).map(|i| format!("corr-shared-{i}")).collect();
    let mut batches = Vec::new();
    for batch in 0..6 {
        let client = app.audit_client().await;
        // Each batch touches the chains in a different order.
        let requests: Vec<pb::WriteAuditRequest> = (0..20)
            .map(|i| {
                let correlation = &correlation_ids[(i * 7 + batch * 3) % correlation_ids.len()];
                write(event_at(
                    correlation,
                    &format!("rr-{batch}-{i}"),
                    Utc::now() - TimeDelta::seconds(i as i64),
                ))
            })
            .collect();
        batches.push(tokio::spawn(async move {
            let mut client = client;
            client
                .batch_write_audit(pb::BatchWriteAuditRequest { requests })
                .await
                .map(|r| r.into_inner().responses.len())
        }));
    }
    for batch in batches {
        assert_eq!(batch.await.unwrap().expect("no deadlock surfaces"), 20);
    }
    let mut total = 0;
    for correlation_id in &correlation_ids {
        let report = verify(&app, correlation_id).await;
        assert!(report.valid, "{correlation_id}: {report:?}");
        total += report.total_events;
    }
    assert_eq!(total, 120);
}

async fn place(app: &TestApp, correlation_id: &str, reason: &str) -> Result<pb::LegalHold, tonic::Status> {
    app.audit_client()
        .await
        .place_legal_hold(pb::PlaceLegalHoldRequest {
            correlation_id: correlation_id.into(),
            reason: reason.into(),
        })
        .await
        .map(|r| r.into_inner())
}

async fn release(app: &TestApp, correlation_id: &str, reason: &str) -> Result<pb::LegalHold, tonic::Status> {
    app.audit_client()
        .await
        .release_legal_hold(pb::ReleaseLegalHoldRequest {
            correlation_id: correlation_id.into(),
            reason: reason.into(),
        })
        .await
        .map(|r| r.into_inner())
}

async fn purge(app: &TestApp, older_than: DateTime<Utc>) -> pb::Job {
    let mut jobs = jobs_client(app).await;
    let job = jobs
        .start_job(start(pb::start_job_request::Spec::Purge(pb::PurgeJob {
            older_than: Some(prost_types::Timestamp {
                seconds: older_than.timestamp(),
                nanos: 0,
            }),
        })))
        .await
        .unwrap()
        .into_inner();
    let last = watch_to_end(&mut jobs, &job.id).await.pop().unwrap();
    assert_eq!(last.state, pb::JobState::Succeeded as i32, "{last:?}");
    last
}

fn result_number(job: &pb::Job, field: &str) -> f64 {
    match job
        .result
        .as_ref()
        .and_then(|r| r.fields.get(field))
        .and_then(|v| v.kind.clone())
    {
        Some(prost_types::value::Kind::NumberValue(n)) => n,
        other => panic!("{field} in {:?}: {other:?}", job.result),
    }
}

#[tokio::test]
async fn a_legal_hold_survives_purges_until_it_is_released() {
    let app = spawn_app().await;
    let old = Utc::now() - TimeDelta::days(100);
    write_all(
        &app,
        vec![
            event_at("corr-held", "rr-held", old),
            event_at("corr-held", "rr-held", old + TimeDelta::hours(1)),
            event_at("corr-free", "rr-free", old),
            event_at("corr-free", "rr-free", Utc::now() - TimeDelta::minutes(1)),
        ],
    )
    .await;

    let hold = place(&app, "corr-held", "litigation 2026-17").await.unwrap();
    assert_eq!((hold.events_affected, hold.placed_by.as_str()), (2, "anonymous"));
    let again = place(&app, "corr-held", "another reason").await.unwrap();
    assert_eq!(
        (again.reason.as_str(), again.placed_at),
        ("litigation 2026-17", hold.placed_at)
    );
    assert!(timeline(&app, "corr-held").await.iter().all(|e| e.legal_hold));
    assert!(timeline(&app, "corr-free").await.iter().all(|e| !e.legal_hold));

    // Not even a purge run may delete a held event.
    let mut conn = own_connection(&app).await;
    conn.execute("BEGIN; SELECT set_config('datastorage.purge_run', '1', true)")
        .await
        .unwrap();
    let refused = conn
        .execute("DELETE FROM audit_events WHERE correlation_id = 'corr-held'")
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("legal hold"), "{refused}");
    drop(conn);

    let job = purge(&app, Utc::now() - TimeDelta::days(1)).await;
    assert_eq!(result_number(&job, "events_deleted"), 1.0);
    assert_eq!(result_number(&job, "events_held"), 2.0);
    assert_eq!(timeline(&app, "corr-held").await.len(), 2);
    assert_eq!(timeline(&app, "corr-free").await.len(), 1);
    let report = verify(&app, "corr-free").await;
    assert!(report.valid, "a purged link is accounted for: {report:?}");
    assert_eq!(report.total_events, 1);

    let missing_reason = release(&app, "corr-held", "").await.unwrap_err();
    assert_eq!(violated_fields(&missing_reason), ["reason"]);
    let released = release(&app, "corr-held", "case closed").await.unwrap();
    assert_eq!(released.released_by, "anonymous");
    assert_eq!(released.release_reason, "case closed");
    assert!(released.released_at.is_some());
    assert_eq!(
        release(&app, "corr-held", "twice").await.unwrap_err().code(),
        Code::NotFound
    );

    let holds = app
        .incident_query_client()
        .await
        .list_legal_holds(pb::ListLegalHoldsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .holds;
    assert_eq!(holds.len(), 1);
    assert_eq!(holds[0].reason, "litigation 2026-17");
    assert_eq!(holds[0].release_reason, "case closed");

    purge(&app, Utc::now() - TimeDelta::days(1)).await;
    assert!(timeline(&app, "corr-held").await.is_empty());
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM purge_runs WHERE finished_at IS NOT NULL")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(runs, 2, "every purge is recorded");
}

#[tokio::test]
async fn legal_holds_page_newest_first() {
    let app = spawn_app().await;
    for i in 0..5 {
        place(&app, &format!("corr-{i}"), "audit").await.unwrap();
    }
    let mut client = app.incident_query_client().await;
    let mut token = String::new();
    let mut seen = Vec::new();
    loop {
        let page = client
            .list_legal_holds(pb::ListLegalHoldsRequest {
                page_size: 2,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        seen.extend(page.holds.into_iter().map(|h| h.correlation_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, ["corr-4", "corr-3", "corr-2", "corr-1", "corr-0"]);
    let forged = client
        .list_legal_holds(pb::ListLegalHoldsRequest {
            page_size: 2,
            page_token: "forged".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&forged), ["page_token"]);
}

#[tokio::test]
async fn retention_floors_keep_a_category_longer_than_a_purge_asks() {
    let app = spawn_app_with(
        |s| {
            s.jobs.batch_size = 2;
            s.retention.policies = vec![RetentionPolicySettings {
                kind: AuditKind::Execution,
                event_type: None,
                min_age_days: 7 * 365,
            }];
        },
        local_model(),
    )
    .await;
    let old = Utc::now() - TimeDelta::days(60);
    let mut execution = event_at("corr-exec", "rr-exec", old);
    execution.payload = Some(pb::audit_event::Payload::Execution(pb::ExecutionAudit {
        action_type: "restart_pod".into(),
        target: Some(pb::ResourceRef {
            kind: "Deployment".into(),
            name: "api".into(),
            namespace: "payments".into(),
        }),
        status: pb::ExecutionStatus::Succeeded as i32,
        ..Default::default()
    }));
    write_all(&app, vec![execution, event_at("corr-rem", "rr-rem", old)]).await;

    let job = purge(&app, Utc::now() - TimeDelta::days(1)).await;
    assert_eq!(result_number(&job, "events_deleted"), 1.0);
    assert_eq!(result_number(&job, "events_kept_by_policy"), 1.0);
    assert_eq!(timeline(&app, "corr-exec").await.len(), 1);
    assert!(timeline(&app, "corr-rem").await.is_empty());
}

fn signing_key_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("ds-signing-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let (private, public) = generate_key_pair().unwrap();
    std::fs::write(dir.join("export.pem"), private).unwrap();
    std::fs::write(dir.join("export.pub.pem"), public).unwrap();
    dir
}

fn with_signing_key(settings: &mut Settings, dir: &std::path::Path) {
    settings.integrity.export_signing_key = Some(dir.join("export.pem"));
    settings.integrity.export_key_id = "test-key".into();
}

/// Events, summary, and the exported bytes as a client saves them.
async fn export(
    app: &TestApp,
    correlation_id: &str,
    redact_pii: bool,
) -> (Vec<pb::ExportedAuditEvent>, pb::ExportSummary, Vec<u8>) {
    let mut stream = app
        .incident_query_client()
        .await
        .export_audit_events(pb::ExportAuditEventsRequest {
            filter: None,
            correlation_id: correlation_id.into(),
            redact_pii,
        })
        .await
        .expect("export starts")
        .into_inner();
    let (mut events, mut summary, mut bytes) = (Vec::new(), None, Vec::new());
    while let Some(message) = stream.message().await.expect("export streams") {
        match message.item.expect("an item") {
            Item::Event(event) => {
                bytes.extend(&event.signed_line);
                events.push(event);
            }
            Item::Summary(last) => {
                bytes.extend(&last.signed_line);
                summary = Some(last);
            }
        }
        bytes.push(b'\n');
    }
    (events, summary.expect("a summary ends the export"), bytes)
}

#[tokio::test]
async fn an_export_is_signed_and_any_changed_byte_breaks_the_signature() {
    let key_dir = signing_key_dir();
    let app = spawn_app_with(|s| with_signing_key(s, &key_dir), local_model()).await;
    write_all(
        &app,
        (0..3)
            .map(|i| event_at("corr-e", "rr-e", Utc::now() - TimeDelta::minutes(5 - i)))
            .collect(),
    )
    .await;
    let (events, summary, mut bytes) = export(&app, "corr-e", false).await;
    assert_eq!(events.len(), 3);
    assert!(events.iter().all(|e| e.chain_verified));
    assert_eq!((summary.total_events, summary.verified_events), (3, 3));
    assert_eq!(
        (summary.signature_algorithm.as_str(), summary.key_id.as_str()),
        ("ed25519", "test-key")
    );

    let public = std::fs::read_to_string(key_dir.join("export.pub.pem")).unwrap();
    let signature = DetachedSignature::new(&summary.key_id, &summary.signature);
    let check = verify_saved_export(&bytes, &signature, &public).expect("the export verifies offline");
    assert_eq!((check.events, check.links_rechecked), (3, 3));
    assert!(check.broken_links.is_empty());

    let at = bytes.windows(8).position(|w| w == b"payments").unwrap();
    bytes[at] = b'P';
    let error = verify_saved_export(&bytes, &signature, &public).unwrap_err();
    assert!(error.to_string().contains("signature does not match"), "{error}");
}

#[tokio::test]
async fn exports_need_a_signing_key_and_chains_have_a_size_limit() {
    let app = spawn_app_with(|s| s.integrity.max_chain_events = 2, local_model()).await;
    write_all(
        &app,
        (0..3)
            .map(|i| event_at("corr-long", "rr-long", Utc::now() - TimeDelta::minutes(5 - i)))
            .collect(),
    )
    .await;
    let unsigned = app
        .incident_query_client()
        .await
        .export_audit_events(pb::ExportAuditEventsRequest {
            correlation_id: "corr-long".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(unsigned.code(), Code::FailedPrecondition);
    let too_long = app
        .incident_query_client()
        .await
        .verify_audit_chain(pb::VerifyAuditChainRequest {
            correlation_id: "corr-long".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(too_long.code(), Code::FailedPrecondition);
}

#[tokio::test]
async fn a_redacted_export_masks_personal_data_and_secrets() {
    let key_dir = signing_key_dir();
    let app = spawn_app_with(|s| with_signing_key(s, &key_dir), local_model()).await;
    let note = "paged ops@example.com from 10.20.30.40, call +1 415-555-0100; \
                used Authorization: Bearer abc123.def and password=hunter2";
    write_all(&app, vec![custom_event("corr-pii", note)]).await;

    let (events, summary, bytes) = export(&app, "corr-pii", true).await;
    let Some(pb::audit_event::Payload::Custom(custom)) = events[0]
        .event
        .as_ref()
        .unwrap()
        .event
        .as_ref()
        .unwrap()
        .payload
        .clone()
    else {
        panic!("a custom event");
    };
    assert_eq!(
        custom.text,
        "paged [REDACTED:email] from [REDACTED:ip], call [REDACTED:phone]; \
         used Authorization: [REDACTED:secret] and password=[REDACTED:secret]"
    );
    let exported = String::from_utf8(bytes.clone()).unwrap();
    for secret in ["ops@example.com", "10.20.30.40", "415-555-0100", "abc123", "hunter2"] {
        assert!(!exported.contains(secret), "{secret} leaked into the export");
    }
    assert!(
        events[0].chain_verified,
        "the stored chain is intact; only the export is masked"
    );
    let public = std::fs::read_to_string(key_dir.join("export.pub.pem")).unwrap();
    let check = verify_saved_export(
        &bytes,
        &DetachedSignature::new(&summary.key_id, &summary.signature),
        &public,
    )
    .expect("a redacted export is signed too");
    assert_eq!(
        check.links_not_checkable, 1,
        "masked records cannot be rehashed offline"
    );
}
