#!/usr/bin/env python
"""Training and decode throughput on a GPU (a step of ``benchmarks/gpu_check.py``).

    python benchmarks/gpu_throughput.py train  --out train.json    # ~100M parameters, Triton vs SDPA
    python benchmarks/gpu_throughput.py decode --out decode.json   # batch 1 and 64, eager / compiled / CUDA graphs
    python benchmarks/gpu_throughput.py train --tiny               # CPU: a tiny model, the same code path

``train``: a GPT-2-small-sized model (d 768, 12 layers, 12 heads, vocab 32768: about 110M
parameters with tied embeddings), batch 8 x L 1024, bf16 autocast, AdamW, gradient
clipping; rows: set diffusion (set-causal two-stream, 2L tokens per row), MDM
(bidirectional) and a plain causal step (``is_causal`` SDPA, the baseline), each
set-diffusion and MDM row with the Triton kernels and with dense-mask SDPA. Tokens/s
counts the data tokens (batch x L), as a user compares them.

``decode``: the same model in bf16, L 512 with a 16-token prompt, sliding window W 8 with
one token per step (SetDLM's setting), exact KV cache, greedy; batch 1 and 64, eager,
``torch.compile`` and ``torch.compile(mode="reduce-overhead")`` (CUDA graphs); every
variant must decode the same tokens as eager (checked, reported).

Each row: median of ``--rounds`` timed calls after a warm-up call (compilation and
autotuning happen there), with ``torch.cuda.synchronize`` around every timed call.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import orderlab
from orderlab.builder import build
from orderlab.decoding import decode
from orderlab.kernels import use_backend
from setups import CausalLM  # benchmarks/setups.py, beside this script

SIZES = {  # name: (model keywords, batch, length)
    "100M": (dict(vocab_size=32768, d_model=768, n_layers=12, n_heads=12), 8, 1024),
    "tiny": (dict(vocab_size=64, d_model=64, n_layers=2, n_heads=2), 2, 32),
}
TRAIN_ROWS = {  # label: (attention rule, objective, backend)
    "set diffusion, Triton": ("set_causal", {"name": "set_nll", "process": {"name": "staggered", "d": 2}}, "triton"),
    "set diffusion, SDPA": ("set_causal", {"name": "set_nll", "process": {"name": "staggered", "d": 2}}, "sdpa"),
    "MDM, Triton": ("bidirectional", {"name": "mdm_nelbo", "process": {"name": "linear"}}, "triton"),
    "MDM, SDPA": ("bidirectional", {"name": "mdm_nelbo", "process": {"name": "linear"}}, "sdpa"),
}
DECODE_VARIANTS = {"eager": False, "compiled": True, "compiled + CUDA graphs": {"mode": "reduce-overhead"}}
PROMPT, WINDOW = 16, 8


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, rounds: int) -> tuple[float, object]:
    """Median seconds of ``rounds`` calls of ``fn`` after one warm-up call, and its last result."""
    out = fn()
    times = []
    for _ in range(rounds):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _model(kw: dict, length: int, rule, device, dtype=torch.float32):
    torch.manual_seed(0)
    return orderlab.build("model", "transformer", max_len=2 * length, attention=rule, **kw).to(device=device, dtype=dtype)


def _autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def train(size: str, device, rounds: int) -> list[dict]:
    kw, batch, length = SIZES[size]
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randint(0, kw["vocab_size"], (batch, length), device=device, generator=g)
    ranks = torch.ones(batch, length, dtype=torch.long, device=device)
    rows = []

    def step_of(model, loss_fn):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

        def step():
            opt.zero_grad(set_to_none=True)
            with _autocast(device):
                loss = loss_fn()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            return loss.detach()
        return step

    causal = CausalLM(_model(kw, length, "bidirectional", device))  # the same blocks, is_causal SDPA

    def causal_loss():
        return F.cross_entropy(causal(x[:, :-1]).flatten(0, 1).float(), x[:, 1:].flatten())

    sec, _ = timed(step_of(causal, causal_loss), device, rounds)
    rows.append(dict(row="plain causal LM, is_causal SDPA (baseline)", seconds=sec, tokens_per_s=batch * length / sec))
    params = sum(p.numel() for p in causal.parameters())
    del causal
    for label, (rule, objective, backend) in TRAIN_ROWS.items():
        model = _model(kw, length, rule, device)
        obj = build("objective", objective)
        with use_backend(backend):
            sec, _ = timed(step_of(model, lambda: obj.step(model, x, ranks, generator=g).loss), device, rounds)
        rows.append(dict(row=label, seconds=sec, tokens_per_s=batch * length / sec))
        del model
    base = rows[0]["seconds"]
    for r in rows:
        r.update(size=size, params=params, batch=batch, length=length, vs_causal=r["seconds"] / base)
    return rows


def decode_rows(size: str, device, rounds: int, batches: tuple[int, ...], variants=tuple(DECODE_VARIANTS)) -> list[dict]:
    kw, _, length = SIZES[size]
    length = min(length, 512)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = _model(kw, length, "set_causal", device, dtype).eval()
    policy = build("policy", {"name": "sliding_window", "window": WINDOW, "tau": 2.0})  # tau > 1: one token per step
    rows = []
    for batch in batches:
        g = torch.Generator(device=device).manual_seed(1)
        x = torch.randint(0, kw["vocab_size"], (batch, length), device=device, generator=g)
        r = torch.ones(batch, length, dtype=torch.long, device=device)
        r[:, :PROMPT] = 0
        gen = batch * (length - PROMPT)
        reference = None
        for label in variants:
            compile = DECODE_VARIANTS[label]
            if isinstance(compile, dict) and device.type != "cuda":
                continue  # CUDA graphs need CUDA
            with torch.no_grad():
                sec, out = timed(lambda: decode(model, policy, x, r, cache=True, compile=compile), device, rounds)
            reference = out.tokens if reference is None else reference
            rows.append(dict(row=f"batch {batch}, {label}", batch=batch, seconds=sec, tokens_per_s=gen / sec,
                             steps=int(out.nfe.float().mean()), same_tokens_as_eager=bool(torch.equal(out.tokens, reference))))
    return rows


def print_table(rows: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for col in ("row", "seconds", "tokens_per_s", *(k for k in ("vs_causal", "same_tokens_as_eager") if k in rows[0])):
        t.add_column(col)
    for r in rows:
        t.add_row(r["row"], f"{r['seconds']:.4f}", f"{r['tokens_per_s']:,.0f}",
                  *([f"{r['vs_causal']:.2f}x"] if "vs_causal" in r else []),
                  *([str(r["same_tokens_as_eager"])] if "same_tokens_as_eager" in r else []))
    Console().print(t)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["train", "decode"])
    ap.add_argument("--out", type=Path, help="JSON results file")
    ap.add_argument("--tiny", action="store_true", help="a tiny model (CPU check of the code path)")
    ap.add_argument("--rounds", type=int, default=5, help="timed calls per row (>= 1), after one warm-up call")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--variants", nargs="+", choices=list(DECODE_VARIANTS), default=list(DECODE_VARIANTS))
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = "tiny" if args.tiny else "100M"
    if device.type != "cuda" and not args.tiny:
        print("no CUDA device: run with --tiny on CPU", file=sys.stderr)
        return 2
    rows = train(size, device, args.rounds) if args.what == "train" else decode_rows(size, device, args.rounds, tuple(args.batches), args.variants)
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__}
    if args.out:
        args.out.write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    print_table(rows, f"{args.what} throughput, {size} model, {env['device']}")
    bad = [r["row"] for r in rows if r.get("same_tokens_as_eager") is False]
    if bad:
        print(f"decoded tokens differ from eager: {bad}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
