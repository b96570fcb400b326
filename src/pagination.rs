//! Page tokens: opaque to callers, signed so they cannot be forged or edited.
//!
//! A token is `base64url(body) "." base64url(HMAC-SHA256(key, body))`. The
//! body names the listing it belongs to (which RPC, a fingerprint of the
//! filter and order), the snapshot its first page pinned, when that first page
//! was served (tokens expire a fixed time after it), and the last row returned.
use std::time::Duration;

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::{
    domain::{Cursor, PagePosition, Violations},
    error::CoreError,
};

type HmacSha256 = Hmac<Sha256>;

const TOKEN_VERSION: u8 = 1;

/// Which listing a token continues; a token of one is refused by the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Listing {
    Incidents,
    AuditEvents,
    LegalHolds,
}

#[derive(Serialize, Deserialize)]
struct TokenBody {
    v: u8,
    listing: Listing,
    /// SHA-256 of the listing's parameters (filter, order), hex.
    params: String,
    /// Unix seconds of the first page.
    started: i64,
    snapshot: String,
    at_micros: i64,
    id: Uuid,
}

/// Issues and opens page tokens with one server key.
#[derive(Clone)]
pub struct PageTokens {
    key: Vec<u8>,
    ttl: Duration,
}

/// A listing's continuation once its token has been checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Continuation {
    pub position: PagePosition,
    pub started: DateTime<Utc>,
}

impl PageTokens {
    /// With no configured key, a random one: tokens then die with the process.
    pub fn new(key: Option<&SecretString>, ttl: Duration) -> anyhow::Result<Self> {
        let key = match key {
            Some(key) => key.expose_secret().as_bytes().to_vec(),
            None => {
                tracing::warn!(
                    "query.page_token_key is not set: page tokens are signed with a random key and do not survive \
                     a restart or work across replicas"
                );
                let mut key = vec![0u8; 32];
                getrandom::fill(&mut key).map_err(|e| anyhow::anyhow!("no randomness for the page-token key: {e}"))?;
                key
            }
        };
        Ok(PageTokens { key, ttl })
    }

    /// A fingerprint of a listing's parameters, for `issue` and `open`.
    pub fn fingerprint(params: &impl Serialize) -> String {
        let bytes = serde_json::to_vec(params).expect("listing parameters serialise");
        hex(&Sha256::digest(bytes))
    }

    pub fn issue(
        &self,
        listing: Listing,
        params: &str,
        started: DateTime<Utc>,
        snapshot: &str,
        after: Cursor,
    ) -> String {
        let body = TokenBody {
            v: TOKEN_VERSION,
            listing,
            params: params.to_owned(),
            started: started.timestamp(),
            snapshot: snapshot.to_owned(),
            at_micros: after.at.timestamp_micros(),
            id: after.id,
        };
        let body = serde_json::to_vec(&body).expect("token body serialises");
        let tag = self.mac(&body).finalize().into_bytes();
        format!("{}.{}", URL_SAFE_NO_PAD.encode(&body), URL_SAFE_NO_PAD.encode(tag))
    }

    /// Checks a token against the listing it is presented to. Every failure is
    /// the same INVALID_ARGUMENT on `field`, worded for the caller.
    pub fn open(
        &self,
        field: &str,
        token: &str,
        listing: Listing,
        params: &str,
        now: DateTime<Utc>,
    ) -> Result<Continuation, CoreError> {
        let invalid = |why: &str| CoreError::InvalidInput(Violations::single(field, why));
        let (body, tag) = token
            .split_once('.')
            .and_then(|(body, tag)| Some((URL_SAFE_NO_PAD.decode(body).ok()?, URL_SAFE_NO_PAD.decode(tag).ok()?)))
            .ok_or_else(|| invalid("is not a page token issued by this service"))?;
        self.mac(&body)
            .verify_slice(&tag)
            .map_err(|_| invalid("is not a page token issued by this service"))?;
        let body: TokenBody =
            serde_json::from_slice(&body).map_err(|_| invalid("is not a page token issued by this service"))?;
        if body.v != TOKEN_VERSION || body.listing != listing {
            return Err(invalid("belongs to a different listing"));
        }
        if body.params != params {
            return Err(invalid(
                "was issued for a different filter or order; keep them unchanged while paging, or start again without a token",
            ));
        }
        let started = DateTime::from_timestamp(body.started, 0).ok_or_else(|| invalid("is malformed"))?;
        let expires = started + chrono::Duration::from_std(self.ttl).unwrap_or(chrono::Duration::MAX);
        if now >= expires {
            return Err(invalid("has expired; start the listing again without a token"));
        }
        let at = DateTime::from_timestamp_micros(body.at_micros).ok_or_else(|| invalid("is malformed"))?;
        Ok(Continuation {
            position: PagePosition {
                snapshot: body.snapshot,
                after: Some(Cursor { at, id: body.id }),
            },
            started,
        })
    }

    fn mac(&self, body: &[u8]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes keys of any length");
        mac.update(body);
        mac
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(key: &str) -> PageTokens {
        PageTokens::new(Some(&SecretString::from(key.to_owned())), Duration::from_secs(3600)).unwrap()
    }

    fn cursor() -> Cursor {
        Cursor {
            at: DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap(),
            id: Uuid::from_u128(42),
        }
    }

    fn field_of(error: CoreError) -> String {
        match error {
            CoreError::InvalidInput(v) => v.iter().next().unwrap().field.clone(),
            other => panic!("expected InvalidInput, got {other:?}"),
        }
    }

    #[test]
    fn a_token_round_trips_to_its_position() {
        let t = tokens("k".repeat(32).as_str());
        let now = Utc::now();
        let token = t.issue(Listing::Incidents, "p", now, "77:80:", cursor());
        let opened = t.open("page_token", &token, Listing::Incidents, "p", now).unwrap();
        assert_eq!(opened.position.snapshot, "77:80:");
        assert_eq!(opened.position.after, Some(cursor()));
    }

    #[test]
    fn edited_foreign_misplaced_and_expired_tokens_are_refused() {
        let t = tokens("k".repeat(32).as_str());
        let now = Utc::now();
        let token = t.issue(Listing::Incidents, "p", now, "77:80:", cursor());
        let mut edited = token.clone().into_bytes();
        edited[5] = if edited[5] == b'A' { b'B' } else { b'A' };
        let edited = String::from_utf8(edited).unwrap();
        let foreign = tokens("x".repeat(32).as_str()).issue(Listing::Incidents, "p", now, "77:80:", cursor());
        for bad in [edited.as_str(), foreign.as_str(), "", "garbage", "a.b"] {
            let error = t.open("page_token", bad, Listing::Incidents, "p", now).unwrap_err();
            assert_eq!(field_of(error), "page_token", "token {bad:?}");
        }
        assert!(t.open("page_token", &token, Listing::AuditEvents, "p", now).is_err());
        assert!(t.open("page_token", &token, Listing::Incidents, "other", now).is_err());
        let later = now + chrono::Duration::hours(1);
        assert!(t.open("page_token", &token, Listing::Incidents, "p", later).is_err());
        assert!(t
            .open(
                "page_token",
                &token,
                Listing::Incidents,
                "p",
                later - chrono::Duration::seconds(2)
            )
            .is_ok());
    }

    proptest::proptest! {
        /// Fuzz target for page token decoding (see `grpc::fuzz` for why
        /// proptest): no string but an issued token opens.
        #[test]
        fn any_string_is_refused_without_panicking(token in ".{0,400}") {
            let t = tokens("k".repeat(32).as_str());
            proptest::prop_assert!(t.open("page_token", &token, Listing::Incidents, "p", Utc::now()).is_err());
        }

        #[test]
        fn every_edit_of_an_issued_token_is_refused(
            at in proptest::prelude::any::<proptest::sample::Index>(),
            byte in proptest::prelude::any::<u8>(),
        ) {
            let t = tokens("k".repeat(32).as_str());
            let now = Utc::now();
            let mut edited = t.issue(Listing::Incidents, "p", now, "77:80:", cursor()).into_bytes();
            let at = at.index(edited.len());
            proptest::prop_assume!(edited[at] != byte);
            edited[at] = byte;
            let edited = String::from_utf8_lossy(&edited).into_owned();
            proptest::prop_assert!(t.open("page_token", &edited, Listing::Incidents, "p", now).is_err());
        }
    }
}
