//! The audit write use case: decide each event's embedding before any
//! transaction opens (model calls must not hold database locks), apply the
//! failure policy, then hand everything to the storage core in one call.
use std::{collections::HashSet, sync::Arc};

use crate::{
    config::FailurePolicy,
    domain::{EmbeddingState, Violations, WriteReceipt, WriteRequest},
    embedding::Embedder,
    error::CoreError,
    models::Models,
    storage::{EmbeddingDecision, PreparedWrite, Storage},
};

pub struct AuditService {
    storage: Storage,
    models: Arc<Models>,
    policy: FailurePolicy,
}

impl AuditService {
    pub fn new(storage: Storage, models: Arc<Models>, policy: FailurePolicy) -> Self {
        AuditService {
            storage,
            models,
            policy,
        }
    }

    pub fn embedding_dimensions(&self) -> usize {
        self.models.for_writes().handle.dimensions
    }

    /// Writes all requests in one transaction. `field_of(i)` names request i's
    /// event in violations (`event` or `requests[i].event`).
    #[tracing::instrument(skip_all, fields(events = requests.len()))]
    pub async fn write(
        &self,
        source: &str,
        requests: Vec<WriteRequest>,
        field_of: impl Fn(usize) -> String,
    ) -> Result<Vec<WriteReceipt>, CoreError> {
        self.check_parents(&requests, &field_of).await?;
        let model = self.models.for_writes();
        let prepared = self.prepare(&model.embedder, requests).await?;
        self.storage.write_events(source, &model.handle, &prepared).await
    }

    /// A parent must be stored already; the database cannot enforce this with
    /// a foreign key because events are partitioned by time.
    async fn check_parents(
        &self,
        requests: &[WriteRequest],
        field_of: &impl Fn(usize) -> String,
    ) -> Result<(), CoreError> {
        let parents: Vec<_> = requests.iter().filter_map(|r| r.event.parent_event_id).collect();
        if parents.is_empty() {
            return Ok(());
        }
        let existing: HashSet<_> = self.storage.existing_event_ids(&parents).await?;
        let mut violations = Violations::new();
        for (index, request) in requests.iter().enumerate() {
            if let Some(parent) = request.event.parent_event_id {
                if !existing.contains(&parent) {
                    violations.add(
                        format!("{}.parent_event_id", field_of(index)),
                        "no stored event has this id",
                    );
                }
            }
        }
        violations.into_result(|| ()).map_err(CoreError::InvalidInput)
    }

    async fn prepare(&self, embedder: &Embedder, requests: Vec<WriteRequest>) -> Result<Vec<PreparedWrite>, CoreError> {
        let texts: Vec<Option<String>> = requests.iter().map(|r| r.event.embedding_text()).collect();
        let to_embed: Vec<usize> = (0..requests.len())
            .filter(|&i| requests[i].embedding.is_none() && texts[i].is_some())
            .collect();
        let embed_texts: Vec<String> = to_embed.iter().map(|&i| texts[i].clone().unwrap_or_default()).collect();

        let mut generated = match embedder.embed_all(&embed_texts).await {
            Ok(vectors) => vectors.into_iter().map(Ok).collect::<Vec<_>>(),
            Err(error) => match self.policy {
                FailurePolicy::Reject => {
                    return Err(CoreError::Unavailable {
                        what: "embedding provider",
                        source: error.into(),
                    })
                }
                FailurePolicy::Defer => {
                    tracing::warn!(%error, "embedding failed; deferring to the backfill");
                    to_embed.iter().map(|_| Err(error.to_string())).collect()
                }
            },
        }
        .into_iter();

        let received_at = crate::domain::to_stored_precision(chrono::Utc::now());
        let mut prepared = Vec::with_capacity(requests.len());
        for (request, search_text) in requests.into_iter().zip(texts) {
            let WriteRequest {
                event,
                request_id,
                embedding,
            } = request;
            let decision = match (embedding, &search_text) {
                (Some(vector), _) => EmbeddingDecision::Vector {
                    values: vector.into_inner(),
                    state: EmbeddingState::Provided,
                },
                (None, None) => EmbeddingDecision::None,
                (None, Some(_)) => match generated.next().expect("one result per embedded text") {
                    Ok(embedded) => EmbeddingDecision::Vector {
                        values: embedded.vector.to_vec(),
                        state: if embedded.from_cache {
                            EmbeddingState::Cached
                        } else {
                            EmbeddingState::Generated
                        },
                    },
                    Err(reason) => EmbeddingDecision::Deferred { reason },
                },
            };
            prepared.push(PreparedWrite {
                event_id: uuid::Uuid::now_v7(),
                received_at,
                event,
                request_id,
                search_text,
                embedding: decision,
            });
        }
        Ok(prepared)
    }
}
