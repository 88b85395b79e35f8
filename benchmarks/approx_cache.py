"""CPU decode time of a bidirectional model: exact (recompute every step) vs Fast-dLLM's
approximate prefix and dual caches (orderlab/approx_cache.py), at a few lengths.

    python benchmarks/approx_cache.py                 # the table in docs/benchmarks.md
    python benchmarks/approx_cache.py --lengths 96   # quick

Same model, same inputs, one run: the time ratios are against the exact decode of the
same length. The model is untrained (random weights, scaled so predictions are peaked);
the policy is LLaDA's semi-AR (blocks of ``--block``, ``--per-step`` tokens per step), so
every cache takes the same number of steps and the ratios are the cost of a step. The
approximate caches change the tokens (they are approximate): the last column is the
fraction of generated tokens equal to the exact decode's.
"""

from __future__ import annotations

import argparse

import torch

import orderlab
from rich.console import Console
from rich.table import Table

from orderlab.approx_cache import ApproximateCache
from orderlab.builder import build
from orderlab.decoding import decode
from decode import run  # benchmarks/decode.py: the best of reps wall time of one decode

CACHES = {"exact (recompute)": False, "prefix": ApproximateCache(suffix=False), "dual": ApproximateCache(suffix=True)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[96, 160, 288])  # canvases of 2, 4, 8 blocks
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--per-step", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=1)
    args = ap.parse_args(argv)
    V = 256
    policy = {"name": "semi_ar", "block_size": args.block, "steps": args.block // args.per_step}
    torch.manual_seed(0)
    model = orderlab.build("model", "transformer", vocab_size=V, max_len=max(args.lengths), attention="bidirectional",
                           d_model=128, n_layers=4, n_heads=4).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    warm = torch.zeros(args.batch, min(args.lengths), dtype=torch.long)
    for cache in CACHES.values():  # one-time costs (allocator, first kernels) out of the timings
        decode(model, build("policy", policy), warm, torch.ones_like(warm), cache=cache)
    table = Table(title=f"bidirectional decode on CPU ({torch.get_num_threads()} threads), batch {args.batch}, "
                        f"prompt {args.prompt}, semi_ar block {args.block}, {args.per_step} tokens/step, "
                        f"{model.num_params() / 1e6:.1f}M params, torch {torch.__version__}")
    for col in ("L", "cache", "NFE", "refreshes", "time (s)", "vs exact", "tokens = exact"):
        table.add_column(col, justify="left" if col == "cache" else "right")
    for L in args.lengths:
        x = torch.randint(0, V, (args.batch, L))
        r = torch.ones(args.batch, L, dtype=torch.long)
        r[:, : args.prompt] = 0
        rows = {name: run(model, policy, x, r, cache, args.reps) for name, cache in CACHES.items()}
        t0, exact = rows["exact (recompute)"]
        for name, (t, out) in rows.items():
            agree = float((out.tokens == exact.tokens)[r >= 1].float().mean())
            refreshes = "-" if out.refreshes is None else f"{out.refreshes.float().mean():.0f}"
            table.add_row(str(L), name, f"{out.nfe.float().mean():.0f}", refreshes, f"{t:.2f}", f"{t0 / t:.2f}x",
                          f"{agree:.1%}")
    Console().print(table)


if __name__ == "__main__":
    main()
