//! Readiness follows PostgreSQL: a monitor probes it (reachable, migrations
//! current) and flips the gRPC health service and the HTTP `/readyz`
//! endpoint together, back to SERVING by itself once the database serves
//! again. Shutdown turns both off for good.
//!
//! With the outage queue, an unreachable PostgreSQL does not take the replica
//! out of the load balancer while Redis can take writes: `""` and AuditWrite
//! stay SERVING (writes are answered QUEUED), the read services turn
//! NOT_SERVING, and `/readyz` says the replica is degraded.
use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU8, Ordering},
        Arc,
    },
    time::Duration,
};

use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Router};
use tonic_health::{server::HealthReporter, ServingStatus};

use crate::{
    outage::OutageQueue,
    storage::{DatabaseState, Storage},
};

/// Fully-qualified names of the gRPC services this build serves.
pub const SERVED_SERVICES: &[&str] = &[
    "datastorage.v1.AuditWrite",
    "datastorage.v1.IncidentQuery",
    "datastorage.v1.VectorSearch",
    "datastorage.v1.JobStatus",
];

const STARTING: u8 = 0;
const READY: u8 = 1;
const UNREACHABLE: u8 = 2;
const MIGRATIONS_PENDING: u8 = 3;
const SHUTTING_DOWN: u8 = 4;
const WRITES_QUEUED: u8 = 5;

const AUDIT_WRITE: &str = "datastorage.v1.AuditWrite";

#[derive(Clone)]
pub struct Readiness(Arc<AtomicU8>);

impl Default for Readiness {
    fn default() -> Self {
        Readiness(Arc::new(AtomicU8::new(STARTING)))
    }
}

impl Readiness {
    pub fn is_ready(&self) -> bool {
        matches!(self.0.load(Ordering::Relaxed), READY | WRITES_QUEUED)
    }

    /// Not ready from now on, whatever the database says.
    pub fn shut_down(&self) {
        self.0.store(SHUTTING_DOWN, Ordering::Relaxed);
    }

    fn record(&self, state: Serving) -> bool {
        let value = match state {
            Serving::Ready => READY,
            Serving::WritesQueued => WRITES_QUEUED,
            Serving::Down(DatabaseState::MigrationsPending) => MIGRATIONS_PENDING,
            Serving::Down(_) => UNREACHABLE,
        };
        self.0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |current| {
                (current != SHUTTING_DOWN).then_some(value)
            })
            .is_ok()
    }

    fn explain(&self) -> &'static str {
        match self.0.load(Ordering::Relaxed) {
            READY => "ready\n",
            UNREACHABLE => "database unreachable\n",
            MIGRATIONS_PENDING => "database migrations pending\n",
            SHUTTING_DOWN => "shutting down\n",
            WRITES_QUEUED => "degraded: database unreachable, writes go to the outage queue\n",
            _ => "starting\n",
        }
    }
}

pub async fn set_all(reporter: &HealthReporter, status: ServingStatus) {
    reporter.set_service_status("", status).await;
    for service in SERVED_SERVICES {
        reporter.set_service_status(*service, status).await;
    }
}

/// What this replica can do, as the monitor last found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Serving {
    Ready,
    /// PostgreSQL is unreachable but the outage queue takes writes.
    WritesQueued,
    Down(DatabaseState),
}

/// Probes PostgreSQL (and, while it is unreachable, the outage queue) every
/// `interval` and reports transitions.
pub async fn monitor(
    storage: Storage,
    outage_queue: Option<std::sync::Arc<OutageQueue>>,
    reporter: HealthReporter,
    readiness: Readiness,
    interval: Duration,
) {
    let mut last = None;
    loop {
        let serving = match storage.probe().await {
            DatabaseState::Ready => Serving::Ready,
            DatabaseState::Unreachable if outage_queue.as_ref().is_some_and(|q| q.accepts_writes()) => {
                Serving::WritesQueued
            }
            down => Serving::Down(down),
        };
        if last != Some(serving) {
            if !readiness.record(serving) {
                return;
            }
            match serving {
                Serving::Ready => tracing::info!("PostgreSQL ready: SERVING"),
                Serving::WritesQueued => {
                    tracing::warn!("PostgreSQL unreachable: writes go to the outage queue; reads NOT_SERVING")
                }
                Serving::Down(DatabaseState::MigrationsPending) => {
                    tracing::warn!("database migrations pending (run `datastorage migrate`): NOT_SERVING")
                }
                Serving::Down(_) => tracing::warn!("PostgreSQL unreachable: NOT_SERVING"),
            }
            match serving {
                Serving::Ready => set_all(&reporter, ServingStatus::Serving).await,
                Serving::WritesQueued => {
                    // Each service straight to its status: no moment where "" reads NOT_SERVING.
                    reporter.set_service_status("", ServingStatus::Serving).await;
                    for service in SERVED_SERVICES {
                        let status = if *service == AUDIT_WRITE {
                            ServingStatus::Serving
                        } else {
                            ServingStatus::NotServing
                        };
                        reporter.set_service_status(*service, status).await;
                    }
                }
                Serving::Down(_) => set_all(&reporter, ServingStatus::NotServing).await,
            }
            last = Some(serving);
        }
        tokio::time::sleep(interval).await;
    }
}

/// `/healthz`: the process is up. `/readyz`: PostgreSQL serves this build's
/// schema and the server is not shutting down. `/metrics`: Prometheus text.
pub fn http_router(readiness: Readiness) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(|State(readiness): State<Readiness>| async move {
                let code = if readiness.is_ready() {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                (code, readiness.explain())
            }),
        )
        .route(
            "/metrics",
            get(|| async {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    crate::metrics::render(),
                )
                    .into_response()
            }),
        )
        .with_state(readiness)
}

pub async fn serve_http(listener: tokio::net::TcpListener, readiness: Readiness) -> std::io::Result<()> {
    let address: SocketAddr = listener.local_addr()?;
    tracing::info!(%address, "HTTP health and metrics listening");
    axum::serve(listener, http_router(readiness)).await
}
