"""DCoLT / LLaDOU (Huang et al. 2025): the ordered Plackett–Luce log-probability against
REFERENCES.md's formula by hand, the policy's recorded and replayed log π, and the joint
recipe (experiments/learned_zoo_dcolt.yaml) moving the denoiser's weights where the frozen
variant does not."""

import itertools
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import orderlab
from orderlab.builder import build
from orderlab.decoding import decode
from orderlab.objectives import GRPO
from orderlab.policies import DCoLTPolicy, OrderedPlackettLuce, PlackettLuceTopK
from orderlab.registry import ConfigError
from orderlab.train import TrainConfig, train
from toy_tasks import ChainTask  # tests/toy_tasks.py

YAML = Path(__file__).resolve().parents[1] / "experiments" / "learned_zoo_dcolt.yaml"

LOGITS = [0.3, -1.2, 0.0, 2.0, 0.7]  # position 3 is not a candidate
VALID = [True, True, True, False, True]


def _by_hand(draw):
    """REFERENCES.md, DCoLT: log π = Σ_k [log s_σk − log(Σ_unselected s + Σ_{j≥k} s_σj)]."""
    s = {i: math.exp(l) for i, (l, v) in enumerate(zip(LOGITS, VALID)) if v}
    unselected = sum(w for i, w in s.items() if i not in draw)
    return sum(math.log(s[draw[k]]) - math.log(unselected + sum(s[j] for j in draw[k:])) for k in range(len(draw)))


def _slots(draw, L=5):
    a = torch.zeros(1, L, dtype=torch.long)
    for j, i in enumerate(draw):
        a[0, i] = j + 1
    return a


def _dist(k=2):
    return OrderedPlackettLuce(torch.tensor([LOGITS], dtype=torch.float64), torch.tensor([VALID]), k)


def test_ordered_log_prob_is_the_dcolt_formula_by_hand():
    d = _dist(2)
    cands = [0, 1, 2, 4]
    draws = list(itertools.permutations(cands, 2))  # 12 ordered draws of 2 of the 4 candidates
    lp = {dr: float(d.log_prob(_slots(dr))) for dr in draws}
    for dr in draws:
        assert lp[dr] == pytest.approx(_by_hand(dr), abs=1e-12)
    # one draw by hand, written out: σ = (4, 0), s = e^l, unselected {1, 2}
    s0, s1, s2, s4 = (math.exp(LOGITS[i]) for i in (0, 1, 2, 4))
    hand = math.log(s4 / (s0 + s1 + s2 + s4)) + math.log(s0 / (s0 + s1 + s2))
    assert lp[(4, 0)] == pytest.approx(hand, abs=1e-12)
    assert sum(math.exp(v) for v in lp.values()) == pytest.approx(1.0, abs=1e-12)  # a distribution over draws
    # the unordered set's probability is the sum over its two orders (PlackettLuceTopK)
    setd = PlackettLuceTopK(torch.tensor([LOGITS], dtype=torch.float64), torch.tensor([VALID]), 2)
    for a, b in itertools.combinations(cands, 2):
        both = math.exp(lp[(a, b)]) + math.exp(lp[(b, a)])
        assert float(setd.log_prob(_slots((a, b)) > 0).exp()) == pytest.approx(both, abs=1e-12)
        assert float(d.log_prob(_slots((a, b)) > 0).exp()) == pytest.approx(both, abs=1e-12)  # a plain set: its probability
    # outside the support: a non-candidate, a wrong size, slots that are not 1..k
    assert d.log_prob(_slots((3, 0))).item() == -math.inf
    assert d.log_prob(_slots((0,))).item() == -math.inf
    bad = _slots((0, 1))
    bad[0, 1] = 3
    assert d.log_prob(bad).item() == -math.inf


def test_ordered_samples_follow_the_formula():
    """Sampled ordered draws occur with probability exp(log π) (Pearson chi-square, fixed seed)."""
    n = 6000
    d = OrderedPlackettLuce(torch.tensor([LOGITS], dtype=torch.float64).expand(n, -1), torch.tensor([VALID]).expand(n, -1), 2)
    a = d.sample(torch.Generator().manual_seed(3))
    assert ((a > 0).sum(1) == 2).all() and (a[:, 3] == 0).all()
    draws = list(itertools.permutations([0, 1, 2, 4], 2))
    counts = torch.tensor([float(((a[:, i] == 1) & (a[:, j] == 2)).sum()) for i, j in draws])
    p = torch.tensor([math.exp(_by_hand(dr)) for dr in draws])
    assert counts.sum() == n
    chi2 = float(((counts - n * p) ** 2 / (n * p)).sum())
    df = len(draws) - 1
    assert chi2 < df + 6 * math.sqrt(2 * df), (chi2, counts, n * p)
    assert _dist(2).mode().tolist() == _slots((4, 0)).tolist()  # the k largest logits, largest first


def test_policy_records_ordered_draws_and_replays_their_log_prob():
    """Through decode: the trajectory holds draw slots, the recorded log π is the DCoLT
    formula of the net's logits, and replay (with gradients) gives the same values."""
    torch.manual_seed(0)
    model = orderlab.build("model", "transformer", vocab_size=3, max_len=6, attention="bidirectional", d_model=16,
                           n_layers=1, n_heads=2).eval()
    pol = build("policy", {"name": "dcolt", "k": 2, "features": ["confidence", "position", "hidden"],
                           "net": {"name": "mlp", "hidden": 8, "bias": 0.0}, "hidden_size": 16})
    assert isinstance(pol, DCoLTPolicy) and pol.wants_hidden
    with torch.no_grad():  # a net that is not constant across positions
        for p in pol.net.parameters():
            p.normal_(0, 1.0)
    x = torch.randint(0, 3, (4, 6))
    r = torch.ones_like(x)
    r[:, 0] = 0
    with pol.recording(seed=5, greedy=False) as traj:
        d = decode(model, pol, x, r, cache=False)
    acts = traj.stacked("selected")  # [T, B, L]
    assert acts.dtype == torch.long and traj.steps == 3  # 5 positions, 2 per step: 2, 2, 1
    assert (acts.max(-1).values == torch.tensor([2, 2, 1])[:, None]).all()
    # the decoded order reveals exactly the recorded sets
    for t in range(traj.steps):
        assert torch.equal(acts[t] > 0, d.ranks == t + 1)
    rep = pol.replay(traj)
    recorded = traj.stacked("log_prob")
    torch.testing.assert_close(rep.step_log_prob.detach(), recorded, atol=1e-9, rtol=0)
    # the formula by hand on the replayed logits of one step and row
    f, cand = traj.stacked("features")[1, 2], traj.stacked("candidates")[1, 2]
    with torch.no_grad():
        logits = pol.net(f[None], torch.ones(1, 6, dtype=torch.bool))[0].double()
    draw = [int((acts[1, 2] == j).nonzero()) for j in (1, 2)]  # the positions drawn first and second
    s = logits.exp()
    uns = float(s[cand].sum() - s[draw].sum())
    hand = sum(math.log(s[draw[k]]) - math.log(uns + float(s[draw[k:]].sum())) for k in range(2))
    assert float(recorded[1, 2]) == pytest.approx(hand, abs=1e-9)
    rep.log_prob.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in pol.net.parameters())


class _GradedTask(ChainTask):
    """Position 0 given, five positions to generate over three tokens; score = fraction of
    generated positions equal to 1 (graded, so GRPO's group advantages are non-zero on an
    untrained denoiser)."""

    def __init__(self):
        super().__init__(n=5, exact=False, vocab_size=3)

    def metrics(self, pred, tokens, ranks):  # the recipe's metric: token_accuracy
        return {"toy": self.score(pred, tokens, ranks), "token_accuracy": self.score(pred, tokens, ranks)}


class _ExactTask(ChainTask):
    """Score: exact match of the row; metrics: also the graded fraction ("partial")."""

    def __init__(self):
        super().__init__(n=5, exact=True, vocab_size=3)

    def metrics(self, pred, tokens, ranks):
        return {"exact": self.score(pred, tokens, ranks), "partial": _GradedTask().score(pred, tokens, ranks)}


def test_metric_picks_the_score_the_reward_is_built_on():
    torch.manual_seed(0)
    model = orderlab.build("model", "transformer", vocab_size=3, max_len=6, attention="bidirectional", d_model=16,
                           n_layers=1, n_heads=2)
    task = _ExactTask()
    pol = {"name": "dcolt", "k": 2, "features": ["confidence"], "net": "mlp"}
    for metric in (None, "partial"):
        obj = build("objective", {"name": "grpo", "policy": pol, "temperature": 1.0, "metric": metric}, task=task)
        ro = obj.rollout(model, *task.batch(4), torch.Generator().manual_seed(0))
        want = task.metrics(ro.decoded.tokens, ro.tokens, ro.ranks)["exact" if metric is None else "partial"]
        torch.testing.assert_close(ro.score, want.double())
        torch.testing.assert_close(ro.reward, want.double())


def _recipe(train_model: bool):
    """The YAML's dcolt-stage objective, with the tiny task and a tiny denoiser."""
    spec = OmegaConf.to_container(OmegaConf.load(YAML).stages.dcolt.objective)
    spec.update(train_model=train_model, group=4)
    spec["policy"]["hidden_size"] = 16  # the tiny denoiser's d_model (an experiment's model gives it)
    return build("objective", spec, task=_GradedTask())


@pytest.mark.parametrize("joint", [True, False])
def test_joint_flag_moves_the_denoiser_and_frozen_does_not(tmp_path, joint):
    torch.manual_seed(0)
    model = orderlab.build("model", "transformer", vocab_size=3, max_len=6, attention="bidirectional", d_model=16,
                           n_layers=1, n_heads=2)
    obj = _recipe(joint)
    assert isinstance(obj, GRPO) and isinstance(obj.policy, DCoLTPolicy) and obj.trains_model == joint
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pol_before = {k: v.clone() for k, v in obj.policy.state_dict().items()}
    cfg = TrainConfig(steps=2, batch_size=4, lr=1e-2, warmup=0, weight_decay=0.0, log_every=1, eval_every=0, valid_n=0,
                      ckpt_every=0)
    res = train(model, obj, _GradedTask(), cfg, tmp_path, progress=False)
    assert res.step == 2
    moved = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert bool(moved) == joint, moved  # weight decay is 0: only a gradient moves a weight
    assert any(not torch.equal(v, pol_before[k]) for k, v in obj.policy.state_dict().items())  # the policy learns in both


def test_recipe_yaml_and_bad_keys():
    exp = orderlab.load(YAML)
    obj = exp.stages["dcolt"].objective
    assert isinstance(obj, GRPO) and obj.trains_model and obj.temperature == 1.0
    assert isinstance(obj.policy, DCoLTPolicy) and obj.policy.k == 2 and obj.policy.features.hidden_size == 128
    assert exp.stages["denoiser"].objective.__class__.__name__ == "MDMNelbo"  # the same denoiser as learned_zoo_aop
    with pytest.raises(ConfigError, match="stages.dcolt.objective.policy.kk"):
        orderlab.load(YAML, ["stages.dcolt.objective.policy.kk=2"])
    assert obj.metric == "token_accuracy"
    with pytest.raises(ConfigError, match="stages.dcolt.objective.metric: the task has no metric 'tok_acc'"):
        orderlab.load(YAML, ["stages.dcolt.objective.metric=tok_acc"])
    with pytest.raises(ConfigError, match="temperature"):
        orderlab.load(YAML, ["stages.dcolt.objective.temperature=0.0"])
    ref = "{name: learned_plackett_luce, k: 2, features: [confidence], net: linear}"
    with pytest.raises(ConfigError, match="stages.dcolt.objective.reference: a dcolt policy"):  # ordered vs set log-probs
        orderlab.load(YAML, [f"stages.dcolt.objective.reference={ref}", "stages.dcolt.objective.kl=0.1"])
