//! Read replicas against a real streaming replica (`scripts/pg.sh replica`,
//! pg_basebackup -R from a private primary): reads go to the replica, a
//! caller can ask for the primary, and reads fall back to the primary while
//! the replica is down and return to it once it is back.
use std::time::Duration;

use datastorage::proto::v1::{self as pb, incident_query_client::IncidentQueryClient};
use secrecy::SecretString;
use sqlx::{Connection, Executor, PgConnection};
use tonic::{metadata::MetadataValue, transport::Channel, Code, Request};

use crate::{health::PrivateCluster, helpers::*};

async fn get_incident(
    client: &mut IncidentQueryClient<Channel>,
    rrid: &str,
    from_primary: bool,
) -> Result<pb::Incident, tonic::Status> {
    let mut request = Request::new(pb::GetIncidentRequest {
        key: Some(pb::get_incident_request::Key::RemediationRequestId(rrid.into())),
    });
    if from_primary {
        request
            .metadata_mut()
            .insert("datastorage-read-from", MetadataValue::from_static("primary"));
    }
    client.get_incident(request).await.map(|r| r.into_inner())
}

/// Polls until `wanted` says yes about the default (replica-preferring) read.
async fn eventually(
    client: &mut IncidentQueryClient<Channel>,
    rrid: &str,
    what: &str,
    wanted: impl Fn(&Result<pb::Incident, tonic::Status>) -> bool,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let read = get_incident(client, rrid, false).await;
        if wanted(&read) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: last read {read:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn replay(replica: &PrivateCluster, paused: bool) {
    let mut connection = PgConnection::connect(&replica.url()).await.unwrap();
    let statement = if paused {
        "SELECT pg_wal_replay_pause()"
    } else {
        "SELECT pg_wal_replay_resume()"
    };
    connection.execute(statement).await.unwrap();
}

#[tokio::test]
async fn reads_use_the_replica_ask_for_the_primary_and_survive_its_outage() {
    let primary = PrivateCluster::start();
    let replica = PrivateCluster::replica_of(&primary);
    let mut settings = test_settings(primary.url());
    settings.database.read_replica_url = Some(SecretString::from(replica.url()));
    let app = spawn_with_settings(settings, local_model()).await;
    let mut audit = app.audit_client().await;
    let mut incidents = IncidentQueryClient::new(app.channel().await);

    audit
        .write_audit(write(remediation_event("rr-replicated")))
        .await
        .unwrap();
    eventually(
        &mut incidents,
        "rr-replicated",
        "the write reaches the replica",
        Result::is_ok,
    )
    .await;

    // With replay paused the replica stops at what it has: a default read
    // misses the next write, a primary read sees it at once.
    replay(&replica, true).await;
    audit.write_audit(write(remediation_event("rr-lagging"))).await.unwrap();
    let missed = get_incident(&mut incidents, "rr-lagging", false).await.unwrap_err();
    assert_eq!(missed.code(), Code::NotFound, "default reads come from the replica");
    get_incident(&mut incidents, "rr-lagging", true)
        .await
        .expect("datastorage-read-from: primary reads the primary");
    replay(&replica, false).await;
    eventually(&mut incidents, "rr-lagging", "replay catches up", Result::is_ok).await;

    // The replica goes away: reads fall back to the primary, search included.
    replica.stop();
    audit
        .write_audit(write(remediation_event("rr-while-replica-down")))
        .await
        .unwrap();
    get_incident(&mut incidents, "rr-while-replica-down", false)
        .await
        .expect("reads fall back to the primary");
    let page = incidents
        .list_incidents(pb::ListIncidentsRequest::default())
        .await
        .expect("listing falls back too")
        .into_inner();
    assert_eq!(page.incidents.len(), 3);
    let hits = app
        .search_client()
        .await
        .search_similar(pb::SearchSimilarRequest {
            query: Some(pb::search_similar_request::Query::Text("container OOMKilled".into())),
            ..Default::default()
        })
        .await
        .expect("search falls back too")
        .into_inner()
        .hits;
    assert_eq!(hits.len(), 3);

    // Back up: once the monitor reaches it, default reads use it again
    // (shown by pausing replay once more).
    replica.restart();
    eventually(
        &mut incidents,
        "rr-while-replica-down",
        "the restarted replica catches up",
        Result::is_ok,
    )
    .await;
    replay(&replica, true).await;
    audit
        .write_audit(write(remediation_event("rr-after-restart")))
        .await
        .unwrap();
    eventually(
        &mut incidents,
        "rr-after-restart",
        "default reads return to the replica",
        |read| matches!(read, Err(status) if status.code() == Code::NotFound),
    )
    .await;
    replay(&replica, false).await;
}
