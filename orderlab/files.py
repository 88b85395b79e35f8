"""Crash-safe file writes (ground floor: stdlib only), shared by the run folder
(``orderlab.report``, ``orderlab.checkpoint``) and Hugging Face folders (``orderlab.weights``)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["write_temp", "atomic_write"]


def write_temp(folder: str | Path, name: str, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` to a temporary file beside ``folder / name``, flushed to disk; returns
    it for the caller to rename into place (``os.replace``) when its turn comes."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` to a temporary file in the same folder, flushed to disk, then
    ``os.replace`` onto ``path``: a reader (or a crash) sees the old file or the new one,
    never half of one. The one writer of every run-folder file (JSON, CSV, checkpoints)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = write_temp(path.parent, path.name, write)
    try:
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
