//! A confined hashing lane for background verification: the hashing kernel on a limited share of
//! the GPU, so that a model serving beside it barely notices.
//!
//! Three mechanisms; [`LaneMechanism::Auto`] takes the first that works, in this order:
//!
//! - **Green context** (driver ≥ CUDA 12.4): `cuDevSmResourceSplitByCount` carves `N` SMs out of
//!   the device, `cuGreenCtxCreate` makes a context limited to them, and the kernel (loaded into
//!   that context) runs on a `cuGreenCtxStreamCreate` stream at the lowest priority. The hardware
//!   keeps it on those SMs, whatever the grid size. Device memory is shared with the primary
//!   context (the shards live there).
//! - **MPS context** (only where this process is a client of a running MPS daemon, driver ≥ CUDA
//!   12.5): `cuCtxCreate_v4` with an SM-count execution affinity of `N`, the kernel on a
//!   lowest-priority stream there. MPS holds the context to that many SMs and, unlike a green
//!   context alone, runs its kernels *beside* other processes' kernels instead of time-slicing the
//!   GPU with them. (Green contexts keep working under MPS too; the lane's self-test decides.)
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
use vram_residency::backend::{Confinement, LaneMechanism, SmBudget};

use crate::error::{CudaError, Result};
use crate::kernels::{ENTRIES, THREADS_PER_BLOCK};
use crate::tree::Launcher;
use crate::vram::VramBuffer;

/// Resident blocks of the hashing kernel per SM (70 registers × 256 threads).
const BLOCKS_PER_SM: u32 = 3;

/// First driver version with green contexts (12.4).
const GREEN_CONTEXT_DRIVER: i32 = 12040;
/// First driver version with `cuCtxCreate_v4` (12.5).
const CTX_CREATE_V4_DRIVER: i32 = 12050;

fn check(call: &'static str, result: sys::CUresult) -> Result<()> {
    result.result().map_err(CudaError::driver(call))
}

/// A confined lane: a context (green or primary), a low-priority stream on it, the kernel's two
/// entry points loaded there, and a grid cap for the bounded fallback.
pub struct Lane {
    /// Kept alive: the lane runs in its primary context (bounded grid) or beside it (green).
    primary: Arc<CudaContext>,
    green: Option<sys::CUgreenCtx>,
    /// A context of our own (the MPS lane), destroyed in Drop.
    owned: Option<sys::CUcontext>,
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
    /// A lane of `budget.sms` SMs on `primary`'s device, with `ptx` (the hashing kernel) loaded
    /// into it, by `budget.mechanism`; for [`LaneMechanism::Auto`] the first that works (green
    /// context, MPS context where MPS runs, bounded grid), with why each one before it was
    /// refused pushed to `refusals`.
    ///
    /// # Errors
    /// Why the mechanism asked for cannot be used; for `Auto`, driver errors of the bounded grid.
    pub(crate) fn new(
        primary: &Arc<CudaContext>,
        ptx: &str,
        budget: SmBudget,
        refusals: &mut Vec<String>,
    ) -> Result<Self> {
        let sms = budget.sms.max(1);
        match budget.mechanism {
            LaneMechanism::GreenContext => Self::green(primary, ptx, sms),
            LaneMechanism::Mps => Self::mps(primary, ptx, sms),
            LaneMechanism::BoundedGrid => Self::bounded(primary, ptx, sms),
            LaneMechanism::Auto => {
                match Self::green(primary, ptx, sms) {
                    Ok(lane) => return Ok(lane),
                    Err(error) => refusals.push(format!("green context: {error}")),
                }
                if mps_client(primary.cu_device()).unwrap_or(false) {
                    match Self::mps(primary, ptx, sms) {
                        Ok(lane) => return Ok(lane),
                        Err(error) => refusals.push(format!("MPS context: {error}")),
                    }
                }
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
        let version = driver_version()?;
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
                owned: None,
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

    fn mps(primary: &Arc<CudaContext>, ptx: &str, sms: u32) -> Result<Self> {
        let version = driver_version()?;
        if version < CTX_CREATE_V4_DRIVER {
            return Err(CudaError::Unsupported(format!(
                "an MPS context needs a CUDA 12.5 driver; this one is {}.{}",
                version / 1000,
                version % 1000 / 10
            )));
        }
        let device = primary.cu_device();
        if !mps_client(device)? {
            return Err(CudaError::Unsupported(
                "this process is not a client of a running MPS daemon (start one with \
                 `nvidia-cuda-mps-control -d`, as the GPU's user, before this process)"
                    .to_owned(),
            ));
        }
        // SAFETY: a zeroed C struct is a valid value; the fields are set below.
        let mut affinity: sys::CUexecAffinityParam = unsafe { std::mem::zeroed() };
        affinity.type_ = sys::CUexecAffinityType::CU_EXEC_AFFINITY_TYPE_SM_COUNT;
        affinity.param.smCount.val = sms;
        let mut params = sys::CUctxCreateParams {
            execAffinityParams: &raw mut affinity,
            numExecAffinityParams: 1,
            cigParams: std::ptr::null_mut(),
        };
        let mut ctx: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: `params` points at one affinity parameter, both alive for the call; `device` is
        // valid. The new context is destroyed in Drop (or below on failure).
        check("cuCtxCreate_v4", unsafe {
            sys::cuCtxCreate_v4(&raw mut ctx, &raw mut params, 0, device)
        })?;
        let made = (|| -> Result<Self> {
            // cuCtxCreate pushed the new context on this thread's stack; take it off again.
            let mut popped: sys::CUcontext = std::ptr::null_mut();
            // SAFETY: the stack holds the context just created.
            check("cuCtxPopCurrent", unsafe {
                sys::cuCtxPopCurrent_v2(&raw mut popped)
            })?;
            // SAFETY: `ctx` was created above.
            check("cuCtxSetCurrent", unsafe { sys::cuCtxSetCurrent(ctx) })?;
            // SAFETY: a zeroed C struct is a valid out-parameter.
            let mut granted: sys::CUexecAffinityParam = unsafe { std::mem::zeroed() };
            // SAFETY: `ctx` is current; writes one struct.
            check("cuCtxGetExecAffinity", unsafe {
                sys::cuCtxGetExecAffinity(
                    &raw mut granted,
                    sys::CUexecAffinityType::CU_EXEC_AFFINITY_TYPE_SM_COUNT,
                )
            })?;
            // SAFETY: the union's `smCount` member is the one an SM-count affinity holds.
            let granted = unsafe { granted.param.smCount.val };
            let (module, functions, stream) = load_module_with_stream(ctx, ptx)?;
            Ok(Self {
                primary: Arc::clone(primary),
                green: None,
                owned: Some(ctx),
                ctx,
                stream,
                module,
                functions,
                grid_cap: None,
                confinement: Confinement::MpsContext { sms: granted },
            })
        })();
        let lane = match made {
            Ok(lane) => lane,
            Err(error) => {
                // SAFETY: created above, nothing of it is used after this.
                let _ = unsafe { sys::cuCtxDestroy_v2(ctx) };
                // SAFETY: the primary context outlives this call (held by `primary`).
                let _ = unsafe { sys::cuCtxSetCurrent(primary.cu_ctx()) };
                return Err(error);
            }
        };
        // On failure the lane's Drop destroys the context.
        lane.self_test()?;
        Ok(lane)
    }

    fn bounded(primary: &Arc<CudaContext>, ptx: &str, sms: u32) -> Result<Self> {
        let ctx = primary.cu_ctx();
        let (module, functions, stream) = load_module_with_stream(ctx, ptx)?;
        Ok(Self {
            primary: Arc::clone(primary),
            green: None,
            owned: None,
            ctx,
            stream,
            module,
            functions,
            grid_cap: Some(sms.max(1).saturating_mul(BLOCKS_PER_SM)),
            confinement: Confinement::BoundedGrid { sms: sms.max(1) },
        })
    }

    /// Hashes one known block on the lane (4096 zero bytes) and checks the result, so that a green
    /// or MPS context that cannot reach the primary context's memory is found at once, not
    /// mid-sweep.
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
                "a kernel on the lane's context did not produce the expected hash".to_owned(),
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
            if let Some(owned) = self.owned {
                let _ = sys::cuCtxDestroy_v2(owned);
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

/// [`load_module`] into `ctx`, then a lowest-priority non-blocking stream there; on failure
/// nothing stays loaded. The MPS and bounded lanes use it (a green context makes its stream with
/// `cuGreenCtxStreamCreate` instead).
fn load_module_with_stream(
    ctx: sys::CUcontext,
    ptx: &str,
) -> Result<(sys::CUmodule, [sys::CUfunction; 2], sys::CUstream)> {
    let (module, functions) = load_module(ctx, ptx)?;
    match low_priority_stream() {
        Ok(stream) => Ok((module, functions, stream)),
        Err(error) => {
            // SAFETY: loaded above, unused after this.
            let _ = unsafe { sys::cuModuleUnload(module) };
            Err(error)
        }
    }
}

/// The driver's CUDA version, e.g. 13000.
fn driver_version() -> Result<i32> {
    let mut version = 0i32;
    // SAFETY: writes one int.
    check("cuDriverGetVersion", unsafe {
        sys::cuDriverGetVersion(&raw mut version)
    })?;
    Ok(version)
}

/// Whether contexts with an SM-count execution affinity can be made on `device`: true when this
/// process is a client of a running MPS daemon (Volta and later), false otherwise.
///
/// # Errors
/// Driver errors.
pub(crate) fn mps_client(device: sys::CUdevice) -> Result<bool> {
    let mut supported = 0i32;
    // SAFETY: writes one int; `device` is a valid device handle.
    check("cuDeviceGetExecAffinitySupport", unsafe {
        sys::cuDeviceGetExecAffinitySupport(
            &raw mut supported,
            sys::CUexecAffinityType::CU_EXEC_AFFINITY_TYPE_SM_COUNT,
            device,
        )
    })?;
    Ok(supported == 1)
}

/// A non-blocking stream at the lowest priority on the current context (destroyed by the lane).
fn low_priority_stream() -> Result<sys::CUstream> {
    let mut stream: sys::CUstream = std::ptr::null_mut();
    // SAFETY: the caller made the lane's context current; the stream is destroyed in Drop.
    check("cuStreamCreateWithPriority", unsafe {
        sys::cuStreamCreateWithPriority(
            &raw mut stream,
            sys::CUstream_flags::CU_STREAM_NON_BLOCKING as c_uint,
            lowest_priority(),
        )
    })?;
    Ok(stream)
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
