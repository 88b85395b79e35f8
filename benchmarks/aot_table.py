"""The ahead-of-time resource table of ``docs/benchmarks.md``: per kernel, head dim and
target, registers per thread, stack bytes per thread (register spills), shared memory per
block and the blocks per SM they imply (``orderlab.kernels.aot.occupancy``).

    python benchmarks/aot_table.py                 # rewrites the table in docs/benchmarks.md
    python benchmarks/aot_table.py --dtype fp32 --print

Rows: the training tiles (64-query tiles, with groups, or the fp32 tile cap), no GPU needed.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from orderlab.kernels.aot import all_specializations, compile_all

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
BEGIN, END = "<!-- aot-table:begin -->", "<!-- aot-table:end -->"


def rows(dtype: str, dims: list[int]) -> list[int]:
    """Indices of the largest-tile, grouped specialisation of each kernel per head dim."""
    best = {}
    for i, s in enumerate(all_specializations()):
        c = s.constexprs
        if s.dtype == dtype and c["D"] in dims and c.get("HAS_GROUP", True):
            key = (s.name, c["D"])
            if key not in best or c.get("BLOCK_M", c["BLOCK_N"]) > all_specializations()[best[key]].constexprs.get("BLOCK_M", 0):
                best[key] = i
    return sorted(best.values())


def table(reports) -> str:
    head = "| kernel | dtype | D | tiles | warps/stages | target | regs | stack B | smem KB | blocks/SM |\n|---|---|---|---|---|---|---|---|---|---|\n"
    lines = []
    for r in sorted(reports, key=lambda r: (r.spec.name, r.spec.constexprs["D"], r.target.capability)):
        c = r.spec.constexprs
        tiles = f"{c.get('BLOCK_M', '-')}x{c['BLOCK_N']}"
        lines.append(f"| {r.spec.name} | {r.spec.dtype} | {c['D']} | {tiles} | {r.spec.num_warps}/{r.spec.num_stages} | "
                     f"{r.target.name} | {r.regs} | {r.local} | {r.shared / 1024:.1f} | {r.blocks_per_sm} |")
    return head + "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("-D", "--dims", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--print", action="store_true", help="print instead of rewriting docs/benchmarks.md")
    args = ap.parse_args(argv)
    reports, failures = compile_all(rows(args.dtype, args.dims))
    text = table(reports) + "".join(f"\nFAILED {t.name} {s.label}: {e[:200]}\n" for s, t, e in failures)
    if args.print:
        print(text)
        return
    doc = DOC.read_text()
    doc = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda m: f"{BEGIN}\n{text}{END}", doc, flags=re.S)
    DOC.write_text(doc)


if __name__ == "__main__":
    main()
