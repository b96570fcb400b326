//! The core's error type: named by what the caller can do about it, mapped to a
//! gRPC status in exactly one place (`grpc::status`).
use std::time::Duration;

use crate::{auth::Scope, domain::Violations};

#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// The request broke a rule of the contract; each violation names its field.
    #[error("invalid request: {0}")]
    InvalidInput(Violations),
    #[error("{0} not found")]
    NotFound(String),
    /// An idempotency key was reused for a different request.
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    /// A dependency (PostgreSQL, the embedding provider) cannot serve now; retrying later may work.
    #[error("{what} is unavailable")]
    Unavailable {
        what: &'static str,
        #[source]
        source: anyhow::Error,
    },
    /// The call carries no valid credentials; `reason` is the ErrorInfo reason.
    #[error("unauthenticated ({reason})")]
    Unauthenticated { reason: &'static str },
    /// The caller is known but lacks the scope the RPC needs.
    #[error("missing scope {required}")]
    PermissionDenied { required: Scope },
    /// The caller's rate limit is spent; it may call again after `retry_after`.
    #[error("rate limited")]
    RateLimited { retry_after: Duration },
    /// Every call slot of this replica is taken: shed rather than queued.
    #[error("overloaded")]
    Overloaded,
    /// The call's deadline (the caller's, or the server's default) passed.
    #[error("deadline exceeded")]
    DeadlineExceeded { after: Duration },
    /// A bug or an unexpected state; the cause is logged, never sent to the client.
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl CoreError {
    pub fn database(error: sqlx::Error) -> Self {
        if is_unavailability(&error) {
            CoreError::Unavailable {
                what: "database",
                source: error.into(),
            }
        } else {
            CoreError::Internal(error.into())
        }
    }

    /// PostgreSQL could not be reached or cannot serve now.
    pub fn is_database_unavailable(&self) -> bool {
        matches!(self, CoreError::Unavailable { what: "database", .. })
    }

    /// Deadlocks and serialization failures: the transaction can be retried as a whole.
    pub fn is_retryable_conflict(error: &sqlx::Error) -> bool {
        matches!(sqlstate(error).as_deref(), Some("40001" | "40P01"))
    }
}

fn sqlstate(error: &sqlx::Error) -> Option<String> {
    match error {
        sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
        _ => None,
    }
}

/// Errors that say "the database cannot serve now" rather than "this request is wrong":
/// lost connections, a full pool, a shutting-down, read-only or out-of-space server.
fn is_unavailability(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(_) => {
            let code = sqlstate(error).unwrap_or_default();
            // 08: connection exception, 53: insufficient resources (disk full),
            // 57P0x: server shutting down, 25006: read-only transaction.
            code.starts_with("08") || code.starts_with("53") || code.starts_with("57P0") || code == "25006"
        }
        _ => false,
    }
}
