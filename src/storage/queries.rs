//! IncidentQuery's reads. Every statement is built with bound parameters; the
//! only text spliced into SQL is chosen from fixed column names here.
use std::{collections::BTreeMap, time::Duration};

use chrono::{DateTime, Utc};
use sqlx::{FromRow, PgConnection, Postgres, QueryBuilder};
use uuid::Uuid;

use super::Storage;
use crate::{
    domain::{
        ActionStats, AuditEvent, AuditKind, Cursor, EmbeddingState, ExecutionStatus, Incident, IncidentFilter,
        IncidentKey, IncidentOrder, IncidentSortKey, Page, PagePosition, Payload, Phase, ResourceRef, Severity,
        StoredEvent, TimelineQuery, TimelineScope,
    },
    error::CoreError,
};

pub const INCIDENT_COLUMNS: &str = "i.id, i.remediation_request_id, i.correlation_id, i.alert_name, i.severity, \
    i.signal_type, i.namespace, i.cluster, i.target_kind, i.target_name, i.target_namespace, i.root_cause, \
    i.action_type, i.phase, i.execution_status, i.first_seen_at, i.last_event_at, i.resolved_at, i.event_count, \
    i.labels";

/// The hold test is an uncorrelated IN, so PostgreSQL hashes the holds in
/// force once per query instead of probing them per row.
pub const EVENT_COLUMNS: &str = "e.id, e.incident_id, e.occurred_at, e.correlation_id, \
    e.remediation_request_id, e.namespace, e.cluster, e.labels, e.parent_event_id, e.payload, e.received_at, \
    e.source, e.embedding_state, e.trace_id, e.previous_event_hash, e.event_hash, \
    e.correlation_id IN (SELECT h.correlation_id FROM legal_holds h WHERE h.released_at IS NULL) AS legal_hold";

#[derive(FromRow)]
struct IncidentRow {
    id: Uuid,
    remediation_request_id: String,
    correlation_id: String,
    alert_name: Option<String>,
    severity: Option<i16>,
    signal_type: Option<String>,
    namespace: String,
    cluster: Option<String>,
    target_kind: Option<String>,
    target_name: Option<String>,
    target_namespace: Option<String>,
    root_cause: Option<String>,
    action_type: Option<String>,
    phase: Option<i16>,
    execution_status: Option<i16>,
    first_seen_at: DateTime<Utc>,
    last_event_at: DateTime<Utc>,
    resolved_at: Option<DateTime<Utc>>,
    event_count: i64,
    labels: sqlx::types::Json<BTreeMap<String, String>>,
}

#[derive(FromRow)]
struct ListedIncident {
    #[sqlx(flatten)]
    incident: IncidentRow,
    /// The sort key as of the listing's snapshot.
    page_key: DateTime<Utc>,
}

impl From<IncidentRow> for Incident {
    fn from(row: IncidentRow) -> Self {
        let target = match (row.target_kind, row.target_name) {
            (Some(kind), Some(name)) => Some(ResourceRef {
                kind,
                name,
                namespace: row.target_namespace,
            }),
            _ => None,
        };
        Incident {
            id: row.id,
            remediation_request_id: row.remediation_request_id,
            correlation_id: row.correlation_id,
            alert_name: row.alert_name,
            severity: row.severity.and_then(|c| Severity::from_code(c.into())),
            signal_type: row.signal_type,
            namespace: row.namespace,
            cluster: row.cluster,
            target,
            root_cause: row.root_cause,
            action_type: row.action_type,
            phase: row.phase.and_then(|c| Phase::from_code(c.into())),
            execution_status: row.execution_status.and_then(|c| ExecutionStatus::from_code(c.into())),
            first_seen_at: row.first_seen_at,
            last_event_at: row.last_event_at,
            resolved_at: row.resolved_at,
            event_count: row.event_count,
            labels: row.labels.0,
        }
    }
}

#[derive(FromRow)]
pub(super) struct EventRow {
    pub(super) id: Uuid,
    incident_id: Uuid,
    occurred_at: DateTime<Utc>,
    correlation_id: String,
    remediation_request_id: String,
    namespace: String,
    cluster: Option<String>,
    labels: sqlx::types::Json<BTreeMap<String, String>>,
    parent_event_id: Option<Uuid>,
    payload: sqlx::types::Json<Payload>,
    received_at: DateTime<Utc>,
    source: String,
    embedding_state: i16,
    trace_id: Option<String>,
    previous_event_hash: Option<Vec<u8>>,
    event_hash: Option<Vec<u8>>,
    legal_hold: bool,
}

impl From<EventRow> for StoredEvent {
    fn from(row: EventRow) -> Self {
        StoredEvent {
            event_id: row.id,
            incident_id: row.incident_id,
            event: AuditEvent {
                correlation_id: row.correlation_id,
                remediation_request_id: row.remediation_request_id,
                occurred_at: row.occurred_at,
                namespace: row.namespace,
                cluster: row.cluster,
                labels: row.labels.0,
                parent_event_id: row.parent_event_id,
                payload: row.payload.0,
            },
            received_at: row.received_at,
            source: row.source,
            embedding_state: EmbeddingState::from_code(row.embedding_state).unwrap_or(EmbeddingState::NotEmbedded),
            trace_id: row.trace_id,
            previous_event_hash: row.previous_event_hash,
            event_hash: row.event_hash,
            legal_hold: row.legal_hold,
        }
    }
}

/// Appends `AND …` for every set filter field. `last_event_at` is the
/// expression the time range applies to (the snapshot's value in listings).
pub(super) fn push_filter(qb: &mut QueryBuilder<Postgres>, filter: &IncidentFilter, last_event_at: &'static str) {
    let IncidentFilter {
        alert_name,
        severities,
        action_type,
        namespace,
        cluster,
        phases,
        since,
        until,
        labels,
    } = filter.clone();
    for (column, value) in [
        ("i.alert_name", alert_name),
        ("i.action_type", action_type),
        ("i.namespace", namespace),
        ("i.cluster", cluster),
    ] {
        if let Some(value) = value {
            qb.push(format_args!(" AND {column} = ")).push_bind(value);
        }
    }
    if !severities.is_empty() {
        let codes: Vec<i16> = severities.iter().map(|s| s.code()).collect();
        qb.push(" AND i.severity = ANY(").push_bind(codes).push(")");
    }
    if !phases.is_empty() {
        let codes: Vec<i16> = phases.iter().map(|p| p.code()).collect();
        qb.push(" AND i.phase = ANY(").push_bind(codes).push(")");
    }
    if let Some(since) = since {
        qb.push(format_args!(" AND {last_event_at} >= ")).push_bind(since);
    }
    if let Some(until) = until {
        qb.push(format_args!(" AND {last_event_at} < ")).push_bind(until);
    }
    if !labels.is_empty() {
        qb.push(" AND i.labels @> ")
            .push_bind(serde_json::to_value(labels).expect("labels serialise"));
    }
}

fn sort_column(order: IncidentOrder) -> &'static str {
    match order.key {
        IncidentSortKey::LastEventAt => "last_event_at",
        IncidentSortKey::FirstSeenAt => "first_seen_at",
    }
}

/// One page of incidents as of the listing's snapshot (see
/// migrations/*_incident_queries.sql): incidents whose last change the
/// snapshot saw are read in index order with their current keys; the few
/// changed by transactions it did not see are placed by the keys they had
/// then, from incident_sort_history; the two ordered streams are merged.
fn incident_listing(
    prefix: &str,
    filter: &IncidentFilter,
    order: IncidentOrder,
    limit: i64,
    position: &PagePosition,
) -> QueryBuilder<Postgres> {
    let key = sort_column(order);
    let (direction, beyond) = if order.descending { ("DESC", "<") } else { ("ASC", ">") };
    let mut qb = QueryBuilder::new(prefix);
    qb.push(format_args!(
        "SELECT * FROM ((SELECT {INCIDENT_COLUMNS}, i.{key} AS page_key FROM incidents i \
         WHERE pg_visible_in_snapshot(i.updated_xact, "
    ))
    .push_bind(position.snapshot.clone())
    .push("::pg_snapshot)");
    push_filter(&mut qb, filter, "i.last_event_at");
    if let Some(after) = position.after {
        qb.push(format_args!(" AND (i.{key}, i.id) {beyond} ("))
            .push_bind(after.at)
            .push(", ")
            .push_bind(after.id)
            .push(")");
    }
    qb.push(format_args!(" ORDER BY i.{key} {direction}, i.id {direction} LIMIT "))
        .push_bind(limit);
    qb.push(format_args!(
        ") UNION ALL (SELECT {INCIDENT_COLUMNS}, coalesce(h.{key}, i.{key}) AS page_key FROM incidents i \
         LEFT JOIN LATERAL (SELECT hist.last_event_at, hist.first_seen_at FROM incident_sort_history hist \
         WHERE hist.incident_id = i.id AND NOT pg_visible_in_snapshot(hist.superseded_xact, "
    ))
    .push_bind(position.snapshot.clone())
    .push("::pg_snapshot) ORDER BY hist.superseded_seq LIMIT 1) h ON true WHERE i.updated_xact >= pg_snapshot_xmin(")
    .push_bind(position.snapshot.clone())
    .push("::pg_snapshot) AND NOT pg_visible_in_snapshot(i.updated_xact, ")
    .push_bind(position.snapshot.clone())
    .push("::pg_snapshot) AND pg_visible_in_snapshot(i.created_xact, ")
    .push_bind(position.snapshot.clone())
    .push("::pg_snapshot)");
    push_filter(&mut qb, filter, "coalesce(h.last_event_at, i.last_event_at)");
    if let Some(after) = position.after {
        qb.push(format_args!(" AND (coalesce(h.{key}, i.{key}), i.id) {beyond} ("))
            .push_bind(after.at)
            .push(", ")
            .push_bind(after.id)
            .push(")");
    }
    qb.push(format_args!(
        ")) AS page ORDER BY page_key {direction}, id {direction} LIMIT "
    ))
    .push_bind(limit);
    qb
}

impl Storage {
    /// The snapshot a new listing pins: which transactions have committed.
    async fn incident_snapshot(connection: &mut PgConnection) -> Result<String, CoreError> {
        sqlx::query_scalar("SELECT pg_current_snapshot()::text")
            .fetch_one(connection)
            .await
            .map_err(CoreError::database)
    }

    #[tracing::instrument(skip(self))]
    pub async fn list_incidents(
        &self,
        filter: &IncidentFilter,
        order: IncidentOrder,
        page_size: usize,
        position: Option<PagePosition>,
    ) -> Result<Page<Incident>, CoreError> {
        // One connection for the snapshot and the page: both from the same
        // server. A later page reads the primary: a token's snapshot may come
        // from the primary, and a lagging replica has not replayed all it
        // counts as committed (a replica's snapshot, in turn, is one the
        // primary has seen).
        let mut connection = match position {
            None => self.reader().await?,
            Some(_) => self.primary_connection().await?,
        };
        let position = match position {
            Some(position) => position,
            None => PagePosition {
                snapshot: Self::incident_snapshot(&mut connection).await?,
                after: None,
            },
        };
        let limit = page_size as i64 + 1;
        let rows: Vec<ListedIncident> = incident_listing("", filter, order, limit, &position)
            .build_query_as()
            .fetch_all(&mut *connection)
            .await
            .map_err(CoreError::database)?;
        Ok(paginate(rows, page_size, position.snapshot, |row| {
            let cursor = Cursor {
                at: row.page_key,
                id: row.incident.id,
            };
            (Incident::from(row.incident), cursor)
        }))
    }

    /// The plan PostgreSQL chooses for a first page of this listing. With
    /// `without_seq_scans`, sequential scans are priced out, so a plan that
    /// still has one shows a filter no index can serve.
    pub async fn explain_incident_listing(
        &self,
        filter: &IncidentFilter,
        order: IncidentOrder,
        without_seq_scans: bool,
    ) -> Result<String, CoreError> {
        let mut tx = self.pool.begin().await.map_err(CoreError::database)?;
        if without_seq_scans {
            sqlx::query("SET LOCAL enable_seqscan = off")
                .execute(&mut *tx)
                .await
                .map_err(CoreError::database)?;
        }
        let position = PagePosition {
            snapshot: Self::incident_snapshot(&mut tx).await?,
            after: None,
        };
        let lines: Vec<String> = incident_listing("EXPLAIN ", filter, order, 51, &position)
            .build_query_scalar()
            .fetch_all(&mut *tx)
            .await
            .map_err(CoreError::database)?;
        Ok(lines.join("\n"))
    }

    #[tracing::instrument(skip(self))]
    pub async fn get_incident(&self, key: &IncidentKey) -> Result<Incident, CoreError> {
        let mut qb = QueryBuilder::new(format!("SELECT {INCIDENT_COLUMNS} FROM incidents i WHERE "));
        match key {
            IncidentKey::Id(id) => qb.push("i.id = ").push_bind(*id),
            IncidentKey::RemediationRequestId(rrid) => qb.push("i.remediation_request_id = ").push_bind(rrid.clone()),
        };
        let row: Option<IncidentRow> = qb
            .build_query_as()
            .fetch_optional(&mut *self.reader().await?)
            .await
            .map_err(CoreError::database)?;
        row.map(Incident::from)
            .ok_or_else(|| CoreError::NotFound("incident".into()))
    }

    /// A timeline page in (occurred_at, id) order. Events never change once
    /// written, so keyset pagination alone neither repeats nor skips one.
    #[tracing::instrument(skip(self))]
    pub async fn list_audit_events(
        &self,
        query: &TimelineQuery,
        page_size: usize,
        after: Option<Cursor>,
    ) -> Result<Page<StoredEvent>, CoreError> {
        let mut qb = QueryBuilder::new(format!("SELECT {EVENT_COLUMNS} FROM audit_events e WHERE "));
        match &query.scope {
            TimelineScope::Incident(id) => qb.push("e.incident_id = ").push_bind(*id),
            TimelineScope::RemediationRequest(rrid) => qb.push("e.remediation_request_id = ").push_bind(rrid.clone()),
            TimelineScope::Correlation(id) => qb.push("e.correlation_id = ").push_bind(id.clone()),
        };
        if !query.kinds.is_empty() {
            let codes: Vec<i16> = query.kinds.iter().map(|k| k.code()).collect();
            qb.push(" AND e.kind = ANY(").push_bind(codes).push(")");
        }
        if let Some(after) = after {
            qb.push(" AND (e.occurred_at, e.id) > (")
                .push_bind(after.at)
                .push(", ")
                .push_bind(after.id)
                .push(")");
        }
        qb.push(" ORDER BY e.occurred_at, e.id LIMIT ")
            .push_bind(page_size as i64 + 1);
        let rows: Vec<EventRow> = qb
            .build_query_as()
            .fetch_all(&mut *self.reader().await?)
            .await
            .map_err(CoreError::database)?;
        if rows.is_empty() && after.is_none() {
            self.require_incident_of(&query.scope).await?;
        }
        Ok(paginate(rows, page_size, String::new(), |row| {
            let cursor = Cursor {
                at: row.occurred_at,
                id: row.id,
            };
            (StoredEvent::from(row), cursor)
        }))
    }

    /// An empty timeline of an incident that does not exist is NOT_FOUND; a
    /// correlation id is only a filter, so it has no such check.
    async fn require_incident_of(&self, scope: &TimelineScope) -> Result<(), CoreError> {
        let key = match scope {
            TimelineScope::Incident(id) => IncidentKey::Id(*id),
            TimelineScope::RemediationRequest(rrid) => IncidentKey::RemediationRequestId(rrid.clone()),
            TimelineScope::Correlation(_) => return Ok(()),
        };
        self.get_incident(&key).await.map(|_| ())
    }

    /// Per action type, over every execution event of the matching incidents,
    /// aggregated in SQL.
    #[tracing::instrument(skip(self))]
    /// Per action type over the execution events of the matching incidents.
    /// All data reads the trigger-maintained rollup (a few hundred rows per
    /// action type); a filter buckets the matching events the same way
    /// (migration `action_rollup` says how), and both share the aggregation.
    pub async fn action_stats(&self, filter: &IncidentFilter) -> Result<Vec<ActionStats>, CoreError> {
        let mut qb = QueryBuilder::new("WITH buckets AS (");
        if *filter == IncidentFilter::default() {
            qb.push(
                "SELECT action_type, execution_status, duration_bucket, executions, duration_ms_sum \
                 FROM action_duration_rollup WHERE executions > 0",
            );
        } else {
            qb.push(
                "SELECT coalesce(e.action_type, '') AS action_type, \
                 coalesce(e.execution_status, 0) AS execution_status, \
                 action_duration_bucket(e.duration_ms) AS duration_bucket, \
                 count(*) AS executions, coalesce(sum(e.duration_ms), 0) AS duration_ms_sum \
                 FROM audit_events e WHERE e.kind = ",
            )
            .push_bind(AuditKind::Execution.code())
            .push(" AND e.incident_id IN (SELECT i.id FROM incidents i WHERE true");
            push_filter(&mut qb, filter, "i.last_event_at");
            qb.push(") GROUP BY 1, 2, 3");
        }
        qb.push(
            "), per_action AS ( \
             SELECT action_type, sum(executions)::bigint AS total, \
             coalesce(sum(executions) FILTER (WHERE execution_status = ",
        )
        .push_bind(ExecutionStatus::Succeeded.code())
        .push("), 0)::bigint AS succeeded, coalesce(sum(executions) FILTER (WHERE execution_status = ")
        .push_bind(ExecutionStatus::Failed.code())
        .push(ACTION_STATS_AGGREGATION);
        type StatsRow = (String, i64, i64, i64, Option<f64>, Option<f64>, Option<f64>);
        let rows: Vec<StatsRow> = qb
            .build_query_as()
            .fetch_all(&mut *self.reader().await?)
            .await
            .map_err(CoreError::database)?;
        Ok(rows
            .into_iter()
            .map(|(action_type, total, succeeded, failed, mean, p50, p95)| ActionStats {
                action_type,
                total,
                succeeded,
                failed,
                success_rate: if succeeded + failed == 0 {
                    0.0
                } else {
                    succeeded as f64 / (succeeded + failed) as f64
                },
                mean_duration: mean.map(millis),
                p50_duration: p50.map(millis),
                p95_duration: p95.map(millis),
            })
            .collect())
    }

    /// Drops sort history no live page token can need any more.
    pub async fn prune_incident_sort_history(&self, token_ttl: Duration) -> Result<u64, CoreError> {
        let deleted = sqlx::query("DELETE FROM incident_sort_history WHERE recorded_at < now() - $1")
            .bind(token_ttl)
            .execute(&self.pool)
            .await
            .map_err(CoreError::database)?
            .rows_affected();
        Ok(deleted)
    }
}

/// The rest of action_stats after the outcome counts: the mean, and p50/p95
/// as percentile_cont over the duration buckets, in one pass over the
/// histogram. percentile_cont interpolates between the values at ranks
/// floor and ceil of q * (timed - 1) (0-based, in duration order); a bucket
/// holds ranks first_rank .. first_rank + executions - 1. Sums are cast back
/// to bigint: numeric arithmetic made this several times slower.
pub const ACTION_STATS_AGGREGATION: &str = "), 0)::bigint AS failed, \
    sum(duration_ms_sum) FILTER (WHERE duration_bucket IS NOT NULL) \
        / nullif(sum(executions) FILTER (WHERE duration_bucket IS NOT NULL), 0) AS mean_ms \
    FROM buckets GROUP BY action_type), \
    histogram AS ( \
    SELECT action_type, action_duration_bucket_value(duration_bucket) AS value, executions, \
    (sum(executions) OVER (PARTITION BY action_type ORDER BY duration_bucket))::bigint - executions AS first_rank, \
    (sum(executions) OVER (PARTITION BY action_type))::bigint - 1 AS last_rank \
    FROM (SELECT action_type, duration_bucket, sum(executions)::bigint AS executions FROM buckets \
          WHERE duration_bucket IS NOT NULL GROUP BY action_type, duration_bucket) AS timed_buckets), \
    positions AS ( \
    SELECT action_type, value, first_rank, first_rank + executions AS next_rank, \
    0.5::float8 * last_rank AS p50, 0.95::float8 * last_rank AS p95 FROM histogram), \
    quantiles AS ( \
    SELECT action_type, \
    max(value) FILTER (WHERE floor(p50) >= first_rank AND floor(p50) < next_rank) AS p50_lo, \
    max(value) FILTER (WHERE ceil(p50) >= first_rank AND ceil(p50) < next_rank) AS p50_hi, \
    max(p50 - floor(p50)) AS p50_frac, \
    max(value) FILTER (WHERE floor(p95) >= first_rank AND floor(p95) < next_rank) AS p95_lo, \
    max(value) FILTER (WHERE ceil(p95) >= first_rank AND ceil(p95) < next_rank) AS p95_hi, \
    max(p95 - floor(p95)) AS p95_frac \
    FROM positions GROUP BY action_type) \
    SELECT a.action_type, a.total, a.succeeded, a.failed, a.mean_ms, \
    q.p50_lo + q.p50_frac * (q.p50_hi - q.p50_lo) AS p50_ms, \
    q.p95_lo + q.p95_frac * (q.p95_hi - q.p95_lo) AS p95_ms \
    FROM per_action a LEFT JOIN quantiles q ON q.action_type = a.action_type \
    ORDER BY a.action_type";

fn millis(ms: f64) -> Duration {
    Duration::from_secs_f64(ms.max(0.0) / 1000.0)
}

/// Keeps `page_size` of the `page_size + 1` rows fetched; the extra row only
/// says another page exists, which then starts after the last row kept.
fn paginate<R, T>(
    rows: Vec<R>,
    page_size: usize,
    snapshot: String,
    mut split: impl FnMut(R) -> (T, Cursor),
) -> Page<T> {
    let more = rows.len() > page_size;
    let mut items = Vec::with_capacity(page_size.min(rows.len()));
    let mut last = None;
    for row in rows.into_iter().take(page_size) {
        let (item, cursor) = split(row);
        items.push(item);
        last = Some(cursor);
    }
    Page {
        items,
        next: if more {
            last.map(|cursor| PagePosition {
                snapshot,
                after: Some(cursor),
            })
        } else {
            None
        },
    }
}

#[cfg(test)]
mod fuzz {
    //! Fuzz target for search and listing filter building (see
    //! `grpc::fuzz` for why proptest): whatever the filter holds, it reaches
    //! PostgreSQL as bound parameters, never as SQL text.
    use proptest::prelude::*;

    use super::*;
    use crate::domain::{Phase, Severity};

    const SEVERITIES: [Severity; 3] = [Severity::Info, Severity::Warning, Severity::Critical];
    const PHASES: [Phase; 4] = [Phase::Pending, Phase::Processing, Phase::Completed, Phase::Failed];

    /// A value that cannot occur in the SQL by chance: a marker, then anything.
    fn marked() -> impl Strategy<Value = String> {
        ".{0,30}".prop_map(|rest| format!("zqx{rest}"))
    }

    proptest! {
        #[test]
        fn filter_values_are_bound_never_written_into_the_sql(
            alert_name in prop::option::of(marked()),
            action_type in prop::option::of(marked()),
            namespace in prop::option::of(marked()),
            cluster in prop::option::of(marked()),
            labels in prop::collection::btree_map(marked(), marked(), 0..5),
            since in prop::option::of(any::<i32>()),
            severities in prop::collection::vec(prop::sample::select(SEVERITIES.to_vec()), 0..3),
            phases in prop::collection::vec(prop::sample::select(PHASES.to_vec()), 0..3),
        ) {
            let filter = IncidentFilter {
                alert_name,
                severities,
                action_type,
                namespace,
                cluster,
                phases,
                since: since.and_then(|s| DateTime::from_timestamp(i64::from(s), 0)),
                until: None,
                labels,
            };
            let mut qb = QueryBuilder::new("SELECT i.id FROM incidents i WHERE true");
            push_filter(&mut qb, &filter, "i.last_event_at");
            let sql = qb.sql();
            prop_assert!(!sql.as_str().contains("zqx"), "a filter value was written into the SQL: {}", sql.as_str());
        }
    }
}
