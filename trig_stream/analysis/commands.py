"""The ``report``, ``analyze`` and ``compare`` subcommands of ``trig-stream``.

They re-derive everything from stored scores, never judging again, so the thresholds can be
changed freely. :func:`add_commands` adds them to the CLI's subparsers; each handler takes the
parsed arguments and the (stderr) console and returns an exit code. A run directory's analysis
(its metric, its models' analyses) is made in :mod:`trig_stream.analysis.run_analysis`, the
models of several put side by side in :mod:`trig_stream.analysis.run_comparison`, and where
the commands may write is checked in :mod:`trig_stream.analysis.output_checks`.
"""

from __future__ import annotations

import argparse
import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_args

import polars as pl
from rich.console import Console

from trig_stream.analysis.compare import comparison_markdown
from trig_stream.analysis.exports import judgements_frame
from trig_stream.analysis.inputs import AnalysisError, load_run, read_upstream, with_overrides
from trig_stream.analysis.output_checks import (
    refuse_comparison_file,
    refuse_foreign_comparison,
    refuse_out_in_dataset,
    refuse_overwriting_inputs,
)
from trig_stream.analysis.relations import ModelAnalysis, OutputWriteError, analyse_judgements
from trig_stream.analysis.report import (
    WrittenFiles,
    is_model_outputs,
    left_out_text,
    refuse_link,
    refuse_unfit_outputs,
    remove_model_outputs,
    write_model_outputs,
    writing,
)
from trig_stream.analysis.run_analysis import analyse_run, in_progress_note, pick_metric
from trig_stream.analysis.run_comparison import (
    compare_runs,
    comparison_of,
    nothing_to_compare,
    with_models_not_judged,
)
from trig_stream.analysis.stats import CorrelationMethod
from trig_stream.config import RelationSection
from trig_stream.dimensions import TASKS, normalise_task
from trig_stream.files import remove_leftover_temporaries, write_atomic
from trig_stream.path_arguments import path_argument
from trig_stream.records import COMPARISON_FILE, Judgement, one_line, printable, storable_text
from trig_stream.terminal import CommandConsole

THRESHOLD_OPTIONS: dict[str, str] = {
    "synergy": "synergy zone: both scores above this (default 0.8)",
    "bottleneck": "bottleneck zone: both scores below this (default 0.5)",
    "synergy_density": "code 0 when the synergy zone holds at least this share (default 0.4)",
    "bottleneck_density": "code 3 when the bottleneck zone holds at least this share (default 0.4)",
    "dominance_ratio": "code ±2 when the above/below split exceeds 1/this (default 0.8)",
    "tradeoff_corr": "code 1 when the correlation is below this (default 0.6)",
}
PLOTS_NOTE = "plots skipped: matplotlib is not installed (pip install 'trig-stream[plots]')"


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``report``, ``analyze`` and ``compare`` to the CLI's subcommands."""
    report = subparsers.add_parser(
        "report", help="analyse a run directory's judgements: DTM, exports, plots"
    )
    report.add_argument("run_dir", type=path_argument, metavar="RUN_DIR")
    report.add_argument(
        "--out",
        type=path_argument,
        help="output folder (default RUN_DIR/report; a leading ~ is the home folder)",
    )
    _add_common(report)
    report.set_defaults(handler=cmd_report)

    analyze = subparsers.add_parser(
        "analyze", help="analyse an upstream TRIG evaluation result or formatted JSON file"
    )
    analyze.add_argument("file", type=path_argument, metavar="FILE")
    analyze.add_argument(
        "--out",
        type=path_argument,
        required=True,
        help="output folder (a leading ~ is the home folder)",
    )
    analyze.add_argument(
        "--prompts",
        type=path_argument,
        help="TRIG dataset giving each data_id's pair (JSON, JSON Lines, parquet file or folder)",
    )
    analyze.add_argument("--model", help="model name in the outputs (default: the file's stem)")
    analyze.add_argument(
        "--task", default="t2i", choices=[*TASKS, "sub"], help="TRIG task (default: t2i)"
    )
    # A file has no config and no judges: its metrics are the names its scores are under.
    _add_common(
        analyze,
        metric_help="the metric to analyse (default: the file's first metric that scored every "
        "dimension, else its first; a formatted file's scores are read as this one, default "
        "trigscore)",
        thresholds_help="default: TRIG's defaults",
    )
    analyze.set_defaults(handler=cmd_analyze)

    comparison = subparsers.add_parser(
        "compare", help="compare models of one or several run directories"
    )
    comparison.add_argument("run_dirs", type=path_argument, nargs="+", metavar="RUN_DIR")
    comparison.add_argument(
        "--out",
        type=path_argument,
        help="also write the comparison to this file (a leading ~ is the home folder)",
    )
    _add_common(comparison, plots=False)
    comparison.set_defaults(handler=cmd_compare)


def _add_common(
    parser: argparse.ArgumentParser,
    *,
    plots: bool = True,
    metric_help: str = "the metric to analyse (default: the first judge that measured every "
    "dimension)",
    thresholds_help: str = "default: the run's [relation] config, else TRIG's defaults",
) -> None:
    parser.add_argument("--metric", help=metric_help)
    group = parser.add_argument_group("thresholds", thresholds_help)
    group.add_argument("--correlation", choices=get_args(CorrelationMethod))
    for name, text in THRESHOLD_OPTIONS.items():
        group.add_argument("--" + name.replace("_", "-"), type=float, dest=name, help=text)
    if plots:
        parser.add_argument("--no-plots", action="store_true", help="do not draw the PNGs")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in ("correlation", *THRESHOLD_OPTIONS)}


def _print_written(
    console: Console, analysis: ModelAnalysis, written: WrittenFiles, *, upstream: bool = False
) -> None:
    codes = sum(1 for p in analysis.pairs if p.n)
    # A model named after a file (analyze), and a folder given, may hold control characters.
    console.print(
        f"{one_line(analysis.model)}: {len(analysis.pairs)} pairs ({codes} with data), "
        f"{left_out_text(analysis, upstream=upstream)} -> {one_line(str(written.folder))}",
        highlight=False,
        markup=False,
    )


def cmd_report(args: argparse.Namespace, console: Console) -> int:
    """``report RUN_DIR``: exports, markdown report and plots per model, from the journal."""
    write_report(
        args.run_dir,
        console,
        out=args.out,
        overrides=_overrides(args),
        metric=args.metric,
        plots=not args.no_plots,
    )
    return 0


def write_report(
    run_dir: Path,
    console: Console,
    *,
    out: Path | None = None,
    overrides: dict[str, Any] | None = None,
    metric: str | None = None,
    plots: bool = True,
    should_stop: Callable[[], bool] = lambda: False,
    own_pid: int | None = None,
) -> Path:
    """Write a run directory's exports, markdown report and plots; return the folder.

    ``should_stop`` is asked between two files (the end of a run writes its report, and a
    Ctrl-C then stops it). ``own_pid``: this process's pid when the run is its own, over,
    its lock still held for the report: that run is not noted as still running.

    Raises:
        AnalysisError: the run holds no judgement to analyse.
        OutputWriteError: a file cannot be written.
        ReportStopped: ``should_stop`` said so.
    """
    # Asked before the journal is read: a run that ends meanwhile is reported as one going.
    note = in_progress_note(run_dir, "this report covers", own_pid=own_pid)
    if note is not None:
        note += " (the run writes its own when it ends, unless --no-report)"
        _say(console, note)
    notes = [note] if note is not None else []
    run = load_run(run_dir)
    if out is not None:
        refuse_out_in_dataset(out, run)
    thresholds = with_overrides(run.relation, overrides or {})
    analyses = analyse_run(run, thresholds, metric)
    folder = out or run_dir / "report"
    if out is None:
        # An earlier report's model folders there are removed: never through a link.
        refuse_link(folder, "replace it with a folder, or name where to write with --out")
    elsewhere = "remove the link, or write the report elsewhere with --out"
    for path in [folder / COMPARISON_FILE, *(folder / model for model in analyses)]:
        refuse_link(path, elsewhere)
    refuse_foreign_comparison(folder / COMPARISON_FILE)
    for model in analyses:  # every model's, before the first model's files are replaced
        refuse_unfit_outputs(folder / model, plots=plots)
    skipped = False
    assert run.table is not None, "load_run keeps the rows by default"
    for model, analysis in analyses.items():
        judgements = [j for j in run.judgements if j.model == model]
        written = write_model_outputs(
            analysis,
            judgements,
            run.table.filter(pl.col("model") == model),
            run.metrics,
            folder / model,
            plots=plots,
            should_stop=should_stop,
            notes=notes,
        )
        skipped |= written.plots_skipped
        _print_written(console, analysis, written)
    _remove_stale_outputs(folder, analyses, run_dir, console)
    comparison = folder / COMPARISON_FILE
    # The columns of `compare RUN_DIR`, and its refusals: the config's models not judged yet
    # make a column each, as the models a report writes folders for do not.
    metric_analysed = next(iter(analyses.values())).metric
    compared = with_models_not_judged(run, analyses, thresholds, metric_analysed)
    columns = [(model, run, analysis) for model, analysis in compared.items()]
    refusal = nothing_to_compare(columns, [run_dir])
    with writing(folder):
        remove_leftover_temporaries(folder, [COMPARISON_FILE])  # of a report killed
        if refusal is None:
            text = comparison_markdown(comparison_of(columns, notes))
            write_atomic(comparison, text.encode("utf-8"))  # never half a file
        elif comparison.is_file():
            # An earlier report's, of other models or another metric.
            comparison.unlink()
            _say(console, f"{comparison} removed: {refusal}")
    if skipped:
        console.print(PLOTS_NOTE, highlight=False, markup=False)
    return folder


def _remove_stale_outputs(
    folder: Path, analyses: dict[str, ModelAnalysis], run_dir: Path, console: Console
) -> None:
    """Remove the model folders an earlier report wrote in ``folder`` that this one did not
    (a model gone from the run, or without judgements of this metric): they showed other
    numbers beside this report's. Only the report's own files go; a folder holding anything
    else keeps it."""
    if not folder.is_dir():
        return
    metric = next(iter(analyses.values())).metric
    for entry in sorted(folder.iterdir()):
        if entry.name in analyses or entry.is_symlink() or not entry.is_dir():
            continue
        if not is_model_outputs(entry):
            continue
        gone = remove_model_outputs(entry)
        kept = "" if gone else " (the other files in it are kept)"
        _say(
            console,
            f"{entry.name}: no judgement of metric {metric!r} in {run_dir}; the report files "
            f"an earlier report wrote in {entry} are removed{kept}",
        )


def _say(console: Console, text: str) -> None:
    # Its notes name paths and data_ids from outside: shown, never sent to the terminal, and
    # on one line (a newline in a folder's name started a line that read as the program's).
    console.print(one_line(text), highlight=False, markup=False, soft_wrap=True)


def cmd_analyze(args: argparse.Namespace, console: Console) -> int:
    """``analyze FILE --out DIR``: the same analysis on an upstream TRIG file."""
    # A name of bytes that are not UTF-8 (the file's, an argument's) reads as lone
    # surrogates, which no output can hold: the outputs get it escaped, as records store it.
    model = storable_text(args.model or args.file.stem)
    asked: str | None = None if args.metric is None else storable_text(args.metric)
    refuse_overwriting_inputs(args.out, args.file, args.prompts)
    data = read_upstream(
        args.file,
        model=model,
        prompts=args.prompts,
        metric=asked or "trigscore",
        task=normalise_task(args.task),
        only=asked,
    )
    metric = pick_metric(data.metrics, asked, args.file, data.judgements)
    thresholds = with_overrides(RelationSection(), _overrides(args))
    chosen: list[Judgement] = [j for j in data.judgements if j.metric == metric]
    analysis = analyse_judgements(chosen, thresholds, pairs=data.pairs).get((model, metric))
    if analysis is None:
        raise AnalysisError(f"{args.file}: no scores of metric {metric!r}")
    written = write_model_outputs(
        analysis,
        data.judgements,
        judgements_frame(data.judgements),
        data.metrics,
        args.out,
        plots=not args.no_plots,
        upstream=True,
    )
    # The paths given, and the model named after the file, are shown escaped on one line.
    shown_prompts = one_line(str(args.prompts))
    console.print(
        f"read {one_line(str(args.file))} as a TRIG {data.layout} file",
        highlight=False,
        markup=False,
    )
    if args.prompts is not None and data.layout == "formatted":
        console.print(
            f"note: --prompts {shown_prompts} was not read: a formatted file's pairs are its keys",
            highlight=False,
            markup=False,
        )
    for note in data.prompts_notes:
        _say(console, f"note: --prompts {shown_prompts}: {note}")
    if data.prompts_skipped:
        # As a run quarantines them; the analysis stops only where a scored data_id is left
        # without a pair.
        skipped = data.prompts_skipped
        _say(
            console,
            f"note: --prompts {shown_prompts}: skipped {len(skipped)} record(s) without a "
            f"usable pair, as a run quarantines them; the first: {skipped[0]}",
        )
    if data.skipped:
        names = ", ".join(repr(m) for m in data.skipped)
        _say(
            console,
            f"note: metric(s) {names} not read: --metric {metric} analyses that one, and the "
            "others' scores are neither checked nor written to the outputs",
        )
    _print_written(console, analysis, written, upstream=True)
    if written.plots_skipped:
        console.print(PLOTS_NOTE, highlight=False, markup=False)
    return 0


def cmd_compare(args: argparse.Namespace, console: Console) -> int:
    """``compare RUN_DIR...``: dimension means side by side and the DTM cells that differ."""
    if args.out is not None:
        refuse_comparison_file(args.out, args.run_dirs)
    text = comparison_markdown(compare_runs(args.run_dirs, _overrides(args), args.metric))
    if args.out is not None:
        # Not `writing`, the report's: its message spoke of a report and of a folder it
        # must be, naming the folder of the file (a file there: "cannot write the report in
        # afile: File exists; it must be a folder").
        try:
            args.out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            if exc.errno in (errno.EEXIST, errno.ENOTDIR):
                reason += ", a file stands where a folder of its path goes"
            raise OutputWriteError(
                f"cannot write the comparison to {args.out}: its folder {args.out.parent} "
                f"cannot be made ({reason}); name a file in a folder this user can write, on a "
                "disk with space"
            ) from None
        try:
            # Whole or not at all (a full disk keeps the file that was there); through a
            # link, to where it leads, as the check above looked.
            write_atomic(Path(os.path.realpath(args.out)), text.encode("utf-8"))
        except OSError as exc:  # the file itself, not its folder (a read-only folder, a full disk)
            raise OutputWriteError(
                f"cannot write the comparison to {args.out}: {exc.strerror or exc}; it must be "
                "a file this user can write, on a disk with space"
            ) from None
        console.print(f"comparison written to {args.out}", highlight=False, markup=False)
    # The file keeps the runs' names as they are; the terminal is shown their control
    # characters (a manifest's task edited by hand), never sent them.
    CommandConsole(soft_wrap=True).print(printable(text), markup=False, highlight=False)
    return 0
