//! No audit lost in a PostgreSQL outage: a PostgreSQL of the test's own
//! (started and stopped with the project's scripts/pg.sh) is stopped under
//! load; writes are answered QUEUED into Redis, and once it is back every
//! acknowledged event is stored exactly once with an intact chain.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use chrono::{TimeDelta, Utc};
use datastorage::{
    config::Settings,
    domain::{AuditEvent, Payload, Remediation, ResourceRef},
    outage::{OutageQueue, QueuedBatch},
    proto::v1 as pb,
    storage::{EmbeddingDecision, PreparedWrite},
};
use fred::interfaces::{ClientLike, StreamsInterface};

use tonic::Code;

use crate::{
    helpers::{
        health_of, local_model, remediation_event, spawn_app_with, spawn_with_settings, test_settings, write,
        PrivatePostgres,
    },
    job_store::{delete_keys, redis_settings, redis_url, unique_prefix},
};

fn queue_settings(database_url: String, prefix: &str) -> Settings {
    let mut settings = test_settings(database_url);
    settings.redis = redis_settings(&redis_url(), prefix);
    settings.outage_queue.enabled = true;
    settings.outage_queue.max_attempts = 2;
    settings.outage_queue.claim_idle_ms = 500;
    settings.outage_queue.max_backoff_ms = 200;
    settings.database.acquire_timeout_ms = 500;
    settings
}

#[tokio::test]
async fn writes_during_a_postgres_outage_are_queued_and_applied_exactly_once() {
    let cluster = PrivatePostgres::start();
    let prefix = unique_prefix();
    let app = spawn_with_settings(queue_settings(cluster.url(), &prefix), local_model()).await;
    let without_queue = spawn_with_settings(test_settings(cluster.url()), local_model()).await;

    // Four writers, each with its own correlation id and idempotency keys.
    let acknowledged: Arc<Mutex<HashMap<String, pb::WriteState>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for writer in 0..4 {
        let mut client = app.audit_client().await;
        let (acknowledged, stop) = (acknowledged.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let mut event = remediation_event(&format!("rr-{writer}-{}", n % 3));
                event.correlation_id = format!("corr-outage-{writer}");
                let mut request = write(event);
                request.request_id = format!("w{writer}-{n}");
                let response = client
                    .write_audit(request)
                    .await
                    .expect("every write is committed or queued")
                    .into_inner();
                let state = pb::WriteState::try_from(response.write_state).unwrap();
                if state == pb::WriteState::Queued {
                    assert!(response.incident_id.is_empty());
                }
                acknowledged.lock().unwrap().insert(response.event_id, state);
                n += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.stop();
    tokio::time::sleep(Duration::from_secs(3)).await;

    // The queue keeps this replica in the load balancer for writes only.
    use tonic_health::pb::health_check_response::ServingStatus;
    assert_eq!(health_of(&app, "").await, ServingStatus::Serving);
    assert_eq!(
        health_of(&app, "datastorage.v1.AuditWrite").await,
        ServingStatus::Serving
    );
    assert_eq!(
        health_of(&app, "datastorage.v1.IncidentQuery").await,
        ServingStatus::NotServing
    );
    assert_eq!(health_of(&without_queue, "").await, ServingStatus::NotServing);

    let unqueued = without_queue
        .audit_client()
        .await
        .write_audit(write(remediation_event("rr-no-queue")))
        .await
        .unwrap_err();
    assert_eq!(unqueued.code(), Code::Unavailable, "{unqueued:?}");

    cluster.restart();
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for writer in writers {
        writer.await.unwrap();
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    let queued = acknowledged.values().filter(|s| **s == pb::WriteState::Queued).count();
    assert!(queued > 0, "the outage queued writes");
    assert!(
        acknowledged.len() > queued,
        "writes committed before and after the outage"
    );

    // The replay drains the queue.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let stored = loop {
        let stored: Vec<(uuid::Uuid, i64)> = sqlx::query_as("SELECT id, count(*) FROM audit_events GROUP BY id")
            .fetch_all(&app.db)
            .await
            .unwrap_or_default();
        if stored.len() >= acknowledged.len() || tokio::time::Instant::now() > deadline {
            break stored;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let stored: HashMap<String, i64> = stored.into_iter().map(|(id, n)| (id.to_string(), n)).collect();
    for id in acknowledged.keys() {
        assert_eq!(stored.get(id), Some(&1), "event {id} is stored exactly once");
    }
    assert_eq!(stored.len(), acknowledged.len(), "nothing unacknowledged was stored");
    let keys: i64 = sqlx::query_scalar("SELECT count(*) FROM idempotency_keys")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(keys as usize, acknowledged.len());

    let mut queries = app.incident_query_client().await;
    for writer in 0..4 {
        let report = queries
            .verify_audit_chain(pb::VerifyAuditChainRequest {
                correlation_id: format!("corr-outage-{writer}"),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(report.valid, "{report:?}");
    }
    let client = fred::clients::Client::new(
        fred::types::config::Config::from_url(&redis_url()).unwrap(),
        None,
        None,
        None,
    );
    client.init().await.unwrap();
    let left: u64 = client.xlen(format!("{prefix}:audit:outage")).await.unwrap();
    assert_eq!(left, 0, "the queue is drained");
    delete_keys(&prefix).await;
}

#[tokio::test]
async fn a_queued_write_that_keeps_failing_moves_to_the_dead_letter_stream() {
    let prefix = unique_prefix();
    let app = spawn_app_with(
        |s| {
            s.redis = redis_settings(&redis_url(), &prefix);
            s.outage_queue.enabled = true;
            s.outage_queue.max_attempts = 2;
            s.outage_queue.max_backoff_ms = 50;
        },
        local_model(),
    )
    .await;
    let mut settings = test_settings(String::new());
    settings.redis = redis_settings(&redis_url(), &prefix);
    settings.outage_queue.enabled = true;
    let queue = OutageQueue::connect(&settings.redis, &settings.outage_queue)
        .await
        .unwrap();
    // A parent that never existed: the replay refuses it however often it tries.
    let orphan = AuditEvent {
        correlation_id: "corr-orphan".into(),
        remediation_request_id: "rr-orphan".into(),
        occurred_at: datastorage::domain::to_stored_precision(Utc::now() - TimeDelta::minutes(1)),
        namespace: "payments".into(),
        cluster: None,
        labels: Default::default(),
        parent_event_id: Some(uuid::Uuid::now_v7()),
        payload: Payload::Remediation(Remediation {
            signal_type: "alert".into(),
            signal_name: "Orphan".into(),
            severity: datastorage::domain::Severity::Info,
            target: ResourceRef {
                kind: "Pod".into(),
                name: "x".into(),
                namespace: None,
            },
            phase: datastorage::domain::Phase::Pending,
            message: None,
            started_at: None,
            completed_at: None,
            priority: None,
        }),
    };
    queue
        .enqueue(&QueuedBatch {
            source: "anonymous".into(),
            model: "all-MiniLM-L6-v2".into(),
            writes: vec![PreparedWrite {
                event_id: uuid::Uuid::now_v7(),
                received_at: datastorage::domain::to_stored_precision(Utc::now()),
                event: orphan,
                request_id: None,
                search_text: None,
                embedding: EmbeddingDecision::None,
                trace_id: None,
            }],
        })
        .await
        .unwrap();
    let client = fred::clients::Client::new(
        fred::types::config::Config::from_url(&redis_url()).unwrap(),
        None,
        None,
        None,
    );
    client.init().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let dead: u64 = client.xlen(queue.dead_letter_key()).await.unwrap();
        if dead == 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the entry reached the dead-letter stream"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let left: u64 = client.xlen(queue.stream_key()).await.unwrap();
    assert_eq!(left, 0);
    assert_eq!(app.count("audit_events").await, 0, "nothing was half-written");
    delete_keys(&prefix).await;
}
