//! A confined hashing lane for background verification: the hashing kernel on a limited share of
//! the GPU, so that a model serving beside it barely notices.
//!
//! Two mechanisms, the first that works:
//!
//! - **Green context** (driver ≥ CUDA 12.4): `cuDevSmResourceSplitByCount` carves `N` SMs out of
//!   the device, `cuGreenCtxCreate` makes a context limited to them, and the kernel (loaded into
//!   that context) runs on a `cuGreenCtxStreamCreate` stream at the lowest priority. The hardware
//!   keeps it on those SMs, whatever the grid size. Device memory is shared with the primary
//!   context (the shards live there).
//! - **Bounded grid** (fallback): the kernel on a lowest-priority stream of the primary context,
//!   its grid capped at `N × 3` blocks (3 resident blocks per SM at 70 registers), so at most `N`
//!   SMs' worth of blocks are ever resident. The block scheduler may still spread them over more
//!   SMs, and a one-wave kernel beside it is delayed more than a multi-wave one.
//!
//! [`Lane::confinement`] says which one is in use. Every raw driver call is here, each with its
//! `// SAFETY:`.

use std::ffi::{CString, c_uint, c_void};
use std::sync::Arc;

use cudarc::driver::{CudaContext, sys};
use vram_residency::backend::Confinement;

use crate::error::{CudaError, Result};
use crate::kernels::{ENTRIES, THREADS_PER_BLOCK};
use crate::tree::Launcher;
use crate::vram::VramBuffer;

/// Resident blocks of the hashing kernel per SM (70 registers × 256 threads).
const BLOCKS_PER_SM: u32 = 3;

/// First driver version with green contexts (12.4).
const GREEN_CONTEXT_DRIVER: i32 = 12040;

fn check(call: &'static str, result: sys::CUresult) -> Result<()> {
    result.result().map_err(CudaError::driver(call))
}

/// A confined lane: a context (green or primary), a low-priority stream on it, the kernel's two
/// entry points loaded there, and a grid cap for the bounded fallback.
pub struct Lane {
    /// Kept alive: the lane runs in its primary context (bounded grid) or beside it (green).
    primary: Arc<CudaContext>,
    green: Option<sys::CUgreenCtx>,
    ctx: sys::CUcontext,
    stream: sys::CUstream,
    module: sys::CUmodule,
    functions: [sys::CUfunction; 2],
    grid_cap: Option<u32>,
    confinement: Confinement,
}

// SAFETY: the handles are driver objects, usable from any thread once their context is made
// current (every method does so first); the lane is used by one thread at a time (the hasher hands
// it out behind a mutex) and destroyed once, in Drop.
unsafe impl Send for Lane {}
// SAFETY: as above; `&self` methods only queue work on the lane's own stream.
unsafe impl Sync for Lane {}

impl std::fmt::Debug for Lane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lane")
            .field("confinement", &self.confinement)
            .finish_non_exhaustive()
    }
}

impl Lane {
    /// A lane of `sms` SMs on `primary`'s device, with `ptx` (the hashing kernel) loaded into it:
    /// a green context where the driver has them and the split succeeds, else a bounded grid.
    /// `green_refused` receives why a green context could not be made.
    ///
    /// # Errors
    /// Driver errors of the fallback itself.
    pub(crate) fn new(
        primary: &Arc<CudaContext>,
        ptx: &str,
        sms: u32,
        green_refused: &mut Option<String>,
    ) -> Result<Self> {
        match Self::green(primary, ptx, sms) {
            Ok(lane) => Ok(lane),
            Err(error) => {
                *green_refused = Some(error.to_string());
                Self::bounded(primary, ptx, sms)
            }
        }
    }

    /// How the lane is confined.
    #[must_use]
    pub const fn confinement(&self) -> Confinement {
        self.confinement
    }

    fn green(primary: &Arc<CudaContext>, ptx: &str, sms: u32) -> Result<Self> {
        let mut version = 0i32;
        // SAFETY: writes one int.
        check("cuDriverGetVersion", unsafe {
            sys::cuDriverGetVersion(&raw mut version)
        })?;
        if version < GREEN_CONTEXT_DRIVER {
            return Err(CudaError::Unsupported(format!(
                "green contexts need a CUDA 12.4 driver; this one is {}.{}",
                version / 1000,
                version % 1000 / 10
            )));
        }
        let device = primary.cu_device();
        // SAFETY: zeroed C structs are valid "empty" values for these out-parameters.
        let mut all: sys::CUdevResource = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut part: sys::CUdevResource = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut rest: sys::CUdevResource = unsafe { std::mem::zeroed() };
        // SAFETY: `device` is a valid device handle; `all` is a valid out-parameter.
        check("cuDeviceGetDevResource", unsafe {
            sys::cuDeviceGetDevResource(
                device,
                &raw mut all,
                sys::CUdevResourceType::CU_DEV_RESOURCE_TYPE_SM,
            )
        })?;
        let mut groups: c_uint = 1;
        // SAFETY: one result slot (`groups` = 1), `all` filled above, `rest` an out-parameter.
        check("cuDevSmResourceSplitByCount", unsafe {
            sys::cuDevSmResourceSplitByCount(
                &raw mut part,
                &raw mut groups,
                &raw const all,
                &raw mut rest,
                0,
                sms,
            )
        })?;
        if groups != 1 {
            return Err(CudaError::Unsupported(format!(
                "the driver could not split off {sms} SMs"
            )));
        }
        // SAFETY: the union's `sm` member is the one a CU_DEV_RESOURCE_TYPE_SM resource holds.
        let granted = unsafe { part.__bindgen_anon_1.sm.smCount };
        let mut desc: sys::CUdevResourceDesc = std::ptr::null_mut();
        // SAFETY: one resource, filled by the split above.
        check("cuDevResourceGenerateDesc", unsafe {
            sys::cuDevResourceGenerateDesc(&raw mut desc, &raw mut part, 1)
        })?;
        let mut green: sys::CUgreenCtx = std::ptr::null_mut();
        // SAFETY: `desc` from the call above, `device` valid; the flag is required by the API.
        check("cuGreenCtxCreate", unsafe {
            sys::cuGreenCtxCreate(
                &raw mut green,
                desc,
                device,
                sys::CUgreenCtxCreate_flags::CU_GREEN_CTX_DEFAULT_STREAM as c_uint,
            )
        })?;
        let made = (|| -> Result<Self> {
            let mut ctx: sys::CUcontext = std::ptr::null_mut();
            // SAFETY: `green` was created above.
            check("cuCtxFromGreenCtx", unsafe {
                sys::cuCtxFromGreenCtx(&raw mut ctx, green)
            })?;
            let (module, functions) = load_module(ctx, ptx)?;
            let mut stream: sys::CUstream = std::ptr::null_mut();
            // SAFETY: `green` is valid; the stream is destroyed in Drop.
            let created = check("cuGreenCtxStreamCreate", unsafe {
                sys::cuGreenCtxStreamCreate(
                    &raw mut stream,
                    green,
                    sys::CUstream_flags::CU_STREAM_NON_BLOCKING as c_uint,
                    lowest_priority(),
                )
            });
            if let Err(error) = created {
                // SAFETY: the module was loaded above and is not used after this.
                let _ = unsafe { sys::cuModuleUnload(module) };
                return Err(error);
            }
            Ok(Self {
                primary: Arc::clone(primary),
                green: Some(green),
                ctx,
                stream,
                module,
                functions,
                grid_cap: None,
                confinement: Confinement::GreenContext { sms: granted },
            })
        })();
        if made.is_err() {
            // SAFETY: created above, not used after this.
            let _ = unsafe { sys::cuGreenCtxDestroy(green) };
        }
        let lane = made?;
        lane.self_test()?;
        Ok(lane)
    }

    fn bounded(primary: &Arc<CudaContext>, ptx: &str, sms: u32) -> Result<Self> {
        let ctx = primary.cu_ctx();
        let (module, functions) = load_module(ctx, ptx)?;
        let mut stream: sys::CUstream = std::ptr::null_mut();
        // SAFETY: the primary context is current (load_module made it so); destroyed in Drop.
        let created = check("cuStreamCreateWithPriority", unsafe {
            sys::cuStreamCreateWithPriority(
                &raw mut stream,
                sys::CUstream_flags::CU_STREAM_NON_BLOCKING as c_uint,
                lowest_priority(),
            )
        });
        if let Err(error) = created {
            // SAFETY: loaded above, unused after this.
            let _ = unsafe { sys::cuModuleUnload(module) };
            return Err(error);
        }
        Ok(Self {
            primary: Arc::clone(primary),
            green: None,
            ctx,
            stream,
            module,
            functions,
            grid_cap: Some(sms.max(1).saturating_mul(BLOCKS_PER_SM)),
            confinement: Confinement::BoundedGrid { sms: sms.max(1) },
        })
    }

    /// Hashes one known block on the lane (4096 zero bytes) and checks the result, so that a green
    /// context that cannot reach the primary context's memory is found at once, not mid-sweep.
    fn self_test(&self) -> Result<()> {
        const ZERO_BLOCK_SHA256: [u8; 32] = [
            0xad, 0x7f, 0xac, 0xb2, 0x58, 0x6f, 0xc6, 0xe9, 0x66, 0xc0, 0x04, 0xd7, 0xd1, 0xd1,
            0x6b, 0x02, 0x4f, 0x58, 0x05, 0xff, 0x7c, 0xb4, 0x7c, 0x7a, 0x85, 0xda, 0xbd, 0x8b,
            0x48, 0x89, 0x2c, 0xa7,
        ];
        let probe = crate::vram::VramBuffer::alloc(&self.primary, 4096 + 256)?;
        probe.fill(0)?;
        let data = probe.checked_range(0, 4096)?;
        let out = probe.checked_range(4096, 32)?;
        // SAFETY: `data` holds 4096 bytes, `out` room for one hash; synchronised before reading.
        unsafe { self.hash_blocks(data, 4096, out) }?;
        let mut hash = [0u8; 32];
        self.read(&probe, 4096, &mut hash)?;
        if hash == ZERO_BLOCK_SHA256 {
            Ok(())
        } else {
            Err(CudaError::Unsupported(
                "a kernel on the green context did not produce the expected hash".to_owned(),
            ))
        }
    }

    fn bind(&self) -> Result<()> {
        // SAFETY: `ctx` is this lane's context (green-derived or primary), alive until Drop.
        check("cuCtxSetCurrent", unsafe { sys::cuCtxSetCurrent(self.ctx) })
    }
}

impl Launcher for Lane {
    unsafe fn hash_blocks(&self, data: u64, data_len: u64, out: u64) -> Result<()> {
        let blocks = data_len.div_ceil(4096);
        if blocks == 0 {
            return Ok(());
        }
        let function = match data % 16 {
            0 => self.functions[0],
            8 => self.functions[1],
            _ => {
                return Err(CudaError::OutOfBounds {
                    what: "hashed data must be 8-byte aligned",
                });
            }
        };
        let needed =
            u32::try_from(blocks.div_ceil(u64::from(THREADS_PER_BLOCK))).map_err(|_| {
                CudaError::OutOfBounds {
                    what: "kernel grid size",
                }
            })?;
        let grid = self.grid_cap.map_or(needed, |cap| needed.min(cap)).max(1);
        self.bind()?;
        let mut data = data;
        let mut data_len = data_len;
        let mut out = out;
        let mut params: [*mut c_void; 3] = [
            (&raw mut data).cast(),
            (&raw mut data_len).cast(),
            (&raw mut out).cast(),
        ];
        // SAFETY: the kernel takes (const u8*, u64, u8*): three 8-byte parameters, pointed to by
        // `params` for the duration of the call (the driver copies them); the caller guarantees
        // the ranges (trait contract); `function` was loaded into this lane's context, current now.
        check("cuLaunchKernel", unsafe {
            sys::cuLaunchKernel(
                function,
                grid,
                1,
                1,
                THREADS_PER_BLOCK,
                1,
                1,
                0,
                self.stream,
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        })
    }

    fn sync(&self) -> Result<()> {
        self.bind()?;
        // SAFETY: the lane's own stream.
        check("cuStreamSynchronize", unsafe {
            sys::cuStreamSynchronize(self.stream)
        })
    }

    fn read(&self, arena: &VramBuffer, offset: u64, dst: &mut [u8]) -> Result<()> {
        self.bind()?;
        // SAFETY: the lane's own stream, of its context, made current above.
        unsafe { arena.read_on(self.stream, offset, dst) }
    }
}

impl Drop for Lane {
    fn drop(&mut self) {
        // SAFETY: every handle was created by this lane and is destroyed once, here, after the
        // stream has drained; failures are ignored (nothing can be done about them in Drop).
        unsafe {
            let _ = sys::cuCtxSetCurrent(self.ctx);
            let _ = sys::cuStreamSynchronize(self.stream);
            let _ = sys::cuStreamDestroy_v2(self.stream);
            let _ = sys::cuModuleUnload(self.module);
            if let Some(green) = self.green {
                let _ = sys::cuGreenCtxDestroy(green);
            }
            let _ = sys::cuCtxSetCurrent(self.primary.cu_ctx());
        }
    }
}

/// Loads the PTX into `ctx` (made current) and returns the module and the two entry points.
fn load_module(ctx: sys::CUcontext, ptx: &str) -> Result<(sys::CUmodule, [sys::CUfunction; 2])> {
    let image = CString::new(ptx).map_err(|_| CudaError::Internal("PTX with a NUL byte"))?;
    // SAFETY: `ctx` is a live context of ours.
    check("cuCtxSetCurrent", unsafe { sys::cuCtxSetCurrent(ctx) })?;
    let mut module: sys::CUmodule = std::ptr::null_mut();
    // SAFETY: `image` is NUL-terminated PTX text, alive for the call.
    check("cuModuleLoadData", unsafe {
        sys::cuModuleLoadData(&raw mut module, image.as_ptr().cast())
    })?;
    let mut functions: [sys::CUfunction; 2] = [std::ptr::null_mut(); 2];
    for (slot, entry) in functions.iter_mut().zip(ENTRIES) {
        let name = CString::new(entry).map_err(|_| CudaError::Internal("entry name"))?;
        // SAFETY: `module` was loaded above; `name` is NUL-terminated.
        let found = check("cuModuleGetFunction", unsafe {
            sys::cuModuleGetFunction(slot, module, name.as_ptr())
        });
        if let Err(error) = found {
            // SAFETY: loaded above, unused after this.
            let _ = unsafe { sys::cuModuleUnload(module) };
            return Err(error);
        }
    }
    Ok((module, functions))
}

/// The lowest stream priority of the current context (the largest number), 0 when unknown.
fn lowest_priority() -> i32 {
    let (mut least, mut greatest) = (0i32, 0i32);
    // SAFETY: writes two ints; needs a current context, which every caller has made current.
    let ok = unsafe { sys::cuCtxGetStreamPriorityRange(&raw mut least, &raw mut greatest) };
    if ok == sys::CUresult::CUDA_SUCCESS {
        least
    } else {
        0
    }
}
