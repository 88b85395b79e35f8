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
      cache: true          # exact KV cache where the attention rule has one (or false,
                           # approximate_prefix, approximate_dual: evaluate.CACHES)
      compile: auto        # the compiled decode step where the work pays (or true, false:
                           # evaluate.COMPILES; the same numbers either way)
      temperature: 0.0     # token sampling; 0 = greedy
      bits: true           # also -log2 p(reference | the decoded order) per generated token
      heatmaps: true       # order_grid_<entry>.png: one panel per grid point
      heatmap_rows: 8      # rows of each panel (and orders kept per run in results.json)
      search: null         # {k: 4, verifier: null}: every point is the searched policy
                           # (orderlab.evaluate.SearchConfig; labels "<point> (search k=4)")

A grid **entry** is a policy spec (``{name: ...}`` or ``{_target_: ...}``, or a bare name)
in which every list-valued key is a knob: the entry expands to the product of its lists,
in the order written, one **grid point** per combination. A constructor argument that
is itself a list is given wrapped (``token_freqs: [[0.2, 0.8]]``). An entry is one
*family* (one curve of the Pareto plot); its label is the policy name with its fixed keys.

An entry may also be a **learned row**, ``{stage: grpo, greedy: [true, false]}``: the
policy that stage of the same experiment learned, decoded greedily or sampled
(``orderlab.compare``), and any entry may carry its own test-time ``search`` (``{k: 4}``,
a knob when a list); rows then carry their method, kind, decode and training cost, and
``comparison.md`` gives each entry's best point and section 3's bar of issue 21.

A **seed** ``s`` picks the test examples (``task.batch(n, "test", seed=s)``, the same for
every grid point, so points compare on paired data), the decode RNG of batch ``j``
(``derive_seed(s, j, "decode")``) and the ``seed`` argument of a policy that takes one
and whose entry does not set it (``random``, Gumbel noise). Every quantity is reported
as the mean and the sample standard deviation (ddof 1; NaN with one seed) over seeds.

Per (point, seed) the rows are measured by ``orderlab.evaluate.measure``, the evaluation's
own path (the same decode seeds, the same metric code): a grid point and the evaluation
row of the same policy, seed and rows carry the same numbers. Every mean is a ratio of
sums over rows, so it does not depend on the batch size.

Under torchrun the grid is sharded: the (point, seed) runs are dealt round-robin to the
ranks, each rank measures its runs alone, and the records are gathered on every rank in
grid order; rank 0 writes (:func:`run_grid`).

On one rank, grid points run one after the other on the one model, each decoding its
batches back to back. Rows of several policies are *not* packed into one decode call: the
decoder takes one policy, a policy's noise (``random``, Gumbel) is drawn per decode
batch, so packing would change a point's draws with its neighbours, and wall time and
tokens/s per point would be shared rather than measured.

``results.json`` gets an ``ablation`` key (see :func:`run_grid`), rewritten atomically
after every (point, seed) (under torchrun after every round: a (point, seed) per rank);
with ``run.resume=true`` (or ``--eval-only``) a rerun keeps the runs of a previous
invocation whose setup (weights, task, model, n, batch size, cache, temperature, bits) is
the same and evaluates only the missing ones. At the end
:func:`write_outputs` writes ``results.csv``, ``ablation.md``, ``pareto.png`` and the
order heatmaps.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import itertools
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from orderlab import distributed
from orderlab.evaluate import SearchConfig
from orderlab.registry import ConfigError, build_settings

__all__ = [
    "AblateConfig",
    "GridPoint",
    "Ablation",
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
COMPARISON = "comparison.md"  # with learned or searched rows: each entry's best point and the bar

_HEADS = ("name", "_target_", "stage")  # a policy spec, or a stage's learned policy (orderlab.compare)


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
    and their values here; ``spec``: the whole policy spec (with ``search``, if any);
    ``search``: the entry's own search; ``stage``: set for a stage entry."""

    index: int
    entry: int
    family: str
    label: str
    spec: Mapping[str, Any]
    knobs: Mapping[str, Any]
    search: SearchConfig | None = None  # the entry's own test-time search (its ``search`` key)
    stage: str | None = None  # a stage entry: the stage whose learned policy this point decodes

    @property
    def policy_spec(self) -> dict[str, Any]:
        """The spec the policy is built from: ``spec`` without ``search``."""
        return {k: v for k, v in self.spec.items() if k != "search"}

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
            raise ConfigError(where, "needs exactly one of 'name' (a registered policy), '_target_' (a dotted path) "
                                     "or 'stage' (the policy a stage of this experiment learned)")
        head = heads[0]
        if not isinstance(entry[head], str):
            raise ConfigError(f"{where}.{head}", f"must be one policy (a string), got {entry[head]!r}: one entry is one "
                                                 "family; write one entry per policy")
        name = entry[head].rsplit(".", 1)[-1]
        knobs = {k: v for k, v in entry.items() if isinstance(v, list)}
        for k, v in knobs.items():
            if not v:
                raise ConfigError(f"{where}.{k}", "an empty list expands to no grid point: give at least one value")
        searches = [_search(v, f"{where}.search" + (f"[{j}]" if "search" in knobs else ""))
                    for j, v in enumerate(knobs.get("search", [entry.get("search")]))]
        fixed = {k: v for k, v in entry.items() if k not in (head, "search") and k not in knobs}
        family = _searched(_label(name, fixed), None if "search" in knobs else searches[0])
        if family in families:
            family = f"{family} #{i}"
        families.add(family)
        for values in itertools.product(*knobs.values()):
            spec = {**entry, **dict(zip(knobs, values))}  # the entry's key order
            search = searches[knobs["search"].index(spec["search"])] if "search" in knobs else searches[0]
            label = _searched(_label(name, {k: v for k, v in spec.items() if k not in (head, "search")}), search)
            key = json.dumps(spec, sort_keys=True)
            if key in seen:
                raise ConfigError(where, f"grid point {label} is also in {path}[{seen[key]}]: each point once")
            seen[key] = i
            knob_values = {k: (_search_label(search) if k == "search" else v) for k, v in zip(knobs, values)}
            points.append(GridPoint(len(points), i, family, label, spec, knob_values, search,
                                    entry["stage"] if head == "stage" else None))
    return points


def _search(value: Any, path: str) -> SearchConfig | None:
    """An entry's ``search`` (SearchConfig keys; null: a plain decode), checked."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ConfigError(path, f"must be a mapping of search settings (e.g. {{k: 4}}) or null, got {value!r}")
    return build_settings(SearchConfig, dict(value), path)


def _search_label(search: SearchConfig | None) -> str:
    """A search knob's value as a label: ``k=4`` (``, task`` with the oracle); ``none``."""
    return "none" if search is None else search.label("").strip(" ()").removeprefix("search ")


def _searched(label: str, search: SearchConfig | None) -> str:
    return label if search is None else search.label(label)


@dataclass
class AblateConfig:
    """The ``ablate:`` section; the keys are these fields (module docstring)."""

    grid: list
    seeds: list | None = None  # null: [0]
    n: int = 256
    batch_size: int = 256
    cache: bool | str = True  # a key of orderlab.evaluate.CACHES
    compile: bool | str = "auto"  # the compiled decode step: auto, true, false (orderlab.evaluate.COMPILES)
    temperature: float = 0.0
    bits: bool = True
    heatmaps: bool = True
    heatmap_rows: int = 8
    search: SearchConfig | None = None  # every point searched (orderlab.evaluate.SearchConfig keys); null: plain

    def __post_init__(self) -> None:
        if self.search is not None and not isinstance(self.search, SearchConfig):
            self.search = build_settings(SearchConfig, self.search, "search")
        if self.seeds is None:
            self.seeds = [0]
        if not isinstance(self.seeds, list) or not self.seeds:
            raise ConfigError("seeds", f"must be a non-empty list of seeds, got {self.seeds!r}")
        for i, s in enumerate(self.seeds):
            if isinstance(s, bool) or not isinstance(s, int) or s < 0:
                raise ConfigError(f"seeds[{i}]", f"a seed is an integer >= 0, got {s!r}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError("seeds", f"repeats a seed: {self.seeds}")
        from orderlab.evaluate import check_compile_with_cache, decode_cache

        decode_cache(self.cache)  # a bad name fails before anything runs
        check_compile_with_cache(self.compile, self.cache)
        for key, ok in (("n", self.n >= 1), ("batch_size", self.batch_size >= 1), ("temperature", self.temperature >= 0),
                        ("heatmap_rows", self.heatmap_rows >= 1)):
            if not ok:
                raise ConfigError(key, f"out of range: {getattr(self, key)!r}")
        self.temperature = float(self.temperature)
        for p in self.points:  # expand now: a bad entry is an error before anything runs
            if p.search is not None and self.search is not None:
                raise ConfigError(f"grid[{p.entry}].search", "ablate.search already searches every point: set "
                                                             "search on the entries or on the section, not both")

    @functools.cached_property
    def points(self) -> list[GridPoint]:
        return expand_grid(self.grid)

    def spec(self) -> dict[str, Any]:
        """The section as written back to ``config.yaml`` (every default filled in)."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["search"] = None if self.search is None else dataclasses.asdict(self.search)
        return out


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

    def settings(self, point: GridPoint) -> AblateConfig:
        """The settings ``point`` is measured with: the section's, with the entry's own search."""
        if point.search is None:
            return self.config
        settings = copy.copy(self.config)  # not dataclasses.replace: the section's checks ran already
        settings.search = point.search
        return settings


def grid_policies(cfg: AblateConfig, ctx: Any, make: Callable[..., Any], objectives: Mapping[str, Any],
                  check_only: bool = False) -> dict[tuple[int, int], Any]:
    """A policy per (grid point, seed), built by ``make`` (``registry.check`` in the check
    pass, ``registry.build``) with the context ``ctx``: a policy taking ``seed`` that its
    entry leaves unset gets the run's seed; any other is built once and shared by the
    seeds. A stage entry's point is the stage's learned policy (``orderlab.compare``:
    ``objectives`` are the stages' objectives, classes in the check pass), per seed."""
    import inspect

    from orderlab import registry
    from orderlab.compare import stage_policy

    policies: dict[tuple[int, int], Any] = {}
    for point in cfg.points:
        path = f"ablate.grid[{point.entry}]"
        spec = point.policy_spec
        if point.stage is not None:
            for s in cfg.seeds:
                policies[point.index, s] = stage_policy(spec, objectives, s, path, check_only)
            continue
        cls, _ = registry.split("policy", spec, path)
        if "seed" in inspect.signature(cls).parameters and "seed" not in spec:
            for s in cfg.seeds:
                policies[point.index, s] = make("policy", {**spec, "seed": s}, path, ctx)
        else:
            shared = make("policy", spec, path, ctx)
            policies.update({(point.index, s): shared for s in cfg.seeds})
    return policies


# --------------------------------------------------------------------------- a run


def evaluate_point(model: torch.nn.Module, task: Any, policy: Any, tokens: Tensor, ranks: Tensor,
                   config: AblateConfig, seed: int) -> dict[str, Any]:
    """The run record of ``policy`` on ``tokens``/``ranks`` (the seed's test rows), measured
    by ``orderlab.evaluate.measure`` (the evaluation's path) in batches of
    ``config.batch_size``: ``seed``, the means of :meth:`Measurement.means` and ``orders``
    (the decoded ranks of the first ``config.heatmap_rows`` rows)."""
    from orderlab.evaluate import measure

    m = measure(model, task, policy, tokens, ranks, batch_size=config.batch_size, cache=config.cache,
                temperature=config.temperature, seed=seed, bits=config.bits, keep_orders=config.heatmap_rows,
                search=config.search, compile=config.compile)
    return {"seed": seed, **m.means(), "orders": m.orders.tolist()}


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
            "cache": cfg.cache, "temperature": cfg.temperature, "bits": cfg.bits,
            # only when set: runs stored before the option existed stay reusable
            **({} if cfg.search is None else {"search": dataclasses.asdict(cfg.search)})}


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


def _record(p: GridPoint, search: SearchConfig | None = None) -> dict[str, Any]:
    label = p.label if search is None else search.label(p.label)
    return {"index": p.index, "entry": p.entry, "family": p.family, "policy": label, "knobs": dict(p.knobs),
            "spec": dict(p.spec), "key": p.key, "runs": [], "summary": None}


def _method(exp: Any, p: GridPoint, search: SearchConfig | None) -> dict[str, Any]:
    """What the comparison says of a point (``orderlab.compare``): ``kind`` (learned,
    search, heuristic), ``method`` (the stage and its objective, or the policy family),
    ``decode`` (greedy or sampled: how the order is chosen) and ``train`` (the stage's
    cost, ``train.Cost``; None for a row that trains nothing)."""
    from orderlab.compare import HEURISTIC, LEARNED, SEARCHED, stage_cost
    from orderlab.config import learned_label

    if p.stage is not None:
        from omegaconf import OmegaConf

        objective = OmegaConf.to_container(exp.config.stages[p.stage].objective)
        return {"kind": LEARNED, "method": learned_label(p.stage, objective),
                "decode": "greedy" if p.spec.get("greedy", True) else "sampled",
                "train": stage_cost(exp.stages[p.stage].files.checkpoint)}
    stochastic = p.spec.get("name") in _SAMPLED or bool(p.spec.get("noise"))  # draws of its own (seeded per run)
    return {"kind": HEURISTIC if search is None else SEARCHED, "method": p.family,
            "decode": "sampled" if stochastic else "greedy", "train": None}


_SAMPLED = ("random", "bernoulli", "plackett_luce")


def _policy_weights(exp: Any, p: GridPoint) -> str | None:
    """A hash of the learned policy's weights of a stage point (None for other points): a
    stored run is reused only when it was measured with the same policy."""
    if p.stage is None:
        return None
    return _fingerprint(exp.stages[p.stage].objective.policy)


def _denoiser(exp: Any) -> dict[str, Any]:
    """The shared denoiser's training cost: the stages that train the model, summed."""
    from orderlab.compare import stage_cost

    names = [n for n, st in exp.stages.items() if st.objective.trains_model]
    found = {n: stage_cost(exp.stages[n].files.checkpoint) for n in names}
    costs = [c for c in found.values() if c is not None]
    return {"stages": names, "train_s": sum(c["train_s"] for c in costs), "forwards": sum(c["forwards"] for c in costs),
            "calls": sum(c["calls"] for c in costs), "unrecorded": [n for n, c in found.items() if c is None]}


def _add_run(rec: dict[str, Any], run: dict[str, Any], seeds: Sequence[int]) -> bool:
    """Put ``run`` into its point's record (runs in seed order); the summary once every seed
    is done. Whether the point is now complete."""
    rec["runs"] = sorted([*rec["runs"], run], key=lambda r: seeds.index(r["seed"]))
    if len(rec["runs"]) == len(seeds):
        rec["summary"] = summarize(rec["runs"])
    return rec["summary"] is not None


def run_grid(exp: Any, results: dict[str, Any], save: Callable[[], Any], progress: bool = True,
             console: Any = None) -> dict[str, Any]:
    """Evaluate every (grid point, seed) of ``exp.ablation`` on ``exp.model``.

    ``results["ablation"]`` becomes (and ``save()`` writes after every round of runs)::

        setup     weights hash, task, model, n, batch_size, cache, temperature, bits, search
        metric    the task's metric
        seeds     the seeds
        points    per grid point, in grid order: index, entry, family, policy (label), knobs,
                  spec, key, runs (one record per seed done: seed, n, <task metrics>,
                  bits_per_token, nfe, tokens_per_step, wall_s, tokens_per_s, orders),
                  summary ({quantity: {mean, std}} once every seed is done, else null)

    A section already in ``results["ablation"]`` (the caller puts :func:`previous` there
    to resume; under a process group rank 0's counts) gives the runs it holds that were
    measured on the same setup; they are kept and not evaluated again.

    Under a process group (every rank calls) the missing (point, seed) runs are dealt
    round-robin to the ranks (``distributed.shard``); each rank measures its run of a round
    alone (``distributed.solo``), then the round's records are gathered on every rank and
    put in grid order, so every rank returns the section one process would (timings
    aside); ``save`` writes on rank 0 only (``checkpoint.write_results``). Returns the
    section; :func:`write_outputs` writes the files.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    grid, task, model = exp.ablation, exp.task, exp.model
    cfg = grid.config
    console = console or Console(stderr=True)
    say = (lambda m: console.print(m, highlight=False)) if distributed.is_main() else (lambda m: None)
    setup = _setup(exp)
    old = distributed.all_gather_object(results.get("ablation"))[0]  # every rank must agree on what is left
    done = _reusable(old, setup, say)
    points = grid.points
    section = results["ablation"] = {"setup": setup, "metric": task.metric, "seeds": list(cfg.seeds),
                                     "denoiser": _denoiser(exp), "points": []}
    for p in points:
        search = grid.settings(p).search
        weights = _policy_weights(exp, p)
        section["points"].append({**_record(p, cfg.search), **_method(exp, p, search),
                                  **({} if weights is None else {"policy_weights": weights})})
        for s in cfg.seeds:  # a learned point measured with other policy weights is measured again
            if weights is not None and done.get((p.key, s), {}).get("policy_weights") != weights:
                done.pop((p.key, s), None)
    for p in points:  # reuse what is there first: a partial file stays complete
        for s in cfg.seeds:
            if (p.key, s) in done:
                _add_run(section["points"][p.index], done[p.key, s], cfg.seeds)
    finished = sum(section["points"][p.index]["summary"] is not None for p in points)
    if done:
        say(f"ablation: {finished} of {len(points)} grid points already done in {exp.files.results}")
    todo = [(p, s) for p in points for s in cfg.seeds if (p.key, s) not in done]  # grid order
    mine, world = distributed.shard(todo), distributed.world()
    data: dict[int, tuple[Tensor, Tensor]] = {}  # the test rows of each seed this rank has measured
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("points"),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, console=console, disable=not (progress and distributed.is_main()), transient=False) as bar:
        job = bar.add_task("ablation", total=len(points), completed=finished)
        for i in range(0, len(todo), world):  # a round: todo[i + rank] on each rank
            run = None
            if i // world < len(mine):
                p, s = mine[i // world]
                bar.update(job, description=f"{p.label} seed {s}")
                if s not in data:
                    data[s] = task.batch(cfg.n, split="test", seed=s)
                with distributed.solo():
                    run = evaluate_point(model, task, grid.policy(p, s), *data[s], grid.settings(p), s)
                weights = section["points"][p.index].get("policy_weights")
                if weights is not None:
                    run["policy_weights"] = weights
            for (p, s), got in zip(todo[i : i + world], distributed.all_gather_object(run)):
                if _add_run(section["points"][p.index], got, cfg.seeds):
                    bar.advance(job)
            save()
        bar.update(job, description="ablation")
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
    ``<quantity>_std`` per quantity (the std empty with one seed). A grid with learned or
    searched rows (``orderlab.compare``) adds method, kind and decode after the policy and
    ``train_s``, ``train_forwards`` (the row's training cost; 0 for a heuristic) last."""
    from orderlab.compare import cost_cells

    compared = _compared(section)
    knob_names: dict[str, None] = {}
    for p in section["points"]:
        for k in p["knobs"]:
            knob_names.setdefault(k, None)
    rows = []
    for p in section["points"]:
        row: dict[str, Any] = {"index": p["index"], "family": p["family"], "policy": p["policy"]}
        if compared:
            row.update(method=p.get("method", p["family"]), kind=p.get("kind", ""), decode=p.get("decode", ""))
        row.update({k: p["knobs"].get(k, "") for k in knob_names})
        row["seeds"] = len(p["runs"])
        row["n"] = p["runs"][0]["n"] if p["runs"] else ""
        for q in _quantities(section):
            s = (p["summary"] or {}).get(q)
            row[f"{q}_mean"] = s["mean"] if s else ""
            row[f"{q}_std"] = s["std"] if s and not math.isnan(s["std"]) else ""
        if compared:
            row["train_s"], row["train_forwards"] = cost_cells(p.get("train"))
        rows.append(row)
    return rows


def _compared(section: Mapping[str, Any]) -> bool:
    """Whether the grid compares methods (a learned or searched row): the tables then
    carry method, decode and training-cost columns."""
    return any(p.get("kind") in ("learned", "search") for p in section["points"])


_SHOWN = {"token_accuracy": ("token acc", "score"), "bits_per_token": ("bits/token", "bits"), "nfe": ("NFE", "nfe"),
          "tokens_per_step": ("tok/step", "ratio"), "wall_s": ("wall s", "seconds")}


def display_rows(section: Mapping[str, Any]) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """``(rows, formats)`` of the printed and markdown tables: per point the policy and,
    per quantity shown, ``(mean, std)``; ``formats`` maps each column to a ``report``
    column format. Quality first (the task's numbers, bits), then NFE, tokens per step,
    wall seconds."""
    from orderlab.compare import cost_cells

    rows, formats = [], {"policy": "text"}
    shown = [q for q in _quantities(section) if q != "tokens_per_s"]
    compared = _compared(section)
    for p in section["points"]:
        row: dict[str, Any] = {"policy": p["policy"]}
        if compared:
            row["decode"] = p.get("decode", "")
            formats["decode"] = "text"
        for q in shown:
            name, kind = _SHOWN.get(q, (q, "score"))
            s = (p["summary"] or {}).get(q)
            row[name] = (s["mean"], s["std"]) if s else None
            formats[name] = kind
        if compared:
            row["train s"], row["train fwd"] = cost_cells(p.get("train"))
            formats.update({"train s": "seconds", "train fwd": "count"})
        rows.append(row)
    return rows, formats


def comparison_rows(section: Mapping[str, Any]) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """``(rows, formats)`` of ``comparison.md``: per grid entry its best point
    (``orderlab.compare.best_points``): method, kind, decode, the policy (its knob), the
    task metric, NFE, tokens per step (mean ± std over seeds) and training cost."""
    from orderlab.compare import best_points, cost_cells

    metric, rows = section["metric"], []
    for p in best_points(section):
        s = p["summary"]
        train_s, fwd = cost_cells(p.get("train"))
        rows.append({"method": p.get("method", p["family"]), "kind": p.get("kind", "heuristic"),
                     "decode": p.get("decode", ""), "best point": p["policy"],
                     metric: (s[metric]["mean"], s[metric]["std"]), "NFE": (s["nfe"]["mean"], s["nfe"]["std"]),
                     "tok/step": (s["tokens_per_step"]["mean"], s["tokens_per_step"]["std"]),
                     "train s": train_s, "train fwd": fwd})
    formats = {"method": "text", "kind": "text", "decode": "text", "best point": "text", metric: "score",
               "NFE": "nfe", "tok/step": "ratio", "train s": "seconds", "train fwd": "count"}
    return rows, formats


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", label).strip("_") or "entry"


def write_outputs(run_dir: str | Path, section: Mapping[str, Any], heatmaps: bool = True, title: str = "") -> list[Path]:
    """Write ``results.csv``, ``ablation.md``, ``pareto.png`` and (``heatmaps``) one
    ``order_grid_<family>.png`` per grid entry into ``run_dir``; the paths written. Under
    a process group only rank 0 writes (every rank holds the whole section); the others
    get ``[]``."""
    from orderlab import report

    if not distributed.is_main():
        return []
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
            {"x": s["nfe"]["mean"], "y": s[metric]["mean"], "yerr": s[metric]["std"], "label": knob,
             "learned": p.get("kind") == "learned"})
    if curves:
        paths.append(report.pareto_plot(curves, run_dir / PARETO, xlabel="NFE (mean forward passes per row)",
                                        ylabel=f"{metric} (mean ± std over seeds)", title=title or None))
    if _compared(section) and done:
        paths.append(_write_comparison(run_dir / COMPARISON, section, title))
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


def _write_comparison(path: Path, section: Mapping[str, Any], title: str) -> Path:
    """``comparison.md``: each entry's best point, the shared denoiser's cost and section
    3's bar (``orderlab.compare.bar``)."""
    from orderlab import report
    from orderlab.compare import bar, bar_text

    rows, formats = comparison_rows(section)
    table = report.markdown_table(rows, title=title or None, formats=formats)
    d = section.get("denoiser") or {}
    shared = (f"Shared denoiser (stages {', '.join(d.get('stages', [])) or 'none'}): {d.get('train_s', 0.0):.1f} s, "
              f"{int(d.get('forwards', 0))} row forwards; not counted in any row above.")
    if d.get("unrecorded") or not d.get("stages"):
        shared += (" Not recorded here: " + (", ".join(d.get("unrecorded", [])) or "no stage trains it") +
                   " (the weights came from model.checkpoint, or a checkpoint older than the counts).")
    return report.write_text(path, f"{table}\n{shared}\n\n{bar_text(bar(section))}\n")
