"""On an NVIDIA GPU: a real transformers causal LM (Qwen2 architecture, random bf16 weights, > 1 GiB)
saved as a sharded checkpoint, sealed through vram_residency, and run on the sealed memory itself.

Checks, against the same checkpoint loaded with `safetensors`' own loader: identical greedy tokens
and bit-identical logits for 32 new tokens; decode speed (printed, not asserted); every parameter's
storage inside a sealed allocation; a bit flipped inside one layer's weight from outside the
manager is reported as corruption naming that tensor and the model does not run; free VRAM back to
its starting value. Skipped (`no GPU`) without CUDA, torch or transformers.
"""

from __future__ import annotations

import gc
import os
import time
import warnings

import pytest

torch = pytest.importorskip("torch", reason="no GPU (torch is not installed)")
if not torch.cuda.is_available():
    pytest.skip("no GPU", allow_module_level=True)
transformers = pytest.importorskip("transformers", reason="no GPU stack (transformers missing)")

import safetensors.torch  # noqa: E402

import vram_residency as vr  # noqa: E402
import vram_residency.torch as vrt  # noqa: E402

NEW_TOKENS = 32


def report(line: str) -> None:
    print(f"test_gpu: {line}", flush=True)


def free_vram() -> int:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info()[0]


def make_config():
    return transformers.Qwen2Config(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=12,
        num_attention_heads=16,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def new_model(config):
    torch.manual_seed(0)  # every model starts from different weights than the checkpoint's
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.to("cuda:0").eval()


def greedy(model, prompt):
    out = model.generate(
        prompt,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    torch.cuda.synchronize()
    return out.sequences, torch.stack(out.logits)


def tokens_per_second(generate, prompt, runs=3):
    best = float("inf")
    for _ in range(runs):
        torch.cuda.synchronize()
        started = time.perf_counter()
        generate(
            prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
            pad_token_id=0,
        )
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return NEW_TOKENS / best


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("qwen2-random")
    config = make_config()
    torch.manual_seed(1234)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(directory, safe_serialization=True, max_shard_size="500MB")
    del model
    files = sorted(p.name for p in directory.glob("*.safetensors"))
    report(f"checkpoint: {params / 1e6:.0f} M bf16 parameters ({params * 2 / 2**30:.2f} GiB) in "
           f"{len(files)} files, with model.safetensors.index.json")
    assert params * 2 >= 1 << 30
    assert len(files) >= 2 and (directory / "model.safetensors.index.json").exists()
    return directory, config


def test_gpu_a_transformers_model_runs_on_sealed_vram_bit_identical_to_safetensors(
    checkpoint, tmp_path
):
    directory, config = checkpoint
    token = tmp_path / "worker.token"
    token.write_text(os.urandom(32).hex())
    token.chmod(0o600)
    prompt = torch.randint(3, config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(7))
    prompt = prompt.to("cuda:0")

    # Reference: the same checkpoint through safetensors' own loader (kept for the speed rounds).
    reference = new_model(config)
    state = {}
    for path in sorted(directory.glob("*.safetensors")):
        state.update(safetensors.torch.load_file(path, device="cuda:0"))
    reference.load_state_dict(state, strict=True, assign=True)
    del state
    ref_tokens, ref_logits = greedy(reference, prompt)
    start_free = free_vram()

    worker = vr.Worker(token)  # backend="cuda"
    sealed = worker.seal_checkpoint(directory, progress=False)
    model = new_model(config)
    result = vrt.load_into(model, sealed)
    assert not result.missing_keys and not result.unexpected_keys, result
    assert vrt.unsealed_parameters(model, sealed) == []
    for name, param in model.named_parameters():
        assert param.data_ptr() % 256 == 0, name
    # Decode speed, in interleaved rounds so that clocks and noise hit both alike: first the sealed
    # model as it is (no guard, no hook), then guarded (a verification per generate call and a
    # forward pre-hook), each against the reference.
    speeds = {"safetensors.load_file": [], "sealed": [], "sealed, guarded": []}
    for _ in range(3):
        speeds["safetensors.load_file"].append(tokens_per_second(reference.generate, prompt))
        speeds["sealed"].append(tokens_per_second(model.generate, prompt))
    model = vrt.guard(model, sealed)

    tokens, logits = greedy(model, prompt)
    assert torch.equal(tokens, ref_tokens), "greedy tokens differ from the safetensors loader's"
    assert torch.equal(logits, ref_logits), "logits differ (bitwise) from the safetensors loader's"
    report(f"{NEW_TOKENS} new tokens identical, logits bit-identical ({logits.numel()} values)")
    for _ in range(3):
        speeds["safetensors.load_file"].append(tokens_per_second(reference.generate, prompt))
        speeds["sealed, guarded"].append(tokens_per_second(model.generate, prompt))
    report("decode tokens/s, best runs of interleaved rounds: " + ", ".join(
        f"{k} {max(v):.1f} (all {', '.join(f'{x:.1f}' for x in v)})" for k, v in speeds.items()))
    verify = sealed.verify()
    report(f"verify before a request: {verify['bytes'] / 2**30:.2f} GiB in "
           f"{verify['seconds'] * 1e3:.2f} ms ({verify['gb_per_s']:.0f} GB/s)")

    # Evicting while the model holds the sealed tensors is refused.
    with pytest.raises(vr.ShardInUseError):
        sealed.evict()

    # One bit flipped inside one layer's weight from outside the manager (an in-place write
    # through torch, as a stray kernel would do): the next request is refused, naming it.
    # The byte is in the middle of the tensor (22 MiB), so the damaged 512 KiB range holds it alone.
    victim = "model.layers.5.mlp.down_proj.weight"
    param = dict(model.named_parameters())[victim]
    with torch.no_grad():
        flat = param.view(torch.uint8).view(-1)
        flat[flat.numel() // 2 + 12_345].bitwise_xor_(1 << 3)
    torch.cuda.synchronize()
    with pytest.raises(vr.CorruptionError) as caught:
        model.generate(prompt, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert caught.value.tensors == [victim], caught.value.tensors
    report(f"bit flip detected before generate: CorruptionError naming {caught.value.tensors}")
    # The worker stopped: no forward pass runs any more, verified or not.
    with pytest.raises(vr.WorkerStoppedError):
        model(prompt)

    del model, param, flat, caught
    gc.collect()
    sealed.evict()
    del sealed, worker
    end_free = free_vram()
    report(f"free VRAM before sealing {start_free}, after eviction {end_free}")
    assert abs(end_free - start_free) <= 16 << 20, (start_free, end_free)
    del reference


def test_gpu_bad_input_leaves_nothing_allocated(tmp_path):
    token = tmp_path / "worker.token"
    token.write_text(os.urandom(32).hex())
    token.chmod(0o600)
    start_free = free_vram()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        worker = vr.Worker(token)
    directory = tmp_path / "ckpt"
    directory.mkdir()
    good = {"x": torch.ones(1 << 20, dtype=torch.float32)}
    safetensors.torch.save_file(good, directory / "a.safetensors")
    safetensors.torch.save_file(good, directory / "b.safetensors")  # "x" in two files
    with pytest.raises(vr.CheckpointError, match="in both"):
        worker.seal_checkpoint(directory)
    (directory / "b.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(vr.MalformedModelError):
        worker.seal_checkpoint(directory)
    assert worker.used_bytes() == 0
    del worker
    assert abs(free_vram() - start_free) <= 16 << 20
