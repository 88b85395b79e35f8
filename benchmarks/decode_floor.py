"""What a decode step of the issue-22 model costs at the least: its linear layers and its
attention over the cache, timed alone at the step's shapes, beside the whole step.

    python benchmarks/decode_floor.py                 # ~3 min on 2 CPU cores
    python benchmarks/decode_floor.py --threads 1 --batch 1,32

The model is ``vs_setdlm.py``'s (4 layers, d 256, 4 heads, vocab 64, L 256, a 16-token
prompt, 240 new tokens, one token per step from a window of 8, exact cache). A cached step
reads ``w = 9`` tokens per row (the token revealed last step and the 8 window queries).
Rows of the table, per step, medians of ``--reps`` alternated rounds:

- ``linear layers``: the step's 17 matmuls (q/k/v, output projection, two MLP layers per
  layer, the tied head) on ``[B * w, d]`` inputs, with the model's own weights;
- ``attention``: 4 SDPA calls of ``w`` queries over the mean cache prefix a decode reads
  (``(prompt + L) / 2 + w`` keys) with a boolean mask;
- ``floor``: their sum, the step if everything else (embedding, norms, RoPE, GELU, the
  cache writes, the stream, the policy, Python) were free;
- ``eager`` / ``compiled``: the whole step, ``orderlab.decode`` over 240 steps divided by
  240 (``compile=True``: one static graph per step, see ``orderlab/decoding.py``).

The ratios say how much of a step is above the floor, which bounds what fusing small ops
can gain: a step can never get faster than its floor without doing less arithmetic or
reading less memory.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_setdlm import PROMPT, WINDOW, alternate, inputs, orderlab_model, window  # noqa: E402

from orderlab.decoding import decode  # noqa: E402


def linears(model) -> list[torch.Tensor]:
    """The weights of one forward's matmuls, in forward order (head last)."""
    ws = []
    for block in model.blocks:
        ws += [block.attn.qkv.weight, block.attn.proj.weight, block.mlp[0].weight, block.mlp[2].weight]
    return ws + [model.head_weight()]


def parts(model, batch: int, length: int) -> dict[str, callable]:
    """The step's linear layers alone and its attention alone, at the step's shapes."""
    c, w = model.config, WINDOW + 1
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch * w, c.d_model, generator=g)
    hidden = torch.randn(batch * w, c.hidden, generator=g)
    inputs_of = {c.d_model: x, c.hidden: hidden}
    ws = linears(model)
    keys = (PROMPT + length) // 2 + w
    H, D = c.n_heads, c.head_size
    q = torch.randn(batch, H, w, D, generator=g)
    k, v = torch.randn(batch, H, keys, D, generator=g), torch.randn(batch, H, keys, D, generator=g)
    mask = torch.ones(batch, 1, w, keys, dtype=torch.bool)
    mask[..., keys - w:] = torch.eye(w, dtype=torch.bool)  # queries see the cache and themselves

    def lin():
        for wt in ws:
            F.linear(inputs_of[wt.shape[1]], wt)

    def att():
        for _ in range(c.n_layers):
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    return {"linear layers": lin, "attention": att}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--batch", default="1,32", help="comma-separated batch sizes")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    if args.threads:
        torch.set_num_threads(args.threads)
    L, new = args.length, args.length - PROMPT
    model = orderlab_model(L)
    load0 = os.getloadavg()
    table = Table(title=f"decode step of the issue-22 model vs its floor, ms per step ({torch.get_num_threads()} threads, "
                        f"torch {torch.__version__}, medians of {args.reps} alternated rounds; load average "
                        f"{load0[0]:.2f} at start)")
    for col in ("batch", "linear layers", "attention", "floor", "eager", "compiled", "eager / floor",
                "compiled / floor", "floor tokens/s", "compiled tokens/s"):
        table.add_column(col, justify="right")
    for B in map(int, args.batch.split(",")):
        x, r = inputs(B, L)
        steps = {}

        def run(compile, B=B, x=x, r=r):
            d = decode(model, window(2.0), x, r, compile=compile)
            steps[compile] = d.steps

        fns = {**parts(model, B, L), "eager": lambda: run(False), "compiled": lambda: run(True)}
        with torch.no_grad():
            for fn in fns.values():  # warm-up (the compiled step compiles here)
                fn()
            t = {k: statistics.median(v) for k, v in alternate(fns, args.reps).items()}
        ms = {"linear layers": 1e3 * t["linear layers"], "attention": 1e3 * t["attention"],
              "eager": 1e3 * t["eager"] / steps[False], "compiled": 1e3 * t["compiled"] / steps[True]}
        floor = ms["linear layers"] + ms["attention"]
        table.add_row(str(B), f"{ms['linear layers']:.2f}", f"{ms['attention']:.2f}", f"{floor:.2f}",
                      f"{ms['eager']:.2f}", f"{ms['compiled']:.2f}", f"{ms['eager'] / floor:.2f}x",
                      f"{ms['compiled'] / floor:.2f}x", f"{B * 1e3 / floor:,.0f}", f"{B * 1e3 / ms['compiled']:,.0f}")
    Console().print(table)


if __name__ == "__main__":
    main()
