//! The simulated backend: "device memory" in host RAM.
//!
//! For machines without a GPU (development, CI, the demo). It behaves like the real backend — devices,
//! capacity, allocations, upload, digest where the bytes live — but it is **not residency**: every record
//! made on it says `backend: sim`, and [`Residency::Simulated`] is its only policy verdict.
//!
//! [`SimBackend::flip_bit`] changes a byte of an allocation from outside the manager, the way a faulty
//! DIMM, a driver bug or an attacker with device access would; the demo and the tests use it to show
//! that verification catches it.

use std::collections::HashMap;
use std::io::Read;
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, Weak};

use zeroize::Zeroize as _;

use crate::backend::{
    AllocationId, Backend, BackendKind, DeviceBuffer, DeviceInfo, Residency, Weights,
};
use crate::digest::{TreeDigest, digest_bytes, read_full};
use crate::error::{Result, VramError};

/// Upload granularity (for progress reporting).
const UPLOAD_CHUNK: usize = 8 << 20;

/// Shape of the simulated machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimConfig {
    /// Number of simulated devices.
    pub devices: u32,
    /// Simulated memory per device, in bytes.
    pub bytes_per_device: u64,
}

impl Default for SimConfig {
    /// One device of 4 GiB.
    fn default() -> Self {
        Self {
            devices: 1,
            bytes_per_device: 4 << 30,
        }
    }
}

type Memory = Arc<RwLock<Vec<u8>>>;

struct LiveAllocation {
    gpu: u32,
    bytes: u64,
    memory: Weak<RwLock<Vec<u8>>>,
}

struct SimInner {
    config: SimConfig,
    next_id: AtomicU64,
    live: Mutex<HashMap<AllocationId, LiveAllocation>>,
}

/// The simulated backend. Cheap to clone; clones share the same simulated devices.
#[derive(Clone)]
pub struct SimBackend {
    inner: Arc<SimInner>,
}

impl std::fmt::Debug for SimBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimBackend")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl SimBackend {
    /// A simulated machine of the given shape.
    #[must_use]
    pub fn new(config: SimConfig) -> Self {
        Self {
            inner: Arc::new(SimInner {
                config,
                next_id: AtomicU64::new(1),
                live: Mutex::new(HashMap::new()),
            }),
        }
    }

    fn used(&self, gpu: u32) -> u64 {
        used_on(
            &self
                .inner
                .live
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
            gpu,
        )
    }

    /// Flips bit `bit` (0 = least significant bit of byte 0) of an allocation, from outside the
    /// manager. A test and demo tool: it simulates corruption of device memory.
    ///
    /// # Errors
    /// [`VramError::Backend`] when the allocation does not exist or `bit` is out of range.
    pub fn flip_bit(&self, allocation: AllocationId, bit: u64) -> Result<()> {
        let memory = {
            let live = self
                .inner
                .live
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            live.get(&allocation).and_then(|a| a.memory.upgrade())
        }
        .ok_or_else(|| VramError::Backend {
            reason: "no live sim allocation with that id".to_owned(),
        })?;
        let mut bytes = memory.write().unwrap_or_else(PoisonError::into_inner);
        let byte = usize::try_from(bit / 8)
            .ok()
            .and_then(|index| bytes.get_mut(index))
            .ok_or_else(|| VramError::Backend {
                reason: "bit index beyond the allocation".to_owned(),
            })?;
        *byte ^= 1u8 << (bit % 8);
        Ok(())
    }

    /// Device UUID of simulated device `gpu`: the ASCII bytes `SIM-GPU-` and the index in 8 hex digits,
    /// recognisable at a glance in any record.
    #[must_use]
    pub fn device_uuid(gpu: u32) -> [u8; 16] {
        let mut uuid = *b"SIM-GPU-00000000";
        let digits = format!("{gpu:08x}");
        for (slot, digit) in uuid.iter_mut().skip(8).zip(digits.bytes()) {
            *slot = digit;
        }
        uuid
    }
}

fn used_on(live: &HashMap<AllocationId, LiveAllocation>, gpu: u32) -> u64 {
    live.values()
        .filter(|a| a.gpu == gpu)
        .map(|a| a.bytes)
        .fold(0u64, u64::saturating_add)
}

impl Backend for SimBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Sim
    }

    fn devices(&self) -> Result<Vec<DeviceInfo>> {
        Ok((0..self.inner.config.devices)
            .map(|index| DeviceInfo {
                index,
                name: format!("sim device {index} (host memory, not a GPU)"),
                uuid: Self::device_uuid(index),
                total_bytes: self.inner.config.bytes_per_device,
                free_bytes: self
                    .inner
                    .config
                    .bytes_per_device
                    .saturating_sub(self.used(index)),
                compute_capability: None,
                ecc_enabled: None,
                integrated: None,
                unified_memory: None,
            })
            .collect())
    }

    fn driver_version(&self) -> Result<String> {
        Ok("sim".to_owned())
    }

    /// `data_offset` is ignored: host memory from the allocator is 16-byte aligned, which is all
    /// that lending views to numpy needs (the `cuda` backend pads; see [`crate::backend::image_padding`]).
    fn allocate(&self, gpu: u32, bytes: u64, _data_offset: u64) -> Result<Box<dyn DeviceBuffer>> {
        if gpu >= self.inner.config.devices {
            return Err(VramError::InvalidGpuIndex {
                gpu,
                count: self.inner.config.devices,
            });
        }
        let failed = |reason: String| VramError::AllocationFailed { gpu, bytes, reason };
        // Check and insert under one lock so concurrent allocations cannot oversubscribe the device.
        let mut live = self
            .inner
            .live
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let free = self
            .inner
            .config
            .bytes_per_device
            .saturating_sub(used_on(&live, gpu));
        if bytes > free {
            return Err(failed(format!(
                "only {} free on the sim device",
                crate::ids::bytes(free)
            )));
        }
        let len = usize::try_from(bytes).map_err(|_| failed("size exceeds usize".to_owned()))?;
        let mut memory = Vec::new();
        memory
            .try_reserve_exact(len)
            .map_err(|e| failed(format!("host allocation failed: {e}")))?;
        memory.resize(len, 0);
        let memory: Memory = Arc::new(RwLock::new(memory));
        let id = AllocationId(self.inner.next_id.fetch_add(1, Ordering::Relaxed));
        live.insert(
            id,
            LiveAllocation {
                gpu,
                bytes,
                memory: Arc::downgrade(&memory),
            },
        );
        drop(live);
        Ok(Box::new(SimBuffer {
            id,
            gpu,
            memory,
            owner: Arc::downgrade(&self.inner),
        }))
    }
}

struct SimBuffer {
    id: AllocationId,
    gpu: u32,
    memory: Memory,
    owner: Weak<SimInner>,
}

impl SimBuffer {
    fn read(&self) -> RwLockReadGuard<'_, Vec<u8>> {
        self.memory.read().unwrap_or_else(PoisonError::into_inner)
    }
}

impl DeviceBuffer for SimBuffer {
    fn len(&self) -> u64 {
        self.read().len() as u64
    }

    fn gpu(&self) -> u32 {
        self.gpu
    }

    fn allocation_id(&self) -> AllocationId {
        self.id
    }

    fn upload(&mut self, source: &mut dyn Read, progress: &mut dyn FnMut(u64)) -> Result<()> {
        let mut memory = self.memory.write().unwrap_or_else(PoisonError::into_inner);
        let expected = memory.len() as u64;
        let mut done: u64 = 0;
        for chunk in memory.chunks_mut(UPLOAD_CHUNK) {
            let n = read_full(source, chunk).map_err(|source| VramError::Io {
                path: "<model source>".into(),
                source,
            })?;
            done = done.saturating_add(n as u64);
            if n < chunk.len() {
                return Err(VramError::SourceChanged {
                    expected,
                    actual: done,
                });
            }
            progress(done);
        }
        let mut probe = [0u8; 1];
        let extra = read_full(source, &mut probe).map_err(|source| VramError::Io {
            path: "<model source>".into(),
            source,
        })?;
        if extra > 0 {
            return Err(VramError::SourceChanged {
                expected,
                actual: expected.saturating_add(1),
            });
        }
        Ok(())
    }

    fn tree_digest(&self) -> Result<TreeDigest> {
        digest_bytes(&self.read())
    }

    fn residency(&self) -> Result<Residency> {
        Ok(Residency::Simulated)
    }

    fn weights(&self) -> Result<Weights<'_>> {
        Ok(Weights::host(Box::new(HostView(self.read()))))
    }

    fn read_prefix(&self, len: u64) -> Result<Vec<u8>> {
        let memory = self.read();
        usize::try_from(len)
            .ok()
            .and_then(|len| memory.get(..len))
            .map(<[u8]>::to_vec)
            .ok_or_else(|| VramError::InvalidInput {
                field: "header length",
                reason: format!("{len} bytes is more than the buffer holds"),
            })
    }
}

struct HostView<'a>(RwLockReadGuard<'a, Vec<u8>>);

impl Deref for HostView<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for SimBuffer {
    fn drop(&mut self) {
        // Scrub the simulated device memory, as a careful driver would, and forget the allocation.
        self.memory
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .zeroize();
        if let Some(owner) = self.owner.upgrade() {
            owner
                .live
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_upload_digest_and_free() {
        let sim = SimBackend::new(SimConfig {
            devices: 2,
            bytes_per_device: 1 << 20,
        });
        let data = vec![5u8; 10_000];
        let mut buf = sim.allocate(1, data.len() as u64, 0).unwrap();
        buf.upload(&mut &data[..], &mut |_| {}).unwrap();
        assert_eq!(buf.tree_digest().unwrap(), digest_bytes(&data).unwrap());
        assert_eq!(sim.devices().unwrap()[1].free_bytes, (1 << 20) - 10_000);
        drop(buf);
        assert_eq!(sim.devices().unwrap()[1].free_bytes, 1 << 20);
    }

    #[test]
    fn short_and_long_sources_are_refused() {
        let sim = SimBackend::new(SimConfig::default());
        let mut buf = sim.allocate(0, 100, 0).unwrap();
        let short = [1u8; 99];
        assert!(matches!(
            buf.upload(&mut &short[..], &mut |_| {}),
            Err(VramError::SourceChanged { .. })
        ));
        let long = [1u8; 101];
        assert!(matches!(
            buf.upload(&mut &long[..], &mut |_| {}),
            Err(VramError::SourceChanged { .. })
        ));
    }

    #[test]
    fn bad_gpu_and_oversize_allocations_fail_cleanly() {
        let sim = SimBackend::new(SimConfig {
            devices: 1,
            bytes_per_device: 1000,
        });
        assert!(matches!(
            sim.allocate(1, 10, 0),
            Err(VramError::InvalidGpuIndex { gpu: 1, count: 1 })
        ));
        assert!(matches!(
            sim.allocate(0, 1001, 0),
            Err(VramError::AllocationFailed { .. })
        ));
    }

    #[test]
    fn flip_bit_changes_exactly_one_bit() {
        let sim = SimBackend::new(SimConfig::default());
        let mut buf = sim.allocate(0, 16, 0).unwrap();
        buf.upload(&mut &[0u8; 16][..], &mut |_| {}).unwrap();
        sim.flip_bit(buf.allocation_id(), 13).unwrap();
        let w = buf.weights().unwrap();
        let bytes = w.host_bytes().unwrap();
        assert_eq!(bytes[1], 0b0010_0000);
        assert_eq!(bytes.iter().map(|b| b.count_ones()).sum::<u32>(), 1);
        drop(w);
        assert!(sim.flip_bit(buf.allocation_id(), 16 * 8).is_err());
    }
}
