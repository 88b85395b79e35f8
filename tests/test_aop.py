"""AOP (objectives/aop.py): the policy-reweighted MDM loss against exact enumeration over
orders on a tiny vocabulary and length: its expectation is ``Σ_σ π_ψ(σ) (−log p_θ(x|σ))``,
its gradients in ψ (and θ, joint) are that sum's, the inclusion probabilities are the set
distributions' marginals."""

import itertools
import math

import pytest
import torch

import orderlab
from orderlab.likelihood import log_likelihood
from orderlab.objectives import AOP
from orderlab.objectives.aop import inclusion
from orderlab.objectives.sas import teacher_forced
from orderlab.policies.sets import NonEmptyBernoulli, PlackettLuceTopK
from orderlab.registry import ConfigError

from enumerate_orders import all_orders

X = torch.tensor([[2, 0, 1, 2]])
R = torch.tensor([[0, 1, 1, 1]])


def gen(seed):
    return torch.Generator().manual_seed(seed)


def _model(seed=0):
    torch.manual_seed(seed)
    m = orderlab.build("model", "transformer", vocab_size=3, max_len=4, attention="set_causal", d_model=16, n_layers=1, n_heads=2)
    with torch.no_grad():  # sharper than init so orders matter
        for p in m.parameters():
            p.mul_(4.0)
    return m.eval()


def _policy(kind, weight):
    spec = {"name": kind, "features": ["confidence", "position"], "greedy": False,
            "net": {"name": "linear", "weight": weight, "bias": 0.0}}
    return orderlab.build("policy", {**spec, "k": 1} if kind == "learned_plackett_luce" else spec)


def _exact(model, policy, multi):
    """``(J, π Float[n], NLL Float[n])`` by enumeration: J = Σ_σ π(σ) NLL(σ), π differentiable in ψ."""
    orders = all_orders(R[0], multi=multi)  # [n, L]
    n = len(orders)
    x, r = X.expand(n, -1), R.expand(n, -1)
    with policy.recording(follow=orders) as traj:
        teacher_forced(model, policy, x, r, cache=False)
    pi = policy.replay(traj).log_prob.exp()  # [n]
    nll = -log_likelihood(model, x, orders)
    return (pi * nll).sum(), pi, nll


CASES = [("learned_plackett_luce", [0.0, 0.0], False), ("learned_plackett_luce", [3.0, -4.0], False),
         ("learned", [3.0, -4.0], True)]


@pytest.mark.parametrize("kind, weight, multi", CASES)
def test_expectation_is_the_policy_weighted_nll_by_enumeration(kind, weight, multi):
    """E[Σ_k c̄_k] = Σ_σ π(σ) (−log p_θ(x | σ)); with a uniform π (zero weights) it is the
    expected any-order NLL, the MDM NELBO's value."""
    model, pol = _model(), _policy(kind, weight)
    with torch.no_grad():
        J, pi, nll = _exact(model, pol, multi)
    assert pi.sum().item() == pytest.approx(1.0, abs=1e-5)
    if weight == [0.0, 0.0]:
        assert J.item() == pytest.approx(nll.mean().item(), rel=1e-5)  # uniform over the 3! orders
    obj = AOP(pol, group=2)
    n = 1500
    with torch.no_grad():
        cbar, _, _, _ = obj.terms(model, X.expand(n, -1), R.expand(n, -1), gen(1))
    est = cbar.sum(0).double()
    se = est.std().item() / math.sqrt(len(est))
    assert abs(est.mean().item() - J.item()) < 4 * se + 1e-4, (est.mean().item(), J.item(), se)


def _mc_grad(obj, model, params, chunks=24, rows=100):
    grads = []
    for c in range(chunks):
        for p in params:
            p.grad = None
        cbar, log_pi, active, _ = obj.terms(model, X.expand(rows, -1), R.expand(rows, -1), gen(100 + c))
        obj.surrogate(cbar, log_pi, active).mean().backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in params]))
    g = torch.stack(grads)
    return g.mean(0), g.std(0) / math.sqrt(chunks)


@pytest.mark.parametrize("kind, multi", [("learned_plackett_luce", False), ("learned", True)])
def test_policy_gradient_equals_the_enumerated_gradient(kind, multi):
    """Frozen denoiser: E[∇_ψ surrogate] = ∇_ψ Σ_σ π_ψ(σ) NLL(σ); no gradient reaches θ;
    without the score-function term the gradient is biased."""
    model = _model()
    pol = _policy(kind, [2.0, -3.0])
    params = list(pol.net.parameters())
    J, _, _ = _exact(model, pol, multi)
    exact = torch.cat([g.reshape(-1) for g in torch.autograd.grad(J, params)])
    obj = AOP(pol, group=4)
    mean, se = _mc_grad(obj, model, params)
    assert ((mean - exact).abs() <= 4 * se + 2e-3).all(), (mean, exact, se)
    assert all(p.grad is None for p in model.parameters())
    # the pathwise term alone (no score function) misses the states' dependence on ψ
    biased = []
    for c in range(12):
        for p in params:
            p.grad = None
        cbar, _, _, _ = obj.terms(model, X.expand(100, -1), R.expand(100, -1), gen(300 + c))
        cbar.sum(0).mean().backward()
        biased.append(torch.cat([p.grad.reshape(-1) for p in params]))
    b = torch.stack(biased)
    assert ((b.mean(0) - exact).abs() > 6 * b.std(0) / math.sqrt(12)).any()


def test_joint_denoiser_gradient_equals_the_enumerated_gradient():
    """``train_model``: E[∇_θ surrogate] = Σ_σ π(σ) ∇_θ NLL(σ) (π's features of θ are inputs)."""
    model = _model()
    pol = _policy("learned_plackett_luce", [2.0, -3.0])
    theta = [model.norm.weight]
    with torch.no_grad():
        _, pi, _ = _exact(model, pol, False)
    orders = all_orders(R[0])
    nll = -log_likelihood(model, X.expand(len(orders), -1), orders)
    exact = torch.autograd.grad((pi * nll).sum(), theta)[0].reshape(-1)
    obj = AOP(pol, group=2, train_model=True)
    assert obj.trains_model
    mean, se = _mc_grad(obj, model, theta, chunks=16)
    assert ((mean - exact).abs() <= 4 * se + 2e-3).all(), (mean, exact, se)


def test_inclusion_probabilities_are_the_marginals():
    logits = torch.tensor([[0.3, -1.0, 2.0, 0.5], [1.0, 0.0, -0.5, 0.2]])
    valid = torch.tensor([[True, True, False, True], [True, True, True, True]])
    sets = torch.tensor(list(itertools.product([False, True], repeat=4)))  # [16, 4]
    for dist in (NonEmptyBernoulli(logits, valid), PlackettLuceTopK(logits, valid, 1), PlackettLuceTopK(logits, valid, 4)):
        want = torch.zeros(2, 4, dtype=torch.float64)
        for b in range(2):
            lp = type(dist).log_prob(_row(dist, b, len(sets)), sets)
            p = torch.where(torch.isfinite(lp), lp.exp(), torch.zeros_like(lp))
            assert p.sum().item() == pytest.approx(1.0, abs=1e-9)
            want[b] = (p[:, None] * sets.double()).sum(0)
        torch.testing.assert_close(inclusion(dist), want)
    with pytest.raises(ValueError, match="1 < k < n"):
        inclusion(PlackettLuceTopK(logits, valid, 2))


def _row(dist, b, n):
    """Row ``b`` of ``dist`` repeated ``n`` times (same family and size)."""
    lg, v = dist.logits[b : b + 1].expand(n, -1), dist.valid[b : b + 1].expand(n, -1)
    return PlackettLuceTopK(lg, v, dist.k[b]) if isinstance(dist, PlackettLuceTopK) else NonEmptyBernoulli(lg, v)


def test_step_config_and_errors():
    model = _model()
    obj = orderlab.build("objective", {"name": "aop", "group": 2, "policy": {
        "name": "learned_plackett_luce", "k": 1, "features": ["confidence"], "net": "linear"}})
    out = obj.step(model, X.expand(3, -1), R.expand(3, -1), gen(0))
    assert out.label == "nelbo (bound)" and out.weight == 3 * 3 * 2 and out.metrics["steps"] == 3.0
    out.loss.backward()
    assert obj.policy.net.out.weight.grad is not None
    assert out.metrics["nll_order"] == pytest.approx(out.metrics["bits_per_token"] * math.log(2) * 3, rel=1e-5)
    with pytest.raises(ConfigError, match="policy.k.*k: 1"):
        orderlab.build("objective", {"name": "aop", "policy": {"name": "learned_plackett_luce", "k": 2}})
    with pytest.raises(ConfigError, match="learned policy"):
        orderlab.build("objective", {"name": "aop", "policy": "top_prob"})
    with pytest.raises(ConfigError, match="group"):
        orderlab.build("objective", {"name": "aop", "group": 0})
