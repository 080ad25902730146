//! `vram-residency serve`: the worker service (axum on tokio; the core crate stays synchronous).
//!
//! Start-up: the root check (refused as root unless `--allow-root`; before anything is read, opened
//! or bound) → listen policy and TLS certificate and key (`transport`) → worker token (file or
//! environment, never argv) → API tokens and their roles (files; the worker token is never one) →
//! models directory → backend → audit log (locked, verified with the worker's public key, chain
//! continued; created with its first record if missing) → manager → listener. The bound address is
//! printed on stdout as `listening on http://ADDR` (`https://` with TLS), then requests are served
//! until SIGTERM or SIGINT. Shutdown: stop accepting, let running requests finish, stop the sweep,
//! wait for running operations, free every shard (each one audited), record `service_stopped`, sync
//! the audit log. `docs/service.md` is the operator's guide.

mod api;
mod auth;
mod error;
mod metrics;
mod state;
mod sweep;
mod transport;

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use clap::Args;
use tokio::net::TcpListener;
use tokio::sync::watch;
use vram_residency::shard::unix_nanos;
use vram_residency::{
    AuditEntry, AuditEvent, AuditLog, AuditSink, BackendKind, ModelsDir, VramManager,
};

use crate::backends;
use crate::cli::{BackendArgs, load_token, parse_bytes};

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Directory the model files are served from; commit paths are relative to it.
    #[arg(long, env = "VRAM_RESIDENCY_MODELS_DIR")]
    pub models_dir: PathBuf,
    /// File holding the worker token (else the VRAM_RESIDENCY_TOKEN environment variable). The token
    /// is never accepted on the command line, and never as an HTTP credential.
    #[arg(long, env = "VRAM_RESIDENCY_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// File of operator API tokens (every route), one per line; `#` comments and blank lines are
    /// skipped. Readable by its owner only (chmod 600).
    #[arg(long, env = "VRAM_RESIDENCY_OPERATOR_TOKENS")]
    pub operator_tokens: Option<PathBuf>,
    /// File of observer API tokens (read-only routes, attest, /metrics), one per line. Readable by
    /// its owner only (chmod 600).
    #[arg(long, env = "VRAM_RESIDENCY_OBSERVER_TOKENS")]
    pub observer_tokens: Option<PathBuf>,
    /// Serve /metrics without a token. Only with a loopback --listen address.
    #[arg(long)]
    pub metrics_without_token: bool,
    /// Address to listen on: IP:PORT, or localhost:PORT (127.0.0.1). Loopback by default. A
    /// non-loopback address needs --tls-cert and --tls-key, or --insecure-plain-http.
    #[arg(long, env = "VRAM_RESIDENCY_LISTEN", default_value = "127.0.0.1:8470", value_parser = parse_listen)]
    pub listen: SocketAddr,
    /// Serve HTTPS (TLS 1.2/1.3, rustls) with this PEM certificate chain, the server's certificate
    /// first. Needs --tls-key. No client certificates are asked for: clients still need API tokens.
    #[arg(long, env = "VRAM_RESIDENCY_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert (PKCS#8, RSA or SEC1 EC). Readable by its owner only
    /// (chmod 600).
    #[arg(long, env = "VRAM_RESIDENCY_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Serve plain HTTP on a non-loopback --listen address anyway: tokens and answers cross the
    /// network unencrypted. Only behind a TLS-terminating proxy on a network you trust.
    #[arg(long, conflicts_with = "tls_cert")]
    pub insecure_plain_http: bool,
    /// The signed, hash-chained audit log (created with its first record if missing; verified and
    /// continued if present; a file with no valid record is refused).
    #[arg(long, env = "VRAM_RESIDENCY_AUDIT_LOG")]
    pub audit_log: PathBuf,
    #[command(flatten)]
    pub backend: BackendArgs,
    /// Re-verify every shard this often (e.g. 60s, 5m); 0 disables the sweep.
    #[arg(long, env = "VRAM_RESIDENCY_SWEEP_INTERVAL", default_value = "60s", value_parser = parse_duration)]
    pub sweep_interval: Duration,
    /// Streaming multiprocessors the sweep's verifications may use (cuda: a green context of that
    /// many SMs, an MPS context where MPS runs, or a bounded grid: see --sweep-mechanism), so that
    /// a model serving on the same GPU barely notices; 0: the whole GPU, as foreground
    /// verifications.
    #[arg(long, env = "VRAM_RESIDENCY_SWEEP_SMS", default_value_t = 0)]
    pub sweep_sms: u32,
    /// How --sweep-sms is held: `auto` (the first that works: green context, MPS context where
    /// this process is a client of a running MPS daemon, bounded grid), `green`, `mps` or
    /// `bounded` (that one only; sweeps fail when it cannot be had). With the inference engine in
    /// another process, start the MPS daemon (`nvidia-cuda-mps-control -d`) before both: without
    /// it the two processes time-slice the GPU, whatever the budget.
    #[arg(long, env = "VRAM_RESIDENCY_SWEEP_MECHANISM", default_value = "auto",
          value_parser = parse_mechanism)]
    pub sweep_mechanism: vram_residency::LaneMechanism,
    /// The most GB/s (10^9 bytes per second of wall time) a sweep re-hashes: after each shard it
    /// waits until the bytes fit (e.g. --sweep-sms 16 --sweep-max-rate 60). 0: no cap.
    #[arg(long, env = "VRAM_RESIDENCY_SWEEP_MAX_RATE", default_value = "0", value_parser = parse_rate)]
    pub sweep_max_rate: u64,
    /// Largest request body accepted.
    #[arg(long, env = "VRAM_RESIDENCY_MAX_BODY", default_value = "64KiB", value_parser = parse_bytes)]
    pub max_body: u64,
    /// Longest a request may take (408 after that; a commit still completes and registers).
    #[arg(long, env = "VRAM_RESIDENCY_REQUEST_TIMEOUT", default_value = "300s", value_parser = parse_duration)]
    pub request_timeout: Duration,
    /// Longest a client may take for the TLS handshake, and to send a request's headers (an idle
    /// connection is closed after it too).
    #[arg(long, env = "VRAM_RESIDENCY_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_positive_duration)]
    pub header_timeout: Duration,
    /// Longest a client may take to send a request body, once the server starts reading it: then
    /// 408 body_timeout and the connection is closed (a body sent a byte at a time holds nothing
    /// for long).
    #[arg(long, env = "VRAM_RESIDENCY_BODY_TIMEOUT", default_value = "30s", value_parser = parse_positive_duration)]
    pub body_timeout: Duration,
    /// Connections open at once (TLS handshakes included). At the cap no connection is accepted
    /// until one closes; new ones wait in the kernel's listen backlog.
    #[arg(long, env = "VRAM_RESIDENCY_MAX_CONNECTIONS", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..=65_536))]
    pub max_connections: u32,
    /// Seals, verifications and attestations running at once; more wait their turn.
    #[arg(long, env = "VRAM_RESIDENCY_MAX_PARALLEL_OPS", default_value_t = 4)]
    pub max_parallel_ops: u32,
    /// Start even as root (effective uid 0), with a warning and an audit record. Without it, serve
    /// refuses to run as root: it needs no privilege (run it as a dedicated user, see deploy/). No
    /// environment variable: the choice stays visible on the command line.
    #[arg(long)]
    pub allow_root: bool,
}

/// Whether the service may start, given `--allow-root` and whether the effective uid is 0: `Ok(true)`
/// when it runs as root by permission (the caller warns and audits), `Ok(false)` when not root, and
/// the refusal, naming the flag, when root without it.
fn root_check(allow_root: bool, euid_is_root: bool) -> anyhow::Result<bool> {
    match (euid_is_root, allow_root) {
        (false, _) => Ok(false),
        (true, true) => Ok(true),
        (true, false) => anyhow::bail!(
            "refusing to run as root (effective uid 0): the worker needs no privilege beyond the \
             NVIDIA device nodes, and a compromise of a root service is a compromise of the host. Run \
             it as a dedicated user (deploy/systemd/vram-residency.service, deploy/container/), or \
             pass --allow-root to run as root anyway"
        ),
    }
}

/// The warning printed (stderr) and recorded (audit log) when `--allow-root` lets the service run as
/// root.
const ROOT_WARNING: &str = "running as root (effective uid 0) because --allow-root was given: a \
                            compromise of this service is a compromise of the host; run it as a \
                            dedicated user instead (see deploy/)";

/// `IP:PORT`, `[IPv6]:PORT`, or `localhost:PORT` (loopback, IPv4); a bare port gets a hint.
fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    if let Ok(address) = text.parse::<SocketAddr>() {
        return Ok(address);
    }
    if let Some(port) = text.strip_prefix("localhost:") {
        let port: u16 = port
            .parse()
            .map_err(|_| format!("{port:?} is not a port number (0 to 65535)"))?;
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    if text.parse::<u16>().is_ok() {
        return Err(format!(
            "{text:?} is a bare port; give an address with it, e.g. 127.0.0.1:{text} or localhost:{text}"
        ));
    }
    Err(format!(
        "{text:?} is not an address: expected IP:PORT (127.0.0.1:8470, [::1]:8470) or localhost:PORT"
    ))
}

/// GB/s as whole bytes per second; `0` is no cap.
fn parse_rate(s: &str) -> Result<u64, String> {
    let gbps: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of GB/s (e.g. 60, 12.5; 0: no cap)"))?;
    if gbps == 0.0 {
        return Ok(0);
    }
    vram_residency::background::bytes_per_second(gbps)
        .ok_or_else(|| format!("{s:?}: a rate must be a positive number of GB/s, or 0"))
}

fn parse_mechanism(s: &str) -> Result<vram_residency::LaneMechanism, String> {
    s.parse()
        .map_err(|e: vram_residency::VramError| e.to_string())
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    if s.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration (examples: 60s, 5m): {e}"))
}

/// A duration above zero (a zero timeout would refuse every request).
fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    let duration = parse_duration(s)?;
    if duration.is_zero() {
        return Err(format!(
            "{s:?}: give a duration above zero (examples: 10s, 1m)"
        ));
    }
    Ok(duration)
}

pub fn run(args: &ServeArgs) -> anyhow::Result<ExitCode> {
    // First of all: nothing is read, opened or bound by a root process that was not told it may run.
    let as_root = root_check(args.allow_root, rustix::process::geteuid().is_root())?;
    if as_root {
        eprintln!("WARNING: {ROOT_WARNING}");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(64)
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(args, as_root))
}

async fn serve(args: &ServeArgs, as_root: bool) -> anyhow::Result<ExitCode> {
    // Before anything is read, opened or bound: where and how clients connect.
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            Some(transport::load_tls(cert, key).map_err(crate::cli::usage_of)?)
        }
        // clap requires both or neither.
        _ => None,
    };
    let transport = transport::choose(args.listen, tls.is_some(), args.insecure_plain_http)
        .map_err(crate::cli::usage_of)?;
    let token = load_token(args.token_file.as_deref())?;
    let mut access = auth::Access::load(
        token.bearer_check(),
        args.operator_tokens.as_deref(),
        args.observer_tokens.as_deref(),
    )
    .map_err(crate::cli::usage_of)?;
    if args.metrics_without_token && !args.listen.ip().is_loopback() {
        return Err(crate::cli::usage(format!(
            "--metrics-without-token is allowed only with a loopback --listen address (127.0.0.1, \
             ::1); {} is not one. Give the scraper an observer token instead",
            args.listen
        )));
    }
    access.metrics_without_token = args.metrics_without_token;
    let models = ModelsDir::new(&args.models_dir)
        .with_context(|| format!("models directory {}", args.models_dir.display()))
        .map_err(crate::cli::usage_of)?;
    let backend: Arc<dyn vram_residency::Backend> = match args.backend.backend {
        BackendKind::Cuda => {
            let cuda = backends::open_cuda(args.backend.cuda())?;
            if args.sweep_sms > 0 && !args.sweep_interval.is_zero() {
                note_mps(&cuda, args.sweep_sms);
            }
            Arc::new(cuda)
        }
        BackendKind::Sim => backends::open(
            args.backend.backend,
            args.backend.sim(),
            args.backend.cuda(),
        )?,
    };
    let kind = backend.kind();
    let (audit_log, report) = AuditLog::open(&args.audit_log, &token, kind)?;
    if let Some(torn) = &report.torn_tail {
        eprintln!(
            "warning: the audit log ended in a torn line: {} byte(s) after record {} were cut (a \
             crash mid-write, or a deliberate cut inside a record); they are declared by a recovery \
             record and the chain continues",
            torn.bytes, report.head.seq
        );
    }
    let audit_log = Arc::new(audit_log);
    let manager = Arc::new(VramManager::with_config(
        &token,
        backend,
        args.backend.manager_config(),
        Arc::clone(&audit_log) as Arc<dyn vram_residency::AuditSink>,
    )?);
    drop(token);

    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let local = listener.local_addr().context("reading the bound address")?;
    if kind == BackendKind::Sim {
        eprintln!(
            "warning: backend sim: simulated device memory in host RAM, NOT VRAM residency; every \
             record says backend sim"
        );
    }
    if transport == transport::Transport::InsecurePlainHttp {
        eprintln!(
            "WARNING: --insecure-plain-http: serving PLAIN HTTP on {local}, which is not a loopback \
             address. API tokens, requests and answers cross the network unencrypted: anyone on the \
             path can read a token and use it. Use --tls-cert/--tls-key, or keep this behind a \
             TLS-terminating proxy on a network you trust"
        );
    }
    let devices = u32::try_from(manager.devices().len()).unwrap_or(u32::MAX);
    record(
        audit_log.as_ref(),
        kind,
        AuditEvent::ServiceStarted {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            devices,
            listen: local.to_string(),
        },
    )?;
    if as_root {
        record(
            audit_log.as_ref(),
            kind,
            AuditEvent::ServiceRunsAsRoot {
                note: ROOT_WARNING.to_owned(),
            },
        )?;
    }

    let mut app = state::AppState::new(
        Arc::clone(&manager),
        models,
        access,
        Arc::clone(&audit_log) as Arc<dyn AuditSink>,
        args.max_parallel_ops,
        args.sweep_interval,
        transport,
    );
    app.sweep_budget = (args.sweep_sms > 0).then_some(vram_residency::SmBudget::with(
        args.sweep_sms,
        args.sweep_mechanism,
    ));
    app.sweep_max_bytes_per_second = (args.sweep_max_rate > 0).then_some(args.sweep_max_rate);
    let app = Arc::new(app);
    let router = api::router(
        Arc::clone(&app),
        api::Limits {
            max_body: usize::try_from(args.max_body).unwrap_or(usize::MAX),
            request_timeout: args.request_timeout,
            body_timeout: args.body_timeout,
        },
    );
    let (stop_sweeps, sweeps_stopped) = watch::channel(false);
    let sweeper = tokio::spawn(sweep::run(
        Arc::clone(&app),
        args.sweep_interval,
        sweeps_stopped,
    ));

    println!("listening on {}://{local}", transport.scheme());
    std::io::stdout().flush().context("writing to stdout")?;

    let grace = args.request_timeout;
    let signal = transport::accept_until_signal(
        listener,
        router,
        tls,
        transport::ConnectionLimits {
            max_connections: args.max_connections,
            header_timeout: args.header_timeout,
        },
        app.metrics.connections(),
        grace,
    )
    .await;
    eprintln!("{signal} received: shutting down");
    let _ = stop_sweeps.send(true);
    if sweeper.await.is_err() {
        tracing::warn!("the sweep task ended abnormally");
    }
    let freed = app.shut_down(grace).await;
    record(
        audit_log.as_ref(),
        kind,
        AuditEvent::ServiceStopped {
            signal: signal.to_owned(),
            shards_freed: freed,
        },
    )?;
    audit_log.sync()?;
    eprintln!("shutdown complete: {freed} shard(s) freed, audit log synced");
    Ok(ExitCode::SUCCESS)
}

/// Says on stderr whether other processes' kernels will run beside the confined sweeps (this
/// process is an MPS client) or time-slice the GPU with them (it is not).
fn note_mps(cuda: &vram_residency_cuda::CudaBackend, sms: u32) {
    match cuda.hasher(0).and_then(|hasher| hasher.mps_client()) {
        Ok(true) => eprintln!(
            "sweeps: confined to {sms} SMs; this process is an MPS client, so kernels of other \
             processes on the GPU run beside the sweeps"
        ),
        Ok(false) => eprintln!(
            "note: sweeps are confined to {sms} SMs within this process, but no MPS daemon serves \
             it: kernels of other processes on the same GPU (an inference engine) time-slice the \
             GPU with the sweeps. Start `nvidia-cuda-mps-control -d` before both processes for \
             them to run side by side"
        ),
        Err(error) => tracing::warn!(%error, "cannot tell whether MPS is running"),
    }
}

/// Records one of the service's own events (start, stop, a refused worker token) in `sink`.
fn record(sink: &dyn AuditSink, backend: BackendKind, event: AuditEvent) -> anyhow::Result<()> {
    let entry = AuditEntry {
        at_ns: unix_nanos(SystemTime::now()),
        backend,
        severity: event.severity(),
        event,
    };
    tracing::info!(event = entry.event.name(), "audit");
    sink.record(&entry)?;
    Ok(())
}

async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut terminate) => tokio::select! {
            _ = terminate.recv() => "SIGTERM",
            _ = tokio::signal::ctrl_c() => "SIGINT",
        },
        Err(error) => {
            tracing::warn!(%error, "cannot watch SIGTERM; only SIGINT stops the service");
            let _ = tokio::signal::ctrl_c().await;
            "SIGINT"
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    #[test]
    fn sweep_rates_parse_as_gb_per_s_zero_is_no_cap_and_garbage_is_refused() {
        assert_eq!(super::parse_rate("0"), Ok(0));
        assert_eq!(super::parse_rate("60"), Ok(60_000_000_000));
        assert_eq!(super::parse_rate(" 12.5 "), Ok(12_500_000_000));
        for bad in ["", "-1", "fast", "inf", "NaN", "1e20"] {
            assert!(super::parse_rate(bad).is_err(), "{bad:?} was accepted");
        }
        assert_eq!(
            super::parse_mechanism("mps"),
            Ok(vram_residency::LaneMechanism::Mps)
        );
        assert!(super::parse_mechanism("mig").is_err());
    }

    #[test]
    fn listen_accepts_ip_port_and_localhost_and_hints_at_a_bare_port() {
        assert_eq!(
            super::parse_listen("127.0.0.1:8470").unwrap().to_string(),
            "127.0.0.1:8470"
        );
        assert_eq!(
            super::parse_listen("[::1]:0").unwrap().to_string(),
            "[::1]:0"
        );
        assert_eq!(
            super::parse_listen("localhost:0").unwrap().to_string(),
            "127.0.0.1:0"
        );
        let hint = super::parse_listen("8471").unwrap_err();
        assert!(hint.contains("127.0.0.1:8471"), "{hint}");
        assert!(super::parse_listen("localhost:http").is_err());
        assert!(super::parse_listen("example.org:80").is_err());
    }

    #[test]
    fn root_is_refused_without_allow_root_and_the_refusal_names_the_flag() {
        assert!(!super::root_check(false, false).unwrap());
        assert!(
            !super::root_check(true, false).unwrap(),
            "the flag alone is not root"
        );
        assert!(super::root_check(true, true).unwrap());
        let refused = super::root_check(false, true).unwrap_err().to_string();
        assert!(refused.contains("--allow-root"), "{refused}");
        assert!(refused.contains("effective uid 0"), "{refused}");
        assert!(super::ROOT_WARNING.contains("--allow-root"));
    }
}
