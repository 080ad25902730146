//! The `vram-residency` binary: seal, demo and bad input, run as a user would.

use std::process::Output;

use crate::support::{TEST_TOKEN, bin, random_bytes, write_secret};

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        write_secret(dir.path().join("token"), format!("{TEST_TOKEN}\n"));
        std::fs::write(dir.path().join("model.bin"), random_bytes(1_000_003, 11)).unwrap();
        Self { dir }
    }
    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }
}

#[test]
fn seal_json_prints_a_sim_labelled_record_with_the_fsverity_digest() {
    let f = Fixture::new();
    let expected = vram_residency::digest::digest_bytes(&random_bytes(1_000_003, 11))
        .unwrap()
        .digest()
        .to_string();
    let out = bin()
        .args([
            "seal",
            &f.path("model.bin"),
            "--token-file",
            &f.path("token"),
        ])
        .args([
            "--backend",
            "sim",
            "--json",
            "--shard-id",
            "m-0",
            "--model-ref",
            "test/model",
        ])
        .args(["--expect", &expected])
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(json["backend"], "sim");
    assert_eq!(json["digest"], expected.as_str());
    assert_eq!(json["shard_id"], "m-0");
    assert_eq!(json["vram_bytes"], 1_000_003);
    assert_eq!(json["model_ref"], "test/model");
    // One prefix rule: digests and tags carry their algorithm.
    let tag = json["seal_tag"].as_str().unwrap();
    assert!(
        tag.starts_with("hmac-sha256:") && tag.len() == 12 + 64,
        "{tag}"
    );
    assert!(!stdout.contains(TEST_TOKEN) && !stderr.contains(TEST_TOKEN));
}

#[test]
fn seal_human_output_says_sim_is_not_residency() {
    let f = Fixture::new();
    let out = bin()
        .args(["seal", &f.path("model.bin"), "--backend", "sim"])
        .env("VRAM_RESIDENCY_TOKEN", TEST_TOKEN)
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.starts_with("backend: sim"), "{stdout}");
    assert!(stdout.contains("NOT VRAM residency"), "{stdout}");
}

#[test]
fn seal_refuses_bad_input_with_clear_errors() {
    let f = Fixture::new();
    write_secret(f.path("short-token"), "tooshort\n");
    std::fs::write(f.path("empty.bin"), b"").unwrap();
    let model = f.path("model.bin");
    let token = f.path("token");
    let short_token = f.path("short-token");
    let empty = f.path("empty.bin");
    let dir_as_token = f.path("");
    // (arguments, text the error must contain, exit status: 2 usage, 1 the operation failed)
    let cases: Vec<(Vec<&str>, &str, i32)> = vec![
        (
            vec!["seal", &model, "--backend", "sim"],
            "no worker token",
            2,
        ),
        (
            vec![
                "seal",
                &model,
                "--backend",
                "sim",
                "--token-file",
                "/nonexistent/token",
            ],
            "/nonexistent/token",
            2,
        ),
        (
            vec![
                "seal",
                &model,
                "--backend",
                "sim",
                "--token-file",
                &short_token,
            ],
            "at least 32",
            2,
        ),
        (
            vec![
                "seal",
                &model,
                "--backend",
                "sim",
                "--token-file",
                &dir_as_token,
            ],
            "not a regular file",
            2,
        ),
        (
            vec!["seal", &model, "--backend", "rocm", "--token-file", &token],
            "unknown backend",
            2,
        ),
        (
            vec![
                "seal",
                &model,
                "--backend",
                "sim",
                "--token-file",
                &token,
                "--shard-id",
                "../x",
            ],
            "invalid shard id",
            2,
        ),
        (
            vec![
                "seal",
                &model,
                "--backend",
                "sim",
                "--token-file",
                &token,
                "--expect",
                "sha256:abc",
            ],
            "64 hex",
            2,
        ),
        (
            vec![
                "seal",
                &model,
                "--backend",
                "sim",
                "--token-file",
                &token,
                "--gpu",
                "3",
            ],
            "out of range",
            2,
        ),
        (
            vec!["seal", &empty, "--backend", "sim", "--token-file", &token],
            "empty",
            1,
        ),
        (
            vec![
                "seal",
                &model,
                "--backend",
                "sim",
                "--token-file",
                &token,
                "--max-model-bytes",
                "1000",
            ],
            "over the configured maximum",
            1,
        ),
        (
            vec![
                "seal",
                &model,
                "--backend",
                "sim",
                "--token-file",
                &token,
                "--sim-vram",
                "1MB",
            ],
            "not enough VRAM",
            1,
        ),
    ];
    let mut cases = cases;
    if !vram_residency_cuda::driver_present() {
        // The default backend is cuda; without a driver that is a clear error, not a fallback.
        cases.push((
            vec!["seal", &model, "--token-file", &token],
            "libcuda.so",
            1,
        ));
    }
    for (args, needle, status) in cases {
        let out = bin()
            .args(&args)
            .env_remove("VRAM_RESIDENCY_TOKEN")
            .output()
            .unwrap();
        let (stdout, stderr) = text(&out);
        assert_eq!(
            out.status.code(),
            Some(status),
            "{args:?} should exit {status}: {stdout}\n{stderr}"
        );
        assert!(
            stderr.contains(needle),
            "{args:?}: expected {needle:?} in: {stderr}"
        );
        assert!(!stderr.contains(TEST_TOKEN), "token leaked: {stderr}");
    }
}

#[test]
fn seal_with_wrong_expected_digest_fails_and_names_both_digests() {
    let f = Fixture::new();
    let wrong = format!("sha256:{}", "0".repeat(64));
    let out = bin()
        .args([
            "seal",
            &f.path("model.bin"),
            "--backend",
            "sim",
            "--token-file",
            &f.path("token"),
        ])
        .args(["--expect", &wrong])
        .output()
        .unwrap();
    let (_, stderr) = text(&out);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a refused seal is a failed operation"
    );
    assert!(
        stderr.contains("digest mismatch") && stderr.contains(&wrong),
        "{stderr}"
    );
}

#[test]
fn token_is_not_accepted_on_the_command_line_ci_006() {
    let out = bin()
        .args(["seal", "x", "--token", TEST_TOKEN])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(!text(&out).1.contains(TEST_TOKEN));
}

#[test]
fn demo_detects_corruption_and_stops_the_worker() {
    let out = bin()
        .args(["demo", "--size", "3MiB", "--json", "--backend", "sim"])
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    // With --json, stdout is one JSON document; the narrative is on stderr.
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!(stderr.contains("backend: sim"), "{stderr}");
    assert!(stderr.contains("DETECTED: corruption"), "{stderr}");
    assert!(stderr.contains("seal refused: worker stopped"), "{stderr}");
    assert_eq!(json["backend"], "sim");
    assert_eq!(json["corruption_step"], "ran");
    assert_eq!(json["all_steps_ok"], true);
    // The demo's attestation verified with the public key alone, and not for another nonce.
    assert_eq!(json["attestation"]["verified_with_public_key"], true);
    assert_eq!(
        json["attestation"]["replay_for_another_nonce_refused"],
        true
    );
    assert!(
        stderr.contains("checked with the public key alone"),
        "{stderr}"
    );
}

#[test]
fn demo_refuses_a_size_the_device_cannot_hold_before_building_anything() {
    let out = bin()
        .args(["demo", "--size", "100GiB", "--backend", "sim"])
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a bad --size is bad usage: {stdout}\n{stderr}"
    );
    assert!(
        stderr.contains("does not fit") && stderr.contains("4.0 GiB"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("panicked") && !stderr.contains("memory allocation"),
        "{stderr}"
    );
    assert!(!stdout.contains("[1]"), "nothing was built: {stdout}");
}

#[test]
fn demo_uses_cuda_when_a_gpu_is_present_and_says_which_backend_it_used() {
    let _gpu = crate::support::gpu_serial();
    let out = bin()
        .args(["demo", "--size", "3MiB", "--json"])
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    // stdout is one JSON document; the narrative is on stderr.
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    if vram_residency_cuda::driver_present() {
        assert!(stderr.contains("demo, backend: cuda"), "{stderr}");
        assert_eq!(json["backend"], "cuda");
        assert_eq!(json["all_steps_ok"], true);
    } else {
        assert!(stderr.contains("using the sim backend"), "{stderr}");
        assert!(stderr.contains("demo, backend: sim"), "{stderr}");
        assert_eq!(json["backend"], "sim");
    }
}

#[test]
fn a_closed_stdout_ends_the_command_quietly_not_with_a_panic() {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader); // the reader is gone before the command writes anything
    let out = bin()
        .arg("inspect")
        .arg(crate::support::repo_path(
            "crates/vram-residency/tests/fixtures/tiny-v3.gguf",
        ))
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(141), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.is_empty(), "{stderr}");
}
