"""Ratio tables of a pytest-benchmark run: one table per group, every row against the
group's baseline (the benchmark with ``extra_info["baseline"]``), from the same run.

    python -m pytest benchmarks/ --benchmark-only --benchmark-json=bench.json   # prints them at the end
    python benchmarks/tables.py bench.json                                        # again, from the JSON

Times are the *minimum* over rounds (the least disturbed by other processes on a shared
machine); ``x baseline`` = time / baseline time (decode: 1.0 is the matmul floor;
training: the plain causal step). Decode rows also give ms per step and tokens/s.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

from rich.console import Console
from rich.table import Table


def tables(benchmarks: list[dict]) -> list[Table]:
    """``benchmarks``: pytest-benchmark's JSON entries (``group``, ``name``, ``stats``, ``extra_info``)."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for b in benchmarks:
        groups[b.get("group") or "(no group)"].append(b)
    out = []
    for group, rows in sorted(groups.items()):
        base = next((b for b in rows if b["extra_info"].get("baseline")), None)
        t = Table(title=f"{group} (baseline: {base['extra_info']['label'] if base else 'none'})")
        for col in ("benchmark", "min (ms)", "mean (ms)", "rounds", "ms/step", "tokens/s", "x baseline"):
            t.add_column(col, justify="left" if col == "benchmark" else "right")
        for b in sorted(rows, key=lambda b: b["stats"]["min"]):
            info, s = b["extra_info"], b["stats"]
            steps, tokens = info.get("steps"), info.get("tokens")
            t.add_row(
                info.get("label", b["name"]),
                f"{s['min'] * 1e3:,.2f}",
                f"{s['mean'] * 1e3:,.2f}",
                str(s["rounds"]),
                f"{s['min'] / steps * 1e3:.2f}" if steps else "",
                f"{tokens / s['min']:,.0f}" if tokens else "",
                f"{s['min'] / base['stats']['min']:.2f}x" if base else "",
            )
        out.append(t)
    return out


def print_tables(benchmarks: list[dict], console: Console | None = None) -> None:
    console = console or Console(width=160)
    for t in tables(benchmarks):
        console.print(t)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print_tables(json.load(f)["benchmarks"])
