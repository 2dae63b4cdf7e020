"""The signals that stop a run from outside, and what each one means.

``SIGINT`` (Ctrl-C) and ``SIGTERM`` (a process manager, ``kill``) stop gracefully the first
time and hard the second. ``SIGHUP`` means the terminal is gone: nobody is there to wait for
a graceful stop, so it stops hard at once (a managed judge server is stopped, everything
written stays). Under ``nohup`` SIGHUP is ignored, and so it stays.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any


def stop_signals() -> tuple[signal.Signals, ...]:
    """The signals to listen for: SIGINT, SIGTERM, and SIGHUP unless it is ignored."""
    signals = [signal.SIGINT, signal.SIGTERM]
    hangup = getattr(signal, "SIGHUP", None)
    if hangup is not None and signal.getsignal(hangup) is not signal.SIG_IGN:
        signals.append(hangup)
    return tuple(signals)


def is_hangup(signum: int) -> bool:
    """Whether a received signal is SIGHUP: the terminal is gone, stop hard at once."""
    return signum == getattr(signal, "SIGHUP", None)


def silence_the_terminal() -> None:
    """Point stdout and stderr at ``/dev/null`` after a hangup.

    Writes to a terminal that is gone fail (EIO), and the run's last lines would turn its
    clean stop into a crash (exit status 1) on the way out.
    """
    point_at_devnull((1, 2))


def point_at_devnull(fds: Iterable[int]) -> None:
    """Point each of the file descriptors ``fds`` at ``/dev/null``: what is written to them
    from then on is dropped, and never fails."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in fds:
            os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def _interrupt(signum: int, frame: object) -> None:
    if is_hangup(signum):
        silence_the_terminal()
    raise KeyboardInterrupt


def interrupt_on_stop_signals() -> dict[int, Any]:
    """From here, each stop signal raises :class:`KeyboardInterrupt`, as SIGINT does (a
    hangup silences the terminal first), until something else takes the signals over (an
    event loop's signal receiver). SIGINT keeps Python's own handler where it has it: an
    event loop (asyncio, trio) treats that one with care. A signal ignored stays ignored (a
    job a script starts in the background ignores SIGINT: the Ctrl-C meant for the script's
    foreground job ended a ``report`` running behind it).

    Returns:
        The handlers found, by signal, to put back.
    """
    found: dict[int, Any] = {}
    for signum in stop_signals():
        handler = signal.getsignal(signum)
        if handler is signal.SIG_IGN:
            continue
        if signum == signal.SIGINT and handler is signal.default_int_handler:
            continue
        found[signum] = signal.signal(signum, _interrupt)
    return found


@contextmanager
def stop_signals_interrupt() -> Iterator[None]:
    """Within, each stop signal raises :class:`KeyboardInterrupt`, as SIGINT does (a
    hangup silences the terminal first): a command without an event loop (``watch`` without
    a terminal) ends as a Ctrl-C ends it (exit 130), where SIGTERM and SIGHUP killed it. The
    handlers found are put back on the way out."""
    handlers = interrupt_on_stop_signals()
    try:
        yield
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


@contextmanager
def job_control_kept() -> Iterator[None]:
    """Put the SIGTSTP and SIGCONT handlers back as they were on the way out.

    Textual's terminal driver installs its own (Ctrl-Z suspends the app, ``fg`` draws it
    again) and leaves them there when the app closes: a Ctrl-Z and ``fg`` while the report
    was written brought back the alternate screen in raw mode, waiting for a key.
    """
    names = ("SIGTSTP", "SIGCONT")
    signums = [getattr(signal, name) for name in names if hasattr(signal, name)]
    handlers = {signum: signal.getsignal(signum) for signum in signums}
    try:
        yield
    finally:
        for signum, handler in handlers.items():
            if handler is not None:  # None: not set from Python, nothing to put back
                signal.signal(signum, handler)
