//! `vram-residency demo`: the whole story in one run, as a self-check.
//!
//! Seal a synthetic model, verify it, lend it to a closure, flip one bit of its device memory from
//! outside the manager, and show that verification names the damaged range and stops the worker.
//! Exits non-zero if any step does not behave as the design promises.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::Context as _;
use vram_residency::audit::FailureKind;
use vram_residency::digest::LEVEL1_SPAN;
use vram_residency::{
    AuditEvent, BackendKind, ManagerConfig, MemoryAuditSink, SealOptions, ShardId, SimBackend,
    SimConfig, VramError, VramManager, WorkerState, WorkerToken,
};

use crate::backends;
use crate::bench::{gbps, human};
use crate::cli::DemoArgs;
use crate::progress;

/// The simulated device of the demo (host memory): 4 GiB, as `serve --backend sim` by default.
const SIM_DEMO_VRAM: u64 = 4 << 30;

/// With `--json`, the narrative goes to stderr and stdout carries one JSON document.
static NARRATIVE_TO_STDERR: AtomicBool = AtomicBool::new(false);

/// One line of the narrative.
fn say(text: &str) {
    if NARRATIVE_TO_STDERR.load(Ordering::Relaxed) {
        eprintln!("{text}");
    } else {
        println!("{text}");
    }
}

pub fn run(args: &DemoArgs) -> anyhow::Result<ExitCode> {
    NARRATIVE_TO_STDERR.store(args.json, Ordering::Relaxed);
    let (kind, backend, sim) = choose_backend(args)?;
    banner(kind);

    let size = usize::try_from(args.size)
        .map_err(|_| crate::cli::usage("--size does not fit in this machine's address space"))?;
    if size == 0 {
        return Err(crate::cli::usage("--size must be at least 1 byte"));
    }
    // An ephemeral token: the demo's keys live and die with this process.
    let mut random = [0u8; 32];
    getrandom::fill(&mut random).map_err(|e| anyhow::anyhow!("no OS randomness: {e}"))?;
    let token = WorkerToken::from_bytes(hex_encode(&random).into_bytes())?;

    let sink = Arc::new(MemoryAuditSink::default());
    let manager =
        VramManager::with_config(&token, backend, ManagerConfig::default(), sink.clone())?;
    // Checked before anything is built or allocated: the model must fit the device.
    let available = manager.capacity(0)?.available;
    if args.size > available {
        return Err(crate::cli::usage(format!(
            "--size {} does not fit: GPU 0 of this backend has {} available{}",
            human(args.size),
            human(available),
            if kind == BackendKind::Sim {
                " (the sim backend simulates a 4 GiB device in host memory)"
            } else {
                ""
            }
        )));
    }

    step(
        1,
        &format!(
            "building a synthetic {} safetensors model (8 F32 tensors)",
            human(args.size)
        ),
    );
    let model = synthetic_model(size)?;
    let data_offset = model.data_offset;
    let model = model.bytes;

    step(
        2,
        "sealing it: upload, digest measured in device memory, HMAC seal",
    );
    let bar = progress::bytes_bar(args.size, "seal");
    let opts = SealOptions {
        shard_id: Some(ShardId::new("demo-shard-0")?),
        model_ref: "demo/synthetic".to_owned(),
        progress: Some(progress::callback(&bar)),
        ..SealOptions::default()
    };
    let started = Instant::now();
    let shard = manager.seal_model_with(&model, 0, &opts);
    bar.finish_and_clear();
    let shard = shard?;
    drop(model);
    let view = shard.view();
    detail(&format!(
        "sealed {} in {:.3} s",
        shard.record.shard_id,
        started.elapsed().as_secs_f64()
    ));
    detail(&format!("backend: {}", view.backend));
    detail(&format!("digest: {}", view.digest));
    detail(&format!("seal_tag: {}", view.seal_tag));
    if let (Some(format), Some(count)) = (view.format, view.tensor_count) {
        detail(&format!(
            "format: {} with {count} tensors; tensor table sealed too",
            crate::inspect::format_name(format)
        ));
    }
    detail(&format!(
        "used {} of {} on device 0",
        human(manager.used_vram(0)?),
        human(manager.total_vram(0)?)
    ));

    step(
        3,
        "verifying: constant-time HMAC check, digest re-measured in device memory",
    );
    let report = manager.verify_sealed(&shard)?;
    detail(&format!(
        "OK in {:.3} s ({:.2} GB/s)",
        report.elapsed.as_secs_f64(),
        gbps(report.vram_bytes, report.elapsed.as_secs_f64())
    ));

    step(
        4,
        "executing: the weights are lent to a closure only after verification",
    );
    let first_bytes = manager.execute(&shard, |weights| {
        weights.host_bytes().map(|b| {
            b.iter()
                .take(8)
                .map(|x| format!("{x:02x}"))
                .collect::<String>()
        })
    })?;
    detail(&format!(
        "closure saw {} bytes; first 8: {}",
        shard.record.vram_bytes,
        first_bytes.unwrap_or_else(|| "(device memory)".to_owned())
    ));

    step(
        5,
        "attesting: a fresh verification for a verifier's nonce, signed with the worker's Ed25519 key \
         (DSSE + in-toto), checked with the public key alone",
    );
    let mut nonce = [0u8; 32];
    getrandom::fill(&mut nonce).context("no randomness for a nonce")?;
    let envelope = manager.attest(&shard, &nonce)?;
    let public = manager.public_key().clone();
    let stated = envelope.verify(&public, &nonce)?;
    detail(&format!(
        "verified with public key {} only: shard {} is {:?} with digest {}",
        public.key_id(),
        stated.record.shard_id,
        stated.residency,
        stated.verified_digest
    ));
    let replay = envelope.verify(&public, &[0u8; 32]);
    detail(&format!(
        "the same attestation for another nonce: {}",
        match &replay {
            Ok(_) => "ACCEPTED (UNEXPECTED)".to_owned(),
            Err(error) => format!("refused ({error})"),
        }
    ));

    let mut ok = replay.is_err();
    let mut bit = None;
    if let Some(sim) = &sim {
        let (flipped, behaved) = corruption_story(&manager, sim, &shard, data_offset)?;
        bit = Some(flipped);
        ok &= behaved;
    } else {
        step(
            6,
            "corrupting VRAM from outside the manager: not in this binary (fault injection is \
             built only into test binaries; `scripts/gpu-test` runs the 1000-flip campaign on the GPU)",
        );
    }

    step(
        9,
        "audit trail (also emitted as tracing events; -v shows them)",
    );
    let entries = sink.entries();
    for entry in &entries {
        detail(&format!(
            "[{:?}] {} backend={}",
            entry.severity,
            entry.event.name(),
            entry.backend
        ));
    }
    let corruption_audited = sim.is_none()
        || entries.iter().any(|e| {
            matches!(
                e.event,
                AuditEvent::SealVerificationFailed {
                    kind: FailureKind::Corruption,
                    ..
                }
            )
        });
    if !corruption_audited {
        detail("UNEXPECTED: no critical audit record of the corruption");
        ok = false;
    }
    manager.deallocate(shard)?;
    detail(&format!(
        "deallocated; used now {}",
        human(manager.used_vram(0)?)
    ));

    if args.json {
        let summary = serde_json::json!({
            "backend": kind.name(),
            "model_bytes": args.size,
            "digest": view.digest.to_string(),
            "verify_gbps": gbps(report.vram_bytes, report.elapsed.as_secs_f64()),
            "attestation": {
                "key_id": public.key_id(),
                "verified_with_public_key": true,
                "replay_for_another_nonce_refused": replay.is_err(),
            },
            "flipped_bit": bit,
            "corruption_step": if sim.is_some() { "ran" } else { "skipped: no fault injection in release binaries" },
            "all_steps_ok": ok,
            "audit_events": entries.iter().map(|e| e.event.name()).collect::<Vec<_>>(),
        });
        println!("{summary}");
    }
    say("");
    if ok {
        say(&format!(
            "demo: all steps behaved as designed (backend: {kind})"
        ));
        Ok(ExitCode::SUCCESS)
    } else {
        say(&format!(
            "demo: FAILED, see UNEXPECTED lines above (backend: {kind})"
        ));
        Ok(ExitCode::FAILURE)
    }
}

/// Steps 6-8 on `sim`: flip a bit from outside the manager, verify, show the worker stopped.
/// Returns the flipped bit and whether everything behaved as designed.
fn corruption_story(
    manager: &VramManager,
    sim: &SimBackend,
    shard: &vram_residency::SealedShard,
    data_offset: u64,
) -> anyhow::Result<(u64, bool)> {
    let mut ok = true;
    let model_len = shard.record.vram_bytes;
    let bit = data_offset.saturating_mul(8).saturating_add(random_below(
        model_len.saturating_sub(data_offset).saturating_mul(8),
    )?);
    let byte = bit / 8;
    let expected_tensor = shard.tensor_table().and_then(|t| {
        t.tensors_in_range(byte, byte.saturating_add(1))
            .first()
            .map(|t| t.name.clone())
    });
    step(
        6,
        &format!(
            "flipping bit {} of byte {byte:#x} in the shard's memory, from outside the manager",
            bit % 8
        ),
    );
    sim.flip_bit(shard.allocation_id(), bit)?;

    step(7, "verifying again");
    match manager.verify_sealed(shard) {
        Err(VramError::Corruption {
            damaged, tensors, ..
        }) => {
            detail("DETECTED: corruption (the seal is authentic, the bytes changed)");
            for range in &damaged {
                detail(&format!("damaged range: bytes {range}"));
            }
            detail(&format!("damaged tensor(s): {}", tensors.join(", ")));
            if let Some(name) = &expected_tensor
                && !tensors.contains(name)
            {
                detail(&format!(
                    "UNEXPECTED: the flipped byte lies in {name}, which is not named"
                ));
                ok = false;
            }
            let named = damaged.iter().any(|r| {
                r.start <= byte
                    && byte < r.end
                    && r.end.saturating_sub(r.start) <= LEVEL1_SPAN as u64
            });
            if !named || damaged.len() != 1 {
                detail(
                    "UNEXPECTED: the damaged range does not name exactly the flipped byte's 512 KiB unit",
                );
                ok = false;
            }
        }
        Err(other) => {
            detail(&format!("UNEXPECTED error: {other}"));
            ok = false;
        }
        Ok(_) => {
            detail("UNEXPECTED: verification passed on corrupted memory");
            ok = false;
        }
    }

    step(
        8,
        "the worker is now stopped; new seals and executions are refused",
    );
    match manager.state() {
        WorkerState::Stopped { reason } => detail(&format!("state: stopped ({reason})")),
        WorkerState::Running => {
            detail("UNEXPECTED: state is still running");
            ok = false;
        }
    }
    match manager.seal_model(&[1, 2, 3], 0) {
        Err(VramError::WorkerStopped { .. }) => detail("seal refused: worker stopped"),
        other => {
            detail(&format!("UNEXPECTED: seal after stop gave {other:?}"));
            ok = false;
        }
    }
    match manager.execute(shard, |_| ()) {
        Err(VramError::WorkerStopped { .. }) => detail("execute refused: worker stopped"),
        other => {
            detail(&format!("UNEXPECTED: execute after stop gave {other:?}"));
            ok = false;
        }
    }

    Ok((bit, ok))
}

/// `--backend` if given; otherwise CUDA when a driver and a GPU are present, else `sim` (said so).
fn choose_backend(
    args: &DemoArgs,
) -> anyhow::Result<(
    BackendKind,
    Arc<dyn vram_residency::Backend>,
    Option<SimBackend>,
)> {
    let sim = || {
        let sim = SimBackend::new(SimConfig {
            devices: 1,
            bytes_per_device: SIM_DEMO_VRAM,
        });
        let backend: Arc<dyn vram_residency::Backend> = Arc::new(sim.clone());
        (BackendKind::Sim, backend, Some(sim))
    };
    match args.backend {
        Some(BackendKind::Sim) => Ok(sim()),
        Some(BackendKind::Cuda) => Ok((
            BackendKind::Cuda,
            Arc::new(backends::open_cuda(args.cuda_config())?),
            None,
        )),
        None => match backends::open_cuda(args.cuda_config()) {
            Ok(cuda) => Ok((BackendKind::Cuda, Arc::new(cuda), None)),
            Err(error) => {
                eprintln!("note: no usable CUDA GPU ({error}); using the sim backend.");
                Ok(sim())
            }
        },
    }
}

fn banner(kind: BackendKind) {
    say(&format!("vram-residency demo, backend: {kind}"));
    if kind == BackendKind::Sim {
        say("  *** sim backend: simulated device memory in host RAM. This shows the logic, it is");
        say("  *** NOT VRAM residency. Every record below says backend: sim. ***");
    }
    say("");
}

fn step(n: u32, text: &str) {
    say(&format!("[{n}] {text}"));
}

fn detail(text: &str) {
    say(&format!("    {text}"));
}

fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn random_below(n: u64) -> anyhow::Result<u64> {
    let mut raw = [0u8; 8];
    getrandom::fill(&mut raw).map_err(|e| anyhow::anyhow!("no OS randomness: {e}"))?;
    Ok(u64::from_le_bytes(raw).checked_rem(n).unwrap_or(0))
}

/// A synthetic safetensors model of about `len` bytes.
struct SyntheticModel {
    bytes: Vec<u8>,
    data_offset: u64,
}

/// Eight F32 tensors filling about `len` bytes, with deterministic pseudo-random weights (xorshift64*),
/// so repeated demos seal the same digest.
fn synthetic_model(len: usize) -> anyhow::Result<SyntheticModel> {
    const TENSORS: usize = 8;
    let per_tensor = (len / TENSORS / 4).max(1);
    let mut header = serde_json::Map::new();
    for i in 0..TENSORS {
        let begin = i.saturating_mul(per_tensor).saturating_mul(4);
        let end = begin.saturating_add(per_tensor.saturating_mul(4));
        header.insert(
            format!("model.layers.{i}.mlp.weight"),
            serde_json::json!({"dtype": "F32", "shape": [per_tensor], "data_offsets": [begin, end]}),
        );
    }
    header.insert(
        "__metadata__".to_owned(),
        serde_json::json!({"format": "pt", "source": "vram-residency demo"}),
    );
    let mut json = serde_json::to_vec(&serde_json::Value::Object(header))?;
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let data_len = TENSORS.saturating_mul(per_tensor).saturating_mul(4);
    let mut bytes = Vec::new();
    bytes
        .try_reserve_exact(json.len().saturating_add(8).saturating_add(data_len))
        .map_err(|_| {
            anyhow::anyhow!(
                "cannot hold a {} model in host memory to build it; choose a smaller --size",
                human(data_len as u64)
            )
        })?;
    bytes.extend_from_slice(&(json.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&json);
    let data_offset = bytes.len() as u64;
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let total = bytes.len().saturating_add(data_len);
    while bytes.len() < total {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        let word = state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
        let take = total.saturating_sub(bytes.len()).min(word.len());
        bytes.extend_from_slice(word.get(..take).unwrap_or_default());
    }
    Ok(SyntheticModel { bytes, data_offset })
}
