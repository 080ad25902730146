"""`vram_residency.torch.seal_model_across_ranks` / `attest_model_across_ranks` over a real
`torch.distributed` process group: two processes (gloo, on the `sim` backend, so that it runs on
any host with torch), each a worker of the same token holding its own shard. Skipped where torch
is not installed (CI installs no torch; the GPU host has it)."""

from __future__ import annotations

import base64
import json
import warnings
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="no torch: the torch.distributed helpers are not tested")


def _rank(rank: int, world: int, init: str, token: str, workdir: str) -> None:
    import numpy as np
    import torch.distributed as dist
    from safetensors.numpy import save_file

    import vram_residency as vr
    import vram_residency.torch as vrt

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            worker = vr.Worker(token, backend="sim", sim_devices=world, sim_bytes_per_device=16 << 20)
        path = Path(workdir) / f"rank{rank}.safetensors"
        save_file({f"layers.{rank}.w": np.arange(1 << 18, dtype=np.float32) + rank}, str(path))
        shard = worker.seal_file(path, gpu=rank, model_ref="org/tp", shard_index=rank,
                                 total_shards=world)
        model = vrt.seal_model_across_ranks(worker, shard)
        nonce = b"n" * 32 if rank == 0 else None
        envelope = vrt.attest_model_across_ranks(worker, shard, model, nonce)
        if rank == 0:
            assert model is not None and model.total_shards == world
            (Path(workdir) / "model-attestation.json").write_text(envelope)
        else:
            assert model is None and envelope is None
        dist.barrier()
        shard.evict()
    finally:
        dist.destroy_process_group()


def test_ranks_gather_one_model_seal_and_one_attestation_over_a_process_group(
    token_file, tmp_path
):
    world = 2
    init = f"file://{tmp_path / 'rendezvous'}"
    torch.multiprocessing.spawn(
        _rank, args=(world, init, str(token_file), str(tmp_path)), nprocs=world, join=True
    )
    envelope = json.loads((tmp_path / "model-attestation.json").read_text())
    statement = json.loads(base64.b64decode(envelope["payload"]))
    assert statement["predicateType"].endswith("/model-residency/v1")
    assert len(statement["subject"]) == world
    assert len(envelope["signatures"]) == 1
