"""The comparison runner (issue 21, section 2): learned rows in an ablation grid with their
training cost, resume, config errors, each family's best point and section 3's bar
(orderlab.compare, orderlab.ablate), and the training-cost counters (orderlab.train.Cost)."""

from __future__ import annotations

import copy
import csv
import json

import pytest
import torch

import orderlab
from orderlab import ablate
from orderlab.compare import StagePolicy, bar, bar_text, best_points
from orderlab.registry import ConfigError
from orderlab.run import execute

# a tiny chain experiment: a 2-step denoiser, a 2-step GRPO policy stage (frozen denoiser)
BASE = {
    "task": {"name": "chain", "chains": 1, "length": 3},
    "model": {"name": "transformer", "d_model": 16, "n_layers": 1, "n_heads": 2, "attention": {"name": "bidirectional"}},
    "stages": {
        "denoiser": {"objective": {"name": "mdm_nelbo", "process": {"name": "linear"}},
                     "train": {"steps": 2, "batch_size": 4, "valid_n": 0, "log_every": 1, "ckpt_every": 1}},
        "grpo": {"objective": {"name": "grpo", "group": 2,
                               "policy": {"name": "learned", "net": {"name": "mlp", "hidden": 8, "layers": 1}}},
                 "train": {"steps": 2, "batch_size": 2, "valid_n": 0, "log_every": 1, "ckpt_every": 1}},
    },
    "evaluate": {"policies": ["l2r"], "n": 4, "batch_size": 4, "likelihood": False, "heatmaps": False},
    "ablate": {
        "grid": ["l2r", {"name": "threshold", "tau": [0.5, 0.9]}, {"stage": "grpo", "greedy": [True, False]},
                 {"name": "top_prob", "search": {"k": 2, "temperature": 1.0}}],
        "seeds": [0, 1, 2],
        "n": 4,
        "batch_size": 4,
        "heatmaps": False,
        "bits": False,
    },
}


def _config(tmp_path, **ablate_overrides):
    cfg = copy.deepcopy(BASE)
    cfg["ablate"].update(ablate_overrides)
    cfg["run"] = {"dir": str(tmp_path / "runs"), "name": "zoo"}
    return cfg


def _run(cfg):
    exp = orderlab.load(cfg)
    return exp, execute(exp, progress=False)


def test_learned_rows_appear_with_their_training_cost(tmp_path):
    exp, results = _run(_config(tmp_path))
    section = results["ablation"]
    pts = section["points"]
    assert [p["policy"] for p in pts] == ["l2r", "threshold(tau=0.5)", "threshold(tau=0.9)", "grpo(greedy=True)",
                                          "grpo(greedy=False)", "top_prob (search k=2)"]
    assert [p["kind"] for p in pts] == ["heuristic"] * 3 + ["learned"] * 2 + ["search"]
    assert [p["decode"] for p in pts[3:5]] == ["greedy", "sampled"]
    assert pts[3]["method"] == "grpo"
    # the learned rows' cost is the grpo stage's (its checkpoint), not the denoiser's
    cost = pts[3]["train"]
    grpo_ckpt = torch.load(tmp_path / "runs" / "zoo" / "grpo" / "checkpoint.pt", weights_only=True)
    assert cost == grpo_ckpt["cost"] and cost["train_s"] > 0
    # GRPO: every step decodes batch_size * group = 4 rollouts (at least one forward each, at most 3: the
    # answers), one denoiser call per decode step of the rows still unfinished
    assert 2 * 4 <= cost["forwards"] <= 2 * 4 * 3 and cost["calls"] <= cost["forwards"] <= 4 * cost["calls"]
    assert pts[0]["train"] is None and pts[5]["train"] is None
    den = section["denoiser"]
    assert den["stages"] == ["denoiser"] and den["forwards"] == 2 * 4  # one forward of 4 rows per likelihood step
    for p in pts:
        assert [r["seed"] for r in p["runs"]] == [0, 1, 2] and "nfe" in p["summary"]
    # greedy and sampled decode the same learned module differently only through its draws
    assert all(r["policy_weights"] == pts[3]["policy_weights"] for r in pts[3]["runs"])
    run = tmp_path / "runs" / "zoo"
    with open(run / ablate.CSV) as f:
        rows = list(csv.DictReader(f))
    assert rows[3]["method"] == "grpo" and rows[3]["decode"] == "greedy" and rows[3]["kind"] == "learned"
    assert float(rows[3]["train_forwards"]) == cost["forwards"] and float(rows[0]["train_forwards"]) == 0.0
    md = (run / ablate.TABLE).read_text()
    assert "| decode |" in md and "train fwd" in md
    comp = (run / ablate.COMPARISON).read_text()
    assert "Shared denoiser (stages denoiser)" in comp and "Section 3's bar" in comp
    assert comp.count("\n| ") == 1 + 4  # header + the best point of each of the 4 entries


def test_stage_policy_samples_with_the_run_seed_and_restores_the_module():
    from orderlab.policies.learned import LearnedBernoulli

    pol = LearnedBernoulli(features=["confidence"], greedy=True, seed=7)
    probs = torch.softmax(torch.randn(64, 5, 3, generator=torch.Generator().manual_seed(0)), -1)
    masked = torch.ones(64, 5, dtype=torch.bool)
    view = orderlab.StepView(probs=probs, candidates=masked, masked=masked, step=0)

    def pick(p):
        p.reset()
        return p.select(view)

    a, b, c = (pick(StagePolicy("s", pol, greedy=False, seed=s)) for s in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)  # the seed picks the draws
    g = pick(StagePolicy("s", pol, greedy=True, seed=0))
    assert pol.greedy is True and pol.seed == 7  # the module is left as it was
    assert not torch.equal(a, g)  # a draw is not the mode


def test_resume_skips_done_points_and_remeasures_a_retrained_policy(tmp_path, monkeypatch):
    cfg = _config(tmp_path)
    _run(cfg)
    calls = []
    real = ablate.evaluate_point

    def counted(model, task, policy, tokens, ranks, config, seed):
        calls.append((repr(policy), seed))
        return real(model, task, policy, tokens, ranks, config, seed)

    monkeypatch.setattr(ablate, "evaluate_point", counted)
    cfg["run"]["resume"] = True
    _run(cfg)
    assert calls == []  # every (point, seed) done on the same weights
    # the policy stage trained again (another seed): the denoiser rows stay, the learned rows are measured again
    for f in (tmp_path / "runs" / "zoo" / "grpo").glob("checkpoint*.pt"):
        f.unlink()
    cfg["stages"]["grpo"]["train"]["seed"] = 1
    _, results = _run(cfg)
    assert sorted({c[0].split(",")[0] for c in calls}) == ["StagePolicy('grpo'"]
    assert len(calls) == 2 * 3
    assert results["ablation"]["points"][3]["train"]["forwards"] > 0


@pytest.mark.parametrize("entry, path, message", [
    ({"stage": "grpp"}, "ablate.grid[0].stage", "did you mean 'grpo'"),
    ({"stage": "denoiser"}, "ablate.grid[0].stage", "learns no policy"),
    ({"stage": "grpo", "gredy": True}, "ablate.grid[0].gredy", "unknown key"),
    ({"stage": "grpo", "greedy": "yes"}, "ablate.grid[0].greedy", "true"),
    ({"name": "l2r", "search": {"kk": 2}}, "ablate.grid[0].search.kk", "unknown"),
])
def test_bad_stage_entries_are_config_errors_naming_the_key_path(tmp_path, entry, path, message):
    with pytest.raises(ConfigError) as e:
        orderlab.load(_config(tmp_path, grid=[entry]))
    assert e.value.path == path and message in str(e.value)


def test_a_joint_stage_cannot_be_a_row(tmp_path):
    cfg = _config(tmp_path, grid=[{"stage": "aop"}])
    cfg["stages"]["aop"] = {"objective": {"name": "aop", "train_model": True, "group": 2,
                                          "policy": {"name": "learned_plackett_luce", "k": 1}},
                            "train": {"steps": 1, "batch_size": 2}}
    with pytest.raises(ConfigError, match="trains the denoiser") as e:
        orderlab.load(cfg)
    assert e.value.path == "ablate.grid[0].stage"


def _pt(i, kind, acc, std, nfe):
    return {"entry": i, "policy": f"p{i}", "kind": kind,
            "summary": {"solved": {"mean": acc, "std": std}, "nfe": {"mean": nfe, "std": 0.0}}}


def test_bar_and_best_points():
    section = {"metric": "solved", "points": [
        _pt(0, "heuristic", 0.80, 0.01, 10.0), _pt(0, "heuristic", 0.70, 0.01, 5.0),
        _pt(1, "learned", 0.86, 0.02, 9.0), _pt(2, "learned", 0.80, 0.01, 7.0)]}
    assert [p["summary"]["solved"]["mean"] for p in best_points(section)] == [0.80, 0.86, 0.80]
    b = bar(section)
    assert b["heuristic_mean"] == 0.80 and b["gap"] == pytest.approx(0.06) and b["outside_std"]
    assert b["nfe_saving"] == pytest.approx(0.3) and b["met"]
    # against the frontier: p1 (0.86 at 9 NFE) vs the best heuristic within 9 NFE (0.70 at 5): +16 points
    assert b["frontier"]["learned"] == "p1" and b["frontier"]["gap"] == pytest.approx(0.16)
    section["points"][2]["summary"]["solved"]["mean"] = 0.81  # +1 point; 7/10 NFE still saves 30%
    section["points"][3]["summary"]["nfe"]["mean"] = 9.5  # now only 5% fewer forwards
    b = bar(section)
    assert b["gap"] == pytest.approx(0.01) and b["nfe_saving"] == pytest.approx(0.1) and not b["met"]
    assert bar({"metric": "solved", "points": section["points"][:2]}) is None


def test_bar_text_says_more_forwards_when_the_learned_row_spends_more():
    section = {"metric": "solved", "points": [_pt(0, "heuristic", 0.80, 0.01, 10.0), _pt(1, "learned", 0.82, 0.02, 15.0)]}
    b = bar(section)
    assert b["nfe_saving"] == pytest.approx(-0.5) and not b["met"]
    assert "p1 reaches the best heuristic's solved with 50.0% more forwards." in bar_text(b)
    section["points"][1]["summary"]["nfe"]["mean"] = 8.0
    assert "with 20.0% fewer forwards." in bar_text(bar(section))


def test_training_cost_survives_resume(tmp_path):
    from orderlab.train import TrainResult, train

    exp = orderlab.load(_config(tmp_path))
    st = exp.stages["denoiser"]
    full = train(exp.model, st.objective, exp.task, st.train, tmp_path / "full", progress=False)
    assert full.cost.forwards == 2 * 4 and full.cost.calls == 2
    assert full.summary()["cost"]["forwards"] == 8

    def stop(step, record):
        if step == 2:
            raise KeyboardInterrupt

    exp2 = orderlab.load(_config(tmp_path))
    st2 = exp2.stages["denoiser"]
    with pytest.raises(KeyboardInterrupt):
        train(exp2.model, st2.objective, exp2.task, st2.train, tmp_path / "cut", progress=False, on_step=stop,
              result=TrainResult())
    resumed = train(exp2.model, st2.objective, exp2.task, st2.train, tmp_path / "cut", resume=True, progress=False)
    assert resumed.cost.forwards == full.cost.forwards  # step 2 counted once: the checkpoint of step 1 holds 4
    saved = json.loads(json.dumps(torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["cost"]))
    assert saved["forwards"] == 8


def test_search_and_stage_entries_expand_with_readable_labels():
    pts = ablate.expand_grid([{"name": "top_prob", "search": [{"k": 2}, None]},
                              {"stage": "grpo", "greedy": [True, False], "search": {"k": 4, "verifier": "task"}}])
    assert [p.label for p in pts] == ["top_prob (search k=2)", "top_prob", "grpo(greedy=True) (search k=4, task)",
                                      "grpo(greedy=False) (search k=4, task)"]
    assert [p.knobs for p in pts[:2]] == [{"search": "k=2"}, {"search": "none"}]
    assert [p.search.k if p.search else None for p in pts] == [2, None, 4, 4]
    assert [p.stage for p in pts] == [None, None, "grpo", "grpo"] and pts[2].policy_spec == {"stage": "grpo",
                                                                                                 "greedy": True}
    assert pts[2].family == "grpo (search k=4, task)"
    with pytest.raises(ConfigError) as e:
        ablate.expand_grid([{"name": "l2r", "search": [{"k": 0}]}])
    assert e.value.path == "grid[0].search[0].k"
