//! The worked examples of `docs/seal-record.md`, `docs/model-seal.md`, `docs/audit-log.md` and
//! `docs/attestation.md`,
//! recomputed from the code, so the docs cannot drift from it. `PRINT_EXAMPLE=1` prints the values.
//!
//! The example worker token is `example-worker-token-0123456789abcdef`; its public key is in
//! `docs/attestation.md` (`example:public-key`).

use crate::attestation::{Attestation, AttestationEnvelope};
use crate::audit::{AuditEntry, AuditEvent, AuditHead, Severity};
use crate::audit_log::{GENESIS_HASH, record_hash, record_input, verify_log};
use crate::backend::{BackendKind, Residency};
use crate::digest::Digest;
use crate::ids::ShardId;
use crate::keys::{PublicKey, Tag, WorkerToken};
use crate::model_seal::{ModelSealRecord, ModelShardEntry};
use crate::seal::SealRecord;

const EXAMPLE_TOKEN: &[u8] = b"example-worker-token-0123456789abcdef";

const SEAL_DOC: &str = include_str!("../../../docs/seal-record.md");
const MODEL_SEAL_DOC: &str = include_str!("../../../docs/model-seal.md");
const AUDIT_DOC: &str = include_str!("../../../docs/audit-log.md");
const ATTESTATION_DOC: &str = include_str!("../../../docs/attestation.md");

fn token() -> WorkerToken {
    WorkerToken::from_bytes(EXAMPLE_TOKEN.to_vec()).unwrap()
}

/// Asserts equality, except while printing the examples (`PRINT_EXAMPLE=1`) to write the docs.
macro_rules! same {
    ($actual:expr, $documented:expr) => {
        if std::env::var("PRINT_EXAMPLE").is_err() {
            assert_eq!($actual, $documented);
        }
    };
}

/// The lines of the fenced block that follows `<!-- example:NAME -->`.
fn block(doc: &str, name: &str) -> Vec<String> {
    let marker = format!("<!-- example:{name} -->");
    let Some(after) = doc.split(&marker).nth(1) else {
        assert!(
            std::env::var("PRINT_EXAMPLE").is_ok(),
            "no {marker} in the doc"
        );
        return Vec::new();
    };
    after
        .split("```")
        .nth(1)
        .unwrap()
        .lines()
        .skip(1)
        .map(str::to_owned)
        .collect()
}

/// The block as one string, whitespace removed.
fn compact_block(doc: &str, name: &str) -> String {
    block(doc, name)
        .iter()
        .flat_map(|l| l.split_whitespace())
        .collect()
}

fn print(name: &str, value: &str) {
    if std::env::var("PRINT_EXAMPLE").is_ok() {
        println!("{name}:\n{value}");
    }
}

pub(crate) fn worked_example_record() -> SealRecord {
    SealRecord {
        shard_id: ShardId::new("llama-3-8b-shard-0").unwrap(),
        digest: "sha256:3d248ca542a24fc62d1c43b916eae5016878e2533c88238480b26128a1f1af95"
            .parse::<Digest>()
            .unwrap(),
        vram_bytes: 4096,
        gpu_device: 0,
        device_uuid: *b"SIM-GPU-00000000",
        sealed_at_ns: 1_767_225_600_000_000_000,
        backend: BackendKind::Sim,
        model_ref: "example/llama-3-8b".to_owned(),
        shard_index: 0,
        total_shards: 2,
        tensor_table_digest: None,
    }
}

#[test]
fn seal_record_worked_example_in_docs_is_recomputed_ci_002() {
    let record = worked_example_record();
    let encoding = record.encode().unwrap();
    print("encoding", &hex::encode(&encoding));
    same!(hex::encode(&encoding), compact_block(SEAL_DOC, "encoding"));
    let tag = record.sign(&token().derive_keys().seal).unwrap();
    print("tag", &tag.to_hex());
    same!(tag.to_hex(), compact_block(SEAL_DOC, "tag"));
    same!(SealRecord::decode(&encoding).unwrap(), record);
}

/// Shard 1 of the worked example's model: 4096 zero bytes on GPU 1.
pub(crate) fn worked_example_record_1() -> SealRecord {
    SealRecord {
        shard_id: ShardId::new("llama-3-8b-shard-1").unwrap(),
        digest: crate::digest::digest_bytes(&[0u8; 4096]).unwrap().digest(),
        gpu_device: 1,
        device_uuid: *b"SIM-GPU-00000001",
        shard_index: 1,
        ..worked_example_record()
    }
}

/// The model of the two worked-example shards, sealed one minute after them.
pub(crate) fn worked_example_model() -> ModelSealRecord {
    let key = token().derive_keys().seal;
    ModelSealRecord {
        backend: BackendKind::Sim,
        model_ref: "example/llama-3-8b".to_owned(),
        sealed_at_ns: 1_767_225_660_000_000_000,
        shards: [worked_example_record(), worked_example_record_1()]
            .iter()
            .map(|record| ModelShardEntry::new(record, &record.sign(&key).unwrap()))
            .collect(),
    }
}

#[test]
fn model_seal_worked_example_in_docs_is_recomputed_ci_002() {
    let key = token().derive_keys().seal;
    let shard_1 = worked_example_record_1();
    print("shard 1 digest", &shard_1.digest.to_string());
    same!(
        shard_1.digest.to_string(),
        compact_block(MODEL_SEAL_DOC, "shard-1-digest")
    );
    let shard_1_tag = shard_1.sign(&key).unwrap();
    print("shard 1 tag", &shard_1_tag.to_hex());
    same!(
        shard_1_tag.to_hex(),
        compact_block(MODEL_SEAL_DOC, "shard-1-tag")
    );
    let model = worked_example_model();
    let encoding = model.encode().unwrap();
    print("model encoding", &hex::encode(&encoding));
    same!(
        hex::encode(&encoding),
        compact_block(MODEL_SEAL_DOC, "model-encoding")
    );
    let tag = model.sign(&key).unwrap();
    print("model tag", &tag.to_hex());
    same!(tag.to_hex(), compact_block(MODEL_SEAL_DOC, "model-tag"));
    print("record digest", &model.record_digest().unwrap());
    same!(
        model.record_digest().unwrap(),
        compact_block(MODEL_SEAL_DOC, "model-record-digest")
    );
    let back = ModelSealRecord::decode(&encoding).unwrap();
    assert_eq!(back.encode().unwrap(), encoding);
    assert!(back.verify(&key, &tag).is_ok());
    // Shard 0's entry carries the tag documented in seal-record.md.
    same!(
        model.shards[0].seal_tag.to_hex(),
        compact_block(SEAL_DOC, "tag")
    );
}

#[test]
fn audit_log_worked_example_in_docs_is_recomputed_and_verifies_with_the_public_key_alone() {
    let identity = token().derive_keys().identity;
    let events = [
        AuditEvent::AuditLogCreated {
            key_id: identity.public_key().key_id(),
        },
        AuditEvent::ServiceStarted {
            version: "0.1.0".to_owned(),
            devices: 1,
            listen: "127.0.0.1:8470".to_owned(),
        },
        AuditEvent::VramDeallocated {
            shard_id: ShardId::new("llama-3-8b-shard-0").unwrap(),
            gpu: 0,
            bytes: 4096,
        },
    ];
    let mut prev = GENESIS_HASH;
    let mut log = Vec::new();
    for ((seq, event), at_ns) in (1u64..).zip(events).zip(1_767_225_600_000_000_000u64..) {
        let entry = AuditEntry {
            at_ns,
            backend: BackendKind::Sim,
            severity: Severity::Info,
            event,
        };
        let json = serde_json::to_vec(&entry).unwrap();
        if seq == 1 {
            let input = record_input(seq, &prev, &json).unwrap();
            print("record input 1", &hex::encode(&input));
            same!(
                hex::encode(&input),
                compact_block(AUDIT_DOC, "audit-record-input")
            );
            print("record hash 1", &hex::encode(record_hash(&input)));
            same!(
                hex::encode(record_hash(&input)),
                compact_block(AUDIT_DOC, "audit-record-hash")
            );
        }
        let (line, hash) = crate::audit_log::encode_line_for_docs(&identity, seq, &prev, &json);
        log.extend_from_slice(&line);
        prev = hash;
    }
    let text = String::from_utf8(log.clone()).unwrap();
    print("log", &text);
    same!(
        text.lines().collect::<Vec<_>>(),
        block(AUDIT_DOC, "audit-log")
    );
    let public = token().public_key();
    let head = AuditHead { seq: 3, hash: prev };
    print("head", &head.to_string());
    same!(head.to_string(), compact_block(AUDIT_DOC, "audit-head"));
    let report = verify_log(&mut &log[..], &public, Some(head)).unwrap();
    assert!(report.is_intact(), "{report:?}");
    same!(report.records, 3);
}

pub(crate) fn worked_example_attestation() -> Attestation {
    let record = worked_example_record();
    let tag = record.sign(&token().derive_keys().seal).unwrap();
    Attestation {
        verified_digest: record.digest,
        record,
        seal_tag: tag,
        device_name: "sim device 0 (host memory, not a GPU)".to_owned(),
        driver_version: "sim".to_owned(),
        unified_memory: None,
        residency: Residency::Simulated,
        nonce: (0u8..16).collect(),
        attested_at_ns: 1_767_225_660_000_000_000,
        verified_bytes: 4096,
        verify_elapsed_ns: 1_000_000,
        audit_head: Some(AuditHead {
            seq: 3,
            hash: [0xab; 32],
        }),
    }
}

#[test]
fn attestation_worked_example_in_docs_is_recomputed_and_verifies_with_the_public_key_vp_006() {
    let keys = token().derive_keys();
    let pem = keys.identity.public_key().to_pem();
    print("public key", &pem);
    print("key id", &keys.identity.public_key().key_id());
    same!(
        pem.trim_end().lines().collect::<Vec<_>>(),
        block(ATTESTATION_DOC, "public-key")
    );
    same!(
        keys.identity.public_key().key_id(),
        compact_block(ATTESTATION_DOC, "key-id")
    );
    let attestation = worked_example_attestation();
    let statement = attestation.statement_bytes().unwrap();
    let pretty: serde_json::Value = serde_json::from_slice(&statement).unwrap();
    print("statement", &serde_json::to_string_pretty(&pretty).unwrap());
    same!(
        serde_json::to_string_pretty(&pretty)
            .unwrap()
            .lines()
            .collect::<Vec<_>>(),
        block(ATTESTATION_DOC, "statement")
    );
    let envelope = attestation.sign(&keys.identity).unwrap();
    let json = serde_json::to_string_pretty(&envelope.to_json()).unwrap();
    print("envelope", &json);
    same!(
        json.lines().collect::<Vec<_>>(),
        block(ATTESTATION_DOC, "envelope")
    );
    if std::env::var("PRINT_EXAMPLE").is_ok() {
        return;
    }
    // The documented envelope verifies with the documented public key, for its nonce only.
    let public = PublicKey::from_pem(&block(ATTESTATION_DOC, "public-key").join("\n")).unwrap();
    let parsed =
        AttestationEnvelope::from_json(&block(ATTESTATION_DOC, "envelope").join("\n")).unwrap();
    let nonce: Vec<u8> = (0u8..16).collect();
    parsed.verify(&public, &nonce).unwrap();
    assert!(parsed.verify(&public, &[0u8; 16]).is_err());
    let _: Tag = attestation.seal_tag;
}
