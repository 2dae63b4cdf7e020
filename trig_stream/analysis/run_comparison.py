"""The models of one or several run directories put side by side, as ``compare`` and a
report's ``comparison.md`` show them: each labelled (by its run directory's shortest distinct
path end when several are given), with its run's thresholds and its judge's fingerprint, and
a note per column without an ok score. The comparison itself is made in
:mod:`trig_stream.analysis.compare`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from trig_stream.analysis.compare import Comparison, compare
from trig_stream.analysis.inputs import AnalysisError, RunData, load_run, with_overrides
from trig_stream.analysis.relations import ModelAnalysis, analyse_model
from trig_stream.analysis.run_analysis import analyse_run, in_progress_note, run_metric
from trig_stream.config import RelationSection
from trig_stream.files import real_path


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
    refusal = nothing_to_compare(columns, run_dirs)
    if refusal is not None:
        raise AnalysisError(refusal)
    return comparison_of(columns, notes)


def nothing_to_compare(
    columns: Sequence[tuple[str, RunData, ModelAnalysis]], run_dirs: Sequence[Path]
) -> str | None:
    """Why ``compare`` refuses the columns of ``run_dirs`` (fewer than two, or not one ok
    score), and a report then writes no ``comparison.md``; None when they compare."""
    if len(columns) < 2:
        return f"nothing to compare: {len(columns)} model(s) in {len(run_dirs)} run dir(s)"
    if not any(analysis.dimension_means for _, _, analysis in columns):
        metrics = ", ".join(f"`{m}`" for m in dict.fromkeys(a.metric for _, _, a in columns))
        return (
            f"nothing to compare: no ok score in {', '.join(map(str, run_dirs))} (metric "
            f"{metrics}: every judgement of it, if any, is unscorable or an error); `trig-stream "
            "status` counts them, and --metric picks another judge"
        )
    return None


def _run_columns(
    run: RunData, thresholds: RelationSection, metric: str | None
) -> dict[str, ModelAnalysis]:
    """:func:`analyse_run` under ``metric``, as :func:`with_models_not_judged` gives its
    columns. A run without a judgement yet gets them under ``metric``, else its first judge;
    so does every model, under a ``metric`` of a judge of the config without a judgement yet.

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
        chosen = run_metric(run, None)
    else:
        chosen = run.metrics[0] if run.metrics else "trigscore"
    judged = any(j.metric == chosen for j in run.judgements)
    analyses = analyse_run(run, thresholds, chosen) if judged else {}
    return with_models_not_judged(run, analyses, thresholds, chosen)


def with_models_not_judged(
    run: RunData,
    analyses: dict[str, ModelAnalysis],
    thresholds: RelationSection,
    metric: str,
) -> dict[str, ModelAnalysis]:
    """The columns of a run, as ``compare`` and a report's ``comparison.md`` both show them:
    ``analyses`` (:func:`analyse_run`'s under ``metric``), with an empty analysis for each
    model of the run (its config's generators first) without a judgement of ``metric`` yet:
    one still loading, or judged by another judge so far. Its column is empty, as that of a
    model whose every judgement failed, rather than left out without a word."""
    return {
        model: analyses.get(model) or analyse_model(model, metric, [], thresholds)
        for model in run.models
    }


def comparison_of(
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
