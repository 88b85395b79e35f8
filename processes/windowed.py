"""Windowed hyperschedules: each position is noised inside its own time window, and the
windows move right to left in time (so the reveal order is near left-to-right).

One geometry serves three processes (Arriola & Kuleshov 2026, SetDLM; Fathi et al. 2025)::

    loc_i = (1 - b)(1 - i/(L-1))           # window of position i: [loc_i, loc_i + b]
    x_i   = (t - loc_i) / b
    α_i(t) = (1 - clip(x_i, 0, 1))^k       # so 1 - α_i = 1 - (1 - clip(x_i))^k
    α_i'(t) = -(k/b) (1 - x_i)^(k-1)       # for 0 < x_i < 1, else 0
    T_i = loc_i + b (1 - U^{1/k})          # U ~ Uniform[0, 1)

(``L = 1``: ``loc_0 = 0``.) The inverse CDF is exact: ``T_i <= t  iff  U >= (1 - x_i)^k``,
probability ``1 - α_i(t)``. It is SetDLM's ``T_i = loc_i + b(1 - e^{-E_i/k})``,
``E ~ Exp(1)``, with ``U = e^{-E}``: the paper's α, α' and T are mutually consistent.

With ``b = m / (L + m - 1)`` for a window of ``m`` positions, ``loc_i = (L-1-i)/(L+m-1)``:
neighbouring windows are shifted by ``1/(L+m-1) = b/m``, so about ``m`` positions are
partially noised at any time.

- ``staggered(d, window)`` (SetDLM): ``m = window or 2d``, ``b = m/(L+m-1)``, area
  ``a = d/(2L)``, ``k = a/(b - a)`` (k ≈ 1/3 at L = 128, d = 4);
- ``sliding_window(window)`` (hdlm "diagonal" annealing): ``m = window``, ``k = 1``:
  ``α_i`` is a linear ramp from 1 to 0 over position ``i``'s window;
- ``quench`` (AR): ``sliding_window(1)``: ``b = 1/L``, position ``i`` is noised at a
  uniform time in ``((L-1-i)/L, (L-i)/L]``; the windows do not overlap, so the reveal
  order is exactly ``1..L`` left to right.

Times are computed in float64 and rounded once (monotone), so rounding never inverts
the order of two windows; a tie at a shared window edge is broken left-first by
``sample_ranks``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from orderlab import ranks as R
from orderlab.processes.base import Process, as_times, positions
from orderlab.processes.corruption import Absorbing, Corruption
from orderlab.registry import register

__all__ = ["Windowed", "Staggered", "SlidingWindow", "Quench"]


class Windowed(Process):
    """``α_i(t) = (1 - clip((t - loc_i)/b, 0, 1))^k``; subclasses give ``params(length) -> (b, k)``."""

    def params(self, length: int) -> tuple[float, float]:
        """``(b, k)``: window width in time and ramp exponent for sequences of ``length``."""
        raise NotImplementedError

    def loc(self, length: int, like: Tensor) -> Tensor:
        """Float ``[1, L]``: window starts ``loc_i = (1 - b)(1 - i/(L-1))``."""
        b, _ = self.params(length)
        return (self.end(length, like.to(torch.float64)) - b).to(like.dtype)

    def end(self, length: int, like: Tensor) -> Tensor:
        """Float ``[1, L]``: window ends ``loc_i + b = 1 - (1-b) i/(L-1)`` (exactly 1 at ``i = 0``)."""
        b, _ = self.params(length)
        i = positions(length, like)  # [1, L]
        frac = i / (length - 1) if length > 1 else torch.zeros_like(i)
        return 1.0 - (1.0 - b) * frac

    def _left(self, t: Any, length: int) -> tuple[Tensor, float, float]:
        """``(1 - x_i) = (loc_i + b - t) / b`` in float64, ``b``, ``k``.

        The window end is computed directly (not as ``loc_i + b``) so that it is exactly 1
        at ``i = 0``: with ``k < 1``, ``(1 - x)^k`` would turn a rounding error of 1e-8 in
        ``1 - x`` into an ``α(1)`` of 1e-3.
        """
        t = as_times(t).to(torch.float64)
        b, k = self.params(length)
        return (self.end(length, t) - t) / b, b, k  # [B, L]

    def alpha(self, t: Any, length: int) -> Tensor:  # noqa: D102
        y, _, k = self._left(t, length)
        return (y.clamp(0.0, 1.0) ** k).to(_dtype(t))

    def dalpha(self, t: Any, length: int) -> Tensor:  # noqa: D102
        y, b, k = self._left(t, length)
        inside = (y > 0) & (y < 1)
        ys = torch.where(inside, y, torch.ones_like(y))  # keep 0^(k-1) = inf out of the graph
        return torch.where(inside, -(k / b) * ys ** (k - 1.0), torch.zeros_like(y)).to(_dtype(t))

    def inverse_alpha(self, u: Tensor, length: int) -> Tensor:  # noqa: D102
        # T = loc + b (1 - u^{1/k}) = (loc + b) - b u^{1/k}; the end form is exact at i = 0
        u = u.to(torch.float64)
        b, k = self.params(length)
        return self.end(length, u) - b * u ** (1.0 / k)  # [B, L]


def _dtype(t: Any) -> torch.dtype:
    """The float dtype results are returned in: ``t``'s if a float tensor, else the default."""
    return t.dtype if isinstance(t, Tensor) and t.is_floating_point() else torch.get_default_dtype()


@register("process", "staggered")
class Staggered(Windowed):
    """SetDLM's staggered hyperschedule (Arriola & Kuleshov 2026).

    ``d``: desired set size; ``window``: ``m`` (default ``2d``); ``length``: optional, only
    to expose ``.b`` and ``.k`` for that length (every method takes its own length).
    ``b = m/(L+m-1)``, ``a = d/(2L)``, ``k = a/(b - a)``; needs ``b > a``.
    """

    def __init__(
        self,
        d: float = 4,
        window: float | None = None,
        length: int | None = None,
        corruption: Corruption = Absorbing(),
    ):
        super().__init__(corruption)
        if not d > 0:
            raise ValueError(f"d must be > 0, got {d}")
        if window is not None and not window > 0:
            raise ValueError(f"window must be > 0, got {window}")
        self.d, self.window, self.length = d, window, length
        self.b, self.k = self.params(length) if length is not None else (None, None)

    def params(self, length: int) -> tuple[float, float]:  # noqa: D102
        m = self.window if self.window is not None else 2 * self.d
        b = m / (length + m - 1)
        area = self.d / (2 * length)
        if not b > area:
            raise ValueError(
                f"staggered schedule needs b > d/(2L): L={length}, d={self.d}, m={m} give "
                f"b={b:.4g} <= {area:.4g}; use a smaller d or a larger window"
            )
        return b, area / (b - area)

    def _args(self):
        args: dict[str, Any] = {"d": self.d}
        if self.window is not None:
            args["window"] = self.window
        if self.length is not None:
            args["length"] = self.length
        return args


@register("process", "sliding_window")
class SlidingWindow(Windowed):
    """hdlm "diagonal" annealing: a linear ramp over a window of ``window`` positions (k = 1)."""

    def __init__(self, window: float, corruption: Corruption = Absorbing()):
        super().__init__(corruption)
        if not window > 0:
            raise ValueError(f"window must be > 0, got {window}")
        self.window = window

    def params(self, length: int) -> tuple[float, float]:  # noqa: D102
        return self.window / (length + self.window - 1), 1.0

    def _args(self):
        return {"window": self.window}


@register("process", "quench")
class Quench(SlidingWindow):
    """Autoregression as a hyperschedule: ``sliding_window(1)``, ranks ``1..L`` left to right."""

    def __init__(self, corruption: Corruption = Absorbing()):
        super().__init__(1, corruption)

    def inverse_alpha(self, u: Tensor, length: int) -> Tensor:  # noqa: D102
        # the same T_i = (L-1-i)/L + (1-u)/L, summed as integer + fraction so that rounding
        # is monotone across windows: T_i >= T_{i+1} always (ties only at shared edges)
        i = positions(length, u.to(torch.float64))  # [1, L]
        return ((length - 1 - i) + (1.0 - u.to(torch.float64))) / length

    def log_prob(self, ranks: Tensor, steps: int | None = None) -> Tensor:
        """Singletons: 0 for left to right over the generated positions, else ``-inf``
        (the windows do not overlap); with ``steps``: the exact binned chain (``Process``)."""
        if steps is not None:
            return super().log_prob(ranks, steps)
        R.validate(ranks)
        gen = ranks > 0
        l2r = torch.where(gen, gen.long().cumsum(1), ranks)  # ranks 1..K left to right
        ok = (ranks == l2r).all(1)
        return torch.where(ok, 0.0, -math.inf).to(torch.float64)

    def _args(self):
        return {}
