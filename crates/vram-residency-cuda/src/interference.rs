//! What background verification costs a model serving beside it, for `vram-residency bench
//! --interference`: a decode-like victim (a memory-bound bf16 GEMV of many blocks in many waves,
//! `kernels/gemv.cu`) alone, then beside a thread that re-hashes resident buffers round-robin
//! (confined to a budget of SMs, or on the whole GPU back to back for comparison). Reports the
//! victim's slowdown, the bytes re-verified per second and the time of one full pass.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use cudarc::driver::{CudaFunction, CudaStream, LaunchConfig, PushKernelArg as _};
use cudarc::nvrtc::{CompileOptions, compile_ptx_with_opts};
use vram_residency::backend::{Confinement, LaneMechanism, SmBudget};
use vram_residency::background::{bytes_per_second, pacing_wait};

use crate::error::{CudaError, Result};
use crate::hasher::Hasher;
use crate::vram::VramBuffer;

const GEMV_CU: &str = include_str!("kernels/gemv.cu");
/// Columns of the victim's weight matrix (8 KiB rows of bf16).
const COLS: u64 = 4096;
const ROWS_PER_BLOCK: u64 = 8;

/// The victim: W (bf16), x, y and its stream.
pub struct Victim {
    function: CudaFunction,
    stream: Arc<CudaStream>,
    w: VramBuffer,
    x: VramBuffer,
    y: VramBuffer,
    rows: u64,
}

impl std::fmt::Debug for Victim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Victim")
            .field("rows", &self.rows)
            .finish_non_exhaustive()
    }
}

impl Victim {
    /// A victim with `weight_bytes` of weights on `hasher`'s device (filled with a constant).
    ///
    /// # Errors
    /// NVRTC or driver errors.
    pub fn new(hasher: &Hasher, weight_bytes: u64) -> Result<Self> {
        let device = hasher.device();
        let (major, minor) = device.compute_capability();
        let ptx = compile_ptx_with_opts(
            GEMV_CU,
            CompileOptions {
                options: vec![format!("--gpu-architecture=compute_{major}{minor}")],
                name: Some("gemv.cu".to_owned()),
                ..CompileOptions::default()
            },
        )
        .map_err(|e| CudaError::Compile { log: e.to_string() })?;
        device.bind()?;
        let module = device
            .ctx
            .load_module(ptx)
            .map_err(CudaError::driver("cuModuleLoadData"))?;
        let function = module
            .load_function("gemv_bf16")
            .map_err(CudaError::driver("cuModuleGetFunction"))?;
        let rows = (weight_bytes / (COLS * 2)).max(ROWS_PER_BLOCK);
        let w = VramBuffer::alloc(&device.ctx, rows.saturating_mul(COLS * 2))?;
        let x = VramBuffer::alloc(&device.ctx, COLS * 2)?;
        let y = VramBuffer::alloc(&device.ctx, rows.saturating_mul(4))?;
        w.fill(0x3c)?;
        x.fill(0x3c)?;
        let stream = device
            .ctx
            .new_stream()
            .map_err(CudaError::driver("cuStreamCreate"))?;
        Ok(Self {
            function,
            stream,
            w,
            x,
            y,
            rows,
        })
    }

    /// Weight bytes read per step.
    #[must_use]
    pub const fn weight_bytes(&self) -> u64 {
        self.w.len()
    }

    /// Blocks per launch.
    #[must_use]
    pub const fn blocks(&self) -> u64 {
        self.rows.div_ceil(ROWS_PER_BLOCK)
    }

    /// Runs `steps` launches back to back and returns the mean seconds per step.
    ///
    /// # Errors
    /// Driver errors.
    pub fn run(&self, steps: u32) -> Result<f64> {
        let grid =
            u32::try_from(self.blocks()).map_err(|_| CudaError::OutOfBounds { what: "grid" })?;
        let config = LaunchConfig {
            grid_dim: (grid, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (w, x, y) = (
            self.w.device_ptr(),
            self.x.device_ptr(),
            self.y.device_ptr(),
        );
        let vecs = u32::try_from(COLS / 8).map_err(|_| CudaError::OutOfBounds { what: "cols" })?;
        let started = Instant::now();
        for _ in 0..steps {
            let mut launch = self.stream.launch_builder(&self.function);
            launch.arg(&w).arg(&x).arg(&y).arg(&self.rows).arg(&vecs);
            // SAFETY: gemv_bf16(const uint4*, const uint4*, float*, u64, u32) gets three device
            // addresses and two integers matching that signature; w holds rows x COLS bf16, x COLS
            // bf16, y rows f32 (allocated above), all alive until the stream is synchronised below.
            unsafe { launch.launch(config) }.map_err(CudaError::driver("cuLaunchKernel"))?;
        }
        self.stream
            .synchronize()
            .map_err(CudaError::driver("cuStreamSynchronize"))?;
        Ok(started.elapsed().as_secs_f64() / f64::from(steps.max(1)))
    }
}

/// `bytes` of resident device memory in buffers of at most 16 GiB, filled with a constant (what
/// they hold does not change a digest's cost): the shards a background verification re-hashes.
///
/// # Errors
/// Driver errors (out of memory).
pub fn resident_buffers(hasher: &Hasher, bytes: u64) -> Result<Vec<VramBuffer>> {
    const PIECE: u64 = 16 << 30;
    let mut buffers = Vec::new();
    let mut left = bytes.max(1);
    while left > 0 {
        let n = left.min(PIECE);
        let buffer = VramBuffer::alloc(&hasher.device().ctx, n)?;
        buffer.fill(0x5a)?;
        buffers.push(buffer);
        left = left.saturating_sub(n);
    }
    Ok(buffers)
}

/// A background budget to measure: SMs and mechanism, and optionally a rate cap (the verifier
/// idles after each digest as long as the cap needs, as [`vram_residency::BackgroundVerifier`]
/// does).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Plan {
    /// SMs and how they are held.
    pub budget: SmBudget,
    /// The most GB/s (10^9 bytes) re-verified per second of wall time.
    pub max_gb_per_s: Option<f64>,
}

impl Plan {
    /// `"16 SMs"`, `"16 SMs (bounded) at most 60 GB/s"`.
    #[must_use]
    pub fn label(&self) -> String {
        let mut label = format!("{} SMs", self.budget.sms);
        if self.budget.mechanism != LaneMechanism::Auto {
            label.push_str(&format!(" ({})", self.budget.mechanism));
        }
        if let Some(rate) = self.max_gb_per_s {
            label.push_str(&format!(" at most {rate} GB/s"));
        }
        label
    }
}

/// One scenario of the interference run.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// [`Plan::label`], or `"foreground (whole GPU, back to back)"`.
    pub budget: String,
    /// The plan (`None` for the foreground scenario).
    pub plan: Option<Plan>,
    /// How the verifications were confined (`None` for the foreground scenario).
    pub confinement: Option<Confinement>,
    /// Mean victim step beside the verification, in ms.
    pub victim_step_ms: f64,
    /// Versus the victim alone, in percent.
    pub victim_slowdown_pct: f64,
    /// Bytes re-verified per second of the scenario (from its start to the end of its last
    /// digest), GB/s.
    pub verified_gb_per_s: f64,
    /// Seconds for one pass over all resident bytes at that rate.
    pub full_pass_seconds: f64,
    /// Complete digests during the scenario.
    pub digests: u64,
}

/// The victim alone, before and after the scenarios, and the scenarios.
#[derive(Debug, Clone)]
pub struct InterferenceRun {
    /// Best mean step of 5 batches of 50 before the scenarios, ms (the baseline of the slowdowns).
    pub alone_before_ms: f64,
    /// The same after the scenarios, ms.
    pub alone_after_ms: f64,
    /// Bytes that one full pass re-hashes.
    pub resident_bytes: u64,
    /// One per budget, then the foreground comparison.
    pub scenarios: Vec<Scenario>,
}

/// Runs the victim alone and beside verification of `resident` under each plan (and on the whole
/// GPU, back to back), each for about `seconds`.
///
/// The verifier starts no digest after `seconds`, and the victim keeps running until the last one
/// ends, so both run side by side for the whole scenario: the rate is the bytes of every digest
/// over the time to the end of the last, and the victim's step the mean over its batches that
/// ended before that (the one batch that straddles the end ran partly alone and is left out). The
/// baseline is the best of five batches alone, so the slowdown errs high.
///
/// # Errors
/// Driver errors.
pub fn interference(
    hasher: &Hasher,
    victim: &Victim,
    resident: &[VramBuffer],
    plans: &[Plan],
    seconds: f64,
) -> Result<InterferenceRun> {
    const BATCH: u32 = 50;
    let resident_bytes: u64 = resident.iter().map(VramBuffer::len).sum();
    let alone = |victim: &Victim| -> Result<f64> {
        victim.run(BATCH)?;
        let mut best = f64::INFINITY;
        for _ in 0..5 {
            best = best.min(victim.run(BATCH)?);
        }
        Ok(best)
    };
    let alone_before = alone(victim)?;
    let mut scenarios = Vec::new();
    let all: Vec<Option<Plan>> = plans.iter().copied().map(Some).chain([None]).collect();
    for plan in all {
        let done = AtomicBool::new(false);
        let (step_time, bytes, digests, confinement, elapsed) =
            std::thread::scope(|scope| -> Result<_> {
                let started = Instant::now();
                let done = &done;
                let worker = scope.spawn(move || {
                    let outcome = verify_until(hasher, resident, plan, started, seconds);
                    let ended = started.elapsed().as_secs_f64();
                    done.store(true, Ordering::Release);
                    outcome
                        .map(|(bytes, digests, confinement)| (bytes, digests, confinement, ended))
                });
                let mut steps = 0u32;
                let mut total = 0.0f64;
                while !done.load(Ordering::Acquire) {
                    let step = victim.run(BATCH)?;
                    if !done.load(Ordering::Acquire) {
                        total += step * f64::from(BATCH);
                        steps = steps.saturating_add(BATCH);
                    }
                }
                let (bytes, digests, confinement, ended) = worker
                    .join()
                    .map_err(|_| CudaError::Internal("interference thread panicked"))??;
                if steps == 0 {
                    // A digest ended before the victim's first batch did: measure one batch more
                    // rather than report nothing (only with a tiny --interference-seconds).
                    total = victim.run(BATCH)? * f64::from(BATCH);
                    steps = BATCH;
                }
                Ok((total / f64::from(steps), bytes, digests, confinement, ended))
            })?;
        let rate = bytes as f64 / elapsed.max(f64::MIN_POSITIVE);
        scenarios.push(Scenario {
            budget: plan.map_or_else(
                || "foreground (whole GPU, back to back)".to_owned(),
                |plan| plan.label(),
            ),
            plan,
            confinement,
            victim_step_ms: step_time * 1e3,
            victim_slowdown_pct: (step_time / alone_before - 1.0) * 100.0,
            verified_gb_per_s: rate / 1e9,
            full_pass_seconds: if rate > 0.0 {
                resident_bytes as f64 / rate
            } else {
                f64::INFINITY
            },
            digests,
        });
    }
    let alone_after = alone(victim)?;
    Ok(InterferenceRun {
        alone_before_ms: alone_before * 1e3,
        alone_after_ms: alone_after * 1e3,
        resident_bytes,
        scenarios,
    })
}

/// The verifier's side of one scenario: digests of `resident` round-robin (confined and paced by
/// `plan`, or on the whole GPU back to back), starting none after `seconds` from `started`.
/// Returns the bytes and digests done and how they were confined.
fn verify_until(
    hasher: &Hasher,
    resident: &[VramBuffer],
    plan: Option<Plan>,
    started: Instant,
    seconds: f64,
) -> Result<(u64, u64, Option<Confinement>)> {
    let (mut bytes, mut digests, mut confinement) = (0u64, 0u64, None);
    loop {
        for buffer in resident {
            if started.elapsed().as_secs_f64() >= seconds {
                return Ok((bytes, digests, confinement));
            }
            let digest_started = Instant::now();
            match plan {
                Some(plan) => {
                    let (_, how) = hasher.measure_within(buffer, plan.budget)?;
                    confinement = Some(how);
                }
                None => {
                    hasher.measure(buffer)?;
                }
            }
            bytes = bytes.saturating_add(buffer.len());
            digests = digests.saturating_add(1);
            let rate = plan.and_then(|plan| plan.max_gb_per_s.and_then(bytes_per_second));
            if let Some(rate) = rate {
                // Idle until this digest's bytes fit the cap, by the background verifier's rule
                // (the scenario's time includes the last wait, so its rate stays within the cap).
                let seconds = digest_started.elapsed().as_secs_f64();
                std::thread::sleep(pacing_wait(buffer.len(), seconds, rate));
            }
        }
    }
}
