//! The behaviour every job store must have, as test bodies run unchanged
//! against the in-process store and against Redis (each Redis test under a
//! key prefix of its own), plus what only Redis does: share jobs across
//! replicas, release subscriptions, and come back after a Redis restart.
use std::{future::Future, sync::Arc, time::Duration};

use chrono::{DateTime, TimeDelta, Utc};
use datastorage::{
    config::{RedisSettings, Settings},
    jobs::{
        JobListFilter, JobRecord, JobSpec, JobState, JobStore, JobStoreError, LockToken, RedisJobStore,
        FINISHED_JOB_TTL,
    },
};
use fred::prelude::{Client, ClientLike, Config, KeysInterface, LuaInterface, PubsubInterface};
use secrecy::SecretString;
use tokio_stream::StreamExt;
use uuid::Uuid;

pub fn redis_url() -> String {
    std::env::var("DATASTORAGE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:56379".into())
}

/// A key prefix no other test uses, so tests can share one Redis.
pub fn unique_prefix() -> String {
    format!("ds-test-{}", Uuid::new_v4().simple())
}

pub fn redis_settings(url: &str, key_prefix: &str) -> RedisSettings {
    let mut settings = Settings::default().redis;
    settings.url = Some(SecretString::from(url.to_owned()));
    settings.key_prefix = key_prefix.to_owned();
    settings
}

/// A plain client, to look at what the store wrote.
async fn inspector(url: &str) -> Client {
    let client = Client::new(Config::from_url(url).unwrap(), None, None, None);
    client.init().await.expect("Redis is up (scripts/redis.sh start)");
    client
}

/// Deletes every key under `prefix` (tests clean up after themselves).
pub async fn delete_keys(prefix: &str) {
    let client = inspector(&redis_url()).await;
    let _: () = client
        .eval(
            "for _, key in ipairs(redis.call('KEYS', ARGV[1])) do redis.call('DEL', key) end",
            Vec::<String>::new(),
            vec![format!("{prefix}:*")],
        )
        .await
        .unwrap();
}

/// Runs `test` against a Redis store with a prefix of its own, then deletes
/// that prefix's keys, whether or not the test passed.
async fn on_redis<F, Fut>(test: F)
where
    F: FnOnce(Arc<dyn JobStore>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let prefix = unique_prefix();
    let store = RedisJobStore::connect(&redis_settings(&redis_url(), &prefix))
        .await
        .unwrap();
    let outcome = tokio::spawn(test(Arc::new(store))).await;
    delete_keys(&prefix).await;
    if let Err(failure) = outcome {
        std::panic::resume_unwind(failure.into_panic());
    }
}

/// Declares each shared test body once per store.
macro_rules! for_both_stores {
    ($($test:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test]
                async fn $test() {
                    super::$test(std::sync::Arc::new(datastorage::jobs::MemoryJobStore::new())).await;
                }
            )*
        }

        mod redis {
            $(
                #[tokio::test]
                async fn $test() {
                    super::on_redis(super::$test).await;
                }
            )*
        }
    };
}

for_both_stores!(
    a_created_job_reads_back_unchanged,
    an_unknown_job_is_none,
    a_repeated_request_id_returns_the_first_job,
    a_request_id_is_scoped_to_its_creator,
    listing_is_newest_first_and_filters_by_state_and_type,
    pages_follow_each_other_without_repeats_or_gaps,
    a_page_is_exact_where_one_millisecond_straddles_index_chunks,
    an_update_must_follow_the_stored_version,
    a_finished_job_expires_a_day_after_it_finished,
    a_job_finished_longer_ago_than_the_ttl_is_gone,
    cancellation_is_flagged_apart_from_progress,
    a_watch_sees_each_later_change_of_its_job_in_order,
    a_lock_is_exclusive_until_released,
    only_the_owner_renews_or_releases_a_lock,
    a_lapsed_lock_goes_to_the_next_taker,
);

fn new_job(created_by: &str) -> JobRecord {
    JobRecord::new(JobSpec::BackfillEmbeddings, created_by.into())
}

/// Moves `job` to `state` as a runner would and stores it.
async fn advance(store: &dyn JobStore, job: &mut JobRecord, state: JobState) {
    let now = Utc::now();
    job.state = state;
    job.version += 1;
    job.updated_at = now;
    if state.is_terminal() {
        job.finished_at = Some(now);
    }
    store.update(job).await.unwrap();
}

async fn next_change(changes: &mut datastorage::jobs::JobChanges) -> JobRecord {
    tokio::time::timeout(Duration::from_secs(5), changes.next())
        .await
        .expect("a change within 5 s")
        .expect("the watch is still open")
}

fn ids(jobs: &[JobRecord]) -> Vec<Uuid> {
    jobs.iter().map(|job| job.id).collect()
}

async fn a_created_job_reads_back_unchanged(store: Arc<dyn JobStore>) {
    let job = JobRecord::new(
        JobSpec::Reembed {
            model: "all-MiniLM-L12-v2".into(),
        },
        "alice".into(),
    );

    let (stored, created) = store.create(job.clone(), None).await.unwrap();

    assert!(created);
    assert_eq!(stored, job);
    assert_eq!(store.get(job.id).await.unwrap(), Some(job));
}

async fn an_unknown_job_is_none(store: Arc<dyn JobStore>) {
    store.create(new_job("alice"), None).await.unwrap();

    assert_eq!(store.get(Uuid::now_v7()).await.unwrap(), None);
    assert!(!store.cancel_requested(Uuid::now_v7()).await.unwrap());
}

async fn a_repeated_request_id_returns_the_first_job(store: Arc<dyn JobStore>) {
    let mut first = new_job("alice");
    assert!(store.create(first.clone(), Some("req-1")).await.unwrap().1);
    advance(&*store, &mut first, JobState::Running).await;

    let retry = JobRecord::new(JobSpec::Reindex { model: "m".into() }, "alice".into());
    let (returned, created) = store.create(retry.clone(), Some("req-1")).await.unwrap();

    assert!(!created);
    assert_eq!(returned, first, "the first job as it is now");
    assert_eq!(store.get(retry.id).await.unwrap(), None);
    let listed = store.list(&JobListFilter::default(), None, 10).await.unwrap();
    assert_eq!(ids(&listed), vec![first.id]);
}

async fn a_request_id_is_scoped_to_its_creator(store: Arc<dyn JobStore>) {
    let alice = new_job("alice");
    let bob = new_job("bob");
    // Creator and request id must not run together: "svc:a" + "b:c" is not "svc:a:b" + "c".
    let colon_first = new_job("svc:a");
    let colon_second = new_job("svc:a:b");

    assert!(store.create(alice.clone(), Some("req-1")).await.unwrap().1);
    assert!(store.create(bob.clone(), Some("req-1")).await.unwrap().1);
    assert!(store.create(colon_first.clone(), Some("b:c")).await.unwrap().1);
    assert!(store.create(colon_second.clone(), Some("c")).await.unwrap().1);

    let mut listed = ids(&store.list(&JobListFilter::default(), None, 10).await.unwrap());
    let mut expected = vec![alice.id, bob.id, colon_first.id, colon_second.id];
    listed.sort();
    expected.sort();
    assert_eq!(listed, expected);
}

async fn listing_is_newest_first_and_filters_by_state_and_type(store: Arc<dyn JobStore>) {
    let base = Utc::now() - TimeDelta::hours(1);
    let specs = [
        JobSpec::BackfillEmbeddings,
        JobSpec::Purge { older_than: base },
        JobSpec::Reembed { model: "m".into() },
        JobSpec::Purge { older_than: base },
        JobSpec::BackfillEmbeddings,
    ];
    let mut jobs = Vec::new();
    for (offset, spec) in specs.into_iter().enumerate() {
        let mut job = JobRecord::new(spec, "alice".into());
        job.created_at = base + TimeDelta::seconds(offset as i64);
        store.create(job.clone(), None).await.unwrap();
        jobs.push(job);
    }
    advance(&*store, &mut jobs[1], JobState::Running).await;
    advance(&*store, &mut jobs[2], JobState::Running).await;
    advance(&*store, &mut jobs[3], JobState::Failed).await;

    let everything = store.list(&JobListFilter::default(), None, 10).await.unwrap();
    assert_eq!(
        ids(&everything),
        vec![jobs[4].id, jobs[3].id, jobs[2].id, jobs[1].id, jobs[0].id]
    );
    assert_eq!(everything[1], store.get(jobs[3].id).await.unwrap().unwrap());

    let running = JobListFilter {
        states: vec![JobState::Running],
        type_name: None,
    };
    assert_eq!(
        ids(&store.list(&running, None, 10).await.unwrap()),
        vec![jobs[2].id, jobs[1].id]
    );

    let purges = JobListFilter {
        states: vec![],
        type_name: Some("purge".into()),
    };
    assert_eq!(
        ids(&store.list(&purges, None, 10).await.unwrap()),
        vec![jobs[3].id, jobs[1].id]
    );

    let running_or_pending_backfills = JobListFilter {
        states: vec![JobState::Running, JobState::Pending],
        type_name: Some("backfill_embeddings".into()),
    };
    assert_eq!(
        ids(&store.list(&running_or_pending_backfills, None, 10).await.unwrap()),
        vec![jobs[4].id, jobs[0].id]
    );

    assert_eq!(
        ids(&store.list(&JobListFilter::default(), None, 2).await.unwrap()),
        vec![jobs[4].id, jobs[3].id]
    );
}

/// All pages of `filter`, `page_size` at a time, each after the last of the one before.
async fn every_page(store: &dyn JobStore, filter: &JobListFilter, page_size: usize) -> Vec<Uuid> {
    let mut listed = Vec::new();
    let mut after = None;
    loop {
        let page = store.list(filter, after, page_size).await.unwrap();
        assert!(page.len() <= page_size);
        listed.extend(ids(&page));
        match page.last() {
            Some(last) if page.len() == page_size => {
                after = Some(datastorage::jobs::JobCursor {
                    created_at: last.created_at,
                    id: last.id,
                })
            }
            _ => return listed,
        }
    }
}

async fn pages_follow_each_other_without_repeats_or_gaps(store: Arc<dyn JobStore>) {
    // Enough jobs that Redis reads its index in several chunks, crowded into
    // few milliseconds: equal timestamps, and different ones within one
    // millisecond, which the index scores alike.
    let base: DateTime<Utc> = DateTime::from_timestamp_millis(Utc::now().timestamp_millis()).unwrap();
    let mut jobs = Vec::new();
    for n in 0..600i64 {
        let spec = if n % 3 == 0 {
            JobSpec::Purge { older_than: base }
        } else {
            JobSpec::BackfillEmbeddings
        };
        let mut job = JobRecord::new(spec, "alice".into());
        job.created_at = base + TimeDelta::milliseconds(n / 7) + TimeDelta::microseconds(n % 3);
        store.create(job.clone(), None).await.unwrap();
        jobs.push(job);
    }
    jobs.sort_by_key(|job| std::cmp::Reverse((job.created_at, job.id)));

    assert_eq!(every_page(&*store, &JobListFilter::default(), 37).await, ids(&jobs));

    let purges = JobListFilter {
        states: vec![],
        type_name: Some("purge".into()),
    };
    let expected: Vec<Uuid> = jobs
        .iter()
        .filter(|job| job.spec.type_name() == "purge")
        .map(|job| job.id)
        .collect();
    assert_eq!(every_page(&*store, &purges, 11).await, expected);
}

async fn a_page_is_exact_where_one_millisecond_straddles_index_chunks(store: Arc<dyn JobStore>) {
    // Redis reads its listing index 256 members at a time and orders the
    // members of one millisecond by id. Here the oldest millisecond's purges
    // straddle the end of the first 256, and their timestamps run against
    // their ids, so the newest purges are read last.
    let base = DateTime::from_timestamp_millis(Utc::now().timestamp_millis()).unwrap() - TimeDelta::hours(1);
    for n in 0..254 {
        let mut job = new_job("alice");
        job.created_at = base + TimeDelta::milliseconds(1 + n);
        store.create(job, None).await.unwrap();
    }
    let mut purges: Vec<JobRecord> = (0..4)
        .map(|_| JobRecord::new(JobSpec::Purge { older_than: base }, "alice".into()))
        .collect();
    purges.sort_by_key(|job| job.id);
    for (n, job) in purges.iter_mut().enumerate() {
        job.created_at = base + TimeDelta::microseconds(4 - n as i64);
        store.create(job.clone(), None).await.unwrap();
    }
    let only_purges = JobListFilter {
        states: vec![],
        type_name: Some("purge".into()),
    };

    assert_eq!(every_page(&*store, &only_purges, 2).await, ids(&purges));
}

async fn an_update_must_follow_the_stored_version(store: Arc<dyn JobStore>) {
    let job = new_job("alice");
    store.create(job.clone(), None).await.unwrap();
    let mut running = job.clone();
    advance(&*store, &mut running, JobState::Running).await;

    let mut stale = job.clone();
    stale.done = 5;
    stale.version = 2;
    let mut skipping = running.clone();
    skipping.version = 4;
    let mut unknown = new_job("alice");
    unknown.version = 2;

    for (update, why) in [
        (&stale, "stale"),
        (&skipping, "skips a version"),
        (&unknown, "unknown job"),
    ] {
        match store.update(update).await {
            Err(JobStoreError::Conflict(id)) => assert_eq!(id, update.id),
            other => panic!("{why}: expected a conflict, got {other:?}"),
        }
    }
    assert_eq!(store.get(job.id).await.unwrap(), Some(running));
}

async fn a_finished_job_expires_a_day_after_it_finished(store: Arc<dyn JobStore>) {
    let mut job = new_job("alice");
    store.create(job.clone(), None).await.unwrap();
    advance(&*store, &mut job, JobState::Running).await;
    assert_eq!(store.get(job.id).await.unwrap().unwrap().expires_at, None);

    job.result.insert("embedded".into(), 3.into());
    advance(&*store, &mut job, JobState::Succeeded).await;

    let stored = store.get(job.id).await.unwrap().expect("readable once finished");
    assert_eq!(stored.state, JobState::Succeeded);
    assert_eq!(stored.result, job.result);
    assert_eq!(stored.expires_at, Some(job.finished_at.unwrap() + FINISHED_JOB_TTL));
}

async fn a_job_finished_longer_ago_than_the_ttl_is_gone(store: Arc<dyn JobStore>) {
    let mut job = new_job("alice");
    store.create(job.clone(), None).await.unwrap();
    job.state = JobState::Failed;
    job.version = 2;
    job.finished_at = Some(Utc::now() - FINISHED_JOB_TTL - TimeDelta::minutes(1));

    store.update(&job).await.unwrap();

    assert_eq!(store.get(job.id).await.unwrap(), None);
    assert!(store
        .list(&JobListFilter::default(), None, 10)
        .await
        .unwrap()
        .is_empty());
}

async fn cancellation_is_flagged_apart_from_progress(store: Arc<dyn JobStore>) {
    let mut job = new_job("alice");
    let other = new_job("alice");
    store.create(job.clone(), None).await.unwrap();
    store.create(other.clone(), None).await.unwrap();
    assert!(!store.cancel_requested(job.id).await.unwrap());

    store.request_cancel(job.id).await.unwrap();
    job.done = 10;
    advance(&*store, &mut job, JobState::Running).await;

    assert!(store.cancel_requested(job.id).await.unwrap(), "progress kept the flag");
    assert!(!store.cancel_requested(other.id).await.unwrap());
}

async fn a_watch_sees_each_later_change_of_its_job_in_order(store: Arc<dyn JobStore>) {
    let mut job = new_job("alice");
    let mut other = new_job("alice");
    store.create(job.clone(), None).await.unwrap();
    store.create(other.clone(), None).await.unwrap();
    advance(&*store, &mut job, JobState::Running).await;

    let mut changes = store.watch(job.id).await.unwrap();
    advance(&*store, &mut other, JobState::Running).await;
    job.done = 5;
    advance(&*store, &mut job, JobState::Running).await;
    advance(&*store, &mut other, JobState::Cancelled).await;
    job.done = 10;
    advance(&*store, &mut job, JobState::Running).await;
    advance(&*store, &mut job, JobState::Succeeded).await;

    let mut seen = Vec::new();
    for _ in 0..3 {
        let change = next_change(&mut changes).await;
        assert_eq!(change.id, job.id);
        seen.push((change.version, change.done, change.state));
    }
    assert_eq!(
        seen,
        vec![
            (3, 5, JobState::Running),
            (4, 10, JobState::Running),
            (5, 10, JobState::Succeeded)
        ]
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(200), changes.next())
            .await
            .is_err(),
        "nothing but those three"
    );
}

async fn a_lock_is_exclusive_until_released(store: Arc<dyn JobStore>) {
    let ttl = Duration::from_secs(30);
    let held = store.try_lock("reindex", ttl).await.unwrap().expect("free lock");

    assert_eq!(store.try_lock("reindex", ttl).await.unwrap(), None);
    assert!(
        store.try_lock("purge", ttl).await.unwrap().is_some(),
        "locks are per name"
    );

    store.release_lock(&held).await.unwrap();
    let next = store.try_lock("reindex", ttl).await.unwrap().expect("released lock");
    assert_ne!(next.owner, held.owner);
}

async fn only_the_owner_renews_or_releases_a_lock(store: Arc<dyn JobStore>) {
    let ttl = Duration::from_secs(30);
    let held = store.try_lock("purge", ttl).await.unwrap().unwrap();
    let impostor = LockToken {
        name: held.name.clone(),
        owner: "someone-else".into(),
    };

    assert!(!store.renew_lock(&impostor, ttl).await.unwrap());
    store.release_lock(&impostor).await.unwrap();
    assert_eq!(store.try_lock("purge", ttl).await.unwrap(), None, "still held");

    assert!(store.renew_lock(&held, ttl).await.unwrap());
    store.release_lock(&held).await.unwrap();
    assert!(
        !store.renew_lock(&held, ttl).await.unwrap(),
        "released locks stay released"
    );
}

async fn a_lapsed_lock_goes_to_the_next_taker(store: Arc<dyn JobStore>) {
    let crashed = store
        .try_lock("backfill", Duration::from_millis(100))
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;

    let next = store
        .try_lock("backfill", Duration::from_secs(30))
        .await
        .unwrap()
        .expect("lapsed lock is free");

    assert!(!store.renew_lock(&crashed, Duration::from_secs(30)).await.unwrap());
    store.release_lock(&crashed).await.unwrap();
    assert_eq!(
        store.try_lock("backfill", Duration::from_secs(30)).await.unwrap(),
        None,
        "the late release left {}'s lock alone",
        next.owner
    );
}

/// Tests of what only the Redis store does.
pub mod redis_only {
    use super::*;

    /// Two stores as two replicas would have them, and the prefix they share.
    struct Replicas {
        prefix: String,
        first: RedisJobStore,
        second: RedisJobStore,
    }

    impl Replicas {
        async fn start() -> Self {
            let prefix = unique_prefix();
            let settings = redis_settings(&redis_url(), &prefix);
            Replicas {
                first: RedisJobStore::connect(&settings).await.unwrap(),
                second: RedisJobStore::connect(&settings).await.unwrap(),
                prefix,
            }
        }

        async fn clean_up(self) {
            delete_keys(&self.prefix).await;
        }
    }

    #[tokio::test]
    async fn a_finished_record_carries_a_redis_ttl_of_a_day() {
        let replicas = Replicas::start().await;
        let store = &replicas.first;
        let redis = inspector(&redis_url()).await;
        let mut job = new_job("alice");
        let key = format!("{}:job:{}", replicas.prefix, job.id);
        store.create(job.clone(), None).await.unwrap();
        advance(store, &mut job, JobState::Running).await;
        let running_ttl: i64 = redis.pttl(&key).await.unwrap();

        advance(store, &mut job, JobState::Succeeded).await;
        let finished_ttl: i64 = redis.pttl(&key).await.unwrap();

        replicas.clean_up().await;
        assert_eq!(running_ttl, -1, "no TTL while running");
        let day = FINISHED_JOB_TTL.as_millis() as i64;
        assert!(
            (day - 60_000..=day).contains(&finished_ttl),
            "{finished_ttl} ms is about a day"
        );
    }

    #[tokio::test]
    async fn replicas_share_jobs_changes_and_locks() {
        let replicas = Replicas::start().await;
        let (first, second) = (&replicas.first, &replicas.second);
        let mut job = new_job("alice");
        first.create(job.clone(), Some("req-1")).await.unwrap();

        let seen_by_second = second.get(job.id).await.unwrap();
        let retried_on_second = second.create(new_job("alice"), Some("req-1")).await.unwrap();
        let mut changes = second.watch(job.id).await.unwrap();
        advance(first, &mut job, JobState::Running).await;
        let change = next_change(&mut changes).await;
        first.request_cancel(job.id).await.unwrap();
        let cancel_seen = second.cancel_requested(job.id).await.unwrap();
        let lock = first.try_lock("reindex", Duration::from_secs(30)).await.unwrap();
        let second_lock = second.try_lock("reindex", Duration::from_secs(30)).await.unwrap();

        replicas.clean_up().await;
        assert_eq!(seen_by_second.map(|job| job.id), Some(job.id));
        assert_eq!((retried_on_second.0.id, retried_on_second.1), (job.id, false));
        assert_eq!(change, job);
        assert!(cancel_seen);
        assert!(lock.is_some());
        assert_eq!(second_lock, None);
    }

    async fn subscribers(redis: &Client, channel: &str) -> i64 {
        let counts: Vec<(String, i64)> = redis.pubsub_numsub(channel).await.unwrap();
        counts[0].1
    }

    #[tokio::test]
    async fn watches_of_a_job_share_one_subscription_until_the_last_is_dropped() {
        let replicas = Replicas::start().await;
        let store = &replicas.first;
        let redis = inspector(&redis_url()).await;
        let mut job = new_job("alice");
        let channel = format!("{}:job:{}:changes", replicas.prefix, job.id);
        store.create(job.clone(), None).await.unwrap();

        let first_watch = store.watch(job.id).await.unwrap();
        let mut second_watch = store.watch(job.id).await.unwrap();
        let while_both = subscribers(&redis, &channel).await;
        drop(first_watch);
        tokio::time::sleep(Duration::from_millis(100)).await;
        advance(store, &mut job, JobState::Running).await;
        let change = next_change(&mut second_watch).await;
        let while_one = subscribers(&redis, &channel).await;
        drop(second_watch);
        let mut after_both = while_one;
        for _ in 0..50 {
            after_both = subscribers(&redis, &channel).await;
            if after_both == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        replicas.clean_up().await;
        assert_eq!((while_both, while_one, after_both), (1, 1, 0));
        assert_eq!(change.version, 2);
    }

    /// A redis-server of this test's own, so stopping it disturbs no other test.
    pub struct PrivateRedis {
        pub port: u16,
        process: std::process::Child,
    }

    impl PrivateRedis {
        pub fn free_port() -> u16 {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        }

        pub async fn start(port: u16) -> Self {
            let process = std::process::Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("redis-server is installed (make deps)");
            // Built first, so that giving up below stops the process too.
            let redis = PrivateRedis { port, process };
            for _ in 0..250 {
                if redis.answers_as_itself().await {
                    return redis;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            panic!("redis-server did not listen on {port}");
        }

        /// Whether the server on the port is this process, not whatever
        /// took the port meanwhile (a restart reuses a freed port).
        async fn answers_as_itself(&self) -> bool {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let Ok(mut connection) = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await else {
                return false;
            };
            if connection
                .write_all(b"*2\r\n$4\r\nINFO\r\n$6\r\nserver\r\n")
                .await
                .is_err()
            {
                return false;
            }
            let mut reply = vec![0u8; 16 * 1024];
            let Ok(Ok(read)) = tokio::time::timeout(Duration::from_secs(1), connection.read(&mut reply)).await else {
                return false;
            };
            String::from_utf8_lossy(&reply[..read]).contains(&format!("process_id:{}\r\n", self.process.id()))
        }

        pub fn url(&self) -> String {
            format!("redis://127.0.0.1:{}", self.port)
        }

        pub fn kill(&mut self) {
            let _ = self.process.kill();
            let _ = self.process.wait();
        }
    }

    impl Drop for PrivateRedis {
        fn drop(&mut self) {
            self.kill();
        }
    }

    /// Polls `call` until `done` holds of its result, for up to 10 s.
    async fn eventually<T, Fut>(mut call: impl FnMut() -> Fut, done: impl Fn(&T) -> bool) -> T
    where
        Fut: Future<Output = T>,
    {
        for _ in 0..200 {
            let result = call().await;
            if done(&result) {
                return result;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("gave up waiting");
    }

    #[tokio::test]
    async fn the_store_fails_fast_while_redis_is_down_and_recovers_when_it_is_back() {
        let mut redis = PrivateRedis::start(PrivateRedis::free_port()).await;
        let store = RedisJobStore::connect(&redis_settings(&redis.url(), "ds-test"))
            .await
            .unwrap();
        let job = new_job("alice");
        store.create(job.clone(), None).await.unwrap();
        let mut changes = store.watch(job.id).await.unwrap();

        redis.kill();

        let ended = tokio::time::timeout(Duration::from_secs(5), changes.next()).await;
        assert!(matches!(ended, Ok(None)), "a watch ends with its connection");
        let refused = eventually(|| store.get(job.id), Result::is_err).await;
        assert!(matches!(refused, Err(JobStoreError::Unavailable(_))), "{refused:?}");
        for refused in [
            store.create(new_job("alice"), None).await.err(),
            store.watch(job.id).await.err(),
            store.try_lock("reindex", Duration::from_secs(1)).await.err(),
        ] {
            assert!(matches!(refused, Some(JobStoreError::Unavailable(_))), "{refused:?}");
        }

        let _restarted = PrivateRedis::start(redis.port).await;

        // The restarted Redis kept nothing (no persistence); the store just
        // works again, once each of its connections is back.
        let mut job = new_job("alice");
        let (_, created) = eventually(|| store.create(job.clone(), None), Result::is_ok)
            .await
            .unwrap();
        assert!(created);
        let mut changes = eventually(|| store.watch(job.id), Result::is_ok).await.unwrap();
        advance(&store, &mut job, JobState::Running).await;
        assert_eq!(next_change(&mut changes).await, job);
    }
}
