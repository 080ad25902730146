//! Model attestations: one signed statement that **every shard of a model** is resident and intact
//! now, for a caller's nonce (VP-006), checkable with the worker's public key alone.
//!
//! [`VramManager::attest_model`](crate::VramManager::attest_model) runs a fresh
//! [`verify_model`](crate::VramManager::verify_model) (the model seal's HMAC, the set of shards
//! against it, and every shard verified where its bytes are, in parallel across GPUs), then signs
//! one in-toto Statement v1 in the same DSSE envelope and with the same Ed25519 key as a shard's
//! attestation ([`crate::attestation`]), under its own predicate type:
//!
//! ```text
//! payload   {"_type":"https://in-toto.io/Statement/v1",
//!            "subject":[{"name":<shard id>,"digest":{"fsverity-sha256":<hex>}}, ... one per shard,
//!                       in index order, from the model seal record],
//!            "predicateType":"https://example.invalid/vram-residency/model-residency/v1",
//!            "predicate":{ backend,
//!                          model {record, tag, record_digest, model_ref, total_shards, sealed_at_ns},
//!                          shards [{seal {record, tag, fields}, device {uuid, name, driver_version,
//!                                   unified_memory}, residency {verdict}, verification {result,
//!                                   digest, vram_bytes, elapsed_ns}}, ... in index order],
//!                          nonce, attested_at_ns,
//!                          verification {result, vram_bytes, elapsed_ns}, audit_head }}
//! ```
//!
//! [`AttestationEnvelope::verify_model`] checks the signature, then **completeness**: the model seal
//! record decodes (exactly `total_shards` entries, indices `0..total_shards` in order), the subjects
//! are exactly its entries, every index has exactly one shard, each shard's own seal record matches
//! its entry (id, digest, size, GPU, device UUID, seal tag) and the model (`model_ref`,
//! `total_shards`, backend), each fresh digest equals the sealed one, and the nonce is the verifier's.
//! The shard verifier ([`AttestationEnvelope::verify`]) refuses a model statement and this one
//! refuses a shard statement. `docs/attestation.md` ("Model attestation") specifies it.

use crate::attestation::{AttestationEnvelope, PREDICATE_TYPE};
use crate::attestation::{
    MODEL_PREDICATE_TYPE, STATEMENT_TYPE, Subject, SubjectDigest, WireDevice, WireHead,
    WireResidency, WireSeal, WireVerification, check_residency_fits, malformed, parse_digest,
    parse_tag,
};
use crate::audit::AuditHead;
use crate::backend::{Residency, UnifiedMemoryFacts};
use crate::digest::Digest;
use crate::error::{Result, VramError};
use crate::ids::format_uuid;
use crate::keys::{PublicKey, Tag, WorkerIdentity};
use crate::model_seal::ModelSealRecord;
use crate::seal::SealRecord;

/// One shard as a model attestation states it. Public data.
#[derive(Debug, Clone)]
pub struct AttestedShard {
    /// The shard's seal record as sealed.
    pub record: SealRecord,
    /// The shard's seal tag.
    pub seal_tag: Tag,
    /// The device's name.
    pub device_name: String,
    /// The driver version (`sim` on the simulated backend).
    pub driver_version: String,
    /// What the driver says about unified memory on the device (`None` on `sim`).
    pub unified_memory: Option<UnifiedMemoryFacts>,
    /// Where the backend found the shard's bytes in the fresh verification.
    pub residency: Residency,
    /// The digest re-measured in device memory for this attestation.
    pub verified_digest: Digest,
    /// Bytes re-hashed.
    pub verified_bytes: u64,
    /// How long the shard's verification took, in ns.
    pub verify_elapsed_ns: u64,
}

/// What a model attestation states. Public data.
#[derive(Debug, Clone)]
pub struct ModelAttestation {
    /// The model seal record (its backend is the attestation's backend).
    pub model: ModelSealRecord,
    /// The model seal's tag (HMAC-SHA256, checkable only by the worker).
    pub model_tag: Tag,
    /// Every shard, in index order: `shards[i]` is shard `i`.
    pub shards: Vec<AttestedShard>,
    /// The caller's nonce.
    pub nonce: Vec<u8>,
    /// When the statement was made, ns since the Unix epoch.
    pub attested_at_ns: u64,
    /// Wall time of the whole fresh model verification (shards on different GPUs in parallel), ns.
    pub verify_elapsed_ns: u64,
    /// The worker's audit log head after the verification was recorded, when it keeps a durable log.
    pub audit_head: Option<AuditHead>,
}

impl ModelAttestation {
    /// Total bytes of all shards, as the model seal names them.
    #[must_use]
    pub fn total_bytes(&self) -> u64 {
        self.model
            .shards
            .iter()
            .fold(0u64, |sum, entry| sum.saturating_add(entry.vram_bytes))
    }

    /// The in-toto Statement, serialised: the bytes the envelope carries and signs.
    ///
    /// # Errors
    /// [`VramError::InvalidInput`] for a bad nonce, seal record or model seal record.
    pub fn statement_bytes(&self) -> Result<Vec<u8>> {
        crate::attestation::statement_bytes(&self.nonce, &self.to_wire()?)
    }

    /// Signs the statement with the worker's identity.
    pub(crate) fn sign(&self, identity: &WorkerIdentity) -> Result<AttestationEnvelope> {
        Ok(AttestationEnvelope::sign_payload(
            identity,
            self.statement_bytes()?,
        ))
    }

    fn to_wire(&self) -> Result<ModelStatement> {
        let model = &self.model;
        let total_shards = model.total_shards()?;
        let shards = self
            .shards
            .iter()
            .map(|shard| {
                Ok(WireModelShard {
                    seal: WireSeal::new(&shard.record, &shard.seal_tag)?,
                    device: WireDevice {
                        uuid: format_uuid(&shard.record.device_uuid),
                        name: shard.device_name.clone(),
                        driver_version: shard.driver_version.clone(),
                        unified_memory: shard.unified_memory,
                    },
                    residency: WireResidency::new(&shard.residency),
                    verification: WireVerification {
                        result: "verified".to_owned(),
                        digest: shard.verified_digest.to_string(),
                        vram_bytes: shard.verified_bytes,
                        elapsed_ns: shard.verify_elapsed_ns,
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let verified_bytes = self
            .shards
            .iter()
            .fold(0u64, |sum, shard| sum.saturating_add(shard.verified_bytes));
        Ok(ModelStatement {
            type_: STATEMENT_TYPE.to_owned(),
            subject: model
                .shards
                .iter()
                .map(|entry| Subject {
                    name: entry.shard_id.as_str().to_owned(),
                    digest: SubjectDigest {
                        fsverity_sha256: hex::encode(entry.digest.as_bytes()),
                    },
                })
                .collect(),
            predicate_type: MODEL_PREDICATE_TYPE.to_owned(),
            predicate: ModelPredicate {
                backend: model.backend.name().to_owned(),
                model: WireModelSeal {
                    record: hex::encode(model.encode()?),
                    tag: format!(
                        "{}{}",
                        crate::shard::SEAL_TAG_PREFIX,
                        self.model_tag.to_hex()
                    ),
                    record_digest: model.record_digest()?,
                    model_ref: model.model_ref.clone(),
                    total_shards,
                    sealed_at_ns: model.sealed_at_ns,
                },
                shards,
                nonce: hex::encode(&self.nonce),
                attested_at_ns: self.attested_at_ns,
                verification: WireModelVerification {
                    result: "verified".to_owned(),
                    vram_bytes: verified_bytes,
                    elapsed_ns: self.verify_elapsed_ns,
                },
                audit_head: self.audit_head.map(WireHead::new),
            },
        })
    }

    fn from_wire(wire: &ModelStatement) -> Result<Self> {
        if wire.type_ != STATEMENT_TYPE {
            return Err(malformed("_type is not an in-toto Statement v1"));
        }
        if wire.predicate_type != MODEL_PREDICATE_TYPE {
            return Err(malformed(&format!(
                "unknown predicateType (expected {MODEL_PREDICATE_TYPE})"
            )));
        }
        let predicate = &wire.predicate;
        let record_bytes = hex::decode(&predicate.model.record)
            .map_err(|_| malformed("model.record is not hex"))?;
        let model = ModelSealRecord::decode(&record_bytes)?;
        let model_tag = parse_tag(&predicate.model.tag, "model.tag")?;
        if predicate.verification.result != "verified" {
            return Err(malformed("unknown verification result"));
        }
        let shards = predicate
            .shards
            .iter()
            .map(|shard| {
                let (record, seal_tag) = shard.seal.decode()?;
                if shard.verification.result != "verified" {
                    return Err(malformed("unknown verification result"));
                }
                Ok(AttestedShard {
                    record,
                    seal_tag,
                    device_name: shard.device.name.clone(),
                    driver_version: shard.device.driver_version.clone(),
                    unified_memory: shard.device.unified_memory,
                    residency: shard.residency.decode()?,
                    verified_digest: parse_digest(
                        &shard.verification.digest,
                        "verification.digest",
                    )?,
                    verified_bytes: shard.verification.vram_bytes,
                    verify_elapsed_ns: shard.verification.elapsed_ns,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            model,
            model_tag,
            shards,
            nonce: hex::decode(&predicate.nonce).map_err(|_| malformed("nonce is not hex"))?,
            attested_at_ns: predicate.attested_at_ns,
            verify_elapsed_ns: predicate.verification.elapsed_ns,
            audit_head: predicate
                .audit_head
                .as_ref()
                .map(WireHead::decode)
                .transpose()?,
        })
    }

    /// The checks a verifier makes on a statement whose signature verified: the subjects and the
    /// shards are exactly the model seal's, each shard consistent with its entry and with itself,
    /// and the nonce is the verifier's.
    fn check_complete(
        &self,
        subjects: &[Subject],
        backend_name: &str,
        expected_nonce: &[u8],
    ) -> Result<()> {
        let invalid = |reason: String| VramError::AttestationInvalid { reason };
        let model = &self.model;
        let total = model.shards.len();
        if backend_name != model.backend.name() {
            return Err(invalid(format!(
                "the statement's backend {backend_name:?} is not the model seal's ({})",
                model.backend
            )));
        }
        // The subjects are exactly the model seal's entries, in index order.
        if subjects.len() != total {
            return Err(invalid(format!(
                "the statement has {} subject(s), the model seal names {total} shard(s)",
                subjects.len()
            )));
        }
        for (entry, subject) in model.shards.iter().zip(subjects) {
            if subject.name != entry.shard_id.as_str()
                || subject.digest.fsverity_sha256 != hex::encode(entry.digest.as_bytes())
            {
                return Err(invalid(format!(
                    "subject {} is not shard {} of the model seal (id or digest differs)",
                    entry.shard_index, entry.shard_index
                )));
            }
        }
        // Every index 0..total exactly once.
        let mut seen = vec![false; total];
        for shard in &self.shards {
            let index = shard.record.shard_index;
            let slot = usize::try_from(index).ok().and_then(|i| seen.get_mut(i));
            match slot {
                None => {
                    return Err(invalid(format!(
                        "shard {index} ({}) is not part of the model (it has {total} shard(s))",
                        shard.record.shard_id
                    )));
                }
                Some(true) => {
                    return Err(invalid(format!("shard {index} appears more than once")));
                }
                Some(slot) => *slot = true,
            }
        }
        if let Some(missing) = seen.iter().position(|present| !present) {
            return Err(invalid(format!(
                "shard {missing} of the model seal is missing from the statement"
            )));
        }
        // Each shard matches its entry and the model, in index order.
        for (position, (entry, shard)) in model.shards.iter().zip(&self.shards).enumerate() {
            let record = &shard.record;
            let index = entry.shard_index;
            if usize::try_from(record.shard_index).ok() != Some(position) {
                return Err(invalid(format!(
                    "the shards are not in index order: position {position} holds shard {}",
                    record.shard_index
                )));
            }
            if let Some(reason) = entry.difference(record, &shard.seal_tag) {
                return Err(invalid(format!(
                    "shard {index} ({}) is not the model seal's shard {index}: {reason}",
                    record.shard_id
                )));
            }
            if record.model_ref != model.model_ref {
                return Err(invalid(format!(
                    "shard {index}'s seal names model {:?}, the model seal {:?}",
                    record.model_ref, model.model_ref
                )));
            }
            if usize::try_from(record.total_shards).ok() != Some(total) {
                return Err(invalid(format!(
                    "shard {index}'s seal says the model has {} shard(s), the model seal {total}",
                    record.total_shards
                )));
            }
            if record.backend != model.backend {
                return Err(invalid(format!(
                    "shard {index} was sealed on backend {}, the model on {}",
                    record.backend, model.backend
                )));
            }
            if shard.verified_digest != record.digest {
                return Err(invalid(format!(
                    "shard {index}: the re-measured digest is not the sealed digest (the statement reports a verification that failed)"
                )));
            }
            if shard.verified_bytes != record.vram_bytes {
                return Err(invalid(format!(
                    "shard {index}: the re-hashed byte count is not the sealed byte count"
                )));
            }
            check_residency_fits(&shard.residency, record.backend)
                .map_err(|reason| invalid(format!("shard {index}: {reason}")))?;
        }
        if self.nonce != expected_nonce {
            return Err(invalid(
                "the nonce is not the one given: a replayed or foreign attestation".to_owned(),
            ));
        }
        Ok(())
    }
}

impl AttestationEnvelope {
    /// Verifies a **model** attestation with the worker's public key and the verifier's nonce: the
    /// Ed25519 signature over the DSSE PAE (strict), then the statement, parsed strictly, checked for
    /// completeness against the model seal record it carries (see [`crate::model_attestation`]) and
    /// in canonical form. Returns what it states.
    ///
    /// # Errors
    /// [`VramError::AttestationInvalid`] (signature, completeness, consistency, nonce) or
    /// [`VramError::MalformedRecord`] (a signed payload that is not a model statement of ours,
    /// including a shard attestation: verify that with [`verify`](Self::verify)).
    pub fn verify_model(&self, key: &PublicKey, expected_nonce: &[u8]) -> Result<ModelAttestation> {
        self.check_signature(key)?;
        if self.predicate_type().as_deref() == Some(PREDICATE_TYPE) {
            return Err(malformed(
                "this is a shard attestation, not a model attestation: verify it with verify",
            ));
        }
        let wire: ModelStatement =
            serde_json::from_slice(self.payload()).map_err(|e| malformed(&e.to_string()))?;
        let attestation = ModelAttestation::from_wire(&wire)?;
        attestation.check_complete(&wire.subject, &wire.predicate.backend, expected_nonce)?;
        let canonical = attestation.statement_bytes()?;
        if canonical != self.payload() {
            return Err(malformed(
                "the statement is not in canonical form (a field disagrees with the seal records' bytes, or a spelling is not canonical)",
            ));
        }
        Ok(attestation)
    }
}

/// What `attest verify` found in an envelope: a shard attestation or a model attestation.
#[derive(Debug, Clone)]
pub enum VerifiedAttestation {
    /// A shard's ([`crate::attestation`]).
    Shard(Box<crate::attestation::Attestation>),
    /// A model's (this module).
    Model(Box<ModelAttestation>),
}

impl AttestationEnvelope {
    /// Verifies either kind, choosing by the statement's `predicateType`:
    /// [`verify_model`](Self::verify_model) for a model attestation, [`verify`](Self::verify)
    /// otherwise. Both check the signature first.
    ///
    /// # Errors
    /// As the verifier chosen.
    pub fn verify_any(
        &self,
        key: &PublicKey,
        expected_nonce: &[u8],
    ) -> Result<VerifiedAttestation> {
        if self.predicate_type().as_deref() == Some(MODEL_PREDICATE_TYPE) {
            self.verify_model(key, expected_nonce)
                .map(|a| VerifiedAttestation::Model(Box::new(a)))
        } else {
            self.verify(key, expected_nonce)
                .map(|a| VerifiedAttestation::Shard(Box::new(a)))
        }
    }
}

#[derive(Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelStatement {
    #[serde(rename = "_type")]
    type_: String,
    subject: Vec<Subject>,
    #[serde(rename = "predicateType")]
    predicate_type: String,
    predicate: ModelPredicate,
}

#[derive(Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelPredicate {
    backend: String,
    model: WireModelSeal,
    shards: Vec<WireModelShard>,
    nonce: String,
    attested_at_ns: u64,
    verification: WireModelVerification,
    audit_head: Option<WireHead>,
}

#[derive(Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct WireModelSeal {
    record: String,
    tag: String,
    record_digest: String,
    model_ref: String,
    total_shards: u32,
    sealed_at_ns: u64,
}

#[derive(Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct WireModelShard {
    seal: WireSeal,
    device: WireDevice,
    residency: WireResidency,
    verification: WireVerification,
}

#[derive(Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct WireModelVerification {
    result: String,
    vram_bytes: u64,
    elapsed_ns: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::ShardId;
    use crate::keys::WorkerToken;
    use crate::model_seal::ModelShardEntry;

    const TOKEN: &[u8] = b"0123456789abcdef0123456789abcdef";
    const NONCE: [u8; 16] = [0xab; 16];

    fn token() -> WorkerToken {
        WorkerToken::from_bytes(TOKEN.to_vec()).unwrap()
    }

    fn shard_record(model_ref: &str, index: u32, total: u32, fill: u8) -> SealRecord {
        SealRecord {
            shard_id: ShardId::new(&format!("{}-shard-{index}", fill)).unwrap(),
            digest: Digest::from_bytes([fill.wrapping_add(u8::try_from(index).unwrap()); 32]),
            vram_bytes: 4096 * u64::from(index + 1),
            gpu_device: index,
            device_uuid: crate::sim::SimBackend::device_uuid(index),
            sealed_at_ns: 1_700_000_000_000_000_000,
            backend: crate::backend::BackendKind::Sim,
            model_ref: model_ref.to_owned(),
            shard_index: index,
            total_shards: total,
            tensor_table_digest: None,
        }
    }

    fn attested(record: SealRecord, tag: Tag) -> AttestedShard {
        AttestedShard {
            seal_tag: tag,
            device_name: format!("sim device {}", record.gpu_device),
            driver_version: "sim".to_owned(),
            unified_memory: None,
            residency: Residency::Simulated,
            verified_digest: record.digest,
            verified_bytes: record.vram_bytes,
            verify_elapsed_ns: 1000,
            record,
        }
    }

    /// A model of 3 shards on 3 sim GPUs, sealed and attested with the test token's keys.
    fn sample() -> ModelAttestation {
        let keys = token().derive_keys();
        let shards: Vec<AttestedShard> = (0..3)
            .map(|i| {
                let record = shard_record("example/model", i, 3, 10);
                let tag = record.sign(&keys.seal).unwrap();
                attested(record, tag)
            })
            .collect();
        let model = ModelSealRecord {
            backend: crate::backend::BackendKind::Sim,
            model_ref: "example/model".to_owned(),
            sealed_at_ns: 1_700_000_001_000_000_000,
            shards: shards
                .iter()
                .map(|s| ModelShardEntry::new(&s.record, &s.seal_tag))
                .collect(),
        };
        ModelAttestation {
            model_tag: model.sign(&keys.seal).unwrap(),
            model,
            shards,
            nonce: NONCE.to_vec(),
            attested_at_ns: 1_700_000_002_000_000_000,
            verify_elapsed_ns: 5000,
            audit_head: Some(AuditHead {
                seq: 7,
                hash: [5; 32],
            }),
        }
    }

    fn signed(a: &ModelAttestation) -> AttestationEnvelope {
        a.sign(&token().derive_keys().identity).unwrap()
    }

    fn signed_bytes(payload: Vec<u8>) -> AttestationEnvelope {
        AttestationEnvelope::sign_payload(&token().derive_keys().identity, payload)
    }

    #[test]
    fn a_model_attestation_verifies_with_the_public_key_alone_and_the_right_nonce_vp_006() {
        let envelope = signed(&sample());
        let back = AttestationEnvelope::from_json(&envelope.to_json().to_string()).unwrap();
        assert_eq!(back.predicate_type().as_deref(), Some(MODEL_PREDICATE_TYPE));
        let public = token().public_key();
        let stated = back.verify_model(&public, &NONCE).unwrap();
        assert_eq!(stated.shards.len(), 3);
        assert_eq!(stated.model.model_ref, "example/model");
        assert_eq!(stated.total_bytes(), 4096 * (1 + 2 + 3));
        assert_eq!(
            stated.model.encode().unwrap(),
            sample().model.encode().unwrap()
        );
        assert!(matches!(
            back.verify_any(&public, &NONCE).unwrap(),
            VerifiedAttestation::Model(_)
        ));
        let err = back
            .verify_model(&public, &[0xac; 16])
            .unwrap_err()
            .to_string();
        assert!(err.contains("nonce"), "{err}");
        let other = WorkerToken::from_bytes(b"0123456789abcdef0123456789abcdeX".to_vec())
            .unwrap()
            .public_key();
        let err = back.verify_model(&other, &NONCE).unwrap_err().to_string();
        assert!(err.contains("another worker"), "{err}");

        // The statement: one subject per shard, in index order, with its fs-verity digest.
        let statement: serde_json::Value = serde_json::from_slice(back.payload()).unwrap();
        assert_eq!(statement["predicateType"], MODEL_PREDICATE_TYPE);
        assert_eq!(statement["subject"].as_array().unwrap().len(), 3);
        assert_eq!(statement["subject"][1]["name"], "10-shard-1");
        assert_eq!(
            statement["subject"][1]["digest"]["fsverity-sha256"],
            hex::encode([11u8; 32])
        );
        assert_eq!(statement["predicate"]["backend"], "sim");
        assert_eq!(statement["predicate"]["model"]["total_shards"], 3);
    }

    #[test]
    fn the_shard_verifier_refuses_a_model_statement_and_the_model_verifier_a_shard_statement_vp_006()
     {
        let public = token().public_key();
        let model = signed(&sample());
        let err = model.verify(&public, &NONCE).unwrap_err().to_string();
        assert!(err.contains("model attestation"), "{err}");

        let shard = crate::doc_examples::worked_example_attestation();
        let nonce = shard.nonce.clone();
        let envelope = shard.sign(&token().derive_keys().identity).unwrap();
        assert!(envelope.verify(&public, &nonce).is_ok());
        let err = envelope
            .verify_model(&public, &nonce)
            .unwrap_err()
            .to_string();
        assert!(err.contains("shard attestation"), "{err}");
        assert!(matches!(
            envelope.verify_any(&public, &nonce).unwrap(),
            VerifiedAttestation::Shard(_)
        ));
    }

    #[test]
    fn changed_bytes_anywhere_in_a_model_statement_fail_vp_006() {
        let envelope = signed(&sample());
        let public = token().public_key();
        let payload = envelope.payload().to_vec();
        // Every 23rd byte and the last (every byte, as the shard statement's test does, takes over a
        // minute in a debug build: each try is an Ed25519 verification).
        let picks = (0..payload.len())
            .step_by(23)
            .chain(std::iter::once(payload.len() - 1));
        for i in picks {
            let mut changed = payload.clone();
            changed[i] ^= 0x01;
            let forged = AttestationEnvelope::from_json(
                &serde_json::json!({
                    "payloadType": PAYLOAD,
                    "payload": base64_of(&changed),
                    "signatures": [{"keyid": public.key_id(), "sig": base64_of(envelope.signature())}],
                })
                .to_string(),
            )
            .unwrap();
            let err = forged
                .verify_model(&public, &NONCE)
                .unwrap_err()
                .to_string();
            assert!(err.contains("signature does not verify"), "byte {i}: {err}");
        }
    }

    const PAYLOAD: &str = crate::attestation::PAYLOAD_TYPE;

    fn base64_of(bytes: &[u8]) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    /// Signs `a` with the worker key and returns the verifier's error.
    fn refused(a: &ModelAttestation) -> String {
        signed(a)
            .verify_model(&token().public_key(), &NONCE)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn an_incomplete_model_statement_is_refused_even_when_signed_vp_006() {
        let keys = token().derive_keys();

        // A shard missing.
        let mut a = sample();
        a.shards.pop();
        let err = refused(&a);
        assert!(
            err.contains("shard 2 of the model seal is missing"),
            "{err}"
        );

        // A shard twice (in place of another).
        let mut a = sample();
        a.shards[2] = a.shards[1].clone();
        let err = refused(&a);
        assert!(err.contains("shard 1 appears more than once"), "{err}");

        // An extra shard, beyond the model's count.
        let mut a = sample();
        let record = shard_record("example/model", 3, 4, 10);
        let tag = record.sign(&keys.seal).unwrap();
        a.shards.push(attested(record, tag));
        let err = refused(&a);
        assert!(
            err.contains("shard 3") && err.contains("not part of the model"),
            "{err}"
        );

        // A shard of another model (other bytes, its own valid seal) in place of shard 1.
        let mut a = sample();
        let record = shard_record("example/model", 1, 3, 10);
        let foreign = SealRecord {
            digest: Digest::from_bytes([0xee; 32]),
            ..record
        };
        let tag = foreign.sign(&keys.seal).unwrap();
        a.shards[1] = attested(foreign, tag);
        let err = refused(&a);
        assert!(
            err.contains("shard 1") && err.contains("its digest differs"),
            "{err}"
        );

        // The same bytes sealed again (another seal tag) are not the model's shard either.
        let mut a = sample();
        let mut resealed = a.shards[0].record.clone();
        resealed.sealed_at_ns += 1;
        a.shards[0].seal_tag = resealed.sign(&keys.seal).unwrap();
        let err = refused(&a);
        assert!(err.contains("its seal tag differs"), "{err}");

        // Shards out of index order.
        let mut a = sample();
        a.shards.swap(0, 1);
        let err = refused(&a);
        assert!(err.contains("not in index order"), "{err}");

        // A shard whose own seal names another model or another shard count.
        let mut a = sample();
        a.shards[2].record.model_ref = "example/other".to_owned();
        let err = refused(&a);
        assert!(err.contains("shard 2's seal names model"), "{err}");
        let mut a = sample();
        a.shards[2].record.total_shards = 4;
        let err = refused(&a);
        assert!(err.contains("says the model has 4"), "{err}");

        // A fresh digest that is not the sealed one; a residency that does not fit the backend.
        let mut a = sample();
        a.shards[1].verified_digest = Digest::from_bytes([0; 32]);
        let err = refused(&a);
        assert!(err.contains("shard 1: the re-measured digest"), "{err}");
        let mut a = sample();
        a.shards[0].residency = Residency::DeviceMemory;
        let err = refused(&a);
        assert!(err.contains("does not fit the backend"), "{err}");
        let mut a = sample();
        a.shards[0].verified_bytes -= 1;
        let err = refused(&a);
        assert!(err.contains("byte count"), "{err}");
    }

    #[test]
    fn a_model_statement_whose_subjects_or_backend_differ_from_the_model_seal_is_refused_vp_006() {
        let statement = String::from_utf8(sample().statement_bytes().unwrap()).unwrap();
        let public = token().public_key();
        let first = format!(
            "{{\"name\":\"10-shard-0\",\"digest\":{{\"fsverity-sha256\":\"{}\"}}}},",
            hex::encode([10u8; 32])
        );
        assert!(statement.contains(&first), "{statement}");
        for (from, to, expect) in [
            // A subject dropped.
            (first.as_str(), "", "2 subject(s)"),
            // A subject with another digest.
            (
                "\"fsverity-sha256\":\"0b0b",
                "\"fsverity-sha256\":\"0c0b",
                "subject 1 is not shard 1",
            ),
            (
                "\"predicate\":{\"backend\":\"sim\"",
                "\"predicate\":{\"backend\":\"cuda\"",
                "backend",
            ),
            // A spelled-out field that disagrees with the record's bytes.
            (
                "\"model_ref\":\"example/model\",\"total_shards\"",
                "\"model_ref\":\"example/other\",\"total_shards\"",
                "canonical form",
            ),
        ] {
            assert!(statement.contains(from), "{from}");
            let edited = statement.replacen(from, to, 1).into_bytes();
            let err = signed_bytes(edited)
                .verify_model(&public, &NONCE)
                .unwrap_err()
                .to_string();
            assert!(err.contains(expect), "{from}: {err}");
        }
    }
}
