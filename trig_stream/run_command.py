"""The ``run`` command: the engine run with its progress (the dashboard, or plain lines),
what a stop signal does at each stage of the run, what the command says while the engine
opens and closes and once the run ends, and the finished run's report.

:mod:`trig_stream.cli` parses the command line and calls :func:`cmd_run`.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskStatus
from rich.console import Console

from trig_stream.analysis.relations import AnalysisError, OutputWriteError
from trig_stream.backends.library_logs import quiet_model_libraries
from trig_stream.config import RunConfig, load_config
from trig_stream.errors import TrigStreamError, leaf_errors, require_installed
from trig_stream.exit_codes import EXIT_CONFIG, EXIT_INTERRUPTED, EXIT_OK
from trig_stream.records import printable
from trig_stream.signals import (
    how_to_stop,
    is_hangup,
    silence_the_terminal,
    stop_signal_receiver,
    stop_signals,
)

if TYPE_CHECKING:
    from trig_stream.engine import Engine

PROGRESS_EVERY_S = 0.5
OPENING_QUIET_S = 2.0
"""How long an opening step may take before the command says what it waits for."""
CLOSING_POLL_S = 0.1
"""Time between looks at what the engine closes once the run is over (a judge server given
its grace period), to say so at once."""


def cmd_run(args: argparse.Namespace, console: Console) -> int:
    if args.backend == "trio":  # anyio's LookupError ended in a traceback, exit 1
        require_installed(["trio"], "trio")
    config = load_config(args.config)
    # Model libraries print progress bars and advice on every load; the run's own progress
    # says what matters. Set these variables to see them again.
    quiet_model_libraries()
    handlers = {signum: signal.getsignal(signum) for signum in stop_signals()}
    try:
        return anyio.run(_run, config, args, console, backend=args.backend)
    finally:
        if args.exiting:  # the command is done: a signal from here to the exit changes nothing
            _note_stop_signals(threading.Event())
        else:  # what they were: main() may be called again
            for signum, handler in handlers.items():
                signal.signal(signum, handler)


def _note_stop_signals(noted: threading.Event) -> None:
    """From here until a signal receiver takes them over, a stop signal only sets ``noted``
    (a hangup also silences the terminal). Between the run's receiver and the report's, and
    after the report, the default handlers would end the command by the signal (exit 143),
    its work done or its report unwritten without a word."""

    def note(signum: int, frame: object) -> None:
        if is_hangup(signum):
            silence_the_terminal()
        noted.set()

    for signum in stop_signals():
        signal.signal(signum, note)


async def _run(config: RunConfig, args: argparse.Namespace, console: Console) -> int:
    from trig_stream.engine import Engine

    engine = Engine(config, retry_errors=args.retry_errors, new_run=args.new_run)
    # The run directory stays locked until the report is written: released earlier, a second
    # run could start there and append to the journal the report reads, and `status` and
    # `validate` took the run for over with its report still being written.
    with engine.run_lock_kept():
        return await _run_engine(engine, config, args, console)


async def _run_engine(
    engine: Engine, config: RunConfig, args: argparse.Namespace, console: Console
) -> int:
    from trig_stream.progress import PlainProgress

    interrupted = False
    resume_told = False  # set once a hard stop's message said how to resume
    # Set by a stop signal once the run's work is done (nothing left for it to stop) and by
    # any signal from the run's end on: the report looks at it, and stops.
    stop_report = threading.Event()
    run_over = False  # the run has ended: a stop signal from here stops its report

    listening = anyio.CancelScope()

    def stop_the_report() -> None:
        if not stop_report.is_set():
            stop_report.set()  # before saying so: the report may look at once
            if engine.stats().state == "done" and not args.no_report:
                console.print("stopping the report", highlight=False)

    async def on_signals(*, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        try:
            try:
                with listening, stop_signal_receiver() as signals:
                    task_status.started()
                    async for signum in signals:
                        on_signal(signum)
            finally:
                # Closing the receiver put the default handlers back (asyncio): a signal
                # from here would end the command by it (exit 143), or raise a
                # KeyboardInterrupt out of the event loop, its summary unsaid.
                _note_stop_signals(stop_report)
        except KeyboardInterrupt:  # a Ctrl-C as the receiver closed: noted as any other
            _note_stop_signals(stop_report)
            stop_report.set()

    def say_stopping_now() -> None:
        nonlocal resume_told
        console.print(  # its "[run]" is no markup
            _stopping_now(config, engine, args.new_run), highlight=False, markup=False
        )
        resume_told = engine.run_dir_opened

    def on_signal(signum: int) -> None:
        nonlocal interrupted
        stats = engine.stats()
        if run_over:  # only the report is left to stop
            if is_hangup(signum):
                silence_the_terminal()
            stop_the_report()
        elif is_hangup(signum):  # the terminal is gone: nobody to tell, nothing to wait for
            silence_the_terminal()
            interrupted = True
            stop_report.set()
            engine.cancel()
        elif stats.state == "done" and stats.closing is None:
            # The run's work is over, nothing closes yet: the signal stops the report (taken
            # for nothing, it was lost and the whole report written), and what may still
            # start to close is stopped at once.
            interrupted = True
            stop_the_report()
            engine.cancel()
        elif stats.state == "done":
            # The run's work is over: nothing is in flight, nothing is left to resume;
            # only the judges close. A signal cuts that short (a judge server killed, not
            # given the rest of its grace); the run keeps its outcome.
            interrupted = True
            console.print(
                "stopping now: the run's work is done; what still closes is "
                "stopped at once (a judge server killed)",
                highlight=False,
                markup=False,
            )
            engine.cancel()
        elif stats.closing is not None or stats.state == "stopped":
            # Stopped (or failed) with work left: the judges close, and the run is one to
            # resume. A signal kills what still closes; it does not make the work done.
            interrupted = True
            say_stopping_now()
            engine.cancel()
        elif not interrupted:
            interrupted = True
            if stats.state == "starting":  # nothing in flight: it ends now
                console.print("stopping: the run had not started")
            else:
                console.print(_stopping_gracefully(), highlight=False, markup=False)
            engine.stop()
        else:
            say_stopping_now()
            engine.cancel()

    run_dashboard = None if args.headless else _dashboard(args, console)
    with _sole_error():
        # One receiver from the run to its report's end (but while the dashboard shows): a
        # signal between them was lost, or ended the command by it.
        async with anyio.create_task_group() as signals:
            try:
                # Listening starts before the engine opens: its judges may load models for
                # minutes, and a Ctrl-C meanwhile must not be lost.
                await signals.start(on_signals)
                opening = anyio.CancelScope()
                signals.start_soon(_say_what_opens, engine, console, opening)
                closing = anyio.CancelScope()
                if run_dashboard is not None:
                    # A stop while the judges open closes them before the dashboard shows (a
                    # server being started given its grace): said on the plain screen.
                    opening_closes = anyio.CancelScope()
                    signals.start_soon(_say_what_closes, engine, console, opening_closes)
                    async with engine:
                        opening.cancel()
                        opening_closes.cancel()
                        if not interrupted:
                            # From here the dashboard maps Ctrl-C to stop, then cancel.
                            listening.cancel()
                            await run_dashboard(engine)
                            # The app and its receiver are gone, but the judges may still be
                            # closing (a server given its grace): a signal must still reach the
                            # engine (a kill, not the run's end unannounced), and the screen
                            # say what it waits for.
                            listening = anyio.CancelScope()
                            await signals.start(on_signals)
                            signals.start_soon(_say_what_closes, engine, console, closing)
                        else:
                            await engine.drain()  # stopped while opening: ends at once
                else:
                    signals.start_soon(_say_what_closes, engine, console, closing)
                    with PlainProgress(console) as progress:
                        async with engine, anyio.create_task_group() as tg:
                            opening.cancel()
                            if engine.run_dir_opened:  # else removed: stopped while judges opened
                                console.print(
                                    f"run directory: {engine.run_dir_path}",
                                    highlight=False,
                                    markup=False,
                                )

                            async def refresh() -> None:
                                while True:
                                    progress.update(engine.stats())
                                    await anyio.sleep(PROGRESS_EVERY_S)

                            tg.start_soon(refresh)
                            async for _ in engine.results:
                                pass
                            tg.cancel_scope.cancel()
                        progress.update(engine.stats(), force=True)
                closing.cancel()
                if run_dashboard is not None:
                    opening_closes.cancel()  # stopped while opening: the block was never entered
                run_over = True
                code = await _run_outcome(
                    engine, config, args, console, interrupted, resume_told, stop_report
                )
            finally:
                listening.cancel()
    return code


async def _run_outcome(
    engine: Engine,
    config: RunConfig,
    args: argparse.Namespace,
    console: Console,
    interrupted: bool,
    resume_told: bool,
    stop_report: threading.Event,
) -> int:
    """Say how the run ended, write its report (``stop_report`` stops it) and return the
    command's exit status; ``resume_told``: a hard stop's message said how to resume."""
    for note in engine.stats().notes:
        console.print(f"note: {printable(note)}", highlight=False, markup=False)
    summary = engine.summary()
    if not engine.run_dir_opened:
        # Stopped while the backends opened: the directory named would be another run's
        # (with --new-run) or none at all, and there is nothing to resume.
        console.print(
            f"{summary.state} before the run opened its run directory: nothing was written",
            highlight=False,
            markup=False,
        )
        return EXIT_INTERRUPTED
    console.print(
        f"{summary.state}: {summary.judged} judgements in this run "
        f"(ok {summary.ok}, unscorable {summary.unscorable}, error {summary.error}); "
        f"{summary.quarantined} dataset records quarantined; results in {summary.run_dir}",
        highlight=False,
        markup=False,
    )
    if summary.left_to_judge:
        left = summary.left_to_judge
        console.print(
            f"{left} image{'s' * (left != 1)} on disk left to judge on resume: the stop asked "
            "no judge about them; a resume judges them (reusing the images)",
            highlight=False,
            markup=False,
        )
    # A Ctrl-C that left nothing undone (every sample was in flight) ended the run "done":
    # it is finished, and its report is written as any finished run's.
    if summary.state in ("stopped", "cancelled") or (interrupted and summary.state != "done"):
        # Said after a stop from the dashboard (its keys print nothing) or a graceful one,
        # not again after a hard stop's message; images left to judge promise a resume:
        # say what it is. After --new-run, "the same command" would start yet another
        # directory: the line names the one to resume.
        if not resume_told or summary.left_to_judge:
            console.print(
                _how_to_resume(config, engine, args.new_run), highlight=False, markup=False
            )
        return EXIT_INTERRUPTED
    stats = engine.stats()
    if summary.state == "done" and stats.quarantined and stats.quarantined == stats.records_read:
        # Every record refused: the dataset (or [dataset] image_root) is what to fix, and a
        # script must not take the run for one that judged its samples. With records the
        # filters left out, the filters are why nothing was judged (said in a note).
        console.print(
            f"[red]error:[/] nothing was judged: every one of the {stats.quarantined} dataset "
            "records was quarantined (see the note above); fix the dataset or its \\[dataset] "
            "settings and run again",
            highlight=False,
        )
        return EXIT_CONFIG
    if args.no_report:
        return EXIT_OK
    written = await _final_report(summary.run_dir, console, stop_report)
    return EXIT_OK if written else EXIT_INTERRUPTED


def _stopping_gracefully() -> str:
    """What a graceful stop says: how to stop now, with a signal the run listens for (with
    SIGINT ignored, a Ctrl-C would do nothing)."""
    how = how_to_stop()
    if how is None:
        return "stopping: finishing the work in flight"
    return f"stopping: finishing the work in flight ({how[0]} again to stop now)"


def _stopping_now(config: RunConfig, engine: Engine, new_run: bool) -> str:
    """What a hard stop says: how to resume, once the run directory stays. A directory this
    run made while its judges open is removed by the stop: nothing to resume then."""
    if not engine.run_dir_opened:
        return "stopping now"
    return f"stopping now; {_how_to_resume(config, engine, new_run)}"


def _how_to_resume(config: RunConfig, engine: Engine, new_run: bool) -> str:
    """What resumes the run: the same command, but without --new-run (with it, yet another
    directory would start), and naming the directory --new-run gave it."""
    if not new_run:
        return "run the same command again to resume"
    path = engine.run_dir_path
    if path == config.run_dir:
        return "to resume, run the same command without --new-run"
    return (
        f'to resume, set name = "{path.name}" in the config\'s [run] table and run it '
        "without --new-run"
    )


async def _say_what_opens(engine: Engine, console: Console, scope: anyio.CancelScope) -> None:
    """Say what the engine is opening when it takes a while (a judge server starting, a
    judge model loading: minutes, with nothing else on screen); ends with ``scope``."""
    said = None
    with scope:
        while True:
            await anyio.sleep(OPENING_QUIET_S)
            what = engine.stats().opening
            if what is not None and what != said:
                console.print(f"opening {what}", highlight=False, markup=False)
                said = what


async def _say_what_closes(engine: Engine, console: Console, scope: anyio.CancelScope) -> None:
    """Say what the engine closes once the run is over, when that may take a while (a judge
    server given its grace period: up to ``stop_timeout_s`` with nothing else on screen), and
    that a stop signal cuts it short; ends with ``scope``."""
    said = None
    with scope:
        while True:
            what = engine.stats().closing
            if what is not None and what != said:
                how = how_to_stop()
                hint = "" if how is None else f"; {how[1]} kills it at once"
                console.print(f"closing {what}{hint}", highlight=False, markup=False)
                said = what
            await anyio.sleep(CLOSING_POLL_S)


@contextmanager
def _sole_error() -> Iterator[None]:
    """Let the one error of a task group out as itself, as the engine does, so that ``main``
    maps it to its message and exit code."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = list(leaf_errors(group))
        if len(leaves) == 1:
            # as itself: its own cause kept, the group left out
            raise leaves[0] from leaves[0].__cause__
        raise


def _dashboard(args: argparse.Namespace, console: Console) -> Any:
    """``run_dashboard`` when the dashboard can be shown here, else None (plain progress)."""
    from trig_stream.progress import NO_DASHBOARD, full_screen_possible

    if not full_screen_possible() or args.backend != "asyncio":
        return None
    try:
        from trig_stream.tui.run import run_dashboard
    except ImportError:
        console.print(
            NO_DASHBOARD,
            highlight=False,
            markup=False,  # its "[tui]" is no markup
        )
        return None
    return run_dashboard


async def _final_report(run_dir: Path, console: Console, stop: threading.Event) -> bool:
    """Write a finished run's report; ``stop`` set (by a stop signal, before or meanwhile)
    stops it. Returns False when it was stopped (the judgements are all written: only the
    report is incomplete)."""
    from trig_stream.analysis.commands import write_report
    from trig_stream.analysis.report import ReportStopped

    def write() -> bool:
        try:
            # Its own run holds the lock until the report is written: no run still going.
            folder = write_report(run_dir, console, should_stop=stop.is_set, own_pid=os.getpid())
        except ReportStopped:
            console.print(
                f"report stopped, incomplete: `trig-stream report {run_dir}` writes it",
                highlight=False,
                markup=False,
            )
            return False
        except OutputWriteError as exc:
            console.print(
                f"no report: {printable(str(exc))}; the run's judgements are done: "
                f"`trig-stream report {run_dir} --out DIR` writes the report elsewhere",
                highlight=False,
                markup=False,
            )
            return True
        except AnalysisError as exc:  # e.g. nothing scored: the run itself still succeeded
            console.print(f"no report: {printable(str(exc))}", highlight=False, markup=False)
            return True
        except TrigStreamError as exc:  # the run dir became unreadable (deleted, say)
            console.print(
                f"no report: {printable(str(exc))}; the run's judgements are done: "
                f"`trig-stream report {run_dir}` writes the report once the run directory can "
                "be read",
                highlight=False,
                markup=False,
            )
            return True
        console.print(f"report: {folder}", highlight=False, markup=False)
        return True

    return await anyio.to_thread.run_sync(write)
