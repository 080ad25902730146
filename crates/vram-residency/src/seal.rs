//! The seal record: what a seal covers, its canonical encoding, and its HMAC (CI-001, CI-002).
//!
//! The encoding is written by hand, field by field, fixed-width or length-prefixed, big-endian — never
//! re-serialised JSON — so that the bytes under the HMAC have exactly one form. It starts with a domain
//! tag and a version so that a tag made for one kind of record can never pass as another.
//! `docs/seal-record.md` specifies it, with a worked example that a test recomputes.
//!
//! ```text
//! u8      domain length (29)       "vram-residency/seal-record/v1"
//! u16     version                  1
//! u8      backend                  1 = cuda, 2 = sim
//! u16+n   shard_id                 1..=256 bytes of [A-Za-z0-9_-]
//! [32]    digest                   fs-verity SHA-256 file digest of the shard bytes
//! u64     vram_bytes
//! u32     gpu_device               device index
//! [16]    device_uuid
//! u64     sealed_at_ns             nanoseconds since the Unix epoch
//! u16+n   model_ref                0..=1024 bytes of UTF-8, no NUL
//! u32     shard_index
//! u32     total_shards
//! u8      tensor table present     0 or 1
//! [32]    tensor table digest      zeros when absent
//! ```

use crate::backend::BackendKind;
use crate::digest::Digest;
use crate::error::{Result, VramError};
use crate::keys::{SealKey, Tag};
use crate::shard::ShardId;

/// Domain-separation tag at the start of every seal record.
pub const SEAL_DOMAIN: &[u8] = b"vram-residency/seal-record/v1";
#[expect(clippy::cast_possible_truncation, reason = "a 29-byte constant")]
const SEAL_DOMAIN_LEN: u8 = SEAL_DOMAIN.len() as u8;
/// Version of the encoding below.
pub const SEAL_VERSION: u16 = 1;
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
        let mut out = Vec::with_capacity(256);
        out.push(SEAL_DOMAIN_LEN);
        out.extend_from_slice(SEAL_DOMAIN);
        out.extend_from_slice(&SEAL_VERSION.to_be_bytes());
        out.push(self.backend.code());
        put_str(&mut out, self.shard_id.as_str(), "shard_id")?;
        out.extend_from_slice(self.digest.as_bytes());
        out.extend_from_slice(&self.vram_bytes.to_be_bytes());
        out.extend_from_slice(&self.gpu_device.to_be_bytes());
        out.extend_from_slice(&self.device_uuid);
        out.extend_from_slice(&self.sealed_at_ns.to_be_bytes());
        validate_model_ref(&self.model_ref)?;
        put_str(&mut out, &self.model_ref, "model_ref")?;
        out.extend_from_slice(&self.shard_index.to_be_bytes());
        out.extend_from_slice(&self.total_shards.to_be_bytes());
        match &self.tensor_table_digest {
            Some(table) => {
                out.push(1);
                out.extend_from_slice(table);
            }
            None => {
                out.push(0);
                out.extend_from_slice(&[0u8; 32]);
            }
        }
        Ok(out)
    }

    /// Strictly decodes a canonical encoding: exact length, known version and backend, valid shard
    /// id and model reference, no trailing bytes. `decode(encode(r)) == r`.
    ///
    /// # Errors
    /// [`VramError::MalformedRecord`] naming the first problem.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader { bytes, at: 0 };
        let domain_len = r.u8()?;
        if usize::from(domain_len) != SEAL_DOMAIN.len() || r.take(SEAL_DOMAIN.len())? != SEAL_DOMAIN
        {
            return Err(malformed(
                "wrong domain tag: not a vram-residency seal record",
            ));
        }
        let version = r.u16()?;
        if version != SEAL_VERSION {
            return Err(malformed(&format!("unsupported version {version}")));
        }
        let backend =
            BackendKind::from_code(r.u8()?).ok_or_else(|| malformed("unknown backend code"))?;
        let shard_id = ShardId::new(&r.string()?).map_err(|e| malformed(&e.to_string()))?;
        let digest = Digest::from_bytes(r.array()?);
        let vram_bytes = r.u64()?;
        let gpu_device = r.u32()?;
        let device_uuid = r.array()?;
        let sealed_at_ns = r.u64()?;
        let model_ref = r.string()?;
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
        if r.at != bytes.len() {
            return Err(malformed("trailing bytes after the record"));
        }
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
    pub fn sign(&self, key: &SealKey) -> Result<Tag> {
        Ok(key.sign(&self.encode()?))
    }

    /// Verifies `tag` in constant time (CI-003). Any change to any field or to any bit of the tag
    /// fails, as [`VramError::SealForgery`]; the error never contains the expected tag.
    ///
    /// # Errors
    /// [`VramError::SealForgery`].
    pub fn verify(&self, key: &SealKey, tag: &Tag) -> Result<()> {
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

/// Appends a `u16` length and the bytes of `value` (the string encoding of every canonical record).
pub(crate) fn put_str(out: &mut Vec<u8>, value: &str, field: &'static str) -> Result<()> {
    let len = u16::try_from(value.len()).map_err(|_| VramError::InvalidInput {
        field,
        reason: "longer than 65535 bytes".to_owned(),
    })?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(value.as_bytes());
    Ok(())
}

/// Bounds-checked big-endian reader over a byte slice.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .at
            .checked_add(n)
            .ok_or_else(|| malformed("length overflow"))?;
        let slice = self
            .bytes
            .get(self.at..end)
            .ok_or_else(|| malformed("truncated"))?;
        self.at = end;
        Ok(slice)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(u8::from_be_bytes(self.array()?))
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_be_bytes(self.array()?))
    }
    fn string(&mut self) -> Result<String> {
        let len = usize::from(self.u16()?);
        let raw = self.take(len)?;
        String::from_utf8(raw.to_vec()).map_err(|_| malformed("string is not UTF-8"))
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
        bad_backend[1 + SEAL_DOMAIN.len() + 2] = 9;
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
}
