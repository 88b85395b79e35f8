"""A regular (non-editable) install ships the four component folders as orderlab subpackages."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_component_subpackages(tmp_path):
    pytest.importorskip("setuptools")  # building without isolation needs it in this env
    src = tmp_path / "src"  # build from a copy: setuptools writes build/ next to the sources
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "runs", ".*venv*", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(src),
                    "-w", str(tmp_path / "wheel")], check=True, cwd=tmp_path, capture_output=True)
    (wheel,) = (tmp_path / "wheel").glob("orderlab-*.whl")
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    code = ("import orderlab.processes, orderlab.policies, orderlab.objectives, orderlab.kernels, orderlab.tasks, orderlab;"
            "import pathlib; p = pathlib.Path(orderlab.kernels.__file__);"
            f"assert p.is_relative_to({str(target)!r}), p;"
            "assert not __import__('importlib').util.find_spec('kernels')")
    env = {**os.environ, "PYTHONPATH": str(target)}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
