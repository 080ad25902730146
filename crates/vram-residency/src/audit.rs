//! Security-relevant events and where they go.
//!
//! The manager reports every event twice: as a structured `tracing` event (for operators' logs) and to
//! an [`AuditSink`] (for the durable, signed, hash-chained log the worker service plugs in). Events carry no
//! pointer, no key, no token and no expected tag — only public facts. Every entry names its backend, so
//! a `sim` record cannot be mistaken for real residency.
//!
//! Success events fail closed: if the sink refuses the record of a seal, the seal is undone.

use std::sync::{Mutex, PoisonError};

use crate::backend::BackendKind;
use crate::digest::Digest;
use crate::error::Result;
use crate::ids::{ByteRange, ShardId};

/// How bad an event is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Normal operation.
    Info,
    /// Refused request or resource problem.
    Warning,
    /// Security incident: forgery, corruption, policy violation, stop.
    Critical,
}

/// Why a verification failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureKind {
    /// The seal's HMAC did not verify.
    Forgery,
    /// The bytes in device memory changed.
    Corruption,
}

/// One security-relevant event.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
#[non_exhaustive]
pub enum AuditEvent {
    /// A shard was sealed.
    VramSealed {
        /// Shard.
        shard_id: ShardId,
        /// Device index.
        gpu: u32,
        /// Size.
        vram_bytes: u64,
        /// fs-verity digest measured in device memory.
        digest: Digest,
        /// Model reference.
        model_ref: String,
    },
    /// A verification succeeded.
    SealVerified {
        /// Shard.
        shard_id: ShardId,
        /// Device index.
        gpu: u32,
        /// Bytes re-hashed.
        vram_bytes: u64,
    },
    /// A verification failed (critical).
    SealVerificationFailed {
        /// Shard (as claimed by the handle).
        shard_id: ShardId,
        /// Device index.
        gpu: u32,
        /// Forgery or corruption.
        kind: FailureKind,
        /// Damaged 512 KiB ranges (corruption only).
        damaged: Vec<ByteRange>,
        /// Tensors overlapping the damaged ranges (corruption only, when the format is known).
        tensors: Vec<String>,
    },
    /// The shards of a model were bound together by a model seal.
    ModelSealed {
        /// Model reference.
        model_ref: String,
        /// Number of shards the model seal names.
        total_shards: u32,
        /// SHA-256 of the model seal record's canonical encoding, `sha256:<hex>`.
        record_digest: String,
    },
    /// A model seal did not verify (critical): its record or tag was forged or altered.
    ModelSealVerificationFailed {
        /// Model reference, as the (unverified) record names it.
        model_ref: String,
        /// Number of shards the (unverified) record names.
        total_shards: u64,
    },
    /// Device memory was admitted and allocated.
    VramAllocated {
        /// Shard.
        shard_id: ShardId,
        /// Device index.
        gpu: u32,
        /// Bytes.
        bytes: u64,
        /// Admitted bytes on the device afterwards.
        used_after: u64,
        /// Device capacity.
        total: u64,
    },
    /// An allocation was refused or failed.
    VramAllocationFailed {
        /// Device index.
        gpu: u32,
        /// Bytes asked for.
        requested: u64,
        /// The reason (the error message).
        reason: String,
    },
    /// A shard's device memory was freed.
    VramDeallocated {
        /// Shard.
        shard_id: ShardId,
        /// Device index.
        gpu: u32,
        /// Bytes freed.
        bytes: u64,
    },
    /// The VRAM-only policy was violated (critical).
    PolicyViolation {
        /// Device index.
        gpu: u32,
        /// What was found.
        reason: String,
    },
    /// The worker entered the `Stopped` state (critical).
    WorkerStopped {
        /// Why.
        reason: String,
    },
    /// The audit log was reopened after a crash: its torn last line (a record cut short mid-write) is
    /// ended and skipped, and the chain continues from the last complete record (warning). The line is
    /// named by number, offset, length (without its newline) and SHA-256, so it cannot be edited later.
    AuditLogRecovered {
        /// 1-based line number of the torn line.
        skipped_line: u64,
        /// Byte offset where it starts.
        skipped_offset: u64,
        /// Its length in bytes, without the newline that now ends it.
        skipped_bytes: u64,
        /// SHA-256 of those bytes, lowercase hex.
        skipped_sha256: String,
        /// Says in words that bytes were cut, and how many.
        note: String,
    },
    /// A new audit log was created; its first record names the key id of the worker's Ed25519 key
    /// that signs every record.
    AuditLogCreated {
        /// The public key's id (`ed25519:<hex>`).
        key_id: String,
    },
    /// The worker service started.
    ServiceStarted {
        /// Program version.
        version: String,
        /// Number of devices.
        devices: u32,
        /// The address it listens on.
        listen: String,
    },
    /// The worker service runs as root (effective uid 0), allowed by `serve --allow-root` (warning):
    /// it needs no privilege, so a compromise of it should not be a compromise of the host. Recorded
    /// right after `service_started`.
    ServiceRunsAsRoot {
        /// Says so in words, with the flag that allowed it.
        note: String,
    },
    /// The worker service shut down after freeing every shard.
    ServiceStopped {
        /// What asked it to stop (`SIGTERM`, `SIGINT`).
        signal: String,
        /// Shards freed during shutdown.
        shards_freed: u64,
    },
    /// An HTTP request presented the worker token as its credential (as a bearer token, under
    /// another scheme, or bare); it was refused with 401 (critical: the root secret, from which the
    /// seal key and the signing identity derive, is in a client's hands and should be rotated). Names the request,
    /// never the token.
    WorkerTokenRefused {
        /// HTTP method.
        method: String,
        /// Request path, without the query string.
        path: String,
    },
}

impl AuditEvent {
    /// The event's severity.
    #[must_use]
    pub const fn severity(&self) -> Severity {
        match self {
            Self::VramSealed { .. }
            | Self::SealVerified { .. }
            | Self::ModelSealed { .. }
            | Self::VramAllocated { .. }
            | Self::VramDeallocated { .. }
            | Self::ServiceStarted { .. }
            | Self::ServiceStopped { .. }
            | Self::AuditLogCreated { .. } => Severity::Info,
            Self::VramAllocationFailed { .. }
            | Self::AuditLogRecovered { .. }
            | Self::ServiceRunsAsRoot { .. } => Severity::Warning,
            Self::SealVerificationFailed { .. }
            | Self::ModelSealVerificationFailed { .. }
            | Self::PolicyViolation { .. }
            | Self::WorkerStopped { .. }
            | Self::WorkerTokenRefused { .. } => Severity::Critical,
        }
    }

    /// The event's name, as in the serialised `event` field.
    #[must_use]
    pub const fn name(&self) -> &'static str {
        match self {
            Self::VramSealed { .. } => "vram_sealed",
            Self::SealVerified { .. } => "seal_verified",
            Self::SealVerificationFailed { .. } => "seal_verification_failed",
            Self::ModelSealed { .. } => "model_sealed",
            Self::ModelSealVerificationFailed { .. } => "model_seal_verification_failed",
            Self::VramAllocated { .. } => "vram_allocated",
            Self::VramAllocationFailed { .. } => "vram_allocation_failed",
            Self::VramDeallocated { .. } => "vram_deallocated",
            Self::PolicyViolation { .. } => "policy_violation",
            Self::WorkerStopped { .. } => "worker_stopped",
            Self::AuditLogRecovered { .. } => "audit_log_recovered",
            Self::AuditLogCreated { .. } => "audit_log_created",
            Self::ServiceStarted { .. } => "service_started",
            Self::ServiceRunsAsRoot { .. } => "service_runs_as_root",
            Self::ServiceStopped { .. } => "service_stopped",
            Self::WorkerTokenRefused { .. } => "worker_token_refused",
        }
    }
}

/// An event with its context, as handed to a sink.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AuditEntry {
    /// Time of the event, ns since the Unix epoch.
    pub at_ns: u64,
    /// Backend of the manager that reported it.
    pub backend: BackendKind,
    /// Severity.
    pub severity: Severity,
    /// The event.
    #[serde(flatten)]
    pub event: AuditEvent,
}

/// Where audit entries go. Implementations must be cheap to call and must not panic.
pub trait AuditSink: Send + Sync {
    /// Records one entry durably (or as durably as the sink promises).
    ///
    /// # Errors
    /// [`VramError::Audit`](crate::VramError::Audit) when the entry could not be recorded.
    fn record(&self, entry: &AuditEntry) -> Result<()>;

    /// The head of the sink's hash chain (its last durable record), if it keeps one. Attestations
    /// carry it, so a verifier holding one can later detect a log cut after that record.
    fn head(&self) -> Option<AuditHead> {
        None
    }
}

/// The head of a hash-chained audit log: the number and hash of its last durable record. Public.
/// Written `SEQ:HEX` (what `audit verify --expect-head` takes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditHead {
    /// Number of the last record (records are numbered from 1; 0 = no record yet).
    pub seq: u64,
    /// Its record hash (see [`crate::audit_log`]); 32 zero bytes when `seq` is 0.
    pub hash: [u8; 32],
}

impl std::fmt::Display for AuditHead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.seq, hex::encode(self.hash))
    }
}

impl std::str::FromStr for AuditHead {
    type Err = crate::VramError;

    fn from_str(text: &str) -> Result<Self> {
        let bad = || crate::VramError::InvalidInput {
            field: "audit head",
            reason: "expected SEQ:HASH, a record number and 64 lowercase hex digits".to_owned(),
        };
        let (seq, hash_hex) = text.trim().split_once(':').ok_or_else(bad)?;
        let seq: u64 = seq.parse().map_err(|_| bad())?;
        let hash = crate::encoding::lower_hex::<32>(hash_hex.as_bytes()).ok_or_else(bad)?;
        Ok(Self { seq, hash })
    }
}

/// A sink that keeps nothing (the `tracing` events are still emitted by the manager).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoAuditSink;

impl AuditSink for NoAuditSink {
    fn record(&self, _entry: &AuditEntry) -> Result<()> {
        Ok(())
    }
}

/// A sink that keeps entries in memory (tests, the demo).
#[derive(Debug, Default)]
pub struct MemoryAuditSink {
    entries: Mutex<Vec<AuditEntry>>,
}

impl MemoryAuditSink {
    /// A copy of the entries recorded so far.
    #[must_use]
    pub fn entries(&self) -> Vec<AuditEntry> {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl AuditSink for MemoryAuditSink {
    fn record(&self, entry: &AuditEntry) -> Result<()> {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(entry.clone());
        Ok(())
    }
}

/// Emits `entry` as a `tracing` event at a level matching its severity, its fields as readable
/// `key=value` pairs (the same fields as the audit log's JSON, never Rust `Debug` structs).
pub(crate) fn trace(entry: &AuditEntry) {
    let fields = key_values(&entry.event);
    let event = entry.event.name();
    let backend = entry.backend;
    match entry.severity {
        Severity::Info => {
            tracing::info!(target: "vram_residency::audit", "audit {event} backend={backend} {fields}");
        }
        Severity::Warning => {
            tracing::warn!(target: "vram_residency::audit", "audit {event} backend={backend} {fields}");
        }
        Severity::Critical => tracing::error!(
            target: "vram_residency::audit",
            "audit: SECURITY INCIDENT {event} backend={backend} {fields}"
        ),
    }
}

/// The event's fields (without `event`) as `key=value` pairs: strings bare when they hold no space,
/// quote or `=`, else JSON-quoted; lists and numbers as JSON.
#[must_use]
pub fn key_values(event: &AuditEvent) -> String {
    let Ok(serde_json::Value::Object(map)) = serde_json::to_value(event) else {
        return String::new();
    };
    map.iter()
        .filter(|(key, _)| key.as_str() != "event")
        .map(|(key, value)| {
            let text = match value {
                serde_json::Value::String(s)
                    if !s.is_empty() && !s.contains([' ', '"', '=', '\n']) =>
                {
                    s.clone()
                }
                other => other.to_string(),
            };
            format!("{key}={text}")
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_events_render_as_key_value_pairs_not_debug_structs() {
        let event = AuditEvent::SealVerificationFailed {
            shard_id: ShardId::new("s-1").unwrap(),
            gpu: 0,
            kind: FailureKind::Corruption,
            damaged: vec![ByteRange {
                start: 0,
                end: 524_288,
            }],
            tensors: vec!["model.layers.1.mlp.weight".to_owned()],
        };
        let text = key_values(&event);
        assert!(text.contains("shard_id=s-1"), "{text}");
        assert!(text.contains("kind=corruption"), "{text}");
        assert!(
            text.contains("tensors=[\"model.layers.1.mlp.weight\"]"),
            "{text}"
        );
        assert!(
            !text.contains("ByteRange") && !text.contains("SealVerificationFailed"),
            "{text}"
        );
        let stopped = AuditEvent::WorkerStopped {
            reason: "VRAM corruption in shard s-1".to_owned(),
        };
        assert_eq!(
            key_values(&stopped),
            "reason=\"VRAM corruption in shard s-1\""
        );
    }
}
