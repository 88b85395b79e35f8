"""Composite processes: a schedule inside blocks, and a mixture of processes.

- ``Blockwise(block_size, inner)`` (BD3-LM, Arriola et al. 2025; hdlm block annealing):
  ``n = ceil(L / block_size)`` blocks, block ``j`` (left to right) lives in the time window
  ``[(n-1-j)/n, (n-j)/n]`` and runs the inner process there, on its own positions::

      s_i    = clip(n t - (n-1-j), 0, 1)            # local time of block j = i // block_size
      α_i(t) = α^inner_{i mod block_size}(s_i, len_j) for s_i < 1, and 0 for s_i >= 1
      α_i'(t) = n α^inner'(s_i) for 0 < s_i < 1, else 0
      T_i    = ((n-1-j) + min(T^inner, 1)) / n

  so every rank of block ``j`` is below every rank of block ``j+1`` (the order inside a
  block is the inner process's: uniformly random for a flat one). An inner schedule with
  ``α(1) > 0`` (log-linear) has its leftover mass noised at the window's end (``α_i``
  jumps to 0 there; the jump is not in ``α'``) so blocks never interleave. The last block
  may be shorter (``len_j = L - (n-1) block_size``). BD3-LM draws one ``t`` per block;
  here one global ``t`` sweeps the blocks in turn, which gives the same orders.

- ``Mixture(processes, weights)``: each sequence draws one component ``c ~ weights`` and
  then follows it. ``alpha`` is the marginal over the draw, ``Σ_c w_c α^c_i(t)`` (so
  ``P(T_i <= t) = 1 - α_i(t)`` still holds per position), but positions are no longer
  independent within a sequence, and the ELBO weight of the marginal is not that of the
  drawn component.

``corruption=None`` (the default of both) means "the components' own corruption".
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from orderlab import ranks as R
from orderlab.processes.base import Process, as_times, rows, singletons
from orderlab.processes.corruption import Corruption, as_corruption
from orderlab.processes.flat import Linear
from orderlab.registry import register

__all__ = ["Blockwise", "Mixture"]


def _as_process(obj: Any, what: str) -> Process:
    """``obj`` checked to be a built :class:`Process` (the builder turns YAML names into one)."""
    if not isinstance(obj, Process):
        raise TypeError(f"{what} must be a Process (e.g. Linear()), got {type(obj).__name__} {obj!r}")
    return obj


@register("process", "blockwise")
class Blockwise(Process):
    """Blocks left to right; the ``inner`` process (default ``linear``) inside each block."""

    def __init__(
        self, block_size: int, inner: Process | None = None, corruption: Corruption | None = None
    ):
        if int(block_size) < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = int(block_size)
        self.inner = _as_process(Linear() if inner is None else inner, "inner")
        self._own = corruption is not None
        self.corruption = as_corruption(corruption) if self._own else self.inner.corruption

    def _blocks(self, length: int, like: Tensor) -> tuple[int, Tensor]:
        """``n`` blocks and Float ``[1, L]`` ``n-1-j``: how many blocks are revealed after position i's."""
        n = math.ceil(length / self.block_size)
        j = torch.arange(length, device=like.device) // self.block_size  # [L]
        return n, (n - 1 - j).to(like.dtype)[None, :]

    def _per_block(self, fn: Any, s: Tensor, length: int) -> Tensor:
        """Apply ``fn(local [B', len], len) -> [B', len]`` block by block (at most 2 calls)."""
        B, bs = s.shape[0], self.block_size
        full, rem = divmod(length, bs)
        parts = []
        if full:
            parts.append(fn(s[:, : full * bs].reshape(B * full, bs), bs).reshape(B, full * bs))  # [B*full, bs]
        if rem:
            parts.append(fn(s[:, full * bs :], rem))  # [B, rem]
        return torch.cat(parts, dim=1)  # [B, L]

    def _local(self, t: Any, length: int) -> tuple[Tensor, int]:
        t = rows(as_times(t), length)  # [B, L]
        n, after = self._blocks(length, t)
        return (n * t - after).clamp(0.0, 1.0), n

    def alpha(self, t: Any, length: int) -> Tensor:  # noqa: D102
        s, _ = self._local(t, length)
        a = self._per_block(self.inner.alpha, s, length)
        return torch.where(s >= 1, torch.zeros_like(a), a)

    def dalpha(self, t: Any, length: int) -> Tensor:  # noqa: D102
        s, n = self._local(t, length)
        da = self._per_block(self.inner.dalpha, s, length)
        return torch.where((s > 0) & (s < 1), n * da, torch.zeros_like(da))

    def first_hitting_times(self, batch, length, generator=None, device=None, dtype=None):  # noqa: D102
        # each block is an independent draw of the inner process ("sequences" of len_j)
        bs = self.block_size
        full, rem = divmod(length, bs)
        parts = []
        if full:
            T = self.inner.first_hitting_times(batch * full, bs, generator, device, torch.float64)
            parts.append(T.reshape(batch, full * bs))  # [B*full, bs] -> [B, full*bs]
        if rem:
            parts.append(self.inner.first_hitting_times(batch, rem, generator, device, torch.float64))
        local = torch.cat(parts, dim=1).clamp(max=1.0)  # [B, L]
        n, after = self._blocks(length, local)
        return ((after + local) / n).to(dtype or torch.get_default_dtype())

    def log_prob(self, ranks: Tensor, steps: int | None = None) -> Tensor:
        """Singletons: ``Σ_j log P_inner(order inside block j)`` if every generated position
        of block ``j`` is revealed before every one of block ``j + 1``, else ``-inf`` (blocks
        are independent draws of the inner process). With ``steps``: the exact binned chain.
        """
        if steps is not None:
            return super().log_prob(ranks, steps)
        R.validate(ranks)
        B, L = ranks.shape
        d = R.dense(ranks)
        n, after = self._blocks(L, d.to(torch.float64))  # after: [1, L] blocks revealed after i's
        # block order: a position of an earlier block never ranks after one of a later block
        key = torch.where(d > 0, d, torch.zeros_like(d))
        blk = (n - 1 - after).long().expand(B, L)  # [B, L] block index j
        last_of = torch.zeros(B, n, dtype=d.dtype, device=d.device).scatter_reduce(1, blk, key, "amax")
        first_of = torch.full((B, n), R.NEVER, dtype=d.dtype, device=d.device)
        first_of = first_of.scatter_reduce(1, blk, torch.where(d > 0, d, torch.full_like(d, R.NEVER)), "amin")
        # max rank up to block j < min rank from block j+1 on
        ok = (last_of.cummax(1).values[:, :-1] < first_of.flip(1).cummin(1).values.flip(1)[:, 1:]).all(1)
        inner = self._per_block(lambda r, _: self.inner.log_prob(R.dense(r))[:, None].expand_as(r), d, L)  # [B, L]
        starts = torch.arange(0, L, self.block_size, device=d.device)
        total = inner[:, starts].sum(1)  # one value per block, read at its first position
        return torch.where(ok & singletons(ranks), total, torch.full_like(total, -math.inf))

    def __repr__(self) -> str:
        own = f", corruption={self.corruption!r}" if self._own else ""
        return f"Blockwise(block_size={self.block_size}, inner={self.inner!r}{own})"


@register("process", "mixture")
class Mixture(Process):
    """One component per sequence, drawn with probability ``weights`` (default uniform)."""

    def __init__(
        self,
        processes: list[Process],
        weights: list[float] | None = None,
        corruption: Corruption | None = None,
    ):
        if not processes:
            raise ValueError("a mixture needs at least one process")
        self.processes = [_as_process(p, f"processes[{i}]") for i, p in enumerate(processes)]
        w = [1.0] * len(self.processes) if weights is None else [float(v) for v in weights]
        if len(w) != len(self.processes):
            raise ValueError(f"{len(w)} weights for {len(self.processes)} processes")
        if any(v < 0 for v in w) or not sum(w) > 0:
            raise ValueError(f"weights must be >= 0 with a positive sum, got {w}")
        self.weights = [v / sum(w) for v in w]
        self._own = corruption is not None
        self.corruption = as_corruption(corruption) if self._own else None

    def alpha(self, t: Any, length: int) -> Tensor:  # noqa: D102
        return sum(w * p.alpha(t, length) for w, p in zip(self.weights, self.processes))

    def dalpha(self, t: Any, length: int) -> Tensor:  # noqa: D102
        return sum(w * p.dalpha(t, length) for w, p in zip(self.weights, self.processes))

    def _draw(self, batch, length, generator, device) -> tuple[Tensor, Tensor]:
        """``(T Float64[B, L], component Long[B])``."""
        dev = generator.device if generator is not None else (device or "cpu")
        w = torch.tensor(self.weights, dtype=torch.float64, device=dev)
        comp = torch.multinomial(w, batch, replacement=True, generator=generator).to(device)  # [B]
        T = torch.empty(batch, length, dtype=torch.float64, device=device)
        for c, p in enumerate(self.processes):
            idx = (comp == c).nonzero().squeeze(1)  # rows following component c
            if idx.numel():
                T[idx] = p.first_hitting_times(idx.numel(), length, generator, device, torch.float64)
        return T, comp

    def first_hitting_times(self, batch, length, generator=None, device=None, dtype=None):  # noqa: D102
        return self._draw(batch, length, generator, device)[0].to(dtype or torch.get_default_dtype())

    def corrupt(self, x, t, mask_id, vocab_size, ranks=None, generator=None):  # noqa: D102
        B, L = x.shape
        T, comp = self._draw(B, L, generator, x.device)
        noised = T <= as_times(t, device=x.device)  # [B, L]
        if ranks is not None:
            noised &= ranks.to(x.device) > 0
        if self.corruption is not None:
            return self.corruption(x, noised, mask_id, vocab_size, generator), noised
        x_t = x.clone()
        for c, p in enumerate(self.processes):  # each row corrupted the way its component does
            idx = (comp == c).nonzero().squeeze(1)
            if idx.numel():
                x_t[idx] = p.corruption(x[idx], noised[idx], mask_id, vocab_size, generator)
        return x_t, noised

    def log_prob(self, ranks: Tensor, steps: int | None = None) -> Tensor:
        """``log Σ_c w_c P_c(ranks)``: exact given the components' ``log_prob``."""
        lw = torch.tensor(self.weights, dtype=torch.float64, device=ranks.device).log()  # [C]
        parts = torch.stack([p.log_prob(ranks, steps) for p in self.processes], 1)  # [B, C]
        return torch.logsumexp(parts + lw, dim=1)

    def __repr__(self) -> str:
        w = ", ".join(f"{v:g}" for v in self.weights)
        own = f", corruption={self.corruption!r}" if self._own else ""
        return f"Mixture([{', '.join(map(repr, self.processes))}], weights=[{w}]{own})"
