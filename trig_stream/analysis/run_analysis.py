"""A run directory's relation analysis, as ``report`` and ``compare`` make it: the metric
analysed (the one asked for, else the first judge that measured every dimension), every
model's analysis under it, and the note that a process still writes the run, whose
judgements so far the analysis then covers.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from trig_stream.analysis.inputs import AnalysisError, RunData
from trig_stream.analysis.relations import ModelAnalysis, analyse_judgements, default_metric
from trig_stream.config import RelationSection
from trig_stream.dimensions import Dimension
from trig_stream.locks import find_writer
from trig_stream.records import ScoredJudgement


def pick_metric(
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
    chosen = run_metric(run, metric)
    analyses = analyse_judgements((j for j in run.judgements if j.metric == chosen), thresholds)
    by_model = {model: analysis for (model, _), analysis in analyses.items()}
    # In the config's order (run.models), not the journal's: which model's first judgement
    # was written first is a race.
    return {model: by_model[model] for model in run.models if model in by_model}


def run_metric(run: RunData, metric: str | None) -> str:
    """The metric :func:`analyse_run` analyses: ``metric``, else the default pick."""
    present = {j.metric for j in run.judgements}
    return pick_metric([m for m in run.metrics if m in present], metric, run.path, run.judgements)


def in_progress_note(run_dir: Path, covering: str, *, own_pid: int | None = None) -> str | None:
    """The note that a process still runs in ``run_dir``, so that ``covering`` ("this
    report covers") holds the judgements so far; None when none runs there, or when the one
    there is ``own_pid``: a run writing its own report, its journal closed, keeps its lock."""
    writer = find_writer(run_dir)
    if writer is None or (own_pid is not None and writer.pid == own_pid):
        return None
    return f"a process ({writer}) is still running in {run_dir}: {covering} the judgements so far"
