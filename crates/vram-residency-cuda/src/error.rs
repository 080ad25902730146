//! The crate's one error type, and its mapping onto the core's [`VramError`].

use cudarc::driver::DriverError;
use vram_residency::VramError;

/// What can go wrong in the CUDA backend. No variant carries a device address (MS-001).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CudaError {
    /// The CUDA driver library (`libcuda.so`) could not be found: no NVIDIA driver on this host.
    #[error(
        "the NVIDIA driver library (libcuda.so) was not found; install the NVIDIA driver, or use \
         --backend sim (NOT real VRAM residency)"
    )]
    DriverMissing,
    /// NVRTC (`libnvrtc.so`) could not be found, so the hashing kernel cannot be compiled.
    #[error(
        "NVRTC (libnvrtc.so) was not found on the library path; install the CUDA toolkit's NVRTC \
         and make libnvrtc.so (or libnvrtc.so.12) resolvable, e.g. via LD_LIBRARY_PATH"
    )]
    NvrtcMissing,
    /// The driver is present but found no CUDA device.
    #[error("the CUDA driver reports no device")]
    NoDevice,
    /// A device index outside `0..count`.
    #[error("GPU index {gpu} out of range: this host has {count} CUDA device(s)")]
    InvalidGpu {
        /// Requested index.
        gpu: u32,
        /// Number of devices.
        count: u32,
    },
    /// A driver call failed.
    #[error("CUDA driver call {call} failed: {source}")]
    Driver {
        /// Which operation.
        call: &'static str,
        /// The driver's error.
        source: DriverError,
    },
    /// The kernel did not compile (NVRTC log attached).
    #[error("NVRTC could not compile the fs-verity kernel: {log}")]
    Compile {
        /// Compiler output.
        log: String,
    },
    /// An offset/length outside a buffer (MS-002/003/006/007), or arithmetic that would overflow.
    #[error("out of bounds: {what}")]
    OutOfBounds {
        /// What was attempted.
        what: &'static str,
    },
    /// A staging reader thread died unexpectedly.
    #[error("internal error: {0}")]
    Internal(&'static str),
    /// The driver or device cannot do what was asked (e.g. green contexts on an old driver).
    #[error("not supported here: {0}")]
    Unsupported(String),
    /// Reading the model file failed.
    #[error("reading the model file failed: {0}")]
    Io(#[from] std::io::Error),
    /// The file ended early or changed size while it was read.
    #[error("the model file changed while it was read: expected {}, saw {actual}", vram_residency::ids::bytes(*expected))]
    SourceChanged {
        /// Bytes expected.
        expected: u64,
        /// Bytes found.
        actual: u64,
    },
}

impl CudaError {
    /// Wraps a driver error with the name of the call.
    pub(crate) fn driver(call: &'static str) -> impl FnOnce(DriverError) -> Self {
        move |source| Self::Driver { call, source }
    }
}

impl From<CudaError> for VramError {
    fn from(error: CudaError) -> Self {
        match error {
            CudaError::DriverMissing | CudaError::NvrtcMissing | CudaError::NoDevice => {
                Self::BackendUnavailable {
                    backend: "cuda",
                    reason: error.to_string(),
                }
            }
            CudaError::InvalidGpu { gpu, count } => Self::InvalidGpuIndex { gpu, count },
            CudaError::SourceChanged { expected, actual } => {
                Self::SourceChanged { expected, actual }
            }
            CudaError::Io(source) => Self::Io {
                path: "model file".into(),
                source,
            },
            other => Self::Backend {
                reason: other.to_string(),
            },
        }
    }
}

/// Result with [`CudaError`].
pub type Result<T> = std::result::Result<T, CudaError>;
