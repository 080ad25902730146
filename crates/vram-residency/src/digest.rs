//! The fs-verity file digest (Linux `Documentation/filesystems/fsverity.rst`), computed on the CPU.
//!
//! Parameters: SHA-256, 4096-byte blocks, no salt. Data blocks are hashed (the last one zero-padded);
//! the 32-byte hashes are packed 128 to a 4096-byte block (zero-padded) and hashed again, level by level,
//! until one block remains; its hash is the root hash (all zeros for an empty input). The file digest is
//! SHA-256 of the 256-byte `fsverity_descriptor` that carries the root hash and the data size. The result
//! is bit-identical to `fsverity digest FILE` (checked by the integration tests against the stock tool).
//!
//! The tree is computed in units of 128 data blocks (512 KiB): each unit yields one *level-1* hash,
//! independently of all others, so units are hashed in parallel on all cores (rayon). The level-1 hashes
//! are kept in the [`TreeDigest`] so that a failed verification can name the damaged 512 KiB ranges.
//! Memory use is bounded for streamed input: a few read buffers plus 32 bytes per 512 KiB of data.

use std::fmt;
use std::io::Read;

use rayon::prelude::*;
use sha2::{Digest as _, Sha256};

use crate::error::{Result, VramError};
use crate::ids::ByteRange;

/// fs-verity block size used here (`log_blocksize = 12`).
pub const BLOCK_SIZE: usize = 4096;
/// SHA-256 output size.
pub const HASH_SIZE: usize = 32;
/// Hashes per 4096-byte hash block.
pub const HASHES_PER_BLOCK: usize = BLOCK_SIZE / HASH_SIZE;
/// Bytes of data covered by one level-1 hash: 128 blocks of 4096 bytes = 512 KiB.
pub const LEVEL1_SPAN: usize = BLOCK_SIZE * HASHES_PER_BLOCK;
/// Size of the `fsverity_descriptor` that is hashed to give the file digest.
pub const DESCRIPTOR_SIZE: usize = 256;

/// Read granularity of [`digest_reader`]: a multiple of [`LEVEL1_SPAN`]. Two of these are in flight.
const STREAM_CHUNK: usize = 64 * LEVEL1_SPAN; // 32 MiB

/// A 32-byte SHA-256 hash value (a tree node, a level-1 hash, a root hash).
pub type Hash32 = [u8; HASH_SIZE];

pub use crate::ids::{Digest, InvalidDigest};

/// The outcome of hashing a byte source: the file digest plus what is needed to localise damage.
#[derive(Clone, PartialEq, Eq)]
pub struct TreeDigest {
    digest: Digest,
    root_hash: Hash32,
    data_size: u64,
    level1: Vec<Hash32>,
}

impl fmt::Debug for TreeDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TreeDigest")
            .field("digest", &self.digest)
            .field("data_size", &self.data_size)
            .field("level1_hashes", &self.level1.len())
            .finish()
    }
}

impl TreeDigest {
    /// Builds the tree above the level-1 hashes and the file digest.
    ///
    /// `level1[i]` must be the hash of the packed hash block of data blocks `128*i .. 128*i+127`
    /// (as computed by [`level1_hash`]); `data_size` is the number of data bytes. This is also how a
    /// device backend that computes the level-1 hashes itself turns them into a digest.
    ///
    /// # Errors
    /// [`VramError::MalformedRecord`] when the number of level-1 hashes does not fit `data_size`.
    pub fn from_level1(level1: Vec<Hash32>, data_size: u64) -> Result<Self> {
        check_level1_count(&level1, data_size)?;
        let root_hash = root_from_level(&level1);
        Ok(Self {
            digest: descriptor_digest(&root_hash, data_size),
            root_hash,
            data_size,
            level1,
        })
    }

    /// The fs-verity file digest.
    #[must_use]
    pub const fn digest(&self) -> Digest {
        self.digest
    }

    /// The Merkle tree's root hash (what the descriptor carries).
    #[must_use]
    pub const fn root_hash(&self) -> &Hash32 {
        &self.root_hash
    }

    /// Number of data bytes hashed.
    #[must_use]
    pub const fn data_size(&self) -> u64 {
        self.data_size
    }

    /// One hash per 512 KiB of data, in order.
    #[must_use]
    pub fn level1(&self) -> &[Hash32] {
        &self.level1
    }

    /// The 512 KiB-granular ranges where `other` (a fresh measurement) differs from `self` (the sealed
    /// one). Returns the whole extent when the sizes differ.
    #[must_use]
    pub fn damaged_ranges(&self, other: &Self) -> Vec<ByteRange> {
        if self.data_size != other.data_size || self.level1.len() != other.level1.len() {
            return vec![ByteRange {
                start: 0,
                end: self.data_size.max(other.data_size),
            }];
        }
        let span = LEVEL1_SPAN as u64;
        let mut ranges: Vec<ByteRange> = self
            .level1
            .iter()
            .zip(&other.level1)
            .zip(0u64..)
            .filter(|((a, b), _)| a != b)
            .map(|(_, index)| {
                let start = index.saturating_mul(span);
                ByteRange {
                    start,
                    end: start.saturating_add(span).min(self.data_size),
                }
            })
            .collect();
        if ranges.is_empty() && self.digest != other.digest {
            ranges.push(ByteRange {
                start: 0,
                end: self.data_size,
            });
        }
        ranges
    }
}

/// Refuses a level-1 list whose length does not fit `data_size`.
fn check_level1_count(level1: &[Hash32], data_size: u64) -> Result<()> {
    let expected = level1_count(data_size)?;
    if u64::try_from(level1.len()).ok() == Some(expected) {
        return Ok(());
    }
    Err(VramError::MalformedRecord {
        what: "level-1 hash list",
        reason: format!(
            "{} hashes given, {expected} expected for {data_size} bytes",
            level1.len()
        ),
    })
}

/// The file digest from the hashes of one level of the tree: `level` 1 (one hash per 512 KiB of
/// data, as [`TreeDigest::from_level1`] takes them) or a level above it, which holds
/// `ceil(n / 128)` hashes for the `n` of the level below and exists only where that level has two
/// or more. This is how a device backend that hashes the lower levels itself finishes a
/// verification without copying the level-1 hashes back (it needs them only to localise damage).
///
/// # Errors
/// [`VramError::MalformedRecord`] when `data_size` has no such level or the number of hashes does
/// not fit it.
pub fn digest_from_level(hashes: &[Hash32], level: u32, data_size: u64) -> Result<Digest> {
    let mut expected = level1_count(data_size)?;
    for _ in 1..level {
        if expected < 2 {
            return Err(VramError::MalformedRecord {
                what: "hash level",
                reason: format!("a tree of {data_size} bytes has no level {level}"),
            });
        }
        expected = expected.div_ceil(HASHES_PER_BLOCK as u64);
    }
    if level == 0 || u64::try_from(hashes.len()).ok() != Some(expected) {
        return Err(VramError::MalformedRecord {
            what: "hash level",
            reason: format!(
                "{} hashes given for level {level}, {expected} expected for {data_size} bytes",
                hashes.len()
            ),
        });
    }
    Ok(descriptor_digest(&root_from_level(hashes), data_size))
}

/// Number of level-1 hashes for `data_size` bytes: `ceil(data_size / 512 KiB)`.
///
/// # Errors
/// Never in practice; the signature keeps arithmetic checked.
pub fn level1_count(data_size: u64) -> Result<u64> {
    Ok(data_size.div_ceil(LEVEL1_SPAN as u64))
}

/// SHA-256 of one data block, zero-padded to [`BLOCK_SIZE`] (`block.len() <= BLOCK_SIZE`).
fn data_block_hash(block: &[u8]) -> Hash32 {
    let mut hasher = Sha256::new();
    hasher.update(block);
    let pad = BLOCK_SIZE.saturating_sub(block.len());
    if let Some(zeros) = ZERO_BLOCK.get(..pad).filter(|z| !z.is_empty()) {
        hasher.update(zeros);
    }
    hasher.finalize().into()
}

static ZERO_BLOCK: [u8; BLOCK_SIZE] = [0u8; BLOCK_SIZE];

/// SHA-256 of a hash block holding `hashes` (at most 128), zero-padded to 4096 bytes: packed hashes
/// are hashed exactly as a data block is, in place.
fn hash_block_of(hashes: &[Hash32]) -> Hash32 {
    data_block_hash(hashes.as_flattened())
}

/// The level-1 hash of one unit of at most 512 KiB of data (its last block zero-padded).
#[must_use]
pub fn level1_hash(unit: &[u8]) -> Hash32 {
    let block_hashes: Vec<Hash32> = unit.chunks(BLOCK_SIZE).map(data_block_hash).collect();
    hash_block_of(&block_hashes)
}

/// The level-1 hashes of `chunk`, which starts at a 512 KiB boundary of the input.
///
/// fs-verity's tree over a single data block is empty: the root hash is that block's hash. So when
/// `chunk` is the entire input and at most one block long, its one "level-1" hash is the data block's
/// hash, which then becomes the root. Otherwise each 512 KiB unit gives [`level1_hash`].
#[must_use]
pub fn level1_hashes(chunk: &[u8], is_entire_input: bool) -> Vec<Hash32> {
    if is_entire_input && chunk.len() <= BLOCK_SIZE {
        if chunk.is_empty() {
            return Vec::new();
        }
        return vec![data_block_hash(chunk)];
    }
    chunk.par_chunks(LEVEL1_SPAN).map(level1_hash).collect()
}

/// Hashes the levels above `level` (the level-1 hashes or any level above) until one hash remains.
/// All zeros for an empty list (empty file).
fn root_from_level(level: &[Hash32]) -> Hash32 {
    let mut above = match level {
        [] => return [0u8; HASH_SIZE],
        [root] => return *root,
        _ => hash_level(level),
    };
    loop {
        match above.as_slice() {
            [root] => return *root,
            level => above = hash_level(level),
        }
    }
}

/// The level above `level`: its hash blocks hashed in parallel, at least four blocks per task (the
/// 16 blocks of a 1 GiB shard's level 2 are not worth waking 16 threads for).
fn hash_level(level: &[Hash32]) -> Vec<Hash32> {
    level
        .par_chunks(HASHES_PER_BLOCK)
        .with_min_len(4)
        .map(hash_block_of)
        .collect()
}

/// SHA-256 of the fs-verity v1 descriptor for this root hash and size.
fn descriptor_digest(root_hash: &Hash32, data_size: u64) -> Digest {
    let mut descriptor = [0u8; DESCRIPTOR_SIZE];
    // version, hash_algorithm (1 = SHA-256), log_blocksize (12), salt_size (0); sig_size stays 0.
    descriptor[..4].copy_from_slice(&[1, 1, 12, 0]);
    descriptor[8..16].copy_from_slice(&data_size.to_le_bytes());
    // root_hash[64]: the 32-byte SHA-256 root, zero-padded; salt[32] and reserved[144] stay zero.
    descriptor[16..16 + HASH_SIZE].copy_from_slice(root_hash);
    Digest::from_bytes(Sha256::digest(descriptor).into())
}

/// Digest of an in-memory byte slice, in parallel on all cores.
///
/// # Errors
/// Only on size overflow (inputs over 16 EiB), which cannot happen for a real slice.
pub fn digest_bytes(data: &[u8]) -> Result<TreeDigest> {
    let level1 = level1_hashes(data, true);
    let size = u64::try_from(data.len()).map_err(|_| VramError::Overflow {
        context: "digest size",
    })?;
    TreeDigest::from_level1(level1, size)
}

/// Streams `reader` to its end and digests it with bounded memory (one 32 MiB buffer, each chunk
/// hashed on all cores). For files, [`digest_file`] is faster: it reads in parallel too.
/// `progress` receives the running byte count after each chunk.
///
/// # Errors
/// [`VramError::Io`] when a read fails (`name` is used in the message).
pub fn digest_reader<R: Read>(
    mut reader: R,
    name: &std::path::Path,
    progress: &mut dyn FnMut(u64),
) -> Result<TreeDigest> {
    let mut buffer = vec![0u8; STREAM_CHUNK];
    let mut level1: Vec<Hash32> = Vec::new();
    let mut total: u64 = 0;
    loop {
        let filled = read_full(&mut reader, &mut buffer).map_err(|source| VramError::Io {
            path: name.to_path_buf(),
            source,
        })?;
        let chunk = buffer.get(..filled).unwrap_or_default();
        // Every chunk but the last is full, so a short first chunk is the entire input.
        let is_entire_input = total == 0 && filled < STREAM_CHUNK;
        level1.extend(level1_hashes(chunk, is_entire_input));
        total = total.saturating_add(filled as u64);
        progress(total);
        if filled < STREAM_CHUNK {
            return TreeDigest::from_level1(level1, total);
        }
    }
}

/// Read granularity of [`digest_file`]: 4 MiB (8 level-1 units) per positioned read.
const FILE_CHUNK: usize = 8 * LEVEL1_SPAN;

/// Digests a file on all cores: each worker reads its own 4 MiB pieces with positioned reads
/// (`pread`) and hashes them, so reading and hashing run in parallel with no hand-off between
/// threads. Memory stays bounded (a 4 MiB buffer per worker plus 32 bytes per 512 KiB).
/// `progress` receives the running byte count (in completion order, so it only grows).
///
/// # Errors
/// [`VramError::Io`] when the file cannot be opened or read; [`VramError::SourceChanged`] when it
/// changes size while being read.
pub fn digest_file(path: &std::path::Path, progress: &(dyn Fn(u64) + Sync)) -> Result<TreeDigest> {
    use std::os::unix::fs::FileExt as _;
    use std::sync::atomic::{AtomicU64, Ordering};

    let io = |source| VramError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    let chunk = FILE_CHUNK as u64;
    let done = AtomicU64::new(0);
    let pieces: Vec<Result<Vec<Hash32>>> = (0..len.div_ceil(chunk))
        .into_par_iter()
        .map_init(
            || vec![0u8; FILE_CHUNK],
            |buffer, index| {
                let start = index.saturating_mul(chunk);
                let want = usize::try_from(len.saturating_sub(start).min(chunk)).unwrap_or(0);
                let piece = buffer.get_mut(..want).unwrap_or_default();
                file.read_exact_at(piece, start).map_err(|source| {
                    if source.kind() == std::io::ErrorKind::UnexpectedEof {
                        VramError::SourceChanged {
                            expected: len,
                            actual: start,
                        }
                    } else {
                        io(source)
                    }
                })?;
                let hashes = level1_hashes(piece, len <= BLOCK_SIZE as u64);
                progress(
                    done.fetch_add(want as u64, Ordering::Relaxed)
                        .saturating_add(want as u64),
                );
                Ok(hashes)
            },
        )
        .collect();
    let mut level1 = Vec::new();
    for piece in pieces {
        level1.extend(piece?);
    }
    let after = file.metadata().map_err(io)?.len();
    if after != len {
        return Err(VramError::SourceChanged {
            expected: len,
            actual: after,
        });
    }
    TreeDigest::from_level1(level1, len)
}

/// Fills `buffer` from `reader` unless EOF comes first; returns the number of bytes read.
///
/// # Errors
/// The reader's error (interrupted reads are retried).
pub fn read_full<R: Read + ?Sized>(reader: &mut R, buffer: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0usize;
    while let Some(rest) = buffer.get_mut(filled..) {
        if rest.is_empty() {
            break;
        }
        match reader.read(rest) {
            Ok(0) => break,
            Ok(n) => filled = filled.saturating_add(n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One level up, written out independently of `hash_level`: each run of up to 128 hashes
    /// packed into a zero-padded 4096-byte block and hashed.
    fn level_above(level: &[Hash32]) -> Vec<Hash32> {
        level
            .chunks(HASHES_PER_BLOCK)
            .map(|run| {
                let mut block = vec![0u8; BLOCK_SIZE];
                for (i, hash) in run.iter().enumerate() {
                    block[i * HASH_SIZE..(i + 1) * HASH_SIZE].copy_from_slice(hash);
                }
                Sha256::digest(&block).into()
            })
            .collect()
    }

    #[test]
    fn the_digest_from_any_level_equals_the_digest_from_level_1() {
        let span = LEVEL1_SPAN as u64;
        // Level-1 counts 1, 2, 128, 129, 16384 + 5 (three levels above level 1).
        for size in [
            4096,
            span + 1,
            128 * span,
            128 * span + 7,
            (16_384 + 5) * span - 3,
        ] {
            let count = level1_count(size).unwrap() as usize;
            let level1: Vec<Hash32> = (0..count)
                .map(|i| Sha256::digest((i as u64).to_le_bytes()).into())
                .collect();
            let want = TreeDigest::from_level1(level1.clone(), size)
                .unwrap()
                .digest();
            assert_eq!(digest_from_level(&level1, 1, size).unwrap(), want);
            let mut level = level1;
            let mut index = 1;
            while level.len() > 1 {
                level = level_above(&level);
                index += 1;
                assert_eq!(
                    digest_from_level(&level, index, size).unwrap(),
                    want,
                    "{size} bytes, level {index}"
                );
            }
            // The level above the root's does not exist; nor does level 0.
            assert!(digest_from_level(&level, index + 1, size).is_err());
            assert!(digest_from_level(&level, 0, size).is_err());
        }
        // A count that does not fit the size is refused.
        let two = [[1u8; HASH_SIZE], [2u8; HASH_SIZE]];
        assert!(digest_from_level(&two, 1, 4096).is_err());
        assert!(digest_from_level(&two[..1], 2, 129 * span).is_err());
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len as u64)
            .map(|i| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8)
            .collect()
    }

    /// A literal transcription of the fs-verity algorithm, level by level, to check the unit-based one.
    fn reference_root(data: &[u8]) -> Hash32 {
        if data.is_empty() {
            return [0; 32];
        }
        let mut level: Vec<Hash32> = data.chunks(BLOCK_SIZE).map(data_block_hash).collect();
        while level.len() > 1 {
            level = level.chunks(HASHES_PER_BLOCK).map(hash_block_of).collect();
        }
        level[0]
    }

    #[test]
    fn empty_input_has_zero_root_and_no_level1() {
        let tree = digest_bytes(&[]).unwrap();
        assert_eq!(tree.root_hash(), &[0u8; 32]);
        assert!(tree.level1().is_empty());
    }

    #[test]
    fn unit_tree_matches_level_by_level_reference_on_boundary_sizes() {
        for len in [
            1,
            4095,
            4096,
            4097,
            LEVEL1_SPAN - 1,
            LEVEL1_SPAN,
            LEVEL1_SPAN + 1,
            3 * LEVEL1_SPAN + 17,
        ] {
            let data = pattern(len);
            let tree = digest_bytes(&data).unwrap();
            assert_eq!(tree.root_hash(), &reference_root(&data), "len {len}");
            assert_eq!(tree.level1().len(), len.div_ceil(LEVEL1_SPAN));
            let mut streamed_size = 0;
            let streamed = digest_reader(&data[..], "mem".as_ref(), &mut |n| streamed_size = n);
            assert_eq!(streamed.unwrap(), tree, "len {len}");
        }
    }

    #[test]
    fn streamed_digest_equals_in_memory_digest() {
        let data = pattern(2 * STREAM_CHUNK + 12345);
        let mut seen = 0;
        let streamed = digest_reader(&data[..], "mem".as_ref(), &mut |n| seen = n).unwrap();
        assert_eq!(streamed, digest_bytes(&data).unwrap());
        assert_eq!(seen, data.len() as u64);
    }

    #[test]
    fn parallel_file_digest_equals_in_memory_digest_across_chunk_boundaries() {
        let dir = std::env::temp_dir().join(format!("vr-digest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for len in [
            0,
            1,
            4096,
            FILE_CHUNK - 1,
            FILE_CHUNK,
            FILE_CHUNK + 1,
            3 * FILE_CHUNK + 7,
        ] {
            let data = pattern(len);
            let path = dir.join(format!("f{len}"));
            std::fs::write(&path, &data).unwrap();
            let last = std::sync::atomic::AtomicU64::new(0);
            let tree = digest_file(&path, &|n| {
                last.fetch_max(n, std::sync::atomic::Ordering::Relaxed);
            })
            .unwrap();
            assert_eq!(tree, digest_bytes(&data).unwrap(), "len {len}");
            assert_eq!(last.into_inner(), len as u64);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn digest_parse_rejects_malformed_strings_iv_004_iv_005() {
        let good = format!("sha256:{}", "ab".repeat(32));
        assert!(good.parse::<Digest>().is_ok());
        assert!(
            good.to_uppercase()
                .replace("SHA256", "sha256")
                .parse::<Digest>()
                .is_ok()
        );
        for bad in [
            "ab".repeat(32),
            format!("sha512:{}", "ab".repeat(32)),
            format!("sha256:{}", "ab".repeat(31)),
            format!("sha256:{}", "ab".repeat(33)),
            format!("sha256:{}zz", "ab".repeat(31)),
            format!("sha256:{}\0", "ab".repeat(32)),
            String::new(),
        ] {
            assert!(
                matches!(bad.parse::<Digest>(), Err(crate::ids::InvalidDigest { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn damaged_ranges_name_the_512k_unit_that_changed() {
        let data = pattern(3 * LEVEL1_SPAN + 100);
        let sealed = digest_bytes(&data).unwrap();
        let mut bad = data.clone();
        bad[LEVEL1_SPAN + 5] ^= 1;
        bad[3 * LEVEL1_SPAN + 99] ^= 0x80;
        let now = digest_bytes(&bad).unwrap();
        assert_eq!(
            sealed.damaged_ranges(&now),
            vec![
                ByteRange {
                    start: LEVEL1_SPAN as u64,
                    end: 2 * LEVEL1_SPAN as u64
                },
                ByteRange {
                    start: 3 * LEVEL1_SPAN as u64,
                    end: 3 * LEVEL1_SPAN as u64 + 100
                },
            ]
        );
    }

    #[test]
    fn from_level1_rejects_a_count_that_does_not_fit_the_size() {
        assert!(TreeDigest::from_level1(vec![[0; 32]; 2], 10).is_err());
    }

    #[test]
    fn the_tree_above_level_1_gives_the_same_digest_as_the_host_tree() {
        // How the CUDA backend builds its digest: level-1 hashes from the GPU, the rest here.
        for len in [
            1usize,
            4096,
            4097,
            512 * 1024 + 1,
            3 * 512 * 1024,
            130 * 512 * 1024 + 5,
        ] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let host = digest_bytes(&data).unwrap();
            let from_level1 =
                TreeDigest::from_level1(host.level1().to_vec(), host.data_size()).unwrap();
            assert_eq!(from_level1, host, "len {len}");
        }
    }
}
