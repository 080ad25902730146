//! The fs-verity digest of a device buffer: every data byte hashed on the GPU.
//!
//! ```text
//! shard (VRAM) --kernel--> data-block hashes (scratch, per window)
//!              --kernel--> level-1 hashes (one per 512 KiB; copied back: len / 16384 bytes)
//! host: the levels above level 1 (rayon; len / 2^19 bytes of hashes, at most a few MiB of work)
//!       and the SHA-256 of the 256-byte fs-verity descriptor -> digest
//! ```
//!
//! A shard of up to 4 GiB is one window: one data pass, then one level-1 pass. A larger shard is
//! cut into windows of 2 to 4 GiB (a multiple of 512 KiB each) alternating between two streams, so
//! one window's level-1 pass and the next window's data pass overlap and the GPU never drains
//! between them. Smaller windows do not pay: a level-1 pass takes about 100 µs whatever its size
//! (each thread hashes one 4 KiB block serially), and with windows of 256 MiB the next data pass on
//! its stream waited for it (1 GiB on the H200, 2026-12-03, a cupy emulation of these passes: 735
//! GB/s in four windows, 777 in one). The levels above level 1 are hashed on the host from the
//! level-1 array, which is copied back anyway (for localising damage) into a page-locked buffer:
//! on the GPU each of those levels would cost another 100 µs, on the host a few tens of µs for a
//! 1 GiB shard. Scratch VRAM: the window's data-block hashes (`window / 128`; two such buffers when
//! there are several windows, at most `len / 256 + 8 KiB` together) and the level-1 array
//! (`len / 16384`): at most `len / 128 + len / 16384`, plus a small constant. It lives in one
//! allocation with two streams and the host buffer (a [`Workspace`]), kept per device for reuse by
//! [`crate::hasher::Hasher`], so a verification allocates and frees nothing. A confined lane
//! ([`crate::lane`]) runs the same passes on one stream ([`measure_on_lane`]).

use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::{CudaContext, CudaStream};
use vram_residency::digest::{
    Digest, HASH_SIZE, Hash32, LEVEL1_SPAN, TreeDigest, digest_from_level,
};

use crate::error::{CudaError, Result};
use crate::kernels::{HashKernels, LEVEL_THREADS_PER_BLOCK, THREADS_PER_BLOCK, launch_hash_blocks};
use crate::pinned::PinnedBuffer;
use crate::vram::VramBuffer;

const BLOCK: u64 = 4096;
const SPAN: u64 = LEVEL1_SPAN as u64;
const HASH: u64 = HASH_SIZE as u64;
const HASHES_PER_BLOCK: u64 = vram_residency::digest::HASHES_PER_BLOCK as u64;
/// Largest window: 4 GiB of data per kernel launch (larger shards: windows of 2 to 4 GiB).
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
        let count = len.div_ceil(MAX_WINDOW);
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
    /// The level-2 hashes of a digest-only measurement of several windows (empty for one window).
    level2: u64,
    total: u64,
}

impl Layout {
    /// One scratch area for a single window, two (one per stream) for several.
    fn for_plan(plan: &WindowPlan, level1_count: u64) -> Self {
        let aligned = |n: u64| n.max(1).next_multiple_of(256);
        let scratch = aligned(plan.scratch_bytes());
        let level1_bytes = aligned(level1_count.saturating_mul(HASH));
        let (second, level1) = if plan.count > 1 {
            (scratch, scratch.saturating_mul(2))
        } else {
            (0, scratch)
        };
        let level2 = level1.saturating_add(level1_bytes);
        let level2_bytes = if plan.count > 1 {
            aligned(level1_count.div_ceil(HASHES_PER_BLOCK).saturating_mul(HASH))
        } else {
            0
        };
        Self {
            scratch: [0, second],
            level1,
            level2,
            total: level2.saturating_add(level2_bytes),
        }
    }
}

/// What a workspace must hold to measure a shard of some length: device scratch bytes, and host
/// bytes for the level-1 hashes copied back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WorkspaceSize {
    pub device: u64,
    pub host: usize,
}

impl WorkspaceSize {
    /// The sizes for a shard of `len` bytes.
    pub(crate) fn for_len(len: u64) -> Self {
        let level1_count = len.div_ceil(SPAN);
        Self {
            device: Layout::for_plan(&WindowPlan::for_len(len), level1_count).total,
            host: usize::try_from(level1_count.max(1).saturating_mul(HASH)).unwrap_or(usize::MAX),
        }
    }
}

/// Two streams, one scratch allocation and a page-locked host buffer for the level-1 hashes, kept
/// per device for reuse by [`crate::hasher::Hasher`]: a verification then allocates, frees and
/// creates nothing (allocation and free cost time, and a free synchronises the device).
pub(crate) struct Workspace {
    main: Arc<CudaStream>,
    second: Arc<CudaStream>,
    arena: VramBuffer,
    host: PinnedBuffer,
}

impl Workspace {
    /// A new workspace of `size` on `ctx`.
    pub(crate) fn new(ctx: &Arc<CudaContext>, size: WorkspaceSize) -> Result<Self> {
        let stream = || {
            ctx.new_stream()
                .map_err(CudaError::driver("cuStreamCreate"))
        };
        Ok(Self {
            main: stream()?,
            second: stream()?,
            arena: VramBuffer::alloc(ctx, size.device)?,
            host: PinnedBuffer::alloc(ctx, size.host.max(HASH_SIZE))?,
        })
    }

    /// What it holds.
    pub(crate) const fn size(&self) -> WorkspaceSize {
        WorkspaceSize {
            device: self.arena.len(),
            host: self.host.len(),
        }
    }

    /// Whether it can measure a shard that needs `size`.
    pub(crate) const fn fits(&self, size: WorkspaceSize) -> bool {
        self.arena.len() >= size.device && self.host.len() >= size.host
    }

    /// Copies `count` hashes at scratch `offset` into the host buffer on the main stream, after
    /// what is queued there (not on the legacy default stream: see [`VramBuffer::read_on`]), and
    /// returns them.
    fn read_hashes(&mut self, offset: u64, count: u64) -> Result<&[Hash32]> {
        self.main
            .context()
            .bind_to_thread()
            .map_err(CudaError::driver("cuCtxSetCurrent"))?;
        let (main, arena) = (self.main.cu_stream(), &self.arena);
        read_hashes(
            // SAFETY: `main` is this workspace's live stream, of the context made current above.
            &mut |offset, dst| unsafe { arena.read_on(main, offset, dst) },
            &mut self.host,
            offset,
            count,
        )
    }
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
    workspace: &mut Workspace,
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
    let level1 = read_hashes(
        &mut |offset, dst| lane.read(arena, offset, dst),
        &mut workspace.host,
        layout.level1,
        len.div_ceil(SPAN),
    )?;
    TreeDigest::from_level1(level1.to_vec(), len).map_err(|_| CudaError::Internal("level-1 count"))
}

/// Measures the fs-verity digest and tree of `buffer` with `kernels` on `workspace` (which must
/// fit [`WorkspaceSize::for_len`]): the level-1 hashes are copied back. Returns whether the
/// workspace may be reused (its streams are idle) with the result.
///
/// # Errors
/// [`CudaError::Driver`] on a failed launch or copy.
pub(crate) fn measure(
    kernels: &HashKernels,
    workspace: &mut Workspace,
    buffer: &VramBuffer,
) -> (bool, Result<TreeDigest>) {
    let len = buffer.len();
    run(kernels, workspace, buffer, Want::Tree, |level1, _| {
        TreeDigest::from_level1(level1.to_vec(), len)
    })
}

/// [`measure`] for the digest alone: for a shard of several windows the level-2 hashes are
/// computed on the GPU and only they are copied back (32 bytes per 64 MiB instead of per 512 KiB;
/// the host hashes a level-1 array of 1 MiB for 16 GiB in about 0.5 ms).
///
/// # Errors
/// As [`measure`].
pub(crate) fn measure_digest(
    kernels: &HashKernels,
    workspace: &mut Workspace,
    buffer: &VramBuffer,
) -> (bool, Result<Digest>) {
    let len = buffer.len();
    run(kernels, workspace, buffer, Want::Digest, |hashes, level| {
        digest_from_level(hashes, level, len)
    })
}

/// What a measurement hands back: the whole tree (level 1 copied back), or the digest alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Tree,
    Digest,
}

/// The GPU passes, then `finish` on the host with the hashes of the level they ended with and that
/// level's number (the levels above, see the module docs); logs (debug) where the time went.
fn run<T>(
    kernels: &HashKernels,
    workspace: &mut Workspace,
    buffer: &VramBuffer,
    want: Want,
    finish: impl FnOnce(&[Hash32], u32) -> vram_residency::Result<T>,
) -> (bool, Result<T>) {
    let started = Instant::now();
    let len = buffer.len();
    let plan = WindowPlan::for_len(len);
    let layout = Layout::for_plan(&plan, len.div_ceil(SPAN));
    if !workspace.fits(WorkspaceSize::for_len(len)) {
        return (true, Err(CudaError::Internal("workspace too small")));
    }
    let queued = passes(kernels, buffer, &plan, &layout, workspace, want);
    let queued_at = Instant::now();
    // Whatever happened, nothing may still run on the workspace when it is reused or freed.
    let synced = sync(&workspace.second).and(sync(&workspace.main));
    let reusable = synced.is_ok();
    let synced_at = Instant::now();
    let mut copied_at = synced_at;
    let measured = queued.and_then(|top| {
        synced?;
        let hashes = workspace.read_hashes(top.offset, top.count)?;
        copied_at = Instant::now();
        finish(hashes, top.level)
            .map_err(|_| CudaError::Internal("hash count of the level copied back"))
    });
    let since = |at: Instant| micros(at.saturating_duration_since(started));
    tracing::debug!(
        bytes = len,
        windows = plan.count,
        ?want,
        queue_us = since(queued_at),
        gpu_us = since(synced_at),
        copied_us = since(copied_at),
        total_us = micros(started.elapsed()),
        "digest timings (from the start: passes queued, GPU done, hashes copied back, digest)"
    );
    (reusable, measured)
}

fn micros(duration: std::time::Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

/// The level of the tree that the GPU passes end with, and where its hashes lie in the scratch.
#[derive(Debug, Clone, Copy)]
struct Top {
    offset: u64,
    count: u64,
    level: u32,
}

/// Queues the GPU passes on `workspace`: the data and level-1 passes of every window, and for a
/// digest alone over several windows a level-2 pass. Returns where the last level lies (for one
/// data block, that block's hash, which is also the root, as its one "level-1" hash).
fn passes(
    function: &HashKernels,
    buffer: &VramBuffer,
    plan: &WindowPlan,
    layout: &Layout,
    workspace: &Workspace,
    want: Want,
) -> Result<Top> {
    let len = buffer.len();
    if len.div_ceil(BLOCK) <= 1 {
        // fs-verity: the tree of a single block is empty and the root is that block's hash.
        let out = workspace.arena.checked_range(0, HASH)?;
        // SAFETY: `buffer` holds `len` bytes and `out` has room for the 32 = 32 * ceil(len / 4096)
        // output bytes (checked_range); both live on this context; the stream is synchronised
        // before the hash is read and before the workspace is reused or freed.
        unsafe {
            launch_hash_blocks(
                function,
                &workspace.main,
                buffer.device_ptr(),
                len,
                out,
                THREADS_PER_BLOCK,
            )
        }?;
        return Ok(Top {
            offset: 0,
            count: 1,
            level: 1,
        });
    }
    let streams: [&Arc<CudaStream>; 2] = [&workspace.main, &workspace.second];
    queue_windows(function, buffer, plan, layout, &streams, &workspace.arena)?;
    let level1_count = len.div_ceil(SPAN);
    if want == Want::Tree || plan.count == 1 {
        return Ok(Top {
            offset: layout.level1,
            count: level1_count,
            level: 1,
        });
    }
    // Level 2 on the main stream, after the level-1 passes of both streams.
    workspace
        .main
        .join(&workspace.second)
        .map_err(CudaError::driver("cuStreamWaitEvent"))?;
    let level1_bytes = level1_count.saturating_mul(HASH);
    let level2_count = level1_count.div_ceil(HASHES_PER_BLOCK);
    let level1 = workspace.arena.checked_range(layout.level1, level1_bytes)?;
    let level2 = workspace
        .arena
        .checked_range(layout.level2, level2_count.saturating_mul(HASH))?;
    // SAFETY: `level1..+level1_bytes` and `level2..+32 * ceil(level1_bytes / 4096)` lie in the
    // workspace's level-1 and level-2 areas (checked above; they do not overlap, see Layout); the
    // main stream waits for both streams' level-1 passes (join above) and is synchronised before
    // the hashes are read and before the workspace is reused or freed.
    unsafe {
        launch_hash_blocks(
            function,
            &workspace.main,
            level1,
            level1_bytes,
            level2,
            LEVEL_THREADS_PER_BLOCK,
        )
    }?;
    Ok(Top {
        offset: layout.level2,
        count: level2_count,
        level: 2,
    })
}

/// Copies `count` hashes back from the scratch at `offset` into `host` with `read` (after the
/// other streams that wrote them were synchronised; `read` copies on, and waits for, its own) and
/// returns them, in place.
fn read_hashes<'host>(
    read: &mut dyn FnMut(u64, &mut [u8]) -> Result<()>,
    host: &'host mut PinnedBuffer,
    offset: u64,
    count: u64,
) -> Result<&'host [Hash32]> {
    let bytes =
        usize::try_from(count.saturating_mul(HASH)).map_err(|_| CudaError::OutOfBounds {
            what: "level-1 size",
        })?;
    let hashes = host
        .as_mut_slice()
        .get_mut(..bytes)
        .ok_or(CudaError::Internal("host buffer for the hashes too small"))?;
    read(offset, hashes)?;
    Ok(hashes.as_chunks::<HASH_SIZE>().0)
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
            launch_hash_blocks(
                function,
                stream,
                data,
                window_len,
                scratch_ptr,
                THREADS_PER_BLOCK,
            )?;
            launch_hash_blocks(
                function,
                stream,
                scratch_ptr,
                block_hashes,
                out,
                LEVEL_THREADS_PER_BLOCK,
            )?;
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
    fn windows_cover_the_shard_in_512k_multiples_and_scratch_stays_near_len_over_128() {
        for len in [
            1u64,
            4096,
            SINGLE_WINDOW_MAX,
            SINGLE_WINDOW_MAX + 1,
            3 << 20,
            (1 << 30) + 12345,
            4 << 30,
            (4 << 30) + 1,
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
            let layout = Layout::for_plan(&plan, len.div_ceil(SPAN));
            assert!(
                layout.total <= len / 128 + len / 16384 + 64 * 1024,
                "{len}: {layout:?}"
            );
            assert!(layout.total >= layout.level1 + len.div_ceil(SPAN) * HASH);
            if len > SINGLE_WINDOW_MAX {
                assert_eq!(plan.window % SPAN, 0, "{len}: {plan:?}");
            }
            if len <= MAX_WINDOW {
                assert_eq!(plan.count, 1, "{len}: {plan:?}");
                assert!(layout.level1 >= plan.scratch_bytes(), "{len}: {layout:?}");
            } else {
                assert!(plan.window <= MAX_WINDOW, "{len}: {plan:?}");
                assert!(plan.window >= MAX_WINDOW / 2, "{len}: {plan:?}");
                // The areas are in order and do not overlap.
                assert!(layout.scratch[1] >= plan.scratch_bytes());
                assert!(layout.level1 >= layout.scratch[1] + plan.scratch_bytes());
                let level1_count = len.div_ceil(SPAN);
                assert!(layout.level2 >= layout.level1 + level1_count * HASH);
                assert!(
                    layout.total >= layout.level2 + level1_count.div_ceil(HASHES_PER_BLOCK) * HASH
                );
            }
        }
    }
}
