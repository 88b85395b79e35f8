"""Attention rules: how ranks become the token streams the transformer reads.

Every rule speaks the one attention rule of ``orderlab.kernels.set_attention``::

    key j visible to query i  iff  k_rank[j] < q_rank[i]
                                   or (q_group[i] >= 0 and k_group[j] == q_group[i])

A rule turns ``(x, ranks)`` into one or more :class:`Stream` s (the *passes* of the exact
likelihood) and, during decoding, the state of a partly decoded batch into the stream of
one step. Streams are packed per row (left-aligned, padded), so rows with different
prompts, padding and sets batch together.

- :class:`SetCausal` (SetDLM two-stream; AR when ranks are 1..L): one pass over
  ``[x_clean, x_query]``. A clean token of rank ``r`` has ``k_rank = r``,
  ``q_rank = r + 1`` (it sees ranks ``<= r``: causal in reveal order, bidirectional
  inside its set); the query for a position of rank ``k`` has ``q_rank = k`` and its own
  group (it sees clean ranks ``< k`` and itself, never other queries).
- :class:`BlockCausal` (BD3-LM): clean tokens of block ``b`` have ``k_rank = b + 1``,
  ``q_rank = b + 2``; the noisy copy of block ``b`` has ``q_rank = b + 1`` and group ``b``
  (bidirectional inside the block). One pass per within-block step.
- :class:`Bidirectional` (MDM): one stream over ``x_t``, everything in group 0. One pass
  per set.

The clean given (rank-0) tokens of the two cached rules attend to each other as chosen by
``prompt``: ``"bidirectional"`` (one set that sees itself both ways) or ``"causal"``
(causal in position order, like an AR model and the released SetDLM mask, REFERENCES.md
"Set diffusion"). The choice only changes the key ranks of given tokens (see
:func:`given_key_rank`); the one visibility rule above decides the rest.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields

import torch
from torch import Tensor

from orderlab.ranks import NEVER, PAD, RanksError, dense, require
from orderlab.registry import declare_kind, register

__all__ = ["Stream", "pack", "AttentionRule", "SetCausal", "BlockCausal", "Bidirectional", "UNKNOWN", "PROMPTS", "given_key_rank"]

UNKNOWN = NEVER  # decode-state rank of a position that is still masked


@dataclass
class Stream:
    """Tokens one forward reads, all ``[B, N]``.

    ``out[b, n]`` is the position whose token query ``n`` predicts (``-1``: none).
    ``n_append[b]``: the first ``n_append[b]`` tokens of row ``b`` are clean tokens whose
    K/V the cache keeps after this forward (decode only).
    """

    tokens: Tensor
    pos: Tensor
    q_rank: Tensor
    k_rank: Tensor
    q_group: Tensor
    k_group: Tensor
    out: Tensor
    n_append: Tensor | None = None


_FILL = {"tokens": 0, "pos": 0, "q_rank": 0, "k_rank": NEVER, "q_group": -1, "k_group": -1, "out": -1}


def pack(*segments: tuple[Tensor, dict[str, Tensor | int]], width: int | None = None) -> Stream:
    """Concatenate segments and left-align each row's selected tokens.

    Each segment is ``(select Bool[B, L], {field: Long[B, L] or int})`` for the fields of
    :class:`Stream` (missing fields take the padding value), plus an optional ``"sort"``
    key: within a row, tokens keep segment order, then ``sort`` order (default: position),
    then position. The order changes no output (attention depends only on ranks, groups
    and logical positions) but a stream sorted by rank makes the rank mask close to
    causal, so the Triton kernel skips about half of the tiles. Padding slots see nothing
    and are seen by no one.

    All fields travel as one ``[F, B, S*L]`` tensor, so the gather and the padding are one
    op each (a decode step calls this once per step).

    ``width``: the stream's length ``N`` (default: the most tokens a row selects, read on
    the host). A fixed width makes every shape static (a compiled decode step); a row
    selecting more than ``width`` tokens is an error.
    """
    B, L = segments[0][0].shape
    dev = segments[0][0].device
    fill = torch.tensor(list(_FILL.values()), device=dev)  # [F]
    sel = torch.cat([s for s, _ in segments], dim=1)  # [B, S*L]
    segs, keys = [], []  # per segment: its fields as one [F, B, L] tensor (one stack, no per-field copies)
    for _, attrs in segments:
        fields = []
        for f, name in enumerate(_FILL):
            a = attrs.get(name)
            if isinstance(a, Tensor):
                fields.append(a.long().expand(B, L))
            elif a is None or a == _FILL[name]:
                fields.append(fill[f].expand(B, L))  # a view, copied once by the stack
            else:
                fields.append(torch.full((B, L), a, dtype=torch.long, device=dev))
        segs.append(torch.stack(fields))  # [F, B, L]
        keys.append(None if attrs.get("sort") is None
                    else torch.as_tensor(attrs["sort"], device=dev).long().clamp(0, NEVER).expand(B, L))
    if width is None:
        N = int(sel.sum(1).max()) if B else 0
    else:
        N = width
        require((sel.sum(1) <= width).all(), "pack: a row selects more tokens than the stream's width",
                lambda: f"{int(sel.sum(1).max())} tokens, width={width}")
    if all(k is None for k in keys):
        # no sort keys (a decode step): the concatenation order is the stream's order, so a
        # selected column's slot is the count of selected columns before it, and a scatter
        # per segment places every field (unselected columns go to a dump slot N, cut off):
        # the sort below's result without sorting S*L columns per row
        slot = torch.where(sel, (sel.long().cumsum(1) - 1).clamp(max=N), N)  # [B, S*L]; past N: never (checked)
        out = fill[:, None, None].expand(-1, B, N + 1).contiguous()  # [F, B, N + 1]
        for i, seg in enumerate(segs):
            out.scatter_(2, slot[None, :, i * L : (i + 1) * L].expand(len(_FILL), B, L), seg)
        return Stream(*out[:, :, :N].unbind(0))
    cols = torch.cat(segs, dim=2)  # [F, B, S*L]
    # composite sort key: (unselected last, segment, sort key, position)
    pos = torch.arange(L, device=dev)
    key = torch.cat([(i * (NEVER + 1) + (0 if k is None else k)) * L + pos for i, k in enumerate(keys)], dim=1).expand(B, -1)
    key = torch.where(sel, key, torch.iinfo(torch.long).max)
    n = min(N, sel.shape[1])  # a width past every column: the rest is padding
    order = torch.argsort(key, dim=1, stable=True)[:, :n]  # [B, n]: selected first, in key order
    valid = sel.gather(1, order)  # [B, n]
    out = torch.where(valid, cols.gather(2, order.expand(len(_FILL), B, n)), fill[:, None, None])  # [F, B, n]
    if N > n:
        out = torch.cat([out, fill[:, None, None].expand(-1, B, N - n)], dim=2)
    return Stream(*out.unbind(0))


def _own_groups(s: Stream) -> Stream:
    """Give every query (``out >= 0``) a group of its own: its slot in the stream.

    Slot ids increase along the stream, so a tile of queries has a narrow group range and
    the kernel's tile pre-pass can prove query-to-query tiles empty."""
    slot = torch.arange(s.out.shape[1], device=s.out.device).expand_as(s.out)
    s.q_group = s.k_group = torch.where(s.out >= 0, slot, -1)
    return s


def _positions(x: Tensor) -> Tensor:
    """Long ``[B, L]``: the column of every position."""
    return torch.arange(x.shape[1], device=x.device).expand_as(x)


def _logical(real: Tensor) -> Tensor:
    """Long ``[B, L]``: the positions RoPE sees, counted from a row's first non-padding column
    (``real``: Bool, not padding), so that a left-padded row has the positions it has alone
    (Hugging Face's ``position_ids = cumsum(attention_mask) - 1``; a batch of ragged prompts
    is the field's most reported bug class). Leading padding gets 0 (it is invisible)."""
    lead = (~real).long().cumprod(1).sum(1, keepdim=True)  # [B, 1]: padding columns before the first real one
    return (_positions(real) - lead).clamp(min=0)


PROMPTS = ("bidirectional", "causal")  # how clean given (rank-0) tokens see each other


def _check_prompt(prompt: str) -> str:
    if prompt not in PROMPTS:
        raise ValueError(f"attention.prompt must be one of {PROMPTS}, got {prompt!r}")
    return prompt


def given_key_rank(rank: Tensor, k_rank: Tensor, prompt: str) -> Tensor:
    """``k_rank`` of clean tokens with the given (``rank == 0``) ones placed by ``prompt``.

    Clean tokens use ``q_rank = k_rank + 1`` (a clean token sees key ranks ``<= k_rank``).
    ``"bidirectional"``: given tokens keep key rank 0, one set, each sees all of them.
    ``"causal"``: the given token at position ``p`` gets the sub-rank ``p − L`` (negative,
    increasing in position, below every generated rank >= 1), so it sees the given tokens
    at positions ``<= p`` only, never a generated token, while every generated query or
    clean token (``q_rank >= 1``) still sees all given tokens: the prompt is causal in
    position order, as in AR and SetDLM (REFERENCES.md, "Set diffusion").
    """
    if _check_prompt(prompt) == "bidirectional":
        return k_rank
    return torch.where(rank == 0, _positions(rank) - rank.shape[1], k_rank)


@declare_kind("attention")
class AttentionRule:
    """Base class of attention rules (registry kind ``"attention"``)."""

    name: str = ""
    cacheable: bool = True

    def passes(self, x: Tensor, ranks: Tensor, mask_id: int) -> Iterator[Stream]:
        """The streams whose predictions together give the exact likelihood of ``ranks``."""
        raise NotImplementedError

    def candidates(self, unknown: Tensor, rank: Tensor | None = None) -> Tensor:
        """Bool ``[B, L]``: masked positions this rule lets a decoder reveal now (``rank``:
        the decode state, whose padding a rule with blocks needs; None: no padding)."""
        return unknown

    def step(self, tokens: Tensor, rank: Tensor, queries: Tensor, step: int, cached: bool, width: int | None = None) -> Stream:
        """The stream of decode step ``step`` (0-based).

        ``rank``: 0 given, k revealed at step k (1-based), -1 padding, ``UNKNOWN`` masked.
        ``queries``: positions whose predictions are needed. With ``cached``, clean
        tokens already in the cache are left out and new ones lead the stream.
        ``width``: pad the stream to that many tokens (see :func:`pack`).
        """
        raise NotImplementedError

    def step_width(self, tokens: Tensor, rank: Tensor, queries: Tensor, step: int, cached: bool) -> int:
        """The width (most tokens of a row) of :meth:`step`'s stream, read on the host: a
        compiled decode step pads to a fixed width and must know when a step outgrows it.
        Rules count it from their masks; this default builds the stream."""
        return self.step(tokens, rank, queries, step, cached).tokens.shape[1]

    def spec(self) -> dict:
        """The config mapping that rebuilds this rule."""
        return {"name": self.name, **asdict(self)} if hasattr(self, "__dataclass_fields__") else {"name": self.name}

    def __repr__(self) -> str:
        args = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self)) if hasattr(self, "__dataclass_fields__") else ""
        return f"{type(self).__name__}({args})"


@register("attention", "set_causal")
@dataclass(repr=False)
class SetCausal(AttentionRule):
    """Set-causal two-stream attention (SetDLM, Arriola & Kuleshov 2026, section 3).

    One forward over ``[x_clean, x_query]`` gives ``log p(x_i | x_{S<k})`` for every
    position of every set; with ranks ``1..L`` it is exactly causal (AR).
    ``prompt``: how the given tokens see each other (``"causal"`` in position order, as in
    SetDLM's release and AR; ``"bidirectional"``: one set), see :func:`given_key_rank`.
    """

    prompt: str = "bidirectional"
    name = "set_causal"

    def __post_init__(self):
        _check_prompt(self.prompt)

    def passes(self, x: Tensor, ranks: Tensor, mask_id: int) -> Iterator[Stream]:
        pos = _logical(ranks >= 0)
        kr = given_key_rank(ranks, ranks, self.prompt)
        # both streams in reveal order: the rank mask is then close to block-triangular
        clean = (ranks >= 0, {"tokens": x, "pos": pos, "k_rank": kr, "q_rank": kr + 1, "sort": ranks})
        query = (ranks >= 1, {"tokens": mask_id, "pos": pos, "q_rank": ranks, "out": _positions(x), "sort": ranks})
        yield _own_groups(pack(clean, query))

    @staticmethod
    def _clean(rank: Tensor, queries: Tensor, step: int, cached: bool) -> Tensor:
        """Bool[B, L]: the clean tokens of step ``step``'s stream. Cached: only the set
        revealed at the previous step (the given tokens at step 0); else every known one."""
        if cached:
            return (rank == step) & queries.any(1, keepdim=True)
        return (rank >= 0) & (rank != UNKNOWN)

    def step(self, tokens: Tensor, rank: Tensor, queries: Tensor, step: int, cached: bool, width: int | None = None) -> Stream:
        pos = _logical(rank >= 0)
        new = self._clean(rank, queries, step, cached)
        kr = given_key_rank(rank, rank, self.prompt)
        clean = (new, {"tokens": tokens, "pos": pos, "k_rank": kr, "q_rank": kr + 1})
        query = (queries, {"tokens": tokens, "pos": pos, "q_rank": step + 1, "out": _positions(tokens)})
        s = _own_groups(pack(clean, query, width=width))
        s.n_append = new.sum(1) if cached else None
        return s

    def step_width(self, tokens: Tensor, rank: Tensor, queries: Tensor, step: int, cached: bool) -> int:
        return int((self._clean(rank, queries, step, cached).sum(1) + queries.sum(1)).max())  # disjoint sets


@register("attention", "block_causal")
@dataclass(repr=False)
class BlockCausal(AttentionRule):
    """Block-causal attention (BD3-LM, Arriola et al. 2025): blocks left to right,
    bidirectional inside the noisy block, exact block KV cache.

    Ranks must be block-monotone: every generated position of block ``b`` comes before
    every generated position of block ``b + 1``. ``prompt``: how the given tokens see each
    other, see :func:`given_key_rank`.
    """

    block_size: int = 4
    prompt: str = "bidirectional"
    name = "block_causal"

    def __post_init__(self):
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        _check_prompt(self.prompt)

    def _block(self, rank: Tensor) -> Tensor:
        """Long ``[B, L]``: the block of every position, counted like RoPE's positions from the
        row's first non-padding column (``rank`` -1: padding), so that blocks start at a row's
        own position 0 (SDAR, BD3-LM) whatever its left padding."""
        return _logical(rank != PAD) // self.block_size

    def _per_block(self, rank: Tensor, values: Tensor, keep: Tensor, fill: int, reduce: str) -> Tensor:
        """Long ``[B, n_blocks]``: ``reduce`` ("amin"/"amax") of ``values`` over each block's
        ``keep`` positions (``fill`` for a block with none)."""
        blk = self._block(rank)
        out = torch.full((values.shape[0], int(blk.max()) + 1), fill, dtype=torch.long, device=values.device)
        return out.scatter_reduce(1, blk, torch.where(keep, values, fill).long(), reduce)

    def _first_block(self, where: Tensor, rank: Tensor) -> Tensor:
        """Long ``[B, 1]``: the first block holding a ``where`` position (``NEVER`` if none)."""
        return torch.where(where, self._block(rank), NEVER).amin(1, keepdim=True)

    def _check_monotone(self, ranks: Tensor) -> None:
        gen = ranks >= 1
        # max rank of each block must be below min rank of every later block
        lo = self._per_block(ranks, ranks, gen, NEVER, "amin")
        hi = self._per_block(ranks, ranks, gen, -1, "amax")
        later_min = lo.flip(1).cummin(1).values.flip(1)  # min rank over blocks >= c
        bad = hi[:, :-1] >= later_min[:, 1:]
        if bad.any():
            b, c = (int(v) for v in bad.nonzero()[0])
            raise RanksError(
                f"block_causal(block_size={self.block_size}) needs block-monotone ranks; row {b}: "
                f"block {c} has rank {int(hi[b, c])} >= a rank of a later block"
            )

    def passes(self, x: Tensor, ranks: Tensor, mask_id: int) -> Iterator[Stream]:
        self._check_monotone(ranks)
        gen = ranks >= 1
        # within-block step of each generated position: dense rank minus the block's first
        d = dense(ranks)
        first = self._per_block(ranks, d, gen, NEVER, "amin").gather(1, self._block(ranks))  # [B, L]
        w = torch.where(gen, d - first + 1, 0)  # 1.. inside each block
        for j in range(1, int(w.max()) + 1 if gen.any() else 1):
            xt = torch.where(w < j, x, torch.full_like(x, mask_id))
            yield self.noisy_stream(x, xt, ranks, w == j)

    def noisy_stream(self, x: Tensor, xt: Tensor, ranks: Tensor, targets: Tensor) -> Stream:
        """BD3-LM training input ``[x_0, x_t]``: clean blocks (block-causal) and the noisy
        copy ``xt`` of every block (bidirectional inside a block, sees earlier clean blocks).
        ``targets`` Bool[B, L]: positions whose prediction is read."""
        pos, blk = _logical(ranks >= 0), self._block(ranks)
        gen = ranks >= 1
        ck = given_key_rank(ranks, torch.where(gen, blk + 1, ranks.clamp(max=0)), self.prompt)
        clean = (ranks >= 0, {"tokens": x, "pos": pos, "k_rank": ck, "q_rank": ck + 1})
        noisy = (gen, {"tokens": xt, "pos": pos, "q_rank": blk + 1, "q_group": blk, "k_group": blk,
                       "out": torch.where(targets & gen, _positions(x), -1)})
        return pack(clean, noisy)

    def candidates(self, unknown: Tensor, rank: Tensor | None = None) -> Tensor:
        rank = torch.zeros_like(unknown, dtype=torch.long) if rank is None else rank
        return unknown & (self._block(rank) == self._first_block(unknown, rank))

    def _sets(self, rank: Tensor, step: int, cached: bool) -> tuple[Tensor, Tensor, Tensor]:
        """``(clean, noisy, cur)`` of step ``step``'s stream: the clean tokens (cached: the
        given ones at step 0, then a block the moment it is finished), the current block's
        generated positions (Bool[B, L] each) and the current block (Long[B, 1])."""
        blk = self._block(rank)
        unknown = rank == UNKNOWN
        cur = self._first_block(unknown, rank)  # [B, 1] first unfinished block
        gen_done = (rank >= 1) & (rank != UNKNOWN) & (blk < cur)  # generated, in finished blocks
        if cached:
            prev_cur = self._first_block(unknown | (rank == step), rank)  # the block current one step ago
            new = ((rank == 0) & (step == 0)) | (gen_done & (blk >= prev_cur))
        else:
            new = (rank == 0) | gen_done
        return new & unknown.any(1, keepdim=True), (blk == cur) & (rank != 0) & (rank >= 0), cur

    def step(self, tokens: Tensor, rank: Tensor, queries: Tensor, step: int, cached: bool, width: int | None = None) -> Stream:
        pos, blk = _logical(rank >= 0), self._block(rank)
        new, in_block, cur = self._sets(rank, step, cached)
        ck = given_key_rank(rank, torch.where(rank >= 1, blk + 1, 0), self.prompt)
        clean = (new, {"tokens": tokens, "pos": pos, "k_rank": ck, "q_rank": ck + 1})
        noisy = (in_block, {"tokens": tokens, "pos": pos, "q_rank": cur.expand_as(blk) + 1, "q_group": blk,
                            "k_group": blk, "out": torch.where(queries, _positions(tokens), -1)})
        s = pack(clean, noisy, width=width)
        s.n_append = new.sum(1) if cached else None
        return s

    def step_width(self, tokens: Tensor, rank: Tensor, queries: Tensor, step: int, cached: bool) -> int:
        new, in_block, _ = self._sets(rank, step, cached)
        return int((new.sum(1) + in_block.sum(1)).max())  # disjoint: finished blocks vs the current one


@register("attention", "bidirectional")
@dataclass(repr=False)
class Bidirectional(AttentionRule):
    """Bidirectional attention over ``x_t`` (MDM: MDLM, MD4, LLaDA). No exact cache:
    decoding recomputes the whole sequence every step; the exact likelihood takes one
    pass per set."""

    name = "bidirectional"
    cacheable = False

    def noisy_stream(self, xt: Tensor, keep: Tensor, targets: Tensor, width: int | None = None) -> Stream:
        """The denoiser's input: ``xt`` at the ``keep`` positions, predictions read at ``targets``."""
        col = _positions(xt)
        return pack((keep, {"tokens": xt, "pos": _logical(keep), "q_group": 0, "k_group": 0,
                            "out": torch.where(targets, col, -1)}), width=width)

    def passes(self, x: Tensor, ranks: Tensor, mask_id: int) -> Iterator[Stream]:
        d = dense(ranks)
        for j in range(1, int(d.max()) + 1 if (d > 0).any() else 1):
            xt = torch.where(d >= j, torch.full_like(x, mask_id), x)
            yield self.noisy_stream(xt, ranks >= 0, d == j)

    def step(self, tokens: Tensor, rank: Tensor, queries: Tensor, step: int, cached: bool, width: int | None = None) -> Stream:
        return self.noisy_stream(tokens, self._keep(rank), queries, width)

    def step_width(self, tokens: Tensor, rank: Tensor, queries: Tensor, step: int, cached: bool) -> int:
        return int(self._keep(rank).sum(1).max())

    @staticmethod
    def _keep(rank: Tensor) -> Tensor:
        return (rank >= 0) & (rank == UNKNOWN).any(1, keepdim=True)
