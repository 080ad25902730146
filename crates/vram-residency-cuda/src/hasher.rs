//! One owner per GPU for hashing: the compiled kernel, the digest workspaces kept for reuse and
//! the confined lanes of background verification. [`crate::tree`] does the passes; the hasher
//! decides where they run.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use vram_residency::backend::{Confinement, SmBudget};
use vram_residency::digest::{Digest, TreeDigest};

use crate::device::Device;
use crate::error::Result;
use crate::kernels::{self, HashKernels};
use crate::lane::Lane;
use crate::tree::{self, Workspace, WorkspaceSize};
use crate::vram::VramBuffer;

/// Workspaces kept per device.
const MAX_POOLED: usize = 4;

/// Hashing on one GPU.
pub struct Hasher {
    device: Arc<Device>,
    /// The kernel's PTX and its entry points in the primary context, made on first use.
    kernels: Mutex<Option<(Arc<str>, HashKernels)>>,
    pool: Mutex<Vec<Workspace>>,
    /// Confined lanes by SM budget, made on first use; each used by one verification at a time.
    lanes: Mutex<HashMap<SmBudget, Arc<Mutex<Lane>>>>,
    /// Why the mechanisms before the one in use were refused, once an `Auto` lane fell back.
    refusals: Mutex<Vec<String>>,
}

impl std::fmt::Debug for Hasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hasher")
            .field("device", &self.device.index())
            .finish_non_exhaustive()
    }
}

impl Hasher {
    /// The hasher of `device` (nothing is compiled or allocated until first use).
    #[must_use]
    pub fn new(device: Arc<Device>) -> Self {
        Self {
            device,
            kernels: Mutex::new(None),
            pool: Mutex::new(Vec::new()),
            lanes: Mutex::new(HashMap::new()),
            refusals: Mutex::new(Vec::new()),
        }
    }

    /// The device.
    #[must_use]
    pub const fn device(&self) -> &Arc<Device> {
        &self.device
    }

    fn kernels(&self) -> Result<(Arc<str>, HashKernels)> {
        let mut slot = self.kernels.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(made) = slot.as_ref() {
            return Ok(made.clone());
        }
        let ptx = kernels::ptx(self.device.compute_capability())?;
        let source: Arc<str> = Arc::from(ptx.to_src());
        let loaded = kernels::load(&self.device.ctx, ptx)?;
        *slot = Some((Arc::clone(&source), loaded.clone()));
        Ok((source, loaded))
    }

    /// A pooled workspace with room for a shard of `len` bytes, or a new one.
    fn take_workspace(&self, len: u64) -> Result<Workspace> {
        let size = WorkspaceSize::for_len(len);
        let pooled = {
            let mut pool = self.pool.lock().unwrap_or_else(PoisonError::into_inner);
            pool.iter()
                .position(|w| w.fits(size))
                .map(|index| pool.swap_remove(index))
        };
        match pooled {
            Some(workspace) => Ok(workspace),
            None => Workspace::new(&self.device.ctx, size),
        }
    }

    /// Back to the pool (its streams idle); when the pool is full the smallest is freed.
    fn give_back(&self, workspace: Workspace) {
        let mut pool = self.pool.lock().unwrap_or_else(PoisonError::into_inner);
        pool.push(workspace);
        if pool.len() > MAX_POOLED
            && let Some(smallest) = pool
                .iter()
                .enumerate()
                .min_by_key(|(_, w)| w.size().device)
                .map(|(index, _)| index)
        {
            drop(pool.swap_remove(smallest));
        }
    }

    /// The fs-verity digest of `buffer`, on the whole GPU.
    ///
    /// # Errors
    /// [`CudaError::Driver`] on a failed allocation, launch or copy; [`CudaError::Compile`] /
    /// [`CudaError::NvrtcMissing`] the first time, if the kernel cannot be built.
    pub fn measure(&self, buffer: &VramBuffer) -> Result<TreeDigest> {
        let (_, kernels) = self.kernels()?;
        self.device.bind()?;
        let mut workspace = self.take_workspace(buffer.len())?;
        let (reusable, measured) = tree::measure(&kernels, &mut workspace, buffer);
        if reusable {
            self.give_back(workspace);
        }
        measured
    }

    /// The fs-verity digest of `buffer` alone: [`measure`](Self::measure) without copying the
    /// level-1 hashes back (for a shard of several windows, level 2 is hashed on the GPU too).
    ///
    /// # Errors
    /// As [`measure`](Self::measure).
    pub fn digest(&self, buffer: &VramBuffer) -> Result<Digest> {
        let (_, kernels) = self.kernels()?;
        self.device.bind()?;
        let mut workspace = self.take_workspace(buffer.len())?;
        let (reusable, measured) = tree::measure_digest(&kernels, &mut workspace, buffer);
        if reusable {
            self.give_back(workspace);
        }
        measured
    }

    /// The fs-verity digest of `buffer` confined to `budget` (see [`crate::lane`]), and how it
    /// was confined. Verifications with the same budget take turns on one lane.
    ///
    /// # Errors
    /// As [`measure`](Self::measure).
    pub fn measure_within(
        &self,
        buffer: &VramBuffer,
        budget: SmBudget,
    ) -> Result<(TreeDigest, Confinement)> {
        let lane = self.lane(budget)?;
        let lane = lane.lock().unwrap_or_else(PoisonError::into_inner);
        self.device.bind()?;
        let mut workspace = self.take_workspace(buffer.len())?;
        let measured = tree::measure_on_lane(&*lane, &mut workspace, buffer);
        self.device.bind()?;
        // Reused only when the lane drained cleanly (a failed lane may still hold work on it).
        if measured.is_ok() {
            self.give_back(workspace);
        }
        Ok((measured?, lane.confinement()))
    }

    /// Why mechanisms were passed over when an `Auto` lane fell back (e.g. "green context: ..."),
    /// `None` when none was.
    #[must_use]
    pub fn lane_refusals(&self) -> Option<String> {
        let refusals = self.refusals.lock().unwrap_or_else(PoisonError::into_inner);
        (!refusals.is_empty()).then(|| refusals.join("; "))
    }

    /// Whether this process is a client of a running MPS daemon on this device (so that
    /// [`LaneMechanism::Mps`](vram_residency::LaneMechanism::Mps) lanes can be made, and kernels of
    /// other processes run beside ours instead of time-slicing with them).
    ///
    /// # Errors
    /// Driver errors.
    pub fn mps_client(&self) -> Result<bool> {
        self.device.bind()?;
        crate::lane::mps_client(self.device.ctx.cu_device())
    }

    fn lane(&self, budget: SmBudget) -> Result<Arc<Mutex<Lane>>> {
        let budget = SmBudget {
            sms: budget.sms.max(1),
            ..budget
        };
        let (ptx, _) = self.kernels()?;
        let mut lanes = self.lanes.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(lane) = lanes.get(&budget) {
            return Ok(Arc::clone(lane));
        }
        let mut refusals = Vec::new();
        let made = Lane::new(&self.device.ctx, &ptx, budget, &mut refusals);
        self.device.bind()?;
        let lane = made?;
        if !refusals.is_empty() {
            let reason = refusals.join("; ");
            tracing::warn!(%reason, sms = budget.sms, confinement = ?lane.confinement(), "background verification fell back");
            let mut kept = self.refusals.lock().unwrap_or_else(PoisonError::into_inner);
            for refusal in refusals {
                if !kept.contains(&refusal) {
                    kept.push(refusal);
                }
            }
        }
        let lane = Arc::new(Mutex::new(lane));
        lanes.insert(budget, Arc::clone(&lane));
        Ok(lane)
    }

    /// Frees what is kept for reuse: digest workspaces and lanes.
    pub fn trim(&self) {
        self.pool
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        self.lanes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }
}
