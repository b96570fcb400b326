//! The durable outage queue: while PostgreSQL is unreachable, validated and
//! embedded writes go to a Redis stream and are answered WRITE_STATE_QUEUED;
//! a replay worker on every replica applies them through the normal write
//! transaction once PostgreSQL answers again.
//!
//! - One stream entry per WriteAudit/BatchWriteAudit call, so a batch stays
//!   all-or-nothing. Event ids and receipt times are fixed before queueing,
//!   and the write transaction skips events already stored, so an entry
//!   applied twice (a replica crashed between commit and XACK) writes once;
//!   idempotency keys make a client's own retries exactly-once too.
//! - Replicas share one consumer group. Each first retries what it was
//!   delivered and did not apply, then claims entries another replica left
//!   idle past `claim_idle_ms` (it crashed), then reads new ones.
//! - While PostgreSQL stays down, replay backs off exponentially up to
//!   `max_backoff_ms` and nothing counts as an attempt. An entry that fails
//!   for another reason `max_attempts` times moves to the dead-letter stream
//!   (`{prefix}:audit:outage:dead`) with its error, is logged at ERROR and
//!   counted in `datastorage_outage_queue_dead_lettered_total`.
//! - Redis must persist the stream (AOF, `appendfsync everysec` or `always`)
//!   for a queued write to survive a Redis restart; see README.
use std::{collections::HashMap, sync::Arc, time::Duration};

use fred::{
    clients::Client,
    interfaces::{ClientLike, StreamsInterface},
    types::streams::XReadValue,
};
use serde::{Deserialize, Serialize};

use crate::{
    audit::AuditService,
    config::{OutageQueueSettings, RedisSettings},
    error::CoreError,
    jobs::redis::{client_builder, start},
    storage::PreparedWrite,
};

/// One queued write call.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QueuedBatch {
    pub source: String,
    /// The model the embeddings were made with.
    pub model: String,
    pub writes: Vec<PreparedWrite>,
}

const GROUP: &str = "replay";
const BATCH_FIELD: &str = "batch";
/// Entries taken per round trip.
const READ_COUNT: u64 = 16;
/// Pause between polls of an empty queue.
const IDLE_POLL: Duration = Duration::from_millis(250);
const MIN_BACKOFF: Duration = Duration::from_millis(50);

pub struct OutageQueue {
    client: Client,
    stream: String,
    dead_letters: String,
    consumer: String,
    settings: OutageQueueSettings,
}

/// Why a replay round stopped early: retry after a pause.
struct Stalled;

type Entry = XReadValue<String, String, String>;

impl OutageQueue {
    /// Connects without waiting for Redis to be up (enqueueing then fails,
    /// and the write answers UNAVAILABLE as it would without a queue).
    pub async fn connect(redis: &RedisSettings, settings: &OutageQueueSettings) -> anyhow::Result<Self> {
        let client = client_builder(redis)?.build()?;
        start(&client).await;
        let queue = OutageQueue {
            client,
            stream: format!("{}:audit:outage", redis.key_prefix),
            dead_letters: format!("{}:audit:outage:dead", redis.key_prefix),
            consumer: format!("{}-{}", hostname(), uuid::Uuid::new_v4().simple()),
            settings: settings.clone(),
        };
        if queue.client.is_connected() {
            let created: Result<(), _> = queue.client.xgroup_create(&queue.stream, GROUP, "0", true).await;
            if let Err(error) = created.filter_busy_group() {
                tracing::warn!(%error, "creating the outage queue's consumer group");
            }
        }
        Ok(queue)
    }

    /// Whether a write could be queued now (Redis is connected).
    pub fn accepts_writes(&self) -> bool {
        self.client.is_connected()
    }

    pub fn stream_key(&self) -> &str {
        &self.stream
    }

    pub fn dead_letter_key(&self) -> &str {
        &self.dead_letters
    }

    /// Appends a write call; Ok only once Redis has accepted it.
    pub async fn enqueue(&self, batch: &QueuedBatch) -> Result<(), CoreError> {
        let unavailable = |source: anyhow::Error| CoreError::Unavailable {
            what: "outage queue",
            source,
        };
        if !self.client.is_connected() {
            return Err(unavailable(anyhow::anyhow!("not connected to Redis")));
        }
        let json = serde_json::to_string(batch).map_err(|e| CoreError::Internal(e.into()))?;
        let _: String = self
            .client
            .xadd(&self.stream, false, None, "*", vec![(BATCH_FIELD, json)])
            .await
            .map_err(|e| unavailable(e.into()))?;
        metrics::counter!("datastorage_outage_queue_enqueued_total").increment(batch.writes.len() as u64);
        tracing::warn!(
            events = batch.writes.len(),
            "PostgreSQL is unreachable; writes queued for replay"
        );
        Ok(())
    }

    /// Runs until the process ends.
    pub async fn replay(self: Arc<Self>, audit: Arc<AuditService>) {
        let mut backoff = MIN_BACKOFF;
        let mut failures: HashMap<String, u32> = HashMap::new();
        loop {
            match self.replay_round(&audit, &mut failures).await {
                Ok(true) => backoff = MIN_BACKOFF,
                Ok(false) => tokio::time::sleep(IDLE_POLL).await,
                Err(Stalled) => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(self.settings.max_backoff_ms));
                }
            }
        }
    }

    /// Applies one round of entries; Ok(false) when there were none.
    async fn replay_round(&self, audit: &AuditService, failures: &mut HashMap<String, u32>) -> Result<bool, Stalled> {
        if !self.client.is_connected() {
            return Err(Stalled);
        }
        let entries = self.next_entries().await?;
        if entries.is_empty() {
            return Ok(false);
        }
        for (id, fields) in entries {
            let Some(json) = fields.get(BATCH_FIELD) else {
                // Delivered but deleted meanwhile: nothing to apply.
                self.acknowledge(&id).await?;
                continue;
            };
            let outcome = match serde_json::from_str::<QueuedBatch>(json) {
                Ok(batch) => audit.apply_queued(&batch).await.map(|_| batch.writes.len()),
                Err(error) => Err(CoreError::Internal(anyhow::anyhow!("unreadable queued write: {error}"))),
            };
            match outcome {
                Ok(events) => {
                    self.acknowledge(&id).await?;
                    failures.remove(&id);
                    metrics::counter!("datastorage_outage_queue_replayed_total").increment(events as u64);
                    tracing::info!(entry = %id, events, "queued writes applied");
                }
                Err(CoreError::Unavailable { what, .. }) => {
                    tracing::debug!(what, "replay waits for its dependencies");
                    return Err(Stalled);
                }
                Err(error) => {
                    let attempts = failures.entry(id.clone()).or_default();
                    *attempts += 1;
                    metrics::counter!("datastorage_outage_queue_replay_failures_total").increment(1);
                    if *attempts < self.settings.max_attempts {
                        tracing::warn!(entry = %id, attempts = *attempts, %error, "a queued write failed; retrying");
                        return Err(Stalled);
                    }
                    let attempts = *attempts;
                    failures.remove(&id);
                    self.dead_letter(&id, json, &error, attempts).await?;
                }
            }
        }
        Ok(true)
    }

    /// This replica's unacknowledged entries, else entries idle elsewhere,
    /// else new ones.
    async fn next_entries(&self) -> Result<Vec<Entry>, Stalled> {
        let own = self.read_group("0").await?;
        if !own.is_empty() {
            return Ok(own);
        }
        let claimed: (String, Vec<Entry>) = self
            .client
            .xautoclaim_values(
                &self.stream,
                GROUP,
                &self.consumer,
                self.settings.claim_idle_ms,
                "0-0",
                Some(READ_COUNT),
                false,
            )
            .await
            .map_err(|error| self.redis_failed(error))?;
        if !claimed.1.is_empty() {
            return Ok(claimed.1);
        }
        self.read_group(">").await
    }

    async fn read_group(&self, from: &str) -> Result<Vec<Entry>, Stalled> {
        let read = self
            .client
            .xreadgroup_map::<String, String, String, String, _, _, _, _>(
                GROUP,
                &self.consumer,
                Some(READ_COUNT),
                None,
                false,
                &self.stream,
                from,
            )
            .await;
        match read {
            Ok(mut streams) => Ok(streams.remove(&self.stream).unwrap_or_default()),
            Err(error) => Err(self.redis_failed(error)),
        }
    }

    /// Creates the consumer group when Redis says it is missing (first use,
    /// or Redis restarted without persistence).
    fn redis_failed(&self, error: fred::error::Error) -> Stalled {
        if error.details().starts_with("NOGROUP") {
            let client = self.client.clone();
            let stream = self.stream.clone();
            tokio::spawn(async move {
                let created: Result<(), _> = client.xgroup_create(&stream, GROUP, "0", true).await;
                if let Err(error) = created.filter_busy_group() {
                    tracing::debug!(%error, "creating the outage queue's consumer group");
                }
            });
        } else {
            tracing::debug!(%error, "outage queue read failed");
        }
        Stalled
    }

    async fn acknowledge(&self, id: &str) -> Result<(), Stalled> {
        let acked: Result<i64, _> = self.client.xack(&self.stream, GROUP, id).await;
        acked.map_err(|error| self.redis_failed(error))?;
        let deleted: Result<i64, _> = self.client.xdel(&self.stream, id).await;
        deleted.map_err(|error| self.redis_failed(error))?;
        Ok(())
    }

    async fn dead_letter(&self, id: &str, json: &str, error: &CoreError, attempts: u32) -> Result<(), Stalled> {
        let fields = vec![
            (BATCH_FIELD, json.to_owned()),
            ("error", error_chain(error)),
            ("attempts", attempts.to_string()),
            ("entry", id.to_owned()),
        ];
        let added: Result<String, _> = self.client.xadd(&self.dead_letters, false, None, "*", fields).await;
        added.map_err(|error| self.redis_failed(error))?;
        self.acknowledge(id).await?;
        metrics::counter!("datastorage_outage_queue_dead_lettered_total").increment(1);
        tracing::error!(
            entry = %id,
            attempts,
            %error,
            dead_letters = %self.dead_letters,
            "a queued audit write could not be applied and moved to the dead-letter stream"
        );
        Ok(())
    }
}

/// The group exists already when another replica (or an earlier run) made it.
trait IgnoreBusyGroup {
    fn filter_busy_group(self) -> Result<(), fred::error::Error>;
}

impl IgnoreBusyGroup for Result<(), fred::error::Error> {
    fn filter_busy_group(self) -> Result<(), fred::error::Error> {
        match self {
            Err(error) if error.details().starts_with("BUSYGROUP") => Ok(()),
            other => other,
        }
    }
}

/// The dead-letter stream is for operators: it keeps the whole cause.
fn error_chain(error: &CoreError) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text = format!("{text}: {cause}");
        source = cause.source();
    }
    text
}

fn hostname() -> String {
    std::env::var("HOSTNAME").unwrap_or_else(|_| "datastorage".to_owned())
}
