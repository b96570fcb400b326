//! The per-correlation hash chain, exactly as docs/audit-integrity.md
//! specifies it for auditors: each event's link is
//! `H(previous link || RFC 8785 canonical JSON of its record)`, where the
//! first event of a chain hashes 32 zero bytes as its previous link.
use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat, Utc};
use hmac::{Hmac, Mac};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::config::IntegritySettings;

/// What the first event of a chain hashes as its previous link.
pub const GENESIS_LINK: [u8; 32] = [0; 32];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HashAlgorithm {
    #[serde(rename = "sha256")]
    Sha256,
    #[serde(rename = "hmac-sha256")]
    HmacSha256,
}

impl HashAlgorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            HashAlgorithm::Sha256 => "sha256",
            HashAlgorithm::HmacSha256 => "hmac-sha256",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "sha256" => Some(HashAlgorithm::Sha256),
            "hmac-sha256" => Some(HashAlgorithm::HmacSha256),
            _ => None,
        }
    }
}

/// An event's content as its chain link covers it: every column a reader sees
/// (derived columns such as the incident id or search text are recomputable
/// from these and left out). Field names and value forms are part of the
/// audit contract; change them only with a new algorithm name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChainRecord {
    pub event_id: Uuid,
    pub correlation_id: String,
    pub remediation_request_id: String,
    #[serde(with = "micros")]
    pub occurred_at: DateTime<Utc>,
    #[serde(with = "micros")]
    pub received_at: DateTime<Utc>,
    pub namespace: String,
    pub cluster: Option<String>,
    /// The AuditKind enum number of the contract.
    pub kind: i16,
    pub labels: BTreeMap<String, String>,
    pub parent_event_id: Option<Uuid>,
    /// The payload as stored (the `payload` column).
    pub payload: serde_json::Value,
    pub source: String,
    pub trace_id: Option<String>,
}

impl ChainRecord {
    /// RFC 8785 (JSON Canonicalization Scheme): sorted keys, no whitespace,
    /// ECMAScript number forms, UTF-8.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        serde_jcs::to_vec(self).expect("a chain record is plain JSON")
    }
}

/// Timestamps in a record: RFC 3339 in UTC with exactly six fractional
/// digits, the precision PostgreSQL stores.
pub mod micros {
    use super::*;

    pub fn serialize<S: serde::Serializer>(at: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&at.to_rfc3339_opts(SecondsFormat::Micros, true))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let text = String::deserialize(d)?;
        DateTime::parse_from_rfc3339(&text)
            .map(|at| at.with_timezone(&Utc))
            .map_err(serde::de::Error::custom)
    }
}

/// One event's link as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainLink {
    pub algorithm: HashAlgorithm,
    pub key_id: Option<String>,
    pub hash: [u8; 32],
}

/// Computes links with the configured key (HMAC-SHA-256) or none (SHA-256),
/// and recomputes the links of either kind it has the key for.
#[derive(Clone)]
pub struct ChainHasher {
    hmac_key: Option<(String, Vec<u8>)>,
}

impl ChainHasher {
    pub fn new(settings: &IntegritySettings) -> Self {
        ChainHasher {
            hmac_key: settings
                .chain_key
                .as_ref()
                .map(|key| (settings.chain_key_id.clone(), key.expose_secret().as_bytes().to_vec())),
        }
    }

    pub fn unkeyed() -> Self {
        ChainHasher { hmac_key: None }
    }

    pub fn link(&self, previous: Option<&[u8]>, canonical: &[u8]) -> ChainLink {
        match &self.hmac_key {
            None => ChainLink {
                algorithm: HashAlgorithm::Sha256,
                key_id: None,
                hash: sha256_link(previous, canonical),
            },
            Some((key_id, key)) => ChainLink {
                algorithm: HashAlgorithm::HmacSha256,
                key_id: Some(key_id.clone()),
                hash: hmac_link(key, previous, canonical),
            },
        }
    }

    /// The link an event should have; None when it was keyed with a key this
    /// hasher does not hold.
    pub fn recompute(
        &self,
        algorithm: HashAlgorithm,
        key_id: Option<&str>,
        previous: Option<&[u8]>,
        canonical: &[u8],
    ) -> Option<[u8; 32]> {
        match algorithm {
            HashAlgorithm::Sha256 => Some(sha256_link(previous, canonical)),
            HashAlgorithm::HmacSha256 => {
                let (own_id, key) = self.hmac_key.as_ref()?;
                (key_id == Some(own_id.as_str())).then(|| hmac_link(key, previous, canonical))
            }
        }
    }
}

pub fn sha256_link(previous: Option<&[u8]>, canonical: &[u8]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(previous.unwrap_or(&GENESIS_LINK));
    hasher.update(canonical);
    hasher.finalize().into()
}

fn hmac_link(key: &[u8], previous: Option<&[u8]>, canonical: &[u8]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(previous.unwrap_or(&GENESIS_LINK));
    mac.update(canonical);
    mac.finalize().into_bytes().into()
}

/// An event of a chain as stored, ready to be checked.
#[derive(Debug, Clone)]
pub struct StoredLink {
    pub event_id: Uuid,
    pub seq: Option<i64>,
    pub previous_hash: Option<Vec<u8>>,
    pub hash: Option<Vec<u8>>,
    pub algorithm: Option<String>,
    pub key_id: Option<String>,
    pub canonical: Vec<u8>,
}

/// A purged event's place in its chain.
#[derive(Debug, Clone)]
pub struct PurgedLink {
    pub seq: i64,
    pub hash: Option<Vec<u8>>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChainReport {
    /// Events stored (purged ones are not counted).
    pub total_events: i64,
    pub verified_events: i64,
    /// Events whose content or link does not check out, in chain order.
    pub tampered: Vec<Uuid>,
    /// Per stored event, in chain order: whether it checked out.
    pub verified: Vec<(Uuid, bool)>,
    /// Links that are neither stored nor purged (deleted around the service).
    pub missing_links: i64,
}

impl ChainReport {
    pub fn valid(&self) -> bool {
        self.tampered.is_empty() && self.missing_links == 0
    }
}

enum Slot<'a> {
    Stored(&'a StoredLink),
    Purged(&'a PurgedLink),
}

/// Checks a chain of `length` links (the chain head's count). An event is
/// verified when its hash recomputes from its content and its previous link,
/// and that previous link is the stored (or purged) hash before it. A broken
/// event does not taint the ones after it: they are checked against its stored
/// hash, so a report names exactly the rows that were changed. Events the head
/// does not account for, or without a link, are reported too.
pub fn verify_chain(hasher: &ChainHasher, length: i64, events: &[StoredLink], purged: &[PurgedLink]) -> ChainReport {
    let mut slots: BTreeMap<i64, Slot> = BTreeMap::new();
    let mut report = ChainReport {
        total_events: events.len() as i64,
        ..ChainReport::default()
    };
    let mut broken: Vec<Uuid> = Vec::new();
    for purged in purged {
        slots.insert(purged.seq, Slot::Purged(purged));
    }
    for event in events {
        match event.seq {
            Some(seq) if (1..=length).contains(&seq) && !slots.contains_key(&seq) => {
                slots.insert(seq, Slot::Stored(event));
            }
            _ => broken.push(event.event_id),
        }
    }
    let mut expected_previous: Option<Option<&[u8]>> = Some(None);
    for seq in 1..=length {
        match slots.get(&seq) {
            None => {
                report.missing_links += 1;
                expected_previous = None;
            }
            Some(Slot::Purged(purged)) => expected_previous = purged.hash.as_deref().map(Some),
            Some(Slot::Stored(event)) => {
                let ok = link_checks_out(hasher, event, expected_previous);
                report.verified.push((event.event_id, ok));
                if ok {
                    report.verified_events += 1;
                } else {
                    report.tampered.push(event.event_id);
                }
                expected_previous = event.hash.as_deref().map(Some);
            }
        }
    }
    for event_id in broken {
        report.verified.push((event_id, false));
        report.tampered.push(event_id);
    }
    report
}

/// `expected_previous`: None when the previous link is unknown (missing),
/// Some(None) for the first event of the chain.
fn link_checks_out(hasher: &ChainHasher, event: &StoredLink, expected_previous: Option<Option<&[u8]>>) -> bool {
    let Some(expected_previous) = expected_previous else {
        return false;
    };
    if event.previous_hash.as_deref() != expected_previous {
        return false;
    }
    let (Some(hash), Some(algorithm)) = (&event.hash, event.algorithm.as_deref().and_then(HashAlgorithm::parse)) else {
        return false;
    };
    hasher
        .recompute(
            algorithm,
            event.key_id.as_deref(),
            event.previous_hash.as_deref(),
            &event.canonical,
        )
        .is_some_and(|recomputed| recomputed.as_slice() == hash.as_slice())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(event_id: u128) -> ChainRecord {
        ChainRecord {
            event_id: Uuid::from_u128(event_id),
            correlation_id: "corr-1".into(),
            remediation_request_id: "rr-1".into(),
            occurred_at: DateTime::parse_from_rfc3339("2026-11-23T10:00:00.123456Z")
                .unwrap()
                .into(),
            received_at: DateTime::parse_from_rfc3339("2026-11-23T10:00:01Z").unwrap().into(),
            namespace: "prod".into(),
            cluster: None,
            kind: 5,
            labels: BTreeMap::from([("team".into(), "sre".into())]),
            parent_event_id: None,
            payload: serde_json::json!({"kind": "custom", "event_type": "login", "data": {"n": 3.0, "b": [1.5, "é"]}}),
            source: "gateway".into(),
            trace_id: None,
        }
    }

    #[test]
    fn canonical_bytes_follow_rfc_8785() {
        let bytes = record(1).canonical_bytes();
        assert_eq!(
            String::from_utf8(bytes).unwrap(),
            r#"{"cluster":null,"correlation_id":"corr-1","event_id":"00000000-0000-0000-0000-000000000001","kind":5,"labels":{"team":"sre"},"namespace":"prod","occurred_at":"2026-11-23T10:00:00.123456Z","parent_event_id":null,"payload":{"data":{"b":[1.5,"é"],"n":3},"event_type":"login","kind":"custom"},"received_at":"2026-11-23T10:00:01.000000Z","remediation_request_id":"rr-1","source":"gateway","trace_id":null}"#
        );
    }

    #[test]
    fn sha256_links_match_a_plain_hash_of_previous_and_record() {
        let canonical = record(1).canonical_bytes();
        let link = ChainHasher::unkeyed().link(None, &canonical);
        let mut expected = Sha256::new();
        expected.update([0u8; 32]);
        expected.update(&canonical);
        assert_eq!(link.hash, <[u8; 32]>::from(expected.finalize()));
        assert_eq!(link.algorithm, HashAlgorithm::Sha256);
    }

    fn chain(hasher: &ChainHasher, n: u128) -> Vec<StoredLink> {
        let mut previous: Option<Vec<u8>> = None;
        (1..=n)
            .map(|i| {
                let canonical = record(i).canonical_bytes();
                let link = hasher.link(previous.as_deref(), &canonical);
                let stored = StoredLink {
                    event_id: Uuid::from_u128(i),
                    seq: Some(i as i64),
                    previous_hash: previous.clone(),
                    hash: Some(link.hash.to_vec()),
                    algorithm: Some(link.algorithm.as_str().into()),
                    key_id: link.key_id,
                    canonical,
                };
                previous = Some(link.hash.to_vec());
                stored
            })
            .collect()
    }

    #[test]
    fn an_intact_chain_verifies() {
        let hasher = ChainHasher::unkeyed();
        let report = verify_chain(&hasher, 4, &chain(&hasher, 4), &[]);
        assert!(report.valid());
        assert_eq!((report.total_events, report.verified_events), (4, 4));
    }

    #[test]
    fn an_edited_event_is_named_and_its_successors_still_verify() {
        let hasher = ChainHasher::unkeyed();
        let mut events = chain(&hasher, 4);
        events[1].canonical = record(99).canonical_bytes();
        let report = verify_chain(&hasher, 4, &events, &[]);
        assert_eq!(report.tampered, vec![Uuid::from_u128(2)]);
        assert_eq!(report.verified_events, 3);
    }

    #[test]
    fn a_rehashed_edit_breaks_the_next_link() {
        let hasher = ChainHasher::unkeyed();
        let mut events = chain(&hasher, 3);
        events[1].canonical = record(99).canonical_bytes();
        events[1].hash = Some(sha256_link(events[1].previous_hash.as_deref(), &events[1].canonical).to_vec());
        let report = verify_chain(&hasher, 3, &events, &[]);
        assert_eq!(report.tampered, vec![Uuid::from_u128(3)]);
    }

    #[test]
    fn deleted_events_are_missing_links_but_purged_ones_are_not() {
        let hasher = ChainHasher::unkeyed();
        let events = chain(&hasher, 4);
        let deleted = [events[0].clone(), events[2].clone(), events[3].clone()];
        let report = verify_chain(&hasher, 4, &deleted, &[]);
        assert_eq!(report.missing_links, 1);
        assert_eq!(report.tampered, vec![Uuid::from_u128(3)]);
        assert!(!report.valid());

        let purged = [PurgedLink {
            seq: 2,
            hash: events[1].hash.clone(),
        }];
        let report = verify_chain(&hasher, 4, &deleted, &purged);
        assert!(report.valid(), "{report:?}");
        assert_eq!(report.total_events, 3);

        let truncated = verify_chain(&hasher, 4, &events[..3], &[]);
        assert_eq!(truncated.missing_links, 1);
    }

    #[test]
    fn hmac_links_need_the_key_that_made_them() {
        let keyed = ChainHasher {
            hmac_key: Some(("k1".into(), b"0123456789abcdef0123456789abcdef".to_vec())),
        };
        let events = chain(&keyed, 2);
        assert!(verify_chain(&keyed, 2, &events, &[]).valid());
        assert_eq!(verify_chain(&ChainHasher::unkeyed(), 2, &events, &[]).tampered.len(), 2);
        let rotated = ChainHasher {
            hmac_key: Some(("k2".into(), b"0123456789abcdef0123456789abcdef".to_vec())),
        };
        assert!(!verify_chain(&rotated, 2, &events, &[]).valid());
    }

    #[test]
    fn events_the_head_does_not_count_are_tampered() {
        let hasher = ChainHasher::unkeyed();
        let mut events = chain(&hasher, 3);
        events[2].seq = None;
        let report = verify_chain(&hasher, 2, &events, &[]);
        assert_eq!(report.tampered, vec![Uuid::from_u128(3)]);
    }
}
