//! Who is calling, and what they may do.
//!
//! A call's bearer token is verified into a [`Principal`] once, by the gRPC
//! gate (`grpc::middleware`); handlers read it from the request extensions.
//! Which scope each RPC needs is one table ([`policy`]); an RPC missing from
//! it is refused, so a new RPC cannot ship unguarded.
pub mod policy;
pub mod token;

use std::{collections::BTreeSet, fmt, sync::Arc};

use crate::config::AuthSettings;

/// A permission a token grants, named as in the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    AuditWrite,
    AuditAdmin,
    AuditExport,
    IncidentsRead,
    SearchRead,
    JobsRead,
    JobsAdmin,
}

impl Scope {
    pub const ALL: [Scope; 7] = [
        Scope::AuditWrite,
        Scope::AuditAdmin,
        Scope::AuditExport,
        Scope::IncidentsRead,
        Scope::SearchRead,
        Scope::JobsRead,
        Scope::JobsAdmin,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::AuditWrite => "audit:write",
            Scope::AuditAdmin => "audit:admin",
            Scope::AuditExport => "audit:export",
            Scope::IncidentsRead => "incidents:read",
            Scope::SearchRead => "search:read",
            Scope::JobsRead => "jobs:read",
            Scope::JobsAdmin => "jobs:admin",
        }
    }

    pub fn parse(name: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|scope| scope.as_str() == name)
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An authenticated caller. Its subject is recorded as the `source` of what
/// it writes and the `created_by` of the jobs it starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    subject: String,
    scopes: BTreeSet<Scope>,
}

impl Principal {
    pub fn new(subject: impl Into<String>, scopes: impl IntoIterator<Item = Scope>) -> Self {
        Principal {
            subject: subject.into(),
            scopes: scopes.into_iter().collect(),
        }
    }

    /// The caller of a server that runs with `auth.disabled`.
    pub fn anonymous() -> Self {
        Principal::new("anonymous", Scope::ALL)
    }

    pub fn subject(&self) -> &str {
        &self.subject
    }

    pub fn has(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope)
    }
}

/// Why a call could not be authenticated. The reason goes to the client as
/// `ErrorInfo.reason`; the detail is logged, never sent (it can echo token parts).
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no bearer token")]
    MissingToken,
    #[error("invalid token: {0}")]
    InvalidToken(String),
    /// The keys that would verify the token cannot be fetched now.
    #[error("verification keys unavailable: {0}")]
    KeysUnavailable(String),
}

impl AuthError {
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::MissingToken => "TOKEN_MISSING",
            AuthError::InvalidToken(_) => "TOKEN_INVALID",
            AuthError::KeysUnavailable(_) => "KEYS_UNAVAILABLE",
        }
    }
}

/// Turns a call's bearer token (if any) into a principal.
#[async_trait::async_trait]
pub trait Authenticator: Send + Sync {
    async fn authenticate(&self, bearer_token: Option<&str>) -> Result<Principal, AuthError>;
}

/// `auth.disabled`: everyone is [`Principal::anonymous`].
pub struct NoAuthentication;

#[async_trait::async_trait]
impl Authenticator for NoAuthentication {
    async fn authenticate(&self, _bearer_token: Option<&str>) -> Result<Principal, AuthError> {
        Ok(Principal::anonymous())
    }
}

/// The authenticator the settings ask for; fails on unreadable keys.
pub fn authenticator_from_settings(settings: &AuthSettings) -> anyhow::Result<Arc<dyn Authenticator>> {
    if settings.disabled {
        tracing::warn!(
            "AUTHENTICATION IS DISABLED (auth.disabled = true): every caller may do everything, \
             and events are recorded with source \"anonymous\". Never run a shared deployment this way."
        );
        return Ok(Arc::new(NoAuthentication));
    }
    Ok(Arc::new(token::JwtAuthenticator::from_settings(settings)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_names_round_trip() {
        for scope in Scope::ALL {
            assert_eq!(Scope::parse(scope.as_str()), Some(scope));
        }
        assert_eq!(Scope::parse("audit:*"), None);
    }
}
