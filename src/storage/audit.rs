//! The audit write transaction: idempotency keys, events with their chain
//! links, embeddings (or pending markers) and the incident projection commit
//! together or not at all.
use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use super::{incidents, ModelHandle, Storage};
use crate::{
    domain::{incident_id_for, AuditEvent, EmbeddingState, Payload, RequestId, WriteReceipt},
    error::CoreError,
    integrity::chain::{ChainHasher, ChainLink, ChainRecord},
};

/// One write, embedding already decided, ready for the transaction. The
/// event id and receipt time are fixed before it, so a retried transaction
/// (or a replay from the outage queue) writes the same event.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PreparedWrite {
    pub event_id: Uuid,
    /// Microsecond precision, as stored.
    pub received_at: DateTime<Utc>,
    pub event: AuditEvent,
    pub request_id: Option<RequestId>,
    pub search_text: Option<String>,
    pub embedding: EmbeddingDecision,
    /// The W3C trace id of the call that wrote it, when the caller sent one.
    #[serde(default)]
    pub trace_id: Option<String>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
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
    pub fn state(&self) -> EmbeddingState {
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
    #[tracing::instrument(name = "db.transaction", skip_all, fields(db.system = "postgresql", events = writes.len()))]
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
        let mut receipts: Vec<WriteReceipt> = writes
            .iter()
            .map(|w| WriteReceipt {
                event_id: w.event_id,
                incident_id: incident_id_for(&w.event.remediation_request_id),
                duplicate: false,
                embedding_state: w.embedding.state(),
                queued: false,
            })
            .collect();

        // Keys, then chain heads, then incidents are locked, each in a stable
        // order, so that concurrent batches touching the same rows queue
        // instead of deadlocking.
        let mut keyed: Vec<usize> = (0..writes.len()).filter(|&i| writes[i].request_id.is_some()).collect();
        keyed.sort_by(|&a, &b| writes[a].request_id.cmp(&writes[b].request_id));
        for index in keyed {
            if let Some(original) = claim_request_id(&mut tx, source, &writes[index], &receipts[index]).await? {
                receipts[index] = original;
            }
        }

        let fresh: Vec<usize> = (0..writes.len()).filter(|&i| !receipts[i].duplicate).collect();
        // An event already stored under its id is a replay of a write whose
        // commit was never acknowledged (the outage queue): it is not written twice.
        let stored = stored_event_ids(&mut tx, writes, &fresh).await?;
        for &index in &fresh {
            if stored.contains(&writes[index].event_id) {
                receipts[index].duplicate = true;
            }
        }
        let fresh: Vec<usize> = fresh.into_iter().filter(|&i| !receipts[i].duplicate).collect();
        let mut chains =
            ChainHeads::lock(&mut tx, fresh.iter().map(|&i| writes[i].event.correlation_id.as_str())).await?;
        for &index in &fresh {
            insert_event(
                &mut tx,
                source,
                model,
                self,
                &mut chains,
                &writes[index],
                &receipts[index],
            )
            .await?;
        }
        chains.save(&mut tx).await?;

        let mut projected = fresh;
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
        queued: false,
    }))
}

/// Ids among the fresh writes' that are already stored.
async fn stored_event_ids(
    tx: &mut Transaction<'_, Postgres>,
    writes: &[PreparedWrite],
    fresh: &[usize],
) -> Result<HashSet<Uuid>, TxFailure> {
    let ids: Vec<Uuid> = fresh.iter().map(|&i| writes[i].event_id).collect();
    let ats: Vec<DateTime<Utc>> = fresh.iter().map(|&i| writes[i].event.occurred_at).collect();
    let found: Vec<Uuid> = sqlx::query_scalar(
        "SELECT e.id FROM audit_events e JOIN unnest($1::uuid[], $2::timestamptz[]) AS t(id, at) \
         ON e.id = t.id AND e.occurred_at = t.at",
    )
    .bind(&ids)
    .bind(&ats)
    .fetch_all(&mut **tx)
    .await?;
    Ok(found.into_iter().collect())
}

/// The heads of the chains a transaction appends to, locked until it ends.
struct ChainHeads {
    heads: HashMap<String, (i64, Option<Vec<u8>>)>,
}

impl ChainHeads {
    /// Locks (creating where new) the heads in correlation-id order.
    async fn lock<'a>(
        tx: &mut Transaction<'_, Postgres>,
        correlation_ids: impl Iterator<Item = &'a str>,
    ) -> Result<Self, TxFailure> {
        let mut ids: Vec<&str> = correlation_ids.collect();
        ids.sort_unstable();
        ids.dedup();
        let rows: Vec<(String, i64, Option<Vec<u8>>)> = sqlx::query_as(
            "INSERT INTO audit_chains (correlation_id, length) SELECT id, 0 FROM unnest($1::text[]) AS id ORDER BY id \
             ON CONFLICT (correlation_id) DO UPDATE SET length = audit_chains.length \
             RETURNING correlation_id, length, head_hash",
        )
        .bind(&ids)
        .fetch_all(&mut **tx)
        .await?;
        Ok(ChainHeads {
            heads: rows
                .into_iter()
                .map(|(id, length, hash)| (id, (length, hash)))
                .collect(),
        })
    }

    /// Appends one event's record; returns its sequence number, previous
    /// link and link.
    fn append(&mut self, hasher: &ChainHasher, record: &ChainRecord) -> (i64, Option<Vec<u8>>, ChainLink) {
        let (length, head) = self
            .heads
            .get_mut(&record.correlation_id)
            .expect("every appended chain was locked");
        let link = hasher.link(head.as_deref(), &record.canonical_bytes());
        let previous = head.replace(link.hash.to_vec());
        *length += 1;
        (*length, previous, link)
    }

    async fn save(self, tx: &mut Transaction<'_, Postgres>) -> Result<(), TxFailure> {
        let mut ids = Vec::with_capacity(self.heads.len());
        let mut lengths = Vec::with_capacity(self.heads.len());
        let mut hashes = Vec::with_capacity(self.heads.len());
        for (id, (length, hash)) in self.heads {
            ids.push(id);
            lengths.push(length);
            hashes.push(hash);
        }
        sqlx::query(
            "UPDATE audit_chains c SET length = t.length, head_hash = t.hash \
             FROM unnest($1::text[], $2::bigint[], $3::bytea[]) AS t(id, length, hash) WHERE c.correlation_id = t.id",
        )
        .bind(&ids)
        .bind(&lengths)
        .bind(&hashes)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }
}

/// The record a write's chain link covers; the row is written from it, so
/// what is hashed and what is stored cannot drift apart.
fn chain_record(source: &str, write: &PreparedWrite) -> Result<ChainRecord, TxFailure> {
    let event = &write.event;
    Ok(ChainRecord {
        event_id: write.event_id,
        correlation_id: event.correlation_id.clone(),
        remediation_request_id: event.remediation_request_id.clone(),
        occurred_at: event.occurred_at,
        received_at: write.received_at,
        namespace: event.namespace.clone(),
        cluster: event.cluster.clone(),
        kind: event.kind().code(),
        labels: event.labels.clone(),
        parent_event_id: event.parent_event_id,
        payload: serde_json::to_value(&event.payload).map_err(|e| TxFailure::Fail(CoreError::Internal(e.into())))?,
        source: source.to_owned(),
        trace_id: write.trace_id.clone(),
    })
}

async fn insert_event(
    tx: &mut Transaction<'_, Postgres>,
    source: &str,
    model: &ModelHandle,
    storage: &Storage,
    chains: &mut ChainHeads,
    write: &PreparedWrite,
    receipt: &WriteReceipt,
) -> Result<(), TxFailure> {
    let event = &write.event;
    let record = chain_record(source, write)?;
    let (seq, previous, link) = chains.append(&storage.chain, &record);
    let labels = serde_json::to_value(&record.labels).map_err(|e| TxFailure::Fail(CoreError::Internal(e.into())))?;
    let execution = match &event.payload {
        Payload::Execution(execution) => Some(execution),
        _ => None,
    };
    sqlx::query(
        "INSERT INTO audit_events (id, occurred_at, incident_id, correlation_id, remediation_request_id, namespace, \
         cluster, kind, labels, parent_event_id, payload, search_text, received_at, source, trace_id, \
         embedding_state, action_type, execution_status, duration_ms, chain_seq, previous_event_hash, event_hash, \
         hash_algorithm, hash_key_id) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, \
         $22, $23, $24)",
    )
    .bind(record.event_id)
    .bind(record.occurred_at)
    .bind(receipt.incident_id)
    .bind(&record.correlation_id)
    .bind(&record.remediation_request_id)
    .bind(&record.namespace)
    .bind(&record.cluster)
    .bind(record.kind)
    .bind(labels)
    .bind(record.parent_event_id)
    .bind(&record.payload)
    .bind(&write.search_text)
    .bind(record.received_at)
    .bind(&record.source)
    .bind(&record.trace_id)
    .bind(receipt.embedding_state.code())
    .bind(execution.map(|e| e.action_type.as_str()))
    .bind(execution.map(|e| e.status.code()))
    .bind(execution.and_then(|e| e.duration).map(|d| d.as_secs_f64() * 1000.0))
    .bind(seq)
    .bind(previous)
    .bind(&link.hash[..])
    .bind(link.algorithm.as_str())
    .bind(&link.key_id)
    .execute(&mut **tx)
    .await?;

    match &write.embedding {
        EmbeddingDecision::Vector { values, .. } => {
            sqlx::query(storage.embedding_insert())
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
