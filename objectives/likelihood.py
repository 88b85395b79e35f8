"""Training losses: the set NLL of a sampled order, the MDM NELBO (absorbing, uniform and
γ-hybrid corruption: a continuous-time ELBO for each) and the block NELBO."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from orderlab.likelihood import log_likelihood, stream_log_probs
from orderlab.processes.base import Process
from orderlab.processes.corruption import Absorbing, Corruption
from orderlab.processes.flat import Flat, Linear
from orderlab.registry import register
from orderlab.rules import Bidirectional, BlockCausal

from .base import LossOutput, Objective

__all__ = ["SetNLL", "MDMNelbo", "BlockNelbo", "interpolating_nelbo_rate", "prior_kl"]


def _times(batch: int, generator: torch.Generator | None, device, eps: float) -> Tensor:
    """Stratified t ∈ [eps, 1] over the batch (low-variance NELBO estimate, as in MDLM)."""
    u = torch.rand((), generator=generator, device=None if generator is None else generator.device).item()
    t = (u + torch.arange(batch, dtype=torch.float64) / batch) % 1.0
    return (eps + (1 - eps) * t).to(device)


def _weighted_nats(model, s, tokens: Tensor, weight: Tensor) -> Tensor:
    """Float ``[B]``: ``Σ_targets w_i · (-log p_θ(x_i | stream))`` (``weight`` Float[B, L])."""
    lp = stream_log_probs(model(s), s, tokens)  # [B, N]
    return -(weight.float().gather(1, s.out.clamp(min=0)) * lp).sum(1)


@register("objective", "set_nll")
class SetNLL(Objective):
    """``-log p_θ(x | ranks)`` for an order sampled from ``process`` (Arriola & Kuleshov
    2026, eq. 4): AR's exact NLL under ``quench``, SetDLM's loss under ``staggered``, and
    MDM's expected any-order NLL under a flat schedule. ``steps``: sample multi-token sets
    (``Process.sample_ranks(steps=...)``). An exact NLL of the sampled order.
    """

    exact = True

    def __init__(self, process: Process = Linear(), steps: int | None = None):
        super().__init__(process)
        self.steps = steps

    def forward(self, model, tokens, ranks, generator=None) -> LossOutput:
        order = self.process.sample_ranks(ranks, generator=generator, steps=self.steps)
        nats = -log_likelihood(model, tokens, order)
        return self._output(nats, (ranks > 0).sum(1), exact=True)


def _log_ratio(logp: Tensor, onehot: Tensor, log_kappa: Tensor) -> Tensor:
    """``log((e_v + κ) / (x̂_v + κ))`` per token ``v`` (``[..., K]``), stable for any κ:
    ``−softplus(log x̂_v − log κ)`` off the clean token; on it ``log1p((1 − x̂)/(x̂ + κ))``
    for κ > 1 (no cancellation of two large logs), else ``log1p(κ) − logaddexp``."""
    lk = log_kappa[..., None]
    off = -F.softplus(logp - lk)
    big = torch.log1p(-torch.expm1(logp) / (logp.exp() + lk.exp()))
    small = torch.log1p(lk.exp()) - torch.logaddexp(logp, lk)
    on = torch.where(lk > 0, big, small)
    return torch.where(onehot, on, off)


def interpolating_nelbo_rate(
    logp: Tensor, x: Tensor, z: Tensor, alpha: Tensor, dalpha: Tensor, mask_prob: float, mask_id: int
) -> Tensor:
    """Float64 ``[...]``: the continuous-time NELBO integrand of one position at time ``t``,
    for the interpolating process ``q_t(z | x) = α_t onehot(x) + (1 − α_t) π`` with
    ``π = m δ_MASK + (1 − m) Uniform(K)`` (``m = mask_prob``: 1 absorbing, 0 uniform,
    1 − γ hybrid), so that ``NELBO(x) = Σ_i ∫_0^1 E_{z_t} [rate_i] dt + Σ_i KL(q_1 ‖ π)``.

    Derived here from the CTMC ELBO (Campbell et al. 2022): the forward rate ``z' → z`` is
    ``λ_t π(z)``, ``λ_t = −α'_t/α_t``; the model's reverse rate is the true one with ``x``
    replaced by the denoiser ``x̂_θ(z_t)`` (mean parameterisation, as in MDLM/UDLM:
    ``q_t(·|x̂) = α_t x̂ + (1 − α_t) π``). Their path KL per position, summed over jumps
    ``z → z'``, is ``λ π(z)/q(z) · [D + r − 1 − log r]`` with ``q = q_t(·|x)``,
    ``q̂ = q_t(·|x̂)``, ``D = Σ_v q_v log(q_v/q̂_v) ≥ 0`` and ``r = q(z)/q̂(z)`` (``r = 1`` at
    [MASK], which ``x̂`` never predicts). Writing ``q_v = α(e_v + κ)``, ``q̂_v = α(x̂_v + κ)``
    on tokens, ``κ = (1 − α)(1 − m)/(α K)``::

        rate = −α' · π(z)/q(z) · [ D̃ + (r − 1 − log r)/α ],   D̃ = Σ_v (e_v + κ) log((e_v + κ)/(x̂_v + κ))

    with ``π(z)/q(z) = 1/(1 − α)`` at [MASK] and ``(1 − m)/K / q(z)`` at a token. With
    ``m = 1`` it is MDLM's ``−α'/(1 − α) · (−log x̂(x))`` at masked positions and 0 elsewhere
    (Sahoo et al. 2024, eq. 10); with ``m < 1`` every position contributes (a token may be noise).

    ``logp`` Float[..., K]: ``log x̂``; ``x``, ``z`` Long[...]: clean and noisy tokens;
    ``alpha``, ``dalpha`` Float[...]: ``α_i(t)``, ``α_i'(t)``.
    """
    K = logp.shape[-1]
    logp, a, da = logp.double(), alpha.double().clamp(0.0, 1.0), dalpha.double()
    u = (1.0 - mask_prob) / K  # π of one token
    a_pos = a.clamp_min(torch.finfo(torch.float64).tiny)
    log_kappa = (math.log(u) + torch.log1p(-a) - torch.log(a_pos)).clamp(-690.0, 690.0) if u > 0 else torch.full_like(a, -690.0)
    e = F.one_hot(x, K).bool()  # [..., K]
    lr = _log_ratio(logp, e, log_kappa)  # [..., K] log((e + κ)/(x̂ + κ))
    kappa = log_kappa.exp()
    d = ((e.double() + kappa[..., None]) * lr).sum(-1)  # D̃ = D / α
    is_mask = z == mask_id
    zc = torch.where(is_mask, torch.zeros_like(z), z)  # a token index for the gather (masked rows unused)
    lr_z = lr.gather(-1, zc[..., None])[..., 0]  # log r at the noisy token
    is_div = torch.expm1(lr_z) - lr_z  # r − 1 − log r ≥ 0 (Itakura–Saito)
    q_z = a * (zc == x).double() + (1.0 - a) * u  # q_t(z | x) at a token
    w_tok = torch.where(q_z > 0, u / q_z.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(q_z))
    w_mask = (1.0 / (1.0 - a).clamp_min(torch.finfo(torch.float64).tiny)) if mask_prob > 0 else torch.zeros_like(a)
    tok_term = w_tok * (d + is_div / a_pos)
    return -da * torch.where(is_mask, w_mask * d, tok_term)


def prior_kl(alpha1: Tensor, mask_prob: float, vocab_size: int) -> Tensor:
    """Float64 ``[...]``: ``KL(q_1(·|x) ‖ π)`` of one position, the NELBO's prior term
    (the reverse process starts from ``π``); 0 where ``α_i(1) = 0``. For ``m = 1``
    (absorbing) it is infinite where ``α_i(1) > 0``: MDLM leaves it out for its log-linear
    schedule, and so does ``MDMNelbo``'s absorbing path.

    ``q_1 = α_1 e_x + (1 − α_1) π``: ``(1 − α_1)(1 − u) log(1 − α_1) + q_1(x) log(q_1(x)/u)``,
    ``u = (1 − m)/K``.
    """
    a = alpha1.double().clamp(0.0, 1.0)
    u = (1.0 - mask_prob) / vocab_size
    qx = a + (1.0 - a) * u
    log_ratio = torch.log1p(a * (1.0 - u) / u) if u > 0 else torch.where(a > 0, math.inf, 0.0)  # log(q_1(x)/u)
    return torch.xlogy((1.0 - a) * (1.0 - u), 1.0 - a) + torch.where(a > 0, qx * log_ratio, 0.0)


def _corruption(process: Process) -> Corruption:
    """The corruption of ``process`` (a ``Mixture`` without its own: the components' common one)."""
    c = process.corruption
    if c is None:
        cs = {p.corruption for p in getattr(process, "processes", [])}
        if len(cs) != 1:
            raise ValueError(f"mdm_nelbo needs one corruption for the whole process, got {process!r}")
        (c,) = cs
    if c.mask_prob is None:
        raise ValueError(f"mdm_nelbo needs an interpolating corruption (with mask_prob), got {c!r}")
    return c


@register("objective", "mdm_nelbo")
class MDMNelbo(Objective):
    """Continuous-time MDM NELBO (MDLM, Sahoo et al. 2024, eq. 10; MD4, Shi et al. 2024)
    for a bidirectional model, with per-position weights from the process's hyperschedule.
    A bound on the NLL (label "nelbo (bound)"), estimated with one stratified ``t`` and one
    ``x_t`` per row.

    Absorbing corruption (and γ = 0): ``E_t Σ_{i masked} −α_i'(t)/(1 − α_i(t)) · (−log p_θ(x_i | x_t))``,
    predictions read at the masked positions only. Uniform and γ-hybrid corruption (Fathi
    et al. 2025): ``E_t Σ_{i generated} rate_i + Σ_i KL(q_1 ‖ π)`` with the rate of
    :func:`interpolating_nelbo_rate` (every generated position is read: a clean-looking
    token may be noise), which reduces to the absorbing NELBO as γ → 0.
    """

    def __init__(self, process: Process = Linear(), eps: float = 1e-3):
        super().__init__(process)
        self.eps = eps
        self.mask_prob = _corruption(self.process).mask_prob

    def forward(self, model, tokens, ranks, generator=None) -> LossOutput:
        if not isinstance(model.rule, Bidirectional):
            raise ValueError(f"mdm_nelbo needs a bidirectional model, got attention {model.rule!r}")
        B, L = tokens.shape
        t = _times(B, generator, tokens.device, self.eps)  # [B]
        xt, noised = self.process.corrupt(tokens, t, model.mask_id, model.vocab_size, ranks=ranks, generator=generator)
        if self.mask_prob == 1.0:  # only [MASK] positions carry weight (the rate below with m = 1)
            s = model.rule.noisy_stream(xt, ranks >= 0, noised)
            nats = _weighted_nats(model, s, tokens, self.process.weight(t, L))
        else:
            nats = self._interpolating(model, tokens, xt, ranks, t)
        return self._output(nats, (ranks > 0).sum(1), exact=False)

    def _interpolating(self, model, tokens: Tensor, xt: Tensor, ranks: Tensor, t: Tensor) -> Tensor:
        """Float ``[B]``: one-sample estimate of the uniform / hybrid NELBO."""
        L = tokens.shape[1]
        gen = ranks > 0
        s = model.rule.noisy_stream(xt, ranks >= 0, gen)
        logp = F.log_softmax(model(s).double(), dim=-1)  # [B, N, K]
        idx = s.out.clamp(min=0)  # [B, N] the position each query predicts
        x0, zt, a, da = (v.gather(1, idx) for v in (tokens, xt, self.process.alpha(t, L), self.process.dalpha(t, L)))
        rate = interpolating_nelbo_rate(logp, x0, zt, a, da, self.mask_prob, model.mask_id)
        prior = prior_kl(self.process.alpha(1.0, L).expand(tokens.shape), self.mask_prob, model.vocab_size)
        return (torch.where(s.out >= 0, rate, 0.0).sum(1) + torch.where(gen, prior, 0.0).sum(1)).float()


@register("objective", "block_nelbo")
class BlockNelbo(Objective):
    """BD3-LM NELBO (Arriola et al. 2025, eq. 7): one ``t`` per block, a flat schedule
    inside each block, loss read from the noisy copy of each block, which sees earlier
    clean blocks. For a block-causal model. A bound on the NLL. Absorbing corruption only:
    the noisy blocks hold [MASK] (eq. 7 is the absorbing-state ELBO)."""

    def __init__(self, process: Process = Linear(), eps: float = 1e-3):
        super().__init__(process)
        if not isinstance(self.process, Flat):
            raise ValueError(f"block_nelbo needs a flat schedule inside blocks, got {self.process!r}")
        if not isinstance(self.process.corruption, Absorbing):
            raise ValueError(f"block_nelbo supports only absorbing corruption (its noisy blocks hold [MASK]); "
                             f"got process.corruption={self.process.corruption!r}")
        self.eps = eps

    def forward(self, model, tokens, ranks, generator=None) -> LossOutput:
        if not isinstance(model.rule, BlockCausal):
            raise ValueError(f"block_nelbo needs a block_causal model, got attention {model.rule!r}")
        B, L = tokens.shape
        n_blocks = -(-L // model.rule.block_size)
        t = _times(B * n_blocks, generator, tokens.device, self.eps).view(B, n_blocks)  # [B, nb]
        t = t.repeat_interleave(model.rule.block_size, dim=1)[:, :L].reshape(-1)  # [B*L] time of each position's block
        alpha = self.process.alpha(t, 1).view(B, L)
        w = self.process.weight(t, 1).view(B, L)
        where = None if generator is None else generator.device  # the trainer's generator lives on the model's device
        u = torch.rand(B, L, generator=generator, dtype=torch.float64, device=where).to(tokens.device)
        noised = (u >= alpha) & (ranks > 0)  # P(noised) = 1 - α(t_block)
        xt = torch.where(noised, torch.full_like(tokens, model.mask_id), tokens)
        s = model.rule.noisy_stream(tokens, xt, ranks, noised)
        nats = _weighted_nats(model, s, tokens, w)
        return self._output(nats, (ranks > 0).sum(1), exact=False)
