"""Training losses: the set NLL of a sampled order, the MDM NELBO and the block NELBO."""

from __future__ import annotations

import torch
from torch import Tensor

from orderlab.likelihood import log_likelihood, stream_log_probs
from orderlab.processes.base import Process
from orderlab.processes.corruption import Absorbing
from orderlab.processes.flat import Flat
from orderlab.registry import register
from orderlab.rules import Bidirectional, BlockCausal

from .base import LossOutput, Objective

__all__ = ["SetNLL", "MDMNelbo", "BlockNelbo"]


def _times(batch: int, generator: torch.Generator | None, device, eps: float) -> Tensor:
    """Stratified t ∈ [eps, 1] over the batch (low-variance NELBO estimate, as in MDLM)."""
    u = torch.rand((), generator=generator).item()
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

    def __init__(self, process: Process | str = "linear", steps: int | None = None):
        super().__init__(process)
        self.steps = steps

    def forward(self, model, tokens, ranks, generator=None) -> LossOutput:
        order = self.process.sample_ranks(ranks, generator=generator, steps=self.steps)
        nats = -log_likelihood(model, tokens, order)
        return self._output(nats, (ranks > 0).sum(1), exact=True)


@register("objective", "mdm_nelbo")
class MDMNelbo(Objective):
    """Continuous-time MDM NELBO (MDLM, Sahoo et al. 2024, eq. 10; MD4, Shi et al. 2024):

        E_t Σ_{i noised} -α_i'(t) / (1 - α_i(t)) · (-log p_θ(x_i | x_t))

    with per-position weights from the process's hyperschedule, for a bidirectional
    model. A bound on the NLL. The weight is the absorbing-state ELBO; with uniform or
    hybrid corruption this is the masked cross-entropy surrogate, not an ELBO.
    """

    def __init__(self, process: Process | str = "linear", eps: float = 1e-3):
        super().__init__(process)
        self.eps = eps

    def forward(self, model, tokens, ranks, generator=None) -> LossOutput:
        if not isinstance(model.rule, Bidirectional):
            raise ValueError(f"mdm_nelbo needs a bidirectional model, got attention {model.rule!r}")
        B, L = tokens.shape
        t = _times(B, generator, tokens.device, self.eps)  # [B]
        xt, noised = self.process.corrupt(tokens, t, model.mask_id, model.vocab_size, ranks=ranks, generator=generator)
        s = model.rule.noisy_stream(xt, ranks >= 0, noised)
        nats = _weighted_nats(model, s, tokens, self.process.weight(t, L))
        return self._output(nats, (ranks > 0).sum(1), exact=False)


@register("objective", "block_nelbo")
class BlockNelbo(Objective):
    """BD3-LM NELBO (Arriola et al. 2025, eq. 7): one ``t`` per block, a flat schedule
    inside each block, loss read from the noisy copy of each block, which sees earlier
    clean blocks. For a block-causal model. A bound on the NLL. Absorbing corruption only:
    the noisy blocks hold [MASK] (eq. 7 is the absorbing-state ELBO)."""

    def __init__(self, process: Process | str = "linear", eps: float = 1e-3):
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
        u = torch.rand(B, L, generator=generator, dtype=torch.float64).to(tokens.device)
        noised = (u >= alpha) & (ranks > 0)  # P(noised) = 1 - α(t_block)
        xt = torch.where(noised, torch.full_like(tokens, model.mask_id), tokens)
        s = model.rule.noisy_stream(tokens, xt, ranks, noised)
        nats = _weighted_nats(model, s, tokens, w)
        return self._output(nats, (ranks > 0).sum(1), exact=False)
