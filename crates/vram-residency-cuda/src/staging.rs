//! Streamed upload: file → bounded ring of pinned staging buffers → VRAM.
//!
//! Several reader threads each own a few pinned buffers and a stream. A reader takes the next
//! chunk index from a shared counter, waits until its buffer's previous copy has finished (an
//! event), `pread`s the chunk into it and queues an asynchronous copy to the chunk's place in VRAM.
//! Host memory is bounded by `readers × slots_per_reader × slot_bytes` whatever the model's size.
//! Every buffer is synchronised, zeroised and freed when the upload ends (also on error), and the
//! file's pages are dropped from the page cache afterwards (`posix_fadvise(DONTNEED)`), so the
//! weights do not stay in host RAM.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use cudarc::driver::{CudaEvent, CudaStream};
use vram_residency::digest::read_full;

use crate::error::{CudaError, Result};
use crate::pinned::PinnedBuffer;
use crate::vram::VramBuffer;
use zeroize::Zeroize as _;

/// Alignment O_DIRECT needs for offsets, lengths and buffers.
const DIRECT_ALIGN: usize = 4096;

/// Where the readers of one upload spent their time, summed over readers (nanoseconds); logged at
/// debug level (`-vv`) when the upload ends, to say what bounds a seal.
#[derive(Default)]
struct ReaderTimes {
    ring: AtomicU64,
    read: AtomicU64,
    wait: AtomicU64,
    send: AtomicU64,
    drop_cache: AtomicU64,
    finish: AtomicU64,
}

impl ReaderTimes {
    fn add(counter: &AtomicU64, since: Instant) -> Instant {
        let now = Instant::now();
        let nanos =
            u64::try_from(now.saturating_duration_since(since).as_nanos()).unwrap_or(u64::MAX);
        counter.fetch_add(nanos, Ordering::Relaxed);
        now
    }

    fn log(&self, len: u64, readers: usize, started: Instant) {
        let ms = |counter: &AtomicU64| counter.load(Ordering::Relaxed) as f64 / 1e6;
        tracing::debug!(
            bytes = len,
            readers,
            wall_ms = started.elapsed().as_secs_f64() * 1e3,
            ring_ms = ms(&self.ring),
            read_ms = ms(&self.read),
            wait_for_copy_ms = ms(&self.wait),
            queue_copy_ms = ms(&self.send),
            drop_page_cache_ms = ms(&self.drop_cache),
            drain_and_zeroise_ms = ms(&self.finish),
            "staging upload (reader times summed over readers)"
        );
    }
}

/// Shape of the staging ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StagingConfig {
    /// Reader threads for file uploads (each with its own stream).
    pub readers: usize,
    /// Pinned buffers per reader (2 = double buffering).
    pub slots_per_reader: usize,
    /// Size of one pinned buffer; a multiple of 4096.
    pub slot_bytes: usize,
    /// Read the file with `O_DIRECT` (bypassing the page cache).
    pub direct_io: bool,
    /// Drop the file's pages from the page cache after the upload.
    pub drop_page_cache: bool,
}

/// Files at least this large may use more than 8 readers.
const LARGE_FILE: u64 = 4 << 30;

impl Default for StagingConfig {
    /// One reader per core, at most 16 (at most 8 for files under 4 GiB), two 2 MiB buffers each:
    /// at most 64 MiB pinned. On the H200 test host (16 cores) a page-cache-hot 16 GiB file sealed
    /// at 41.9 GB/s with 16 readers and 37.0 with 8 (`vram-residency bench --staging-readers`,
    /// same session, 2026-12-02).
    ///
    /// Small buffers are faster, not only leaner: on the H100 test host a 16 GiB page-cache-hot
    /// file sealed at 41.7 GB/s with 2 MiB buffers, 40.9 with 4 MiB and 26.1 with 8 MiB (8
    /// readers; `vram-residency bench --staging-buffer`): the buffers in flight then stay in the
    /// CPU caches between the `pread` that fills them and the DMA that drains them.
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(4, std::num::NonZero::get);
        Self {
            readers: cores.clamp(1, 16),
            slots_per_reader: 2,
            slot_bytes: 2 << 20,
            direct_io: false,
            drop_page_cache: true,
        }
    }
}

impl StagingConfig {
    /// Most host bytes the ring pins at once.
    #[must_use]
    pub fn pinned_bytes(&self) -> u64 {
        (self.readers as u64)
            .saturating_mul(self.slots_per_reader as u64)
            .saturating_mul(self.slot_bytes as u64)
    }

    fn validated(&self) -> Result<Self> {
        if self.readers == 0
            || self.slots_per_reader == 0
            || self.slot_bytes == 0
            || !self.slot_bytes.is_multiple_of(DIRECT_ALIGN)
        {
            return Err(CudaError::OutOfBounds {
                what: "staging ring shape (readers, slots and a slot size that is a multiple of 4096 must be non-zero)",
            });
        }
        Ok(*self)
    }
}

/// One pinned buffer, the event recorded after its last queued copy, and whether one is queued.
struct Slot {
    buffer: PinnedBuffer,
    copied: CudaEvent,
    in_flight: bool,
}

/// A reader's stream and buffers. Dropping it waits for the stream first, so no copy can still be
/// reading a buffer when it is zeroised and freed.
struct Ring {
    stream: std::sync::Arc<CudaStream>,
    slots: Vec<Slot>,
    next: usize,
    slot_bytes: usize,
}

/// Rings kept between uploads on one device (at most [`MAX_POOLED_RINGS`]): allocating pinned
/// memory, events and a stream for every reader of every seal cost a fixed time per file that small
/// files and many-file checkpoints paid again and again. A ring goes back only after its stream has
/// drained, with every buffer **zeroised**, so no weight bytes stay in host memory between uploads;
/// the pinned memory itself (at most 16 rings × two 2 MiB buffers by default) stays allocated until
/// [`RingPool::clear`] (`CudaBackend::trim_caches`).
#[derive(Default)]
pub struct RingPool {
    rings: std::sync::Mutex<Vec<Ring>>,
}

impl std::fmt::Debug for RingPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingPool").finish_non_exhaustive()
    }
}

/// Rings kept per device.
const MAX_POOLED_RINGS: usize = 16;

impl RingPool {
    /// An empty pool.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    fn take(&self, dst: &VramBuffer, config: &StagingConfig) -> Result<Ring> {
        let pooled = {
            let mut rings = self
                .rings
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            rings
                .iter()
                .position(|r| {
                    r.slots.len() == config.slots_per_reader && r.slot_bytes == config.slot_bytes
                })
                .map(|index| rings.swap_remove(index))
        };
        match pooled {
            Some(ring) => Ok(ring),
            None => Ring::new(dst, config),
        }
    }

    /// Back to the pool after a clean upload (the caller drained it with `Ring::finish`), every
    /// buffer zeroised.
    fn give_back(&self, mut ring: Ring) {
        for slot in &mut ring.slots {
            slot.buffer.as_mut_slice().zeroize();
            slot.in_flight = false;
        }
        ring.next = 0;
        let mut rings = self
            .rings
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if rings.len() < MAX_POOLED_RINGS {
            rings.push(ring);
        }
    }

    /// Frees every pooled ring (zeroised already).
    pub fn clear(&self) {
        self.rings
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
    }
}

impl Ring {
    fn new(dst: &VramBuffer, config: &StagingConfig) -> Result<Self> {
        let ctx = dst.context();
        let stream = ctx
            .new_stream()
            .map_err(CudaError::driver("cuStreamCreate"))?;
        let mut slots = Vec::with_capacity(config.slots_per_reader);
        for _ in 0..config.slots_per_reader {
            slots.push(Slot {
                buffer: PinnedBuffer::alloc(ctx, config.slot_bytes)?,
                copied: ctx
                    .new_event(None)
                    .map_err(CudaError::driver("cuEventCreate"))?,
                in_flight: false,
            });
        }
        Ok(Self {
            stream,
            slots,
            next: 0,
            slot_bytes: config.slot_bytes,
        })
    }

    /// The next buffer, once its previous copy has finished.
    fn take(&mut self) -> Result<&mut Slot> {
        let index = self.next.checked_rem(self.slots.len()).unwrap_or(0);
        self.next = self.next.wrapping_add(1);
        let slot = self
            .slots
            .get_mut(index)
            .ok_or(CudaError::Internal("empty ring"))?;
        if slot.in_flight {
            slot.copied
                .synchronize()
                .map_err(CudaError::driver("cuEventSynchronize"))?;
            slot.in_flight = false;
        }
        Ok(slot)
    }

    /// Queues the copy of the first `n` bytes of `slot` to `offset` and records its event.
    fn send(
        stream: &CudaStream,
        slot: &mut Slot,
        dst: &VramBuffer,
        offset: u64,
        n: usize,
    ) -> Result<()> {
        let bytes = slot
            .buffer
            .as_slice()
            .get(..n)
            .ok_or(CudaError::OutOfBounds {
                what: "chunk larger than a staging buffer",
            })?;
        // SAFETY: the slot is not touched again until `copied` (recorded right after on the same
        // stream) has completed — `take` synchronises it, and `Drop` synchronises the stream before
        // the buffer is freed; the stream belongs to dst's context (created from it in `new`).
        unsafe { dst.write_async(offset, bytes, stream) }?;
        slot.copied
            .record(stream)
            .map_err(CudaError::driver("cuEventRecord"))?;
        slot.in_flight = true;
        Ok(())
    }

    fn finish(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(CudaError::driver("cuStreamSynchronize"))
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        if let Err(error) = self.stream.synchronize() {
            tracing::error!(%error, "staging stream failed to synchronise before its buffers were freed");
        }
    }
}

/// Uploads the whole of `file` (exactly `dst.len()` bytes) into `dst` through the staging ring.
///
/// # Errors
/// [`CudaError::SourceChanged`] when the file's size is not `dst.len()` before or after, or it ends
/// early; [`CudaError::Io`]; [`CudaError::Driver`].
pub fn upload_file(
    dst: &VramBuffer,
    file: &File,
    config: &StagingConfig,
    pool: &RingPool,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<()> {
    let config = config.validated()?;
    let len = dst.len();
    check_size(file, len)?;
    let direct;
    let source = if config.direct_io {
        // A second open file description, so the caller's file keeps its flags.
        direct = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(format!("/proc/self/fd/{}", file.as_raw_fd()))?;
        &direct
    } else {
        file
    };
    let slot = config.slot_bytes as u64;
    let chunks = len.div_ceil(slot);
    let next_chunk = AtomicU64::new(0);
    let uploaded = AtomicU64::new(0);
    let failed = AtomicBool::new(false);
    let times = ReaderTimes::default();
    let started = Instant::now();
    // Beyond 8 readers only for large files: on the H200 host 16 readers sealed 16 GiB at 39-42
    // GB/s against 37 with 8, but 1 GiB at 12.3 against 17-18 (2026-12-02; each reader's pinned
    // buffers and thread cost a fixed time that a small file does not amortise).
    let cap = if len >= LARGE_FILE {
        config.readers
    } else {
        config.readers.min(8)
    };
    let readers = usize::try_from(chunks)
        .unwrap_or(usize::MAX)
        .clamp(1, cap.max(1));

    let outcomes: Vec<Result<()>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..readers)
            .map(|_| {
                scope.spawn(|| {
                    let outcome = read_chunks(
                        dst,
                        source,
                        &config,
                        pool,
                        &next_chunk,
                        chunks,
                        &uploaded,
                        &failed,
                        progress,
                        &times,
                    );
                    if outcome.is_err() {
                        failed.store(true, Ordering::Relaxed);
                    }
                    outcome
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|worker| {
                worker
                    .join()
                    .unwrap_or(Err(CudaError::Internal("a staging reader panicked")))
            })
            .collect()
    });
    for outcome in outcomes {
        outcome?;
    }
    times.log(len, readers, started);
    check_size(file, len)?;
    Ok(())
}

/// One reader: claims chunks until none is left (or another reader failed).
#[expect(
    clippy::too_many_arguments,
    reason = "the shared state of one upload, private"
)]
fn read_chunks(
    dst: &VramBuffer,
    file: &File,
    config: &StagingConfig,
    pool: &RingPool,
    next_chunk: &AtomicU64,
    chunks: u64,
    uploaded: &AtomicU64,
    failed: &AtomicBool,
    progress: &(dyn Fn(u64) + Sync),
    times: &ReaderTimes,
) -> Result<()> {
    let mut at = Instant::now();
    let mut ring = pool.take(dst, config)?;
    at = ReaderTimes::add(&times.ring, at);
    let slot_bytes = config.slot_bytes as u64;
    let len = dst.len();
    while !failed.load(Ordering::Relaxed) {
        let chunk = next_chunk.fetch_add(1, Ordering::Relaxed);
        if chunk >= chunks {
            break;
        }
        let offset = chunk
            .checked_mul(slot_bytes)
            .ok_or(CudaError::OutOfBounds {
                what: "chunk offset",
            })?;
        let n = usize::try_from(slot_bytes.min(len.saturating_sub(offset)))
            .map_err(|_| CudaError::OutOfBounds { what: "chunk size" })?;
        let stream = std::sync::Arc::clone(&ring.stream);
        let slot = ring.take()?;
        at = ReaderTimes::add(&times.wait, at);
        let request = if config.direct_io {
            n.next_multiple_of(DIRECT_ALIGN)
        } else {
            n
        };
        let buffer =
            slot.buffer
                .as_mut_slice()
                .get_mut(..request)
                .ok_or(CudaError::OutOfBounds {
                    what: "chunk larger than a staging buffer",
                })?;
        let got = read_at_least(file, buffer, offset, n)?;
        at = ReaderTimes::add(&times.read, at);
        if got < n {
            return Err(CudaError::SourceChanged {
                expected: len,
                actual: offset.saturating_add(got as u64),
            });
        }
        Ring::send(&stream, slot, dst, offset, n)?;
        at = ReaderTimes::add(&times.send, at);
        if config.drop_page_cache && !config.direct_io {
            // Chunk by chunk, in parallel: the bytes are in the pinned buffer now.
            drop_page_cache(file, offset, n as u64);
            at = ReaderTimes::add(&times.drop_cache, at);
        }
        let total = uploaded
            .fetch_add(n as u64, Ordering::Relaxed)
            .saturating_add(n as u64);
        progress(total);
    }
    ring.finish()?;
    pool.give_back(ring);
    ReaderTimes::add(&times.finish, at);
    Ok(())
}

/// Reads into `buffer` at `offset` until at least `want` bytes arrived or the file ended.
fn read_at_least(file: &File, buffer: &mut [u8], offset: u64, want: usize) -> Result<usize> {
    let mut got = 0usize;
    while got < want {
        let rest = buffer.get_mut(got..).ok_or(CudaError::OutOfBounds {
            what: "read position",
        })?;
        let at = offset.saturating_add(got as u64);
        match file.read_at(rest, at) {
            Ok(0) => break,
            Ok(n) => got = got.saturating_add(n),
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error.into()),
        }
    }
    Ok(got)
}

fn check_size(file: &File, len: u64) -> Result<()> {
    let actual = file.metadata()?.len();
    if actual == len {
        Ok(())
    } else {
        Err(CudaError::SourceChanged {
            expected: len,
            actual,
        })
    }
}

/// Asks the kernel to drop the file's cached pages: the weights should not stay in host RAM.
fn drop_page_cache(file: &File, offset: u64, len: u64) {
    let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return;
    };
    // Dirty pages (a file written and not yet written back, say just downloaded) cannot be
    // dropped: DONTNEED only starts their writeback and leaves them cached (a GPU test found a
    // freshly written 256 MiB file still fully cached after its seal, H200 host 2026-12-03). Write
    // them back and wait first; for clean pages this finds nothing to do.
    // SAFETY: the descriptor belongs to `file`, which is open for the whole call; sync_file_range
    // only reads its arguments.
    let synced = unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset,
            len,
            libc::SYNC_FILE_RANGE_WAIT_BEFORE
                | libc::SYNC_FILE_RANGE_WRITE
                | libc::SYNC_FILE_RANGE_WAIT_AFTER,
        )
    };
    if synced != 0 {
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            "sync_file_range failed; dirty pages of the model may stay cached"
        );
    }
    // SAFETY: the descriptor belongs to `file`, which is open for the whole call; posix_fadvise
    // only reads its arguments.
    let rc =
        unsafe { libc::posix_fadvise(file.as_raw_fd(), offset, len, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        tracing::warn!(
            errno = rc,
            "posix_fadvise(DONTNEED) failed; the model's pages may stay cached"
        );
    }
}

/// Uploads exactly `dst.len()` bytes from a sequential reader (one reader thread: the caller's).
///
/// # Errors
/// [`CudaError::SourceChanged`] when the reader ends early or has more bytes; [`CudaError::Io`];
/// [`CudaError::Driver`].
pub fn upload_reader(
    dst: &VramBuffer,
    reader: &mut dyn Read,
    config: &StagingConfig,
    progress: &mut dyn FnMut(u64),
) -> Result<()> {
    let config = config.validated()?;
    let len = dst.len();
    let mut ring = Ring::new(dst, &config)?;
    let mut offset = 0u64;
    while offset < len {
        let n = usize::try_from((config.slot_bytes as u64).min(len.saturating_sub(offset)))
            .map_err(|_| CudaError::OutOfBounds { what: "chunk size" })?;
        let stream = std::sync::Arc::clone(&ring.stream);
        let slot = ring.take()?;
        let buffer = slot
            .buffer
            .as_mut_slice()
            .get_mut(..n)
            .ok_or(CudaError::OutOfBounds {
                what: "chunk larger than a staging buffer",
            })?;
        let got = read_full(reader, buffer)?;
        if got < n {
            return Err(CudaError::SourceChanged {
                expected: len,
                actual: offset.saturating_add(got as u64),
            });
        }
        Ring::send(&stream, slot, dst, offset, n)?;
        offset = offset.saturating_add(n as u64);
        progress(offset);
    }
    let mut probe = [0u8; 1];
    if read_full(reader, &mut probe)? != 0 {
        return Err(CudaError::SourceChanged {
            expected: len,
            actual: len.saturating_add(1),
        });
    }
    ring.finish()
}
