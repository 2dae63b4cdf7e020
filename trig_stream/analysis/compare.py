"""Comparing the relation analyses of several models: means side by side, DTM differences."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from trig_stream.analysis.relations import ModelAnalysis
from trig_stream.analysis.stats import RelationCode
from trig_stream.dimensions import SORTED_DIMENSIONS, Dimension


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

    @property
    def agreeing_cells(self) -> int:
        """Upper-triangle cells on which every model has the same code."""
        size = len(SORTED_DIMENSIONS)
        return size * (size - 1) // 2 - len(self.differences)


def compare(
    analyses: Mapping[str, ModelAnalysis],
    tasks: Mapping[str, str] | None = None,
    notes: Sequence[str] = (),
) -> Comparison:
    """Compare analyses given by label (a model name, or ``run/model`` across run dirs).

    Args:
        analyses: label -> analysis.
        tasks: label -> TRIG task, when known.
        notes: lines the comparison carries (see :attr:`Comparison.notes`).
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
    return Comparison(labels, means, tuple(differences), metrics, dict(tasks or {}), tuple(notes))


def comparison_markdown(comparison: Comparison) -> str:
    """The comparison as markdown: a means table and a table of the differing DTM cells."""
    labels = comparison.labels
    lines = ["# TRIG model comparison", ""]
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
    if apart:
        kinds = " and ".join(f"{what}s" for what, _ in apart)
        lines += [
            f"**The columns are of different {kinds}** (first rows below): their numbers do "
            "not measure the same thing.",
            "",
        ]
    lines += [f"Note: {note}" for note in comparison.notes]
    if comparison.notes:
        lines.append("")
    lines += ["## Dimension means", ""]
    lines.append("| dimension | " + " | ".join(labels) + " |")
    lines.append("|" + "---|" * (len(labels) + 1))
    for what, values in apart:
        lines.append(f"| {what} | " + " | ".join(values.get(lb, "–") for lb in labels) + " |")
    for dim, by_label in comparison.dimension_means.items():
        cells = ["–" if math.isnan(by_label[lb]) else f"{by_label[lb]:.3f}" for lb in labels]
        lines.append(f"| {dim} | " + " | ".join(cells) + " |")
    lines += ["", "## DTM cells that differ", ""]
    if not comparison.differences:
        lines.append("Every DTM cell has the same code for all models.")
    else:
        lines.append("| row | column | " + " | ".join(labels) + " |")
        lines.append("|" + "---|" * (len(labels) + 2))
        for diff in comparison.differences:
            codes = " | ".join(str(diff.codes[label]) for label in labels)
            lines.append(f"| {diff.row} | {diff.column} | {codes} |")
        lines += ["", f"{comparison.agreeing_cells} other cells agree."]
    return "\n".join(lines) + "\n"
