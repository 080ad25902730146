//! `vram_residency._native`: the Python package's native module (PyO3, abi3 for CPython ≥ 3.10).
//!
//! A `Worker` (token, backend, manager) seals files and checkpoints into `Shard`s and `Model`s,
//! whose tensors are lent to PyTorch (or numpy on `sim`) through DLPack without a copy
//! ([`tensor`]). The Python layer (`python/vram_residency/`) adds the torch helpers.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};
use vram_residency::format::FormatChoice;
use vram_residency::keys::TOKEN_ENV;
use vram_residency::{
    AuditLog, AuditSink, Backend, BackendKind, Digest, ManagerConfig, NoAuditSink, SealOptions,
    SealedShard, ShardId, SimBackend, SimConfig, VramError, VramManager, WorkerState, WorkerToken,
};

mod background;
mod checkpoint;
mod errors;
mod shard;
mod tensor;

use errors::{CheckpointError, to_py};
use shard::{Model, ModelSeal, Shard, ensure_running};

/// A backend and the audit sink of a new worker.
type Opened = (Arc<dyn Backend>, Arc<dyn AuditSink>);

/// The environment variable naming a token file (as for the CLI).
const TOKEN_FILE_ENV: &str = "VRAM_RESIDENCY_TOKEN_FILE";

/// A worker: the per-worker keys (from its token), a backend and the manager of its shards.
#[pyclass(frozen, module = "vram_residency._native", name = "Worker")]
struct Worker {
    manager: Arc<VramManager>,
    kind: BackendKind,
    closed: std::sync::atomic::AtomicBool,
}

fn value_error(message: impl Into<String>) -> PyErr {
    pyo3::exceptions::PyValueError::new_err(message.into())
}

fn read_token(token_file: Option<PathBuf>) -> Result<WorkerToken, VramError> {
    let from_file = token_file.or_else(|| std::env::var_os(TOKEN_FILE_ENV).map(PathBuf::from));
    match from_file {
        Some(path) => WorkerToken::from_file(&path),
        None if std::env::var_os(TOKEN_ENV).is_some() => WorkerToken::from_env(TOKEN_ENV),
        None => Err(VramError::InvalidInput {
            field: "token",
            reason: format!(
                "no worker token: pass token_file=PATH, or set {TOKEN_FILE_ENV} (a file) or \
                 {TOKEN_ENV}"
            ),
        }),
    }
}

/// A progress bar on stderr for `total` bytes, when asked for (`None`: when stderr is a terminal).
fn progress_bar(show: Option<bool>, total: u64, what: &str) -> Option<ProgressBar> {
    let show = show.unwrap_or_else(|| std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if !show {
        return None;
    }
    let bar = ProgressBar::new(total);
    if let Ok(style) = ProgressStyle::with_template(
        "{msg} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_owned());
    bar.enable_steady_tick(Duration::from_millis(200));
    Some(bar)
}

impl Worker {
    fn ensure_open(&self) -> PyResult<()> {
        if self.closed.load(std::sync::atomic::Ordering::Acquire) {
            return Err(errors::WorkerStoppedError::new_err(
                "the worker was closed; open a new one",
            ));
        }
        ensure_running(&self.manager)
    }

    fn seal_one(
        &self,
        py: Python<'_>,
        path: PathBuf,
        gpu: u32,
        mut opts: SealOptions,
        progress: Option<bool>,
    ) -> PyResult<Shard> {
        self.ensure_open()?;
        let total = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let bar = progress_bar(progress, total, &name);
        if let Some(bar) = &bar {
            let bar = bar.clone();
            opts.progress = Some(Arc::new(move |n| bar.set_position(n)));
        }
        let manager = Arc::clone(&self.manager);
        let sealed = py.detach(move || manager.seal_file(&path, gpu, &opts));
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        let sealed = sealed.map_err(|e| to_py(py, e))?;
        Ok(Shard::new(Arc::clone(&self.manager), sealed))
    }
}

#[pymethods]
impl Worker {
    /// Opens a worker. The token comes from `token_file` (mode 0600), else the file named by
    /// `VRAM_RESIDENCY_TOKEN_FILE`, else `VRAM_RESIDENCY_TOKEN`. `backend="cuda"` (the default)
    /// needs an NVIDIA driver and is never silently replaced; `backend="sim"` keeps "device
    /// memory" in host RAM for development and says so everywhere (it is not residency).
    /// `audit_log`: path of the signed, hash-chained audit log (none by default).
    #[new]
    #[pyo3(signature = (token_file=None, *, backend="cuda", audit_log=None, headroom_bytes=0, sim_devices=1, sim_bytes_per_device=4 << 30))]
    fn new(
        py: Python<'_>,
        token_file: Option<PathBuf>,
        backend: &str,
        audit_log: Option<PathBuf>,
        headroom_bytes: u64,
        sim_devices: u32,
        sim_bytes_per_device: u64,
    ) -> PyResult<Self> {
        let kind: BackendKind = backend
            .parse()
            .map_err(|e: VramError| value_error(e.to_string()))?;
        let token = read_token(token_file).map_err(|e| to_py(py, e))?;
        let built = py.detach(|| -> Result<Opened, VramError> {
            let backend: Arc<dyn Backend> = match kind {
                BackendKind::Sim => Arc::new(SimBackend::new(SimConfig {
                    devices: sim_devices,
                    bytes_per_device: sim_bytes_per_device,
                })),
                BackendKind::Cuda => Arc::new(
                    vram_residency_cuda::CudaBackend::new(
                        vram_residency_cuda::CudaConfig::default(),
                    )
                    .map_err(VramError::from)?,
                ),
            };
            let sink: Arc<dyn AuditSink> = match &audit_log {
                Some(path) => Arc::new(AuditLog::open(path, &token, kind)?.0),
                None => Arc::new(NoAuditSink),
            };
            Ok((backend, sink))
        });
        let (backend, sink) = built.map_err(|e| to_py(py, e))?;
        if kind == BackendKind::Sim {
            let warnings = py.import("warnings")?;
            warnings.call_method1(
                "warn",
                (
                    "vram_residency: backend 'sim' keeps weights in host memory; it is not VRAM \
                     residency (for development and tests only)",
                    py.get_type::<pyo3::exceptions::PyRuntimeWarning>(),
                ),
            )?;
        }
        let config = ManagerConfig {
            headroom_bytes,
            ..ManagerConfig::default()
        };
        let manager =
            VramManager::with_config(&token, backend, config, sink).map_err(|e| to_py(py, e))?;
        Ok(Self {
            manager: Arc::new(manager),
            kind,
            closed: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// `"cuda"` or `"sim"`.
    #[getter]
    fn backend(&self) -> &'static str {
        self.kind.name()
    }

    /// The worker's Ed25519 public key as PEM (what `vram-residency identity` writes), which
    /// verifies its attestations and audit log.
    #[getter]
    fn public_key(&self) -> String {
        self.manager.public_key().to_pem()
    }

    /// The public key's id (as attestations and audit records name it).
    #[getter]
    fn key_id(&self) -> String {
        self.manager.public_key().key_id()
    }

    /// `"running"`, or `"stopped: REASON"` after a security incident.
    #[getter]
    fn state(&self) -> String {
        match self.manager.state() {
            WorkerState::Running => "running".to_owned(),
            WorkerState::Stopped { reason } => format!("stopped: {reason}"),
        }
    }

    /// Bytes of device memory held by this worker's shards on `gpu`.
    #[pyo3(signature = (gpu=0))]
    fn used_bytes(&self, py: Python<'_>, gpu: u32) -> PyResult<u64> {
        self.manager.used_vram(gpu).map_err(|e| to_py(py, e))
    }

    /// The devices: a list of dicts (index, name, uuid, total_bytes, free_bytes).
    fn devices<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        self.manager
            .devices()
            .iter()
            .map(|d| {
                let dict = PyDict::new(py);
                dict.set_item("index", d.index)?;
                dict.set_item("name", &d.name)?;
                dict.set_item("uuid", vram_residency::shard::format_uuid(&d.uuid))?;
                dict.set_item("total_bytes", d.total_bytes)?;
                dict.set_item("free_bytes", d.free_bytes)?;
                Ok(dict)
            })
            .collect()
    }

    /// Seals one file (GGUF, safetensors or raw; a file that claims a format must parse as it)
    /// onto device `gpu`. `expect`: the fs-verity digest (`sha256:<hex>`) it must have, or nothing
    /// is sealed. `progress`: a progress bar on stderr (default: when stderr is a terminal).
    #[pyo3(signature = (path, gpu=0, *, expect=None, shard_id=None, model_ref=None, shard_index=0, total_shards=1, progress=None))]
    #[expect(clippy::too_many_arguments, reason = "Python keyword arguments")]
    fn seal_file(
        &self,
        py: Python<'_>,
        path: PathBuf,
        gpu: u32,
        expect: Option<&str>,
        shard_id: Option<&str>,
        model_ref: Option<String>,
        shard_index: u32,
        total_shards: u32,
        progress: Option<bool>,
    ) -> PyResult<Shard> {
        let expected_digest = expect
            .map(str::parse::<Digest>)
            .transpose()
            .map_err(|e| value_error(e.to_string()))?;
        let shard_id = shard_id
            .map(ShardId::new)
            .transpose()
            .map_err(|e| value_error(e.to_string()))?;
        let opts = SealOptions {
            shard_id,
            expected_digest,
            model_ref: model_ref.unwrap_or_default(),
            shard_index,
            total_shards,
            ..SealOptions::default()
        };
        self.seal_one(py, path, gpu, opts, progress)
    }

    /// Seals a Hugging Face checkpoint directory onto device `gpu`: every `*.safetensors` file
    /// (in name order) as one shard, checked against `model.safetensors.index.json` when there is
    /// one (each file exactly the tensors the index places in it; no tensor twice). Nothing stays
    /// allocated when any check fails. `model_ref` defaults to the directory's name.
    #[pyo3(signature = (directory, gpu=0, *, gpus=None, model_ref=None, progress=None))]
    fn seal_checkpoint(
        &self,
        py: Python<'_>,
        directory: PathBuf,
        gpu: u32,
        gpus: Option<Vec<u32>>,
        model_ref: Option<String>,
        progress: Option<bool>,
    ) -> PyResult<Model> {
        self.ensure_open()?;
        let plan = checkpoint::plan(&directory).map_err(CheckpointError::new_err)?;
        let model_ref = model_ref.unwrap_or_else(|| {
            directory
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        });
        let total = u32::try_from(plan.files.len()).map_err(|_| value_error("too many files"))?;
        // File i goes to gpus[i % len(gpus)] (e.g. the layers of a pipeline split over GPUs), or
        // every file to `gpu`.
        let placement = match gpus {
            Some(list) if list.is_empty() => return Err(value_error("gpus: give at least one")),
            Some(list) => list,
            None => vec![gpu],
        };
        let mut shards: Vec<Shard> = Vec::new();
        let mut model_seal = None;
        let sealed = (|| -> PyResult<()> {
            for ((index, (_, path)), gpu) in (0u32..)
                .zip(&plan.files)
                .zip(placement.iter().copied().cycle())
            {
                let opts = SealOptions {
                    model_ref: model_ref.clone(),
                    shard_index: index,
                    total_shards: total,
                    format: FormatChoice::Safetensors,
                    ..SealOptions::default()
                };
                shards.push(self.seal_one(py, path.clone(), gpu, opts, progress)?);
            }
            let held = shards
                .iter()
                .map(Shard::get)
                .collect::<PyResult<Vec<_>>>()?;
            let tables: Vec<(&str, Option<&vram_residency::format::TensorTable>)> = plan
                .files
                .iter()
                .zip(&held)
                .map(|((name, _), shard)| (name.as_str(), shard.tensor_table()))
                .collect();
            checkpoint::check_tables(&plan, &tables).map_err(CheckpointError::new_err)?;
            // The files are bound together: one model seal over every shard (docs/model-seal.md).
            let refs: Vec<&SealedShard> = held.iter().map(AsRef::as_ref).collect();
            model_seal = Some(
                self.manager
                    .seal_model_set(&refs)
                    .map_err(|e| to_py(py, e))?,
            );
            Ok(())
        })();
        if let Err(error) = sealed {
            // Nothing stays allocated: free what was sealed before the failure.
            for shard in &shards {
                let _ = shard.evict_now(py);
            }
            return Err(error);
        }
        let files = plan.files.iter().map(|(name, _)| name.clone()).collect();
        let shards = shards
            .into_iter()
            .map(|s| Py::new(py, s))
            .collect::<PyResult<Vec<_>>>()?;
        let sealed = model_seal.ok_or_else(|| value_error("no model seal"))?;
        Ok(Model::new(
            Arc::clone(&self.manager),
            shards,
            files,
            model_ref,
            sealed,
        ))
    }

    /// Binds as one model shards held by several processes of this worker (the same worker token;
    /// e.g. one process per GPU under `torch.distributed`), given as their `Shard.seal()` pairs
    /// `(record, tag)` gathered from every process. Each tag is checked under this worker's seal key
    /// (a record that does not verify is forgery: the worker stops); every index exactly once.
    /// Returns a `ModelSeal`.
    fn seal_model_records(
        &self,
        py: Python<'_>,
        seals: Vec<(Vec<u8>, Vec<u8>)>,
    ) -> PyResult<ModelSeal> {
        self.ensure_open()?;
        let mut records = Vec::with_capacity(seals.len());
        for (position, (record, tag)) in seals.iter().enumerate() {
            let record = vram_residency::SealRecord::decode(record).map_err(|e| to_py(py, e))?;
            let tag: [u8; 32] = tag
                .as_slice()
                .try_into()
                .map_err(|_| value_error(format!("seals[{position}]: a tag is 32 bytes")))?;
            records.push((record, vram_residency::Tag::from_public_bytes(tag)));
        }
        let manager = Arc::clone(&self.manager);
        let sealed = py
            .detach(move || manager.seal_model_records(&records))
            .map_err(|e| to_py(py, e))?;
        Ok(ModelSeal { sealed })
    }

    /// One attestation of the whole model from the processes' fresh shard attestations
    /// (`Shard.attest(nonce)` in every process, the same nonce), gathered here: each must verify
    /// under this worker's key for `nonce`, and together they must be exactly the shards `model`
    /// names. Returns the DSSE envelope (JSON text) of one statement for the model, which
    /// `vram-residency attest verify` checks for completeness as well as the signature.
    fn attest_model_gathered(
        &self,
        py: Python<'_>,
        model: &ModelSeal,
        envelopes: Vec<String>,
        nonce: &[u8],
    ) -> PyResult<String> {
        self.ensure_open()?;
        let parsed = envelopes
            .iter()
            .map(|text| vram_residency::AttestationEnvelope::from_json(text))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| to_py(py, e))?;
        let manager = Arc::clone(&self.manager);
        let sealed = &model.sealed;
        let envelope = py
            .detach(|| manager.attest_model_gathered(sealed, &parsed, nonce))
            .map_err(|e| to_py(py, e))?;
        Ok(envelope.to_json().to_string())
    }

    /// Closes the worker: no further seals. Shards sealed before stay usable (verify, tensors,
    /// evict) until evicted or dropped.
    fn close(&self) {
        self.closed
            .store(true, std::sync::atomic::Ordering::Release);
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, _args: &Bound<'_, PyTuple>) -> bool {
        self.close();
        false
    }

    /// Starts re-verifying `sealed` (a `Shard` or a `Model`) in VRAM continuously, round-robin,
    /// each digest confined to `sms` SMs by `mechanism` (`"auto"`: a green context, else an MPS
    /// context where this process is an MPS client, else a bounded grid; or `"green"`, `"mps"`,
    /// `"bounded"` alone; `stats()["mechanism"]` says which), pausing `pause` seconds after each
    /// pass, and re-hashing at most `max_gbps` GB/s (10^9 bytes) of wall time when given. A
    /// corruption found in the background stops the worker like any failed verification (so a
    /// guarded model refuses to run). Watching never keeps a shard alive.
    #[pyo3(signature = (sealed, *, sms=8, pause=0.0, mechanism="auto", max_gbps=None))]
    fn verify_in_background(
        &self,
        sealed: &Bound<'_, PyAny>,
        sms: u32,
        pause: f64,
        mechanism: &str,
        max_gbps: Option<f64>,
    ) -> PyResult<background::BackgroundVerification> {
        let py = sealed.py();
        let pause = std::time::Duration::try_from_secs_f64(pause)
            .map_err(|_| value_error("pause must be a non-negative number of seconds"))?;
        let mechanism: vram_residency::LaneMechanism = mechanism
            .parse()
            .map_err(|e: vram_residency::VramError| value_error(e.to_string()))?;
        let max_bytes_per_second = max_gbps
            .map(|gbps| {
                vram_residency::background::bytes_per_second(gbps)
                    .ok_or_else(|| value_error("max_gbps must be a positive number of GB/s"))
            })
            .transpose()?;
        let shards: Vec<Arc<vram_residency::SealedShard>> =
            if let Ok(shard) = sealed.cast::<Shard>() {
                vec![shard.get().get()?]
            } else if let Ok(model) = sealed.cast::<Model>() {
                model.get().held(py)?
            } else {
                return Err(pyo3::exceptions::PyTypeError::new_err(
                    "verify_in_background takes a Shard or a Model",
                ));
            };
        let verifier = vram_residency::BackgroundVerifier::start(
            Arc::clone(&self.manager),
            vram_residency::BackgroundConfig {
                budget: vram_residency::SmBudget::with(sms, mechanism),
                pause,
                max_bytes_per_second,
            },
        )
        .map_err(|e| to_py(py, e))?;
        for shard in &shards {
            verifier.watch(shard);
        }
        Ok(background::BackgroundVerification::new(verifier))
    }

    fn __repr__(&self) -> String {
        let label = match self.kind {
            BackendKind::Cuda => "cuda",
            BackendKind::Sim => "sim (host memory, not residency)",
        };
        let state = if self.closed.load(std::sync::atomic::Ordering::Acquire) {
            "closed".to_owned()
        } else {
            self.state()
        };
        format!("Worker(backend={label}, state={state})")
    }
}

/// The native module.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Worker>()?;
    m.add_class::<Shard>()?;
    m.add_class::<Model>()?;
    m.add_class::<ModelSeal>()?;
    m.add_class::<tensor::Tensor>()?;
    m.add_class::<background::BackgroundVerification>()?;
    errors::register(m)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
