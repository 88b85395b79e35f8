"""The compiled decode step's first call: where its seconds go, cold and from warm caches.

    python benchmarks/first_call.py                       # cold, then warm, batch 1 (~3 min on 2 cores)
    python benchmarks/first_call.py --batch 32 --set cpp.simdlen=0   # an inductor option

Each measurement is a fresh Python process (what a second run of an experiment is),
decoding the issue-22 model (``vs_setdlm.orderlab_model``: 4 layers, d 256, L 256, a
16-token prompt, window 8, one token per step) with ``decode(..., compile=True)`` twice.
The first decode pays the compile; ``first call`` is the first decode minus the second
(the compile and nothing else). ``cold``: an empty inductor cache folder
(``TORCHINDUCTOR_CACHE_DIR``, which holds the FX graph cache, the AOTAutograd cache and the
compiled C++ kernels); ``warm``: the same folder again, as a second process on the same
machine finds it (by default ``/tmp/torchinductor_$USER``). ``mega``: an empty folder, but
the artifacts that ``torch.compiler.save_cache_artifacts`` wrote after the cold run
loaded first (``load_cache_artifacts``: the portable form of the same caches, e.g. shipped
beside a checkpoint to another machine).

Phases (``torch._dynamo.utils.compilation_time_metrics``, seconds summed over the graphs;
they overlap: the backend runs inside Dynamo's compile, the C++ compiles in worker
processes): ``dynamo`` Dynamo's whole compile (``_compile.compile_inner``), ``trace`` its
bytecode tracing, ``backend`` AOTAutograd + inductor (``OutputGraph.call_user_compiler``),
``codegen`` inductor's code generation, ``c++ wait`` the wait for the C++ kernel compiles
(``async_compile.wait``), ``cache load`` the AOTAutograd cache's load of the compiled graph.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PHASES = {"dynamo": "_compile.compile_inner", "trace": "bytecode_tracing", "backend": "OutputGraph.call_user_compiler",
          "codegen": "GraphLowering.codegen", "c++ wait": "async_compile.wait", "cache load": "AOTAutogradCache.inductor_load"}


def child(batch: int, length: int, threads: int, options: list[str], load: str | None, save: str | None) -> dict:
    """One process's measurement (runs in the child)."""
    import torch
    import torch._inductor.config as inductor

    sys.path.insert(0, str(HERE))
    from vs_setdlm import inputs, orderlab_model, window

    from orderlab.decoding import decode

    torch.set_num_threads(threads)
    for o in options:
        key, _, value = o.partition("=")
        _set(inductor, key, json.loads(value))
    if load:
        torch.compiler.load_cache_artifacts(Path(load).read_bytes())
    model = orderlab_model(length)
    x, r = inputs(batch, length)
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        decode(model, window(2.0), x, r, compile=True)
        times.append(time.perf_counter() - t0)
    if save:
        artifacts = torch.compiler.save_cache_artifacts()
        if artifacts is not None:
            Path(save).write_bytes(artifacts[0])
    from torch._dynamo.utils import compilation_time_metrics as m
    from torch._dynamo.utils import counters

    hits = {"fx hit/miss/bypass": "/".join(str(counters["inductor"][f"fxgraph_cache_{k}"]) for k in ("hit", "miss", "bypass")),
            "aot hit/miss/bypass": "/".join(str(counters["aot_autograd"][f"autograd_cache_{k}"])
                                            for k in ("hit", "miss", "bypass")),
            "graphs": counters["stats"]["unique_graphs"]}
    return {"first_decode": times[0], "decode": times[1], "first_call": times[0] - times[1],
            **{k: sum(m.get(v, [0.0])) for k, v in PHASES.items()}, **hits}


def _set(cfg, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        cfg = getattr(cfg, p)
    setattr(cfg, leaf, value)


def run(kind: str, cache: str, args, load: str | None = None, save: str | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", "--batch", str(args.batch), "--length", str(args.length),
           "--threads", str(args.threads)]
    cmd += [a for o in args.set for a in ("--set", o)]
    cmd += ["--load", load] if load else []
    cmd += ["--save", save] if save else []
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return {"kind": kind, **json.loads(out.stdout.strip().splitlines()[-1])}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the decoding process")
    ap.add_argument("--set", action="append", default=[], help="an inductor config option, e.g. cpp.simdlen=0 (JSON value)")
    ap.add_argument("--runs", default="cold,warm,mega", help="which of cold, warm, mega (in that order)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--load", help=argparse.SUPPRESS)
    ap.add_argument("--save", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.batch, args.length, args.threads, args.set, args.load, args.save)))
        return
    wanted = args.runs.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache, mega = f"{tmp}/cache", f"{tmp}/artifacts.bin"
        print(f"load average {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
        rows.append(run("cold", cache, args, save=mega))
        if "warm" in wanted:
            rows.append(run("warm", cache, args))
        if "mega" in wanted and Path(mega).exists():
            rows.append(run("mega", f"{tmp}/empty", args, load=mega))
        print(f"load average {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
    cols = ["kind", "first_call", "first_decode", "decode", *PHASES, "graphs", "fx hit/miss/bypass", "aot hit/miss/bypass"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.1f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")


if __name__ == "__main__":
    main()
