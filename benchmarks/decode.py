"""CPU decode throughput: cached vs uncached set-causal decoding, batch 32 vs batch 1.

    python benchmarks/decode.py                 # L = 256, the table in docs/benchmarks.md
    python benchmarks/decode.py --length 64 --reps 1   # quick

Same model, same inputs, same outputs (asserted): the ratios are measured in one run.
The model is untrained (random weights, scaled up so that its predictions are peaked and
greedy argmax ties, which float rounding could flip between the two paths, do not
occur): throughput does not depend on the weights, except through how many tokens a
confidence policy reveals per step, so the policies used here reveal a fixed number per
step (l2r: 1; `random` with K per step).
"""

from __future__ import annotations

import argparse
import time

import torch

import orderlab
from rich.console import Console
from rich.table import Table

from orderlab.decoding import decode
from orderlab.builder import build


def run(model, policy_spec, x, r, cache, reps):
    best, out = float("inf"), None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = decode(model, build("policy", policy_spec), x, r, cache=cache)
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    L, V = args.length, 256
    model = orderlab.build("model", "transformer", vocab_size=V, max_len=L, attention="set_causal", d_model=256, n_layers=4, n_heads=4).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)
    x = torch.randint(0, V, (args.batch, L))
    r = torch.ones(args.batch, L, dtype=torch.long)
    r[:, : args.prompt] = 0
    gen = L - args.prompt
    policies = {"l2r (1 token/step)": "l2r", "random (4 tokens/step)": {"name": "random", "steps": gen // 4}}
    table = Table(title=f"set-causal decode on CPU ({torch.get_num_threads()} threads), L={L}, "
                        f"{model.num_params() / 1e6:.1f}M params, torch {torch.__version__}")
    for col in ("policy", "batch", "cache", "steps", "time (s)", "tokens/s", "vs uncached", "vs batch 1"):
        table.add_column(col, justify="right" if col not in ("policy", "cache") else "left")
    for name, spec in policies.items():
        rows = {}
        for B in (1, args.batch):
            for cache in (False, True):
                t, out = run(model, spec, x[:B], r[:B], cache, args.reps)
                rows[B, cache] = (t, out, B * gen / t)
            a, b = rows[B, True][1], rows[B, False][1]
            same = (a.tokens == b.tokens).float().mean().item()
            assert same == 1.0 and torch.equal(a.nfe, b.nfe), f"cache changed the output ({same:.2%} tokens equal)"
        for B in (1, args.batch):
            for cache in (False, True):
                t, out, tps = rows[B, cache]
                table.add_row(name, str(B), "yes" if cache else "no", str(out.steps), f"{t:.2f}", f"{tps:,.0f}",
                              f"{tps / rows[B, False][2]:.2f}x", f"{tps / rows[1, cache][2]:.2f}x")
    Console().print(table)


if __name__ == "__main__":
    main()
