"""Policy-gradient objectives: estimators vs the exact gradient (enumeration), rewards,
convergence on a toy whose only correct order is right to left."""

import itertools
import math

import pytest
import torch

import orderlab
from torch import nn

from orderlab.decoding import Decoded, decode
from orderlab.objectives import GRPO, RLOO, NFEPenalty, Reinforce, StepDiscount, TaskScore
from orderlab.policies import LearnedBernoulli, LearnedPlackettLuce
from orderlab.registry import ConfigError
from orderlab.builder import build
from orderlab.rules import Bidirectional
from toy_tasks import ChainTask  # tests/toy_tasks.py

# ----------------------------------------------------------------------------- the toy


class ChainModel(nn.Module):
    """A fixed fake denoiser (bidirectional rule, no parameters): position ``i`` is
    predicted right (token 1 with p = 0.9) iff it is the last position or position
    ``i + 1`` is already revealed; otherwise wrongly (token 0 with p = 0.6). Greedy
    tokens are therefore all correct exactly for right-to-left orders (one position at a
    time, or sets that never hold two neighbours)."""

    rule = Bidirectional()
    vocab_size = mask_id = 2

    def forward(self, s, cache=None):
        B, N = s.tokens.shape
        L = int(s.pos.max()) + 1
        real = s.q_group >= 0
        xt = torch.full((B, L + 1), self.mask_id, dtype=torch.long)
        xt.scatter_(1, torch.where(real, s.pos, L), torch.where(real, s.tokens, self.mask_id))
        known = torch.cat([xt[:, :L] != self.mask_id, torch.ones(B, 1, dtype=torch.bool)], 1)  # [B, L+1], L+1: beyond the end
        p = s.out.clamp(min=0)
        ok = (p == L - 1) | known.gather(1, (p + 1).clamp(max=L))  # [B, N]
        right, wrong = torch.tensor([0.1, 0.9]).log(), torch.tensor([0.6, 0.4]).log()
        return torch.where(ok[..., None], right, wrong)  # [B, N, 2]


def dense_orders(n, singletons):
    """Long[K, n]: every order of n positions as steps 1..m (ordered set partitions)."""
    out = []
    for v in itertools.product(range(1, n + 1), repeat=n):
        if set(v) == set(range(1, max(v) + 1)) and (not singletons or len(set(v)) == n):
            out.append(v)
    return torch.tensor(out)


def make_policy(cls):
    """A small non-trivial policy: a linear net over three features with fixed random weights."""
    pol = orderlab.build("policy", {"_target_": cls, "features": ["position", "confidence", "distance"], "net": "linear"})
    with torch.no_grad():  # J ≈ 0.18 (Bernoulli), 0.48 (Plackett–Luce): rewards neither rare nor certain
        pol.net.out.weight.copy_(torch.tensor([[3.0, 0.5, -1.0]]))
        pol.net.out.bias.fill_(-2.0)
    return pol


def exact_gradient(pol, task, model):
    """(J, ∇J) by enumerating every trajectory: J = Σ_τ π(τ) R(τ), π(τ) from a recorded
    decode that follows τ (teacher forcing), differentiated by autograd."""
    orders = dense_orders(task.n, singletons=isinstance(pol, LearnedPlackettLuce))
    x, r = task.batch(len(orders))
    follow = torch.cat([torch.zeros(len(orders), 1, dtype=torch.long), orders], 1)
    with pol.recording(follow=follow) as traj:
        d = decode(model, pol, x, r, cache=False)
    assert torch.equal(d.ranks, follow)
    logp = pol.replay(traj).log_prob
    probs = logp.exp()
    torch.testing.assert_close(probs.sum(), torch.tensor(1.0, dtype=torch.float64))  # a distribution over trajectories
    R = task.score(d.tokens, x, r)
    assert 0 < R.sum() < len(R)  # some orders are right, some wrong
    J = (probs * R).sum()
    params = [p for p in pol.parameters()]
    grad = torch.autograd.grad(J, params)
    return J.item(), torch.cat([g.flatten() for g in grad]).double()


def estimator_mean(obj, task, model, steps, batch):
    """Mean and standard error of the estimator's gradient of −J over ``steps`` independent steps."""
    params = [p for p in obj.policy.parameters()]
    g = torch.Generator().manual_seed(1234)
    gs = []
    for s in range(steps):
        x, r = task.batch(batch)
        out = obj.step(model, x, r, g)
        grad = torch.autograd.grad(out.loss, params)
        gs.append(torch.cat([q.flatten() for q in grad]).double())
    gs = torch.stack(gs)
    return gs.mean(0), gs.std(0) / math.sqrt(steps)


STEPS = 200  # estimator draws per test: standard errors ~5% of the gradient


def assert_close_mc(got, se, want):
    tol = 4 * se + 1e-3 * want.abs().max()
    assert ((got - want).abs() <= tol).all(), (got, want, se)


# ----------------------------------------------------------------------------- estimators vs exact gradients


@pytest.mark.parametrize("cls", [LearnedBernoulli, LearnedPlackettLuce])
@pytest.mark.parametrize("decay", [None, 0.9])
def test_reinforce_is_unbiased(cls, decay):
    """REINFORCE with a leave-one-out batch baseline or an EMA of earlier batches:
    E[∇̂ loss] = −∇J exactly (the baseline never depends on the row's own actions)."""
    task, model = ChainTask(), ChainModel()
    pol = make_policy(cls)
    _, grad = exact_gradient(pol, task, model)
    obj = Reinforce(task, pol, baseline_decay=decay)
    got, se = estimator_mean(obj, task, model, steps=STEPS, batch=16)
    assert_close_mc(got, se, -grad)


@pytest.mark.parametrize("cls", [LearnedBernoulli, LearnedPlackettLuce])
def test_rloo_is_unbiased(cls):
    """RLOO (Kool et al. 2019): E[∇̂ loss] = −∇J exactly."""
    task, model = ChainTask(), ChainModel()
    pol = make_policy(cls)
    _, grad = exact_gradient(pol, task, model)
    got, se = estimator_mean(RLOO(task, pol, group=4), task, model, steps=STEPS, batch=4)
    assert_close_mc(got, se, -grad)


def test_grpo_without_std_scaling_is_a_fixed_multiple():
    """GRPO with ``scale=False`` (advantage R_i − group mean, own reward included):
    E[A_i ∇log π_i] = (1 − 1/G) ∇J exactly, since E[R_j ∇log π_i] = 0 for j ≠ i."""
    task, model = ChainTask(), ChainModel()
    pol = make_policy(LearnedBernoulli)
    _, grad = exact_gradient(pol, task, model)
    G = 4
    got, se = estimator_mean(GRPO(task, pol, group=G, scale=False), task, model, steps=STEPS, batch=4)
    assert_close_mc(got, se, -(G - 1) / G * grad)


def test_grpo_with_std_scaling_is_parallel_to_the_gradient_for_binary_rewards():
    """GRPO's group-normalised advantage is *not* an unbiased estimator. What is true for
    0/1 rewards and one prompt: A_i = f(R_i, m), m = successes among the other G − 1
    rollouts (independent of rollout i), and f(·, m) is affine in R_i ∈ {0, 1}, so
    E[A_i ∇log π_i] = E_m[f(1, m) − f(0, m)] · ∇J with m ~ Binomial(G − 1, J): a positive
    multiple c of ∇J, c computed exactly here from J."""
    task, model = ChainTask(exact=True), ChainModel()
    pol = make_policy(LearnedBernoulli)
    J, grad = exact_gradient(pol, task, model)
    G = 4

    def adv(own, m):
        R = torch.tensor([float(own)] + [1.0] * m + [0.0] * (G - 1 - m), dtype=torch.float64)
        return ((R[0] - R.mean()) / (R.std() + 1e-6)).item()

    c = sum(math.comb(G - 1, m) * J**m * (1 - J) ** (G - 1 - m) * (adv(1, m) - adv(0, m)) for m in range(G))
    assert c > 0
    got, se = estimator_mean(GRPO(task, pol, group=G), task, model, steps=STEPS, batch=4)
    assert_close_mc(got, se, -c * grad)


def test_grpo_kl_to_a_reference_and_the_clip():
    """The k3 KL term is 0 against itself (gradient too) and positive against another policy."""
    task, model = ChainTask(), ChainModel()
    pol = make_policy(LearnedBernoulli)
    ref = make_policy(LearnedBernoulli)
    obj = GRPO(task, pol, group=4, kl=1.0, reference=ref)
    assert not any(p.requires_grad for p in obj.reference.parameters())
    assert all(p.requires_grad for p in obj.policy.parameters())
    out = obj.step(model, *task.batch(8), torch.Generator().manual_seed(0))
    assert out.metrics["kl"] == pytest.approx(0.0, abs=1e-6) and out.metrics["clipped"] == 0.0
    with torch.no_grad():
        obj.reference.net.out.weight.mul_(-1.0)
    out = obj.step(model, *task.batch(8), torch.Generator().manual_seed(0))
    assert out.metrics["kl"] > 0.01
    with pytest.raises(ConfigError, match="^kl: "):
        GRPO(task, pol, kl=0.1)
    with pytest.raises(ConfigError, match="probability 0"):  # a reference with another support
        GRPO(task, pol, kl=0.1, reference=make_policy(LearnedPlackettLuce)).step(model, *task.batch(4))


# ----------------------------------------------------------------------------- learning the order


def train(obj, task, model, steps, batch, lr):
    opt = torch.optim.Adam(obj.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    for s in range(steps):
        out = obj.step(model, *task.batch(batch, "train", s), g)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return out


@pytest.mark.parametrize("name", ["reinforce", "rloo", "grpo"])
def test_rl_converges_to_the_only_correct_order(name):
    """Position features only; reward = fraction of correct positions; the only order with
    every position correct is right to left. After training, greedy decoding is r2l."""
    task, model = ChainTask(n=4, exact=False), ChainModel()
    pol = orderlab.build("policy", "learned_plackett_luce", features=["position"], net={"name": "mlp", "hidden": 16, "layers": 1})
    group = {"reinforce": 1, "rloo": 4, "grpo": 4}[name]
    obj = build("objective", {"name": name, "policy": pol, "group": group} if name != "reinforce" else {"name": name, "policy": pol},
                task=task)
    x, r = task.batch(8)
    r2l = decode(model, build("policy", "r2l"), x, r, cache=False)
    before = decode(model, pol, x, r, cache=False)
    assert not torch.equal(before.ranks, r2l.ranks)
    out = train(obj, task, model, steps=120, batch=16 // group, lr=0.1)
    after = decode(model, pol, x, r, cache=False)
    assert torch.equal(after.ranks, r2l.ranks), after.ranks
    assert out.metrics["score"] > 0.9
    assert set(out.metrics) >= {"loss", "reward", "score", "nfe", "tokens_per_step", "entropy"}


# ----------------------------------------------------------------------------- rewards and configuration


def test_rewards():
    task = ChainTask(n=4, exact=True)
    x, r = task.batch(3)
    pred = x.clone()
    pred[2, 1] = 0  # wrong
    d = Decoded(tokens=pred, ranks=r, nfe=torch.tensor([1, 4, 2]))
    score = task.score(pred, x, r)
    assert TaskScore()(score, d, r).tolist() == [1.0, 1.0, 0.0]
    assert NFEPenalty(0.5)(score, d, r).tolist() == pytest.approx([1 - 0.5 / 4, 1 - 0.5, -0.25])
    # Jazbec et al.: correct · ((L − steps + 1)/L)^α
    assert StepDiscount(2.0)(score, d, r).tolist() == pytest.approx([1.0, (1 / 4) ** 2, 0.0])
    assert StepDiscount(1.0)(torch.tensor([0.5, 0.5, 0.5]), d, r).tolist() == pytest.approx([0.5, 0.5 / 4, 0.5 * 3 / 4])
    assert isinstance(build("reward", {"name": "nfe_penalty", "lam": 0.2}), NFEPenalty)


@pytest.mark.parametrize("reward", ["score", {"name": "nfe_penalty", "lam": 0.5}, {"name": "step_discount"}])
def test_a_rollout_is_scored_once(reward):
    """The task scores each rollout once; the reward is built on that score."""
    task, model = ChainTask(n=3, exact=False), ChainModel()
    calls = []
    score = task.score
    task.score = lambda *a: calls.append(1) or score(*a)
    obj = build("objective", {"name": "grpo", "policy": make_policy(LearnedBernoulli), "group": 2, "reward": reward},
                task=task)
    ro = obj.rollout(model, *task.batch(3), torch.Generator().manual_seed(0))
    assert len(calls) == 1
    torch.testing.assert_close(ro.reward, obj.reward(ro.score, ro.decoded, ro.ranks))


def test_objectives_from_config_and_errors():
    task = ChainTask()
    spec = {"name": "grpo", "group": 4, "clip": 0.2, "kl": 0.05,
            "policy": {"name": "learned", "features": ["confidence", "margin", "position"], "net": {"name": "transformer", "d_model": 16}},
            "reference": {"name": "learned", "features": ["confidence"], "net": {"name": "linear", "weight": [10.0], "bias": -5.0}},
            "reward": {"name": "step_discount", "alpha": 1.0}}
    obj = build("objective", spec, task=task)
    assert isinstance(obj, GRPO) and isinstance(obj.policy, LearnedBernoulli) and not obj.trains_model
    assert obj.process is None and "GRPO(" in repr(obj)
    assert {n.split(".")[0] for n, p in obj.named_parameters() if p.requires_grad} == {"policy"}  # the reference is frozen
    with pytest.raises(ConfigError, match="objective.policy"):
        build("objective", {"name": "rloo", "policy": "top_prob"}, task=task)
    with pytest.raises(ConfigError, match="objective.group"):
        build("objective", {"name": "rloo", "group": 1}, task=task)
    with pytest.raises(ConfigError, match="objective.temperature"):
        build("objective", {"name": "reinforce", "train_model": True}, task=task)
    with pytest.raises(ConfigError, match="objective.reward"):
        build("objective", {"name": "reinforce", "reward": "accuracy"}, task=task)


def test_joint_denoiser_training_reaches_the_model():
    """LLaDOU-style: with train_model the loss has −A · log p_θ(x | σ) for the decoded
    tokens and order, so gradients reach the denoiser (and the loop must train it)."""
    task = ChainTask(n=3, exact=False)
    torch.manual_seed(0)
    model = orderlab.build("model", "transformer", vocab_size=2, max_len=4, attention="set_causal", d_model=16, n_layers=1, n_heads=2)
    obj = RLOO(task, orderlab.build("policy", "learned", net="mlp"), group=4, temperature=1.0, train_model=True)
    assert obj.trains_model
    out = obj.step(model, *task.batch(4), torch.Generator().manual_seed(0))
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and sum(g.abs().sum() for g in grads) > 0


@pytest.mark.parametrize("cls", [LearnedBernoulli, LearnedPlackettLuce])
def test_sampled_trajectories_follow_the_replayed_distribution(cls):
    """Orders sampled by rollouts (decode + recording) occur with the probabilities
    exp(log π(τ)) that teacher-forced replay gives (Pearson chi-square, fixed seed)."""
    task, model = ChainTask(), ChainModel()
    pol = make_policy(cls)
    orders = dense_orders(task.n, singletons=cls is LearnedPlackettLuce)
    x, r = task.batch(len(orders))
    follow = torch.cat([torch.zeros(len(orders), 1, dtype=torch.long), orders], 1)
    with pol.recording(follow=follow) as traj:
        decode(model, pol, x, r, cache=False)
    with torch.no_grad():
        p = pol.replay(traj).log_prob.exp()
    n = 4000
    x, r = task.batch(n)
    with pol.recording(seed=7, greedy=False):
        d = decode(model, pol, x, r, cache=False)
    counts = (d.ranks[:, None, :] == follow[None]).all(-1).sum(0).double()  # [K]
    assert counts.sum() == n  # every sampled order is one of the enumerated ones
    chi2 = ((counts - n * p) ** 2 / (n * p)).sum().item()
    df = len(p) - 1
    assert chi2 < df + 6 * math.sqrt(2 * df), (chi2, counts, n * p)
