//! Attestations: a signed statement that a sealed shard is resident and intact *now*, for a caller's
//! nonce (VP-006).
//!
//! [`VramManager::attest`](crate::VramManager::attest) makes a **fresh** verification of the shard (seal
//! HMAC, residency, digest re-measured where the bytes are) and then signs, under the worker's
//! **attestation key**, a canonical encoding of: the shard's seal record (its exact canonical bytes)
//! and seal tag, the device's name, the driver version (`sim` for the simulated backend), the backend,
//! the residency verdict, the caller's nonce, the time, and the result of that verification. The MAC is
//! HMAC-SHA256 over this encoding (domain tag + version, fixed-width or length-prefixed fields, never
//! re-serialised JSON):
//!
//! ```text
//! u8+n    domain                  u8 length (29) + "vram-residency/attestation/v1"
//! u16     version                 1
//! u8      backend                 1 = cuda, 2 = sim
//! u32+n   seal record             canonical seal-record bytes (docs/seal-record.md)
//! [32]    seal tag
//! u16+n   device name             UTF-8
//! u16+n   driver version          UTF-8 ("sim" for the simulated backend)
//! u8      residency verdict       1 = device_memory, 2 = simulated, 3 = violation
//! u16+n   residency detail        UTF-8, empty unless violation
//! u8+n    nonce                   16..=64 bytes chosen by the caller
//! u64     attested_at_ns          nanoseconds since the Unix epoch
//! u8      verification result     1 = verified (the only result an attestation is made for)
//! [32]    measured digest         fs-verity digest re-measured for this attestation
//! u64     verified bytes
//! u64     verification time, ns
//! ```
//!
//! The JSON form ([`Attestation::to_json`]) carries every field once, in one textual form, plus the
//! MAC. [`Attestation::from_json`] is strict: unknown fields, missing fields and any non-canonical
//! spelling (upper-case hex, say) are refused, so a changed byte of content cannot pass. An
//! attestation contains no pointer, no token and no key. `docs/attestation.md` has a worked example
//! that a test recomputes.

use crate::backend::{BackendKind, Residency};
use crate::digest::Digest;
use crate::error::{Result, VramError};
use crate::keys::{AttestationKey, Tag};
use crate::seal::{SealRecord, put_str};
use crate::shard::{ShardId, format_uuid};

/// Domain-separation tag at the start of every attestation encoding.
pub const ATTESTATION_DOMAIN: &[u8] = b"vram-residency/attestation/v1";
#[expect(clippy::cast_possible_truncation, reason = "a 29-byte constant")]
const ATTESTATION_DOMAIN_LEN: u8 = ATTESTATION_DOMAIN.len() as u8;
/// Version of the encoding.
pub const ATTESTATION_VERSION: u16 = 1;
/// Shortest nonce accepted, in bytes.
pub const MIN_NONCE_LEN: usize = 16;
/// Longest nonce accepted, in bytes.
pub const MAX_NONCE_LEN: usize = 64;
/// The `format` field of the JSON form.
pub const ATTESTATION_FORMAT: &str = "vram-residency/attestation/v1";

/// A signed residency statement. Public data: it travels to whoever asked for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attestation {
    /// The shard's seal record as sealed (its backend is the attestation's backend).
    pub record: SealRecord,
    /// The shard's seal tag.
    pub seal_tag: Tag,
    /// The device's name.
    pub device_name: String,
    /// The driver version (`sim` for the simulated backend).
    pub driver_version: String,
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
    /// HMAC-SHA256 of [`encode`](Self::encode) under the attestation key.
    pub mac: Tag,
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
                "it is {} bytes; {MIN_NONCE_LEN} to {MAX_NONCE_LEN} bytes are required (32 to 128 hex digits)",
                nonce.len()
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

impl Attestation {
    /// The canonical encoding of everything but the MAC (see the module docs).
    ///
    /// # Errors
    /// [`VramError::InvalidInput`] when a field is out of range (nonce length, over-long strings).
    pub fn encode(&self) -> Result<Vec<u8>> {
        validate_nonce(&self.nonce)?;
        let record = self.record.encode()?;
        let mut out = Vec::with_capacity(record.len().saturating_add(300));
        out.push(ATTESTATION_DOMAIN_LEN);
        out.extend_from_slice(ATTESTATION_DOMAIN);
        out.extend_from_slice(&ATTESTATION_VERSION.to_be_bytes());
        out.push(self.record.backend.code());
        let record_len = u32::try_from(record.len()).map_err(|_| too_long("seal record"))?;
        out.extend_from_slice(&record_len.to_be_bytes());
        out.extend_from_slice(&record);
        out.extend_from_slice(&self.seal_tag.0);
        put_str(&mut out, &self.device_name, "device name")?;
        put_str(&mut out, &self.driver_version, "driver version")?;
        let (verdict, detail) = match &self.residency {
            Residency::DeviceMemory => (1u8, ""),
            Residency::Simulated => (2, ""),
            Residency::Violation(detail) => (3, detail.as_str()),
        };
        out.push(verdict);
        put_str(&mut out, detail, "residency detail")?;
        let nonce_len = u8::try_from(self.nonce.len()).map_err(|_| too_long("nonce"))?;
        out.push(nonce_len);
        out.extend_from_slice(&self.nonce);
        out.extend_from_slice(&self.attested_at_ns.to_be_bytes());
        out.push(1); // verification result: verified
        out.extend_from_slice(self.verified_digest.as_bytes());
        out.extend_from_slice(&self.verified_bytes.to_be_bytes());
        out.extend_from_slice(&self.verify_elapsed_ns.to_be_bytes());
        Ok(out)
    }

    /// Computes and sets the MAC.
    ///
    /// # Errors
    /// As [`encode`](Self::encode).
    pub fn sign(&mut self, key: &AttestationKey) -> Result<()> {
        self.mac = key.sign(&self.encode()?);
        Ok(())
    }

    /// Checks the MAC (constant time) and then that the nonce is the one the caller sent.
    ///
    /// # Errors
    /// [`VramError::AttestationInvalid`]: the MAC does not verify (changed, or another token), or the
    /// nonce differs (a replay). Never carries the expected MAC.
    pub fn verify(&self, key: &AttestationKey, expected_nonce: &[u8]) -> Result<()> {
        let encoded = self.encode().map_err(|e| VramError::AttestationInvalid {
            reason: format!("it cannot be encoded: {e}"),
        })?;
        key.verify(&encoded, &self.mac)
            .map_err(|_| VramError::AttestationInvalid {
                reason: "the MAC does not verify: the statement was changed, or it was made under another token"
                    .to_owned(),
            })?;
        if self.nonce != expected_nonce {
            return Err(VramError::AttestationInvalid {
                reason: "the nonce is not the one given: a replayed or foreign attestation"
                    .to_owned(),
            });
        }
        Ok(())
    }

    /// The JSON form: every field once, then the MAC.
    #[must_use]
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self.to_wire()).unwrap_or(serde_json::Value::Null)
    }

    /// Parses the JSON form strictly (see the module docs). Does not verify: call
    /// [`verify`](Self::verify).
    ///
    /// # Errors
    /// [`VramError::MalformedRecord`] naming the first problem.
    pub fn from_json(text: &str) -> Result<Self> {
        let wire: Wire = serde_json::from_str(text).map_err(|e| malformed(&e.to_string()))?;
        let attestation = Self::from_wire(&wire)?;
        if attestation.to_wire() != wire {
            return Err(malformed(
                "a field is not in canonical form (lower-case hex, canonical UUID, digest prefix)",
            ));
        }
        Ok(attestation)
    }

    fn to_wire(&self) -> Wire {
        let (verdict, detail) = match &self.residency {
            Residency::DeviceMemory => ("device_memory", None),
            Residency::Simulated => ("simulated", None),
            Residency::Violation(detail) => ("violation", Some(detail.clone())),
        };
        Wire {
            format: ATTESTATION_FORMAT.to_owned(),
            backend: self.record.backend.name().to_owned(),
            shard: WireShard {
                shard_id: self.record.shard_id.as_str().to_owned(),
                digest: self.record.digest.to_string(),
                vram_bytes: self.record.vram_bytes,
                gpu_device: self.record.gpu_device,
                sealed_at_ns: self.record.sealed_at_ns,
                model_ref: self.record.model_ref.clone(),
                shard_index: self.record.shard_index,
                total_shards: self.record.total_shards,
                tensor_table_digest: self.record.tensor_table_digest.map(hex::encode),
                seal_tag: self.seal_tag.to_hex(),
            },
            device: WireDevice {
                uuid: format_uuid(&self.record.device_uuid),
                name: self.device_name.clone(),
                driver_version: self.driver_version.clone(),
            },
            residency: WireResidency {
                verdict: verdict.to_owned(),
                detail,
            },
            nonce: hex::encode(&self.nonce),
            attested_at_ns: self.attested_at_ns,
            verification: WireVerification {
                result: "verified".to_owned(),
                digest: self.verified_digest.to_string(),
                vram_bytes: self.verified_bytes,
                elapsed_ns: self.verify_elapsed_ns,
            },
            mac: self.mac.to_hex(),
        }
    }

    fn from_wire(wire: &Wire) -> Result<Self> {
        if wire.format != ATTESTATION_FORMAT {
            return Err(malformed(
                "unknown format (expected vram-residency/attestation/v1)",
            ));
        }
        let backend: BackendKind = wire
            .backend
            .parse()
            .map_err(|_| malformed("unknown backend"))?;
        if wire.verification.result != "verified" {
            return Err(malformed("unknown verification result"));
        }
        let residency = match (wire.residency.verdict.as_str(), &wire.residency.detail) {
            ("device_memory", None) => Residency::DeviceMemory,
            ("simulated", None) => Residency::Simulated,
            ("violation", Some(detail)) => Residency::Violation(detail.clone()),
            _ => return Err(malformed("unknown residency verdict")),
        };
        let shard = &wire.shard;
        let record = SealRecord {
            shard_id: ShardId::new(&shard.shard_id).map_err(|e| malformed(&e.to_string()))?,
            digest: shard
                .digest
                .parse()
                .map_err(|e: VramError| malformed(&e.to_string()))?,
            vram_bytes: shard.vram_bytes,
            gpu_device: shard.gpu_device,
            device_uuid: parse_uuid(&wire.device.uuid)?,
            sealed_at_ns: shard.sealed_at_ns,
            backend,
            model_ref: shard.model_ref.clone(),
            shard_index: shard.shard_index,
            total_shards: shard.total_shards,
            tensor_table_digest: shard
                .tensor_table_digest
                .as_deref()
                .map(|h| hex32(h, "tensor_table_digest"))
                .transpose()?,
        };
        Ok(Self {
            record,
            seal_tag: Tag(hex32(&shard.seal_tag, "seal_tag")?),
            device_name: wire.device.name.clone(),
            driver_version: wire.device.driver_version.clone(),
            residency,
            nonce: hex::decode(&wire.nonce).map_err(|_| malformed("nonce is not hex"))?,
            attested_at_ns: wire.attested_at_ns,
            verified_digest: wire
                .verification
                .digest
                .parse()
                .map_err(|e: VramError| malformed(&e.to_string()))?,
            verified_bytes: wire.verification.vram_bytes,
            verify_elapsed_ns: wire.verification.elapsed_ns,
            mac: Tag(hex32(&wire.mac, "mac")?),
        })
    }
}

#[derive(Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    format: String,
    backend: String,
    shard: WireShard,
    device: WireDevice,
    residency: WireResidency,
    nonce: String,
    attested_at_ns: u64,
    verification: WireVerification,
    mac: String,
}

#[derive(Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct WireShard {
    shard_id: String,
    digest: String,
    vram_bytes: u64,
    gpu_device: u32,
    sealed_at_ns: u64,
    model_ref: String,
    shard_index: u32,
    total_shards: u32,
    tensor_table_digest: Option<String>,
    seal_tag: String,
}

#[derive(Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct WireDevice {
    uuid: String,
    name: String,
    driver_version: String,
}

#[derive(Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct WireResidency {
    verdict: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    detail: Option<String>,
}

#[derive(Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct WireVerification {
    result: String,
    digest: String,
    vram_bytes: u64,
    elapsed_ns: u64,
}

fn malformed(reason: &str) -> VramError {
    VramError::MalformedRecord {
        what: "attestation",
        reason: reason.to_owned(),
    }
}

fn too_long(field: &'static str) -> VramError {
    VramError::InvalidInput {
        field,
        reason: "too long for its length prefix".to_owned(),
    }
}

fn hex32(text: &str, field: &str) -> Result<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(text, &mut out)
        .map_err(|_| malformed(&format!("{field} is not 64 hex digits")))?;
    Ok(out)
}

fn parse_uuid(text: &str) -> Result<[u8; 16]> {
    let digits: String = text.chars().filter(|&c| c != '-').collect();
    let mut out = [0u8; 16];
    hex::decode_to_slice(&digits, &mut out).map_err(|_| malformed("device uuid is not a UUID"))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::WorkerToken;

    fn keys(token: &[u8]) -> crate::keys::KeySet {
        WorkerToken::from_bytes(token.to_vec())
            .unwrap()
            .derive_keys()
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
        let mut a = Attestation {
            record,
            seal_tag: Tag([3; 32]),
            device_name: "sim device 0".to_owned(),
            driver_version: "sim".to_owned(),
            residency: Residency::Simulated,
            nonce: vec![0xab; 16],
            attested_at_ns: 1_700_000_001_000_000_000,
            verified_digest: Digest::from_bytes([7; 32]),
            verified_bytes: 1 << 20,
            verify_elapsed_ns: 1234,
            mac: Tag([0; 32]),
        };
        a.sign(&keys(b"0123456789abcdef0123456789abcdef").attestation)
            .unwrap();
        a
    }

    #[test]
    fn json_round_trip_verifies_with_the_right_key_and_nonce_vp_006() {
        let a = sample();
        let text = a.to_json().to_string();
        let back = Attestation::from_json(&text).unwrap();
        assert_eq!(back, a);
        let key = keys(b"0123456789abcdef0123456789abcdef").attestation;
        back.verify(&key, &[0xab; 16]).unwrap();
        assert!(back.verify(&key, &[0xac; 16]).is_err());
        let other = keys(b"0123456789abcdef0123456789abcdeX").attestation;
        assert!(back.verify(&other, &[0xab; 16]).is_err());
        // The seal key cannot stand in for the attestation key.
        let seal_signed = keys(b"0123456789abcdef0123456789abcdef")
            .seal
            .sign(&a.encode().unwrap());
        assert_ne!(seal_signed, a.mac);
    }

    #[test]
    fn every_changed_byte_of_the_json_fails_vp_006() {
        let a = sample();
        let key = keys(b"0123456789abcdef0123456789abcdef").attestation;
        let text = a.to_json().to_string();
        let bytes = text.as_bytes();
        for i in 0..bytes.len() {
            for replacement in [b'0', b'9', b'a', b'A', b'"', b'x'] {
                if bytes[i] == replacement {
                    continue;
                }
                let mut changed = bytes.to_vec();
                changed[i] = replacement;
                let Ok(changed) = String::from_utf8(changed) else {
                    continue;
                };
                let result = Attestation::from_json(&changed)
                    .and_then(|parsed| parsed.verify(&key, &[0xab; 16]));
                assert!(
                    result.is_err(),
                    "byte {i} -> {:?} passed",
                    replacement as char
                );
            }
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
    fn the_encoding_starts_with_its_domain_and_says_its_backend() {
        let a = sample();
        let e = a.encode().unwrap();
        assert_eq!(e[0] as usize, ATTESTATION_DOMAIN.len());
        assert_eq!(&e[1..30], ATTESTATION_DOMAIN);
        assert_eq!(e[32], BackendKind::Sim.code());
        assert_eq!(a.to_json()["backend"], "sim");
    }
}
