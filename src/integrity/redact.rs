//! PII redaction for exports: e-mail addresses, IP addresses, phone numbers,
//! and bearer tokens, JWTs, cloud keys and `secret=value` pairs are masked in
//! free text. Over-masking a number that looks like a phone number is the
//! safe failure for an export that leaves the building.
use std::{net::Ipv6Addr, sync::LazyLock};

use regex::{Captures, Regex};

pub const EMAIL: &str = "[REDACTED:email]";
pub const IP: &str = "[REDACTED:ip]";
pub const PHONE: &str = "[REDACTED:phone]";
pub const SECRET: &str = "[REDACTED:secret]";

static BEARER: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?i)\b(?:bearer|basic)\s+[A-Za-z0-9\-._~+/]+=*").expect("valid regex"));
static JWT: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\beyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*").expect("valid regex"));
static CLOUD_KEY: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b|\b(?:ghp|gho|ghs|ghu|github_pat|xox[abpr]|sk)[-_][A-Za-z0-9_-]{16,}")
        .expect("valid regex")
});
static KEY_VALUE_SECRET: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r#"(?i)\b((?:password|passwd|pwd|secret|token|api[_-]?key|access[_-]?key|private[_-]?key|client[_-]?secret|authorization)["']?\s*[:=]\s*)(?:"[^"]*"|'[^']*'|[^\s,;&]+)"#,
    )
    .expect("valid regex")
});
static EMAIL_ADDRESS: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}").expect("valid regex")
});
static IPV4: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"\b(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\b")
        .expect("valid regex")
});
/// Candidates only: each is kept unless it parses as an IPv6 address with at
/// least two groups and stands apart from a word, so clock times
/// ("10:30:00") and paths ("std::io") survive.
static IPV6_CANDIDATE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?i)[0-9a-f]{0,4}(?::[0-9a-f]{0,4}){2,7}(?:%[0-9a-z]+)?").expect("valid regex"));
static PHONE_NUMBER: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?:\+\d{1,3}[\s.-]?)?(?:\(\d{2,4}\)[\s.-]?|\b\d{2,4}[\s.-]?)\d{3,4}[\s.-]?\d{3,4}\b")
        .expect("valid regex")
});

/// Masks every pattern in `text`. Secrets go first (a token may contain
/// digits that look like a phone number), then addresses, then numbers.
pub fn redact_text(text: &str) -> String {
    let text = BEARER.replace_all(text, SECRET);
    let text = JWT.replace_all(&text, SECRET);
    let text = CLOUD_KEY.replace_all(&text, SECRET);
    let text = KEY_VALUE_SECRET.replace_all(&text, |c: &Captures| format!("{}{SECRET}", &c[1]));
    let text = EMAIL_ADDRESS.replace_all(&text, EMAIL);
    let text = IPV4.replace_all(&text, IP);
    let text = IPV6_CANDIDATE.replace_all(&text, |c: &Captures| {
        let found = c.get(0).expect("the whole match");
        let address = found.as_str().split('%').next().unwrap_or_default();
        let after_word = text[..found.start()]
            .chars()
            .next_back()
            .is_some_and(char::is_alphanumeric);
        let groups = address.split(':').filter(|g| !g.is_empty()).count();
        if !after_word && groups >= 2 && address.parse::<Ipv6Addr>().is_ok() {
            IP.to_owned()
        } else {
            found.as_str().to_owned()
        }
    });
    PHONE_NUMBER.replace_all(&text, PHONE).into_owned()
}

/// Masks every string inside a JSON value (object keys are structure, not
/// free text, and stay).
pub fn redact_json(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::String(text) => *text = redact_text(text),
        serde_json::Value::Array(items) => items.iter_mut().for_each(redact_json),
        serde_json::Value::Object(fields) => fields.values_mut().for_each(redact_json),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_email_addresses() {
        assert_eq!(
            redact_text("paged jane.doe+oncall@example.co.uk twice"),
            format!("paged {EMAIL} twice")
        );
    }

    #[test]
    fn masks_ipv4_and_ipv6_but_not_clock_times() {
        assert_eq!(
            redact_text("from 10.1.2.3 and fe80::1%eth0 and 2001:db8:0:0:1:0:0:1 at 10:30:00"),
            format!("from {IP} and {IP} and {IP} at 10:30:00")
        );
        assert_eq!(
            redact_text("version 1.2.3 build 999.1.1.1 via std::io and ab:cd"),
            "version 1.2.3 build 999.1.1.1 via std::io and ab:cd"
        );
    }

    #[test]
    fn masks_phone_numbers_but_not_dates() {
        assert_eq!(
            redact_text("call +1 415-555-0100 or (020) 7946 0958 on 2026-11-23"),
            format!("call {PHONE} or {PHONE} on 2026-11-23")
        );
    }

    #[test]
    fn masks_bearer_tokens_jwts_keys_and_secret_pairs() {
        let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl";
        assert_eq!(
            redact_text("Authorization: Bearer abc.DEF-123_x="),
            format!("Authorization: {SECRET}")
        );
        assert_eq!(
            redact_text(&format!("token {jwt} leaked")),
            format!("token {SECRET} leaked")
        );
        assert_eq!(
            redact_text("key AKIAIOSFODNN7EXAMPLE used"),
            format!("key {SECRET} used")
        );
        assert_eq!(
            redact_text("db password=hunter2, api_key: 'x y' ok"),
            format!("db password={SECRET}, api_key: {SECRET} ok")
        );
    }

    #[test]
    fn masks_strings_anywhere_in_json_but_keeps_keys_and_numbers() {
        let mut value = serde_json::json!({"who": {"mail": "a@b.io", "ips": ["10.0.0.1"]}, "n": 4_155_550_100_i64});
        redact_json(&mut value);
        assert_eq!(
            value,
            serde_json::json!({"who": {"mail": EMAIL, "ips": [IP]}, "n": 4_155_550_100_i64})
        );
    }
}
