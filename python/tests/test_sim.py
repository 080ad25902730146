"""The Python package on the `sim` backend: sealing, zero-copy numpy views (DLPack), verification,
corruption, lifetimes, checkpoint directories and bad input. Fixtures come from the upstream
`safetensors` writer and the repository's upstream-written GGUF fixture."""

from __future__ import annotations

import base64
import ctypes
import json
import struct
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import vram_residency as vr

from conftest import FIXTURES


def write_checkpoint(directory: Path, files: dict[str, dict[str, np.ndarray]], index: bool = True):
    directory.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for name, tensors in files.items():
        save_file(tensors, str(directory / name))
        weight_map.update({tensor: name for tensor in tensors})
    if index:
        (directory / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map})
        )
    (directory / "config.json").write_text("{}")  # not weights: left alone


def rng_tensors(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "f32": rng.standard_normal((3, 5), dtype=np.float32),
        "f16": rng.standard_normal((4, 4)).astype(np.float16),
        "f64": rng.standard_normal(7),
        "i8": rng.integers(-128, 127, 9, dtype=np.int8),
        "i16": rng.integers(-1000, 1000, (2, 3), dtype=np.int16),
        "i32": rng.integers(-(2**31), 2**31 - 1, 5, dtype=np.int32),
        "i64": rng.integers(-(2**62), 2**62, 3, dtype=np.int64),
        "u8": rng.integers(0, 255, (2, 2, 2), dtype=np.uint8),
        "bool": rng.integers(0, 2, 6).astype(np.bool_),
    }


def test_views_are_the_sealed_bytes_with_the_tables_dtypes_and_shapes(sim_worker, tmp_path):
    tensors = rng_tensors(1)
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    shard = sim_worker.seal_file(path, model_ref="rng-1")
    assert shard.backend == "sim"
    assert shard.model_ref == "rng-1"
    assert sorted(shard.tensor_names()) == sorted(tensors)
    views = shard.tensors()
    for name, expected in tensors.items():
        got = np.from_dlpack(views[name])
        assert got.dtype == expected.dtype, name
        assert got.shape == expected.shape, name
        assert np.array_equal(got, expected), name
        # The sealed bytes are lent read-only (DLPack versioned flag), never copied.
        assert not got.flags.writeable, name
    record = shard.record()
    assert record["digest"] == shard.digest
    assert record["tensor_count"] == len(tensors)


def test_a_view_aliases_sealed_memory_and_a_flip_through_it_is_corruption_naming_the_tensor(
    sim_worker, tmp_path
):
    path = tmp_path / "m.safetensors"
    tensors = rng_tensors(2)
    tensors["big"] = np.arange(1 << 20, dtype=np.float32)  # 4 MiB: several 512 KiB ranges
    save_file(tensors, str(path))
    shard = sim_worker.seal_file(path)
    assert shard.verify()["digest"] == shard.digest
    array = np.from_dlpack(shard.tensors()["big"])
    address = array.ctypes.data
    assert shard.holds(address, array.nbytes)
    assert not shard.holds(address, shard.nbytes + 1)
    # Flip one bit of the sealed memory from outside the manager (what a stray write would do),
    # 2 MiB into the big tensor: the damaged 512 KiB range holds nothing else.
    byte = ctypes.c_uint8.from_address(address + (2 << 20) + 3)
    byte.value ^= 0x10
    with pytest.raises(vr.CorruptionError) as caught:
        shard.verify()
    assert caught.value.tensors == ["big"]
    assert caught.value.shard_id == shard.shard_id
    assert len(caught.value.ranges) == 1
    # The worker stopped: nothing runs, nothing is sealed, until a new worker.
    assert sim_worker.state.startswith("stopped")
    with pytest.raises(vr.WorkerStoppedError):
        shard.verify()
    with pytest.raises(vr.WorkerStoppedError):
        shard.tensors()
    with pytest.raises(vr.WorkerStoppedError):
        sim_worker.seal_file(path)
    byte.value ^= 0x10


def test_eviction_is_refused_while_views_live_and_frees_everything_after(sim_worker, tmp_path):
    path = tmp_path / "m.safetensors"
    save_file(rng_tensors(3), str(path))
    shard = sim_worker.seal_file(path)
    assert sim_worker.used_bytes() == path.stat().st_size
    views = shard.tensors()
    array = np.from_dlpack(views["f32"])
    del views
    with pytest.raises(vr.ShardInUseError, match="still lent"):
        shard.evict()
    assert shard.resident
    # The array alone (its DLPack capsule's deleter holds the lease) keeps the shard alive.
    expected = array.copy()
    assert np.array_equal(array, expected)
    del array
    shard.evict()
    assert not shard.resident
    assert sim_worker.used_bytes() == 0
    shard.evict()  # twice: a no-op
    with pytest.raises(vr.VramResidencyError, match="evicted"):
        shard.tensors()


def test_gguf_tensors_come_out_typed_and_quantised_blocks_as_bytes(sim_worker):
    path = FIXTURES / "tiny-v3.gguf"
    expected = json.loads((FIXTURES / "tiny-v3.gguf.expected.json").read_text())
    data = path.read_bytes()
    shard = sim_worker.seal_file(path)
    views = shard.tensors()
    assert len(views) == len(expected["tensors"])
    kinds = set()
    for tensor in expected["tensors"]:  # written and read by the upstream gguf package
        view = views[tensor["name"]]
        array = np.from_dlpack(view)
        assert array.tobytes() == data[tensor["offset"] : tensor["offset"] + tensor["bytes"]]
        if view.as_bytes:
            assert array.dtype == np.uint8 and array.shape == (tensor["bytes"],)
            kinds.add("bytes")
        else:
            # GGUF lists ne[0] (the contiguous dimension) first; views are row-major.
            assert list(array.shape) == list(reversed(tensor["shape"])), tensor["name"]
            kinds.add("typed")
    assert kinds == {"bytes", "typed"}, kinds


def test_a_checkpoint_directory_is_one_shard_per_file_checked_against_its_index(
    sim_worker, tmp_path
):
    a = {f"a.{k}": v for k, v in rng_tensors(4).items()}
    b = {f"b.{k}": v for k, v in rng_tensors(5).items()}
    write_checkpoint(tmp_path / "ckpt", {"model-00001-of-00002.safetensors": a,
                                         "model-00002-of-00002.safetensors": b})
    model = sim_worker.seal_checkpoint(tmp_path / "ckpt")
    assert len(model) == 2
    assert model.files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert model.model_ref == "ckpt"
    records = [s.record() for s in model.shards]
    assert [(r["shard_index"], r["total_shards"]) for r in records] == [(0, 2), (1, 2)]
    views = model.tensors()
    assert sorted(views) == sorted([*a, *b])
    for name, expected in {**a, **b}.items():
        assert np.array_equal(np.from_dlpack(views[name]), expected), name
    report = model.verify()
    assert report["bytes"] == model.nbytes == sim_worker.used_bytes()
    assert len(report["shards"]) == 2
    assert report["gpus"] == [dict(report["gpus"][0], gpu=0, shards=[0, 1])]
    del views
    model.evict()
    assert sim_worker.used_bytes() == 0


def test_a_checkpoint_over_three_gpus_is_one_model_verified_at_once_and_attested_once(
    token_file, tmp_path
):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        worker = vr.Worker(token_file, backend="sim", sim_devices=3, sim_bytes_per_device=16 << 20)
    files = {}
    for i in range(3):
        tensors = {f"l{i}.{k}": v for k, v in rng_tensors(10 + i).items()}
        tensors[f"l{i}.big"] = np.arange(1 << 19, dtype=np.float32) + i  # 2 MiB
        files[f"model-0000{i + 1}-of-00003.safetensors"] = tensors
    write_checkpoint(tmp_path / "tp3", files)
    model = worker.seal_checkpoint(tmp_path / "tp3", gpus=[0, 1, 2], model_ref="org/tp3")
    assert [s.record()["gpu_device"] for s in model.shards] == [0, 1, 2]
    report = model.verify()
    assert [g["gpu"] for g in report["gpus"]] == [0, 1, 2]
    assert [g["shards"] for g in report["gpus"]] == [[0], [1], [2]]
    assert report["bytes"] == model.nbytes
    # One attestation for the whole model: every shard a subject, one signature.
    envelope = json.loads(model.attest(b"m" * 32))
    assert len(envelope["signatures"]) == 1
    statement = json.loads(base64.b64decode(envelope["payload"]))
    assert statement["predicateType"].endswith("/model-residency/v1")
    assert sorted(s["name"] for s in statement["subject"]) == sorted(s.shard_id for s in model.shards)
    # A flip in the shard on GPU 1 is reported for that shard and tensor only.
    array = np.from_dlpack(model.shards[1].tensors()["l1.big"])
    byte = ctypes.c_uint8.from_address(array.ctypes.data + (1 << 20) + 7)
    byte.value ^= 0x01
    with pytest.raises(vr.CorruptionError) as caught:
        model.verify()
    assert caught.value.tensors == ["l1.big"]
    assert caught.value.shard_id == model.shards[1].shard_id
    assert "shard 1 failed verification" in str(caught.value)
    assert worker.state.startswith("stopped")
    byte.value ^= 0x01
    del array
    model.evict()
    assert worker.used_bytes() == 0


def test_a_checkpoint_placed_on_a_missing_gpu_is_refused_and_leaves_nothing(token_file, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        worker = vr.Worker(token_file, backend="sim", sim_devices=2, sim_bytes_per_device=16 << 20)
    write_checkpoint(tmp_path / "c", {"a.safetensors": rng_tensors(1), "b.safetensors": {
        f"b.{k}": v for k, v in rng_tensors(2).items()}})
    with pytest.raises(vr.VramResidencyError, match="GPU index 5 is out of range"):
        worker.seal_checkpoint(tmp_path / "c", gpus=[0, 5])
    with pytest.raises(ValueError, match="gpus"):
        worker.seal_checkpoint(tmp_path / "c", gpus=[])
    assert worker.used_bytes() == 0


def test_two_processes_of_one_worker_make_one_model_seal_and_one_attestation(token_file, tmp_path):
    """What `vram_residency.torch.seal_model_across_ranks` does over a process group, without torch:
    two workers of one token (two ranks), each sealing its own file on its own GPU; rank 0 binds
    the gathered seals and attestations."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ranks = [vr.Worker(token_file, backend="sim", sim_devices=2, sim_bytes_per_device=16 << 20)
                 for _ in range(2)]
    shards = []
    for rank, worker in enumerate(ranks):
        path = tmp_path / f"rank{rank}.safetensors"
        save_file({f"r{rank}.w": np.arange(1 << 18, dtype=np.float32) + rank}, str(path))
        shards.append(worker.seal_file(path, gpu=rank, model_ref="org/tp2", shard_index=rank,
                                       total_shards=2))
    model = ranks[0].seal_model_records([s.seal() for s in shards])
    assert (model.model_ref, model.total_shards, len(model)) == ("org/tp2", 2, 2)
    assert [s["gpu"] for s in model.shards()] == [0, 1]
    nonce = b"q" * 32
    envelope = json.loads(ranks[0].attest_model_gathered(
        model, [s.attest(nonce) for s in shards], nonce))
    statement = json.loads(base64.b64decode(envelope["payload"]))
    assert statement["predicateType"].endswith("/model-residency/v1")
    assert sorted(s["name"] for s in statement["subject"]) == sorted(s.shard_id for s in shards)
    with pytest.raises(vr.VramResidencyError, match="shard 1 is missing"):
        ranks[0].attest_model_gathered(model, [shards[0].attest(nonce)], nonce)
    # A shard sealed by another worker's token does not verify under this seal key: forgery.
    other_token = tmp_path / "other.token"
    other_token.write_text("another-worker-token-of-at-least-32-bytes")
    other_token.chmod(0o600)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        other = vr.Worker(other_token, backend="sim", sim_devices=2, sim_bytes_per_device=16 << 20)
    foreign = other.seal_file(tmp_path / "rank1.safetensors", gpu=1, model_ref="org/tp2",
                              shard_index=1, total_shards=2)
    with pytest.raises(vr.ForgeryError):
        ranks[0].seal_model_records([shards[0].seal(), foreign.seal()])
    assert ranks[0].state.startswith("stopped")


def bad_checkpoint(tmp_path: Path, case: str) -> Path:
    directory = tmp_path / case
    one = {"x": np.ones(4, dtype=np.float32)}
    two = {"y": np.zeros(4, dtype=np.float32)}
    files = {"m1.safetensors": one, "m2.safetensors": two}
    if case == "duplicate-across-files":
        write_checkpoint(directory, {"m1.safetensors": one, "m2.safetensors": one}, index=False)
    elif case == "index-names-missing-file":
        write_checkpoint(directory, files)
        (directory / "m2.safetensors").unlink()
        (directory / "m3.safetensors").write_bytes((directory / "m1.safetensors").read_bytes())
    elif case == "index-names-tensor-twice":
        write_checkpoint(directory, files)
        (directory / "model.safetensors.index.json").write_text(
            '{"weight_map": {"x": "m1.safetensors", "y": "m2.safetensors", "x": "m2.safetensors"}}'
        )
    elif case == "index-misplaces-tensor":
        write_checkpoint(directory, files)
        (directory / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"x": "m2.safetensors", "y": "m1.safetensors"}})
        )
    elif case == "stray-weight-file":
        write_checkpoint(directory, files)
        save_file({"z": np.ones(2, dtype=np.float32)}, str(directory / "extra.safetensors"))
    elif case == "not-safetensors":
        write_checkpoint(directory, files)
        (directory / "m2.safetensors").write_bytes(b"GGUF" + b"\0" * 60)
    elif case == "no-weights":
        directory.mkdir()
        (directory / "config.json").write_text("{}")
    return directory


@pytest.mark.parametrize(
    ("case", "error", "message"),
    [
        ("duplicate-across-files", vr.CheckpointError, "in both m1.safetensors and m2"),
        ("index-names-missing-file", vr.CheckpointError, "m2.safetensors"),
        ("index-names-tensor-twice", vr.CheckpointError, 'names tensor "x" twice'),
        ("index-misplaces-tensor", vr.CheckpointError, "places it in m2.safetensors"),
        ("stray-weight-file", vr.CheckpointError, "extra.safetensors is not named"),
        ("not-safetensors", vr.MalformedModelError, "safetensors"),
        ("no-weights", vr.CheckpointError, "no *.safetensors file"),
    ],
)
def test_a_bad_checkpoint_is_a_clear_error_and_leaves_nothing_allocated(
    sim_worker, tmp_path, case, error, message
):
    directory = bad_checkpoint(tmp_path, case)
    with pytest.raises(error) as caught:
        sim_worker.seal_checkpoint(directory)
    assert message in str(caught.value), str(caught.value)
    assert sim_worker.used_bytes() == 0
    assert sim_worker.state == "running"


def test_a_tensor_not_aligned_to_its_elements_is_refused_by_name_never_copied(
    sim_worker, tmp_path
):
    # Hand-written (no upstream writer produces it): a 2-byte U8 tensor, then F32 data at offset 2.
    header = json.dumps({
        "pad": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
        "w": {"dtype": "F32", "shape": [4], "data_offsets": [2, 18]},
    }).encode()
    header += b" " * (-len(header) % 8)
    data = bytes(2) + np.arange(4, dtype=np.float32).tobytes()
    path = tmp_path / "misaligned.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    shard = sim_worker.seal_file(path)
    views = shard.tensors()
    assert np.array_equal(np.from_dlpack(views["pad"]), [0, 0])
    with pytest.raises(vr.TensorNotLendableError, match='tensor "w"'):
        np.from_dlpack(views["w"])
    with pytest.raises(BufferError):  # the consumer asked for a copy: never made
        views["pad"].__dlpack__(copy=True)


def test_expected_digest_shard_id_and_attestation(sim_worker, tmp_path):
    path = tmp_path / "m.safetensors"
    save_file(rng_tensors(6), str(path))
    first = sim_worker.seal_file(path, shard_id="layer-0")
    assert first.shard_id == "layer-0"
    digest = first.digest
    first.evict()
    again = sim_worker.seal_file(path, expect=digest)
    assert again.digest == digest
    with pytest.raises(vr.DigestMismatchError):
        sim_worker.seal_file(path, expect="sha256:" + "00" * 32)
    with pytest.raises(ValueError):
        sim_worker.seal_file(path, expect="md5:abc")
    with pytest.raises(ValueError):
        sim_worker.seal_file(path, shard_id="bad id with spaces")
    envelope = json.loads(again.attest(b"n" * 16))
    assert envelope["payloadType"] == "application/vnd.in-toto+json"
    assert len(envelope["signatures"]) == 1
    with pytest.raises(vr.VramResidencyError, match="nonce"):
        again.attest(b"short")
    assert sim_worker.used_bytes() == again.nbytes


def test_worker_bad_input_is_a_clear_python_exception(tmp_path, token_file, monkeypatch):
    monkeypatch.delenv("VRAM_RESIDENCY_TOKEN_FILE", raising=False)
    monkeypatch.delenv("VRAM_RESIDENCY_TOKEN", raising=False)
    with pytest.raises(vr.VramResidencyError, match="VRAM_RESIDENCY_TOKEN_FILE"):
        vr.Worker(backend="sim")
    loose = tmp_path / "loose.token"
    loose.write_text(token_file.read_text())
    loose.chmod(0o644)
    with pytest.raises(vr.VramResidencyError) as caught:
        vr.Worker(loose, backend="sim")
    assert token_file.read_text() not in str(caught.value)  # a secret never in a message
    with pytest.raises(vr.VramResidencyError):
        vr.Worker(tmp_path / "missing.token", backend="sim")
    with pytest.raises(ValueError, match="backend"):
        vr.Worker(token_file, backend="rocm")
    with pytest.warns(RuntimeWarning, match="not VRAM residency"):
        worker = vr.Worker(token_file, backend="sim")
    with pytest.raises(vr.VramResidencyError, match="No such file"):
        worker.seal_file(tmp_path / "absent.safetensors")
    with pytest.raises(vr.MalformedModelError):
        (tmp_path / "empty.safetensors").write_bytes(b"")
        worker.seal_file(tmp_path / "empty.safetensors")
    with worker:
        pass
    with pytest.raises(vr.WorkerStoppedError, match="closed"):
        worker.seal_file(FIXTURES / "tiny.safetensors")
    assert "closed" in repr(worker)


def test_background_verification_passes_and_a_corruption_stops_the_worker(sim_worker, tmp_path):
    path = tmp_path / "m.safetensors"
    tensors = {"big": np.arange(1 << 20, dtype=np.float32), "small": np.ones(8, np.float32)}
    save_file(tensors, str(path))
    shard = sim_worker.seal_file(path)
    with pytest.raises(TypeError):
        sim_worker.verify_in_background("not a shard")
    with pytest.raises(ValueError, match="auto, green, mps, bounded"):
        sim_worker.verify_in_background(shard, mechanism="mig")
    with pytest.raises(ValueError, match="max_gbps"):
        sim_worker.verify_in_background(shard, max_gbps=0.0)
    background = sim_worker.verify_in_background(shard, sms=8)
    deadline = time.monotonic() + 20
    while background.stats()["passes"] < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    stats = background.stats()
    assert stats["passes"] >= 2 and stats["running"], stats
    assert stats["mechanism"] == "unconfined"  # sim: no GPU to share
    assert stats["bytes"] >= 2 * shard.nbytes
    # Corrupt the sealed memory from outside; the background verifier finds it and stops the
    # worker, like any failed verification.
    array = np.from_dlpack(shard.tensors()["big"])
    byte = ctypes.c_uint8.from_address(array.ctypes.data + (2 << 20) + 5)
    byte.value ^= 1
    while background.stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.01)
    stats = background.stop()
    assert not stats["running"]
    assert "corruption" in (stats["incident"] or ""), stats
    assert sim_worker.state.startswith("stopped")
    with pytest.raises(vr.WorkerStoppedError):
        shard.verify()
    byte.value ^= 1

def test_background_verification_keeps_to_its_rate_cap(sim_worker, tmp_path):
    # A 4 MiB shard at most 16 MB/s: each digest (milliseconds on the sim) is followed by about
    # 0.26 s idle, so the bytes over the wall time stay below the cap (all but the last digest had
    # their full wait).
    path = tmp_path / "m.safetensors"
    save_file({"w": np.ones(1 << 20, dtype=np.float32)}, str(path))
    shard = sim_worker.seal_file(path)
    started = time.monotonic()
    background = sim_worker.verify_in_background(shard, sms=8, mechanism="auto", max_gbps=0.016)
    deadline = started + 20
    while background.stats()["verifications"] < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    stats = background.stop()
    wall = time.monotonic() - started
    assert stats["verifications"] >= 3, stats
    assert wall >= (stats["bytes"] - shard.nbytes) / 16e6, (wall, stats)
    assert stats["idle_seconds"] > 0.2, stats
    # A mechanism asked for by name that the backend cannot provide (the sim has no GPU) is an
    # error of each attempt, retried after a pause, never a silent unconfined digest.
    with sim_worker.verify_in_background(shard, sms=8, mechanism="green") as background:
        while not background.stats()["last_error"] and time.monotonic() < deadline + 20:
            time.sleep(0.01)
        stats = background.stats()
    assert "green mechanism cannot be had" in (stats["last_error"] or ""), stats
    assert stats["verifications"] == 0 and stats["incident"] is None, stats
