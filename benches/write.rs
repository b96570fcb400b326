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
use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use datastorage::{
    config::{LogFormat, Settings},
    integrity::chain::{ChainHasher, ChainRecord},
    proto::v1::{self as pb, audit_write_client::AuditWriteClient},
    startup::Application,
};
use hdrhistogram::Histogram;
use secrecy::SecretString;
use sqlx::{Connection, Executor, PgConnection, PgPool};
use tokio::sync::Mutex;

mod common;
use common::env_or;

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

fn event(rr: String, message: String) -> pb::AuditEvent {
    pb::AuditEvent {
        correlation_id: format!("corr-{rr}"),
        remediation_request_id: rr,
        occurred_at: Some(prost_types::Timestamp {
            seconds: chrono::Utc::now().timestamp() - 60,
            nanos: 0,
        }),
        namespace: "payments".into(),
        cluster: "prod".into(),
        labels: Default::default(),
        parent_event_id: String::new(),
        payload: Some(pb::audit_event::Payload::Remediation(pb::RemediationAudit {
            signal_type: "prometheus-alert".into(),
            signal_name: "HighMemoryUsage".into(),
            severity: pb::Severity::Critical as i32,
            target: Some(pb::ResourceRef {
                kind: "Deployment".into(),
                name: "api".into(),
                namespace: "payments".into(),
            }),
            phase: pb::Phase::Processing as i32,
            message,
            ..Default::default()
        })),
    }
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
    sqlx::query("INSERT INTO audit_embeddings (event_id, occurred_at, model_id, embedding) VALUES ($1, $2, 1, $3)")
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
    let admin = std::env::var("DATASTORAGE_BENCH_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://datastorage:datastorage@127.0.0.1:55432/datastorage".into());
    let model_dir = std::env::var("DATASTORAGE_BENCH_MODEL_DIR")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/.cache/models/all-MiniLM-L6-v2").into());

    let mut conn = PgConnection::connect(&admin).await?;
    conn.execute("DROP DATABASE IF EXISTS ds_bench WITH (FORCE)").await?;
    conn.execute("CREATE DATABASE ds_bench").await?;
    let url = format!("{}/ds_bench", admin.rsplit_once('/').unwrap().0);

    let mut settings = Settings::default();
    settings.grpc.host = [127, 0, 0, 1].into();
    settings.grpc.port = 0;
    settings.http.host = [127, 0, 0, 1].into();
    settings.http.port = 0;
    settings.auth.disabled = true;
    settings.rate_limit.enabled = false;
    settings.database.url = SecretString::from(url.clone());
    settings.database.max_connections = clients as u32 + 4;
    settings.embedding.model_dir = model_dir.into();
    settings.log.format = LogFormat::Pretty;
    let app = Application::build(settings).await?;
    let port = app.port();
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));
    let channel = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}"))?
        .connect()
        .await?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(clients as u32)
        .connect(&url)
        .await?;

    // The service creates partitions on demand; the baseline needs this month's too.
    sqlx::query("SELECT ensure_audit_partitions(now() - interval '1 minute')")
        .execute(&pool)
        .await?;
    println!("datastorage write benchmark: {clients} clients, {seconds} s per scenario, 1 event per call");
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
    Ok(())
}
