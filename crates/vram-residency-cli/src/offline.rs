//! Offline checks: `audit verify` (the HMAC-chained audit log) and `attest verify` (an attestation
//! against the nonce the caller sent). Both need the worker token (file or environment) to derive the
//! key; neither needs the worker or a GPU.

use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Subcommand;
use vram_residency::attestation::parse_nonce_hex;
use vram_residency::audit_log::verify_log;
use vram_residency::shard::from_unix_nanos;
use vram_residency::{Attestation, BackendKind};

use crate::cli::load_token;

/// Largest attestation file read.
const MAX_ATTESTATION_BYTES: u64 = 1 << 20;

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Verify an audit log: every record's MAC, sequence and chain. Prints OK and the record count,
    /// or the first bad record (line and why) and exits 1. A torn last line (a crash mid-write) is
    /// reported as such; it is not tampering and every record before it still verifies.
    Verify {
        /// The audit log.
        file: PathBuf,
        /// File holding the worker token (else the VRAM_RESIDENCY_TOKEN environment variable).
        #[arg(long)]
        token_file: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum AttestCommand {
    /// Verify an attestation (the JSON a worker returned) against the nonce you sent. Exits 1 when the
    /// MAC does not verify (changed, or another token) or the nonce differs.
    Verify {
        /// The attestation JSON.
        file: PathBuf,
        /// File holding the worker token (else the VRAM_RESIDENCY_TOKEN environment variable).
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// The nonce sent with the request, hex.
        #[arg(long)]
        nonce: String,
    },
}

pub fn audit(command: &AuditCommand) -> anyhow::Result<ExitCode> {
    let AuditCommand::Verify { file, token_file } = command;
    let key = load_token(token_file.as_deref())?.derive_keys().audit;
    let opened =
        std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
    let report = verify_log(&mut BufReader::new(opened), &key)?;
    if let Some(bad) = &report.bad {
        println!(
            "FAILED: {}: line {} (byte offset {}): {}",
            file.display(),
            bad.line,
            bad.offset,
            bad.reason
        );
        println!(
            "{} record(s) before it verified; nothing from line {} on can be trusted",
            report.records, bad.line
        );
        return Ok(ExitCode::FAILURE);
    }
    println!(
        "OK: {}: {} record(s) verified (seq 1..{}), chain intact",
        file.display(),
        report.records,
        report.last_seq
    );
    for skipped in &report.recovered {
        println!(
            "note: line {} ({} bytes) is a torn line from an earlier crash, declared by the recovery \
             record after it",
            skipped.line, skipped.bytes
        );
    }
    if let Some(torn) = &report.torn_tail {
        println!(
            "TORN TAIL: line {} ({} bytes at offset {}) is an incomplete last line left by a crash \
             mid-write; it is not a record. Every record before it verified. The worker ends it with \
             a recovery record when it next starts.",
            torn.line, torn.bytes, torn.offset
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn attest(command: &AttestCommand) -> anyhow::Result<ExitCode> {
    let AttestCommand::Verify {
        file,
        token_file,
        nonce,
    } = command;
    let key = load_token(token_file.as_deref())?.derive_keys().attestation;
    let nonce = parse_nonce_hex(nonce)?;
    let text = read_small(file)?;
    let attestation = match Attestation::from_json(&text) {
        Ok(attestation) => attestation,
        Err(error) => {
            println!("FAILED: {}: {error}", file.display());
            return Ok(ExitCode::FAILURE);
        }
    };
    if let Err(error) = attestation.verify(&key, &nonce) {
        println!("FAILED: {}: {error}", file.display());
        return Ok(ExitCode::FAILURE);
    }
    let record = &attestation.record;
    println!(
        "OK: {}: attestation verified for this nonce",
        file.display()
    );
    if record.backend == BackendKind::Sim {
        println!("  backend:      sim (simulated device memory in host RAM: NOT VRAM residency)");
    } else {
        println!("  backend:      {}", record.backend);
    }
    println!("  shard:        {}", record.shard_id);
    println!("  digest:       {}", record.digest);
    println!("  vram_bytes:   {}", record.vram_bytes);
    println!(
        "  device:       GPU {} {:?} uuid {} driver {}",
        record.gpu_device,
        attestation.device_name,
        vram_residency::shard::format_uuid(&record.device_uuid),
        attestation.driver_version
    );
    println!("  residency:    {:?}", attestation.residency);
    println!(
        "  attested_at:  {}",
        humantime::format_rfc3339_nanos(from_unix_nanos(attestation.attested_at_ns))
    );
    println!(
        "  verification: {} bytes re-hashed to {} in {} ns",
        attestation.verified_bytes, attestation.verified_digest, attestation.verify_elapsed_ns
    );
    Ok(ExitCode::SUCCESS)
}

fn read_small(path: &Path) -> anyhow::Result<String> {
    let len = std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    anyhow::ensure!(
        len <= MAX_ATTESTATION_BYTES,
        "{} is larger than 1 MiB; not an attestation",
        path.display()
    );
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}
