//! What keeps one caller or one slow dependency from taking the server down:
//! per-caller rate limits (local and shared through Redis), deadlines that
//! answer DEADLINE_EXCEEDED, load shedding, and TLS.
use std::time::{Duration, Instant};

use datastorage::{
    config::{RateSettings, Settings, TlsSettings},
    proto::v1::{self as pb, incident_query_client::IncidentQueryClient, job_status_client::JobStatusClient},
};
use sqlx::{Executor, PgConnection};
use tonic::{
    metadata::MetadataValue,
    transport::{Certificate, Channel, ClientTlsConfig},
    Code, Request, Status,
};
use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest};
use tonic_types::StatusExt;

use crate::{
    auth::fixture,
    helpers::*,
    job_store::redis_url,
    metrics::{sample, scrape},
};

fn limited(per_second: u32, burst: u32) -> impl FnOnce(&mut Settings) {
    move |settings| {
        settings.rate_limit.enabled = true;
        settings.rate_limit.requests_per_second = per_second;
        settings.rate_limit.burst = burst;
    }
}

async fn list_incidents(client: &mut IncidentQueryClient<Channel>) -> Result<(), Status> {
    client
        .list_incidents(pb::ListIncidentsRequest::default())
        .await
        .map(|_| ())
}

fn retry_delay(status: &Status) -> Duration {
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let retry = status.get_details_retry_info().expect("RetryInfo");
    retry.retry_delay.expect("a retry delay")
}

#[tokio::test]
async fn a_caller_over_its_rate_is_told_when_to_retry_and_then_served() {
    let app = spawn_app_with(limited(1, 3), local_model()).await;
    let mut incidents = app.incident_query_client().await;
    for call in 0..3 {
        list_incidents(&mut incidents)
            .await
            .unwrap_or_else(|s| panic!("call {call} is within the burst: {s:?}"));
    }
    let status = list_incidents(&mut incidents).await.unwrap_err();
    let delay = retry_delay(&status);
    assert!(delay > Duration::ZERO && delay <= Duration::from_secs(1), "{delay:?}");
    tokio::time::sleep(delay + Duration::from_millis(20)).await;
    list_incidents(&mut incidents)
        .await
        .expect("served again after the delay");
}

#[tokio::test]
async fn a_scope_can_have_its_own_rate() {
    let app = spawn_app_with(
        |settings| {
            limited(100, 100)(settings);
            settings.rate_limit.scopes.insert(
                "jobs:read".into(),
                RateSettings {
                    requests_per_second: 1,
                    burst: 1,
                },
            );
        },
        local_model(),
    )
    .await;
    let mut jobs = JobStatusClient::new(app.channel().await);
    let get = || pb::GetJobRequest {
        id: uuid::Uuid::new_v4().to_string(),
    };
    let first = jobs.get_job(get()).await.unwrap_err();
    assert_eq!(first.code(), Code::NotFound, "the first call passes the limit");
    retry_delay(&jobs.get_job(get()).await.unwrap_err());
    let mut incidents = app.incident_query_client().await;
    list_incidents(&mut incidents)
        .await
        .expect("incidents:read keeps the default rate");
}

#[tokio::test]
async fn a_shared_limit_holds_across_replicas() {
    let prefix = format!("ds-test-rl-{}", uuid::Uuid::new_v4().simple());
    let shared = |settings: &mut Settings| {
        limited(1, 2)(settings);
        settings.rate_limit.shared = true;
        settings.redis.url = Some(redis_url().into());
        settings.redis.key_prefix = prefix.clone();
    };
    let (first, second) = (
        spawn_app_with(shared, local_model()).await,
        spawn_app_with(shared, local_model()).await,
    );
    let mut on_first = first.incident_query_client().await;
    let mut on_second = second.incident_query_client().await;
    list_incidents(&mut on_first).await.expect("1 of the burst of 2");
    list_incidents(&mut on_second)
        .await
        .expect("2 of the burst of 2, on the other replica");
    retry_delay(&list_incidents(&mut on_first).await.unwrap_err());
    retry_delay(&list_incidents(&mut on_second).await.unwrap_err());
}

/// Holds an exclusive lock on the incidents table, so incident reads block.
async fn lock_incidents(app: &TestApp) -> PgConnection {
    let mut locker = app.db.acquire().await.unwrap().detach();
    locker.execute("BEGIN").await.unwrap();
    locker
        .execute("LOCK TABLE incidents IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    locker
}

#[tokio::test]
async fn a_call_past_its_deadline_is_deadline_exceeded_not_cancelled() {
    let app = spawn_app_with(|settings| settings.grpc.default_timeout_ms = 300, local_model()).await;
    let _locker = lock_incidents(&app).await;
    let mut incidents = app.incident_query_client().await;

    // The server's default bounds a call that names no deadline.
    let started = Instant::now();
    let status = list_incidents(&mut incidents).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(3));

    // A shorter deadline of the caller's wins. A tonic client enforces the
    // same deadline locally (answering itself CANCELLED), so the server's
    // answer is read from what it counted, not from this client's race.
    let deadline_exceeded = [("grpc_method", "ListIncidents"), ("grpc_code", "DeadlineExceeded")];
    let before = sample(&scrape(&app).await, "grpc_server_handled_total", &deadline_exceeded);
    let mut request = Request::new(pb::ListIncidentsRequest::default());
    request
        .metadata_mut()
        .insert("grpc-timeout", MetadataValue::from_static("100m"));
    let started = Instant::now();
    let status = incidents.list_incidents(request).await.unwrap_err();
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );
    let mut counted = 0.0;
    for _ in 0..100 {
        counted = sample(&scrape(&app).await, "grpc_server_handled_total", &deadline_exceeded) - before;
        if counted >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        counted >= 1.0,
        "the server answered the caller's deadline with DEADLINE_EXCEEDED"
    );
}

#[tokio::test]
async fn calls_beyond_the_concurrency_limit_are_shed_while_probes_still_answer() {
    let app = spawn_app_with(
        |settings| {
            settings.grpc.max_concurrent_requests = 1;
            settings.grpc.default_timeout_ms = 5_000;
        },
        local_model(),
    )
    .await;
    let mut health = HealthClient::new(app.channel().await);
    wait_until_serving(&mut health).await;
    let locker = lock_incidents(&app).await;
    let mut blocked_client = app.incident_query_client().await;
    let blocked = tokio::spawn(async move { list_incidents(&mut blocked_client).await });
    wait_for_lock_waiter(&app).await;

    let mut incidents = app.incident_query_client().await;
    let status = list_incidents(&mut incidents).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(status.get_details_error_info().unwrap().reason, "OVERLOADED");
    assert!(status.get_details_retry_info().is_some());
    let probe = health
        .check(HealthCheckRequest { service: String::new() })
        .await
        .expect("probes are never shed");
    assert_eq!(probe.into_inner().status(), ServingStatus::Serving);

    drop(locker);
    blocked.await.unwrap().expect("the admitted call completes");
    list_incidents(&mut incidents).await.expect("the slot is free again");
}

/// Until a query of `app` waits on a lock: the blocked call holds its slot.
async fn wait_for_lock_waiter(app: &TestApp) {
    for _ in 0..200 {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&app.db)
        .await
        .unwrap();
        if waiting > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the first call never reached the database");
}

async fn wait_until_serving(health: &mut HealthClient<Channel>) {
    for _ in 0..100 {
        let status = health
            .check(HealthCheckRequest { service: String::new() })
            .await
            .map(|r| r.into_inner().status());
        if matches!(status, Ok(ServingStatus::Serving)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the server never reported SERVING");
}

#[tokio::test]
async fn grpc_can_be_served_over_tls() {
    let app = spawn_app_with(
        |settings| {
            settings.grpc.tls = Some(TlsSettings {
                cert_file: fixture("tls-localhost.crt"),
                key_file: fixture("tls-localhost.key"),
            })
        },
        local_model(),
    )
    .await;
    let ca = Certificate::from_pem(std::fs::read(fixture("tls-ca.crt")).unwrap());
    let channel = Channel::from_shared(format!("https://localhost:{}", app.port))
        .unwrap()
        .tls_config(ClientTlsConfig::new().ca_certificate(ca).domain_name("localhost"))
        .unwrap()
        .connect()
        .await
        .expect("a TLS client connects");
    let written = pb::audit_write_client::AuditWriteClient::new(channel)
        .write_audit(write(remediation_event("rr-tls")))
        .await
        .expect("a call over TLS is served");
    assert!(!written.into_inner().event_id.is_empty());

    // A plaintext client cannot talk to a TLS port.
    let plaintext = Channel::from_shared(format!("http://127.0.0.1:{}", app.port))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await;
    if let Ok(channel) = plaintext {
        let mut client = IncidentQueryClient::new(channel);
        let outcome = tokio::time::timeout(Duration::from_secs(5), list_incidents(&mut client)).await;
        assert!(
            !matches!(outcome, Ok(Ok(()))),
            "plaintext must not be served on a TLS port"
        );
    }
}
