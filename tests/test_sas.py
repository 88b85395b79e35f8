"""SAS (arXiv 2606.23567): per-step pathwise-likelihood rewards by hand, GRPO's
process-supervision advantages by hand, the estimator's expectation against exact
enumeration of orders, and learning the only good order of a toy."""

import math

import pytest
import torch

import orderlab
from orderlab.builder import build
from orderlab.objectives import SAS, PathwiseLikelihood, position_log_probs, returns_to_go, step_advantages, teacher_forced
from orderlab.policies import LearnedPlackettLuce
from orderlab.registry import ConfigError

from test_policy_gradient import STEPS, ChainModel, ChainTask, assert_close_mc, dense_orders, make_policy  # the toy

L9, L4 = math.log(0.9), math.log(0.4)


def test_pathwise_likelihood_by_hand():
    """ChainModel: position i is predicted right (p = 0.9) iff it is the last or its right
    neighbour is known, else p(right token) = 0.4. Rewards per step of four orders."""
    task, model = ChainTask(n=3), ChainModel()
    x, _ = task.batch(4)
    order = torch.tensor([[0, 3, 2, 1],  # right to left: every step right
                          [0, 1, 2, 3],  # left to right: wrong, wrong, right
                          [0, 1, 1, 1],  # one step: positions 1, 2 wrong, 3 right
                          [0, 2, 2, 1]])  # pos 3, then {1, 2}: 1 sees 2 masked (wrong), 2 sees 3 (right)
    r = PathwiseLikelihood()(model, x, order)
    want = torch.tensor([[L9, L4, 2 * L4 + L9, L9],
                         [L9, L4, 0.0, L4 + L9],
                         [L9, L9, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(r, want)
    torch.testing.assert_close(r.sum(0), orderlab.log_likelihood(model, x, order).double())
    assert PathwiseLikelihood()(model, x, order, steps=5).shape == (5, 4)
    with pytest.raises(ValueError, match="past steps=2"):
        PathwiseLikelihood()(model, x, order, steps=2)


@pytest.mark.parametrize("attention", ["set_causal", "bidirectional", {"name": "block_causal", "block_size": 2}])
def test_position_log_probs_sum_to_the_exact_likelihood(attention):
    torch.manual_seed(0)
    model = orderlab.build("model", "transformer", vocab_size=5, max_len=6, attention=attention, d_model=16, n_layers=1, n_heads=2)
    x = torch.randint(0, 5, (3, 6))
    order = torch.tensor([[0, 1, 2, 3, 4, 4], [0, 0, 2, 1, 4, 3], [-1, 0, 1, 2, 2, 3]])
    lp = position_log_probs(model, x, order)
    assert (lp[order < 1] == 0).all() and (lp[order >= 1] < 0).all()
    torch.testing.assert_close(lp.sum(1), orderlab.log_likelihood(model, x, order))


def test_returns_to_go_and_step_advantages_by_hand():
    """One group of G = 2 rollouts, T = 2 steps, rollout 1 done after one step:
    active rewards 1, 4, 3 → mean 8/3, centred −5/3, 4/3, 1/3, unbiased std √(7/3);
    A_k = Σ_{j>=k} r̃_j. A second group (rewards + 10) gets the same advantages."""
    torch.testing.assert_close(returns_to_go(torch.tensor([[1.0], [2.0], [3.0]])), torch.tensor([[6.0], [5.0], [3.0]]))
    r = torch.tensor([[1.0, 4.0, 11.0, 14.0], [3.0, 0.0, 13.0, 0.0]], dtype=torch.float64)
    active = torch.tensor([[True, True, True, True], [True, False, True, False]])
    s = math.sqrt(7 / 3)
    plain = torch.tensor([[-4 / 3, 4 / 3], [1 / 3, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(step_advantages(r, active, 2, scale=False), plain.repeat(1, 2))
    torch.testing.assert_close(step_advantages(r, active, 2), (plain / (s + 1e-6)).repeat(1, 2))


def exact_expected_gradient(pol, task, model, group):
    """E[∇̂ loss] of SAS with ``scale=False`` by enumerating every singleton order σ.

    With T steps per rollout, μ = (1/(G·T)) Σ_{i', j} r_{i', j} and A_{ik} = G_{ik} − (T − k + 1) μ,
    so (rollouts independent, E[∇log π_k | S_<k] = 0, E[r_j ∇log π_k] = 0 for j < k)
        E[Σ_k A_k ∇log π_k] = ∇J − (1/(G·T)) Σ_k (T − k + 1) E[R ∇log π_k],   J = E[R], R = Σ_k r_k,
    and the loss is its negative (one update: ratio 1). Each expectation is a sum over σ
    of π(σ | x) with π from a teacher-forced recording that follows σ."""
    orders = dense_orders(task.n, singletons=True)
    x, r = task.batch(len(orders))
    follow = torch.cat([torch.zeros(len(orders), 1, dtype=torch.long), orders], 1)
    with pol.recording(follow=follow) as traj:
        d = teacher_forced(model, pol, x, r, cache=False)
    assert torch.equal(d.ranks, follow) and torch.equal(d.tokens, x)
    step_lp = pol.replay(traj).step_log_prob  # [T, K] with gradients
    p = step_lp.sum(0).exp()
    torch.testing.assert_close(p.sum(), torch.tensor(1.0, dtype=p.dtype))
    R = PathwiseLikelihood()(model, x, d.ranks).sum(0).to(p)  # [K]
    T = task.n
    w = torch.tensor([(T - k) / (group * T) for k in range(T)], dtype=p.dtype)[:, None]  # (T − k + 1)/(G T), k 1-based
    surrogate = (p * R).sum() - ((p * R).detach()[None] * w * step_lp).sum()
    grad = torch.autograd.grad(surrogate, list(pol.parameters()))
    return -torch.cat([g.flatten() for g in grad]).double(), float((p * R).sum().detach())


def test_estimator_matches_its_exact_expectation():
    """The Monte Carlo mean of SAS's gradient (teacher-forced rollouts, pathwise rewards,
    process-supervision advantages, GRPO's surrogate) equals its exact expectation."""
    task, model = ChainTask(n=3), ChainModel()
    pol = make_policy(LearnedPlackettLuce)
    want, J = exact_expected_gradient(pol, task, model, group=4)
    obj = SAS(task, pol, group=4, scale=False, cache=False)
    params = list(pol.parameters())
    g = torch.Generator().manual_seed(0)
    grads, rewards = [], []
    for _ in range(STEPS):
        out = obj.step(model, *task.batch(4), g)
        grads.append(torch.cat([q.flatten() for q in torch.autograd.grad(out.loss, params)]).double())
        rewards.append(out.metrics["reward"])
    grads = torch.stack(grads)
    assert_close_mc(grads.mean(0), grads.std(0) / math.sqrt(STEPS), want)
    assert abs(sum(rewards) / STEPS - J) < 4 * torch.tensor(rewards).std().item() / math.sqrt(STEPS)  # E[R] = J


def test_teacher_forcing_keeps_the_data_and_the_cache_is_exact():
    torch.manual_seed(0)
    model = orderlab.build("model", "transformer", vocab_size=5, max_len=6, attention="set_causal", d_model=16, n_layers=1, n_heads=2)
    pol = orderlab.build("policy", "learned", features=["confidence", "position"], net="mlp", greedy=False)
    x = torch.randint(0, 5, (4, 6))
    r = torch.ones_like(x)
    r[:, 0] = 0
    with pol.recording(seed=1) as traj:
        a = teacher_forced(model, pol, x, r, cache=True)
    with pol.recording(seed=1):
        b = teacher_forced(model, pol, x, r, cache=False)
    assert torch.equal(a.tokens, x) and torch.equal(a.ranks, b.ranks) and torch.equal(a.nfe, b.nfe)
    assert traj.steps == a.steps == int(a.ranks.max()) and (a.nfe == a.ranks.amax(1)).all()


def test_sas_learns_the_only_good_order():
    """On the chain toy the pathwise likelihood is highest for right to left (every step
    0.9): SAS with position features learns it."""
    task, model = ChainTask(n=4), ChainModel()
    pol = orderlab.build("policy", "learned_plackett_luce", features=["position"], net={"name": "mlp", "hidden": 16, "layers": 1})
    obj = build("objective", {"name": "sas", "policy": pol, "group": 4}, task=task)
    opt = torch.optim.Adam(obj.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    for s in range(80):
        out = obj.step(model, *task.batch(4, "train", s), g)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    x, r = task.batch(2)
    after = orderlab.decode(model, pol, x, r, cache=False)
    assert torch.equal(after.ranks[0], torch.tensor([0, 4, 3, 2, 1])), after.ranks
    assert out.metrics["reward"] > 4 * L9 - 0.05 and out.metrics["nats_per_token"] < -L9 + 0.02


def test_config_and_errors():
    task = ChainTask()
    obj = build("objective", {"name": "sas", "group": 2, "step_reward": "pathwise_likelihood", "kl": 0.1,
                              "policy": {"name": "learned_plackett_luce", "features": ["confidence"], "net": "linear"},
                              "reference": {"name": "learned_plackett_luce", "features": ["confidence"], "net": "linear"}},
                task=task)
    assert isinstance(obj, SAS) and not obj.trains_model and "PathwiseLikelihood()" in repr(obj)
    out = obj.step(ChainModel(), *task.batch(2), torch.Generator().manual_seed(0))
    assert out.metrics["kl"] == pytest.approx(0.0, abs=1e-6) and "score" not in out.metrics
    with pytest.raises(ConfigError, match="objective.group"):
        build("objective", {"name": "sas", "group": 1}, task=task)
    with pytest.raises(ConfigError, match="objective.step_reward"):
        build("objective", {"name": "sas", "step_reward": "score"}, task=task)
    with pytest.raises(ConfigError, match="objective.temperature"):  # no such key: tokens are the data's
        build("objective", {"name": "sas", "temperature": 1.0}, task=task)


def test_step_advantages_favour_more_steps_at_equal_likelihood():
    """The caveat the SAS docstring states: with process supervision, a rollout's summed
    normalised rewards are (R − T·mean)/std, so two rollouts of one prompt with the same
    log-likelihood R = −2 but T = 2 and T = 1 steps get different advantages (the longer
    one favoured, mean < 0); with equal T the same R gives the same advantage."""
    r = torch.tensor([[-1.0, -2.0], [-1.0, 0.0]], dtype=torch.float64)  # [T=2, G=2]: rollout 1 has one step
    active = torch.tensor([[True, True], [True, False]])
    a = step_advantages(r, active, 2, scale=False)
    mean = -4 / 3
    torch.testing.assert_close(a[0], torch.tensor([-2 - 2 * mean, -2 - 1 * mean], dtype=torch.float64))
    assert a[0, 0] > a[0, 1]
    same = step_advantages(torch.tensor([[-1.5, -0.5], [-0.5, -1.5]], dtype=torch.float64), torch.ones(2, 2, dtype=torch.bool), 2,
                           scale=False)
    torch.testing.assert_close(same[0, 0], same[0, 1])
