"""``python -m orderlab.run experiments/X.yaml key=value ... [--eval-only]``

Loads the experiment, creates the run folder ``run.dir / (run.name or <yaml stem>)``
with ``config.yaml`` (resolved, every default filled in), trains its stages in order
(each in ``<stage>/``: ``checkpoint.pt``, ``metrics.jsonl``; each stage starts from the
previous stage's final, EMA when present, weights), evaluates every policy (the
``evaluate`` policies and each stage's learned policy), runs the ``ablate`` grid when the
experiment has one (``orderlab.ablate``: ``results.csv``, ``ablation.md``, ``pareto.png``,
``order_grid_<entry>.png``) and prints the tables.

- The run folder is locked while a run uses it (``run.lock``: pid, host, start time;
  ``orderlab.runfolder``): a second run into it exits with status 2 naming the holder; a
  lock left by a dead process is taken over. A fresh run is refused (status 2) over a
  folder holding an earlier run (``results.json`` or a stage checkpoint) unless
  ``run.overwrite=true`` (which removes that run's results, checkpoints and metrics);
  ``run.dir`` that is a file or not writable is a config error (status 2).
- A fresh run (no ``run.resume``) starts every stage over. With ``run.resume=true``,
  stages whose checkpoint reached their ``train.steps`` are skipped (their weights
  loaded) and the interrupted stage continues exactly where its checkpoint left it;
  the ablation keeps the grid points already evaluated on the same weights.
- ``--eval-only`` trains nothing: it loads every stage's checkpoint (a stage with
  ``train.steps > 0`` and none is an error) and evaluates.
- Ctrl-C keeps the last checkpoint and metrics, writes ``results.json`` with status
  "interrupted" and exits with status 130.
- A config error, or a checkpoint that is missing (``--eval-only``), unreadable (and
  so is the previous one kept beside it) or does not fit the config, exits with status
  2 and one line on stderr naming the key or file.
- A non-finite loss, gradient norm or metric stops training at that step (past
  ``train.skip_nonfinite`` skipped steps): one line on stderr naming the stage, step and
  quantity, exit status 2, ``results.json`` status "failed"; the stage's last (finite)
  checkpoint is kept and nothing is evaluated.

``results.json`` (written here only, atomically, also on failure) holds::

    status        "running" | "completed" | "failed" | "interrupted"
    error         "<Type>: <message>" (failed / interrupted only)
    run_dir       the run folder
    distributed   {world_size, backend}: torchrun's process group (``orderlab.distributed.describe``;
                  world_size 1 and backend null in one process)
    stages        {<stage>: TrainResult.summary() | {status: "completed", skipped: true, step}}
                  for the stages this invocation trained or skipped
    checkpoints   {<stage>: step} of the stage checkpoints whose weights were evaluated
    evaluations   one row per policy (orderlab.evaluate.evaluate: policy, metric, score,
                  accuracy (exact-match metrics only), nfe_mean, tokens_per_step, ...)
    likelihood    test bits per token under the l2r order (``evaluate.likelihood``)
    likelihood_table  the likelihood table over orders (``evaluate.iwae``;
                  ``orderlab.evaluate.iwae_table``): orders, prior, proposal, n, rows
                  (estimate, k, bits_per_token, stderr, label "bound" | "nll"); the orders
                  are the last stage's whose objective gives them (``Objective.orders``;
                  vi_orders: π_ψ, q_φ), else uniformly random ones
    lm_eval       lm-eval tasks on the model (``evaluate.lm_eval``; ``orderlab.harness.step``):
                  tasks (per task: lm-eval's metrics), n_samples, versions, model (source,
                  policy, order and whether its log-likelihood is a bound, NFE), settings
    ablation      the ``ablate`` grid (``orderlab.ablate.run_grid``): setup, metric, seeds,
                  points (per grid point: policy, knobs, spec, runs per seed, summary);
                  rewritten after every (point, seed); kept by ``run.resume`` / ``--eval-only``
    wall_s        seconds

The same objects in Python: ``orderlab.load(path, overrides)`` and :func:`execute`.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any

from omegaconf import OmegaConf
from torch import nn

from orderlab import ablate
from orderlab import checkpoint as ckpt
from orderlab import distributed
from orderlab.config import Experiment, Stage, load
from orderlab.evaluate import evaluate, evaluation_pareto, iwae_table, lm_eval, test_likelihood
from orderlab.registry import ConfigError
from orderlab.runfolder import RunFolderError, claim
from orderlab.train import NonFiniteError, TrainResult, train

__all__ = ["main", "execute", "PARETO"]

PARETO = "evaluation_pareto.png"  # score vs NFE of the evaluated policies


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr)


def _write(exp: Experiment, results: dict[str, Any]) -> dict[str, Any]:
    stages = {k: v.summary() if isinstance(v, TrainResult) else v for k, v in results["stages"].items()}
    out = {**results, "stages": stages}
    ckpt.write_results(exp.files, out)
    return out


def _completed_step(stage: Stage) -> int | None:
    """The stage checkpoint's step when it reached ``train.steps`` (a stage to skip)."""
    if not stage.files.checkpoint.exists():
        return None
    step = int(ckpt.load(stage.files.checkpoint)["step"])
    return step if step >= stage.train.steps else None


def _train_stages(exp: Experiment, results: dict[str, Any], progress: bool) -> None:
    resume, retrained = exp.run.resume, False
    config = OmegaConf.to_container(exp.config)
    if not resume:  # a fresh run: no stale checkpoint of any stage survives a failure
        for stage in exp.stages.values():
            stage.files.clear()
    for stage in exp.stages.values():
        if stage.train.steps > 0:
            done = _completed_step(stage) if resume and not retrained else None
            if done is not None:
                results["stages"][stage.name] = {"status": "completed", "skipped": True, "step": done}
            else:
                res = results["stages"][stage.name] = TrainResult()
                # a stage that trains again invalidates the checkpoints of the stages after it
                train(exp.model, stage.objective, exp.task, stage.train, stage.files.dir, resume=resume and not retrained,
                      progress=progress, name=stage.name, extra={"config": config, "stage": stage.name}, result=res)
                retrained = retrained or res.step > res.start_step
        if stage.files.checkpoint.exists():  # the next stage starts from this one's final (EMA) weights
            results["checkpoints"][stage.name] = ckpt.restore_final(
                stage.files.checkpoint, exp.model, stage.objective, map_location=exp.device)


def _orders(exp: Experiment) -> tuple[str, Any, Any]:
    """``(name, prior, proposal)`` of the likelihood table: the order distributions of the
    last stage whose objective gives them (vi_orders: ``π_ψ``, ``q_φ``), else uniformly
    random orders for both (the MDM setting: IWAE with ``K = 1`` is the MDM NELBO)."""
    for stage in reversed(exp.stages.values()):
        orders = stage.objective.orders(exp.model)  # Objective's contract: None unless it learns orders
        if orders is not None:
            return (stage.name, *orders)
    return "uniform", "linear", None


def execute(exp: Experiment, eval_only: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train the stages (unless ``eval_only``) and evaluate ``exp``; write the run folder,
    locked for the run (``orderlab.runfolder.claim``: a ConfigError for an unusable
    ``run.dir``, a RunFolderError for a folder in use or holding an earlier run)."""
    say = lambda m: _console(stderr=True).print(m, highlight=False, soft_wrap=True)  # noqa: E731
    with claim(exp.files, resume=exp.run.resume, overwrite=exp.run.overwrite, eval_only=eval_only, say=say):
        return _execute(exp, eval_only, progress)


def _execute(exp: Experiment, eval_only: bool, progress: bool) -> dict[str, Any]:
    files = exp.files
    if distributed.is_main():
        OmegaConf.save(exp.config, files.config)
    results: dict[str, Any] = {"status": "running", "run_dir": str(files.dir), "distributed": distributed.describe(),
                               "stages": {}, "checkpoints": {}}
    if exp.ablation is not None and (eval_only or exp.run.resume):
        old = ablate.previous(files.results)  # kept in what a failure writes, reused on the same weights
        if old is not None:
            results["ablation"] = old
    t0 = time.perf_counter()
    try:
        if eval_only:
            for stage in exp.stages.values():
                if stage.train.steps > 0 and not stage.files.checkpoint.exists():
                    raise ckpt.CheckpointError(stage.files.checkpoint, f"--eval-only: stage {stage.name!r} has no "
                                               "checkpoint (train it first, or set its train.steps=0)")
            results["checkpoints"] = exp.restore(ema=True)
        else:
            _train_stages(exp, results, progress)
        for policy in exp.policies.values():
            if isinstance(policy, nn.Module):
                policy.eval()  # a learned policy decodes without dropout
        ev = exp.evaluate
        results["evaluations"] = evaluate(
            exp.model, exp.task, exp.policies, ev.n, ev.batch_size, cache=ev.cache, temperature=ev.temperature,
            seed=ev.seed, out_dir=files.dir if ev.heatmaps else None, search=ev.search, compile=ev.compile)
        if ev.heatmaps and len(results["evaluations"]) > 1 and distributed.is_main():
            evaluation_pareto(results["evaluations"], files.dir / PARETO, title=f"{files.dir.name}: {exp.task!r}")
        if ev.likelihood:
            results["likelihood"] = test_likelihood(exp.model, exp.task, ev.n, ev.batch_size, seed=ev.seed)
        if ev.iwae is not None and distributed.is_main():  # not sharded: the main rank's, which writes it
            name, prior, proposal = _orders(exp)
            results["likelihood_table"] = iwae_table(exp.model, exp.task, ev.iwae, prior, proposal, orders=name,
                                                     seed=ev.seed)
        if ev.lm_eval is not None and distributed.is_main():  # lm-eval runs its requests in one process
            results["lm_eval"] = lm_eval(exp, ev.lm_eval)
        if exp.ablation is not None:
            ablate.run_grid(exp, results, save=lambda: _write(exp, results), progress=progress)
            ablate.write_outputs(files.dir, results["ablation"], heatmaps=exp.ablation.config.heatmaps,
                                 title=f"{files.dir.name}: {exp.task!r}")
    except BaseException as e:
        results["status"] = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        results["error"] = f"{type(e).__name__}: {e}"
        results["wall_s"] = time.perf_counter() - t0
        _write(exp, results)
        raise
    results["status"] = "completed"
    results["wall_s"] = time.perf_counter() - t0
    return _write(exp, results)


def _table(exp: Experiment, results: dict[str, Any]) -> None:
    from orderlab.report import FORMATS, print_table

    metric = exp.task.metric
    nfe = FORMATS["nfe"]
    rows = [
        {
            "policy": r["policy"],
            metric: r["score"],
            "NFE": f"{nfe(r['nfe_mean'])} ({r['nfe_min']}/{r['nfe_median']}/{r['nfe_max']})",
            **({f"sampled {metric}": r["sampled_score"], "entropy": r["entropy"]} if "sampled_score" in r else {}),
            "tok/step": r["tokens_per_step"],
            "tok/s": r["tokens_per_s"],
            "wall s": r["wall_s"],
        }
        for r in results.get("evaluations", [])
    ]
    formats = {metric: "score", f"sampled {metric}": "score", "entropy": "bits", "tok/step": "ratio", "tok/s": "rate", "wall s": "seconds"}
    title = f"{exp.run_dir.name}: {exp.task!r}, n={exp.evaluate.n}"
    for name, stage in results["stages"].items():
        valid = stage.get("valid")
        if valid:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in valid.items() if k not in ("step", "label", "loss")
                              and isinstance(v, float))
            title += f" | {name} valid{' ' + valid['label'] if valid.get('label') else ''} {shown}"
    if "likelihood" in results:
        title += f" | test l2r nll {results['likelihood']['bits_per_token']:.4f} bits/token"
    if rows or "ablation" not in results:
        print_table(rows, title, formats=formats)
    if "likelihood_table" in results:
        lt = results["likelihood_table"]
        lrows = [{"estimate": r["estimate"], "K": "" if r["k"] is None else r["k"], "bits/token": r["bits_per_token"],
                 "± se": r["stderr"], "label": r["label"]} for r in lt["rows"]]
        print_table(lrows, f"{exp.run_dir.name}: likelihood table, n={lt['n']} test rows, bits per generated token; "
                          f"iwae: orders of {lt['orders']!r}", formats={"K": "text", "bits/token": "bits", "± se": "bits"})
    if "ablation" in results:  # the grid's table; it carries the title when there was no other
        section = results["ablation"]
        head = f"{title} | ablation" if not rows else f"{exp.run_dir.name} ablation"
        rows, formats = ablate.display_rows(section)
        print_table(rows, f"{head}: n={exp.ablation.config.n} x seeds {section['seeds']}, mean ± std over seeds "
                          f"-> {exp.run_dir / ablate.CSV}", formats=formats)


def _error(kind: str, e: Exception) -> int:
    from rich.markup import escape

    message = " ".join(str(e).split())  # one line, whatever the message
    _console(stderr=True).print(f"[bold red]{kind}[/] {escape(message)}", highlight=False, soft_wrap=True)
    return 2


@distributed.session()  # under torchrun: one process group for the whole run, torn down at the end
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orderlab.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="experiment YAML")
    parser.add_argument("overrides", nargs="*", help="key=value overrides (omegaconf dotlist)")
    parser.add_argument("--eval-only", action="store_true", help="skip training; evaluate the run folder's checkpoints")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_intermixed_args(argv)  # overrides may come after the flags
    try:
        exp = load(args.config, args.overrides)
    except ConfigError as e:
        return _error("config error", e)
    try:
        results = execute(exp, eval_only=args.eval_only, progress=not args.no_progress)
    except ConfigError as e:  # run.dir unusable; a batch that does not split across processes (training start)
        return _error("config error", e)
    except RunFolderError as e:  # locked by a live run, or an earlier run there
        return _error("run folder refused", e)
    except KeyboardInterrupt:
        _console(stderr=True).print(
            f"interrupted: {exp.run_dir} keeps the last checkpoints and metrics (continue with run.resume=true)",
            highlight=False, soft_wrap=True)
        return 130
    except ckpt.CheckpointError as e:
        return _error("checkpoint error", e)
    except NonFiniteError as e:
        return _error("training diverged", e)
    if distributed.is_main():
        _table(exp, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
