"""Sealed, VRAM-resident model weights.

Seal safetensors/GGUF/raw files into GPU memory, re-verify them there (fs-verity digest measured on
the GPU), attest residency with the worker's Ed25519 key, and lend the sealed memory itself to
PyTorch through DLPack (see :mod:`vram_residency.torch`). The ``sim`` backend keeps "device memory"
in host RAM for development; it is never residency and says so.

Quick start::

    import vram_residency as vr
    import vram_residency.torch as vrt

    worker = vr.Worker("worker.token")                 # backend="cuda" by default
    sealed = worker.seal_checkpoint("Qwen2-1.5B/")     # one shard per *.safetensors file
    vrt.load_into(model, sealed)                       # zero-copy: parameters ARE the sealed memory
    model = vrt.guard(model, sealed)                   # re-verified in VRAM before each generate()
    background = worker.verify_in_background(sealed, sms=8)   # and continuously, on 8 SMs
"""

from ._native import (
    BackgroundVerification,
    CheckpointError,
    CorruptionError,
    DigestMismatchError,
    ForgeryError,
    MalformedModelError,
    Model,
    ModelSeal,
    PolicyViolationError,
    Shard,
    ShardInUseError,
    Tensor,
    TensorNotLendableError,
    VramResidencyError,
    Worker,
    WorkerStoppedError,
    __version__,
)

__all__ = [
    "BackgroundVerification",
    "CheckpointError",
    "CorruptionError",
    "DigestMismatchError",
    "ForgeryError",
    "MalformedModelError",
    "Model",
    "ModelSeal",
    "PolicyViolationError",
    "Shard",
    "ShardInUseError",
    "Tensor",
    "TensorNotLendableError",
    "VramResidencyError",
    "Worker",
    "WorkerStoppedError",
    "__version__",
]
