//! Prometheus metrics, served as text on the HTTP port's `/metrics`.
//!
//! Code records through the `metrics` facade; this module installs the one
//! Prometheus recorder of the process and samples the gauges that are state
//! rather than events (pool use, deferred embeddings, jobs by state).
//! Per-RPC names follow the go-grpc-prometheus conventions, so existing
//! gRPC dashboards and alerts work unchanged.
use std::{sync::OnceLock, time::Duration};

use metrics::{describe_counter, describe_gauge, describe_histogram, gauge, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::{
    jobs::{runner::JobService, JobListFilter, JobState},
    storage::Storage,
};

pub const GRPC_STARTED: &str = "grpc_server_started_total";
pub const GRPC_HANDLED: &str = "grpc_server_handled_total";
pub const GRPC_HANDLING_SECONDS: &str = "grpc_server_handling_seconds";
pub const EMBEDDING_SECONDS: &str = "datastorage_embedding_generation_seconds";
pub const EMBEDDING_BATCH_SIZE: &str = "datastorage_embedding_batch_size";
pub const EMBEDDING_CACHE: &str = "datastorage_embedding_cache_requests_total";
pub const EVENTS_WRITTEN: &str = "datastorage_events_written_total";
pub const RATE_LIMITED: &str = "datastorage_rate_limited_total";
pub const DB_POOL_CONNECTIONS: &str = "datastorage_db_pool_connections";
pub const EMBEDDINGS_PENDING: &str = "datastorage_embeddings_pending";
pub const JOBS: &str = "datastorage_jobs";
pub const VECTOR_INDEX_MOVED: &str = "datastorage_vector_index_moved_total";
pub const VECTOR_INDEX_LAG_SECONDS: &str = "datastorage_vector_index_lag_seconds";

/// Latency buckets from 0.5 ms to 30 s: the service's calls span both ends.
const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0];

/// Jobs counted for the by-state gauge: the newest this many (finished jobs
/// expire after a day, so this is all of them in practice).
const JOBS_SAMPLED: usize = 1000;

/// How often recorded histogram samples are folded into their buckets.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// The process's recorder; installed on first use.
///
/// The recorder keeps every histogram sample until upkeep folds it into
/// its buckets, and `install_recorder` leaves upkeep to the caller; a
/// scrape runs it, but nothing guarantees a scraper. Without this thread a
/// replica nobody scrapes keeps growing (5M samples into one histogram
/// grew RSS by 82 MiB here): the 30-minute
/// soak's 14 MiB.
pub fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let handle = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
            .and_then(|b| b.set_buckets_for_metric(Matcher::Full(EMBEDDING_BATCH_SIZE.into()), BATCH_BUCKETS))
            .expect("bucket lists are not empty")
            .install_recorder()
            .expect("no other metrics recorder is installed");
        describe();
        let upkeep = handle.clone();
        std::thread::Builder::new()
            .name("metrics-upkeep".into())
            .spawn(move || loop {
                std::thread::sleep(UPKEEP_EVERY);
                upkeep.run_upkeep();
            })
            .expect("a thread for metrics upkeep starts");
        handle
    })
}

fn describe() {
    describe_counter!(GRPC_STARTED, "RPCs started, by service and method.");
    describe_counter!(GRPC_HANDLED, "RPCs completed, by service, method and gRPC status code.");
    describe_histogram!(
        GRPC_HANDLING_SECONDS,
        Unit::Seconds,
        "RPC latency until the last response byte."
    );
    describe_histogram!(
        EMBEDDING_SECONDS,
        Unit::Seconds,
        "Embedding provider calls, by provider."
    );
    describe_histogram!(EMBEDDING_BATCH_SIZE, "Texts per embedding provider call.");
    describe_counter!(
        EMBEDDING_CACHE,
        "Embedding cache lookups by tier (l1, l2) and result (hit, miss)."
    );
    describe_counter!(EVENTS_WRITTEN, "Audit events committed, by kind.");
    describe_counter!(RATE_LIMITED, "Calls refused by the per-caller rate limit, by scope.");
    describe_gauge!(
        DB_POOL_CONNECTIONS,
        "PostgreSQL pool connections by state (in_use, idle)."
    );
    describe_gauge!(EMBEDDINGS_PENDING, "Events waiting for the backfill to embed them.");
    describe_gauge!(JOBS, "Jobs by state, among the newest 1000.");
    describe_counter!(
        VECTOR_INDEX_MOVED,
        "Embeddings the indexer moved from the fresh segment into the HNSW index."
    );
    describe_gauge!(
        VECTOR_INDEX_LAG_SECONDS,
        "How long the oldest fresh embedding has waited for the HNSW index (0: none waiting)."
    );
}

/// Renders the registry as Prometheus text.
pub fn render() -> String {
    let handle = prometheus();
    handle.run_upkeep();
    handle.render()
}

/// Samples the state gauges: the pool every tick, the database and job
/// counts every `slow_every` ticks (they cost a query each).
pub async fn sample_state(storage: Storage, jobs: std::sync::Arc<JobService>, tick: Duration) {
    const SLOW_EVERY: u32 = 3;
    let mut every = tokio::time::interval(tick);
    let mut ticks = 0u32;
    loop {
        every.tick().await;
        let pools = std::iter::once(("primary", storage.pool())).chain(storage.replica_pool().map(|p| ("replica", p)));
        for (name, pool) in pools {
            let idle = pool.num_idle() as f64;
            gauge!(DB_POOL_CONNECTIONS, "pool" => name, "state" => "idle").set(idle);
            gauge!(DB_POOL_CONNECTIONS, "pool" => name, "state" => "in_use")
                .set((f64::from(pool.size()) - idle).max(0.0));
        }
        if ticks.is_multiple_of(SLOW_EVERY) {
            match storage.pending_embeddings_total().await {
                Ok(pending) => gauge!(EMBEDDINGS_PENDING).set(pending as f64),
                Err(error) => tracing::debug!(%error, "sampling pending embeddings failed"),
            }
            match storage.fresh_embeddings_lag().await {
                Ok(lag) => gauge!(VECTOR_INDEX_LAG_SECONDS).set(lag.map_or(0.0, |lag| lag.as_secs_f64())),
                Err(error) => tracing::debug!(%error, "sampling the vector index lag failed"),
            }
            match jobs.list(&JobListFilter::default(), None, JOBS_SAMPLED).await {
                Ok(listed) => {
                    for state in JobState::ALL {
                        let count = listed.iter().filter(|job| job.state == state).count();
                        gauge!(JOBS, "state" => state.label()).set(count as f64);
                    }
                }
                Err(error) => tracing::debug!(%error, "sampling job counts failed"),
            }
        }
        ticks = ticks.wrapping_add(1);
    }
}
