"""Scoring a continuation: ``(log p(continuation | context), is_greedy)`` under an order.

Rows are ``x Long[B, L]`` with ``ranks``: 0 the context (given), 1 the continuation, -1
left padding. A scorer returns :class:`Scored` (``logp`` Float64[B] nats, ``greedy``
Bool[B]). One class per estimator, picked by name from :data:`SCORERS` (``order=`` in the
model args, its knobs ``order.<knob>=``), or any :class:`Scorer` subclass by dotted path:

======================  =============================================================  =========
``l2r`` (default)       exact ``log p(x | ranks 1..n in position order)``; for an AR     exact
                        checkpoint the AR model's log-likelihood
``r2l``                 exact, right to left                                           exact
``blocks`` (``size``)   exact, blocks of ``size`` tokens left to right, each block one  exact
                        set predicted in parallel (BD3-LM's order with whole-block sets)
``policy``              exact under the order the decode policy reveals the positions   exact given
                        in when it generates them (greedy): orderlab's ``bits``          that order
``iwae`` (``k``)        IWAE bound over orders (Burda et al. 2016): ``σ ~ q``, weighted  lower bound
                        by ``π``; a run's learned ``vi_orders`` (``π_ψ``, ``q_φ``),
                        else uniformly random orders
``mdm_nelbo``           LLaDA's Monte-Carlo MDM NELBO with ``samples`` draws (one       lower bound
(``samples``,           forward each, stratified ``t``) for a bidirectional model; for
``chunk``)              other rules the same quantity as the any-order NLL averaged
                        over ``samples`` uniformly random orders
======================  =============================================================  =========

A fixed order's log-likelihood is ``log p_θ(x | σ)`` of one order; it is ``log p(x)`` of the
model exactly when the model is that order's AR model (an AR checkpoint under ``l2r``).

``is_greedy`` (lm-eval: "would greedy decoding produce the continuation"): for a fixed
order, greedy decoding in that order reproduces the continuation exactly, which holds iff
every continuation token is the argmax of its conditional given the true tokens of the
earlier sets (induction over the sets), read from the same teacher-forced passes (for
``l2r`` on a causal model: each token is the argmax given its prefix). For ``policy`` it
is the policy's own greedy decode. A distribution over orders (``iwae``, ``mdm_nelbo``)
has no single order, so it is the decode policy's greedy decode reproducing the
continuation (the model's greedy generation as the harness would run it).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from orderlab.decoding import decode
from orderlab.evaluate import l2r_ranks
from orderlab.likelihood import check_tokens, log_likelihood, stream_log_probs
from orderlab.registry import ConfigError

__all__ = ["Scored", "Env", "Scorer", "FixedOrder", "L2R", "R2L", "Blocks", "PolicyOrder", "IWAE", "MDMNelbo",
           "SCORERS", "build_scorer", "teacher_forced", "greedy_decode"]


@dataclass
class Scored:
    logp: Tensor  # Float64[B]: nats of the continuation
    greedy: Tensor  # Bool[B]


@dataclass
class Env:
    """What a scorer may use besides the rows: the model, the decode policy (greedy checks),
    the source's learned order distributions (``(prior, proposal)`` or None) and the cache."""

    model: Any
    policy: Any
    orders: tuple[Any, Any] | None = None
    cache: Any = True


@torch.no_grad()
def teacher_forced(model, x: Tensor, order: Tensor) -> Scored:
    """The exact ``log p(x | order)`` and whether every predicted token is its conditional's
    argmax, from the rule's likelihood passes (each generated position predicted once from
    the true tokens of the earlier sets; ``orderlab.likelihood``)."""
    check_tokens(model, x, order)
    logp = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    greedy = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    for s in model.rule.passes(x, order, model.mask_id):
        logits = model(s)  # [B, N, V]
        logp += stream_log_probs(logits, s, x).double().sum(1)
        target = x.gather(1, s.out.clamp(min=0))  # [B, N]
        greedy &= ((logits.argmax(-1) == target) | (s.out < 0)).all(1)
    return Scored(logp, greedy)


@torch.no_grad()
def greedy_decode(env: Env, x: Tensor, ranks: Tensor):
    """The decode policy's greedy decode of the continuation positions, and Bool[B]: it
    reproduced the continuation."""
    out = decode(env.model, env.policy, x, ranks, cache=env.cache, temperature=0.0, seed=0)
    return out, ((out.tokens == x) | (ranks < 1)).all(1)


class Scorer:
    """``scorer(env, x, ranks, generator) -> Scored``; ``bound``: the log-likelihood is a
    lower bound on ``log p(continuation | context)`` (reported beside the results)."""

    bound = False

    def __call__(self, env: Env, x: Tensor, ranks: Tensor, generator: torch.Generator) -> Scored:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={getattr(self, k)!r}" for k in inspect.signature(type(self)).parameters)
        return f"{type(self).__name__}({args})"


class FixedOrder(Scorer):
    """One deterministic order: subclasses give ``order(ranks) -> Long[B, L]`` (0 and -1
    kept, the continuation's positions ranked); scored teacher-forced, exactly."""

    def order(self, ranks: Tensor) -> Tensor:
        raise NotImplementedError

    def __call__(self, env, x, ranks, generator):
        return teacher_forced(env.model, x, self.order(ranks))


class L2R(FixedOrder):
    """Left to right, one token per set."""

    def order(self, ranks):
        return l2r_ranks(ranks)


class R2L(FixedOrder):
    """Right to left, one token per set."""

    def order(self, ranks):
        gen = ranks >= 1
        return torch.where(gen, gen.sum(1, keepdim=True) + 1 - l2r_ranks(ranks), ranks)


class Blocks(FixedOrder):
    """Blocks of ``size`` continuation tokens, left to right; a block is one set."""

    def __init__(self, size: int = 4):
        if int(size) < 1:
            raise ConfigError("size", f"must be >= 1, got {size!r}")
        self.size = int(size)

    def order(self, ranks):
        l2r = l2r_ranks(ranks)
        return torch.where(ranks >= 1, (l2r - 1) // self.size + 1, ranks)


class PolicyOrder(Scorer):
    """The exact likelihood under the order the decode policy chose generating the
    continuation greedily (``orderlab.evaluate``'s ``bits``: the reference scored under the
    decoded order); ``is_greedy``: that decode reproduced the continuation."""

    def __call__(self, env, x, ranks, generator):
        out, same = greedy_decode(env, x, ranks)
        order = torch.where(ranks >= 1, out.ranks, ranks)  # no EOS cut here: every position revealed
        return Scored(teacher_forced(env.model, x, order).logp, same)


class IWAE(Scorer):
    """``L_K`` with ``k`` orders ``σ ~ q(σ | x)`` weighted by ``π(σ) / q(σ | x)``
    (objectives/iwae.py): the source's learned ``vi_orders`` when it has them, else
    uniformly random orders (``K = 1``: the MDM NELBO). A lower bound."""

    bound = True

    def __init__(self, k: int = 16):
        if int(k) < 1:
            raise ConfigError("k", f"must be >= 1, got {k!r}")
        self.k = int(k)

    def __call__(self, env, x, ranks, generator):
        from orderlab.objectives.iwae import iwae_bound

        prior, proposal = env.orders if env.orders is not None else ("linear", None)
        logp = iwae_bound(env.model, x, ranks, prior, proposal, k=self.k, generator=generator).double()
        return Scored(logp, greedy_decode(env, x, ranks)[1])


class MDMNelbo(Scorer):
    """Minus the MDM NELBO, ``samples`` Monte-Carlo draws per row, ``chunk`` draws per
    forward batch (memory). A bidirectional model: LLaDA's estimator, one forward per draw
    (``objectives.likelihood.MDMNelbo``, rows tiled so each row's draws get stratified
    ``t``). Another rule: the any-order log-likelihood averaged over uniformly random orders,
    the same quantity in expectation (objectives/iwae.py, module docstring). A lower bound."""

    bound = True

    def __init__(self, samples: int = 32, chunk: int = 8):
        for key, v in (("samples", samples), ("chunk", chunk)):
            if int(v) < 1:
                raise ConfigError(key, f"must be >= 1, got {v!r}")
        self.samples, self.chunk = int(samples), int(chunk)

    def __call__(self, env, x, ranks, generator):
        from orderlab.rules import Bidirectional

        draw = self._one_forward if isinstance(env.model.rule, Bidirectional) else self._random_orders
        total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        for start in range(0, self.samples, self.chunk):
            c = min(self.chunk, self.samples - start)
            xs, rs = x.repeat(c, 1), ranks.repeat(c, 1)  # [c*B, L]: draw j of row b at j*B + b
            total += draw(env.model, xs, rs, generator).double().view(c, -1).sum(0)  # [c*B] -> [c, B] -> [B]
        return Scored(total / self.samples, greedy_decode(env, x, ranks)[1])

    @staticmethod
    def _one_forward(model, xs, rs, generator) -> Tensor:
        from orderlab.objectives.likelihood import MDMNelbo as Nelbo

        return -Nelbo()(model, xs, rs, generator=generator).nats

    @staticmethod
    def _random_orders(model, xs, rs, generator) -> Tensor:
        from orderlab.objectives.iwae import ProcessOrders
        from orderlab.processes.flat import Linear

        return log_likelihood(model, xs, ProcessOrders(Linear()).sample(xs, rs, generator))


SCORERS: dict[str, type[Scorer]] = {"l2r": L2R, "r2l": R2L, "blocks": Blocks, "policy": PolicyOrder, "iwae": IWAE,
                                    "mdm_nelbo": MDMNelbo}


def _class(name: str) -> type[Scorer]:
    """The scorer class of ``order=``: a :data:`SCORERS` name or a dotted path."""
    if name in SCORERS:
        return SCORERS[name]
    module, _, attr = name.rpartition(".")
    cls = None
    if module:
        try:
            cls = getattr(importlib.import_module(module), attr, None)
        except ImportError:
            cls = None
    if not (isinstance(cls, type) and issubclass(cls, Scorer)):
        raise ConfigError("model_args.order", f"unknown order {name!r} (choose one of {', '.join(SCORERS)}, or a "
                                              "dotted path to an orderlab.harness.Scorer subclass)")
    return cls


def build_scorer(name: str, knobs: dict[str, Any]) -> Scorer:
    """The scorer ``name`` with its knobs; an unknown knob is an error naming it."""
    cls = _class(name)
    valid = list(inspect.signature(cls).parameters)
    for k in knobs:
        if k not in valid:
            raise ConfigError(f"model_args.order.{k}", f"unknown knob for {cls.__name__} "
                                                       f"(valid: {', '.join(valid) or 'none'})")
    try:
        return cls(**knobs)
    except ConfigError as e:
        raise ConfigError(f"model_args.order.{e.path}", e.message) from None
