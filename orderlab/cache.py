"""Exact KV cache for set-causal and block-causal decoding.

Preallocated buffers ``[B, H, C, D]``, one K and one V per layer, with a rank and a group
per slot and a length per row (gpt-fast / torchtune style: buffers indexed by position
tensors).

One decode forward writes the K/V of *all* its ``N`` tokens after each row's cached ones
(one ``index_copy_`` per layer and buffer, at slots computed once per forward) and
attends over the buffer with the rule's mask and the per-row end of this forward's tokens
(:class:`~orderlab.kernels.RankMask`: SDPA with a boolean mask built once per forward on
CPU, the ragged decode-attention kernel on GPU). Only the first ``n_append[b]`` tokens
(the clean tokens of the set revealed last step, in position order) are kept: ``commit``
advances the lengths past them, and the queries written after them are scratch that the
next step overwrites.

Compiled (``torch.compile``), nothing reads a tensor's value on the host: a forward
attends over the buffer's first :attr:`KVCache.span` slots, a length the caller computes
before the call (the decoder: the longest row's cached tokens plus the stream's width) and
passes as a symbolic size, or over the whole buffer when ``span`` is None; either way a
stream of fixed width compiles to one graph. Eager, it reads the lengths on the host to
check for overflow and attends over the used prefix. Reading only the used prefix matters
at large batch, where the attention's cost is reading the cache from memory.

Capacity: a row's cached tokens plus the *real* tokens of one forward never exceed ``L``
(the set revealed last step and this step's queries are disjoint masked positions of the
previous step), so ``C = L + 1`` suffices: the padding of a fixed-width stream is written
at slots clamped to ``C - 1``, a slot no real token reaches, and padding is invisible
(rank ``NEVER``, no group).
"""

from __future__ import annotations

import torch
from torch import Tensor

from orderlab.kernels import RankMask
from orderlab.ranks import NEVER
from orderlab.rules import Stream

__all__ = ["KVCache"]


class KVCache:
    def __init__(self, n_layers: int, batch: int, n_heads: int, capacity: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (batch, n_heads, capacity, head_dim)
        # separate tensors per layer: under torch.compile each is written in place once per
        # forward (one [layers, ...] tensor written layer by layer is copied back whole)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.rank = torch.full((batch, capacity), NEVER, dtype=torch.long, device=device)
        self.group = torch.full((batch, capacity), -1, dtype=torch.long, device=device)
        self.length = torch.zeros(batch, dtype=torch.long, device=device)
        self.capacity = capacity
        self._rows: Tensor | None = None  # Long[B*H*N]: rows of the [B*H*C, D] view this forward writes
        self._keys = capacity  # buffer prefix the attention reads this forward
        self.span: int | None = None  # compiled forwards: the prefix to attend over (None: the whole buffer)

    def __repr__(self) -> str:
        B, H, C, D = self.k[0].shape
        return f"KVCache(layers={len(self.k)}, batch={B}, heads={H}, capacity={C}, head_dim={D}, used={self.length.tolist()})"

    def begin(self, s: Stream) -> RankMask:
        """Before layer 0: place the stream's ``N`` tokens (their key ranks/groups) after each
        row's cached tokens; return this forward's visibility over the whole buffer."""
        B, N = s.k_rank.shape
        _, H, C, _ = self.k[0].shape
        slots = self.length[:, None] + torch.arange(N, device=s.k_rank.device)  # [B, N]
        end = (self.length + N).clamp(max=C)  # keys at or past end[b] are stale scratch
        if torch.compiler.is_compiling():
            self._keys = C if self.span is None else self.span
        else:  # eager: host reads are cheap here, so check for overflow and attend over the used prefix
            seen = (s.k_rank != NEVER) | (s.k_group >= 0)  # tokens some query can see (not padding)
            if bool(((slots >= C - 1) & seen).any()):
                raise RuntimeError(f"KV cache overflow: lengths {self.length.tolist()} + {N} tokens > capacity {C} - 1")
            self._keys = int(end.max())
        slots = slots.clamp(max=C - 1)  # padding only (checked above): the dump slot
        self.rank.scatter_(1, slots, s.k_rank)
        self.group.scatter_(1, slots, s.k_group)
        # row of (b, h, slot) in the [B*H*C, D] view of a buffer, for index_copy_
        base = (torch.arange(B, device=slots.device)[:, None, None] * H + torch.arange(H, device=slots.device)[:, None]) * C
        self._rows = (base + slots[:, None, :]).flatten()  # [B*H*N], (b, h, n) order
        n = self._keys
        return RankMask(s.q_rank, self.rank[:, :n], s.q_group, self.group[:, :n], k_len=end)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, vis: RankMask) -> Tensor:
        """Write this forward's K/V of ``layer`` and attend over the buffer: ``[B, H, N, D]``."""
        B, H, N, D = k.shape
        ck, cv = self.k[layer], self.v[layer]  # [B, H, C, D]
        ck.view(-1, D).index_copy_(0, self._rows, k.reshape(B * H * N, D).to(ck.dtype))
        cv.view(-1, D).index_copy_(0, self._rows, v.reshape(B * H * N, D).to(cv.dtype))
        n = self._keys
        return vis.attend(q, ck[:, :, :n], cv[:, :, :n]).to(q.dtype)

    def commit(self, n_append: Tensor) -> None:
        """After the last layer: keep the first ``n_append[b]`` tokens of each row."""
        self.length += n_append
        self._rows = None
