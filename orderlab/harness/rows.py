"""Text to rows and back: tokenizing requests, fitting them into the model's length,
batching by length (order restored by the caller), left padding into orderlab's ranks.

A row is ``[left padding (-1) | context (rank 0) | target (rank 1)]``: for
``loglikelihood`` the target is the continuation's tokens, for ``generate_until`` it is
``max_gen_toks`` positions to generate.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from orderlab import ranks as R
from orderlab.tokenizer import Tokenizer

__all__ = ["Codec", "Row", "fit", "pack", "batches", "cut_text"]


@dataclass
class Codec:
    """Text to ids as lm-eval's HF model does it: a context's trailing spaces move to the
    continuation, and the continuation is the tail of the encoded whole (so its tokens are
    the ones the whole text would have); an empty context is the prefix token (BOS, else
    EOS). ``add_special_tokens``: the tokenizer's post-processor (``JsonlTask`` encodes
    prompts this way); chat-templated text carries its own special tokens (``chat``)."""

    tokenizer: Tokenizer
    add_special_tokens: bool = True
    chat: bool = False

    @property
    def prefix_id(self) -> int:
        tok = self.tokenizer
        if tok.bos_id is not None:
            return tok.bos_id
        if tok.eos_id is None:
            raise ValueError(f"{tok.source}: no BOS or EOS token to condition an empty context on")
        return tok.eos_id

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=self.add_special_tokens and not self.chat)

    def context(self, text: str) -> list[int]:
        ids = self.encode(text) if text else []
        return ids or [self.prefix_id]

    def pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """``(context ids, continuation ids)``."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if not context:
            return [self.prefix_id], self.tokenizer.encode(continuation, add_special_tokens=False)
        whole, ctx = self.encode(context + continuation), self.encode(context)
        return ctx, whole[len(ctx):]

    def text(self, ids: Sequence[int]) -> str:
        """Generated ids up to the first end-of-text id, as text."""
        ends = set(self.tokenizer.eos_ids)
        cut = next((i for i, t in enumerate(ids) if t in ends), len(ids))
        return self.tokenizer.decode(list(ids[:cut]))


@dataclass(frozen=True)
class Row:
    """One row: ``context`` ids (given) and ``target``: the continuation ids, or for a
    generation the number of positions to generate (an int)."""

    context: tuple[int, ...]
    target: tuple[int, ...] | int

    @property
    def width(self) -> int:
        return len(self.context) + (self.target if isinstance(self.target, int) else len(self.target))


def fit(context: Sequence[int], target: Sequence[int] | int, max_len: int) -> Row:
    """The row cut to ``max_len`` positions from the left (the context loses its start,
    as lm-eval's HF model does; a target longer than ``max_len - 1`` keeps its end, the cut
    tokens becoming context)."""
    if isinstance(target, int):
        if target >= max_len:
            raise ValueError(f"{target} positions to generate do not fit the model's max_len={max_len}")
        return Row(tuple(context)[max(0, len(context) + target - max_len):], target)
    whole = (list(context) + list(target))[-max_len:]
    n = min(len(target), max_len - 1)
    return Row(tuple(whole[: len(whole) - n]), tuple(whole[len(whole) - n:]))


def pack(rows: Sequence[Row], pad_id: int, mask_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(tokens Long[B, W], ranks Long[B, W])``, ``W`` the widest row, left padded: padding
    -1 (token ``pad_id``), context 0, target 1 (tokens, or ``mask_id`` where generated)."""
    W = max(r.width for r in rows)
    tokens = torch.full((len(rows), W), pad_id, dtype=torch.long)
    ranks = torch.full((len(rows), W), R.PAD, dtype=torch.long)
    for b, r in enumerate(rows):
        target = [mask_id] * r.target if isinstance(r.target, int) else list(r.target)
        ids = list(r.context) + target
        tokens[b, W - len(ids):] = torch.tensor(ids, dtype=torch.long)
        ranks[b, W - len(ids):] = torch.tensor([R.GIVEN] * len(r.context) + [1] * len(target), dtype=torch.long)
    return tokens.to(device), ranks.to(device)


def batches(rows: Sequence[Row], size: int, group: Callable[[int], Hashable] = lambda i: ()) -> Iterator[list[int]]:
    """Indices of ``rows`` in batches of at most ``size``: rows of one ``group`` (e.g. the
    same generation settings) together, longest first, ties by content, so a batch's members
    depend on the requests, never on their order (results are shuffle-invariant, seeds
    included)."""
    keyed = sorted(range(len(rows)), key=lambda i: (repr(group(i)), -rows[i].width, rows[i].context, repr(rows[i].target)))
    chunk: list[int] = []
    for i in keyed:
        if chunk and (len(chunk) == size or group(chunk[0]) != group(i)):
            yield chunk
            chunk = []
        chunk.append(i)
    if chunk:
        yield chunk


def cut_text(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop sequence."""
    cut = min((i for i in (text.find(s) for s in until if s) if i >= 0), default=len(text))
    return text[:cut]
