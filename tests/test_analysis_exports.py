"""TRIG-compatible exports, the parquet round trip, the markdown report and the comparison."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import polars as pl
import pytest

from tests.test_analysis_relations import (
    ABOVE,
    BELOW,
    TRADEOFF,
    UNDEFINED,
    judgement,
    judgements_for,
)
from trig_stream.analysis import analyse_judgements
from trig_stream.analysis.compare import compare, comparison_markdown
from trig_stream.analysis.exports import (
    PARQUET_SCHEMA,
    evaluation_result,
    formatted_scores,
    insight,
    read_judgements_parquet,
    relationship_codes_csv,
    result_document,
    write_judgements_parquet,
)
from trig_stream.analysis.inputs import read_upstream
from trig_stream.analysis.report import markdown_report
from trig_stream.config import RelationSection
from trig_stream.dimensions import Dimension
from trig_stream.records import JudgeFingerprint, Judgement, PromptRewrite, exact_number

DATA = Path(__file__).parent / "data" / "analysis"
FORMATTED = DATA / "formatted_small.json"
EXPECTED_CSV = DATA / "relationship_codes_small.csv"


def small() -> list[Judgement]:
    return read_upstream(FORMATTED, model="m").judgements


def test_relationship_codes_csv_matches_the_hand_computed_file() -> None:
    analysis = analyse_judgements(small())[("m", "trigscore")]
    assert relationship_codes_csv(analysis) == EXPECTED_CSV.read_text()


def test_result_json_layout() -> None:
    analysis = analyse_judgements(small())[("m", "trigscore")]
    document = result_document(analysis)
    assert document["metrics"] == ["IQ-R_TA-C", "R-T_IQ-A"]
    matrix = document["correlation_matrix"]
    assert matrix[0][1] == matrix[1][0] == 0.0
    assert matrix[0][0] == pytest.approx(analysis.pairs[0].correlation)
    assert document["quadrant_analysis"] == {}
    assert document["relationship_codes"] == {
        "IQ-R_TA-C": 0,
        "TA-C_IQ-R": 0,
        "R-T_IQ-A": -2,
        "IQ-A_R-T": 2,
    }
    insights = document["insights"]
    assert len(insights) == 45
    assert insights[0]["dimensions"] == ["D-A", "D-K"]
    by_dims = {tuple(i["dimensions"]): i for i in insights}
    assert by_dims[("IQ-R", "TA-C")]["type"] == "synergy"
    assert "60%" in by_dims[("IQ-R", "TA-C")]["description"]
    assert by_dims[("IQ-A", "R-T")]["type"] == "dominance"
    assert "IQ-A" in by_dims[("IQ-A", "R-T")]["description"]
    assert by_dims[("D-A", "D-K")]["type"] == "undefined"
    json.dumps(document, allow_nan=False)


def test_result_json_codes_of_a_pair_without_a_complete_image_are_its_reverses() -> None:
    # IQ-R_TA-C's every TA-C judgement failed: its code -1 was written under "IQ-R_TA-C"
    # while the DTM, relationship_codes.csv and the insight took TA-C_IQ-R's.
    sides: list[tuple[Dimension, float | None]] = [("IQ-R", 0.5), ("TA-C", None)]
    failed = [
        judgement("m", f"IQ-R_TA-C_{index}", "IQ-R_TA-C", dimension, score)
        for index in range(1, 4)
        for dimension, score in sides
    ]
    analysis = analyse_judgements([*failed, *judgements_for("TA-C_IQ-R", *ABOVE)])[
        ("m", "trigscore")
    ]
    assert [(p.pair, p.n, p.code) for p in analysis.pairs] == [
        ("IQ-R_TA-C", 0, -1),
        ("TA-C_IQ-R", 10, -2),
    ]
    assert analysis.dtm.code("IQ-R", "TA-C") == 2
    document = result_document(analysis)
    assert document["relationship_codes"] == {"IQ-R_TA-C": 2, "TA-C_IQ-R": -2}
    # Without data either way, both orders are undefined.
    alone = analyse_judgements(failed)[("m", "trigscore")]
    assert result_document(alone)["relationship_codes"] == {"IQ-R_TA-C": -1, "TA-C_IQ-R": -1}


def test_formatted_and_evaluation_layouts_round_trip() -> None:
    judgements = small()
    analysis = analyse_judgements(judgements)[("m", "trigscore")]
    formatted = formatted_scores(analysis)
    assert formatted == json.loads(FORMATTED.read_text())
    evaluation = evaluation_result(judgements, ["trigscore"])
    assert evaluation["R-T_IQ-A_10"] == {
        "R-T": [{"trigscore": 0.75}],
        "IQ-A": [{"trigscore": 0.52}],
    }


def test_evaluation_result_keeps_metric_order_and_only_ok_scores() -> None:
    # No null for a failed judgement: upstream's readers take every cell for a number.
    judge = JudgeFingerprint(backend="fake", model="j")
    common = {"model": "m", "data_id": "IQ-R_TA-C_1", "task": "t2i", "pair": "IQ-R_TA-C"}
    records = [
        Judgement(**common, dimension="IQ-R", metric="b", judge=judge, status="ok", score=0.2),
        Judgement(**common, dimension="IQ-R", metric="a", judge=judge, status="ok", score=0.4),
        Judgement(**common, dimension="TA-C", metric="a", judge=judge, status="error", error="x"),
        Judgement(**common, dimension="TA-C", metric="b", judge=judge, status="ok", score=0.9),
        Judgement(**common, dimension="TA-C", metric="b", judge=judge, status="unscorable"),
    ]
    result = evaluation_result(records, ["a", "b"])
    assert result == {"IQ-R_TA-C_1": {"IQ-R": [{"a": 0.4}, {"b": 0.2}]}}


def test_parquet_round_trip_equals_the_records(tmp_path: Path) -> None:
    judge = JudgeFingerprint(backend="openai", model="v", params={"temperature": 1.0, "n": [1]})
    records = [
        *small(),
        Judgement(
            model="m",
            data_id="IQ-R_TA-C_9",
            task="t2i",
            pair="IQ-R_TA-C",
            dimension="IQ-R",
            metric="trigscore",
            judge=judge,
            status="ok",
            score=0.75,
            top_logprobs=[("good", -0.1), ("Excellent", -2.5)],
            image="images/x.png",
            seed=3,
            latency_s=0.5,
            attempts=2,
            sample_digest="abc123",
            prompt_rewrite=PromptRewrite(status="rewritten", relation=-2, prompt="a new prompt"),
        ),
        Judgement(
            model="m",
            data_id="IQ-R_TA-C_9",
            task="t2i",
            pair="IQ-R_TA-C",
            dimension="TA-C",
            metric="trigscore",
            judge=judge,
            status="error",
            error="timeout",
            error_stage="judge",
            prompt_rewrite=PromptRewrite(
                status="fallback", relation=1, prompt="the prompt", error="LLM down"
            ),
        ),
    ]
    # Every field has its column: polars drops a key its schema lacks, silently.
    assert set(PARQUET_SCHEMA) == set(Judgement.model_fields)
    path = tmp_path / "judgements.parquet"
    assert write_judgements_parquet(records, path) == len(records)
    frame = pl.read_parquet(path)
    assert frame.height == len(records)
    assert frame.schema["score"] == pl.Float64
    assert frame.filter(pl.col("status") == "error")["error"].to_list() == ["timeout"]
    assert read_judgements_parquet(path) == records


def test_markdown_report_and_comparison(tmp_path: Path) -> None:
    analysis = analyse_judgements(small())[("m", "trigscore")]
    text = markdown_report(analysis)
    assert "| IQ-R_TA-C | 5 | 0 |" in text
    assert "| R-T_IQ-A | 10 | 0 |" in text
    assert "| IQ-R | Realism | 0.690 | 5 |" in text
    other = analyse_judgements(read_upstream(FORMATTED, model="n").judgements)
    flipped = {**json.loads(FORMATTED.read_text())}
    flipped["IQ-R_TA-C"] = {k: [0.1, 0.2] for k in flipped["IQ-R_TA-C"]}
    del flipped["R-T_IQ-A"]
    (tmp_path / "low.json").write_text(json.dumps(flipped))
    low = analyse_judgements(read_upstream(tmp_path / "low.json", model="low").judgements)
    comparison = compare(
        {"m": analysis, "n": other[("n", "trigscore")], "low": low[("low", "trigscore")]}
    )
    cells = {(d.row, d.column): d.codes for d in comparison.differences}
    assert cells == {
        ("IQ-A", "R-T"): {"m": 2, "n": 2, "low": -1},
        ("IQ-R", "TA-C"): {"m": 0, "n": 0, "low": 3},
    }
    assert comparison.dimension_means["IQ-R"]["low"] == pytest.approx(0.1)
    assert "| IQ-R | TA-C | 0 | 0 | 3 |" in comparison_markdown(comparison)


def test_a_formatted_file_whose_first_pair_is_empty_is_read(tmp_path: Path) -> None:
    # What the report writes when every image of the first pair lacks a score: it was
    # refused as "neither" layout.
    document = {"IQ-O_TA-S": {}, **json.loads(FORMATTED.read_text())}
    path = tmp_path / "formatted.json"
    path.write_text(json.dumps(document))
    data = read_upstream(path, model="m")
    assert data.layout == "formatted"
    assert [(j.data_id, j.dimension, j.score) for j in data.judgements] == [
        (j.data_id, j.dimension, j.score) for j in small()
    ]


def test_an_evaluation_result_keeps_the_metrics_in_config_order(tmp_path: Path) -> None:
    # The first image's first metric failed: its cells hold only the second one, which then
    # passed for the first, and `analyze` without --metric analysed another metric.
    document = {
        "IQ-R_TA-C_1": {"IQ-R": [{"second": 0.2}], "TA-C": [{"second": 0.3}]},
        "IQ-R_TA-C_2": {"IQ-R": [{"trigscore": 0.9}, {"second": 0.2}], "TA-C": [{"third": 0.1}]},
    }
    path = tmp_path / "evaluation_result.json"
    path.write_text(json.dumps(document))
    assert read_upstream(path, model="m").metrics == ["trigscore", "second", "third"]


def test_the_dtm_plot_shows_below_the_diagonal_the_pair_its_code_is_from(
    tmp_path: Path,
) -> None:
    pytest.importorskip("matplotlib")
    from trig_stream.analysis.plots import _mean_cell

    both = {
        "IQ-A_IQ-O": {f"IQ-A_IQ-O_{i}": [0.6, 0.3] for i in range(3)},
        "IQ-O_IQ-A": {f"IQ-O_IQ-A_{i}": [0.2, 0.25] for i in range(3)},
    }
    path = tmp_path / "formatted.json"
    path.write_text(json.dumps(both))
    analysis = analyse_judgements(read_upstream(path, model="m").judgements)[("m", "trigscore")]
    # Row IQ-O, column IQ-A: the CSV and the code above use pair IQ-A_IQ-O.
    assert "[0.300-0.600]" in relationship_codes_csv(analysis)
    assert _mean_cell(analysis, "IQ-O", "IQ-A")[1] == "0.30\n0.60"


@pytest.mark.parametrize(
    ("pair", "scores", "insight"),
    [
        # Every point on the line: +2 by TRIG's rule (below = Y <= fitted), which the text
        # called "12 of 12 falling on its side of the fitted line".
        (
            "IQ-R_TA-C",
            ([0.75] * 12, [0.75] * 12),
            "the images favour IQ-R (Realism), 12 of 12 on or below the fitted line (12 of "
            "them on it, which TRIG counts as below).",
        ),
        (
            "TA-C_IQ-R",
            ([0.75] * 12, [0.75] * 12),
            "the images favour TA-C (Content alignment), 12 of 12 on or below the fitted line "
            "(12 of them on it, which TRIG counts as below).",
        ),
        ("IQ-R_TA-C", ABOVE, "the images favour TA-C (Content alignment), 8 of 10 above the"),
        ("TA-C_IQ-R", ABOVE, "the images favour IQ-R (Realism), 8 of 10 above the fitted line."),
        ("IQ-R_TA-C", BELOW, "favour IQ-R (Realism), 8 of 10 on or below the fitted line."),
    ],
)
def test_a_dominance_insight_says_where_the_points_lie(
    pair: str, scores: tuple[list[float], list[float]], insight: str
) -> None:
    analysis = analyse_judgements(judgements_for(pair, *scores))[("m", "trigscore")]
    texts = {tuple(i["dimensions"]): i for i in result_document(analysis)["insights"]}
    found = texts[("IQ-R", "TA-C")]
    assert found["type"] == "dominance"
    assert insight in found["description"]


@pytest.mark.parametrize(
    ("scores", "correlation", "shown"),
    [
        (TRADEOFF, 0.5996, "their spearman_corr is 0.5996, below 0.6, over 5 images."),
        (TRADEOFF, 0.5999999999999999, "is 0.5999999999999999, below 0.6,"),
        (TRADEOFF, 0.2, "their spearman_corr is 0.200, below 0.6, over 5 images."),
        (UNDEFINED, 0.6, "no clear relation over 5 images (spearman_corr 0.600)."),
        (UNDEFINED, 0.60004, "no clear relation over 5 images (spearman_corr 0.60004)."),
    ],
)
def test_an_insight_shows_the_digits_that_set_a_correlation_apart_from_the_threshold(
    scores: tuple[list[float], list[float]], correlation: float, shown: str
) -> None:
    # 0.5996 was written "0.600, below 0.6".
    analysis = analyse_judgements(judgements_for("IQ-R_TA-C", *scores))[("m", "trigscore")]
    pair = dataclasses.replace(analysis.pairs[0], correlation=correlation)
    analysis = dataclasses.replace(analysis, pairs=(pair,))
    assert shown in insight(analysis, "IQ-R", "TA-C")["description"]


def test_thresholds_are_shown_and_compared_with_every_digit() -> None:
    # Printed and compared with ":g" (six digits): a Spearman of exactly 0.8 read "0.800,
    # below 0.8" under a threshold of 0.8000001, and two runs of 0.8 and 0.8000001 differed
    # in DTM cells without the comparison's "different thresholds" warning.
    assert (exact_number(0.8), exact_number(1.0), exact_number(0.8000001)) == (
        "0.8",
        "1",
        "0.8000001",
    )
    judgements = judgements_for("IQ-R_TA-C", *TRADEOFF)
    near = RelationSection(tradeoff_corr=0.8000001)
    analysis = analyse_judgements(judgements, near)[("m", "trigscore")]
    pair = dataclasses.replace(analysis.pairs[0], correlation=0.8)
    analysis = dataclasses.replace(analysis, pairs=(pair,))
    text = insight(analysis, "IQ-R", "TA-C")["description"]
    assert "their spearman_corr is 0.800, below 0.8000001, over 5 images." in text
    assert "trade-off corr < 0.8000001." in markdown_report(analysis)
    plain = analyse_judgements(judgements, RelationSection(tradeoff_corr=0.8))[("m", "trigscore")]
    assert "trade-off corr < 0.8." in markdown_report(plain)
    fingerprints = {"a": {"params": {"t": 0.5}}, "b": {"params": {"t": 0.5000001}}}
    comparison = compare({"a": plain, "b": analysis}, judges=fingerprints)
    assert comparison.thresholds == {"a": "tradeoff_corr 0.8", "b": "tradeoff_corr 0.8000001"}
    assert comparison.judges == {"a": "params.t 0.5", "b": "params.t 0.5000001"}
    # The check of the config says which of two close thresholds is above the other.
    with pytest.raises(ValueError, match=r"bottleneck \(0\.5000001\) is above synergy \(0\.5\)"):
        RelationSection(synergy=0.5, bottleneck=0.5000001)


def test_an_insight_calls_a_nan_correlation_undefined() -> None:
    # "show no clear relation over 1 images (spearman_corr nan)".
    analysis = analyse_judgements(judgements_for("IQ-R_TA-C", [0.6], [0.7]))[("m", "trigscore")]
    assert analysis.pairs[0].n == 1
    text = insight(analysis, "IQ-R", "TA-C")["description"]
    assert text.endswith("show no clear relation over 1 image (spearman_corr undefined).")
