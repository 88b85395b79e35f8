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

Who uses what: train.py splits the global batch and averages gradients across ranks,
checkpoint.py writes on the main rank only, evaluate.py shards test batches and gathers
the per-batch results, ablate.py shards the grid and gathers its run records.
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
    "gather_rows",
    "all_sum",
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
    sharded ablation). Load the point's config inside the block too: ``train.batch_size``
    is checked against ``world()``."""
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


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` (``[n_r, ...]``; ``n_r`` may differ, 0 included) concatenated in
    rank order on every rank (torchmetrics' padded ``gather_all_tensors``)."""
    if not active():
        return x
    from torchmetrics.utilities.distributed import gather_all_tensors

    return torch.cat(gather_all_tensors(x), dim=0)


def all_sum(x: torch.Tensor) -> torch.Tensor:
    """``Σ_ranks x`` (a new tensor; ``x`` itself in one process)."""
    if not active():
        return x
    x = x.clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x
