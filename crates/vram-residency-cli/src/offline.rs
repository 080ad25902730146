//! Offline checks that need **no secret**: `audit verify` (the hash-chained, Ed25519-signed audit log)
//! and `attest verify` (a DSSE attestation against the nonce the caller sent). Both take the worker's
//! public key (PEM, from `vram-residency identity` or `GET /v1/identity`); neither needs the worker,
//! its token or a GPU. Also `identity`, which prints that public key (it needs the token, to derive it).

use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use vram_residency::attestation::{AttestationEnvelope, MAX_ENVELOPE_BYTES, parse_nonce_hex};
use vram_residency::audit_log::verify_log;
use vram_residency::shard::from_unix_nanos;
use vram_residency::{
    Attestation, AuditHead, BackendKind, ModelAttestation, PublicKey, VerifiedAttestation,
};

use crate::cli::{load_token, usage_of};

/// Largest public key file read.
const MAX_PUBLIC_KEY_BYTES: u64 = 16 * 1024;

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Verify an audit log with the worker's public key: every record's signature, sequence and hash
    /// chain. Prints OK, the record count and the head (SEQ:HASH), or the first bad record (line and
    /// why) and exits 1. A file with no valid record (empty, not an audit log) fails. A torn last line
    /// (a crash mid-write, or a cut inside a record) is reported with the number of bytes cut; every
    /// record before it still verifies.
    Verify {
        /// The audit log.
        file: PathBuf,
        /// The worker's public key, PEM (`vram-residency identity`, `GET /v1/identity`).
        #[arg(long, env = "VRAM_RESIDENCY_PUBLIC_KEY")]
        public_key: PathBuf,
        /// A head you obtained earlier (`GET /v1/worker`, an attestation's `audit_head`), as SEQ:HASH:
        /// the log must contain that record with that hash. Detects a log cut after it.
        #[arg(long, value_parser = parse_head)]
        expect_head: Option<AuditHead>,
    },
}

#[derive(Debug, Subcommand)]
pub enum AttestCommand {
    /// Verify an attestation (the DSSE envelope a worker returned) with the worker's public key and
    /// the nonce you sent: a shard's, or a model's (all its shards in one statement; chosen by the
    /// statement's predicateType). Exits 1 when the signature does not verify (changed, or another
    /// key), the statement is inconsistent or (for a model) incomplete, or the nonce differs.
    Verify {
        /// The attestation (DSSE envelope JSON).
        file: PathBuf,
        /// The worker's public key, PEM (`vram-residency identity`, `GET /v1/identity`).
        #[arg(long, env = "VRAM_RESIDENCY_PUBLIC_KEY")]
        public_key: PathBuf,
        /// The nonce sent with the request, hex.
        #[arg(long)]
        nonce: String,
    },
}

#[derive(Debug, Args)]
pub struct IdentityArgs {
    /// File holding the worker token (mode 0600; else VRAM_RESIDENCY_TOKEN_FILE or the
    /// VRAM_RESIDENCY_TOKEN environment variable).
    #[arg(long, env = "VRAM_RESIDENCY_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Print JSON (`key_id`, `public_key_pem`) instead of the PEM and the key id.
    #[arg(long)]
    json: bool,
}

fn parse_head(text: &str) -> Result<AuditHead, String> {
    text.parse()
        .map_err(|e: vram_residency::VramError| e.to_string())
}

/// Reads a PEM public key file. A key that cannot be read is a usage error (exit status 2): the
/// check itself was never made.
pub fn read_public_key(path: &Path) -> anyhow::Result<PublicKey> {
    let text = read_small(path, MAX_PUBLIC_KEY_BYTES, "a public key").map_err(usage_of)?;
    PublicKey::from_pem(&text)
        .with_context(|| format!("public key {}", path.display()))
        .map_err(usage_of)
}

pub fn identity(args: &IdentityArgs) -> anyhow::Result<ExitCode> {
    let public = load_token(args.token_file.as_deref())?.public_key();
    if args.json {
        println!(
            "{}",
            serde_json::json!({ "key_id": public.key_id(), "public_key_pem": public.to_pem() })
        );
    } else {
        print!("{}", public.to_pem());
        println!("key id: {}", public.key_id());
    }
    Ok(ExitCode::SUCCESS)
}

pub fn audit(command: &AuditCommand) -> anyhow::Result<ExitCode> {
    let AuditCommand::Verify {
        file,
        public_key,
        expect_head,
    } = command;
    let key = read_public_key(public_key)?;
    let opened =
        std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
    let report = verify_log(&mut BufReader::new(opened), &key, *expect_head)?;
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
        "OK: {}: {} record(s) verified (seq 1..={}), chain intact, signed by {}",
        file.display(),
        report.records,
        report.head.seq,
        key.key_id()
    );
    println!("head: {}", report.head);
    if let Some(expected) = expect_head {
        println!("expected head {expected}: present");
    }
    for skipped in &report.recovered {
        println!(
            "CUT: line {}: {} byte(s) were cut (a record torn by a crash, or a deliberate cut inside a \
             record); declared by the recovery record seq {}",
            skipped.line, skipped.bytes, skipped.declared_by
        );
    }
    if let Some(torn) = &report.torn_tail {
        println!(
            "TORN TAIL: line {}: {} byte(s) at offset {} after the last record were cut (a crash \
             mid-write, or a deliberate cut inside a record); they are not a record. Every record \
             before it verified. The worker declares them with a recovery record when it next starts.",
            torn.line, torn.bytes, torn.offset
        );
    }
    if report.ends_with_clean_shutdown() {
        println!("ends with a clean shutdown (service_stopped)");
    } else if expect_head.is_some() {
        println!(
            "does not end with a clean shutdown: the worker is running or crashed, or records after \
             the expected head were cut off the end"
        );
    } else {
        println!(
            "does not end with a clean shutdown: the worker is running or crashed, or records were cut \
             off the end (give --expect-head to detect that)"
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn attest(command: &AttestCommand) -> anyhow::Result<ExitCode> {
    let AttestCommand::Verify {
        file,
        public_key,
        nonce,
    } = command;
    let key = read_public_key(public_key)?;
    let nonce = parse_nonce_hex(nonce)
        .context("--nonce")
        .map_err(usage_of)?;
    let text = read_small(file, MAX_ENVELOPE_BYTES as u64, "an attestation")?;
    let verified = AttestationEnvelope::from_json(&text)
        .and_then(|envelope| envelope.verify_any(&key, &nonce));
    match verified {
        Ok(VerifiedAttestation::Shard(attestation)) => {
            print_shard_attestation(file, &key, &attestation);
        }
        Ok(VerifiedAttestation::Model(attestation)) => {
            print_model_attestation(file, &key, &attestation);
        }
        Err(error) => {
            println!("FAILED: {}: {error}", file.display());
            return Ok(ExitCode::FAILURE);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_backend(backend: BackendKind) {
    if backend == BackendKind::Sim {
        println!("  backend:      sim (simulated device memory in host RAM: NOT VRAM residency)");
    } else {
        println!("  backend:      {backend}");
    }
}

fn print_audit_head(head: Option<AuditHead>) {
    match head {
        Some(head) => println!(
            "  audit head:   {head} (check the log with `audit verify --expect-head {head}`)"
        ),
        None => println!("  audit head:   none (the worker keeps no durable audit log)"),
    }
}

fn print_model_attestation(file: &Path, key: &PublicKey, attestation: &ModelAttestation) {
    let model = &attestation.model;
    println!(
        "OK: {}: model attestation verified for this nonce, signed by {}",
        file.display(),
        key.key_id()
    );
    print_backend(model.backend);
    println!("  model:        {:?}", model.model_ref);
    println!(
        "  shards:       {} (all present, each exactly once, each the one the model seal names)",
        model.shards.len()
    );
    println!(
        "  model seal:   sealed {}",
        humantime::format_rfc3339_nanos(from_unix_nanos(model.sealed_at_ns))
    );
    for shard in &attestation.shards {
        let record = &shard.record;
        println!(
            "  shard {:>4}:   {} GPU {} {:?} uuid {} {} {} verified",
            record.shard_index,
            record.shard_id,
            record.gpu_device,
            shard.device_name,
            vram_residency::shard::format_uuid(&record.device_uuid),
            record.digest,
            vram_residency::ids::bytes(record.vram_bytes),
        );
    }
    if let Some(first) = attestation.shards.first() {
        println!("  driver:       {}", first.driver_version);
    }
    println!(
        "  attested_at:  {}",
        humantime::format_rfc3339_nanos(from_unix_nanos(attestation.attested_at_ns))
    );
    println!(
        "  verification: {} re-hashed in {} ns (GPUs in parallel), every digest the sealed one",
        vram_residency::ids::bytes(attestation.total_bytes()),
        attestation.verify_elapsed_ns
    );
    print_audit_head(attestation.audit_head);
}

fn print_shard_attestation(file: &Path, key: &PublicKey, attestation: &Attestation) {
    let record = &attestation.record;
    println!(
        "OK: {}: attestation verified for this nonce, signed by {}",
        file.display(),
        key.key_id()
    );
    print_backend(record.backend);
    println!("  shard:        {}", record.shard_id);
    if !record.model_ref.is_empty() {
        println!(
            "  model:        {} (shard {} of {})",
            record.model_ref,
            record.shard_index.saturating_add(1),
            record.total_shards
        );
    }
    println!("  digest:       {}", record.digest);
    println!("  vram_bytes:   {}", record.vram_bytes);
    println!(
        "  device:       GPU {} {:?} uuid {} driver {}",
        record.gpu_device,
        attestation.device_name,
        vram_residency::shard::format_uuid(&record.device_uuid),
        attestation.driver_version
    );
    match &attestation.unified_memory {
        Some(facts) => println!(
            "  unified mem:  managed allocations {}, reads pageable host memory directly (HMM/ATS) {}",
            if facts.managed_memory { "yes" } else { "no" },
            if facts.pageable_memory_access {
                "YES"
            } else {
                "no"
            }
        ),
        None => println!("  unified mem:  not reported (sim)"),
    }
    println!("  residency:    {:?}", attestation.residency);
    println!(
        "  attested_at:  {}",
        humantime::format_rfc3339_nanos(from_unix_nanos(attestation.attested_at_ns))
    );
    println!(
        "  verification: {} re-hashed to {} in {} ns",
        vram_residency::ids::bytes(attestation.verified_bytes),
        attestation.verified_digest,
        attestation.verify_elapsed_ns
    );
    print_audit_head(attestation.audit_head);
}

/// Reads a small text file (`what` it should be, for the message), refusing one over `max` bytes
/// before reading it.
fn read_small(path: &Path, max: u64, what: &str) -> anyhow::Result<String> {
    let len = std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    anyhow::ensure!(
        len <= max,
        "{} is larger than {max} bytes; not {what}",
        path.display()
    );
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}
