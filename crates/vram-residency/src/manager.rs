//! The manager: the one place where shards are sealed, verified, lent and freed.
//!
//! ```text
//! seal:    validate input (IV-001..005) -> admit capacity atomically (RP-001..004)
//!          -> allocate on the device -> check residency (VP-001/003) -> stream the source in
//!          -> digest measured where the bytes are -> compare with the expected digest
//!          -> seal record + HMAC (CI-001/002) -> audit VramSealed
//! verify:  HMAC, constant time (CI-003) -> residency -> digest re-measured -> compare
//!          forgery or corruption -> audit critical -> worker Stopped (WORKER-4122)
//! execute: verify (CI-007) -> lend the weights to a closure for one call
//! ```

use std::io::{Read, Seek as _};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use crate::attestation::{Attestation, AttestationEnvelope, validate_nonce};
use crate::audit::{AuditEntry, AuditEvent, AuditSink, FailureKind, NoAuditSink};
use crate::backend::{
    Backend, BackendKind, Confinement, DeviceBuffer, DeviceInfo, DevicePolicy, DeviceVerdict,
    Residency, SmBudget,
};
use crate::capacity::{Capacity, CapacityLedger};
use crate::digest::{Digest, TreeDigest};
use crate::error::{Result, VramError};
use crate::format::{FormatChoice, ModelFormat, TensorTable, read_tensor_table_as};
use crate::ids::{ByteRange, ShardId, unix_nanos};
use crate::keys::{KeySet, PublicKey, Tag, WorkerToken};
use crate::model_attestation::{AttestedShard, ModelAttestation};
use crate::model_seal::{MAX_MODEL_SHARDS, ModelSealRecord, ModelShardEntry, SealedModel};
use crate::seal::{SealRecord, validate_model_ref, validate_shard_position};
use crate::shard::SealedShard;
use crate::weights::{Lease, Weights};

/// Default maximum model size: 100 GB (IV-001, RP-003).
pub const DEFAULT_MAX_MODEL_BYTES: u64 = 100_000_000_000;

/// Manager settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ManagerConfig {
    /// Largest shard accepted, in bytes (RP-003). Default 100 GB.
    pub max_model_bytes: u64,
    /// Bytes kept free on every device (for activations, KV cache, the driver). Default 0.
    pub headroom_bytes: u64,
    /// What a device must be for weights to live on it (checked when the manager starts).
    pub device_policy: DevicePolicy,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        Self {
            max_model_bytes: DEFAULT_MAX_MODEL_BYTES,
            headroom_bytes: 0,
            device_policy: DevicePolicy::default(),
        }
    }
}

/// Progress callback: receives the number of bytes uploaded so far.
pub type Progress = Arc<dyn Fn(u64) + Send + Sync>;

/// Per-seal options. `SealOptions::default()` is a single-shard model with a generated id.
#[derive(Clone)]
pub struct SealOptions {
    /// Caller-chosen id (validated, IV-003); generated when `None`.
    pub shard_id: Option<ShardId>,
    /// When set, the digest measured in device memory must equal it, or nothing is sealed.
    pub expected_digest: Option<Digest>,
    /// Caller's name for the model (at most 1024 bytes, no control characters).
    pub model_ref: String,
    /// Index of this shard in its model.
    pub shard_index: u32,
    /// Number of shards in the model (>= 1).
    pub total_shards: u32,
    /// The model's tensor table. `seal_file` and `seal_model*` read it from the header themselves
    /// when this is `None` (and refuse a malformed header before anything is allocated);
    /// `seal_reader` uses it as given.
    pub tensor_table: Option<Arc<TensorTable>>,
    /// What the caller says the model is (default: detect; a file that claims a format must parse
    /// as it). Used when `tensor_table` is `None`.
    pub format: FormatChoice,
    /// Called with the running byte count during the upload.
    pub progress: Option<Progress>,
}

impl Default for SealOptions {
    fn default() -> Self {
        Self {
            shard_id: None,
            expected_digest: None,
            model_ref: String::new(),
            shard_index: 0,
            total_shards: 1,
            tensor_table: None,
            format: FormatChoice::Auto,
            progress: None,
        }
    }
}

impl std::fmt::Debug for SealOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealOptions")
            .field("shard_id", &self.shard_id)
            .field("expected_digest", &self.expected_digest)
            .field("model_ref", &self.model_ref)
            .field("shard_index", &self.shard_index)
            .field("total_shards", &self.total_shards)
            .field("format", &self.format)
            .field("progress", &self.progress.is_some())
            .finish_non_exhaustive()
    }
}

/// The worker's state (WORKER-4122).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum WorkerState {
    /// Normal operation.
    Running,
    /// Stopped after a security incident: no seals or executions until restart.
    Stopped {
        /// What stopped it.
        reason: String,
    },
}

/// What a successful verification measured.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct VerifyReport {
    /// Shard verified.
    pub shard_id: ShardId,
    /// Digest re-measured in device memory (equal to the sealed one).
    pub digest: Digest,
    /// Bytes re-hashed.
    pub vram_bytes: u64,
    /// Wall time of the whole verification (HMAC, residency check, digest).
    #[serde(serialize_with = "serialize_nanos")]
    pub elapsed: Duration,
    /// Backend.
    pub backend: BackendKind,
    /// Where the bytes were found to live during this verification (never a violation: that fails).
    pub residency: Residency,
}

/// What a successful model verification measured ([`VramManager::verify_model`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ModelVerifyReport {
    /// The model.
    pub model_ref: String,
    /// One report per shard, by index: `shards[i]` is shard `i`.
    pub shards: Vec<VerifyReport>,
    /// Bytes re-hashed, all shards.
    pub total_bytes: u64,
    /// Wall time of the whole verification (model seal, shard set, every shard; GPUs in parallel).
    #[serde(serialize_with = "serialize_nanos")]
    pub elapsed: Duration,
    /// One entry per GPU that holds shards of the model, by GPU index.
    pub per_gpu: Vec<GpuVerifyReport>,
}

/// The part of a model verification done on one GPU (its shards, one after another).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GpuVerifyReport {
    /// Device index.
    pub gpu: u32,
    /// Indices of the model's shards on this GPU, in the order they were verified.
    pub shard_indices: Vec<u32>,
    /// Bytes re-hashed on this GPU.
    pub bytes: u64,
    /// Wall time of this GPU's verifications.
    #[serde(serialize_with = "serialize_nanos")]
    pub elapsed: Duration,
}

/// What one GPU's verification thread hands back: its report and each shard's result.
type GpuOutcome = (GpuVerifyReport, Vec<(u32, Result<VerifyReport>)>);

fn serialize_nanos<S: serde::Serializer>(
    d: &Duration,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_u64(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// What identifies a file's content for the before/after check of a seal: device, inode, size,
/// modification and status-change times (a writer can restore mtime with `utime`, not ctime).
fn file_identity(metadata: &std::fs::Metadata) -> (u64, u64, u64, i64, i64, i64, i64) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt as _;
        (
            metadata.dev(),
            metadata.ino(),
            metadata.size(),
            metadata.mtime(),
            metadata.mtime_nsec(),
            metadata.ctime(),
            metadata.ctime_nsec(),
        )
    }
    #[cfg(not(unix))]
    {
        (0, 0, metadata.len(), 0, 0, 0, 0)
    }
}

/// The tensor table sealed with a shard must describe the sealed bytes: the header is read back
/// from device memory (the header only, never the weights after it) and parsed again as the same
/// format; a table that differs from the one read before the upload means the file changed in
/// between (a writer flipping the header, say), and nothing is sealed.
fn check_table_against_device(
    table: &TensorTable,
    buffer: &dyn DeviceBuffer,
    len: u64,
) -> Result<()> {
    let choice = match table.format {
        ModelFormat::Raw => return Ok(()),
        ModelFormat::Gguf { .. } => FormatChoice::Gguf,
        ModelFormat::Safetensors => FormatChoice::Safetensors,
    };
    let header = buffer.read_prefix(table.data_offset)?;
    let mut reader = header.as_slice();
    match read_tensor_table_as(&mut reader, len, choice, None) {
        Ok(sealed) if sealed == *table => Ok(()),
        Ok(_) => Err(VramError::HeaderChanged {
            reason: "the header in device memory describes other tensors than the header read \
                     before the upload"
                .to_owned(),
        }),
        Err(error) => Err(VramError::HeaderChanged {
            reason: format!("the header in device memory no longer parses ({error})"),
        }),
    }
}

/// Where a seal's bytes come from: any reader (sequential) or a file (the backend may read it in
/// parallel).
enum Source<'a> {
    Reader(&'a mut dyn Read),
    File(&'a std::fs::File),
}

/// Seals model shards into device memory and keeps them honest. `Send + Sync`: share it behind an
/// `Arc` across threads.
pub struct VramManager {
    id: u64,
    keys: KeySet,
    backend: Arc<dyn Backend>,
    devices: Vec<DeviceInfo>,
    ledger: Arc<CapacityLedger>,
    config: ManagerConfig,
    sink: Arc<dyn AuditSink>,
    state: Mutex<WorkerState>,
}

impl std::fmt::Debug for VramManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VramManager")
            .field("backend", &self.backend.kind())
            .field("devices", &self.devices.len())
            .field("config", &self.config)
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

impl VramManager {
    /// A manager with default settings and no audit sink beyond `tracing`.
    ///
    /// # Errors
    /// As [`with_config`](Self::with_config).
    pub fn new_with_token(token: &WorkerToken, backend: Arc<dyn Backend>) -> Result<Self> {
        Self::with_config(
            token,
            backend,
            ManagerConfig::default(),
            Arc::new(NoAuditSink),
        )
    }

    /// A manager over `backend`, with keys derived from `token`.
    ///
    /// # Errors
    /// Backend errors from the device query; [`VramError::BackendUnavailable`] when the backend has
    /// no device; [`VramError::PolicyViolation`] (audited) when a device fails the device policy
    /// (an integrated GPU, or ECC off while required): the worker refuses to start (WORKER-4163).
    pub fn with_config(
        token: &WorkerToken,
        backend: Arc<dyn Backend>,
        config: ManagerConfig,
        sink: Arc<dyn AuditSink>,
    ) -> Result<Self> {
        let devices = backend.devices()?;
        if devices.is_empty() {
            return Err(VramError::BackendUnavailable {
                backend: backend.kind().name(),
                reason: "no device found".to_owned(),
            });
        }
        for device in &devices {
            if let DeviceVerdict::Refused(reason) =
                config.device_policy.verdict(backend.kind(), device)
            {
                let event = AuditEvent::PolicyViolation {
                    gpu: device.index,
                    reason: reason.clone(),
                };
                let entry = AuditEntry {
                    at_ns: unix_nanos(SystemTime::now()),
                    backend: backend.kind(),
                    severity: event.severity(),
                    event,
                };
                crate::audit::trace(&entry);
                if let Err(error) = sink.record(&entry) {
                    tracing::error!(%error, "audit sink failed while recording a policy violation");
                }
                return Err(VramError::PolicyViolation { reason });
            }
        }
        let totals: Vec<u64> = devices.iter().map(|d| d.total_bytes).collect();
        let mut id = [0u8; 8];
        if getrandom::fill(&mut id).is_err() {
            id = unix_nanos(SystemTime::now()).to_be_bytes();
        }
        Ok(Self {
            id: u64::from_be_bytes(id),
            keys: token.derive_keys(),
            backend,
            devices,
            ledger: CapacityLedger::new(&totals, config.headroom_bytes),
            config,
            sink,
            state: Mutex::new(WorkerState::Running),
        })
    }

    /// The backend's kind (`cuda` or `sim`).
    #[must_use]
    pub fn backend_kind(&self) -> BackendKind {
        self.backend.kind()
    }

    /// The devices found at start.
    #[must_use]
    pub fn devices(&self) -> &[DeviceInfo] {
        &self.devices
    }

    /// The settings.
    #[must_use]
    pub const fn config(&self) -> &ManagerConfig {
        &self.config
    }

    /// The worker's public Ed25519 key: what verifiers of its attestations and audit log hold.
    #[must_use]
    pub const fn public_key(&self) -> &PublicKey {
        self.keys.identity.public_key()
    }

    /// The head of the audit sink's hash chain (its last durable record), when the sink keeps one.
    #[must_use]
    pub fn audit_head(&self) -> Option<crate::audit::AuditHead> {
        self.sink.head()
    }

    /// Current worker state.
    #[must_use]
    pub fn state(&self) -> WorkerState {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Capacity snapshot of device `gpu`.
    ///
    /// # Errors
    /// [`VramError::InvalidGpuIndex`].
    pub fn capacity(&self, gpu: u32) -> Result<Capacity> {
        self.ledger.capacity(gpu)
    }

    /// Device capacity in bytes.
    ///
    /// # Errors
    /// [`VramError::InvalidGpuIndex`].
    pub fn total_vram(&self, gpu: u32) -> Result<u64> {
        Ok(self.capacity(gpu)?.total)
    }

    /// Bytes admitted on `gpu`.
    ///
    /// # Errors
    /// [`VramError::InvalidGpuIndex`].
    pub fn used_vram(&self, gpu: u32) -> Result<u64> {
        Ok(self.capacity(gpu)?.used)
    }

    /// Bytes that can still be admitted on `gpu` (after headroom).
    ///
    /// # Errors
    /// [`VramError::InvalidGpuIndex`].
    pub fn available_vram(&self, gpu: u32) -> Result<u64> {
        Ok(self.capacity(gpu)?.available)
    }

    /// Seals an in-memory model as a single shard with default options.
    ///
    /// # Errors
    /// See [`seal_reader`](Self::seal_reader).
    pub fn seal_model(&self, bytes: &[u8], gpu: u32) -> Result<SealedShard> {
        self.seal_model_with(bytes, gpu, &SealOptions::default())
    }

    /// Seals an in-memory model.
    ///
    /// # Errors
    /// See [`seal_reader`](Self::seal_reader).
    pub fn seal_model_with(
        &self,
        bytes: &[u8],
        gpu: u32,
        opts: &SealOptions,
    ) -> Result<SealedShard> {
        self.ensure_running()?;
        let mut opts = opts.clone();
        if opts.tensor_table.is_none() && !bytes.is_empty() {
            // The header is validated before anything is reserved, allocated or uploaded.
            let mut reader = bytes;
            opts.tensor_table = Some(Arc::new(read_tensor_table_as(
                &mut reader,
                bytes.len() as u64,
                opts.format,
                None,
            )?));
        }
        let mut source = bytes;
        self.seal_reader(&mut source, bytes.len() as u64, gpu, &opts)
    }

    /// Seals a model file, streamed into device memory with bounded host memory. The file must be a
    /// regular file and must not change while it is read.
    ///
    /// # Errors
    /// [`VramError::Io`] when it cannot be read, [`VramError::SourceChanged`] when it changed during
    /// the upload; otherwise see [`seal_reader`](Self::seal_reader).
    pub fn seal_file(&self, path: &Path, gpu: u32, opts: &SealOptions) -> Result<SealedShard> {
        let file = std::fs::File::open(path).map_err(|source| VramError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        self.seal_open_file(file, path, gpu, opts)
    }

    /// Seals an already opened file (as [`ModelsDir::open`](crate::ModelsDir::open) hands it over,
    /// after checking where it is), with the checks of [`seal_file`](Self::seal_file). `path` is only
    /// used in messages.
    ///
    /// # Errors
    /// As [`seal_file`](Self::seal_file).
    pub fn seal_open_file(
        &self,
        mut file: std::fs::File,
        path: &Path,
        gpu: u32,
        opts: &SealOptions,
    ) -> Result<SealedShard> {
        let io = |source| VramError::Io {
            path: path.to_path_buf(),
            source,
        };
        self.ensure_running()?;
        let before = file.metadata().map_err(io)?;
        if !before.is_file() {
            return Err(VramError::InvalidInput {
                field: "model path",
                reason: format!("{} is not a regular file", path.display()),
            });
        }
        let mut opts = opts.clone();
        if opts.tensor_table.is_none() && before.len() > 0 {
            // The header is validated before anything is reserved, allocated or uploaded.
            let mut header = std::io::BufReader::new(&file);
            let name = path.file_name().and_then(|n| n.to_str());
            opts.tensor_table = Some(Arc::new(read_tensor_table_as(
                &mut header,
                before.len(),
                opts.format,
                name,
            )?));
            file.seek(std::io::SeekFrom::Start(0)).map_err(io)?;
        }
        let shard = self.seal_source(Source::File(&file), before.len(), gpu, &opts)?;
        let after = file.metadata().map_err(io)?;
        if after.len() != before.len() {
            // Dropping the shard frees its memory and capacity.
            return Err(VramError::SourceChanged {
                expected: before.len(),
                actual: after.len(),
            });
        }
        if file_identity(&after) != file_identity(&before) {
            return Err(VramError::HeaderChanged {
                reason:
                    "the file was modified during the upload (its device, inode, size, mtime or \
                         ctime changed)"
                        .to_owned(),
            });
        }
        Ok(shard)
    }

    /// Seals `len` bytes read from `source` onto device `gpu`.
    ///
    /// # Errors
    /// Input errors ([`VramError::EmptyModel`], [`VramError::ModelTooLarge`],
    /// [`VramError::InvalidGpuIndex`], [`VramError::InvalidShardId`], [`VramError::InvalidInput`]),
    /// admission errors ([`VramError::DuplicateShardId`], [`VramError::InsufficientVram`]), backend
    /// errors, [`VramError::SourceChanged`], [`VramError::DigestMismatch`],
    /// [`VramError::WorkerStopped`]. On any error nothing stays allocated or reserved.
    pub fn seal_reader(
        &self,
        source: &mut dyn Read,
        len: u64,
        gpu: u32,
        opts: &SealOptions,
    ) -> Result<SealedShard> {
        self.seal_source(Source::Reader(source), len, gpu, opts)
    }

    fn seal_source(
        &self,
        source: Source<'_>,
        len: u64,
        gpu: u32,
        opts: &SealOptions,
    ) -> Result<SealedShard> {
        self.ensure_running()?;
        if len == 0 {
            return Err(VramError::EmptyModel);
        }
        if len > self.config.max_model_bytes {
            return Err(VramError::ModelTooLarge {
                size: len,
                max: self.config.max_model_bytes,
            });
        }
        let device = self.device(gpu)?;
        validate_model_ref(&opts.model_ref)?;
        validate_shard_position(opts.shard_index, opts.total_shards)?;
        let shard_id = opts.shard_id.clone().unwrap_or_else(ShardId::generate);

        let started = Instant::now();
        let reservation = self
            .ledger
            .reserve(gpu, len, &shard_id)
            .inspect_err(|e| self.allocation_failed(gpu, len, e))?;
        let buffer = self
            .backend
            .allocate(
                gpu,
                len,
                opts.tensor_table.as_ref().map_or(0, |t| t.data_offset),
            )
            .inspect_err(|e| self.allocation_failed(gpu, len, e))?;
        tracing::debug!(
            bytes = len,
            gpu,
            ms = started.elapsed().as_secs_f64() * 1e3,
            "seal: reserved and allocated"
        );
        self.check_residency(gpu, buffer.residency()?)?;
        let capacity = self.ledger.capacity(gpu)?;
        self.audit(AuditEvent::VramAllocated {
            shard_id: shard_id.clone(),
            gpu,
            bytes: len,
            used_after: capacity.used,
            total: capacity.total,
        })?;
        // From here on the allocation is in the audit trail; a failed seal records its release too
        // (RP-005). The buffer and reservation are dropped (freed) on every error path.
        let released = AuditEvent::VramDeallocated {
            shard_id: shard_id.clone(),
            gpu,
            bytes: len,
        };
        let shard = self.fill_and_seal(
            source,
            len,
            gpu,
            device,
            shard_id,
            buffer,
            reservation,
            opts,
        );
        if shard.is_err() {
            self.audit_best_effort(released);
        }
        shard
    }

    /// The part of [`seal_reader`](Self::seal_reader) after allocation: upload, digest, compare,
    /// seal, audit.
    #[expect(clippy::too_many_arguments, reason = "the pieces of one seal, private")]
    fn fill_and_seal(
        &self,
        source: Source<'_>,
        len: u64,
        gpu: u32,
        device: &DeviceInfo,
        shard_id: ShardId,
        mut buffer: Box<dyn DeviceBuffer>,
        reservation: crate::capacity::Reservation,
        opts: &SealOptions,
    ) -> Result<SealedShard> {
        let progress = |n: u64| {
            if let Some(report) = &opts.progress {
                report(n);
            }
        };
        let started = Instant::now();
        match source {
            Source::Reader(reader) => buffer.upload(reader, &mut |n| progress(n))?,
            Source::File(file) => buffer.upload_file(file, &progress)?,
        }
        let uploaded = Instant::now();
        // The digest is measured where the bytes now are, not from the host bytes we sent.
        let tree = buffer.tree_digest()?;
        let measured = Instant::now();
        if let Some(expected) = opts.expected_digest
            && expected != tree.digest()
        {
            return Err(VramError::DigestMismatch {
                expected,
                actual: tree.digest(),
            });
        }
        if let Some(table) = &opts.tensor_table {
            check_table_against_device(table, buffer.as_ref(), len)?;
        }

        let sealed_at_ns = unix_nanos(SystemTime::now());
        let record = SealRecord {
            shard_id,
            digest: tree.digest(),
            vram_bytes: len,
            gpu_device: gpu,
            device_uuid: device.uuid,
            sealed_at_ns,
            backend: self.backend.kind(),
            model_ref: opts.model_ref.clone(),
            shard_index: opts.shard_index,
            total_shards: opts.total_shards,
            tensor_table_digest: opts.tensor_table.as_ref().map(|t| t.digest()).transpose()?,
        };
        let tag = record.sign(&self.keys.seal)?;
        let shard = SealedShard {
            record,
            tensor_table: opts.tensor_table.clone(),
            tag,
            sealed_tree: tree,
            manager_id: self.id,
            buffer,
            _reservation: reservation,
        };
        // Fails closed: if the seal cannot be audited, the shard is dropped (memory freed).
        self.audit(AuditEvent::VramSealed {
            shard_id: shard.record.shard_id.clone(),
            gpu,
            vram_bytes: len,
            digest: shard.record.digest,
            model_ref: shard.record.model_ref.clone(),
        })?;
        let ms =
            |from: Instant, to: Instant| to.saturating_duration_since(from).as_secs_f64() * 1e3;
        let done = Instant::now();
        tracing::debug!(
            bytes = len,
            gpu,
            upload_ms = ms(started, uploaded),
            digest_ms = ms(uploaded, measured),
            check_sign_audit_ms = ms(measured, done),
            "seal: phases"
        );
        Ok(shard)
    }

    /// Verifies a shard: the seal's HMAC in constant time, the residency of its memory, and its
    /// digest re-measured in device memory. Allowed in the `Stopped` state (for diagnosis).
    ///
    /// # Errors
    /// [`VramError::SealForgery`] when the record or tag was altered; [`VramError::Corruption`] (with
    /// the damaged 512 KiB ranges) when the bytes changed; [`VramError::PolicyViolation`]. Each of
    /// these is audited as critical and stops the worker. [`VramError::ForeignShard`] for a handle
    /// from another manager.
    pub fn verify_sealed(&self, shard: &SealedShard) -> Result<VerifyReport> {
        self.verify_with(shard, None).map(|(report, _)| report)
    }

    /// [`verify_sealed`](Self::verify_sealed) with the digest confined to `budget` SMs (see
    /// [`SmBudget`]): what a background verification beside a running model uses. Returns how the
    /// backend confined it. Failures follow the same path as any verification (critical audit
    /// record, worker stopped, damaged tensors named).
    ///
    /// # Errors
    /// As [`verify_sealed`](Self::verify_sealed).
    pub fn verify_sealed_within(
        &self,
        shard: &SealedShard,
        budget: SmBudget,
    ) -> Result<(VerifyReport, Confinement)> {
        self.verify_with(shard, Some(budget))
    }

    fn verify_with(
        &self,
        shard: &SealedShard,
        budget: Option<SmBudget>,
    ) -> Result<(VerifyReport, Confinement)> {
        let started = Instant::now();
        self.check_owner(shard)?;
        self.check_seal(shard)?;
        let residency = self.check_residency(shard.record.gpu_device, shard.buffer.residency()?)?;
        // The digest alone while the shard is intact (the fast path); the whole tree, to localise
        // the damage, only after a mismatch (see `damaged_ranges`).
        let (now, tree, confinement) = match budget {
            Some(budget) => {
                let (tree, how) = shard.buffer.tree_digest_within(budget)?;
                (tree.digest(), Some(tree), how)
            }
            None => (shard.buffer.digest()?, None, Confinement::Unconfined),
        };
        if now != shard.record.digest {
            let damaged = damaged_ranges(shard, tree);
            let tensors = shard.tensors_in(&damaged);
            return Err(self.incident(
                AuditEvent::SealVerificationFailed {
                    shard_id: shard.record.shard_id.clone(),
                    gpu: shard.record.gpu_device,
                    kind: FailureKind::Corruption,
                    damaged: damaged.clone(),
                    tensors: tensors.clone(),
                },
                VramError::Corruption {
                    shard_id: shard.record.shard_id.clone(),
                    damaged,
                    tensors,
                },
            ));
        }
        self.audit(AuditEvent::SealVerified {
            shard_id: shard.record.shard_id.clone(),
            gpu: shard.record.gpu_device,
            vram_bytes: shard.record.vram_bytes,
        })?;
        Ok((
            VerifyReport {
                shard_id: shard.record.shard_id.clone(),
                digest: now,
                vram_bytes: shard.record.vram_bytes,
                elapsed: started.elapsed(),
                backend: shard.record.backend,
                residency,
            },
            confinement,
        ))
    }

    /// Verifies the shard (CI-007) and then lends its weights to `run` for one call. The borrow cannot
    /// outlive the call. This is the only way to reach a shard's device memory.
    ///
    /// # Errors
    /// [`VramError::WorkerStopped`], or any error of [`verify_sealed`](Self::verify_sealed).
    pub fn execute<R>(&self, shard: &SealedShard, run: impl FnOnce(Weights<'_>) -> R) -> Result<R> {
        self.ensure_running()?;
        self.verify_sealed(shard)?;
        let weights = shard.buffer.weights()?.with_table(shard.tensor_table());
        Ok(run(weights))
    }

    /// Verifies the shard (CI-007) and lends it for as long as the returned [`Lease`] lives: what
    /// an inference engine that keeps tensors on the shard's memory (Python's DLPack views) needs.
    /// The lease holds the shard (an `Arc`), so its memory stays allocated while any lease exists:
    /// [`deallocate`](Self::deallocate) needs the shard itself, which `Arc::try_unwrap` gives only
    /// once the last lease is dropped (report [`VramError::ShardInUse`] until then).
    /// Re-verify before each request ([`verify_sealed`](Self::verify_sealed)).
    ///
    /// # Errors
    /// As [`execute`](Self::execute).
    pub fn lend(&self, shard: &Arc<SealedShard>) -> Result<Lease> {
        self.ensure_running()?;
        self.verify_sealed(shard)?;
        let location = shard.buffer.weights()?.location();
        Ok(Lease::new(Arc::clone(shard), location))
    }

    /// Attests, for the caller's `nonce` (16 to 64 bytes), that the shard is resident and intact now
    /// (VP-006): a **fresh** [`verify_sealed`](Self::verify_sealed), then a statement binding the seal
    /// record and tag, the device, the driver version, the backend, the residency verdict, the nonce,
    /// the time, the verification's result and the audit log head, signed with the worker's Ed25519
    /// key as a DSSE envelope around an in-toto Statement. See
    /// [`attestation`](crate::attestation).
    ///
    /// # Errors
    /// [`VramError::WorkerStopped`]; [`VramError::InvalidInput`] for a bad nonce; any error of
    /// [`verify_sealed`](Self::verify_sealed) (no attestation is made for a shard that fails).
    pub fn attest(&self, shard: &SealedShard, nonce: &[u8]) -> Result<AttestationEnvelope> {
        self.ensure_running()?;
        validate_nonce(nonce)?;
        let report = self.verify_sealed(shard)?;
        let device = self.device(shard.record.gpu_device)?;
        let attestation = Attestation {
            record: shard.record.clone(),
            seal_tag: shard.tag,
            device_name: device.name.clone(),
            driver_version: self.backend.driver_version()?,
            unified_memory: device.unified_memory,
            residency: report.residency,
            nonce: nonce.to_vec(),
            attested_at_ns: unix_nanos(SystemTime::now()),
            verified_digest: report.digest,
            verified_bytes: report.vram_bytes,
            verify_elapsed_ns: nanos(report.elapsed),
            audit_head: self.sink.head(),
        };
        attestation.sign(&self.keys.identity)
    }

    /// Binds the shards of one model together: checks each shard (this manager's, and its own seal,
    /// in constant time — a forged one is an incident, as in [`verify_sealed`](Self::verify_sealed)),
    /// that they agree on `model_ref`, `total_shards` and backend, and that every index
    /// `0..total_shards` is given exactly once; then makes the model seal (HMAC-SHA256 under the
    /// worker's seal key over the canonical [`ModelSealRecord`], `docs/model-seal.md`) and audits
    /// `model_sealed`. Device memory is not touched: the shards are not re-hashed (their own seals
    /// vouch for their digests; [`verify_model`](Self::verify_model) re-hashes).
    ///
    /// # Errors
    /// [`VramError::WorkerStopped`]; [`VramError::InvalidInput`] for no shards or more than
    /// [`MAX_MODEL_SHARDS`]; [`VramError::ForeignShard`], [`VramError::SealForgery`] (audited, the
    /// worker stops); [`VramError::ModelShardMismatch`] for a shard of another model (another
    /// `model_ref`, `total_shards` or backend); [`VramError::ModelShardDuplicated`],
    /// [`VramError::ModelShardMissing`], [`VramError::ModelShardExtra`]; [`VramError::Audit`].
    pub fn seal_model_set(&self, shards: &[&SealedShard]) -> Result<SealedModel> {
        self.ensure_running()?;
        for shard in shards {
            self.check_owner(shard)?;
            self.check_seal(shard)?;
        }
        self.make_model_seal(shards)
    }

    /// Binds as one model shards held by **other processes of this worker** — processes started
    /// with the same worker token, such as one process per GPU under `torch.distributed` — given
    /// as their seal records and tags (gathered by the caller, e.g. with `gather_object`). Each tag
    /// is checked under this worker's seal key in constant time (a record that does not verify is
    /// forgery: audited critical, the worker stops), then the set is checked and sealed exactly as
    /// [`seal_model_set`](Self::seal_model_set) does. The shards' memory is not read here: each
    /// process verifies its own ([`attest_model_gathered`](Self::attest_model_gathered)).
    ///
    /// # Errors
    /// As [`seal_model_set`](Self::seal_model_set) ([`VramError::SealForgery`] for a record whose
    /// tag does not verify).
    pub fn seal_model_records(&self, shards: &[(SealRecord, Tag)]) -> Result<SealedModel> {
        self.ensure_running()?;
        for (record, tag) in shards {
            self.check_record_seal(record, tag)?;
        }
        let refs: Vec<&(SealRecord, Tag)> = shards.iter().collect();
        self.make_model_seal(&refs)
    }

    /// A shard seal record's HMAC under this worker's seal key (constant time); a failure is forgery
    /// (audited critical, the worker stops).
    fn check_record_seal(&self, record: &SealRecord, tag: &Tag) -> Result<()> {
        if record.verify(&self.keys.seal, tag).is_ok() {
            return Ok(());
        }
        Err(self.incident(
            AuditEvent::SealVerificationFailed {
                shard_id: record.shard_id.clone(),
                gpu: record.gpu_device,
                kind: FailureKind::Forgery,
                damaged: Vec::new(),
                tensors: Vec::new(),
            },
            VramError::SealForgery {
                shard_id: record.shard_id.clone(),
            },
        ))
    }

    /// The model seal over `shards` (each already checked): agreement on `model_ref`,
    /// `total_shards` and backend, every index exactly once, then the record, its tag and the
    /// `model_sealed` audit record.
    fn make_model_seal<T: SealedParts>(&self, shards: &[&T]) -> Result<SealedModel> {
        let first = shards.first().ok_or_else(|| VramError::InvalidInput {
            field: "shards",
            reason: "a model seal needs at least one shard".to_owned(),
        })?;
        let model_ref = first.record().model_ref.clone();
        let total_shards = first.record().total_shards;
        let backend = first.record().backend;
        if total_shards > MAX_MODEL_SHARDS {
            return Err(VramError::InvalidInput {
                field: "total_shards",
                reason: format!(
                    "the shards say the model has {total_shards} shards; a model seal names at most {MAX_MODEL_SHARDS}"
                ),
            });
        }
        for shard in shards {
            let record = shard.record();
            let reason = if record.model_ref != model_ref {
                Some(format!(
                    "its seal names model {:?}, shard {} names {model_ref:?}",
                    record.model_ref,
                    first.record().shard_index
                ))
            } else if record.total_shards != total_shards {
                Some(format!(
                    "its seal says the model has {} shard(s), shard {} says {total_shards}",
                    record.total_shards,
                    first.record().shard_index
                ))
            } else if record.backend != backend {
                Some(format!(
                    "it was sealed on backend {}, shard {} on {backend}",
                    record.backend,
                    first.record().shard_index
                ))
            } else {
                None
            };
            if let Some(reason) = reason {
                return Err(VramError::ModelShardMismatch {
                    model_ref,
                    shard_index: record.shard_index,
                    shard_id: record.shard_id.clone(),
                    reason,
                });
            }
        }
        let ordered = slot_shards(&model_ref, total_shards, shards)?;
        let record = ModelSealRecord {
            backend,
            model_ref,
            sealed_at_ns: unix_nanos(SystemTime::now()),
            shards: ordered
                .iter()
                .map(|shard| ModelShardEntry::new(shard.record(), shard.tag()))
                .collect(),
        };
        let tag = record.sign(&self.keys.seal)?;
        // Fails closed: a model seal that cannot be audited is not handed out.
        self.audit(AuditEvent::ModelSealed {
            model_ref: record.model_ref.clone(),
            total_shards,
            record_digest: record.record_digest()?,
        })?;
        Ok(SealedModel { record, tag })
    }

    /// Verifies a whole model: the model seal's HMAC in constant time (a forged or altered one is an
    /// incident: audited critical, the worker stops), each given shard's owner and own seal, that the
    /// given shards are **exactly** the ones the model seal names (each index once; id, digest, size,
    /// GPU, device UUID and seal tag equal to its entry), and then every shard with
    /// [`verify_sealed`](Self::verify_sealed) — **in parallel across GPUs**: one thread per GPU,
    /// the shards on one GPU one after another. A shard that fails follows its own path (audited, the
    /// worker stops, damaged tensors named); every shard is still verified, and all failures are
    /// returned. Allowed in the `Stopped` state, like `verify_sealed`.
    ///
    /// # Errors
    /// [`VramError::ModelSealForgery`]; [`VramError::ForeignShard`], [`VramError::SealForgery`];
    /// [`VramError::ModelShardExtra`], [`VramError::ModelShardDuplicated`],
    /// [`VramError::ModelShardMissing`], [`VramError::ModelShardMismatch`] (the set is not the
    /// model's; nothing is re-hashed); [`VramError::ModelShardFailed`] with the first failed shard by
    /// index and its error (corruption, policy violation, ...) and the others that failed.
    pub fn verify_model(
        &self,
        model: &SealedModel,
        shards: &[&SealedShard],
    ) -> Result<ModelVerifyReport> {
        self.verify_model_ordered(model, shards)
            .map(|(report, _)| report)
    }

    /// [`verify_model`](Self::verify_model), also handing back the shards in index order.
    fn verify_model_ordered<'a>(
        &self,
        model: &SealedModel,
        shards: &[&'a SealedShard],
    ) -> Result<(ModelVerifyReport, Vec<&'a SealedShard>)> {
        let started = Instant::now();
        self.check_model_seal(model)?;
        for shard in shards {
            self.check_owner(shard)?;
            self.check_seal(shard)?;
        }
        let record = &model.record;
        let ordered = self.match_model_shards(record, shards)?;

        // One group per GPU, shards in index order.
        let mut groups: std::collections::BTreeMap<u32, Vec<(u32, &SealedShard)>> =
            std::collections::BTreeMap::new();
        for (index, shard) in (0u32..).zip(&ordered) {
            groups
                .entry(shard.record.gpu_device)
                .or_default()
                .push((index, *shard));
        }
        let outcomes: Vec<Result<GpuOutcome>> = std::thread::scope(|scope| {
            let handles: Vec<_> = groups
                .iter()
                .map(|(&gpu, group)| {
                    let handle = std::thread::Builder::new()
                        .name(format!("verify-gpu-{gpu}"))
                        .spawn_scoped(scope, move || self.verify_gpu_group(gpu, group));
                    (gpu, handle)
                })
                .collect();
            handles
                .into_iter()
                .map(|(gpu, handle)| match handle {
                    Ok(handle) => handle.join().map_err(|_| VramError::Backend {
                        reason: format!("the verification thread for GPU {gpu} panicked"),
                    }),
                    Err(error) => Err(VramError::Backend {
                        reason: format!(
                            "cannot start a verification thread for GPU {gpu}: {error}"
                        ),
                    }),
                })
                .collect()
        });

        let mut per_gpu = Vec::with_capacity(outcomes.len());
        let mut results: Vec<(u32, Result<VerifyReport>)> = Vec::with_capacity(ordered.len());
        for outcome in outcomes {
            let (gpu_report, shard_results) = outcome?;
            per_gpu.push(gpu_report);
            results.extend(shard_results);
        }
        results.sort_by_key(|(index, _)| *index);
        let mut reports = Vec::with_capacity(results.len());
        let mut failures: Vec<(u32, VramError)> = Vec::new();
        for (index, result) in results {
            match result {
                Ok(report) => reports.push(report),
                Err(error) => failures.push((index, error)),
            }
        }
        if !failures.is_empty() {
            let mut failures = failures.into_iter();
            if let Some((shard_index, error)) = failures.next() {
                return Err(VramError::ModelShardFailed {
                    model_ref: record.model_ref.clone(),
                    shard_index,
                    error: Box::new(error),
                    others: failures.collect(),
                });
            }
        }
        let total_bytes = reports
            .iter()
            .fold(0u64, |sum, r| sum.saturating_add(r.vram_bytes));
        Ok((
            ModelVerifyReport {
                model_ref: record.model_ref.clone(),
                shards: reports,
                total_bytes,
                elapsed: started.elapsed(),
                per_gpu,
            },
            ordered,
        ))
    }

    /// Verifies the shards of one GPU, one after another (a thread of
    /// [`verify_model`](Self::verify_model)).
    fn verify_gpu_group(&self, gpu: u32, group: &[(u32, &SealedShard)]) -> GpuOutcome {
        let started = Instant::now();
        let results: Vec<(u32, Result<VerifyReport>)> = group
            .iter()
            .map(|(index, shard)| (*index, self.verify_sealed(shard)))
            .collect();
        let bytes = results
            .iter()
            .filter_map(|(_, r)| r.as_ref().ok())
            .fold(0u64, |sum, r| sum.saturating_add(r.vram_bytes));
        (
            GpuVerifyReport {
                gpu,
                shard_indices: group.iter().map(|(index, _)| *index).collect(),
                bytes,
                elapsed: started.elapsed(),
            },
            results,
        )
    }

    /// The given shards in index order, when they are exactly the ones `record` names.
    fn match_model_shards<'a, T: SealedParts>(
        &self,
        record: &ModelSealRecord,
        shards: &[&'a T],
    ) -> Result<Vec<&'a T>> {
        let total = record.total_shards()?;
        let ordered = slot_shards(&record.model_ref, total, shards)?;
        for (entry, shard) in record.shards.iter().zip(&ordered) {
            let given = shard.record();
            let reason = if given.model_ref != record.model_ref {
                Some(format!(
                    "its seal names model {:?} (a shard of another model)",
                    given.model_ref
                ))
            } else if given.total_shards != total {
                Some(format!(
                    "its seal says the model has {} shard(s), the model seal {total}",
                    given.total_shards
                ))
            } else if given.backend != record.backend {
                Some(format!(
                    "it was sealed on backend {}, the model on {}",
                    given.backend, record.backend
                ))
            } else {
                entry.difference(given, shard.tag()).map(str::to_owned)
            };
            if let Some(reason) = reason {
                return Err(VramError::ModelShardMismatch {
                    model_ref: record.model_ref.clone(),
                    shard_index: entry.shard_index,
                    shard_id: given.shard_id.clone(),
                    reason,
                });
            }
        }
        Ok(ordered)
    }

    /// Attests, for the caller's `nonce` (16 to 64 bytes), that **every shard of a model** is resident
    /// and intact now (VP-006): a fresh [`verify_model`](Self::verify_model), then one statement
    /// naming every shard as a subject and carrying the model seal record and tag, each shard's seal
    /// record and tag, device, driver version, unified-memory facts, residency verdict and fresh
    /// digest, the nonce, the time and the audit log head, signed with the worker's Ed25519 key as a
    /// DSSE envelope ([`crate::model_attestation`]). Check it with
    /// [`AttestationEnvelope::verify_model`].
    ///
    /// # Errors
    /// [`VramError::WorkerStopped`]; [`VramError::InvalidInput`] for a bad nonce; any error of
    /// [`verify_model`](Self::verify_model) (no attestation is made for a model that fails).
    pub fn attest_model(
        &self,
        model: &SealedModel,
        shards: &[&SealedShard],
        nonce: &[u8],
    ) -> Result<AttestationEnvelope> {
        self.ensure_running()?;
        validate_nonce(nonce)?;
        let (report, ordered) = self.verify_model_ordered(model, shards)?;
        let driver_version = self.backend.driver_version()?;
        let attested = ordered
            .iter()
            .zip(&report.shards)
            .map(|(shard, verified)| {
                let device = self.device(shard.record.gpu_device)?;
                Ok(AttestedShard {
                    record: shard.record.clone(),
                    seal_tag: shard.tag,
                    device_name: device.name.clone(),
                    driver_version: driver_version.clone(),
                    unified_memory: device.unified_memory,
                    residency: verified.residency.clone(),
                    verified_digest: verified.digest,
                    verified_bytes: verified.vram_bytes,
                    verify_elapsed_ns: nanos(verified.elapsed),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let attestation = ModelAttestation {
            model: model.record.clone(),
            model_tag: model.tag,
            shards: attested,
            nonce: nonce.to_vec(),
            attested_at_ns: unix_nanos(SystemTime::now()),
            verify_elapsed_ns: nanos(report.elapsed),
            audit_head: self.sink.head(),
        };
        attestation.sign(&self.keys.identity)
    }

    /// One model attestation from the **fresh shard attestations** of the processes that hold the
    /// shards — processes of this worker (same worker token), e.g. one per GPU under
    /// `torch.distributed`, each having run [`attest`](Self::attest) for the same `nonce` — and the
    /// model seal made by [`seal_model_records`](Self::seal_model_records). Each envelope must
    /// verify under this worker's public key for `nonce`, each shard's seal record and tag must
    /// verify under the seal key (constant time; else forgery, audited, the worker stops), and the
    /// set must be exactly the model's (each index once, each shard the one the model seal names).
    /// The statement is the one [`attest_model`](Self::attest_model) makes, with each shard's
    /// device, residency and fresh digest as its own process measured them; its
    /// `verify_elapsed_ns` is the longest of the shards' (they ran in parallel) and its audit head
    /// is this process's. Check it with [`AttestationEnvelope::verify_model`].
    ///
    /// # Errors
    /// [`VramError::WorkerStopped`]; [`VramError::InvalidInput`] for a bad nonce or an envelope that
    /// does not verify (another key, another nonce, altered); [`VramError::ModelSealForgery`],
    /// [`VramError::SealForgery`]; the set errors of [`verify_model`](Self::verify_model).
    pub fn attest_model_gathered(
        &self,
        model: &SealedModel,
        envelopes: &[AttestationEnvelope],
        nonce: &[u8],
    ) -> Result<AttestationEnvelope> {
        self.ensure_running()?;
        validate_nonce(nonce)?;
        self.check_model_seal(model)?;
        let public = self.keys.identity.public_key();
        let mut attestations = Vec::with_capacity(envelopes.len());
        for (position, envelope) in envelopes.iter().enumerate() {
            let attestation =
                envelope
                    .verify(public, nonce)
                    .map_err(|error| VramError::InvalidInput {
                        field: "envelopes",
                        reason: format!(
                            "gathered attestation {position} does not verify for this worker and nonce: {error}"
                        ),
                    })?;
            self.check_record_seal(&attestation.record, &attestation.seal_tag)?;
            attestations.push(attestation);
        }
        let refs: Vec<&Attestation> = attestations.iter().collect();
        let ordered = self.match_model_shards(&model.record, &refs)?;
        let mut shards = Vec::with_capacity(ordered.len());
        let mut longest = 0u64;
        for attestation in ordered {
            longest = longest.max(attestation.verify_elapsed_ns);
            shards.push(AttestedShard {
                record: attestation.record.clone(),
                seal_tag: attestation.seal_tag,
                device_name: attestation.device_name.clone(),
                driver_version: attestation.driver_version.clone(),
                unified_memory: attestation.unified_memory,
                residency: attestation.residency.clone(),
                verified_digest: attestation.verified_digest,
                verified_bytes: attestation.verified_bytes,
                verify_elapsed_ns: attestation.verify_elapsed_ns,
            });
        }
        let attestation = ModelAttestation {
            model: model.record.clone(),
            model_tag: model.tag,
            shards,
            nonce: nonce.to_vec(),
            attested_at_ns: unix_nanos(SystemTime::now()),
            verify_elapsed_ns: longest,
            audit_head: self.sink.head(),
        };
        attestation.sign(&self.keys.identity)
    }

    /// The model seal's HMAC, in constant time. A failure is forgery: audited critical, and the
    /// worker stops.
    fn check_model_seal(&self, model: &SealedModel) -> Result<()> {
        if model.record.verify(&self.keys.seal, &model.tag).is_ok() {
            return Ok(());
        }
        Err(self.incident(
            AuditEvent::ModelSealVerificationFailed {
                model_ref: model.record.model_ref.clone(),
                total_shards: model.record.shards.len() as u64,
            },
            VramError::ModelSealForgery {
                model_ref: model.record.model_ref.clone(),
            },
        ))
    }

    /// Frees a shard after checking that it is this manager's and that its seal is intact
    /// (identity by shard id and seal, never by address). Audited (RP-005).
    ///
    /// The memory is freed in every case, since the handle is consumed; a handle that fails the
    /// check is reported (a forged one as a critical incident) rather than silently released.
    ///
    /// # Errors
    /// [`VramError::ForeignShard`] or [`VramError::SealForgery`].
    pub fn deallocate(&self, shard: SealedShard) -> Result<()> {
        self.check_owner(&shard)?;
        self.check_seal(&shard)?;
        let event = AuditEvent::VramDeallocated {
            shard_id: shard.record.shard_id.clone(),
            gpu: shard.record.gpu_device,
            bytes: shard.record.vram_bytes,
        };
        drop(shard);
        self.audit(event)
    }

    fn device(&self, gpu: u32) -> Result<&DeviceInfo> {
        let count = u32::try_from(self.devices.len()).unwrap_or(u32::MAX);
        usize::try_from(gpu)
            .ok()
            .and_then(|i| self.devices.get(i))
            .ok_or(VramError::InvalidGpuIndex { gpu, count })
    }

    fn check_owner(&self, shard: &SealedShard) -> Result<()> {
        if shard.manager_id == self.id {
            Ok(())
        } else {
            Err(VramError::ForeignShard {
                shard_id: shard.record.shard_id.clone(),
            })
        }
    }

    /// The seal's HMAC over the handle's current record, in constant time (CI-003). A failure is
    /// forgery: audited critical, and the worker stops.
    fn check_seal(&self, shard: &SealedShard) -> Result<()> {
        if shard.record.verify(&self.keys.seal, &shard.tag).is_ok() {
            return Ok(());
        }
        Err(self.incident(
            AuditEvent::SealVerificationFailed {
                shard_id: shard.record.shard_id.clone(),
                gpu: shard.record.gpu_device,
                kind: FailureKind::Forgery,
                damaged: Vec::new(),
                tensors: Vec::new(),
            },
            VramError::SealForgery {
                shard_id: shard.record.shard_id.clone(),
            },
        ))
    }

    fn ensure_running(&self) -> Result<()> {
        match self.state() {
            WorkerState::Running => Ok(()),
            WorkerState::Stopped { reason } => Err(VramError::WorkerStopped { reason }),
        }
    }

    /// Passes an acceptable verdict through; a violation is an incident (audited, worker stopped).
    fn check_residency(&self, gpu: u32, residency: Residency) -> Result<Residency> {
        match residency {
            Residency::DeviceMemory | Residency::Simulated => Ok(residency),
            Residency::Violation(reason) => Err(self.incident(
                AuditEvent::PolicyViolation {
                    gpu,
                    reason: reason.clone(),
                },
                VramError::PolicyViolation { reason },
            )),
        }
    }

    /// Records a critical event, moves the worker to `Stopped` and hands back `error`.
    fn incident(&self, event: AuditEvent, error: VramError) -> VramError {
        self.audit_best_effort(event);
        let newly_stopped = {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            if *state == WorkerState::Running {
                *state = WorkerState::Stopped {
                    reason: error.to_string(),
                };
                true
            } else {
                false
            }
        };
        if newly_stopped {
            self.audit_best_effort(AuditEvent::WorkerStopped {
                reason: error.to_string(),
            });
        }
        error
    }

    fn allocation_failed(&self, gpu: u32, requested: u64, error: &VramError) {
        self.audit_best_effort(AuditEvent::VramAllocationFailed {
            gpu,
            requested,
            reason: error.to_string(),
        });
    }

    fn entry(&self, event: AuditEvent) -> AuditEntry {
        AuditEntry {
            at_ns: unix_nanos(SystemTime::now()),
            backend: self.backend.kind(),
            severity: event.severity(),
            event,
        }
    }

    /// Traces and records; a sink failure is returned (fail closed).
    fn audit(&self, event: AuditEvent) -> Result<()> {
        let entry = self.entry(event);
        crate::audit::trace(&entry);
        self.sink.record(&entry)
    }

    /// Traces and records; a sink failure is only traced (the original error matters more).
    fn audit_best_effort(&self, event: AuditEvent) {
        if let Err(error) = self.audit(event) {
            tracing::error!(%error, "audit sink failed while recording a failure event");
        }
    }
}

/// The 512 KiB ranges where `shard` differs from its seal, after its digest did not match: from
/// `tree` when the failed measurement was a whole tree, else from a fresh one. The whole shard when
/// that measurement fails or finds no difference (the damage was seen once and is reported, even
/// if it is gone or hidden now).
fn damaged_ranges(shard: &SealedShard, tree: Option<TreeDigest>) -> Vec<ByteRange> {
    let whole = || {
        vec![ByteRange {
            start: 0,
            end: shard.record.vram_bytes,
        }]
    };
    let tree = match tree.map_or_else(|| shard.buffer.tree_digest(), Ok) {
        Ok(tree) => tree,
        Err(error) => {
            tracing::error!(%error, "the measurement to localise damage failed");
            return whole();
        }
    };
    let ranges = shard.sealed_tree.damaged_ranges(&tree);
    if ranges.is_empty() { whole() } else { ranges }
}

/// A duration in whole nanoseconds, saturating.
fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// A shard's seal record and tag: a [`SealedShard`] held here, or one gathered from another process
/// of this worker ([`VramManager::seal_model_records`], [`VramManager::attest_model_gathered`]).
trait SealedParts {
    fn record(&self) -> &SealRecord;
    fn tag(&self) -> &Tag;
}

impl SealedParts for SealedShard {
    fn record(&self) -> &SealRecord {
        &self.record
    }
    fn tag(&self) -> &Tag {
        &self.tag
    }
}

/// A seal record and tag gathered from another process.
impl SealedParts for (SealRecord, Tag) {
    fn record(&self) -> &SealRecord {
        &self.0
    }
    fn tag(&self) -> &Tag {
        &self.1
    }
}

/// A shard's fresh attestation gathered from another process carries its seal record and tag.
impl SealedParts for Attestation {
    fn record(&self) -> &SealRecord {
        &self.record
    }
    fn tag(&self) -> &Tag {
        &self.seal_tag
    }
}

/// Places `shards` by index: every index `0..total` exactly once, or the error that names the
/// first index out of range, given twice, or missing.
fn slot_shards<'a, T: SealedParts>(
    model_ref: &str,
    total: u32,
    shards: &[&'a T],
) -> Result<Vec<&'a T>> {
    let mut slots: Vec<Option<&'a T>> = vec![None; usize::try_from(total).unwrap_or(0)];
    if let Some(extra) = shards.iter().find(|s| s.record().shard_index >= total) {
        return Err(VramError::ModelShardExtra {
            model_ref: model_ref.to_owned(),
            shard_index: extra.record().shard_index,
            total_shards: total,
        });
    }
    for shard in shards {
        let index = shard.record().shard_index;
        match usize::try_from(index).ok().and_then(|i| slots.get_mut(i)) {
            Some(slot @ None) => *slot = Some(*shard),
            Some(Some(_)) => {
                return Err(VramError::ModelShardDuplicated {
                    model_ref: model_ref.to_owned(),
                    shard_index: index,
                });
            }
            None => {
                return Err(VramError::ModelShardExtra {
                    model_ref: model_ref.to_owned(),
                    shard_index: index,
                    total_shards: total,
                });
            }
        }
    }
    (0u32..)
        .zip(slots)
        .map(|(index, slot)| {
            slot.ok_or_else(|| VramError::ModelShardMissing {
                model_ref: model_ref.to_owned(),
                shard_index: index,
                total_shards: total,
            })
        })
        .collect()
}
