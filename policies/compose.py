"""Candidate rules, count rules and the ``Composed`` policy (DESIGN.md section 5).

A policy = a **candidate rule** (which masked positions may be revealed now), a
**score** (which first) and a **count rule** (how many: the accepted prefix of the
candidates sorted by score, descending; ties go to the lower position)::

    Window(8) >> Threshold(Confidence(), 0.9)            # SetDLM sliding window
    Composed(Block(32), Confidence(), EvenSplit(8))      # LLaDA semi-AR

Every count rule accepts at least one candidate per row that has candidates and at most
all of them; rows without candidates select nothing. All ops are batched per row.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from orderlab.ranks import require

from .base import Policy, PolicyError, StepView
from .scores import Confidence, Score, _first_true

__all__ = [
    "CandidateRule", "All", "Block", "Window", "First", "Last",
    "Ranked", "Count", "TopK", "KFromSchedule", "EvenSplit", "Threshold", "Factor", "EntropyBound",
    "Composed", "rank_candidates", "take_prefix",
]


# ----------------------------------------------------------------------------- candidates


class CandidateRule:
    """``rule(masked Bool[B, L], step) -> Bool[B, L]``, a subset of ``masked``."""

    def __call__(self, masked: Tensor, step: int) -> Tensor:
        raise NotImplementedError

    def __rshift__(self, count: "Count") -> "Composed":
        if not isinstance(count, Count):
            return NotImplemented
        return Composed(candidates=self, count=count)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class All(CandidateRule):
    """Every masked position (MDM decoding)."""

    def __call__(self, masked: Tensor, step: int) -> Tensor:
        return masked


def _positions(masked: Tensor) -> Tensor:
    return torch.arange(masked.shape[1], device=masked.device).expand_as(masked)


class Block(CandidateRule):
    """The masked positions of the first block ``[o + j·b, o + (j+1)·b)`` that still has any.

    ``o = 0`` by default: blocks aligned to absolute position 0, like BD3-LM's block-causal
    attention. ``from_prompt_end``: ``o`` is each row's first masked position at step 0, the
    end of its prompt, as LLaDA's generate aligns its ``block_length`` blocks (a row of a
    left-padded batch then has the blocks it has alone).
    """

    def __init__(self, block_size: int, from_prompt_end: bool = False):
        if int(block_size) < 1:
            raise PolicyError(f"Block block_size must be >= 1, got {block_size}")
        self.block_size = int(block_size)
        self.from_prompt_end = bool(from_prompt_end)
        self._origin: Tensor | None = None  # Long[B, 1]: o per row, set at step 0

    def _offset(self, masked: Tensor) -> Tensor | int:
        return self._origin if self.from_prompt_end and self._origin is not None else 0

    def block_index(self, masked: Tensor) -> Tensor:
        """Long[B]: index of the current block (past the last one where nothing is masked)."""
        o = self._offset(masked)
        return (_first_true(masked)[:, None] - o)[:, 0] // self.block_size

    def __call__(self, masked: Tensor, step: int) -> Tensor:
        if self.from_prompt_end and (step == 0 or self._origin is None or self._origin.shape[0] != masked.shape[0]):
            self._origin = _first_true(masked)[:, None]
        blk = self.block_index(masked)  # [B]
        return masked & ((_positions(masked) - self._offset(masked)) // self.block_size == blk[:, None])

    def __repr__(self) -> str:
        return f"Block({self.block_size}{', from_prompt_end=True' if self.from_prompt_end else ''})"


class Window(CandidateRule):
    """Masked positions in ``[f, f + W)``, ``f`` the first masked position (SetDLM)."""

    def __init__(self, window: int):
        if int(window) < 1:
            raise PolicyError(f"Window size must be >= 1, got {window}")
        self.window = int(window)

    def __call__(self, masked: Tensor, step: int) -> Tensor:
        f = _first_true(masked)[:, None]  # [B, 1]
        i = _positions(masked)
        return masked & (i >= f) & (i < f + self.window)

    def __repr__(self) -> str:
        return f"Window({self.window})"


class First(CandidateRule):
    """The first ``k`` masked positions (left to right; ``First(1)`` = AR)."""

    def __init__(self, k: int = 1):
        if int(k) < 1:
            raise PolicyError(f"First k must be >= 1, got {k}")
        self.k = int(k)

    def __call__(self, masked: Tensor, step: int) -> Tensor:
        return masked & (masked.long().cumsum(1) <= self.k)

    def __repr__(self) -> str:
        return f"First({self.k})"


class Last(CandidateRule):
    """The last ``k`` masked positions (right to left)."""

    def __init__(self, k: int = 1):
        if int(k) < 1:
            raise PolicyError(f"Last k must be >= 1, got {k}")
        self.k = int(k)

    def __call__(self, masked: Tensor, step: int) -> Tensor:
        from_right = masked.long().flip(1).cumsum(1).flip(1)  # masked count in [i, L)
        return masked & (from_right <= self.k)

    def __repr__(self) -> str:
        return f"Last({self.k})"


# ----------------------------------------------------------------------------- ranking


class Ranked(NamedTuple):
    """Candidates of each row sorted by score (descending, ties: lower position first).

    order  Long[B, L]   positions in sorted order (candidates first)
    score  Float[B, L]  the score in that order (-inf past the candidates)
    valid  Bool[B, L]   candidate flag in that order (a prefix of each row)
    n      Long[B]      number of candidates
    step   int | Long[B]  the decode step (per row for block-relative schedules)
    """

    order: Tensor
    score: Tensor
    valid: Tensor
    n: Tensor
    step: int | Tensor


def rank_candidates(score: Tensor, candidates: Tensor, step: int | Tensor = 0) -> Ranked:
    """Sort each row's candidates by ``score``; non-candidates go last. NaN scores of
    candidates are an error (a NaN would silently sort as the lowest score)."""
    nan = torch.isnan(score) & candidates

    def where() -> str:
        b, i = (int(v) for v in nan.nonzero()[0])
        return f"position [{b}, {i}] (score shape {tuple(score.shape)})"

    require(~nan.any(), "score is NaN at a candidate position", where, PolicyError)
    s = torch.where(candidates, score, -math.inf)
    # one stable ascending sort of -score with NaN at non-candidates: sorts put NaN after
    # every number (-inf scores of candidates included), so candidates come first by score
    # descending, ties and non-candidates in position order (what two stable sorts gave)
    order = torch.where(candidates, -score, math.nan).argsort(dim=1, stable=True)  # [B, L]
    return Ranked(order, s.gather(1, order), candidates.gather(1, order), candidates.sum(1), step)


def take_prefix(r: Ranked, k: Tensor) -> Tensor:
    """Bool[B, L]: the first ``k[b]`` ranked candidates of each row, ``k`` clamped to [1, n]."""
    k = torch.minimum(k.clamp_min(1), r.n)  # rows without candidates: 0
    slot = torch.arange(r.order.shape[1], device=r.order.device)[None, :]
    keep = slot < k[:, None]  # [B, L] in sorted order; k <= n, and the first n slots are the candidates
    return torch.zeros_like(keep).scatter(1, r.order, keep)


# ----------------------------------------------------------------------------- counts


class Count:
    """A count rule: ``k(view, ranked) -> Long[B]``, how many top-ranked candidates to take.

    A count rule may carry its own score (``Threshold(Confidence(), 0.9)``); ``None``
    means "the score of the enclosing ``Composed``".
    """

    score: Score | None = None

    def k(self, view: StepView, r: Ranked) -> Tensor:
        raise NotImplementedError

    def _args(self) -> str:
        return ""

    def __repr__(self) -> str:
        parts = ([repr(self.score)] if self.score is not None else []) + ([self._args()] if self._args() else [])
        return f"{type(self).__name__}({', '.join(parts)})"


class TopK(Count):
    """A fixed ``k`` per step."""

    def __init__(self, score: Score | None = None, k: int = 1):
        if int(k) < 1:
            raise PolicyError(f"TopK k must be >= 1, got {k}")
        self.score, self.kk = score, int(k)

    def k(self, view: StepView, r: Ranked) -> Tensor:
        return torch.full_like(r.n, self.kk)

    def _args(self) -> str:
        return f"k={self.kk}"


class KFromSchedule(Count):
    """``K = round(n / (steps − step))`` (vanilla MDM, linear α: the expected share
    ``(α_s − α_t)/(1 − α_t) = 1/(steps − step)`` of the ``n`` candidates); the last step
    (and any later one) takes all. Over ``steps`` steps the counts sum to ``n``."""

    def __init__(self, score: Score | None = None, steps: int = 1):
        if int(steps) < 1:
            raise PolicyError(f"{type(self).__name__} steps must be >= 1, got {steps}")
        self.score, self.steps = score, int(steps)

    def k(self, view: StepView, r: Ranked) -> Tensor:
        left = torch.as_tensor(self.steps - r.step, device=r.n.device).clamp_min(1)  # steps left incl. this
        return torch.round(r.n.double() / left).long()

    def _args(self) -> str:
        return f"steps={self.steps}"


class EvenSplit(KFromSchedule):
    """LLaDA's steps split (``get_num_transfer_tokens`` in LLaDA's generate.py, reused by
    PC-sampler; REFERENCES.md "Semi-AR"): the ``n0`` candidates present when the schedule
    starts are revealed in ``steps`` steps, ``n0 // steps`` per step and one more in the
    first ``n0 % steps`` steps (4 in 3 steps: 2, 1, 1).

    Computed without memory as ``K = ceil(n / (steps − step))`` from the ``n`` candidates
    left: after ``s`` steps of that split ``n = (steps − s)·q + (r − s)⁺`` (``q, r`` the
    quotient and remainder of ``n0``), whose ceiling share is the reference's count for
    step ``s``. The last step (and any later one) takes all. Where ``n0 < steps`` the
    reference spends its last ``steps − n0`` steps revealing nothing; here the schedule
    simply ends after ``n0`` steps (same tokens, fewer forwards). Arguments as
    :class:`KFromSchedule`, whose rounding it replaces by the ceiling.
    """

    def k(self, view: StepView, r: Ranked) -> Tensor:
        left = torch.as_tensor(self.steps - r.step, device=r.n.device).clamp_min(1)  # steps left incl. this
        return torch.div(r.n + left - 1, left, rounding_mode="floor")  # ceil(n / left), exact in integers


class Threshold(Count):
    """Every candidate with score ≥ τ, always the top one (Fast-dLLM, Wu et al.; τ = 0.9)."""

    def __init__(self, score: Score | None = None, tau: float = 0.9):
        self.score, self.tau = score, float(tau)

    def k(self, view: StepView, r: Ranked) -> Tensor:
        return ((r.score >= self.tau) & r.valid).sum(1)

    def _args(self) -> str:
        return f"tau={self.tau}"


class Factor(Count):
    """Fast-dLLM factor rule: sorted ``c_(1) ≥ c_(2) ≥ …``, accept the longest prefix in
    which every rank n satisfies ``(n + 1)(1 − c_(n)) < f``; rank 1 always. A failing last
    rank is rejected (the released code's off-by-one accepts it)."""

    def __init__(self, score: Score | None = None, f: float = 1.0):
        self.score, self.f = score, float(f)

    def k(self, view: StepView, r: Ranked) -> Tensor:
        n = torch.arange(1, r.score.shape[1] + 1, device=r.score.device, dtype=r.score.dtype)  # rank n
        ok = ((n + 1) * (1 - r.score) < self.f) & r.valid
        return ok.long().cumprod(1).sum(1)  # prefix before the first failure

    def _args(self) -> str:
        return f"f={self.f}"


class EntropyBound(Count):
    """Entropy-bounded sampler (Ben-Hamu et al. 2025): sort by an error proxy (the score;
    default lowest entropy first), accept the largest prefix U with
    ``Σ_U H − max_U H ≤ γ``. γ = 0 → one token (for non-zero entropies), γ = ∞ → all.
    The running max runs along each row's sorted positions, never across the batch."""

    def __init__(self, score: Score | None = None, gamma: float = 0.01):
        if float(gamma) < 0:
            raise PolicyError(f"EntropyBound gamma must be >= 0, got {gamma}")
        self.score, self.gamma = score, float(gamma)

    def k(self, view: StepView, r: Ranked) -> Tensor:
        h = view.entropy.gather(1, r.order).double()  # [B, L] in proxy order
        h = torch.where(r.valid, h, torch.zeros_like(h))
        excess = h.cumsum(1) - h.cummax(1).values  # Σ_U H − max_U H, per row
        ok = (excess <= self.gamma) & r.valid
        return ok.long().cumprod(1).sum(1)

    def _args(self) -> str:
        return f"gamma={self.gamma}"


# ----------------------------------------------------------------------------- composed


class Composed(Policy):
    """candidates >> score >> count. ``score=None`` uses the count rule's own score."""

    def __init__(self, candidates: CandidateRule | None = None, score: Score | None = None, count: Count | None = None):
        self.rule = candidates if candidates is not None else All()
        self.count = count if count is not None else TopK()
        score = score if score is not None else self.count.score
        self.score = score if score is not None else Confidence()

    def candidates(self, masked: Tensor, step: int) -> Tensor:
        return self.rule(masked, step)

    def step_of(self, view: StepView) -> int | Tensor:
        """The step the count rule sees (per row in block-relative schedules)."""
        return view.step

    def rank(self, view: StepView) -> Ranked:
        return rank_candidates(self.score(view), view.candidates, self.step_of(view))

    def select(self, view: StepView) -> Tensor:
        r = self.rank(view)
        return take_prefix(r, self.count.k(view, r))

    def reset(self) -> None:
        self.score.reset()
        if self.count.score is not None and self.count.score is not self.score:
            self.count.score.reset()

    def __repr__(self) -> str:
        count = repr(self.count)
        if self.count.score is None or self.count.score is not self.score:
            count = f"{self.score!r} >> {count}"
        return f"{self.rule!r} >> {count}"

