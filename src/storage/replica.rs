//! Where reads go. IncidentQuery and VectorSearch read from the read replica
//! when one is configured and reachable, and from the primary otherwise;
//! writes, jobs, integrity checks and exports always use the primary.
//!
//! A caller that must read its own writes asks for the primary for one call
//! with the metadata header `datastorage-read-from: primary`; the gRPC gate
//! runs that call inside [`read_from_primary`].
use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use sqlx::{pool::PoolConnection, PgPool, Postgres};

use super::Storage;
use crate::error::CoreError;

/// The metadata header that sends one call's reads to the primary.
pub const READ_FROM_HEADER: &str = "datastorage-read-from";

tokio::task_local! {
    static PRIMARY_READS: ();
}

/// Runs `call` with every read of it on the primary.
pub async fn read_from_primary<F: std::future::Future>(call: F) -> F::Output {
    PRIMARY_READS.scope((), call).await
}

fn primary_asked() -> bool {
    PRIMARY_READS.try_with(|_| ()).is_ok()
}

#[derive(Clone)]
pub(super) struct ReadReplica {
    pool: PgPool,
    /// False after a failed connect, until the monitor reaches it again; reads
    /// go to the primary meanwhile instead of each waiting out a timeout.
    reachable: Arc<AtomicBool>,
}

impl ReadReplica {
    pub(super) fn new(pool: PgPool) -> Self {
        ReadReplica {
            pool,
            reachable: Arc::new(AtomicBool::new(true)),
        }
    }

    fn is_saturated(&self) -> bool {
        self.pool.size() >= self.pool.options().get_max_connections() && self.pool.num_idle() == 0
    }

    fn set_reachable(&self, reachable: bool) {
        if self.reachable.swap(reachable, Ordering::Relaxed) != reachable {
            if reachable {
                tracing::info!("read replica reachable: reads go to it again");
            } else {
                tracing::warn!("read replica unreachable: reads fall back to the primary");
            }
        }
    }
}

impl Storage {
    /// A connection for a read of IncidentQuery or VectorSearch: the replica's
    /// when one is configured, reachable and the call did not ask for the
    /// primary; else the primary's. A replica that fails to connect is
    /// skipped from then on until [`Storage::monitor_replica`] reaches it.
    pub(super) async fn reader(&self) -> Result<PoolConnection<Postgres>, CoreError> {
        if let Some(replica) = self.replica.as_ref() {
            if replica.reachable.load(Ordering::Relaxed) && !primary_asked() {
                match replica.pool.acquire().await {
                    Ok(connection) => return Ok(connection),
                    // Every connection busy is load, not an outage: this read
                    // goes to the primary, the replica stays in use.
                    Err(sqlx::Error::PoolTimedOut) if replica.is_saturated() => {}
                    Err(error) => {
                        tracing::debug!(%error, "read replica connect failed");
                        replica.set_reachable(false);
                    }
                }
            }
        }
        self.primary_connection().await
    }

    pub(super) async fn primary_connection(&self) -> Result<PoolConnection<Postgres>, CoreError> {
        self.pool.acquire().await.map_err(CoreError::database)
    }

    pub fn replica_pool(&self) -> Option<&PgPool> {
        self.replica.as_ref().map(|replica| &replica.pool)
    }

    /// Probes the replica every `interval` and sends reads back to it once it answers.
    pub async fn monitor_replica(self, interval: Duration) {
        let Some(replica) = self.replica.clone() else { return };
        loop {
            tokio::time::sleep(interval).await;
            let answers = sqlx::query("SELECT 1").execute(&replica.pool).await.is_ok();
            replica.set_reachable(answers);
        }
    }
}
