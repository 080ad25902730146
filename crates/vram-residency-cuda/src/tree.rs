//! The fs-verity digest of a device buffer: every data byte hashed on the GPU.
//!
//! ```text
//! shard (VRAM) --kernel--> data-block hashes (scratch, per window)
//!              --kernel--> level-1 hashes (one per 512 KiB; copied back: len / 16384 bytes)
//! host: the levels above level 1 (rayon; len / 2^19 bytes of hashes, at most a few MiB of work)
//!       and the SHA-256 of the 256-byte fs-verity descriptor -> digest
//! ```
//!
//! The shard is processed in windows (a multiple of 512 KiB each) alternating between two streams,
//! so one window's level-1 pass and the next window's data pass overlap and the GPU never drains
//! between them. The levels above level 1 are hashed on the host from the level-1 array, which is
//! copied back anyway (for localising damage): on the GPU each of those levels costs about 100 µs
//! whatever its size (one thread hashes one 4 KiB block serially; measured on the H200), on the
//! host a few tens of µs for a 1 GiB shard. Scratch VRAM: two window-sized hash buffers
//! (`2 × window / 128`, at most `len / 256 + 8 KiB` for shards over 2 MiB) and the level-1 array
//! (`len / 16384`): together well under `len / 128`, plus a small constant. It lives in one
//! allocation with two streams (a [`Workspace`]), kept per device for reuse by
//! [`crate::hasher::Hasher`], so a verification allocates and frees nothing. A confined lane
//! ([`crate::lane`]) runs the same passes on one stream ([`measure_on_lane`]).

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaStream};
use vram_residency::digest::{HASH_SIZE, LEVEL1_SPAN, TreeDigest};

use crate::error::{CudaError, Result};
use crate::kernels::{HashKernels, launch_hash_blocks};
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

/// Where each scratch area lies in a workspace's one device allocation (offsets 256-aligned).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Layout {
    scratch: [u64; 2],
    level1: u64,
    total: u64,
}

impl Layout {
    fn for_plan(plan: &WindowPlan, level1_count: u64) -> Self {
        let aligned = |n: u64| n.max(1).next_multiple_of(256);
        let scratch = aligned(plan.scratch_bytes());
        let level1_bytes = aligned(level1_count.saturating_mul(HASH));
        let level1 = scratch.saturating_mul(2);
        Self {
            scratch: [0, scratch],
            level1,
            total: level1.saturating_add(level1_bytes),
        }
    }
}

/// Two streams and one scratch allocation, kept per device for reuse by
/// [`crate::hasher::Hasher`]: a verification then allocates, frees and creates nothing (allocation
/// and free cost time, and a free synchronises the device).
pub(crate) struct Workspace {
    main: Arc<CudaStream>,
    second: Arc<CudaStream>,
    arena: VramBuffer,
}

impl Workspace {
    /// A new workspace with `bytes` of scratch on `ctx`.
    pub(crate) fn new(ctx: &Arc<CudaContext>, bytes: u64) -> Result<Self> {
        let stream = || {
            ctx.new_stream()
                .map_err(CudaError::driver("cuStreamCreate"))
        };
        Ok(Self {
            main: stream()?,
            second: stream()?,
            arena: VramBuffer::alloc(ctx, bytes)?,
        })
    }

    /// Bytes of scratch.
    pub(crate) const fn bytes(&self) -> u64 {
        self.arena.len()
    }

    /// Copies scratch bytes to the host on the main stream, after what is queued there (not on
    /// the legacy default stream: see [`VramBuffer::read_on`]).
    fn read(&self, offset: u64, dst: &mut [u8]) -> Result<()> {
        self.main
            .context()
            .bind_to_thread()
            .map_err(CudaError::driver("cuCtxSetCurrent"))?;
        // SAFETY: `main` is this workspace's live stream, of the context made current above.
        unsafe { self.arena.read_on(self.main.cu_stream(), offset, dst) }
    }
}

/// Scratch bytes a workspace needs to measure a shard of `len` bytes.
pub(crate) fn workspace_bytes(len: u64) -> u64 {
    Layout::for_plan(&WindowPlan::for_len(len), len.div_ceil(SPAN)).total
}

/// A place to queue the kernel other than a workspace's two streams: a confined lane
/// ([`crate::lane::Lane`]), one stream, possibly a capped grid.
pub(crate) trait Launcher {
    /// Queues `fsverity_hash_blocks(data, data_len, out)` on the lane.
    ///
    /// # Safety
    /// As [`launch_hash_blocks`]; the caller synchronises the lane before reading `out`.
    unsafe fn hash_blocks(&self, data: u64, data_len: u64, out: u64) -> Result<()>;

    /// Waits for everything queued on the lane.
    fn sync(&self) -> Result<()>;

    /// Copies `dst.len()` bytes of `arena` at `offset` to the host on the lane's stream, after
    /// what is queued there, and waits for it.
    fn read(&self, arena: &VramBuffer, offset: u64, dst: &mut [u8]) -> Result<()>;
}

/// Measures `buffer` on a confined lane: the same windows, passes and result as [`measure`], one
/// stream, `arena` (a workspace's scratch) for the block and level-1 hashes.
pub(crate) fn measure_on_lane(
    lane: &dyn Launcher,
    workspace: &Workspace,
    buffer: &VramBuffer,
) -> Result<TreeDigest> {
    let len = buffer.len();
    let plan = WindowPlan::for_len(len);
    let layout = Layout::for_plan(&plan, len.div_ceil(SPAN));
    let arena = &workspace.arena;
    if arena.len() < layout.total {
        return Err(CudaError::Internal("lane workspace too small"));
    }
    let queued = (|| -> Result<()> {
        for index in 0..plan.count {
            let offset = index.saturating_mul(plan.window);
            let window_len = plan.window.min(len.saturating_sub(offset));
            let data = buffer.checked_range(offset, window_len)?;
            let block_hashes = window_len.div_ceil(BLOCK).saturating_mul(HASH);
            if len.div_ceil(BLOCK) <= 1 {
                let out = arena.checked_range(layout.level1, HASH)?;
                // SAFETY: `data` holds `len` bytes and `out` room for the one 32-byte hash; the
                // lane is synchronised below before the hash is read.
                unsafe { lane.hash_blocks(data, window_len, out) }?;
                break;
            }
            let scratch = arena.checked_range(layout.scratch[0], block_hashes)?;
            let out = arena.checked_range(
                layout
                    .level1
                    .saturating_add((offset / SPAN).saturating_mul(HASH)),
                block_hashes.div_ceil(BLOCK).saturating_mul(HASH),
            )?;
            // SAFETY: as in `queue_windows`; one stream, so the next window's data pass is
            // ordered after this window's level-1 pass and the one scratch area is reused safely.
            unsafe {
                lane.hash_blocks(data, window_len, scratch)?;
                lane.hash_blocks(scratch, block_hashes, out)?;
            }
        }
        Ok(())
    })();
    let synced = lane.sync();
    queued?;
    synced?;
    let level1 = read_level1(
        &|offset, dst| lane.read(arena, offset, dst),
        layout.level1,
        len.div_ceil(SPAN),
    )?;
    TreeDigest::from_level1(level1, len).map_err(|_| CudaError::Internal("level-1 count"))
}

/// Measures the fs-verity digest of `buffer` with `kernels` on `workspace` (which must have
/// [`workspace_bytes`] of scratch). Returns whether the workspace may be reused (its streams are
/// idle) with the result.
///
/// # Errors
/// [`CudaError::Driver`] on a failed launch or copy.
pub(crate) fn measure(
    kernels: &HashKernels,
    workspace: &Workspace,
    buffer: &VramBuffer,
) -> (bool, Result<TreeDigest>) {
    let len = buffer.len();
    let plan = WindowPlan::for_len(len);
    let level1_count = len.div_ceil(SPAN);
    let layout = Layout::for_plan(&plan, level1_count);
    if workspace.arena.len() < layout.total {
        return (true, Err(CudaError::Internal("workspace too small")));
    }
    let measured = measure_in(kernels, buffer, &plan, &layout, workspace);
    // Whatever happened, nothing may still run on the workspace when it is reused or freed.
    let synced = sync(&workspace.second).and(sync(&workspace.main));
    let reusable = synced.is_ok();
    (reusable, finish(measured, synced, len))
}

fn finish(
    measured: Result<Vec<[u8; HASH_SIZE]>>,
    synced: Result<()>,
    len: u64,
) -> Result<TreeDigest> {
    let level1 = measured?;
    synced?;
    // The levels above level 1, on the host (see the module docs).
    TreeDigest::from_level1(level1, len).map_err(|_| CudaError::Internal("level-1 count"))
}

/// The GPU passes on `workspace`; returns the level-1 hashes (for one data block, that block's
/// hash, which is also the root).
fn measure_in(
    function: &HashKernels,
    buffer: &VramBuffer,
    plan: &WindowPlan,
    layout: &Layout,
    workspace: &Workspace,
) -> Result<Vec<[u8; HASH_SIZE]>> {
    let len = buffer.len();
    let arena = &workspace.arena;
    if len.div_ceil(BLOCK) <= 1 {
        // fs-verity: the tree of a single block is empty and the root is that block's hash.
        let out = arena.checked_range(0, HASH)?;
        // SAFETY: `buffer` holds `len` bytes and `out` has room for the 32 = 32 * ceil(len / 4096)
        // output bytes (checked_range); both live on this context; the stream is synchronised
        // before the hash is read and before the workspace is reused or freed.
        unsafe { launch_hash_blocks(function, &workspace.main, buffer.device_ptr(), len, out) }?;
        return read_level1(&|offset, dst| workspace.read(offset, dst), 0, 1);
    }
    let streams: [&Arc<CudaStream>; 2] = [&workspace.main, &workspace.second];
    queue_windows(function, buffer, plan, layout, &streams, arena)?;
    sync(&workspace.second)?;
    read_level1(
        &|offset, dst| workspace.read(offset, dst),
        layout.level1,
        len.div_ceil(SPAN),
    )
}

/// Copies `count` level-1 hashes back from the scratch at `offset` with `read` (after the other
/// streams that wrote them were synchronised; `read` copies on, and waits for, its own).
fn read_level1(
    read: &dyn Fn(u64, &mut [u8]) -> Result<()>,
    offset: u64,
    count: u64,
) -> Result<Vec<[u8; HASH_SIZE]>> {
    let bytes =
        usize::try_from(count.saturating_mul(HASH)).map_err(|_| CudaError::OutOfBounds {
            what: "level-1 size",
        })?;
    let mut hashes = vec![0u8; bytes];
    read(offset, &mut hashes)?;
    Ok(hashes
        .chunks_exact(HASH_SIZE)
        .map(|h| {
            let mut hash = [0u8; HASH_SIZE];
            hash.copy_from_slice(h);
            hash
        })
        .collect())
}

/// Queues, per window, the data-block pass into the window's scratch and the level-1 pass from
/// there into its place in the level-1 area; windows alternate between the two streams.
fn queue_windows(
    function: &HashKernels,
    buffer: &VramBuffer,
    plan: &WindowPlan,
    layout: &Layout,
    streams: &[&Arc<CudaStream>; 2],
    arena: &VramBuffer,
) -> Result<()> {
    let len = buffer.len();
    for index in 0..plan.count {
        let offset = index.saturating_mul(plan.window);
        let window_len = plan.window.min(len.saturating_sub(offset));
        let lane = usize::from(index % 2 == 1);
        let (Some(stream), Some(&scratch)) = (streams.get(lane), layout.scratch.get(lane)) else {
            return Err(CudaError::Internal("stream lane"));
        };
        let data = buffer.checked_range(offset, window_len)?;
        let block_hashes = window_len.div_ceil(BLOCK).saturating_mul(HASH);
        let scratch_ptr = arena.checked_range(scratch, block_hashes)?;
        let out = arena.checked_range(
            layout
                .level1
                .saturating_add((offset / SPAN).saturating_mul(HASH)),
            block_hashes.div_ceil(BLOCK).saturating_mul(HASH),
        )?;
        // SAFETY: `data..+window_len` lies in `buffer`, `scratch_ptr..+block_hashes` in this lane's
        // scratch area and `out..` in the level-1 area (all checked above; the areas do not
        // overlap, see Layout); the lane's previous window used the same scratch on the same
        // stream, so stream order keeps it from being overwritten early; the caller synchronises
        // both streams before reading the results or reusing the workspace.
        unsafe {
            launch_hash_blocks(function, stream, data, window_len, scratch_ptr)?;
            launch_hash_blocks(function, stream, scratch_ptr, block_hashes, out)?;
        }
    }
    Ok(())
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
                let layout = Layout::for_plan(&plan, len.div_ceil(SPAN));
                assert!(layout.total <= len / 128 + 64 * 1024, "{len}: {layout:?}");
                // The areas are in order and do not overlap.
                assert!(layout.scratch[1] >= plan.scratch_bytes());
                assert!(layout.level1 >= layout.scratch[1] + plan.scratch_bytes());
                assert!(layout.total >= layout.level1 + len.div_ceil(SPAN) * HASH);
            }
        }
    }
}
