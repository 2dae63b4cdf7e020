"""Whether a managed judge server's processes run, read in Linux's ``/proc``, and signals to
its process group (:mod:`trig_stream.backends.judges.managed_server`)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from anyio.abc import Process

_PROC = Path("/proc")
"""Where Linux tells each process's state."""
_PF_EXITING = 0x4
"""The flag of ``/proc/<pid>/stat`` set from the start of a process's exit: the kernel may
take a while to free a large process's memory before it is a zombie."""
_SIGKILL_BIT = 1 << (signal.SIGKILL - 1)
"""SIGKILL's bit in ``/proc/<pid>/status``'s pending signal masks."""


def signal_group(process: Process, signum: signal.Signals) -> None:
    try:
        if hasattr(os, "killpg"):
            os.killpg(process.pid, signum)
        elif process.returncode is None:  # pragma: no cover - no process groups here
            process.send_signal(signum)
    except ProcessLookupError:
        pass  # every process of it has ended


def group_running(group: int, *, ending: bool = True) -> bool:
    """Whether a process of process group ``group`` runs.

    A zombie (ended, waiting to be reaped) does not count: where PID 1 reaps no orphans (a
    container's own program), an ended server process stays one for good, and every stop
    would wait out its grace period for it.

    Args:
        group: the process group.
        ending: whether a process that is ending counts: one exiting (its memory still
            being freed) or one a SIGKILL is pending for. A stop waits for it (it holds
            its GPU until it is gone); what tells why the server ended does not count it,
            as it was killed with what ended (Linux only; elsewhere it always counts).
    """
    if not hasattr(os, "killpg"):  # pragma: no cover - no process groups here
        return False
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # one runs, as another user (a setuid program)
    if not sys.platform.startswith("linux"):
        return True
    processes = _PROC.glob("[0-9]*")
    return any(_running_in(process, group, ending=ending) for process in processes)


def _running_in(process: Path, group: int, *, ending: bool) -> bool:
    """Whether the process of ``/proc/<pid>`` folder ``process`` runs in ``group`` (see
    :func:`group_running` for ``ending``)."""
    try:
        # Its pending signals before its state: a SIGKILL is taken off them only once the
        # process is exiting, so one seen in neither was not killed when status was read.
        status = b"" if ending else (process / "status").read_bytes()
        stat = (process / "stat").read_bytes()
    except OSError:
        return False  # it has ended meanwhile
    # pid (comm) state ppid pgrp session tty_nr tpgid flags ...; comm may hold spaces and
    # parentheses.
    fields = stat[stat.rfind(b")") + 2 :].split()
    if len(fields) < 7 or int(fields[2]) != group or fields[0] in (b"Z", b"X"):
        return False
    if ending:
        return True
    if int(fields[6]) & _PF_EXITING:
        return False
    for line in status.splitlines():
        name, _, mask = line.partition(b":")
        if name in (b"SigPnd", b"ShdPnd") and int(mask, 16) & _SIGKILL_BIT:
            return False
    return True


def process_running(pid: int, group: int) -> bool:
    """Whether process ``pid`` runs in process group ``group``, one that is ending (exiting,
    or a SIGKILL pending for it) not counted (Linux: read in ``/proc``)."""
    return _running_in(_PROC / str(pid), group, ending=False)
