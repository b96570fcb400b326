//! The fresh segment (migration 6): where new embeddings wait for their HNSW
//! index, and the batched move into it.
use std::time::Duration;

use super::Storage;
use crate::error::CoreError;

impl Storage {
    /// Moves up to `limit` of the oldest fresh embeddings into the indexed
    /// table in one transaction: every row is in exactly one of the two at
    /// any moment a search can see. Rows locked by another replica's indexer
    /// are skipped, not waited for. A row whose event has been purged in the
    /// meantime is dropped (its month's partition may be gone). Returns how
    /// many rows left the fresh segment.
    pub async fn index_fresh_embeddings(&self, limit: usize) -> Result<u64, CoreError> {
        // Most polls find nothing: ask first, touching only the small table,
        // so an idle indexer takes no locks on the partitioned ones.
        let waiting: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM fresh_embeddings)")
            .fetch_one(&self.pool)
            .await
            .map_err(CoreError::database)?;
        if !waiting {
            return Ok(0);
        }
        let (moved,): (i64,) = sqlx::query_as(
            "WITH moved AS ( \
                 DELETE FROM fresh_embeddings f \
                 WHERE (f.event_id, f.model_id, f.occurred_at) IN ( \
                     SELECT event_id, model_id, occurred_at FROM fresh_embeddings \
                     ORDER BY created_at LIMIT $1 FOR UPDATE SKIP LOCKED) \
                 RETURNING f.event_id, f.occurred_at, f.model_id, f.embedding, f.created_at), \
             indexed AS ( \
                 INSERT INTO audit_embeddings (event_id, occurred_at, model_id, embedding, created_at) \
                 SELECT m.event_id, m.occurred_at, m.model_id, m.embedding, m.created_at FROM moved m \
                 WHERE EXISTS (SELECT 1 FROM audit_events e WHERE e.id = m.event_id AND e.occurred_at = m.occurred_at) \
                 ON CONFLICT DO NOTHING) \
             SELECT count(*) FROM moved",
        )
        .bind(limit as i64)
        .fetch_one(&self.pool)
        .await
        .map_err(CoreError::database)?;
        Ok(moved as u64)
    }

    /// How long the oldest fresh embedding has waited for the index; None
    /// when every embedding is indexed.
    pub async fn fresh_embeddings_lag(&self) -> Result<Option<Duration>, CoreError> {
        let seconds: Option<f64> = sqlx::query_scalar(
            "SELECT extract(epoch FROM clock_timestamp() - min(created_at))::float8 FROM fresh_embeddings",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(CoreError::database)?;
        Ok(seconds.map(|s| Duration::from_secs_f64(s.max(0.0))))
    }
}
