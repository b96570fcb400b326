//! JobStatus across replicas with the Redis job store: a job started on one
//! server is watched and read on another, a Redis outage fails job RPCs but
//! never a write, nor does a Redis flapping under load, and a job left by a
//! crashed replica is taken over. Each test has a key prefix (or a
//! redis-server) of its own.
use std::{
    future::Future,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use async_trait::async_trait;
use datastorage::{
    config::Settings,
    embedding::{EmbeddingError, EmbeddingProvider},
    jobs::{JobRecord, JobSpec, JobState, JobStore, RedisJobStore},
    proto::v1::{self as pb, job_status_client::JobStatusClient},
};
use tonic::{transport::Channel, Code};
use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest};

use crate::{
    helpers::{fresh_database, local_model, remediation_event, spawn_with_settings, test_settings, write, TestApp},
    job_store::{delete_keys, redis_only::PrivateRedis, redis_settings, redis_url, unique_prefix},
    jobs::{jobs_client, start, watch_to_end, Switchable},
};

/// Small batches, so a backfill takes several; the supervisor only when a
/// test wants it.
fn replica_settings(database_url: &str, redis_url: &str, key_prefix: &str) -> Settings {
    let mut settings = test_settings(database_url.to_owned());
    settings.redis = redis_settings(redis_url, key_prefix);
    settings.jobs.batch_size = 2;
    settings.jobs.supervisor_interval_ms = 3_600_000;
    settings
}

/// Runs `test` with a key prefix of its own on the shared Redis, then deletes
/// that prefix's keys, whether or not the test passed.
async fn with_prefix<F, Fut>(test: F)
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let prefix = unique_prefix();
    let outcome = tokio::spawn(test(prefix.clone())).await;
    delete_keys(&prefix).await;
    if let Err(failure) = outcome {
        std::panic::resume_unwind(failure.into_panic());
    }
}

/// `inner`, pausing after each call it answers, so that a job's batches take
/// long enough for a watcher on another replica to see it in progress.
struct Paced {
    inner: Arc<dyn EmbeddingProvider>,
    pause: Duration,
}

#[async_trait]
impl EmbeddingProvider for Paced {
    fn model_name(&self) -> &str {
        self.inner.model_name()
    }

    fn dimensions(&self) -> usize {
        self.inner.dimensions()
    }

    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbeddingError> {
        let vectors = self.inner.embed(texts).await?;
        tokio::time::sleep(self.pause).await;
        Ok(vectors)
    }
}

/// A provider that is down until the test switches it on.
fn switched_off() -> Arc<Switchable> {
    Arc::new(Switchable {
        up: AtomicBool::new(false),
    })
}

/// Writes `count` events with texts of their own; returns their receipts.
async fn write_events(app: &TestApp, tag: &str, count: usize) -> Vec<pb::WriteAuditResponse> {
    let mut client = app.audit_client().await;
    let mut receipts = Vec::new();
    for i in 0..count {
        let mut event = remediation_event(&format!("rr-{tag}-{i}"));
        if let Some(pb::audit_event::Payload::Remediation(r)) = &mut event.payload {
            r.message = format!("replica {tag}: pod {i} of checkout evicted for disk pressure");
        }
        receipts.push(client.write_audit(write(event)).await.expect("write").into_inner());
    }
    receipts
}

fn backfill() -> pb::StartJobRequest {
    start(pb::start_job_request::Spec::BackfillEmbeddings(
        pb::BackfillEmbeddingsJob {},
    ))
}

fn state(job: &pb::Job) -> pb::JobState {
    pb::JobState::try_from(job.state).unwrap()
}

fn is_terminal(job: &pb::Job) -> bool {
    matches!(
        state(job),
        pb::JobState::Succeeded | pb::JobState::Failed | pb::JobState::Cancelled
    )
}

/// Polls `attempt` until it gives Some, for up to a minute.
async fn eventually<T, Fut>(what: &str, mut attempt: impl FnMut() -> Fut) -> T
where
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(found) = attempt().await {
            return found;
        }
        assert!(tokio::time::Instant::now() < deadline, "gave up waiting: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The job once it has ended, read with GetJob.
async fn ended(jobs: &JobStatusClient<Channel>, id: &str) -> pb::Job {
    eventually("the job ends", || {
        let mut jobs = jobs.clone();
        let request = pb::GetJobRequest { id: id.into() };
        async move {
            let job = jobs.get_job(request).await.ok()?.into_inner();
            is_terminal(&job).then_some(job)
        }
    })
    .await
}

fn embedded(job: &pb::Job) -> &prost_types::Value {
    &job.result.as_ref().expect("a result").fields["embedded"]
}

#[tokio::test]
async fn watching_from_a_second_server_sees_the_same_updates() {
    with_prefix(|prefix| async move {
        const EVENTS: usize = 20;
        let database = fresh_database().await;
        let provider = switched_off();
        let paced = Arc::new(Paced {
            inner: provider.clone(),
            pause: Duration::from_millis(100),
        });
        let first = spawn_with_settings(replica_settings(&database, &redis_url(), &prefix), paced).await;
        let second = spawn_with_settings(replica_settings(&database, &redis_url(), &prefix), local_model()).await;
        write_events(&first, "deferred", EVENTS).await;
        assert_eq!(first.count("pending_embeddings").await, EVENTS as i64);
        provider.up.store(true, Ordering::SeqCst);

        let mut on_first = jobs_client(&first).await;
        let mut on_second = jobs_client(&second).await;
        let job = on_first.start_job(backfill()).await.unwrap().into_inner();
        let updates = watch_to_end(&mut on_second, &job.id).await;

        let last = updates.last().unwrap();
        assert_eq!(state(last), pb::JobState::Succeeded, "{last:?}");
        assert_eq!((last.done, last.total), (EVENTS as i64, EVENTS as i64));
        assert_eq!(embedded(last), &prost_types::Value::from(EVENTS as f64));
        let done: Vec<i64> = updates.iter().map(|j| j.done).collect();
        assert!(
            done.windows(2).all(|w| w[0] <= w[1]),
            "progress never goes back: {done:?}"
        );
        assert!(
            updates
                .iter()
                .any(|j| state(j) == pb::JobState::Running && 0 < j.done && j.done < EVENTS as i64),
            "the second server streams intermediate progress: {done:?}"
        );
        assert!(
            updates[..updates.len() - 1].iter().all(|j| !is_terminal(j)),
            "one terminal update, last: {updates:?}"
        );
        let updated: Vec<_> = updates.iter().map(|j| j.updated_at.unwrap()).collect();
        assert!(
            updated
                .windows(2)
                .all(|w| (w[0].seconds, w[0].nanos) < (w[1].seconds, w[1].nanos)),
            "no update is repeated: {updated:?}"
        );

        let request = || pb::GetJobRequest { id: job.id.clone() };
        let read_on_first = on_first.get_job(request()).await.unwrap().into_inner();
        let read_on_second = on_second.get_job(request()).await.unwrap().into_inner();
        assert_eq!(read_on_second, read_on_first);
        assert_eq!(&read_on_second, last, "the last update is the stored record");
        assert_eq!(second.count("pending_embeddings").await, 0);
        assert_eq!(second.count("stored_embeddings").await, EVENTS as i64);
    })
    .await;
}

/// grpc.health.v1's answer for the whole server.
async fn overall_health(app: &TestApp) -> Option<ServingStatus> {
    let mut health = HealthClient::new(app.channel().await);
    let reply = health.check(HealthCheckRequest { service: String::new() }).await.ok()?;
    Some(reply.into_inner().status())
}

/// Each job RPC's status code: GetJob of `id`, ListJobs, StartJob.
async fn job_rpc_codes(jobs: &JobStatusClient<Channel>, id: &str) -> [Code; 3] {
    let mut jobs = jobs.clone();
    let get = jobs.get_job(pb::GetJobRequest { id: id.into() }).await.err();
    let list = jobs.list_jobs(pb::ListJobsRequest::default()).await.err();
    let start = jobs.start_job(backfill()).await.err();
    [get, list, start].map(|refused| refused.map_or(Code::Ok, |status| status.code()))
}

#[tokio::test]
async fn redis_outage_fails_job_rpcs_but_never_writes() {
    let mut redis = PrivateRedis::start(PrivateRedis::free_port()).await;
    let database = fresh_database().await;
    let app = spawn_with_settings(replica_settings(&database, &redis.url(), "ds-test"), local_model()).await;
    let mut jobs = jobs_client(&app).await;
    eventually("the server is SERVING", || async {
        (overall_health(&app).await == Some(ServingStatus::Serving)).then_some(())
    })
    .await;
    let before = jobs.start_job(backfill()).await.unwrap().into_inner();
    assert_eq!(state(&ended(&jobs, &before.id).await), pb::JobState::Succeeded);

    redis.kill();

    eventually("GetJob answers UNAVAILABLE", || {
        let mut jobs = jobs.clone();
        let request = pb::GetJobRequest { id: before.id.clone() };
        async move { (jobs.get_job(request).await.err()?.code() == Code::Unavailable).then_some(()) }
    })
    .await;
    assert_eq!(job_rpc_codes(&jobs, &before.id).await, [Code::Unavailable; 3]);
    let watch = jobs
        .watch_job(pb::WatchJobRequest { id: before.id.clone() })
        .await
        .unwrap_err();
    assert_eq!(watch.code(), Code::Unavailable, "{watch:?}");
    let receipts = write_events(&app, "outage", 3).await;
    assert!(
        receipts
            .iter()
            .all(|r| r.embedding_state() == pb::EmbeddingState::Generated),
        "embedded by the model, the shared cache stepped around: {receipts:?}"
    );
    assert_eq!(app.count("pending_embeddings").await, 0, "nothing deferred");
    assert_eq!(
        overall_health(&app).await,
        Some(ServingStatus::Serving),
        "Redis holds no data: its outage leaves the server serving"
    );

    // No persistence: the restarted Redis knows no job, but takes new ones.
    let _restarted = PrivateRedis::start(redis.port).await;
    let after = eventually("StartJob works again", || {
        let mut jobs = jobs.clone();
        async move { jobs.start_job(backfill()).await.ok() }
    })
    .await
    .into_inner();
    let updates = eventually("WatchJob works again", || {
        let mut jobs = jobs.clone();
        let request = pb::WatchJobRequest { id: after.id.clone() };
        async move {
            let mut stream = jobs.watch_job(request).await.ok()?.into_inner();
            let mut updates = Vec::new();
            while let Some(job) = stream.message().await.expect("stream") {
                updates.push(job);
            }
            Some(updates)
        }
    })
    .await;
    assert_eq!(state(updates.last().unwrap()), pb::JobState::Succeeded, "{updates:?}");
    let listed = jobs
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(
        listed.iter().map(|j| &j.id).collect::<Vec<_>>(),
        [&after.id],
        "{listed:?}"
    );
    let gone = jobs.get_job(pb::GetJobRequest { id: before.id }).await.unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
}

#[tokio::test]
async fn a_job_left_by_a_crashed_replica_is_taken_over() {
    with_prefix(|prefix| async move {
        const EVENTS: i64 = 6;
        let database = fresh_database().await;
        // Deferred events, written by a replica whose provider is down.
        let writer = spawn_with_settings(test_settings(database.clone()), switched_off()).await;
        write_events(&writer, "crashed", EVENTS as usize).await;
        assert_eq!(writer.count("pending_embeddings").await, EVENTS);

        // The record of a backfill whose replica died after counting its
        // work: running, and no lock held for it.
        let store = RedisJobStore::connect(&redis_settings(&redis_url(), &prefix))
            .await
            .unwrap();
        let mut crashed = JobRecord::new(JobSpec::BackfillEmbeddings, "datastorage".into());
        store.create(crashed.clone(), None).await.unwrap();
        crashed.state = JobState::Running;
        crashed.started_at = Some(chrono::Utc::now());
        crashed.total = EVENTS;
        crashed.version += 1;
        store.update(&crashed).await.unwrap();

        let mut settings = replica_settings(&database, &redis_url(), &prefix);
        settings.jobs.supervisor_interval_ms = 100;
        settings.jobs.lock_ttl_ms = 1_000;
        let replica = spawn_with_settings(settings, local_model()).await;
        let jobs = jobs_client(&replica).await;
        let last = ended(&jobs, &crashed.id.to_string()).await;

        assert_eq!(state(&last), pb::JobState::Succeeded, "{last:?}");
        assert_eq!(last.created_by, "datastorage");
        assert_eq!(embedded(&last), &prost_types::Value::from(EVENTS as f64));
        assert_eq!((last.done, last.total), (EVENTS, EVENTS), "{last:?}");
        assert_eq!(replica.count("pending_embeddings").await, 0);
        assert_eq!(replica.count("stored_embeddings").await, EVENTS);
        let listed = jobs
            .clone()
            .list_jobs(pb::ListJobsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .jobs;
        assert_eq!(listed.len(), 1, "taken over, not started again: {listed:?}");
    })
    .await;
}

/// What the load saw while Redis flapped.
#[derive(Default)]
struct FlapLoad {
    acknowledged: usize,
    failed: Vec<String>,
}

#[tokio::test]
async fn a_flapping_redis_under_load_costs_no_write_or_query() {
    const FLAPS: usize = 4;
    let port = PrivateRedis::free_port();
    let mut redis = Some(PrivateRedis::start(port).await);
    let database = fresh_database().await;
    let mut settings = replica_settings(&database, &format!("redis://127.0.0.1:{port}"), "ds-flap");
    // Every Redis user on the call path: the shared embedding cache, the
    // shared rate limit, the job store.
    settings.rate_limit.enabled = true;
    settings.rate_limit.shared = true;
    settings.rate_limit.requests_per_second = 10_000;
    settings.rate_limit.burst = 10_000;
    let app = spawn_with_settings(settings, local_model()).await;
    let jobs = jobs_client(&app).await;
    let started = jobs.clone().start_job(backfill()).await.unwrap().into_inner();

    let flapping = Arc::new(AtomicBool::new(true));
    let mut load = tokio::task::JoinSet::new();
    for writer in 0..3 {
        let (channel, flapping) = (app.channel().await, flapping.clone());
        load.spawn(async move {
            let mut client = pb::audit_write_client::AuditWriteClient::new(channel);
            let mut seen = FlapLoad::default();
            let mut n = 0;
            while flapping.load(Ordering::Relaxed) {
                // A new text each time: the in-process cache misses, so every
                // write asks the shared cache in Redis, then the model.
                let rrid = format!("rr-flap-{writer}-{n}");
                let mut event = remediation_event(&rrid);
                if let Some(pb::audit_event::Payload::Remediation(remediation)) = event.payload.as_mut() {
                    remediation.message = format!("container api OOMKilled: memory limit {writer}{n}Mi exceeded");
                }
                let mut request = write(event);
                request.request_id = rrid;
                match client.write_audit(request).await {
                    Ok(_) => seen.acknowledged += 1,
                    Err(status) => seen.failed.push(format!("WriteAudit: {status:?}")),
                }
                n += 1;
            }
            seen
        });
    }
    {
        let (channel, flapping) = (app.channel().await, flapping.clone());
        load.spawn(async move {
            let mut incidents = pb::incident_query_client::IncidentQueryClient::new(channel.clone());
            let mut search = pb::vector_search_client::VectorSearchClient::new(channel);
            let mut seen = FlapLoad::default();
            while flapping.load(Ordering::Relaxed) {
                if let Err(status) = incidents.list_incidents(pb::ListIncidentsRequest::default()).await {
                    seen.failed.push(format!("ListIncidents: {status:?}"));
                }
                let request = pb::SearchSimilarRequest {
                    query: Some(pb::search_similar_request::Query::Text(
                        "pod restarted after OOM".into(),
                    )),
                    ..Default::default()
                };
                if let Err(status) = search.search_similar(request).await {
                    seen.failed.push(format!("SearchSimilar: {status:?}"));
                }
            }
            seen
        });
    }
    // Job RPCs may be refused while Redis is down, but only as UNAVAILABLE,
    // and no slower than the Redis command timeout allows.
    let job_probe = {
        let (mut jobs, flapping, id) = (jobs.clone(), flapping.clone(), started.id.clone());
        tokio::spawn(async move {
            let mut codes = Vec::new();
            while flapping.load(Ordering::Relaxed) {
                let asked = std::time::Instant::now();
                let code = jobs
                    .get_job(pb::GetJobRequest { id: id.clone() })
                    .await
                    .map_or_else(|status| status.code(), |_| Code::Ok);
                codes.push((code, asked.elapsed()));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            codes
        })
    };

    for _ in 0..FLAPS {
        tokio::time::sleep(Duration::from_millis(400)).await;
        redis.take().unwrap().kill();
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(overall_health(&app).await, Some(ServingStatus::Serving));
        redis = Some(PrivateRedis::start(port).await);
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    flapping.store(false, Ordering::Relaxed);

    let mut acknowledged = 0;
    let mut failed = Vec::new();
    while let Some(seen) = load.join_next().await {
        let seen = seen.unwrap();
        acknowledged += seen.acknowledged;
        failed.extend(seen.failed);
    }
    assert!(
        failed.is_empty(),
        "Redis is no dependency of writes or queries: {failed:#?}"
    );
    assert!(acknowledged >= 10, "the load ran: {acknowledged} writes");
    eprintln!("{acknowledged} writes acknowledged while Redis flapped {FLAPS} times");
    let codes = job_probe.await.unwrap();
    for (code, took) in &codes {
        assert!(
            matches!(code, Code::Ok | Code::Unavailable | Code::NotFound),
            "job RPCs: OK, or UNAVAILABLE while Redis is down; got {code:?}"
        );
        assert!(*took < Duration::from_secs(3), "a job RPC took {took:?}");
    }
    assert!(
        codes.iter().any(|(code, _)| *code == Code::Unavailable),
        "the probe saw Redis down: {codes:?}"
    );
    assert_eq!(
        app.count("audit_events").await,
        acknowledged as i64,
        "every acknowledged write stored, once"
    );
    eventually("StartJob works again", || {
        let mut jobs = jobs.clone();
        async move { jobs.start_job(backfill()).await.ok() }
    })
    .await;
}
