//! Our digest against the stock `fsverity digest` (fsverity-utils), the test oracle.

use std::path::PathBuf;
use std::process::Command;

use vram_residency::digest::{LEVEL1_SPAN, digest_bytes, digest_file};

use crate::support::{bin, fsverity_digest, fsverity_oracle, random_bytes};

/// Boundary sizes of the issue: 0, 1, 4095, 4096, 4097, 128·4096 ± 1, 128²·4096 + 1.
const BOUNDARY_SIZES: [usize; 10] = [
    0,
    1,
    4095,
    4096,
    4097,
    LEVEL1_SPAN - 1,
    LEVEL1_SPAN,
    LEVEL1_SPAN + 1,
    128 * LEVEL1_SPAN,
    128 * LEVEL1_SPAN + 1,
];

fn write_files(dir: &std::path::Path, sizes: &[usize], seed: u64) -> Vec<(PathBuf, Vec<u8>)> {
    sizes
        .iter()
        .enumerate()
        .map(|(i, &size)| {
            let path = dir.join(format!("f{i}-{size}.bin"));
            let data = random_bytes(size, seed + i as u64);
            std::fs::write(&path, &data).unwrap();
            (path, data)
        })
        .collect()
}

#[test]
fn cpu_digest_equals_fsverity_tool_on_boundary_sizes() {
    if !fsverity_oracle() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (path, data) in write_files(dir.path(), &BOUNDARY_SIZES, 1) {
        let expected = fsverity_digest(&path);
        let from_file = digest_file(&path, &|_| {}).unwrap();
        let from_memory = digest_bytes(&data).unwrap();
        assert_eq!(
            from_file.digest().to_string(),
            expected,
            "{}",
            path.display()
        );
        assert_eq!(
            from_memory.digest().to_string(),
            expected,
            "{}",
            path.display()
        );
    }
}

#[test]
fn cpu_digest_equals_fsverity_tool_on_random_sizes() {
    if !fsverity_oracle() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Sizes from a fixed-seed generator: small, around one level-1 unit, and multi-unit.
    let raw = random_bytes(8 * 24, 42);
    let sizes: Vec<usize> = raw
        .chunks(8)
        .enumerate()
        .map(|(i, c)| {
            let r = u64::from_le_bytes(c.try_into().unwrap()) as usize;
            match i % 3 {
                0 => r % 9000,
                1 => r % (2 * LEVEL1_SPAN),
                _ => r % (40 * LEVEL1_SPAN),
            }
        })
        .collect();
    for (path, _) in write_files(dir.path(), &sizes, 7) {
        let ours = digest_file(&path, &|_| {}).unwrap();
        assert_eq!(
            ours.digest().to_string(),
            fsverity_digest(&path),
            "{}",
            path.display()
        );
    }
}

#[test]
fn cli_digest_prints_exactly_what_fsverity_digest_prints() {
    if !fsverity_oracle() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let files: Vec<PathBuf> =
        write_files(dir.path(), &[0, 1, 4097, LEVEL1_SPAN + 3, 3_000_000], 99)
            .into_iter()
            .map(|(p, _)| p)
            .collect();
    let theirs = Command::new("fsverity")
        .arg("digest")
        .args(&files)
        .output()
        .unwrap();
    let ours = bin().arg("digest").args(&files).output().unwrap();
    assert!(theirs.status.success() && ours.status.success());
    assert_eq!(
        String::from_utf8(ours.stdout).unwrap(),
        String::from_utf8(theirs.stdout).unwrap()
    );
}

#[test]
fn cli_digest_of_missing_file_fails_with_a_clear_error() {
    let out = bin()
        .args(["digest", "/nonexistent/model.bin"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("/nonexistent/model.bin"), "{err}");
}
