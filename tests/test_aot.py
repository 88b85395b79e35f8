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
from orderlab.kernels.specs import COMPILE_OPTIONS, TRITON_DTYPE
from orderlab.kernels.aot import TARGETS, all_specializations, compile_all, compile_spec, resources, toolchain_missing


SPECS = all_specializations()  # listed before any test swaps a kernel for a recorder


class _Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` records the launch's
    constexprs and the ``(num_warps, num_stages)`` it would compile with: for an autotuned
    kernel every config the real autotuner would try (its own ``early_config_prune`` over
    its own configs), for a plain one the launch's own."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            options = {k: kwargs.pop(k) for k in COMPILE_OPTIONS if k in kwargs}
            assert options == COMPILE_OPTIONS, f"launched with compile options {options}, AOT compiles with {COMPILE_OPTIONS}"
            if hasattr(self.kernel, "configs"):
                nargs = dict(zip(self.kernel.arg_names, args))
                tried = [(c.num_warps, c.num_stages) for c in self.kernel.early_config_prune(self.kernel.configs, nargs, **kwargs)]
            else:
                tried = [(kwargs.pop("num_warps"), kwargs.pop("num_stages"))]
            self.calls.append((kwargs, tried))
        return launch


def _listed(kernel, dtype: torch.dtype, kwargs: dict, warps_stages: tuple[int, int]) -> bool:
    """Whether ``specializations()`` holds the launch with these constexprs and config."""
    launch = {k: v for k, v in kwargs.items() if k not in ("F32_DOT", "RTNE")}
    return any(s.kernel is kernel and s.dtype == TRITON_DTYPE[dtype] and (s.num_warps, s.num_stages) == warps_stages
               and all(s.constexprs[k] == v for k, v in launch.items()) for s in SPECS)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("D", attention.HEAD_DIMS)
@pytest.mark.parametrize("Lq", [1, 3, 17, 40, 200])
@pytest.mark.parametrize("groups", [False, True])
def test_launchers_launch_only_listed_specializations(monkeypatch, dtype, D, Lq, groups):
    """The forward, both backward kernels, launched through their launchers (kernels
    swapped for recorders), choose only specialisations the AOT list holds, at every
    config their autotuners try."""
    names = ("_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel")
    rec = {n: _Recorder(getattr(attention, n)) for n in names}
    for n in names:
        monkeypatch.setattr(attention, n, rec[n])
    monkeypatch.setattr(attention, "interpreting", lambda: False)  # the GPU's constexprs and autotuners
    B, H, Lk = 2, 2, 70
    q = torch.zeros(B, H, Lq, D, dtype=dtype)
    k = torch.zeros(B, H, Lk, D, dtype=dtype)
    qr, kr = torch.ones(B, Lq, dtype=torch.long), torch.zeros(B, Lk, dtype=torch.long)
    qg, kg = (qr, kr) if groups else (None, None)
    bm, bn = attention._default_blocks(Lq, D, dtype)
    prep = attention._prep(q, k, qr, kr, qg, kg, None, bm, bn)
    attention._forward(q, k, k, *prep, 0.1)
    attention._backward(q, q, k, k, q, torch.zeros(B, H, Lq), *prep, 0.1)
    for n in names:
        ((kwargs, tried),) = rec[n].calls
        assert tried, f"{n}: the autotuner would try no config"
        for ws in tried:
            assert _listed(rec[n].kernel, dtype, kwargs, ws), f"{n} launched an unlisted specialisation {kwargs} {ws}"


@pytest.mark.parametrize("N", [1, 5, 16, 33, 64, 100])
@pytest.mark.parametrize("dtype, D", [(torch.bfloat16, 64), (torch.float32, 256)])
def test_append_kv_launches_only_listed_specializations(monkeypatch, N, dtype, D):
    rec = _Recorder(cache._append_kv_kernel)
    monkeypatch.setattr(cache, "_append_kv_kernel", rec)
    ck = torch.zeros(2, 2, 128, D, dtype=dtype)
    new = torch.zeros(2, 2, N, D, dtype=dtype)
    cache.append_kv_triton(ck, ck.clone(), new, new.clone(), torch.zeros(2, dtype=torch.long), torch.full((2,), N))
    ((kwargs, (ws,)),) = rec.calls
    assert _listed(rec.kernel, dtype, kwargs, ws)
    assert kwargs["BLOCK_N"] * kwargs["BLOCK_D"] * torch.finfo(dtype).bits // 8 <= cache._TILE_BYTES


def test_specializations_are_distinct_and_complete():
    specs = SPECS
    labels = [s.label for s in specs]
    assert len(set(labels)) == len(labels)
    assert {s.name for s in specs} == {"fwd_kernel", "bwd_dq_kernel", "bwd_dkdv_kernel", "append_kv_kernel"}
    assert {s.constexprs["D"] for s in specs} == set(attention.HEAD_DIMS) >= {32, 64, 96, 128, 256}
    assert {s.dtype for s in specs} == {"fp16", "bf16", "fp32"}


def test_ptxas_report_is_read():
    log = ("ptxas info    : Compiling entry function '_fwd_kernel' for 'sm_80'\n"
           "ptxas info    : Function properties for _fwd_kernel\n"
           "    48 bytes stack frame, 52 bytes spill stores, 44 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 48 bytes cumulative stack size, 1024 bytes smem\n")
    assert resources(log) == {"regs": 255, "stack": 48, "spill_stores": 52, "spill_loads": 44, "static_smem": 1024}
    clean = "ptxas info    : Used 96 registers, used 1 barriers, 552 bytes cmem[0]\n"
    assert resources(clean) == {"regs": 96, "stack": 0, "spill_stores": 0, "spill_loads": 0, "static_smem": 0}
    with pytest.raises(ValueError, match="no register count"):
        resources("ptxas info    : 0 bytes gmem\n")


def test_compile_reports_ptxas_figures():
    """One real compile (cached by nothing: ptxas runs) reports what its cubin needs."""
    spec = next(s for s in SPECS if s.name == "append_kv_kernel" and s.dtype == "bf16" and s.constexprs["D"] == 64)
    r = compile_spec(spec, TARGETS[0])
    again = compile_spec(spec, TARGETS[0])  # a Triton cache hit would run no ptxas and report nothing
    assert r.regs > 0 and r.spills == 0 and r.fits and again.regs == r.regs


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
        print(f"{r.target.name:14s} {r.spec.label:64s} regs {r.regs:3d} stack {r.stack:5d} B spills {r.spills:5d} B "
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
