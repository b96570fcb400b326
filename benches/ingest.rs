//! `make bench`, ingest: sustained writes with caller-supplied embeddings
//! against the HNSW ceiling, measured side by side in one run (issue 9).
//!
//! Baselines, plain SQL on the same database, BENCH_CLIENTS connections each
//! inserting one 384-dim vector per transaction:
//! - into a table with an HNSW cosine index (pgvector defaults, as the
//!   service's): the ceiling a write path that maintains the index inline
//!   cannot pass;
//! - into the same table without the index.
//!
//! The service, BENCH_CLIENTS closed-loop clients:
//! - WriteAudit with `vector_index.deferred = false` (the event's
//!   transaction inserts into the HNSW index);
//! - WriteAudit with deferred indexing (the default): the embedding goes to
//!   the unindexed fresh segment in the event's transaction; the indexer moves
//!   it into the index in batches;
//! - BatchWriteAudit, 100 events per call, deferred.
//!
//! Each scenario runs BENCH_INGEST_SECONDS; then BatchWriteAudit at a fixed
//! 3x the measured ceiling for BENCH_INGEST_SUSTAINED_SECONDS, with the fresh
//! backlog sampled every 5 s. During the deferred ones a probe
//! writes an event with a vector of its own every 200 ms and searches for it
//! until it is the top hit: the time from the write's acknowledgement to the
//! first search that finds it is "searchable after". After each, the backlog
//! left in the fresh segment, how long the indexer takes to drain it, and
//! recall@10 of SearchSimilar against an exact scan, with the backlog still
//! there and again once it is drained.
//!
//! Vectors are clustered, as real embeddings of similar events are: 256 random
//! centres, each vector a centre plus noise, normalised.
use std::{
    collections::HashSet,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use datastorage::{
    config::Settings,
    proto::v1::{self as pb, audit_write_client::AuditWriteClient, vector_search_client::VectorSearchClient},
    startup::Application,
};
use hdrhistogram::Histogram;
use sqlx::{Connection, Executor, PgConnection, PgPool};
use tonic::transport::Channel;

mod common;
use common::{
    env_or, histogram, load,
    load::{LoadReport, LoadSpec, Pace},
    micros, ms, Rng,
};

const DIMENSIONS: usize = 384;
const CENTRES: u64 = 256;
const BATCH: usize = 100;
const RECALL_QUERIES: u64 = 30;
/// The graph this bench gives the service unless BENCH_INGEST_HNSW_M /
/// BENCH_INGEST_HNSW_EF_CONSTRUCTION say otherwise (bench-quick runs pgvector's
/// defaults: its backlogs are small).
const GRAPH_M: u32 = 32;
const GRAPH_EF_CONSTRUCTION: u32 = 128;
const BACKLOG_EVERY: Duration = Duration::from_secs(5);

/// A clustered unit vector: centre `seed % CENTRES` plus noise.
fn clustered(seed: u64) -> Vec<f32> {
    let mut centre = Rng::new(seed % CENTRES);
    let mut noise = Rng::new(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ 0xA5A5);
    let mut v: Vec<f32> = (0..DIMENSIONS)
        .map(|_| {
            let c = centre.below(2001) as f32 / 1000.0 - 1.0;
            let n = noise.below(2001) as f32 / 1000.0 - 1.0;
            c + 0.6 * n
        })
        .collect();
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter_mut().for_each(|x| *x /= norm);
    v
}

/// A direction unrelated to the clusters: the probe's own vector.
fn lone(seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed ^ 0x00DD_BA11);
    let mut v: Vec<f32> = (0..DIMENSIONS).map(|_| rng.below(2001) as f32 / 1000.0 - 1.0).collect();
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter_mut().for_each(|x| *x /= norm);
    v
}

fn event(rr: String) -> pb::AuditEvent {
    common::recent_event(
        rr,
        "payments".into(),
        pb::audit_event::Payload::Custom(pb::CustomAudit {
            event_type: "ingest".into(),
            text: "pod restarted".into(),
            ..Default::default()
        }),
    )
}

fn write(seed: u64, rr: String) -> pb::WriteAuditRequest {
    pb::WriteAuditRequest {
        event: Some(event(rr)),
        request_id: String::new(),
        embedding: Some(pb::Vector {
            values: clustered(seed),
        }),
    }
}

fn server_settings(url: &str, model_dir: &str, clients: usize, deferred: bool, graph: (u32, u32)) -> Settings {
    let mut settings = common::server_settings(url, model_dir);
    settings.database.max_connections = clients as u32 + 4;
    settings.vector_index.deferred = deferred;
    settings.vector_index.indexer = deferred;
    // These vectors are clusters of near-equidistant noise, the hardest case
    // for a graph index: with pgvector's default graph (16 / 64) recall@10
    // fell to 0.937 once the backlog had drained into it (docs/performance.md).
    (settings.vector_index.hnsw_m, settings.vector_index.hnsw_ef_construction) = graph;
    settings
}

struct Server {
    channel: Channel,
    stop: tokio::sync::oneshot::Sender<()>,
}

async fn start(settings: Settings) -> anyhow::Result<Server> {
    let app = Application::build(settings).await?;
    let port = app.port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));
    let channel = Channel::from_shared(format!("http://127.0.0.1:{port}"))?
        .connect()
        .await?;
    Ok(Server { channel, stop })
}

/// What the visibility probe saw.
struct Visibility {
    probes: u64,
    lag: Histogram<u64>,
}

/// Every 200 ms until `done`: write an event with a vector of its own (never
/// used before: `seed` differs per scenario), then search for it until it is
/// the top hit.
async fn probe_visibility(channel: Channel, done: Arc<AtomicBool>, seed: u64) -> Visibility {
    let mut writer = AuditWriteClient::new(channel.clone());
    let mut search = VectorSearchClient::new(channel);
    let mut lag = histogram();
    let mut probes = 0;
    while !done.load(Ordering::Relaxed) {
        probes += 1;
        let vector = lone(seed + probes);
        let written = writer
            .write_audit(pb::WriteAuditRequest {
                event: Some(event(format!("probe-{probes}"))),
                request_id: String::new(),
                embedding: Some(pb::Vector { values: vector.clone() }),
            })
            .await
            .expect("probe write")
            .into_inner();
        let acknowledged = Instant::now();
        loop {
            let hits = search
                .search_similar(pb::SearchSimilarRequest {
                    query: Some(pb::search_similar_request::Query::Vector(pb::Vector {
                        values: vector.clone(),
                    })),
                    top_k: 1,
                    ..Default::default()
                })
                .await
                .expect("probe search")
                .into_inner()
                .hits;
            if hits.first().is_some_and(|hit| hit.event_id == written.event_id) {
                lag.saturating_record(micros(acknowledged.elapsed()));
                break;
            }
            assert!(
                acknowledged.elapsed() < Duration::from_secs(30),
                "probe event never became searchable"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Visibility { probes, lag }
}

/// Mean recall@10 of SearchSimilar against an exact scan of every stored
/// embedding, and the searches' latency.
async fn recall(channel: &Channel, pool: &PgPool, seed: u64) -> anyhow::Result<(f64, Histogram<u64>)> {
    let mut search = VectorSearchClient::new(channel.clone());
    let mut latency = histogram();
    let mut found = 0usize;
    for q in 0..RECALL_QUERIES {
        let query = clustered(seed + q * 7919);
        let exact: Vec<(uuid::Uuid,)> =
            sqlx::query_as("SELECT event_id FROM stored_embeddings ORDER BY embedding <=> $1, event_id LIMIT 10")
                .bind(pgvector::Vector::from(query.clone()))
                .fetch_all(pool)
                .await?;
        let exact: HashSet<String> = exact.into_iter().map(|(id,)| id.to_string()).collect();
        let started = Instant::now();
        let hits = search
            .search_similar(pb::SearchSimilarRequest {
                query: Some(pb::search_similar_request::Query::Vector(pb::Vector { values: query })),
                top_k: 10,
                ..Default::default()
            })
            .await?
            .into_inner()
            .hits;
        latency.saturating_record(micros(started.elapsed()));
        found += hits.iter().filter(|hit| exact.contains(&hit.event_id)).count();
    }
    Ok((found as f64 / (RECALL_QUERIES as usize * 10) as f64, latency))
}

async fn fresh_rows(pool: &PgPool) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM fresh_embeddings")
        .fetch_one(pool)
        .await?)
}

/// The plain-SQL ceiling: single-row inserts into `table`.
async fn plain_sql(pool: &PgPool, table: &'static str, spec: LoadSpec, name: &str) -> LoadReport {
    let pool = pool.clone();
    load::drive(name, spec, move |i| {
        let pool = pool.clone();
        async move {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO {table} (embedding) VALUES ($1)"
            )))
            .bind(pgvector::Vector::from(clustered(1_000_000_000 + i)))
            .execute(&pool)
            .await
            .map(|_| 1)
            .map_err(|e| e.to_string())
        }
    })
    .await
}

struct DeferredRun {
    report: LoadReport,
    /// (seconds into the run, fresh rows), every BACKLOG_EVERY.
    backlog_timeline: Vec<(u64, i64)>,
    visibility: Visibility,
    backlog: i64,
    recall_with_backlog: (f64, Histogram<u64>),
    drained_in: Duration,
    recall_drained: (f64, Histogram<u64>),
}

/// A deferred-indexing scenario with the probe, then drain and recall.
async fn deferred_run(
    server: &Server,
    pool: &PgPool,
    spec: LoadSpec,
    name: &str,
    batched: bool,
    seed: u64,
) -> anyhow::Result<DeferredRun> {
    let done = Arc::new(AtomicBool::new(false));
    let probe = tokio::spawn(probe_visibility(server.channel.clone(), done.clone(), seed));
    let sampler = {
        let (pool, done) = (pool.clone(), done.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let mut backlog = Vec::new();
            while !done.load(Ordering::Relaxed) {
                tokio::time::sleep(BACKLOG_EVERY).await;
                if let Ok(rows) = fresh_rows(&pool).await {
                    backlog.push((started.elapsed().as_secs(), rows));
                }
            }
            backlog
        })
    };
    let channel = server.channel.clone();
    let report = load::drive(name, spec, move |i| {
        let mut client = AuditWriteClient::new(channel.clone());
        async move {
            if batched {
                let requests = (0..BATCH as u64)
                    .map(|j| write(seed + i * BATCH as u64 + j, format!("b{seed}-{i}-{}", j / 4)))
                    .collect();
                client
                    .batch_write_audit(pb::BatchWriteAuditRequest { requests })
                    .await
                    .map(|_| BATCH as u64)
                    .map_err(load::code)
            } else {
                client
                    .write_audit(write(seed + i, format!("s{seed}-{}", i / 4)))
                    .await
                    .map(|_| 1)
                    .map_err(load::code)
            }
        }
    })
    .await;
    done.store(true, Ordering::Relaxed);
    let visibility = probe.await?;
    let backlog_timeline = sampler.await?;
    let backlog = fresh_rows(pool).await?;
    let recall_with_backlog = recall(&server.channel, pool, seed).await?;
    let started = Instant::now();
    while fresh_rows(pool).await? > 0 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let drained_in = started.elapsed();
    let recall_drained = recall(&server.channel, pool, seed).await?;
    Ok(DeferredRun {
        report,
        backlog_timeline,
        visibility,
        backlog,
        recall_with_backlog,
        drained_in,
        recall_drained,
    })
}

fn row(report: &LoadReport, baseline: f64) {
    println!(
        "| {} | {:.0} | {:.2} | {:.2} | {} | {:.2}x |",
        report.name,
        report.rate(),
        report.p(0.5),
        report.p(0.99),
        report.error_summary(),
        report.rate() / baseline
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let clients: usize = env_or("BENCH_CLIENTS", 16);
    let seconds: u64 = env_or("BENCH_INGEST_SECONDS", 20);
    let sustained_seconds: u64 = env_or("BENCH_INGEST_SUSTAINED_SECONDS", 60);
    let admin = std::env::var("DATASTORAGE_BENCH_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://datastorage:datastorage@127.0.0.1:55432/datastorage".into());
    let model_dir = std::env::var("DATASTORAGE_BENCH_MODEL_DIR")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/.cache/models/all-MiniLM-L6-v2").into());
    let results = std::env::var_os("BENCH_RESULTS_DIR").map(std::path::PathBuf::from);

    let mut conn = PgConnection::connect(&admin).await?;
    conn.execute("DROP DATABASE IF EXISTS ds_bench_ingest WITH (FORCE)")
        .await?;
    conn.execute("CREATE DATABASE ds_bench_ingest").await?;
    let url = format!("{}/ds_bench_ingest", admin.rsplit_once('/').unwrap().0);

    let graph = (
        env_or("BENCH_INGEST_HNSW_M", GRAPH_M),
        env_or("BENCH_INGEST_HNSW_EF_CONSTRUCTION", GRAPH_EF_CONSTRUCTION),
    );
    let inline = start(server_settings(&url, &model_dir, clients, false, graph)).await?;
    let deferred = start(server_settings(&url, &model_dir, clients, true, graph)).await?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(clients as u32 + 2)
        .connect(&url)
        .await?;
    pool.execute(
        "CREATE TABLE bench_hnsw (id bigserial PRIMARY KEY, embedding vector(384) NOT NULL); \
         CREATE INDEX ON bench_hnsw USING hnsw (embedding vector_cosine_ops); \
         CREATE TABLE bench_unindexed (id bigserial PRIMARY KEY, embedding vector(384) NOT NULL);",
    )
    .await?;

    println!(
        "## Ingest: caller-supplied embeddings vs the HNSW ceiling\n\n\
         {clients} clients (closed loop), {seconds} s per scenario, clustered 384-dim vectors. The service's \
         HNSW graph: m {}, ef_construction {} (vector_index.hnsw_*); the ceiling's \
         table: pgvector's defaults (16, 64).\n",
        graph.0, graph.1
    );
    let spec = LoadSpec {
        workers: clients,
        pace: Pace::ClosedLoop,
        duration: Duration::from_secs(seconds),
        bucket: Duration::from_secs(1),
    };
    let ceiling = plain_sql(
        &pool,
        "bench_hnsw",
        spec,
        "plain SQL INSERT, HNSW-indexed table (ceiling)",
    )
    .await;
    let unindexed = plain_sql(&pool, "bench_unindexed", spec, "plain SQL INSERT, no vector index").await;

    let channel = inline.channel.clone();
    let inline_report = load::drive("WriteAudit, HNSW in the write transaction", spec, move |i| {
        let mut client = AuditWriteClient::new(channel.clone());
        async move {
            client
                .write_audit(write(i, format!("i-{}", i / 4)))
                .await
                .map(|_| 1)
                .map_err(load::code)
        }
    })
    .await;
    let single = deferred_run(
        &deferred,
        &pool,
        spec,
        "WriteAudit, deferred indexing",
        false,
        10_000_000,
    )
    .await?;
    let batch_spec = LoadSpec {
        workers: clients.div_ceil(4).max(2),
        ..spec
    };
    let batched = deferred_run(
        &deferred,
        &pool,
        batch_spec,
        "BatchWriteAudit x100, deferred indexing",
        true,
        20_000_000,
    )
    .await?;
    // Not a burst: a fixed rate of 3x the ceiling just measured, held for
    // BENCH_INGEST_SUSTAINED_SECONDS, to show whether the indexer keeps up.
    let sustained_rate = 3.0 * ceiling.rate();
    let sustained = deferred_run(
        &deferred,
        &pool,
        LoadSpec {
            workers: 16,
            pace: Pace::FixedRate(sustained_rate / BATCH as f64),
            duration: Duration::from_secs(sustained_seconds),
            bucket: Duration::from_secs(1),
        },
        "BatchWriteAudit x100 at a fixed 3x the ceiling",
        true,
        30_000_000,
    )
    .await?;

    let base = ceiling.rate();
    println!("| scenario | events/s | p50 ms | p99 ms | errors | vs ceiling |\n|---|---:|---:|---:|---|---:|");
    for report in [
        &ceiling,
        &unindexed,
        &inline_report,
        &single.report,
        &batched.report,
        &sustained.report,
    ] {
        row(report, base);
    }
    println!(
        "\n| deferred scenario | searchable after ack: p50 / p99 / max ms (probes) | fresh backlog at end | \
         drained in | recall@10 with backlog (search p99 ms) | recall@10 drained (search p99 ms) |\n\
         |---|---|---:|---:|---:|---:|"
    );
    for run in [&single, &batched, &sustained] {
        println!(
            "| {} | {:.1} / {:.1} / {:.1} ({}) | {} | {:.1} s ({:.0} rows/s) | {:.3} ({:.1}) | {:.3} ({:.1}) |",
            run.report.name,
            ms(&run.visibility.lag, 0.5),
            ms(&run.visibility.lag, 0.99),
            ms(&run.visibility.lag, 1.0),
            run.visibility.probes,
            run.backlog,
            run.drained_in.as_secs_f64(),
            run.backlog as f64 / run.drained_in.as_secs_f64().max(0.001),
            run.recall_with_backlog.0,
            ms(&run.recall_with_backlog.1, 0.99),
            run.recall_drained.0,
            ms(&run.recall_drained.1, 0.99),
        );
    }
    println!(
        "\nFresh backlog during the fixed-rate run ({:.0} events/s offered), every {} s: {}\n",
        sustained_rate,
        BACKLOG_EVERY.as_secs(),
        sustained
            .backlog_timeline
            .iter()
            .map(|(at, rows)| format!("{at} s: {rows}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "Goal (issue 9): sustained ingest >= 3x the ceiling, searchable within 2 s, recall@10 >= 0.95. \
         WriteAudit deferred: {:.2}x; BatchWriteAudit deferred: {:.2}x closed loop, {:.2}x at the fixed rate.\n",
        single.report.rate() / base,
        batched.report.rate() / base,
        sustained.report.rate() / base
    );
    if let Some(dir) = results {
        for (report, file) in [
            (&ceiling, "ingest-ceiling"),
            (&inline_report, "ingest-inline"),
            (&single.report, "ingest-deferred"),
            (&batched.report, "ingest-deferred-batch"),
            (&sustained.report, "ingest-sustained-3x"),
        ] {
            load::write_percentiles(report, &dir, file)?;
        }
    }
    let _ = inline.stop.send(());
    let _ = deferred.stop.send(());
    Ok(())
}
