"""The ``hidden`` feature of learned policies (UPO, DCoLT): the denoiser's final normalised
hidden state at each candidate, passed by the decoder from the forward that gives the
probabilities, detached from the denoiser."""

import pytest
import torch

import orderlab
from orderlab.decoding import decode
from orderlab.objectives import GRPO
from orderlab.policies import LearnedPlackettLuce, PolicyError, StepView
from orderlab.policies.learned import Features
from orderlab.rules import UNKNOWN

D = 16  # the denoiser's d_model


class ToyTask:
    """Two given tokens, four to generate (score: the fraction of them right)."""

    vocab_size, seq_len, eos_id, pad_id, metric = 5, 6, None, 0, "token_accuracy"

    def batch(self, n, split="train", seed=0):
        g = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, self.vocab_size, (n, self.seq_len), generator=g)
        ranks = torch.ones_like(tokens)
        ranks[:, :2] = 0
        return tokens, ranks

    def score(self, pred, tokens, ranks):
        return ((pred == tokens) & (ranks >= 1)).sum(1).double() / (ranks >= 1).sum(1)


def tiny_model(attention, seed=0):
    torch.manual_seed(seed)
    return orderlab.build("model", "transformer", vocab_size=5, max_len=6, attention=attention, d_model=D, n_layers=2, n_heads=2)


def hidden_policy(k=1, seed=0):
    pol = orderlab.build("policy", "learned_plackett_luce", features=["confidence", "hidden"], hidden_size=D,
                         net={"name": "mlp", "hidden": 8, "layers": 1}, k=k, greedy=False, seed=seed)
    with torch.no_grad():  # a policy that reads the hidden state (the zero-initialised output would ignore it)
        torch.manual_seed(1)
        pol.net.out.weight.normal_()
    return pol


def final_norm_states(model, stream):
    """The output of ``model.norm`` (the final RMSNorm) for every token of the stream,
    read by a forward hook: an independent route to the head's input."""
    got = []
    handle = model.norm.register_forward_hook(lambda mod, inp, out: got.append(out.detach()))
    try:
        model(stream)
    finally:
        handle.remove()
    return got[0]  # [B, N, C]


def test_default_forward_is_unchanged_and_hidden_is_the_head_input():
    model = tiny_model("set_causal")
    x, r = ToyTask().batch(3)
    s = next(model.rule.passes(x, r, model.mask_id))
    logits, hidden = model(s, return_hidden=True)
    assert torch.equal(logits, model(s))  # bit-identical default output
    assert torch.equal(hidden, final_norm_states(model, s))
    torch.testing.assert_close(logits, hidden @ model.head_weight().T)


@pytest.mark.parametrize("attention", ["set_causal", "bidirectional", {"name": "block_causal", "block_size": 2}])
@pytest.mark.parametrize("cache", [True, False])
def test_the_feature_is_the_final_normalised_hidden_state_of_the_decode_state(attention, cache):
    """At every recorded step, the ``hidden`` columns equal ``model.norm``'s output for the
    query of each candidate position, recomputed without a cache from the decode's state
    (tokens revealed at earlier steps), and 0 elsewhere; ``confidence`` comes first."""
    model, pol, task = tiny_model(attention), hidden_policy(k=2), ToyTask()
    x, r = task.batch(4)
    with pol.recording(seed=3, greedy=False) as traj:
        d = decode(model, pol, x, r, cache=cache, temperature=1.0, seed=5)
    assert traj.steps == d.steps == 2
    for t in range(traj.steps):
        f, cand = traj.features[t], traj.candidates[t]  # [B, L, 1 + D], [B, L]
        assert f.shape == (4, 6, 1 + D)
        known = (d.ranks >= 0) & (d.ranks <= t)  # given, or revealed before step t
        rank = torch.where(known, d.ranks, torch.full_like(d.ranks, UNKNOWN))
        cur = torch.where(known, d.tokens, torch.full_like(d.tokens, model.mask_id))
        s = model.rule.step(cur, rank, cand, t, False)
        states = final_norm_states(model, s)  # [B, N, C]
        want = torch.zeros(4, 6, D)
        b, n = (s.out >= 0).nonzero(as_tuple=True)
        want[b, s.out[b, n]] = states[b, n]
        torch.testing.assert_close(f[..., 1:], want, atol=1e-5, rtol=1e-5)
        assert (f[..., 1:][~cand] == 0).all()


def test_gradients_reach_the_policy_net_only():
    """A view whose hidden states carry the denoiser's graph: the policy's log-probability
    differentiates into the net and never into the denoiser."""
    model, pol, task = tiny_model("set_causal"), hidden_policy(k=1), ToyTask()
    x, r = task.batch(2)
    s = model.rule.step(torch.where(r >= 1, model.mask_id, x), torch.where(r >= 1, UNKNOWN, r), r >= 1, 0, False)
    logits, h = model(s, return_hidden=True)
    assert h.requires_grad
    L = x.shape[1]
    hidden = torch.zeros(2, L, D).index_put((torch.arange(2)[:, None].expand_as(s.out)[s.out >= 0], s.out[s.out >= 0]),
                                            h[s.out >= 0])
    probs = torch.ones(2, L, 5) / 5  # the hidden states alone carry the denoiser
    view = StepView(probs=probs, candidates=r >= 1, masked=r >= 1, step=0, given=r == 0, hidden=hidden)
    pol.reset()
    sel = torch.zeros(2, L, dtype=torch.bool)
    sel[:, 3] = True
    pol.log_prob(sel, view).sum().backward()
    assert all(p.grad is None for p in model.parameters())
    grads = [p.grad for p in pol.net.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0


def test_policy_gradient_step_trains_the_policy_not_the_denoiser():
    """GRPO with a hidden-state policy (UPO's setting): the rollouts' recorded features
    carry the hidden states, the loss's gradients reach the policy only."""
    model, task = tiny_model("set_causal"), ToyTask()
    pol = hidden_policy(k=1)
    obj = GRPO(task, pol, group=2, temperature=1.0)
    out = obj.step(model, *task.batch(3), torch.Generator().manual_seed(0))
    assert len(set(obj.rollout(model, *task.batch(3), torch.Generator().manual_seed(0)).reward.tolist())) > 1
    out.loss.backward()
    assert all(p.grad is None for p in model.parameters())
    assert sum(float(p.grad.abs().sum()) for p in pol.parameters() if p.grad is not None) > 0


def test_compiled_decode_with_hidden_states_equals_eager():
    model, task = tiny_model("set_causal"), ToyTask()
    x, r = task.batch(3)
    pol = hidden_policy(k=1)
    eager = decode(model, pol, x, r, cache=True)
    compiled = decode(model, pol, x, r, cache=True, compile={"backend": "eager"})
    assert torch.equal(eager.tokens, compiled.tokens) and torch.equal(eager.ranks, compiled.ranks)


def test_config_and_errors():
    pol = orderlab.build("policy", {"name": "learned", "features": ["hidden", "position"], "hidden_size": 12, "net": "linear"})
    assert pol.wants_hidden and pol.net.out.in_features == 13 and "hidden_size=12" in repr(pol)
    assert not orderlab.build("policy", "learned", features=["confidence"]).wants_hidden
    with pytest.raises(Exception, match="needs hidden_size"):
        orderlab.build("policy", {"name": "learned", "features": ["hidden"]})
    # a policy without the hidden feature ignores the width (an experiment's context gives every learned policy the model's)
    assert orderlab.build("policy", {"name": "learned", "features": ["confidence"], "hidden_size": 8}).features.hidden_size is None
    with pytest.raises(PolicyError, match="only with the 'hidden' feature"):  # the Features class itself still refuses it
        Features(["confidence"], 8)
    model, task = tiny_model("set_causal"), ToyTask()
    x, r = task.batch(2)
    wrong = orderlab.build("policy", "learned", features=["hidden"], hidden_size=D + 1, net="linear")
    with pytest.raises(PolicyError, match=f"hidden_size={D + 1}.*{D} columns"):
        decode(model, wrong, x, r)
    view = StepView(probs=torch.ones(2, 6, 5) / 5, candidates=r >= 1, masked=r >= 1, step=0)
    pol = LearnedPlackettLuce(features=["hidden"], hidden_size=D, net=None)
    with pytest.raises(PolicyError, match="needs StepView.hidden"):
        pol.select(view)
    with pytest.raises(PolicyError, match="StepView.hidden must have shape"):
        StepView(probs=torch.ones(2, 6, 5) / 5, candidates=r >= 1, masked=r >= 1, step=0, hidden=torch.zeros(2, 5, D))
    from orderlab.approx_cache import ApproximateCache
    with pytest.raises(ValueError, match="does not pass hidden states"):
        decode(tiny_model("bidirectional"), pol, x, r, cache=ApproximateCache(suffix=False))


# ----------------------------------------------------------------------------- hidden_size from the model


def _experiment(policy, stages=None, overrides=()):
    from orderlab.config import load

    cfg = {
        "task": {"name": "addition", "digits": 1},
        "model": {"name": "transformer", "d_model": 24, "n_layers": 1, "n_heads": 2, "attention": {"name": "set_causal"}},
        "stages": stages or {},
        "evaluate": {"policies": [policy], "n": 4, "batch_size": 4},
    }
    return load(cfg, list(overrides))


def test_an_experiment_gives_the_hidden_feature_the_models_width():
    """A YAML with ``features: [confidence, hidden]`` and no ``hidden_size`` builds with the
    model's d_model, in the evaluation policies and inside objectives (the net's input is
    1 + d_model wide); a spec may still set it, and a wrong one fails when decoding."""
    spec = {"name": "learned_plackett_luce", "features": ["confidence", "hidden"], "net": {"name": "mlp", "hidden": 8}}
    stages = {"policy": {"objective": {"name": "rloo", "policy": spec, "group": 2}, "train": {"steps": 1}}}
    exp = _experiment(spec, stages)
    for pol in (exp.policies["learned_plackett_luce(features=['confidence', 'hidden'], net=mlp(hidden=8))"],
                exp.stages["policy"].objective.policy):
        assert pol.features.hidden_size == 24 and pol.wants_hidden
        assert pol.net.hidden[0].in_features == 25
    wider = _experiment(spec, overrides=["model.d_model=32"])
    assert next(iter(wider.policies.values())).net.hidden[0].in_features == 33  # follows the model
    x, r = exp.task.batch(3, "test")
    d = decode(exp.model, exp.stages["policy"].objective.policy, x, r)
    assert (d.ranks[r >= 1] >= 1).all()
    explicit = _experiment({**spec, "hidden_size": 24})  # the spec may set it (the same value here)
    assert next(iter(explicit.policies.values())).features.hidden_size == 24
    wrong = next(iter(_experiment({**spec, "hidden_size": 7}).policies.values()))
    with pytest.raises(PolicyError, match="hidden_size=7.*24 columns"):
        decode(exp.model, wrong, x, r)
    plain = _experiment({"name": "learned", "features": ["confidence"], "net": "linear"})
    assert next(iter(plain.policies.values())).features.hidden_size is None  # read only by the hidden feature


def test_vi_orders_walks_with_hidden_states_as_decode_does():
    """``vi_orders`` builds its own views: with a hidden-feature policy they carry the
    denoiser's hidden states, so π's log-probability of an order under the objective's
    program equals the policy's own, recorded by teacher-forced decoding of the same order
    (decode's views), and a step trains the policy and guide, not the denoiser."""
    from orderlab.objectives import VIOrders, teacher_forced

    model, task = tiny_model("set_causal"), ToyTask()
    pol = hidden_policy(k=1)
    obj = orderlab.build("objective", {"name": "vi_orders", "policy": pol, "guide": {"name": "mlp", "hidden": 8}})
    assert isinstance(obj, VIOrders) and obj.guide.net.hidden[0].in_features == 1 + D + 2
    x, r = task.batch(3)
    order = obj.prior(model).sample(x, r, torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = obj.prior(model).log_prob(x, order)
        with pol.recording(follow=order) as traj:
            teacher_forced(model, pol, x, r, cache=False)
        want = pol.replay(traj).log_prob
    torch.testing.assert_close(got.float(), want.float(), atol=1e-5, rtol=1e-5)
    out = obj.step(model, x, r, torch.Generator().manual_seed(1))
    out.loss.backward()
    assert all(p.grad is None for p in model.parameters())
    assert sum(float(p.grad.abs().sum()) for p in pol.net.parameters() if p.grad is not None) > 0
