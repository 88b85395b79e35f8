"""Policy-gradient objectives for learned set-selection policies (DESIGN.md section 6).

One ``step`` = one batch of rollouts and one surrogate loss. Rollouts run
``orderlab.decode`` (training decodes exactly as evaluation) on the task's prompts
(rank 0 given; rank >= 1 masked), ``group`` rollouts per prompt, with the policy
*sampling* and recording its choices; the loss replays the recorded trajectories with
gradients (``LearnedPolicy.replay``), never re-running the denoiser. With a frozen
denoiser the gradient of the expected reward ``J(ψ) = E_{τ∼π_ψ}[R(τ)]`` is (Williams
1992, REINFORCE)::

    ∇J = E[(R(τ) − b) ∇ log π_ψ(τ)],   log π_ψ(τ) = Σ_k log π_ψ(S_k | state_k)

for any baseline ``b`` independent of the trajectory's own actions. The objectives
differ only in the advantage ``A = R − b``:

- ``reinforce``: ``b`` = mean reward of the *other* rows of the batch (unbiased), or an
  exponential moving average of earlier batches (``baseline_decay``);
- ``rloo``: ``b_i`` = mean of the other ``G − 1`` rollouts of the same prompt (Kool et
  al. 2019, "Buy 4 REINFORCE samples, get a baseline for free!"); unbiased;
- ``grpo``: ``A_i = (R_i − mean_G) / (std_G + ε)`` within the group, the PPO clipped ratio
  per step and an optional KL to a fixed reference policy, k3 estimator (Shao et al.
  2024, DeepSeekMath; UPO, Hong et al. 2026, regularises towards max-confidence).

``train_model=True`` also trains the denoiser on the same rollouts (LLaDOU, Huang et al.
2025): the sampled tokens' log-probability given the decoded order is exactly
``orderlab.log_likelihood(model, decoded.tokens, decoded.ranks)``, so the token term is
``−A · log p_θ(x | σ)``; it needs tokens sampled at temperature 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from orderlab.decoding import Decoded, decode
from orderlab.likelihood import log_likelihood
from orderlab.policies.base import Policy, PolicyError
from orderlab.policies.learned import DCoLTPolicy, LearnedBernoulli, LearnedPolicy, Replay, Trajectory
from orderlab.registry import ConfigError, register

from .base import Objective, StepOutput
from .rewards import Reward, TaskScore

__all__ = ["Rollout", "PolicyGradient", "Reinforce", "RLOO", "GRPO"]


@dataclass
class Rollout:
    """``group`` decodes of every prompt (rows of one prompt adjacent: ``[B·G, ...]``)."""

    decoded: Decoded
    traj: Trajectory
    tokens: Tensor  # Long[B·G, L] reference tokens (the prompt's, repeated)
    ranks: Tensor  # Long[B·G, L] ranks as the task gives them
    reward: Tensor  # Float[B·G]
    score: Tensor  # Float[B·G] the task's score
    step_reward: Tensor | None = None  # Float[T, B·G]: per-step rewards (SAS), if the objective has them


class PolicyGradient(Objective):
    """Shared part: rollouts, rewards, the REINFORCE surrogate ``−mean(A · log π(τ))``,
    an entropy bonus and the optional joint denoiser term. Subclasses define
    ``advantages(reward Float[B, G]) -> Float[B, G]``.

    ``task``: the experiment's, from the build's context (each rollout is scored once
    with ``task.score``; the reward gets that score). ``policy``: a :class:`LearnedPolicy` (its parameters are this
    objective's; default ``learned``). ``reward``: default the task's score. ``entropy``: weight of
    the bonus ``mean over decode steps of H(π(· | state))``. ``temperature``: token
    sampling in rollouts (0 = argmax). ``cache``: decode with the exact KV cache. ``metric``:
    the score is this key of ``task.metrics`` (e.g. ``token_accuracy``: partial credit, where
    sampled tokens almost never match a whole row exactly); null: ``task.score``.
    """

    trains_model = False
    needs = ("task",)
    nan_metrics = frozenset({"entropy"})  # _entropy_metric: NaN where the exact entropy is out of reach

    def __init__(self, task, policy: Policy | None = None, reward: Reward | None = None, group: int = 1,
                 entropy: float = 0.0, temperature: float = 0.0, cache: bool = True, train_model: bool = False,
                 metric: str | None = None):
        super().__init__(process=None)
        self.task = task
        self.metric = None if metric is None else str(metric)
        if self.metric is not None:  # a key of task.metrics, checked on one row before any work
            x, r = task.batch(1)
            keys = list(task.metrics(x, x, r))
            if self.metric not in keys:
                raise ConfigError("metric", f"the task has no metric {self.metric!r}; its metrics: {keys}")
        self.policy = LearnedBernoulli() if policy is None else policy
        if not isinstance(self.policy, LearnedPolicy):
            raise ConfigError("policy", f"a policy-gradient objective needs a learned policy (learned, "
                              f"learned_plackett_luce), got {type(self.policy).__name__}")
        self.reward = TaskScore() if reward is None else reward
        if int(group) < 1:
            raise ConfigError("group", f"must be >= 1, got {group}")
        if train_model and float(temperature) != 1.0:
            raise ConfigError("temperature", "train_model needs tokens sampled at temperature 1.0 (the "
                              f"likelihood's distribution), got {temperature}")
        self.group, self.entropy, self.temperature, self.cache = int(group), float(entropy), float(temperature), bool(cache)
        self.trains_model = bool(train_model)
        self.reference: Policy | None = None  # GRPO's KL reference: its log-probs are recorded in rollouts

    # -- rollouts
    @torch.no_grad()
    def rollout(self, model, tokens: Tensor, ranks: Tensor, generator: torch.Generator | None = None,
                reference: Policy | None = None) -> Rollout:
        G = self.group
        x, r = tokens.repeat_interleave(G, 0), ranks.repeat_interleave(G, 0)  # [B·G, L]
        where = None if generator is None else generator.device  # the trainer's generator lives on the model's device
        seed = int(torch.randint(0, 2**62, (), generator=generator, device=where))  # fresh, reproducible randomness per step
        with self.policy.recording(seed=seed, greedy=False, reference=reference) as traj:
            d = decode(model, self.policy, x, r, cache=self.cache, temperature=self.temperature, seed=seed,
                       eos_id=self.task.eos_id, pad_id=getattr(self.task, "pad_id", None))
        score = self._score(d.tokens, x, r)  # once: the reward is built on it
        return Rollout(d, traj, x, r, self.reward(score, d, r).to(x.device), score)

    def _score(self, pred: Tensor, x: Tensor, r: Tensor) -> Tensor:
        """Float64[N]: ``task.score``, or the task metric ``metric`` (e.g. ``token_accuracy``)."""
        s = self.task.score(pred, x, r) if self.metric is None else self.task.metrics(pred, x, r)[self.metric]
        return s.double().to(x.device)

    # -- the estimator
    def advantages(self, reward: Tensor) -> Tensor:
        """Float[B, G]: the advantage of each rollout (rewards ``[B, G]``, one prompt per row)."""
        raise NotImplementedError

    def rollout_advantages(self, ro: Rollout) -> Tensor:
        """Float ``[B·G]`` (one advantage per rollout) or ``[T, B·G]`` (one per decode step,
        e.g. from returns-to-go), detached: ``advantages`` of the rollouts' rewards."""
        return self.advantages(ro.reward.view(-1, self.group)).reshape(-1).detach()

    def surrogate(self, rep: Replay, ro: Rollout, adv: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Scalar whose gradient is the policy-gradient estimate (to minimise)."""
        return -(adv * rep.log_prob).mean(), {}

    def step(self, model, tokens: Tensor, ranks: Tensor, generator: torch.Generator | None = None) -> StepOutput:
        ro = self.rollout(model, tokens, ranks, generator, self.reference)
        adv = self.rollout_advantages(ro)  # [B·G] or [T, B·G]
        rep = self.policy.replay(ro.traj)
        loss, metrics = self.surrogate(rep, ro, adv)
        if self.entropy:
            loss = loss - self.entropy * rep.step_entropy[rep.active].mean()  # mean over (row, decode step)
        if self.trains_model:
            loss = loss - (adv.to(torch.float32) * log_likelihood(model, ro.decoded.tokens, ro.decoded.ranks)).mean()
        d = ro.decoded
        revealed = torch.stack(d.tokens_per_step).sum(0) if d.tokens_per_step else torch.zeros_like(d.nfe)
        metrics = {
            "loss": float(loss.detach()),
            "reward": float(ro.reward.mean()),
            "score": float(ro.score.mean()),
            "nfe": float(d.nfe.double().mean()),
            "tokens_per_step": float(revealed.sum()) / max(int(d.nfe.sum()), 1),
            "entropy": self._entropy_metric(rep),
            "log_prob": float(rep.log_prob.detach().mean()),
            **metrics,
        }
        return StepOutput(loss, metrics)

    @staticmethod
    def _entropy_metric(rep: Replay) -> float:
        """Mean per-step policy entropy; NaN where the exact entropy is out of reach (top-k
        sets with C(n, k) beyond the enumeration limit) and no entropy bonus needs it."""
        try:
            ent = rep.step_entropy[rep.active]
        except PolicyError:
            return math.nan
        return float(ent.detach().mean()) if ent.numel() else 0.0

    def extra_repr(self) -> str:
        metric = "" if self.metric is None else f", metric={self.metric!r}"
        return f"group={self.group}, entropy={self.entropy}, temperature={self.temperature}, train_model={self.trains_model}{metric}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()}, policy={self.policy!r}, reward={self.reward!r})"


@register("objective", "reinforce")
class Reinforce(PolicyGradient):
    """REINFORCE with a baseline (Williams 1992): ``A_i = R_i − b``.

    ``baseline_decay=None``: ``b_i`` = mean reward of the other rows of the batch
    (leave-one-out, so ``b_i`` does not depend on row ``i``'s actions: unbiased).
    ``baseline_decay=β ∈ [0, 1)``: ``b`` = bias-corrected exponential moving average of
    the mean reward of *earlier* batches (``b = m_t / (1 − β^t)``, ``m_t = β m_{t−1} +
    (1 − β) mean R``; 0 before the first batch), kept in the state dict.
    """

    def __init__(self, task, policy: Policy | None = None, reward: Reward | None = None, group: int = 1,
                 baseline_decay: float | None = None, entropy: float = 0.0, temperature: float = 0.0,
                 cache: bool = True, train_model: bool = False, metric: str | None = None):
        super().__init__(task, policy, reward, group, entropy, temperature, cache, train_model, metric)
        if baseline_decay is not None and not 0.0 <= baseline_decay < 1.0:
            raise ConfigError("baseline_decay", f"must be in [0, 1) or null, got {baseline_decay}")
        self.baseline_decay = baseline_decay
        self.register_buffer("ema", torch.zeros((), dtype=torch.float64))
        self.register_buffer("ema_steps", torch.zeros((), dtype=torch.long))

    def advantages(self, reward: Tensor) -> Tensor:
        R = reward.reshape(-1)
        if self.baseline_decay is None:
            n = R.numel()
            b = (R.sum() - R) / (n - 1) if n > 1 else torch.zeros_like(R)
        else:
            beta = self.baseline_decay
            t = int(self.ema_steps)
            b = (self.ema / (1 - beta**t) if t > 0 else torch.zeros_like(self.ema)).expand_as(R)
            self.ema.mul_(beta).add_((1 - beta) * R.mean().to(self.ema))
            self.ema_steps += 1
        return (R - b).view_as(reward)

    def extra_repr(self) -> str:
        return f"baseline_decay={self.baseline_decay}, {super().extra_repr()}"


def _check_group(group: int, name: str) -> None:
    if int(group) < 2:
        raise ConfigError("group", f"{name} needs group >= 2 rollouts per prompt, got {group}")


@register("objective", "rloo")
class RLOO(PolicyGradient):
    """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024): ``G`` rollouts per
    prompt, ``A_i = R_i − (1/(G−1)) Σ_{j≠i} R_j``. Unbiased: ``E[∇̂] = ∇J``."""

    def __init__(self, task, policy: Policy | None = None, reward: Reward | None = None, group: int = 4,
                 entropy: float = 0.0, temperature: float = 0.0, cache: bool = True, train_model: bool = False,
                 metric: str | None = None):
        _check_group(group, "rloo")
        super().__init__(task, policy, reward, group, entropy, temperature, cache, train_model, metric)

    def advantages(self, reward: Tensor) -> Tensor:
        G = reward.shape[1]
        return reward - (reward.sum(1, keepdim=True) - reward) / (G - 1)


@register("objective", "grpo")
class GRPO(PolicyGradient):
    """Group relative policy optimisation (Shao et al. 2024, DeepSeekMath, eq. 3), per
    decode step ``k`` of rollout ``i`` with ratio ``ρ = π_ψ(S_k|s_k) / π_old(S_k|s_k)``::

        A_i = (R_i − mean_G R) / (std_G R + 1e-6)        (``scale=False``: R_i − mean_G R)
        L   = −mean_i Σ_k [ min(ρ A_i, clip(ρ, 1−ε, 1+ε) A_i) − β k3_ik ]
        k3  = π_ref/π_ψ − log(π_ref/π_ψ) − 1             (Schulman's unbiased KL estimator)

    (``std_G``: the unbiased sample standard deviation.) Steps are summed, not averaged
    per rollout (no length normalisation: Liu et al. 2025, "Dr. GRPO"). ``π_old`` is the
    policy that decoded the rollouts: one update per rollout batch makes ``ρ = 1`` (the
    single-update setting of DeepSeekMath), so the clip is inactive and the gradient is
    ``mean_i A_i ∇ log π(τ_i)``. ``scale=False`` makes its expectation exactly
    ``(G−1)/G · ∇J``; with ``scale=True`` and 0/1 rewards it is a positive multiple of
    ``∇J`` (the tests check both).

    ``reference``: a fixed stochastic policy with the same support as ``policy`` (e.g.
    the same learned family with ``net: {name: linear, weight: [10.0], bias: -5.0}`` over
    ``features: [confidence]``: a softened confidence rule); ``kl`` is β. Its parameters
    are frozen.
    """

    def __init__(self, task, policy: Policy | None = None, reward: Reward | None = None, group: int = 4,
                 clip: float = 0.2, scale: bool = True, kl: float = 0.0, reference: Policy | None = None,
                 entropy: float = 0.0, temperature: float = 0.0, cache: bool = True, train_model: bool = False,
                 metric: str | None = None):
        _check_group(group, "grpo")
        super().__init__(task, policy, reward, group, entropy, temperature, cache, train_model, metric)
        if not 0.0 < clip < 1.0:
            raise ConfigError("clip", f"must be in (0, 1), got {clip}")
        if kl < 0 or (kl > 0) != (reference is not None):
            raise ConfigError("kl", f"a KL weight kl > 0 needs a reference policy and vice versa (kl={kl}, "
                              f"reference={reference!r})")
        if reference is not None and isinstance(self.policy, DCoLTPolicy) and self.policy.k != 1:
            raise ConfigError("reference", "a dcolt policy's log π is its ordered draw's, a reference's log_prob is a "
                                           "set's: with k > 1 the KL estimate would mix the two; use k: 1 or no reference")
        self.clip, self.scale, self.kl = float(clip), bool(scale), float(kl)
        self.reference = reference
        if isinstance(self.reference, nn.Module):
            self.reference.requires_grad_(False)

    def advantages(self, reward: Tensor) -> Tensor:
        centred = reward - reward.mean(1, keepdim=True)
        return centred / (reward.std(1, keepdim=True) + 1e-6) if self.scale else centred

    def surrogate(self, rep: Replay, ro: Rollout, adv: Tensor) -> tuple[Tensor, dict[str, float]]:
        new = rep.step_log_prob  # [T, N] with gradients
        old = ro.traj.stacked("log_prob").to(new)  # [T, N] at decode time
        ratio = torch.exp(new - old)
        a = adv.to(new) if adv.dim() == 2 else adv.to(new)[None]  # [T, N] per step or [1, N] per rollout
        surr = torch.minimum(ratio * a, ratio.clamp(1 - self.clip, 1 + self.clip) * a)
        surr = torch.where(rep.active, surr, torch.zeros_like(surr))  # finished rows chose nothing
        loss = -surr.sum(0).mean()
        metrics = {"clipped": float(((ratio - 1).abs() > self.clip)[rep.active].double().mean()) if rep.active.any() else 0.0}
        if self.reference is not None:
            ref = ro.traj.stacked("ref_log_prob").to(new)
            if torch.isinf(ref[rep.active]).any():
                raise ConfigError("reference", f"{self.reference!r} gives probability 0 to a set the policy "
                                  "chose; the reference needs the policy's support (same set family and size rule)")
            log_r = torch.where(rep.active, ref - new, torch.zeros_like(new))
            k3 = (log_r.exp() - log_r - 1).sum(0).mean()
            loss = loss + self.kl * k3
            metrics["kl"] = float(k3.detach())
        return loss, metrics

    def extra_repr(self) -> str:
        return f"clip={self.clip}, scale={self.scale}, kl={self.kl}, {super().extra_repr()}"
