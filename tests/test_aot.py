"""Every Triton kernel specialisation compiled ahead of time for A100 (sm_80), H100
(sm_90) and Blackwell (sm_100) on a machine with no GPU (``orderlab.kernels.aot``).

The default suite checks that the launchers launch only listed specialisations and
compiles a representative few; ``-m aot`` compiles them all (``.ci/run`` runs it as its own
step). Each must compile and fit the target's shared memory per block; registers, stack
(spills) and blocks per SM are printed.
"""

from __future__ import annotations

import pytest
import torch

from orderlab.kernels import attention, cache
from orderlab.kernels.aot import TARGETS, all_specializations, compile_all, compile_spec, toolchain_missing


SPECS = all_specializations()  # listed before any test swaps a kernel for a recorder


class _Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` records
    the keyword arguments (constexprs, num_warps, num_stages) instead of launching."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append(kwargs)


def _listed(kernel, dtype: torch.dtype, kwargs: dict) -> bool:
    """Whether ``specializations()`` holds the launch with these keyword arguments."""
    launch = {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages", "F32_DOT", "RTNE")}
    for s in SPECS:
        if s.kernel is kernel and s.dtype == {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype] \
                and (s.num_warps, s.num_stages) == (kwargs["num_warps"], kwargs["num_stages"]) \
                and all(s.constexprs[k] == v for k, v in launch.items()):
            return True
    return False


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("D", attention.HEAD_DIMS)
@pytest.mark.parametrize("Lq", [1, 3, 17, 40, 200])
@pytest.mark.parametrize("groups", [False, True])
def test_launchers_launch_only_listed_specializations(monkeypatch, dtype, D, Lq, groups):
    """The forward, both backward kernels and append_kv, launched through their launchers
    (kernels swapped for recorders), choose only specialisations the AOT list holds."""
    names = ("_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel")
    rec = {n: _Recorder(getattr(attention, n)) for n in names}
    for n in names:
        monkeypatch.setattr(attention, n, rec[n])
    monkeypatch.setattr(attention, "interpreting", lambda: False)  # the GPU's constexprs
    B, H, Lk = 2, 2, 70
    q = torch.zeros(B, H, Lq, D, dtype=dtype)
    k = torch.zeros(B, H, Lk, D, dtype=dtype)
    qr, kr = torch.ones(B, Lq, dtype=torch.long), torch.zeros(B, Lk, dtype=torch.long)
    qg, kg = (qr, kr) if groups else (None, None)
    bm, bn = attention._default_blocks(Lq, D, dtype)
    prep = attention._prep(q, k, qr, kr, qg, kg, None, bm, bn)
    o, lse = attention._forward(q, k, k, *prep, 0.1)
    attention._backward(q, q, k, k, q, torch.zeros(B, H, Lq), *prep, 0.1)
    for n in names:
        (kwargs,) = rec[n].calls
        assert _listed(rec[n].kernel, dtype, kwargs), f"{n} launched an unlisted specialisation {kwargs}"


@pytest.mark.parametrize("N", [1, 5, 16, 33, 64, 100])
def test_append_kv_launches_only_listed_specializations(monkeypatch, N):
    rec = _Recorder(cache._append_kv_kernel)
    monkeypatch.setattr(cache, "_append_kv_kernel", rec)
    ck = torch.zeros(2, 2, 128, 64, dtype=torch.bfloat16)
    new = torch.zeros(2, 2, N, 64, dtype=torch.bfloat16)
    cache.append_kv_triton(ck, ck.clone(), new, new.clone(), torch.zeros(2, dtype=torch.long), torch.full((2,), N))
    (kwargs,) = rec.calls
    assert _listed(rec.kernel, torch.bfloat16, kwargs)


def test_specializations_are_distinct_and_complete():
    specs = SPECS
    labels = [s.label for s in specs]
    assert len(set(labels)) == len(labels)
    assert {s.name for s in specs} == {"fwd_kernel", "bwd_dq_kernel", "bwd_dkdv_kernel", "append_kv_kernel"}
    assert {s.constexprs["D"] for s in specs} == set(attention.HEAD_DIMS) >= {32, 64, 96, 128, 256}
    assert {s.dtype for s in specs} == {"fp16", "bf16", "fp32"}


def representative() -> list[int]:
    """Indices of a few specialisations per kernel for the default suite, bf16 only (fp32's
    exact "ieee" dots take 25-200 s each to compile: the full matrix, ``-m aot``): the
    largest tiles of the largest head dim (D 256, groups) and the decode-sized one (D 64,
    16-query tiles)."""
    out = []
    for i, s in enumerate(SPECS):
        big = s.constexprs["D"] == 256 and s.constexprs.get("BLOCK_M", 64) >= 32
        small = s.constexprs["D"] == 64 and s.constexprs.get("BLOCK_M", 16) == 16
        if (big or small) and s.constexprs.get("HAS_GROUP", True) and s.dtype == "bf16":
            if s.constexprs.get("BLOCK_N", 64) == 64 or s.name != "append_kv_kernel":
                out.append(i)
    return out


def _check(targets, indices):
    runnable = []
    for t in targets:
        why = toolchain_missing(t)
        if why:
            print(f"skipped {t.name}: {why}")
        else:
            runnable.append(t)
    reports, failures = compile_all(indices, tuple(runnable))
    for r in sorted(reports, key=lambda r: (r.target.capability, r.spec.label)):
        print(f"{r.target.name:14s} {r.spec.label:64s} regs {r.regs:3d} stack {r.local:5d} B "
              f"smem {r.shared / 1024:6.1f} KB blocks/SM {r.blocks_per_sm}")
    bad = [f"{t.name} {s.label}: {err[:400]}" for s, t, err in failures]
    bad += [f"{r.target.name} {r.spec.label}: {r.shared} B shared > {r.target.smem_per_block}" for r in reports if not r.fits]
    assert not bad, "\n".join(bad)
    assert len(reports) == len(indices) * len(runnable)


def test_representative_specializations_compile_for_every_target(capsys):
    with capsys.disabled():
        _check(TARGETS, representative())


@pytest.mark.aot
@pytest.mark.parametrize("target", TARGETS, ids=lambda t: f"sm_{t.capability}")
def test_every_specialization_compiles(target, capsys):
    with capsys.disabled():
        _check((target,), list(range(len(SPECS))))
