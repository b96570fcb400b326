//! `datastorage jobs`, run as the built program against a server started in
//! this process (port 0, a fresh database in the project's PostgreSQL, the
//! local model), the way an operator runs it. Its stdout and stderr are
//! pipes, so `watch` prints lines, not a progress bar.
use std::{path::PathBuf, process::Command, sync::Arc};

use datastorage::{config::Settings, embedding::local::LocalMiniLm, startup::Application};
use secrecy::SecretString;
use serde_json::Value;
use sqlx::{AssertSqlSafe, Connection, Executor, PgConnection, PgPool};
use tokio::sync::oneshot;

fn admin_url() -> String {
    std::env::var("DATASTORAGE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://datastorage:datastorage@127.0.0.1:55432/datastorage".into())
}

fn model_dir() -> PathBuf {
    std::env::var_os("DATASTORAGE_TEST_MODEL_DIR")
        .map(Into::into)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache/models/all-MiniLM-L6-v2"))
}

fn database_url(name: &str) -> String {
    let admin = admin_url();
    let (base, _) = admin.rsplit_once('/').expect("database URL has a path");
    format!("{base}/{name}")
}

/// A server on its own database, which `stop` drops.
struct Server {
    addr: String,
    database: String,
    stop: oneshot::Sender<()>,
}

impl Server {
    async fn start() -> Server {
        Server::start_with(|_| {}).await
    }

    async fn start_with(customize: impl FnOnce(&mut Settings)) -> Server {
        let database = format!("ds_cli_test_{}", uuid::Uuid::new_v4().simple());
        let mut admin = PgConnection::connect(&admin_url())
            .await
            .expect("PostgreSQL is up (make dev-up)");
        admin
            .execute(AssertSqlSafe(format!(r#"CREATE DATABASE "{database}""#)))
            .await
            .unwrap();
        let mut settings = Settings::default();
        settings.grpc.host = [127, 0, 0, 1].into();
        settings.grpc.port = 0;
        settings.http.host = [127, 0, 0, 1].into();
        settings.http.port = 0;
        settings.auth.disabled = true;
        // migrate_on_start is on by default: the server migrates its new database.
        settings.database.url = SecretString::from(database_url(&database));
        settings.database.max_connections = 5;
        settings.embedding.model_dir = model_dir();
        customize(&mut settings);
        let model = LocalMiniLm::load(&model_dir(), "all-MiniLM-L6-v2").expect("model loads (make deps)");
        let app = Application::build_with_provider(settings, Arc::new(model))
            .await
            .expect("app builds");
        let addr = format!("http://127.0.0.1:{}", app.port());
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(app.run_until_stopped(async {
            let _ = stopped.await;
        }));
        Server { addr, database, stop }
    }

    /// `datastorage jobs <args> --addr <this server>`.
    async fn jobs(&self, args: &[&str]) -> Run {
        let mut all = vec!["jobs", "--addr", &self.addr];
        all.extend_from_slice(args);
        datastorage(&all).await
    }

    async fn pool(&self) -> PgPool {
        PgPool::connect(&database_url(&self.database)).await.unwrap()
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        let mut admin = PgConnection::connect(&admin_url()).await.unwrap();
        admin
            .execute(AssertSqlSafe(format!(
                r#"DROP DATABASE "{}" WITH (FORCE)"#,
                self.database
            )))
            .await
            .unwrap();
    }
}

#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json_lines(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
            .collect()
    }

    fn json(&self) -> Value {
        let mut lines = self.json_lines();
        assert_eq!(lines.len(), 1, "{self:?}");
        lines.remove(0)
    }
}

/// The built program, with none of the caller's DATASTORAGE_* settings.
async fn datastorage(args: &[&str]) -> Run {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let output = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_datastorage"))
            .args(&args)
            .env_remove("DATASTORAGE_ADDR")
            .env_remove("DATASTORAGE_TOKEN")
            .output()
            .expect("the binary runs")
    })
    .await
    .unwrap();
    Run {
        code: output.status.code(),
        stdout: String::from_utf8(output.stdout).unwrap(),
        stderr: String::from_utf8(output.stderr).unwrap(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_jobs_command_works_against_a_running_server() {
    let server = Server::start().await;

    let started = server
        .jobs(&[
            "start",
            "purge",
            "--older-than",
            "90d",
            "--request-id",
            "cli-1",
            "--json",
        ])
        .await;
    assert_eq!(started.code, Some(0), "{started:?}");
    let job = started.json();
    let id = job["id"].as_str().unwrap().to_owned();
    assert_eq!(job["type"], "purge");

    let retried = server
        .jobs(&[
            "start",
            "--request-id",
            "cli-1",
            "--json",
            "purge",
            "--older-than",
            "90d",
        ])
        .await;
    assert_eq!(
        retried.json()["id"],
        id.as_str(),
        "the same request_id returns the same job"
    );

    let watched = server.jobs(&["watch", &id, "--json"]).await;
    assert_eq!(watched.code, Some(0), "{watched:?}");
    let last = watched.json_lines().pop().unwrap();
    assert_eq!(last["state"], "succeeded");
    assert_eq!(last["progress_percent"], 100);
    assert_eq!(last["result"]["events_deleted"], 0);
    assert!(last["finished_at"].is_string(), "{last}");

    let shown = server.jobs(&["get", &id]).await;
    assert_eq!(shown.code, Some(0), "{shown:?}");
    let lines: Vec<&str> = shown.stdout.lines().collect();
    assert!(lines[0].starts_with("ID "), "{shown:?}");
    assert!(
        lines[1].starts_with(&id) && lines[1].contains(" purge ") && lines[1].contains(" succeeded "),
        "{shown:?}"
    );
    assert!(lines[2].starts_with("  result: events_deleted=0, "), "{shown:?}");

    // A second job, started and followed by people: lines, then the job's row.
    let followed = server
        .jobs(&[
            "start",
            "purge",
            "--older-than",
            "2025-01-31T00:00:00Z",
            "--watch",
            "--token",
            "t0ken",
        ])
        .await;
    assert_eq!(followed.code, Some(0), "{followed:?}");
    assert!(
        followed.stdout.lines().any(|l| l.contains("  succeeded  100%  ")),
        "{followed:?}"
    );
    assert!(
        followed
            .stdout
            .trim_end()
            .lines()
            .last()
            .unwrap()
            .starts_with("  result: "),
        "{followed:?}"
    );

    let listed = server
        .jobs(&["list", "--state", "succeeded", "--type", "purge", "--json"])
        .await;
    assert_eq!(listed.code, Some(0), "{listed:?}");
    let listed = listed.json();
    assert_eq!(listed["jobs"].as_array().unwrap().len(), 2, "{listed}");
    assert_eq!(listed["jobs"][1]["id"], id.as_str(), "newest first");
    assert_eq!(listed["next_page_token"], "");

    let running = server
        .jobs(&["list", "--state", "pending,running", "--type", "purge", "--json"])
        .await;
    assert_eq!(running.json()["jobs"], Value::Array(vec![]));

    let first_page = server
        .jobs(&["list", "--type", "purge", "--page-size", "1", "--json"])
        .await
        .json();
    assert_eq!(first_page["jobs"].as_array().unwrap().len(), 1);
    let token = first_page["next_page_token"].as_str().unwrap();
    assert!(!token.is_empty());
    let human_page = server.jobs(&["list", "--type", "purge", "--page-size", "1"]).await;
    assert!(
        human_page.stdout.ends_with(&format!("more: --page-token {token}\n")),
        "{human_page:?}"
    );
    let second_page = server
        .jobs(&[
            "list",
            "--type",
            "purge",
            "--page-size",
            "1",
            "--page-token",
            token,
            "--json",
        ])
        .await
        .json();
    assert_eq!(second_page["jobs"][0]["id"], id.as_str());
    let every_page = server
        .jobs(&["list", "--type", "purge", "--page-size", "1", "--all", "--json"])
        .await
        .json();
    assert_eq!(every_page["jobs"].as_array().unwrap().len(), 2);
    assert_eq!(every_page["next_page_token"], "");

    // gRPC errors: one line on stderr, status 1.
    let too_late = server.jobs(&["cancel", &id]).await;
    assert_eq!(too_late.code, Some(1), "{too_late:?}");
    assert!(
        too_late.stderr.starts_with("error: FAILED_PRECONDITION: "),
        "{too_late:?}"
    );
    assert_eq!(too_late.stderr.lines().count(), 1, "{too_late:?}");
    let missing = server.jobs(&["get", "0195f1c2-7a3b-7c4d-8e5f-0123456789ab"]).await;
    assert_eq!(missing.code, Some(1), "{missing:?}");
    assert!(missing.stderr.starts_with("error: NOT_FOUND: "), "{missing:?}");
    let malformed = server.jobs(&["watch", "not-a-job-id"]).await;
    assert_eq!(malformed.code, Some(1), "{malformed:?}");
    assert!(
        malformed.stderr.starts_with("error: INVALID_ARGUMENT: "),
        "{malformed:?}"
    );

    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_that_fails_exits_with_status_3_and_says_why() {
    let server = Server::start().await;
    // Break the schema under the purge.
    let pool = server.pool().await;
    pool.execute("ALTER TABLE audit_events RENAME COLUMN occurred_at TO occurred_at_gone")
        .await
        .unwrap();
    pool.close().await;

    let failed = server.jobs(&["start", "purge", "--older-than", "90d", "--watch"]).await;
    assert_eq!(failed.code, Some(3), "{failed:?}");
    let lines: Vec<&str> = failed.stdout.lines().collect();
    assert!(lines.iter().any(|l| l.contains(" failed ")), "{failed:?}");
    assert!(lines.last().unwrap().starts_with("  error: "), "{failed:?}");

    let as_json = server
        .jobs(&["start", "purge", "--older-than", "90d", "--watch", "--json"])
        .await;
    assert_eq!(as_json.code, Some(3), "{as_json:?}");
    let last = as_json.json_lines().pop().unwrap();
    assert_eq!(last["state"], "failed");
    assert!(last["error"]["status"].is_string(), "{last}");

    server.stop().await;
}

#[tokio::test]
async fn an_unreachable_server_is_one_line_and_status_1() {
    // Port 1 on loopback: nothing listens there.
    let run = datastorage(&["jobs", "--addr", "127.0.0.1:1", "get", "any"]).await;
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(
        run.stderr.starts_with("error: cannot connect to http://127.0.0.1:1: "),
        "{run:?}"
    );
    assert_eq!(run.stderr.lines().count(), 1, "{run:?}");
    assert!(run.stdout.is_empty(), "{run:?}");
}

#[tokio::test]
async fn a_bad_command_line_is_status_2() {
    let run = datastorage(&["jobs", "start", "purge", "--older-than", "last tuesday"]).await;
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(run.stderr.contains("expected an RFC 3339 timestamp"), "{run:?}");
}

#[tokio::test]
async fn an_audit_export_saved_by_the_cli_verifies_offline_until_a_byte_changes() {
    use datastorage::proto::v1::{self as pb, audit_write_client::AuditWriteClient};

    let dir = std::env::temp_dir().join(format!("ds-cli-audit-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join("export.pem");
    let keygen = datastorage(&["audit", "keygen", "--out", key.to_str().unwrap()]).await;
    assert_eq!(keygen.code, Some(0), "{keygen:?}");
    let server = Server::start_with(|s| s.integrity.export_signing_key = Some(key.clone())).await;

    let mut client = AuditWriteClient::connect(server.addr.clone()).await.unwrap();
    for step in ["scale up", "roll back"] {
        let event = pb::AuditEvent {
            correlation_id: "corr-cli".into(),
            remediation_request_id: "rr-cli".into(),
            occurred_at: Some(prost_types::Timestamp {
                seconds: chrono::Utc::now().timestamp() - 60,
                nanos: 0,
            }),
            namespace: "payments".into(),
            payload: Some(pb::audit_event::Payload::Custom(pb::CustomAudit {
                event_type: "operator_note".into(),
                text: step.into(),
                ..Default::default()
            })),
            ..Default::default()
        };
        client
            .write_audit(pb::WriteAuditRequest {
                event: Some(event),
                ..Default::default()
            })
            .await
            .unwrap();
    }

    let file = dir.join("corr-cli.jsonl");
    let export = datastorage(&[
        "audit",
        "export",
        "--addr",
        &server.addr,
        "--correlation-id",
        "corr-cli",
        "--out",
        file.to_str().unwrap(),
    ])
    .await;
    assert_eq!(export.code, Some(0), "{export:?}");
    assert!(
        export.stdout.contains("exported 2 events (2 verified, 0 tampered)"),
        "{export:?}"
    );

    let public = dir.join("export.pem.pub");
    let verify_args = [
        "audit",
        "verify-export",
        file.to_str().unwrap(),
        "--public-key",
        public.to_str().unwrap(),
    ];
    let ok = datastorage(&verify_args).await;
    assert_eq!(ok.code, Some(0), "{ok:?}");
    assert!(ok.stdout.starts_with("OK: signature valid"), "{ok:?}");

    let mut bytes = std::fs::read(&file).unwrap();
    let at = bytes.windows(8).position(|w| w == b"roll bac").unwrap();
    bytes[at] = b'R';
    std::fs::write(&file, bytes).unwrap();
    let tampered = datastorage(&verify_args).await;
    assert_eq!(tampered.code, Some(3), "{tampered:?}");
    assert!(tampered.stdout.starts_with("NOT AUTHENTIC"), "{tampered:?}");
    server.stop().await;
}

/// `datastorage serve` as Kubernetes stops it: SIGTERM turns health
/// NOT_SERVING at once while calls are still served for the drain delay, an
/// in-flight call finishes, and a stream that never ends on its own (a health
/// Watch) cannot keep the process alive past the grace period.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_in_flight_calls_and_reports_not_serving_before_exit() {
    use std::{
        io::BufRead,
        process::Stdio,
        time::{Duration, Instant},
    };

    use datastorage::proto::v1::{incident_query_client::IncidentQueryClient, ListIncidentsRequest};
    use tokio_stream::StreamExt;
    use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest};

    let database = format!("ds_cli_test_{}", uuid::Uuid::new_v4().simple());
    let mut admin = PgConnection::connect(&admin_url()).await.unwrap();
    admin
        .execute(AssertSqlSafe(format!(r#"CREATE DATABASE "{database}""#)))
        .await
        .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_datastorage"))
        .arg("serve")
        .env("DATASTORAGE_DATABASE__URL", database_url(&database))
        .env("DATASTORAGE_EMBEDDING__MODEL_DIR", model_dir())
        .env("DATASTORAGE_AUTH__DISABLED", "true")
        .env("DATASTORAGE_GRPC__HOST", "127.0.0.1")
        .env("DATASTORAGE_GRPC__PORT", "0")
        .env("DATASTORAGE_HTTP__HOST", "127.0.0.1")
        .env("DATASTORAGE_HTTP__PORT", "0")
        .env("DATASTORAGE_DATABASE__HEALTH_CHECK_INTERVAL_MS", "100")
        .env("DATASTORAGE_SHUTDOWN__DRAIN_DELAY_MS", "1000")
        .env("DATASTORAGE_SHUTDOWN__GRACE_PERIOD_MS", "3000")
        .env("DATASTORAGE_LOG__FORMAT", "json")
        .env("RUST_LOG", "info")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the binary starts");
    // The JSON log says where it listens; keep draining it so the pipe never fills.
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<Value>();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(json) = serde_json::from_str::<Value>(&line) {
                let _ = lines_tx.send(json);
            }
        }
    });
    let address = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.recv().await {
            if line["message"] == "gRPC listening" {
                return line["address"].as_str().unwrap().to_owned();
            }
        }
        panic!("the server exited before listening");
    })
    .await
    .expect("the server listens within a minute");
    let endpoint = format!("http://{address}");
    let channel = || async {
        tonic::transport::Channel::from_shared(endpoint.clone())
            .unwrap()
            .connect()
            .await
            .unwrap()
    };

    let mut watch = HealthClient::new(channel().await)
        .watch(HealthCheckRequest { service: String::new() })
        .await
        .unwrap()
        .into_inner();
    let status_of = |message: Option<Result<tonic_health::pb::HealthCheckResponse, tonic::Status>>| {
        message.expect("a health update").expect("no error").status()
    };
    while status_of(watch.next().await) != ServingStatus::Serving {}

    // An in-flight call: it waits on a lock the test holds.
    let mut locker = PgConnection::connect(&database_url(&database)).await.unwrap();
    locker.execute("BEGIN").await.unwrap();
    locker
        .execute("LOCK TABLE incidents IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let mut incidents = IncidentQueryClient::new(channel().await);
    let in_flight = tokio::spawn(async move { incidents.list_incidents(ListIncidentsRequest::default()).await });
    let mut waiting = 0i64;
    for _ in 0..400 {
        waiting =
            sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND wait_event_type = 'Lock'")
                .bind(&database)
                .fetch_one(&mut admin)
                .await
                .unwrap();
        if waiting > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(waiting > 0, "the in-flight call reached the database");

    let terminated = Instant::now();
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    assert_eq!(
        status_of(
            tokio::time::timeout(Duration::from_secs(2), watch.next())
                .await
                .unwrap()
        ),
        ServingStatus::NotServing,
        "health turns NOT_SERVING first"
    );
    // Still served during the drain delay, so a probe on a new connection sees it.
    let probe = HealthClient::new(channel().await)
        .check(HealthCheckRequest { service: String::new() })
        .await
        .expect("calls are still accepted while traffic moves away");
    assert_eq!(probe.into_inner().status(), ServingStatus::NotServing);

    tokio::time::sleep(Duration::from_millis(1_300)).await;
    locker.execute("COMMIT").await.unwrap();
    let answered = tokio::time::timeout(Duration::from_secs(5), in_flight)
        .await
        .expect("the in-flight call ends")
        .unwrap();
    assert!(answered.is_ok(), "the in-flight call finishes normally: {answered:?}");

    // The health Watch stream is still open: only the grace period ends it.
    let exit = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "clean exit after SIGTERM: {exit:?}");
    let took = terminated.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "drain (1 s) + grace (3 s) bound the exit, open streams or not: {took:?}"
    );
    admin
        .execute(AssertSqlSafe(format!(r#"DROP DATABASE "{database}" WITH (FORCE)"#)))
        .await
        .unwrap();
}
