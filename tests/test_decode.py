"""The decoder: cache exactness, batching, greedy l2r = argmax chain, invariants."""

import pytest
import torch

import orderlab
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orderlab.decoding import decode, sample_tokens
from orderlab.likelihood import log_likelihood
from orderlab.builder import build

V, L = 6, 12
BLOCK = {"name": "block_causal", "block_size": 4}


def tiny(rule, seed=0):
    torch.manual_seed(seed)
    m = orderlab.build("model", "transformer", vocab_size=V, max_len=L, attention=rule, d_model=32, n_layers=2, n_heads=2)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(5.0)  # peaked predictions: confidences vary, greedy ties are unlikely
    return m.eval()


def batch(seed=0, B=4):
    """Rows with different prompts, an infilling row and padding."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (B, L), generator=g)
    r = torch.ones(B, L, dtype=torch.long)
    r[0, :2] = 0  # short prompt
    r[1, :5] = 0  # long prompt
    r[2, [0, 1, 6, 7]] = 0  # infilling: given tokens in the middle
    r[3, :1] = 0
    r[3, 9:] = -1  # padding
    return x, r


POLICIES = ["l2r", "r2l", "top_prob", "margin", "entropy", {"name": "threshold", "tau": 0.5},
            {"name": "factor", "f": 1.0}, {"name": "eb", "gamma": 0.5}, {"name": "sliding_window", "window": 4, "tau": 0.6},
            {"name": "semi_ar", "block_size": 4}, {"name": "random", "steps": 4}, "pc_sampler"]


CACHED_RULES = ["set_causal", BLOCK, {"name": "set_causal", "prompt": "causal"}, {**BLOCK, "prompt": "causal"}]


@pytest.mark.parametrize("rule", CACHED_RULES, ids=str)
@pytest.mark.parametrize("policy", POLICIES, ids=str)
def test_cache_equals_no_cache(rule, policy):
    model = tiny(rule)
    x, r = batch()
    a = decode(model, build("policy", policy), x, r, cache=True)
    b = decode(model, build("policy", policy), x, r, cache=False)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.ranks, b.ranks) and torch.equal(a.nfe, b.nfe)


@pytest.mark.parametrize("rule", CACHED_RULES + ["bidirectional"], ids=str)
@pytest.mark.parametrize("policy", ["top_prob", {"name": "threshold", "tau": 0.5}, {"name": "eb", "gamma": 0.3}], ids=str)
def test_batched_equals_row_by_row(rule, policy):
    model = tiny(rule, seed=1)
    x, r = batch(seed=1)
    full = decode(model, build("policy", policy), x, r)
    for i in range(x.shape[0]):
        one = decode(model, build("policy", policy), x[i : i + 1], r[i : i + 1])
        assert torch.equal(one.tokens[0], full.tokens[i]), i
        assert torch.equal(one.ranks[0], full.ranks[i]) and one.nfe[0] == full.nfe[i]


@pytest.mark.parametrize("rule", ["set_causal", "bidirectional"])
def test_decode_owns_the_masking(rule):
    """Callers pass the reference tokens as they are: whatever sits at rank >= 1 (the
    answer, [MASK], noise) gives the same decode, token sampling included."""
    model = tiny(rule, seed=3)
    x, r = batch(seed=3)
    noise = torch.where(r >= 1, torch.randint(0, V, x.shape, generator=torch.Generator().manual_seed(9)), x)
    outs = [decode(model, build("policy", {"name": "threshold", "tau": 0.5}), t, r, temperature=1.0, seed=4)
            for t in (x, torch.where(r >= 1, model.mask_id, x), noise)]
    for d in outs[1:]:
        assert torch.equal(d.tokens, outs[0].tokens) and torch.equal(d.ranks, outs[0].ranks)


def test_greedy_l2r_is_the_argmax_chain():
    """Greedy l2r on a set-causal model: x_i = argmax p(x_i | x_<i) one position at a time."""
    model = tiny("set_causal", seed=2)
    x, r = batch(seed=2)
    d = decode(model, build("policy", "l2r"), x, r)
    want = torch.where(r >= 1, model.mask_id, x)
    for i in range(L):
        todo = r[:, i] >= 1
        if not todo.any():
            continue
        # the chain's conditional at i: given tokens (anywhere) and earlier generated
        # positions in their left-to-right order; i is the last set; later ones absent
        order = (r >= 1).long().cumsum(1)  # l2r index of each generated position
        ranks = torch.where(r == 0, 0, torch.where((r >= 1) & (torch.arange(L) <= i), order, -1))
        filled = torch.where(want == model.mask_id, 0, want)
        cands = filled.repeat_interleave(V, 0)  # [B*V, L]: every value at position i
        cands[:, i] = torch.arange(V).repeat(x.shape[0])
        ll = log_likelihood(model, cands, ranks.repeat_interleave(V, 0)).view(-1, V)
        best = ll.argmax(1)
        want[:, i] = torch.where(todo, best, want[:, i])
    keep = r >= 0
    assert torch.equal(d.tokens[keep], want[keep])
    assert (d.nfe == (r >= 1).sum(1)).all()
    # the reveal order is left to right
    assert all((row[row > 0].diff() > 0).all() for row in d.ranks)


def test_temperature_sampling_is_seeded_and_float64():
    probs = torch.tensor([[0.5, 0.3, 0.2]]).expand(20000, 3)
    a = sample_tokens(probs, 1.0, generator=torch.Generator().manual_seed(0))
    b = sample_tokens(probs, 1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    freq = torch.bincount(a, minlength=3).float() / len(a)
    torch.testing.assert_close(freq, probs[0], atol=0.015, rtol=0)
    top = sample_tokens(probs, 1.0, top_p=0.6, generator=torch.Generator().manual_seed(0))
    assert set(top.unique().tolist()) == {0, 1}


def test_eos_and_max_new_tokens():
    model = tiny("set_causal", seed=4)
    x = torch.zeros(2, L, dtype=torch.long)
    r = torch.ones(2, L, dtype=torch.long)
    r[:, :2] = 0
    d = decode(model, build("policy", "l2r"), x, r, max_new_tokens=5, pad_id=0)
    assert ((d.ranks > 0).sum(1) == 5).all() and (d.ranks[:, 7:] == -1).all()
    eos = int(decode(model, build("policy", "l2r"), x, r).tokens[0, 4])  # the 3rd generated token of row 0
    d = decode(model, build("policy", "l2r"), x, r, eos_id=eos)
    first = int((d.tokens[0, 2:] == eos).nonzero()[0]) + 2
    assert (d.ranks[0, first + 1 :] == -1).all() and d.nfe[0] == first - 1


POLICY_NAMES = [p if isinstance(p, str) else p["name"] for p in POLICIES]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rule=st.sampled_from(["set_causal", "bidirectional", "block"]),
    policy=st.sampled_from(POLICIES),
    seed=st.integers(0, 10_000),
    cache=st.booleans(),
)
def test_decode_invariants(rule, policy, seed, cache):
    """Every non-given position revealed exactly once, sets non-empty and disjoint,
    NFE <= masked positions, given tokens never change."""
    model = MODELS[rule]
    g = torch.Generator().manual_seed(seed)
    B = 3
    x = torch.randint(0, V, (B, L), generator=g)
    r = torch.randint(-1, 2, (B, L), generator=g)  # random given / generate / padding pattern
    d = decode(model, build("policy", policy), x, r, cache=cache, temperature=1.0, seed=seed)
    gen = r >= 1
    assert torch.equal(d.ranks >= 1, gen)  # revealed exactly once (a single rank per position)
    assert torch.equal(d.tokens[~gen & (r == 0)], x[~gen & (r == 0)])
    assert (d.nfe <= gen.sum(1)).all()
    for row, n in zip(d.ranks, d.nfe):
        steps = row[row > 0].unique()
        assert len(steps) == int(n)  # one non-empty set per forward of the row
    assert sum(int(t.sum()) for t in d.tokens_per_step) == int(gen.sum())
    assert ((d.tokens[gen] >= 0) & (d.tokens[gen] < V)).all()


MODELS = {"set_causal": tiny("set_causal", 5), "bidirectional": tiny("bidirectional", 5), "block": tiny(BLOCK, 5)}


# ----------------------------------------------------------------------------- speed paths


def _same(a, b):
    return torch.equal(a.tokens, b.tokens) and torch.equal(a.ranks, b.ranks) and torch.equal(a.nfe, b.nfe)


@pytest.mark.parametrize("rule", ["set_causal", BLOCK, "bidirectional"], ids=str)
@pytest.mark.parametrize("policy", ["l2r", {"name": "sliding_window", "window": 4, "tau": 0.6}, {"name": "semi_ar", "block_size": 4},
                                    {"name": "eb", "gamma": 0.5}, {"name": "random", "steps": 4}], ids=str)
def test_fast_paths_equal_the_reference(rule, policy):
    """The default path (SDPA with a mask built once per forward, static-shape cache over
    its whole capacity) decodes what the reference attention without a cache decodes."""
    from orderlab.kernels import use_backend

    model = tiny(rule, seed=6)
    x, r = batch(seed=6)
    fast = decode(model, build("policy", policy), x, r, cache=True)
    with use_backend("reference"):
        ref = decode(model, build("policy", policy), x, r, cache=False)
    assert _same(fast, ref)


@pytest.mark.parametrize("rule", ["set_causal", BLOCK, "bidirectional"], ids=str)
@pytest.mark.parametrize("cache", [True, False])
def test_compiled_decode_is_one_graph_and_equals_eager(rule, cache):
    """``compile=True`` pads every step after the prompt's to one width: a whole decode
    compiles one graph (block-causal: two, its stream outgrows the one-token width when a
    block is appended), a second decode (new data, new cache) none, and the output equals
    the eager decode's. Counted as torchtune and gpt-fast do (Dynamo's unique graphs), with
    the aot_eager backend so that the test stays fast (inductor: benchmarks and the slow
    test below)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = tiny(rule, seed=7)
    x, r = batch(seed=7)
    policy = {"name": "sliding_window", "window": 4, "tau": 2.0}  # one token per step
    opts = {"backend": "aot_eager"}
    first = decode(model, build("policy", policy), x, r, cache=cache, compile=opts)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == (2 if rule == BLOCK and cache else 1)
    assert first.steps > 5 and counters["stats"]["calls_captured"] > 0
    again = decode(model, build("policy", policy), x.roll(1, 1), r, cache=cache, compile=opts)
    assert counters["stats"]["unique_graphs"] == graphs  # no recompile
    assert _same(first, decode(model, build("policy", policy), x, r, cache=cache))
    assert _same(again, decode(model, build("policy", policy), x.roll(1, 1), r, cache=cache))


def test_compiled_width_grows_once_for_multi_token_sets():
    """A policy revealing several tokens per step outgrows the one-token width once."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = tiny("set_causal", seed=8)
    x, r = batch(seed=8)
    policy = {"name": "sliding_window", "window": 4, "tau": 0.3}
    got = decode(model, build("policy", policy), x, r, compile={"backend": "aot_eager"})
    assert max(int(t.max()) for t in got.tokens_per_step) > 1
    assert counters["stats"]["unique_graphs"] <= 2
    assert _same(got, decode(model, build("policy", policy), x, r))


@pytest.mark.slow
def test_inductor_decode_equals_eager():
    """The real compiler (inductor, CPU codegen): same tokens as eager (about a minute)."""
    model = tiny("set_causal", seed=9)
    x, r = batch(seed=9)
    for policy in ("l2r", {"name": "sliding_window", "window": 4, "tau": 0.6}):
        want = decode(model, build("policy", policy), x, r)
        assert _same(decode(model, build("policy", policy), x, r, compile=True), want)


def _decode_state(seed: int, B: int = 3):
    """A random mid-decode state: given, padding, revealed at steps 1..4 and still masked
    positions, queries a non-empty subset of each row's masked ones, the current step."""
    from orderlab.rules import UNKNOWN

    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (B, L), generator=g)
    rank = torch.randint(-1, 6, (B, L), generator=g)
    rank = torch.where(rank == 5, UNKNOWN, rank)
    rank[:, -1] = UNKNOWN  # every row has a masked position
    queries = (rank == UNKNOWN) & (torch.rand(B, L, generator=g) < 0.6)
    queries[:, -1] = True
    return x, rank, queries, int(torch.randint(0, 5, (), generator=g))


@pytest.mark.parametrize("rule, cached", [("set_causal", True), ("set_causal", False), (BLOCK, True), (BLOCK, False),
                                          ("bidirectional", False)], ids=str)
def test_step_width_is_the_stream_width(rule, cached):
    """``rule.step_width`` (counted from masks, read before a compiled step) equals the width
    of the stream ``rule.step`` builds, and ``step(..., width=w)`` is that stream padded to
    ``w`` with tokens no one sees."""
    from orderlab.ranks import NEVER
    from orderlab.rules import AttentionRule

    r = MODELS["block" if rule == BLOCK else rule].rule
    for seed in range(20):
        x, rank, q, step = _decode_state(seed)
        s = r.step(x, rank, q, step, cached)
        n = s.tokens.shape[1]
        assert r.step_width(x, rank, q, step, cached) == n == AttentionRule.step_width(r, x, rank, q, step, cached)
        wide = r.step(x, rank, q, step, cached, width=n + 3)
        for f in ("tokens", "pos", "q_rank", "k_rank", "q_group", "k_group", "out"):
            assert torch.equal(getattr(wide, f)[:, :n], getattr(s, f)), f
        assert (wide.k_rank[:, n:] == NEVER).all() and (wide.q_group[:, n:] == -1).all() and (wide.out[:, n:] == -1).all()


def test_pack_rejects_a_row_wider_than_width_eager_and_compiled():
    """A fixed width never drops tokens silently: eagerly the error names the count, inside
    ``torch.compile`` the check is an in-graph assertion that raises when the graph runs."""
    from orderlab.rules import pack

    sel = torch.tensor([[True, True, True, False], [True, False, False, False]])

    def build(width):
        return pack((sel, {"tokens": 7}), width=width).tokens

    assert build(3).shape == (2, 3)
    with pytest.raises(RuntimeError, match=r"more tokens than the stream's width: 3 tokens, width=2"):
        build(2)
    compiled = torch.compile(build, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(3), build(3))
    with pytest.raises(RuntimeError, match="more tokens than the stream's width"):
        compiled(2)


@pytest.mark.parametrize("policy", [{"name": "semi_ar", "block_size": 4}, {"name": "random", "steps": 4},
                                    {"name": "eb", "gamma": 0.5}, "pc_sampler", {"name": "top_prob", "noise": 0.5}], ids=str)
def test_compiled_step_equals_eager_for_stateful_and_random_policies(policy):
    """The compiled step traces the policy and the sampling too: policies with per-batch
    state (semi_ar), their own generators (random, Gumbel noise) and temperature sampling
    (float64 Gumbel from the decoder's generator) decode what the eager step decodes."""
    torch._dynamo.reset()
    model = tiny("set_causal", seed=10)
    x, r = batch(seed=10)
    for temperature in (0.0, 1.0):
        want = decode(model, build("policy", policy), x, r, temperature=temperature, seed=3)
        got = decode(model, build("policy", policy), x, r, temperature=temperature, seed=3, compile={"backend": "aot_eager"})
        assert _same(got, want)


def test_compiled_step_follows_python_branches_of_a_user_policy():
    """A user policy branching in Python on ``view.step`` and on its own state (left to
    right on even steps, right to left on odd ones, confidence-first after three calls):
    the compiled step re-traces where a branch flips (Dynamo guards), so it decodes what
    the eager step decodes."""
    from orderlab.policies.base import Policy
    from orderlab.policies.compose import rank_candidates, take_prefix

    class Alternate(Policy):
        def __init__(self):
            self.calls = 0

        def reset(self):
            self.calls = 0

        def select(self, view):
            self.calls += 1
            if self.calls > 3:
                score = view.confidence
            elif view.step % 2 == 0:
                score = -torch.arange(view.length, dtype=torch.float).expand(view.batch_size, -1)
            else:
                score = torch.arange(view.length, dtype=torch.float).expand(view.batch_size, -1)
            r = rank_candidates(score, view.candidates)
            return take_prefix(r, torch.ones_like(r.n))

    torch._dynamo.reset()
    model = tiny("set_causal", seed=11)
    x, r = batch(seed=11)
    want = decode(model, Alternate(), x, r)
    got = decode(model, Alternate(), x, r, compile={"backend": "aot_eager"})
    assert _same(got, want)
    assert not torch.equal(want.ranks, decode(model, build("policy", "l2r"), x, r).ranks)
