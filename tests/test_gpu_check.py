"""``benchmarks/gpu_check.py --dry-run``: every step of the GPU check resolves on CPU."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_gpu_check_dry_run_plan_resolves(tmp_path, capsys):
    gpu_check = _load()
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path / "r")]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    for name in ("kernels", "attention", "train", "decode", "ddp"):
        assert f"[ok] {name}:" in out
    assert "--nproc_per_node=" in out and "8192" in out
    assert not (tmp_path / "r").exists()  # a dry run writes nothing


@pytest.mark.parametrize("what", ["train", "decode"])
def test_gpu_throughput_runs_tiny_on_cpu(tmp_path, what):
    """The throughput step's own code on a tiny model (Triton rows in the interpreter): every
    row is timed, written to JSON, and decoding agrees with eager."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONDONTWRITEBYTECODE="1")
    env.pop("ORDERLAB_KERNELS", None)
    out = tmp_path / f"{what}.json"
    extra = ["--batches", "2", "--variants", "eager"] if what == "decode" else []
    proc = subprocess.run([sys.executable, "benchmarks/gpu_throughput.py", what, "--tiny", "--rounds", "1", "--out", str(out), *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    if what == "train":
        assert [r["row"] for r in rows][1:] == ["set diffusion, Triton", "set diffusion, SDPA", "MDM, Triton", "MDM, SDPA"]
        assert all(r["tokens_per_s"] > 0 and r["params"] > 0 for r in rows)
    else:
        assert [r["row"] for r in rows] == ["batch 2, eager"] and rows[0]["same_tokens_as_eager"]
        assert rows[0]["steps"] == 32 - 16  # one token per step
