"""Test helper: every order of a row's positions to generate (exact-enumeration checks)."""

from __future__ import annotations

import itertools

import torch


def all_orders(template: torch.Tensor, multi: bool = False) -> torch.Tensor:
    """Long ``[n, L]``: every singleton order (or, ``multi``, every ordered set partition)
    of the positions with rank >= 1 of ``template Long[L]``, given and padding kept."""
    idx = (template > 0).nonzero().squeeze(1).tolist()
    k = len(idx)
    if multi:
        ranks = [r for r in itertools.product(range(1, k + 1), repeat=k) if set(r) == set(range(1, max(r) + 1))]
    else:
        ranks = list(itertools.permutations(range(1, k + 1)))
    out = template.repeat(len(ranks), 1)
    out[:, idx] = torch.tensor(ranks)
    return out
