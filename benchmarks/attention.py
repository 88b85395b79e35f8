#!/usr/bin/env python
"""Benchmark rank-masked attention (orderlab.kernels) against FlexAttention and SDPA.

    python benchmarks/attention.py                  # full table, needs a CUDA GPU
    python benchmarks/attention.py -L 1024 -D 64    # a subset
    python benchmarks/attention.py --dry-run        # CPU, tiny sizes, reference kernel: checks the plumbing

Mask: the set-causal two-stream pattern (DESIGN.md section 4) in reveal order, L tokens in
all ([clean stream; query stream], L/2 positions, sets of 1-3 tokens). FLOPs are counted over
*visible* (query, key) pairs only: 4 * D per pair forward (QK^T and PV), 2.5x that backward
(FlashAttention-2's convention: fwd+bwd = 3.5x fwd). Batch * L = 16k tokens, H * D = 1024.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from orderlab.kernels import set_attention_reference, set_attention_triton, tile_stats, visible

NEVER = 2**30


# ------------------------------------------------------------------- masks and counting


def two_stream_masks(B: int, L: int, seed: int = 0, device: str | torch.device = "cpu"):
    """(q_rank, k_rank, q_group, k_group), each Long[B, L]: L/2 clean tokens in reveal order
    (ranks 1, 1, 2, 3, 3, 3, ...: sets of 1-3), then the L/2 queries for the same positions."""
    n = L // 2
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 4, (n,), generator=gen)
    ranks = torch.repeat_interleave(torch.arange(1, n + 1), sizes)[:n].expand(B, n)  # [B, n]
    g = torch.arange(n).expand(B, n)
    neg = torch.full((B, n), -1)
    q_rank = torch.cat([ranks + 1, ranks], 1)  # clean token of rank r sees ranks <= r
    k_rank = torch.cat([ranks, torch.full((B, n), NEVER)], 1)  # query tokens are never keys ...
    q_group = torch.cat([neg, g], 1)
    k_group = torch.cat([neg, g], 1)  # ... except for themselves (their own group)
    return tuple(t.contiguous().to(device) for t in (q_rank, k_rank, q_group, k_group))


def visible_pairs(masks, k_len: torch.Tensor | None = None) -> int:
    """Number of visible (query, key) pairs summed over the batch (one head)."""
    vis = visible(*masks)  # [B, Lq, Lk]
    if k_len is not None:
        vis = vis & (torch.arange(vis.shape[-1], device=vis.device)[None, None] < k_len[:, None, None])
    return int(vis.sum())


def attention_flops(visible: int, D: int, backward: bool) -> float:
    """FLOPs of one head over ``visible`` pairs: forward 2 matmuls x 2 flops x D per pair;
    with ``backward`` the forward+backward total (3.5x forward)."""
    fwd = 4 * visible * D
    return 3.5 * fwd if backward else fwd


def make_mask_mod(q_rank, k_rank, q_group, k_group):
    """FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` of the same rule (attention-gym style)."""

    def mask_mod(b, h, q_idx, kv_idx):
        by_rank = k_rank[b, kv_idx] < q_rank[b, q_idx]
        qg = q_group[b, q_idx]
        return by_rank | ((qg >= 0) & (k_group[b, kv_idx] == qg))

    return mask_mod


# ---------------------------------------------------------------------------- timing


def _bench(fn, grad_to_none=None) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none)


def _pass_fn(attn, q, k, v, do, backward: bool):
    if not backward:
        return lambda: attn(q, k, v)
    return lambda: attn(q, k, v).backward(do)


def run_attention(L: int, D: int, dtype=torch.bfloat16, device="cuda", tokens: int = 16384, width: int = 1024):
    """Rows for one (L, D): forward and forward+backward, ours vs flex vs SDPA."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, H = max(1, tokens // L), max(1, width // D)
    masks = two_stream_masks(B, L, device=device)
    vis = visible(*masks)  # [B, L, L]
    pairs = visible_pairs(masks) * H
    stats = tile_stats(*masks)
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, device=device, dtype=dtype, generator=gen).requires_grad_() for _ in range(3))
    do = torch.randn(B, H, L, D, device=device, dtype=dtype, generator=gen)

    block_mask = create_block_mask(make_mask_mod(*masks), B, None, L, L, device=device)
    flex = torch.compile(flex_attention)
    dense = vis[:, None]  # [B, 1, L, L]

    def ours(q, k, v):
        return set_attention_triton(q, k, v, *masks)

    def flex_fn(q, k, v):
        return flex(q, k, v, block_mask=block_mask)

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=dense)

    def flash(q, k, v):  # no mask at all: FlashAttention over every pair, the unmasked ceiling
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v)

    with torch.no_grad():  # rows that see some key must agree with FlexAttention
        has = vis.any(-1)[:, None, :, None]
        err = (ours(q, k, v).float() - flex_fn(q, k, v).float()).masked_fill(~has, 0).abs().max().item()
    rows = []
    for backward in (False, True):
        t = {name: _bench(_pass_fn(fn, q, k, v, do, backward), grad_to_none=[q, k, v])
             for name, fn in (("ours", ours), ("flex", flex_fn), ("sdpa", sdpa), ("flash", flash))}
        tflops = attention_flops(pairs, D, backward) / (t["ours"] * 1e-3) / 1e12
        rows.append(dict(L=L, D=D, B=B, H=H, pass_="fwd+bwd" if backward else "fwd", skip=stats["skip_fraction"], ms=t["ours"], tflops=tflops,
                         flex=t["flex"], sdpa=t["sdpa"], flash=t["flash"], err=err))
    return rows


def run_decode(L: int, D: int, dtype=torch.bfloat16, device="cuda", batch: int = 16, width: int = 1024, step: int = 16):
    """``step`` queries per row against a cache of L tokens: ours (k_len, ragged-capable)
    vs SDPA on a contiguous cache of the same length."""
    import torch.nn.functional as F

    B, H = batch, max(1, width // D)
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, H, step, D, device=device, dtype=dtype, generator=gen)
    ck, cv = (torch.randn(B, H, L, D, device=device, dtype=dtype, generator=gen) for _ in range(2))
    k_rank = torch.arange(1, L + 1, device=device).expand(B, L).contiguous()
    q_rank = torch.full((B, step), L + 1, device=device)
    full = torch.full((B,), L, device=device)
    ragged = torch.linspace(L // 2, L, B, device=device).long()
    t_ours = _bench(lambda: set_attention_triton(q, ck, cv, q_rank, k_rank, k_len=full))
    t_ragged = _bench(lambda: set_attention_triton(q, ck, cv, q_rank, k_rank, k_len=ragged))
    t_sdpa = _bench(lambda: F.scaled_dot_product_attention(q, ck, cv))
    return dict(L=L, D=D, B=B, H=H, ours=t_ours, ragged=t_ragged, sdpa=t_sdpa)


# ----------------------------------------------------------------------------- driver


def dry_run(L: int = 64, D: int = 32) -> None:
    """CPU plumbing check: masks, counts, tile stats, BlockMask rule, reference kernel."""
    from rich.console import Console
    from rich.table import Table

    masks = two_stream_masks(1, L)
    vis = visible(*masks)[0]
    mod = make_mask_mod(*masks)
    i = torch.arange(L)[:, None].expand(L, L)
    j = torch.arange(L)[None, :].expand(L, L)
    zero = torch.zeros((), dtype=torch.long)
    assert torch.equal(mod(zero, zero, i, j), vis), "mask_mod disagrees with the kernels' rule"
    q, k, v = (torch.randn(1, 2, L, D) for _ in range(3))
    o = set_attention_reference(q, k, v, *masks)
    stats = tile_stats(*masks, block_m=16, block_n=16)
    table = Table(title=f"Dry run (CPU, reference kernel, L={L}, D={D})")
    for col in ("visible pairs", "fwd GFLOP", "fwd+bwd GFLOP", "tiles skipped (16x16)", "output finite"):
        table.add_column(col)
    pairs = visible_pairs(masks) * 2
    table.add_row(str(pairs), f"{attention_flops(pairs, D, False) / 1e9:.6f}", f"{attention_flops(pairs, D, True) / 1e9:.6f}",
                  f"{stats['skip_fraction']:.1%}", str(bool(torch.isfinite(o).all())))
    Console().print(table)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-L", "--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    ap.add_argument("-D", "--dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--no-decode", action="store_true", help="skip the decode table")
    ap.add_argument("--dry-run", action="store_true", help="CPU plumbing check at tiny sizes (no GPU, no timings)")
    ap.add_argument("--out", type=Path, help="also write every row as JSON")
    args = ap.parse_args(argv)
    if args.dry_run:
        dry_run()
        return
    if not torch.cuda.is_available():
        sys.exit("benchmarks/attention.py needs a CUDA GPU (none found); use --dry-run to check the script on CPU")

    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]{torch.cuda.get_device_name()}[/], torch {torch.__version__}, bf16, two-stream set-causal mask")
    table = Table(title="rank-masked attention (TFLOP/s over visible pairs; x = their time / ours; "
                        "flash: unmasked FlashAttention over all L x L pairs)")
    for col in ("L", "D", "B x H", "pass", "tiles skipped", "ours ms", "TFLOP/s", "flex ms", "x flex", "sdpa ms", "x sdpa",
                "flash ms", "x flash", "max|ours-flex|"):
        table.add_column(col, justify="right")
    results = {"attention": [], "decode": []}
    for L in args.lengths:
        for D in args.dims:
            for r in run_attention(L, D):
                results["attention"].append(r)
                table.add_row(str(r["L"]), str(r["D"]), f"{r['B']}x{r['H']}", r["pass_"], f"{r['skip']:.1%}", f"{r['ms']:.3f}", f"{r['tflops']:.1f}",
                              f"{r['flex']:.3f}", f"{r['flex'] / r['ms']:.2f}", f"{r['sdpa']:.3f}", f"{r['sdpa'] / r['ms']:.2f}",
                              f"{r['flash']:.3f}", f"{r['flash'] / r['ms']:.2f}", f"{r['err']:.2e}")
            torch.cuda.empty_cache()
    console.print(table)
    if args.no_decode:
        _write(args.out, results)
        return
    dec = Table(title="decode: 16 queries per row vs a KV cache of L tokens (x = sdpa time / ours)")
    for col in ("L", "D", "B x H", "ours ms", "ours ragged ms", "sdpa ms", "x sdpa"):
        dec.add_column(col, justify="right")
    for L in args.lengths:
        for D in args.dims:
            r = run_decode(L, D)
            results["decode"].append(r)
            dec.add_row(str(L), str(D), f"{r['B']}x{r['H']}", f"{r['ours']:.4f}", f"{r['ragged']:.4f}", f"{r['sdpa']:.4f}", f"{r['sdpa'] / r['ours']:.2f}")
    console.print(dec)
    _write(args.out, results)


def _write(path: Path | None, results: dict) -> None:
    if path is not None:
        path.write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, **results}, indent=1))


if __name__ == "__main__":
    main()
