//! JWT verification with jsonwebtoken.
//!
//! Every key is pinned to one algorithm, and a token is only checked with a
//! key of the algorithm its header names: `alg: none` does not parse, and an
//! HS256 token signed with an RSA public key (algorithm confusion) finds no
//! HS256 key under that `kid`. HMAC keys are never taken from a JWKS.
use std::{
    collections::HashMap,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Context;
use jsonwebtoken::{
    decode, decode_header,
    jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet},
    Algorithm, DecodingKey, Validation,
};
use secrecy::ExposeSecret;
use serde::Deserialize;
use tokio::sync::RwLock;

use super::{AuthError, Authenticator, Principal, Scope};
use crate::config::AuthSettings;

/// The asymmetric algorithms a configured public key may be pinned to.
pub fn asymmetric_algorithm(name: &str) -> Option<Algorithm> {
    use Algorithm::*;
    let algorithm: Algorithm = name.parse().ok()?;
    matches!(algorithm, RS256 | RS384 | RS512 | PS256 | PS384 | PS512 | ES256 | ES384).then_some(algorithm)
}

#[derive(Clone)]
struct VerificationKey {
    /// A key without a kid serves any token; one with a kid only tokens naming it.
    kid: Option<String>,
    algorithm: Algorithm,
    key: DecodingKey,
}

impl VerificationKey {
    fn serves(&self, kid: Option<&str>) -> bool {
        self.kid.is_none() || self.kid.as_deref() == kid
    }
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    /// RFC 8693: space-separated; some issuers send a list.
    #[serde(default)]
    scope: Option<ScopeClaim>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ScopeClaim {
    Spaced(String),
    List(Vec<String>),
}

impl ScopeClaim {
    fn scopes(&self) -> Vec<Scope> {
        let names: Vec<&str> = match self {
            ScopeClaim::Spaced(spaced) => spaced.split_whitespace().collect(),
            ScopeClaim::List(list) => list.iter().map(String::as_str).collect(),
        };
        // Scopes of other services share tokens with ours: ignored, not errors.
        names.into_iter().filter_map(Scope::parse).collect()
    }
}

pub struct JwtAuthenticator {
    validation: Validation,
    static_keys: Vec<VerificationKey>,
    jwks: Option<JwksCache>,
    subject_scopes: HashMap<String, Vec<Scope>>,
}

impl JwtAuthenticator {
    pub fn from_settings(settings: &AuthSettings) -> anyhow::Result<Self> {
        let mut static_keys = Vec::new();
        if let Some(secret) = &settings.hs256_secret {
            static_keys.push(VerificationKey {
                kid: None,
                algorithm: Algorithm::HS256,
                key: DecodingKey::from_secret(secret.expose_secret().as_bytes())
                    .context("auth.hs256_secret is not a usable HMAC key")?,
            });
        }
        for (index, configured) in settings.public_keys.iter().enumerate() {
            let algorithm = asymmetric_algorithm(&configured.algorithm)
                .with_context(|| format!("auth.public_keys[{index}].algorithm"))?;
            let key = read_public_key(&configured.pem_file, algorithm)
                .with_context(|| format!("auth.public_keys[{index}] ({})", configured.pem_file.display()))?;
            static_keys.push(VerificationKey {
                kid: configured.kid.clone(),
                algorithm,
                key,
            });
        }
        let jwks = settings
            .jwks_url
            .as_ref()
            .map(|url| JwksCache::new(url, settings))
            .transpose()?;

        // Placeholder algorithm: each verification sets the key's own.
        let mut validation = Validation::new(Algorithm::RS256);
        validation.set_issuer(&[&settings.issuer]);
        validation.set_audience(&settings.audiences);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = settings.leeway_secs;
        validation.validate_nbf = true;

        let subject_scopes = settings
            .subject_scopes
            .iter()
            .map(|(subject, names)| {
                let scopes = names.iter().filter_map(|name| Scope::parse(name)).collect();
                (subject.clone(), scopes)
            })
            .collect();
        Ok(JwtAuthenticator {
            validation,
            static_keys,
            jwks,
            subject_scopes,
        })
    }

    async fn key_for(&self, kid: Option<&str>, algorithm: Algorithm) -> Result<VerificationKey, AuthError> {
        let mut candidates: Vec<VerificationKey> = self.static_keys.iter().filter(|k| k.serves(kid)).cloned().collect();
        // A configured key that verifies this algorithm needs no JWKS (nor its availability).
        if let Some(key) = candidates.iter().find(|k| k.algorithm == algorithm) {
            return Ok(key.clone());
        }
        if let (Some(jwks), Some(kid)) = (&self.jwks, kid) {
            if let Some(key) = jwks.key(kid).await? {
                candidates.push(key);
            }
        }
        if candidates.is_empty() {
            return Err(AuthError::InvalidToken(format!("no key with kid {kid:?}")));
        }
        candidates
            .into_iter()
            .find(|k| k.algorithm == algorithm)
            .ok_or_else(|| AuthError::InvalidToken(format!("algorithm {algorithm:?} is not allowed for kid {kid:?}")))
    }
}

#[async_trait::async_trait]
impl Authenticator for JwtAuthenticator {
    async fn authenticate(&self, bearer_token: Option<&str>) -> Result<Principal, AuthError> {
        let token = bearer_token.ok_or(AuthError::MissingToken)?;
        let header = decode_header(token).map_err(|e| AuthError::InvalidToken(format!("header: {e}")))?;
        let key = self.key_for(header.kid.as_deref(), header.alg).await?;
        let mut validation = self.validation.clone();
        validation.algorithms = vec![key.algorithm];
        let claims = decode::<Claims>(token, &key.key, &validation)
            .map_err(|e| AuthError::InvalidToken(e.to_string()))?
            .claims;
        if claims.sub.is_empty() {
            return Err(AuthError::InvalidToken("empty sub".into()));
        }
        let mut scopes = claims.scope.as_ref().map(ScopeClaim::scopes).unwrap_or_default();
        if let Some(mapped) = self.subject_scopes.get(&claims.sub) {
            scopes.extend(mapped);
        }
        Ok(Principal::new(claims.sub, scopes))
    }
}

fn read_public_key(path: &Path, algorithm: Algorithm) -> anyhow::Result<DecodingKey> {
    let pem = std::fs::read(path)?;
    let key = match algorithm {
        Algorithm::ES256 | Algorithm::ES384 => DecodingKey::from_ec_pem(&pem)?,
        _ => DecodingKey::from_rsa_pem(&pem)?,
    };
    Ok(key)
}

/// The issuer's JWKS, fetched lazily, kept for `jwks_refresh_secs`, and
/// fetched again early when a token names an unknown `kid` (the issuer
/// rotated its key), at most once per `jwks_min_refresh_secs`.
struct JwksCache {
    url: String,
    client: reqwest::Client,
    bearer_token_file: Option<std::path::PathBuf>,
    refresh_every: Duration,
    min_refresh: Duration,
    state: RwLock<JwksState>,
    /// One fetch at a time; the state lock is never held across one.
    refreshing: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct JwksState {
    keys: HashMap<String, VerificationKey>,
    fetched_at: Option<Instant>,
    attempted_at: Option<Instant>,
}

impl JwksCache {
    fn new(url: &str, settings: &AuthSettings) -> anyhow::Result<Self> {
        let mut client = reqwest::Client::builder().timeout(Duration::from_secs(5));
        if let Some(ca) = &settings.jwks_ca_file {
            let pem = std::fs::read(ca).with_context(|| format!("auth.jwks_ca_file ({})", ca.display()))?;
            client = client.add_root_certificate(reqwest::Certificate::from_pem(&pem).context("auth.jwks_ca_file")?);
        }
        Ok(JwksCache {
            url: url.to_owned(),
            client: client.build()?,
            bearer_token_file: settings.jwks_bearer_token_file.clone(),
            refresh_every: Duration::from_secs(settings.jwks_refresh_secs),
            min_refresh: Duration::from_secs(settings.jwks_min_refresh_secs),
            state: RwLock::new(JwksState::default()),
            refreshing: tokio::sync::Mutex::new(()),
        })
    }

    /// The key for `kid`. A known key is answered from memory, also while a
    /// refresh runs or the issuer is down; an unknown kid waits for a fetch
    /// when one may run, else is unknown (or the keys unavailable, before any
    /// fetch has succeeded).
    async fn key(&self, kid: &str) -> Result<Option<VerificationKey>, AuthError> {
        let known = {
            let state = self.state.read().await;
            match self.decide(&state, kid) {
                Lookup::Answer(answer) => return answer,
                Lookup::Refresh { known } => known,
            }
        };
        let _refreshing = match known {
            // Stale but usable: refresh if nobody else is, else use it now.
            Some(key) => match self.refreshing.try_lock() {
                Ok(guard) => guard,
                Err(_) => return Ok(Some(key)),
            },
            None => self.refreshing.lock().await,
        };
        // Another caller may have refreshed while this one waited.
        {
            let mut state = self.state.write().await;
            if let Lookup::Answer(answer) = self.decide(&state, kid) {
                return answer;
            }
            state.attempted_at = Some(Instant::now());
        }
        let fetched = self.fetch().await;
        let mut state = self.state.write().await;
        match fetched {
            Ok(keys) if !keys.is_empty() => {
                tracing::info!(url = %self.url, keys = keys.len(), "fetched JWKS");
                state.keys = keys;
                state.fetched_at = Some(Instant::now());
            }
            // A set with no usable key would lock every caller out; the last
            // good keys keep serving, as they do while the issuer is down.
            Ok(_) => tracing::warn!(url = %self.url, "the JWKS holds no usable key; keeping the last good keys"),
            Err(error) => tracing::warn!(url = %self.url, error = format!("{error:#}"), "JWKS fetch failed"),
        }
        match state.keys.get(kid) {
            Some(key) => Ok(Some(key.clone())),
            None if state.fetched_at.is_none() => Err(AuthError::KeysUnavailable(format!("no JWKS from {}", self.url))),
            None => Ok(None),
        }
    }

    fn decide(&self, state: &JwksState, kid: &str) -> Lookup {
        let stale = state.fetched_at.is_none_or(|at| at.elapsed() >= self.refresh_every);
        let may_fetch = state.attempted_at.is_none_or(|at| at.elapsed() >= self.min_refresh);
        let known = state.keys.get(kid).cloned();
        match (known, may_fetch) {
            (Some(key), false) => Lookup::Answer(Ok(Some(key))),
            (Some(key), true) if !stale => Lookup::Answer(Ok(Some(key))),
            (known, true) => Lookup::Refresh { known },
            (None, false) if state.fetched_at.is_none() => Lookup::Answer(Err(AuthError::KeysUnavailable(format!(
                "no JWKS from {} yet",
                self.url
            )))),
            (None, false) => Lookup::Answer(Ok(None)),
        }
    }

    async fn fetch(&self) -> anyhow::Result<HashMap<String, VerificationKey>> {
        let mut request = self.client.get(&self.url);
        if let Some(path) = &self.bearer_token_file {
            let token = std::fs::read_to_string(path)
                .with_context(|| format!("reading auth.jwks_bearer_token_file ({})", path.display()))?;
            request = request.bearer_auth(token.trim());
        }
        let set: JwkSet = request
            .send()
            .await?
            .error_for_status()?
            .json()
            .await
            .context("decoding the JWKS")?;
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            let Some(kid) = jwk.common.key_id.clone() else { continue };
            let Some(algorithm) = jwk_algorithm(jwk) else {
                tracing::debug!(kid, "skipping a JWKS key of an algorithm this service does not accept");
                continue;
            };
            match DecodingKey::from_jwk(jwk) {
                Ok(key) => {
                    keys.insert(
                        kid.clone(),
                        VerificationKey {
                            kid: Some(kid),
                            algorithm,
                            key,
                        },
                    );
                }
                Err(error) => tracing::warn!(kid, %error, "skipping an unreadable JWKS key"),
            }
        }
        Ok(keys)
    }
}

enum Lookup {
    Answer(Result<Option<VerificationKey>, AuthError>),
    /// A fetch may run; `known` is the (stale) key to fall back on.
    Refresh {
        known: Option<VerificationKey>,
    },
}

/// The algorithm a JWK verifies: its `alg`, else the usual one for its key
/// type. Symmetric keys are refused whatever they claim.
fn jwk_algorithm(jwk: &Jwk) -> Option<Algorithm> {
    if let Some(declared) = jwk.common.key_algorithm {
        return asymmetric_algorithm(&declared.to_string());
    }
    match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Some(Algorithm::RS256),
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => Some(Algorithm::ES256),
            EllipticCurve::P384 => Some(Algorithm::ES384),
            _ => None,
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_asymmetric_algorithms_can_be_pinned_to_public_keys() {
        assert_eq!(asymmetric_algorithm("RS256"), Some(Algorithm::RS256));
        assert_eq!(asymmetric_algorithm("ES256"), Some(Algorithm::ES256));
        assert_eq!(asymmetric_algorithm("HS256"), None);
        assert_eq!(asymmetric_algorithm("none"), None);
    }

    #[test]
    fn scope_claims_may_be_spaced_or_listed_and_foreign_scopes_are_ignored() {
        let spaced: ScopeClaim = serde_json::from_str(r#""audit:write  search:read other:thing""#).unwrap();
        assert_eq!(spaced.scopes(), vec![Scope::AuditWrite, Scope::SearchRead]);
        let listed: ScopeClaim = serde_json::from_str(r#"["jobs:admin"]"#).unwrap();
        assert_eq!(listed.scopes(), vec![Scope::JobsAdmin]);
    }
}
