"""One decoder for every configuration and every policy (DESIGN.md section 5).

    while some position is masked:
        stream = rule.step(...)              # new clean tokens (cache) + candidate queries
        view   = StepView(probs, ...)        # one NFE
        S_k    = policy.select(view)         # a non-empty set per unfinished row
        x[S_k] = sample(view, S_k)           # greedy / temperature (float64 Gumbel) / top-p
        (the cache appends S_k's K/V at the start of the next step's forward)

Rows decode together with padding; each row reveals its own set per step. With
``compile=True`` everything after the candidates (the stream padded to one fixed width,
the forward, the policy's selection, the sampling and the update) is one function,
:func:`_advance`, run through ``torch.compile`` (:class:`_Step`): one static graph for the
whole decode (gpt-fast's ``decode_one_token``, with the policy inside). A position
revealed at step ``s`` (0-based) gets rank ``s + 1`` in :attr:`Decoded.ranks`, so the
returned ranks are the order actually used, and ``log_likelihood(model, x, d.ranks)``
scores the decoded sequence under that order.

``cache``: ``True`` keeps the rule's exact KV cache (set-causal, block-causal; a
bidirectional rule recomputes), ``False`` recomputes every step, an
:class:`~orderlab.approx_cache.ApproximateCache` keeps Fast-dLLM's approximate prefix or
dual cache for a bidirectional model (refreshed when the policy's candidates leave the
window of the last refresh; eager only).
"""

from __future__ import annotations

import types
import weakref
from dataclasses import dataclass, field

import torch
from torch import Tensor

from orderlab.approx_cache import ApproximateCache
from orderlab.likelihood import check_tokens, stream_log_probs
from orderlab.policies.base import StepView
from orderlab.ranks import dense, validate
from orderlab.rules import UNKNOWN

__all__ = ["Decoded", "decode", "sample_tokens", "score_order"]


@dataclass
class Decoded:
    tokens: Tensor  # Long[B, L]
    ranks: Tensor  # Long[B, L]: 0 given, k revealed at step k (1-based), -1 padding
    nfe: Tensor  # Long[B]: forwards in which the row still had masked positions
    tokens_per_step: list[Tensor] = field(default_factory=list)  # Long[B] per step
    steps: int = 0
    refreshes: Tensor | None = None  # Long[B]: forwards that recomputed the row (approximate cache only)


def _top_p_filter(logp: Tensor, top_p: float) -> Tensor:
    """Nucleus filtering (Holtzman et al. 2020): keep the smallest prefix with mass >= top_p."""
    sorted_lp, idx = logp.sort(dim=-1, descending=True)
    cum = sorted_lp.exp().cumsum(-1)
    drop = cum - sorted_lp.exp() >= top_p  # mass before this token already reaches top_p
    sorted_lp = sorted_lp.masked_fill(drop, float("-inf"))
    return torch.full_like(logp, float("-inf")).scatter(-1, idx, sorted_lp)


def sample_tokens(probs: Tensor, temperature: float = 0.0, top_p: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
    """Long ``[...]``: a token per distribution of ``probs [..., V]``.

    ``temperature == 0``: argmax. Otherwise Gumbel-max in **float64**: float32 Gumbel noise
    truncates the tail and lowers the effective temperature (Zheng et al. 2024).
    """
    if temperature == 0.0:
        return probs.argmax(-1)
    logp = probs.double().clamp_min(1e-300).log() / temperature
    logp = logp - logp.logsumexp(-1, keepdim=True)
    if top_p < 1.0:
        logp = _top_p_filter(logp, top_p)
    u = torch.rand(logp.shape, dtype=torch.float64, generator=generator, device=logp.device)
    gumbel = -(-u.clamp_min(1e-300).log()).log()
    return (logp + gumbel).argmax(-1)


def _rows(out: Tensor, N: int, L: int) -> Tensor:
    """Long ``[B, L]``: for every position, the row of the flattened ``[B * (N + 1), ...]``
    predictions that holds it: its query's (``out``) or row ``N`` of its batch row (the
    filler) where nothing predicts it."""
    B = out.shape[0]
    slots = torch.arange(N, device=out.device).expand(B, N)
    row = torch.full((B, L + 1), N, device=out.device).scatter_(1, torch.where(out >= 0, out, L), slots)  # column L: dump
    return row[:, :L] + torch.arange(B, device=out.device)[:, None] * (N + 1)


def _spread(rows: Tensor, flat: Tensor) -> Tensor:
    """``rows [B, N + 1, C]`` read at ``flat [B, L]`` (:func:`_rows`): ``[B, L, C]``. An
    ``index_select`` of whole rows (a row copy each), not a ``gather`` over ``[B, L, C]``
    (one index per element: 13x slower at batch 32)."""
    B, L = flat.shape
    return rows.reshape(-1, rows.shape[-1]).index_select(0, flat.flatten()).view(B, L, -1)


def _probs(logits: Tensor, out: Tensor, L: int) -> tuple[Tensor, dict[str, Tensor]]:
    """The streams' predictions at their positions, ``[B, L, V]``; rows not predicted get
    1/V. Also their confidence and argmax ``[B, L]`` (StepView's derived fields), reduced
    over the ``N`` predicted rows and then spread, not over all ``L``: the same values."""
    B, N, V = logits.shape
    p = torch.softmax(logits.float(), -1)
    p = torch.cat([p, torch.full((B, 1, V), 1.0 / V, device=p.device)], 1)  # row N: uniform
    flat = _rows(out, N, L)
    derived = {"confidence": p.amax(-1).take(flat), "argmax": p.argmax(-1).take(flat)}
    return _spread(p, flat), derived


def _hidden(h: Tensor, out: Tensor, L: int) -> Tensor:
    """Float32 ``[B, L, C]``: the streams' final hidden states at their positions (spread as
    in :func:`_probs`); zeros where nothing is predicted."""
    B, N, C = h.shape
    h = torch.cat([h.float(), torch.zeros(B, 1, C, device=h.device)], 1)  # row N: zeros
    return _spread(h, _rows(out, N, L))


def _advance(model, policy, x: Tensor, rank: Tensor, masked: Tensor, cand: Tensor, step: int, kv, width: int | None,
             temperature: float, top_p: float, gen: torch.Generator, span: int | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One decode step once its candidates are known: the rule's stream (padded to
    ``width``), one forward, the policy's set and its tokens. Returns the new ``(x, rank)``,
    the set ``sel`` and ``bad`` (the policy broke its contract). A function of tensors and
    two sizes (the step number; ``span``, the cache prefix a compiled step attends over)
    only, so that ``torch.compile`` makes the whole step one graph."""
    if span is not None:
        kv.span = span
    probs, hidden, derived = _forward(model, x, rank, cand, step, kv, width, getattr(policy, "wants_hidden", False))
    return _choose(policy, probs, x, rank, masked, cand, step, temperature, top_p, gen, hidden, derived)


def _forward(model, x: Tensor, rank: Tensor, cand: Tensor, step: int, kv, width: int | None,
             hidden: bool = False) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
    """:func:`_predict` and the derived fields of :func:`_probs`."""
    s = model.rule.step(x, rank, cand, step, kv is not None, width=width)
    if not hidden:
        probs, derived = _probs(model(s, kv), s.out, x.shape[1])
        return probs, None, derived
    logits, h = model(s, kv, return_hidden=True)
    probs, derived = _probs(logits, s.out, x.shape[1])
    return probs, _hidden(h, s.out, x.shape[1]), derived


def _predict(model, x: Tensor, rank: Tensor, cand: Tensor, step: int, kv, width: int | None,
             hidden: bool = False) -> tuple[Tensor, Tensor | None]:
    """``(probs Float[B, L, V], hidden Float[B, L, C] | None)``: one forward over the rule's
    stream for step ``step``; the final hidden states too when ``hidden`` (same forward)."""
    probs, h, _ = _forward(model, x, rank, cand, step, kv, width, hidden)
    return probs, h


def _choose(policy, probs: Tensor, x: Tensor, rank: Tensor, masked: Tensor, cand: Tensor, step: int,
            temperature: float, top_p: float, gen: torch.Generator,
            hidden: Tensor | None = None, derived: dict[str, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The policy's set, its tokens and the new ``(x, rank)``: see :func:`_advance`.
    ``derived``: StepView fields already computed (:func:`_probs`), handed to the view."""
    view = StepView(probs=probs, candidates=cand, masked=masked, step=step, given=rank == 0, hidden=hidden,
                    tokens=x if getattr(policy, "wants_tokens", False) else None, derived=derived)
    sel = policy.select(view)
    bad = (sel > cand).any() | (cand.any(1) > sel.any(1)).any()  # outside the candidates; none for a row
    new = view.argmax if temperature == 0.0 else sample_tokens(probs, temperature, top_p, gen)  # [B, L]
    return torch.where(sel, new, x), torch.where(sel, step + 1, rank), sel, bad


class _Step:
    """Runs :func:`_advance`, eagerly or compiled with static shapes (gpt-fast's
    ``decode_one_token``, here with the policy and the sampling inside the graph).

    Compiled, streams are padded to a fixed ``width`` so that every step has one shape.
    Without a cache: the number of non-padding positions of the longest row (a step's
    clean tokens and its queries are disjoint positions). With a cache, a stream holds the
    set revealed last step and this step's queries, both within the policy's candidate
    width ``c`` (``policy.candidates`` on an all-masked row: 8 for an 8-wide window), so
    the width starts at ``c + 1`` (one token per step: one width for the whole decode) and
    grows to ``2 c`` the first time a step needs more (``rule.step_width``, read before the
    step; one recompile), then to whatever a step needs. ``width`` overrides the starting
    value. A step wider than the width (the prompt's, at step 0) runs eagerly.

    Shapes are static (``dynamic=False``) except two sizes symbolic from the first trace
    (``dynamic_sources``): the step number and the cache prefix the attention reads
    (``span``: the longest row's cached tokens plus the width, below the capacity's dump
    slot), so a width compiles one graph for every step and the attention reads the used
    cache only (at batch 32, ~10% of the step against attending over the whole capacity).
    """

    def __init__(self, model, policy, compile: bool | dict, cached: bool, width: int | None, nonpad: int, cand_width: int):
        self.model, self.policy, self.bound = model, policy, 2 * cand_width
        opts = compile if isinstance(compile, dict) else {}
        self.compiled = _compiled_advance(model, policy, **opts) if compile else None
        self.width = nonpad if not cached else (width if width is not None else cand_width + 1)

    def __call__(self, x, rank, masked, cand, step, kv, temperature, top_p, gen):
        args = (self.model, self.policy, x, rank, masked, cand, step, kv)
        if self.compiled is None:
            return _advance(*args, None, temperature, top_p, gen)
        n = self.model.rule.step_width(x, rank, cand, step, kv is not None)
        if n > self.width and kv is not None and step > 0:
            self.width = max(n, self.bound)
        if n > self.width:
            return _advance(*args, None, temperature, top_p, gen)
        # the buffer prefix that holds every real key (slot C - 1 only ever takes padding):
        # a symbolic length, so that the attention reads the used cache, not all of it
        span = min(int(kv.length.max()) + self.width, kv.capacity - 1) if kv is not None else None
        with torch.compiler.config.patch(dynamic_sources="L['step'],L['span']"):
            return self.compiled(*args, self.width, temperature, top_p, gen, span)


def _compiled_advance(model, policy, **options):
    """:func:`_advance` through ``torch.compile(**options)``, one compiled function per
    model, policy (by its repr) and options. Dynamo keeps its graphs per *code object* and
    runs a function eagerly once it holds ``recompile_limit`` (8) graphs; every policy,
    width and batch size is a graph, so one shared function fell back to eager within an
    ablation over a few policies. Each entry here compiles its own copy of the code."""
    per_model = _COMPILED.setdefault(model, {})
    key = (repr(policy), repr(sorted(options.items())))
    if key not in per_model:
        code = _advance.__code__.replace(co_name=f"_advance_{len(per_model)}")
        fn = types.FunctionType(code, _advance.__globals__, code.co_name, _advance.__defaults__)
        per_model[key] = torch.compile(fn, dynamic=False, **options)
    return per_model[key]


_COMPILED: "weakref.WeakKeyDictionary[object, dict[tuple[str, str], object]]" = weakref.WeakKeyDictionary()


def _limit(rank: Tensor, tokens: Tensor, max_new_tokens: int | None, pad_id: int) -> None:
    """Open-ended generation: only the first ``max_new_tokens`` masked positions of a row are generated."""
    if max_new_tokens is None:
        return
    order = (rank == UNKNOWN).long().cumsum(1)
    drop = (rank == UNKNOWN) & (order > max_new_tokens)
    rank[drop], tokens[drop] = -1, pad_id


def decode(model, policy, tokens: Tensor, ranks: Tensor, cache: bool | ApproximateCache = True, temperature: float = 0.0,
           top_p: float = 1.0, seed: int = 0, eos_id: int | None = None, max_new_tokens: int | None = None,
           pad_id: int | None = None, compile: bool | dict = False, width: int | None = None) -> Decoded:
    """Decode the positions with rank >= 1 of ``tokens`` (any token there is ignored).

    ``cache``: ``True`` keeps an exact KV cache (set-causal and block-causal rules;
    bidirectional rules recompute), ``False`` recomputes, ``ApproximateCache(suffix)``
    keeps Fast-dLLM's approximate prefix (``suffix=False``) or dual cache of a bidirectional
    model (``orderlab.approx_cache``: one loop, a step's forward is a refresh or a cached
    one, both counted in NFE; :attr:`Decoded.refreshes` counts the refreshes; eager only,
    ``compile=True`` with it is a ValueError). ``eos_id``: once a row reveals EOS, its masked positions
    after it become padding filled with ``pad_id`` (default: EOS). ``compile``: run each
    step (forward, policy, sampling) through ``torch.compile`` (a dict: its options, e.g.
    ``{"backend": "aot_eager"}``) on streams padded to a fixed width (``width``: its
    starting value, see :class:`_Step`); same outputs up to float rounding. The policy is
    traced too: Python branches on its state or on ``view.step`` become guards (a new
    graph where they change), never stale code.
    Returns :class:`Decoded`.

    The loop runs under ``torch.inference_mode`` (no autograd bookkeeping: ~10% of an eager
    step at batch 1, ``docs/benchmarks.md``); what it returns are ordinary tensors (cloned
    outside that mode), so callers may modify them in place or feed them to autograd. A
    policy that keeps tensors from its views (a recording) gets inference tensors, which
    autograd accepts once copied (``torch.stack``, ``clone``) outside the mode.
    """
    with torch.inference_mode():
        d = _decode(model, policy, tokens, ranks, cache, temperature, top_p, seed, eos_id, max_new_tokens, pad_id,
                    compile, width)
    return Decoded(tokens=d.tokens.clone(), ranks=d.ranks.clone(), nfe=d.nfe.clone(),
                   tokens_per_step=[t.clone() for t in d.tokens_per_step], steps=d.steps,
                   refreshes=None if d.refreshes is None else d.refreshes.clone())


def _decode(model, policy, tokens: Tensor, ranks: Tensor, cache: bool | ApproximateCache, temperature: float,
            top_p: float, seed: int, eos_id: int | None, max_new_tokens: int | None, pad_id: int | None,
            compile: bool | dict, width: int | None) -> Decoded:
    """:func:`decode`'s loop, inside inference mode."""
    validate(ranks, tokens)
    B, L = tokens.shape
    rule = model.rule
    gen = torch.Generator(device=tokens.device).manual_seed(seed)
    rank = torch.where(ranks >= 1, torch.full_like(ranks, UNKNOWN), ranks).long()
    x = torch.where(ranks >= 1, torch.full_like(tokens, model.mask_id), tokens).long()
    fill = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
    _limit(rank, x, max_new_tokens, fill)
    approx = cache.start(model, B, L) if isinstance(cache, ApproximateCache) else None
    if approx is not None and getattr(policy, "wants_hidden", False):
        raise ValueError(f"decode: {cache!r} does not pass hidden states, which {policy!r} reads (features: hidden); "
                         "use cache=True or False")
    if approx is not None and compile:
        raise ValueError(f"decode: {cache!r} runs eagerly only (its refreshes read the host); use compile=False")
    kv = model.new_cache(B, L) if approx is None and cache and rule.cacheable else None
    # the policy's candidate width: its candidates on an all-masked row
    every = torch.ones(1, L, dtype=torch.bool, device=x.device)
    cand_width = int((rule.candidates(every) & policy.candidates(every, 0)).sum()) or L if compile else L
    advance = _Step(model, policy, compile, kv is not None, width, int((rank >= 0).sum(1).max()) if B else 0, cand_width)
    if hasattr(policy, "reset"):
        policy.reset()
    nfe = torch.zeros(B, dtype=torch.long, device=x.device)
    per_step: list[Tensor] = []
    pos = torch.arange(L, device=x.device)
    step = 0
    while True:
        masked = rank == UNKNOWN
        active = masked.any(1)
        if not active.any():
            break
        allowed = rule.candidates(masked, rank)
        cand = allowed & policy.candidates(masked, step)
        cand = torch.where(cand.any(1, keepdim=True), cand, allowed)  # the rule wins when they disagree
        if approx is not None:  # a refresh or a cached step: one forward either way
            probs, derived = _probs(*approx(x, rank, cand), L)
            x, rank, sel, bad = _choose(policy, probs, x, rank, masked, cand, step, temperature, top_p, gen, None, derived)
        elif kv is None and not compile and not active.all():  # recomputing: finished rows cost nothing
            rows = active.nonzero()[:, 0]
            probs = torch.full((B, L, model.vocab_size), 1.0 / model.vocab_size, device=x.device)
            wants = getattr(policy, "wants_hidden", False)
            probs[rows], h = _predict(model, x[rows], rank[rows], cand[rows], step, None, None, wants)
            hidden = None if h is None else h.new_zeros(B, L, h.shape[-1]).index_copy(0, rows, h)
            x, rank, sel, bad = _choose(policy, probs, x, rank, masked, cand, step, temperature, top_p, gen, hidden)
        else:
            x, rank, sel, bad = advance(x, rank, masked, cand, step, kv, temperature, top_p, gen)
        if bad:
            raise RuntimeError(f"{policy!r}.select must return a non-empty subset of the candidates for every unfinished row (step {step})")
        if eos_id is not None:  # everything masked after a revealed EOS becomes padding
            first_eos = torch.where(sel & (x == eos_id), pos, L).amin(1, keepdim=True)
            cut = (rank == UNKNOWN) & (pos > first_eos)
            rank, x = torch.where(cut, -1, rank), torch.where(cut, fill, x)
        nfe += active
        per_step.append(sel.sum(1))
        step += 1
    return Decoded(tokens=x, ranks=rank, nfe=nfe, tokens_per_step=per_step, steps=step,
                   refreshes=approx.refreshes if approx is not None else None)


@torch.no_grad()
def score_order(model, x: Tensor, ranks: Tensor, cache: bool = True) -> Tensor:
    """Float ``[B]``: ``log p(x | ranks)`` computed step by step, as a decoder would
    (teacher-forced: step ``k`` reveals set ``S_k`` with its true tokens).

    Equal to :func:`orderlab.log_likelihood` (one pass) when the cache is exact; the
    tests check that identity for every rule.
    """
    check_tokens(model, x, ranks)
    B, L = x.shape
    d = dense(ranks)
    rank = torch.where(d >= 1, torch.full_like(d, UNKNOWN), d)
    cur = torch.where(d >= 1, torch.full_like(x, model.mask_id), x)
    kv = model.new_cache(B, L) if cache and model.rule.cacheable else None
    total = torch.zeros(B, device=x.device)
    for step in range(int(d.max()) if (d > 0).any() else 0):
        target = d == step + 1
        s = model.rule.step(cur, rank, target, step, kv is not None)
        total += stream_log_probs(model(s, kv), s, x).sum(1)
        cur = torch.where(target, x, cur)
        rank = torch.where(target, torch.full_like(rank, step + 1), rank)
    return total
