"""Seeds and devices: the small helpers every driving module shares.

- :func:`derive_seed`: a 62-bit seed from ``(seed, step, stream)``; every source of
  randomness of a run (training batches, an objective's draws, validation, decoding) is
  one of these streams, so runs are reproducible and resumable step by step.
- :func:`rank_stream`: a stream's name for this rank of a process group (the stream
  itself in one process, so single-process seeds never change under torchrun support).
- :func:`device_of`, :func:`resolve_device`, :func:`sync`: where a model lives, what
  ``run.device: auto`` means, and a barrier before reading a wall clock.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from orderlab import distributed

__all__ = ["derive_seed", "rank_stream", "device_of", "resolve_device", "sync"]


def derive_seed(seed: int, step: int, stream: str) -> int:
    """A 62-bit seed from ``(seed, step, stream)``: independent streams per step and use.

    A hash (not ``seed * k + step``) so that nearby seeds never share streams.
    """
    digest = hashlib.blake2b(f"{seed}:{step}:{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


def rank_stream(stream: str) -> str:
    """This rank's seed stream ``stream``: ``stream`` itself in one process (single-process
    runs keep their seeds), ``stream@r/W`` for rank ``r`` of ``W``."""
    w = distributed.world()
    return stream if w == 1 else f"{stream}@{distributed.rank()}/{w}"


def device_of(module: nn.Module) -> torch.device:
    """The device of a module's first parameter (CPU for a module without parameters)."""
    p = next(iter(module.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def resolve_device(name: str) -> torch.device:
    """``"auto"``: CUDA when available, else CPU; any other name as ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so a wall clock measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
