"""Rank-masked attention: reference, dispatch, public alias.

Key ``j`` is visible to query ``i`` iff ``k_rank[j] < q_rank[i]`` or
``(q_group[i] >= 0 and k_group[j] == q_group[i])``. Queries with no visible key return
zeros (and get zero gradients), never NaN.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["set_attention", "set_attention_reference", "visible", "append_kv", "append_kv_reference"]


def visible(q_rank: Tensor, k_rank: Tensor, q_group: Tensor | None = None, k_group: Tensor | None = None) -> Tensor:
    """Bool ``[B, Lq, Lk]``: the visibility mask of the rule."""
    vis = k_rank[:, None, :] < q_rank[:, :, None]  # [B, Lq, Lk]
    if q_group is not None and k_group is not None:
        same = (k_group[:, None, :] == q_group[:, :, None]) & (q_group[:, :, None] >= 0)
        vis = vis | same
    return vis


def _check(q: Tensor, k: Tensor, v: Tensor, q_rank: Tensor, k_rank: Tensor, q_group, k_group) -> None:
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

    Computed in float32 for half inputs, returned in the input dtype.
    """
    _check(q, k, v, q_rank, k_rank, q_group, k_group)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    vis = visible(q_rank, k_rank, q_group, k_group)  # [B, Lq, Lk]
    if k_len is not None:  # ragged cache: keys at or past k_len[b] do not exist
        vis = vis & (torch.arange(k.shape[2], device=k.device)[None, None, :] < k_len[:, None, None])
    vis = vis[:, None]  # [B, 1, Lq, Lk]
    qf, kf, vf = (t.float() for t in (q, k, v))
    s = torch.einsum("bhqd,bhkd->bhqk", qf, kf) * scale  # [B, H, Lq, Lk]
    # a finite fill keeps gradients finite for rows with no visible key
    s = s.masked_fill(~vis, torch.finfo(s.dtype).min)
    p = torch.softmax(s, dim=-1) * vis  # rows with no visible key become all zeros
    o = torch.einsum("bhqk,bhkd->bhqd", p, vf)
    return o.to(q.dtype)


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
) -> Tensor:
    """Rank-masked attention. q: ``[B,H,Lq,D]``, k/v: ``[B,H,Lk,D]``, ranks/groups ``[B,L]``."""
    return set_attention_reference(q, k, v, q_rank, k_rank, q_group, k_group, scale, k_len)


def append_kv_reference(cache_k: Tensor, cache_v: Tensor, k_new: Tensor, v_new: Tensor, start: Tensor, count: Tensor) -> None:
    """In place: ``cache[b, :, start[b] + j] = new[b, :, j]`` for ``j < count[b]``."""
    B, H, N, D = k_new.shape
    j = torch.arange(N, device=k_new.device)
    valid = j[None, :] < count[:, None]  # [B, N]
    b_idx = torch.arange(B, device=k_new.device)[:, None].expand(B, N)[valid]
    slot = (start[:, None] + j[None, :])[valid]
    cache_k[b_idx, :, slot] = k_new.permute(0, 2, 1, 3)[valid]  # rows [n, H, D]
    cache_v[b_idx, :, slot] = v_new.permute(0, 2, 1, 3)[valid]


def append_kv(cache_k: Tensor, cache_v: Tensor, k_new: Tensor, v_new: Tensor, start: Tensor, count: Tensor) -> None:
    """Append a variable-size set per row into preallocated ``[B, H, C, D]`` buffers."""
    append_kv_reference(cache_k, cache_v, k_new, v_new, start, count)
