//! The model seal: one record that binds the shards of one model together, and its HMAC.
//!
//! Each shard has its own seal ([`crate::seal`]); nothing in a shard's seal says which *other* shards
//! make up the model, so a set of individually valid shards could mix two models (or two versions of
//! one), miss a shard or hold one twice. The model seal record names every shard of the model — its
//! index, id, fs-verity digest, size, device and the tag of its own seal — and is tagged with the same
//! worker seal key. [`VramManager::seal_model_set`](crate::VramManager::seal_model_set) makes it,
//! [`VramManager::verify_model`](crate::VramManager::verify_model) checks that a set of shards is
//! exactly the one it names.
//!
//! The encoding is the crate's one canonical encoding ([`crate::encoding`]), with its own domain tag:
//! a shard's seal tag is an HMAC over bytes that start with `vram-residency/seal-record/v2`, a model
//! tag over bytes that start with `vram-residency/model-seal/v1`, so neither can ever pass for the
//! other. `docs/model-seal.md` specifies it, with a worked example that a test recomputes.
//!
//! ```text
//! u32+n   domain                   "vram-residency/model-seal/v1"
//! u16     version                  1
//! u8      backend                  1 = cuda, 2 = sim
//! u32+n   model_ref                0..=1024 bytes of UTF-8, no control character
//! u32     total_shards             1..=4096
//! u64     sealed_at_ns             nanoseconds since the Unix epoch
//! then total_shards entries, in index order 0, 1, ...:
//!   u32     shard_index
//!   u32+n   shard_id
//!   [32]    digest                 fs-verity digest of the shard, as sealed
//!   u64     vram_bytes
//!   u32     gpu_device
//!   [16]    device_uuid
//!   [32]    seal_tag               the tag of the shard's own seal
//! ```
//!
//! This module depends on the seal record's helpers, the keys and the encoding; never on the manager.

use crate::backend::BackendKind;
use crate::digest::Digest;
use crate::encoding::{Decoder, Encoder};
use crate::error::{Result, VramError};
use crate::ids::ShardId;
use crate::keys::{SealKey, Tag};
use crate::seal::{SealRecord, validate_model_ref};

/// Domain-separation tag at the start of every model seal record.
pub const MODEL_SEAL_DOMAIN: &str = "vram-residency/model-seal/v1";
/// Version of the encoding.
pub const MODEL_SEAL_VERSION: u16 = 1;
/// Most shards one model may have.
pub const MAX_MODEL_SHARDS: u32 = 4096;

/// One shard as the model seal names it. Public data.
#[derive(Debug, Clone)]
pub struct ModelShardEntry {
    /// Position of the shard in the model (entries are in index order, 0 first).
    pub shard_index: u32,
    /// Shard identity.
    pub shard_id: ShardId,
    /// fs-verity digest of the shard, as sealed.
    pub digest: Digest,
    /// Size in bytes.
    pub vram_bytes: u64,
    /// Device index.
    pub gpu_device: u32,
    /// Device UUID.
    pub device_uuid: [u8; 16],
    /// The tag of the shard's own seal (public: it authenticates the shard's record).
    pub seal_tag: Tag,
}

impl ModelShardEntry {
    /// The entry for a shard sealed with `record` and `tag`.
    #[must_use]
    pub fn new(record: &SealRecord, tag: &Tag) -> Self {
        Self {
            shard_index: record.shard_index,
            shard_id: record.shard_id.clone(),
            digest: record.digest,
            vram_bytes: record.vram_bytes,
            gpu_device: record.gpu_device,
            device_uuid: record.device_uuid,
            seal_tag: *tag,
        }
    }

    /// The first field in which a shard (its seal record and tag) differs from this entry, as a
    /// phrase for an error message; `None` when it is the shard this entry names. Tags are compared
    /// in constant time.
    #[must_use]
    pub fn difference(&self, record: &SealRecord, tag: &Tag) -> Option<&'static str> {
        if record.shard_index != self.shard_index {
            Some("its shard_index differs")
        } else if record.shard_id != self.shard_id {
            Some("its shard id differs (another shard)")
        } else if record.digest != self.digest {
            Some("its digest differs (other bytes: another model or another version)")
        } else if record.vram_bytes != self.vram_bytes {
            Some("its size differs")
        } else if record.gpu_device != self.gpu_device {
            Some("its GPU differs")
        } else if record.device_uuid != self.device_uuid {
            Some("its device UUID differs")
        } else if !tags_equal(tag, &self.seal_tag) {
            Some("its seal tag differs (another seal of the same bytes)")
        } else {
            None
        }
    }
}

/// Constant-time equality of two public tags.
pub(crate) fn tags_equal(a: &Tag, b: &Tag) -> bool {
    bool::from(subtle::ConstantTimeEq::ct_eq(
        &a.as_bytes()[..],
        &b.as_bytes()[..],
    ))
}

/// Everything a model seal covers. Public data; the tag over its [`encode`](Self::encode)d form is
/// the model seal.
#[derive(Debug, Clone)]
pub struct ModelSealRecord {
    /// `cuda` or `sim` (every shard's backend).
    pub backend: BackendKind,
    /// The model's name, as every shard's seal gives it.
    pub model_ref: String,
    /// When the model seal was made, ns since the Unix epoch.
    pub sealed_at_ns: u64,
    /// One entry per shard, in index order: entry `i` has `shard_index == i`.
    pub shards: Vec<ModelShardEntry>,
}

impl ModelSealRecord {
    /// Number of shards (the encoding's `total_shards`).
    ///
    /// # Errors
    /// [`VramError::InvalidInput`] when there are none or more than [`MAX_MODEL_SHARDS`].
    pub fn total_shards(&self) -> Result<u32> {
        u32::try_from(self.shards.len())
            .ok()
            .filter(|n| (1..=MAX_MODEL_SHARDS).contains(n))
            .ok_or_else(|| VramError::InvalidInput {
                field: "total_shards",
                reason: format!(
                    "a model seal names 1 to {MAX_MODEL_SHARDS} shards, not {}",
                    self.shards.len()
                ),
            })
    }

    /// Bytes of all shards together (saturating).
    #[must_use]
    pub fn total_bytes(&self) -> u64 {
        self.shards
            .iter()
            .fold(0u64, |sum, shard| sum.saturating_add(shard.vram_bytes))
    }

    /// The canonical encoding (see the module docs).
    ///
    /// # Errors
    /// [`VramError::InvalidInput`] for a bad `model_ref`, a shard count outside 1..=4096, or entries
    /// that are not in index order `0, 1, ...`.
    pub fn encode(&self) -> Result<Vec<u8>> {
        validate_model_ref(&self.model_ref)?;
        let total = self.total_shards()?;
        let mut e = Encoder::new(MODEL_SEAL_DOMAIN, MODEL_SEAL_VERSION);
        e.u8(self.backend.code());
        e.str(&self.model_ref, "model_ref")?;
        e.u32(total).u64(self.sealed_at_ns);
        for (expected, entry) in (0u32..).zip(&self.shards) {
            if entry.shard_index != expected {
                return Err(VramError::InvalidInput {
                    field: "shard_index",
                    reason: format!(
                        "model seal entry {expected} names shard_index {}: entries must be in index order",
                        entry.shard_index
                    ),
                });
            }
            e.u32(entry.shard_index);
            e.str(entry.shard_id.as_str(), "shard_id")?;
            e.fixed(entry.digest.as_bytes())
                .u64(entry.vram_bytes)
                .u32(entry.gpu_device)
                .fixed(&entry.device_uuid)
                .fixed(entry.seal_tag.as_bytes());
        }
        Ok(e.finish())
    }

    /// Strictly decodes a canonical encoding: known version and backend, valid model reference,
    /// 1..=4096 shards, exactly that many entries in index order `0..total_shards`, valid shard ids,
    /// no trailing bytes. `decode(encode(r))` is `r`.
    ///
    /// # Errors
    /// [`VramError::MalformedRecord`] naming the first problem.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let mut r = Decoder::new(
            bytes,
            "model seal record",
            MODEL_SEAL_DOMAIN,
            MODEL_SEAL_VERSION,
        )?;
        let backend =
            BackendKind::from_code(r.u8()?).ok_or_else(|| malformed("unknown backend code"))?;
        let model_ref = r.str()?.to_owned();
        validate_model_ref(&model_ref).map_err(|e| malformed(&e.to_string()))?;
        let total = r.u32()?;
        if !(1..=MAX_MODEL_SHARDS).contains(&total) {
            return Err(malformed(&format!(
                "total_shards is {total}; 1 to {MAX_MODEL_SHARDS} are allowed"
            )));
        }
        let sealed_at_ns = r.u64()?;
        let mut shards = Vec::new();
        for expected in 0..total {
            let shard_index = r.u32()?;
            if shard_index != expected {
                return Err(malformed(&format!(
                    "entry {expected} names shard_index {shard_index}: entries must be in index order"
                )));
            }
            let shard_id = ShardId::new(r.str()?).map_err(|e| malformed(&e.to_string()))?;
            shards.push(ModelShardEntry {
                shard_index,
                shard_id,
                digest: Digest::from_bytes(r.array()?),
                vram_bytes: r.u64()?,
                gpu_device: r.u32()?,
                device_uuid: r.array()?,
                seal_tag: Tag::from_bytes(r.array()?),
            });
        }
        r.finish()?;
        Ok(Self {
            backend,
            model_ref,
            sealed_at_ns,
            shards,
        })
    }

    /// SHA-256 of the canonical encoding, `sha256:<hex>`: how audit records name a model seal.
    ///
    /// # Errors
    /// As [`encode`](Self::encode).
    pub fn record_digest(&self) -> Result<String> {
        use sha2::Digest as _;
        let hash = sha2::Sha256::digest(self.encode()?);
        Ok(format!("sha256:{}", hex::encode(hash)))
    }

    /// Signs the record: HMAC-SHA256 of the canonical encoding under the seal key.
    pub(crate) fn sign(&self, key: &SealKey) -> Result<Tag> {
        Ok(key.sign(&self.encode()?))
    }

    /// Verifies `tag` in constant time. Any change to any field or any bit of the tag fails, as
    /// [`VramError::ModelSealForgery`]; the error never contains the expected tag.
    pub(crate) fn verify(&self, key: &SealKey, tag: &Tag) -> Result<()> {
        let forgery = || VramError::ModelSealForgery {
            model_ref: self.model_ref.clone(),
        };
        let encoded = self.encode().map_err(|_| forgery())?;
        key.verify(&encoded, tag).map_err(|_| forgery())
    }
}

/// A model sealed as a whole: its record and the tag over it. Public data, and no device memory: the
/// shards stay where they are, each with its own seal.
///
/// [`record`](Self::record) is public and covered by the tag: changing any of its fields makes
/// [`VramManager::verify_model`](crate::VramManager::verify_model) fail as forgery. `Debug` shows the
/// record (public) and no key; the tag is public too (it is not a key) but is only shown by
/// [`seal_tag`](Self::seal_tag).
#[derive(Clone)]
pub struct SealedModel {
    /// What the model seal covers.
    pub record: ModelSealRecord,
    pub(crate) tag: Tag,
}

impl SealedModel {
    /// The model seal's tag (HMAC-SHA256 under the worker's seal key).
    #[must_use]
    pub const fn seal_tag(&self) -> &Tag {
        &self.tag
    }

    /// The model's name.
    #[must_use]
    pub fn model_ref(&self) -> &str {
        &self.record.model_ref
    }

    /// Number of shards.
    #[must_use]
    pub fn total_shards(&self) -> usize {
        self.record.shards.len()
    }

    /// Test hook: flips bit `bit % 256` of the model tag, to prove that forgery is detected. Only
    /// with the `test-hooks` feature.
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

impl std::fmt::Debug for SealedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedModel")
            .field("record", &self.record)
            .finish_non_exhaustive()
    }
}

fn malformed(reason: &str) -> VramError {
    VramError::MalformedRecord {
        what: "model seal record",
        reason: reason.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::WorkerToken;

    fn key() -> SealKey {
        WorkerToken::from_bytes(vec![b'k'; 32])
            .unwrap()
            .derive_keys()
            .seal
    }

    fn shard_record(index: u32, total: u32) -> SealRecord {
        SealRecord {
            shard_id: ShardId::new(&format!("shard-{index}")).unwrap(),
            digest: Digest::from_bytes([u8::try_from(index).unwrap() + 1; 32]),
            vram_bytes: 4096 * u64::from(index + 1),
            gpu_device: index,
            device_uuid: crate::sim::SimBackend::device_uuid(index),
            sealed_at_ns: 1_700_000_000_000_000_000,
            backend: BackendKind::Sim,
            model_ref: "m".to_owned(),
            shard_index: index,
            total_shards: total,
            tensor_table_digest: None,
        }
    }

    pub(crate) fn sample(n: u32) -> ModelSealRecord {
        let key = key();
        ModelSealRecord {
            backend: BackendKind::Sim,
            model_ref: "example/model".to_owned(),
            sealed_at_ns: 1_700_000_001_000_000_000,
            shards: (0..n)
                .map(|i| {
                    let record = shard_record(i, n);
                    ModelShardEntry::new(&record, &record.sign(&key).unwrap())
                })
                .collect(),
        }
    }

    #[test]
    fn model_seal_encode_decode_round_trip() {
        for n in [1, 3] {
            let record = sample(n);
            let bytes = record.encode().unwrap();
            let back = ModelSealRecord::decode(&bytes).unwrap();
            assert_eq!(back.encode().unwrap(), bytes);
            assert_eq!(back.shards.len(), n as usize);
            assert_eq!(back.model_ref, "example/model");
            assert_eq!(back.shards.last().unwrap().shard_index, n - 1);
            assert_eq!(
                back.shards[0].seal_tag.as_bytes(),
                record.shards[0].seal_tag.as_bytes()
            );
        }
    }

    #[test]
    fn model_seal_decode_is_strict() {
        let bytes = sample(3).encode().unwrap();
        for cut in 0..bytes.len() {
            assert!(ModelSealRecord::decode(&bytes[..cut]).is_err(), "cut {cut}");
        }
        let mut long = bytes.clone();
        long.push(0);
        let err = ModelSealRecord::decode(&long).unwrap_err().to_string();
        assert!(err.contains("trailing"), "{err}");

        let head = 4 + MODEL_SEAL_DOMAIN.len() + 2;
        let mut bad_backend = bytes.clone();
        bad_backend[head] = 9;
        assert!(ModelSealRecord::decode(&bad_backend).is_err());

        // total_shards: 0, over the bound, and one more than the entries present.
        let total_at = head + 1 + 4 + "example/model".len();
        for total in [0u32, MAX_MODEL_SHARDS + 1, 4, 2] {
            let mut changed = bytes.clone();
            changed[total_at..total_at + 4].copy_from_slice(&total.to_be_bytes());
            assert!(
                ModelSealRecord::decode(&changed).is_err(),
                "total {total} accepted"
            );
        }
        // Entries out of index order (entry 0 claiming index 1).
        let first_entry = total_at + 4 + 8;
        let mut swapped = bytes.clone();
        swapped[first_entry..first_entry + 4].copy_from_slice(&1u32.to_be_bytes());
        let err = ModelSealRecord::decode(&swapped).unwrap_err().to_string();
        assert!(err.contains("index order"), "{err}");

        // A shard seal record is not a model seal record (domain tag).
        let shard = shard_record(0, 1).encode().unwrap();
        let err = ModelSealRecord::decode(&shard).unwrap_err().to_string();
        assert!(err.contains("wrong domain tag"), "{err}");
    }

    #[test]
    fn encode_refuses_empty_oversized_or_unordered_shard_lists() {
        let mut record = sample(2);
        record.shards.swap(0, 1);
        assert!(record.encode().is_err());
        record.shards.clear();
        assert!(record.encode().is_err());
        let mut big = sample(1);
        let entry = big.shards[0].clone();
        big.shards = (0..=MAX_MODEL_SHARDS)
            .map(|i| ModelShardEntry {
                shard_index: i,
                ..entry.clone()
            })
            .collect();
        assert!(big.encode().is_err());
        big.shards.pop();
        assert!(big.encode().is_ok());
    }

    #[test]
    fn a_shard_seal_tag_never_verifies_as_a_model_tag_and_back_ci_002() {
        let key = key();
        // The model of one shard, and that shard's own seal tag.
        let shard = shard_record(0, 1);
        let shard_tag = shard.sign(&key).unwrap();
        let model = ModelSealRecord {
            backend: BackendKind::Sim,
            model_ref: shard.model_ref.clone(),
            sealed_at_ns: shard.sealed_at_ns,
            shards: vec![ModelShardEntry::new(&shard, &shard_tag)],
        };
        let model_tag = model.sign(&key).unwrap();
        assert!(model.verify(&key, &model_tag).is_ok());
        assert!(matches!(
            model.verify(&key, &shard_tag),
            Err(VramError::ModelSealForgery { .. })
        ));
        assert!(matches!(
            shard.verify(&key, &model_tag),
            Err(VramError::SealForgery { .. })
        ));
        // Neither encoding can be read as the other.
        assert!(ModelSealRecord::decode(&shard.encode().unwrap()).is_err());
        assert!(SealRecord::decode(&model.encode().unwrap()).is_err());
    }

    #[test]
    fn the_model_tag_covers_every_byte_and_every_entry_ci_002() {
        let key = key();
        let record = sample(3);
        let tag = record.sign(&key).unwrap();
        let bytes = record.encode().unwrap();
        for i in 0..bytes.len() {
            let mut changed = bytes.clone();
            changed[i] ^= 0x01;
            assert!(key.verify(&changed, &tag).is_err(), "byte {i}");
        }
        let mut edited = record.clone();
        edited.shards[2].vram_bytes += 1;
        assert!(edited.verify(&key, &tag).is_err());
        let mut edited = record.clone();
        edited.shards[1].seal_tag = edited.shards[0].seal_tag;
        assert!(edited.verify(&key, &tag).is_err());
        let mut dropped = record;
        dropped.shards.pop();
        let err = dropped.verify(&key, &tag).unwrap_err();
        assert!(err.is_fatal());
        assert!(!err.to_string().contains(&tag.to_hex()), "{err}");
    }

    #[test]
    fn entry_difference_names_the_first_field_that_differs() {
        let key = key();
        let record = shard_record(1, 3);
        let tag = record.sign(&key).unwrap();
        let entry = ModelShardEntry::new(&record, &tag);
        assert_eq!(entry.difference(&record, &tag), None);
        let mut other = record.clone();
        other.digest = Digest::from_bytes([0xee; 32]);
        assert!(entry.difference(&other, &tag).unwrap().contains("digest"));
        let other_tag = shard_record(2, 3).sign(&key).unwrap();
        assert!(
            entry
                .difference(&record, &other_tag)
                .unwrap()
                .contains("seal tag")
        );
    }

    #[test]
    fn sealed_model_debug_shows_the_record_not_the_tag() {
        let key = key();
        let record = sample(1);
        let tag = record.sign(&key).unwrap();
        let model = SealedModel { record, tag };
        let shown = format!("{model:?}");
        assert!(
            shown.starts_with("SealedModel { record: ModelSealRecord {"),
            "{shown}"
        );
        assert!(!shown.contains(&tag.to_hex()), "{shown}");
    }
}
