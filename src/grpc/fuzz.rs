//! Fuzz targets for the edge: protobuf decode → validation → domain types.
//!
//! Property-based (proptest) rather than cargo-fuzz: cargo-fuzz needs a
//! nightly toolchain, which this project's machines cannot install. The
//! inputs are random, not coverage-guided; each target runs PROPTEST_CASES
//! cases (256 under `cargo test`, far more under `make fuzz`). A failure is
//! shrunk to a minimal input and saved under `proptest-regressions/`, which
//! is committed, so every crash found stays a regression test.
use std::collections::HashMap;

use chrono::Utc;
use proptest::prelude::*;
use prost::Message;

use super::convert::{self, ValidationContext};
use crate::proto::v1 as pb;

fn context() -> ValidationContext {
    ValidationContext {
        now: Utc::now(),
        embedding_dimensions: 384,
    }
}

/// Strings as hostile callers send them: any Unicode (controls, NUL,
/// surrogates' neighbours), SQL/JSON/regex metacharacters, and lengths
/// around and past the limits.
fn hostile_string() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => ".{0,40}",
        4 => "[%_'\";\\\\*+?{}()|\\[\\]^$.-]{0,40}",
        1 => Just("' OR 1=1; DROP TABLE audit_events; --".to_owned()),
        1 => (0usize..5_000).prop_map(|n| "x".repeat(n)),
    ]
}

/// Floats including NaN, infinities and subnormals.
fn hostile_vector() -> impl Strategy<Value = Vec<f32>> {
    prop_oneof![
        prop::collection::vec(any::<f32>(), 0..400),
        prop::collection::vec(prop::num::f32::ANY, 384..=384),
        Just(vec![0.0; 384]),
    ]
}

fn hostile_timestamp() -> impl Strategy<Value = Option<prost_types::Timestamp>> {
    prop::option::of(
        (any::<i64>(), any::<i32>()).prop_map(|(seconds, nanos)| prost_types::Timestamp { seconds, nanos }),
    )
}

fn hostile_labels() -> impl Strategy<Value = HashMap<String, String>> {
    prop::collection::hash_map(".{0,20}", hostile_string(), 0..80)
}

fn hostile_event() -> impl Strategy<Value = pb::AuditEvent> {
    (
        (
            hostile_string(),
            hostile_string(),
            hostile_timestamp(),
            hostile_string(),
        ),
        (hostile_string(), hostile_labels(), hostile_string()),
        (
            hostile_string(),
            any::<i32>(),
            any::<i32>(),
            hostile_string(),
            hostile_timestamp(),
        ),
    )
        .prop_map(
            |(
                (correlation_id, remediation_request_id, occurred_at, namespace),
                (cluster, labels, parent_event_id),
                (signal_name, severity, phase, message, started_at),
            )| pb::AuditEvent {
                correlation_id,
                remediation_request_id,
                occurred_at,
                namespace,
                cluster,
                labels,
                parent_event_id,
                payload: Some(pb::audit_event::Payload::Remediation(pb::RemediationAudit {
                    signal_type: "prometheus-alert".into(),
                    signal_name,
                    severity,
                    target: None,
                    phase,
                    message,
                    started_at,
                    completed_at: None,
                    priority: String::new(),
                })),
            },
        )
}

fn hostile_filter() -> impl Strategy<Value = pb::IncidentFilter> {
    (
        (
            hostile_string(),
            prop::collection::vec(any::<i32>(), 0..5),
            hostile_string(),
        ),
        (
            hostile_string(),
            hostile_string(),
            prop::collection::vec(any::<i32>(), 0..5),
        ),
        (hostile_timestamp(), hostile_timestamp(), hostile_labels()),
    )
        .prop_map(
            |((alert_name, severities, action_type), (namespace, cluster, phases), (since, until, labels))| {
                pb::IncidentFilter {
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
            },
        )
}

/// A refusal must name at least one field, so the caller can fix it.
fn names_a_field<T>(result: Result<T, crate::domain::Violations>) -> Result<(), TestCaseError> {
    if let Err(violations) = result {
        prop_assert!(!violations.is_empty(), "a refusal without a field violation");
        for violation in violations.iter() {
            prop_assert!(!violation.field.is_empty(), "a violation without a field name");
        }
    }
    Ok(())
}

proptest! {
    /// Any bytes: decoding fails cleanly or yields a message that
    /// validation accepts or refuses with field violations; nothing panics.
    #[test]
    fn any_bytes_decode_and_validate_without_panicking(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
        let ctx = context();
        if let Ok(request) = pb::WriteAuditRequest::decode(bytes.as_slice()) {
            names_a_field(convert::write_request("", request, &ctx))?;
        }
        if let Ok(request) = pb::SearchSimilarRequest::decode(bytes.as_slice()) {
            names_a_field(convert::search_request(request))?;
        }
        if let Ok(request) = pb::ListIncidentsRequest::decode(bytes.as_slice()) {
            names_a_field(convert::list_incidents(request))?;
        }
        if let Ok(request) = pb::ListAuditEventsRequest::decode(bytes.as_slice()) {
            names_a_field(convert::list_audit_events(request))?;
        }
        if let Ok(request) = pb::GetActionStatsRequest::decode(bytes.as_slice()) {
            names_a_field(convert::action_stats_filter(request))?;
        }
    }

    /// Well-formed messages with hostile contents: accepted values keep the
    /// domain's invariants, refusals name the fields.
    #[test]
    fn hostile_writes_are_accepted_whole_or_refused_by_field(
        event in hostile_event(),
        request_id in hostile_string(),
        vector in prop::option::of(hostile_vector()),
    ) {
        let request = pb::WriteAuditRequest {
            event: Some(event),
            request_id,
            embedding: vector.map(|values| pb::Vector { values }),
        };
        let accepted = convert::write_request("", request.clone(), &context());
        if accepted.is_ok() {
            if let Some(values) = request.embedding.as_ref().map(|v| &v.values) {
                prop_assert!(values.iter().all(|x| x.is_finite()), "a non-finite vector was accepted");
                prop_assert_eq!(values.len(), 384);
            }
        }
        names_a_field(accepted)?;
    }

    #[test]
    fn hostile_searches_and_listings_are_accepted_or_refused_by_field(
        filter in hostile_filter(),
        text in hostile_string(),
        top_k in any::<i32>(),
        min_similarity in prop::option::of(any::<f32>()),
        page_size in any::<i32>(),
        order_by in hostile_string(),
    ) {
        names_a_field(convert::search_request(pb::SearchSimilarRequest {
            query: Some(pb::search_similar_request::Query::Text(text)),
            top_k,
            min_similarity,
            filter: Some(filter.clone()),
            ..Default::default()
        }))?;
        names_a_field(convert::list_incidents(pb::ListIncidentsRequest {
            filter: Some(filter),
            page_size,
            page_token: String::new(),
            order_by,
        }))?;
    }
}
