"""The ahead-of-time resource table of ``docs/benchmarks.md``: per kernel, head dim,
autotune config and target, registers per thread, stack frame and spill bytes per thread
(ptxas), shared memory per block and the blocks per SM they imply
(``orderlab.kernels.aot.occupancy``).

    python benchmarks/aot_table.py                 # rewrites the table in docs/benchmarks.md
    python benchmarks/aot_table.py --dtype fp32 --print

Rows: the training tiles (the largest query tile, with groups) at every config the
autotuner tries, no GPU needed.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from orderlab.kernels.aot import all_specializations, compile_all

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
BEGIN, END = "<!-- aot-table:begin -->", "<!-- aot-table:end -->"


def rows(dtype: str, dims: list[int]) -> list[int]:
    """Indices of the largest-tile, grouped specialisations of each kernel per head dim
    (one per autotune config)."""
    specs = all_specializations()
    tile = lambda s: s.constexprs.get("BLOCK_M", s.constexprs["BLOCK_N"])  # noqa: E731
    top = {}
    for s in specs:
        if s.dtype == dtype and s.constexprs["D"] in dims and s.constexprs.get("HAS_GROUP", True):
            top[(s.name, s.constexprs["D"])] = max(top.get((s.name, s.constexprs["D"]), 0), tile(s))
    return [i for i, s in enumerate(specs) if s.dtype == dtype and s.constexprs.get("HAS_GROUP", True)
            and top.get((s.name, s.constexprs["D"])) == tile(s)]


def table(reports) -> str:
    head = ("| kernel | dtype | D | tiles | warps/stages | target | regs | stack B | spill st/ld B | smem KB | blocks/SM | warps/SM |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in sorted(reports, key=lambda r: (r.spec.name, r.spec.constexprs["D"], r.spec.num_warps, r.spec.num_stages, r.target.capability)):
        c = r.spec.constexprs
        tiles = f"{c.get('BLOCK_M', '-')}x{c['BLOCK_N']}"
        lines.append(f"| {r.spec.name} | {r.spec.dtype} | {c['D']} | {tiles} | {r.spec.num_warps}/{r.spec.num_stages} | "
                     f"{r.target.name} | {r.regs} | {r.stack} | {r.spill_stores}/{r.spill_loads} | {r.shared / 1024:.1f} | "
                     f"{r.blocks_per_sm} | {r.blocks_per_sm * r.spec.num_warps} |")
    return head + "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("-D", "--dims", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--print", action="store_true", help="print instead of rewriting docs/benchmarks.md")
    args = ap.parse_args(argv)
    reports, failures = compile_all(rows(args.dtype, args.dims), progress=True)
    text = table(reports) + "".join(f"\nFAILED {t.name} {s.label}: {e[:200]}\n" for s, t, e in failures)
    if args.print:
        print(text)
        return
    doc = DOC.read_text()
    doc = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda m: f"{BEGIN}\n{text}{END}", doc, flags=re.S)
    DOC.write_text(doc)


if __name__ == "__main__":
    main()
