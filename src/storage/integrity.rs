//! Reads of hash chains, and legal holds.
use std::collections::{BTreeMap, HashSet};

use chrono::{DateTime, Utc};
use sqlx::{FromRow, Postgres, QueryBuilder};
use uuid::Uuid;

use super::{queries::push_filter, Storage};
use crate::{
    domain::{AuditEvent, Cursor, EmbeddingState, HoldRelease, IncidentFilter, LegalHold, StoredEvent},
    error::CoreError,
    integrity::chain::{ChainRecord, PurgedLink, StoredLink},
};

/// One stored event of a chain: what the link covers, the link itself, and
/// what else readers see.
#[derive(Debug, Clone)]
pub struct ChainEvent {
    pub record: ChainRecord,
    pub link: StoredLink,
    pub incident_id: Uuid,
    pub embedding_state: i16,
    pub legal_hold: bool,
}

/// A chain as stored: its head's length, its events in chain order (events
/// without a link last) and the links a purge removed.
#[derive(Debug, Clone)]
pub struct StoredChain {
    pub length: i64,
    pub events: Vec<ChainEvent>,
    pub purged: Vec<PurgedLink>,
}

#[derive(FromRow)]
struct ChainEventRow {
    id: Uuid,
    incident_id: Uuid,
    correlation_id: String,
    remediation_request_id: String,
    occurred_at: DateTime<Utc>,
    received_at: DateTime<Utc>,
    namespace: String,
    cluster: Option<String>,
    kind: i16,
    labels: sqlx::types::Json<BTreeMap<String, String>>,
    parent_event_id: Option<Uuid>,
    payload: sqlx::types::Json<serde_json::Value>,
    source: String,
    trace_id: Option<String>,
    embedding_state: i16,
    chain_seq: Option<i64>,
    previous_event_hash: Option<Vec<u8>>,
    event_hash: Option<Vec<u8>>,
    hash_algorithm: Option<String>,
    hash_key_id: Option<String>,
    legal_hold: bool,
}

impl From<ChainEventRow> for ChainEvent {
    fn from(row: ChainEventRow) -> Self {
        let record = ChainRecord {
            event_id: row.id,
            correlation_id: row.correlation_id,
            remediation_request_id: row.remediation_request_id,
            occurred_at: row.occurred_at,
            received_at: row.received_at,
            namespace: row.namespace,
            cluster: row.cluster,
            kind: row.kind,
            labels: row.labels.0,
            parent_event_id: row.parent_event_id,
            payload: row.payload.0,
            source: row.source,
            trace_id: row.trace_id,
        };
        let link = StoredLink {
            event_id: row.id,
            seq: row.chain_seq,
            previous_hash: row.previous_event_hash,
            hash: row.event_hash,
            algorithm: row.hash_algorithm,
            key_id: row.hash_key_id,
            canonical: record.canonical_bytes(),
        };
        ChainEvent {
            record,
            link,
            incident_id: row.incident_id,
            embedding_state: row.embedding_state,
            legal_hold: row.legal_hold,
        }
    }
}

impl ChainEvent {
    /// The reader's view of the record (after redaction, when exporting);
    /// None when its payload no longer parses, which only an edit around the
    /// service causes (the chain check reports the event).
    pub fn stored_event(&self) -> Option<StoredEvent> {
        let ChainEvent {
            record,
            link,
            incident_id,
            embedding_state,
            legal_hold,
        } = self;
        let payload = serde_json::from_value(record.payload.clone()).ok()?;
        Some(StoredEvent {
            event_id: record.event_id,
            incident_id: *incident_id,
            event: AuditEvent {
                correlation_id: record.correlation_id.clone(),
                remediation_request_id: record.remediation_request_id.clone(),
                occurred_at: record.occurred_at,
                namespace: record.namespace.clone(),
                cluster: record.cluster.clone(),
                labels: record.labels.clone(),
                parent_event_id: record.parent_event_id,
                payload,
            },
            received_at: record.received_at,
            source: record.source.clone(),
            embedding_state: EmbeddingState::from_code(*embedding_state).unwrap_or(EmbeddingState::NotEmbedded),
            trace_id: record.trace_id.clone(),
            previous_event_hash: link.previous_hash.clone(),
            event_hash: link.hash.clone(),
            legal_hold: *legal_hold,
        })
    }
}

#[derive(FromRow)]
struct HoldRow {
    id: Uuid,
    correlation_id: String,
    reason: String,
    placed_by: String,
    placed_at: DateTime<Utc>,
    released_at: Option<DateTime<Utc>>,
    released_by: Option<String>,
    release_reason: Option<String>,
    events_affected: i64,
}

impl From<HoldRow> for LegalHold {
    fn from(row: HoldRow) -> Self {
        let release = match (row.released_at, row.released_by, row.release_reason) {
            (Some(released_at), Some(released_by), Some(reason)) => Some(HoldRelease {
                released_at,
                released_by,
                reason,
            }),
            _ => None,
        };
        LegalHold {
            id: row.id,
            correlation_id: row.correlation_id,
            reason: row.reason,
            placed_by: row.placed_by,
            placed_at: row.placed_at,
            events_affected: row.events_affected,
            release,
        }
    }
}

const HOLD_COLUMNS: &str = "h.id, h.correlation_id, h.reason, h.placed_by, h.placed_at, h.released_at, \
    h.released_by, h.release_reason, \
    (SELECT count(*) FROM audit_events e WHERE e.correlation_id = h.correlation_id) AS events_affected";

impl Storage {
    /// The chain of `correlation_id`, or None when it has no head and no
    /// events. More than `max_events` links is FAILED_PRECONDITION.
    pub async fn chain(&self, correlation_id: &str, max_events: u64) -> Result<Option<StoredChain>, CoreError> {
        let too_long = || {
            CoreError::FailedPrecondition(format!(
                "the chain of correlation_id {correlation_id:?} has more than {max_events} events, the configured \
                 limit (integrity.max_chain_events)"
            ))
        };
        let length: Option<i64> = sqlx::query_scalar("SELECT length FROM audit_chains WHERE correlation_id = $1")
            .bind(correlation_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(CoreError::database)?;
        if length.is_some_and(|length| length as u64 > max_events) {
            return Err(too_long());
        }
        let rows: Vec<ChainEventRow> = sqlx::query_as(
            "SELECT e.id, e.incident_id, e.correlation_id, e.remediation_request_id, e.occurred_at, e.received_at, \
             e.namespace, e.cluster, e.kind, e.labels, e.parent_event_id, e.payload, e.source, e.trace_id, \
             e.embedding_state, e.chain_seq, e.previous_event_hash, e.event_hash, e.hash_algorithm, e.hash_key_id, \
             audit_event_is_held(e.correlation_id) AS legal_hold \
             FROM audit_events e WHERE e.correlation_id = $1 \
             ORDER BY e.chain_seq NULLS LAST, e.occurred_at, e.id LIMIT $2",
        )
        .bind(correlation_id)
        .bind(max_events as i64 + 1)
        .fetch_all(&self.pool)
        .await
        .map_err(CoreError::database)?;
        if rows.len() as u64 > max_events {
            return Err(too_long());
        }
        if length.is_none() && rows.is_empty() {
            return Ok(None);
        }
        let purged: Vec<(i64, Option<Vec<u8>>)> = sqlx::query_as(
            "SELECT chain_seq, event_hash FROM audit_tombstones \
             WHERE correlation_id = $1 AND chain_seq IS NOT NULL ORDER BY chain_seq",
        )
        .bind(correlation_id)
        .fetch_all(&self.pool)
        .await
        .map_err(CoreError::database)?;
        Ok(Some(StoredChain {
            length: length.unwrap_or(0),
            events: rows.into_iter().map(ChainEvent::from).collect(),
            purged: purged.into_iter().map(|(seq, hash)| PurgedLink { seq, hash }).collect(),
        }))
    }

    /// The correlation ids an export covers, in order: those with events in
    /// incidents matching `filter`, narrowed to `correlation_id` if given.
    pub async fn export_correlation_ids(
        &self,
        filter: &IncidentFilter,
        correlation_id: Option<&str>,
    ) -> Result<Vec<String>, CoreError> {
        if *filter == IncidentFilter::default() {
            return match correlation_id {
                Some(id) => Ok(vec![id.to_owned()]),
                None => sqlx::query_scalar("SELECT correlation_id FROM audit_chains ORDER BY correlation_id")
                    .fetch_all(&self.pool)
                    .await
                    .map_err(CoreError::database),
            };
        }
        let mut qb: QueryBuilder<Postgres> = QueryBuilder::new(
            "SELECT DISTINCT e.correlation_id FROM incidents i JOIN audit_events e ON e.incident_id = i.id WHERE true",
        );
        if let Some(id) = correlation_id {
            qb.push(" AND e.correlation_id = ").push_bind(id.to_owned());
        }
        push_filter(&mut qb, filter, "i.last_event_at");
        qb.push(" ORDER BY 1");
        qb.build_query_scalar()
            .fetch_all(&self.pool)
            .await
            .map_err(CoreError::database)
    }

    /// The incidents of `correlation_id`'s events that match `filter`.
    pub async fn matching_incidents_of_chain(
        &self,
        filter: &IncidentFilter,
        correlation_id: &str,
    ) -> Result<HashSet<Uuid>, CoreError> {
        let mut qb: QueryBuilder<Postgres> = QueryBuilder::new(
            "SELECT DISTINCT i.id FROM incidents i JOIN audit_events e ON e.incident_id = i.id WHERE e.correlation_id = ",
        );
        qb.push_bind(correlation_id.to_owned());
        push_filter(&mut qb, filter, "i.last_event_at");
        let ids: Vec<Uuid> = qb
            .build_query_scalar()
            .fetch_all(&self.pool)
            .await
            .map_err(CoreError::database)?;
        Ok(ids.into_iter().collect())
    }

    /// Places a hold, or returns the one already in force (placing is
    /// idempotent; the first reason stands).
    pub async fn place_hold(
        &self,
        correlation_id: &str,
        reason: &str,
        placed_by: &str,
    ) -> Result<LegalHold, CoreError> {
        sqlx::query(
            "INSERT INTO legal_holds (id, correlation_id, reason, placed_by) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (correlation_id) WHERE released_at IS NULL DO NOTHING",
        )
        .bind(Uuid::now_v7())
        .bind(correlation_id)
        .bind(reason)
        .bind(placed_by)
        .execute(&self.pool)
        .await
        .map_err(CoreError::database)?;
        let row: HoldRow = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {HOLD_COLUMNS} FROM legal_holds h WHERE h.correlation_id = $1 AND h.released_at IS NULL"
        )))
        .bind(correlation_id)
        .fetch_one(&self.pool)
        .await
        .map_err(CoreError::database)?;
        Ok(row.into())
    }

    pub async fn release_hold(
        &self,
        correlation_id: &str,
        reason: &str,
        released_by: &str,
    ) -> Result<LegalHold, CoreError> {
        let row: Option<HoldRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "UPDATE legal_holds h SET released_at = now(), released_by = $2, release_reason = $3 \
             WHERE h.correlation_id = $1 AND h.released_at IS NULL RETURNING {HOLD_COLUMNS}"
        )))
        .bind(correlation_id)
        .bind(released_by)
        .bind(reason)
        .fetch_optional(&self.pool)
        .await
        .map_err(CoreError::database)?;
        row.map(LegalHold::from)
            .ok_or_else(|| CoreError::NotFound(format!("legal hold in force on correlation_id {correlation_id:?}")))
    }

    /// Holds in force and released, newest first, after `after`.
    pub async fn list_holds(&self, limit: usize, after: Option<Cursor>) -> Result<Vec<LegalHold>, CoreError> {
        let mut qb: QueryBuilder<Postgres> =
            QueryBuilder::new(format!("SELECT {HOLD_COLUMNS} FROM legal_holds h WHERE true"));
        if let Some(after) = after {
            qb.push(" AND (h.placed_at, h.id) < (")
                .push_bind(after.at)
                .push(", ")
                .push_bind(after.id)
                .push(")");
        }
        qb.push(" ORDER BY h.placed_at DESC, h.id DESC LIMIT ")
            .push_bind(limit as i64);
        let rows: Vec<HoldRow> = qb
            .build_query_as()
            .fetch_all(&self.pool)
            .await
            .map_err(CoreError::database)?;
        Ok(rows.into_iter().map(LegalHold::from).collect())
    }
}
