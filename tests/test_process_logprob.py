"""Order probabilities of processes (``Process.log_prob``) against enumeration and sampling."""

import itertools
import math

import pytest
import torch

import orderlab.processes as P
from orderlab import ranks as R
from orderlab.processes.base import Process
from orderlab.builder import build

from enumerate_orders import all_orders  # tests/enumerate_orders.py

SPECS = {
    "linear": "linear",
    "cosine": "cosine",
    "loglinear": {"name": "loglinear", "eps": 0.2},
    "polynomial": {"name": "polynomial", "power": 0.5},
    "quench": "quench",
    "sliding_window": {"name": "sliding_window", "window": 3},
    "staggered1": {"name": "staggered", "d": 1},
    "staggered2": {"name": "staggered", "d": 2},
    "blockwise": {"name": "blockwise", "block_size": 2},
    "blockwise_staggered": {"name": "blockwise", "block_size": 3, "inner": {"name": "staggered", "d": 1}},
    "mixture": {"name": "mixture", "processes": ["cosine", "quench"], "weights": [0.3, 0.7]},
    "learned_position": {"name": "learned_position", "power_init": [0.4, 1.0, 3.0, 0.7, 2.0, 1.5]},
}
# a row with a given position and padding: the order is over the positions with rank >= 1
TEMPLATE = torch.tensor([0, 1, 1, -1, 1, 1])


def gen(seed=0):
    return torch.Generator().manual_seed(seed)




def frequencies(samples, table):
    """Empirical frequency of each row of ``table`` among ``samples``."""
    eq = (samples[:, None, :] == table[None]).all(-1)  # [N, n]
    assert eq.any(1).all(), "a sampled order is missing from the enumeration"
    return eq.double().mean(0)


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("steps", [None, 3])
def test_log_prob_sums_to_one_and_matches_sampling(name, steps):
    p = build("process", SPECS[name], context={"max_len": 6})  # learned_position's capacity
    table = all_orders(TEMPLATE, multi=steps is not None)
    with torch.no_grad():
        lp = p.log_prob(table, steps=steps)
    assert lp.shape == (len(table),) and lp.dtype == torch.float64
    prob = lp.exp()
    exact = steps is not None or isinstance(p, (P.Flat, P.Quench, P.Blockwise, P.Mixture))
    assert prob.sum().item() == pytest.approx(1.0, abs=1e-12 if exact else 1e-5)
    N = 40000
    with torch.no_grad():
        s = p.sample_ranks(TEMPLATE.repeat(N, 1), generator=gen(1), steps=steps)
    freq = frequencies(s, table)
    tol = 5 * (prob * (1 - prob) / N).sqrt() + 1e-3
    assert ((freq - prob).abs() <= tol).all(), (freq - prob).abs().max()


def test_ties_without_steps_have_probability_zero():
    r = torch.tensor([[1, 1, 2], [1, 2, 3]])
    for p in (P.Linear(), P.Quench(), P.Staggered(d=1), P.Blockwise(2)):
        lp = p.log_prob(r)
        assert lp[0].item() == -math.inf and lp[1].item() > -math.inf


def test_closed_forms():
    r = P.Cosine().sample_ranks(torch.tensor([[0, 1, 1, 1, 1, -1]] * 3), generator=gen(0))
    assert torch.allclose(P.Cosine().log_prob(r), torch.full((3,), -math.log(24), dtype=torch.float64))
    q = P.Quench().log_prob(torch.tensor([[0, 1, 2, -1, 3], [0, 2, 1, -1, 3]]))
    assert q.tolist() == [0.0, -math.inf]
    # nothing to generate: the empty order, probability 1
    assert P.Staggered(d=1).log_prob(torch.tensor([[0, -1, 0]])).tolist() == [0.0]


def test_generic_chain_agrees_with_closed_forms():
    """The quadrature of ``Process.log_prob`` on processes whose answer is known."""
    table = all_orders(TEMPLATE)
    for p in (P.Linear(), P.Polynomial(0.5), P.Blockwise(2, P.Cosine())):
        generic = Process.log_prob(p, table)
        torch.testing.assert_close(generic, p.log_prob(table), rtol=0, atol=2e-5)
    # quench: probability 1 for left to right, 0 (up to float64 rounding of α at the
    # shared window edges) for every other order
    g = Process.log_prob(P.Quench(), table)
    torch.testing.assert_close(g.exp(), (P.Quench().log_prob(table) == 0).double(), rtol=0, atol=1e-13)


def test_quadrature_bracket_and_refinement():
    """``log_prob`` lies in its rigorous bracket; refining the grid changes it by < 1e-4 (relative)."""
    p = P.Staggered(d=2)
    table = all_orders(TEMPLATE)
    lo, hi = p.log_prob_bounds(table)
    lp = p.log_prob(table)
    assert ((lo <= lp + 1e-12) & (lp <= hi + 1e-12)).all()
    assert (hi.exp() - lo.exp()).max() < 5e-3
    fine = P.Staggered(d=2)
    fine.grid, fine.quantiles = 8192, 2048
    lf = fine.log_prob(table)
    pos = lf > -math.inf  # windows far apart: some orders are impossible, on either grid
    assert pos.sum() >= 10 and torch.equal(pos, lp > -math.inf)
    assert ((lf.exp() - lp.exp()).abs() / lf.exp())[pos].max() < 1e-4
    flo, fhi = fine.log_prob_bounds(table)
    assert ((fhi - flo) < (hi - lo))[pos].all()  # the bracket tightens with the grid


def test_long_orders_do_not_underflow():
    p = P.Staggered(d=4)
    r = p.sample_ranks(torch.ones(3, 64, dtype=torch.long), generator=gen(0))
    lp = p.log_prob(r)
    lo, hi = p.log_prob_bounds(r)
    assert torch.isfinite(lp).all() and (lp < -20).all()
    assert ((lo <= lp) & (lp <= hi)).all()
    # a left-to-right order is far likelier than the sampled ones; right to left is impossible
    l2r, r2l = torch.arange(1, 65)[None], torch.arange(64, 0, -1)[None]
    assert p.log_prob(l2r).item() > lp.max().item() and p.log_prob(r2l).item() == -math.inf


def test_binned_orders_exact_against_direct_sum():
    """With steps, P(ranks) = Σ over strictly later bins of Π bin masses (brute force)."""
    p, steps = P.SlidingWindow(2), 4
    L = 3
    edges = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    a = p.alpha(edges, L)  # [steps+1, L]
    mass = (a[:-1] - a[1:]).T  # [L, steps] bins ascending in time
    mass[:, -1] += a[-1]
    table = all_orders(torch.ones(L, dtype=torch.long), multi=True)
    want = []
    for r in table.tolist():
        total = 0.0
        for bins in itertools.product(range(steps), repeat=L):  # bin of each position
            # rank 1 = latest bin; equal ranks share a bin, distinct ranks distinct bins
            if all((r[i] == r[j]) == (bins[i] == bins[j]) and ((r[i] < r[j]) == (bins[i] > bins[j]) or r[i] == r[j])
                   for i in range(L) for j in range(L)):
                total += math.prod(mass[i, bins[i]].item() for i in range(L))
        want.append(total)
    got = p.log_prob(table, steps=steps).exp()
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-15)
    assert R.num_sets(table).max() == L
