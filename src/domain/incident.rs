//! What IncidentQuery reads: incidents, stored events, action statistics, and
//! the validated shapes of its requests.
use std::{collections::BTreeMap, time::Duration};

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use super::{AuditEvent, AuditKind, EmbeddingState, ExecutionStatus, Phase, ResourceRef, Severity};

pub const DEFAULT_PAGE_SIZE: usize = 50;
pub const MAX_PAGE_SIZE: usize = 1000;

/// All set fields must match. Serialised only to fingerprint a listing in its
/// page token, so field order here is part of the token format.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct IncidentFilter {
    pub alert_name: Option<String>,
    pub severities: Vec<Severity>,
    pub action_type: Option<String>,
    pub namespace: Option<String>,
    pub cluster: Option<String>,
    pub phases: Vec<Phase>,
    /// On last_event_at: since inclusive, until exclusive.
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum IncidentSortKey {
    LastEventAt,
    FirstSeenAt,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct IncidentOrder {
    pub key: IncidentSortKey,
    pub descending: bool,
}

impl Default for IncidentOrder {
    fn default() -> Self {
        IncidentOrder {
            key: IncidentSortKey::LastEventAt,
            descending: true,
        }
    }
}

impl IncidentOrder {
    /// The contract's `order_by` strings; empty means the default. Case and
    /// runs of spaces are forgiven, anything else is refused.
    pub fn parse(order_by: &str) -> Option<Self> {
        let words: Vec<String> = order_by.split_whitespace().map(str::to_lowercase).collect();
        let words: Vec<&str> = words.iter().map(String::as_str).collect();
        let (key, descending) = match words.as_slice() {
            [] => return Some(Self::default()),
            ["last_event_at", "desc"] => (IncidentSortKey::LastEventAt, true),
            ["last_event_at", "asc"] => (IncidentSortKey::LastEventAt, false),
            ["first_seen_at", "desc"] => (IncidentSortKey::FirstSeenAt, true),
            ["first_seen_at", "asc"] => (IncidentSortKey::FirstSeenAt, false),
            _ => return None,
        };
        Some(IncidentOrder { key, descending })
    }
}

/// A position in a keyset-paginated listing: the sort key and id of the last
/// row returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub at: DateTime<Utc>,
    pub id: Uuid,
}

/// Where a listing continues from: the snapshot its first page pinned (a
/// PostgreSQL `pg_snapshot` in text form; empty for listings that need none),
/// and the last row returned (None on the first page).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PagePosition {
    pub snapshot: String,
    pub after: Option<Cursor>,
}

/// Page size as the contract defines it: 0 means the default, larger than the
/// maximum is clamped.
pub fn page_size(requested: i32) -> Option<usize> {
    match requested {
        i32::MIN..=-1 => None,
        0 => Some(DEFAULT_PAGE_SIZE),
        n => Some((n as usize).min(MAX_PAGE_SIZE)),
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Incident {
    pub id: Uuid,
    pub remediation_request_id: String,
    pub correlation_id: String,
    pub alert_name: Option<String>,
    pub severity: Option<Severity>,
    pub signal_type: Option<String>,
    pub namespace: String,
    pub cluster: Option<String>,
    pub target: Option<ResourceRef>,
    pub root_cause: Option<String>,
    pub action_type: Option<String>,
    pub phase: Option<Phase>,
    pub execution_status: Option<ExecutionStatus>,
    pub first_seen_at: DateTime<Utc>,
    pub last_event_at: DateTime<Utc>,
    pub resolved_at: Option<DateTime<Utc>>,
    pub event_count: i64,
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IncidentKey {
    Id(Uuid),
    RemediationRequestId(String),
}

/// Whose timeline ListAuditEvents reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum TimelineScope {
    Incident(Uuid),
    RemediationRequest(String),
    Correlation(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TimelineQuery {
    pub scope: TimelineScope,
    /// Empty means every kind.
    pub kinds: Vec<AuditKind>,
}

/// An event as stored: what the caller wrote plus what the service recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    pub event_id: Uuid,
    pub incident_id: Uuid,
    pub event: AuditEvent,
    pub received_at: DateTime<Utc>,
    pub source: String,
    pub embedding_state: EmbeddingState,
    pub trace_id: Option<String>,
    /// Its link in the correlation id's hash chain (None: the first event).
    pub previous_event_hash: Option<Vec<u8>>,
    pub event_hash: Option<Vec<u8>>,
    /// Whether a legal hold on its correlation id is in force.
    pub legal_hold: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ActionStats {
    pub action_type: String,
    pub total: i64,
    pub succeeded: i64,
    pub failed: i64,
    pub success_rate: f64,
    pub mean_duration: Option<Duration>,
    pub p50_duration: Option<Duration>,
    pub p95_duration: Option<Duration>,
}

/// One page of a listing, and where the next one starts.
#[derive(Debug, Clone)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next: Option<PagePosition>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_by_accepts_the_four_contract_values_and_the_default() {
        assert_eq!(IncidentOrder::parse(""), Some(IncidentOrder::default()));
        assert_eq!(
            IncidentOrder::parse("  Last_Event_At   DESC "),
            Some(IncidentOrder::default())
        );
        assert_eq!(
            IncidentOrder::parse("first_seen_at asc"),
            Some(IncidentOrder {
                key: IncidentSortKey::FirstSeenAt,
                descending: false
            })
        );
        assert_eq!(IncidentOrder::parse("last_event_at"), None);
        assert_eq!(IncidentOrder::parse("severity desc"), None);
        assert_eq!(IncidentOrder::parse("last_event_at desc; DROP TABLE incidents"), None);
    }

    #[test]
    fn page_size_defaults_clamps_and_refuses_negatives() {
        assert_eq!(page_size(0), Some(DEFAULT_PAGE_SIZE));
        assert_eq!(page_size(7), Some(7));
        assert_eq!(page_size(5000), Some(MAX_PAGE_SIZE));
        assert_eq!(page_size(-1), None);
    }
}
