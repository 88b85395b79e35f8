"""Decode in the order a forward process would reveal: the training order distribution
used as the decode policy (DESIGN.md sections 1 and 3)."""

from __future__ import annotations


import torch
from torch import Tensor

from orderlab.ranks import NEVER
from orderlab.processes.base import Process
from orderlab.registry import register

from .base import Policy, StepView

__all__ = ["ScheduleSampler"]


@register("policy", "schedule")
class ScheduleSampler(Policy):
    """At step 0, sample ranks over the masked positions from ``process``'s first-hitting
    times (``Process.sample_ranks``; with ``steps``, T quantised into ``steps`` time bins,
    so sets share a rank), then reveal the next set of that order at every step.

    ``process`` is a process instance or spec (``"flat"``, ``{name: ..., ...}``). Stateful:
    ``reset()`` forgets the sampled order (the decoder calls it per batch).
    """

    def __init__(self, process: Process, steps: int | None = None, seed: int = 0):
        if not hasattr(process, "sample_ranks"):
            raise TypeError(f"process must have sample_ranks(ranks, generator=None, steps=None), got {type(process).__name__}")
        self.process, self.steps, self.seed = process, steps, int(seed)
        self._ranks: Tensor | None = None
        self._gen: torch.Generator | None = None

    def reset(self) -> None:
        self._ranks = None
        self._gen = None

    def _sample(self, masked: Tensor) -> Tensor:
        if self._gen is None:
            self._gen = torch.Generator().manual_seed(self.seed)
        ranks = masked.long().cpu()  # 1 to generate, 0 otherwise
        out = self.process.sample_ranks(ranks, generator=self._gen, steps=self.steps)
        return out.to(masked.device)

    def select(self, view: StepView) -> Tensor:
        if self._ranks is None or self._ranks.shape != view.masked.shape or view.step == 0:
            self._ranks = self._sample(view.masked)
        r = torch.where(view.candidates, self._ranks, torch.full_like(self._ranks, NEVER))  # [B, L]
        nxt = r.amin(1, keepdim=True)  # [B, 1] the next set's rank
        return view.candidates & (r == nxt)

    def __repr__(self) -> str:
        return f"ScheduleSampler({self.process!r}, steps={self.steps}, seed={self.seed})"
