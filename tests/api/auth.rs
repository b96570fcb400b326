//! Authentication and scopes over the real server: every way a token can be
//! wrong gets UNAUTHENTICATED, a missing scope PERMISSION_DENIED, and a good
//! token's subject is what the event records as its source. The keys in
//! tests/fixtures are test-only, generated for these tests.
use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
};

use datastorage::{
    config::{PublicKeySettings, Settings},
    proto::v1::{self as pb, incident_query_client::IncidentQueryClient},
};
use jsonwebtoken::{jwk::Jwk, Algorithm, EncodingKey, Header};
use secrecy::SecretString;
use tonic::{metadata::MetadataValue, Code, Request, Status};
use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest};
use tonic_types::StatusExt;

use crate::helpers::*;

pub const ISSUER: &str = "https://issuer.test";
pub const HS_SECRET: &str = "a-test-only-hs256-secret-of-at-least-32-bytes";
const GATEWAY_SA: &str = "system:serviceaccount:kubernaut-system:gateway-sa";

pub fn fixture(name: &str) -> std::path::PathBuf {
    repo_dir().join("tests/fixtures").join(name)
}

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

/// Claims of a token valid for an hour; tests change what they need.
pub fn claims(sub: &str, scope: &str) -> serde_json::Value {
    serde_json::json!({
        "sub": sub,
        "iss": ISSUER,
        "aud": "datastorage",
        "iat": now(),
        "exp": now() + 3600,
        "scope": scope,
    })
}

pub fn hs256(claims: &serde_json::Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(HS_SECRET.as_bytes()).unwrap(),
    )
    .unwrap()
}

fn signed(algorithm: Algorithm, kid: &str, key: &EncodingKey, claims: &serde_json::Value) -> String {
    let mut header = Header::new(algorithm);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

fn rsa_key(name: &str) -> EncodingKey {
    EncodingKey::from_rsa_pem(&std::fs::read(fixture(name)).unwrap()).unwrap()
}

/// A server that trusts an HS256 secret, an RS256 key (kid rsa-1) and an
/// ES256 key (kid ec-1), and grants the gateway's service account audit:write.
fn with_keys(settings: &mut Settings) {
    settings.auth.disabled = false;
    settings.auth.issuer = ISSUER.into();
    settings.auth.hs256_secret = Some(SecretString::from(HS_SECRET));
    settings.auth.public_keys = vec![
        PublicKeySettings {
            kid: Some("rsa-1".into()),
            algorithm: "RS256".into(),
            pem_file: fixture("jwt-rsa-1.pub.pem"),
        },
        PublicKeySettings {
            kid: Some("ec-1".into()),
            algorithm: "ES256".into(),
            pem_file: fixture("jwt-ec.pub.pem"),
        },
    ];
    settings.auth.subject_scopes = BTreeMap::from([(GATEWAY_SA.to_owned(), vec!["audit:write".to_owned()])]);
}

pub fn with_token<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        MetadataValue::try_from(format!("Bearer {token}")).unwrap(),
    );
    request
}

fn error_reason(status: &Status) -> String {
    status
        .get_details_error_info()
        .map(|info| info.reason)
        .unwrap_or_default()
}

async fn write_with(app: &TestApp, token: Option<&str>, rrid: &str) -> Result<pb::WriteAuditResponse, Status> {
    let message = write(remediation_event(rrid));
    let request = match token {
        Some(token) => with_token(message, token),
        None => Request::new(message),
    };
    app.audit_client()
        .await
        .write_audit(request)
        .await
        .map(|r| r.into_inner())
}

async fn stored_source(app: &TestApp, event_id: &str) -> String {
    sqlx::query_scalar("SELECT source FROM audit_events WHERE id = $1::uuid")
        .bind(event_id)
        .fetch_one(&app.db)
        .await
        .unwrap()
}

#[tokio::test]
async fn each_kind_of_bad_token_is_unauthenticated_and_writes_nothing() {
    let app = spawn_app_with(with_keys, local_model()).await;
    let rsa_public_pem = std::fs::read(fixture("jwt-rsa-1.pub.pem")).unwrap();
    let unsigned = {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let header = b64.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let body = b64.encode(claims("mallory", "audit:write").to_string());
        format!("{header}.{body}.")
    };
    let mut expired = claims("gateway", "audit:write");
    expired["exp"] = (now() - 120).into();
    let mut not_yet = claims("gateway", "audit:write");
    not_yet["nbf"] = (now() + 600).into();
    let mut foreign_issuer = claims("gateway", "audit:write");
    foreign_issuer["iss"] = "https://someone-else.test".into();
    let mut foreign_audience = claims("gateway", "audit:write");
    foreign_audience["aud"] = "another-service".into();
    let mut no_expiry = claims("gateway", "audit:write");
    no_expiry.as_object_mut().unwrap().remove("exp");

    let cases: Vec<(&str, Option<String>, &str)> = vec![
        ("no token", None, "TOKEN_MISSING"),
        ("not a JWT", Some("not-a-jwt".into()), "TOKEN_INVALID"),
        (
            "signed with another secret",
            Some(
                jsonwebtoken::encode(
                    &Header::new(Algorithm::HS256),
                    &claims("gateway", "audit:write"),
                    &EncodingKey::from_secret(b"another-secret-that-is-also-32-bytes-long").unwrap(),
                )
                .unwrap(),
            ),
            "TOKEN_INVALID",
        ),
        ("expired", Some(hs256(&expired)), "TOKEN_INVALID"),
        ("not valid yet", Some(hs256(&not_yet)), "TOKEN_INVALID"),
        ("wrong issuer", Some(hs256(&foreign_issuer)), "TOKEN_INVALID"),
        ("wrong audience", Some(hs256(&foreign_audience)), "TOKEN_INVALID"),
        ("no exp claim", Some(hs256(&no_expiry)), "TOKEN_INVALID"),
        ("alg none", Some(unsigned), "TOKEN_INVALID"),
        (
            // Algorithm confusion: HS256 keyed with the RSA key's public PEM.
            "HS256 signed with the RS256 public key",
            Some(signed(
                Algorithm::HS256,
                "rsa-1",
                &EncodingKey::from_secret(&rsa_public_pem).unwrap(),
                &claims("mallory", "audit:write"),
            )),
            "TOKEN_INVALID",
        ),
        (
            "RS256 with a key the server does not know",
            Some(signed(
                Algorithm::RS256,
                "rsa-1",
                &rsa_key("jwt-rsa-2.key"),
                &claims("mallory", "audit:write"),
            )),
            "TOKEN_INVALID",
        ),
        (
            "unknown kid",
            Some(signed(
                Algorithm::RS256,
                "rsa-9",
                &rsa_key("jwt-rsa-1.key"),
                &claims("gateway", "audit:write"),
            )),
            "TOKEN_INVALID",
        ),
    ];
    for (name, token, reason) in cases {
        let status = write_with(&app, token.as_deref(), &format!("rr-bad-{name}"))
            .await
            .expect_err(name);
        assert_eq!(status.code(), Code::Unauthenticated, "{name}: {status:?}");
        assert_eq!(error_reason(&status), reason, "{name}");
        if let Some(token) = &token {
            assert!(
                !status.message().contains(token.as_str()),
                "{name}: the token is echoed"
            );
        }
    }
    assert_eq!(app.count("audit_events").await, 0);
}

#[tokio::test]
async fn good_tokens_of_every_key_type_write_as_their_subject() {
    let app = spawn_app_with(with_keys, local_model()).await;
    let rs = signed(
        Algorithm::RS256,
        "rsa-1",
        &rsa_key("jwt-rsa-1.key"),
        &claims("remediation-gateway", "audit:write"),
    );
    let es = signed(
        Algorithm::ES256,
        "ec-1",
        &EncodingKey::from_ec_pem(&std::fs::read(fixture("jwt-ec.key")).unwrap()).unwrap(),
        &claims("workflow-engine", "audit:write incidents:read"),
    );
    let hs = hs256(&claims("ai-controller", "search:read audit:write"));
    // A service-account token carries no scope claim: the subject mapping grants it.
    let mut sa_claims = claims(GATEWAY_SA, "");
    sa_claims.as_object_mut().unwrap().remove("scope");
    let sa = hs256(&sa_claims);

    for (token, subject) in [
        (rs, "remediation-gateway"),
        (es, "workflow-engine"),
        (hs, "ai-controller"),
        (sa, GATEWAY_SA),
    ] {
        let written = write_with(&app, Some(&token), &format!("rr-{subject}"))
            .await
            .unwrap_or_else(|status| panic!("{subject}: {status:?}"));
        assert_eq!(stored_source(&app, &written.event_id).await, subject);
    }
}

#[tokio::test]
async fn a_missing_scope_is_permission_denied_naming_the_scope() {
    let app = spawn_app_with(with_keys, local_model()).await;
    let reader = hs256(&claims("dashboard", "incidents:read search:read"));
    let status = write_with(&app, Some(&reader), "rr-denied").await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "SCOPE_MISSING");
    assert_eq!(info.metadata["required_scope"], "audit:write");

    // The same token reads: its scope is enough there.
    let mut incidents = IncidentQueryClient::new(app.channel().await);
    incidents
        .list_incidents(with_token(pb::ListIncidentsRequest::default(), &reader))
        .await
        .expect("incidents:read lists incidents");
    // Legal holds need audit:admin, not incidents:read.
    let status = incidents
        .list_legal_holds(with_token(pb::ListLegalHoldsRequest::default(), &reader))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let writer = hs256(&claims("gateway", "audit:write"));
    let status = incidents
        .list_incidents(with_token(pb::ListIncidentsRequest::default(), &writer))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(app.count("audit_events").await, 0);
}

#[tokio::test]
async fn health_and_reflection_need_no_token() {
    let app = spawn_app_with(with_keys, local_model()).await;
    let mut health = HealthClient::new(app.channel().await);
    let mut serving = false;
    for _ in 0..100 {
        let status = health
            .check(HealthCheckRequest {
                service: "datastorage.v1.AuditWrite".into(),
            })
            .await
            .expect("health needs no token")
            .into_inner()
            .status();
        if status == ServingStatus::Serving {
            serving = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(serving);
    // The reflection-only client (grpcurl's stand-in) with commands that send no token.
    let readme = std::env::temp_dir().join(format!("ds-auth-readme-{}.md", uuid::Uuid::new_v4().simple()));
    std::fs::write(
        &readme,
        "```sh\ngrpcurl -plaintext localhost:8080 list\ngrpcurl -plaintext localhost:8080 describe datastorage.v1.AuditWrite\n```\n",
    )
    .unwrap();
    let python = std::env::var("DATASTORAGE_TEST_PYTHON")
        .unwrap_or_else(|_| repo_dir().join(".cache/venv/bin/python").display().to_string());
    let port = app.port;
    let output = tokio::task::spawn_blocking({
        let readme = readme.clone();
        move || {
            std::process::Command::new(&python)
                .arg(repo_dir().join("tests/grpcurl_examples.py"))
                .args(["--addr", &format!("127.0.0.1:{port}"), "--readme"])
                .arg(&readme)
                .output()
                .expect("the reflection client runs (make deps)")
        }
    })
    .await
    .unwrap();
    let _ = std::fs::remove_file(&readme);
    assert!(
        output.status.success(),
        "reflection without a token: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("datastorage.v1.AuditWrite"));
}

/// A JWKS endpoint the test rotates, counting how often it is fetched.
#[derive(Clone, Default)]
struct JwksServer {
    keys: Arc<Mutex<Vec<Jwk>>>,
    fetches: Arc<AtomicUsize>,
}

impl JwksServer {
    async fn start(&self) -> String {
        let state = self.clone();
        let router = axum::Router::new().route(
            "/openid/v1/jwks",
            axum::routing::get(move || {
                let state = state.clone();
                async move {
                    state.fetches.fetch_add(1, Ordering::SeqCst);
                    let keys = state.keys.lock().unwrap().clone();
                    axum::Json(serde_json::json!({ "keys": keys }))
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await });
        format!("http://{address}/openid/v1/jwks")
    }

    fn publish(&self, keys: &[(&str, &EncodingKey)]) {
        *self.keys.lock().unwrap() = keys
            .iter()
            .map(|(kid, key)| {
                let mut jwk = Jwk::from_encoding_key(key, Algorithm::RS256).unwrap();
                jwk.common.key_id = Some((*kid).to_owned());
                jwk
            })
            .collect();
    }
}

fn with_jwks(url: String, min_refresh_secs: u64) -> impl FnOnce(&mut Settings) {
    move |settings| {
        settings.auth.disabled = false;
        settings.auth.issuer = ISSUER.into();
        settings.auth.jwks_url = Some(url);
        settings.auth.jwks_min_refresh_secs = min_refresh_secs;
    }
}

#[tokio::test]
async fn a_rotated_jwks_key_is_picked_up_and_the_retired_kid_is_refused() {
    let jwks = JwksServer::default();
    let (old_key, new_key) = (rsa_key("jwt-rsa-1.key"), rsa_key("jwt-rsa-2.key"));
    jwks.publish(&[("2026-old", &old_key)]);
    let url = jwks.start().await;
    let app = spawn_app_with(with_jwks(url, 1), local_model()).await;
    let token = |kid: &str, key: &EncodingKey| signed(Algorithm::RS256, kid, key, &claims("gateway", "audit:write"));

    write_with(&app, Some(&token("2026-old", &old_key)), "rr-jwks-1")
        .await
        .expect("the published key verifies");

    // The issuer rotates: only the new key is published now. (The JWKS may be
    // fetched again one jwks_min_refresh_secs after the last fetch.)
    jwks.publish(&[("2026-new", &new_key)]);
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    write_with(&app, Some(&token("2026-new", &new_key)), "rr-jwks-2")
        .await
        .expect("an unknown kid fetches the JWKS again and finds the new key");
    let status = write_with(&app, Some(&token("2026-old", &old_key)), "rr-jwks-3")
        .await
        .expect_err("the retired kid is gone after the refresh");
    assert_eq!(status.code(), Code::Unauthenticated);
    assert_eq!(app.count("audit_events").await, 2);
}

#[tokio::test]
async fn unknown_kids_refetch_the_jwks_at_most_once_per_minimum_interval() {
    let jwks = JwksServer::default();
    let key = rsa_key("jwt-rsa-1.key");
    jwks.publish(&[("k1", &key)]);
    let url = jwks.start().await;
    let app = spawn_app_with(with_jwks(url, 3600), local_model()).await;
    write_with(
        &app,
        Some(&signed(Algorithm::RS256, "k1", &key, &claims("gateway", "audit:write"))),
        "rr-min-1",
    )
    .await
    .expect("the first token fetches the JWKS");
    assert_eq!(jwks.fetches.load(Ordering::SeqCst), 1);
    for attempt in 0..5 {
        let forged = signed(
            Algorithm::RS256,
            &format!("forged-{attempt}"),
            &key,
            &claims("mallory", "audit:write"),
        );
        let status = write_with(&app, Some(&forged), "rr-min-forged").await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
    }
    assert_eq!(
        jwks.fetches.load(Ordering::SeqCst),
        1,
        "forged kids must not make the server hammer the issuer"
    );
}

#[tokio::test]
async fn an_unreachable_jwks_is_unavailable_not_unauthenticated() {
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let app = spawn_app_with(
        with_jwks(format!("http://127.0.0.1:{closed_port}/openid/v1/jwks"), 1),
        local_model(),
    )
    .await;
    let token = signed(
        Algorithm::RS256,
        "k1",
        &rsa_key("jwt-rsa-1.key"),
        &claims("gateway", "audit:write"),
    );
    for attempt in ["fetches and fails", "within the refresh floor, no fetch"] {
        let status = write_with(&app, Some(&token), "rr-no-jwks").await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{attempt}: {status:?}");
        assert!(status.get_details_retry_info().is_some());
    }
}
