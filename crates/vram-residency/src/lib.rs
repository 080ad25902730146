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
//! | model paths confined to a models directory (worker service) | [`models_dir`] |
//!
//! This crate has no `unsafe` code (`#![forbid(unsafe_code)]`), no async and no HTTP. The CUDA
//! backend lives in its own crate, the only one allowed `unsafe`.
//!
//! Guarantees and their limits are stated in `docs/threat-model.md`.
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
pub mod capacity;
pub mod digest;
#[cfg(test)]
mod doc_examples;
pub mod encoding;
pub mod error;
pub mod format;
pub mod keys;
pub mod manager;
pub mod models_dir;
pub mod seal;
pub mod shard;
pub mod sim;

pub use attestation::{Attestation, AttestationEnvelope};
pub use audit::{
    AuditEntry, AuditEvent, AuditHead, AuditSink, MemoryAuditSink, NoAuditSink, Severity,
};
pub use audit_log::AuditLog;
pub use backend::{
    Backend, BackendKind, DeviceBuffer, DeviceInfo, DevicePolicy, DeviceVerdict, Residency, Weights,
};
pub use digest::{Digest, TreeDigest};
pub use error::{ByteRange, Result, VramError};
pub use keys::{BearerCheck, PublicKey, WorkerToken};
pub use manager::{ManagerConfig, SealOptions, VerifyReport, VramManager, WorkerState};
pub use models_dir::ModelsDir;
pub use seal::SealRecord;
pub use shard::{SealView, SealedShard, ShardId};
pub use sim::{SimBackend, SimConfig};
