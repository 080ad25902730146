//! Fuzz the attestation decoder: strict JSON parsing must never panic; whatever it accepts must
//! survive a round trip through its JSON form unchanged, and verifying it must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vram_residency::WorkerToken;
use vram_residency::attestation::Attestation;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(attestation) = Attestation::from_json(text) {
        let again = Attestation::from_json(&attestation.to_json().to_string())
            .expect("an accepted attestation must re-parse from its own JSON");
        assert_eq!(again, attestation, "JSON round trip changed the attestation");
        let token = WorkerToken::from_bytes(b"example-worker-token-0123456789abcdef".to_vec())
            .expect("a valid token");
        let _ = attestation.verify(&token.derive_keys().attestation, &attestation.nonce);
    }
});
