#!/usr/bin/env python3
"""Load speed of a safetensors checkpoint into torch CUDA tensors, on a GPU host, in one run:

- `safetensors.torch.load_file(f, device="cuda:0")` for every file;
- `safe_open(f, framework="pt", device="cuda:0")`, every tensor;
- vram_residency: `Worker.seal_checkpoint` + `vram_residency.torch.state_dict` (seal, digest on
  the GPU, zero-copy torch tensors) — and, for the same bytes, `Worker.seal_file` per file alone
  (the CLI's `seal` path) to show what the torch views cost on top;
- the guard's cost per request: `Model.verify()` (best and median of 10).

The page cache is warmed (every file read once) before each method, since a seal drops the pages it
read. Prints one JSON object. Usage (needs torch, safetensors and the vram_residency wheel):

    python3 scripts/gpu-python-bench.py --gib 16 --files 4 --dir /tmp/bench-ckpt --token FILE
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import vram_residency as vr
import vram_residency.torch as vrt

ROWS = 4096  # each tensor is ROWS x COLS bf16 (64 MiB)
COLS = 8192


def log(message: str) -> None:
    print(f"gpu-python-bench: {message}", file=sys.stderr, flush=True)


def make_checkpoint(directory: Path, gib: int, files: int) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    tensor_bytes = ROWS * COLS * 2
    per_file = (gib << 30) // files // tensor_bytes
    paths = []
    index = {}
    for f in range(files):
        path = directory / f"model-{f + 1:05d}-of-{files:05d}.safetensors"
        paths.append(path)
        if path.exists() and path.stat().st_size > per_file * tensor_bytes:
            with safe_open(path, framework="pt") as handle:
                index.update({k: path.name for k in handle.keys()})
            continue
        g = torch.Generator(device="cuda:0").manual_seed(f)
        tensors = {
            f"layers.{f}.{t}.weight": torch.randn(
                ROWS, COLS, device="cuda:0", dtype=torch.bfloat16, generator=g
            ).cpu()
            for t in range(per_file)
        }
        save_file(tensors, str(path))
        index.update({k: path.name for k in tensors})
        del tensors
        log(f"wrote {path.name}: {path.stat().st_size / 2**30:.2f} GiB")
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    # Written back before anything is timed. Without this, the first timed seal right after writing
    # ran at 3.2 GB/s against 29 for the same files later in the same run (H200, 2026-12-02);
    # the writeback of the dirty pages is the likely cause (a seal drops the pages it read).
    os.sync()
    return paths


def warm(paths: list[Path]) -> float:
    """Reads every file once (into the page cache); returns GB/s of that read."""
    started = time.perf_counter()
    total = 0
    buffer = bytearray(64 << 20)
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buffer):
                total += n
    return total / (time.perf_counter() - started) / 1e9


def timed(label: str, paths: list[Path], run) -> dict:
    read_gbps = warm(paths)
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    started = time.perf_counter()
    result = run()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    total = sum(p.stat().st_size for p in paths)
    log(f"{label}: {total / seconds / 1e9:.1f} GB/s ({seconds:.2f} s)")
    return {"seconds": round(seconds, 3), "gb_per_s": round(total / seconds / 1e9, 2),
            "page_cache_read_gb_per_s_before": round(read_gbps, 2), "result": result}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gib", type=int, default=16)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/bench-ckpt"))
    parser.add_argument("--token", type=Path, required=True)
    args = parser.parse_args()

    paths = make_checkpoint(args.dir, args.gib, args.files)
    total = sum(p.stat().st_size for p in paths)
    out: dict = {"bytes": total, "files": len(paths), "device": torch.cuda.get_device_name(0)}

    def st_load_file():
        tensors = {}
        for p in paths:
            tensors.update(load_file(p, device="cuda:0"))
        return len(tensors)

    def st_safe_open():
        tensors = {}
        for p in paths:
            with safe_open(p, framework="pt", device="cuda:0") as handle:
                for key in handle.keys():
                    tensors[key] = handle.get_tensor(key)
        return len(tensors)

    out["safetensors_load_file"] = timed("safetensors load_file", paths, st_load_file)
    out["safetensors_safe_open"] = timed("safetensors safe_open", paths, st_safe_open)

    worker = vr.Worker(args.token)
    # Compile the kernel and start the driver outside the timed region, as a running worker has.
    warmup = args.dir / "warmup.bin"
    warmup.write_bytes(os.urandom(1 << 20))
    worker.seal_file(warmup, progress=False).evict()

    def seal_files():
        shards = [worker.seal_file(p, progress=False) for p in paths]
        for shard in shards:
            shard.evict()
        return len(shards)

    sealed_holder = {}

    def seal_and_load():
        model = worker.seal_checkpoint(args.dir, progress=False)
        tensors = vrt.state_dict(model)
        sealed_holder["model"] = model
        sealed_holder["tensors"] = tensors
        return len(tensors)

    out["vram_residency_seal_file_each"] = timed("vram_residency seal_file x files", paths, seal_files)
    out["vram_residency_seal_checkpoint_and_state_dict"] = timed(
        "vram_residency seal_checkpoint + state_dict", paths, seal_and_load
    )
    model = sealed_holder["model"]
    verifies = []
    for _ in range(10):
        started = time.perf_counter()
        model.verify()
        verifies.append(time.perf_counter() - started)
    out["guard_verify_per_request_seconds"] = {
        "best": round(min(verifies), 5),
        "median": round(statistics.median(verifies), 5),
        "gb_per_s_best": round(total / min(verifies) / 1e9, 1),
    }
    sealed_holder.clear()
    gc.collect()
    model.evict()
    ratio = (out["vram_residency_seal_checkpoint_and_state_dict"]["gb_per_s"]
             / out["vram_residency_seal_file_each"]["gb_per_s"])
    out["torch_load_vs_seal_alone"] = round(ratio, 3)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
