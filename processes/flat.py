"""Flat schedules: every position has the same ``α(t)`` (MDM: MDLM, MD4).

With a flat schedule the first-hitting times are i.i.d., so the reveal order is a uniformly
random permutation whatever ``α`` is; ``α`` only sets *when* (and so, with ``steps``, how
many tokens per step). Each schedule gives ``α``, ``α'`` and the closed-form inverse
``T = α^{-1}(u)`` used for exact first-hitting times.

=============  ==============================  ================================
name           ``α(t)``                        ``T = α^{-1}(u)``
=============  ==============================  ================================
linear         ``1 - t``                       ``1 - u``
cosine         ``cos(π t / 2)``                ``(2/π) arccos(u)``
loglinear      ``1 - (1 - ε) t``               ``(1 - u) / (1 - ε)``
polynomial     ``1 - t^p``                     ``(1 - u)^{1/p}``
=============  ==============================  ================================

Log-linear is MDLM's (Sahoo et al. 2024, sec. 3.5): total noise
``σ(t) = -log(1 - (1 - ε) t)``, ``α = exp(-σ(t))``; ``α(1) = ε`` so a position stays clean
with probability ε (its ``T > 1``). Polynomial is MD4's (Shi et al. 2024, table 1).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from orderlab import ranks as R
from orderlab.processes.base import Process, as_times, rows, singletons
from orderlab.processes.corruption import Absorbing, Corruption
from orderlab.registry import register

__all__ = ["Flat", "Linear", "Cosine", "LogLinear", "Polynomial"]


class Flat(Process):
    """A schedule shared by all positions: subclasses give ``f(t)``, ``f'(t)``, ``f^{-1}(u)``."""

    def f(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def df(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def f_inv(self, u: Tensor) -> Tensor:
        raise NotImplementedError

    def alpha(self, t: Any, length: int) -> Tensor:  # noqa: D102
        return rows(self.f(as_times(t)), length)  # [B, 1] or [B, L] -> [B, L]

    def dalpha(self, t: Any, length: int) -> Tensor:  # noqa: D102
        return rows(self.df(as_times(t)), length)

    def inverse_alpha(self, u: Tensor, length: int) -> Tensor:  # noqa: D102
        return self.f_inv(u)

    def log_prob(self, ranks: Tensor, steps: int | None = None) -> Tensor:
        """Singletons: ``-log K!`` (i.i.d. ``T``: every order of the ``K`` generated positions
        equally likely, whatever ``α``); with ``steps``: the exact binned chain (``Process``)."""
        if steps is not None:
            return super().log_prob(ranks, steps)
        R.validate(ranks)
        k = (ranks > 0).sum(1).to(torch.float64)
        out = -torch.lgamma(k + 1.0)
        return torch.where(singletons(ranks), out, torch.full_like(out, -math.inf))


@register("process", "linear")
class Linear(Flat):
    """``α(t) = 1 - t``."""

    def f(self, t):  # noqa: D102
        return 1.0 - t

    def df(self, t):  # noqa: D102
        return torch.full_like(t, -1.0)

    def f_inv(self, u):  # noqa: D102
        return 1.0 - u


@register("process", "cosine")
class Cosine(Flat):
    """``α(t) = cos(π t / 2)`` (clamped at 0 against rounding at ``t = 1``)."""

    def f(self, t):  # noqa: D102
        return torch.cos(0.5 * math.pi * t).clamp_min(0.0)

    def df(self, t):  # noqa: D102
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)

    def f_inv(self, u):  # noqa: D102
        return torch.arccos(u) * (2.0 / math.pi)


@register("process", "loglinear")
class LogLinear(Flat):
    """MDLM's log-linear noise: ``σ(t) = -log(1 - (1-ε) t)``, ``α(t) = e^{-σ(t)} = 1 - (1-ε) t``."""

    def __init__(self, eps: float = 1e-3, corruption: Corruption = Absorbing()):
        super().__init__(corruption)
        if not 0.0 <= eps < 1.0:
            raise ValueError(f"eps must be in [0, 1), got {eps}")
        self.eps = float(eps)

    def f(self, t):  # noqa: D102
        return 1.0 - (1.0 - self.eps) * t

    def df(self, t):  # noqa: D102
        return torch.full_like(t, -(1.0 - self.eps))

    def f_inv(self, u):  # noqa: D102
        return (1.0 - u) / (1.0 - self.eps)  # > 1 with probability ε: never noised on [0, 1]

    def _args(self):
        return {"eps": self.eps}


@register("process", "polynomial")
class Polynomial(Flat):
    """``α(t) = 1 - t^p`` (``power`` = p > 0; p = 1 is linear)."""

    def __init__(self, power: float = 2.0, corruption: Corruption = Absorbing()):
        super().__init__(corruption)
        if not power > 0:
            raise ValueError(f"power must be > 0, got {power}")
        self.power = float(power)

    def f(self, t):  # noqa: D102
        return 1.0 - t.clamp_min(0.0) ** self.power

    def df(self, t):  # noqa: D102
        # t^(p-1) at t = 0 is inf for p < 1: the true derivative there
        return -self.power * t.clamp_min(0.0) ** (self.power - 1.0)

    def f_inv(self, u):  # noqa: D102
        return (1.0 - u) ** (1.0 / self.power)

    def _args(self):
        return {"power": self.power}
