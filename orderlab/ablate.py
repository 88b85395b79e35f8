"""Ablations: one model, a grid of decode policies x knobs x seeds (issue 10, section 1).

An ablation is an ordinary experiment (train its stages, or load ``model.checkpoint``)
plus an ``ablate:`` section, whose keys are the fields of :class:`AblateConfig`::

    ablate:
      grid:                                      # policy specs; a list value expands
        - {name: threshold, tau: [0.5, 0.7, 0.9]}              # 3 points
        - {name: sliding_window, window: [2, 4], tau: [0.7, 0.9]}  # 4 points (the product)
        - {name: eb, gamma: [0.01, 0.1], proxy: entropy}         # scalars stay fixed
        - l2r                                                  # a bare name: one point
      seeds: [0, 1, 2]
      n: 256               # test examples per seed
      batch_size: 256
      cache: true          # exact KV cache where the attention rule has one
      temperature: 0.0     # token sampling; 0 = greedy
      bits: true           # also -log2 p(reference | the decoded order) per generated token
      heatmaps: true       # order_grid_<entry>.png: one panel per grid point
      heatmap_rows: 8      # rows of each panel (and orders kept per run in results.json)

A grid **entry** is a policy spec (``{name: ...}`` or ``{_target_: ...}``, or a bare name)
in which every list-valued key is a knob: the entry expands to the product of its lists,
in the order written, one **grid point** per combination. A constructor argument that
is itself a list is given wrapped (``token_freqs: [[0.2, 0.8]]``). An entry is one
*family* (one curve of the Pareto plot); its label is the policy name with its fixed keys.

A **seed** ``s`` picks the test examples (``task.batch(n, "test", seed=s)``, the same for
every grid point, so points compare on paired data), the decode RNG of batch ``j``
(``derive_seed(s, j, "decode")``) and the ``seed`` argument of a policy that takes one
and whose entry does not set it (``random``, Gumbel noise). Every quantity is reported
as the mean and the sample standard deviation (ddof 1; NaN with one seed) over seeds.

Per (point, seed), sums over rows accumulate in ``torchmetrics`` ``SumMetric`` objects
(:class:`RunMetrics`): every mean is a ratio of sums, so it does not depend on the batch
size, and ``compute()`` will all-reduce them when the rows are sharded over processes.
The grid is a plain ordered list (:attr:`AblateConfig.points`), to shard by index.

Grid points run one after the other on the one model, each decoding its batches back to
back. Rows of several policies are *not* packed into one decode call: the decoder takes
one policy, a policy's noise (``random``, Gumbel) is drawn per decode batch, so packing
would change a point's draws with its neighbours, and wall time and tokens/s per point
would be shared rather than measured.

``results.json`` gets an ``ablation`` key (see :func:`run_grid`), rewritten atomically
after every (point, seed); with ``run.resume=true`` (or ``--eval-only``) a rerun keeps
the runs of a previous invocation whose setup (weights, task, model, n, batch size,
cache, temperature, bits) is the same and evaluates only the missing ones. At the end
:func:`write_outputs` writes ``results.csv``, ``ablation.md``, ``pareto.png`` and the
order heatmaps.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from orderlab.registry import ConfigError
from orderlab.runtime import derive_seed, sync

__all__ = [
    "AblateConfig",
    "GridPoint",
    "Ablation",
    "RunMetrics",
    "expand_grid",
    "evaluate_point",
    "run_grid",
    "previous",
    "summarize",
    "write_outputs",
    "csv_rows",
    "display_rows",
    "CSV",
    "TABLE",
    "PARETO",
]

CSV = "results.csv"  # one row per grid point
TABLE = "ablation.md"  # the same as a markdown table
PARETO = "pareto.png"  # quality vs NFE, one curve per entry, the frontier marked
HEATMAP = "order_grid_{}.png"  # per entry: one panel per grid point

_HEADS = ("name", "_target_")


# --------------------------------------------------------------------------- the grid


def _value_label(v: Any) -> str:
    if isinstance(v, Mapping):
        d = dict(v)
        head = str(d.pop("name", None) or d.pop("_target_", "?")).rsplit(".", 1)[-1]
        return _label(head, d)
    return str(v)


def _label(head: str, args: Mapping[str, Any]) -> str:
    """``threshold(tau=0.9)``: the format of ``orderlab.config.policy_label``."""
    inner = ", ".join(f"{k}={_value_label(v)}" for k, v in args.items())
    return f"{head}({inner})" if inner else head


@dataclass(frozen=True)
class GridPoint:
    """One policy of the grid. ``index``: its place in the grid (the order points run in);
    ``entry``: the grid entry it expanded from; ``knobs``: that entry's list-valued keys
    and their values here; ``spec``: the whole policy spec."""

    index: int
    entry: int
    family: str
    label: str
    spec: Mapping[str, Any]
    knobs: Mapping[str, Any]

    @property
    def key(self) -> str:
        """What identifies the point across invocations (resume): its spec as JSON."""
        return json.dumps(self.spec, sort_keys=True)


def expand_grid(grid: Any, path: str = "grid") -> list[GridPoint]:
    """The grid points of ``grid`` in order (entry by entry, each the product of its lists)."""
    if not isinstance(grid, list) or not grid:
        raise ConfigError(path, "must be a non-empty list of policy specs, e.g. [{name: threshold, tau: [0.5, 0.9]}]")
    points: list[GridPoint] = []
    seen: dict[str, int] = {}
    families: set[str] = set()
    for i, entry in enumerate(grid):
        where = f"{path}[{i}]"
        if isinstance(entry, str):
            entry = {"name": entry}
        if not isinstance(entry, Mapping):
            raise ConfigError(where, f"expected a policy name or a mapping with 'name'/'_target_', got {type(entry).__name__}")
        heads = [k for k in _HEADS if k in entry]
        if len(heads) != 1:
            raise ConfigError(where, "needs exactly one of 'name' (a registered policy) or '_target_' (a dotted path)")
        head = heads[0]
        if not isinstance(entry[head], str):
            raise ConfigError(f"{where}.{head}", f"must be one policy (a string), got {entry[head]!r}: one entry is one "
                                                 "family; write one entry per policy")
        name = entry[head].rsplit(".", 1)[-1]
        knobs = {k: v for k, v in entry.items() if isinstance(v, list)}
        for k, v in knobs.items():
            if not v:
                raise ConfigError(f"{where}.{k}", "an empty list expands to no grid point: give at least one value")
        family = _label(name, {k: v for k, v in entry.items() if k != head and k not in knobs})
        if family in families:
            family = f"{family} #{i}"
        families.add(family)
        for values in itertools.product(*knobs.values()):
            spec = {**entry, **dict(zip(knobs, values))}  # the entry's key order
            label = _label(name, {k: v for k, v in spec.items() if k != head})
            key = json.dumps(spec, sort_keys=True)
            if key in seen:
                raise ConfigError(where, f"grid point {label} is also in {path}[{seen[key]}]: each point once")
            seen[key] = i
            points.append(GridPoint(len(points), i, family, label, spec, dict(zip(knobs, values))))
    return points


@dataclass
class AblateConfig:
    """The ``ablate:`` section; the keys are these fields (module docstring)."""

    grid: list
    seeds: list | None = None  # null: [0]
    n: int = 256
    batch_size: int = 256
    cache: bool = True
    temperature: float = 0.0
    bits: bool = True
    heatmaps: bool = True
    heatmap_rows: int = 8

    def __post_init__(self) -> None:
        if self.seeds is None:
            self.seeds = [0]
        if not isinstance(self.seeds, list) or not self.seeds:
            raise ConfigError("seeds", f"must be a non-empty list of seeds, got {self.seeds!r}")
        for i, s in enumerate(self.seeds):
            if isinstance(s, bool) or not isinstance(s, int) or s < 0:
                raise ConfigError(f"seeds[{i}]", f"a seed is an integer >= 0, got {s!r}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError("seeds", f"repeats a seed: {self.seeds}")
        for key, ok in (("n", self.n >= 1), ("batch_size", self.batch_size >= 1), ("temperature", self.temperature >= 0),
                        ("heatmap_rows", self.heatmap_rows >= 1)):
            if not ok:
                raise ConfigError(key, f"out of range: {getattr(self, key)!r}")
        self.temperature = float(self.temperature)
        self.points  # noqa: B018  # expand now: a bad entry is an error before anything runs

    @functools.cached_property
    def points(self) -> list[GridPoint]:
        return expand_grid(self.grid)

    def spec(self) -> dict[str, Any]:
        """The section as written back to ``config.yaml`` (every default filled in)."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class Ablation:
    """The built section: its config and a policy per (point index, seed)."""

    config: AblateConfig
    policies: dict[tuple[int, int], Any]

    @property
    def points(self) -> list[GridPoint]:
        return self.config.points

    def policy(self, point: GridPoint, seed: int) -> Any:
        return self.policies[point.index, seed]


# --------------------------------------------------------------------------- metrics


class RunMetrics:
    """Sums over the rows of one (grid point, seed), each a float64 ``SumMetric``.

    Every reported mean is a ratio of sums (``tokens_per_step = Σ revealed / Σ NFE``, not
    the mean of per-batch ratios), so the batch size does not change it; under DDP
    ``compute()`` sums each state over processes first. Wall time is the local sum of
    decode times; over processes it is their maximum (they decode concurrently).
    """

    def __init__(self) -> None:
        from torchmetrics import MetricCollection

        self.sums = MetricCollection({}, compute_groups=False)
        self.wall = 0.0
        self.quality: list[str] = []  # the per-row quality names, in the task's order

    def _add(self, name: str, value: Tensor) -> None:
        from torchmetrics.aggregation import SumMetric

        if name not in self.sums:
            self.sums.add_metrics({name: SumMetric(nan_strategy="error").set_dtype(torch.float64)})
        self.sums[name].update(value.detach().double().sum().cpu())

    def update(self, per_row: Mapping[str, Tensor], nfe: Tensor, revealed: Tensor, wall: float,
               nats: Tensor | None = None, generated: Tensor | None = None) -> None:
        """One batch: ``per_row`` task metrics (each ``Float[B]``), ``nfe`` and ``revealed``
        tokens (``[B]``), the batch's decode seconds, and optionally the reference's
        ``nats`` under the decoded order with the ``generated`` positions they cover."""
        for name, value in per_row.items():
            if name not in self.quality:
                self.quality.append(name)
            self._add(name, value)
        self._add("rows", torch.tensor(float(nfe.numel())))
        self._add("nfe", nfe)
        self._add("revealed", revealed)
        if nats is not None and generated is not None:
            self._add("nats", nats)
            self._add("generated", generated)
        self.wall += wall

    def compute(self) -> dict[str, float]:
        from torchmetrics.aggregation import MaxMetric

        s = {k: float(v) for k, v in self.sums.compute().items()}
        wall = MaxMetric()
        wall.update(self.wall)
        wall_s = float(wall.compute())
        out = {name: s[name] / s["rows"] for name in self.quality}
        if "nats" in s:
            out["bits_per_token"] = s["nats"] / max(s["generated"], 1.0) / math.log(2.0)
        out["nfe"] = s["nfe"] / s["rows"]
        out["tokens_per_step"] = s["revealed"] / max(s["nfe"], 1.0)
        out["wall_s"] = wall_s
        out["tokens_per_s"] = s["revealed"] / max(wall_s, 1e-9)
        out["n"] = int(s["rows"])
        return out


def _reference_order(decoded: Tensor, ranks: Tensor) -> Tensor:
    """The decoded order completed to every position the reference generates: a position
    the decode cut (EOS turned it into padding) joins one last set after all others."""
    gen = ranks >= 1
    last = int(decoded.max()) + 1 if decoded.numel() else 1
    return torch.where(gen, torch.where(decoded >= 1, decoded, last), ranks)



@torch.no_grad()
def evaluate_point(model: torch.nn.Module, task: Any, policy: Any, tokens: Tensor, ranks: Tensor,
                   config: AblateConfig, seed: int) -> dict[str, Any]:
    """Decode ``tokens``/``ranks`` (the seed's test rows) with ``policy`` in batches of
    ``config.batch_size``; the run record: ``seed``, the means of :class:`RunMetrics`
    and ``orders`` (the decoded ranks of the first ``config.heatmap_rows`` rows)."""
    from orderlab.decoding import decode
    from orderlab.likelihood import log_likelihood

    device = tokens.device
    metrics = RunMetrics()
    orders: list[list[int]] = []
    for j, start in enumerate(range(0, tokens.shape[0], config.batch_size)):
        x, r = tokens[start : start + config.batch_size], ranks[start : start + config.batch_size]
        masked = torch.where(r >= 1, torch.full_like(x, model.mask_id), x)
        sync(device)
        t0 = time.perf_counter()
        out = decode(model, policy, masked, r, cache=config.cache, temperature=config.temperature,
                     seed=derive_seed(seed, j, "decode"), eos_id=task.eos_id, pad_id=getattr(task, "pad_id", None))
        sync(device)
        wall = time.perf_counter() - t0
        revealed = torch.stack(out.tokens_per_step).sum(0) if out.tokens_per_step else torch.zeros_like(out.nfe)
        nats = generated = None
        if config.bits:
            nats = -log_likelihood(model, x, _reference_order(out.ranks, r))
            generated = (r >= 1).sum(1)
        metrics.update(task.metrics(out.tokens, x, r), out.nfe, revealed, wall, nats, generated)
        if len(orders) < config.heatmap_rows:
            orders += out.ranks[: config.heatmap_rows - len(orders)].cpu().tolist()
    return {"seed": seed, **metrics.compute(), "orders": orders}


def summarize(runs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """``{quantity: {mean, std}}`` over the runs (seeds) of a point: sample std (ddof 1),
    NaN with one run. Quantities: the numbers every run has, except ``seed``; a null (a
    non-finite number read back from ``results.json``) counts as NaN."""
    number = lambda v: v is None or isinstance(v, (int, float))  # noqa: E731
    names = [k for k, v in runs[0].items() if k not in ("seed", "orders") and number(v)
             and all(k in r and number(r[k]) for r in runs)]
    out = {}
    for name in names:
        v = torch.tensor([math.nan if r[name] is None else float(r[name]) for r in runs], dtype=torch.float64)
        out[name] = {"mean": float(v.mean()), "std": float(v.std()) if len(v) > 1 else math.nan}
    return out


# --------------------------------------------------------------------------- the run


def _fingerprint(model: torch.nn.Module) -> str:
    """A hash of the model's weights and buffers (which weights a run was measured on)."""
    h = hashlib.blake2b(digest_size=12)
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _setup(exp: Any) -> dict[str, Any]:
    """What a stored run must share with this invocation to be reused."""
    from omegaconf import OmegaConf

    cfg = exp.ablation.config
    return {"weights": _fingerprint(exp.model), "task": OmegaConf.to_container(exp.config.task),
            "model": OmegaConf.to_container(exp.config.model), "n": cfg.n, "batch_size": cfg.batch_size,
            "cache": cfg.cache, "temperature": cfg.temperature, "bits": cfg.bits}


def previous(path: str | Path) -> dict[str, Any] | None:
    """The ``ablation`` section of an earlier ``results.json`` (None if there is none)."""
    try:
        old = json.loads(Path(path).read_text()).get("ablation")
    except (OSError, ValueError, AttributeError):
        return None
    return old if isinstance(old, dict) else None


def _reusable(old: Mapping[str, Any] | None, setup: Mapping[str, Any], say: Callable[[str], None]) -> dict[tuple[str, int], dict]:
    """``{(point key, seed): run}`` of an earlier section measured on the same setup."""
    if not old:
        return {}
    if old.get("setup") != setup:
        changed = sorted(k for k in set(setup) | set(old.get("setup") or {}) if setup.get(k) != (old.get("setup") or {}).get(k))
        say(f"ablation: the setup changed ({', '.join(changed)}): every grid point is evaluated again")
        return {}
    return {(p["key"], r["seed"]): r for p in old.get("points", []) for r in p.get("runs", [])}


def _record(p: GridPoint) -> dict[str, Any]:
    return {"index": p.index, "entry": p.entry, "family": p.family, "policy": p.label, "knobs": dict(p.knobs),
            "spec": dict(p.spec), "key": p.key, "runs": [], "summary": None}


def run_grid(exp: Any, results: dict[str, Any], save: Callable[[], Any], progress: bool = True,
             console: Any = None) -> dict[str, Any]:
    """Evaluate every (grid point, seed) of ``exp.ablation`` on ``exp.model``.

    ``results["ablation"]`` becomes (and ``save()`` writes after every run)::

        setup     weights hash, task, model, n, batch_size, cache, temperature, bits
        metric    the task's metric
        seeds     the seeds
        points    per grid point, in grid order: index, entry, family, policy (label), knobs,
                  spec, key, runs (one record per seed done: seed, n, <task metrics>,
                  bits_per_token, nfe, tokens_per_step, wall_s, tokens_per_s, orders),
                  summary ({quantity: {mean, std}} once every seed is done, else null)

    A section already in ``results["ablation"]`` (the caller puts :func:`previous` there
    to resume) gives the runs it holds that were measured on the same setup; they are kept
    and not evaluated again. Returns the section; :func:`write_outputs` writes the files.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    grid, task, model = exp.ablation, exp.task, exp.model
    cfg = grid.config
    console = console or Console(stderr=True)
    setup = _setup(exp)
    done = _reusable(results.get("ablation"), setup, lambda m: console.print(m, highlight=False))
    points = grid.points
    section = results["ablation"] = {"setup": setup, "metric": task.metric, "seeds": list(cfg.seeds),
                                     "points": [_record(p) for p in points]}
    device = next(iter(model.parameters())).device
    data: dict[int, tuple[Tensor, Tensor]] = {}
    for p in points:  # reuse what is there first: a partial file stays complete
        rec = section["points"][p.index]
        rec["runs"] = [done[p.key, s] for s in cfg.seeds if (p.key, s) in done]
        if len(rec["runs"]) == len(cfg.seeds):
            rec["summary"] = summarize(rec["runs"])
    finished = sum(section["points"][p.index]["summary"] is not None for p in points)
    if done:
        console.print(f"ablation: {finished} of {len(points)} grid points already done in {exp.files.results}",
                      highlight=False)
    was_training = model.training
    model.eval()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("points"),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
    try:
        with Progress(*columns, console=console, disable=not progress, transient=False) as bar:
            job = bar.add_task("ablation", total=len(points), completed=finished)
            for p in points:
                rec = section["points"][p.index]
                if rec["summary"] is not None:
                    continue
                have = {r["seed"] for r in rec["runs"]}
                for s in cfg.seeds:
                    if s in have:
                        continue
                    bar.update(job, description=f"{p.label} seed {s}")
                    if s not in data:
                        x, r = task.batch(cfg.n, split="test", seed=s)
                        data[s] = (x.to(device), r.to(device))
                    run = evaluate_point(model, task, grid.policy(p, s), *data[s], cfg, s)
                    rec["runs"].append(run)
                    rec["runs"].sort(key=lambda r: cfg.seeds.index(r["seed"]))
                    save()
                rec["summary"] = summarize(rec["runs"])
                save()
                bar.advance(job)
            bar.update(job, description="ablation")
    finally:
        model.train(was_training)
    return section


# --------------------------------------------------------------------------- outputs


def _quantities(section: Mapping[str, Any]) -> list[str]:
    """The summary quantities in display order: quality first, then cost."""
    have: dict[str, None] = {}
    for p in section["points"]:
        for k in p["summary"] or {}:
            have.setdefault(k, None)
    have.pop("n", None)  # rows per seed: a setting, not a measurement
    cost = ["nfe", "tokens_per_step", "wall_s", "tokens_per_s"]
    quality = [section["metric"]] + [k for k in have if k not in cost and k != section["metric"]]
    return [k for k in quality + cost if k in have]


def csv_rows(section: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per grid point: index, family, policy, one column per knob name of the
    grid, seeds (runs done), n (test rows per seed), then ``<quantity>_mean`` and
    ``<quantity>_std`` per quantity (the std empty with one seed)."""
    knob_names: dict[str, None] = {}
    for p in section["points"]:
        for k in p["knobs"]:
            knob_names.setdefault(k, None)
    rows = []
    for p in section["points"]:
        row: dict[str, Any] = {"index": p["index"], "family": p["family"], "policy": p["policy"]}
        row.update({k: p["knobs"].get(k, "") for k in knob_names})
        row["seeds"] = len(p["runs"])
        row["n"] = p["runs"][0]["n"] if p["runs"] else ""
        for q in _quantities(section):
            s = (p["summary"] or {}).get(q)
            row[f"{q}_mean"] = s["mean"] if s else ""
            row[f"{q}_std"] = s["std"] if s and not math.isnan(s["std"]) else ""
        rows.append(row)
    return rows


_SHOWN = {"token_accuracy": ("token acc", "score"), "bits_per_token": ("bits/token", "bits"), "nfe": ("NFE", "nfe"),
          "tokens_per_step": ("tok/step", "ratio"), "wall_s": ("wall s", "seconds")}


def display_rows(section: Mapping[str, Any]) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """``(rows, formats)`` of the printed and markdown tables: per point the policy and,
    per quantity shown, ``(mean, std)``; ``formats`` maps each column to a ``report``
    column format. Quality first (the task's numbers, bits), then NFE, tokens per step,
    wall seconds."""
    rows, formats = [], {"policy": "text"}
    shown = [q for q in _quantities(section) if q != "tokens_per_s"]
    for p in section["points"]:
        row: dict[str, Any] = {"policy": p["policy"]}
        for q in shown:
            name, kind = _SHOWN.get(q, (q, "score"))
            s = (p["summary"] or {}).get(q)
            row[name] = (s["mean"], s["std"]) if s else None
            formats[name] = kind
        rows.append(row)
    return rows, formats


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", label).strip("_") or "entry"


def write_outputs(run_dir: str | Path, section: Mapping[str, Any], heatmaps: bool = True, title: str = "") -> list[Path]:
    """Write ``results.csv``, ``ablation.md``, ``pareto.png`` and (``heatmaps``) one
    ``order_grid_<family>.png`` per grid entry into ``run_dir``; the paths written."""
    from orderlab import report

    run_dir = Path(run_dir)
    metric = section["metric"]
    done = [p for p in section["points"] if p["summary"]]
    rows, formats = display_rows(section)
    paths = [report.write_csv(run_dir / CSV, csv_rows(section)),
             report.write_markdown(run_dir / TABLE, rows, title=title, formats=formats)]
    curves: dict[str, list[dict[str, Any]]] = {}
    for p in done:
        knob = ", ".join(f"{k}={_value_label(v)}" for k, v in p["knobs"].items())
        s = p["summary"]
        curves.setdefault(p["family"], []).append(
            {"x": s["nfe"]["mean"], "y": s[metric]["mean"], "yerr": s[metric]["std"], "label": knob})
    if curves:
        paths.append(report.pareto_plot(curves, run_dir / PARETO, xlabel="NFE (mean forward passes per row)",
                                        ylabel=f"{metric} (mean ± std over seeds)", title=title or None))
    if heatmaps:
        families: dict[str, list[dict[str, Any]]] = {}
        for p in done:
            families.setdefault(p["family"], []).append(p)
        for family, members in families.items():
            panels = []
            for p in members:
                first = p["runs"][0]
                knob = ", ".join(f"{k}={_value_label(v)}" for k, v in p["knobs"].items()) or p["policy"]
                stat = f"{metric} {first[metric]:.3f}, NFE {first['nfe']:.1f} (seed {first['seed']})"
                panels.append((f"{knob}: {stat}", torch.tensor(first["orders"], dtype=torch.long)))
            paths.append(report.order_grid(panels, run_dir / HEATMAP.format(_slug(family)),
                                           title=f"{family}: reveal step per position"))
    return paths
