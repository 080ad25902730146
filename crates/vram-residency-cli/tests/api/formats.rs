//! Model formats in seals: header validated before upload, tensor table under the seal, damaged
//! tensors named; `inspect` on the upstream fixtures.

use std::path::PathBuf;

use vram_residency::audit::AuditEvent;
use vram_residency::format::ModelFormat;
use vram_residency::{SealOptions, VramError};

use crate::support::{bin, repo_path, small_worker};

fn fixture(name: &str) -> PathBuf {
    repo_path("crates/vram-residency/tests/fixtures").join(name)
}

#[test]
fn sealing_a_gguf_file_seals_its_tensor_table_and_names_the_damaged_tensor() {
    let w = small_worker();
    let shard = w
        .manager
        .seal_file(&fixture("tiny-v3.gguf"), 0, &SealOptions::default())
        .unwrap();
    let table = shard.tensor_table().unwrap().clone();
    assert_eq!(table.format, ModelFormat::Gguf { version: 3 });
    assert_eq!(
        shard.record.tensor_table_digest,
        Some(table.digest().unwrap())
    );
    let target = table
        .tensors
        .iter()
        .find(|t| t.name == "blk.0.ffn_down.weight")
        .unwrap();
    w.sim
        .flip_bit(shard.allocation_id(), (target.offset + 3) * 8 + 1)
        .unwrap();
    match w.manager.verify_sealed(&shard) {
        Err(VramError::Corruption { tensors, .. }) => {
            assert!(
                tensors.contains(&"blk.0.ffn_down.weight".to_owned()),
                "{tensors:?}"
            );
        }
        other => panic!("expected corruption, got {other:?}"),
    }
    assert!(w.audit.entries().iter().any(|e| matches!(
        &e.event,
        AuditEvent::SealVerificationFailed { tensors, .. } if tensors.iter().any(|t| t == "blk.0.ffn_down.weight")
    )));
}

#[test]
fn safetensors_and_raw_files_are_detected_and_sealed() {
    let w = small_worker();
    let st = w
        .manager
        .seal_file(&fixture("tiny.safetensors"), 0, &SealOptions::default())
        .unwrap();
    assert_eq!(st.tensor_table().unwrap().format, ModelFormat::Safetensors);
    assert_eq!(st.tensor_table().unwrap().tensors.len(), 5);
    let raw = w.manager.seal_model(&[0x42; 5000], 0).unwrap();
    let table = raw.tensor_table().unwrap();
    assert_eq!(table.format, ModelFormat::Raw);
    assert_eq!(table.tensors[0].name, "raw");
    assert_eq!(table.tensors[0].bytes, 5000);
}

#[test]
fn malformed_header_is_refused_before_anything_is_allocated() {
    let w = small_worker();
    let mut gguf = std::fs::read(fixture("tiny-v3.gguf")).unwrap();
    gguf.truncate(200);
    let err = w.manager.seal_model(&gguf, 0).unwrap_err();
    assert!(matches!(err, VramError::MalformedModel(_)), "{err}");
    assert!(err.to_string().contains("gguf"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.gguf");
    std::fs::write(&path, &gguf).unwrap();
    assert!(matches!(
        w.manager.seal_file(&path, 0, &SealOptions::default()),
        Err(VramError::MalformedModel(_))
    ));
    assert_eq!(w.manager.used_vram(0).unwrap(), 0);
    assert!(
        w.audit.entries().is_empty(),
        "nothing may be allocated for a bad header"
    );
}

#[test]
fn inspect_prints_the_upstream_fixture_tables() {
    for (name, format, count) in [
        ("tiny-v3.gguf", "gguf v3", 4),
        ("tiny-v3-align64.gguf", "gguf v3", 4),
        ("tiny.safetensors", "safetensors", 5),
    ] {
        let out = bin().arg("inspect").arg(fixture(name)).output().unwrap();
        let stdout = String::from_utf8(out.stdout).unwrap();
        assert!(out.status.success(), "{name}: {stdout}");
        assert!(stdout.contains(&format!("format: {format}")), "{stdout}");
        assert!(stdout.contains(&format!("tensors: {count}")), "{stdout}");
        let out = bin()
            .arg("inspect")
            .arg("--json")
            .arg(fixture(name))
            .output()
            .unwrap();
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(json["tensors"].as_array().unwrap().len(), count);
    }
}

#[test]
fn inspect_rejects_a_truncated_header_naming_field_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cut.safetensors");
    let mut bytes = std::fs::read(fixture("tiny.safetensors")).unwrap();
    bytes.truncate(100);
    std::fs::write(&path, bytes).unwrap();
    let out = bin().arg("inspect").arg(&path).output().unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(!out.status.success());
    assert!(
        stderr.contains("safetensors") && stderr.contains("at byte"),
        "{stderr}"
    );
}
