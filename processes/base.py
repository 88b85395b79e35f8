"""The process contract: a masking schedule per position (a *hyperschedule*).

Fathi, Scholak, Noël 2025 ("Unifying Autoregressive and Diffusion-Based Sequence
Generation"): position ``i`` of a length-``L`` sequence has its own schedule
``α_i(t) = P(x_i still clean at time t)``, ``t ∈ [0, 1]``, non-increasing, ``α_i(0) = 1``,
``α_i(1) = 0``. Everything else follows from it (DESIGN.md section 3):

- the first-hitting time ``T_i`` (when position ``i`` gets noised) has CDF
  ``P(T_i <= t) = 1 - α_i(t)``; it is sampled exactly by the inverse CDF
  ``T_i = α_i^{-1}(U_i)``, ``U_i ~ Uniform[0, 1)``, since ``T_i <= t  iff  U_i >= α_i(t)``;
- the reveal order: the reverse process runs from ``t = 1`` down to ``0``, so the position
  with the largest ``T`` is revealed first (rank 1);
- ``x_t``: position ``i`` is noised iff ``T_i <= t`` (probability ``1 - α_i(t)``); the
  corruption (``processes.corruption``) chooses the token it then holds;
- the continuous-time NELBO weight of a noised position, ``-α_i'(t) / (1 - α_i(t))``
  (MDLM, Sahoo et al. 2024, eq. 10; MD4, Shi et al. 2024).

Positions are independent given the process (except in ``Mixture``, which draws one
component per sequence). A subclass implements ``alpha`` and ``dalpha``; it overrides
``inverse_alpha`` where the inverse is closed-form (the generic one bisects).

Times: ``t`` may be a Python number, a ``Float[B]`` (one time per row) or a
``Float[B, L]`` / ``Float[B, 1]`` (a time per position, which composites use).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from orderlab import ranks as R
from orderlab.processes.corruption import Absorbing, Corruption, as_corruption

__all__ = ["Process", "as_times", "positions", "rows", "uniforms"]


def as_times(t: Any, device: torch.device | None = None) -> Tensor:
    """``t`` as a 2-D float tensor ``[B or 1, L or 1]`` that broadcasts against ``[B, L]``."""
    t = torch.as_tensor(t, device=device)
    if not t.is_floating_point():
        t = t.to(torch.get_default_dtype())
    if t.dim() == 0:
        return t.reshape(1, 1)
    if t.dim() == 1:
        return t[:, None]  # [B] -> [B, 1]
    if t.dim() == 2:
        return t
    raise ValueError(f"t must be a number, Float[B] or Float[B, L], got shape {tuple(t.shape)}")


def positions(length: int, like: Tensor) -> Tensor:
    """Float ``[1, L]``: the positions ``0..L-1`` in the dtype and device of ``like``."""
    return torch.arange(length, dtype=like.dtype, device=like.device)[None, :]


def uniforms(batch: int, length: int, generator: torch.Generator | None, device: Any) -> Tensor:
    """Float64 ``[B, L]`` in ``[0, 1)`` on ``device`` (drawn on the generator's device)."""
    dev = generator.device if generator is not None else (device or "cpu")
    u = torch.rand(batch, length, generator=generator, device=dev, dtype=torch.float64)
    return u.to(device) if device is not None else u


def rows(a: Tensor, length: int) -> Tensor:
    """Broadcast ``[B, 1]`` or ``[B, L]`` to ``[B, L]``, with its own memory (callers may write)."""
    return torch.broadcast_to(a, (a.shape[0], length)).contiguous()


class Process:
    """Base class of kind "process": per-position masking schedules ``α_i(t)``.

    Required: ``alpha(t, length)`` and ``dalpha(t, length)``, both ``-> Float[B, L]``.
    ``corruption`` (default ``"absorbing"``) chooses the token of a noised position.
    """

    def __init__(self, corruption: Corruption | str = "absorbing"):
        self.corruption = as_corruption(corruption)

    # ---- the schedule ----------------------------------------------------------------

    def alpha(self, t: Any, length: int) -> Tensor:
        """Float ``[B, L]``: ``α_i(t)``, the probability that position ``i`` is clean at ``t``."""
        raise NotImplementedError

    def dalpha(self, t: Any, length: int) -> Tensor:
        """Float ``[B, L]``: ``dα_i/dt`` (0 where ``α_i`` is flat; jumps are not included)."""
        raise NotImplementedError

    def weight(self, t: Any, length: int) -> Tensor:
        """Float ``[B, L]``: the NELBO weight ``-α_i'(t) / (1 - α_i(t))`` (0 where ``α_i = 1``)."""
        a, da = self.alpha(t, length), self.dalpha(t, length)
        den = 1.0 - a
        return torch.where(den > 0, -da / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(den))

    def inverse_alpha(self, u: Tensor, length: int) -> Tensor:
        """Float ``[B, L]``: ``T = inf{t ∈ [0, 1]: α_i(t) <= u}`` (``+inf`` if ``α_i(1) > u``).

        Generic: 60 steps of bisection on ``alpha`` with a time per position (exact to
        float64 resolution for a non-increasing ``α``). Subclasses with a closed-form
        inverse override it.
        """
        u = u.to(torch.float64)
        lo, hi = torch.zeros_like(u), torch.ones_like(u)  # [B, L]; invariant: α(lo) > u >= α(hi) or hi = 1
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            below = self.alpha(mid, length).to(torch.float64) <= u
            hi, lo = torch.where(below, mid, hi), torch.where(below, lo, mid)
        never = self.alpha(torch.ones_like(u), length).to(torch.float64) > u
        return torch.where(never, torch.full_like(hi, float("inf")), hi)

    # ---- sampling --------------------------------------------------------------------

    def first_hitting_times(
        self,
        batch: int,
        length: int,
        generator: torch.Generator | None = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """Float ``[B, L]``: ``T_i``, exact inverse-CDF samples, ``P(T_i <= t) = 1 - α_i(t)``.

        Computed in float64 and returned in ``dtype`` (default: torch's default dtype).
        ``sample_ranks`` and ``corrupt`` use float64, where ties between positions have
        probability ~``L^2 2^-53`` instead of ~``L^2 2^-24`` (3% of rows at L = 1024).
        """
        u = uniforms(batch, length, generator, device)  # [B, L] float64
        return self.inverse_alpha(u, length).to(dtype or torch.get_default_dtype())

    def sample_ranks(self, ranks: Tensor, generator: torch.Generator | None = None, steps: int | None = None) -> Tensor:
        """Long ``[B, L]``: an order sampled from the process.

        Ranks 0 (given) and -1 (padding) are kept; the positions with rank >= 1 get ranks
        ``1..K`` in reveal order (rank 1 = largest ``T``; equal ``T`` -> the left position
        first). With ``steps``, time is cut into ``steps`` equal bins and reverse step ``n``
        (``t: 1-(n-1)/steps -> 1-n/steps``) reveals every position with
        ``T ∈ (1-n/steps, 1-(n-1)/steps]`` as one set; empty steps are skipped, so the
        output is dense ``1..K`` with ``K <= steps``.
        """
        R.validate(ranks)
        B, L = ranks.shape
        T = self.first_hitting_times(B, L, generator=generator, device=ranks.device, dtype=torch.float64)  # [B, L]
        todo = ranks > 0
        if steps is not None:
            if int(steps) < 1:
                raise ValueError(f"steps must be >= 1, got {steps}")
            # T > 1 (never hit, e.g. log-linear) or inf belongs to the first step
            raw = (steps + 1 - torch.ceil(T * steps).clamp(1, steps)).long()  # [B, L] in 1..steps
        else:
            key = torch.where(todo, -T, torch.full_like(T, float("inf")))  # ascending = T descending
            order = key.sort(dim=1, stable=True).indices  # [B, L]; stable: ties left first
            raw = torch.empty_like(ranks)
            raw.scatter_(1, order, torch.arange(1, L + 1, device=ranks.device).expand(B, L).to(ranks.dtype))
        return R.dense(torch.where(todo, raw.to(ranks.dtype), ranks))

    def corrupt(
        self,
        x: Tensor,
        t: Any,
        mask_id: int,
        vocab_size: int,
        ranks: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``(x_t Long[B, L], noised Bool[B, L])``: position ``i`` is noised iff ``T_i <= t``.

        Given (rank 0) and padding (rank -1) positions are never noised when ``ranks`` is
        passed. The corruption chooses the token of each noised position.
        """
        noised = self._noised(x, t, ranks, generator)
        return self.corruption(x, noised, mask_id, vocab_size, generator), noised

    def _noised(self, x: Tensor, t: Any, ranks: Tensor | None, generator: torch.Generator | None) -> Tensor:
        B, L = x.shape
        T = self.first_hitting_times(B, L, generator=generator, device=x.device, dtype=torch.float64)  # [B, L]
        noised = T <= as_times(t, device=x.device)  # [B, L]
        if ranks is not None:
            noised &= ranks.to(x.device) > 0
        return noised

    # ---- display ---------------------------------------------------------------------

    def _args(self) -> dict[str, Any]:
        """Constructor arguments shown by ``repr`` (subclasses add theirs)."""
        return {}

    def __repr__(self) -> str:
        args = dict(self._args())
        if self.corruption is not None and self.corruption != Absorbing() and "corruption" not in args:
            args["corruption"] = self.corruption
        inner = ", ".join(f"{k}={v!r}" for k, v in args.items())
        return f"{type(self).__name__}({inner})"
