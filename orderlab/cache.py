"""Exact KV cache for set-causal and block-causal decoding.

Preallocated per-layer buffers ``[B, H, C, D]`` with a rank and a group per slot and a
length per row (gpt-fast / torchtune style: buffers indexed by position tensors).

One decode forward writes the K/V of *all* its tokens after each row's cached ones
(``append_kv``) and attends over the buffer with per-row lengths (``set_attention``'s
``k_len``: the ragged decode-attention kernel on GPU, no concatenation). Only the first
``n_append[b]`` tokens (the clean tokens of the set revealed last step, in position
order) are kept: ``commit`` advances the lengths past them, and the queries written after
them are scratch that the next step overwrites. A row holds at most ``L`` cached tokens
plus at most ``L`` tokens of one step, so a capacity of ``2 L`` always suffices.
"""

from __future__ import annotations

import torch
from torch import Tensor

from orderlab.kernels import append_kv, set_attention
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
        self._end: Tensor | None = None  # [B] end of this forward's tokens per row
        self._n = 0  # buffer prefix that the attention reads this forward

    def __repr__(self) -> str:
        n_layers, B, H, C, D = self.k.shape
        return f"KVCache(layers={n_layers}, batch={B}, heads={H}, capacity={C}, head_dim={D}, used={self.length.tolist()})"

    def begin(self, k_rank: Tensor, k_group: Tensor) -> None:
        """Before layer 0: place this forward's ``N`` tokens (their key ranks/groups) after
        each row's cached tokens."""
        B, N = k_rank.shape
        end = self.length + N
        if int(end.max()) > self.capacity:
            raise RuntimeError(f"KV cache overflow: lengths {self.length.tolist()} + {N} new tokens > capacity {self.capacity}")
        slots = self.length[:, None] + torch.arange(N, device=k_rank.device)  # [B, N]
        self.rank.scatter_(1, slots, k_rank)
        self.group.scatter_(1, slots, k_group)
        self._end, self._n = end, int(end.max())

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, q_rank: Tensor, q_group: Tensor) -> Tensor:
        """Write this forward's K/V of ``layer`` and attend over cache + them: ``[B, H, N, D]``."""
        N = k.shape[2]
        append_kv(self.k[layer], self.v[layer], k.to(self.k.dtype), v.to(self.v.dtype), self.length,
                  torch.full_like(self.length, N))
        n = self._n
        return set_attention(q, self.k[layer, :, :, :n], self.v[layer, :, :, :n], q_rank, self.rank[:, :n],
                             q_group, self.group[:, :n], k_len=self._end).to(q.dtype)

    def commit(self, n_append: Tensor) -> None:
        """After the last layer: keep the first ``n_append[b]`` tokens of each row."""
        self.length += n_append
        self._end, self._n = None, 0
