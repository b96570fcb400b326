//! The audit write transaction: idempotency keys, events, embeddings (or
//! pending markers) and the incident projection commit together or not at all.
use std::collections::HashSet;

use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use super::{incidents, ModelHandle, Storage};
use crate::{
    domain::{incident_id_for, AuditEvent, EmbeddingState, Payload, RequestId, WriteReceipt},
    error::CoreError,
};

/// One write, embedding already decided, ready for the transaction.
#[derive(Debug, Clone)]
pub struct PreparedWrite {
    pub event: AuditEvent,
    pub request_id: Option<RequestId>,
    pub search_text: Option<String>,
    pub embedding: EmbeddingDecision,
}

#[derive(Debug, Clone)]
pub enum EmbeddingDecision {
    Vector {
        values: Vec<f32>,
        state: EmbeddingState,
    },
    /// Stored with a pending marker; the backfill job embeds it later.
    Deferred {
        reason: String,
    },
    /// Nothing to embed.
    None,
}

impl EmbeddingDecision {
    fn state(&self) -> EmbeddingState {
        match self {
            EmbeddingDecision::Vector { state, .. } => *state,
            EmbeddingDecision::Deferred { .. } => EmbeddingState::Deferred,
            EmbeddingDecision::None => EmbeddingState::NotEmbedded,
        }
    }
}

/// Deadlocks and serialization failures are retried this many times in all.
const MAX_ATTEMPTS: usize = 3;

enum TxFailure {
    Retry(sqlx::Error),
    /// No partition holds the row: the cached month was dropped.
    MissingPartition(sqlx::Error),
    Fail(CoreError),
}

impl From<sqlx::Error> for TxFailure {
    fn from(error: sqlx::Error) -> Self {
        if CoreError::is_retryable_conflict(&error) {
            TxFailure::Retry(error)
        } else if is_missing_partition(&error) {
            TxFailure::MissingPartition(error)
        } else {
            TxFailure::Fail(CoreError::database(error))
        }
    }
}

/// PostgreSQL reports a row no partition accepts as a check violation (23514)
/// on the partitioned table itself.
fn is_missing_partition(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) => {
            db.code().as_deref() == Some("23514") && db.message().starts_with("no partition of relation")
        }
        _ => false,
    }
}

impl Storage {
    /// Ids among `ids` that name stored events.
    pub async fn existing_event_ids(&self, ids: &[Uuid]) -> Result<HashSet<Uuid>, CoreError> {
        if ids.is_empty() {
            return Ok(HashSet::new());
        }
        let found: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM audit_events WHERE id = ANY($1)")
            .bind(ids)
            .fetch_all(&self.pool)
            .await
            .map_err(CoreError::database)?;
        Ok(found.into_iter().collect())
    }

    /// Writes every event or none. Receipts come back in request order; a
    /// request whose key was already used for the same event is answered from
    /// the stored key and writes nothing.
    #[tracing::instrument(skip_all, fields(events = writes.len()))]
    pub async fn write_events(
        &self,
        source: &str,
        model: &ModelHandle,
        writes: &[PreparedWrite],
    ) -> Result<Vec<WriteReceipt>, CoreError> {
        self.ensure_partitions(writes.iter().map(|w| w.event.occurred_at))
            .await?;
        let mut attempt = 1;
        loop {
            match self.try_write_events(source, model, writes).await {
                Ok(receipts) => return Ok(receipts),
                // A month this process created was dropped since (retention,
                // perhaps by another replica): create it again.
                Err(TxFailure::MissingPartition(error)) if attempt < MAX_ATTEMPTS => {
                    tracing::info!(%error, "a month's partition is gone; recreating it");
                    self.forget_partitions();
                    self.ensure_partitions(writes.iter().map(|w| w.event.occurred_at))
                        .await?;
                    attempt += 1;
                }
                Err(TxFailure::Retry(error)) if attempt < MAX_ATTEMPTS => {
                    tracing::info!(%error, attempt, "write transaction conflicted; retrying");
                    attempt += 1;
                }
                Err(TxFailure::Retry(error) | TxFailure::MissingPartition(error)) => {
                    return Err(CoreError::database(error))
                }
                Err(TxFailure::Fail(error)) => return Err(error),
            }
        }
    }

    async fn try_write_events(
        &self,
        source: &str,
        model: &ModelHandle,
        writes: &[PreparedWrite],
    ) -> Result<Vec<WriteReceipt>, TxFailure> {
        let mut tx = self.pool.begin().await?;
        let event_ids: Vec<Uuid> = writes.iter().map(|_| Uuid::now_v7()).collect();
        let mut receipts: Vec<WriteReceipt> = writes
            .iter()
            .zip(&event_ids)
            .map(|(w, &event_id)| WriteReceipt {
                event_id,
                incident_id: incident_id_for(&w.event.remediation_request_id),
                duplicate: false,
                embedding_state: w.embedding.state(),
            })
            .collect();

        // Keys, then incidents, are locked in a stable order so that two
        // concurrent batches touching the same rows cannot deadlock.
        let mut keyed: Vec<usize> = (0..writes.len()).filter(|&i| writes[i].request_id.is_some()).collect();
        keyed.sort_by(|&a, &b| writes[a].request_id.cmp(&writes[b].request_id));
        for index in keyed {
            if let Some(original) = claim_request_id(&mut tx, source, &writes[index], &receipts[index]).await? {
                receipts[index] = original;
            }
        }

        for (write, receipt) in writes.iter().zip(&receipts) {
            if !receipt.duplicate {
                insert_event(&mut tx, source, model, write, receipt).await?;
            }
        }

        let mut projected: Vec<usize> = (0..writes.len()).filter(|&i| !receipts[i].duplicate).collect();
        projected.sort_by(|&a, &b| {
            let (ea, eb) = (&writes[a].event, &writes[b].event);
            (&ea.remediation_request_id, ea.occurred_at).cmp(&(&eb.remediation_request_id, eb.occurred_at))
        });
        for index in projected {
            let receipt = &receipts[index];
            incidents::apply_event(&mut tx, receipt.incident_id, receipt.event_id, &writes[index].event).await?;
        }

        tx.commit().await?;
        Ok(receipts)
    }
}

/// Claims the request's idempotency key inside the transaction. Returns the
/// original receipt when the key was already used for the same event; a
/// concurrent writer of the same key makes this wait for its commit, so
/// exactly one of them writes.
async fn claim_request_id(
    tx: &mut Transaction<'_, Postgres>,
    source: &str,
    write: &PreparedWrite,
    receipt: &WriteReceipt,
) -> Result<Option<WriteReceipt>, TxFailure> {
    let request_id = write.request_id.as_ref().expect("only keyed writes are claimed");
    let hash = write.event.content_hash();
    let claimed = sqlx::query(
        "INSERT INTO idempotency_keys (source, request_id, request_hash, event_id, incident_id, embedding_state) \
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (source, request_id) DO NOTHING",
    )
    .bind(source)
    .bind(request_id.as_str())
    .bind(&hash[..])
    .bind(receipt.event_id)
    .bind(receipt.incident_id)
    .bind(receipt.embedding_state.code())
    .execute(&mut **tx)
    .await?
    .rows_affected()
        == 1;
    if claimed {
        return Ok(None);
    }
    let (stored_hash, event_id, incident_id, state): (Vec<u8>, Uuid, Uuid, i16) = sqlx::query_as(
        "SELECT request_hash, event_id, incident_id, embedding_state FROM idempotency_keys \
         WHERE source = $1 AND request_id = $2",
    )
    .bind(source)
    .bind(request_id.as_str())
    .fetch_one(&mut **tx)
    .await?;
    if stored_hash != hash {
        return Err(TxFailure::Fail(CoreError::AlreadyExists(format!(
            "request_id {:?} was already used for a different event",
            request_id.as_str()
        ))));
    }
    Ok(Some(WriteReceipt {
        event_id,
        incident_id,
        duplicate: true,
        embedding_state: EmbeddingState::from_code(state).unwrap_or(EmbeddingState::NotEmbedded),
    }))
}

async fn insert_event(
    tx: &mut Transaction<'_, Postgres>,
    source: &str,
    model: &ModelHandle,
    write: &PreparedWrite,
    receipt: &WriteReceipt,
) -> Result<(), TxFailure> {
    let event = &write.event;
    let labels = serde_json::to_value(&event.labels).map_err(|e| TxFailure::Fail(CoreError::Internal(e.into())))?;
    let payload = serde_json::to_value(&event.payload).map_err(|e| TxFailure::Fail(CoreError::Internal(e.into())))?;
    let execution = match &event.payload {
        Payload::Execution(execution) => Some(execution),
        _ => None,
    };
    sqlx::query(
        "INSERT INTO audit_events (id, occurred_at, incident_id, correlation_id, remediation_request_id, namespace, \
         cluster, kind, labels, parent_event_id, payload, search_text, source, embedding_state, action_type, \
         execution_status, duration_ms) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)",
    )
    .bind(receipt.event_id)
    .bind(event.occurred_at)
    .bind(receipt.incident_id)
    .bind(&event.correlation_id)
    .bind(&event.remediation_request_id)
    .bind(&event.namespace)
    .bind(&event.cluster)
    .bind(event.kind().code())
    .bind(labels)
    .bind(event.parent_event_id)
    .bind(payload)
    .bind(&write.search_text)
    .bind(source)
    .bind(receipt.embedding_state.code())
    .bind(execution.map(|e| e.action_type.as_str()))
    .bind(execution.map(|e| e.status.code()))
    .bind(execution.and_then(|e| e.duration).map(|d| d.as_secs_f64() * 1000.0))
    .execute(&mut **tx)
    .await?;

    match &write.embedding {
        EmbeddingDecision::Vector { values, .. } => {
            sqlx::query(
                "INSERT INTO audit_embeddings (event_id, occurred_at, model_id, embedding) VALUES ($1, $2, $3, $4)",
            )
            .bind(receipt.event_id)
            .bind(event.occurred_at)
            .bind(model.id)
            .bind(pgvector::Vector::from(values.clone()))
            .execute(&mut **tx)
            .await?;
            // Written with a model that is no longer the active one (a reembed
            // just switched): the backfill embeds it with the active one too.
            sqlx::query(
                "INSERT INTO pending_embeddings (event_id, occurred_at, model_id, reason) \
                 SELECT $1, $2, m.id, 'written while another model became active' FROM embedding_models m \
                 WHERE m.active AND m.id <> $3 ON CONFLICT DO NOTHING",
            )
            .bind(receipt.event_id)
            .bind(event.occurred_at)
            .bind(model.id)
            .execute(&mut **tx)
            .await?;
        }
        EmbeddingDecision::Deferred { reason } => {
            sqlx::query(
                "INSERT INTO pending_embeddings (event_id, occurred_at, model_id, reason) VALUES ($1, $2, $3, $4)",
            )
            .bind(receipt.event_id)
            .bind(event.occurred_at)
            .bind(model.id)
            .bind(reason)
            .execute(&mut **tx)
            .await?;
        }
        EmbeddingDecision::None => {}
    }
    Ok(())
}
