"""The training loop, one for every objective: AdamW, warmup + cosine LR, clipping, EMA,
exact resume, a stop at the first non-finite step.

A :class:`Trainer` holds everything a stage's training is: model, objective, optimizer,
scheduler, EMA, the unfinished log windows, the step and the count of skipped steps.
Its ``state_dict()`` *is* the checkpoint (``orderlab.checkpoint`` documents the format)
and ``load_state_dict`` resumes it. :func:`train` is the short loop around it: batch,
step, log, validate, checkpoint.

The trainer knows nothing about what it trains: each step it calls ``objective.step(model,
tokens, ranks, generator) -> StepOutput``, backpropagates ``loss`` and logs ``metrics``
(their ``weight``-weighted mean over the log window, e.g. bits per token weighted by
predicted tokens; reward, NFE, ... weighted by rows) beside its own ``loss`` and
``grad_norm``. Validation calls ``objective.validate`` (by default ``step``) under
``no_grad`` on the task's valid split and logs ``valid_<metric>`` and ``valid_label``.
What an objective promises (``trains_model``, ``policy``, ``nan_metrics``) is stated in
``objectives.base.Objective``.

What is optimised: the model's parameters when ``objective.trains_model`` (else the
model is frozen for the call: ``requires_grad`` off and eval mode, so no dropout), plus
the objective's own parameters. EMA averages the same modules.

Non-finite steps. Before the optimizer step the trainer checks the global loss, the total
gradient norm (computed every step, clipping or not) and the step's metrics (except the
NaNs an objective declares in ``nan_metrics``). A non-finite one raises
:class:`NonFiniteError` naming the stage, step and quantity, with no weight changed; a
checkpoint with a non-finite weight is never written, so the last checkpoint is the last
finite one. With ``skip_nonfinite = N`` the first ``N`` such steps are skipped instead (no
optimizer or EMA update; the batch and its slot in the LR schedule are used up) and
counted (``skipped`` in the metrics records, the checkpoint and :class:`TrainResult`); the
``N+1``-th raises (as large-scale trainers skip a few bad batches before giving up).

Training cost. The trainer counts what its steps cost (:class:`Cost`: seconds of the
training loop without validation and checkpoint writes, denoiser forward calls and row
forwards, i.e. the rows of every call summed: one decode step of a batch of 128 rollouts
is 128) in its ``cost``, saved in the checkpoint and continued on resume, so a stage's
checkpoint holds what the whole stage cost (``TrainResult.summary()["cost"]``; the
comparison runner, ``orderlab.ablate``, reads it per learned method).

Every source of randomness is a function of ``(seed, step)``: the training batch is
``task.batch(batch_size, "train", seed=derive_seed(seed, step, "data"))`` and the
objective gets a generator seeded ``derive_seed(seed, step, "objective")``. The global
torch RNG (dropout) is seeded once at the start and saved in every checkpoint, so a run
of ``2N`` steps and a run of ``N`` steps resumed for ``N`` more give bit-identical loss
curves and metrics records on CPU.

Under ``torchrun`` (``orderlab.distributed``: a process group of ``W`` ranks) the same
loop is data-parallel through ``distributed.DataParallelStep``. Every rank draws the
global batch of step ``s`` exactly as one process does and takes its rows ``[r·b,
(r+1)·b)``, ``b = batch_size / W`` (so ``batch_size`` must divide by ``W``: a
``ConfigError`` when training starts). The objective's generator is seeded
``derive_seed(seed, s, "objective@r/W")`` and the global RNG ``"global@r/W"``: rank
``r``'s part of step ``s`` is a function of ``(seed, s, r, W)``, and with ``W = 1`` the
streams are the single-process ones. The model and the objective are wrapped together in
``DistributedDataParallel``, which averages their gradients; rank ``r`` backpropagates
``loss_r · W · w_r / Σ w`` (``w`` = ``StepOutput.weight``), so the averaged gradient is
that of ``Σ_r w_r loss_r / Σ w``: the global batch's loss when an objective's loss is a
``weight``-weighted mean (likelihood objectives: nats per predicted token, weight =
predicted tokens; weight 1: equal slices, a per-row mean). What is exact: the data, the
gradient of that global loss, the logged ``loss`` and ``weight``-weighted metrics (windows
are gathered from every rank before they are averaged), validation (whole batches sharded
across ranks, results merged in batch order), the non-finite checks (every rank takes the
same decision). What is not: the objective's random draws (its generator is per rank, so
a stochastic objective's estimate differs from one process's draw for draw but not in
distribution), and quantities an objective couples across the rows of its batch
(REINFORCE's batch baseline is per slice; an objective's buffers, e.g. its EMA baseline,
are rank 0's, broadcast each step). Rank 0 writes the files; all ranks resume from the
same checkpoint, which holds every rank's RNG state (resuming on another world size
reseeds them from ``(seed, step)``).

Files (names and contents: ``orderlab.checkpoint``), in ``run_dir`` when given:
``checkpoint.pt`` every ``ckpt_every`` steps and at the end (the one before it kept as
``checkpoint.prev.pt``), and ``metrics.jsonl``, one record per logged step: ``step``, the
objective's metrics, ``loss`` (mean of the steps' losses), ``grad_norm`` (mean total
gradient norm, before clipping), ``lr``, ``tokens_per_s`` (non-padding input tokens per
second), ``skipped`` (when ``skip_nonfinite > 0``); plus ``valid_<metric>``,
``valid_loss``, ``valid_label`` at validation steps. On failure or Ctrl-C the last
checkpoint is kept and the exception propagates; the caller's :class:`TrainResult`
(``result=``) holds the status (run.py writes ``results.json``).
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

from orderlab import checkpoint as ckpt
from orderlab import distributed
from orderlab.objectives.base import Objective
from orderlab.registry import ConfigError
from orderlab.runtime import derive_seed, device_of, rank_stream

__all__ = [
    "TrainConfig",
    "TrainResult",
    "Cost",
    "Trainer",
    "NonFiniteError",
    "EMA",
    "WarmupCosine",
    "WindowMeans",
    "train",
    "validate",
]


@dataclass
class TrainConfig:
    """The ``train:`` section of a stage; the keys are these fields."""

    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.0
    clip: float | None = 1.0  # max gradient norm; null: no clipping
    ema: float | None = None  # EMA decay of the trained weights (e.g. 0.999); null: no EMA
    seed: int = 0
    log_every: int = 25
    eval_every: int = 250  # 0: validate only at the end
    valid_n: int = 256  # validation examples (task's "valid" split); 0: no validation
    ckpt_every: int = 250  # 0: checkpoint only at the end
    skip_nonfinite: int = 0  # non-finite steps skipped (and counted) before training stops; 0: stop at the first

    def __post_init__(self) -> None:
        def need(ok: bool, key: str, what: str) -> None:
            if not ok:
                raise ConfigError(key, f"must be {what}, got {getattr(self, key)!r}")

        need(self.steps >= 0, "steps", ">= 0")
        need(self.batch_size >= 1, "batch_size", ">= 1")
        need(self.lr > 0, "lr", "> 0")
        need(self.warmup >= 0, "warmup", ">= 0")
        need(self.weight_decay >= 0, "weight_decay", ">= 0")
        need(self.clip is None or self.clip > 0, "clip", "> 0 or null")
        need(self.ema is None or 0.0 < self.ema < 1.0, "ema", "in (0, 1) or null")
        need(self.seed >= 0, "seed", ">= 0")
        need(self.log_every >= 1, "log_every", ">= 1")
        need(self.eval_every >= 0, "eval_every", ">= 0")
        need(self.valid_n >= 0, "valid_n", ">= 0")
        need(self.ckpt_every >= 0, "ckpt_every", ">= 0")
        need(self.skip_nonfinite >= 0, "skip_nonfinite", ">= 0")
        self.lr, self.weight_decay = float(self.lr), float(self.weight_decay)


def _check_world(cfg: TrainConfig, stage: str | None) -> None:
    """The global batch must split evenly across the ranks of a process group. Checked when
    training starts, not when a YAML is loaded: loading asks no process group."""
    w = distributed.world()
    if cfg.batch_size % w:
        key = f"stages.{stage}.train.batch_size" if stage else "train.batch_size"
        raise ConfigError(key, f"the global batch ({cfg.batch_size}) must be divisible by the number of processes "
                               f"({w}, torchrun's world size)")


class NonFiniteError(ValueError):
    """A training step's loss, gradient norm or metric, or a weight about to be saved, is
    NaN or infinite: training stops with no weight changed. The one-line message names the
    stage, the step and the quantity."""

    def __init__(self, stage: str | None, step: int, what: str, value: float, skipped: int = 0,
                 checkpoint_step: int | None = None):
        self.stage, self.step, self.what, self.value = stage, step, what, value
        where = f"stage {stage!r}, step {step}" if stage else f"step {step}"
        after = f" after {skipped} skipped non-finite steps (train.skip_nonfinite)" if skipped else ""
        kept = f"its last checkpoint (step {checkpoint_step}) is kept" if checkpoint_step is not None else \
            "no checkpoint was written"
        super().__init__(f"{where}: {what} is {value}, not finite{after}; training stopped, {kept}")


class WarmupCosine:
    """LR multiplier: linear warmup over ``warmup`` steps, then cosine decay to 0 at ``total``.

    A class, not a lambda, so that ``LambdaLR.state_dict`` saves it.
    """

    def __init__(self, warmup: int, total: int):
        self.warmup, self.total = int(warmup), int(total)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        span = max(1, self.total - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))


class EMA:
    """Exponential moving average of a module's state (Polyak averaging).

    The decay is warmed up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates (the
    TensorFlow ``ExponentialMovingAverage`` num_updates rule), so a short run's average is
    not dominated by the initial weights. Integer buffers are copied, not averaged.
    """

    def __init__(self, module: nn.Module, decay: float):
        self.decay = float(decay)
        self.updates = 0
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, v in module.state_dict().items():
            s = self.shadow[k]
            if s.dtype.is_floating_point:
                s.lerp_(v.detach(), 1.0 - d)
            else:
                s.copy_(v)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay, self.updates = float(state["decay"]), int(state["updates"])
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)

    @contextlib.contextmanager
    def swapped(self, module: nn.Module) -> Iterator[nn.Module]:
        """Within the block ``module`` holds the averaged weights; restored afterwards."""
        backup = {k: v.detach().clone() for k, v in module.state_dict().items()}
        module.load_state_dict(self.shadow)
        try:
            yield module
        finally:
            module.load_state_dict(backup)


class WindowMeans:
    """Weighted means of named scalars over a window of steps.

    One ``torchmetrics.aggregation.MeanMetric`` (float64) per name: ``update(metrics,
    weight)`` adds ``weight * value`` and ``weight``; ``compute()`` divides. A name whose
    window saw a NaN computes to NaN. The updates since the last ``reset`` are kept so that
    a checkpoint can carry an unfinished window (``state_dict``) and a resumed run logs the
    same records.

    Across ranks: :meth:`gather` is the window of every rank's updates (a collective).
    It replaces torchmetrics' own sync on ``compute`` (off here) because ranks may see
    different metric names (a NaN on one rank only) and a checkpoint must carry the whole
    window, not rank 0's part.
    """

    def __init__(self) -> None:
        self._means: dict[str, Any] = {}
        self._nan: set[str] = set()
        self._updates: list[tuple[dict[str, float], float]] = []

    def update(self, metrics: Mapping[str, float], weight: float = 1.0) -> None:
        from torchmetrics.aggregation import MeanMetric

        values = {k: float(v) for k, v in metrics.items()}
        self._updates.append((values, float(weight)))
        for name, value in values.items():
            if math.isnan(value):
                self._nan.add(name)
                continue
            if name not in self._means:
                # "ignore", not "disable": torchmetrics 1.9 drops the weights under "disable"
                self._means[name] = MeanMetric(nan_strategy="ignore", sync_on_compute=False).set_dtype(torch.float64)
            self._means[name].update(value, float(weight))

    def compute(self) -> dict[str, float]:
        out = {k: float(m.compute()) for k, m in self._means.items()}
        out.update({k: math.nan for k in self._nan})
        return out

    def reset(self) -> None:
        self._means, self._nan, self._updates = {}, set(), []

    def gather(self) -> WindowMeans:
        """Every rank's updates in one window (rank by rank; called by all ranks); ``self``
        in one process."""
        if distributed.world() == 1:
            return self
        out = WindowMeans()
        for updates in distributed.all_gather_object(self._updates):
            for values, weight in updates:
                out.update(values, weight)
        return out

    def __len__(self) -> int:
        return len(self._updates)

    def state_dict(self) -> list[list[tuple[dict[str, float], float]]]:
        """Every rank's updates, rank by rank (a collective under several processes)."""
        return [list(u) for u in distributed.all_gather_object(self._updates)]

    def load_state_dict(self, per_rank: list) -> None:
        """Each rank takes its own part of a window saved by as many processes, so the
        resumed window sums its updates in the uninterrupted order (bit-identical means);
        saved by another number of processes, rank 0 takes it all."""
        self.reset()
        if len(per_rank) == distributed.world():
            mine = per_rank[distributed.rank()]
        else:
            mine = [u for part in per_rank for u in part] if distributed.is_main() else []
        for values, weight in mine:
            self.update(values, weight)


def _label(labels: set[str | None]) -> str | None:
    """One label for a window: the objective's, or all of them when steps disagreed."""
    found = sorted(x for x in labels if x is not None)
    return " / ".join(found) if found else None


@dataclass
class Cost:
    """What a stage's training steps cost so far: ``train_s`` seconds (batch, step; not
    validation or checkpoint writes), ``calls`` denoiser forward calls and ``forwards``
    row forwards (the batch rows of every call summed: the unit of decoding's NFE times
    rows). Counted by a forward hook on the denoiser, so every objective is counted alike
    (likelihood passes, RL rollouts, a VI walk); a policy's or scheduler's own network is
    not a denoiser forward and is not counted."""

    train_s: float = 0.0
    calls: int = 0
    forwards: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {"train_s": self.train_s, "calls": self.calls, "forwards": self.forwards}

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        """Resume the counts (a checkpoint written before counting existed: zeros)."""
        state = state or {}
        self.train_s, self.calls, self.forwards = float(state.get("train_s", 0.0)), int(state.get("calls", 0)), \
            int(state.get("forwards", 0))

    @contextlib.contextmanager
    def counting(self, model: nn.Module) -> Iterator[None]:
        """Count ``model``'s forwards (calls and rows) and the seconds inside the block."""
        def hook(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            stream = args[0] if args else kwargs.get("s")
            self.calls += 1
            self.forwards += int(stream.tokens.shape[0]) if hasattr(stream, "tokens") else 0

        handle = model.register_forward_hook(hook, with_kwargs=True)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.train_s += time.perf_counter() - t0
            handle.remove()


@dataclass
class TrainResult:
    """What a call of :func:`train` did. ``losses`` holds the loss of every step it ran."""

    status: str = "running"  # running, completed, interrupted, failed
    start_step: int = 0
    step: int = 0
    checkpoint_step: int | None = None  # step of the last checkpoint written or resumed from
    losses: list[float] = field(default_factory=list)
    last: dict[str, Any] | None = None  # last logged metrics record
    valid: dict[str, Any] | None = None  # last validation: {step, <metric>..., loss, label}
    wall_s: float = 0.0
    error: str | None = None
    ema: EMA | None = None
    skipped: int = 0  # non-finite steps skipped so far (train.skip_nonfinite)
    cost: Cost | None = None  # the stage's training cost so far (also what earlier invocations spent)

    def summary(self) -> dict[str, Any]:
        """A JSON-ready summary (no tensors)."""
        out = {
            "status": self.status,
            "start_step": self.start_step,
            "step": self.step,
            "checkpoint_step": self.checkpoint_step,
            "final_loss": self.losses[-1] if self.losses else None,
            "last": self.last,
            "valid": self.valid,
            "wall_s": round(self.wall_s, 3),
            "ema": self.ema is not None,
            "skipped": self.skipped,
            "cost": None if self.cost is None else self.cost.state_dict(),
        }
        if self.error is not None:
            out["error"] = self.error
        return out


# --------------------------------------------------------------------------- pieces


def _param_groups(params: list[nn.Parameter], weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only (not biases, norms, ...): the nanoGPT/GPT-2 rule."""
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def _trained(model: nn.Module, objective: nn.Module) -> nn.ModuleDict:
    """The modules this call optimises (and averages): ``model`` when the objective
    trains it, the objective when it has trainable parameters of its own."""
    out = nn.ModuleDict()
    if objective.trains_model:
        out["model"] = model
    if any(p.requires_grad for p in objective.parameters()):
        out["objective"] = objective
    return out


@contextlib.contextmanager
def _frozen(model: nn.Module, frozen: bool) -> Iterator[None]:
    """``requires_grad`` off for the block when ``frozen``; restored afterwards."""
    flags = [p.requires_grad for p in model.parameters()]
    if frozen:
        model.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)



def _format(record: Mapping[str, Any]) -> str:
    """The progress bar's text: every metric of a record, 4 significant digits."""
    parts = [f"{k} {v:.4g}" for k, v in record.items() if k not in ("step", "lr", "tokens_per_s")
             and isinstance(v, (int, float)) and not k.startswith("valid_")]
    if "tokens_per_s" in record:
        parts.append(f"{record['tokens_per_s']:.0f} tok/s")
    return " · ".join(parts)


def _progress(name: str, enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn(f"[bold]{name}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=Console(stderr=True),
        disable=not enabled,
    )


@torch.no_grad()
def validate(
    model: nn.Module,
    objective: nn.Module,
    task: Any,
    n: int,
    batch_size: int,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """``objective.validate`` on ``n`` examples of the task's valid split, in eval mode.

    Returns the weighted means of the metrics (as in training), ``loss`` (mean over
    batches, weighted by rows) and ``label`` (the objective's, e.g. "nll" or "nelbo
    (bound)"; None when it reports none). Batches and generators are seeded from ``seed``
    alone, so validations at different steps compare.

    Under a process group (called by every rank) the batches are sharded across ranks
    (``distributed.shard``) and every rank's outputs merged in batch order: the same
    numbers as one process.
    """
    device = torch.device(device) if device is not None else device_of(model)
    modes = model.training, objective.training
    model.eval()
    objective.eval()
    outputs = []  # (batch index, metrics, weight, loss, rows, label) of this rank's batches
    try:
        for i, start in distributed.shard(list(enumerate(range(0, n, batch_size)))):
            m = min(batch_size, n - start)
            tokens, ranks = task.batch(m, split="valid", seed=derive_seed(seed, i, "valid-data"))
            g = torch.Generator(device=device).manual_seed(derive_seed(seed, i, "valid-objective"))
            out = objective.validate(model, tokens.to(device), ranks.to(device), generator=g)
            outputs.append((i, dict(out.metrics), float(out.weight), float(out.loss), m, out.label))
    finally:
        model.train(modes[0])
        objective.train(modes[1])
    means, loss, labels = WindowMeans(), WindowMeans(), set()
    merged = [o for part in distributed.all_gather_object(outputs) for o in part]
    for _, metrics, weight, value, m, label in sorted(merged, key=lambda o: o[0]):
        means.update(metrics, weight)
        loss.update({"loss": value}, m)
        labels.add(label)
    return {**means.compute(), **loss.compute(), "label": _label(labels)}


# --------------------------------------------------------------------------- trainer


def _seed_rng(seed: int, step: int) -> None:
    """This rank's global torch and Python RNGs (dropout, ...) from ``(seed, step)``."""
    torch.manual_seed(derive_seed(seed, step, rank_stream("global")))
    random.seed(derive_seed(seed, step, rank_stream("python")))


class Trainer:
    """One stage's training state, which is exactly its checkpoint: model, objective,
    AdamW, the warmup-cosine scheduler, EMA, the unfinished log windows, ``step`` (of the
    last step done) and ``skipped`` (non-finite steps skipped), plus the global RNG states.

    ``state_dict()`` is the checkpoint; ``load_state_dict(state)`` resumes it exactly;
    ``save(path)`` / ``resume(path)`` write and read it as a file (``saved_step``: the
    step of the last one, None before the first). ``train_step`` is one optimisation
    step, ``log_record`` closes a log window, ``validation`` validates (with the EMA
    weights when there is an EMA). Build it with the model frozen when the objective does
    not train it (:func:`train` does). ``stage`` names the stage in error messages.
    Raises ``ValueError`` when there is nothing to train (``objective.trains_model`` is
    False and the objective has no trainable parameters).
    """

    def __init__(self, model: nn.Module, objective: Objective, cfg: TrainConfig, stage: str | None = None,
                 extra: dict[str, Any] | None = None):
        self.model, self.objective, self.cfg, self.stage, self.extra = model, objective, cfg, stage, extra
        self.device = device_of(model)
        self.modules = _trained(model, objective)  # what is optimised and averaged
        self.params = [p for p in self.modules.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError(f"nothing to train: {type(objective).__name__} has trains_model=False and no "
                             "trainable parameters of its own")
        self.optimizer = torch.optim.AdamW(_param_groups(self.params, cfg.weight_decay), lr=cfg.lr)
        # the optimizer's order (matrices first): the gradient norm sums in it, as clip_grad_norm_ over
        # the optimizer's parameters did, so runs stay bit-identical to those of earlier versions
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, WarmupCosine(cfg.warmup, cfg.steps))
        self.ema = EMA(self.modules, cfg.ema) if cfg.ema is not None else None
        self.metrics, self.losses = WindowMeans(), WindowMeans()  # the objective's metrics; the loop's own
        self.step, self.skipped, self.lr = 0, 0, cfg.lr
        self.cost = Cost()  # seconds and denoiser forwards of the steps so far (checkpointed)
        self.saved_step: int | None = None
        self.parallel = distributed.DataParallelStep(model, objective, cfg.batch_size, self.device)

    # -- the checkpoint
    def state_dict(self) -> dict[str, Any]:
        """The checkpoint (a collective under a process group: windows and RNG states are
        gathered from every rank). :class:`NonFiniteError` instead of a state with a
        non-finite weight."""
        for key, value in self.modules.state_dict().items():
            bad = ~torch.isfinite(value) if value.is_floating_point() else None
            if bad is not None and bool(bad.any()):
                raise NonFiniteError(self.stage, self.step, f"weight {key!r}", float(value[bad].flatten()[0]),
                                     checkpoint_step=self.saved_step)
        state = {
            "step": self.step,
            "model": self.model.state_dict(),
            "objective": self.objective.state_dict() or None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "rng": ckpt.rng_state(),
            "window": {"metrics": self.metrics.state_dict(), "loss": self.losses.state_dict()},
            "skipped": self.skipped,
            "cost": self.cost.state_dict(),
            "extra": self.extra,
        }
        if distributed.world() > 1:
            state["rng_ranks"] = distributed.all_gather_object(ckpt.rng_state())
        return state

    def load_state_dict(self, state: Mapping[str, Any], path: str | Path = "checkpoint") -> None:
        """Resume from a checkpoint (``path`` names it in errors about weights that do not fit)."""
        ckpt.load_weights(self.model, state["model"], path, "model")
        if state.get("objective") is not None:
            ckpt.load_weights(self.objective, state["objective"], path, "objective")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self.step, self.skipped = int(state["step"]), int(state.get("skipped", 0))
        self.cost.load_state_dict(state.get("cost"))
        self.metrics.load_state_dict(state["window"]["metrics"])  # each rank its own part of the window
        self.losses.load_state_dict(state["window"]["loss"])
        # this rank's RNG state: its own when the checkpoint was written by as many ranks
        # (one process: "rng"); on another world size the data and the weights resume
        # exactly, the per-rank streams cannot: reseeded from (seed, step)
        per_rank, w = state.get("rng_ranks"), distributed.world()
        if per_rank is None and w == 1:
            ckpt.set_rng_state(state["rng"])
        elif per_rank is not None and len(per_rank) == w:
            ckpt.set_rng_state(per_rank[distributed.rank()])
        else:
            _seed_rng(self.cfg.seed, self.step)

    def save(self, path: Path) -> None:
        """Write the checkpoint (rank 0; every rank calls it and waits until the file is whole)."""
        ckpt.save(path, self.state_dict())
        distributed.barrier()  # no rank goes on (and may read the file) before it is written
        self.saved_step = self.step

    def resume(self, path: Path) -> None:
        """Continue from the checkpoint file ``path`` (its previous one when it is unreadable)."""
        self.load_state_dict(ckpt.load(path, map_location=self.device), path)
        self.saved_step = self.step

    # -- training
    def train_mode(self) -> None:
        self.model.train(self.objective.trains_model)  # a frozen model runs in eval mode: no dropout
        self.objective.train()

    def train_step(self, tokens: Tensor, ranks: Tensor, step: int) -> float:
        """Step ``step`` on the global batch ``tokens, ranks`` (this rank takes its rows);
        returns the global loss. A non-finite step changes no weight: it is skipped and
        counted, or past ``cfg.skip_nonfinite`` skipped steps raises :class:`NonFiniteError`."""
        g = torch.Generator(device=self.device).manual_seed(derive_seed(self.cfg.seed, step, rank_stream("objective")))
        out = self.parallel(tokens, ranks, g)
        share, loss = self.parallel.global_loss(out.loss, out.weight)
        self.optimizer.zero_grad(set_to_none=True)
        self.parallel.backward(out.loss, share)  # also for a non-finite loss: DDP expects every backward
        norm = get_total_norm([p.grad for p in self.params if p.grad is not None])  # before clipping
        self.lr = self.optimizer.param_groups[0]["lr"]
        fault = self._fault(loss, float(norm), out.metrics)
        if fault is None:
            if self.cfg.clip is not None:
                clip_grads_with_norm_(self.params, self.cfg.clip, norm)
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update(self.modules)
            self.metrics.update(out.metrics, out.weight)
            self.losses.update({"loss": float(out.loss.detach()), "grad_norm": float(norm)}, share)  # shares sum to 1
        else:
            if self.skipped >= self.cfg.skip_nonfinite:
                raise NonFiniteError(self.stage, step, *fault, skipped=self.skipped, checkpoint_step=self.saved_step)
            self.skipped += 1
            self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step = step
        return loss

    def _fault(self, loss: float, norm: float, metrics: Mapping[str, float]) -> tuple[str, float] | None:
        """``(what, value)`` of the step's first non-finite quantity, or None. Every rank
        finds the same: the loss and the gradient norm are global, a metric's fault is
        shared (its name found on whichever rank has it)."""
        if not math.isfinite(loss):
            return "loss", loss
        if not math.isfinite(norm):
            return "gradient norm", norm
        allowed = self.objective.nan_metrics
        mine = next(((f"metric {k!r}", float(v)) for k, v in metrics.items()
                     if not math.isfinite(v) and not (math.isnan(v) and k in allowed)), None)
        if distributed.any_rank(mine is not None):
            return next(f for f in distributed.all_gather_object(mine) if f is not None)
        return None

    def log_record(self, tokens_per_s: float) -> dict[str, Any]:
        """The metrics record closing the current log window (every rank's steps), which
        starts a new one. The loop's own keys come last: ``loss`` is always the mean of
        ``StepOutput.loss``."""
        record = {"step": self.step, **self.metrics.gather().compute(), **self.losses.gather().compute(),
                  "lr": self.lr, "tokens_per_s": tokens_per_s}
        if self.cfg.skip_nonfinite:
            record["skipped"] = self.skipped
        self.metrics.reset()
        self.losses.reset()
        return record

    def validation(self, task: Any) -> dict[str, Any]:
        """:func:`validate` on ``cfg.valid_n`` examples, with the EMA weights when there is an EMA."""
        with self.ema.swapped(self.modules) if self.ema is not None else contextlib.nullcontext():
            return validate(self.model, self.objective, task, self.cfg.valid_n, self.cfg.batch_size, seed=self.cfg.seed,
                            device=self.device)


# --------------------------------------------------------------------------- loop


def train(
    model: nn.Module,
    objective: Objective,
    task: Any,
    cfg: TrainConfig,
    run_dir: str | Path | None = None,
    *,
    resume: bool = False,
    progress: bool = True,
    name: str | None = None,
    on_step: Callable[[int, dict[str, Any] | None], None] | None = None,
    extra: dict[str, Any] | None = None,
    result: TrainResult | None = None,
) -> TrainResult:
    """Train with ``objective`` on ``task`` for ``cfg.steps`` steps (see the module docstring).

    With ``resume`` and a checkpoint in ``run_dir``, continues from its step exactly (a
    :class:`Trainer`'s whole state; an unreadable latest checkpoint falls back to the
    previous one, ``orderlab.checkpoint.load``); without, stale checkpoints and metrics
    there are removed first. ``name``: the stage (progress bar, error messages, the
    ``stages.<name>.train`` key of a batch that does not split across processes).
    ``on_step(step, record)`` is called after each step (``record``: the metrics record
    of a logged step, else ``None``). ``extra`` is stored in the checkpoint as is (e.g. the
    resolved config). ``result`` (filled in place and returned) lets a caller read the
    status, step and last checkpoint step when the call raises (:class:`NonFiniteError`
    at the first non-finite step past ``cfg.skip_nonfinite``; ``ValueError`` when there
    is nothing to train).
    """
    result = result if result is not None else TrainResult()
    _check_world(cfg, name)
    files = ckpt.StageFiles(Path(run_dir)) if run_dir is not None else None
    with _frozen(model, not objective.trains_model):
        trainer = Trainer(model, objective, cfg, stage=name, extra=extra)
        if resume and files is not None and (files.checkpoint.exists() or files.previous.exists()):
            trainer.resume(files.checkpoint)
            ckpt.truncate_metrics(files.metrics, trainer.step)
            result.checkpoint_step = trainer.step
        else:
            _seed_rng(cfg.seed, 0)
            if files is not None:
                files.clear()  # a fresh run: no stale checkpoint or records
        result.status, result.start_step, result.step = "running", trainer.step, trainer.step
        result.ema, result.skipped, result.cost = trainer.ema, trainer.skipped, trainer.cost
        t_start = time.perf_counter()
        try:
            _loop(trainer, task, files, result, progress and distributed.is_main(), on_step)
        except BaseException as e:
            result.status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
            result.error = f"{type(e).__name__}: {e}"
            raise
        finally:
            result.wall_s = time.perf_counter() - t_start
    result.status = "completed"
    return result


def _loop(trainer: Trainer, task: Any, files: ckpt.StageFiles | None, result: TrainResult, progress: bool,
          on_step: Callable[[int, dict[str, Any] | None], None] | None) -> None:
    """Batch, step, log, validate, checkpoint: nanoGPT's loop, the state in ``trainer``."""
    cfg = trainer.cfg
    window_tokens, t_window = 0, time.perf_counter()
    with _progress(trainer.stage or "train", progress) as bar:
        bar_id = bar.add_task("", total=cfg.steps, completed=trainer.step, info="")
        trainer.train_mode()
        for step in range(trainer.step + 1, cfg.steps + 1):
            with trainer.cost.counting(trainer.model):
                tokens, ranks = task.batch(cfg.batch_size, split="train", seed=derive_seed(cfg.seed, step, "data"))
                window_tokens += int((ranks >= 0).sum())  # the global batch's
                result.losses.append(trainer.train_step(tokens, ranks, step))
            result.step, result.skipped = step, trainer.skipped
            last = step == cfg.steps

            record: dict[str, Any] | None = None
            if step % cfg.log_every == 0 or last:
                record = trainer.log_record(window_tokens / max(time.perf_counter() - t_window, 1e-9))
                window_tokens, t_window = 0, time.perf_counter()
                bar.update(bar_id, info=_format(record))
            if cfg.valid_n and ((cfg.eval_every and step % cfg.eval_every == 0) or last):
                valid = trainer.validation(task)
                result.valid = {"step": step, **valid}
                record = {**(record or {"step": step}), **{f"valid_{k}": v for k, v in valid.items()}}
            if record is not None:
                result.last = record
                if files is not None:
                    ckpt.append_metrics(files.metrics, record)
            if files is not None and ((cfg.ckpt_every and step % cfg.ckpt_every == 0) or last):
                trainer.save(files.checkpoint)
                result.checkpoint_step = step
            bar.update(bar_id, completed=step)
            if on_step is not None:
                on_step(step, record)
