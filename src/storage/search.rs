//! Similarity and full-text search over stored events.
//!
//! Each model's embeddings have their own partial HNSW index on
//! `embedding::vector(<dims>)` WHERE `model_id = <id>`. PostgreSQL uses a
//! partial expression index only when the query repeats the expression and
//! the predicate literally, so the model's id and dimension are written into
//! the SQL as integers. Both come from the embedding_models table, never from
//! a request; everything a caller sends is a bound parameter.
//!
//! Scans join events to embeddings on the event id alone (ids are unique;
//! occurred_at only routes to a partition). With occurred_at in the join too,
//! PostgreSQL multiplies the two equalities' selectivities, expects one row,
//! and prefers sorting a full hash join to walking the HNSW index: 100k
//! events took ~370 ms instead of milliseconds.
use chrono::{DateTime, Utc};
use sqlx::{FromRow, Postgres, QueryBuilder};
use uuid::Uuid;

use super::{
    queries::{push_filter, EventRow, EVENT_COLUMNS},
    ModelHandle, Storage,
};
use crate::{
    domain::{AuditKind, IncidentFilter, StoredEvent},
    error::CoreError,
};

/// What narrows a search besides similarity.
#[derive(Debug, Clone, Copy)]
pub struct SearchScope<'a> {
    pub filter: &'a IncidentFilter,
    pub kinds: &'a [AuditKind],
    pub exclude: Option<Uuid>,
}

impl SearchScope<'_> {
    fn is_unfiltered(&self) -> bool {
        *self.filter == IncidentFilter::default() && self.kinds.is_empty()
    }
}

#[derive(FromRow)]
struct RankedRow {
    #[sqlx(flatten)]
    event: EventRow,
    distance: f64,
}

/// An event and its cosine distance to the query.
pub struct Ranked {
    pub event: StoredEvent,
    pub distance: f64,
}

/// An event's id and partition key: enough to fetch it by primary key.
pub type EventKey = (Uuid, DateTime<Utc>);

/// How `nearest` finds the nearest events.
#[derive(Debug, Clone, Copy)]
pub enum Strategy<'a> {
    /// Walk the model's HNSW index with the filters applied inside the scan,
    /// and compare the fresh rows (not in the index yet) exactly.
    Index,
    /// Compare these events (the whole scope, known to be small) exactly.
    Candidates(&'a [EventKey]),
    /// Compare every event in scope exactly, without the index.
    ExactScan,
}

/// A stored embedding and the text that produced it.
pub struct EventEmbedding {
    pub vector: Vec<f32>,
    pub search_text: Option<String>,
}

fn push_scope(qb: &mut QueryBuilder<Postgres>, scope: &SearchScope<'_>) {
    if !scope.kinds.is_empty() {
        let codes: Vec<i16> = scope.kinds.iter().map(|k| k.code()).collect();
        qb.push(" AND e.kind = ANY(").push_bind(codes).push(")");
    }
    if let Some(exclude) = scope.exclude {
        qb.push(" AND e.id <> ").push_bind(exclude);
    }
    push_filter(qb, scope.filter, "i.last_event_at");
}

fn incident_join(scope: &SearchScope<'_>) -> &'static str {
    if *scope.filter == IncidentFilter::default() {
        ""
    } else {
        " JOIN incidents i ON i.id = e.incident_id"
    }
}

/// The `limit` fresh (not yet indexed) events in scope nearest to `query`,
/// compared exactly, as `EVENT_COLUMNS, distance`.
///
/// Joined to the events by their full key, so each fresh row finds its event
/// with one index probe in one partition. Unfiltered, the nearest fresh rows
/// are picked before the join, which then touches only `limit` events:
/// joined first, PostgreSQL hashes the whole events table to match a few
/// thousand fresh rows (49 ms at 40k events, and growing with the table).
fn push_fresh_nearest(
    qb: &mut QueryBuilder<Postgres>,
    model_id: i16,
    query: pgvector::Vector,
    scope: &SearchScope<'_>,
    limit: usize,
) {
    if scope.is_unfiltered() {
        qb.push(format_args!(
            "SELECT {EVENT_COLUMNS}, f.distance FROM (SELECT event_id, occurred_at, embedding <=> "
        ))
        .push_bind(query)
        .push(format_args!(
            " AS distance FROM fresh_embeddings WHERE model_id = {model_id}"
        ));
        if let Some(exclude) = scope.exclude {
            qb.push(" AND event_id <> ").push_bind(exclude);
        }
        qb.push(" ORDER BY distance LIMIT ").push_bind(limit as i64).push(
            ") AS f JOIN audit_events e ON e.id = f.event_id AND e.occurred_at = f.occurred_at \
                 ORDER BY f.distance, e.id",
        );
    } else {
        qb.push(format_args!("SELECT {EVENT_COLUMNS}, emb.embedding <=> "))
            .push_bind(query)
            .push(format_args!(
                " AS distance FROM fresh_embeddings emb \
                 JOIN audit_events e ON e.id = emb.event_id AND e.occurred_at = emb.occurred_at{} \
                 WHERE emb.model_id = {model_id}",
                incident_join(scope)
            ));
        push_scope(qb, scope);
        qb.push(" ORDER BY distance, e.id LIMIT ").push_bind(limit as i64);
    }
}

impl Storage {
    pub async fn active_model(&self) -> Result<Option<ModelHandle>, CoreError> {
        self.model_where("active", None).await
    }

    pub async fn model_named(&self, name: &str) -> Result<Option<ModelHandle>, CoreError> {
        self.model_where("name = $1", Some(name)).await
    }

    async fn model_where(&self, condition: &str, name: Option<&str>) -> Result<Option<ModelHandle>, CoreError> {
        let sql = format!("SELECT id, name, dimensions FROM embedding_models WHERE {condition}");
        let mut query = sqlx::query_as::<_, (i16, String, i32)>(sqlx::AssertSqlSafe(sql));
        if let Some(name) = name {
            query = query.bind(name.to_owned());
        }
        let row = query.fetch_optional(&self.pool).await.map_err(CoreError::database)?;
        Ok(row.map(|(id, name, dimensions)| ModelHandle {
            id,
            name,
            dimensions: dimensions as usize,
        }))
    }

    /// The event's embedding under `model`. None: no such event; Some(None):
    /// the event exists but has no embedding for the model.
    pub async fn event_embedding(
        &self,
        model: &ModelHandle,
        event_id: Uuid,
    ) -> Result<Option<Option<EventEmbedding>>, CoreError> {
        let row: Option<(Option<pgvector::Vector>, Option<String>)> = sqlx::query_as(
            "SELECT emb.embedding, e.search_text FROM audit_events e \
             LEFT JOIN stored_embeddings emb ON emb.event_id = e.id AND emb.occurred_at = e.occurred_at \
                  AND emb.model_id = $2 \
             WHERE e.id = $1",
        )
        .bind(event_id)
        .bind(model.id)
        .fetch_optional(&mut *self.reader().await?)
        .await
        .map_err(CoreError::database)?;
        Ok(row.map(|(vector, search_text)| {
            vector.map(|vector| EventEmbedding {
                vector: vector.to_vec(),
                search_text,
            })
        }))
    }

    /// At least as many as the events an incident filter leaves: the event
    /// counts of at most `cap` matching incidents, read from the incident
    /// indexes. Every incident has an event, so `cap` matching incidents
    /// already mean `cap` events or more.
    pub async fn incident_events_upper_bound(&self, filter: &IncidentFilter, cap: usize) -> Result<i64, CoreError> {
        let mut qb = QueryBuilder::new(
            "SELECT coalesce(sum(n), 0)::bigint FROM (SELECT i.event_count AS n FROM incidents i WHERE true",
        );
        push_filter(&mut qb, filter, "i.last_event_at");
        qb.push(" LIMIT ").push_bind(cap as i64).push(") AS matching");
        qb.build_query_scalar()
            .fetch_one(&mut *self.reader().await?)
            .await
            .map_err(CoreError::database)
    }

    /// The events in scope that have an embedding for `model`, up to `limit`.
    ///
    /// With an incident filter the scan starts from the matching incidents
    /// and reaches their events through the incident index: joined the
    /// other way, PostgreSQL scans every event to find a selective filter's
    /// few hundred (72 ms instead of 5 at 100k events). OFFSET 0 keeps the
    /// planner from flattening the LATERAL subquery back into that join.
    pub async fn events_in_scope(
        &self,
        model: &ModelHandle,
        scope: &SearchScope<'_>,
        limit: usize,
    ) -> Result<Vec<EventKey>, CoreError> {
        let events = if *scope.filter == IncidentFilter::default() {
            "audit_events e"
        } else {
            "incidents i CROSS JOIN LATERAL (SELECT e.id, e.occurred_at, e.kind FROM audit_events e \
             WHERE e.incident_id = i.id OFFSET 0) AS e"
        };
        let mut qb = QueryBuilder::new(format!(
            "SELECT e.id, e.occurred_at FROM {events} \
             JOIN stored_embeddings emb ON emb.event_id = e.id AND emb.occurred_at = e.occurred_at \
                  AND emb.model_id = {} WHERE true",
            model.id
        ));
        push_scope(&mut qb, scope);
        qb.push(" LIMIT ").push_bind(limit as i64);
        qb.build_query_as()
            .fetch_all(&mut *self.reader().await?)
            .await
            .map_err(CoreError::database)
    }

    /// The `limit` events in scope nearest to `query`, nearest first.
    ///
    /// With `Strategy::Index` the model's HNSW index is walked with the
    /// filters applied inside the scan: with `hnsw.iterative_scan` the scan
    /// keeps going until `limit` rows pass the filters or
    /// `hnsw.max_scan_tuples` is reached (session settings, see
    /// `storage::pool`). Relaxed order may return rows slightly out of
    /// distance order, so the caller re-sorts. The exact strategies compare
    /// without the index: the distance expression is not the index's
    /// `::vector(dims)` cast, so the planner cannot use it.
    pub async fn nearest(
        &self,
        model: &ModelHandle,
        query: &[f32],
        scope: &SearchScope<'_>,
        strategy: Strategy<'_>,
        limit: usize,
    ) -> Result<Vec<Ranked>, CoreError> {
        let (id, dims) = (model.id, model.dimensions);
        let vector = pgvector::Vector::from(query.to_vec());
        let mut qb = QueryBuilder::new("");
        match strategy {
            Strategy::ExactScan => {
                qb.push(format_args!("SELECT {EVENT_COLUMNS}, emb.embedding <=> "))
                    .push_bind(vector)
                    .push(format_args!(
                        " AS distance FROM stored_embeddings emb \
                         JOIN audit_events e ON e.id = emb.event_id{} \
                         WHERE emb.model_id = {id}",
                        incident_join(scope)
                    ));
                push_scope(&mut qb, scope);
                qb.push(" ORDER BY distance, e.id LIMIT ").push_bind(limit as i64);
            }
            Strategy::Candidates(keys) => {
                let (ids, ats): (Vec<Uuid>, Vec<DateTime<Utc>>) = keys.iter().copied().unzip();
                qb.push(format_args!("SELECT {EVENT_COLUMNS}, emb.embedding <=> "))
                    .push_bind(vector)
                    .push(" AS distance FROM unnest(")
                    .push_bind(ids)
                    .push("::uuid[], ")
                    .push_bind(ats)
                    .push(format_args!(
                        "::timestamptz[]) AS k(id, occurred_at) \
                     JOIN audit_events e ON e.id = k.id AND e.occurred_at = k.occurred_at \
                     JOIN stored_embeddings emb ON emb.event_id = e.id AND emb.occurred_at = e.occurred_at \
                          AND emb.model_id = {id} \
                     ORDER BY distance, e.id LIMIT "
                    ))
                    .push_bind(limit as i64);
            }
            Strategy::Index => {
                // The indexed rows through the HNSW index, and the fresh rows
                // (not indexed yet) compared exactly; the caller merges them.
                qb.push(format_args!(
                    "(SELECT {EVENT_COLUMNS}, emb.embedding::vector({dims}) <=> "
                ))
                .push_bind(vector.clone())
                .push(format_args!(
                    "::vector({dims}) AS distance FROM audit_embeddings emb \
                     JOIN audit_events e ON e.id = emb.event_id{} \
                     WHERE emb.model_id = {id}",
                    incident_join(scope)
                ));
                push_scope(&mut qb, scope);
                qb.push(format_args!(" ORDER BY emb.embedding::vector({dims}) <=> "))
                    .push_bind(vector.clone())
                    .push(format_args!("::vector({dims}) LIMIT "))
                    .push_bind(limit as i64);
                qb.push(") UNION ALL (");
                push_fresh_nearest(&mut qb, id, vector, scope, limit);
                qb.push(")");
            }
        }
        let rows: Vec<RankedRow> = qb
            .build_query_as()
            .fetch_all(&mut *self.reader().await?)
            .await
            .map_err(CoreError::database)?;
        Ok(rows
            .into_iter()
            .map(|row| Ranked {
                distance: row.distance,
                event: StoredEvent::from(row.event),
            })
            .collect())
    }

    /// Events in scope whose text matches `text` (web-search syntax), best
    /// full-text rank first.
    pub async fn text_matches(
        &self,
        text: &str,
        scope: &SearchScope<'_>,
        limit: usize,
    ) -> Result<Vec<EventKey>, CoreError> {
        let mut qb = QueryBuilder::new(format!(
            "SELECT e.id, e.occurred_at FROM audit_events e{}, websearch_to_tsquery('english', ",
            incident_join(scope)
        ));
        qb.push_bind(text.to_owned()).push(") AS q WHERE e.search_tsv @@ q");
        push_scope(&mut qb, scope);
        qb.push(" ORDER BY ts_rank_cd(e.search_tsv, q) DESC, e.id LIMIT ")
            .push_bind(limit as i64);
        qb.build_query_as()
            .fetch_all(&mut *self.reader().await?)
            .await
            .map_err(CoreError::database)
    }

    /// The given events with their distance to `query` under `model`.
    pub async fn ranked_events(
        &self,
        model: &ModelHandle,
        query: &[f32],
        keys: &[EventKey],
    ) -> Result<Vec<Ranked>, CoreError> {
        self.nearest(
            model,
            query,
            &SearchScope {
                filter: &IncidentFilter::default(),
                kinds: &[],
                exclude: None,
            },
            Strategy::Candidates(keys),
            keys.len(),
        )
        .await
    }
}

impl SearchScope<'_> {
    /// Whether the scope is worth counting before searching: an unfiltered
    /// search always walks the index.
    pub fn needs_count(&self) -> bool {
        !self.is_unfiltered()
    }

    pub fn has_incident_filter(&self) -> bool {
        *self.filter != IncidentFilter::default()
    }
}
