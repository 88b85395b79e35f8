"""n-digit addition: ``a+b=c``, the answer digits are generated, exact match.

Layout (``digits=3``): ``042+917=0959``: zero-padded operands of ``digits`` digits and
an answer of ``digits + 1`` digits, most significant digit first (``reverse_answer=True``:
least significant first, the order in which carries are computed). Ranks are 0 on the
prompt ``a+b=`` and 1 on the answer digits; there is no padding.

Splits are a fixed function of the pair: ``(a, b)`` is in test if a hash of the pair
falls in bucket 0 of 10, valid in bucket 1, train otherwise (~10/10/80%). ``batch``
samples pairs of its split uniformly (with replacement) by rejection.
"""

from __future__ import annotations

import torch
from torch import Tensor

from orderlab.registry import register
from orderlab.tasks.base import Task, exact_match, split_generator, split_index

__all__ = ["Addition", "pair_split"]

PLUS, EQUALS, PAD = 10, 11, 12
_CHARS = "0123456789+=_"  # id -> character; the mask id renders as "?"
_P = 2_147_483_647  # 2**31 - 1, prime: every product below stays under 2**62


def pair_split(a: Tensor, b: Tensor) -> Tensor:
    """Long like ``a``: the split index (0 train, 1 valid, 2 test) of each pair ``(a, b)``.

    A fixed integer hash (multiply-mod-prime rounds with xor-shifts), so the split of a
    pair never depends on seeds, batch sizes or the machine. Needs ``0 <= a, b < 2**31``.
    """
    a, b = a.long(), b.long()
    h = (a * 1_103_515_245 + 12_345) % _P
    h = h ^ (h >> 16)
    h = (h * 1_664_525 + b) % _P
    h = h ^ (h >> 13)
    h = (h * 2_147_483_629 + 1_013_904_223) % _P
    h = h ^ (h >> 11)
    bucket = h % 10
    # bucket 0 -> test (2), bucket 1 -> valid (1), else train (0)
    return torch.where(bucket == 0, 2, torch.where(bucket == 1, 1, 0))


def _digits(x: Tensor, width: int) -> Tensor:
    """Long ``[B, width]``: the decimal digits of ``x Long[B]``, most significant first."""
    powers = 10 ** torch.arange(width - 1, -1, -1, dtype=torch.long)  # [width]
    return (x[:, None] // powers) % 10


@register("task", "addition")
class Addition(Task):
    """``digits``-digit addition with the answer generated; metric: exact match."""

    metric = "exact_match"

    def __init__(self, digits: int = 3, reverse_answer: bool = False):
        if not 1 <= digits <= 9:
            raise ValueError(f"digits must be in 1..9, got {digits}")
        self.digits = digits
        self.reverse_answer = reverse_answer
        self.vocab_size = len(_CHARS)  # 13: digits, '+', '=', pad
        self.pad_id = PAD
        self.eos_id = None
        self.prompt_len = 2 * digits + 2  # "a+b="
        self.seq_len = self.prompt_len + digits + 1

    def __repr__(self) -> str:
        return f"Addition(digits={self.digits}, reverse_answer={self.reverse_answer})"

    def encode_pairs(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """``(tokens, ranks)`` Long ``[B, seq_len]`` for the pairs ``(a[i], b[i])``."""
        n = self.digits
        B = a.shape[0]
        c = _digits(a + b, n + 1)  # [B, n+1]
        if self.reverse_answer:
            c = c.flip(1)
        col = lambda v: torch.full((B, 1), v, dtype=torch.long)  # noqa: E731
        tokens = torch.cat([_digits(a, n), col(PLUS), _digits(b, n), col(EQUALS), c], dim=1)
        ranks = torch.zeros_like(tokens)
        ranks[:, self.prompt_len :] = 1
        return tokens, ranks

    def sample_pairs(self, n: int, split: str = "train", seed: int = 0) -> tuple[Tensor, Tensor]:
        """``(a, b)`` Long ``[n]`` each: pairs of ``split``, uniform by rejection sampling."""
        want = split_index(split)
        g = split_generator(split, seed)
        hi = 10**self.digits
        frac = 0.8 if want == 0 else 0.1
        got_a, got_b, have = [], [], 0
        for _ in range(1000):
            if have >= n:
                break
            m = max(64, int((n - have) / frac * 1.25) + 16)
            a = torch.randint(0, hi, (m,), generator=g)
            b = torch.randint(0, hi, (m,), generator=g)
            keep = pair_split(a, b) == want
            got_a.append(a[keep])
            got_b.append(b[keep])
            have += int(keep.sum())
        if have < n:
            raise RuntimeError(f"could not sample {n} pairs of split {split!r} for digits={self.digits}")
        return torch.cat(got_a)[:n], torch.cat(got_b)[:n]

    def batch(self, n: int, split: str = "train", seed: int = 0) -> tuple[Tensor, Tensor]:
        a, b = self.sample_pairs(n, split, seed)
        return self.encode_pairs(a, b)

    def score(self, pred: Tensor, tokens: Tensor, ranks: Tensor) -> Tensor:
        """1.0 iff all answer digits (rank >= 1) of the row match."""
        return exact_match(pred, tokens, ranks)

    def token_freqs(self) -> Tensor:
        """Frequencies over prompts and answers of a fixed sample of 2**15 train pairs."""
        return self._sampled_freqs(1 << 15)

    def render(self, tokens: Tensor) -> str:
        """``"042+917=0959"``; pad renders as ``_``, the mask id (and anything else) as ``?``."""
        return "".join(_CHARS[t] if 0 <= t < len(_CHARS) else "?" for t in tokens.tolist())

    def encode(self, text: str) -> Tensor:
        """Inverse of ``render``: Long ``[len(text)]`` (``?`` -> mask id)."""
        ids = []
        for ch in text:
            if ch == "?":
                ids.append(self.mask_id)
            elif ch in _CHARS:
                ids.append(_CHARS.index(ch))
            else:
                raise ValueError(f"character {ch!r} is not in the addition vocabulary {_CHARS!r}")
        return torch.tensor(ids, dtype=torch.long)
