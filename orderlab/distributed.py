"""Data-parallel helpers: the process group torchrun describes, or none.

``torchrun --nproc_per_node=N -m orderlab.run X.yaml`` starts N processes with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in their environment;
:func:`session` turns that into a process group (gloo for CPU tensors, NCCL for CUDA
tensors when a GPU is present, each process on GPU ``LOCAL_RANK``) and tears it down at
the end. Without those variables nothing is initialised and every helper answers as for
one process (``rank() == 0``, ``world() == 1``, ``shard(xs) == list(xs)``, collectives
are identities), so single-process code paths never change.

:func:`solo` makes a process act alone inside a group (``world() == 1`` there): the
ablation runner deals its (grid point, seed) runs to the ranks with :func:`shard` and
measures each in one process.

Who uses what: train.py's trainer runs its steps through :class:`DataParallelStep`
(this rank's rows of the global batch, DistributedDataParallel, the weighted global
loss), checkpoint.py writes on the main rank only, evaluate.py shards test batches and
gathers the per-batch results, ablate.py shards the grid and gathers its run records.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "launched",
    "init_from_env",
    "session",
    "solo",
    "active",
    "rank",
    "world",
    "local_rank",
    "is_main",
    "shard",
    "barrier",
    "all_gather_object",
    "all_sum",
    "any_rank",
    "describe",
    "DataParallelStep",
]

T = TypeVar("T")

_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_solo = 0  # depth of nested solo() blocks


def launched() -> bool:
    """Whether this process was started by torchrun (its environment names a group)."""
    return all(k in os.environ for k in _ENV)


def local_rank() -> int:
    """This process's index on its node (``LOCAL_RANK``; 0 without torchrun)."""
    return int(os.environ.get("LOCAL_RANK", 0))


def init_from_env(timeout_s: float = 1800.0) -> bool:
    """Initialise the default process group from torchrun's environment variables.

    Returns True when a group was created by this call, False when there is nothing to
    do (not launched by torchrun, a world of 1, or a group that already exists). With
    CUDA present the backend is ``cpu:gloo,cuda:nccl`` (CPU tensors, e.g. gathered
    metrics and objects, go through gloo, CUDA gradients through NCCL) and this process
    uses GPU ``LOCAL_RANK`` (so ``run.device: cuda`` / ``auto`` means that GPU).
    """
    if not launched() or int(os.environ["WORLD_SIZE"]) <= 1 or dist.is_initialized():
        return False
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True


@contextlib.contextmanager
def session() -> Iterator[None]:
    """``init_from_env()`` on entry; on exit, the group this call created is destroyed.
    Nested or single-process use is a no-op; also a decorator (``@session()``).

    A normal exit waits at a barrier, then collects garbage, then destroys the group: a
    group destroyed while a peer's last collective or a DDP wrapper's gloo work is still
    alive aborts the process at interpreter exit ("terminate called without an active
    exception", about one run in five on 2 CPU cores). No barrier on an exception: a rank
    that stops early (Ctrl-C, an error) must not wait for ranks that are inside another
    collective; torchrun ends the others when one fails."""
    created = init_from_env()
    try:
        yield
        if created:
            dist.barrier()  # every rank got here: nothing is in flight
    finally:
        if created and dist.is_initialized():
            gc.collect()  # DDP wrappers left in reference cycles hold the group's threads
            dist.destroy_process_group()


@contextlib.contextmanager
def solo() -> Iterator[None]:
    """Inside the block this process acts alone: ``world() == 1``, ``rank() == 0``,
    collectives are identities, files are written (a grid point trained by one rank of a
    sharded ablation). ``train`` checks ``train.batch_size`` against ``world()`` when it
    starts, so a point trained inside the block may have any batch size."""
    global _solo
    _solo += 1
    try:
        yield
    finally:
        _solo -= 1


def active() -> bool:
    """Whether there is a process group this process takes part in (and not in ``solo``)."""
    return _solo == 0 and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 (always True in one process): the one that writes files and prints."""
    return rank() == 0


def shard(items: Sequence[T] | range) -> list[T]:
    """This rank's share of ``items``: every ``world()``-th item from ``rank()`` on
    (round-robin, so the shares differ in length by at most one)."""
    return list(items)[rank() :: world()]


def barrier() -> None:
    if active():
        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` in one process).
    For small picklable objects (metric records, RNG states), not for tensors of data."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def all_sum(x: torch.Tensor) -> torch.Tensor:
    """``Σ_ranks x`` (a new tensor; ``x`` itself in one process)."""
    if not active():
        return x
    x = x.clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` holds on some rank (a collective; ``flag`` in one process): a
    decision every rank must take alike, e.g. to stop training."""
    if not active():
        return flag
    return bool(all_sum(torch.tensor([float(flag)], dtype=torch.float64)).item() > 0)


def describe() -> dict[str, Any]:
    """What a run records of its process group (``results.json``'s ``distributed``):
    ``{"world_size": W, "backend": "gloo" | "nccl" | "cpu:gloo,cuda:nccl" | None}``, the
    backend None in one process (no group). Inside :func:`solo` the group still counts:
    this describes how the process was launched, not how one grid point was measured."""
    if not (dist.is_available() and dist.is_initialized()):
        return {"world_size": 1, "backend": None}
    return {"world_size": dist.get_world_size(), "backend": str(dist.get_backend())}


class _Step(nn.Module):
    """One training step as a module: what DistributedDataParallel wraps, so that the model
    and the objective (both may own trained parameters) are one module whose gradients it
    averages. The objective still gets the plain model: it reads the model's attributes
    (``rule``, ``mask_id``, ``new_cache``) and may call it several times a step."""

    def __init__(self, model: nn.Module, objective: nn.Module):
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, tokens: Tensor, ranks: Tensor, generator: torch.Generator) -> Any:
        return self.objective.step(self.model, tokens, ranks, generator=generator)


class DataParallelStep:
    """The data-parallel mechanics of a training step; in one process, the plain step.

    Rank ``r`` of ``W`` takes rows ``[r·b, (r+1)·b)`` of the global batch (``b =
    batch_size / W``; :meth:`rows`), runs ``objective.step(model, ...)`` through
    ``DistributedDataParallel`` (model and objective wrapped together, so the gradients of
    both are averaged; ``find_unused_parameters``: an objective need not touch every
    parameter every step), and backpropagates ``loss_r · W · w_r / Σ w`` (:meth:`backward`,
    ``w`` the step's ``weight``): the averaged gradient is that of the global loss
    ``Σ_r w_r loss_r / Σ w`` (:meth:`global_loss`).
    """

    def __init__(self, model: nn.Module, objective: nn.Module, batch_size: int, device: torch.device):
        w, r = world(), rank()
        self.rows = slice(r * batch_size // w, (r + 1) * batch_size // w)  # this rank's part of a batch
        self.device = device
        self.module: nn.Module = _Step(model, objective)
        if w > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
            self.module = DistributedDataParallel(self.module, device_ids=ids, find_unused_parameters=True)

    def __call__(self, tokens: Tensor, ranks: Tensor, generator: torch.Generator) -> Any:
        """``objective.step`` on this rank's rows of the global batch ``tokens, ranks``
        (moved to the device)."""
        return self.module(tokens[self.rows].to(self.device), ranks[self.rows].to(self.device), generator)

    @staticmethod
    def global_loss(loss: Tensor, weight: float) -> tuple[float, float]:
        """``(share, loss)``: this rank's share ``w_r / Σ w`` of the global batch (1 in one
        process; equal shares when every weight is 0) and the global loss ``Σ w_r loss_r / Σ w``
        (a collective)."""
        value = float(loss.detach())
        if world() == 1:
            return 1.0, value
        w = float(weight)
        total_w, total_wl, total_l = all_sum(torch.tensor([w, w * value, value], dtype=torch.float64)).tolist()
        if total_w > 0:
            return w / total_w, total_wl / total_w
        return 1.0 / world(), total_l / world()

    @staticmethod
    def backward(loss: Tensor, share: float) -> None:
        """Backpropagate this rank's part: DDP averages gradients over ranks, so rank ``r``
        weighs its loss by ``W · share_r``."""
        (loss if world() == 1 else loss * (share * world())).backward()
