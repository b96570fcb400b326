//! Where job records live while and after a job runs: Redis (shared by every
//! replica) or in-process (one replica, no Redis configured). The records are
//! progress figures only; the work itself is durable in PostgreSQL, so a lost
//! record loses a progress bar, never data.
use std::{pin::Pin, time::Duration};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use tokio_stream::{wrappers::BroadcastStream, Stream, StreamExt};
use uuid::Uuid;

/// How long a finished job stays readable.
pub const FINISHED_JOB_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// How long a create's `request_id` is remembered: a retry within it returns
/// the first job, a later one creates a new job.
pub const REQUEST_ID_TTL: Duration = Duration::from_secs(24 * 60 * 60);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Pending,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub const ALL: [JobState; 5] = [
        JobState::Pending,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ];

    /// The state's name in metrics labels.
    pub fn label(self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed | JobState::Cancelled)
    }
}

/// What a job does, with its parameters. `type_name` is the `Job.type` string.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum JobSpec {
    BackfillEmbeddings,
    Reembed { model: String },
    Purge { older_than: DateTime<Utc> },
    Reindex { model: String },
}

impl JobSpec {
    pub fn type_name(&self) -> &'static str {
        match self {
            JobSpec::BackfillEmbeddings => "backfill_embeddings",
            JobSpec::Reembed { .. } => "reembed",
            JobSpec::Purge { .. } => "purge",
            JobSpec::Reindex { .. } => "reindex",
        }
    }
}

/// Why a job failed, as a `google.rpc.Status` carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobFailure {
    /// A `tonic::Code` as i32.
    pub code: i32,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: Uuid,
    pub spec: JobSpec,
    pub state: JobState,
    pub done: i64,
    pub total: i64,
    /// A JSON object summarising the outcome; `{}` until the job ends.
    pub result: serde_json::Map<String, serde_json::Value>,
    pub error: Option<JobFailure>,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// When the record disappears: `finished_at` + FINISHED_JOB_TTL.
    pub expires_at: Option<DateTime<Utc>>,
    /// Increases with every stored change, so a watcher can drop a change it
    /// has already seen (pub/sub and a read can deliver the same one).
    pub version: u64,
}

impl JobRecord {
    /// A new pending job, version 1.
    pub fn new(spec: JobSpec, created_by: String) -> Self {
        let now = Utc::now();
        JobRecord {
            id: Uuid::now_v7(),
            spec,
            state: JobState::Pending,
            done: 0,
            total: 0,
            result: serde_json::Map::new(),
            error: None,
            created_by,
            created_at: now,
            started_at: None,
            updated_at: now,
            finished_at: None,
            expires_at: None,
            version: 1,
        }
    }

    pub fn progress_percent(&self) -> i32 {
        if self.state == JobState::Succeeded {
            return 100;
        }
        if self.total <= 0 {
            return 0;
        }
        ((self.done.clamp(0, self.total) * 100) / self.total) as i32
    }
}

/// The record as a store keeps and publishes it. The store owns `expires_at`
/// so it always says when the record really disappears: `finished_at` (or
/// `now`, if a terminal job lacks it) + FINISHED_JOB_TTL once the job is
/// terminal, unset while it runs.
pub(crate) fn stored_form(job: &JobRecord, now: DateTime<Utc>) -> JobRecord {
    let mut stored = job.clone();
    stored.expires_at = job
        .state
        .is_terminal()
        .then(|| job.finished_at.unwrap_or(now) + FINISHED_JOB_TTL);
    stored
}

/// Which jobs `list` returns; empty means any.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobListFilter {
    pub states: Vec<JobState>,
    pub type_name: Option<String>,
}

impl JobListFilter {
    pub fn matches(&self, job: &JobRecord) -> bool {
        (self.states.is_empty() || self.states.contains(&job.state))
            && self
                .type_name
                .as_deref()
                .is_none_or(|name| name == job.spec.type_name())
    }
}

/// A page position: the last job of the previous page (newest first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobCursor {
    pub created_at: DateTime<Utc>,
    pub id: Uuid,
}

impl JobCursor {
    /// Whether `job` belongs to the pages after this position.
    pub fn precedes(&self, job: &JobRecord) -> bool {
        (job.created_at, job.id) < (self.created_at, self.id)
    }
}

/// The order of `list`: created_at, then id, both descending.
pub(crate) fn newest_first(a: &JobRecord, b: &JobRecord) -> std::cmp::Ordering {
    (b.created_at, b.id).cmp(&(a.created_at, a.id))
}

pub type JobChanges = Pin<Box<dyn Stream<Item = JobRecord> + Send>>;

/// Changes a watcher may fall behind by before its stream ends.
pub(crate) const WATCH_BACKLOG: usize = 64;

/// A watch stream over a store's in-process fan-out of one job's changes. It
/// ends when the watcher has fallen so far behind that changes were dropped:
/// having missed some, reading the job again is its only way to catch up.
pub(crate) fn watch_stream(changes: broadcast::Receiver<JobRecord>) -> JobChanges {
    Box::pin(BroadcastStream::new(changes).map_while(Result::ok))
}

#[derive(Debug, thiserror::Error)]
pub enum JobStoreError {
    /// The store cannot be reached (Redis down); job RPCs answer UNAVAILABLE.
    #[error("job store is unavailable")]
    Unavailable(#[source] anyhow::Error),
    /// An update lost a race: the stored version is not the one it was based on.
    #[error("job {0} changed concurrently")]
    Conflict(Uuid),
    #[error("job store error")]
    Internal(#[source] anyhow::Error),
}

/// A held lock. Dropping it without `release` lets it lapse after its TTL,
/// which is what a crashed replica does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockToken {
    pub name: String,
    pub owner: String,
}

#[async_trait]
pub trait JobStore: Send + Sync + 'static {
    /// Stores a new job. With a `request_id`, the first create for
    /// (`job.created_by`, request_id) wins and later ones return that job
    /// unchanged with `false`.
    async fn create(&self, job: JobRecord, request_id: Option<&str>) -> Result<(JobRecord, bool), JobStoreError>;

    /// None when unknown or expired.
    async fn get(&self, id: Uuid) -> Result<Option<JobRecord>, JobStoreError>;

    /// Newest first (created_at, then id, descending), strictly after `after`.
    async fn list(
        &self,
        filter: &JobListFilter,
        after: Option<JobCursor>,
        limit: usize,
    ) -> Result<Vec<JobRecord>, JobStoreError>;

    /// Stores `job` if the stored version is `job.version - 1` (else
    /// `Conflict`, also when no record is stored), publishes it to watchers,
    /// and starts the TTL when it is terminal: the stored record's
    /// `expires_at` is set by the store (see [`stored_form`]).
    async fn update(&self, job: &JobRecord) -> Result<(), JobStoreError>;

    /// Marks the job for cooperative cancellation; the runner sees it at its
    /// next batch. Kept apart from the record so progress updates never
    /// overwrite it.
    async fn request_cancel(&self, id: Uuid) -> Result<(), JobStoreError>;
    async fn cancel_requested(&self, id: Uuid) -> Result<bool, JobStoreError>;

    /// Every change stored after this call returns, from any replica. The
    /// stream ends when the store connection is lost.
    async fn watch(&self, id: Uuid) -> Result<JobChanges, JobStoreError>;

    /// Takes `name` for `ttl` if nobody holds it.
    async fn try_lock(&self, name: &str, ttl: Duration) -> Result<Option<LockToken>, JobStoreError>;
    /// Extends a held lock; false when it was lost (expired and taken).
    async fn renew_lock(&self, lock: &LockToken, ttl: Duration) -> Result<bool, JobStoreError>;
    async fn release_lock(&self, lock: &LockToken) -> Result<(), JobStoreError>;
}
