"""Scores: ``score(view) -> Float[B, L]``, higher = revealed first (DESIGN.md section 5).

Values outside ``view.candidates`` are ignored by the count rules. Scores combine with
``+`` and scalar ``*``: ``Confidence() + Gumbel(0.5)`` is Kim et al.'s noisy top-prob.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .base import PolicyError, StepView

__all__ = [
    "Score", "Confidence", "Margin", "NegEntropy", "PositionPrior", "Uniform", "Gumbel", "PCScore",
    "Sum", "Scaled", "score_from",
]


class Score:
    """Base class of scores. Subclasses define ``__call__(view) -> Float[B, L]``."""

    def __call__(self, view: StepView) -> Tensor:
        raise NotImplementedError

    def reset(self) -> None:
        """Forget per-batch state (re-seed random scores)."""

    def __add__(self, other: "Score") -> "Score":
        if not isinstance(other, Score):
            return NotImplemented
        return Sum(self, other)

    def __mul__(self, c: float) -> "Score":
        if isinstance(c, bool) or not isinstance(c, (int, float)):
            return NotImplemented
        return Scaled(self, float(c))

    __rmul__ = __mul__

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Sum(Score):
    def __init__(self, a: Score, b: Score):
        self.a, self.b = a, b

    def __call__(self, view: StepView) -> Tensor:
        return self.a(view) + self.b(view)

    def reset(self) -> None:
        self.a.reset()
        self.b.reset()

    def __repr__(self) -> str:
        return f"{self.a!r} + {self.b!r}"


class Scaled(Score):
    def __init__(self, inner: Score, c: float):
        self.inner, self.c = inner, c

    def __call__(self, view: StepView) -> Tensor:
        return self.c * self.inner(view)

    def reset(self) -> None:
        self.inner.reset()

    def __repr__(self) -> str:
        return f"{self.c!r} * {self.inner!r}"


class Confidence(Score):
    """max_v p(v): top-probability / low-confidence remasking (LLaDA; Kim et al. 2025)."""

    def __call__(self, view: StepView) -> Tensor:
        return view.confidence


class Margin(Score):
    """p(v1) − p(v2) (Kim et al., "Train for the Worst, Plan for the Best", ICML 2025)."""

    def __call__(self, view: StepView) -> Tensor:
        return view.margin


class NegEntropy(Score):
    """−H(p) in nats: lowest entropy first (Kim et al. 2025; EB sampler's default proxy)."""

    def __call__(self, view: StepView) -> Tensor:
        return -view.entropy


class PositionPrior(Score):
    """A score of the position only: ``"l2r"`` (−i), ``"r2l"`` (+i) or ``"exp"`` (exp(−λ i))."""

    KINDS = ("l2r", "r2l", "exp")

    def __init__(self, kind: str = "l2r", lam: float = 0.25):
        if kind not in self.KINDS:
            raise PolicyError(f"PositionPrior kind must be one of {self.KINDS}, got {kind!r}")
        self.kind, self.lam = kind, float(lam)

    def __call__(self, view: StepView) -> Tensor:
        i = torch.arange(view.length, device=view.probs.device, dtype=view.probs.dtype)
        i = i.expand(view.batch_size, -1)  # [B, L]
        if self.kind == "l2r":
            return -i
        if self.kind == "r2l":
            return i.clone()
        return torch.exp(-self.lam * i)

    def __repr__(self) -> str:
        return f"PositionPrior({self.kind!r})" if self.kind != "exp" else f"PositionPrior('exp', lam={self.lam})"


class _Seeded(Score):
    """A score drawing from its own ``torch.Generator``, re-seeded by ``reset()``."""

    def __init__(self, seed: int = 0):
        self.seed = int(seed)
        self._gen: torch.Generator | None = None

    def reset(self) -> None:
        self._gen = None

    def _uniform(self, view: StepView) -> Tensor:
        # drawn on CPU in float64 so results do not depend on the device
        if self._gen is None:
            self._gen = torch.Generator().manual_seed(self.seed)
        u = torch.rand(view.batch_size, view.length, generator=self._gen, dtype=torch.float64)
        return u.to(view.probs.device)


class Uniform(_Seeded):
    """U(0, 1) per position: with a top-k count, a uniformly random k-subset (vanilla MDM)."""

    def __call__(self, view: StepView) -> Tensor:
        return self._uniform(view)

    def __repr__(self) -> str:
        return f"Uniform(seed={self.seed})"


class Gumbel(_Seeded):
    """``scale`` · Gumbel(0, 1) noise, added to a score (Kim et al. 2025 use 0.5 on puzzles)."""

    def __init__(self, scale: float = 1.0, seed: int = 0):
        super().__init__(seed)
        self.scale = float(scale)

    def __call__(self, view: StepView) -> Tensor:
        u = self._uniform(view).clamp(1e-300, 1.0)
        return (-self.scale * torch.log((-torch.log(u)).clamp_min(1e-300))).to(view.probs.dtype)

    def __repr__(self) -> str:
        return f"Gumbel({self.scale}, seed={self.seed})"


class PCScore(Score):
    """PC-sampler score ``w_i · C_i`` (Huang et al. 2025, "PC-Sampler").

    ``w_i = exp(−λ (i − |prompt|))`` with ``|prompt|`` the number of given positions before
    the first masked one (``view.given``; without it, the unmasked positions before the
    first masked one); ``C_i = min(−p_i log p_D(x̂_i), α)`` with ``x̂ = argmax``,
    ``p_i`` its probability and ``p_D`` token frequencies of a reference corpus
    (normalised here; ``None`` = uniform 1/V). The prompt offset only rescales a row.
    """

    def __init__(self, lam: float = 0.25, alpha: float = 10.0, token_freqs: Tensor | Sequence[float] | None = None):
        self.lam, self.alpha = float(lam), float(alpha)
        if token_freqs is not None:
            f = torch.as_tensor(token_freqs, dtype=torch.float64).flatten()
            if f.numel() == 0 or (f < 0).any() or f.sum() <= 0:
                raise PolicyError("PCScore token_freqs must be non-negative with a positive sum")
            token_freqs = f / f.sum()
        self.token_freqs: Tensor | None = token_freqs

    def __call__(self, view: StepView) -> Tensor:
        B, L, V = view.probs.shape
        dev, dt = view.probs.device, view.probs.dtype
        if self.token_freqs is None:
            log_pd = torch.full((B, L), -math.log(V), device=dev, dtype=dt)
        else:
            if self.token_freqs.numel() != V:
                raise PolicyError(f"PCScore token_freqs has {self.token_freqs.numel()} entries but probs has V = {V}")
            log_pd = self.token_freqs.to(dev, dt).clamp_min(1e-12).log()[view.argmax]  # [B, L]
        c = torch.clamp(-view.confidence * log_pd, max=self.alpha)
        before = view.given if view.given is not None else ~view.masked
        first = _first_true(view.masked)  # [B]
        i = torch.arange(L, device=dev)
        prompt = (before & (i < first[:, None])).sum(1)  # [B]
        w = torch.exp(-self.lam * (i[None, :] - prompt[:, None]).to(dt))  # [B, L]
        return w * c

    def __repr__(self) -> str:
        tf = "None" if self.token_freqs is None else f"<{self.token_freqs.numel()} freqs>"
        return f"PCScore(lam={self.lam}, alpha={self.alpha}, token_freqs={tf})"


def _first_true(m: Tensor) -> Tensor:
    """Long[B]: index of the first True per row (L where none)."""
    L = m.shape[1]
    i = torch.arange(L, device=m.device).expand_as(m)
    return torch.where(m, i, torch.full_like(i, L)).amin(1)


_BY_NAME = {"confidence": Confidence, "margin": Margin, "entropy": NegEntropy, "neg_entropy": NegEntropy}


def score_from(spec: Score | str) -> Score:
    """A score object, or one named by a string: confidence, margin, entropy."""
    if isinstance(spec, Score):
        return spec
    if spec not in _BY_NAME:
        raise PolicyError(f"unknown score {spec!r}; choose one of {sorted(_BY_NAME)} or pass a Score object")
    return _BY_NAME[spec]()
