//! Per-caller rate limits: a token bucket (GCRA) per (scope, caller).
//!
//! Each replica limits on its own by default ([`LocalRateLimiter`], governor).
//! With `rate_limit.shared` the buckets live in Redis ([`RedisRateLimiter`]),
//! so N replicas grant a caller its rate once, not N times; while Redis is
//! unreachable the local buckets take over rather than refusing everyone.
use std::{collections::HashMap, num::NonZeroU32, sync::LazyLock, time::Duration};

use anyhow::Context;
use fred::{
    prelude::{Client, ClientLike},
    types::{scripts::Script, ConnectHandle},
};
use governor::{clock::Clock, DefaultKeyedRateLimiter, Quota};

use crate::{
    auth::Scope,
    config::{RateLimitSettings, RateSettings, RedisSettings},
    jobs::redis as shared_redis,
};

/// A refusal: the caller may try again after this long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryAfter(pub Duration);

#[async_trait::async_trait]
pub trait RateLimiter: Send + Sync {
    /// Takes one call from `caller`'s bucket for `scope`.
    async fn check(&self, caller: &str, scope: Scope) -> Result<(), RetryAfter>;
}

/// Builds the limiter the settings ask for (`None` when limits are off).
pub async fn from_settings(
    settings: &RateLimitSettings,
    redis: &RedisSettings,
) -> anyhow::Result<Option<std::sync::Arc<dyn RateLimiter>>> {
    if !settings.enabled {
        return Ok(None);
    }
    let local = LocalRateLimiter::new(settings);
    Ok(Some(if settings.shared {
        std::sync::Arc::new(RedisRateLimiter::connect(settings, redis, local).await?)
    } else {
        std::sync::Arc::new(local)
    }))
}

fn rate_of(settings: &RateLimitSettings, scope: Scope) -> RateSettings {
    settings.scopes.get(scope.as_str()).copied().unwrap_or(RateSettings {
        requests_per_second: settings.requests_per_second,
        burst: settings.burst,
    })
}

/// Buckets kept in this process.
pub struct LocalRateLimiter {
    buckets: HashMap<Scope, DefaultKeyedRateLimiter<String>>,
    checks: std::sync::atomic::AtomicU64,
}

/// Every this many checks, the buckets of idle callers are dropped (a full
/// bucket is the same as none), so a stream of distinct subjects cannot
/// grow memory without bound. Not on every check: that scans every shard.
const FORGET_IDLE_EVERY: u64 = 4096;

impl LocalRateLimiter {
    pub fn new(settings: &RateLimitSettings) -> Self {
        let buckets = Scope::ALL
            .into_iter()
            .map(|scope| {
                let rate = rate_of(settings, scope);
                let quota = Quota::per_second(NonZeroU32::new(rate.requests_per_second).unwrap_or(NonZeroU32::MIN))
                    .allow_burst(NonZeroU32::new(rate.burst).unwrap_or(NonZeroU32::MIN));
                (scope, DefaultKeyedRateLimiter::keyed(quota))
            })
            .collect();
        LocalRateLimiter {
            buckets,
            checks: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn take(&self, caller: &str, scope: Scope) -> Result<(), RetryAfter> {
        let bucket = &self.buckets[&scope];
        let checks = self.checks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if (checks + 1).is_multiple_of(FORGET_IDLE_EVERY) {
            self.buckets.values().for_each(|bucket| bucket.retain_recent());
        }
        bucket
            .check_key(&caller.to_owned())
            .map_err(|not_until| RetryAfter(not_until.wait_time_from(governor::clock::DefaultClock::default().now())))
    }
}

#[async_trait::async_trait]
impl RateLimiter for LocalRateLimiter {
    async fn check(&self, caller: &str, scope: Scope) -> Result<(), RetryAfter> {
        self.take(caller, scope)
    }
}

/// GCRA in one atomic script: the key holds the bucket's theoretical arrival
/// time (TAT) in microseconds of Redis' own clock, so replicas' clocks never
/// disagree. Returns 0 when admitted, else the microseconds to wait.
static GCRA: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        r#"
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) * 1000000 + tonumber(now_parts[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - tolerance
if allow_at > now then
  return allow_at - now
end
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil((new_tat - now) / 1000) + 1)
return 0
"#,
    )
});

pub struct RedisRateLimiter {
    client: Client,
    key_prefix: String,
    /// (emission interval, burst tolerance) in microseconds per scope.
    timings: HashMap<Scope, (u64, u64)>,
    fallback: LocalRateLimiter,
    connection: ConnectHandle,
}

impl RedisRateLimiter {
    pub async fn connect(
        settings: &RateLimitSettings,
        redis: &RedisSettings,
        fallback: LocalRateLimiter,
    ) -> anyhow::Result<Self> {
        let client = shared_redis::client_builder(redis)?
            .build()
            .context("configuring the Redis rate limiter")?;
        let connection = shared_redis::start(&client).await;
        let timings = Scope::ALL
            .into_iter()
            .map(|scope| {
                let rate = rate_of(settings, scope);
                // At least 1 µs: faster rates than a million a second are not limited finer.
                let interval = (1_000_000 / u64::from(rate.requests_per_second.max(1))).max(1);
                (scope, (interval, interval * u64::from(rate.burst.max(1))))
            })
            .collect();
        Ok(RedisRateLimiter {
            client,
            key_prefix: redis.key_prefix.clone(),
            timings,
            fallback,
            connection,
        })
    }
}

impl Drop for RedisRateLimiter {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

#[async_trait::async_trait]
impl RateLimiter for RedisRateLimiter {
    async fn check(&self, caller: &str, scope: Scope) -> Result<(), RetryAfter> {
        let (interval, tolerance) = self.timings[&scope];
        // Callers are subjects (service-account names); hex keeps the key
        // free of the separators they contain.
        let key = format!("{}:ratelimit:{}:{}", self.key_prefix, scope, hex::encode(caller));
        if !self.client.is_connected() {
            return self.fallback.take(caller, scope);
        }
        let answer: Result<u64, _> = GCRA
            .evalsha_with_reload(
                &self.client,
                vec![key],
                vec![interval.to_string(), tolerance.to_string()],
            )
            .await;
        match answer {
            Ok(0) => Ok(()),
            Ok(wait_micros) => Err(RetryAfter(Duration::from_micros(wait_micros))),
            Err(error) => {
                tracing::debug!(%error, "shared rate limit unavailable; limiting locally");
                self.fallback.take(caller, scope)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn settings(per_second: u32, burst: u32) -> RateLimitSettings {
        RateLimitSettings {
            enabled: true,
            requests_per_second: per_second,
            burst,
            scopes: BTreeMap::from([(
                "search:read".to_owned(),
                RateSettings {
                    requests_per_second: 1,
                    burst: 1,
                },
            )]),
            shared: false,
        }
    }

    #[test]
    fn a_burst_is_granted_then_refused_with_a_wait_per_caller_and_scope() {
        let limiter = LocalRateLimiter::new(&settings(1, 3));
        for _ in 0..3 {
            limiter.take("gateway", Scope::AuditWrite).expect("within the burst");
        }
        let RetryAfter(wait) = limiter.take("gateway", Scope::AuditWrite).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(1), "{wait:?}");
        limiter
            .take("dashboard", Scope::AuditWrite)
            .expect("another caller has its own bucket");
        limiter
            .take("gateway", Scope::SearchRead)
            .expect("another scope has its own bucket");
        limiter
            .take("gateway", Scope::SearchRead)
            .expect_err("search:read has its own, smaller rate");
    }
}
