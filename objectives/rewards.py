"""Rewards of a decoded batch (registry kind "reward"), for the policy-gradient objectives.

``reward(score, decoded, ranks) -> Float64[B]``: ``score`` is the task's score of each
decoded row (``task.score``, computed once by the caller), ``decoded`` the rollout
(:class:`orderlab.decoding.Decoded`), ``ranks`` the reference ranks as the task gives
them (ranks >= 1 = to generate). ``n`` below is a row's number of positions to generate
(ranks >= 1) and ``nfe`` its number of denoiser calls.

Per-step rewards (registry kind "step_reward", SAS's dense rewards): ``step_reward(model,
tokens, order) -> Float64[T, B]``, the reward of each decode step of a row's order, with
:func:`returns_to_go` for the objectives that use them (``objectives/sas.py``).
"""

from __future__ import annotations

import abc

import torch
from torch import Tensor

from orderlab.likelihood import check_tokens, stream_log_probs
from orderlab.registry import declare_kind, register

__all__ = ["Reward", "TaskScore", "NFEPenalty", "StepDiscount", "StepReward", "PathwiseLikelihood",
           "position_log_probs", "returns_to_go"]


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


# ----------------------------------------------------------------------------- per-step rewards


def returns_to_go(r: Tensor) -> Tensor:
    """``[T, B]``: ``G_k = Σ_{j >= k} r_j`` of per-step rewards ``r [T, B]`` (the action at
    step ``k`` influences the rewards of steps ``k, k + 1, ...`` only; Williams 1992)."""
    return r.flip(0).cumsum(0).flip(0)


def position_log_probs(model, x: Tensor, ranks: Tensor) -> Tensor:
    """Float ``[B, L]``: ``log p_θ(x_i | x_{S<k})`` of each generated position ``i ∈ S_k``
    (0 at given and padding positions), the terms of the exact likelihood
    (:func:`orderlab.log_likelihood` is their row sum); the rule's passes, each query's
    log-probability scattered to its position."""
    check_tokens(model, x, ranks)
    B, L = x.shape
    out = torch.zeros(B, L + 1, device=x.device)  # column L: queries that predict nothing
    for s in model.rule.passes(x, ranks, model.mask_id):
        lp = stream_log_probs(model(s), s, x)  # [B, N], 0 where out == -1
        out = out.scatter_add(1, torch.where(s.out >= 0, s.out, L), lp)
    return out[:, :L]


@declare_kind("step_reward")
class StepReward(abc.ABC):
    """Base of kind "step_reward": ``__call__(model, tokens Long[B, L], order Long[B, L],
    steps=None) -> Float64[T, B]``, a reward for each decode step ``k = 1..T`` of the
    order (``order``: ranks as :attr:`Decoded.ranks` gives them, ``k`` = the step that
    revealed a position; 0 given, -1 padding; ``T = steps`` or the largest rank; rows
    that finished earlier get 0)."""

    @abc.abstractmethod
    def __call__(self, model, tokens: Tensor, order: Tensor, steps: int | None = None) -> Tensor: ...

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


@register("step_reward", "pathwise_likelihood")
class PathwiseLikelihood(StepReward):
    """``r_k = Σ_{i ∈ S_k} log p_θ(x_i | x_{S<k})``: the log-likelihood of the set revealed
    at step ``k`` given the earlier ones, so ``Σ_k r_k = log p_θ(x | σ)``, the pathwise
    likelihood of the data ``x`` under the order ``σ`` (exact, one likelihood evaluation:
    :func:`position_log_probs`).

    SAS (arXiv 2606.23567) rewards an order policy π with it: for the sampler
    ``p_π(x) = Σ_σ π(σ | x) p_θ(x | σ)`` (π walking the data's states), Jensen gives
    ``log p_π(x) ≥ E_{σ∼π(·|x)} log p_θ(x | σ)``, so
    ``KL(p_data ‖ p_π) ≤ −H(p_data) − E_x E_σ Σ_k r_k``: maximising the expected return
    minimises an upper bound on the KL, one reward per step (dense)."""

    def __call__(self, model, tokens, order, steps=None):
        lp = position_log_probs(model, tokens, order).double()  # [B, L]
        T = int(order.max()) if steps is None else int(steps)
        if (order > T).any():
            raise ValueError(f"pathwise_likelihood: the order has ranks up to {int(order.max())}, past steps={T}")
        B = tokens.shape[0]
        per = torch.zeros(B, T + 1, dtype=torch.float64, device=lp.device)  # column 0: given and padding (lp = 0)
        per = per.scatter_add(1, order.clamp(min=0), lp)
        return per[:, 1:].T.contiguous()  # [T, B]
