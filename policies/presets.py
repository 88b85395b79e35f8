"""The literature's samplers as registered one-liners (REFERENCES.md, "Unmasking policies").

Constructor arguments are the YAML keys: ``policy: {name: threshold, tau: 0.8}``.
``steps`` is the number of decode steps: of the linear schedule for the MDM samplers (K
per step as in vanilla MDM, see ``KFromSchedule``), split evenly as LLaDA does for
``semi_ar`` and ``pc_sampler`` (see ``EvenSplit``); ``None`` reveals one position per step.
"""

from __future__ import annotations

from torch import Tensor

from orderlab.registry import register

from .base import StepView
from .compose import (
    All, Block, Composed, Count, EntropyBound, EvenSplit, Factor, First, KFromSchedule, Last, Threshold, TopK, Window,
)
from .scores import Confidence, Gumbel, Margin, NegEntropy, PCScore, PositionPrior, Score, score_from

__all__ = [
    "LeftToRight", "RightToLeft", "SemiAR", "TopProb", "TopMargin", "LowEntropy",
    "ConfidenceThreshold", "FactorRule", "EBSampler", "PCSampler", "SlidingWindow",
]


def _count(steps: int | None, rule: type[Count] = KFromSchedule) -> Count:
    return TopK(k=1) if steps is None else rule(steps=steps)


def _noisy(score: Score, noise: float, seed: int) -> Score:
    return score + Gumbel(noise, seed) if noise > 0 else score


@register("policy", "l2r")
class LeftToRight(Composed):
    """Autoregressive order: the first ``k`` masked positions per step."""

    def __init__(self, k: int = 1):
        super().__init__(First(k), PositionPrior("l2r"), TopK(k=k))


@register("policy", "r2l")
class RightToLeft(Composed):
    """Reverse autoregressive order: the last ``k`` masked positions per step."""

    def __init__(self, k: int = 1):
        super().__init__(Last(k), PositionPrior("r2l"), TopK(k=k))


@register("policy", "semi_ar")
class SemiAR(Composed):
    """Semi-autoregressive low-confidence remasking (LLaDA, Nie et al. 2025): blocks of
    ``block_size`` left to right, ``steps`` steps per block split evenly as LLaDA's
    ``get_num_transfer_tokens`` does (``EvenSplit`` over the block: 4 tokens in 3 steps →
    2, 1, 1; ``None``: one per step), the most confident first.
    Blocks are aligned to position 0, or to each row's prompt end with ``from_prompt_end``
    (LLaDA's generate; see ``Block``)."""

    def __init__(self, block_size: int = 32, steps: int | None = None, from_prompt_end: bool = False):
        super().__init__(Block(block_size, from_prompt_end), Confidence(), _count(steps, EvenSplit))
        self.steps = steps
        self._blk: Tensor | None = None  # Long[B] current block per row
        self._start: Tensor | None = None  # Long[B] step at which it started

    def step_of(self, view: StepView) -> int | Tensor:
        """Per row: steps since the row's current block started."""
        blk = self.rule.block_index(view.candidates)
        if self._blk is None or self._blk.shape != blk.shape or view.step == 0:
            self._blk, self._start = blk, blk.new_full(blk.shape, view.step)
        moved = blk != self._blk
        self._start = self._start.masked_fill(moved, view.step)
        self._blk = blk
        return view.step - self._start

    def reset(self) -> None:
        super().reset()
        self._blk = self._start = None


@register("policy", "top_prob")
class TopProb(Composed):
    """Most confident first (Kim et al., "Train for the Worst, Plan for the Best", ICML
    2025); ``noise`` adds that many Gumbel(0, 1) to the score (0.5 on puzzles)."""

    def __init__(self, steps: int | None = None, noise: float = 0.0, seed: int = 0):
        super().__init__(All(), _noisy(Confidence(), noise, seed), _count(steps))


@register("policy", "margin")
class TopMargin(Composed):
    """Largest top-1 − top-2 margin first (Kim et al. 2025)."""

    def __init__(self, steps: int | None = None, noise: float = 0.0, seed: int = 0):
        super().__init__(All(), _noisy(Margin(), noise, seed), _count(steps))


@register("policy", "entropy")
class LowEntropy(Composed):
    """Lowest predictive entropy first (Kim et al. 2025)."""

    def __init__(self, steps: int | None = None, noise: float = 0.0, seed: int = 0):
        super().__init__(All(), _noisy(NegEntropy(), noise, seed), _count(steps))


@register("policy", "threshold")
class ConfidenceThreshold(Composed):
    """Every masked position with confidence ≥ τ, at least the top one (Fast-dLLM, Wu et
    al., ICLR 2026)."""

    def __init__(self, tau: float = 0.9):
        super().__init__(All(), count=Threshold(Confidence(), tau))


@register("policy", "factor")
class FactorRule(Composed):
    """Fast-dLLM's factor rule: the longest confidence-sorted prefix with
    ``(n + 1)(1 − c_(n)) < f`` for every rank n (rank 1 always)."""

    def __init__(self, f: float = 1.0):
        super().__init__(All(), count=Factor(Confidence(), f))


@register("policy", "eb")
class EBSampler(Composed):
    """Entropy-bounded sampler (Ben-Hamu et al. 2025): sort by the error ``proxy``
    (a Score, or "entropy" / "confidence" / "margin"), reveal the largest prefix U with
    ``Σ_U H − max_U H ≤ γ``."""

    def __init__(self, gamma: float = 0.01, proxy: Score | str = "entropy"):
        super().__init__(All(), count=EntropyBound(score_from(proxy), gamma))


@register("policy", "pc_sampler")
class PCSampler(Composed):
    """PC-sampler (Huang et al. 2025): score ``exp(−λ(i − |prompt|)) · min(−p_i log p_D(x̂_i), α)``
    with ``p_D = token_freqs`` (``None``: uniform; unset in YAML, the task's token
    frequencies from the build's context); ``steps`` split evenly as in the release, which
    reuses LLaDA's ``get_num_transfer_tokens`` (``EvenSplit``)."""

    needs = ("token_freqs",)

    def __init__(self, lam: float = 0.25, alpha: float = 10.0, token_freqs: Tensor | list | None = None, steps: int | None = None):
        super().__init__(All(), PCScore(lam, alpha, token_freqs), _count(steps, EvenSplit))


@register("policy", "sliding_window")
class SlidingWindow(Composed):
    """SetDLM decoding (Arriola & Kuleshov 2026): candidates are the masked positions in
    ``[first masked, first masked + window)``; reveal the top one and every candidate with
    confidence ≥ τ."""

    def __init__(self, window: int = 8, tau: float = 0.9):
        super().__init__(Window(window), count=Threshold(Confidence(), tau))
