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

:class:`OrderTokenSearch` (policy ``order_token_search``) is the other search: a beam over
``(position, token)`` extensions of partial decodes, each hypothesis scored by the model's
exact likelihood of its partial order; it decodes itself (``decode``), since the
decoder's loop holds one state per row.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from orderlab.decoding import Decoded, _predict, decode
from orderlab.likelihood import check_tokens, stream_log_probs
from orderlab.policies.base import Policy, PolicyError, StepView
from orderlab.ranks import validate
from orderlab.registry import ConfigError, register
from orderlab.rules import UNKNOWN

__all__ = ["Searched", "search_decode", "path_log_likelihood", "OrderTokenSearch"]


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
    ``seed``, ``eos_id``, ...), one decode of ``B·k`` rows with that seed. A policy with
    its own ``decode`` (:class:`OrderTokenSearch`) decodes the paths itself."""
    if int(k) < 1:
        raise ValueError(f"search_decode: k must be >= 1 paths per row, got {k}")
    k = int(k)
    B = tokens.shape[0]
    own = getattr(policy, "decode", None)  # a search that decodes itself (order_token_search) is one path's decoder
    run = (lambda *a, **kw: own(model, *a, **kw)) if callable(own) else (lambda *a, **kw: decode(model, policy, *a, **kw))
    d = run(tokens.repeat_interleave(k, 0), ranks.repeat_interleave(k, 0), **decode_kwargs)
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


@register("policy", "order_token_search")
class OrderTokenSearch(Policy):
    """Order-Token Search (arXiv 2601.20339): a beam of ``beam`` partial decodes per row; a
    step extends every hypothesis ``h`` by one masked position ``i`` (among the attention
    rule's candidates) and one token ``v``, and keeps the ``beam`` best extensions of the
    row by the exact log-likelihood of the partial order (DESIGN.md section 1, singleton
    sets)::

        score(h + (i, v)) = score(h) + log p_θ(x_i = v | x_h),   score(∅) = 0

    so a finished hypothesis's score is ``log p_θ(x̂ | σ̂)`` (``orderlab.log_likelihood`` of
    its tokens under its order); the best finished one is returned (``Searched.scores``:
    the final beam's scores, best first). One position per step, greedy in the sense of
    the beam only (no token sampling: ``temperature`` must be 0). ``beam = 1`` is greedy
    top-probability decoding (``top_prob``: the most confident position, its argmax
    token); a beam as wide as the number of partial hypotheses is the exact argmax of
    ``p_θ(x, σ)`` over tokens and orders.

    Assumed where the paper's rule is not in REFERENCES: the likelihood is the model's
    exact one (not an estimate); hypotheses reaching the same tokens by different orders
    are kept apart (they are different ``(order, token)`` paths); ties go to the earlier
    beam, position, token. NFE: one per live hypothesis per step, every forward of every
    beam (a step at the start, where the row has one hypothesis, costs 1). The forwards
    recompute (no KV cache: the beams reorder every step); ``cache`` is accepted and
    unused. ``eos_id`` is not supported (a ValueError).

    Used as ``evaluate.policies: [{name: order_token_search, beam: 4}]``: evaluation calls
    its :meth:`decode`; ``orderlab.decode``'s one-state-per-row loop cannot run it
    (:meth:`select` raises).
    """

    def __init__(self, beam: int = 4):
        if isinstance(beam, bool) or not isinstance(beam, int) or beam < 1:
            raise ConfigError("beam", f"must be an integer >= 1 (hypotheses per row), got {beam!r}")
        self.beam = beam

    def select(self, view: StepView) -> Tensor:
        raise PolicyError("order_token_search keeps several states per row and decodes itself: call "
                          "OrderTokenSearch.decode(model, tokens, ranks) (evaluation does), not orderlab.decode")

    @torch.no_grad()
    def decode(self, model, tokens: Tensor, ranks: Tensor, cache: object = True, temperature: float = 0.0, seed: int = 0,
               eos_id: int | None = None, pad_id: int | None = None, compile: bool | dict = False) -> Searched:
        """Beam-decode the positions with rank >= 1 (``orderlab.decode``'s arguments; see
        the class docstring for those it does not use; ``compile`` is accepted so that an
        evaluation's setting passes through, and the beam's forwards always run eagerly).
        Returns :class:`Searched`."""
        if temperature:
            raise ValueError(f"order_token_search scores hypotheses, it samples nothing: temperature must be 0, got {temperature}")
        if eos_id is not None:
            raise ValueError("order_token_search does not cut rows at EOS (eos_id must be None)")
        validate(ranks, tokens)
        B, L = tokens.shape
        W, V = self.beam, model.vocab_size
        rank = torch.where(ranks >= 1, torch.full_like(ranks, UNKNOWN), ranks).long()
        x = torch.where(ranks >= 1, torch.full_like(tokens, model.mask_id), tokens).long()
        x, rank = x[:, None].repeat(1, W, 1), rank[:, None].repeat(1, W, 1)  # [B, W, L]
        score = torch.full((B, W), -math.inf, dtype=torch.float64, device=x.device)
        score[:, 0] = 0.0  # one hypothesis per row at the start
        nfe = torch.zeros(B, dtype=torch.long, device=x.device)
        per_step: list[Tensor] = []
        step = 0
        while True:
            masked = rank == UNKNOWN  # [B, W, L]
            live = torch.isfinite(score) & masked.any(-1)  # [B, W]
            going = live.any(1)  # [B]: rows not finished (all hypotheses of a row finish together)
            if not going.any():
                break
            flat = live.view(-1).nonzero()[:, 0]  # [n] the live hypotheses
            xs, rs, ms = x.view(B * W, L)[flat], rank.view(B * W, L)[flat], masked.view(B * W, L)[flat]
            cand = model.rule.candidates(ms, rs)  # [n, L]
            probs, _ = _predict(model, xs, rs, cand, step, None, None)  # [n, L, V]: one forward per hypothesis
            nfe += live.sum(1)
            lp = probs.double().clamp_min(1e-300).log()
            lp = torch.where(cand[..., None], lp, torch.full_like(lp, -math.inf)) + score.view(-1)[flat, None, None]
            ext = torch.full((B * W, L, V), -math.inf, dtype=torch.float64, device=x.device)
            ext = ext.index_copy(0, flat, lp).view(B, W * L * V)  # every (hypothesis, position, token) of a row
            best = ext.sort(dim=1, descending=True, stable=True)  # ties: earlier hypothesis, position, token
            val, idx = best.values[:, :W], best.indices[:, :W]  # [B, W]
            parent, pos, tok = idx // (L * V), (idx // V) % L, idx % V
            nx = x.gather(1, parent[..., None].expand(B, W, L)).scatter(2, pos[..., None], tok[..., None])
            nr = rank.gather(1, parent[..., None].expand(B, W, L)).scatter(2, pos[..., None], torch.full_like(pos[..., None], step + 1))
            keep = ~going[:, None, None]  # finished rows keep their beam
            x, rank = torch.where(keep, x, nx), torch.where(keep, rank, nr)
            score = torch.where(going[:, None], val, score)
            per_step.append(going.long())
            step += 1
        return Searched(x[:, 0], rank[:, 0], nfe, per_step, step, None, score, torch.zeros(B, dtype=torch.long, device=x.device))

    def __repr__(self) -> str:
        return f"OrderTokenSearch(beam={self.beam})"
