//! Crash faults, run against the built program: `datastorage serve` is killed
//! with SIGKILL mid-load and restarted on the same database while clients
//! retry unacknowledged writes with their idempotency keys. Afterwards the
//! rows must show that a write is either wholly committed once or not at all.
//!
//! `DATASTORAGE_TEST_FAULT_SEED` replays a run's kill schedule and load (the
//! seed is printed in the summary line; timing still varies).
use std::{
    collections::{HashMap, HashSet},
    io::BufRead,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use datastorage::proto::v1::{
    self as pb, audit_write_client::AuditWriteClient, incident_query_client::IncidentQueryClient,
};
use serde_json::Value;
use sqlx::{AssertSqlSafe, Connection, Executor, PgConnection};
use tokio::sync::watch;
use tonic::{transport::Channel, Code};

// The API tests' helpers, for the database URL, the model and a valid event.
#[allow(dead_code)]
#[path = "api/helpers.rs"]
mod helpers;
use helpers::{admin_url, model_dir, remediation_event, SplitMix};

const WRITERS: usize = 4;
const WRITES_PER_WRITER: usize = 60;
const DIMENSIONS: usize = 384;
/// The whole load, kills and restarts included, must end within this.
const LOAD_DEADLINE: Duration = Duration::from_secs(120);
/// How long a kill may wait past its moment for a write to be in flight.
const NUDGE: Duration = Duration::from_millis(200);

fn database_url(name: &str) -> String {
    let admin = admin_url();
    let (base, _) = admin.rsplit_once('/').expect("database URL has a path");
    format!("{base}/{name}")
}

/// Uniform in `low..=high`.
fn between(rng: &mut SplitMix, low: u64, high: u64) -> u64 {
    low + rng.next() % (high - low + 1)
}

/// A unit vector of the seeded sequence.
fn unit_vector(rng: &mut SplitMix) -> Vec<f32> {
    let raw: Vec<f32> = (0..DIMENSIONS)
        .map(|_| (rng.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
        .collect();
    let norm = raw.iter().map(|x| x * x).sum::<f32>().sqrt();
    raw.into_iter().map(|x| x / norm).collect()
}

/// One `datastorage serve` process; SIGKILLed if the test ends early.
/// `provider_down` serves the same model name from an unreachable embedding
/// API, so that text-only writes are stored DEFERRED with a pending marker.
struct Served {
    child: Option<Child>,
    address: String,
}

impl Served {
    async fn start(database: &str, provider_down: bool) -> Served {
        let mut command = Command::new(env!("CARGO_BIN_EXE_datastorage"));
        if provider_down {
            command.envs([
                ("DATASTORAGE_EMBEDDING__PROVIDER", "openai"),
                ("DATASTORAGE_EMBEDDING__OPENAI__BASE_URL", "http://127.0.0.1:1"),
                ("DATASTORAGE_EMBEDDING__OPENAI__MODEL", "all-MiniLM-L6-v2"),
                ("DATASTORAGE_EMBEDDING__OPENAI__DIMENSIONS", "384"),
                ("DATASTORAGE_EMBEDDING__OPENAI__MAX_RETRIES", "0"),
            ]);
        }
        let mut child = command
            .arg("serve")
            .env("DATASTORAGE_DATABASE__URL", database_url(database))
            .env("DATASTORAGE_EMBEDDING__MODEL_DIR", model_dir())
            .env("DATASTORAGE_AUTH__DISABLED", "true")
            // The load is the test's own; throttling it would only slow the run.
            .env("DATASTORAGE_RATE_LIMIT__ENABLED", "false")
            .env("DATASTORAGE_GRPC__HOST", "127.0.0.1")
            .env("DATASTORAGE_GRPC__PORT", "0")
            .env("DATASTORAGE_HTTP__HOST", "127.0.0.1")
            .env("DATASTORAGE_HTTP__PORT", "0")
            .env("DATASTORAGE_SHUTDOWN__DRAIN_DELAY_MS", "0")
            .env("DATASTORAGE_LOG__FORMAT", "json")
            .env("RUST_LOG", "info")
            .env_remove("DATASTORAGE_CONFIG")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the binary starts");
        // A thread drains stdout for the process's whole life, so the pipe never fills.
        let (address_tx, address_rx) = tokio::sync::oneshot::channel::<String>();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            let mut address_tx = Some(address_tx);
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                let Ok(json) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                if json["message"] == "gRPC listening" {
                    if let (Some(tx), Some(address)) = (address_tx.take(), json["address"].as_str()) {
                        let _ = tx.send(format!("http://{address}"));
                    }
                }
            }
        });
        let address = tokio::time::timeout(Duration::from_secs(60), address_rx)
            .await
            .expect("the server listens within a minute")
            .expect("the server exited before listening");
        Served {
            child: Some(child),
            address,
        }
    }

    /// Sends `signal` and waits for the exit.
    async fn signal(&mut self, signal: &str) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("the server runs");
        let sent = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success(), "kill {signal}");
        tokio::time::timeout(
            Duration::from_secs(30),
            tokio::task::spawn_blocking(move || child.wait()),
        )
        .await
        .expect("the server exits")
        .unwrap()
        .unwrap()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One planned write: retried as exactly this request until it is answered OK.
#[derive(Clone)]
struct Planned {
    request: pb::WriteAuditRequest,
    provided: Option<Vec<f32>>,
}

fn plan(writer: usize, rng: &mut SplitMix, base: chrono::DateTime<chrono::Utc>) -> Vec<Planned> {
    (0..WRITES_PER_WRITER)
        .map(|n| {
            let occurred_at = base + chrono::TimeDelta::seconds((writer * WRITES_PER_WRITER + n) as i64);
            // Half bring their own vector; the other half have the local model embed distinct text.
            let provided = (n % 2 == 0).then(|| unit_vector(rng));
            let mut event = remediation_event(&format!("fault-rr-w{writer}"));
            event.correlation_id = format!("fault-corr-w{writer}");
            event.occurred_at = Some(prost_types::Timestamp {
                seconds: occurred_at.timestamp(),
                nanos: 0,
            });
            event.labels = [("writer".to_owned(), writer.to_string())].into();
            if let Some(pb::audit_event::Payload::Remediation(remediation)) = &mut event.payload {
                remediation.target.as_mut().expect("the helper sets a target").name = format!("api-{writer}");
                remediation.message =
                    format!("writer {writer} step {n}: container api-{writer} OOMKilled ({n} restarts)");
            }
            Planned {
                request: pb::WriteAuditRequest {
                    event: Some(event),
                    request_id: format!("w{writer}-{n}"),
                    embedding: provided.clone().map(|values| pb::Vector { values }),
                },
                provided,
            }
        })
        .collect()
}

/// What a writer was told: request id → the OK answer it finally got.
type Acknowledged = Vec<(String, pb::WriteAuditResponse)>;

#[derive(Default)]
struct LoadStats {
    /// Attempts that got no OK answer and were sent again.
    retries: AtomicUsize,
    /// OK answers with `duplicate = true`: an earlier attempt had committed unacknowledged.
    duplicates: AtomicUsize,
    /// Calls awaiting an answer right now.
    in_flight: AtomicUsize,
    /// Writers still writing.
    running: AtomicUsize,
    /// Time without a listening server so far: the writers' schedule waits it out.
    downtime_ms: AtomicU64,
}

/// When a writer sends its writes: spread evenly over the kill schedule's
/// uptime and a margin past it, so every kill lands mid-load however fast
/// the machine; downtime shifts the schedule, and a writer that falls behind
/// (a slow machine, the backlog after a restart) sends at once.
#[derive(Clone, Copy)]
struct Pace {
    start: Instant,
    interval: Duration,
}

/// Sends each planned write, in order, until it is answered OK, following the
/// server to whatever address it restarts on.
async fn writer(
    mut rng: SplitMix,
    pace: Pace,
    plans: Vec<Planned>,
    mut address: watch::Receiver<String>,
    stats: Arc<LoadStats>,
) -> Acknowledged {
    let mut client: Option<(String, AuditWriteClient<Channel>)> = None;
    let mut acknowledged = Vec::with_capacity(plans.len());
    let offset = pace.interval.mul_f64(between(&mut rng, 0, 100) as f64 / 100.0);
    for (n, planned) in plans.into_iter().enumerate() {
        let downtime = Duration::from_millis(stats.downtime_ms.load(Ordering::SeqCst));
        tokio::time::sleep_until((pace.start + offset + downtime + pace.interval * n as u32).into()).await;
        loop {
            let current = address.borrow_and_update().clone();
            let mut audit = match &client {
                Some((connected_to, audit)) if *connected_to == current => audit.clone(),
                _ => match Channel::from_shared(current.clone())
                    .unwrap()
                    .connect_timeout(Duration::from_secs(1))
                    .connect()
                    .await
                {
                    Ok(channel) => {
                        client = Some((current, AuditWriteClient::new(channel)));
                        continue;
                    }
                    Err(_) => {
                        // Down: wait for the restart's address (or poll, in case it is the same).
                        let _ = tokio::time::timeout(Duration::from_millis(50), address.changed()).await;
                        continue;
                    }
                },
            };
            stats.in_flight.fetch_add(1, Ordering::SeqCst);
            let answer =
                tokio::time::timeout(Duration::from_secs(10), audit.write_audit(planned.request.clone())).await;
            stats.in_flight.fetch_sub(1, Ordering::SeqCst);
            match answer {
                Ok(Ok(response)) => {
                    let response = response.into_inner();
                    if response.duplicate {
                        stats.duplicates.fetch_add(1, Ordering::SeqCst);
                    }
                    acknowledged.push((planned.request.request_id.clone(), response));
                    break;
                }
                Ok(Err(status)) if matches!(status.code(), Code::InvalidArgument | Code::AlreadyExists) => {
                    panic!(
                        "{}: a retry of the same write was refused: {status:?}",
                        planned.request.request_id
                    )
                }
                _ => {
                    stats.retries.fetch_add(1, Ordering::SeqCst);
                    client = None;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }
    stats.running.fetch_sub(1, Ordering::SeqCst);
    acknowledged
}

#[derive(sqlx::FromRow)]
struct StoredEvent {
    id: uuid::Uuid,
    correlation_id: String,
    embedding_state: i16,
    embedded: bool,
    pending: bool,
}

/// The reliability issue's crash test: a load generator writes with request
/// ids while the server is SIGKILLed at random moments and restarted; the
/// clients retry unacknowledged writes with the same request id. Every
/// acknowledged event then exists exactly once, none twice, each chain
/// verifies, and every event has its embedding or its pending marker.
#[tokio::test(flavor = "multi_thread")]
async fn sigkill_mid_load_loses_no_acknowledged_write_and_writes_none_twice() {
    let database = format!("ds_fault_test_{}", uuid::Uuid::new_v4().simple());
    let mut admin = PgConnection::connect(&admin_url())
        .await
        .expect("PostgreSQL is up (make dev-up)");
    admin
        .execute(AssertSqlSafe(format!(r#"CREATE DATABASE "{database}""#)))
        .await
        .unwrap();
    // Run in a task so that a failure still drops the database (the servers die with it).
    let outcome = tokio::spawn(crash_under_load(database.clone())).await;
    admin
        .execute(AssertSqlSafe(format!(r#"DROP DATABASE "{database}" WITH (FORCE)"#)))
        .await
        .unwrap();
    if let Err(failure) = outcome {
        std::panic::resume_unwind(failure.into_panic());
    }
}

async fn crash_under_load(database: String) {
    let seed = std::env::var("DATASTORAGE_TEST_FAULT_SEED")
        .ok()
        .map(|s| s.parse::<u64>().expect("DATASTORAGE_TEST_FAULT_SEED is a number"))
        .unwrap_or_else(|| uuid::Uuid::new_v4().as_u64_pair().0);
    let mut rng = SplitMix(seed);
    let started = Instant::now();
    let base = chrono::Utc::now() - chrono::TimeDelta::hours(1);
    let plans: Vec<Vec<Planned>> = (0..WRITERS).map(|w| plan(w, &mut rng, base)).collect();

    // The kill schedule, drawn up front so that the writers' pace can cover it.
    let kill_after: Vec<Duration> = (0..between(&mut rng, 3, 5))
        .map(|_| Duration::from_millis(between(&mut rng, 200, 900)))
        .collect();
    let uptime: Duration = kill_after.iter().sum::<Duration>() + NUDGE * kill_after.len() as u32;
    let mut server = Served::start(&database, false).await;
    let pace = Pace {
        start: Instant::now(),
        interval: (uptime.mul_f64(1.25) + Duration::from_millis(300)) / WRITES_PER_WRITER as u32,
    };
    let (address_tx, address_rx) = watch::channel(server.address.clone());
    let stats = Arc::new(LoadStats::default());
    stats.running.store(WRITERS, Ordering::SeqCst);
    let writers: Vec<_> = plans
        .iter()
        .enumerate()
        .map(|(w, planned)| {
            let writer_rng = SplitMix(seed ^ (w as u64 + 1).wrapping_mul(0xA24B_AED4_963E_E407));
            tokio::spawn(writer(
                writer_rng,
                pace,
                planned.clone(),
                address_rx.clone(),
                stats.clone(),
            ))
        })
        .collect();

    // The killer: SIGKILL at random moments while the writers write, restart on the same database.
    let mut in_flight_at_kill = Vec::new();
    let load = async {
        for (kill, after) in kill_after.iter().enumerate() {
            tokio::time::sleep(*after).await;
            // Nudged to a moment when a write is in flight (briefly), so that each kill interrupts one.
            let nudged = Instant::now();
            while stats.in_flight.load(Ordering::SeqCst) == 0 && nudged.elapsed() < NUDGE {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            assert!(
                stats.running.load(Ordering::SeqCst) > 0,
                "the load ended before kill {} of {}",
                kill + 1,
                kill_after.len()
            );
            in_flight_at_kill.push(stats.in_flight.load(Ordering::SeqCst));
            let down = Instant::now();
            let killed = server.signal("-KILL").await;
            assert!(!killed.success(), "SIGKILL ends the server: {killed:?}");
            // Every other restart also loses its embedding provider.
            server = Served::start(&database, kill % 2 == 1).await;
            stats
                .downtime_ms
                .fetch_add(down.elapsed().as_millis() as u64, Ordering::SeqCst);
            address_tx.send_replace(server.address.clone());
        }
        let mut acknowledged: Vec<Acknowledged> = Vec::new();
        for writer in writers {
            acknowledged.push(writer.await.expect("the writer finishes"));
        }
        acknowledged
    };
    let acknowledged = tokio::time::timeout(LOAD_DEADLINE, load).await.unwrap_or_else(|_| {
        panic!(
            "the load did not finish within {LOAD_DEADLINE:?} (seed {seed}, {} writers still running)",
            stats.running.load(Ordering::SeqCst)
        )
    });

    // Each writer's chain, verified by the last server before it stops.
    let mut incidents = IncidentQueryClient::connect(server.address.clone()).await.unwrap();
    for w in 0..WRITERS {
        let correlation_id = format!("fault-corr-w{w}");
        let report = incidents
            .verify_audit_chain(pb::VerifyAuditChainRequest {
                correlation_id: correlation_id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(report.valid, "{correlation_id}'s chain verifies: {report:?}");
        assert_eq!(
            report.total_events, WRITES_PER_WRITER as i64,
            "{correlation_id}: {report:?}"
        );
        assert_eq!(
            report.verified_events, WRITES_PER_WRITER as i64,
            "{correlation_id}: {report:?}"
        );
    }
    let stopped = server.signal("-TERM").await;
    assert!(stopped.success(), "clean exit after SIGTERM: {stopped:?}");

    let mut db = PgConnection::connect(&database_url(&database)).await.unwrap();
    let events: Vec<StoredEvent> = sqlx::query_as(
        "SELECT e.id, e.correlation_id, e.embedding_state, \
         EXISTS (SELECT 1 FROM stored_embeddings x WHERE x.event_id = e.id AND x.occurred_at = e.occurred_at) AS embedded, \
         EXISTS (SELECT 1 FROM pending_embeddings p WHERE p.event_id = e.id) AS pending \
         FROM audit_events e",
    )
    .fetch_all(&mut db)
    .await
    .unwrap();
    let keys: Vec<(String, uuid::Uuid)> = sqlx::query_as("SELECT request_id, event_id FROM idempotency_keys")
        .fetch_all(&mut db)
        .await
        .unwrap();
    let total = WRITERS * WRITES_PER_WRITER;

    // Every acknowledged event is stored exactly once, under the request id that wrote it.
    let mut copies: HashMap<uuid::Uuid, usize> = HashMap::new();
    for event in &events {
        *copies.entry(event.id).or_default() += 1;
    }
    let key_of: HashMap<&str, uuid::Uuid> = keys.iter().map(|(r, e)| (r.as_str(), *e)).collect();
    let state_of: HashMap<uuid::Uuid, i16> = events.iter().map(|e| (e.id, e.embedding_state)).collect();
    let mut acked_ids = HashSet::new();
    let mut backfilled = 0;
    for (request_id, response) in acknowledged.iter().flatten() {
        let id: uuid::Uuid = response.event_id.parse().unwrap();
        assert_eq!(
            copies.get(&id).copied().unwrap_or(0),
            1,
            "{request_id}: acknowledged event {id} is stored exactly once"
        );
        assert_eq!(
            key_of.get(request_id.as_str()).copied(),
            Some(id),
            "{request_id}: its idempotency key names the acknowledged event"
        );
        // The acknowledged state, or DEFERRED completed since by the automatic backfill.
        let (acked, stored) = (response.embedding_state(), state_of[&id]);
        if acked == pb::EmbeddingState::Deferred && stored == pb::EmbeddingState::Generated as i16 {
            backfilled += 1;
        } else {
            assert_eq!(
                stored, acked as i16,
                "{request_id}: the stored embedding state is the acknowledged one"
            );
        }
        assert!(
            acked_ids.insert(id),
            "{request_id}: event {id} was acknowledged for two request ids"
        );
    }
    assert_eq!(acked_ids.len(), total, "every planned write was acknowledged once");
    // No event was written twice: none exists that no acknowledged write names.
    let extra: Vec<_> = events
        .iter()
        .filter(|e| !acked_ids.contains(&e.id))
        .map(|e| (e.id, &e.correlation_id))
        .collect();
    assert!(extra.is_empty(), "events no acknowledged write names: {extra:?}");
    assert_eq!(events.len(), total, "one event per request id");
    assert_eq!(keys.len(), total, "one idempotency key per request id");

    // No half-written transaction: embedding or pending marker as the state says,
    // the chain heads and the incident projection counted every event.
    let mut by_state = [0usize; 5];
    for event in &events {
        // (has its embedding, has a pending marker), as the state promises; the
        // backfill swaps one for the other and the state in one transaction.
        let expected = match event.embedding_state {
            1..=3 => (true, false),
            4 => (false, true),
            state => panic!(
                "event {} has embedding state {state}, yet every planned event has text",
                event.id
            ),
        };
        assert_eq!(
            (event.embedded, event.pending),
            expected,
            "event {} ({}) in embedding state {}: (embedding, pending marker)",
            event.id,
            event.correlation_id,
            event.embedding_state
        );
        by_state[event.embedding_state as usize] += 1;
    }
    let stored: HashMap<uuid::Uuid, pgvector::Vector> =
        sqlx::query_as::<_, (uuid::Uuid, pgvector::Vector)>("SELECT event_id, embedding FROM stored_embeddings")
            .fetch_all(&mut db)
            .await
            .unwrap()
            .into_iter()
            .collect();
    for (planned, (request_id, response)) in plans.iter().flatten().zip(acknowledged.iter().flatten()) {
        assert_eq!(&planned.request.request_id, request_id);
        let id: uuid::Uuid = response.event_id.parse().unwrap();
        match &planned.provided {
            Some(values) => {
                assert_eq!(response.embedding_state(), pb::EmbeddingState::Provided, "{request_id}");
                assert_eq!(
                    stored[&id].as_slice(),
                    &values[..],
                    "{request_id}: the caller's vector is stored"
                );
            }
            None => assert_ne!(response.embedding_state(), pb::EmbeddingState::Provided, "{request_id}"),
        }
    }
    for w in 0..WRITERS {
        let (length,): (i64,) = sqlx::query_as("SELECT length FROM audit_chains WHERE correlation_id = $1")
            .bind(format!("fault-corr-w{w}"))
            .fetch_one(&mut db)
            .await
            .unwrap();
        let (count,): (i64,) = sqlx::query_as("SELECT event_count FROM incidents WHERE remediation_request_id = $1")
            .bind(format!("fault-rr-w{w}"))
            .fetch_one(&mut db)
            .await
            .unwrap();
        assert_eq!(
            (length, count),
            (WRITES_PER_WRITER as i64, WRITES_PER_WRITER as i64),
            "writer {w}"
        );
    }

    println!(
        "faults: seed={seed} kills={} in_flight_at_kill={in_flight_at_kill:?} retries={} duplicate_answers={} \
         events={} (generated={} cached={} provided={} deferred={} backfilled={backfilled}) in {:.1?}",
        in_flight_at_kill.len(),
        stats.retries.load(Ordering::SeqCst),
        stats.duplicates.load(Ordering::SeqCst),
        events.len(),
        by_state[1],
        by_state[2],
        by_state[3],
        by_state[4],
        started.elapsed(),
    );
}
