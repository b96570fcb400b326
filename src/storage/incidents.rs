//! The incident projection, kept up to date inside the write transaction.
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use crate::domain::{AuditEvent, Payload, Phase};

/// The incident columns only a remediation event sets.
#[derive(Default)]
struct RemediationFacts<'a> {
    alert_name: Option<&'a str>,
    severity: Option<i16>,
    signal_type: Option<&'a str>,
    target_kind: Option<&'a str>,
    target_name: Option<&'a str>,
    target_namespace: Option<&'a str>,
    phase: Option<i16>,
    resolved_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// Folds one event into its incident. Every fact carries the stamp
/// (occurred_at, event id) of the event that set it and is replaced only by a
/// newer one, so the result does not depend on arrival order.
pub(super) async fn apply_event(
    tx: &mut Transaction<'_, Postgres>,
    incident_id: Uuid,
    event_id: Uuid,
    event: &AuditEvent,
) -> Result<(), sqlx::Error> {
    let mut remediation = RemediationFacts::default();
    let (mut is_remediation, mut root_cause, mut action_type, mut execution_status) = (false, None, None, None);
    match &event.payload {
        Payload::Remediation(r) => {
            is_remediation = true;
            remediation = RemediationFacts {
                alert_name: Some(&r.signal_name),
                severity: Some(r.severity.code()),
                signal_type: Some(&r.signal_type),
                target_kind: Some(&r.target.kind),
                target_name: Some(&r.target.name),
                target_namespace: r.target.namespace.as_deref(),
                phase: Some(r.phase.code()),
                resolved_at: matches!(r.phase, Phase::Completed | Phase::Failed)
                    .then(|| r.completed_at.unwrap_or(event.occurred_at)),
            };
        }
        Payload::AiAnalysis(a) => root_cause = Some(a.root_cause.as_str()),
        Payload::Execution(e) => {
            action_type = Some(e.action_type.as_str());
            execution_status = Some(e.status.code());
        }
        Payload::Workflow(_) | Payload::Custom(_) => {}
    }
    let labels = serde_json::to_value(&event.labels).expect("labels serialise");
    // $7 is this event's stamp; each group's stamp column is set only when the
    // event carries that group's facts.
    sqlx::query(
        r#"
INSERT INTO incidents AS i (
    id, remediation_request_id, correlation_id, namespace, cluster, cluster_stamp, first_stamp, label_facts,
    first_seen_at, last_event_at, event_count,
    alert_name, severity, signal_type, target_kind, target_name, target_namespace, phase, resolved_at, remediation_stamp,
    root_cause, analysis_stamp, action_type, execution_status, execution_stamp)
SELECT $1, $2, $3, $4, $5, CASE WHEN $5::text IS NOT NULL THEN s.stamp END, s.stamp, incident_label_facts($6, s.stamp),
       $8, $8, 1,
       $9, $10, $11, $12, $13, $14, $15, $16, CASE WHEN $17 THEN s.stamp END,
       $18, CASE WHEN $18::text IS NOT NULL THEN s.stamp END,
       $19, $20, CASE WHEN $19::text IS NOT NULL THEN s.stamp END
FROM (SELECT ROW($8::timestamptz, $7::uuid)::fact_stamp AS stamp) AS s
ON CONFLICT (remediation_request_id) DO UPDATE SET
    correlation_id = CASE WHEN EXCLUDED.first_stamp < i.first_stamp THEN EXCLUDED.correlation_id ELSE i.correlation_id END,
    namespace = CASE WHEN EXCLUDED.first_stamp < i.first_stamp THEN EXCLUDED.namespace ELSE i.namespace END,
    first_stamp = LEAST(i.first_stamp, EXCLUDED.first_stamp),
    cluster = CASE WHEN EXCLUDED.cluster_stamp < i.cluster_stamp OR i.cluster_stamp IS NULL
                   THEN coalesce(EXCLUDED.cluster, i.cluster) ELSE i.cluster END,
    cluster_stamp = LEAST(i.cluster_stamp, EXCLUDED.cluster_stamp),
    label_facts = merge_incident_label_facts(i.label_facts, EXCLUDED.label_facts),
    first_seen_at = LEAST(i.first_seen_at, EXCLUDED.first_seen_at),
    last_event_at = GREATEST(i.last_event_at, EXCLUDED.last_event_at),
    event_count = i.event_count + 1,
    alert_name = CASE WHEN incident_fact_is_newer(EXCLUDED.remediation_stamp, i.remediation_stamp) THEN EXCLUDED.alert_name ELSE i.alert_name END,
    severity = CASE WHEN incident_fact_is_newer(EXCLUDED.remediation_stamp, i.remediation_stamp) THEN EXCLUDED.severity ELSE i.severity END,
    signal_type = CASE WHEN incident_fact_is_newer(EXCLUDED.remediation_stamp, i.remediation_stamp) THEN EXCLUDED.signal_type ELSE i.signal_type END,
    target_kind = CASE WHEN incident_fact_is_newer(EXCLUDED.remediation_stamp, i.remediation_stamp) THEN EXCLUDED.target_kind ELSE i.target_kind END,
    target_name = CASE WHEN incident_fact_is_newer(EXCLUDED.remediation_stamp, i.remediation_stamp) THEN EXCLUDED.target_name ELSE i.target_name END,
    target_namespace = CASE WHEN incident_fact_is_newer(EXCLUDED.remediation_stamp, i.remediation_stamp) THEN EXCLUDED.target_namespace ELSE i.target_namespace END,
    phase = CASE WHEN incident_fact_is_newer(EXCLUDED.remediation_stamp, i.remediation_stamp) THEN EXCLUDED.phase ELSE i.phase END,
    resolved_at = CASE WHEN incident_fact_is_newer(EXCLUDED.remediation_stamp, i.remediation_stamp) THEN EXCLUDED.resolved_at ELSE i.resolved_at END,
    remediation_stamp = GREATEST(i.remediation_stamp, EXCLUDED.remediation_stamp),
    root_cause = CASE WHEN incident_fact_is_newer(EXCLUDED.analysis_stamp, i.analysis_stamp) THEN EXCLUDED.root_cause ELSE i.root_cause END,
    analysis_stamp = GREATEST(i.analysis_stamp, EXCLUDED.analysis_stamp),
    action_type = CASE WHEN incident_fact_is_newer(EXCLUDED.execution_stamp, i.execution_stamp) THEN EXCLUDED.action_type ELSE i.action_type END,
    execution_status = CASE WHEN incident_fact_is_newer(EXCLUDED.execution_stamp, i.execution_stamp) THEN EXCLUDED.execution_status ELSE i.execution_status END,
    execution_stamp = GREATEST(i.execution_stamp, EXCLUDED.execution_stamp)
"#,
    )
    .bind(incident_id)
    .bind(&event.remediation_request_id)
    .bind(&event.correlation_id)
    .bind(&event.namespace)
    .bind(&event.cluster)
    .bind(labels)
    .bind(event_id)
    .bind(event.occurred_at)
    .bind(remediation.alert_name)
    .bind(remediation.severity)
    .bind(remediation.signal_type)
    .bind(remediation.target_kind)
    .bind(remediation.target_name)
    .bind(remediation.target_namespace)
    .bind(remediation.phase)
    .bind(remediation.resolved_at)
    .bind(is_remediation)
    .bind(root_cause)
    .bind(action_type)
    .bind(execution_status)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
