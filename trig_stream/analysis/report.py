"""The markdown report of one model, and writing every output of one model to a folder."""

from __future__ import annotations

import errno
import math
import os
import re
import stat
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from trig_stream.analysis import plots as drawing
from trig_stream.analysis.exports import (
    evaluation_result,
    formatted_scores,
    json_bytes,
    pair_row,
    parquet_bytes,
    relationship_codes_csv,
    result_document,
)
from trig_stream.analysis.relations import AnalysisError, ModelAnalysis, OutputWriteError
from trig_stream.dataset_formats import JUDGEMENTS_FILE
from trig_stream.dimensions import DIMENSION_NAMES
from trig_stream.files import (
    LINK_ERRNOS,
    PartlyReplacedError,
    UnfitFileError,
    broken_link,
    file_kind,
    refuse_in_the_way,
    remove_leftover_temporaries,
    write_atomic_together,
)
from trig_stream.records import ScoredJudgement, exact_number, one_line, storable_text

PLOTS_FOLDER = "plots"
MODEL_FILES = (
    "evaluation_result.json",
    "formatted.json",
    "result.json",
    "relationship_codes.csv",
    "report.md",
    JUDGEMENTS_FILE,
)
"""The files a model's report folder holds besides its plots, in the order they are written."""
PAIR_HEADER = ["pair", "N", "excluded", "corr", "95% CI", "synergy ρs", "bottleneck ρb", "code"]
CODE_LEGEND = (
    "Codes: 0 synergy, 3 bottleneck, -2 / 2 dominance (-2: the column dimension wins), "
    "1 trade-off, -1 undefined or no data."
)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines.extend("| " + " | ".join(row) + " |" for row in rows)
    return lines


def _images(count: int) -> str:
    return f"{count} image" if count == 1 else f"{count} images"


def left_out_text(analysis: ModelAnalysis, *, upstream: bool = False) -> str:
    """The images left out of their pair's correlation, in words: those missing a score that
    was asked for (an error, an unscorable answer), and apart from them those scored on one
    dimension and never judged on the other (see :attr:`ModelAnalysis.not_judged`).

    ``upstream``: the judgements come from an upstream file, which says nothing of why a
    dimension has no cell, so no cause of a run is given for it.
    """
    not_judged = analysis.not_judged
    text = f"{_images(analysis.excluded - not_judged)} left out for a missing score"
    if not_judged and upstream:
        text += f", {_images(not_judged)} with no cell in the file for one dimension"
    elif not_judged:
        text += (
            f", {_images(not_judged)} with one dimension not judged (a judge that does not "
            "measure it, the dataset's dimensions filter, or a run stopped before it)"
        )
    return text


def markdown_report(
    analysis: ModelAnalysis, notes: Sequence[str] = (), *, upstream: bool = False
) -> str:
    """A readable report: thresholds, ``notes`` (a run still going), dimension means, the
    pair table and the DTM (``upstream``: of judgements read from an upstream file).

    Its text is :func:`~trig_stream.records.storable_text`: a note naming a run directory of
    bytes that are not UTF-8 holds lone surrogates, which the file could not hold."""
    t = analysis.thresholds
    # Exact: a threshold of 0.8000001 read "trade-off corr < 0.8" beside a correlation of 0.8.
    synergy, bottleneck = exact_number(t.synergy), exact_number(t.bottleneck)
    rho_s, rho_b = exact_number(t.synergy_density), exact_number(t.bottleneck_density)
    ratio, corr = exact_number(t.dominance_ratio), exact_number(t.tradeoff_corr)
    lines = [
        # One line: a newline in a name (analyze's is the file's) ended the heading.
        f"# TRIG relation analysis: {one_line(analysis.model)}",
        "",
        f"Metric {_code(analysis.metric)}; correlation `{t.correlation}`; zones: synergy > "
        f"{synergy}, bottleneck < {bottleneck}; rules: ρs ≥ {rho_s}, ρb ≥ {rho_b}, "
        f"dominance ratio > 1/{ratio}, trade-off corr < {corr}.",
        "",
        # One line each, as the console shows them: a run directory's name may hold a newline.
        *(line for note in notes for line in (f"Note: {one_line(note)}", "")),
        f"{sum(p.n for p in analysis.pairs)} complete images in {len(analysis.pairs)} pairs; "
        f"{left_out_text(analysis, upstream=upstream)}.",
        "",
        "## Dimension means",
        "",
    ]
    lines += _table(
        ["dimension", "name", "mean", "scores"],
        [
            [dim, DIMENSION_NAMES[dim], f"{mean:.3f}", str(analysis.dimension_counts[dim])]
            for dim, mean in analysis.dimension_means.items()
        ],
    )
    lines += ["", "## Pairs", ""]
    rows = []
    for stats in analysis.pairs:
        means = f"{_num(stats.mean_first)} / {_num(stats.mean_second)}"
        rows.append([*pair_row(stats), means])
    lines += _table([*PAIR_HEADER, "pair means"], rows)
    lines += [
        "",
        "The interval is Fisher's z: atanh(r) ± 1.96·se, se = 1/√(N−3) for Pearson and "
        "√(1.06/(N−3)) for Spearman; none for paretoF, N < 4 or a constant side (Pearson's "
        "0 there is TRIG's convention, not a measure).",
        "",
        "## Dimension Trade-off Map",
        "",
        CODE_LEGEND,
        "",
    ]
    dims = analysis.dtm.dimensions
    grid = []
    for i, row in enumerate(dims):
        cells: list[str] = [row]
        for j in range(len(dims)):
            code = analysis.dtm.codes[i][j]
            cells.append(
                _num(analysis.dimension_means.get(row, math.nan)) if code is None else str(code)
            )
        grid.append(cells)
    lines += _table(["", *dims], grid)
    return storable_text("\n".join(lines) + "\n")


def _code(text: str) -> str:
    """``text`` as a markdown code span on one line (:func:`~trig_stream.records.one_line`):
    an upstream file's metric is any text, whose newline began a line of its own (a heading)
    and whose backtick ended a span of one; the fence is a backtick longer than any in it."""
    text = one_line(text)
    fence = "`" * (max(map(len, re.findall("`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _num(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.3f}"


@dataclass(frozen=True, slots=True)
class WrittenFiles:
    """What :func:`write_model_outputs` wrote."""

    folder: Path
    files: list[Path] = field(default_factory=list)
    plots_skipped: bool = False
    """True when matplotlib is not installed, so no PNG was drawn."""


@contextmanager
def writing(where: Path) -> Iterator[None]:
    """Turn a failed write under ``where`` (a full disk, no permission) into an
    :class:`~trig_stream.analysis.relations.OutputWriteError` that names it: one message
    instead of a traceback."""
    try:
        yield
    except UnfitFileError as exc:  # its words name the path in the way and what to do
        raise OutputWriteError(f"cannot write the report in {where}: {exc.strerror}") from None
    except OSError as exc:
        link = broken_link(where) if exc.errno in LINK_ERRNOS else None
        if link is not None:  # not "File exists": the link in the way is what to fix
            raise OutputWriteError(f"cannot write the report in {where}: {link}") from None
        raise OutputWriteError(
            f"cannot write the report in {where}: {_failure(exc, where)}"
        ) from None


def _failure(exc: OSError, where: Path) -> str:
    """What went wrong writing the report in ``where``, naming the file at fault (unless it is
    ``where`` itself), and what to do: "Is a directory" alone named no path, and advice of
    permissions and disk space fitted neither a folder in the way nor a failing disk."""
    named = [
        os.fsdecode(name)
        for name in (exc.filename, exc.filename2)
        if isinstance(name, str | bytes) and os.fsdecode(name) != str(where)
    ]
    reason = ": ".join([*named, exc.strerror or str(exc)])
    if isinstance(exc, PartlyReplacedError):
        return (
            f"{reason}; {where} may now hold files of this report beside the earlier "
            "report's: write the report again once the disk works"
        )
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{reason}; free some space on its disk, or write the report elsewhere with --out"
    if exc.errno in (errno.EISDIR, errno.ENOTEMPTY):
        return f"{reason}; a folder stands where a file of the report goes: move or remove it"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.EEXIST, errno.ENOTDIR):
        return f"{reason}; it must be a folder this user can write"
    return f"{reason}; write the report again once that is fixed"


def refuse_link(path: Path, advice: str) -> None:
    """Refuse a report's file or folder that is a symbolic link: written (or removed)
    through it, the report would overwrite what it points to, wherever that is.

    Raises:
        OutputWriteError: ``path`` is a link; the message ends with ``advice``.
    """
    if not path.is_symlink():
        return
    try:
        target = os.readlink(path)
    except OSError:
        target = "somewhere else"
    raise OutputWriteError(
        f"{path} is a symbolic link (to {target}): a report writes its files only in its "
        f"own folder, never through a link there; {advice}"
    )


class ReportStopped(AnalysisError):
    """Writing a report was stopped (a Ctrl-C): what it wrote stays, incomplete."""


def write_model_outputs(
    analysis: ModelAnalysis,
    judgements: Sequence[ScoredJudgement],
    table: pl.DataFrame,
    metrics: Sequence[str],
    folder: Path,
    *,
    plots: bool = True,
    should_stop: Callable[[], bool] = lambda: False,
    notes: Sequence[str] = (),
    upstream: bool = False,
) -> WrittenFiles:
    """Write one model's exports, report and (when matplotlib is there) plots into ``folder``.

    Args:
        analysis: the model's relation analysis.
        judgements: the model's judgements (for the evaluation result).
        table: the rows of its ``judgements.parquet``
            (:func:`~trig_stream.analysis.exports.judgements_frame`).
        metrics: the metric names in config order, for the evaluation result.
        folder: created when missing.
        plots: draw the PNGs when matplotlib is importable.
        should_stop: asked between two files (the plots take seconds each).
        notes: what the markdown report says before its numbers (a run still going).
        upstream: the judgements come from an upstream file (see :func:`left_out_text`).

    Raises:
        OutputWriteError: a file cannot be written.
        ReportStopped: ``should_stop`` said so.
    """

    def check() -> None:
        if should_stop():
            raise ReportStopped(f"stopped while writing {folder}")

    with writing(folder):
        return _write_model_outputs(
            analysis, judgements, table, metrics, folder, plots, check, notes, upstream
        )


def _write_model_outputs(
    analysis: ModelAnalysis,
    judgements: Sequence[ScoredJudgement],
    table: pl.DataFrame,
    metrics: Sequence[str],
    folder: Path,
    plots: bool,
    check: Callable[[], None],
    notes: Sequence[str],
    upstream: bool,
) -> WrittenFiles:
    check()
    drawn = plots and drawing.matplotlib_available()
    _refuse_unfit_outputs(folder, drawn=drawn)
    plots_folder = folder / PLOTS_FOLDER
    # Every file is rendered before any is written, then all are written together: a full
    # disk (or a stop) part way leaves the earlier report's files as they were, never a
    # truncated file beside stale ones.
    contents: list[tuple[Path, bytes]] = [
        (folder / "evaluation_result.json", json_bytes(evaluation_result(judgements, metrics))),
        (folder / "formatted.json", json_bytes(formatted_scores(analysis))),
        (folder / "result.json", json_bytes(result_document(analysis))),
        (folder / "relationship_codes.csv", relationship_codes_csv(analysis).encode("utf-8")),
        (folder / "report.md", markdown_report(analysis, notes, upstream=upstream).encode()),
    ]
    check()
    contents.append((folder / JUDGEMENTS_FILE, parquet_bytes(table)))
    if drawn:
        rendered = drawing.render_plots(analysis, before_each=check)
        contents += [(plots_folder / name, data) for name, data in rendered]
    # A report killed before its renames left its temporary files there, for good.
    remove_leftover_temporaries(folder, MODEL_FILES)
    remove_leftover_temporaries(plots_folder, drawing.PLOT_FILES)
    write_atomic_together(contents)
    files = [path for path, _ in contents]
    if drawn:
        return WrittenFiles(folder, files)
    # Plots an earlier report drew would stand beside these files as if they were theirs.
    _remove_plots(folder)
    return WrittenFiles(folder, files, plots_skipped=plots)


def refuse_unfit_outputs(folder: Path, *, plots: bool = True) -> None:
    """Refuse ``folder`` when a symbolic link, or something other than a file (a folder, a
    pipe), stands where one of the files :func:`write_model_outputs` writes goes (its plots
    too, when it draws them), or, when it draws none (``plots`` false, or no matplotlib),
    where an earlier report's plot is to be removed.

    A report of several models asks this of every model's folder before it writes the first:
    found only at a later model's write, it left the earlier models' new files beside the
    later ones' old files.

    Raises:
        OutputWriteError: names the path in the way and what to do.
    """
    with writing(folder):
        _refuse_unfit_outputs(folder, drawn=plots and drawing.matplotlib_available())


def _refuse_unfit_outputs(folder: Path, *, drawn: bool) -> None:
    plots_folder = folder / PLOTS_FOLDER
    files = [folder / name for name in MODEL_FILES]
    plot_files = [plots_folder / name for name in drawing.PLOT_FILES]
    for path in [*files, plots_folder, *plot_files]:
        refuse_link(path, "remove the link, or write the report elsewhere with --out")
    # A file where a folder goes was taken below for "not made yet" (NotADirectoryError).
    for path in [folder, plots_folder] if drawn else [folder]:
        _refuse_in_place_of_folder(path)
    for path in [*files, *plot_files] if drawn else files:
        refuse_in_the_way(path)
    if not drawn:
        _refuse_in_place_of_plots(folder)


def _refuse_in_place_of_folder(path: Path) -> None:
    """Raise :class:`~trig_stream.files.UnfitFileError` when something other than a folder
    (a file, a pipe) stands where the report's folder ``path``, or one above it, goes."""
    try:
        mode = os.stat(path).st_mode  # a link to a folder is one
    except FileNotFoundError:  # not made yet (nor the one above it)
        return
    except NotADirectoryError:  # one above it is no folder: `report RUN --out FILE`
        _refuse_in_place_of_folder(path.parent)
        return
    if stat.S_ISDIR(mode):
        return
    what = "file" if stat.S_ISREG(mode) else file_kind(mode)
    raise UnfitFileError(
        errno.ENOTDIR,
        f"{path} is a {what}, where the report's folder of that name goes; move or remove it",
        str(path),
    )


def _refuse_in_place_of_plots(folder: Path) -> None:
    """Raise :class:`~trig_stream.files.UnfitFileError` when something other than a file (a
    folder, a pipe) stands where an earlier report's plot would be removed from ``folder``."""
    for name in drawing.PLOT_FILES:
        path = folder / PLOTS_FOLDER / name
        try:
            mode = os.lstat(path).st_mode
        except (FileNotFoundError, NotADirectoryError):  # none, or no plots folder
            continue
        if stat.S_ISREG(mode):
            continue
        what = "folder" if stat.S_ISDIR(mode) else file_kind(mode)
        raise UnfitFileError(
            errno.EISDIR if stat.S_ISDIR(mode) else errno.EEXIST,
            f"{path} is a {what}, where an earlier report's plot of that name is to be "
            "removed (this report draws none); move or remove it",
            str(path),
        )


def _remove_plots(folder: Path) -> None:
    if not (folder / PLOTS_FOLDER).is_dir():  # no plots; or a file of the user's named so
        return
    for name in drawing.PLOT_FILES:
        (folder / PLOTS_FOLDER / name).unlink(missing_ok=True)
    with suppress(OSError):  # kept when something else is in it
        (folder / PLOTS_FOLDER).rmdir()


def is_model_outputs(folder: Path) -> bool:
    """Whether ``folder`` holds a model's report files (every file but the plots that
    :func:`write_model_outputs` writes)."""
    return all((folder / name).is_file() for name in MODEL_FILES)


def remove_model_outputs(folder: Path) -> bool:
    """Remove the files :func:`write_model_outputs` writes from ``folder``, and the folder
    when nothing else is in it; anything else (a user's notes) stays. Return whether the
    folder is gone.

    Raises:
        OutputWriteError: a file cannot be removed.
    """
    with writing(folder):
        for name in MODEL_FILES:
            (folder / name).unlink(missing_ok=True)
        remove_leftover_temporaries(folder, MODEL_FILES)
        remove_leftover_temporaries(folder / PLOTS_FOLDER, drawing.PLOT_FILES)
        _remove_plots(folder)
        try:
            folder.rmdir()
        except OSError:
            return False
        return True
