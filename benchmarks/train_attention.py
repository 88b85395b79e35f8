"""How much of the set-causal training step's attention an SDPA call could skip on CPU.

    python benchmarks/train_attention.py --threads 1

The issue-22 training step (``vs_setdlm.training``: 16 x 256 tokens, the 3.2M-parameter
set-causal model, ``set_nll`` with the staggered process) runs one attention per layer over
the two-stream layout ``[clean | query]``, 512 queries against 512 keys, of which about a
quarter are visible (both streams in reveal order: close to block-triangular). This script
records the first layer's ``q, k, v`` and mask from a real ``Trainer.train_step`` and times
forward + backward of:

- ``full``: one SDPA call with the boolean mask (every score computed);
- ``split``: what ``RankMask.attend`` does (clean queries skip the query stream's keys);
- ``tiles c``: an upper bound on tile skipping with SDPA, as an experiment (not in the
  library): queries in chunks of ``c``, each against only the key tiles of ``c`` that some
  query of the chunk sees (contiguous runs sliced and concatenated);
- ``unmasked`` and ``is_causal``: the same shapes without a mask and with SDPA's own causal
  flag, to show whether the CPU kernel skips masked-out work at all.

Every variant's output and gradients are checked against ``full``. Prints a table:
milliseconds per call, the fraction of scores computed, and the speed-up over ``split``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_setdlm import SIZE, VOCAB, orderlab_model  # noqa: E402

from orderlab.builder import build  # noqa: E402
from orderlab.kernels.attention import RankMask  # noqa: E402
from orderlab.train import Trainer, TrainConfig  # noqa: E402

LAYERS = SIZE["n_layers"]


def record(length: int, batch: int) -> tuple[dict, RankMask, callable]:
    """``q, k, v`` and the ``RankMask`` of the first attention call of one training step,
    and the step itself (to time the whole of it)."""
    seen: dict = {}
    attend = RankMask.attend

    def spy(self, q, k, v):
        if not seen:
            seen.update(q=q.detach().clone(), k=k.detach().clone(), v=v.detach().clone(), vis=self)
        return attend(self, q, k, v)

    RankMask.attend = spy
    try:
        model = orderlab_model(length).train()
        obj = build("objective", {"name": "set_nll", "process": {"name": "staggered", "d": 2}})
        trainer = Trainer(model, obj, TrainConfig(steps=1, batch_size=batch, lr=1e-3, warmup=0, clip=1.0))
        trainer.train_mode()
        x = torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(0))
        trainer.train_step(x, torch.ones_like(x), 0)
    finally:
        RankMask.attend = attend
    return {k: seen[k] for k in "qkv"}, seen["vis"], lambda: trainer.train_step(x, torch.ones_like(x), 1)


def tile_plan(mask: torch.Tensor, c: int) -> list[tuple[int, int, list[tuple[int, int]], torch.Tensor]]:
    """Per chunk of ``c`` queries: its key runs (tiles of ``c`` some query of it sees) and the mask sliced to them."""
    _, _, Lq, Lk = mask.shape
    nq, nk = -(-Lq // c), -(-Lk // c)
    seen = F.pad(mask.any(0)[0], (0, nk * c - Lk, 0, nq * c - Lq)).view(nq, c, nk, c).any(3).any(1)  # [nq, nk]
    plan = []
    for i in range(nq):
        runs: list[list[int]] = []
        for j in seen[i].nonzero().flatten().tolist():
            if runs and runs[-1][1] == j * c:
                runs[-1][1] = min((j + 1) * c, Lk)
            else:
                runs.append([j * c, min((j + 1) * c, Lk)])
        keys = torch.cat([torch.arange(a, b) for a, b in runs])
        plan.append((i * c, min((i + 1) * c, Lq), [tuple(r) for r in runs], mask[:, :, i * c : (i + 1) * c, keys].contiguous()))
    return plan


def tiled(q, k, v, plan):
    out = []
    for qs, qe, runs, sub in plan:
        kk = torch.cat([k[:, :, a:b] for a, b in runs], 2)
        vv = torch.cat([v[:, :, a:b] for a, b in runs], 2)
        out.append(F.scaled_dot_product_attention(q[:, :, qs:qe], kk, vv, attn_mask=sub))
    return torch.cat(out, 2)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t, vis, train_step = record(args.length, args.batch)
    q, k, v, mask = t["q"], t["k"], t["v"], vis.mask
    Lq, Lk = mask.shape[-2:]
    s, e = vis.split
    variants = {"full": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), 1.0),
                "split (RankMask.attend)": (vis.attend, (s * e + (Lq - s) * Lk) / (Lq * Lk)),
                "unmasked": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v), None),
                "is_causal": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), None)}
    for c in (32, 64, 128):
        plan = tile_plan(mask, c)
        work = sum((qe - qs) * sum(b - a for a, b in runs) for qs, qe, runs, _ in plan) / (Lq * Lk)
        variants[f"tiles {c}"] = ((lambda plan: lambda q, k, v: tiled(q, k, v, plan))(plan), work)
    grad_out = torch.randn_like(q)

    def fwd_bwd(fn):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = fn(*leaves)
        out.backward(grad_out)
        return out.detach(), [x.grad for x in leaves]

    ref_out, ref_grads = fwd_bwd(variants["full"][0])
    for name, (fn, work) in variants.items():
        if work is None:
            continue  # other semantics: timed only
        out, grads = fwd_bwd(fn)
        torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4, msg=f"{name}: output differs")
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3, msg=f"{name}: gradient differs")
    times = {name: [] for name in variants}
    steps = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        train_step()
        steps.append(time.perf_counter() - t0)
        for name, (fn, _) in variants.items():
            t0 = time.perf_counter()
            fwd_bwd(fn)
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["split (RankMask.attend)"])
    visible = mask.float().mean().item()
    table = Table(title=f"training attention, one layer: {args.batch} x {q.shape[1]} heads x {Lq} x {Lk}, D {q.shape[-1]}, "
                        f"fp32, forward + backward, {args.threads} thread(s), medians of {args.reps}; visible {visible:.3f}")
    for col in ("variant", "ms", "scores computed", "split / this"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for name, (_, work) in variants.items():
        ms = statistics.median(times[name])
        table.add_row(name, f"{ms * 1e3:.1f}", "" if work is None else f"{work:.3f}", f"{base / ms:.2f}x")
    console = Console(width=160)
    console.print(table)
    step = statistics.median(steps)
    best = min(statistics.median(times[n]) for n in variants if n.startswith("tiles"))
    console.print(f"whole training step {step * 1e3:.0f} ms; the split attention x {LAYERS} layers is "
                  f"{LAYERS * base / step:.0%} of it; the best tiling would save {LAYERS * (base - best) / step:.1%} of the step")


if __name__ == "__main__":
    main()
