"""The comparison's pieces (issue 21, section 2): learned rows in an ablation grid, their
training cost, each family's best point and the bar of section 3.

An ablation grid (``orderlab.ablate``) holds heuristic policy specs; a **stage entry**
``{stage: grpo}`` is a row for the policy that stage of the same experiment learned, on
the same denoiser, test rows, decode settings and seeds as every heuristic::

    ablate:
      grid:
        - {name: threshold, tau: [0.5, 0.7, 0.9]}
        - {stage: grpo, greedy: [true, false]}   # the mode of π, and a draw from π (seeded per run)
        - {stage: aop, search: {k: 4}}           # a row may be searched (test-time order search)
        - {name: top_prob, search: [{k: 2}, {k: 4}]}

Keys of a stage entry: ``stage`` (a stage of ``stages``; its objective must learn a policy,
``Objective.policy``, and must not train the denoiser, else the rows would not share it),
``greedy`` (default true) and ``search``; every list is a knob as in a policy entry.
``search`` (``orderlab.evaluate.SearchConfig`` keys) is allowed on any entry.

**Training cost** of a row: the seconds and denoiser forwards of the stage that learned it,
read from the stage's checkpoint (``train.Cost``, continued across resumes); a heuristic or
searched heuristic row trains nothing (0); the denoiser's cost is shared by every row and
reported once (the stages that train the model).

**Best per family** (:func:`best_points`): per grid entry its point of highest mean metric
(ties: fewer NFE). **The bar** (:func:`bar`, section 3): the best learned row against the
best heuristic row at equal or lower NFE (gap in points, and whether it clears one std of
each), and the fewest forwards a learned row needs to reach the best heuristic's accuracy.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from orderlab.policies.base import Policy, StepView
from orderlab.registry import ConfigError

__all__ = ["StagePolicy", "stage_policy", "stage_cost", "best_points", "bar", "LEARNED", "HEURISTIC", "SEARCHED"]

LEARNED, HEURISTIC, SEARCHED = "learned", "heuristic", "search"
STAGE_KEYS = ("stage", "greedy", "search")


class StagePolicy(Policy):
    """The policy stage ``stage`` learned, decoded as its mode (``greedy``) or sampled from
    its own generator seeded ``seed`` (the ablation run's seed). Shares the learned
    module (weights loaded into it later are the ones decoded); the module's own
    ``greedy``/``seed`` are set only for the duration of each call."""

    def __init__(self, stage: str, policy: Any, greedy: bool = True, seed: int = 0):
        self.stage, self.policy, self.greedy, self.seed = stage, policy, bool(greedy), int(seed)
        self.wants_hidden = bool(getattr(policy, "wants_hidden", False))

    @contextlib.contextmanager
    def _as_set(self) -> Iterator[None]:
        old = self.policy.greedy, self.policy.seed
        self.policy.greedy, self.policy.seed = self.greedy, self.seed
        try:
            yield
        finally:
            self.policy.greedy, self.policy.seed = old

    def candidates(self, masked: Tensor, step: int) -> Tensor:
        return self.policy.candidates(masked, step)

    def reset(self) -> None:
        with self._as_set():
            self.policy.reset()

    def select(self, view: StepView) -> Tensor:
        with self._as_set():
            return self.policy.select(view)

    def __repr__(self) -> str:
        return f"StagePolicy({self.stage!r}, {'greedy' if self.greedy else 'sampled'}, seed={self.seed})"


def stage_policy(spec: Mapping[str, Any], objectives: Mapping[str, Any], seed: int, path: str,
                 check_only: bool) -> StagePolicy | None:
    """The :class:`StagePolicy` of a stage entry's point (``spec`` without ``search``), or
    None in the check pass (``objectives`` hold classes there: only the name is checked).
    ConfigErrors name ``<path>.stage`` / ``<path>.greedy``."""
    for key in spec:
        if key not in STAGE_KEYS:
            raise ConfigError(f"{path}.{key}", f"unknown key of a stage entry (valid keys: {', '.join(STAGE_KEYS)})")
    name = spec["stage"]
    if name not in objectives:
        import difflib

        close = difflib.get_close_matches(str(name), list(objectives), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        have = ", ".join(objectives) or "none"
        raise ConfigError(f"{path}.stage", f"no stage {name!r}{hint} (stages: {have})")
    greedy = spec.get("greedy", True)
    if not isinstance(greedy, bool):
        raise ConfigError(f"{path}.greedy", f"must be true (the mode of the policy) or false (a sample), got {greedy!r}")
    if check_only:
        return None
    objective = objectives[name]
    policy = getattr(objective, "policy", None)
    if not isinstance(policy, Policy) or not hasattr(policy, "greedy"):
        raise ConfigError(f"{path}.stage", f"stage {name!r} ({type(objective).__name__}) learns no policy to decode with")
    if objective.trains_model:
        raise ConfigError(f"{path}.stage", f"stage {name!r} trains the denoiser ({type(objective).__name__}, "
                                           "trains_model=True): its row would not share the denoiser with the others; "
                                           "compare a joint recipe as its own experiment")
    return StagePolicy(name, policy, greedy, seed)


def stage_cost(checkpoint: str | Path) -> dict[str, float] | None:
    """``{train_s, calls, forwards}`` of a stage (its checkpoint's ``cost``), or None when
    the stage has no checkpoint or one written before costs were counted."""
    from orderlab import checkpoint as ckpt

    path = Path(checkpoint)
    if not path.exists():
        return None
    cost = ckpt.load(path).get("cost")
    return None if cost is None else {"train_s": float(cost["train_s"]), "calls": int(cost["calls"]),
                                      "forwards": int(cost["forwards"])}


def _mean(p: Mapping[str, Any], q: str) -> float:
    s = (p.get("summary") or {}).get(q)
    return math.nan if s is None or s["mean"] is None else float(s["mean"])


def _std(p: Mapping[str, Any], q: str) -> float:
    s = (p.get("summary") or {}).get(q)
    v = math.nan if s is None or s["std"] is None else float(s["std"])
    return 0.0 if math.isnan(v) else v


def best_points(section: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """Per grid entry (in grid order) its finished point with the highest mean metric,
    ties broken by fewer NFE."""
    metric, best = section["metric"], {}
    for p in section["points"]:
        if not p.get("summary"):
            continue
        key = (_mean(p, metric), -_mean(p, "nfe"))
        if p["entry"] not in best or key > best[p["entry"]][0]:
            best[p["entry"]] = (key, p)
    return [best[e][1] for e in sorted(best)]


def bar(section: Mapping[str, Any], points: float = 0.05, fewer: float = 0.2) -> dict[str, Any] | None:
    """Section 3's bar over the finished points: the best heuristic (highest mean metric,
    then fewest NFE), the best learned row at equal or lower NFE and its gap (``gap``,
    metric units; ``outside_std``: the gap exceeds both rows' std), and the learned row
    reaching the best heuristic's mean metric with the fewest NFE (``nfe_saving``: the
    fraction of forwards it saves). ``met``: a gap >= ``points`` outside one std, or a
    saving >= ``fewer``. ``frontier``: the learned row furthest above the best heuristic that
spends no more forwards than it (the largest gap found). None without a finished
heuristic and learned row. Searched
    heuristic rows count as heuristics (they learn nothing)."""
    metric = section["metric"]
    done = [p for p in section["points"] if p.get("summary")]
    heur = [p for p in done if p.get("kind", HEURISTIC) != LEARNED]
    learned = [p for p in done if p.get("kind") == LEARNED]
    if not heur or not learned:
        return None
    h = max(heur, key=lambda p: (_mean(p, metric), -_mean(p, "nfe")))
    h_acc, h_nfe = _mean(h, metric), _mean(h, "nfe")
    within = [p for p in learned if _mean(p, "nfe") <= h_nfe + 1e-9]
    out: dict[str, Any] = {"metric": metric, "heuristic": h["policy"], "heuristic_mean": h_acc,
                           "heuristic_std": _std(h, metric), "heuristic_nfe": h_nfe}
    best = max(learned, key=lambda p: (_mean(p, metric), -_mean(p, "nfe")))
    out.update(learned=best["policy"], learned_mean=_mean(best, metric), learned_std=_std(best, metric),
               learned_nfe=_mean(best, "nfe"))
    if within:
        w = max(within, key=lambda p: (_mean(p, metric), -_mean(p, "nfe")))
        gap = _mean(w, metric) - h_acc
        out.update(at_nfe=w["policy"], gap=gap, outside_std=gap > max(_std(w, metric), _std(h, metric)))
    else:
        out.update(at_nfe=None, gap=None, outside_std=False)
    reach = [p for p in learned if _mean(p, metric) >= h_acc - 1e-12]
    if reach:
        r = min(reach, key=lambda p: _mean(p, "nfe"))
        out.update(reaches=r["policy"], nfe_saving=1.0 - _mean(r, "nfe") / h_nfe if h_nfe > 0 else 0.0)
    else:
        out.update(reaches=None, nfe_saving=None)
    # the largest gap to the frontier: each learned row against the best heuristic that
    # spends no more forwards than it (None where every heuristic spends more)
    front = None
    for p in learned:
        cheaper = [q for q in heur if _mean(q, "nfe") <= _mean(p, "nfe") + 1e-9]
        if cheaper:
            q = max(cheaper, key=lambda q: (_mean(q, metric), -_mean(q, "nfe")))
            gap = _mean(p, metric) - _mean(q, metric)
            if front is None or gap > front["gap"]:
                front = {"learned": p["policy"], "heuristic": q["policy"], "gap": gap,
                         "outside_std": gap > max(_std(p, metric), _std(q, metric)),
                         "learned_nfe": _mean(p, "nfe"), "heuristic_nfe": _mean(q, "nfe")}
    out["frontier"] = front
    out["met"] = bool((out["gap"] is not None and out["gap"] >= points and out["outside_std"])
                      or (out["nfe_saving"] is not None and out["nfe_saving"] >= fewer))
    return out


def bar_text(b: Mapping[str, Any] | None) -> str:
    """One paragraph saying whether the bar is met, with the numbers."""
    if b is None:
        return "The bar: needs a finished heuristic row and a finished learned row."
    m = b["metric"]
    lines = [f"Best heuristic: {b['heuristic']}: {m} {b['heuristic_mean']:.4f} ± {b['heuristic_std']:.4f} at "
             f"NFE {b['heuristic_nfe']:.2f}. Best learned: {b['learned']}: {b['learned_mean']:.4f} ± "
             f"{b['learned_std']:.4f} at NFE {b['learned_nfe']:.2f}."]
    if b["gap"] is not None:
        lines.append(f"At equal or lower NFE the best learned row ({b['at_nfe']}) is {100 * b['gap']:+.1f} points"
                     f" ({'outside' if b['outside_std'] else 'within'} one std).")
    else:
        lines.append("No learned row runs at or below the best heuristic's NFE.")
    if b["nfe_saving"] is not None:
        saving = b["nfe_saving"]
        lines.append(f"{b['reaches']} reaches the best heuristic's {m} with {100 * abs(saving):.1f}% "
                     f"{'fewer' if saving >= 0 else 'more'} forwards.")
    else:
        lines.append(f"No learned row reaches the best heuristic's {m}.")
    f = b.get("frontier")
    if f is not None:
        lines.append(f"Largest gap to the heuristic frontier: {f['learned']} (NFE {f['learned_nfe']:.2f}) vs "
                     f"{f['heuristic']} (NFE {f['heuristic_nfe']:.2f}): {100 * f['gap']:+.1f} points "
                     f"({'outside' if f['outside_std'] else 'within'} one std).")
    lines.append(f"Section 3's bar (+5 points at <= NFE outside one std, or the same {m} with >= 20% fewer "
                 f"forwards): {'met' if b['met'] else 'not met'}.")
    return " ".join(lines)


def cost_cells(cost: Mapping[str, Any] | None) -> tuple[float, float]:
    """``(seconds, row forwards)`` of a point's training cost (0, 0 for none)."""
    if not cost:
        return 0.0, 0.0
    return float(cost.get("train_s", 0.0)), float(cost.get("forwards", 0))
