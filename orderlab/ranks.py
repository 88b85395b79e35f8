"""Ranks: the one language of orderlab (DESIGN.md section 1).

``ranks[B, L]`` is an integer tensor: ``0`` given, ``k >= 1`` revealed at step ``k``
(equal ranks form one set), ``-1`` padding. Tasks hand out ranks with ``1`` meaning
"to generate" (order not chosen yet); processes and policies turn that into an order.

Attention metadata (the one rule, used by every attention path)::

    key j visible to query i  iff  k_rank[j] < q_rank[i]
                                   or (q_group[i] >= 0 and k_group[j] == q_group[i])

``NEVER`` is the key rank of tokens that are visible only through their group (queries,
padding): it is larger than any query rank.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["GIVEN", "PAD", "NEVER", "validate", "dense", "num_sets", "sets", "to_generate", "RanksError", "require"]

GIVEN = 0
PAD = -1
NEVER = 2**30  # key rank of tokens visible only through their group


class RanksError(ValueError):
    """Ranks (or the tokens that go with them) are malformed."""


def require(ok: Tensor, what: str, detail: Callable[[], str] | None = None, error: type[Exception] = RuntimeError) -> None:
    """Raise ``error(what: detail())`` unless the bool tensor ``ok`` holds.

    Inside ``torch.compile`` the check stays in the graph (``torch._assert_async``: no
    graph break, no host read; on CPU it raises ``RuntimeError(what)`` when the graph
    runs), since ``detail`` reads tensors on the host and only runs eagerly."""
    if torch.compiler.is_compiling():
        torch._assert_async(ok, what)
    elif not bool(ok):
        raise error(f"{what}: {detail()}" if detail is not None else what)


def validate(ranks: Tensor, tokens: Tensor | None = None, name: str = "ranks", mask_id: int | None = None) -> Tensor:
    """Check ``ranks`` (and ``tokens`` if given) and return ``ranks`` unchanged.

    With ``mask_id``, a given position (rank 0) holding the mask token is an error: a
    position whose token is unknown must have a rank (be generated).

    Errors name the tensor, its shape and the first offending entry.
    """
    if not isinstance(ranks, Tensor):
        raise RanksError(f"{name} must be a torch.Tensor, got {type(ranks).__name__}")
    if ranks.dim() != 2:
        raise RanksError(f"{name} must have shape [B, L], got shape {tuple(ranks.shape)}")
    if ranks.dtype.is_floating_point or ranks.dtype == torch.bool or ranks.dtype.is_complex:
        raise RanksError(f"{name} must be an integer tensor, got dtype {ranks.dtype}")
    bad = ranks < PAD
    if bad.any():
        b, i = (int(v) for v in bad.nonzero()[0])
        raise RanksError(f"{name} of shape {tuple(ranks.shape)} has value {int(ranks[b, i])} < -1 at [{b}, {i}]")
    if tokens is not None:
        if not isinstance(tokens, Tensor) or tokens.shape != ranks.shape:
            shape = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
            raise RanksError(f"tokens must have the shape of {name} {tuple(ranks.shape)}, got {shape}")
        if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise RanksError(f"tokens must be an integer tensor, got dtype {tokens.dtype}")
        if mask_id is not None:
            unknown = (ranks == GIVEN) & (tokens == mask_id)
            if unknown.any():
                b, i = (int(v) for v in unknown.nonzero()[0])
                raise RanksError(
                    f"position [{b}, {i}] is given ({name} == 0) but its token is the mask id {mask_id}: "
                    "a masked position needs a rank >= 1"
                )
    return ranks


def to_generate(ranks: Tensor) -> Tensor:
    """Bool ``[B, L]``: positions that are predicted (rank >= 1)."""
    return ranks > 0


def dense(ranks: Tensor) -> Tensor:
    """Relabel the positive ranks of each row to ``1..K`` keeping their order and ties.

    ``[[0, 5, 5, 9, -1]] -> [[0, 1, 1, 2, -1]]``. Given and padding stay as they are.
    """
    validate(ranks)
    out = ranks.clone()
    pos = ranks > 0
    if not pos.any():
        return out
    big = torch.where(pos, ranks, torch.full_like(ranks, NEVER))
    s, _ = big.sort(dim=1)  # [B, L]
    # a new set starts where the sorted value changes
    new = torch.ones_like(s, dtype=torch.bool)
    new[:, 1:] = s[:, 1:] != s[:, :-1]
    new &= s != NEVER
    cum = new.long().cumsum(1)  # [B, L] set index of each sorted value
    # dense rank of value r in row b = cum at the first sorted slot holding r
    idx = torch.searchsorted(s.contiguous(), big.contiguous())  # [B, L]
    d = cum.gather(1, idx.clamp(max=s.shape[1] - 1))
    out[pos] = d[pos].to(out.dtype)
    return out


def num_sets(ranks: Tensor) -> Tensor:
    """Long ``[B]``: number of distinct positive ranks per row."""
    return dense(ranks).clamp(min=0).amax(dim=1) if ranks.numel() else ranks.new_zeros(ranks.shape[0])


def sets(ranks: Tensor) -> list[list[list[int]]]:
    """Per row, the positions of each set in reveal order: ``[[S_1, S_2, ...], ...]``."""
    d = dense(ranks)
    out = []
    for row in d.tolist():
        k = max([r for r in row] + [0])
        groups: list[list[int]] = [[] for _ in range(k)]
        for i, r in enumerate(row):
            if r > 0:
                groups[r - 1].append(i)
        out.append(groups)
    return out
