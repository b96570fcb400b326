//! The job store of a single replica without Redis: everything in one
//! process, gone when it exits. Expired records are dropped lazily: reads
//! skip them and each create sweeps them out, since creating is the only way
//! the store grows.
use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::sync::broadcast;
use uuid::Uuid;

use super::store::{
    newest_first, stored_form, watch_stream, JobChanges, JobCursor, JobListFilter, JobRecord, JobStore, JobStoreError,
    LockToken, REQUEST_ID_TTL, WATCH_BACKLOG,
};

#[derive(Default)]
pub struct MemoryJobStore {
    state: Mutex<State>,
}

impl MemoryJobStore {
    pub fn new() -> Self {
        MemoryJobStore::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("job store lock")
    }
}

#[derive(Default)]
struct State {
    jobs: HashMap<Uuid, StoredJob>,
    /// (created_by, request_id) of recent creates, for idempotency.
    requests: HashMap<(String, String), RememberedRequest>,
    /// One fan-out per watched job; a job without watchers has none.
    watchers: HashMap<Uuid, broadcast::Sender<JobRecord>>,
    locks: HashMap<String, HeldLock>,
}

struct StoredJob {
    record: JobRecord,
    cancel_requested: bool,
}

struct RememberedRequest {
    job_id: Uuid,
    forget_at: DateTime<Utc>,
}

struct HeldLock {
    owner: String,
    /// Monotonic, because lock TTLs are short and must not jump with the wall clock.
    lapses_at: Instant,
}

fn is_expired(record: &JobRecord, now: DateTime<Utc>) -> bool {
    record.expires_at.is_some_and(|at| at <= now)
}

impl State {
    fn live_job(&self, id: Uuid, now: DateTime<Utc>) -> Option<&StoredJob> {
        self.jobs.get(&id).filter(|stored| !is_expired(&stored.record, now))
    }

    fn live_job_mut(&mut self, id: Uuid, now: DateTime<Utc>) -> Option<&mut StoredJob> {
        self.jobs.get_mut(&id).filter(|stored| !is_expired(&stored.record, now))
    }

    fn live_lock(&self, name: &str) -> Option<&HeldLock> {
        self.locks.get(name).filter(|lock| lock.lapses_at > Instant::now())
    }

    fn sweep(&mut self, now: DateTime<Utc>) {
        self.jobs.retain(|_, stored| !is_expired(&stored.record, now));
        self.requests.retain(|_, request| request.forget_at > now);
        self.watchers.retain(|_, sender| sender.receiver_count() > 0);
        let instant = Instant::now();
        self.locks.retain(|_, lock| lock.lapses_at > instant);
    }
}

#[async_trait]
impl JobStore for MemoryJobStore {
    async fn create(&self, job: JobRecord, request_id: Option<&str>) -> Result<(JobRecord, bool), JobStoreError> {
        let now = Utc::now();
        let mut state = self.state();
        state.sweep(now);
        if let Some(request_id) = request_id {
            let request = (job.created_by.clone(), request_id.to_owned());
            if let Some(first) = state.requests.get(&request) {
                return match state.live_job(first.job_id, now) {
                    Some(stored) => Ok((stored.record.clone(), false)),
                    None => Err(JobStoreError::Internal(anyhow::anyhow!(
                        "job {}, created for this request id, is gone",
                        first.job_id
                    ))),
                };
            }
            state.requests.insert(
                request,
                RememberedRequest {
                    job_id: job.id,
                    forget_at: now + REQUEST_ID_TTL,
                },
            );
        }
        state.jobs.insert(
            job.id,
            StoredJob {
                record: job.clone(),
                cancel_requested: false,
            },
        );
        Ok((job, true))
    }

    async fn get(&self, id: Uuid) -> Result<Option<JobRecord>, JobStoreError> {
        Ok(self
            .state()
            .live_job(id, Utc::now())
            .map(|stored| stored.record.clone()))
    }

    async fn list(
        &self,
        filter: &JobListFilter,
        after: Option<JobCursor>,
        limit: usize,
    ) -> Result<Vec<JobRecord>, JobStoreError> {
        let now = Utc::now();
        let state = self.state();
        let mut jobs: Vec<JobRecord> = state
            .jobs
            .values()
            .map(|stored| &stored.record)
            .filter(|record| !is_expired(record, now))
            .filter(|record| after.is_none_or(|cursor| cursor.precedes(record)))
            .filter(|record| filter.matches(record))
            .cloned()
            .collect();
        jobs.sort_by(newest_first);
        jobs.truncate(limit);
        Ok(jobs)
    }

    async fn update(&self, job: &JobRecord) -> Result<(), JobStoreError> {
        let now = Utc::now();
        let mut state = self.state();
        let stored = state
            .live_job_mut(job.id, now)
            .filter(|stored| stored.record.version.checked_add(1) == Some(job.version))
            .ok_or(JobStoreError::Conflict(job.id))?;
        stored.record = stored_form(job, now);
        let change = stored.record.clone();
        if let Some(watchers) = state.watchers.get(&job.id) {
            // Nobody watching is not an error.
            let _ = watchers.send(change);
        }
        Ok(())
    }

    async fn request_cancel(&self, id: Uuid) -> Result<(), JobStoreError> {
        if let Some(stored) = self.state().live_job_mut(id, Utc::now()) {
            stored.cancel_requested = true;
        }
        Ok(())
    }

    async fn cancel_requested(&self, id: Uuid) -> Result<bool, JobStoreError> {
        Ok(self
            .state()
            .live_job(id, Utc::now())
            .is_some_and(|stored| stored.cancel_requested))
    }

    async fn watch(&self, id: Uuid) -> Result<JobChanges, JobStoreError> {
        let changes = self
            .state()
            .watchers
            .entry(id)
            .or_insert_with(|| broadcast::channel(WATCH_BACKLOG).0)
            .subscribe();
        Ok(watch_stream(changes))
    }

    async fn try_lock(&self, name: &str, ttl: Duration) -> Result<Option<LockToken>, JobStoreError> {
        let mut state = self.state();
        if state.live_lock(name).is_some() {
            return Ok(None);
        }
        let token = LockToken {
            name: name.to_owned(),
            owner: Uuid::new_v4().to_string(),
        };
        state.locks.insert(
            name.to_owned(),
            HeldLock {
                owner: token.owner.clone(),
                lapses_at: Instant::now() + ttl,
            },
        );
        Ok(Some(token))
    }

    async fn renew_lock(&self, lock: &LockToken, ttl: Duration) -> Result<bool, JobStoreError> {
        let mut state = self.state();
        if state.live_lock(&lock.name).is_none_or(|held| held.owner != lock.owner) {
            return Ok(false);
        }
        state.locks.insert(
            lock.name.clone(),
            HeldLock {
                owner: lock.owner.clone(),
                lapses_at: Instant::now() + ttl,
            },
        );
        Ok(true)
    }

    async fn release_lock(&self, lock: &LockToken) -> Result<(), JobStoreError> {
        let mut state = self.state();
        if state.live_lock(&lock.name).is_some_and(|held| held.owner == lock.owner) {
            state.locks.remove(&lock.name);
        }
        Ok(())
    }
}
