//! The incident projection, kept up to date inside the write transaction.
use chrono::{DateTime, Utc};
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use crate::domain::{AuditEvent, Payload};

/// The incident columns only a remediation event sets.
#[derive(Default)]
struct RemediationFacts<'a> {
    alert_name: Option<&'a str>,
    severity: Option<i16>,
    signal_type: Option<&'a str>,
    target_kind: Option<&'a str>,
    target_name: Option<&'a str>,
    target_namespace: Option<&'a str>,
}

/// Folds one event into its incident. Each group of facts (remediation,
/// analysis, execution) is replaced only by an event with a newer
/// occurred_at, so the result does not depend on arrival order.
pub(super) async fn apply_event(
    tx: &mut Transaction<'_, Postgres>,
    incident_id: Uuid,
    event: &AuditEvent,
) -> Result<(), sqlx::Error> {
    let at = event.occurred_at;
    let mut remediation = RemediationFacts::default();
    let (mut phase, mut resolved_at, mut remediation_at) = (None, None::<DateTime<Utc>>, None);
    let (mut root_cause, mut analysis_at) = (None, None);
    let (mut action_type, mut execution_status, mut execution_at) = (None, None, None);
    match &event.payload {
        Payload::Remediation(r) => {
            remediation = RemediationFacts {
                alert_name: Some(&r.signal_name),
                severity: Some(r.severity.code()),
                signal_type: Some(&r.signal_type),
                target_kind: Some(&r.target.kind),
                target_name: Some(&r.target.name),
                target_namespace: r.target.namespace.as_deref(),
            };
            phase = Some(r.phase.code());
            resolved_at = matches!(r.phase, crate::domain::Phase::Completed | crate::domain::Phase::Failed)
                .then(|| r.completed_at.unwrap_or(at));
            remediation_at = Some(at);
        }
        Payload::AiAnalysis(a) => {
            root_cause = Some(a.root_cause.as_str());
            analysis_at = Some(at);
        }
        Payload::Execution(e) => {
            action_type = Some(e.action_type.as_str());
            execution_status = Some(e.status.code());
            execution_at = Some(at);
        }
        Payload::Workflow(_) | Payload::Custom(_) => {}
    }
    let labels = serde_json::to_value(&event.labels).expect("labels serialise");
    sqlx::query(
        r#"
INSERT INTO incidents AS i (
    id, remediation_request_id, correlation_id, namespace, cluster, labels, first_seen_at, last_event_at, event_count,
    alert_name, severity, signal_type, target_kind, target_name, target_namespace, phase, resolved_at, remediation_at,
    root_cause, analysis_at, action_type, execution_status, execution_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $7, 1, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21)
ON CONFLICT (remediation_request_id) DO UPDATE SET
    correlation_id = CASE WHEN EXCLUDED.first_seen_at < i.first_seen_at THEN EXCLUDED.correlation_id ELSE i.correlation_id END,
    namespace = CASE WHEN EXCLUDED.first_seen_at < i.first_seen_at THEN EXCLUDED.namespace ELSE i.namespace END,
    cluster = COALESCE(i.cluster, EXCLUDED.cluster),
    labels = CASE WHEN EXCLUDED.last_event_at >= i.last_event_at THEN i.labels || EXCLUDED.labels
                  ELSE EXCLUDED.labels || i.labels END,
    first_seen_at = LEAST(i.first_seen_at, EXCLUDED.first_seen_at),
    last_event_at = GREATEST(i.last_event_at, EXCLUDED.last_event_at),
    event_count = i.event_count + 1,
    alert_name = CASE WHEN incident_fact_is_newer(EXCLUDED.remediation_at, i.remediation_at) THEN EXCLUDED.alert_name ELSE i.alert_name END,
    severity = CASE WHEN incident_fact_is_newer(EXCLUDED.remediation_at, i.remediation_at) THEN EXCLUDED.severity ELSE i.severity END,
    signal_type = CASE WHEN incident_fact_is_newer(EXCLUDED.remediation_at, i.remediation_at) THEN EXCLUDED.signal_type ELSE i.signal_type END,
    target_kind = CASE WHEN incident_fact_is_newer(EXCLUDED.remediation_at, i.remediation_at) THEN EXCLUDED.target_kind ELSE i.target_kind END,
    target_name = CASE WHEN incident_fact_is_newer(EXCLUDED.remediation_at, i.remediation_at) THEN EXCLUDED.target_name ELSE i.target_name END,
    target_namespace = CASE WHEN incident_fact_is_newer(EXCLUDED.remediation_at, i.remediation_at) THEN EXCLUDED.target_namespace ELSE i.target_namespace END,
    phase = CASE WHEN incident_fact_is_newer(EXCLUDED.remediation_at, i.remediation_at) THEN EXCLUDED.phase ELSE i.phase END,
    resolved_at = CASE WHEN incident_fact_is_newer(EXCLUDED.remediation_at, i.remediation_at) THEN EXCLUDED.resolved_at ELSE i.resolved_at END,
    remediation_at = CASE WHEN incident_fact_is_newer(EXCLUDED.remediation_at, i.remediation_at) THEN EXCLUDED.remediation_at ELSE i.remediation_at END,
    root_cause = CASE WHEN incident_fact_is_newer(EXCLUDED.analysis_at, i.analysis_at) THEN EXCLUDED.root_cause ELSE i.root_cause END,
    analysis_at = CASE WHEN incident_fact_is_newer(EXCLUDED.analysis_at, i.analysis_at) THEN EXCLUDED.analysis_at ELSE i.analysis_at END,
    action_type = CASE WHEN incident_fact_is_newer(EXCLUDED.execution_at, i.execution_at) THEN EXCLUDED.action_type ELSE i.action_type END,
    execution_status = CASE WHEN incident_fact_is_newer(EXCLUDED.execution_at, i.execution_at) THEN EXCLUDED.execution_status ELSE i.execution_status END,
    execution_at = CASE WHEN incident_fact_is_newer(EXCLUDED.execution_at, i.execution_at) THEN EXCLUDED.execution_at ELSE i.execution_at END
"#,
    )
    .bind(incident_id)
    .bind(&event.remediation_request_id)
    .bind(&event.correlation_id)
    .bind(&event.namespace)
    .bind(&event.cluster)
    .bind(labels)
    .bind(at)
    .bind(remediation.alert_name)
    .bind(remediation.severity)
    .bind(remediation.signal_type)
    .bind(remediation.target_kind)
    .bind(remediation.target_name)
    .bind(remediation.target_namespace)
    .bind(phase)
    .bind(resolved_at)
    .bind(remediation_at)
    .bind(root_cause)
    .bind(analysis_at)
    .bind(action_type)
    .bind(execution_status)
    .bind(execution_at)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
