"""The importance-weighted bound over orders against exact enumeration of every order."""

import math

import pytest
import torch

import orderlab

import orderlab.processes as P
from orderlab.likelihood import log_likelihood
from orderlab.objectives import MDMNelbo, ProcessOrders, as_orders, iwae_bound, likelihood_table
from orderlab.objectives.iwae import nested_iwae

from enumerate_orders import all_orders  # tests/enumerate_orders.py

V = 3
X = torch.tensor([[1, 2, 0, 2], [2, 0, 1, 1]])
RANKS = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])  # row 1 has a given position


def _model(rule="set_causal", seed=0):
    torch.manual_seed(seed)
    m = orderlab.build("model", "transformer", vocab_size=V, max_len=4, attention=rule, d_model=16, n_layers=2, n_heads=2)
    with torch.no_grad():  # sharper than init, so that orders matter
        for p in m.parameters():
            p.mul_(6.0)
    return m.eval()




def _exact(model, x, template, prior, multi=False):
    """``(orders, log π(σ) + log p(x|σ) per order, log p(x))`` by enumeration, one row."""
    table = all_orders(template, multi)
    joint = prior.log_prob(x.expand(len(table), -1), table) + log_likelihood(model, x.expand(len(table), -1), table).double()
    return table, joint, torch.logsumexp(joint, 0).item()


class Enumerated:
    """A test order distribution: explicit log-weights over an explicit list of orders of one row."""

    def __init__(self, table, logits):
        self.table, self.logp = table, torch.log_softmax(logits.double(), 0)

    def sample(self, x, ranks, generator=None):
        i = torch.multinomial(self.logp.exp(), len(x), replacement=True, generator=generator)
        return self.table[i]

    def log_prob(self, x, order):
        eq = (order[:, None] == self.table[None]).all(-1)  # [B, n]
        return torch.where(eq, self.logp[None], torch.full_like(self.logp[None], -math.inf)).logsumexp(1)


def _mean(model, x, ranks, prior, proposal, k, n, seed=0):
    """Mean and standard error over ``n`` independent draws of the bound."""
    b = iwae_bound(model, x.expand(n, -1), ranks.expand(n, -1), prior, proposal, k=k, generator=torch.Generator().manual_seed(seed))
    return b.mean().item(), b.std().item() / math.sqrt(n)


@pytest.mark.parametrize("row", [0, 1])
@pytest.mark.parametrize(
    "prior,proposal",
    [
        ("linear", None),
        # a near-left-to-right prior with full support (staggered alone gives some orders probability 0)
        ({"name": "mixture", "processes": [{"name": "staggered", "d": 1}, "linear"], "weights": [0.8, 0.2]}, "linear"),
        ("linear", {"name": "staggered", "d": 2}),
    ],
)
def test_bound_rises_with_k_below_exact_log_px(row, prior, proposal):
    model = _model()
    x, ranks = X[row : row + 1], RANKS[row : row + 1]
    with torch.no_grad():
        _, _, exact = _exact(model, x, ranks[0], as_orders(prior))
        means = [_mean(model, x, ranks, prior, proposal, k, n=2400 // k + 100, seed=k) for k in (1, 4, 16, 64)]
    for m, se in means:
        assert m <= exact + 4 * se + 1e-5, (m, se, exact)
    for (a, sa), (b, sb) in zip(means, means[1:]):
        assert b > a - 4 * math.hypot(sa, sb), means  # monotone in K, in expectation
    assert means[-1][0] > means[0][0]  # strictly tighter at K = 64 than at K = 1
    assert exact - means[-1][0] < 0.5 * (exact - means[0][0]) + 4 * means[-1][1]  # closes most of the gap


def test_true_posterior_gives_exact_log_px_for_every_draw():
    model = _model()
    x, ranks = X[1:2], RANKS[1:2]
    prior = ProcessOrders(P.Cosine())
    with torch.no_grad():
        table, joint, exact = _exact(model, x, ranks[0], prior)
        posterior = Enumerated(table, joint)  # q(σ|x) = π(σ) p(x|σ) / p(x)
        for k in (1, 5):
            b = iwae_bound(model, x.expand(50, -1), ranks.expand(50, -1), prior, posterior, k=k, generator=torch.Generator().manual_seed(k))
            torch.testing.assert_close(b, torch.full_like(b, exact), rtol=0, atol=2e-5)


def test_k1_with_flat_orders_is_minus_the_mdm_nelbo():
    """L_1 with q = π = uniform orders = -E_σ NLL(σ) = -(continuous-time MDM NELBO)."""
    model = _model("bidirectional")
    x, ranks = X[:1], RANKS[:1]
    table = all_orders(ranks[0])
    with torch.no_grad():
        want = log_likelihood(model, x.expand(len(table), -1), table).double().mean().item()  # exact E_σ
        m, se = _mean(model, x, ranks, "linear", None, 1, n=6000)
        nelbo = MDMNelbo(P.Linear())(model, x.expand(6000, -1), ranks.expand(6000, -1), torch.Generator().manual_seed(3)).nats
    assert abs(m - want) < 4 * se + 1e-4, (m, want, se)
    assert abs(-nelbo.mean().item() - want) < 4 * nelbo.std().item() / math.sqrt(6000) + 2e-3


def test_multi_token_sets():
    """Binned orders (steps = 2): the prior sums over ordered set partitions."""
    model = _model()
    x, ranks = X[:1], RANKS[:1]
    prior = ProcessOrders(P.Linear(), steps=2)
    with torch.no_grad():
        table, joint, exact = _exact(model, x, ranks[0], prior, multi=True)
        assert prior.log_prob(x.expand(len(table), -1), table).exp().sum().item() == pytest.approx(1.0, abs=1e-12)
        m1, s1 = _mean(model, x, ranks, prior, None, 1, n=3000)
        m16, s16 = _mean(model, x, ranks, prior, None, 16, n=400)
    assert m1 <= exact + 4 * s1 and m16 <= exact + 4 * s16 + 1e-5
    assert m16 > m1 + 4 * math.hypot(s1, s16)


def test_bound_is_differentiable_and_checks_k():
    model = _model()
    b = iwae_bound(model, X, RANKS, "linear", k=3, generator=torch.Generator().manual_seed(0))
    assert b.shape == (2,)
    b.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="k must be"):
        iwae_bound(model, X, RANKS, "linear", k=0)
    with pytest.raises(TypeError, match="order distribution"):
        as_orders(3.0)


def test_likelihood_table_rows():
    model = _model()
    x, ranks = X.repeat(200, 1), RANKS.repeat(200, 1)
    rows = likelihood_table(model, x, ranks, ks=(1, 4, 16), nelbo_samples=8, max_rows=1000, generator=torch.Generator().manual_seed(0))
    names = [(r["estimate"], r["k"]) for r in rows]
    assert names == [("iwae", 1), ("iwae", 4), ("iwae", 16), ("mdm_nelbo", None), ("l2r", None), ("r2l", None)]
    bits = {n: r["bits_per_token"] for n, r in zip(names, rows)}
    assert all(r["label"] == ("nll" if r["estimate"] in ("l2r", "r2l") else "bound") for r in rows)
    assert bits[("iwae", 16)] < bits[("iwae", 4)] < bits[("iwae", 1)]
    assert abs(bits[("iwae", 1)] - bits[("mdm_nelbo", None)]) < 4 * rows[0]["stderr"] + 0.01
    # the fixed orders: exact NLL per token of the two rows, right to left reversing the generated positions
    l2r = torch.tensor([[1, 2, 3, 4], [0, 1, 2, 3]])
    r2l = torch.tensor([[4, 3, 2, 1], [0, 3, 2, 1]])
    n_tok = 7 * 200
    for name, order in (("l2r", l2r), ("r2l", r2l)):
        with torch.no_grad():
            want = -log_likelihood(model, X, order).sum().item() * 200 / n_tok / math.log(2)
        assert bits[(name, None)] == pytest.approx(want, rel=1e-5)


def test_nested_iwae_groups_and_monotone_in_k():
    """From one set of weights: K = N is log-mean-exp of all, K = 1 their mean, each K the
    mean of its disjoint groups' L_K; nested K's (each divides the next) never decrease."""
    g = torch.Generator().manual_seed(0)
    log_w = torch.randn(5, 16, generator=g, dtype=torch.float64) * 3
    est = nested_iwae(log_w, (1, 2, 4, 16))
    torch.testing.assert_close(est[1], log_w.mean(1))
    torch.testing.assert_close(est[16], torch.logsumexp(log_w, 1) - math.log(16))
    torch.testing.assert_close(est[4], (torch.logsumexp(log_w.view(5, 4, 4), -1) - math.log(4)).mean(1))
    assert all((est[a] <= est[b] + 1e-12).all() for a, b in ((1, 2), (2, 4), (4, 16)))
    three = nested_iwae(log_w, (3,))[3]  # 5 groups of 3, the 16th weight unused
    torch.testing.assert_close(three, (torch.logsumexp(log_w[:, :15].view(5, 5, 3), -1) - math.log(3)).mean(1))
    with pytest.raises(ValueError, match="k must be in"):
        nested_iwae(log_w, (32,))
