"""The common likelihood of set diffusion (DESIGN.md section 1; Arriola & Kuleshov 2026):

    log p(x | ranks) = Σ_k Σ_{i ∈ S_k} log p_θ(x_i | x_{S_<k})

exact for every attention rule: the rule's passes together predict every generated
position once, each from exactly the tokens of earlier sets (and the given ones).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from orderlab.ranks import RanksError, validate
from orderlab.rules import Stream

__all__ = ["log_likelihood", "stream_log_probs", "check_tokens"]


def stream_log_probs(logits: Tensor, s: Stream, x: Tensor) -> Tensor:
    """Float ``[B, N]``: ``log p(x[out])`` for each query of the stream, 0 where ``out == -1``."""
    logp = F.log_softmax(logits.float(), dim=-1)  # [B, N, V]
    target = x.gather(1, s.out.clamp(min=0))  # [B, N]
    lp = logp.gather(-1, target[..., None])[..., 0]
    return torch.where(s.out >= 0, lp, torch.zeros_like(lp))


def check_tokens(model, x: Tensor, ranks: Tensor) -> None:
    validate(ranks, x)
    bad = (ranks >= 0) & ((x < 0) | (x >= model.vocab_size))
    if bad.any():
        b, i = (int(v) for v in bad.nonzero()[0])
        raise RanksError(
            f"x[{b}, {i}] = {int(x[b, i])} is not a token of the model (vocab_size={model.vocab_size}); "
            "the likelihood needs the true tokens at every non-padding position"
        )


def log_likelihood(model, x: Tensor, ranks: Tensor) -> Tensor:
    """Float ``[B]``: ``log p_θ(x | ranks)`` in nats (ranks: 0 given, k >= 1 set k, -1 pad)."""
    check_tokens(model, x, ranks)
    total = torch.zeros(x.shape[0], device=x.device)
    for s in model.rule.passes(x, ranks, model.mask_id):
        total = total + stream_log_probs(model(s), s, x).sum(1)
    return total
