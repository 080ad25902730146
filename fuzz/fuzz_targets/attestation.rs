//! Fuzz the attestation decoder and verifiers: parsing a DSSE envelope and verifying it as a shard's
//! or a model's attestation (signature, strict statement parsing, consistency, completeness) must never
//! panic, whatever the bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vram_residency::WorkerToken;
use vram_residency::attestation::AttestationEnvelope;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(envelope) = AttestationEnvelope::from_json(text) {
        // The worked example's key, so the seed verifies and mutations start from a valid envelope.
        let public = WorkerToken::from_bytes(b"example-worker-token-0123456789abcdef".to_vec())
            .expect("a valid token")
            .public_key();
        let nonce: Vec<u8> = (0u8..16).collect();
        let _ = envelope.verify(&public, &nonce);
        let _ = envelope.verify_model(&public, &nonce);
        // Whatever parsed must re-parse from its own JSON form to the same payload.
        let again = AttestationEnvelope::from_json(&envelope.to_json().to_string())
            .expect("an accepted envelope must re-parse from its own JSON");
        assert_eq!(again.payload(), envelope.payload(), "JSON round trip changed the payload");
    }
});
