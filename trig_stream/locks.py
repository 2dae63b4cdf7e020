"""The run lock: who runs in a run directory, seen without taking the lock.

A running process holds ``run.lock`` (and its journal) locked with ``flock`` and writes its
pid there; a viewer (``status``, ``watch``, ``validate``) asks the kernel's lock table
whether the lock is held rather than taking it, which would turn away a run starting then.
The messages of a run refused because another holds the directory live here too.
"""

from __future__ import annotations

import os
from pathlib import Path

from trig_stream.files import open_regular_file

LOCK = "run.lock"
"""Held locked by the process running in a run directory, which writes its pid there."""


def writer_pid(run_dir: Path) -> int | None:
    """The pid of the process running in ``run_dir`` when one does, else None.

    On Linux the kernel's lock table (``/proc/locks``) says whether the run lock is held;
    elsewhere, whether the pid the lock holder wrote into ``run.lock`` still runs. The lock
    itself is never touched.
    """
    path = run_dir / LOCK
    try:
        with open_regular_file(path) as handle:  # a pipe there is no lock: no wait on it
            pid = int(handle.read(64).decode().strip() or "0")
            info = os.fstat(handle.fileno())
    except (OSError, ValueError):
        return None
    held = _lock_held(info.st_dev, info.st_ino)
    if held is not None:
        return pid if held and pid > 0 else None
    if pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    return pid


def run_in_use(run_dir: Path, holder: str) -> str:
    """Why a run is refused in ``run_dir``, whose lock ``holder`` (the pid it wrote) holds."""
    if holder == str(os.getpid()):
        who = "another engine in this process"
    else:
        who = f"another trig-stream process (pid {holder})" if holder else "another run"
    return (
        f"{run_dir} is in use by {who}; wait for it to end, or use `trig-stream watch` to follow it"
    )


def journal_in_use(run_dir: Path) -> str:
    """Why a run is refused in ``run_dir`` whose journal alone is locked."""
    return (
        f"{run_dir} is in use by another run: its journal is locked (was its {LOCK} "
        "deleted?); wait for it to end, or use `trig-stream watch` to follow it"
    )


def file_locked(path: Path) -> bool:
    """Whether some process holds a lock on the file at ``path``, as far as the kernel's lock
    table says (False where there is none to read, or no file)."""
    try:
        info = path.stat()
    except OSError:
        return False
    return bool(_lock_held(info.st_dev, info.st_ino))


def _lock_held(device: int, inode: int) -> bool | None:
    """Whether some process holds a lock on the file, from ``/proc/locks`` (None: unknown)."""
    try:
        table = Path("/proc/locks").read_text()
    except OSError:
        return None
    wanted = f"{os.major(device):02x}:{os.minor(device):02x}:{inode}"
    return any(wanted in line.split() for line in table.splitlines())
