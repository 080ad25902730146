//! # vram-residency
//!
//! Sealed, VRAM-resident model weights. A shard's bytes are streamed into device memory, their
//! fs-verity digest is measured *where they are*, and a seal — HMAC-SHA256 over a canonical record
//! under a per-worker key — binds the digest to the shard's identity, size, device and time. Before
//! every execution the seal is checked in constant time and the digest re-measured; a bad HMAC is
//! **forgery**, a changed digest is **corruption** (with the damaged 512 KiB ranges named), and either
//! one stops the worker.
//!
//! A newcomer can follow a shard from file to verification by module name:
//!
//! | step | module |
//! | --- | --- |
//! | worker token, per-purpose keys (HKDF) | [`keys`] |
//! | model file headers (GGUF, safetensors, raw) → tensor table | [`format`] |
//! | input checks, capacity admission | [`shard`] (ids), [`capacity`] |
//! | device memory (real or simulated) | [`backend`], [`sim`] |
//! | fs-verity digest (CPU reference, streaming, parallel) | [`digest`] |
//! | seal record, canonical encoding, HMAC | [`seal`] |
//! | the handle | [`shard`] |
//! | orchestration: seal, verify, execute, deallocate | [`manager`] |
//! | security events, and their HMAC-chained log | [`audit`], [`audit_log`] |
//! | signed residency statements for a caller's nonce | [`attestation`] |
//! | the shards of one model bound together; its signed statement | [`model_seal`], [`model_attestation`] |
//! | model paths confined to a models directory (worker service) | [`models_dir`] |
//!
//! This crate has no `unsafe` code (`#![forbid(unsafe_code)]`), no async and no HTTP. The CUDA
//! backend lives in its own crate, the only one allowed `unsafe`.
//!
//! Guarantees and their limits are stated in `docs/threat-model.md`.
//!
//! ## No forging power outside this crate
//!
//! The keys live inside the worker: the HMAC seal key and the Ed25519 identity are crate-private, and
//! the only public key type is [`PublicKey`], which verifies. Code outside this crate cannot reach a
//! key, sign or re-sign a record, or build a tag; each of these fails to compile (pinned by
//! `compile_fail` doc tests):
//!
//! ```compile_fail
//! // The derived keys are crate-private.
//! let token = vram_residency::WorkerToken::from_bytes(vec![b'a'; 32]).unwrap();
//! let _keys = token.derive_keys();
//! ```
//!
//! ```compile_fail
//! // A seal record cannot be signed (or re-signed after an edit) from outside.
//! fn resign(record: &vram_residency::SealRecord, key: &vram_residency::keys::SealKey) {
//!     let _ = record.sign(key);
//! }
//! ```
//!
//! ```compile_fail
//! // A tag cannot be built from chosen bytes.
//! let _tag = vram_residency::keys::Tag([0u8; 32]);
//! ```
//!
//! ```compile_fail
//! // Tags have no `==` (they are only checked in constant time, by the worker).
//! fn same(a: &vram_residency::keys::Tag, b: &vram_residency::keys::Tag) -> bool {
//!     a == b
//! }
//! ```
//!
//! ```compile_fail
//! // The manager does not hand out its keys.
//! fn keys(manager: &vram_residency::VramManager) {
//!     let _ = manager.keys();
//! }
//! ```
//!
//! ```compile_fail
//! // The worker's signing identity is not reachable; a public key cannot sign.
//! fn sign(public: &vram_residency::PublicKey) {
//!     let _ = public.sign_dsse("application/vnd.in-toto+json", b"{}");
//! }
//! ```
//!
//! The same code with what *is* public compiles (so the tests above fail for the reason they name):
//!
//! ```
//! let token = vram_residency::WorkerToken::from_bytes(vec![b'a'; 32]).unwrap();
//! let public: vram_residency::PublicKey = token.public_key();
//! assert!(public.key_id().starts_with("ed25519:"));
//! ```
#![forbid(unsafe_code)]
// Tests may unwrap and index; library code is linted without this (clippy's non-test pass).
#![cfg_attr(
    test,
    allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing,
        clippy::arithmetic_side_effects,
        clippy::cast_possible_truncation
    )
)]

pub mod attestation;
pub mod audit;
pub mod audit_log;
pub mod backend;
pub mod background;
pub mod capacity;
pub mod digest;
#[cfg(test)]
mod doc_examples;
pub mod encoding;
pub mod error;
pub mod format;
pub mod ids;
pub mod keys;
pub mod manager;
pub mod model_attestation;
pub mod model_seal;
pub mod models_dir;
pub mod seal;
pub mod shard;
pub mod sim;
pub mod weights;

pub use attestation::{Attestation, AttestationEnvelope};
pub use audit::{
    AuditEntry, AuditEvent, AuditHead, AuditSink, MemoryAuditSink, NoAuditSink, Severity,
};
pub use audit_log::AuditLog;
pub use backend::{
    Backend, BackendKind, Confinement, DeviceBuffer, DeviceInfo, DevicePolicy, DeviceVerdict,
    LaneMechanism, Residency, SmBudget, UnifiedMemoryFacts,
};
pub use background::{BackgroundConfig, BackgroundStats, BackgroundVerifier};
pub use digest::{Digest, TreeDigest};
pub use error::{ByteRange, Result, VramError};
pub use keys::{BearerCheck, PublicKey, Tag, WorkerToken};
pub use manager::{
    GpuVerifyReport, ManagerConfig, ModelVerifyReport, SealOptions, VerifyReport, VramManager,
    WorkerState,
};
pub use model_attestation::{AttestedShard, ModelAttestation, VerifiedAttestation};
pub use model_seal::{ModelSealRecord, ModelShardEntry, SealedModel};
pub use models_dir::ModelsDir;
pub use seal::SealRecord;
pub use shard::{SealView, SealedShard, ShardId};
pub use sim::{SimBackend, SimConfig};
pub use weights::{
    DeviceRegion, Element, ElementKind, Lease, Location, TensorLayout, TensorView, Weights,
};
