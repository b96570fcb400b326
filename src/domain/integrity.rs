//! Legal holds and exports, as validated requests and stored facts.
use chrono::{DateTime, Utc};

use super::IncidentFilter;

/// A hold keeps every event of a correlation id from every purge until it is
/// released; released holds stay as history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegalHold {
    pub id: uuid::Uuid,
    pub correlation_id: String,
    pub reason: String,
    pub placed_by: String,
    pub placed_at: DateTime<Utc>,
    /// Events of the correlation id stored now.
    pub events_affected: i64,
    pub release: Option<HoldRelease>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoldRelease {
    pub released_at: DateTime<Utc>,
    pub released_by: String,
    pub reason: String,
}

/// Place or release: both need a correlation id and a reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoldRequest {
    pub correlation_id: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportRequest {
    pub filter: IncidentFilter,
    pub correlation_id: Option<String>,
    pub redact_pii: bool,
}
