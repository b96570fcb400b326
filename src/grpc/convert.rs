//! Protobuf → domain: every field of every request message is destructured by
//! name (a new proto field breaks the build here instead of being ignored) and
//! checked against the contract. Violations are collected, not short-circuited,
//! so one answer names every bad field.
use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use prost::Message;
use uuid::Uuid;

use crate::{
    domain::{
        self, to_stored_precision, AiAnalysis, AuditEvent, AuditKind, Custom, EmbeddingVector, Execution,
        ExecutionStatus, ExportRequest, HoldRequest, IncidentFilter, IncidentKey, IncidentOrder, Payload, Phase,
        Remediation, RequestId, ResourceRef, SearchInput, SearchMode, SearchRequest, Severity, TimelineQuery,
        TimelineScope, Violations, Workflow, WriteRequest, DEFAULT_TOP_K, MAX_CUSTOM_DATA_BYTES, MAX_CUSTOM_DATA_DEPTH,
        MAX_FREE_TEXT_BYTES, MAX_FUTURE_SKEW, MAX_ID_CHARS, MAX_LABELS, MAX_LABEL_KEY_CHARS, MAX_TOP_K, NUL_MESSAGE,
    },
    jobs::{JobCursor, JobListFilter, JobSpec, JobState},
    proto::v1 as pb,
};

/// Facts the rules depend on that are not in the request.
pub struct ValidationContext {
    pub now: DateTime<Utc>,
    pub embedding_dimensions: usize,
}

/// Field paths are built as the parser descends: `requests[3].event.remediation`.
fn path(prefix: &str, field: &str) -> String {
    if prefix.is_empty() {
        field.to_owned()
    } else {
        format!("{prefix}.{field}")
    }
}

/// PostgreSQL cannot store U+0000 in text; refusing it here keeps it from
/// surfacing as an internal error.
fn refuse_nul(v: &mut Violations, field: &str, value: &str) {
    if value.contains('\0') {
        v.add(field, NUL_MESSAGE);
    }
}

fn required_id(v: &mut Violations, field: String, value: String) -> String {
    refuse_nul(v, &field, &value);
    let chars = value.chars().count();
    if value.trim().is_empty() {
        v.add(field, "is required");
    } else if chars > MAX_ID_CHARS {
        v.add(field, format!("must be at most {MAX_ID_CHARS} characters, got {chars}"));
    }
    value
}

fn required_text(v: &mut Violations, field: String, value: String, max_chars: usize) -> String {
    refuse_nul(v, &field, &value);
    if value.trim().is_empty() {
        v.add(field, "is required");
    } else if value.chars().count() > max_chars {
        v.add(field, format!("must be at most {max_chars} characters"));
    }
    value
}

fn optional_text(v: &mut Violations, field: String, value: String, max_chars: usize) -> Option<String> {
    refuse_nul(v, &field, &value);
    if value.chars().count() > max_chars {
        v.add(field, format!("must be at most {max_chars} characters"));
    }
    (!value.is_empty()).then_some(value)
}

fn optional_free_text(v: &mut Violations, field: String, value: String) -> Option<String> {
    refuse_nul(v, &field, &value);
    if value.len() > MAX_FREE_TEXT_BYTES {
        v.add(
            field,
            format!("must be at most {MAX_FREE_TEXT_BYTES} bytes, got {}", value.len()),
        );
    }
    (!value.is_empty()).then_some(value)
}

fn required_free_text(v: &mut Violations, field: String, value: String) -> String {
    if value.trim().is_empty() {
        v.add(field, "is required");
        return value;
    }
    optional_free_text(v, field, value).unwrap_or_default()
}

fn timestamp(v: &mut Violations, field: &str, value: prost_types::Timestamp) -> Option<DateTime<Utc>> {
    // prost's Timestamp allows any i64 seconds; the protobuf spec's range is years 1..=9999.
    const MIN_SECONDS: i64 = -62_135_596_800;
    const MAX_SECONDS: i64 = 253_402_300_799;
    if !(MIN_SECONDS..=MAX_SECONDS).contains(&value.seconds) || !(0..1_000_000_000).contains(&value.nanos) {
        v.add(field, "must be a valid timestamp between 0001-01-01 and 9999-12-31");
        return None;
    }
    DateTime::from_timestamp(value.seconds, value.nanos as u32)
}

/// google.protobuf.Duration's range: ±10,000 years.
const MAX_DURATION_SECONDS: i64 = 315_576_000_000;

fn duration(v: &mut Violations, field: String, value: Option<prost_types::Duration>) -> Option<std::time::Duration> {
    let value = value?;
    if value.seconds < 0 || value.nanos < 0 || value.nanos >= 1_000_000_000 {
        v.add(field, "must be zero or positive");
        return None;
    }
    if value.seconds > MAX_DURATION_SECONDS {
        v.add(
            field,
            "must be within google.protobuf.Duration's range (315576000000 s)",
        );
        return None;
    }
    Some(std::time::Duration::new(value.seconds as u64, value.nanos as u32))
}

fn enum_value<T>(v: &mut Violations, field: String, code: i32, from_code: fn(i32) -> Option<T>) -> Option<T> {
    let parsed = from_code(code);
    if parsed.is_none() {
        v.add(
            field,
            if code == 0 {
                "is required (UNSPECIFIED is not allowed)".to_owned()
            } else {
                format!("unknown value {code}")
            },
        );
    }
    parsed
}

fn resource(v: &mut Violations, field: String, value: Option<pb::ResourceRef>) -> Option<ResourceRef> {
    let Some(pb::ResourceRef { kind, name, namespace }) = value else {
        v.add(field, "is required");
        return None;
    };
    Some(ResourceRef {
        kind: required_id(v, path(&field, "kind"), kind),
        name: required_id(v, path(&field, "name"), name),
        namespace: optional_text(v, path(&field, "namespace"), namespace, MAX_ID_CHARS),
    })
}

pub fn write_request(
    prefix: &str,
    request: pb::WriteAuditRequest,
    ctx: &ValidationContext,
) -> Result<WriteRequest, Violations> {
    let pb::WriteAuditRequest {
        event,
        request_id,
        embedding,
    } = request;
    let mut v = Violations::new();
    let event = match event {
        Some(event) => audit_event(&mut v, &path(prefix, "event"), event, ctx),
        None => {
            v.add(path(prefix, "event"), "is required");
            None
        }
    };
    let request_id = RequestId::parse(&path(prefix, "request_id"), request_id, &mut v);
    let embedding = embedding.and_then(|pb::Vector { values }| {
        EmbeddingVector::parse(
            &path(prefix, "embedding.values"),
            values,
            ctx.embedding_dimensions,
            &mut v,
        )
    });
    match event {
        Some(event) if v.is_empty() => Ok(WriteRequest {
            event,
            request_id,
            embedding,
        }),
        _ => Err(v),
    }
}

fn audit_event(v: &mut Violations, prefix: &str, event: pb::AuditEvent, ctx: &ValidationContext) -> Option<AuditEvent> {
    let pb::AuditEvent {
        correlation_id,
        remediation_request_id,
        occurred_at,
        namespace,
        cluster,
        labels,
        parent_event_id,
        payload,
    } = event;
    let before = v.iter().count();
    let correlation_id = required_id(v, path(prefix, "correlation_id"), correlation_id);
    let remediation_request_id = required_id(v, path(prefix, "remediation_request_id"), remediation_request_id);
    let occurred_field = path(prefix, "occurred_at");
    let occurred_at = match occurred_at {
        None => {
            v.add(&occurred_field, "is required");
            None
        }
        Some(ts) => timestamp(v, &occurred_field, ts).map(to_stored_precision).filter(|at| {
            let too_late = *at > ctx.now + MAX_FUTURE_SKEW;
            if too_late {
                v.add(&occurred_field, "must not be more than 5 minutes in the future");
            }
            !too_late
        }),
    };
    let namespace = required_id(v, path(prefix, "namespace"), namespace);
    let cluster = optional_text(v, path(prefix, "cluster"), cluster, MAX_ID_CHARS);
    let labels = label_map(v, &path(prefix, "labels"), labels);
    let parent_field = path(prefix, "parent_event_id");
    let parent_event_id = (!parent_event_id.is_empty())
        .then(|| Uuid::parse_str(&parent_event_id))
        .and_then(|parsed| {
            parsed
                .inspect_err(|_| v.add(&parent_field, "must be an event id returned by WriteAudit"))
                .ok()
        });
    let payload = match payload {
        None => {
            v.add(
                path(prefix, "payload"),
                "exactly one of remediation, ai_analysis, workflow, execution, custom is required",
            );
            None
        }
        Some(payload) => audit_payload(v, prefix, payload),
    };
    if v.iter().count() > before {
        return None;
    }
    Some(AuditEvent {
        correlation_id,
        remediation_request_id,
        occurred_at: occurred_at?,
        namespace,
        cluster,
        labels,
        parent_event_id,
        payload: payload?,
    })
}

fn label_map(
    v: &mut Violations,
    field: &str,
    labels: std::collections::HashMap<String, String>,
) -> BTreeMap<String, String> {
    if labels.len() > MAX_LABELS {
        v.add(
            field,
            format!("must have at most {MAX_LABELS} entries, got {}", labels.len()),
        );
    }
    // Sorted so that the reported violations do not depend on hash order.
    let labels: BTreeMap<String, String> = labels.into_iter().collect();
    for (key, value) in &labels {
        refuse_nul(v, &format!("{field}[{key:?}]"), &format!("{key}{value}"));
        let key_chars = key.chars().count();
        if key_chars == 0 || key_chars > MAX_LABEL_KEY_CHARS {
            v.add(
                format!("{field}[{key:?}]"),
                format!("keys must be 1..={MAX_LABEL_KEY_CHARS} characters"),
            );
        }
        if value.chars().count() > MAX_ID_CHARS {
            v.add(
                format!("{field}[{key:?}]"),
                format!("values must be at most {MAX_ID_CHARS} characters"),
            );
        }
    }
    labels
}

fn audit_payload(v: &mut Violations, prefix: &str, payload: pb::audit_event::Payload) -> Option<Payload> {
    use pb::audit_event::Payload as P;
    Some(match payload {
        P::Remediation(r) => Payload::Remediation(remediation(v, &path(prefix, "remediation"), r)?),
        P::AiAnalysis(a) => Payload::AiAnalysis(ai_analysis(v, &path(prefix, "ai_analysis"), a)?),
        P::Workflow(w) => Payload::Workflow(workflow(v, &path(prefix, "workflow"), w)?),
        P::Execution(e) => Payload::Execution(execution(v, &path(prefix, "execution"), e)?),
        P::Custom(c) => Payload::Custom(custom(v, &path(prefix, "custom"), c)?),
    })
}

fn remediation(v: &mut Violations, prefix: &str, r: pb::RemediationAudit) -> Option<Remediation> {
    let pb::RemediationAudit {
        signal_type,
        signal_name,
        severity,
        target,
        phase,
        message,
        started_at,
        completed_at,
        priority,
    } = r;
    let signal_type = required_id(v, path(prefix, "signal_type"), signal_type);
    let signal_name = required_id(v, path(prefix, "signal_name"), signal_name);
    let severity = enum_value(v, path(prefix, "severity"), severity, Severity::from_code);
    let target = resource(v, path(prefix, "target"), target);
    let phase = enum_value(v, path(prefix, "phase"), phase, Phase::from_code);
    let message = optional_free_text(v, path(prefix, "message"), message);
    let started_field = path(prefix, "started_at");
    let completed_field = path(prefix, "completed_at");
    let started_at = started_at.and_then(|ts| timestamp(v, &started_field, ts));
    let completed_at = completed_at.and_then(|ts| timestamp(v, &completed_field, ts));
    if let (Some(start), Some(end)) = (started_at, completed_at) {
        if start > end {
            v.add(completed_field, "must not be before started_at");
        }
    }
    let priority = optional_text(v, path(prefix, "priority"), priority, MAX_ID_CHARS);
    Some(Remediation {
        signal_type,
        signal_name,
        severity: severity?,
        target: target?,
        phase: phase?,
        message,
        started_at,
        completed_at,
        priority,
    })
}

fn ai_analysis(v: &mut Violations, prefix: &str, a: pb::AiAnalysisAudit) -> Option<AiAnalysis> {
    let pb::AiAnalysisAudit {
        root_cause,
        recommended_action,
        confidence,
        reasoning,
        model,
    } = a;
    let root_cause = required_free_text(v, path(prefix, "root_cause"), root_cause);
    let recommended_action = required_id(v, path(prefix, "recommended_action"), recommended_action);
    // proto3 cannot tell an unset double from 0.0, so "required" means "a number in range".
    if !(0.0..=1.0).contains(&confidence) {
        v.add(path(prefix, "confidence"), "must be within 0..=1");
    }
    let reasoning = optional_free_text(v, path(prefix, "reasoning"), reasoning);
    let model = optional_text(v, path(prefix, "model"), model, MAX_ID_CHARS);
    Some(AiAnalysis {
        root_cause,
        recommended_action,
        confidence,
        reasoning,
        model,
    })
}

fn workflow(v: &mut Violations, prefix: &str, w: pb::WorkflowAudit) -> Option<Workflow> {
    let pb::WorkflowAudit {
        workflow_id,
        step_name,
        status,
        duration: elapsed,
        error_message,
    } = w;
    let workflow_id = required_id(v, path(prefix, "workflow_id"), workflow_id);
    let step_name = required_id(v, path(prefix, "step_name"), step_name);
    let status = enum_value(v, path(prefix, "status"), status, ExecutionStatus::from_code);
    let elapsed = duration(v, path(prefix, "duration"), elapsed);
    let error_message = optional_free_text(v, path(prefix, "error_message"), error_message);
    Some(Workflow {
        workflow_id,
        step_name,
        status: status?,
        duration: elapsed,
        error_message,
    })
}

fn execution(v: &mut Violations, prefix: &str, e: pb::ExecutionAudit) -> Option<Execution> {
    let pb::ExecutionAudit {
        action_type,
        target,
        status,
        duration: elapsed,
        error_message,
    } = e;
    let action_type = required_id(v, path(prefix, "action_type"), action_type);
    let target = resource(v, path(prefix, "target"), target);
    let status = enum_value(v, path(prefix, "status"), status, ExecutionStatus::from_code);
    let elapsed = duration(v, path(prefix, "duration"), elapsed);
    let error_message = optional_free_text(v, path(prefix, "error_message"), error_message);
    Some(Execution {
        action_type,
        target: target?,
        status: status?,
        duration: elapsed,
        error_message,
    })
}

fn custom(v: &mut Violations, prefix: &str, c: pb::CustomAudit) -> Option<Custom> {
    let pb::CustomAudit {
        event_type,
        action,
        outcome,
        data,
        text,
    } = c;
    let event_type = required_text(v, path(prefix, "event_type"), event_type, 100);
    let action = optional_text(v, path(prefix, "action"), action, 50);
    let outcome = optional_text(v, path(prefix, "outcome"), outcome, 20);
    let data_field = path(prefix, "data");
    let data = data.and_then(|data| {
        let size = data.encoded_len();
        if size > MAX_CUSTOM_DATA_BYTES {
            v.add(
                &data_field,
                format!("must be at most {MAX_CUSTOM_DATA_BYTES} bytes serialized, got {size}"),
            );
            return None;
        }
        match struct_to_json(data, 1) {
            Ok(json) if holds_nul(&json) => {
                v.add(&data_field, NUL_MESSAGE);
                None
            }
            Ok(json) => Some(json),
            Err(()) => {
                v.add(
                    &data_field,
                    format!("must be nested at most {MAX_CUSTOM_DATA_DEPTH} levels deep"),
                );
                None
            }
        }
    });
    let text = optional_free_text(v, path(prefix, "text"), text);
    Some(Custom {
        event_type,
        action,
        outcome,
        data,
        text,
    })
}

fn holds_nul(json: &serde_json::Value) -> bool {
    match json {
        serde_json::Value::String(s) => s.contains('\0'),
        serde_json::Value::Array(items) => items.iter().any(holds_nul),
        serde_json::Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || holds_nul(v)),
        _ => false,
    }
}

/// google.protobuf.Struct → JSON, refusing nesting deeper than the contract allows.
fn struct_to_json(data: prost_types::Struct, depth: usize) -> Result<serde_json::Value, ()> {
    if depth > MAX_CUSTOM_DATA_DEPTH {
        return Err(());
    }
    data.fields
        .into_iter()
        .map(|(key, value)| Ok((key, value_to_json(value, depth)?)))
        .collect::<Result<serde_json::Map<_, _>, ()>>()
        .map(serde_json::Value::Object)
}

fn value_to_json(value: prost_types::Value, depth: usize) -> Result<serde_json::Value, ()> {
    use prost_types::value::Kind;
    Ok(match value.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::BoolValue(b)) => serde_json::Value::Bool(b),
        // JSON has no NaN or infinity; they become null, as protobuf's own JSON mapping refuses them.
        Some(Kind::NumberValue(n)) => serde_json::Number::from_f64(n).map_or(serde_json::Value::Null, Into::into),
        Some(Kind::StringValue(s)) => serde_json::Value::String(s),
        Some(Kind::StructValue(s)) => struct_to_json(s, depth + 1)?,
        Some(Kind::ListValue(list)) => {
            if depth + 1 > MAX_CUSTOM_DATA_DEPTH {
                return Err(());
            }
            serde_json::Value::Array(
                list.values
                    .into_iter()
                    .map(|item| value_to_json(item, depth + 1))
                    .collect::<Result<_, _>>()?,
            )
        }
    })
}

/// IncidentFilter, shared by ListIncidents, GetActionStats and (later) search.
pub fn incident_filter(v: &mut Violations, prefix: &str, filter: Option<pb::IncidentFilter>) -> IncidentFilter {
    let Some(pb::IncidentFilter {
        alert_name,
        severities,
        action_type,
        namespace,
        cluster,
        phases,
        since,
        until,
        labels,
    }) = filter
    else {
        return IncidentFilter::default();
    };
    let mut text = |field: &str, value: String| optional_text(v, path(prefix, field), value, MAX_ID_CHARS);
    let (alert_name, action_type, namespace, cluster) = (
        text("alert_name", alert_name),
        text("action_type", action_type),
        text("namespace", namespace),
        text("cluster", cluster),
    );
    let severities = severities
        .into_iter()
        .enumerate()
        .filter_map(|(i, code)| {
            enum_value(
                v,
                format!("{}[{i}]", path(prefix, "severities")),
                code,
                Severity::from_code,
            )
        })
        .collect();
    let phases = phases
        .into_iter()
        .enumerate()
        .filter_map(|(i, code)| enum_value(v, format!("{}[{i}]", path(prefix, "phases")), code, Phase::from_code))
        .collect();
    let since = since.and_then(|t| timestamp(v, &path(prefix, "since"), t));
    let until = until.and_then(|t| timestamp(v, &path(prefix, "until"), t));
    if let (Some(since), Some(until)) = (since, until) {
        if until <= since {
            v.add(path(prefix, "until"), "must be after since");
        }
    }
    let labels = label_map(v, &path(prefix, "labels"), labels);
    IncidentFilter {
        alert_name,
        severities,
        action_type,
        namespace,
        cluster,
        phases,
        since,
        until,
        labels,
    }
}

fn page_size(v: &mut Violations, field: &str, requested: i32) -> usize {
    domain::page_size(requested).unwrap_or_else(|| {
        v.add(field, "must not be negative (0 means the default of 50)");
        domain::DEFAULT_PAGE_SIZE
    })
}

pub struct ListIncidents {
    pub filter: IncidentFilter,
    pub order: IncidentOrder,
    pub page_size: usize,
    pub page_token: String,
}

pub fn list_incidents(request: pb::ListIncidentsRequest) -> Result<ListIncidents, Violations> {
    let pb::ListIncidentsRequest {
        filter,
        page_size: requested,
        page_token,
        order_by,
    } = request;
    let mut v = Violations::new();
    let filter = incident_filter(&mut v, "filter", filter);
    let page_size = page_size(&mut v, "page_size", requested);
    let order = IncidentOrder::parse(&order_by).unwrap_or_else(|| {
        v.add(
            "order_by",
            "must be one of \"last_event_at desc\" (default), \"last_event_at asc\", \"first_seen_at desc\", \"first_seen_at asc\"",
        );
        IncidentOrder::default()
    });
    v.into_result(|| ListIncidents {
        filter,
        order,
        page_size,
        page_token,
    })
}

fn uuid_field(v: &mut Violations, field: &str, value: &str) -> Option<Uuid> {
    let parsed = Uuid::try_parse(value.trim()).ok();
    if parsed.is_none() {
        v.add(field, "must be a UUID");
    }
    parsed
}

pub fn incident_key(request: pb::GetIncidentRequest) -> Result<IncidentKey, Violations> {
    use pb::get_incident_request::Key;
    let mut v = Violations::new();
    let key = match request.key {
        Some(Key::Id(id)) => uuid_field(&mut v, "id", &id).map(IncidentKey::Id),
        Some(Key::RemediationRequestId(rrid)) => Some(IncidentKey::RemediationRequestId(required_id(
            &mut v,
            "remediation_request_id".into(),
            rrid,
        ))),
        None => {
            v.add("key", "set id or remediation_request_id");
            None
        }
    };
    match key {
        Some(key) if v.is_empty() => Ok(key),
        _ => Err(v),
    }
}

pub struct ListAuditEvents {
    pub query: TimelineQuery,
    pub page_size: usize,
    pub page_token: String,
}

pub fn list_audit_events(request: pb::ListAuditEventsRequest) -> Result<ListAuditEvents, Violations> {
    use pb::list_audit_events_request::Scope;
    let pb::ListAuditEventsRequest {
        scope,
        kinds,
        page_size: requested,
        page_token,
    } = request;
    let mut v = Violations::new();
    let scope = match scope {
        Some(Scope::IncidentId(id)) => uuid_field(&mut v, "incident_id", &id).map(TimelineScope::Incident),
        Some(Scope::RemediationRequestId(rrid)) => Some(TimelineScope::RemediationRequest(required_id(
            &mut v,
            "remediation_request_id".into(),
            rrid,
        ))),
        Some(Scope::CorrelationId(id)) => Some(TimelineScope::Correlation(required_id(
            &mut v,
            "correlation_id".into(),
            id,
        ))),
        None => {
            v.add("scope", "set incident_id, remediation_request_id or correlation_id");
            None
        }
    };
    let mut kinds: Vec<AuditKind> = kinds
        .into_iter()
        .enumerate()
        .filter_map(|(i, code)| enum_value(&mut v, format!("kinds[{i}]"), code, AuditKind::from_code))
        .collect();
    // Canonical, so that the same kinds in another order continue the listing.
    kinds.sort_by_key(|k| k.code());
    kinds.dedup();
    let page_size = page_size(&mut v, "page_size", requested);
    match scope {
        Some(scope) if v.is_empty() => Ok(ListAuditEvents {
            query: TimelineQuery { scope, kinds },
            page_size,
            page_token,
        }),
        _ => Err(v),
    }
}

pub fn action_stats_filter(request: pb::GetActionStatsRequest) -> Result<IncidentFilter, Violations> {
    let mut v = Violations::new();
    let filter = incident_filter(&mut v, "filter", request.filter);
    v.into_result(|| filter)
}

/// Longest legal-hold reason.
pub const MAX_HOLD_REASON_CHARS: usize = 1000;

pub fn hold_request(correlation_id: String, reason: String) -> Result<HoldRequest, Violations> {
    let mut v = Violations::new();
    let correlation_id = required_id(&mut v, "correlation_id".into(), correlation_id);
    let reason = required_text(&mut v, "reason".into(), reason, MAX_HOLD_REASON_CHARS);
    v.into_result(|| HoldRequest { correlation_id, reason })
}

pub fn list_holds_page_size(requested: i32) -> Result<usize, Violations> {
    let mut v = Violations::new();
    let size = page_size(&mut v, "page_size", requested);
    v.into_result(|| size)
}

pub fn verify_chain_request(request: pb::VerifyAuditChainRequest) -> Result<String, Violations> {
    let mut v = Violations::new();
    let correlation_id = required_id(&mut v, "correlation_id".into(), request.correlation_id);
    v.into_result(|| correlation_id)
}

pub fn export_request(request: pb::ExportAuditEventsRequest) -> Result<ExportRequest, Violations> {
    let mut v = Violations::new();
    let filter = incident_filter(&mut v, "filter", request.filter);
    let correlation_id = optional_text(&mut v, "correlation_id".into(), request.correlation_id, MAX_ID_CHARS);
    v.into_result(|| ExportRequest {
        filter,
        correlation_id,
        redact_pii: request.redact_pii,
    })
}

pub fn search_request(request: pb::SearchSimilarRequest) -> Result<SearchRequest, Violations> {
    use pb::search_similar_request::Query;
    let pb::SearchSimilarRequest {
        query,
        top_k,
        min_similarity,
        filter,
        kinds,
        group_by_incident,
        mode,
        model,
    } = request;
    let mut v = Violations::new();
    let input = match query {
        Some(Query::Text(text)) => {
            let text = required_free_text(&mut v, "text".into(), text);
            Some(SearchInput::Text(text))
        }
        Some(Query::Vector(pb::Vector { values })) => {
            // The dimension is the searched model's, checked once it is known.
            if values.is_empty() {
                v.add("vector.values", "is required");
            } else if let Some(index) = values.iter().position(|x| !x.is_finite()) {
                v.add(format!("vector.values[{index}]"), "must be a finite number");
            } else if values.iter().all(|x| *x == 0.0) {
                v.add("vector.values", "must not be all zeros: a zero vector has no direction");
            }
            Some(SearchInput::Vector(values))
        }
        Some(Query::EventId(id)) => uuid_field(&mut v, "event_id", &id).map(SearchInput::Event),
        None => {
            v.add("query", "set text, vector or event_id");
            None
        }
    };
    let top_k = match top_k {
        0 => DEFAULT_TOP_K,
        k if (1..=MAX_TOP_K as i32).contains(&k) => k as usize,
        _ => {
            v.add(
                "top_k",
                format!("must be within 1..={MAX_TOP_K} (0 means {DEFAULT_TOP_K})"),
            );
            DEFAULT_TOP_K
        }
    };
    if let Some(min) = min_similarity {
        if !(-1.0..=1.0).contains(&min) {
            v.add("min_similarity", "must be a cosine similarity within [-1, 1]");
        }
    }
    let filter = incident_filter(&mut v, "filter", filter);
    let mut kinds: Vec<AuditKind> = kinds
        .into_iter()
        .enumerate()
        .filter_map(|(i, code)| enum_value(&mut v, format!("kinds[{i}]"), code, AuditKind::from_code))
        .collect();
    kinds.sort_by_key(|k| k.code());
    kinds.dedup();
    let mode = match mode {
        0 | 1 => SearchMode::Vector,
        2 => SearchMode::Hybrid,
        other => {
            v.add("mode", format!("unknown value {other}"));
            SearchMode::Vector
        }
    };
    let model = optional_text(&mut v, "model".into(), model, MAX_ID_CHARS);
    match input {
        Some(input) if v.is_empty() => Ok(SearchRequest {
            input,
            top_k,
            min_similarity,
            filter,
            kinds,
            group_by_incident,
            mode,
            model,
        }),
        _ => Err(v),
    }
}

pub struct StartJob {
    pub spec: JobSpec,
    pub request_id: Option<String>,
}

pub fn start_job(request: pb::StartJobRequest) -> Result<StartJob, Violations> {
    use pb::start_job_request::Spec;
    let pb::StartJobRequest { spec, request_id } = request;
    let mut v = Violations::new();
    let request_id = optional_text(&mut v, "request_id".into(), request_id, 255);
    let spec = match spec {
        None => {
            v.add(
                "spec",
                "is required: one of backfill_embeddings, reembed, purge, reindex",
            );
            None
        }
        Some(Spec::BackfillEmbeddings(pb::BackfillEmbeddingsJob {})) => Some(JobSpec::BackfillEmbeddings),
        Some(Spec::Reembed(pb::ReembedJob { model })) => Some(JobSpec::Reembed {
            model: required_text(&mut v, "reembed.model".into(), model, 255),
        }),
        Some(Spec::Reindex(pb::ReindexJob { model })) => Some(JobSpec::Reindex {
            model: required_text(&mut v, "reindex.model".into(), model, 255),
        }),
        Some(Spec::Purge(pb::PurgeJob { older_than })) => match older_than {
            None => {
                v.add("purge.older_than", "is required");
                None
            }
            Some(at) => timestamp(&mut v, "purge.older_than", at).and_then(|older_than| {
                if older_than > Utc::now() {
                    v.add("purge.older_than", "must not be in the future");
                    None
                } else {
                    Some(JobSpec::Purge { older_than })
                }
            }),
        },
    };
    v.into_result(|| StartJob {
        spec: spec.expect("a spec when there are no violations"),
        request_id,
    })
}

pub fn job_id(value: &str) -> Result<Uuid, Violations> {
    let mut v = Violations::new();
    let id = uuid_field(&mut v, "id", value);
    v.into_result(|| id.expect("an id when there are no violations"))
}

pub struct ListJobs {
    pub filter: JobListFilter,
    pub page_size: usize,
    pub after: Option<JobCursor>,
}

pub fn list_jobs(request: pb::ListJobsRequest) -> Result<ListJobs, Violations> {
    let pb::ListJobsRequest {
        states,
        r#type,
        page_size: requested,
        page_token,
    } = request;
    let mut v = Violations::new();
    let states = states
        .into_iter()
        .enumerate()
        .filter_map(|(i, code)| enum_value(&mut v, format!("states[{i}]"), code, job_state))
        .collect();
    let type_name = optional_text(&mut v, "type".into(), r#type, 64);
    let page_size = page_size(&mut v, "page_size", requested);
    let after = if page_token.is_empty() {
        None
    } else {
        let cursor = job_page_token::parse(&page_token);
        if cursor.is_none() {
            v.add("page_token", "is not a page token of ListJobs");
        }
        cursor
    };
    v.into_result(|| ListJobs {
        filter: JobListFilter { states, type_name },
        page_size,
        after,
    })
}

fn job_state(code: i32) -> Option<JobState> {
    match pb::JobState::try_from(code).ok()? {
        pb::JobState::Unspecified => None,
        pb::JobState::Pending => Some(JobState::Pending),
        pb::JobState::Running => Some(JobState::Running),
        pb::JobState::Succeeded => Some(JobState::Succeeded),
        pb::JobState::Failed => Some(JobState::Failed),
        pb::JobState::Cancelled => Some(JobState::Cancelled),
    }
}

/// ListJobs page tokens: where the previous page ended. They carry no
/// authority (any caller may list jobs), so they are encoded, not signed.
pub mod job_page_token {
    use base64::Engine;
    use chrono::{DateTime, Utc};
    use uuid::Uuid;

    use crate::jobs::JobCursor;

    const ENGINE: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

    pub fn render(cursor: JobCursor) -> String {
        ENGINE.encode(format!("jobs:{}:{}", cursor.created_at.timestamp_micros(), cursor.id))
    }

    pub fn parse(token: &str) -> Option<JobCursor> {
        let text = String::from_utf8(ENGINE.decode(token).ok()?).ok()?;
        let mut parts = text.splitn(3, ':');
        if parts.next()? != "jobs" {
            return None;
        }
        let created_at: DateTime<Utc> = DateTime::from_timestamp_micros(parts.next()?.parse().ok()?)?;
        let id = Uuid::try_parse(parts.next()?).ok()?;
        Some(JobCursor { created_at, id })
    }
}
