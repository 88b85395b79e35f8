"""Variational order learning (objectives/vi.py) on toys small enough to enumerate every
order: the sampled ELBO and its TraceGraph gradient against the enumerated ones, the bound
against the exact log p(x), training closing the gap, the learned prior's greedy order,
pyro's trace shapes and masks, the SVI path, and the order distributions for IWAE."""

import itertools
import math

import pyro
import pytest
import torch

import orderlab
import torch.nn.functional as F
from torch import nn

from orderlab.decoding import decode
from orderlab.likelihood import log_likelihood
from orderlab.model import Transformer
from orderlab.objectives import VIOrders
from orderlab.objectives.vi import _parts
from orderlab.registry import ConfigError
from orderlab.builder import build
from orderlab.rules import Bidirectional

# ----------------------------------------------------------------------------- toys

V, L = 3, 4  # position 0 given, 3 to generate: 13 ordered set partitions, 6 permutations


def denoiser(seed: int = 0, scale: float = 40.0) -> Transformer:
    """A fixed random set-causal transformer with sharp predictions (weights ×``scale``),
    so that p(x | σ) differs between orders."""
    torch.manual_seed(seed)
    m = orderlab.build("model", "transformer", vocab_size=V, max_len=L, d_model=16, n_layers=1, n_heads=2)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(scale) if p.dim() > 1 else None
    return m.requires_grad_(False)


class MarkovFake(nn.Module):
    """A fixed fake denoiser (bidirectional rule): ``x_i = x_{i−1} + 1 (mod V)`` with
    probability ``a`` if position ``i − 1`` is known, uniform otherwise. The data of
    :func:`markov_data` follow it, so left to right, one position at a time, is the order
    that makes the data likely; every op is out of place (pyro's provenance flows)."""

    rule = Bidirectional()

    def __init__(self, vocab: int, length: int, a: float = 0.9):
        super().__init__()
        self.vocab_size = self.mask_id = vocab
        self.length, self.a = length, a

    def forward(self, s, cache=None):
        real = s.q_group >= 0
        at = F.one_hot(torch.where(real, s.pos, self.length), self.length + 1)  # [B, N, L+1]
        tok = (at * torch.where(real, s.tokens, 0)[..., None]).sum(1)  # [B, L+1]: the token at each position
        known = (at * (real & (s.tokens != self.mask_id))[..., None]).sum(1) > 0
        p = s.out.clamp(min=0)
        left = (p - 1).clamp(min=0)
        has = (p >= 1) & known.gather(1, left)  # [B, N]
        nxt = F.one_hot((tok.gather(1, left) + 1) % self.vocab_size, self.vocab_size).float()  # [B, N, V]
        sharp = torch.log(nxt * self.a + (1 - nxt) * (1 - self.a) / (self.vocab_size - 1))
        return torch.where(has[..., None], sharp, torch.zeros_like(sharp))


def markov_data(n: int, length: int, vocab: int, a: float = 0.9, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, length, dtype=torch.long)
    x[:, 0] = torch.randint(0, vocab, (n,), generator=g)
    for i in range(1, length):
        jump = torch.randint(1, vocab, (n,), generator=g)  # a wrong successor, uniformly
        keep = torch.rand(n, generator=g) < a
        x[:, i] = (x[:, i - 1] + torch.where(keep, 1, 1 + jump)) % vocab
    ranks = torch.ones_like(x)
    ranks[:, 0] = 0
    return x, ranks


def objective(family: str = "bernoulli", baseline: int | None = 16, perturb: float = 0.0, seed: int = 0, **kw) -> VIOrders:
    policy = ({"name": "learned", "net": {"name": "mlp", "hidden": 8, "layers": 1}} if family == "bernoulli"
              else {"name": "learned_plackett_luce", "k": 1, "net": {"name": "mlp", "hidden": 8, "layers": 1}})
    torch.manual_seed(seed)
    obj = orderlab.build("objective", "vi_orders", policy=policy, guide={"name": "mlp", "hidden": 8, "layers": 1}, baseline=baseline, **kw)
    if perturb:  # move off the zero-output start, so every parameter has a gradient
        with torch.no_grad():
            for name, p in obj.named_parameters():
                if not name.startswith("baseline"):
                    p.add_(perturb * torch.randn_like(p))
    return obj


def all_orders(n: int, family: str) -> torch.Tensor:
    """Long[M, n]: every order of ``n`` positions the family can produce (dense ranks):
    ordered set partitions (bernoulli) or permutations (singletons)."""
    if family == "bernoulli":
        rows = [r for r in itertools.product(range(1, n + 1), repeat=n) if set(r) == set(range(1, max(r) + 1))]
    else:
        rows = [tuple(p.index(i) + 1 for i in range(n)) for p in itertools.permutations(range(n))]
    return torch.tensor(rows)


def enumerate_orders(obj, m, x, ranks, family):
    """Exact quantities per row by enumeration (rows share ``ranks``' layout):
    log p(x) = logsumexp_σ [log π(σ) + log p(x|σ)], ELBO = Σ_σ q(σ)[log π + log p − log q],
    the totals Σ π and Σ q, and log q / log posterior per order."""
    gen = ranks[0] >= 1
    orders = all_orders(int(gen.sum()), family)
    B, M = x.shape[0], len(orders)
    O = ranks.repeat_interleave(M, 0).clone()  # [B·M, L]: row b's M orders adjacent
    O[:, gen] = orders.repeat(B, 1)
    X = x.repeat_interleave(M, 0)
    lpi = obj.prior(m).log_prob(X, O).view(B, M)
    lq = obj.proposal(m).log_prob(X, O).view(B, M)
    lp = log_likelihood(m, X, O).double().view(B, M)
    joint = lpi + lp
    log_px = torch.logsumexp(joint, 1)
    elbo = (lq.exp() * (joint - lq)).sum(1)
    return {"log_px": log_px, "elbo": elbo, "pi_total": lpi.exp().sum(1), "q_total": lq.exp().sum(1),
            "log_q": lq, "log_post": joint - log_px[:, None], "orders": O.view(B, M, -1)}


def toy_batch(n: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (n, L), generator=g)
    ranks = torch.ones_like(x)
    ranks[:, 0] = 0
    return x, ranks


# ----------------------------------------------------------------------------- (a) the bound


@pytest.mark.parametrize("family", ["bernoulli", "plackett_luce"])
def test_sampled_elbo_matches_enumeration_and_stays_below_log_px(family):
    m, obj = denoiser(), objective(family, perturb=1.0)
    x, ranks = toy_batch()
    with torch.no_grad():
        ex = enumerate_orders(obj, m, x, ranks, family)
    torch.testing.assert_close(ex["pi_total"], torch.ones(2, dtype=torch.float64), atol=1e-9, rtol=0)  # π, q normalised
    torch.testing.assert_close(ex["q_total"], torch.ones(2, dtype=torch.float64), atol=1e-9, rtol=0)
    assert (ex["elbo"] < ex["log_px"] - 1e-2).all()  # a real gap: the check below is not vacuous
    N = 3000
    draws = obj.sample_elbo(m, x.repeat_interleave(N, 0), ranks.repeat_interleave(N, 0),
                            torch.Generator().manual_seed(0)).view(2, N)
    mean, se = draws.mean(1), draws.std(1) / math.sqrt(N)
    assert ((mean - ex["elbo"]).abs() < 4 * se).all(), (mean, ex["elbo"], se)
    assert (mean < ex["log_px"]).all()


def test_one_order_with_all_mass_gives_its_nll():
    """π and q put (numerically) all mass on left to right (logit −60 · position), so the
    ELBO is log p(x | l2r), computed independently by the one-pass likelihood; rows of
    different lengths and padding."""
    m = denoiser()
    obj = orderlab.build("objective", "vi_orders", policy={"name": "learned_plackett_luce", "features": ["position"],
                           "net": {"name": "linear", "weight": [-60.0], "bias": 0.0}},
                   guide={"name": "linear", "weight": [-60.0, 0.0, 0.0], "bias": 0.0}, baseline=None)
    x = torch.tensor([[0, 1, 2, 1], [2, 2, 0, 0], [1, 0, 1, 2]])
    ranks = torch.tensor([[0, 1, 1, 1], [0, 1, 1, -1], [1, 1, 1, 1]])
    l2r = torch.where(ranks >= 1, (ranks >= 1).long().cumsum(1), ranks)
    elbo = obj.sample_elbo(m, x, ranks, torch.Generator().manual_seed(0))
    torch.testing.assert_close(elbo, log_likelihood(m, x, l2r).double(), atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- (b) the gradient


def _grads(obj) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel())
                      for n, p in obj.named_parameters() if not n.startswith("baseline")])


@pytest.mark.parametrize("family,baseline", [("bernoulli", 16), ("bernoulli", None), ("plackett_luce", 16)])
def test_surrogate_gradient_matches_enumerated_elbo_gradient(family, baseline):
    m, obj = denoiser(), objective(family, baseline=baseline, perturb=1.0)
    x, ranks = toy_batch()
    obj.zero_grad()
    enumerate_orders(obj, m, x, ranks, family)["elbo"].sum().backward()
    exact = _grads(obj)
    G, N = 12, 400  # groups of N draws per row: the spread over groups gives the standard error
    est, naive = [], []
    X, R = x.repeat_interleave(N, 0), ranks.repeat_interleave(N, 0)
    for g in range(G):
        obj.zero_grad()
        out = obj.step(m, X, R, torch.Generator().manual_seed(g))
        (-out.loss * out.weight / N).backward()  # −surrogate per draw: estimates ∇ Σ_rows ELBO
        est.append(_grads(obj))
        # negative control: the ELBO sample differentiated as is (no score-function terms)
        obj.zero_grad()
        mt, gt = obj.traces(m, X, R, torch.Generator().manual_seed(g))
        lp = sum(s["log_prob_sum"] for s in mt.nodes.values() if s["type"] == "sample")
        lq = sum(s["log_prob_sum"] for s in gt.nodes.values() if s["type"] == "sample")
        ((lp - lq) / N).backward()
        naive.append(_grads(obj))
    est, naive = torch.stack(est), torch.stack(naive)  # [G, P]

    def z(samples):
        se = samples.std(0) / math.sqrt(G)
        return (samples.mean(0) - exact).abs() / (se + 1e-3 * exact.abs().max())

    assert exact.abs().max() > 0.05  # a gradient worth matching
    rel = float((est.mean(0) - exact).norm() / exact.norm())
    print(f"max z: TraceGraph {float(z(est).max()):.2f} (relative error {rel:.3f}), "
          f"no score function {float(z(naive).max()):.1f}")
    assert z(est).max() < 5, z(est).max()
    assert z(naive).max() > 8  # the test can tell a biased estimator apart


# ----------------------------------------------------------------------------- (c) training closes the gap


def test_training_closes_the_gap_and_q_approaches_the_posterior():
    m, obj = denoiser(), objective("bernoulli", baseline=16)
    x, ranks = toy_batch()
    with torch.no_grad():
        before = enumerate_orders(obj, m, x, ranks, "bernoulli")
    opt = torch.optim.Adam(obj.parameters(), lr=0.03)
    X, R = x.repeat_interleave(32, 0), ranks.repeat_interleave(32, 0)
    for i in range(100):
        opt.zero_grad()
        obj.step(m, X, R, torch.Generator().manual_seed(i)).loss.backward()
        opt.step()
    with torch.no_grad():
        after = enumerate_orders(obj, m, x, ranks, "bernoulli")
    gap0, gap1 = before["log_px"] - before["elbo"], after["log_px"] - after["elbo"]
    print(f"gap before {gap0.tolist()}, after 100 steps {gap1.tolist()} nats")
    assert (gap0 > 0.05).all(), gap0
    assert (gap1 < 0.2 * gap0).all() and (gap1 < 0.03).all(), (gap0, gap1)
    assert (after["log_px"] > before["log_px"]).all()  # π learned to put mass on likely orders
    tv = 0.5 * (after["log_q"].exp() - after["log_post"].exp()).abs().sum(1)  # q vs the posterior
    assert (tv < 0.1).all(), tv


# ----------------------------------------------------------------------------- (d) the learned prior's order


def test_learned_prior_decodes_the_likely_order_greedily():
    n, a = 5, 0.9
    fake = MarkovFake(V, n, a)
    obj = orderlab.build("objective", "vi_orders", policy={"name": "learned", "net": "linear"}, guide="linear", baseline=16)
    x, ranks = markov_data(64, n, V, a, seed=0)
    l2r = torch.where(ranks >= 1, (ranks >= 1).long().cumsum(1), ranks)

    def l2r_fraction() -> float:
        d = decode(fake, obj.policy, x, ranks, cache=False)
        return float((d.ranks == l2r).all(1).double().mean())

    start = l2r_fraction()
    opt = torch.optim.Adam(obj.parameters(), lr=0.05)
    for i in range(100):
        xb, rb = markov_data(32, n, V, a, seed=1 + i)
        opt.zero_grad()
        obj.step(fake, xb, rb, torch.Generator().manual_seed(i)).loss.backward()
        opt.step()
    end = l2r_fraction()
    print(f"greedy decodes in left-to-right order: {start:.2f} before, {end:.2f} after training")
    assert start < 0.5 and end > 0.95, (start, end)


# ----------------------------------------------------------------------------- pyro's traces


def test_trace_shapes_and_masks_with_rows_of_different_lengths():
    m, obj = denoiser(), objective("bernoulli", perturb=1.0)
    x = torch.tensor([[0, 1, 2, 1], [2, 2, 0, 0], [1, 0, 1, 2]])
    ranks = torch.tensor([[0, 1, 1, 1], [0, 1, -1, -1], [1, 1, 1, 1]])
    for seed in range(5):
        mt, gt = obj.traces(m, x, ranks, torch.Generator().manual_seed(seed))
        sets = [gt.nodes[f"set_{k}"] for k in range(4)]  # the most positions a row generates
        assert "set_4" not in gt.nodes
        union = torch.zeros_like(ranks, dtype=torch.bool)
        for k, s in enumerate(sets):
            sel, ms = s["value"], mt.nodes[f"set_{k}"]
            assert sel.shape == (3, L) and s["log_prob"].shape == (3,) and ms["log_prob"].shape == (3,)
            assert mt.nodes[f"tokens_{k}"]["log_prob"].shape == (3,)
            assert not (sel & union).any()  # every position revealed once
            done = ~((ranks >= 1) & ~union).any(1)
            assert (s["mask"] == ~done).all()  # finished rows: masked, empty set, no cost
            assert not sel[done].any() and (s["log_prob"][done] == 0).all() and (ms["log_prob"][done] == 0).all()
            assert (mt.nodes[f"tokens_{k}"]["log_prob"][done] == 0).all()
            union |= sel
        assert (union == (ranks >= 1)).all()
        order = gt.nodes["_RETURN"]["value"]
        assert ((order >= 1) == (ranks >= 1)).all() and (order[ranks < 1] == ranks[ranks < 1]).all()
        p = _parts(mt, gt)
        torch.testing.assert_close(p["log_p"], log_likelihood(m, x, order).double(), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- the SVI path, IWAE, config


def test_svi_path_gives_the_same_gradient_and_trains():
    m, obj = denoiser(), objective("bernoulli", perturb=1.0)
    x, ranks = toy_batch(4)
    pyro.clear_param_store()
    svi = obj.svi(m, pyro.optim.Adam({"lr": 0.01}))
    obj.zero_grad()
    svi.loss_and_grads(svi.model, svi.guide, x, ranks, generator=torch.Generator().manual_seed(3))
    pyro_grads = [p.grad.clone() for p in obj.parameters()]
    obj.zero_grad()
    out = obj.step(m, x, ranks, torch.Generator().manual_seed(3))
    (out.loss * out.weight).backward()
    for a, b in zip(pyro_grads, (p.grad for p in obj.parameters())):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    before = [p.detach().clone() for p in obj.parameters()]
    svi.step(x, ranks)
    assert any(not torch.equal(a, b) for a, b in zip(before, obj.parameters()))  # pyro's optimiser stepped ours
    pyro.clear_param_store()


def test_order_distributions_give_unbiased_importance_weights():
    """E_{σ~q}[π(σ) p(x|σ) / q(σ)] = p(x) (the IWAE bound's K = 1 weight), with q and π
    through the order-distribution protocol; sampled orders score as in the trace."""
    m, obj = denoiser(), objective("bernoulli", perturb=1.0)
    x, ranks = toy_batch()
    with torch.no_grad():
        log_px = enumerate_orders(obj, m, x, ranks, "bernoulli")["log_px"]
        N = 3000
        X, R = x.repeat_interleave(N, 0), ranks.repeat_interleave(N, 0)
        prior, proposal = obj.prior(m), obj.proposal(m)
        order = proposal.sample(X, R, torch.Generator().manual_seed(0))
        log_w = prior.log_prob(X, order) + log_likelihood(m, X, order).double() - proposal.log_prob(X, order)
        w = (log_w.view(2, N) - log_px[:, None]).exp()
        assert ((w.mean(1) - 1).abs() < 4 * w.std(1) / math.sqrt(N)).all(), w.mean(1)
        ps = prior.sample(X[:8], R[:8], torch.Generator().manual_seed(1))
        assert torch.isfinite(prior.log_prob(X[:8], ps)).all() and ((ps >= 1) == (R[:8] >= 1)).all()


def test_config_build_state_dict_and_errors():
    obj = build("objective", {"name": "vi_orders", "policy": {"name": "learned", "net": "mlp"},
                              "guide": {"name": "mlp", "hidden": 8}, "baseline": 8, "entropy": 0.01})
    assert isinstance(obj, VIOrders) and not obj.trains_model
    keys = obj.state_dict().keys()
    assert any(k.startswith("policy.net") for k in keys) and any(k.startswith("guide.net") for k in keys)
    assert any(k.startswith("baseline.") for k in keys)
    assert build("objective", {"name": "vi_orders", "train_model": True}).trains_model
    with pytest.raises(ConfigError, match="objective.policy"):
        build("objective", {"name": "vi_orders", "policy": "l2r"})
    with pytest.raises(ConfigError, match="objective.baseline"):
        build("objective", {"name": "vi_orders", "baseline": 0})
    with pytest.raises(ValueError, match=r"tokens\[0, 1\]"):
        obj.step(denoiser(), torch.tensor([[0, 7, 1, 1]]), torch.tensor([[0, 1, 1, 1]]))


def test_train_model_flows_gradient_into_the_denoiser():
    m = denoiser().requires_grad_(True)
    obj = objective("bernoulli", train_model=True)
    x, ranks = toy_batch()
    out = obj.step(m, x, ranks, torch.Generator().manual_seed(0))
    out.loss.backward()
    assert obj.trains_model and m.embed.weight.grad is not None and m.embed.weight.grad.abs().sum() > 0
    frozen = denoiser().requires_grad_(True)
    objective("bernoulli").step(frozen, x, ranks).loss.backward()
    assert frozen.embed.weight.grad is None  # θ frozen: run under no_grad


@pytest.mark.slow
def test_learned_baseline_cuts_gradient_variance():
    """Study (~40 s): at fixed π and q, a trained nn_baseline lowers the variance of the
    score-function gradient (measured here: about 8x on this toy)."""
    m, obj = denoiser(), objective("bernoulli", baseline=16, perturb=1.0)
    x, ranks = toy_batch()
    opt = torch.optim.Adam(obj.baseline.parameters(), lr=0.01)  # only the baseline learns
    X, R = x.repeat_interleave(32, 0), ranks.repeat_interleave(32, 0)
    for i in range(300):
        opt.zero_grad()
        obj.step(m, X, R, torch.Generator().manual_seed(i)).loss.backward()
        opt.step()

    def variance() -> float:
        gs = []
        for g in range(200):
            obj.zero_grad()
            out = obj.step(m, x, ranks, torch.Generator().manual_seed(1000 + g))
            (-out.loss * out.weight).backward()
            gs.append(_grads(obj))
        return float(torch.stack(gs).var(0).sum())

    with_baseline = variance()
    obj.baseline = None
    assert variance() > 4 * with_baseline
