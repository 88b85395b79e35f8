"""Exact KV cache for set-causal and block-causal decoding.

Preallocated per-layer buffers ``[B, H, C, D]`` with a rank and a group per slot and a
length per row (gpt-fast / torchtune style: buffers indexed by position tensors). Each
decode step appends a variable-size set of clean tokens per row (their K/V in stream
order, i.e. position order inside a set). Slots past a row's length have key rank
``NEVER`` and group ``-1``: no query ever sees them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from orderlab.kernels import append_kv
from orderlab.ranks import NEVER

__all__ = ["KVCache"]


class KVCache:
    def __init__(self, n_layers: int, batch: int, n_heads: int, capacity: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (n_layers, batch, n_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.rank = torch.full((batch, capacity), NEVER, dtype=torch.long, device=device)
        self.group = torch.full((batch, capacity), -1, dtype=torch.long, device=device)
        self.length = torch.zeros(batch, dtype=torch.long, device=device)
        self.capacity = capacity

    def __repr__(self) -> str:
        n_layers, B, H, C, D = self.k.shape
        return f"KVCache(layers={n_layers}, batch={B}, heads={H}, capacity={C}, head_dim={D}, used={self.length.tolist()})"

    def keys(self, layer: int, k: Tensor, v: Tensor, k_rank: Tensor, k_group: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Keys of the cache (used slots) followed by the current tokens' keys."""
        n = int(self.length.max())  # slice to the longest row: shorter rows' extra slots are invisible
        return (
            torch.cat([self.k[layer, :, :, :n], k], dim=2),  # [B, H, n + N, D]
            torch.cat([self.v[layer, :, :, :n], v], dim=2),
            torch.cat([self.rank[:, :n], k_rank], dim=1),  # [B, n + N]
            torch.cat([self.group[:, :n], k_group], dim=1),
        )

    def write(self, layer: int, k: Tensor, v: Tensor, n_append: Tensor) -> None:
        """Store the K/V of the first ``n_append[b]`` current tokens of each row."""
        if int((self.length + n_append).max()) > self.capacity:
            raise RuntimeError(f"KV cache overflow: lengths {self.length.tolist()} + {n_append.tolist()} > capacity {self.capacity}")
        append_kv(self.k[layer], self.v[layer], k.to(self.k.dtype), v.to(self.v.dtype), self.length, n_append)

    def commit(self, k_rank: Tensor, k_group: Tensor, n_append: Tensor) -> None:
        """After all layers: record ranks/groups of the appended tokens and advance lengths."""
        B, N = k_rank.shape
        j = torch.arange(N, device=k_rank.device)
        valid = j[None, :] < n_append[:, None]  # [B, N]
        rows = torch.arange(B, device=k_rank.device)[:, None].expand(B, N)[valid]
        slots = (self.length[:, None] + j[None, :])[valid]
        self.rank[rows, slots] = k_rank[valid]
        self.group[rows, slots] = k_group[valid]
        self.length += n_append
