"""``python -m orderlab.run experiments/X.yaml key=value ... [--eval-only]``

Loads the experiment (a config error exits with status 2 and the message on stderr),
creates the run folder ``run.dir / (run.name or <yaml stem>)`` with ``config.yaml``
(resolved, every default filled in), trains (``metrics.jsonl``, ``checkpoint.pt``) unless
``train.steps=0`` or ``--eval-only`` (then the folder's checkpoint is loaded if there is
one), evaluates every policy (``results.json``, ``order_<policy>.png``) and prints a
table. Ctrl-C keeps the last checkpoint and metrics, writes ``results.json`` with status
"interrupted" and exits with status 130. The same objects in Python:
``orderlab.load(path, overrides)``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any

from omegaconf import OmegaConf

from orderlab.config import Experiment, load
from orderlab.evaluate import evaluate, test_likelihood
from orderlab.registry import ConfigError
from orderlab.train import RESULTS, train

__all__ = ["main", "execute"]


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr)


def execute(exp: Experiment, eval_only: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train (unless ``eval_only`` or ``train.steps == 0``) and evaluate ``exp``; write the run folder."""
    from orderlab.report import write_json

    run_dir = exp.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(exp.config, run_dir / "config.yaml")
    results: dict[str, Any] = {"status": "running", "run_dir": str(run_dir)}
    t0 = time.perf_counter()
    if exp.train.steps > 0 and not eval_only:
        config = OmegaConf.to_container(exp.config)
        tr = train(exp.model, exp.objective, exp.task, exp.train, run_dir, progress=progress, extra={"config": config})
        results["train"] = tr.summary()
    if exp.checkpoint_path.exists():
        results["checkpoint_step"] = exp.restore(ema=True)  # the EMA weights when there are
    elif eval_only:
        raise FileNotFoundError(f"--eval-only: no checkpoint at {exp.checkpoint_path}")
    else:
        results["checkpoint_step"] = None  # an untrained model: train.steps=0 and no checkpoint
    ev = exp.evaluate
    try:
        rows = evaluate(exp.model, exp.task, exp.policies, ev.n, ev.batch_size, cache=ev.cache,
                        temperature=ev.temperature, seed=ev.seed, out_dir=run_dir if ev.heatmaps else None)
        results["evaluate"] = rows
        if ev.likelihood:
            results["likelihood"] = test_likelihood(exp.model, exp.task, ev.n, ev.batch_size, seed=ev.seed)
    except BaseException as e:
        results["status"] = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        results["error"] = f"{type(e).__name__}: {e}"
        write_json(run_dir / RESULTS, results)
        raise
    results["status"] = "completed"
    results["wall_s"] = time.perf_counter() - t0
    write_json(run_dir / RESULTS, results)
    return results


def _table(exp: Experiment, results: dict[str, Any]) -> None:
    from orderlab.report import print_table

    metric = exp.task.metric
    rows = [
        {
            "policy": r["policy"],
            metric: round(r["score"], 4),
            "NFE": f"{r['nfe_mean']:.1f} ({r['nfe_min']}/{r['nfe_median']}/{r['nfe_max']})",
            "tok/step": round(r["tokens_per_step"], 2),
            "tok/s": round(r["tokens_per_s"], 1),
            "wall s": round(r["wall_s"], 2),
        }
        for r in results.get("evaluate", [])
    ]
    title = f"{exp.run_dir.name}: {exp.task!r}, n={exp.evaluate.n}"
    valid = (results.get("train") or {}).get("valid")
    if valid:
        title += f" | valid {valid['label']} {valid['bits_per_token']:.4f} bits/token"
    if "likelihood" in results:
        title += f" | test l2r nll {results['likelihood']['bits_per_token']:.4f} bits/token"
    print_table(rows, title)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orderlab.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="experiment YAML")
    parser.add_argument("overrides", nargs="*", help="key=value overrides (omegaconf dotlist)")
    parser.add_argument("--eval-only", action="store_true", help="skip training; evaluate the run folder's checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_intermixed_args(argv)  # overrides may come after the flags
    try:
        exp = load(args.config, args.overrides)
    except ConfigError as e:
        from rich.markup import escape

        _console(stderr=True).print(f"[bold red]config error[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        return 2
    try:
        results = execute(exp, eval_only=args.eval_only, progress=not args.no_progress)
    except KeyboardInterrupt:
        _console(stderr=True).print(
            f"interrupted: {exp.run_dir} keeps the last checkpoint and metrics (continue with train.resume=true)",
            highlight=False, soft_wrap=True)
        return 130
    _table(exp, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
