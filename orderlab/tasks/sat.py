"""Random k-SAT with a planted solution: the clauses given, an assignment generated.

An instance has ``variables`` boolean variables and ``clauses`` clauses of ``k`` literals
on distinct variables. **Planted model** (as Montanari et al., arXiv 2603.20589, use it
to study decode orders): draw an assignment ``σ`` uniformly, then each clause
independently and uniformly among the clauses ``σ`` satisfies (its ``k`` variables
uniformly, its signs uniformly among the ``2^k − 1`` patterns ``σ`` satisfies, by
redrawing the signs of a violated clause). So every instance is satisfiable by
construction, and the density ``clauses / variables`` is the hardness knob: around
4.27 for 3-SAT most variables are forced, below it many assignments satisfy an instance.

Two layouts share the planting, the metric and the propagation order; each is its own
task: ``sat`` (:class:`PlantedSAT`, below) and ``sat_grid`` (:class:`PlantedSATGrid`:
one row per variable, its value then its cell in every clause, the literals naming their
clause). A small denoiser stayed at chance (1.00 bits per value) on ``sat`` for 1500
steps; ``sat_grid`` puts a variable's clauses at fixed offsets after its value.

Layout of ``sat`` (``L = clauses·k + 2·variables``)::

    [l_11 .. l_1k] .. [l_m1 .. l_mk]   v_1 a_1  v_2 a_2 ..  v_n a_n

The clauses (literals sorted by variable inside a clause) and the variable markers
``v_j`` are given (rank 0); the values ``a_j`` are generated (rank 1). The marker before
each value names its variable, so a query finds the clauses of its variable through the
marker beside it, not through its absolute position. Tokens: ``0`` false, ``1`` true,
``2 + j`` the marker of variable ``j``, ``2 + n + 2j`` the literal ``x_j`` and
``2 + n + 2j + 1`` the literal ``¬x_j``. The reference tokens hold ``σ``; no padding
(``pad_id`` 0 is never a padding position).

**Splits** hash the clause list (``hash_split`` of the prompt), so test instances are
never seen in training; ``batch(n, split, seed)`` is deterministic in ``(split, seed)``
(``sample_split``: candidates drawn from the generator of ``(seed, split)``, kept when
their prompt hashes to the split).

**Metric** ``satisfied``: 1.0 iff the generated values are all booleans, the given
tokens are kept and the assignment satisfies every clause: any satisfying assignment
counts, not only the planted one (instances below the threshold have many).
``token_accuracy`` compares with the planted ``σ``. ``propagation_ranks`` gives the order
a unit-propagation solver follows (an order with a known rationale: every revealed value
is implied by the clauses and the values before it, except at branch steps).
"""

from __future__ import annotations

import torch
from torch import Tensor

from orderlab.registry import ConfigError, register
from orderlab.tasks.base import Task, sample_split, token_accuracy

__all__ = ["PlantedSAT", "PlantedSATGrid"]


@register("task", "sat")
class PlantedSAT(Task):
    """Random planted k-SAT: ``clauses`` clauses of ``k`` literals over ``variables`` variables."""

    metric = "satisfied"
    FALSE, TRUE = 0, 1

    def __init__(self, variables: int = 8, clauses: int = 24, k: int = 3):
        if not isinstance(k, int) or k < 2:
            raise ConfigError("k", f"literals per clause must be an integer >= 2, got {k!r}")
        if not isinstance(variables, int) or variables < k:
            raise ConfigError("variables", f"must be an integer >= k = {k} (a clause has k distinct variables), "
                                           f"got {variables!r}")
        if not isinstance(clauses, int) or clauses < 1:
            raise ConfigError("clauses", f"must be an integer >= 1, got {clauses!r}")
        self.n, self.m, self.k = variables, clauses, k
        self.pad_id = 0
        self.eos_id = None
        self._layout()

    def _layout(self) -> None:
        """Set the layout's ``vocab_size``, ``seq_len``, ``value_pos`` (Long[n]: where the
        values sit) and ``clause_pos`` (Long: the positions encoding the clauses, the key
        of the splits)."""
        self.vocab_size = 2 + 3 * self.n
        self.seq_len = self.m * self.k + 2 * self.n
        self.prompt_len = self.m * self.k
        j = torch.arange(self.n)
        self.marker_pos = self.prompt_len + 2 * j  # Long[n]
        self.value_pos = self.prompt_len + 2 * j + 1  # Long[n]
        self.clause_pos = torch.arange(self.prompt_len)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(variables={self.n}, clauses={self.m}, k={self.k})"

    # ------------------------------------------------------------ generation
    def plant(self, count: int, g: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """``(sigma Long[B, n], var Long[B, m, k], neg Long[B, m, k])``: ``count`` planted
        instances drawn from ``g`` (``neg`` 1 on negated literals); every clause satisfied."""
        n, m, k = self.n, self.m, self.k
        sigma = torch.randint(0, 2, (count, n), generator=g)
        var = torch.rand(count, m, n, generator=g).argsort(-1)[..., :k].sort(-1).values  # k distinct, sorted
        neg = torch.randint(0, 2, (count, m, k), generator=g)
        for _ in range(10_000):  # redraw the signs of violated clauses: uniform over satisfying patterns
            bad = self.violated(sigma, var, neg)  # [B, m]
            if not bad.any():
                return sigma, var, neg
            neg = torch.where(bad[..., None], torch.randint(0, 2, (count, m, k), generator=g), neg)
        raise RuntimeError("planted k-SAT: sign redraws did not terminate")  # pragma: no cover (p < 1e-500)

    @staticmethod
    def violated(sigma: Tensor, var: Tensor, neg: Tensor) -> Tensor:
        """Bool ``[B, m]``: clauses that ``sigma Long[B, n]`` violates (every literal false)."""
        value = sigma.gather(1, var.flatten(1)).view_as(var)  # [B, m, k]
        return (value == neg).all(-1)  # literal true iff value != neg

    def encode(self, sigma: Tensor, var: Tensor, neg: Tensor) -> Tensor:
        """Long ``[B, L]``: the tokens of instances ``var``/``neg`` with values ``sigma``."""
        B = sigma.shape[0]
        lits = (2 + self.n + 2 * var + neg).flatten(1)  # [B, m·k]
        pairs = torch.stack([(2 + torch.arange(self.n)).expand(B, -1), sigma], dim=2).flatten(1)  # [B, 2n]
        return torch.cat([lits, pairs], dim=1)

    def decode_clauses(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """``(var, neg)`` Long ``[B, m, k]`` read from the prompt of ``tokens``."""
        lits = tokens[:, : self.prompt_len].view(-1, self.m, self.k) - (2 + self.n)
        if (lits < 0).any() or (lits >= 2 * self.n).any():
            raise ValueError("tokens hold a non-literal in the clause part of the sequence")
        return lits // 2, lits % 2

    def _draw(self, count: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        tokens = self.encode(*self.plant(count, g))
        return tokens, tokens[:, self.clause_pos]

    def _ranks(self, count: int) -> Tensor:
        ranks = torch.zeros(count, self.seq_len, dtype=torch.long)
        ranks[:, self.value_pos] = 1
        return ranks

    # ------------------------------------------------------------ the contract
    def batch(self, n: int, split: str = "train", seed: int = 0) -> tuple[Tensor, Tensor]:
        tokens = sample_split(self._draw, n, split, seed, what="planted k-SAT instances")
        return tokens, self._ranks(tokens.shape[0])

    def satisfies(self, pred: Tensor, tokens: Tensor, ranks: Tensor) -> Tensor:
        """Bool ``[B]``: ``pred``'s values are booleans satisfying every clause of ``tokens``
        (the reference's prompt) and ``pred`` keeps every given token."""
        if pred.shape != tokens.shape or pred.dim() != 2 or pred.shape[1] != self.seq_len:
            raise ValueError(f"pred and tokens must both be [B, {self.seq_len}], got {tuple(pred.shape)} and "
                             f"{tuple(tokens.shape)}")
        pred = pred.to(tokens.device)
        values = pred[:, self.value_pos.to(pred.device)]  # [B, n]
        boolean = ((values == self.FALSE) | (values == self.TRUE)).all(1)
        var, neg = self.decode_clauses(tokens)
        ok = ~self.violated(values.clamp(0, 1), var, neg).any(1)
        kept = ((pred == tokens) | (ranks != 0)).all(1)
        return boolean & ok & kept

    def score(self, pred: Tensor, tokens: Tensor, ranks: Tensor) -> Tensor:
        """1.0 iff ``pred`` is a satisfying assignment (:meth:`satisfies`), planted or not."""
        return self.satisfies(pred, tokens, ranks).float()

    def metrics(self, pred: Tensor, tokens: Tensor, ranks: Tensor) -> dict[str, Tensor]:
        """``satisfied``, ``token_accuracy`` (agreement with the planted σ) and ``planted``
        (1.0 iff the prediction is exactly σ)."""
        acc = token_accuracy(pred, tokens, ranks)
        return {self.metric: self.score(pred, tokens, ranks), "token_accuracy": acc, "planted": (acc == 1).float()}

    def token_freqs(self) -> Tensor:
        """Frequencies over a fixed sample of 2**12 train sequences."""
        return self._sampled_freqs(1 << 12)

    def render(self, tokens: Tensor) -> str:
        """``"(x1 ∨ ¬x3 ∨ x4) ∧ ... => 10110010"``; unknown values as ``?``."""
        var, neg = self.decode_clauses(tokens[None])
        clauses = ["(" + " ∨ ".join(f"{'¬' if s else ''}x{j + 1}" for j, s in zip(v, g)) + ")"
                   for v, g in zip(var[0].tolist(), neg[0].tolist())]
        t = tokens.tolist()
        values = "".join(str(t[p]) if t[p] in (0, 1) else "?" for p in self.value_pos.tolist())
        return " ∧ ".join(clauses) + " => " + values

    # ------------------------------------------------------------ an order with a rationale
    def propagation_ranks(self, tokens: Tensor) -> Tensor:
        """Long ``[B, L]``: the order of unit propagation on the planted σ of ``tokens``.

        Step ``s`` reveals every unrevealed variable that some clause forces (all its other
        literals false under the values revealed so far); when none is forced, the
        unrevealed variable occurring in the most clauses not yet satisfied (a branch
        step; the lowest index on ties). Given positions get rank 0."""
        var, neg = self.decode_clauses(tokens)
        sigma = tokens[:, self.value_pos.to(tokens.device)]
        B = tokens.shape[0]
        known = torch.zeros(B, self.n, dtype=torch.bool, device=tokens.device)
        step = torch.zeros(B, self.n, dtype=torch.long, device=tokens.device)
        value = sigma.gather(1, var.flatten(1)).view_as(var)  # [B, m, k]
        true = value != neg  # literal true under σ
        rows = torch.arange(B, device=tokens.device)
        for s in range(1, self.n + 1):
            if known.all():
                break
            kv = known.gather(1, var.flatten(1)).view_as(var)  # [B, m, k]
            satisfied = (kv & true).any(-1)  # [B, m]
            open_lits = ~kv  # unknown literals
            unit = ~satisfied & (open_lits.sum(-1) == 1)  # [B, m]: one unknown literal, others false
            hit = (open_lits & unit[..., None]).flatten(1)  # [B, m·k]
            forced = torch.zeros(B, self.n, dtype=torch.long, device=tokens.device).scatter_add(
                1, var.flatten(1), hit.long()) > 0
            forced &= ~known
            # branch where nothing is forced: the unknown variable in most unsatisfied clauses
            counts = torch.zeros(B, self.n, dtype=torch.long, device=tokens.device).scatter_add(
                1, var.flatten(1), (open_lits & ~satisfied[..., None]).flatten(1).long())
            counts = torch.where(known, -1, counts)
            branch = torch.zeros_like(known)
            branch[rows, counts.argmax(1)] = True
            branch &= ~known
            pick = torch.where(forced.any(1, keepdim=True), forced, branch)
            step = torch.where(pick, s, step)
            known |= pick
        ranks = torch.zeros_like(tokens)
        ranks[:, self.value_pos.to(tokens.device)] = step
        return ranks


@register("task", "sat_grid")
class PlantedSATGrid(PlantedSAT):
    """Planted k-SAT in the variable-major incidence layout (``L = variables·(clauses + 1)``).

    One row per variable: its value, then its cell in every clause, so a value reads its
    clauses at fixed offsets ``1..m`` after it (local, like a Sudoku cell reads its row)::

        a_1 s_11 .. s_1m   a_2 s_21 .. s_2m   ..   a_n s_n1 .. s_nm

    ``s_jc`` is ``2`` (absent: x_j not in clause c), ``3 + 2c`` (x_j in clause c) or
    ``4 + 2c`` (¬x_j in clause c); values are ``0``/``1`` and generated (rank 1), cells
    given (rank 0). A literal names its clause, so the literals of one clause find each
    other by content across rows, and a literal finds its variable's value at offset
    ``-(c + 1)`` from its clause index: the model has rotary positions only, no absolute
    ones, so a link by periodic offset (the same clause in every row, ``m + 1`` apart) would
    be hard to learn. Unit propagation is three hops: a literal reads its value, a
    clause's literals read each other, a value reads its literals.
    """

    ABSENT = 2

    def __init__(self, variables: int = 6, clauses: int = 15, k: int = 3):
        super().__init__(variables=variables, clauses=clauses, k=k)

    def _layout(self) -> None:
        n, m = self.n, self.m
        self.vocab_size = 3 + 2 * m
        self.seq_len = n * (m + 1)
        self.value_pos = torch.arange(n) * (m + 1)  # Long[n]
        cells = torch.arange(self.seq_len).view(n, m + 1)[:, 1:]  # [n, m]: cell (j, c)
        self.cell_pos = cells
        self.clause_pos = cells.flatten()

    def encode(self, sigma: Tensor, var: Tensor, neg: Tensor) -> Tensor:
        B, n, m, k = sigma.shape[0], self.n, self.m, self.k
        clause = torch.arange(m).view(1, m, 1).expand(B, m, k)
        cells = torch.full((B, m, n), self.ABSENT, dtype=torch.long)
        cells.scatter_(2, var, 3 + 2 * clause + neg)  # [B, m, n]: (c, j)
        rows = torch.cat([sigma[:, :, None], cells.transpose(1, 2)], dim=2)  # [B, n, m + 1]
        return rows.flatten(1)

    def decode_clauses(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        cells = tokens[:, self.cell_pos.to(tokens.device)].transpose(1, 2)  # [B, m, n]: (c, j)
        present = cells != self.ABSENT
        lit = cells - 3 - 2 * torch.arange(self.m, device=tokens.device)[:, None]  # 0 x_j, 1 ¬x_j
        if (present & ((lit < 0) | (lit > 1))).any() or (present.sum(-1) != self.k).any():
            raise ValueError(f"tokens hold a cell that is not absent or a literal of its clause, or a clause "
                             f"without exactly k = {self.k} literals")
        var = present.long().argsort(dim=-1, descending=True, stable=True)[..., : self.k].sort(-1).values  # [B, m, k]
        return var, lit.gather(2, var)
