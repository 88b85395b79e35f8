"""Objectives: the NELBO estimators against exact enumeration over orders."""

import itertools
import math

import numpy as np
import pytest
import torch

import orderlab

from orderlab.likelihood import log_likelihood
from orderlab.objectives import BlockNelbo, MDMNelbo
from orderlab.objectives.likelihood import interpolating_nelbo_rate, prior_kl
from orderlab.processes.flat import Linear
from orderlab.builder import build


def _model(rule, V=4, L=4, seed=0):
    torch.manual_seed(seed)
    m = orderlab.build("model", "transformer", vocab_size=V, max_len=L, attention=rule, d_model=16, n_layers=2, n_heads=2)
    with torch.no_grad():  # sharper than init so orders matter
        for p in m.parameters():
            p.mul_(8.0)
    return m.eval()


def _expected_nll(model, x, ranks, orders):
    lls = torch.stack([log_likelihood(model, x, o[None]) for o in orders])  # [n_orders, 1]
    return -lls.mean().item()


def _estimate(obj, model, x, ranks, n=6000):
    """(mean, standard error, output) of ``obj`` over ``n`` copies of one row."""
    X, R = x.expand(n, -1), ranks.expand(n, -1)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        out = obj(model, X, R, g)
    return out.nats.mean().item(), out.nats.std().item() / math.sqrt(n), out


def test_mdm_nelbo_equals_expected_any_order_nll():
    """Continuous-time NELBO = E over uniform orders of -log p(x | order) (MDLM/MD4)."""
    model = _model("bidirectional")
    x = torch.tensor([[1, 3, 0, 2]])
    ranks = torch.tensor([[0, 1, 1, 1]])
    orders = [torch.tensor([0, *(p.index(i) + 1 for i in range(3))]) for p in itertools.permutations(range(3))]
    with torch.no_grad():
        want = _expected_nll(model, x, ranks, orders)
    got, se, out = _estimate(MDMNelbo(Linear()), model, x, ranks)
    assert not out.exact
    assert abs(got - want) < 4 * se + 1e-3, (got, want, se)


def test_block_nelbo_equals_expected_blockwise_order_nll():
    """BD3-LM NELBO = E over orders uniform inside blocks, blocks left to right."""
    model = _model({"name": "block_causal", "block_size": 2})
    x = torch.tensor([[1, 3, 0, 2]])
    ranks = torch.ones(1, 4, dtype=torch.long)
    orders = [torch.tensor([a, 3 - a, 2 + b, 5 - b]) for a in (1, 2) for b in (1, 2)]
    with torch.no_grad():
        want = _expected_nll(model, x, ranks, orders)
    got, se, _ = _estimate(BlockNelbo(Linear()), model, x, ranks)
    assert abs(got - want) < 4 * se + 1e-3, (got, want, se)


def test_set_nll_is_exact_nll_of_the_sampled_order():
    model = _model("set_causal")
    x = torch.tensor([[1, 3, 0, 2]])
    ranks = torch.tensor([[0, 1, 1, 1]])
    obj = orderlab.build("objective", "set_nll", process="quench")
    out = obj(model, x, ranks, torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = -log_likelihood(model, x, torch.tensor([[0, 1, 2, 3]]))
    torch.testing.assert_close(out.nats, want)
    assert out.exact and out.label == "nll"
    assert out.tokens.tolist() == [3.0]
    assert out.loss.item() == pytest.approx(want.item() / 3, rel=1e-5)


def test_objectives_check_the_model_and_process():
    with pytest.raises(ValueError, match="bidirectional"):
        MDMNelbo()(_model("set_causal"), torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="flat"):
        orderlab.build("objective", "block_nelbo", process="quench")
    with pytest.raises(ValueError, match="one corruption"):
        orderlab.build("objective", "mdm_nelbo", process={"name": "mixture", "processes": ["linear", {"name": "cosine", "corruption": "uniform"}]})
    assert orderlab.build("objective", "mdm_nelbo", process={"name": "mixture", "processes": ["linear", "cosine"]}).mask_prob == 1.0
    obj = build("objective", {"name": "set_nll", "process": {"name": "staggered", "d": 2}, "steps": 3})
    assert obj.steps == 3 and type(obj.process).__name__ == "Staggered"


# ----------------------------------------------------------------------------- hybrid / uniform NELBO
# A toy with K tokens + [MASK] (id K), L positions, per-position schedules and a denoiser
# table x̂(z) over the (K+1)^L noisy states. The reference is the discrete-time ELBO with T
# steps of the interpolating process (exact: sums over every noisy state, never sampled);
# the continuous-time rate must be its T -> ∞ limit.


def _pi(K, m):
    p = torch.full((K + 1,), (1 - m) / K, dtype=torch.float64)
    p[K] = m
    return p


def _states(K, L):
    return torch.tensor(list(itertools.product(range(K + 1), repeat=L)))  # [S, L]


def _marg(probs, a, K, m):
    """q_a(·|x) = a·x + (1 − a)·π over K + 1 states; probs [..., K] (a one-hot or x̂), a [...]."""
    e = torch.cat([probs, torch.zeros_like(probs[..., :1])], -1)
    return a[..., None] * e + (1 - a[..., None]) * _pi(K, m)


def _onehot(x, K):
    return torch.nn.functional.one_hot(x, K).double()


def _q_joint(x, a, K, m):
    """(Z [S, L], q_a(Z | x) [S]) for the product of per-position marginals."""
    Z = _states(K, len(x))
    q = _marg(_onehot(x, K), a, K, m)  # [L, K+1]
    return Z, q.gather(1, Z.T).prod(0)


def _reverse(z, prior_s, a_t, a_s, K, m):
    """[S, L, K+1]: ∝ q(z_t | z_s) · prior_s(z_s), q(z_t|z_s) = (a_t/a_s) δ + (1 − a_t/a_s) π."""
    r = (a_t / a_s)[None, :, None]
    fwd = r * _onehot(z, K + 1) + (1 - r) * _pi(K, m)[z][..., None]  # [S, L, K+1] over z_s
    w = fwd * prior_s
    return w / w.sum(-1, keepdim=True).clamp_min(1e-300)  # unreachable z_t (e.g. [MASK] when m = 0): 0


def _kl(p, q):
    return (torch.xlogy(p, p) - torch.xlogy(p, q)).sum(-1)


def _discrete_nelbo(x, xhat, alpha, T, K, m):
    """−ELBO with T reverse steps on t_j = j/T: prior KL + Σ_{j>=2} E KL(q(z_s|z_t,x) ‖ p(z_s|z_t))
    − E log p(x | z_{t_1}); ``xhat`` [S, L, K] per noisy state, ``alpha(t)`` -> [L]."""
    total = _kl(_marg(_onehot(x, K), alpha(1.0), K, m), _pi(K, m).expand(len(x), -1)).sum()
    for j in range(1, T + 1):
        a_t, a_s = alpha(j / T), alpha((j - 1) / T)
        Z, qz = _q_joint(x, a_t, K, m)
        p = _reverse(Z, _marg(xhat, a_s.expand(len(Z), -1), K, m), a_t, a_s, K, m)  # [S, L, K+1]
        if j == 1:
            term = -p.gather(-1, x.expand(len(Z), -1)[..., None])[..., 0].log()  # −log p(x_i | z)
        else:
            q = _reverse(Z, _marg(_onehot(x, K), a_s, K, m).expand(len(Z), -1, -1), a_t, a_s, K, m)
            term = _kl(q, p)
        total = total + (qz * torch.where(qz > 0, term.sum(1), 0.0)).sum()
    return float(total)


def _rate_integral(x, xhat, alpha, dalpha, K, m, lo=0.0, n=200):
    """Σ_i ∫_lo^1 E_{z_t}[rate_i] dt (Gauss–Legendre in t, exact sum over every z_t)."""
    u, w = (torch.as_tensor(v, dtype=torch.float64) for v in np.polynomial.legendre.leggauss(n))
    ts, w = lo + (1 - lo) * (u + 1) / 2, w * (1 - lo) / 2
    total = 0.0
    for t, wt in zip(ts.tolist(), w.tolist()):
        Z, qz = _q_joint(x, alpha(t), K, m)
        S, L = Z.shape
        r = interpolating_nelbo_rate(xhat.log(), x.expand(S, L), Z, alpha(t).expand(S, L), dalpha(t).expand(S, L), m, K)
        total += wt * float((qz[:, None] * torch.where(qz[:, None] > 0, r, 0.0)).sum())
    return total


def _continuous_nelbo(x, xhat, alpha, dalpha, K, m):
    """The continuous-time NELBO: the rate integral plus the prior KL (0 for m = 1 here)."""
    prior = float(prior_kl(alpha(1.0), m, K).sum()) if m < 1 else 0.0
    return _rate_integral(x, xhat, alpha, dalpha, K, m) + prior


def _toy(K=2, L=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    xhat = torch.softmax(2 * torch.randn((K + 1) ** L, L, K, generator=g, dtype=torch.float64), -1)  # [S, L, K]
    alpha = lambda t: torch.tensor([1 - t, 1 - t**2], dtype=torch.float64)  # noqa: E731  a hyperschedule
    dalpha = lambda t: torch.tensor([-1.0, -2 * t], dtype=torch.float64)  # noqa: E731
    return xhat, alpha, dalpha


def test_discrete_reference_equals_path_enumeration():
    """The reference's KL decomposition equals E_q[log p(path) − log q(path | x)] summed over
    every latent trajectory (T = 3, L = 2, 9^3 paths), for the hybrid process."""
    K, L, T, m = 2, 2, 3, 0.7
    xhat, alpha, _ = _toy(K, L)
    x = torch.tensor([0, 1])
    Z = _states(K, L)
    ts = [j / T for j in range(T + 1)]
    elbo = 0.0
    for path in itertools.product(range(len(Z)), repeat=T):  # z at t_1, ..., t_T
        zs = [x] + [Z[i] for i in path]
        logq = _q_joint(x, alpha(ts[1]), K, m)[1][path[0]].log()
        logp = _pi(K, m)[zs[T]].log().sum()  # prior at t = 1
        for j in range(1, T + 1):
            a_t, a_s = alpha(ts[j]), alpha(ts[j - 1])
            zt = zs[j][None]
            p = _reverse(zt, _marg(xhat[path[j - 1]][None], a_s[None], K, m), a_t, a_s, K, m)[0]
            logp = logp + p.gather(1, zs[j - 1][:, None]).log().sum()
            if j >= 2:  # forward step z_{t_{j-1}} -> z_{t_j}
                r = a_t / a_s
                fwd = r * (zs[j] == zs[j - 1]).double() + (1 - r) * _pi(K, m)[zs[j]]
                logq = logq + fwd.log().sum()
        q = logq.exp()
        if q > 0:
            elbo += float(q * (logp - logq))
    assert -elbo == pytest.approx(_discrete_nelbo(x, xhat, alpha, T, K, m), rel=1e-10)


@pytest.mark.parametrize("m", [1.0, 0.7, 0.0], ids=["absorbing", "hybrid", "uniform"])
def test_interpolating_rate_is_the_continuous_limit_of_the_discrete_elbo(m):
    """∫ E[rate] dt equals lim_{T→∞} of the discrete-time NELBO: the error shrinks as 1/T
    and the Richardson extrapolation (4·N_400 − N_100)/3 of the discrete NELBOs matches."""
    K, L = 2, 2
    xhat, alpha, dalpha = _toy(K, L, seed=1)
    for x in ([0, 1], [1, 1]):
        x = torch.tensor(x)
        c = _continuous_nelbo(x, xhat, alpha, dalpha, K, m)
        n100, n400 = (_discrete_nelbo(x, xhat, alpha, T, K, m) for T in (100, 400))
        assert 3.0 < abs(n100 - c) / abs(n400 - c) < 5.0, (m, c, n100, n400)  # first order in 1/T
        assert (4 * n400 - n100) / 3 == pytest.approx(c, rel=1e-4), (m, c, n100, n400)


@pytest.mark.parametrize("m", [0.7, 0.0], ids=["hybrid", "uniform"])
def test_hybrid_nelbo_is_a_bound(m):
    """ELBO_T ≤ log p_T(x) for the T-step model, whose marginal p_T is computed exactly
    (Σ_x p_T(x) = 1), and the continuous NELBO ≥ −log p_T(x) at large T."""
    K, L, T = 2, 2, 200
    xhat, alpha, dalpha = _toy(K, L, seed=2)
    Z = _states(K, L)
    P = _pi(K, m)[Z].prod(1)  # [S] at t = 1
    for j in range(T, 1, -1):  # marginal of the reverse chain down to t_1
        a_t, a_s = alpha(j / T), alpha((j - 1) / T)
        p = _reverse(Z, _marg(xhat, a_s.expand(len(Z), -1), K, m), a_t, a_s, K, m)  # [S_t, L, K+1]
        P = (P[:, None] * p.permute(1, 0, 2)[torch.arange(L)[:, None], :, Z.T].prod(0).T).sum(0)  # [S_s]
    p0 = _reverse(Z, _marg(xhat, alpha(0.0).expand(len(Z), -1), K, m), alpha(1 / T), alpha(0.0), K, m)
    xs = [torch.tensor(v) for v in itertools.product(range(K), repeat=L)]
    px = torch.stack([(P * p0.gather(-1, x.expand(len(Z), -1)[..., None])[..., 0].prod(1)).sum() for x in xs])
    assert float(px.sum()) == pytest.approx(1.0, abs=1e-10)
    for x, p in zip(xs, px):
        nelbo_T = _discrete_nelbo(x, xhat, alpha, T, K, m)
        assert nelbo_T >= -math.log(p) - 1e-12
        assert _continuous_nelbo(x, xhat, alpha, dalpha, K, m) >= -math.log(p), x


def test_absorbing_rate_is_tight_for_the_true_conditionals():
    """m = 1 with x̂ = the data's conditionals given the unmasked tokens: the continuous
    NELBO equals −log p_data(x) (any-order AR is exact), for every x."""
    K, L = 2, 2
    _, alpha, dalpha = _toy(K, L)
    g = torch.Generator().manual_seed(3)
    pdata = torch.rand(K, K, generator=g, dtype=torch.float64) + 0.1
    pdata /= pdata.sum()  # p(x_0, x_1)
    Z = _states(K, L)
    xhat = torch.empty(len(Z), L, K, dtype=torch.float64)
    for s, z in enumerate(Z):
        for i in range(L):
            j = 1 - i
            cond = pdata if i == 0 else pdata.T  # cond[x_i, x_j]
            xhat[s, i] = cond[:, z[j]] / cond[:, z[j]].sum() if z[j] < K else cond.sum(1)
    for x in itertools.product(range(K), repeat=L):
        got = _continuous_nelbo(torch.tensor(x), xhat, alpha, dalpha, K, 1.0)
        assert got == pytest.approx(-math.log(pdata[x]), rel=1e-6)


def _exact_objective(obj, model, x, ranks):
    """The estimator's exact expectation: t ~ U[eps, 1] (so ∫_eps^1 / (1 − eps)), every
    noisy state z_t, plus the prior KL of the generated positions."""
    K, L = model.vocab_size, x.shape[1]
    gen = ranks[0] > 0
    Z = _states(K, L)
    with torch.no_grad():  # x̂ for every noisy state, read at every position
        s = model.rule.noisy_stream(Z, torch.ones_like(Z, dtype=torch.bool), torch.ones_like(Z, dtype=torch.bool))
        probs = torch.softmax(model(s).double(), -1)  # [S, L, K]
    xhat = torch.zeros(len(Z), L, K, dtype=torch.float64).scatter(1, s.out[..., None].expand(-1, -1, K), probs)
    alpha = lambda t: torch.where(gen, obj.process.alpha(t, L)[0].double(), 1.0)  # noqa: E731  given: never noised
    dalpha = lambda t: torch.where(gen, obj.process.dalpha(t, L)[0].double(), 0.0)  # noqa: E731
    body = _rate_integral(x[0], xhat, alpha, dalpha, K, obj.mask_prob, lo=obj.eps) / (1 - obj.eps)
    return body + float(prior_kl(alpha(1.0), obj.mask_prob, K)[gen].sum())


@pytest.mark.parametrize("process", [{"name": "linear", "corruption": {"name": "hybrid", "gamma": 0.3}},
                                     {"name": "loglinear", "eps": 0.05, "corruption": "uniform"},
                                     {"name": "cosine", "corruption": {"name": "hybrid", "gamma": 0.0}}],
                         ids=["hybrid", "uniform-with-prior", "absorbing"])
def test_mdm_nelbo_hybrid_estimator_is_unbiased(process):
    """The one-sample estimate (t stratified, z_t from the process) averages to the exact
    expectation over t and every noisy state, for a real model; labelled a bound."""
    model = _model("bidirectional", V=3, L=3)
    x = torch.tensor([[2, 0, 1]])
    ranks = torch.tensor([[0, 1, 1]])
    obj = orderlab.build("objective", "mdm_nelbo", process=process)
    want = _exact_objective(obj, model, x, ranks)
    got, se, out = _estimate(obj, model, x, ranks, n=20000)
    assert out.label == "nelbo (bound)" and torch.isfinite(out.nats).all()
    assert abs(got - want) < 4 * se + 1e-3, (got, want, se)


def test_mdm_nelbo_gamma_zero_is_the_absorbing_nelbo():
    """γ = 0 gives today's absorbing NELBO draw for draw; the general rate with m = 1 is the
    absorbing weight times the cross-entropy at masked positions, 0 at clean ones."""
    model = _model("bidirectional", V=4, L=4)
    x = torch.tensor([[1, 3, 0, 2]]).expand(64, -1)
    ranks = torch.tensor([[0, 1, 1, 1]]).expand(64, -1)
    a = orderlab.build("objective", "mdm_nelbo", process={"name": "cosine", "corruption": {"name": "hybrid", "gamma": 0.0}})(model, x, ranks, torch.Generator().manual_seed(5))
    b = orderlab.build("objective", "mdm_nelbo", process="cosine")(model, x, ranks, torch.Generator().manual_seed(5))
    assert torch.equal(a.nats, b.nats)
    g = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(6, 4, generator=g, dtype=torch.float64), -1)
    xs, z = torch.tensor([0, 1, 2, 3, 0, 1]), torch.tensor([4, 4, 4, 3, 0, 1])  # 4 = [MASK]
    al, da = torch.rand(6, generator=g, dtype=torch.float64), -torch.rand(6, generator=g, dtype=torch.float64)
    want = torch.where(z == 4, -da / (1 - al) * -logp.gather(1, xs[:, None])[:, 0], 0.0)
    torch.testing.assert_close(interpolating_nelbo_rate(logp, xs, z, al, da, 1.0, 4), want, rtol=1e-12, atol=1e-12)


def test_hybrid_nelbo_gradients_are_finite_where_alpha_is_0_or_1():
    """Windowed schedules have α = 1 before and α = 0 after their window (α' = 0 there)."""
    model = _model("bidirectional", V=4, L=8)
    model.train()
    obj = orderlab.build("objective", "mdm_nelbo", process={"name": "staggered", "d": 1, "corruption": {"name": "hybrid", "gamma": 0.1}})
    x = torch.randint(0, 4, (16, 8), generator=torch.Generator().manual_seed(0))
    out = obj(model, x, torch.ones(16, 8, dtype=torch.long), torch.Generator().manual_seed(1))
    out.loss.backward()
    assert torch.isfinite(out.nats).all() and (out.nats >= 0).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_prior_kl_is_the_kl_of_the_time_one_marginal_to_pi():
    K = 3
    a = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    for m in (0.0, 0.7):
        want = _kl(_marg(_onehot(torch.tensor([1, 1, 1]), K), a, K, m), _pi(K, m).expand(3, -1))
        torch.testing.assert_close(prior_kl(a, m, K), want)
    assert prior_kl(a, 1.0, K).tolist() == [0.0, math.inf, math.inf]  # absorbing: infinite unless α(1) = 0
