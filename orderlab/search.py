"""Test-time order search: decode ``k`` paths per row with any policy and keep the best.

LookUM (ICML 2026) samples a few decoding paths and keeps the one a verifier prefers (2–3
paths suffice); Order-Token Search (arXiv 2601.20339) scores candidates by a likelihood
estimate. Here a path is one whole decode of the row (the policy's orders, and the
sampled tokens when ``temperature > 0``), the ``k`` paths of a batch decoded together as
``B·k`` rows (rows of one prompt adjacent), and a path is scored by

- the model's exact likelihood of its result under the order it used,
  ``log p_θ(x̂ | σ̂)`` (:func:`orderlab.log_likelihood`'s passes; ``verifier=None``), or
- a verifier ``verifier(tokens Long[B·k, L], ranks Long[B·k, L]) -> Float[B·k]`` (e.g. the
  task's score given the reference, or a reward model), which costs no denoiser call.

NFE is counted honestly: every forward of every path (``decode``'s count per row), plus,
with the likelihood, every pass of the scoring that predicts something for the path.
``k = 1`` is the plain decode (nothing is scored).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from orderlab.decoding import Decoded, decode
from orderlab.likelihood import check_tokens, stream_log_probs

__all__ = ["Searched", "search_decode", "path_log_likelihood"]


@dataclass
class Searched(Decoded):
    """:class:`Decoded` of the kept paths (``nfe``: all paths' forwards and the scoring),
    plus ``scores Float[B, k]`` (each path's score; None for ``k = 1``) and ``chosen
    Long[B]`` (the kept path's index; the first of equal scores)."""

    scores: Tensor | None = None
    chosen: Tensor | None = None


@torch.no_grad()
def path_log_likelihood(model, x: Tensor, ranks: Tensor) -> tuple[Tensor, Tensor]:
    """``(log p_θ(x | ranks) Float[B], passes Long[B])``: the exact likelihood (equal to
    :func:`orderlab.log_likelihood`) and, per row, the passes that predicted something
    for it (its NFE)."""
    check_tokens(model, x, ranks)
    total = torch.zeros(x.shape[0], device=x.device)
    passes = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    for s in model.rule.passes(x, ranks, model.mask_id):
        total = total + stream_log_probs(model(s), s, x).sum(1)
        passes += (s.out >= 0).any(1)
    return total, passes


@torch.no_grad()
def search_decode(model, policy, tokens: Tensor, ranks: Tensor, k: int = 4,
                  verifier: Callable[[Tensor, Tensor], Tensor] | None = None, **decode_kwargs) -> Searched:
    """Decode ``k`` paths of every row with ``policy`` (any policy: paths differ through a
    stochastic policy or ``temperature > 0``) and keep the best-scoring one (module
    docstring). ``decode_kwargs``: :func:`orderlab.decode`'s (``cache``, ``temperature``,
    ``seed``, ``eos_id``, ...), one decode of ``B·k`` rows with that seed."""
    if int(k) < 1:
        raise ValueError(f"search_decode: k must be >= 1 paths per row, got {k}")
    k = int(k)
    B = tokens.shape[0]
    d = decode(model, policy, tokens.repeat_interleave(k, 0), ranks.repeat_interleave(k, 0), **decode_kwargs)
    if k == 1:
        return Searched(d.tokens, d.ranks, d.nfe, d.tokens_per_step, d.steps, d.refreshes)
    if verifier is None:
        score, cost = path_log_likelihood(model, d.tokens, d.ranks)
    else:
        score, cost = verifier(d.tokens, d.ranks), torch.zeros_like(d.nfe)
        if score.shape != (B * k,):
            raise ValueError(f"search_decode: the verifier must return Float[B·k] = [{B * k}], got {tuple(score.shape)}")
    scores = score.double().view(B, k)
    chosen = scores.argmax(1)  # the first of equal scores
    rows = torch.arange(B, device=chosen.device) * k + chosen  # [B] rows of the kept paths
    per_step = [n[rows] for n in d.tokens_per_step]
    while per_step and not per_step[-1].any():  # steps in which only discarded paths revealed
        per_step.pop()
    nfe = (d.nfe + cost.to(d.nfe)).view(B, k).sum(1)
    return Searched(d.tokens[rows], d.ranks[rows], nfe, per_step, len(per_step),
                    None if d.refreshes is None else d.refreshes.view(B, k).sum(1), scores, chosen)
