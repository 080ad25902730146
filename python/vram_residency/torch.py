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
"""

from __future__ import annotations

import contextlib
import functools
from typing import TYPE_CHECKING, Any, Iterator, Union

import torch as _torch

from ._native import Model, Shard

if TYPE_CHECKING:
    from collections.abc import Iterable

Sealed = Union[Shard, Model]

__all__ = ["Sealed", "guard", "load_into", "request", "state_dict", "unsealed_parameters"]


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
