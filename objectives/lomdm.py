"""LoMDM / OeMDM (Hong et al., arXiv 2602.02112, ICML 2026): position- and data-dependent
masking schedules learned with the denoiser under one NELBO; GenMD4 (``genmd4.py``) is its
data-independent special case.

Forward process (``processes/scheduler.py``): position ``i`` of ``x`` is masked by time
``t`` with probability ``1 − α_i(x, t)``, ``α_i = 1 − (1−ε) t^{w_i(x)}``, ``w`` from the
forward scheduler network; its unmasking rate given ``x`` is ``R_i = −α_i'/(1 − α_i) =
w_i(x)/t``. Generative (reverse) process: a masked position ``i`` of ``z_t`` unmasks at
rate ``R̂_i = ŵ_i(z_t)/t`` (``ŵ``: the reverse scheduler network, which sees only
``z_t``) to value ``v`` with probability ``p_θ(v | z_t)``. Their path KL per masked
position and unit time (the CTMC ELBO, Campbell et al. 2022) is
``Σ_v [R̂ p_θ(v) − R δ_{v,x_i} + R δ_{v,x_i} log(R δ_{v,x_i} / (R̂ p_θ(v)))]``, so::

    NELBO = ∫_{t1}^1 E_{z_t ~ q(·|x,t)} f(z_t, t) dt + recon + prior
    f     = (1/t) Σ_{i masked} [ w_i (−log p_θ(x_i | z_t)) + ŵ_i − w_i + w_i log(w_i / ŵ_i) ]

``ŵ − w + w log(w/ŵ) ≥ 0`` (zero iff ``ŵ = w``): with the reverse scheduler tied to a
data-independent forward one (``reverse: null``) ``f`` is exactly GenMD4's integrand for
a per-position schedule. ``recon = Σ_i (1−ε) t1^{w_i(x)} log V`` (masked positions at
``t1`` decoded uniformly) and ``prior = Σ_i ε log V`` (``α(1) = ε``), as GenMD4's.

Estimator and gradients (as ``GenMD4Nelbo``): one stratified ``t`` per row, two ``z_t``;
the denoiser and the reverse scheduler get pathwise gradients; the forward scheduler gets
pathwise ones (through ``w`` in ``f`` and ``recon``) plus, since ``z_t``'s law depends on
it, the REINFORCE leave-one-out term of the two samples (the discrete part)::

    (1−t1) · ½ sg(f_1 − f_2) · (∇ log q(z_1|x) − ∇ log q(z_2|x)),
    log q(z|x) = Σ_i [z_i log(1 − α_i(x, t)) + (1 − z_i) log α_i(x, t)]
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from orderlab.processes.base import Process
from orderlab.policies.reverse_schedule import ReverseSchedule
from orderlab.processes.scheduler import DataSchedule, Scheduler
from orderlab.registry import ConfigError, register
from orderlab.rules import Bidirectional

from .base import LossOutput, Objective
from .likelihood import _times

__all__ = ["LoMDMNelbo"]


@register("objective", "lomdm_nelbo")
class LoMDMNelbo(Objective):
    """The LoMDM NELBO (module docstring) of a bidirectional denoiser.

    ``process``: ``{name: learned_data, scheduler: {name: mixer}, eps}`` (the forward
    scheduler). ``reverse``: the reverse scheduler (kind "scheduler", reads ``z_t``);
    ``null`` ties it to the forward one, which must then be data-independent
    (``positional``: GenMD4's NELBO exactly). ``t1``: the smallest time of the integral.
    ``reinforce``: the score-function term for the forward scheduler (false: biased, for
    ablations). The objective owns both schedulers (trained with the model). ``policy``:
    the reverse scheduler as a decode policy (``policies/reverse_schedule.py``: the
    generative chain's next position ∝ ``ŵ_i(z_t)``, greedy), which evaluation runs as the
    stage's learned policy, so a LoMDM run decodes with its own schedule.

    In YAML::

        objective:
          name: lomdm_nelbo
          process: {name: learned_data, scheduler: {name: mixer, width: 32}}
          reverse: {name: mixer, width: 32}
    """

    def __init__(self, process: Process, reverse: Scheduler | None = None, t1: float = 1e-3, reinforce: bool = True):
        super().__init__(process)
        if not isinstance(self.process, DataSchedule):
            raise ConfigError("process", f"lomdm_nelbo needs a learned_data process (a forward scheduler), got "
                                         f"{self.process!r}")
        if reverse is None and self.process.scheduler.data_dependent:
            raise ConfigError("reverse", "a data-dependent forward scheduler needs a reverse scheduler (the generative "
                                         "process sees only z_t): e.g. reverse: {name: mixer}")
        if not 0.0 < t1 < 1.0:
            raise ConfigError("t1", f"must be in (0, 1), got {t1}")
        self.reverse: nn.Module | None = reverse
        self.t1, self.reinforce = float(t1), bool(reinforce)
        # evaluation decodes with the learned generative order: the reverse scheduler's jump chain (greedy, one
        # position per step); a plain attribute, not a submodule: its weights are the scheduler's, saved once
        self.policy = ReverseSchedule(self.process.scheduler if reverse is None else reverse)

    def reverse_powers(self, zt: Tensor, w: Tensor) -> Tensor:
        """Float ``[B, L]``: ``ŵ(z_t)`` (the forward powers ``w`` when tied)."""
        return w if self.reverse is None else self.reverse(zt).to(w.dtype)

    def forward(self, model, tokens, ranks, generator=None) -> LossOutput:
        if not isinstance(model.rule, Bidirectional):
            raise ValueError(f"lomdm_nelbo needs a bidirectional model, got attention {model.rule!r}")
        t = _times(tokens.shape[0], generator, tokens.device, self.t1)  # [B] float64 in [t1, 1]
        sched = self.process.given(tokens)  # Powers: w(x) [B, L] with its gradient
        f1, lq1 = self.integrand(model, tokens, ranks, t, sched, generator)
        f2, lq2 = self.integrand(model, tokens, ranks, t, sched, generator)
        span = 1.0 - self.t1
        diffusion = span * 0.5 * (f1 + f2)  # [B]
        surrogate = diffusion
        if self.reinforce:
            score = span * 0.5 * (f1 - f2).detach() * (lq1 - lq2)
            surrogate = surrogate + (score - score.detach())  # value 0, gradient the RLOO term
        ends = self.end_terms(tokens, ranks, sched.power, model.vocab_size)
        n = (ranks > 0).sum(1).float()
        loss = (surrogate + ends).sum() / n.sum().clamp_min(1)
        return LossOutput(loss, (diffusion + ends).detach(), n, exact=False)

    def integrand(self, model, tokens: Tensor, ranks: Tensor, t: Tensor, sched, generator=None) -> tuple[Tensor, Tensor]:
        """``(f Float[B], log q(z_t | x, t) Float[B])`` for one ``z_t`` sampled at times ``t``."""
        B, L = tokens.shape
        xt, noised = sched.corrupt(tokens, t, model.mask_id, model.vocab_size, ranks=ranks, generator=generator)
        a = sched.alpha(t, L)  # [B, L] α_i(x, t)
        tiny = torch.finfo(a.dtype).tiny
        log_q = torch.where(noised, (1.0 - a).clamp_min(tiny).log(), a.clamp_min(tiny).log())
        log_q = torch.where(ranks > 0, log_q, torch.zeros_like(log_q)).sum(1)  # [B]
        w = sched.power.expand(B, L)  # [B, L]
        w_hat = self.reverse_powers(xt, w)
        s = model.rule.noisy_stream(xt, ranks >= 0, noised)
        logp = torch.log_softmax(model(s).float(), dim=-1)  # [B, N, V]
        out = s.out.clamp(min=0)  # [B, N] the position each query predicts
        x_out = tokens.gather(1, out)
        tt = t.to(logp.dtype)[:, None]  # [B, 1]
        r = (w.gather(1, out).to(logp.dtype)) / tt  # [B, N] R_i = w_i / t
        term = -r * logp.gather(-1, x_out[..., None])[..., 0]
        if self.reverse is not None:  # the rate mismatch: (ŵ − w + w log(w/ŵ)) / t >= 0
            wq, wh = w.gather(1, out).to(logp.dtype), w_hat.gather(1, out).to(logp.dtype)
            term = term + (wh - wq + wq * (wq.log() - wh.log())) / tt
        f = torch.where(s.out >= 0, term, torch.zeros_like(term)).sum(1)
        return f, log_q.to(f.dtype)

    def end_terms(self, tokens: Tensor, ranks: Tensor, w: Tensor, vocab_size: int) -> Tensor:
        """Float ``[B]``: ``recon`` at ``t1`` plus ``prior`` at ``t = 1`` (module docstring)."""
        eps = self.process.eps
        masked_t1 = (1.0 - eps) * self.t1 ** w.expand(tokens.shape).to(torch.float64)  # [B, L]
        per = (masked_t1 + eps) * math.log(vocab_size)
        return torch.where(ranks > 0, per, torch.zeros_like(per)).sum(1).float()

    def __repr__(self) -> str:
        rev = "tied" if self.reverse is None else type(self.reverse).__name__
        return f"LoMDMNelbo(process={self.process!r}, reverse={rev}, t1={self.t1:g}, reinforce={self.reinforce})"
