"""Learned schedules (GenMD4): the processes, the NELBO, and its REINFORCE-LOO gradient
against the exact gradient of the expected NELBO (masks enumerated, t by quadrature)."""

import itertools
import math

import numpy as np
import pytest
import torch

import orderlab

import orderlab.processes as P
from orderlab.objectives import GenMD4Nelbo, MDMNelbo
from orderlab.objectives.likelihood import _times, _weighted_nats
from orderlab.builder import build
from conftest import gen, sharp_denoiser


def _model(V=2, L=2, seed=0, scale=4.0):
    return sharp_denoiser(V, L, seed, scale)


# ---- the processes ------------------------------------------------------------------


def test_learned_position_is_a_polynomial_schedule_per_position():
    p = P.LearnedPositionSchedule(max_len=6, power_init=2.0, eps=0.0)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    torch.testing.assert_close(p.alpha(t, 4), P.Polynomial(2.0).alpha(t, 4), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(p.dalpha(t, 4), P.Polynomial(2.0).dalpha(t, 4), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(p.weight(t, 4), P.Polynomial(2.0).weight(t, 4), rtol=1e-6, atol=1e-6)
    u = torch.rand(5, 4, generator=gen(0), dtype=torch.float64)
    torch.testing.assert_close(p.inverse_alpha(u, 4), P.Polynomial(2.0).inverse_alpha(u, 4), rtol=1e-6, atol=1e-7)
    q = P.LearnedPositionSchedule(max_len=3, power_init=[0.5, 1.0, 3.0], eps=0.1)
    a = q.alpha(torch.tensor([0.25]), 3)
    want = 1 - 0.9 * torch.tensor([0.25**0.5, 0.25, 0.25**3])
    torch.testing.assert_close(a[0], want, rtol=1e-6, atol=1e-7)
    assert q.alpha(torch.ones(1), 3).allclose(torch.full((1, 3), 0.1))  # α(1) = ε
    with pytest.raises(ValueError, match="3 positions, got length 4"):
        q.alpha(torch.tensor([0.5]), 4)
    with pytest.raises(ValueError, match="power_init"):
        P.LearnedPositionSchedule(max_len=3, power_init=[1.0, 2.0])
    assert repr(q) == "LearnedPositionSchedule(max_len=3, eps=0.1)"
    assert [n for n, _ in q.named_parameters()] == ["rho"]


def test_token_schedule_depends_on_the_tokens():
    p = build("process", {"name": "learned_token", "power_init": [0.5, 1.0, 3.0], "eps": 0.0}, vocab_size=3)
    x = torch.tensor([[0, 1, 2, 2], [2, 2, 1, 0]])
    t = torch.tensor([0.3, 0.6], dtype=torch.float64)
    w = torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64)
    want = 1 - t[:, None] ** w[x]  # [2, 4]
    torch.testing.assert_close(p.given(x).alpha(t, 4), want, rtol=1e-6, atol=1e-7)
    av = p.alpha_values(t, 4)  # [B, L, V]: every value at every position
    assert av.shape == (2, 4, 3)
    torch.testing.assert_close(av.gather(-1, x[..., None])[..., 0], want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(p.dalpha_values(t, 4)[0, 0], -w * 0.3 ** (w - 1), rtol=1e-6, atol=1e-7)
    assert P.Linear().alpha_values(t, 4).shape == (2, 4, 1)  # value-free schedules: a value axis of 1
    for call in (lambda: p.alpha(t, 4), lambda: p.sample_ranks(torch.ones(2, 4, dtype=torch.long)), lambda: p.log_prob(x)):
        with pytest.raises(NotImplementedError, match="LearnedTokenSchedule.*given"):
            call()
    with pytest.raises(ValueError, match=r"x\[0, 1\] = 3"):
        p.given(torch.tensor([[0, 3]]))
    # masks: P(noised at t) = 1 - α_t(x_i), per token value
    N = 20000
    xs = torch.tensor([[0, 1, 2]]).expand(N, 3)
    _, noised = p.corrupt(xs, 0.4, mask_id=3, vocab_size=3, generator=gen(1))
    want = 0.4 ** w  # [3]
    freq = noised.double().mean(0)
    assert ((freq - want).abs() <= 5 * (want * (1 - want) / N).sqrt()).all(), (freq, want)


def test_token_schedule_orders_through_given():
    """Per-row powers: ``given(x).log_prob`` sums to 1 over orders and matches sampling."""
    p = P.LearnedTokenSchedule(3, power_init=[0.4, 1.0, 4.0], eps=0.0)
    x = torch.tensor([[0, 2, 1, 2], [1, 1, 0, 2]])
    table = torch.tensor([[q.index(i) + 1 for i in range(4)] for q in itertools.permutations(range(4))])  # [24, 4]
    N = 20000
    for row in range(2):
        g = p.given(x[row : row + 1].expand(len(table), -1))
        with torch.no_grad():
            prob = g.log_prob(table).exp()
            s = p.given(x[row : row + 1].expand(N, -1)).sample_ranks(torch.ones(N, 4, dtype=torch.long), generator=gen(row))
        assert prob.sum().item() == pytest.approx(1.0, abs=1e-5)
        freq = (s[:, None] == table[None]).all(-1).double().mean(0)
        assert ((freq - prob).abs() <= 5 * (prob * (1 - prob) / N).sqrt() + 1e-3).all()


def test_log_prob_is_differentiable_in_the_learned_powers():
    p = P.LearnedPositionSchedule(max_len=3, power_init=[0.5, 1.0, 2.0], eps=0.0)
    lp = p.log_prob(torch.tensor([[1, 2, 3]]))
    lp.sum().backward()
    assert p.rho.grad is not None and p.rho.grad.abs().sum() > 0


# ---- the NELBO ----------------------------------------------------------------------


def test_integrand_equals_mdm_nelbo_for_fixed_value_free_powers():
    """Shared randomness: with w the same for every value, GenMD4's integrand is MDMNelbo's."""
    model = _model(V=4, L=6)
    x = torch.randint(0, 4, (32, 6), generator=gen(0))
    ranks = torch.ones(32, 6, dtype=torch.long)
    ranks[:, 0] = 0
    t = _times(32, gen(5), "cpu", 1e-3)
    for power, ref in ((1.0, P.Linear()), (2.5, P.Polynomial(2.5))):
        obj = GenMD4Nelbo(P.LearnedTokenSchedule(4, power_init=power, eps=0.0))
        with torch.no_grad():
            f, _ = obj.integrand(model, x, ranks, t, gen(7))
            _, noised = ref.corrupt(x, t, model.mask_id, 4, ranks=ranks, generator=gen(7))
            s = model.rule.noisy_stream(torch.where(noised, model.mask_id, x), ranks >= 0, noised)
            want = _weighted_nats(model, s, x, ref.weight(t, 6))
        torch.testing.assert_close(f, want, rtol=1e-5, atol=1e-5)
    # the whole estimate against MDMNelbo's (w = 1: linear), within Monte Carlo error
    n = 4000
    X, R = x[:1].expand(n, -1), ranks[:1].expand(n, -1)
    obj = GenMD4Nelbo(P.LearnedTokenSchedule(4, eps=0.0))
    with torch.no_grad():
        a = obj(model, X, R, gen(1)).nats
        b = MDMNelbo(P.Linear())(model, X, R, gen(2)).nats
    se = math.hypot(a.std().item(), b.std().item()) / math.sqrt(n)
    assert abs(a.mean().item() - b.mean().item()) < 4 * se + 0.01


def _exact_nelbo(model, x, W, eps, t1, n_quad=48):
    """Float64 scalar: the expected NELBO of one row by enumeration of the masks and
    Gauss-Legendre quadrature in log t. ``W`` Float64 [L, V]: the power of value v at position i."""
    L, V = W.shape
    nodes, weights = np.polynomial.legendre.leggauss(n_quad)
    lo = math.log(t1)
    s = torch.tensor(lo / 2 * (1 - nodes), dtype=torch.float64)  # nodes on [log t1, 0]
    ts, ws = s.exp(), torch.tensor(weights * (-lo) / 2, dtype=torch.float64) * s.exp()  # dt = t ds
    w_x = W[torch.arange(L), x]  # [L]
    total = 0.0
    for z in itertools.product([False, True], repeat=L):
        z = torch.tensor(z)
        masked = (1 - eps) * ts[:, None] ** w_x  # [Q, L] P(masked at t)
        q = torch.where(z, masked, 1 - masked).prod(1)  # [Q]
        xt = torch.where(z, model.mask_id, x)[None]
        st = model.rule.noisy_stream(xt, torch.ones_like(xt, dtype=torch.bool), torch.ones_like(xt, dtype=torch.bool))
        with torch.no_grad():
            logp = torch.log_softmax(model(st).double(), -1)[0]  # [L, V], queries in position order
        assert st.out[0].tolist() == list(range(L))
        nll = -logp[torch.arange(L), x]  # [L]
        # f(z, t) = Σ_{i masked} [w_{i,x}/t · nll_i + Σ_v (w_{i,v} - w_{i,x})/t · p_i(v)]
        per = w_x * nll + ((W - w_x[:, None]) * logp.exp()).sum(1)  # [L]
        f = (per * z).sum() / ts  # [Q]
        total = total + (ws * q * f).sum()
    m = (1 - eps) * t1**W  # [L, V] masked at t1
    recon = (m[torch.arange(L), x] * (torch.logsumexp(m.log(), 1) - m[torch.arange(L), x].log())).sum()
    return total + recon + L * eps * math.log(V)


@pytest.mark.parametrize("kind", ["token", "position"])
def test_expected_nelbo_matches_enumeration(kind):
    model = _model()
    x = torch.tensor([0, 1])
    obj, W = _objective(kind)
    want = _exact_nelbo(model, x, W.detach(), obj.process.eps, obj.t1).item()
    n = 20000
    with torch.no_grad():
        nats = obj(model, x[None].expand(n, -1), torch.ones(n, 2, dtype=torch.long), gen(3)).nats
    assert abs(nats.mean().item() - want) < 4 * nats.std().item() / math.sqrt(n), (nats.mean().item(), want)


def _objective(kind, reinforce=True):
    if kind == "token":
        proc = P.LearnedTokenSchedule(2, power_init=[0.6, 2.0], eps=1e-4)
    else:
        proc = P.LearnedPositionSchedule(2, power_init=[0.6, 2.0], eps=1e-4)
    obj = GenMD4Nelbo(proc, reinforce=reinforce).double()
    w = torch.nn.functional.softplus(obj.process.rho)
    W = w[None, :].expand(2, 2) if kind == "token" else w[:, None].expand(2, 2)  # [L, V]
    return obj, W


def _mc_gradient(obj, model, x, chunks=40, rows=500):
    """Mean and standard error over chunks of the per-row gradient of the surrogate loss in ρ."""
    grads = []
    for c in range(chunks):
        obj.zero_grad()
        out = obj(model, x[None].expand(rows, -1), torch.ones(rows, 2, dtype=torch.long), gen(100 + c))
        (out.loss * out.tokens.sum() / rows).backward()  # loss = Σ rows / Σ tokens -> mean over rows
        grads.append(obj.process.rho.grad.clone())
    g = torch.stack(grads)  # [chunks, P]
    return g.mean(0), g.std(0) / math.sqrt(chunks)


@pytest.mark.parametrize("kind", ["token", "position"])
def test_rloo_gradient_is_unbiased(kind):
    """E[∇ surrogate] = ∇ E[NELBO]; without the REINFORCE term the gradient is biased."""
    model = _model()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.tensor([0, 1])
    obj, W = _objective(kind)
    exact = torch.autograd.grad(_exact_nelbo(model, x, W, obj.process.eps, obj.t1), obj.process.rho)[0].float()
    mean, se = _mc_gradient(obj, model, x)
    assert ((mean - exact).abs() <= 4 * se + 1e-3).all(), (mean, exact, se)
    biased, _ = _objective(kind, reinforce=False)
    bmean, bse = _mc_gradient(biased, model, x, chunks=20)
    assert ((bmean - exact).abs() > 6 * bse).any(), (bmean, exact, bse)


# ---- objective plumbing and training --------------------------------------------------


def test_objective_owns_nested_schedules_and_checks_its_inputs():
    obj = build("objective", {"name": "genmd4_nelbo", "process": {
        "name": "blockwise", "block_size": 2, "inner": {"name": "learned_position"}}}, context={"max_len": 2})
    assert [n for n, _ in obj.named_parameters()] == ["schedules.0.rho"]
    with pytest.raises(ValueError, match="mixture"):
        GenMD4Nelbo(P.Mixture([P.LearnedPositionSchedule(4), P.Linear()]))
    with pytest.raises(ValueError, match="bidirectional"):
        obj(orderlab.build("model", "transformer", vocab_size=2, max_len=2, attention="set_causal", d_model=8, n_layers=1, n_heads=1), torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="t1"):
        GenMD4Nelbo(t1=0.0)
    with pytest.raises(ValueError, match="absorbing"):
        GenMD4Nelbo(P.LearnedTokenSchedule(3, corruption=P.Uniform()))


@pytest.mark.parametrize("proc", [
    lambda: P.LearnedTokenSchedule(4),
    lambda: P.LearnedPositionSchedule(6),
])
def test_training_lowers_the_loss_and_moves_the_powers(proc):
    torch.manual_seed(0)
    model = orderlab.build("model", "transformer", vocab_size=4, max_len=6, attention="bidirectional", d_model=16, n_layers=1, n_heads=2)
    obj = GenMD4Nelbo(proc())
    w0 = torch.nn.functional.softplus(obj.process.rho).detach().clone()
    opt = torch.optim.Adam(list(model.parameters()) + list(obj.parameters()), lr=2e-2)
    # data: token i is (i mod 2) + 2 * coin, so positions are partly predictable
    g = gen(0)

    def batch(n):
        return torch.arange(6)[None] % 2 + 2 * torch.randint(0, 2, (n, 1), generator=g)

    ranks = torch.ones(256, 6, dtype=torch.long)
    test_x = batch(256)

    def evaluate():
        with torch.no_grad():
            return obj(model, test_x, ranks, gen(99)).nats.mean().item()

    before = evaluate()
    for step in range(40):
        out = obj(model, batch(64), ranks[:64], gen(step))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    after = evaluate()
    w1 = torch.nn.functional.softplus(obj.process.rho).detach()
    assert after < before - 0.5, (before, after)
    assert (w1 - w0).abs().max() > 0.05, (w0, w1)
