//! Choosing and building a backend.

use std::sync::Arc;

use vram_residency::{Backend, BackendKind, SimBackend, SimConfig, VramError};

/// Settings of the simulated backend (only used with `--backend sim`).
#[derive(Debug, Clone, Copy)]
pub struct SimSettings {
    pub devices: u32,
    pub bytes_per_device: u64,
}

/// Builds the requested backend.
///
/// `cuda` is the default and the only backend for production, but this build does not contain it
/// yet; asking for it is a clear error rather than a silent fallback to `sim`.
pub fn open(kind: BackendKind, sim: SimSettings) -> Result<Arc<dyn Backend>, VramError> {
    match kind {
        BackendKind::Sim => Ok(Arc::new(SimBackend::new(SimConfig {
            devices: sim.devices,
            bytes_per_device: sim.bytes_per_device,
        }))),
        BackendKind::Cuda => Err(cuda_unavailable()),
    }
}

/// Why `cuda` cannot be used by this build.
pub fn cuda_unavailable() -> VramError {
    VramError::BackendUnavailable {
        backend: "cuda",
        reason: "this build does not include the CUDA backend yet (planned as the \
                 vram-residency-cuda crate); pass --backend sim to use the simulated backend, \
                 which is NOT real VRAM residency"
            .to_owned(),
    }
}
