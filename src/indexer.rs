//! The vector indexer: moves fresh embeddings into their HNSW index.
//!
//! Writes leave embeddings in the unindexed fresh segment (see
//! `storage::vector_index`); searches compare those exactly, so a written
//! event is searchable as soon as it commits. This task keeps the segment
//! small: one batch per transaction, back to back while there is work, a
//! short sleep when there is none. Every replica runs `vector_index.workers`
//! of them; they share the work through `FOR UPDATE SKIP LOCKED`.
use std::time::Duration;

use metrics::counter;

use crate::{config::VectorIndexSettings, metrics::VECTOR_INDEX_MOVED, storage::Storage};

/// After a failed batch (database down, read-only), wait this long before
/// trying again, so an outage does not become a busy loop of errors.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(1);

pub async fn run(storage: Storage, settings: VectorIndexSettings) {
    let batch = settings.batch_size as usize;
    let idle = Duration::from_millis(settings.idle_poll_ms);
    loop {
        match storage.index_fresh_embeddings(batch).await {
            Ok(moved) => {
                counter!(VECTOR_INDEX_MOVED).increment(moved);
                if (moved as usize) < batch {
                    tokio::time::sleep(idle).await;
                }
            }
            Err(error) => {
                tracing::warn!(%error, "moving fresh embeddings into the vector index failed; retrying");
                tokio::time::sleep(RETRY_AFTER_FAILURE).await;
            }
        }
    }
}
