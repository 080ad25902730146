//! Choosing and building a backend.

use std::sync::Arc;

use vram_residency::{Backend, BackendKind, SimBackend, SimConfig, VramError};
use vram_residency_cuda::{CudaBackend, CudaConfig};

/// Settings of the simulated backend (only used with `--backend sim`).
#[derive(Debug, Clone, Copy)]
pub struct SimSettings {
    pub devices: u32,
    pub bytes_per_device: u64,
}

/// Builds the requested backend. `cuda` is the default and the only backend for production; when
/// it cannot be opened (no driver, no GPU) that is a clear error, never a silent fallback to `sim`.
pub fn open(
    kind: BackendKind,
    sim: SimSettings,
    cuda: CudaConfig,
) -> Result<Arc<dyn Backend>, VramError> {
    match kind {
        BackendKind::Sim => Ok(Arc::new(SimBackend::new(SimConfig {
            devices: sim.devices,
            bytes_per_device: sim.bytes_per_device,
        }))),
        BackendKind::Cuda => Ok(Arc::new(open_cuda(cuda)?)),
    }
}

/// Opens the CUDA backend (driver, devices).
pub fn open_cuda(config: CudaConfig) -> Result<CudaBackend, VramError> {
    CudaBackend::new(config).map_err(VramError::from)
}
