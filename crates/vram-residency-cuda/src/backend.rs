//! [`CudaBackend`]: the core's [`Backend`] over real VRAM.

use std::collections::HashMap;
use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use vram_residency::backend::AllocationId;
use vram_residency::{
    Backend, BackendKind, DeviceBuffer, DeviceInfo, Digest, Residency, TreeDigest, VramError,
    Weights,
    backend::{Confinement, SmBudget, image_padding},
};

use crate::device::{Device, device_count, driver_version, init_driver};
use crate::error::CudaError;
use crate::hasher::Hasher;
use crate::policy;
use crate::staging::{self, RingPool, StagingConfig};
use crate::vram::VramBuffer;

/// Settings of the CUDA backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CudaConfig {
    /// The staging ring used by uploads.
    pub staging: StagingConfig,
}

/// Live allocations by id (weak: the shard owns its memory).
type LiveMap = HashMap<AllocationId, Weak<VramBuffer>>;

/// Real device memory through the CUDA driver API. Opening it loads the driver (a clear error when
/// there is none), finds the GPUs and retains their primary contexts.
pub struct CudaBackend {
    devices: Vec<Arc<Device>>,
    hashers: Vec<Arc<Hasher>>,
    /// Staging rings kept between uploads, per device.
    rings: Vec<Arc<RingPool>>,
    config: CudaConfig,
    driver: String,
    next_id: AtomicU64,
    live: Arc<Mutex<LiveMap>>,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend")
            .field("devices", &self.devices.len())
            .field("driver", &self.driver)
            .finish_non_exhaustive()
    }
}

impl CudaBackend {
    /// Loads the driver and opens every GPU.
    ///
    /// # Errors
    /// [`CudaError::DriverMissing`], [`CudaError::NoDevice`], [`CudaError::Driver`].
    pub fn new(config: CudaConfig) -> Result<Self, CudaError> {
        init_driver()?;
        let count = device_count()?;
        if count == 0 {
            return Err(CudaError::NoDevice);
        }
        let devices = (0..count)
            .map(|index| Device::open(index).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        let hashers = devices
            .iter()
            .map(|d| Arc::new(Hasher::new(Arc::clone(d))))
            .collect();
        let rings = devices.iter().map(|_| Arc::new(RingPool::new())).collect();
        Ok(Self {
            devices,
            hashers,
            rings,
            config,
            driver: driver_version()?,
            next_id: AtomicU64::new(1),
            live: Arc::new(Mutex::new(HashMap::new())),
        })
    }

    /// The opened devices.
    #[must_use]
    pub fn gpus(&self) -> &[Arc<Device>] {
        &self.devices
    }

    /// Device `gpu`, or [`CudaError::InvalidGpu`] (IV-002).
    ///
    /// # Errors
    /// [`CudaError::InvalidGpu`].
    pub fn gpu(&self, gpu: u32) -> Result<&Arc<Device>, CudaError> {
        usize::try_from(gpu)
            .ok()
            .and_then(|i| self.devices.get(i))
            .ok_or(CudaError::InvalidGpu {
                gpu,
                count: u32::try_from(self.devices.len()).unwrap_or(u32::MAX),
            })
    }

    /// The hasher of device `gpu` (kernel, digest workspaces, confined lanes).
    ///
    /// # Errors
    /// [`CudaError::InvalidGpu`].
    pub fn hasher(&self, gpu: u32) -> Result<&Arc<Hasher>, CudaError> {
        usize::try_from(gpu)
            .ok()
            .and_then(|i| self.hashers.get(i))
            .ok_or(CudaError::InvalidGpu {
                gpu,
                count: u32::try_from(self.hashers.len()).unwrap_or(u32::MAX),
            })
    }

    /// Frees what the backend keeps for reuse (digest workspaces: scratch VRAM and streams; the
    /// confined lanes). Free VRAM is then what it was before the first verification, minus live
    /// shards.
    pub fn trim_caches(&self) {
        for hasher in &self.hashers {
            hasher.trim();
        }
        for rings in &self.rings {
            rings.clear();
        }
    }

    /// Number of allocations of this backend still alive.
    #[must_use]
    pub fn live_allocations(&self) -> usize {
        let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        live.retain(|_, buffer| buffer.strong_count() > 0);
        live.len()
    }

    /// Flips bit `bit` (0 = least significant bit of byte 0) of a live allocation with a raw
    /// device write from outside the manager: a test tool simulating corrupted VRAM. Only built
    /// with the `fault-injection` feature (test builds), never into release binaries.
    ///
    /// # Errors
    /// [`VramError::Backend`] when the allocation is gone or `bit` is out of range.
    #[cfg(feature = "fault-injection")]
    pub fn flip_bit(&self, allocation: AllocationId, bit: u64) -> vram_residency::Result<()> {
        let buffer = {
            let live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
            live.get(&allocation).and_then(Weak::upgrade)
        }
        .ok_or_else(|| VramError::Backend {
            reason: "no live CUDA allocation with that id".to_owned(),
        })?;
        let offset = bit / 8;
        let mut byte = [0u8; 1];
        buffer.read(offset, &mut byte)?;
        byte[0] ^= 1u8 << (bit % 8);
        crate::fault::write_byte(&buffer, offset, byte[0])?;
        Ok(())
    }
}

impl Backend for CudaBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Cuda
    }

    fn devices(&self) -> vram_residency::Result<Vec<DeviceInfo>> {
        Ok(self
            .devices
            .iter()
            .map(|d| d.info())
            .collect::<Result<Vec<_>, _>>()?)
    }

    fn driver_version(&self) -> vram_residency::Result<String> {
        Ok(self.driver.clone())
    }

    fn allocate(
        &self,
        gpu: u32,
        bytes: u64,
        data_offset: u64,
    ) -> vram_residency::Result<Box<dyn DeviceBuffer>> {
        let device = Arc::clone(self.gpu(gpu)?);
        let hasher = Arc::clone(self.hasher(gpu)?);
        let rings = usize::try_from(gpu)
            .ok()
            .and_then(|i| self.rings.get(i))
            .map(Arc::clone)
            .ok_or(VramError::InvalidGpuIndex {
                gpu,
                count: u32::try_from(self.rings.len()).unwrap_or(u32::MAX),
            })?;
        let padding = image_padding(data_offset);
        let buffer = VramBuffer::alloc_padded(&device.ctx, bytes, padding).map_err(|error| {
            VramError::AllocationFailed {
                gpu,
                bytes,
                reason: error.to_string(),
            }
        })?;
        let buffer = Arc::new(buffer);
        let id = AllocationId(self.next_id.fetch_add(1, Ordering::Relaxed));
        self.live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, Arc::downgrade(&buffer));
        Ok(Box::new(CudaShard {
            device,
            hasher,
            rings,
            buffer,
            id,
            staging: self.config.staging,
            live: Arc::downgrade(&self.live),
        }))
    }
}

/// One shard's VRAM.
struct CudaShard {
    device: Arc<Device>,
    hasher: Arc<Hasher>,
    rings: Arc<RingPool>,
    buffer: Arc<VramBuffer>,
    id: AllocationId,
    staging: StagingConfig,
    live: Weak<Mutex<LiveMap>>,
}

impl Drop for CudaShard {
    fn drop(&mut self) {
        if let Some(live) = self.live.upgrade() {
            live.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&self.id);
        }
    }
}

impl DeviceBuffer for CudaShard {
    fn len(&self) -> u64 {
        self.buffer.len()
    }

    fn gpu(&self) -> u32 {
        self.device.index()
    }

    fn allocation_id(&self) -> AllocationId {
        self.id
    }

    fn upload(
        &mut self,
        source: &mut dyn Read,
        progress: &mut dyn FnMut(u64),
    ) -> vram_residency::Result<()> {
        Ok(staging::upload_reader(
            &self.buffer,
            source,
            &self.staging,
            progress,
        )?)
    }

    fn upload_file(
        &mut self,
        file: &std::fs::File,
        progress: &(dyn Fn(u64) + Sync),
    ) -> vram_residency::Result<()> {
        Ok(staging::upload_file(
            &self.buffer,
            file,
            &self.staging,
            &self.rings,
            progress,
        )?)
    }

    fn tree_digest(&self) -> vram_residency::Result<TreeDigest> {
        Ok(self.hasher.measure(&self.buffer)?)
    }

    fn digest(&self) -> vram_residency::Result<Digest> {
        Ok(self.hasher.digest(&self.buffer)?)
    }

    fn tree_digest_within(
        &self,
        budget: SmBudget,
    ) -> vram_residency::Result<(TreeDigest, Confinement)> {
        Ok(self.hasher.measure_within(&self.buffer, budget)?)
    }

    fn residency(&self) -> vram_residency::Result<Residency> {
        Ok(policy::pointer_facts(&self.buffer)?.verdict(self.device.index()))
    }

    fn weights(&self) -> vram_residency::Result<Weights<'_>> {
        Ok(Weights::device(
            self.device.index(),
            self.buffer.device_ptr(),
            self.buffer.len(),
        ))
    }

    fn read_prefix(&self, len: u64) -> vram_residency::Result<Vec<u8>> {
        let len = usize::try_from(len).map_err(|_| vram_residency::VramError::InvalidInput {
            field: "header length",
            reason: "does not fit in host memory".to_owned(),
        })?;
        let mut header = Vec::new();
        header
            .try_reserve_exact(len)
            .map_err(|_| vram_residency::VramError::InvalidInput {
                field: "header length",
                reason: format!("{len} bytes do not fit in host memory"),
            })?;
        header.resize(len, 0);
        self.buffer.read(0, &mut header)?;
        Ok(header)
    }
}
