"""The signals that stop a run from outside, and what each one means.

``SIGINT`` (Ctrl-C) and ``SIGTERM`` (a process manager, ``kill``) stop gracefully the first
time and hard the second. ``SIGHUP`` means the terminal is gone: nobody is there to wait for
a graceful stop, so it stops hard at once (a managed judge server is stopped, everything
written stays).

A stop signal the command was started ignoring stays ignored, and is never listened for:
SIGHUP under ``nohup``, SIGINT in a job a non-interactive shell starts in the background
(the Ctrl-C meant for the script's foreground job reaches the whole process group, and
stopped a run behind it). The processes a run starts begin with SIGINT and SIGTERM at their
default handling all the same (see :data:`RESET_IN_CHILDREN`).
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

RESET_IN_CHILDREN = (signal.SIGINT, signal.SIGTERM)
"""The signals each process a run starts puts back to their default handling before its own
code runs, whatever the run was started with: an ignored disposition is inherited across
``exec``, and a judge server ignoring SIGTERM outlived a killed run (its parent-death signal
is SIGTERM) and made every stop wait out its grace period. SIGHUP is not among them: under
``nohup`` the processes a run starts are meant to ignore it too."""


def stop_signals() -> tuple[signal.Signals, ...]:
    """The signals to listen for: SIGINT, SIGTERM and SIGHUP, each unless it is ignored
    (SIGHUP under ``nohup``, SIGINT in a job a script runs in the background). May be empty."""
    hangup = getattr(signal, "SIGHUP", None)
    candidates = [signal.SIGINT, signal.SIGTERM, *([hangup] if hangup is not None else [])]
    return tuple(s for s in candidates if signal.getsignal(s) is not signal.SIG_IGN)


@contextmanager
def stop_signal_receiver() -> Iterator[AsyncIterator[signal.Signals]]:
    """``anyio.open_signal_receiver`` for the :func:`stop_signals`; with none of them to listen
    for (all ignored), a receiver that never receives: trio refuses to open one for no signal.
    """
    import anyio

    signals = stop_signals()
    if not signals:
        yield _NoSignals()
        return
    with anyio.open_signal_receiver(*signals) as receiver:
        yield receiver


class _NoSignals:
    """A signal receiver for no signal: waits until cancelled."""

    def __aiter__(self) -> _NoSignals:
        return self

    async def __anext__(self) -> signal.Signals:
        import anyio

        await anyio.sleep_forever()
        raise StopAsyncIteration  # pragma: no cover - sleep_forever only ends by cancellation


def how_to_stop() -> tuple[str, str] | None:
    """How to send the run a stop signal it listens for, as (what to do, what it is): ``("press
    Ctrl-C", "Ctrl-C")`` when it listens for SIGINT, else ``("send SIGTERM", "SIGTERM")``;
    None when it listens for neither (a hangup is no advice to give)."""
    listened = stop_signals()
    if signal.SIGINT in listened:
        return "press Ctrl-C", "Ctrl-C"
    if signal.SIGTERM in listened:
        return "send SIGTERM", "SIGTERM"
    return None


def ignore_stop_signals_to_the_end() -> None:
    """From here to the process's end, every stop signal it listens to is ignored.

    For a command whose exit status is decided: Python puts its own handlers back to the
    default ones while it shuts down (tenths of a second, with numpy, polars and pydantic to
    tear down), and a signal then ended the process by the signal (a finished run exited 143,
    a Ctrl-C at startup -2 with no word), where an ignored one stays ignored to the end.
    """
    for signum in stop_signals():
        signal.signal(signum, signal.SIG_IGN)


def is_hangup(signum: int) -> bool:
    """Whether a received signal is SIGHUP: the terminal is gone, stop hard at once."""
    return signum == getattr(signal, "SIGHUP", None)


def silence_the_terminal() -> None:
    """Point stdout and stderr at ``/dev/null`` after a hangup.

    Writes to a terminal that is gone fail (EIO), and the run's last lines would turn its
    clean stop into a crash (exit status 1) on the way out.
    """
    point_at_devnull((1, 2))


def terminal_hung_up(fds: Iterable[int] = (1, 2)) -> bool:
    """Whether one of ``fds`` (stdout and stderr) is a terminal no longer, as after a hangup:
    the kernel answers a hung-up terminal's requests with EIO. A SIGHUP sent with ``kill``
    finds the terminal still there (and one that is no terminal reads as hung up)."""
    return not all(os.isatty(fd) for fd in fds)


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
    for signum in stop_signals():  # an ignored one is none of them
        if signum == signal.SIGINT and signal.getsignal(signum) is signal.default_int_handler:
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
