//! Fuzz the audit-log verifier: any byte string (a tampered, torn or foreign log) must give a report
//! or a typed error; never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vram_residency::WorkerToken;
use vram_residency::audit_log::verify_log;

fuzz_target!(|data: &[u8]| {
    // The worked example's token, so the seed corpus is a valid log and mutations start from one.
    let token = WorkerToken::from_bytes(b"example-worker-token-0123456789abcdef".to_vec())
        .expect("a valid token");
    let keys = token.derive_keys();
    let _ = verify_log(&mut &data[..], &keys.audit);
});
