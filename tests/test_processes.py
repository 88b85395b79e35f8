import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import orderlab.processes as P
from orderlab import ranks as R
from orderlab.registry import ConfigError
from orderlab.builder import build, names

# Every registered process, with the constructor arguments to test it under.
EXAMPLES = {
    "linear": [{}],
    "cosine": [{}],
    "loglinear": [{}, {"eps": 0.2}],
    "polynomial": [{"power": 2.0}, {"power": 0.5}],
    "quench": [{}],
    "sliding_window": [{"window": 3}],
    "staggered": [{"d": 2}, {"d": 4, "window": 4}],
    "blockwise": [
        {"block_size": 4},  # 10 = 4 + 4 + 2: a short last block
        {"block_size": 5, "inner": {"name": "staggered", "d": 1}},
        {"block_size": 4, "inner": {"name": "loglinear", "eps": 0.2}},
    ],
    "mixture": [{"processes": ["cosine", "quench"], "weights": [0.3, 0.7]}],
    "learned_position": [{"eps": 0.0, "power_init": [0.3, 0.5, 0.8, 1, 1.5, 2, 3, 1, 0.7, 4, 1, 1]}],
}
# their schedules depend on the token values: tests/test_learned_schedule.py (learned_token) and
# tests/test_lomdm.py (learned_data, LoMDM's data-dependent scheduler) check them through given(x)
NEEDS_TOKENS = {"learned_token", "learned_data"}
CASES = [(name, kw) for name, kws in EXAMPLES.items() for kw in kws]
IDS = [f"{name}-{i}" for name, kws in EXAMPLES.items() for i in range(len(kws))]
L = 10


def make(name, kw):
    return build("process", {"name": name, **kw}, context={"max_len": 12})  # learned_position's capacity


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def eps_of(p):
    """α(1) of a process: ε for a flat log-linear schedule, else 0."""
    return p.eps if isinstance(p, P.LogLinear) else 0.0


def test_every_registered_process_is_tested():
    assert set(names("process")) == set(EXAMPLES) | NEEDS_TOKENS
    assert set(names("corruption")) == {"absorbing", "uniform", "hybrid"}


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_hitting_time_cdf_matches_alpha(name, kw):
    # empirical P(T_i <= t) over N draws vs 1 - α_i(t), within 5 binomial std
    p, N = make(name, kw), 4000
    T = p.first_hitting_times(N, L, generator=gen(1))
    assert T.shape == (N, L) and T.dtype == torch.get_default_dtype()
    ts = torch.tensor([0.1, 0.3, 0.45, 0.55, 0.7, 0.9, 1.0])
    want = 1 - p.alpha(ts.double(), L)  # [7, L]
    emp = (T.double()[None] <= ts.double()[:, None, None]).double().mean(1)  # [7, L]
    tol = 5 * (want * (1 - want) / N).sqrt() + 1.5e-3
    assert ((emp - want).abs() <= tol).all(), (emp - want).abs().max()


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_alpha_boundaries_monotone_and_derivative(name, kw):
    p = make(name, kw)
    a0, a1 = p.alpha(torch.zeros(3), L), p.alpha(torch.ones(3), L)
    assert a0.shape == (3, L) and torch.allclose(a0, torch.ones_like(a0))
    assert (a1 >= 0).all() and (a1 <= eps_of(p) + 1e-6).all()
    grid = torch.linspace(0, 1, 201, dtype=torch.float64)
    a = p.alpha(grid, L)  # [201, L]
    assert (a.diff(dim=0) <= 1e-12).all() and (a >= 0).all() and (a <= 1).all()
    # central finite difference at times away from the schedules' kinks
    t = torch.tensor([0.1234567, 0.3141593, 0.5772157, 0.7071068, 0.8660254], dtype=torch.float64)
    h = 1e-7
    fd = (p.alpha(t + h, L) - p.alpha(t - h, L)) / (2 * h)
    assert torch.allclose(p.dalpha(t, L), fd, rtol=1e-4, atol=1e-5)
    # the per-position form of t gives the same as the per-row form
    assert torch.allclose(p.alpha(t[:, None].expand(5, L), L), p.alpha(t, L))


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_sample_ranks_follow_the_hitting_times(name, kw):
    # same seed: ranks are T sorted descending; with steps, T's time bins
    p, B = make(name, kw), 64
    ranks = torch.ones(B, L, dtype=torch.long)
    T = p.first_hitting_times(B, L, generator=gen(3), dtype=torch.float64)
    r = p.sample_ranks(ranks, generator=gen(3))
    assert torch.equal(r, T.argsort(dim=1, descending=True, stable=True).argsort(dim=1) + 1)
    steps = 4
    r4 = p.sample_ranks(ranks, generator=gen(3), steps=steps)
    bins = steps + 1 - torch.ceil(T * steps).clamp(1, steps).long()  # 1 = first step (t near 1)
    assert torch.equal(r4, R.dense(bins))
    assert (R.num_sets(r4) <= steps).all()


def test_weight_is_the_nelbo_weight():
    t = torch.tensor([0.25, 0.5])
    assert torch.allclose(P.Linear().weight(t, 3), (1 / t)[:, None].expand(2, 3))
    assert torch.equal(P.Quench().weight(torch.tensor([0.0]), 4), torch.zeros(1, 4))


def test_quench_is_left_to_right():
    for n in (1, 2, 7, 64, 1000):
        r = P.Quench().sample_ranks(torch.ones(3, n, dtype=torch.long), generator=gen(n))
        assert torch.equal(r, torch.arange(1, n + 1).expand(3, n))
    # with a prompt and padding: ranks 1..K over the generated positions, left to right
    ranks = torch.tensor([[0, 0, 1, 1, 1, -1], [0, 1, 1, 1, 1, 1]])
    assert P.Quench().sample_ranks(ranks).tolist() == [[0, 0, 1, 2, 3, -1], [0, 1, 2, 3, 4, 5]]
    # hand-computed schedule: position i is noised on ((L-1-i)/L, (L-i)/L]
    a = P.Quench().alpha(torch.tensor([0.25, 0.6]), 4)
    assert torch.allclose(a, torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.6, 0.0, 0.0]]))
    assert torch.allclose(P.Quench().dalpha(torch.tensor([0.6]), 4), torch.tensor([[0.0, -4.0, 0.0, 0.0]]))


@settings(max_examples=25, deadline=None)
@given(
    st.integers(1, 6),
    st.integers(1, 40),
    st.sampled_from([(1, "linear"), (3, "staggered"), (4, "cosine"), (7, "quench")]),
    st.integers(0, 2**31),
)
def test_blockwise_blocks_in_order(bs, n, inner, seed):
    bs, name = (inner[0], inner[1]) if inner[1] != "linear" else (bs, "linear")
    inner_p = P.Staggered(d=1) if name == "staggered" else build("process", name)
    if name == "staggered" and 3 * min(bs, n) <= 1:  # staggered needs 3L > 2d - 1 per block
        return
    p = P.Blockwise(bs, inner_p)
    g = gen(seed)
    ranks = torch.randint(-1, 2, (5, n), generator=g)  # given, to generate, padding mixed
    r = p.sample_ranks(ranks, generator=g)
    big = torch.where(r > 0, r, torch.full_like(r, R.NEVER))
    for j in range(0, n - bs, bs):  # max rank of block j < min rank of block j+1
        hi = torch.where(r[:, j : j + bs] > 0, r[:, j : j + bs], 0).amax(1)
        lo = big[:, j + bs : j + 2 * bs].amin(1)
        assert (hi < lo).all()


def test_blockwise_is_random_inside_a_block():
    r = P.Blockwise(4).sample_ranks(torch.ones(2000, 8, dtype=torch.long), generator=gen(5))
    first = (r[:, :4] == 1).double().mean(0)  # which position of block 0 comes first
    assert torch.allclose(first, torch.full((4,), 0.25, dtype=torch.float64), atol=0.05)
    assert (r[:, 4:] > 4).all()


def test_staggered_hand_computed():
    # L = 8, d = 4: m = 8, b = 8/15, area = 4/16, k = (1/4) / (8/15 - 1/4) = 15/17
    p = P.Staggered(d=4, length=8)
    assert p.b == pytest.approx(8 / 15) and p.k == pytest.approx(15 / 17)
    assert p.params(8) == (p.b, p.k)
    t = torch.tensor([0.5, 0.4], dtype=torch.float64)
    loc = p.loc(8, t)  # (1 - b)(1 - i/7) = (7 - i)/15
    assert torch.allclose(loc, (7 - torch.arange(8, dtype=torch.float64))[None] / 15)
    a, da = p.alpha(t, 8), p.dalpha(t, 8)
    # t = 0.5, i = 7: x = 15/16; t = 0.4, i = 3: x = (0.4 - 4/15) / (8/15) = 1/4
    assert a[0, 7].item() == pytest.approx(0.08660464618629345)
    assert da[0, 7].item() == pytest.approx(-2.292475928460709)
    assert a[1, 3].item() == pytest.approx(0.7758181548825438)
    assert da[1, 3].item() == pytest.approx(-1.7113635769467876)
    assert a[1, 0].item() == 1.0 and da[1, 0].item() == 0.0  # before its window (loc_0 = 7/15)
    # the paper's T = loc + b (1 - exp(-E/k)), E ~ Exp(1), is our inverse CDF with U = exp(-E)
    E = torch.tensor([[0.1, 0.5, 1.0, 2.0, 3.0, 0.01, 5.0, 0.7]], dtype=torch.float64)
    T = p.inverse_alpha(torch.exp(-E), 8)
    assert torch.allclose(T, loc + p.b * (1 - torch.exp(-E / p.k)))
    # other lengths: LM1B (L = 128, d = 4) gives k ~ 1/3; too short a sequence is an error
    b, k = P.Staggered().params(128)
    assert b == pytest.approx(8 / 135) and k == pytest.approx(0.35809018567639256)
    with pytest.raises(ValueError, match="b > d/"):
        P.Staggered(d=4).params(2)


def test_sliding_window_hand_computed():
    # window 3, L = 4: b = 3/6, loc_i = (3 - i)/6, α_i = 1 - clip((t - loc_i)/b)
    a = P.SlidingWindow(3).alpha(torch.tensor([0.5]), 4)
    assert torch.allclose(a, torch.tensor([[1.0, 2 / 3, 1 / 3, 0.0]]))
    assert torch.allclose(P.SlidingWindow(3).dalpha(torch.tensor([0.4]), 4), torch.tensor([[0.0, -2.0, -2.0, -2.0]]))


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 4),
    st.integers(1, 24),
    st.sampled_from(["linear", "cosine", "loglinear", "quench", "staggered", "blockwise"]),
    st.one_of(st.none(), st.integers(1, 6)),
    st.integers(0, 2**31),
)
def test_sample_ranks_keeps_given_and_padding_and_is_dense(b, n, name, steps, seed):
    p = P.Staggered(d=0.5) if name == "staggered" else build("process", name, **({"block_size": 3} if name == "blockwise" else {}))
    g = gen(seed)
    ranks = torch.randint(-1, 4, (b, n), generator=g)  # values > 1 count as "to generate" too
    r = p.sample_ranks(ranks, generator=g, steps=steps)
    assert r.shape == ranks.shape and r.dtype == ranks.dtype
    assert torch.equal(r <= 0, ranks <= 0) and torch.equal(r[ranks <= 0], ranks[ranks <= 0])
    assert torch.equal(R.dense(r), r)  # ranks 1..K without gaps
    todo = (ranks > 0).sum(1)
    if steps is None:  # singletons: a permutation of 1..K
        assert torch.equal(R.num_sets(r), todo)
    else:
        assert (R.num_sets(r) <= min(steps, n)).all()


def test_steps_give_multi_token_sets():
    r = P.Linear().sample_ranks(torch.ones(8, 64, dtype=torch.long), generator=gen(2), steps=4)
    assert (R.num_sets(r) == 4).all()
    sizes = torch.stack([(r == k).sum(1) for k in range(1, 5)], 1)  # [8, 4]
    assert (sizes > 1).all() and (sizes.sum(1) == 64).all()
    # AR with L/2 steps: consecutive pairs
    assert P.Quench().sample_ranks(torch.ones(1, 8, dtype=torch.long), steps=4).tolist() == [[1, 1, 2, 2, 3, 3, 4, 4]]


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_corrupt_masks_exactly_where_hit(name, kw):
    p, B, V = make(name, kw), 32, 7
    x = torch.randint(0, V, (B, L), generator=gen(0))
    ranks = torch.ones(B, L, dtype=torch.long)
    ranks[:, 0], ranks[:, -1] = 0, -1
    t = torch.rand(B, generator=gen(1))
    t[:4] = 1.0
    T = p.first_hitting_times(B, L, generator=gen(7), dtype=torch.float64)
    x_t, noised = p.corrupt(x, t, mask_id=V, vocab_size=V, ranks=ranks, generator=gen(7))
    assert noised.dtype == torch.bool and x_t.shape == x.shape
    assert torch.equal(noised, (T <= t[:, None]) & (ranks > 0))
    assert torch.equal(x_t, torch.where(noised, torch.full_like(x, V), x))
    assert not noised[:, [0, -1]].any() and torch.equal(x_t[:, [0, -1]], x[:, [0, -1]])
    # without ranks every position can be noised; t = 0 noises nothing
    _, all_noised = p.corrupt(x, 1.0, V, V, generator=gen(7))
    assert all_noised.double().mean() >= 1 - eps_of(p) - 0.1
    assert not p.corrupt(x, torch.zeros(B), V, V, generator=gen(7))[1].any()


def test_corrupt_frequency_matches_alpha():
    p, N = P.Staggered(d=2), 4000
    x = torch.zeros(N, L, dtype=torch.long)
    for t in (0.3, 0.6):
        _, noised = p.corrupt(x, t, 5, 5, generator=gen(int(t * 10)))
        want = 1 - p.alpha(torch.tensor([t], dtype=torch.float64), L)[0]
        tol = 5 * (want * (1 - want) / N).sqrt() + 1.5e-3
        assert ((noised.double().mean(0) - want).abs() <= tol).all()


def test_uniform_and_hybrid_corruption_statistics():
    N, V, mask = 20000, 5, 5
    x = torch.zeros(N, 4, dtype=torch.long)
    noised = torch.zeros(N, 4, dtype=torch.bool)
    noised[:, 1:] = True
    u = P.Uniform()(x, noised, mask, V, gen(0))
    assert torch.equal(u[:, 0], x[:, 0]) and not (u == mask).any()
    counts = torch.bincount(u[:, 1:].flatten(), minlength=V).double()  # [V] uniform over 0..V-1
    n = 3 * N
    assert ((counts - n / V).abs() <= 5 * math.sqrt(n * (1 / V) * (1 - 1 / V))).all()
    gamma = 0.3
    h = P.Hybrid(gamma)(x, noised, mask, V, gen(1))
    assert torch.equal(h[:, 0], x[:, 0])
    frac_uniform = (h[:, 1:] != mask).double().mean().item()
    assert abs(frac_uniform - gamma) <= 5 * math.sqrt(gamma * (1 - gamma) / n)
    # the uniform part is uniform over the vocabulary (0 included: it may equal the clean token)
    hu = h[:, 1:][h[:, 1:] != mask]
    c = torch.bincount(hu, minlength=V).double()
    assert ((c - hu.numel() / V).abs() <= 5 * math.sqrt(hu.numel() / V)).all()
    assert torch.equal(P.Hybrid(0.0)(x, noised, mask, V, gen(2)), P.Absorbing()(x, noised, mask, V))
    with pytest.raises(ValueError):
        P.Hybrid(1.5)


def test_process_corruption_argument():
    x = torch.zeros(200, 6, dtype=torch.long)
    xt, noised = P.Cosine(corruption=P.Uniform()).corrupt(x, 1.0, 9, 9, generator=gen(0))
    assert noised.all() and not (xt == 9).any() and (xt != 0).any()
    p = build("process", "staggered", d=1, corruption={"name": "hybrid", "gamma": 0.05})
    assert p.corruption == P.Hybrid(0.05) and repr(p) == "Staggered(d=1, corruption=Hybrid(gamma=0.05))"


def test_mixture_draws_one_component_per_sequence():
    m = P.Mixture([P.Linear(corruption=P.Uniform()), P.Quench()], weights=[1, 3])
    assert m.weights == [0.25, 0.75]
    x = torch.zeros(4000, 8, dtype=torch.long)
    xt, noised = m.corrupt(x, 0.5, 9, 9, generator=gen(0))
    masked_rows = (xt == 9).any(1)
    # quench rows: the right half masked; uniform-corruption rows never hold the mask
    assert torch.equal(noised[masked_rows], torch.tensor([[False] * 4 + [True] * 4]).expand(int(masked_rows.sum()), 8))
    assert abs(masked_rows.double().mean().item() - 0.75) < 5 * math.sqrt(0.75 * 0.25 / 4000)
    t = torch.tensor([0.3, 0.8])
    assert torch.allclose(m.alpha(t, 8), 0.25 * P.Linear().alpha(t, 8) + 0.75 * P.Quench().alpha(t, 8))


def test_generic_inverse_by_bisection():
    class Square(P.Process):  # only alpha: first-hitting times by bisection
        def alpha(self, t, length):
            return P.base.rows(1 - P.base.as_times(t) ** 2, length)

    class Leaky(P.Process):  # α(1) = 1/2: T = inf where u < 1/2
        def alpha(self, t, length):
            return P.base.rows(1 - 0.5 * P.base.as_times(t), length)

    u = torch.rand(50, 3, generator=gen(0), dtype=torch.float64)
    assert torch.allclose(Square().inverse_alpha(u, 3), P.Polynomial(2).inverse_alpha(u, 3), atol=1e-12)
    T = Leaky().inverse_alpha(u, 3)
    assert torch.equal(T.isinf(), u < 0.5)
    assert torch.allclose(T[u >= 0.5], 2 * (1 - u[u >= 0.5]), atol=1e-12)


def test_build_repr_and_errors():
    p = build("process", {"name": "blockwise", "block_size": 4, "inner": {"name": "cosine"}})
    assert isinstance(p.inner, P.Cosine) and repr(p) == "Blockwise(block_size=4, inner=Cosine())"
    m = build("process", {"name": "mixture", "processes": ["linear", {"name": "polynomial", "power": 3}]})
    assert repr(m) == "Mixture([Linear(), Polynomial(power=3.0)], weights=[0.5, 0.5])"
    assert repr(P.Quench()) == "Quench()" and repr(P.SlidingWindow(8)) == "SlidingWindow(window=8)"
    assert repr(P.Blockwise(2, P.Linear(corruption=P.Uniform()))) == "Blockwise(block_size=2, inner=Linear(corruption=Uniform()))"
    assert P.Blockwise(2, P.Linear(corruption=P.Uniform())).corruption == P.Uniform()
    with pytest.raises(ConfigError, match="did you mean 'block_size'"):
        build("process", {"name": "blockwise", "blocksize": 4})
    with pytest.raises(ConfigError, match="unknown corruption"):
        build("process", "linear", corruption="absorb")
    with pytest.raises(ConfigError):
        build("process", "mixture", processes=["linear"], weights=[1, 2])
