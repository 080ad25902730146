//! `Shard` (one sealed file) and `Model` (the shards of one checkpoint) as Python objects.

use std::sync::{Arc, Mutex, PoisonError};

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};
use vram_residency::{SealedModel, SealedShard, VerifyReport, VramError, VramManager, WorkerState};

use crate::errors::{ShardInUseError, WorkerStoppedError, to_py};
use crate::tensor::Tensor;

/// One sealed shard. Evicted explicitly with `evict()`, or freed when the last reference to it
/// (including every tensor lent from it) is gone.
#[pyclass(frozen, module = "vram_residency._native", name = "Shard")]
pub struct Shard {
    manager: Arc<VramManager>,
    inner: Mutex<Option<Arc<SealedShard>>>,
    shard_id: String,
}

impl Shard {
    pub fn new(manager: Arc<VramManager>, shard: SealedShard) -> Self {
        Self {
            manager,
            shard_id: shard.shard_id().to_string(),
            inner: Mutex::new(Some(Arc::new(shard))),
        }
    }

    /// The shard, or an error once it was evicted.
    pub fn get(&self) -> PyResult<Arc<SealedShard>> {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or_else(|| {
                crate::errors::VramResidencyError::new_err(format!(
                    "shard {} was evicted",
                    self.shard_id
                ))
            })
    }

    /// Verifies in device memory (the GIL released meanwhile); refuses on a stopped worker.
    pub fn verify_now(&self, py: Python<'_>) -> PyResult<VerifyReport> {
        let shard = self.get()?;
        let manager = Arc::clone(&self.manager);
        py.detach(move || {
            if let WorkerState::Stopped { reason } = manager.state() {
                return Err(VramError::WorkerStopped { reason });
            }
            manager.verify_sealed(&shard)
        })
        .map_err(|e| to_py(py, e))
    }

    /// Lends the shard (verifying it first) and returns its tensors in table order.
    pub fn lend_tensors(&self, py: Python<'_>) -> PyResult<Vec<Tensor>> {
        let shard = self.get()?;
        let manager = Arc::clone(&self.manager);
        let lease = py
            .detach(move || manager.lend(&shard))
            .map_err(|e| to_py(py, e))?;
        lease
            .tensors()
            .iter()
            .map(|view| Tensor::new(&lease, view))
            .collect()
    }

    /// Frees the shard unless tensors lent from it are alive.
    pub fn evict_now(&self, py: Python<'_>) -> PyResult<()> {
        let mut slot = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(shared) = slot.take() else {
            return Ok(());
        };
        match Arc::try_unwrap(shared) {
            Ok(shard) => {
                drop(slot);
                let manager = Arc::clone(&self.manager);
                py.detach(move || manager.deallocate(shard))
                    .map_err(|e| to_py(py, e))
            }
            Err(shared) => {
                let holders = Arc::strong_count(&shared).saturating_sub(1);
                *slot = Some(shared);
                Err(ShardInUseError::new_err(format!(
                    "shard {} is still lent to {holders} holder(s) (tensor views, or torch tensors \
                     made from them); delete them (and the model using them) before evicting it",
                    self.shard_id
                )))
            }
        }
    }
}

/// Bytes per second in GB/s (10^9 bytes); 0 for no time.
fn gb_per_s(bytes: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        bytes as f64 / seconds / 1e9
    } else {
        0.0
    }
}

/// The verification report as a dict.
pub fn report_dict<'py>(py: Python<'py>, report: &VerifyReport) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    let seconds = report.elapsed.as_secs_f64();
    dict.set_item("shard_id", report.shard_id.to_string())?;
    dict.set_item("digest", report.digest.to_string())?;
    dict.set_item("bytes", report.vram_bytes)?;
    dict.set_item("seconds", seconds)?;
    dict.set_item("gb_per_s", gb_per_s(report.vram_bytes, seconds))?;
    dict.set_item("backend", report.backend.name())?;
    Ok(dict)
}

#[pymethods]
impl Shard {
    /// The shard id.
    #[getter]
    fn shard_id(&self) -> &str {
        &self.shard_id
    }

    /// The fs-verity digest measured in device memory at seal time (`sha256:<hex>`).
    #[getter]
    fn digest(&self) -> PyResult<String> {
        Ok(self.get()?.digest().to_string())
    }

    /// Size in bytes.
    #[getter]
    fn nbytes(&self) -> PyResult<u64> {
        Ok(self.get()?.vram_bytes())
    }

    /// Device index.
    #[getter]
    fn gpu(&self) -> PyResult<u32> {
        Ok(self.get()?.gpu_device())
    }

    /// `"cuda"` or `"sim"`.
    #[getter]
    fn backend(&self) -> PyResult<&'static str> {
        Ok(self.get()?.backend().name())
    }

    /// The caller's name for the model.
    #[getter]
    fn model_ref(&self) -> PyResult<String> {
        Ok(self.get()?.record.model_ref.clone())
    }

    /// False once evicted.
    #[getter]
    fn resident(&self) -> bool {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }

    /// The shard's seal as `(record, tag)` bytes: the canonical seal record and its tag. Public
    /// data; what another process of this worker needs to bind this shard into a model
    /// (`Worker.seal_model_records`, `vram_residency.torch.seal_model_across_ranks`).
    fn seal<'py>(&self, py: Python<'py>) -> PyResult<(Bound<'py, PyBytes>, Bound<'py, PyBytes>)> {
        let shard = self.get()?;
        let record = shard.record.encode().map_err(|e| to_py(py, e))?;
        Ok((
            PyBytes::new(py, &record),
            PyBytes::new(py, shard.seal_tag().as_bytes()),
        ))
    }

    /// The seal record's public view (what `seal --json` prints), as a dict.
    fn record<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let json = serde_json::to_string(&self.get()?.view())
            .map_err(|e| crate::errors::VramResidencyError::new_err(e.to_string()))?;
        py.import("json")?.call_method1("loads", (json,))
    }

    /// Names of the tensors in the sealed table, in file order.
    fn tensor_names(&self) -> PyResult<Vec<String>> {
        Ok(self
            .get()?
            .tensor_table()
            .map(|t| t.tensors.iter().map(|x| x.name.clone()).collect())
            .unwrap_or_default())
    }

    /// Verifies the shard in device memory (CI-007), then returns a view of every tensor of its
    /// table (name -> `Tensor`), each exportable with DLPack without a copy.
    fn tensors<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let dict = PyDict::new(py);
        for tensor in self.lend_tensors(py)? {
            let name = tensor.name_str().to_owned();
            dict.set_item(name, Bound::new(py, tensor)?)?;
        }
        Ok(dict)
    }

    /// Re-measures the digest in device memory and checks the seal. Raises `CorruptionError`
    /// (naming the damaged tensors), `ForgeryError` or `PolicyViolationError` — each stops the
    /// worker — or `WorkerStoppedError`. Returns a report dict.
    fn verify<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let report = self.verify_now(py)?;
        report_dict(py, &report)
    }

    /// A fresh attestation for `nonce` (16 to 64 bytes): the DSSE envelope as a JSON string,
    /// checkable with `vram-residency attest verify --public-key`.
    pub fn attest(&self, py: Python<'_>, nonce: &[u8]) -> PyResult<String> {
        let shard = self.get()?;
        let manager = Arc::clone(&self.manager);
        let nonce = nonce.to_vec();
        let envelope = py
            .detach(move || manager.attest(&shard, &nonce))
            .map_err(|e| to_py(py, e))?;
        Ok(envelope.to_json().to_string())
    }

    /// True when `[address, address + nbytes)` lies inside this shard's memory: lets a caller
    /// check that a framework tensor (`t.data_ptr()`, `t.nbytes`) aliases the sealed bytes rather
    /// than a copy, without this package ever revealing an address.
    pub fn holds(&self, address: u64, nbytes: u64) -> PyResult<bool> {
        self.get()?
            .holds(address, nbytes)
            .map_err(|e| crate::errors::VramResidencyError::new_err(e.to_string()))
    }

    /// Raises `WorkerStoppedError` when the worker stopped (cheap: no verification).
    pub fn ensure_running(&self) -> PyResult<()> {
        ensure_running(&self.manager)
    }

    /// Frees the shard's device memory. Raises `ShardInUseError` while tensors lent from it are
    /// alive. Evicting twice is a no-op.
    fn evict(&self, py: Python<'_>) -> PyResult<()> {
        self.evict_now(py)
    }

    fn __repr__(&self) -> String {
        match self.get() {
            Ok(shard) => format!(
                "Shard({}, {}, {} bytes, {} on gpu {})",
                self.shard_id,
                shard.digest(),
                shard.vram_bytes(),
                shard.backend().name(),
                shard.gpu_device()
            ),
            Err(_) => format!("Shard({}, evicted)", self.shard_id),
        }
    }
}

/// The shards of one checkpoint, one per `*.safetensors` file, in file-name order.
#[pyclass(frozen, module = "vram_residency._native", name = "Model")]
pub struct Model {
    manager: Arc<VramManager>,
    shards: Vec<Py<Shard>>,
    files: Vec<String>,
    model_ref: String,
    sealed: SealedModel,
}

impl Model {
    pub const fn new(
        manager: Arc<VramManager>,
        shards: Vec<Py<Shard>>,
        files: Vec<String>,
        model_ref: String,
        sealed: SealedModel,
    ) -> Self {
        Self {
            manager,
            shards,
            files,
            model_ref,
            sealed,
        }
    }
}

impl Model {
    /// Every shard (an error once one was evicted).
    pub fn held(&self, py: Python<'_>) -> PyResult<Vec<Arc<SealedShard>>> {
        self.shards.iter().map(|s| s.bind(py).get().get()).collect()
    }
}

#[pymethods]
impl Model {
    /// The sealed shards, in file order.
    #[getter]
    fn shards<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        PyList::new(py, self.shards.iter().map(|s| s.clone_ref(py)))
    }

    /// The file names, in shard order.
    #[getter]
    fn files(&self) -> Vec<String> {
        self.files.clone()
    }

    /// The model reference recorded in every shard's seal.
    #[getter]
    fn model_ref(&self) -> &str {
        &self.model_ref
    }

    /// Total bytes of all shards.
    #[getter]
    fn nbytes(&self, py: Python<'_>) -> PyResult<u64> {
        let mut total = 0u64;
        for shard in &self.shards {
            total = total.saturating_add(shard.bind(py).get().get()?.vram_bytes());
        }
        Ok(total)
    }

    /// Verifies every shard (CI-007), then returns every tensor of the model (name -> `Tensor`).
    fn tensors<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let dict = PyDict::new(py);
        for shard in &self.shards {
            for tensor in shard.bind(py).get().lend_tensors(py)? {
                let name = tensor.name_str().to_owned();
                dict.set_item(name, Bound::new(py, tensor)?)?;
            }
        }
        Ok(dict)
    }

    /// Verifies the model as a whole: its model seal, that every shard is present (the ones sealed),
    /// and every shard re-hashed in device memory, all GPUs at once (shards on one GPU one after
    /// another), with the GIL released. Raises on a failure (see `Shard.verify`: a corrupted shard
    /// raises `CorruptionError` naming its tensors; the message names the shard's index). Returns a
    /// summary dict (`bytes`, `seconds`, `gb_per_s`, `shards`: the per-shard reports, `gpus`: per GPU
    /// `gpu`, `shards` (indices), `bytes`, `seconds`).
    fn verify<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let held = self.held(py)?;
        let manager = Arc::clone(&self.manager);
        let sealed = &self.sealed;
        let report = py
            .detach(|| {
                let refs: Vec<&SealedShard> = held.iter().map(AsRef::as_ref).collect();
                manager.verify_model(sealed, &refs)
            })
            .map_err(|e| to_py(py, e))?;
        let reports = PyList::empty(py);
        for shard in &report.shards {
            reports.append(report_dict(py, shard)?)?;
        }
        let gpus = PyList::empty(py);
        for gpu in &report.per_gpu {
            let entry = PyDict::new(py);
            entry.set_item("gpu", gpu.gpu)?;
            entry.set_item("shards", gpu.shard_indices.clone())?;
            entry.set_item("bytes", gpu.bytes)?;
            entry.set_item("seconds", gpu.elapsed.as_secs_f64())?;
            gpus.append(entry)?;
        }
        let seconds = report.elapsed.as_secs_f64();
        let dict = PyDict::new(py);
        dict.set_item("bytes", report.total_bytes)?;
        dict.set_item("seconds", seconds)?;
        dict.set_item("gb_per_s", gb_per_s(report.total_bytes, seconds))?;
        dict.set_item("shards", reports)?;
        dict.set_item("gpus", gpus)?;
        Ok(dict)
    }

    /// One fresh attestation of the whole model for `nonce` (16 to 64 bytes): a DSSE envelope (JSON
    /// text) whose statement has every shard as a subject, signed once; `vram-residency attest
    /// verify` checks the signature and that the set is complete.
    fn attest(&self, py: Python<'_>, nonce: &[u8]) -> PyResult<String> {
        let held = self.held(py)?;
        let manager = Arc::clone(&self.manager);
        let sealed = &self.sealed;
        let envelope = py
            .detach(|| {
                let refs: Vec<&SealedShard> = held.iter().map(AsRef::as_ref).collect();
                manager.attest_model(sealed, &refs, nonce)
            })
            .map_err(|e| to_py(py, e))?;
        Ok(envelope.to_json().to_string())
    }

    /// Evicts every shard; raises `ShardInUseError` (evicting nothing further) while tensors lent
    /// from a shard are alive.
    fn evict(&self, py: Python<'_>) -> PyResult<()> {
        for shard in &self.shards {
            shard.bind(py).get().evict_now(py)?;
        }
        Ok(())
    }

    /// True when `[address, address + nbytes)` lies inside one shard's memory (see `Shard.holds`).
    fn holds(&self, py: Python<'_>, address: u64, nbytes: u64) -> PyResult<bool> {
        for shard in &self.shards {
            if shard.bind(py).get().holds(address, nbytes)? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Raises `WorkerStoppedError` when the worker stopped (cheap: no verification).
    fn ensure_running(&self, py: Python<'_>) -> PyResult<()> {
        match self.shards.first() {
            Some(shard) => shard.bind(py).get().ensure_running(),
            None => Ok(()),
        }
    }

    fn __len__(&self) -> usize {
        self.shards.len()
    }

    fn __repr__(&self) -> String {
        format!(
            "Model({:?}, {} shard(s): {})",
            self.model_ref,
            self.shards.len(),
            self.files.join(", ")
        )
    }
}

/// Raises `WorkerStoppedError` for a stopped worker.
pub fn ensure_running(manager: &VramManager) -> PyResult<()> {
    match manager.state() {
        WorkerState::Running => Ok(()),
        WorkerState::Stopped { reason } => Err(WorkerStoppedError::new_err(format!(
            "the worker is stopped: {reason}"
        ))),
    }
}

/// A model seal made from shards held by several processes of one worker
/// (`Worker.seal_model_records`): the record naming every shard, and its tag. Public data.
#[pyclass(frozen, module = "vram_residency._native", name = "ModelSeal")]
pub struct ModelSeal {
    pub sealed: SealedModel,
}

#[pymethods]
impl ModelSeal {
    /// The model reference every shard's seal names.
    #[getter]
    fn model_ref(&self) -> &str {
        self.sealed.model_ref()
    }

    /// Number of shards.
    #[getter]
    fn total_shards(&self) -> usize {
        self.sealed.total_shards()
    }

    /// Total bytes of all shards.
    #[getter]
    fn nbytes(&self) -> u64 {
        self.sealed.record.total_bytes()
    }

    /// Per shard, in index order: `shard_index`, `shard_id`, `digest`, `nbytes`, `gpu`.
    fn shards<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let list = PyList::empty(py);
        for entry in &self.sealed.record.shards {
            let dict = PyDict::new(py);
            dict.set_item("shard_index", entry.shard_index)?;
            dict.set_item("shard_id", entry.shard_id.as_str())?;
            dict.set_item("digest", entry.digest.to_string())?;
            dict.set_item("nbytes", entry.vram_bytes)?;
            dict.set_item("gpu", entry.gpu_device)?;
            list.append(dict)?;
        }
        Ok(list)
    }

    fn __len__(&self) -> usize {
        self.sealed.total_shards()
    }
}
