"""Objective base class and its output."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from orderlab.processes.base import Process
from orderlab.registry import build

__all__ = ["LossOutput", "Objective"]


@dataclass
class LossOutput:
    loss: Tensor  # scalar to backpropagate: nats per predicted token over the batch
    nats: Tensor  # Float[B]: per-row nats (detached)
    tokens: Tensor  # Float[B]: predicted tokens per row
    exact: bool  # True: the exact NLL of the sampled order; False: a bound (NELBO)

    @property
    def bits_per_token(self) -> float:
        return float(self.nats.sum() / self.tokens.sum().clamp_min(1) / math.log(2))

    @property
    def label(self) -> str:
        return "nll" if self.exact else "nelbo (bound)"


class Objective:
    """Base class of kind "objective": a training loss over a process.

    ``objective(model, tokens, ranks, generator=None) -> LossOutput`` with ``ranks`` as
    tasks give them (0 given, 1 to generate, -1 padding).
    """

    exact: bool = False

    def __init__(self, process: Process | str = "linear"):
        self.process: Process = build("process", process, path="objective.process")

    def __call__(self, model, tokens: Tensor, ranks: Tensor, generator: torch.Generator | None = None) -> LossOutput:
        raise NotImplementedError

    @staticmethod
    def _output(nats: Tensor, tokens: Tensor, exact: bool) -> LossOutput:
        tokens = tokens.float()
        return LossOutput(nats.sum() / tokens.sum().clamp_min(1), nats.detach(), tokens, exact)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(process={self.process!r})"
