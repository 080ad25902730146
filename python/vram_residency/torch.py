"""PyTorch on sealed memory: zero-copy tensors and verify-before-request.

Importing this module imports torch; ``vram_residency`` itself never does.

- :func:`state_dict` — every tensor of a sealed shard or model as a ``torch.Tensor`` whose storage
  *is* the sealed allocation (DLPack, no copy; the shard is verified first).
- :func:`load_into` — ``module.load_state_dict(state_dict(sealed), assign=True)``: the module's
  parameters become the sealed memory.
- :func:`unsealed_parameters` — names of parameters that do *not* lie in sealed memory (a copy).
- :func:`guard` — re-verify in VRAM before each ``generate`` call (CI-007), never per decode step,
  and refuse to run at all once the worker stopped.
- :func:`request` — the same check for an explicit request scope (``with request(sealed): ...``).
- :func:`seal_model_across_ranks` and :func:`attest_model_across_ranks` — one process per GPU
  (``torch.distributed``): every rank's shards gathered to rank 0 over the process group into one
  model seal, and every rank's fresh attestations into one model attestation. All ranks must run
  workers of the same worker token (one worker identity).
"""

from __future__ import annotations

import contextlib
import functools
from typing import TYPE_CHECKING, Any, Iterator, Union

import torch as _torch

from ._native import Model, ModelSeal, Shard, Worker

if TYPE_CHECKING:
    from collections.abc import Iterable

Sealed = Union[Shard, Model]

__all__ = [
    "Sealed",
    "attest_model_across_ranks",
    "guard",
    "load_into",
    "request",
    "seal_model_across_ranks",
    "state_dict",
    "unsealed_parameters",
]


def state_dict(sealed: Sealed) -> dict[str, _torch.Tensor]:
    """Verifies ``sealed`` in VRAM, then returns every tensor of its table as a torch tensor on the
    sealed memory itself (dtype and shape from the table; quantised GGUF blocks as ``uint8``).

    Each tensor keeps its shard alive; evicting the shard is refused while any exists.
    """
    return {name: _torch.from_dlpack(view) for name, view in sealed.tensors().items()}


def load_into(module: _torch.nn.Module, sealed: Sealed, *, strict: bool = True) -> Any:
    """Assigns the sealed tensors to ``module``'s parameters and buffers without a copy
    (``load_state_dict(..., assign=True)``) and returns ``load_state_dict``'s result. Tied weights
    (``lm_head`` = ``embed_tokens``) are re-tied when the module has ``tie_weights()``.
    """
    result = module.load_state_dict(state_dict(sealed), strict=strict, assign=True)
    tie = getattr(module, "tie_weights", None)
    if callable(tie):
        tie()
    return result


def unsealed_parameters(module: _torch.nn.Module, sealed: Sealed) -> list[str]:
    """Names of ``module``'s parameters whose bytes do not lie inside ``sealed``'s memory (an empty
    list when every parameter is the sealed memory itself)."""
    outside = []
    for name, param in module.named_parameters(remove_duplicate=False):
        nbytes = param.numel() * param.element_size()
        if not sealed.holds(param.data_ptr(), nbytes):
            outside.append(name)
    return outside


@contextlib.contextmanager
def request(sealed: Sealed) -> Iterator[dict]:
    """A request scope: verifies ``sealed`` in VRAM on entry (raising ``CorruptionError`` naming
    the damaged tensors, ``ForgeryError``, ``WorkerStoppedError``...) and yields the report."""
    yield sealed.verify()


def guard(
    model: _torch.nn.Module,
    sealed: Sealed,
    *,
    methods: Iterable[str] = ("generate",),
) -> _torch.nn.Module:
    """Makes ``model`` re-verify ``sealed`` in VRAM before each call of ``methods`` (by default
    ``generate``: once per request, not per decode step), and refuse every forward pass once the
    worker has stopped (after any failed verification). Returns ``model`` (changed in place).
    """
    for name in methods:
        original = getattr(model, name)

        @functools.wraps(original)
        def verified(*args: Any, __original: Any = original, **kwargs: Any) -> Any:
            sealed.verify()
            return __original(*args, **kwargs)

        setattr(model, name, verified)

    def refuse_when_stopped(_module: _torch.nn.Module, _args: Any) -> None:
        sealed.ensure_running()

    model.register_forward_pre_hook(refuse_when_stopped)
    model._vram_residency_sealed = sealed  # keeps the shards alive as long as the model
    return model


def _own_shards(sealed: Sealed) -> list[Shard]:
    return list(sealed.shards) if isinstance(sealed, Model) else [sealed]


def _gather_to(dst: int, group: Any, mine: list[Any]) -> list[Any] | None:
    """Every rank's list gathered to ``dst`` and flattened in rank order; ``None`` on other ranks."""
    import torch.distributed as dist

    gathered: list[Any] | None = None
    if dist.get_rank(group) == dst:
        gathered = [None] * dist.get_world_size(group)
    dist.gather_object(mine, gathered, dst=dst, group=group)
    if gathered is None:
        return None
    return [item for part in gathered for item in part]


def seal_model_across_ranks(
    worker: Worker, sealed: Sealed, *, group: Any = None, dst: int = 0
) -> ModelSeal | None:
    """Binds the shards of every rank into one model seal on rank ``dst``.

    Each rank passes the shard(s) it sealed (a ``Shard`` or a ``Model``; together, every index of
    the model exactly once, all with the same ``model_ref`` and ``total_shards``). Their seals
    (record and tag: public data) are gathered to ``dst`` with ``torch.distributed.gather_object``
    over ``group``; ``dst`` checks every tag with its worker's seal key and returns the
    :class:`~vram_residency.ModelSeal`; the other ranks return ``None``. Collective: every rank of
    the group must call it. The ranks' workers must share the worker token.
    """
    seals = _gather_to(dst, group, [shard.seal() for shard in _own_shards(sealed)])
    if seals is None:
        return None
    return worker.seal_model_records(seals)


def attest_model_across_ranks(
    worker: Worker,
    sealed: Sealed,
    model: ModelSeal | None,
    nonce: bytes | None = None,
    *,
    group: Any = None,
    dst: int = 0,
) -> str | None:
    """One attestation of the whole model, made on rank ``dst`` from every rank's fresh one.

    ``nonce`` is the verifier's nonce, given on ``dst`` (other ranks may pass ``None``); it is
    broadcast to every rank, each rank attests its own shard(s) for it (a fresh verification in its
    own VRAM), the envelopes are gathered to ``dst``, which checks each (its worker's key, the
    nonce, exactly the shards ``model`` names) and returns one DSSE envelope (JSON text) for the
    model; other ranks return ``None``. ``model`` is what :func:`seal_model_across_ranks` returned
    on ``dst``. Collective: every rank of the group must call it.
    """
    import torch.distributed as dist

    box = [nonce if dist.get_rank(group) == dst else None]
    dist.broadcast_object_list(box, src=dst, group=group)
    shared = box[0]
    if not isinstance(shared, bytes):
        raise ValueError("attest_model_across_ranks: give the nonce (bytes) on the destination rank")
    envelopes = _gather_to(dst, group, [shard.attest(shared) for shard in _own_shards(sealed)])
    if envelopes is None:
        return None
    if model is None:
        raise ValueError("attest_model_across_ranks: give the ModelSeal on the destination rank")
    return worker.attest_model_gathered(model, envelopes, shared)
