//! Audit integrity: hash chains, legal holds, signed export, PII redaction.
//!
//! The chain is written by the storage core inside each write transaction
//! (`storage::audit`); this module verifies it, manages holds and builds
//! signed exports. docs/audit-integrity.md is the auditor's description.
pub mod chain;
pub mod export;
pub mod redact;

use std::sync::Arc;

use chrono::Utc;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use uuid::Uuid;

use self::{
    chain::{verify_chain, ChainHasher, ChainReport},
    export::{ExportLine, ExportSigner, ExportedLink, FORMAT, SIGNATURE_ALGORITHM},
};
use crate::{
    config::IntegritySettings,
    domain::{Cursor, EmbeddingState, ExportRequest, LegalHold, StoredEvent},
    error::CoreError,
    pagination::{Listing, PageTokens},
    query::{TokenPage, PAGE_TOKEN_FIELD},
    storage::{ChainEvent, Storage, StoredChain},
};

pub struct IntegrityService {
    storage: Storage,
    hasher: ChainHasher,
    signer: Option<Arc<ExportSigner>>,
    max_chain_events: u64,
    tokens: PageTokens,
}

/// What an export streams: each event with its line, then the summary.
#[derive(Debug, Clone)]
pub enum ExportItem {
    Event {
        event_id: Uuid,
        incident_id: Uuid,
        /// None when the stored payload no longer parses (see `ChainEvent::stored_event`).
        event: Option<Box<StoredEvent>>,
        chain_verified: bool,
        signed_line: Vec<u8>,
    },
    Summary {
        total_events: i64,
        verified_events: i64,
        tampered_event_ids: Vec<Uuid>,
        signature_algorithm: &'static str,
        signature: Vec<u8>,
        key_id: String,
        signed_line: Vec<u8>,
    },
}

/// Exports stream through a small buffer: a slow reader holds the producer
/// back instead of the server buffering the whole export.
const EXPORT_BUFFER: usize = 64;

impl IntegrityService {
    pub fn new(storage: Storage, settings: &IntegritySettings, tokens: PageTokens) -> anyhow::Result<Self> {
        let signer = match &settings.export_signing_key {
            Some(path) => Some(Arc::new(ExportSigner::load(path, &settings.export_key_id)?)),
            None => None,
        };
        Ok(IntegrityService {
            storage,
            hasher: ChainHasher::new(settings),
            signer,
            max_chain_events: settings.max_chain_events,
            tokens,
        })
    }

    pub async fn verify_chain(&self, correlation_id: &str) -> Result<ChainReport, CoreError> {
        let chain = self
            .storage
            .chain(correlation_id, self.max_chain_events)
            .await?
            .ok_or_else(|| CoreError::NotFound(format!("audit chain of correlation_id {correlation_id:?}")))?;
        let links: Vec<_> = chain.events.iter().map(|e| e.link.clone()).collect();
        let report = verify_chain(&self.hasher, chain.length, &links, &chain.purged);
        if !report.valid() {
            tracing::warn!(
                correlation_id,
                tampered = report.tampered.len(),
                missing_links = report.missing_links,
                "audit chain failed verification"
            );
        }
        Ok(report)
    }

    pub async fn place_hold(&self, correlation_id: &str, reason: &str, by: &str) -> Result<LegalHold, CoreError> {
        let hold = self.storage.place_hold(correlation_id, reason, by).await?;
        tracing::info!(correlation_id, placed_by = by, "legal hold in force");
        Ok(hold)
    }

    pub async fn release_hold(&self, correlation_id: &str, reason: &str, by: &str) -> Result<LegalHold, CoreError> {
        let hold = self.storage.release_hold(correlation_id, reason, by).await?;
        tracing::info!(correlation_id, released_by = by, "legal hold released");
        Ok(hold)
    }

    pub async fn list_holds(&self, page_size: usize, page_token: &str) -> Result<TokenPage<LegalHold>, CoreError> {
        const PARAMS: &str = "";
        let continuation = if page_token.is_empty() {
            None
        } else {
            Some(
                self.tokens
                    .open(PAGE_TOKEN_FIELD, page_token, Listing::LegalHolds, PARAMS, Utc::now())?,
            )
        };
        let started = continuation.as_ref().map_or_else(Utc::now, |c| c.started);
        let mut holds = self
            .storage
            .list_holds(page_size + 1, continuation.and_then(|c| c.position.after))
            .await?;
        let next_page_token = if holds.len() > page_size {
            holds.truncate(page_size);
            holds.last().map(|last| {
                let after = Cursor {
                    at: last.placed_at,
                    id: last.id,
                };
                self.tokens.issue(Listing::LegalHolds, PARAMS, started, "", after)
            })
        } else {
            None
        };
        Ok(TokenPage {
            items: holds,
            next_page_token,
        })
    }

    /// Starts an export. Refused up front when no signing key is configured
    /// or a requested chain is too long; later failures end the stream.
    pub async fn export(
        &self,
        request: ExportRequest,
    ) -> Result<mpsc::Receiver<Result<ExportItem, CoreError>>, CoreError> {
        let signer = self.signer.clone().ok_or_else(|| {
            CoreError::FailedPrecondition(
                "exports are signed, and no signing key is configured (integrity.export_signing_key)".into(),
            )
        })?;
        let correlation_ids = self
            .storage
            .export_correlation_ids(&request.filter, request.correlation_id.as_deref())
            .await?;
        let first = match correlation_ids.first() {
            Some(id) => self.storage.chain(id, self.max_chain_events).await?,
            None => None,
        };
        let (sender, receiver) = mpsc::channel(EXPORT_BUFFER);
        let exporter = Exporter {
            storage: self.storage.clone(),
            hasher: self.hasher.clone(),
            max_chain_events: self.max_chain_events,
            signer,
            request,
            digest: Sha256::new(),
            total: 0,
            verified: 0,
            tampered: Vec::new(),
            sender,
        };
        tokio::spawn(exporter.run(correlation_ids, first));
        Ok(receiver)
    }
}

struct Exporter {
    storage: Storage,
    hasher: ChainHasher,
    max_chain_events: u64,
    signer: Arc<ExportSigner>,
    request: ExportRequest,
    digest: Sha256,
    total: i64,
    verified: i64,
    tampered: Vec<Uuid>,
    sender: mpsc::Sender<Result<ExportItem, CoreError>>,
}

/// The reader went away; stop exporting.
struct Gone;

impl Exporter {
    async fn run(mut self, correlation_ids: Vec<String>, first: Option<StoredChain>) {
        let mut first = first;
        for correlation_id in correlation_ids {
            let chain = match first.take() {
                Some(chain) => Ok(Some(chain)),
                None => self.storage.chain(&correlation_id, self.max_chain_events).await,
            };
            let result = match chain {
                Ok(Some(chain)) => self.export_chain(&correlation_id, chain).await,
                Ok(None) => Ok(()),
                Err(error) => {
                    let _ = self.sender.send(Err(error)).await;
                    return;
                }
            };
            if result.is_err() {
                return;
            }
        }
        let _ = self.finish().await;
    }

    async fn export_chain(&mut self, correlation_id: &str, chain: StoredChain) -> Result<(), Gone> {
        let links: Vec<_> = chain.events.iter().map(|e| e.link.clone()).collect();
        let report = verify_chain(&self.hasher, chain.length, &links, &chain.purged);
        let verified: std::collections::HashMap<Uuid, bool> = report.verified.iter().copied().collect();
        let matching = if self.request.filter == Default::default() {
            None
        } else {
            match self
                .storage
                .matching_incidents_of_chain(&self.request.filter, correlation_id)
                .await
            {
                Ok(ids) => Some(ids),
                Err(error) => {
                    let _ = self.sender.send(Err(error)).await;
                    return Err(Gone);
                }
            }
        };
        for event in chain.events {
            if matching.as_ref().is_some_and(|ids| !ids.contains(&event.incident_id)) {
                continue;
            }
            let chain_verified = verified.get(&event.link.event_id).copied().unwrap_or(false);
            let item = self.event_item(event, chain_verified);
            self.sender.send(Ok(item)).await.map_err(|_| Gone)?;
        }
        Ok(())
    }

    fn event_item(&mut self, mut event: ChainEvent, chain_verified: bool) -> ExportItem {
        let redacted = self.request.redact_pii;
        if redacted {
            redact::redact_json(&mut event.record.payload);
            event
                .record
                .labels
                .values_mut()
                .for_each(|value| *value = redact::redact_text(value));
        }
        let stored = event.stored_event();
        let ChainEvent {
            record,
            link,
            incident_id,
            embedding_state,
            legal_hold,
        } = event;
        let event_id = record.event_id;
        let line = ExportLine::Event {
            chain: ExportedLink {
                seq: link.seq,
                previous_event_hash: link.previous_hash.as_deref().map(hex::encode),
                event_hash: link.hash.as_deref().map(hex::encode),
                algorithm: link.algorithm.clone(),
                key_id: link.key_id.clone(),
            },
            event: Box::new(record),
            chain_verified,
            redacted,
            incident_id,
            embedding_state: EmbeddingState::from_code(embedding_state)
                .unwrap_or(EmbeddingState::NotEmbedded)
                .name()
                .to_owned(),
            legal_hold,
        };
        self.total += 1;
        if chain_verified {
            self.verified += 1;
        } else {
            self.tampered.push(event_id);
        }
        let signed_line = self.sign_line(&line);
        ExportItem::Event {
            event_id,
            incident_id,
            event: stored.map(Box::new),
            chain_verified,
            signed_line,
        }
    }

    fn sign_line(&mut self, line: &ExportLine) -> Vec<u8> {
        let bytes = line.canonical_bytes();
        self.digest.update(&bytes);
        self.digest.update(b"\n");
        bytes
    }

    async fn finish(mut self) -> Result<(), Gone> {
        let summary = ExportLine::Summary {
            format: FORMAT.to_owned(),
            total_events: self.total,
            verified_events: self.verified,
            tampered_event_ids: self.tampered.clone(),
            signature_algorithm: SIGNATURE_ALGORITHM.to_owned(),
            key_id: self.signer.key_id().to_owned(),
            exported_at: crate::domain::to_stored_precision(Utc::now()),
        };
        let signed_line = self.sign_line(&summary);
        let digest: [u8; 32] = std::mem::take(&mut self.digest).finalize().into();
        let item = ExportItem::Summary {
            total_events: self.total,
            verified_events: self.verified,
            tampered_event_ids: self.tampered,
            signature_algorithm: SIGNATURE_ALGORITHM,
            signature: self.signer.sign(&digest),
            key_id: self.signer.key_id().to_owned(),
            signed_line,
        };
        self.sender.send(Ok(item)).await.map_err(|_| Gone)
    }
}
