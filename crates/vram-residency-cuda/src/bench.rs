//! What `vram-residency bench` measures besides our own seal and verify: the hardware's ceilings
//! (pinned host→device, device→device copies) and the seed crate's method (pageable copies and a
//! one-core SHA-256 on the host), in the same run.

use std::time::Instant;

use cudarc::driver::result;
use sha2::{Digest as _, Sha256};

use crate::device::Device;
use crate::error::{CudaError, Result};
use crate::pinned::PinnedBuffer;
use crate::vram::VramBuffer;

/// Bytes moved in a time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timed {
    /// Bytes processed.
    pub bytes: u64,
    /// Wall-clock seconds.
    pub seconds: f64,
}

impl Timed {
    /// Throughput in GB/s (10^9 bytes per second).
    #[must_use]
    pub fn gb_per_s(&self) -> f64 {
        if self.seconds > 0.0 {
            self.bytes as f64 / self.seconds / 1e9
        } else {
            0.0
        }
    }
}

/// Pinned host→device bandwidth: `bytes` copied from one pinned 256 MiB buffer into a device
/// buffer, asynchronously on one stream.
///
/// # Errors
/// [`CudaError::Driver`] (e.g. out of memory).
pub fn pinned_h2d(device: &Device, bytes: u64) -> Result<Timed> {
    const CHUNK: u64 = 256 << 20;
    let ctx = &device.ctx;
    let vram = VramBuffer::alloc(ctx, bytes)?;
    let chunk =
        usize::try_from(CHUNK.min(bytes)).map_err(|_| CudaError::OutOfBounds { what: "chunk" })?;
    let pinned = PinnedBuffer::alloc(ctx, chunk)?;
    let stream = ctx
        .new_stream()
        .map_err(CudaError::driver("cuStreamCreate"))?;
    let started = Instant::now();
    let mut offset = 0u64;
    let queued = (|| -> Result<()> {
        while offset < bytes {
            let n = usize::try_from(CHUNK.min(bytes.saturating_sub(offset)))
                .map_err(|_| CudaError::OutOfBounds { what: "chunk" })?;
            let src = pinned
                .as_slice()
                .get(..n)
                .ok_or(CudaError::OutOfBounds { what: "chunk" })?;
            // SAFETY: `pinned` outlives the stream's work (synchronised below before it drops);
            // the destination range is checked inside `write_async`; the stream is this context's.
            unsafe { vram.write_async(offset, src, &stream) }?;
            offset = offset.saturating_add(n as u64);
        }
        Ok(())
    })();
    let synced = stream
        .synchronize()
        .map_err(CudaError::driver("cuStreamSynchronize"));
    queued?;
    synced?;
    Ok(Timed {
        bytes,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Device→device copy of `bytes` (bytes copied; the memory traffic is twice that).
///
/// # Errors
/// [`CudaError::Driver`] (e.g. out of memory).
pub fn device_to_device(device: &Device, bytes: u64) -> Result<Timed> {
    let ctx = &device.ctx;
    let src = VramBuffer::alloc(ctx, bytes)?;
    let dst = VramBuffer::alloc(ctx, bytes)?;
    let n = usize::try_from(bytes).map_err(|_| CudaError::OutOfBounds { what: "size" })?;
    device.bind()?;
    // Warm-up copy (first-touch costs), then the timed one.
    let mut timed = 0.0;
    for _ in 0..2 {
        let started = Instant::now();
        // SAFETY: both buffers hold `n` bytes, live on this context (current), and are not used by
        // anything else; the copy is synchronous.
        unsafe { result::memcpy_dtod_sync(dst.device_ptr(), src.device_ptr(), n) }
            .map_err(CudaError::driver("cuMemcpyDtoD"))?;
        // Device-to-device copies return before they finish: wait for the device.
        device
            .ctx
            .synchronize()
            .map_err(CudaError::driver("cuCtxSynchronize"))?;
        timed = started.elapsed().as_secs_f64();
    }
    Ok(Timed {
        bytes,
        seconds: timed,
    })
}

/// The seed crate's verification: copy the whole shard to (pageable) host memory, then SHA-256 it
/// on one core. Measured on a device buffer of `bytes` (the cost does not depend on the content).
/// Returns the time and the hash (so the work cannot be optimised away).
///
/// # Errors
/// [`CudaError::Driver`]; host allocation failure as [`CudaError::OutOfBounds`].
pub fn seed_verify(device: &Device, bytes: u64) -> Result<(Timed, [u8; 32])> {
    let vram = VramBuffer::alloc(&device.ctx, bytes)?;
    let n = usize::try_from(bytes).map_err(|_| CudaError::OutOfBounds { what: "size" })?;
    device.bind()?;
    // SAFETY: `vram` holds `n` bytes on this (current) context; synchronous memset.
    unsafe { result::memset_d8_sync(vram.device_ptr(), 0x5a, n) }
        .map_err(CudaError::driver("cuMemsetD8"))?;
    let started = Instant::now();
    let mut host = Vec::new();
    host.try_reserve_exact(n)
        .map_err(|_| CudaError::OutOfBounds {
            what: "host memory for the seed's full copy",
        })?;
    host.resize(n, 0);
    vram.read(0, &mut host)?;
    let hash: [u8; 32] = Sha256::digest(&host).into();
    Ok((
        Timed {
            bytes,
            seconds: started.elapsed().as_secs_f64(),
        },
        hash,
    ))
}

/// The seed crate's seal: read the whole file into (pageable) host memory, copy it to the device
/// synchronously, SHA-256 the host bytes on one core.
///
/// # Errors
/// [`CudaError::Io`], [`CudaError::Driver`].
pub fn seed_seal(device: &Device, path: &std::path::Path) -> Result<(Timed, [u8; 32])> {
    let started = Instant::now();
    let host = std::fs::read(path)?;
    let bytes = host.len() as u64;
    let mut vram = VramBuffer::alloc(&device.ctx, bytes)?;
    vram.write(0, &host)?;
    let hash: [u8; 32] = Sha256::digest(&host).into();
    Ok((
        Timed {
            bytes,
            seconds: started.elapsed().as_secs_f64(),
        },
        hash,
    ))
}

/// Best of `runs` digests of a `bytes`-byte buffer that starts `padding` bytes into its
/// allocation (8: the image of a safetensors file whose data section was aligned, read by the
/// kernel's 8-byte-load entry point), for comparison with the aligned figure of the same run: the
/// digest alone, as a verification measures it.
///
/// # Errors
/// [`CudaError::Driver`], [`CudaError::OutOfBounds`].
pub fn verify_padded(
    hasher: &crate::hasher::Hasher,
    bytes: u64,
    padding: u64,
    runs: usize,
) -> Result<Timed> {
    let device = hasher.device();
    let vram = VramBuffer::alloc_padded(&device.ctx, bytes, padding)?;
    vram.fill(0x5a)?;
    let mut best = f64::INFINITY;
    for _ in 0..runs.max(1) {
        let started = Instant::now();
        hasher.digest(&vram)?;
        best = best.min(started.elapsed().as_secs_f64());
    }
    Ok(Timed {
        bytes,
        seconds: best,
    })
}
