"""The ``trig-stream`` command: its entry point and its argument parser.

``run`` lives in :mod:`trig_stream.run_command`, ``validate`` and ``status`` in
:mod:`trig_stream.inspect_commands`, the other commands beside what they drive
(:data:`EXTRA_COMMANDS`); the exit statuses, in :mod:`trig_stream.exit_codes`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path, PurePath
from typing import NoReturn

from rich.markup import escape

from trig_stream import __version__
from trig_stream.analysis.relations import AnalysisError, OutputWriteError
from trig_stream.backends.threads import threads_left_behind
from trig_stream.config import read_config_file
from trig_stream.config_paths import resolved_paths
from trig_stream.errors import ConfigError, ConfigWriteError, RunDirError, TrigStreamError
from trig_stream.exit_codes import EXIT_CONFIG, EXIT_FATAL, EXIT_INTERRUPTED, EXIT_RUN_DIR
from trig_stream.files import locale_problem, real_path
from trig_stream.inspect_commands import status_command, validate_command
from trig_stream.path_arguments import path_argument
from trig_stream.records import printable
from trig_stream.run_command import cmd_run
from trig_stream.signals import ignore_stop_signals_to_the_end
from trig_stream.terminal import CommandConsole


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
    file's, which a user looking at the file may not expect.

    Only for a path of the config that leads elsewhere from the linked file's folder: the
    link's folder itself is seldom in the message, a ``../data`` path resolved past it.
    """
    config = getattr(args, "config", None)
    if not isinstance(config, Path):
        return ""
    try:
        if not config.is_symlink():
            return ""
        folder, linked = real_path(config.parent), real_path(config).parent
        data, _ = read_config_file(config)
        from_link, from_file = resolved_paths(data, config.parent), resolved_paths(data, linked)
    except (OSError, ConfigError):
        return ""
    if not any(
        str(path) in message and path != from_file.get(loc) for loc, path in from_link.items()
    ):
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
    run.set_defaults(handler=cmd_run)

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


if __name__ == "__main__":
    sys.exit(main(exiting=True))
