"""The training loop: AdamW, warmup + cosine LR, clipping, EMA, exact resume.

Every source of randomness is a function of ``(seed, step)``: the training batch is
``task.batch(batch_size, "train", seed=derive_seed(seed, step, "data"))`` and the
objective samples its orders with a generator seeded ``derive_seed(seed, step,
"objective")``. The global torch RNG (dropout) is seeded once at the start and saved in
every checkpoint, so a run of ``2N`` steps and a run of ``N`` steps resumed for ``N``
more give bit-identical loss curves on CPU.

Files written in ``run_dir`` (all optional, ``run_dir=None`` writes nothing):

- ``checkpoint.pt`` every ``ckpt_every`` steps and at the end, atomically (tmp + replace);
- ``metrics.jsonl``: one JSON object per logged step (``step, loss, bits_per_token, lr,
  tokens_per_s``; plus ``valid_bits_per_token, valid_label`` at validation steps);
- ``results.json`` when the run is interrupted or fails (status, last metrics), before
  the exception is re-raised; a completed run's results are the caller's (run.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from orderlab.registry import ConfigError

__all__ = [
    "TrainConfig",
    "TrainResult",
    "EMA",
    "WarmupCosine",
    "derive_seed",
    "train",
    "validate",
    "save_checkpoint",
    "load_checkpoint",
    "CHECKPOINT",
    "METRICS",
    "RESULTS",
]

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
RESULTS = "results.json"
LN2 = math.log(2.0)


@dataclass
class TrainConfig:
    """The ``train:`` section of an experiment; the keys are these fields."""

    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.0
    clip: float | None = 1.0  # max gradient norm; null: no clipping
    ema: float | None = None  # EMA decay of the weights (e.g. 0.999); null: no EMA
    seed: int = 0
    log_every: int = 25
    eval_every: int = 250  # 0: validate only at the end
    valid_n: int = 256  # validation examples (task's "valid" split)
    ckpt_every: int = 250  # 0: checkpoint only at the end
    resume: bool = False

    def __post_init__(self) -> None:
        def need(ok: bool, key: str, what: str) -> None:
            if not ok:
                raise ConfigError(f"train.{key}", f"must be {what}, got {getattr(self, key)!r}")

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


def derive_seed(seed: int, step: int, stream: str) -> int:
    """A 62-bit seed from ``(seed, step, stream)``: independent streams per step and use.

    A hash (not ``seed * k + step``) so that nearby seeds never share streams.
    """
    digest = hashlib.blake2b(f"{seed}:{step}:{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


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


@dataclass
class TrainResult:
    """What a call of :func:`train` did. ``losses`` holds the loss of every step it ran."""

    status: str
    start_step: int
    step: int
    losses: list[float] = field(default_factory=list)
    last: dict[str, Any] | None = None  # last logged metrics record
    valid: dict[str, Any] | None = None  # last validation
    wall_s: float = 0.0
    ema: EMA | None = None

    def summary(self) -> dict[str, Any]:
        """A JSON-ready summary (no tensors)."""
        return {
            "status": self.status,
            "start_step": self.start_step,
            "step": self.step,
            "final_loss": self.losses[-1] if self.losses else None,
            "last": self.last,
            "valid": self.valid,
            "wall_s": round(self.wall_s, 3),
            "ema": self.ema is not None,
        }


# --------------------------------------------------------------------------- files


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """``torch.save`` to a temporary file, then ``os.replace``: never a half-written file."""
    path = Path(path)
    _atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (plain containers and tensors)."""
    return torch.load(path, map_location=map_location, weights_only=True)


def _write_json(path: Path, obj: Any) -> None:
    from orderlab.report import write_json

    write_json(path, obj)


def _append_metrics(path: Path, record: dict[str, Any]) -> None:
    from orderlab.report import append_jsonl

    append_jsonl(path, record)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records past ``step`` (written after the checkpoint a resume starts from)."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    keep = [ln for ln in lines if json.loads(ln).get("step", 0) <= step]
    if len(keep) != len(lines):
        _atomic_write(path, lambda tmp: tmp.write_text("".join(ln + "\n" for ln in keep)))


# --------------------------------------------------------------------------- loop


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _param_groups(modules: list[nn.Module], weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only (not biases, norms, ...): the nanoGPT/GPT-2 rule."""
    seen: set[int] = set()
    decay, no_decay = [], []
    for m in modules:
        for p in m.parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def _stateful(obj: Any) -> bool:
    return isinstance(obj, nn.Module) and len(obj.state_dict()) > 0


@torch.no_grad()
def validate(
    model: nn.Module,
    objective: Any,
    task: Any,
    n: int,
    batch_size: int,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """The objective on the task's valid split: bits per predicted token.

    The label is ``"nll"`` when every ``LossOutput.exact`` is true (an exact NLL of the
    sampled orders) and ``"nelbo (bound)"`` otherwise. The orders are sampled with a
    generator seeded from ``seed`` alone, so validations at different steps compare.
    """
    device = torch.device(device) if device is not None else _device_of(model)
    was_training = model.training
    model.eval()
    nats = tokens_sum = 0.0
    exact = True
    try:
        for i, start in enumerate(range(0, n, batch_size)):
            m = min(batch_size, n - start)
            tokens, ranks = task.batch(m, split="valid", seed=derive_seed(seed, i, "valid-data"))
            g = torch.Generator(device=device).manual_seed(derive_seed(seed, i, "valid-objective"))
            out = objective(model, tokens.to(device), ranks.to(device), generator=g)
            nats += float(out.nats.sum())
            tokens_sum += float(out.tokens.sum())
            exact = exact and bool(out.exact)
    finally:
        model.train(was_training)
    bpt = nats / max(tokens_sum, 1.0) / LN2
    return {"bits_per_token": bpt, "label": "nll" if exact else "nelbo (bound)", "tokens": tokens_sum}


def _device_of(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[tps]} tok/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
    )


def train(
    model: nn.Module,
    objective: Any,
    task: Any,
    cfg: TrainConfig,
    run_dir: str | Path | None = None,
    *,
    progress: bool = True,
    on_step: Callable[[int, dict[str, Any] | None], None] | None = None,
    extra: dict[str, Any] | None = None,
) -> TrainResult:
    """Train ``model`` with ``objective`` on ``task`` for ``cfg.steps`` steps.

    With ``cfg.resume`` and a checkpoint in ``run_dir``, continues from its step exactly
    (model, optimizer, scheduler, EMA, RNG states). ``on_step(step, record)`` is called
    after each step (``record``: the metrics record of a logged step, else ``None``).
    ``extra`` is stored in the checkpoint as is (e.g. the resolved config).
    On ``KeyboardInterrupt`` or an exception, ``results.json`` records the status and
    the last metrics, the last checkpoint is kept, and the exception is re-raised.
    """
    device = _device_of(model)
    run_dir = Path(run_dir) if run_dir is not None else None
    ckpt_path = run_dir / CHECKPOINT if run_dir else None
    metrics_path = run_dir / METRICS if run_dir else None
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)

    modules = [model] + ([objective] if isinstance(objective, nn.Module) else [])
    opt = torch.optim.AdamW(_param_groups(modules, cfg.weight_decay), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(cfg.warmup, cfg.steps))
    ema = EMA(model, cfg.ema) if cfg.ema is not None else None

    start = 0
    if cfg.resume and ckpt_path is not None and ckpt_path.exists():
        state = load_checkpoint(ckpt_path, map_location=device)
        model.load_state_dict(state["model"])
        if state.get("objective") is not None and _stateful(objective):
            objective.load_state_dict(state["objective"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        _set_rng_state(state["rng"])
        start = int(state["step"])
        _truncate_metrics(metrics_path, start)
    else:
        torch.manual_seed(derive_seed(cfg.seed, 0, "global"))
        random.seed(derive_seed(cfg.seed, 0, "python"))
        if metrics_path is not None and metrics_path.exists():
            metrics_path.unlink()  # a fresh run: no stale records

    result = TrainResult(status="running", start_step=start, step=start, ema=ema)
    last_ckpt = start if start > 0 else None

    def checkpoint(step: int) -> None:
        nonlocal last_ckpt
        if ckpt_path is None:
            return
        save_checkpoint(
            ckpt_path,
            {
                "step": step,
                "model": model.state_dict(),
                "objective": objective.state_dict() if _stateful(objective) else None,
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "ema": ema.state_dict() if ema is not None else None,
                "rng": _rng_state(),
                "extra": extra,
            },
        )
        last_ckpt = step

    def run_validation(step: int) -> dict[str, Any] | None:
        if cfg.valid_n == 0:
            return None
        ctx = ema.swapped(model) if ema is not None else contextlib.nullcontext()
        with ctx:
            v = validate(model, objective, task, cfg.valid_n, cfg.batch_size, seed=cfg.seed, device=device)
        result.valid = {"step": step, **v}
        return v

    t_start = time.perf_counter()
    window_loss: list[Tensor] = []
    window_nats: list[Tensor] = []
    window_tokens: list[Tensor] = []
    t_window = time.perf_counter()
    bar = _progress(progress)
    try:
        with bar:
            task_id = bar.add_task("train", total=cfg.steps, completed=start, loss="-", tps="-")
            model.train()
            for step in range(start + 1, cfg.steps + 1):
                tokens, ranks = task.batch(cfg.batch_size, split="train", seed=derive_seed(cfg.seed, step, "data"))
                tokens, ranks = tokens.to(device), ranks.to(device)
                g = torch.Generator(device=device).manual_seed(derive_seed(cfg.seed, step, "objective"))
                out = objective(model, tokens, ranks, generator=g)
                opt.zero_grad(set_to_none=True)
                out.loss.backward()
                if cfg.clip is not None:
                    torch.nn.utils.clip_grad_norm_([p for grp in opt.param_groups for p in grp["params"]], cfg.clip)
                lr = opt.param_groups[0]["lr"]
                opt.step()
                sched.step()
                if ema is not None:
                    ema.update(model)
                result.step = step
                window_loss.append(out.loss.detach())
                window_nats.append(out.nats.detach().sum())
                window_tokens.append(out.tokens.detach().sum())

                record: dict[str, Any] | None = None
                if step % cfg.log_every == 0 or step == cfg.steps:
                    losses = torch.stack(window_loss).double().cpu().tolist()
                    result.losses.extend(losses)
                    ntok = float(torch.stack(window_tokens).sum())
                    nats = float(torch.stack(window_nats).sum())
                    dt = max(time.perf_counter() - t_window, 1e-9)
                    record = {
                        "step": step,
                        "loss": sum(losses) / len(losses),
                        "bits_per_token": nats / max(ntok, 1.0) / LN2,
                        "lr": lr,
                        "tokens_per_s": ntok / dt,
                    }
                    window_loss, window_nats, window_tokens = [], [], []
                    t_window = time.perf_counter()
                    bar.update(task_id, loss=f"{record['loss']:.4f}", tps=f"{record['tokens_per_s']:.0f}")
                if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
                    v = run_validation(step)
                    if v is not None:
                        record = dict(record or {"step": step})
                        record.update(valid_bits_per_token=v["bits_per_token"], valid_label=v["label"])
                if record is not None:
                    result.last = record
                    if metrics_path is not None:
                        _append_metrics(metrics_path, record)
                if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == cfg.steps:
                    checkpoint(step)
                bar.update(task_id, completed=step)
                if on_step is not None:
                    on_step(step, record)
    except BaseException as e:
        if window_loss:  # losses of steps not yet logged
            result.losses.extend(torch.stack(window_loss).double().cpu().tolist())
        result.status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        result.wall_s = time.perf_counter() - t_start
        if run_dir is not None:
            summary = result.summary()
            summary.update(error=f"{type(e).__name__}: {e}", checkpoint_step=last_ckpt)
            _write_json(run_dir / RESULTS, {"status": result.status, "train": summary})
        raise
    result.status = "completed"
    result.wall_s = time.perf_counter() - t_start
    return result

