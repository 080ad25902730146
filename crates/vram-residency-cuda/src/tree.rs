//! The fs-verity digest of a device buffer, every tree level computed on the GPU.
//!
//! ```text
//! shard (VRAM) --kernel--> data-block hashes (scratch, per window)
//!              --kernel--> level-1 hashes (one per 512 KiB; copied back for localisation)
//!              --kernel--> ... --> root hash (32 bytes back to the host)
//! host: SHA-256 of the 256-byte fs-verity descriptor -> digest
//! ```
//!
//! The shard is processed in windows (a multiple of 512 KiB each) alternating between two streams,
//! so one window's level-1 pass and the next window's data pass overlap and the GPU never drains
//! between them. Scratch VRAM: two window-sized hash buffers (`2 × window / 128`, at most
//! `len / 256 + 8 KiB` for shards over 2 MiB), the level-1 array (`len / 16384`) and the upper
//! levels (`len / 2 MiB`): together well under `len / 128`, plus a small constant.

use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaStream};
use vram_residency::digest::{HASH_SIZE, LEVEL1_SPAN, TreeDigest};

use crate::device::Device;
use crate::error::{CudaError, Result};
use crate::kernels::launch_hash_blocks;
use crate::vram::VramBuffer;

const BLOCK: u64 = 4096;
const SPAN: u64 = LEVEL1_SPAN as u64;
const HASH: u64 = HASH_SIZE as u64;
/// Largest window: 4 GiB of data per kernel launch.
const MAX_WINDOW: u64 = 4 << 30;
/// Shards up to this size are hashed in one window.
const SINGLE_WINDOW_MAX: u64 = 2 << 20;

/// How a shard of `len` bytes is cut into windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WindowPlan {
    /// Bytes per window (a multiple of 512 KiB, except when there is only one window).
    pub window: u64,
    /// Number of windows.
    pub count: u64,
}

impl WindowPlan {
    pub(crate) fn for_len(len: u64) -> Self {
        if len <= SINGLE_WINDOW_MAX {
            return Self {
                window: len.max(1),
                count: 1,
            };
        }
        let count = len.div_ceil(MAX_WINDOW).max(4);
        let window = len.div_ceil(count).next_multiple_of(SPAN);
        Self {
            window,
            count: len.div_ceil(window),
        }
    }

    /// Scratch bytes for one window's data-block hashes.
    pub(crate) fn scratch_bytes(&self) -> u64 {
        self.window.div_ceil(BLOCK).saturating_mul(HASH)
    }
}

/// Measures the fs-verity digest of `buffer` on `device`'s GPU.
///
/// # Errors
/// [`CudaError::Driver`] on a failed allocation, launch or copy; [`CudaError::Compile`] /
/// [`CudaError::NvrtcMissing`] the first time, if the kernel cannot be built.
pub fn measure(device: &Device, buffer: &VramBuffer) -> Result<TreeDigest> {
    let len = buffer.len();
    let function = device.kernel()?;
    device.bind()?;
    let ctx = &device.ctx;
    let main = ctx
        .new_stream()
        .map_err(CudaError::driver("cuStreamCreate"))?;
    let blocks = len.div_ceil(BLOCK);
    if blocks <= 1 {
        // fs-verity: the tree of a single block is empty and the root is that block's hash.
        let out = VramBuffer::alloc(ctx, HASH)?;
        // SAFETY: `buffer` holds `len` bytes and `out` 32 = 32 * ceil(len / 4096) bytes, both on
        // this context; the stream is synchronised (in `read`, after `synchronize`) before either
        // can be freed.
        unsafe {
            launch_hash_blocks(&function, &main, buffer.device_ptr(), len, out.device_ptr())
        }?;
        sync(&main)?;
        let mut root = [0u8; HASH_SIZE];
        out.read(0, &mut root)?;
        return TreeDigest::from_device_tree(root, vec![root], len)
            .map_err(|_| CudaError::Internal("level-1 count"));
    }

    let plan = WindowPlan::for_len(len);
    let level1_count = len.div_ceil(SPAN);
    let level1 = VramBuffer::alloc(ctx, level1_count.saturating_mul(HASH))?;
    let second = ctx
        .new_stream()
        .map_err(CudaError::driver("cuStreamCreate"))?;
    let streams: [&Arc<CudaStream>; 2] = [&main, &second];
    let scratch = [
        VramBuffer::alloc(ctx, plan.scratch_bytes())?,
        VramBuffer::alloc(ctx, plan.scratch_bytes())?,
    ];
    let queued = queue_windows(&function, buffer, &plan, &streams, &scratch, &level1);
    // Whatever happened, nothing may still run on these buffers when they are freed.
    let synced = sync(&second).and(sync(&main));
    queued?;
    synced?;

    let root = upper_levels(device, &function, &main, &level1, level1_count)?;
    let mut hashes = vec![
        0u8;
        usize::try_from(level1_count.saturating_mul(HASH)).map_err(|_| {
            CudaError::OutOfBounds {
                what: "level-1 size",
            }
        })?
    ];
    level1.read(0, &mut hashes)?;
    let level1_hashes: Vec<[u8; HASH_SIZE]> = hashes
        .chunks_exact(HASH_SIZE)
        .map(|h| {
            let mut hash = [0u8; HASH_SIZE];
            hash.copy_from_slice(h);
            hash
        })
        .collect();
    TreeDigest::from_device_tree(root, level1_hashes, len)
        .map_err(|_| CudaError::Internal("level-1 count"))
}

/// Queues, per window, the data-block pass into the window's scratch and the level-1 pass from
/// there into its place in `level1`; windows alternate between the two streams.
fn queue_windows(
    function: &CudaFunction,
    buffer: &VramBuffer,
    plan: &WindowPlan,
    streams: &[&Arc<CudaStream>; 2],
    scratch: &[VramBuffer; 2],
    level1: &VramBuffer,
) -> Result<()> {
    let len = buffer.len();
    for index in 0..plan.count {
        let offset = index.saturating_mul(plan.window);
        let window_len = plan.window.min(len.saturating_sub(offset));
        let lane = usize::from(index % 2 == 1);
        let (Some(stream), Some(hashes)) = (streams.get(lane), scratch.get(lane)) else {
            return Err(CudaError::Internal("stream lane"));
        };
        let data = buffer.checked_range(offset, window_len)?;
        let block_hashes = window_len.div_ceil(BLOCK).saturating_mul(HASH);
        let scratch_ptr = hashes.checked_range(0, block_hashes)?;
        let out = level1.checked_range(
            (offset / SPAN).saturating_mul(HASH),
            block_hashes.div_ceil(BLOCK).saturating_mul(HASH),
        )?;
        // SAFETY: `data..+window_len` lies in `buffer`, `scratch_ptr..+block_hashes` in this lane's
        // scratch, `out..` in `level1` (all checked above); the lane's previous window used the
        // same scratch on the same stream, so stream order keeps it from being overwritten early;
        // the caller synchronises both streams before any of these buffers is freed.
        unsafe {
            launch_hash_blocks(function, stream, data, window_len, scratch_ptr)?;
            launch_hash_blocks(function, stream, scratch_ptr, block_hashes, out)?;
        }
    }
    Ok(())
}

/// Hashes level 1 up to the root on the GPU; returns the root (32 bytes copied back).
fn upper_levels(
    device: &Device,
    function: &CudaFunction,
    stream: &Arc<CudaStream>,
    level1: &VramBuffer,
    level1_count: u64,
) -> Result<[u8; HASH_SIZE]> {
    let mut root = [0u8; HASH_SIZE];
    if level1_count == 1 {
        level1.read(0, &mut root)?;
        return Ok(root);
    }
    let ctx = &device.ctx;
    let next_bytes = level1_count.div_ceil(128).saturating_mul(HASH);
    let ping = VramBuffer::alloc(ctx, next_bytes)?;
    let pong = VramBuffer::alloc(ctx, next_bytes)?;
    let mut count = level1_count;
    let mut source = level1;
    let mut target = &ping;
    let queued = (|| -> Result<()> {
        while count > 1 {
            let in_bytes = count.saturating_mul(HASH);
            let out_count = count.div_ceil(128);
            let src = source.checked_range(0, in_bytes)?;
            let dst = target.checked_range(0, out_count.saturating_mul(HASH))?;
            // SAFETY: both ranges checked above; one stream orders the levels; it is synchronised
            // below before the buffers are read or freed.
            unsafe { launch_hash_blocks(function, stream, src, in_bytes, dst) }?;
            count = out_count;
            source = target;
            target = if std::ptr::eq(target, &ping) {
                &pong
            } else {
                &ping
            };
        }
        Ok(())
    })();
    let synced = sync(stream);
    queued?;
    synced?;
    source.read(0, &mut root)?;
    Ok(root)
}

fn sync(stream: &CudaStream) -> Result<()> {
    stream
        .synchronize()
        .map_err(CudaError::driver("cuStreamSynchronize"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_cover_the_shard_in_512k_multiples_and_scratch_stays_under_len_over_128() {
        for len in [
            1u64,
            4096,
            SINGLE_WINDOW_MAX,
            SINGLE_WINDOW_MAX + 1,
            3 << 20,
            (1 << 30) + 12345,
            16 << 30,
            (70 << 30) + 7,
        ] {
            let plan = WindowPlan::for_len(len);
            assert!(
                plan.window.saturating_mul(plan.count) >= len,
                "{len}: {plan:?}"
            );
            assert!(
                plan.window.saturating_mul(plan.count - 1) < len,
                "{len}: a window is empty: {plan:?}"
            );
            if plan.count > 1 {
                assert_eq!(plan.window % SPAN, 0, "{len}: {plan:?}");
                assert!(plan.window <= MAX_WINDOW, "{len}: {plan:?}");
                let level1 = len.div_ceil(SPAN) * HASH;
                let upper = 2 * level1.div_ceil(128 * HASH) * HASH;
                let scratch = 2 * plan.scratch_bytes() + level1 + upper;
                assert!(scratch <= len / 128 + 64 * 1024, "{len}: scratch {scratch}");
            }
        }
    }
}
