//! Shard identity and the sealed-shard handle.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::backend::{AllocationId, BackendKind, DeviceBuffer};
use crate::capacity::Reservation;
use crate::digest::{Digest, TreeDigest};
use crate::error::{ByteRange, Result, VramError};
use crate::format::{ModelFormat, TensorTable};
use crate::keys::Tag;
use crate::seal::SealRecord;

/// Longest shard id accepted (IV-003).
pub const MAX_SHARD_ID_LEN: usize = 256;

/// A validated shard identifier: 1 to 256 characters of `A-Z a-z 0-9 - _` (IV-003, IV-005). This
/// excludes NUL, `/`, `.` and therefore `..`, so an id is always safe as a file-name component.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct ShardId(String);

impl ShardId {
    /// Validates a caller-chosen id.
    ///
    /// # Errors
    /// [`VramError::InvalidShardId`] with the reason.
    pub fn new(id: &str) -> Result<Self> {
        let refuse = |reason| Err(VramError::InvalidShardId { reason });
        if id.is_empty() {
            return refuse("it is empty");
        }
        if id.len() > MAX_SHARD_ID_LEN {
            return refuse("it is longer than 256 characters");
        }
        if id.contains('\0') {
            return refuse("it contains a NUL byte");
        }
        if id.contains('/') || id.contains('\\') {
            return refuse("it contains a path separator");
        }
        if !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return refuse("it contains a character other than A-Z a-z 0-9 '-' '_'");
        }
        Ok(Self(id.to_owned()))
    }

    /// A fresh random id, `shard-` followed by 32 hex digits (128 random bits).
    #[must_use]
    pub fn generate() -> Self {
        let mut random = [0u8; 16];
        if getrandom::fill(&mut random).is_err() {
            // No OS randomness: fall back to time and a process-wide counter, still unique here.
            static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let t = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            let t = u64::try_from(t & u128::from(u64::MAX)).unwrap_or_default();
            random[..8].copy_from_slice(&n.to_be_bytes());
            random[8..].copy_from_slice(&t.to_be_bytes());
        }
        Self(format!("shard-{}", hex::encode(random)))
    }

    /// The id as text.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl std::str::FromStr for ShardId {
    type Err = VramError;
    fn from_str(s: &str) -> Result<Self> {
        Self::new(s)
    }
}

/// Nanoseconds since the Unix epoch, saturating (0 before the epoch).
#[must_use]
pub fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The time `ns` nanoseconds after the Unix epoch.
#[must_use]
pub fn from_unix_nanos(ns: u64) -> SystemTime {
    UNIX_EPOCH
        .checked_add(Duration::from_nanos(ns))
        .unwrap_or(UNIX_EPOCH)
}

/// A model shard resident in device memory under a seal.
///
/// The public fields are the seed's; they are covered by the seal, so changing any of them makes
/// [`VramManager::verify_sealed`](crate::VramManager::verify_sealed) fail as forgery. The seal tag, the
/// device buffer and the level-1 hashes are private. No device pointer is reachable through this
/// type: not in `Debug`, not in `Serialize`, not through any method (MS-001); the only way to the
/// weights is [`VramManager::execute`](crate::VramManager::execute), which verifies first.
///
/// Dropping a shard frees its device memory and returns its capacity reservation; prefer
/// [`VramManager::deallocate`](crate::VramManager::deallocate), which also writes the audit record.
pub struct SealedShard {
    /// Shard identity.
    pub shard_id: ShardId,
    /// Device index the shard lives on.
    pub gpu_device: u32,
    /// Size in bytes.
    pub vram_bytes: u64,
    /// fs-verity digest measured in device memory at seal time.
    pub digest: Digest,
    /// When it was sealed.
    pub sealed_at: SystemTime,
    /// Caller's model reference.
    pub model_ref: String,
    /// Index of this shard in its model.
    pub shard_index: u32,
    /// Number of shards in the model.
    pub total_shards: u32,
    pub(crate) device_uuid: [u8; 16],
    pub(crate) backend: BackendKind,
    pub(crate) tensor_table: Option<std::sync::Arc<TensorTable>>,
    pub(crate) tag: Tag,
    pub(crate) sealed_tree: TreeDigest,
    pub(crate) manager_id: u64,
    // Field order matters for drop order: free the device memory, then release the reservation.
    pub(crate) buffer: Box<dyn DeviceBuffer>,
    pub(crate) _reservation: Reservation,
}

impl SealedShard {
    /// The seal record as the shard's current fields describe it. Verification recomputes the tag over
    /// exactly this, so any edit to a public field shows up as forgery.
    #[must_use]
    pub fn record(&self) -> SealRecord {
        SealRecord {
            shard_id: self.shard_id.clone(),
            digest: self.digest,
            vram_bytes: self.vram_bytes,
            gpu_device: self.gpu_device,
            device_uuid: self.device_uuid,
            sealed_at_ns: unix_nanos(self.sealed_at),
            backend: self.backend,
            model_ref: self.model_ref.clone(),
            shard_index: self.shard_index,
            total_shards: self.total_shards,
            tensor_table_digest: self.tensor_table.as_ref().map(|t| t.digest()),
        }
    }

    /// Names of the tensors overlapping `ranges` (shard offsets = file offsets), deduplicated, in
    /// table order; `(header)` when a range touches the header before the data section.
    #[must_use]
    pub fn tensors_in(&self, ranges: &[ByteRange]) -> Vec<String> {
        let Some(table) = &self.tensor_table else {
            return Vec::new();
        };
        let mut names: Vec<String> = Vec::new();
        if ranges.iter().any(|r| r.start < table.data_offset) && table.data_offset > 0 {
            names.push("(header)".to_owned());
        }
        for range in ranges {
            for tensor in table.tensors_in_range(range.start, range.end) {
                if !names.contains(&tensor.name) {
                    names.push(tensor.name.clone());
                }
            }
        }
        names
    }

    /// The seal tag (public: it authenticates the record, it is not a key).
    #[must_use]
    pub const fn seal_tag(&self) -> &Tag {
        &self.tag
    }

    /// Which backend holds the shard.
    #[must_use]
    pub const fn backend(&self) -> BackendKind {
        self.backend
    }

    /// Device UUID recorded in the seal.
    #[must_use]
    pub const fn device_uuid(&self) -> [u8; 16] {
        self.device_uuid
    }

    /// The model's tensor table (read from its header before upload), if known.
    #[must_use]
    pub fn tensor_table(&self) -> Option<&TensorTable> {
        self.tensor_table.as_deref()
    }

    /// Opaque identifier of the device allocation: a per-backend counter, not an address. Used by test
    /// tooling to reach the allocation from outside the manager (corruption injection).
    #[must_use]
    pub fn allocation_id(&self) -> AllocationId {
        self.buffer.allocation_id()
    }

    /// The public view for printing and serialisation.
    #[must_use]
    pub fn view(&self) -> SealView {
        let mut view = SealView::new(&self.record(), &self.tag);
        if let Some(table) = &self.tensor_table {
            view.format = Some(table.format);
            view.tensor_count = Some(table.tensors.len() as u64);
        }
        view
    }

    /// Test hook: flips bit `bit % 256` of the seal tag, to prove that forgery is detected. Only with
    /// the `test-hooks` feature, which only test builds enable (the CLI's dev-dependency).
    #[cfg(feature = "test-hooks")]
    pub fn flip_tag_bit_for_tests(&mut self, bit: usize) {
        let mut bytes = *self.tag.as_bytes();
        let bit = bit % 256;
        if let Some(byte) = bytes.get_mut(bit / 8) {
            *byte ^= 1 << (bit % 8);
        }
        self.tag = Tag::from_bytes(bytes);
    }
}

impl fmt::Debug for SealedShard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealedShard")
            .field("shard_id", &self.shard_id)
            .field("gpu_device", &self.gpu_device)
            .field("vram_bytes", &self.vram_bytes)
            .field("digest", &self.digest)
            .field("sealed_at_ns", &unix_nanos(self.sealed_at))
            .field("model_ref", &self.model_ref)
            .field("shard_index", &self.shard_index)
            .field("total_shards", &self.total_shards)
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for SealedShard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "shard {} ({} bytes on GPU {}, backend {}) {}",
            self.shard_id, self.vram_bytes, self.gpu_device, self.backend, self.digest
        )
    }
}

impl serde::Serialize for SealedShard {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        self.view().serialize(serializer)
    }
}

/// The public, printable form of a seal: every record field plus the tag. This is what
/// `vram-residency seal --json` prints.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SealView {
    /// Always `sim` or `cuda`, first, so that a simulated record is never mistaken for a real one.
    pub backend: BackendKind,
    /// Shard id.
    pub shard_id: ShardId,
    /// fs-verity digest.
    pub digest: Digest,
    /// Bytes.
    pub vram_bytes: u64,
    /// Device index.
    pub gpu_device: u32,
    /// Device UUID, formatted as a UUID.
    pub device_uuid: String,
    /// Seal time, ns since the epoch.
    pub sealed_at_ns: u64,
    /// Seal time, RFC 3339.
    pub sealed_at: String,
    /// Model reference.
    pub model_ref: String,
    /// Shard index.
    pub shard_index: u32,
    /// Shard count.
    pub total_shards: u32,
    /// Model container format, when known.
    pub format: Option<ModelFormat>,
    /// Number of tensors in the tensor table, when known.
    pub tensor_count: Option<u64>,
    /// Tensor-table digest, hex, if any.
    pub tensor_table_digest: Option<String>,
    /// Seal record format version.
    pub seal_version: u16,
    /// HMAC-SHA256 seal tag, hex.
    pub seal_tag: String,
}

impl SealView {
    /// Builds the view of `record` sealed with `tag`.
    #[must_use]
    pub fn new(record: &SealRecord, tag: &Tag) -> Self {
        Self {
            backend: record.backend,
            shard_id: record.shard_id.clone(),
            digest: record.digest,
            vram_bytes: record.vram_bytes,
            gpu_device: record.gpu_device,
            device_uuid: format_uuid(&record.device_uuid),
            sealed_at_ns: record.sealed_at_ns,
            sealed_at: humantime::format_rfc3339_nanos(from_unix_nanos(record.sealed_at_ns))
                .to_string(),
            model_ref: record.model_ref.clone(),
            shard_index: record.shard_index,
            total_shards: record.total_shards,
            format: None,
            tensor_count: None,
            tensor_table_digest: record.tensor_table_digest.map(hex::encode),
            seal_version: crate::seal::SEAL_VERSION,
            seal_tag: tag.to_hex(),
        }
    }
}

/// Formats 16 bytes as `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`.
#[must_use]
pub fn format_uuid(bytes: &[u8; 16]) -> String {
    let h = hex::encode(bytes);
    let part = |a: usize, b: usize| h.get(a..b).unwrap_or_default();
    format!(
        "{}-{}-{}-{}-{}",
        part(0, 8),
        part(8, 12),
        part(12, 16),
        part(16, 20),
        part(20, 32)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_ids_are_validated_iv_003_iv_005() {
        assert!(ShardId::new("llama-3_8b-shard-0").is_ok());
        assert!(ShardId::new(&"a".repeat(256)).is_ok());
        for bad in [
            String::new(),
            "a".repeat(257),
            "a\0b".to_owned(),
            "a/b".to_owned(),
            "..".to_owned(),
            "../etc".to_owned(),
            "a b".to_owned(),
            "ä".to_owned(),
        ] {
            assert!(
                matches!(ShardId::new(&bad), Err(VramError::InvalidShardId { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn generated_ids_are_valid_and_distinct() {
        let a = ShardId::generate();
        let b = ShardId::generate();
        assert_ne!(a, b);
        assert!(ShardId::new(a.as_str()).is_ok());
        assert_eq!(a.as_str().len(), 6 + 32);
    }

    #[test]
    fn uuid_formatting() {
        assert_eq!(
            format_uuid(&[0x11; 16]),
            "11111111-1111-1111-1111-111111111111"
        );
    }

    #[test]
    fn nanos_round_trip() {
        let ns = 1_700_000_000_123_456_789;
        assert_eq!(unix_nanos(from_unix_nanos(ns)), ns);
    }
}
