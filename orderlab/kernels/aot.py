"""Ahead-of-time compilation of every kernel specialisation for real GPU targets, on a
machine with no GPU: Triton lowers to PTX and the wheel's ``ptxas`` (``ptxas-blackwell`` for
sm_90 and up) assembles the cubin; ptxas's own ``-v`` report (which Triton asks for) gives
the registers, stack frame and spill bytes.

``compile_spec(spec, target)`` -> :class:`Report` (registers per thread, stack frame and
spill bytes per thread, shared memory per block, blocks per SM); ``all_specializations()`` lists what the
launchers of ``attention.py`` and ``cache.py`` can launch. ``tests/test_aot.py`` compiles them
all; ``benchmarks/aot_table.py`` writes the table in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler import compile as triton_compile

from .specs import COMPILE_OPTIONS, Spec

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
    stack: int  # stack frame bytes per thread (ptxas)
    spill_stores: int  # bytes of register spill stores per thread (ptxas)
    spill_loads: int  # bytes of register spill loads per thread (ptxas)
    shared: int  # shared memory bytes per block (Triton's allocation + static)

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads

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


_PTXAS = {
    "regs": r"Used (\d+) registers",
    "stack": r"(\d+) bytes stack frame",
    "spill_stores": r"(\d+) bytes spill stores",
    "spill_loads": r"(\d+) bytes spill loads",
    "static_smem": r"(\d+) bytes smem",
}


def resources(ptxas_log: str) -> dict[str, int]:
    """``{"regs", "stack", "spill_stores", "spill_loads", "static_smem"}`` of the one entry
    function in a ``ptxas -v`` log (absent figures are 0; no "Used ... registers" is an error)."""
    if not re.search(_PTXAS["regs"], ptxas_log):
        raise ValueError(f"no register count in the ptxas log:\n{ptxas_log}")
    return {k: int(m.group(1)) if (m := re.search(rx, ptxas_log)) else 0 for k, rx in _PTXAS.items()}


@contextlib.contextmanager
def _ptxas_log():
    """Triton prints ptxas's ``-v`` report, and compiles even what its cache holds (a cache
    hit runs no ptxas, so it would report nothing)."""
    knobs = ((triton.knobs.nvidia, "dump_ptxas_log"), (triton.knobs.compilation, "always_compile"))
    saved = [getattr(obj, name) for obj, name in knobs]
    for obj, name in knobs:
        setattr(obj, name, True)
    try:
        yield
    finally:
        for (obj, name), value in zip(knobs, saved):
            setattr(obj, name, value)


def compile_spec(spec: Spec, target: Target) -> Report:
    """Compile ``spec`` for ``target`` (PTX, then cubin) and read ptxas's resource report."""
    src = ASTSource(spec.kernel_fn, spec.signature, spec.constexprs, spec.attrs)
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages, **COMPILE_OPTIONS}
    log = io.StringIO()
    with _ptxas_log(), contextlib.redirect_stdout(log):
        compiled = triton_compile(src, target=GPUTarget("cuda", target.capability, 32), options=options)
    use = resources(log.getvalue())
    return Report(spec, target, regs=use["regs"], stack=use["stack"], spill_stores=use["spill_stores"],
                  spill_loads=use["spill_loads"], shared=compiled.metadata.shared + use["static_smem"])


def all_specializations() -> list[Spec]:
    """Every specialisation the launchers in ``attention.py`` and ``cache.py`` can launch."""
    from . import attention, cache

    return attention.specializations() + cache.specializations()


def toolchain_missing(target: Target) -> str | None:
    """Why ``target`` cannot be compiled here (the wheel lacks its ``ptxas``), or None."""
    name = "ptxas" if target.capability < 90 else "ptxas-blackwell"  # triton/backends/nvidia/compiler.py: get_ptxas
    return None if os.path.exists(_tool(name)) else f"the Triton wheel has no {name} for {target.name}"


def _compile_one(job: tuple[Spec, int]) -> tuple[Spec, int, tuple[int, ...] | str]:
    """Process-pool worker: compile ``spec`` for ``TARGETS[t]``; the error text on failure."""
    spec, t = job
    try:
        r = compile_spec(spec, TARGETS[t])
        return spec, t, (r.regs, r.stack, r.spill_stores, r.spill_loads, r.shared)
    except Exception as e:  # a compile failure is a result to report, not a crash
        return spec, t, f"{type(e).__name__}: {e}"


def compile_specs(specs: list[Spec], targets: tuple[Target, ...] = TARGETS, workers: int | None = None,
                  progress: bool = False):
    """Compile every spec on every target in a process pool (``spawn``: Triton is not
    fork-safe). Returns ``(reports, failures)``: Reports, and ``(spec, target, error)``."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from rich.progress import track

    jobs = [(s, TARGETS.index(t)) for t in targets for s in specs]
    workers = workers or os.cpu_count() or 1
    reports, failures = [], []
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        done = pool.map(_compile_one, jobs)
        for spec, t, out in track(done, total=len(jobs), description="compiling", disable=not progress):
            if isinstance(out, str):
                failures.append((spec, TARGETS[t], out))
            else:
                reports.append(Report(spec, TARGETS[t], *out))
    return reports, failures


def compile_all(indices: list[int], targets: tuple[Target, ...] = TARGETS, workers: int | None = None, progress: bool = False):
    """:func:`compile_specs` of ``all_specializations()[i]`` for ``i`` in ``indices``."""
    specs = all_specializations()
    return compile_specs([specs[i] for i in indices], targets, workers, progress)
