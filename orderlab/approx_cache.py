"""Approximate KV caches for bidirectional models: Fast-dLLM's prefix and dual cache.

Fast-dLLM (Wu et al., ICLR 2026, arXiv:2505.22618, section 3.2; NVlabs/Fast-dLLM
``generate_with_prefix_cache`` / ``generate_with_dual_cache``): a bidirectional MDM has no
exact cache (every token attends to every other, so a revealed token changes every K/V),
but inside one block of a semi-AR schedule the K/V of the positions outside the block
change little. At the block's first step one full forward over the whole sequence keeps
the K/V of those positions; the next steps of the block forward only

- **prefix cache** (``suffix=False``): the block and everything after it, attending to the
  kept K/V of the positions before the block;
- **dual cache** (``suffix=True``): the block only, attending to the kept K/V of the
  positions before *and* after it.

The kept K/V are stale (computed while the block was still masked) and never corrected
within the block: the cache is approximate, and ``tests/test_approx_cache.py`` measures
how far it is from the exact decode.

Here "the block" is the policy's candidate window, so every policy works unchanged: at a
**refresh** the window of a row is its candidates' span, from its first to its last
candidate position; the row refreshes again when a step's candidates leave that window
(``semi_ar``: the next block; ``sliding_window``: the window slid), and when a position
became padding since (EOS: its kept K/V would be of a token that no longer exists).
A row whose first step's candidates are all its masked positions has no block rule
(``threshold``, ``top_prob``, a one-block canvas): it refreshes every step, and the
decode equals the exact one. Rows refresh independently (rows in different blocks, ragged
padding, finished rows batch together); a refresh and a cached step are one forward of
the same stream, so NFE counts both.

Storage is the exact caches' :class:`~orderlab.cache.KVCache` (grouped-query heads
included): a refreshing row's stream puts the positions to keep first, so that
``commit(n_append)`` keeps exactly their K/V; a cached row's stream holds the forwarded
positions only and appends nothing. Everything is attention group 0 (the bidirectional
rule's stream), so a query sees every kept and every forwarded token of its row.

Dream's shifted logits (``shift_logits``: position ``i`` is predicted at the token of
``i - 1``): the forwarded region starts one position left of the window, so the first
candidate's left neighbour is a fresh token of the stream, not a kept K/V.

Eager only: a refresh decides on the host which rows refresh and the stream's width
follows the rows' windows (``decode(..., compile=True)`` with an approximate cache is an
error).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from orderlab.cache import KVCache
from orderlab.rules import UNKNOWN, Bidirectional, pack

__all__ = ["ApproximateCache", "StaleKV"]


@dataclass(frozen=True)
class ApproximateCache:
    """The choice ``decode(..., cache=ApproximateCache(suffix))``: Fast-dLLM's prefix cache
    (``suffix=False``) or dual cache (``suffix=True``), module docstring. A value, not a
    state: :meth:`start` makes the per-decode state."""

    suffix: bool = False

    @property
    def name(self) -> str:
        """The config name (``evaluate.cache``)."""
        return "approximate_dual" if self.suffix else "approximate_prefix"

    def start(self, model, batch: int, length: int) -> "StaleKV":
        if not isinstance(model.rule, Bidirectional):
            raise ValueError(f"{self!r} approximates the bidirectional rule; {model.rule!r} has an exact cache "
                             "(cache=True) or none")
        return StaleKV(model, self.suffix, batch, length)


class StaleKV:
    """One decode's approximate cache: kept K/V (a :class:`KVCache` of ``[B, G, L + 1, D]``
    per layer) and each row's window ``[lo, hi]`` of its last refresh.

    ``self(x, rank, cand)`` runs one forward for the step whose candidates are ``cand``
    (Bool ``[B, L]``) and returns ``(logits [B, N, V], out [B, N])`` (``out``: the position
    each token predicts, -1 none), refreshing the rows that need it (:meth:`refreshing`).
    ``refreshes`` (Long ``[B]``): forwards per row that recomputed the whole row.
    """

    def __init__(self, model, suffix: bool, batch: int, length: int):
        self.model, self.suffix = model, suffix
        self.kv: KVCache = model.new_cache(batch, length)
        dev = self.kv.length.device
        # no window yet: every candidate is outside [L, -1], so the first step refreshes every row
        self.lo = torch.full((batch,), length, dtype=torch.long, device=dev)
        self.hi = torch.full((batch,), -1, dtype=torch.long, device=dev)
        self.real = torch.zeros(batch, dtype=torch.long, device=dev)  # non-padding positions at the refresh
        self.blocked: Tensor | None = None  # Bool[B]: the row's candidates are a window, set at the first step
        self.refreshes = torch.zeros(batch, dtype=torch.long, device=dev)
        # Dream: a candidate's prediction is read at its left neighbour, which must be forwarded too
        self.shift = int(bool(model.config.shift_logits))

    def __repr__(self) -> str:
        return f"StaleKV(suffix={self.suffix}, refreshes={self.refreshes.tolist()})"

    def refreshing(self, rank: Tensor, cand: Tensor) -> Tensor:
        """Bool ``[B]``: the unfinished rows whose next forward recomputes everything (the
        refresh rule, module docstring)."""
        masked = rank == UNKNOWN
        if self.blocked is None:  # first step: does the policy narrow the candidates to a window?
            self.blocked = (cand != masked).any(1)
        pos = torch.arange(rank.shape[1], device=rank.device)
        left = (cand & ((pos < self.lo[:, None]) | (pos > self.hi[:, None]))).any(1)
        cut = (rank >= 0).sum(1) != self.real  # a kept position may have become padding (EOS)
        return masked.any(1) & (left | cut | ~self.blocked)

    def __call__(self, x: Tensor, rank: Tensor, cand: Tensor) -> tuple[Tensor, Tensor]:
        B, L = x.shape
        pos = torch.arange(L, device=x.device).expand(B, L)
        fresh = self.refreshing(rank, cand)  # [B]
        first = torch.where(cand, pos, L).amin(1)  # [B]: the window of a refresh: first ...
        last = torch.where(cand, pos, -1).amax(1)  # ... to last candidate
        self.lo, self.hi = torch.where(fresh, first, self.lo), torch.where(fresh, last, self.hi)
        live = (rank >= 0) & (rank == UNKNOWN).any(1, keepdim=True)  # [B, L]: finished rows forward nothing
        self.real = torch.where(fresh, (rank >= 0).sum(1), self.real)
        # the forwarded region: from the window (one more to the left for shifted logits) to
        # the row's end (prefix cache) or the window's end (dual cache); the rest is kept
        region = pos >= (self.lo - self.shift)[:, None]
        if self.suffix:
            region &= pos <= self.hi[:, None]
        keep = live & ~region & fresh[:, None]  # a refreshing row's kept positions lead its stream ...
        ahead = live & region  # ... then the forwarded ones: commit keeps exactly the first
        attrs = {"tokens": x, "pos": pos, "q_group": 0, "k_group": 0, "out": torch.where(cand, pos, -1)}
        s = pack((keep, attrs), (ahead, attrs))  # [B, N]
        s.n_append = keep.sum(1)
        self.kv.length = torch.where(fresh, 0, self.kv.length)  # a refresh rewrites the row's cache from slot 0
        self.refreshes += fresh
        return self.model(s, self.kv), s.out
