//! One tensor of a sealed shard, exported with DLPack without a copy: `torch.from_dlpack(view)`
//! gives a CUDA tensor whose storage **is** the sealed allocation (`np.from_dlpack` a read-only
//! array of the `sim` backend's host memory).
//!
//! Lifetime: every exported capsule owns a clone of the shard's [`Lease`], released by the DLPack
//! deleter, so the memory outlives every consumer tensor; evicting the shard is refused until then.
//! This module holds the crate's only `unsafe`: finishing the DLPack descriptors.

use std::ffi::c_void;

use dlpark::ffi::{
    DLDataType, DLDataTypeCode, DLDevice, DLManagedTensor, DLManagedTensorVersioned,
};
use dlpark::metadata::Dynamic;
use dlpark::python::{DlpackExporter, ExportRequest, export_dlpack};
use dlpark::{DlpackFlags, Managed, ManagedTensorBase};
use pyo3::prelude::*;
use pyo3::types::PyTuple;
use vram_residency::{ElementKind, Lease, Location, TensorLayout, TensorView};

use crate::errors::{TensorNotLendableError, VramResidencyError};

/// One tensor of a sealed shard, lendable through DLPack (`__dlpack__`, `__dlpack_device__`).
#[pyclass(frozen, module = "vram_residency._native", name = "Tensor")]
pub struct Tensor {
    lease: Lease,
    name: String,
    dtype: String,
    layout: TensorLayout,
    offset: u64,
    nbytes: u64,
}

impl Tensor {
    /// The view of `view` in `lease`.
    pub fn new(lease: &Lease, view: &TensorView<'_>) -> PyResult<Self> {
        let layout = view
            .layout()
            .map_err(|e| VramResidencyError::new_err(e.to_string()))?;
        Ok(Self {
            lease: lease.clone(),
            name: view.name().to_owned(),
            dtype: view.info().dtype.clone(),
            layout,
            offset: view.offset(),
            nbytes: view.bytes(),
        })
    }

    /// Tensor name.
    pub fn name_str(&self) -> &str {
        &self.name
    }

    fn dl_device(&self) -> PyResult<DLDevice> {
        match self.lease.location() {
            Location::Host { .. } => Ok(DLDevice::CPU),
            Location::Device { gpu, .. } => i32::try_from(gpu)
                .map(DLDevice::cuda)
                .map_err(|_| VramResidencyError::new_err("device ordinal out of range")),
        }
    }

    /// The tensor's first byte, checked to be aligned to its element size: a tensor that is not
    /// cannot be lent without a copy, and this package never copies.
    fn address(&self) -> PyResult<u64> {
        let address = self.lease.location().address_at(self.offset);
        let align = self.layout.element.bytes().max(1);
        if !address.is_multiple_of(align) {
            return Err(TensorNotLendableError::new_err(format!(
                "tensor {:?} ({}, at file offset {}) is not aligned to its {align}-byte elements in \
                 memory; it cannot be lent without a copy",
                self.name, self.dtype, self.offset
            )));
        }
        Ok(address)
    }

    fn dl_dtype(&self) -> DLDataType {
        let element = self.layout.element;
        let code = match element.kind {
            ElementKind::Float => DLDataTypeCode::FLOAT,
            ElementKind::BFloat => DLDataTypeCode::BFLOAT,
            ElementKind::Int => DLDataTypeCode::INT,
            ElementKind::UInt => DLDataTypeCode::UINT,
            ElementKind::Bool => DLDataTypeCode::BOOL,
        };
        DLDataType::scalar(code, element.bits)
    }

    fn managed<M: ManagedTensorBase>(&self, flags: DlpackFlags) -> PyResult<Managed<M>> {
        let address = self.address()?;
        let data = usize::try_from(address)
            .map_err(|_| VramResidencyError::new_err("address out of range"))?;
        let shape = self
            .layout
            .shape
            .iter()
            .map(|&d| i64::try_from(d))
            .collect::<Result<Vec<i64>, _>>()
            .map_err(|_| VramResidencyError::new_err("dimension out of range"))?;
        let prepared = Dynamic::compact(shape)
            .prepare_as::<M>()
            .map_err(|e| VramResidencyError::new_err(e.to_string()))?;
        // The capsule's context: a clone of the lease, dropped by the DLPack deleter.
        let mut initialized = prepared.initialize(Box::new(self.lease.clone()));
        initialized
            .set_data(std::ptr::with_exposed_provenance_mut::<c_void>(data))
            .set_device(self.dl_device()?)
            .set_dtype(self.dl_dtype());
        initialized
            .set_flags(flags)
            .map_err(|e| VramResidencyError::new_err(e.to_string()))?;
        // SAFETY: the data pointer is the tensor's first byte inside the shard's allocation
        // (sealed table offset, bounds checked when the table was parsed), aligned to its element
        // size (checked above); shape and compact strides cover exactly its `nbytes` bytes
        // (checked by `TensorView::layout`); the context owns a lease, which keeps the allocation
        // alive until the consumer calls the deleter; the flags say read-only for host memory and
        // nothing else (no IS_COPIED: this is the sealed memory itself).
        Ok(unsafe { initialized.finish() })
    }

    fn flags(&self) -> DlpackFlags {
        match self.lease.location() {
            // The sim's host memory: numpy must not write into "sealed" bytes by accident.
            Location::Host { .. } => DlpackFlags::READ_ONLY,
            // CUDA consumers (torch) take device tensors as writable storage; the seal, not a
            // flag, is what protects them (verified before every request).
            Location::Device { .. } => DlpackFlags::empty(),
        }
    }
}

impl DlpackExporter for Tensor {
    fn device(&self) -> DLDevice {
        self.dl_device().unwrap_or(DLDevice::CPU)
    }

    fn flags(&self) -> DlpackFlags {
        Self::flags(self)
    }

    fn prepare_export(&self, _py: Python<'_>, _request: &ExportRequest<'_>) -> PyResult<()> {
        // Nothing to order: the sealed bytes were written and synchronised before the seal, and
        // this package never writes them afterwards.
        Ok(())
    }

    fn export_legacy(&self, _py: Python<'_>) -> PyResult<Managed<DLManagedTensor>> {
        self.managed(DlpackFlags::empty())
    }

    fn export_versioned(&self, _py: Python<'_>) -> PyResult<Managed<DLManagedTensorVersioned>> {
        self.managed(Self::flags(self))
    }
}

#[pymethods]
impl Tensor {
    /// Tensor name as stored in the file.
    #[getter]
    fn name(&self) -> &str {
        &self.name
    }

    /// Element type as the file names it (`"BF16"`, `"F32"`, GGUF `"Q4_K"`...).
    #[getter]
    fn dtype(&self) -> &str {
        &self.dtype
    }

    /// Shape as lent (row-major; `(nbytes,)` for tensors lent as bytes).
    #[getter]
    fn shape<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, &self.layout.shape)
    }

    /// True when the tensor is lent as `uint8` bytes (quantised blocks, 8-bit floats...).
    #[getter]
    fn as_bytes(&self) -> bool {
        self.layout.as_bytes
    }

    /// Length in bytes.
    #[getter]
    fn nbytes(&self) -> u64 {
        self.nbytes
    }

    /// Offset of the tensor's first byte in the file.
    #[getter]
    fn offset(&self) -> u64 {
        self.offset
    }

    /// `"cuda:N"` or `"cpu"` (the `sim` backend).
    #[getter]
    fn device(&self) -> String {
        match self.lease.location() {
            Location::Host { .. } => "cpu".to_owned(),
            Location::Device { gpu, .. } => format!("cuda:{gpu}"),
        }
    }

    /// The shard this tensor belongs to.
    #[getter]
    fn shard_id(&self) -> String {
        self.lease.shard().shard_id().to_string()
    }

    /// DLPack: `(device_type, device_id)`.
    fn __dlpack_device__(&self) -> PyResult<(i32, i32)> {
        let device = self.dl_device()?;
        Ok((
            i32::try_from(device.device_type.0).unwrap_or(i32::MAX),
            device.device_id,
        ))
    }

    /// DLPack: a capsule over the sealed memory itself (never a copy; `copy=True` is refused).
    #[pyo3(signature = (*, stream=None, max_version=None, dl_device=None, copy=None))]
    fn __dlpack__(
        &self,
        py: Python<'_>,
        stream: Option<Bound<'_, PyAny>>,
        max_version: Option<(u32, u32)>,
        dl_device: Option<(u32, i32)>,
        copy: Option<bool>,
    ) -> PyResult<Py<PyAny>> {
        // Refuse a misaligned tensor with its name before the request is looked at.
        self.address()?;
        let request = ExportRequest::parse(stream.as_ref(), max_version, dl_device, copy)?;
        export_dlpack(self, py, request)
    }

    fn __repr__(&self) -> String {
        format!(
            "Tensor({:?}, dtype={}, shape={:?}, device={})",
            self.name,
            self.dtype,
            self.layout.shape,
            self.device()
        )
    }
}
