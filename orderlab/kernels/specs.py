"""What a kernel launch is, seen from the compiler: one :class:`Spec` per specialisation.

A Triton kernel compiles once per set of ``tl.constexpr`` values, argument dtypes and
``num_warps``/``num_stages``. Each launcher lists the specialisations it can choose
(``specializations()`` beside it, built from the launcher's own constants), so an
ahead-of-time compile (``orderlab/kernels/aot.py``, ``tests/test_aot.py``) covers exactly what can run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from triton.runtime.jit import JITFunction

__all__ = ["Spec", "TRITON_DTYPE", "COMPILE_OPTIONS", "signature", "unit_strides"]

TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32"}
# compile options every launch passes (and the AOT compile uses): fused multiply-adds kept,
# which Triton 3.9 does by default and 3.10 will not
COMPILE_OPTIONS = {"enable_fp_fusion": True}


@dataclass(frozen=True)
class Spec:
    """One compilable specialisation of ``kernel`` (a ``@triton.jit`` function)."""

    kernel: object
    signature: dict = field(hash=False)  # argument name -> "*bf16", "i32", "fp32", "constexpr"
    constexprs: dict = field(hash=False)  # name -> value (every tl.constexpr argument)
    num_warps: int
    num_stages: int
    dtype: str  # the data dtype, for labels

    def __reduce__(self):
        """Pickled by reference to the kernel's module attribute (process pools)."""
        fn = self.kernel_fn.fn
        return _by_name, (fn.__module__, fn.__name__, self.signature, self.constexprs, self.num_warps, self.num_stages, self.dtype)

    @property
    def attrs(self) -> dict:
        """What the JIT assumes of a launch on contiguous tensors: 16-byte aligned pointers
        and strides divisible by 16 (``tt.divisibility``); unit strides are constexprs."""
        names = self.kernel_fn.arg_names
        return {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
                if self.signature[n].startswith("*") or (n.startswith("stride") and self.signature[n] == "i32")}

    @property
    def kernel_fn(self):
        """The ``JITFunction`` (an Autotuner wraps it in ``.fn``)."""
        fn = self.kernel
        while not isinstance(fn, JITFunction):
            fn = fn.fn
        return fn

    @property
    def name(self) -> str:
        return self.kernel_fn.__name__.strip("_")

    @property
    def label(self) -> str:
        """Short unique id, e.g. ``fwd_kernel bf16 D=64 BLOCK_M=64 BLOCK_N=64 HAS_GROUP=1 w4 s2``."""
        keys = [k for k in ("D", "BLOCK_M", "BLOCK_N", "HAS_GROUP") if k in self.constexprs]
        parts = [f"{k}={int(self.constexprs[k])}" for k in keys]
        return f"{self.name} {self.dtype} {' '.join(parts)} w{self.num_warps} s{self.num_stages}"


def _by_name(module: str, name: str, *fields) -> Spec:
    import importlib

    return Spec(getattr(importlib.import_module(module), name), *fields)


def unit_strides(kernel) -> dict:
    """``{stride_xd: 1}`` for the innermost stride of every tensor argument (``stride_*d``):
    the JIT turns integer arguments equal to 1 into constexprs, and launchers pass
    contiguous head dims."""
    return {n: 1 for n in Spec(kernel, {}, {}, 0, 0, "").kernel_fn.arg_names if n.startswith("stride") and n.endswith("d")}


def signature(kernel, pointers: dict[str, str], floats: tuple[str, ...], constexprs: dict) -> dict:
    """Triton signature of ``kernel``: ``pointers`` maps tensor arguments to their element
    type (``"bf16"``), ``floats`` are fp32 scalars, constexprs are marked, the rest are i32."""
    sig = {}
    for name in Spec(kernel, {}, {}, 0, 0, "").kernel_fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = "*" + pointers[name]
        else:
            sig[name] = "fp32" if name in floats else "i32"
    return sig
