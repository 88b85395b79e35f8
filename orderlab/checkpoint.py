"""The run folder: its file names, atomic writes, and what a checkpoint holds.

One module owns the layout; train.py, config.py and run.py read and write these paths
only through it. ``run.dir / <name>/``::

    config.yaml              the resolved experiment, every default filled in (run.py)
    run.lock                 who runs in the folder while a run does (orderlab.runfolder)
    results.json             status, per-stage summaries, evaluation rows (run.py, one schema)
    order_<policy>.png       order heatmaps of the evaluation
    <stage>/checkpoint.pt    per training stage (train.py), written atomically
    <stage>/checkpoint.prev.pt  the checkpoint before it (a hard link, no copy)
    <stage>/metrics.jsonl    one JSON record per logged step of that stage

A checkpoint is a dict of plain containers and tensors (``torch.load(weights_only=True)``;
it is ``train.Trainer.state_dict()``)::

    step, model, objective (state dict or None), optimizer, scheduler,
    ema ({decay, updates, shadow} or None; shadow keys "model.*" / "objective.*" for the
    modules the stage trained), rng ({torch, python[, cuda]}), window (the metrics of the
    steps since the last log record, so a resumed run logs the same records), skipped
    (non-finite steps skipped so far; absent in checkpoints older than the count), cost
    (``train.Cost``: seconds, denoiser calls and row forwards of the stage's steps so far;
    absent in older checkpoints), extra

Results are never lost to a bad write: :func:`save` verifies the new file (read back
before it replaces the old one) and keeps the file it replaces as ``checkpoint.prev.pt``;
:func:`load` of a checkpoint that cannot be read falls back to that previous one, saying
so on stderr. Every other failure to read one (both unreadable, not a checkpoint, weights
that do not fit the model) is a :class:`CheckpointError` whose one-line message names
the file.

Under a process group (``orderlab.distributed``) only rank 0 writes: :func:`save`,
:func:`append_metrics`, :func:`truncate_metrics`, :func:`write_results` and
``StageFiles.clear`` do nothing on the other ranks (``clear`` then waits for rank 0, so
no rank reads a stale file). A checkpoint written by ``W`` ranks also holds
``rng_ranks`` (every rank's RNG state, in rank order). Every rank reads the same files:
the run folder must be on a filesystem all nodes share.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from orderlab import distributed
from orderlab.report import append_jsonl, atomic_write, write_json

__all__ = [
    "CHECKPOINT",
    "PREVIOUS",
    "METRICS",
    "RESULTS",
    "CONFIG",
    "LOCK",
    "CheckpointError",
    "RunFiles",
    "StageFiles",
    "save",
    "load",
    "previous",
    "rng_state",
    "set_rng_state",
    "final_weights",
    "load_weights",
    "restore_final",
    "resolve",
    "append_metrics",
    "truncate_metrics",
    "write_results",
]

CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"  # previous(CHECKPOINT)
METRICS = "metrics.jsonl"
RESULTS = "results.json"
CONFIG = "config.yaml"
LOCK = "run.lock"


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message is one line and names the file."""

    def __init__(self, path: str | Path, message: str):
        self.path = Path(path)
        super().__init__(f"{path}: {message}")


@dataclass(frozen=True)
class StageFiles:
    """The files of one training stage (a folder of the run, or any folder for ``train``)."""

    dir: Path

    @property
    def checkpoint(self) -> Path:
        return self.dir / CHECKPOINT

    @property
    def previous(self) -> Path:
        return self.dir / PREVIOUS

    @property
    def metrics(self) -> Path:
        return self.dir / METRICS

    def clear(self) -> None:
        """Remove the checkpoints and metrics (a fresh start must not leave stale ones).
        Under a process group every rank calls it: rank 0 removes, all wait for it."""
        if distributed.is_main():
            for p in (self.checkpoint, self.previous, self.metrics):
                p.unlink(missing_ok=True)
        distributed.barrier()


@dataclass(frozen=True)
class RunFiles:
    """The files of one run folder."""

    dir: Path

    @property
    def config(self) -> Path:
        return self.dir / CONFIG

    @property
    def results(self) -> Path:
        return self.dir / RESULTS

    @property
    def lock(self) -> Path:
        return self.dir / LOCK

    def stage(self, name: str) -> StageFiles:
        return StageFiles(self.dir / name)


# --------------------------------------------------------------------------- writing


def previous(path: str | Path) -> Path:
    """Where the checkpoint ``path`` replaced is kept: ``checkpoint.pt`` -> ``checkpoint.prev.pt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save(path: str | Path, state: dict[str, Any]) -> None:
    """``torch.save`` atomically, verified, keeping the file it replaces as
    :func:`previous`. Rank 0 only under a process group.

    Order: write a temporary file, read it back (``weights_only``, memory-mapped: a
    truncated or garbled file fails there) and check its step, only then link the current
    checkpoint to ``previous`` and replace it. At every moment one of the two files is a
    whole, verified checkpoint; a failed write leaves both as they were."""
    if not distributed.is_main():
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        torch.save(state, tmp)
        step = _read(tmp, "cpu", mmap=True)["step"]
        if step != state["step"]:
            raise CheckpointError(tmp, f"reads back step {step}, wrote step {state['step']}")
        if path.exists():
            atomic_write(previous(path), lambda prev_tmp: _link(path, prev_tmp))

    atomic_write(path, write)


def _link(src: Path, dst: Path) -> None:
    """``dst`` becomes the file ``src``: a hard link (no copy), a copy where the filesystem
    has no hard links."""
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def append_metrics(path: Path, record: Mapping[str, Any]) -> None:
    """Append one record (rank 0 only under a process group)."""
    if not distributed.is_main():
        return
    append_jsonl(path, record)


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records past ``step`` (written after the checkpoint a resume starts from; rank 0)."""
    if not distributed.is_main() or not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    keep = [ln for ln in lines if json.loads(ln).get("step", 0) <= step]
    if len(keep) != len(lines):
            atomic_write(path, lambda tmp: tmp.write_text("".join(ln + "\n" for ln in keep)))


def write_results(files: RunFiles, results: Mapping[str, Any]) -> None:
    """Write ``results.json`` (atomically; rank 0 only). The one writer is run.py; the schema
    is its docstring's."""
    if not distributed.is_main():
        return
    write_json(files.results, results)


# --------------------------------------------------------------------------- reading


def load(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """A checkpoint written by :func:`save`. When ``path`` cannot be read (missing,
    truncated, garbled) and its :func:`previous` can, that one, with a warning on stderr
    naming both files; else :class:`CheckpointError` (naming ``path``)."""
    path = Path(path)
    try:
        return _read(path, map_location)
    except CheckpointError as e:
        prev = previous(path)
        if not prev.is_file():
            raise
        try:
            state = _read(prev, map_location)
        except CheckpointError:
            raise e from None
        if distributed.is_main():
            print(f"warning: {e}; using the previous checkpoint {prev} (step {state['step']})", file=sys.stderr)
        return state


def _read(path: Path, map_location: Any, mmap: bool = False) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(path, "no checkpoint file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # truncated zip, pickle garbage, a text file, ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(path, f"unreadable checkpoint (truncated or not a checkpoint): {first}") from None
    if not isinstance(state, dict) or "step" not in state or "model" not in state:
        raise CheckpointError(path, "not an orderlab checkpoint (no 'step' and 'model' entries)")
    return state


def resolve(path: str | Path) -> Path:
    """The checkpoint file meant by ``path``: a file, a stage folder (its ``checkpoint.pt``)
    or a run folder (the checkpoint of its last stage that has one, in ``config.yaml`` order)."""
    path = Path(path)
    if path.is_file():
        return path
    if (path / CHECKPOINT).is_file():
        return path / CHECKPOINT
    if (path / CONFIG).is_file():
        from omegaconf import OmegaConf

        stages = list(OmegaConf.load(path / CONFIG).get("stages") or [])
        for name in reversed(stages):
            if (path / name / CHECKPOINT).is_file():
                return path / name / CHECKPOINT
    elif path.is_dir():  # no config.yaml to order the stages: only one may have a checkpoint
        found = sorted(path.glob(f"*/{CHECKPOINT}"))
        if len(found) == 1:
            return found[0]
        if found:
            raise CheckpointError(path, f"several stage checkpoints and no {CONFIG} to order them: name one of "
                                        f"{[str(p.parent) for p in found]}")
    raise CheckpointError(path, "no checkpoint there (expected a checkpoint file, a stage folder or a run folder)")


# --------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """The global torch (and CUDA) and Python RNG states."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- weights


def load_weights(module: nn.Module, weights: Mapping[str, Any], path: str | Path, what: str = "model") -> None:
    """``module.load_state_dict(weights)``, with a one-line :class:`CheckpointError` naming
    the file and the first key that is missing, extra or of another shape."""
    own = module.state_dict()
    missing, extra = sorted(own.keys() - weights.keys()), sorted(weights.keys() - own.keys())
    if missing or extra:
        parts = [f"missing {missing[:3]}" if missing else "", f"unexpected {extra[:3]}" if extra else ""]
        raise CheckpointError(path, f"{what} weights do not match the config: {', '.join(p for p in parts if p)}")
    for key, value in weights.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise CheckpointError(
                path,
                f"{what} weights do not match the config: {key} has shape {tuple(value.shape)} in the "
                f"checkpoint but {tuple(own[key].shape)} in the {what} built from the config",
            )
    module.load_state_dict(weights)


def final_weights(state: Mapping[str, Any], ema: bool = True) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``(model, objective)`` state dicts of a checkpoint: the EMA's for the modules the
    stage averaged when ``ema`` and there is an EMA, the raw ones otherwise."""
    model, objective = dict(state["model"]), state.get("objective")
    objective = dict(objective) if objective is not None else None
    if ema and state.get("ema") is not None:
        for key, value in state["ema"]["shadow"].items():
            head, _, rest = key.partition(".")
            if head == "model":
                model[rest] = value
            elif head == "objective" and objective is not None:
                objective[rest] = value
    return model, objective


def restore_final(
    path: str | Path, model: nn.Module, objective: nn.Module | None = None, ema: bool = True, map_location: Any = "cpu"
) -> int:
    """Load a checkpoint's final weights (EMA when ``ema`` and present) into ``model`` and
    ``objective`` (when it has state); returns the checkpoint's step."""
    state = load(path, map_location=map_location)
    weights, obj = final_weights(state, ema=ema)
    load_weights(model, weights, path, "model")
    if objective is not None and obj is not None:
        load_weights(objective, obj, path, "objective")
    return int(state["step"])
