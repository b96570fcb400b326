//! A database that refuses writes (read-only, as a primary demoted or a
//! disk-full guard would make it) answers UNAVAILABLE with RetryInfo, stores
//! nothing, keeps reads working, and is written to again once it accepts
//! writes.
use datastorage::proto::v1 as pb;
use sqlx::{AssertSqlSafe, Connection, Executor, PgConnection};
use tonic::Code;
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
