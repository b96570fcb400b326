//! What the benchmarks share: deterministic data, environment knobs and
//! latency figures.
// Each bench binary compiles this module on its own and uses a subset of it.
#![allow(dead_code)]

use std::time::Duration;

use chrono::{DateTime, Utc};
use datastorage::{
    config::{LogFormat, Settings},
    proto::v1 as pb,
};
use hdrhistogram::Histogram;
use secrecy::SecretString;

pub mod load;
pub mod reference;

/// The `source` of seeded events: the caller a server with `auth.disabled` records.
pub const BENCH_SOURCE: &str = "anonymous";

/// A bench server's settings: loopback on ephemeral ports, no
/// authentication and no rate limit (the load is the bench's own), pretty
/// logs, and no shutdown drain (no load balancer routes to it).
pub fn server_settings(url: &str, model_dir: &str) -> Settings {
    let mut settings = Settings::default();
    settings.grpc.host = [127, 0, 0, 1].into();
    settings.grpc.port = 0;
    settings.http.host = [127, 0, 0, 1].into();
    settings.http.port = 0;
    settings.auth.disabled = true;
    settings.rate_limit.enabled = false;
    settings.database.url = SecretString::from(url.to_owned());
    settings.embedding.model_dir = model_dir.into();
    settings.log.format = LogFormat::Pretty;
    settings.shutdown.drain_delay_ms = 0;
    settings
}

/// An event of incident `rr` (correlation id `corr-<rr>`) that happened a
/// minute ago in cluster `prod`.
pub fn recent_event(rr: String, namespace: String, payload: pb::audit_event::Payload) -> pb::AuditEvent {
    pb::AuditEvent {
        correlation_id: format!("corr-{rr}"),
        remediation_request_id: rr,
        occurred_at: Some(prost_types::Timestamp {
            seconds: Utc::now().timestamp() - 60,
            nanos: 0,
        }),
        namespace,
        cluster: "prod".into(),
        labels: Default::default(),
        parent_event_id: String::new(),
        payload: Some(payload),
    }
}

/// A recent HighMemoryUsage remediation event of incident `rr` in namespace
/// `payments`; `message` is its text.
pub fn remediation_event(rr: String, message: String) -> pb::AuditEvent {
    recent_event(
        rr,
        "payments".into(),
        pb::audit_event::Payload::Remediation(pb::RemediationAudit {
            signal_type: "prometheus-alert".into(),
            signal_name: "HighMemoryUsage".into(),
            severity: pb::Severity::Critical as i32,
            target: Some(pb::ResourceRef {
                kind: "Deployment".into(),
                name: "api".into(),
                namespace: "payments".into(),
            }),
            phase: pb::Phase::Processing as i32,
            message,
            ..Default::default()
        }),
    )
}

pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// splitmix64: cheap, deterministic, good enough for test data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x5DEE_CE66_D1CE_4E5B)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

pub const ALERT_BASES: [&str; 20] = [
    "HighMemoryUsage",
    "HighCPUUsage",
    "PodCrashLooping",
    "PodNotReady",
    "DiskPressure",
    "NodeNotReady",
    "KubeletDown",
    "CertificateExpiring",
    "ErrorRateHigh",
    "LatencyHigh",
    "QueueBacklog",
    "ReplicasMismatch",
    "ContainerOOMKilled",
    "ImagePullBackOff",
    "PVCFillingUp",
    "TargetDown",
    "DeadlockDetected",
    "ConnectionPoolExhausted",
    "CPUThrottlingHigh",
    "JobFailed",
];
pub const ALERT_SCOPES: [&str; 10] = [
    "", "Api", "Worker", "Db", "Cache", "Ingress", "Batch", "Stream", "Gateway", "Cron",
];
/// One namespace per team.
pub const TEAMS: [&str; 10] = [
    "payments", "checkout", "search", "identity", "catalog", "shipping", "billing", "platform", "data", "mobile",
];

/// 200 distinct alert names: the 20 bases in 10 scopes.
pub fn alert_name(index: usize) -> String {
    format!("{}{}", ALERT_BASES[index % 20], ALERT_SCOPES[index / 20])
}

pub fn micros(d: Duration) -> u64 {
    (d.as_micros() as u64).max(1)
}

/// Microsecond latencies up to 10 minutes.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).unwrap()
}

/// The `q` quantile in milliseconds.
pub fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

/// COPY text format: one field, escaped; None is NULL.
pub fn field(out: &mut String, value: Option<&str>) {
    match value {
        None => out.push_str("\\N"),
        Some(v) => {
            for c in v.chars() {
                match c {
                    '\\' => out.push_str("\\\\"),
                    '\n' => out.push_str("\\n"),
                    '\r' => out.push_str("\\r"),
                    '\t' => out.push_str("\\t"),
                    c => out.push(c),
                }
            }
        }
    }
}

/// One COPY text row.
pub fn row(out: &mut String, fields: &[Option<&str>]) {
    for (i, f) in fields.iter().enumerate() {
        if i > 0 {
            out.push('\t');
        }
        field(out, *f);
    }
    out.push('\n');
}

/// A timestamp as COPY reads it, to the microsecond.
pub fn ts(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}
