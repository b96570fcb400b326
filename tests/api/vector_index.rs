//! Deferred vector indexing: embeddings wait in the unindexed fresh segment,
//! searches see them at once, and the indexer moves them into the HNSW index
//! without changing any answer. Servers share one database here: one writes
//! straight into the index, one into the fresh segment, and a third runs the
//! indexer, so each side's rows are known exactly.
use std::time::{Duration, Instant};

use datastorage::{
    config::Settings,
    proto::v1::{self as pb, search_similar_request::Query},
};

use crate::helpers::*;

const DIMS: usize = 384;

/// A unit vector at cosine similarity `similarity` to e0; `axis` carries the
/// rest, so every event's vector is distinct.
fn at_similarity(similarity: f32, axis: usize) -> Vec<f32> {
    let mut values = vec![0.0; DIMS];
    values[0] = similarity;
    values[axis] = (1.0 - similarity * similarity).sqrt();
    values
}

fn with_vector(name: &str, namespace: &str, values: Vec<f32>) -> pb::WriteAuditRequest {
    let mut event = remediation_event(&format!("rr-{name}"));
    event.namespace = namespace.into();
    pb::WriteAuditRequest {
        event: Some(event),
        request_id: String::new(),
        embedding: Some(pb::Vector { values }),
    }
}

fn settings(url: &str, deferred: bool, indexer: bool) -> Settings {
    let mut settings = test_settings(url.to_owned());
    settings.vector_index.deferred = deferred;
    settings.vector_index.indexer = indexer;
    settings.vector_index.idle_poll_ms = 20;
    settings
}

/// Writes the named events; their incident ids (one incident per name).
async fn write_named(app: &TestApp, events: &[(&str, &str, f32, usize)]) -> Vec<(String, String)> {
    let requests = events
        .iter()
        .map(|&(name, namespace, similarity, axis)| with_vector(name, namespace, at_similarity(similarity, axis)))
        .collect();
    let receipts = app
        .audit_client()
        .await
        .batch_write_audit(pb::BatchWriteAuditRequest { requests })
        .await
        .expect("batch accepted")
        .into_inner()
        .responses;
    events
        .iter()
        .zip(receipts)
        .map(|(&(name, ..), receipt)| (receipt.incident_id, name.to_owned()))
        .collect()
}

/// The names of the hits of a search for e0, best first.
async fn nearest_names(app: &TestApp, names: &[(String, String)], request: pb::SearchSimilarRequest) -> Vec<String> {
    let hits = app
        .search_client()
        .await
        .search_similar(pb::SearchSimilarRequest {
            query: Some(Query::Vector(pb::Vector {
                values: at_similarity(1.0, 1),
            })),
            ..request
        })
        .await
        .expect("search succeeds")
        .into_inner()
        .hits;
    hits.iter()
        .map(|hit| {
            names
                .iter()
                .find(|(incident, _)| *incident == hit.incident_id)
                .map(|(_, name)| name.clone())
                .unwrap_or_else(|| panic!("hit of an unknown incident {}", hit.incident_id))
        })
        .collect()
}

async fn indexed_and_fresh(app: &TestApp) -> (i64, i64) {
    (app.count("audit_embeddings").await, app.count("fresh_embeddings").await)
}

#[tokio::test]
async fn fresh_embeddings_are_searched_with_the_indexed_ones_and_keep_their_rank_once_indexed() {
    let url = fresh_database().await;
    let direct = spawn_with_settings(settings(&url, false, false), local_model()).await;
    let deferred = spawn_with_settings(settings(&url, true, false), local_model()).await;

    let mut names = write_named(
        &direct,
        &[
            ("indexed-95", "payments", 0.95, 2),
            ("indexed-85", "billing", 0.85, 3),
            ("indexed-75", "payments", 0.75, 4),
        ],
    )
    .await;
    names.extend(
        write_named(
            &deferred,
            &[
                ("fresh-90", "payments", 0.90, 5),
                ("fresh-80", "billing", 0.80, 6),
                ("fresh-70", "payments", 0.70, 7),
            ],
        )
        .await,
    );
    assert_eq!(
        indexed_and_fresh(&direct).await,
        (3, 3),
        "three rows in the index, three waiting"
    );

    let everything = pb::SearchSimilarRequest {
        top_k: 6,
        ..Default::default()
    };
    let payments_only = pb::SearchSimilarRequest {
        top_k: 6,
        filter: Some(pb::IncidentFilter {
            namespace: "payments".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let merged = [
        "indexed-95",
        "fresh-90",
        "indexed-85",
        "fresh-80",
        "indexed-75",
        "fresh-70",
    ];
    let merged_in_payments = ["indexed-95", "fresh-90", "indexed-75", "fresh-70"];
    // top_k 2: the index alone fills the page, and the fresh row must still win its place.
    let top_two = pb::SearchSimilarRequest {
        top_k: 2,
        ..Default::default()
    };
    for app in [&direct, &deferred] {
        assert_eq!(
            nearest_names(app, &names, top_two.clone()).await,
            ["indexed-95", "fresh-90"]
        );
        assert_eq!(nearest_names(app, &names, everything.clone()).await, merged);
        assert_eq!(
            nearest_names(app, &names, payments_only.clone()).await,
            merged_in_payments,
            "the filter applies to both segments"
        );
    }
    // A fresh event can be the query itself.
    let fresh_incident = &names.iter().find(|(_, n)| n == "fresh-90").unwrap().0;
    let fresh_event: String = sqlx::query_scalar("SELECT id::text FROM audit_events WHERE incident_id::text = $1")
        .bind(fresh_incident)
        .fetch_one(&direct.db)
        .await
        .unwrap();
    let similar = direct
        .search_client()
        .await
        .search_similar(pb::SearchSimilarRequest {
            query: Some(Query::EventId(fresh_event)),
            top_k: 1,
            ..Default::default()
        })
        .await
        .expect("a fresh event is a valid query")
        .into_inner()
        .hits;
    assert_eq!(similar.len(), 1);

    let indexer = spawn_with_settings(settings(&url, true, true), local_model()).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while indexed_and_fresh(&indexer).await != (6, 0) {
        assert!(Instant::now() < deadline, "the indexer moved every fresh row in time");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(nearest_names(&direct, &names, everything).await, merged);
    assert_eq!(nearest_names(&direct, &names, payments_only).await, merged_in_payments);
}

#[tokio::test]
async fn indexer_workers_keep_up_with_writes_and_lose_nothing() {
    let app = spawn_app_with(
        |settings| {
            // Small batches and several workers, so they contend for rows.
            settings.vector_index.workers = 4;
            settings.vector_index.batch_size = 7;
            settings.vector_index.idle_poll_ms = 10;
        },
        local_model(),
    )
    .await;
    let mut client = app.audit_client().await;
    for round in 0..5 {
        let requests = (0..40)
            .map(|i| with_vector(&format!("r{round}-{i}"), "payments", at_similarity(0.5, 2 + i)))
            .collect();
        client
            .batch_write_audit(pb::BatchWriteAuditRequest { requests })
            .await
            .expect("batch accepted");
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while indexed_and_fresh(&app).await != (200, 0) {
        assert!(
            Instant::now() < deadline,
            "every row indexed once: {:?}",
            indexed_and_fresh(&app).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let events_without_embedding: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_events e WHERE NOT EXISTS \
         (SELECT 1 FROM audit_embeddings x WHERE x.event_id = e.id AND x.occurred_at = e.occurred_at)",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(events_without_embedding, 0);
}
