//! The job store shared by every replica, in Redis. All keys and channels
//! live under `{prefix}:`:
//!
//! - `job:{id}`: the record as JSON; no TTL while the job runs, expiring at
//!   its `expires_at` once terminal.
//! - `jobs`: the listing index, a sorted set of ids scored by created_at in
//!   milliseconds. `jobs-expiring` holds the finished ones scored by expiry,
//!   so creates can drop expired ids from the listing without scanning it.
//! - `job-request:{len(created_by)}:{created_by}:{request_id}`: the id of the
//!   job a request created (idempotent create). The length keeps
//!   ("a:b", "c") and ("a", "b:c") apart.
//! - `job:{id}:cancel`: the cancellation flag, apart from the record so
//!   progress updates never overwrite it.
//! - `job:{id}:changes`: the pub/sub channel each stored change goes out on.
//! - `lock:{name}`: a lock, holding its owner's random token.
//!
//! Every change that must be atomic (create with its request id, the
//! versioned update with its publish, lock renewal and release) is a Lua
//! script. A Redis failure or timeout is `JobStoreError::Unavailable`, and
//! the client reconnects by itself, so the store recovers when Redis does.
use std::{
    collections::{HashMap, HashSet},
    pin::Pin,
    sync::{Arc, LazyLock, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use anyhow::Context as _;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use fred::{
    prelude::{
        Builder, Client, ClientLike, Config, Error as RedisError, ErrorKind, EventInterface, Expiration, FromValue,
        KeysInterface, PubsubInterface, ReconnectPolicy, Server, SetOptions, SortedSetsInterface,
    },
    types::{scripts::Script, sorted_sets::ZRange, ConnectHandle, Message, Value},
};
use secrecy::ExposeSecret;
use tokio::{
    sync::broadcast::{self, error::RecvError},
    task::AbortHandle,
};
use tokio_stream::Stream;
use uuid::Uuid;

use super::store::{
    newest_first, stored_form, watch_stream, JobChanges, JobCursor, JobListFilter, JobRecord, JobStore, JobStoreError,
    LockToken, FINISHED_JOB_TTL, REQUEST_ID_TTL, WATCH_BACKLOG,
};
use crate::config::RedisSettings;

/// How long one connection attempt (TCP and handshake) may take, and how long
/// start-up waits for the first one before going on without Redis.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Pub/sub messages the subscriber connection buffers for the change router.
/// Overflowing it drops changes, which ends every watch (see `route_changes`).
const SUBSCRIBER_BACKLOG: usize = 1024;

/// Listing-index members read per round trip while listing.
const LIST_CHUNK: usize = 256;

/// Finished jobs a create drops from the listing index at most, so one create
/// after a long quiet spell stays quick; the rest go with the next creates.
const EXPIRED_PER_CREATE: usize = 100;

/// A fred client builder for `settings`, shared with the embedding cache so
/// both use Redis alike: the command timeout from the settings, reconnection
/// forever with backoff, and a start that does not wait for Redis to be up.
pub(crate) fn client_builder(settings: &RedisSettings) -> anyhow::Result<Builder> {
    let url = settings.url.as_ref().context("redis.url is not set")?.expose_secret();
    anyhow::ensure!(
        url.starts_with("redis://"),
        "redis.url must be a redis:// URL: this build has no TLS for Redis"
    );
    let mut config = Config::from_url(url).context("redis.url is not a valid Redis URL")?;
    // Go on while Redis is down: the first connection retries like any later one.
    config.fail_fast = false;
    let command_timeout = Duration::from_millis(settings.command_timeout_ms);
    let mut builder = Builder::from_config(config);
    builder
        .with_performance_config(|performance| performance.default_command_timeout = command_timeout)
        .with_connection_config(|connection| {
            connection.connection_timeout = CONNECT_TIMEOUT;
            connection.internal_command_timeout = CONNECT_TIMEOUT;
            // A command cut off by a lost connection fails rather than running
            // again on the next one: a replayed update would then see its own
            // write and report a false Conflict.
            connection.max_command_attempts = 1;
        })
        .set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2));
    Ok(builder)
}

/// Starts `client`'s connection task and waits up to CONNECT_TIMEOUT for the
/// first connection. Redis being down is logged, not an error: the task keeps
/// reconnecting, and calls fail fast until it succeeds.
pub(crate) async fn start(client: &Client) -> ConnectHandle {
    let connection = client.connect();
    // Polled: fred's `wait_for_connect` misses a connection made between its
    // state check and its subscription to connection events.
    let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
    while !client.is_connected() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if !client.is_connected() {
        tracing::warn!(
            timeout = ?CONNECT_TIMEOUT,
            "Redis is unreachable; going on without it and reconnecting in the background"
        );
    }
    connection
}

fn redis_error(error: RedisError) -> JobStoreError {
    match error.kind() {
        // A reply of an unexpected shape is a bug here, not an outage.
        ErrorKind::Parse => JobStoreError::Internal(error.into()),
        _ => JobStoreError::Unavailable(error.into()),
    }
}

fn to_json(job: &JobRecord) -> Result<String, JobStoreError> {
    serde_json::to_string(job).map_err(|error| JobStoreError::Internal(error.into()))
}

fn from_json(json: &str) -> Result<JobRecord, JobStoreError> {
    serde_json::from_str(json)
        .context("stored job record is unreadable")
        .map_err(JobStoreError::Internal)
}

/// The listing index's score: created_at in whole milliseconds, exact in an f64.
fn listing_score(created_at: DateTime<Utc>) -> f64 {
    created_at.timestamp_millis() as f64
}

/// Creates the record and its listing entry, unless the request id already
/// created a job: then it returns that job's id and changes nothing.
static CREATE: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        r#"
-- KEYS: record, listing index, expiry index, [request id]
-- ARGV: job id, record JSON, listing score, now (ms), request id TTL (ms), most expired ids to drop
if KEYS[4] and not redis.call('SET', KEYS[4], ARGV[1], 'NX', 'PX', ARGV[5]) then
  return redis.call('GET', KEYS[4])
end
local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', ARGV[4], 'LIMIT', 0, ARGV[6])
if #expired > 0 then
  redis.call('ZREM', KEYS[2], unpack(expired))
  redis.call('ZREM', KEYS[3], unpack(expired))
end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
return false
"#,
    )
});

/// Compare-and-set on the stored version, then publish: 1 when stored, 0 on
/// a conflict (including no stored record).
static UPDATE: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        r#"
-- KEYS: record, expiry index
-- ARGV: job id, record JSON, version the stored record must have, expiry (ms; '' while running), change channel
local stored = redis.call('GET', KEYS[1])
if not stored or cjson.decode(stored).version ~= tonumber(ARGV[3]) then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2])
if ARGV[4] ~= '' then
  redis.call('PEXPIREAT', KEYS[1], ARGV[4])
  redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
else
  redis.call('ZREM', KEYS[2], ARGV[1])
end
redis.call('PUBLISH', ARGV[5], ARGV[2])
return 1
"#,
    )
});

/// Extends a lock if the caller still owns it: 1 when extended, else 0.
static RENEW_LOCK: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"#,
    )
});

/// Deletes a lock if the caller still owns it.
static RELEASE_LOCK: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#,
    )
});

struct KeyNames {
    prefix: String,
}

impl KeyNames {
    fn job(&self, id: impl std::fmt::Display) -> String {
        format!("{}:job:{id}", self.prefix)
    }

    fn listing(&self) -> String {
        format!("{}:jobs", self.prefix)
    }

    fn expiring(&self) -> String {
        format!("{}:jobs-expiring", self.prefix)
    }

    fn request(&self, created_by: &str, request_id: &str) -> String {
        format!(
            "{}:job-request:{}:{created_by}:{request_id}",
            self.prefix,
            created_by.len()
        )
    }

    fn cancel(&self, id: Uuid) -> String {
        format!("{}:job:{id}:cancel", self.prefix)
    }

    fn changes(&self, id: Uuid) -> String {
        format!("{}:job:{id}:changes", self.prefix)
    }

    fn lock(&self, name: &str) -> String {
        format!("{}:lock:{name}", self.prefix)
    }
}

pub struct RedisJobStore {
    client: Client,
    keys: KeyNames,
    watches: Arc<Watches>,
    /// The connection tasks and the change router, which would otherwise
    /// outlive the store (they reconnect forever).
    background: Vec<AbortHandle>,
}

impl RedisJobStore {
    /// Connects the command and subscriber connections, waiting briefly for
    /// them; fails only on bad settings, never because Redis is down.
    pub async fn connect(settings: &RedisSettings) -> anyhow::Result<Self> {
        let client = client_builder(settings)?.build()?;
        let subscriber = client_builder(settings)?
            .with_performance_config(|performance| performance.broadcast_channel_capacity = SUBSCRIBER_BACKLOG)
            .build()?;
        let (commands, subscriptions) = tokio::join!(start(&client), start(&subscriber));
        let watches = Arc::new(Watches {
            subscriber: subscriber.clone(),
            subscribing: tokio::sync::Mutex::new(()),
            routes: Mutex::new(HashMap::new()),
        });
        let router = tokio::spawn(route_changes(
            watches.clone(),
            subscriber.message_rx(),
            subscriber.error_rx(),
        ));
        Ok(RedisJobStore {
            client,
            keys: KeyNames {
                prefix: settings.key_prefix.clone(),
            },
            watches,
            background: vec![
                commands.abort_handle(),
                subscriptions.abort_handle(),
                router.abort_handle(),
            ],
        })
    }

    /// Fails at once while disconnected instead of queueing the command until
    /// the command timeout: a job RPC should answer UNAVAILABLE promptly.
    fn connected(&self) -> Result<&Client, JobStoreError> {
        if self.client.is_connected() {
            Ok(&self.client)
        } else {
            Err(JobStoreError::Unavailable(anyhow::anyhow!("not connected to Redis")))
        }
    }

    /// Runs `script` by hash, loading it first if Redis does not know it (as
    /// after a restart).
    async fn run<R: FromValue>(
        &self,
        script: &Script,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> Result<R, JobStoreError> {
        script
            .evalsha_with_reload(self.connected()?, keys, args)
            .await
            .map_err(redis_error)
    }

    /// One chunk of listing-index members, newest first, with scores at most
    /// `upper` (all when None), skipping the first `skip`.
    async fn listing_chunk(&self, upper: Option<f64>, skip: usize) -> Result<Vec<(String, f64)>, JobStoreError> {
        let upper: ZRange = match upper {
            Some(score) => score.try_into().map_err(redis_error)?,
            None => "+inf".into(),
        };
        self.connected()?
            .zrevrangebyscore(
                self.keys.listing(),
                upper,
                "-inf",
                true,
                Some((skip as i64, LIST_CHUNK as i64)),
            )
            .await
            .map_err(redis_error)
    }
}

impl Drop for RedisJobStore {
    fn drop(&mut self) {
        for task in &self.background {
            task.abort();
        }
    }
}

#[async_trait]
impl JobStore for RedisJobStore {
    #[tracing::instrument(skip_all, fields(job = %job.id))]
    async fn create(&self, job: JobRecord, request_id: Option<&str>) -> Result<(JobRecord, bool), JobStoreError> {
        let mut keys = vec![self.keys.job(job.id), self.keys.listing(), self.keys.expiring()];
        if let Some(request_id) = request_id {
            keys.push(self.keys.request(&job.created_by, request_id));
        }
        let args = vec![
            job.id.to_string(),
            to_json(&job)?,
            job.created_at.timestamp_millis().to_string(),
            Utc::now().timestamp_millis().to_string(),
            REQUEST_ID_TTL.as_millis().to_string(),
            EXPIRED_PER_CREATE.to_string(),
        ];
        let Some(first_id) = self.run::<Option<String>>(&CREATE, keys, args).await? else {
            return Ok((job, true));
        };
        let first_id: Uuid = first_id
            .parse()
            .context("request id maps to an unreadable job id")
            .map_err(JobStoreError::Internal)?;
        match self.get(first_id).await? {
            Some(first) => Ok((first, false)),
            // The request id outlives no record it points to unless Redis evicted it.
            None => Err(JobStoreError::Internal(anyhow::anyhow!(
                "job {first_id}, created for this request id, is gone"
            ))),
        }
    }

    #[tracing::instrument(skip_all, fields(job = %id))]
    async fn get(&self, id: Uuid) -> Result<Option<JobRecord>, JobStoreError> {
        let json: Option<String> = self.connected()?.get(self.keys.job(id)).await.map_err(redis_error)?;
        json.as_deref().map(from_json).transpose()
    }

    /// Reads the listing index newest first in chunks until the page is
    /// settled. Ties within a millisecond are ordered exactly by re-sorting:
    /// a match is settled once its millisecond is above the lowest score read,
    /// since every unread member scores at most that.
    #[tracing::instrument(skip_all, fields(limit = limit))]
    async fn list(
        &self,
        filter: &JobListFilter,
        after: Option<JobCursor>,
        limit: usize,
    ) -> Result<Vec<JobRecord>, JobStoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut matches = Vec::new();
        let mut expired = Vec::new();
        let mut seen = HashSet::new();
        let mut upper = after.map(|cursor| listing_score(cursor.created_at));
        let mut read_at_upper = 0;
        loop {
            let members = self.listing_chunk(upper, read_at_upper).await?;
            let Some(&(_, lowest)) = members.last() else {
                break;
            };
            let at_lowest = members.iter().rev().take_while(|(_, score)| *score == lowest).count();
            // Continue below the lowest score read, past the members already
            // read at it. Members added meanwhile at that score can shift a
            // few back into view; `seen` drops them.
            if upper == Some(lowest) {
                read_at_upper += at_lowest;
            } else {
                upper = Some(lowest);
                read_at_upper = at_lowest;
            }
            let ids: Vec<String> = members.iter().map(|(id, _)| id.clone()).collect();
            let job_keys: Vec<String> = ids.iter().map(|id| self.keys.job(id)).collect();
            let records: Vec<Option<String>> = self.connected()?.mget(job_keys).await.map_err(redis_error)?;
            for (id, record) in ids.into_iter().zip(records) {
                let Some(json) = record else {
                    expired.push(id);
                    continue;
                };
                let job = from_json(&json)?;
                if seen.insert(job.id) && after.is_none_or(|cursor| cursor.precedes(&job)) && filter.matches(&job) {
                    matches.push(job);
                }
            }
            let settled = matches
                .iter()
                .filter(|job| listing_score(job.created_at) > lowest)
                .count();
            if members.len() < LIST_CHUNK || settled >= limit {
                break;
            }
        }
        if !expired.is_empty() {
            // Tidying only, so a failure is not the listing's: an id left
            // behind is skipped again next time.
            if let Ok(client) = self.connected() {
                let _: Result<i64, _> = client.zrem(self.keys.listing(), expired).await;
            }
        }
        matches.sort_by(newest_first);
        matches.truncate(limit);
        Ok(matches)
    }

    #[tracing::instrument(skip_all, fields(job = %job.id, version = job.version))]
    async fn update(&self, job: &JobRecord) -> Result<(), JobStoreError> {
        let previous = job.version.checked_sub(1).ok_or(JobStoreError::Conflict(job.id))?;
        let stored = stored_form(job, Utc::now());
        let expiry = stored
            .expires_at
            .map(|at| at.timestamp_millis().to_string())
            .unwrap_or_default();
        let keys = vec![self.keys.job(job.id), self.keys.expiring()];
        let args = vec![
            job.id.to_string(),
            to_json(&stored)?,
            previous.to_string(),
            expiry,
            self.keys.changes(job.id),
        ];
        match self.run::<i64>(&UPDATE, keys, args).await? {
            1 => Ok(()),
            _ => Err(JobStoreError::Conflict(job.id)),
        }
    }

    #[tracing::instrument(skip_all, fields(job = %id))]
    async fn request_cancel(&self, id: Uuid) -> Result<(), JobStoreError> {
        // The flag lapses like a finished record, so one set for a job that
        // never looks at it does not stay forever.
        let expiry = Expiration::PX(FINISHED_JOB_TTL.as_millis() as i64);
        self.connected()?
            .set::<(), _, _>(self.keys.cancel(id), "1", Some(expiry), None, false)
            .await
            .map_err(redis_error)
    }

    #[tracing::instrument(skip_all, fields(job = %id))]
    async fn cancel_requested(&self, id: Uuid) -> Result<bool, JobStoreError> {
        let flags: i64 = self
            .connected()?
            .exists(self.keys.cancel(id))
            .await
            .map_err(redis_error)?;
        Ok(flags > 0)
    }

    #[tracing::instrument(skip_all, fields(job = %id))]
    async fn watch(&self, id: Uuid) -> Result<JobChanges, JobStoreError> {
        let channel = self.keys.changes(id);
        let changes = self.watches.subscribe(&channel).await?;
        Ok(Box::pin(WatchStream {
            changes: watch_stream(changes),
            _release: ReleaseOnDrop {
                watches: self.watches.clone(),
                channel,
            },
        }))
    }

    #[tracing::instrument(skip_all, fields(lock = name))]
    async fn try_lock(&self, name: &str, ttl: Duration) -> Result<Option<LockToken>, JobStoreError> {
        let owner = Uuid::new_v4().to_string();
        let taken: Option<String> = self
            .connected()?
            .set(
                self.keys.lock(name),
                owner.as_str(),
                Some(Expiration::PX(lock_ttl_ms(ttl))),
                Some(SetOptions::NX),
                false,
            )
            .await
            .map_err(redis_error)?;
        Ok(taken.map(|_| LockToken {
            name: name.to_owned(),
            owner,
        }))
    }

    #[tracing::instrument(skip_all, fields(lock = %lock.name))]
    async fn renew_lock(&self, lock: &LockToken, ttl: Duration) -> Result<bool, JobStoreError> {
        let renewed: i64 = self
            .run(
                &RENEW_LOCK,
                vec![self.keys.lock(&lock.name)],
                vec![lock.owner.clone(), lock_ttl_ms(ttl).to_string()],
            )
            .await?;
        Ok(renewed == 1)
    }

    #[tracing::instrument(skip_all, fields(lock = %lock.name))]
    async fn release_lock(&self, lock: &LockToken) -> Result<(), JobStoreError> {
        self.run::<i64>(
            &RELEASE_LOCK,
            vec![self.keys.lock(&lock.name)],
            vec![lock.owner.clone()],
        )
        .await
        .map(|_| ())
    }
}

/// Redis refuses a zero expiry, so a lock lives at least a millisecond.
fn lock_ttl_ms(ttl: Duration) -> i64 {
    ttl.as_millis().clamp(1, i64::MAX as u128) as i64
}

/// The store's one subscriber connection, shared by all its watches: one
/// SUBSCRIBE per watched job, fanned out in-process to that job's watchers.
struct Watches {
    subscriber: Client,
    /// Held across SUBSCRIBE and UNSUBSCRIBE, so a second watch of a job never
    /// returns before the first one's subscription is confirmed, and a late
    /// release never unsubscribes a channel a new watch has just taken up.
    subscribing: tokio::sync::Mutex<()>,
    /// Channel → fan-out to its watchers.
    routes: Mutex<HashMap<String, broadcast::Sender<JobRecord>>>,
}

impl Watches {
    fn routes(&self) -> std::sync::MutexGuard<'_, HashMap<String, broadcast::Sender<JobRecord>>> {
        self.routes.lock().expect("watch routes lock")
    }

    async fn subscribe(&self, channel: &str) -> Result<broadcast::Receiver<JobRecord>, JobStoreError> {
        if !self.subscriber.is_connected() {
            return Err(JobStoreError::Unavailable(anyhow::anyhow!(
                "subscriber not connected to Redis"
            )));
        }
        let _subscribing = self.subscribing.lock().await;
        if let Some(route) = self.routes().get(channel) {
            return Ok(route.subscribe());
        }
        // Routed before SUBSCRIBE so no message can arrive unrouted.
        let (route, changes) = broadcast::channel(WATCH_BACKLOG);
        self.routes().insert(channel.to_owned(), route);
        if let Err(error) = self.subscriber.subscribe(channel).await {
            self.routes().remove(channel);
            return Err(redis_error(error));
        }
        Ok(changes)
    }

    /// Unsubscribes `channel` if nobody watches it any more.
    async fn release(&self, channel: String) {
        let _subscribing = self.subscribing.lock().await;
        let unwatched = {
            let mut routes = self.routes();
            match routes.get(&channel) {
                Some(route) if route.receiver_count() > 0 => false,
                _ => {
                    routes.remove(&channel);
                    true
                }
            }
        };
        // A lost connection took its subscriptions along; nothing to undo then.
        if unwatched && self.subscriber.is_connected() {
            if let Err(error) = self.subscriber.unsubscribe(channel).await {
                // A leftover subscription is released again when its next message finds no route.
                tracing::debug!(%error, "unsubscribing an unwatched job failed");
            }
        }
    }

    fn deliver(self: &Arc<Self>, message: Message) {
        let channel = message.channel.to_string();
        let Some(route) = self.routes().get(&channel).cloned() else {
            // Left over from a SUBSCRIBE that timed out or an UNSUBSCRIBE that failed.
            let watches = self.clone();
            tokio::spawn(async move { watches.release(channel).await });
            return;
        };
        match parse_change(message.value) {
            // No receivers left is fine: their release is on its way.
            Ok(change) => {
                let _ = route.send(change);
            }
            Err(error) => tracing::warn!(channel, error = %error, "ignoring an unreadable job change"),
        }
    }

    /// Ends every watch stream. Their subscriptions are gone, or lingering
    /// ones are released when their next message finds no route.
    fn end_all(&self) {
        self.routes().clear();
    }
}

fn parse_change(value: Value) -> anyhow::Result<JobRecord> {
    let json = String::from_value(value)?;
    Ok(serde_json::from_str(&json)?)
}

/// Hands each pub/sub message to the watchers of its job, until the store
/// is dropped.
async fn route_changes(
    watches: Arc<Watches>,
    mut messages: broadcast::Receiver<Message>,
    mut errors: broadcast::Receiver<(RedisError, Option<Server>)>,
) {
    loop {
        tokio::select! {
            message = messages.recv() => match message {
                Ok(message) => watches.deliver(message),
                // Changes were dropped and there is no telling whose: every
                // watch ends so its watcher reads its job again.
                Err(RecvError::Lagged(_)) => watches.end_all(),
                Err(RecvError::Closed) => return,
            },
            error = errors.recv() => match error {
                // The subscriber connection broke, and its subscriptions with
                // it: changes made until it is back would go unseen.
                Ok(_) | Err(RecvError::Lagged(_)) => watches.end_all(),
                Err(RecvError::Closed) => return,
            },
        }
    }
}

struct WatchStream {
    changes: JobChanges,
    _release: ReleaseOnDrop,
}

impl Stream for WatchStream {
    type Item = JobRecord;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<JobRecord>> {
        self.changes.as_mut().poll_next(cx)
    }
}

/// Releases a watch's subscription once its stream is dropped. A field after
/// `changes` in `WatchStream`, so the receiver is already gone when the
/// release counts the remaining watchers.
struct ReleaseOnDrop {
    watches: Arc<Watches>,
    channel: String,
}

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        // Outside a runtime the process is ending and the connection with it.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let watches = self.watches.clone();
            let channel = std::mem::take(&mut self.channel);
            runtime.spawn(async move { watches.release(channel).await });
        }
    }
}
