"""The run lock: who runs in a run directory, seen without taking the lock.

A running process holds ``run.lock`` (and its journal) locked with ``flock`` and, once it
holds both and has written the run's manifest, writes its pid there (its pid alone: what
every trig-stream version reads); once its run is over, it closes the journal and keeps
``run.lock`` until its report is written. A viewer (``status``, ``watch``, ``report``,
``validate``) asks the kernel's lock table whether either lock is held (:func:`find_writer`)
rather than taking it, which would turn away a run starting then.
The messages of a run refused because another holds the directory live here too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from trig_stream.files import open_regular_file

LOCK = "run.lock"
"""Held locked by the process running in a run directory, which writes its pid there."""


@dataclass(frozen=True)
class Writer:
    """A process running in a run directory, as :func:`find_writer` sees it."""

    pid: int | None
    """Its pid; None when unknown: its ``run.lock`` names none (not written yet: a run
    opening writes it last, once it has read its journal and written its manifest), or only
    its journal is locked (``run.lock`` deleted by hand)."""
    run_lock_held: bool
    """Whether it holds ``run.lock``; False when its journal's lock alone shows it."""

    @property
    def starting(self) -> bool:
        """Whether it is still opening the run directory (reading its journal, checking the
        manifest): it writes its pid once the manifest is its own, so until then the
        manifest may still be the run before's, and says nothing of this one."""
        return self.run_lock_held and self.pid is None

    def __str__(self) -> str:
        if self.pid is not None:
            return f"pid {self.pid}"
        if self.run_lock_held:
            return f"pid not yet written in {LOCK}"
        return f"pid unknown: its journal is locked but not its {LOCK} (deleted by hand?)"


def find_writer(run_dir: Path) -> Writer | None:
    """The process running in ``run_dir`` when one does, else None.

    On Linux the kernel's lock table (``/proc/locks``) says whether the run lock is held, or
    else the journal's (which a run holds too, so that a ``run.lock`` deleted by hand neither
    lets a second run in nor hides the first); elsewhere, whether the pid the lock holder
    wrote into ``run.lock`` still runs. No lock is ever touched.
    """
    # Imported here: the journal's module imports this one for its messages.
    from trig_stream.journal import JOURNAL

    writer = _run_lock_writer(run_dir)
    if writer is None and file_locked(run_dir / JOURNAL):
        return Writer(pid=None, run_lock_held=False)
    return writer


def _run_lock_writer(run_dir: Path) -> Writer | None:
    """The process that holds ``run.lock``, or the one whose pid it holds and that still
    runs where the lock table cannot be read."""
    path = run_dir / LOCK
    try:
        with open_regular_file(path) as handle:  # a pipe there is no lock: no wait on it
            text = handle.read(64).decode().strip()
            info = os.fstat(handle.fileno())
    except (OSError, ValueError):
        return None
    try:
        pid: int | None = int(text)
    except ValueError:
        pid = None
    if pid is not None and pid <= 0:
        pid = None
    held = _lock_held(info.st_dev, info.st_ino)
    if held is not None:
        return Writer(pid=pid, run_lock_held=True) if held else None
    if pid is None:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return Writer(pid=pid, run_lock_held=True)


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
