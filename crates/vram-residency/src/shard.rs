//! The sealed-shard handle and its public view. Shard ids, times and UUID formatting live in
//! [`crate::ids`] (re-exported here).

use std::fmt;
use std::time::SystemTime;

use crate::backend::{AllocationId, BackendKind, DeviceBuffer};
use crate::capacity::Reservation;
use crate::digest::{Digest, TreeDigest};
use crate::format::{ModelFormat, TensorTable};
pub use crate::ids::{
    ByteRange, InvalidShardId, MAX_SHARD_ID_LEN, ShardId, format_uuid, from_unix_nanos, unix_nanos,
};
use crate::keys::Tag;
use crate::seal::SealRecord;

/// A model shard resident in device memory under a seal.
///
/// [`record`](Self::record) is the seal record — the one record type, which the seal tag, the public
/// view ([`SealView`]) and attestations all wrap. It is public, and covered by the seal: changing any
/// of its fields makes [`VramManager::verify_sealed`](crate::VramManager::verify_sealed) fail as
/// forgery. The seal tag, the device buffer and the level-1 hashes are private. No device pointer is
/// reachable through this type: not in `Debug`, not in `Serialize`, not through any method (MS-001);
/// the only way to the weights is [`VramManager::execute`](crate::VramManager::execute), which
/// verifies first.
///
/// Dropping a shard frees its device memory and returns its capacity reservation; prefer
/// [`VramManager::deallocate`](crate::VramManager::deallocate), which also writes the audit record.
pub struct SealedShard {
    /// What the seal covers: identity, digest, size, device, time, model position, tensor table.
    pub record: SealRecord,
    pub(crate) tensor_table: Option<std::sync::Arc<TensorTable>>,
    pub(crate) tag: Tag,
    pub(crate) sealed_tree: TreeDigest,
    pub(crate) manager_id: u64,
    // Field order matters for drop order: free the device memory, then release the reservation.
    pub(crate) buffer: Box<dyn DeviceBuffer>,
    pub(crate) _reservation: Reservation,
}

impl SealedShard {
    /// Shard identity.
    #[must_use]
    pub const fn shard_id(&self) -> &ShardId {
        &self.record.shard_id
    }

    /// Device index the shard lives on.
    #[must_use]
    pub const fn gpu_device(&self) -> u32 {
        self.record.gpu_device
    }

    /// Size in bytes.
    #[must_use]
    pub const fn vram_bytes(&self) -> u64 {
        self.record.vram_bytes
    }

    /// fs-verity digest measured in device memory at seal time.
    #[must_use]
    pub const fn digest(&self) -> Digest {
        self.record.digest
    }

    /// When it was sealed.
    #[must_use]
    pub fn sealed_at(&self) -> SystemTime {
        from_unix_nanos(self.record.sealed_at_ns)
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
        self.record.backend
    }

    /// Device UUID recorded in the seal.
    #[must_use]
    pub const fn device_uuid(&self) -> [u8; 16] {
        self.record.device_uuid
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

    /// True when `[address, address + len)` lies inside this shard's memory. Lets an engine check
    /// that its tensors alias the sealed bytes (not a copy) without the shard revealing where they
    /// are: the answer is a yes or no, never an address (MS-001).
    ///
    /// # Errors
    /// Backend errors.
    pub fn holds(&self, address: u64, len: u64) -> crate::error::Result<bool> {
        let start = self.buffer.weights()?.location().address_at(0);
        let end = start.saturating_add(self.record.vram_bytes);
        Ok(address >= start && address.checked_add(len).is_some_and(|e| e <= end))
    }

    /// The public view for printing and serialisation.
    #[must_use]
    pub fn view(&self) -> SealView {
        let mut view = SealView::new(&self.record, &self.tag);
        if let Some(table) = &self.tensor_table {
            view.format = Some(table.format);
            view.format_version = match table.format {
                ModelFormat::Gguf { version } => Some(version),
                ModelFormat::Raw | ModelFormat::Safetensors => None,
            };
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
            .field("record", &self.record)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for SealedShard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "shard {} ({} bytes on GPU {}, backend {}) {}",
            self.record.shard_id,
            self.record.vram_bytes,
            self.record.gpu_device,
            self.record.backend,
            self.record.digest
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
    /// Model container format, when known: `"gguf"`, `"safetensors"` or `"raw"` (a flat field).
    #[serde(serialize_with = "serialize_format_name")]
    pub format: Option<ModelFormat>,
    /// The container's own version (GGUF 2 or 3), when it has one.
    pub format_version: Option<u32>,
    /// Number of tensors in the tensor table, when known.
    pub tensor_count: Option<u64>,
    /// Tensor-table digest, `sha256:<hex>`, if any.
    pub tensor_table_digest: Option<String>,
    /// Seal record format version.
    pub seal_version: u16,
    /// The seal tag, `hmac-sha256:<hex>`.
    pub seal_tag: String,
}

/// Digests and tags in JSON carry their algorithm: `sha256:<hex>`, `hmac-sha256:<hex>`.
pub const SEAL_TAG_PREFIX: &str = "hmac-sha256:";

fn serialize_format_name<S: serde::Serializer>(
    format: &Option<ModelFormat>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    match format {
        Some(ModelFormat::Raw) => s.serialize_str("raw"),
        Some(ModelFormat::Gguf { .. }) => s.serialize_str("gguf"),
        Some(ModelFormat::Safetensors) => s.serialize_str("safetensors"),
        None => s.serialize_none(),
    }
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
            format_version: None,
            tensor_count: None,
            tensor_table_digest: record
                .tensor_table_digest
                .map(|digest| format!("sha256:{}", hex::encode(digest))),
            seal_version: crate::seal::SEAL_VERSION,
            seal_tag: format!("{SEAL_TAG_PREFIX}{}", tag.to_hex()),
        }
    }
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
                matches!(ShardId::new(&bad), Err(crate::ids::InvalidShardId { .. })),
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
