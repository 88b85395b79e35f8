"""Stochastic policies with ``log_prob(selected, view) -> Float[B]`` (RL and VI need it).

- ``RandomPolicy``: a uniformly random K-subset of the candidates (vanilla MDM).
- ``PlackettLuce``: sampling without replacement in proportion to ``exp(logits)``
  (DCoLT / LLaDOU, Huang et al. 2025), via Gumbel top-k.
- ``BernoulliPolicy``: every candidate independently, at least one forced (Jazbec et
  al. 2026, "Learning unmasking policies").
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import PolicyError, StepView
from .compose import All, Composed, KFromSchedule, Ranked, TopK, rank_candidates, take_prefix
from .scores import Score, Uniform, _Seeded, score_from
from orderlab.registry import register

__all__ = ["RandomPolicy", "PlackettLuce", "PlackettLucePolicy", "BernoulliPolicy"]


def _count(steps: int | None) -> TopK | KFromSchedule:
    return TopK(k=1) if steps is None else KFromSchedule(steps=steps)


def _log_choose(n: Tensor, k: Tensor) -> Tensor:
    n, k = n.double(), k.double()
    return torch.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)


def _subset_ok(selected: Tensor, view: StepView) -> Tensor:
    if selected.shape != view.candidates.shape or selected.dtype != torch.bool:
        raise PolicyError(f"selected must be Bool{list(view.candidates.shape)}, got {selected.dtype}{list(selected.shape)}")
    return ~(selected & ~view.candidates).any(1)  # [B]


@register("policy", "random")
class RandomPolicy(Composed):
    """Uniformly random positions, K per step from the linear schedule ``steps``
    (``None``: one per step). Vanilla MDM / MD4 ancestral sampling's order (Sahoo et al.
    2024; Shi et al. 2024): K = round(#masked · (α_s − α_t)/(1 − α_t))."""

    def __init__(self, steps: int | None = None, seed: int = 0):
        super().__init__(All(), Uniform(seed), _count(steps))
        self.steps, self.seed = steps, seed

    def log_prob(self, selected: Tensor, view: StepView) -> Tensor:
        """log 1/C(n, K) for a K-subset of the n candidates, −inf for anything else."""
        n = view.candidates.sum(1)
        r = Ranked(view.candidates.long(), view.confidence, view.candidates, n, self.step_of(view))
        k = torch.minimum(self.count.k(view, r).clamp_min(1), n)
        ok = _subset_ok(selected, view) & (selected.sum(1) == k)
        lp = -_log_choose(n, k)
        return torch.where(ok, lp, torch.full_like(lp, -math.inf))

    def __repr__(self) -> str:
        return f"RandomPolicy(steps={self.steps}, seed={self.seed})"


class PlackettLuce:
    """Plackett–Luce over the positions of each row with log-weights ``logits[B, L]``.

    ``sample`` draws an order by Gumbel top-k; ``log_prob_order`` is the DCoLT formula
    ``log π = Σ_k [log s_σk − log(Σ_unselected s + Σ_{j≥k} s_σj)]`` for the first ``k`` of
    an order; ``log_prob_set`` the exact probability that the first ``|S|`` draws are the
    set ``S`` in any order, ``Σ_{A⊆S} (−1)^|A| s_R / (s_R + s_A)`` (R = the rest; 2^|S| terms).
    """

    @staticmethod
    def sample(logits: Tensor, valid: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Long[B, L]: a full PL order of each row's valid positions (invalid ones last)."""
        where = None if generator is None else generator.device  # a CUDA generator draws on CUDA
        u = torch.rand(logits.shape, generator=generator, dtype=torch.float64, device=where).to(logits.device)
        g = -torch.log((-torch.log(u.clamp(1e-300, 1.0))).clamp_min(1e-300))
        return rank_candidates(logits.double() + g, valid).order

    @staticmethod
    def log_prob_order(logits: Tensor, order: Tensor, k: Tensor, valid: Tensor) -> Tensor:
        """Float[B]: log-probability of drawing ``order[:, :k]`` first, in that order."""
        ls = torch.where(valid, logits.double(), torch.full_like(logits, -math.inf, dtype=torch.float64))
        ls = ls.gather(1, order)  # [B, L] in draw order
        denom = ls.flip(1).logcumsumexp(1).flip(1)  # log Σ_{j ≥ slot} s
        term = torch.where(torch.isfinite(ls), ls - denom, torch.zeros_like(ls))
        slot = torch.arange(order.shape[1], device=order.device)[None, :]
        return (term * (slot < k[:, None])).sum(1)

    @staticmethod
    def log_prob_set(logits: Tensor, selected: Tensor, valid: Tensor, max_size: int = 16) -> Tensor:
        """Float[B]: exact log P(first |S| draws = S). Rows with |S| > max_size raise.

        Batched over the rows with the same ``|S| = m`` (a ``[rows, 2^m]`` sum each), so
        it is differentiable and fast for many rows with small sets.
        """
        B, L = logits.shape
        out = torch.full((B,), -math.inf, dtype=torch.float64, device=logits.device)
        ok = ~(selected & ~valid).any(1)
        S = selected & valid
        size = S.sum(1)
        certain = ok & ((size == 0) | ~(valid & ~S).any(1))  # nothing drawn, or every valid position
        out = torch.where(certain, torch.zeros_like(out), out)
        todo = ok & ~certain
        if not todo.any():
            return out
        too_big = todo & (size > max_size)
        if too_big.any():
            raise PolicyError(f"log_prob_set: |S| = {int(size[too_big].max())} > max_size = {max_size} (2^|S| terms)")
        masked = torch.where(valid, logits.double(), torch.full_like(logits, -math.inf, dtype=torch.float64))
        masked = torch.where(valid.any(1, keepdim=True), masked, torch.zeros_like(masked))
        w = torch.where(valid, torch.softmax(masked, 1), torch.zeros_like(masked))  # [B, L] normalised weights s
        s_R = (w * (valid & ~S)).sum(1)  # [B]
        first = (~S).to(torch.uint8).argsort(dim=1, stable=True)  # [B, L]: the positions of S first
        for m in size[todo].unique().tolist():
            rows = (todo & (size == m)).nonzero()[:, 0]  # [n]
            s_S = w[rows].gather(1, first[rows, :m])  # [n, m]
            bits = ((torch.arange(2**m, device=logits.device)[:, None] >> torch.arange(m, device=logits.device)) & 1).double()
            s_A = s_S @ bits.T  # [n, 2^m]: Σ_{i∈A} s_i for every A ⊆ S
            sign = 1.0 - 2.0 * (bits.sum(1) % 2)  # (−1)^|A|
            r = s_R[rows, None]
            p = (sign * r / (r + s_A)).sum(1)
            out = out.index_put((rows,), p.clamp_min(0).log())
        return out


class _LogitPolicy(Composed):
    """Shared part of the stochastic policies over ``logits = score / temperature``."""

    def __init__(self, score: Score | str, count, temperature: float, seed: int):
        if float(temperature) <= 0:
            raise PolicyError(f"temperature must be > 0, got {temperature}")
        super().__init__(All(), score_from(score), count)
        self.temperature = float(temperature)
        self._rng = _Seeded(seed)

    def logits(self, view: StepView) -> Tensor:
        return self.score(view).double() / self.temperature

    def _generator(self) -> torch.Generator:
        if self._rng._gen is None:
            self._rng._gen = torch.Generator().manual_seed(self._rng.seed)
        return self._rng._gen

    def reset(self) -> None:
        super().reset()
        self._rng.reset()


@register("policy", "plackett_luce")
class PlackettLucePolicy(_LogitPolicy):
    """K positions drawn without replacement ∝ exp(score / temperature) (Plackett–Luce;
    DCoLT / LLaDOU, Huang et al. 2025). K per step from ``steps`` (``None``: one).

    ``log_prob`` is exact over unordered sets (``PlackettLuce.log_prob_set``, sets up to
    16 positions); ``log_prob_order(view)`` gives the DCoLT ordered surrogate of the last
    sampled order.
    """

    def __init__(self, score: Score | str = "confidence", steps: int | None = None, temperature: float = 1.0, seed: int = 0):
        super().__init__(score, _count(steps), temperature, seed)
        self.steps, self.seed = steps, seed
        self.last_order: Tensor | None = None

    def select(self, view: StepView) -> Tensor:
        logits = self.logits(view)
        order = PlackettLuce.sample(logits, view.candidates, self._generator())
        r = Ranked(order, logits.gather(1, order), view.candidates.gather(1, order), view.candidates.sum(1), self.step_of(view))
        self.last_order = order
        return take_prefix(r, self.count.k(view, r))

    def log_prob(self, selected: Tensor, view: StepView) -> Tensor:
        n = view.candidates.sum(1)
        r = Ranked(view.candidates.long(), view.confidence, view.candidates, n, self.step_of(view))
        k = torch.minimum(self.count.k(view, r).clamp_min(1), n)
        lp = PlackettLuce.log_prob_set(self.logits(view), selected, view.candidates)
        ok = _subset_ok(selected, view) & (selected.sum(1) == k)
        return torch.where(ok, lp, torch.full_like(lp, -math.inf))

    def log_prob_order(self, view: StepView, selected: Tensor | None = None) -> Tensor:
        """DCoLT's log-probability of the last sampled order's first |selected| draws."""
        if self.last_order is None:
            raise PolicyError("log_prob_order needs a preceding select()")
        k = (selected if selected is not None else view.candidates).sum(1)
        return PlackettLuce.log_prob_order(self.logits(view), self.last_order, k, view.candidates)

    def reset(self) -> None:
        super().reset()
        self.last_order = None

    def __repr__(self) -> str:
        return f"PlackettLucePolicy({self.score!r}, steps={self.steps}, temperature={self.temperature}, seed={self.seed})"


@register("policy", "bernoulli")
class BernoulliPolicy(_LogitPolicy):
    """Each candidate revealed independently with ``sigmoid(scale · score + bias)``; a row
    that draws nothing reveals its top-scoring candidate (Jazbec et al. 2026, "Learning
    unmasking policies": Bernoulli unmask logits, at least one forced)."""

    def __init__(self, score: Score | str = "confidence", scale: float = 10.0, bias: float = -5.0, seed: int = 0):
        super().__init__(score, TopK(k=1), 1.0, seed)
        self.scale, self.bias, self.seed = float(scale), float(bias), seed

    def logits(self, view: StepView) -> Tensor:
        return self.scale * self.score(view).double() + self.bias

    def select(self, view: StepView) -> Tensor:
        logits = self.logits(view)
        u = torch.rand(logits.shape, generator=self._generator(), dtype=torch.float64).to(logits.device)
        sel = (u < torch.sigmoid(logits)) & view.candidates
        forced = take_prefix(rank_candidates(logits, view.candidates), torch.ones_like(view.candidates.sum(1)))
        return torch.where(sel.any(1, keepdim=True), sel, forced)

    def log_prob(self, selected: Tensor, view: StepView) -> Tensor:
        """Σ Bernoulli log-probs; the forced top set also gets the mass of the empty draw."""
        logits = self.logits(view)
        c = view.candidates
        lp_in, lp_out = torch.nn.functional.logsigmoid(logits), torch.nn.functional.logsigmoid(-logits)
        lp = torch.where(c, torch.where(selected, lp_in, lp_out), torch.zeros_like(lp_in)).sum(1)
        empty = torch.where(c, lp_out, torch.zeros_like(lp_out)).sum(1)
        forced = take_prefix(rank_candidates(logits, c), torch.ones_like(c.sum(1)))
        is_forced = (selected == forced).all(1) & c.any(1)
        lp = torch.where(is_forced, torch.logaddexp(lp, empty), lp)
        nonempty_ok = selected.any(1) | ~c.any(1)
        ok = _subset_ok(selected, view) & nonempty_ok
        return torch.where(ok, lp, torch.full_like(lp, -math.inf))

    def __repr__(self) -> str:
        return f"BernoulliPolicy({self.score!r}, scale={self.scale}, bias={self.bias}, seed={self.seed})"
