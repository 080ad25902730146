//! Capacity admission (RP-001..RP-004, VP-004).
//!
//! The ledger knows each device's capacity, the configured headroom and what is admitted. Admission
//! checks and reserves under one lock, so concurrent seals can never together exceed a device. A
//! [`Reservation`] is an RAII guard held by the shard: however the shard ends (deallocate, drop, a
//! failed seal), its bytes and its id are returned exactly once.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::error::{Result, VramError};
use crate::ids::ShardId;

#[derive(Debug)]
struct DeviceState {
    total: u64,
    used: u64,
}

#[derive(Debug)]
struct LedgerState {
    devices: Vec<DeviceState>,
    headroom: u64,
    ids: HashSet<ShardId>,
}

/// Per-device capacity accounting shared by a manager and its shards.
#[derive(Debug)]
pub struct CapacityLedger {
    state: Mutex<LedgerState>,
}

/// A capacity snapshot of one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Capacity {
    /// Device capacity in bytes.
    pub total: u64,
    /// Bytes admitted.
    pub used: u64,
    /// Bytes that can still be admitted: `total - headroom - used`, floored at 0.
    pub available: u64,
}

impl CapacityLedger {
    /// A ledger for devices of the given capacities, keeping `headroom` bytes free on each.
    #[must_use]
    pub fn new(totals: &[u64], headroom: u64) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(LedgerState {
                devices: totals
                    .iter()
                    .map(|&total| DeviceState { total, used: 0 })
                    .collect(),
                headroom,
                ids: HashSet::new(),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, LedgerState> {
        // A poisoned lock only means another thread panicked while holding it; the counters it
        // protects are updated in single statements, so the state is still consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Number of devices.
    #[must_use]
    pub fn device_count(&self) -> u32 {
        u32::try_from(self.lock().devices.len()).unwrap_or(u32::MAX)
    }

    /// Snapshot of device `gpu`.
    ///
    /// # Errors
    /// [`VramError::InvalidGpuIndex`].
    pub fn capacity(&self, gpu: u32) -> Result<Capacity> {
        let state = self.lock();
        let count = u32::try_from(state.devices.len()).unwrap_or(u32::MAX);
        let device = usize::try_from(gpu)
            .ok()
            .and_then(|i| state.devices.get(i))
            .ok_or(VramError::InvalidGpuIndex { gpu, count })?;
        Ok(Capacity {
            total: device.total,
            used: device.used,
            available: available(device, state.headroom),
        })
    }

    /// Atomically checks that `bytes` fit on `gpu` and that `shard_id` is unused, and reserves both.
    ///
    /// # Errors
    /// [`VramError::InvalidGpuIndex`], [`VramError::DuplicateShardId`] or
    /// [`VramError::InsufficientVram`]; nothing is reserved then.
    pub fn reserve(
        self: &Arc<Self>,
        gpu: u32,
        bytes: u64,
        shard_id: &ShardId,
    ) -> Result<Reservation> {
        let mut state = self.lock();
        let count = u32::try_from(state.devices.len()).unwrap_or(u32::MAX);
        let headroom = state.headroom;
        if state.ids.contains(shard_id) {
            return Err(VramError::DuplicateShardId {
                shard_id: shard_id.clone(),
            });
        }
        let device = usize::try_from(gpu)
            .ok()
            .and_then(|i| state.devices.get_mut(i))
            .ok_or(VramError::InvalidGpuIndex { gpu, count })?;
        let free = available(device, headroom);
        if bytes > free {
            return Err(VramError::InsufficientVram {
                gpu,
                needed: bytes,
                available: free,
            });
        }
        // Cannot saturate: bytes <= total - headroom - used.
        device.used = device.used.saturating_add(bytes);
        state.ids.insert(shard_id.clone());
        Ok(Reservation {
            ledger: Arc::clone(self),
            gpu,
            bytes,
            shard_id: shard_id.clone(),
        })
    }

    fn release(&self, gpu: u32, bytes: u64, shard_id: &ShardId) {
        let mut state = self.lock();
        state.ids.remove(shard_id);
        if let Some(device) = usize::try_from(gpu)
            .ok()
            .and_then(|i| state.devices.get_mut(i))
        {
            device.used = device.used.saturating_sub(bytes);
        }
    }
}

fn available(device: &DeviceState, headroom: u64) -> u64 {
    device
        .total
        .saturating_sub(headroom)
        .saturating_sub(device.used)
}

/// Admitted capacity for one shard; returned to the ledger when dropped.
#[derive(Debug)]
pub struct Reservation {
    ledger: Arc<CapacityLedger>,
    gpu: u32,
    bytes: u64,
    shard_id: ShardId,
}

impl Reservation {
    /// Reserved bytes.
    #[must_use]
    pub const fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.ledger.release(self.gpu, self.bytes, &self.shard_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> ShardId {
        ShardId::new(s).unwrap()
    }

    #[test]
    fn admission_respects_headroom_and_is_released_on_drop_rp_001() {
        let ledger = CapacityLedger::new(&[1000, 500], 100);
        let a = ledger.reserve(0, 600, &id("a")).unwrap();
        assert_eq!(ledger.capacity(0).unwrap().available, 300);
        assert!(matches!(
            ledger.reserve(0, 301, &id("b")),
            Err(VramError::InsufficientVram {
                needed: 301,
                available: 300,
                ..
            })
        ));
        let b = ledger.reserve(0, 300, &id("b")).unwrap();
        assert_eq!(ledger.capacity(0).unwrap().available, 0);
        drop(a);
        drop(b);
        assert_eq!(ledger.capacity(0).unwrap().used, 0);
    }

    #[test]
    fn duplicate_ids_and_bad_gpus_reserve_nothing() {
        let ledger = CapacityLedger::new(&[1000], 0);
        let _a = ledger.reserve(0, 10, &id("a")).unwrap();
        assert!(matches!(
            ledger.reserve(0, 10, &id("a")),
            Err(VramError::DuplicateShardId { .. })
        ));
        assert!(matches!(
            ledger.reserve(3, 10, &id("c")),
            Err(VramError::InvalidGpuIndex { gpu: 3, count: 1 })
        ));
        assert_eq!(ledger.capacity(0).unwrap().used, 10);
    }

    #[test]
    fn huge_requests_do_not_overflow_rp_002_ms_003() {
        let ledger = CapacityLedger::new(&[u64::MAX], 0);
        let _a = ledger.reserve(0, u64::MAX - 1, &id("a")).unwrap();
        assert!(ledger.reserve(0, u64::MAX, &id("b")).is_err());
        assert!(ledger.reserve(0, 2, &id("c")).is_err());
        assert!(ledger.reserve(0, 1, &id("d")).is_ok());
    }

    #[test]
    fn concurrent_admissions_never_exceed_capacity() {
        let ledger = CapacityLedger::new(&[1000], 0);
        let admitted: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|t| {
                    let ledger = &ledger;
                    s.spawn(move || {
                        (0..50)
                            .filter_map(|i| ledger.reserve(0, 7, &id(&format!("t{t}-{i}"))).ok())
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect()
        });
        assert_eq!(admitted.len(), 1000 / 7);
        assert_eq!(ledger.capacity(0).unwrap().used, 7 * (1000 / 7));
    }
}
