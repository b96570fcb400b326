use std::{path::PathBuf, process::Command, time::Duration};

use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest};

use crate::helpers::*;

/// A throwaway PostgreSQL cluster of its own, so a test can stop and
/// restart the server without disturbing the tests that share the main one.
pub struct PrivateCluster {
    dir: PathBuf,
    port: u16,
}

impl PrivateCluster {
    fn unstarted() -> Self {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let dir = std::env::temp_dir().join(format!("ds-test-pg-{}", uuid::Uuid::new_v4().simple()));
        PrivateCluster { dir, port }
    }

    pub fn start() -> Self {
        let cluster = PrivateCluster::unstarted();
        cluster.pg(&["start", cluster.dir.to_str().unwrap(), &cluster.port.to_string()]);
        cluster
    }

    /// A streaming replica of `primary` (pg_basebackup -R), running.
    pub fn replica_of(primary: &PrivateCluster) -> Self {
        let replica = PrivateCluster::unstarted();
        replica.pg(&[
            "replica",
            &primary.port.to_string(),
            replica.dir.to_str().unwrap(),
            &replica.port.to_string(),
        ]);
        replica
    }

    fn pg(&self, args: &[&str]) {
        let status = Command::new("bash")
            .arg(repo_dir().join("scripts/pg.sh"))
            .args(args)
            .status()
            .expect("scripts/pg.sh runs");
        assert!(status.success(), "scripts/pg.sh {args:?} failed");
    }

    pub fn stop(&self) {
        self.pg(&["stop", self.dir.to_str().unwrap()]);
    }

    pub fn restart(&self) {
        self.pg(&["start", self.dir.to_str().unwrap(), &self.port.to_string()]);
    }

    pub fn url(&self) -> String {
        format!("postgres://datastorage:datastorage@127.0.0.1:{}/datastorage", self.port)
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn wait_for(
    client: &mut HealthClient<tonic::transport::Channel>,
    service: &str,
    wanted: ServingStatus,
    http_port: u16,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let status = client
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .map(|r| r.into_inner().status());
        if status.as_ref().ok() == Some(&wanted) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "health never became {wanted:?}: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ready = reqwest_status(http_port, "/readyz").await;
    assert_eq!(
        ready == 200,
        wanted == ServingStatus::Serving,
        "/readyz answered {ready}"
    );
}

/// A minimal HTTP/1.1 GET, to check /readyz without another client dependency.
async fn reqwest_status(port: u16, path: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test]
async fn health_follows_postgresql_down_and_back_up() {
    let cluster = PrivateCluster::start();
    let app = spawn_with_settings(test_settings(cluster.url()), local_model()).await;
    let mut health = HealthClient::new(app.channel().await);

    for service in ["", "datastorage.v1.AuditWrite"] {
        wait_for(&mut health, service, ServingStatus::Serving, app.http_port).await;
    }
    assert_eq!(reqwest_status(app.http_port, "/healthz").await, 200);

    cluster.stop();
    for service in ["", "datastorage.v1.AuditWrite"] {
        wait_for(&mut health, service, ServingStatus::NotServing, app.http_port).await;
    }
    // Writes fail fast with UNAVAILABLE while the database is down.
    let mut client = app.audit_client().await;
    let status = client
        .write_audit(write(remediation_event("rr-down")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");

    cluster.restart();
    for service in ["", "datastorage.v1.AuditWrite"] {
        wait_for(&mut health, service, ServingStatus::Serving, app.http_port).await;
    }
    client
        .write_audit(write(remediation_event("rr-up")))
        .await
        .expect("writes work again");
}
