"""Learned policies: exact set distributions (enumeration), features, decoding, recording."""

import itertools
import math

import pytest
import torch

import orderlab

from orderlab.decoding import decode
from orderlab.policies import (
    FEATURES, LearnedBernoulli, LearnedPlackettLuce, NonEmptyBernoulli, PlackettLuceTopK, PolicyError, StepView, Threshold,
    Confidence,
)
from orderlab.policies.learned import Features, _State
from orderlab.registry import ConfigError
from orderlab.builder import build

# ----------------------------------------------------------------------------- set distributions

# rows: 4 candidates; one candidate; none (padded row); candidates with a hole
VALID = torch.tensor([
    [1, 1, 1, 1, 0],
    [0, 0, 1, 0, 0],
    [0, 0, 0, 0, 0],
    [1, 0, 1, 1, 0],
], dtype=torch.bool)


def logits_of(seed=0, scale=1.5):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(VALID.shape, generator=g, dtype=torch.float64)


def all_subsets(L):
    """Bool[2^L, L]: every subset of L positions."""
    return torch.tensor(list(itertools.product([False, True], repeat=L)))


def enumerate_dist(dist_of, logits, valid):
    """log P of every subset for every row: Float[B, 2^L] (via a batch of all subsets)."""
    B, L = logits.shape
    S = all_subsets(L)  # [2^L, L]
    out = []
    for b in range(B):
        d = dist_of(logits[b].expand(len(S), L), valid[b].expand(len(S), L))
        out.append(d.log_prob(S))
    return torch.stack(out), S


DISTS = {
    "bernoulli": lambda lg, v: NonEmptyBernoulli(lg, v),
    "pl_k1": lambda lg, v: PlackettLuceTopK(lg, v, 1),
    "pl_k2": lambda lg, v: PlackettLuceTopK(lg, v, 2),
    "pl_k3": lambda lg, v: PlackettLuceTopK(lg, v, 3),
}


@pytest.mark.parametrize("name", DISTS)
@pytest.mark.parametrize("seed", [0, 1])
def test_set_log_prob_sums_to_one_and_entropy_matches_enumeration(name, seed):
    logits = logits_of(seed)
    lp, S = enumerate_dist(DISTS[name], logits, VALID)
    p = lp.exp()
    torch.testing.assert_close(p.sum(1), torch.ones(len(VALID), dtype=torch.float64), rtol=0, atol=1e-12)
    outside = (S[None] & ~VALID[:, None]).any(-1)  # [B, 2^L] sets touching a non-candidate
    assert (p[outside] == 0).all()
    h_enum = -torch.where(p > 0, p * lp, torch.zeros_like(p)).sum(1)
    torch.testing.assert_close(DISTS[name](logits, VALID).entropy(), h_enum, rtol=0, atol=1e-10)


def test_bernoulli_is_the_conditioned_product():
    logits = logits_of(3)
    lp, S = enumerate_dist(DISTS["bernoulli"], logits, VALID)
    b = 0
    p = torch.sigmoid(logits[b])
    prod = torch.where(S, p, 1 - p)[:, VALID[b]].prod(1)  # unconditioned Bernoulli over the candidates
    ok = S.any(1) & ~(S & ~VALID[b]).any(1)
    want = torch.where(ok, prod / (1 - (1 - p[VALID[b]]).prod()), torch.zeros_like(prod))
    torch.testing.assert_close(lp[b].exp(), want)


def test_pl_single_draw_is_softmax():
    logits = logits_of(4)
    d = PlackettLuceTopK(logits, VALID, 1)
    sel = torch.zeros_like(VALID)
    sel[0, 1] = sel[1, 2] = sel[3, 3] = True
    want = torch.log_softmax(logits[0, :4], 0)[1], torch.tensor(0.0, dtype=torch.float64), torch.log_softmax(logits[3, [0, 2, 3]], 0)[2]
    got = d.log_prob(sel)
    torch.testing.assert_close(got[[0, 1, 3]], torch.stack(want))
    assert got[2] == 0  # the empty set on a row without candidates is certain
    sel[2, 0] = True  # a selection on a row without candidates
    assert d.log_prob(sel)[2] == -math.inf


@pytest.mark.parametrize("name", DISTS)
def test_sample_frequencies_match_log_prob(name):
    """Pearson chi-square of 40000 draws per row against the enumerated probabilities
    (fixed seed); the bound df + 6·sqrt(2 df) is far in the tail of χ²(df)."""
    logits = logits_of(5, scale=1.0)
    lp, S = enumerate_dist(DISTS[name], logits, VALID)
    n = 40000
    g = torch.Generator().manual_seed(0)
    for b in range(len(VALID)):
        d = DISTS[name](logits[b].expand(n, -1), VALID[b].expand(n, -1))
        draws = d.sample(g)  # [n, L]
        code = (draws.long() * (2 ** torch.arange(S.shape[1] - 1, -1, -1))).sum(1)  # index into all_subsets order
        counts = torch.bincount(code, minlength=len(S)).double()
        p = lp[b].exp()
        assert counts[p == 0].sum() == 0, "a sample outside the support"
        support = p > 0
        if support.sum() == 1:
            assert counts[support].item() == n
            continue
        chi2 = ((counts[support] - n * p[support]) ** 2 / (n * p[support])).sum().item()
        df = int(support.sum()) - 1
        assert chi2 < df + 6 * math.sqrt(2 * df), (name, b, chi2, df)


@pytest.mark.parametrize("name", DISTS)
def test_mode_is_the_most_likely_set(name):
    for seed in range(4):
        logits = logits_of(10 + seed, scale=2.0)
        lp, S = enumerate_dist(DISTS[name], logits, VALID)
        mode = DISTS[name](logits, VALID).mode(torch.Generator().manual_seed(0))
        got = DISTS[name](logits, VALID).log_prob(mode)
        torch.testing.assert_close(got, lp.max(1).values)


@pytest.mark.parametrize("name", DISTS)
def test_greedy_ties_are_broken_at_random(name):
    logits = torch.full((1, 6), -3.0, dtype=torch.float64)  # all equal: every singleton ties
    valid = torch.ones(1, 6, dtype=torch.bool)
    picks = {tuple(DISTS[name](logits, valid).mode(torch.Generator().manual_seed(s))[0].nonzero()[:, 0].tolist()) for s in range(30)}
    assert len(picks) > 3  # not always the lowest positions


def test_log_prob_and_entropy_have_finite_gradients_on_padded_rows():
    for name, make in DISTS.items():
        logits = logits_of(6).requires_grad_(True)
        d = make(logits, VALID)
        sel = d.sample(torch.Generator().manual_seed(0))
        (d.log_prob(sel).sum() + d.entropy().sum()).backward()
        assert torch.isfinite(logits.grad).all(), name
        assert (logits.grad[~VALID] == 0).all(), name


def test_pl_log_prob_rejects_wrong_sizes():
    d = PlackettLuceTopK(logits_of(0), VALID, 2)
    sel = torch.zeros_like(VALID)
    sel[0, 0] = True  # one position where k = 2
    assert d.log_prob(sel)[0] == -math.inf
    with pytest.raises(PolicyError, match="selected"):
        d.log_prob(sel.long())


# ----------------------------------------------------------------------------- features


def test_features_values():
    probs = torch.full((1, 6, 4), 0.25)
    probs[0, 3] = torch.tensor([0.7, 0.1, 0.1, 0.1])
    given = torch.tensor([[1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    todo = torch.tensor([[0, 1, 1, 1, 1, 0]], dtype=torch.bool)  # position 5 is padding
    masked = torch.tensor([[0, 0, 1, 1, 0, 0]], dtype=torch.bool)  # 1 and 4 revealed
    view = StepView(probs, masked, masked, step=2, given=given)
    f = Features()(view, _State(todo))
    col = {n: f[0, :, i] for i, n in enumerate(FEATURES)}
    assert col["confidence"].tolist() == pytest.approx([0, 0, 0.25, 0.7, 0, 0])
    assert col["margin"].tolist() == pytest.approx([0, 0, 0, 0.6, 0, 0])
    assert col["entropy"][2].item() == pytest.approx(1.0)
    assert col["position"].tolist() == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert (col["distance"] * 6).tolist() == pytest.approx([0, 0, 1, 1, 0, 1])  # padding is not known
    assert col["progress"].tolist() == pytest.approx([0.5] * 6)
    assert col["step"].tolist() == pytest.approx([0.5] * 6)
    assert col["candidate"].tolist() == [0, 0, 1, 1, 0, 0]
    with pytest.raises(PolicyError, match="features"):
        Features(["confidence", "positon"])


# ----------------------------------------------------------------------------- the policy in the decoder

V, L = 6, 8


def tiny(rule="set_causal", seed=0):
    torch.manual_seed(seed)
    m = orderlab.build("model", "transformer", vocab_size=V, max_len=L, attention=rule, d_model=16, n_layers=1, n_heads=2)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(5.0)
    return m.eval()


def batch(B=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (B, L), generator=g)
    r = torch.ones(B, L, dtype=torch.long)
    r[0, :2] = 0
    r[1, [0, 4]] = 0  # infilling
    r[2, :1] = 0
    r[2, 6:] = -1  # padding
    r[3, :3] = 0
    masked = torch.where(r >= 1, torch.full_like(x, V), x)
    return masked, r


def position_policy(cls, weight, **kw):
    """A learned policy whose logits are weight · position (all mass on one order for |weight| large)."""
    return orderlab.build("policy", {"_target_": cls, "features": ["position"], "net": {"name": "linear", "weight": [weight], "bias": 0.0}, **kw})


@pytest.mark.parametrize("cls", [LearnedPlackettLuce, LearnedBernoulli])
@pytest.mark.parametrize("greedy", [True, False])
@pytest.mark.parametrize("rule,cache", [("set_causal", True), ("bidirectional", False)])
def test_policy_with_all_mass_on_one_order_decodes_as_that_order(cls, greedy, rule, cache):
    model = tiny(rule)
    x, r = batch()
    for weight, fixed in ((-2000.0, "l2r"), (2000.0, "r2l")):
        # Bernoulli: logits −w·i; with a bias below 0 no candidate passes σ > 1/2 and the
        # forced singleton is the top one, i.e. the fixed order one position at a time
        pol = position_policy(cls, weight, greedy=greedy)
        if cls is LearnedBernoulli:
            with torch.no_grad():
                pol.net.out.bias.fill_(-3000.0)
        got = decode(model, pol, x, r, cache=cache)
        want = decode(model, build("policy", fixed), x, r, cache=cache)
        assert torch.equal(got.ranks, want.ranks), (weight, got.ranks, want.ranks)
        assert torch.equal(got.tokens, want.tokens)


def test_greedy_ties_random_in_the_decoder_and_seeded():
    model = tiny()
    x, r = batch()
    pol = orderlab.build("policy", "learned_plackett_luce", net="mlp", greedy=True, seed=0)  # zero output weights: every logit is −2
    a = decode(model, pol, x, r).ranks
    assert torch.equal(a, decode(model, pol, x, r).ranks)  # reset() re-seeds: same seed, same order
    assert not torch.equal(a, decode(model, build("policy", "l2r"), x, r).ranks)
    pol.seed = 1
    assert not torch.equal(a, decode(model, pol, x, r).ranks)


@pytest.mark.parametrize("cls,kw", [(LearnedBernoulli, {}), (LearnedPlackettLuce, {"k": 2}),
                                    (LearnedPlackettLuce, {"k": Threshold(Confidence(), 0.5)})],
                         ids=["bernoulli", "pl_k2", "pl_threshold"])
@pytest.mark.parametrize("net", ["transformer", "mlp"])
def test_replay_equals_the_decode_time_log_probs(cls, kw, net):
    torch.manual_seed(0)
    model = tiny()
    x, r = batch()
    pol = orderlab.build("policy", {"_target_": cls, "net": net, **kw})
    with torch.no_grad():  # a non-trivial policy: random output weights
        pol.net.out.weight.normal_(0, 2.0)
    # a fixed reference with the same support: a softened confidence rule of the same family
    ref = orderlab.build("policy", {"_target_": cls, "features": ["confidence"], "net": {"name": "linear", "weight": [10.0], "bias": -5.0}, **kw})
    with pol.recording(seed=3, greedy=False, reference=ref) as traj:
        d = decode(model, pol, x, r)
    assert traj.steps == d.steps
    rep = pol.replay(traj)
    decode_time = torch.stack(traj.log_prob)  # [T, B], computed step by step while decoding
    torch.testing.assert_close(rep.step_log_prob, decode_time, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rep.log_prob, decode_time.sum(0), rtol=1e-5, atol=1e-5)
    assert torch.isfinite(rep.log_prob).all() and (rep.log_prob < 0).any()
    # the per-step replayed sets are the decoded order
    sel = torch.stack(traj.selected)  # [T, B, L]
    step_of = (sel.long() * torch.arange(1, d.steps + 1)[:, None, None]).sum(0)
    torch.testing.assert_close(torch.where(r >= 1, step_of, r), d.ranks)
    rep.log_prob.sum().backward()  # gradients reach the network
    assert pol.net.out.weight.grad.abs().sum() > 0
    assert len(traj.ref_log_prob) == d.steps and torch.isfinite(torch.stack(traj.ref_log_prob)).all()


def test_follow_records_log_prob_of_a_given_order():
    model = tiny()
    x, r = batch()
    pol = orderlab.build("policy", "learned_plackett_luce", features=["position", "confidence"], net="mlp")
    with torch.no_grad():
        pol.net.out.weight.normal_(0, 1.0)
    order = decode(model, build("policy", "r2l"), x, r).ranks
    with pol.recording(follow=order) as traj:
        d = decode(model, pol, x, r)
    assert torch.equal(d.ranks, order)
    lp = pol.replay(traj).log_prob
    # by hand: each step's softmax over the candidates of the picked (rightmost) position
    want = torch.zeros(len(x), dtype=torch.float64)
    for t in range(traj.steps):
        logits = pol.net(traj.features[t], traj.keep)
        c, s = traj.candidates[t], traj.selected[t]
        lsm = torch.log_softmax(torch.where(c, logits, -torch.inf).double(), 1)
        want += torch.where(s, lsm, 0.0).sum(1)
    torch.testing.assert_close(lp, want)
    with pol.recording(follow=torch.where(r >= 1, 1, r)) as traj:  # everything at once: impossible for k = 1
        decode(model, pol, x, r)
    assert (pol.replay(traj).log_prob == -math.inf).all()
    with pytest.raises(PolicyError, match="follow"):
        with pol.recording(follow=torch.where(r >= 1, 2, r)):  # nothing at step 1
            decode(model, pol, x, r)


def test_built_from_config_and_checked():
    pol = build("policy", {"name": "learned", "features": ["confidence", "position"],
                           "net": {"name": "transformer", "d_model": 8, "heads": 2}, "greedy": False})
    assert isinstance(pol, LearnedBernoulli) and isinstance(pol, torch.nn.Module)
    assert pol.net.out.bias.item() == -2.0 and pol.net.out.weight.abs().sum() == 0
    assert "LearnedBernoulli" in repr(pol) and "\n" not in repr(pol)
    with pytest.raises(ConfigError, match="policy.net.hiden"):
        build("policy", {"name": "learned_plackett_luce", "net": {"name": "mlp", "hiden": 3}})
    with pytest.raises(ConfigError, match="unknown policy_net"):
        build("policy", {"name": "learned", "net": "lstm"})
