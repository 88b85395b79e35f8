"""Rank-masked flash attention: reference, tile summaries, Triton kernels, launcher,
autograd Function, public alias (the Triton tutorial's order).

The rule (DESIGN.md section 4): key ``j`` is visible to query ``i`` iff
``k_rank[j] < q_rank[i]`` or ``(q_group[i] >= 0 and k_group[j] == q_group[i])``, and
``j < k_len[b]`` when ``k_len`` is given (ragged KV-cache lengths). Queries with no visible
key return zeros (and get zero gradients), never NaN.

The Triton kernels follow FlashAttention-2 (Dao 2023, arXiv:2307.08691): online softmax
forward (Alg. 1) that keeps only the row max ``m`` and sum ``l``, and a backward that
recomputes ``P = exp(S - LSE)`` tile by tile (Alg. 2: one kernel for dK/dV over query tiles,
one for dQ over key tiles, so no atomics). Like FlexAttention's BlockMask, a cheap PyTorch
pre-pass classifies every (query tile, key tile) pair from per-tile min/max of the ranks and
groups as *skipped* (no visible pair), *full* (every pair visible: no mask arithmetic) or
*mixed*, and hands each program the compact list of its full and mixed tiles.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from .dispatch import interpreting, resolve_backend
from .specs import COMPILE_OPTIONS, TRITON_DTYPE, Spec, signature, unit_strides

__all__ = [
    "set_attention",
    "set_attention_reference",
    "set_attention_triton",
    "set_attention_sdpa",
    "RankMask",
    "visible",
    "visible_keys",
    "tile_stats",
    "TileLists",
    "tile_lists",
    "append_kv",
    "append_kv_reference",
]

_INT_MAX = 2**31 - 1
_INT_MIN = -(2**31)


# ----------------------------------------------------------------------------- reference


def visible(q_rank: Tensor, k_rank: Tensor, q_group: Tensor | None = None, k_group: Tensor | None = None) -> Tensor:
    """Bool ``[B, Lq, Lk]``: the visibility mask of the rule."""
    vis = k_rank[:, None, :] < q_rank[:, :, None]  # [B, Lq, Lk]
    if q_group is not None and k_group is not None:
        same = (k_group[:, None, :] == q_group[:, :, None]) & (q_group[:, :, None] >= 0)
        vis = vis | same
    return vis


def visible_keys(q_rank: Tensor, k_rank: Tensor, q_group: Tensor | None = None, k_group: Tensor | None = None,
                 k_len: Tensor | None = None) -> Tensor:
    """Bool ``[B, 1, Lq, Lk]``: :func:`visible` and ``j < k_len[b]``, with a head axis (SDPA's
    ``attn_mask`` layout, broadcast over heads)."""
    vis = visible(q_rank, k_rank, q_group, k_group)  # [B, Lq, Lk]
    if k_len is not None:  # ragged cache: keys at or past k_len[b] do not exist
        vis = vis & (torch.arange(k_rank.shape[1], device=k_rank.device)[None, None, :] < k_len[:, None, None])
    return vis[:, None]  # [B, 1, Lq, Lk]


def _check(q: Tensor, k: Tensor, v: Tensor, q_rank: Tensor, k_rank: Tensor, q_group, k_group, k_len=None) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, H, L, D]; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    B, H, Lq, D = q.shape
    if k.shape[:2] != (B, H) or k.shape[3] != D or v.shape != k.shape:
        raise ValueError(f"k and v must be [B={B}, H={H}, Lk, D={D}]; got k {tuple(k.shape)}, v {tuple(v.shape)}")
    Lk = k.shape[2]
    for name, t, n in (("q_rank", q_rank, Lq), ("k_rank", k_rank, Lk), ("q_group", q_group, Lq), ("k_group", k_group, Lk)):
        if t is None:
            continue
        if t.shape != (B, n):
            raise ValueError(f"{name} must have shape [B={B}, {n}], got {tuple(t.shape)}")
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
    if (q_group is None) != (k_group is None):
        raise ValueError("give both q_group and k_group, or neither")
    if k_len is not None:
        if k_len.shape != (B,) or k_len.dtype.is_floating_point or k_len.dtype == torch.bool:
            raise ValueError(f"k_len must be an integer tensor of shape [B={B}], got {k_len.dtype} {tuple(k_len.shape)}")


def set_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_rank: Tensor,
    k_rank: Tensor,
    q_group: Tensor | None = None,
    k_group: Tensor | None = None,
    scale: float | None = None,
    k_len: Tensor | None = None,
) -> Tensor:
    """Plain PyTorch rank-masked attention (materialises the ``[B, H, Lq, Lk]`` scores).

    Computed in float32 for half inputs (float64 stays float64), returned in the input dtype.
    """
    _check(q, k, v, q_rank, k_rank, q_group, k_group, k_len)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    vis = visible_keys(q_rank, k_rank, q_group, k_group, k_len)  # [B, 1, Lq, Lk]
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf, vf = (t.to(work) for t in (q, k, v))
    s = torch.einsum("bhqd,bhkd->bhqk", qf, kf) * scale  # [B, H, Lq, Lk]
    # a finite fill keeps gradients finite for rows with no visible key
    s = s.masked_fill(~vis, torch.finfo(s.dtype).min)
    p = torch.softmax(s, dim=-1) * vis  # rows with no visible key become all zeros
    o = torch.einsum("bhqk,bhkd->bhqd", p, vf)
    return o.to(q.dtype)


def set_attention_sdpa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_rank: Tensor | None = None,
    k_rank: Tensor | None = None,
    q_group: Tensor | None = None,
    k_group: Tensor | None = None,
    scale: float | None = None,
    k_len: Tensor | None = None,
    *,
    mask: Tensor | None = None,
) -> Tensor:
    """The rule through ``F.scaled_dot_product_attention`` with a boolean ``attn_mask``.

    ``mask``: Bool ``[B, 1, Lq, Lk]`` from :func:`visible_keys`, when the caller built it once
    for several calls (every layer of one forward); otherwise it is built from the ranks.
    SDPA returns zeros (and zero gradients) for rows with no visible key, like the reference
    (``tests/test_attention_sdpa.py``). Runs in the input dtype.
    """
    if mask is None:
        _check(q, k, v, q_rank, k_rank, q_group, k_group, k_len)
        mask = visible_keys(q_rank, k_rank, q_group, k_group, k_len)
    elif mask.dtype != torch.bool or mask.shape != (q.shape[0], 1, q.shape[2], k.shape[2]):
        raise ValueError(f"mask must be Bool[B, 1, Lq, Lk] = {(q.shape[0], 1, q.shape[2], k.shape[2])}, got {mask.dtype} {tuple(mask.shape)}")
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


class RankMask:
    """The rule's visibility for one forward, built once and read by every layer.

    Holds the ranks, groups and ``k_len`` of one forward; ``attend(q, k, v)`` runs the
    backend :func:`~orderlab.kernels.dispatch.resolve_backend` picks with ``fallback="sdpa"``:
    Triton on CUDA (from the ranks, skipping tiles), else SDPA with the boolean mask, which
    is built on first use and shared by the later layers (the reference path built it per
    layer), or the reference when asked for (``use_backend("reference")``). The SDPA path
    also skips the block of scores no query sees (:attr:`split`): two calls, same result.
    """

    def __init__(self, q_rank: Tensor, k_rank: Tensor, q_group: Tensor | None = None, k_group: Tensor | None = None,
                 k_len: Tensor | None = None, backend: str | None = None):
        self.q_rank, self.k_rank, self.q_group, self.k_group, self.k_len = q_rank, k_rank, q_group, k_group, k_len
        self.backend = backend
        self._mask: Tensor | None = None

    SPLIT_MIN = 0.1  # split only when that skips at least this fraction of the scores ...
    SPLIT_MIN_QUERIES = 64  # ... and there are this many queries

    @property
    def mask(self) -> Tensor:
        """Bool ``[B, 1, Lq, Lk]`` (:func:`visible_keys`)."""
        if self._mask is None:
            self._mask = visible_keys(self.q_rank, self.k_rank, self.q_group, self.k_group, self.k_len)
        return self._mask

    @property
    def split(self) -> tuple[int, int] | None:
        """``(s, e)``: queries ``[0, s)`` see no key at or past ``e`` in any row, chosen to
        skip the most score entries; None when that skips under ``SPLIT_MIN`` of them. The
        two-stream training layout ``[clean | noisy]`` splits at ``(L, L)``: clean queries
        never see the noisy stream, a quarter of the ``2L x 2L`` scores. Eager only (under
        ``torch.compile`` the data-dependent split would break the graph)."""
        return None if self._cut is None else self._cut[:2]

    @functools.cached_property
    def _cut(self) -> tuple[int, int, Tensor, Tensor] | None:
        """``(s, e, head mask, tail mask)`` of :attr:`split`, the masks sliced once for every layer."""
        if self.q_rank.shape[1] < self.SPLIT_MIN_QUERIES:
            return None  # a decode step's few queries: not worth the search
        m = self.mask.any(0)[0]  # [Lq, Lk]: visible in some row
        Lq, Lk = m.shape
        ends = torch.where(m, torch.arange(1, Lk + 1, device=m.device), 0).amax(-1).cummax(0).values  # [Lq]
        rows = torch.arange(1, Lq + 1, device=m.device)  # s = 1 .. Lq
        cost = rows * ends.clamp_min(1) + (Lq - rows) * Lk  # score entries with the split at s
        best = int(cost.argmin())
        if Lq * Lk - int(cost[best]) < self.SPLIT_MIN * Lq * Lk or best + 1 >= Lq:
            return None
        s, e = best + 1, max(int(ends[best]), 1)
        return s, e, self.mask[:, :, :s, :e].contiguous(), self.mask[:, :, s:].contiguous()

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """``[B, H, Lq, D]``: attention of ``q [B, H, Lq, D]`` over ``k, v [B, G, Lk, D]``.
        ``G < H`` is grouped-query attention (Ainslie et al. 2023): K/V head ``g`` serves query
        heads ``g * H/G .. (g + 1) * H/G - 1``, expanded here for every backend."""
        if k.shape[1] != q.shape[1]:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        supported = q.dtype in _DTYPES and q.shape[-1] <= 256
        backend = resolve_backend(self.backend, q.device, supported, fallback="sdpa")
        if backend != "sdpa":
            return set_attention(q, k, v, self.q_rank, self.k_rank, self.q_group, self.k_group, k_len=self.k_len,
                                 backend=backend)
        cut = None if torch.compiler.is_compiling() else self._cut
        if cut is None:
            return set_attention_sdpa(q, k, v, mask=self.mask)
        s, e, head, tail = cut
        return torch.cat([set_attention_sdpa(q[:, :, :s], k[:, :, :e], v[:, :, :e], mask=head),
                          set_attention_sdpa(q[:, :, s:], k, v, mask=tail)], 2)


# ------------------------------------------------------------------ tile summaries (pre-pass)


def _tile_reduce(x: Tensor, block: int, fill: int, op) -> Tensor:
    """``op`` (amin/amax) of ``x [B, L]`` over tiles of ``block`` columns -> ``[B, ceil(L/block)]``."""
    B, L = x.shape
    n = triton.cdiv(L, block)
    pad = torch.full((B, n * block - L), fill, dtype=x.dtype, device=x.device)
    return op(torch.cat([x, pad], 1).view(B, n, block), dim=-1)  # [B, n]


def tile_classes(
    q_rank: Tensor,
    k_rank: Tensor,
    q_group: Tensor | None,
    k_group: Tensor | None,
    k_end: Tensor,
    block_m: int,
    block_n: int,
) -> tuple[Tensor, Tensor]:
    """(``full``, ``skip``) Bool ``[B, nQ, nK]`` for every (query tile, key tile) pair.

    Conservative: a pair is *skipped* only if no (i, j) in it can be visible, and *full* only
    if every (i, j) is visible and the key tile lies wholly before ``k_end[b]``; the rest are
    mixed and masked element-wise. ``k_end[b] = min(Lk, k_len[b])``.
    """
    qr = q_rank.to(torch.int64)
    kr = k_rank.to(torch.int64)
    qr_min = _tile_reduce(qr, block_m, _INT_MAX, torch.amin)[:, :, None]  # [B, nQ, 1]
    qr_max = _tile_reduce(qr, block_m, _INT_MIN, torch.amax)[:, :, None]
    kr_min = _tile_reduce(kr, block_n, _INT_MAX, torch.amin)[:, None, :]  # [B, 1, nK]
    kr_max = _tile_reduce(kr, block_n, _INT_MIN, torch.amax)[:, None, :]
    rank_none = kr_min >= qr_max  # no key ranks below any query rank
    rank_all = kr_max < qr_min  # every key rank below every query rank
    if q_group is not None:
        qg = q_group.to(torch.int64)
        kg = k_group.to(torch.int64)
        has = qg >= 0
        # group ranges over queries that have a group (those with -1 see no group)
        qg_lo = _tile_reduce(torch.where(has, qg, _INT_MAX), block_m, _INT_MAX, torch.amin)[:, :, None]
        qg_hi = _tile_reduce(torch.where(has, qg, _INT_MIN), block_m, _INT_MIN, torch.amax)[:, :, None]
        q_neg = _tile_reduce((~has).to(torch.int64), block_m, 0, torch.amax)[:, :, None] > 0
        kg_lo = _tile_reduce(kg, block_n, _INT_MAX, torch.amin)[:, None, :]
        kg_hi = _tile_reduce(kg, block_n, _INT_MIN, torch.amax)[:, None, :]
        grp_any = (qg_lo <= kg_hi) & (kg_lo <= qg_hi)  # empty q range (lo > hi) gives False
        grp_all = ~q_neg & (qg_lo == qg_hi) & (kg_lo == kg_hi) & (kg_lo == qg_lo)
    else:
        grp_any = grp_all = torch.zeros((), dtype=torch.bool, device=q_rank.device)
    nK = kr_min.shape[-1]
    start = torch.arange(nK, device=k_rank.device)[None, None, :] * block_n  # [1, 1, nK]
    end_b = k_end.to(torch.int64)[:, None, None]  # [B, 1, 1]
    skip = (rank_none & ~grp_any) | (start >= end_b)
    full = ~skip & (rank_all | grp_all) & (start + block_n <= end_b)
    return full, skip


def _lists(full: Tensor, skip: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Compact per-row tile lists: ``(full_num [B,R], full_idx [B,R,C], mixed_num, mixed_idx)``.

    ``idx[b, r, :num[b, r]]`` are the column tiles of that kind, in increasing order.
    """
    mixed = ~(full | skip)
    out = []
    for sel in (full, mixed):
        num = sel.sum(-1, dtype=torch.int32)  # [B, R]
        # stable sort on "not selected" puts the selected columns first, in order
        idx = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True).to(torch.int32)  # [B, R, C]
        out += [num.contiguous(), idx.contiguous()]
    return tuple(out)  # type: ignore[return-value]


class TileLists:
    """The pre-pass result the kernels read: tile lists by query tile (forward, dQ) and by
    key tile (dK/dV)."""

    def __init__(self, full: Tensor, skip: Tensor, block_m: int, block_n: int):
        self.block_m, self.block_n = block_m, block_n
        self.full, self.skip = full, skip  # [B, nQ, nK]
        self.by_q = _lists(full, skip)
        self._by_k: tuple[Tensor, ...] | None = None

    @property
    def by_k(self) -> tuple[Tensor, ...]:
        if self._by_k is None:  # only the backward needs it
            self._by_k = _lists(self.full.transpose(1, 2), self.skip.transpose(1, 2))
        return self._by_k

    def stats(self) -> dict:
        total = self.full.numel()
        skipped = int(self.skip.sum())
        full = int(self.full.sum())
        return {
            "tiles": total,
            "skipped": skipped,
            "full": full,
            "mixed": total - skipped - full,
            "skip_fraction": skipped / max(total, 1),
            "full_fraction": full / max(total, 1),
        }


def _k_end(k_len: Tensor | None, B: int, Lk: int, device) -> Tensor:
    if k_len is None:
        return torch.full((B,), Lk, dtype=torch.int32, device=device)
    return k_len.clamp(0, Lk).to(torch.int32).contiguous()


def tile_lists(
    q_rank: Tensor,
    k_rank: Tensor,
    q_group: Tensor | None = None,
    k_group: Tensor | None = None,
    k_len: Tensor | None = None,
    block_m: int = 64,
    block_n: int = 64,
) -> TileLists:
    """Run the tile pre-pass alone (ranks/groups ``[B, L]``; no q/k/v needed)."""
    B, Lk = k_rank.shape
    return TileLists(*tile_classes(q_rank, k_rank, q_group, k_group, _k_end(k_len, B, Lk, k_rank.device), block_m, block_n), block_m, block_n)


def tile_stats(
    q_rank: Tensor,
    k_rank: Tensor,
    q_group: Tensor | None = None,
    k_group: Tensor | None = None,
    k_len: Tensor | None = None,
    block_m: int = 64,
    block_n: int = 64,
) -> dict:
    """How the pre-pass classifies the (query tile, key tile) pairs of this mask:
    ``{"tiles", "skipped", "full", "mixed", "skip_fraction", "full_fraction"}``."""
    return tile_lists(q_rank, k_rank, q_group, k_group, k_len, block_m, block_n).stats()


# ------------------------------------------------------------------ launch configurations

_BLOCK_M = (16, 32, 64)  # query tiles: decode's few queries are not padded to 64
_BLOCK_N = 64
HEAD_DIMS = (32, 64, 96, 128, 256)  # head dims compiled ahead of time (any D <= 256 runs)


def _max_block(D: int, dtype: torch.dtype) -> int:
    """Largest tile side (the training tile; docs/benchmarks.md, "Ahead-of-time
    compilation"). Half precision: 64 up to D 128, 32 above (64-row tiles at D 256 spill
    and need 258 KB of shared memory for dK/dV on sm_100). fp32 (3xTF32: three dots and a
    hi/lo split per product): 32 up to D 64, 16 above (64-row tiles at D 64 spill 2-44 KB
    per thread, 32-row tiles at D 128 still 16-1000 B; D 256 at 32 needs 192 KB of shared
    memory, over A100's 163 KB)."""
    if dtype == torch.float32:
        return 32 if D <= 64 else 16
    return 64 if D <= 128 else 32


def _default_blocks(Lq: int, D: int, dtype: torch.dtype = torch.bfloat16) -> tuple[int, int]:
    top = _max_block(D, dtype)
    block_m = min(top, max(_BLOCK_M[0], triton.next_power_of_2(Lq)))
    return block_m, min(_BLOCK_N, top)


# (num_warps, num_stages) pairs each kernel's autotuner tries at the training tile
# (:func:`_max_block`), by (kernel, bytes per element, largest head dim), in increasing head
# dim: chosen from the ahead-of-time sweep (``benchmarks/aot_sweep.py``; docs/benchmarks.md,
# "Choosing the launch configurations"): no register spills on sm_80 or sm_90, then the
# most resident warps per SM; at most two per case, so autotuning costs two timings per shape.
_TUNED = {
    ("_fwd_kernel", 2, 64): ((4, 2), (8, 2)),
    ("_fwd_kernel", 2, 128): ((4, 1), (8, 2)),
    ("_fwd_kernel", 2, 256): ((4, 2), (8, 2)),
    ("_bwd_dq_kernel", 2, 64): ((4, 2), (8, 1)),
    ("_bwd_dq_kernel", 2, 128): ((4, 1), (8, 2)),
    ("_bwd_dq_kernel", 2, 256): ((4, 2), (8, 1)),
    ("_bwd_dkdv_kernel", 2, 64): ((4, 2), (8, 2)),
    ("_bwd_dkdv_kernel", 2, 128): ((8, 2), (8, 3)),
    ("_bwd_dkdv_kernel", 2, 256): ((8, 1), (8, 2)),
    ("_fwd_kernel", 4, 64): ((4, 1), (4, 2)),
    ("_bwd_dq_kernel", 4, 64): ((4, 1), (4, 2)),
    ("_bwd_dkdv_kernel", 4, 64): ((4, 2), (8, 1)),
    ("_fwd_kernel", 4, 128): ((4, 2), (4, 3)),
    ("_bwd_dq_kernel", 4, 128): ((4, 1), (4, 2)),
    ("_bwd_dkdv_kernel", 4, 128): ((4, 1), (4, 2)),
    ("_fwd_kernel", 4, 256): ((8, 1), (8, 2)),
    # fp32 backward at D 256 spills at every config (16-row tiles are tl.dot's smallest):
    # the least, 456 B (dQ) and 860 B (dK/dV) per thread
    ("_bwd_dq_kernel", 4, 256): ((8, 1),),
    ("_bwd_dkdv_kernel", 4, 256): ((8, 1),),
}
# query tiles below the training tile (decode's few queries): one config, no tuning
_SMALL_TILE = ((4, 2),)


def launch_configs(kernel: str, D: int, dtype: torch.dtype, block_m: int) -> tuple[tuple[int, int], ...]:
    """The ``(num_warps, num_stages)`` pairs ``kernel``'s autotuner tries for this launch."""
    if block_m < _max_block(D, dtype):
        return _SMALL_TILE
    width = torch.finfo(dtype).bits // 8
    for (name, w, dmax), configs in _TUNED.items():
        if name == kernel and w == width and D <= dmax:
            return configs
    raise KeyError(f"no launch configuration for {kernel} at {dtype}, D={D}, BLOCK_M={block_m}")


def _prune(kernel: str, configs, nargs, **kwargs):
    """``early_config_prune``: of every config, those :func:`launch_configs` lists for this launch."""
    keep = launch_configs(kernel, kwargs["D"], nargs["Q"].dtype, kwargs["BLOCK_M"])
    return [c for c in configs if (c.num_warps, c.num_stages) in keep]


def _autotuned(kernel):
    """``kernel`` autotuned over its :data:`_TUNED` configs, once per tile shape and dtype
    (the key; sequence lengths are not in it, so a decode does not re-tune every step)."""
    name = kernel.fn.__name__  # the @triton.jit function's Python function
    pairs = sorted({c for (k, *_), cs in _TUNED.items() if k == name for c in cs} | set(_SMALL_TILE))
    configs = [triton.Config({}, num_warps=w, num_stages=st) for w, st in pairs]
    return triton.autotune(configs, key=["D", "BLOCK_M", "BLOCK_N", "HAS_GROUP"],
                           prune_configs_by={"early_config_prune": functools.partial(_prune, name)})(kernel)


# ------------------------------------------------------------------------------ kernels


@triton.jit
def _mm(a, b, F32_DOT: tl.constexpr, PREC: tl.constexpr):
    # Triton's CPU interpreter gets bf16 tl.dot wrong; there we multiply in fp32.
    if F32_DOT:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b, input_precision=PREC)
    return c


@triton.jit
def _rtne(x, EMULATE: tl.constexpr):
    """fp32 ``x`` rounded to the nearest bf16 value (kept in fp32). GPUs round to nearest
    even on ``.to(tl.bfloat16)``; Triton's CPU interpreter truncates, which biases sums."""
    if EMULATE:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        x = bits.to(tl.float32, bitcast=True)
    return x


@triton.jit
def _visible(qr, qg, kr_ptr, kg_ptr, offs_n, k_end, HAS_GROUP: tl.constexpr):
    """Bool [BLOCK_M, BLOCK_N] of the rule for one mixed tile."""
    live = offs_n < k_end
    kr = tl.load(kr_ptr + offs_n, mask=live, other=0)
    vis = kr[None, :] < qr[:, None]
    if HAS_GROUP:
        kg = tl.load(kg_ptr + offs_n, mask=live, other=-1)
        vis = vis | ((qg[:, None] >= 0) & (kg[None, :] == qg[:, None]))
    return vis & live[None, :]


@triton.jit
def _fwd_tiles(
    acc, l_i, m_i, q, qr, qg,
    k_base, v_base, kr_ptr, kg_ptr, idx_ptr, num,
    stride_kn, stride_kd, stride_vn, stride_vd, Lk, k_end, qk_scale,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, HAS_GROUP: tl.constexpr, F32_DOT: tl.constexpr, PREC: tl.constexpr, RTNE: tl.constexpr,
):
    offs_d = tl.arange(0, BLOCK_D)
    for t in range(0, num):
        kb = tl.load(idx_ptr + t)
        offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
        # keys past k_end (ragged cache) may hold anything, even NaN: never load them
        kv_mask = (offs_n[:, None] < k_end) & (offs_d[None, :] < D)
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        s = _mm(q, tl.trans(k), F32_DOT, PREC) * qk_scale  # [BM, BN], log2 units
        if MASKED:
            vis = _visible(qr, qg, kr_ptr, kg_ptr, offs_n, k_end, HAS_GROUP)
            s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # rows that have seen no visible key yet keep m = -inf; subtract 0 there (no NaN)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _mm(_rtne(p, RTNE).to(v.dtype), v, F32_DOT, PREC)
        m_i = m_new
    return acc, l_i, m_i


@_autotuned
@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, QR, KR, QG, KG, KEND,
    FULL_NUM, FULL_IDX, MIX_NUM, MIX_IDX,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    H, Lq, Lk, nQ, nK, qk_scale,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_GROUP: tl.constexpr, F32_DOT: tl.constexpr, PREC: tl.constexpr, RTNE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = (offs_m[:, None] < Lq) & (offs_d[None, :] < D)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=q_mask, other=0.0)
    qr = tl.load(QR + b * Lq + offs_m, mask=offs_m < Lq, other=0)
    qg = qr  # unused without groups
    if HAS_GROUP:
        qg = tl.load(QG + b * Lq + offs_m, mask=offs_m < Lq, other=-1)
    k_end = tl.load(KEND + b)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    kr_ptr = KR + b * Lk
    kg_ptr = KG + b * Lk

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    row = b * nQ + pid_m
    acc, l_i, m_i = _fwd_tiles(
        acc, l_i, m_i, q, qr, qg, k_base, v_base, kr_ptr, kg_ptr, FULL_IDX + row * nK, tl.load(FULL_NUM + row),
        stride_kn, stride_kd, stride_vn, stride_vd, Lk, k_end, qk_scale,
        D, BLOCK_D, BLOCK_N, False, HAS_GROUP, F32_DOT, PREC, RTNE,
    )
    acc, l_i, m_i = _fwd_tiles(
        acc, l_i, m_i, q, qr, qg, k_base, v_base, kr_ptr, kg_ptr, MIX_IDX + row * nK, tl.load(MIX_NUM + row),
        stride_kn, stride_kd, stride_vn, stride_vd, Lk, k_end, qk_scale,
        D, BLOCK_D, BLOCK_N, True, HAS_GROUP, F32_DOT, PREC, RTNE,
    )
    has = l_i > 0.0
    o = acc / tl.where(has, l_i, 1.0)[:, None]  # rows with no visible key: acc = 0 -> o = 0
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od, _rtne(o, RTNE).to(O.dtype.element_ty), mask=q_mask)
    # log-sum-exp in log2 units; +inf for empty rows makes exp2(s - lse) = 0 in the backward
    lse = tl.where(has, m_i + tl.math.log2(tl.where(has, l_i, 1.0)), float("inf"))
    tl.store(LSE + pid_bh * Lq + offs_m, lse, mask=offs_m < Lq)


@triton.jit
def _bwd_dq_tiles(
    dq, q, do, lse, delta, qr, qg,
    k_base, v_base, kr_ptr, kg_ptr, idx_ptr, num,
    stride_kn, stride_kd, stride_vn, stride_vd, Lk, k_end, qk_scale,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, HAS_GROUP: tl.constexpr, F32_DOT: tl.constexpr, PREC: tl.constexpr, RTNE: tl.constexpr,
):
    offs_d = tl.arange(0, BLOCK_D)
    for t in range(0, num):
        kb = tl.load(idx_ptr + t)
        offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
        # keys past k_end (ragged cache) may hold anything, even NaN: never load them
        kv_mask = (offs_n[:, None] < k_end) & (offs_d[None, :] < D)
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        s = _mm(q, tl.trans(k), F32_DOT, PREC) * qk_scale
        p = tl.math.exp2(s - lse[:, None])  # [BM, BN]
        if MASKED:
            vis = _visible(qr, qg, kr_ptr, kg_ptr, offs_n, k_end, HAS_GROUP)
            p = tl.where(vis, p, 0.0)
        dp = _mm(do, tl.trans(v), F32_DOT, PREC)
        ds = p * (dp - delta[:, None])
        dq += _mm(_rtne(ds, RTNE).to(k.dtype), k, F32_DOT, PREC)
    return dq


@_autotuned
@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, QR, KR, QG, KG, KEND,
    FULL_NUM, FULL_IDX, MIX_NUM, MIX_IDX,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    H, Lq, Lk, nQ, nK, qk_scale, sm_scale,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_GROUP: tl.constexpr, F32_DOT: tl.constexpr, PREC: tl.constexpr, RTNE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = (offs_m[:, None] < Lq) & (offs_d[None, :] < D)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=q_mask, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=q_mask, other=0.0)
    lse = tl.load(LSE + pid_bh * Lq + offs_m, mask=offs_m < Lq, other=float("inf"))
    delta = tl.load(DELTA + pid_bh * Lq + offs_m, mask=offs_m < Lq, other=0.0)
    qr = tl.load(QR + b * Lq + offs_m, mask=offs_m < Lq, other=0)
    qg = qr
    if HAS_GROUP:
        qg = tl.load(QG + b * Lq + offs_m, mask=offs_m < Lq, other=-1)
    k_end = tl.load(KEND + b)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    kr_ptr = KR + b * Lk
    kg_ptr = KG + b * Lk
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    row = b * nQ + pid_m
    dq = _bwd_dq_tiles(
        dq, q, do, lse, delta, qr, qg, k_base, v_base, kr_ptr, kg_ptr, FULL_IDX + row * nK, tl.load(FULL_NUM + row),
        stride_kn, stride_kd, stride_vn, stride_vd, Lk, k_end, qk_scale,
        D, BLOCK_D, BLOCK_N, False, HAS_GROUP, F32_DOT, PREC, RTNE,
    )
    dq = _bwd_dq_tiles(
        dq, q, do, lse, delta, qr, qg, k_base, v_base, kr_ptr, kg_ptr, MIX_IDX + row * nK, tl.load(MIX_NUM + row),
        stride_kn, stride_kd, stride_vn, stride_vd, Lk, k_end, qk_scale,
        D, BLOCK_D, BLOCK_N, True, HAS_GROUP, F32_DOT, PREC, RTNE,
    )
    dq = dq * sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd, _rtne(dq, RTNE).to(DQ.dtype.element_ty), mask=q_mask)


@triton.jit
def _bwd_dkdv_tiles(
    dk, dv, k, v, offs_n, k_live, kr, kg,
    q_base, do_base, lse_ptr, delta_ptr, qr_ptr, qg_ptr, idx_ptr, num,
    stride_qm, stride_qd, stride_dom, stride_dod, Lq, qk_scale,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    MASKED: tl.constexpr, HAS_GROUP: tl.constexpr, F32_DOT: tl.constexpr, PREC: tl.constexpr, RTNE: tl.constexpr,
):
    offs_d = tl.arange(0, BLOCK_D)
    for t in range(0, num):
        qb = tl.load(idx_ptr + t)
        offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
        m_live = offs_m < Lq
        q_mask = m_live[:, None] & (offs_d[None, :] < D)
        q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=q_mask, other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=q_mask, other=0.0)
        lse = tl.load(lse_ptr + offs_m, mask=m_live, other=float("inf"))
        delta = tl.load(delta_ptr + offs_m, mask=m_live, other=0.0)
        sT = _mm(k, tl.trans(q), F32_DOT, PREC) * qk_scale  # [BN, BM]
        pT = tl.math.exp2(sT - lse[None, :])
        if MASKED:
            qr = tl.load(qr_ptr + offs_m, mask=m_live, other=0)
            visT = kr[:, None] < qr[None, :]
            if HAS_GROUP:
                qg = tl.load(qg_ptr + offs_m, mask=m_live, other=-1)
                visT = visT | ((qg[None, :] >= 0) & (kg[:, None] == qg[None, :]))
            visT = visT & k_live[:, None]
            pT = tl.where(visT, pT, 0.0)
        dv += _mm(_rtne(pT, RTNE).to(do.dtype), do, F32_DOT, PREC)
        dpT = _mm(v, tl.trans(do), F32_DOT, PREC)  # [BN, BM]
        dsT = pT * (dpT - delta[None, :])
        dk += _mm(_rtne(dsT, RTNE).to(q.dtype), q, F32_DOT, PREC)
    return dk, dv


@_autotuned
@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, QR, KR, QG, KG, KEND,
    FULL_NUM, FULL_IDX, MIX_NUM, MIX_IDX,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    H, Lq, Lk, nQ, nK, qk_scale, sm_scale,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_GROUP: tl.constexpr, F32_DOT: tl.constexpr, PREC: tl.constexpr, RTNE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_in = offs_n < Lk
    k_live = offs_n < tl.load(KEND + b)  # k_end <= Lk
    kv_mask = n_in[:, None] & (offs_d[None, :] < D)
    live_mask = k_live[:, None] & (offs_d[None, :] < D)
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=live_mask, other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=live_mask, other=0.0)
    kr = tl.load(KR + b * Lk + offs_n, mask=n_in, other=0)
    kg = kr
    if HAS_GROUP:
        kg = tl.load(KG + b * Lk + offs_n, mask=n_in, other=-1)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    row = b * nK + pid_n
    dk, dv = _bwd_dkdv_tiles(
        dk, dv, k, v, offs_n, k_live, kr, kg, q_base, do_base, LSE + pid_bh * Lq, DELTA + pid_bh * Lq,
        QR + b * Lq, QG + b * Lq, FULL_IDX + row * nQ, tl.load(FULL_NUM + row),
        stride_qm, stride_qd, stride_dom, stride_dod, Lq, qk_scale,
        D, BLOCK_D, BLOCK_M, False, HAS_GROUP, F32_DOT, PREC, RTNE,
    )
    dk, dv = _bwd_dkdv_tiles(
        dk, dv, k, v, offs_n, k_live, kr, kg, q_base, do_base, LSE + pid_bh * Lq, DELTA + pid_bh * Lq,
        QR + b * Lq, QG + b * Lq, MIX_IDX + row * nQ, tl.load(MIX_NUM + row),
        stride_qm, stride_qd, stride_dom, stride_dod, Lq, qk_scale,
        D, BLOCK_D, BLOCK_M, True, HAS_GROUP, F32_DOT, PREC, RTNE,
    )
    dk = dk * sm_scale
    tl.store(DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd, _rtne(dk, RTNE).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd, _rtne(dv, RTNE).to(DV.dtype.element_ty), mask=kv_mask)


# ----------------------------------------------------------------------------- launcher

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634


def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def _launch_check(q, k, v, q_rank, k_rank, q_group, k_group, k_len, block_m, block_n) -> None:
    _check(q, k, v, q_rank, k_rank, q_group, k_group, k_len)
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"Triton set_attention takes q, k, v all of one dtype in {_DTYPES}; got {q.dtype}, {k.dtype}, {v.dtype}")
    devs = {t.device for t in (q, k, v, q_rank, k_rank, q_group, k_group, k_len) if t is not None}
    if len(devs) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devs))}")
    if q.shape[-1] > 256:
        raise ValueError(f"Triton set_attention supports head dims up to 256, got {q.shape[-1]}")
    for name, blk in (("block_m", block_m), ("block_n", block_n)):
        if blk < 16 or blk & (blk - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {blk}")


def _int32(t: Tensor) -> Tensor:
    if t.dtype != torch.int32:
        t = t.clamp(_INT_MIN, _INT_MAX).to(torch.int32)
    return t.contiguous()


def _prep(q, k, q_rank, k_rank, q_group, k_group, k_len, block_m, block_n):
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    # the kernels compare int32; clamping keeps the order of anything int64 callers pass
    qr, kr = (_int32(t) for t in (q_rank, k_rank))
    has_group = q_group is not None
    qg = _int32(q_group) if has_group else qr
    kg = _int32(k_group) if has_group else kr
    k_end = _k_end(k_len, B, Lk, q.device)
    tiles = TileLists(*tile_classes(qr, kr, qg if has_group else None, kg if has_group else None, k_end, block_m, block_n), block_m, block_n)
    return qr, kr, qg, kg, k_end, has_group, tiles


def _precision(dtype: torch.dtype, interpret: bool | None = None) -> dict:
    """The precision constexprs; ``interpret=False`` gives the GPU's (ahead-of-time compiles)."""
    interpret = interpreting() if interpret is None else interpret
    return {
        "F32_DOT": interpret,  # the interpreter's bf16 tl.dot is wrong; fp32 there is exact anyway
        # fp32 inputs: 3xTF32 (a*b ~ ah*bh + ah*bl + al*bh on tensor cores), fp32's accuracy
        # without a silent TF32 rounding; "ieee" dots run on FMA units and spill 10-27 KB
        # per thread at 64-row tiles (docs/benchmarks.md, "Ahead-of-time compilation")
        "PREC": "tf32x3" if dtype == torch.float32 else "tf32",
        "RTNE": interpret and dtype == torch.bfloat16,
    }


def _constexprs(D: int, block_m: int, block_n: int, has_group: bool, dtype: torch.dtype, interpret: bool | None = None) -> dict:
    """The tl.constexpr arguments shared by the three attention kernels."""
    return dict(D=D, BLOCK_D=_block_d(D), BLOCK_M=block_m, BLOCK_N=block_n, HAS_GROUP=has_group,
                **_precision(dtype, interpret))


def _launch(kernel, grid, *args, **constexprs) -> None:
    """Launch an autotuned kernel; under the interpreter its plain ``@triton.jit`` function
    (warps and stages mean nothing there, and timing configs on one CPU thread is waste)."""
    (kernel.fn if interpreting() else kernel)[grid](*args, **constexprs, **COMPILE_OPTIONS)


# tensor arguments of each kernel -> "data" (q's dtype) or a fixed Triton element type
_POINTERS = {
    "_fwd_kernel": dict(Q="data", K="data", V="data", O="data", LSE="fp32"),
    "_bwd_dq_kernel": dict(Q="data", K="data", V="data", DO="data", DQ="data", LSE="fp32", DELTA="fp32"),
    "_bwd_dkdv_kernel": dict(Q="data", K="data", V="data", DO="data", DK="data", DV="data", LSE="fp32", DELTA="fp32"),
}
_INDEX_POINTERS = ("QR", "KR", "QG", "KG", "KEND", "FULL_NUM", "FULL_IDX", "MIX_NUM", "MIX_IDX")


def specializations() -> list[Spec]:
    """Every specialisation the launcher can choose on a GPU: each kernel (forward, dQ,
    dK/dV; decode is the forward with ``k_len``), dtype, head dim of :data:`HEAD_DIMS`,
    query tile of ``_BLOCK_M``, with and without groups, each at every config its autotuner
    tries (:func:`launch_configs`)."""
    out = []
    for kernel in (_fwd_kernel, _bwd_dq_kernel, _bwd_dkdv_kernel):
        name = kernel.fn.__name__
        for dtype in _DTYPES:
            for D in HEAD_DIMS:
                top = _max_block(D, dtype)
                for block_m in [m for m in _BLOCK_M if m <= top]:
                    for has_group in (False, True):
                        for warps, stages in launch_configs(name, D, dtype, block_m):
                            out.append(_spec(kernel, dtype, D, block_m, min(_BLOCK_N, top), has_group, warps, stages))
    return out


def _spec(kernel, dtype: torch.dtype, D: int, block_m: int, block_n: int, has_group: bool,
          num_warps: int, num_stages: int) -> Spec:
    """The specialisation of ``kernel`` a launch with these arguments compiles."""
    constexprs = {**_constexprs(D, block_m, block_n, has_group, dtype, interpret=False), **unit_strides(kernel)}
    elem = TRITON_DTYPE[dtype]
    pointers = {n: elem if t == "data" else t for n, t in _POINTERS[kernel.fn.__name__].items()}
    pointers.update({n: "i32" for n in _INDEX_POINTERS})
    sig = signature(kernel, pointers, ("qk_scale", "sm_scale"), constexprs)
    return Spec(kernel, sig, constexprs, num_warps, num_stages, elem)


def _forward(q, k, v, qr, kr, qg, kg, k_end, has_group, tiles: TileLists, scale: float):
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    BM, BN = tiles.block_m, tiles.block_n
    nQ, nK = triton.cdiv(Lq, BM), triton.cdiv(Lk, BN)
    o = torch.empty_like(q)
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    full_num, full_idx, mix_num, mix_idx = tiles.by_q
    _launch(
        _fwd_kernel, (nQ, B * H), q, k, v, o, lse, qr, kr, qg, kg, k_end,
        full_num, full_idx, mix_num, mix_idx,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        H, Lq, Lk, nQ, nK, scale * _LOG2E,
        **_constexprs(D, BM, BN, has_group, q.dtype),
    )
    return o, lse


def _backward(do, q, k, v, o, lse, qr, kr, qg, kg, k_end, has_group, tiles: TileLists, scale: float):
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    BM, BN = tiles.block_m, tiles.block_n
    nQ, nK = triton.cdiv(Lq, BM), triton.cdiv(Lk, BN)
    # delta_i = sum_d dO_id O_id = sum_j P_ij dP_ij (FlashAttention-2, Alg. 2 line 4)
    delta = (do.float() * o.float()).sum(-1).contiguous()  # [B, H, Lq]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    common = _constexprs(D, BM, BN, has_group, q.dtype)
    _launch(
        _bwd_dq_kernel, (nQ, B * H), q, k, v, do, dq, lse, delta, qr, kr, qg, kg, k_end, *tiles.by_q,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
        H, Lq, Lk, nQ, nK, scale * _LOG2E, scale, **common,
    )
    _launch(
        _bwd_dkdv_kernel, (nK, B * H), q, k, v, do, dk, dv, lse, delta, qr, kr, qg, kg, k_end, *tiles.by_k,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        H, Lq, Lk, nQ, nK, scale * _LOG2E, scale, **common,
    )
    return dq, dk, dv


# ------------------------------------------------------------------------ autograd Function


class _SetAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, qr, kr, qg, kg, k_end, has_group, tiles, scale):
        o, lse = _forward(q, k, v, qr, kr, qg, kg, k_end, has_group, tiles, scale)
        ctx.save_for_backward(q, k, v, o, lse, qr, kr, qg, kg, k_end)
        ctx.has_group, ctx.tiles, ctx.scale = has_group, tiles, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, qr, kr, qg, kg, k_end = ctx.saved_tensors
        dq, dk, dv = _backward(do, q, k, v, o, lse, qr, kr, qg, kg, k_end, ctx.has_group, ctx.tiles, ctx.scale)
        return dq, dk, dv, None, None, None, None, None, None, None, None


def set_attention_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_rank: Tensor,
    k_rank: Tensor,
    q_group: Tensor | None = None,
    k_group: Tensor | None = None,
    scale: float | None = None,
    k_len: Tensor | None = None,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
) -> Tensor:
    """The Triton path of :func:`set_attention` (differentiable in q, k, v), with tile sizes."""
    dm, dn = _default_blocks(q.shape[2] if q.dim() == 4 else 1, q.shape[-1], q.dtype)
    block_m, block_n = block_m or dm, block_n or dn
    _launch_check(q, k, v, q_rank, k_rank, q_group, k_group, k_len, block_m, block_n)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    qr, kr, qg, kg, k_end, has_group, tiles = _prep(q, k, q_rank, k_rank, q_group, k_group, k_len, block_m, block_n)
    return _SetAttention.apply(q, k, v, qr, kr, qg, kg, k_end, has_group, tiles, scale)


# -------------------------------------------------------------------------- public alias


def set_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_rank: Tensor,
    k_rank: Tensor,
    q_group: Tensor | None = None,
    k_group: Tensor | None = None,
    scale: float | None = None,
    k_len: Tensor | None = None,
    *,
    backend: str | None = None,
) -> Tensor:
    """Rank-masked attention. q: ``[B,H,Lq,D]``, k/v: ``[B,H,Lk,D]``, ranks/groups ``[B,L]``,
    ``k_len Long[B]``. Decode attention over a ragged KV cache is the same call with
    ``k_len`` (key tiles past ``k_len[b]`` are skipped).

    ``backend``: ``"triton"``, ``"sdpa"``, ``"reference"`` or None (see ``orderlab.kernels.dispatch``).
    """
    supported = q.dtype in _DTYPES and q.shape[-1] <= 256
    name = resolve_backend(backend, q.device, supported)
    if name == "triton":
        return set_attention_triton(q, k, v, q_rank, k_rank, q_group, k_group, scale, k_len)
    if name == "sdpa":
        return set_attention_sdpa(q, k, v, q_rank, k_rank, q_group, k_group, scale, k_len)
    return set_attention_reference(q, k, v, q_rank, k_rank, q_group, k_group, scale, k_len)


from .cache import append_kv, append_kv_reference  # noqa: E402  (kept importable from here)
