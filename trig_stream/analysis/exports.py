"""Files in TRIG's own layouts (spec, section 6), and the judgements as parquet.

TRIG-compatible, per model:

* ``evaluation_result.json``: ``{data_id: {dimension: [{metric: score}, ...]}}``, metrics in
  the given order. Only ``ok`` scores are written (upstream's readers take every cell for a
  number): a metric without one is left out of the list, and a dimension without any is left
  out of the image.
* ``formatted.json``: ``{pair: {data_id: [score_A, score_B]}}``, the complete images only.
* ``relationship_codes.csv`` and ``result.json``: see :func:`relationship_codes_csv` and
  :func:`result_document`.

Ours: ``judgements.parquet``, every judgement as one row (``judge`` as a JSON string,
``top_logprobs`` as a list of ``{token, logprob}``), read back by :func:`read_judgements_parquet`;
a report writes the latest judgement of each key (:class:`ParquetRows` builds its rows as the
journal is read).
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Final, Literal, TypeAlias

import polars as pl

from trig_stream.analysis.relations import ModelAnalysis, PairStats, negate_dominance
from trig_stream.analysis.stats import RelationCode
from trig_stream.dimensions import DIMENSION_NAMES, Dimension
from trig_stream.files import write_atomic
from trig_stream.records import JudgeFingerprint, Judgement, ScoredJudgement, exact_number

EvaluationResult: TypeAlias = dict[str, dict[str, list[dict[str, float]]]]
FormattedScores: TypeAlias = dict[str, dict[str, list[float]]]
InsightType: TypeAlias = Literal["synergy", "bottleneck", "dominance", "tradeoff", "undefined"]

INSIGHT_TYPES: Final[dict[RelationCode, InsightType]] = {
    0: "synergy",
    3: "bottleneck",
    2: "dominance",
    -2: "dominance",
    1: "tradeoff",
    -1: "undefined",
}


def evaluation_result(
    judgements: Iterable[ScoredJudgement], metrics: Sequence[str]
) -> EvaluationResult:
    """One model's ok scores in TRIG's evaluation-result layout (last judgement of a key wins).
    A failed judgement is left out, not written as ``null``: upstream's readers take every cell
    for a number.

    Args:
        judgements: the model's judgements, in journal order.
        metrics: the metric names, in config order; other metrics are left out.
    """
    latest: dict[tuple[str, str, str], float | None] = {}
    for judgement in judgements:
        if judgement.metric in metrics:
            key = (judgement.data_id, judgement.dimension, judgement.metric)
            latest[key] = judgement.score if judgement.status == "ok" else None
    order = {metric: index for index, metric in enumerate(metrics)}
    result: dict[str, dict[str, list[tuple[int, str, float]]]] = {}
    for (data_id, dimension, metric), score in latest.items():
        if score is not None:
            cells = result.setdefault(data_id, {}).setdefault(dimension, [])
            cells.append((order[metric], metric, score))
    return {
        data_id: {dim: [{m: s} for _, m, s in sorted(cells)] for dim, cells in dims.items()}
        for data_id, dims in result.items()
    }


def formatted_scores(analysis: ModelAnalysis) -> FormattedScores:
    """The complete images of every pair as ``{pair: {data_id: [score_A, score_B]}}``."""
    out: FormattedScores = {}
    for stats in analysis.pairs:
        points = analysis.points[stats.pair]
        out[stats.pair] = {
            data_id: [float(a), float(b)]
            for data_id, a, b in zip(points.data_ids, points.x, points.y, strict=True)
        }
    return out


def _fmt(value: float) -> str:
    return "NULL" if math.isnan(value) else f"{value:.3f}"


def relationship_codes_csv(analysis: ModelAnalysis) -> str:
    """The DTM in TRIG's ``relationship_codes.csv`` layout.

    Header ``,`` + the dimensions in alphabetical order; one row per dimension. The diagonal
    holds the dimension's mean (``NULL`` without data), the upper triangle the relation code,
    the lower triangle ``[m_row-m_col]``, the two dimensions' means within their pair, or
    ``NULL`` when the pair has no data.
    """
    dims = analysis.dtm.dimensions
    lines = [",".join(["", *dims])]
    for i, row in enumerate(dims):
        cells: list[str] = [row]
        for j, column in enumerate(dims):
            if i == j:
                cells.append(_fmt(analysis.dimension_means.get(row, math.nan)))
            elif i < j:
                cells.append(str(analysis.dtm.codes[i][j]))
            else:
                cells.append(_lower_cell(analysis, row, column))
        lines.append(",".join(cells))
    return "\n".join(lines) + "\n"


def _lower_cell(analysis: ModelAnalysis, row: Dimension, column: Dimension) -> str:
    stats = analysis.present(column, row)
    if stats is None:
        return "NULL"
    mean_of = {stats.first: stats.mean_first, stats.second: stats.mean_second}
    return f"[{_fmt(mean_of[row])}-{_fmt(mean_of[column])}]"


def _json_number(value: float) -> float | None:
    return None if math.isnan(value) else value


def insight(analysis: ModelAnalysis, first: Dimension, second: Dimension) -> dict[str, Any]:
    """One English insight about two dimensions (``first`` < ``second``), from the DTM."""
    code = analysis.dtm.code(first, second)
    assert code is not None, "an insight needs two different dimensions"
    kind = INSIGHT_TYPES[code]
    stats = analysis.present(first, second)
    a, b = DIMENSION_NAMES[first], DIMENSION_NAMES[second]
    t = analysis.thresholds
    if stats is None:
        text = f"No image was scored on both {first} ({a}) and {second} ({b}): nothing to say."
    elif kind == "synergy":
        text = (
            f"{first} ({a}) and {second} ({b}) go together: {stats.synergy_density:.0%} of the "
            f"images score above {exact_number(t.synergy)} on both."
        )
    elif kind == "bottleneck":
        text = (
            f"{first} ({a}) and {second} ({b}) hold each other back: "
            f"{stats.bottleneck_density:.0%} of the images score below "
            f"{exact_number(t.bottleneck)} on both."
        )
    elif kind == "dominance":
        winner = second if code == -2 else first
        # Seen from the pair as written: its Y side wins with the points above the line.
        y_wins = (code == -2) == (stats.first == first)
        if y_wins:
            side = f"{stats.above or 0} of {stats.tradeoff_points} above the fitted line"
        else:
            side = f"{stats.below or 0} of {stats.tradeoff_points} on or below the fitted line"
            if stats.on_line:
                side += f" ({stats.on_line} of them on it, which TRIG counts as below)"
        text = (
            f"In the trade-off zone one side wins: the images favour {winner} "
            f"({DIMENSION_NAMES[winner]}), {side}."
        )
    elif kind == "tradeoff":
        text = (
            f"{first} ({a}) and {second} ({b}) trade off: their {t.correlation} is "
            f"{_apart(stats.correlation, t.tradeoff_corr)}, below "
            f"{exact_number(t.tradeoff_corr)}, over {_images(stats.n)}."
        )
    else:
        text = (
            f"{first} ({a}) and {second} ({b}) show no clear relation over {_images(stats.n)} "
            f"({t.correlation} {_apart(stats.correlation, t.tradeoff_corr)})."
        )
    return {"type": kind, "dimensions": [first, second], "code": code, "description": text}


def _images(count: int) -> str:
    return "1 image" if count == 1 else f"{count} images"


def _apart(value: float, threshold: float) -> str:
    """``value`` to three decimals, or to as many more as show it is not ``threshold``:
    0.5996 under a threshold of 0.6 reads 0.5996, not 0.600 "below 0.6". A NaN (one image,
    a constant side) reads "undefined"."""
    if math.isnan(value):
        return "undefined"
    for digits in range(3, 18):
        text = f"{value:.{digits}f}"
        if float(text) != threshold or float(text) == value:
            return text
    return repr(value)


def result_document(analysis: ModelAnalysis) -> dict[str, Any]:
    """TRIG's ``result.json``: pair names, correlations, codes (both orders) and insights.

    ``relationship_codes`` holds each pair's code under ``A_B`` and, unless ``B_A`` is a pair
    of its own with data, the same code seen from the other side under ``B_A`` (±2 negated,
    as in the DTM). A pair without a complete image counts as absent, as in the DTM (spec,
    section 5): its two keys hold its reverse's codes when that has data, else -1. Undefined
    correlations are written as ``null``.
    """
    pairs = analysis.pairs
    size = len(pairs)
    matrix: list[list[float | None]] = [[0.0] * size for _ in range(size)]
    for index, stats in enumerate(pairs):
        matrix[index][index] = _json_number(stats.correlation)
    # A pair of no complete image has code -1: seeded first, it said -1 where the DTM (and
    # relationship_codes.csv) took its reverse's code.
    present = [stats for stats in pairs if stats.n > 0]
    codes: dict[str, int] = {stats.pair: stats.code for stats in present}
    for stats in present:
        codes.setdefault(f"{stats.second}_{stats.first}", negate_dominance(stats.code))
    for stats in pairs:
        codes.setdefault(stats.pair, -1)
        codes.setdefault(f"{stats.second}_{stats.first}", -1)
    dims = analysis.dtm.dimensions
    return {
        "metrics": [stats.pair for stats in pairs],
        "correlation_matrix": matrix,
        "quadrant_analysis": {},
        "relationship_codes": codes,
        "insights": [
            insight(analysis, dims[i], dims[j])
            for i in range(len(dims))
            for j in range(i + 1, len(dims))
        ],
    }


def json_bytes(document: object) -> bytes:
    """A JSON document as a file holds it (UTF-8, indented, strict: NaN is refused)."""
    return (json.dumps(document, indent=2, allow_nan=False) + "\n").encode("utf-8")


def write_json(path: Path, document: object) -> None:
    """Write a JSON document (see :func:`json_bytes`) whole or not at all (a full disk
    leaves the file that was there)."""
    write_atomic(path, json_bytes(document))


PARQUET_SCHEMA: Final[dict[str, pl.DataType]] = {
    "schema_version": pl.Int64(),
    "model": pl.String(),
    "data_id": pl.String(),
    "task": pl.String(),
    "pair": pl.String(),
    "dimension": pl.String(),
    "metric": pl.String(),
    "judge": pl.String(),
    "status": pl.String(),
    "sample_digest": pl.String(),
    "score": pl.Float64(),
    "top_logprobs": pl.List(pl.Struct({"token": pl.String(), "logprob": pl.Float64()})),
    "image": pl.String(),
    "seed": pl.Int64(),
    "latency_s": pl.Float64(),
    "attempts": pl.Int64(),
    "error": pl.String(),
    "error_stage": pl.String(),
    "prompt_rewrite": pl.Struct(
        {"status": pl.String(), "relation": pl.Int64(), "prompt": pl.String(), "error": pl.String()}
    ),
    "created_at": pl.Float64(),
}
"""Every field of :class:`Judgement` (a test holds them equal)."""


def _row(judgement: Judgement) -> dict[str, Any]:
    row = judgement.model_dump(mode="json")
    row["judge"] = judgement.judge.model_dump_json()
    if judgement.top_logprobs is not None:
        row["top_logprobs"] = [{"token": t, "logprob": lp} for t, lp in judgement.top_logprobs]
    return row


PARQUET_CHUNK_ROWS: Final = 10_000
"""Rows :class:`ParquetRows` holds as dicts before turning them into a frame: a row's dict,
its ``top_logprobs`` included, is some kilobytes, its frame's columns a fraction of that."""

_LINE = "_line"
"""The column :class:`ParquetRows` numbers its rows in (not written)."""


class ParquetRows:
    """The rows of ``judgements.parquet``, built into polars columns a chunk at a time as the
    judgements are read, so that no list of a whole journal's judgements is ever held.

    Example:
        >>> rows = ParquetRows()  # doctest: +SKIP
        >>> for line, judgement in read_journal_lines(path):  # doctest: +SKIP
        ...     rows.add(judgement, line)
        >>> frame = rows.frame(keep={latest_line, ...})  # doctest: +SKIP
    """

    def __init__(self) -> None:
        self._rows: list[dict[str, Any]] = []
        self._lines: list[int] = []
        self._chunks: list[pl.DataFrame] = []

    def add(self, judgement: Judgement, line: int = 0) -> None:
        """Add the row of ``judgement``, read from line ``line`` (see :meth:`frame`)."""
        self._rows.append(_row(judgement))
        self._lines.append(line)
        if len(self._rows) >= PARQUET_CHUNK_ROWS:
            self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        chunk = pl.DataFrame(self._rows, schema=PARQUET_SCHEMA, orient="row")
        self._chunks.append(chunk.with_columns(pl.Series(_LINE, self._lines, pl.Int64())))
        self._rows, self._lines = [], []

    def frame(self, keep: Iterable[int] | None = None) -> pl.DataFrame:
        """The rows added, in order, in :data:`PARQUET_SCHEMA`; only those of the lines in
        ``keep`` when given."""
        self._flush()
        chunks, self._chunks = self._chunks, []
        if keep is not None:
            kept = pl.Series(_LINE, list(keep), pl.Int64())
            for index, chunk in enumerate(chunks):  # one at a time: never two copies of all
                chunks[index] = chunk.filter(pl.col(_LINE).is_in(kept.implode()))
        if not chunks:
            return pl.DataFrame(schema=PARQUET_SCHEMA)
        return pl.concat(chunks, rechunk=True).drop(_LINE)


def judgements_frame(judgements: Iterable[Judgement]) -> pl.DataFrame:
    """Judgements as ``judgements.parquet``'s rows, one each."""
    rows = ParquetRows()
    for judgement in judgements:
        rows.add(judgement)
    return rows.frame()


def parquet_bytes(frame: pl.DataFrame) -> bytes:
    """A frame (:func:`judgements_frame`, :meth:`ParquetRows.frame`) as a parquet file's
    content."""
    # Encoded here and written by Python, so that a write that fails is an OSError (polars
    # reports its own as a ComputeError).
    buffer = io.BytesIO()
    frame.write_parquet(buffer)
    return buffer.getvalue()


def judgements_parquet(judgements: Iterable[Judgement]) -> bytes:
    """Judgements as a parquet file's content, one row each."""
    return parquet_bytes(judgements_frame(judgements))


def write_judgements_parquet(judgements: Iterable[Judgement], path: Path) -> int:
    """Write judgements as parquet, one row each, whole or not at all; return how many
    were written."""
    rows = list(judgements)
    write_atomic(path, judgements_parquet(rows))
    return len(rows)


def read_judgements_parquet(path: Path) -> list[Judgement]:
    """Read back what :func:`write_judgements_parquet` wrote."""
    out = []
    for row in pl.read_parquet(path, glob=False).iter_rows(named=True):
        row["judge"] = JudgeFingerprint.model_validate_json(row["judge"])
        if row["top_logprobs"] is not None:
            row["top_logprobs"] = [(c["token"], c["logprob"]) for c in row["top_logprobs"]]
        out.append(Judgement.model_validate(row))
    return out


def pair_row(stats: PairStats) -> list[str]:
    """A pair's statistics as table cells (used by the markdown report and the console)."""
    ci = "–" if math.isnan(stats.ci_low) else f"[{stats.ci_low:.3f}, {stats.ci_high:.3f}]"
    corr = "NaN" if math.isnan(stats.correlation) else f"{stats.correlation:.3f}"
    # Of no complete image, no share is in either zone: nothing was measured.
    densities = (
        [f"{stats.synergy_density:.3f}", f"{stats.bottleneck_density:.3f}"]
        if stats.n
        else ["–", "–"]
    )
    return [stats.pair, str(stats.n), str(stats.excluded), corr, ci, *densities, str(stats.code)]
