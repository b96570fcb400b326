//! The SearchSimilar use case: resolve the model and the query vector, decide
//! between the index and an exact comparison, rank (and fuse, in hybrid
//! mode), group, threshold.
use std::{cmp::Ordering, collections::HashMap, sync::Arc};

use uuid::Uuid;

use crate::{
    config::SearchSettings,
    domain::{SearchHit, SearchInput, SearchMode, SearchRequest, Violations},
    error::CoreError,
    models::Models,
    storage::{EventKey, ModelHandle, Ranked, SearchScope, Storage, Strategy},
};

pub struct SearchService {
    storage: Storage,
    models: Arc<Models>,
    settings: SearchSettings,
}

/// The query once resolved: its vector, the words hybrid mode ranks by, and
/// the event to leave out.
struct ResolvedQuery {
    vector: Vec<f32>,
    text: Option<String>,
    exclude: Option<Uuid>,
}

fn invalid(field: &str, why: impl Into<String>) -> CoreError {
    CoreError::InvalidInput(Violations::single(field, why))
}

fn by_distance(a: &Ranked, b: &Ranked) -> Ordering {
    a.distance
        .total_cmp(&b.distance)
        .then_with(|| a.event.event_id.cmp(&b.event.event_id))
}

fn hit(ranked: Ranked) -> SearchHit {
    SearchHit {
        similarity: (1.0 - ranked.distance).clamp(-1.0, 1.0) as f32,
        event: ranked.event,
    }
}

/// Keeps the first (best) row of each incident.
fn best_per_incident(rows: Vec<Ranked>) -> Vec<Ranked> {
    let mut seen = std::collections::HashSet::new();
    rows.into_iter()
        .filter(|row| seen.insert(row.event.incident_id))
        .collect()
}

impl SearchService {
    pub fn new(storage: Storage, models: Arc<Models>, settings: SearchSettings) -> Self {
        SearchService {
            storage,
            models,
            settings,
        }
    }

    /// The hits, best first, and the model searched.
    #[tracing::instrument(skip_all, fields(top_k = request.top_k, mode = ?request.mode))]
    pub async fn search(&self, request: SearchRequest) -> Result<(String, Vec<SearchHit>), CoreError> {
        let model = self.model(request.model.as_deref()).await?;
        let query = self.resolve(&model, request.input.clone()).await?;
        if request.mode == SearchMode::Hybrid && query.text.is_none() {
            return Err(invalid(
                "mode",
                "hybrid search ranks words too: query with text, or an event_id whose event has text",
            ));
        }
        let scope = SearchScope {
            filter: &request.filter,
            kinds: &request.kinds,
            exclude: query.exclude,
        };
        let candidates = self.small_scope(&model, &scope).await?;
        let mut hits = match request.mode {
            SearchMode::Vector => {
                let rows = self
                    .ranked(&model, &query.vector, &scope, candidates.as_deref(), &request)
                    .await?;
                rows.into_iter().map(hit).collect::<Vec<_>>()
            }
            SearchMode::Hybrid => {
                self.hybrid(&model, &query, &scope, candidates.as_deref(), &request)
                    .await?
            }
        };
        if let Some(min) = request.min_similarity {
            hits.retain(|h| h.similarity >= min);
        }
        hits.truncate(request.top_k);
        Ok((model.name, hits))
    }

    /// The events in scope when there are at most `exact_scan_threshold` of
    /// them, to be compared exactly: cheaper than walking the index past every
    /// event the filter rejects, and exact. Otherwise None: walk the index.
    ///
    /// An incident filter is first bounded from the incidents it matches
    /// (their event counts, at most threshold + 1 incidents read by index), so
    /// a broad filter costs well under a millisecond to send to the index.
    /// Only a scope that may be small is then listed, up to threshold + 1
    /// events; an unfiltered search always uses the index.
    async fn small_scope(
        &self,
        model: &ModelHandle,
        scope: &SearchScope<'_>,
    ) -> Result<Option<Vec<EventKey>>, CoreError> {
        let threshold = self.settings.exact_scan_threshold as usize;
        if !scope.needs_count() || threshold == 0 {
            return Ok(None);
        }
        if scope.has_incident_filter()
            && self
                .storage
                .incident_events_upper_bound(scope.filter, threshold + 1)
                .await?
                > threshold as i64
        {
            return Ok(None);
        }
        let keys = self.storage.events_in_scope(model, scope, threshold + 1).await?;
        Ok((keys.len() <= threshold).then_some(keys))
    }

    async fn model(&self, name: Option<&str>) -> Result<ModelHandle, CoreError> {
        match name {
            None => self
                .storage
                .active_model()
                .await?
                .ok_or_else(|| CoreError::FailedPrecondition("no embedding model is registered".into())),
            Some(name) => self
                .storage
                .model_named(name)
                .await?
                .ok_or_else(|| invalid("model", format!("no embedding model is named {name:?}"))),
        }
    }

    async fn resolve(&self, model: &ModelHandle, input: SearchInput) -> Result<ResolvedQuery, CoreError> {
        match input {
            SearchInput::Text(text) => {
                let Some(runnable) = self.models.named(&model.name) else {
                    return Err(invalid(
                        "model",
                        format!(
                            "this server cannot embed text with {:?}; search it with a vector or an event_id",
                            model.name
                        ),
                    ));
                };
                let embedded = runnable
                    .embedder
                    .embed_all(std::slice::from_ref(&text))
                    .await
                    .map_err(|error| CoreError::Unavailable {
                        what: "embedding provider",
                        source: error.into(),
                    })?;
                let vector = embedded
                    .into_iter()
                    .next()
                    .ok_or_else(|| CoreError::Internal(anyhow::anyhow!("the embedder returned no vector")))?
                    .vector
                    .to_vec();
                Ok(ResolvedQuery {
                    vector,
                    text: Some(text),
                    exclude: None,
                })
            }
            SearchInput::Vector(vector) => {
                if vector.len() != model.dimensions {
                    return Err(invalid(
                        "vector.values",
                        format!(
                            "must have {} values for model {:?}, got {}",
                            model.dimensions,
                            model.name,
                            vector.len()
                        ),
                    ));
                }
                Ok(ResolvedQuery {
                    vector,
                    text: None,
                    exclude: None,
                })
            }
            SearchInput::Event(id) => match self.storage.event_embedding(model, id).await? {
                None => Err(CoreError::NotFound("event".into())),
                Some(None) => Err(CoreError::FailedPrecondition(format!(
                    "the event has no embedding for model {:?} (no text, or its embedding is still deferred)",
                    model.name
                ))),
                Some(Some(embedding)) => Ok(ResolvedQuery {
                    vector: embedding.vector,
                    text: embedding.search_text,
                    exclude: Some(id),
                }),
            },
        }
    }

    /// The `limit` nearest events in scope, nearest first.
    ///
    /// An HNSW scan can stop short of the scope: graph regions can be
    /// unreachable from the entry point (many equidistant vectors), and
    /// iterative scans stop at max_scan_tuples. When the index returns fewer
    /// rows than asked for, a bounded count tells whether the scope holds
    /// more; only then are the events compared exactly.
    async fn vector_ranking(
        &self,
        model: &ModelHandle,
        query: &[f32],
        scope: &SearchScope<'_>,
        candidates: Option<&[EventKey]>,
        limit: usize,
    ) -> Result<Vec<Ranked>, CoreError> {
        let strategy = candidates.map_or(Strategy::Index, Strategy::Candidates);
        let mut rows = self.storage.nearest(model, query, scope, strategy, limit).await?;
        if rows.len() < limit && candidates.is_none() {
            let in_scope = self.storage.events_in_scope(model, scope, limit).await?.len();
            if in_scope > rows.len() {
                tracing::debug!(
                    returned = rows.len(),
                    in_scope,
                    "index scan fell short; comparing exactly"
                );
                rows = self
                    .storage
                    .nearest(model, query, scope, Strategy::ExactScan, limit)
                    .await?;
            }
        }
        rows.sort_by(by_distance);
        Ok(rows)
    }

    /// Nearest events first. Grouped by incident, the search widens until it
    /// has top_k incidents, runs out of events, or reaches the scan budget.
    async fn ranked(
        &self,
        model: &ModelHandle,
        query: &[f32],
        scope: &SearchScope<'_>,
        candidates: Option<&[EventKey]>,
        request: &SearchRequest,
    ) -> Result<Vec<Ranked>, CoreError> {
        let budget = (self.settings.max_scan_tuples as usize).max(request.top_k);
        let mut limit = if request.group_by_incident {
            request.top_k * 4
        } else {
            request.top_k
        }
        .min(budget);
        loop {
            let rows = self.vector_ranking(model, query, scope, candidates, limit).await?;
            let exhausted = rows.len() < limit;
            if !request.group_by_incident {
                return Ok(rows);
            }
            let grouped = best_per_incident(rows);
            if grouped.len() >= request.top_k || exhausted || limit >= budget {
                return Ok(grouped);
            }
            limit = (limit * 4).min(budget);
        }
    }

    /// Reciprocal rank fusion of the vector and full-text rankings, both over
    /// the same scope: score = Σ 1 / (k + rank). Hits keep their cosine
    /// similarity; they are ordered by fused score.
    async fn hybrid(
        &self,
        model: &ModelHandle,
        query: &ResolvedQuery,
        scope: &SearchScope<'_>,
        candidates: Option<&[EventKey]>,
        request: &SearchRequest,
    ) -> Result<Vec<SearchHit>, CoreError> {
        let depth = (self.settings.hybrid_candidates as usize).max(request.top_k);
        let text = query.text.as_deref().unwrap_or_default();
        let by_vector = self
            .vector_ranking(model, &query.vector, scope, candidates, depth)
            .await?;
        let by_text = self.storage.text_matches(text, scope, depth).await?;

        let k = f64::from(self.settings.rrf_k);
        let mut scores: HashMap<Uuid, f64> = HashMap::new();
        for (rank, row) in by_vector.iter().enumerate() {
            *scores.entry(row.event.event_id).or_default() += 1.0 / (k + rank as f64 + 1.0);
        }
        for (rank, (id, _)) in by_text.iter().enumerate() {
            *scores.entry(*id).or_default() += 1.0 / (k + rank as f64 + 1.0);
        }
        let mut rows: Vec<Ranked> = by_vector;
        let missing: Vec<EventKey> = by_text
            .into_iter()
            .filter(|(id, _)| !rows.iter().any(|r| r.event.event_id == *id))
            .collect();
        if !missing.is_empty() {
            // Text-only hits still report their cosine similarity; an event
            // with no embedding for the model cannot be a hit of its search.
            rows.extend(self.storage.ranked_events(model, &query.vector, &missing).await?);
        }
        let score = |row: &Ranked| scores.get(&row.event.event_id).copied().unwrap_or_default();
        rows.sort_by(|a, b| score(b).total_cmp(&score(a)).then_with(|| by_distance(a, b)));
        if request.group_by_incident {
            rows = best_per_incident(rows);
        }
        Ok(rows.into_iter().map(hit).collect())
    }
}
