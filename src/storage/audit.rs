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

/// The write transaction's statements bind arrays, whose length a custom
/// plan knows and a generic plan guesses (10 rows for `unnest`), so
/// PostgreSQL judged the generic plans dearer and planned every statement
/// on every call: 12% of the machine in a WriteAudit profile
/// (docs/performance.md). Their plans do not depend on the arrays' length,
/// so the transaction uses generic ones, planned once per connection.
///
/// A generic plan lives as long as the connection or until the next ANALYZE
/// of its tables, so one made while a table was nearly empty chose to hash a
/// sequential scan of it (audit_chains, in a fresh database), and kept doing
/// so as the table grew. Every statement here reaches its rows by key, so
/// scans are ruled out for the transaction.
///
/// Both are sent with BEGIN, in its round trip, and are LOCAL: they end with
/// the transaction, and the pooled connection's other queries keep their
/// custom plans.
const WRITE_TRANSACTION_BEGIN: &str =
    "BEGIN; SET LOCAL plan_cache_mode = force_generic_plan; SET LOCAL enable_seqscan = off";

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
        let mut tx = self.pool.begin_with(WRITE_TRANSACTION_BEGIN).await?;
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
        let (chains, stored) = ChainHeads::lock(&mut tx, writes, &fresh).await?;
        // An event already stored under its id is a replay of a write whose
        // commit was never acknowledged (the outage queue): it is not written twice.
        for &index in &fresh {
            if stored.contains(&writes[index].event_id) {
                receipts[index].duplicate = true;
            }
        }
        let fresh: Vec<usize> = fresh.into_iter().filter(|&i| !receipts[i].duplicate).collect();
        let batch: Vec<(&PreparedWrite, &WriteReceipt)> = fresh.iter().map(|&i| (&writes[i], &receipts[i])).collect();
        insert_events(&mut tx, source, model, self, chains, &batch).await?;

        let mut projected = fresh;
        projected.sort_by(|&a, &b| {
            let (ea, eb) = (&writes[a].event, &writes[b].event);
            (&ea.remediation_request_id, ea.occurred_at).cmp(&(&eb.remediation_request_id, eb.occurred_at))
        });
        let projected: Vec<(Uuid, Uuid, &AuditEvent)> = projected
            .into_iter()
            .map(|index| {
                (
                    receipts[index].incident_id,
                    receipts[index].event_id,
                    &writes[index].event,
                )
            })
            .collect();
        incidents::apply_events(&mut tx, &projected).await?;

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

/// A locked chain head (correlation id, length, head hash) and, on every
/// row, the ids of the writes already stored.
type LockedHeadRow = (String, i64, Option<Vec<u8>>, Option<Vec<Uuid>>);

/// The heads of the chains a transaction appends to, locked until it ends.
struct ChainHeads {
    heads: HashMap<String, (i64, Option<Vec<u8>>)>,
}

impl ChainHeads {
    /// Locks (creating where new) the heads of the writes' chains in
    /// correlation-id order, and finds which of the writes are already
    /// stored: one round trip. A stored one's chain is locked too, which
    /// costs nothing, since a stored event's chain head already exists.
    async fn lock(
        tx: &mut Transaction<'_, Postgres>,
        writes: &[PreparedWrite],
        fresh: &[usize],
    ) -> Result<(Self, HashSet<Uuid>), TxFailure> {
        let mut chain_ids: Vec<&str> = fresh.iter().map(|&i| writes[i].event.correlation_id.as_str()).collect();
        chain_ids.sort_unstable();
        chain_ids.dedup();
        let event_ids: Vec<Uuid> = fresh.iter().map(|&i| writes[i].event_id).collect();
        let ats: Vec<DateTime<Utc>> = fresh.iter().map(|&i| writes[i].event.occurred_at).collect();
        let rows: Vec<LockedHeadRow> = sqlx::query_as(
            "WITH heads AS ( \
                 INSERT INTO audit_chains (correlation_id, length) SELECT id, 0 FROM unnest($1::text[]) AS id ORDER BY id \
                 ON CONFLICT (correlation_id) DO UPDATE SET length = audit_chains.length \
                 RETURNING correlation_id, length, head_hash) \
             SELECT h.correlation_id, h.length, h.head_hash, \
                    (SELECT array_agg(e.id) FROM audit_events e \
                     JOIN unnest($2::uuid[], $3::timestamptz[]) AS t(id, at) ON e.id = t.id AND e.occurred_at = t.at) \
             FROM heads h",
        )
        .bind(&chain_ids)
        .bind(&event_ids)
        .bind(&ats)
        .fetch_all(&mut **tx)
        .await?;
        let mut stored = HashSet::new();
        let mut heads = HashMap::with_capacity(rows.len());
        for (id, length, hash, stored_ids) in rows {
            // Every row carries the same list.
            if stored.is_empty() {
                stored.extend(stored_ids.unwrap_or_default());
            }
            heads.insert(id, (length, hash));
        }
        Ok((ChainHeads { heads }, stored))
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

    /// The heads as columns for the write statement ($32-$34).
    fn into_columns(self) -> (Vec<String>, Vec<i64>, Vec<Option<Vec<u8>>>) {
        let mut ids = Vec::with_capacity(self.heads.len());
        let mut lengths = Vec::with_capacity(self.heads.len());
        let mut hashes = Vec::with_capacity(self.heads.len());
        for (id, (length, hash)) in self.heads {
            ids.push(id);
            lengths.push(length);
            hashes.push(hash);
        }
        (ids, lengths, hashes)
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

/// The columns of the events a transaction inserts, one array each: the
/// whole batch goes in with one statement per table instead of one per
/// event (statement overhead dominated batches, docs/performance.md).
#[derive(Default)]
struct EventColumns {
    id: Vec<Uuid>,
    occurred_at: Vec<DateTime<Utc>>,
    incident_id: Vec<Uuid>,
    correlation_id: Vec<String>,
    remediation_request_id: Vec<String>,
    namespace: Vec<String>,
    cluster: Vec<Option<String>>,
    kind: Vec<i16>,
    labels: Vec<serde_json::Value>,
    parent_event_id: Vec<Option<Uuid>>,
    payload: Vec<serde_json::Value>,
    search_text: Vec<Option<String>>,
    received_at: Vec<DateTime<Utc>>,
    source: Vec<String>,
    trace_id: Vec<Option<String>>,
    embedding_state: Vec<i16>,
    action_type: Vec<Option<String>>,
    execution_status: Vec<Option<i16>>,
    duration_ms: Vec<Option<f64>>,
    chain_seq: Vec<i64>,
    previous_event_hash: Vec<Option<Vec<u8>>>,
    event_hash: Vec<Vec<u8>>,
    hash_algorithm: Vec<&'static str>,
    hash_key_id: Vec<Option<String>>,
}

/// Everything a write transaction stores after locking its chains, in one
/// statement instead of five, so one round trip: at one event per call the
/// transaction is mostly round trips and statement start-up
/// (docs/performance.md). In order: the events, their embeddings (into
/// `$embeddings`), pending markers for events written under a model that
/// stopped being the active one in the meantime (a reembed just switched:
/// the backfill embeds them with the active one too), pending markers for
/// deferred embeddings, and the chains' new heads. Each part is empty when
/// its arrays are.
macro_rules! write_statement {
    ($embeddings:literal) => {
        concat!(
            "WITH events AS ( \
                 INSERT INTO audit_events (id, occurred_at, incident_id, correlation_id, remediation_request_id, \
                 namespace, cluster, kind, labels, parent_event_id, payload, search_text, received_at, source, \
                 trace_id, embedding_state, action_type, execution_status, duration_ms, chain_seq, \
                 previous_event_hash, event_hash, hash_algorithm, hash_key_id) \
                 SELECT * FROM unnest($1::uuid[], $2::timestamptz[], $3::uuid[], $4::text[], $5::text[], \
                 $6::text[], $7::text[], $8::smallint[], $9::jsonb[], $10::uuid[], $11::jsonb[], $12::text[], \
                 $13::timestamptz[], $14::text[], $15::text[], $16::smallint[], $17::text[], $18::smallint[], \
                 $19::float8[], $20::bigint[], $21::bytea[], $22::bytea[], $23::text[], $24::text[])), \
             embedded AS ( \
                 INSERT INTO ",
            $embeddings,
            " (event_id, occurred_at, model_id, embedding) \
                 SELECT t.id, t.at, $26, t.embedding \
                 FROM unnest($25::uuid[], $27::timestamptz[], $28::vector[]) AS t(id, at, embedding)), \
             written_under_a_replaced_model AS ( \
                 INSERT INTO pending_embeddings (event_id, occurred_at, model_id, reason) \
                 SELECT t.id, t.at, m.id, 'written while another model became active' \
                 FROM unnest($25::uuid[], $27::timestamptz[]) AS t(id, at) CROSS JOIN embedding_models m \
                 WHERE m.active AND m.id <> $26 ON CONFLICT DO NOTHING), \
             deferred AS ( \
                 INSERT INTO pending_embeddings (event_id, occurred_at, model_id, reason) \
                 SELECT t.id, t.at, $26, t.reason \
                 FROM unnest($29::uuid[], $30::timestamptz[], $31::text[]) AS t(id, at, reason)), \
             chains AS ( \
                 UPDATE audit_chains c SET length = t.length, head_hash = t.hash \
                 FROM unnest($32::text[], $33::bigint[], $34::bytea[]) AS t(id, length, hash) \
                 WHERE c.correlation_id = t.id) \
             SELECT 1"
        )
    };
}

/// New embeddings skip the HNSW index (deferred indexing, the default).
const WRITE_EMBEDDINGS_FRESH: &str = write_statement!("fresh_embeddings");
/// New embeddings go into the HNSW index in the writing transaction.
const WRITE_EMBEDDINGS_INDEXED: &str = write_statement!("audit_embeddings");

/// The batch's events, embeddings and pending markers and its chains' new
/// heads; chain links are computed here, in batch order.
async fn insert_events(
    tx: &mut Transaction<'_, Postgres>,
    source: &str,
    model: &ModelHandle,
    storage: &Storage,
    mut chains: ChainHeads,
    batch: &[(&PreparedWrite, &WriteReceipt)],
) -> Result<(), TxFailure> {
    let mut events = EventColumns::default();
    let (mut embedded_ids, mut embedded_ats, mut vectors) = (Vec::new(), Vec::new(), Vec::new());
    let (mut deferred_ids, mut deferred_ats, mut deferred_reasons) = (Vec::new(), Vec::new(), Vec::new());
    for &(write, receipt) in batch {
        let record = chain_record(source, write)?;
        let (seq, previous, link) = chains.append(&storage.chain, &record);
        let labels =
            serde_json::to_value(&record.labels).map_err(|e| TxFailure::Fail(CoreError::Internal(e.into())))?;
        let execution = match &write.event.payload {
            Payload::Execution(execution) => Some(execution),
            _ => None,
        };
        match &write.embedding {
            EmbeddingDecision::Vector { values, .. } => {
                embedded_ids.push(record.event_id);
                embedded_ats.push(record.occurred_at);
                vectors.push(pgvector::Vector::from(values.clone()));
            }
            EmbeddingDecision::Deferred { reason } => {
                deferred_ids.push(record.event_id);
                deferred_ats.push(record.occurred_at);
                deferred_reasons.push(reason.clone());
            }
            EmbeddingDecision::None => {}
        }
        events.id.push(record.event_id);
        events.occurred_at.push(record.occurred_at);
        events.incident_id.push(receipt.incident_id);
        events.correlation_id.push(record.correlation_id);
        events.remediation_request_id.push(record.remediation_request_id);
        events.namespace.push(record.namespace);
        events.cluster.push(record.cluster);
        events.kind.push(record.kind);
        events.labels.push(labels);
        events.parent_event_id.push(record.parent_event_id);
        events.payload.push(record.payload);
        events.search_text.push(write.search_text.clone());
        events.received_at.push(record.received_at);
        events.source.push(record.source);
        events.trace_id.push(record.trace_id);
        events.embedding_state.push(receipt.embedding_state.code());
        events
            .action_type
            .push(execution.map(|e| e.action_type.as_str().to_owned()));
        events.execution_status.push(execution.map(|e| e.status.code()));
        events
            .duration_ms
            .push(execution.and_then(|e| e.duration).map(|d| d.as_secs_f64() * 1000.0));
        events.chain_seq.push(seq);
        events.previous_event_hash.push(previous);
        events.event_hash.push(link.hash.to_vec());
        events.hash_algorithm.push(link.algorithm.as_str());
        events.hash_key_id.push(link.key_id);
    }
    if events.id.is_empty() {
        return Ok(());
    }
    let (chain_ids, chain_lengths, chain_hashes) = chains.into_columns();
    let statement = if storage.deferred_indexing {
        WRITE_EMBEDDINGS_FRESH
    } else {
        WRITE_EMBEDDINGS_INDEXED
    };
    sqlx::query(statement)
        .bind(&events.id)
        .bind(&events.occurred_at)
        .bind(&events.incident_id)
        .bind(&events.correlation_id)
        .bind(&events.remediation_request_id)
        .bind(&events.namespace)
        .bind(&events.cluster)
        .bind(&events.kind)
        .bind(&events.labels)
        .bind(&events.parent_event_id)
        .bind(&events.payload)
        .bind(&events.search_text)
        .bind(&events.received_at)
        .bind(&events.source)
        .bind(&events.trace_id)
        .bind(&events.embedding_state)
        .bind(&events.action_type)
        .bind(&events.execution_status)
        .bind(&events.duration_ms)
        .bind(&events.chain_seq)
        .bind(&events.previous_event_hash)
        .bind(&events.event_hash)
        .bind(&events.hash_algorithm)
        .bind(&events.hash_key_id)
        .bind(&embedded_ids)
        .bind(model.id)
        .bind(&embedded_ats)
        .bind(&vectors)
        .bind(&deferred_ids)
        .bind(&deferred_ats)
        .bind(&deferred_reasons)
        .bind(&chain_ids)
        .bind(&chain_lengths)
        .bind(&chain_hashes)
        .execute(&mut **tx)
        .await?;
    Ok(())
}
