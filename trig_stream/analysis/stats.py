"""The numbers behind a relation code: correlations, zones, dominance, confidence intervals.

Every function takes two aligned float arrays ``x`` and ``y`` (the scores of one pair's two
dimensions over the images that have both) and is pure, so the batch analysis and the live
tracker share them and always agree. Definitions follow TRIG (see the spec, section 5):

* ``spearman_corr``: Pearson's correlation of the average ranks (ties share the mean of the
  ranks they span); NaN when fewer than two points or either side is constant. Ranks are
  whole or half numbers, so it is computed exactly (:class:`RankCorrelation`): rule 4
  compares it with ``tradeoff_corr`` as written, and the order of the points never matters.
* ``pearson_corr``: Pearson's correlation; 0 when either side is constant (or fewer than
  two points). Computed over the points in a fixed order, so it is the same to the last bit
  whatever order they came in; one within :data:`NEAR_EXACT` of 0, or of ``tradeoff_corr``
  when rule 4 compares them, is decided exactly from the scores (:class:`PearsonCorrelation`):
  floats are exact rationals, and an exact 0 came out as -3.5e-17, "below 0".
* ``paretoF``: the area under the non-dominated front (trapezoid rule over the front sorted by
  X), divided by ``max(X) * max(Y)``; 0 with fewer than two front points.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Final, Literal, TypeAlias

import numpy as np
from numpy.typing import NDArray

FloatArray: TypeAlias = NDArray[np.float64]
CorrelationMethod: TypeAlias = Literal["spearman_corr", "pearson_corr", "paretoF"]
RelationCode: TypeAlias = Literal[-2, -1, 0, 1, 2, 3]
"""0 synergy, 3 bottleneck, -2 / +2 dominance, 1 trade-off, -1 undefined."""

MIN_TRADEOFF_POINTS: Final = 10
"""Rule 3 (dominance) needs at least this many points in the trade-off zone."""
CONFIDENCE: Final = 0.95
Z_95: Final = 1.959963984540054
"""The standard normal quantile of 0.975: a two-sided 95 % interval."""
SPEARMAN_SE_FACTOR: Final = 1.06
"""Fieller, Hartley and Pearson (1957): var(atanh(r_s)) ~ 1.06 / (n - 3)."""
ON_THE_LINE: Final = 1e-12
"""How far above its fitted line a point may be and still count as on it (scores lie in
[0, 1]; the fit's rounding errors are near 1e-16)."""
NEAR_EXACT: Final = 1e-9
"""How close a Pearson correlation computed in floating point may come to a value (0, or
a threshold) before it is told from it exactly: its rounding errors are near 1e-16 a point."""


def average_ranks(values: FloatArray) -> FloatArray:
    """Ranks from 1 to n, ties sharing the mean of the ranks they span."""
    return _doubled_ranks(values) / 2.0


def _doubled_ranks(values: FloatArray) -> NDArray[np.int64]:
    # Twice the average ranks: the mean of a run of ranks is a whole or a half number, so
    # doubled they are integers, and sums over them are exact.
    n = values.shape[0]
    if n == 0:
        return np.empty(0, dtype=np.int64)
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts_group = np.empty(n, dtype=bool)
    starts_group[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=starts_group[1:])
    starts = np.flatnonzero(starts_group)
    sizes = np.diff(np.append(starts, n))
    ranks = np.empty(n, dtype=np.int64)
    ranks[order] = np.repeat(2 * starts + sizes + 1, sizes)
    return ranks


@dataclass(frozen=True, slots=True)
class RankCorrelation:
    """Spearman's correlation held exactly: ``covariance / sqrt(variance_product)``.

    Both are integers (sums over doubled ranks, scaled by ``n``), so the value does not depend
    on the order of the points, and :meth:`below` compares it with a threshold exactly.
    """

    covariance: int
    variance_product: int
    """The product of the two ranks' variances; positive."""

    @property
    def value(self) -> float:
        """The correlation as the float nearest it (exactly so when it is rational)."""
        root = math.isqrt(self.variance_product)
        if root * root == self.variance_product:
            return self.covariance / root  # int / int: correctly rounded
        return max(-1.0, min(1.0, self.covariance / math.sqrt(self.variance_product)))

    def below(self, threshold: float) -> bool:
        """Whether the correlation is below ``threshold`` as written (its decimal, not its
        binary value): a correlation of exactly 0.8 is not below 0.8."""
        return _ratio_below(self.covariance, self.variance_product, threshold)


def _ratio_below(covariance: int, variance_product: int, threshold: float) -> bool:
    """Whether ``covariance / sqrt(variance_product)`` is below ``threshold`` as written, in
    exact arithmetic (a covariance of 0 is a correlation of 0, whatever the variances)."""
    limit = Fraction(repr(threshold))
    c = covariance
    if limit > 0 and c <= 0:
        return True
    if limit <= 0 and c >= 0:
        return False
    # Same signs: compare the squares, |c| against |limit| * sqrt(variance_product).
    lhs = c * c * limit.denominator**2
    rhs = limit.numerator**2 * variance_product
    return lhs < rhs if c > 0 else lhs > rhs


@dataclass(frozen=True, slots=True, eq=False)
class PearsonCorrelation:
    """Pearson's correlation: the float :attr:`value`, and the points it was computed from,
    so that :meth:`below` tells it from a threshold exactly when the float is too close to.
    """

    value: float
    """:func:`pearson_corr` of the points."""
    x: FloatArray
    y: FloatArray

    def below(self, threshold: float) -> bool:
        """Whether the correlation is below ``threshold`` as written: one of exactly 0.8 is
        not below 0.8, nor one of exactly 0 below 0 (nor a constant side's conventional 0)."""
        if abs(self.value - threshold) > NEAR_EXACT:
            return self.value < threshold
        return _ratio_below(*_exact_pearson(self.x, self.y), threshold)


def _exact_pearson(x: FloatArray, y: FloatArray) -> tuple[int, int]:
    """Pearson's correlation as integers ``(covariance, variance_product)``, over the scores
    scaled by a power of two (which leaves the correlation as it is): exact, and dearer than
    the float, so computed only to decide what the float cannot."""
    a, b = _as_integers(x), _as_integers(y)
    n = len(a)
    sum_a, sum_b = sum(a), sum(b)
    covariance = n * sum(i * j for i, j in zip(a, b, strict=True)) - sum_a * sum_b
    var_a = n * sum(i * i for i in a) - sum_a * sum_a
    var_b = n * sum(j * j for j in b) - sum_b * sum_b
    return covariance, var_a * var_b


def _as_integers(values: FloatArray) -> list[int]:
    """``values`` times the power of two that makes every one of them an integer (a float is
    an integer over a power of two)."""
    ratios = [value.as_integer_ratio() for value in values.tolist()]
    bits = max(denominator.bit_length() for _, denominator in ratios)
    return [numerator << (bits - denominator.bit_length()) for numerator, denominator in ratios]


EXACT_DOT_LIMIT: Final = 1_000_000
"""Up to this many points, sums of products of doubled ranks (at most 4 n^3) fit in int64."""


def _exact_dot(a: NDArray[np.int64], b: NDArray[np.int64]) -> int:
    if a.shape[0] <= EXACT_DOT_LIMIT:
        return int(a @ b)
    return sum(int(i) * int(j) for i, j in zip(a.tolist(), b.tolist(), strict=True))


def rank_correlation(x: FloatArray, y: FloatArray) -> RankCorrelation | None:
    """Spearman's correlation, exactly; None when it is undefined (constant side, < 2 points)."""
    n = x.shape[0]
    if n < 2:
        return None
    a, b = _doubled_ranks(x), _doubled_ranks(y)
    total_squared = (n * (n + 1)) ** 2  # each side's doubled ranks sum to n (n + 1)
    var_a = n * _exact_dot(a, a) - total_squared
    var_b = n * _exact_dot(b, b) - total_squared
    if var_a == 0 or var_b == 0:  # every value tied
        return None
    return RankCorrelation(n * _exact_dot(a, b) - total_squared, var_a * var_b)


def _pearson_or_nan(x: FloatArray, y: FloatArray) -> float:
    if x.shape[0] < 2 or _constant(x) or _constant(y):
        # Tested on the values themselves: a mean that is not exact in floating point (ten
        # 0.613s) leaves deviations of 1e-17 that would give a correlation of noise.
        return math.nan
    # The sums' rounding depends on the order of the points: in a fixed order, the same
    # points give the same bits however the judgements arrived (a resume, a report).
    order = np.lexsort((y, x))
    x, y = x[order], y[order]
    dx = _unit_scaled(x - x.mean())
    dy = _unit_scaled(y - y.mean())
    r = float(dx @ dy) / math.sqrt(float(dx @ dx) * float(dy @ dy))
    if abs(r) <= NEAR_EXACT and _exact_pearson(x, y)[0] == 0:
        return 0.0  # exactly, not the -3.5e-17 the rounding of the sums left
    return max(-1.0, min(1.0, r))


def _constant(values: FloatArray) -> bool:
    return bool(values.min() == values.max())


def _unit_scaled(deviations: FloatArray) -> FloatArray:
    # The correlation does not change with scale; squares of deviations near 1e-100 would
    # underflow to 0.
    return deviations / float(np.abs(deviations).max())


def spearman_corr(x: FloatArray, y: FloatArray) -> float:
    """Spearman's rank correlation; NaN when it is undefined (constant side, < 2 points)."""
    exact = rank_correlation(x, y)
    return math.nan if exact is None else exact.value


def pearson_corr(x: FloatArray, y: FloatArray) -> float:
    """Pearson's correlation; 0 when either side is constant, as TRIG defines it."""
    r = _pearson_or_nan(x, y)
    return 0.0 if math.isnan(r) else r


def pareto_front(x: FloatArray, y: FloatArray) -> tuple[FloatArray, FloatArray]:
    """The distinct points no other point dominates (higher is better on both), by X ascending."""
    if x.shape[0] == 0:
        return x[:0], y[:0]
    # Sweep from the largest X down (largest Y first among equal X): a point is on the front
    # exactly when its Y beats every Y seen before it.
    order = np.lexsort((-y, -x))
    xs, ys = x[order], y[order]
    best_before = np.maximum.accumulate(ys)
    on_front = np.empty(xs.shape[0], dtype=bool)
    on_front[0] = True
    np.greater(ys[1:], best_before[:-1], out=on_front[1:])
    return xs[on_front][::-1], ys[on_front][::-1]


def pareto_f(x: FloatArray, y: FloatArray) -> float:
    """Area under the Pareto front over ``max(X) * max(Y)``; 0 with fewer than 2 front points."""
    front_x, front_y = pareto_front(x, y)
    if front_x.shape[0] < 2:
        return 0.0
    scale = float(x.max()) * float(y.max())
    if scale <= 0.0:
        return 0.0
    widths = np.diff(front_x)
    heights = (front_y[1:] + front_y[:-1]) / 2.0
    return float(widths @ heights) / scale


def correlation(method: CorrelationMethod, x: FloatArray, y: FloatArray) -> float:
    """The pair correlation TRIG's relation rules use, by method name."""
    if method == "spearman_corr":
        return spearman_corr(x, y)
    if method == "pearson_corr":
        return pearson_corr(x, y)
    return pareto_f(x, y)


def exact_correlation(
    method: CorrelationMethod, x: FloatArray, y: FloatArray
) -> RankCorrelation | PearsonCorrelation | float:
    """:func:`correlation`, held so that :func:`relation_code` compares it with its threshold
    exactly where it can (Spearman's as a :class:`RankCorrelation`, Pearson's as a
    :class:`PearsonCorrelation`)."""
    if method == "spearman_corr":
        exact = rank_correlation(x, y)
        return math.nan if exact is None else exact
    if method == "pearson_corr":
        return PearsonCorrelation(pearson_corr(x, y), x, y)
    return pareto_f(x, y)


def has_spread(x: FloatArray, y: FloatArray) -> bool:
    """Whether neither side is constant: a correlation of the points is then defined (TRIG's
    Pearson gives 0 otherwise, a convention, not a measure)."""
    return x.shape[0] > 0 and not (_constant(x) or _constant(y))


def fisher_interval(
    method: CorrelationMethod, r: float, n: int, *, defined: bool = True
) -> tuple[float, float]:
    """A 95 % confidence interval for a correlation by Fisher's z transform.

    ``atanh(r)`` is taken as normal with standard error ``1 / sqrt(n - 3)`` for Pearson and
    ``sqrt(1.06 / (n - 3))`` for Spearman (Fieller, Hartley and Pearson, 1957), and the bounds
    are mapped back with ``tanh``. The interval is (NaN, NaN) for ``paretoF`` (an area, not a
    correlation), for a NaN correlation, for one not ``defined`` by the points (Pearson's
    conventional 0 of a constant side: see :func:`has_spread`) and below 4 points; it is
    (r, r) when ``|r| = 1``.
    """
    if method == "paretoF" or math.isnan(r) or not defined or n < 4:
        return math.nan, math.nan
    if abs(r) >= 1.0:
        return r, r
    factor = SPEARMAN_SE_FACTOR if method == "spearman_corr" else 1.0
    half = Z_95 * math.sqrt(factor / (n - 3))
    z = math.atanh(r)
    return math.tanh(z - half), math.tanh(z + half)


@dataclass(frozen=True, slots=True)
class Zones:
    """How a pair's points fall into TRIG's three zones."""

    synergy_density: float
    """Share of points with both scores above the synergy threshold."""
    bottleneck_density: float
    """Share of points with both scores below the bottleneck threshold."""
    tradeoff_mask: NDArray[np.bool_]
    """The points in neither zone."""


def zones(x: FloatArray, y: FloatArray, synergy: float, bottleneck: float) -> Zones:
    """Split points into the synergy, bottleneck and trade-off zones (densities are 0 if empty)."""
    n = x.shape[0]
    high = (x > synergy) & (y > synergy)
    low = (x < bottleneck) & (y < bottleneck)
    n_high = int(np.count_nonzero(high))
    n_low = int(np.count_nonzero(low))
    return Zones(
        synergy_density=n_high / n if n else 0.0,
        bottleneck_density=n_low / n if n else 0.0,
        tradeoff_mask=~(high | low),
    )


@dataclass(frozen=True, slots=True)
class Dominance:
    """Where the trade-off zone's points lie relative to their least-squares line Y ~ X."""

    above: int
    """Points with Y above the line."""
    below: int
    """Points with Y on or below the line."""
    on_line: int = 0
    """Of ``below``, the points on the line (within :data:`ON_THE_LINE`): TRIG counts them
    as below, so a pair whose points all lie on one line is a dominance (+2)."""

    @property
    def ratio(self) -> float:
        """``max / min`` of the two counts; infinite when one side is empty."""
        low = min(self.above, self.below)
        return math.inf if low == 0 else max(self.above, self.below) / low


@dataclass(frozen=True, slots=True)
class FittedLine:
    """A least-squares line of Y on X, through the means: ``y = mean_y + slope (x - mean_x)``."""

    slope: float
    mean_x: float
    mean_y: float

    def at(self, x: FloatArray) -> FloatArray:
        """The line's Y at each X."""
        return self.mean_y + self.slope * (x - self.mean_x)


def fitted_line(x: FloatArray, y: FloatArray) -> FittedLine:
    """The least-squares line of Y on X; the horizontal line at the mean of Y when every X is
    the same (the slope is then undefined). :func:`dominance` splits points around it."""
    mean_x = float(x.mean())
    mean_y = float(y.mean())
    dx = x - mean_x
    sxx = float(dx @ dx)
    slope = float(dx @ (y - mean_y)) / sxx if sxx > 0.0 and not _constant(x) else 0.0
    return FittedLine(slope, mean_x, mean_y)


def dominance(x: FloatArray, y: FloatArray) -> Dominance:
    """Count points above and on-or-below the least-squares line of Y on X (:func:`fitted_line`).

    A point counts as above only when it is above the line by more than the fit's rounding
    (:data:`ON_THE_LINE`): a point the line goes through, such as every point of a constant
    Y whose mean is not exact in floating point, is on it.
    """
    residuals = y - fitted_line(x, y).at(x)
    above = int(np.count_nonzero(residuals > ON_THE_LINE))
    on_line = int(np.count_nonzero(np.abs(residuals) <= ON_THE_LINE))
    return Dominance(above=above, below=x.shape[0] - above, on_line=on_line)


def relation_code(
    *,
    synergy_density: float,
    bottleneck_density: float,
    dominance: Dominance | None,
    correlation: RankCorrelation | PearsonCorrelation | float,
    synergy_density_min: float,
    bottleneck_density_min: float,
    dominance_ratio: float,
    tradeoff_corr: float,
) -> RelationCode:
    """Apply TRIG's rules in order; the first that fires gives the code.

    Args:
        synergy_density: share of points in the synergy zone.
        bottleneck_density: share of points in the bottleneck zone.
        dominance: the trade-off zone's split around its fitted line, or None when that zone
            holds fewer than :data:`MIN_TRADEOFF_POINTS` points (rule 3 is then skipped).
        correlation: the pair correlation over all points (NaN never counts as small); a
            :class:`RankCorrelation` or :class:`PearsonCorrelation` is compared exactly with
            the threshold as written.
        synergy_density_min: rule 1's threshold.
        bottleneck_density_min: rule 2's threshold.
        dominance_ratio: rule 3 fires when the split's ratio exceeds ``1 / dominance_ratio``.
        tradeoff_corr: rule 4 fires when the correlation is below this.
    """
    if synergy_density >= synergy_density_min:
        return 0
    if bottleneck_density >= bottleneck_density_min:
        return 3
    if dominance is not None and _dominates(dominance, dominance_ratio):
        return -2 if dominance.above > dominance.below else 2
    if isinstance(correlation, float):
        if correlation < tradeoff_corr:  # False for NaN, by IEEE comparison
            return 1
    elif correlation.below(tradeoff_corr):
        return 1
    return -1


def _dominates(split: Dominance, dominance_ratio: float) -> bool:
    """Whether ``max / min > 1 / dominance_ratio``, in exact arithmetic on the threshold as
    written: with 0.65, a split of 20 to 13 (exactly 1 / 0.65) does not fire, though
    ``20 / 13 > 1 / 0.65`` in floating point."""
    ratio = Fraction(repr(dominance_ratio))  # the decimal the user wrote, not its binary value
    return ratio * max(split.above, split.below) > min(split.above, split.below)
