//! Every IncidentFilter field, alone and combined, under every order, must be
//! servable from an index: EXPLAIN with sequential scans priced out must not
//! fall back to one on incidents.
use std::collections::BTreeMap;

use chrono::{Duration, Utc};
use datastorage::{
    domain::{IncidentFilter, IncidentOrder, IncidentSortKey, Phase, Severity},
    storage::{Storage, MIGRATOR},
};
use sqlx::PgPool;

use crate::helpers::fresh_database;

async fn seeded_storage() -> Storage {
    let pool = PgPool::connect(&fresh_database().await).await.unwrap();
    MIGRATOR.run(&pool).await.unwrap();
    sqlx::query(
        "INSERT INTO incidents (id, remediation_request_id, correlation_id, namespace, first_stamp, cluster, \
         label_facts, first_seen_at, last_event_at, event_count, alert_name, severity, phase, action_type) \
         SELECT gen_random_uuid(), 'rr-' || n, 'c-' || n, 'ns-' || (n % 50), \
                ROW(now() - n * interval '1 minute', gen_random_uuid())::fact_stamp, 'cluster-' || (n % 3), \
                incident_label_facts(jsonb_build_object('team', 'team-' || (n % 20)), \
                                     ROW(now(), gen_random_uuid())::fact_stamp), \
                now() - n * interval '1 minute', now() - n * interval '30 seconds', 3, 'alert-' || (n % 100), \
                1 + n % 3, 1 + n % 4, 'action-' || (n % 10) \
         FROM generate_series(1, 5000) AS n",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE incidents").execute(&pool).await.unwrap();
    Storage::new(pool)
}

fn filters() -> Vec<(&'static str, IncidentFilter)> {
    let now = Utc::now();
    let alert = IncidentFilter {
        alert_name: Some("alert-7".into()),
        ..Default::default()
    };
    let namespace_severity = IncidentFilter {
        namespace: Some("ns-3".into()),
        severities: vec![Severity::Critical, Severity::Warning],
        ..Default::default()
    };
    let labels = IncidentFilter {
        labels: BTreeMap::from([("team".to_owned(), "team-4".to_owned())]),
        ..Default::default()
    };
    let time_range = IncidentFilter {
        since: Some(now - Duration::hours(2)),
        until: Some(now - Duration::hours(1)),
        ..Default::default()
    };
    let everything = IncidentFilter {
        alert_name: Some("alert-7".into()),
        severities: vec![Severity::Info],
        action_type: Some("action-7".into()),
        namespace: Some("ns-7".into()),
        cluster: Some("cluster-1".into()),
        phases: vec![Phase::Completed],
        since: Some(now - Duration::days(3)),
        until: Some(now),
        labels: BTreeMap::from([("team".to_owned(), "team-7".to_owned())]),
    };
    vec![
        ("no filter", IncidentFilter::default()),
        ("alert_name", alert),
        (
            "action_type",
            IncidentFilter {
                action_type: Some("action-1".into()),
                ..Default::default()
            },
        ),
        (
            "cluster",
            IncidentFilter {
                cluster: Some("cluster-2".into()),
                ..Default::default()
            },
        ),
        (
            "phases",
            IncidentFilter {
                phases: vec![Phase::Pending, Phase::Processing],
                ..Default::default()
            },
        ),
        ("namespace + severities", namespace_severity),
        ("labels", labels),
        ("time range", time_range),
        ("every field", everything),
    ]
}

#[tokio::test]
async fn every_filter_and_order_of_list_incidents_is_index_assisted() {
    let storage = seeded_storage().await;
    let orders = [
        (IncidentSortKey::LastEventAt, true),
        (IncidentSortKey::LastEventAt, false),
        (IncidentSortKey::FirstSeenAt, true),
        (IncidentSortKey::FirstSeenAt, false),
    ];
    let mut failures = Vec::new();
    for (name, filter) in filters() {
        for (key, descending) in orders {
            let order = IncidentOrder { key, descending };
            let plan = storage.explain_incident_listing(&filter, order, true).await.unwrap();
            if plan.contains("Seq Scan on incidents") {
                failures.push(format!("{name} / {order:?}:\n{plan}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "plans without an index:\n{}",
        failures.join("\n\n")
    );
}
