//! Runs jobs: one replica per job (a lock in the job store), progress
//! recorded after every batch, cooperative cancellation between batches.
//!
//! A supervisor on every replica (1) follows the database's active model for
//! writes, (2) takes over jobs whose replica died (their lock lapsed: the
//! work is a query over PostgreSQL, so running again resumes it) and (3)
//! starts a backfill when deferred embeddings wait and none is running.
use std::{sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use serde_json::json;
use tokio::sync::watch;
use tokio_stream::StreamExt;
use uuid::Uuid;

use super::store::{
    JobChanges, JobCursor, JobFailure, JobListFilter, JobRecord, JobSpec, JobState, JobStore, JobStoreError,
};
use crate::{
    config::{JobSettings, RetentionSettings},
    error::CoreError,
    models::{Models, RunnableModel},
    storage::{EmbeddingTask, ModelHandle, RetentionCutoffs, Storage},
};

impl From<JobStoreError> for CoreError {
    fn from(error: JobStoreError) -> Self {
        match error {
            JobStoreError::Unavailable(source) => CoreError::Unavailable {
                what: "job store",
                source,
            },
            other => CoreError::Internal(other.into()),
        }
    }
}

pub struct JobService {
    store: Arc<dyn JobStore>,
    storage: Storage,
    models: Arc<Models>,
    settings: JobSettings,
    retention: RetentionSettings,
}

/// How a run ended, before it is recorded.
enum Outcome {
    Succeeded(serde_json::Map<String, serde_json::Value>),
    Cancelled,
    Failed(CoreError),
    /// Another replica holds the job now (our lock lapsed); it records the end.
    LostLock,
}

impl JobService {
    pub fn new(
        store: Arc<dyn JobStore>,
        storage: Storage,
        models: Arc<Models>,
        settings: JobSettings,
        retention: RetentionSettings,
    ) -> Arc<Self> {
        Arc::new(JobService {
            store,
            storage,
            models,
            settings,
            retention,
        })
    }

    fn lock_ttl(&self) -> Duration {
        Duration::from_millis(self.settings.lock_ttl_ms)
    }

    fn batch_size(&self) -> usize {
        self.settings.batch_size as usize
    }

    /// Records the job and runs it on this replica. A repeated `request_id`
    /// from the same caller returns the first job and starts nothing.
    pub async fn start(
        self: &Arc<Self>,
        spec: JobSpec,
        created_by: &str,
        request_id: Option<&str>,
    ) -> Result<JobRecord, CoreError> {
        self.check(&spec).await?;
        let (job, created) = self
            .store
            .create(JobRecord::new(spec, created_by.to_owned()), request_id)
            .await?;
        if created {
            tokio::spawn(self.clone().run(job.clone()));
        }
        Ok(job)
    }

    async fn check(&self, spec: &JobSpec) -> Result<(), CoreError> {
        match spec {
            JobSpec::BackfillEmbeddings | JobSpec::Purge { .. } => Ok(()),
            JobSpec::Reembed { model } => self.models.runnable(model, "reembed.model").map(|_| ()),
            JobSpec::Reindex { model } => match self.storage.model_named(model).await? {
                Some(_) => Ok(()),
                None => Err(CoreError::InvalidInput(crate::domain::Violations::single(
                    "reindex.model",
                    format!("no embedding model is named {model:?}"),
                ))),
            },
        }
    }

    pub async fn get(&self, id: Uuid) -> Result<JobRecord, CoreError> {
        self.store
            .get(id)
            .await?
            .ok_or_else(|| CoreError::NotFound("job".into()))
    }

    pub async fn list(
        &self,
        filter: &JobListFilter,
        after: Option<JobCursor>,
        limit: usize,
    ) -> Result<Vec<JobRecord>, CoreError> {
        Ok(self.store.list(filter, after, limit).await?)
    }

    /// Asks the job to stop at its next batch; returns it as it is now.
    pub async fn cancel(&self, id: Uuid) -> Result<JobRecord, CoreError> {
        let job = self.get(id).await?;
        if job.state.is_terminal() {
            return Err(CoreError::FailedPrecondition(format!(
                "the job already ended ({:?})",
                job.state
            )));
        }
        self.store.request_cancel(id).await?;
        Ok(job)
    }

    /// The job now, then every change until it ends. Subscribes before
    /// reading, so no change falls between the two; versions drop repeats.
    /// A forwarding task ends the stream right after the terminal state, and
    /// stops (dropping the subscription) as soon as the watcher leaves.
    pub async fn watch(&self, id: Uuid) -> Result<JobChanges, CoreError> {
        let mut changes = self.store.watch(id).await?;
        let current = self.get(id).await?;
        if current.state.is_terminal() {
            return Ok(Box::pin(tokio_stream::once(current)));
        }
        let (sender, receiver) = tokio::sync::mpsc::channel(16);
        let mut last_version = current.version;
        sender.try_send(current).expect("a fresh channel has room");
        tokio::spawn(async move {
            loop {
                let job = tokio::select! {
                    _ = sender.closed() => return,
                    job = changes.next() => match job {
                        Some(job) => job,
                        None => return,
                    },
                };
                if job.version <= last_version {
                    continue;
                }
                last_version = job.version;
                let ended = job.state.is_terminal();
                if sender.send(job).await.is_err() || ended {
                    return;
                }
            }
        });
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(receiver)))
    }

    /// Stores the job's new state; progress lost to a store outage is
    /// written with the next update (the work itself is in PostgreSQL).
    async fn save(&self, job: &mut JobRecord) {
        job.version += 1;
        job.updated_at = Utc::now();
        match self.store.update(job).await {
            Ok(()) => {}
            Err(JobStoreError::Conflict(_)) => {
                // Only the lock holder writes; a conflict means a record
                // written by an earlier holder: continue from its version.
                if let Ok(Some(stored)) = self.store.get(job.id).await {
                    job.version = stored.version + 1;
                    if let Err(error) = self.store.update(job).await {
                        tracing::warn!(job = %job.id, %error, "recording job progress failed");
                    }
                }
            }
            Err(error) => {
                job.version -= 1;
                tracing::warn!(job = %job.id, %error, "recording job progress failed; the work goes on");
            }
        }
    }

    async fn run(self: Arc<Self>, job: JobRecord) {
        let lock = match self.store.try_lock(&format!("job:{}", job.id), self.lock_ttl()).await {
            Ok(Some(lock)) => lock,
            Ok(None) => return,
            Err(error) => {
                tracing::warn!(job = %job.id, %error, "cannot lock the job; the supervisor retries");
                return;
            }
        };
        // The record may have moved on since it was read (another replica
        // finished the job and released the lock): only an open job runs.
        let mut job = match self.store.get(job.id).await {
            Ok(Some(current)) if !current.state.is_terminal() => current,
            _ => {
                let _ = self.store.release_lock(&lock).await;
                return;
            }
        };
        let (lost_tx, lost) = watch::channel(false);
        let renewal = {
            let (store, lock, ttl) = (self.store.clone(), lock.clone(), self.lock_ttl());
            tokio::spawn(async move {
                let mut every = tokio::time::interval(ttl / 3);
                every.tick().await;
                loop {
                    every.tick().await;
                    match store.renew_lock(&lock, ttl).await {
                        Ok(true) => {}
                        Ok(false) => {
                            let _ = lost_tx.send(true);
                            return;
                        }
                        // Unreachable store: keep trying until the lock would lapse.
                        Err(error) => tracing::warn!(%error, "renewing a job lock failed"),
                    }
                }
            })
        };

        job.state = JobState::Running;
        job.started_at.get_or_insert_with(Utc::now);
        // A job taken over from a crashed replica starts its counts again:
        // its to-do list already excludes what was done.
        (job.done, job.total) = (0, 0);
        self.save(&mut job).await;
        tracing::info!(job = %job.id, kind = job.spec.type_name(), "job running");
        let outcome = self.execute(&mut job, &lost).await;
        renewal.abort();
        let now = Utc::now();
        match outcome {
            Outcome::LostLock => return,
            Outcome::Succeeded(result) => {
                job.state = JobState::Succeeded;
                job.result = result;
                job.done = job.done.max(job.total);
                job.total = job.done;
            }
            Outcome::Cancelled => job.state = JobState::Cancelled,
            Outcome::Failed(error) => {
                let status = tonic::Status::from(error);
                job.state = JobState::Failed;
                job.error = Some(JobFailure {
                    code: status.code() as i32,
                    message: status.message().to_owned(),
                });
            }
        }
        job.finished_at = Some(now);
        job.expires_at = Some(now + super::store::FINISHED_JOB_TTL);
        self.save(&mut job).await;
        tracing::info!(job = %job.id, state = ?job.state, done = job.done, "job ended");
        if let Err(error) = self.store.release_lock(&lock).await {
            tracing::warn!(%error, "releasing a job lock failed; it lapses by itself");
        }
    }

    /// Between batches: stop for a cancel request or a lost lock.
    async fn interrupted(&self, job: &JobRecord, lost: &watch::Receiver<bool>) -> Option<Outcome> {
        if *lost.borrow() {
            return Some(Outcome::LostLock);
        }
        match self.store.cancel_requested(job.id).await {
            Ok(true) => Some(Outcome::Cancelled),
            Ok(false) => None,
            Err(error) => {
                tracing::warn!(job = %job.id, %error, "cannot read cancellation; going on");
                None
            }
        }
    }

    async fn execute(&self, job: &mut JobRecord, lost: &watch::Receiver<bool>) -> Outcome {
        let result = match job.spec.clone() {
            JobSpec::BackfillEmbeddings => self.backfill(job, lost).await,
            JobSpec::Reembed { model } => self.reembed(job, &model, lost).await,
            JobSpec::Purge { older_than } => self.purge(job, older_than, lost).await,
            JobSpec::Reindex { model } => self.reindex(job, &model, lost).await,
        };
        result.unwrap_or_else(Outcome::Failed)
    }

    async fn embed(&self, model: &RunnableModel, tasks: Vec<EmbeddingTask>) -> Result<u64, CoreError> {
        let texts: Vec<String> = tasks.iter().map(|t| t.text.clone()).collect();
        let vectors = model
            .embedder
            .embed_all(&texts)
            .await
            .map_err(|error| CoreError::Unavailable {
                what: "embedding provider",
                source: error.into(),
            })?;
        let embedded: Vec<(EmbeddingTask, Vec<f32>)> = tasks
            .into_iter()
            .zip(vectors)
            .map(|(task, e)| (task, e.vector.to_vec()))
            .collect();
        self.storage.store_embeddings(&model.handle, &embedded).await
    }

    /// Every deferred event, for every model this replica can run.
    async fn backfill(&self, job: &mut JobRecord, lost: &watch::Receiver<bool>) -> Result<Outcome, CoreError> {
        let models: Vec<RunnableModel> = self.models.all().cloned().collect();
        for model in &models {
            job.total += self.storage.pending_embedding_count(&model.handle).await?;
        }
        self.save(job).await;
        let mut embedded = 0;
        for model in &models {
            loop {
                if let Some(stop) = self.interrupted(job, lost).await {
                    return Ok(stop);
                }
                let tasks = self
                    .storage
                    .pending_embeddings(&model.handle, self.batch_size())
                    .await?;
                if tasks.is_empty() {
                    break;
                }
                let batch = tasks.len() as i64;
                embedded += self.embed(model, tasks).await?;
                job.done += batch;
                job.total = job.total.max(job.done);
                self.save(job).await;
            }
        }
        Ok(Outcome::Succeeded(object(json!({ "embedded": embedded }))))
    }

    /// Embeds every event with `model`, then makes it the active model.
    async fn reembed(
        &self,
        job: &mut JobRecord,
        model: &str,
        lost: &watch::Receiver<bool>,
    ) -> Result<Outcome, CoreError> {
        let model = self.models.runnable(model, "reembed.model")?.clone();
        job.total = self.storage.events_missing_embedding_count(&model.handle).await?;
        self.save(job).await;
        let mut embedded = 0;
        // Events written meanwhile (embedded with the old model) can fall
        // before the pass's position: passes repeat until one finds nothing.
        loop {
            let found = match self.reembed_pass(job, &model, lost, &mut embedded).await? {
                Ok(found) => found,
                Err(stop) => return Ok(stop),
            };
            if found == 0 {
                break;
            }
        }
        self.storage.activate_model(&model.handle).await?;
        self.models.follow_active(&model.handle);
        // Writes that began before the switch and commit after it carry no
        // marker: wait for every transaction open at the switch, then sweep.
        self.storage.wait_for_open_transactions().await?;
        if let Err(stop) = self.reembed_pass(job, &model, lost, &mut embedded).await? {
            return Ok(stop);
        }
        Ok(Outcome::Succeeded(object(json!({
            "model": model.handle.name,
            "embedded": embedded,
            "active": true,
        }))))
    }

    /// One walk over events missing an embedding for `model`: Ok(Ok(found))
    /// or Ok(Err(outcome)) when interrupted.
    async fn reembed_pass(
        &self,
        job: &mut JobRecord,
        model: &RunnableModel,
        lost: &watch::Receiver<bool>,
        embedded: &mut u64,
    ) -> Result<Result<u64, Outcome>, CoreError> {
        let mut after = None;
        let mut found = 0;
        loop {
            if let Some(stop) = self.interrupted(job, lost).await {
                return Ok(Err(stop));
            }
            let tasks = self
                .storage
                .events_missing_embedding(&model.handle, after, self.batch_size())
                .await?;
            let Some(last) = tasks.last() else {
                return Ok(Ok(found));
            };
            after = Some((last.occurred_at, last.event_id));
            let batch = tasks.len() as u64;
            found += batch;
            *embedded += self.embed(model, tasks).await?;
            job.done += batch as i64;
            job.total = job.total.max(job.done);
            self.save(job).await;
        }
    }

    /// Whole months first (cheap, and no row deletes for the HNSW index to
    /// vacuum), then the rest in batches, then incidents left with no events.
    /// Retention floors and legal holds keep events back; the run is recorded
    /// in purge_runs, and every removed event leaves a tombstone in its chain.
    async fn purge(
        &self,
        job: &mut JobRecord,
        older_than: DateTime<Utc>,
        lost: &watch::Receiver<bool>,
    ) -> Result<Outcome, CoreError> {
        let cutoffs = RetentionCutoffs::new(older_than, Utc::now(), &self.retention);
        let run = self
            .storage
            .start_purge_run(&job.id.to_string(), &job.created_by, older_than, &cutoffs)
            .await?;
        job.total = self.storage.events_before_count(older_than).await?;
        self.save(job).await;
        let (mut partitions, mut incidents) = (0i64, 0u64);
        for month in self.storage.partitions_before(cutoffs.earliest()).await? {
            if let Some(stop) = self.interrupted(job, lost).await {
                return Ok(stop);
            }
            if let Some(dropped) = self.storage.drop_month(month, run).await? {
                job.done += dropped as i64;
                partitions += 1;
                self.save(job).await;
            }
        }
        let mut after = None;
        loop {
            if let Some(stop) = self.interrupted(job, lost).await {
                return Ok(stop);
            }
            let (deleted, last) = self
                .storage
                .delete_events_before(&cutoffs, run, after, self.batch_size())
                .await?;
            let Some(last) = last else { break };
            after = Some(last);
            job.done += deleted as i64;
            self.save(job).await;
        }
        loop {
            let deleted = self
                .storage
                .delete_incidents_before(older_than, self.batch_size())
                .await?;
            if deleted == 0 {
                break;
            }
            incidents += deleted;
        }
        let (held, kept_by_policy) = self
            .storage
            .finish_purge_run(run, job.done, partitions, older_than)
            .await?;
        Ok(Outcome::Succeeded(object(json!({
            "older_than": older_than.to_rfc3339(),
            "purge_run": run,
            "events_deleted": job.done,
            "partitions_dropped": partitions,
            "incidents_deleted": incidents,
            "events_held": held,
            "events_kept_by_policy": kept_by_policy,
        }))))
    }

    /// Rebuilds the model's index one monthly partition at a time, without
    /// blocking writes or searches.
    async fn reindex(
        &self,
        job: &mut JobRecord,
        model: &str,
        lost: &watch::Receiver<bool>,
    ) -> Result<Outcome, CoreError> {
        let handle: ModelHandle = self
            .storage
            .model_named(model)
            .await?
            .ok_or_else(|| CoreError::NotFound("model".into()))?;
        let indexes = self.storage.model_index_partitions(&handle).await?;
        job.total = indexes.len() as i64;
        self.save(job).await;
        for index in &indexes {
            if let Some(stop) = self.interrupted(job, lost).await {
                return Ok(stop);
            }
            self.storage.reindex_concurrently(index).await?;
            job.done += 1;
            self.save(job).await;
        }
        Ok(Outcome::Succeeded(object(json!({
            "model": handle.name,
            "indexes_rebuilt": indexes.len(),
        }))))
    }

    /// Runs until the process ends; see the module docs.
    pub async fn supervise(self: Arc<Self>) {
        let mut every = tokio::time::interval(Duration::from_millis(self.settings.supervisor_interval_ms));
        loop {
            every.tick().await;
            if let Err(error) = self.supervise_once().await {
                tracing::debug!(%error, "job supervision skipped a round");
            }
        }
    }

    async fn supervise_once(self: &Arc<Self>) -> Result<(), CoreError> {
        if let Some(active) = self.storage.active_model().await? {
            self.models.follow_active(&active);
        }
        let unfinished = JobListFilter {
            states: vec![JobState::Pending, JobState::Running],
            type_name: None,
        };
        let open = self.store.list(&unfinished, None, 1000).await?;
        for job in &open {
            // Runs only if no replica holds the job's lock.
            tokio::spawn(self.clone().run(job.clone()));
        }
        let backfill_open = open.iter().any(|j| j.spec == JobSpec::BackfillEmbeddings);
        if !backfill_open && self.deferred_work_is_embeddable().await? {
            // The lock keeps two replicas from starting one at the same time.
            if let Some(lock) = self.store.try_lock("auto-backfill", self.lock_ttl()).await? {
                let job = self.start(JobSpec::BackfillEmbeddings, "datastorage", None).await?;
                tracing::info!(job = %job.id, "deferred embeddings wait; started a backfill");
                let _ = self.store.release_lock(&lock).await;
            }
        }
        Ok(())
    }

    /// Deferred events wait and the provider of their model answers again.
    async fn deferred_work_is_embeddable(&self) -> Result<bool, CoreError> {
        for model in self.models.all() {
            if self.storage.pending_embedding_count(&model.handle).await? > 0
                && model.embedder.embed_all(&["ready?".to_owned()]).await.is_ok()
            {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

fn object(value: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
    match value {
        serde_json::Value::Object(map) => map,
        _ => serde_json::Map::new(),
    }
}
