"""The ablation runner: grid expansion and its config errors, the files it writes,
resume after an interruption, and metric sums over batches (orderlab.ablate)."""

from __future__ import annotations

import copy
import csv
import json
import math
import re

import pytest
import torch

import orderlab
from orderlab import ablate
from orderlab.ablate import expand_grid
from orderlab.evaluate import Measurement, evaluate, measure
from orderlab.registry import ConfigError
from orderlab.tasks.base import token_accuracy
from orderlab.tasks.sudoku import Sudoku
from orderlab.run import execute, main

# a tiny untrained model: the mechanics, not the numbers
BASE = {
    "task": {"name": "sudoku", "size": 4},
    "model": {"name": "transformer", "d_model": 16, "n_layers": 1, "n_heads": 2, "attention": {"name": "bidirectional"}},
    "stages": {},
    "policy": "l2r",
    "evaluate": {"policies": [], "n": 8, "batch_size": 8, "likelihood": False},
    "ablate": {
        "grid": ["l2r", {"name": "threshold", "tau": [0.5, 0.9]}, {"name": "random", "steps": [3, None]}],
        "seeds": [0, 1],
        "n": 6,
        "batch_size": 4,
        "heatmap_rows": 3,
    },
}


def _config(tmp_path, **ablate_overrides):
    cfg = copy.deepcopy(BASE)
    cfg["ablate"].update(ablate_overrides)
    cfg["run"] = {"dir": str(tmp_path / "runs"), "name": "abl"}
    return cfg


# --------------------------------------------------------------------------- the grid


def test_grid_expands_each_entry_as_the_product_of_its_lists_in_order():
    points = expand_grid([
        "l2r",
        {"name": "sliding_window", "window": [2, 4], "tau": [0.7, 0.9]},
        {"name": "eb", "gamma": [0.1], "proxy": "margin"},
        {"name": "pc_sampler", "token_freqs": [[0.5, 0.5]]},  # a list argument, wrapped
    ])
    assert [p.index for p in points] == list(range(7))
    assert [p.entry for p in points] == [0, 1, 1, 1, 1, 2, 3]
    assert [p.label for p in points] == [
        "l2r",
        "sliding_window(window=2, tau=0.7)", "sliding_window(window=2, tau=0.9)",
        "sliding_window(window=4, tau=0.7)", "sliding_window(window=4, tau=0.9)",
        "eb(gamma=0.1, proxy=margin)", "pc_sampler(token_freqs=[0.5, 0.5])",
    ]
    assert [p.family for p in points] == ["l2r"] + ["sliding_window"] * 4 + ["eb(proxy=margin)", "pc_sampler"]
    assert points[2].knobs == {"window": 2, "tau": 0.9} and points[2].spec == {"name": "sliding_window", "window": 2, "tau": 0.9}
    assert points[0].spec == {"name": "l2r"} and points[0].knobs == {}
    assert points[6].spec["token_freqs"] == [0.5, 0.5]
    assert len({p.key for p in points}) == 7


def test_entries_with_the_same_label_get_distinct_families():
    points = expand_grid([{"name": "threshold", "tau": [0.5]}, {"name": "threshold", "tau": [0.9]}])
    assert [p.family for p in points] == ["threshold", "threshold #1"]


def test_experiment_builds_a_policy_per_point_and_seed(tmp_path):
    exp = orderlab.load(_config(tmp_path))
    ab = exp.ablation
    assert [p.label for p in ab.points] == ["l2r", "threshold(tau=0.5)", "threshold(tau=0.9)", "random(steps=3)", "random(steps=None)"]
    # random takes a seed: one policy per run seed; the others are shared by the seeds
    assert ab.policy(ab.points[3], 0).seed == 0 and ab.policy(ab.points[3], 1).seed == 1
    assert ab.policy(ab.points[1], 0) is ab.policy(ab.points[1], 1)
    assert exp.config.ablate.seeds == [0, 1] and exp.config.ablate.cache is True  # defaults written back


@pytest.mark.parametrize(
    "section, path, message",
    [
        ({"grdi": []}, "ablate.grdi", "did you mean 'grid'"),
        ({"seeds": [0]}, "ablate.grid", "missing"),
        ({"grid": []}, "ablate.grid", "non-empty list"),
        ({"grid": "l2r"}, "ablate.grid", "list"),
        ({"grid": ["l2r", {"name": "eb", "gama": [0.1]}]}, "ablate.grid[1].gama", "did you mean 'gamma'"),
        ({"grid": [{"name": "thresold", "tau": [0.5]}]}, "ablate.grid[0].name", "did you mean .threshold."),
        ({"grid": [{"tau": [0.5]}]}, "ablate.grid[0]", "exactly one of 'name'"),
        ({"grid": [{"name": ["top_prob", "margin"]}]}, "ablate.grid[0].name", "one policy"),
        ({"grid": [{"name": "threshold", "tau": []}]}, "ablate.grid[0].tau", "empty list"),
        ({"grid": [{"name": "threshold", "tau": ["high"]}]}, "ablate.grid[0].tau", "float"),
        ({"grid": [{"name": "threshold", "tau": [0.5, 0.9]}, {"name": "threshold", "tau": 0.9}]}, "ablate.grid[1]",
         r"threshold\(tau=0.9\) is also in grid\[0\]"),
        ({"grid": [3]}, "ablate.grid[0]", "policy name or a mapping"),
        ({"grid": ["l2r"], "seeds": 3}, "ablate.seeds", "list"),
        ({"grid": ["l2r"], "seeds": []}, "ablate.seeds", "non-empty"),
        ({"grid": ["l2r"], "seeds": [0, 0]}, "ablate.seeds", "repeats"),
        ({"grid": ["l2r"], "seeds": [0, -1]}, "ablate.seeds[1]", ">= 0"),
        ({"grid": ["l2r"], "n": 0}, "ablate.n", "out of range"),
        ({"grid": ["l2r"], "batch_size": 0}, "ablate.batch_size", "out of range"),
    ],
)
def test_config_errors_name_the_key_path(tmp_path, section, path, message):
    cfg = _config(tmp_path)
    cfg["ablate"] = section
    with pytest.raises(ConfigError, match=rf"^{re.escape(path)}: .*{message}"):
        orderlab.load(cfg)


def test_a_misspelt_section_is_suggested(tmp_path):
    cfg = _config(tmp_path)
    cfg["ablte"] = cfg.pop("ablate")
    with pytest.raises(ConfigError, match="did you mean 'ablate'"):
        orderlab.load(cfg)


# --------------------------------------------------------------------------- metrics


def test_means_over_uneven_batches_equal_the_whole_batch():
    g = torch.Generator().manual_seed(0)
    n = 11
    score = (torch.rand(n, generator=g) > 0.5).double()
    acc = torch.rand(n, generator=g).double()
    nfe = torch.randint(1, 9, (n,), generator=g)
    revealed = torch.randint(1, 12, (n,), generator=g)
    nats, gen = torch.rand(n, generator=g) * 5, torch.randint(1, 12, (n,), generator=g)
    orders = torch.zeros(0, 3, dtype=torch.long)

    def part(sl, wall):
        return Measurement({"solved": score[sl], "token_accuracy": acc[sl]}, nfe[sl], revealed[sl], wall, orders,
                           nats[sl], gen[sl])

    whole = part(slice(None), 1.0)
    parts = Measurement.concat([part(sl, 1.0 / 3) for sl in (slice(0, 1), slice(1, 7), slice(7, 11))])  # sizes 1, 6, 4
    a, b = whole.means(), parts.means()
    assert a.keys() == b.keys()
    for k in a:
        assert b[k] == pytest.approx(a[k], rel=1e-12), k
    # float64 references: means are ratios of sums, not means of per-batch ratios
    assert a["solved"] == pytest.approx(score.mean().item())
    assert a["token_accuracy"] == pytest.approx(acc.mean().item())
    assert a["nfe"] == pytest.approx(nfe.double().mean().item())
    assert a["tokens_per_step"] == pytest.approx(revealed.sum().item() / nfe.sum().item())
    assert a["bits_per_token"] == pytest.approx(nats.double().sum().item() / gen.sum().item() / math.log(2))
    assert a["n"] == n and a["wall_s"] == pytest.approx(1.0)
    per_batch = [revealed[sl].sum().item() / nfe[sl].sum().item() for sl in (slice(0, 1), slice(1, 7), slice(7, 11))]
    assert abs(sum(per_batch) / 3 - a["tokens_per_step"]) > 1e-3  # the naive mean would differ here


def test_summary_is_mean_and_sample_std_over_seeds():
    s = ablate.summarize([{"seed": 0, "solved": 0.5, "nfe": 4.0}, {"seed": 1, "solved": 1.0, "nfe": 4.0}])
    assert s["solved"] == {"mean": 0.75, "std": pytest.approx(math.sqrt(0.125))}
    assert s["nfe"]["std"] == 0.0 and "seed" not in s
    assert math.isnan(ablate.summarize([{"seed": 0, "solved": 0.5}])["solved"]["std"])
    # a run read back from results.json: its non-finite numbers are null, with the reason
    back = ablate.summarize([{"seed": 0, "bits": None, "nonfinite": {"bits": "inf"}, "solved": 0.5},
                             {"seed": 1, "bits": 2.0, "solved": 1.0}])
    assert math.isnan(back["bits"]["mean"]) and back["solved"]["mean"] == 0.75 and "nonfinite" not in back


def test_evaluate_point_does_not_depend_on_the_batch_size(tmp_path):
    exp = orderlab.load(_config(tmp_path))
    x, r = exp.task.batch(7, split="test", seed=0)
    policy = orderlab.build("policy", {"name": "threshold", "tau": 0.5})
    one = ablate.evaluate_point(exp.model, exp.task, policy, x, r, ablate.AblateConfig(["l2r"], n=7, batch_size=7), 0)
    three = ablate.evaluate_point(exp.model, exp.task, policy, x, r, ablate.AblateConfig(["l2r"], n=7, batch_size=3), 0)
    for k in ("solved", "token_accuracy", "nfe", "tokens_per_step", "n"):
        assert three[k] == pytest.approx(one[k], rel=1e-12), k
    assert three["bits_per_token"] == pytest.approx(one["bits_per_token"], rel=1e-5)
    assert three["orders"] == one["orders"] and len(one["orders"]) == 7  # heatmap_rows 8 > 7 rows


class GradedSudoku(Sudoku):
    """Sudoku scored by the fraction of cells right: an untrained model's score varies."""

    metric = "cells"

    def score(self, pred, tokens, ranks):
        return token_accuracy(pred, tokens, ranks)


@pytest.mark.parametrize("spec", ["l2r", {"name": "threshold", "tau": 0.5}, {"name": "random", "steps": 3}])
def test_an_ablation_point_is_the_evaluation_row(tmp_path, spec):
    """One measuring path: for the same policy, seed and rows the grid's run and the
    evaluation's row carry the same numbers, also for a stochastic policy with sampled
    tokens (temperature 1: the decode seeds of both paths must be the same)."""
    cfg = _config(tmp_path, grid=[spec], seeds=[3], n=6, batch_size=4, temperature=1.0)
    cfg["task"] = {"_target_": f"{__name__}.GradedSudoku", "size": 4}
    exp = orderlab.load(cfg)
    results: dict = {}
    ablate.run_grid(exp, results, save=lambda: None, progress=False)
    (run,) = results["ablation"]["points"][0]["runs"]
    policy = exp.ablation.policy(exp.ablation.points[0], 3)  # random: seed 3, as the grid builds it
    (row,) = evaluate(exp.model, exp.task, {"p": policy}, n=6, batch_size=4, temperature=1.0, seed=3)
    assert (row["score"], row["nfe_mean"], row["tokens_per_step"], row["n"]) == (
        run["cells"], run["nfe"], run["tokens_per_step"], run["n"])
    x, r = exp.task.batch(6, split="test", seed=3)  # the same rows, other decode seeds: other numbers
    other = measure(exp.model, exp.task, policy, x, r, batch_size=4, temperature=1.0, seed=5).means()
    assert other["cells"] != run["cells"]  # so the equality above is a real check


def test_bits_under_the_l2r_order_are_the_test_likelihood(tmp_path):
    """For l2r the decoded order is the l2r order: the ablation's bits are evaluate.test_likelihood's."""
    from orderlab.evaluate import test_likelihood

    exp = orderlab.load(_config(tmp_path))
    x, r = exp.task.batch(6, split="test", seed=1)
    run = ablate.evaluate_point(exp.model, exp.task, orderlab.build("policy", "l2r"), x, r, exp.ablation.config, 1)
    ref = test_likelihood(exp.model, exp.task, 6, 6, seed=1)["bits_per_token"]
    assert run["bits_per_token"] == pytest.approx(ref, rel=1e-5)
    assert run["nfe"] == 10 and run["tokens_per_step"] == 1.0  # 10 empty cells, one per step


# --------------------------------------------------------------------------- the run


def _run(cfg, **kw):
    exp = orderlab.load(cfg)
    return exp, execute(exp, progress=False, **kw)


def test_run_writes_results_csv_markdown_pareto_and_heatmaps(tmp_path):
    exp, results = _run(_config(tmp_path))
    run = tmp_path / "runs" / "abl"
    section = results["ablation"]
    assert results["status"] == "completed" and section["metric"] == "solved" and section["seeds"] == [0, 1]
    assert [p["policy"] for p in section["points"]] == [p.label for p in exp.ablation.points]
    for p in section["points"]:
        assert [r["seed"] for r in p["runs"]] == [0, 1] and all(r["n"] == 6 for r in p["runs"])
        assert set(p["summary"]) >= {"solved", "token_accuracy", "bits_per_token", "nfe", "tokens_per_step", "wall_s"}
        assert len(p["runs"][0]["orders"]) == 3
    on_disk = json.loads((run / "results.json").read_text())
    assert on_disk["ablation"]["points"] == json.loads(json.dumps(section["points"]))

    # the seed picks the random policy's draws (and the test rows): seeds differ
    rnd = section["points"][3]["runs"]
    assert rnd[0]["orders"] != rnd[1]["orders"]
    # random(steps=3) reveals the 10 cells in 3 steps; threshold at least one per step
    assert section["points"][3]["summary"]["nfe"]["mean"] == 3.0
    assert section["points"][0]["summary"]["tokens_per_step"]["mean"] == 1.0

    with open(run / ablate.CSV) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5 and rows[1]["policy"] == "threshold(tau=0.5)" and rows[1]["tau"] == "0.5"
    assert rows[3]["steps"] == "3" and rows[0]["tau"] == "" and rows[0]["seeds"] == "2" and rows[0]["n"] == "6"
    assert "n_mean" not in rows[0]
    s = section["points"][1]["summary"]
    assert float(rows[1]["solved_mean"]) == pytest.approx(s["solved"]["mean"])
    assert float(rows[1]["nfe_std"]) == pytest.approx(s["nfe"]["std"])
    assert {"token_accuracy_mean", "bits_per_token_mean", "tokens_per_step_mean", "wall_s_mean"} <= set(rows[0])

    md = (run / ablate.TABLE).read_text().splitlines()
    assert md[2].startswith("| policy | solved | token acc | bits/token | NFE | tok/step | wall s |")
    assert len([ln for ln in md if ln.startswith("| ")]) == 1 + 5 and " ± " in md[4]

    png = b"\x89PNG\r\n\x1a\n"
    assert (run / ablate.PARETO).read_bytes()[:8] == png
    grids = sorted(p.name for p in run.glob("order_grid_*.png"))
    assert grids == ["order_grid_l2r.png", "order_grid_random.png", "order_grid_threshold.png"]


def test_heatmaps_off(tmp_path):
    _run(_config(tmp_path, heatmaps=False, seeds=[0], grid=["l2r"]))
    run = tmp_path / "runs" / "abl"
    assert not list(run.glob("order_grid_*.png")) and (run / ablate.CSV).exists()


_EVALUATE_POINT = ablate.evaluate_point


class _Counter:
    """Wraps evaluate_point: counts the (point, seed) runs, raises Ctrl-C at call ``stop``."""

    def __init__(self, monkeypatch, stop: int | None = None, results=None):
        self.calls: list[tuple[str, int]] = []
        self.stop, self.results = stop, results
        real = _EVALUATE_POINT  # not ablate.evaluate_point: an earlier counter may still be patched in

        def wrapped(model, task, policy, tokens, ranks, config, seed):
            if self.stop is not None and len(self.calls) + 1 == self.stop:
                self.on_disk = json.loads(self.results.read_text())  # what was saved before this run
                raise KeyboardInterrupt
            self.calls.append((repr(policy), seed))
            return real(model, task, policy, tokens, ranks, config, seed)

        monkeypatch.setattr(ablate, "evaluate_point", wrapped)


def _numbers(section):
    """The measured numbers of a section, without wall times."""
    drop = {"wall_s", "tokens_per_s"}
    return [[{k: v for k, v in r.items() if k not in drop} for r in p["runs"]] for p in section["points"]]


def test_interrupted_sweep_resumes_with_only_the_missing_points(tmp_path, monkeypatch):
    cfg = _config(tmp_path)
    results_path = tmp_path / "runs" / "abl" / "results.json"
    total = 5 * 2

    stopped = _Counter(monkeypatch, stop=4, results=results_path)
    with pytest.raises(KeyboardInterrupt):
        _run(cfg)
    assert len(stopped.calls) == 3
    # every finished (point, seed) was on disk before the next one started
    assert sum(len(p["runs"]) for p in stopped.on_disk["ablation"]["points"]) == 3
    interrupted = json.loads(results_path.read_text())
    assert interrupted["status"] == "interrupted"
    assert sum(len(p["runs"]) for p in interrupted["ablation"]["points"]) == 3

    resumed = _Counter(monkeypatch)
    cfg["run"]["resume"] = True
    _, results = _run(cfg)
    assert len(resumed.calls) == total - 3
    assert resumed.calls[0] == (repr(orderlab.load(cfg).ablation.policies[1, 1]), 1)  # point 1, seed 1: the 4th run
    assert results["status"] == "completed"

    again = _Counter(monkeypatch)  # everything done: nothing evaluated
    _, results2 = _run(cfg)
    assert again.calls == [] and _numbers(results2["ablation"]) == _numbers(results["ablation"])

    fresh = _Counter(monkeypatch)  # the same sweep uninterrupted gives the same numbers
    cfg["run"]["resume"], cfg["run"]["overwrite"] = False, True
    _, uninterrupted = _run(cfg)
    assert len(fresh.calls) == total
    assert _numbers(uninterrupted["ablation"]) == _numbers(results["ablation"])


def test_resume_evaluates_new_seeds_only_and_everything_when_the_setup_changes(tmp_path, monkeypatch):
    cfg = _config(tmp_path, seeds=[0], grid=["l2r", {"name": "threshold", "tau": [0.5, 0.9]}])
    _run(cfg)
    cfg["run"]["resume"] = True
    cfg["ablate"]["seeds"] = [0, 2]
    more = _Counter(monkeypatch)
    _run(cfg)
    assert [s for _, s in more.calls] == [2, 2, 2]
    cfg["ablate"]["grid"].append({"name": "margin", "noise": [0.5]})
    added = _Counter(monkeypatch)
    _run(cfg)
    assert added.calls == [("All() >> Margin() + Gumbel(0.5, seed=0) >> TopK(k=1)", 0),
                           ("All() >> Margin() + Gumbel(0.5, seed=2) >> TopK(k=1)", 2)]
    cfg["ablate"]["n"] = 5  # other test rows: nothing stored is reused
    changed = _Counter(monkeypatch)
    _run(cfg)
    assert len(changed.calls) == 4 * 2


def test_cli_prints_the_ablation_table_with_fixed_decimals(tmp_path, capsys, monkeypatch):
    import yaml

    monkeypatch.setenv("COLUMNS", "200")
    path = tmp_path / "abl.yaml"
    cfg = _config(tmp_path, seeds=[0], grid=[{"name": "threshold", "tau": [0.5]}])
    path.write_text(yaml.safe_dump(cfg))
    assert main([str(path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "threshold(tau=0.5)" in out and "results.csv" in out
    line = next(ln for ln in out.splitlines() if "threshold(tau=0.5)" in ln)
    cells = [c.strip() for c in line.strip("│ ").split("│")]
    assert cells[1].count(".") == 1 and len(cells[1].split(".")[1]) == 4  # solved: 4 decimals
    assert len(cells[4].split(".")[1]) == 1  # NFE: 1 decimal
