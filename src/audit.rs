//! The audit write use case: decide each event's embedding before any
//! transaction opens (model calls must not hold database locks), apply the
//! failure policy, then hand everything to the storage core in one call.
use std::{collections::HashSet, sync::Arc};

use crate::{
    config::FailurePolicy,
    domain::{incident_id_for, AuditEvent, EmbeddingState, Violations, WriteReceipt, WriteRequest},
    embedding::Embedder,
    error::CoreError,
    metrics::EVENTS_WRITTEN,
    models::Models,
    outage::{OutageQueue, QueuedBatch},
    storage::{EmbeddingDecision, PreparedWrite, Storage},
};

pub struct AuditService {
    storage: Storage,
    models: Arc<Models>,
    policy: FailurePolicy,
    /// Where writes go while PostgreSQL is unreachable, when enabled.
    outage_queue: Option<Arc<OutageQueue>>,
}

impl AuditService {
    pub fn new(
        storage: Storage,
        models: Arc<Models>,
        policy: FailurePolicy,
        outage_queue: Option<Arc<OutageQueue>>,
    ) -> Self {
        AuditService {
            storage,
            models,
            policy,
            outage_queue,
        }
    }

    pub fn embedding_dimensions(&self) -> usize {
        self.models.for_writes().handle.dimensions
    }

    /// Writes all requests in one transaction. `field_of(i)` names request i's
    /// event in violations (`event` or `requests[i].event`). `source` is the
    /// caller; `trace_id` its W3C trace id, stored with each event.
    #[tracing::instrument(skip_all, fields(events = requests.len()))]
    pub async fn write(
        &self,
        source: &str,
        trace_id: Option<String>,
        requests: Vec<WriteRequest>,
        field_of: impl Fn(usize) -> String,
    ) -> Result<Vec<WriteReceipt>, CoreError> {
        let events: Vec<&AuditEvent> = requests.iter().map(|r| &r.event).collect();
        match self.check_parents(&events, &field_of).await {
            // The replay checks them once PostgreSQL is back.
            Err(error) if error.is_database_unavailable() && self.outage_queue.is_some() => {}
            checked => checked?,
        }
        let model = self.models.for_writes();
        let prepared = self.prepare(&model.embedder, requests, trace_id).await?;
        let kinds: Vec<&'static str> = prepared.iter().map(|w| w.event.kind().label()).collect();
        let written = self.storage.write_events(source, &model.handle, &prepared).await;
        if let Ok(receipts) = &written {
            for (receipt, kind) in receipts.iter().zip(kinds) {
                if !receipt.duplicate {
                    metrics::counter!(EVENTS_WRITTEN, "kind" => kind).increment(1);
                }
            }
        }
        match written {
            Err(error) if error.is_database_unavailable() => match &self.outage_queue {
                Some(queue) => {
                    let batch = QueuedBatch {
                        source: source.to_owned(),
                        model: model.handle.name.clone(),
                        writes: prepared,
                    };
                    match queue.enqueue(&batch).await {
                        Ok(()) => Ok(queued_receipts(&batch.writes)),
                        Err(queue_error) => {
                            tracing::error!(error = %queue_error, "PostgreSQL and the outage queue are both unavailable");
                            Err(error)
                        }
                    }
                }
                None => Err(error),
            },
            written => written,
        }
    }

    /// Applies a write call the outage queue held, as the original call would
    /// have. A bad parent id is a permanent failure (the caller was told QUEUED).
    pub async fn apply_queued(&self, batch: &QueuedBatch) -> Result<Vec<WriteReceipt>, CoreError> {
        let handle = match self.models.named(&batch.model) {
            Some(model) => model.handle.clone(),
            None => self.storage.model_named(&batch.model).await?.ok_or_else(|| {
                CoreError::FailedPrecondition(format!("queued writes name an unknown model {:?}", batch.model))
            })?,
        };
        let events: Vec<&AuditEvent> = batch.writes.iter().map(|w| &w.event).collect();
        self.check_parents(&events, &|i| format!("requests[{i}].event")).await?;
        self.storage.write_events(&batch.source, &handle, &batch.writes).await
    }

    /// A parent must be stored already; the database cannot enforce this with
    /// a foreign key because events are partitioned by time.
    async fn check_parents(
        &self,
        events: &[&AuditEvent],
        field_of: &impl Fn(usize) -> String,
    ) -> Result<(), CoreError> {
        let parents: Vec<_> = events.iter().filter_map(|e| e.parent_event_id).collect();
        if parents.is_empty() {
            return Ok(());
        }
        let existing: HashSet<_> = self.storage.existing_event_ids(&parents).await?;
        let mut violations = Violations::new();
        for (index, event) in events.iter().enumerate() {
            if let Some(parent) = event.parent_event_id {
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

    async fn prepare(
        &self,
        embedder: &Embedder,
        requests: Vec<WriteRequest>,
        trace_id: Option<String>,
    ) -> Result<Vec<PreparedWrite>, CoreError> {
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
                trace_id: trace_id.clone(),
            });
        }
        Ok(prepared)
    }
}

/// What a queued write call answers: the ids the events will have, no
/// incident yet (the contract leaves it empty until the write commits).
fn queued_receipts(writes: &[PreparedWrite]) -> Vec<WriteReceipt> {
    writes
        .iter()
        .map(|w| WriteReceipt {
            event_id: w.event_id,
            incident_id: incident_id_for(&w.event.remediation_request_id),
            duplicate: false,
            embedding_state: w.embedding.state(),
            queued: true,
        })
        .collect()
}
