"""Test-time order search (LookUM, Order-Token Search): one path is the plain decode,
every forward of every path is counted, the kept path is the best by the model's exact
likelihood or by a verifier."""

import math

import pytest
import torch

import orderlab
from orderlab.decoding import decode
from orderlab.search import path_log_likelihood, search_decode

V, L = 5, 7


def tiny_model(attention="set_causal"):
    torch.manual_seed(0)
    return orderlab.build("model", "transformer", vocab_size=V, max_len=L, attention=attention, d_model=16, n_layers=2, n_heads=2)


def prompts(b=3):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, V, (b, L), generator=g)
    r = torch.ones_like(x)
    r[:, :2] = 0
    r[0, 0] = -1  # a padded row
    return x, r


class Counting:
    """The model, counting per row the forwards that predict something for it (a query
    with ``out >= 0``): NFE measured outside the decoder."""

    def __init__(self, model):
        self.model, self.rule, self.vocab_size, self.mask_id = model, model.rule, model.vocab_size, model.mask_id
        self.rows: torch.Tensor | None = None
        self.total = 0

    def new_cache(self, *a):
        return self.model.new_cache(*a)

    def __call__(self, s, cache=None, **kw):
        hit = (s.out >= 0).any(1).long()
        self.total += int(hit.sum())
        self.rows = hit if self.rows is None or self.rows.shape != hit.shape else self.rows + hit
        return self.model(s, cache, **kw)


POLICIES = ["top_prob", "random", {"name": "learned", "features": ["confidence", "position"], "net": "mlp", "greedy": False}]


@pytest.mark.parametrize("attention", ["set_causal", "bidirectional"])
@pytest.mark.parametrize("policy", POLICIES, ids=["top_prob", "random", "learned"])
def test_one_path_is_the_plain_decode(attention, policy):
    model, (x, r) = tiny_model(attention), prompts()
    pol = orderlab.build("policy", policy)
    plain = decode(model, pol, x, r, temperature=1.0, seed=3)
    one = search_decode(model, pol, x, r, k=1, temperature=1.0, seed=3)
    assert torch.equal(one.tokens, plain.tokens) and torch.equal(one.ranks, plain.ranks)
    assert torch.equal(one.nfe, plain.nfe) and one.steps == plain.steps
    assert all(torch.equal(a, b) for a, b in zip(one.tokens_per_step, plain.tokens_per_step))
    assert one.scores is None


@pytest.mark.parametrize("policy", POLICIES, ids=["top_prob", "random", "learned"])
def test_the_kept_path_is_the_most_likely_and_every_forward_is_counted(policy):
    """k = 3 paths of 3 rows (set-causal, exact cache): the scores are each path's exact
    likelihood of its own result and order, the kept path has the largest, and the NFE of
    a row is every forward that predicted for any of its paths, decoding and scoring
    (counted by a wrapper around the model): the paths' decode NFE plus one scoring pass each."""
    model, (x, r) = tiny_model(), prompts()
    pol = orderlab.build("policy", policy)
    k = 3
    paths = decode(model, pol, x.repeat_interleave(k, 0), r.repeat_interleave(k, 0), temperature=1.0, seed=5)
    want = orderlab.log_likelihood(model, paths.tokens, paths.ranks).view(3, k)
    assert (want.max(1).values > want.min(1).values).all()  # the paths differ
    counting = Counting(model)
    s = search_decode(counting, pol, x, r, k=k, temperature=1.0, seed=5)
    torch.testing.assert_close(s.scores, want.double())
    assert torch.equal(s.chosen, want.argmax(1))
    kept = torch.arange(3) * k + s.chosen
    assert torch.equal(s.tokens, paths.tokens[kept]) and torch.equal(s.ranks, paths.ranks[kept])
    assert torch.equal(s.nfe, counting.rows.view(3, k).sum(1))
    assert torch.equal(s.nfe, paths.nfe.view(3, k).sum(1) + k)
    assert torch.equal(torch.stack(s.tokens_per_step).sum(0), (s.ranks >= 1).sum(1))


def test_a_verifier_chooses_and_costs_no_forward():
    """The verifier (here: how many generated tokens are 0) picks the path; the NFE is the
    paths' decoding only (bidirectional model, recomputed every step)."""
    model, (x, r) = tiny_model("bidirectional"), prompts()
    pol = orderlab.build("policy", "random")
    k = 4

    def zeros(tokens, ranks):
        return ((tokens == 0) & (ranks >= 1)).sum(1).float()

    counting = Counting(model)
    s = search_decode(counting, pol, x, r, k=k, verifier=zeros, cache=False, temperature=1.0, seed=2)
    paths = decode(model, pol, x.repeat_interleave(k, 0), r.repeat_interleave(k, 0), cache=False, temperature=1.0, seed=2)
    assert torch.equal(s.scores, zeros(paths.tokens, paths.ranks).double().view(3, k))
    assert torch.equal(zeros(s.tokens, s.ranks), s.scores.max(1).values.float())
    assert torch.equal(s.nfe, paths.nfe.view(3, k).sum(1)) and counting.total == int(s.nfe.sum())


def test_path_log_likelihood_and_errors():
    model, (x, r) = tiny_model("bidirectional"), prompts()
    order = torch.where(r >= 1, torch.arange(L).expand_as(r) - 1, r)  # left to right, one per step
    lp, passes = path_log_likelihood(model, x, order)
    torch.testing.assert_close(lp, orderlab.log_likelihood(model, x, order))
    assert passes.tolist() == [5, 5, 5]  # bidirectional: one pass per set
    pol = orderlab.build("policy", "top_prob")
    with pytest.raises(ValueError, match="k must be >= 1"):
        search_decode(model, pol, x, r, k=0)
    with pytest.raises(ValueError, match="verifier must return"):
        search_decode(model, pol, x, r, k=2, verifier=lambda t, rk: t.sum())


# ----------------------------------------------------------------------------- Order-Token Search


def _ots(beam):
    return orderlab.build("policy", {"name": "order_token_search", "beam": beam})


@pytest.mark.parametrize("attention", ["set_causal", "bidirectional"])
def test_order_token_search_beam_one_is_greedy_top_prob(attention):
    model, (x, r) = tiny_model(attention), prompts(4)
    r[1, -1] = -1  # ragged: rows with different numbers of positions to generate
    plain = decode(model, orderlab.build("policy", "top_prob"), x, r, cache=False)
    beam = _ots(1).decode(model, x, r)
    assert torch.equal(beam.tokens, plain.tokens) and torch.equal(beam.ranks, plain.ranks)
    assert torch.equal(beam.nfe, plain.nfe) and beam.steps == plain.steps
    torch.testing.assert_close(beam.scores[:, 0].float(), orderlab.log_likelihood(model, plain.tokens, plain.ranks),
                               atol=1e-4, rtol=0)


def test_order_token_search_wide_beam_is_the_brute_force_argmax():
    """Three positions, vocabulary 3: 3! orders x 3^3 tokens = 162 (order, tokens) pairs; a
    beam of 162 keeps every partial hypothesis, so it must return the pair with the largest
    log p_θ(x | σ) found by enumerating them all with orderlab.log_likelihood."""
    from conftest import sharp_denoiser

    import itertools

    model = sharp_denoiser(V=3, L=3, seed=11)
    orders = torch.tensor(list(itertools.permutations([1, 2, 3])))  # [6, 3] ranks
    toks = torch.tensor(list(itertools.product(range(3), repeat=3)))  # [27, 3]
    X = toks.repeat(len(orders), 1)  # [162, 3]
    R = orders.repeat_interleave(len(toks), 0)
    with torch.no_grad():
        ll = orderlab.log_likelihood(model, X, R)
    best = int(ll.argmax())
    x0, r0 = torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.long)
    wide = _ots(162).decode(model, x0, r0)
    assert torch.equal(wide.tokens[0], X[best]) and torch.equal(wide.ranks[0], R[best])
    assert float(wide.scores[0, 0]) == pytest.approx(float(ll.max()), abs=1e-4)
    assert (ll < ll.max() - 1e-4).sum() == len(ll) - 1  # the argmax is unique: the comparison is sharp
    narrow = _ots(1).decode(model, x0, r0)
    assert float(narrow.scores[0, 0]) < float(ll.max()) - 1e-3  # greedy misses it here: the beam matters


@pytest.mark.parametrize("beam", [1, 2, 5])
def test_order_token_search_nfe_is_every_forward_of_every_beam(beam):
    model = Counting(tiny_model("bidirectional"))
    x, r = prompts(3)
    out = _ots(beam).decode(model, x, r)
    assert int(out.nfe.sum()) == model.total  # every hypothesis's forward, counted outside
    # per row: one hypothesis at the start, then min(beam, hypotheses at depth k) = min(beam, n!/(n-k)! V^k)
    for b in range(3):
        n = int((r[b] >= 1).sum())
        want = sum(min(beam, math.perm(n, k) * V**k) for k in range(n))
        assert int(out.nfe[b]) == want


def test_order_token_search_from_config_and_in_evaluation():
    pol = _ots(3)
    assert pol.beam == 3 and repr(pol) == "OrderTokenSearch(beam=3)"
    with pytest.raises(orderlab.registry.ConfigError, match="width"):
        orderlab.build("policy", {"name": "order_token_search", "width": 3})
    with pytest.raises(orderlab.registry.ConfigError, match="beam"):
        orderlab.build("policy", {"name": "order_token_search", "beam": 0})
    model, (x, r) = tiny_model("bidirectional"), prompts()
    with pytest.raises(orderlab.policies.PolicyError, match="decodes itself"):
        decode(model, pol, x, r)
    from orderlab.evaluate import measure
    from orderlab.tasks.base import Task  # noqa: F401  (only to be sure the tasks package imports)

    class Toy:
        eos_id, pad_id = None, 0

        def metrics(self, pred, tokens, ranks):
            return {"accuracy": ((pred == tokens) | (ranks < 1)).all(1).double()}

    m = measure(model, Toy(), pol, x, r, batch_size=2)
    direct = pol.decode(model, x, r)
    assert torch.equal(m.nfe, direct.nfe)


def test_order_token_search_inside_search_decode():
    """A searched row of order_token_search (evaluate.search over every policy): k copies of
    the deterministic beam, all their forwards and the scoring passes counted."""
    model, (x, r) = Counting(tiny_model("bidirectional")), prompts()
    pol = _ots(2)
    one = pol.decode(model, x, r)
    model.total = 0
    two = search_decode(model, pol, x, r, k=2)
    assert torch.equal(two.tokens, one.tokens) and torch.equal(two.ranks, one.ranks)
    assert int(two.nfe.sum()) == model.total and int(two.nfe.sum()) > 2 * int(one.nfe.sum())
