"""Where ``report``, ``analyze`` and ``compare`` write, checked before they write: never over
their own inputs (an upstream file, a ``--prompts`` dataset, a run directory's files), into a
parquet dataset folder whose next reading would take the outputs in, over a ``comparison.md``
a report did not write, or to a ``compare --out`` that is no regular file.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path

from trig_stream.analysis.compare import COMPARISON_HEADING
from trig_stream.analysis.inputs import AnalysisError, RunData
from trig_stream.analysis.plots import PLOT_FILES
from trig_stream.analysis.relations import OutputWriteError
from trig_stream.analysis.report import MODEL_FILES, PLOTS_FOLDER
from trig_stream.files import real_path


def refuse_foreign_comparison(comparison: Path) -> None:
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


def refuse_overwriting_inputs(folder: Path, file: Path, prompts: Path | None) -> None:
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


def refuse_out_in_dataset(folder: Path, run: RunData) -> None:
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


def refuse_comparison_file(out: Path, run_dirs: Sequence[Path]) -> None:
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
