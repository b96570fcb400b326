//! What the maintenance jobs do to the data. Each job's to-do list is a query
//! over the data itself (pending markers, events without an embedding for a
//! model, rows older than a cut-off, a model's index partitions), so a job
//! that is interrupted resumes by running again: nothing about its progress
//! needs to survive anywhere else.
use chrono::{DateTime, Utc};
use sqlx::QueryBuilder;
use uuid::Uuid;

use super::{ModelHandle, Storage};
use crate::{domain::EmbeddingState, error::CoreError};

/// An event that needs an embedding for a model, and the text to embed.
#[derive(Debug, Clone)]
pub struct EmbeddingTask {
    pub event_id: Uuid,
    pub occurred_at: DateTime<Utc>,
    pub text: String,
}

/// Where a reembed pass has got to: events are walked in (occurred_at, id) order.
pub type EventPosition = (DateTime<Utc>, Uuid);

impl Storage {
    /// Deferred events of `model` still waiting for an embedding.
    pub async fn pending_embedding_count(&self, model: &ModelHandle) -> Result<i64, CoreError> {
        sqlx::query_scalar("SELECT count(*) FROM pending_embeddings WHERE model_id = $1")
            .bind(model.id)
            .fetch_one(&self.pool)
            .await
            .map_err(CoreError::database)
    }

    /// The oldest `limit` deferred events of `model`. An event whose text is
    /// gone (cannot happen for a stored event) would never leave the list, so
    /// the join keeps only those that can be embedded.
    pub async fn pending_embeddings(&self, model: &ModelHandle, limit: usize) -> Result<Vec<EmbeddingTask>, CoreError> {
        let rows: Vec<(Uuid, DateTime<Utc>, String)> = sqlx::query_as(
            "SELECT p.event_id, p.occurred_at, e.search_text FROM pending_embeddings p \
             JOIN audit_events e ON e.id = p.event_id AND e.occurred_at = p.occurred_at \
             WHERE p.model_id = $1 AND e.search_text IS NOT NULL \
             ORDER BY p.created_at, p.event_id LIMIT $2",
        )
        .bind(model.id)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await
        .map_err(CoreError::database)?;
        Ok(rows.into_iter().map(task).collect())
    }

    /// Events with text but no embedding for `model`, after `after`, in
    /// (occurred_at, id) order: a keyset walk, each batch one index range.
    pub async fn events_missing_embedding(
        &self,
        model: &ModelHandle,
        after: Option<EventPosition>,
        limit: usize,
    ) -> Result<Vec<EmbeddingTask>, CoreError> {
        let mut qb = QueryBuilder::new(
            "SELECT e.id, e.occurred_at, e.search_text FROM audit_events e WHERE e.search_text IS NOT NULL \
             AND NOT EXISTS (SELECT 1 FROM audit_embeddings emb \
                             WHERE emb.event_id = e.id AND emb.occurred_at = e.occurred_at AND emb.model_id = ",
        );
        qb.push_bind(model.id).push(")");
        if let Some((at, id)) = after {
            qb.push(" AND (e.occurred_at, e.id) > (")
                .push_bind(at)
                .push(", ")
                .push_bind(id)
                .push(")");
        }
        qb.push(" ORDER BY e.occurred_at, e.id LIMIT ").push_bind(limit as i64);
        let rows: Vec<(Uuid, DateTime<Utc>, String)> = qb
            .build_query_as()
            .fetch_all(&self.pool)
            .await
            .map_err(CoreError::database)?;
        Ok(rows.into_iter().map(task).collect())
    }

    pub async fn events_missing_embedding_count(&self, model: &ModelHandle) -> Result<i64, CoreError> {
        sqlx::query_scalar(
            "SELECT count(*) FROM audit_events e WHERE e.search_text IS NOT NULL \
               AND NOT EXISTS (SELECT 1 FROM audit_embeddings emb \
                               WHERE emb.event_id = e.id AND emb.occurred_at = e.occurred_at AND emb.model_id = $1)",
        )
        .bind(model.id)
        .fetch_one(&self.pool)
        .await
        .map_err(CoreError::database)
    }

    /// Stores embeddings for `model` and clears the events' pending markers in
    /// one transaction. An embedding stored meanwhile (another replica, a
    /// second run) wins; events of the active model that were deferred now
    /// say how they were embedded. Returns how many were stored.
    pub async fn store_embeddings(
        &self,
        model: &ModelHandle,
        embedded: &[(EmbeddingTask, Vec<f32>)],
    ) -> Result<u64, CoreError> {
        let ids: Vec<Uuid> = embedded.iter().map(|(t, _)| t.event_id).collect();
        let ats: Vec<DateTime<Utc>> = embedded.iter().map(|(t, _)| t.occurred_at).collect();
        let vectors: Vec<pgvector::Vector> = embedded
            .iter()
            .map(|(_, v)| pgvector::Vector::from(v.clone()))
            .collect();
        let mut tx = self.pool.begin().await.map_err(CoreError::database)?;
        let stored = sqlx::query(
            "INSERT INTO audit_embeddings (event_id, occurred_at, model_id, embedding) \
             SELECT id, at, $4, embedding FROM unnest($1::uuid[], $2::timestamptz[], $3::vector[]) AS t(id, at, embedding) \
             ON CONFLICT DO NOTHING",
        )
        .bind(&ids)
        .bind(&ats)
        .bind(&vectors)
        .bind(model.id)
        .execute(&mut *tx)
        .await
        .map_err(CoreError::database)?
        .rows_affected();
        sqlx::query(
            "DELETE FROM pending_embeddings p USING unnest($1::uuid[], $2::timestamptz[]) AS t(id, at) \
             WHERE p.event_id = t.id AND p.occurred_at = t.at AND p.model_id = $3",
        )
        .bind(&ids)
        .bind(&ats)
        .bind(model.id)
        .execute(&mut *tx)
        .await
        .map_err(CoreError::database)?;
        sqlx::query(
            "UPDATE audit_events e SET embedding_state = $4 FROM unnest($1::uuid[], $2::timestamptz[]) AS t(id, at) \
             WHERE e.id = t.id AND e.occurred_at = t.at AND e.embedding_state = $5 \
               AND EXISTS (SELECT 1 FROM embedding_models m WHERE m.id = $3 AND m.active)",
        )
        .bind(&ids)
        .bind(&ats)
        .bind(model.id)
        .bind(EmbeddingState::Generated.code())
        .bind(EmbeddingState::Deferred.code())
        .execute(&mut *tx)
        .await
        .map_err(CoreError::database)?;
        tx.commit().await.map_err(CoreError::database)?;
        Ok(stored)
    }

    /// Makes `model` the one searches use by default. Events written with the
    /// previous model from now on get a pending marker for this one (see
    /// `write_events`), so the switch loses no event.
    pub async fn activate_model(&self, model: &ModelHandle) -> Result<(), CoreError> {
        let mut tx = self.pool.begin().await.map_err(CoreError::database)?;
        // One active model at a time is a unique index: clear, then set.
        sqlx::query("UPDATE embedding_models SET active = false WHERE active AND id <> $1")
            .bind(model.id)
            .execute(&mut *tx)
            .await
            .map_err(CoreError::database)?;
        sqlx::query("UPDATE embedding_models SET active = true WHERE id = $1")
            .bind(model.id)
            .execute(&mut *tx)
            .await
            .map_err(CoreError::database)?;
        tx.commit().await.map_err(CoreError::database)
    }

    /// Returns once every transaction open when it was called has ended.
    pub async fn wait_for_open_transactions(&self) -> Result<(), CoreError> {
        let horizon: String = sqlx::query_scalar("SELECT pg_snapshot_xmax(pg_current_snapshot())::text")
            .fetch_one(&self.pool)
            .await
            .map_err(CoreError::database)?;
        loop {
            let ended: bool = sqlx::query_scalar("SELECT pg_snapshot_xmin(pg_current_snapshot()) >= $1::text::xid8")
                .bind(&horizon)
                .fetch_one(&self.pool)
                .await
                .map_err(CoreError::database)?;
            if ended {
                return Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// Monthly partitions (of events, with their embeddings) that end at or
    /// before `cutoff`, oldest first, by the month they start.
    pub async fn partitions_before(&self, cutoff: DateTime<Utc>) -> Result<Vec<DateTime<Utc>>, CoreError> {
        sqlx::query_scalar("SELECT audit_months_before($1)")
            .bind(cutoff)
            .fetch_all(&self.pool)
            .await
            .map_err(CoreError::database)
    }

    /// Drops the month starting at `month_start` (events, embeddings, pending
    /// markers), after taking its executions out of the action rollup, in one
    /// transaction. Returns the events dropped.
    pub async fn drop_month(&self, month_start: DateTime<Utc>) -> Result<u64, CoreError> {
        let mut tx = self.pool.begin().await.map_err(CoreError::database)?;
        let events: i64 = sqlx::query_scalar("SELECT drop_audit_month($1)")
            .bind(month_start)
            .fetch_one(&mut *tx)
            .await
            .map_err(CoreError::database)?;
        tx.commit().await.map_err(CoreError::database)?;
        self.forget_partitions();
        Ok(events as u64)
    }

    /// Deletes up to `limit` events older than `cutoff` (with their embeddings
    /// and markers) from months that also hold newer events.
    pub async fn delete_events_before(&self, cutoff: DateTime<Utc>, limit: usize) -> Result<u64, CoreError> {
        let mut tx = self.pool.begin().await.map_err(CoreError::database)?;
        let keys: Vec<(Uuid, DateTime<Utc>)> = sqlx::query_as(
            "SELECT id, occurred_at FROM audit_events WHERE occurred_at < $1 ORDER BY occurred_at, id LIMIT $2",
        )
        .bind(cutoff)
        .bind(limit as i64)
        .fetch_all(&mut *tx)
        .await
        .map_err(CoreError::database)?;
        if keys.is_empty() {
            return Ok(0);
        }
        let (ids, ats): (Vec<Uuid>, Vec<DateTime<Utc>>) = keys.into_iter().unzip();
        for table in ["audit_embeddings", "pending_embeddings"] {
            // The table name is one of two constants.
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "DELETE FROM {table} x USING unnest($1::uuid[], $2::timestamptz[]) AS t(id, at) \
                 WHERE x.event_id = t.id AND x.occurred_at = t.at"
            )))
            .bind(&ids)
            .bind(&ats)
            .execute(&mut *tx)
            .await
            .map_err(CoreError::database)?;
        }
        let deleted = sqlx::query(
            "DELETE FROM audit_events e USING unnest($1::uuid[], $2::timestamptz[]) AS t(id, at) \
             WHERE e.id = t.id AND e.occurred_at = t.at",
        )
        .bind(&ids)
        .bind(&ats)
        .execute(&mut *tx)
        .await
        .map_err(CoreError::database)?
        .rows_affected();
        tx.commit().await.map_err(CoreError::database)?;
        Ok(deleted)
    }

    /// Deletes up to `limit` incidents whose every event is older than
    /// `cutoff` (their last event is), so they have none left after a purge.
    pub async fn delete_incidents_before(&self, cutoff: DateTime<Utc>, limit: usize) -> Result<u64, CoreError> {
        let deleted = sqlx::query(
            "DELETE FROM incidents WHERE id IN \
             (SELECT id FROM incidents WHERE last_event_at < $1 ORDER BY last_event_at, id LIMIT $2)",
        )
        .bind(cutoff)
        .bind(limit as i64)
        .execute(&self.pool)
        .await
        .map_err(CoreError::database)?
        .rows_affected();
        Ok(deleted)
    }

    pub async fn events_before_count(&self, cutoff: DateTime<Utc>) -> Result<i64, CoreError> {
        sqlx::query_scalar("SELECT count(*) FROM audit_events WHERE occurred_at < $1")
            .bind(cutoff)
            .fetch_one(&self.pool)
            .await
            .map_err(CoreError::database)
    }

    /// The partitions of `model`'s HNSW index, by their qualified names as
    /// the catalog spells them.
    pub async fn model_index_partitions(&self, model: &ModelHandle) -> Result<Vec<String>, CoreError> {
        sqlx::query_scalar(
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_inherits i \
             JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE i.inhparent = to_regclass(format('audit_embeddings_hnsw_model_%s', $1::int)) \
             ORDER BY c.relname",
        )
        .bind(i32::from(model.id))
        .fetch_all(&self.pool)
        .await
        .map_err(CoreError::database)
    }

    /// Rebuilds one index without blocking writes or searches.
    /// `qualified_name` comes from `model_index_partitions` (the catalog,
    /// already quoted), never from a request.
    pub async fn reindex_concurrently(&self, qualified_name: &str) -> Result<(), CoreError> {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "REINDEX INDEX CONCURRENTLY {qualified_name}"
        )))
        .execute(&self.pool)
        .await
        .map_err(CoreError::database)?;
        Ok(())
    }
}

fn task((event_id, occurred_at, text): (Uuid, DateTime<Utc>, String)) -> EmbeddingTask {
    EmbeddingTask {
        event_id,
        occurred_at,
        text,
    }
}
