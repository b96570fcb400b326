//! `make bench` (steady) and `make soak`: the built server binary under a
//! fixed-rate load for a long time, watched from outside.
//!
//! The server runs as its own process (`datastorage serve`, release build),
//! so its resident memory and open files are its own. Load, at fixed rates
//! with coordinated-omission correction (benches/common/load.rs):
//! - BENCH_STEADY_WRITES WriteAudit/s whose texts hit the embedding cache
//!   (64 texts written once before the run);
//! - BENCH_STEADY_SEARCHES SearchSimilar/s by text (cached query embeddings);
//! - BENCH_STEADY_QUERIES ListIncidents/s (one namespace, 50 per page).
//!
//! Every second a sampler reads the server's RSS and open file descriptors
//! (/proc) and its PostgreSQL connections (pg_stat_activity). With
//! BENCH_STEADY_RESTARTS=1, PostgreSQL is restarted (scripts/pg.sh) a third
//! of the way in and Redis (scripts/redis.sh) two thirds in; the server uses
//! Redis for jobs and the shared cache when DATASTORAGE_BENCH_REDIS_URL is set.
//!
//! Prints each load's totals and a timeline per BENCH_STEADY_BUCKET seconds:
//! p99 per load, errors, RSS, file descriptors and connections; with
//! BENCH_RESULTS_DIR, also the timeline as CSV for the plot.
use std::{
    io::BufRead,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use datastorage::proto::v1::{
    self as pb, audit_write_client::AuditWriteClient, incident_query_client::IncidentQueryClient,
    vector_search_client::VectorSearchClient,
};
use sqlx::{Connection, Executor, PgConnection};
use tonic::transport::Channel;

mod common;
use common::{
    env_or,
    load::{self, LoadReport, LoadSpec, Pace},
};

const TEXTS: u64 = 64;
const DATABASE: &str = "ds_bench_steady";

fn text(i: u64) -> String {
    format!(
        "pod api-{} in namespace payments restarted: liveness probe failed ({})",
        i % TEXTS,
        i % TEXTS
    )
}

fn event(rr: String, i: u64) -> pb::AuditEvent {
    common::recent_event(
        rr,
        format!("team-{}", i % 10),
        pb::audit_event::Payload::Custom(pb::CustomAudit {
            event_type: "steady".into(),
            text: text(i),
            ..Default::default()
        }),
    )
}

/// The server process; killed when dropped.
struct Server {
    child: Child,
    channel: Channel,
    /// What it logged at WARN or ERROR: message → count.
    warnings: Arc<Mutex<std::collections::BTreeMap<String, u64>>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_server(url: &str, redis: Option<&str>, model_dir: &str) -> anyhow::Result<Server> {
    let mut command = Command::new(env!("CARGO_BIN_EXE_datastorage"));
    command
        .arg("serve")
        .env("DATASTORAGE_DATABASE__URL", url)
        .env("DATASTORAGE_EMBEDDING__MODEL_DIR", model_dir)
        .env("DATASTORAGE_AUTH__DISABLED", "true")
        .env("DATASTORAGE_RATE_LIMIT__ENABLED", "false")
        .env("DATASTORAGE_GRPC__HOST", "127.0.0.1")
        .env("DATASTORAGE_GRPC__PORT", "0")
        .env("DATASTORAGE_HTTP__HOST", "127.0.0.1")
        .env("DATASTORAGE_HTTP__PORT", "0")
        .env("DATASTORAGE_LOG__FORMAT", "json")
        .env("RUST_LOG", "info")
        .env_remove("DATASTORAGE_CONFIG")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(redis) = redis {
        command.env("DATASTORAGE_REDIS__URL", redis);
    }
    let mut child = command.spawn()?;
    let stdout = child.stdout.take().expect("piped");
    let (address_tx, address_rx) = tokio::sync::oneshot::channel::<String>();
    let warnings = Arc::new(Mutex::new(std::collections::BTreeMap::new()));
    let logged = warnings.clone();
    // Drains stdout for the process's life, counting warnings and errors.
    std::thread::spawn(move || {
        let mut address_tx = Some(address_tx);
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let Ok(json) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if json["message"] == "gRPC listening" {
                if let (Some(tx), Some(address)) = (address_tx.take(), json["address"].as_str()) {
                    let _ = tx.send(format!("http://{address}"));
                }
            } else if json["level"] == "WARN" || json["level"] == "ERROR" {
                let message = format!(
                    "{} {}",
                    json["level"].as_str().unwrap_or(""),
                    json["message"].as_str().unwrap_or("")
                );
                *logged.lock().unwrap().entry(message).or_default() += 1;
            }
        }
    });
    let address = tokio::time::timeout(Duration::from_secs(60), address_rx).await??;
    let channel = Channel::from_shared(address)?.connect().await?;
    Ok(Server {
        child,
        channel,
        warnings,
    })
}

/// One sampler reading.
#[derive(Clone, Copy, Default)]
struct Sample {
    at: Duration,
    rss_kib: u64,
    fds: u64,
    connections: Option<i64>,
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn open_fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |dir| dir.count() as u64)
}

async fn connections(admin: &str) -> Option<i64> {
    let mut conn = tokio::time::timeout(Duration::from_secs(1), PgConnection::connect(admin))
        .await
        .ok()?
        .ok()?;
    sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE datname = $1")
        .bind(DATABASE)
        .fetch_one(&mut conn)
        .await
        .ok()
}

fn script(name: &str, action: &str) -> anyhow::Result<()> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts").join(name);
    let status = Command::new(&path).arg(action).stdout(Stdio::null()).status()?;
    anyhow::ensure!(status.success(), "{} {action} failed: {status}", path.display());
    Ok(())
}

fn restart(name: &str) -> anyhow::Result<()> {
    eprintln!("steady: restarting {name}");
    script(name, "stop")?;
    std::thread::sleep(Duration::from_secs(2));
    script(name, "start")
}

fn spec(rate: f64, seconds: u64, bucket: Duration) -> LoadSpec {
    LoadSpec {
        // Enough workers that a stall shows as latency, not as a slower rate.
        workers: ((rate / 10.0).ceil() as usize).clamp(4, 256),
        pace: Pace::FixedRate(rate),
        duration: Duration::from_secs(seconds),
        bucket,
    }
}

fn bucket_p99(report: Option<&LoadReport>, slot: usize) -> String {
    report
        .and_then(|r| r.timeline.get(slot))
        .filter(|b| b.ok_calls > 0)
        .map_or("-".into(), |b| {
            format!("{:.1}", b.latency.value_at_quantile(0.99) as f64 / 1000.0)
        })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let name: String = env_or("BENCH_STEADY_NAME", "steady".to_owned());
    let seconds: u64 = env_or("BENCH_STEADY_SECONDS", 300);
    let writes: f64 = env_or("BENCH_STEADY_WRITES", 500.0);
    let searches: f64 = env_or("BENCH_STEADY_SEARCHES", 0.0);
    let queries: f64 = env_or("BENCH_STEADY_QUERIES", 0.0);
    let restarts = env_or("BENCH_STEADY_RESTARTS", 0u8) == 1;
    let bucket = Duration::from_secs(env_or("BENCH_STEADY_BUCKET", 30));
    let admin = std::env::var("DATASTORAGE_BENCH_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://datastorage:datastorage@127.0.0.1:55432/datastorage".into());
    let redis = std::env::var("DATASTORAGE_BENCH_REDIS_URL").ok();
    let model_dir = std::env::var("DATASTORAGE_BENCH_MODEL_DIR")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/.cache/models/all-MiniLM-L6-v2").into());
    let results = std::env::var_os("BENCH_RESULTS_DIR").map(PathBuf::from);

    let mut conn = PgConnection::connect(&admin).await?;
    conn.execute(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)"
    )))
    .await?;
    conn.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {DATABASE}")))
        .await?;
    drop(conn);
    let url = format!("{}/{DATABASE}", admin.rsplit_once('/').unwrap().0);
    let server = start_server(&url, redis.as_deref(), &model_dir).await?;
    let pid = server.child.id();

    // Every text once, so that the run's writes and searches hit the cache.
    let mut warm = AuditWriteClient::new(server.channel.clone());
    for i in 0..TEXTS {
        warm.write_audit(pb::WriteAuditRequest {
            event: Some(event(format!("warm-{i}"), i)),
            ..Default::default()
        })
        .await?;
    }

    let started = Instant::now();
    let samples = Arc::new(Mutex::new(Vec::<Sample>::new()));
    let sampler = {
        let (samples, admin) = (samples.clone(), admin.clone());
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(1));
            loop {
                every.tick().await;
                let connections = connections(&admin).await;
                samples.lock().unwrap().push(Sample {
                    at: started.elapsed(),
                    rss_kib: rss_kib(pid),
                    fds: open_fds(pid),
                    connections,
                });
            }
        })
    };
    let restarter = restarts.then(|| {
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            std::thread::sleep(Duration::from_secs(seconds / 3));
            restart("pg.sh")?;
            std::thread::sleep(Duration::from_secs(seconds / 3));
            restart("redis.sh")
        })
    });

    let mut loads = Vec::new();
    let channel = server.channel.clone();
    loads.push(tokio::spawn(load::drive(
        "WriteAudit, cached embeddings",
        spec(writes, seconds, bucket),
        move |i| {
            let mut client = AuditWriteClient::new(channel.clone());
            async move {
                client
                    .write_audit(pb::WriteAuditRequest {
                        event: Some(event(format!("w-{}", i / 4), i)),
                        request_id: format!("steady-{i}"),
                        embedding: None,
                    })
                    .await
                    .map(|_| 1)
                    .map_err(load::code)
            }
        },
    )));
    if searches > 0.0 {
        let channel = server.channel.clone();
        loads.push(tokio::spawn(load::drive(
            "SearchSimilar by text",
            spec(searches, seconds, bucket),
            move |i| {
                let mut client = VectorSearchClient::new(channel.clone());
                async move {
                    client
                        .search_similar(pb::SearchSimilarRequest {
                            query: Some(pb::search_similar_request::Query::Text(text(i * 7))),
                            top_k: 10,
                            ..Default::default()
                        })
                        .await
                        .map(|_| 1)
                        .map_err(load::code)
                }
            },
        )));
    }
    if queries > 0.0 {
        let channel = server.channel.clone();
        loads.push(tokio::spawn(load::drive(
            "ListIncidents by namespace",
            spec(queries, seconds, bucket),
            move |i| {
                let mut client = IncidentQueryClient::new(channel.clone());
                async move {
                    client
                        .list_incidents(pb::ListIncidentsRequest {
                            filter: Some(pb::IncidentFilter {
                                namespace: format!("team-{}", i % 10),
                                ..Default::default()
                            }),
                            page_size: 50,
                            ..Default::default()
                        })
                        .await
                        .map(|_| 1)
                        .map_err(load::code)
                }
            },
        )));
    }
    let mut reports = Vec::new();
    for load in loads {
        reports.push(load.await?);
    }
    if let Some(restarter) = restarter {
        restarter.await??;
    }
    sampler.abort();
    let samples = samples.lock().unwrap().clone();

    println!(
        "## {name}: the server binary at a fixed rate for {seconds} s{}\n",
        if restarts {
            ", PostgreSQL restarted at 1/3, Redis at 2/3"
        } else {
            ""
        }
    );
    println!("| load | target/s | achieved/s | p50 ms | p95 ms | p99 ms | max ms | errors |\n|---|---:|---:|---:|---:|---:|---:|---|");
    for (report, target) in reports
        .iter()
        .zip([writes, searches, queries].into_iter().filter(|r| *r > 0.0))
    {
        println!(
            "| {} | {target:.0} | {:.1} | {:.2} | {:.2} | {:.2} | {:.1} | {} |",
            report.name,
            report.rate(),
            report.p(0.5),
            report.p(0.95),
            report.p(0.99),
            report.p(1.0),
            report.error_summary()
        );
    }
    println!(
        "\nLatency counts from when each call was due (coordinated omission corrected).\n\n\
         | from s | {} | errors | RSS MiB (max) | open fds (max) | PG connections (max) |\n|---:|{}---:|---:|---:|---:|",
        reports
            .iter()
            .map(|r| format!("{} p99 ms", r.name))
            .collect::<Vec<_>>()
            .join(" | "),
        "---:|".repeat(reports.len())
    );
    let mut csv = String::from("second,rss_mib,fds,connections\n");
    for s in &samples {
        csv.push_str(&format!(
            "{:.0},{:.1},{},{}\n",
            s.at.as_secs_f64(),
            s.rss_kib as f64 / 1024.0,
            s.fds,
            s.connections.map_or(String::new(), |c| c.to_string())
        ));
    }
    let slots = (seconds as f64 / bucket.as_secs_f64()).ceil() as usize;
    for slot in 0..slots {
        let from = bucket * slot as u32;
        let in_slot: Vec<&Sample> = samples
            .iter()
            .filter(|s| s.at >= from && s.at < from + bucket)
            .collect();
        let errors: u64 = reports
            .iter()
            .filter_map(|r| r.timeline.get(slot))
            .map(|b| b.errors)
            .sum();
        let max = |f: &dyn Fn(&Sample) -> Option<i64>| {
            in_slot
                .iter()
                .filter_map(|s| f(s))
                .max()
                .map_or("-".into(), |v| v.to_string())
        };
        println!(
            "| {} | {} | {errors} | {:.1} | {} | {} |",
            from.as_secs(),
            reports
                .iter()
                .map(|r| bucket_p99(Some(r), slot))
                .collect::<Vec<_>>()
                .join(" | "),
            in_slot.iter().map(|s| s.rss_kib).max().unwrap_or(0) as f64 / 1024.0,
            max(&|s| Some(s.fds as i64)),
            max(&|s| s.connections),
        );
    }
    let rss = |part: &[Sample]| part.iter().map(|s| s.rss_kib).max().unwrap_or(0) as f64 / 1024.0;
    let tenth = (samples.len() / 10).max(1);
    if samples.len() > 2 * tenth {
        println!(
            "\nRSS, max of the first tenth of the run: {:.1} MiB; of the last tenth: {:.1} MiB.\n",
            rss(&samples[..tenth]),
            rss(&samples[samples.len() - tenth..])
        );
    }
    let warnings = server.warnings.lock().unwrap().clone();
    if !warnings.is_empty() {
        println!("The server logged:\n");
        for (message, count) in warnings {
            println!("- {count} x {message}");
        }
        println!();
    }
    if let Some(dir) = results {
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(format!("{name}.timeline.csv")), csv)?;
        if let Some(writes) = reports.first() {
            load::write_percentiles(writes, &dir, &name)?;
        }
    }
    drop(server);
    Ok(())
}
