//! A validated audit event and the text each kind contributes to its embedding.
use std::{collections::BTreeMap, time::Duration};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::Violations;

/// Largest free-text field (message, root cause, reasoning, error message).
pub const MAX_FREE_TEXT_BYTES: usize = 10 * 1024;
/// Largest identifier-like field (ids, namespace, cluster, label values).
pub const MAX_ID_CHARS: usize = 255;
pub const MAX_LABELS: usize = 64;
pub const MAX_LABEL_KEY_CHARS: usize = 63;
pub const MAX_CUSTOM_DATA_BYTES: usize = 256 * 1024;
pub const MAX_CUSTOM_DATA_DEPTH: usize = 10;
/// PostgreSQL text and jsonb cannot hold U+0000, so no stored string may.
pub const NUL_MESSAGE: &str = "must not contain NUL (U+0000) characters";
/// Clocks drift; an event stamped further ahead than this is a bug in the writer.
pub const MAX_FUTURE_SKEW: chrono::TimeDelta = chrono::TimeDelta::minutes(5);

/// PostgreSQL keeps microseconds; timestamps are cut to that precision when
/// they enter the domain, so what is hashed and returned is what is stored.
pub fn to_stored_precision(at: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(at.timestamp_micros()).unwrap_or(at)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEvent {
    pub correlation_id: String,
    pub remediation_request_id: String,
    pub occurred_at: DateTime<Utc>,
    pub namespace: String,
    pub cluster: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub parent_event_id: Option<Uuid>,
    pub payload: Payload,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditKind {
    Remediation,
    AiAnalysis,
    Workflow,
    Execution,
    Custom,
}

impl AuditKind {
    /// Stored as the protobuf enum number so SQL readers and the contract agree.
    pub fn code(self) -> i16 {
        match self {
            AuditKind::Remediation => 1,
            AuditKind::AiAnalysis => 2,
            AuditKind::Workflow => 3,
            AuditKind::Execution => 4,
            AuditKind::Custom => 5,
        }
    }

    /// The kind's name in metrics labels (as in configuration).
    pub fn label(self) -> &'static str {
        match self {
            AuditKind::Remediation => "remediation",
            AuditKind::AiAnalysis => "ai_analysis",
            AuditKind::Workflow => "workflow",
            AuditKind::Execution => "execution",
            AuditKind::Custom => "custom",
        }
    }

    /// None for UNSPECIFIED and numbers the contract does not define.
    pub fn from_code(code: i32) -> Option<Self> {
        Some(match code {
            1 => AuditKind::Remediation,
            2 => AuditKind::AiAnalysis,
            3 => AuditKind::Workflow,
            4 => AuditKind::Execution,
            5 => AuditKind::Custom,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Payload {
    Remediation(Remediation),
    AiAnalysis(AiAnalysis),
    Workflow(Workflow),
    Execution(Execution),
    Custom(Custom),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Pending,
    Processing,
    Completed,
    Failed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExecutionStatus {
    Running,
    Succeeded,
    Failed,
    Skipped,
}

macro_rules! proto_codes {
    ($ty:ty { $($variant:ident = $code:literal),* $(,)? }) => {
        impl $ty {
            /// The protobuf enum number, which is also what the database stores.
            pub fn code(self) -> i16 {
                match self { $(<$ty>::$variant => $code),* }
            }

            /// None for UNSPECIFIED and numbers the contract does not define.
            pub fn from_code(code: i32) -> Option<Self> {
                match code { $($code => Some(<$ty>::$variant),)* _ => None }
            }
        }
    };
}
proto_codes!(Severity { Info = 1, Warning = 2, Critical = 3 });
proto_codes!(Phase { Pending = 1, Processing = 2, Completed = 3, Failed = 4 });
proto_codes!(ExecutionStatus { Running = 1, Succeeded = 2, Failed = 3, Skipped = 4 });

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceRef {
    pub kind: String,
    pub name: String,
    pub namespace: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Remediation {
    pub signal_type: String,
    pub signal_name: String,
    pub severity: Severity,
    pub target: ResourceRef,
    pub phase: Phase,
    pub message: Option<String>,
    pub started_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    pub priority: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AiAnalysis {
    pub root_cause: String,
    pub recommended_action: String,
    pub confidence: f64,
    pub reasoning: Option<String>,
    pub model: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Workflow {
    pub workflow_id: String,
    pub step_name: String,
    pub status: ExecutionStatus,
    pub duration: Option<Duration>,
    pub error_message: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Execution {
    pub action_type: String,
    pub target: ResourceRef,
    pub status: ExecutionStatus,
    pub duration: Option<Duration>,
    pub error_message: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Custom {
    pub event_type: String,
    pub action: Option<String>,
    pub outcome: Option<String>,
    pub data: Option<serde_json::Value>,
    pub text: Option<String>,
}

impl AuditEvent {
    pub fn kind(&self) -> AuditKind {
        match &self.payload {
            Payload::Remediation(_) => AuditKind::Remediation,
            Payload::AiAnalysis(_) => AuditKind::AiAnalysis,
            Payload::Workflow(_) => AuditKind::Workflow,
            Payload::Execution(_) => AuditKind::Execution,
            Payload::Custom(_) => AuditKind::Custom,
        }
    }

    /// The text that represents the event for similarity search and full-text
    /// search. It says what happened, to what, and why, in words a later
    /// "have we seen this before?" query would use; identifiers that are unique
    /// per event (ids, timestamps) are left out because they only add noise.
    /// A custom event is embedded only when its writer supplied `text`.
    pub fn embedding_text(&self) -> Option<String> {
        fn join(parts: &[Option<&str>]) -> String {
            parts
                .iter()
                .flatten()
                .filter(|p| !p.is_empty())
                .copied()
                .collect::<Vec<_>>()
                .join("\n")
        }
        let target = |t: &ResourceRef| match &t.namespace {
            Some(ns) => format!("{} {}/{}", t.kind, ns, t.name),
            None => format!("{} {}", t.kind, t.name),
        };
        Some(match &self.payload {
            Payload::Remediation(r) => join(&[
                Some(&format!("{} {}", r.signal_name, r.signal_type)),
                Some(&target(&r.target)),
                r.message.as_deref(),
            ]),
            Payload::AiAnalysis(a) => join(&[
                Some(&a.root_cause),
                Some(&format!("recommended action: {}", a.recommended_action)),
                a.reasoning.as_deref(),
            ]),
            Payload::Workflow(w) => join(&[
                Some(&format!("workflow {} step {} {:?}", w.workflow_id, w.step_name, w.status).to_lowercase()),
                w.error_message.as_deref(),
            ]),
            Payload::Execution(e) => join(&[
                Some(&format!("{} {} {:?}", e.action_type, target(&e.target), e.status).to_lowercase()),
                e.error_message.as_deref(),
            ]),
            Payload::Custom(c) => c.text.clone().filter(|t| !t.trim().is_empty())?,
        })
    }

    /// SHA-256 of the event's canonical JSON (labels and struct keys sorted):
    /// two requests carry "the same event" exactly when these match.
    pub fn content_hash(&self) -> [u8; 32] {
        let bytes = serde_json::to_vec(self).expect("domain events always serialise");
        Sha256::digest(bytes).into()
    }
}

/// An idempotency key: at most 255 characters, scoped to the caller.
/// (Deserialised only from the outage queue, which holds validated writes.)
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RequestId(String);

impl RequestId {
    pub fn parse(field: &str, value: String, violations: &mut Violations) -> Option<RequestId> {
        if value.is_empty() {
            return None;
        }
        if value.chars().count() > MAX_ID_CHARS {
            violations.add(field, format!("must be at most {MAX_ID_CHARS} characters"));
            return None;
        }
        if value.contains('\0') {
            violations.add(field, NUL_MESSAGE);
            return None;
        }
        Some(RequestId(value))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A caller-supplied vector: the active model's dimension, finite, not all zeros
/// (a zero vector has no cosine direction and pgvector cannot index it).
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddingVector(Vec<f32>);

impl EmbeddingVector {
    pub fn parse(field: &str, values: Vec<f32>, dimensions: usize, violations: &mut Violations) -> Option<Self> {
        if values.len() != dimensions {
            violations.add(
                field,
                format!(
                    "must have {dimensions} values for the active model, got {}",
                    values.len()
                ),
            );
            return None;
        }
        if let Some(index) = values.iter().position(|v| !v.is_finite()) {
            violations.add(format!("{field}[{index}]"), "must be a finite number");
            return None;
        }
        if values.iter().all(|v| *v == 0.0) {
            violations.add(field, "must not be all zeros: a zero vector has no direction");
            return None;
        }
        Some(EmbeddingVector(values))
    }

    pub fn into_inner(self) -> Vec<f32> {
        self.0
    }
}

/// How an event's embedding was obtained; stored with the event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EmbeddingState {
    /// The event has no text to embed.
    NotEmbedded,
    Generated,
    Cached,
    Provided,
    Deferred,
}

impl EmbeddingState {
    pub fn code(self) -> i16 {
        match self {
            EmbeddingState::NotEmbedded => 0,
            EmbeddingState::Generated => 1,
            EmbeddingState::Cached => 2,
            EmbeddingState::Provided => 3,
            EmbeddingState::Deferred => 4,
        }
    }

    pub fn from_code(code: i16) -> Option<Self> {
        Some(match code {
            0 => EmbeddingState::NotEmbedded,
            1 => EmbeddingState::Generated,
            2 => EmbeddingState::Cached,
            3 => EmbeddingState::Provided,
            4 => EmbeddingState::Deferred,
            _ => return None,
        })
    }

    /// The name exports use (the contract's enum value, lower case).
    pub fn name(self) -> &'static str {
        match self {
            EmbeddingState::NotEmbedded => "not_embedded",
            EmbeddingState::Generated => "generated",
            EmbeddingState::Cached => "cached",
            EmbeddingState::Provided => "provided",
            EmbeddingState::Deferred => "deferred",
        }
    }
}

/// One write as the storage core receives it: validated event, optional key and vector.
#[derive(Debug, Clone)]
pub struct WriteRequest {
    pub event: AuditEvent,
    pub request_id: Option<RequestId>,
    pub embedding: Option<EmbeddingVector>,
}

/// What the caller is told about one write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteReceipt {
    pub event_id: Uuid,
    pub incident_id: Uuid,
    pub duplicate: bool,
    pub embedding_state: EmbeddingState,
    /// Accepted into the outage queue, not yet committed.
    pub queued: bool,
}

/// Incidents are keyed by remediation_request_id; deriving the id from it
/// means every replica and every retry agrees on it without a lookup.
pub fn incident_id_for(remediation_request_id: &str) -> Uuid {
    const INCIDENT_NAMESPACE: Uuid = Uuid::from_u128(0x6a1f_4c2e_9b0d_4e57_8c3a_2f91_d4b7_e015);
    Uuid::new_v5(&INCIDENT_NAMESPACE, remediation_request_id.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(payload: Payload) -> AuditEvent {
        AuditEvent {
            correlation_id: "c".into(),
            remediation_request_id: "r".into(),
            occurred_at: DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
            namespace: "ns".into(),
            cluster: None,
            labels: BTreeMap::from([("b".into(), "2".into()), ("a".into(), "1".into())]),
            parent_event_id: None,
            payload,
        }
    }

    #[test]
    fn custom_events_without_text_are_not_embedded() {
        let custom = |text: Option<&str>| {
            event(Payload::Custom(Custom {
                event_type: "notification.sent".into(),
                action: None,
                outcome: None,
                data: None,
                text: text.map(Into::into),
            }))
        };
        assert_eq!(custom(None).embedding_text(), None);
        assert_eq!(custom(Some("  ")).embedding_text(), None);
        assert_eq!(
            custom(Some("paged on-call")).embedding_text().as_deref(),
            Some("paged on-call")
        );
    }

    #[test]
    fn remediation_text_names_alert_target_and_message() {
        let e = event(Payload::Remediation(Remediation {
            signal_type: "prometheus-alert".into(),
            signal_name: "HighMemoryUsage".into(),
            severity: Severity::Critical,
            target: ResourceRef {
                kind: "Deployment".into(),
                name: "api".into(),
                namespace: Some("payments".into()),
            },
            phase: Phase::Processing,
            message: Some("OOMKilled".into()),
            started_at: None,
            completed_at: None,
            priority: None,
        }));
        assert_eq!(
            e.embedding_text().unwrap(),
            "HighMemoryUsage prometheus-alert\nDeployment payments/api\nOOMKilled"
        );
    }

    #[test]
    fn content_hash_ignores_label_insertion_order_but_not_content() {
        let a = event(Payload::Custom(Custom {
            event_type: "x".into(),
            action: None,
            outcome: None,
            data: None,
            text: None,
        }));
        let mut b = a.clone();
        b.labels = BTreeMap::from([("a".into(), "1".into()), ("b".into(), "2".into())]);
        assert_eq!(a.content_hash(), b.content_hash());
        b.namespace = "other".into();
        assert_ne!(a.content_hash(), b.content_hash());
    }

    #[test]
    fn vectors_must_be_finite_nonzero_and_of_the_model_dimension() {
        let mut v = Violations::new();
        assert!(EmbeddingVector::parse("embedding.values", vec![1.0, 0.0], 3, &mut v).is_none());
        assert!(EmbeddingVector::parse("embedding.values", vec![1.0, f32::NAN, 0.0], 3, &mut v).is_none());
        assert!(EmbeddingVector::parse("embedding.values", vec![0.0; 3], 3, &mut v).is_none());
        let fields: Vec<_> = v.iter().map(|f| f.field.as_str()).collect();
        assert_eq!(fields, ["embedding.values", "embedding.values[1]", "embedding.values"]);
        let mut ok = Violations::new();
        assert!(EmbeddingVector::parse("embedding.values", vec![0.0, 1e-30, 0.0], 3, &mut ok).is_some());
    }

    #[test]
    fn incident_ids_are_stable_per_remediation_request() {
        assert_eq!(incident_id_for("rr-1"), incident_id_for("rr-1"));
        assert_ne!(incident_id_for("rr-1"), incident_id_for("rr-2"));
    }
}
