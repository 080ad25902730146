//! Attestations: a signed statement that a sealed shard is resident and intact *now*, for a caller's
//! nonce (VP-006), that **anyone with the worker's public key** can check — no secret needed.
//!
//! [`VramManager::attest`](crate::VramManager::attest) makes a **fresh** verification of the shard (seal
//! HMAC, residency, digest re-measured where the bytes are) and then signs, with the worker's Ed25519
//! key, an [in-toto Statement v1](https://github.com/in-toto/attestation/blob/main/spec/v1/statement.md)
//! inside a [DSSE envelope](https://github.com/secure-systems-lab/dsse/blob/master/envelope.md) — the
//! format OpenSSF model signing and SLSA provenance use:
//!
//! ```text
//! envelope  {"payloadType":"application/vnd.in-toto+json","payload":<base64>,
//!            "signatures":[{"keyid":"ed25519:<hex>","sig":<base64>}]}
//! signature Ed25519 over PAE(payloadType, payload) = "DSSEv1 <len> <type> <len> <payload bytes>"
//! payload   {"_type":"https://in-toto.io/Statement/v1",
//!            "subject":[{"name":<shard id>,"digest":{"fsverity-sha256":<hex>}}],
//!            "predicateType":"https://example.invalid/vram-residency/residency/v1",
//!            "predicate":{ backend, seal {record, tag, and the record's fields}, device {uuid, name,
//!                          driver_version, unified_memory}, residency {verdict[, detail]}, nonce,
//!                          attested_at_ns,
//!                          verification {result, digest, vram_bytes, elapsed_ns}, audit_head }}
//! ```
//!
//! `docs/attestation.md` specifies every field, with a worked example that a test recomputes. The
//! payload is written once by the worker and verified as bytes (the signature covers them exactly);
//! [`AttestationEnvelope::verify`] then parses it strictly (unknown or missing fields, non-canonical
//! spellings refused) and refuses a statement that is signed but inconsistent: a subject or a
//! re-measured digest that is not the sealed one, a byte count that differs, seal-record fields that
//! are not those of the record's canonical bytes, a residency verdict that does not fit the backend,
//! another nonce. The seal tag is an HMAC under a key only the worker holds: a verifier cannot recompute
//! it; the worker checked it (constant time) in the fresh verification the statement reports.
//!
//! An attestation contains no pointer, no token and no key. The HMAC attestations of format v1 (which
//! only a holder of the worker token could check) are no longer made or accepted.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

use crate::audit::AuditHead;
use crate::backend::{BackendKind, Residency, UnifiedMemoryFacts};
use crate::digest::Digest;
use crate::error::{Result, VramError};
use crate::ids::format_uuid;
use crate::keys::{PublicKey, Tag, WorkerIdentity, dsse_pae};
use crate::seal::SealRecord;

/// DSSE `payloadType` of an in-toto Statement.
pub const PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";
/// The in-toto Statement `_type`.
pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
/// Our predicate type (versioned). The project has no domain of its own yet; the URI uses the
/// workspace's placeholder repository address and will change with it (as a new version).
pub const PREDICATE_TYPE: &str = "https://example.invalid/vram-residency/residency/v1";
/// The predicate type of a model attestation (all shards of one model in one statement; see
/// [`crate::model_attestation`]).
pub const MODEL_PREDICATE_TYPE: &str = "https://example.invalid/vram-residency/model-residency/v1";
/// The in-toto digest-set key of a subject's fs-verity digest (not a plain SHA-256 of the file).
pub const SUBJECT_DIGEST_KEY: &str = "fsverity-sha256";
/// Shortest nonce accepted, in bytes.
pub const MIN_NONCE_LEN: usize = 16;
/// Longest nonce accepted, in bytes.
pub const MAX_NONCE_LEN: usize = 64;
/// Largest envelope accepted by [`AttestationEnvelope::from_json`].
pub const MAX_ENVELOPE_BYTES: usize = 1 << 20;

/// What an attestation states. Public data.
#[derive(Debug, Clone)]
pub struct Attestation {
    /// The shard's seal record as sealed (its backend is the attestation's backend).
    pub record: SealRecord,
    /// The shard's seal tag (HMAC-SHA256, checkable only by the worker).
    pub seal_tag: Tag,
    /// The device's name.
    pub device_name: String,
    /// The driver version (`sim` for the simulated backend).
    pub driver_version: String,
    /// What the driver says about unified memory on the device (`None` on `sim`).
    pub unified_memory: Option<UnifiedMemoryFacts>,
    /// Where the backend found the bytes, checked for this attestation.
    pub residency: Residency,
    /// The caller's nonce.
    pub nonce: Vec<u8>,
    /// When the statement was made, ns since the Unix epoch.
    pub attested_at_ns: u64,
    /// The digest re-measured in device memory for this attestation.
    pub verified_digest: Digest,
    /// Bytes re-hashed.
    pub verified_bytes: u64,
    /// How long the fresh verification took, in ns.
    pub verify_elapsed_ns: u64,
    /// The worker's audit log head after the fresh verification was recorded, when the worker keeps
    /// a durable log.
    pub audit_head: Option<AuditHead>,
}

/// A signed attestation: a DSSE envelope. Public data.
#[derive(Debug, Clone)]
pub struct AttestationEnvelope {
    payload: Vec<u8>,
    key_id: String,
    signature: [u8; 64],
}

/// Checks a nonce's length.
///
/// # Errors
/// [`VramError::InvalidInput`] naming `nonce`.
pub fn validate_nonce(nonce: &[u8]) -> Result<()> {
    if (MIN_NONCE_LEN..=MAX_NONCE_LEN).contains(&nonce.len()) {
        Ok(())
    } else {
        Err(VramError::InvalidInput {
            field: "nonce",
            reason: format!(
                "it is {}; {MIN_NONCE_LEN} to {MAX_NONCE_LEN} bytes are required (32 to 128 hex digits)",
                crate::ids::bytes(u64::try_from(nonce.len()).unwrap_or(u64::MAX))
            ),
        })
    }
}

/// Parses a nonce given as lowercase or uppercase hex.
///
/// # Errors
/// [`VramError::InvalidInput`] naming `nonce`.
pub fn parse_nonce_hex(text: &str) -> Result<Vec<u8>> {
    let nonce = hex::decode(text).map_err(|_| VramError::InvalidInput {
        field: "nonce",
        reason: "it is not an even number of hex digits".to_owned(),
    })?;
    validate_nonce(&nonce)?;
    Ok(nonce)
}

/// A statement's bytes (shard or model attestation): the nonce checked, then `wire` as JSON.
pub(crate) fn statement_bytes(nonce: &[u8], wire: &impl serde::Serialize) -> Result<Vec<u8>> {
    validate_nonce(nonce)?;
    serde_json::to_vec(wire).map_err(|e| VramError::InvalidInput {
        field: "attestation",
        reason: format!("cannot be serialised: {e}"),
    })
}

impl Attestation {
    /// The in-toto Statement, serialised: the bytes the envelope carries and signs.
    ///
    /// # Errors
    /// [`VramError::InvalidInput`] for a bad nonce or seal record.
    pub fn statement_bytes(&self) -> Result<Vec<u8>> {
        statement_bytes(&self.nonce, &self.to_wire()?)
    }

    /// Signs the statement with the worker's identity.
    pub(crate) fn sign(&self, identity: &WorkerIdentity) -> Result<AttestationEnvelope> {
        Ok(AttestationEnvelope::sign_payload(
            identity,
            self.statement_bytes()?,
        ))
    }

    fn to_wire(&self) -> Result<Statement> {
        let record = &self.record;
        Ok(Statement {
            type_: STATEMENT_TYPE.to_owned(),
            subject: vec![Subject {
                name: record.shard_id.as_str().to_owned(),
                digest: SubjectDigest {
                    fsverity_sha256: hex::encode(record.digest.as_bytes()),
                },
            }],
            predicate_type: PREDICATE_TYPE.to_owned(),
            predicate: Predicate {
                backend: record.backend.name().to_owned(),
                seal: WireSeal::new(record, &self.seal_tag)?,
                device: WireDevice {
                    uuid: format_uuid(&record.device_uuid),
                    name: self.device_name.clone(),
                    driver_version: self.driver_version.clone(),
                    unified_memory: self.unified_memory,
                },
                residency: WireResidency::new(&self.residency),
                nonce: hex::encode(&self.nonce),
                attested_at_ns: self.attested_at_ns,
                verification: WireVerification {
                    result: "verified".to_owned(),
                    digest: self.verified_digest.to_string(),
                    vram_bytes: self.verified_bytes,
                    elapsed_ns: self.verify_elapsed_ns,
                },
                audit_head: self.audit_head.map(WireHead::new),
            },
        })
    }

    fn from_wire(wire: &Statement) -> Result<Self> {
        if wire.type_ != STATEMENT_TYPE {
            return Err(malformed("_type is not an in-toto Statement v1"));
        }
        if wire.predicate_type != PREDICATE_TYPE {
            return Err(malformed(&format!(
                "unknown predicateType (expected {PREDICATE_TYPE})"
            )));
        }
        let predicate = &wire.predicate;
        let (record, seal_tag) = predicate.seal.decode()?;
        if predicate.verification.result != "verified" {
            return Err(malformed("unknown verification result"));
        }
        let residency = predicate.residency.decode()?;
        Ok(Self {
            record,
            seal_tag,
            device_name: predicate.device.name.clone(),
            driver_version: predicate.device.driver_version.clone(),
            unified_memory: predicate.device.unified_memory,
            residency,
            nonce: hex::decode(&predicate.nonce).map_err(|_| malformed("nonce is not hex"))?,
            attested_at_ns: predicate.attested_at_ns,
            verified_digest: parse_digest(&predicate.verification.digest, "verification.digest")?,
            verified_bytes: predicate.verification.vram_bytes,
            verify_elapsed_ns: predicate.verification.elapsed_ns,
            audit_head: predicate
                .audit_head
                .as_ref()
                .map(WireHead::decode)
                .transpose()?,
        })
    }

    /// The checks a verifier makes on a statement whose signature verified: it must be consistent
    /// with itself and be for the verifier's nonce.
    fn check_consistent(&self, expected_nonce: &[u8]) -> Result<()> {
        let invalid = |reason: &str| VramError::AttestationInvalid {
            reason: reason.to_owned(),
        };
        if self.verified_digest != self.record.digest {
            return Err(invalid(
                "the re-measured digest is not the sealed digest: the statement reports a verification that failed",
            ));
        }
        if self.verified_bytes != self.record.vram_bytes {
            return Err(invalid(
                "the re-hashed byte count is not the sealed byte count",
            ));
        }
        check_residency_fits(&self.residency, self.record.backend).map_err(invalid)?;
        if self.nonce != expected_nonce {
            return Err(invalid(
                "the nonce is not the one given: a replayed or foreign attestation",
            ));
        }
        Ok(())
    }
}

/// Whether a residency verdict is acceptable for a backend: `device_memory` with `cuda`, `simulated`
/// with `sim`; a violation never. `Err` is the reason, for an error message.
pub(crate) fn check_residency_fits(
    residency: &Residency,
    backend: BackendKind,
) -> std::result::Result<(), &'static str> {
    match (residency, backend) {
        (Residency::DeviceMemory, BackendKind::Cuda) | (Residency::Simulated, BackendKind::Sim) => {
            Ok(())
        }
        (Residency::Violation(_), _) => Err("the worker reports a VRAM-only policy violation"),
        _ => Err(
            "the residency verdict does not fit the backend (device_memory goes with cuda, simulated with sim)",
        ),
    }
}

impl AttestationEnvelope {
    /// An envelope around `payload`, signed by `identity` (DSSE).
    pub(crate) fn sign_payload(identity: &WorkerIdentity, payload: Vec<u8>) -> Self {
        let signature = identity.sign_dsse(PAYLOAD_TYPE, &payload);
        Self {
            payload,
            key_id: identity.public_key().key_id(),
            signature,
        }
    }

    /// The statement's `predicateType`, read from the payload **without** checking the signature:
    /// for choosing which verifier to call ([`verify`](Self::verify) for a shard,
    /// [`verify_model`](Self::verify_model) for a model). `None` when the payload is not a JSON
    /// object with a string `predicateType`.
    #[must_use]
    pub fn predicate_type(&self) -> Option<String> {
        #[derive(serde::Deserialize)]
        struct Peek {
            #[serde(rename = "predicateType")]
            predicate_type: String,
        }
        serde_json::from_slice::<Peek>(&self.payload)
            .ok()
            .map(|peek| peek.predicate_type)
    }

    /// Checks the Ed25519 signature over the DSSE PAE with `key` (strict), and that the envelope names
    /// that key.
    ///
    /// # Errors
    /// [`VramError::AttestationInvalid`].
    pub(crate) fn check_signature(&self, key: &PublicKey) -> Result<()> {
        if key
            .verify_dsse(PAYLOAD_TYPE, &self.payload, &self.signature)
            .is_err()
        {
            let reason = if self.key_id == key.key_id() {
                "the signature does not verify: the statement was changed".to_owned()
            } else {
                format!(
                    "the signature does not verify with key {}: the envelope names key {:?} (another worker, or a forgery)",
                    key.key_id(),
                    self.key_id
                )
            };
            return Err(VramError::AttestationInvalid { reason });
        }
        if self.key_id != key.key_id() {
            // DSSE's keyid is an unsigned hint; one that names another key is refused all the same,
            // so that no byte of an accepted envelope can be changed.
            return Err(VramError::AttestationInvalid {
                reason: format!(
                    "the envelope names key {:?}, not {}",
                    self.key_id,
                    key.key_id()
                ),
            });
        }
        Ok(())
    }

    /// The signed payload (the in-toto Statement's bytes).
    #[must_use]
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// The DSSE pre-authentication encoding the signature is over (what `openssl pkeyutl -verify
    /// -rawin` checks).
    #[must_use]
    pub fn pae(&self) -> Vec<u8> {
        dsse_pae(PAYLOAD_TYPE, &self.payload)
    }

    /// The Ed25519 signature.
    #[must_use]
    pub const fn signature(&self) -> &[u8; 64] {
        &self.signature
    }

    /// The key id the envelope names.
    #[must_use]
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The envelope as JSON (DSSE).
    #[must_use]
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "payloadType": PAYLOAD_TYPE,
            "payload": BASE64.encode(&self.payload),
            "signatures": [{ "keyid": self.key_id, "sig": BASE64.encode(self.signature) }],
        })
    }

    /// Parses a DSSE envelope strictly: this payload type, exactly one signature, standard base64.
    /// Does not verify: call [`verify`](Self::verify).
    ///
    /// # Errors
    /// [`VramError::MalformedRecord`] naming the first problem.
    pub fn from_json(text: &str) -> Result<Self> {
        if text.len() > MAX_ENVELOPE_BYTES {
            return Err(malformed("larger than 1 MiB"));
        }
        let wire: WireEnvelope =
            serde_json::from_str(text).map_err(|e| malformed(&e.to_string()))?;
        if wire.payload_type != PAYLOAD_TYPE {
            return Err(malformed(&format!("payloadType is not {PAYLOAD_TYPE}")));
        }
        let [signature] = wire.signatures.as_slice() else {
            return Err(malformed("exactly one signature is expected"));
        };
        let payload = BASE64
            .decode(&wire.payload)
            .map_err(|_| malformed("payload is not standard base64"))?;
        let sig = BASE64
            .decode(&signature.sig)
            .map_err(|_| malformed("sig is not standard base64"))?;
        let signature_bytes: [u8; 64] = sig
            .try_into()
            .map_err(|_| malformed("sig is not 64 bytes (Ed25519)"))?;
        Ok(Self {
            payload,
            key_id: signature.keyid.clone(),
            signature: signature_bytes,
        })
    }

    /// Verifies the envelope with the worker's **public key** and the nonce the verifier sent: the
    /// Ed25519 signature over the DSSE PAE (strict), then the statement, parsed strictly and checked
    /// for consistency (see the module docs). Returns what it states.
    ///
    /// # Errors
    /// [`VramError::AttestationInvalid`] (signature, consistency, nonce) or
    /// [`VramError::MalformedRecord`] (a signed payload that is not a statement of ours).
    pub fn verify(&self, key: &PublicKey, expected_nonce: &[u8]) -> Result<Attestation> {
        self.check_signature(key)?;
        if self.predicate_type().as_deref() == Some(MODEL_PREDICATE_TYPE) {
            return Err(malformed(
                "this is a model attestation (all shards of a model): verify it with verify_model",
            ));
        }
        let wire: Statement =
            serde_json::from_slice(&self.payload).map_err(|e| malformed(&e.to_string()))?;
        let attestation = Attestation::from_wire(&wire)?;
        let canonical = attestation.statement_bytes()?;
        if canonical != self.payload {
            return Err(malformed(
                "the statement is not in canonical form (a field disagrees with the seal record's bytes, or a spelling is not canonical)",
            ));
        }
        attestation.check_consistent(expected_nonce)?;
        Ok(attestation)
    }
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct WireEnvelope {
    #[serde(rename = "payloadType")]
    payload_type: String,
    payload: String,
    signatures: Vec<WireSignature>,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct WireSignature {
    keyid: String,
    sig: String,
}

#[derive(Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Statement {
    #[serde(rename = "_type")]
    type_: String,
    subject: Vec<Subject>,
    #[serde(rename = "predicateType")]
    predicate_type: String,
    predicate: Predicate,
}

#[derive(Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Subject {
    pub(crate) name: String,
    pub(crate) digest: SubjectDigest,
}

#[derive(Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SubjectDigest {
    #[serde(rename = "fsverity-sha256")]
    pub(crate) fsverity_sha256: String,
}

#[derive(Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Predicate {
    pub(crate) backend: String,
    pub(crate) seal: WireSeal,
    pub(crate) device: WireDevice,
    pub(crate) residency: WireResidency,
    pub(crate) nonce: String,
    pub(crate) attested_at_ns: u64,
    pub(crate) verification: WireVerification,
    pub(crate) audit_head: Option<WireHead>,
}

#[derive(Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WireSeal {
    pub(crate) record: String,
    pub(crate) tag: String,
    pub(crate) shard_id: String,
    pub(crate) model_ref: String,
    pub(crate) shard_index: u32,
    pub(crate) total_shards: u32,
    pub(crate) digest: String,
    pub(crate) vram_bytes: u64,
    pub(crate) gpu_device: u32,
    pub(crate) sealed_at_ns: u64,
    pub(crate) tensor_table_digest: Option<String>,
}

#[derive(Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WireDevice {
    pub(crate) uuid: String,
    pub(crate) name: String,
    pub(crate) driver_version: String,
    pub(crate) unified_memory: Option<UnifiedMemoryFacts>,
}

#[derive(Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WireResidency {
    pub(crate) verdict: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) detail: Option<String>,
}

#[derive(Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WireVerification {
    pub(crate) result: String,
    pub(crate) digest: String,
    pub(crate) vram_bytes: u64,
    pub(crate) elapsed_ns: u64,
}

#[derive(Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WireHead {
    pub(crate) seq: u64,
    pub(crate) hash: String,
}

impl WireSeal {
    /// The `seal` object of a shard sealed with `record` and `tag`.
    pub(crate) fn new(record: &SealRecord, tag: &Tag) -> Result<Self> {
        Ok(Self {
            record: hex::encode(record.encode()?),
            tag: format!("{}{}", crate::shard::SEAL_TAG_PREFIX, tag.to_hex()),
            shard_id: record.shard_id.as_str().to_owned(),
            model_ref: record.model_ref.clone(),
            shard_index: record.shard_index,
            total_shards: record.total_shards,
            digest: record.digest.to_string(),
            vram_bytes: record.vram_bytes,
            gpu_device: record.gpu_device,
            sealed_at_ns: record.sealed_at_ns,
            tensor_table_digest: record
                .tensor_table_digest
                .map(|d| format!("sha256:{}", hex::encode(d))),
        })
    }

    /// The seal record (decoded strictly from `record`) and the tag. The spelled-out fields are not
    /// read: the canonical-form check compares them with the record's.
    pub(crate) fn decode(&self) -> Result<(SealRecord, Tag)> {
        let record_bytes =
            hex::decode(&self.record).map_err(|_| malformed("seal.record is not hex"))?;
        let record = SealRecord::decode(&record_bytes)?;
        let tag = parse_tag(&self.tag, "seal.tag")?;
        Ok((record, tag))
    }
}

impl WireResidency {
    pub(crate) fn new(residency: &Residency) -> Self {
        let (verdict, detail) = match residency {
            Residency::DeviceMemory => ("device_memory", None),
            Residency::Simulated => ("simulated", None),
            Residency::Violation(detail) => ("violation", Some(detail.clone())),
        };
        Self {
            verdict: verdict.to_owned(),
            detail,
        }
    }

    pub(crate) fn decode(&self) -> Result<Residency> {
        match (self.verdict.as_str(), &self.detail) {
            ("device_memory", None) => Ok(Residency::DeviceMemory),
            ("simulated", None) => Ok(Residency::Simulated),
            ("violation", Some(detail)) => Ok(Residency::Violation(detail.clone())),
            _ => Err(malformed("unknown residency verdict")),
        }
    }
}

impl WireHead {
    pub(crate) fn new(head: AuditHead) -> Self {
        Self {
            seq: head.seq,
            hash: hex::encode(head.hash),
        }
    }

    pub(crate) fn decode(&self) -> Result<AuditHead> {
        Ok(AuditHead {
            seq: self.seq,
            hash: hex32(&self.hash, "audit_head.hash")?,
        })
    }
}

/// An `hmac-sha256:<hex>` tag.
pub(crate) fn parse_tag(text: &str, field: &str) -> Result<Tag> {
    let hex = text
        .strip_prefix(crate::shard::SEAL_TAG_PREFIX)
        .ok_or_else(|| malformed(&format!("{field} does not start with hmac-sha256:")))?;
    Ok(Tag::from_bytes(hex32(hex, field)?))
}

/// A `sha256:<hex>` digest.
pub(crate) fn parse_digest(text: &str, field: &str) -> Result<Digest> {
    text.parse()
        .map_err(|e: crate::ids::InvalidDigest| malformed(&format!("{field}: {e}")))
}

pub(crate) fn malformed(reason: &str) -> VramError {
    VramError::MalformedRecord {
        what: "attestation",
        reason: reason.to_owned(),
    }
}

fn hex32(text: &str, field: &str) -> Result<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(text, &mut out)
        .map_err(|_| malformed(&format!("{field} is not 64 hex digits")))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::ShardId;
    use crate::keys::WorkerToken;

    const TOKEN: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn token(t: &[u8]) -> WorkerToken {
        WorkerToken::from_bytes(t.to_vec()).unwrap()
    }

    fn sample() -> Attestation {
        let record = SealRecord {
            shard_id: ShardId::new("shard-a").unwrap(),
            digest: Digest::from_bytes([7; 32]),
            vram_bytes: 1 << 20,
            gpu_device: 0,
            device_uuid: *b"SIM-GPU-00000000",
            sealed_at_ns: 1_700_000_000_123_456_789,
            backend: BackendKind::Sim,
            model_ref: "llama-3-8b".to_owned(),
            shard_index: 0,
            total_shards: 1,
            tensor_table_digest: None,
        };
        Attestation {
            record,
            seal_tag: Tag::from_bytes([3; 32]),
            device_name: "sim device 0".to_owned(),
            driver_version: "sim".to_owned(),
            unified_memory: None,
            residency: Residency::Simulated,
            nonce: vec![0xab; 16],
            attested_at_ns: 1_700_000_001_000_000_000,
            verified_digest: Digest::from_bytes([7; 32]),
            verified_bytes: 1 << 20,
            verify_elapsed_ns: 1234,
            audit_head: Some(AuditHead {
                seq: 42,
                hash: [5; 32],
            }),
        }
    }

    fn signed(a: &Attestation) -> AttestationEnvelope {
        a.sign(&token(TOKEN).derive_keys().identity).unwrap()
    }

    #[test]
    fn an_envelope_verifies_with_the_public_key_alone_and_the_right_nonce_vp_006() {
        let envelope = signed(&sample());
        let text = envelope.to_json().to_string();
        let back = AttestationEnvelope::from_json(&text).unwrap();
        let public = token(TOKEN).public_key();
        let stated = back.verify(&public, &[0xab; 16]).unwrap();
        assert_eq!(stated.record, sample().record);
        assert_eq!(stated.audit_head, sample().audit_head);
        assert_eq!(back.key_id(), public.key_id());
        let err = back.verify(&public, &[0xac; 16]).unwrap_err().to_string();
        assert!(err.contains("nonce"), "{err}");
        let other = token(b"0123456789abcdef0123456789abcdeX").public_key();
        let err = back.verify(&other, &[0xab; 16]).unwrap_err().to_string();
        assert!(err.contains("another worker"), "{err}");
    }

    #[test]
    fn every_changed_byte_of_the_envelope_or_the_statement_fails_vp_006() {
        let envelope = signed(&sample());
        let public = token(TOKEN).public_key();
        let text = envelope.to_json().to_string();
        let check = |changed: &[u8]| {
            String::from_utf8(changed.to_vec())
                .ok()
                .map(|t| {
                    AttestationEnvelope::from_json(&t)
                        .and_then(|e| e.verify(&public, &[0xab; 16]))
                        .is_err()
                })
                .unwrap_or(true)
        };
        for i in 0..text.len() {
            let mut changed = text.as_bytes().to_vec();
            changed[i] = if changed[i] == b'0' { b'A' } else { b'0' };
            assert!(check(&changed), "envelope byte {i} passed");
        }
        // Every byte of the statement itself, re-encoded into an envelope with the old signature.
        let payload = envelope.payload().to_vec();
        for i in 0..payload.len() {
            let mut changed = payload.clone();
            changed[i] ^= 0x01;
            let forged = AttestationEnvelope {
                payload: changed,
                ..envelope.clone()
            };
            assert!(
                forged.verify(&public, &[0xab; 16]).is_err(),
                "payload byte {i}"
            );
        }
    }

    #[test]
    fn a_signed_but_inconsistent_statement_is_refused() {
        let public = token(TOKEN).public_key();
        let refuse = |a: Attestation, expect: &str| {
            let err = signed(&a)
                .verify(&public, &[0xab; 16])
                .unwrap_err()
                .to_string();
            assert!(err.contains(expect), "{expect}: {err}");
        };
        let mut a = sample();
        a.verified_digest = Digest::from_bytes([8; 32]);
        refuse(a, "not the sealed digest");
        let mut a = sample();
        a.verified_bytes -= 1;
        refuse(a, "byte count");
        let mut a = sample();
        a.residency = Residency::DeviceMemory;
        refuse(a, "does not fit the backend");
        let mut a = sample();
        a.residency = Residency::Violation("managed memory".to_owned());
        refuse(a, "violation");

        // A seal field that disagrees with the record's canonical bytes, signed by the worker key.
        let identity = token(TOKEN).derive_keys().identity;
        let statement = String::from_utf8(sample().statement_bytes().unwrap()).unwrap();
        for (from, to) in [
            (
                "\"vram_bytes\":1048576,\"gpu",
                "\"vram_bytes\":1048575,\"gpu",
            ),
            ("\"name\":\"shard-a\"", "\"name\":\"shard-b\""),
            (
                "\"model_ref\":\"llama-3-8b\"",
                "\"model_ref\":\"llama-3-70b\"",
            ),
        ] {
            assert!(statement.contains(from), "{from}");
            let edited = statement.replacen(from, to, 1).into_bytes();
            let envelope = AttestationEnvelope {
                signature: identity.sign_dsse(PAYLOAD_TYPE, &edited),
                payload: edited,
                key_id: identity.public_key().key_id(),
            };
            let err = envelope
                .verify(&public, &[0xab; 16])
                .unwrap_err()
                .to_string();
            assert!(err.contains("canonical form"), "{from}: {err}");
        }
    }

    #[test]
    fn nonces_outside_16_to_64_bytes_are_refused() {
        assert!(validate_nonce(&[0; 15]).is_err());
        assert!(validate_nonce(&[0; 16]).is_ok());
        assert!(validate_nonce(&[0; 64]).is_ok());
        assert!(validate_nonce(&[0; 65]).is_err());
        assert!(parse_nonce_hex("zz").is_err());
        assert_eq!(parse_nonce_hex(&"AB".repeat(16)).unwrap(), vec![0xab; 16]);
    }

    #[test]
    fn the_statement_is_an_in_toto_v1_statement_about_the_shard_and_says_its_backend() {
        let statement: serde_json::Value =
            serde_json::from_slice(&sample().statement_bytes().unwrap()).unwrap();
        assert_eq!(statement["_type"], STATEMENT_TYPE);
        assert_eq!(statement["predicateType"], PREDICATE_TYPE);
        assert_eq!(statement["subject"][0]["name"], "shard-a");
        assert_eq!(
            statement["subject"][0]["digest"]["fsverity-sha256"],
            hex::encode([7u8; 32])
        );
        assert_eq!(statement["predicate"]["backend"], "sim");
        let envelope = signed(&sample()).to_json();
        assert_eq!(envelope["payloadType"], PAYLOAD_TYPE);
        assert_eq!(envelope["signatures"].as_array().unwrap().len(), 1);
    }
}
