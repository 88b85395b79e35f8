"""Corruption kinds: what token a noised position holds in ``x_t``.

A process decides *which* positions are noised at time ``t`` (``T_i <= t``); a corruption
decides *what they become*. The two compose: every process takes a ``corruption``
argument (a built ``Corruption``; in YAML a registered name or a ``{name: ..., ...}`` mapping).

- ``Absorbing``: the [MASK] token (MDLM, MD4): ``Q = Q_absorb``.
- ``Uniform``: a uniformly random token of the vocabulary ``[0, vocab_size)`` (it may
  equal the clean token, as in uniform-state diffusion): ``Q = Q_uniform``.
- ``Hybrid(gamma)``: γ-hybrid noise after Fathi, Scholak, Noël 2025 (hdlm), γ = 0.01 by
  default: each noised position independently becomes a uniform token with probability
  γ, else [MASK], i.e. ``π = (1 - γ) δ_MASK + γ Uniform``. This mixes the *marginal's*
  ``π``; hdlm mixes the *rates*, ``Q_γ = (1 - γ) Q_absorb + γ Q_uniform``, whose marginal
  has a time-dependent ``π_t`` (``γ`` uniform at small noise, almost all [MASK] later:
  a uniform move can happen before absorption, never after). Same at small ``t``.

Every kind is an *interpolating* corruption: a noised position holds a token drawn from a
fixed ``π`` = [MASK] with probability ``mask_prob``, else uniform over the vocabulary, so
``q(x_t^i | x_0^i) = α_i(t) onehot(x_0^i) + (1 − α_i(t)) π`` (``mask_prob``: 1 absorbing,
0 uniform, 1 − γ hybrid). ``objectives.MDMNelbo`` reads ``mask_prob`` for its ELBO.

Corruptions are registered under kind "corruption" (a kind declared here, by its base
class, so ``build("corruption", "hybrid", gamma=0.05)`` works).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from orderlab.registry import declare_kind, register

__all__ = ["Corruption", "Absorbing", "Uniform", "Hybrid", "as_corruption"]

@declare_kind("corruption")
class Corruption:
    """Base class of kind "corruption": ``__call__(x, noised, mask_id, vocab_size, generator)``.

    ``mask_prob``: ``π([MASK])``, the probability that a noised position holds [MASK]
    (the rest is uniform over ``[0, vocab_size)``); ``None`` for a corruption not of that form.
    """

    mask_prob: float | None = None

    def __call__(
        self, x: Tensor, noised: Tensor, mask_id: int, vocab_size: int, generator: torch.Generator | None = None
    ) -> Tensor:
        """Long ``[B, L]``: ``x`` with every ``noised`` position (Bool ``[B, L]``) replaced."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted(vars(self).items()))))


def _uniform_tokens(x: Tensor, vocab_size: int, generator: torch.Generator | None) -> Tensor:
    # [B, L] uniform in [0, vocab_size); drawn on the generator's device, then moved
    dev = generator.device if generator is not None else x.device
    return torch.randint(0, vocab_size, x.shape, generator=generator, device=dev).to(x.device, x.dtype)


@register("corruption", "absorbing")
class Absorbing(Corruption):
    """Noised positions become ``mask_id`` (absorbing-state / masked diffusion)."""

    mask_prob = 1.0

    def __call__(self, x, noised, mask_id, vocab_size, generator=None):  # noqa: D102
        return torch.where(noised, torch.full_like(x, mask_id), x)


@register("corruption", "uniform")
class Uniform(Corruption):
    """Noised positions become a uniform random token in ``[0, vocab_size)`` (never the mask)."""

    mask_prob = 0.0

    def __call__(self, x, noised, mask_id, vocab_size, generator=None):  # noqa: D102
        return torch.where(noised, _uniform_tokens(x, vocab_size, generator), x)


@register("corruption", "hybrid")
class Hybrid(Corruption):
    """γ-hybrid noise (Fathi et al. 2025): uniform token with probability ``gamma``, else [MASK]."""

    def __init__(self, gamma: float = 0.01):
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {gamma}")
        self.gamma = float(gamma)

    @property
    def mask_prob(self) -> float:  # noqa: D102
        return 1.0 - self.gamma

    def __call__(self, x, noised, mask_id, vocab_size, generator=None):  # noqa: D102
        dev = generator.device if generator is not None else x.device
        use_uniform = (torch.rand(x.shape, generator=generator, device=dev) < self.gamma).to(x.device)  # [B, L]
        repl = torch.where(use_uniform, _uniform_tokens(x, vocab_size, generator), torch.full_like(x, mask_id))
        return torch.where(noised, repl, x)

    def __repr__(self) -> str:
        return f"Hybrid(gamma={self.gamma:g})"


def as_corruption(obj: Any) -> Corruption:
    """``obj`` checked to be a built :class:`Corruption` (the builder turns YAML names into one)."""
    if not isinstance(obj, Corruption):
        raise TypeError(f"corruption must be a Corruption (e.g. Uniform()), got {type(obj).__name__} {obj!r}")
    return obj
