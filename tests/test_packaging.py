"""A regular (non-editable) install ships the four component folders as orderlab subpackages."""

import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
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
            f"assert p.is_relative_to({str(target)!r}), p")
    env = {**os.environ, "PYTHONPATH": str(target)}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with zipfile.ZipFile(wheel) as z:  # nothing generic (kernels, policies, ...) at the top of site-packages
        top = {name.split("/")[0] for name in z.namelist()}
    assert top == {"orderlab", "orderlab-0.1.0.dist-info"}, top


def test_no_top_level_folder_shadows_an_installed_package():
    """Running from a checkout puts its root on sys.path, where a folder with an __init__.py
    wins over site-packages: a top-level `kernels/` once shadowed Hugging Face's `kernels`
    (which transformers 5.25 imports). No package folder at the root may share an import name
    with an installed distribution other than orderlab itself."""
    folders = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    assert "orderlab" in folders
    installed = importlib.metadata.packages_distributions()
    clashes = {name: installed[name] for name in folders if set(installed.get(name, ())) - {"orderlab"}}
    assert not clashes, f"top-level folders shadow installed packages: {clashes}"
