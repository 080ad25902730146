//! Python exceptions: one base class, and a subclass for each failure a caller handles differently.
//! Messages are the library's own (never an address, a key or a token: MS-001).

use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::PyList;
use vram_residency::VramError;

pyo3::create_exception!(
    vram_residency,
    VramResidencyError,
    PyException,
    "Base class of every vram_residency error."
);
pyo3::create_exception!(
    vram_residency,
    CorruptionError,
    VramResidencyError,
    "The bytes in device memory changed since the seal: `.shard_id`, `.tensors` (the damaged \
     tensors' names) and `.ranges` (damaged byte ranges). The worker is stopped."
);
pyo3::create_exception!(
    vram_residency,
    ForgeryError,
    VramResidencyError,
    "A seal record or tag was altered (HMAC mismatch). The worker is stopped."
);
pyo3::create_exception!(
    vram_residency,
    PolicyViolationError,
    VramResidencyError,
    "The VRAM-only policy was violated. The worker is stopped."
);
pyo3::create_exception!(
    vram_residency,
    WorkerStoppedError,
    VramResidencyError,
    "The worker stopped after a security incident (or was closed); nothing runs until a new one."
);
pyo3::create_exception!(
    vram_residency,
    ShardInUseError,
    VramResidencyError,
    "The shard cannot be evicted while tensors lent from it are alive."
);
pyo3::create_exception!(
    vram_residency,
    MalformedModelError,
    VramResidencyError,
    "A model file does not parse as the format it claims (or as the one asked for)."
);
pyo3::create_exception!(
    vram_residency,
    DigestMismatchError,
    VramResidencyError,
    "The digest measured in device memory is not the expected one; nothing was sealed."
);
pyo3::create_exception!(
    vram_residency,
    CheckpointError,
    VramResidencyError,
    "A checkpoint directory is inconsistent (index and files disagree, duplicate tensors...)."
);
pyo3::create_exception!(
    vram_residency,
    TensorNotLendableError,
    VramResidencyError,
    "A tensor cannot be lent without a copy (not aligned to its element size)."
);

/// The Python exception for a library error.
pub fn to_py(py: Python<'_>, error: VramError) -> PyErr {
    let message = error.to_string();
    match error {
        // A shard of a model failed: raised as that failure (CorruptionError naming its tensors,
        // ForgeryError, ...), with the model-level message that names the shard index.
        VramError::ModelShardFailed { error, .. } => {
            let err = to_py(py, *error);
            let value = err.value(py);
            match value.setattr("args", (message,)) {
                Ok(()) => err,
                Err(e) => e,
            }
        }
        VramError::Corruption {
            shard_id,
            damaged,
            tensors,
        } => {
            let err = CorruptionError::new_err(message);
            let value = err.value(py);
            let ranges: Vec<(u64, u64)> = damaged.iter().map(|r| (r.start, r.end)).collect();
            let attrs = (|| -> PyResult<()> {
                value.setattr("shard_id", shard_id.to_string())?;
                value.setattr("tensors", PyList::new(py, &tensors)?)?;
                value.setattr("ranges", PyList::new(py, ranges)?)?;
                Ok(())
            })();
            match attrs {
                Ok(()) => err,
                Err(e) => e,
            }
        }
        VramError::SealForgery { .. } | VramError::ModelSealForgery { .. } => {
            ForgeryError::new_err(message)
        }
        VramError::PolicyViolation { .. } => PolicyViolationError::new_err(message),
        VramError::WorkerStopped { .. } => WorkerStoppedError::new_err(message),
        VramError::ShardInUse { .. } => ShardInUseError::new_err(message),
        VramError::MalformedModel(_) | VramError::EmptyModel => {
            MalformedModelError::new_err(message)
        }
        VramError::DigestMismatch { .. } => DigestMismatchError::new_err(message),
        _ => VramResidencyError::new_err(message),
    }
}

/// Adds the exception classes to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("VramResidencyError", py.get_type::<VramResidencyError>())?;
    m.add("CorruptionError", py.get_type::<CorruptionError>())?;
    m.add("ForgeryError", py.get_type::<ForgeryError>())?;
    m.add(
        "PolicyViolationError",
        py.get_type::<PolicyViolationError>(),
    )?;
    m.add("WorkerStoppedError", py.get_type::<WorkerStoppedError>())?;
    m.add("ShardInUseError", py.get_type::<ShardInUseError>())?;
    m.add("MalformedModelError", py.get_type::<MalformedModelError>())?;
    m.add("DigestMismatchError", py.get_type::<DigestMismatchError>())?;
    m.add("CheckpointError", py.get_type::<CheckpointError>())?;
    m.add(
        "TensorNotLendableError",
        py.get_type::<TensorNotLendableError>(),
    )?;
    Ok(())
}
