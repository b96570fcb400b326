//! `make bench`: WriteAudit throughput and latency against the same inserts
//! done by plain SQL on the same database, measured side by side in one run.
//!
//! Scenarios (each with BENCH_CLIENTS concurrent clients for BENCH_SECONDS):
//! 1. plain SQL baseline: event + embedding + incident upsert in one transaction;
//! 2. WriteAudit with caller-supplied vectors;
//! 3. WriteAudit whose texts hit the embedding cache;
//! 4. WriteAudit with fresh texts embedded by the local model.
//!
//! Then the cost of the per-correlation hash chain: the baseline's
//! transaction with and without the chain append the service does (lock the
//! chain head, hash the canonical record, store the link, move the head), at 1
//! and at 1,000 distinct correlation ids. Ids rotate per call, so at 1,000
//! concurrent writers rarely share a chain and at 1 they all queue on one head.
//!
//! Last, what the service's own admission and observability cost (issue 7):
//! scenario 2's writes against two more servers on the same database, side
//! by side in alternating rounds.
//! - "all off": no authentication, no rate limit, no tracing, no metrics.
//! - "all on": HS256 JWT authentication (every call sends a bearer token
//!   with the audit:write scope), the per-caller rate limit at a rate far
//!   above the offered load (checked on every call, never refusing), the
//!   production subscriber (JSON logs plus the OpenTelemetry layer, filtered
//!   by RUST_LOG, default `info` as in production, so the RPC span and the
//!   service's INFO spans are built; a successful call logs only at DEBUG,
//!   so nothing is printed) and the Prometheus recorder. Spans are exported
//!   nowhere unless OTEL_EXPORTER_OTLP_ENDPOINT is set, which adds the export.
//!
//! The tracing subscriber and the metrics recorder are process-global, and
//! `Application::build` installs the recorder before anything else, so "off"
//! cannot come from not installing them. Each side's server and clients run
//! on a Tokio runtime of their own instead, and every thread of the "off"
//! runtime starts with thread-local defaults that win over the globals:
//! `Dispatch::none()` for tracing and `NoopRecorder` for metrics, what each
//! crate falls back to when nothing is installed. What is left on "off",
//! each well under a microsecond against a call of milliseconds: callsites
//! the global filter enables still build their spans (fields evaluated) and
//! hand them to the no-op subscriber, and `Observe` still asks the global
//! propagator for a `traceparent`. The gate's load shedding and call
//! deadline have no off switch and run on both sides. The run checks that
//! the sides are what they claim: spans reach the subscriber on "all on"
//! only, and the recorder counts exactly the "all on" calls.
//!
//! Both servers write to the one bench database: the same tables, indexes
//! and buffer cache, growing under both sides alike. Two fresh databases
//! would start equal and then differ in size, cache and autovacuum state.
//! Each side has its own pool, server and client connection; an unmeasured
//! warm-up opens them. Rounds alternate which side runs first (off, on; on,
//! off; ...) so that a steady drift, such as the tables growing, weighs on
//! both sides alike over each pair of rounds.
use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use datastorage::{
    config::{AuthSettings, LogFormat, Settings},
    integrity::chain::{ChainHasher, ChainRecord},
    proto::v1::{self as pb, audit_write_client::AuditWriteClient},
    startup::Application,
};
use hdrhistogram::Histogram;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use secrecy::SecretString;
use sqlx::{Connection, Executor, PgConnection, PgPool};
use tokio::{runtime::Runtime, sync::Mutex};
use tonic::{
    metadata::{Ascii, MetadataValue},
    transport::Channel,
};
use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest};

mod common;
use common::{env_or, remediation_event as event};

const DIMENSIONS: usize = 384;

struct Figures {
    name: &'static str,
    events: u64,
    elapsed: Duration,
    latency: Histogram<u64>,
}

impl Figures {
    fn rate(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64()
    }
    fn ms(&self, q: f64) -> f64 {
        self.latency.value_at_quantile(q) as f64 / 1000.0
    }
}

/// Runs `op(client_index, sequence)` from `clients` tasks for `seconds`.
async fn drive<F, Fut>(name: &'static str, clients: usize, seconds: u64, op: F) -> Figures
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let op = Arc::new(op);
    let histogram = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap()));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for client in 0..clients {
        let (op, histogram) = (op.clone(), histogram.clone());
        tasks.push(tokio::spawn(async move {
            let mut local = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
            let mut sequence = 0u64;
            while Instant::now() < deadline {
                let t = Instant::now();
                op(client, sequence).await;
                local.record(t.elapsed().as_micros().max(1) as u64).unwrap();
                sequence += 1;
            }
            histogram.lock().await.add(&local).unwrap();
            sequence
        }));
    }
    let mut events = 0;
    for task in tasks {
        events += task.await.unwrap();
    }
    let elapsed = started.elapsed();
    let latency = Arc::try_unwrap(histogram).unwrap().into_inner();
    Figures {
        name,
        events,
        elapsed,
        latency,
    }
}

fn unit_vector(seed: u64) -> Vec<f32> {
    // A cheap deterministic pseudo-random direction (xorshift); never all zeros.
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v: Vec<f32> = (0..DIMENSIONS)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % 2000) as f32 / 1000.0 - 1.0
        })
        .collect();
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter_mut().for_each(|x| *x /= norm);
    v
}

async fn plain_sql_write(pool: &PgPool, rr: String, vector: Vec<f32>) {
    plain_sql_write_in_chain(pool, rr.clone(), format!("corr-{rr}"), vector, None).await
}

/// The baseline transaction; with `chain`, also the service's chain append.
async fn plain_sql_write_in_chain(
    pool: &PgPool,
    rr: String,
    correlation_id: String,
    vector: Vec<f32>,
    chain: Option<&ChainHasher>,
) {
    let mut tx = pool.begin().await.unwrap();
    let id = uuid::Uuid::now_v7();
    let incident = uuid::Uuid::new_v4();
    let now = datastorage::domain::to_stored_precision(chrono::Utc::now() - chrono::TimeDelta::seconds(60));
    let payload = serde_json::json!({"kind": "remediation"});
    let link = match chain {
        None => None,
        Some(hasher) => {
            let (length, head): (i64, Option<Vec<u8>>) = sqlx::query_as(
                "INSERT INTO audit_chains (correlation_id, length) VALUES ($1, 0) \
                 ON CONFLICT (correlation_id) DO UPDATE SET length = audit_chains.length \
                 RETURNING length, head_hash",
            )
            .bind(&correlation_id)
            .fetch_one(&mut *tx)
            .await
            .unwrap();
            let record = ChainRecord {
                event_id: id,
                correlation_id: correlation_id.clone(),
                remediation_request_id: rr.clone(),
                occurred_at: now,
                received_at: now,
                namespace: "payments".into(),
                cluster: Some("prod".into()),
                kind: 1,
                labels: Default::default(),
                parent_event_id: None,
                payload: payload.clone(),
                source: "bench".into(),
                trace_id: None,
            };
            let link = hasher.link(head.as_deref(), &record.canonical_bytes());
            Some((length + 1, head, link.hash.to_vec()))
        }
    };
    sqlx::query(
        "INSERT INTO audit_events (id, occurred_at, incident_id, correlation_id, remediation_request_id, namespace, \
         cluster, kind, labels, payload, search_text, source, embedding_state, chain_seq, previous_event_hash, \
         event_hash, hash_algorithm) \
         VALUES ($1, $2, $3, $4, $5, 'payments', 'prod', 1, '{}', $6, 'HighMemoryUsage', 'bench', 3, $7, $8, $9, $10)",
    )
    .bind(id)
    .bind(now)
    .bind(incident)
    .bind(&correlation_id)
    .bind(&rr)
    .bind(&payload)
    .bind(link.as_ref().map(|l| l.0))
    .bind(link.as_ref().and_then(|l| l.1.clone()))
    .bind(link.as_ref().map(|l| l.2.clone()))
    .bind(link.as_ref().map(|_| "sha256"))
    .execute(&mut *tx)
    .await
    .unwrap();
    if let Some((length, _, hash)) = &link {
        sqlx::query("UPDATE audit_chains SET length = $2, head_hash = $3 WHERE correlation_id = $1")
            .bind(&correlation_id)
            .bind(length)
            .bind(hash)
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    // Where the service's write path puts it (deferred vector indexing, the default).
    sqlx::query("INSERT INTO fresh_embeddings (event_id, occurred_at, model_id, embedding) VALUES ($1, $2, 1, $3)")
        .bind(id)
        .bind(now)
        .bind(pgvector::Vector::from(vector))
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO incidents (id, remediation_request_id, correlation_id, namespace, first_stamp, first_seen_at, \
         last_event_at, event_count, alert_name) \
         VALUES ($1, $2, $3, 'payments', ROW($4, $5)::fact_stamp, $4, $4, 1, 'HighMemoryUsage') \
         ON CONFLICT (remediation_request_id) DO UPDATE SET event_count = incidents.event_count + 1, \
         last_event_at = GREATEST(incidents.last_event_at, EXCLUDED.last_event_at)",
    )
    .bind(incident)
    .bind(&rr)
    .bind(&correlation_id)
    .bind(now)
    .bind(id)
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let clients: usize = env_or("BENCH_CLIENTS", 16);
    let seconds: u64 = env_or("BENCH_SECONDS", 10);
    let rounds: usize = env_or("BENCH_OVERHEAD_ROUNDS", 2).max(1);
    let overhead_only = std::env::var("BENCH_OVERHEAD_ONLY").is_ok_and(|v| v == "1");
    let admin = std::env::var("DATASTORAGE_BENCH_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://datastorage:datastorage@127.0.0.1:55432/datastorage".into());
    let model_dir = std::env::var("DATASTORAGE_BENCH_MODEL_DIR")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/.cache/models/all-MiniLM-L6-v2").into());

    let mut conn = PgConnection::connect(&admin).await?;
    conn.execute("DROP DATABASE IF EXISTS ds_bench WITH (FORCE)").await?;
    conn.execute("CREATE DATABASE ds_bench").await?;
    let url = format!("{}/ds_bench", admin.rsplit_once('/').unwrap().0);

    println!("datastorage write benchmark: {clients} clients, {seconds} s per scenario, 1 event per call");
    if !overhead_only {
        against_plain_sql(&url, &model_dir, clients, seconds).await?;
    }
    observability_overhead(&url, &model_dir, clients, seconds, rounds).await
}

/// A bench server with a pool connection for every client.
fn server_settings(url: &str, model_dir: &str, clients: usize) -> Settings {
    let mut settings = common::server_settings(url, model_dir);
    settings.database.max_connections = clients as u32 + 4;
    // This bench compares the write transaction with its plain-SQL twin,
    // which leaves its embeddings in the fresh segment too. With the indexer
    // on, the service's side would also pay, on the same two cores, for
    // moving every row (the baseline's included) into HNSW. Indexing has its
    // own bench (`ingest`).
    settings.vector_index.indexer = false;
    settings
}

/// Scenarios 1-4 and the hash chain's cost.
async fn against_plain_sql(url: &str, model_dir: &str, clients: usize, seconds: u64) -> anyhow::Result<()> {
    let app = Application::build(server_settings(url, model_dir, clients)).await?;
    let port = app.port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));
    let channel = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}"))?
        .connect()
        .await?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(clients as u32)
        .connect(url)
        .await?;

    // The service creates partitions on demand; the baseline needs this month's too.
    sqlx::query("SELECT ensure_audit_partitions(now() - interval '1 minute')")
        .execute(&pool)
        .await?;
    let mut results = Vec::new();

    let p = pool.clone();
    results.push(
        drive("plain SQL (baseline)", clients, seconds, move |c, i| {
            let p = p.clone();
            async move { plain_sql_write(&p, format!("sql-{c}-{}", i / 4), unit_vector((c as u64) << 32 | i)).await }
        })
        .await,
    );

    let ch = channel.clone();
    results.push(
        drive("WriteAudit, caller vectors", clients, seconds, move |c, i| {
            let mut client = AuditWriteClient::new(ch.clone());
            async move {
                let request = pb::WriteAuditRequest {
                    event: Some(event(format!("vec-{c}-{}", i / 4), format!("vector {c} {i}"))),
                    request_id: String::new(),
                    embedding: Some(pb::Vector {
                        values: unit_vector((c as u64) << 32 | i),
                    }),
                };
                client.write_audit(request).await.unwrap();
            }
        })
        .await,
    );

    // Warm the cache with a small set of texts, then write only those.
    let mut warm = AuditWriteClient::new(channel.clone());
    for text in 0..64 {
        warm.write_audit(pb::WriteAuditRequest {
            event: Some(event("warm".into(), format!("cached text {text}"))),
            ..Default::default()
        })
        .await?;
    }
    let ch = channel.clone();
    results.push(
        drive("WriteAudit, cached embeddings", clients, seconds, move |c, i| {
            let mut client = AuditWriteClient::new(ch.clone());
            async move {
                let request = pb::WriteAuditRequest {
                    event: Some(event(format!("cache-{c}-{}", i / 4), format!("cached text {}", i % 64))),
                    ..Default::default()
                };
                let reply = client.write_audit(request).await.unwrap().into_inner();
                assert_eq!(reply.embedding_state(), pb::EmbeddingState::Cached);
            }
        })
        .await,
    );

    let ch = channel.clone();
    results.push(
        drive("WriteAudit, fresh local embeddings", clients, seconds, move |c, i| {
            let mut client = AuditWriteClient::new(ch.clone());
            async move {
                let request = pb::WriteAuditRequest {
                    event: Some(event(
                        format!("fresh-{c}-{}", i / 4),
                        format!("pod api-{c}-{i} restarted after liveness probe failure number {i}"),
                    )),
                    ..Default::default()
                };
                let reply = client.write_audit(request).await.unwrap().into_inner();
                assert_eq!(reply.embedding_state(), pb::EmbeddingState::Generated);
            }
        })
        .await,
    );

    let baseline = results[0].rate();
    println!(
        "\n| scenario | events/s | p50 ms | p95 ms | p99 ms | throughput vs plain SQL |\n|---|---:|---:|---:|---:|---:|"
    );
    for f in &results {
        println!(
            "| {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2}x |",
            f.name,
            f.rate(),
            f.ms(0.50),
            f.ms(0.95),
            f.ms(0.99),
            f.rate() / baseline
        );
    }

    // The chain's cost, side by side: each pair runs the same transaction with
    // and without the chain append.
    let mut chain_results = Vec::new();
    for ids in [1000u64, 1] {
        for chained in [false, true] {
            let name: &'static str = match (ids, chained) {
                (1000, false) => "1,000 correlation ids, no chain",
                (1000, true) => "1,000 correlation ids, chained",
                (_, false) => "1 correlation id, no chain",
                (_, true) => "1 correlation id, chained",
            };
            let p = pool.clone();
            let hasher = Arc::new(ChainHasher::unkeyed());
            chain_results.push(
                drive(name, clients, seconds, move |c, i| {
                    let (p, hasher) = (p.clone(), hasher.clone());
                    let sequence = (c as u64) << 32 | i;
                    async move {
                        plain_sql_write_in_chain(
                            &p,
                            format!("chain-{ids}-{chained}-{c}-{}", i / 4),
                            format!("corr-{ids}-{chained}-{}", (c as u64 * 7919 + i) % ids),
                            unit_vector(sequence),
                            chained.then_some(&*hasher),
                        )
                        .await
                    }
                })
                .await,
            );
        }
    }
    println!("\n| hash chain | events/s | p50 ms | p99 ms | chained vs unchained |\n|---|---:|---:|---:|---:|");
    for pair in chain_results.chunks(2) {
        for f in pair {
            println!(
                "| {} | {:.0} | {:.2} | {:.2} | {:.2}x |",
                f.name,
                f.rate(),
                f.ms(0.50),
                f.ms(0.99),
                f.rate() / pair[0].rate()
            );
        }
    }
    pool.close().await;
    // Its background work (health probes, samplers) must not run during the overhead rounds.
    let _ = stop.send(());
    server.await??;
    Ok(())
}

// ---------------------------------------------------------------------------
// Auth + tracing + metrics overhead

/// The HS256 secret of the "all on" server (at least 32 bytes).
const HS256_SECRET: &str = "bench-only-hs256-secret-of-at-least-32-bytes";
const ISSUER: &str = "https://issuer.bench";
/// The caller of the "all on" clients: one subject, so one rate-limit bucket.
const SUBJECT: &str = "bench-writer";
/// Calls per second (and burst) of that bucket: orders of magnitude above
/// what this harness offers, so every call is checked and none is refused.
const UNREACHED_RATE: u32 = 1_000_000;
const WARM_UP_SECONDS: u64 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Off,
    On,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Off => "all off",
            Side::On => "all on",
        }
    }

    fn id(self) -> &'static str {
        match self {
            Side::Off => "off",
            Side::On => "on",
        }
    }
}

/// What the `metrics` macros fall back to when no recorder is installed.
static NO_METRICS: metrics::NoopRecorder = metrics::NoopRecorder;

/// A side's runtime; see the module docs for why each side has its own.
/// Shut down in the background when dropped, which async code may do.
struct SideRuntime(Option<Runtime>);

impl SideRuntime {
    fn new(side: Side) -> std::io::Result<Self> {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.enable_all().thread_name(format!("bench-{}", side.id()));
        if side == Side::Off {
            builder.on_thread_start(|| {
                // Never dropped: the defaults hold for the thread's whole life.
                std::mem::forget(tracing::dispatcher::set_default(&tracing::Dispatch::none()));
                std::mem::forget(metrics::set_default_local_recorder(&NO_METRICS));
            });
        }
        Ok(SideRuntime(Some(builder.build()?)))
    }

    fn handle(&self) -> &tokio::runtime::Handle {
        self.0.as_ref().expect("present until dropped").handle()
    }
}

impl Drop for SideRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// One side's server, serving until its runtime is dropped.
struct SideServer {
    side: Side,
    channel: Channel,
    /// `Bearer <token>` for the "all on" server.
    bearer: Option<MetadataValue<Ascii>>,
    runtime: SideRuntime,
}

impl SideServer {
    async fn start(side: Side, settings: Settings) -> anyhow::Result<Self> {
        let bearer = match side {
            Side::Off => None,
            Side::On => Some(bearer_token(&settings.auth)?),
        };
        let runtime = SideRuntime::new(side)?;
        let channel = runtime
            .handle()
            .spawn(async move {
                let app = Application::build(settings).await?;
                let port = app.port();
                tokio::spawn(app.run_until_stopped(std::future::pending()));
                let channel = Channel::from_shared(format!("http://127.0.0.1:{port}"))?
                    .connect()
                    .await?;
                wait_until_serving(channel.clone()).await?;
                anyhow::Ok(channel)
            })
            .await??;
        Ok(SideServer {
            side,
            channel,
            bearer,
            runtime,
        })
    }

    /// Whether spans made on this side's runtime reach a subscriber.
    async fn traced(&self) -> anyhow::Result<bool> {
        let probe = async { tracing::dispatcher::get_default(|d| !d.is::<tracing::subscriber::NoSubscriber>()) };
        Ok(self.runtime.handle().spawn(probe).await?)
    }

    /// Scenario 2's writes for `seconds`, clients on this side's runtime;
    /// `round` keeps each run's remediation requests apart.
    async fn writes(&self, round: usize, clients: usize, seconds: u64) -> anyhow::Result<Figures> {
        let (channel, bearer) = (self.channel.clone(), self.bearer.clone());
        let run = format!("{}-{round}", self.side.id());
        let op = move |c: usize, i: u64| {
            let mut client = AuditWriteClient::new(channel.clone());
            let mut request = tonic::Request::new(pb::WriteAuditRequest {
                event: Some(event(format!("{run}-{c}-{}", i / 4), format!("vector {c} {i}"))),
                request_id: String::new(),
                embedding: Some(pb::Vector {
                    values: unit_vector((c as u64) << 32 | i),
                }),
            });
            if let Some(bearer) = &bearer {
                request.metadata_mut().insert("authorization", bearer.clone());
            }
            async move {
                // A refusal (an expired token, the rate limit) would void the comparison.
                client.write_audit(request).await.expect("every write is admitted");
            }
        };
        let name = self.side.name();
        Ok(self.runtime.handle().spawn(drive(name, clients, seconds, op)).await?)
    }
}

/// WriteAudit calls answered OK, as the process's Prometheus recorder counts them.
fn recorded_writes() -> u64 {
    let text = datastorage::metrics::render();
    let handled = format!("{}{{", datastorage::metrics::GRPC_HANDLED);
    text.lines()
        .filter(|line| {
            line.starts_with(&handled)
                && line.contains("grpc_method=\"WriteAudit\"")
                && line.contains("grpc_code=\"OK\"")
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// The "all on" server: JWT authentication, a rate limit that is never reached.
fn all_on(settings: &mut Settings) {
    settings.auth.disabled = false;
    settings.auth.issuer = ISSUER.into();
    settings.auth.hs256_secret = Some(SecretString::from(HS256_SECRET));
    settings.rate_limit.enabled = true;
    settings.rate_limit.requests_per_second = UNREACHED_RATE;
    settings.rate_limit.burst = UNREACHED_RATE;
}

/// `Bearer <token>`: HS256, accepted by a server with `auth`, valid for an hour.
fn bearer_token(auth: &AuthSettings) -> anyhow::Result<MetadataValue<Ascii>> {
    let now = chrono::Utc::now().timestamp();
    let claims = serde_json::json!({
        "sub": SUBJECT,
        "iss": auth.issuer,
        "aud": auth.audiences.first().context("auth.audiences is empty")?,
        "iat": now,
        "exp": now + 3600,
        "scope": "audit:write",
    });
    let token = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(HS256_SECRET.as_bytes())?,
    )?;
    Ok(format!("Bearer {token}").parse()?)
}

/// Health reports SERVING once the server has probed PostgreSQL: its start-up
/// is over, and what it logs on the way is not in the measurement.
async fn wait_until_serving(channel: Channel) -> anyhow::Result<()> {
    let mut health = HealthClient::new(channel);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let reply = health.check(HealthCheckRequest { service: String::new() }).await;
        if reply.is_ok_and(|reply| reply.into_inner().status() == ServingStatus::Serving) {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "the bench server is not SERVING after 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// "All off" against "all on", `rounds` runs of each; see the module docs.
async fn observability_overhead(
    url: &str,
    model_dir: &str,
    clients: usize,
    seconds: u64,
    rounds: usize,
) -> anyhow::Result<()> {
    let off = SideServer::start(Side::Off, server_settings(url, model_dir, clients)).await?;
    let mut settings = server_settings(url, model_dir, clients);
    all_on(&mut settings);
    let on = SideServer::start(Side::On, settings).await?;
    // Installed once both servers serve, so their start-up logs print nowhere;
    // in the runtime, which the OTLP exporter (when configured) needs.
    let telemetry = on
        .runtime
        .handle()
        .spawn(async { datastorage::telemetry::init(LogFormat::Json) })
        .await?;

    anyhow::ensure!(
        !off.traced().await? && on.traced().await?,
        "spans must reach the subscriber on the all-on side only"
    );
    let recorded_before = recorded_writes();
    let mut on_calls = 0;
    for server in [&off, &on] {
        let warm_up = server.writes(0, clients, seconds.min(WARM_UP_SECONDS)).await?;
        if server.side == Side::On {
            on_calls += warm_up.events;
        }
    }
    let mut runs = Vec::new();
    for round in 1..=rounds {
        let order = if round % 2 == 1 { [&off, &on] } else { [&on, &off] };
        for server in order {
            let figures = server.writes(round, clients, seconds).await?;
            if server.side == Side::On {
                on_calls += figures.events;
            }
            runs.push((round, server.side, figures));
        }
    }
    report_overhead(&runs, rounds, clients, seconds);
    let recorded = recorded_writes() - recorded_before;
    anyhow::ensure!(
        recorded == on_calls,
        "the recorder counted {recorded} WriteAudit calls, the all-on side made {on_calls}: the all-off side recorded metrics"
    );
    println!(
        "Checked: spans reach the subscriber on the all-on side only, and the Prometheus recorder counted exactly the \
         all-on side's {on_calls} calls."
    );

    drop((off, on));
    telemetry.shutdown();
    Ok(())
}

fn report_overhead(runs: &[(usize, Side, Figures)], rounds: usize, clients: usize, seconds: u64) {
    let of = |round: usize, side: Side| {
        &runs
            .iter()
            .find(|(r, s, _)| (*r, *s) == (round, side))
            .expect("each round runs both sides")
            .2
    };
    println!(
        "\nAuth + tracing + metrics overhead on WriteAudit with caller vectors: {rounds} rounds of {seconds} s per \
         side, {clients} clients, the side that runs first alternating. all off = auth disabled, no rate limit, no \
         tracing subscriber, no metrics recorder; all on = HS256 JWT + rate limit (checked, never reached) + spans \
         through the JSON and OpenTelemetry subscriber (RUST_LOG, default info) + Prometheus metrics. Goal: under \
         10% on throughput and p99."
    );
    println!("\n| run | events/s | p50 ms | p99 ms | throughput on/off | p99 on/off |\n|---|---:|---:|---:|---:|---:|");
    let (mut throughput_ratios, mut p99_ratios) = (Vec::new(), Vec::new());
    for (round, side, f) in runs {
        let ratios = match side {
            Side::Off => " | ".to_owned(),
            Side::On => {
                let off = of(*round, Side::Off);
                let (throughput, p99) = (f.rate() / off.rate(), f.ms(0.99) / off.ms(0.99));
                throughput_ratios.push(throughput);
                p99_ratios.push(p99);
                format!("{throughput:.3}x | {p99:.3}x")
            }
        };
        println!(
            "| {}, round {round} | {:.0} | {:.2} | {:.2} | {ratios} |",
            f.name,
            f.rate(),
            f.ms(0.50),
            f.ms(0.99)
        );
    }
    let pooled = |side: Side| {
        let mut all = Figures {
            name: side.name(),
            events: 0,
            elapsed: Duration::ZERO,
            latency: Histogram::new_with_bounds(1, 60_000_000, 3).unwrap(),
        };
        for (_, _, f) in runs.iter().filter(|(_, s, _)| *s == side) {
            all.events += f.events;
            all.elapsed += f.elapsed;
            all.latency.add(&f.latency).expect("histograms of the same bounds");
        }
        all
    };
    let (off, on) = (pooled(Side::Off), pooled(Side::On));
    println!(
        "| all off, all rounds | {:.0} | {:.2} | {:.2} | | |",
        off.rate(),
        off.ms(0.50),
        off.ms(0.99)
    );
    println!(
        "| all on, all rounds | {:.0} | {:.2} | {:.2} | {:.3}x | {:.3}x |",
        on.rate(),
        on.ms(0.50),
        on.ms(0.99),
        on.rate() / off.rate(),
        on.ms(0.99) / off.ms(0.99)
    );
    let (throughput, p99) = (median(&mut throughput_ratios), median(&mut p99_ratios));
    println!(
        "\nMedian of the per-round ratios: throughput {throughput:.3}x ({:+.1}%), p99 {p99:.3}x ({:+.1}%); goal: \
         throughput above 0.90x and p99 below 1.10x.",
        (throughput - 1.0) * 100.0,
        (p99 - 1.0) * 100.0
    );
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    if values.len().is_multiple_of(2) {
        (values[middle - 1] + values[middle]) / 2.0
    } else {
        values[middle]
    }
}
