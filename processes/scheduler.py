"""Data-dependent schedules (LoMDM / OeMDM: Hong et al., arXiv 2602.02112, ICML 2026): the
masking schedule of position ``i`` depends on the sequence,

    α_i(x, t) = 1 − (1 − ε) t^{w_i(x)},   w(x) = scheduler(x) > 0

(GenMD4's polynomial family, ``processes/learned.py``, with powers from a network). A
**scheduler** (kind "scheduler") maps a token sequence to per-position powers,
``scheduler(z Long[B, L]) -> Float[B, L]``; it reads clean tokens as the *forward*
scheduler and noisy ones ([MASK] = ``vocab_size``) as the *reverse* scheduler, which sets
the unmasking rates ``ŵ_i(z_t)/t`` of the generative process (``objectives/lomdm.py``).

- ``positional``: ``w_i = softplus(ρ_i)``, data-independent: GenMD4's ``learned_position``.
- ``mixer``: ``w_i = softplus(ρ_i + g(z)_i)``, ``g`` a light network (token and position
  embeddings, a mean-pooled context, an MLP); its output layer starts at zero, so it
  starts as ``positional``.

``learned_data`` is the process of a forward scheduler: ``given(x)`` is the schedule of
the tokens ``x`` (a ``Powers`` process per row, keeping the gradient to the scheduler);
what needs no ``x`` raises ``NotImplementedError`` (as ``learned_token``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from orderlab.processes.base import Process
from orderlab.processes.corruption import Absorbing, Corruption
from orderlab.processes.learned import Powers, TokenDependent, _check_eps, _initial
from orderlab.registry import declare_kind, register

__all__ = ["Scheduler", "PositionalScheduler", "MixerScheduler", "DataSchedule"]


@declare_kind("scheduler")
class Scheduler(nn.Module):
    """Kind "scheduler": ``forward(z Long[B, L]) -> Float[B, L]`` positive powers, for tokens
    ``< vocab_size`` and [MASK] ``= vocab_size``, sequences up to ``max_len`` (both from the
    build's context). ``data_dependent``: whether the powers read ``z`` at all."""

    needs = ("vocab_size", "max_len")
    data_dependent = True

    def _check(self, z: Tensor) -> None:
        if z.dim() != 2 or z.dtype.is_floating_point:
            raise ValueError(f"{type(self).__name__} reads tokens Long[B, L], got {z.dtype} of shape {tuple(z.shape)}")
        if z.shape[1] > self.max_len:
            raise ValueError(f"{type(self).__name__} has {self.max_len} positions, got length {z.shape[1]}")


@register("scheduler", "positional")
class PositionalScheduler(Scheduler):
    """``w_i = softplus(ρ_i)``: one learned power per position, whatever the tokens
    (GenMD4's ``learned_position``; ``power_init``: one number or one per position)."""

    data_dependent = False

    def __init__(self, vocab_size: int, max_len: int, power_init: float | list[float] = 1.0):
        super().__init__()
        self.vocab_size, self.max_len = int(vocab_size), int(max_len)
        self.rho = nn.Parameter(_initial(power_init, self.max_len, "positions"))

    def forward(self, z: Tensor) -> Tensor:
        self._check(z)
        return F.softplus(self.rho[: z.shape[1]])[None].expand(z.shape[0], -1)  # [B, L]


@register("scheduler", "mixer")
class MixerScheduler(PositionalScheduler):
    """``w_i = softplus(ρ_i + g(z)_i)``: ``h_i = E[z_i] + P_i``, ``c = mean_i h_i``,
    ``g_i = MLP([h_i, c])`` (``width`` units); ``g``'s output starts at 0 (``positional``)."""

    data_dependent = True

    def __init__(self, vocab_size: int, max_len: int, power_init: float | list[float] = 1.0, width: int = 32):
        super().__init__(vocab_size, max_len, power_init)
        if int(width) < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        self.embed = nn.Embedding(self.vocab_size + 1, width)  # tokens and [MASK]
        self.pos = nn.Embedding(self.max_len, width)
        self.mlp = nn.Sequential(nn.Linear(2 * width, width), nn.GELU(), nn.Linear(width, 1))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, z: Tensor) -> Tensor:
        self._check(z)
        L = z.shape[1]
        h = self.embed(z.clamp(0, self.vocab_size)) + self.pos.weight[:L][None]  # [B, L, W]
        c = h.mean(1, keepdim=True).expand_as(h)  # [B, L, W] the sequence's context
        g = self.mlp(torch.cat([h, c], -1))[..., 0]  # [B, L]
        return F.softplus(self.rho[:L][None] + g)


@register("process", "learned_data")
class DataSchedule(TokenDependent, Process, nn.Module):
    """The forward process of a scheduler: ``α_i(x, t) = 1 − (1−ε) t^{w_i(x)}`` (module doc).
    ``given(x)``: the ``Powers`` schedule of tokens ``x``; ``corrupt(x, ...)`` works directly."""

    depends_on = "the clean tokens (a data-dependent schedule)"

    def __init__(self, scheduler: Scheduler, eps: float = 1e-4, corruption: Corruption = Absorbing()):
        nn.Module.__init__(self)
        Process.__init__(self, corruption)
        if not isinstance(scheduler, Scheduler):
            raise ValueError(f"scheduler must be a Scheduler, got {type(scheduler).__name__}")
        self.scheduler, self.eps = scheduler, _check_eps(eps)

    def given(self, x: Tensor) -> Powers:
        """The schedule of the clean tokens ``x`` Long ``[B, L]`` (a power per row and position)."""
        return Powers(self.scheduler(x), self.eps, self.corruption)

    def _args(self):
        return {"scheduler": type(self.scheduler).__name__, "eps": self.eps}
