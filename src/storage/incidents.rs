//! The incident projection, kept up to date inside the write transaction.
use std::collections::HashMap;

use chrono::{DateTime, Utc};
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

/// One round of incident updates: at most one event per incident, one
/// array per column.
#[derive(Default)]
struct IncidentRound {
    incident_id: Vec<Uuid>,
    remediation_request_id: Vec<String>,
    correlation_id: Vec<String>,
    namespace: Vec<String>,
    cluster: Vec<Option<String>>,
    labels: Vec<serde_json::Value>,
    event_id: Vec<Uuid>,
    occurred_at: Vec<DateTime<Utc>>,
    alert_name: Vec<Option<String>>,
    severity: Vec<Option<i16>>,
    signal_type: Vec<Option<String>>,
    target_kind: Vec<Option<String>>,
    target_name: Vec<Option<String>>,
    target_namespace: Vec<Option<String>>,
    phase: Vec<Option<i16>>,
    resolved_at: Vec<Option<DateTime<Utc>>>,
    is_remediation: Vec<bool>,
    root_cause: Vec<Option<String>>,
    action_type: Vec<Option<String>>,
    execution_status: Vec<Option<i16>>,
}

impl IncidentRound {
    fn push(&mut self, incident_id: Uuid, event_id: Uuid, event: &AuditEvent) {
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
        let owned = |value: Option<&str>| value.map(str::to_owned);
        self.incident_id.push(incident_id);
        self.remediation_request_id.push(event.remediation_request_id.clone());
        self.correlation_id.push(event.correlation_id.clone());
        self.namespace.push(event.namespace.clone());
        self.cluster.push(event.cluster.clone());
        self.labels
            .push(serde_json::to_value(&event.labels).expect("labels serialise"));
        self.event_id.push(event_id);
        self.occurred_at.push(event.occurred_at);
        self.alert_name.push(owned(remediation.alert_name));
        self.severity.push(remediation.severity);
        self.signal_type.push(owned(remediation.signal_type));
        self.target_kind.push(owned(remediation.target_kind));
        self.target_name.push(owned(remediation.target_name));
        self.target_namespace.push(owned(remediation.target_namespace));
        self.phase.push(remediation.phase);
        self.resolved_at.push(remediation.resolved_at);
        self.is_remediation.push(is_remediation);
        self.root_cause.push(owned(root_cause));
        self.action_type.push(owned(action_type));
        self.execution_status.push(execution_status);
    }
}

/// Folds events into their incidents. Every fact carries the stamp
/// (occurred_at, event id) of the event that set it and is replaced only by a
/// newer one, so the result does not depend on arrival order.
///
/// One statement per round: round k holds the k-th event (in the given
/// order) of every incident, because one INSERT ... ON CONFLICT may update a
/// row only once. A batch of distinct incidents is one statement.
pub(super) async fn apply_events(
    tx: &mut Transaction<'_, Postgres>,
    events: &[(Uuid, Uuid, &AuditEvent)],
) -> Result<(), sqlx::Error> {
    let mut rounds: Vec<IncidentRound> = Vec::new();
    let mut seen: HashMap<Uuid, usize> = HashMap::new();
    for &(incident_id, event_id, event) in events {
        let round = seen.entry(incident_id).or_default();
        if *round == rounds.len() {
            rounds.push(IncidentRound::default());
        }
        rounds[*round].push(incident_id, event_id, event);
        *round += 1;
    }
    for round in rounds {
        // Each group's stamp column is set only when the event carries that
        // group's facts.
        sqlx::query(
            r#"
INSERT INTO incidents AS i (
    id, remediation_request_id, correlation_id, namespace, cluster, cluster_stamp, first_stamp, label_facts,
    first_seen_at, last_event_at, event_count,
    alert_name, severity, signal_type, target_kind, target_name, target_namespace, phase, resolved_at, remediation_stamp,
    root_cause, analysis_stamp, action_type, execution_status, execution_stamp)
SELECT t.id, t.rrid, t.correlation_id, t.namespace, t.cluster, CASE WHEN t.cluster IS NOT NULL THEN s.stamp END,
       s.stamp, incident_label_facts(t.labels, s.stamp),
       t.occurred_at, t.occurred_at, 1,
       t.alert_name, t.severity, t.signal_type, t.target_kind, t.target_name, t.target_namespace, t.phase,
       t.resolved_at, CASE WHEN t.is_remediation THEN s.stamp END,
       t.root_cause, CASE WHEN t.root_cause IS NOT NULL THEN s.stamp END,
       t.action_type, t.execution_status, CASE WHEN t.action_type IS NOT NULL THEN s.stamp END
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::jsonb[], $7::uuid[],
            $8::timestamptz[], $9::text[], $10::smallint[], $11::text[], $12::text[], $13::text[], $14::text[],
            $15::smallint[], $16::timestamptz[], $17::boolean[], $18::text[], $19::text[], $20::smallint[])
     AS t(id, rrid, correlation_id, namespace, cluster, labels, event_id, occurred_at, alert_name, severity,
          signal_type, target_kind, target_name, target_namespace, phase, resolved_at, is_remediation,
          root_cause, action_type, execution_status)
CROSS JOIN LATERAL (SELECT ROW(t.occurred_at, t.event_id)::fact_stamp AS stamp) AS s
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
        .bind(&round.incident_id)
        .bind(&round.remediation_request_id)
        .bind(&round.correlation_id)
        .bind(&round.namespace)
        .bind(&round.cluster)
        .bind(&round.labels)
        .bind(&round.event_id)
        .bind(&round.occurred_at)
        .bind(&round.alert_name)
        .bind(&round.severity)
        .bind(&round.signal_type)
        .bind(&round.target_kind)
        .bind(&round.target_name)
        .bind(&round.target_namespace)
        .bind(&round.phase)
        .bind(&round.resolved_at)
        .bind(&round.is_remediation)
        .bind(&round.root_cause)
        .bind(&round.action_type)
        .bind(&round.execution_status)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}
