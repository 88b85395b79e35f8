"""The comparison's experiments (experiments/learned_zoo_<task>.yaml, issue 21 section 2)
load, train every stage a step and decode every grid point, at toy size; the written
comparison has a learned row per learned stage with its training cost."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import orderlab
from orderlab import ablate
from orderlab.run import main

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
ZOO = ["learned_zoo_chain.yaml", "learned_zoo_sudoku.yaml", "learned_zoo_sudoku6.yaml", "learned_zoo_sat.yaml"]


def tiny(yaml: Path, tmp_path: Path) -> list[str]:
    """Overrides shrinking ``yaml`` to seconds: a 1-layer d16 model, every stage one step
    of 2 rows (groups of 2), 2 test rows and one seed per grid point, search with 2 paths."""
    cfg = OmegaConf.load(yaml)
    out = ["model.d_model=16", "model.n_layers=1", "model.n_heads=2", "evaluate.n=2", "evaluate.batch_size=2",
           "ablate.n=2", "ablate.batch_size=2", "ablate.seeds=[0]", "ablate.heatmaps=false", f"run.dir={tmp_path}"]
    for name, stage in cfg.stages.items():
        out += [f"stages.{name}.train.steps=1", f"stages.{name}.train.batch_size=2", f"stages.{name}.train.valid_n=0",
                f"stages.{name}.train.warmup=0"]
        if "group" in stage.objective:
            out.append(f"stages.{name}.objective.group=2")
        if "baseline" in stage.objective:
            out.append(f"stages.{name}.objective.baseline=2")
    grid = OmegaConf.to_container(cfg.ablate.grid)
    for e in grid:
        if isinstance(e, dict) and "search" in e:
            e["search"]["k"] = 2
    out.append("ablate.grid=" + json.dumps(grid).replace(" ", ""))
    return out


@pytest.mark.parametrize("name", ZOO)
def test_zoo_experiment_trains_a_step_and_decodes_every_point(tmp_path, name):
    yaml = EXPERIMENTS / name
    full = orderlab.load(yaml)  # the committed sizes build (and every key checks)
    learned = [p.stage for p in full.ablation.points if p.stage is not None]
    assert set(learned) == set(full.stages) - {"denoiser"}  # every learned stage has its rows
    assert full.ablation.config.seeds == [0, 1, 2]
    assert main([str(yaml), *tiny(yaml, tmp_path), "--no-progress"]) == 0
    run = tmp_path / yaml.stem
    res = json.loads((run / "results.json").read_text())
    assert res["status"] == "completed"
    pts = res["ablation"]["points"]
    assert all(p["summary"] is not None for p in pts)
    for p in pts:
        if p["kind"] == "learned":
            assert p["train"]["forwards"] > 0 and p["train"]["train_s"] > 0, p["policy"]
    assert {p["kind"] for p in pts} == {"heuristic", "learned", "search"}
    assert (run / ablate.COMPARISON).exists() and (run / ablate.PARETO).exists()
