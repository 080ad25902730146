//! The fs-verity hashing kernel (`kernels/fsverity.cu`): compiled with NVRTC for the present device
//! on first use, cached per device for the life of the process, and launched here.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaStream, LaunchConfig, PushKernelArg as _};
use cudarc::nvrtc::{CompileError, CompileOptions, Ptx, compile_ptx_with_opts};

use crate::device::nvrtc_present;
use crate::error::{CudaError, Result};

/// The kernel source, compiled at run time.
pub const FSVERITY_CU: &str = include_str!("kernels/fsverity.cu");

/// Entry point: `fsverity_hash_blocks(const u8* data, u64 data_len, u8* out)` writes SHA-256 of
/// each 4096-byte block of `data` (the last one zero-padded) to `out`, 32 bytes per block; `data`
/// 16-byte aligned.
const ENTRY: &str = "fsverity_hash_blocks";

/// The same for `data` that is only 8-byte aligned (8-byte loads).
const ENTRY_A8: &str = "fsverity_hash_blocks_a8";

/// The two entry points of the compiled kernel, by the alignment of the data they read.
#[derive(Clone)]
pub(crate) struct HashKernels {
    aligned16: CudaFunction,
    aligned8: CudaFunction,
}

impl HashKernels {
    /// The entry point for data starting at device address `data`: 16-byte loads where it is
    /// 16-byte aligned, 8-byte loads where it is 8-byte aligned.
    ///
    /// # Errors
    /// [`CudaError::OutOfBounds`] for data that is not 8-byte aligned (no buffer of ours is).
    pub(crate) fn for_data(&self, data: u64) -> Result<&CudaFunction> {
        match data % 16 {
            0 => Ok(&self.aligned16),
            8 => Ok(&self.aligned8),
            _ => Err(CudaError::OutOfBounds {
                what: "hashed data must be 8-byte aligned",
            }),
        }
    }
}

/// Threads per block of a data pass (the kernel's `__launch_bounds__`: 3 blocks of 256 threads
/// per SM at its 70 registers, which keeps the integer pipe about 92 % busy).
pub const THREADS_PER_BLOCK: u32 = 256;

/// Threads per block of a level-1 pass: one warp per SM sub-partition, so that the few threads of
/// such a pass (one per 512 KiB of data) spread over many SMs instead of sharing the integer pipes
/// of a few. Each thread hashes one 4 KiB block serially, so a small pass takes about one such
/// hash's latency. Measured on the H200 (2026-12-03, 2048 level-1 blocks, cupy harness): 166 µs
/// with 256 threads per block, 100 µs with 128, 64 or 32.
pub const LEVEL_THREADS_PER_BLOCK: u32 = 128;

/// Entry points by name, for loading the module into another context (a green context).
pub(crate) const ENTRIES: [&str; 2] = [ENTRY, ENTRY_A8];

/// Compiles the kernel to PTX for compute capability `(major, minor)` (`compute_XY`).
pub(crate) fn ptx(compute_capability: (i32, i32)) -> Result<Ptx> {
    if !nvrtc_present() {
        return Err(CudaError::NvrtcMissing);
    }
    let (major, minor) = compute_capability;
    let options = CompileOptions {
        options: vec![
            format!("--gpu-architecture=compute_{major}{minor}"),
            "--std=c++17".to_owned(),
            "-default-device".to_owned(),
        ],
        name: Some("fsverity.cu".to_owned()),
        ..CompileOptions::default()
    };
    compile_ptx_with_opts(FSVERITY_CU, options).map_err(|error| CudaError::Compile {
        log: match error {
            CompileError::CompileError { log, .. } => log.to_string_lossy().into_owned(),
            other => other.to_string(),
        },
    })
}

/// Loads `ptx` (from [`ptx`]) into `ctx` and returns both entry points.
pub(crate) fn load(ctx: &Arc<CudaContext>, ptx: Ptx) -> Result<HashKernels> {
    ctx.bind_to_thread()
        .map_err(CudaError::driver("cuCtxSetCurrent"))?;
    let module = ctx
        .load_module(ptx)
        .map_err(CudaError::driver("cuModuleLoadData"))?;
    let load = |entry| {
        module
            .load_function(entry)
            .map_err(CudaError::driver("cuModuleGetFunction"))
    };
    Ok(HashKernels {
        aligned16: load(ENTRY)?,
        aligned8: load(ENTRY_A8)?,
    })
}

/// Queues `fsverity_hash_blocks(data, data_len, out)` on `stream`: one thread per 4096-byte block,
/// `threads` per block of the launch ([`THREADS_PER_BLOCK`] for a data pass,
/// [`LEVEL_THREADS_PER_BLOCK`] for a level-1 pass).
///
/// # Safety
/// `data` must point to at least `data_len` readable bytes of device memory and `out` to at least
/// `32 * ceil(data_len / 4096)` writable bytes, both on `stream`'s context, and both must stay
/// allocated (and `out` unread by others) until the stream has passed this launch.
pub(crate) unsafe fn launch_hash_blocks(
    kernels: &HashKernels,
    stream: &CudaStream,
    data: u64,
    data_len: u64,
    out: u64,
    threads: u32,
) -> Result<()> {
    let function = kernels.for_data(data)?;
    let blocks = data_len.div_ceil(4096);
    if blocks == 0 {
        return Ok(());
    }
    let threads = threads.clamp(32, THREADS_PER_BLOCK);
    let grid =
        u32::try_from(blocks.div_ceil(u64::from(threads))).map_err(|_| CudaError::OutOfBounds {
            what: "kernel grid size",
        })?;
    let config = LaunchConfig {
        grid_dim: (grid, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut launch = stream.launch_builder(function);
    launch.arg(&data).arg(&data_len).arg(&out);
    // SAFETY: the kernel's parameters are (const u8*, u64, u8*), matching the three u64 values
    // pushed above; the caller guarantees the pointed-to ranges (see `# Safety`); the kernel only
    // reads `data[..data_len]` and writes `out[..32 * blocks]`.
    unsafe { launch.launch(config) }.map_err(CudaError::driver("cuLaunchKernel"))?;
    Ok(())
}
