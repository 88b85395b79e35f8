"""KV-cache append: reference, Triton kernel, launcher, public alias.

The cache is a preallocated ``[B, H, C, D]`` buffer per K and V (DESIGN.md section 9.6:
static shapes, indexed by position tensors). One decode step appends the K/V of the set it
revealed, a different number of tokens per row: row ``b`` writes ``new[b, :, :count[b]]``
to ``cache[b, :, start[b]:start[b] + count[b]]``. No autograd: caches are inference state.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .dispatch import resolve_backend
from .specs import COMPILE_OPTIONS, TRITON_DTYPE, Spec, signature, unit_strides

__all__ = ["append_kv", "append_kv_reference", "append_kv_triton"]


def append_kv_reference(cache_k: Tensor, cache_v: Tensor, k_new: Tensor, v_new: Tensor, start: Tensor, count: Tensor) -> None:
    """In place: ``cache[b, :, start[b] + j] = new[b, :, j]`` for ``j < count[b]``."""
    B, H, N, D = k_new.shape
    j = torch.arange(N, device=k_new.device)
    valid = j[None, :] < count[:, None]  # [B, N]
    b_idx = torch.arange(B, device=k_new.device)[:, None].expand(B, N)[valid]
    slot = (start[:, None] + j[None, :])[valid]
    cache_k[b_idx, :, slot] = k_new.permute(0, 2, 1, 3)[valid]  # rows [n, H, D]
    cache_v[b_idx, :, slot] = v_new.permute(0, 2, 1, 3)[valid]


@triton.jit
def _append_kv_kernel(
    CK, CV, KN, VN, START, COUNT,
    stride_ckb, stride_ckh, stride_ckc, stride_ckd,
    stride_cvb, stride_cvh, stride_cvc, stride_cvd,
    stride_knb, stride_knh, stride_knn, stride_knd,
    stride_vnb, stride_vnh, stride_vnn, stride_vnd,
    H, N, C,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    start = tl.load(START + b)
    count = tl.load(COUNT + b)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    slot = start + offs_n
    # rows past count are not part of this step's set; slots past C would be out of bounds
    live = (offs_n < count) & (offs_n < N) & (slot < C) & (slot >= 0)
    mask = live[:, None] & (offs_d[None, :] < D)
    k = tl.load(KN + b * stride_knb + h * stride_knh + offs_n[:, None] * stride_knn + offs_d[None, :] * stride_knd, mask=mask)
    v = tl.load(VN + b * stride_vnb + h * stride_vnh + offs_n[:, None] * stride_vnn + offs_d[None, :] * stride_vnd, mask=mask)
    tl.store(CK + b * stride_ckb + h * stride_ckh + slot[:, None] * stride_ckc + offs_d[None, :] * stride_ckd, k, mask=mask)
    tl.store(CV + b * stride_cvb + h * stride_cvh + slot[:, None] * stride_cvc + offs_d[None, :] * stride_cvd, v, mask=mask)


def _check(cache_k: Tensor, cache_v: Tensor, k_new: Tensor, v_new: Tensor, start: Tensor, count: Tensor) -> None:
    if cache_k.dim() != 4 or cache_v.shape != cache_k.shape:
        raise ValueError(f"cache_k and cache_v must both be [B, H, C, D]; got {tuple(cache_k.shape)}, {tuple(cache_v.shape)}")
    B, H, C, D = cache_k.shape
    if k_new.dim() != 4 or k_new.shape[:2] != (B, H) or k_new.shape[3] != D or v_new.shape != k_new.shape:
        raise ValueError(f"k_new and v_new must be [B={B}, H={H}, N, D={D}]; got {tuple(k_new.shape)}, {tuple(v_new.shape)}")
    if k_new.dtype != cache_k.dtype or v_new.dtype != cache_v.dtype:
        raise TypeError(f"new K/V dtype ({k_new.dtype}, {v_new.dtype}) must match the cache ({cache_k.dtype}, {cache_v.dtype})")
    for name, t in (("start", start), ("count", count)):
        if t.shape != (B,) or t.dtype.is_floating_point or t.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor of shape [B={B}], got {t.dtype} {tuple(t.shape)}")
    devs = {t.device for t in (cache_k, cache_v, k_new, v_new, start, count)}
    if len(devs) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devs))}")


def append_kv_triton(cache_k: Tensor, cache_v: Tensor, k_new: Tensor, v_new: Tensor, start: Tensor, count: Tensor) -> None:
    """The Triton path of :func:`append_kv`. Writes past the cache end are dropped (no host
    sync to check them: the decode step keeps static shapes)."""
    _check(cache_k, cache_v, k_new, v_new, start, count)
    B, H, C, D = cache_k.shape
    N = k_new.shape[2]
    if N == 0 or B == 0:
        return
    block_n = min(_max_block_n(D, cache_k.dtype), max(_BLOCK_N[0], triton.next_power_of_2(N)))
    _append_kv_kernel[(triton.cdiv(N, block_n), B * H)](
        cache_k, cache_v, k_new, v_new, start.to(torch.int32).contiguous(), count.to(torch.int32).contiguous(),
        *cache_k.stride(), *cache_v.stride(), *k_new.stride(), *v_new.stride(),
        H, N, C,
        D=D, BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_N=block_n, num_warps=_NUM_WARPS, num_stages=_NUM_STAGES, **COMPILE_OPTIONS,
    )


_BLOCK_N = (16, 32, 64)  # new tokens per program: one step's set rounded up to a power of two
_TILE_BYTES = 32 * 1024  # one program's K (and V) tile: fp32 at D 256 with 64 rows (64 KB) spilled 8 KB per thread


def _max_block_n(D: int, dtype: torch.dtype) -> int:
    """Largest ``BLOCK_N`` whose ``BLOCK_N x BLOCK_D`` tile stays within :data:`_TILE_BYTES`."""
    per_row = max(16, triton.next_power_of_2(D)) * torch.finfo(dtype).bits // 8
    return max(_BLOCK_N[0], min(_BLOCK_N[-1], _TILE_BYTES // per_row))
_NUM_WARPS, _NUM_STAGES = 4, 1  # a copy: nothing to pipeline
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def specializations() -> list[Spec]:
    """Every specialisation :func:`append_kv_triton` can launch for the caches the model
    keeps (its dtypes, the head dims of ``attention.HEAD_DIMS``, every ``_BLOCK_N`` up to
    :func:`_max_block_n`)."""
    from .attention import HEAD_DIMS

    out = []
    for dtype in _DTYPES:
        elem = TRITON_DTYPE[dtype]
        for D in HEAD_DIMS:
            for block_n in [n for n in _BLOCK_N if n <= _max_block_n(D, dtype)]:
                constexprs = dict(D=D, BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_N=block_n, **unit_strides(_append_kv_kernel))
                pointers = dict(CK=elem, CV=elem, KN=elem, VN=elem, START="i32", COUNT="i32")
                sig = signature(_append_kv_kernel, pointers, (), constexprs)
                out.append(Spec(_append_kv_kernel, sig, constexprs, _NUM_WARPS, _NUM_STAGES, elem))
    return out


def append_kv(
    cache_k: Tensor, cache_v: Tensor, k_new: Tensor, v_new: Tensor, start: Tensor, count: Tensor, *, backend: str | None = None
) -> None:
    """Append a variable-size set per row into preallocated ``[B, H, C, D]`` buffers (in place)."""
    if resolve_backend(backend, cache_k.device) == "triton":
        append_kv_triton(cache_k, cache_v, k_new, v_new, start, count)
    else:
        append_kv_reference(cache_k, cache_v, k_new, v_new, start, count)
