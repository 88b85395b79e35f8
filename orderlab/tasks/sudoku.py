"""Sudoku with a unique solution: clues given (rank 0), empty cells generated (rank 1).

``size`` n in {4, 6, 9} with boxes 2x2, 2x3 (2 rows, 3 columns) and 3x3. A sequence is
the grid in row-major order, one token per cell: digit ``d`` (1..n) is id ``d - 1``;
there are no separators (the layout is fixed) and no padding (``pad_id`` 0 is never used).

**Generation** (pure Python, bitmask backtracking): a complete grid by randomised
backtracking (the first solution of the empty grid with candidates tried in random
order), then clues are removed in a random order, each removal kept only if a solution
counter (backtracking with most-constrained-cell first, stopping at 2) still finds one
solution, until ``clues`` remain. Greedy removal stops at a *minimal* puzzle, whose clue
count varies; if a grid cannot get down to ``clues`` a fresh grid is tried, and after
``tries`` grids the request is an error naming the smallest count reached (``clues`` is
the difficulty knob: fewer clues, harder puzzles).

**Pools and splits.** Puzzle ``i`` of a split is a pure function of
``(size, clues, split, i)`` (a ``random.Random`` seeded with that string: sha512 seeding,
the same on every platform), built on
first use and cached in memory per process; each split is a pool of ``pool`` puzzles
and ``batch(n, split, seed)`` draws ``n`` distinct pool indices (with replacement when
``n > pool``). A grid belongs to the split ``hash_split`` of its *solution* (grids of
another split are redrawn), so the splits share no solution grid. Generation is the
cost (see ``docs/interfaces.md``): 9x9 pools of thousands take minutes.

**Layouts.** ``layout: grid`` (the default) is the above: one sequence of n*n cells, the
clues given in place. ``layout: d1`` is the layout of the d1 / UPO line of work (Zhao et
al. 2025, "d1"; Hong et al. 2026, UPO: 4x4 puzzles as a row-major string of digits with
``0`` for blanks, the model writing the whole solved grid after it): the puzzle (n*n
tokens, id ``0`` blank, digit ``d`` id ``d``; given, rank 0) then the solution (n*n
tokens, digit ``d`` id ``d``; every cell generated, rank 1, the clues copied too), so
``seq_len = 2 n²`` and ``vocab_size = n + 1``. Its ``metrics`` add ``empty_accuracy``:
the fraction of the puzzle's blank cells the answer gets right (d1's Sudoku reward).

**Metrics.** ``score`` ("solved") is 1.0 iff the prediction is a valid grid (every
row, column and box a permutation of the digits) that keeps the clues. Since every
generated puzzle has a unique solution, this is exactly "equals the reference solution";
``valid`` checks any grid, so puzzles from elsewhere (with several solutions) are
scored fairly. ``metrics`` adds ``token_accuracy`` (the cell accuracy on empty cells).
"""

from __future__ import annotations

import random

import torch
from torch import Tensor

from orderlab.registry import ConfigError, register
from orderlab.tasks.base import Task, hash_split, split_generator, split_index, token_accuracy

__all__ = ["Sudoku", "SudokuSolver", "BOXES"]

BOXES = {4: (2, 2), 6: (2, 3), 9: (3, 3)}  # size -> (box rows, box columns)
DEFAULT_CLUES = {4: 6, 6: 14, 9: 30}
LAYOUTS = ("grid", "d1")  # the sequence layouts (module docstring)  # greedy removal reaches 4-5, 9-12, 24-26
_POOLS: dict[tuple, dict[int, tuple[list[int], list[int]]]] = {}  # (size, clues, split) -> i -> (puzzle, solution)


class SudokuSolver:
    """Backtracking over bitmasks for an n x n grid (cells row-major, -1 empty).

    ``count(grid, limit)`` counts solutions up to ``limit``; ``fill(grid, rng)`` returns one
    solution, trying candidates in ``rng``'s random order (``None``: ascending).
    """

    def __init__(self, size: int):
        if size not in BOXES:
            raise ValueError(f"size must be one of {sorted(BOXES)}, got {size}")
        br, bc = BOXES[size]
        self.n = size
        self.full = (1 << size) - 1
        cells = range(size * size)
        self.row = [c // size for c in cells]
        self.col = [c % size for c in cells]
        self.box = [(c // size) // br * br + (c % size) // bc for c in cells]

    def _state(self, grid: list[int]) -> tuple[list[int], list[int], list[int], list[int]]:
        rows, cols, boxes = [0] * self.n, [0] * self.n, [0] * self.n
        empty = []
        for c, v in enumerate(grid):
            if v < 0:
                empty.append(c)
                continue
            bit = 1 << v
            r, k, b = self.row[c], self.col[c], self.box[c]
            if (rows[r] | cols[k] | boxes[b]) & bit:
                raise ValueError(f"sudoku grid has a repeated digit {v + 1} at cell {c}")
            rows[r] |= bit
            cols[k] |= bit
            boxes[b] |= bit
        return rows, cols, boxes, empty

    def _search(self, grid, rows, cols, boxes, empty, limit, rng, out) -> int:
        if not empty:
            out.append(list(grid))
            return 1
        # the most constrained empty cell (fewest candidates) keeps the tree small
        best, best_cand, best_n = -1, 0, self.n + 1
        for i, c in enumerate(empty):
            cand = self.full & ~(rows[self.row[c]] | cols[self.col[c]] | boxes[self.box[c]])
            k = cand.bit_count()
            if k < best_n:
                best, best_cand, best_n = i, cand, k
                if k <= 1:
                    break
        if best_n == 0:
            return 0
        c = empty[best]
        rest = empty[:best] + empty[best + 1 :]
        r, k, b = self.row[c], self.col[c], self.box[c]
        digits = [v for v in range(self.n) if best_cand >> v & 1]
        if rng is not None:
            rng.shuffle(digits)
        found = 0
        for v in digits:
            bit = 1 << v
            grid[c] = v
            rows[r] |= bit
            cols[k] |= bit
            boxes[b] |= bit
            found += self._search(grid, rows, cols, boxes, rest, limit - found, rng, out)
            rows[r] ^= bit
            cols[k] ^= bit
            boxes[b] ^= bit
            grid[c] = -1
            if found >= limit:
                break
        return found

    def count(self, grid: list[int], limit: int = 2) -> int:
        """Number of solutions of ``grid``, counted up to ``limit``."""
        rows, cols, boxes, empty = self._state(grid)
        return self._search(list(grid), rows, cols, boxes, empty, limit, None, [])

    def fill(self, grid: list[int], rng: random.Random | None = None) -> list[int] | None:
        """One solution of ``grid`` (random if ``rng``), or None if it has none."""
        rows, cols, boxes, empty = self._state(grid)
        out: list[list[int]] = []
        self._search(list(grid), rows, cols, boxes, empty, 1, rng, out)
        return out[0] if out else None


@register("task", "sudoku")
class Sudoku(Task):
    """n x n Sudoku (n in 4, 6, 9) with ``clues`` given cells and a unique solution."""

    metric = "solved"

    def __init__(self, size: int = 4, clues: int | None = None, pool: int = 10_000, tries: int = 20,
                 layout: str = "grid"):
        if layout not in LAYOUTS:
            raise ConfigError("layout", f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)} (d1: puzzle with "
                                        "0 for blanks, then the whole solution)")
        if size not in BOXES:
            raise ValueError(f"size must be one of {sorted(BOXES)} (boxes {BOXES}), got {size}")
        clues = DEFAULT_CLUES[size] if clues is None else clues
        if not 0 < clues <= size * size:
            raise ValueError(f"clues must be in 1..{size * size} for size {size}, got {clues}")
        if pool < 1 or tries < 1:
            raise ValueError(f"pool and tries must be >= 1, got pool={pool}, tries={tries}")
        self.size, self.clues, self.pool, self.tries = size, clues, pool, tries
        self.solver = SudokuSolver(size)
        self.vocab_size = size
        self.seq_len = size * size
        self.pad_id = 0
        self.eos_id = None
        br, bc = BOXES[size]
        cells = torch.arange(size * size).view(size, size)
        boxes = cells.view(size // br, br, size // bc, bc).permute(0, 2, 1, 3).reshape(size, size)
        self.units = torch.cat([cells, cells.T, boxes])  # [3n, n]: cells of every row, column, box
        self.layout = layout
        if layout == "d1":  # puzzle (0 blank, digit d = id d) then the solution (digit d = id d)
            self.vocab_size = size + 1
            self.seq_len = 2 * size * size

    def __repr__(self) -> str:
        d1 = ", layout=d1" if self.layout == "d1" else ""
        return f"Sudoku(size={self.size}, clues={self.clues}, pool={self.pool}{d1})"

    # ------------------------------------------------------------ generation
    def generate(self, split: str, index: int) -> tuple[list[int], list[int]]:
        """``(puzzle, solution)`` (lists of n*n ids, -1 empty) of pool entry ``index`` of ``split``.

        A pure function of ``(size, clues, split, index)``; cached per process.
        """
        want = split_index(split)
        cache = _POOLS.setdefault((self.size, self.clues, split), {})
        if index in cache:
            return cache[index]
        rng = random.Random(f"sudoku:{self.size}:{self.clues}:{split}:{index}")
        cells = self.size * self.size
        least = cells
        for _ in range(self.tries):
            solution = self.solver.fill([-1] * cells, rng)
            while int(hash_split(torch.tensor([solution]))) != want:  # a solution grid of this split
                solution = self.solver.fill([-1] * cells, rng)
            puzzle, left = self._remove_clues(solution, rng)
            if left == self.clues:
                cache[index] = (puzzle, solution)
                return puzzle, solution
            least = min(least, left)
        raise ValueError(
            f"sudoku size={self.size}: no puzzle with a unique solution and clues={self.clues} in "
            f"{self.tries} grids (greedy removal got down to {least} clues); raise clues or tries"
        )

    def _remove_clues(self, solution: list[int], rng: random.Random) -> tuple[list[int], int]:
        """``(puzzle, clues left)``: clues removed in random order while the solution stays unique,
        down to ``self.clues`` or to a minimal puzzle (no clue removable), whichever comes first."""
        puzzle = list(solution)
        left = len(puzzle)
        order = list(range(len(puzzle)))
        rng.shuffle(order)
        for c in order:
            if left == self.clues:
                break
            v, puzzle[c] = puzzle[c], -1
            if self.solver.count(puzzle, limit=2) == 1:
                left -= 1
            else:
                puzzle[c] = v
        return puzzle, left

    def encode_grids(self, puzzles: list[list[int]], solutions: list[list[int]]) -> tuple[Tensor, Tensor]:
        """``(tokens, ranks)`` Long ``[B, seq_len]``. Grid layout: solutions as tokens, rank 0
        on clues, 1 on empty cells. d1 layout: the puzzle (0 blank, digits 1..n; rank 0),
        then the solution (digits 1..n; rank 1)."""
        cells = self.size * self.size
        solution = torch.tensor(solutions, dtype=torch.long).view(-1, cells)
        puzzle = torch.tensor(puzzles, dtype=torch.long).view(-1, cells)
        if self.layout == "d1":
            tokens = torch.cat([puzzle + 1, solution + 1], dim=1)  # -1 (blank) -> 0, digit d (id d-1) -> d
            ranks = torch.cat([torch.zeros_like(puzzle), torch.ones_like(solution)], dim=1)
            return tokens, ranks
        return solution, (puzzle < 0).long()

    def _grids(self, pred: Tensor, tokens: Tensor, ranks: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(pred, tokens, ranks)`` as grid-layout tensors ``[B, n*n]``: the d1 layout's
        answer half in grid ids (digit d -> d - 1), its ranks 0 on the puzzle's clues (the
        answer must keep them) and 1 on its blanks; the grid layout as it is."""
        if self.layout != "d1":
            return pred, tokens, ranks
        if pred.shape != tokens.shape or pred.dim() != 2 or pred.shape[-1] != self.seq_len:
            raise ValueError(f"pred and tokens must both be [B, {self.seq_len}], got {tuple(pred.shape)} and "
                             f"{tuple(tokens.shape)}")
        cells = self.size * self.size
        puzzle = tokens[:, :cells]
        kept = ((pred[:, :cells].to(tokens.device) == puzzle) | (ranks[:, :cells] != 0)).all(1)  # the prompt unchanged
        grid_pred = torch.where(kept[:, None], pred[:, cells:].to(tokens.device) - 1, -1)  # a changed prompt: invalid
        return grid_pred, tokens[:, cells:] - 1, (puzzle == 0).long()

    # ------------------------------------------------------------ the contract
    def batch(self, n: int, split: str = "train", seed: int = 0) -> tuple[Tensor, Tensor]:
        g = split_generator(split, seed)
        if n <= self.pool:
            idx = torch.randperm(self.pool, generator=g)[:n]
        else:
            idx = torch.randint(0, self.pool, (n,), generator=g)
        pairs = [self.generate(split, int(i)) for i in idx]
        return self.encode_grids([p for p, _ in pairs], [s for _, s in pairs])

    def valid(self, pred: Tensor, tokens: Tensor, ranks: Tensor) -> Tensor:
        """Bool ``[B]``: ``pred`` is a complete valid grid that keeps the clues (rank 0) of
        ``tokens`` (d1 layout: the answer half keeps the puzzle's clues, the puzzle is kept)."""
        pred, tokens, ranks = self._grids(pred, tokens, ranks)
        if pred.shape != tokens.shape or pred.shape[-1] != self.size * self.size or pred.dim() != 2:
            raise ValueError(
                f"pred and tokens must both be [B, {self.seq_len}], got {tuple(pred.shape)} and {tuple(tokens.shape)}"
            )
        pred = pred.to(tokens.device)
        cells = self.size * self.size
        if pred.shape[-1] != cells:
            raise ValueError(f"pred and tokens must both be [B, {cells}], got {tuple(pred.shape)}")
        units = pred[:, self.units.to(pred.device)]  # [B, 3n, n]
        digits = torch.arange(self.size, device=pred.device)
        perm = (units.sort(dim=2).values == digits).all(dim=2).all(dim=1)  # every unit holds each digit once
        clues = ((pred == tokens) | (ranks != 0)).all(dim=1)
        return perm & clues

    def score(self, pred: Tensor, tokens: Tensor, ranks: Tensor) -> Tensor:
        """1.0 iff ``pred`` solves the puzzle (``valid``; = the reference, the solution being unique)."""
        return self.valid(pred, tokens, ranks).float()

    def metrics(self, pred: Tensor, tokens: Tensor, ranks: Tensor) -> dict[str, Tensor]:
        """``solved``, ``token_accuracy``; the d1 layout adds ``empty_accuracy`` (the share
        of the puzzle's blank cells right in the answer: d1's reward)."""
        out = super().metrics(pred, tokens, ranks)
        if self.layout == "d1":
            out["empty_accuracy"] = token_accuracy(*self._grids(pred, tokens, ranks))
        return out

    def token_freqs(self) -> Tensor:
        """Digit frequencies of the train grids: exactly uniform, every digit fills n cells of
        a grid (d1 layout: blanks and digits of puzzle and solution, counted)."""
        if self.layout == "d1":
            return self._sampled_freqs(1024)
        return torch.full((self.vocab_size,), 1.0 / self.vocab_size)

    def render(self, tokens: Tensor) -> str:
        """The grid, one row per line, boxes separated by ``|`` and ``-``; mask (and others) as ``.``."""
        if self.layout == "d1":  # the puzzle string as d1 writes it, then the answer grid
            cells = self.size * self.size
            head = "".join(str(v) if 0 <= v <= self.size else "." for v in tokens[:cells].tolist())
            return f"{head}\n" + self._render_grid(tokens[cells:] - 1)
        return self._render_grid(tokens)

    def _render_grid(self, tokens: Tensor) -> str:
        br, bc = BOXES[self.size]
        t = tokens.tolist()
        lines = []
        for r in range(self.size):
            if r and r % br == 0:
                lines.append("-" * (self.size + self.size // bc - 1))
            row = "".join(str(v + 1) if 0 <= v < self.size else "." for v in t[r * self.size : (r + 1) * self.size])
            lines.append("|".join(row[j : j + bc] for j in range(0, self.size, bc)))
        return "\n".join(lines)

