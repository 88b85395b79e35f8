"""Which implementation a kernel call runs: Triton, SDPA with a boolean mask, or the PyTorch reference.

Order of precedence (first that is set wins):

1. the ``backend=`` keyword of the call (``"triton"``, ``"reference"`` or ``None``);
2. the innermost ``with use_backend(...)`` block;
3. the environment variable ``ORDERLAB_KERNELS`` (``triton`` / ``reference`` / ``auto``);
4. the device: CUDA tensors run Triton, everything else runs the caller's ``fallback``
   (``"reference"`` unless the caller asks otherwise: the transformer asks for ``"sdpa"``,
   ``F.scaled_dot_product_attention`` with the rule's boolean mask built once per forward,
   faster than the reference on CPU; see ``benchmarks/test_speed.py``).

Triton on CPU tensors only works in Triton's interpreter, which must be switched on with
``TRITON_INTERPRET=1`` *before* ``orderlab.kernels`` is imported (``@triton.jit`` reads it
when the kernels are defined); asking for it otherwise is an error, not a silent fallback.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator

import torch

__all__ = ["BACKENDS", "use_backend", "resolve_backend", "interpreting"]

BACKENDS = ("triton", "sdpa", "reference")
_override: ContextVar[str | None] = ContextVar("orderlab_kernels_backend", default=None)


def interpreting() -> bool:
    """True when Triton kernels run in the (CPU, numpy) interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _normalise(name: str | None, where: str) -> str | None:
    if name is None or name == "auto" or name == "":
        return None
    if name not in BACKENDS:
        raise ValueError(f"{where}: unknown kernel backend {name!r}; choose one of {BACKENDS} or None/'auto'")
    return name


@contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """``with use_backend("triton"): ...`` forces a backend inside the block (None: automatic)."""
    token = _override.set(_normalise(name, "use_backend"))
    try:
        yield
    finally:
        _override.reset(token)


@torch.compiler.assume_constant_result
def _requested() -> str | None:
    """The backend asked for by ``use_backend`` or the environment (None: automatic).

    Read once when ``torch.compile`` traces a caller and kept as a constant of the graph
    (Dynamo cannot trace ``ContextVar.get``): a compiled graph keeps the backend it was
    traced with."""
    return _override.get() or _normalise(os.environ.get("ORDERLAB_KERNELS"), "ORDERLAB_KERNELS")


def resolve_backend(backend: str | None, device: torch.device, supported: bool = True, fallback: str = "reference") -> str:
    """The backend a call on tensors living on ``device`` runs, following the precedence above.

    ``supported=False`` (e.g. float64 inputs) makes the *automatic* choice the ``fallback``; an
    explicit request for Triton still returns ``"triton"`` (and its launcher says why not).
    """
    name = _normalise(backend, "backend=") or _requested()
    if name is None:
        return "triton" if device.type == "cuda" and supported else fallback
    if name == "triton" and device.type != "cuda" and not interpreting():
        raise RuntimeError(
            f"the Triton backend needs CUDA tensors (got {device.type}); to run the kernels on CPU, "
            "set TRITON_INTERPRET=1 in the environment before orderlab.kernels is imported"
        )
    return name
