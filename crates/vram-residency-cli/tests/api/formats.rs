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
        // The JSON carries what the human output shows: size, flat format, prefixed table digest.
        assert_eq!(
            json["size"].as_u64().unwrap(),
            std::fs::metadata(fixture(name)).unwrap().len()
        );
        assert_eq!(json["format"], format.split(' ').next().unwrap());
        let digest = json["tensor_table_digest"].as_str().unwrap();
        assert!(
            stdout.contains(&format!("tensor table digest: {digest}")),
            "{stdout}"
        );
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

/// Files written by the upstream writers, then damaged the way the issue's new user found them
/// sealed as raw: each must now be refused by `inspect` and by `seal`, naming format, field and
/// byte offset, with nothing sealed; `--format raw` is the explicit way to seal such bytes.
#[test]
fn files_that_claim_a_format_but_do_not_parse_are_refused_not_sealed_as_raw_iv_001() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = std::fs::read(fixture("tiny-v3.gguf")).unwrap();
    let safetensors = std::fs::read(fixture("tiny.safetensors")).unwrap();
    let mut ggux = gguf.clone();
    ggux[3] = b'X';
    let with_header_len = |n: u64| {
        let mut bytes = safetensors.clone();
        bytes[..8].copy_from_slice(&n.to_le_bytes());
        bytes
    };
    let cases: [(&str, Vec<u8>, &str, &str); 4] = [
        ("ggux.bin", ggux, "gguf", "magic"),
        ("model.gguf", Vec::new(), "gguf", "magic"),
        (
            "huge-header.bin",
            with_header_len(1 << 60),
            "safetensors",
            "header length",
        ),
        (
            "over-cap.bin",
            with_header_len(100 * 1024 * 1024 + 1),
            "safetensors",
            "header length",
        ),
    ];
    let token = dir.path().join("token");
    crate::support::write_secret(token.clone(), crate::support::TEST_TOKEN);
    for (name, bytes, format, field) in &cases {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        let out = bin().arg("inspect").arg(&path).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "{name}: inspect accepted it");
        assert!(
            stderr.contains(format) && stderr.contains(field) && stderr.contains("at byte"),
            "{name}: {stderr}"
        );
        let out = bin()
            .arg("seal")
            .arg(&path)
            .arg("--token-file")
            .arg(&token)
            .args(["--backend", "sim", "--json"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "{name}: sealed");
        assert!(out.stdout.is_empty(), "{name}: printed a seal");
        if !bytes.is_empty() {
            assert!(stderr.contains(format), "{name}: {stderr}");
        }
    }
    // The explicit choice seals the same bytes as raw, and says so.
    let path = dir.path().join("ggux.bin");
    let out = bin()
        .arg("seal")
        .arg(&path)
        .arg("--token-file")
        .arg(&token)
        .args(["--backend", "sim", "--json", "--format", "raw"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let view: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(view["format"], "raw");
}

#[test]
fn overlapping_and_out_of_bounds_safetensors_entries_say_so() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, json: &str, data: usize| {
        let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(json.as_bytes());
        bytes.extend(std::iter::repeat_n(0u8, data));
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    };
    let overlap = write(
        "overlap.safetensors",
        r#"{"a":{"dtype":"U8","shape":[8],"data_offsets":[0,8]},"b":{"dtype":"U8","shape":[4],"data_offsets":[4,8]}}"#,
        8,
    );
    let outside = write(
        "outside.safetensors",
        r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[4,8]}}"#,
        6,
    );
    for (path, words) in [
        (overlap, "overlaps tensor \"a\""),
        (outside, "out of bounds"),
    ] {
        let out = bin().arg("inspect").arg(&path).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success());
        assert!(stderr.contains(words), "{stderr}");
    }
}

/// The tensor table sealed with a shard describes the bytes that reached device memory: a table read
/// from one header and bytes carrying another are refused (issue: the table could describe other
/// bytes than the sealed ones).
#[test]
fn a_table_that_does_not_describe_the_uploaded_header_is_refused_and_nothing_is_sealed() {
    let w = small_worker();
    let original = std::fs::read(fixture("tiny.safetensors")).unwrap();
    let table = vram_residency::format::read_tensor_table_from_bytes(&original).unwrap();
    // Same length, one tensor name changed in the header: parses, but describes other tensors.
    let at = original.windows(9).position(|w| w == b"positions").unwrap();
    let mut renamed = original.clone();
    renamed[at + 8] = b'z';
    assert_eq!(renamed.len(), original.len());
    // Same length, header no longer JSON.
    let mut broken = original.clone();
    broken[8] = b'[';
    for (bytes, needle) in [(&renamed, "other tensors"), (&broken, "no longer parses")] {
        let opts = SealOptions {
            tensor_table: Some(std::sync::Arc::new(table.clone())),
            ..SealOptions::default()
        };
        let mut reader = bytes.as_slice();
        let err = w
            .manager
            .seal_reader(&mut reader, bytes.len() as u64, 0, &opts)
            .unwrap_err();
        assert!(matches!(err, VramError::HeaderChanged { .. }), "{err}");
        assert!(err.to_string().contains(needle), "{err}");
        assert_eq!(
            w.manager.used_vram(0).unwrap(),
            0,
            "nothing stays allocated"
        );
    }
    // The matching bytes seal.
    let opts = SealOptions {
        tensor_table: Some(std::sync::Arc::new(table)),
        ..SealOptions::default()
    };
    let mut reader = original.as_slice();
    assert!(
        w.manager
            .seal_reader(&mut reader, original.len() as u64, 0, &opts)
            .is_ok()
    );
}

/// The adversarial fixtures (damaged copies of upstream-written files, `scripts/make-fixtures.py`):
/// each is refused by `inspect` and `seal` with exit status 1, naming the field and the byte offset
/// that the generator computed from the file's own bytes and the upstream reader's field positions;
/// nothing is sealed (IV-001).
#[test]
fn adversarial_fixtures_are_refused_naming_field_and_offset_iv_001() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    crate::support::write_secret(token.clone(), crate::support::TEST_TOKEN);
    let expected: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture("adversarial/expected.json")).unwrap())
            .unwrap();
    let cases = expected["cases"].as_array().unwrap();
    assert!(
        cases.len() >= 9,
        "the generator wrote {} cases",
        cases.len()
    );
    for case in cases {
        let name = case["file"].as_str().unwrap();
        let path = fixture(&format!("adversarial/{name}"));
        let format = case["format"].as_str().unwrap();
        let wanted: Vec<String> = case["expect_one_of"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                format!(
                    "{format}: {} at byte {}:",
                    c["field"].as_str().unwrap(),
                    c["offset"]
                )
            })
            .collect();
        let out = bin().arg("inspect").arg(&path).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(1), "{name}: {stderr}");
        assert!(
            wanted.iter().any(|w| stderr.contains(w.as_str())),
            "{name}: expected one of {wanted:?} in: {stderr}"
        );
        let out = bin()
            .arg("seal")
            .arg(&path)
            .arg("--token-file")
            .arg(&token)
            .args(["--backend", "sim", "--json"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(1), "{name}: {stderr}");
        assert!(out.stdout.is_empty(), "{name}: printed a seal");
        // An empty file is refused as empty before its format is looked at.
        let empty_refused =
            std::fs::metadata(&path).unwrap().len() == 0 && stderr.contains("the model is empty");
        assert!(
            empty_refused || wanted.iter().any(|w| stderr.contains(w.as_str())),
            "{name}: expected one of {wanted:?} in: {stderr}"
        );
        println!("{name}: refused: {}", stderr.trim());
    }
}

/// The race of the issue: a writer flips a safetensors header between valid and malformed (same
/// length, written in place) while the file is sealed again and again. Every seal that succeeds must
/// carry the digest of the valid file (its table describes the sealed bytes); the others are refused.
#[test]
fn a_header_flipped_during_seals_never_yields_a_table_that_disagrees_with_the_digest() {
    use std::os::unix::fs::FileExt as _;
    let w = small_worker();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flip.safetensors");
    let valid = std::fs::read(fixture("tiny.safetensors")).unwrap();
    std::fs::write(&path, &valid).unwrap();
    let valid_digest = vram_residency::digest::digest_bytes(&valid)
        .unwrap()
        .digest();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flips = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let writer = {
        let (stop, flips) = (std::sync::Arc::clone(&stop), std::sync::Arc::clone(&flips));
        let path = path.clone();
        std::thread::spawn(move || {
            let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let n = flips.load(std::sync::atomic::Ordering::Relaxed);
                let byte = if n % 2 == 0 { b'[' } else { b'{' };
                file.write_at(&[byte], 8).unwrap();
                flips.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                // Pauses, so that some seals fall between two writes and succeed.
                std::thread::sleep(std::time::Duration::from_micros(300));
            }
            file.write_at(b"{", 8).unwrap();
        })
    };
    let (mut sealed, mut refused, mut rounds) = (0u64, 0u64, 0u64);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    // At least 300 seals, and on until the writer has flipped the header 200 times.
    while (rounds < 300 || flips.load(std::sync::atomic::Ordering::Relaxed) < 200)
        && std::time::Instant::now() < deadline
    {
        rounds += 1;
        match w.manager.seal_file(&path, 0, &SealOptions::default()) {
            Ok(shard) => {
                assert_eq!(
                    shard.record.digest, valid_digest,
                    "a table was sealed with other bytes"
                );
                assert_eq!(
                    shard.tensor_table().unwrap().format,
                    ModelFormat::Safetensors
                );
                sealed += 1;
                w.manager.deallocate(shard).unwrap();
            }
            Err(
                VramError::HeaderChanged { .. }
                | VramError::MalformedModel(_)
                | VramError::SourceChanged { .. },
            ) => refused += 1,
            Err(other) => panic!("unexpected error: {other}"),
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    let flips = flips.load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "header flips during the test: {flips}; seals: {sealed} with the valid digest, 0 mismatched; refused: {refused}"
    );
    assert!(flips > 0);
    assert!(
        refused > 0,
        "the writer never got in the way: the test proves nothing"
    );
    assert_eq!(w.manager.used_vram(0).unwrap(), 0);
}
