"""The VI job (experiments/learned_policy_vi.yaml) end to end at toy size, and the
``evaluate.iwae`` option that writes the likelihood table over orders into a run: the
main job's task and denoiser, the policy learned by vi_orders (no reward), evaluated beside
the heuristics, and the table (IWAE rows in the order of ``evaluate.iwae.k``, the MDM
NELBO, fixed-order NLLs) in results.json and on the console."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from orderlab.config import load
from orderlab import evaluate as ev
from orderlab.evaluate import IWAEConfig, iwae_table
from orderlab.objectives import VIOrders
from orderlab.objectives.vi import ProgramOrders
from orderlab.policies.learned import LearnedBernoulli
from orderlab.registry import ConfigError
from orderlab.run import _orders, main

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
YAML = EXPERIMENTS / "learned_policy_vi.yaml"

TINY = [
    "model.d_model=32", "model.n_layers=1", "model.n_heads=2",
    "stages.denoiser.train.steps=4", "stages.denoiser.train.batch_size=8", "stages.denoiser.train.valid_n=8",
    "stages.vi.train.steps=2", "stages.vi.train.batch_size=2",
    "stages.grpo.train.steps=2", "stages.grpo.train.batch_size=2", "stages.grpo.objective.group=2",
    "evaluate.n=6", "evaluate.batch_size=4", "evaluate.policies=[random, top_prob]",
    "evaluate.iwae.n=5", "evaluate.iwae.k=[1, 2, 3]", "evaluate.iwae.nelbo_samples=2",
]


def test_the_vi_job_is_the_main_job_with_the_policy_learned_by_vi():
    exp = load(YAML)
    main_job = OmegaConf.load(EXPERIMENTS / "learned_policy.yaml")
    for section in ("task", "model"):
        assert OmegaConf.to_container(exp.config[section]) == OmegaConf.to_container(main_job[section]), section
    assert exp.config.stages.denoiser == load(EXPERIMENTS / "learned_policy.yaml").config.stages.denoiser
    assert list(exp.stages) == ["denoiser", "vi", "grpo"]
    grpo = OmegaConf.to_container(OmegaConf.load(YAML).stages.grpo)
    assert grpo == OmegaConf.to_container(main_job.stages.policy)  # the RL policy beside it: the main job's stage
    vi = exp.stages["vi"].objective
    assert isinstance(vi, VIOrders) and not vi.trains_model  # the denoiser is frozen: π and q learn from data alone
    assert isinstance(vi.policy, LearnedBernoulli)  # sets: both chains may advance in one step
    assert exp.evaluate.iwae.k == [1, 4, 16, 64]
    labels = list(exp.policies)
    for name in ("random", "l2r", "r2l", "top_prob", "margin"):
        assert name in labels
    assert labels[-2:] == ["vi (vi_orders)", "grpo"] and exp.policies["vi (vi_orders)"] is vi.policy


def test_the_vi_job_runs_end_to_end_at_toy_size(tmp_path, capsys):
    assert main([str(YAML), *TINY, f"run.dir={tmp_path}", "--no-progress"]) == 0
    run = tmp_path / "learned_policy_vi"
    res = json.loads((run / "results.json").read_text())
    assert res["status"] == "completed" and set(res["checkpoints"]) == {"denoiser", "vi", "grpo"}
    rows = {r["policy"]: r for r in res["evaluations"]}
    assert set(rows) == {"random", "top_prob", "vi (vi_orders)", "grpo"}
    assert 0.0 <= rows["vi (vi_orders)"]["accuracy"] <= 1.0 and 0.0 <= rows["vi (vi_orders)"]["sampled_accuracy"] <= 1.0
    table = res["likelihood_table"]
    assert table["orders"] == "vi" and table["n"] == 5
    assert "pyro_model" in table["prior"] and "pyro_guide" in table["proposal"]  # π_ψ weighs, q_φ proposes
    est = [(r["estimate"], r["k"], r["label"]) for r in table["rows"]]
    assert est == [("iwae", 1, "bound"), ("iwae", 2, "bound"), ("iwae", 3, "bound"),
                   ("mdm_nelbo", None, "bound"), ("l2r", None, "nll"), ("r2l", None, "nll")]
    for r in table["rows"]:
        assert math.isfinite(r["bits_per_token"]) and r["bits_per_token"] > 0 and r["stderr"] >= 0
    metrics = [json.loads(x) for x in (run / "vi" / "metrics.jsonl").read_text().splitlines()]
    assert {"bits_per_token", "elbo", "kl", "entropy", "guide_entropy"} <= set(metrics[-1])
    out = capsys.readouterr().out
    words = " ".join(out.split())  # rich wraps a title to its table's width
    assert "likelihood table" in words and "orders of 'vi'" in words
    printed = [line for line in out.splitlines() if "mdm_nelbo" in line]
    assert len(printed) == 1 and "bound" in printed[0]
    mdm = next(r for r in table["rows"] if r["estimate"] == "mdm_nelbo")
    assert f"{mdm['bits_per_token']:.4f}" in printed[0]  # fixed decimals: the bits format


def test_without_a_vi_stage_the_table_uses_uniformly_random_orders():
    """The MDM setting: prior = proposal = a flat schedule's order. Its l2r row is the test
    likelihood under left to right (the same rows, the same model): exactly."""
    cfg = OmegaConf.load(YAML)
    del cfg.stages["vi"]
    exp = load(cfg, [o for o in TINY if not o.startswith("stages.vi.")])
    assert list(exp.stages) == ["denoiser", "grpo"]  # a policy-gradient stage gives no order distributions
    name, prior, proposal = _orders(exp)
    assert (name, prior, proposal) == ("uniform", "linear", None)
    table = iwae_table(exp.model, exp.task, IWAEConfig(k=[1], n=7, nelbo_samples=1), prior, proposal, name, seed=3)
    l2r = next(r for r in table["rows"] if r["estimate"] == "l2r")
    assert l2r["bits_per_token"] == pytest.approx(ev.test_likelihood(exp.model, exp.task, 7, 7, seed=3)["bits_per_token"],
                                                  rel=1e-5)
    assert "linear" in table["prior"].lower() and table["prior"] == table["proposal"]


def test_the_vi_stage_gives_the_table_its_prior_and_proposal():
    exp = load(YAML, TINY)
    name, prior, proposal = _orders(exp)
    vi = exp.stages["vi"].objective
    assert name == "vi" and isinstance(prior, ProgramOrders) and isinstance(proposal, ProgramOrders)
    assert prior.program == vi.pyro_model and proposal.program == vi.pyro_guide


@pytest.mark.parametrize("override, path, needle", [
    ("evaluate.iwae.k=[4, 1]", "evaluate.iwae.k", "increasing"),
    ("evaluate.iwae.k=[]", "evaluate.iwae.k", "non-empty"),
    ("evaluate.iwae.k=[0, 4]", "evaluate.iwae.k", ">= 1"),
    ("evaluate.iwae.k=4", "evaluate.iwae.k", "list"),
    ("evaluate.iwae.n=0", "evaluate.iwae.n", "out of range"),
    ("evaluate.iwae.nelbo_samples=0", "evaluate.iwae.nelbo_samples", "out of range"),
    ("evaluate.iwae.kk=3", "evaluate.iwae.kk", "did you mean 'k'"),
    ("evaluate.iwae.n=many", "evaluate.iwae.n", "must be int"),
    ("evaluate.iwae=3", "evaluate.iwae", "mapping"),
])
def test_iwae_config_errors_name_the_key(override, path, needle, tmp_path, capsys):
    with pytest.raises(ConfigError) as info:
        load(YAML, [override])
    assert info.value.path == path and needle in str(info.value)
    assert main([str(YAML), override, f"run.dir={tmp_path}"]) == 2  # before anything is trained
    err = capsys.readouterr().err
    assert path in err and needle in err
    assert not any(tmp_path.iterdir())


def test_iwae_null_writes_no_table(tmp_path):
    assert main([str(YAML), *TINY, "evaluate.iwae=null", "stages.vi.train.steps=0", f"run.dir={tmp_path}",
                 "--no-progress"]) == 0
    res = json.loads((tmp_path / "learned_policy_vi" / "results.json").read_text())
    assert res["status"] == "completed" and "likelihood_table" not in res
