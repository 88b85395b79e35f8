"""Exact distributions over the set ``S`` a row reveals in one step (learned policies).

Both act on per-position ``logits Float[B, L]`` restricted to ``valid Bool[B, L]`` (the
candidates) and give an exact ``sample``, ``log_prob(S)`` and ``entropy``; ``mode`` is the
greedy choice with ties broken at random. A row without valid positions has the empty
set with probability 1 (log-probability 0, entropy 0).

- :class:`NonEmptyBernoulli`: every candidate independently with ``p_i = σ(l_i)``,
  conditioned on a non-empty draw (Jazbec et al. 2026 force at least one position; the
  conditional makes that an exact distribution)::

      P(S) = Π_{i∈S} p_i Π_{i∉S} (1 − p_i) / Z,   Z = 1 − Π_i (1 − p_i),   S ≠ ∅

- :class:`PlackettLuceTopK`: the first ``k`` draws without replacement with probabilities
  ``∝ exp(l_i)`` (DCoLT / LLaDOU, Huang et al. 2025), as an unordered set; ``log_prob`` is
  the exact inclusion–exclusion of :meth:`PlackettLuce.log_prob_set`.
- :class:`OrderedPlackettLuce`: the same draws *with their order* (DCoLT's action): an
  action is ``Long[B, L]`` draw slots (``j`` = the ``j``-th draw, 0 = not drawn) and
  ``log_prob`` is DCoLT's formula for the ordered draws.

An *action* is what ``sample`` / ``mode`` return and ``log_prob`` scores: the set
``Bool[B, L]`` itself, except for the ordered distribution; ``selected(action)`` is always
the set.

All computations are in float64 and differentiable in ``logits``.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import PolicyError
from .compose import Ranked, rank_candidates, take_prefix
from .stochastic import PlackettLuce

__all__ = ["SetDistribution", "NonEmptyBernoulli", "PlackettLuceTopK", "OrderedPlackettLuce", "rank_random_ties"]

_NEG_INF = -math.inf


def _uniform(shape: torch.Size, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """U(0, 1) in float64, drawn where the generator lives (a CPU generator: results
    independent of the model's device; a CUDA one, as training passes on a GPU, draws there)."""
    where = None if generator is None else generator.device
    return torch.rand(shape, generator=generator, dtype=torch.float64, device=where).to(device)


def rank_random_ties(score: Tensor, valid: Tensor, generator: torch.Generator | None = None) -> Ranked:
    """Like :func:`rank_candidates`, but equal scores are ordered uniformly at random
    (a random permutation first, then a stable sort by score), not by position."""
    perm = _uniform(score.shape, generator, score.device).argsort(dim=1)  # [B, L] random order
    r = rank_candidates(score.gather(1, perm), valid.gather(1, perm))
    return Ranked(perm.gather(1, r.order), r.score, r.valid, r.n, 0)


def _check(name: str, logits: Tensor, valid: Tensor) -> None:
    if logits.dim() != 2 or valid.shape != logits.shape or valid.dtype != torch.bool:
        raise PolicyError(f"{name} needs logits Float[B, L] and valid Bool[B, L], got {tuple(logits.shape)} and "
                          f"{valid.dtype}{list(valid.shape)}")


def _check_selected(selected: Tensor, valid: Tensor) -> Tensor:
    """Bool[B]: rows whose ``selected`` is a subset of ``valid``."""
    if selected.shape != valid.shape or selected.dtype != torch.bool:
        raise PolicyError(f"selected must be Bool{list(valid.shape)}, got {selected.dtype}{list(selected.shape)}")
    return ~(selected & ~valid).any(1)


class SetDistribution:
    """Base of the set distributions: ``sample``, ``mode``, ``log_prob``, ``entropy``."""

    def __init__(self, logits: Tensor, valid: Tensor):
        _check(type(self).__name__, logits, valid)
        self.logits, self.valid = logits.double(), valid
        self.n = valid.sum(1)  # Long[B] candidates per row

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """Bool[B, L]: an exact draw."""
        raise NotImplementedError

    def mode(self, generator: torch.Generator | None = None) -> Tensor:
        """Bool[B, L]: the greedy choice (ties broken at random with ``generator``)."""
        raise NotImplementedError

    def log_prob(self, selected: Tensor) -> Tensor:
        """Float[B]: log P(selected); −inf outside the support."""
        raise NotImplementedError

    def selected(self, action: Tensor) -> Tensor:
        """Bool[B, L]: the set an action reveals (the action itself for set distributions)."""
        return action

    def entropy(self) -> Tensor:
        """Float[B]: −Σ_S P(S) log P(S) in nats."""
        raise NotImplementedError


class NonEmptyBernoulli(SetDistribution):
    """Independent Bernoulli(σ(l_i)) per candidate, conditioned on at least one.

    Sampling is exact without rejection: the first chosen candidate ``j`` (in position
    order) has ``P(j) = p_j Π_{i<j} (1 − p_i) / Z``; the candidates after ``j`` are then
    independent Bernoulli draws, those before it are not chosen. The entropy is closed
    form, with ``E[1{i∈S}] = p_i / Z``::

        H = log Z − Σ_i [ (p_i/Z) log p_i + (1 − p_i/Z) log(1 − p_i) ]
    """

    def __init__(self, logits: Tensor, valid: Tensor):
        super().__init__(logits, valid)
        zero = torch.zeros_like(self.logits)
        self.log_p = torch.where(valid, F.logsigmoid(self.logits), zero)  # log p_i (0 off the candidates)
        self.log_q = torch.where(valid, F.logsigmoid(-self.logits), zero)  # log (1 − p_i)
        has = self.n > 0
        # log Z = log(1 − Π (1 − p_i)); rows without candidates get a dummy −1 inside the
        # log (then 0), so no 0 · inf = NaN reaches the gradient
        log_empty = torch.where(has, self.log_q.sum(1), torch.full_like(self.log_q[:, 0], -1.0))
        self.log_z = torch.where(has, torch.log(-torch.expm1(log_empty)), torch.zeros_like(log_empty))

    def sample(self, generator=None) -> Tensor:
        before = self.log_q.cumsum(1) - self.log_q  # log Π_{i<j} (1 − p_i)
        w = torch.where(self.valid, self.log_p + before, torch.full_like(before, _NEG_INF))
        u = _uniform(w.shape, generator, w.device)
        gumbel = -torch.log((-torch.log(u.clamp(1e-300, 1.0))).clamp_min(1e-300))
        first = (w + gumbel).argmax(1, keepdim=True)  # [B, 1] exact categorical draw of j
        pos = torch.arange(w.shape[1], device=w.device)[None, :]
        rest = (_uniform(w.shape, generator, w.device) < self.log_p.exp()) & (pos > first)
        sel = (rest | (pos == first)) & self.valid
        return sel & self.valid.any(1, keepdim=True)

    def mode(self, generator=None) -> Tensor:
        """{i : p_i > 1/2}; if that is empty the most likely singleton (adding an element
        with p ≤ 1/2 never raises the probability), ties at random."""
        sel = (self.logits > 0) & self.valid
        top = take_prefix(rank_random_ties(self.logits, self.valid, generator), torch.ones_like(self.n))
        return torch.where(sel.any(1, keepdim=True), sel, top)

    def log_prob(self, selected: Tensor) -> Tensor:
        ok = _check_selected(selected, self.valid)
        lp = torch.where(selected, self.log_p, self.log_q).sum(1) - self.log_z
        ok = ok & (selected.any(1) | (self.n == 0))
        return torch.where(ok, lp, torch.full_like(lp, _NEG_INF))

    def entropy(self) -> Tensor:
        incl = torch.where(self.valid, (self.log_p - self.log_z[:, None]).exp(), torch.zeros_like(self.log_p))  # p_i / Z
        return self.log_z - (incl * self.log_p + (1 - incl) * self.log_q).sum(1)  # 0 on rows without candidates


class PlackettLuceTopK(SetDistribution):
    """The set of the first ``k[b]`` Plackett–Luce draws (Gumbel top-k) of each row,
    ``k`` clamped to ``[1, n]``. ``log_prob`` is exact (``PlackettLuce.log_prob_set``;
    closed form ``log softmax`` when ``k = 1``); ``entropy`` is the categorical entropy
    for ``k = 1`` and an enumeration over all ``C(n, k)`` sets otherwise (at most
    ``max_sets`` per row). ``mode`` takes the ``k`` largest logits, ties at random.
    """

    def __init__(self, logits: Tensor, valid: Tensor, k: Tensor | int = 1, max_sets: int = 4096):
        super().__init__(logits, valid)
        k = torch.as_tensor(k, device=logits.device).long().expand_as(self.n)
        self.k = torch.minimum(k.clamp_min(1), self.n)  # 0 on rows without candidates
        self.max_sets = max_sets
        masked = torch.where(valid, self.logits, torch.full_like(self.logits, _NEG_INF))
        masked = torch.where(valid.any(1, keepdim=True), masked, torch.zeros_like(masked))  # no NaN on empty rows
        lse = masked.logsumexp(1, keepdim=True)
        self.log_pi = torch.where(valid, masked - lse, torch.zeros_like(masked))  # log softmax over the candidates

    def sample(self, generator=None) -> Tensor:
        order = PlackettLuce.sample(self.logits, self.valid, generator)
        r = Ranked(order, self.logits.gather(1, order), self.valid.gather(1, order), self.n, 0)
        return take_prefix(r, self.k)

    def mode(self, generator=None) -> Tensor:
        return take_prefix(rank_random_ties(self.logits, self.valid, generator), self.k)

    def log_prob(self, selected: Tensor) -> Tensor:
        ok = _check_selected(selected, self.valid) & (selected.sum(1) == self.k)
        if bool((self.k <= 1).all()):  # P({i}) = softmax_i: one gather, no 2^|S| sum
            lp = (self.log_pi * selected).sum(1)
        else:
            lp = PlackettLuce.log_prob_set(self.logits, selected, self.valid)
        return torch.where(ok, lp, torch.full_like(lp, _NEG_INF))

    def entropy(self) -> Tensor:
        if bool((self.k <= 1).all()):
            return -(self.log_pi.exp() * self.log_pi).sum(1)
        out = self.logits.new_zeros(self.logits.shape[0])  # rows with k = 0 or k = n: one set, certain
        L = self.logits.shape[1]
        cand = self.valid.to(torch.uint8).argsort(dim=1, descending=True, stable=True)  # candidates first
        for n, k in {(int(n), int(k)) for n, k in zip(self.n.tolist(), self.k.tolist()) if 0 < k < n}:
            if math.comb(n, k) > self.max_sets:
                raise PolicyError(f"PlackettLuceTopK.entropy enumerates C({n}, {k}) > max_sets = {self.max_sets} sets; "
                                  "use k = 1 or the Bernoulli family for long rows")
            rows = ((self.n == n) & (self.k == k)).nonzero()[:, 0]  # [r]
            combos = torch.tensor(list(itertools.combinations(range(n), k)), device=rows.device)  # [C, k]
            pos = cand[rows][:, combos]  # [r, C, k]: positions of each k-subset of the candidates
            sets = torch.zeros(len(rows), len(combos), L, dtype=torch.bool, device=rows.device)
            sets.scatter_(2, pos, True)
            lp = PlackettLuce.log_prob_set(self.logits[rows].repeat_interleave(len(combos), 0), sets.flatten(0, 1),
                                           self.valid[rows].repeat_interleave(len(combos), 0)).view(len(rows), -1)
            plogp = torch.where(torch.isfinite(lp), lp.exp() * lp, torch.zeros_like(lp))  # 0 log 0 = 0
            out = out.index_put((rows,), -plogp.sum(1))  # [r]: −Σ_S P log P
        return out


class OrderedPlackettLuce(PlackettLuceTopK):
    """The first ``k[b]`` Plackett–Luce draws *in their order* (DCoLT / LLaDOU, Huang et al.
    2025: the unmasking policy module samples ``K`` positions one after another and
    its policy gradient uses the probability of that ordered draw). An action is
    ``slots Long[B, L]``: ``slots[b, i] = j`` if position ``i`` was the ``j``-th draw
    (``1..k``), 0 otherwise. With scores ``s_i = exp(l_i)`` over the candidates and the draw
    ``σ_1..σ_K`` (REFERENCES.md, "Learned orders", DCoLT)::

        log π(σ) = Σ_{k=1..K} [ log s_σk − log( Σ_{unselected} s + Σ_{j ≥ k} s_σj ) ]

    (:meth:`PlackettLuce.log_prob_order`). ``log_prob`` of a plain set ``Bool[B, L]`` (a
    teacher-forced step, whose draw order is unknown) is the set's exact probability, the
    sum over its ``K!`` orders (:class:`PlackettLuceTopK`); ``entropy`` is the entropy of
    the set, not of the ordered draw (equal for ``k = 1``). ``mode``: the ``k`` largest
    logits in decreasing order (the most likely ordered draw), ties at random.
    """

    def sample(self, generator=None) -> Tensor:
        return self._slots(PlackettLuce.sample(self.logits, self.valid, generator))

    def mode(self, generator=None) -> Tensor:
        return self._slots(rank_random_ties(self.logits, self.valid, generator).order)

    def _slots(self, order: Tensor) -> Tensor:
        """Long[B, L]: the draw slots of the first ``k`` positions of ``order [B, L]``."""
        slot = torch.arange(1, order.shape[1] + 1, device=order.device).expand_as(order)
        slot = torch.where(slot <= self.k[:, None], slot, torch.zeros_like(slot))
        return torch.zeros_like(order).scatter(1, order, slot)

    def selected(self, action: Tensor) -> Tensor:
        return action > 0 if action.dtype != torch.bool else action

    def log_prob(self, action: Tensor) -> Tensor:
        if action.dtype == torch.bool:
            return super().log_prob(action)
        if action.shape != self.valid.shape:
            raise PolicyError(f"draw slots must be Long{list(self.valid.shape)}, got {action.dtype}{list(action.shape)}")
        sel = action > 0
        K = sel.sum(1)
        L = action.shape[1]
        order = torch.where(sel, action - 1, action.new_full((), L) + torch.arange(L, device=action.device)).argsort(1)
        drawn = torch.arange(L, device=action.device)[None, :] < K[:, None]  # [B, L] slots 0..K-1 of ``order``
        dense = (action.gather(1, order) == torch.arange(1, L + 1, device=action.device)[None, :]) | ~drawn  # slots 1..K
        ok = _check_selected(sel, self.valid) & (K == self.k) & dense.all(1)
        lp = PlackettLuce.log_prob_order(self.logits, order, K, self.valid)
        return torch.where(ok, lp, torch.full_like(lp, _NEG_INF))
