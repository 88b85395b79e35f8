"""The task contract (docs/interfaces.md, "Tasks"): data with its metric.

A task hands out ``(tokens Long[n, L], ranks Long[n, L])`` with ranks ``0`` given
(prompt, context), ``1`` to generate (order not chosen yet) and ``-1`` padding (token =
``pad_id``). The mask id is *not* in the vocabulary: ``mask_id = vocab_size`` belongs to
the model.
"""

from __future__ import annotations

import abc
from collections.abc import Callable

import torch
from torch import Tensor

from orderlab import ranks as R
from orderlab.registry import declare_kind

__all__ = [
    "Task",
    "SPLITS",
    "split_index",
    "split_generator",
    "exact_match",
    "token_accuracy",
    "position_accuracy",
    "hash_rows",
    "hash_split",
    "sample_split",
    "empirical_freqs",
]

SPLITS = ("train", "valid", "test")
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)  # share of hash_split's buckets per split
_P = 2_147_483_647  # 2**31 - 1, prime: every product in hash_rows stays under 2**62


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


def _correct(pred: Tensor, tokens: Tensor, ranks: Tensor) -> tuple[Tensor, Tensor]:
    """``(right, generated)`` Bool ``[B, L]``: generated positions, and those ``pred`` gets right."""
    R.validate(ranks, tokens)
    if pred.shape != tokens.shape:
        raise ValueError(f"pred must have the shape of tokens {tuple(tokens.shape)}, got {tuple(pred.shape)}")
    gen = R.to_generate(ranks)
    return (pred.to(tokens.device) == tokens) & gen, gen


def token_accuracy(pred: Tensor, tokens: Tensor, ranks: Tensor) -> Tensor:
    """Float ``[B]``: fraction of the row's generated positions (rank >= 1) that match.

    Sudoku's cell accuracy, infilling's character (byte) accuracy. A row with nothing to
    generate scores 1.0 (as in ``exact_match``: nothing is wrong).
    """
    right, gen = _correct(pred, tokens, ranks)
    n = gen.sum(1)
    return torch.where(n > 0, right.sum(1) / n.clamp(min=1), 1.0).float()


def position_accuracy(pred: Tensor, tokens: Tensor, ranks: Tensor) -> Tensor:
    """Float ``[L]``: per position, the fraction of rows generating it that got it right.

    NaN where no row generates the position (prompt, padding). Shows *where* a decode order
    fails (e.g. the far end of a chain).
    """
    right, gen = _correct(pred, tokens, ranks)
    n = gen.sum(0).float()
    return torch.where(n > 0, right.sum(0) / n.clamp(min=1), float("nan"))


def hash_rows(x: Tensor) -> Tensor:
    """Long ``[B]`` in ``[0, 2**31 - 1)``: a fixed integer hash of each row of ``x Long[B, M]``.

    Multiply-mod-prime rounds with xor-shifts folded over the columns, so it never depends
    on seeds, batch sizes, Python's ``hash`` or the machine. Entries must be in ``[0, 2**31)``.
    """
    if x.dim() != 2 or x.dtype.is_floating_point:
        raise ValueError(f"hash_rows wants an integer tensor [B, M], got {x.dtype} of shape {tuple(x.shape)}")
    x = x.long()
    h = torch.full((x.shape[0],), 1_013_904_223, dtype=torch.long, device=x.device)
    for j in range(x.shape[1]):
        h = (h * 1_103_515_245 + x[:, j] + 12_345) % _P
        h = h ^ (h >> 13)
    h = (h * 1_664_525 + 1_013_904_223) % _P
    return h ^ (h >> 11)


def hash_split(x: Tensor) -> Tensor:
    """Long ``[B]``: the split index (0 train, 1 valid, 2 test) of each row of ``x Long[B, M]``.

    Bucket ``hash % 10``: 0 -> test, 1 -> valid, else train (~80/10/10, ``SPLIT_FRACTIONS``).
    """
    bucket = hash_rows(x) % 10
    return torch.where(bucket == 0, 2, torch.where(bucket == 1, 1, 0))


def sample_split(
    draw: Callable[[int, torch.Generator], tuple[Tensor, Tensor]], n: int, split: str, seed: int, what: str = "examples"
) -> Tensor:
    """Long ``[n, ...]``: ``n`` examples of ``split``, by rejection on ``hash_split`` of a key.

    ``draw(m, generator) -> (examples [m, ...], keys Long[m, K])`` draws ``m`` candidates
    from the whole example space; a candidate is kept iff ``hash_split(key)`` is ``split``,
    so the splits are disjoint in the key (e.g. the prompt) whatever the seeds.
    """
    want = split_index(split)
    g = split_generator(split, seed)
    frac = SPLIT_FRACTIONS[want]
    got, have = [], 0
    for _ in range(1000):
        if have >= n:
            break
        m = max(64, int((n - have) / frac * 1.25) + 16)
        examples, keys = draw(m, g)
        keep = hash_split(keys) == want
        got.append(examples[keep])
        have += int(keep.sum())
    if have < n:
        raise RuntimeError(f"could not sample {n} {what} of split {split!r}")
    return torch.cat(got)[:n]


def empirical_freqs(tokens: Tensor, vocab_size: int) -> Tensor:
    """Float ``[vocab_size]``: the frequency of each id in ``tokens`` (sum 1)."""
    counts = torch.bincount(tokens.flatten(), minlength=vocab_size).double()
    return (counts / counts.sum()).float()


@declare_kind("task")
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

    def metrics(self, pred: Tensor, tokens: Tensor, ranks: Tensor) -> dict[str, Tensor]:
        """Per-row metrics, each Float ``[B]``: ``{metric: score, "token_accuracy": ...}``.

        Sums over rows are meaningful, so callers may accumulate them over batches. Tasks
        with more per-row numbers override this and extend the dict.
        """
        return {self.metric: self.score(pred, tokens, ranks), "token_accuracy": token_accuracy(pred, tokens, ranks)}

    @abc.abstractmethod
    def token_freqs(self) -> Tensor:
        """Float ``[vocab_size]``: token frequencies over the train split (sum 1)."""

    def _sampled_freqs(self, n: int) -> Tensor:
        """:func:`empirical_freqs` of ``n`` train sequences (seed ``0x5EED``), computed once
        per task object (a ``token_freqs`` for generated tasks)."""
        freqs = getattr(self, "_freqs", None)
        if freqs is None:
            tokens, _ = self.batch(n, "train", seed=0x5EED)
            freqs = self._freqs = empirical_freqs(tokens, self.vocab_size)
        return freqs.clone()

    @abc.abstractmethod
    def render(self, tokens: Tensor) -> str:
        """A readable string for one sequence ``tokens Long[L]``."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, seq_len={self.seq_len})"
