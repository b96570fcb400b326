//! The signed export format (docs/audit-integrity.md): one RFC 8785 JSON line
//! per event in chain order, then a summary line. The exported bytes are all
//! lines, each followed by "\n"; the detached signature is Ed25519 over their
//! SHA-256 digest, so the server signs an export of any size while streaming
//! it, and an auditor checks it with `sha256sum` and any Ed25519 library.
//! `datastorage audit verify-export` checks it offline with this same code.
use std::path::Path;

use anyhow::Context;
use base64::{engine::general_purpose::STANDARD, Engine};
use chrono::{DateTime, Utc};
use ed25519_dalek::{
    pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey},
    Signature, Signer, SigningKey, Verifier, VerifyingKey,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::chain::{sha256_link, ChainRecord, HashAlgorithm};

pub const FORMAT: &str = "datastorage-export/1";
pub const SIGNATURE_ALGORITHM: &str = "ed25519";

/// An event's chain link as exported (hashes in lowercase hex).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportedLink {
    pub seq: Option<i64>,
    pub previous_event_hash: Option<String>,
    pub event_hash: Option<String>,
    pub algorithm: Option<String>,
    pub key_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ExportLine {
    Event {
        /// The record the chain link hashes (masked when `redacted`).
        event: Box<ChainRecord>,
        chain: ExportedLink,
        /// The server's check of this link against the stored chain.
        chain_verified: bool,
        redacted: bool,
        incident_id: Uuid,
        embedding_state: String,
        legal_hold: bool,
    },
    Summary {
        format: String,
        total_events: i64,
        verified_events: i64,
        tampered_event_ids: Vec<Uuid>,
        signature_algorithm: String,
        key_id: String,
        #[serde(with = "super::chain::micros")]
        exported_at: DateTime<Utc>,
    },
}

impl ExportLine {
    /// The line's bytes as signed: RFC 8785 JSON, without the newline.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        serde_jcs::to_vec(self).expect("an export line is plain JSON")
    }
}

/// Signs exports with the configured Ed25519 key.
pub struct ExportSigner {
    key: SigningKey,
    key_id: String,
}

impl ExportSigner {
    pub fn load(path: &Path, key_id: &str) -> anyhow::Result<Self> {
        let pem = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let key = SigningKey::from_pkcs8_pem(&pem)
            .map_err(|e| anyhow::anyhow!("{} is not an Ed25519 PKCS#8 PEM private key: {e}", path.display()))?;
        Ok(ExportSigner {
            key,
            key_id: key_id.to_owned(),
        })
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// Signs the SHA-256 digest of the exported bytes.
    pub fn sign(&self, digest: &[u8; 32]) -> Vec<u8> {
        self.key.sign(digest).to_bytes().to_vec()
    }
}

/// A fresh key pair as (private PKCS#8 PEM, public SPKI PEM).
pub fn generate_key_pair() -> anyhow::Result<(String, String)> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| anyhow::anyhow!("no randomness for a signing key: {e}"))?;
    let key = SigningKey::from_bytes(&seed);
    let private = key
        .to_pkcs8_pem(Default::default())
        .map_err(|e| anyhow::anyhow!("encoding the private key: {e}"))?;
    let public = key
        .verifying_key()
        .to_public_key_pem(Default::default())
        .map_err(|e| anyhow::anyhow!("encoding the public key: {e}"))?;
    Ok((private.to_string(), public))
}

/// The detached signature file next to a saved export.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DetachedSignature {
    pub algorithm: String,
    pub key_id: String,
    /// Base64 (standard alphabet) of the 64-byte signature.
    pub signature: String,
}

impl DetachedSignature {
    pub fn new(key_id: &str, signature: &[u8]) -> Self {
        DetachedSignature {
            algorithm: SIGNATURE_ALGORITHM.to_owned(),
            key_id: key_id.to_owned(),
            signature: STANDARD.encode(signature),
        }
    }
}

/// What an offline check of a saved export found.
#[derive(Debug, Default)]
pub struct ExportCheck {
    pub events: usize,
    /// Events whose link was recomputed from the exported record.
    pub links_rechecked: usize,
    /// Events the offline recomputation disagrees with, or the server flagged.
    pub broken_links: Vec<Uuid>,
    /// Keyed (HMAC) or redacted events, which cannot be recomputed offline.
    pub links_not_checkable: usize,
    pub summary_total: i64,
}

/// Checks a saved export: the signature over its exact bytes, its shape
/// (event lines, then exactly one summary line that counts them), and every
/// plain SHA-256 link that can be recomputed from the exported records.
pub fn verify_saved_export(
    bytes: &[u8],
    signature: &DetachedSignature,
    public_key_pem: &str,
) -> anyhow::Result<ExportCheck> {
    anyhow::ensure!(
        signature.algorithm == SIGNATURE_ALGORITHM,
        "unsupported signature algorithm {:?}",
        signature.algorithm
    );
    let key = VerifyingKey::from_public_key_pem(public_key_pem)
        .map_err(|e| anyhow::anyhow!("the public key is not an Ed25519 SPKI PEM key: {e}"))?;
    let raw = STANDARD
        .decode(&signature.signature)
        .context("the signature is not base64")?;
    let raw: [u8; 64] = raw
        .try_into()
        .map_err(|_| anyhow::anyhow!("an Ed25519 signature has 64 bytes"))?;
    let digest: [u8; 32] = Sha256::digest(bytes).into();
    key.verify(&digest, &Signature::from_bytes(&raw)).map_err(|_| {
        anyhow::anyhow!("the signature does not match the export: it was changed or signed by another key")
    })?;

    let text = std::str::from_utf8(bytes).context("the export is not UTF-8")?;
    anyhow::ensure!(text.ends_with('\n'), "the export must end with a newline");
    let lines: Vec<&str> = text[..text.len() - 1].split('\n').collect();
    let (summary, events) = lines.split_last().context("the export is empty")?;
    let mut check = ExportCheck::default();
    let mut previous: Option<(String, i64, String)> = None;
    for (number, line) in events.iter().enumerate() {
        let parsed: ExportLine =
            serde_json::from_str(line).with_context(|| format!("line {} is not an export line", number + 1))?;
        let ExportLine::Event {
            event,
            chain,
            chain_verified,
            redacted,
            ..
        } = parsed
        else {
            anyhow::bail!("line {} is a summary before the end", number + 1);
        };
        check.events += 1;
        let mut ok = chain_verified;
        let algorithm = chain.algorithm.as_deref().and_then(HashAlgorithm::parse);
        if redacted || algorithm != Some(HashAlgorithm::Sha256) {
            check.links_not_checkable += 1;
        } else {
            check.links_rechecked += 1;
            let previous_hash = chain.previous_event_hash.as_deref().map(hex::decode).transpose()?;
            let recomputed = hex::encode(sha256_link(previous_hash.as_deref(), &event.canonical_bytes()));
            ok &= chain.event_hash.as_deref() == Some(recomputed.as_str());
        }
        // Consecutive events of one chain must link up.
        if let (Some((correlation, seq, hash)), Some(this_seq)) = (&previous, chain.seq) {
            if *correlation == event.correlation_id && this_seq == seq + 1 {
                ok &= chain.previous_event_hash.as_deref() == Some(hash.as_str());
            }
        }
        if !ok {
            check.broken_links.push(event.event_id);
        }
        previous = match (chain.seq, chain.event_hash) {
            (Some(seq), Some(hash)) => Some((event.correlation_id, seq, hash)),
            _ => None,
        };
    }
    let summary: ExportLine = serde_json::from_str(summary).context("the last line is not an export summary")?;
    let ExportLine::Summary {
        format, total_events, ..
    } = summary
    else {
        anyhow::bail!("the last line is not an export summary");
    };
    anyhow::ensure!(format == FORMAT, "unknown export format {format:?}");
    anyhow::ensure!(
        total_events == check.events as i64,
        "the summary counts {total_events} events but the export holds {}",
        check.events
    );
    check.summary_total = total_events;
    Ok(check)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::integrity::chain::ChainHasher;

    fn signed_export() -> (Vec<u8>, DetachedSignature, String) {
        let (private, public) = generate_key_pair().unwrap();
        let dir = std::env::temp_dir().join(format!("ds-export-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("key.pem"), &private).unwrap();
        let signer = ExportSigner::load(&dir.join("key.pem"), "k1").unwrap();
        let hasher = ChainHasher::unkeyed();
        let mut bytes = Vec::new();
        let mut previous: Option<[u8; 32]> = None;
        for seq in 1..=2 {
            let event = ChainRecord {
                event_id: Uuid::from_u128(seq as u128),
                correlation_id: "c".into(),
                remediation_request_id: "r".into(),
                occurred_at: Utc::now(),
                received_at: Utc::now(),
                namespace: "n".into(),
                cluster: None,
                kind: 5,
                labels: BTreeMap::new(),
                parent_event_id: None,
                payload: serde_json::json!({"kind": "custom", "event_type": "x"}),
                source: "s".into(),
                trace_id: None,
            };
            let link = hasher.link(previous.as_ref().map(|p| p.as_slice()), &event.canonical_bytes());
            let line = ExportLine::Event {
                event: Box::new(event),
                chain: ExportedLink {
                    seq: Some(seq),
                    previous_event_hash: previous.map(hex::encode),
                    event_hash: Some(hex::encode(link.hash)),
                    algorithm: Some("sha256".into()),
                    key_id: None,
                },
                chain_verified: true,
                redacted: false,
                incident_id: Uuid::nil(),
                embedding_state: "generated".into(),
                legal_hold: false,
            };
            previous = Some(link.hash);
            bytes.extend(line.canonical_bytes());
            bytes.push(b'\n');
        }
        let summary = ExportLine::Summary {
            format: FORMAT.into(),
            total_events: 2,
            verified_events: 2,
            tampered_event_ids: vec![],
            signature_algorithm: SIGNATURE_ALGORITHM.into(),
            key_id: "k1".into(),
            exported_at: Utc::now(),
        };
        bytes.extend(summary.canonical_bytes());
        bytes.push(b'\n');
        let signature = DetachedSignature::new(signer.key_id(), &signer.sign(&Sha256::digest(&bytes).into()));
        (bytes, signature, public)
    }

    #[test]
    fn a_signed_export_verifies_offline() {
        let (bytes, signature, public) = signed_export();
        let check = verify_saved_export(&bytes, &signature, &public).unwrap();
        assert_eq!((check.events, check.links_rechecked), (2, 2));
        assert!(check.broken_links.is_empty());
    }

    #[test]
    fn one_changed_byte_fails_the_signature() {
        let (mut bytes, signature, public) = signed_export();
        let at = bytes.iter().position(|&b| b == b'"').unwrap() + 1;
        bytes[at] ^= 1;
        let error = verify_saved_export(&bytes, &signature, &public).unwrap_err();
        assert!(error.to_string().contains("signature does not match"), "{error}");
    }

    #[test]
    fn another_key_fails_the_signature() {
        let (bytes, signature, _) = signed_export();
        let (_, other_public) = generate_key_pair().unwrap();
        assert!(verify_saved_export(&bytes, &signature, &other_public).is_err());
    }
}
