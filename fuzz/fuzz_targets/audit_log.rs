//! Fuzz the audit-log verifier: any byte string (a tampered, torn or foreign log) must give a report
//! or a typed error; never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vram_residency::WorkerToken;
use vram_residency::audit_log::verify_log;

fuzz_target!(|data: &[u8]| {
    // The worked example's key, so the seed corpus is a valid log and mutations start from one.
    let public = WorkerToken::from_bytes(b"example-worker-token-0123456789abcdef".to_vec())
        .expect("a valid token")
        .public_key();
    let _ = verify_log(&mut &data[..], &public, None);
});
