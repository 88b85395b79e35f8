"""Triton kernels against the PyTorch reference (forward and gradients), tile skipping,
decode attention over a ragged cache, append_kv, dispatch, and the benchmark's helpers.

Triton on CPU needs ``TRITON_INTERPRET=1`` before ``orderlab.kernels`` is imported, which a
test cannot arrange for a process that already imported it. So tests named ``*triton*``
run directly only where Triton can (CUDA, or a process started with TRITON_INTERPRET=1);
otherwise ``test_triton_suite_in_interpreter`` runs them all in a fresh ``pytest``
subprocess with the variable set. Shapes stay tiny: the interpreter runs numpy per tile.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import orderlab

from orderlab.kernels import (
    append_kv,
    append_kv_reference,
    set_attention,
    set_attention_reference,
    tile_lists,
    tile_stats,
    use_backend,
    visible,
)
from orderlab.kernels.dispatch import interpreting, resolve_backend

NEVER = 2**30
ROOT = Path(__file__).resolve().parents[1]
TRITON_HERE = interpreting() or torch.cuda.is_available()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
triton_only = pytest.mark.skipif(not TRITON_HERE, reason="runs in the TRITON_INTERPRET=1 subprocess")


# ------------------------------------------------------------------------ mask patterns


def set_causal_two_stream(ranks: torch.Tensor):
    """[clean stream; query stream] for ranks [B, L] -> (q_rank, k_rank, q_group, k_group) [B, 2L].

    Clean token of rank r: as key k_rank=r (group -1), as query q_rank=r+1 (sees ranks <= r).
    Query for a position of rank r: q_rank=r and its own group g; as a key NEVER with group g,
    so it sees clean tokens of rank < r and itself only.
    """
    B, L = ranks.shape
    g = torch.arange(L).expand(B, L)
    neg = torch.full((B, L), -1)
    q_rank = torch.cat([ranks + 1, ranks], 1)
    k_rank = torch.cat([ranks, torch.full((B, L), NEVER)], 1)
    q_group = torch.cat([neg, g], 1)
    k_group = torch.cat([neg, g], 1)
    return q_rank, k_rank, q_group, k_group


def block_causal(B: int, L: int, block: int):
    """Every position sees its own block and earlier ones (ranks = block index, groups = block)."""
    blk = (torch.arange(L) // block).expand(B, L)
    return blk + 1, blk, None, None


def bidirectional(B: int, L: int):
    return torch.ones(B, L, dtype=torch.long), torch.zeros(B, L, dtype=torch.long), None, None


def padded(B: int, L: int, gen: torch.Generator):
    """Causal rows with a random amount of right padding per row (pad key: NEVER / -1;
    pad query: rank 0 / group -1, so pad queries see nothing)."""
    pos = torch.arange(L).expand(B, L)
    n_real = torch.randint(L // 3, L + 1, (B,), generator=gen)
    real = pos < n_real[:, None]
    q_rank = torch.where(real, pos + 1, 0)
    k_rank = torch.where(real, pos, NEVER)
    q_group = torch.where(real, pos, -1)
    k_group = torch.where(real, pos, -1)
    return q_rank, k_rank, q_group, k_group


def random_pattern(B: int, L: int, gen: torch.Generator):
    q_rank = torch.randint(0, 8, (B, L), generator=gen)
    k_rank = torch.randint(0, 8, (B, L), generator=gen)
    q_group = torch.randint(-1, 4, (B, L), generator=gen)
    k_group = torch.randint(-1, 4, (B, L), generator=gen)
    return q_rank, k_rank, q_group, k_group


def pattern(name: str, B: int, L: int, seed: int = 0):
    """A mask of ~L queries and keys (two-stream gives 2 * (L // 2))."""
    gen = torch.Generator().manual_seed(seed)
    if name == "set_causal":
        # reveal order with sets of 1-3 tokens, laid out in reveal order
        sizes = torch.randint(1, 4, (L // 2,), generator=gen)
        ranks = torch.repeat_interleave(torch.arange(1, L // 2 + 1), sizes)[: L // 2]
        return set_causal_two_stream(ranks.expand(B, L // 2).clone())
    if name == "set_causal_shuffled":  # the same, in position order (ranks not sorted)
        ranks = torch.stack([torch.randperm(L // 2, generator=gen) + 1 for _ in range(B)])
        return set_causal_two_stream(ranks)
    if name == "block_causal":
        return block_causal(B, L, 8)
    if name == "bidirectional":
        return bidirectional(B, L)
    if name == "padded":
        return padded(B, L, gen)
    if name == "random":
        return random_pattern(B, L, gen)
    raise KeyError(name)


PATTERNS = ["set_causal", "set_causal_shuffled", "block_causal", "bidirectional", "padded", "random"]


# ----------------------------------------------------------------------- comparison


def torch_attention(q, k, v, vis, scale):
    """Attention as PyTorch computes it *in the input dtype*: the yardstick for rounding."""
    s = (q @ k.transpose(-1, -2)) * scale  # [B, H, Lq, Lk] in q.dtype
    s = s.masked_fill(~vis[:, None], torch.finfo(s.dtype).min)
    return (torch.softmax(s, -1) * vis[:, None]) @ v


def run_case(name, B, H, L, D, dtype, seed=0, block=16, k_len=None, Lq=None):
    """Triton vs float64 reference vs PyTorch-in-dtype, forward and q/k/v gradients."""
    q_rank, k_rank, q_group, k_group = pattern(name, B, L, seed)
    Lk = q_rank.shape[1]
    if Lq is not None:  # fewer queries than keys (decode): keep the last Lq query rows
        q_rank, q_group = q_rank[:, -Lq:], None if q_group is None else q_group[:, -Lq:]
    Lq = q_rank.shape[1]
    gen = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(B, H, Lq, D, generator=gen)
    k, v = (torch.randn(B, H, Lk, D, generator=gen) for _ in range(2))
    do = torch.randn(B, H, Lq, D, generator=gen)
    masks = [t.to(DEVICE) if t is not None else None for t in (q_rank, k_rank, q_group, k_group)]
    k_len_d = None if k_len is None else k_len.to(DEVICE)
    scale = 1 / math.sqrt(D)

    def grads(fn, dt):
        xs = [t.to(DEVICE, dt).requires_grad_() for t in (q, k, v)]
        o = fn(*xs)
        return (o, *torch.autograd.grad(o, xs, do.to(DEVICE, dt)))

    from orderlab.kernels import set_attention_triton

    got = grads(lambda a, b, c: set_attention_triton(a, b, c, *masks, k_len=k_len_d, block_m=block, block_n=block), dtype)  # block None: the launcher's
    want = grads(lambda a, b, c: set_attention_reference(a, b, c, *masks, k_len=k_len_d), torch.float64)
    vis = visible(*masks)
    if k_len_d is not None:
        vis = vis & (torch.arange(Lk, device=DEVICE)[None, None] < k_len_d[:, None, None])
    torch_dt = grads(lambda a, b, c: torch_attention(a, b, c, vis, scale), dtype)
    for what, g, w, t in zip(("out", "dq", "dk", "dv"), got, want, torch_dt):
        assert torch.isfinite(g).all(), f"{what}: non-finite"
        err = (g.double() - w).abs().max().item()
        ref_err = (t.double() - w).abs().max().item()
        assert err <= 2 * ref_err + 1e-5, f"{name} {dtype} {what}: triton err {err:.3g} > 2 x torch err {ref_err:.3g}"
    # queries with no visible key: exact zeros, zero gradient
    empty = ~vis.any(-1)  # [B, Lq]
    if empty.any():
        rows = empty[:, None, :, None].expand_as(got[0])
        assert (got[0][rows] == 0).all() and (got[1][rows] == 0).all()
    return got


# ------------------------------------------------------------- Triton vs reference (direct)


@triton_only
@pytest.mark.parametrize("name", PATTERNS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_triton_matches_reference(name, dtype):
    run_case(name, B=2, H=1, L=37, D=32, dtype=dtype)


@triton_only
@pytest.mark.parametrize("D", [64, 128])
def test_triton_head_dims(D):
    run_case("set_causal", B=1, H=1, L=37, D=D, dtype=torch.bfloat16, seed=D)


@triton_only
def test_triton_awkward_length_100():
    run_case("padded", B=1, H=2, L=100, D=32, dtype=torch.float16, block=32)


@triton_only
def test_triton_all_masked_rows_are_zero():
    # every query has rank 0 and no group: nothing is visible anywhere
    B, H, L, D = 1, 2, 20, 32
    q, k, v = (torch.randn(B, H, L, D, device=DEVICE, requires_grad=True) for _ in range(3))
    zero = torch.zeros(B, L, dtype=torch.long, device=DEVICE)
    from orderlab.kernels import set_attention_triton

    o = set_attention_triton(q, k, v, zero, zero, block_m=16, block_n=16)
    o.sum().backward()
    for t in (o, q.grad, k.grad, v.grad):
        assert torch.isfinite(t).all() and (t == 0).all()


@triton_only
def test_triton_decode_ragged_cache():
    """Queries of one step against a cache whose rows have different lengths (one empty)."""
    B, H, C, D, Lq = 3, 2, 45, 32, 5
    gen = torch.Generator().manual_seed(3)
    k_len = torch.tensor([45, 17, 0])
    cache_rank = torch.arange(1, C + 1).expand(B, C).clone()  # cached clean tokens, reveal order
    # this step's queries: rank = (row length + 1), each sees the whole live cache
    q_rank = (k_len + 1)[:, None].expand(B, Lq).clone()
    q = torch.randn(B, H, Lq, D, generator=gen)
    ck, cv = (torch.randn(B, H, C, D, generator=gen) for _ in range(2))
    junk = torch.arange(C)[None, None, :, None] >= k_len[:, None, None, None]
    ck, cv = (t.masked_fill(junk, 1e4) for t in (ck, cv))  # what lies past k_len must not matter
    args = [t.to(DEVICE) for t in (q, ck, cv, q_rank, cache_rank)]
    from orderlab.kernels import set_attention_triton

    got = set_attention_triton(*args, k_len=k_len.to(DEVICE), block_m=16, block_n=16)
    want = set_attention_reference(*args, k_len=k_len.to(DEVICE))
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    assert (got[2] == 0).all()
    # NaN junk past k_len never leaks in
    ck[:, :, 20:] = float("nan")
    cv[:, :, 20:] = float("nan")
    k_len2 = torch.tensor([20, 17, 0], device=DEVICE)
    got = set_attention_triton(q.to(DEVICE), ck.to(DEVICE), cv.to(DEVICE), args[3], args[4], k_len=k_len2, block_m=16, block_n=16)
    assert torch.isfinite(got).all()
    # gradients with a ragged cache (training on cached prefixes)
    run_case("set_causal", B=3, H=1, L=40, D=32, dtype=torch.float32, k_len=torch.tensor([40, 23, 5]))


# Long sequences at the launcher's own tiles and autotuned configs: on a GPU (run by
# ``benchmarks/gpu_check.py``) L up to 8192, D 64 and 128, fp32 / fp16 / bf16, every mask
# pattern; in the interpreter one tiny case per pattern keeps the path exercised.
ON_GPU = torch.cuda.is_available()
LONG = (512, 2048, 8192) if ON_GPU else (48,)
LONG_D = (64, 128) if ON_GPU else (64,)
LONG_DTYPES = (torch.float32, torch.float16, torch.bfloat16) if ON_GPU else (torch.bfloat16,)


@triton_only
@pytest.mark.parametrize("L", LONG)
@pytest.mark.parametrize("name", PATTERNS)
@pytest.mark.parametrize("D", LONG_D)
@pytest.mark.parametrize("dtype", LONG_DTYPES, ids=str)
def test_triton_long_sequences(L, name, D, dtype):
    run_case(name, B=1 if L > 2048 else 2, H=2, L=L, D=D, dtype=dtype, seed=L + D, block=None)


@triton_only
@pytest.mark.parametrize("L", LONG)
@pytest.mark.parametrize("D", LONG_D)
@pytest.mark.parametrize("dtype", LONG_DTYPES, ids=str)
def test_triton_long_ragged_cache(L, D, dtype):
    """16 queries of a decode step against a cache of L keys whose rows hold L, L/3 and 0
    live keys (the last row's queries see nothing: zeros)."""
    run_case("set_causal", B=3, H=2, L=L, D=D, dtype=dtype, seed=L, block=None, Lq=16,
             k_len=torch.tensor([L, L // 3, 0]))


@triton_only
def test_triton_append_kv_matches_reference():
    from orderlab.kernels import append_kv_triton

    B, H, C, N, D = 3, 2, 30, 7, 32
    gen = torch.Generator().manual_seed(4)
    for dtype in (torch.float32, torch.bfloat16):
        ck, cv = (torch.randn(B, H, C, D, generator=gen).to(DEVICE, dtype) for _ in range(2))
        kn, vn = (torch.randn(B, H, N, D, generator=gen).to(DEVICE, dtype) for _ in range(2))
        start = torch.tensor([0, 11, 25], device=DEVICE)
        count = torch.tensor([7, 0, 5], device=DEVICE)
        rk, rv = ck.clone(), cv.clone()
        append_kv_reference(rk, rv, kn, vn, start, count)
        append_kv_triton(ck, cv, kn, vn, start, count)
        assert torch.equal(ck, rk) and torch.equal(cv, rv)
    # strided (non-contiguous) new K/V, e.g. a slice of a projection
    kn2 = torch.randn(B, N, H, D, generator=gen).to(DEVICE).transpose(1, 2)
    ck, cv = torch.zeros(B, H, C, D, device=DEVICE), torch.zeros(B, H, C, D, device=DEVICE)
    rk, rv = ck.clone(), cv.clone()
    append_kv_reference(rk, rv, kn2, kn2, start, count)
    append_kv(ck, cv, kn2, kn2, start, count, backend="triton")
    assert torch.equal(ck, rk)


@triton_only
def test_triton_dispatch_override():
    q_rank, k_rank, _, _ = pattern("block_causal", 1, 24)
    q, k, v = (torch.randn(1, 1, 24, 32, device=DEVICE) for _ in range(3))
    masks = (q_rank.to(DEVICE), k_rank.to(DEVICE))
    want = set_attention(q, k, v, *masks, backend="reference")
    with use_backend("triton"):
        got = set_attention(q, k, v, *masks)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@triton_only
@pytest.mark.slow
@pytest.mark.parametrize("name", PATTERNS)
@pytest.mark.parametrize("L", [37, 100])
@pytest.mark.parametrize("D", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_triton_sweep(name, L, D, dtype):
    run_case(name, B=2, H=2, L=L, D=D, dtype=dtype, seed=L + D, block=16 if L < 64 else 32)


def test_triton_suite_in_interpreter(request):
    """Run every ``*triton*`` test above in a subprocess with TRITON_INTERPRET=1."""
    if TRITON_HERE:
        pytest.skip("Triton runs in this process; the tests above ran directly")
    markexpr = request.config.getoption("markexpr") or "not slow"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONDONTWRITEBYTECODE="1")
    env.pop("ORDERLAB_KERNELS", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", markexpr,
           "-k", "triton and not suite_in_interpreter", str(Path(__file__))]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"Triton tests failed under TRITON_INTERPRET=1:\n{tail}"
    assert " passed" in proc.stdout and " skipped" not in proc.stdout.splitlines()[-1], tail


# ----------------------------------------------------------- tile classification (no Triton)


def dense_tile_truth(q_rank, k_rank, q_group, k_group, k_len, bm, bn):
    """Ground truth from the dense mask: (any visible, all visible) per tile."""
    vis = visible(q_rank, k_rank, q_group, k_group)
    B, Lq, Lk = vis.shape
    if k_len is not None:
        vis = vis & (torch.arange(Lk)[None, None] < k_len[:, None, None])
    nQ, nK = -(-Lq // bm), -(-Lk // bn)
    pad = torch.zeros(B, nQ * bm, nK * bn, dtype=torch.bool)
    pad[:, :Lq, :Lk] = vis
    tiles = pad.view(B, nQ, bm, nK, bn)
    inside = torch.zeros_like(pad)
    inside[:, :Lq, :Lk] = True
    any_vis = tiles.any(4).any(2)
    all_vis = (tiles | ~inside.view(B, nQ, bm, nK, bn)).all(4).all(2)
    return any_vis, all_vis


@pytest.mark.parametrize("name", PATTERNS)
@pytest.mark.parametrize("block", [(16, 16), (32, 16), (16, 64)])
def test_tile_classes_are_safe(name, block):
    """Never skip a tile with a visible pair; never call a tile full that has a masked pair."""
    q_rank, k_rank, q_group, k_group = pattern(name, 3, 90, seed=5)
    k_len = torch.tensor([q_rank.shape[1], 41, 0])
    t = tile_lists(q_rank, k_rank, q_group, k_group, k_len, *block)
    any_vis, all_vis = dense_tile_truth(q_rank, k_rank, q_group, k_group, k_len, *block)
    assert not (t.skip & any_vis).any()
    assert not (t.full & ~all_vis).any()
    # the lists are the classification, compacted
    full_num, full_idx, mix_num, mix_idx = t.by_q
    assert torch.equal(full_num, t.full.sum(-1, dtype=torch.int32))
    for b, r in [(0, 0), (1, 2), (2, 1)]:
        assert torch.equal(full_idx[b, r, : full_num[b, r]].long(), t.full[b, r].nonzero().flatten())
        mixed = ~(t.full | t.skip)
        assert torch.equal(mix_idx[b, r, : mix_num[b, r]].long(), mixed[b, r].nonzero().flatten())


def test_tile_skip_fraction_set_causal():
    """Reveal-order layouts: the summaries find (almost) every empty tile.

    Clean stream alone (set-causal ~ causal): about half the tiles skipped. Two-stream
    [clean; query]: clean queries never see query keys and query keys are only seen by
    themselves, so about three quarters are skipped.
    """
    L, blk = 4096, 64
    ranks = torch.repeat_interleave(torch.arange(1, L + 1), torch.randint(1, 4, (L,), generator=torch.Generator().manual_seed(0)))[:L]
    ranks = ranks[None]  # [1, L], reveal order
    clean = tile_stats(ranks + 1, ranks, block_m=blk, block_n=blk)
    n = L // blk
    assert abs(clean["skip_fraction"] - (n - 1) / (2 * n)) < 0.02, clean
    assert clean["mixed"] <= 2 * n  # only the diagonal band needs mask arithmetic
    two = set_causal_two_stream(ranks)
    stats = tile_stats(*two, block_m=blk, block_n=blk)
    any_vis, _ = dense_tile_truth(*two, None, blk, blk)
    truly_empty = (~any_vis).float().mean().item()
    assert stats["skip_fraction"] == pytest.approx(truly_empty, abs=1e-9)
    assert 0.7 < stats["skip_fraction"] < 0.76, stats
    # positions laid out in position order, not reveal order: the rank-masked quarters
    # (clean keys) skip almost nothing, only the group structure of the query keys remains
    shuffled = pattern("set_causal_shuffled", 1, 2 * L)
    assert tile_stats(*shuffled, block_m=blk, block_n=blk)["skip_fraction"] < 0.5


# --------------------------------------------------------------------- dispatch (no Triton)


def test_dispatch_rules(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("ORDERLAB_KERNELS", raising=False)
    assert resolve_backend(None, torch.device("cuda")) == "triton"
    assert resolve_backend(None, cpu) == "reference"
    assert resolve_backend("reference", torch.device("cuda")) == "reference"
    assert resolve_backend(None, torch.device("cuda"), supported=False) == "reference"  # e.g. float64
    assert resolve_backend("triton", torch.device("cuda"), supported=False) == "triton"
    with use_backend("reference"):
        assert resolve_backend(None, torch.device("cuda")) == "reference"
        assert resolve_backend("triton", torch.device("cuda")) == "triton"  # keyword wins
    monkeypatch.setenv("ORDERLAB_KERNELS", "reference")
    assert resolve_backend(None, torch.device("cuda")) == "reference"
    with pytest.raises(ValueError, match="unknown kernel backend"):
        resolve_backend("cuda", cpu)
    if not interpreting():
        monkeypatch.setenv("ORDERLAB_KERNELS", "triton")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            resolve_backend(None, cpu)


def test_launcher_checks_give_clear_errors():
    from orderlab.kernels import set_attention_triton

    q = torch.randn(1, 1, 8, 32)
    r = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(TypeError, match="one dtype"):
        set_attention_triton(q.double(), q.double(), q.double(), r, r)
    with pytest.raises(ValueError, match=r"k and v must be"):
        set_attention_triton(q, q[..., :16], q, r, r)
    with pytest.raises(ValueError, match="q_rank must have shape"):
        set_attention_triton(q, q, q, r[:, :4], r)
    with pytest.raises(ValueError, match="k_len must be"):
        set_attention_triton(q, q, q, r, r, k_len=torch.tensor([1.0]))


def test_reference_path_of_public_aliases():
    """CPU tensors without overrides take the reference (what the model calls)."""
    q_rank, k_rank, q_group, k_group = pattern("set_causal", 2, 20)
    q, k, v = (torch.randn(2, 1, 20, 16) for _ in range(3))
    with use_backend(None):
        got = set_attention(q, k, v, q_rank, k_rank, q_group, k_group, backend="reference")
    torch.testing.assert_close(got, set_attention_reference(q, k, v, q_rank, k_rank, q_group, k_group))
    ck, cv = torch.zeros(2, 1, 10, 16), torch.zeros(2, 1, 10, 16)
    append_kv(ck, cv, q[:, :, :3], v[:, :, :3], torch.tensor([0, 4]), torch.tensor([3, 1]), backend="reference")
    assert torch.equal(ck[1, :, 4], q[1, :, 0]) and (ck[1, :, 5:] == 0).all()


# ------------------------------------------------------------------- benchmark helpers


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("bench_attention", ROOT / "benchmarks" / "attention.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_helpers_and_dry_run(capsys):
    bench = _load_benchmark()
    L = 48
    masks = bench.two_stream_masks(B=1, L=L)
    assert all(t.shape == (1, L) for t in masks)
    vis = visible(*masks)[0]  # [L, L]
    assert bench.visible_pairs(masks) == int(vis.sum())
    # the BlockMask mask_mod encodes the same rule
    mod = bench.make_mask_mod(*masks)
    i = torch.arange(L)[:, None].expand(L, L)
    j = torch.arange(L)[None, :].expand(L, L)
    zero = torch.zeros((), dtype=torch.long)
    assert torch.equal(mod(zero, zero, i, j), vis)
    assert bench.attention_flops(visible=1000, D=64, backward=False) == 4 * 1000 * 64
    assert bench.attention_flops(visible=1000, D=64, backward=True) == 3.5 * 4 * 1000 * 64
    bench.main(["--dry-run"])
    out = capsys.readouterr().out
    assert "dry run" in out.lower()


def test_benchmark_exits_clearly_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "attention.py")], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "CUDA" in proc.stderr + proc.stdout


# ------------------------------------------------------------- the model on the Triton path


@triton_only
@pytest.mark.parametrize("rule", ["set_causal", {"name": "block_causal", "block_size": 3}], ids=str)
def test_triton_model_likelihood_and_cached_decode_match_reference(rule):
    """The transformer end to end with the Triton kernels: the one-pass likelihood, its
    gradient and a cached greedy decode equal the reference backend's."""
    from orderlab.decoding import decode, score_order
    from orderlab.kernels import use_backend
    from orderlab.likelihood import log_likelihood
    from orderlab.builder import build

    torch.manual_seed(0)
    model = orderlab.build("model", "transformer", vocab_size=5, max_len=12, attention=rule, d_model=32, n_layers=1, n_heads=1).to(DEVICE)
    x = torch.randint(0, 5, (2, 12), device=DEVICE)
    ranks = torch.tensor([[0, 0, 1, 2, 2, 3, 4, 4, 5, 6, -1, -1], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]], device=DEVICE)
    out = {}
    for backend in ("reference", "triton"):
        model.zero_grad()
        with use_backend(backend):
            ll = log_likelihood(model, x, ranks)
            ll.sum().backward()
            inc = score_order(model, x, ranks, cache=True)
            dec = decode(model, build("policy", "top_prob"), x, torch.where(ranks > 0, 1, ranks), cache=True)
        out[backend] = (ll.detach(), [p.grad.clone() for p in model.parameters()], inc, dec)
    (ll_r, g_r, inc_r, dec_r), (ll_t, g_t, inc_t, dec_t) = out["reference"], out["triton"]
    torch.testing.assert_close(ll_t, ll_r, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(inc_t, ll_r, atol=1e-4, rtol=1e-4)
    for a, b in zip(g_t, g_r):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)
    assert torch.equal(dec_t.tokens, dec_r.tokens) and torch.equal(dec_t.ranks, dec_r.ranks)
