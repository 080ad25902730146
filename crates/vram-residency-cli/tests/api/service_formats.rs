//! The audit-line and attestation formats against their specs (docs/audit-log.md,
//! docs/attestation.md): each worked example is recomputed here, so the docs cannot drift.

use vram_residency::attestation::Attestation;
use vram_residency::audit_log::{GENESIS_MAC, encode_line, mac_input, verify_log};
use vram_residency::backend::{BackendKind, Residency};
use vram_residency::keys::Tag;
use vram_residency::shard::ShardId;
use vram_residency::{AuditEntry, AuditEvent, Severity, WorkerToken};

use crate::seal_format::worked_example_record;
use crate::support::repo_path;

const EXAMPLE_TOKEN: &[u8] = b"example-worker-token-0123456789abcdef";

fn doc(name: &str) -> String {
    std::fs::read_to_string(repo_path("docs").join(name)).unwrap()
}

/// The lines of the fenced block that follows `<!-- example:NAME -->`.
fn block(doc: &str, name: &str) -> Vec<String> {
    let marker = format!("<!-- example:{name} -->");
    let after = doc
        .split(&marker)
        .nth(1)
        .unwrap_or_else(|| panic!("no {marker} in the doc"));
    after
        .split("```")
        .nth(1)
        .unwrap()
        .lines()
        .skip(1)
        .map(str::to_owned)
        .collect()
}

/// The block as one hex string, whitespace removed.
fn hex_block(doc: &str, name: &str) -> String {
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

#[test]
fn audit_log_worked_example_in_docs_is_recomputed() {
    let doc = doc("audit-log.md");
    let key = WorkerToken::from_bytes(EXAMPLE_TOKEN.to_vec())
        .unwrap()
        .derive_keys()
        .audit;
    let started = AuditEvent::ServiceStarted {
        version: "0.1.0".to_owned(),
        devices: 1,
        listen: "127.0.0.1:8470".to_owned(),
    };
    let freed = AuditEvent::VramDeallocated {
        shard_id: ShardId::new("llama-3-8b-shard-0").unwrap(),
        gpu: 0,
        bytes: 4096,
    };
    let entries = [
        AuditEntry {
            at_ns: 1_767_225_600_000_000_000,
            backend: BackendKind::Sim,
            severity: Severity::Info,
            event: started,
        },
        AuditEntry {
            at_ns: 1_767_225_601_000_000_000,
            backend: BackendKind::Sim,
            severity: Severity::Info,
            event: freed,
        },
    ];
    let first_json = serde_json::to_vec(&entries[0]).unwrap();
    let input = mac_input(1, &GENESIS_MAC, &first_json).unwrap();
    print("mac input 1", &hex::encode(&input));
    assert_eq!(hex::encode(&input), hex_block(&doc, "audit-mac-input"));

    let mut prev = GENESIS_MAC;
    let mut log = Vec::new();
    for (seq, entry) in (1u64..).zip(&entries) {
        let (line, mac) =
            encode_line(&key, seq, &prev, &serde_json::to_vec(entry).unwrap()).unwrap();
        log.extend_from_slice(&line);
        prev = mac.0;
    }
    let text = String::from_utf8(log.clone()).unwrap();
    print("log", &text);
    let documented: Vec<String> = block(&doc, "audit-log");
    assert_eq!(text.lines().collect::<Vec<_>>(), documented);
    let report = verify_log(&mut &log[..], &key).unwrap();
    assert!(report.is_intact());
    assert_eq!(report.records, 2);
}

pub fn worked_example_attestation() -> Attestation {
    let mut nonce = Vec::new();
    nonce.extend(0u8..16);
    let mut attestation = Attestation {
        record: worked_example_record(),
        seal_tag: Tag(hex::decode(
            "95703f07071b23a315bc55914cdae89976bb4a69e25f20e40a8a220805f87baf",
        )
        .unwrap()
        .try_into()
        .unwrap()),
        device_name: "sim device 0 (host memory, not a GPU)".to_owned(),
        driver_version: "sim".to_owned(),
        residency: Residency::Simulated,
        nonce,
        attested_at_ns: 1_767_225_660_000_000_000,
        verified_digest: worked_example_record().digest,
        verified_bytes: 4096,
        verify_elapsed_ns: 1_000_000,
        mac: Tag([0; 32]),
    };
    let keys = WorkerToken::from_bytes(EXAMPLE_TOKEN.to_vec())
        .unwrap()
        .derive_keys();
    attestation.sign(&keys.attestation).unwrap();
    attestation
}

#[test]
fn attestation_worked_example_in_docs_is_recomputed_vp_006() {
    let doc = doc("attestation.md");
    let attestation = worked_example_attestation();
    let encoding = attestation.encode().unwrap();
    print("encoding", &hex::encode(&encoding));
    print("mac", &attestation.mac.to_hex());
    let json = serde_json::to_string_pretty(&attestation.to_json()).unwrap();
    print("json", &json);
    assert_eq!(
        hex::encode(&encoding),
        hex_block(&doc, "attestation-encoding")
    );
    assert_eq!(attestation.mac.to_hex(), hex_block(&doc, "attestation-mac"));
    let documented = block(&doc, "attestation-json").join("\n");
    assert_eq!(json, documented);
    // The documented JSON verifies offline, for its nonce only.
    let parsed = Attestation::from_json(&documented).unwrap();
    let keys = WorkerToken::from_bytes(EXAMPLE_TOKEN.to_vec())
        .unwrap()
        .derive_keys();
    let nonce: Vec<u8> = (0u8..16).collect();
    parsed.verify(&keys.attestation, &nonce).unwrap();
    assert!(parsed.verify(&keys.attestation, &[0u8; 16]).is_err());
}
