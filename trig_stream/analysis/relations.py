"""The relation analysis of one model: pair statistics, dimension means and the DTM.

Input is a model's scores arranged per pair as two aligned columns (:class:`PairColumns`), one
slot per image, NaN where the image has no ``ok`` score on that dimension. The batch path
(:func:`analyse_judgements`) builds the columns from a list of judgements; the live path
(:class:`trig_stream.analysis.live.RelationTracker`) keeps them growing as judgements arrive.
Both hand them to :func:`analyse_model`, so a live snapshot equals a batch analysis of the same
judgements.

Conventions beyond the spec:

* An image of a pair that lacks one (or both) of its two ``ok`` scores is left out of the
  pair's correlation, zones and code; :attr:`PairStats.excluded` counts such images. Of them,
  :attr:`PairStats.not_judged` counts those scored on one dimension and never judged on the
  other (no judgement of any status: a judge that measures only some dimensions, such as the
  ``nsfw`` metric judge, a dimensions filter, a run stopped before it); the rest
  lack a score that was asked for (an error, an unscorable answer).
* Dimension means and pair means use every ``ok`` score, excluded images included.
* A pair without a single complete image counts as absent: its code is -1, and the DTM looks
  for the reversed pair instead.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeAlias

import numpy as np
from numpy.typing import NDArray

from trig_stream.analysis.stats import (
    MIN_TRADEOFF_POINTS,
    FloatArray,
    RelationCode,
    dominance,
    exact_correlation,
    fisher_interval,
    has_spread,
    relation_code,
    zones,
)
from trig_stream.config import RelationSection
from trig_stream.dimensions import SORTED_DIMENSIONS, Dimension, split_pair
from trig_stream.errors import TrigStreamError
from trig_stream.journal import JournalEntry
from trig_stream.records import SCHEMA_VERSION, ScoredJudgement

BoolArray: TypeAlias = NDArray[np.bool_]

AnalysisKey: TypeAlias = tuple[str, str]
"""(model, metric): what one relation analysis covers."""


class AnalysisError(TrigStreamError):
    """An analysis input cannot be used (unknown layout, bad scores, nothing to analyse)."""


class OutputWriteError(AnalysisError):
    """A report, export or comparison cannot be written where it goes (no permission, a full
    disk, a file where its folder would be): the output's fault, not the input's, so the
    command exits as for an unwritable run directory (3), not as for a bad input (2)."""


@dataclass(frozen=True, slots=True)
class PairColumns:
    """One pair's scores: slot ``i`` is the image ``data_ids[i]``; NaN means no ok score.

    ``data_ids`` may be longer than the columns (the live tracker shares its growing list);
    only its first ``len(x)`` entries belong to these columns. ``judged_x`` and ``judged_y``
    tell whether a slot has a judgement of any status (ok, error, unscorable) on each
    dimension, so a NaN asked for and failed is told from one never asked for; None: every
    slot has one. A slot with a judgement on neither dimension is no image of the pair (the
    live tracker's, whose data_id is now judged under another pair).
    """

    pair: str
    first: Dimension
    second: Dimension
    data_ids: Sequence[str]
    x: FloatArray
    y: FloatArray
    judged_x: BoolArray | None = None
    judged_y: BoolArray | None = None


@dataclass(frozen=True, slots=True)
class PairPoints:
    """The complete points of a pair: the images that have both ok scores."""

    x: FloatArray
    y: FloatArray
    slots: np.ndarray
    all_ids: Sequence[str] = field(repr=False)

    @property
    def data_ids(self) -> list[str]:
        """The data_id of each point, aligned with ``x`` and ``y``."""
        return [self.all_ids[int(i)] for i in self.slots]


@dataclass(frozen=True, slots=True)
class PairStats:
    """Everything TRIG derives from one pair ``first_second``."""

    pair: str
    first: Dimension
    second: Dimension
    n: int
    """Images with both ok scores: the points analysed."""
    excluded: int
    """Images of the pair left out because one or both ok scores are missing."""
    not_judged: int
    """Of ``excluded``, the images with an ok score on one dimension and no judgement of any
    status on the other: never asked for (a judge that does not measure it, a ``[dataset]
    dimensions`` filter, a run stopped before it), not failed."""
    correlation: float
    ci_low: float
    ci_high: float
    """A 95 % interval for the correlation (Fisher z; NaN for paretoF or n < 4)."""
    synergy_density: float
    bottleneck_density: float
    tradeoff_points: int
    above: int | None
    below: int | None
    """The trade-off zone's split around its fitted line (None below 10 points): above it,
    and on or below it (TRIG's rule)."""
    on_line: int | None
    """Of ``below``, the points on the line (None below 10 points)."""
    code: RelationCode
    mean_first: float
    mean_second: float
    """Each dimension's mean over the pair's ok scores (NaN when none)."""
    judged_first: int
    judged_second: int
    """Images of the pair with a judgement of any status (ok, error, unscorable) on each
    dimension."""


@dataclass(frozen=True, slots=True)
class DTM:
    """The Dimension Trade-off Map: relation codes between dimensions in alphabetical order.

    ``codes[i][j]`` relates ``dimensions[i]`` (row) to ``dimensions[j]`` (column); the
    diagonal is None. The lower triangle mirrors the upper one with ±2 negated.
    """

    dimensions: tuple[Dimension, ...]
    codes: tuple[tuple[RelationCode | None, ...], ...]

    def code(self, row: Dimension, column: Dimension) -> RelationCode | None:
        """The code of ``row`` against ``column`` (None on the diagonal)."""
        return self.codes[self.dimensions.index(row)][self.dimensions.index(column)]


@dataclass(frozen=True, slots=True)
class ModelAnalysis:
    """The relation analysis of one model's scores under one metric."""

    model: str
    metric: str
    thresholds: RelationSection
    pairs: tuple[PairStats, ...]
    """One entry per pair, in the order the pairs first appeared."""
    dimension_means: dict[Dimension, float]
    """Mean of every ok score of a dimension, over all pairs holding it (dims with data)."""
    dimension_counts: dict[Dimension, int]
    dtm: DTM
    points: dict[str, PairPoints] = field(compare=False, repr=False)
    schema_version: int = SCHEMA_VERSION

    def pair(self, name: str) -> PairStats | None:
        """The statistics of pair ``name`` as written in the records, if any."""
        for stats in self.pairs:
            if stats.pair == name:
                return stats
        return None

    def present(self, first: Dimension, second: Dimension) -> PairStats | None:
        """The pair ``first_second`` if it has data, else ``second_first`` if that has."""
        for name in (f"{first}_{second}", f"{second}_{first}"):
            stats = self.pair(name)
            if stats is not None and stats.n > 0:
                return stats
        return None

    @property
    def excluded(self) -> int:
        """Images left out of their pair's correlation, over all pairs."""
        return sum(stats.excluded for stats in self.pairs)

    @property
    def not_judged(self) -> int:
        """Of :attr:`excluded`, the images scored on one dimension of their pair and never
        judged on the other (see :attr:`PairStats.not_judged`). The rest lack a score that was
        asked for (an error, an unscorable answer)."""
        return sum(stats.not_judged for stats in self.pairs)


def default_metric(metrics: Sequence[str], measured: Mapping[str, Collection[Dimension]]) -> str:
    """The metric analysed when none is named: of ``metrics`` (the config's judges first, in
    order), the first that measured every dimension any of them measured; else the first.
    A metric has measured a dimension when it holds an ``ok`` score on it: errors and
    unscorable answers measure nothing.

    A metric judge such as ``nsfw`` is asked about a few dimensions only (``R-T``): analysed
    because it came first in the config, it left every other dimension out of the DTM, and
    the VLM judge's analysis was never written. ``report``, ``compare``, the end-of-run
    report, the dashboard of ``run`` and ``watch`` all pick with this rule.

    Args:
        metrics: the candidates, in order; not empty.
        measured: the dimensions each metric measured (has ok scores on).
    """
    everything = {dimension for dimensions in measured.values() for dimension in dimensions}
    for metric in metrics:
        if everything <= set(measured.get(metric, ())):
            return metric
    return metrics[0]


def negate_dominance(code: RelationCode) -> RelationCode:
    """The code seen from the reversed pair: dominance (±2) flips, the rest stays."""
    if code == 2:
        return -2
    if code == -2:
        return 2
    return code


def _mean(values: FloatArray) -> float:
    return float(values.mean()) if values.shape[0] else math.nan


def analyse_pair(columns: PairColumns, thresholds: RelationSection) -> tuple[PairStats, PairPoints]:
    """Compute a pair's statistics and relation code from its columns."""
    x_all, y_all = columns.x, columns.y
    has_x = ~np.isnan(x_all)
    has_y = ~np.isnan(y_all)
    complete = has_x & has_y
    slots_total = x_all.shape[0]
    judged_x = np.ones(slots_total, bool) if columns.judged_x is None else columns.judged_x
    judged_y = np.ones(slots_total, bool) if columns.judged_y is None else columns.judged_y
    # The images of the pair: a live slot whose judgements moved to another pair holds none.
    size = np.count_nonzero(judged_x | judged_y)
    slots = np.flatnonzero(complete)
    x, y = x_all[slots], y_all[slots]
    n = int(slots.shape[0])
    points = PairPoints(x=x, y=y, slots=slots, all_ids=columns.data_ids)
    mean_first, mean_second = _mean(x_all[has_x]), _mean(y_all[has_y])
    method = thresholds.correlation
    if n == 0:
        corr, (low, high) = math.nan, (math.nan, math.nan)
        split, tradeoff_points = None, 0
        code: RelationCode = -1
        synergy_density = bottleneck_density = 0.0
    else:
        exact = exact_correlation(method, x, y)
        corr = exact if isinstance(exact, float) else exact.value
        low, high = fisher_interval(method, corr, n, defined=has_spread(x, y))
        zone = zones(x, y, thresholds.synergy, thresholds.bottleneck)
        synergy_density, bottleneck_density = zone.synergy_density, zone.bottleneck_density
        tradeoff_points = int(np.count_nonzero(zone.tradeoff_mask))
        split = None
        if tradeoff_points >= MIN_TRADEOFF_POINTS:
            split = dominance(x[zone.tradeoff_mask], y[zone.tradeoff_mask])
        code = relation_code(
            synergy_density=synergy_density,
            bottleneck_density=bottleneck_density,
            dominance=split,
            correlation=exact,
            synergy_density_min=thresholds.synergy_density,
            bottleneck_density_min=thresholds.bottleneck_density,
            dominance_ratio=thresholds.dominance_ratio,
            tradeoff_corr=thresholds.tradeoff_corr,
        )
    stats = PairStats(
        pair=columns.pair,
        first=columns.first,
        second=columns.second,
        n=n,
        excluded=int(size) - n,
        not_judged=int(np.count_nonzero((has_x & ~judged_y) | (has_y & ~judged_x))),
        correlation=corr,
        ci_low=low,
        ci_high=high,
        synergy_density=synergy_density,
        bottleneck_density=bottleneck_density,
        tradeoff_points=tradeoff_points,
        above=None if split is None else split.above,
        below=None if split is None else split.below,
        on_line=None if split is None else split.on_line,
        code=code,
        mean_first=mean_first,
        mean_second=mean_second,
        judged_first=int(np.count_nonzero(judged_x)),
        judged_second=int(np.count_nonzero(judged_y)),
    )
    return stats, points


def build_dtm(pairs: Iterable[PairStats]) -> DTM:
    """The DTM over all ten dimensions in alphabetical order (TRIG spec, section 5).

    For row ``a`` < column ``b``: the code of ``a_b`` if it has data, else that of ``b_a`` with
    ±2 negated, else -1. The lower triangle mirrors the upper one with ±2 negated.
    """
    by_name = {stats.pair: stats.code for stats in pairs if stats.n > 0}
    dims = SORTED_DIMENSIONS
    size = len(dims)
    grid: list[list[RelationCode | None]] = [[None] * size for _ in range(size)]
    for i in range(size):
        for j in range(i + 1, size):
            a, b = dims[i], dims[j]
            upper: RelationCode
            if f"{a}_{b}" in by_name:
                upper = by_name[f"{a}_{b}"]
            elif f"{b}_{a}" in by_name:
                upper = negate_dominance(by_name[f"{b}_{a}"])
            else:
                upper = -1
            grid[i][j] = upper
            grid[j][i] = negate_dominance(upper)
    return DTM(dimensions=dims, codes=tuple(tuple(row) for row in grid))


def analyse_model(
    model: str, metric: str, columns: Iterable[PairColumns], thresholds: RelationSection
) -> ModelAnalysis:
    """Analyse every pair of one model and assemble means and the DTM."""
    pair_stats: list[PairStats] = []
    points: dict[str, PairPoints] = {}
    sums: dict[Dimension, float] = {}
    counts: dict[Dimension, int] = {}
    for column in columns:
        stats, pair_points = analyse_pair(column, thresholds)
        pair_stats.append(stats)
        points[column.pair] = pair_points
        for dimension, values in ((column.first, column.x), (column.second, column.y)):
            present = values[~np.isnan(values)]
            if present.shape[0]:
                sums[dimension] = sums.get(dimension, 0.0) + float(present.sum())
                counts[dimension] = counts.get(dimension, 0) + int(present.shape[0])
    means = {dim: sums[dim] / counts[dim] for dim in SORTED_DIMENSIONS if dim in counts}
    return ModelAnalysis(
        model=model,
        metric=metric,
        thresholds=thresholds,
        pairs=tuple(pair_stats),
        dimension_means=means,
        dimension_counts={dim: counts[dim] for dim in means},
        dtm=build_dtm(pair_stats),
        points=points,
    )


def current_pairs(judgements: Iterable[ScoredJudgement]) -> dict[tuple[str, str, str], str]:
    """The pair each (model, metric, data_id) was judged under last.

    A sample whose pair changed in the dataset and was judged again (a judgement of any
    status: one that failed was asked under the new pair too) is of its new pair only: the
    lines of its old pair's dimensions are no longer of the dataset. "Last" is the journal's
    order: that of ``judgements``, or their ``line`` where they carry one (a
    :class:`~trig_stream.journal.JournalEntry`, one per key in the order the keys first
    appear). A judgement whose dimension is not one of its pair's two is ignored.
    """
    last: dict[tuple[str, str, str], tuple[int, str]] = {}
    for index, judgement in enumerate(judgements):
        if judgement.dimension not in split_pair(judgement.pair):
            continue
        # Not getattr(judgement, "line", index): a pydantic Judgement's miss costs a raised
        # AttributeError, a fifth of a batch analysis.
        line = judgement.line if isinstance(judgement, JournalEntry) else index
        key = (judgement.model, judgement.metric, judgement.data_id)
        seen = last.get(key)
        if seen is None or line >= seen[0]:
            last[key] = (line, judgement.pair)
    return {key: pair for key, (_, pair) in last.items()}


def columns_from_judgements(
    judgements: Iterable[ScoredJudgement],
) -> dict[AnalysisKey, list[PairColumns]]:
    """Arrange judgements into pair columns per (model, metric); the last of a key wins.

    Judgements come in journal order, or one per key with their journal ``line`` (the
    read-only commands' :class:`~trig_stream.journal.JournalEntry`). An image is of the pair
    of its last judgement (see :func:`current_pairs`). Pairs keep the order they first appear
    in, and images within a pair too, lines of a pair an image has left included (as the
    live tracker orders them). A judgement whose dimension is not one of its pair's two is
    ignored.
    """
    if not isinstance(judgements, Sequence):
        judgements = list(judgements)  # read twice
    current = current_pairs(judgements)
    # Per image: the two scores (NaN: no ok score) and whether each dimension was judged at
    # all (1.0) or never (0.0), so a failed judgement is told from one never asked for.
    # Pairs, and images within a pair, are placed where they were first judged, lines of a
    # pair a sample has left since included: the live tracker's order (its buffers and
    # slots), so the pairs come out in the dashboard's order and each mean sums its scores
    # in the same order, to the last bit.
    cells: dict[AnalysisKey, dict[str, dict[str, list[float]]]] = {}
    # The journal's key, without the pair: a key judged again under another pair counts
    # under that one only.
    latest: dict[tuple[str, str, str, str], ScoredJudgement] = {}
    for judgement in judgements:
        model, metric, data_id = judgement.model, judgement.metric, judgement.data_id
        if judgement.dimension in split_pair(judgement.pair):
            pair_images = cells.setdefault((model, metric), {}).setdefault(judgement.pair, {})
            pair_images.setdefault(data_id, [math.nan, math.nan, 0.0, 0.0])
            latest[(model, metric, data_id, judgement.dimension)] = judgement
    for (model, metric, data_id, _), judgement in latest.items():
        pair = judgement.pair
        if current[(model, metric, data_id)] != pair:
            continue  # a line of the pair the sample had before it was judged under another
        values = cells[(model, metric)][pair][data_id]
        first, _second = split_pair(pair)
        score = (
            judgement.score if judgement.status == "ok" and judgement.score is not None else None
        )
        side = 0 if judgement.dimension == first else 1
        values[side] = math.nan if score is None else score
        values[2 + side] = 1.0
    result: dict[AnalysisKey, list[PairColumns]] = {}
    for group, pairs in cells.items():
        for pair, every in pairs.items():
            # Without the images now of another pair; a pair left with none is gone.
            images = {data_id: v for data_id, v in every.items() if v[2] or v[3]}
            if not images:
                continue
            first, second = split_pair(pair)
            table = np.array(list(images.values()), dtype=np.float64).reshape(-1, 4)
            result.setdefault(group, []).append(
                PairColumns(
                    pair,
                    first,
                    second,
                    list(images),
                    table[:, 0].copy(),
                    table[:, 1].copy(),
                    table[:, 2] > 0,
                    table[:, 3] > 0,
                )
            )
    return result


def analyse_judgements(
    judgements: Iterable[ScoredJudgement],
    thresholds: RelationSection | None = None,
    *,
    pairs: Sequence[str] = (),
) -> dict[AnalysisKey, ModelAnalysis]:
    """Analyse judgements from scratch: one :class:`ModelAnalysis` per (model, metric).

    Args:
        judgements: see :func:`columns_from_judgements`.
        thresholds: the relation thresholds (TRIG's defaults when omitted).
        pairs: pairs each (model, metric) holds, in this order before its others, also
            without a judgement: such a pair (a formatted file's ``{}``, which holds no image
            scored on both dimensions) is analysed empty, n = 0 and code -1, as the report
            that wrote the file had it.
    """
    thresholds = thresholds or RelationSection()
    analyses = {}
    for (model, metric), found in columns_from_judgements(judgements).items():
        columns = found
        if pairs:
            by_pair = {column.pair: column for column in found}
            columns = [by_pair.pop(pair) if pair in by_pair else _no_image(pair) for pair in pairs]
            columns += by_pair.values()
        analyses[(model, metric)] = analyse_model(model, metric, columns, thresholds)
    return analyses


def _no_image(pair: str) -> PairColumns:
    first, second = split_pair(pair)
    none = np.zeros(0, bool)
    return PairColumns(pair, first, second, [], np.empty(0), np.empty(0), none, none)
