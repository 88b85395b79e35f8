"""The learned-order zoo's experiments (experiments/learned_zoo_*.yaml) load and run end to
end at toy size: AOP (hidden-state policy, searched evaluation rows) and LoMDM."""

import json
from pathlib import Path

import torch

from orderlab.config import load
from orderlab.objectives import AOP, LoMDMNelbo
from orderlab.processes import MixerScheduler
from orderlab.run import main

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
TINY = ["model.d_model=16", "model.n_layers=1", "model.n_heads=2", "stages.denoiser.train.steps=2",
        "stages.denoiser.train.batch_size=4", "stages.denoiser.train.valid_n=4", "evaluate.n=4", "evaluate.batch_size=4",
        "evaluate.policies=[top_prob]", "evaluate.heatmaps=false"]


def test_aop_experiment_loads_and_runs(tmp_path):
    yaml = EXPERIMENTS / "learned_zoo_aop.yaml"
    exp = load(yaml)
    aop = exp.stages["aop"].objective
    assert isinstance(aop, AOP) and not aop.trains_model
    assert aop.policy.features.hidden_size == 128 and aop.policy.wants_hidden  # the model's d_model
    assert exp.evaluate.search.k == 4
    tiny = [*TINY, "stages.aop.train.steps=1", "stages.aop.train.batch_size=2", "stages.aop.objective.group=2",
            "evaluate.search.k=2", f"run.dir={tmp_path}"]
    assert main([str(yaml), *tiny, "--no-progress"]) == 0
    res = json.loads((tmp_path / "learned_zoo_aop" / "results.json").read_text())
    labels = [r["policy"] for r in res["evaluations"]]
    assert labels == ["top_prob", "top_prob (search k=2)", "aop", "aop (search k=2)"]
    plain, searched = res["evaluations"][:2]
    assert searched["nfe_mean"] > 2 * plain["nfe_mean"]  # two paths and their scoring passes


def test_lomdm_experiment_loads_and_runs(tmp_path):
    yaml = EXPERIMENTS / "learned_zoo_lomdm.yaml"
    exp = load(yaml, TINY)
    obj = exp.stages["denoiser"].objective
    assert isinstance(obj, LoMDMNelbo) and isinstance(obj.reverse, MixerScheduler)
    x, r = exp.task.batch(3)
    out = obj.step(exp.model, x, r, torch.Generator().manual_seed(0))
    out.loss.backward()
    assert obj.process.scheduler.rho.grad is not None and obj.reverse.rho.grad is not None
    # Order-Token Search from YAML: a policy of evaluate.policies (it decodes itself)
    ots = "evaluate.policies=[top_prob,{name: order_token_search, beam: 2}]"
    assert main([str(yaml), *TINY, ots, f"run.dir={tmp_path}", "--no-progress"]) == 0
    res = json.loads((tmp_path / "learned_zoo_lomdm" / "results.json").read_text())
    assert res["status"] == "completed" and res["evaluations"][0]["policy"] == "top_prob"
    # the stage's own generative order: its reverse scheduler as the decode policy (policies/reverse_schedule.py)
    rows = {r["policy"]: r for r in res["evaluations"]}
    assert list(rows) == ["top_prob", "order_token_search(beam=2)", "denoiser (lomdm_nelbo)"]
    assert rows["order_token_search(beam=2)"]["nfe_mean"] > rows["top_prob"]["nfe_mean"]  # two hypotheses per step


def test_dcolt_experiment_loads_and_runs(tmp_path):
    """DCoLT's recipe end to end at toy size: the joint stage trains the denoiser too, and
    the evaluation has the learned policy's row (k = 2 per step: half the NFE)."""
    yaml = EXPERIMENTS / "learned_zoo_dcolt.yaml"
    tiny = [*TINY, "stages.dcolt.train.steps=1", "stages.dcolt.train.batch_size=2", "stages.dcolt.objective.group=2",
            f"run.dir={tmp_path}"]
    exp = load(yaml, tiny)
    assert exp.stages["dcolt"].objective.trains_model and exp.stages["dcolt"].objective.policy.features.hidden_size == 16
    assert main([str(yaml), *tiny, "--no-progress"]) == 0
    res = json.loads((tmp_path / "learned_zoo_dcolt" / "results.json").read_text())
    rows = {r["policy"]: r for r in res["evaluations"]}
    assert list(rows) == ["top_prob", "dcolt (grpo)"]
    assert rows["dcolt (grpo)"]["nfe_mean"] == rows["top_prob"]["nfe_mean"] / 2
