//! SearchSimilar's validated request and its hits.
use uuid::Uuid;

use super::{AuditKind, IncidentFilter, StoredEvent};

pub const DEFAULT_TOP_K: usize = 10;
pub const MAX_TOP_K: usize = 100;

#[derive(Debug, Clone, PartialEq)]
pub enum SearchInput {
    Text(String),
    /// Finite and not all zeros; its dimension is checked against the model
    /// once the model is known.
    Vector(Vec<f32>),
    /// An existing event: its embedding is the query, and it is excluded.
    Event(Uuid),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SearchMode {
    Vector,
    /// Vector and full-text rankings fused by reciprocal rank fusion.
    Hybrid,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SearchRequest {
    pub input: SearchInput,
    pub top_k: usize,
    pub min_similarity: Option<f32>,
    pub filter: IncidentFilter,
    /// Empty means every kind.
    pub kinds: Vec<AuditKind>,
    pub group_by_incident: bool,
    pub mode: SearchMode,
    /// None: the active model.
    pub model: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SearchHit {
    pub event: StoredEvent,
    /// Cosine similarity to the query, in [-1, 1].
    pub similarity: f32,
}
