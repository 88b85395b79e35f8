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

Order probabilities (``log_prob``): since the ``T_i`` are independent, the probability of
an order is a chain integral, ``P(T_σ1 > T_σ2 > … > T_σK)``, which ``chain_log_prob``
computes by dynamic programming over time cells (exact for the binned orders of
``sample_ranks(steps=...)``; a quadrature with a rigorous bracket for singleton orders).
Flat, quench, blockwise and mixture processes override it with closed forms.

Times: ``t`` may be a Python number, a ``Float[B]`` (one time per row) or a
``Float[B, L]`` / ``Float[B, 1]`` (a time per position, which composites use).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from orderlab import ranks as R
from orderlab.processes.corruption import Absorbing, Corruption, as_corruption
from orderlab.registry import declare_kind

__all__ = ["Process", "as_times", "positions", "rows", "uniforms", "chain_log_prob", "singletons"]


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


@declare_kind("process")
class Process:
    """Base class of kind "process": per-position masking schedules ``α_i(t)``.

    Required: ``alpha(t, length)`` and ``dalpha(t, length)``, both ``-> Float[B, L]``.
    ``corruption`` (default :class:`Absorbing`) chooses the token of a noised position.
    """

    def __init__(self, corruption: Corruption = Absorbing()):
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

    def alpha_values(self, t: Any, length: int) -> Tensor:
        """Float ``[B, L, 1]``: ``α`` per value of the clean token; the last axis is 1 where
        the schedule does not depend on the value (every process here but GenMD4's
        per-token schedule, ``processes.learned``, which returns ``[B, L, V]``)."""
        return self.alpha(t, length)[..., None]

    def dalpha_values(self, t: Any, length: int) -> Tensor:
        """Float ``[B, L, 1 or V]``: ``dα/dt`` per value of the clean token (see ``alpha_values``)."""
        return self.dalpha(t, length)[..., None]

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

    # ---- order probabilities ---------------------------------------------------------

    grid: int = 1024  # uniform time cells of the singleton-order quadrature
    quantiles: int = 256  # plus this many quantile cells of every position's T

    def log_prob(self, ranks: Tensor, steps: int | None = None) -> Tensor:
        """Float64 ``[B]``: ``log P(sample_ranks(·, steps=steps) = ranks)``.

        Positions with rank 0 or -1 are not part of the order. Without ``steps`` the order
        must be singletons (ranks ``1..K`` distinct; a tie has probability 0 and gives
        ``-inf``): ``P(T_σ1 > … > T_σK)`` by the chain quadrature of ``chain_log_prob`` on
        cells cut at a uniform grid of ``grid`` cells and at ``quantiles`` quantiles of
        every position's ``T`` (so no cell holds more than ``1/quantiles`` of any
        position's mass, even where a density is singular, e.g. staggered ``k < 1``).
        With ``steps`` the time bins of ``sample_ranks`` are the cells and the result is
        exact (up to float64 rounding).
        """
        R.validate(ranks)
        B, L = ranks.shape
        if steps is not None:
            if int(steps) < 1:
                raise ValueError(f"steps must be >= 1, got {steps}")
            edges = torch.linspace(0.0, 1.0, int(steps) + 1, dtype=torch.float64, device=ranks.device)
            return chain_log_prob(self.cell_masses(edges, L), ranks, tie=0.0)
        out = chain_log_prob(self.cell_masses(self.order_grid(L, ranks.device), L), ranks, tie=0.5)
        return torch.where(singletons(ranks), out, torch.full_like(out, -math.inf))

    def log_prob_bounds(self, ranks: Tensor) -> tuple[Tensor, Tensor]:
        """``(lower, upper)`` Float64 ``[B]``: a rigorous bracket of the singleton ``log_prob``.

        With the exact cell masses, counting two consecutive positions of the chain that
        share a cell as out of order (``tie = 0``) gives a lower bound and as in order
        (``tie = 1``) an upper bound; ``log_prob`` (``tie = 1/2``) lies between them.
        """
        R.validate(ranks)
        m = self.cell_masses(self.order_grid(ranks.shape[1], ranks.device), ranks.shape[1])
        ok = singletons(ranks)
        lo, hi = chain_log_prob(m, ranks, tie=0.0), chain_log_prob(m, ranks, tie=1.0)
        inf = torch.full_like(lo, -math.inf)
        return torch.where(ok, lo, inf), torch.where(ok, hi, inf)

    def order_grid(self, length: int, device: Any = None) -> Tensor:
        """Float64 ``[M + 1]``: sorted cell edges in ``[0, 1]`` for the singleton quadrature."""
        uniform = torch.linspace(0.0, 1.0, self.grid + 1, dtype=torch.float64, device=device)
        u = torch.linspace(0.0, 1.0, self.quantiles + 1, dtype=torch.float64, device=device)
        q = self.inverse_alpha(u[:, None].expand(-1, length), length)  # [Q + 1, L] quantiles of each T_i
        q = q[torch.isfinite(q)].clamp(0.0, 1.0)
        return torch.unique(torch.cat([uniform, q.reshape(-1)]))  # sorted

    def cell_masses(self, edges: Tensor, length: int) -> Tensor:
        """Float64 ``[B or 1, L, M]``: ``P(T_i ∈ (e_{j}, e_{j+1}])``, the last cell also holding
        ``P(T_i > e_M) = α_i(e_M)`` (never hit on ``[0, 1]``; ``sample_ranks`` puts it first).
        A subclass whose schedule differs per row overrides it."""
        a = self.alpha(edges, length).to(torch.float64).T[None]  # [M+1, L] -> [1, L, M+1]
        m = a[..., :-1] - a[..., 1:]  # [1, L, M]
        m[..., -1] += a[..., -1]
        return m.clamp_min(0.0)

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


def singletons(ranks: Tensor) -> Tensor:
    """Bool ``[B]``: every position with rank >= 1 has a rank of its own."""
    return R.num_sets(ranks) == (ranks > 0).sum(1)


def chain_log_prob(masses: Tensor, ranks: Tensor, tie: float) -> Tensor:
    """Float64 ``[B]``: log probability that independent ``T_i`` fall in the order ``ranks``.

    ``masses`` Float64 ``[B or 1, L, M]``: ``P(T_i ∈ cell j)``, cells ascending in time.
    Set ``S_k`` (rank ``k``) must lie in a later cell than every later set (reverse
    time: rank 1 = largest ``T``). Dynamic programming from the last set to the first::

        H_k(j) = Π_{i ∈ S_k} m_i(j) · C_{k+1}(j)
        C_k(j) = Σ_{j' < j} H_k(j') + tie · H_k(j),     C_{K+1} ≡ 1
        P      = Σ_j H_1(j)

    ``tie = 0``: consecutive sets in distinct cells, exact for the binned orders of
    ``sample_ranks(steps=...)`` (the cells are its time bins, empty bins skipped). For
    singletons, ``tie = 1/2`` is the trapezoid rule of the nested Stieltjes integrals
    ``∫ H_{k+1} dF_{σk}``, with ``tie = 0`` / ``1`` its lower / upper bounds. ``C`` is
    renormalised after every set (its log scale accumulated), so long chains of small
    probabilities do not underflow. O(K · M) per row.
    """
    B, L = ranks.shape
    M = masses.shape[-1]
    chunk = max(1, (1 << 18) // (M + 1))  # rows per chunk: [chunk, M] buffers of ~2 MB stay in cache
    if B > chunk:
        return torch.cat([
            chain_log_prob(masses if masses.shape[0] == 1 else masses[i : i + chunk], ranks[i : i + chunk], tie)
            for i in range(0, B, chunk)
        ])
    d = R.dense(ranks)
    K = int(d.max()) if d.numel() and (d > 0).any() else 0
    # log masses with -inf -> -1e300: a member matrix times them sums a set's log masses
    # without 0 * inf = nan, and exp() of anything near -1e300 is still exactly 0
    logm = masses.to(torch.float64).clamp_min(0.0).log().clamp_min(_IMPOSSIBLE)  # [B or 1, L, M]
    n_sets = d.amax(1) if L else torch.zeros(B, dtype=torch.long, device=ranks.device)
    C = torch.ones(B, M + 1, dtype=torch.float64, device=masses.device)  # C[:, M]: above every cell
    logz = torch.zeros(B, dtype=torch.float64, device=masses.device)
    single = bool(singletons(ranks).all())
    if single:  # position of rank k in each row (rows with fewer sets: any, they skip the step)
        pos = torch.where(d > 0, d - 1, torch.full_like(d, L)).argsort(1)  # [B, L]
        row = torch.arange(B, device=d.device)
    for k in range(K, 0, -1):  # set k, from the last to the first
        if single:  # O(B M) per set
            lm = logm[0][pos[:, k - 1]] if logm.shape[0] == 1 else logm[row, pos[:, k - 1]]  # [B, M]
        elif logm.shape[0] == 1:  # O(B L M) per set: only for multi-token sets, whose M (steps) is small
            lm = (d == k).to(torch.float64) @ logm[0]  # [B, M]: log Π_{i ∈ S_k} m_i(j)
        else:
            lm = torch.einsum("bl,blm->bm", (d == k).to(torch.float64), logm)
        shift = lm.amax(1, keepdim=True)  # [B, 1] keeps exp() finite
        H = torch.exp(lm - shift) * C[:, :M]  # [B, M]
        cs = H.cumsum(1)
        new = torch.cat([cs - (1.0 - tie) * H, cs[:, -1:]], 1)  # [B, M+1]
        z = new[:, M]
        ok = (z > 0) & (shift[:, 0] > _IMPOSSIBLE / 2)
        new = new / torch.where(ok, z, torch.ones_like(z))[:, None]
        step = torch.where(ok, shift[:, 0] + z.clamp_min(1e-300).log(), torch.full_like(z, -math.inf))
        active = k <= n_sets  # rows with fewer sets skip it
        C = torch.where(active[:, None], new, C)
        logz = logz + torch.where(active, step, torch.zeros_like(step))
    return logz


_IMPOSSIBLE = -1e300  # a finite stand-in for log 0 inside chain_log_prob
