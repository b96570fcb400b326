//! `/metrics` on the HTTP port: the counters a dashboard reads move with the
//! calls that should move them. The registry is per process and tests run in
//! parallel, so assertions compare before/after and allow for others' calls.
use datastorage::proto::v1 as pb;
use tonic::Code;

use crate::helpers::*;

pub async fn scrape(app: &TestApp) -> String {
    let response = reqwest::get(format!("http://127.0.0.1:{}/metrics", app.http_port))
        .await
        .expect("/metrics answers");
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    response.text().await.unwrap()
}

/// The sum of every sample of `name` whose labels include all of `labels`.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, label_text) = match series.split_once('{') {
                Some((metric, rest)) => (metric, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let matches = metric == name
                && labels
                    .iter()
                    .all(|(key, wanted)| label_text.contains(&format!("{key}=\"{wanted}\"")));
            matches.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

#[tokio::test]
async fn counters_and_histograms_move_with_the_calls() {
    let app = spawn_app().await;
    let mut incidents = app.incident_query_client().await;
    let mut audit = app.audit_client().await;
    // One call first, so every series below exists before the baseline.
    let _ = incidents
        .get_incident(pb::GetIncidentRequest {
            key: Some(pb::get_incident_request::Key::Id(uuid::Uuid::new_v4().to_string())),
        })
        .await;
    let before = scrape(&app).await;

    for _ in 0..3 {
        let status = incidents
            .get_incident(pb::GetIncidentRequest {
                key: Some(pb::get_incident_request::Key::Id(uuid::Uuid::new_v4().to_string())),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::NotFound);
    }
    let unique = uuid::Uuid::new_v4().simple().to_string();
    for attempt in 0..2 {
        let mut event = remediation_event(&format!("rr-metrics-{unique}-{attempt}"));
        if let Some(pb::audit_event::Payload::Remediation(remediation)) = &mut event.payload {
            // The same text twice: a model call, then an in-process cache hit.
            remediation.message = format!("metrics test {unique}");
        }
        audit.write_audit(write(event)).await.expect("written");
    }
    let after = scrape(&app).await;

    let get_incident = [
        ("grpc_service", "datastorage.v1.IncidentQuery"),
        ("grpc_method", "GetIncident"),
    ];
    let moved = |name: &str, labels: &[(&str, &str)]| sample(&after, name, labels) - sample(&before, name, labels);
    assert!(moved("grpc_server_started_total", &get_incident) >= 3.0);
    let not_found = [
        get_incident[0],
        get_incident[1],
        ("grpc_code", "NotFound"),
        ("grpc_type", "unary"),
    ];
    assert!(moved("grpc_server_handled_total", &not_found) >= 3.0, "{after}");
    assert!(moved("grpc_server_handling_seconds_count", &get_incident) >= 3.0);
    assert!(sample(&after, "grpc_server_handling_seconds_bucket", &[("le", "+Inf")]) > 0.0);
    let write_ok = [("grpc_method", "WriteAudit"), ("grpc_code", "OK")];
    assert!(moved("grpc_server_handled_total", &write_ok) >= 2.0);
    assert!(moved("datastorage_events_written_total", &[("kind", "remediation")]) >= 2.0);
    assert!(
        moved(
            "datastorage_embedding_cache_requests_total",
            &[("tier", "l1"), ("result", "hit")]
        ) >= 1.0
    );
    assert!(
        moved(
            "datastorage_embedding_cache_requests_total",
            &[("tier", "l1"), ("result", "miss")]
        ) >= 1.0
    );
    assert!(moved("datastorage_embedding_generation_seconds_count", &[]) >= 1.0);
    assert!(moved("datastorage_embedding_batch_size_count", &[]) >= 1.0);
    for series in [
        "datastorage_db_pool_connections",
        "datastorage_embeddings_pending",
        "datastorage_jobs",
    ] {
        assert!(
            after.contains(&format!("# TYPE {series} gauge")),
            "{series} is exported:\n{after}"
        );
    }
}

#[tokio::test]
async fn rate_limit_refusals_are_counted_per_scope() {
    let app = spawn_app_with(
        |settings| {
            settings.rate_limit.enabled = true;
            settings.rate_limit.requests_per_second = 1;
            settings.rate_limit.burst = 1;
        },
        local_model(),
    )
    .await;
    let mut incidents = app.incident_query_client().await;
    let _ = incidents.list_incidents(pb::ListIncidentsRequest::default()).await;
    let refused = incidents
        .list_incidents(pb::ListIncidentsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    let text = scrape(&app).await;
    assert!(sample(&text, "datastorage_rate_limited_total", &[("scope", "incidents:read")]) >= 1.0);
    assert!(
        sample(
            &text,
            "grpc_server_handled_total",
            &[("grpc_method", "ListIncidents"), ("grpc_code", "ResourceExhausted")]
        ) >= 1.0
    );
}

/// Polls `/readyz` until it answers `status`; returns the body then.
async fn readyz_until(app: &TestApp, status: u16) -> String {
    for _ in 0..100 {
        let response = reqwest::get(format!("http://127.0.0.1:{}/readyz", app.http_port))
            .await
            .unwrap();
        if response.status() == status {
            return response.text().await.unwrap();
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("/readyz never answered {status}");
}

#[tokio::test]
async fn readyz_says_ready_once_the_schema_is_current() {
    let app = spawn_app().await;
    assert_eq!(readyz_until(&app, 200).await, "ready\n");

    // A migration this build knows but the database lacks: not ready.
    sqlx::query("DELETE FROM _sqlx_migrations WHERE version = (SELECT max(version) FROM _sqlx_migrations)")
        .execute(&app.db)
        .await
        .unwrap();
    assert_eq!(readyz_until(&app, 503).await, "database migrations pending\n");
}
