"""Comparing the relation analyses of several models: means side by side, DTM differences."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from trig_stream.analysis.relations import ModelAnalysis
from trig_stream.analysis.stats import RelationCode
from trig_stream.dimensions import SORTED_DIMENSIONS, Dimension
from trig_stream.records import exact_number, storable_text
from trig_stream.scoring import SCORERS, SCORING_RULES_KEY, scored_alike

COMPARISON_HEADING = "# TRIG model comparison"
"""The first line of :func:`comparison_markdown`: how a report knows a ``comparison.md``
an earlier report wrote (replaced or removed) from a file of the user's (left alone)."""


@dataclass(frozen=True, slots=True)
class DTMDifference:
    """One upper-triangle DTM cell whose code is not the same for every model."""

    row: Dimension
    column: Dimension
    codes: dict[str, RelationCode]
    """Label -> code of ``row`` against ``column``."""


@dataclass(frozen=True, slots=True)
class Comparison:
    """Several models' analyses put side by side."""

    labels: tuple[str, ...]
    dimension_means: dict[Dimension, dict[str, float]]
    """Dimension -> label -> mean (NaN where a model has no score on it)."""
    differences: tuple[DTMDifference, ...]
    """The DTM cells (row < column, alphabetical) whose codes differ between models."""
    metrics: dict[str, str] = field(default_factory=dict)
    """Label -> the metric its scores are of."""
    tasks: dict[str, str] = field(default_factory=dict)
    """Label -> its TRIG task, when known."""
    notes: tuple[str, ...] = ()
    """What a reader must know to trust the numbers (a run still in progress)."""
    judges: dict[str, str] = field(default_factory=dict)
    """Label -> the fields of its judge's fingerprint on which the columns differ (scorer,
    params, ...); empty when every column's judge is the same."""
    thresholds: dict[str, str] = field(default_factory=dict)
    """Label -> the relation thresholds on which the columns differ; empty when alike."""

    @property
    def agreeing_cells(self) -> int:
        """Upper-triangle cells on which every model has the same code."""
        size = len(SORTED_DIMENSIONS)
        return size * (size - 1) // 2 - len(self.differences)


def compare(
    analyses: Mapping[str, ModelAnalysis],
    tasks: Mapping[str, str] | None = None,
    notes: Sequence[str] = (),
    judges: Mapping[str, Mapping[str, Any]] | None = None,
) -> Comparison:
    """Compare analyses given by label (a model name, or ``run/model`` across run dirs).

    Args:
        analyses: label -> analysis.
        tasks: label -> TRIG task, when known.
        notes: lines the comparison carries (see :attr:`Comparison.notes`).
        judges: label -> the fingerprint of the judge its scores are of (a manifest's
            entry), when known.
    """
    labels = tuple(analyses)
    means = {
        dim: {label: a.dimension_means.get(dim, math.nan) for label, a in analyses.items()}
        for dim in SORTED_DIMENSIONS
        if any(dim in a.dimension_means for a in analyses.values())
    }
    differences = []
    dims = SORTED_DIMENSIONS
    for i, row in enumerate(dims):
        for column in dims[i + 1 :]:
            codes: dict[str, RelationCode] = {}
            for label, analysis in analyses.items():
                code = analysis.dtm.code(row, column)
                assert code is not None, "off-diagonal DTM cells always hold a code"
                codes[label] = code
            if len(set(codes.values())) > 1:
                differences.append(DTMDifference(row, column, codes))
    metrics = {label: analysis.metric for label, analysis in analyses.items()}
    thresholds = {label: a.thresholds.model_dump() for label, a in analyses.items()}
    return Comparison(
        labels,
        means,
        tuple(differences),
        metrics,
        dict(tasks or {}),
        tuple(notes),
        judges=_differing(_without_rules_scored_alike(_with_scoring_rules(judges or {}))),
        thresholds=_differing(thresholds),
    )


def _with_scoring_rules(judges: Mapping[str, Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """``judges`` with :data:`FIRST_SCORING_RULES` in each fingerprint whose ``params`` lack
    rules, when another's hold them. A run directory written before fingerprints held their
    rules scored as the first rules do (but for answers rare enough that only a resume's
    re-scoring, :func:`~trig_stream.manifest.checked_scoring_rules`, tells them), so it is of
    the same judge as a run of rules 1, and of another than a run of later rules, whose robust
    scores differ.
    """
    if not any(SCORING_RULES_KEY in (fp.get("params") or {}) for fp in judges.values()):
        return dict(judges)
    out: dict[str, Mapping[str, Any]] = {}
    for label, fingerprint in judges.items():
        params = fingerprint.get("params")
        if isinstance(params, Mapping) and SCORING_RULES_KEY not in params:
            fingerprint = {
                **fingerprint,
                "params": {**params, SCORING_RULES_KEY: FIRST_SCORING_RULES},
            }
        out[label] = fingerprint
    return out


FIRST_SCORING_RULES = 1
"""The rules of the trig-stream that first recorded them in a judge's fingerprint."""


def _without_rules_scored_alike(
    judges: Mapping[str, Mapping[str, Any]],
) -> dict[str, Mapping[str, Any]]:
    """``judges`` without the scoring rules in their ``params`` when the rules differ but
    score the one scorer they share alike (:func:`~trig_stream.scoring.scored_alike`): rules
    2 changed the robust scorer alone, so trig-scored columns of rules 1 and 2 are of the
    same judge, as a resume across them takes them to be. Their other fields differ or not as
    ever; judges of different scorers keep their rules, which then tell them apart too."""
    rules = [_params(fp).get(SCORING_RULES_KEY) for fp in judges.values()]
    numbers: set[int] = {r for r in rules if type(r) is int}
    if len(numbers) < 2 or any(type(r) is not int for r in rules):
        return dict(judges)  # alike, or one without a rules number (a bool, an edited text)
    scorers = [_scorer(fp) for fp in judges.values()]
    scorer = scorers[0]
    if (
        scorer not in SCORERS
        or any(other != scorer for other in scorers)
        or not scored_alike(scorer, min(numbers), max(numbers))
    ):
        return dict(judges)
    return {
        label: {**fp, "params": {k: v for k, v in _params(fp).items() if k != SCORING_RULES_KEY}}
        for label, fp in judges.items()
    }


def _params(fingerprint: Mapping[str, Any]) -> Mapping[str, Any]:
    params = fingerprint.get("params")
    return params if isinstance(params, Mapping) else {}


def _scorer(fingerprint: Mapping[str, Any]) -> Any:
    """The scorer of a judge's fingerprint: its own field, or a metric's option (the
    ``trigscore`` metric's) in its ``params``."""
    return fingerprint.get("scorer") or _params(fingerprint).get("scorer")


def _differing(values: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """Label -> ``key value`` for each key on which the labels' values differ (nested keys
    as ``params.seed``); empty when they are all alike."""
    flat = {label: _flatten(value) for label, value in values.items()}
    keys = dict.fromkeys(key for entries in flat.values() for key in entries)
    apart = [key for key in keys if len({entries.get(key, "–") for entries in flat.values()}) > 1]
    if not apart:
        return {}
    return {
        label: ", ".join(f"{key} {entries.get(key, '–')}" for key in apart)
        for label, entries in flat.items()
    }


def _flatten(value: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, item in value.items():
        if isinstance(item, Mapping):  # an empty one: nothing set, as when it is missing
            out.update(_flatten(item, f"{prefix}{key}."))
        elif isinstance(item, float):
            # Exact: 0.8 and 0.8000001 (":g" wrote both 0.8) are different thresholds.
            out[prefix + key] = exact_number(item)
        elif isinstance(item, str):
            out[prefix + key] = item
        else:
            out[prefix + key] = json.dumps(item, sort_keys=True, default=str)
    return out


_LINE_BREAKS: Final = str.maketrans({"\r": "\\r", "\n": "\\n"})
_CELL_BREAKS: Final = str.maketrans({"|": "\\|", "\r": "\\r", "\n": "\\n"})


def _line(text: str) -> str:
    """``text`` on one line of the file: its line breaks written ``\\r`` and ``\\n`` (a run
    directory's name holding one began a line of its own). Its other control characters are
    kept, as the manifest holds them; the terminal is shown them escaped."""
    return text.translate(_LINE_BREAKS)


def _cell(text: str) -> str:
    """``text`` as one cell of a table: as :func:`_line`, with ``|`` written ``\\|`` (a judge
    model ``judge|A`` split its cell in two, shifting the columns after it)."""
    return text.translate(_CELL_BREAKS)


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(map(_cell, cells)) + " |"


def comparison_markdown(comparison: Comparison) -> str:
    """The comparison as markdown: a means table and a table of the differing DTM cells.

    Its text is :func:`~trig_stream.records.storable_text`: a run directory's name of bytes
    that are not UTF-8 reads as lone surrogates, which the file could not hold."""
    labels = comparison.labels
    lines = [COMPARISON_HEADING, ""]
    # What the scores are of: said once when all columns agree, else per column, first.
    alike = []
    apart: list[tuple[str, dict[str, str]]] = []
    for what, values in (("metric", comparison.metrics), ("task", comparison.tasks)):
        if len(set(values.values())) == 1:
            alike.append(f"{what} `{next(iter(values.values()))}`")
        elif values:
            apart.append((what, values))
    if alike:
        said = ", ".join(alike)
        lines += [f"{said[0].upper()}{said[1:]}.", ""]
    if comparison.judges:
        apart.append(("judge", comparison.judges))
    if apart:
        kinds = [f"{what}s" for what, _ in apart]
        said = ", ".join(kinds[:-1]) + " and " + kinds[-1] if len(kinds) > 1 else kinds[0]
        lines += [
            f"**The columns are of different {said}** (first rows below): their numbers do "
            "not measure the same thing.",
            "",
        ]
    if comparison.thresholds:
        apart.append(("thresholds", comparison.thresholds))
        lines += [
            "**The columns' relation codes use different thresholds** (row `thresholds` "
            "below): DTM cells can differ by the thresholds alone; the threshold options "
            "(`--synergy-density` and the others) set them alike for every column.",
            "",
        ]
    lines += [f"Note: {_line(note)}" for note in comparison.notes]
    if comparison.notes:
        lines.append("")
    lines += ["## Dimension means", ""]
    lines.append(_row(["dimension", *labels]))
    lines.append("|" + "---|" * (len(labels) + 1))
    for what, values in apart:
        lines.append(_row([what, *(values.get(lb, "–") for lb in labels)]))
    for dim, by_label in comparison.dimension_means.items():
        cells = ["–" if math.isnan(by_label[lb]) else f"{by_label[lb]:.3f}" for lb in labels]
        lines.append(_row([dim, *cells]))
    lines += ["", "## DTM cells that differ", ""]
    if not comparison.differences:
        lines.append("Every DTM cell has the same code for all models.")
    else:
        lines.append(_row(["row", "column", *labels]))
        lines.append("|" + "---|" * (len(labels) + 2))
        for diff in comparison.differences:
            codes = [str(diff.codes[label]) for label in labels]
            lines.append(_row([diff.row, diff.column, *codes]))
        lines += ["", f"{comparison.agreeing_cells} other cells agree."]
    return storable_text("\n".join(lines) + "\n")
