"""The training loop, one for every objective: AdamW, warmup + cosine LR, clipping, EMA,
exact resume.

The loop knows nothing about what it trains: each step it calls ``objective.step(model,
tokens, ranks, generator) -> StepOutput``, backpropagates ``loss`` and logs ``metrics``
(their ``weight``-weighted mean over the log window, e.g. bits per token weighted by
predicted tokens; reward, NFE, ... weighted by rows). Validation calls
``objective.validate`` (by default ``step``) under ``no_grad`` on the task's valid split
and logs ``valid_<metric>`` and ``valid_label``.

What is optimised: the model's parameters when ``objective.trains_model`` (else the
model is frozen for the call: ``requires_grad`` off and eval mode, so no dropout), plus
the objective's own parameters. EMA averages the same modules.

Every source of randomness is a function of ``(seed, step)``: the training batch is
``task.batch(batch_size, "train", seed=derive_seed(seed, step, "data"))`` and the
objective gets a generator seeded ``derive_seed(seed, step, "objective")``. The global
torch RNG (dropout) is seeded once at the start and saved in every checkpoint, so a run
of ``2N`` steps and a run of ``N`` steps resumed for ``N`` more give bit-identical loss
curves and metrics records on CPU.

Under ``torchrun`` (``orderlab.distributed``: a process group of ``W`` ranks) the same
loop is data-parallel. Every rank draws the global batch of step ``s`` exactly as one
process does and takes its rows ``[r·b, (r+1)·b)``, ``b = batch_size / W`` (so
``batch_size`` must divide by ``W``). The objective's generator is seeded
``derive_seed(seed, s, "objective@r/W")`` and the global RNG ``"global@r/W"``: rank ``r``'s
part of step ``s`` is a function of ``(seed, s, r, W)``, and with ``W = 1`` the streams are
the single-process ones. The model and the objective (whose parameters may train too) are
wrapped together in ``DistributedDataParallel``, which averages their gradients; rank
``r`` backpropagates ``loss_r · W · w_r / Σ w`` (``w`` = ``StepOutput.weight``), so the
averaged gradient is that of ``Σ_r w_r loss_r / Σ w``: the global batch's loss when an
objective's loss is a ``weight``-weighted mean (likelihood objectives: nats per predicted
token, weight = predicted tokens; weight 1: equal slices, a per-row mean). What is exact:
the data, the gradient of that global loss, the logged ``loss`` and ``weight``-weighted
metrics (windows are gathered from every rank before they are averaged), validation
(whole batches sharded across ranks, results merged in batch order). What is not: the
objective's random draws (its generator is per rank, so a stochastic objective's estimate
differs from one process's draw for draw but not in distribution), and quantities an
objective couples across the rows of its batch (REINFORCE's batch baseline is per slice;
an objective's buffers, e.g. its EMA baseline, are rank 0's, broadcast each step).
Rank 0 writes the files; all ranks resume from the same checkpoint, which holds every
rank's RNG state (resuming on another world size reseeds them from ``(seed, step)``).

Files (names and contents: ``orderlab.checkpoint``), in ``run_dir`` when given:
``checkpoint.pt`` every ``ckpt_every`` steps and at the end, and ``metrics.jsonl``, one
record per logged step: ``step``, the objective's metrics, ``loss`` (mean of the steps'
losses), ``lr``, ``tokens_per_s`` (non-padding input tokens per second); plus
``valid_<metric>``, ``valid_loss``, ``valid_label`` at validation steps. On failure or
Ctrl-C the last checkpoint is kept and the exception propagates; the caller's
:class:`TrainResult` (``result=``) holds the status (run.py writes ``results.json``).
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
from torch import nn

from orderlab import checkpoint as ckpt
from orderlab import distributed
from orderlab.registry import ConfigError
from orderlab.runtime import derive_seed, device_of, rank_stream

__all__ = [
    "TrainConfig",
    "TrainResult",
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
        self.lr, self.weight_decay = float(self.lr), float(self.weight_decay)
        _check_world(self)


def _check_world(cfg: TrainConfig) -> None:
    """The global batch must split evenly across the ranks of a process group."""
    w = distributed.world()
    if cfg.batch_size % w:
        raise ConfigError("train.batch_size", f"the global batch ({cfg.batch_size}) must be divisible by the number "
                                              f"of processes ({w}, torchrun's world size)")




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
    if getattr(objective, "trains_model", True):
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


# --------------------------------------------------------------------------- loop


def train(
    model: nn.Module,
    objective: nn.Module,
    task: Any,
    cfg: TrainConfig,
    run_dir: str | Path | None = None,
    *,
    resume: bool = False,
    progress: bool = True,
    name: str = "train",
    on_step: Callable[[int, dict[str, Any] | None], None] | None = None,
    extra: dict[str, Any] | None = None,
    result: TrainResult | None = None,
) -> TrainResult:
    """Train with ``objective`` on ``task`` for ``cfg.steps`` steps (see the module docstring).

    With ``resume`` and a checkpoint in ``run_dir``, continues from its step exactly
    (model, objective, optimizer, scheduler, EMA, RNG states, the unfinished log window);
    without, a stale checkpoint and metrics file there are removed first.
    ``on_step(step, record)`` is called after each step (``record``: the metrics record of
    a logged step, else ``None``). ``extra`` is stored in the checkpoint as is (e.g. the
    resolved config). ``result`` (filled in place and returned) lets a caller read the
    status, step and last checkpoint step when the call raises.
    Raises ``ValueError`` when there is nothing to train (``objective.trains_model`` is
    False and the objective has no trainable parameters).
    """
    device = device_of(model)
    files = ckpt.StageFiles(Path(run_dir)) if run_dir is not None else None
    result = result if result is not None else TrainResult()
    frozen = not getattr(objective, "trains_model", True)
    _check_world(cfg)
    with _frozen(model, frozen):
        trained = _trained(model, objective)
        params = [p for p in trained.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"nothing to train: {type(objective).__name__} has trains_model=False and no "
                             "trainable parameters of its own")
        opt = torch.optim.AdamW(_param_groups(params, cfg.weight_decay), lr=cfg.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(cfg.warmup, cfg.steps))
        ema = EMA(trained, cfg.ema) if cfg.ema is not None else None
        means, losses = WindowMeans(), WindowMeans()

        start = 0
        if resume and files is not None and files.checkpoint.exists():
            state = ckpt.load(files.checkpoint, map_location=device)
            ckpt.load_weights(model, state["model"], files.checkpoint, "model")
            if state.get("objective") is not None:
                ckpt.load_weights(objective, state["objective"], files.checkpoint, "objective")
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            if ema is not None and state.get("ema") is not None:
                ema.load_state_dict(state["ema"])
            start = int(state["step"])
            _resume_rng(state, cfg.seed, start)
            means.load_state_dict(state["window"]["metrics"])  # each rank its own part of the window
            losses.load_state_dict(state["window"]["loss"])
            ckpt.truncate_metrics(files.metrics, start)
            result.checkpoint_step = start
        else:
            torch.manual_seed(derive_seed(cfg.seed, 0, rank_stream("global")))
            random.seed(derive_seed(cfg.seed, 0, rank_stream("python")))
            if files is not None:
                files.clear()  # a fresh run: no stale checkpoint or records
        result.status, result.start_step, result.step, result.ema = "running", start, start, ema
        return _loop(model, objective, task, cfg, files, trained, opt, sched, ema, means, losses, result,
                     frozen=frozen, progress=progress, name=name, on_step=on_step, extra=extra)


def _resume_rng(state: Mapping[str, Any], seed: int, step: int) -> None:
    """This rank's RNG state from a checkpoint: its own when the checkpoint was written by
    as many ranks (one process: ``rng``), else reseeded from ``(seed, step)`` per rank."""
    per_rank, w = state.get("rng_ranks"), distributed.world()
    if per_rank is None and w == 1:
        ckpt.set_rng_state(state["rng"])
    elif per_rank is not None and len(per_rank) == w:
        ckpt.set_rng_state(per_rank[distributed.rank()])
    else:  # another world size: the data and the weights resume exactly, the per-rank streams cannot
        torch.manual_seed(derive_seed(seed, step, rank_stream("global")))
        random.seed(derive_seed(seed, step, rank_stream("python")))


class _Step(nn.Module):
    """One training step as a module: what DistributedDataParallel wraps, so that the model
    and the objective (both may own trained parameters) are one module whose gradients it
    averages. The objective still gets the plain model: it reads the model's attributes
    (``rule``, ``mask_id``, ``new_cache``) and may call it several times a step."""

    def __init__(self, model: nn.Module, objective: nn.Module):
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, tokens, ranks, generator):
        return self.objective.step(self.model, tokens, ranks, generator=generator)


def _data_parallel(model: nn.Module, objective: nn.Module, device: torch.device) -> Callable:
    """``step(tokens, ranks, generator) -> StepOutput``: the objective's step, through DDP
    under a process group. ``find_unused_parameters``: an objective need not touch every
    parameter every step (a policy's unused features, a frozen reference)."""
    if distributed.world() == 1:
        return lambda tokens, ranks, generator: objective.step(model, tokens, ranks, generator=generator)
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return DistributedDataParallel(_Step(model, objective), device_ids=ids, find_unused_parameters=True)


def _global_loss(out: Any) -> tuple[float, float]:
    """``(share, loss)``: this rank's share ``w_r / Σ w`` of the global batch (1 in one
    process; equal shares when every weight is 0) and the global loss ``Σ w_r loss_r / Σ w``."""
    loss = float(out.loss.detach())
    if distributed.world() == 1:
        return 1.0, loss
    w = float(out.weight)
    total_w, total_wl, total_l = distributed.all_sum(torch.tensor([w, w * loss, loss], dtype=torch.float64)).tolist()
    if total_w > 0:
        return w / total_w, total_wl / total_w
    return 1.0 / distributed.world(), total_l / distributed.world()


def _loop(model, objective, task, cfg, files, trained, opt, sched, ema, means, losses, result, *, frozen, progress, name,
          on_step, extra) -> TrainResult:
    device = device_of(model)
    world, rank = distributed.world(), distributed.rank()
    rows = slice(rank * cfg.batch_size // world, (rank + 1) * cfg.batch_size // world)  # this rank's part of a batch
    step_fn = _data_parallel(model, objective, device)

    def set_modes() -> None:
        model.train(not frozen)  # a frozen model runs in eval mode: no dropout
        objective.train()

    def checkpoint(step: int) -> None:
        if files is None:
            return
        state = {
            "step": step,
            "model": model.state_dict(),
            "objective": objective.state_dict() if len(objective.state_dict()) else None,
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "rng": ckpt.rng_state(),
            "window": {"metrics": means.state_dict(), "loss": losses.state_dict()},
            "extra": extra,
        }
        if world > 1:
            state["rng_ranks"] = distributed.all_gather_object(ckpt.rng_state())
        ckpt.save(files.checkpoint, state)  # rank 0 writes
        distributed.barrier()  # the file is whole before any rank goes on (and may read it)
        result.checkpoint_step = step

    def validation(step: int) -> dict[str, Any] | None:
        if cfg.valid_n == 0:
            return None
        with ema.swapped(trained) if ema is not None else contextlib.nullcontext():
            v = validate(model, objective, task, cfg.valid_n, cfg.batch_size, seed=cfg.seed, device=device)
        result.valid = {"step": step, **v}
        return v

    t_start = t_window = time.perf_counter()
    window_tokens = 0
    bar = _progress(name, progress and distributed.is_main())
    try:
        with bar:
            bar_id = bar.add_task(name, total=cfg.steps, completed=result.start_step, info="")
            set_modes()
            for step in range(result.start_step + 1, cfg.steps + 1):
                tokens, ranks = task.batch(cfg.batch_size, split="train", seed=derive_seed(cfg.seed, step, "data"))
                window_tokens += int((ranks >= 0).sum())  # the global batch's
                tokens, ranks = tokens[rows].to(device), ranks[rows].to(device)
                g = torch.Generator(device=device).manual_seed(derive_seed(cfg.seed, step, rank_stream("objective")))
                out = step_fn(tokens, ranks, g)
                share, loss = _global_loss(out)
                opt.zero_grad(set_to_none=True)
                # DDP averages gradients over ranks: rank r weighs its loss by W · share_r
                (out.loss if world == 1 else out.loss * (share * world)).backward()
                if cfg.clip is not None:
                    torch.nn.utils.clip_grad_norm_([p for grp in opt.param_groups for p in grp["params"]], cfg.clip)
                lr = opt.param_groups[0]["lr"]
                opt.step()
                sched.step()
                if ema is not None:
                    ema.update(trained)
                result.step = step
                result.losses.append(loss)
                means.update(out.metrics, out.weight)
                losses.update({"loss": float(out.loss.detach())}, share)  # the shares of a step sum to 1

                record: dict[str, Any] | None = None
                if step % cfg.log_every == 0 or step == cfg.steps:
                    dt = max(time.perf_counter() - t_window, 1e-9)
                    # the loop's own keys come last: "loss" is always the mean of StepOutput.loss
                    record = {"step": step, **means.gather().compute(), **losses.gather().compute(), "lr": lr,
                              "tokens_per_s": window_tokens / dt}
                    means.reset()
                    losses.reset()
                    window_tokens, t_window = 0, time.perf_counter()
                    bar.update(bar_id, info=_format(record))
                if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
                    v = validation(step)
                    if v is not None:
                        record = dict(record or {"step": step})
                        record.update({f"valid_{k}": x for k, x in v.items()})
                if record is not None:
                    result.last = record
                    if files is not None:
                        ckpt.append_metrics(files.metrics, record)
                if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == cfg.steps:
                    checkpoint(step)
                bar.update(bar_id, completed=step)
                if on_step is not None:
                    on_step(step, record)
    except BaseException as e:
        result.status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        result.error = f"{type(e).__name__}: {e}"
        result.wall_s = time.perf_counter() - t_start
        raise
    result.status = "completed"
    result.wall_s = time.perf_counter() - t_start
    return result
