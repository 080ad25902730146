//! Prometheus metrics (`prometheus-client`, OpenMetrics text format), served on `/metrics` to an observer
//! or operator token (or to anyone, with `--metrics-without-token` on loopback): capacity per device, operation counts by result, latency histograms,
//! the worker state and sweeps, open connections and the connection cap.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use vram_residency::{VramManager, WorkerState};

/// The content type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// `ok`, or the API error code of the failure (`insufficient_vram`, `vram_corruption`, ...).
    pub result: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GpuLabel {
    pub gpu: String,
}

type BytesGauge = Gauge<u64, AtomicU64>;

/// The accept loop's metrics (cheap clones of the registered ones).
#[derive(Debug, Clone, Default)]
pub struct ConnectionMetrics {
    /// Connections open now, TLS handshakes in progress included.
    pub open: Gauge,
    /// Times the accept loop paused because `--max-connections` connections were open.
    pub limit_reached: Counter,
    /// TLS handshakes that failed or timed out.
    pub tls_handshake_failures: Counter,
}

pub struct Metrics {
    registry: Registry,
    seal_ops: Family<ResultLabel, Counter>,
    verify_ops: Family<ResultLabel, Counter>,
    attest_ops: Family<ResultLabel, Counter>,
    sweeps: Family<ResultLabel, Counter>,
    seal_seconds: Histogram,
    verify_seconds: Histogram,
    total_bytes: Family<GpuLabel, BytesGauge>,
    used_bytes: Family<GpuLabel, BytesGauge>,
    available_bytes: Family<GpuLabel, BytesGauge>,
    shards: Gauge,
    stopped: Gauge,
    connections: ConnectionMetrics,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// 1 ms .. ~65 s, doubling.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let seal_ops = Family::<ResultLabel, Counter>::default();
        let verify_ops = Family::<ResultLabel, Counter>::default();
        let attest_ops = Family::<ResultLabel, Counter>::default();
        let sweeps = Family::<ResultLabel, Counter>::default();
        let seal_seconds = latency_histogram();
        let verify_seconds = latency_histogram();
        let total_bytes = Family::<GpuLabel, BytesGauge>::default();
        let used_bytes = Family::<GpuLabel, BytesGauge>::default();
        let available_bytes = Family::<GpuLabel, BytesGauge>::default();
        let shards = Gauge::default();
        let stopped = Gauge::default();
        let connections = ConnectionMetrics::default();
        registry.register(
            "vram_seal_operations",
            "Seal (commit) operations by result",
            seal_ops.clone(),
        );
        registry.register(
            "vram_verify_operations",
            "Verifications (API, attestation and sweep) by result",
            verify_ops.clone(),
        );
        registry.register(
            "vram_attest_operations",
            "Attestations by result",
            attest_ops.clone(),
        );
        registry.register(
            "vram_sweeps",
            "Background re-verification sweeps by result",
            sweeps.clone(),
        );
        registry.register(
            "vram_seal_duration_seconds",
            "Wall time of successful seal operations (open, upload, digest in device memory, HMAC, audit)",
            seal_seconds.clone(),
        );
        registry.register(
            "vram_verify_duration_seconds",
            "Wall time of verifications (HMAC, residency, digest re-measured in device memory)",
            verify_seconds.clone(),
        );
        registry.register(
            "vram_total_bytes",
            "Device memory capacity",
            total_bytes.clone(),
        );
        registry.register(
            "vram_used_bytes",
            "Device memory admitted to sealed shards",
            used_bytes.clone(),
        );
        registry.register(
            "vram_available_bytes",
            "Device memory that can still be admitted (after headroom)",
            available_bytes.clone(),
        );
        registry.register("vram_shards", "Sealed shards resident", shards.clone());
        registry.register(
            "vram_worker_stopped",
            "1 when the worker stopped after a security incident, else 0",
            stopped.clone(),
        );
        registry.register(
            "vram_connections_open",
            "Client connections open, TLS handshakes in progress included",
            connections.open.clone(),
        );
        registry.register(
            "vram_connection_limit_reached",
            "Times --max-connections connections were open and accepting paused (further connections \
             waited in the listen backlog)",
            connections.limit_reached.clone(),
        );
        registry.register(
            "vram_tls_handshake_failures",
            "TLS handshakes that failed or timed out (a plain-HTTP client on the TLS port, say)",
            connections.tls_handshake_failures.clone(),
        );
        Self {
            registry,
            seal_ops,
            verify_ops,
            attest_ops,
            sweeps,
            seal_seconds,
            verify_seconds,
            total_bytes,
            used_bytes,
            available_bytes,
            shards,
            stopped,
            connections,
        }
    }

    /// The accept loop's metrics.
    pub fn connections(&self) -> ConnectionMetrics {
        self.connections.clone()
    }

    /// Counts a commit by its result (every commit that reached the handler).
    pub fn seal_result(&self, result: &str) {
        self.seal_ops.get_or_create(&label(result)).inc();
    }

    /// Records the time the manager spent on one successful seal.
    pub fn seal_latency(&self, elapsed: Duration) {
        self.seal_seconds.observe(elapsed.as_secs_f64());
    }

    pub fn verify(&self, result: &str, elapsed: Duration) {
        self.verify_ops.get_or_create(&label(result)).inc();
        self.verify_seconds.observe(elapsed.as_secs_f64());
    }

    pub fn attest(&self, result: &str) {
        self.attest_ops.get_or_create(&label(result)).inc();
    }

    pub fn sweep(&self, result: &str) {
        self.sweeps.get_or_create(&label(result)).inc();
    }

    /// Refreshes the gauges from the manager and renders everything.
    pub fn render(&self, manager: &VramManager, shards: usize) -> String {
        for device in manager.devices() {
            let gpu = GpuLabel {
                gpu: device.index.to_string(),
            };
            if let Ok(capacity) = manager.capacity(device.index) {
                self.total_bytes.get_or_create(&gpu).set(capacity.total);
                self.used_bytes.get_or_create(&gpu).set(capacity.used);
                self.available_bytes
                    .get_or_create(&gpu)
                    .set(capacity.available);
            }
        }
        self.shards.set(i64::try_from(shards).unwrap_or(i64::MAX));
        self.stopped.set(match manager.state() {
            WorkerState::Running => 0,
            WorkerState::Stopped { .. } => 1,
        });
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out = "# metrics could not be encoded\n# EOF\n".to_owned();
        }
        out
    }
}

fn label(result: &str) -> ResultLabel {
    ResultLabel {
        result: result.to_owned(),
    }
}
