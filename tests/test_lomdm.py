"""LoMDM / OeMDM (objectives/lomdm.py, processes/scheduler.py): with a data-independent
scheduler the NELBO is GenMD4's exactly (same draws: same values and gradients); the
NELBO is a bound, ``>= −log p(x)`` of the generative CTMC computed exactly (matrix
exponential over the 9 states of a length-2, 2-token toy), its estimator's mean the exact
NELBO (masks enumerated, time by quadrature), its forward-scheduler gradient unbiased."""

import itertools
import math

import numpy as np
import pytest
import torch

import orderlab
import orderlab.processes as P
from orderlab.objectives import GenMD4Nelbo, LoMDMNelbo
from orderlab.registry import ConfigError
from conftest import gen, sharp_denoiser

V, L, EPS, T1 = 2, 2, 1e-2, 1e-2


def _model(V=2, L=2, seed=0, scale=3.0):
    return sharp_denoiser(V, L, seed, scale)


def _mixer(seed, vocab=V, length=L):
    torch.manual_seed(seed)
    s = P.MixerScheduler(vocab, length, power_init=1.0, width=8)
    with torch.no_grad():  # a data-dependent start (the output layer starts at zero)
        s.mlp[-1].weight.normal_(0.0, 1.0)
    return s


def test_data_independent_scheduler_is_genmd4_exactly():
    """Tied reverse, positional forward scheduler = GenMD4 with ``learned_position``: the
    same loss, nats and ρ-gradient (REINFORCE term included) for the same draws."""
    model = _model(V=4, L=5)
    x = torch.randint(0, 4, (16, 5), generator=gen(0))
    ranks = torch.ones(16, 5, dtype=torch.long)
    ranks[:, 0] = 0
    init = [0.6, 2.0, 1.3, 0.9, 3.0]
    ref = GenMD4Nelbo(P.LearnedPositionSchedule(5, power_init=init, eps=1e-4), t1=1e-3)
    obj = LoMDMNelbo(P.DataSchedule(P.PositionalScheduler(4, 5, power_init=init), eps=1e-4), t1=1e-3)
    a, b = ref(model, x, ranks, gen(3)), obj(model, x, ranks, gen(3))
    torch.testing.assert_close(b.nats, a.nats, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-5, atol=1e-5)
    a.loss.backward()
    b.loss.backward()
    torch.testing.assert_close(obj.process.scheduler.rho.grad, ref.process.rho.grad, rtol=1e-4, atol=1e-6)
    # an untied reverse scheduler pays the rate mismatch: never below, above somewhere
    untied = LoMDMNelbo(P.DataSchedule(P.PositionalScheduler(4, 5, power_init=init), eps=1e-4),
                        reverse=P.PositionalScheduler(4, 5, power_init=1.0), t1=1e-3)
    with torch.no_grad():
        c = untied(model, x, ranks, gen(3)).nats
    assert (c >= a.nats.detach() - 1e-5).all() and (c > a.nats.detach() + 1e-3).any()


def _denoiser_probs(model, z):
    """Float64 ``[L, V]``: ``p_θ(· | z)`` at every position (read at masked ones)."""
    zt = z[None]
    s = model.rule.noisy_stream(zt, torch.ones_like(zt, dtype=torch.bool), torch.ones_like(zt, dtype=torch.bool))
    assert s.out[0].tolist() == list(range(L))
    return torch.softmax(model(s).double(), -1)[0]


def _states():
    return [torch.tensor(z) for z in itertools.product(range(V + 1), repeat=L)]  # id V = [MASK]


def _exact_nll(model, obj, x):
    """−log p(x) of the generative process: a CTMC in s = −log t (rates ŵ_i(z)·p_θ(v|z),
    homogeneous in s) from the prior at t = 1 to t1, masked positions then decoded uniformly."""
    states = _states()
    index = {tuple(z.tolist()): k for k, z in enumerate(states)}
    n = len(states)
    Q = torch.zeros(n, n, dtype=torch.float64)
    with torch.no_grad():
        for k, z in enumerate(states):
            masked = (z == V).nonzero()[:, 0].tolist()
            if not masked:
                continue
            w_hat = obj.reverse(z[None])[0].double()
            probs = _denoiser_probs(model, z)
            for i in masked:
                for v in range(V):
                    z2 = z.clone()
                    z2[i] = v
                    Q[k, index[tuple(z2.tolist())]] += w_hat[i] * probs[i, v]
    Q -= torch.diag(Q.sum(1))
    Pm = torch.linalg.matrix_exp(Q * -math.log(T1))
    start = torch.tensor([math.prod((1 - EPS) if zi == V else EPS / V for zi in z.tolist()) for z in states], dtype=torch.float64)
    dec = torch.tensor([math.prod(1 / V if zi == V else float(zi == xi) for zi, xi in zip(z.tolist(), x.tolist()))
                        for z in states], dtype=torch.float64)
    return -torch.log(start @ Pm @ dec)


def _exact_nelbo(model, obj, x, n_quad=64):
    """The expected NELBO of ``x``: masks enumerated, Gauss–Legendre in s = −log t (f dt = g ds),
    differentiable in both schedulers."""
    S = -math.log(T1)
    nodes, weights = np.polynomial.legendre.leggauss(n_quad)
    s = torch.tensor(S / 2 * (nodes + 1), dtype=torch.float64)
    ws = torch.tensor(weights * S / 2, dtype=torch.float64)
    t = (-s).exp()  # [Q]
    w = obj.process.scheduler(x[None])[0].double()  # [L]
    masked_p = (1 - EPS) * t[:, None] ** w  # [Q, L]
    total = 0.0
    for m in itertools.product([False, True], repeat=L):
        m = torch.tensor(m)
        if not m.any():
            continue
        z = torch.where(m, V, x)
        q = torch.where(m, masked_p, 1 - masked_p).prod(1)  # [Q]
        w_hat = obj.reverse(z[None])[0].double()
        with torch.no_grad():
            nll = -_denoiser_probs(model, z)[torch.arange(L), x].log()
        g = (w * nll + w_hat - w + w * (w.log() - w_hat.log()))[m].sum()
        total = total + (ws * q).sum() * g
    recon = ((1 - EPS) * T1**w * math.log(V)).sum()
    return total + recon + L * EPS * math.log(V)


def _objective(reinforce=True):
    return LoMDMNelbo(P.DataSchedule(_mixer(1), eps=EPS), reverse=_mixer(2), t1=T1, reinforce=reinforce).double()


def test_nelbo_is_a_bound_on_the_exact_nll():
    model, obj = _model(), _objective()
    total = 0.0
    for x in itertools.product(range(V), repeat=L):
        x = torch.tensor(x)
        nll, nelbo = _exact_nll(model, obj, x).item(), _exact_nelbo(model, obj, x).item()
        total += math.exp(-nll)
        assert nelbo >= nll - 1e-9, (x, nelbo, nll)
        assert nelbo > nll + 1e-3  # data-dependent forward, reverse from z_t only: a strict gap
    assert total == pytest.approx(1.0, abs=1e-9)  # the CTMC's marginal is a distribution


def test_estimator_mean_is_the_exact_nelbo():
    model, obj = _model(), _objective()
    x = torch.tensor([1, 0])
    want = _exact_nelbo(model, obj, x).item()
    n = 20000
    with torch.no_grad():
        nats = obj(model, x[None].expand(n, -1), torch.ones(n, L, dtype=torch.long), gen(3)).nats
    assert abs(nats.mean().item() - want) < 4 * nats.std().item() / math.sqrt(n), (nats.mean().item(), want)


def test_forward_scheduler_gradient_is_unbiased():
    """E[∇ surrogate] = ∇ E[NELBO] in the forward scheduler (RLOO over the two z_t); without
    the score-function term it is biased."""
    model = _model()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.tensor([1, 0])
    obj = _objective()
    params = [obj.process.scheduler.rho, obj.process.scheduler.mlp[-1].bias]
    exact = torch.cat([g.reshape(-1) for g in torch.autograd.grad(_exact_nelbo(model, obj, x), params)]).float()

    def mc(o, chunks=30, rows=500):
        ps = [o.process.scheduler.rho, o.process.scheduler.mlp[-1].bias]
        grads = []
        for c in range(chunks):
            o.zero_grad()
            out = o(model, x[None].expand(rows, -1), torch.ones(rows, L, dtype=torch.long), gen(100 + c))
            (out.loss * out.tokens.sum() / rows).backward()
            grads.append(torch.cat([p.grad.reshape(-1) for p in ps]))
        g = torch.stack(grads).float()
        return g.mean(0), g.std(0) / math.sqrt(chunks)

    mean, se = mc(obj)
    assert ((mean - exact).abs() <= 4 * se + 1e-3).all(), (mean, exact, se)
    bmean, bse = mc(_objective(reinforce=False), chunks=20)
    assert ((bmean - exact).abs() > 6 * bse).any(), (bmean, exact, bse)


def test_config_and_errors():
    ctx = {"vocab_size": 3, "max_len": 4}
    obj = orderlab.build("objective", {"name": "lomdm_nelbo", "process": {"name": "learned_data", "scheduler": "mixer"},
                                       "reverse": {"name": "mixer", "width": 8}}, context=ctx)
    assert obj.reverse.embed.weight.shape == (4, 8)  # 3 tokens and [MASK]
    names = [n for n, _ in obj.named_parameters()]
    assert "process.scheduler.rho" in names and "reverse.rho" in names
    with pytest.raises(ConfigError, match="reverse: a data-dependent forward scheduler needs a reverse scheduler"):
        orderlab.build("objective", {"name": "lomdm_nelbo", "process": {"name": "learned_data", "scheduler": "mixer"}}, context=ctx)
    with pytest.raises(ConfigError, match="process: lomdm_nelbo needs a learned_data process"):
        orderlab.build("objective", {"name": "lomdm_nelbo", "process": "linear"}, context=ctx)
    with pytest.raises(NotImplementedError, match="given"):
        obj.process.alpha(0.5, 4)
    with pytest.raises(ValueError, match="bidirectional"):
        obj(orderlab.build("model", "transformer", vocab_size=3, max_len=4, attention="set_causal", d_model=8, n_layers=1,
                           n_heads=1), torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.long))
