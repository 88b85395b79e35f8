"""Order search in evaluation (``evaluate.search``, ``ablate.search``): a row can be the
searched version of any policy (``orderlab.search.search_decode``), with NFE counting every
path's forwards and every scoring pass; ``k = 1`` is the plain row."""

import pytest
import torch

from orderlab.ablate import AblateConfig, evaluate_point
from orderlab.config import load
from orderlab.decoding import decode
from orderlab.evaluate import SearchConfig, evaluate, measure
from orderlab.registry import ConfigError
from orderlab.runtime import derive_seed
from orderlab.search import path_log_likelihood

CFG = {
    "task": {"name": "addition", "digits": 2},
    "model": {"name": "transformer", "d_model": 16, "n_layers": 1, "n_heads": 2, "attention": {"name": "set_causal"}},
    "stages": {},
    "evaluate": {"policies": ["top_prob", {"name": "random", "seed": 3}], "n": 6, "batch_size": 4, "temperature": 1.0,
                 "heatmaps": False, "likelihood": False},
}


@pytest.fixture(scope="module")
def exp():
    e = load(CFG)
    e.model.eval()
    return e


def _same_row(a, b):
    skip = {"policy", "wall_s", "tokens_per_s", "search"}
    assert {k: v for k, v in a.items() if k not in skip} == {k: v for k, v in b.items() if k not in skip}


def test_k1_is_the_plain_row(exp):
    plain = evaluate(exp.model, exp.task, exp.policies, 6, 4, temperature=1.0)
    one = evaluate(exp.model, exp.task, exp.policies, 6, 4, temperature=1.0, search=SearchConfig(k=1))
    assert [r["policy"] for r in one] == ["top_prob", "top_prob (search k=1)", "random(seed=3)", "random(seed=3) (search k=1)"]
    for i, row in enumerate(plain):
        _same_row(one[2 * i], row)
        _same_row(one[2 * i + 1], row)  # the same decode: same tokens, orders, NFE
        assert one[2 * i + 1]["search"] == {"k": 1, "verifier": None, "temperature": None}


def _paths(exp, policy, x, r, k, seed):
    """Every path of batch 0 decoded directly (the search's one decode of B·k rows)."""
    return decode(exp.model, policy, x.repeat_interleave(k, 0), r.repeat_interleave(k, 0), cache=True, temperature=1.0,
                  seed=seed, eos_id=exp.task.eos_id, pad_id=exp.task.pad_id)


@pytest.mark.parametrize("verifier", [None, "task"])
def test_nfe_counts_every_path_and_every_scoring_pass(exp, verifier):
    """Measured NFE per row = Σ over its k paths of their forwards, plus (likelihood
    verifier) the passes that score each path; the kept row is the best path's."""
    k, seed = 3, 0
    x, r = exp.task.batch(4, "test", seed=0)
    policy = exp.policies["random(seed=3)"]
    m = measure(exp.model, exp.task, policy, x, r, batch_size=4, temperature=1.0, seed=seed,
                search=SearchConfig(k=k, verifier=verifier))
    d = _paths(exp, policy, x, r, k, derive_seed(seed, 0, "decode"))
    want = d.nfe.view(4, k).sum(1)
    if verifier is None:
        ll, passes = path_log_likelihood(exp.model, d.tokens, d.ranks)
        want = want + passes.view(4, k).sum(1)
        best = ll.view(4, k).argmax(1)
        assert (passes > 0).all()
    else:
        scores = exp.task.score(d.tokens, x.repeat_interleave(k, 0), r.repeat_interleave(k, 0)).double().view(4, k)
        best = scores.argmax(1)
        torch.testing.assert_close(m.metrics[exp.task.metric], scores.max(1).values.cpu())  # the oracle keeps the best
    assert torch.equal(m.nfe, want.cpu())
    assert (m.nfe > d.nfe.view(4, k)[:, 0].cpu()).all()  # more than one path's
    kept = d.ranks.view(4, k, -1)[torch.arange(4), best]
    m2 = measure(exp.model, exp.task, policy, x, r, batch_size=4, temperature=1.0, seed=seed, keep_orders=4,
                 search=SearchConfig(k=k, verifier=verifier))
    assert torch.equal(m2.orders, kept.cpu())
    assert torch.equal(m2.revealed, (kept >= 1).sum(1).cpu())  # tokens per step: the kept path's tokens over all NFE


def test_yaml_keys_labels_and_errors(tmp_path):
    e = load({**CFG, "evaluate": {**CFG["evaluate"], "search": {"k": 2, "verifier": "task"}}})
    assert e.evaluate.search == SearchConfig(k=2, verifier="task")
    assert SearchConfig(k=2, verifier="task").label("margin") == "margin (search k=2, task)"
    rows = evaluate(e.model, e.task, e.policies, 4, 4, temperature=1.0, search=e.evaluate.search)
    assert [r["policy"] for r in rows][1] == "top_prob (search k=2, task)"
    assert rows[1]["nfe_mean"] == 2 * rows[0]["nfe_mean"]  # top_prob: one token per step on both paths
    with pytest.raises(ConfigError, match=r"evaluate\.search\.verifier: unknown verifier 'oracle'"):
        load({**CFG, "evaluate": {**CFG["evaluate"], "search": {"verifier": "oracle"}}})
    with pytest.raises(ConfigError, match=r"evaluate\.search\.k"):
        load({**CFG, "evaluate": {**CFG["evaluate"], "search": {"k": 0}}})
    with pytest.raises(ConfigError, match=r"evaluate\.search\.kk.*did you mean 'k'"):
        load({**CFG, "evaluate": {**CFG["evaluate"], "search": {"kk": 2}}})


def test_ablation_points_can_be_searched():
    e = load({**CFG, "ablate": {"grid": ["top_prob"], "n": 4, "batch_size": 4, "temperature": 1.0, "bits": False,
                                 "search": {"k": 1}}})
    cfg = e.ablation.config
    assert cfg.search == SearchConfig(k=1) and cfg.spec()["search"] == {"k": 1, "verifier": None, "temperature": None}
    x, r = e.task.batch(4, "test", seed=0)
    pol = e.ablation.policy(cfg.points[0], 0)
    searched = evaluate_point(e.model, e.task, pol, x, r, cfg, 0)
    plain = evaluate_point(e.model, e.task, pol, x, r, AblateConfig(**{**cfg.spec(), "search": None}), 0)
    for key in ("exact_match", "nfe", "tokens_per_step", "orders"):
        assert searched[key] == plain[key]
    from orderlab import ablate

    assert ablate._record(cfg.points[0], cfg.search)["policy"] == "top_prob (search k=1)"
    assert ablate._setup(e)["search"] == {"k": 1, "verifier": None, "temperature": None}
