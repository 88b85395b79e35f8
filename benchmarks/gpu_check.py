"""One command that checks everything on a GPU and writes one results folder.

    python benchmarks/gpu_check.py                 # on a CUDA machine: runs every step
    python benchmarks/gpu_check.py --dry-run       # default without CUDA: checks the plan only
    python benchmarks/gpu_check.py --out DIR --only kernels attention

Steps (each a subprocess whose output is kept as ``DIR/<step>.log``; ``DIR/summary.json``
holds every step's command, exit status and seconds, and the environment):

- ``env``: GPU names, driver, torch, triton and CUDA versions (``env.json``);
- ``kernels``: the kernel tests with the Triton kernels compiled for real (on CUDA the
  ``*triton*`` tests run directly, slow ones included; the full AOT matrix is CI's) against the float64 reference:
  every mask pattern (set-causal in reveal and position order, block-causal,
  bidirectional, padded, random), L up to 8192, D 64 and 128, fp32 / fp16 / bf16, rows
  with no visible key, ragged cache lengths; and the launchers' AOT list;
- ``attention``: ``benchmarks/attention.py`` (Triton vs FlexAttention vs dense-mask SDPA
  vs unmasked FlashAttention), forward and forward+backward, L 512..8192, D 64 and 128
  (``attention.json``);
- ``train``: ``benchmarks/gpu_throughput.py train``: a ~110M-parameter model, set
  diffusion and MDM training steps with the Triton kernels vs dense-mask SDPA, against a
  plain causal step (``train.json``);
- ``decode``: ``benchmarks/gpu_throughput.py decode``: batch 1 and 64, exact cache,
  eager / compiled / compiled with CUDA graphs, same tokens checked (``decode.json``);
- ``ddp``: ``python -m torch.distributed.run`` (torchrun, found through this interpreter, not
  PATH) ``--nproc_per_node=<all GPUs>`` training over NCCL for 50 steps.

The dry run resolves every step (scripts and modules exist and import, the YAML loads with
its overrides) and runs no GPU work; ``tests/test_gpu_check.py`` runs it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
DDP_CONFIG = "experiments/set_diffusion.yaml"
DDP_OVERRIDES = ["stages.denoiser.train.steps=50", "stages.denoiser.train.eval_every=50",
                 "stages.denoiser.train.ckpt_every=50", "evaluate.n=64"]


@dataclass
class Step:
    """One check: a command run from the repository root, and what it needs to exist."""

    name: str
    argv: list[str]
    files: list[str] = field(default_factory=list)  # paths under ROOT the command reads
    modules: list[str] = field(default_factory=list)  # modules it imports
    env: dict = field(default_factory=dict)


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def plan(out: Path) -> list[Step]:
    """Every step, with its command resolved for this machine."""
    n = max(gpu_count(), 1)
    return [
        Step("kernels", [PY, "-m", "pytest", "-q", "tests/test_kernels.py", "tests/test_aot.py", "-m", "not aot",
                         "-p", "no:cacheprovider"],
             ["tests/test_kernels.py", "tests/test_aot.py"], ["orderlab.kernels.aot"]),
        Step("attention", [PY, "benchmarks/attention.py", "-L", "512", "1024", "2048", "4096", "8192", "-D", "64", "128",
                           "--out", str(out / "attention.json")],
             ["benchmarks/attention.py"], ["torch.nn.attention.flex_attention"]),
        Step("train", [PY, "benchmarks/gpu_throughput.py", "train", "--out", str(out / "train.json")],
             ["benchmarks/gpu_throughput.py"], ["orderlab.builder"]),
        Step("decode", [PY, "benchmarks/gpu_throughput.py", "decode", "--batches", "1", "64", "--out", str(out / "decode.json")],
             ["benchmarks/gpu_throughput.py"], ["orderlab.decoding"]),
        Step("ddp", [PY, "-m", "torch.distributed.run", f"--nproc_per_node={n}", "-m", "orderlab.run", DDP_CONFIG, *DDP_OVERRIDES,
                     f"run_dir={out / 'ddp_run'}", "--no-progress"],
             [DDP_CONFIG], ["orderlab.run", "torch.distributed.run"]),
    ]


def environment() -> dict:
    """GPU names, driver, and library versions."""
    import torch
    import triton

    smi = shutil.which("nvidia-smi")
    driver = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                            text=True).stdout.strip() if smi else None
    return {"gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())], "driver": driver,
            "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
            "python": sys.version.split()[0]}


def check(step: Step) -> list[str]:
    """What keeps ``step`` from running here (empty: its plan resolves)."""
    problems = [f"missing file {f}" for f in step.files if not (ROOT / f).exists()]
    for m in step.modules:
        try:
            importlib.import_module(m)
        except Exception as e:  # report every unresolvable import, not only the first
            problems.append(f"cannot import {m}: {e}")
    if step.name == "ddp":
        problems += _check_config()
    return problems


def _check_config() -> list[str]:
    """The DDP experiment loads with its overrides (no training)."""
    import orderlab

    try:
        orderlab.load(ROOT / DDP_CONFIG, overrides=DDP_OVERRIDES)
    except Exception as e:
        return [f"{DDP_CONFIG} with {DDP_OVERRIDES}: {e}"]
    return []


def run(step: Step, out: Path) -> dict:
    """Run ``step``, its output into ``out/<name>.log``; exit status and seconds."""
    t0 = time.time()
    with open(out / f"{step.name}.log", "w") as log:
        rc = subprocess.run(step.argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **step.env}).returncode
    return {"argv": step.argv, "rc": rc, "seconds": round(time.time() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "gpu_check_results" / time.strftime("%Y%m%d-%H%M%S"))
    ap.add_argument("--only", nargs="+", help="run only these steps")
    ap.add_argument("--dry-run", action="store_true", default=not torch.cuda.is_available(),
                    help="check the plan, run nothing (the default without CUDA)")
    args = ap.parse_args(argv)
    steps = [s for s in plan(args.out) if not args.only or s.name in args.only]
    problems = {s.name: check(s) for s in steps}
    for s in steps:
        print(f"[{'ok' if not problems[s.name] else 'BAD'}] {s.name}: {' '.join(map(str, s.argv))}")
        for p in problems[s.name]:
            print(f"      {p}")
    if args.dry_run:
        print(f"dry run: {len(steps)} steps planned, results would go to {args.out}")
        return 1 if any(problems.values()) else 0
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {"env": environment(), "steps": {}}
    (args.out / "env.json").write_text(json.dumps(summary["env"], indent=1))
    for s in steps:
        summary["steps"][s.name] = run(s, args.out)
        print(f"{s.name}: rc {summary['steps'][s.name]['rc']} in {summary['steps'][s.name]['seconds']} s", flush=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    return 0 if all(v["rc"] == 0 for v in summary["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
