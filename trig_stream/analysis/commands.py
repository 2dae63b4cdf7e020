"""The ``report``, ``analyze`` and ``compare`` subcommands of ``trig-stream``.

They re-derive everything from stored scores, never judging again, so the thresholds can be
changed freely. :func:`add_commands` adds them to the CLI's subparsers; each handler takes the
parsed arguments and the (stderr) console and returns an exit code.
"""

from __future__ import annotations

import argparse
import errno
import os
import stat
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, get_args

import polars as pl
from rich.console import Console

from trig_stream.analysis.compare import (
    COMPARISON_HEADING,
    Comparison,
    compare,
    comparison_markdown,
)
from trig_stream.analysis.exports import judgements_frame
from trig_stream.analysis.inputs import (
    AnalysisError,
    RunData,
    load_run,
    read_upstream,
    with_overrides,
)
from trig_stream.analysis.plots import PLOT_FILES
from trig_stream.analysis.relations import (
    ModelAnalysis,
    OutputWriteError,
    analyse_judgements,
    analyse_model,
    default_metric,
)
from trig_stream.analysis.report import (
    MODEL_FILES,
    PLOTS_FOLDER,
    WrittenFiles,
    is_model_outputs,
    left_out_text,
    refuse_link,
    refuse_unfit_outputs,
    remove_model_outputs,
    write_model_outputs,
    writing,
)
from trig_stream.analysis.stats import CorrelationMethod
from trig_stream.config import RelationSection
from trig_stream.dimensions import TASKS, Dimension, normalise_task
from trig_stream.files import real_path, remove_leftover_temporaries, write_atomic
from trig_stream.locks import find_writer
from trig_stream.path_arguments import path_argument
from trig_stream.records import (
    COMPARISON_FILE,
    Judgement,
    ScoredJudgement,
    one_line,
    printable,
)
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


def _pick_metric(
    metrics: Sequence[str],
    requested: str | None,
    source: object,
    judgements: Iterable[ScoredJudgement],
) -> str:
    if not metrics:
        raise AnalysisError(f"{source}: no judgements to analyse")
    if requested is None:
        # A judge whose every judgement failed measured nothing: counted as measuring its
        # dimensions, it was analysed (all -1) over a judge with full scores.
        measured: dict[str, set[Dimension]] = {}
        for judgement in judgements:
            if judgement.status == "ok":
                measured.setdefault(judgement.metric, set()).add(judgement.dimension)
        return default_metric(metrics, measured)
    if requested not in metrics:
        raise AnalysisError(f"{source}: no metric {requested!r}; it has {', '.join(metrics)}")
    return requested


def analyse_run(
    run: RunData, thresholds: RelationSection, metric: str | None = None
) -> dict[str, ModelAnalysis]:
    """Analyse every model of a run under one metric (by default the config's first judge
    that measured every dimension: see :func:`~trig_stream.analysis.relations.default_metric`),
    in the order of ``run.models``: the config's generators, then any others.

    Raises:
        AnalysisError: the run holds no judgement, or none of ``metric``.
    """
    chosen = _run_metric(run, metric)
    analyses = analyse_judgements((j for j in run.judgements if j.metric == chosen), thresholds)
    by_model = {model: analysis for (model, _), analysis in analyses.items()}
    # In the config's order (run.models), not the journal's: which model's first judgement
    # was written first is a race.
    return {model: by_model[model] for model in run.models if model in by_model}


def _run_metric(run: RunData, metric: str | None) -> str:
    """The metric :func:`analyse_run` analyses: ``metric``, else the default pick."""
    present = {j.metric for j in run.judgements}
    return _pick_metric([m for m in run.metrics if m in present], metric, run.path, run.judgements)


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


def in_progress_note(run_dir: Path, covering: str, *, own_pid: int | None = None) -> str | None:
    """The note that a process still runs in ``run_dir``, so that ``covering`` ("this
    report covers") holds the judgements so far; None when none runs there, or when the one
    there is ``own_pid``: a run writing its own report, its journal closed, keeps its lock."""
    writer = find_writer(run_dir)
    if writer is None or (own_pid is not None and writer.pid == own_pid):
        return None
    return f"a process ({writer}) is still running in {run_dir}: {covering} the judgements so far"


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
        _refuse_out_in_dataset(out, run)
    thresholds = with_overrides(run.relation, overrides or {})
    analyses = analyse_run(run, thresholds, metric)
    folder = out or run_dir / "report"
    if out is None:
        # An earlier report's model folders there are removed: never through a link.
        refuse_link(folder, "replace it with a folder, or name where to write with --out")
    elsewhere = "remove the link, or write the report elsewhere with --out"
    for path in [folder / COMPARISON_FILE, *(folder / model for model in analyses)]:
        refuse_link(path, elsewhere)
    _refuse_foreign_comparison(folder / COMPARISON_FILE)
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
    with writing(folder):
        remove_leftover_temporaries(folder, [COMPARISON_FILE])  # of a report killed
        # As `compare RUN_DIR`, which refuses one model, or models without an ok score.
        scored = any(analysis.dimension_means for analysis in analyses.values())
        if len(analyses) > 1 and scored:
            columns = [(model, run, analysis) for model, analysis in analyses.items()]
            text = comparison_markdown(_comparison(columns, notes))
            write_atomic(comparison, text.encode("utf-8"))  # never half a file
        elif comparison.is_file():
            # An earlier report's, of other models or another metric.
            comparison.unlink()
            why = "one model" if len(analyses) == 1 else "no ok score to compare"
            _say(console, f"{comparison} removed: this report has {why}")
    if skipped:
        console.print(PLOTS_NOTE, highlight=False, markup=False)
    return folder


def _refuse_foreign_comparison(comparison: Path) -> None:
    """Refuse a report folder whose ``comparison.md`` is not one a report wrote: a report
    replaces it (two models) or removes it (one), and a file of the user's of that name was
    lost either way.

    Raises:
        OutputWriteError: ``comparison`` exists and is not a regular file starting with the
            comparison's heading (or empty).
    """
    try:
        mode = os.lstat(comparison).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return
    except OSError as exc:
        raise OutputWriteError(
            f"cannot look at {comparison}: {exc.strerror or exc}; a report replaces it"
        ) from None
    heading = (COMPARISON_HEADING + "\n").encode()
    start = b""
    if stat.S_ISREG(mode):  # never opened otherwise: a pipe would block the read
        try:
            with comparison.open("rb") as file:
                start = file.read(len(heading))
        except OSError as exc:
            raise OutputWriteError(
                f"cannot read {comparison}: {exc.strerror or exc}; a report replaces it"
            ) from None
    if start != heading and (start or not stat.S_ISREG(mode)):  # an empty file loses nothing
        raise OutputWriteError(
            f"{comparison} is not a comparison a report wrote (it does not start with "
            f"{COMPARISON_HEADING!r}), and a report replaces or removes that file: move it "
            "away, or write the report elsewhere with --out"
        )


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
    model: str = args.model or args.file.stem
    _refuse_overwriting_inputs(args.out, args.file, args.prompts)
    data = read_upstream(
        args.file,
        model=model,
        prompts=args.prompts,
        metric=args.metric or "trigscore",
        task=normalise_task(args.task),
        only=args.metric,
    )
    metric = _pick_metric(data.metrics, args.metric, args.file, data.judgements)
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


def _refuse_overwriting_inputs(folder: Path, file: Path, prompts: Path | None) -> None:
    """Refuse an output folder where ``analyze`` would write over its own input: ``--out``
    the input's folder replaced an ``evaluation_result.json`` or ``formatted.json`` with the
    export of what was read from it (its nulls lost), and one in a ``--prompts`` parquet folder
    added its ``judgements.parquet`` to the dataset.

    Raises:
        AnalysisError: a file the outputs go to is ``file`` or ``prompts``, or ``folder`` is
            in the ``prompts`` folder.
    """
    outputs = [folder / name for name in MODEL_FILES]
    outputs += [folder / PLOTS_FOLDER / name for name in PLOT_FILES]
    for option, given in (("FILE", file), ("--prompts", prompts)):
        if given is None:
            continue
        if option == "--prompts" and given.is_dir() and _within(folder, given):
            # A parquet dataset folder, read with its subfolders: judgements.parquet would
            # join the dataset, and the next read of it fail on its columns.
            raise AnalysisError(
                f"--out {folder} is in the {option} folder {given}: the outputs would join "
                "the dataset; name an output folder outside it with --out"
            )
        for output in outputs:
            if _same_file(output, given):
                raise AnalysisError(
                    f"--out {folder} would write {output} over the input {option} {given}; "
                    "name another output folder with --out"
                )


def _refuse_out_in_dataset(folder: Path, run: RunData) -> None:
    """Refuse a ``report --out`` in the run's parquet dataset folder, as ``analyze`` refuses
    one in its ``--prompts`` folder: the folder is read with its subfolders, so the report's
    ``judgements.parquet`` would join the dataset, and the next run fail on its columns. The
    reading leaves a run directory below the folder out, and a report in it with it; and a
    run directory that is the dataset folder, only its own ``report/``.

    Raises:
        AnalysisError: ``folder`` is in the dataset folder, outside what its reading leaves out.
    """
    section = run.manifest.config.get("dataset")
    given = section.get("path") if isinstance(section, dict) else None
    if not isinstance(given, str) or not Path(given).is_dir() or not _within(folder, Path(given)):
        return
    dataset = Path(given)
    if _same_file(run.path, dataset):
        left_out = _same_file(folder, run.path / "report")
    else:
        left_out = _within(run.path, dataset) and _within(folder, run.path)
    if not left_out:
        raise AnalysisError(
            f"--out {folder} is in the run's dataset folder {dataset}: the outputs would join "
            "the dataset; name an output folder outside it with --out"
        )


def _within(folder: Path, dataset: Path) -> bool:
    """Whether ``folder`` is the folder ``dataset`` or one under it (links resolved)."""
    return _same_file(folder, dataset) or real_path(folder).is_relative_to(real_path(dataset))


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)  # a hard link too
    except OSError:  # one of them does not exist (yet)
        return real_path(a) == real_path(b)


def compare_runs(
    run_dirs: Sequence[Path],
    overrides: dict[str, Any] | None = None,
    metric: str | None = None,
) -> Comparison:
    """Compare every model of the given run directories.

    Models are labelled by name, or ``<run>/<model>`` when several run directories are given,
    ``<run>`` being the shortest end of the run directory's path that no other one shares
    (its folder name, unless two share it). Thresholds are each run's own, with
    ``overrides`` applied.

    Raises:
        AnalysisError: a run directory given twice, fewer than two models in all, or not one
            ok score.
    """
    seen: dict[Path, Path] = {}
    for run_dir in run_dirs:
        first = seen.get(real_path(run_dir))
        if first is not None:
            same = "" if str(first) == str(run_dir) else f" (as {first} and {run_dir})"
            raise AnalysisError(f"{run_dir} is given twice{same}: its models would meet themselves")
        seen[real_path(run_dir)] = run_dir
    columns: list[tuple[str, RunData, ModelAnalysis]] = []
    notes: list[str] = []
    for run_dir, run_label in zip(run_dirs, run_labels(list(seen)), strict=True):
        note = in_progress_note(run_dir, "its columns cover")
        if note is not None:
            notes.append(note)
        run = load_run(run_dir, rows=False)
        thresholds = with_overrides(run.relation, overrides or {})
        analyses = _run_columns(run, thresholds, metric)
        # The columns keep the run's manifest and judges, not its judgements: every run's
        # at once held gigabytes for runs of hundreds of thousands.
        run = replace(run, judgements=[])
        for model, analysis in analyses.items():
            # Model names hold no "/": with distinct run labels, labels are distinct too.
            label = model if len(run_dirs) == 1 else f"{run_label}/{model}"
            columns.append((label, run, analysis))
    if len(columns) < 2:
        raise AnalysisError(
            f"nothing to compare: {len(columns)} model(s) in {len(run_dirs)} run dir(s)"
        )
    if not any(analysis.dimension_means for _, _, analysis in columns):
        metrics = ", ".join(f"`{m}`" for m in dict.fromkeys(a.metric for _, _, a in columns))
        raise AnalysisError(
            f"nothing to compare: no ok score in {', '.join(map(str, run_dirs))} (metric "
            f"{metrics}: every judgement of it, if any, is unscorable or an error); `trig-stream "
            "status` counts them, and --metric picks another judge"
        )
    return _comparison(columns, notes)


def _run_columns(
    run: RunData, thresholds: RelationSection, metric: str | None
) -> dict[str, ModelAnalysis]:
    """:func:`analyse_run`, with an empty analysis for each model of the run (its config's
    generators first) without a judgement of the metric analysed yet: one still loading, or
    judged by another judge so far. Its column is empty, as that of a model whose every
    judgement failed, rather than left out without a word. So is every model's, under a
    ``metric`` of a judge of the config without a judgement yet. A run without a judgement
    yet gets them under ``metric``, else its first judge.

    Raises:
        AnalysisError: ``metric`` is no judge of the run, of its config or its journal.
    """
    if metric is not None and metric not in run.metrics:
        raise AnalysisError(
            f"{run.path}: no metric {metric!r}; it has {', '.join(run.metrics) or 'none'}"
        )
    if metric is not None:
        chosen = metric
    elif run.judgements:
        chosen = _run_metric(run, None)
    else:
        chosen = run.metrics[0] if run.metrics else "trigscore"
    judged = any(j.metric == chosen for j in run.judgements)
    analyses = analyse_run(run, thresholds, chosen) if judged else {}
    return {
        model: analyses.get(model) or analyse_model(model, chosen, [], thresholds)
        for model in run.models
    }


def _comparison(
    columns: Sequence[tuple[str, RunData, ModelAnalysis]], notes: Sequence[str]
) -> Comparison:
    """The comparison of labelled analyses, with what ``compare`` and a report's
    ``comparison.md`` both say about them: ``notes`` (a run still going), then a note per
    column without an ok score."""
    analyses: dict[str, ModelAnalysis] = {}
    for label, _, analysis in columns:
        assert label not in analyses, f"two columns labelled {label}"
        analyses[label] = analysis
    empty = [
        f"{label} has "
        + (
            "no ok score (every judgement unscorable or an error)"
            if analysis.pairs
            else f"no judgement of metric `{analysis.metric}` yet"
        )
        + ": its column is empty, and its DTM cells are undefined (-1)"
        for label, analysis in analyses.items()
        if not analysis.dimension_means
    ]
    return compare(
        analyses,
        {label: run.manifest.task for label, run, _ in columns},
        [*notes, *empty],
        {label: judge_fingerprint(run, a.model, a.metric) for label, run, a in columns},
    )


def judge_fingerprint(run: RunData, model: str, metric: str) -> dict[str, Any]:
    """The fingerprint of the judge that scored ``model`` under ``metric``: the manifest's,
    else (a judge the latest config no longer has) that of its latest judgement."""
    stored = run.manifest.judges.get(metric)
    if stored is not None:
        return stored
    latest = run.judges.get((model, metric))
    return latest.model_dump() if latest is not None else {}


def run_labels(paths: Sequence[Path]) -> list[str]:
    """The shortest end of each (absolute, distinct) path that no other one ends with: the
    folder name, with as many parents as it takes to tell two of the same name apart."""
    parts = [path.parts for path in paths]
    lengths = [1] * len(paths)
    while True:
        labels = [str(Path(*p[-n:])) for p, n in zip(parts, lengths, strict=True)]
        clashing = {label for label in labels if labels.count(label) > 1}
        if not clashing:
            return labels
        for index, label in enumerate(labels):
            if label in clashing:
                lengths[index] += 1


def _refuse_comparison_file(out: Path, run_dirs: Sequence[Path]) -> None:
    """Refuse a ``compare --out`` that is not a file of the user's to write: one in a run
    directory being compared (its journal or manifest was replaced by the markdown, and the
    run could no longer be resumed), a folder, or anything but a regular file (a pipe with no
    reader hung the command for good).

    Raises:
        AnalysisError: ``out`` (or the file a link there leads to) is in one of ``run_dirs``,
            is one of their files through a hard link, or exists and is no regular file.
    """
    # realpath follows every link, a dangling one's too: the write goes where they lead.
    target = Path(os.path.realpath(out))
    linked = f" (a symbolic link to {target})" if out.is_symlink() else ""
    elsewhere = "name a file outside every RUN_DIR with --out"
    for run_dir in run_dirs:
        if _within(target, run_dir):
            raise AnalysisError(
                f"--out {out}{linked} is in the run directory {run_dir}, whose files (journal, "
                f"manifest, images, report) are the run's own; {elsewhere}"
            )
    try:
        status = os.stat(target)
    except (FileNotFoundError, NotADirectoryError):
        return  # not there yet (a file standing for a folder of its path is named when written)
    except OSError as exc:
        raise AnalysisError(
            f"--out {out}{linked}: cannot look at it: {exc.strerror or exc}"
        ) from None
    if stat.S_ISDIR(status.st_mode):
        raise AnalysisError(f"--out {out}{linked} is a folder: it names the file to write")
    if not stat.S_ISREG(status.st_mode):
        raise AnalysisError(
            f"--out {out}{linked} is not a regular file (a pipe, a device?): it names the file "
            "to write the comparison to; name a regular file, or leave --out out to print it only"
        )
    if status.st_nlink > 1:
        # A hard link elsewhere to a run's journal or manifest writes over it all the same.
        for run_dir in run_dirs:
            files = sorted(run_dir.iterdir()) if run_dir.is_dir() else []
            for entry in files:
                if entry.is_file() and _same_file(entry, target):
                    raise AnalysisError(
                        f"--out {out}{linked} is {entry} (a hard link to it); {elsewhere}"
                    )


def cmd_compare(args: argparse.Namespace, console: Console) -> int:
    """``compare RUN_DIR...``: dimension means side by side and the DTM cells that differ."""
    if args.out is not None:
        _refuse_comparison_file(args.out, args.run_dirs)
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
