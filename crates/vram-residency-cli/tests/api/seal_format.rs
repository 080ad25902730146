//! The seal record's canonical encoding against its spec in docs/seal-record.md.

use vram_residency::backend::BackendKind;
use vram_residency::seal::SealRecord;
use vram_residency::{Digest, ShardId, WorkerToken};

use crate::support::repo_path;

/// Extracts the hex of the fenced block that follows `<!-- example:NAME -->` in the doc.
fn doc_example(doc: &str, name: &str) -> String {
    let marker = format!("<!-- example:{name} -->");
    let after = doc
        .split(&marker)
        .nth(1)
        .unwrap_or_else(|| panic!("no {marker} in the doc"));
    let block = after.split("```").nth(1).unwrap();
    block
        .lines()
        .skip(1)
        .flat_map(|l| l.split_whitespace())
        .collect()
}

pub fn worked_example_record() -> SealRecord {
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
    let doc = std::fs::read_to_string(repo_path("docs/seal-record.md")).unwrap();
    let record = worked_example_record();
    let encoding = record.encode().unwrap();
    if std::env::var("PRINT_EXAMPLE").is_ok() {
        println!("encoding {}", hex::encode(&encoding));
    }
    assert_eq!(hex::encode(&encoding), doc_example(&doc, "encoding"));
    let token = WorkerToken::from_bytes(b"example-worker-token-0123456789abcdef".to_vec()).unwrap();
    let tag = record.sign(&token.derive_keys().seal).unwrap();
    if std::env::var("PRINT_EXAMPLE").is_ok() {
        println!("tag {}", tag.to_hex());
    }
    assert_eq!(tag.to_hex(), doc_example(&doc, "tag"));
    assert_eq!(SealRecord::decode(&encoding).unwrap(), record);
}
