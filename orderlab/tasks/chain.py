"""State tracking whose direction differs per chain: prefix or suffix products in S_d.

Each example holds ``chains`` independent chains of ``length`` permutations
``p_1..p_n`` of the symmetric group ``S_degree`` (``S_3`` by default: 6 elements, the
smallest non-abelian group). Every chain carries a direction, drawn uniformly and
independently per chain and per example, and its answer is

- ``>`` (l2r): the prefix products ``y_k = p_1 ∘ … ∘ p_k``  (so ``y_k = y_{k-1} ∘ p_k``),
- ``<`` (r2l): the suffix products ``y_k = p_k ∘ … ∘ p_n``  (so ``y_k = p_k ∘ y_{k+1}``),

with ``(a ∘ b)(i) = a(b(i))`` (apply ``b`` first).

**Why the order matters for a converged model.** Each answer is *one* composition away
from its neighbour in the chain's direction, but a product of ``k`` (r2l: ``n - k + 1``)
elements of the prompt alone, and a shallow transformer cannot compose a long chain of a
non-abelian group in one forward pass: composition is not a sum, the model must track a
state. (``S_3`` is solvable, so shortcuts of depth ~log n exist (Liu et al. 2023,
"Transformers learn shortcuts to automata"), which a few layers do not reach in
practice; the word problem of ``S_5``, ``degree=5``, is NC^1-complete (Barrington 1989),
so no constant-depth shortcut is known.) So a decode that reveals each chain's answers
in its own direction needs one composition per step and succeeds; left-to-right fails
on r2l chains (its first answer ``y_1`` is the product of the whole chain: a guess right
with chance 1/|S_d|), right-to-left fails on l2r chains, and random orders ask for
multi-step compositions often. With two chains of independent directions, a fixed
direction follows both chains on only a quarter of the examples. The best order
(``oracle_ranks``) runs each chain in its direction, one token per chain per step, the
chains in parallel: ``length`` steps.

Layout (one block per chain, ``2 * length + 1`` tokens each)::

    [dir p_1 .. p_n  y_1 .. y_n] [dir p_1 .. p_n  y_1 .. y_n] ...

Ranks are 0 on ``dir`` and the ``p``'s, 1 on the ``y``'s; there is no padding. Blocks,
not interleaving, so that every chain's answers are a contiguous run of positions: the
order heatmap of a row shows one ramp per chain, rising for l2r and falling for r2l, and
the answer ``y_k`` always sits at the same offset (``n``) from its ``p_k``.

Tokens: ``0..|S_d|-1`` the group elements (lexicographic order of the permutations of
``0..d-1``; id 0 is the identity), then ``>`` and ``<``. ``pad_id`` is 0 (never used:
sequences are never padded).

Splits hash the whole prompt (every chain's direction and permutations, ``hash_split``),
so test prompts are never seen in training; the prompt space has ``(2 |S_d|^n)^chains``
elements (~8.7e9 for the defaults), and ``batch`` samples uniformly by rejection.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor

from orderlab.registry import register
from orderlab.tasks.base import Task, exact_match, sample_split

__all__ = ["Chain", "permutation_table"]


def permutation_table(degree: int) -> tuple[Tensor, Tensor]:
    """``(perms Long[G, degree], mul Long[G, G])`` for ``S_degree``, ``G = degree!``.

    ``perms[g]`` is element ``g`` as an array (lexicographic order, ``perms[0]`` the
    identity); ``mul[a, b]`` is the id of ``a ∘ b``, i.e. ``perms[a][perms[b]]``.
    """
    perms = torch.tensor(list(itertools.permutations(range(degree))), dtype=torch.long)  # [G, d]
    G = perms.shape[0]
    composed = perms[:, None, :].expand(G, G, degree).gather(2, perms[None, :, :].expand(G, G, degree))  # [G, G, d]
    # id of a permutation array = its index in the lexicographic list (a base-d code, then a lookup)
    code = lambda p: (p * degree ** torch.arange(degree - 1, -1, -1)).sum(-1)  # noqa: E731
    lookup = torch.full((degree**degree,), -1, dtype=torch.long)
    lookup[code(perms)] = torch.arange(G)
    return perms, lookup[code(composed)]


@register("task", "chain")
class Chain(Task):
    """``chains`` chains of ``length`` elements of ``S_degree``, each with its own direction."""

    metric = "exact_match"

    def __init__(self, chains: int = 2, length: int = 6, degree: int = 3):
        if chains < 1:
            raise ValueError(f"chains must be >= 1, got {chains}")
        if length < 2:
            raise ValueError(f"length must be >= 2 (a chain of one element has no direction), got {length}")
        if not 3 <= degree <= 5:
            raise ValueError(f"degree must be in 3..5 (S_3 .. S_5: non-abelian, at most 120 tokens), got {degree}")
        self.chains, self.length, self.degree = chains, length, degree
        self.perms, self.mul = permutation_table(degree)
        self.group_size = math.factorial(degree)
        self.l2r_id, self.r2l_id = self.group_size, self.group_size + 1
        self.vocab_size = self.group_size + 2
        self.pad_id = 0
        self.eos_id = None
        self.block = 2 * length + 1  # dir, p_1..p_n, y_1..y_n
        self.seq_len = chains * self.block
        start = torch.arange(chains)[:, None] * self.block  # [C, 1]
        k = torch.arange(length)[None, :]  # [1, n]
        self.dir_pos = start[:, 0]  # Long[C]: position of each chain's direction token
        self.p_pos = start + 1 + k  # Long[C, n]: positions of p_1..p_n
        self.y_pos = start + 1 + length + k  # Long[C, n]: positions of y_1..y_n

    def __repr__(self) -> str:
        return f"Chain(chains={self.chains}, length={self.length}, degree={self.degree})"

    def answers(self, p: Tensor, l2r: Tensor) -> Tensor:
        """Long ``[B, C, n]``: prefix (``l2r``) or suffix products of ``p Long[B, C, n]``."""
        mul = self.mul.to(p.device)
        n = p.shape[-1]
        pre, suf = p.clone(), p.clone()
        for k in range(1, n):
            pre[..., k] = mul[pre[..., k - 1], p[..., k]]  # y_k = y_{k-1} ∘ p_k
            suf[..., n - 1 - k] = mul[p[..., n - 1 - k], suf[..., n - k]]  # y_k = p_k ∘ y_{k+1}
        return torch.where(l2r[..., None], pre, suf)

    def encode_chains(self, p: Tensor, l2r: Tensor) -> tuple[Tensor, Tensor]:
        """``(tokens, ranks)`` Long ``[B, seq_len]`` for elements ``p Long[B, C, n]`` and ``l2r Bool[B, C]``."""
        B = p.shape[0]
        if p.shape[1:] != (self.chains, self.length) or l2r.shape != (B, self.chains):
            raise ValueError(
                f"p must be [B, {self.chains}, {self.length}] and l2r [B, {self.chains}], "
                f"got {tuple(p.shape)} and {tuple(l2r.shape)}"
            )
        dirs = torch.where(l2r, self.l2r_id, self.r2l_id)  # [B, C]
        y = self.answers(p, l2r)
        blocks = torch.cat([dirs[..., None], p, y], dim=2)  # [B, C, 2n+1]
        tokens = blocks.reshape(B, self.seq_len)
        ranks = torch.zeros_like(tokens)
        ranks[:, self.y_pos.flatten()] = 1
        return tokens, ranks

    def _draw(self, m: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        p = torch.randint(0, self.group_size, (m, self.chains, self.length), generator=g)
        l2r = torch.randint(0, 2, (m, self.chains), generator=g).bool()
        tokens, _ = self.encode_chains(p, l2r)
        prompt = torch.cat([tokens[:, self.dir_pos], tokens[:, self.p_pos.flatten()]], dim=1)
        return tokens, prompt

    # ------------------------------------------------------------ the contract
    def batch(self, n: int, split: str = "train", seed: int = 0) -> tuple[Tensor, Tensor]:
        tokens = sample_split(self._draw, n, split, seed, what="chain prompts")
        ranks = torch.zeros_like(tokens)
        ranks[:, self.y_pos.flatten()] = 1
        return tokens, ranks

    def score(self, pred: Tensor, tokens: Tensor, ranks: Tensor) -> Tensor:
        """1.0 iff every answer of every chain of the row matches."""
        return exact_match(pred, tokens, ranks)

    def token_freqs(self) -> Tensor:
        """Frequencies over a fixed sample of 2**14 train sequences (elements ~uniform)."""
        return self._sampled_freqs(1 << 14)

    def render(self, tokens: Tensor) -> str:
        """``"> 130542 = 113520 | < ..."``: per chain, direction, elements, answers; mask as ``?``."""
        sym = [str(g) if self.group_size <= 10 else f"{g},".rjust(4) for g in range(self.group_size)] + [">", "<"]
        text = lambda ts: "".join(sym[t] if 0 <= t < len(sym) else "?" for t in ts)  # noqa: E731
        t = tokens.tolist()
        out = []
        for c in range(self.chains):
            b = t[c * self.block : (c + 1) * self.block]
            out.append(f"{text(b[:1])} {text(b[1 : 1 + self.length])} = {text(b[1 + self.length :])}")
        return " | ".join(out)

    # ------------------------------------------------------------ the best order
    def directions(self, tokens: Tensor) -> Tensor:
        """Bool ``[B, chains]``: True where the chain is l2r (read from its direction token)."""
        d = tokens[:, self.dir_pos.to(tokens.device)]
        if not ((d == self.l2r_id) | (d == self.r2l_id)).all():
            raise ValueError(f"tokens {tuple(tokens.shape)} hold a non-direction token at a direction position")
        return d == self.l2r_id

    def oracle_ranks(self, tokens: Tensor) -> Tensor:
        """Long ``[B, seq_len]``: each chain decoded in its own direction, chains in parallel.

        Step ``k`` reveals ``y_k`` of every l2r chain and ``y_{n+1-k}`` of every r2l chain,
        so every revealed answer is one composition from a known neighbour; ``length``
        steps of ``chains`` tokens. Prompt positions get rank 0.
        """
        if tokens.dim() != 2 or tokens.shape[1] != self.seq_len:
            raise ValueError(f"tokens must be [B, {self.seq_len}], got {tuple(tokens.shape)}")
        l2r = self.directions(tokens)  # [B, C]
        k = torch.arange(1, self.length + 1, device=tokens.device)  # [n]
        step = torch.where(l2r[..., None], k, self.length + 1 - k)  # [B, C, n]
        ranks = torch.zeros_like(tokens)
        ranks[:, self.y_pos.flatten().to(tokens.device)] = step.flatten(1)
        return ranks
