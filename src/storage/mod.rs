//! The storage core: PostgreSQL access and the transaction boundary. Callers
//! hand it validated domain values; it never sees protobuf types.
mod audit;
mod incidents;
mod integrity;
mod jobs;
mod queries;
mod replica;
mod search;
mod vector_index;

use std::{
    collections::HashSet,
    str::FromStr,
    sync::{Arc, Mutex},
    time::Duration,
};

use chrono::{DateTime, Datelike, Utc};
use secrecy::ExposeSecret;
use sqlx::{
    postgres::{PgConnectOptions, PgPoolOptions},
    PgPool,
};

pub use audit::{EmbeddingDecision, PreparedWrite};
pub use integrity::{ChainEvent, StoredChain};
pub use jobs::{EmbeddingTask, EventPosition, PolicyCutoff, RetentionCutoffs};
/// What the read benchmark's plain-SQL side shares with the service's statements.
pub use queries::{ACTION_STATS_AGGREGATION, EVENT_COLUMNS, INCIDENT_COLUMNS};
pub use replica::{read_from_primary, READ_FROM_HEADER};
pub use search::{EventKey, Ranked, SearchScope, Strategy};

use crate::{
    config::{DatabaseSettings, SearchSettings},
    error::CoreError,
    integrity::chain::ChainHasher,
};

/// What the readiness probe found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatabaseState {
    Ready,
    Unreachable,
    MigrationsPending,
}

/// Tries at creating a month's partitions while readers hold the parents;
/// with the pauses, about 4 s of trying before the write is UNAVAILABLE.
const PARTITION_ATTEMPTS: usize = 12;
const PARTITION_RETRY_PAUSE: Duration = Duration::from_millis(10);

/// The partition function's lock wait ran out (55P03), or a deadlock
/// picked it (possible against a database not yet migrated to the bounded
/// wait).
fn is_lock_contention(error: &sqlx::Error) -> bool {
    CoreError::is_retryable_conflict(error)
        || matches!(error, sqlx::Error::Database(db) if db.code().as_deref() == Some("55P03"))
}

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// A registered embedding model: its row id is what embeddings and indexes refer to.
#[derive(Debug, Clone)]
pub struct ModelHandle {
    pub id: i16,
    pub name: String,
    pub dimensions: usize,
}

#[derive(Clone)]
pub struct Storage {
    pool: PgPool,
    /// Where IncidentQuery and VectorSearch read, when configured (see `replica`).
    replica: Option<replica::ReadReplica>,
    /// Months whose partitions are known to exist, so the write path asks the
    /// database only the first time it meets a month.
    known_partitions: Arc<Mutex<HashSet<(i32, u32)>>>,
    /// Links each written event into its correlation id's chain.
    chain: Arc<ChainHasher>,
    /// New embeddings go to the fresh segment, not straight into the HNSW
    /// index (`vector_index.deferred`).
    deferred_indexing: bool,
    /// `m` and `ef_construction` of the HNSW graph a newly registered model
    /// gets.
    hnsw_graph: (u32, u32),
}

/// A pool that connects lazily: the server starts, and reports NOT_SERVING,
/// while PostgreSQL is down, instead of failing to start.
///
/// Session settings travel in the startup packet, so they cost no round trip:
/// the HNSW search parameters, and no JIT (compiling a plan costs tens of
/// milliseconds, more than any query this service runs should take).
pub fn pool(settings: &DatabaseSettings, search: &SearchSettings) -> anyhow::Result<PgPool> {
    lazy_pool(
        settings.url.expose_secret(),
        settings,
        search,
        Duration::from_millis(settings.acquire_timeout_ms),
    )
}

/// The read replica's pool, when `database.read_replica_url` is set. Its
/// acquire timeout is short: a replica that does not answer quickly is
/// skipped for the primary, not waited for.
pub fn replica_pool(settings: &DatabaseSettings, search: &SearchSettings) -> anyhow::Result<Option<PgPool>> {
    let Some(url) = &settings.read_replica_url else {
        return Ok(None);
    };
    let timeout = Duration::from_millis(settings.acquire_timeout_ms.min(REPLICA_ACQUIRE_TIMEOUT_MS));
    Ok(Some(lazy_pool(url.expose_secret(), settings, search, timeout)?))
}

const REPLICA_ACQUIRE_TIMEOUT_MS: u64 = 500;

fn lazy_pool(
    url: &str,
    settings: &DatabaseSettings,
    search: &SearchSettings,
    acquire_timeout: Duration,
) -> anyhow::Result<PgPool> {
    let options = PgConnectOptions::from_str(url)?.options([
        ("jit", "off".to_owned()),
        ("hnsw.ef_search", search.ef_search.to_string()),
        ("hnsw.iterative_scan", search.iterative_scan.as_sql().to_owned()),
        ("hnsw.max_scan_tuples", search.max_scan_tuples.to_string()),
    ]);
    Ok(PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(acquire_timeout)
        // The ping before a connection is handed out runs inside the acquire
        // timeout. It is what fails a call fast when the server stalls:
        // without it the statement itself would wait on a silent socket
        // until the caller's deadline (tests/api/database_faults.rs). It
        // costs a round trip per call (docs/performance.md).
        .test_before_acquire(true)
        .connect_lazy_with(options))
}

impl Storage {
    pub fn new(pool: PgPool) -> Self {
        Storage {
            pool,
            replica: None,
            known_partitions: Arc::default(),
            chain: Arc::new(ChainHasher::unkeyed()),
            deferred_indexing: true,
            hnsw_graph: crate::config::DEFAULT_HNSW_GRAPH,
        }
    }

    /// Whether new embeddings wait in the fresh segment for the indexer
    /// (true) or enter the HNSW index in the writing transaction.
    pub fn with_deferred_indexing(mut self, deferred: bool) -> Self {
        self.deferred_indexing = deferred;
        self
    }

    /// `m` and `ef_construction` of the HNSW graph of a model registered from
    /// now on.
    pub fn with_hnsw_graph(mut self, m: u32, ef_construction: u32) -> Self {
        self.hnsw_graph = (m, ef_construction);
        self
    }

    /// Reads of IncidentQuery and VectorSearch go to `replica` when it answers.
    pub fn with_read_replica(mut self, replica: Option<PgPool>) -> Self {
        self.replica = replica.map(replica::ReadReplica::new);
        self
    }

    /// Links new events with `chain` (keyed, when a chain key is configured).
    pub fn with_chain_hasher(mut self, chain: ChainHasher) -> Self {
        self.chain = Arc::new(chain);
        self
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Whether this build can serve from the database now: PostgreSQL
    /// answers within the pool's acquire timeout, and every migration this
    /// build knows is applied (a newer replica may have applied more).
    ///
    /// The whole probe is bounded, not just the acquire: a server that
    /// stalls after the ping (stopped, swapping, its disk hung) still has
    /// its kernel acknowledge our packets, so nothing would ever end the
    /// query, and readiness would stay SERVING. The bound allows the acquire
    /// its full timeout and the query as long again.
    pub async fn probe(&self) -> DatabaseState {
        let latest_known = MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0);
        let bound = self.pool.options().get_acquire_timeout() * 2;
        let applied = tokio::time::timeout(
            bound,
            sqlx::query_scalar::<_, i64>("SELECT coalesce(max(version), 0) FROM _sqlx_migrations WHERE success")
                .fetch_one(&self.pool),
        )
        .await;
        match applied {
            Ok(Ok(version)) if version >= latest_known => DatabaseState::Ready,
            Ok(Ok(_)) => DatabaseState::MigrationsPending,
            // No migrations table yet is a schema behind, not an outage.
            Ok(Err(sqlx::Error::Database(error))) if error.code().as_deref() == Some("42P01") => {
                DatabaseState::MigrationsPending
            }
            Ok(Err(_)) | Err(_) => DatabaseState::Unreachable,
        }
    }

    /// Registers the model (idempotently) and makes sure its vector index
    /// exists; a new index gets this storage's HNSW graph parameters.
    #[tracing::instrument(skip(self))]
    pub async fn register_model(
        &self,
        name: &str,
        dimensions: usize,
        provider: &str,
    ) -> Result<ModelHandle, CoreError> {
        let dims = i32::try_from(dimensions).map_err(|e| CoreError::Internal(e.into()))?;
        let (m, ef_construction) = self.hnsw_graph;
        let id: i16 = sqlx::query_scalar("SELECT register_embedding_model($1, $2, $3, $4, $5)")
            .bind(name)
            .bind(dims)
            .bind(provider)
            .bind(m as i32)
            .bind(ef_construction as i32)
            .fetch_one(&self.pool)
            .await
            .map_err(CoreError::database)?;
        Ok(ModelHandle {
            id,
            name: name.to_owned(),
            dimensions,
        })
    }

    /// Forgets which months are known to exist: a purge dropped some.
    pub fn forget_partitions(&self) {
        self.known_partitions.lock().expect("partition cache lock").clear();
    }

    /// Creates the monthly partitions the given timestamps fall into, outside
    /// any write transaction.
    #[tracing::instrument(skip_all)]
    pub async fn ensure_partitions(
        &self,
        timestamps: impl IntoIterator<Item = DateTime<Utc>>,
    ) -> Result<(), CoreError> {
        let mut missing = Vec::new();
        {
            let known = self.known_partitions.lock().expect("partition cache lock");
            for at in timestamps {
                let month = (at.year(), at.month());
                if !known.contains(&month) && !missing.iter().any(|(m, _)| *m == month) {
                    missing.push((month, at));
                }
            }
        }
        for (month, at) in missing {
            // Creating a partition locks the parent tables exclusively. The
            // function gives up on a lock after 100 ms rather than deadlock
            // with a search or the indexer holding the other parent
            // (migration partition_lock_timeout), so that the reader is
            // never the victim; it is idempotent, so try again shortly.
            let mut attempt = 1;
            loop {
                match sqlx::query("SELECT ensure_audit_partitions($1)")
                    .bind(at)
                    .execute(&self.pool)
                    .await
                {
                    Ok(_) => break,
                    Err(error) if is_lock_contention(&error) && attempt < PARTITION_ATTEMPTS => {
                        tracing::info!(%error, attempt, "creating a month's partitions waited on readers; retrying");
                        tokio::time::sleep(PARTITION_RETRY_PAUSE * attempt as u32).await;
                        attempt += 1;
                    }
                    Err(error) if is_lock_contention(&error) => {
                        return Err(CoreError::Unavailable {
                            what: "database",
                            source: anyhow::Error::new(error).context("a new month's partitions stayed locked out"),
                        })
                    }
                    Err(error) => return Err(CoreError::database(error)),
                }
            }
            self.known_partitions
                .lock()
                .expect("partition cache lock")
                .insert(month);
        }
        Ok(())
    }
}
