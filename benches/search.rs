//! `make bench`: SearchSimilar latency and recall@10 against the same
//! statements run in plain SQL, measured side by side in one run.
//!
//! 1. Seeds `ds_bench_search` with BENCH_SEARCH_EVENTS custom events (10 per
//!    incident, spread over ~6 months of monthly partitions) whose texts come
//!    from templates (20 alert families plus generic remediation lines, with
//!    services, pods, nodes, versions and numbers filled in). The texts are
//!    embedded once with the local all-MiniLM-L6-v2 (or its PyTorch reference,
//!    BENCH_SEARCH_EMBEDDER=reference) and the vectors cached in
//!    `.cache/bench/` (raw little-endian f32, keyed by corpus size, template
//!    version and a hash of the texts), so reruns skip the model. Events and
//!    embeddings go in by COPY; the model's HNSW index is built afterwards by
//!    `register_embedding_model`. Incidents are inserted directly: 10
//!    namespaces evenly (a namespace filter keeps ~10% of the events) and 200
//!    alert names evenly (an alert_name filter keeps ~0.5%). BENCH_REUSE=1
//!    keeps an already seeded database of the same size.
//! 2. Starts the real server in-process and checks that the bench's copies of
//!    the service's search SQL (mirrored from src/storage/search.rs) are the
//!    very statements the service prepares (pg_prepared_statements), with the
//!    same parameter types.
//! 3. Ground truth per query: exact (brute-force) top 10 in SQL, by
//!    `emb.embedding <=> $q` without the `::vector(384)` cast, so no index;
//!    same filters. Hybrid: reciprocal rank fusion (k = rrf_k) of the exact
//!    vector top-100 and the full-text top-100 with the same filters.
//! 4. Per scenario, BENCH_ITERATIONS SearchSimilar calls over TCP (queries
//!    cycle through BENCH_SEARCH_QUERIES distinct texts, sent as vectors
//!    except in hybrid mode) interleaved with the same statements in plain
//!    SQL on one dedicated sqlx connection opened by the service's own
//!    `storage::pool()` (same session options), with the same decisions and
//!    fusion done in the bench; then each plain statement's
//!    EXPLAIN (ANALYZE, BUFFERS).
//!
//! BENCH_SEARCH_EF_SEARCH, BENCH_SEARCH_ITERATIVE_SCAN and
//! BENCH_SEARCH_EXACT_SCAN_THRESHOLD override the service's search defaults
//! for both sides. Timings are reported, never asserted.
use std::{
    collections::{HashMap, HashSet},
    fmt::Write as _,
    io::{Read, Write as _},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use datastorage::{
    config::{IterativeScan, LogFormat},
    domain::{self, incident_id_for, Custom, IncidentFilter, Payload},
    embedding::{local::LocalMiniLm, EmbeddingProvider},
    proto::v1::{self as pb, vector_search_client::VectorSearchClient},
    startup::Application,
    storage::{self, ModelHandle, SearchScope, Storage, Strategy, EVENT_COLUMNS},
};
use hdrhistogram::Histogram;
use sqlx::{postgres::PgRow, AssertSqlSafe, Connection, PgConnection, Row};
use tonic::transport::Channel;
use uuid::Uuid;

mod common;
use common::{alert_name, env_or, histogram, micros, ms, reference, row, ts, Rng, TEAMS};

const DATABASE: &str = "ds_bench_search";
const MODEL_NAME: &str = "all-MiniLM-L6-v2";
const DIMS: usize = 384;
/// Bump when the generated texts or rows change, so BENCH_REUSE reseeds and
/// the embedding cache is not reused.
const TEMPLATE_VERSION: u32 = 1;
const EVENTS_PER_INCIDENT: usize = 10;
/// Events are spread over this many days before the seed's end.
const SPAN_DAYS: i64 = 182;
const TOP_K: usize = 10;
const EMBED_BATCH: usize = 64;
const GOAL_RECALL: f64 = 0.95;
/// Unfiltered p99 goals: the VectorSearch issue's at 100k events, issue 9's at 1M.
const GOAL_P99_MS: f64 = 15.0;
const GOAL_P99_MS_AT_1M: f64 = 20.0;
const GOAL_RATIO: f64 = 1.3;
/// What no query meets: the bounded-work case.
const UNREACHABLE_SIMILARITY: f32 = 0.99;

// ---------------------------------------------------------------------------
// Deterministic data
// ---------------------------------------------------------------------------

const COMPONENTS: [&str; 6] = ["api", "worker", "gateway", "cache", "db", "scheduler"];
const REGIONS: [&str; 4] = ["eu-west-1", "us-east-1", "ap-south-1", "eu-central-1"];
const ACTIONS: [&str; 8] = [
    "restart_pod",
    "scale_deployment",
    "rollback_deployment",
    "drain_node",
    "increase_memory_limit",
    "clear_cache",
    "rotate_certificate",
    "delete_pod",
];
const DEPENDENCIES: [&str; 8] = [
    "postgres",
    "redis",
    "kafka",
    "elasticsearch",
    "the auth service",
    "the pricing service",
    "s3",
    "rabbitmq",
];

/// Per alert family (ALERT_BASES order): what its events say.
const FAMILY_TEMPLATES: [[&str; 3]; 20] = [
    [
        "{svc} memory usage at {pct}% of the {mem} MiB limit on pod {pod}",
        "heap growing steadily in {svc} since release {ver}, {mem} MiB resident",
        "memory pressure on {node}: {svc} pods using {pct}% of requested memory",
    ],
    [
        "{svc} CPU usage at {pct}% across {n} replicas in {region}",
        "pod {pod} pegged at {cores} cores during a request spike",
        "CPU saturation on {node} slowed {svc} request handling",
    ],
    [
        "pod {pod} in CrashLoopBackOff, restarted {n} times in {mins} minutes",
        "{svc} container exits with code {exit} shortly after start",
        "back-off restarting failed container {component} in pod {pod}",
    ],
    [
        "readiness probe failing for {pod}: HTTP {code} on /healthz",
        "{n} of {m} {svc} pods not ready after rollout {ver}",
        "pod {pod} stuck in ContainerCreating waiting for a volume mount",
    ],
    [
        "node {node} reports DiskPressure, {pct}% of ephemeral storage used",
        "container logs of {svc} filled {gb} GiB on {node}",
        "kubelet evicting pods from {node} to reclaim disk space",
    ],
    [
        "node {node} became NotReady, kubelet stopped posting status",
        "{n} pods of {svc} rescheduled after {node} went NotReady",
        "network unreachable on node {node} in {region}",
    ],
    [
        "kubelet on {node} not responding to health checks for {mins} minutes",
        "kubelet process crashed on {node} with a PLEG error",
        "scrape of kubelet metrics on {node} failing with timeouts",
    ],
    [
        "TLS certificate for {svc}.{region}.example.com expires in {days} days",
        "cert-manager failed to renew the certificate of the {svc} ingress",
        "clients of {svc} see x509 certificate has expired errors",
    ],
    [
        "{svc} 5xx error rate at {pct}% over the last {mins} minutes",
        "HTTP {code} responses from {svc} spiking after deploy {ver}",
        "upstream {dep} returning errors to {svc}, {n} failed requests per second",
    ],
    [
        "{svc} p99 latency at {ms} ms, above the {slo} ms objective",
        "slow responses from {dep} pushing {svc} latency up",
        "request latency of {svc} in {region} doubled in the last {mins} minutes",
    ],
    [
        "{queue} queue backlog at {n} messages, consumers of {svc} falling behind",
        "consumer lag on topic {queue}-events reached {n} messages",
        "{svc} workers stuck on a poison message in {queue}",
    ],
    [
        "deployment {svc} has {n} of {m} replicas available",
        "HPA cannot scale {svc} beyond {n} replicas: insufficient cpu",
        "rollout of {svc} {ver} stalled with unavailable replicas",
    ],
    [
        "container {component} of pod {pod} OOMKilled at {mem} MiB",
        "{svc} killed by the kernel OOM killer, limit {mem} MiB",
        "out of memory: {svc} exceeded its memory limit during {job}",
    ],
    [
        "ImagePullBackOff for image registry.example.com/{svc}:{ver} in pod {pod}",
        "registry returned 429 too many requests pulling {svc}:{ver}",
        "pull secret for the registry missing in namespace {ns}",
    ],
    [
        "persistent volume claim data-{svc}-{n} at {pct}% capacity",
        "{svc} database volume will fill up in {hours} hours",
        "write-ahead log growth filling volume data-{svc}-{n}",
    ],
    [
        "Prometheus target {svc} down for {mins} minutes",
        "{n} scrape targets of job {svc} unreachable",
        "metrics endpoint of {svc} returns connection refused",
    ],
    [
        "database deadlock detected between transactions of {svc}",
        "{n} deadlocks per minute on table {table}",
        "lock wait timeout in {svc} while updating {table}",
    ],
    [
        "{svc} connection pool exhausted, {n} requests waiting for a connection",
        "too many connections to {dep} from {svc} pods",
        "timeouts acquiring database connections in {svc}",
    ],
    [
        "{svc} throttled {pct}% of CPU periods by its cgroup limit",
        "CPU limit of {cores} cores throttling {svc} under load",
        "throttling on pod {pod} slowing garbage collection",
    ],
    [
        "job {job} failed after {n} attempts",
        "cron job {job} of {svc} did not complete within {mins} minutes",
        "batch job {job} exited with code {exit}",
    ],
];

/// What any incident's events may say: actions, analyses, notifications.
const GENERIC_TEMPLATES: [&str; 12] = [
    "restarted deployment {svc} in {ns} to recover",
    "scaled {svc} from {n} to {m} replicas",
    "rolled back {svc} to {ver} after a failed rollout",
    "drained node {node} and cordoned it for maintenance",
    "on-call engineer for {team} paged about {alert}",
    "incident ticket OPS-{ticket} opened for {alert} on {svc}",
    "AI analysis suggests {action} for {svc} with {pct}% confidence",
    "remediation of {svc} completed in {secs} seconds",
    "remediation of {svc} failed: timed out waiting for the rollout",
    "increased memory limit of {svc} to {mem} MiB",
    "cleared cache of {svc} and restarted its workers",
    "slack notification sent to #{team}-oncall about {alert}",
];

/// Short keyword queries per family (their words occur in the family's
/// texts, so hybrid mode's full-text side, which ANDs every word, matches).
const FAMILY_QUERIES: [[&str; 2]; 20] = [
    ["memory usage", "heap growing since release"],
    ["CPU usage replicas", "CPU saturation slowed requests"],
    ["CrashLoopBackOff restarted", "container exits with code"],
    ["readiness probe failing", "pods not ready after rollout"],
    ["DiskPressure ephemeral storage", "container logs filled"],
    ["node NotReady", "network unreachable"],
    ["kubelet not responding", "kubelet crashed PLEG"],
    ["certificate expires", "x509 certificate expired"],
    ["5xx error rate", "upstream returning errors"],
    ["p99 latency objective", "slow responses latency"],
    ["queue backlog consumers", "consumer lag topic"],
    ["replicas available", "HPA cannot scale"],
    ["OOMKilled container", "OOM killer memory limit"],
    ["ImagePullBackOff image", "registry too many requests"],
    ["persistent volume claim capacity", "volume will fill up"],
    ["Prometheus target down", "metrics endpoint connection refused"],
    ["database deadlock detected", "lock wait timeout"],
    ["connection pool exhausted", "too many connections"],
    ["CPU throttled cgroup limit", "throttling garbage collection"],
    ["job failed after attempts", "cron job did not complete"],
];

fn rrid(incident: usize) -> String {
    format!("rr-search-{incident:07}")
}

/// Incident k: namespace k % 10, alert (k / 10) % 200, so both filters are
/// even and independent of each other.
fn incident_namespace(k: usize) -> &'static str {
    TEAMS[k % TEAMS.len()]
}

fn incident_alert(k: usize) -> usize {
    (k / TEAMS.len()) % 200
}

fn incident_service(k: usize) -> String {
    let component = COMPONENTS[Rng::new(k as u64 ^ 0xC0FF_EE00).below(COMPONENTS.len() as u64) as usize];
    format!("{}-{component}", incident_namespace(k))
}

fn incidents_for(events: usize) -> usize {
    events.div_ceil(EVENTS_PER_INCIDENT).max(1)
}

fn events_of(k: usize, events: usize) -> usize {
    let incidents = incidents_for(events);
    let base = events / incidents;
    base + usize::from(k < events % incidents)
}

/// Fills `{name}` placeholders with values drawn from `rng`.
fn fill(template: &str, rng: &mut Rng, k: usize) -> String {
    let svc = incident_service(k);
    let mut out = String::with_capacity(template.len() + 32);
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let close = open + rest[open..].find('}').expect("closed placeholder");
        let name = &rest[open + 1..close];
        let value = match name {
            "svc" => svc.clone(),
            "pod" => format!("{svc}-{:05x}", rng.below(0xFFFFF)),
            "node" => format!("ip-10-{}-{}-{}", rng.below(4), rng.below(256), rng.below(256)),
            "n" => rng.range(2, 60).to_string(),
            "m" => rng.range(3, 80).to_string(),
            "pct" => rng.range(55, 100).to_string(),
            "mem" => (rng.range(1, 32) * 256).to_string(),
            "ver" => format!("v{}.{}.{}", rng.range(1, 4), rng.below(30), rng.below(10)),
            "region" => rng.pick(&REGIONS).to_string(),
            "code" => rng.pick(&["500", "502", "503", "504", "429"]).to_string(),
            "ms" => rng.range(300, 9000).to_string(),
            "slo" => rng.pick(&["200", "250", "500", "1000"]).to_string(),
            "mins" => rng.range(2, 90).to_string(),
            "days" => rng.range(1, 14).to_string(),
            "hours" => rng.range(2, 72).to_string(),
            "secs" => rng.range(5, 900).to_string(),
            "exit" => rng.pick(&["1", "2", "137", "139", "143"]).to_string(),
            "cores" => format!("{}.{}", rng.range(1, 8), rng.below(10)),
            "gb" => rng.range(5, 200).to_string(),
            "dep" => rng.pick(&DEPENDENCIES).to_string(),
            "queue" => format!(
                "{}-{}",
                incident_namespace(k),
                rng.pick(&["orders", "events", "emails", "jobs"])
            ),
            "job" => format!(
                "{}-{}-{}",
                incident_namespace(k),
                rng.pick(&["nightly-export", "reindex", "backup", "report", "cleanup"]),
                rng.below(1000)
            ),
            "table" => format!(
                "{}_{}",
                incident_namespace(k),
                rng.pick(&["orders", "accounts", "items", "ledger"])
            ),
            "component" => rng.pick(&COMPONENTS).to_string(),
            "ns" => incident_namespace(k).to_owned(),
            "team" => incident_namespace(k).to_owned(),
            "alert" => alert_name(incident_alert(k)),
            "action" => rng.pick(&ACTIONS).to_string(),
            "ticket" => rng.range(1000, 99999).to_string(),
            other => panic!("unknown placeholder {other}"),
        };
        out.push_str(&value);
        rest = &rest[close + 1..];
    }
    out.push_str(rest);
    out
}

/// The text of event `j` of incident `k`: mostly its alert family's, the
/// rest generic.
fn event_text(k: usize, j: usize) -> String {
    let mut rng = Rng::new(((k as u64) << 8 | j as u64) ^ 0x7E47_0000);
    let family = incident_alert(k) % 20;
    let template = if rng.chance(70) {
        *rng.pick(&FAMILY_TEMPLATES[family])
    } else {
        *rng.pick(&GENERIC_TEMPLATES)
    };
    fill(template, &mut rng, k)
}

fn corpus_texts(events: usize) -> Vec<String> {
    let mut texts = Vec::with_capacity(events);
    for k in 0..incidents_for(events) {
        for j in 0..events_of(k, events) {
            texts.push(event_text(k, j));
        }
    }
    texts
}

/// `count` distinct short keyword queries.
fn query_texts(count: usize) -> Vec<String> {
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(count);
    let mut rng = Rng::new(0x051E_A8C4);
    let mut q = 0usize;
    while out.len() < count {
        let family = q % 20;
        let phrase = FAMILY_QUERIES[family][(q / 20) % 2];
        let text = if q < 40 {
            phrase.to_owned()
        } else {
            format!("{phrase} {}-{}", rng.pick(&TEAMS), rng.pick(&COMPONENTS))
        };
        if seen.insert(text.clone()) {
            out.push(text);
        }
        q += 1;
    }
    out
}

fn texts_hash(texts: &[String]) -> u64 {
    // FNV-1a: stable across runs and toolchains (DefaultHasher is not promised to be).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for t in texts {
        for b in t.as_bytes().iter().chain(b"\n") {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01B3);
        }
    }
    h
}

// ---------------------------------------------------------------------------
// Embeddings: computed once, cached as raw little-endian f32
// ---------------------------------------------------------------------------

fn cache_path(events: usize, texts: &[String]) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!(
        ".cache/bench/search-v{TEMPLATE_VERSION}-{events}-{:016x}.f32",
        texts_hash(texts)
    ))
}

fn load_cached(path: &Path, count: usize) -> Option<Vec<f32>> {
    let mut file = std::fs::File::open(path).ok()?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).ok()?;
    if bytes.len() != count * DIMS * 4 {
        return None;
    }
    Some(
        bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
    )
}

/// Which model turns the corpus into vectors. The PyTorch reference agrees
/// with the local model to a cosine of 1.000000 (benches/embedding.rs) and
/// runs about twice as fast on this machine's CPU, which matters at 1M events.
#[derive(Clone, Copy, PartialEq)]
enum Embedder {
    Local,
    Reference,
}

/// Reference runs embed this many texts per child process, so progress shows.
const REFERENCE_CHUNK: usize = 50_000;

/// Embeds each distinct text once, in batches of texts of similar length (a
/// batch is padded to its longest text); results in the texts' order.
fn embed_corpus(
    model: &LocalMiniLm,
    model_dir: &str,
    embedder: Embedder,
    texts: &[String],
) -> anyhow::Result<Vec<f32>> {
    let started = Instant::now();
    let mut first: HashMap<&str, usize> = HashMap::new();
    let mut distinct: Vec<usize> = Vec::new();
    for (i, t) in texts.iter().enumerate() {
        first.entry(t.as_str()).or_insert_with(|| {
            distinct.push(i);
            i
        });
    }
    distinct.sort_by_key(|&i| (texts[i].len(), i));
    let mut out = vec![0f32; texts.len() * DIMS];
    let mut done = 0usize;
    let mut last_report = Instant::now();
    anyhow::ensure!(
        embedder == Embedder::Local || reference::available(),
        "BENCH_SEARCH_EMBEDDER=reference needs scripts/bench-venv.sh --reference"
    );
    let chunk = match embedder {
        Embedder::Local => EMBED_BATCH,
        Embedder::Reference => REFERENCE_CHUNK,
    };
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    let scratch = Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/bench");
    for (b, batch) in distinct.chunks(chunk).enumerate() {
        let batch_texts: Vec<String> = batch.iter().map(|&i| texts[i].clone()).collect();
        let vectors: Vec<f32> = match embedder {
            Embedder::Local => model.embed_blocking(&batch_texts)?.concat(),
            Embedder::Reference => reference::embed(model_dir, &batch_texts, EMBED_BATCH, threads, &scratch)?.vectors,
        };
        anyhow::ensure!(
            vectors.len() == batch.len() * DIMS,
            "the model returned {} floats for {} texts",
            vectors.len(),
            batch.len()
        );
        for (&i, v) in batch.iter().zip(vectors.chunks_exact(DIMS)) {
            out[i * DIMS..(i + 1) * DIMS].copy_from_slice(v);
        }
        done += batch.len();
        if last_report.elapsed() >= Duration::from_secs(10) || done == distinct.len() || b == 0 {
            last_report = Instant::now();
            let elapsed = started.elapsed().as_secs_f64();
            let rate = done as f64 / elapsed;
            eprintln!(
                "  embedded {done}/{} distinct texts, {rate:.0}/s, {elapsed:.0} s elapsed, ~{:.0} s left",
                distinct.len(),
                (distinct.len() - done) as f64 / rate
            );
        }
    }
    for (i, t) in texts.iter().enumerate() {
        let source = first[t.as_str()];
        if source != i {
            out.copy_within(source * DIMS..(source + 1) * DIMS, i * DIMS);
        }
    }
    Ok(out)
}

fn corpus_vectors(
    model: &LocalMiniLm,
    model_dir: &str,
    embedder: Embedder,
    texts: &[String],
) -> anyhow::Result<(Vec<f32>, f64, bool)> {
    let path = cache_path(texts.len(), texts);
    if let Some(v) = load_cached(&path, texts.len()) {
        println!("  embeddings: cached in {}", path.display());
        return Ok((v, 0.0, true));
    }
    println!(
        "  embedding {} texts with {} (batches of {EMBED_BATCH}); cached afterwards in {}",
        texts.len(),
        match embedder {
            Embedder::Local => "the local model",
            Embedder::Reference => "the PyTorch reference (BENCH_SEARCH_EMBEDDER=reference)",
        },
        path.display()
    );
    let started = Instant::now();
    let vectors = embed_corpus(model, model_dir, embedder, texts)?;
    let seconds = started.elapsed().as_secs_f64();
    std::fs::create_dir_all(path.parent().unwrap())?;
    let tmp = path.with_extension("f32.tmp");
    {
        let mut file = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        for x in &vectors {
            file.write_all(&x.to_le_bytes())?;
        }
        file.flush()?;
    }
    std::fs::rename(&tmp, &path)?;
    println!(
        "  embedded in {seconds:.1} s ({:.0} texts/s)",
        texts.len() as f64 / seconds
    );
    Ok((vectors, seconds, false))
}

// ---------------------------------------------------------------------------
// Seeding
// ---------------------------------------------------------------------------

fn at_micros(micros: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(micros).expect("timestamp in range")
}

/// A v7 id stamped with `at`, its random bits from `rng`: deterministic.
fn v7_at(at: DateTime<Utc>, rng: &mut Rng) -> Uuid {
    let mut bytes = [0u8; 10];
    bytes[..8].copy_from_slice(&rng.next().to_le_bytes());
    bytes[8..].copy_from_slice(&rng.next().to_le_bytes()[..2]);
    uuid::Builder::from_unix_timestamp_millis(at.timestamp_millis() as u64, &bytes).into_uuid()
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
        definitions.push(definition.replacen(" ON ONLY ", " ON ", 1));
    }
    Ok(definitions)
}

const EVENT_COPY_COLUMNS: &str = "id, occurred_at, incident_id, correlation_id, remediation_request_id, namespace, \
    cluster, kind, labels, parent_event_id, payload, search_text, received_at, source, trace_id, embedding_state";

/// PostgreSQL's binary timestamp: microseconds since 2000-01-01 UTC.
fn pg_micros(at: DateTime<Utc>) -> i64 {
    at.timestamp_micros() - 946_684_800_000_000
}

struct SeedTimes {
    copy: f64,
    index: f64,
    vacuum: f64,
}

async fn seed(
    conn: &mut PgConnection,
    events: usize,
    texts: &[String],
    vectors: &[f32],
    end: DateTime<Utc>,
) -> anyhow::Result<SeedTimes> {
    exec(conn, "SET synchronous_commit = off").await?;
    exec(conn, "SET maintenance_work_mem = '1GB'").await?;
    let span = SPAN_DAYS * 86_400_000_000;
    let start = end.timestamp_micros() - span;
    let mut month = end - TimeDelta::days(SPAN_DAYS + 1);
    while month < end + TimeDelta::days(32) {
        sqlx::query("SELECT ensure_audit_partitions($1)")
            .bind(month)
            .execute(&mut *conn)
            .await?;
        month += TimeDelta::days(27);
    }
    // The model's row first (the embeddings reference it), its HNSW index
    // only after the COPY: register_embedding_model finds the row and builds
    // the index in one pass.
    let model_id: i16 = sqlx::query_scalar(
        "INSERT INTO embedding_models (name, dimensions, provider, active) VALUES ($1, $2, 'local', true) RETURNING id",
    )
    .bind(MODEL_NAME)
    .bind(DIMS as i32)
    .fetch_one(&mut *conn)
    .await?;
    let secondary = drop_secondary_indexes(conn, "audit_events").await?;

    let started = Instant::now();
    let incidents = incidents_for(events);
    let mut inc_ids = Vec::with_capacity(incidents);
    let mut inc_rr = Vec::with_capacity(incidents);
    let mut inc_ns = Vec::with_capacity(incidents);
    let mut inc_alert = Vec::with_capacity(incidents);
    let mut inc_first_at = Vec::with_capacity(incidents);
    let mut inc_first_id = Vec::with_capacity(incidents);
    let mut inc_last_at = Vec::with_capacity(incidents);
    let mut inc_count = Vec::with_capacity(incidents);
    let mut inc_severity = Vec::with_capacity(incidents);

    let mut events_copy = conn
        .copy_in_raw(&format!("COPY audit_events ({EVENT_COPY_COLUMNS}) FROM STDIN"))
        .await?;
    let mut chunk = String::with_capacity(8 << 20);
    // Binary COPY rows of audit_embeddings, collected while the events go in.
    let mut emb = Vec::with_capacity(events * (DIMS * 4 + 64) + 32);
    emb.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
    emb.extend_from_slice(&0i32.to_be_bytes());
    emb.extend_from_slice(&0i32.to_be_bytes());
    let mut index = 0usize;
    for k in 0..incidents {
        let mut rng = Rng::new(k as u64 ^ 0x1C1D_E000);
        let rr = rrid(k);
        let incident_id = incident_id_for(&rr);
        let namespace = incident_namespace(k);
        let mut t = start + rng.below(span as u64 - 6 * 3_600_000_000) as i64;
        let count = events_of(k, events);
        let mut first: Option<(DateTime<Utc>, Uuid)> = None;
        let mut last = t;
        for j in 0..count {
            if j > 0 {
                t += 5_000_000 + rng.below(30 * 60 * 1_000_000) as i64;
            }
            let occurred_at = at_micros(t);
            let received_at = at_micros(t + 20_000 + rng.below(2_000_000) as i64);
            let id = v7_at(received_at, &mut rng);
            first.get_or_insert((occurred_at, id));
            last = t;
            let text = &texts[index];
            let payload = Payload::Custom(Custom {
                event_type: "bench".into(),
                action: None,
                outcome: None,
                data: None,
                text: Some(text.clone()),
            });
            row(
                &mut chunk,
                &[
                    Some(&id.to_string()),
                    Some(&ts(occurred_at)),
                    Some(&incident_id.to_string()),
                    Some(&format!("corr-{rr}")),
                    Some(&rr),
                    Some(namespace),
                    None,
                    Some(&domain::AuditKind::Custom.code().to_string()),
                    Some("{}"),
                    None,
                    Some(&serde_json::to_string(&payload)?),
                    Some(text),
                    Some(&ts(received_at)),
                    Some(common::BENCH_SOURCE),
                    None,
                    Some(&domain::EmbeddingState::Generated.code().to_string()),
                ],
            );
            // (event_id uuid, occurred_at timestamptz, model_id int2, embedding vector)
            emb.extend_from_slice(&4i16.to_be_bytes());
            emb.extend_from_slice(&16i32.to_be_bytes());
            emb.extend_from_slice(id.as_bytes());
            emb.extend_from_slice(&8i32.to_be_bytes());
            emb.extend_from_slice(&pg_micros(occurred_at).to_be_bytes());
            emb.extend_from_slice(&2i32.to_be_bytes());
            emb.extend_from_slice(&model_id.to_be_bytes());
            emb.extend_from_slice(&((4 + DIMS * 4) as i32).to_be_bytes());
            emb.extend_from_slice(&(DIMS as i16).to_be_bytes());
            emb.extend_from_slice(&0i16.to_be_bytes());
            for x in &vectors[index * DIMS..(index + 1) * DIMS] {
                emb.extend_from_slice(&x.to_be_bytes());
            }
            index += 1;
        }
        if chunk.len() > (8 << 20) - 64 * 1024 {
            events_copy.send(chunk.as_bytes()).await?;
            chunk.clear();
        }
        let (first_at, first_id) = first.expect("an incident has events");
        inc_ids.push(incident_id);
        inc_rr.push(rr);
        inc_ns.push(namespace.to_owned());
        inc_alert.push(alert_name(incident_alert(k)));
        inc_first_at.push(first_at);
        inc_first_id.push(first_id);
        inc_last_at.push(at_micros(last));
        inc_count.push(count as i64);
        inc_severity.push(1 + (k % 3) as i16);
    }
    events_copy.send(chunk.as_bytes()).await?;
    let copied = events_copy.finish().await?;
    emb.extend_from_slice(&(-1i16).to_be_bytes());
    let mut emb_copy = conn
        .copy_in_raw("COPY audit_embeddings (event_id, occurred_at, model_id, embedding) FROM STDIN (FORMAT binary)")
        .await?;
    for part in emb.chunks(8 << 20) {
        emb_copy.send(part).await?;
    }
    let embedded = emb_copy.finish().await?;
    drop(emb);
    // Incidents as the projection would hold them; alert_name is set directly
    // (these incidents' events are custom events, which carry no alert).
    let projected = sqlx::query(
        "INSERT INTO incidents (id, remediation_request_id, correlation_id, namespace, first_stamp, label_facts, \
         first_seen_at, last_event_at, event_count, alert_name, severity, signal_type) \
         SELECT id, rr, 'corr-' || rr, ns, ROW(first_at, first_id)::fact_stamp, \
                incident_label_facts(jsonb_build_object('team', ns), ROW(first_at, first_id)::fact_stamp), \
                first_at, last_at, n, alert, sev, 'prometheus-alert' \
         FROM unnest($1::uuid[], $2::text[], $3::text[], $4::timestamptz[], $5::uuid[], $6::timestamptz[], \
                     $7::int8[], $8::text[], $9::int2[]) AS t(id, rr, ns, first_at, first_id, last_at, n, alert, sev)",
    )
    .bind(&inc_ids)
    .bind(&inc_rr)
    .bind(&inc_ns)
    .bind(&inc_first_at)
    .bind(&inc_first_id)
    .bind(&inc_last_at)
    .bind(&inc_count)
    .bind(&inc_alert)
    .bind(&inc_severity)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    for definition in &secondary {
        exec(conn, definition.clone()).await?;
    }
    let copy = started.elapsed().as_secs_f64();
    println!(
        "  COPY: {copied} events, {embedded} embeddings, {projected} incidents, secondary indexes of audit_events \
         rebuilt, in {copy:.1} s"
    );

    let started = Instant::now();
    // The service's default graph, as `register_model` would build it.
    let graph = datastorage::config::Settings::default().vector_index;
    let registered: i16 = sqlx::query_scalar("SELECT register_embedding_model($1, $2, 'local', $3, $4)")
        .bind(MODEL_NAME)
        .bind(DIMS as i32)
        .bind(graph.hnsw_m as i32)
        .bind(graph.hnsw_ef_construction as i32)
        .fetch_one(&mut *conn)
        .await?;
    anyhow::ensure!(
        registered == model_id,
        "register_embedding_model returned another model id"
    );
    let index = started.elapsed().as_secs_f64();
    println!("  HNSW index (register_embedding_model, maintenance_work_mem 1GB) built in {index:.1} s");

    let started = Instant::now();
    exec(conn, "VACUUM (ANALYZE)").await?;
    let vacuum = started.elapsed().as_secs_f64();
    println!("  VACUUM (ANALYZE) in {vacuum:.1} s");
    Ok(SeedTimes { copy, index, vacuum })
}

// ---------------------------------------------------------------------------
// The service's SQL, mirrored from src/storage/search.rs
// ---------------------------------------------------------------------------

#[derive(Clone)]
enum Arg {
    Vector(Arc<Vec<f32>>),
    Text(String),
    Int8(i64),
    Uuids(Vec<Uuid>),
    Times(Vec<DateTime<Utc>>),
}

impl Arg {
    /// As pg_prepared_statements names the type sqlx binds.
    fn pg_type(&self) -> &'static str {
        match self {
            Arg::Vector(_) => "vector",
            Arg::Text(_) => "text",
            Arg::Int8(_) => "bigint",
            Arg::Uuids(_) => "uuid[]",
            Arg::Times(_) => "timestamp with time zone[]",
        }
    }

    fn literal(&self) -> String {
        fn lit(s: &str) -> String {
            format!("'{}'", s.replace('\'', "''"))
        }
        match self {
            Arg::Vector(v) => lit(&format!(
                "[{}]",
                v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",")
            )),
            Arg::Text(s) => lit(s),
            Arg::Int8(n) => n.to_string(),
            Arg::Uuids(ids) => lit(&format!(
                "{{{}}}",
                ids.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",")
            )),
            Arg::Times(ats) => lit(&format!(
                "{{{}}}",
                ats.iter()
                    .map(|x| format!("\"{}\"", ts(*x)))
                    .collect::<Vec<_>>()
                    .join(",")
            )),
        }
    }
}

/// A statement as the service's QueryBuilder produces it.
#[derive(Clone)]
struct Stmt {
    text: String,
    args: Vec<Arg>,
}

impl Stmt {
    fn new(text: impl Into<String>) -> Self {
        Stmt {
            text: text.into(),
            args: Vec::new(),
        }
    }
    fn push(&mut self, sql: &str) -> &mut Self {
        self.text.push_str(sql);
        self
    }
    fn bind(&mut self, arg: Arg) -> &mut Self {
        self.args.push(arg);
        write!(self.text, "${}", self.args.len()).unwrap();
        self
    }
    fn types(&self) -> String {
        self.args.iter().map(Arg::pg_type).collect::<Vec<_>>().join(",")
    }

    async fn fetch(&self, conn: &mut PgConnection) -> anyhow::Result<Vec<PgRow>> {
        let mut q = sqlx::query(AssertSqlSafe(self.text.clone()));
        for a in &self.args {
            q = match a {
                Arg::Vector(v) => q.bind(pgvector::Vector::from(v.as_ref().clone())),
                Arg::Text(s) => q.bind(s.clone()),
                Arg::Int8(n) => q.bind(*n),
                Arg::Uuids(ids) => q.bind(ids.clone()),
                Arg::Times(ats) => q.bind(ats.clone()),
            };
        }
        Ok(q.fetch_all(&mut *conn).await?)
    }

    fn prepare(&self, name: &str) -> String {
        let types = self.args.iter().map(Arg::pg_type).collect::<Vec<_>>().join(", ");
        format!("PREPARE {name}({types}) AS {}", self.text)
    }

    fn execute(&self, name: &str) -> String {
        let args = self.args.iter().map(Arg::literal).collect::<Vec<_>>().join(", ");
        format!("EXECUTE {name}({args})")
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Filter {
    None,
    /// ~10% of the events.
    Namespace,
    /// ~0.5% of the events.
    Alert,
}

impl Filter {
    fn is_some(self) -> bool {
        self != Filter::None
    }
}

/// A query: its text, vector and filter values.
struct QueryCase {
    text: String,
    vector: Arc<Vec<f32>>,
    namespace: String,
    alert: String,
}

impl QueryCase {
    fn filter(&self, filter: Filter) -> IncidentFilter {
        match filter {
            Filter::None => IncidentFilter::default(),
            Filter::Namespace => IncidentFilter {
                namespace: Some(self.namespace.clone()),
                ..Default::default()
            },
            Filter::Alert => IncidentFilter {
                alert_name: Some(self.alert.clone()),
                ..Default::default()
            },
        }
    }
}

fn incident_join(filter: Filter) -> &'static str {
    if filter.is_some() {
        " JOIN incidents i ON i.id = e.incident_id"
    } else {
        ""
    }
}

/// push_scope with no kinds and no exclusion: push_filter's alert_name,
/// action_type, namespace, cluster order.
fn push_scope(s: &mut Stmt, filter: Filter, q: &QueryCase) {
    match filter {
        Filter::None => {}
        Filter::Alert => {
            s.push(" AND i.alert_name = ").bind(Arg::Text(q.alert.clone()));
        }
        Filter::Namespace => {
            s.push(" AND i.namespace = ").bind(Arg::Text(q.namespace.clone()));
        }
    }
}

// storage/search.rs: incident_events_upper_bound.
fn incident_events_upper_bound(filter: Filter, q: &QueryCase, cap: usize) -> Stmt {
    let mut s = Stmt::new(
        "SELECT coalesce(sum(n), 0)::bigint FROM (SELECT i.event_count AS n FROM incidents i WHERE true".to_owned(),
    );
    push_scope(&mut s, filter, q);
    s.push(" LIMIT ").bind(Arg::Int8(cap as i64)).push(") AS matching");
    s
}

// storage/search.rs: events_in_scope (those with an embedding for the model).
fn events_in_scope(model: &ModelHandle, filter: Filter, q: &QueryCase, limit: usize) -> Stmt {
    let events = if filter.is_some() {
        "incidents i CROSS JOIN LATERAL (SELECT e.id, e.occurred_at, e.kind FROM audit_events e \
         WHERE e.incident_id = i.id OFFSET 0) AS e"
    } else {
        "audit_events e"
    };
    let mut s = Stmt::new(format!(
        "SELECT e.id, e.occurred_at FROM {events} \
         JOIN stored_embeddings emb ON emb.event_id = e.id AND emb.occurred_at = e.occurred_at \
         AND emb.model_id = {} WHERE true",
        model.id
    ));
    push_scope(&mut s, filter, q);
    s.push(" LIMIT ").bind(Arg::Int8(limit as i64));
    s
}

type EventKey = (Uuid, DateTime<Utc>);

/// search.rs: Strategy.
#[derive(Clone, Copy)]
enum Way<'a> {
    Index,
    Candidates(&'a [EventKey]),
    ExactScan,
}

// search.rs: nearest, every strategy.
fn nearest(
    model: &ModelHandle,
    vector: &Arc<Vec<f32>>,
    filter: Filter,
    q: &QueryCase,
    path: Way<'_>,
    limit: usize,
) -> Stmt {
    let (id, dims) = (model.id, model.dimensions);
    let mut s = Stmt::new("");
    match path {
        Way::ExactScan => {
            s.push(&format!("SELECT {EVENT_COLUMNS}, emb.embedding <=> "))
                .bind(Arg::Vector(vector.clone()))
                .push(&format!(
                    " AS distance FROM stored_embeddings emb \
                     JOIN audit_events e ON e.id = emb.event_id{} \
                     WHERE emb.model_id = {id}",
                    incident_join(filter)
                ));
            push_scope(&mut s, filter, q);
            s.push(" ORDER BY distance, e.id LIMIT ").bind(Arg::Int8(limit as i64));
        }
        Way::Candidates(keys) => {
            let (ids, ats): (Vec<Uuid>, Vec<DateTime<Utc>>) = keys.iter().copied().unzip();
            s.push(&format!("SELECT {EVENT_COLUMNS}, emb.embedding <=> "))
                .bind(Arg::Vector(vector.clone()))
                .push(" AS distance FROM unnest(")
                .bind(Arg::Uuids(ids))
                .push("::uuid[], ")
                .bind(Arg::Times(ats))
                .push(&format!(
                    "::timestamptz[]) AS k(id, occurred_at) \
                     JOIN audit_events e ON e.id = k.id AND e.occurred_at = k.occurred_at \
                     JOIN stored_embeddings emb ON emb.event_id = e.id AND emb.occurred_at = e.occurred_at \
                     AND emb.model_id = {id} \
                     ORDER BY distance, e.id LIMIT "
                ))
                .bind(Arg::Int8(limit as i64));
        }
        Way::Index => {
            s.push(&format!("(SELECT {EVENT_COLUMNS}, emb.embedding::vector({dims}) <=> "))
                .bind(Arg::Vector(vector.clone()))
                .push(&format!(
                    "::vector({dims}) AS distance FROM audit_embeddings emb \
                     JOIN audit_events e ON e.id = emb.event_id{} \
                     WHERE emb.model_id = {id}",
                    incident_join(filter)
                ));
            push_scope(&mut s, filter, q);
            s.push(&format!(" ORDER BY emb.embedding::vector({dims}) <=> "))
                .bind(Arg::Vector(vector.clone()))
                .push(&format!("::vector({dims}) LIMIT "))
                .bind(Arg::Int8(limit as i64));
            // search.rs: push_fresh_nearest (the fresh segment is empty here,
            // but the service's statement carries it).
            s.push(") UNION ALL (");
            if filter.is_some() {
                s.push(&format!("SELECT {EVENT_COLUMNS}, emb.embedding <=> "))
                    .bind(Arg::Vector(vector.clone()))
                    .push(&format!(
                        " AS distance FROM fresh_embeddings emb \
                         JOIN audit_events e ON e.id = emb.event_id AND e.occurred_at = emb.occurred_at{} \
                         WHERE emb.model_id = {id}",
                        incident_join(filter)
                    ));
                push_scope(&mut s, filter, q);
                s.push(" ORDER BY distance, e.id LIMIT ").bind(Arg::Int8(limit as i64));
            } else {
                s.push(&format!(
                    "SELECT {EVENT_COLUMNS}, f.distance FROM (SELECT event_id, occurred_at, embedding <=> "
                ))
                .bind(Arg::Vector(vector.clone()))
                .push(&format!(" AS distance FROM fresh_embeddings WHERE model_id = {id}"))
                .push(" ORDER BY distance LIMIT ")
                .bind(Arg::Int8(limit as i64))
                .push(
                    ") AS f JOIN audit_events e ON e.id = f.event_id AND e.occurred_at = f.occurred_at \
                     ORDER BY f.distance, e.id",
                );
            }
            s.push(")");
        }
    }
    s
}

// search.rs: text_matches.
fn text_matches(text: &str, filter: Filter, q: &QueryCase, limit: usize) -> Stmt {
    let mut s = Stmt::new(format!(
        "SELECT e.id, e.occurred_at FROM audit_events e{}, websearch_to_tsquery('english', ",
        incident_join(filter)
    ));
    s.bind(Arg::Text(text.to_owned()))
        .push(") AS q WHERE e.search_tsv @@ q");
    push_scope(&mut s, filter, q);
    s.push(" ORDER BY ts_rank_cd(e.search_tsv, q) DESC, e.id LIMIT ")
        .bind(Arg::Int8(limit as i64));
    s
}

fn ranked(rows: &[PgRow]) -> Vec<(Uuid, f64)> {
    rows.iter().map(|r| (r.get("id"), r.get("distance"))).collect()
}

fn keys(rows: &[PgRow]) -> Vec<EventKey> {
    rows.iter().map(|r| (r.get(0), r.get(1))).collect()
}

fn by_distance(a: &(Uuid, f64), b: &(Uuid, f64)) -> std::cmp::Ordering {
    a.1.total_cmp(&b.1).then_with(|| a.0.cmp(&b.0))
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Vector,
    Hybrid,
}

struct Scenario {
    name: &'static str,
    mode: Mode,
    filter: Filter,
    min_similarity: Option<f32>,
}

struct Knobs {
    threshold: usize,
    depth: usize,
    rrf_k: f64,
}

/// The statements one plain search ran.
#[derive(Default)]
struct Trace {
    stmts: Vec<Stmt>,
}

async fn run(conn: &mut PgConnection, stmt: Stmt, trace: &mut Option<&mut Trace>) -> anyhow::Result<Vec<PgRow>> {
    let rows = stmt.fetch(conn).await?;
    if let Some(t) = trace.as_deref_mut() {
        t.stmts.push(stmt);
    }
    Ok(rows)
}

/// search.rs: vector_ranking. The index (or the candidates), and when the
/// index returns fewer rows than asked for although the scope holds more,
/// the exact comparison; re-sorted.
// Mirrors the service's function, plus the bench's own counters.
#[allow(clippy::too_many_arguments)]
async fn vector_ranking(
    conn: &mut PgConnection,
    model: &ModelHandle,
    sc: &Scenario,
    q: &QueryCase,
    candidates: Option<&[EventKey]>,
    limit: usize,
    fallbacks: &mut usize,
    trace: &mut Option<&mut Trace>,
) -> anyhow::Result<Vec<(Uuid, f64)>> {
    let path = candidates.map_or(Way::Index, Way::Candidates);
    let mut rows = ranked(&run(conn, nearest(model, &q.vector, sc.filter, q, path, limit), trace).await?);
    if rows.len() < limit && candidates.is_none() {
        let in_scope = run(conn, events_in_scope(model, sc.filter, q, limit), trace)
            .await?
            .len();
        if in_scope > rows.len() {
            *fallbacks += 1;
            rows = ranked(
                &run(
                    conn,
                    nearest(model, &q.vector, sc.filter, q, Way::ExactScan, limit),
                    trace,
                )
                .await?,
            );
        }
    }
    rows.sort_by(by_distance);
    Ok(rows)
}

/// SearchService::search with a vector (or, hybrid, text) query, the
/// decisions and fusion of src/search.rs, the statements in plain SQL.
/// Returns the hits (event id, cosine distance), best first; `trace` gets the
/// statements run.
async fn plain_search(
    conn: &mut PgConnection,
    model: &ModelHandle,
    knobs: &Knobs,
    sc: &Scenario,
    q: &QueryCase,
    fallbacks: &mut usize,
    mut trace: Option<&mut Trace>,
) -> anyhow::Result<Vec<(Uuid, f64)>> {
    let trace = &mut trace;
    // search.rs: small_scope.
    let candidates = if sc.filter.is_some() && knobs.threshold > 0 {
        let bound: i64 = run(
            conn,
            incident_events_upper_bound(sc.filter, q, knobs.threshold + 1),
            trace,
        )
        .await?[0]
            .get(0);
        if bound > knobs.threshold as i64 {
            None
        } else {
            let found = keys(&run(conn, events_in_scope(model, sc.filter, q, knobs.threshold + 1), trace).await?);
            (found.len() <= knobs.threshold).then_some(found)
        }
    } else {
        None
    };
    let mut hits = match sc.mode {
        Mode::Vector => vector_ranking(conn, model, sc, q, candidates.as_deref(), TOP_K, fallbacks, trace).await?,
        Mode::Hybrid => {
            let by_vector =
                vector_ranking(conn, model, sc, q, candidates.as_deref(), knobs.depth, fallbacks, trace).await?;
            let by_text = keys(&run(conn, text_matches(&q.text, sc.filter, q, knobs.depth), trace).await?);
            let mut scores: HashMap<Uuid, f64> = HashMap::new();
            for (rank, (id, _)) in by_vector.iter().enumerate() {
                *scores.entry(*id).or_default() += 1.0 / (knobs.rrf_k + rank as f64 + 1.0);
            }
            for (rank, (id, _)) in by_text.iter().enumerate() {
                *scores.entry(*id).or_default() += 1.0 / (knobs.rrf_k + rank as f64 + 1.0);
            }
            let mut rows = by_vector;
            let missing: Vec<EventKey> = by_text
                .into_iter()
                .filter(|(id, _)| !rows.iter().any(|r| r.0 == *id))
                .collect();
            if !missing.is_empty() {
                // ranked_events: the candidates statement, unfiltered scope.
                let n = missing.len();
                rows.extend(ranked(
                    &run(
                        conn,
                        nearest(model, &q.vector, Filter::None, q, Way::Candidates(&missing), n),
                        trace,
                    )
                    .await?,
                ));
            }
            let score = |r: &(Uuid, f64)| scores.get(&r.0).copied().unwrap_or_default();
            rows.sort_by(|a, b| score(b).total_cmp(&score(a)).then_with(|| by_distance(a, b)));
            rows
        }
    };
    if let Some(min) = sc.min_similarity {
        hits.retain(|h| (1.0 - h.1).clamp(-1.0, 1.0) as f32 >= min);
    }
    hits.truncate(TOP_K);
    Ok(hits)
}

// ---------------------------------------------------------------------------
// The service
// ---------------------------------------------------------------------------

fn request(sc: &Scenario, q: &QueryCase) -> pb::SearchSimilarRequest {
    use pb::search_similar_request::Query;
    let filter = match sc.filter {
        Filter::None => None,
        Filter::Namespace => Some(pb::IncidentFilter {
            namespace: q.namespace.clone(),
            ..Default::default()
        }),
        Filter::Alert => Some(pb::IncidentFilter {
            alert_name: q.alert.clone(),
            ..Default::default()
        }),
    };
    pb::SearchSimilarRequest {
        query: Some(match sc.mode {
            Mode::Vector => Query::Vector(pb::Vector {
                values: q.vector.as_ref().clone(),
            }),
            Mode::Hybrid => Query::Text(q.text.clone()),
        }),
        top_k: TOP_K as i32,
        min_similarity: sc.min_similarity,
        filter,
        kinds: Vec::new(),
        group_by_incident: false,
        mode: match sc.mode {
            Mode::Vector => pb::SearchMode::Vector,
            Mode::Hybrid => pb::SearchMode::Hybrid,
        } as i32,
        model: String::new(),
    }
}

/// One SearchSimilar call: its latency and hits (event id, 1 - similarity).
async fn call_service(
    client: &mut VectorSearchClient<Channel>,
    request: pb::SearchSimilarRequest,
) -> anyhow::Result<(u64, Vec<(Uuid, f64)>)> {
    let started = Instant::now();
    let reply = client.search_similar(request).await?.into_inner();
    let elapsed = micros(started.elapsed());
    let hits = reply
        .hits
        .into_iter()
        .map(|h| Ok((Uuid::parse_str(&h.event_id)?, 1.0 - f64::from(h.similarity))))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok((elapsed, hits))
}

// ---------------------------------------------------------------------------
// Ground truth and recall
// ---------------------------------------------------------------------------

enum Truth {
    /// Exact top 10 (id, cosine distance), best first.
    Vector(Vec<(Uuid, f64)>),
    /// RRF score of every fused candidate, and the top 10 ids.
    Hybrid { scores: HashMap<Uuid, f64>, top: Vec<Uuid> },
}

/// Distances the service reports travel as f32 similarities.
const DISTANCE_TIE: f64 = 1e-6;

/// recall@10: the share of the true top 10 found, a hit tied with the 10th
/// true one counting as found (texts from templates can embed identically).
fn recall(truth: &Truth, got: &[(Uuid, f64)]) -> f64 {
    match truth {
        Truth::Vector(exact) => {
            if exact.is_empty() {
                return if got.is_empty() { 1.0 } else { 0.0 };
            }
            let ids: HashSet<Uuid> = exact.iter().map(|x| x.0).collect();
            let kth = exact.last().unwrap().1;
            let found = got
                .iter()
                .take(TOP_K)
                .filter(|(id, d)| ids.contains(id) || *d <= kth + DISTANCE_TIE)
                .count();
            (found.min(exact.len())) as f64 / exact.len() as f64
        }
        Truth::Hybrid { scores, top } => {
            if top.is_empty() {
                return if got.is_empty() { 1.0 } else { 0.0 };
            }
            let ids: HashSet<&Uuid> = top.iter().collect();
            let kth = scores[top.last().unwrap()];
            let found = got
                .iter()
                .take(TOP_K)
                .filter(|(id, _)| ids.contains(id) || scores.get(id).is_some_and(|s| *s >= kth - 1e-12))
                .count();
            (found.min(top.len())) as f64 / top.len() as f64
        }
    }
}

struct Exact {
    /// Exact top `depth`, best first.
    vector: Vec<(Uuid, f64)>,
    /// Full-text top `depth` (hybrid only).
    text: Vec<Uuid>,
}

/// Exact answers are kept in the seeded database (`bench_ground_truth`, keyed
/// by filter, query and depth), so a BENCH_REUSE run skips the brute-force
/// scans: at 1M events they take ~10 minutes. Reseeding drops them with the
/// database.
async fn stored_ground_truth(conn: &mut PgConnection, key: &str) -> anyhow::Result<Option<Exact>> {
    let row: Option<(Vec<Uuid>, Vec<f64>, Vec<Uuid>)> =
        sqlx::query_as("SELECT vector_ids, vector_distances, text_ids FROM bench_ground_truth WHERE key = $1")
            .bind(key)
            .fetch_optional(conn)
            .await?;
    Ok(row.map(|(ids, distances, text)| Exact {
        vector: ids.into_iter().zip(distances).collect(),
        text,
    }))
}

async fn store_ground_truth(conn: &mut PgConnection, key: &str, exact: &Exact) -> anyhow::Result<()> {
    let (ids, distances): (Vec<Uuid>, Vec<f64>) = exact.vector.iter().copied().unzip();
    sqlx::query("INSERT INTO bench_ground_truth VALUES ($1, $2, $3, $4)")
        .bind(key)
        .bind(ids)
        .bind(distances)
        .bind(&exact.text)
        .execute(conn)
        .await?;
    Ok(())
}

async fn ground_truth(
    conn: &mut PgConnection,
    model: &ModelHandle,
    knobs: &Knobs,
    sc: &Scenario,
    q: &QueryCase,
    cache: &mut HashMap<(Filter, usize, bool), Exact>,
    index: usize,
) -> anyhow::Result<Truth> {
    let hybrid = sc.mode == Mode::Hybrid;
    let key = (sc.filter, index, hybrid);
    if let std::collections::hash_map::Entry::Vacant(slot) = cache.entry(key) {
        let depth = if hybrid { knobs.depth } else { TOP_K };
        let stored = format!(
            "{:?}|{}|{}|{}|{hybrid}|{depth}",
            sc.filter, q.text, q.namespace, q.alert
        );
        let exact = match stored_ground_truth(conn, &stored).await? {
            Some(exact) => exact,
            None => {
                let vector = ranked(
                    &nearest(model, &q.vector, sc.filter, q, Way::ExactScan, depth)
                        .fetch(conn)
                        .await?,
                );
                let text = if hybrid {
                    keys(&text_matches(&q.text, sc.filter, q, knobs.depth).fetch(conn).await?)
                        .into_iter()
                        .map(|k| k.0)
                        .collect()
                } else {
                    Vec::new()
                };
                let exact = Exact { vector, text };
                store_ground_truth(conn, &stored, &exact).await?;
                exact
            }
        };
        slot.insert(exact);
    }
    let e = &cache[&key];
    Ok(match sc.mode {
        Mode::Vector => {
            let mut top: Vec<(Uuid, f64)> = e.vector.iter().take(TOP_K).copied().collect();
            if let Some(min) = sc.min_similarity {
                top.retain(|h| (1.0 - h.1) as f32 >= min);
            }
            Truth::Vector(top)
        }
        Mode::Hybrid => {
            let mut scores: HashMap<Uuid, f64> = HashMap::new();
            for (rank, (id, _)) in e.vector.iter().enumerate() {
                *scores.entry(*id).or_default() += 1.0 / (knobs.rrf_k + rank as f64 + 1.0);
            }
            for (rank, id) in e.text.iter().enumerate() {
                *scores.entry(*id).or_default() += 1.0 / (knobs.rrf_k + rank as f64 + 1.0);
            }
            let distance: HashMap<Uuid, f64> = e.vector.iter().copied().collect();
            let mut ids: Vec<Uuid> = scores.keys().copied().collect();
            ids.sort_by(|a, b| {
                scores[b]
                    .total_cmp(&scores[a])
                    .then_with(|| {
                        distance
                            .get(a)
                            .unwrap_or(&f64::MAX)
                            .total_cmp(distance.get(b).unwrap_or(&f64::MAX))
                    })
                    .then_with(|| a.cmp(b))
            });
            ids.truncate(TOP_K);
            Truth::Hybrid { scores, top: ids }
        }
    })
}

// ---------------------------------------------------------------------------
// Plans
// ---------------------------------------------------------------------------

/// EXPLAIN (ANALYZE, BUFFERS) of `stmt` as a prepared statement that has
/// been executed as often as the plan cache needs to settle on a generic or
/// custom plan, so the plan shown is the one repeated calls get.
async fn explain(conn: &mut PgConnection, stmt: &Stmt) -> anyhow::Result<Vec<String>> {
    exec(conn, stmt.prepare("bench_plan")).await?;
    let execute = stmt.execute("bench_plan");
    for _ in 0..6 {
        sqlx::raw_sql(AssertSqlSafe(execute.clone()))
            .fetch_all(&mut *conn)
            .await?;
    }
    let rows = sqlx::raw_sql(AssertSqlSafe(format!("EXPLAIN (ANALYZE, BUFFERS) {execute}")))
        .fetch_all(&mut *conn)
        .await?;
    let plans: (i64, i64) =
        sqlx::query_as("SELECT generic_plans, custom_plans FROM pg_prepared_statements WHERE name = 'bench_plan'")
            .fetch_one(&mut *conn)
            .await?;
    exec(conn, "DEALLOCATE bench_plan").await?;
    let mut lines: Vec<String> = rows.iter().map(|r| without_vectors(&r.get::<String, _>(0))).collect();
    lines.push(format!(
        "(PREPARE + 6 EXECUTEs first; plan cache: {} generic / {} custom)",
        plans.0, plans.1
    ));
    Ok(lines)
}

/// A plan line with each vector literal ('[0.1,-0.2,...]') shortened to
/// '[…]': 384 numbers per Order By line would bury the plan.
fn without_vectors(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(start) = rest.find("'[") {
        let Some(len) = rest[start..].find("]'") else { break };
        out.push_str(&rest[..start]);
        out.push_str("'[…]'");
        rest = &rest[start + len + 2..];
    }
    out.push_str(rest);
    out
}

fn abbreviate(sql: &str) -> String {
    sql.replace(EVENT_COLUMNS, "<EVENT_COLUMNS>")
}

// ---------------------------------------------------------------------------
// main
// ---------------------------------------------------------------------------

struct Figures {
    service: Histogram<u64>,
    sql: Histogram<u64>,
    service_recall: f64,
    sql_recall: f64,
    same: usize,
    calls: usize,
    service_hits: usize,
    /// Plain-SQL calls whose index scan fell short and were compared exactly.
    fallbacks: usize,
    plans: Vec<(Stmt, Vec<String>, (i64, i64))>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let events: usize = env_or("BENCH_SEARCH_EVENTS", 100_000).max(EVENTS_PER_INCIDENT);
    let query_count: usize = env_or("BENCH_SEARCH_QUERIES", 100).max(1);
    let iterations: usize = env_or("BENCH_ITERATIONS", 200).max(1);
    let reuse = std::env::var("BENCH_REUSE").is_ok_and(|v| v == "1");
    let embedder = match std::env::var("BENCH_SEARCH_EMBEDDER").as_deref() {
        Ok("reference") => Embedder::Reference,
        Ok("local") | Err(_) => Embedder::Local,
        Ok(other) => anyhow::bail!("BENCH_SEARCH_EMBEDDER={other}: expected local or reference"),
    };
    let admin = std::env::var("DATASTORAGE_BENCH_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://datastorage:datastorage@127.0.0.1:55432/datastorage".into());
    let model_dir = std::env::var("DATASTORAGE_BENCH_MODEL_DIR")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/.cache/models/all-MiniLM-L6-v2").into());
    let url = format!("{}/{DATABASE}", admin.rsplit_once('/').unwrap().0);
    let incidents = incidents_for(events);

    println!(
        "datastorage similarity-search benchmark: {events} events ({incidents} incidents), {query_count} distinct \
         queries, {iterations} iterations per scenario"
    );
    let started = Instant::now();
    let model = Arc::new(LocalMiniLm::load(Path::new(&model_dir), MODEL_NAME)?);
    println!(
        "model {MODEL_NAME} loaded from {model_dir} in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // ---- the database: reuse or seed ----
    let mut reused = false;
    if reuse {
        if let Ok(mut conn) = PgConnection::connect(&url).await {
            let marker: Option<(i64, i32)> = sqlx::query_as("SELECT events, version FROM bench_seed")
                .fetch_optional(&mut conn)
                .await
                .ok()
                .flatten();
            match marker {
                Some((e, v)) if e == events as i64 && v == TEMPLATE_VERSION as i32 => {
                    match storage::MIGRATOR.run(&mut conn).await {
                        Ok(()) => reused = true,
                        Err(error) => {
                            println!("BENCH_REUSE: migrations do not apply to the seeded database ({error}); reseeding")
                        }
                    }
                }
                _ => println!("BENCH_REUSE: {DATABASE} holds another size or an older seed; reseeding"),
            }
        }
    }
    let mut conn;
    if reused {
        println!("reusing the seeded {DATABASE} (BENCH_REUSE=1)");
        conn = PgConnection::connect(&url).await?;
        let (embed, copy, index, vacuum): (f64, f64, f64, f64) =
            sqlx::query_as("SELECT embed_seconds, copy_seconds, index_seconds, vacuum_seconds FROM bench_seed")
                .fetch_one(&mut conn)
                .await?;
        println!(
            "(when seeded: embedding {embed:.1} s (0 = cached), COPY {copy:.1} s, HNSW index {index:.1} s, VACUUM \
             (ANALYZE) {vacuum:.1} s)"
        );
    } else {
        println!("seeding {DATABASE} (set BENCH_REUSE=1 to keep it for the next run):");
        let started = Instant::now();
        let texts = corpus_texts(events);
        let distinct = texts.iter().collect::<HashSet<_>>().len();
        println!(
            "  {} texts generated ({distinct} distinct) in {:.1} s",
            texts.len(),
            started.elapsed().as_secs_f64()
        );
        let m = model.clone();
        let t = texts.clone();
        let dir = model_dir.clone();
        let (vectors, embed_seconds, _) =
            tokio::task::spawn_blocking(move || corpus_vectors(&m, &dir, embedder, &t)).await??;
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
        // Whole seconds, a few hours back: every event is in the past.
        let end = Utc
            .timestamp_opt(Utc::now().timestamp() - 6 * 3600, 0)
            .single()
            .expect("valid time");
        let times = seed(&mut conn, events, &texts, &vectors, end).await?;
        drop(vectors);
        exec(
            &mut conn,
            "CREATE TABLE bench_seed (events bigint, version int, end_at timestamptz, embed_seconds float8, \
             copy_seconds float8, index_seconds float8, vacuum_seconds float8)",
        )
        .await?;
        sqlx::query("INSERT INTO bench_seed VALUES ($1, $2, $3, $4, $5, $6, $7)")
            .bind(events as i64)
            .bind(TEMPLATE_VERSION as i32)
            .bind(end)
            .bind(embed_seconds)
            .bind(times.copy)
            .bind(times.index)
            .bind(times.vacuum)
            .execute(&mut conn)
            .await?;
        println!("seeding took {:.1} s in all", started.elapsed().as_secs_f64());
    }
    let (parts, emb_bytes, hnsw_bytes): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM pg_inherits WHERE inhparent = 'audit_embeddings'::regclass), \
         (SELECT sum(pg_table_size(inhrelid))::bigint FROM pg_inherits WHERE inhparent = 'audit_embeddings'::regclass), \
         (SELECT coalesce(sum(pg_relation_size(i.indexrelid)), 0)::bigint FROM pg_index i \
            JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am am ON am.oid = c.relam WHERE am.amname = 'hnsw')",
    )
    .fetch_one(&mut conn)
    .await?;
    println!(
        "audit_embeddings: {parts} monthly partitions, {} MiB; HNSW indexes (one per partition): {} MiB",
        emb_bytes >> 20,
        hnsw_bytes >> 20
    );

    // ---- the server ----
    let mut settings = common::server_settings(&url, &model_dir);
    settings.embedding.model_name = MODEL_NAME.to_owned();
    settings.log.format = LogFormat::Pretty;
    // The HNSW knobs, for trying other values; the service's defaults otherwise.
    settings.search.ef_search = env_or("BENCH_SEARCH_EF_SEARCH", settings.search.ef_search);
    settings.search.exact_scan_threshold = env_or(
        "BENCH_SEARCH_EXACT_SCAN_THRESHOLD",
        settings.search.exact_scan_threshold,
    );
    settings.search.iterative_scan = match std::env::var("BENCH_SEARCH_ITERATIVE_SCAN").as_deref() {
        Ok("off") => IterativeScan::Off,
        Ok("strict_order") => IterativeScan::StrictOrder,
        Ok("relaxed_order") => IterativeScan::RelaxedOrder,
        Ok(other) => {
            anyhow::bail!("BENCH_SEARCH_ITERATIVE_SCAN must be off, strict_order or relaxed_order, not {other:?}")
        }
        Err(_) => settings.search.iterative_scan,
    };
    settings.validate()?;
    let provider: Arc<dyn EmbeddingProvider> = model.clone();
    let app = Application::build_with_provider(settings.clone(), provider).await?;
    let port = app.port();
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));
    let channel = Channel::from_shared(format!("http://127.0.0.1:{port}"))?
        .connect()
        .await?;
    let mut client = VectorSearchClient::new(channel);

    let (model_id, dims): (i16, i32) =
        sqlx::query_as("SELECT id, dimensions FROM embedding_models WHERE name = $1 AND active")
            .bind(MODEL_NAME)
            .fetch_one(&mut conn)
            .await?;
    let handle = ModelHandle {
        id: model_id,
        name: MODEL_NAME.to_owned(),
        dimensions: dims as usize,
    };
    let knobs = Knobs {
        threshold: settings.search.exact_scan_threshold as usize,
        depth: (settings.search.hybrid_candidates as usize).max(TOP_K),
        rrf_k: f64::from(settings.search.rrf_k),
    };

    // ---- the plain-SQL side: one dedicated connection from storage::pool ----
    let mut one = settings.database.clone();
    one.max_connections = 1;
    let plain_pool = storage::pool(&one, &settings.search)?;
    let mut plain = plain_pool.acquire().await?.detach();
    let show = "SELECT current_setting('hnsw.ef_search'), current_setting('hnsw.iterative_scan'), \
                current_setting('hnsw.max_scan_tuples'), current_setting('jit')";
    // The hnsw.* options become real settings once pgvector is loaded.
    exec(&mut plain, "SELECT '[1]'::vector").await?;
    let plain_settings: (String, String, String, String) = sqlx::query_as(show).fetch_one(&mut plain).await?;
    let service_pool = storage::pool(&settings.database, &settings.search)?;
    let mut probe = service_pool.acquire().await?;
    exec(&mut probe, "SELECT '[1]'::vector").await?;
    let service_settings: (String, String, String, String) = sqlx::query_as(show).fetch_one(&mut *probe).await?;
    drop(probe);
    service_pool.close().await;
    anyhow::ensure!(
        plain_settings == service_settings,
        "the plain connection's settings {plain_settings:?} differ from the service pool's {service_settings:?}"
    );

    // ---- queries ----
    let texts = query_texts(query_count);
    let alerts_present = incidents.div_ceil(TEAMS.len()).min(200);
    let mut queries = Vec::with_capacity(texts.len());
    let started = Instant::now();
    for (i, text) in texts.into_iter().enumerate() {
        // One text per model call, as the service embeds a lone query.
        let m = model.clone();
        let t = text.clone();
        let vector = tokio::task::spawn_blocking(move || m.embed_blocking(&[t]))
            .await??
            .remove(0);
        queries.push(QueryCase {
            text,
            vector: Arc::new(vector),
            namespace: TEAMS[i % TEAMS.len()].to_owned(),
            alert: alert_name((i * 37) % alerts_present),
        });
    }
    println!(
        "{} query texts embedded in {:.1} s, e.g. {:?}, {:?}",
        queries.len(),
        started.elapsed().as_secs_f64(),
        queries[0].text,
        queries[queries.len() - 1].text
    );

    // ---- the copies above are the service's statements, verbatim ----
    {
        let capture = Storage::new(storage::pool(&one, &settings.search)?);
        let q = &queries[0];
        let mut mine: Vec<Stmt> = Vec::new();
        for filter in [Filter::None, Filter::Namespace, Filter::Alert] {
            let f = q.filter(filter);
            let scope = SearchScope {
                filter: &f,
                kinds: &[],
                exclude: None,
            };
            if filter.is_some() {
                capture.incident_events_upper_bound(&f, knobs.threshold + 1).await?;
                mine.push(incident_events_upper_bound(filter, q, knobs.threshold + 1));
                capture.events_in_scope(&handle, &scope, knobs.threshold + 1).await?;
                mine.push(events_in_scope(&handle, filter, q, knobs.threshold + 1));
            }
            capture
                .nearest(&handle, &q.vector, &scope, Strategy::Index, TOP_K)
                .await?;
            mine.push(nearest(&handle, &q.vector, filter, q, Way::Index, TOP_K));
            capture
                .nearest(&handle, &q.vector, &scope, Strategy::ExactScan, TOP_K)
                .await?;
            mine.push(nearest(&handle, &q.vector, filter, q, Way::ExactScan, TOP_K));
            capture.text_matches(&q.text, &scope, knobs.depth).await?;
            mine.push(text_matches(&q.text, filter, q, knobs.depth));
        }
        let some: Vec<EventKey> = keys(&events_in_scope(&handle, Filter::Alert, q, 5).fetch(&mut conn).await?);
        let f = q.filter(Filter::Alert);
        let scope = SearchScope {
            filter: &f,
            kinds: &[],
            exclude: None,
        };
        capture
            .nearest(&handle, &q.vector, &scope, Strategy::Candidates(&some), TOP_K)
            .await?;
        mine.push(nearest(
            &handle,
            &q.vector,
            Filter::Alert,
            q,
            Way::Candidates(&some),
            TOP_K,
        ));
        let mut c = capture.pool().acquire().await?;
        let prepared: Vec<(String, String)> = sqlx::raw_sql(
            "SELECT statement, array_to_string(parameter_types, ',') FROM pg_prepared_statements WHERE NOT from_sql",
        )
        .fetch_all(&mut *c)
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
        for stmt in &mine {
            let types = stmt.types();
            if !prepared.iter().any(|(text, t)| *text == stmt.text && *t == types) {
                let mut message = format!(
                    "the bench's SQL is not what the service prepares; update benches/search.rs from \
                     src/storage/search.rs.\nbench ({types}):\n  {}\nthe service prepared:\n",
                    stmt.text
                );
                for (text, t) in &prepared {
                    writeln!(message, "  ({t}) {text}").unwrap();
                }
                anyhow::bail!(message);
            }
        }
        drop(c);
        capture.pool().close().await;
        println!(
            "checked: the bench's {} statements are the texts the service prepares (pg_prepared_statements), with \
             the same parameter types",
            mine.len()
        );
    }

    // ---- how selective the filters are ----
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_embeddings")
        .fetch_one(&mut conn)
        .await?;
    let by_ns: Vec<(String, i64)> = sqlx::query_as(
        "SELECT i.namespace, count(*) FROM audit_events e JOIN incidents i ON i.id = e.incident_id GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(&mut conn)
    .await?;
    let used_alerts: Vec<String> = queries
        .iter()
        .map(|q| q.alert.clone())
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let by_alert: Vec<(String, i64)> = sqlx::query_as(
        "SELECT i.alert_name, count(*) FROM audit_events e JOIN incidents i ON i.id = e.incident_id \
         WHERE i.alert_name = ANY($1) GROUP BY 1",
    )
    .bind(&used_alerts)
    .fetch_all(&mut conn)
    .await?;
    let span = |v: &[(String, i64)]| {
        let min = v.iter().map(|x| x.1).min().unwrap_or(0);
        let max = v.iter().map(|x| x.1).max().unwrap_or(0);
        (min, max)
    };
    let (ns_min, ns_max) = span(&by_ns);
    let (al_min, al_max) = span(&by_alert);
    let pct = |n: i64| 100.0 * n as f64 / total as f64;
    println!(
        "filters: {total} embedded events; namespace: {} namespaces, {ns_min}..{ns_max} events each \
         ({:.2}%..{:.2}%); alert_name: {} alert names used by the queries, {al_min}..{al_max} events each \
         ({:.2}%..{:.2}%)",
        by_ns.len(),
        pct(ns_min),
        pct(ns_max),
        by_alert.len(),
        pct(al_min),
        pct(al_max)
    );
    println!(
        "  so the service's bounded count (exact_scan_threshold {}) sends namespace-filtered searches to the HNSW \
         index ({}) and alert_name-filtered ones to the exact comparison ({})",
        knobs.threshold,
        if ns_min as usize > knobs.threshold {
            "every namespace"
        } else {
            "NOT every namespace"
        },
        if al_max as usize <= knobs.threshold {
            "every alert"
        } else {
            "NOT every alert"
        },
    );

    let scenarios = [
        Scenario {
            name: "vector, unfiltered",
            mode: Mode::Vector,
            filter: Filter::None,
            min_similarity: None,
        },
        Scenario {
            name: "vector, unfiltered, min_similarity 0.99",
            mode: Mode::Vector,
            filter: Filter::None,
            min_similarity: Some(UNREACHABLE_SIMILARITY),
        },
        Scenario {
            name: "vector, namespace (~10%)",
            mode: Mode::Vector,
            filter: Filter::Namespace,
            min_similarity: None,
        },
        Scenario {
            name: "vector, alert_name (~0.5%)",
            mode: Mode::Vector,
            filter: Filter::Alert,
            min_similarity: None,
        },
        Scenario {
            name: "hybrid, unfiltered",
            mode: Mode::Hybrid,
            filter: Filter::None,
            min_similarity: None,
        },
        Scenario {
            name: "hybrid, namespace (~10%)",
            mode: Mode::Hybrid,
            filter: Filter::Namespace,
            min_similarity: None,
        },
    ];

    // ---- ground truth ----
    let started = Instant::now();
    let mut gt_conn = PgConnection::connect(&url).await?;
    exec(&mut gt_conn, "SET jit = off").await?;
    // The exact statement must not reach the HNSW index.
    {
        let stmt = nearest(
            &handle,
            &queries[0].vector,
            Filter::None,
            &queries[0],
            Way::ExactScan,
            TOP_K,
        );
        exec(&mut gt_conn, stmt.prepare("gt")).await?;
        let plan: Vec<String> = sqlx::raw_sql(AssertSqlSafe(format!("EXPLAIN {}", stmt.execute("gt"))))
            .fetch_all(&mut gt_conn)
            .await?
            .iter()
            .map(|r| r.get::<String, _>(0))
            .collect();
        exec(&mut gt_conn, "DEALLOCATE gt").await?;
        anyhow::ensure!(
            !plan.iter().any(|l| l.contains("hnsw")),
            "the exact statement uses an HNSW index:\n{}",
            plan.join("\n")
        );
    }
    exec(
        &mut gt_conn,
        "CREATE TABLE IF NOT EXISTS bench_ground_truth (key text PRIMARY KEY, vector_ids uuid[] NOT NULL, \
         vector_distances float8[] NOT NULL, text_ids uuid[] NOT NULL)",
    )
    .await?;
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM bench_ground_truth")
        .fetch_one(&mut gt_conn)
        .await?;
    let mut exact_cache = HashMap::new();
    let mut truths: Vec<Vec<Truth>> = Vec::new();
    for sc in &scenarios {
        let mut per_query = Vec::new();
        for (i, q) in queries.iter().enumerate() {
            per_query.push(ground_truth(&mut gt_conn, &handle, &knobs, sc, q, &mut exact_cache, i).await?);
        }
        eprintln!(
            "  ground truth of {} ({} queries): {:.1} s so far",
            sc.name,
            queries.len(),
            started.elapsed().as_secs_f64()
        );
        truths.push(per_query);
    }
    let above: usize = exact_cache
        .iter()
        .filter(|((f, _, _), e)| {
            *f == Filter::None
                && e.vector
                    .first()
                    .is_some_and(|x| (1.0 - x.1) as f32 >= UNREACHABLE_SIMILARITY)
        })
        .count();
    let best: Vec<f64> = exact_cache
        .iter()
        .filter(|((f, _, h), _)| *f == Filter::None && !*h)
        .filter_map(|(_, e)| e.vector.first().map(|x| 1.0 - x.1))
        .collect();
    let text_hits: Vec<usize> = exact_cache
        .iter()
        .filter(|((f, _, h), _)| *f == Filter::None && *h)
        .map(|(_, e)| e.text.len())
        .collect();
    let text_ns: Vec<usize> = exact_cache
        .iter()
        .filter(|((f, _, h), _)| *f == Filter::Namespace && *h)
        .map(|(_, e)| e.text.len())
        .collect();
    let mean = |v: &[usize]| v.iter().sum::<usize>() as f64 / v.len().max(1) as f64;
    println!(
        "ground truth (exact, brute force in SQL) in {:.1} s ({}); best similarity per query {:.3}..{:.3}, queries \
         with an event at >= {UNREACHABLE_SIMILARITY}: {above}; full-text matches (of at most {}) per hybrid query: \
         {:.1} on average unfiltered ({} queries with none), {:.1} namespace-filtered",
        started.elapsed().as_secs_f64(),
        if stored > 0 {
            format!("{stored} answers kept from an earlier run on this seed")
        } else {
            "computed now, kept for BENCH_REUSE runs".to_owned()
        },
        best.iter().copied().fold(f64::MAX, f64::min),
        best.iter().copied().fold(f64::MIN, f64::max),
        knobs.depth,
        mean(&text_hits),
        text_hits.iter().filter(|n| **n == 0).count(),
        mean(&text_ns),
    );
    gt_conn.close().await?;

    // ---- warm the service's embedding cache with the hybrid query texts ----
    for q in &queries {
        let sc = &scenarios[4];
        call_service(&mut client, request(sc, q)).await?;
    }

    // ---- measure ----
    println!(
        "\nservice: SearchSimilar over TCP (tonic client, one request at a time, top_k {TOP_K}), latency seen by the \
         client; vector scenarios send the query as a vector (no embedding in the figures); hybrid sends the text, \
         whose embedding was cached by a call per query text before the run (so hybrid measures search, not the \
         model).\n\
         plain SQL: the same statements with the same parameters, in the same order, with the service's decisions \
         (bounded count against exact_scan_threshold, exact vs index path, re-sort, RRF fusion, the fetch of \
         text-only hits) done in the bench, on one dedicated sqlx connection from storage::pool() (same startup \
         options, sqlx's prepared-statement cache as the service's), timed around the round trips and the fusion.\n\
         Calls alternate between the two sides; {} untimed warm-up calls each first. recall@10: share of the exact \
         top 10 found (a hit tied with the 10th counts), averaged over the calls.",
        iterations.clamp(1, 10)
    );
    let mut results: Vec<(&Scenario, Figures)> = Vec::new();
    for (s, sc) in scenarios.iter().enumerate() {
        eprint!("  measuring {} ...", sc.name);
        let started = Instant::now();
        for i in 0..iterations.clamp(1, 10) {
            let q = &queries[i % queries.len()];
            call_service(&mut client, request(sc, q)).await?;
            plain_search(&mut plain, &handle, &knobs, sc, q, &mut 0, None).await?;
        }
        let mut f = Figures {
            service: histogram(),
            sql: histogram(),
            service_recall: 0.0,
            sql_recall: 0.0,
            same: 0,
            calls: 0,
            service_hits: 0,
            fallbacks: 0,
            plans: Vec::new(),
        };
        for i in 0..iterations {
            let qi = i % queries.len();
            let q = &queries[qi];
            let req = request(sc, q);
            let (service, sql) = if i % 2 == 0 {
                let service = call_service(&mut client, req).await?;
                let t = Instant::now();
                let hits = plain_search(&mut plain, &handle, &knobs, sc, q, &mut f.fallbacks, None).await?;
                (service, (micros(t.elapsed()), hits))
            } else {
                let t = Instant::now();
                let hits = plain_search(&mut plain, &handle, &knobs, sc, q, &mut f.fallbacks, None).await?;
                let sql = (micros(t.elapsed()), hits);
                (call_service(&mut client, req).await?, sql)
            };
            f.service.record(service.0)?;
            f.sql.record(sql.0)?;
            let truth = &truths[s][qi];
            f.service_recall += recall(truth, &service.1);
            f.sql_recall += recall(truth, &sql.1);
            f.calls += 1;
            f.service_hits += service.1.len();
            if service.1.iter().map(|x| x.0).eq(sql.1.iter().map(|x| x.0)) {
                f.same += 1;
            }
        }
        f.service_recall /= f.calls as f64;
        f.sql_recall /= f.calls as f64;
        // The statements of the first query, and how the measured (sqlx)
        // statements were planned.
        let mut trace = Trace::default();
        plain_search(&mut plain, &handle, &knobs, sc, &queries[0], &mut 0, Some(&mut trace)).await?;
        for stmt in trace.stmts {
            let counts: (i64, i64) =
                sqlx::query_as("SELECT generic_plans, custom_plans FROM pg_prepared_statements WHERE statement = $1")
                    .bind(&stmt.text)
                    .fetch_optional(&mut plain)
                    .await?
                    .unwrap_or((0, 0));
            let plan = explain(&mut plain, &stmt).await?;
            f.plans.push((stmt, plan, counts));
        }
        eprintln!(" {:.1} s", started.elapsed().as_secs_f64());
        results.push((sc, f));
    }

    // ---- report ----
    println!(
        "\n| scenario | service p50 ms | service p99 ms | plain SQL p50 ms | plain SQL p99 ms | ratio (p50) | recall@10 \
         service | recall@10 plain SQL |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for (sc, f) in &results {
        println!(
            "| {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2}x | {:.3} | {:.3} |",
            sc.name,
            ms(&f.service, 0.5),
            ms(&f.service, 0.99),
            ms(&f.sql, 0.5),
            ms(&f.sql, 0.99),
            ms(&f.service, 0.5) / ms(&f.sql, 0.5),
            f.service_recall,
            f.sql_recall
        );
    }
    println!(
        "\nsettings (service pool = plain connection): hnsw.ef_search {}, hnsw.iterative_scan {}, \
         hnsw.max_scan_tuples {}, jit {}; search.exact_scan_threshold {}, search.rrf_k {}, search.hybrid_candidates {}",
        service_settings.0,
        service_settings.1,
        service_settings.2,
        service_settings.3,
        settings.search.exact_scan_threshold,
        settings.search.rrf_k,
        settings.search.hybrid_candidates
    );
    for (sc, f) in &results {
        println!(
            "  {}: service and plain SQL returned the same hits in {}/{} calls; service hits per call {:.1}; \
             index scan fell short and the events were compared exactly (vector_ranking's fallback) in {} of the \
             plain calls",
            sc.name,
            f.same,
            f.calls,
            f.service_hits as f64 / f.calls as f64,
            f.fallbacks
        );
    }
    let unfiltered = results
        .iter()
        .find(|(sc, _)| sc.name == "vector, unfiltered")
        .map(|x| &x.1);
    let bounded = results.iter().find(|(sc, _)| sc.min_similarity.is_some()).map(|x| &x.1);
    if let (Some(a), Some(b)) = (unfiltered, bounded) {
        println!(
            "\nbounded work: unfiltered p50/p99 {:.2}/{:.2} ms without a threshold, {:.2}/{:.2} ms with \
             min_similarity {UNREACHABLE_SIMILARITY} (which no event meets) — {:.2}x at p50, {:.2}x at p99",
            ms(&a.service, 0.5),
            ms(&a.service, 0.99),
            ms(&b.service, 0.5),
            ms(&b.service, 0.99),
            ms(&b.service, 0.5) / ms(&a.service, 0.5),
            ms(&b.service, 0.99) / ms(&a.service, 0.99),
        );
    }
    let low: Vec<&str> = results
        .iter()
        .filter(|(_, f)| f.service_recall < GOAL_RECALL)
        .map(|(sc, _)| sc.name)
        .collect();
    let heavy: Vec<&str> = results
        .iter()
        .filter(|(_, f)| ms(&f.service, 0.5) / ms(&f.sql, 0.5) > GOAL_RATIO)
        .map(|(sc, _)| sc.name)
        .collect();
    let goal = |v: &[&str]| {
        if v.is_empty() {
            "met by every scenario".to_owned()
        } else {
            format!("missed by {}", v.join(", "))
        }
    };
    println!("goal: recall@10 >= {GOAL_RECALL}: {}", goal(&low));
    if let Some(a) = unfiltered {
        let goal_p99 = if events >= 1_000_000 {
            GOAL_P99_MS_AT_1M
        } else {
            GOAL_P99_MS
        };
        println!(
            "goal: p99 <= {goal_p99} ms unfiltered: {} ({:.2} ms)",
            if ms(&a.service, 0.99) <= goal_p99 {
                "met"
            } else {
                "missed"
            },
            ms(&a.service, 0.99)
        );
    }
    println!(
        "goal: service overhead <= {GOAL_RATIO}x plain SQL (p50): {}",
        goal(&heavy)
    );

    let hnsw: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_class c JOIN pg_am am ON am.oid = c.relam WHERE am.amname = 'hnsw'",
    )
    .fetch_all(&mut conn)
    .await?;
    println!(
        "\nPlans (EXPLAIN (ANALYZE, BUFFERS) of each plain statement of a scenario, first query's parameters, after \
         the timed runs; <EVENT_COLUMNS> abbreviates the event columns):"
    );
    for (sc, f) in &results {
        println!("\n### {}", sc.name);
        for (stmt, plan, counts) in &f.plans {
            let uses_hnsw = plan.iter().any(|l| hnsw.iter().any(|name| l.contains(name.as_str())));
            let vector_stmt = stmt.text.contains("<=>");
            println!(
                "\n{}\n  -- ({}) measured statement's plan cache: {} generic / {} custom{}",
                abbreviate(&stmt.text),
                stmt.types(),
                counts.0,
                counts.1,
                if vector_stmt {
                    if uses_hnsw {
                        "; uses the HNSW index"
                    } else {
                        "; no HNSW index in the plan"
                    }
                } else {
                    ""
                }
            );
            for line in plan {
                println!("    {line}");
            }
        }
    }
    plain.close().await?;
    conn.close().await?;
    Ok(())
}
