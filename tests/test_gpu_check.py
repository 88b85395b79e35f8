"""``benchmarks/gpu_check.py --dry-run``: every step of the GPU check resolves on CPU."""

import importlib.util
import sys
from pathlib import Path

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
