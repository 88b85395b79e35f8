import random

import pytest
import torch

from orderlab import ranks as R
from orderlab.builder import build
from orderlab.registry import ConfigError
from orderlab.tasks import Sudoku, SudokuSolver, hash_split
from orderlab.tasks import sudoku as sudoku_module


def is_valid_grid(grid, size):
    """Reference check, independent of Sudoku.valid: rows, columns and boxes by slicing."""
    br, bc = sudoku_module.BOXES[size]
    rows = [grid[r * size : (r + 1) * size] for r in range(size)]
    units = rows + [[row[c] for row in rows] for c in range(size)]
    units += [
        [rows[r][c] for r in range(R0, R0 + br) for c in range(C0, C0 + bc)]
        for R0 in range(0, size, br)
        for C0 in range(0, size, bc)
    ]
    return all(sorted(u) == list(range(size)) for u in units)


def test_solver_counts_all_288_four_by_four_grids():
    # the number of 4x4 Sudoku grids is 288 (a known enumeration)
    assert SudokuSolver(4).count([-1] * 16, limit=10_000) == 288
    assert SudokuSolver(4).count([-1] * 16, limit=5) == 5  # stops at the limit


@pytest.mark.parametrize("size", [4, 6, 9])
def test_solver_fill_gives_valid_random_grids(size):
    s = SudokuSolver(size)
    a = s.fill([-1] * size * size, random.Random(0))
    b = s.fill([-1] * size * size, random.Random(1))
    assert is_valid_grid(a, size) and is_valid_grid(b, size) and a != b
    assert s.fill([-1] * size * size) == s.fill([-1] * size * size)  # no rng: deterministic
    bad = [-1] * size * size
    bad[0] = bad[1] = 0
    with pytest.raises(ValueError, match="repeated digit 1"):
        s.count(bad)


@pytest.mark.parametrize("size,clues,n", [(4, 5, 8), (6, 14, 4), (9, 30, 1)])
def test_generated_puzzles_have_a_unique_solution_and_the_clue_count(size, clues, n):
    t = Sudoku(size, clues=clues, pool=50)
    x, r = t.batch(n, "test", seed=0)
    assert x.shape == r.shape == (n, size * size) and t.vocab_size == size and t.seq_len == size * size
    R.validate(r, x, mask_id=t.mask_id)
    assert ((r == 0).sum(1) == clues).all() and set(r.unique().tolist()) == {0, 1}
    for row, rk in zip(x.tolist(), r.tolist()):
        assert is_valid_grid(row, size)
        puzzle = [v if k == 0 else -1 for v, k in zip(row, rk)]
        assert t.solver.count(puzzle, limit=2) == 1
        assert t.solver.fill(puzzle) == row


def test_unreachable_clue_count_is_a_clear_error():
    with pytest.raises(ValueError, match=r"clues=3 .*got down to 4 clues"):  # 4 is the 4x4 minimum
        Sudoku(4, clues=3, tries=3).generate("train", 0)
    with pytest.raises(ValueError, match="size must be one of"):
        Sudoku(5)
    with pytest.raises(ValueError, match="clues must be in 1..16"):
        Sudoku(4, clues=17)


def test_splits_disjoint_by_solution_grid():
    t = Sudoku(4, clues=6, pool=60)
    seen = {}
    for k, split in enumerate(("train", "valid", "test")):
        x, _ = t.batch(60, split, seed=0)
        assert (hash_split(x) == k).all()
        seen[split] = {tuple(g) for g in x.tolist()}
    assert not (seen["train"] & seen["valid"] or seen["train"] & seen["test"] or seen["valid"] & seen["test"])
    assert len(seen["test"]) > 5  # several distinct grids, not one grid repeated


def test_pool_entries_are_pure_functions_and_batches_deterministic():
    t = Sudoku(6, clues=14, pool=20)
    x1, r1 = t.batch(5, "valid", seed=3)
    entry = t.generate("valid", 7)
    sudoku_module._POOLS.clear()  # rebuilt from scratch, in another order
    assert Sudoku(6, clues=14, pool=20).generate("valid", 7) == entry
    x2, r2 = Sudoku(6, clues=14, pool=20).batch(5, "valid", seed=3)
    assert torch.equal(x1, x2) and torch.equal(r1, r2)
    x3, _ = t.batch(5, "valid", seed=4)
    assert not torch.equal(x1, x3)
    assert len({tuple(g) for g in t.batch(20, "valid", seed=0)[0].tolist()}) == 20  # n <= pool: distinct entries
    assert t.batch(25, "valid", seed=0)[0].shape == (25, 36)  # n > pool: with replacement


def test_valid_score_and_metrics():
    t = Sudoku(4, clues=6, pool=10)
    x, r = t.batch(3, "train", seed=0)
    pred = x.clone()
    empty = (r[1] == 1).nonzero().flatten()
    pred[1, empty[0]] = (pred[1, empty[0]] + 1) % 4  # one wrong cell
    pred[2] = t.mask_id  # nothing decoded
    m = t.metrics(pred, x, r)
    assert set(m) == {"solved", "token_accuracy"} and m["solved"].tolist() == [1.0, 0.0, 0.0]
    assert torch.allclose(m["token_accuracy"], torch.tensor([1.0, 9 / 10, 0.0]))
    # with no clues, any valid grid solves the "puzzle", not only the reference
    other = torch.tensor([SudokuSolver(4).fill([-1] * 16, random.Random(5))])
    assert not torch.equal(other[0], x[0])
    no_clues = torch.ones_like(r[:1])
    assert t.score(other, x[:1], no_clues).tolist() == [1.0]
    assert t.score(other, x[:1], r[:1]).tolist() == [0.0]  # it breaks the clues of the real puzzle
    # a grid keeping the clues but with a repeated digit in a box (rows and columns fine) is invalid
    latin = torch.tensor([[0, 1, 2, 3, 1, 2, 3, 0, 2, 3, 0, 1, 3, 0, 1, 2]])
    assert t.score(latin, latin, no_clues).tolist() == [0.0]
    with pytest.raises(ValueError, match=r"\[B, 16\]"):
        t.score(pred[:, :15], x, r)


def test_render_freqs_and_registry():
    t = build("task", {"name": "sudoku", "size": 6, "clues": 20, "pool": 5})
    assert isinstance(t, Sudoku) and (t.size, t.clues, t.pool) == (6, 20, 5)
    assert Sudoku(9).clues == 30 and Sudoku(4).clues == 6 and Sudoku(6).clues == 14
    s = Sudoku(4)
    grid = torch.tensor([0, 1, 2, 3, 2, 3, 0, 1, 1, 0, 3, 2, 3, 2, 1, 0])
    grid[5] = s.mask_id
    assert s.render(grid) == "12|34\n3.|12\n-----\n21|43\n43|21"
    assert torch.allclose(s.token_freqs(), torch.full((4,), 0.25))
    x, _ = Sudoku(6, clues=14, pool=4).batch(4, "train", seed=0)
    assert torch.equal(torch.bincount(x.flatten(), minlength=6), torch.full((6,), 4 * 6))  # uniform, as claimed


def test_d1_layout_puzzle_with_zero_blanks_then_the_whole_solution():
    """layout=d1 (d1 / UPO): row-major puzzle, 0 for blanks (given), then the solved grid,
    every cell generated; scored on the answer half, the prompt kept."""
    grid, d1 = Sudoku(4, layout="grid"), Sudoku(4, layout="d1")
    g, gr = grid.batch(8, "test", seed=0)
    x, r = d1.batch(8, "test", seed=0)
    assert x.shape == (8, 32) and d1.vocab_size == 5 and d1.seq_len == 32
    assert torch.equal(x[:, 16:], g + 1)  # the same puzzles: digits 1..4 in the answer
    assert torch.equal(x[:, :16] == 0, gr == 1) and torch.equal(x[:, :16][gr == 0], g[gr == 0] + 1)
    assert (r[:, :16] == 0).all() and (r[:, 16:] == 1).all()
    assert d1.score(x, x, r).eq(1).all() and d1.metrics(x, x, r)["empty_accuracy"].eq(1).all()
    bad = x.clone()
    clue = int((x[0, :16] != 0).nonzero()[0])
    bad[0, 16 + clue] = bad[0, 16 + clue] % 4 + 1  # a clue changed in the answer
    blank = int((x[1, :16] == 0).nonzero()[0])
    bad[1, 16 + blank] = bad[1, 16 + blank] % 4 + 1  # a blank filled wrong
    bad[2, 16 + clue] = 0  # the blank id is not a digit
    s = d1.score(bad, x, r)
    assert s.tolist()[:3] == [0.0, 0.0, 0.0] and s[3:].eq(1).all()
    m = d1.metrics(bad, x, r)["empty_accuracy"]
    assert m[0] == 1 and m[1] == 1 - 1 / int((x[1, :16] == 0).sum())  # clues do not count in empty_accuracy
    assert d1.render(x[0]).splitlines()[0] == "".join(str(v) for v in x[0, :16].tolist())
    with pytest.raises(ConfigError) as e:
        Sudoku(4, layout="d2")
    assert e.value.path == "layout"
