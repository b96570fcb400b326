//! The load generator: drives an async operation (a gRPC call, an SQL
//! statement) from a number of workers, closed loop or at a fixed rate, and
//! records latency in HDR histograms.
//!
//! At a fixed rate, call i is due at `start + i / rate`. Its latency is
//! measured from when it was due, not from when a worker got to send it: a
//! stalled server holds every worker, calls queue behind it, and their
//! waiting counts, as it would for real callers who keep arriving
//! (coordinated-omission correction, as in wrk2). Closed loop, each worker
//! sends its next call when the last one returns, and latency is the call's
//! own.
use std::{
    collections::BTreeMap,
    future::Future,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;

use super::{histogram, micros, ms};

#[derive(Debug, Clone, Copy)]
pub enum Pace {
    /// Each worker calls again as soon as its call returns.
    ClosedLoop,
    /// Calls per second over all workers; latency counts from when each call was due.
    FixedRate(f64),
}

#[derive(Debug, Clone, Copy)]
pub struct LoadSpec {
    pub workers: usize,
    pub pace: Pace,
    pub duration: Duration,
    /// Width of a timeline bucket (per-second or per-minute figures).
    pub bucket: Duration,
}

/// What one call did: items it carried (events in a batch), or the gRPC
/// status code (or other error name) it failed with.
pub type CallResult = Result<u64, String>;

/// One timeline bucket: calls that completed in it.
pub struct Bucket {
    pub ok_calls: u64,
    pub items: u64,
    pub errors: u64,
    pub latency: Histogram<u64>,
}

pub struct LoadReport {
    pub name: String,
    pub elapsed: Duration,
    pub ok_calls: u64,
    pub items: u64,
    pub errors: BTreeMap<String, u64>,
    /// Successful calls only, in microseconds.
    pub latency: Histogram<u64>,
    pub timeline: Vec<Bucket>,
    pub bucket: Duration,
}

impl LoadReport {
    /// Items per second over the whole run.
    pub fn rate(&self) -> f64 {
        self.items as f64 / self.elapsed.as_secs_f64()
    }

    pub fn p(&self, quantile: f64) -> f64 {
        ms(&self.latency, quantile)
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// `code=count` pairs, or "none".
    pub fn error_summary(&self) -> String {
        if self.errors.is_empty() {
            return "none".into();
        }
        self.errors
            .iter()
            .map(|(code, n)| format!("{code}={n}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

struct Shared {
    latency: Histogram<u64>,
    errors: BTreeMap<String, u64>,
    timeline: Vec<Bucket>,
    ok_calls: u64,
    items: u64,
}

/// Runs `call(i)` for i = 0, 1, 2, ... as `spec` says, until its duration is
/// over; calls still running then are awaited and counted.
pub async fn drive<F, Fut>(name: &str, spec: LoadSpec, call: F) -> LoadReport
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = CallResult> + Send,
{
    eprintln!("load: {name} ({spec:?})");
    let call = Arc::new(call);
    let next = Arc::new(AtomicU64::new(0));
    let buckets = (spec.duration.as_secs_f64() / spec.bucket.as_secs_f64()).ceil() as usize + 1;
    let shared = Arc::new(Mutex::new(Shared {
        latency: histogram(),
        errors: BTreeMap::new(),
        timeline: (0..buckets)
            .map(|_| Bucket {
                ok_calls: 0,
                items: 0,
                errors: 0,
                latency: histogram(),
            })
            .collect(),
        ok_calls: 0,
        items: 0,
    }));
    let start = Instant::now();
    let end = start + spec.duration;
    let workers: Vec<_> = (0..spec.workers)
        .map(|_| {
            let (call, next, shared) = (call.clone(), next.clone(), shared.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let due = match spec.pace {
                        Pace::ClosedLoop => None,
                        Pace::FixedRate(rate) => Some(start + Duration::from_secs_f64(i as f64 / rate)),
                    };
                    if due.unwrap_or_else(Instant::now) >= end {
                        break;
                    }
                    if let Some(due) = due {
                        tokio::time::sleep_until(due.into()).await;
                    }
                    let sent = Instant::now();
                    let result = call(i).await;
                    let done = Instant::now();
                    let latency = micros(done - due.unwrap_or(sent));
                    let slot = (((done - start).as_secs_f64() / spec.bucket.as_secs_f64()) as usize).min(buckets - 1);
                    let mut shared = shared.lock().unwrap();
                    match result {
                        Ok(items) => {
                            shared.ok_calls += 1;
                            shared.items += items;
                            shared.latency.saturating_record(latency);
                            let bucket = &mut shared.timeline[slot];
                            bucket.ok_calls += 1;
                            bucket.items += items;
                            bucket.latency.saturating_record(latency);
                        }
                        Err(code) => {
                            *shared.errors.entry(code).or_default() += 1;
                            shared.timeline[slot].errors += 1;
                        }
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.expect("load worker panicked");
    }
    let elapsed = start.elapsed();
    let shared = Arc::try_unwrap(shared)
        .ok()
        .expect("workers are done")
        .into_inner()
        .unwrap();
    LoadReport {
        name: name.to_owned(),
        elapsed,
        ok_calls: shared.ok_calls,
        items: shared.items,
        errors: shared.errors,
        latency: shared.latency,
        timeline: shared.timeline,
        bucket: spec.bucket,
    }
}

/// A tonic status as the error name reports count it by.
pub fn code(status: tonic::Status) -> String {
    format!("{:?}", status.code())
}

/// Writes the report's latency distribution (percentile, ms) as CSV for the
/// plot: `<dir>/<file>.latency.csv`.
pub fn write_percentiles(report: &LoadReport, dir: &std::path::Path, file: &str) -> std::io::Result<()> {
    let mut csv = String::from("scenario,percentile,ms\n");
    let scenario = format!("\"{}\"", report.name.replace('"', "\"\""));
    for q in [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9999, 1.0] {
        csv.push_str(&format!("{scenario},{},{:.3}\n", q * 100.0, report.p(q)));
    }
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join(format!("{file}.latency.csv")), csv)
}
