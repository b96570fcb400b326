//! Database faults short of an outage. A database that refuses writes
//! (read-only, as a primary demoted or a disk-full guard would make it)
//! answers UNAVAILABLE with RetryInfo, stores nothing, keeps reads working,
//! and is written to again once it accepts writes. A database that stops
//! answering altogether fails calls fast instead of holding them until
//! their deadline, and the service serves again by itself when it answers.
use std::{
    net::{SocketAddr, ToSocketAddrs},
    time::{Duration, Instant},
};

use datastorage::proto::v1::{
    self as pb, audit_write_client::AuditWriteClient, incident_query_client::IncidentQueryClient,
};
use sqlx::{AssertSqlSafe, Connection, Executor, PgConnection};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        tcp::{OwnedReadHalf, OwnedWriteHalf},
        TcpListener, TcpStream,
    },
    sync::watch,
};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_types::StatusExt;

use crate::helpers::*;

/// Sets `default_transaction_read_only` for the app's database and ends its
/// sessions, so every new connection the pool opens gets the setting. Done
/// from the admin database: a session of the read-only one could not undo it.
async fn set_read_only(app: &TestApp, read_only: bool) {
    let database: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&app.db)
        .await
        .unwrap();
    let mut admin = PgConnection::connect(&admin_url()).await.unwrap();
    let value = if read_only { "on" } else { "off" };
    // The database name comes from the test's own fresh_database().
    admin
        .execute(AssertSqlSafe(format!(
            r#"ALTER DATABASE "{database}" SET default_transaction_read_only = {value}"#
        )))
        .await
        .unwrap();
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
        .bind(&database)
        .execute(&mut admin)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_read_only_database_is_unavailable_for_writes_and_stores_nothing() {
    let app = spawn_app().await;
    let mut audit = app.audit_client().await;
    audit
        .write_audit(write(remediation_event("rr-before")))
        .await
        .expect("a writable database takes the write");

    set_read_only(&app, true).await;
    let mut refused = None;
    // The pool may hand out a connection cut by the termination once.
    for _ in 0..3 {
        match audit.write_audit(write(remediation_event("rr-read-only"))).await {
            Err(status) if status.code() == Code::Unavailable => {
                refused = Some(status);
                break;
            }
            other => assert!(other.is_err(), "a read-only database must not take a write: {other:?}"),
        }
    }
    let refused = refused.expect("UNAVAILABLE for a read-only database");
    assert!(refused.get_details_retry_info().is_some(), "{refused:?}");
    assert!(
        !refused.message().to_lowercase().contains("read-only transaction"),
        "no SQL text: {refused:?}"
    );
    let batch = audit
        .batch_write_audit(pb::BatchWriteAuditRequest {
            requests: vec![write(remediation_event("rr-ro-1")), write(remediation_event("rr-ro-2"))],
        })
        .await
        .unwrap_err();
    assert_eq!(batch.code(), Code::Unavailable);
    assert_eq!(app.count("audit_events").await, 1, "nothing partial was stored");
    assert_eq!(app.count("incidents").await, 1);
    app.incident_query_client()
        .await
        .get_incident(pb::GetIncidentRequest {
            key: Some(pb::get_incident_request::Key::RemediationRequestId("rr-before".into())),
        })
        .await
        .expect("reads keep working");

    set_read_only(&app, false).await;
    let mut written = false;
    for _ in 0..3 {
        if audit.write_audit(write(remediation_event("rr-after"))).await.is_ok() {
            written = true;
            break;
        }
    }
    assert!(written, "writes work again once the database takes them");
    assert_eq!(app.count("audit_events").await, 2);
}

/// A TCP proxy between the service and PostgreSQL that can stop passing
/// bytes while keeping every connection open. To the service this is a
/// database that accepted its connections and then stopped answering: a
/// stopped or swapping server, a hung disk.
struct StallingProxy {
    port: u16,
    stalled: watch::Sender<bool>,
}

impl StallingProxy {
    async fn start(upstream: SocketAddr) -> StallingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (stalled, watching) = watch::channel(false);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(Self::pass(client_read, server_write, watching.clone()));
                tokio::spawn(Self::pass(server_read, client_write, watching.clone()));
            }
        });
        StallingProxy { port, stalled }
    }

    /// Copies bytes one way, holding them while stalled.
    async fn pass(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut stalled: watch::Receiver<bool>) {
        let mut buffer = vec![0u8; 16 * 1024];
        loop {
            let read = match from.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(read) => read,
            };
            if stalled.wait_for(|stalled| !*stalled).await.is_err() {
                break;
            }
            if to.write_all(&buffer[..read]).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    }

    fn url_for(&self, database_url: &str) -> String {
        let (credentials_and_host, database) = database_url.rsplit_once('/').unwrap();
        let (credentials, _) = credentials_and_host.rsplit_once('@').unwrap();
        format!("{credentials}@127.0.0.1:{}/{database}", self.port)
    }

    fn stall(&self, stalled: bool) {
        self.stalled.send_replace(stalled);
    }
}

fn upstream_of(database_url: &str) -> SocketAddr {
    let (credentials_and_host, _) = database_url.rsplit_once('/').unwrap();
    let (_, host) = credentials_and_host.rsplit_once('@').unwrap();
    host.to_socket_addrs().unwrap().next().unwrap()
}

async fn health_becomes(app: &TestApp, wanted: ServingStatus, within: Duration) {
    let started = Instant::now();
    while health_of(app, "datastorage.v1.IncidentQuery").await != wanted {
        assert!(
            started.elapsed() < within,
            "health did not become {wanted:?} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn keyed_write(rrid: &str) -> pb::WriteAuditRequest {
    pb::WriteAuditRequest {
        request_id: format!("stall-{rrid}"),
        ..write(remediation_event(rrid))
    }
}

#[tokio::test]
async fn a_stalled_database_fails_calls_fast_turns_not_serving_and_recovers() {
    const CALLER_DEADLINE: Duration = Duration::from_secs(10);
    const ACQUIRE_TIMEOUT_MS: u64 = 500;
    let direct = fresh_database().await;
    let proxy = StallingProxy::start(upstream_of(&direct)).await;
    let mut settings = test_settings(proxy.url_for(&direct));
    settings.database.acquire_timeout_ms = ACQUIRE_TIMEOUT_MS;
    settings.database.max_connections = 4;
    let app = spawn_with_settings(settings, local_model()).await;
    let mut audit = app.audit_client().await;
    audit
        .write_audit(keyed_write("rr-before-stall"))
        .await
        .expect("served before the stall");
    health_becomes(&app, ServingStatus::Serving, Duration::from_secs(5)).await;

    proxy.stall(true);
    // More calls than connections: the pool is exhausted as well as stalled.
    let mut calls = tokio::task::JoinSet::new();
    for n in 0..12 {
        let channel = app.channel().await;
        calls.spawn(async move {
            let started = Instant::now();
            let code = if n % 2 == 0 {
                let mut request = tonic::Request::new(keyed_write(&format!("rr-stalled-{n}")));
                request.set_timeout(CALLER_DEADLINE);
                AuditWriteClient::new(channel).write_audit(request).await.map(|_| ())
            } else {
                let mut request = tonic::Request::new(pb::GetIncidentRequest {
                    key: Some(pb::get_incident_request::Key::RemediationRequestId(
                        "rr-before-stall".into(),
                    )),
                });
                request.set_timeout(CALLER_DEADLINE);
                IncidentQueryClient::new(channel)
                    .get_incident(request)
                    .await
                    .map(|_| ())
            }
            .map_err(|status| status.code());
            (code, started.elapsed())
        });
    }
    while let Some(answer) = calls.join_next().await {
        let (outcome, took) = answer.unwrap();
        assert_eq!(
            outcome,
            Err(Code::Unavailable),
            "a stalled database answers UNAVAILABLE"
        );
        // Failing at the pool's acquire timeout, long before the caller's deadline.
        assert!(took < Duration::from_secs(4), "the call waited {took:?}");
    }
    health_becomes(&app, ServingStatus::NotServing, Duration::from_secs(5)).await;

    proxy.stall(false);
    health_becomes(&app, ServingStatus::Serving, Duration::from_secs(10)).await;
    // The callers retry their refused writes with the same request ids.
    for n in (0..12).step_by(2) {
        let mut retried = None;
        for _ in 0..3 {
            retried = Some(audit.write_audit(keyed_write(&format!("rr-stalled-{n}"))).await);
            if retried.as_ref().unwrap().is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        retried
            .unwrap()
            .expect("the write goes through once the database answers");
    }
    let direct_pool = sqlx::PgPool::connect(&direct).await.unwrap();
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_events")
        .fetch_one(&direct_pool)
        .await
        .unwrap();
    assert_eq!(
        stored, 7,
        "each write stored once: the one before the stall and six retried"
    );
    let incidents: i64 = sqlx::query_scalar("SELECT count(*) FROM incidents")
        .fetch_one(&direct_pool)
        .await
        .unwrap();
    assert_eq!(incidents, 7);
}

/// Mounting needs root. CI runs as root (it installs packages); a developer
/// running the tests as themselves skips the disk-full test, which says so.
fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let uids = status.lines().find_map(|line| line.strip_prefix("Uid:"))?.to_owned();
            uids.split_whitespace().nth(1).map(|effective| effective == "0")
        })
        .unwrap_or(false)
}

/// A disk that fills up: a tmpfs of 512 KiB mounted for the test.
struct SmallDisk {
    path: std::path::PathBuf,
}

impl SmallDisk {
    fn mount() -> Result<SmallDisk, String> {
        let path = std::env::temp_dir().join(format!("ds-small-disk-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&path).unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=512k,mode=0700", "tmpfs"])
            .arg(&path)
            .output()
            .map_err(|e| format!("mount: {e}"))?;
        if !mounted.status.success() {
            let _ = std::fs::remove_dir(&path);
            return Err(format!("mount: {}", String::from_utf8_lossy(&mounted.stderr).trim()));
        }
        Ok(SmallDisk { path })
    }

    /// Makes the disk a tablespace of `cluster`, named `small_disk`.
    async fn attach(&self, cluster: &PrivatePostgres, database: &mut PgConnection) {
        use std::os::unix::fs::MetadataExt;
        let server_uid = std::fs::metadata(&cluster.datadir).unwrap().uid();
        std::os::unix::fs::chown(&self.path, Some(server_uid), None).unwrap();
        // The path is made above, not taken from input.
        database
            .execute(AssertSqlSafe(format!(
                "CREATE TABLESPACE small_disk LOCATION '{}'",
                self.path.display()
            )))
            .await
            .unwrap();
    }

    /// Fills the disk with a table until PostgreSQL says it is full. The
    /// last, failed INSERT leaves empty pages at the table's end; a vacuum
    /// would truncate them and free space, so autovacuum is off for it.
    async fn fill(&self, database: &mut PgConnection) {
        database
            .execute(
                "CREATE TABLE filler (pad text) WITH (autovacuum_enabled = false) TABLESPACE small_disk; \
                 ALTER TABLE filler ALTER COLUMN pad SET STORAGE PLAIN",
            )
            .await
            .unwrap();
        for _ in 0..1000 {
            match database
                .execute("INSERT INTO filler SELECT repeat('x', 1000) FROM generate_series(1, 50)")
                .await
            {
                Ok(_) => continue,
                Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("53100") => return,
                Err(other) => panic!("filling the small disk: {other}"),
            }
        }
        panic!("the small disk never filled");
    }
}

impl Drop for SmallDisk {
    /// Runs after the cluster using it has stopped (it is declared before
    /// the cluster): a tablespace unmounted under a running server makes its
    /// next checkpoint PANIC.
    fn drop(&mut self) {
        let unmounted = std::process::Command::new("umount").arg(&self.path).status();
        if !unmounted.is_ok_and(|status| status.success()) {
            eprintln!("umount {} failed; detaching it lazily", self.path.display());
            let _ = std::process::Command::new("umount").arg("-l").arg(&self.path).status();
        }
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// On a cluster of its own: a full disk must not reach the cluster the
/// other tests share.
#[tokio::test]
async fn a_full_disk_is_unavailable_for_writes_and_stores_nothing() {
    if !running_as_root() {
        eprintln!("SKIPPED a_full_disk_is_unavailable_for_writes_and_stores_nothing: mounting a tmpfs needs root");
        return;
    }
    let disk = SmallDisk::mount().expect("root can mount a tmpfs");
    let cluster = PrivatePostgres::start();
    let pool = sqlx::PgPool::connect(&cluster.url()).await.unwrap();
    datastorage::storage::MIGRATOR.run(&pool).await.unwrap();
    pool.close().await;
    let mut database = PgConnection::connect(&cluster.url()).await.unwrap();
    disk.attach(&cluster, &mut database).await;
    // New embeddings go to the fresh segment, empty here: a write must
    // extend it on the full disk.
    database
        .execute("ALTER TABLE fresh_embeddings SET TABLESPACE small_disk")
        .await
        .unwrap();
    disk.fill(&mut database).await;

    let app = spawn_with_settings(test_settings(cluster.url()), local_model()).await;
    let mut audit = app.audit_client().await;
    let refused = audit
        .write_audit(write(remediation_event("rr-disk-full")))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(refused.get_details_retry_info().is_some(), "{refused:?}");
    assert!(
        !refused.message().contains("No space left") && !refused.message().contains("could not extend"),
        "no server internals: {refused:?}"
    );
    let batch = audit
        .batch_write_audit(pb::BatchWriteAuditRequest {
            requests: vec![
                write(remediation_event("rr-full-1")),
                write(remediation_event("rr-full-2")),
            ],
        })
        .await
        .unwrap_err();
    assert_eq!(batch.code(), Code::Unavailable, "{batch:?}");
    assert_eq!(app.count("audit_events").await, 0, "nothing partial was stored");
    assert_eq!(app.count("incidents").await, 0);
    assert_eq!(app.count("stored_embeddings").await, 0);
    app.incident_query_client()
        .await
        .list_incidents(pb::ListIncidentsRequest::default())
        .await
        .expect("reads keep working");

    database.execute("DROP TABLE filler").await.unwrap();
    audit
        .write_audit(write(remediation_event("rr-disk-freed")))
        .await
        .expect("writes work again once there is space");
    assert_eq!(app.count("audit_events").await, 1);
    assert_eq!(app.count("stored_embeddings").await, 1);
}
