"""Relation codes, correlations and the DTM, on cases worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from trig_stream.analysis import RelationTracker, analyse_judgements, negate_dominance
from trig_stream.analysis.exports import pair_row
from trig_stream.analysis.relations import PairColumns, analyse_pair
from trig_stream.analysis.report import left_out_text
from trig_stream.analysis.stats import (
    Dominance,
    average_ranks,
    fisher_interval,
    fitted_line,
    pareto_f,
    pareto_front,
    pearson_corr,
    rank_correlation,
    spearman_corr,
)
from trig_stream.config import RelationSection
from trig_stream.dimensions import Dimension, split_pair
from trig_stream.journal import journal_entry
from trig_stream.records import JudgeFingerprint, Judgement

JUDGE = JudgeFingerprint(backend="fake", model="judge")

# Each case: pair scores and the code TRIG's rules give under the default thresholds.
SYNERGY = ([0.9, 0.9, 0.85, 0.2, 0.6], [0.9, 0.95, 0.85, 0.3, 0.7])  # rho_s = 3/5
BOTTLENECK = ([0.1, 0.2, 0.3, 0.9, 0.6], [0.2, 0.1, 0.4, 0.9, 0.7])  # rho_b = 3/5, rho_s = 1/5
# Ten trade-off points; X symmetric about 0.65 within each Y group, so the LS line is flat at
# mean(Y). Eight points lie on one side, two on the other: ratio 4 > 1 / 0.8.
_X10 = [0.55, 0.6, 0.6, 0.65, 0.65, 0.7, 0.7, 0.75, 0.55, 0.75]
ABOVE = (_X10, [0.62] * 8 + [0.52] * 2)  # mean Y 0.60: 8 above, 2 below -> -2
BELOW = (_X10, [0.58] * 8 + [0.68] * 2)  # mean Y 0.60: 2 above, 8 below -> +2
TRADEOFF = ([0.6, 0.7, 0.75, 0.65, 0.55], [0.7, 0.6, 0.55, 0.65, 0.75])  # Spearman -1
UNDEFINED = ([0.55, 0.6, 0.65, 0.7, 0.75], [0.56, 0.61, 0.66, 0.71, 0.76])  # Spearman +1


def columns(pair: str, x: list[float], y: list[float]) -> PairColumns:
    first, second = split_pair(pair)
    ids = [f"{pair}_{i + 1}" for i in range(len(x))]
    return PairColumns(pair, first, second, ids, np.array(x), np.array(y))


def judgements_for(pair: str, x: list[float], y: list[float], model: str = "m") -> list[Judgement]:
    first, second = split_pair(pair)
    out = []
    for index, (a, b) in enumerate(zip(x, y, strict=True)):
        for dimension, score in ((first, a), (second, b)):
            out.append(judgement(model, f"{pair}_{index + 1}", pair, dimension, score))
    return out


def judgement(
    model: str, data_id: str, pair: str, dimension: Dimension, score: float | None
) -> Judgement:
    return Judgement(
        model=model,
        data_id=data_id,
        task="t2i",
        pair=pair,
        dimension=dimension,
        metric="trigscore",
        judge=JUDGE,
        status="ok" if score is not None else "unscorable",
        score=score,
    )


@pytest.mark.parametrize(
    ("scores", "code"),
    [(SYNERGY, 0), (BOTTLENECK, 3), (ABOVE, -2), (BELOW, 2), (TRADEOFF, 1), (UNDEFINED, -1)],
    ids=[
        "synergy-0",
        "bottleneck-3",
        "dominance-minus2",
        "dominance-plus2",
        "tradeoff-1",
        "undefined-minus1",
    ],
)
def test_every_relation_code_on_hand_computed_pairs(
    scores: tuple[list[float], list[float]], code: int
) -> None:
    stats, _ = analyse_pair(columns("IQ-R_TA-C", *scores), RelationSection())
    assert stats.code == code


def test_dominance_split_is_the_one_worked_out_by_hand() -> None:
    above, _ = analyse_pair(columns("IQ-R_TA-C", *ABOVE), RelationSection())
    below, _ = analyse_pair(columns("IQ-R_TA-C", *BELOW), RelationSection())
    assert (above.tradeoff_points, above.above, above.below) == (10, 8, 2)
    assert (below.above, below.below) == (2, 8)
    assert Dominance(above=3, below=0).ratio == math.inf


def test_rules_apply_in_order_synergy_before_bottleneck() -> None:
    # Half the points in each zone: both rule 1 and rule 2 fire; rule 1 wins.
    x, y = [0.9, 0.9, 0.1, 0.1], [0.9, 0.9, 0.1, 0.1]
    stats, _ = analyse_pair(columns("IQ-R_TA-C", x, y), RelationSection())
    assert (stats.synergy_density, stats.bottleneck_density, stats.code) == (0.5, 0.5, 0)


def test_fewer_than_ten_tradeoff_points_skip_the_dominance_rule() -> None:
    x, y = ABOVE[0][:9], ABOVE[1][:7] + ABOVE[1][8:]
    stats, _ = analyse_pair(columns("IQ-R_TA-C", x, y), RelationSection())
    assert stats.tradeoff_points == 9
    assert stats.above is None
    assert stats.code != -2


def test_spearman_with_ties_uses_average_ranks() -> None:
    x, y = np.array([1.0, 2.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0, 4.0])
    assert average_ranks(x).tolist() == [1.0, 2.5, 2.5, 4.0]
    # ranks x: dx = (-1.5, 0, 0, 1.5); y: dy = (-1.5, -0.5, 0.5, 1.5): r = 4.5 / sqrt(4.5 * 5)
    assert spearman_corr(x, y) == pytest.approx(3 / math.sqrt(10))
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, 5, 200) / 4, rng.integers(0, 5, 200) / 4
    assert spearman_corr(a, b) == pytest.approx(scipy_stats.spearmanr(a, b).statistic)


def test_constant_column_gives_nan_spearman_which_is_not_a_tradeoff() -> None:
    x, y = [0.6] * 6, [0.55, 0.6, 0.65, 0.7, 0.75, 0.6]
    assert math.isnan(spearman_corr(np.array(x), np.array(y)))
    stats, _ = analyse_pair(columns("IQ-R_TA-C", x, y), RelationSection())
    assert math.isnan(stats.correlation)
    assert stats.code == -1
    # Pearson defines a constant side as 0, which is below 0.6: a trade-off.
    assert pearson_corr(np.array(x), np.array(y)) == 0.0
    pearson, _ = analyse_pair(
        columns("IQ-R_TA-C", x, y), RelationSection(correlation="pearson_corr")
    )
    assert pearson.code == 1


def test_points_on_the_fitted_line_count_as_below() -> None:
    # The exact line goes through (0, 0.5) and (1, 0.25): the three (0, 0.5) points lie on
    # it. Its rounding in floating point counted them above, and flipped the code to -2.
    x, y = [0.0] * 3 + [1.0] * 12, [0.5] * 3 + [0.5] * 6 + [0.0] * 6
    stats, _ = analyse_pair(columns("IQ-R_TA-C", x, y), RelationSection())
    assert (stats.above, stats.below, stats.on_line, stats.code) == (6, 9, 3, 2)
    # A constant Y whose mean is not exact (ten 0.613s): every point is on the flat line.
    flat = [round(i / 9, 3) for i in range(10)], [0.613] * 10
    stats, _ = analyse_pair(columns("IQ-R_TA-C", *flat), RelationSection())
    assert (stats.above, stats.below, stats.on_line, stats.code) == (0, 10, 10, 2)


def test_dominance_at_exactly_the_ratio_does_not_fire() -> None:
    # 20 above and 13 below: 20 / 13 is exactly 1 / 0.65, and rule 3 wants more than that
    # (floating point made 20 / 13 the larger). The line is flat at mean(Y) = 0.6: X is
    # symmetric about 0.65 within each Y group, so Y cannot lean on X.
    xs = [0.55, 0.75] * 10
    x = xs + [0.55, 0.75] * 6 + [0.65]
    y = [0.6 + 13 / 660] * 20 + [0.6 - 20 / 660] * 13
    assert np.mean(y) == pytest.approx(0.6)
    section = RelationSection(dominance_ratio=0.65, tradeoff_corr=-1.0)
    stats, _ = analyse_pair(columns("IQ-R_TA-C", x, y), section)
    assert (stats.above, stats.below, stats.code) == (20, 13, -1)
    stats, _ = analyse_pair(
        columns("IQ-R_TA-C", x, y), section.model_copy(update={"dominance_ratio": 0.66})
    )
    assert stats.code == -2


def test_pearson_of_a_constant_side_is_zero_when_its_mean_is_not_exact() -> None:
    x = np.array([0.7] * 12)  # mean(x) - 0.7 is 1e-16, not 0
    y = np.array([0.55, 0.6, 0.65, 0.7, 0.75, 0.78, 0.52, 0.58, 0.62, 0.68, 0.72, 0.76])
    assert x.mean() != 0.7
    assert pearson_corr(x, y) == 0.0 and pearson_corr(y, x) == 0.0
    assert math.isnan(spearman_corr(x, y))
    section = RelationSection(correlation="pearson_corr", tradeoff_corr=0.0)
    stats, _ = analyse_pair(columns("IQ-R_TA-C", x.tolist(), y.tolist()), section)
    assert (stats.correlation, stats.code) == (0.0, -1)


def test_pearson_of_tiny_scores_is_that_of_the_same_scores_scaled() -> None:
    # Squares of deviations near 1e-100 underflow to 0: a ZeroDivisionError before.
    a, b = np.array([1.0, 2.0, 3.0, 4.0, 5.0]), np.array([2.0, 1.0, 4.0, 3.0, 5.0])
    assert pearson_corr(a * 1e-100, b * 1e-100) == pytest.approx(pearson_corr(a, b))
    assert pearson_corr(a * 1e-300, b) == pytest.approx(pearson_corr(a, b))
    assert pearson_corr(a, b) == pytest.approx(scipy_stats.pearsonr(a, b).statistic)


def test_a_spearman_exactly_at_tradeoff_corr_is_not_a_tradeoff() -> None:
    # Four images, one swap of ranks: rho_s = 1 - 6 * 2 / 60 = 0.8 exactly. Pearson's
    # formula over float ranks gave 0.7999999999999999, "below 0.8": a trade-off (code 1).
    x, y = [0.55, 0.6, 0.65, 0.7], [0.55, 0.6, 0.7, 0.65]
    stats, _ = analyse_pair(columns("IQ-R_TA-C", x, y), RelationSection(tradeoff_corr=0.8))
    assert (stats.correlation, stats.code) == (0.8, -1)
    # Two swaps: 0.6 exactly, whose float (0.59999999999999998) is below the decimal 0.6.
    x, y = [0.55, 0.6, 0.65, 0.7], [0.6, 0.55, 0.7, 0.65]
    stats, _ = analyse_pair(columns("IQ-R_TA-C", x, y), RelationSection(tradeoff_corr=0.6))
    assert (stats.correlation, stats.code) == (0.6, -1)
    # Mirrored: -0.6 is not below -0.6, and just above the threshold is not below it either.
    stats, _ = analyse_pair(columns("IQ-R_TA-C", x, y[::-1]), RelationSection(tradeoff_corr=-0.6))
    assert (stats.correlation, stats.code) == (-0.6, -1)
    section = RelationSection(tradeoff_corr=0.6000000000000001)
    assert analyse_pair(columns("IQ-R_TA-C", x, y), section)[0].code == 1


def test_a_pearson_exactly_at_tradeoff_corr_is_not_a_tradeoff() -> None:
    # The covariance of these scores is 0 exactly: in floating point r came out -3.5e-17,
    # "below 0", a trade-off (code 1).
    x, y = [0.0, 1.0, 1.0, 0.5, 0.75], [0.5, 0.5, 0.25, 0.25, 1.0]
    section = RelationSection(correlation="pearson_corr", tradeoff_corr=0.0)
    stats, _ = analyse_pair(columns("IQ-R_TA-C", x, y), section)
    assert (stats.correlation, stats.code) == (0.0, -1)
    tiny = section.model_copy(update={"tradeoff_corr": 1e-300})
    assert analyse_pair(columns("IQ-R_TA-C", x, y), tiny)[0].code == 1
    # r = 4/5 exactly, computed as 0.7999999999999999: not below 0.8 either.
    x, y = [0.625, 0.8125, 0.6875, 0.75], [0.625, 0.75, 0.6875, 0.8125]
    section = RelationSection(correlation="pearson_corr", tradeoff_corr=0.8)
    assert analyse_pair(columns("IQ-R_TA-C", x, y), section)[0].code == -1
    above = section.model_copy(update={"tradeoff_corr": 0.8000000000000002})
    assert analyse_pair(columns("IQ-R_TA-C", x, y), above)[0].code == 1
    # Mirrored: -0.8 is not below -0.8.
    mirrored = section.model_copy(update={"tradeoff_corr": -0.8})
    assert analyse_pair(columns("IQ-R_TA-C", x, y[::-1]), mirrored)[0].code == -1
    # The live tracker decides as the batch analysis does.
    tracker = RelationTracker(section)
    tracker.extend(judgements_for("IQ-R_TA-C", x, y))
    assert tracker.dtm("m").code("IQ-R", "TA-C") == -1


def test_rank_correlation_compares_irrational_values_exactly() -> None:
    # Ties make the denominator irrational: 3 / sqrt(10) = 0.94868329805051379960...
    exact = rank_correlation(np.array([1.0, 2.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0, 4.0]))
    assert exact is not None and exact.value == 3 / math.sqrt(10)
    assert exact.below(0.9486832980505138) and not exact.below(0.9486832980505137)
    assert not exact.below(-1.0) and exact.below(1.0)
    assert rank_correlation(np.array([1.0, 1.0]), np.array([1.0, 2.0])) is None


def test_a_rank_correlation_of_exactly_zero_is_below_a_positive_threshold_only() -> None:
    # Doubled ranks x: 2, 4, 6, 8; y: 3, 7, 7, 3 (two ties): the covariance is 0 exactly.
    exact = rank_correlation(np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 2.0, 2.0, 1.0]))
    assert exact is not None and (exact.covariance, exact.value) == (0, 0.0)
    assert exact.below(0.6) and exact.below(1e-300)
    assert not exact.below(0.0) and not exact.below(-0.6)


def test_the_order_of_the_judgements_does_not_change_a_correlation() -> None:
    # Six images, rho_s = 1 / 5 exactly: one order gave 0.19999999999999998 (code 1), another
    # 0.20000000000000004 (code -1), so a resumed run's live DTM and the report disagreed.
    perm = (0, 4, 3, 2, 5, 1)
    x = [0.55 + 0.03 * i for i in range(6)]
    y = [0.55 + 0.03 * perm[i] for i in range(6)]
    section = RelationSection(tradeoff_corr=0.2)
    rng = np.random.default_rng(5)
    orders = [list(range(6))] + [rng.permutation(6).tolist() for _ in range(30)]
    seen = {
        analyse_pair(columns("IQ-R_TA-C", [x[i] for i in o], [y[i] for i in o]), section)[0].code
        for o in orders
    }
    assert seen == {-1}
    assert spearman_corr(np.array(x), np.array(y)) == 0.2
    # Pearson over float scores is not exact, but the same points give the same bits.
    a, b = rng.random(500), rng.random(500)
    values = {pearson_corr(a[o], b[o]) for o in (rng.permutation(500) for _ in range(30))}
    assert values == {pearson_corr(a, b)}


def test_pareto_f_by_hand() -> None:
    # (0.4, 0.4) is dominated; the front by X: (0.2, 0.9), (0.5, 0.6), (0.9, 0.2).
    x, y = np.array([0.2, 0.5, 0.9, 0.4]), np.array([0.9, 0.6, 0.2, 0.4])
    area = 0.3 * (0.9 + 0.6) / 2 + 0.4 * (0.6 + 0.2) / 2
    assert pareto_f(x, y) == pytest.approx(area / (0.9 * 0.9))
    # One point dominates the rest: fewer than two front points gives 0.
    assert pareto_f(np.array([0.9, 0.5, 0.9]), np.array([0.9, 0.5, 0.9])) == 0.0


def test_a_point_tied_on_y_with_a_point_of_larger_x_is_off_the_front() -> None:
    # (1, 0.5) dominates (0.5, 0.5): as good on Y, better on X. One front point: 0.
    x, y = np.array([0.5, 1.0]), np.array([0.5, 0.5])
    front_x, front_y = pareto_front(x, y)
    assert (front_x.tolist(), front_y.tolist()) == ([1.0], [0.5])
    assert pareto_f(x, y) == 0.0
    # Tied on Y below a point of larger X, it stays off the front beside others on it.
    x, y = np.array([0.2, 0.5, 0.9]), np.array([0.9, 0.2, 0.2])
    assert pareto_front(x, y)[0].tolist() == [0.2, 0.9]
    assert pareto_f(x, y) == pytest.approx(0.7 * (0.9 + 0.2) / 2 / (0.9 * 0.9))
    # A point given twice is one front point: the front holds distinct points.
    front_x, front_y = pareto_front(np.array([0.2, 0.9, 0.9]), np.array([0.9, 0.2, 0.2]))
    assert (front_x.tolist(), front_y.tolist()) == ([0.2, 0.9], [0.9, 0.2])


def test_fisher_interval_by_hand() -> None:
    z, half = math.atanh(0.5), 1.959963984540054 / math.sqrt(25)
    low, high = fisher_interval("pearson_corr", 0.5, 28)
    assert (low, high) == pytest.approx((math.tanh(z - half), math.tanh(z + half)))
    low_s, high_s = fisher_interval("spearman_corr", 0.5, 28)
    assert low_s < low and high_s > high  # Spearman's interval is wider (1.06 / (n - 3))
    assert all(math.isnan(v) for v in fisher_interval("paretoF", 0.5, 28))
    assert all(math.isnan(v) for v in fisher_interval("spearman_corr", 0.5, 3))


def test_reversed_pair_order_negates_dominance_in_the_dtm() -> None:
    analysis = analyse_judgements(judgements_for("R-T_IQ-A", *ABOVE))[("m", "trigscore")]
    assert analysis.pairs[0].code == -2
    assert analysis.dtm.code("IQ-A", "R-T") == 2  # row < column: from R-T_IQ-A, negated
    assert analysis.dtm.code("R-T", "IQ-A") == -2  # mirror, negated again
    synergy = analyse_judgements(judgements_for("R-T_IQ-A", *SYNERGY))[("m", "trigscore")]
    assert synergy.dtm.code("IQ-A", "R-T") == synergy.dtm.code("R-T", "IQ-A") == 0


def test_pair_in_alphabetical_order_wins_over_its_reverse() -> None:
    records = judgements_for("IQ-A_R-T", *TRADEOFF) + judgements_for("R-T_IQ-A", *ABOVE)
    analysis = analyse_judgements(records)[("m", "trigscore")]
    assert analysis.dtm.code("IQ-A", "R-T") == 1
    assert analysis.dtm.code("R-T", "IQ-A") == 1


def test_missing_pairs_are_minus_one_and_diagonal_is_none() -> None:
    analysis = analyse_judgements(judgements_for("IQ-R_TA-C", *SYNERGY))[("m", "trigscore")]
    dtm = analysis.dtm
    assert dtm.dimensions[0] == "D-A"
    assert dtm.code("IQ-R", "TA-C") == 0
    assert dtm.code("D-A", "D-K") == -1
    assert dtm.code("IQ-R", "IQ-R") is None
    upper = [dtm.codes[i][j] for i in range(10) for j in range(i + 1, 10)]
    assert upper.count(-1) == 44


def test_only_ok_scores_count_and_incomplete_images_are_excluded() -> None:
    records = judgements_for("IQ-R_TA-C", *UNDEFINED)
    records.append(judgement("m", "IQ-R_TA-C_6", "IQ-R_TA-C", "IQ-R", 0.1))  # no TA-C score
    records.append(judgement("m", "IQ-R_TA-C_7", "IQ-R_TA-C", "IQ-R", 0.1))
    records.append(judgement("m", "IQ-R_TA-C_7", "IQ-R_TA-C", "TA-C", None))  # unscorable
    analysis = analyse_judgements(records)[("m", "trigscore")]
    stats = analysis.pairs[0]
    assert (stats.n, stats.excluded, stats.code) == (5, 2, -1)
    # Dimension means take every ok score, excluded images included.
    assert analysis.dimension_means["IQ-R"] == pytest.approx((3.25 + 0.2) / 7)
    assert analysis.dimension_means["TA-C"] == pytest.approx(3.30 / 5)


def test_the_last_judgement_of_a_key_wins() -> None:
    records = judgements_for("IQ-R_TA-C", *SYNERGY)
    # Re-judging four images low turns the synergy into a bottleneck...
    for index in range(4):
        for dim in ("IQ-R", "TA-C"):
            records.append(judgement("m", f"IQ-R_TA-C_{index + 1}", "IQ-R_TA-C", dim, 0.1))
    assert analyse_judgements(records)[("m", "trigscore")].pairs[0].code == 3
    # ...and a final failure removes an image from the pair.
    records.append(judgement("m", "IQ-R_TA-C_1", "IQ-R_TA-C", "IQ-R", None))
    stats = analyse_judgements(records)[("m", "trigscore")].pairs[0]
    assert (stats.n, stats.excluded) == (4, 1)


def test_thresholds_change_the_code() -> None:
    strict = RelationSection(synergy_density=0.7)
    stats, _ = analyse_pair(columns("IQ-R_TA-C", *SYNERGY), strict)
    assert stats.code != 0
    assert negate_dominance(2) == -2 and negate_dominance(1) == 1


def test_tracker_groups_models_and_metrics_separately() -> None:
    tracker = RelationTracker()
    tracker.extend(judgements_for("IQ-R_TA-C", *SYNERGY, model="a"))
    tracker.extend(judgements_for("IQ-R_TA-C", *BOTTLENECK, model="b"))
    assert tracker.groups() == [("a", "trigscore"), ("b", "trigscore")]
    assert tracker.dtm("a").code("IQ-R", "TA-C") == 0
    assert tracker.dtm("b").code("IQ-R", "TA-C") == 3
    with pytest.raises(KeyError):
        tracker.analysis("c")


def test_a_failed_judgement_is_missing_a_score_and_one_never_asked_for_is_not_judged() -> None:
    pair = "IQ-R_TA-C"
    judgements = [
        *judgements_for(pair, [0.5], [0.6]),  # _1: complete
        judgement("m", f"{pair}_2", pair, "IQ-R", 0.5),  # _2: TA-C asked for, failed
        judgement("m", f"{pair}_2", pair, "TA-C", 0.5).model_copy(
            update={"status": "error", "score": None, "error": "timeout"}
        ),
        judgement("m", f"{pair}_3", pair, "IQ-R", 0.5),  # _3: TA-C unscorable
        judgement("m", f"{pair}_3", pair, "TA-C", None),
        judgement("m", f"{pair}_4", pair, "TA-C", 0.5),  # _4: IQ-R never asked for
        judgement("m", f"{pair}_5", pair, "IQ-R", 0.5),  # _5: TA-C never asked for
        judgement("m", f"{pair}_6", pair, "IQ-R", None),  # _6: IQ-R failed, TA-C never asked
    ]
    tracker = RelationTracker()
    tracker.extend(judgements)
    batch = analyse_judgements(judgements)[("m", "trigscore")]
    assert tracker.analysis("m") == batch  # the live path tells them apart alike
    (stats,) = batch.pairs
    assert (stats.n, stats.excluded, stats.not_judged) == (1, 5, 2)
    assert (stats.judged_first, stats.judged_second) == (5, 4)
    assert batch.not_judged == 2


def test_one_image_left_out_is_said_in_the_singular() -> None:
    pair = "IQ-R_TA-C"
    judgements = [
        judgement("m", f"{pair}_1", pair, "IQ-R", 0.5),  # TA-C unscorable
        judgement("m", f"{pair}_1", pair, "TA-C", None),
        judgement("m", f"{pair}_2", pair, "IQ-R", 0.5),  # TA-C never asked for
    ]
    analysis = analyse_judgements(judgements)[("m", "trigscore")]
    assert left_out_text(analysis) == (
        "1 image left out for a missing score, 1 image with one dimension not judged "
        "(a judge that does not measure it, the dataset's dimensions filter, or a run stopped "
        "before it)"
    )


def test_images_a_judge_of_some_dimensions_leaves_half_judged_name_that_cause() -> None:
    # The nsfw metric judge measures R-T alone: the report gave its R-T_IQ-A images "the
    # dataset's dimensions filter, or a run stopped before it" as the only causes.
    pair = "R-T_IQ-A"
    judgements = [
        judgement("m", f"{pair}_{index}", pair, "R-T", 0.9).model_copy(update={"metric": "nsfw"})
        for index in (1, 2)
    ]
    analysis = analyse_judgements(judgements)[("m", "nsfw")]
    assert left_out_text(analysis) == (
        "0 images left out for a missing score, 2 images with one dimension not judged (a "
        "judge that does not measure it, the dataset's dimensions filter, or a run stopped "
        "before it)"
    )
    assert left_out_text(analysis, upstream=True) == (
        "0 images left out for a missing score, 2 images with no cell in the file for one dimension"
    )


def test_no_interval_for_pearsons_conventional_zero_of_a_constant_side() -> None:
    # TRIG's Pearson is 0 when a side is constant: the report showed 0.000 [-0.574, 0.574].
    flat = columns("IQ-R_TA-C", [0.5, 0.6, 0.7, 0.8, 0.9, 0.4, 0.3, 0.2], [0.7] * 8)
    stats, _ = analyse_pair(flat, RelationSection(correlation="pearson_corr"))
    assert stats.correlation == 0.0
    assert math.isnan(stats.ci_low) and math.isnan(stats.ci_high)
    assert pair_row(stats)[3:5] == ["0.000", "–"]  # the report's corr and 95% CI cells
    # With spread on both sides, the interval is there.
    spread = columns("IQ-R_TA-C", [0.5, 0.6, 0.7, 0.8, 0.9, 0.4, 0.3, 0.2], [0.7, 0.1] * 4)
    stats, _ = analyse_pair(spread, RelationSection(correlation="pearson_corr"))
    assert stats.ci_low < stats.correlation < stats.ci_high


def test_a_pair_of_no_complete_image_shows_no_zone_shares() -> None:
    # The report showed "synergy ρs 0.000, bottleneck ρb 0.000" for a pair never measured.
    nan = float("nan")
    stats, _ = analyse_pair(columns("IQ-R_TA-C", [0.5, nan], [nan, 0.7]), RelationSection())
    assert stats.n == 0
    assert pair_row(stats)[5:7] == ["–", "–"]
    measured, _ = analyse_pair(columns("IQ-R_TA-C", [0.9, 0.9], [0.9, 0.9]), RelationSection())
    assert pair_row(measured)[5:7] == ["1.000", "0.000"]


# Six points in the trade-off zone, to which the zone-boundary cases add four.
_SPREAD6 = ([0.6, 0.7, 0.65, 0.75, 0.55, 0.6], [0.7, 0.6, 0.75, 0.65, 0.6, 0.55])


@pytest.mark.parametrize(
    ("edge", "code"),
    [((0.5, 0.4), 2), ((0.4, 0.5), 2), ((0.8, 0.9), -2), ((0.9, 0.8), -2)],
    ids=["x-at-bottleneck", "y-at-bottleneck", "x-at-synergy", "y-at-synergy"],
)
def test_a_score_exactly_at_a_zone_threshold_is_in_the_tradeoff_zone(
    edge: tuple[float, float], code: int
) -> None:
    # The spec's zones are strict: synergy X > 0.8 and Y > 0.8, bottleneck X < 0.5 and
    # Y < 0.5. Four of ten points on a boundary would reach either density threshold (0.4).
    x, y = [edge[0]] * 4 + _SPREAD6[0], [edge[1]] * 4 + _SPREAD6[1]
    stats, _ = analyse_pair(columns("IQ-R_TA-C", x, y), RelationSection())
    assert (stats.synergy_density, stats.bottleneck_density) == (0.0, 0.0)
    assert (stats.tradeoff_points, stats.code) == (10, code)


@pytest.mark.parametrize(("corner", "code"), [(0.9, 0), (0.1, 3)], ids=["synergy", "bottleneck"])
def test_a_zone_density_exactly_at_its_threshold_fires_its_rule(corner: float, code: int) -> None:
    # Rules 1 and 2 fire at rho >= 0.4 (the spec's "≥"): 4 of 10 points is exactly 0.4.
    x, y = [corner] * 4 + _SPREAD6[0], [corner] * 4 + _SPREAD6[1]
    stats, _ = analyse_pair(columns("IQ-R_TA-C", x, y), RelationSection())
    assert max(stats.synergy_density, stats.bottleneck_density) == 0.4
    assert stats.code == code


def test_a_dimension_mean_takes_every_pair_holding_it() -> None:
    records = judgements_for("IQ-R_TA-C", [1.0, 1.0], [0.5, 0.5]) + judgements_for(
        "IQ-R_TA-S", [0.0, 0.0], [0.5, 0.5]
    )
    analysis = analyse_judgements(records)[("m", "trigscore")]
    assert analysis.dimension_means["IQ-R"] == 0.5
    assert analysis.dimension_counts["IQ-R"] == 4


def test_pair_means_take_the_ok_scores_of_excluded_images_too() -> None:
    # _2 has no TA-C score, so it is no point of the pair, but its IQ-R score of 0.0 counts.
    records = [
        *judgements_for("IQ-R_TA-C", [1.0], [0.5]),
        judgement("m", "IQ-R_TA-C_2", "IQ-R_TA-C", "IQ-R", 0.0),
        judgement("m", "IQ-R_TA-C_2", "IQ-R_TA-C", "TA-C", None),
    ]
    stats = analyse_judgements(records)[("m", "trigscore")].pairs[0]
    assert (stats.n, stats.excluded) == (1, 1)
    assert (stats.mean_first, stats.mean_second) == (0.5, 0.5)


def test_a_pair_without_a_complete_image_gives_way_to_its_reverse() -> None:
    # IQ-A_R-T (alphabetical) has an image scored on IQ-A alone: no point, so the DTM and
    # present() take R-T_IQ-A, as the spec's "if present" means.
    records = [judgement("m", "IQ-A_R-T_1", "IQ-A_R-T", "IQ-A", 0.7)]
    records += judgements_for("R-T_IQ-A", *ABOVE)
    analysis = analyse_judgements(records)[("m", "trigscore")]
    assert analysis.pair("IQ-A_R-T") is not None
    assert analysis.dtm.code("IQ-A", "R-T") == 2  # R-T_IQ-A's -2, negated
    present = analysis.present("IQ-A", "R-T")
    assert present is not None and present.pair == "R-T_IQ-A"


def test_a_constant_x_whose_mean_is_not_exact_gives_a_flat_line() -> None:
    # Twelve 0.613s: x - mean(x) is 1e-16, not 0, and a slope from it is noise (-1.0 here),
    # which the scatter plot would draw across the whole X axis. The line is flat at
    # mean(Y) = 0.6167: 8 points above, 4 below, ratio 2 -> -2.
    x = [0.613] * 12
    y = [0.55] * 4 + [0.65] * 8
    line = fitted_line(np.array(x), np.array(y))
    assert line.slope == 0.0
    assert line.at(np.array([0.0, 1.0])).tolist() == [line.mean_y] * 2
    assert line.mean_y == pytest.approx(0.6167, abs=1e-4)
    stats, _ = analyse_pair(columns("IQ-R_TA-C", x, y), RelationSection())
    assert (stats.tradeoff_points, stats.above, stats.below, stats.code) == (12, 8, 4, -2)


def test_a_sample_judged_again_under_an_edited_pair_leaves_its_old_pair_whole() -> None:
    # IQ-A_TA-S_6 failed on both dimensions; its pair was then edited to IQ-A_TA-C and it was
    # judged again (TA-C in the run after the edit, IQ-A with --retry-errors). Its TA-S line,
    # of no dimension of its pair now, stayed in IQ-A_TA-S as a failed image ("1 image left
    # out"); an ok one stayed there as a stale score in the TA-S mean.
    old, new = "IQ-A_TA-S", "IQ-A_TA-C"
    for failed in (True, False):
        score = None if failed else 0.1
        moved = [
            judgement("m", "IQ-A_TA-S_6", old, "IQ-A", score),
            judgement("m", "IQ-A_TA-S_6", old, "TA-S", score),
            judgement("m", "IQ-A_TA-S_6", new, "TA-C", 0.7),
            judgement("m", "IQ-A_TA-S_6", new, "IQ-A", 0.6),
        ]
        analysis = analyse_judgements([*judgements_for(old, *SYNERGY), *moved])[("m", "trigscore")]
        stats = {p.pair: p for p in analysis.pairs}
        assert (stats[old].n, stats[old].excluded, stats[old].code) == (5, 0, 0)
        assert (stats[new].n, stats[new].excluded) == (1, 0)
        assert analysis.dimension_means["TA-S"] == pytest.approx(sum(SYNERGY[1]) / 5)


def test_a_sample_belongs_to_the_pair_of_its_last_line_in_the_journal() -> None:
    # The report reads one entry per key, in the order the keys first appear: the line
    # numbers, not that order, tell which pair a sample was judged under last. Here the
    # pair was edited to IQ-A_TA-C, then back, and the errors were asked again under it.
    old, new = "IQ-A_TA-S", "IQ-A_TA-C"
    lines = [
        judgement("m", "s", old, "IQ-A", None),
        judgement("m", "s", old, "TA-S", None),
        judgement("m", "s", new, "TA-C", 0.7),
        judgement("m", "s", old, "IQ-A", 0.5),
        judgement("m", "s", old, "TA-S", 0.4),
    ]
    latest = {j.key: journal_entry(line, j) for line, j in enumerate(lines)}
    for judgements in (lines, list(latest.values())):
        analysis = analyse_judgements(judgements)[("m", "trigscore")]
        assert [(p.pair, p.n, p.excluded) for p in analysis.pairs] == [(old, 1, 0)]
        assert analysis.dimension_counts == {"IQ-A": 1, "TA-S": 1}
    # An error line of the new pair moves the sample too: it was judged under it.
    failed = judgement("m", "s", new, "TA-C", None).model_copy(
        update={"status": "error", "error": "timeout"}
    )
    analysis = analyse_judgements([*lines, failed])[("m", "trigscore")]
    assert [(p.pair, p.n, p.excluded, p.not_judged) for p in analysis.pairs] == [(new, 0, 1, 0)]
