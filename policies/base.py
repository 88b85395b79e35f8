"""What a policy sees (``StepView``) and what it is (``Policy``): DESIGN.md section 5.

The decoder calls, per step::

    cand = policy.candidates(masked, step)         # before the forward: which queries to run
    view = StepView(probs, cand, masked, step, given)
    sel  = policy.select(view)                     # Bool[B, L], subset of cand, >= 1 per row with cand

and ``policy.reset()`` before every new batch. Stochastic policies also give
``log_prob(selected, view) -> Float[B]`` (RL, VI).
"""

from __future__ import annotations

import abc
import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from orderlab.ranks import require
from orderlab.registry import declare_kind

__all__ = ["StepView", "Policy", "PolicyError"]


class PolicyError(ValueError):
    """A step view or a selection is malformed."""


def _check_mask(name: str, t: object, shape: tuple[int, int]) -> None:
    if not isinstance(t, Tensor):
        raise PolicyError(f"StepView.{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.bool:
        raise PolicyError(f"StepView.{name} must be a bool tensor [B, L], got dtype {t.dtype}")
    if tuple(t.shape) != shape:
        raise PolicyError(f"StepView.{name} must have shape [B, L] = {shape} (from probs), got {tuple(t.shape)}")


DERIVED: set[str] = set()  # the names of StepView's derived properties (filled by _derived)


def _derived(fn: Callable[["StepView"], Tensor]) -> property:
    """A property computed on first use and kept in the view's ``_memo`` dict: what
    ``functools.cached_property`` does, minus its lock (Python 3.11), which stops
    ``torch.compile`` from tracing a decode step through the policy."""

    DERIVED.add(fn.__name__)

    @functools.wraps(fn)
    def get(self: "StepView") -> Tensor:
        if fn.__name__ not in self._memo:
            self._memo[fn.__name__] = fn(self)
        return self._memo[fn.__name__]

    return property(get)


@dataclass(eq=False)
class StepView:
    """The model's predictions at one decode step.

    probs       Float[B, L, V]  predictive distribution per position (rows outside
                                ``candidates`` are undefined: the decoder fills 1/V)
    candidates  Bool[B, L]      positions the policy may reveal now (subset of ``masked``)
    masked      Bool[B, L]      positions still masked
    step        int             0-based decode step
    given       Bool[B, L]|None positions given from the start (prompt, clues)
    hidden      Float[B, L, C]|None  the denoiser's final normalised hidden state at each
                                position's query (same forward as ``probs``; rows outside
                                ``candidates`` are zeros); the decoder fills it only for a
                                policy whose ``wants_hidden`` is True (UPO, DCoLT)
    tokens      Long[B, L]|None the current sequence (revealed and given tokens; the model's
                                [MASK] id at masked positions); the decoder fills it for a
                                policy whose ``wants_tokens`` is True (LoMDM's reverse
                                scheduler reads the noisy sequence)

    Derived on first use (:func:`_derived`, computed once per view): ``confidence`` (max prob),
    ``margin`` (top-1 minus top-2 prob), ``entropy`` (nats, 0·log 0 = 0), ``argmax``.
    ``derived``: some of them already computed by whoever builds the view, ``{name: [B, L]}``
    (the decoder reduces ``confidence`` and ``argmax`` over the predicted rows only); each
    must be what the property would compute from ``probs``.
    """

    probs: Tensor
    candidates: Tensor
    masked: Tensor
    step: int
    given: Tensor | None = None
    hidden: Tensor | None = None
    tokens: Tensor | None = None
    derived: dict[str, Tensor] | None = field(default=None, repr=False)
    _memo: dict[str, Tensor] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        p = self.probs
        if not isinstance(p, Tensor):
            raise PolicyError(f"StepView.probs must be a torch.Tensor, got {type(p).__name__}")
        if p.dim() != 3:
            raise PolicyError(f"StepView.probs must have shape [B, L, V], got shape {tuple(p.shape)}")
        if not p.dtype.is_floating_point:
            raise PolicyError(f"StepView.probs must be a float tensor, got dtype {p.dtype}")
        if p.shape[2] < 1:
            raise PolicyError(f"StepView.probs needs V >= 1 classes, got shape {tuple(p.shape)}")
        shape = (p.shape[0], p.shape[1])
        _check_mask("candidates", self.candidates, shape)
        _check_mask("masked", self.masked, shape)
        if self.given is not None:
            _check_mask("given", self.given, shape)
        if self.hidden is not None and (not isinstance(self.hidden, Tensor) or self.hidden.dim() != 3
                                        or tuple(self.hidden.shape[:2]) != shape):
            got = tuple(self.hidden.shape) if isinstance(self.hidden, Tensor) else type(self.hidden).__name__
            raise PolicyError(f"StepView.hidden must have shape [B, L, C] with [B, L] = {shape} (from probs), got {got}")
        if self.tokens is not None and (not isinstance(self.tokens, Tensor) or self.tokens.dtype.is_floating_point
                                        or tuple(self.tokens.shape) != shape):
            got = f"{self.tokens.dtype}{list(self.tokens.shape)}" if isinstance(self.tokens, Tensor) else type(self.tokens).__name__
            raise PolicyError(f"StepView.tokens must be integer token ids [B, L] = {shape} (from probs), got {got}")
        for name, t in (self.derived or {}).items():
            if name not in DERIVED:
                raise PolicyError(f"StepView.derived: {name!r} is not a derived field; choose from {sorted(DERIVED)}")
            if not isinstance(t, Tensor) or tuple(t.shape) != shape:
                got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise PolicyError(f"StepView.derived[{name!r}] must have shape [B, L] = {shape}, got {got}")
            self._memo[name] = t
        if isinstance(self.step, bool) or not isinstance(self.step, (int, torch.SymInt)) or self.step < 0:
            raise PolicyError(f"StepView.step must be an int >= 0, got {self.step!r}")
        stray = self.candidates & ~self.masked

        def where() -> str:
            b, i = (int(v) for v in stray.nonzero()[0])
            return f"position [{b}, {i}] is a candidate but not masked"

        require(~stray.any(), "StepView.candidates must be a subset of masked", where, PolicyError)

    @property
    def batch_size(self) -> int:
        return self.probs.shape[0]

    @property
    def length(self) -> int:
        return self.probs.shape[1]

    @_derived
    def confidence(self) -> Tensor:
        """Float[B, L]: max_v p(v)."""
        return self.probs.amax(dim=-1)

    @_derived
    def argmax(self) -> Tensor:
        """Long[B, L]: the most likely token (lowest id on ties)."""
        return self.probs.argmax(dim=-1)

    @_derived
    def margin(self) -> Tensor:
        """Float[B, L]: p(v1) − p(v2) (Kim et al. 2025); equals confidence when V = 1."""
        if self.probs.shape[-1] == 1:
            return self.confidence
        top = self.probs.topk(2, dim=-1).values  # [B, L, 2]
        return top[..., 0] - top[..., 1]

    @_derived
    def entropy(self) -> Tensor:
        """Float[B, L]: −Σ_v p log p in nats; xlogy makes p = 0 contribute 0."""
        return -torch.special.xlogy(self.probs, self.probs).sum(dim=-1)


@declare_kind("policy")
class Policy(abc.ABC):
    """Chooses the next set ``S_k`` of positions to reveal (registry kind "policy").

    One required method, ``select(view) -> Bool[B, L]``: a subset of ``view.candidates``
    with at least one position in every row that has candidates and none elsewhere.

    ``wants_hidden``: the decoder passes the denoiser's final hidden states in
    ``StepView.hidden`` (one forward either way) only to a policy that sets it;
    ``wants_tokens``: likewise the current sequence in ``StepView.tokens``.
    """

    wants_hidden: bool = False
    wants_tokens: bool = False

    def candidates(self, masked: Tensor, step: int) -> Tensor:
        """Bool[B, L]: positions to run queries for at ``step`` (default: all masked)."""
        return masked

    @abc.abstractmethod
    def select(self, view: StepView) -> Tensor:
        """Bool[B, L]: the positions to reveal at this step."""

    def reset(self) -> None:
        """Forget per-batch state (called by the decoder before a new batch)."""

    def log_prob(self, selected: Tensor, view: StepView) -> Tensor:
        """Float[B]: log π(selected | view). Only stochastic policies define it."""
        raise NotImplementedError(
            f"{type(self).__name__} is deterministic and has no log_prob; use a stochastic policy "
            "(random, plackett_luce, bernoulli) for RL or variational objectives"
        )
