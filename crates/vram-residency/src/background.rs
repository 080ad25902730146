//! Continuous re-verification while a model serves: a thread that re-hashes every watched shard
//! in device memory, round-robin, confined to an [`SmBudget`] (a green context of a few SMs on the
//! CUDA backend, or a bounded grid where green contexts are missing; [`BackgroundStats`] says which).
//!
//! A [`BackgroundConfig`] may also cap the rate (`max_bytes_per_second`): after each digest the
//! thread idles until the bytes it has re-hashed fit the cap. A budget of SMs is coarse (8 at a
//! time on Hopper); the cap sets a rate between two budgets, e.g. 16 SMs held to 60 GB/s.
//!
//! A corruption or forgery found in the background follows the path of every failed verification
//! ([`VramManager::verify_sealed_within`]): a critical audit record, the worker stopped, the damaged
//! tensors named. The thread then stops and reports the incident in its stats.
//!
//! Shards are watched through `Weak` references: watching never keeps a shard alive, and an
//! evicted shard simply drops out of the rotation. (While one shard is being verified, the thread
//! holds it for those milliseconds; an eviction at that instant sees it as lent and can retry.)

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::backend::{Confinement, SmBudget};
use crate::error::{Result, VramError};
use crate::manager::{VramManager, WorkerState};
use crate::shard::SealedShard;

/// What the background verifier has done so far.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct BackgroundStats {
    /// Complete passes over every watched shard.
    pub passes: u64,
    /// Verifications done.
    pub verifications: u64,
    /// Bytes re-hashed.
    pub bytes: u64,
    /// Seconds spent verifying (not pausing).
    pub busy_seconds: f64,
    /// Seconds spent idle: pauses after a pass and waits to keep to the rate cap.
    pub idle_seconds: f64,
    /// Seconds the last complete pass took.
    pub last_pass_seconds: Option<f64>,
    /// How the verifications were confined (none made yet: `None`).
    pub confinement: Option<Confinement>,
    /// The incident that stopped the verifier (and the worker), if any.
    pub incident: Option<String>,
    /// The last non-fatal error (a backend failure, or a mechanism that cannot be had; the next
    /// pass tries again, after at least [`RETRY_AFTER_ERROR`]).
    pub last_error: Option<String>,
    /// False once the thread has ended (stopped, incident, or the worker stopped).
    pub running: bool,
}

impl BackgroundStats {
    /// Bytes re-hashed per second of verification, in GB/s (10^9 bytes).
    #[must_use]
    pub fn gb_per_s(&self) -> f64 {
        if self.busy_seconds > 0.0 {
            self.bytes as f64 / self.busy_seconds / 1e9
        } else {
            0.0
        }
    }
}

/// The least idle time after a pass in which a verification failed (not for a security incident,
/// which ends the thread): a mechanism that cannot be had, say, is not retried in a busy loop.
pub const RETRY_AFTER_ERROR: Duration = Duration::from_secs(1);

/// How a [`BackgroundVerifier`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackgroundConfig {
    /// The SMs each digest may use, and how they are held to them.
    pub budget: SmBudget,
    /// Idle time after each complete pass (zero: back to back).
    pub pause: Duration,
    /// The most bytes re-hashed per second of wall time (`None`: as fast as the budget allows).
    pub max_bytes_per_second: Option<u64>,
}

impl BackgroundConfig {
    /// Back to back within `budget`, no rate cap.
    #[must_use]
    pub const fn new(budget: SmBudget) -> Self {
        Self {
            budget,
            pause: Duration::ZERO,
            max_bytes_per_second: None,
        }
    }
}

struct Shared {
    manager: Arc<VramManager>,
    config: BackgroundConfig,
    shards: Mutex<Vec<Weak<SealedShard>>>,
    stats: Mutex<BackgroundStats>,
    stop: AtomicBool,
    wake: (Mutex<()>, Condvar),
}

/// A running background verifier. Stops (and joins its thread) on [`stop`](Self::stop) or drop.
pub struct BackgroundVerifier {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for BackgroundVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackgroundVerifier")
            .field("config", &self.shared.config)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl BackgroundVerifier {
    /// Starts a thread that re-verifies the watched shards of `manager` round-robin, each digest
    /// confined to `config.budget`, idling `config.pause` after each complete pass and as long as
    /// `config.max_bytes_per_second` needs.
    ///
    /// # Errors
    /// [`VramError::InvalidInput`] for a zero budget or a zero rate cap; [`VramError::Backend`]
    /// when the thread cannot be started.
    pub fn start(manager: Arc<VramManager>, config: BackgroundConfig) -> Result<Self> {
        if config.budget.sms == 0 {
            return Err(VramError::InvalidInput {
                field: "sms",
                reason: "a background verification needs at least one SM".to_owned(),
            });
        }
        if config.max_bytes_per_second == Some(0) {
            return Err(VramError::InvalidInput {
                field: "max_bytes_per_second",
                reason: "a rate cap must be above zero (leave it out for no cap)".to_owned(),
            });
        }
        let shared = Arc::new(Shared {
            manager,
            config,
            shards: Mutex::new(Vec::new()),
            stats: Mutex::new(BackgroundStats {
                running: true,
                ..BackgroundStats::default()
            }),
            stop: AtomicBool::new(false),
            wake: (Mutex::new(()), Condvar::new()),
        });
        let worker = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("vram-background-verify".to_owned())
            .spawn(move || run(&worker))
            .map_err(|e| VramError::Backend {
                reason: format!("cannot start the background verifier: {e}"),
            })?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// Adds `shard` to the rotation (without keeping it alive).
    pub fn watch(&self, shard: &Arc<SealedShard>) {
        let mut shards = self
            .shared
            .shards
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        shards.retain(|s| s.strong_count() > 0);
        if !shards.iter().any(|s| s.ptr_eq(&Arc::downgrade(shard))) {
            shards.push(Arc::downgrade(shard));
        }
        drop(shards);
        self.shared.wake.1.notify_all();
    }

    /// What it has done so far.
    #[must_use]
    pub fn stats(&self) -> BackgroundStats {
        self.shared
            .stats
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The budget it runs under.
    #[must_use]
    pub fn budget(&self) -> SmBudget {
        self.shared.config.budget
    }

    /// How it runs.
    #[must_use]
    pub fn config(&self) -> BackgroundConfig {
        self.shared.config
    }

    /// Stops the thread (after the verification in flight) and returns the final stats.
    #[must_use]
    pub fn stop(mut self) -> BackgroundStats {
        self.halt();
        self.stats()
    }

    fn halt(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.wake.1.notify_all();
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            self.record(|s| s.last_error = Some("the background thread panicked".to_owned()));
        }
    }

    fn record(&self, change: impl FnOnce(&mut BackgroundStats)) {
        change(
            &mut self
                .shared
                .stats
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
    }
}

impl Drop for BackgroundVerifier {
    fn drop(&mut self) {
        self.halt();
    }
}

fn run(shared: &Shared) {
    let record = |change: &dyn Fn(&mut BackgroundStats)| {
        change(&mut shared.stats.lock().unwrap_or_else(PoisonError::into_inner));
    };
    while !shared.stop.load(Ordering::Acquire) {
        if let WorkerState::Stopped { reason } = shared.manager.state() {
            record(&|s| s.incident = s.incident.clone().or_else(|| Some(reason.clone())));
            break;
        }
        let watched: Vec<Weak<SealedShard>> = {
            let mut shards = shared.shards.lock().unwrap_or_else(PoisonError::into_inner);
            shards.retain(|s| s.strong_count() > 0);
            shards.clone()
        };
        if watched.is_empty() {
            wait(shared, Duration::from_millis(100));
            continue;
        }
        let pass_started = Instant::now();
        let mut complete = true;
        let mut failed = false;
        for weak in watched {
            if shared.stop.load(Ordering::Acquire) {
                complete = false;
                break;
            }
            let Some(shard) = weak.upgrade() else {
                continue;
            };
            let started = Instant::now();
            let verified = shared
                .manager
                .verify_sealed_within(&shard, shared.config.budget);
            let seconds = started.elapsed().as_secs_f64();
            let bytes = shard.vram_bytes();
            drop(shard);
            match verified {
                Ok((_, confinement)) => {
                    record(&|s| {
                        s.verifications = s.verifications.saturating_add(1);
                        s.bytes = s.bytes.saturating_add(bytes);
                        s.busy_seconds += seconds;
                        s.confinement = Some(confinement);
                    });
                    if let Some(rate) = shared.config.max_bytes_per_second {
                        idle(shared, pacing_wait(bytes, seconds, rate));
                    }
                }
                Err(error) if is_incident(&error) => {
                    let text = error.to_string();
                    record(&|s| s.incident = Some(text.clone()));
                    record(&|s| s.running = false);
                    return;
                }
                Err(error) => {
                    let text = error.to_string();
                    record(&|s| s.last_error = Some(text.clone()));
                    complete = false;
                    failed = true;
                }
            }
        }
        if complete {
            let seconds = pass_started.elapsed().as_secs_f64();
            record(&|s| {
                s.passes = s.passes.saturating_add(1);
                s.last_pass_seconds = Some(seconds);
            });
        }
        let pause = if failed {
            shared.config.pause.max(RETRY_AFTER_ERROR)
        } else {
            shared.config.pause
        };
        idle(shared, pause);
    }
    record(&|s| s.running = false);
}

/// Failures that stop the worker (the manager has audited them and stopped it already).
const fn is_incident(error: &VramError) -> bool {
    matches!(
        error,
        VramError::Corruption { .. }
            | VramError::SealForgery { .. }
            | VramError::PolicyViolation { .. }
            | VramError::WorkerStopped { .. }
    )
}

/// `gbps` GB/s (10^9 bytes per second) as whole bytes per second, for a rate cap: `None` unless it
/// rounds to at least 1 byte/s and stays below 2^64 (so not for zero, negative, NaN or infinite).
#[must_use]
pub fn bytes_per_second(gbps: f64) -> Option<u64> {
    let bytes = (gbps * 1e9).round();
    if bytes.is_finite() && (1.0..1.8e19).contains(&bytes) {
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // range checked above
        Some(bytes as u64)
    } else {
        None
    }
}

/// How long to idle after re-hashing `bytes` in `seconds` so that the two together keep to `rate`
/// bytes per second (zero when the digest itself was slow enough): the rule of
/// [`BackgroundConfig::max_bytes_per_second`] and of `serve --sweep-max-rate`.
#[must_use]
pub fn pacing_wait(bytes: u64, seconds: f64, rate: u64) -> Duration {
    let due = bytes as f64 / rate as f64;
    Duration::try_from_secs_f64(due - seconds).unwrap_or(Duration::ZERO)
}

/// Idles `timeout` (less when stopped; a newly watched shard does not cut it short) and counts
/// the time.
fn idle(shared: &Shared, timeout: Duration) {
    if timeout.is_zero() {
        return;
    }
    let started = Instant::now();
    while !shared.stop.load(Ordering::Acquire) {
        let Some(left) = timeout.checked_sub(started.elapsed()) else {
            break;
        };
        if left.is_zero() {
            break;
        }
        wait(shared, left);
    }
    let seconds = started.elapsed().as_secs_f64();
    shared
        .stats
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .idle_seconds += seconds;
}

fn wait(shared: &Shared, timeout: Duration) {
    let (lock, condvar) = &shared.wake;
    let guard = lock.lock().unwrap_or_else(PoisonError::into_inner);
    if shared.stop.load(Ordering::Acquire) {
        return;
    }
    let _ = condvar
        .wait_timeout(guard, timeout)
        .unwrap_or_else(PoisonError::into_inner);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manager::ManagerConfig;
    use crate::sim::{SimBackend, SimConfig};
    use crate::{MemoryAuditSink, WorkerToken};

    fn manager() -> (Arc<VramManager>, Arc<SimBackend>) {
        let sim = Arc::new(SimBackend::new(SimConfig {
            devices: 1,
            bytes_per_device: 64 << 20,
        }));
        let token =
            WorkerToken::from_bytes(b"background-verifier-test-token-0123456789".to_vec()).unwrap();
        let manager = VramManager::with_config(
            &token,
            sim.clone(),
            ManagerConfig::default(),
            Arc::new(MemoryAuditSink::default()),
        )
        .unwrap();
        (Arc::new(manager), sim)
    }

    fn until(what: impl Fn() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if what() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    #[test]
    fn background_passes_cover_every_watched_shard_and_evicted_ones_drop_out() {
        let (manager, _) = manager();
        let a = Arc::new(manager.seal_model(&[1u8; 100_000], 0).unwrap());
        let b = Arc::new(manager.seal_model(&[2u8; 300_000], 0).unwrap());
        let verifier = BackgroundVerifier::start(
            Arc::clone(&manager),
            BackgroundConfig::new(SmBudget::sms(8)),
        )
        .unwrap();
        verifier.watch(&a);
        verifier.watch(&b);
        verifier.watch(&a); // twice: watched once
        assert!(
            until(|| verifier.stats().passes >= 3),
            "{:?}",
            verifier.stats()
        );
        let stats = verifier.stats();
        assert!(stats.bytes >= 3 * 400_000, "{stats:?}");
        assert_eq!(stats.confinement, Some(Confinement::Unconfined));
        assert!(stats.incident.is_none() && stats.running);
        // Watching does not hold a shard: it can be evicted (retrying while a verification of it
        // is in flight), and the rotation goes on without it.
        let mut a = a;
        let owned = loop {
            match Arc::try_unwrap(a) {
                Ok(shard) => break shard,
                Err(shared) => {
                    a = shared;
                    std::thread::yield_now();
                }
            }
        };
        manager.deallocate(owned).unwrap();
        let before = verifier.stats().verifications;
        assert!(until(|| verifier.stats().verifications >= before + 3));
        let stats = verifier.stop();
        assert!(!stats.running);
        drop(b);
    }

    #[test]
    fn a_corruption_found_in_the_background_stops_the_worker_and_names_the_range() {
        let (manager, sim) = manager();
        let shard = Arc::new(manager.seal_model(&[9u8; 2 << 20], 0).unwrap());
        let verifier = BackgroundVerifier::start(
            Arc::clone(&manager),
            BackgroundConfig::new(SmBudget::sms(4)),
        )
        .unwrap();
        verifier.watch(&shard);
        assert!(until(|| verifier.stats().passes >= 1));
        sim.flip_bit(shard.allocation_id(), 8 * (1 << 20) + 1)
            .unwrap();
        assert!(
            until(|| !verifier.stats().running),
            "{:?}",
            verifier.stats()
        );
        let stats = verifier.stop();
        let incident = stats.incident.unwrap_or_default();
        assert!(incident.contains("corruption"), "{incident}");
        assert!(incident.contains("0x100000"), "{incident}");
        assert!(matches!(manager.state(), WorkerState::Stopped { .. }));
        assert!(matches!(
            manager.seal_model(&[1u8; 10], 0),
            Err(VramError::WorkerStopped { .. })
        ));
    }

    #[test]
    fn a_zero_budget_is_refused() {
        let (manager, _) = manager();
        let err = BackgroundVerifier::start(
            Arc::clone(&manager),
            BackgroundConfig::new(SmBudget::sms(0)),
        )
        .unwrap_err();
        assert!(err.to_string().contains("at least one SM"), "{err}");
        let err = BackgroundVerifier::start(
            manager,
            BackgroundConfig {
                max_bytes_per_second: Some(0),
                ..BackgroundConfig::new(SmBudget::sms(8))
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("above zero"), "{err}");
    }

    #[test]
    fn a_mechanism_that_cannot_be_had_is_an_error_retried_at_most_once_a_second_not_a_busy_loop() {
        // The sim has no GPU: a green context asked for by name cannot be had.
        let (manager, _) = manager();
        let shard = Arc::new(manager.seal_model(&[4u8; 4096], 0).unwrap());
        let started = Instant::now();
        let verifier = BackgroundVerifier::start(
            Arc::clone(&manager),
            BackgroundConfig::new(SmBudget::with(8, crate::LaneMechanism::GreenContext)),
        )
        .unwrap();
        verifier.watch(&shard);
        assert!(until(|| verifier.stats().idle_seconds >= 1.0));
        let stats = verifier.stop();
        let wall = started.elapsed().as_secs_f64();
        let error = stats.last_error.clone().unwrap_or_default();
        assert!(error.contains("green mechanism cannot be had"), "{stats:?}");
        assert_eq!(stats.verifications, 0, "{stats:?}");
        assert!(stats.incident.is_none() && !stats.running, "{stats:?}");
        // Without the retry pause the thread would spin (pause zero) and idle_seconds stay 0.
        assert!(wall >= 1.0, "{wall}");
        assert!(matches!(manager.state(), WorkerState::Running));
    }

    #[test]
    fn a_rate_cap_holds_the_bytes_re_hashed_per_second_of_wall_time_below_it() {
        // 1 MiB shard, 8 MiB/s: the sim hashes it in a few ms, so without the cap the thread would
        // re-hash hundreds of MiB per second; with it, each digest is followed by ~125 ms idle.
        const RATE: u64 = 8 << 20;
        let (manager, _) = manager();
        let shard = Arc::new(manager.seal_model(&[3u8; 1 << 20], 0).unwrap());
        let started = Instant::now();
        let verifier = BackgroundVerifier::start(
            Arc::clone(&manager),
            BackgroundConfig {
                max_bytes_per_second: Some(RATE),
                ..BackgroundConfig::new(SmBudget::sms(8))
            },
        )
        .unwrap();
        verifier.watch(&shard);
        assert!(until(|| verifier.stats().verifications >= 4));
        let stats = verifier.stop();
        let wall = started.elapsed().as_secs_f64();
        // Every digest but the last was followed by its full wait, so the bytes of all but one
        // took at least bytes / RATE seconds of wall time.
        let paced_bytes = stats.bytes - (1 << 20);
        assert!(
            wall >= paced_bytes as f64 / RATE as f64,
            "{wall} s for {stats:?}"
        );
        assert!(stats.idle_seconds > 0.1, "{stats:?}");
        assert_eq!(pacing_wait(1000, 2.0, 1000), Duration::ZERO);
        assert_eq!(pacing_wait(1000, 0.25, 1000), Duration::from_millis(750));
        assert_eq!(bytes_per_second(60.0), Some(60_000_000_000));
        assert_eq!(bytes_per_second(12.5), Some(12_500_000_000));
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e20] {
            assert_eq!(bytes_per_second(bad), None, "{bad}");
        }
    }
}
