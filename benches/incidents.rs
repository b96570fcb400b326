//! `make bench`: IncidentQuery read latency against the same statements run
//! in plain SQL by psql, measured side by side in one run.
//!
//! 1. Seeds `ds_bench_incidents` with BENCH_EVENTS events across
//!    BENCH_INCIDENTS incidents (COPY, secondary indexes built afterwards),
//!    rows shaped exactly as the service writes them: one incident is also
//!    written through WriteAudit and compared column by column with what the
//!    seeder would have produced, then removed. BENCH_REUSE=1 keeps an
//!    already seeded database of the same sizes.
//! 2. Starts the real server in-process and checks that the bench's copies of
//!    the service's SQL (mirrored from src/storage/queries.rs) are the very
//!    statements the service prepares (pg_prepared_statements), with the
//!    same parameter types, and that both sides return the same rows.
//! 3. For each query: BENCH_ITERATIONS calls of the RPC over TCP, interleaved
//!    with as many EXECUTEs of the same prepared statement with the same
//!    parameters in one long-lived psql (`\timing`, so psql start-up is not
//!    in the figures), then the statement's EXPLAIN (ANALYZE, BUFFERS).
//! 4. The gRPC floor: a GetIncident refused by validation on the same
//!    channel, what any RPC costs before its statement, and each query's
//!    ratio with it taken off.
//! 5. With BENCH_BREAKDOWN=1, where the service's time goes: the Storage
//!    call in-process, with and without sqlx's ping before each acquire.
//!
//! Timings are reported, never asserted.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{BufRead, BufReader, Write as _},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    str::FromStr,
    time::{Duration, Instant},
};

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use chrono::{DateTime, TimeDelta, Utc};
use datastorage::{
    domain::{
        self, incident_id_for, AiAnalysis, AuditEvent, Custom, Execution, ExecutionStatus, IncidentFilter, IncidentKey,
        IncidentOrder, PagePosition, Payload, Phase, Remediation, ResourceRef, Severity, TimelineQuery, TimelineScope,
        Workflow,
    },
    grpc::render,
    proto::v1::{self as pb, audit_write_client::AuditWriteClient, incident_query_client::IncidentQueryClient},
    startup::Application,
    storage::{self, Storage, EVENT_COLUMNS, INCIDENT_COLUMNS},
};
use hdrhistogram::Histogram;
use sqlx::{AssertSqlSafe, Connection, PgConnection, Row};
use tonic::transport::Channel;
use uuid::Uuid;

mod common;
use common::{alert_name, env_or, histogram, micros, ms, row, ts, Rng, TEAMS};

const DATABASE: &str = "ds_bench_incidents";
/// Bump when the generated data changes, so BENCH_REUSE reseeds.
const SEED_VERSION: i32 = 1;
const PAGE_SIZE: usize = 50;
/// Incidents are spread over this many days before the seed's end.
const SPAN_DAYS: i64 = 182;
const DEEP_PAGE: usize = 50;
const GOAL_P99_MS: f64 = 20.0;
const GOAL_RATIO: f64 = 1.3;

// ---------------------------------------------------------------------------
// Deterministic data
// ---------------------------------------------------------------------------

const TIERS: [&str; 5] = ["api", "web", "worker", "batch", "db"];
const CLUSTERS: [&str; 3] = ["prod-eu-1", "prod-us-1", "staging-eu-1"];
const REGIONS: [&str; 3] = ["eu-west-1", "us-east-1", "ap-south-1"];
const ACTIONS: [&str; 10] = [
    "restart_pod",
    "scale_deployment",
    "rollback_deployment",
    "drain_node",
    "cordon_node",
    "increase_memory_limit",
    "clear_cache",
    "rotate_certificate",
    "restart_service",
    "delete_pod",
];
const ROOT_CAUSES: [&str; 10] = [
    "memory leak in the request handler after the last deploy",
    "connection pool exhausted by slow downstream queries",
    "node disk filled by unrotated container logs",
    "expired TLS certificate on the ingress",
    "bad configuration rolled out with the last release",
    "noisy neighbour saturating the node CPU",
    "image registry rate limit reached",
    "database lock contention from a long migration",
    "message queue consumer stuck on a poison message",
    "DNS resolution failures inside the cluster",
];

fn namespace(index: usize) -> String {
    format!("{}-{}", TEAMS[index % 10], TIERS[index / 10])
}

fn rrid(incident: u64) -> String {
    format!("rr-{incident:07}")
}

/// One event as generated, with the id and receive time the seeder gives it.
struct Generated {
    id: Uuid,
    received_at: DateTime<Utc>,
    event: AuditEvent,
}

fn at_micros(micros: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(micros).expect("timestamp in range")
}

/// A v7 id stamped with `at`, as the service's `Uuid::now_v7()` at receive time is.
fn v7_at(at: DateTime<Utc>) -> Uuid {
    let ts = uuid::Timestamp::from_unix(uuid::NoContext, at.timestamp() as u64, at.timestamp_subsec_nanos());
    Uuid::new_v7(ts)
}

/// The events of incident `k`: 10 per incident as remediation (pending,
/// processing, final phase), AI analyses, executions, a workflow step and a
/// custom notification, cycled when an incident has more.
fn incident_events(k: u64, count: usize, incidents: u64, end: DateTime<Utc>) -> Vec<Generated> {
    let mut rng = Rng::new(k);
    let span = SPAN_DAYS * 86_400_000_000;
    let slot = span / incidents as i64;
    let mut t = end.timestamp_micros() - span + k as i64 * slot + rng.below(slot.max(1) as u64) as i64;

    let ns_index = rng.below(50) as usize;
    let namespace = namespace(ns_index);
    let team = TEAMS[ns_index % 10];
    let alert = alert_name(rng.below(200) as usize);
    let severity = match rng.below(100) {
        0..=29 => Severity::Info,
        30..=74 => Severity::Warning,
        _ => Severity::Critical,
    };
    let cluster = rng.pick(&CLUSTERS).to_string();
    let env = if cluster.starts_with("staging") {
        "staging"
    } else {
        "prod"
    };
    let region = rng.pick(&REGIONS).to_string();
    let target = ResourceRef {
        kind: rng.pick(&["Deployment", "StatefulSet", "DaemonSet"]).to_string(),
        name: format!("{team}-{}", rng.pick(&["api", "worker", "db", "cache", "gateway"])),
        namespace: Some(namespace.clone()),
    };
    let final_phase = match rng.below(100) {
        0..=79 => Phase::Completed,
        80..=89 => Phase::Failed,
        _ => Phase::Processing,
    };
    let priority = rng.pick(&["P1", "P2", "P3"]).to_string();
    let rr = rrid(k);
    let correlation = format!("corr-{k:07}");

    let mut events = Vec::with_capacity(count);
    let mut started_at = None;
    for slot in 0..count {
        if slot > 0 {
            t += 5_000_000 + rng.below(20 * 60 * 1_000_000) as i64;
        }
        let occurred_at = at_micros(t);
        let started = *started_at.get_or_insert(occurred_at);
        let action = rng.pick(&ACTIONS).to_string();
        let mut labels = BTreeMap::new();
        let mut event_cluster = Some(cluster.clone());
        let remediation = |phase: Phase, message: String, completed: bool| {
            Payload::Remediation(Remediation {
                signal_type: "prometheus-alert".into(),
                signal_name: alert.clone(),
                severity,
                target: target.clone(),
                phase,
                message: Some(message),
                started_at: Some(started),
                completed_at: completed.then_some(occurred_at),
                priority: Some(priority.clone()),
            })
        };
        let payload = match slot % 10 {
            0 | 2 | 9 => {
                labels.insert("team".to_owned(), team.to_owned());
                labels.insert("env".to_owned(), env.to_owned());
                labels.insert("region".to_owned(), region.clone());
                match slot % 10 {
                    0 => remediation(Phase::Pending, format!("{alert} fired for {}", target.name), false),
                    2 => remediation(
                        Phase::Processing,
                        format!("remediating {} with {action}", target.name),
                        false,
                    ),
                    _ => remediation(
                        final_phase,
                        format!("remediation of {} ended {final_phase:?}", target.name).to_lowercase(),
                        matches!(final_phase, Phase::Completed | Phase::Failed),
                    ),
                }
            }
            1 | 6 => {
                event_cluster = None;
                Payload::AiAnalysis(AiAnalysis {
                    root_cause: rng.pick(&ROOT_CAUSES).to_string(),
                    recommended_action: action,
                    confidence: (50 + rng.below(50)) as f64 / 100.0,
                    reasoning: Some(format!("{alert} correlates with recent changes to {}", target.name)),
                    model: Some("gpt-4o".into()),
                })
            }
            3 | 5 | 7 => {
                labels.insert("team".to_owned(), team.to_owned());
                labels.insert("executor".to_owned(), "k8s-operator".to_owned());
                let status = match rng.below(100) {
                    0..=69 => ExecutionStatus::Succeeded,
                    70..=94 => ExecutionStatus::Failed,
                    _ => ExecutionStatus::Running,
                };
                Payload::Execution(Execution {
                    action_type: action,
                    target: target.clone(),
                    status,
                    duration: (status != ExecutionStatus::Running)
                        .then(|| Duration::from_millis(200 + rng.below(120_000))),
                    error_message: (status == ExecutionStatus::Failed)
                        .then(|| "timed out waiting for the rollout to become ready".to_owned()),
                })
            }
            4 => {
                let status = if rng.chance(85) {
                    ExecutionStatus::Succeeded
                } else {
                    ExecutionStatus::Failed
                };
                Payload::Workflow(Workflow {
                    workflow_id: format!("wf-{action}"),
                    step_name: "apply".into(),
                    status,
                    duration: Some(Duration::from_millis(500 + rng.below(300_000))),
                    error_message: None,
                })
            }
            _ => {
                event_cluster = None;
                Payload::Custom(Custom {
                    event_type: "notification.sent".into(),
                    action: Some("notify".into()),
                    outcome: Some("delivered".into()),
                    data: Some(serde_json::json!({"channel": "slack", "recipient": format!("oncall-{team}")})),
                    text: Some(format!("on-call for {team} notified about {alert}")),
                })
            }
        };
        let received_at = at_micros(t + 20_000 + rng.below(2_000_000) as i64);
        events.push(Generated {
            id: v7_at(received_at),
            received_at,
            event: AuditEvent {
                correlation_id: correlation.clone(),
                remediation_request_id: rr.clone(),
                occurred_at,
                namespace: namespace.clone(),
                cluster: event_cluster,
                labels,
                parent_event_id: None,
                payload,
            },
        });
    }
    events
}

// ---------------------------------------------------------------------------
// COPY rows
// ---------------------------------------------------------------------------

const EVENT_COPY_COLUMNS: &str = "id, occurred_at, incident_id, correlation_id, remediation_request_id, namespace, \
    cluster, kind, labels, parent_event_id, payload, search_text, received_at, source, trace_id, embedding_state, \
    action_type, execution_status, duration_ms";

const INCIDENT_COPY_COLUMNS: &str = "id, remediation_request_id, correlation_id, namespace, first_stamp, cluster, \
    cluster_stamp, label_facts, first_seen_at, last_event_at, event_count, alert_name, severity, signal_type, \
    target_kind, target_name, target_namespace, phase, resolved_at, remediation_stamp, root_cause, analysis_stamp, \
    action_type, execution_status, execution_stamp";

type Stamp = (DateTime<Utc>, Uuid);

fn stamp_literal(stamp: Option<Stamp>) -> Option<String> {
    stamp.map(|(at, id)| format!("(\"{}\",{id})", ts(at)))
}

/// `fact_stamp_key` of the schema: UTC, microseconds, then the event id.
fn stamp_key((at, id): Stamp) -> String {
    format!("{}/{id}", at.format("%Y-%m-%dT%H:%M:%S%.6f"))
}

/// The audit_events row the service's insert_event writes (src/storage/audit.rs).
fn event_row(out: &mut String, g: &Generated) {
    let e = &g.event;
    let execution = match &e.payload {
        Payload::Execution(x) => Some(x),
        _ => None,
    };
    let search_text = e.embedding_text();
    // With the local model every event with text gets an embedding at write
    // time; this bench leaves audit_embeddings empty (no read here uses it).
    let state = if search_text.is_some() {
        domain::EmbeddingState::Generated
    } else {
        domain::EmbeddingState::NotEmbedded
    };
    row(
        out,
        &[
            Some(&g.id.to_string()),
            Some(&ts(e.occurred_at)),
            Some(&incident_id_for(&e.remediation_request_id).to_string()),
            Some(&e.correlation_id),
            Some(&e.remediation_request_id),
            Some(&e.namespace),
            e.cluster.as_deref(),
            Some(&e.kind().code().to_string()),
            Some(&serde_json::to_string(&e.labels).unwrap()),
            e.parent_event_id.map(|p| p.to_string()).as_deref(),
            Some(&serde_json::to_string(&e.payload).unwrap()),
            search_text.as_deref(),
            Some(&ts(g.received_at)),
            Some(common::BENCH_SOURCE),
            None,
            Some(&state.code().to_string()),
            execution.map(|x| x.action_type.as_str()),
            execution.map(|x| x.status.code().to_string()).as_deref(),
            execution
                .and_then(|x| x.duration)
                .map(|d| (d.as_secs_f64() * 1000.0).to_string())
                .as_deref(),
        ],
    );
}

/// The incidents row that folding these events with the service's
/// apply_event (src/storage/incidents.rs) leaves, whatever their order: each
/// group of facts comes from the event with the newest (or, for the first
/// and cluster facts, oldest) stamp (occurred_at, event id).
fn incident_row(out: &mut String, events: &[(Uuid, &AuditEvent)]) {
    let stamp = |(id, e): &(Uuid, &AuditEvent)| (e.occurred_at, *id);
    let first = events.iter().min_by_key(|x| stamp(x)).expect("an incident has events");
    let cluster = events
        .iter()
        .filter(|(_, e)| e.cluster.is_some())
        .min_by_key(|x| stamp(x));
    let newest = |want: fn(&Payload) -> bool| events.iter().filter(|(_, e)| want(&e.payload)).max_by_key(|x| stamp(x));
    let remediation = newest(|p| matches!(p, Payload::Remediation(_)));
    let analysis = newest(|p| matches!(p, Payload::AiAnalysis(_)));
    let execution = newest(|p| matches!(p, Payload::Execution(_)));

    let mut facts: BTreeMap<&str, (Stamp, &str)> = BTreeMap::new();
    for x in events {
        for (key, value) in &x.1.labels {
            let s = stamp(x);
            if facts.get(key.as_str()).is_none_or(|(current, _)| s > *current) {
                facts.insert(key, (s, value));
            }
        }
    }
    let label_facts: serde_json::Map<String, serde_json::Value> = facts
        .into_iter()
        .map(|(k, (s, v))| (k.to_owned(), serde_json::json!({"v": v, "at": stamp_key(s)})))
        .collect();

    let r = remediation.map(|(_, e)| match &e.payload {
        Payload::Remediation(r) => (r, e.occurred_at),
        _ => unreachable!(),
    });
    let root_cause = analysis.map(|(_, e)| match &e.payload {
        Payload::AiAnalysis(a) => a.root_cause.as_str(),
        _ => unreachable!(),
    });
    let x = execution.map(|(_, e)| match &e.payload {
        Payload::Execution(x) => x,
        _ => unreachable!(),
    });
    let resolved_at = r.and_then(|(r, at)| {
        matches!(r.phase, Phase::Completed | Phase::Failed).then(|| ts(r.completed_at.unwrap_or(at)))
    });
    let (_, e0) = first;
    row(
        out,
        &[
            Some(&incident_id_for(&e0.remediation_request_id).to_string()),
            Some(&e0.remediation_request_id),
            Some(&e0.correlation_id),
            Some(&e0.namespace),
            stamp_literal(Some(stamp(first))).as_deref(),
            cluster.and_then(|(_, e)| e.cluster.as_deref()),
            stamp_literal(cluster.map(stamp)).as_deref(),
            Some(&serde_json::Value::Object(label_facts).to_string()),
            Some(&ts(events.iter().map(|(_, e)| e.occurred_at).min().unwrap())),
            Some(&ts(events.iter().map(|(_, e)| e.occurred_at).max().unwrap())),
            Some(&events.len().to_string()),
            r.map(|(r, _)| r.signal_name.as_str()),
            r.map(|(r, _)| r.severity.code().to_string()).as_deref(),
            r.map(|(r, _)| r.signal_type.as_str()),
            r.map(|(r, _)| r.target.kind.as_str()),
            r.map(|(r, _)| r.target.name.as_str()),
            r.and_then(|(r, _)| r.target.namespace.as_deref()),
            r.map(|(r, _)| r.phase.code().to_string()).as_deref(),
            resolved_at.as_deref(),
            stamp_literal(remediation.map(stamp)).as_deref(),
            root_cause,
            stamp_literal(analysis.map(stamp)).as_deref(),
            x.map(|x| x.action_type.as_str()),
            x.map(|x| x.status.code().to_string()).as_deref(),
            stamp_literal(execution.map(stamp)).as_deref(),
        ],
    );
}

// ---------------------------------------------------------------------------
// Seeding
// ---------------------------------------------------------------------------

struct Seed {
    events: u64,
    incidents: u64,
    end: DateTime<Utc>,
}

impl Seed {
    fn events_of(&self, k: u64) -> usize {
        let base = self.events / self.incidents;
        (base + u64::from(k < self.events % self.incidents)) as usize
    }
}

async fn exec(conn: &mut PgConnection, sql: impl Into<String>) -> anyhow::Result<()> {
    let sql = sql.into();
    sqlx::raw_sql(AssertSqlSafe(sql.clone()))
        .execute(&mut *conn)
        .await
        .map_err(|e| anyhow::anyhow!("{e}: {sql}"))?;
    Ok(())
}

/// Drops a table's secondary (non-unique) indexes, returning their definitions.
async fn drop_secondary_indexes(conn: &mut PgConnection, table: &str) -> anyhow::Result<Vec<String>> {
    let rows = sqlx::query(
        "SELECT c.relname::text, pg_get_indexdef(i.indexrelid) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
         WHERE i.indrelid = $1::regclass AND NOT i.indisunique ORDER BY c.relname",
    )
    .bind(table)
    .fetch_all(&mut *conn)
    .await?;
    let mut definitions = Vec::new();
    for r in rows {
        let (name, definition): (String, String) = (r.get(0), r.get(1));
        exec(conn, format!("DROP INDEX {name}")).await?;
        // A partitioned table's index reads "ON ONLY"; recreate it on every partition.
        definitions.push(definition.replacen(" ON ONLY ", " ON ", 1));
    }
    Ok(definitions)
}

async fn seed(conn: &mut PgConnection, seed: &Seed) -> anyhow::Result<()> {
    exec(conn, "SET synchronous_commit = off").await?;
    exec(conn, "SET maintenance_work_mem = '1GB'").await?;
    // Every month the events (and the self-check incident) fall into.
    let mut month = seed.end - TimeDelta::days(SPAN_DAYS + 1);
    while month < seed.end + TimeDelta::days(32) {
        sqlx::query("SELECT ensure_audit_partitions($1)")
            .bind(month)
            .execute(&mut *conn)
            .await?;
        month += TimeDelta::days(27);
    }
    let event_indexes = drop_secondary_indexes(conn, "audit_events").await?;
    let incident_indexes = drop_secondary_indexes(conn, "incidents").await?;

    let started = Instant::now();
    let mut incidents = String::with_capacity(seed.incidents as usize * 900);
    let mut copy = conn
        .copy_in_raw(&format!("COPY audit_events ({EVENT_COPY_COLUMNS}) FROM STDIN"))
        .await?;
    let mut chunk = String::with_capacity(8 << 20);
    for k in 0..seed.incidents {
        let events = incident_events(k, seed.events_of(k), seed.incidents, seed.end);
        for g in &events {
            event_row(&mut chunk, g);
        }
        let refs: Vec<(Uuid, &AuditEvent)> = events.iter().map(|g| (g.id, &g.event)).collect();
        incident_row(&mut incidents, &refs);
        if chunk.len() > (8 << 20) - 64 * 1024 {
            copy.send(chunk.as_bytes()).await?;
            chunk.clear();
        }
        if (k + 1) % (seed.incidents / 10).max(1) == 0 {
            eprint!(
                "\r  copied events of {}/{} incidents ({:.0} s)",
                k + 1,
                seed.incidents,
                started.elapsed().as_secs_f64()
            );
        }
    }
    copy.send(chunk.as_bytes()).await?;
    let copied = copy.finish().await?;
    eprintln!();
    let mut copy = conn
        .copy_in_raw(&format!("COPY incidents ({INCIDENT_COPY_COLUMNS}) FROM STDIN"))
        .await?;
    copy.send(incidents.as_bytes()).await?;
    let projected = copy.finish().await?;
    println!(
        "  COPY: {copied} events, {projected} incidents in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let started = Instant::now();
    for definition in event_indexes.iter().chain(&incident_indexes) {
        exec(conn, definition.clone()).await?;
    }
    println!(
        "  secondary indexes ({}) built in {:.1} s",
        event_indexes.len() + incident_indexes.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Writes one generated incident through WriteAudit and checks that the
/// service stored exactly the audit_events and incidents rows the seeder
/// produces for the same events, then removes it.
async fn self_check(conn: &mut PgConnection, channel: Channel, seed: &Seed) -> anyhow::Result<()> {
    let k = seed.incidents; // one past the seeded ones
    let generated = incident_events(k, 10, seed.incidents, seed.end);
    let rr = generated[0].event.remediation_request_id.clone();
    let mut client = AuditWriteClient::new(channel);
    let mut ids = Vec::new();
    for g in &generated {
        let reply = client
            .write_audit(pb::WriteAuditRequest {
                event: Some(render::audit_event(g.event.clone())),
                ..Default::default()
            })
            .await?
            .into_inner();
        ids.push(Uuid::parse_str(&reply.event_id)?);
    }
    let received: Vec<DateTime<Utc>> =
        sqlx::query_scalar("SELECT received_at FROM audit_events WHERE id = ANY($1) ORDER BY occurred_at")
            .bind(&ids)
            .fetch_all(&mut *conn)
            .await?;
    anyhow::ensure!(received.len() == generated.len(), "self-check: events not stored");
    // The seeder's rows for the same events, with the service's ids.
    let (mut events, mut incident) = (String::new(), String::new());
    let with_ids: Vec<Generated> = generated
        .iter()
        .zip(&ids)
        .zip(&received)
        .map(|((g, id), at)| Generated {
            id: *id,
            received_at: *at,
            event: g.event.clone(),
        })
        .collect();
    for g in &with_ids {
        event_row(&mut events, g);
    }
    let refs: Vec<(Uuid, &AuditEvent)> = with_ids.iter().map(|g| (g.id, &g.event)).collect();
    incident_row(&mut incident, &refs);

    exec(
        conn,
        format!("CREATE TEMP TABLE chk_events AS SELECT {EVENT_COPY_COLUMNS} FROM audit_events WITH NO DATA"),
    )
    .await?;
    exec(
        conn,
        format!("CREATE TEMP TABLE chk_incidents AS SELECT {INCIDENT_COPY_COLUMNS} FROM incidents WITH NO DATA"),
    )
    .await?;
    let mut copy = conn
        .copy_in_raw(&format!("COPY chk_events ({EVENT_COPY_COLUMNS}) FROM STDIN"))
        .await?;
    copy.send(events.as_bytes()).await?;
    copy.finish().await?;
    let mut copy = conn
        .copy_in_raw(&format!("COPY chk_incidents ({INCIDENT_COPY_COLUMNS}) FROM STDIN"))
        .await?;
    copy.send(incident.as_bytes()).await?;
    copy.finish().await?;

    // Not compared: embedding_state (the model may defer), trace_id.
    let event_columns = "id, occurred_at, incident_id, correlation_id, remediation_request_id, namespace, cluster, \
        kind, labels, parent_event_id, payload, search_text, received_at, source, action_type, execution_status, duration_ms";
    let literal = rr.replace('\'', "''");
    let diff_events = format!(
        "(SELECT 'service' AS side, {event_columns} FROM audit_events WHERE remediation_request_id = '{literal}' \
         EXCEPT SELECT 'service', {event_columns} FROM chk_events) UNION ALL \
         (SELECT 'seeder', {event_columns} FROM chk_events EXCEPT SELECT 'seeder', {event_columns} FROM audit_events \
         WHERE remediation_request_id = '{literal}')"
    );
    let diff_incidents = format!(
        "(SELECT 'service' AS side, {INCIDENT_COPY_COLUMNS}, labels FROM incidents WHERE remediation_request_id = '{literal}' \
         EXCEPT SELECT 'service', *, incident_label_values(label_facts) FROM chk_incidents) UNION ALL \
         (SELECT 'seeder', *, incident_label_values(label_facts) FROM chk_incidents EXCEPT \
         SELECT 'seeder', {INCIDENT_COPY_COLUMNS}, labels FROM incidents WHERE remediation_request_id = '{literal}')"
    );
    for (what, sql) in [("audit_events", diff_events), ("incidents", diff_incidents)] {
        let rows: Vec<String> = sqlx::query_scalar(AssertSqlSafe(format!("SELECT d::text FROM ({sql}) d")))
            .fetch_all(&mut *conn)
            .await?;
        anyhow::ensure!(
            rows.is_empty(),
            "self-check: the seeder's {what} rows differ from the service's:\n{}",
            rows.join("\n")
        );
    }
    println!("  self-check: 10 events written through WriteAudit match the seeder's audit_events and incidents rows");

    let id = incident_id_for(&rr);
    exec(conn, "DROP TABLE chk_events, chk_incidents").await?;
    // Events are immutable; only a recorded purge run may delete them.
    let run: i64 = sqlx::query_scalar(
        "INSERT INTO purge_runs (job_id, requested_by, older_than, policies) \
         VALUES ('bench-self-check', 'bench', now(), '{}') RETURNING id",
    )
    .fetch_one(&mut *conn)
    .await?;
    let mut tx = conn.begin().await?;
    sqlx::query("SELECT set_config('datastorage.purge_run', $1, true)")
        .bind(run.to_string())
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM audit_embeddings WHERE event_id = ANY($1)")
        .bind(&ids)
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM pending_embeddings WHERE event_id = ANY($1)")
        .bind(&ids)
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM audit_events WHERE id = ANY($1)")
        .bind(&ids)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    sqlx::query("DELETE FROM incident_sort_history WHERE incident_id = $1")
        .bind(id)
        .execute(&mut *conn)
        .await?;
    sqlx::query("DELETE FROM incidents WHERE id = $1")
        .bind(id)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

// ---------------------------------------------------------------------------
// The service's SQL, mirrored from src/storage/queries.rs
// ---------------------------------------------------------------------------

// Parameter types as sqlx binds them, named as pg_prepared_statements shows them.
const TEXT: &str = "text";
const UUID: &str = "uuid";
const TIMESTAMPTZ: &str = "timestamp with time zone";
const INT8: &str = "bigint";
const INT2: &str = "smallint";
const INT2_ARRAY: &str = "smallint[]";
const JSONB: &str = "jsonb";

/// A statement as the service's QueryBuilder produces it: text with $n
/// placeholders, and each parameter's type and value as an SQL literal.
#[derive(Clone, Default)]
struct Stmt {
    text: String,
    types: Vec<&'static str>,
    args: Vec<String>,
}

fn lit(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

impl Stmt {
    fn new(text: &str) -> Self {
        Stmt {
            text: text.to_owned(),
            ..Default::default()
        }
    }
    fn push(&mut self, s: &str) -> &mut Self {
        self.text.push_str(s);
        self
    }
    fn bind(&mut self, ty: &'static str, literal: String) -> &mut Self {
        self.types.push(ty);
        self.args.push(literal);
        write!(self.text, "${}", self.args.len()).unwrap();
        self
    }
    fn prepare(&self, name: &str) -> String {
        if self.types.is_empty() {
            return format!("PREPARE {name} AS {};", self.text);
        }
        format!("PREPARE {name}({}) AS {};", self.types.join(", "), self.text)
    }
    fn execute(&self, name: &str) -> String {
        if self.args.is_empty() {
            return format!("EXECUTE {name};");
        }
        format!("EXECUTE {name}({});", self.args.join(", "))
    }
}

// queries.rs: push_filter.
fn push_filter(s: &mut Stmt, filter: &IncidentFilter, last_event_at: &str) {
    for (column, value) in [
        ("i.alert_name", &filter.alert_name),
        ("i.action_type", &filter.action_type),
        ("i.namespace", &filter.namespace),
        ("i.cluster", &filter.cluster),
    ] {
        if let Some(value) = value {
            s.push(&format!(" AND {column} = ")).bind(TEXT, lit(value));
        }
    }
    let codes = |codes: Vec<i16>| {
        lit(&format!(
            "{{{}}}",
            codes.iter().map(i16::to_string).collect::<Vec<_>>().join(",")
        ))
    };
    if !filter.severities.is_empty() {
        s.push(" AND i.severity = ANY(")
            .bind(INT2_ARRAY, codes(filter.severities.iter().map(|x| x.code()).collect()))
            .push(")");
    }
    if !filter.phases.is_empty() {
        s.push(" AND i.phase = ANY(")
            .bind(INT2_ARRAY, codes(filter.phases.iter().map(|x| x.code()).collect()))
            .push(")");
    }
    if let Some(since) = filter.since {
        s.push(&format!(" AND {last_event_at} >= "))
            .bind(TIMESTAMPTZ, lit(&ts(since)));
    }
    if let Some(until) = filter.until {
        s.push(&format!(" AND {last_event_at} < "))
            .bind(TIMESTAMPTZ, lit(&ts(until)));
    }
    if !filter.labels.is_empty() {
        s.push(" AND i.labels @> ")
            .bind(JSONB, lit(&serde_json::to_string(&filter.labels).unwrap()));
    }
}

// queries.rs: incident_listing (default order: last_event_at DESC).
fn incident_listing(filter: &IncidentFilter, limit: i64, position: &PagePosition) -> Stmt {
    let (key, direction, beyond) = ("last_event_at", "DESC", "<");
    let snapshot = || lit(&position.snapshot);
    let mut s = Stmt::new(&format!(
        "SELECT * FROM ((SELECT {INCIDENT_COLUMNS}, i.{key} AS page_key FROM incidents i \
         WHERE pg_visible_in_snapshot(i.updated_xact, "
    ));
    s.bind(TEXT, snapshot()).push("::pg_snapshot)");
    push_filter(&mut s, filter, "i.last_event_at");
    if let Some(after) = position.after {
        s.push(&format!(" AND (i.{key}, i.id) {beyond} ("))
            .bind(TIMESTAMPTZ, lit(&ts(after.at)))
            .push(", ")
            .bind(UUID, lit(&after.id.to_string()))
            .push(")");
    }
    s.push(&format!(" ORDER BY i.{key} {direction}, i.id {direction} LIMIT "))
        .bind(INT8, limit.to_string());
    s.push(&format!(
        ") UNION ALL (SELECT {INCIDENT_COLUMNS}, coalesce(h.{key}, i.{key}) AS page_key FROM incidents i \
         LEFT JOIN LATERAL (SELECT hist.last_event_at, hist.first_seen_at FROM incident_sort_history hist \
         WHERE hist.incident_id = i.id AND NOT pg_visible_in_snapshot(hist.superseded_xact, "
    ));
    s.bind(TEXT, snapshot())
        .push(
            "::pg_snapshot) ORDER BY hist.superseded_seq LIMIT 1) h ON true WHERE i.updated_xact >= pg_snapshot_xmin(",
        )
        .bind(TEXT, snapshot())
        .push("::pg_snapshot) AND NOT pg_visible_in_snapshot(i.updated_xact, ")
        .bind(TEXT, snapshot())
        .push("::pg_snapshot) AND pg_visible_in_snapshot(i.created_xact, ")
        .bind(TEXT, snapshot())
        .push("::pg_snapshot)");
    push_filter(&mut s, filter, "coalesce(h.last_event_at, i.last_event_at)");
    if let Some(after) = position.after {
        s.push(&format!(" AND (coalesce(h.{key}, i.{key}), i.id) {beyond} ("))
            .bind(TIMESTAMPTZ, lit(&ts(after.at)))
            .push(", ")
            .bind(UUID, lit(&after.id.to_string()))
            .push(")");
    }
    s.push(&format!(
        ")) AS page ORDER BY page_key {direction}, id {direction} LIMIT "
    ))
    .bind(INT8, limit.to_string());
    s
}

// queries.rs: get_incident by id.
fn get_incident(id: Uuid) -> Stmt {
    let mut s = Stmt::new(&format!("SELECT {INCIDENT_COLUMNS} FROM incidents i WHERE "));
    s.push("i.id = ").bind(UUID, lit(&id.to_string()));
    s
}

// queries.rs: list_audit_events of an incident, every kind, first page.
fn list_audit_events(id: Uuid, page_size: usize) -> Stmt {
    let mut s = Stmt::new(&format!("SELECT {EVENT_COLUMNS} FROM audit_events e WHERE "));
    s.push("e.incident_id = ").bind(UUID, lit(&id.to_string()));
    s.push(" ORDER BY e.occurred_at, e.id LIMIT ")
        .bind(INT8, (page_size as i64 + 1).to_string());
    s
}

// queries.rs: action_stats without a filter (the rollup).
fn action_stats() -> Stmt {
    let mut s = Stmt::new(
        "WITH buckets AS (SELECT action_type, execution_status, duration_bucket, executions, duration_ms_sum \
         FROM action_duration_rollup WHERE executions > 0), per_action AS ( \
         SELECT action_type, sum(executions)::bigint AS total, \
         coalesce(sum(executions) FILTER (WHERE execution_status = ",
    );
    s.bind(INT2, ExecutionStatus::Succeeded.code().to_string())
        .push("), 0)::bigint AS succeeded, coalesce(sum(executions) FILTER (WHERE execution_status = ")
        .bind(INT2, ExecutionStatus::Failed.code().to_string())
        .push(storage::ACTION_STATS_AGGREGATION);
    s
}

// ---------------------------------------------------------------------------
// psql
// ---------------------------------------------------------------------------

/// One long-lived psql: statements go in on stdin, `\timing` lines come back.
struct Psql {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Psql {
    fn start(psql: &str, url: &str, pgoptions: &str) -> anyhow::Result<Self> {
        let mut child = Command::new(psql)
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", url])
            .env("PGOPTIONS", pgoptions)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| anyhow::anyhow!("starting {psql}: {e}"))?;
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Ok(Psql { child, stdin, stdout })
    }

    fn send(&mut self, input: &str) {
        self.stdin.write_all(input.as_bytes()).expect("psql stdin");
        self.stdin.write_all(b"\n").expect("psql stdin");
        self.stdin.flush().expect("psql stdin");
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        let n = self.stdout.read_line(&mut line).expect("psql stdout");
        assert!(n > 0, "psql exited (its error is above)");
        line.trim_end_matches(['\n', '\r']).to_owned()
    }

    /// Everything psql prints until `\echo marker`.
    fn until_marker(&mut self, marker: &str) -> Vec<String> {
        self.send(&format!("\\echo {marker}"));
        let mut lines = Vec::new();
        loop {
            let line = self.line();
            if line == marker {
                return lines;
            }
            lines.push(line);
        }
    }

    /// Prepares `stmt` as `q`, results to /dev/null, timing on.
    fn prepare(&mut self, stmt: &Stmt) {
        self.send("\\o /dev/null");
        self.send(&stmt.prepare("q"));
        self.send("\\timing on");
        let stray = self.until_marker("__READY__");
        assert!(stray.is_empty(), "psql said: {stray:?}");
    }

    /// Runs one statement; psql's own round-trip time in microseconds.
    fn timed(&mut self, sql: &str) -> u64 {
        self.send(sql);
        loop {
            let line = self.line();
            if let Some(rest) = line.strip_prefix("Time: ") {
                let ms: f64 = rest.split_whitespace().next().unwrap().parse().expect("psql timing");
                return (ms * 1000.0).round().max(1.0) as u64;
            }
        }
    }

    /// EXPLAIN (ANALYZE, BUFFERS) of the prepared statement, and how often the
    /// session planned it generically.
    fn explain(&mut self, execute: &str) -> (Vec<String>, String) {
        self.send("\\o\n\\timing off\n\\pset format unaligned\n\\pset tuples_only on");
        self.send(&format!("EXPLAIN (ANALYZE, BUFFERS) {execute}"));
        let plan = self.until_marker("__PLAN__");
        self.send("SELECT generic_plans || ' generic / ' || custom_plans || ' custom' FROM pg_prepared_statements WHERE name = 'q';");
        let plans = self.until_marker("__PLANS__").join(" ");
        (plan, plans)
    }
}

impl Drop for Psql {
    fn drop(&mut self) {
        let _ = self.stdin.write_all(b"\\q\n");
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// Cases
// ---------------------------------------------------------------------------

// A handful of values, built once: their sizes do not matter.
#[allow(clippy::large_enum_variant)]
enum Call {
    List {
        filter: IncidentFilter,
        page_token: String,
        /// What the service makes of the token (None: a first page).
        position: Option<PagePosition>,
    },
    Get,
    Timeline,
    Stats,
}

struct Case {
    name: &'static str,
    call: Call,
    /// Per iteration (cycled): the plain-SQL statement.
    stmts: Vec<Stmt>,
    iterations: usize,
}

fn to_pb_filter(f: &IncidentFilter) -> pb::IncidentFilter {
    pb::IncidentFilter {
        alert_name: f.alert_name.clone().unwrap_or_default(),
        severities: f.severities.iter().map(|s| s.code().into()).collect(),
        action_type: f.action_type.clone().unwrap_or_default(),
        namespace: f.namespace.clone().unwrap_or_default(),
        cluster: f.cluster.clone().unwrap_or_default(),
        phases: f.phases.iter().map(|p| p.code().into()).collect(),
        since: f.since.map(render::timestamp),
        until: f.until.map(render::timestamp),
        labels: f.labels.clone().into_iter().collect(),
    }
}

/// Calls the RPC of `case` for iteration `i`; returns its latency and the
/// keys of what it returned (incident ids, event ids or stats lines).
async fn call_service(
    client: &mut IncidentQueryClient<Channel>,
    case: &Case,
    ids: &[Uuid],
    i: usize,
) -> (u64, Vec<String>) {
    let started = Instant::now();
    match &case.call {
        Call::List { filter, page_token, .. } => {
            let reply = client
                .list_incidents(pb::ListIncidentsRequest {
                    filter: Some(to_pb_filter(filter)),
                    page_size: PAGE_SIZE as i32,
                    page_token: page_token.clone(),
                    order_by: String::new(),
                })
                .await
                .expect("ListIncidents")
                .into_inner();
            let elapsed = started.elapsed();
            (micros(elapsed), reply.incidents.into_iter().map(|x| x.id).collect())
        }
        Call::Get => {
            let reply = client
                .get_incident(pb::GetIncidentRequest {
                    key: Some(pb::get_incident_request::Key::Id(ids[i % ids.len()].to_string())),
                })
                .await
                .expect("GetIncident")
                .into_inner();
            let elapsed = started.elapsed();
            (micros(elapsed), vec![reply.id])
        }
        Call::Timeline => {
            let reply = client
                .list_audit_events(pb::ListAuditEventsRequest {
                    scope: Some(pb::list_audit_events_request::Scope::IncidentId(
                        ids[i % ids.len()].to_string(),
                    )),
                    kinds: Vec::new(),
                    page_size: PAGE_SIZE as i32,
                    page_token: String::new(),
                })
                .await
                .expect("ListAuditEvents")
                .into_inner();
            let elapsed = started.elapsed();
            (micros(elapsed), reply.events.into_iter().map(|e| e.event_id).collect())
        }
        Call::Stats => {
            let reply = client
                .get_action_stats(pb::GetActionStatsRequest { filter: None })
                .await
                .expect("GetActionStats")
                .into_inner();
            let elapsed = started.elapsed();
            (
                micros(elapsed),
                reply
                    .stats
                    .into_iter()
                    .map(|s| format!("{} {} {} {}", s.action_type, s.total, s.succeeded, s.failed))
                    .collect(),
            )
        }
    }
}

/// The Storage call behind the RPC of `case` (diagnostic breakdown).
async fn call_storage(storage: &Storage, case: &Case, ids: &[Uuid], i: usize) -> u64 {
    let started = Instant::now();
    match &case.call {
        Call::List { filter, position, .. } => {
            storage
                .list_incidents(filter, IncidentOrder::default(), PAGE_SIZE, position.clone())
                .await
                .expect("list_incidents");
        }
        Call::Get => {
            storage
                .get_incident(&IncidentKey::Id(ids[i % ids.len()]))
                .await
                .expect("get_incident");
        }
        Call::Timeline => {
            let query = TimelineQuery {
                scope: TimelineScope::Incident(ids[i % ids.len()]),
                kinds: Vec::new(),
            };
            storage
                .list_audit_events(&query, PAGE_SIZE, None)
                .await
                .expect("list_audit_events");
        }
        Call::Stats => {
            storage
                .action_stats(&IncidentFilter::default())
                .await
                .expect("action_stats");
        }
    }
    micros(started.elapsed())
}

/// The same keys from the plain statement (run once through sqlx, PREPARE +
/// EXECUTE as psql does).
async fn sql_keys(conn: &mut PgConnection, case: &Case) -> anyhow::Result<Vec<String>> {
    let stmt = &case.stmts[0];
    exec(conn, stmt.prepare("chk")).await?;
    let rows = sqlx::raw_sql(AssertSqlSafe(stmt.execute("chk")))
        .fetch_all(&mut *conn)
        .await?;
    exec(conn, "DEALLOCATE chk").await?;
    let mut keys: Vec<String> = rows
        .iter()
        .map(|r| match case.call {
            Call::Stats => format!(
                "{} {} {} {}",
                r.get::<Option<String>, _>("action_type").unwrap_or_default(),
                r.get::<i64, _>("total"),
                r.get::<i64, _>("succeeded"),
                r.get::<i64, _>("failed")
            ),
            _ => r.get::<Uuid, _>("id").to_string(),
        })
        .collect();
    if matches!(case.call, Call::List { .. } | Call::Timeline) {
        keys.truncate(PAGE_SIZE); // the service fetches one more to know a next page exists
    }
    Ok(keys)
}

struct Figures {
    service: Histogram<u64>,
    sql: Histogram<u64>,
    plan: Vec<String>,
    plan_cache: String,
}

async fn measure(client: &mut IncidentQueryClient<Channel>, psql: &mut Psql, case: &Case, ids: &[Uuid]) -> Figures {
    psql.prepare(&case.stmts[0]);
    let warmup = case.iterations.clamp(1, 10);
    for i in 0..warmup {
        call_service(client, case, ids, i).await;
        psql.timed(&case.stmts[i % case.stmts.len()].execute("q"));
    }
    let (mut service, mut sql) = (histogram(), histogram());
    // Interleaved, alternating which side goes first, so both see the same
    // cache state and the same background load.
    for i in 0..case.iterations {
        let execute = case.stmts[i % case.stmts.len()].execute("q");
        if i % 2 == 0 {
            service.record(call_service(client, case, ids, i).await.0).unwrap();
            sql.record(psql.timed(&execute)).unwrap();
        } else {
            sql.record(psql.timed(&execute)).unwrap();
            service.record(call_service(client, case, ids, i).await.0).unwrap();
        }
    }
    let (plan, plan_cache) = psql.explain(&case.stmts[0].execute("q"));
    Figures {
        service,
        sql,
        plan,
        plan_cache,
    }
}

async fn run_pass<'a>(
    client: &mut IncidentQueryClient<Channel>,
    cases: &'a [Case],
    ids: &[Uuid],
    psql_bin: &str,
    url: &str,
    pgoptions: &str,
) -> anyhow::Result<Vec<(&'a Case, Figures)>> {
    let mut results = Vec::new();
    for case in cases {
        eprint!("  measuring {} ...", case.name);
        let mut psql = Psql::start(psql_bin, url, pgoptions)?;
        let started = Instant::now();
        let figures = measure(client, &mut psql, case, ids).await;
        eprintln!(" {:.1} s", started.elapsed().as_secs_f64());
        results.push((case, figures));
    }
    Ok(results)
}

/// The latency of an IncidentQuery call that does no database work: a
/// GetIncident without a key, refused by validation. It passes the same
/// transport, middleware (auth gate, load-shedding slot, span, metrics) and
/// handler as the measured calls, so what it costs any RPC is separated
/// from what the query costs.
async fn grpc_floor(channel: Channel, iterations: usize) -> anyhow::Result<Histogram<u64>> {
    let mut client = IncidentQueryClient::new(channel);
    let mut refused = async || {
        let answer = client.get_incident(pb::GetIncidentRequest { key: None }).await;
        anyhow::ensure!(
            answer
                .as_ref()
                .is_err_and(|status| status.code() == tonic::Code::InvalidArgument),
            "a GetIncident without a key must be INVALID_ARGUMENT: {answer:?}"
        );
        Ok(())
    };
    for _ in 0..iterations.clamp(1, 10) {
        refused().await?;
    }
    let mut floor = histogram();
    for _ in 0..iterations {
        let started = Instant::now();
        refused().await?;
        floor.record(micros(started.elapsed())).unwrap();
    }
    Ok(floor)
}

fn print_table(results: &[(&Case, Figures)]) {
    println!("\n| query | service p50 ms | service p99 ms | plain SQL p50 ms | plain SQL p99 ms | ratio (p50) |");
    println!("|---|---:|---:|---:|---:|---:|");
    let (mut slow, mut heavy) = (Vec::new(), Vec::new());
    for (case, f) in results {
        let ratio = ms(&f.service, 0.5) / ms(&f.sql, 0.5);
        println!(
            "| {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2}x |",
            case.name,
            ms(&f.service, 0.5),
            ms(&f.service, 0.99),
            ms(&f.sql, 0.5),
            ms(&f.sql, 0.99),
            ratio
        );
        if ms(&f.service, 0.99) >= GOAL_P99_MS {
            slow.push(case.name);
        }
        if ratio >= GOAL_RATIO {
            heavy.push(case.name);
        }
    }
    let verdict = |missed: Vec<&str>| {
        if missed.is_empty() {
            "met by every query".to_owned()
        } else {
            format!("missed by {}", missed.join("; "))
        }
    };
    println!("\ngoal: service p99 under {GOAL_P99_MS} ms: {}", verdict(slow));
    println!(
        "goal: service overhead under {GOAL_RATIO}x plain SQL (p50): {}",
        verdict(heavy)
    );
}

// ---------------------------------------------------------------------------
// main
// ---------------------------------------------------------------------------

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let events: u64 = env_or("BENCH_EVENTS", 1_000_000);
    let incidents: u64 = env_or("BENCH_INCIDENTS", 100_000);
    let iterations: usize = env_or("BENCH_ITERATIONS", 200).max(1);
    let stats_iterations: usize = env_or("BENCH_STATS_ITERATIONS", iterations).max(1);
    let reuse = std::env::var("BENCH_REUSE").is_ok_and(|v| v == "1");
    anyhow::ensure!(
        incidents >= 1 && events >= incidents,
        "BENCH_EVENTS must be at least BENCH_INCIDENTS (>= 1)"
    );
    let admin = std::env::var("DATASTORAGE_BENCH_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://datastorage:datastorage@127.0.0.1:55432/datastorage".into());
    let model_dir = std::env::var("DATASTORAGE_BENCH_MODEL_DIR")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/.cache/models/all-MiniLM-L6-v2").into());
    let psql_bin = std::env::var("DATASTORAGE_BENCH_PSQL").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin/psql".into());
    let url = format!("{}/{DATABASE}", admin.rsplit_once('/').unwrap().0);

    println!(
        "datastorage read benchmark: {events} events across {incidents} incidents, {iterations} iterations per query \
         ({stats_iterations} for GetActionStats)"
    );

    // ---- the database: reuse or seed ----
    let mut reused_end: Option<DateTime<Utc>> = None;
    if reuse {
        if let Ok(mut conn) = PgConnection::connect(&url).await {
            let marker: Option<(i64, i64, i32, DateTime<Utc>)> =
                sqlx::query_as("SELECT events, incidents, version, end_at FROM bench_seed")
                    .fetch_optional(&mut conn)
                    .await
                    .ok()
                    .flatten();
            if let Some((e, n, v, end)) = marker {
                if e == events as i64 && n == incidents as i64 && v == SEED_VERSION {
                    match storage::MIGRATOR.run(&mut conn).await {
                        Ok(()) => reused_end = Some(end),
                        Err(error) => {
                            println!("BENCH_REUSE: migrations do not apply to the seeded database ({error}); reseeding")
                        }
                    }
                } else {
                    println!("BENCH_REUSE: {DATABASE} holds other sizes or an older seed; reseeding");
                }
            }
        }
    }
    let fresh = reused_end.is_none();
    let seed_spec = Seed {
        events,
        incidents,
        // Whole seconds, and a few hours back so the newest incident's events
        // (and the self-check's, one slot later) are in the past.
        end: reused_end.unwrap_or_else(|| DateTime::from_timestamp(Utc::now().timestamp() - 6 * 3600, 0).unwrap()),
    };
    let mut conn;
    let mut seed_seconds = 0.0;
    if fresh {
        println!("seeding {DATABASE} (set BENCH_REUSE=1 to keep it for the next run):");
        let started = Instant::now();
        let mut admin_conn = PgConnection::connect(&admin).await?;
        exec(
            &mut admin_conn,
            format!("DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)"),
        )
        .await?;
        exec(&mut admin_conn, format!("CREATE DATABASE {DATABASE}")).await?;
        admin_conn.close().await?;
        conn = PgConnection::connect(&url).await?;
        storage::MIGRATOR.run(&mut conn).await?;
        seed(&mut conn, &seed_spec).await?;
        seed_seconds = started.elapsed().as_secs_f64();
    } else {
        println!("reusing the seeded {DATABASE} (BENCH_REUSE=1)");
        conn = PgConnection::connect(&url).await?;
    }

    // ---- the server ----
    let settings = common::server_settings(&url, &model_dir);
    let app = Application::build(settings.clone()).await?;
    let port = app.port();
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));
    let channel = Channel::from_shared(format!("http://127.0.0.1:{port}"))?
        .connect()
        .await?;

    if fresh {
        self_check(&mut conn, channel.clone(), &seed_spec).await?;
        let started = Instant::now();
        exec(&mut conn, "VACUUM (ANALYZE)").await?;
        let vacuum = started.elapsed().as_secs_f64();
        seed_seconds += vacuum;
        println!("  VACUUM (ANALYZE) in {vacuum:.1} s");
        exec(
            &mut conn,
            "CREATE TABLE bench_seed (events bigint, incidents bigint, version int, end_at timestamptz, seconds float8)",
        )
        .await?;
        sqlx::query("INSERT INTO bench_seed VALUES ($1, $2, $3, $4, $5)")
            .bind(events as i64)
            .bind(incidents as i64)
            .bind(SEED_VERSION)
            .bind(seed_spec.end)
            .bind(seed_seconds)
            .execute(&mut conn)
            .await?;
        println!("seeding took {seed_seconds:.1} s in all");
    } else {
        let seconds: f64 = sqlx::query_scalar("SELECT seconds FROM bench_seed")
            .fetch_one(&mut conn)
            .await?;
        println!("(it took {seconds:.1} s to seed)");
    }
    let (parts, event_bytes, incident_bytes): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM pg_inherits WHERE inhparent = 'audit_events'::regclass), \
         (SELECT sum(pg_total_relation_size(inhrelid))::bigint FROM pg_inherits WHERE inhparent = 'audit_events'::regclass), \
         pg_total_relation_size('incidents')",
    )
    .fetch_one(&mut conn)
    .await?;
    println!(
        "audit_events: {parts} monthly partitions, {} MiB with indexes; incidents: {} MiB with indexes",
        event_bytes >> 20,
        incident_bytes >> 20
    );

    // ---- the session settings the service's pool sends; psql gets the same ----
    let service_pool = storage::pool(&settings.database, &settings.search)?;
    let client_settings: Vec<(String, String)> =
        sqlx::query_as("SELECT name, setting FROM pg_settings WHERE source = 'client' ORDER BY name")
            .fetch_all(&service_pool)
            .await?;
    let pgoptions = client_settings
        .iter()
        .map(|(name, value)| format!("-c {name}={}", value.replace('\\', "\\\\").replace(' ', "\\ ")))
        .collect::<Vec<_>>()
        .join(" ");
    exec(
        &mut conn,
        if pgoptions.contains("jit=off") {
            "SET jit = off"
        } else {
            "SET jit = on"
        },
    )
    .await?;

    // ---- parameters ----
    let snapshot: String = sqlx::query_scalar("SELECT pg_current_snapshot()::text")
        .fetch_one(&mut conn)
        .await?;
    let first = PagePosition {
        snapshot: snapshot.clone(),
        after: None,
    };
    let filters: Vec<(&'static str, IncidentFilter)> = vec![
        ("ListIncidents, no filter", IncidentFilter::default()),
        (
            "ListIncidents, alert_name",
            IncidentFilter {
                alert_name: Some(alert_name(17)),
                ..Default::default()
            },
        ),
        (
            "ListIncidents, namespace+severity",
            IncidentFilter {
                namespace: Some(namespace(21)),
                severities: vec![Severity::Critical],
                ..Default::default()
            },
        ),
        (
            "ListIncidents, label",
            IncidentFilter {
                labels: BTreeMap::from([("team".to_owned(), TEAMS[3].to_owned())]),
                ..Default::default()
            },
        ),
        (
            "ListIncidents, time range",
            IncidentFilter {
                since: Some(seed_spec.end - TimeDelta::days(35)),
                until: Some(seed_spec.end - TimeDelta::days(28)),
                ..Default::default()
            },
        ),
    ];

    // Page through the unfiltered listing with the service to page DEEP_PAGE.
    let mut client = IncidentQueryClient::new(channel.clone());
    let mut token = String::new();
    for page in 1..DEEP_PAGE {
        let reply = client
            .list_incidents(pb::ListIncidentsRequest {
                filter: Some(pb::IncidentFilter::default()),
                page_size: PAGE_SIZE as i32,
                page_token: token.clone(),
                order_by: String::new(),
            })
            .await?
            .into_inner();
        token = reply.next_page_token;
        anyhow::ensure!(
            !token.is_empty(),
            "the listing ended at page {page}: too few incidents for a deep page"
        );
    }
    // The token's body is base64url JSON; read its snapshot and cursor.
    let body: serde_json::Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(token.split_once('.').unwrap().0)?)?;
    let deep = PagePosition {
        snapshot: body["snapshot"].as_str().unwrap().to_owned(),
        after: Some(domain::Cursor {
            at: DateTime::from_timestamp_micros(body["at_micros"].as_i64().unwrap()).unwrap(),
            id: Uuid::parse_str(body["id"].as_str().unwrap())?,
        }),
    };

    // Incidents for GetIncident and ListAuditEvents: the same ones, in the
    // same order, on both sides.
    let mut rng = Rng::new(0xB0B);
    let ids: Vec<Uuid> = (0..iterations)
        .map(|_| incident_id_for(&rrid(rng.below(incidents))))
        .collect();

    let limit = PAGE_SIZE as i64 + 1;
    let mut cases: Vec<Case> = filters
        .iter()
        .map(|(name, filter)| Case {
            name,
            call: Call::List {
                filter: filter.clone(),
                page_token: String::new(),
                position: None,
            },
            stmts: vec![incident_listing(filter, limit, &first)],
            iterations,
        })
        .collect();
    cases.push(Case {
        name: "ListIncidents, page 50",
        call: Call::List {
            filter: IncidentFilter::default(),
            page_token: token.clone(),
            position: Some(deep.clone()),
        },
        stmts: vec![incident_listing(&IncidentFilter::default(), limit, &deep)],
        iterations,
    });
    cases.push(Case {
        name: "GetIncident",
        call: Call::Get,
        stmts: ids.iter().map(|id| get_incident(*id)).collect(),
        iterations,
    });
    cases.push(Case {
        name: "ListAuditEvents",
        call: Call::Timeline,
        stmts: ids.iter().map(|id| list_audit_events(*id, PAGE_SIZE)).collect(),
        iterations,
    });
    cases.push(Case {
        name: "GetActionStats, all data",
        call: Call::Stats,
        stmts: vec![action_stats()],
        iterations: stats_iterations,
    });

    // ---- the copies above are the service's statements, verbatim ----
    {
        let mut one = settings.database.clone();
        one.max_connections = 1;
        let capture = Storage::new(storage::pool(&one, &settings.search)?);
        for (_, filter) in &filters {
            capture
                .list_incidents(filter, IncidentOrder::default(), PAGE_SIZE, Some(first.clone()))
                .await?;
        }
        capture
            .list_incidents(
                &IncidentFilter::default(),
                IncidentOrder::default(),
                PAGE_SIZE,
                Some(deep.clone()),
            )
            .await?;
        capture.get_incident(&IncidentKey::Id(ids[0])).await?;
        capture
            .list_audit_events(
                &TimelineQuery {
                    scope: TimelineScope::Incident(ids[0]),
                    kinds: Vec::new(),
                },
                PAGE_SIZE,
                None,
            )
            .await?;
        capture.action_stats(&IncidentFilter::default()).await?;
        let mut c = capture.pool().acquire().await?;
        let prepared: Vec<(String, String)> = sqlx::raw_sql(
            "SELECT statement, array_to_string(parameter_types, ',') FROM pg_prepared_statements WHERE NOT from_sql",
        )
        .fetch_all(&mut *c)
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
        for case in &cases {
            let stmt = &case.stmts[0];
            let types = stmt.types.join(",");
            if !prepared.iter().any(|(text, t)| *text == stmt.text && *t == types) {
                let mut message = format!(
                    "the bench's SQL for {:?} is not what the service prepares; update benches/incidents.rs from \
                     src/storage/queries.rs.\nbench ({types}):\n  {}\nthe service prepared:\n",
                    case.name, stmt.text
                );
                for (text, t) in &prepared {
                    writeln!(message, "  ({t}) {text}").unwrap();
                }
                anyhow::bail!(message);
            }
        }
        drop(c);
        capture.pool().close().await;
    }
    for case in &cases {
        let service = call_service(&mut client, case, &ids, 0).await.1;
        let sql = sql_keys(&mut conn, case).await?;
        anyhow::ensure!(
            service == sql,
            "{}: the service returned {service:?} but the plain statement {sql:?}",
            case.name
        );
    }
    let mut matching = Vec::new();
    for (name, filter) in &filters {
        let mut s = Stmt::new("SELECT count(*) FROM incidents i WHERE true");
        push_filter(&mut s, filter, "i.last_event_at");
        exec(&mut conn, s.prepare("cnt")).await?;
        let n: i64 = sqlx::raw_sql(AssertSqlSafe(s.execute("cnt")))
            .fetch_one(&mut conn)
            .await?
            .get(0);
        exec(&mut conn, "DEALLOCATE cnt").await?;
        matching.push(format!("{name}: {n}"));
    }
    println!("incidents matching each filter: {}", matching.join("; "));
    println!(
        "checked: every plain statement is the text the service prepares (pg_prepared_statements), with the same \
         parameter types, and returns the same rows as its RPC"
    );

    // ---- measure ----
    println!(
        "\nservice: IncidentQuery over TCP (tonic client, one request at a time), latency seen by the client; a first \
         page of ListIncidents includes the service's extra `SELECT pg_current_snapshot()` round trip.\n\
         plain SQL: the same statement and parameters in one long-lived psql per query (PREPARE once, EXECUTE per \
         iteration, psql's \\timing: round trip including result transfer, psql start-up excluded), session options \
         as the service's pool sets them: {}; first pages use one snapshot taken before the run, page 50 the snapshot \
         and cursor of the service's page token.\n\
         Calls alternate between the two sides; {} untimed warm-up calls each first.",
        if pgoptions.is_empty() {
            "none".to_owned()
        } else {
            pgoptions.clone()
        },
        iterations.clamp(1, 10)
    );
    let results = run_pass(&mut client, &cases, &ids, &psql_bin, &url, &pgoptions).await?;
    print_table(&results);
    let floor = grpc_floor(channel.clone(), iterations).await?;
    println!(
        "\ngRPC floor: GetIncident without a key on the same channel and server, refused by validation before \
         any database work (same transport, middleware and handler), {iterations} calls: p50 {:.2} ms, p99 {:.2} ms. \
         Every RPC pays it on top of its statement; the table below subtracts it.\n",
        ms(&floor, 0.5),
        ms(&floor, 0.99)
    );
    println!("| query | service p50 - floor ms | plain SQL p50 ms | ratio without the floor |");
    println!("|---|---:|---:|---:|");
    for (case, f) in &results {
        let beyond = (ms(&f.service, 0.5) - ms(&floor, 0.5)).max(0.0);
        println!(
            "| {} | {beyond:.2} | {:.2} | {:.2}x |",
            case.name,
            ms(&f.sql, 0.5),
            beyond / ms(&f.sql, 0.5)
        );
    }

    println!(
        "\nPlans (EXPLAIN (ANALYZE, BUFFERS) of each plain statement, first iteration's parameters, after the timed \
         runs):"
    );
    for (case, f) in &results {
        println!(
            "\n### {} ({}; plan cache: {})",
            case.name,
            case.stmts[0].execute("q").trim_end_matches(';'),
            f.plan_cache
        );
        for line in &f.plan {
            println!("    {line}");
        }
    }

    if env_or("BENCH_BREAKDOWN", 0) != 0 {
        // Where the rest goes: the storage layer alone, in this process
        // (no gRPC), on a pool built as the service builds it, and on
        // one that skips sqlx's default ping before every acquire.
        let service_pool = Storage::new(storage::pool(&settings.database, &settings.search)?);
        let options = sqlx::postgres::PgConnectOptions::from_str(&url)?.options([("jit", "off")]);
        let no_ping = Storage::new(
            sqlx::postgres::PgPoolOptions::new()
                .max_connections(settings.database.max_connections)
                .test_before_acquire(false)
                .connect_lazy_with(options),
        );
        println!(
            "\nBreakdown (p50 ms): the RPC (table above), the same Storage call made in-process \
         on a pool built by storage::pool (sqlx pings the connection before every acquire: \
         test_before_acquire defaults to true), the same on a pool with test_before_acquire(false), and \
         plain SQL (table above)."
        );
        println!("\n| query | RPC | Storage, service pool | Storage, no ping | plain SQL |");
        println!("|---|---:|---:|---:|---:|");
        for (case, figures) in &results {
            let n = if matches!(case.call, Call::Stats) {
                20
            } else {
                case.iterations.min(100)
            };
            let (mut with_ping, mut without) = (histogram(), histogram());
            for i in 0..n + 5 {
                let (a, b) = if i % 2 == 0 {
                    let a = call_storage(&service_pool, case, &ids, i).await;
                    (a, call_storage(&no_ping, case, &ids, i).await)
                } else {
                    let b = call_storage(&no_ping, case, &ids, i).await;
                    (call_storage(&service_pool, case, &ids, i).await, b)
                };
                if i >= 5 {
                    with_ping.record(a).unwrap();
                    without.record(b).unwrap();
                }
            }
            println!(
                "| {} | {:.2} | {:.2} | {:.2} | {:.2} |",
                case.name,
                ms(&figures.service, 0.5),
                ms(&with_ping, 0.5),
                ms(&without, 0.5),
                ms(&figures.sql, 0.5)
            );
        }
    }
    conn.close().await?;
    Ok(())
}
