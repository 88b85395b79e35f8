"""Learned polynomial schedules (GenMD4: Shi et al. 2024, "Simplified and Generalized Masked
Diffusion for Discrete Data", section 5; google-deepmind/md4 genmd4.py)::

    α(t) = 1 - (1 - ε) t^w,      w = softplus(ρ) > 0,  ρ trained
    α'(t) = -(1 - ε) w t^(w-1),  -α'/(1 - α) = w / t
    T = ((1 - u) / (1 - ε))^(1/w)   (inverse CDF; T > 1, never noised, with probability ε)

``w = 1``, ``ε = 0`` is the linear schedule; ``ε > 0`` keeps ``log α`` finite at ``t = 1``
(the release uses ``ε = 1e-4``).

- ``LearnedPositionSchedule(length)``: a power per position, a learned hyperschedule. It
  is a process like any other (``α_i(t)`` needs only ``t`` and the length) and composes
  (e.g. inside ``Blockwise``, where it sees block-local positions).
- ``LearnedTokenSchedule(vocab_size)``: a power per *token value*, as in the release:
  ``α_t(x_i) = 1 - (1-ε) t^{w_{x_i}}``. Its schedule, first-hitting times and orders
  depend on the clean tokens, so the methods whose signature has no ``x`` raise
  ``NotImplementedError``; ``given(x)`` is the schedule of the tokens ``x`` (a ``Powers``
  process with a power per row and position, which keeps the gradient to ``ρ``), and
  ``corrupt(x, ...)`` (which has ``x``) and ``alpha_values`` (``α`` for every value,
  ``[B, L, V]``) work directly. Composites that call ``alpha(t, length)`` cannot hold it.

Both are ``nn.Module``s: an objective that holds one (``objectives.genmd4``) trains ``ρ``.
Sampling (``first_hitting_times``, ``sample_ranks``) is detached; ``alpha``, ``dalpha``,
``alpha_values`` and ``log_prob`` carry the gradient.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from orderlab.processes.base import Process, as_times
from orderlab.processes.corruption import Absorbing, Corruption
from orderlab.registry import register

__all__ = ["PowerSchedule", "Powers", "LearnedPositionSchedule", "LearnedTokenSchedule", "inverse_softplus"]


def inverse_softplus(w: Tensor) -> Tensor:
    """``ρ`` with ``softplus(ρ) = w`` (``w > 0``): ``w + log(1 - e^{-w})``."""
    return w + torch.log(-torch.expm1(-w))


def _check_eps(eps: float) -> float:
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"eps must be in [0, 1), got {eps}")
    return float(eps)


class PowerSchedule(Process):
    """``α_i(t) = 1 - (1 - ε) t^{w_i}``; subclasses give ``powers(length) -> Float[B or 1, L]``."""

    eps: float = 0.0

    def powers(self, length: int) -> Tensor:
        raise NotImplementedError

    def _tw(self, t: Any, length: int) -> tuple[Tensor, Tensor]:
        """``(t, w)`` broadcastable to ``[B, L]``, both in ``t``'s float dtype (float64 in, float64 out)."""
        t = as_times(t)
        w = self.powers(length).to(t.dtype)
        return t.clamp_min(0.0), w

    def alpha(self, t: Any, length: int) -> Tensor:  # noqa: D102
        t, w = self._tw(t, length)
        return torch.broadcast_to(1.0 - (1.0 - self.eps) * t**w, torch.broadcast_shapes(t.shape, w.shape))

    def dalpha(self, t: Any, length: int) -> Tensor:  # noqa: D102
        # t^(w-1) at t = 0 is inf for w < 1: the true derivative there
        t, w = self._tw(t, length)
        return -(1.0 - self.eps) * w * t ** (w - 1.0)

    def weight(self, t: Any, length: int) -> Tensor:
        """``w_i / t`` exactly (the generic ``-α'/(1-α)`` loses digits to ``1 - α`` at small ``t``)."""
        t, w = self._tw(t, length)
        return torch.where(t > 0, w / t.clamp_min(torch.finfo(t.dtype).tiny), torch.zeros_like(w * t))

    def inverse_alpha(self, u: Tensor, length: int) -> Tensor:  # noqa: D102
        u = u.to(torch.float64)
        w = self.powers(length).detach().to(torch.float64)
        return ((1.0 - u) / (1.0 - self.eps)) ** (1.0 / w)  # [B, L]; > 1 where u < ε

    def order_grid(self, length: int, device: Any = None) -> Tensor:
        """Per-row powers: the uniform grid plus a geometric one towards ``t = 0``, where
        ``t^w`` is singular for ``w < 1`` (shared powers: the quantile grid of ``Process``)."""
        if self.powers(length).shape[0] == 1:
            return super().order_grid(length, device)
        uniform = torch.linspace(0.0, 1.0, self.grid + 1, dtype=torch.float64, device=device)
        geometric = torch.logspace(-12, 0, self.quantiles * 4, dtype=torch.float64, device=device)
        return torch.unique(torch.cat([uniform, geometric]))

    def cell_masses(self, edges: Tensor, length: int) -> Tensor:
        """Float64 ``[B or 1, L, M]`` from per-row powers (``alpha`` broadcasts rows against times)."""
        w = self.powers(length).to(torch.float64)[..., None]  # [B or 1, L, 1]
        a = 1.0 - (1.0 - self.eps) * edges.to(torch.float64).clamp_min(0.0) ** w  # [B or 1, L, M+1]
        m = a[..., :-1] - a[..., 1:]
        m = torch.cat([m[..., :-1], m[..., -1:] + a[..., -1:]], -1)  # the last cell holds T > 1
        return m.clamp_min(0.0)


class Powers(PowerSchedule):
    """Fixed powers ``w`` Float ``[B or 1, L]`` (a tensor; it may carry a gradient): e.g. the
    schedule ``LearnedTokenSchedule.given(x)`` of one batch. Not registered (no YAML form)."""

    def __init__(self, power: Tensor, eps: float = 0.0, corruption: Corruption = Absorbing()):
        super().__init__(corruption)
        if power.dim() != 2 or not bool((power > 0).all()):
            raise ValueError(f"power must be a positive Float[B or 1, L], got shape {tuple(power.shape)}")
        self.power, self.eps = power, _check_eps(eps)

    def powers(self, length: int) -> Tensor:  # noqa: D102
        if self.power.shape[1] != length:
            raise ValueError(f"Powers holds {self.power.shape[1]} positions, asked for length {length}")
        return self.power

    def _args(self):
        return {"shape": tuple(self.power.shape), "eps": self.eps}  # the powers themselves are data


def _initial(power_init: float | list[float], n: int, what: str) -> Tensor:
    w = torch.as_tensor(power_init, dtype=torch.get_default_dtype())
    if w.dim() == 0:
        w = w.expand(n)
    if w.shape != (n,) or not bool((w > 0).all()):
        raise ValueError(f"power_init must be > 0: one number or a list of {n} ({what}), got {power_init}")
    return inverse_softplus(w.clone())


@register("process", "learned_position")
class LearnedPositionSchedule(PowerSchedule, nn.Module):
    """A learned hyperschedule: ``α_i(t) = 1 - (1-ε) t^{w_i}``, ``w = softplus(ρ)``, one ``ρ_i``
    per position ``i < max_len`` (sequences up to ``max_len``, the model's, from the build's
    context; shorter ones use the first powers).
    ``power_init``: the initial ``w`` (one number, or one per position)."""

    needs = ("max_len",)

    def __init__(
        self,
        max_len: int,
        power_init: float | list[float] = 1.0,
        eps: float = 1e-4,
        corruption: Corruption = Absorbing(),
    ):
        nn.Module.__init__(self)
        PowerSchedule.__init__(self, corruption)
        if int(max_len) < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        self.length, self.eps = int(max_len), _check_eps(eps)
        self.rho = nn.Parameter(_initial(power_init, self.length, "positions"))

    def powers(self, length: int) -> Tensor:  # noqa: D102
        if length > self.length:
            raise ValueError(f"{type(self).__name__} has powers for {self.length} positions, got length {length}")
        return F.softplus(self.rho[:length])[None]  # [1, L]

    def _args(self):
        return {"max_len": self.length, "eps": self.eps}


class TokenDependent:
    """Mixin of a process whose schedule depends on the clean tokens (a power per token value,
    or a scheduler net reading ``x``): ``given(x)`` is its schedule for tokens ``x`` and
    ``corrupt`` goes through it; every token-free question (``alpha``, the order, its
    probability) is an error naming that way out. ``depends_on`` says on what."""

    depends_on = "the clean tokens"

    def given(self, x: Tensor) -> Process:
        raise NotImplementedError

    def corrupt(self, x, t, mask_id, vocab_size, ranks=None, generator=None):  # noqa: D102
        return self.given(x).corrupt(x, t, mask_id, vocab_size, ranks=ranks, generator=generator)

    def _needs_tokens(self, what: str) -> NotImplementedError:
        return NotImplementedError(f"{self!r}: {what} depends on {self.depends_on}; use given(x) for the schedule "
                                   "of tokens x, e.g. process.given(x).log_prob(ranks)")

    def alpha(self, t, length):  # noqa: D102
        raise self._needs_tokens("alpha")

    def dalpha(self, t, length):  # noqa: D102
        raise self._needs_tokens("dalpha")

    def weight(self, t, length):  # noqa: D102
        raise self._needs_tokens("the NELBO weight")

    def inverse_alpha(self, u, length):  # noqa: D102
        raise self._needs_tokens("the first-hitting time")

    def first_hitting_times(self, batch, length, generator=None, device=None, dtype=None):  # noqa: D102
        raise self._needs_tokens("the first-hitting time")

    def sample_ranks(self, ranks, generator=None, steps=None):  # noqa: D102
        raise self._needs_tokens("the order")

    def log_prob(self, ranks, steps=None):  # noqa: D102
        raise self._needs_tokens("the order probability")


@register("process", "learned_token")
class LearnedTokenSchedule(TokenDependent, Process, nn.Module):
    """GenMD4's schedule: ``α_t(v) = 1 - (1-ε) t^{w_v}`` with a learned power per token value
    ``v < vocab_size`` (``w = softplus(ρ)``). Everything that needs the clean tokens gets
    them: ``given(x)``, ``corrupt(x, ...)``; ``alpha_values`` gives ``α`` for every value."""

    needs = ("vocab_size",)
    depends_on = "the clean token values (a power per token)"

    def __init__(
        self,
        vocab_size: int,
        power_init: float | list[float] = 1.0,
        eps: float = 1e-4,
        corruption: Corruption = Absorbing(),
    ):
        nn.Module.__init__(self)
        Process.__init__(self, corruption)
        if int(vocab_size) < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        self.vocab_size, self.eps = int(vocab_size), _check_eps(eps)
        self.rho = nn.Parameter(_initial(power_init, self.vocab_size, "token values"))

    def powers(self) -> Tensor:
        """Float ``[V]``: the power of each token value."""
        return F.softplus(self.rho)

    def given(self, x: Tensor) -> Powers:
        """The schedule of the tokens ``x`` Long ``[B, L]``: powers ``w[x]`` per row and position."""
        if x.dtype.is_floating_point or x.dim() != 2:
            raise ValueError(f"x must be Long[B, L] tokens, got {x.dtype} of shape {tuple(x.shape)}")
        bad = (x < 0) | (x >= self.vocab_size)
        if bad.any():
            b, i = (int(v) for v in bad.nonzero()[0])
            raise ValueError(f"x[{b}, {i}] = {int(x[b, i])} is not a token of {self!r} (vocab_size={self.vocab_size})")
        return Powers(self.powers()[x], self.eps, self.corruption)

    def alpha_values(self, t: Any, length: int) -> Tensor:
        """Float ``[B, L, V]``: ``α_t(v)`` of every token value ``v`` at every position."""
        t = as_times(t).clamp_min(0.0)  # [B or 1, L or 1]
        w = self.powers().to(t.dtype)  # [V]
        a = 1.0 - (1.0 - self.eps) * t[..., None] ** w  # [B, L or 1, V]
        return a.expand(a.shape[0], length, -1)

    def dalpha_values(self, t: Any, length: int) -> Tensor:  # noqa: D102
        t = as_times(t).clamp_min(0.0)
        w = self.powers().to(t.dtype)
        da = -(1.0 - self.eps) * w * t[..., None] ** (w - 1.0)
        return da.expand(da.shape[0], length, -1)

    def _args(self):
        return {"vocab_size": self.vocab_size, "eps": self.eps}
