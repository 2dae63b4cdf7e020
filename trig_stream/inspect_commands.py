"""The commands that look and change nothing: ``validate`` checks a config as ``run`` would
(backends built, run directory and dataset read), ``status`` summarises a run directory."""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Column, Table

from trig_stream.backends.registry import build_generator, build_judge, check_backends
from trig_stream.config import RunConfig, load_config
from trig_stream.exit_codes import EXIT_CONFIG, EXIT_OK
from trig_stream.records import Status, printable
from trig_stream.terminal import CommandConsole

if TYPE_CHECKING:
    from trig_stream.journal import JournalEntry
    from trig_stream.manifest import Manifest
    from trig_stream.records import JudgementKey

VALIDATE_SHOWN = 5
"""Records `validate` lists of those a run would quarantine."""


def validate_command(args: argparse.Namespace, console: Console) -> int:
    """``trig-stream validate CONFIG``: make the checks ``run`` makes before any work, print
    what the run would do, and return the exit status it would have on these grounds."""
    from trig_stream.backends.base import reads_source_images
    from trig_stream.backends.judges.openai_judge import OpenAIJudge
    from trig_stream.backends.library_logs import quiet_model_libraries
    from trig_stream.dataset import DatasetSource
    from trig_stream.dimensions import Dimension
    from trig_stream.journal import JournalState
    from trig_stream.new_runs import check_new_run
    from trig_stream.opening import judges_open_slowly
    from trig_stream.preflight import (
        check_environments,
        ensure_open_files,
        judge_fingerprint,
        run_manifest,
    )
    from trig_stream.records import QuarantinedRecord
    from trig_stream.resume_checks import check_resume
    from trig_stream.run_dir_access import ImagesOnDisk, check_image_folders
    from trig_stream.sourcing import Owed

    config = load_config(args.config)
    quiet_model_libraries()  # as ``run`` does: a class looked up prints no library's advice
    # Building the backends makes the checks ``run`` makes next (a generator's devices against
    # its workers, its inputs against the task...); it loads no model and connects nowhere.
    # Then, in the run's order, the files its judges' connections need (the limits only
    # read: the run raises the soft one), and what each backend needs from this machine
    # that can be seen without loading anything: an API key's variable, a serve command on
    # PATH, a local checkpoint folder.
    generators = [build_generator(generator, config) for generator in config.generators]
    judges = [build_judge(judge, config) for judge in config.judges]
    check_backends(generators, judges)  # as the engine checks them (two servers at one port)
    ensure_open_files(config, judges, raise_limit=False)
    # Through the run's own path (a worker thread): a check's ``sys.exit()`` or
    # KeyboardInterrupt is the run's error and exit code here too, not the process's end.
    check_environments([*generators, *judges])
    # What the run directory holds is compared with these settings as the run compares it,
    # reading it only: a run it would refuse (a run still going there, results made with
    # another seed) is refused here, with the run's message and exit code.
    # With --new-run, the run starts a fresh directory beside it: only that it can be made.
    fingerprints = {judge.name: judge_fingerprint(judge) for judge in judges}
    manifest = run_manifest(config, generators, fingerprints)
    if args.new_run:
        run_dir, journal = check_new_run(config.run_dir, manifest), JournalState()
    else:
        run_dir = config.run_dir
        journal = check_resume(run_dir, manifest)
    # A judge's fixed serve.port, once the run directory passed: a run still going there
    # holds it with its server, and is what a run is refused for (exit 3), as the run
    # refuses it before its judges start. Else the port is why the server's start fails.
    # A resumed run whose judges open slowly first reads its dataset, and with nothing left
    # to judge starts no server (see Resources._nothing_left): then after the reading below,
    # and only with samples to judge.
    reads_first = bool(len(journal)) and judges_open_slowly(judges)

    def check_serve_ports() -> None:
        for judge in judges:
            if isinstance(judge, OpenAIJudge):
                judge.check_serve_port()

    if not reads_first:
        check_serve_ports()
    # The dataset is read through, as a run reads it: a file that is missing or cannot be
    # read fails here (DatasetError, the run's exit code), and the records the run would
    # quarantine are listed, those edited since they were judged in the run directory too.
    # A sample the run directory already holds every judgement of is passed over unbuilt, as
    # the run passes it over (its source image is not looked up: one removed since is no
    # reason to refuse it).
    models = [g.name for g in generators]
    kept = Owed(models, judges, journal, retry_errors=False)
    asked_again = Owed(models, judges, journal, retry_errors=True)
    owed = asked_again if args.retry_errors else kept
    finished = Counter[str]()
    working: set[str] = set()
    """The models that owe a judgement of a sample whose image is not on disk: the run writes
    their images. One already there is reused (generation's reusable_image), nothing written."""
    task = config.run.task
    on_disk = ImagesOnDisk(run_dir, task)

    def passed_over(data_id: str, dimensions: tuple[Dimension, ...]) -> bool:
        # The error judgements of the sample: asked again with --retry-errors, else kept.
        again = [asked_again.todo(model, data_id, dimensions) for model in models]
        left = [kept.todo(model, data_id, dimensions) for model in models]
        finished["errors"] += sum(len(a) - len(k) for a, k in zip(again, left, strict=True))
        todos = again if args.retry_errors else left
        if any(todos):  # not owed.finished(), which asks each todo again
            # Each image to make: its path's length, and a folder in its place, are refused.
            for model, todo in zip(models, todos, strict=True):
                if todo and on_disk.to_make(model, data_id):
                    working.add(model)
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
    if reads_first and samples:
        check_serve_ports()
    # Where the run writes the images of what is left to judge: a file in the way, or a
    # folder it cannot write, stopped it at its first image (and validate said ok). Images
    # all on disk are only read: then nothing need be writable.
    if samples and working:
        check_image_folders(run_dir, task, sorted(working))
    unmeasured = finished["unmeasured"]
    # Every record refused: the run would judge nothing and exit 2, and so does this. Records
    # the filters left out are not refused: with them, the filters are why nothing is judged.
    refused_all = bool(refused) and len(refused) == source.records_read
    out = CommandConsole(soft_wrap=True)  # greppable: a path is never cut in two
    verdict = "[red]nothing to judge[/]" if refused_all else "[green]ok[/]"
    out.print(f"{verdict}: {escape(str(args.config))}", highlight=False)
    fresh = f" (--new-run: a fresh run directory beside {config.run_dir})" * (
        run_dir != config.run_dir
    )
    out.print(
        f"  run {config.run.name!r}, task {config.run.task}, writes to {run_dir}{fresh}",
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
    errors = finished["errors"]
    if errors and args.retry_errors:
        counts += f", {errors} error judgement{'s' * (errors != 1)} to ask again"
    elif errors:
        counts += (
            f", {errors} error judgement{'s' * (errors != 1)} kept (--retry-errors asks "
            f"{'them' if errors != 1 else 'it'} again)"
        )
    if source.filtered_out:
        counts += f", {source.filtered_out} left out by its filters"
    out.print(f"  dataset {config.dataset.path}: {counts}", highlight=False, markup=False)
    for note in source.notes:
        out.print(f"  note: {note}", highlight=False, markup=False)
    if unmeasured:
        out.print(
            f"  [yellow]{unmeasured} of the samples have no dimension a judge measures[/]: "
            "they would not be judged",
            highlight=False,
        )
    if refused:
        first = f"; the first {VALIDATE_SHOWN}" if len(refused) > VALIDATE_SHOWN else ""
        # Numbered as quarantine.jsonl's index (from 0): beside a JSON Lines line number
        # (from 1) an unnamed "record 2" read as the second; the data_id says which.
        out.print(
            f"  [yellow]{len(refused)} records would be quarantined[/]{first} (records "
            "numbered from 0, as quarantine.jsonl's index):"
        )
        for record in refused[:VALIDATE_SHOWN]:
            reason = record.reason if len(record.reason) <= 160 else record.reason[:159] + "…"
            named = record.data_id is not None and repr(record.data_id) not in reason
            which = f" (data_id {record.data_id!r})" if named else ""
            out.print(f"    record {record.index}{which}: {reason}", highlight=False, markup=False)
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


STATUSES: tuple[Status, ...] = get_args(Status)
ASKED_AGAIN = "asked again"
"""``status``'s column of the ``error`` judgements a run with ``--retry-errors`` asks again."""


def _asked_by_manifest(
    config: dict[str, Any], run_dir: Path, latest: Mapping[JudgementKey, JournalEntry]
) -> Callable[[JudgementKey], bool] | None:
    """Which judgement keys the running run of the manifest's ``config`` asks (None:
    unknown), as `watch` tells them: none of the records its quarantine list holds so far;
    under a ``limit``, such a record still takes its place when ``latest`` holds a judgement
    of it other than an error, as the run counts it."""
    from trig_stream.tui.watch_source import asked_by_config

    judged = {key[1] for key, entry in latest.items() if entry.status != "error"}
    try:
        run_config = RunConfig.model_validate(config)
    except ValueError:  # a manifest edited by hand, or written by another version
        return None
    return asked_by_config(run_config, refused=_refused_so_far(run_dir), judged=judged)


def _refused_so_far(run_dir: Path) -> frozenset[int]:
    """The dataset indexes of the records the running run of ``run_dir`` quarantined so far
    (none when its list cannot be read)."""
    from trig_stream.files import open_regular_file
    from trig_stream.quarantine_text import quarantine_lists, read_quarantine_list

    for path in quarantine_lists(run_dir, running=True):
        try:
            with open_regular_file(path) as lines:  # a pipe there would wait forever
                return read_quarantine_list(lines)[1]
        except FileNotFoundError:
            continue
        except OSError:
            break
    return frozenset()


def _how_to_resume(run_dir: Path, manifest: Manifest) -> str:
    """What resumes the run in ``run_dir``: its config, unless the config resumes another
    directory (``--new-run`` made ``run_dir`` beside the run of that name, which the config
    as it is resumes), as a stopped ``run --new-run`` says."""
    # Compared as directories, not as the path was typed (`status .`, a link to the run).
    here = run_dir.resolve()
    resumed = here.parent / manifest.run_name
    run = manifest.config.get("run")
    output_dir = run.get("output_dir") if isinstance(run, dict) else None
    # The config's own output_dir, resolved when the run was made; gone from there, the
    # run directory moved with its project folder, the config with it.
    if isinstance(output_dir, str) and os.path.lexists(Path(output_dir) / manifest.run_name):
        resumed = (Path(output_dir) / manifest.run_name).resolve()
    if here == resumed:
        return "`trig-stream run` with its config judges whatever is left"
    # As TOML writes a string (a path may hold a backslash or a quote).
    name, parent = (json.dumps(str(text), ensure_ascii=False) for text in (here.name, here.parent))
    return (
        f"to resume it, set name = {name} and output_dir = {parent} in its config's [run] "
        f"table and `trig-stream run` it (as it is, the config resumes run "
        f"{manifest.run_name!r})"
    )


def status_command(args: argparse.Namespace, console: Console) -> int:
    """``trig-stream status RUN_DIR``: the run's judgements per model, metric and status, its
    mean scores, and whether a process is writing it now."""
    from trig_stream.analysis.relations import current_pairs
    from trig_stream.files import open_regular_file
    from trig_stream.journal import JOURNAL, latest_entries
    from trig_stream.locks import find_writer
    from trig_stream.manifest import errors_asked_again, read_manifest
    from trig_stream.quarantine_text import QUARANTINE, quarantine_lists, read_quarantine_list

    # Asked before the journal is read, as `watch` asks: a writer that is gone by then has
    # written its last line, which the counts then hold. And before the manifest is read: a
    # run writes its pid only once its manifest is written, so a writer seen with its pid
    # has its own manifest read here, not the run before's.
    writer = find_writer(args.run_dir)
    manifest = read_manifest(args.run_dir)
    # Only what is counted of each key's last line (a whole judgement each held 4.8 GB for
    # a million of them).
    latest = latest_entries(args.run_dir / JOURNAL)
    asked = selected = None
    # A run still opening (reading its journal) has not written its manifest yet: the errors
    # are errors.
    if writer is not None and not writer.starting and manifest.retry_errors:
        # Only the errors of samples and dimensions the run still selects are asked again:
        # read from its dataset, as `watch` reads it (unknown if it cannot be read here).
        selected = _asked_by_manifest(manifest.config, args.run_dir, latest)
        asked = errors_asked_again(manifest, selected)
    # Per metric, as the report separates them: two judges' scores of one dimension are not
    # one mean, nor are their counts one count. An error the running process asks again
    # (--retry-errors) is work left, not an error that stands.
    # The means are the report's: a sample judged again under an edited pair is of that
    # pair only, its old pair's lines in no mean.
    counts: Counter[tuple[str, str, str]] = Counter()
    sums: dict[tuple[str, str, str], float] = {}
    scored: Counter[tuple[str, str, str]] = Counter()
    pairs = current_pairs(latest.values())
    for judgement in latest.values():
        status: str = judgement.status
        if status == "error" and asked is not None and asked(judgement.key, judgement.line):
            status = ASKED_AGAIN
        counts[(judgement.model, judgement.metric, status)] += 1
        sample = (judgement.model, judgement.metric, judgement.data_id)
        if judgement.score is not None and pairs[sample] == judgement.pair:
            where = (judgement.model, judgement.metric, judgement.dimension)
            sums[where] = sums.get(where, 0.0) + judgement.score
            scored[where] += 1
    judges = manifest.config.get("judges")
    judges = judges if isinstance(judges, list) else []  # a manifest edited by hand
    metrics = [str(j["name"]) for j in judges if isinstance(j, dict) and "name" in j]
    metrics += sorted({metric for _, metric, _ in counts} - set(metrics))
    # Names and paths are the user's: printed as they are, never read as markup, never wrapped;
    # those from the manifest and the journal (files a hand may have edited) with their control
    # characters shown, never sent to the terminal.
    out = CommandConsole(soft_wrap=True, markup=False, highlight=False)
    out.print(printable(f"run {manifest.run_name!r} ({manifest.task}) in {args.run_dir}"))
    if writer is None:
        out.print(printable(f"not running; {_how_to_resume(args.run_dir, manifest)}"))
    elif writer.starting:
        out.print(
            f"starting ({writer}): reading its journal and checking its manifest; the counts "
            "below are as of now, its errors counted as errors until it has started; follow "
            f"it live with `trig-stream watch {args.run_dir}`"
        )
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
            f"running ({writer}){retrying}; the counts below are as of now; follow it "
            f"live with `trig-stream watch {args.run_dir}`"
        )
    columns: tuple[str, ...] = STATUSES
    if asked is not None:
        columns += (ASKED_AGAIN,)
    rows: list[list[str]] = []
    for model in sorted({m for m, _, _ in counts} | set(manifest.generators)):
        present = [m for m in metrics if any(counts[(model, m, s)] for s in columns)]
        for metric in present or ["–"]:
            row = [counts[(model, metric, s)] for s in columns]
            rows.append([printable(model), printable(metric), *map(str, row), str(sum(row))])
    _print_whole(out, _names_and_figures(("model", "metric"), (*columns, "total"), rows))
    if scored:
        order = {metric: index for index, metric in enumerate(metrics)}
        rows = []
        for key in sorted(scored, key=lambda k: (k[0], order[k[1]], k[2])):
            model, metric, dimension = key
            mean = f"{sums[key] / scored[key]:.3f}"
            rows.append([printable(model), printable(metric), dimension, mean, str(scored[key])])
        names = ("model", "metric", "dimension")
        _print_whole(out, _names_and_figures(names, ("mean score", "n"), rows))
    refused = 0
    # A run still opening has not begun its list: one there is the run before's.
    listing = writer is not None and not writer.starting
    for quarantine in quarantine_lists(args.run_dir, running=listing):
        try:
            with open_regular_file(quarantine) as lines:  # a pipe there would wait forever
                refused, _ = read_quarantine_list(lines)  # whole records: no half line
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
    elif refused and listing:
        out.print(f"{refused} dataset records quarantined so far by the run (see {quarantine})")
    elif refused:
        out.print(
            f"{refused} dataset records quarantined by a run stopped before it read the "
            f"dataset through (see {quarantine})"
        )
    return EXIT_OK


def _names_and_figures(
    names: tuple[str, ...], figures: tuple[str, ...], rows: list[list[str]]
) -> Table:
    """A table of ``names`` columns, then ``figures`` columns, filled with ``rows``. On a
    narrow terminal only the names fold, no narrower than their headings; a figure or its
    heading is never cut (rich's ellipsis read '…' for a total of 60 at 30 columns, and
    'uns…' for "unscorable")."""
    table = Table(*(Column(name, overflow="fold", min_width=len(name)) for name in names))
    for index, heading in enumerate(figures, start=len(names)):
        widest = max((len(row[index]) for row in rows), default=0)
        table.add_column(heading, no_wrap=True, min_width=max(len(heading), widest))
    for row in rows:
        table.add_row(*row)
    return table


def _print_whole(out: Console, table: Table) -> None:
    """Print ``table`` with its names whole: on a terminal, a name too long for its column
    is folded onto the next line (on one narrower than the columns' least widths, the lines
    are longer than it is wide); elsewhere (``| grep``, a file) the table is as wide as its
    longest row needs, so that each row stays on one line."""
    if out.is_terminal:
        # Narrower than that, rich shrinks every column evenly: the names to nothing.
        least = sum((column.min_width or 1) + TABLE_PADDING for column in table.columns)
        wanted = least + len(table.columns) + 1  # the lines between and around the columns
    else:
        wanted = Measurement.get(out, out.options.update_width(MEASURED_UP_TO), table).maximum
    width = out.width
    out.width = max(width, wanted)  # print's own width can only narrow the console's
    try:
        out.print(table)
    finally:
        out.width = width


MEASURED_UP_TO = 10_000
"""The widest table ``status`` prints as it is when not on a terminal (characters)."""
TABLE_PADDING = 2
"""The spaces a rich table puts around each cell (one either side, by default)."""
