"""Ahead-of-time compilation of every kernel specialisation for real GPU targets, on a
machine with no GPU: Triton lowers to PTX and the wheel's ``ptxas`` (``ptxas-blackwell`` for
sm_90 and up) assembles the cubin, whose resource usage ``cuobjdump`` reads back.

``compile_spec(spec, target)`` -> :class:`Report` (registers per thread, local memory per
thread, shared memory per block, blocks per SM); ``all_specializations()`` lists what the
launchers of ``attention.py`` and ``cache.py`` can launch. ``tests/test_aot.py`` compiles them
all; ``benchmarks/aot_table.py`` writes the table in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler import compile as triton_compile

from .specs import Spec

__all__ = ["Target", "TARGETS", "Report", "compile_spec", "resources", "occupancy", "all_specializations"]


@dataclass(frozen=True)
class Target:
    """One GPU generation's limits (CUDA C Programming Guide, "Technical Specifications per
    Compute Capability"; the same figures for 8.0, 9.0 and 10.0 except shared memory)."""

    name: str
    capability: int
    smem_per_block: int  # bytes, the opt-in maximum one block may use
    smem_per_sm: int  # bytes, shared memory per SM
    regs_per_sm: int = 65536
    threads_per_sm: int = 2048
    blocks_per_sm: int = 32
    smem_reserved: int = 1024  # the driver reserves 1 KB per block


KB = 1024
TARGETS = (
    Target("A100 (sm_80)", 80, 163 * KB, 164 * KB),
    Target("H100 (sm_90)", 90, 227 * KB, 228 * KB),
    Target("B200 (sm_100)", 100, 227 * KB, 228 * KB),
)


@dataclass(frozen=True)
class Report:
    """What one specialisation costs on one target."""

    spec: Spec
    target: Target
    regs: int  # registers per thread
    local: int  # local memory bytes per thread: register spills (these kernels have no local arrays)
    shared: int  # shared memory bytes per block (Triton's allocation + static)

    @property
    def fits(self) -> bool:
        return self.shared <= self.target.smem_per_block

    @property
    def blocks_per_sm(self) -> int:
        return occupancy(self.regs, self.shared, self.spec.num_warps, self.target)


def occupancy(regs: int, shared: int, num_warps: int, target: Target) -> int:
    """Resident blocks per SM: the least of the register file (registers allocated per warp
    in units of 256), shared memory (plus the 1 KB reserved per block), threads, and the
    block limit."""
    warp_regs = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = target.regs_per_sm // (warp_regs * num_warps)
    by_smem = target.smem_per_sm // (shared + target.smem_reserved)
    by_threads = target.threads_per_sm // (32 * num_warps)
    return min(by_regs, by_smem, by_threads, target.blocks_per_sm)


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def resources(cubin: bytes) -> dict[str, int]:
    """``{"REG", "LOCAL", "SHARED", ...}`` of the one function in ``cubin`` (``cuobjdump
    --dump-resource-usage``)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout
    line = next(ln for ln in out.splitlines() if "REG:" in ln)
    return {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}


def compile_spec(spec: Spec, target: Target) -> Report:
    """Compile ``spec`` for ``target`` (PTX, then cubin) and read its resource usage."""
    src = ASTSource(spec.kernel_fn, spec.signature, spec.constexprs, spec.attrs)
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
    compiled = triton_compile(src, target=GPUTarget("cuda", target.capability, 32), options=options)
    use = resources(compiled.asm["cubin"])
    return Report(spec, target, regs=use["REG"], local=use["STACK"] + use["LOCAL"], shared=compiled.metadata.shared + use["SHARED"])


def all_specializations() -> list[Spec]:
    """Every specialisation the launchers in ``attention.py`` and ``cache.py`` can launch."""
    from . import attention, cache

    return attention.specializations() + cache.specializations()


def toolchain_missing(target: Target) -> str | None:
    """Why ``target`` cannot be compiled here (the wheel lacks its ``ptxas``), or None."""
    name = "ptxas" if target.capability < 90 else "ptxas-blackwell"  # triton/backends/nvidia/compiler.py: get_ptxas
    return None if os.path.exists(_tool(name)) else f"the Triton wheel has no {name} for {target.name}"


def _compile_one(job: tuple[int, int]) -> tuple[int, int, tuple[int, int, int] | str]:
    """Process-pool worker: compile specialisation ``i`` for ``TARGETS[t]``; the error text on failure."""
    i, t = job
    try:
        r = compile_spec(all_specializations()[i], TARGETS[t])
        return i, t, (r.regs, r.local, r.shared)
    except Exception as e:  # a compile failure is a result to report, not a crash
        return i, t, f"{type(e).__name__}: {e}"


def compile_all(indices: list[int], targets: tuple[Target, ...] = TARGETS, workers: int | None = None):
    """Compile ``all_specializations()[i]`` for ``i`` in ``indices`` on every target, in a
    process pool. Returns ``(reports, failures)``: Reports, and ``(spec, target, error)``."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    specs = all_specializations()
    jobs = [(i, TARGETS.index(t)) for t in targets for i in indices]
    workers = workers or os.cpu_count() or 1
    reports, failures = [], []
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for i, t, out in pool.map(_compile_one, jobs):
            if isinstance(out, str):
                failures.append((specs[i], TARGETS[t], out))
            else:
                reports.append(Report(specs[i], TARGETS[t], *out))
    return reports, failures
