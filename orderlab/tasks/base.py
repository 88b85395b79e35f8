"""The task contract (docs/interfaces.md, "Tasks"): data with its metric.

A task hands out ``(tokens Long[n, L], ranks Long[n, L])`` with ranks ``0`` given
(prompt, context), ``1`` to generate (order not chosen yet) and ``-1`` padding (token =
``pad_id``). The mask id is *not* in the vocabulary: ``mask_id = vocab_size`` belongs to
the model.
"""

from __future__ import annotations

import abc

import torch
from torch import Tensor

from orderlab import ranks as R

__all__ = ["Task", "SPLITS", "split_index", "split_generator", "exact_match"]

SPLITS = ("train", "valid", "test")


def split_index(split: str) -> int:
    """Index of ``split`` in ``SPLITS``; an unknown split is an error naming the valid ones."""
    try:
        return SPLITS.index(split)
    except ValueError:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}") from None


def split_generator(split: str, seed: int) -> torch.Generator:
    """A CPU generator seeded from ``(seed, split)``: distinct streams per split.

    ``seed * 3 + split`` is injective in (seed, split) for seeds >= 0; the value is taken
    modulo 2**64 because ``manual_seed`` wants an unsigned 64-bit seed.
    """
    s = (int(seed) * len(SPLITS) + split_index(split)) % (1 << 64)
    return torch.Generator().manual_seed(s)


def exact_match(pred: Tensor, tokens: Tensor, ranks: Tensor) -> Tensor:
    """Float ``[B]``: 1.0 where every generated position (rank >= 1) of the row matches."""
    R.validate(ranks, tokens)
    if pred.shape != tokens.shape:
        raise ValueError(f"pred must have the shape of tokens {tuple(tokens.shape)}, got {tuple(pred.shape)}")
    ok = (pred.to(tokens.device) == tokens) | ~R.to_generate(ranks)  # [B, L]
    return ok.all(dim=1).float()


class Task(abc.ABC):
    """Base class of kind "task": a data generator with its metric.

    Subclasses set ``vocab_size`` (mask id not counted), ``seq_len``, ``eos_id``
    (``None`` for fixed-length tasks), ``pad_id`` and ``metric`` (name of the number
    ``score`` returns), and implement the four methods below.
    """

    vocab_size: int
    seq_len: int
    eos_id: int | None = None
    pad_id: int
    metric: str

    @property
    def mask_id(self) -> int:
        """The [MASK] id models use for this task (one past the vocabulary)."""
        return self.vocab_size

    @abc.abstractmethod
    def batch(self, n: int, split: str = "train", seed: int = 0) -> tuple[Tensor, Tensor]:
        """``(tokens Long[n, L], ranks Long[n, L])``, deterministic in ``(split, seed)``."""

    @abc.abstractmethod
    def score(self, pred: Tensor, tokens: Tensor, ranks: Tensor) -> Tensor:
        """Float ``[B]``: per-row task score of ``pred`` against the reference ``tokens``."""

    @abc.abstractmethod
    def token_freqs(self) -> Tensor:
        """Float ``[vocab_size]``: token frequencies over the train split (sum 1)."""

    @abc.abstractmethod
    def render(self, tokens: Tensor) -> str:
        """A readable string for one sequence ``tokens Long[L]``."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, seq_len={self.seq_len})"
