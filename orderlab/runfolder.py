"""Claiming a run folder: one run at a time, and never over an earlier run by accident.

:func:`claim` wraps everything a run writes (run.py's ``execute``):

1. ``run.dir`` must give a folder this process can create and write in; otherwise a
   :class:`~orderlab.registry.ConfigError` naming ``run.dir``, before any work.
2. ``run.lock`` in the folder (:class:`RunLock`) says who runs there: ``{pid, host,
   since}``. It is created atomically (written aside, then hard-linked into place, which
   fails when one exists; also on NFS), and removed when the block ends, however it
   ends (completion, an error, Ctrl-C). A second run into a locked folder is refused
   with a :class:`RunFolderError` naming the holder (``pid@host since ...``). A lock whose
   process is gone (same host, the pid dead or reused by another process: a run killed
   by SIGKILL or SIGTERM leaves one) is taken over, with a message. A holder on another
   host cannot be checked and counts as alive.
3. A fresh run (neither ``run.resume`` nor ``--eval-only``) is refused over a folder that
   holds an earlier run (``results.json`` or a stage checkpoint), unless
   ``run.overwrite=true``, which removes that run's ``results.json`` and every stage's
   checkpoint and metrics first. ``run.resume=true`` continues the run there; ``--eval-only``
   evaluates its checkpoints.

Under a process group only rank 0 checks, locks and clears; every rank then raises the
same refusal (the others as a :class:`RunFolderError` quoting rank 0's message).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from orderlab import distributed
from orderlab.checkpoint import CHECKPOINT, METRICS, RunFiles
from orderlab.registry import ConfigError

__all__ = ["RunFolderError", "RunLock", "claim", "earlier_run"]


class RunFolderError(RuntimeError):
    """The run folder cannot be used now (locked by a live run, or holding an earlier run);
    the message is one line and names the folder."""


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _start_time(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (``/proc/<pid>/stat``
    field 22), which tells a reused pid from the lock holder's; None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]  # fields after "(comm)" start at field 3


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class RunLock:
    """The lock file of a run folder (``RunFiles.lock``); :meth:`acquire`, :meth:`release`,
    or use it as a context manager."""

    def __init__(self, path: str | Path, say: Callable[[str], None] = _stderr):
        self.path, self.say, self.held = Path(path), say, False

    @staticmethod
    def describe(holder: dict[str, Any]) -> str:
        return f"pid {holder.get('pid')}@{holder.get('host')} since {holder.get('since')}"

    def holder(self) -> dict[str, Any] | None:
        """What the lock file says (None when there is none; ``{}`` when it is unreadable)."""
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _stale(self, holder: dict[str, Any]) -> bool:
        """Whether the holder's process is gone: only decidable on its own host."""
        pid = holder.get("pid")
        if holder.get("host") != socket.gethostname() or not isinstance(pid, int):
            return False
        if not _alive(pid):
            return True
        started = holder.get("start")
        return started is not None and _start_time(pid) not in (None, started)  # the pid was reused

    def _create(self) -> None:
        """Write our lock aside, then hard-link it into place: it appears whole or not at
        all, and the link fails when a lock exists (FileExistsError)."""
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S %z"),
              "start": _start_time(os.getpid()), "argv": sys.argv}
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            os.chmod(tmp, 0o644)
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                raise
            except OSError:  # a filesystem without hard links: create exclusively, then write
                with open(self.path, "x") as f:
                    json.dump(me, f)
        finally:
            os.unlink(tmp)

    def acquire(self) -> RunLock:
        """Take the lock, or raise :class:`RunFolderError` naming its live holder."""
        with _turns(self.path.parent):  # processes of this host take turns to look and take
            holder = self.holder()
            if holder is not None:
                if not self._stale(holder):
                    who = self.describe(holder) if holder else "an unknown process (unreadable lock file)"
                    raise RunFolderError(f"{self.path.parent} is in use by {who}: wait for that run, or remove "
                                         f"{self.path} if it is gone")
                self.say(f"taking over the stale lock of {self.describe(holder)} (that process is gone): {self.path}")
                self.path.unlink(missing_ok=True)
            try:
                self._create()
            except FileExistsError:  # another host won the race
                raise RunFolderError(f"{self.path.parent} is in use by {self.describe(self.holder() or {})}") from None
        self.held = True
        return self

    def release(self) -> None:
        """Remove the lock file if it is still ours."""
        if self.held:
            self.held = False
            mine = self.holder() or {}
            if mine.get("pid") == os.getpid() and mine.get("host") == socket.gethostname():
                self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


@contextlib.contextmanager
def _turns(folder: Path) -> Iterator[None]:
    """An exclusive ``flock`` on the folder itself for the block."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the flock


def _make_folder(path: Path) -> None:
    """Create the run folder, or a ConfigError naming ``run.dir`` (a file in the way, no
    permission, a read-only filesystem)."""
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise ConfigError("run.dir", f"{p} is a file, not a folder (the run folder would be {path})")
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError("run.dir", f"cannot create the run folder {path}: {e.strerror or e}") from None


def earlier_run(files: RunFiles) -> list[Path]:
    """The files that show an earlier run in the folder: ``results.json`` and the stage
    checkpoints (of any stage, not only this config's)."""
    return [p for p in (files.results, *sorted(files.dir.glob(f"*/{CHECKPOINT}"))) if p.is_file()]


def _clear_earlier(files: RunFiles, say: Callable[[str], None]) -> None:
    """``run.overwrite``: remove the earlier run's results and every stage's checkpoint and metrics."""
    gone = [p for p in (*earlier_run(files), *sorted(files.dir.glob(f"*/{METRICS}"))) if p.is_file()]
    for p in gone:
        p.unlink()
    if gone:
        say(f"run.overwrite=true: removed the earlier run in {files.dir} "
            f"({', '.join(str(p.relative_to(files.dir)) for p in gone)})")


def _take(files: RunFiles, resume: bool, overwrite: bool, eval_only: bool, say: Callable[[str], None]) -> RunLock:
    """Rank 0's part of :func:`claim`: the folder, the lock, the earlier run."""
    _make_folder(files.dir)
    lock = RunLock(files.lock, say)
    try:
        lock.acquire()
    except PermissionError as e:
        raise ConfigError("run.dir", f"the run folder {files.dir} is not writable: {e.strerror or e}") from None
    except OSError as e:  # a read-only filesystem, a folder without room, ...
        raise ConfigError("run.dir", f"cannot write in the run folder {files.dir}: {e.strerror or e}") from None
    try:
        if not (resume or eval_only):
            if overwrite:
                _clear_earlier(files, say)
            elif earlier := earlier_run(files):
                shown = ", ".join(str(p.relative_to(files.dir)) for p in earlier)
                raise RunFolderError(f"{files.dir} holds an earlier run ({shown}): run.resume=true continues it, "
                                     "run.overwrite=true replaces it, or choose another run.name")
    except BaseException:
        lock.release()
        raise
    return lock


@contextlib.contextmanager
def claim(files: RunFiles, resume: bool = False, overwrite: bool = False, eval_only: bool = False,
          say: Callable[[str], None] = _stderr) -> Iterator[None]:
    """Hold the run folder for the block (see the module docstring); raises ConfigError
    (``run.dir`` unusable) or :class:`RunFolderError` (locked, or an earlier run) first."""
    lock, refused = None, None
    try:
        if distributed.is_main():
            try:
                lock = _take(files, resume, overwrite, eval_only, say)
            except (ConfigError, RunFolderError) as e:
                refused = e
        first = distributed.all_gather_object(None if refused is None else str(refused))[0]
        if refused is not None:
            raise refused
        if first is not None:  # another rank: rank 0 was refused
            raise RunFolderError(f"rank 0: {first}")
        yield
    finally:
        if lock is not None:
            lock.release()
