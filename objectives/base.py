"""Objective base class and its output."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from orderlab.processes.base import Process
from orderlab.registry import declare_kind

if TYPE_CHECKING:  # annotations only
    from orderlab.objectives.iwae import OrderDistribution
    from orderlab.policies.learned import LearnedPolicy

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
    own (a policy network, a guide, a learned schedule). Every objective subclasses it;
    the trainer, the config and evaluation rely on this contract, not on duck typing:

    - ``step(model, tokens, ranks, generator=None) -> StepOutput`` is what the training
      loop calls, with ``ranks`` as tasks give them (0 given, 1 to generate, -1 padding).
      It must be a function of its arguments, the objective's state and the global torch
      RNG, so that a resumed run repeats it exactly. ``validate`` is what validation calls.
    - ``trains_model`` (class attribute, or set by the constructor): whether the loop
      optimises the model's parameters in this stage. False: the model is frozen
      (``requires_grad`` off, eval mode) and only the objective's own parameters learn; an
      objective with neither trains nothing, an error.
    - ``policy``: None, or the :class:`~orderlab.policies.learned.LearnedPolicy` the
      objective learns (a submodule: its parameters are the objective's, trained and
      checkpointed with it), or another :class:`~orderlab.policies.base.Policy` that decodes
      with what the objective learned (LoMDM's reverse scheduler). After training,
      evaluation decodes with it as a policy labelled by the stage's name;
      ``LearnedPolicy`` states what its ``recording`` and ``replay`` mean.
    - ``orders(model)``: None, or ``(prior, proposal)``, the order distributions the
      objective has learned (``objectives.iwae.OrderDistribution``: ``sample`` and
      ``log_prob``), for the likelihood table's IWAE bound; None leaves the table its
      uniformly random orders.
    - ``nan_metrics``: names of ``StepOutput.metrics`` that may be NaN meaning "out of
      reach this step" (logged as NaN). Any other non-finite metric, like a non-finite
      loss, stops training (``orderlab.train.NonFiniteError``).

    Likelihood objectives implement ``forward(model, tokens, ranks, generator) ->
    LossOutput`` and inherit ``step``, which reports bits per predicted token.
    """

    exact: bool = False
    trains_model: bool = True
    nan_metrics: frozenset[str] = frozenset()

    def __init__(self, process: Process | None = None):
        super().__init__()
        # None: an objective that samples no forward process (policy gradient)
        self.process: Process | None = process
        self.policy: LearnedPolicy | None = None  # a learned policy is assigned after this call (a submodule)

    def orders(self, model) -> tuple[OrderDistribution, OrderDistribution] | None:
        """``(prior, proposal)`` order distributions learned by this objective, or None."""
        return None

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
