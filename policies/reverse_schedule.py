"""LoMDM's reverse scheduler as a decode policy (Hong et al., arXiv 2602.02112, ICML 2026;
``processes/scheduler.py``, ``objectives/lomdm.py``).

LoMDM's generative process is a continuous-time Markov chain on ``z_t``: a masked position
``i`` unmasks at rate ``ŵ_i(z_t)/t`` (``ŵ``: the reverse scheduler network, reading the
noisy sequence) to a token drawn from ``p_θ(· | z_t)``. ``z_t`` changes only when a
position unmasks, and all rates share the factor ``1/t``, so the chain's *jump chain*
(which position unmasks next, whatever the times) is exact and time-free::

    P(next = i | z) = ŵ_i(z) / Σ_{j masked} ŵ_j(z)

(competing exponential clocks in ``u = −log t``, whose rates ``ŵ_i(z)`` are constant
between jumps). Decoding one position per step with this law is therefore ancestral
sampling of LoMDM's own generative order; ``greedy`` takes its mode (the largest rate).
"""

from __future__ import annotations

import torch
from torch import Tensor

from orderlab.processes.scheduler import Scheduler
from orderlab.registry import register

from .base import Policy, PolicyError, StepView
from .sets import PlackettLuceTopK

__all__ = ["ReverseSchedule"]


@register("policy", "lomdm")
class ReverseSchedule(Policy):
    """Unmask by the reverse scheduler's rates (module docstring): ``k`` positions per step
    drawn without replacement ∝ ``ŵ_i(z_t)`` (Plackett–Luce over ``log ŵ``; ``k = 1`` is the
    exact jump chain), or the ``k`` largest rates (``greedy``; ties at random, seeded).
    ``z_t`` is the decoder's current sequence with the scheduler's [MASK] (its
    ``vocab_size``) at the masked positions.

    ``scheduler``: a reverse scheduler (kind "scheduler"). A trained LoMDM stage hands its
    own to evaluation (``LoMDMNelbo.policy``); from YAML a hand-set one orders by fixed
    powers, e.g. ``{name: lomdm, scheduler: {name: positional, power_init: [...]}}``.

    Assumed where the paper's rule is not in REFERENCES: ``k > 1`` draws the set with the
    rates of the step's start (the chain would update ``ŵ`` after each jump); the rates
    ignore ``t`` (they share ``1/t``, which fixes only *when* a jump happens, and a decode
    step reveals by count, not by time)."""

    wants_tokens = True

    def __init__(self, scheduler: Scheduler, k: int = 1, greedy: bool = True, seed: int = 0):
        if not isinstance(scheduler, Scheduler):
            raise PolicyError(f"lomdm needs a reverse scheduler (kind 'scheduler'), got {type(scheduler).__name__}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise PolicyError(f"lomdm k must be an integer >= 1, got {k!r}")
        self.scheduler, self.k, self.greedy, self.seed = scheduler, k, bool(greedy), int(seed)
        self._gen: torch.Generator | None = None

    def reset(self) -> None:
        self._gen = torch.Generator().manual_seed(self.seed)

    def rates(self, view: StepView) -> Tensor:
        """Float[B, L]: ``ŵ_i(z_t)`` of every position (read at the candidates)."""
        if view.tokens is None and self.scheduler.data_dependent:
            raise PolicyError("lomdm reads the noisy sequence: the decoder passes StepView.tokens to a policy whose "
                              "wants_tokens is True (orderlab.decode does; a loop building its own views must pass it)")
        known = torch.zeros_like(view.masked, dtype=torch.long) if view.tokens is None else view.tokens  # unread if None
        z = torch.where(view.masked, self.scheduler.vocab_size, known.clamp(0, self.scheduler.vocab_size - 1))
        p = next(self.scheduler.parameters(), None)
        with torch.no_grad():
            return self.scheduler(z.to(p.device if p is not None else z.device)).to(view.probs.device)

    def distribution(self, view: StepView) -> PlackettLuceTopK:
        return PlackettLuceTopK(self.rates(view).double().log(), view.candidates, self.k)

    def select(self, view: StepView) -> Tensor:
        if self._gen is None:
            self.reset()
        dist = self.distribution(view)
        return dist.mode(self._gen) if self.greedy else dist.sample(self._gen)

    def log_prob(self, selected: Tensor, view: StepView) -> Tensor:
        """Float[B]: log P(selected) under the sampled (non-greedy) rule."""
        return self.distribution(view).log_prob(selected)

    def __repr__(self) -> str:
        return f"ReverseSchedule(scheduler={type(self.scheduler).__name__}, k={self.k}, greedy={self.greedy}, seed={self.seed})"
