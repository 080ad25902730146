//! What the worker service holds: the manager, the resident shards, the models directory, who may
//! call what (API tokens and roles), the audit sink, metrics, and the permits that bound concurrent
//! heavy operations.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use vram_residency::{
    AttestationEnvelope, AuditSink, Confinement, ModelVerifyReport, ModelsDir, SealOptions,
    SealView, SealedModel, SealedShard, ShardId, SmBudget, VerifyReport, VramError, VramManager,
    WorkerState,
};

use super::auth::Access;
use super::error::{ApiError, classify};
use super::metrics::Metrics;
use super::transport::Transport;

/// One resident shard. Its public view never changes; the handle itself is behind a lock so that
/// verifications (readers) and eviction (the writer, which takes it out) never overlap.
pub struct ShardEntry {
    pub view: SealView,
    slot: RwLock<Option<SealedShard>>,
}

impl ShardEntry {
    fn new(shard: SealedShard) -> Self {
        Self {
            view: shard.view(),
            slot: RwLock::new(Some(shard)),
        }
    }

    /// Runs `f` on the shard unless it was evicted meanwhile. Blocking: call from blocking threads.
    pub fn with_shard<R>(&self, f: impl FnOnce(&SealedShard) -> R) -> Option<R> {
        let guard = self.slot.read().unwrap_or_else(PoisonError::into_inner);
        guard.as_ref().map(f)
    }

    /// Takes the shard out (waits for running verifications). Blocking.
    pub fn take(&self) -> Option<SealedShard> {
        self.slot
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }
}

/// A model sealed as a whole (`POST /v1/models`): its model seal and the ids of its shards, which stay
/// entries of their own (evicting one makes the model's verification fail: a missing shard).
pub struct ModelEntry {
    pub id: ShardId,
    pub sealed: SealedModel,
}

pub struct AppState {
    pub manager: Arc<VramManager>,
    pub models: ModelsDir,
    /// API tokens and their roles.
    pub access: Access,
    /// Where the service's own audit events go (the manager's sink).
    pub audit: Arc<dyn AuditSink>,
    pub metrics: Metrics,
    pub sweep_interval: Duration,
    /// SMs the sweep's verifications may use (`--sweep-sms`); `None`: the whole GPU.
    pub sweep_budget: Option<SmBudget>,
    /// The most bytes a sweep re-hashes per second of wall time (`--sweep-max-rate`); `None`: no
    /// cap.
    pub sweep_max_bytes_per_second: Option<u64>,
    /// How the sweep's verifications were confined (set after the first one).
    pub sweep_confinement: Mutex<Option<Confinement>>,
    /// How clients reach the service (reported by `GET /v1/worker`).
    pub transport: Transport,
    shards: Mutex<BTreeMap<ShardId, Arc<ShardEntry>>>,
    sealed_models: Mutex<BTreeMap<ShardId, Arc<ModelEntry>>>,
    ops: Arc<Semaphore>,
    max_ops: u32,
    shutting_down: AtomicBool,
}

impl AppState {
    pub fn new(
        manager: Arc<VramManager>,
        models: ModelsDir,
        access: Access,
        audit: Arc<dyn AuditSink>,
        max_ops: u32,
        sweep_interval: Duration,
        transport: Transport,
    ) -> Self {
        let max_ops = max_ops.max(1);
        Self {
            manager,
            models,
            access,
            audit,
            metrics: Metrics::new(),
            sweep_interval,
            sweep_budget: None,
            sweep_max_bytes_per_second: None,
            sweep_confinement: Mutex::new(None),
            transport,
            shards: Mutex::new(BTreeMap::new()),
            sealed_models: Mutex::new(BTreeMap::new()),
            ops: Arc::new(Semaphore::new(usize::try_from(max_ops).unwrap_or(1))),
            max_ops,
            shutting_down: AtomicBool::new(false),
        }
    }

    fn lock_shards(&self) -> MutexGuard<'_, BTreeMap<ShardId, Arc<ShardEntry>>> {
        // The map is only ever changed by single insert/remove calls; a poisoned lock is still whole.
        self.shards.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Refuses mutating and execute-like operations while the worker is stopped or shutting down.
    pub fn check_accepting(&self) -> Result<(), ApiError> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(ApiError::shutting_down());
        }
        match self.manager.state() {
            WorkerState::Running => Ok(()),
            WorkerState::Stopped { reason } => Err(VramError::WorkerStopped { reason }.into()),
        }
    }

    /// A permit for one heavy operation (seal, verify, attest); waits while all are taken.
    pub async fn permit(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        Arc::clone(&self.ops)
            .acquire_owned()
            .await
            .map_err(|_| ApiError::shutting_down())
    }

    pub fn entry(&self, id: &str) -> Result<Arc<ShardEntry>, ApiError> {
        let id = ShardId::new(id)?;
        self.lock_shards()
            .get(&id)
            .cloned()
            .ok_or_else(|| ApiError::shard_not_found(id.as_str()))
    }

    fn lock_models(&self) -> MutexGuard<'_, BTreeMap<ShardId, Arc<ModelEntry>>> {
        self.sealed_models
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub fn model(&self, id: &str) -> Result<Arc<ModelEntry>, ApiError> {
        let id = ShardId::new(id)?;
        self.lock_models()
            .get(&id)
            .cloned()
            .ok_or_else(|| ApiError::model_not_found(id.as_str()))
    }

    pub fn models_snapshot(&self) -> Vec<Arc<ModelEntry>> {
        self.lock_models().values().cloned().collect()
    }

    /// Runs `f` on the shards of `ids` together, each held against eviction meanwhile (read locks,
    /// taken in id order so that two such calls never wait on each other in a cycle). Blocking.
    fn with_shards<R>(
        &self,
        ids: &[ShardId],
        f: impl FnOnce(&[&SealedShard]) -> R,
    ) -> Result<R, ApiError> {
        let mut entries = ids
            .iter()
            .map(|id| {
                self.lock_shards()
                    .get(id)
                    .cloned()
                    .ok_or_else(|| ApiError::shard_not_found(id.as_str()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        entries.sort_by(|a, b| a.view.shard_id.cmp(&b.view.shard_id));
        entries.dedup_by(|a, b| a.view.shard_id == b.view.shard_id);
        let guards: Vec<_> = entries
            .iter()
            .map(|entry| entry.slot.read().unwrap_or_else(PoisonError::into_inner))
            .collect();
        let mut shards = Vec::with_capacity(guards.len());
        for (guard, entry) in guards.iter().zip(&entries) {
            shards.push(
                guard
                    .as_ref()
                    .ok_or_else(|| ApiError::shard_not_found(entry.view.shard_id.as_str()))?,
            );
        }
        Ok(f(&shards))
    }

    /// Seals the committed shards `ids` as one model and registers it under `id`. Blocking.
    pub fn seal_model_blocking(
        &self,
        id: ShardId,
        ids: &[ShardId],
    ) -> Result<Arc<ModelEntry>, ApiError> {
        if self.lock_models().contains_key(&id) {
            return Err(ApiError::duplicate_model(id.as_str()));
        }
        let sealed = self.with_shards(ids, |shards| self.manager.seal_model_set(shards))??;
        let entry = Arc::new(ModelEntry { id, sealed });
        let mut models = self.lock_models();
        if models.contains_key(&entry.id) {
            return Err(ApiError::duplicate_model(entry.id.as_str()));
        }
        models.insert(entry.id.clone(), Arc::clone(&entry));
        Ok(entry)
    }

    /// The shard ids a model seal names.
    fn model_shard_ids(model: &ModelEntry) -> Vec<ShardId> {
        model
            .sealed
            .record
            .shards
            .iter()
            .map(|entry| entry.shard_id.clone())
            .collect()
    }

    /// Verifies a model as a whole (every GPU at once) and counts each shard's result. Blocking.
    pub fn verify_model_blocking(&self, model: &ModelEntry) -> Result<ModelVerifyReport, ApiError> {
        let started = Instant::now();
        let result = self.with_shards(&Self::model_shard_ids(model), |shards| {
            self.manager.verify_model(&model.sealed, shards)
        })?;
        self.metrics
            .verify(&result_label(&result), started.elapsed());
        Ok(result?)
    }

    /// Attests a model as a whole for `nonce`. Blocking.
    pub fn attest_model_blocking(
        &self,
        model: &ModelEntry,
        nonce: &[u8],
    ) -> Result<AttestationEnvelope, ApiError> {
        let result = self.with_shards(&Self::model_shard_ids(model), |shards| {
            self.manager.attest_model(&model.sealed, shards, nonce)
        })?;
        self.metrics.attest(&result_label(&result));
        Ok(result?)
    }

    /// Forgets a model seal (its shards stay resident). Returns whether there was one.
    pub fn forget_model(&self, id: &ShardId) -> bool {
        self.lock_models().remove(id).is_some()
    }

    pub fn snapshot(&self) -> Vec<Arc<ShardEntry>> {
        self.lock_shards().values().cloned().collect()
    }

    pub fn shard_count(&self) -> usize {
        self.lock_shards().len()
    }

    /// Seals `opened` (the model file `model`, opened inside the models directory by
    /// [`ModelsDir::open`] before an operation slot was taken) and registers the shard. Blocking.
    pub fn commit_blocking(
        &self,
        opened: vram_residency::models_dir::OpenModel,
        model: &str,
        gpu: u32,
        opts: &SealOptions,
    ) -> Result<SealView, ApiError> {
        let started = Instant::now();
        let sealed = self
            .manager
            .seal_open_file(opened.file, Path::new(model), gpu, opts);
        let shard = sealed?;
        // Latency of successful seals only: a refusal takes microseconds and says nothing.
        self.metrics.seal_latency(started.elapsed());
        let mut shards = self.lock_shards();
        if self.shutting_down.load(Ordering::SeqCst) {
            drop(shards);
            if let Err(error) = self.manager.deallocate(shard) {
                tracing::error!(%error, "freeing a shard sealed during shutdown");
            }
            return Err(ApiError::shutting_down());
        }
        let entry = Arc::new(ShardEntry::new(shard));
        let view = entry.view.clone();
        shards.insert(view.shard_id.clone(), entry);
        Ok(view)
    }

    /// Verifies one shard and counts the result. `None` when it was evicted meanwhile. Blocking.
    pub fn verify_blocking(&self, entry: &ShardEntry) -> Option<Result<VerifyReport, VramError>> {
        let started = Instant::now();
        let result = entry.with_shard(|shard| self.manager.verify_sealed(shard))?;
        self.metrics
            .verify(&result_label(&result), started.elapsed());
        Some(result)
    }

    /// Verifies one shard for the sweep: confined to `--sweep-sms` when set (a green context or a
    /// bounded grid; the first use is logged), else as [`verify_blocking`](Self::verify_blocking).
    /// Blocking.
    pub fn sweep_verify_blocking(
        &self,
        entry: &ShardEntry,
    ) -> Option<Result<VerifyReport, VramError>> {
        let Some(budget) = self.sweep_budget else {
            return self.verify_blocking(entry);
        };
        let started = Instant::now();
        let result = entry.with_shard(|shard| self.manager.verify_sealed_within(shard, budget))?;
        let result = result.map(|(report, confinement)| {
            let mut seen = self
                .sweep_confinement
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if seen.is_none() {
                tracing::info!(
                    ?confinement,
                    sms = budget.sms,
                    "sweep verifications are confined"
                );
            }
            *seen = Some(confinement);
            report
        });
        self.metrics
            .verify(&result_label(&result), started.elapsed());
        Some(result)
    }

    /// Attests one shard for `nonce` and counts the result. Blocking.
    pub fn attest_blocking(
        &self,
        entry: &ShardEntry,
        nonce: &[u8],
    ) -> Option<Result<AttestationEnvelope, VramError>> {
        let started = Instant::now();
        let result = entry.with_shard(|shard| self.manager.attest(shard, nonce))?;
        let label = result_label(&result);
        self.metrics.attest(&label);
        // The attestation's own fresh verification counts as a verification.
        if !matches!(
            result,
            Err(VramError::InvalidInput { .. } | VramError::WorkerStopped { .. })
        ) {
            self.metrics.verify(&label, started.elapsed());
        }
        Some(result)
    }

    /// Removes the shard from the registry and frees it (audited). Blocking.
    pub fn evict_blocking(&self, id: &ShardId) -> Result<u64, ApiError> {
        let entry = self
            .lock_shards()
            .remove(id)
            .ok_or_else(|| ApiError::shard_not_found(id.as_str()))?;
        let shard = entry
            .take()
            .ok_or_else(|| ApiError::shard_not_found(id.as_str()))?;
        let bytes = shard.record.vram_bytes;
        self.manager.deallocate(shard)?;
        Ok(bytes)
    }

    /// Starts shutting down: no new operations, waits for running ones (up to `grace`), then frees
    /// every shard (each one audited). Returns how many were freed.
    pub async fn shut_down(&self, grace: Duration) -> u64 {
        self.shutting_down.store(true, Ordering::SeqCst);
        let all = tokio::time::timeout(grace, self.ops.acquire_many(self.max_ops)).await;
        if all.is_err() {
            tracing::warn!(
                "operations still running after the grace period; freeing shards anyway"
            );
        }
        self.ops.close();
        let entries: Vec<Arc<ShardEntry>> = std::mem::take(&mut *self.lock_shards())
            .into_values()
            .collect();
        let manager = Arc::clone(&self.manager);
        let freed = tokio::task::spawn_blocking(move || {
            let mut freed: u64 = 0;
            for entry in entries {
                if let Some(shard) = entry.take() {
                    let id = shard.record.shard_id.clone();
                    match manager.deallocate(shard) {
                        Ok(()) => freed = freed.saturating_add(1),
                        Err(error) => {
                            tracing::error!(%error, shard = %id, "freeing a shard at shutdown")
                        }
                    }
                }
            }
            freed
        })
        .await;
        freed.unwrap_or(0)
    }
}

/// `ok`, or the API error code of the failure.
pub fn result_label<T>(result: &Result<T, VramError>) -> String {
    match result {
        Ok(_) => "ok".to_owned(),
        Err(error) => classify(error).1.to_owned(),
    }
}
