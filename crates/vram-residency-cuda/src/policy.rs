//! The VRAM-only policy, checked on the pointer itself (VP-001, VP-003, VP-005): after every
//! allocation and at every verification the driver must say the shard's memory is plain device
//! memory (`CU_POINTER_ATTRIBUTE_MEMORY_TYPE` = DEVICE), not managed (`IS_MANAGED` = 0), and on the
//! expected GPU. Unified virtual addressing is not a violation: every modern GPU has it, and it is
//! not unified (managed) memory.

use cudarc::driver::sys;
use vram_residency::Residency;

use crate::error::{CudaError, Result};
use crate::vram::VramBuffer;

/// The facts the driver reports about a device address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PointerFacts {
    /// `CU_POINTER_ATTRIBUTE_MEMORY_TYPE` (1 host, 2 device, 3 array, 4 unified).
    pub memory_type: u64,
    /// `CU_POINTER_ATTRIBUTE_IS_MANAGED` (non-zero for managed memory).
    pub is_managed: u64,
    /// `CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL`.
    pub device_ordinal: u64,
}

/// `CU_MEMORYTYPE_DEVICE`.
const MEMORY_TYPE_DEVICE: u64 = sys::CUmemorytype::CU_MEMORYTYPE_DEVICE as u64;

impl PointerFacts {
    /// The policy verdict for memory expected on GPU `gpu`.
    #[must_use]
    pub fn verdict(&self, gpu: u32) -> Residency {
        if self.memory_type != MEMORY_TYPE_DEVICE {
            return Residency::Violation(format!(
                "memory type {} is not device memory (VP-001)",
                self.memory_type
            ));
        }
        if self.is_managed != 0 {
            return Residency::Violation("memory is managed (unified) memory (VP-003)".to_owned());
        }
        if self.device_ordinal != u64::from(gpu) {
            return Residency::Violation(format!(
                "memory is on GPU {}, not on GPU {gpu}",
                self.device_ordinal
            ));
        }
        Residency::DeviceMemory
    }
}

/// Asks the driver where `buffer`'s memory lives.
///
/// # Errors
/// [`CudaError::Driver`] when a query fails.
pub fn pointer_facts(buffer: &VramBuffer) -> Result<PointerFacts> {
    buffer
        .context()
        .bind_to_thread()
        .map_err(CudaError::driver("cuCtxSetCurrent"))?;
    let ptr = buffer.device_ptr();
    let query = |attribute: sys::CUpointer_attribute, call: &'static str| -> Result<u64> {
        // The attributes are 4-byte values (an enum, an unsigned int, an int); a zeroed u64 holds
        // whatever the driver writes into its low bytes (little-endian x86-64 and aarch64).
        let mut value: u64 = 0;
        // SAFETY: `value` is a valid, writable 8-byte location for the duration of the call, large
        // enough for each queried attribute; `ptr` is an address this process allocated and still
        // owns (the buffer is borrowed), and the owning context is current.
        unsafe { sys::cuPointerGetAttribute((&raw mut value).cast(), attribute, ptr) }
            .result()
            .map_err(CudaError::driver(call))?;
        Ok(value)
    };
    Ok(PointerFacts {
        memory_type: query(
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
            "cuPointerGetAttribute(MEMORY_TYPE)",
        )?,
        is_managed: query(
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_IS_MANAGED,
            "cuPointerGetAttribute(IS_MANAGED)",
        )?,
        device_ordinal: query(
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
            "cuPointerGetAttribute(DEVICE_ORDINAL)",
        )?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_device_memory_on_the_right_gpu_passes_vp_001_003_005() {
        let good = PointerFacts {
            memory_type: MEMORY_TYPE_DEVICE,
            is_managed: 0,
            device_ordinal: 1,
        };
        assert_eq!(good.verdict(1), Residency::DeviceMemory);
        let host = PointerFacts {
            memory_type: sys::CUmemorytype::CU_MEMORYTYPE_HOST as u64,
            ..good
        };
        assert!(matches!(host.verdict(1), Residency::Violation(r) if r.contains("VP-001")));
        let unified = PointerFacts {
            memory_type: sys::CUmemorytype::CU_MEMORYTYPE_UNIFIED as u64,
            ..good
        };
        assert!(matches!(unified.verdict(1), Residency::Violation(_)));
        let managed = PointerFacts {
            is_managed: 1,
            ..good
        };
        assert!(matches!(managed.verdict(1), Residency::Violation(r) if r.contains("VP-003")));
        assert!(matches!(good.verdict(0), Residency::Violation(r) if r.contains("GPU 1")));
    }
}
