//! The vector indexer: moves fresh embeddings into their HNSW index.
//!
//! Writes leave embeddings in the unindexed fresh segment (see
//! `storage::vector_index`); searches compare those exactly, so a written
//! event is searchable as soon as it commits. This task keeps the segment
//! small: one batch per transaction, back to back while batches come back
//! full, a short pause after a partial one, `idle_poll_ms` when there is
//! nothing to move. Every replica runs `vector_index.workers`
//! of them; they share the work through `FOR UPDATE SKIP LOCKED`.
use std::time::Duration;

use metrics::counter;

use crate::{config::VectorIndexSettings, metrics::VECTOR_INDEX_MOVED, storage::Storage};

/// After a failed batch (database down, read-only), wait this long before
/// trying again, so an outage does not become a busy loop of errors.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(1);

/// The pause after a partial batch, while writes trickle in. A batch's HNSW
/// inserts hold a core until they commit, and on a small machine writes wait
/// for it: smaller, more frequent batches keep those bursts short. At 500
/// writes/s, two-minute runs alternating with the previous 100 ms pause gave
/// WriteAudit p99 17.2 / 16.3 ms against 21.0 / 26.8 ms (docs/performance.md).
const TRICKLE_PAUSE: Duration = Duration::from_millis(20);

pub async fn run(storage: Storage, settings: VectorIndexSettings) {
    let batch = settings.batch_size as usize;
    let idle = Duration::from_millis(settings.idle_poll_ms);
    loop {
        match storage.index_fresh_embeddings(batch).await {
            Ok(moved) => {
                counter!(VECTOR_INDEX_MOVED).increment(moved);
                match moved as usize {
                    0 => tokio::time::sleep(idle).await,
                    partial if partial < batch => tokio::time::sleep(TRICKLE_PAUSE.min(idle)).await,
                    _ => {}
                }
            }
            Err(error) => {
                tracing::warn!(%error, "moving fresh embeddings into the vector index failed; retrying");
                tokio::time::sleep(RETRY_AFTER_FAILURE).await;
            }
        }
    }
}
