"""The read-only commands (``status``, ``report``, ``compare``) on a journal with lines
replaced by later ones of their key: what they count and write, and that they keep only the
latest line of each key, compactly (a million judgements once took gigabytes)."""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pytest

from tests.test_analysis_commands import run_command
from trig_stream.analysis import exports
from trig_stream.analysis.exports import PARQUET_SCHEMA, read_judgements_parquet
from trig_stream.analysis.run_comparison import compare_runs
from trig_stream.cli import main
from trig_stream.dimensions import split_pair
from trig_stream.exit_codes import EXIT_OK
from trig_stream.files import write_atomic
from trig_stream.journal import JOURNAL, Journal
from trig_stream.manifest import MANIFEST, Manifest
from trig_stream.records import JudgeFingerprint, Judgement

JUDGE = JudgeFingerprint(backend="fake", model="j")
PAIRS = ("IQ-R_TA-C", "IQ-O_D-K", "R-T_TA-S")
LOGPROBS = [(f"token{rank}", -0.1 * rank) for rank in range(20)]
"""A judge's top_logprobs, as an OpenAI judge keeps them: most of a judgement's size."""


def _judgement(model: str, index: int, dimension: str, *, error: bool = False) -> Judgement:
    pair = PAIRS[index % len(PAIRS)]
    return Judgement.model_validate(
        {
            "model": model,
            "data_id": f"{pair}_{index:05d}",
            "task": "t2i",
            "pair": pair,
            "dimension": dimension,
            "metric": "trigscore",
            "judge": JUDGE,
            "status": "error" if error else "ok",
            "score": None if error else round((index * 37 % 100) / 100, 2),
            "error": "judge timed out" if error else None,
            "top_logprobs": None if error else LOGPROBS,
        }
    )


def write_run(path: Path, images: int, models: tuple[str, ...] = ("m1", "m2")) -> Path:
    """A run directory of ``images`` images per model, two dimensions each; every tenth
    image's first dimension an error, then (as ``--retry-errors`` asks it again) judged."""
    manifest = Manifest(
        run_name=path.name,
        task="t2i",
        judges={"trigscore": JUDGE.model_dump()},
        config={
            "judges": [{"name": "trigscore"}],
            "generators": [{"name": model} for model in models],
        },
    )
    write_atomic(path / MANIFEST, manifest.model_dump_json().encode())
    first: list[Judgement] = []
    retried: list[Judgement] = []
    for model in models:
        for index in range(images):
            a, b = split_pair(PAIRS[index % len(PAIRS)])
            failed = index % 10 == 0
            first.append(_judgement(model, index, a, error=failed))
            first.append(_judgement(model, index, b))
            if failed:
                retried.append(_judgement(model, index, a))
    journal = Journal(path / JOURNAL)
    journal.open()
    journal.append(first)
    journal.append(retried)
    journal.close()
    return path


def peak_bytes(work: Callable[[], object]) -> int:
    """The most memory ``work`` held at once (Python's allocations), its second call: the
    first imports what it needs."""
    work()
    gc.collect()
    tracemalloc.start()
    try:
        work()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A run directory and one nine times larger."""
    folder = tmp_path_factory.mktemp("runs")
    return write_run(folder / "small", 100), write_run(folder / "large", 1000)


def growth(runs: tuple[Path, Path], work: Callable[[Path], object]) -> float:
    """How much more memory ``work`` holds for the larger run than for the smaller, per byte
    its journal is larger."""
    small, large = runs
    more = peak_bytes(lambda: work(large)) - peak_bytes(lambda: work(small))
    return more / ((large / JOURNAL).stat().st_size - (small / JOURNAL).stat().st_size)


def test_status_counts_the_latest_line_of_each_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = write_run(tmp_path / "run", 30)
    assert main(["status", str(run)]) == EXIT_OK
    rows = [line.split("│")[1:-1] for line in capsys.readouterr().out.splitlines()]
    counts = [[cell.strip() for cell in row] for row in rows if len(row) == 6]
    # The 3 errors of each model were asked again: 60 keys, each ok, no error left.
    assert counts == [
        ["m1", "trigscore", "60", "0", "0", "60"],
        ["m2", "trigscore", "60", "0", "0", "60"],
    ]


def test_status_holds_a_fraction_of_the_journal(
    runs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # Each key's whole judgement, kept until the counting, held five times the journal's
    # size (4.8 GB for a million judgements).
    assert growth(runs, lambda run: main(["status", str(run)])) < 0.5
    capsys.readouterr()


def test_compare_holds_a_fraction_of_the_journals(tmp_path: Path, runs: tuple[Path, Path]) -> None:
    # Every run's judgements, each line parsed, were kept until the comparison was written.
    other = write_run(tmp_path / "other", 10)
    assert growth(runs, lambda run: compare_runs([run, other])) < 0.5


def test_report_holds_less_than_the_journal(
    tmp_path: Path, runs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every line as a parsed judgement, then every row as a dict, held ten times its size.
    monkeypatch.setattr(exports, "PARQUET_CHUNK_ROWS", 500, raising=False)  # these runs are small
    out = tmp_path / "report"
    assert (
        growth(runs, lambda run: run_command("report", str(run), "--out", str(out), "--no-plots"))
        < 1
    )


def test_report_parquet_holds_the_latest_judgement_of_each_key(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", 30)
    assert run_command("report", str(run), "--no-plots")[0] == 0
    for model in ("m1", "m2"):
        path = run / "report" / model / "judgements.parquet"
        rows = read_judgements_parquet(path)
        # Each key once, an error asked again left out for the judgement that replaced it.
        assert len(rows) == len({row.key for row in rows}) == 60
        assert {row.status for row in rows} == {"ok"}
        assert [row.data_id for row in rows[-3:]] == [
            f"{PAIRS[index % 3]}_{index:05d}" for index in (0, 10, 20)
        ]  # in journal order: the retried ones last
        assert pl.read_parquet(path).schema == PARQUET_SCHEMA  # the columns as before
