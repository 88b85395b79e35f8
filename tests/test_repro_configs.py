"""The reproduction YAMLs (experiments/repro_*.yaml, issue 10 §4) keep loading and running.

Each one is loaded as written (a checkpoint it reuses replaced by none) and with a tiny
model, then: one loss of every stage on a few training rows, and a decode of a few test
rows with the experiment's policy and with every grid point's policy. A YAML that reuses
another's checkpoint (``model.checkpoint: runs/<stem>``) must name a YAML
``experiments/<stem>.yaml`` whose model section and vocabulary / length it matches, so
the checkpoint it loads has its shapes and attention rule. The numbers themselves are in
docs/results.md; these tests keep the configs from rotting.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import orderlab

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
REPROS = sorted(EXPERIMENTS.glob("repro_*.yaml"))
TINY = ["model.d_model=16", "model.n_layers=1", "model.n_heads=2"]


def _raw(path: Path) -> dict:
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def test_there_are_reproductions():
    names = {p.stem for p in REPROS}
    assert {"repro_sudoku", "repro_sudoku_ar", "repro_stargraph", "repro_addition", "repro_text_set",
            "repro_setdlm_sweep", "repro_fastdllm_sweep"} <= names


@pytest.mark.parametrize("path", REPROS, ids=lambda p: p.stem)
def test_loads_as_written(path):
    exp = orderlab.load(path, overrides=["model.checkpoint=null"])
    assert exp.task.seq_len >= 1 and exp.model.vocab_size >= exp.task.vocab_size
    if "ablate" in _raw(path):
        assert exp.ablation.points, f"{path.name}: an empty grid"


@pytest.mark.parametrize("path", REPROS, ids=lambda p: p.stem)
def test_checkpoint_comes_from_a_repro_yaml_with_the_same_model(path):
    raw = _raw(path)
    ck = raw["model"].get("checkpoint")
    if ck is None:
        return
    source = EXPERIMENTS / f"{Path(ck).name}.yaml"
    assert Path(ck).parent == Path("runs") and source.exists(), f"{path.name}: {ck} is not the run of an experiments/ YAML"
    trained = _raw(source)
    mine = {k: v for k, v in raw["model"].items() if k != "checkpoint"}
    assert mine == trained["model"], f"{path.name}: model differs from {source.name}'s"
    a = orderlab.load(path, overrides=["model.checkpoint=null"]).task
    b = orderlab.load(source).task
    assert (a.vocab_size, a.seq_len) == (b.vocab_size, b.seq_len)


@pytest.mark.parametrize("path", REPROS, ids=lambda p: p.stem)
def test_tiny_stages_and_every_policy_run(path):
    torch.manual_seed(0)
    exp = orderlab.load(path, overrides=["model.checkpoint=null", *TINY])
    for name, stage in exp.stages.items():
        x, r = exp.task.batch(4, split="train")
        out = stage.objective.step(exp.model, x, r)
        assert torch.isfinite(out.loss), f"{path.name}: stage {name} loss {out.loss}"
    x, r = exp.task.batch(3, split="test")
    points = exp.ablation.points if getattr(exp, "ablation", None) is not None else []
    policies = [exp.policy] + [exp.ablation.policy(p, exp.ablation.config.seeds[0]) for p in points]
    for policy in policies:
        with torch.no_grad():
            out = orderlab.decode(exp.model, policy, x, r)
        todo = r >= 1
        assert (out.ranks[todo] >= 1).all(), f"{path.name}: {policy!r} left positions undecoded"
        assert (out.tokens[~todo] == x[~todo]).all()
        assert (out.nfe >= 1).all() and (out.nfe <= todo.sum(1)).all()
