"""The ``trig-stream`` command.

Exit codes:

* 0: the run finished (per-item failures are recorded and reported, not fatal);
* 1: an unexpected internal error;
* 2: bad command line, invalid config or unusable input file (nothing was done);
* 3: the run directory was refused (in use, or made with other settings) or is unreadable;
* 4: the run stopped on a fatal error (dataset unreadable, judge credentials...); resumable;
* 130: interrupted (Ctrl-C or SIGTERM); resumable by running the same command again
  (without --new-run: see the stop message).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, get_args

import anyio
from anyio.abc import TaskStatus
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Column, Table

from trig_stream.analysis.relations import AnalysisError
from trig_stream.backends.base import threads_left_behind
from trig_stream.backends.registry import build_generator, build_judge
from trig_stream.config import RunConfig, load_config
from trig_stream.errors import ConfigError, RunDirError, TrigStreamError, leaf_errors
from trig_stream.records import Status
from trig_stream.signals import is_hangup, silence_the_terminal, stop_signals
from trig_stream.terminal import CommandConsole

if TYPE_CHECKING:
    from trig_stream.engine import Engine
    from trig_stream.records import JudgementKey

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_CONFIG = 2
EXIT_RUN_DIR = 3
EXIT_FATAL = 4
EXIT_INTERRUPTED = 130

PROGRESS_EVERY_S = 0.5
STATUSES: tuple[Status, ...] = get_args(Status)
ASKED_AGAIN = "asked again"
"""``status``'s column of the ``error`` judgements a run with ``--retry-errors`` asks again."""
OPENING_QUIET_S = 2.0
"""How long an opening step may take before the command says what it waits for."""
QUIET_LIBRARIES = {
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}


def entry_point() -> NoReturn:
    """The ``trig-stream`` console script: :func:`main`, then exit with its status.

    A stop does not wait for a model that is loading, nor a hard stop for a generation call
    still running (an images API's answer) or a model closing (a device that no longer
    answers): each goes on in a worker thread, and the interpreter would wait for those
    threads before exiting (minutes, for large weights). Everything the command writes is
    written by then, so it exits at once.
    """
    code = main()
    if threads_left_behind():
        CommandConsole(stderr=True, soft_wrap=True).print(  # one line in a log, never cut
            "not waiting for a model still loading or closing, or a generation call still running"
        )
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command and return its exit status (:func:`entry_point` exits with it)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    # Messages name files and keys: never wrap them, so they stay greppable.
    console = CommandConsole(stderr=True, soft_wrap=True)
    try:
        result: int = args.handler(args, console)
        return result
    except (ConfigError, AnalysisError) as exc:
        console.print(f"[red]error:[/] {escape(str(exc))}", highlight=False)
        return EXIT_CONFIG
    except RunDirError as exc:
        console.print(f"[red]error:[/] {escape(str(exc))}", highlight=False)
        return EXIT_RUN_DIR
    except TrigStreamError as exc:
        console.print(f"[red]error:[/] {escape(str(exc))}", highlight=False)
        return EXIT_FATAL
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


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


def _parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; with ``command``, only that command's module is imported."""
    parser = argparse.ArgumentParser(
        prog="trig-stream",
        description="Evaluate image generators on TRIG as a stream: generate, judge, analyse.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run (or resume) an evaluation")
    run.add_argument("config", type=Path, help="the run's TOML config")
    run.add_argument(
        "--headless",
        action="store_true",
        help="plain progress, no dashboard (the default when not on a terminal)",
    )
    run.add_argument(
        "--retry-errors", action="store_true", help="ask again the judgements that failed"
    )
    run.add_argument(
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
    validate.add_argument("config", type=Path)
    validate.set_defaults(handler=_cmd_validate)

    status = commands.add_parser("status", help="summarise a run directory")
    status.add_argument("run_dir", type=Path)
    status.set_defaults(handler=_cmd_status)
    if command in CORE_COMMANDS:
        return parser
    wanted = [EXTRA_COMMANDS[command]] if command in EXTRA_COMMANDS else EXTRA_COMMANDS.values()
    for module_name, function in dict.fromkeys(wanted):
        getattr(importlib.import_module(module_name), function)(commands)
    return parser


VALIDATE_SHOWN = 5
"""Records `validate` lists of those a run would quarantine."""


def _cmd_validate(args: argparse.Namespace, console: Console) -> int:
    from trig_stream.backends.base import reads_source_images
    from trig_stream.dataset import DatasetSource
    from trig_stream.dimensions import Dimension
    from trig_stream.preflight import (
        check_environment,
        ensure_open_files,
        judge_fingerprint,
        run_manifest,
    )
    from trig_stream.records import QuarantinedRecord
    from trig_stream.sourcing import Owed
    from trig_stream.store import check_resume

    config = load_config(args.config)
    # Building the backends makes the checks ``run`` makes next (a generator's devices against
    # its workers, its inputs against the task...); it loads no model and connects nowhere.
    # Then, in the run's order, the files its judges' connections need (the limits only
    # read: the run raises the soft one), and what each backend needs from this machine
    # that can be seen without loading anything: an API key's variable, a serve command on
    # PATH, a local checkpoint folder.
    generators = [build_generator(generator, config) for generator in config.generators]
    judges = [build_judge(judge, config) for judge in config.judges]
    ensure_open_files(config, judges, raise_limit=False)
    for generator in generators:
        check_environment(generator)
    for built in judges:
        check_environment(built)
    # What the run directory holds is compared with these settings as the run compares it,
    # reading it only: a run it would refuse (a run still going there, results made with
    # another seed) is refused here, with the run's message and exit code.
    fingerprints = {judge.name: judge_fingerprint(judge) for judge in judges}
    journal = check_resume(config.run_dir, run_manifest(config, generators, fingerprints))
    # The dataset is read through, as a run reads it: a file that is missing or cannot be
    # read fails here (DatasetError, the run's exit code), and the records the run would
    # quarantine are listed, those edited since they were judged in the run directory too.
    # A sample the run directory already holds every judgement of is passed over unbuilt, as
    # the run passes it over (its source image is not looked up: one removed since is no
    # reason to refuse it).
    owed = Owed([g.name for g in generators], judges, journal, retry_errors=False)
    finished = Counter[str]()

    def passed_over(data_id: str, dimensions: tuple[Dimension, ...]) -> bool:
        if not owed.finished(data_id, dimensions):
            return False
        finished["judged" if owed.measured(dimensions) else "unmeasured"] += 1
        return True

    source = DatasetSource(
        config.dataset,
        config.run.task,
        finished=passed_over,
        judged=journal.digests,
        source_images=reads_source_images(generators),
    )
    samples = 0
    refused: list[QuarantinedRecord] = []
    for record in source:
        if isinstance(record, QuarantinedRecord):
            refused.append(record)
            continue
        samples += 1
    unmeasured = finished["unmeasured"]
    # Every record refused: the run would judge nothing and exit 2, and so does this. Records
    # the filters left out are not refused: with them, the filters are why nothing is judged.
    refused_all = bool(refused) and len(refused) == source.records_read
    out = CommandConsole(soft_wrap=True)  # greppable: a path is never cut in two
    verdict = "[red]nothing to judge[/]" if refused_all else "[green]ok[/]"
    out.print(f"{verdict}: {escape(str(args.config))}", highlight=False)
    out.print(
        f"  run {config.run.name!r}, task {config.run.task}, writes to {config.run_dir}",
        highlight=False,
        markup=False,
    )
    records = f"{source.records_read} records"
    if source.limit_reached:  # the rest was not read: how many there are, said apart
        records = (
            f"{source.count_records()} records (the first {source.records_read} read: "
            f"limit = {config.dataset.limit})"
        )
    counts = f"{records}, {samples} sample{'s' * (samples != 1)} to judge"
    if finished["judged"]:
        counts += f", {finished['judged']} already judged in the run directory"
    if source.filtered_out:
        counts += f", {source.filtered_out} left out by its filters"
    out.print(f"  dataset {config.dataset.path}: {counts}", highlight=False, markup=False)
    if unmeasured:
        out.print(
            f"  [yellow]{unmeasured} of the samples have no dimension a judge measures[/]: "
            "they would not be judged",
            highlight=False,
        )
    if refused:
        first = f"; the first {VALIDATE_SHOWN}" if len(refused) > VALIDATE_SHOWN else ""
        out.print(f"  [yellow]{len(refused)} records would be quarantined[/]{first}:")
        for record in refused[:VALIDATE_SHOWN]:
            reason = record.reason if len(record.reason) <= 160 else record.reason[:159] + "…"
            out.print(f"    record {record.index}: {reason}", highlight=False, markup=False)
    for what, entries in (("models", config.generators), ("judges", config.judges)):
        names = ", ".join(f"{entry.name} ({entry.backend})" for entry in entries)
        out.print(f"  {what}: {names}", highlight=False, markup=False)
    if refused_all:
        console.print(
            f"[red]error:[/] every one of the {len(refused)} records read would be "
            "quarantined (see the reasons above): a run would judge nothing; fix the dataset "
            "or its \\[dataset] settings",
            highlight=False,
        )
        return EXIT_CONFIG
    return EXIT_OK


def _cmd_run(args: argparse.Namespace, console: Console) -> int:
    config = load_config(args.config)
    # Model libraries print progress bars and advice on every load; the run's own progress
    # says what matters. Set these variables to see them again.
    for name, value in QUIET_LIBRARIES.items():
        os.environ.setdefault(name, value)
    handlers = {signum: signal.getsignal(signum) for signum in stop_signals()}
    try:
        return anyio.run(_run, config, args, console, backend=args.backend)
    finally:
        for signum, handler in handlers.items():  # what they were: main() may be called again
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
    from trig_stream.progress import PlainProgress

    engine = Engine(config, retry_errors=args.retry_errors, new_run=args.new_run)
    interrupted = False

    listening = anyio.CancelScope()

    async def on_signals(*, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        nonlocal interrupted
        with listening, anyio.open_signal_receiver(*stop_signals()) as signals:
            task_status.started()
            async for signum in signals:
                if is_hangup(signum):  # the terminal is gone: nobody to tell, nothing to wait for
                    silence_the_terminal()
                    interrupted = True
                    engine.cancel()
                elif not interrupted:
                    interrupted = True
                    if engine.stats().state == "starting":  # nothing in flight: it ends now
                        console.print("stopping: the run had not started")
                    else:
                        console.print(
                            "stopping: finishing the work in flight (press Ctrl-C again to "
                            "stop now)"
                        )
                    engine.stop()
                else:
                    console.print(f"stopping now; {_how_to_resume(config, engine, args.new_run)}")
                    engine.cancel()

    run_dashboard = None if args.headless else _dashboard(args, console)
    with _sole_error():
        async with anyio.create_task_group() as signals:
            # Listening starts before the engine opens: its judges may load models for
            # minutes, and a Ctrl-C meanwhile must not be lost.
            await signals.start(on_signals)
            opening = anyio.CancelScope()
            signals.start_soon(_say_what_opens, engine, console, opening)
            if run_dashboard is not None:
                async with engine:
                    opening.cancel()
                    if not interrupted:
                        # From here the dashboard maps Ctrl-C to stop, then cancel.
                        listening.cancel()
                        await run_dashboard(engine)
                    else:
                        await engine.drain()  # stopped while opening: ends at once
            else:
                with PlainProgress(console) as progress:
                    async with engine, anyio.create_task_group() as tg:
                        opening.cancel()
                        console.print(
                            f"run directory: {engine.run_dir_path}", highlight=False, markup=False
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
            listening.cancel()
    # The run's receiver is closed: a stop signal from here stops the report, if any.
    stop_report = threading.Event()
    _note_stop_signals(stop_report)
    for note in engine.stats().notes:
        console.print(f"note: {note}", highlight=False, markup=False)
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
    # A Ctrl-C that left nothing undone (every sample was in flight) ended the run "done":
    # it is finished, and its report is written as any finished run's.
    if summary.state in ("stopped", "cancelled") or (interrupted and summary.state != "done"):
        if args.new_run:
            console.print(_how_to_resume(config, engine, True), highlight=False, markup=False)
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
    _note_stop_signals(threading.Event())  # the command is done: a signal now changes nothing
    return EXIT_OK if written else EXIT_INTERRUPTED


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


@contextmanager
def _sole_error() -> Iterator[None]:
    """Let the one error of a task group out as itself, as the engine does, so that ``main``
    maps it to its message and exit code."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = list(leaf_errors(group))
        if len(leaves) == 1:
            raise leaves[0] from None
        raise


def _dashboard(args: argparse.Namespace, console: Console) -> Any:
    """``run_dashboard`` when the dashboard can be shown here, else None (plain progress)."""
    from trig_stream.progress import full_screen_possible

    if not full_screen_possible() or args.backend != "asyncio":
        return None
    try:
        from trig_stream.tui.run import run_dashboard
    except ImportError:
        console.print("no dashboard: install it with pip install 'trig-stream[tui]'")
        return None
    return run_dashboard


async def _final_report(run_dir: Path, console: Console, stop: threading.Event) -> bool:
    """Write a finished run's report; a stop signal meanwhile (or ``stop`` already set)
    stops it. Returns False when it was stopped (the judgements are all written: only the
    report is incomplete)."""
    from trig_stream.analysis.commands import write_report
    from trig_stream.analysis.report import ReportStopped

    async def on_signals(*, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        with anyio.open_signal_receiver(*stop_signals()) as signals:
            task_status.started()
            async for signum in signals:
                if is_hangup(signum):
                    silence_the_terminal()
                if not stop.is_set():
                    stop.set()  # before saying so: the report may look at once
                    console.print("stopping the report", highlight=False)

    def write() -> bool:
        try:
            folder = write_report(run_dir, console, should_stop=stop.is_set)
        except ReportStopped:
            console.print(
                f"report stopped, incomplete: `trig-stream report {run_dir}` writes it",
                highlight=False,
                markup=False,
            )
            return False
        except AnalysisError as exc:  # e.g. nothing scored: the run itself still succeeded
            console.print(f"no report: {exc}", highlight=False, markup=False)
            return True
        except TrigStreamError as exc:  # the run dir became unreadable (deleted, say)
            console.print(
                f"no report: {exc}; the run's judgements are done: `trig-stream report "
                f"{run_dir}` writes the report once the run directory can be read",
                highlight=False,
                markup=False,
            )
            return True
        console.print(f"report: {folder}", highlight=False, markup=False)
        return True

    async with anyio.create_task_group() as tg:
        await tg.start(on_signals)
        written = await anyio.to_thread.run_sync(write)
        tg.cancel_scope.cancel()
    return written


def _asked_by_manifest(config: dict[str, Any]) -> Callable[[JudgementKey], bool] | None:
    """Which judgement keys a run of the manifest's ``config`` asks (None: unknown)."""
    from trig_stream.tui.watch_source import asked_by_config

    try:
        return asked_by_config(RunConfig.model_validate(config))
    except ValueError:  # a manifest edited by hand, or written by another version
        return None


def _cmd_status(args: argparse.Namespace, console: Console) -> int:
    from trig_stream.files import open_regular_file
    from trig_stream.journal import JOURNAL, read_journal_lines
    from trig_stream.locks import writer_pid
    from trig_stream.records import Judgement
    from trig_stream.store import QUARANTINE, errors_asked_again, quarantine_lists, read_manifest

    manifest = read_manifest(args.run_dir)
    # Asked before the journal is read, as `watch` asks: a writer that is gone by then has
    # written its last line, which the counts then hold.
    writer = writer_pid(args.run_dir)
    latest: dict[JudgementKey, tuple[int, Judgement]] = {
        j.key: (line, j) for line, j in read_journal_lines(args.run_dir / JOURNAL)
    }
    asked = selected = None
    if writer is not None and manifest.retry_errors:
        # Only the errors of samples and dimensions the run still selects are asked again:
        # read from its dataset, as `watch` reads it (unknown if it cannot be read here).
        selected = _asked_by_manifest(manifest.config)
        asked = errors_asked_again(manifest, selected)
    # Per metric, as the report separates them: two judges' scores of one dimension are not
    # one mean, nor are their counts one count. An error the running process asks again
    # (--retry-errors) is work left, not an error that stands.
    counts: Counter[tuple[str, str, str]] = Counter()
    sums: dict[tuple[str, str, str], float] = {}
    scored: Counter[tuple[str, str, str]] = Counter()
    for line, judgement in latest.values():
        status: str = judgement.status
        if status == "error" and asked is not None and asked(judgement.key, line):
            status = ASKED_AGAIN
        counts[(judgement.model, judgement.metric, status)] += 1
        if judgement.score is not None:
            where = (judgement.model, judgement.metric, judgement.dimension)
            sums[where] = sums.get(where, 0.0) + judgement.score
            scored[where] += 1
    judges = manifest.config.get("judges")
    judges = judges if isinstance(judges, list) else []  # a manifest edited by hand
    metrics = [str(j["name"]) for j in judges if isinstance(j, dict) and "name" in j]
    metrics += sorted({metric for _, metric, _ in counts} - set(metrics))
    # Names and paths are the user's: printed as they are, never read as markup, never wrapped.
    out = CommandConsole(soft_wrap=True, markup=False, highlight=False)
    out.print(f"run {manifest.run_name!r} ({manifest.task}) in {args.run_dir}")
    if writer is None:
        out.print("not running; `trig-stream run` with its config judges whatever is left")
    else:
        retrying = ""
        if asked is not None:
            which = "the error judgements written before it started"
            if selected is None:  # its dataset unread: which ones it still selects is unknown
                which += " (of samples its dataset still selects)"
            retrying = (
                f" with --retry-errors: {which} are being asked again ({ASKED_AGAIN!r} "
                "below, not counted as errors)"
            )
        out.print(
            f"running (pid {writer}){retrying}; the counts below are as of now; follow it "
            f"live with `trig-stream watch {args.run_dir}`"
        )
    columns: tuple[str, ...] = STATUSES
    if asked is not None:
        columns += (ASKED_AGAIN,)
    table = Table(Column("model", overflow="fold"), Column("metric", overflow="fold"))
    for heading in (*columns, "total"):
        table.add_column(heading)
    for model in sorted({m for m, _, _ in counts} | set(manifest.generators)):
        present = [m for m in metrics if any(counts[(model, m, s)] for s in columns)]
        for metric in present or ["–"]:
            row = [counts[(model, metric, s)] for s in columns]
            table.add_row(model, metric, *map(str, row), str(sum(row)))
    _print_whole(out, table)
    if scored:
        means = Table(
            *(Column(name, overflow="fold") for name in ("model", "metric", "dimension")),
            "mean score",
            "n",
        )
        order = {metric: index for index, metric in enumerate(metrics)}
        for key in sorted(scored, key=lambda k: (k[0], order[k[1]], k[2])):
            model, metric, dimension = key
            mean = f"{sums[key] / scored[key]:.3f}"
            means.add_row(model, metric, dimension, mean, str(scored[key]))
        _print_whole(out, means)
    refused = 0
    for quarantine in quarantine_lists(args.run_dir, running=writer is not None):
        try:
            with open_regular_file(quarantine) as lines:  # a pipe there would wait forever
                refused = sum(1 for _ in lines)
        except FileNotFoundError:
            continue
        except OSError as exc:
            out.print(
                f"cannot read {quarantine}: {exc.strerror or exc}: the quarantined records are "
                "not counted"
            )
        break
    if refused and quarantine.name == QUARANTINE:
        out.print(f"{refused} dataset records quarantined (see {quarantine})")
    elif refused and writer is not None:
        out.print(f"{refused} dataset records quarantined so far by the run (see {quarantine})")
    elif refused:
        out.print(
            f"{refused} dataset records quarantined by a run stopped before it read the "
            f"dataset through (see {quarantine})"
        )
    return EXIT_OK


def _print_whole(out: Console, table: Table) -> None:
    """Print ``table`` with its names whole: on a terminal, a name too long for its column
    is folded onto the next line; elsewhere (``| grep``, a file) the table is as wide as its
    longest row needs, so that each row stays on one line."""
    if out.is_terminal:
        out.print(table)
        return
    natural = Measurement.get(out, out.options.update_width(MEASURED_UP_TO), table).maximum
    width = out.width
    out.width = max(width, natural)  # print's own width can only narrow the console's
    try:
        out.print(table)
    finally:
        out.width = width


MEASURED_UP_TO = 10_000
"""The widest table ``status`` prints as it is when not on a terminal (characters)."""


if __name__ == "__main__":
    sys.exit(main())
