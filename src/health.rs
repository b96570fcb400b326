//! Readiness follows PostgreSQL: a monitor probes it and flips the gRPC health
//! service and the HTTP `/readyz` endpoint together, back to SERVING by itself
//! once the database answers again.
use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use axum::{extract::State, http::StatusCode, routing::get, Router};
use tonic_health::{server::HealthReporter, ServingStatus};

use crate::storage::Storage;

/// Fully-qualified names of the gRPC services this build serves.
pub const SERVED_SERVICES: &[&str] = &[
    "datastorage.v1.AuditWrite",
    "datastorage.v1.IncidentQuery",
    "datastorage.v1.VectorSearch",
    "datastorage.v1.JobStatus",
];

#[derive(Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

pub async fn set_all(reporter: &HealthReporter, status: ServingStatus) {
    reporter.set_service_status("", status).await;
    for service in SERVED_SERVICES {
        reporter.set_service_status(*service, status).await;
    }
}

/// Probes PostgreSQL every `interval` and reports transitions.
pub async fn monitor(storage: Storage, reporter: HealthReporter, readiness: Readiness, interval: Duration) {
    let mut last = None;
    loop {
        let reachable = storage.is_reachable().await;
        if last != Some(reachable) {
            if reachable {
                tracing::info!("PostgreSQL reachable: SERVING");
            } else {
                tracing::warn!("PostgreSQL unreachable: NOT_SERVING");
            }
            readiness.0.store(reachable, Ordering::Relaxed);
            let status = if reachable {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            set_all(&reporter, status).await;
            last = Some(reachable);
        }
        tokio::time::sleep(interval).await;
    }
}

/// `/healthz`: the process is up. `/readyz`: PostgreSQL is reachable.
pub fn http_router(readiness: Readiness) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(|State(readiness): State<Readiness>| async move {
                if readiness.is_ready() {
                    (StatusCode::OK, "ready\n")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "database unreachable\n")
                }
            }),
        )
        .with_state(readiness)
}

pub async fn serve_http(listener: tokio::net::TcpListener, readiness: Readiness) -> std::io::Result<()> {
    let address: SocketAddr = listener.local_addr()?;
    tracing::info!(%address, "HTTP health listening");
    axum::serve(listener, http_router(readiness)).await
}
