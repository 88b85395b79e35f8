"""The MDM NELBO with a learned schedule (GenMD4: Shi et al. 2024, "Simplified and
Generalized Masked Diffusion for Discrete Data", section 5 and app. H; md4 genmd4.py).

With a schedule that may depend on the position ``i`` and on the clean token's value
``v`` (``α_{i,v}(t)``; ``Process.alpha_values``), rates ``r_{i,v}(t) = -α'_{i,v}/(1-α_{i,v})``
(``w_v / t`` for GenMD4's ``1 - (1-ε) t^w``), the continuous-time NELBO is::

    NELBO = ∫_{t1}^1 E_{z_t ~ q(·|x,t)} f(z_t, t) dt + recon + prior
    f     = Σ_{i masked in z_t} [ r_{i,x_i} (-log p_θ(x_i | z_t)) + Σ_v (r_{i,v} - r_{i,x_i}) p_θ(v | z_t) ]

(MD4 eq. 10 with a vector schedule: the unmasking rate of a masked position depends on
the value it will take, so the model's whole prediction enters.) For a schedule that does
not depend on the value the second sum is exactly 0 and ``f`` is the MDM NELBO integrand
of ``MDMNelbo``. ``recon`` = ``E_{z_t1} -log p(x | z_t1)`` with the release's decoder
``p(x_i = v | masked) ∝ 1 - α_{i,v}(t1)``; ``prior`` = ``KL(q(z_1|x) || p(z_1))`` with
``p`` masking position ``i`` with probability ``1 - α_i(1)`` and else drawing a uniform
token, ``= α_i(1) log V`` (``ε log V``; 0 for ``α(1) = 0``).

Estimator (as released): one ``t ~ U[t1, 1]`` per row (stratified over the batch), two
independent ``z_t`` at that ``t``, ``NELBO ≈ (1-t1)(f_1 + f_2)/2 + recon + prior``.
Gradients, term by term:

- denoiser ``θ``: pathwise through ``f_1``, ``f_2``;
- schedule ``ρ`` (``w = softplus(ρ)``): pathwise through the rates ``r`` in ``f_1``, ``f_2``
  and through ``recon``; and, since ``z_t``'s law depends on ``w``, the score function
  ``∇ E_z f = E_z f ∇ log q(z | x, t)`` with the leave-one-out baseline of two samples::

      (1-t1) · ½ sg(f_1 - f_2) · (∇ log q(z_1) - ∇ log q(z_2)),
      log q(z) = Σ_i [z_i log(1 - α_{i,x_i}(t)) + (1 - z_i) log α_{i,x_i}(t)]

  added to the loss as ``s - sg(s)`` so the loss's value stays the NELBO estimate.
  ``prior`` has no gradient (``α(1) = ε`` whatever ``w``); ``t`` has none.

``reinforce=False`` drops the score-function term (a biased gradient for ``ρ``; for
ablations). Any process works: with a fixed one (no parameters) this is the MDM NELBO
plus the two end terms. The objective owns the learned schedules it finds in its process
(also inside ``Blockwise``), so the training loop optimises them with the model.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from orderlab.processes.base import Process
from orderlab.processes.compose import Mixture
from orderlab.processes.flat import Linear
from orderlab.processes.corruption import Absorbing
from orderlab.registry import register
from orderlab.rules import Bidirectional

from .base import LossOutput, Objective
from .likelihood import _times

__all__ = ["GenMD4Nelbo", "learned_parts"]


def learned_parts(process: Process) -> list[nn.Module]:
    """The processes with parameters (``nn.Module``) inside ``process``, itself included."""
    found: list[nn.Module] = []

    def walk(p: Any) -> None:
        if isinstance(p, nn.Module):
            found.append(p)
        for v in vars(p).values():
            for item in v if isinstance(v, (list, tuple)) else [v]:
                if isinstance(item, Process):
                    if isinstance(p, Mixture) and learned_parts(item):
                        raise ValueError(
                            f"a learned schedule inside a mixture ({p!r}) is not supported: a mixture's "
                            "positions are not independent, so log q(z_t | x) is not a sum over positions"
                        )
                    walk(item)

    walk(process)
    return found


def _check_absorbing(process: Process) -> None:
    """The formula is the absorbing-state ELBO: every corruption in ``process`` must be [MASK]."""
    c = getattr(process, "corruption", None)
    if c is None and isinstance(process, Mixture):  # each component corrupts its own way
        for p in process.processes:
            _check_absorbing(p)
    elif not isinstance(c, Absorbing):
        raise ValueError(f"genmd4_nelbo is the absorbing-state (masking) NELBO; {process!r} corrupts with {c!r}")


def _at(v: Tensor, idx: Tensor) -> Tensor:
    """``v[..., idx]`` for a value axis of size V, or ``v[..., 0]`` for a value-free axis of size 1."""
    return v[..., 0] if v.shape[-1] == 1 else v.gather(-1, idx[..., None])[..., 0]


@register("objective", "genmd4_nelbo")
class GenMD4Nelbo(Objective):
    """GenMD4's NELBO and its REINFORCE-leave-one-out gradient for the schedule (module doc).

    ``process``: e.g. ``{name: learned_token}`` or ``{name: learned_position}`` (their
    vocab size and length come from the model); ``t1``: the smallest time of the integral (the release's ``1e-3``).
    """

    def __init__(self, process: Process = Linear(), t1: float = 1e-3, reinforce: bool = True):
        super().__init__(process)
        if not 0.0 < t1 < 1.0:
            raise ValueError(f"t1 must be in (0, 1), got {t1}")
        self.t1, self.reinforce = float(t1), bool(reinforce)
        _check_absorbing(self.process)
        # learned schedules nested in composites (which are not modules) are registered here
        self.schedules = nn.ModuleList([m for m in learned_parts(self.process) if m is not self.process])

    def forward(self, model, tokens, ranks, generator=None) -> LossOutput:
        if not isinstance(model.rule, Bidirectional):
            raise ValueError(f"genmd4_nelbo needs a bidirectional model, got attention {model.rule!r}")
        t = _times(tokens.shape[0], generator, tokens.device, self.t1)  # [B] float64 in [t1, 1]
        f1, lq1 = self.integrand(model, tokens, ranks, t, generator)
        f2, lq2 = self.integrand(model, tokens, ranks, t, generator)
        span = 1.0 - self.t1  # E_{t ~ U[t1, 1]} (1 - t1) f = ∫_{t1}^1 f dt
        diffusion = span * 0.5 * (f1 + f2)  # [B]
        surrogate = diffusion
        if self.reinforce:
            score = span * 0.5 * (f1 - f2).detach() * (lq1 - lq2)
            surrogate = surrogate + (score - score.detach())  # value 0, gradient the RLOO term
        ends = self.end_terms(tokens, ranks, model.vocab_size)  # [B]
        n = (ranks > 0).sum(1).float()
        loss = (surrogate + ends).sum() / n.sum().clamp_min(1)
        return LossOutput(loss, (diffusion + ends).detach(), n, exact=False)

    def integrand(self, model, tokens: Tensor, ranks: Tensor, t: Tensor, generator=None) -> tuple[Tensor, Tensor]:
        """``(f Float[B], log q(z_t | x, t) Float[B])`` for one ``z_t`` sampled at times ``t`` Float[B]."""
        B, L = tokens.shape
        xt, noised = self.process.corrupt(tokens, t, model.mask_id, model.vocab_size, ranks=ranks, generator=generator)
        a = self.process.alpha_values(t, L)  # [B, L, 1 or V]
        da = self.process.dalpha_values(t, L)
        den = 1.0 - a
        rate = torch.where(den > 0, -da / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(den))
        a_x = _at(a, tokens)  # [B, L]: α of each position's own token
        tiny = torch.finfo(a_x.dtype).tiny
        log_q = torch.where(noised, (1.0 - a_x).clamp_min(tiny).log(), a_x.clamp_min(tiny).log())
        log_q = torch.where(ranks > 0, log_q, torch.zeros_like(log_q)).sum(1)  # [B]
        s = model.rule.noisy_stream(xt, ranks >= 0, noised)
        logp = torch.log_softmax(model(s).float(), dim=-1)  # [B, N, V]
        out = s.out.clamp(min=0)  # [B, N] position read by each query
        x_out = tokens.gather(1, out)  # [B, N]
        r = rate.gather(1, out[..., None].expand(-1, -1, rate.shape[-1])).to(logp.dtype)  # [B, N, 1 or V]
        r_x = _at(r, x_out)  # [B, N]
        term = -r_x * logp.gather(-1, x_out[..., None])[..., 0]  # [B, N]
        if r.shape[-1] > 1:  # value-dependent rates: the model's whole prediction enters
            term = term + ((r - r_x[..., None]) * logp.exp()).sum(-1)
        f = torch.where(s.out >= 0, term, torch.zeros_like(term)).sum(1)
        return f, log_q.to(f.dtype)

    def end_terms(self, tokens: Tensor, ranks: Tensor, vocab_size: int) -> Tensor:
        """Float ``[B]``: ``recon`` at ``t1`` plus ``prior`` at ``t = 1`` (module doc)."""
        B, L = tokens.shape
        gen = ranks > 0
        t1 = torch.full((1,), self.t1, dtype=torch.float64, device=tokens.device)
        m = (1.0 - self.process.alpha_values(t1, L)).expand(B, L, -1).clamp_min(0.0)  # [B, L, 1 or V] masked at t1
        if m.shape[-1] == 1:  # value-free schedule: the decoder is uniform
            nll_dec = torch.full((B, L), math.log(vocab_size), dtype=m.dtype, device=m.device)
        else:
            lm = m.clamp_min(torch.finfo(m.dtype).tiny).log()
            nll_dec = torch.logsumexp(lm, -1) - _at(lm, tokens)
        recon = _at(m, tokens) * nll_dec
        a1 = _at(self.process.alpha_values(torch.ones_like(t1), L).expand(B, L, -1), tokens)  # [B, L]
        prior = a1 * math.log(vocab_size)
        return torch.where(gen, recon + prior, torch.zeros_like(recon)).sum(1).float()

    def __repr__(self) -> str:
        return f"GenMD4Nelbo(process={self.process!r}, t1={self.t1:g}, reinforce={self.reinforce})"
