//! The seal record: what a seal covers, its canonical encoding, and its HMAC (CI-001, CI-002).
//!
//! The encoding is the crate's one canonical encoding ([`crate::encoding`]: fixed-width big-endian
//! integers, `u32`-length-prefixed strings, a domain tag and a version first) — never re-serialised
//! JSON — so that the bytes under the HMAC have exactly one form and a tag made for one kind of record
//! can never pass as another. `docs/seal-record.md` specifies it, with a worked example that a test
//! recomputes.
//!
//! ```text
//! u32+n   domain                   "vram-residency/seal-record/v2"
//! u16     version                  2
//! u8      backend                  1 = cuda, 2 = sim
//! u32+n   shard_id                 1..=256 bytes of [A-Za-z0-9_-]
//! [32]    digest                   fs-verity SHA-256 file digest of the shard bytes
//! u64     vram_bytes
//! u32     gpu_device               device index
//! [16]    device_uuid
//! u64     sealed_at_ns             nanoseconds since the Unix epoch
//! u32+n   model_ref                0..=1024 bytes of UTF-8, no control character
//! u32     shard_index
//! u32     total_shards
//! u8      tensor table present     0 or 1
//! [32]    tensor table digest      zeros when absent
//! ```

use crate::backend::BackendKind;
use crate::digest::Digest;
use crate::encoding::{Decoder, Encoder};
use crate::error::{Result, VramError};
use crate::ids::ShardId;
use crate::keys::{SealKey, Tag};

/// Domain-separation tag at the start of every seal record.
pub const SEAL_DOMAIN: &str = "vram-residency/seal-record/v2";
/// Version of the encoding below.
pub const SEAL_VERSION: u16 = 2;
/// Longest `model_ref` accepted, in bytes.
pub const MAX_MODEL_REF_LEN: usize = 1024;

/// Everything a seal covers. Public data; the tag over its [`encode`](Self::encode)d form is the seal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealRecord {
    /// Shard identity.
    pub shard_id: ShardId,
    /// fs-verity digest of the shard's bytes, measured in device memory.
    pub digest: Digest,
    /// Size of the shard in bytes.
    pub vram_bytes: u64,
    /// Device index.
    pub gpu_device: u32,
    /// Device UUID (the driver's, or a fixed `sim` pattern).
    pub device_uuid: [u8; 16],
    /// When the seal was made, in nanoseconds since the Unix epoch.
    pub sealed_at_ns: u64,
    /// `cuda` or `sim`.
    pub backend: BackendKind,
    /// Caller's name for the model (may be empty).
    pub model_ref: String,
    /// Index of this shard in its model.
    pub shard_index: u32,
    /// Number of shards in the model.
    pub total_shards: u32,
    /// SHA-256 of the model's canonical tensor table, when the format is known.
    pub tensor_table_digest: Option<[u8; 32]>,
}

/// Checks a model reference (IV-005): at most 1024 bytes, no NUL or other control character.
///
/// # Errors
/// [`VramError::InvalidInput`] naming `model_ref`.
pub fn validate_model_ref(model_ref: &str) -> Result<()> {
    let refuse = |reason: &str| {
        Err(VramError::InvalidInput {
            field: "model_ref",
            reason: reason.to_owned(),
        })
    };
    if model_ref.len() > MAX_MODEL_REF_LEN {
        return refuse("longer than 1024 bytes");
    }
    if model_ref.chars().any(char::is_control) {
        return refuse("contains a NUL or another control character");
    }
    if model_ref.chars().any(crate::ids::is_bidi_control) {
        return refuse(
            "contains a Unicode direction control (U+202A..U+202E, U+2066..U+2069, U+200E, U+200F, U+061C), which can make it display as another name",
        );
    }
    Ok(())
}

/// Checks `shard_index < total_shards` and `total_shards >= 1`.
///
/// # Errors
/// [`VramError::InvalidInput`] naming `shard_index`.
pub fn validate_shard_position(shard_index: u32, total_shards: u32) -> Result<()> {
    if total_shards == 0 || shard_index >= total_shards {
        return Err(VramError::InvalidInput {
            field: "shard_index",
            reason: format!(
                "shard {shard_index} of {total_shards}: need total_shards >= 1 and shard_index < total_shards"
            ),
        });
    }
    Ok(())
}

impl SealRecord {
    /// The canonical encoding (see the module docs). Infallible for records that passed validation;
    /// an over-long string is refused.
    ///
    /// # Errors
    /// [`VramError::InvalidInput`] when `model_ref` is longer than [`MAX_MODEL_REF_LEN`].
    pub fn encode(&self) -> Result<Vec<u8>> {
        validate_model_ref(&self.model_ref)?;
        let mut e = Encoder::new(SEAL_DOMAIN, SEAL_VERSION);
        e.u8(self.backend.code());
        e.str(self.shard_id.as_str(), "shard_id")?;
        e.fixed(self.digest.as_bytes())
            .u64(self.vram_bytes)
            .u32(self.gpu_device)
            .fixed(&self.device_uuid)
            .u64(self.sealed_at_ns);
        e.str(&self.model_ref, "model_ref")?;
        e.u32(self.shard_index).u32(self.total_shards);
        match &self.tensor_table_digest {
            Some(table) => e.u8(1).fixed(table),
            None => e.u8(0).fixed(&[0u8; 32]),
        };
        Ok(e.finish())
    }

    /// Strictly decodes a canonical encoding: exact length, known version and backend, valid shard
    /// id and model reference, no trailing bytes. `decode(encode(r)) == r`.
    ///
    /// # Errors
    /// [`VramError::MalformedRecord`] naming the first problem.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let mut r = Decoder::new(bytes, "seal record", SEAL_DOMAIN, SEAL_VERSION)?;
        let backend =
            BackendKind::from_code(r.u8()?).ok_or_else(|| malformed("unknown backend code"))?;
        let shard_id = ShardId::new(r.str()?).map_err(|e| malformed(&e.to_string()))?;
        let digest = Digest::from_bytes(r.array()?);
        let vram_bytes = r.u64()?;
        let gpu_device = r.u32()?;
        let device_uuid = r.array()?;
        let sealed_at_ns = r.u64()?;
        let model_ref = r.str()?.to_owned();
        validate_model_ref(&model_ref).map_err(|e| malformed(&e.to_string()))?;
        let shard_index = r.u32()?;
        let total_shards = r.u32()?;
        let flag = r.u8()?;
        let table: [u8; 32] = r.array()?;
        let tensor_table_digest = match flag {
            0 if table == [0u8; 32] => None,
            1 => Some(table),
            _ => return Err(malformed("bad tensor-table flag or non-zero absent digest")),
        };
        r.finish()?;
        Ok(Self {
            shard_id,
            digest,
            vram_bytes,
            gpu_device,
            device_uuid,
            sealed_at_ns,
            backend,
            model_ref,
            shard_index,
            total_shards,
            tensor_table_digest,
        })
    }

    /// Signs the record: HMAC-SHA256 of the canonical encoding under the seal key.
    ///
    /// # Errors
    /// As [`encode`](Self::encode).
    pub(crate) fn sign(&self, key: &SealKey) -> Result<Tag> {
        Ok(key.sign(&self.encode()?))
    }

    /// Verifies `tag` in constant time (CI-003). Any change to any field or to any bit of the tag
    /// fails, as [`VramError::SealForgery`]; the error never contains the expected tag.
    ///
    /// # Errors
    /// [`VramError::SealForgery`].
    pub(crate) fn verify(&self, key: &SealKey, tag: &Tag) -> Result<()> {
        let forgery = || VramError::SealForgery {
            shard_id: self.shard_id.clone(),
        };
        let encoded = self.encode().map_err(|_| forgery())?;
        key.verify(&encoded, tag).map_err(|_| forgery())
    }
}

fn malformed(reason: &str) -> VramError {
    VramError::MalformedRecord {
        what: "seal record",
        reason: reason.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::WorkerToken;

    pub(crate) fn sample() -> SealRecord {
        SealRecord {
            shard_id: ShardId::new("shard-a").unwrap(),
            digest: Digest::from_bytes([7; 32]),
            vram_bytes: 1 << 20,
            gpu_device: 0,
            device_uuid: *b"SIM-GPU-00000000",
            sealed_at_ns: 1_700_000_000_123_456_789,
            backend: BackendKind::Sim,
            model_ref: "llama-3-8b".to_owned(),
            shard_index: 0,
            total_shards: 1,
            tensor_table_digest: None,
        }
    }

    #[test]
    fn model_refs_with_control_or_direction_characters_are_refused_iv_005() {
        assert!(validate_model_ref("meta/llama-3-8b Q4").is_ok());
        assert!(validate_model_ref("modèle/ü").is_ok());
        for bad in ["a\u{202E}b", "a\u{2066}b", "a\u{200F}", "a\nb", "a\0b"] {
            let err = validate_model_ref(bad).unwrap_err().to_string();
            assert!(err.contains("model_ref"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn encode_decode_round_trip() {
        let mut r = sample();
        assert_eq!(SealRecord::decode(&r.encode().unwrap()).unwrap(), r);
        r.tensor_table_digest = Some([9; 32]);
        assert_eq!(SealRecord::decode(&r.encode().unwrap()).unwrap(), r);
    }

    #[test]
    fn decode_rejects_truncation_trailing_bytes_and_bad_codes() {
        let bytes = sample().encode().unwrap();
        for cut in 0..bytes.len() {
            assert!(SealRecord::decode(&bytes[..cut]).is_err(), "cut {cut}");
        }
        let mut long = bytes.clone();
        long.push(0);
        assert!(SealRecord::decode(&long).is_err());
        let mut bad_backend = bytes.clone();
        bad_backend[4 + SEAL_DOMAIN.len() + 2] = 9;
        assert!(SealRecord::decode(&bad_backend).is_err());
    }

    #[test]
    fn tag_covers_every_byte_of_the_encoding_ci_002() {
        let key = WorkerToken::from_bytes(vec![b'k'; 32])
            .unwrap()
            .derive_keys()
            .seal;
        let bytes = sample().encode().unwrap();
        let tag = key.sign(&bytes);
        for i in 0..bytes.len() {
            let mut changed = bytes.clone();
            changed[i] ^= 0x01;
            assert!(key.verify(&changed, &tag).is_err(), "byte {i}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(10_000))]
    #[test]
    fn any_change_to_any_record_field_breaks_the_tag(field in 0usize..11, pick in proptest::prelude::any::<u64>()) {
        let key = WorkerToken::from_bytes(vec![b'k'; 32]).unwrap().derive_keys().seal;
        let original = SealRecord {
            shard_id: ShardId::new("s-1").unwrap(),
            digest: Digest::from_bytes([1; 32]),
            vram_bytes: 1,
            gpu_device: 0,
            device_uuid: [3; 16],
            sealed_at_ns: 12345,
            backend: BackendKind::Cuda,
            model_ref: "m".to_owned(),
            shard_index: 0,
            total_shards: 1,
            tensor_table_digest: None,
        };
        let tag = original.sign(&key).unwrap();
        let mut r = original.clone();
        match field {
            0 => r.shard_id = ShardId::new(&format!("s-{}", 2 + pick % 1000)).unwrap(),
            1 => r.digest = Digest::from_bytes([(2 + pick % 250) as u8; 32]),
            2 => r.vram_bytes = 2 + pick % 1000,
            3 => r.gpu_device = 1 + (pick as u32 % 1000),
            4 => r.device_uuid[(pick % 16) as usize] ^= 1 << (pick % 8),
            5 => r.sealed_at_ns ^= 1 << (pick % 64),
            6 => r.backend = BackendKind::Sim,
            7 => r.model_ref = format!("m{pick}"),
            8 => r.shard_index = 1 + (pick as u32 % 1000),
            9 => r.total_shards = 2 + (pick as u32 % 1000),
            _ => r.tensor_table_digest = Some([(pick % 255) as u8; 32]),
        }
        proptest::prop_assert_ne!(&r, &original);
        let forged = matches!(r.verify(&key, &tag), Err(VramError::SealForgery { .. }));
        proptest::prop_assert!(forged, "field {} change kept the tag valid", field);
    }

    }
}
