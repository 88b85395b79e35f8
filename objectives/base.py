"""Objective base class and its output."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from orderlab.processes.base import Process
from orderlab.registry import declare_kind

__all__ = ["LossOutput", "StepOutput", "Objective"]


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


@dataclass
class StepOutput:
    """What one training step of any objective returns to the training loop.

    The loop backpropagates ``loss`` and logs ``metrics`` without knowing what they are
    (bits per token, reward, NFE, entropy, ...): a logged value is the ``weight``-weighted
    mean over the steps of the log window, so a per-token metric weighted by its token
    count aggregates exactly (total nats / total tokens).
    """

    loss: Tensor  # scalar to backpropagate
    metrics: dict[str, float]  # scalars (plain floats, detached)
    weight: float = 1.0  # this step's share when metrics are averaged (e.g. predicted tokens)
    label: str | None = None  # what ``bits_per_token`` is: "nll", "nelbo (bound)"; None: no likelihood


@declare_kind("objective")
class Objective(nn.Module):
    """Base class of kind "objective": a training loss, possibly with parameters of its
    own (a policy network, a guide, a learned schedule).

    ``step(model, tokens, ranks, generator=None) -> StepOutput`` is what the training loop
    calls, with ``ranks`` as tasks give them (0 given, 1 to generate, -1 padding).
    ``trains_model``: whether the loop optimises the model's parameters in this stage
    (False: the model is frozen and only the objective's own parameters learn).

    Likelihood objectives implement ``forward(model, tokens, ranks, generator) ->
    LossOutput`` and inherit ``step``, which reports bits per predicted token.
    """

    exact: bool = False
    trains_model: bool = True

    def __init__(self, process: Process | None = None):
        super().__init__()
        # None: an objective that samples no forward process (policy gradient)
        self.process: Process | None = process

    def forward(self, model, tokens: Tensor, ranks: Tensor, generator: torch.Generator | None = None) -> LossOutput:
        raise NotImplementedError(f"{type(self).__name__} is not a likelihood objective; call step()")

    def step(self, model, tokens: Tensor, ranks: Tensor, generator: torch.Generator | None = None) -> StepOutput:
        out = self(model, tokens, ranks, generator=generator)
        bits = float(out.nats.sum() / out.tokens.sum().clamp_min(1) / math.log(2))
        return StepOutput(out.loss, {"bits_per_token": bits}, weight=float(out.tokens.sum()), label=out.label)

    def validate(self, model, tokens: Tensor, ranks: Tensor, generator: torch.Generator | None = None) -> StepOutput:
        """What validation reports (called under ``no_grad``, model and objective in eval
        mode): ``step`` by default. Override to validate otherwise than training, e.g.
        decode greedily where training samples."""
        return self.step(model, tokens, ranks, generator=generator)

    @staticmethod
    def _output(nats: Tensor, tokens: Tensor, exact: bool) -> LossOutput:
        tokens = tokens.float()
        return LossOutput(nats.sum() / tokens.sum().clamp_min(1), nats.detach(), tokens, exact)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(process={self.process!r})"
