"""Rewards of a decoded batch (registry kind "reward"), for the policy-gradient objectives.

``reward(score, decoded, ranks) -> Float64[B]``: ``score`` is the task's score of each
decoded row (``task.score``, computed once by the caller), ``decoded`` the rollout
(:class:`orderlab.decoding.Decoded`), ``ranks`` the reference ranks as the task gives
them (ranks >= 1 = to generate). ``n`` below is a row's number of positions to generate
(ranks >= 1) and ``nfe`` its number of denoiser calls.
"""

from __future__ import annotations

import abc

from torch import Tensor

from orderlab.registry import declare_kind, register

__all__ = ["Reward", "TaskScore", "NFEPenalty", "StepDiscount"]


def _to_generate(ranks: Tensor) -> Tensor:
    return (ranks >= 1).sum(1).clamp_min(1).double()  # [B]


@declare_kind("reward")
class Reward(abc.ABC):
    """Base of kind "reward": ``__call__(score Float[B], decoded, ranks) -> Float64[B]``,
    the reward of each row from its task score and its decode (the score is given, so
    the task scores a rollout once)."""

    @abc.abstractmethod
    def __call__(self, score: Tensor, decoded, ranks: Tensor) -> Tensor: ...

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


@register("reward", "score")
class TaskScore(Reward):
    """The task's score of the decoded row (``task.score``, e.g. exact match)."""

    def __call__(self, score, decoded, ranks):
        return score.double()


@register("reward", "nfe_penalty")
class NFEPenalty(Reward):
    """``score − λ · nfe / n``: a price ``λ`` for a whole one-position-per-step decode;
    ``nfe / n ∈ [1/n, 1]`` (normalised by the positions to generate, so ``λ`` means the
    same on rows and tasks of any length)."""

    def __init__(self, lam: float = 0.1):
        if lam < 0:
            raise ValueError(f"nfe_penalty lam must be >= 0, got {lam}")
        self.lam = float(lam)

    def __call__(self, score, decoded, ranks):
        return score.double() - self.lam * decoded.nfe.double() / _to_generate(ranks)


@register("reward", "step_discount")
class StepDiscount(Reward):
    """``score · ((n − nfe + 1) / n)^α`` (Jazbec et al. 2026, "Learning unmasking
    policies": ``1[correct] · ((L − steps + 1)/L)^α``; the task's score is ``1[correct]``
    for exact-match tasks). 1 for a correct one-step decode, ``(1/n)^α`` for a correct
    one-position-per-step decode."""

    def __init__(self, alpha: float = 1.0):
        if alpha < 0:
            raise ValueError(f"step_discount alpha must be >= 0, got {alpha}")
        self.alpha = float(alpha)

    def __call__(self, score, decoded, ranks):
        n = _to_generate(ranks)
        frac = ((n - decoded.nfe.double() + 1) / n).clamp(0, 1)
        return score.double() * frac**self.alpha
