//! Domain → protobuf for answers. Destructuring by name keeps every domain
//! field accounted for, as `convert` does in the other direction.
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::{
    domain::{
        ActionStats, AiAnalysis, AuditEvent, Custom, Execution, HoldRelease, Incident, LegalHold, Payload, Remediation,
        ResourceRef, SearchHit, StoredEvent, Workflow,
    },
    integrity::{chain::ChainReport, ExportItem},
    jobs::{JobRecord, JobState},
    proto::v1 as pb,
};

pub fn timestamp(at: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: at.timestamp_subsec_nanos() as i32,
    }
}

/// Saturates at google.protobuf.Duration's range: a derived figure (a mean)
/// must not wrap into a negative duration.
fn duration(d: std::time::Duration) -> prost_types::Duration {
    const MAX_SECONDS: u64 = 315_576_000_000;
    if d.as_secs() > MAX_SECONDS {
        return prost_types::Duration {
            seconds: MAX_SECONDS as i64,
            nanos: 0,
        };
    }
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

fn resource(r: ResourceRef) -> pb::ResourceRef {
    let ResourceRef { kind, name, namespace } = r;
    pb::ResourceRef {
        kind,
        name,
        namespace: namespace.unwrap_or_default(),
    }
}

pub fn incident(incident: Incident) -> pb::Incident {
    let Incident {
        id,
        remediation_request_id,
        correlation_id,
        alert_name,
        severity,
        signal_type,
        namespace,
        cluster,
        target,
        root_cause,
        action_type,
        phase,
        execution_status,
        first_seen_at,
        last_event_at,
        resolved_at,
        event_count,
        labels,
    } = incident;
    pb::Incident {
        id: id.to_string(),
        remediation_request_id,
        correlation_id,
        alert_name: alert_name.unwrap_or_default(),
        severity: severity.map_or(0, |s| s.code().into()),
        signal_type: signal_type.unwrap_or_default(),
        namespace,
        cluster: cluster.unwrap_or_default(),
        target: target.map(resource),
        root_cause: root_cause.unwrap_or_default(),
        action_type: action_type.unwrap_or_default(),
        phase: phase.map_or(0, |p| p.code().into()),
        execution_status: execution_status.map_or(0, |s| s.code().into()),
        first_seen_at: Some(timestamp(first_seen_at)),
        last_event_at: Some(timestamp(last_event_at)),
        resolved_at: resolved_at.map(timestamp),
        event_count,
        labels: labels.into_iter().collect(),
    }
}

pub fn audit_event(event: AuditEvent) -> pb::AuditEvent {
    let AuditEvent {
        correlation_id,
        remediation_request_id,
        occurred_at,
        namespace,
        cluster,
        labels,
        parent_event_id,
        payload,
    } = event;
    pb::AuditEvent {
        correlation_id,
        remediation_request_id,
        occurred_at: Some(timestamp(occurred_at)),
        namespace,
        cluster: cluster.unwrap_or_default(),
        labels: labels.into_iter().collect(),
        parent_event_id: parent_event_id.map(|id| id.to_string()).unwrap_or_default(),
        payload: Some(audit_payload(payload)),
    }
}

fn audit_payload(payload: Payload) -> pb::audit_event::Payload {
    use pb::audit_event::Payload as P;
    match payload {
        Payload::Remediation(Remediation {
            signal_type,
            signal_name,
            severity,
            target,
            phase,
            message,
            started_at,
            completed_at,
            priority,
        }) => P::Remediation(pb::RemediationAudit {
            signal_type,
            signal_name,
            severity: severity.code().into(),
            target: Some(resource(target)),
            phase: phase.code().into(),
            message: message.unwrap_or_default(),
            started_at: started_at.map(timestamp),
            completed_at: completed_at.map(timestamp),
            priority: priority.unwrap_or_default(),
        }),
        Payload::AiAnalysis(AiAnalysis {
            root_cause,
            recommended_action,
            confidence,
            reasoning,
            model,
        }) => P::AiAnalysis(pb::AiAnalysisAudit {
            root_cause,
            recommended_action,
            confidence,
            reasoning: reasoning.unwrap_or_default(),
            model: model.unwrap_or_default(),
        }),
        Payload::Workflow(Workflow {
            workflow_id,
            step_name,
            status,
            duration: elapsed,
            error_message,
        }) => P::Workflow(pb::WorkflowAudit {
            workflow_id,
            step_name,
            status: status.code().into(),
            duration: elapsed.map(duration),
            error_message: error_message.unwrap_or_default(),
        }),
        Payload::Execution(Execution {
            action_type,
            target,
            status,
            duration: elapsed,
            error_message,
        }) => P::Execution(pb::ExecutionAudit {
            action_type,
            target: Some(resource(target)),
            status: status.code().into(),
            duration: elapsed.map(duration),
            error_message: error_message.unwrap_or_default(),
        }),
        Payload::Custom(Custom {
            event_type,
            action,
            outcome,
            data,
            text,
        }) => P::Custom(pb::CustomAudit {
            event_type,
            action: action.unwrap_or_default(),
            outcome: outcome.unwrap_or_default(),
            data: data.and_then(json_to_struct),
            text: text.unwrap_or_default(),
        }),
    }
}

pub fn stored_event(stored: StoredEvent) -> pb::StoredAuditEvent {
    let StoredEvent {
        event_id,
        incident_id,
        event,
        received_at,
        source,
        embedding_state,
        trace_id,
        previous_event_hash,
        event_hash,
        legal_hold,
    } = stored;
    pb::StoredAuditEvent {
        event_id: event_id.to_string(),
        incident_id: incident_id.to_string(),
        event: Some(audit_event(event)),
        received_at: Some(timestamp(received_at)),
        source,
        embedding_state: embedding_state.code().into(),
        trace_id: trace_id.unwrap_or_default(),
        event_hash: event_hash.map(hex::encode).unwrap_or_default(),
        previous_event_hash: previous_event_hash.map(hex::encode).unwrap_or_default(),
        legal_hold,
    }
}

pub fn legal_hold(hold: LegalHold) -> pb::LegalHold {
    let LegalHold {
        id: _,
        correlation_id,
        reason,
        placed_by,
        placed_at,
        events_affected,
        release,
    } = hold;
    let (released_at, released_by, release_reason) = match release {
        Some(HoldRelease {
            released_at,
            released_by,
            reason,
        }) => (Some(timestamp(released_at)), released_by, reason),
        None => (None, String::new(), String::new()),
    };
    pb::LegalHold {
        correlation_id,
        reason,
        placed_by,
        placed_at: Some(timestamp(placed_at)),
        events_affected,
        released_at,
        released_by,
        release_reason,
    }
}

pub fn chain_report(report: ChainReport) -> pb::VerifyAuditChainResponse {
    pb::VerifyAuditChainResponse {
        valid: report.valid(),
        total_events: report.total_events,
        verified_events: report.verified_events,
        tampered_event_ids: report.tampered.iter().map(Uuid::to_string).collect(),
    }
}

pub fn export_item(item: ExportItem) -> pb::ExportAuditEventsResponse {
    use pb::export_audit_events_response::Item;
    let item = match item {
        ExportItem::Event {
            event_id,
            incident_id,
            event,
            chain_verified,
            signed_line,
        } => Item::Event(pb::ExportedAuditEvent {
            event: Some(match event {
                Some(event) => stored_event(*event),
                None => pb::StoredAuditEvent {
                    event_id: event_id.to_string(),
                    incident_id: incident_id.to_string(),
                    ..Default::default()
                },
            }),
            chain_verified,
            signed_line,
        }),
        ExportItem::Summary {
            total_events,
            verified_events,
            tampered_event_ids,
            signature_algorithm,
            signature,
            key_id,
            signed_line,
        } => Item::Summary(pb::ExportSummary {
            total_events,
            verified_events,
            tampered_event_ids: tampered_event_ids.iter().map(Uuid::to_string).collect(),
            signature_algorithm: signature_algorithm.to_owned(),
            signature,
            key_id,
            signed_line,
        }),
    };
    pb::ExportAuditEventsResponse { item: Some(item) }
}

pub fn action_stats(stats: ActionStats) -> pb::ActionStats {
    let ActionStats {
        action_type,
        total,
        succeeded,
        failed,
        success_rate,
        mean_duration,
        p50_duration,
        p95_duration,
    } = stats;
    pb::ActionStats {
        action_type,
        total,
        succeeded,
        failed,
        success_rate,
        mean_duration: mean_duration.map(duration),
        p50_duration: p50_duration.map(duration),
        p95_duration: p95_duration.map(duration),
    }
}

/// Custom data was a google.protobuf.Struct on the way in, so it is a JSON object.
fn json_to_struct(value: serde_json::Value) -> Option<prost_types::Struct> {
    match value {
        serde_json::Value::Object(map) => Some(prost_types::Struct {
            fields: map.into_iter().map(|(k, v)| (k, json_to_value(v))).collect(),
        }),
        _ => None,
    }
}

fn json_to_value(value: serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match value {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        serde_json::Value::String(s) => Kind::StringValue(s),
        serde_json::Value::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.into_iter().map(json_to_value).collect(),
        }),
        object @ serde_json::Value::Object(_) => Kind::StructValue(json_to_struct(object).unwrap_or_default()),
    };
    prost_types::Value { kind: Some(kind) }
}

pub fn search_hit(hit: SearchHit) -> pb::SearchHit {
    let SearchHit { event, similarity } = hit;
    pb::SearchHit {
        event_id: event.event_id.to_string(),
        incident_id: event.incident_id.to_string(),
        similarity,
        event: Some(stored_event(event)),
    }
}

pub fn job(job: JobRecord) -> pb::Job {
    let progress_percent = job.progress_percent();
    let JobRecord {
        id,
        spec,
        state,
        done,
        total,
        result,
        error,
        created_by,
        created_at,
        started_at,
        updated_at,
        finished_at,
        expires_at,
        version: _,
    } = job;
    pb::Job {
        id: id.to_string(),
        r#type: spec.type_name().to_owned(),
        state: match state {
            JobState::Pending => pb::JobState::Pending,
            JobState::Running => pb::JobState::Running,
            JobState::Succeeded => pb::JobState::Succeeded,
            JobState::Failed => pb::JobState::Failed,
            JobState::Cancelled => pb::JobState::Cancelled,
        } as i32,
        progress_percent,
        done,
        total,
        result: if result.is_empty() {
            None
        } else {
            json_to_struct(serde_json::Value::Object(result))
        },
        error: error.map(|e| tonic_types::pb::Status {
            code: e.code,
            message: e.message,
            details: Vec::new(),
        }),
        created_by,
        created_at: Some(timestamp(created_at)),
        started_at: started_at.map(timestamp),
        updated_at: Some(timestamp(updated_at)),
        finished_at: finished_at.map(timestamp),
        expires_at: expires_at.map(timestamp),
    }
}
