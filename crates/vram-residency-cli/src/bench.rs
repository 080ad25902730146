//! `vram-residency bench`: seal and verify throughput, with the seed crate's method and the
//! hardware's ceilings measured in the same run (DESIGN.md §5). Numbers live here and in notes,
//! never in tests.
//!
//! Per size: write a pseudo-random file (it is then in the page cache), digest it on the CPU (all
//! cores), seal it (`seal_file`: staging ring → VRAM → GPU digest; peak host RSS measured around
//! it), verify it several times, check GPU digest = CPU digest, free it, then run the seed's seal
//! (read the whole file, pageable copy, one-core SHA-256) and verify (full copy back, one-core
//! SHA-256). Once: pinned host→device and device→device copy bandwidth.

use std::io::Write as _;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context as _, bail};
use vram_residency::{
    BackendKind, ManagerConfig, NoAuditSink, SealOptions, VramManager, WorkerToken, digest,
};
use vram_residency_cuda::CudaBackend;
use vram_residency_cuda::bench::{
    Timed, device_to_device, pinned_h2d, seed_seal, seed_verify, verify_padded,
};

use crate::cli::BenchArgs;

/// One size's results.
#[derive(Debug, serde::Serialize)]
struct SizeRun {
    bytes: u64,
    cpu_digest_gbps: f64,
    /// Seals of the page-cache-hot file, each with its pages cached by *writing* it (the file is
    /// written again, and written back, before each).
    seal_runs: usize,
    /// Best seal.
    seal_seconds: f64,
    seal_gbps: f64,
    seal_gbps_median: f64,
    /// The first seal of this size in the process: it also allocates the staging readers' pinned
    /// buffers that later seals reuse (a `seal` process pays this on every run).
    seal_gbps_first: f64,
    /// One more seal, with the file's pages cached by *reading* it: dropping such pages costs the
    /// kernel more (docs/cuda-backend.md, "What bounds a verification and a seal").
    seal_gbps_read_cached: f64,
    rss_before_seal_bytes: Option<u64>,
    peak_rss_during_seal_bytes: Option<u64>,
    seal_process_peak_rss_bytes: Option<u64>,
    seal_process_seconds: Option<f64>,
    verify_runs: usize,
    verify_gbps_best: f64,
    verify_gbps_median: f64,
    /// Best verify of a buffer starting 8 bytes into its allocation (the kernel's 8-byte-load
    /// entry point, used for images padded so that their data section is aligned); `cuda` only.
    verify_8_byte_aligned_gbps_best: Option<f64>,
    gpu_digest: String,
    cpu_digest: String,
    gpu_digest_equals_cpu: bool,
    seed_seal_gbps: Option<f64>,
    seed_verify_gbps: Option<f64>,
    seal_vs_seed: Option<f64>,
    verify_vs_seed: Option<f64>,
}

pub fn run(args: &BenchArgs) -> anyhow::Result<ExitCode> {
    let kind = args.backend.backend;
    let cuda = match kind {
        BackendKind::Cuda => Some(Arc::new(crate::backends::open_cuda(args.backend.cuda())?)),
        BackendKind::Sim => None,
    };
    let backend: Arc<dyn vram_residency::Backend> = match &cuda {
        Some(cuda) => cuda.clone(),
        None => crate::backends::open(kind, args.backend.sim(), args.backend.cuda())?,
    };
    let driver = backend.driver_version()?;
    let mut random = [0u8; 32];
    getrandom::fill(&mut random).map_err(|e| anyhow::anyhow!("no OS randomness: {e}"))?;
    let token = WorkerToken::from_bytes(hex::encode(random).into_bytes())?;
    let manager = VramManager::with_config(
        &token,
        backend,
        ManagerConfig {
            max_model_bytes: u64::MAX,
            ..args.backend.manager_config()
        },
        Arc::new(NoAuditSink),
    )?;
    let device = manager
        .devices()
        .get(usize::try_from(args.gpu).unwrap_or(usize::MAX))
        .cloned()
        .with_context(|| format!("GPU {} does not exist", args.gpu))?;
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    eprintln!(
        "bench: backend {kind}, device {} ({}), sizes {:?}",
        device.index,
        device.name,
        args.sizes.iter().map(|s| human(*s)).collect::<Vec<_>>()
    );
    if let Some(file) = &args.file {
        eprintln!("bench: measuring the existing file {}", file.display());
    }

    // First use compiles the kernel (NVRTC) and loads it; measured once, outside the runs.
    let started = Instant::now();
    let warm = manager.seal_model(&vec![0x42u8; 1 << 20], args.gpu)?;
    manager.verify_sealed(&warm)?;
    manager.deallocate(warm)?;
    let warm_up_seconds = round(started.elapsed().as_secs_f64());

    let mut runs = Vec::new();
    let sizes = match &args.file {
        Some(file) => vec![
            std::fs::metadata(file)
                .with_context(|| format!("reading {}", file.display()))?
                .len(),
        ],
        None => args.sizes.clone(),
    };
    for &size in &sizes {
        runs.push(bench_size(&manager, cuda.as_deref(), args, size)?);
    }
    let ceilings = match &cuda {
        Some(cuda) => {
            let gpu = cuda.gpu(args.gpu)?;
            let bytes = args
                .sizes
                .iter()
                .copied()
                .max()
                .unwrap_or(1 << 30)
                .min(8 << 30);
            eprintln!("bench: hardware ceilings ({} copies)", human(bytes));
            let h2d = pinned_h2d(gpu, bytes)?;
            let d2d = device_to_device(gpu, bytes)?;
            Some(serde_json::json!({
                "bytes": bytes,
                "pinned_h2d_gbps": round(h2d.gb_per_s()),
                "d2d_copy_gbps": round(d2d.gb_per_s()),
                "d2d_note": "bytes copied per second; memory traffic is twice that",
            }))
        }
        None => None,
    };
    let model = match args.model_shard {
        Some(bytes) => Some(model_run(&manager, args, bytes)?),
        None => None,
    };
    let interference = match (&cuda, args.interference) {
        (Some(cuda), true) => Some(interference_run(cuda, args)?),
        (None, true) => {
            return Err(crate::cli::usage(
                "--interference needs the cuda backend (a GPU to share)",
            ));
        }
        _ => None,
    };
    let report = serde_json::json!({
        "backend": kind.name(),
        "device": device.name,
        "driver": driver,
        "staging_pinned_bytes": args.backend.cuda().staging.pinned_bytes(),
        "staging": format!("{:?}", args.backend.cuda().staging),
        "first_use_seconds": warm_up_seconds,
        "ceilings": ceilings,
        "runs": runs,
        "interference": interference,
        "model": model,
    });
    let all_equal = runs.iter().all(|r| r.gpu_digest_equals_cpu);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&runs, &report);
    }
    if let Some(path) = &args.json_out {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if !all_equal {
        eprintln!("bench: FAILED: a device digest differs from the CPU digest");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// The interference run (see `vram_residency_cuda::interference`) as JSON.
fn interference_run(cuda: &CudaBackend, args: &BenchArgs) -> anyhow::Result<serde_json::Value> {
    use vram_residency::Confinement;
    use vram_residency_cuda::interference::{Victim, interference, resident_buffers};

    let hasher = cuda.hasher(args.gpu)?;
    let resident = resident_buffers(hasher, args.resident)?;
    let victim = Victim::new(hasher, args.victim)?;
    eprintln!(
        "bench: interference: victim GEMV over {} ({} blocks per step), {} resident, budgets [{}], {} s each; MPS client: {}",
        human(victim.weight_bytes()),
        victim.blocks(),
        human(args.resident),
        args.interference_sms
            .iter()
            .map(vram_residency_cuda::interference::Plan::label)
            .collect::<Vec<_>>()
            .join(", "),
        args.interference_seconds,
        hasher.mps_client()?
    );
    let run = interference(
        hasher,
        &victim,
        &resident,
        &args.interference_sms,
        args.interference_seconds,
    )?;
    let rows: Vec<serde_json::Value> = run
        .scenarios
        .iter()
        .map(|s| {
            let (mechanism, sms) = match s.confinement {
                Some(Confinement::Unconfined) | None => ("whole_gpu", None),
                Some(confinement) => (confinement.name(), confinement.sms()),
            };
            eprintln!(
                "bench: interference: {:>36}: victim {:.3} ms/step ({:+.1} %), verified {:.1} GB/s, full pass {:.2} s",
                s.budget, s.victim_step_ms, s.victim_slowdown_pct, s.verified_gb_per_s, s.full_pass_seconds
            );
            serde_json::json!({
                "budget": s.budget,
                "mechanism_asked": s.plan.map(|p| p.budget.mechanism),
                "max_gb_per_s": s.plan.and_then(|p| p.max_gb_per_s),
                "mechanism": mechanism,
                "sms_granted": sms,
                "victim_step_ms": round(s.victim_step_ms),
                "victim_slowdown_pct": round(s.victim_slowdown_pct),
                "verified_gb_per_s": round(s.verified_gb_per_s),
                "full_pass_seconds": round(s.full_pass_seconds),
                "digests": s.digests,
            })
        })
        .collect();
    Ok(serde_json::json!({
        "victim": {
            "kernel": "bf16 GEMV, one warp per 8 KiB row, 8 rows per 256-thread block",
            "weight_bytes": victim.weight_bytes(),
            "blocks_per_step": victim.blocks(),
            "step_ms_alone_before": round(run.alone_before_ms),
            "step_ms_alone_after": round(run.alone_after_ms),
        },
        "resident_bytes": run.resident_bytes,
        "mps_client": hasher.mps_client()?,
        "lane_refusals": hasher.lane_refusals(),
        "scenarios": rows,
    }))
}

fn bench_size(
    manager: &VramManager,
    cuda: Option<&CudaBackend>,
    args: &BenchArgs,
    size: u64,
) -> anyhow::Result<SizeRun> {
    if size == 0 {
        return Err(crate::cli::usage(
            "--sizes: every size must be at least 1 byte",
        ));
    }
    let (path, _cleanup) = match &args.file {
        Some(file) => (file.clone(), None),
        None => {
            let path = args.dir.join(format!("vram-residency-bench-{size}.bin"));
            let cleanup = RemoveOnDrop(path.clone());
            eprintln!("bench: {}: writing the test file", human(size));
            write_random_file(&path, size)?;
            (path, Some(cleanup))
        }
    };

    // The CPU digest runs in a child process (`vram-residency digest`), so its buffers do not count
    // in this process's RSS during the seal.
    let started = Instant::now();
    let cpu_digest = cpu_digest_in_child(&path)?;
    let cpu_time = started.elapsed().as_secs_f64();

    let rss_before = status_bytes("VmRSS:");
    let rss_reset = reset_peak_rss();
    // The bench file is random bytes: sealed as raw, explicitly.
    let raw = SealOptions {
        format: vram_residency::format::FormatChoice::Raw,
        ..SealOptions::default()
    };
    let mut seal_times = Vec::new();
    let mut shard = None;
    let mut peak_rss = None;
    for run in 0..args.seal_runs.max(1) {
        if let Some(previous) = shard.take() {
            manager.deallocate(previous)?;
            // The seal dropped the file's pages; write the same bytes again so every seal starts
            // page-cache hot, its pages cached by writing as for the first.
            write_random_file(&path, size)?;
        }
        eprintln!(
            "bench: {}: seal {}/{} (page cache hot: pages written)",
            human(size),
            run.saturating_add(1),
            args.seal_runs.max(1)
        );
        let started = Instant::now();
        shard = Some(manager.seal_file(&path, args.gpu, &raw)?);
        seal_times.push(started.elapsed().as_secs_f64());
        if run == 0 && rss_reset {
            // The first seal only: writing the file again for the next ones, and reading it for
            // the last, use buffers of their own.
            peak_rss = status_bytes("VmHWM:");
        }
    }
    if let Some(previous) = shard.take() {
        manager.deallocate(previous)?;
    }
    warm_page_cache(&path)?;
    eprintln!("bench: {}: seal (page cache hot: pages read)", human(size));
    let started = Instant::now();
    let shard = manager.seal_file(&path, args.gpu, &raw)?;
    let seal_read_cached = started.elapsed().as_secs_f64();
    let seal_first = seal_times.first().copied().unwrap_or(0.0);
    seal_times.sort_by(f64::total_cmp);
    let seal_time = seal_times.first().copied().unwrap_or(0.0);
    let seal_median = seal_times.get(seal_times.len() / 2).copied().unwrap_or(0.0);

    eprintln!("bench: {}: verify x{}", human(size), args.verify_runs);
    let mut verify_times = Vec::new();
    for _ in 0..args.verify_runs.max(1) {
        let started = Instant::now();
        manager.verify_sealed(&shard)?;
        verify_times.push(started.elapsed().as_secs_f64());
    }
    verify_times.sort_by(f64::total_cmp);
    let gpu_digest = shard.record.digest;
    manager.deallocate(shard)?;

    let mut verify_a8 = None;
    if let Some(cuda) = cuda {
        eprintln!(
            "bench: {}: verify x{} of an 8-byte-aligned buffer",
            human(size),
            args.verify_runs
        );
        verify_a8 =
            Some(verify_padded(cuda.hasher(args.gpu)?, size, 8, args.verify_runs)?.gb_per_s());
    }
    let (mut seed_seal_gbps, mut seed_verify_gbps) = (None, None);
    if let (Some(cuda), false) = (cuda, args.skip_seed) {
        let gpu = cuda.gpu(args.gpu)?;
        eprintln!(
            "bench: {}: seed method, verify (full copy back + one-core SHA-256)",
            human(size)
        );
        let (timed, _) = seed_verify(gpu, size)?;
        seed_verify_gbps = Some(timed.gb_per_s());
        // The seal dropped the file's pages; warm them again so the seed reads from the page cache too.
        digest::digest_file(&path, &|_| {})?;
        eprintln!(
            "bench: {}: seed method, seal (read all, pageable copy, one-core SHA-256)",
            human(size)
        );
        let (timed, _) = seed_seal(gpu, &path)?;
        seed_seal_gbps = Some(timed.gb_per_s());
    }
    // Peak RSS of a whole `vram-residency seal` process sealing the same file (page cache hot
    // again after the seed's full read, or after the CPU digest when the seed is skipped).
    let (mut child_rss, mut child_seconds) = (None, None);
    if cuda.is_some() {
        if args.skip_seed {
            cpu_digest_in_child(&path)?;
        }
        eprintln!(
            "bench: {}: peak RSS of a separate `seal` process",
            human(size)
        );
        let (seconds, rss) = seal_in_child(args, &path)?;
        child_seconds = Some(round(seconds));
        child_rss = rss;
    }
    let seal_gbps = gbps(size, seal_time);
    let best = verify_times.first().copied().unwrap_or(0.0);
    let median = verify_times
        .get(verify_times.len() / 2)
        .copied()
        .unwrap_or(0.0);
    let verify_best = gbps(size, best);
    Ok(SizeRun {
        bytes: size,
        cpu_digest_gbps: round(gbps(size, cpu_time)),
        seal_runs: seal_times.len(),
        seal_seconds: round(seal_time),
        seal_gbps: round(seal_gbps),
        seal_gbps_median: round(gbps(size, seal_median)),
        seal_gbps_first: round(gbps(size, seal_first)),
        seal_gbps_read_cached: round(gbps(size, seal_read_cached)),
        rss_before_seal_bytes: rss_before,
        peak_rss_during_seal_bytes: peak_rss,
        seal_process_peak_rss_bytes: child_rss,
        seal_process_seconds: child_seconds,
        verify_runs: verify_times.len(),
        verify_gbps_best: round(verify_best),
        verify_gbps_median: round(gbps(size, median)),
        verify_8_byte_aligned_gbps_best: verify_a8.map(round),
        gpu_digest: gpu_digest.to_string(),
        gpu_digest_equals_cpu: gpu_digest.to_string() == cpu_digest,
        cpu_digest,
        seed_seal_gbps: seed_seal_gbps.map(round),
        seed_verify_gbps: seed_verify_gbps.map(round),
        seal_vs_seed: seed_seal_gbps.map(|seed| round(ratio(seal_gbps, seed))),
        verify_vs_seed: seed_verify_gbps.map(|seed| round(ratio(verify_best, seed))),
    })
}

fn print_table(runs: &[SizeRun], report: &serde_json::Value) {
    println!(
        "backend: {}   device: {}",
        report["backend"].as_str().unwrap_or("?"),
        report["device"].as_str().unwrap_or("?")
    );
    if let Some(ceilings) = report.get("ceilings").filter(|c| !c.is_null()) {
        println!(
            "ceilings: pinned H2D {} GB/s, D2D copy {} GB/s",
            ceilings["pinned_h2d_gbps"], ceilings["d2d_copy_gbps"]
        );
    }
    println!(
        "{:>10} {:>10} {:>10} {:>12} {:>12} {:>10} {:>10} {:>9} {:>12} {:>10}",
        "size",
        "seal GB/s",
        "seed seal",
        "verify GB/s",
        "seed verify",
        "seal x",
        "verify x",
        "CPU GB/s",
        "seal RSS MiB",
        "digest"
    );
    let opt = |v: Option<f64>| v.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.2}"));
    for run in runs {
        println!(
            "{:>10} {:>10.2} {:>10} {:>12.1} {:>12} {:>10} {:>10} {:>9.2} {:>12} {:>10}",
            human(run.bytes),
            run.seal_gbps,
            opt(run.seed_seal_gbps),
            run.verify_gbps_best,
            opt(run.seed_verify_gbps),
            opt(run.seal_vs_seed),
            opt(run.verify_vs_seed),
            run.cpu_digest_gbps,
            run.seal_process_peak_rss_bytes
                .or(run.peak_rss_during_seal_bytes)
                .map_or_else(|| "n/a".to_owned(), |b| (b >> 20).to_string()),
            if run.gpu_digest_equals_cpu {
                "= CPU"
            } else {
                "MISMATCH"
            }
        );
    }
}

/// Writes `size` pseudo-random bytes (splitmix64 per 8 MiB piece), on all cores.
fn write_random_file(path: &Path, size: u64) -> anyhow::Result<()> {
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    file.set_len(size)?;
    for_each_piece(size, |piece, offset, buffer| {
        let mut state = piece.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ size;
        // A short last piece ends with the first bytes of its last word.
        for word in buffer.chunks_mut(8) {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            for (byte, value) in word.iter_mut().zip((z ^ (z >> 31)).to_le_bytes()) {
                *byte = value;
            }
        }
        file.write_all_at(buffer, offset)?;
        Ok(())
    })?;
    // Written back, so the seal reads a clean, page-cache-hot file (as a model that has been on the
    // host for a while is), and dropping its pages afterwards does not start writeback.
    file.sync_all()?;
    std::io::stderr().flush().ok();
    Ok(())
}

/// A model of one `shard_bytes` shard per GPU: each GPU's shard verified alone, then the whole model
/// with [`VramManager::verify_model`] (every GPU at once). Reports per-GPU and aggregate GB/s and the
/// aggregate over the sum of the single-GPU figures of the same run (1.0: perfect scaling).
fn model_run(
    manager: &VramManager,
    args: &BenchArgs,
    shard_bytes: u64,
) -> anyhow::Result<serde_json::Value> {
    let gpus = u32::try_from(manager.devices().len())?;
    let path = args
        .dir
        .join(format!("vram-residency-bench-model-{shard_bytes}.bin"));
    let _cleanup = RemoveOnDrop(path.clone());
    eprintln!(
        "bench: model: one {} shard on each of {gpus} GPU(s)",
        human(shard_bytes)
    );
    write_random_file(&path, shard_bytes)?;
    let mut shards = Vec::new();
    for gpu in 0..gpus {
        let opts = SealOptions {
            format: vram_residency::format::FormatChoice::Raw,
            model_ref: "bench-model".to_owned(),
            shard_index: gpu,
            total_shards: gpus,
            ..SealOptions::default()
        };
        // The previous seal dropped the file's pages.
        warm_page_cache(&path)?;
        shards.push(manager.seal_file(&path, gpu, &opts)?);
    }
    let refs: Vec<_> = shards.iter().collect();
    let model = manager.seal_model_set(&refs)?;
    let runs = args.verify_runs.max(1);
    let mut per_gpu = Vec::new();
    for shard in &refs {
        let mut best = f64::INFINITY;
        for _ in 0..runs {
            let started = Instant::now();
            manager.verify_sealed(shard)?;
            best = best.min(started.elapsed().as_secs_f64());
        }
        per_gpu.push(round(gbps(shard_bytes, best)));
    }
    let mut best = f64::INFINITY;
    let mut gpu_seconds = Vec::new();
    for _ in 0..runs {
        let report = manager.verify_model(&model, &refs)?;
        let seconds = report.elapsed.as_secs_f64();
        if seconds < best {
            best = seconds;
            gpu_seconds = report
                .per_gpu
                .iter()
                .map(|g| g.elapsed.as_secs_f64())
                .collect();
        }
    }
    let total = shard_bytes.saturating_mul(u64::from(gpus));
    let aggregate = gbps(total, best);
    let sum_single: f64 = per_gpu.iter().sum();
    eprintln!(
        "bench: model: {gpus} GPU(s), alone {per_gpu:?} GB/s, all at once {aggregate:.1} GB/s ({:.2} of the sum)",
        ratio(aggregate, sum_single)
    );
    drop(refs);
    for shard in shards {
        manager.deallocate(shard)?;
    }
    Ok(serde_json::json!({
        "gpus": gpus,
        "shard_bytes": shard_bytes,
        "verify_runs": runs,
        "per_gpu_alone_gbps_best": per_gpu,
        "model_verify_seconds_best": best,
        "model_verify_per_gpu_seconds": gpu_seconds,
        "aggregate_gbps_best": round(aggregate),
        "aggregate_over_sum_of_alone": round(ratio(aggregate, sum_single)),
    }))
}

/// Reads `path` whole with several threads (and throws the bytes away), so that its pages are in the
/// page cache again.
fn warm_page_cache(path: &Path) -> anyhow::Result<()> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let size = file.metadata()?.len();
    for_each_piece(size, |_, offset, buffer| {
        Ok(file.read_exact_at(buffer, offset)?)
    })
}

/// Runs `work(piece, offset, buffer)` for every 8 MiB piece of `size` bytes (the last one shorter),
/// on one thread per core, each with its own buffer of the piece's length.
fn for_each_piece(
    size: u64,
    work: impl Fn(u64, u64, &mut [u8]) -> anyhow::Result<()> + Sync,
) -> anyhow::Result<()> {
    const PIECE: u64 = 8 << 20;
    let pieces = size.div_ceil(PIECE);
    let next = std::sync::atomic::AtomicU64::new(0);
    let threads = std::thread::available_parallelism().map_or(4, std::num::NonZero::get);
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| -> anyhow::Result<()> {
                    let mut buffer = vec![0u8; usize::try_from(PIECE)?];
                    loop {
                        let piece = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if piece >= pieces {
                            return Ok(());
                        }
                        let offset = piece.saturating_mul(PIECE);
                        let n = usize::try_from(PIECE.min(size.saturating_sub(offset)))?;
                        work(piece, offset, buffer.get_mut(..n).context("piece size")?)?;
                    }
                })
            })
            .collect();
        for worker in workers {
            worker
                .join()
                .map_err(|_| anyhow::anyhow!("a worker thread panicked"))??;
        }
        Ok(())
    })
}

/// `vram-residency digest PATH` in a child process; returns the digest it printed.
fn cpu_digest_in_child(path: &Path) -> anyhow::Result<String> {
    let out = std::process::Command::new(std::env::current_exe()?)
        .arg("digest")
        .arg(path)
        .output()
        .context("running `vram-residency digest`")?;
    if !out.status.success() {
        bail!(
            "`vram-residency digest` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .map(str::to_owned)
        .context("`vram-residency digest` printed nothing")
}

/// Runs `vram-residency seal PATH --backend cuda` (same GPU and staging flags, a throwaway token)
/// and samples the child's VmHWM every few milliseconds until it exits. Returns its wall time and
/// the highest VmHWM seen (VmHWM only grows, so the last sample is the peak up to then).
fn seal_in_child(args: &BenchArgs, path: &Path) -> anyhow::Result<(f64, Option<u64>)> {
    let token_path = args
        .dir
        .join(format!("vram-residency-bench-token-{}", std::process::id()));
    let _cleanup = RemoveOnDrop(token_path.clone());
    let mut random = [0u8; 32];
    getrandom::fill(&mut random).map_err(|e| anyhow::anyhow!("no OS randomness: {e}"))?;
    // Owner-only, as the worker token file must be (`seal` refuses anything else).
    let _ = std::fs::remove_file(&token_path);
    {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&token_path)?
            .write_all(hex::encode(random).as_bytes())?;
    }
    let staging = args.backend.cuda().staging;
    let mut command = std::process::Command::new(std::env::current_exe()?);
    command
        .arg("seal")
        .arg(path)
        .args([
            "--backend",
            "cuda",
            "--format",
            "raw",
            "--json",
            "--max-model-bytes",
            &u64::MAX.to_string(),
        ])
        .args(["--gpu", &args.gpu.to_string()])
        .args(["--staging-readers", &staging.readers.to_string()])
        .args(["--staging-buffer", &staging.slot_bytes.to_string()])
        .arg("--token-file")
        .arg(&token_path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    if staging.direct_io {
        command.arg("--direct-io");
    }
    if !staging.drop_page_cache {
        command.arg("--keep-page-cache");
    }
    let started = Instant::now();
    let mut child = command.spawn().context("starting `vram-residency seal`")?;
    let status_path = format!("/proc/{}/status", child.id());
    let mut peak: Option<u64> = None;
    let status = loop {
        if let Ok(status) = std::fs::read_to_string(&status_path)
            && let Some(kib) = status
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        {
            peak = peak.max(kib.checked_mul(1024));
        }
        if let Some(status) = child.try_wait()? {
            break status;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    let seconds = started.elapsed().as_secs_f64();
    if !status.success() {
        let mut stderr = String::new();
        if let Some(mut pipe) = child.stderr.take() {
            std::io::Read::read_to_string(&mut pipe, &mut stderr).ok();
        }
        bail!("`vram-residency seal` failed: {stderr}");
    }
    Ok((seconds, peak))
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Resets the kernel's peak-RSS counter (VmHWM) of this process; false where that is not possible.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// A `/proc/self/status` memory line (`VmRSS:`, `VmHWM:`), in bytes.
fn status_bytes(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Throughput in GB/s (10^9 bytes per second); 0 for no time.
pub fn gbps(bytes: u64, seconds: f64) -> f64 {
    Timed { bytes, seconds }.gb_per_s()
}

fn ratio(ours: f64, seed: f64) -> f64 {
    if seed > 0.0 { ours / seed } else { 0.0 }
}

fn round(value: f64) -> f64 {
    (value * 100.0).round() / 100.0
}

/// Bytes in binary units, e.g. `16.0 GiB`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0usize;
    while value >= 1024.0 && unit < UNITS.len().saturating_sub(1) {
        value /= 1024.0;
        unit = unit.saturating_add(1);
    }
    format!("{value:.1} {}", UNITS.get(unit).copied().unwrap_or("B"))
}
