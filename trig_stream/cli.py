"""The ``trig-stream`` command: its entry point, its argument parser and ``run``.

``validate`` and ``status`` live in :mod:`trig_stream.inspect_commands`, the other commands
beside what they drive (:data:`EXTRA_COMMANDS`); the exit statuses, in
:mod:`trig_stream.exit_codes`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any, NoReturn

import anyio
from anyio.abc import TaskStatus
from rich.console import Console
from rich.markup import escape

from trig_stream import __version__
from trig_stream.analysis.relations import AnalysisError, OutputWriteError
from trig_stream.backends.library_logs import quiet_model_libraries
from trig_stream.backends.threads import threads_left_behind
from trig_stream.config import RunConfig, load_config
from trig_stream.errors import (
    ConfigError,
    ConfigWriteError,
    RunDirError,
    TrigStreamError,
    leaf_errors,
    require_installed,
)
from trig_stream.exit_codes import EXIT_CONFIG, EXIT_FATAL, EXIT_INTERRUPTED, EXIT_OK, EXIT_RUN_DIR
from trig_stream.files import locale_problem, real_path
from trig_stream.inspect_commands import status_command, validate_command
from trig_stream.path_arguments import path_argument
from trig_stream.records import printable
from trig_stream.signals import (
    how_to_stop,
    ignore_stop_signals_to_the_end,
    is_hangup,
    silence_the_terminal,
    stop_signal_receiver,
    stop_signals,
)
from trig_stream.terminal import CommandConsole

if TYPE_CHECKING:
    from trig_stream.engine import Engine

PROGRESS_EVERY_S = 0.5
OPENING_QUIET_S = 2.0
"""How long an opening step may take before the command says what it waits for."""
CLOSING_POLL_S = 0.1
"""Time between looks at what the engine closes once the run is over (a judge server given
its grace period), to say so at once."""


def entry_point() -> NoReturn:
    """The ``trig-stream`` console script: :func:`main`, then exit with its status.

    A stop does not wait for a model that is loading or a backend checking this machine, nor a
    hard stop for a generation call still running (an images API's answer) or a model closing
    (a device that no longer answers): each goes on in a worker thread, and the interpreter
    would wait for those threads before exiting (minutes, for large weights). Everything the
    command writes is written by then, so it exits at once. So it does when the event loop's
    idle worker threads outlive it (see :func:`_loop_workers_never_stopped`), which the
    interpreter would wait for for ever.
    """
    code = main(exiting=True)
    # The command is done: a signal from here to the exit changes nothing (the console's
    # KeyboardInterrupt, raised out of here, would end it with a traceback; Python's own
    # handlers, put back while it shuts down, would end it by the signal).
    ignore_stop_signals_to_the_end()
    left_behind = threads_left_behind()
    if left_behind:
        CommandConsole(stderr=True, soft_wrap=True).print(  # one line in a log, never cut
            "not waiting for a model still loading or closing, a backend's check of this machine, "
            "or a generation call or judge batch still running"
        )
    if left_behind or _loop_workers_never_stopped():
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


LOOP_WORKER_THREAD = "AnyIO worker thread"
"""The name anyio gives the worker threads of an event loop: it stops them as the loop's main
task ends."""
LOOP_WORKERS_STOP_S = 1.0
"""How long the exit waits for the event loop's worker threads to end once it is gone."""


def _loop_workers_never_stopped() -> bool:
    """Whether worker threads of the command's event loop outlive it by
    :data:`LOOP_WORKERS_STOP_S`: the loop was left by an exception (a KeyboardInterrupt) and
    never told its idle workers to stop. The interpreter's exit waits for such a thread for
    ever, the command's work done and its exit status decided."""
    deadline = time.monotonic() + LOOP_WORKERS_STOP_S
    for thread in threading.enumerate():
        if thread.name == LOOP_WORKER_THREAD and not thread.daemon:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                return True
    return False


def main(argv: Sequence[str] | None = None, *, exiting: bool = False) -> int:
    """Run one command and return its exit status (:func:`entry_point` exits with it).

    Args:
        argv: the command's arguments (by default ``sys.argv[1:]``).
        exiting: the process exits once this returns (the console script). ``run`` then
            leaves its stop signals noted and ignored until the process ends, instead of
            putting back the handlers it found: a signal during the exit (tenths of a second
            of teardown) would otherwise end a finished command by the signal (exit 143).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    # Messages name files and keys: never wrap them, so they stay greppable.
    console = CommandConsole(stderr=True, soft_wrap=True)
    args: argparse.Namespace | None = None
    try:
        # Inside the try: the parser imports the command's module (tenths of a second, for
        # `report` or `watch`), and a Ctrl-C meanwhile is one as any other.
        args = _parse(argv)
        _refuse_unusable_paths(args)
        args.exiting = exiting
        result: int = args.handler(args, console)
        return result
    except (ConfigError, AnalysisError) as exc:
        message = str(exc) + _linked_config_note(args, str(exc))
        console.print(f"[red]error:[/] {escape(printable(message))}", highlight=False)
        # An output that cannot be written is the storage's fault, as an unwritable run
        # directory is: not a bad command line or input.
        unwritable = isinstance(exc, OutputWriteError | ConfigWriteError)
        return EXIT_RUN_DIR if unwritable else EXIT_CONFIG
    except RunDirError as exc:
        message = str(exc) + _linked_config_note(args, str(exc))
        console.print(f"[red]error:[/] {escape(printable(message))}", highlight=False)
        return EXIT_RUN_DIR
    except TrigStreamError as exc:
        message = str(exc) + _linked_config_note(args, str(exc))
        console.print(f"[red]error:[/] {escape(printable(message))}", highlight=False)
        return EXIT_FATAL
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _refuse_unusable_paths(args: argparse.Namespace) -> None:
    """Refuse a path on the command line that this locale cannot name (see
    :func:`~trig_stream.files.locale_problem`), before any command looks it up.

    Raises:
        ConfigError: one cannot be used.
    """
    for value in vars(args).values():
        for path in value if isinstance(value, list) else [value]:
            if isinstance(path, PurePath) and (problem := locale_problem(path)) is not None:
                raise ConfigError(problem)


def _linked_config_note(args: argparse.Namespace | None, message: str) -> str:
    """A clause for an error naming a path read relative to the config, when the config is a
    symbolic link: its relative paths are read from the link's folder, not the linked
    file's, which a user looking at the file may not expect."""
    config = getattr(args, "config", None)
    if not isinstance(config, Path):
        return ""
    try:
        if not config.is_symlink():
            return ""
        folder, linked = real_path(config.parent), real_path(config).parent
    except OSError:
        return ""
    if folder == linked or str(folder) not in message:
        return ""
    return (
        f" (config {config} is a symbolic link to a file in {linked}: its relative paths are "
        f"read from the link's folder, {folder}, not the linked file's)"
    )


# Commands defined elsewhere, as (module, function adding them). Only the module of the
# command being run is imported, so `trig-stream run` does not pay for the others' imports.
EXTRA_COMMANDS: dict[str, tuple[str, str]] = {
    "report": ("trig_stream.analysis.commands", "add_commands"),
    "analyze": ("trig_stream.analysis.commands", "add_commands"),
    "compare": ("trig_stream.analysis.commands", "add_commands"),
    "watch": ("trig_stream.tui.watch", "add_watch_command"),
    "import-config": ("trig_stream.upstream_config", "add_import_config_command"),
    "simulate-judge": ("trig_stream.testing.simulate_judge", "add_simulate_judge_command"),
    "make-tiny-models": ("trig_stream.testing.tiny_models", "add_tiny_models_command"),
}
CORE_COMMANDS = ("run", "validate", "status")


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    """The command line's arguments; a usage error exits 2 with the usage of what it concerns:
    an unknown option before COMMAND, the top-level usage (``trig-stream --bogus`` said COMMAND
    was required, and ``--bogus run x`` blamed run); one after it, the command's (argparse
    reported an unknown option of ``run`` with the top-level usage).
    """
    parser = _parser(_command_name(argv))
    start = _command_start(argv)
    # The top-level options alone first (COMMAND not required there): -h and --version act
    # at once, as argparse does; anything else there is no option of trig-stream's.
    _, unknown = parser.parse_known_args(argv[:start])
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args, unknown = parser.parse_known_args(argv)
    if args.command is None:
        parser.error("the following arguments are required: COMMAND")
    command: argparse.ArgumentParser = args.command_parser
    if unknown:
        command.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def _command_start(argv: Sequence[str]) -> int:
    """Where COMMAND starts in ``argv`` (its length when there is none): the first word that is
    no option, or ``--``. The top-level options take no value."""
    for index, word in enumerate(argv):
        if word in ("-", "--") or not word.startswith("-"):
            return index
    return len(argv)


def _command_name(argv: Sequence[str]) -> str | None:
    """The word where COMMAND stands in ``argv`` (the parser imports that command's module
    alone), if any."""
    start = _command_start(argv)
    return argv[start] if start < len(argv) else None


class _CommandParser(argparse.ArgumentParser):
    """A command's parser: argparse's refusal of ``--retry-errors`` with ``--new-run`` (one
    mutually exclusive group, so the usage shows ``[--retry-errors | --new-run]``) says why."""

    def error(self, message: str) -> NoReturn:
        if "not allowed with argument" in message and all(
            option in message for option in ("--retry-errors", "--new-run")
        ):
            # Accepted silently, it did nothing: a fresh directory holds no judgement.
            message = (
                "argument --retry-errors: not allowed with --new-run: a new run directory has "
                "no errors to ask again; leave one of them out"
            )
        super().error(message)


def _parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; with ``command``, only that command's module is imported."""
    parser = argparse.ArgumentParser(
        prog="trig-stream",
        description="Evaluate image generators on TRIG as a stream: generate, judge, analyse.",
    )
    parser.add_argument("--version", action="version", version=f"trig-stream {__version__}")
    # Not required here: _parse says so, once the options before COMMAND are checked.
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_CommandParser)

    run = commands.add_parser("run", help="run (or resume) an evaluation")
    run.add_argument("config", type=path_argument, help="the run's TOML config")
    run.add_argument(
        "--headless",
        action="store_true",
        help="plain progress, no dashboard (the default when not on a terminal)",
    )
    run_dir_choice = run.add_mutually_exclusive_group()
    run_dir_choice.add_argument(
        "--retry-errors", action="store_true", help="ask again the judgements that failed"
    )
    run_dir_choice.add_argument(
        "--new-run",
        action="store_true",
        help="start a fresh run directory beside the configured one if that exists (<name>-2, ...)",
    )
    run.add_argument(
        "--no-report", action="store_true", help="do not write the report when the run ends"
    )
    run.add_argument(
        "--backend", choices=["asyncio", "trio"], default="asyncio", help=argparse.SUPPRESS
    )
    run.set_defaults(handler=_cmd_run)

    validate = commands.add_parser("validate", help="check a config without running it")
    validate.add_argument("config", type=path_argument)
    validate_choice = validate.add_mutually_exclusive_group()
    validate_choice.add_argument(
        "--retry-errors",
        action="store_true",
        help="count the judgements that failed as work, as `run --retry-errors` asks them again",
    )
    validate_choice.add_argument(
        "--new-run",
        action="store_true",
        help="check as `run --new-run` would: the fresh run directory it would start",
    )
    validate.set_defaults(handler=validate_command)

    status = commands.add_parser("status", help="summarise a run directory")
    status.add_argument("run_dir", type=path_argument)
    status.set_defaults(handler=status_command)
    if command not in CORE_COMMANDS:
        wanted = [EXTRA_COMMANDS[command]] if command in EXTRA_COMMANDS else EXTRA_COMMANDS.values()
        for module_name, function in dict.fromkeys(wanted):
            getattr(importlib.import_module(module_name), function)(commands)
    for sub in commands.choices.values():  # whose usage a usage error shows (see _parse)
        sub.set_defaults(command_parser=sub)
    return parser


def _cmd_run(args: argparse.Namespace, console: Console) -> int:
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
            console.print(  # its "[run]" is no markup
                _stopping_now(config, engine, args.new_run),
                highlight=False,
                markup=False,
            )
            engine.cancel()
        elif not interrupted:
            interrupted = True
            if stats.state == "starting":  # nothing in flight: it ends now
                console.print("stopping: the run had not started")
            else:
                console.print(_stopping_gracefully(), highlight=False, markup=False)
            engine.stop()
        else:
            console.print(  # its "[run]" is no markup
                _stopping_now(config, engine, args.new_run),
                highlight=False,
                markup=False,
            )
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
                code = await _run_outcome(engine, config, args, console, interrupted, stop_report)
            finally:
                listening.cancel()
    return code


async def _run_outcome(
    engine: Engine,
    config: RunConfig,
    args: argparse.Namespace,
    console: Console,
    interrupted: bool,
    stop_report: threading.Event,
) -> int:
    """Say how the run ended, write its report (``stop_report`` stops it) and return the
    command's exit status."""
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
        # After --new-run, "the same command" would start yet another directory: the line
        # names the one to resume. Images left to judge promise a resume: say what it is.
        if args.new_run or summary.left_to_judge:
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


if __name__ == "__main__":
    sys.exit(main(exiting=True))
