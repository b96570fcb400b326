use std::{
    net::TcpListener,
    path::PathBuf,
    process::Command,
    sync::{Arc, OnceLock},
    time::Duration,
};

use datastorage::{
    config::{LogFormat, Settings},
    embedding::{local::LocalMiniLm, EmbeddingProvider},
    proto::v1::{self as pb, audit_write_client::AuditWriteClient},
    startup::Application,
    storage::MIGRATOR,
};
use secrecy::SecretString;
use sqlx::{AssertSqlSafe, Connection, Executor, PgConnection, PgPool};
use tokio::sync::{oneshot, OnceCell};
use tonic::transport::Channel;

pub fn admin_url() -> String {
    std::env::var("DATASTORAGE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://datastorage:datastorage@127.0.0.1:55432/datastorage".into())
}

pub fn repo_dir() -> std::path::PathBuf {
    env!("CARGO_MANIFEST_DIR").into()
}

pub fn model_dir() -> std::path::PathBuf {
    std::env::var_os("DATASTORAGE_TEST_MODEL_DIR")
        .map(Into::into)
        .unwrap_or_else(|| repo_dir().join(".cache/models/all-MiniLM-L6-v2"))
}

fn with_database(url: &str, database: &str) -> String {
    let (base, _) = url.rsplit_once('/').expect("database URL has a path");
    format!("{base}/{database}")
}

/// The local model, loaded once per test process and shared by every server.
pub fn local_model() -> Arc<dyn EmbeddingProvider> {
    static MODEL: OnceLock<Arc<dyn EmbeddingProvider>> = OnceLock::new();
    MODEL
        .get_or_init(|| Arc::new(LocalMiniLm::load(&model_dir(), "all-MiniLM-L6-v2").expect("model loads (make deps)")))
        .clone()
}

/// A migrated template database per test process; each test copies it, which
/// is much faster than migrating a fresh database every time.
async fn template_database() -> &'static str {
    static TEMPLATE: OnceCell<String> = OnceCell::const_new();
    TEMPLATE
        .get_or_init(|| async {
            let name = format!("ds_test_template_{}", std::process::id());
            let mut admin = PgConnection::connect(&admin_url())
                .await
                .expect("PostgreSQL is up (make dev-up)");
            admin
                .execute(AssertSqlSafe(format!(r#"DROP DATABASE IF EXISTS "{name}""#)))
                .await
                .unwrap();
            admin
                .execute(AssertSqlSafe(format!(r#"CREATE DATABASE "{name}""#)))
                .await
                .unwrap();
            let pool = PgPool::connect(&with_database(&admin_url(), &name)).await.unwrap();
            MIGRATOR.run(&pool).await.expect("migrations apply");
            pool.close().await;
            name
        })
        .await
}

/// A new empty (migrated) database; returns its URL.
pub async fn fresh_database() -> String {
    let template = template_database().await;
    let name = format!("ds_test_{}", uuid::Uuid::new_v4().simple());
    let mut admin = PgConnection::connect(&admin_url()).await.unwrap();
    let mut attempts = 0;
    // Concurrent copies of one template can collide on its lock; retry briefly.
    while let Err(error) = admin
        .execute(AssertSqlSafe(format!(
            r#"CREATE DATABASE "{name}" TEMPLATE "{template}""#
        )))
        .await
    {
        attempts += 1;
        assert!(attempts < 50, "creating a test database: {error}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    with_database(&admin_url(), &name)
}

pub fn test_settings(database_url: String) -> Settings {
    let mut settings = Settings::default();
    settings.grpc.host = [127, 0, 0, 1].into();
    settings.grpc.port = 0;
    settings.http.host = [127, 0, 0, 1].into();
    settings.http.port = 0;
    settings.database.url = SecretString::from(database_url);
    settings.database.health_check_interval_ms = 100;
    settings.database.acquire_timeout_ms = 1_000;
    settings.database.max_connections = 5;
    settings.embedding.model_dir = model_dir();
    settings.log.format = LogFormat::Pretty;
    // Authentication has its own tests (auth.rs); elsewhere the caller is anonymous.
    settings.auth.disabled = true;
    // Tests call in bursts far above any sane per-caller rate; protection.rs tests the limits.
    settings.rate_limit.enabled = false;
    settings.shutdown.drain_delay_ms = 50;
    settings.shutdown.grace_period_ms = 2_000;
    settings
}

pub struct TestApp {
    pub port: u16,
    pub http_port: u16,
    pub db: PgPool,
    _stop: oneshot::Sender<()>,
}

impl TestApp {
    pub async fn audit_client(&self) -> AuditWriteClient<Channel> {
        AuditWriteClient::connect(format!("http://127.0.0.1:{}", self.port))
            .await
            .unwrap()
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://127.0.0.1:{}", self.port))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    pub async fn count(&self, table: &str) -> i64 {
        // Table names come from the tests themselves, never from input.
        sqlx::query_scalar(AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
            .fetch_one(&self.db)
            .await
            .unwrap()
    }
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}, local_model()).await
}

pub async fn spawn_app_with(customize: impl FnOnce(&mut Settings), provider: Arc<dyn EmbeddingProvider>) -> TestApp {
    let url = fresh_database().await;
    let mut settings = test_settings(url.clone());
    customize(&mut settings);
    spawn_with_settings(settings, provider).await
}

pub async fn spawn_with_settings(settings: Settings, provider: Arc<dyn EmbeddingProvider>) -> TestApp {
    if std::env::var_os("TEST_LOG").is_some() {
        // Lives as long as the process: the subscriber is global.
        std::mem::forget(datastorage::telemetry::init(LogFormat::Pretty));
    }
    let db = PgPool::connect_lazy(secrecy::ExposeSecret::expose_secret(&settings.database.url)).unwrap();
    let app = Application::build_with_provider(settings, provider)
        .await
        .expect("app builds");
    let (port, http_port) = (app.port(), app.http_port());
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));
    TestApp {
        port,
        http_port,
        db,
        _stop: stop,
    }
}

/// A valid remediation event; tests change what they need.
pub fn remediation_event(remediation_request_id: &str) -> pb::AuditEvent {
    pb::AuditEvent {
        correlation_id: format!("corr-{remediation_request_id}"),
        remediation_request_id: remediation_request_id.into(),
        occurred_at: Some(timestamp_ago(60)),
        namespace: "payments".into(),
        cluster: "prod-eu-1".into(),
        labels: [("team".to_owned(), "checkout".to_owned())].into(),
        parent_event_id: String::new(),
        payload: Some(pb::audit_event::Payload::Remediation(pb::RemediationAudit {
            signal_type: "prometheus-alert".into(),
            signal_name: "HighMemoryUsage".into(),
            severity: pb::Severity::Critical as i32,
            target: Some(pb::ResourceRef {
                kind: "Deployment".into(),
                name: "api".into(),
                namespace: "payments".into(),
            }),
            phase: pb::Phase::Processing as i32,
            message: "container api OOMKilled: memory limit 512Mi exceeded".into(),
            started_at: None,
            completed_at: None,
            priority: "P1".into(),
        })),
    }
}

pub fn timestamp_ago(seconds: i64) -> prost_types::Timestamp {
    let now = chrono::Utc::now() - chrono::TimeDelta::seconds(seconds);
    prost_types::Timestamp {
        seconds: now.timestamp(),
        nanos: 0,
    }
}

pub fn write(event: pb::AuditEvent) -> pb::WriteAuditRequest {
    pb::WriteAuditRequest {
        event: Some(event),
        request_id: String::new(),
        embedding: None,
    }
}

/// The fields named by an INVALID_ARGUMENT's BadRequest details.
pub fn violated_fields(status: &tonic::Status) -> Vec<String> {
    use tonic_types::StatusExt;
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    status
        .get_details_bad_request()
        .expect("BadRequest details")
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect()
}

impl TestApp {
    pub async fn incident_query_client(
        &self,
    ) -> datastorage::proto::v1::incident_query_client::IncidentQueryClient<Channel> {
        datastorage::proto::v1::incident_query_client::IncidentQueryClient::new(self.channel().await)
    }
}

impl TestApp {
    pub async fn search_client(&self) -> datastorage::proto::v1::vector_search_client::VectorSearchClient<Channel> {
        datastorage::proto::v1::vector_search_client::VectorSearchClient::new(self.channel().await)
    }
}

/// Deterministic pseudo-random numbers (SplitMix64) for seeded test data.
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i + 1));
        }
    }
}

/// A PostgreSQL cluster of a test's own, in a temporary directory, started
/// and stopped with the project's scripts/pg.sh: for faults that must not
/// reach the cluster other tests share.
pub struct PrivatePostgres {
    pub datadir: PathBuf,
    port: u16,
}

impl PrivatePostgres {
    pub fn start() -> PrivatePostgres {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let datadir = std::env::temp_dir().join(format!("ds-private-pg-{}", uuid::Uuid::new_v4().simple()));
        let cluster = PrivatePostgres { datadir, port };
        cluster.pg(&["start", cluster.datadir.to_str().unwrap(), &port.to_string()]);
        cluster
    }

    pub fn url(&self) -> String {
        format!("postgres://datastorage:datastorage@127.0.0.1:{}/datastorage", self.port)
    }

    fn pg(&self, args: &[&str]) {
        let output = Command::new("bash")
            .arg(repo_dir().join("scripts/pg.sh"))
            .args(args)
            .output()
            .expect("bash runs");
        assert!(
            output.status.success(),
            "pg.sh {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    pub fn stop(&self) {
        self.pg(&["stop", self.datadir.to_str().unwrap()]);
    }

    pub fn restart(&self) {
        self.pg(&["start", self.datadir.to_str().unwrap(), &self.port.to_string()]);
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(repo_dir().join("scripts/pg.sh"))
            .args(["stop", self.datadir.to_str().unwrap()])
            .output();
        let _ = std::fs::remove_dir_all(&self.datadir);
    }
}

/// grpc.health.v1's answer for `service` ("" is the whole server).
pub async fn health_of(app: &TestApp, service: &str) -> tonic_health::pb::health_check_response::ServingStatus {
    tonic_health::pb::health_client::HealthClient::new(app.channel().await)
        .check(tonic_health::pb::HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status()
}
