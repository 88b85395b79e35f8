"""Operators per eager decode step and per training step: a count that the host's load does not blur.

    python benchmarks/step_ops.py                  # the issue-22 model, batch 1 and 32 (~1 min)
    python benchmarks/step_ops.py --top 20         # and the 20 most frequent operators

On a contended CPU an eager step is bound by per-operator cost (dispatch, allocation,
a thread pool wake-up: ~4-60 us each here), so the number of top-level ATen operators a
step dispatches is the figure that changes when ops are fused or dropped; wall times move
by 2-3x with the other jobs on the machine. Counted with ``torch.profiler`` (top-level
events only: an operator's own children are not counted), per decode step of
``decode(model, sliding_window(8), ...)`` on the issue-22 model (``vs_setdlm``'s:
4 layers, d 256, a 16-token prompt, one token per step; ``--length`` positions) and per
``Trainer.train_step`` (set_nll, staggered process, batch 4 x ``--length``, as ``vs_setdlm``'s).
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_setdlm import inputs, orderlab_model, window  # noqa: E402

from orderlab.decoding import decode  # noqa: E402


def count(fn) -> tuple[collections.Counter, int]:
    """Top-level operator counts of one call of ``fn`` (after a warm-up call), and the number
    of all operator events (children included: a composite such as ``rms_norm`` is one
    top-level operator but dispatches about twenty)."""
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as p:
        fn()
    events = p.events()
    return collections.Counter(e.name for e in events if e.cpu_parent is None), len(events)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--top", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model = orderlab_model(args.length)
    rows = []
    for batch in (1, 32):
        x, r = inputs(batch, args.length)
        steps = []
        ops, every = count(lambda: steps.append(decode(model, window(2.0), x, r).steps))
        rows.append((f"decode step, batch {batch}", ops, every, steps[-1]))
    from orderlab.builder import build
    from orderlab.train import TrainConfig, Trainer

    objective = build("objective", {"name": "set_nll", "process": {"name": "staggered", "d": 2}})
    trainer = Trainer(orderlab_model(args.length).train(), objective,
                      TrainConfig(steps=10_000, batch_size=4, lr=1e-3, warmup=0, clip=1.0))
    trainer.train_mode()
    x = torch.randint(0, 64, (4, args.length), generator=torch.Generator().manual_seed(0))
    step = iter(range(10**9))
    ops, every = count(lambda: trainer.train_step(x, torch.ones_like(x), next(step)))
    rows.append(("training step, batch 4", ops, every, 1))
    print("| step | top-level ops per step | all op events per step |\n|---|---|---|")
    for name, ops, every, n in rows:
        print(f"| {name} | {sum(ops.values()) / n:.0f} | {every / n:.0f} |")
    for name, ops, _, n in rows if args.top else ():
        print(f"\n{name}: " + ", ".join(f"{k.removeprefix('aten::')} {v / n:.0f}" for k, v in ops.most_common(args.top)))


if __name__ == "__main__":
    main()
