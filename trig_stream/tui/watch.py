"""``trig-stream watch RUN_DIR``: follow a run that another process writes, read-only.

On a terminal the dashboard follows the run (``q``, or SIGINT, SIGTERM or SIGHUP, closes
it; the run is not disturbed). Elsewhere (a log file, CI), or without textual, a line is
printed to stdout every ``--interval`` seconds while the journal grows, until no process
writes the run any more; warnings and errors go to stderr. Importing this module imports
no textual.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskStatus
from rich.console import Console

from trig_stream.exit_codes import EXIT_INTERRUPTED, EXIT_OK
from trig_stream.path_arguments import path_argument
from trig_stream.progress import NO_DASHBOARD, full_screen_possible
from trig_stream.records import one_line
from trig_stream.signals import (
    is_hangup,
    job_control_kept,
    silence_the_terminal,
    stop_signal_receiver,
    stop_signals_interrupt,
    terminal_hung_up,
)
from trig_stream.terminal import CommandConsole
from trig_stream.tui.render import duration
from trig_stream.tui.snapshot import DashboardSnapshot
from trig_stream.tui.watch_source import RunDirSource

if TYPE_CHECKING:
    from trig_stream.tui.app import TrigDashboardApp

DEFAULT_INTERVAL_S = 0.5


def add_watch_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``watch RUN_DIR [--interval S]`` to the ``trig-stream`` subcommands.

    Args:
        subparsers: what ``ArgumentParser.add_subparsers()`` returned.

    Returns:
        The subcommand's parser; its handler is ``handler(args, console) -> int``.
    """
    watch: argparse.ArgumentParser = subparsers.add_parser(
        "watch",
        help="follow a run another process is running (read-only)",
        description="Follow a run from its run directory alone: manifest and journal. "
        "Never takes the run lock nor writes there; closing the viewer leaves the run be.",
    )
    watch.add_argument("run_dir", type=path_argument, help="the run directory to follow")
    watch.add_argument(
        "--interval",
        type=_interval,
        default=DEFAULT_INTERVAL_S,
        metavar="S",
        help=f"seconds between two refreshes (default {DEFAULT_INTERVAL_S})",
    )
    watch.set_defaults(handler=cmd_watch)
    return watch


def cmd_watch(args: argparse.Namespace, console: Console) -> int:
    """Run ``trig-stream watch``: the dashboard on a terminal, progress lines elsewhere.

    On a terminal without textual (the ``tui`` extra), a note says how to install it, and
    the progress lines follow, as for ``run``.

    Raises:
        RunDirError: ``run_dir`` is not a run directory, or stops being one while watched.
    """
    run_dir: Path = args.run_dir
    source = RunDirSource(run_dir)
    first = source.poll()  # a bad directory fails here, before any screen is drawn
    if full_screen_possible():
        try:
            from trig_stream.tui.app import TrigDashboardApp
        except ImportError:
            # As `run` does: the progress lines below, and how to get the dashboard.
            console.print(NO_DASHBOARD, highlight=False, markup=False)  # "[tui]" is no markup
        else:
            app = TrigDashboardApp(RunDirSource(run_dir), refresh_every_s=args.interval)
            signum = show_dashboard(app)
            if app.source_error is not None:  # the run directory went away meanwhile
                raise app.source_error
            return EXIT_OK if signum is None else EXIT_INTERRUPTED
    # The progress lines are what the command prints (`watch RUN > log`); warnings and
    # errors go where the other commands put theirs (``console``: stderr).
    out = CommandConsole(soft_wrap=True)
    with stop_signals_interrupt():  # SIGTERM and SIGHUP close it as Ctrl-C does
        try:
            return follow(source, out, errors=console, interval_s=args.interval, first=first)
        except KeyboardInterrupt:
            return EXIT_INTERRUPTED


def show_dashboard(app: TrigDashboardApp, **run_options: Any) -> int | None:
    """Run the dashboard app until ``q`` closes it, or a stop signal does.

    SIGINT, SIGTERM and SIGHUP close the app as ``q`` does, so that it gives the terminal
    back (without this, SIGTERM killed the process in the alternate screen, with no echo and
    mouse tracking on). After a hangup nothing more is written to the terminal, but for what
    gives it back while it is still there (a ``kill -HUP``): writes to one that is gone fail.

    Args:
        app: the app to run.
        run_options: passed to :meth:`App.run_async` (``headless``, ``size``, ...).

    Returns:
        The signal that closed the app, or None.
    """
    received: list[int] = []

    async def on_signals(*, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        with stop_signal_receiver() as signals:
            task_status.started()
            async for signum in signals:
                received.append(signum)
                if is_hangup(signum) and terminal_hung_up():
                    silence_the_terminal()
                app.exit()

    async def show() -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(on_signals)
            with job_control_kept():  # Textual's Ctrl-Z handlers end with the app
                await app.run_async(**run_options)
            tg.cancel_scope.cancel()

    anyio.run(show)  # textual needs asyncio, anyio's default
    if any(is_hangup(signum) for signum in received):
        silence_the_terminal()  # given back, or gone meanwhile
    return received[0] if received else None


def follow(
    source: RunDirSource,
    console: Console,
    *,
    errors: Console | None = None,
    interval_s: float,
    max_polls: int | None = None,
    sleep: Callable[[float], None] = time.sleep,
    first: DashboardSnapshot | None = None,
) -> int:
    """Print a progress line whenever the run moves, until nobody writes it any more.

    A journal longer than one read (:attr:`JournalTail.chunk`) is read on without waiting
    ``interval_s``, and the run is reported finished only once all of it is read. Journal
    lines that are not judgements are skipped, as ``status`` and ``report`` skip them, with
    one warning, printed to ``errors`` (by default ``console``, where the lines go).

    ``first``, the snapshot ``source`` gave last, is the first line's: looked at again
    milliseconds later, the run's rate was a group commit over that short span (6.0/s and
    an ETA on the first line, where the run went at 10/s).
    """
    last = ""
    polls = 0
    warned = False
    while True:
        snapshot = source.poll() if first is None else first
        first = None
        tail = source.tail
        if tail.bad_lines and not warned:
            warned = True
            (errors or console).print(
                f"warning: {tail.path}: {tail.bad_lines} line(s) are not judgements and were "
                f"skipped (the first: {tail.first_problem})",
                highlight=False,
                markup=False,
                soft_wrap=True,
            )
        line = describe(snapshot)
        if line != last:
            console.print(line, highlight=False, markup=False, soft_wrap=True)
            last = line
        polls += 1
        if snapshot.finished or (max_polls is not None and polls >= max_polls):
            return 0
        if not tail.behind:  # catching up with a long journal: read on at once
            sleep(interval_s)


def describe(snapshot: DashboardSnapshot) -> str:
    """One line: state, counts by model and status, throughput."""
    parts = [f"[{snapshot.state}] {snapshot.run_name} ({snapshot.task})"]
    for model in snapshot.models:
        parts.append(
            f"{model.name}: ok {model.ok}, unscorable {model.unscorable}, error {model.error}"
        )
    if snapshot.judgements_per_s is not None and not snapshot.finished:
        parts.append(f"{snapshot.judgements_per_s:.1f}/s, ETA {duration(snapshot.eta_s)}")
    if snapshot.quarantined:
        parts.append(f"quarantined {snapshot.quarantined}")
    if snapshot.state == "not running":  # as the dashboard's status line says it
        left = max((snapshot.samples_total or 0) - (snapshot.samples_done or 0), 0)
        parts.append(f"{left} sample{'s' * (left != 1)} left: `trig-stream run` resumes it")
    # The run's and models' names come from its manifest and journal, files a hand may have
    # edited: a control character in them is shown, never sent to the terminal, and a
    # newline as "\n", never starting a line that reads as the next progress line.
    return one_line(" | ".join(parts))


MAX_INTERVAL_S = 3600.0


def _interval(text: str) -> float:
    # Raising the message itself: argparse would name this function in its own.
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value <= MAX_INTERVAL_S:  # NaN fails this too
        raise argparse.ArgumentTypeError(
            f"must be more than 0 and at most {MAX_INTERVAL_S:g} seconds, not {text}"
        )
    return value


__all__ = ["add_watch_command", "cmd_watch", "describe", "follow", "show_dashboard"]
