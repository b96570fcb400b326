//! The HTTP embedding provider failing under the server: a real
//! OpenAI-compatible endpoint in the test that answers, stalls (accepts the
//! request and never responds) or fails with 500, switchable at run time.
//! Writes must take no longer than the provider timeout allows, `defer` must
//! keep writing and the backfill must finish once the provider recovers,
//! and `reject` must write nothing.
use std::{
    sync::{
        atomic::{AtomicU8, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use axum::{extract::State, http::StatusCode, routing::post, Json, Router};
use datastorage::{
    config::{FailurePolicy, ProviderKind},
    embedding::openai::{OpenAiEmbedder, OpenAiSettings},
    proto::v1 as pb,
};
use tonic::Code;

use crate::helpers::*;

const ANSWERS: u8 = 0;
const STALLS: u8 = 1;
const FAILS: u8 = 2;

/// Per-attempt timeout and retries of the provider under test: a write may
/// wait (1 + RETRIES) x TIMEOUT plus backoff for it.
const TIMEOUT_MS: u64 = 300;
const RETRIES: u32 = 1;

/// Starts the endpoint; returns its base URL and its mode switch.
async fn provider() -> (String, Arc<AtomicU8>) {
    let mode = Arc::new(AtomicU8::new(ANSWERS));
    let app = Router::new()
        .route(
            "/v1/embeddings",
            post(
                |State(mode): State<Arc<AtomicU8>>, Json(body): Json<serde_json::Value>| async move {
                    match mode.load(Ordering::SeqCst) {
                        STALLS => {
                            tokio::time::sleep(Duration::from_secs(3600)).await;
                            Err(StatusCode::GATEWAY_TIMEOUT)
                        }
                        FAILS => Err(StatusCode::INTERNAL_SERVER_ERROR),
                        _ => {
                            let inputs = body["input"].as_array().map_or(0, Vec::len);
                            let data: Vec<_> = (0..inputs)
                                .map(|i| {
                                    let mut embedding = vec![0.0f32; 384];
                                    embedding[i % 384] = 1.0;
                                    serde_json::json!({ "index": i, "embedding": embedding })
                                })
                                .collect();
                            Ok(Json(serde_json::json!({ "data": data })))
                        }
                    }
                },
            ),
        )
        .with_state(mode.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{address}"), mode)
}

async fn app_with(base_url: String, policy: FailurePolicy) -> TestApp {
    let provider = Arc::new(
        OpenAiEmbedder::new(OpenAiSettings {
            base_url,
            model: "flaky-embedder".into(),
            dimensions: 384,
            max_retries: RETRIES,
            initial_backoff_ms: 10,
            timeout_ms: TIMEOUT_MS,
            ..OpenAiSettings::default()
        })
        .unwrap(),
    );
    spawn_app_with(
        |s| {
            s.embedding.provider = ProviderKind::Openai;
            s.embedding.failure_policy = policy;
            s.jobs.supervisor_interval_ms = 100;
        },
        provider,
    )
    .await
}

/// The longest a write may wait for the provider, with room for a loaded machine.
fn bound() -> Duration {
    Duration::from_millis(TIMEOUT_MS * u64::from(RETRIES + 1)) + Duration::from_secs(2)
}

#[tokio::test]
async fn a_stalled_provider_defers_within_the_timeout_and_the_backfill_finishes_after_recovery() {
    let (url, mode) = provider().await;
    let app = app_with(url, FailurePolicy::Defer).await;
    let mut client = app.audit_client().await;
    for (name, failure) in [("rr-stalled", STALLS), ("rr-failing", FAILS)] {
        mode.store(failure, Ordering::SeqCst);
        let started = Instant::now();
        let reply = client
            .write_audit(write(remediation_event(name)))
            .await
            .expect("a write is accepted while the provider is down")
            .into_inner();
        assert_eq!(reply.embedding_state(), pb::EmbeddingState::Deferred, "{name}");
        assert!(
            started.elapsed() < bound(),
            "{name}: the write waited {:?}",
            started.elapsed()
        );
    }
    assert_eq!(app.count("pending_embeddings").await, 2);
    assert_eq!(app.count("stored_embeddings").await, 0);

    mode.store(ANSWERS, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(20);
    while app.count("pending_embeddings").await > 0 {
        assert!(Instant::now() < deadline, "the backfill finished after recovery");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(app.count("stored_embeddings").await, 2, "both events embedded once");
    let states: Vec<i16> = sqlx::query_scalar("SELECT embedding_state FROM audit_events")
        .fetch_all(&app.db)
        .await
        .unwrap();
    assert!(
        states.iter().all(|&s| s == pb::EmbeddingState::Generated as i16),
        "{states:?}"
    );
}

#[tokio::test]
async fn a_stalled_provider_under_reject_is_unavailable_within_the_timeout_and_writes_nothing() {
    let (url, mode) = provider().await;
    let app = app_with(url, FailurePolicy::Reject).await;
    let mut client = app.audit_client().await;
    for (name, failure) in [("rr-stalled", STALLS), ("rr-failing", FAILS)] {
        mode.store(failure, Ordering::SeqCst);
        let started = Instant::now();
        let status = client.write_audit(write(remediation_event(name))).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{name}: {status:?}");
        assert!(
            started.elapsed() < bound(),
            "{name}: the write waited {:?}",
            started.elapsed()
        );
    }
    for table in ["audit_events", "incidents", "pending_embeddings", "stored_embeddings"] {
        assert_eq!(app.count(table).await, 0, "{table} is empty");
    }
    mode.store(ANSWERS, Ordering::SeqCst);
    let reply = client
        .write_audit(write(remediation_event("rr-recovered")))
        .await
        .expect("writes succeed once the provider answers")
        .into_inner();
    assert_eq!(reply.embedding_state(), pb::EmbeddingState::Generated);
}
