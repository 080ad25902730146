//! The background sweep: every interval, re-verify every resident shard in device memory.
//!
//! A forgery or corruption found here is handled by the manager exactly as anywhere else: a critical
//! audit record, and the worker moves to `Stopped` (commit, verify and attest then answer 503 with the
//! reason; `vram_worker_stopped` reads 1). The sweep itself then stops checking until restart.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::MissedTickBehavior;
use vram_residency::WorkerState;

use super::state::AppState;

/// How a sweep ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SweepOutcome {
    /// Every shard verified.
    Clean { verified: usize },
    /// A security incident: the worker is stopped now.
    Incident,
    /// A verification failed for another reason (backend, audit); the next sweep tries again.
    Failed,
    /// Not run: the worker was already stopped, or is shutting down.
    Skipped,
}

impl SweepOutcome {
    const fn label(self) -> &'static str {
        match self {
            Self::Clean { .. } => "ok",
            Self::Incident => "incident",
            Self::Failed => "error",
            Self::Skipped => "skipped",
        }
    }
}

/// Sweeps every `interval` until `stop` changes. An interval of zero disables sweeps.
pub async fn run(app: Arc<AppState>, interval: Duration, mut stop: watch::Receiver<bool>) {
    if interval.is_zero() {
        return;
    }
    let Some(first) = tokio::time::Instant::now().checked_add(interval) else {
        tracing::warn!("the sweep interval is too large to schedule; sweeps are off");
        return;
    };
    let mut ticker = tokio::time::interval_at(first, interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                let outcome = sweep_once(&app).await;
                tracing::info!(?outcome, "sweep");
            }
            _ = stop.changed() => return,
        }
    }
}

/// One sweep over a snapshot of the resident shards, one verification at a time (each under a
/// permit, so sweeps never crowd out requests beyond one slot).
pub async fn sweep_once(app: &Arc<AppState>) -> SweepOutcome {
    let outcome = sweep_inner(app).await;
    app.metrics.sweep(outcome.label());
    outcome
}

async fn sweep_inner(app: &Arc<AppState>) -> SweepOutcome {
    if app.manager.state() != WorkerState::Running {
        return SweepOutcome::Skipped;
    }
    let mut verified: usize = 0;
    let mut failed = false;
    for entry in app.snapshot() {
        let Ok(permit) = app.permit().await else {
            return SweepOutcome::Skipped;
        };
        let task_app = Arc::clone(app);
        let task_entry = Arc::clone(&entry);
        let result = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            task_app.verify_blocking(&task_entry)
        })
        .await;
        match result {
            Ok(Some(Ok(_))) => verified = verified.saturating_add(1),
            // Evicted while the sweep ran.
            Ok(None) => {}
            Ok(Some(Err(error))) if error.is_fatal() => {
                tracing::error!(
                    %error,
                    shard = %entry.view.shard_id,
                    "sweep: security incident; the worker is stopped"
                );
                return SweepOutcome::Incident;
            }
            Ok(Some(Err(error))) => {
                tracing::warn!(%error, shard = %entry.view.shard_id, "sweep: verification failed");
                failed = true;
            }
            Err(_) => failed = true,
        }
    }
    if failed {
        SweepOutcome::Failed
    } else {
        SweepOutcome::Clean { verified }
    }
}
