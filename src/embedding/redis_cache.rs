//! The shared (L2) embedding cache in Redis: `{prefix}:emb:{hex of the cache
//! key}` holds the vector as little-endian f32 bytes and expires after
//! `redis.embedding_cache_ttl_secs`.
//!
//! Redis being down or slow must never fail an embedding nor noticeably slow
//! one, so the cache steps aside instead: while disconnected it is not asked
//! at all, a command that fails or times out pauses it for a few seconds (one
//! timeout per pause, not one per embedding), and writes run in the
//! background, a bounded number at a time. Each lookup or write that skipped
//! Redis counts as a bypass.
use std::{
    fmt,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use async_trait::async_trait;
use fred::prelude::{Client, ClientLike, Error as RedisError, Expiration, KeysInterface};
use tokio::{sync::Semaphore, task::AbortHandle};

use super::cache::{CacheKey, SharedEmbeddingCache};
use crate::{config::RedisSettings, jobs::redis as shared_redis};

/// Background writes at most in flight; more are dropped, costing only a
/// later miss, so a slow Redis cannot pile up tasks and memory.
const WRITES_IN_FLIGHT: usize = 64;

/// How long the cache is left alone after a failed command.
const PAUSE_AFTER_FAILURE: Duration = Duration::from_secs(5);

/// At most one warning per this interval, however many embeddings bypass.
const WARNING_INTERVAL: Duration = Duration::from_secs(60);

pub struct RedisEmbeddingCache {
    client: Client,
    key_prefix: String,
    /// Whole seconds, as SET EX takes them.
    ttl_secs: i64,
    health: Arc<Health>,
    write_slots: Arc<Semaphore>,
    /// The connection task, which would otherwise outlive the cache (it
    /// reconnects forever).
    connection: AbortHandle,
}

impl RedisEmbeddingCache {
    /// Connects, waiting briefly; fails only on bad settings, never because
    /// Redis is down.
    pub async fn connect(settings: &RedisSettings) -> anyhow::Result<Self> {
        let client = shared_redis::client_builder(settings)?.build()?;
        let connection = shared_redis::start(&client).await.abort_handle();
        Ok(RedisEmbeddingCache {
            client,
            key_prefix: settings.key_prefix.clone(),
            ttl_secs: i64::try_from(settings.embedding_cache_ttl_secs)
                .context("redis.embedding_cache_ttl_secs is too large")?,
            health: Arc::new(Health::new()),
            write_slots: Arc::new(Semaphore::new(WRITES_IN_FLIGHT)),
            connection,
        })
    }

    /// Lookups and writes that skipped Redis since start-up.
    pub fn bypasses(&self) -> u64 {
        self.health.bypasses.load(Ordering::Relaxed)
    }

    fn redis_key(&self, key: &CacheKey) -> String {
        format!("{}:emb:{}", self.key_prefix, hex::encode(key))
    }
}

impl Drop for RedisEmbeddingCache {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

#[async_trait]
impl SharedEmbeddingCache for RedisEmbeddingCache {
    async fn get_many(&self, keys: &[CacheKey]) -> Vec<Option<Arc<[f32]>>> {
        if keys.is_empty() {
            return Vec::new();
        }
        if let Err(reason) = self.health.check(&self.client) {
            self.health.bypassed(&reason);
            return vec![None; keys.len()];
        }
        let redis_keys: Vec<String> = keys.iter().map(|key| self.redis_key(key)).collect();
        match self.client.mget::<Vec<Option<Vec<u8>>>, _>(redis_keys).await {
            Ok(values) => {
                let mut vectors: Vec<_> = values.iter().map(|value| value.as_deref().and_then(decode)).collect();
                // One answer per key, whatever came back.
                vectors.resize(keys.len(), None);
                vectors
            }
            Err(error) => {
                self.health.failed(&error);
                vec![None; keys.len()]
            }
        }
    }

    fn put_many(&self, entries: Vec<(CacheKey, Arc<[f32]>)>) {
        if entries.is_empty() {
            return;
        }
        if let Err(reason) = self.health.check(&self.client) {
            self.health.bypassed(&reason);
            return;
        }
        let Ok(slot) = self.write_slots.clone().try_acquire_owned() else {
            self.health.bypassed(&"too many cache writes in flight");
            return;
        };
        let entries: Vec<(String, Vec<u8>)> = entries
            .into_iter()
            .map(|(key, vector)| (self.redis_key(&key), encode(&vector)))
            .collect();
        let (pipeline, expiry, health) = (self.client.pipeline(), self.ttl_secs, self.health.clone());
        tokio::spawn(async move {
            let _slot = slot;
            for (key, value) in entries {
                // Queues the command locally; the pipeline sends them all at once.
                let _: Result<(), _> = pipeline
                    .set(key, value, Some(Expiration::EX(expiry)), None, false)
                    .await;
            }
            if let Err(error) = pipeline.all::<()>().await {
                health.failed(&error);
            }
        });
    }
}

fn encode(vector: &[f32]) -> Vec<u8> {
    vector.iter().flat_map(|value| value.to_le_bytes()).collect()
}

/// None for bytes that cannot be a vector (another writer, a torn value):
/// the entry then counts as a miss.
fn decode(bytes: &[u8]) -> Option<Arc<[f32]>> {
    if bytes.is_empty() || !bytes.len().is_multiple_of(4) {
        return None;
    }
    Some(
        bytes
            .chunks_exact(4)
            .map(|chunk| f32::from_le_bytes(chunk.try_into().expect("chunks of 4")))
            .collect(),
    )
}

/// Whether the cache is worth asking, and the count of times it was not.
/// Times are milliseconds since `started`, so they fit atomics.
struct Health {
    started: Instant,
    paused_until_ms: AtomicU64,
    next_warning_ms: AtomicU64,
    bypasses: AtomicU64,
}

impl Health {
    fn new() -> Self {
        Health {
            started: Instant::now(),
            paused_until_ms: AtomicU64::new(0),
            next_warning_ms: AtomicU64::new(0),
            bypasses: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn check(&self, client: &Client) -> Result<(), &'static str> {
        if !client.is_connected() {
            Err("not connected to Redis")
        } else if self.now_ms() < self.paused_until_ms.load(Ordering::Relaxed) {
            Err("paused after a failed command")
        } else {
            Ok(())
        }
    }

    fn failed(&self, error: &RedisError) {
        self.paused_until_ms.store(
            self.now_ms() + PAUSE_AFTER_FAILURE.as_millis() as u64,
            Ordering::Relaxed,
        );
        self.bypassed(error);
    }

    fn bypassed(&self, reason: &dyn fmt::Display) {
        let bypasses = self.bypasses.fetch_add(1, Ordering::Relaxed) + 1;
        let now = self.now_ms();
        let next_warning = self.next_warning_ms.load(Ordering::Relaxed);
        // Whoever wins the exchange warns; everyone else in the interval stays quiet.
        if now >= next_warning
            && self
                .next_warning_ms
                .compare_exchange(
                    next_warning,
                    now + WARNING_INTERVAL.as_millis() as u64,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            tracing::warn!(
                bypasses,
                reason = %reason,
                "shared embedding cache bypassed; embedding without it"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectors_survive_the_byte_encoding() {
        let vector = [0.25f32, -1.5, f32::MIN_POSITIVE, 3.0e7];
        assert_eq!(decode(&encode(&vector)).as_deref(), Some(&vector[..]));
    }

    #[test]
    fn bytes_that_are_not_a_vector_are_a_miss() {
        assert_eq!(decode(&[]), None);
        assert_eq!(decode(&[0, 0, 128, 63, 0]), None);
    }

    #[test]
    fn every_bypass_counts_and_the_next_warning_waits_an_interval() {
        let health = Health::new();
        for _ in 0..5 {
            health.bypassed(&"down");
        }
        assert_eq!(health.bypasses.load(Ordering::Relaxed), 5);
        assert!(health.next_warning_ms.load(Ordering::Relaxed) >= WARNING_INTERVAL.as_millis() as u64);
    }
}
