//! What the maintenance jobs do to the data. Each job's to-do list is a query
//! over the data itself (pending markers, events without an embedding for a
//! model, rows older than a cut-off, a model's index partitions), so a job
//! that is interrupted resumes by running again: nothing about its progress
//! needs to survive anywhere else.
use chrono::{DateTime, Utc};
use sqlx::QueryBuilder;
use uuid::Uuid;

use super::{ModelHandle, Storage};
use crate::{
    config::RetentionSettings,
    domain::{AuditKind, EmbeddingState},
    error::CoreError,
};

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
    /// Events waiting for any model's embedding (the metrics gauge).
    pub async fn pending_embeddings_total(&self) -> Result<i64, CoreError> {
        sqlx::query_scalar("SELECT count(*) FROM pending_embeddings")
            .fetch_one(&self.pool)
            .await
            .map_err(CoreError::database)
    }

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
             AND NOT EXISTS (SELECT 1 FROM stored_embeddings emb \
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
               AND NOT EXISTS (SELECT 1 FROM stored_embeddings emb \
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

    /// Opens the record of a purge run; its id authorises the run's deletes.
    pub async fn start_purge_run(
        &self,
        job_id: &str,
        requested_by: &str,
        older_than: DateTime<Utc>,
        cutoffs: &RetentionCutoffs,
    ) -> Result<i64, CoreError> {
        sqlx::query_scalar(
            "INSERT INTO purge_runs (job_id, requested_by, older_than, policies) VALUES ($1, $2, $3, $4) RETURNING id",
        )
        .bind(job_id)
        .bind(requested_by)
        .bind(older_than)
        .bind(cutoffs.describe())
        .fetch_one(&self.pool)
        .await
        .map_err(CoreError::database)
    }

    /// Closes the run's record with what it removed and what it had to keep
    /// of the events older than `older_than`: (held, kept by a policy).
    pub async fn finish_purge_run(
        &self,
        run: i64,
        purged: i64,
        partitions_dropped: i64,
        older_than: DateTime<Utc>,
    ) -> Result<(i64, i64), CoreError> {
        sqlx::query_as(
            "WITH kept AS (SELECT count(*) FILTER (WHERE audit_event_is_held(correlation_id)) AS held, \
                                  count(*) FILTER (WHERE NOT audit_event_is_held(correlation_id)) AS by_policy \
                           FROM audit_events WHERE occurred_at < $4) \
             UPDATE purge_runs SET finished_at = now(), events_purged = $2, partitions_dropped = $3, \
                    events_held = kept.held, events_kept_by_policy = kept.by_policy \
             FROM kept WHERE id = $1 RETURNING kept.held, kept.by_policy",
        )
        .bind(run)
        .bind(purged)
        .bind(partitions_dropped)
        .bind(older_than)
        .fetch_one(&self.pool)
        .await
        .map_err(CoreError::database)
    }

    /// Drops the month starting at `month_start` (events, embeddings, pending
    /// markers) after taking its executions out of the action rollup and
    /// leaving its tombstones, in one transaction. Returns the events dropped,
    /// or None when the month holds held events (the row deletes handle it).
    pub async fn drop_month(&self, month_start: DateTime<Utc>, run: i64) -> Result<Option<u64>, CoreError> {
        let mut tx = self.pool.begin().await.map_err(CoreError::database)?;
        let events: Option<i64> = sqlx::query_scalar("SELECT drop_audit_month($1, $2)")
            .bind(month_start)
            .bind(run)
            .fetch_one(&mut *tx)
            .await
            .map_err(CoreError::database)?;
        tx.commit().await.map_err(CoreError::database)?;
        self.forget_partitions();
        Ok(events.map(|n| n as u64))
    }

    /// Looks at up to `limit` events after `after` (in occurred_at, id order)
    /// that are older than the latest cutoff, and deletes those their
    /// category's cutoff lets go and no hold keeps, with their embeddings and
    /// markers. Holds are locked (SHARE) for the transaction, so none can be
    /// placed between the check and the delete. Returns the events deleted
    /// and the last one looked at (None: nothing left to look at).
    pub async fn delete_events_before(
        &self,
        cutoffs: &RetentionCutoffs,
        run: i64,
        after: Option<EventPosition>,
        limit: usize,
    ) -> Result<(u64, Option<EventPosition>), CoreError> {
        let mut tx = self.pool.begin().await.map_err(CoreError::database)?;
        sqlx::query("SELECT set_config('datastorage.purge_run', $1, true)")
            .bind(run.to_string())
            .execute(&mut *tx)
            .await
            .map_err(CoreError::database)?;
        sqlx::query("LOCK TABLE legal_holds IN SHARE MODE")
            .execute(&mut *tx)
            .await
            .map_err(CoreError::database)?;
        let (after_at, after_id) = after.unzip();
        let (kinds, types, policy_cutoffs) = cutoffs.policy_columns();
        let scanned: Vec<(Uuid, DateTime<Utc>, bool)> = sqlx::query_as(
            "WITH scanned AS ( \
                 SELECT e.id, e.occurred_at, e.kind, e.payload->>'event_type' AS event_type, e.correlation_id \
                 FROM audit_events e \
                 WHERE e.occurred_at < $1 AND ($2::timestamptz IS NULL OR (e.occurred_at, e.id) > ($2, $3)) \
                 ORDER BY e.occurred_at, e.id LIMIT $4) \
             SELECT s.id, s.occurred_at, \
                    s.occurred_at < coalesce( \
                        (SELECT p.cutoff FROM unnest($5::smallint[], $6::text[], $7::timestamptz[]) \
                                 AS p(kind, event_type, cutoff) \
                         WHERE p.kind = s.kind AND (p.event_type IS NULL OR p.event_type = s.event_type) \
                         ORDER BY p.event_type IS NULL LIMIT 1), $8) \
                    AND NOT audit_event_is_held(s.correlation_id) \
             FROM scanned s ORDER BY s.occurred_at, s.id",
        )
        .bind(cutoffs.latest())
        .bind(after_at)
        .bind(after_id)
        .bind(limit as i64)
        .bind(&kinds)
        .bind(&types)
        .bind(&policy_cutoffs)
        .bind(cutoffs.default)
        .fetch_all(&mut *tx)
        .await
        .map_err(CoreError::database)?;
        let Some(&(last_id, last_at, _)) = scanned.last() else {
            return Ok((0, None));
        };
        let (ids, ats): (Vec<Uuid>, Vec<DateTime<Utc>>) =
            scanned.into_iter().filter(|s| s.2).map(|(id, at, _)| (id, at)).unzip();
        // The fresh segment first. An indexer moving one of these rows holds
        // its lock until it has inserted it into audit_embeddings and
        // committed; the delete waits for that, and the next statement's
        // snapshot then sees the moved row and deletes it. In the other
        // order, audit_embeddings was deleted from before the move
        // committed, and the moved embedding outlived its event.
        for table in ["fresh_embeddings", "audit_embeddings", "pending_embeddings"] {
            // The table name is one of these constants.
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
        Ok((deleted, Some((last_at, last_id))))
    }

    /// Deletes up to `limit` incidents whose last event is older than
    /// `cutoff` and that have no event left.
    pub async fn delete_incidents_before(&self, cutoff: DateTime<Utc>, limit: usize) -> Result<u64, CoreError> {
        let deleted = sqlx::query(
            "DELETE FROM incidents WHERE id IN \
             (SELECT i.id FROM incidents i WHERE i.last_event_at < $1 \
                AND NOT EXISTS (SELECT 1 FROM audit_events e WHERE e.incident_id = i.id) \
              ORDER BY i.last_event_at, i.id LIMIT $2)",
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

/// The cutoffs of one purge: an event may go when it is older than the cutoff
/// of its category, which is the requested `older_than` or, when a retention
/// floor is later, the floor. The most specific policy of an event applies
/// (a custom event type before its kind, a kind before the default).
#[derive(Debug, Clone, PartialEq)]
pub struct RetentionCutoffs {
    pub default: DateTime<Utc>,
    pub policies: Vec<PolicyCutoff>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PolicyCutoff {
    pub kind: AuditKind,
    pub event_type: Option<String>,
    pub cutoff: DateTime<Utc>,
}

impl RetentionCutoffs {
    pub fn new(older_than: DateTime<Utc>, now: DateTime<Utc>, settings: &RetentionSettings) -> Self {
        let floor = |days: u32| older_than.min(now - chrono::Duration::days(i64::from(days)));
        RetentionCutoffs {
            default: floor(settings.default_min_age_days),
            policies: settings
                .policies
                .iter()
                .map(|p| PolicyCutoff {
                    kind: p.kind,
                    event_type: p.event_type.clone(),
                    cutoff: floor(p.min_age_days),
                })
                .collect(),
        }
    }

    /// Months that end before this hold only events every policy lets go.
    pub fn earliest(&self) -> DateTime<Utc> {
        self.policies.iter().map(|p| p.cutoff).fold(self.default, DateTime::min)
    }

    /// No event after this may go.
    pub fn latest(&self) -> DateTime<Utc> {
        self.policies.iter().map(|p| p.cutoff).fold(self.default, DateTime::max)
    }

    fn policy_columns(&self) -> (Vec<i16>, Vec<Option<String>>, Vec<DateTime<Utc>>) {
        let kinds = self.policies.iter().map(|p| p.kind.code()).collect();
        let types = self.policies.iter().map(|p| p.event_type.clone()).collect();
        let cutoffs = self.policies.iter().map(|p| p.cutoff).collect();
        (kinds, types, cutoffs)
    }

    /// The run record's account of the cutoffs it applied.
    pub fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "default_cutoff": self.default.to_rfc3339(),
            "policies": self.policies.iter().map(|p| serde_json::json!({
                "kind": p.kind,
                "event_type": p.event_type,
                "cutoff": p.cutoff.to_rfc3339(),
            })).collect::<Vec<_>>(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RetentionPolicySettings;

    #[test]
    fn floors_only_ever_move_a_cutoff_back() {
        let now = DateTime::parse_from_rfc3339("2026-11-23T00:00:00Z").unwrap().to_utc();
        let older_than = now - chrono::Duration::days(30);
        let settings = RetentionSettings {
            default_min_age_days: 7,
            policies: vec![
                RetentionPolicySettings {
                    kind: AuditKind::Execution,
                    event_type: None,
                    min_age_days: 2555,
                },
                RetentionPolicySettings {
                    kind: AuditKind::Custom,
                    event_type: Some("login".into()),
                    min_age_days: 90,
                },
            ],
        };
        let cutoffs = RetentionCutoffs::new(older_than, now, &settings);
        assert_eq!(
            cutoffs.default, older_than,
            "a 7-day floor does not hold back a 30-day purge"
        );
        assert_eq!(cutoffs.policies[0].cutoff, now - chrono::Duration::days(2555));
        assert_eq!(cutoffs.policies[1].cutoff, now - chrono::Duration::days(90));
        assert_eq!(cutoffs.earliest(), now - chrono::Duration::days(2555));
        assert_eq!(cutoffs.latest(), older_than);
    }
}
