"""AOP, adaptive order policies (arXiv 2606.00295, 2026; REFERENCES.md "Learned orders"): a
light order policy ``π_ψ`` and a *policy-reweighted* MDM loss, the denoiser frozen or
trained jointly.

The MDM NELBO is the expected any-order NLL under uniformly random orders (DESIGN.md
section 1): at a state ``s`` (the data's tokens at the revealed positions) every masked
position ``i`` costs ``ℓ_θ(i | s) = −log p_θ(x_i | s)`` with weight ``1/|masked|``. AOP
replaces that uniform weight by the policy's probability of revealing ``i`` at ``s`` and
visits the states the policy itself walks::

    J(ψ, θ) = E_{σ ~ π_ψ} [ −log p_θ(x | σ) ] = E_{σ ~ π_ψ} [ Σ_k c̄_k ],
    c̄_k = Σ_{i masked} m_ψ(i | s_k) ℓ_θ(i | s_k),   m_ψ(i | s) = P_{S ~ π_ψ(·|s)}(i ∈ S)

(the tower property: ``c̄_k`` is the expected cost of step ``k`` given its state). With
``π`` uniform over singletons ``J`` is the MDM NELBO's expectation; for any ``π`` it is an
upper bound on ``−log Σ_σ π_ψ(σ | x) p_θ(x | σ)`` (Jensen; the ELBO of DESIGN.md section 1
with ``q = π``). ``m`` is closed form for the policies whose steps allow it: one position
per step (``learned_plackett_luce`` with ``k: 1``: the softmax) and the non-empty
Bernoulli sets (``learned``: ``σ(l_i) / (1 − Π_j (1 − σ(l_j)))``).

Gradient (unbiased): states depend on earlier choices, so besides the pathwise terms of
``c̄_k`` (into ``ψ`` through ``m``, into ``θ`` through ``ℓ``) each choice gets the score
function of the costs after it::

    ∇J = E [ Σ_k ∇c̄_k + Σ_k ∇log π_ψ(S_k | s_k) · (R_{k+1} − b_k) ],   R_{k+1} = Σ_{j>k} c̄_j

with ``b_k`` the mean ``R_{k+1}`` of the other ``group − 1`` walks of the same row
(leave-one-out: independent of this walk's choices; Kool et al. 2019). Walks are the
data's (``teacher_forced``: a chosen set is revealed with the data's tokens). The policy's
features of ``θ`` (confidence, hidden states, ...) are inputs: with ``train_model`` the
denoiser learns through ``ℓ`` only (as ``vi_orders``' guide).

Checked against REFERENCES.md ("a light policy network and a policy-reweighted MDM loss,
denoiser frozen or joint"): the loss is the MDM loss with the uniform ``1/|masked|`` per
position replaced by the policy's inclusion probability (uniform ``π`` over singletons
gives the MDM NELBO's value: ``tests/test_aop.py``), frozen or joint. Assumed where the
paper's exact rule is not given there:

- the states are the policy's own teacher-forced walks over the data (on-policy), not the
  forward process's random masks; with random masks the reweighted loss would no longer
  be ``E_π[−log p_θ(x | σ)]`` and would not bound ``−log p(x)``;
- the weight is the exact inclusion probability ``P(i ∈ S_k)`` (the expected cost of a
  step given its state, a Rao–Blackwellised cost), not the sampled set's indicator;
- the policy's dependence on the states it visits is trained by the score function of the
  later costs with a leave-one-out baseline over the ``group`` walks of a row (the
  pathwise term alone is biased: the tests show it); the paper may drop this term;
- jointly, the denoiser gets the same loss's gradient (its orders: the policy's), not the
  MDM NELBO under uniform orders.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from orderlab.policies.base import Policy
from orderlab.policies.learned import LearnedBernoulli, LearnedPlackettLuce, LearnedPolicy
from orderlab.policies.sets import NonEmptyBernoulli, PlackettLuceTopK, SetDistribution
from orderlab.registry import ConfigError, register
from orderlab.rules import UNKNOWN

from .base import Objective, StepOutput
from .sas import teacher_forced

__all__ = ["AOP", "inclusion", "state_costs"]


def inclusion(dist: SetDistribution) -> Tensor:
    """Float ``[B, L]``: ``P(i ∈ S)`` of every position under a step distribution (0 off
    the candidates), differentiable in its logits. Closed forms: non-empty Bernoulli
    ``p_i / Z`` (``Z = 1 − Π(1 − p_j)``); Plackett–Luce top-1 the softmax; top-``n`` (every
    candidate) 1. Other top-``k`` sizes have no closed form here: a ValueError."""
    if isinstance(dist, NonEmptyBernoulli):
        return torch.where(dist.valid, (dist.log_p - dist.log_z[:, None]).exp(), torch.zeros_like(dist.log_p))
    if isinstance(dist, PlackettLuceTopK):
        k = dist.k[:, None]
        every = (k >= dist.n[:, None]).expand_as(dist.valid)
        if bool(((dist.k > 1) & (dist.k < dist.n)).any()):
            raise ValueError("aop needs each step's inclusion probabilities: Plackett–Luce sets of 1 < k < n "
                             "candidates have no closed form; use learned_plackett_luce with k: 1, or learned (Bernoulli)")
        p = torch.where(every, torch.ones_like(dist.log_pi), dist.log_pi.exp())
        return torch.where(dist.valid, p, torch.zeros_like(p))
    raise ValueError(f"aop: no inclusion probabilities for {type(dist).__name__}")


def state_costs(model, x: Tensor, order: Tensor, candidates: Tensor, step: int) -> Tensor:
    """Float ``[B, L]``: ``ℓ_θ(i | s) = −log p_θ(x_i | s)`` at the candidates of decode step
    ``step`` (0-based) of the walk ``order`` (ranks as ``Decoded.ranks``: the state reveals
    ``x`` at ranks ``1..step`` and the given positions), 0 elsewhere; one forward of the rows
    that have candidates, with gradients into ``θ`` when enabled."""
    B, L = x.shape
    known = (order >= 0) & (order <= step)
    rank = torch.where(known | (order < 0), order, torch.full_like(order, UNKNOWN))
    cur = torch.where(known | (order < 0), x, torch.full_like(x, model.mask_id))
    out = torch.zeros(B, L + 1, device=x.device)  # column L: queries that predict nothing
    rows = candidates.any(1).nonzero()[:, 0]
    if rows.numel() == 0:
        return out[:, :L]
    s = model.rule.step(cur[rows], rank[rows], candidates[rows], step, False)
    lp = F.log_softmax(model(s).float(), dim=-1)  # [b, N, V]
    idx = torch.where(s.out >= 0, s.out, L)  # [b, N]
    nll = -lp.gather(-1, x[rows].gather(1, s.out.clamp(min=0))[..., None])[..., 0]  # [b, N]
    nll = torch.where(s.out >= 0, nll, torch.zeros_like(nll))
    part = torch.zeros(len(rows), L + 1, device=x.device).scatter_add(1, idx, nll)
    return out.index_copy(0, rows, part)[:, :L]


@register("objective", "aop")
class AOP(Objective):
    """AOP's policy-reweighted MDM loss (module docstring) over ``group`` teacher-forced walks
    per row. ``policy``: ``learned_plackett_luce`` with ``k: 1`` (default) or ``learned``
    (non-empty Bernoulli sets); its parameters are this objective's. ``train_model``: also
    train the denoiser on the same loss (joint); false: the denoiser is frozen. ``cache``:
    the exact KV cache in the walks (the costs are recomputed with gradients).

    In YAML::

        objective:
          name: aop
          policy: {name: learned_plackett_luce, k: 1, features: [confidence, margin, position]}
          group: 4
          train_model: false

    Metrics: ``bits_per_token`` (the estimate of ``J`` per generated token, label
    ``"nelbo (bound)"``), ``nll_order`` (``J`` per row, nats), ``entropy`` (mean per-step
    entropy of ``π``), ``steps`` (sets per walk).
    """

    trains_model = False

    def __init__(self, policy: Policy | None = None, group: int = 4, train_model: bool = False, cache: bool = True):
        super().__init__(process=None)
        self.policy = LearnedPlackettLuce() if policy is None else policy
        if not isinstance(self.policy, LearnedPolicy):
            raise ConfigError("policy", f"aop needs a learned policy (learned, learned_plackett_luce), got "
                                        f"{type(self.policy).__name__}")
        if isinstance(self.policy, LearnedPlackettLuce) and self.policy.k != 1:
            raise ConfigError("policy.k", f"aop reweights by each step's inclusion probabilities: learned_plackett_luce "
                                          f"needs k: 1 (or use learned, Bernoulli sets), got {self.policy.k!r}")
        if not isinstance(self.policy, (LearnedPlackettLuce, LearnedBernoulli)):
            raise ConfigError("policy", f"aop has inclusion probabilities for learned and learned_plackett_luce, "
                                        f"not {type(self.policy).__name__}")
        if int(group) < 1:
            raise ConfigError("group", f"must be >= 1, got {group}")
        self.group, self.cache, self.trains_model = int(group), bool(cache), bool(train_model)

    def walks(self, model, tokens: Tensor, ranks: Tensor, generator: torch.Generator | None = None):
        """``(decoded, trajectory)`` of ``group`` teacher-forced walks per row (rows of one
        input row adjacent: ``[B·G, ...]``), the policy sampling."""
        x, r = tokens.repeat_interleave(self.group, 0), ranks.repeat_interleave(self.group, 0)
        where = None if generator is None else generator.device
        seed = int(torch.randint(0, 2**62, (), generator=generator, device=where))
        with self.policy.recording(seed=seed, greedy=False) as traj:
            d = teacher_forced(model, self.policy, x, r, cache=self.cache)
        return x, r, d, traj

    def terms(self, model, tokens: Tensor, ranks: Tensor, generator: torch.Generator | None = None):
        """``(c̄ Float[T, N], log π(S_k | s_k) Float[T, N], active Bool[T, N], replay)`` of
        one batch of walks, with gradients (``N = B·group``)."""
        x, _, d, traj = self.walks(model, tokens, ranks, generator)
        rep = self.policy.replay(traj)
        T, N = rep.step_log_prob.shape
        m = inclusion(rep.dist).view(T, N, -1).float()  # [T, N, L]
        with torch.set_grad_enabled(self.trains_model and torch.is_grad_enabled()):
            cand = traj.stacked("candidates").to(x.device)  # [T, N, L]
            ell = torch.stack([state_costs(model, x, d.ranks, cand[k], k) for k in range(T)])  # [T, N, L]
        cbar = (m.to(ell.device) * ell).sum(-1)  # [T, N]
        return cbar, rep.step_log_prob.to(cbar.device), rep.active.to(cbar.device), rep

    def surrogate(self, cbar: Tensor, log_pi: Tensor, active: Tensor) -> Tensor:
        """Float ``[N]``: per walk, ``Σ_k c̄_k + Σ_k log π(S_k|s_k) · sg(R_{k+1} − b_k)``;
        its value is the estimate ``Σ_k c̄_k`` of ``−log p_θ(x | σ)``'s expectation."""
        c = cbar.detach()
        after = c.flip(0).cumsum(0).flip(0) - c  # [T, N]: R_{k+1} = Σ_{j>k} c̄_j
        G = self.group
        if G > 1:
            g = after.view(after.shape[0], -1, G)
            base = ((g.sum(-1, keepdim=True) - g) / (G - 1)).view_as(after)  # leave-one-out over the row's walks
        else:
            base = torch.zeros_like(after)
        adv = torch.where(active, after - base, torch.zeros_like(after))
        score = (adv * log_pi).sum(0)
        return cbar.sum(0) + (score - score.detach())  # value: Σ c̄; gradient: pathwise + score function

    def step(self, model, tokens: Tensor, ranks: Tensor, generator: torch.Generator | None = None) -> StepOutput:
        cbar, log_pi, active, rep = self.terms(model, tokens, ranks, generator)
        per_walk = self.surrogate(cbar, log_pi, active)  # [N]
        n_tok = float((ranks >= 1).sum()) * self.group
        loss = per_walk.sum() / max(n_tok, 1.0)
        nats = cbar.detach().sum(0)
        ent = float(rep.step_entropy[rep.active].detach().mean()) if rep.active.any() else 0.0  # k = 1 or Bernoulli: exact
        metrics = {
            "loss": float(loss.detach()),
            "bits_per_token": float(nats.sum()) / max(n_tok, 1.0) / math.log(2),
            "nll_order": float(nats.mean()),
            "entropy": ent,
            "steps": float(active.sum(0).double().mean()),
        }
        return StepOutput(loss, metrics, weight=n_tok, label="nelbo (bound)")

    def __repr__(self) -> str:
        return f"AOP(group={self.group}, train_model={self.trains_model}, policy={self.policy!r})"
