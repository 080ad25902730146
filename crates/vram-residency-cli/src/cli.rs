//! Arguments and the `digest` and `seal` subcommands.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use vram_residency::format::FormatChoice;
use vram_residency::keys::TOKEN_ENV;
use vram_residency::{
    BackendKind, Digest, LaneMechanism, ManagerConfig, NoAuditSink, SealOptions, ShardId, SmBudget,
    VramError, VramManager, WorkerToken, digest,
};

use crate::backends::{self, SimSettings};
use crate::progress;

/// Sealed, VRAM-resident model weights.
#[derive(Debug, Parser)]
#[command(name = "vram-residency", version, about = "Sealed, VRAM-resident model weights: fs-verity digests, HMAC seals, verification.", long_about = None)]
pub struct Cli {
    /// More log output on stderr (-v: audit events, -vv: debug).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the fs-verity digest of each FILE, exactly as `fsverity digest FILE...` does.
    Digest {
        /// Files to digest.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Print a model file's format and tensor table (GGUF v2/v3, safetensors, or raw), read from its
    /// header only. A malformed header is rejected with the field and byte offset.
    Inspect {
        /// The model file.
        model: PathBuf,
        /// Print the table as JSON.
        #[arg(long)]
        json: bool,
        /// What the file is: `auto` (default; a file whose name or first bytes claim a format must
        /// parse as it), `gguf`, `safetensors`, or `raw`.
        #[arg(long, default_value = "auto", value_parser = parse_format)]
        format: FormatChoice,
    },
    /// List the GPUs (name, UUID, memory, compute capability, ECC, integrated) with the VRAM-only
    /// policy verdict on each. Exits non-zero when a device is refused.
    Devices(DevicesArgs),
    /// Seal a model file into device memory and print its seal record.
    Seal(SealArgs),
    /// Measure seal and verify throughput, the seed crate's method and the hardware ceilings in
    /// the same run (human table, or --json).
    Bench(BenchArgs),
    /// Seal a synthetic model, verify it, corrupt one bit from outside the manager, and show that
    /// verification catches it and the worker stops.
    Demo(DemoArgs),
    /// Run the worker service: an HTTP API (loopback by default, operator and observer API tokens)
    /// to commit, list, verify, attest and evict shards, with a signed, hash-chained audit log,
    /// sweeps and metrics.
    Serve(Box<crate::serve::ServeArgs>),
    /// Print the worker's public Ed25519 key (PEM) and its key id: what verifiers of its attestations
    /// and audit log need. Derived from the worker token; the secret key is never printed.
    Identity(crate::offline::IdentityArgs),
    /// Audit log tools.
    #[command(subcommand)]
    Audit(crate::offline::AuditCommand),
    /// Attestation tools.
    #[command(subcommand)]
    Attest(crate::offline::AttestCommand),
}

/// Options shared by the commands that open a backend.
#[derive(Debug, Args)]
pub struct BackendArgs {
    /// Backend: `cuda` (real VRAM, the default) or `sim` (host memory; NOT residency).
    #[arg(long, env = "VRAM_RESIDENCY_BACKEND", default_value = "cuda", value_parser = parse_backend)]
    pub backend: BackendKind,
    /// Number of simulated devices (sim only).
    #[arg(long, env = "VRAM_RESIDENCY_SIM_DEVICES", default_value_t = 1)]
    pub sim_devices: u32,
    /// Memory per simulated device, e.g. 4GiB (sim only).
    #[arg(long, env = "VRAM_RESIDENCY_SIM_VRAM", default_value = "4GiB", value_parser = parse_bytes)]
    pub sim_vram: u64,
    /// Bytes kept free on each device, e.g. 512MiB.
    #[arg(long, env = "VRAM_RESIDENCY_HEADROOM", default_value = "0", value_parser = parse_bytes)]
    pub headroom: u64,
    /// Largest model accepted, e.g. 100GB.
    #[arg(long, env = "VRAM_RESIDENCY_MAX_MODEL_BYTES", default_value = "100GB", value_parser = parse_bytes)]
    pub max_model_bytes: u64,
    /// Refuse to start unless every GPU has ECC enabled (integrated GPUs are always refused).
    #[arg(long, env = "VRAM_RESIDENCY_REQUIRE_ECC")]
    pub require_ecc: bool,
    /// Refuse to start unless no GPU can read pageable host memory directly (HMM/ATS, VP-002): on
    /// such a GPU a kernel could use weights that never left host RAM.
    #[arg(long, env = "VRAM_RESIDENCY_REQUIRE_NO_PAGEABLE_ACCESS")]
    pub require_no_pageable_access: bool,
    /// Read model files with O_DIRECT (bypassing the page cache) when uploading (cuda only).
    #[arg(long, env = "VRAM_RESIDENCY_DIRECT_IO")]
    pub direct_io: bool,
    /// Keep the model file's pages in the page cache after an upload (default: drop them, so the
    /// weights do not stay in host RAM) (cuda only).
    #[arg(long, env = "VRAM_RESIDENCY_KEEP_PAGE_CACHE")]
    pub keep_page_cache: bool,
    /// Reader threads of the staging ring (default: cores, at most 16) (cuda only).
    #[arg(long, env = "VRAM_RESIDENCY_STAGING_READERS")]
    pub staging_readers: Option<usize>,
    /// Size of one pinned staging buffer, a multiple of 4096 (cuda only); two per reader.
    #[arg(long, env = "VRAM_RESIDENCY_STAGING_BUFFER", default_value = "2MiB", value_parser = parse_bytes)]
    pub staging_buffer: u64,
}

impl BackendArgs {
    pub fn sim(&self) -> SimSettings {
        SimSettings {
            devices: self.sim_devices,
            bytes_per_device: self.sim_vram,
        }
    }

    pub fn cuda(&self) -> vram_residency_cuda::CudaConfig {
        let mut config = vram_residency_cuda::CudaConfig::default();
        config.staging.direct_io = self.direct_io;
        config.staging.drop_page_cache = !self.keep_page_cache;
        if let Some(readers) = self.staging_readers {
            config.staging.readers = readers;
        }
        config.staging.slot_bytes = usize::try_from(self.staging_buffer).unwrap_or(usize::MAX);
        config
    }

    pub fn manager_config(&self) -> ManagerConfig {
        ManagerConfig {
            max_model_bytes: self.max_model_bytes,
            headroom_bytes: self.headroom,
            device_policy: vram_residency::DevicePolicy {
                require_ecc: self.require_ecc,
                require_no_pageable_access: self.require_no_pageable_access,
            },
        }
    }
}

#[derive(Debug, Args)]
pub struct SealArgs {
    /// Model file to seal.
    pub file: PathBuf,
    /// File holding the worker token, mode 0600 (else the VRAM_RESIDENCY_TOKEN environment
    /// variable). The token is never accepted on the command line.
    #[arg(long, env = "VRAM_RESIDENCY_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    #[command(flatten)]
    pub backend: BackendArgs,
    /// Device index.
    #[arg(long, default_value_t = 0)]
    pub gpu: u32,
    /// Shard id (1-256 characters of A-Z a-z 0-9 - _); generated when absent.
    #[arg(long, value_parser = parse_shard_id)]
    pub shard_id: Option<ShardId>,
    /// Refuse to seal unless the digest measured in device memory is this (sha256:<64 hex>).
    #[arg(long, value_parser = parse_digest)]
    pub expect: Option<Digest>,
    /// Caller's name for the model, recorded in the seal.
    #[arg(long, default_value = "")]
    pub model_ref: String,
    /// Index of this shard in its model.
    #[arg(long, default_value_t = 0)]
    pub shard_index: u32,
    /// Number of shards in the model.
    #[arg(long, default_value_t = 1)]
    pub total_shards: u32,
    /// What the file is: `auto` (default: a file whose name or first bytes claim GGUF or
    /// safetensors must parse as that, else it is refused), `gguf`, `safetensors`, or `raw` (seal
    /// any bytes as one tensor).
    #[arg(long, default_value = "auto", value_parser = parse_format)]
    pub format: FormatChoice,
    /// Print the seal record as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct DevicesArgs {
    #[command(flatten)]
    pub backend: BackendArgs,
    /// Print as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub backend: BackendArgs,
    /// Device index.
    #[arg(long, default_value_t = 0)]
    pub gpu: u32,
    /// Model sizes to measure, comma-separated (up to what fits in VRAM), e.g. 1GiB,16GiB.
    #[arg(long, value_delimiter = ',', default_value = "1GiB,16GiB", value_parser = parse_bytes)]
    pub sizes: Vec<u64>,
    /// Directory for the temporary test files (they are deleted afterwards).
    #[arg(long, default_value = "/tmp")]
    pub dir: PathBuf,
    /// Measure this existing file instead of generated ones (kept; --sizes is ignored).
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Verifications per size (best and median are reported).
    #[arg(long, default_value_t = 5)]
    pub verify_runs: usize,
    /// Also measure a model of one shard of this size per GPU: each GPU's shard verified alone, then
    /// the whole model on every GPU at once (per-GPU and aggregate GB/s).
    #[arg(long, value_parser = parse_bytes)]
    pub model_shard: Option<u64>,
    /// Seals per size, each of the page-cache-hot file with its pages cached by writing it (best,
    /// median and first are reported); then one more with its pages cached by reading it.
    #[arg(long, default_value_t = 3)]
    pub seal_runs: usize,
    /// Skip the seed crate's method (slow: one-core SHA-256 of every byte).
    #[arg(long)]
    pub skip_seed: bool,
    /// Also measure what background verification costs a decode-like victim (a memory-bound bf16
    /// GEMV of many blocks in many waves): alone, beside verification confined to each
    /// --interference-sms budget, and beside foreground verification back to back (cuda only).
    #[arg(long)]
    pub interference: bool,
    /// Budgets of the interference run, each `SMS[:MECHANISM][@GBPS]`: SMs, optionally how they
    /// are held (auto, green, mps, bounded; default auto) and a rate cap in GB/s. Example:
    /// `8,16,16@60,8:bounded`.
    #[arg(long, value_delimiter = ',', default_value = "8,16,32", value_parser = parse_plan)]
    pub interference_sms: Vec<vram_residency_cuda::interference::Plan>,
    /// Resident bytes the background verification re-hashes round-robin (in 16 GiB buffers).
    #[arg(long, default_value = "64GiB", value_parser = parse_bytes)]
    pub resident: u64,
    /// Weight bytes the victim GEMV reads per step.
    #[arg(long, default_value = "8GiB", value_parser = parse_bytes)]
    pub victim: u64,
    /// Seconds per interference scenario.
    #[arg(long, default_value_t = 3.0)]
    pub interference_seconds: f64,
    /// Print the results as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also write the JSON to this file.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Size of the synthetic model, e.g. 256MiB.
    #[arg(long, default_value = "64MiB", value_parser = parse_bytes)]
    pub size: u64,
    /// Backend: `cuda` when present, otherwise `sim`; or name one.
    #[arg(long, value_parser = parse_backend)]
    pub backend: Option<BackendKind>,
    /// Print one JSON document (the summary) on stdout; the narrative goes to stderr.
    #[arg(long)]
    pub json: bool,
}

impl DemoArgs {
    pub fn cuda_config(&self) -> vram_residency_cuda::CudaConfig {
        vram_residency_cuda::CudaConfig::default()
    }
}

fn parse_backend(s: &str) -> Result<BackendKind, String> {
    s.parse()
        .map_err(|e: vram_residency::VramError| e.to_string())
}

pub fn parse_format(s: &str) -> Result<FormatChoice, String> {
    s.parse()
}

fn parse_shard_id(s: &str) -> Result<ShardId, String> {
    ShardId::new(s).map_err(|e| e.to_string())
}

fn parse_digest(s: &str) -> Result<Digest, String> {
    s.parse()
        .map_err(|e: vram_residency::ids::InvalidDigest| e.to_string())
}

/// Parses an interference budget `SMS[:MECHANISM][@GBPS]` (e.g. `16`, `8:bounded`, `16@60`).
pub fn parse_plan(s: &str) -> Result<vram_residency_cuda::interference::Plan, String> {
    let s = s.trim();
    let (budget, rate) = match s.split_once('@') {
        Some((budget, rate)) => {
            let rate: f64 = rate
                .trim()
                .parse()
                .map_err(|_| format!("{s:?}: the rate after @ is not a number of GB/s"))?;
            if !(rate.is_finite() && rate > 0.0) {
                return Err(format!("{s:?}: the rate after @ must be above zero"));
            }
            (budget, Some(rate))
        }
        None => (s, None),
    };
    let (sms, mechanism) = match budget.split_once(':') {
        Some((sms, mechanism)) => (
            sms,
            mechanism
                .parse::<LaneMechanism>()
                .map_err(|e| format!("{s:?}: {e}"))?,
        ),
        None => (budget, LaneMechanism::Auto),
    };
    let sms: u32 =
        sms.trim().parse().ok().filter(|&n| n > 0).ok_or_else(|| {
            format!("{s:?}: expected SMS[:MECHANISM][@GBPS], SMS a count above zero")
        })?;
    Ok(vram_residency_cuda::interference::Plan {
        budget: SmBudget::with(sms, mechanism),
        max_gb_per_s: rate,
    })
}

/// Parses a byte count: a plain number, or a number with B, KB/MB/GB/TB (powers of 1000) or
/// KiB/MiB/GiB/TiB (powers of 1024).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a byte count (examples: 4096, 64MiB, 100GB)"))?;
    let multiplier: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" | "kB" => 1000,
        "MB" => 1000_u64.pow(2),
        "GB" => 1000_u64.pow(3),
        "TB" => 1000_u64.pow(4),
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        other => {
            return Err(format!(
                "unknown unit {other:?} (use B, KB, MB, GB, KiB, MiB, GiB)"
            ));
        }
    };
    number
        .checked_mul(multiplier)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// Reads the worker token from `--token-file` or the environment, never from argv. Every failure is
/// a usage error (exit status 2): the command's configuration is wrong, nothing was attempted.
pub fn load_token(token_file: Option<&Path>) -> anyhow::Result<WorkerToken> {
    match token_file {
        Some(path) => WorkerToken::from_file(path)
            .with_context(|| format!("reading the worker token from {}", path.display()))
            .map_err(usage_of),
        None => match std::env::var_os(TOKEN_ENV) {
            Some(_) => WorkerToken::from_env(TOKEN_ENV)
                .with_context(|| format!("reading the worker token from ${TOKEN_ENV}"))
                .map_err(usage_of),
            None => Err(usage(format!(
                "no worker token: pass --token-file FILE, or set VRAM_RESIDENCY_TOKEN_FILE (a file) \
                 or {TOKEN_ENV} (the token itself); the token is never accepted on the command line"
            ))),
        },
    }
}

/// Exit status of a command that failed because it was asked for something that cannot work: a
/// flag value, a flag combination, the environment or a token file (clap's own usage errors exit
/// with 2 too). Nothing was attempted.
pub const EXIT_USAGE: u8 = 2;

/// A usage error: see [`EXIT_USAGE`]. Its message is the whole story (causes flattened into it).
#[derive(Debug)]
pub struct UsageError(String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// A usage error with this message.
pub fn usage(message: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(UsageError(message.into()))
}

/// The same error, marked as a usage error (its causes folded into its message).
pub fn usage_of(error: anyhow::Error) -> anyhow::Error {
    usage(error_chain(&error))
}

/// The exit status for a failed command: 2 for usage errors, 1 for everything else (an operation
/// or a verification failed). Errors of the library that can only come from what the caller asked
/// for (a GPU index out of range, a malformed shard id, digest or token) count as usage errors.
pub fn exit_status(error: &anyhow::Error) -> u8 {
    let usage = error.chain().any(|cause| {
        cause.is::<UsageError>()
            || matches!(
                cause.downcast_ref::<VramError>(),
                Some(
                    VramError::InvalidGpuIndex { .. }
                        | VramError::InvalidShardId { .. }
                        | VramError::InvalidDigest { .. }
                        | VramError::InvalidToken { .. }
                )
            )
    });
    if usage { EXIT_USAGE } else { 1 }
}

/// The error and its causes, `: `-separated, each cause once: a cause whose text a message above it
/// already contains (our errors name their cause in their own message) is not repeated.
pub fn error_chain(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let message = cause.to_string();
        if text.contains(&message) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&message);
    }
    text
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Digest { files } => digest_files(&files),
        Command::Inspect {
            model,
            json,
            format,
        } => crate::inspect::run(&model, json, format),
        Command::Seal(args) => seal(&args),
        Command::Devices(args) => crate::devices::run(&args),
        Command::Bench(args) => crate::bench::run(&args),
        Command::Demo(args) => crate::demo::run(&args),
        Command::Serve(args) => crate::serve::run(&args),
        Command::Identity(args) => crate::offline::identity(&args),
        Command::Audit(command) => crate::offline::audit(&command),
        Command::Attest(command) => crate::offline::attest(&command),
    }
}

fn digest_files(files: &[PathBuf]) -> anyhow::Result<ExitCode> {
    let mut failed = false;
    for file in files {
        let total = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
        let bar = progress::bytes_bar(total, "digest");
        match digest::digest_file(file, &|n| bar.set_position(n)) {
            Ok(tree) => {
                bar.finish_and_clear();
                println!("{} {}", tree.digest(), file.display());
            }
            Err(error) => {
                bar.finish_and_clear();
                eprintln!("error: {error}");
                failed = true;
            }
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn seal(args: &SealArgs) -> anyhow::Result<ExitCode> {
    let token = load_token(args.token_file.as_deref())?;
    let backend = backends::open(
        args.backend.backend,
        args.backend.sim(),
        args.backend.cuda(),
    )?;
    let manager = VramManager::with_config(
        &token,
        backend,
        args.backend.manager_config(),
        Arc::new(NoAuditSink),
    )?;
    drop(token);
    let total = std::fs::metadata(&args.file)
        .with_context(|| format!("reading {}", args.file.display()))?
        .len();
    let bar = progress::bytes_bar(total, "seal");
    let opts = SealOptions {
        shard_id: args.shard_id.clone(),
        expected_digest: args.expect,
        model_ref: args.model_ref.clone(),
        shard_index: args.shard_index,
        total_shards: args.total_shards,
        tensor_table: None,
        format: args.format,
        progress: Some(progress::callback(&bar)),
    };
    let shard = manager.seal_file(&args.file, args.gpu, &opts);
    bar.finish_and_clear();
    let shard = shard?;
    let view = shard.view();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&view)?);
    } else {
        if view.backend == BackendKind::Sim {
            println!("backend: sim  (simulated device memory in host RAM: NOT VRAM residency)");
        } else {
            println!("backend: {}", view.backend);
        }
        println!("shard_id: {}", view.shard_id);
        println!("file: {}", args.file.display());
        println!("digest: {}", view.digest);
        println!("vram_bytes: {}", view.vram_bytes);
        println!("gpu_device: {}", view.gpu_device);
        println!("device_uuid: {}", view.device_uuid);
        println!("sealed_at: {}", view.sealed_at);
        println!("model_ref: {}", view.model_ref);
        println!("shard: {} of {}", view.shard_index, view.total_shards);
        if let Some(format) = view.format {
            println!("format: {}", crate::inspect::format_name(format));
        }
        if let Some(count) = view.tensor_count {
            println!("tensors: {count}");
        }
        if let Some(table) = &view.tensor_table_digest {
            println!("tensor_table_digest: {table}");
        }
        println!("seal_version: {}", view.seal_version);
        println!("seal_tag: {}", view.seal_tag);
    }
    manager.deallocate(shard)?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::{parse_bytes, parse_plan};
    use vram_residency::{LaneMechanism, SmBudget};

    #[test]
    fn the_command_line_definition_is_consistent_and_every_value_type_matches_its_parser() {
        use clap::{CommandFactory as _, Parser as _};
        super::Cli::command().debug_assert();
        // Parsing runs every field's extraction: a parser whose output type differs from the
        // field's panics here (clap checks that only at run time).
        let cli = super::Cli::try_parse_from([
            "vram-residency",
            "serve",
            "--models-dir",
            "m",
            "--audit-log",
            "a",
            "--sweep-sms",
            "16",
            "--sweep-mechanism",
            "green",
            "--sweep-max-rate",
            "60",
        ])
        .unwrap();
        let super::Command::Serve(args) = cli.command else {
            panic!("not serve");
        };
        assert_eq!(args.sweep_max_rate, 60_000_000_000);
        assert_eq!(args.sweep_mechanism, LaneMechanism::GreenContext);
        let cli = super::Cli::try_parse_from([
            "vram-residency",
            "bench",
            "--interference-sms",
            "8,16@60,8:bounded",
        ])
        .unwrap();
        let super::Command::Bench(args) = cli.command else {
            panic!("not bench");
        };
        assert_eq!(args.interference_sms.len(), 3);
    }

    #[test]
    fn interference_budgets_parse_sms_mechanism_and_rate_and_reject_garbage() {
        let plan = parse_plan("16").unwrap();
        assert_eq!(plan.budget, SmBudget::sms(16));
        assert_eq!(plan.max_gb_per_s, None);
        let plan = parse_plan("8:bounded@55.5").unwrap();
        assert_eq!(plan.budget, SmBudget::with(8, LaneMechanism::BoundedGrid));
        assert_eq!(plan.max_gb_per_s, Some(55.5));
        assert_eq!(plan.label(), "8 SMs (bounded) at most 55.5 GB/s");
        assert_eq!(
            parse_plan("24:mps").unwrap().budget,
            SmBudget::with(24, LaneMechanism::Mps)
        );
        for bad in ["", "0", "x", "8:mig", "8@", "8@-1", "8@inf", "8:green@fast"] {
            assert!(parse_plan(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn byte_counts_parse_with_units_and_reject_garbage() {
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert_eq!(parse_bytes("64MiB"), Ok(64 << 20));
        assert_eq!(parse_bytes("100GB"), Ok(100_000_000_000));
        assert!(parse_bytes("12XB").is_err());
        assert!(parse_bytes("").is_err());
        assert!(parse_bytes("99999999999TiB").is_err());
    }
}
