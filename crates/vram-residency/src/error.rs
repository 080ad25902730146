//! The crate's one error type.
//!
//! Every condition has its own variant so that callers (and the worker service) can react precisely.
//! Messages are written for operators: they say what went wrong and, where there is one, what to do.
//!
//! What never appears in a message: a token, a key, an expected seal tag, a device pointer, or model
//! bytes. Forgery is opaque on purpose (STYLE.md §4): it says *that* the seal did not verify, not what
//! tag would have.

use std::path::PathBuf;

use crate::encoding::EncodingError;
use crate::format::ModelFormatError;
pub use crate::ids::ByteRange;
use crate::ids::{Digest, InvalidDigest, InvalidShardId, ShardId};

/// Everything that can go wrong in vram-residency.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VramError {
    /// The model has no bytes (IV-001).
    #[error("the model is empty (0 bytes); nothing to seal")]
    EmptyModel,

    /// The model is larger than the configured maximum (IV-001, RP-003).
    #[error(
        "the model is {}, over the configured maximum of {} (raise --max-model-bytes if this is intended)", crate::ids::bytes(*size), crate::ids::bytes(*max)
    )]
    ModelTooLarge {
        /// Size of the offered model.
        size: u64,
        /// Configured maximum.
        max: u64,
    },

    /// The GPU index does not name a device of this backend (IV-002).
    #[error("GPU index {gpu} is out of range: {}", valid_gpus(*count))]
    InvalidGpuIndex {
        /// The requested index.
        gpu: u32,
        /// How many devices the backend has.
        count: u32,
    },

    /// A caller-chosen shard id is not acceptable (IV-003, IV-005).
    #[error("invalid shard id: {reason} (allowed: 1 to 256 characters of A-Z a-z 0-9 '-' '_')")]
    InvalidShardId {
        /// Why it was refused.
        reason: &'static str,
    },

    /// A shard with this id is already resident on this worker.
    #[error("shard id {shard_id} is already in use on this worker")]
    DuplicateShardId {
        /// The id that is taken.
        shard_id: ShardId,
    },

    /// A digest string could not be parsed (IV-004).
    #[error("invalid digest {input:?}: {reason} (expected sha256:<64 lowercase hex digits>)")]
    InvalidDigest {
        /// The offending input, truncated to 80 characters.
        input: String,
        /// Why it was refused.
        reason: &'static str,
    },

    /// A string input (model reference, path component, ...) was refused (IV-005).
    #[error("invalid {field}: {reason}")]
    InvalidInput {
        /// Which input.
        field: &'static str,
        /// Why it was refused.
        reason: String,
    },

    /// A model path was refused: absolute, with `..`, escaping the models directory, or not a regular
    /// file (worker service). Names the path as the caller gave it.
    #[error("model path {path:?} refused: {reason}")]
    InvalidModelPath {
        /// The path as given (shortened to 200 bytes).
        path: String,
        /// Why it was refused.
        reason: String,
    },

    /// No model file at this path inside the models directory (worker service).
    #[error("no model file {path:?} in the models directory")]
    ModelNotFound {
        /// The path as given (shortened to 200 bytes).
        path: String,
    },

    /// The worker token could not be used. Never contains the token.
    #[error("unusable worker token: {reason}")]
    InvalidToken {
        /// Why it was refused.
        reason: String,
    },

    /// Admission refused: the device has not got room for the model (VP-004, RP-001, RP-004).
    #[error(
        "not enough VRAM on GPU {gpu}: {} needed, {} available after headroom (evict a shard, choose another GPU, or lower the headroom)", crate::ids::bytes(*needed), crate::ids::bytes(*available)
    )]
    InsufficientVram {
        /// Target device.
        gpu: u32,
        /// Bytes asked for.
        needed: u64,
        /// Bytes that could still be admitted.
        available: u64,
    },

    /// The backend could not allocate device memory.
    #[error("device allocation of {} on GPU {gpu} failed: {reason}", crate::ids::bytes(*bytes))]
    AllocationFailed {
        /// Target device.
        gpu: u32,
        /// Bytes asked for.
        bytes: u64,
        /// What the backend reported.
        reason: String,
    },

    /// Reading the model source failed.
    #[error("reading {path}: {source}")]
    Io {
        /// The file (or `<reader>` for a stream).
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },

    /// The source delivered a different number of bytes than announced (for example, the file changed
    /// size while it was being read).
    #[error("the source changed while being read: {} announced, {actual} read", crate::ids::bytes(*expected))]
    SourceChanged {
        /// Bytes announced up front.
        expected: u64,
        /// Bytes actually delivered (or the new size).
        actual: u64,
    },

    /// The model's header in device memory does not describe the tensors the header read before the
    /// upload described: the file changed while it was being sealed. Nothing was sealed.
    #[error(
        "the model changed while it was being sealed: {reason}; nothing was sealed (seal it again once it is no longer being written)"
    )]
    HeaderChanged {
        /// What differs.
        reason: String,
    },

    /// The model's digest is not the one the caller said to expect. Nothing was sealed.
    #[error(
        "digest mismatch: expected {expected}, the bytes in device memory hash to {actual}; nothing was sealed"
    )]
    DigestMismatch {
        /// What the caller expected.
        expected: Digest,
        /// What was computed from device memory.
        actual: Digest,
    },

    /// The seal's HMAC does not verify: the record was altered or was not made with this worker's key.
    /// Deliberately opaque (CI-003).
    #[error(
        "seal verification failed for shard {shard_id}: the seal record or its tag was forged or altered"
    )]
    SealForgery {
        /// The shard whose seal failed (as claimed by the handle).
        shard_id: ShardId,
    },

    /// The seal is authentic but the bytes in device memory no longer hash to the sealed digest.
    #[error("VRAM corruption in shard {shard_id}: {} damaged 512 KiB range(s), first {}; tensors: {}", damaged.len(), damaged.first().map_or_else(|| "unknown".to_owned(), ToString::to_string), name_list(tensors))]
    Corruption {
        /// The corrupted shard.
        shard_id: ShardId,
        /// The 512 KiB-granular ranges whose level-1 hashes differ.
        damaged: Vec<ByteRange>,
        /// Names of the tensors overlapping the damaged ranges (`(header)` for the file header), from
        /// the shard's tensor table; empty when the format is unknown.
        tensors: Vec<String>,
    },

    /// A model seal's HMAC does not verify: the model record or its tag was forged or altered, or it
    /// was not made with this worker's key. Deliberately opaque (CI-003).
    #[error(
        "model seal verification failed for model {model_ref:?}: the model seal record or its tag was forged or altered"
    )]
    ModelSealForgery {
        /// The model, as the (unverified) record names it.
        model_ref: String,
    },

    /// The shards given for a model lack one that its model seal names (or, when sealing, one of
    /// `0..total_shards`).
    #[error(
        "model {model_ref:?}: shard {shard_index} is missing (every shard 0..{total_shards} must be given exactly once)"
    )]
    ModelShardMissing {
        /// The model.
        model_ref: String,
        /// The index no given shard has.
        shard_index: u32,
        /// The model's shard count.
        total_shards: u32,
    },

    /// Two of the shards given for a model have the same index.
    #[error(
        "model {model_ref:?}: shard {shard_index} is given more than once (every shard must be given exactly once)"
    )]
    ModelShardDuplicated {
        /// The model.
        model_ref: String,
        /// The index given twice.
        shard_index: u32,
    },

    /// A shard given for a model has an index the model does not have.
    #[error(
        "model {model_ref:?}: shard {shard_index} is not part of the model (it has {total_shards} shard(s), 0..{total_shards})"
    )]
    ModelShardExtra {
        /// The model.
        model_ref: String,
        /// The extra shard's index.
        shard_index: u32,
        /// The model's shard count.
        total_shards: u32,
    },

    /// A shard given for a model is not the one the model seal names at its index (another model's,
    /// another version's, another seal of the same bytes), or does not agree with the other shards
    /// on the model (its `model_ref`, `total_shards` or backend).
    #[error(
        "model {model_ref:?}: shard {shard_index} ({shard_id}) is not the model's shard {shard_index}: {reason}"
    )]
    ModelShardMismatch {
        /// The model.
        model_ref: String,
        /// The shard's index.
        shard_index: u32,
        /// The given shard's id.
        shard_id: ShardId,
        /// What differs.
        reason: String,
    },

    /// A shard of a model failed its verification (forgery, corruption, policy violation, ...): the
    /// first such shard by index, with its error; the others that failed in the same verification
    /// are in `others`. Each failure followed the shard's own path (audited, the worker stopped).
    #[error(
        "model {model_ref:?}: shard {shard_index} failed verification: {error}{}",
        other_failures(others)
    )]
    ModelShardFailed {
        /// The model.
        model_ref: String,
        /// Index of the first shard that failed.
        shard_index: u32,
        /// Its error.
        #[source]
        error: Box<VramError>,
        /// The other shards that failed, by index, with their errors.
        others: Vec<(u32, VramError)>,
    },

    /// The model file's header was rejected by the format reader; nothing was uploaded.
    #[error("model header rejected: {0}")]
    MalformedModel(#[from] ModelFormatError),

    /// The worker stopped after a security incident; no seals or executions until restart (WORKER-4122).
    #[error(
        "the worker is stopped after a security incident ({reason}); restart it to seal or execute again"
    )]
    WorkerStopped {
        /// What stopped it.
        reason: String,
    },

    /// The shard handle was issued by another manager (or was already released).
    #[error("shard {shard_id} does not belong to this manager")]
    ForeignShard {
        /// The shard.
        shard_id: ShardId,
    },

    /// The shard cannot be freed: tensors lent from it (leases, DLPack views) are still alive.
    #[error(
        "shard {shard_id} is still lent to {leases} holder(s) (tensor views or leases); drop them \
         before evicting it"
    )]
    ShardInUse {
        /// The shard.
        shard_id: ShardId,
        /// How many leases or other holders besides the caller.
        leases: u64,
    },

    /// The VRAM-only policy was violated (VP-001, VP-003, VP-005).
    #[error("VRAM-only policy violation: {reason}")]
    PolicyViolation {
        /// What was found.
        reason: String,
    },

    /// The requested backend cannot be used in this build or on this machine.
    #[error("backend {backend} is unavailable: {reason}")]
    BackendUnavailable {
        /// Backend name.
        backend: &'static str,
        /// Why.
        reason: String,
    },

    /// A backend operation failed (device read, digest kernel, ...).
    #[error("backend failure: {reason}")]
    Backend {
        /// What the backend reported.
        reason: String,
    },

    /// The audit sink refused a record; the operation was not completed (fails closed).
    #[error("audit sink failed: {reason}")]
    Audit {
        /// What the sink reported.
        reason: String,
    },

    /// An attestation did not verify (offline check). Deliberately opaque: never the expected MAC.
    #[error("the attestation does not verify: {reason}")]
    AttestationInvalid {
        /// Why.
        reason: String,
    },

    /// A canonical record (seal record, ...) could not be decoded.
    #[error("malformed {what}: {reason}")]
    MalformedRecord {
        /// Which record.
        what: &'static str,
        /// Why.
        reason: String,
    },

    /// An internal size computation would overflow (MS-003, MS-006).
    #[error("size arithmetic overflow in {context}")]
    Overflow {
        /// Where.
        context: &'static str,
    },
}

impl VramError {
    /// True when retrying later (after other shards are evicted, say) may succeed.
    #[must_use]
    pub fn is_retriable(&self) -> bool {
        match self {
            Self::InsufficientVram { .. } | Self::AllocationFailed { .. } => true,
            Self::ModelShardFailed { error, .. } => error.is_retriable(),
            _ => false,
        }
    }

    /// True for security incidents: the worker must stop (forgery, corruption, policy violation).
    #[must_use]
    pub fn is_fatal(&self) -> bool {
        match self {
            Self::SealForgery { .. }
            | Self::ModelSealForgery { .. }
            | Self::Corruption { .. }
            | Self::PolicyViolation { .. }
            | Self::WorkerStopped { .. } => true,
            Self::ModelShardFailed { error, others, .. } => {
                error.is_fatal() || others.iter().any(|(_, e)| e.is_fatal())
            }
            _ => false,
        }
    }
}

/// At most five names, then a count of the rest.
fn name_list(names: &[String]) -> String {
    if names.is_empty() {
        return "unknown (no tensor table)".to_owned();
    }
    let shown: Vec<&str> = names.iter().take(5).map(String::as_str).collect();
    let rest = names.len().saturating_sub(shown.len());
    if rest == 0 {
        shown.join(", ")
    } else {
        format!("{} and {rest} more", shown.join(", "))
    }
}

/// "; also failed: shard 2 (…), shard 5 (…)", or nothing.
fn other_failures(others: &[(u32, VramError)]) -> String {
    if others.is_empty() {
        return String::new();
    }
    let listed: Vec<String> = others
        .iter()
        .map(|(index, error)| format!("shard {index} ({error})"))
        .collect();
    format!("; also failed: {}", listed.join("; "))
}

/// Result alias used throughout the crate.
pub type Result<T, E = VramError> = std::result::Result<T, E>;

/// "this backend has 1 device (valid: 0)", "… 4 devices (valid: 0 to 3)", "… no device".
fn valid_gpus(count: u32) -> String {
    match count {
        0 => "this backend has no device".to_owned(),
        1 => "this backend has 1 device (valid: 0)".to_owned(),
        n => format!(
            "this backend has {n} devices (valid: 0 to {})",
            n.saturating_sub(1)
        ),
    }
}

impl From<EncodingError> for VramError {
    fn from(error: EncodingError) -> Self {
        match error {
            EncodingError::TooLong { field } => Self::InvalidInput {
                field,
                reason: "longer than 4 GiB".to_owned(),
            },
            EncodingError::Malformed { what, reason } => Self::MalformedRecord { what, reason },
        }
    }
}

impl From<InvalidShardId> for VramError {
    fn from(error: InvalidShardId) -> Self {
        Self::InvalidShardId {
            reason: error.reason,
        }
    }
}

impl From<InvalidDigest> for VramError {
    fn from(error: InvalidDigest) -> Self {
        Self::InvalidDigest {
            input: error.input,
            reason: error.reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retriable_and_fatal_are_disjoint_and_classify_the_seed_cases() {
        let retriable = VramError::InsufficientVram {
            gpu: 0,
            needed: 2,
            available: 1,
        };
        assert!(retriable.is_retriable());
        assert!(!retriable.is_fatal());
        let forgery = VramError::SealForgery {
            shard_id: ShardId::generate(),
        };
        assert!(forgery.is_fatal());
        assert!(!forgery.is_retriable());
        assert!(!VramError::EmptyModel.is_fatal());
        assert!(!VramError::EmptyModel.is_retriable());
    }

    #[test]
    fn insufficient_vram_message_is_actionable_rp_004() {
        let msg = VramError::InsufficientVram {
            gpu: 1,
            needed: 100,
            available: 40,
        }
        .to_string();
        assert!(msg.contains("100 bytes needed"), "{msg}");
        assert!(msg.contains("40 bytes available"), "{msg}");
        assert!(msg.contains("evict"), "{msg}");
    }
}
