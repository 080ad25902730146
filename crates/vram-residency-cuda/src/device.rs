//! Finding the driver and the devices, and what each device is (VP-001: integrated or discrete,
//! ECC on or off).

use std::sync::Arc;

use cudarc::driver::{CudaContext, sys};
use vram_residency::DeviceInfo;

use crate::error::{CudaError, Result};

/// Checks that the driver library can be loaded and initialises it. cudarc panics when `libcuda` is
/// missing, so this runs before any other driver call and turns that into [`CudaError::DriverMissing`].
///
/// # Errors
/// [`CudaError::DriverMissing`], or [`CudaError::Driver`] when `cuInit` fails.
pub fn init_driver() -> Result<()> {
    // SAFETY: only tries to dlopen the library by its candidate names; no driver call is made.
    if !unsafe { sys::is_culib_present() } {
        return Err(CudaError::DriverMissing);
    }
    cudarc::driver::result::init().map_err(CudaError::driver("cuInit"))
}

/// Whether NVRTC can be loaded (checked before the first compile; cudarc panics otherwise).
#[must_use]
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to dlopen the library by its candidate names.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// The driver's version as operators know it — the NVIDIA kernel module's, e.g.
/// `NVIDIA 580.159.04 (CUDA 13.0)` — read from `/proc/driver/nvidia/version`, with the CUDA version the
/// driver supports (`cuDriverGetVersion`). Where the module version cannot be read it says so:
/// `NVIDIA kernel module version unknown (CUDA 13.0)`.
///
/// # Errors
/// [`CudaError::Driver`]. Call [`init_driver`] first.
pub fn driver_version() -> Result<String> {
    let cuda = cuda_api_version()?;
    let module = std::fs::read_to_string("/proc/driver/nvidia/version")
        .ok()
        .and_then(|text| kernel_module_version(&text));
    Ok(match module {
        Some(version) => format!("NVIDIA {version} (CUDA {cuda})"),
        None => format!("NVIDIA kernel module version unknown (CUDA {cuda})"),
    })
}

/// The version in `/proc/driver/nvidia/version`'s first line:
/// `NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.159.04  Tue …` → `580.159.04` (the first
/// dotted number after `Kernel Module`, which also finds it in the open module's wording).
fn kernel_module_version(text: &str) -> Option<String> {
    let line = text.lines().next()?;
    let after = line.split("Kernel Module").nth(1)?;
    after
        .split_whitespace()
        .find(|token| {
            token.contains('.')
                && token.starts_with(|c: char| c.is_ascii_digit())
                && token.chars().all(|c| c.is_ascii_digit() || c == '.')
        })
        .map(str::to_owned)
}

/// The CUDA version the driver supports, e.g. `13.0` (`cuDriverGetVersion`).
fn cuda_api_version() -> Result<String> {
    let mut version: std::ffi::c_int = 0;
    // SAFETY: the driver library is loaded (init_driver ran); `version` is a valid out-pointer for
    // the duration of the call.
    unsafe { sys::cuDriverGetVersion(&raw mut version) }
        .result()
        .map_err(CudaError::driver("cuDriverGetVersion"))?;
    let major = version / 1000;
    let minor = (version % 1000) / 10;
    Ok(format!("{major}.{minor}"))
}

/// Number of CUDA devices.
///
/// # Errors
/// [`CudaError::Driver`]. Call [`init_driver`] first.
pub fn device_count() -> Result<u32> {
    let count = CudaContext::device_count().map_err(CudaError::driver("cuDeviceGetCount"))?;
    Ok(u32::try_from(count).unwrap_or(0))
}

/// One GPU: its primary context and what it is. (Hashing on it is [`crate::hasher::Hasher`]'s.)
pub struct Device {
    pub(crate) ctx: Arc<CudaContext>,
    index: u32,
    name: String,
    uuid: [u8; 16],
    total_bytes: u64,
    compute_capability: (i32, i32),
    ecc_enabled: bool,
    integrated: bool,
    unified_memory: vram_residency::UnifiedMemoryFacts,
    multiprocessors: u32,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("index", &self.index)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Device {
    /// Opens device `index` (retains its primary context) and reads its properties.
    ///
    /// # Errors
    /// [`CudaError::Driver`] on any failed query.
    pub fn open(index: u32) -> Result<Self> {
        let ordinal = usize::try_from(index).map_err(|_| CudaError::OutOfBounds {
            what: "device index",
        })?;
        let ctx =
            CudaContext::new(ordinal).map_err(CudaError::driver("cuDevicePrimaryCtxRetain"))?;
        // SAFETY: event tracking only orders cudarc's own CudaSlice/CudaView buffers, which this
        // crate never uses (its buffers are raw cuMemAlloc pointers, ordered by explicit stream
        // synchronisation). Without it, creating a stream no longer synchronises the whole context,
        // so one shard's verification does not wait for another shard's upload.
        unsafe { ctx.disable_event_tracking() };
        let attribute = |attribute, call| ctx.attribute(attribute).map_err(CudaError::driver(call));
        let major = attribute(
            sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
            "cuDeviceGetAttribute(COMPUTE_CAPABILITY_MAJOR)",
        )?;
        let minor = attribute(
            sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
            "cuDeviceGetAttribute(COMPUTE_CAPABILITY_MINOR)",
        )?;
        let ecc = attribute(
            sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_ECC_ENABLED,
            "cuDeviceGetAttribute(ECC_ENABLED)",
        )?;
        let integrated = attribute(
            sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_INTEGRATED,
            "cuDeviceGetAttribute(INTEGRATED)",
        )?;
        let multiprocessors = attribute(
            sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            "cuDeviceGetAttribute(MULTIPROCESSOR_COUNT)",
        )?;
        let unified_memory = vram_residency::UnifiedMemoryFacts {
            managed_memory: attribute(
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MANAGED_MEMORY,
                "cuDeviceGetAttribute(MANAGED_MEMORY)",
            )? != 0,
            concurrent_managed_access: attribute(
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_CONCURRENT_MANAGED_ACCESS,
                "cuDeviceGetAttribute(CONCURRENT_MANAGED_ACCESS)",
            )? != 0,
            pageable_memory_access: attribute(
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_PAGEABLE_MEMORY_ACCESS,
                "cuDeviceGetAttribute(PAGEABLE_MEMORY_ACCESS)",
            )? != 0,
            pageable_memory_access_uses_host_page_tables: attribute(
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_PAGEABLE_MEMORY_ACCESS_USES_HOST_PAGE_TABLES,
                "cuDeviceGetAttribute(PAGEABLE_MEMORY_ACCESS_USES_HOST_PAGE_TABLES)",
            )? != 0,
        };
        let name = ctx.name().map_err(CudaError::driver("cuDeviceGetName"))?;
        let uuid = ctx.uuid().map_err(CudaError::driver("cuDeviceGetUuid"))?;
        let total = ctx
            .total_mem()
            .map_err(CudaError::driver("cuDeviceTotalMem"))?;
        Ok(Self {
            ctx,
            index,
            name,
            uuid: uuid.bytes.map(|b| u8::from_ne_bytes(b.to_ne_bytes())),
            total_bytes: u64::try_from(total).unwrap_or(u64::MAX),
            compute_capability: (major, minor),
            ecc_enabled: ecc != 0,
            integrated: integrated != 0,
            unified_memory,
            multiprocessors: u32::try_from(multiprocessors).unwrap_or(1).max(1),
        })
    }

    /// Device index.
    #[must_use]
    pub const fn index(&self) -> u32 {
        self.index
    }

    /// Compute capability `(major, minor)`.
    #[must_use]
    pub const fn compute_capability(&self) -> (i32, i32) {
        self.compute_capability
    }

    /// Number of streaming multiprocessors.
    #[must_use]
    pub const fn multiprocessors(&self) -> u32 {
        self.multiprocessors
    }

    /// Free device memory now (`cuMemGetInfo`).
    ///
    /// # Errors
    /// [`CudaError::Driver`].
    pub fn free_bytes(&self) -> Result<u64> {
        let (free, _total) = self
            .ctx
            .mem_get_info()
            .map_err(CudaError::driver("cuMemGetInfo"))?;
        Ok(u64::try_from(free).unwrap_or(u64::MAX))
    }

    /// What the core needs to know about this device.
    ///
    /// # Errors
    /// [`CudaError::Driver`] from the free-memory query.
    pub fn info(&self) -> Result<DeviceInfo> {
        Ok(DeviceInfo {
            index: self.index,
            name: self.name.clone(),
            uuid: self.uuid,
            total_bytes: self.total_bytes,
            free_bytes: self.free_bytes()?,
            compute_capability: Some(format!(
                "{}.{}",
                self.compute_capability.0, self.compute_capability.1
            )),
            ecc_enabled: Some(self.ecc_enabled),
            integrated: Some(self.integrated),
            unified_memory: Some(self.unified_memory),
        })
    }

    /// Makes this device's context current on the calling thread.
    ///
    /// # Errors
    /// [`CudaError::Driver`].
    pub fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(CudaError::driver("cuCtxSetCurrent"))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_kernel_module_version_is_read_from_proc_driver_nvidia_version() {
        let text = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.159.04  Tue Oct 28 09:06:57 UTC 2025\nGCC version:  gcc version 12.2.0\n";
        assert_eq!(
            super::kernel_module_version(text).as_deref(),
            Some("580.159.04")
        );
        let open =
            "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build\n";
        assert_eq!(
            super::kernel_module_version(open).as_deref(),
            Some("580.65.06")
        );
        assert_eq!(super::kernel_module_version("garbage"), None);
        assert_eq!(super::kernel_module_version(""), None);
    }
}
