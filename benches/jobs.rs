//! `make bench`: what the embedding cache saves on writes, and how fast the
//! embedding jobs go next to the model itself, measured side by side in one run.
//!
//! (a) BENCH_JOBS_WRITES (1000) WriteAudit calls from one client; each text
//!     repeats an earlier one with BENCH_JOBS_REPEAT_PERCENT (30) % chance and
//!     is otherwise new (filled-in templates). The same sequence of texts runs
//!     against four fresh servers: no cache (in-process capacity 0, no Redis),
//!     the in-process (L1) cache only, L1 + the Redis (L2) cache, and a second
//!     replica (empty L1) on that same Redis, whose first sight of each text
//!     can only be served from L2. Hits come from the write receipts'
//!     embedding_state (CACHED vs GENERATED).
//! (b) BENCH_JOBS_EVENTS (500) events written while the provider is down (all
//!     deferred), then a backfill_embeddings job and a reembed job (to a second
//!     copy of the local model), each timed from StartJob to its last update,
//!     against the local model called directly on the same texts in batches of
//!     jobs.batch_size (BENCH_JOBS_BATCH, 256).
//!
//! Uses the `ds_bench_jobs` database, recreated for each part, and Redis at
//! DATASTORAGE_BENCH_REDIS_URL under a key prefix of this run's own (its
//! entries expire by themselves); without Redis the L2 rows are skipped.
//! Timings are reported, never asserted.
use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use async_trait::async_trait;
use datastorage::{
    config::{ExtraModelSettings, Settings},
    embedding::{local::LocalMiniLm, EmbeddingError, EmbeddingProvider},
    proto::v1::{self as pb, audit_write_client::AuditWriteClient, job_status_client::JobStatusClient},
    startup::Application,
};
use fred::prelude::{Client, ClientLike, Config};
use secrecy::SecretString;
use sqlx::{Connection, Executor, PgConnection};
use tokio::sync::oneshot;
use tonic::transport::Channel;

mod common;
use common::{alert_name, env_or, histogram, micros, ms, remediation_event as event, Rng, TEAMS};

const DATABASE: &str = "ds_bench_jobs";
const MODEL_NAME: &str = "all-MiniLM-L6-v2";
const SECOND_MODEL: &str = "minilm-copy";

/// The local model with an off switch, standing for an unreachable provider.
struct Switchable {
    model: Arc<LocalMiniLm>,
    up: AtomicBool,
}

#[async_trait]
impl EmbeddingProvider for Switchable {
    fn model_name(&self) -> &str {
        self.model.model_name()
    }

    fn dimensions(&self) -> usize {
        self.model.dimensions()
    }

    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbeddingError> {
        if self.up.load(Ordering::SeqCst) {
            self.model.embed(texts).await
        } else {
            Err(EmbeddingError::Unavailable("switched off by the benchmark".into()))
        }
    }
}

/// A server started in-process; dropping it stops the server.
struct Server {
    channel: Channel,
    _stop: oneshot::Sender<()>,
}

async fn serve(settings: Settings, provider: Arc<dyn EmbeddingProvider>) -> anyhow::Result<Server> {
    let app = Application::build_with_provider(settings, provider).await?;
    let port = app.port();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));
    let channel = Channel::from_shared(format!("http://127.0.0.1:{port}"))?
        .connect()
        .await?;
    Ok(Server { channel, _stop: stop })
}

/// Drops and recreates the benchmark database; returns its URL.
async fn recreate_database(admin: &str) -> anyhow::Result<String> {
    let mut conn = PgConnection::connect(admin).await?;
    conn.execute(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)"
    )))
    .await?;
    conn.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {DATABASE}")))
        .await?;
    Ok(format!("{}/{DATABASE}", admin.rsplit_once('/').unwrap().0))
}

fn base_settings(url: &str, model_dir: &str) -> Settings {
    let mut settings = common::server_settings(url, model_dir);
    // Jobs run when the benchmark starts them, never by themselves.
    settings.jobs.supervisor_interval_ms = 3_600_000;
    settings
}

/// Whether Redis answers at `url` within two seconds.
async fn redis_answers(url: &str) -> bool {
    let Ok(config) = Config::from_url(url) else {
        return false;
    };
    let client = Client::new(config, None, None, None);
    let answered = matches!(
        tokio::time::timeout(Duration::from_secs(2), client.init()).await,
        Ok(Ok(_))
    );
    let _ = client.quit().await;
    answered
}

const TEMPLATES: [&str; 6] = [
    "container {svc} OOMKilled: memory limit {n}Mi exceeded after release {v}",
    "pod {svc}-{n} crash-looping after deploy {v}",
    "p99 latency of {svc} above {n} ms for 5 minutes since {v}",
    "disk pressure on node worker-{n} running {svc}, build {v}",
    "{svc} error rate {n}% after rollout {v}",
    "readiness probe of {svc} failing on port {n}, image {v}",
];

/// A new text: a template filled in, made unique by `serial`.
fn fresh_text(rng: &mut Rng, serial: usize) -> String {
    let service = format!(
        "{}-{}",
        rng.pick(&TEAMS),
        alert_name(rng.below(200) as usize).to_lowercase()
    );
    rng.pick(&TEMPLATES)
        .replace("{svc}", &service)
        .replace("{n}", &rng.range(1, 999).to_string())
        .replace("{v}", &format!("v1.{serial}"))
}

/// `count` texts, each repeating an earlier one with `repeat_percent` % chance.
fn write_workload(count: usize, repeat_percent: u64) -> Vec<String> {
    let mut rng = Rng::new(7);
    let mut texts: Vec<String> = Vec::with_capacity(count);
    for serial in 0..count {
        let text = if !texts.is_empty() && rng.chance(repeat_percent) {
            rng.pick(&texts).clone()
        } else {
            fresh_text(&mut rng, serial)
        };
        texts.push(text);
    }
    texts
}

fn write_request(rr: String, message: String) -> pb::WriteAuditRequest {
    pb::WriteAuditRequest {
        event: Some(event(rr, message)),
        ..Default::default()
    }
}

/// One configuration's run of the write workload.
struct CacheFigures {
    name: &'static str,
    hits_on_repeats: (usize, usize),
    hits_on_first_sight: (usize, usize),
    latency: hdrhistogram::Histogram<u64>,
}

/// `hits / of` as a percentage, or "-" when there was nothing to count.
fn percent((hits, of): (usize, usize)) -> String {
    if of == 0 {
        "-".into()
    } else {
        format!("{:.1}%", 100.0 * hits as f64 / of as f64)
    }
}

/// Writes `texts` in order, one call at a time.
async fn run_writes(name: &'static str, server: &Server, texts: &[String]) -> anyhow::Result<CacheFigures> {
    let mut client = AuditWriteClient::new(server.channel.clone());
    let mut seen = std::collections::HashSet::new();
    let mut figures = CacheFigures {
        name,
        hits_on_repeats: (0, 0),
        hits_on_first_sight: (0, 0),
        latency: histogram(),
    };
    for (serial, text) in texts.iter().enumerate() {
        let request = write_request(format!("cache-{serial}"), text.clone());
        let started = Instant::now();
        let reply = client.write_audit(request).await?.into_inner();
        figures.latency.record(micros(started.elapsed()))?;
        let hit = match reply.embedding_state() {
            pb::EmbeddingState::Cached => 1,
            pb::EmbeddingState::Generated => 0,
            other => anyhow::bail!("write {serial}: unexpected embedding state {other:?}"),
        };
        let counts = if seen.insert(text.as_str()) {
            &mut figures.hits_on_first_sight
        } else {
            &mut figures.hits_on_repeats
        };
        counts.0 += hit;
        counts.1 += 1;
    }
    Ok(figures)
}

/// Part (a): returns one row per configuration.
async fn cache_part(
    admin: &str,
    model_dir: &str,
    model: &Arc<LocalMiniLm>,
    redis_url: Option<&str>,
    texts: &[String],
) -> anyhow::Result<Vec<CacheFigures>> {
    let url = recreate_database(admin).await?;
    let settings = base_settings(&url, model_dir);
    let provider: Arc<dyn EmbeddingProvider> = model.clone();
    let mut rows = Vec::new();

    let mut no_cache = settings.clone();
    no_cache.embedding.cache_capacity = 0;
    let server = serve(no_cache, provider.clone()).await?;
    rows.push(run_writes("no cache (L1 capacity 0, no Redis)", &server, texts).await?);
    drop(server);

    let server = serve(settings.clone(), provider.clone()).await?;
    rows.push(run_writes("L1 only", &server, texts).await?);
    drop(server);

    let Some(redis_url) = redis_url else {
        return Ok(rows);
    };
    let mut with_redis = settings.clone();
    with_redis.redis.url = Some(SecretString::from(redis_url.to_owned()));
    with_redis.redis.key_prefix = format!("ds-bench-jobs-{}", uuid::Uuid::new_v4().simple());
    with_redis.redis.embedding_cache_ttl_secs = 600;
    let first = serve(with_redis.clone(), provider.clone()).await?;
    rows.push(run_writes("L1 + Redis L2", &first, texts).await?);
    // The first replica's writes to L2 run in the background: let them land.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let second = serve(with_redis, provider).await?;
    rows.push(run_writes("L1 + Redis L2, second replica (empty L1)", &second, texts).await?);
    Ok(rows)
}

/// Starts a job and follows it to its last update; returns it and how long it took.
async fn run_job(
    jobs: &mut JobStatusClient<Channel>,
    spec: pb::start_job_request::Spec,
) -> anyhow::Result<(pb::Job, Duration)> {
    let started = Instant::now();
    let job = jobs
        .start_job(pb::StartJobRequest {
            spec: Some(spec),
            request_id: String::new(),
        })
        .await?
        .into_inner();
    let mut updates = jobs
        .watch_job(pb::WatchJobRequest { id: job.id.clone() })
        .await?
        .into_inner();
    let mut last = job;
    while let Some(update) = updates.message().await? {
        last = update;
    }
    let elapsed = started.elapsed();
    anyhow::ensure!(
        last.state() == pb::JobState::Succeeded,
        "the {} job ended {:?}: {:?}",
        last.r#type,
        last.state(),
        last.error
    );
    Ok((last, elapsed))
}

/// One line of part (b).
struct Throughput {
    name: String,
    events: usize,
    elapsed: Duration,
}

impl Throughput {
    fn rate(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64()
    }
}

/// The model called directly on `texts`, `batch` at a time, as the provider
/// trait does it (on the blocking pool).
async fn raw_model(model: &LocalMiniLm, texts: &[String], batch: usize) -> anyhow::Result<Throughput> {
    let started = Instant::now();
    for chunk in texts.chunks(batch) {
        model.embed(chunk).await?;
    }
    Ok(Throughput {
        name: format!("model called directly, batches of {batch}"),
        events: texts.len(),
        elapsed: started.elapsed(),
    })
}

/// Part (b).
async fn jobs_part(
    admin: &str,
    model_dir: &str,
    model: &Arc<LocalMiniLm>,
    events: usize,
    batch: u32,
) -> anyhow::Result<Vec<Throughput>> {
    let url = recreate_database(admin).await?;
    let mut settings = base_settings(&url, model_dir);
    settings.jobs.batch_size = batch;
    settings.embedding.extra_models = vec![ExtraModelSettings {
        name: SECOND_MODEL.into(),
        model_dir: model_dir.into(),
    }];
    let provider = Arc::new(Switchable {
        model: model.clone(),
        up: AtomicBool::new(false),
    });
    let server = serve(settings, provider.clone()).await?;

    let mut writer = AuditWriteClient::new(server.channel.clone());
    let mut rng = Rng::new(11);
    for serial in 0..events {
        let reply = writer
            .write_audit(write_request(
                format!("job-{}", serial / 4),
                fresh_text(&mut rng, serial),
            ))
            .await?
            .into_inner();
        anyhow::ensure!(
            reply.embedding_state() == pb::EmbeddingState::Deferred,
            "write {serial} was not deferred: {:?}",
            reply.embedding_state()
        );
    }
    provider.up.store(true, Ordering::SeqCst);

    // The very texts the jobs embed.
    let pool = sqlx::PgPool::connect(&url).await?;
    let texts: Vec<String> = sqlx::query_scalar("SELECT search_text FROM audit_events WHERE search_text IS NOT NULL")
        .fetch_all(&pool)
        .await?;
    pool.close().await;
    anyhow::ensure!(texts.len() == events, "{} texts for {events} events", texts.len());

    let mut rows = vec![raw_model(model, &texts, batch as usize).await?];
    let mut jobs = JobStatusClient::new(server.channel.clone());
    let backfill = pb::start_job_request::Spec::BackfillEmbeddings(pb::BackfillEmbeddingsJob {});
    let (job, elapsed) = run_job(&mut jobs, backfill).await?;
    rows.push(Throughput {
        name: "backfill_embeddings job".into(),
        events: job.done as usize,
        elapsed,
    });
    let reembed = pb::start_job_request::Spec::Reembed(pb::ReembedJob {
        model: SECOND_MODEL.into(),
    });
    let (job, elapsed) = run_job(&mut jobs, reembed).await?;
    rows.push(Throughput {
        name: format!("reembed job (to {SECOND_MODEL})"),
        events: job.done as usize,
        elapsed,
    });
    Ok(rows)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let writes: usize = env_or("BENCH_JOBS_WRITES", 1000).max(1);
    let repeat_percent: u64 = env_or("BENCH_JOBS_REPEAT_PERCENT", 30).min(100);
    let events: usize = env_or("BENCH_JOBS_EVENTS", 500).max(1);
    let batch: u32 = env_or("BENCH_JOBS_BATCH", Settings::default().jobs.batch_size).max(1);
    let admin = std::env::var("DATASTORAGE_BENCH_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://datastorage:datastorage@127.0.0.1:55432/datastorage".into());
    let model_dir = std::env::var("DATASTORAGE_BENCH_MODEL_DIR")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/.cache/models/all-MiniLM-L6-v2").into());
    let redis_url = std::env::var("DATASTORAGE_BENCH_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:56379".into());

    println!(
        "datastorage cache and jobs benchmark: {writes} writes ({repeat_percent}% repeated texts), {events} events \
         for the jobs, jobs.batch_size {batch}"
    );
    let model = Arc::new(LocalMiniLm::load(std::path::Path::new(&model_dir), MODEL_NAME)?);
    let redis = redis_answers(&redis_url).await;
    if !redis {
        println!("Redis does not answer at {redis_url} (make redis-start): skipping the L2 rows");
    }

    let texts = write_workload(writes, repeat_percent);
    let distinct = texts.iter().collect::<std::collections::HashSet<_>>().len();
    let cache = cache_part(&admin, &model_dir, &model, redis.then_some(redis_url.as_str()), &texts).await?;
    println!(
        "\n(a) WriteAudit, one client, {writes} writes of {distinct} distinct texts\n\n\
         | configuration | hit rate | hits on repeated texts | hits on first sight | p50 ms | p99 ms |\n\
         |---|---:|---:|---:|---:|---:|"
    );
    for row in &cache {
        let all = (
            row.hits_on_repeats.0 + row.hits_on_first_sight.0,
            row.hits_on_repeats.1 + row.hits_on_first_sight.1,
        );
        println!(
            "| {} | {} | {} | {} | {:.2} | {:.2} |",
            row.name,
            percent(all),
            percent(row.hits_on_repeats),
            percent(row.hits_on_first_sight),
            ms(&row.latency, 0.50),
            ms(&row.latency, 0.99)
        );
    }

    let throughput = jobs_part(&admin, &model_dir, &model, events, batch).await?;
    let raw = throughput[0].rate();
    println!(
        "\n(b) {events} events, jobs.batch_size {batch}\n\n\
         | what | events | seconds | events/s | vs the model in batches of {batch} |\n|---|---:|---:|---:|---:|"
    );
    for row in &throughput {
        println!(
            "| {} | {} | {:.2} | {:.0} | {:.2}x |",
            row.name,
            row.events,
            row.elapsed.as_secs_f64(),
            row.rate(),
            row.rate() / raw
        );
    }
    Ok(())
}
