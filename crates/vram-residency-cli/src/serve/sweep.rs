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
                // A sweep under --sweep-max-rate may take a while: a stop ends it between shards
                // (a verification already running finishes on its blocking thread).
                tokio::select! {
                    outcome = sweep_once(&app) => tracing::info!(?outcome, "sweep"),
                    _ = stop.changed() => return,
                }
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
        let started = std::time::Instant::now();
        let result = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            task_app.sweep_verify_blocking(&task_entry)
        })
        .await;
        match result {
            Ok(Some(Ok(_))) => {
                verified = verified.saturating_add(1);
                if let Some(rate) = app.sweep_max_bytes_per_second {
                    // Wait until this shard's bytes fit the cap (the permit is free meanwhile).
                    let seconds = started.elapsed().as_secs_f64();
                    let wait = vram_residency::background::pacing_wait(
                        entry.view.vram_bytes,
                        seconds,
                        rate,
                    );
                    tokio::time::sleep(wait).await;
                }
            }
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

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
mod tests {
    //! In-process: the sweep needs a hand on the simulated device memory (`SimBackend::flip_bit`),
    //! which the service rightly offers no route for.

    use std::sync::Arc;
    use std::time::Duration;

    use axum::Router;
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use serde_json::Value;
    use tower::ServiceExt as _;
    use vram_residency::audit::FailureKind;
    use vram_residency::{
        AuditEvent, ManagerConfig, MemoryAuditSink, ModelsDir, SimBackend, SimConfig, VramManager,
        WorkerState, WorkerToken,
    };

    use super::{SweepOutcome, sweep_once};
    use crate::serve::api::{Limits, router};
    use crate::serve::auth::Access;
    use crate::serve::state::AppState;

    const TOKEN: &str = "sweep-test-token-0123456789abcdef0123";
    const OPERATOR_TOKEN: &str = "sweep-operator-token-0123456789abcdef";

    struct Fixture {
        _dir: tempfile::TempDir,
        sim: SimBackend,
        sink: Arc<MemoryAuditSink>,
        app: Arc<AppState>,
        router: Router,
    }

    fn fixture() -> Fixture {
        fixture_with_rate(None)
    }

    fn fixture_with_rate(max_bytes_per_second: Option<u64>) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let models = dir.path().join("models");
        std::fs::create_dir(&models).unwrap();
        let bytes: Vec<u8> = (0..2_000_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(models.join("m.bin"), bytes).unwrap();
        let sim = SimBackend::new(SimConfig {
            devices: 1,
            bytes_per_device: 64 << 20,
        });
        let token = WorkerToken::from_bytes(TOKEN.as_bytes().to_vec()).unwrap();
        let sink = Arc::new(MemoryAuditSink::default());
        let manager = Arc::new(
            VramManager::with_config(
                &token,
                Arc::new(sim.clone()),
                ManagerConfig::default(),
                sink.clone(),
            )
            .unwrap(),
        );
        let mut app = AppState::new(
            manager,
            ModelsDir::new(&models).unwrap(),
            Access::operator_only(token.bearer_check(), OPERATOR_TOKEN.as_bytes()),
            sink.clone(),
            2,
            Duration::from_secs(60),
            crate::serve::transport::Transport::Http,
        );
        app.sweep_max_bytes_per_second = max_bytes_per_second;
        let app = Arc::new(app);
        let router = router(
            Arc::clone(&app),
            Limits {
                max_body: 64 << 10,
                request_timeout: Duration::from_secs(60),
                body_timeout: Duration::from_secs(60),
            },
        );
        Fixture {
            _dir: dir,
            sim,
            sink,
            app,
            router,
        }
    }

    async fn call(
        router: &Router,
        method: &str,
        uri: &str,
        body: Option<&str>,
    ) -> (StatusCode, String) {
        let request = Request::builder()
            .method(method)
            .uri(uri)
            .header("authorization", format!("Bearer {OPERATOR_TOKEN}"))
            .header("content-type", "application/json")
            .body(body.map_or_else(Body::empty, |b| Body::from(b.to_owned())))
            .unwrap();
        let response = router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, String::from_utf8(bytes.to_vec()).unwrap())
    }

    fn json(text: &str) -> Value {
        serde_json::from_str(text).unwrap()
    }

    #[tokio::test]
    async fn a_sweep_under_a_rate_cap_takes_at_least_its_bytes_over_the_cap() {
        // Two shards of 2,000,000 bytes at 10 MB/s: each verification (milliseconds on the sim) is
        // followed by a wait until 0.2 s have passed since it began, so the sweep takes 0.4 s or
        // more; without the cap the same sweep is far quicker (the sim hashes ~1 GB/s).
        let f = fixture_with_rate(Some(10_000_000));
        for id in ["s1", "s2"] {
            let body = format!(r#"{{"model":"m.bin","gpu":0,"shard_id":"{id}"}}"#);
            let (status, text) = call(&f.router, "POST", "/v1/shards", Some(&body)).await;
            assert_eq!(status, StatusCode::CREATED, "{text}");
        }
        let started = std::time::Instant::now();
        assert_eq!(
            sweep_once(&f.app).await,
            SweepOutcome::Clean { verified: 2 }
        );
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(400), "{took:?}");
    }

    #[tokio::test]
    async fn a_sweep_that_finds_corruption_stops_the_worker_and_execute_like_routes_answer_503_worker_4122()
     {
        let f = fixture();
        for id in ["s1", "s2"] {
            let body = format!(r#"{{"model":"m.bin","gpu":0,"shard_id":"{id}"}}"#);
            let (status, text) = call(&f.router, "POST", "/v1/shards", Some(&body)).await;
            assert_eq!(status, StatusCode::CREATED, "{text}");
        }
        assert_eq!(
            sweep_once(&f.app).await,
            SweepOutcome::Clean { verified: 2 }
        );

        // One bit of s2's device memory changes behind the manager's back.
        let allocation = f
            .app
            .entry("s2")
            .unwrap()
            .with_shard(vram_residency::SealedShard::allocation_id)
            .unwrap();
        f.sim.flip_bit(allocation, 8 * 1_234_567).unwrap();
        assert_eq!(sweep_once(&f.app).await, SweepOutcome::Incident);
        let WorkerState::Stopped { reason } = f.app.manager.state() else {
            panic!("the worker must be stopped");
        };
        assert!(reason.contains("corruption"), "{reason}");

        // Critical audit records, through the manager's sink.
        let entries = f.sink.entries();
        assert!(entries.iter().any(|e| matches!(
            &e.event,
            AuditEvent::SealVerificationFailed { kind: FailureKind::Corruption, shard_id, .. }
                if shard_id.as_str() == "s2"
        )));
        assert!(
            entries
                .iter()
                .any(|e| matches!(e.event, AuditEvent::WorkerStopped { .. }))
        );

        // Commit, verify and attest answer 503 with the reason; reads and eviction still work.
        let nonce = format!(r#"{{"nonce":"{}"}}"#, "ab".repeat(16));
        for (method, uri, body) in [
            ("POST", "/v1/shards", Some(r#"{"model":"m.bin","gpu":0}"#)),
            ("POST", "/v1/shards/s1/verify", None),
            ("POST", "/v1/shards/s1/attest", Some(nonce.as_str())),
        ] {
            let (status, text) = call(&f.router, method, uri, body).await;
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{uri}: {text}");
            let error = &json(&text)["error"];
            assert_eq!(error["code"], "worker_stopped");
            assert!(
                error["message"].as_str().unwrap().contains("corruption"),
                "{text}"
            );
        }
        let (status, text) = call(&f.router, "GET", "/v1/worker", None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(json(&text)["state"], "stopped");
        assert!(
            json(&text)["reason"]
                .as_str()
                .unwrap()
                .contains("corruption")
        );
        let (status, _) = call(&f.router, "GET", "/healthz", None).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        let (_, metrics) = call(&f.router, "GET", "/metrics", None).await;
        for line in [
            "vram_worker_stopped 1",
            "vram_sweeps_total{result=\"incident\"} 1",
            "vram_sweeps_total{result=\"ok\"} 1",
            "vram_verify_operations_total{result=\"vram_corruption\"} 1",
        ] {
            assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
        }
        assert_eq!(sweep_once(&f.app).await, SweepOutcome::Skipped);
        let (status, text) = call(&f.router, "DELETE", "/v1/shards/s1", None).await;
        assert_eq!(status, StatusCode::OK, "{text}");
    }

    #[tokio::test]
    async fn shutdown_frees_every_shard_and_refuses_new_work() {
        let f = fixture();
        for id in ["a", "b", "c"] {
            let body = format!(r#"{{"model":"m.bin","gpu":0,"shard_id":"{id}"}}"#);
            assert_eq!(
                call(&f.router, "POST", "/v1/shards", Some(&body)).await.0,
                StatusCode::CREATED
            );
        }
        assert_eq!(f.app.shut_down(Duration::from_secs(30)).await, 3);
        assert_eq!(f.app.manager.used_vram(0).unwrap(), 0);
        let (status, text) = call(
            &f.router,
            "POST",
            "/v1/shards",
            Some(r#"{"model":"m.bin","gpu":0}"#),
        )
        .await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(json(&text)["error"]["code"], "shutting_down");
        let freed = f
            .sink
            .entries()
            .iter()
            .filter(|e| matches!(e.event, AuditEvent::VramDeallocated { .. }))
            .count();
        assert_eq!(freed, 3);
    }
}
