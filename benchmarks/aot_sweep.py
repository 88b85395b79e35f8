"""Launch-configuration sweep for the attention kernels, compiled ahead of time (no GPU):
for each kernel, dtype, head dim and tile side, every ``num_warps`` x ``num_stages``
candidate on A100 (sm_80) and H100 (sm_90), with registers, spills, shared memory and
blocks per SM. The autotune sets in ``orderlab/kernels/attention.py`` (``_CONFIGS``) are chosen
from this table: no spills, then the most resident warps.

    python benchmarks/aot_sweep.py --out sweep.csv      # 324 compiles: 42 min on 2 busy cores
    python benchmarks/aot_sweep.py --summary sweep.csv [more.csv]   # the markdown summary in the docs
"""

from __future__ import annotations

import argparse
import csv
import itertools

import torch

from orderlab.kernels import attention
from orderlab.kernels.aot import TARGETS, compile_specs

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def candidates(dims, tiles, warps, stages, dtypes) -> list:
    out = []
    for kernel, dtype, D, tile, w, s in itertools.product(
            (attention._fwd_kernel, attention._bwd_dq_kernel, attention._bwd_dkdv_kernel),
            dtypes, dims, tiles, warps, stages):
        if tile > attention._max_block(D, DTYPES[dtype]):
            continue  # tiles the launcher never picks (too much shared memory)
        out.append(attention._spec(kernel, DTYPES[dtype], D, tile, tile, True, num_warps=w, num_stages=s))
    return out


def summary(paths: list[str]) -> str:
    """Markdown: per (kernel, dtype, D, tile), each config's warps per SM on sm_80/sm_90 and
    its worst spill bytes, with the configs ``launch_configs`` chose marked."""
    cases: dict = {}
    for path in paths:
        for r in csv.DictReader(open(path)):
            cases.setdefault((r["kernel"], r["dtype"], int(r["D"]), int(r["tile"])), {}).setdefault(
                (int(r["warps"]), int(r["stages"])), {})[r["target"]] = r
    lines = ["| kernel | dtype | D | tile | w/s: warps per SM sm_80/sm_90 (spill bytes, worst target) | chosen |", "|---|---|---|---|---|---|"]
    for (kernel, dtype, D, tile), configs in sorted(cases.items()):
        launch = attention._max_block(D, DTYPES[dtype]) == tile
        chosen = attention.launch_configs("_" + kernel, D, DTYPES[dtype], tile) if launch else ()
        cells = []
        for (w, st), by_target in sorted(configs.items()):
            spill = max(int(r["spill_stores"] or 0) + int(r["spill_loads"] or 0) for r in by_target.values())
            fits = all(r["fits"] == "1" for r in by_target.values())
            occ = "/".join(by_target[t]["warps_per_sm"] for t in sorted(by_target))
            mark = "**" if (w, st) in chosen else ""
            cells.append(f"{mark}{w}/{st}: {occ}{f' ({spill} B)' if spill else ''}{'' if fits else ' no fit'}{mark}")
        lines.append(f"| {kernel} | {dtype} | {D} | {tile} | {'; '.join(cells)} | "
                     f"{', '.join(f'{w}/{st}' for w, st in chosen) if launch else 'not the launch tile'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="aot_sweep.csv")
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--tiles", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--targets", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--summary", nargs="+", metavar="CSV", help="print the markdown summary of sweep files, compile nothing")
    args = ap.parse_args(argv)
    if args.summary:
        print(summary(args.summary))
        return
    specs = candidates(args.dims, args.tiles, args.warps, args.stages, args.dtypes)
    targets = tuple(t for t in TARGETS if t.capability in args.targets)
    reports, failures = compile_specs(specs, targets, progress=True)
    with open(args.out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["kernel", "dtype", "D", "tile", "warps", "stages", "target", "regs", "stack", "spill_stores",
                    "spill_loads", "smem", "fits", "blocks_per_sm", "warps_per_sm", "error"])
        for r in reports:
            c = r.spec.constexprs
            w.writerow([r.spec.name, r.spec.dtype, c["D"], c["BLOCK_M"], r.spec.num_warps, r.spec.num_stages, r.target.capability,
                        r.regs, r.stack, r.spill_stores, r.spill_loads, r.shared, int(r.fits), r.blocks_per_sm,
                        r.blocks_per_sm * r.spec.num_warps, ""])
        for s, t, err in failures:
            c = s.constexprs
            w.writerow([s.name, s.dtype, c["D"], c["BLOCK_M"], s.num_warps, s.num_stages, t.capability] + [""] * 8 + [err.splitlines()[0][:200]])
    print(f"{len(reports)} compiled, {len(failures)} failed -> {args.out}")


if __name__ == "__main__":
    main()
