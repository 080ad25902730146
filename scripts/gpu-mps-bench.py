#!/usr/bin/env python3
"""What background verification in one process costs a model serving in ANOTHER process, on a GPU
host, with and without the MPS daemon. In one run:

1. without MPS: a torch workload (a decode-like bf16 GEMV, `torch.mv` over `--victim-gib` of
   weights) in one process alone, then beside `Worker.verify_in_background` of a sealed
   `--gib` shard in a second process at each `--budgets` entry, then beside back-to-back
   `Shard.verify()` there (what `serve`'s API verify does), then alone again;
2. the same with an MPS daemon started for the two processes (`nvidia-cuda-mps-control -d` with a
   private pipe directory, quit at the end), where `--mps-budgets` are measured (e.g. `8:mps` for an
   MPS context of 8 SMs, `8` for the first mechanism that works).

Each budget is `SMS[:MECHANISM][@GBPS]` as for `vram-residency bench --interference-sms`. The
victim's step is the median of its 20-step batches (CUDA events) that lie wholly inside each
scenario's window. Prints one JSON object; progress on stderr. Usage (needs torch and the
vram_residency wheel; the shard is a sparse file of zeros, what it holds does not change a
digest's cost):

    python3 scripts/gpu-mps-bench.py --token FILE [--gib 16] [--victim-gib 8] [--seconds 4] \\
        [--budgets 8] [--mps-budgets 8,8:mps,16:mps]

The same script runs the two worker processes (`--role victim|verifier`, internal).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def log(message: str) -> None:
    print(f"gpu-mps-bench: {message}", file=sys.stderr, flush=True)


def parse_budget(text: str) -> dict:
    """`SMS[:MECHANISM][@GBPS]` -> {"sms", "mechanism", "max_gbps"}."""
    budget, _, rate = text.partition("@")
    sms, _, mechanism = budget.partition(":")
    return {"sms": int(sms), "mechanism": mechanism or "auto",
            "max_gbps": float(rate) if rate else None, "label": text}


# ---- the two worker processes ------------------------------------------------------------------


def victim_main(victim_gib: int, device: str) -> int:
    """Runs torch.mv in batches of 20 until stdin closes; prints every batch's (start, end,
    ms per step) as JSON at the end. Says "ready" once warmed up. (`device` "cpu" only for a dry
    run of this script where there is no GPU: then the steps are timed on the host.)"""
    import torch

    cols = 8192
    rows = (victim_gib << 30) // (2 * cols)
    weights = torch.randn(rows, cols, device=device, dtype=torch.bfloat16)
    x = torch.randn(cols, device=device, dtype=torch.bfloat16)
    y = torch.empty(rows, device=device, dtype=torch.bfloat16)
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    cuda = device.startswith("cuda")
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    batches = []
    warm_until = time.monotonic() + 1.0
    ready = False
    while not stop.is_set():
        began = time.monotonic()
        if cuda:
            start.record()
        for _ in range(20):
            torch.mv(weights, x, out=y)
        if cuda:
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end) / 20
        else:
            ms = (time.monotonic() - began) * 1e3 / 20
        batches.append((began, time.monotonic(), ms))
        if not ready and time.monotonic() > warm_until:
            print("ready", flush=True)
            ready = True
    print(json.dumps({"rows": rows, "cols": cols, "batches": batches}), flush=True)
    return 0


def verifier_main(token: Path, shard_path: Path, backend: str) -> int:
    """Seals the shard, then obeys stdin: `start <json budget>` / `fg` / `stop` / `quit`. Prints
    `sealed`, `started <monotonic>` and after each stop one JSON line of stats."""
    import vram_residency as vr

    worker = vr.Worker(token, backend=backend)
    began = time.monotonic()
    shard = worker.seal_file(shard_path)
    print(f"sealed {shard.nbytes} {time.monotonic() - began:.2f}", flush=True)
    background = None
    foreground = None
    for line in sys.stdin:
        command, _, rest = line.strip().partition(" ")
        if command == "start":
            budget = json.loads(rest)
            background = worker.verify_in_background(
                shard, sms=budget["sms"], mechanism=budget["mechanism"], max_gbps=budget["max_gbps"])
            print(f"started {time.monotonic()}", flush=True)
        elif command == "fg":
            halt = threading.Event()
            done = []

            def loop(halt=halt, done=done):
                while not halt.is_set():
                    done.append(shard.verify()["bytes"])

            thread = threading.Thread(target=loop)
            foreground = (halt, done, thread, time.monotonic())
            thread.start()
            print(f"started {foreground[3]}", flush=True)
        elif command == "stop":
            if background is not None:
                stats = background.stop()
                background = None
                print(json.dumps({"ended": time.monotonic(), "stats": stats}), flush=True)
            elif foreground is not None:
                halt, done, thread, since = foreground
                halt.set()
                thread.join()
                ended = time.monotonic()
                foreground = None
                print(json.dumps({"ended": ended, "stats": {
                    "verifications": len(done), "bytes": sum(done),
                    "wall_gb_per_s": sum(done) / (ended - since) / 1e9, "mechanism": "whole_gpu"}}),
                    flush=True)
        elif command == "quit":
            break
    shard.evict()
    worker.close()
    return 0


# ---- the orchestrator ------------------------------------------------------------------------------


class Child:
    def __init__(self, args: list[str], env: dict) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def expect(self, prefix: str) -> str:
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"child ended early (exit {self.proc.wait()}) waiting for {prefix!r}")
            if line.startswith(prefix):
                return line.strip()

    def finish(self) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        out = self.proc.stdout.read()
        self.proc.wait(timeout=60)
        return out


def window_ms(batches: list, start: float, end: float) -> tuple[float | None, int]:
    inside = [ms for began, ended, ms in batches if began >= start and ended <= end]
    return (statistics.median(inside) if inside else None), len(inside)


def phase(args, env: dict, budgets: list[dict], label: str) -> dict:
    log(f"{label}: sealing {args.gib} GiB in the verifier process")
    verifier = Child(["--role", "verifier", "--token", str(args.token), "--shard", str(args.shard),
                      "--backend", args.backend], env)
    sealed = verifier.expect("sealed").split()
    log(f"{label}: sealed {int(sealed[1]) / 2**30:.1f} GiB in {sealed[2]} s; starting the victim")
    victim = Child(["--role", "victim", "--victim-gib", str(args.victim_gib),
                    "--victim-device", args.victim_device], env)
    victim.expect("ready")
    windows = []
    began = time.monotonic()
    time.sleep(args.seconds)
    windows.append(("alone (before)", None, began, time.monotonic(), None))
    for budget in [*budgets, None]:
        if budget is None:
            verifier.send("fg")
        else:
            verifier.send("start " + json.dumps(budget))
        started = float(verifier.expect("started").split()[1])
        time.sleep(args.seconds)
        window_end = time.monotonic()
        verifier.send("stop")
        result = json.loads(verifier.expect("{"))
        name = budget["label"] if budget else "foreground (Shard.verify back to back)"
        windows.append((name, budget, started + 0.2, window_end, result))
        time.sleep(0.5)
    began = time.monotonic()
    time.sleep(args.seconds)
    windows.append(("alone (after)", None, began, time.monotonic(), None))
    timings = json.loads(victim.finish().strip().splitlines()[-1])
    verifier.send("quit")
    verifier.finish()
    base, _ = window_ms(timings["batches"], windows[0][2], windows[0][3])
    rows = []
    for name, budget, start, end, result in windows:
        ms, count = window_ms(timings["batches"], start, end)
        row = {"scenario": name, "victim_ms_per_step": round(ms, 4) if ms else None,
               "victim_batches": count,
               "victim_slower_percent": round((ms / base - 1) * 100, 2) if ms and base else None}
        if result is not None:
            stats = result["stats"]
            seconds = result["ended"] - (start - 0.2)
            row.update({"mechanism": stats.get("mechanism"), "sms_granted": stats.get("sms"),
                        "verified_gb_per_s_wall": round(stats["bytes"] / seconds / 1e9, 1),
                        "verified_gb_per_s_busy": round(stats.get("gb_per_s", 0.0), 1)
                        if "gb_per_s" in stats else None,
                        "verifications": stats.get("verifications"),
                        "incident": stats.get("incident"), "last_error": stats.get("last_error")})
        log(f"{label}: {row}")
        rows.append(row)
    return {"victim": f"torch.mv bf16 [{timings['rows']} x {timings['cols']}] in its own process",
            "scenarios": rows}


def start_mps(env: dict, directory: Path) -> bool:
    control = shutil.which("nvidia-cuda-mps-control")
    if control is None:
        log("nvidia-cuda-mps-control not found: the MPS phase is skipped")
        return False
    (directory / "pipe").mkdir(parents=True, exist_ok=True)
    (directory / "log").mkdir(parents=True, exist_ok=True)
    env["CUDA_MPS_PIPE_DIRECTORY"] = str(directory / "pipe")
    env["CUDA_MPS_LOG_DIRECTORY"] = str(directory / "log")
    started = subprocess.run([control, "-d"], env=env, capture_output=True, text=True)
    if started.returncode != 0:
        log(f"the MPS daemon did not start: {started.stderr.strip()}")
        return False
    time.sleep(1.0)
    return True


def stop_mps(env: dict) -> None:
    subprocess.run(["nvidia-cuda-mps-control"], input="quit\n", env=env, text=True,
                   capture_output=True)
    time.sleep(1.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", choices=["victim", "verifier"], help=argparse.SUPPRESS)
    parser.add_argument("--shard", type=Path, help=argparse.SUPPRESS)
    # A dry run of the script on a host without a GPU: --backend sim --victim-device cpu.
    parser.add_argument("--backend", default="cuda", help=argparse.SUPPRESS)
    parser.add_argument("--victim-device", default="cuda:0", help=argparse.SUPPRESS)
    parser.add_argument("--token", type=Path)
    parser.add_argument("--gib", type=int, default=16)
    parser.add_argument("--victim-gib", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--budgets", default="8")
    parser.add_argument("--mps-budgets", default="8,8:mps,16:mps")
    args = parser.parse_args()
    if args.role == "victim":
        return victim_main(args.victim_gib, args.victim_device)
    if args.role == "verifier":
        return verifier_main(args.token, args.shard, args.backend)
    if args.token is None:
        parser.error("--token is required")
    work = Path(tempfile.mkdtemp(prefix="vr-mps-bench-"))
    args.shard = work / "shard.bin"
    with open(args.shard, "wb") as f:  # sparse: reads back as zeros, costs no disk
        f.truncate(args.gib << 30)
    env = dict(os.environ)
    out = {"gib": args.gib, "seconds_per_scenario": args.seconds}
    def attempt(label: str, run) -> dict:
        # A phase that fails (e.g. clients refused by the MPS server) is reported, not fatal.
        try:
            return run()
        except Exception as error:  # noqa: BLE001 - reported in the JSON
            log(f"{label}: failed: {error!r}")
            return {"error": repr(error)}

    try:
        out["without_mps"] = attempt("without MPS", lambda: phase(
            args, env, [parse_budget(b) for b in args.budgets.split(",") if b], "without MPS"))
        mps_env = dict(env)
        if start_mps(mps_env, work / "mps"):
            try:
                out["with_mps"] = attempt("with MPS", lambda: phase(
                    args, mps_env, [parse_budget(b) for b in args.mps_budgets.split(",") if b],
                    "with MPS"))
            finally:
                stop_mps(mps_env)
                for name in ("control.log", "server.log"):
                    path = work / "mps" / "log" / name
                    if path.exists():
                        tail = path.read_text(errors="replace").splitlines()[-6:]
                        log(f"MPS {name}: " + " | ".join(tail))
        else:
            out["with_mps"] = None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
