"""SAS (arXiv 2606.23567, 2026): an order policy trained by GRPO with a dense per-step
reward from a KL upper bound, the denoiser frozen.

The policy walks the *data*: at each step it chooses the set ``S_k`` from the denoiser's
view of the data's state ``x_{S<k}``, and the set is revealed with the data's tokens
(:func:`teacher_forced`). Step ``k``'s reward is ``r_k = Σ_{i∈S_k} log p_θ(x_i | x_{S<k})``
(:class:`~orderlab.objectives.rewards.PathwiseLikelihood`, from orderlab's exact
likelihood of the chosen order), whose sum bounds the KL from the data to the sampler
(see there). The advantage of step ``k`` is GRPO's process-supervision advantage
(Shao et al. 2024, DeepSeekMath, section 4.1.3): every step reward of a group of ``G``
rollouts of one prompt normalised by the group's mean and standard deviation over all
its steps, then summed from ``k`` on (:func:`step_advantages`); the loss is GRPO's clipped
surrogate with that per-step advantage (and GRPO's optional KL to a reference).

Checked against REFERENCES.md ("GRPO order policy with a dense per-step reward from a KL
upper bound computed with the pathwise log-likelihood, frozen denoiser"): GRPO, per-step
rewards whose sum is ``log p_θ(x | σ)`` (so the return is minus the bound's data term,
``rewards.PathwiseLikelihood``), the denoiser frozen (``train_model`` is not a key). Assumed
where the paper's exact rule is not given there:

- the KL is ``KL(p_data ‖ p_π)`` and the policy walks the *data* (teacher forcing), so the
  pathwise likelihood is of ``x``, not of a sample; the dense reward of step ``k`` is the
  log-likelihood of the set it revealed;
- the per-step advantages are DeepSeekMath's process supervision (normalise every step
  reward of the group, sum from ``k`` on). The group mean includes the rollout's own
  rewards (GRPO's usual bias: ``tests/test_sas.py`` computes the exact expectation), and
  when rollouts of one prompt take different numbers of steps (Bernoulli sets) a rollout
  gains ``−mean`` per extra step: the sum of its normalised rewards is
  ``(R − T·mean)/std``, not ``R`` centred. With a fixed set size (``learned_plackett_luce``,
  ``k`` per step) every rollout has the same ``T`` and this is a constant shift.
"""

from __future__ import annotations

import torch
from torch import Tensor

from orderlab.decoding import Decoded, _predict
from orderlab.policies.base import Policy, StepView
from orderlab.ranks import validate
from orderlab.registry import ConfigError, register
from orderlab.rules import UNKNOWN

from .base import StepOutput
from .policy_gradient import GRPO, Rollout
from .rewards import PathwiseLikelihood, StepReward, returns_to_go

__all__ = ["teacher_forced", "step_advantages", "SAS"]


@torch.no_grad()
def teacher_forced(model, policy: Policy, tokens: Tensor, ranks: Tensor, cache: bool = True) -> Decoded:
    """The policy's order over the data: ``orderlab.decode``'s loop (candidates, one
    forward, ``policy.select``) except that a chosen set is revealed with ``tokens``' own
    values, so every state the policy sees is the data's ``x_{S<k}``. ``tokens Long[B, L]``
    (true tokens at every non-padding position), ``ranks`` as the task gives them. Returns
    :class:`Decoded` (``tokens`` = the input, ``ranks`` = the order used, ``nfe``)."""
    validate(ranks, tokens)
    B, L = tokens.shape
    rule = model.rule
    rank = torch.where(ranks >= 1, torch.full_like(ranks, UNKNOWN), ranks).long()
    x = torch.where(ranks >= 1, torch.full_like(tokens, model.mask_id), tokens).long()
    kv = model.new_cache(B, L) if cache and rule.cacheable else None
    policy.reset()
    nfe = torch.zeros(B, dtype=torch.long, device=x.device)
    per_step: list[Tensor] = []
    step = 0
    while (masked := rank == UNKNOWN).any():
        allowed = rule.candidates(masked, rank)
        cand = allowed & policy.candidates(masked, step)
        cand = torch.where(cand.any(1, keepdim=True), cand, allowed)  # the rule wins, as in decode
        probs, hidden = _predict(model, x, rank, cand, step, kv, None, getattr(policy, "wants_hidden", False))
        sel = policy.select(StepView(probs=probs, candidates=cand, masked=masked, step=step, given=rank == 0, hidden=hidden,
                                     tokens=x if getattr(policy, "wants_tokens", False) else None))
        if (sel & ~cand).any() or (cand.any(1) & ~sel.any(1)).any():
            raise RuntimeError(f"{policy!r}.select must return a non-empty subset of the candidates (step {step})")
        x, rank = torch.where(sel, tokens, x), torch.where(sel, step + 1, rank)
        nfe += masked.any(1)
        per_step.append(sel.sum(1))
        step += 1
    return Decoded(tokens=x, ranks=rank, nfe=nfe, tokens_per_step=per_step, steps=step)


def step_advantages(r: Tensor, active: Tensor, group: int, scale: bool = True) -> Tensor:
    """Float ``[T, N]``: GRPO's process-supervision advantages (DeepSeekMath, section 4.1.3).

    ``r [T, N]`` per-step rewards, ``active Bool[T, N]`` (the row chose a set at that step),
    rollouts of one prompt adjacent in groups of ``group`` (``N = B·G``). Per group, over
    its active steps: ``r̃ = (r − mean) / (std + 1e-6)`` (``std``: unbiased; ``scale=False``:
    ``r − mean``), 0 at inactive steps; ``A_k = Σ_{j >= k} r̃_j`` (:func:`returns_to_go`)."""
    T, N = r.shape
    rg, ag = r.view(T, -1, group), active.view(T, -1, group).to(r.dtype)  # [T, B, G]
    n = ag.sum((0, 2), keepdim=True)  # [1, B, 1] active steps per group
    mean = (rg * ag).sum((0, 2), keepdim=True) / n.clamp_min(1)
    centred = (rg - mean) * ag
    if scale:
        std = ((centred**2).sum((0, 2), keepdim=True) / (n - 1).clamp_min(1)).sqrt()
        centred = centred / (std + 1e-6)
    return returns_to_go(centred.reshape(T, N))


@register("objective", "sas")
class SAS(GRPO):
    """SAS (arXiv 2606.23567): GRPO over orders with a dense per-step reward, the denoiser
    frozen (module docstring). ``task``: the data (``task.batch`` gives the sequences the
    policy walks; no task score is needed). ``policy``: a learned policy. ``step_reward``
    (kind "step_reward"): default ``pathwise_likelihood``. ``group``, ``clip``, ``scale``,
    ``kl``, ``reference``, ``entropy``: as :class:`GRPO` (``scale``: the step rewards'
    normalisation, :func:`step_advantages`). ``cache``: the exact KV cache in rollouts.

    Metrics: ``reward`` (mean ``log p_θ(x | σ)`` per row, nats: minus the bound's data
    term), ``nats_per_token``."""

    def __init__(self, task, policy: Policy | None = None, step_reward: StepReward | None = None, group: int = 4,
                 clip: float = 0.2, scale: bool = True, kl: float = 0.0, reference: Policy | None = None,
                 entropy: float = 0.0, cache: bool = True):
        super().__init__(task, policy, None, group, clip, scale, kl, reference, entropy, 0.0, cache, False)
        self.step_reward = PathwiseLikelihood() if step_reward is None else step_reward
        if not isinstance(self.step_reward, StepReward):
            raise ConfigError("step_reward", f"must be a step reward (pathwise_likelihood), got {self.step_reward!r}")

    @torch.no_grad()
    def rollout(self, model, tokens: Tensor, ranks: Tensor, generator: torch.Generator | None = None,
                reference: Policy | None = None) -> Rollout:
        G = self.group
        x, r = tokens.repeat_interleave(G, 0), ranks.repeat_interleave(G, 0)  # [B·G, L]
        seed = int(torch.randint(0, 2**62, (), generator=generator, device=None if generator is None else generator.device))
        with self.policy.recording(seed=seed, greedy=False, reference=reference) as traj:
            d = teacher_forced(model, self.policy, x, r, cache=self.cache)
        steps = self.step_reward(model, x, d.ranks, steps=traj.steps).to(x.device)  # [T, B·G]
        total = steps.sum(0)  # log p_θ(x | σ)
        return Rollout(d, traj, x, r, total, total, step_reward=steps)

    def rollout_advantages(self, ro: Rollout) -> Tensor:
        active = ro.traj.stacked("candidates").any(-1).to(ro.step_reward.device)  # [T, B·G]
        return step_advantages(ro.step_reward, active, self.group, self.scale).detach()

    def step(self, model, tokens: Tensor, ranks: Tensor, generator: torch.Generator | None = None) -> StepOutput:
        out = super().step(model, tokens, ranks, generator)
        n = (ranks >= 1).sum().clamp_min(1)
        out.metrics["nats_per_token"] = -out.metrics["reward"] * tokens.shape[0] / float(n)
        out.metrics.pop("score", None)  # the reward is the score here
        return out

    def extra_repr(self) -> str:
        return f"step_reward={self.step_reward!r}, {super().extra_repr()}"
