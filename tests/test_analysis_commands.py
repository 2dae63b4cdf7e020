"""The ``report``, ``analyze`` and ``compare`` subcommands, end to end on files and run dirs."""

from __future__ import annotations

import argparse
import errno
import fcntl
import io
import json
import math
import os
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import IO, Any

import anyio
import numpy as np
import polars as pl
import pytest
from rich.console import Console

from tests.conftest import ConfigFactory, write_prompts
from tests.test_engine import run_to_end
from trig_stream.analysis import AnalysisError, analyse_judgements
from trig_stream.analysis import commands as commands_module
from trig_stream.analysis import plots as plots_module
from trig_stream.analysis import report as report_module
from trig_stream.analysis.commands import add_commands
from trig_stream.analysis.exports import read_judgements_parquet
from trig_stream.analysis.inputs import load_run, read_prompt_pairs
from trig_stream.analysis.relations import ModelAnalysis, default_metric
from trig_stream.analysis.report import MODEL_FILES
from trig_stream.analysis.run_analysis import analyse_run
from trig_stream.analysis.run_comparison import compare_runs
from trig_stream.cli import main
from trig_stream.config import RelationSection
from trig_stream.dataset import DatasetSource
from trig_stream.dataset_formats import JUDGEMENTS_FILE
from trig_stream.dimensions import Dimension, Task
from trig_stream.errors import MissingExtraError, RunDirError
from trig_stream.exit_codes import EXIT_RUN_DIR
from trig_stream.files import write_atomic
from trig_stream.journal import JOURNAL, Journal
from trig_stream.locks import LOCK
from trig_stream.manifest import MANIFEST, Manifest
from trig_stream.records import COMPARISON_FILE, JudgeFingerprint, Judgement
from trig_stream.scoring import SCORING_RULES
from trig_stream.testing import FakeJudge

DATA = Path(__file__).parent / "data" / "analysis"
FORMATTED = DATA / "formatted_small.json"
EXPECTED_CSV = DATA / "relationship_codes_small.csv"
PNGS = {"dtm.png", "scatter.png", "dimension_map.png", "tradeoff_graph.png"}


def run_command(*argv: str) -> tuple[int, str]:
    parser = argparse.ArgumentParser(prog="trig-stream")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    buffer = io.StringIO()
    code: int = args.handler(args, Console(file=buffer, width=200))
    return code, buffer.getvalue()


def formatted_as_evaluation(metric: str = "trigscore") -> tuple[dict[str, object], list[object]]:
    """The hand-made formatted file as an evaluation result plus a legacy prompt file."""
    evaluation: dict[str, object] = {}
    prompts: list[object] = []
    for pair, images in json.loads(FORMATTED.read_text()).items():
        first, second = pair.split("_")
        for data_id, (a, b) in images.items():
            evaluation[data_id] = {first: [{metric: a}], second: [{metric: b}]}
            prompts.append({"data_id": data_id, "prompt": "p", "dimension": [first, second]})
    return evaluation, prompts


def test_analyze_formatted_file_reproduces_hand_computed_codes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, text = run_command("analyze", str(FORMATTED), "--out", str(out))
    assert code == 0
    assert (out / "relationship_codes.csv").read_text() == EXPECTED_CSV.read_text()
    result = json.loads((out / "result.json").read_text())
    assert result["relationship_codes"]["R-T_IQ-A"] == -2
    assert {p.name for p in (out / "plots").iterdir()} == PNGS
    assert all((out / "plots" / name).stat().st_size > 10_000 for name in PNGS)
    assert len(read_judgements_parquet(out / "judgements.parquet")) == 30
    assert "formatted" in text and "formatted_small" in text
    assert "--prompts" not in text
    prompts = tmp_path / "prompts.json"
    prompts.write_text("[]")
    _, text = run_command(
        "analyze", str(FORMATTED), "--out", str(out), "--prompts", str(prompts), "--no-plots"
    )
    assert f"note: --prompts {prompts} was not read: a formatted file's pairs are its keys" in text


def test_analyze_shows_the_control_characters_of_its_names_never_sends_them(
    tmp_path: Path,
) -> None:
    # The file's path and the model named after it reached the terminal raw: an ESC sequence
    # coloured what followed, and a newline started a line that read as the program's.
    odd = tmp_path / "odd\x1b[31mRED\nfile.json"
    shutil.copy(FORMATTED, odd)
    prompts = tmp_path / "p\x1b[0m.json"
    prompts.write_text("[]")
    out = tmp_path / "out\x07"
    code, text = run_command(
        "analyze", str(odd), "--out", str(out), "--prompts", str(prompts), "--no-plots"
    )
    assert code == 0
    assert "\x1b" not in text and "\x07" not in text
    lines = text.splitlines()
    shown = str(tmp_path / "odd\\x1b[31mRED\\nfile.json")
    assert f"read {shown} as a TRIG formatted file" in lines
    assert f"note: --prompts {tmp_path / 'p'}\\x1b[0m.json was not read" in text
    assert any(
        line.startswith("odd\\x1b[31mRED\\nfile: 2 pairs") and line.endswith("out\\x07")
        for line in lines
    )
    heading = (out / "report.md").read_text().splitlines()[0]
    assert heading == "# TRIG relation analysis: odd\\x1b[31mRED\\nfile"


@pytest.mark.parametrize(
    ("metric", "shown"),
    [
        ("clip\n# Injected", "Metric `clip\\n# Injected`;"),
        ("a`b", "Metric ``a`b``;"),
        ("`x``", "Metric ``` `x`` ```;"),
    ],
)
def test_analyze_writes_a_metric_of_any_name_as_one_code_span(
    tmp_path: Path, metric: str, shown: str
) -> None:
    # An upstream file's metric went into report.md raw: a newline in it began a line of its
    # own (a heading), a backtick ended its code span.
    evaluation, _ = formatted_as_evaluation(metric)
    (tmp_path / "eval.json").write_text(json.dumps(evaluation))
    out = tmp_path / "out"
    assert (
        run_command("analyze", str(tmp_path / "eval.json"), "--out", str(out), "--no-plots")[0] == 0
    )
    lines = (out / "report.md").read_text().splitlines()
    assert lines[2].startswith(shown + " correlation `spearman_corr`;")
    assert not any(line.startswith("# Injected") for line in lines)


def test_analyze_writes_names_in_no_utf8_escaped(tmp_path: Path) -> None:
    # A file name, --model or --metric of bytes that are not UTF-8 reads as lone surrogates,
    # which no output can hold: the writing of the outputs ended in a traceback.
    odd = tmp_path / os.fsdecode(b"bad\xffname.json")
    shutil.copy(FORMATTED, odd)
    out = tmp_path / "out"
    code, text = run_command("analyze", str(odd), "--out", str(out), "--no-plots")
    assert code == 0
    assert "\nbad\\udcffname: 2 pairs" in text
    assert (out / "report.md").read_text().startswith("# TRIG relation analysis: bad\\udcffname\n")
    assert {j.judge.model for j in read_judgements_parquet(out / JUDGEMENTS_FILE)} == {
        "bad\\udcffname.json"
    }
    argv = ["--out", str(out), "--no-plots", "--model", "m\udcff", "--metric", "s\udcfe"]
    assert run_command("analyze", str(FORMATTED), *argv)[0] == 0
    cells = json.loads((out / "evaluation_result.json").read_text())["IQ-R_TA-C_1"]["IQ-R"]
    assert list(cells[0]) == ["s\\udcfe"]
    written = read_judgements_parquet(out / JUDGEMENTS_FILE)
    assert {(j.model, j.metric) for j in written} == {("m\\udcff", "s\\udcfe")}


@pytest.mark.parametrize("metric", [None, "trig\ud800"])
def test_analyze_refuses_a_key_of_half_a_character(tmp_path: Path, metric: str | None) -> None:
    # JSON's "\ud800" escape reads as a lone surrogate, which no output can hold: a metric
    # (or a formatted file's data_id) holding one ended in a traceback inside polars. It is
    # refused, named escaped, as a run refuses a record holding one.
    evaluation, _ = formatted_as_evaluation("trig\ud800")
    (tmp_path / "eval.json").write_text(json.dumps(evaluation))
    chosen = ["--metric", metric] if metric is not None else []
    out = str(tmp_path / "out")
    with pytest.raises(
        AnalysisError,
        match=r"IQ-R_TA-C_1 IQ-R: metric 'trig\\ud800' is not valid Unicode: a lone surrogate",
    ):
        run_command("analyze", str(tmp_path / "eval.json"), "--out", out, *chosen)
    formatted = {"IQ-R_TA-C": {"IQ-R_TA-C_1": [0.5, 0.4], "x\udfff": [0.1, 0.2]}}
    (tmp_path / "formatted.json").write_text(json.dumps(formatted))
    with pytest.raises(AnalysisError, match=r"data_id 'x\\udfff' is not valid Unicode"):
        run_command("analyze", str(tmp_path / "formatted.json"), "--out", out)


@pytest.mark.parametrize("with_prompts", [True, False])
def test_analyze_evaluation_result(tmp_path: Path, with_prompts: bool) -> None:
    evaluation, prompts = formatted_as_evaluation("clip")
    (tmp_path / "eval.json").write_text(json.dumps(evaluation))
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    extra = ["--prompts", str(tmp_path / "prompts.json")] if with_prompts else []
    out = tmp_path / "out"
    code, _ = run_command(
        "analyze",
        str(tmp_path / "eval.json"),
        "--out",
        str(out),
        "--no-plots",
        "--model",
        "flux",
        *extra,
    )
    assert code == 0
    assert (out / "relationship_codes.csv").read_text() == EXPECTED_CSV.read_text()
    assert json.loads((out / "evaluation_result.json").read_text()) == evaluation
    assert not (out / "plots").exists()
    assert "# TRIG relation analysis: flux" in (out / "report.md").read_text()


def test_analyze_help_describes_a_file_not_a_run(capsys: pytest.CaptureFixture[str]) -> None:
    # It said the thresholds default to "the run's [relation] config" and the metric to "the
    # first judge that measured every dimension": a file has neither; --task hid its default.
    parser = argparse.ArgumentParser(prog="trig-stream")
    add_commands(parser.add_subparsers(dest="command", required=True))
    with pytest.raises(SystemExit):
        parser.parse_args(["analyze", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "[relation]" not in text
    assert "judge" not in text
    assert "thresholds: default: TRIG's defaults" in text
    assert "the file's first metric that scored every dimension" in text
    assert "TRIG task (default: t2i)" in text
    with pytest.raises(SystemExit):
        parser.parse_args(["report", "--help"])
    assert "the run's [relation] config, else TRIG's defaults" in capsys.readouterr().out


def test_analyze_refuses_bad_input(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text(json.dumps({"x": {"y": 1}}))
    with pytest.raises(AnalysisError, match="neither a TRIG evaluation result"):
        run_command("analyze", str(tmp_path / "bad.json"), "--out", str(tmp_path / "o"))
    (tmp_path / "score.json").write_text(json.dumps({"IQ-R_TA-C": {"IQ-R_TA-C_1": [0.5, "x"]}}))
    with pytest.raises(AnalysisError, match="not a finite number"):
        run_command("analyze", str(tmp_path / "score.json"), "--out", str(tmp_path / "o"))
    # Python's json writes and reads NaN; the message says where it is, in either layout.
    (tmp_path / "nan.json").write_text(json.dumps({"IQ-R_TA-C": {"IQ-R_TA-C_1": [0.5, math.nan]}}))
    with pytest.raises(AnalysisError, match="IQ-R_TA-C_1 TA-C: score nan is not a finite number"):
        run_command("analyze", str(tmp_path / "nan.json"), "--out", str(tmp_path / "o"))
    (tmp_path / "nan.json").write_text(json.dumps({"IQ-R_TA-C_1": {"IQ-R": [{"m": math.inf}]}}))
    with pytest.raises(AnalysisError, match="IQ-R_TA-C_1 IQ-R: score inf is not a finite number"):
        run_command("analyze", str(tmp_path / "nan.json"), "--out", str(tmp_path / "o"))
    # An integer too large for a float is no score either (and must not crash the check).
    (tmp_path / "big.json").write_text(json.dumps({"IQ-R_TA-C": {"IQ-R_TA-C_1": [10**400, 0.5]}}))
    with pytest.raises(AnalysisError, match=r"IQ-R_TA-C_1 IQ-R: score .* is not a finite number"):
        run_command("analyze", str(tmp_path / "big.json"), "--out", str(tmp_path / "o"))
    # A score on another scale would put every image in one zone of the DTM.
    (tmp_path / "scale.json").write_text(json.dumps({"IQ-R_TA-C_1": {"IQ-R": [{"m": 4.5}]}}))
    with pytest.raises(
        AnalysisError, match=r"IQ-R_TA-C_1 IQ-R: score 4.5 of metric 'm' is outside \[0, 1\]"
    ):
        run_command("analyze", str(tmp_path / "scale.json"), "--out", str(tmp_path / "o"))
    # A formatted file's pair with an unknown dimension is named as such, not read as a data_id.
    (tmp_path / "pair.json").write_text(json.dumps({"IQ-R_XX-C": {"IQ-R_XX-C_1": [0.5, 0.4]}}))
    with pytest.raises(AnalysisError, match="unknown dimension 'XX-C' in pair 'IQ-R_XX-C'"):
        run_command("analyze", str(tmp_path / "pair.json"), "--out", str(tmp_path / "o"))

    def refused(name: str, document: object, match: str, *extra: str) -> None:
        (tmp_path / name).write_text(json.dumps(document))
        with pytest.raises(AnalysisError, match=match):
            run_command("analyze", str(tmp_path / name), "--out", str(tmp_path / "o"), *extra)

    # A score under a dimension its pair lacks, against the data_id's or the prompt file's.
    refused(
        "dim.json",
        {"IQ-R_TA-C_1": {"R-T": [{"m": 0.5}]}},
        "IQ-R_TA-C_1: dimension 'R-T' is not one of its pair",
    )
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"data_id": "IQ-R_TA-C_1", "dimensions": ["R-T", "IQ-A"]}]))
    scored = {"IQ-R_TA-C_1": {"IQ-R": [{"m": 0.5}]}}
    refused(
        "ok.json",
        scored,
        "dimension 'IQ-R' is not one of its pair R-T_IQ-A",
        "--prompts",
        str(prompts),
    )
    refused(
        "null.json",
        {"IQ-R_TA-C_1": {"IQ-R": [{"m": 0.5}], "TA-C": None}},
        r"IQ-R_TA-C_1 TA-C: expected \[\{metric: score\}",
    )
    # The same metric twice in one dimension's list, the same data_id twice with two pairs.
    refused(
        "twice.json",
        {"IQ-R_TA-C_1": {"IQ-R": [{"m": 0.1}, {"m": 0.9}]}},
        "IQ-R_TA-C_1 IQ-R: metric 'm' scored twice",
    )
    # A formatted file names no metric: --metric names it. (This copy starts with a byte
    # order mark, as some editors save JSON.)
    marked = tmp_path / "formatted.json"
    marked.write_bytes(b"\xef\xbb\xbf" + FORMATTED.read_bytes())
    run_command(
        "analyze", str(marked), "--out", str(tmp_path / "o"), "--metric", "clip", "--no-plots"
    )
    assert "clip" in (tmp_path / "o" / "evaluation_result.json").read_text()
    evaluation, _ = formatted_as_evaluation()
    (tmp_path / "eval.json").write_text(json.dumps(evaluation))
    with pytest.raises(AnalysisError, match="metric 'clip'"):
        run_command(
            "analyze", str(tmp_path / "eval.json"), "--out", str(tmp_path / "o"), "--metric", "clip"
        )
    with pytest.raises(AnalysisError, match="dominance_ratio"):
        run_command(
            "analyze", str(FORMATTED), "--out", str(tmp_path / "o"), "--dominance-ratio", "0"
        )


def test_analyze_without_prompts_names_the_data_id_it_cannot_take_a_pair_from(
    tmp_path: Path,
) -> None:
    # "'IQ-R_TA-C_1' is not a dimension pair of the form A_B": neither the data_id, nor the
    # form a data_id gives its pair in, nor that --prompts gives the pairs.
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"data_id": "IQ-R_TA-C_1_0", "dimensions": ["IQ-R", "TA-C"]}]))
    out = tmp_path / "o"
    hint = "; --prompts with its dataset gives each data_id's pair"
    for data_id, why in [
        ("IQ-R_TA-C_1_0", "'IQ-R_TA-C_1' is not a dimension pair of the form A_B"),
        ("IQ-R_XX_1", "unknown dimension 'XX' in pair 'IQ-R_XX'"),
        ("photo", "it does not end in _<number> (digits 0-9)"),
        # Digits of other scripts, and a newline after the number, which a run quarantines.
        ("IQ-R_TA-C_\u0661", "it does not end in _<number> (digits 0-9)"),
        ("IQ-R_TA-C_\uff11", "it does not end in _<number> (digits 0-9)"),
        ("IQ-R_TA-C_1\n", "it does not end in _<number> (digits 0-9)"),
    ]:
        document = tmp_path / "eval.json"
        document.write_text(json.dumps({data_id: {"IQ-R": [{"m": 0.5}], "TA-C": [{"m": 0.4}]}}))
        with pytest.raises(AnalysisError) as raised:
            run_command("analyze", str(document), "--out", str(out), "--no-plots")
        said = f"{document}: data_id {data_id!r} is not of the form <D1>_<D2>_<n>: {why}{hint}"
        assert str(raised.value) == said
    document.write_text(json.dumps({"IQ-R_TA-C_1_0": {"IQ-R": [{"m": 0.5}]}}))
    code, _ = run_command(
        "analyze", str(document), "--out", str(out), "--no-plots", "--prompts", str(prompts)
    )
    assert code == 0


def test_analyze_says_a_formatted_file_without_a_scored_image_is_one(tmp_path: Path) -> None:
    # A report's formatted.json for a model with no complete image ({pair: {}, ...}) was
    # "neither a TRIG evaluation result nor a formatted file".
    run = write_run_dir(tmp_path / "run", {}, scored=False)
    assert run_command("report", str(run), "--no-plots")[0] == 0
    formatted = run / "report" / "model-a" / "formatted.json"
    document = json.loads(formatted.read_text())
    assert document and all(value == {} for value in document.values())
    with pytest.raises(AnalysisError) as raised:
        run_command("analyze", str(formatted), "--out", str(tmp_path / "o"))
    assert str(raised.value).startswith(
        f"{formatted}: a formatted file ({{pair: {{data_id: [score_A, score_B]}}}}) with no "
        "scored image: every pair is empty, so there is nothing to analyse"
    )
    # Not a formatted file's layout unless every key is a pair.
    (tmp_path / "other.json").write_text(json.dumps({"IQ-R_TA-C": {}, "x": {}}))
    with pytest.raises(AnalysisError, match="neither a TRIG evaluation result"):
        run_command("analyze", str(tmp_path / "other.json"), "--out", str(tmp_path / "o"))


def test_analyze_on_a_reports_formatted_file_keeps_its_pair_without_a_complete_image(
    tmp_path: Path,
) -> None:
    # The report's formatted.json holds "IQ-O_D-K": {} (no image scored on both dimensions):
    # `analyze` on it left the pair out ("2 pairs (2 with data)" where the report had 3) and
    # its codes out of result.json, where the report had them at -1.
    run = write_run_dir(tmp_path / "run", {}, models=("model-a",))
    judge = JudgeFingerprint(backend="fake", model="j")
    half = [
        Judgement(
            model="model-a",
            data_id=f"IQ-O_D-K_{index}",
            task="t2i",
            pair="IQ-O_D-K",
            dimension=dim,
            metric="trigscore",
            judge=judge,
            status="ok" if dim == "IQ-O" else "unscorable",
            score=0.5 if dim == "IQ-O" else None,
        )
        for index in range(3)
        for dim in ("IQ-O", "D-K")
    ]
    journal = Journal(run / JOURNAL)
    journal.open()
    journal.append(half)
    journal.close()
    code, text = run_command("report", str(run), "--no-plots")
    assert code == 0 and "3 pairs (2 with data)" in text
    report = run / "report" / "model-a"
    assert json.loads((report / "formatted.json").read_text())["IQ-O_D-K"] == {}
    out = tmp_path / "out"
    code, text = run_command("analyze", str(report / "formatted.json"), "--out", str(out))
    assert code == 0 and "3 pairs (2 with data)" in text
    codes = json.loads((out / "result.json").read_text())["relationship_codes"]
    expected = json.loads((report / "result.json").read_text())["relationship_codes"]
    assert codes == expected and codes["IQ-O_D-K"] == codes["D-K_IQ-O"] == -1


def write_run_dir(
    path: Path,
    relation: dict[str, float],
    models: tuple[str, ...] = ("model-a", "model-b"),
    *,
    metric: str = "trigscore",
    task: Task = "t2i",
    scored: bool = True,
    judge: JudgeFingerprint | None = None,
    generators: tuple[str, ...] = (),
) -> Path:
    """A run directory with two models, written with the store's own helpers (``scored``
    False: every judgement unscorable; ``judge``: the fingerprint in the manifest and the
    judgements; ``generators``: the config's generator names, in its order)."""
    judge = judge or JudgeFingerprint(backend="fake", model="j")
    config: dict[str, object] = {"judges": [{"name": metric}], "relation": relation}
    if generators:
        config["generators"] = [{"name": name} for name in generators]
    manifest = Manifest(
        run_name=path.name,
        task=task,
        judges={metric: judge.model_dump()},
        config=config,
    )
    write_atomic(path / MANIFEST, manifest.model_dump_json().encode())
    records = []
    for model, shift in zip(models, (0.0, -0.5), strict=False):
        for pair, images in json.loads(FORMATTED.read_text()).items():
            first, second = pair.split("_")
            for data_id, (a, b) in images.items():
                for dim, score in ((first, a), (second, b)):
                    records.append(
                        Judgement(
                            model=model,
                            data_id=data_id,
                            task=task,
                            pair=pair,
                            dimension=dim,
                            metric=metric,
                            judge=judge,
                            status="ok" if scored else "unscorable",
                            score=round(max(score + shift, 0.0), 3) if scored else None,
                        )
                    )
    journal = Journal(path / JOURNAL)
    journal.open()
    journal.append(records)
    journal.close()
    return path


def test_report_uses_stored_thresholds_unless_overridden(tmp_path: Path) -> None:
    run = write_run_dir(tmp_path / "run", {"synergy_density": 0.7})
    code, text = run_command("report", str(run), "--no-plots")
    assert code == 0
    csv = (run / "report" / "model-a" / "relationship_codes.csv").read_text().splitlines()
    iq_r = csv[5].split(",")
    assert iq_r[0] == "IQ-R" and iq_r[8] != "0"  # 0.6 synergy density < stored 0.7
    assert (run / "report" / "comparison.md").exists()
    assert "model-b" in text
    out = tmp_path / "elsewhere"
    run_command("report", str(run), "--out", str(out), "--synergy-density", "0.4", "--no-plots")
    assert (out / "model-a" / "relationship_codes.csv").read_text() == EXPECTED_CSV.read_text()
    shifted = (out / "model-b" / "relationship_codes.csv").read_text()
    assert "IQ-R,NULL,NULL,NULL,NULL,0.250,-1,-1,3," in shifted  # scores - 0.5: bottleneck


def test_report_of_a_run_in_progress_says_it_covers_the_judgements_so_far(
    tmp_path: Path,
) -> None:
    run = write_run_dir(tmp_path / "run", {})
    code, text = run_command("report", str(run), "--no-plots")
    assert code == 0 and "still running" not in text
    with (run / LOCK).open("a+") as lock:  # as the process running in it holds it
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write(str(os.getpid()))
        lock.flush()
        code, text = run_command("report", str(run), "--no-plots")
    assert code == 0
    assert f"a process (pid {os.getpid()}) is still running in {run}" in text
    assert "covers the judgements so far" in text


def test_report_of_a_run_whose_run_lock_was_deleted_says_it_is_still_going(
    tmp_path: Path,
) -> None:
    run = write_run_dir(tmp_path / "run", {})
    with (run / JOURNAL).open("ab") as journal:  # as the running run holds it
        fcntl.flock(journal, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, text = run_command("report", str(run), "--no-plots")
    assert code == 0
    assert "a process (pid unknown: its journal is locked but not its run.lock" in text
    assert "covers the judgements so far" in text


def test_a_report_made_mid_run_says_so_in_its_files(tmp_path: Path) -> None:
    # Only the console said so: report.md and comparison.md read as a finished run's.
    run = write_run_dir(tmp_path / "run", {})
    with (run / LOCK).open("a+") as lock:  # as the process running in it holds it
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write(str(os.getpid()))
        lock.flush()
        assert run_command("report", str(run), "--no-plots")[0] == 0
    note = (
        f"Note: a process (pid {os.getpid()}) is still running in {run}: this report covers "
        "the judgements so far (the run writes its own when it ends, unless --no-report)\n"
    )
    for name in ("model-a/report.md", "model-b/report.md", "comparison.md"):
        assert note in (run / "report" / name).read_text()
    assert run_command("report", str(run), "--no-plots")[0] == 0
    for name in ("model-a/report.md", "model-b/report.md", "comparison.md"):
        assert "Note:" not in (run / "report" / name).read_text()


def test_the_reports_comparison_says_what_compare_says(make_config: ConfigFactory) -> None:
    # A generator whose every image failed: compare noted its empty column, the report's
    # comparison.md listed its -1 cells as differing without a word.
    config = make_config(
        samples=8,
        generators=[
            {"name": "good", "backend": "synthetic", "options": {"size": 16}},
            {"name": "bad", "backend": "synthetic", "options": {"failure_rate": 1.0}},
        ],
    )
    anyio.run(run_to_end, config)
    assert run_command("report", str(config.run_dir), "--no-plots")[0] == 0
    out = config.run_dir.parent / "compared.md"
    assert run_command("compare", str(config.run_dir), "--out", str(out))[0] == 0
    written = (config.run_dir / "report" / "comparison.md").read_text()
    assert "Note: bad has no ok score (every judgement unscorable or an error)" in written
    assert written == out.read_text()


def test_the_reports_comparison_has_the_configs_models_not_judged_yet(tmp_path: Path) -> None:
    # A run stopped before model-b was judged: `compare RUN_DIR` gave it an empty column and a
    # note, while the report left it out, and with model-a alone removed comparison.md as
    # "one model".
    run = write_run_dir(
        tmp_path / "run", {}, models=("model-a",), generators=("model-a", "model-b")
    )
    assert run_command("report", str(run), "--no-plots")[0] == 0
    compared = tmp_path / "compared.md"
    assert run_command("compare", str(run), "--out", str(compared))[0] == 0
    assert (run / "report" / "comparison.md").is_file()
    written = (run / "report" / "comparison.md").read_text()
    assert "| dimension | model-a | model-b |" in written
    assert "Note: model-b has no judgement of metric `trigscore` yet" in written
    assert written == compared.read_text()


def test_a_report_without_a_single_ok_score_writes_no_comparison(tmp_path: Path) -> None:
    # `compare RUN_DIR` refused ("nothing to compare: no ok score"), while the report wrote
    # a comparison.md of empty columns.
    failed = write_run_dir(tmp_path / "failed", {}, scored=False)
    with pytest.raises(AnalysisError, match="nothing to compare: no ok score"):
        compare_runs([failed])
    scored = write_run_dir(tmp_path / "scored", {})
    out = tmp_path / "out"
    assert run_command("report", str(scored), "--out", str(out), "--no-plots")[0] == 0
    assert (out / "comparison.md").is_file()
    code, text = run_command("report", str(failed), "--out", str(out), "--no-plots")
    assert code == 0
    assert {p.name for p in out.iterdir()} == {"model-a", "model-b"}
    assert f"{out / 'comparison.md'} removed: nothing to compare: no ok score in {failed}" in text


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_thresholds_that_are_no_number_are_refused(tmp_path: Path, value: str) -> None:
    # NaN compares false with everything: it silently changed the relation codes.
    with pytest.raises(AnalysisError, match=r"invalid thresholds: synergy: .*finite number"):
        run_command("analyze", str(FORMATTED), "--out", str(tmp_path), f"--synergy={value}")
    run = write_run_dir(tmp_path / "run", {})
    with pytest.raises(AnalysisError, match=r"tradeoff_corr: .*finite number"):
        run_command("report", str(run), f"--tradeoff-corr={value}")
    # A manifest edited by hand: one line naming the key, not a validation dump.
    manifest = json.loads((run / MANIFEST).read_text())
    manifest["config"]["relation"] = {"synergy": "high"}
    (run / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(RunDirError) as raised:
        run_command("report", str(run))
    assert str(raised.value) == (
        f"{run}: the manifest's [relation] section is invalid: synergy: Input should be a "
        "valid number, unable to parse string as a number"
    )


@pytest.mark.parametrize(
    ("thresholds", "problem"),
    [
        (["--synergy", "-1"], r"synergy: Input should be greater than or equal to 0"),
        (["--synergy", "2"], r"synergy: Input should be less than or equal to 1"),
        (["--bottleneck-density", "1.5"], r"bottleneck_density: .*less than or equal to 1"),
        (["--dominance-ratio", "2"], r"dominance_ratio: .*less than or equal to 1"),
        (["--tradeoff-corr", "-3"], r"tradeoff_corr: .*greater than or equal to -1"),
        (
            ["--bottleneck", "0.9", "--synergy", "0.1"],
            r"bottleneck \(0\.9\) is above synergy \(0\.1\): a pair's scores would be in "
            "both zones",
        ),
    ],
)
def test_thresholds_outside_what_scores_and_shares_can_be_are_refused(
    tmp_path: Path, thresholds: list[str], problem: str
) -> None:
    # Scores are probabilities: a synergy threshold of 2 made every pair's zone empty.
    run = write_run_dir(tmp_path / "run", {})
    with pytest.raises(AnalysisError, match=f"invalid thresholds: {problem}"):
        run_command("report", str(run), "--no-plots", *thresholds)


@pytest.mark.parametrize("models", [("model-a",), ("model-a", "model-b")])
def test_a_report_leaves_a_comparison_md_of_the_users_alone(
    tmp_path: Path, models: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    # `report RUN --out notes` removed the user's notes/comparison.md ("removed: this
    # report has one model"), or with two models wrote over it.
    run = write_run_dir(tmp_path / "run", {}, models=models)
    out = tmp_path / "notes"
    out.mkdir()
    mine = out / "comparison.md"
    mine.write_text("# My comparison of the two papers\n")
    assert main(["report", str(run), "--out", str(out), "--no-plots"]) == EXIT_RUN_DIR
    assert (
        f"{mine} is not a comparison a report wrote (it does not start with '# TRIG model "
        "comparison'), and a report replaces or removes that file: move it away, or write the "
        "report elsewhere with --out"
    ) in " ".join(capsys.readouterr().err.split())
    assert mine.read_text() == "# My comparison of the two papers\n"
    assert [p.name for p in out.iterdir()] == ["comparison.md"]  # refused before any write
    # Nor anything but a file (a pipe would have blocked the write).
    mine.unlink()
    os.mkfifo(mine)
    with pytest.raises(AnalysisError, match=r"comparison\.md is not a comparison a report wrote"):
        run_command("report", str(run), "--out", str(out), "--no-plots")
    mine.unlink()
    # An earlier report's is replaced, or removed.
    other = write_run_dir(tmp_path / "other", {}, models=("model-a", "model-b"))
    assert run_command("report", str(other), "--out", str(out), "--no-plots")[0] == 0
    assert run_command("report", str(run), "--out", str(out), "--no-plots")[0] == 0
    assert mine.is_file() == (len(models) > 1)


def test_a_report_without_plots_removes_those_an_earlier_one_drew(tmp_path: Path) -> None:
    # They showed the earlier scores (or thresholds) beside the new files.
    run = write_run_dir(tmp_path / "run", {})
    assert run_command("report", str(run))[0] == 0
    plots = run / "report" / "model-a" / "plots"
    assert {p.name for p in plots.iterdir()} == set(plots_module.PLOT_FILES)
    (run / "report" / "model-b" / "plots" / "mine.txt").write_text("kept")
    assert run_command("report", str(run), "--synergy", "0.7", "--no-plots")[0] == 0
    assert not plots.exists()
    assert [p.name for p in (run / "report" / "model-b" / "plots").iterdir()] == ["mine.txt"]


def test_a_report_removes_the_model_folders_and_comparison_an_earlier_one_wrote(
    tmp_path: Path,
) -> None:
    # `report two --out X` (two models) then `report one --out X` (one model): model-b's
    # folder and comparison.md stayed, the earlier numbers beside the new ones, unsaid.
    two = write_run_dir(tmp_path / "two", {})
    one = write_run_dir(tmp_path / "one", {"synergy_density": 0.7}, models=("model-a",))
    out = tmp_path / "out"
    assert run_command("report", str(two), "--out", str(out), "--no-plots")[0] == 0
    assert {p.name for p in (out / "model-b").iterdir()} == set(MODEL_FILES)
    (out / "notes.txt").write_text("mine")
    (out / "drafts").mkdir()
    (out / "drafts" / "report.md").write_text("mine: no report folder")
    code, text = run_command("report", str(one), "--out", str(out), "--no-plots")
    assert code == 0
    assert {p.name for p in out.iterdir()} == {"model-a", "notes.txt", "drafts"}
    assert (
        f"model-b: no judgement of metric 'trigscore' in {one}; the report files an earlier "
        f"report wrote in {out / 'model-b'} are removed\n"
    ) in text
    removed = f"{out / 'comparison.md'} removed: nothing to compare: 1 model(s) in 1 run dir(s)"
    assert removed in text
    assert (out / "drafts" / "report.md").read_text() == "mine: no report folder"
    # A file of the user's in the folder stays, and so does the folder.
    assert run_command("report", str(two), "--out", str(out), "--no-plots")[0] == 0
    assert (out / "comparison.md").is_file()
    (out / "model-b" / "mine.txt").write_text("kept")
    code, text = run_command("report", str(one), "--out", str(out), "--no-plots")
    assert [p.name for p in (out / "model-b").iterdir()] == ["mine.txt"]
    assert "(the other files in it are kept)" in text


def test_the_removal_lines_show_a_newline_in_the_folder_s_name_as_text(tmp_path: Path) -> None:
    # Escaped of its control characters but not of a newline, the folder's name split each
    # line in two, the second reading as the program's own ("FAKE LINE/model-b are removed").
    two = write_run_dir(tmp_path / "two", {})
    one = write_run_dir(tmp_path / "one", {}, models=("model-a",))
    out = tmp_path / "out\nFAKE LINE"
    assert run_command("report", str(two), "--out", str(out), "--no-plots")[0] == 0
    code, text = run_command("report", str(one), "--out", str(out), "--no-plots")
    assert code == 0
    shown = str(tmp_path / "out\\nFAKE LINE")
    lines = text.splitlines()
    assert not any(line.startswith("FAKE LINE") for line in lines)
    assert (
        f"model-b: no judgement of metric 'trigscore' in {one}; the report files an earlier "
        f"report wrote in {shown}/model-b are removed"
    ) in lines
    removed = f"{shown}/comparison.md removed: nothing to compare: 1 model(s) in 1 run dir(s)"
    assert removed in lines


def test_a_report_removes_the_temporary_files_a_killed_report_left(tmp_path: Path) -> None:
    # A report killed (kill -9) between writing its files and renaming them left their
    # temporaries beside them, which no later report or run removed.
    run = write_run_dir(tmp_path / "run", {})
    assert run_command("report", str(run))[0] == 0
    dead = subprocess.Popen([sys.executable, "-c", "pass"])  # its pid: no process now
    dead.wait()
    report = run / "report"
    stale = report / "model-c"  # an earlier report's model, no longer in the run
    stale.mkdir()
    for name in MODEL_FILES:
        (stale / name).write_text("earlier")
    leftovers = [
        report / "model-a" / f".evaluation_result.json.{dead.pid}.140.tmp",
        report / "model-b" / f".{JUDGEMENTS_FILE}.{dead.pid}.140.tmp",
        report / "model-a" / "plots" / f".dtm.png.{dead.pid}.7.tmp",
        report / f".comparison.md.{dead.pid}.7.tmp",
        stale / f".report.md.{dead.pid}.7.tmp",
    ]
    kept = [
        report / "model-a" / f".notes.txt.{dead.pid}.140.tmp",  # no report file's
        report / "model-a" / f".report.md.{os.getpid()}.140.tmp",  # a writer still going
        report / "model-a" / "report.md.tmp",
        report / "model-b" / ".report.md.tmp",
    ]
    for path in [*leftovers, *kept]:
        path.write_text("half")
    folder = report / "model-b" / f".formatted.json.{dead.pid}.1.tmp"  # a user's folder
    folder.mkdir()
    assert run_command("report", str(run))[0] == 0
    assert [path for path in leftovers if path.exists()] == []
    assert all(path.read_text() == "half" for path in kept)
    assert folder.is_dir()
    assert not stale.exists()


def test_report_without_matplotlib_notes_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = write_run_dir(tmp_path / "run", {})
    monkeypatch.setattr(plots_module, "matplotlib_available", lambda: False)
    code, text = run_command("report", str(run))
    assert code == 0
    assert "pip install 'trig-stream[plots]'" in text
    assert not (run / "report" / "model-a" / "plots").exists()
    with pytest.raises(MissingExtraError, match=r"trig-stream\[plots\]"):
        plots_module.write_plots(None, tmp_path)  # type: ignore[arg-type]


def test_report_refuses_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    with pytest.raises(RunDirError, match="not a trig-stream run directory"):
        run_command("report", str(tmp_path))


def test_a_report_that_cannot_be_written_is_one_error_naming_where(tmp_path: Path) -> None:
    run = write_run_dir(tmp_path / "run", {})
    blocked = tmp_path / "a-file"
    blocked.write_text("a file where the report's folder would go")
    with pytest.raises(AnalysisError, match=r"cannot write the report in .*a-file/model-a: "):
        run_command("report", str(run), "--out", str(blocked), "--no-plots")
    # The comparison's own words: it said "cannot write the report in a-file: File exists;
    # it must be a folder", of a comparison FILE, naming neither it nor what to do.
    with pytest.raises(AnalysisError) as raised:
        run_command("compare", str(run), "--out", str(blocked / "cmp.md"))
    assert str(raised.value) == (
        f"cannot write the comparison to {blocked / 'cmp.md'}: its folder {blocked} cannot be "
        "made (File exists, a file stands where a folder of its path goes); name a file in a "
        "folder this user can write, on a disk with space"
    )
    with pytest.raises(AnalysisError, match=r"comparison to .*a-file/sub/cmp.md: its folder "):
        run_command("compare", str(run), "--out", str(blocked / "sub" / "cmp.md"))


def test_a_comparison_written_again_keeps_its_file_permissions(tmp_path: Path) -> None:
    # Replaced through a temporary, a private comparison (0600) became 0644, readable by all.
    run = write_run_dir(tmp_path / "run", {})
    out = tmp_path / "cmp.md"
    run_command("compare", str(run), "--out", str(out))
    out.chmod(0o600)
    out.write_text("earlier")
    run_command("compare", str(run), "--out", str(out))
    assert out.read_text() != "earlier" and (out.stat().st_mode & 0o777) == 0o600


def test_a_folder_where_a_report_file_goes_is_named_and_nothing_is_replaced(
    tmp_path: Path,
) -> None:
    # The files before it were replaced, then "Is a directory" named the model's folder.
    run = write_run_dir(tmp_path / "run", {})
    out = tmp_path / "o2"
    run_command("report", str(run), "--out", str(out), "--no-plots")
    folder = out / "model-a"
    before = {name: (folder / name).read_bytes() for name in MODEL_FILES if name != "report.md"}
    (folder / "report.md").unlink()
    (folder / "report.md").mkdir()
    for name in before:
        (folder / name).write_bytes(b"earlier")
    with pytest.raises(AnalysisError) as raised:
        run_command("report", str(run), "--out", str(out), "--no-plots")
    assert str(raised.value) == (
        f"cannot write the report in {folder}: {folder / 'report.md'} is a folder, where a file "
        "of that name is to be written; move or remove it"
    )
    assert {name: (folder / name).read_bytes() for name in before} == dict.fromkeys(
        before, b"earlier"
    )
    assert sorted(p.name for p in folder.iterdir()) == sorted(MODEL_FILES)


@pytest.mark.parametrize(("blocked", "other"), [("model-a", "model-b"), ("model-b", "model-a")])
def test_a_folder_in_place_of_an_earlier_plot_is_refused_before_any_model_is_written(
    tmp_path: Path, blocked: str, other: str
) -> None:
    # With --no-plots the earlier plots were removed after the model's files were replaced:
    # "cannot write the report in .../model-a: Is a directory; it must be a folder this user
    # can write, on a disk with space" named no path, and left model-a new, model-b old. Asked
    # only inside each model's write, a later model's folder was refused after model-a's
    # files were replaced and its plots removed.
    run = write_run_dir(tmp_path / "run", {})
    out = tmp_path / "o"
    run_command("report", str(run), "--out", str(out), "--no-plots")
    earlier_plot = out / other / "plots" / "dtm.png"
    earlier_plot.parent.mkdir()
    earlier_plot.write_bytes(b"earlier")
    in_the_way = out / blocked / "plots" / "dtm.png"
    in_the_way.mkdir(parents=True)
    written = [out / model / name for model in ("model-a", "model-b") for name in MODEL_FILES]
    for path in written:
        path.write_bytes(b"earlier")
    with pytest.raises(AnalysisError) as raised:
        run_command("report", str(run), "--out", str(out), "--no-plots")
    assert str(raised.value) == (
        f"cannot write the report in {out / blocked}: {in_the_way} is a folder, where an "
        "earlier report's plot of that name is to be removed (this report draws none); move "
        "or remove it"
    )
    assert {path.read_bytes() for path in written} == {b"earlier"}
    assert earlier_plot.read_bytes() == b"earlier"


@pytest.mark.parametrize(
    ("obstacle", "plots"),
    [("report.md", False), ("report.md", True), ("plots/dimension_map.png", True)],
)
def test_a_folder_where_a_later_models_file_goes_is_refused_before_any_model_is_written(
    tmp_path: Path, obstacle: str, plots: bool
) -> None:
    # Checked only inside each model's write, model-a's files were replaced before
    # model-b's folder in the way was found: a report of model-a new, model-b old.
    if plots:
        pytest.importorskip("matplotlib")
    run = write_run_dir(tmp_path / "run", {})
    out = tmp_path / "o"
    names = [*MODEL_FILES, *(f"plots/{name}" for name in sorted(PNGS))]
    written = [out / model / name for model in ("model-a", "model-b") for name in names]
    for path in written:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"earlier")
    in_the_way = out / "model-b" / obstacle
    in_the_way.unlink()
    in_the_way.mkdir()
    written.remove(in_the_way)
    flags = () if plots else ("--no-plots",)
    with pytest.raises(AnalysisError) as raised:
        run_command("report", str(run), "--out", str(out), *flags)
    assert str(raised.value) == (
        f"cannot write the report in {out / 'model-b'}: {in_the_way} is a folder, where a "
        "file of that name is to be written; move or remove it"
    )
    assert {path.read_bytes() for path in written} == {b"earlier"}
    assert sorted(p.name for p in (out / "model-a").iterdir()) == sorted([*MODEL_FILES, "plots"])


@pytest.mark.parametrize("obstacle", ["model-b", "model-b/plots"])
def test_a_file_where_a_later_models_folder_goes_is_refused_before_any_model_is_written(
    tmp_path: Path, obstacle: str
) -> None:
    # A file at model-b's folder (or its plots/, plots drawn) was taken for a folder not
    # made yet: model-a's files were replaced, then model-b's write failed "File exists".
    pytest.importorskip("matplotlib")
    run = write_run_dir(tmp_path / "run", {})
    out = tmp_path / "o"
    names = [*MODEL_FILES, *(f"plots/{name}" for name in sorted(PNGS))]
    written = [out / "model-a" / name for name in names]
    for path in written:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"earlier")
    in_the_way = out / obstacle
    in_the_way.parent.mkdir(parents=True, exist_ok=True)
    in_the_way.write_bytes(b"a user's file")
    with pytest.raises(AnalysisError) as raised:
        run_command("report", str(run), "--out", str(out))
    assert str(raised.value) == (
        f"cannot write the report in {out / 'model-b'}: {in_the_way} is a file, where the "
        "report's folder of that name goes; move or remove it"
    )
    assert {path.read_bytes() for path in written} == {b"earlier"}
    assert in_the_way.read_bytes() == b"a user's file"


@pytest.mark.parametrize("out", ["afile", "afile/deeper"])
def test_a_file_where_the_reports_folder_goes_is_named(tmp_path: Path, out: str) -> None:
    # `report RUN --out FILE` said "cannot write the report in FILE/model-a: Not a directory;
    # it must be a folder this user can write", naming no file in the way.
    run = write_run_dir(tmp_path / "run", {})
    in_the_way = tmp_path / "afile"
    in_the_way.write_bytes(b"a user's file")
    with pytest.raises(AnalysisError) as raised:
        run_command("report", str(run), "--out", str(tmp_path / out), "--no-plots")
    assert str(raised.value) == (
        f"cannot write the report in {tmp_path / out / 'model-a'}: {in_the_way} is a file, "
        "where the report's folder of that name goes; move or remove it"
    )
    assert in_the_way.read_bytes() == b"a user's file"


def test_a_file_the_report_cannot_remove_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The system's error named a file, which the message dropped ("Is a directory" of what?),
    # then advised permissions and disk space, which fitted neither.
    run = write_run_dir(tmp_path / "run", {})
    out = tmp_path / "o"
    run_command("report", str(run), "--out", str(out), "--no-plots")
    refused = out / "model-a" / "report.md"
    unlink = Path.unlink

    def busy(self: Path, missing_ok: bool = False) -> None:
        if self == refused:
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(self))
        unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", busy)
    with pytest.raises(AnalysisError) as raised:
        report_module.remove_model_outputs(out / "model-a")
    assert str(raised.value) == (
        f"cannot write the report in {out / 'model-a'}: {refused}: "
        f"{os.strerror(errno.EBUSY)}; write the report again once that is fixed"
    )


def test_a_disk_failing_between_two_renames_says_the_folder_may_mix_reports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An I/O error on the second rename left the first file new, the rest old, and the
    # message said only "cannot write the report in .../model-a: Input/output error".
    run = write_run_dir(tmp_path / "run", {})
    out = tmp_path / "o"
    run_command("report", str(run), "--out", str(out), "--no-plots")
    folder = out / "model-a"
    replace = os.replace
    renamed: list[Any] = []

    def failing_disk(source: Any, target: Any) -> None:
        if Path(target).parent == folder and renamed:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(source), str(target))
        renamed.append(target)
        replace(source, target)

    monkeypatch.setattr(os, "replace", failing_disk)
    with pytest.raises(AnalysisError) as raised:
        run_command("report", str(run), "--out", str(out), "--no-plots")
    assert str(raised.value) == (
        f"cannot write the report in {folder}: {folder / MODEL_FILES[1]}: Input/output error "
        f"(after 1 of the {len(MODEL_FILES)} files were replaced); {folder} may now hold "
        "files of this report beside the earlier report's: write the report again once the "
        "disk works"
    )
    assert not [path for path in folder.iterdir() if path.name.endswith(".tmp")]


@pytest.mark.parametrize("where", ["run-dir", "out"])
def test_a_report_that_cannot_be_written_exits_3_as_an_unwritable_run_dir(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    where: str,
) -> None:
    # A read-only run directory exited 2, the code of a bad command line or input.
    run = write_run_dir(tmp_path / "run", {})

    def refused(files: list[tuple[Path, bytes]], **kwargs: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(files[0][0]))

    monkeypatch.setattr(report_module, "write_atomic_together", refused)
    out = ["--out", str(tmp_path / "elsewhere")] if where == "out" else []
    assert main(["report", str(run), "--no-plots", *out]) == EXIT_RUN_DIR
    folder = tmp_path / "elsewhere" if where == "out" else run / "report"
    model = folder / "model-a"
    assert (
        f"cannot write the report in {model}: {model / MODEL_FILES[0]}: Permission denied; "
        "it must be a folder this user can write"
    ) in " ".join(capsys.readouterr().err.split())


def test_analyze_and_compare_outputs_that_cannot_be_written_exit_3(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = write_run_dir(tmp_path / "run", {})
    blocked = tmp_path / "a-file"
    blocked.write_text("a file where the output's folder would go")
    assert (
        main(["analyze", str(FORMATTED), "--out", str(blocked / "out"), "--no-plots"])
        == EXIT_RUN_DIR
    )
    assert main(["compare", str(run), "--out", str(blocked / "cmp.md")]) == EXIT_RUN_DIR
    err = " ".join(capsys.readouterr().err.split())
    assert err.count("cannot write the report in") == 1 and "this user can write" in err
    assert f"cannot write the comparison to {blocked / 'cmp.md'}: its folder" in err


class FillingFile:
    """A file opened for writing on a disk that fills up: it takes what room is left of
    its disk's, then refuses the rest with ENOSPC, as a write on a full disk does."""

    def __init__(self, file: IO[Any], room: list[int]) -> None:
        self._file = file
        self._room = room

    def write(self, data: Any) -> int:
        taken = min(len(data), self._room[0])
        self._file.write(data[:taken])
        self._room[0] -= taken
        if taken < len(data):
            self._file.flush()  # the part that fitted reaches the file, as it would
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return taken

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)

    def __enter__(self) -> FillingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()


def fill_disk_after(monkeypatch: pytest.MonkeyPatch, room: int) -> None:
    """Every file opened for writing through :meth:`Path.open` (``write_text`` and
    ``write_bytes`` too) shares a disk with ``room`` bytes left."""
    left = [room]
    opened = Path.open

    def open_on_a_filling_disk(self: Path, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        file = opened(self, mode, *args, **kwargs)
        return FillingFile(file, left) if "w" in mode else file

    monkeypatch.setattr(Path, "open", open_on_a_filling_disk)


def test_a_full_disk_during_a_report_keeps_the_earlier_report_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The report was written file by file in place: a full disk left the earlier report's
    # evaluation_result.json truncated beside its stale report.md.
    run = write_run_dir(tmp_path / "run", {})
    assert main(["report", str(run), "--correlation", "pearson_corr"]) == 0
    folder = run / "report"
    before = {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()}
    assert (folder / "model-a" / "plots" / "dtm.png") in before
    first_files = sum(len(before[folder / "model-a" / name]) for name in MODEL_FILES)
    capsys.readouterr()
    fill_disk_after(monkeypatch, first_files // 2)  # part way through the first model
    assert main(["report", str(run), "--correlation", "spearman_corr"]) == EXIT_RUN_DIR
    err = " ".join(capsys.readouterr().err.split())
    assert (
        f"error: cannot write the report in {folder / 'model-a'}: No space left on device; "
        "free some space on its disk, or write the report elsewhere with --out"
    ) in err
    after = {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()}
    assert sorted(after) == sorted(before)  # no temporary file left
    changed = [path.name for path in before if after[path] != before[path]]
    assert changed == []


def test_a_comparison_that_cannot_be_written_names_its_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A read-only folder: "cannot write the report in ." named neither the file nor what.
    run = write_run_dir(tmp_path / "run", {})

    def refused(path: Path, data: bytes, **kwargs: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(commands_module, "write_atomic", refused)
    out = tmp_path / "c.md"
    with pytest.raises(AnalysisError, match=rf"cannot write the comparison to {out}: Permission"):
        run_command("compare", str(run), "--out", str(out))


def test_output_paths_that_would_land_elsewhere_are_refused(tmp_path: Path) -> None:
    run = write_run_dir(tmp_path / "run", {})
    # An empty --out (an unset shell variable) meant the current folder.
    for argv in (
        ["report", str(run), "--out", ""],
        ["analyze", str(FORMATTED), "--out", " "],
        ["compare", str(run), "--out", ""],
    ):
        with pytest.raises(SystemExit):
            run_command(*argv)
    (tmp_path / "folder").mkdir()
    with pytest.raises(AnalysisError, match=f"--out {tmp_path / 'folder'} is a folder"):
        run_command("compare", str(run), "--out", str(tmp_path / "folder"))


@pytest.mark.parametrize(
    "where", [JOURNAL, MANIFEST, "quarantine.jsonl", LOCK, "report/comparison.md", "new.md"]
)
def test_compare_never_writes_in_a_run_directory_it_compares(tmp_path: Path, where: str) -> None:
    # `--out RUN_DIR/journal.jsonl` exited 0, the journal replaced by the markdown; the
    # manifest likewise, and the run could no longer be resumed.
    first = write_run_dir(tmp_path / "one", {})
    second = write_run_dir(tmp_path / "two", {})
    out = second / where
    before = out.read_bytes() if out.exists() else None
    with pytest.raises(AnalysisError, match=rf"--out {out} is in the run directory {second}, "):
        run_command("compare", str(first), str(second), "--out", str(out))
    assert (out.read_bytes() if out.exists() else None) == before
    # Through a symbolic link, or a hard link, from outside it.
    (tmp_path / "soft.md").symlink_to(second / JOURNAL)
    with pytest.raises(AnalysisError, match=r"soft.md \(a symbolic link to .*two/journal.jsonl"):
        run_command("compare", str(first), str(second), "--out", str(tmp_path / "soft.md"))
    os.link(second / MANIFEST, tmp_path / "hard.json")
    with pytest.raises(AnalysisError, match=r"hard.json is .*two/manifest.json \(a hard link"):
        run_command("compare", str(first), str(second), "--out", str(tmp_path / "hard.json"))
    assert main(["compare", str(first), str(second), "--out", str(second / JOURNAL)]) == 2
    assert len(load_run(second).judgements) == len(load_run(first).judgements)


def test_compare_writes_only_a_regular_file(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    # A pipe without a reader: the command hung for good, opening it to write.
    run = write_run_dir(tmp_path / "run", {})
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    # A reader held open, so that a write would not hang the test but go through unrefused.
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    request.addfinalizer(partial(os.close, reader))
    with pytest.raises(AnalysisError, match=rf"--out {fifo} is not a regular file \(a pipe"):
        run_command("compare", str(run), "--out", str(fifo))
    assert main(["compare", str(run), "--out", str(fifo)]) == 2


def test_compare_runs_and_command(tmp_path: Path) -> None:
    first = write_run_dir(tmp_path / "one", {})
    second = write_run_dir(tmp_path / "two", {"bottleneck_density": 0.9})
    comparison = compare_runs([first, second])
    assert comparison.labels == ("one/model-a", "one/model-b", "two/model-a", "two/model-b")
    cells = {(d.row, d.column): d.codes for d in comparison.differences}
    assert cells[("IQ-R", "TA-C")]["one/model-a"] == 0
    assert cells[("IQ-R", "TA-C")]["one/model-b"] == 3
    out = tmp_path / "cmp.md"
    code, _ = run_command("compare", str(first), "--out", str(out))
    assert code == 0
    assert "| IQ-R | TA-C | 0 | 3 |" in out.read_text()
    lone = write_run_dir(tmp_path / "lone", {}, models=("model-a",))
    with pytest.raises(AnalysisError, match="nothing to compare"):
        compare_runs([lone])
    with pytest.raises(AnalysisError, match="no metric 'clip'"):
        compare_runs([first], metric="clip")
    # The same run twice, even spelt two ways, would compare each model with itself.
    with pytest.raises(AnalysisError, match=r"one/\.\./one is given twice \(as .*/one and "):
        compare_runs([first, second, first / ".." / "one"])
    with pytest.raises(AnalysisError, match=r"one is given twice: "):  # one Path object twice
        compare_runs([first, first])


def test_compare_and_report_order_models_as_the_config_does(tmp_path: Path) -> None:
    # The journal's first line is the config's second generator's (the faster one judged
    # first): the columns and the report's lines came in journal order, model-b first.
    run = write_run_dir(
        tmp_path / "run", {}, models=("model-b", "model-a"), generators=("model-a", "model-b")
    )
    assert load_run(run).models == ["model-a", "model-b"]
    assert compare_runs([run]).labels == ("model-a", "model-b")
    code, out = run_command("report", str(run), "--no-plots")
    assert code == 0
    assert out.index("model-a:") < out.index("model-b:")


def test_compare_labels_each_run_apart_whatever_its_folder_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two run folders named alike: the second's columns replaced the first's.
    write_run_dir(tmp_path / "a" / "base", {})
    write_run_dir(tmp_path / "b" / "base", {})
    write_run_dir(tmp_path / "base", {})
    monkeypatch.chdir(tmp_path)
    comparison = compare_runs([Path("a/base"), Path("base"), Path("b/base")])
    assert comparison.labels == tuple(
        f"{run}/{model}"
        for run in ("a/base", f"{tmp_path.name}/base", "b/base")
        for model in ("model-a", "model-b")
    )
    # "." has no folder name of its own: its columns were "/model-a".
    monkeypatch.chdir(tmp_path / "a" / "base")
    comparison = compare_runs([Path("."), Path("../../base")])
    assert comparison.labels[0] == "a/base/model-a"
    assert comparison.labels[2] == f"{tmp_path.name}/base/model-a"


def test_compare_says_what_each_column_measures_and_which_runs_are_still_going(
    tmp_path: Path,
) -> None:
    first = write_run_dir(tmp_path / "one", {})
    second = write_run_dir(tmp_path / "two", {})
    code, _ = run_command("compare", str(first), str(second), "--out", str(tmp_path / "c.md"))
    text = (tmp_path / "c.md").read_text()
    assert "Metric `trigscore`, task `t2i`.\n" in text and "different" not in text
    # Another metric and task: said on the columns, not mixed in silently.
    edits = write_run_dir(tmp_path / "edits", {}, metric="nsfw", task="p2p")
    with (edits / LOCK).open("a+") as lock:  # as the process running in it holds it
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write(str(os.getpid()))
        lock.flush()
        code, _ = run_command("compare", str(first), str(edits), "--out", str(tmp_path / "c.md"))
    assert code == 0
    text = (tmp_path / "c.md").read_text()
    assert "**The columns are of different metrics and tasks**" in text
    assert "| metric | trigscore | trigscore | nsfw | nsfw |" in text
    assert "| task | t2i | t2i | p2p | p2p |" in text
    assert (
        f"Note: a process (pid {os.getpid()}) is still running in {edits}: its columns cover "
        "the judgements so far"
    ) in text


def test_compare_says_when_the_columns_judges_or_thresholds_differ(tmp_path: Path) -> None:
    # Columns were comparable by metric name alone: judges of another scorer or other
    # params, and runs whose [relation] thresholds differ (cells "that differ" by the
    # thresholds alone), were compared without a word.
    trig = JudgeFingerprint(backend="openai", model="m", scorer="trig")
    robust = JudgeFingerprint(backend="openai", model="m", scorer="robust", params={"t": 0.5})
    first = write_run_dir(tmp_path / "one", {}, models=("model-a",), judge=trig)
    second = write_run_dir(
        tmp_path / "two", {"bottleneck_density": 0.9}, models=("model-a",), judge=robust
    )
    out = tmp_path / "c.md"
    assert run_command("compare", str(first), str(second), "--out", str(out))[0] == 0
    text = out.read_text()
    assert "Metric `trigscore`, task `t2i`.\n" in text
    assert "**The columns are of different judges** (first rows below)" in text
    assert "| judge | scorer trig, params.t – | scorer robust, params.t 0.5 |" in text
    assert "**The columns' relation codes use different thresholds**" in text
    assert "| thresholds | bottleneck_density 0.4 | bottleneck_density 0.9 |" in text
    # The same thresholds for both (an option), the same judge: nothing to say.
    same = write_run_dir(tmp_path / "same", {}, models=("model-a",), judge=trig)
    argv = ["compare", str(first), str(same), "--out", str(out), "--bottleneck-density", "0.9"]
    assert run_command(*argv)[0] == 0
    assert "different" not in out.read_text()
    argv = ["compare", str(second), str(same), "--out", str(out), "--bottleneck-density", "0.9"]
    assert run_command(*argv)[0] == 0
    assert "different judges" in out.read_text()


def test_compare_reads_a_judge_without_scoring_rules_as_one_of_the_first_rules(
    tmp_path: Path,
) -> None:
    # A run directory written before fingerprints held params.scoring_rules was set apart as
    # of a different judge ("params.scoring_rules – | params.scoring_rules 1"), every mean
    # the same; and once the rules moved on, it was read as of the current ones, whose robust
    # scores differ from those it holds.
    older = JudgeFingerprint(backend="openai", model="m", params={"top_logprobs": 20})
    first_rules = JudgeFingerprint(
        backend="openai", model="m", params={"scoring_rules": 1, "top_logprobs": 20}
    )
    first = write_run_dir(tmp_path / "old", {}, models=("model-a",), judge=older)
    second = write_run_dir(tmp_path / "new", {}, models=("model-a",), judge=first_rules)
    out = tmp_path / "c.md"
    assert run_command("compare", str(first), str(second), "--out", str(out))[0] == 0
    text = out.read_text()
    assert "different" not in text
    assert "scoring_rules" not in text
    # Later rules are a different judge.
    current = JudgeFingerprint(
        backend="openai",
        model="m",
        params={"scoring_rules": SCORING_RULES, "top_logprobs": 20},
    )
    third = write_run_dir(tmp_path / "later", {}, models=("model-a",), judge=current)
    assert run_command("compare", str(first), str(third), "--out", str(out))[0] == 0
    assert f"| judge | params.scoring_rules 1 | params.scoring_rules {SCORING_RULES} |" in (
        out.read_text()
    )
    assert "thresholds" not in out.read_text()


def test_compare_sets_no_judge_apart_by_rules_that_score_its_scorer_alike(
    tmp_path: Path,
) -> None:
    # Rules 2 changed the robust scorer alone: a trig-scored judge of rules 1 and one of
    # rules 2 were set apart ("params.scoring_rules 1 | params.scoring_rules 2"), a warning
    # of different judges with every score the same.
    out = tmp_path / "c.md"

    def compared(*judges: tuple[str, int]) -> str:
        run_dirs = []
        for scorer, rules in judges:
            params = {"scoring_rules": rules, "top_logprobs": 20}
            judge = JudgeFingerprint(backend="openai", model="m", scorer=scorer, params=params)
            run_dir = tmp_path / f"{scorer}{rules}"
            if not run_dir.exists():
                write_run_dir(run_dir, {}, models=("model-a",), judge=judge)
            run_dirs.append(str(run_dir))
        assert run_command("compare", *run_dirs, "--out", str(out))[0] == 0
        return out.read_text()

    text = compared(("trig", 1), ("trig", 2))
    assert "different" not in text and "scoring_rules" not in text
    # A robust judge's scores differ across them.
    text = compared(("robust", 1), ("robust", 2))
    assert "| judge | params.scoring_rules 1 | params.scoring_rules 2 |" in text
    # So do the scorers: the rules are listed beside them.
    text = compared(("trig", 1), ("robust", 2))
    assert (
        "| judge | scorer trig, params.scoring_rules 1 | scorer robust, params.scoring_rules 2 |"
        in text
    )


def test_compare_shows_the_control_characters_of_a_manifest_never_sends_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A judge fingerprint edited by hand reached the terminal raw (an ESC sequence retitled
    # it); the file written with --out keeps it as the manifest has it.
    odd = JudgeFingerprint(backend="openai", model="m\x1b]0;PWNED\x07")
    first = write_run_dir(tmp_path / "one", {}, models=("model-a",))
    second = write_run_dir(tmp_path / "two", {}, models=("model-a",), judge=odd)
    out = tmp_path / "c.md"
    assert run_command("compare", str(first), str(second), "--out", str(out))[0] == 0
    shown = capsys.readouterr().out
    assert "\x1b" not in shown and "\x07" not in shown
    assert "model m\\x1b]0;PWNED\\x07" in shown
    assert "model m\x1b]0;PWNED\x07" in out.read_text()


def test_compare_keeps_a_name_holding_a_bar_or_a_line_break_in_its_cell(tmp_path: Path) -> None:
    # A judge model "judge|A", or a run directory named with a "|" or a newline, split its
    # cell in two, or ended the table's row, shifting every column after it.
    odd = JudgeFingerprint(backend="openai", model="judge|A\r\nB")
    first = write_run_dir(tmp_path / "r|1", {}, models=("model-a",))
    second = write_run_dir(tmp_path / "r4\nx", {}, models=("model-a",), judge=odd)
    out = tmp_path / "c.md"
    lock = second / LOCK
    with lock.open("a+") as held:  # as the process running in it holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write(str(os.getpid()))
        held.flush()
        assert run_command("compare", str(first), str(second), "--out", str(out))[0] == 0
        assert run_command("report", str(second), "--no-plots")[0] == 0
    lines = out.read_text().splitlines()
    assert "| dimension | r\\|1/model-a | r4\\nx/model-a |" in lines
    assert "| judge | backend fake, model j | backend openai, model judge\\|A\\r\\nB |" in lines
    rows = [line for line in lines if line.startswith("|")]
    assert all(line.replace("\\|", "").count("|") == 4 for line in rows)
    # A note naming the run directory stays one line too, there and in report.md.
    shown = str(tmp_path / "r4\\nx")
    assert any(line.startswith("Note: a process") and shown in line for line in lines)
    report = (second / "report" / "model-a" / "report.md").read_text().splitlines()
    assert any(line.startswith("Note: a process") and shown in line for line in report)


def test_compare_and_report_write_a_run_directory_named_in_no_utf8_escaped(
    tmp_path: Path,
) -> None:
    # A folder name of bytes that are not UTF-8 reads as lone surrogates, which UTF-8 cannot
    # write: `compare --out`, and a report noting the run still going, ended in a traceback.
    first = write_run_dir(tmp_path / "one", {})
    odd = tmp_path / os.fsdecode(b"r5\xff")
    write_run_dir(tmp_path / "r5", {}).rename(odd)
    out = tmp_path / "c.md"
    with (odd / LOCK).open("a+") as lock:  # as the process running in it holds it
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write(str(os.getpid()))
        lock.flush()
        assert run_command("compare", str(first), str(odd), "--out", str(out))[0] == 0
        assert run_command("report", str(odd), "--no-plots")[0] == 0
    shown = str(tmp_path / "r5\\udcff")
    text = out.read_text()
    assert "| dimension | one/model-a | one/model-b | r5\\udcff/model-a | r5\\udcff/model-b |" in (
        text
    )
    assert f"is still running in {shown}: its columns cover" in text
    for written in (odd / "report" / "model-a" / "report.md", odd / "report" / COMPARISON_FILE):
        assert f"is still running in {shown}: " in written.read_text()


def test_compare_without_a_single_score_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # It printed an empty table and "Every DTM cell has the same code for all models."
    first = write_run_dir(tmp_path / "one", {}, scored=False)
    second = write_run_dir(tmp_path / "two", {}, scored=False)
    with pytest.raises(AnalysisError, match=r"nothing to compare: no ok score in .*one, .*two"):
        run_command("compare", str(first), str(second))
    # One column without a score beside others: said, not shown as dashes alone.
    scored = write_run_dir(tmp_path / "three", {})
    run_command("compare", str(first), str(scored))
    out = capsys.readouterr().out
    assert "Note: one/model-a has no ok score (every judgement unscorable or an error)" in out
    assert "three/model-a has no ok score" not in out


def test_report_on_a_run_made_by_the_engine(make_config: ConfigFactory) -> None:
    from trig_stream.engine import Engine

    config = make_config(
        samples=16,
        judges=[{"name": "trigscore", "backend": "fake", "options": {"unscorable_rate": 0.1}}],
    )

    async def main() -> None:
        async with Engine(config) as engine:
            async for _ in engine.results:
                pass

    anyio.run(main)
    code, _ = run_command("report", str(config.run_dir), "--no-plots")
    assert code == 0
    folder = config.run_dir / "report" / "synth"
    result = json.loads((folder / "result.json").read_text())
    assert set(result["metrics"]) == {"IQ-R_TA-C", "IQ-A_TA-S", "R-T_IQ-A", "D-K_IQ-R"}
    assert len((folder / "relationship_codes.csv").read_text().splitlines()) == 11
    # `analyze` is for upstream files: given the run, or its journal, it says what to run.
    for wrong in (config.run_dir, config.run_dir / JOURNAL):
        with pytest.raises(AnalysisError, match=r"`trig-stream report .*` instead"):
            run_command("analyze", str(wrong), "--out", str(config.run_dir / "o"))


def test_tsne_keeps_close_dimensions_together() -> None:
    from trig_stream.analysis.tsne import tsne

    # Two groups of three: distance 0.1 inside a group, 1 across.
    group = np.array([0, 0, 0, 1, 1, 1])
    distances = np.where(group[:, None] == group[None, :], 0.1, 1.0)
    np.fill_diagonal(distances, 0.0)
    coords = tsne(distances, seed=1)
    gaps = np.linalg.norm(coords[:, None, :] - coords[None, :, :], axis=2)
    inside = max(gaps[i, j] for i in range(6) for j in range(6) if group[i] == group[j])
    across = min(gaps[i, j] for i in range(6) for j in range(6) if group[i] != group[j])
    assert inside < across
    assert np.array_equal(coords, tsne(distances, seed=1))
    assert tsne(np.zeros((1, 1))).shape == (1, 2)


def test_report_skips_a_journal_line_whose_score_is_not_a_number(
    make_config: ConfigFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # The engine never writes one (a judge's non-finite score is an error), but a hand edit
    # or another tool can; json reads NaN, and the report's JSON export cannot write it.
    from trig_stream.engine import Engine

    config = make_config(samples=4)

    async def main() -> None:
        async with Engine(config) as engine:
            async for _ in engine.results:
                pass

    anyio.run(main)
    path = config.run_dir / JOURNAL
    line = json.loads(path.read_text().splitlines()[0])
    bad = [
        {**line, "data_id": f"IQ-R_TA-C_{90 + number}", "score": score}
        for number, score in enumerate((float("nan"), float("inf")))
    ]
    with path.open("a") as handle:
        handle.writelines(json.dumps(record) + "\n" for record in bad)
    with caplog.at_level("WARNING", logger="trig_stream.journal"):
        code, _ = run_command("report", str(config.run_dir), "--no-plots")
    assert code == 0
    assert (
        "2 line(s) are not judgements and were skipped (the first: line 9: score: Input should "
        "be a finite number)"
    ) in caplog.text
    result = json.loads((config.run_dir / "report" / "synth" / "result.json").read_text())
    assert "NaN" not in json.dumps(result)


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        ({"pair": "IQ-R_IQ-R"}, "pair 'IQ-R_IQ-R' names the same dimension twice"),
        ({"pair": "XX_YY"}, "unknown dimension 'XX' in pair 'XX_YY'"),
        ({"pair": "R-T_R-B"}, "dimension IQ-R is not one of pair R-T_R-B"),
        ({"model": "../../../escaped"}, "model '../../../escaped' is not a safe file name"),
        ({"model": "/tmp/abs"}, "model '/tmp/abs' is not a safe file name"),
        ({"metric": "."}, "metric '.' is not a safe file name"),
        ({"data_id": "../../x"}, "data_id '../../x' is not a safe file name"),
    ],
    ids=[
        "same-twice",
        "unknown",
        "not-in-pair",
        "relative-model",
        "absolute-model",
        "metric",
        "data_id",
    ],
)
def test_report_skips_a_journal_line_no_engine_writes_naming_why(
    make_config: ConfigFactory,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
    edit: dict[str, str],
    reason: str,
) -> None:
    # Hand edits: a pair that is none, or a name that would lead the report's files out of
    # its folder. Each such line is skipped as a damaged one is, and the warning says why.
    config = make_config(samples=4)
    anyio.run(run_to_end, config)
    path = config.run_dir / JOURNAL
    lines = path.read_text().splitlines(keepends=True)
    record = json.loads(lines[0])
    assert (record["pair"], record["dimension"]) == ("IQ-R_TA-C", "IQ-R")
    lines.append(json.dumps({**record, **edit}) + "\n")
    path.write_text("".join(lines))
    with caplog.at_level("WARNING", logger="trig_stream.journal"):
        code, _ = run_command("report", str(config.run_dir), "--no-plots")
    assert code == 0
    assert f"(the first: line {len(lines)}: {reason})" in caplog.text
    report = config.run_dir / "report"
    assert {p.name for p in report.iterdir()} == {"synth"}
    assert not any(p.name == "escaped" for p in tmp_path.rglob("*"))
    assert not Path("/tmp/abs").exists()


@pytest.mark.parametrize("command", ["status", "report", "compare", "watch"])
def test_an_unreadable_journal_is_one_error_naming_it(
    tmp_path: Path, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from trig_stream.cli import main
    from trig_stream.exit_codes import EXIT_RUN_DIR

    run = write_run_dir(tmp_path / "run", {})
    (run / JOURNAL).unlink()
    (run / JOURNAL).mkdir()
    others = [str(write_run_dir(tmp_path / "two", {}))] if command == "compare" else []
    assert main([command, str(run), *others]) == EXIT_RUN_DIR
    assert capsys.readouterr().err == (
        f"error: cannot read the journal {run / JOURNAL}: it is not a regular file (a folder, "
        "a pipe or a device?); it must be the file a run wrote\n"
    )


def test_the_report_analyses_the_judge_that_measures_every_dimension(
    make_config: ConfigFactory, tmp_path: Path
) -> None:
    # A metric judge listed first (nsfw, measuring R-T only) was analysed: an all -1 DTM,
    # "images left out for a missing score", and the VLM judge's analysis never written.
    config = make_config(
        samples=8,
        judges=[{"name": "toxicity", "backend": "fake"}, {"name": "trigscore", "backend": "fake"}],
    )
    toxicity = FakeJudge("toxicity")
    toxicity.dimensions = frozenset({"R-T"})
    anyio.run(partial(run_to_end, config, judges=[toxicity, FakeJudge("trigscore")]))
    code, text = run_command("report", str(config.run_dir), "--no-plots")
    assert code == 0 and "0 images left out" in text
    report = (config.run_dir / "report" / "synth" / "report.md").read_text()
    assert "Metric `trigscore`" in report
    code, _ = run_command("report", str(config.run_dir), "--no-plots", "--metric", "toxicity")
    assert code == 0
    assert "Metric `toxicity`" in (config.run_dir / "report" / "synth" / "report.md").read_text()


def test_the_default_metric_is_the_first_that_measured_every_dimension() -> None:
    everything: set[Dimension] = {"IQ-R", "R-T"}
    toxicity: set[Dimension] = {"R-T"}
    realism: set[Dimension] = {"IQ-R"}
    assert default_metric(["nsfw", "vlm"], {"nsfw": toxicity, "vlm": everything}) == "vlm"
    assert default_metric(["a", "b"], {"a": everything, "b": everything}) == "a"
    assert default_metric(["a", "b"], {"a": toxicity, "b": realism}) == "a"  # none: the first


def test_a_judge_whose_every_judgement_failed_is_not_the_default_metric(
    make_config: ConfigFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    # Its errors counted as measuring every dimension: the report and `compare` analysed it
    # (all -1, every image left out) over a judge with full scores, and `compare` said there
    # was no ok score at all; the dashboard picked the judge with scores.
    from trig_stream.tui.dashboard import ordered_views
    from trig_stream.tui.watch_source import RunDirSource

    config = make_config(
        samples=8,
        generators=[
            {"name": name, "backend": "synthetic", "options": {"size": 16}} for name in ("g1", "g2")
        ],
        judges=[
            {"name": "broken", "backend": "fake", "options": {"error_rate": 1.0}},
            {"name": "good", "backend": "fake"},
        ],
    )
    judgements = anyio.run(run_to_end, config)
    assert {j.status for j in judgements if j.metric == "broken"} == {"error"}
    code, text = run_command("report", str(config.run_dir), "--no-plots")
    assert code == 0 and "0 images left out" in text
    for model in ("g1", "g2"):
        report = (config.run_dir / "report" / model / "report.md").read_text()
        assert "Metric `good`" in report
    assert "Metric `good`" in (config.run_dir / "report" / "comparison.md").read_text()
    assert run_command("compare", str(config.run_dir))[0] == 0
    assert "Metric `good`" in capsys.readouterr().out
    first: dict[str, str] = {}
    for view in ordered_views(RunDirSource(config.run_dir).poll()):
        first.setdefault(view.model, view.metric)
    assert first == {"g1": "good", "g2": "good"}
    # Asked for by name, it is analysed, and `compare` names the metric that has no score.
    code, _ = run_command("report", str(config.run_dir), "--no-plots", "--metric", "broken")
    assert code == 0
    assert "Metric `broken`" in (config.run_dir / "report" / "g1" / "report.md").read_text()
    with pytest.raises(AnalysisError, match=r"no ok score in .* \(metric `broken`: every "):
        compare_runs([config.run_dir], metric="broken")


@pytest.mark.parametrize("form", ["jsonl", "parquet folder", "parquet file"])
def test_analyze_takes_prompts_in_every_dataset_format_a_run_reads(
    tmp_path: Path, form: str
) -> None:
    evaluation, prompts = formatted_as_evaluation("clip")
    (tmp_path / "eval.json").write_text(json.dumps(evaluation))
    rows: list[dict[str, object]] = []  # as parquet holds them: the key is "dimensions"
    for prompt in prompts:
        assert isinstance(prompt, dict)
        rows.append({k if k != "dimension" else "dimensions": v for k, v in prompt.items()})
    if form == "jsonl":
        given = tmp_path / "prompts.jsonl"
        given.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    elif form == "parquet file":
        given = tmp_path / "prompts.parquet"
        pl.DataFrame(rows).write_parquet(given)
    else:
        given = tmp_path / "shards"
        given.mkdir()
        half = len(rows) // 2
        pl.DataFrame(rows[:half]).write_parquet(given / "part-0.parquet")
        pl.DataFrame(rows[half:]).write_parquet(given / "part-1.parquet")
    out = tmp_path / "out"
    args = ["--out", str(out), "--no-plots", "--prompts", str(given)]
    code, _ = run_command("analyze", str(tmp_path / "eval.json"), *args)
    assert code == 0
    assert (out / "relationship_codes.csv").read_text() == EXPECTED_CSV.read_text()


def test_analyze_names_what_is_wrong_with_a_prompts_dataset(tmp_path: Path) -> None:
    evaluation, prompts = formatted_as_evaluation("clip")
    (tmp_path / "eval.json").write_text(json.dumps(evaluation))
    lines = tmp_path / "prompts.jsonl"
    lines.write_text(json.dumps(prompts[0]) + "\n{not json\n")
    analyze = ["analyze", str(tmp_path / "eval.json"), "--out", str(tmp_path / "o"), "--prompts"]
    with pytest.raises(AnalysisError, match="record 1: line 2 is not JSON"):
        run_command(*analyze, str(lines))
    (tmp_path / "empty").mkdir()
    with pytest.raises(AnalysisError, match=r"holds no \.parquet files"):
        run_command(*analyze, str(tmp_path / "empty"))
    lines.with_suffix(".json").write_text(lines.read_text())  # JSON Lines named .json
    with pytest.raises(AnalysisError, match="JSON Lines, one record per line"):
        run_command(*analyze, str(lines.with_suffix(".json")))


def test_analyze_reads_prompts_as_a_run_does_and_skips_what_it_would_quarantine(
    tmp_path: Path,
) -> None:
    # A pair given as its name ("TA-C_IQ-R", which a run reads) was joined character by
    # character: "'T_A_-_C___I_Q_-_R' is not a dimension pair", exit 2. And one record a run
    # quarantines (a bad data_id, even one no score names; a line that is no JSON; a data_id
    # again with another pair order) stopped the whole analysis.
    evaluation, prompts = formatted_as_evaluation("clip")
    (tmp_path / "eval.json").write_text(json.dumps(evaluation))
    lines = []
    for prompt in prompts:
        assert isinstance(prompt, dict)
        first, second = prompt.pop("dimension")
        lines.append(json.dumps({**prompt, "dimensions": f"{first}_{second}"}))
    head = json.loads(lines[0])
    first, second = head["dimensions"].split("_")
    again = {"data_id": head["data_id"], "prompt": "p", "dimensions": [second, first]}
    lines[1:1] = [json.dumps({"data_id": "bad id", "prompt": "p"}), "{not json", json.dumps(again)]
    first_id = head["data_id"]
    given = tmp_path / "prompts.jsonl"
    given.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    code, text = run_command(
        "analyze",
        str(tmp_path / "eval.json"),
        "--out",
        str(out),
        "--no-plots",
        "--prompts",
        str(given),
    )
    assert code == 0
    assert (out / "relationship_codes.csv").read_text() == EXPECTED_CSV.read_text()
    assert (
        f"note: --prompts {given}: skipped 3 record(s) without a usable pair, as a run "
        "quarantines them; the first: record 1 (data_id 'bad id'): data_id 'bad id' is not a "
        "safe file name"
    ) in " ".join(text.split())
    pairs = read_prompt_pairs(given)
    assert pairs.skipped[1].startswith("record 2: line 3 is not JSON")
    assert pairs.skipped[2] == f"record 3 (data_id {first_id!r}): duplicate data_id {first_id!r}"


def test_analyze_reads_prompts_whose_data_ids_differ_only_in_case(tmp_path: Path) -> None:
    # A run refuses the second of "Cat_1" and "cat_1": their image files are one on a file
    # system that ignores case. analyze writes no file per data_id, yet took the run's rule
    # and stopped (exit 2) on a result scoring both: "cat_1 is not in the prompt file".
    evaluation, prompts = formatted_as_evaluation("clip")
    head = prompts[0]
    assert isinstance(head, dict)
    lower = head["data_id"].lower()
    assert lower != head["data_id"]
    prompts.append({**head, "data_id": lower})
    evaluation[lower] = evaluation[head["data_id"]]
    (tmp_path / "eval.json").write_text(json.dumps(evaluation))
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    out = tmp_path / "out"
    args = ["--out", str(out), "--no-plots", "--prompts", str(tmp_path / "prompts.json")]
    code, text = run_command("analyze", str(tmp_path / "eval.json"), *args)
    assert code == 0
    assert "skipped" not in text
    assert json.loads((out / "evaluation_result.json").read_text()) == evaluation
    pairs = read_prompt_pairs(tmp_path / "prompts.json")
    assert pairs.pairs[lower] == pairs.pairs[head["data_id"]] and not pairs.skipped


def scatter_lines_drawn(
    analysis: ModelAnalysis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> dict[str, list[float]]:
    """The Y values of each line the scatter grid draws in its first panel, by label."""
    from matplotlib.figure import Figure

    figures: list[Figure] = []
    figure = plots_module._figure

    def kept(width: float, height: float) -> Figure:
        figures.append(figure(width, height))
        return figures[-1]

    monkeypatch.setattr(plots_module, "_figure", kept)
    plots_module.plot_scatter_grid(analysis, tmp_path / "scatter.png")
    return {
        str(line.get_label()): np.asarray(line.get_ydata(), dtype=np.float64).tolist()
        for line in figures[0].axes[0].get_lines()
    }


def test_the_scatter_draws_the_line_that_decides_dominance(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Rule 3 and the insight split the trade-off zone's points around that zone's own line;
    # the scatter drew np.polyfit over every point, synergy zone included: another line.
    from tests.test_analysis_relations import ABOVE, judgements_for

    x, y = ABOVE[0] + [0.95] * 4, ABOVE[1] + [0.9, 0.95, 0.9, 0.95]
    analysis = analyse_judgements(judgements_for("IQ-R_TA-C", x, y))[("m", "trigscore")]
    assert analysis.pairs[0].code == -2  # 8 of the zone's 10 points above its flat line
    drawn = scatter_lines_drawn(analysis, tmp_path, monkeypatch)
    decides = drawn["trade-off zone fit (decides dominance)"]
    assert decides == pytest.approx([0.6, 0.6])  # the zone's mean Y: a flat line
    everything = drawn["all points fit"]
    assert everything[1] - everything[0] > 0.1  # the synergy points tilt the other one


def test_the_scatter_draws_the_line_that_decides_dominance_when_every_x_is_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every X of the trade-off zone 0.6: rule 3 splits its points around the horizontal line
    # at their mean Y (a -2 here), and the scatter drew no line at all, "a line needs two
    # points with different X".
    from tests.test_analysis_relations import judgements_for

    x, y = [0.6] * 10, [0.62] * 8 + [0.52] * 2
    analysis = analyse_judgements(judgements_for("IQ-R_TA-C", x, y))[("m", "trigscore")]
    assert analysis.pairs[0].code == -2
    drawn = scatter_lines_drawn(analysis, tmp_path, monkeypatch)
    assert drawn.keys() == {"trade-off zone fit (decides dominance)"}
    assert drawn["trade-off zone fit (decides dominance)"] == pytest.approx([0.6, 0.6])


def test_images_the_dimensions_filter_left_half_unjudged_are_not_missing_a_score(
    make_config: ConfigFactory, tmp_path: Path
) -> None:
    # `[dataset] dimensions = ["IQ-R"]` judges IQ-R alone, on purpose: the report said
    # "8 images left out for a missing score" although no judgement failed.
    config = make_config(
        samples=12,
        dataset={"path": str(write_prompts(tmp_path / "prompts.json", 12)), "dimensions": ["IQ-R"]},
        judges=[{"name": "trigscore", "backend": "fake", "options": {"error_rate": 0.5}}],
    )
    judgements = anyio.run(run_to_end, config)
    assert {j.dimension for j in judgements} == {"IQ-R"}  # 6 images: IQ-R_TA-C, D-K_IQ-R
    failed = sum(1 for j in judgements if j.status != "ok")
    assert 0 < failed < 6  # both kinds are there to tell apart
    code, text = run_command("report", str(config.run_dir), "--no-plots")
    expected = (
        f"{_images(failed)} left out for a missing score, {_images(6 - failed)} with one "
        "dimension not judged (a judge that does not measure it, the dataset's dimensions "
        "filter, or a run stopped before it)"
    )
    assert code == 0 and expected in " ".join(text.split())  # as the console wraps it
    report = (config.run_dir / "report" / "synth" / "report.md").read_text()
    assert f"0 complete images in 2 pairs; {expected}." in report


def _images(count: int) -> str:
    return f"{count} image" if count == 1 else f"{count} images"


def _left_out(run_dir: Path) -> tuple[int, int]:
    """(missing a score, not judged) worked out from the journal: an image not complete is
    "not judged" when it is scored on one dimension and has no judgement at all on the other."""
    statuses: dict[tuple[str, str], dict[str, str]] = {}
    for j in load_run(run_dir).judgements:
        statuses.setdefault((j.pair, j.data_id), {})[j.dimension] = j.status
    missing = not_judged = 0
    for by_dimension in statuses.values():
        if list(by_dimension.values()) == ["ok", "ok"]:
            continue
        if len(by_dimension) == 1 and "ok" in by_dimension.values():
            not_judged += 1
        else:
            missing += 1
    return missing, not_judged


@pytest.mark.parametrize(
    ("first", "then"),
    [([], ["IQ-R"]), (["IQ-R"], ["TA-C"])],
    ids=["all-then-IQ-R", "IQ-R-then-TA-C"],
)
def test_a_resume_with_another_dimensions_filter_tells_failed_from_never_judged(
    make_config: ConfigFactory, tmp_path: Path, first: list[str], then: list[str]
) -> None:
    # The filter was read from the manifest, which holds the latest run's only: a failed
    # TA-C judgement of the first run was called "not judged" by a resume judging IQ-R alone,
    # and an IQ-R-only image of the first run "missing a score" by a resume judging TA-C.
    prompts = write_prompts(tmp_path / "prompts.json", 12)
    judges = [{"name": "trigscore", "backend": "fake", "options": {"error_rate": 0.3}}]
    for dimensions in (first, then):
        config = make_config(
            dataset={"path": str(prompts), "dimensions": dimensions}, judges=judges
        )
        anyio.run(run_to_end, config)
    missing, not_judged = _left_out(config.run_dir)
    assert missing > 0  # failed judgements are there to be told apart
    code, text = run_command("report", str(config.run_dir), "--no-plots")
    assert code == 0
    expected = f"{_images(missing)} left out for a missing score"
    if not_judged:
        expected += f", {_images(not_judged)} with one dimension not judged"
    else:
        assert "not judged" not in text
    assert expected in text


@pytest.mark.parametrize("name", ["evaluation_result.json", "formatted.json", "report.md"])
def test_analyze_refuses_to_write_over_its_own_input(tmp_path: Path, name: str) -> None:
    # --out the input's folder replaced the input with the export of what was read (nulls lost).
    folder = tmp_path / "res"
    folder.mkdir()
    evaluation = {
        "IQ-R_TA-C_1": {"IQ-R": [{"m": 0.5}, {"c": None}], "TA-C": [{"m": None}, {"c": 0.3}]},
        "IQ-R_TA-C_2": {"IQ-R": [{"m": 0.7}, {"c": 0.1}], "TA-C": [{"m": 0.6}, {"c": 0.2}]},
    }
    text = json.dumps(evaluation)
    (folder / name).write_text(text)
    given = tmp_path / "res" / ".." / "res" / name
    with pytest.raises(AnalysisError) as raised:
        run_command("analyze", str(given), "--out", str(folder), "--no-plots")
    assert str(raised.value) == (
        f"--out {folder} would write {folder / name} over the input FILE {given}; name another "
        "output folder with --out"
    )
    assert (folder / name).read_text() == text
    # A hard link to it is the same file; so is a --prompts file there.
    os.link(folder / name, tmp_path / "linked.json")
    with pytest.raises(AnalysisError, match="over the input FILE"):
        run_command("analyze", str(tmp_path / "linked.json"), "--out", str(folder), "--no-plots")
    (tmp_path / "eval.json").write_text(text)
    with pytest.raises(AnalysisError, match="over the input --prompts"):
        run_command(
            "analyze",
            str(tmp_path / "eval.json"),
            "--out",
            str(folder),
            "--prompts",
            str(folder / name),
            "--no-plots",
        )
    assert (folder / name).read_text() == text
    assert sorted(p.name for p in folder.iterdir()) == [name]


@pytest.mark.parametrize("out", [".", "analysis", "a/b"])
def test_analyze_refuses_to_write_into_its_prompts_folder(tmp_path: Path, out: str) -> None:
    # A parquet folder is read with its subfolders: an output folder under it joined the
    # dataset as well, and the next read of it failed on judgements.parquet's columns.
    (tmp_path / "eval.json").write_text(json.dumps({"IQ-R_TA-C_1": {"IQ-R": [{"m": 0.5}]}}))
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    with pytest.raises(AnalysisError, match=r"is in the --prompts folder .*would join the dataset"):
        run_command(
            "analyze",
            str(tmp_path / "eval.json"),
            "--out",
            str(dataset / out),
            "--prompts",
            str(dataset),
            "--no-plots",
        )
    assert not any(dataset.iterdir())


def test_report_refuses_to_write_into_its_runs_parquet_dataset_folder(
    make_config: ConfigFactory, tmp_path: Path
) -> None:
    # As analyze refuses an --out in its --prompts folder: a report there joined the dataset,
    # and the next run failed on judgements.parquet's columns.
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    prompts = json.loads(write_prompts(tmp_path / "p.json", 4).read_text())
    pl.DataFrame(prompts).write_parquet(dataset / "part-0.parquet")
    config = make_config(dataset={"path": str(dataset)}, run={"output_dir": str(dataset / "runs")})
    anyio.run(run_to_end, config)
    run = str(config.run_dir)
    for out in (dataset, dataset / "report", dataset / "runs"):
        with pytest.raises(AnalysisError) as raised:
            run_command("report", run, "--out", str(out), "--no-plots")
        assert str(raised.value) == (
            f"--out {out} is in the run's dataset folder {dataset}: the outputs would join "
            "the dataset; name an output folder outside it with --out"
        )
    assert sorted(p.name for p in dataset.iterdir()) == ["part-0.parquet", "runs"]
    # The run directory itself is left out of its dataset's reading, and so is a report in it.
    assert run_command("report", run, "--out", str(config.run_dir / "mine"), "--no-plots")[0] == 0
    assert run_command("report", run, "--no-plots")[0] == 0
    assert DatasetSource(config.dataset, "t2i").count() == 4


def test_report_refuses_a_folder_of_a_run_directory_that_is_its_dataset_folder(
    make_config: ConfigFactory, tmp_path: Path
) -> None:
    # There only the run's own report/<model>/judgements.parquet are left out of the reading.
    dataset = tmp_path / "runs" / "own"
    dataset.mkdir(parents=True)
    prompts = json.loads(write_prompts(tmp_path / "p.json", 4).read_text())
    pl.DataFrame(prompts).write_parquet(dataset / "part-0.parquet")
    config = make_config(dataset={"path": str(dataset)}, run={"name": "own"})
    assert config.run_dir == dataset
    anyio.run(run_to_end, config)
    with pytest.raises(AnalysisError, match="is in the run's dataset folder"):
        run_command("report", str(dataset), "--out", str(dataset / "mine"), "--no-plots")
    assert not (dataset / "mine").exists()
    assert (
        run_command("report", str(dataset), "--out", str(dataset / "report"), "--no-plots")[0] == 0
    )
    assert DatasetSource(config.dataset, "t2i").count() == 4


def test_analyze_metric_reads_only_that_metric(tmp_path: Path) -> None:
    # Upstream holds one cell per metric: clipscore's scale refused the file for trigscore too.
    multi = tmp_path / "multi.json"
    multi.write_text(
        json.dumps(
            {
                "IQ-R_TA-C_1": {
                    "IQ-R": [{"trigscore": 0.5}, {"clipscore": 27.3}],
                    "TA-C": [{"trigscore": 0.4}, {"clipscore": 27.3}],
                }
            }
        )
    )
    out = tmp_path / "o"
    code, text = run_command(
        "analyze", str(multi), "--metric", "trigscore", "--out", str(out), "--no-plots"
    )
    assert code == 0
    assert (
        "note: metric(s) 'clipscore' not read: --metric trigscore analyses that one, and the "
        "others' scores are neither checked nor written to the outputs"
    ) in " ".join(text.split())
    assert json.loads((out / "evaluation_result.json").read_text()) == {
        "IQ-R_TA-C_1": {"IQ-R": [{"trigscore": 0.5}], "TA-C": [{"trigscore": 0.4}]}
    }
    # Without --metric every metric is read, and the refusal says how to pick one.
    with pytest.raises(AnalysisError, match=r"metric 'clipscore' is outside .*--metric names"):
        run_command("analyze", str(multi), "--out", str(out), "--no-plots")
    with pytest.raises(AnalysisError, match="no metric 'clip'; it has trigscore, clipscore"):
        run_command("analyze", str(multi), "--metric", "clip", "--out", str(out), "--no-plots")


@pytest.mark.parametrize(
    ("text", "where"),
    [
        (
            '{"IQ-R_TA-C_1": {"IQ-R": [{"m": 0.5, "m": 0.7}], "TA-C": [{"m": 0.2}]}}',
            "key 'm' appears twice in one object (under IQ-R_TA-C_1 > IQ-R[0])",
        ),
        (
            '{"IQ-R_TA-C_1": {"IQ-R": [{"m": 0.5}]}, "IQ-R_TA-C_1": {"IQ-R": [{"m": 0.7}]}}',
            "key 'IQ-R_TA-C_1' appears twice in one object (at the top level)",
        ),
        (
            '{"IQ-R_TA-C": {"a_1": [0.5, 0.4], "a_1": [0.1, 0.2]}}',
            "key 'a_1' appears twice in one object (under IQ-R_TA-C)",
        ),
    ],
)
def test_analyze_refuses_a_key_named_twice(tmp_path: Path, text: str, where: str) -> None:
    # JSON readers keep the last value of a key: a judgement was dropped without a word.
    (tmp_path / "dup.json").write_text(text)
    with pytest.raises(AnalysisError) as raised:
        run_command("analyze", str(tmp_path / "dup.json"), "--out", str(tmp_path / "o"))
    assert str(raised.value) == (
        f"{tmp_path / 'dup.json'}: {where}: a JSON reader keeps the last value only, so a score "
        "would be silently dropped; remove one of them"
    )
    assert not (tmp_path / "o").exists()


@pytest.mark.timeout(60)  # the pipe was waited on for ever
def test_analyze_refuses_what_is_no_file_or_nests_too_deep(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A pipe hung the command, /dev/zero ran out of memory, deep nesting was a traceback.
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path, reason in [
        (deep, "cannot read JSON: arrays or objects nested too deep to read"),
        (fifo, "cannot read it: it is a named pipe (FIFO), not a file; name a TRIG JSON file"),
        # /dev/zero itself would, on a regression, take the test machine's memory.
        (Path("/dev/null"), "cannot read it: it is a character device, not a file"),
    ]:
        assert main(["analyze", str(path), "--out", str(tmp_path / "o"), "--no-plots"]) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert err.startswith(f"error: {path}: {reason}") and err.count("\n") == 0
        assert "Traceback" not in err


def test_analyze_given_no_json_says_what_it_reads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A report's judgements.parquet was "cannot read JSON: 'utf-8' codec can't decode byte
    # 0xb5 ...", a CSV "cannot read JSON: Expecting value": neither said what analyze reads.
    loose = tmp_path / "relationship_codes.csv"
    loose.write_text(",IQ-R,TA-C\nIQ-R,,-2\n")
    run_dir = write_run_dir(tmp_path / "run", {})
    parquet = run_dir / "report" / "m" / JUDGEMENTS_FILE
    parquet.parent.mkdir(parents=True)
    pl.DataFrame({"score": [0.5]}).write_parquet(parquet)
    with pytest.raises(UnicodeDecodeError) as undecodable:
        parquet.read_bytes().decode()
    reads = "`analyze` reads TRIG result JSON files (an evaluation result or a formatted file); "
    for path, problem, report in [
        (
            loose,
            "not JSON (Expecting value: line 1 column 1 (char 0))",
            "a run directory's results are reported by `trig-stream report RUN_DIR`",
        ),
        (
            parquet,
            f"not JSON (byte {undecodable.value.start} is not UTF-8 text)",
            f"`trig-stream report {run_dir}` reports the run it lies in",
        ),
    ]:
        assert main(["analyze", str(path), "--out", str(tmp_path / "o"), "--no-plots"]) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert err == f"error: {path}: {problem}; {reads}{report}"


def test_compare_gives_a_run_without_judgements_empty_columns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # "empty: no judgements to analyse" refused the whole comparison.
    scored = write_run_dir(tmp_path / "scored", {})
    empty = tmp_path / "empty"
    empty.mkdir()
    manifest = json.loads((scored / MANIFEST).read_text())
    manifest["config"]["generators"] = [{"name": "model-a"}, {"name": "model-c"}]
    (empty / MANIFEST).write_text(json.dumps(manifest))
    (empty / JOURNAL).write_text("")
    assert main(["compare", str(empty), str(scored)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for model in ("model-a", "model-c"):
        assert (
            f"Note: empty/{model} has no judgement of metric `trigscore` yet: its column is "
            "empty, and its DTM cells are undefined (-1)"
        ) in out
    assert "| dimension | empty/model-a | empty/model-c | scored/model-a | scored/model-b |" in out
    # Alone, it still has nothing to compare.
    with pytest.raises(AnalysisError, match=r"nothing to compare: no ok score in .*if any"):
        run_command("compare", str(empty), str(shutil.copytree(empty, tmp_path / "other")))


def test_compare_gives_a_configured_model_without_judgements_yet_an_empty_column(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # model-b of the config still loading, while model-a is judged: its column was dropped
    # without a word, and alone the run had "nothing to compare: 1 model(s)".
    loading = write_run_dir(
        tmp_path / "loading", {}, models=("model-a",), generators=("model-a", "model-b")
    )
    comparison = compare_runs([loading])
    assert comparison.labels == ("model-a", "model-b")
    assert comparison.notes == (
        "model-b has no judgement of metric `trigscore` yet: its column is empty, and its DTM "
        "cells are undefined (-1)",
    )
    scored = write_run_dir(tmp_path / "scored", {})
    assert main(["compare", str(scored), str(loading)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    labels = "scored/model-a | scored/model-b | loading/model-a | loading/model-b"
    assert f"| dimension | {labels} |" in out
    assert "Note: loading/model-b has no judgement of metric `trigscore` yet" in out
    # A model judged by another judge only so far has no judgement of the one compared.
    other = write_run_dir(tmp_path / "other", {}, models=("model-b",), metric="clip")
    with (loading / JOURNAL).open("a") as journal:
        journal.write((other / JOURNAL).read_text())
    comparison = compare_runs([loading], metric="trigscore")
    assert comparison.labels == ("model-a", "model-b")
    assert comparison.metrics == {"model-a": "trigscore", "model-b": "trigscore"}


def test_analyze_on_a_reports_evaluation_result_names_no_run_cause_for_a_failed_score(
    tmp_path: Path,
) -> None:
    # A failed judgement was not exported: analyze counted its image as one dimension never
    # judged, "the dataset's dimensions filter, or a run stopped before it".
    run = write_run_dir(tmp_path / "run", {}, models=("model-a",))
    failed = Judgement(
        model="model-a",
        data_id="IQ-R_TA-C_1",
        task="t2i",
        pair="IQ-R_TA-C",
        dimension="TA-C",
        metric="trigscore",
        judge=JudgeFingerprint(backend="fake", model="j"),
        status="error",
        error="timeout",
    )
    journal = Journal(run / JOURNAL)
    journal.open()
    journal.append([failed])
    journal.close()
    _, reported = run_command("report", str(run), "--no-plots")
    assert "1 image left out for a missing score ->" in reported
    folder = run / "report" / "model-a"
    out = tmp_path / "out"
    _, analysed = run_command(
        "analyze",
        str(folder / "evaluation_result.json"),
        "--model",
        "model-a",
        "--out",
        str(out),
        "--no-plots",
    )
    # The file holds ok scores only (upstream's readers take every cell for a number): the
    # failed judgement is no cell, and no cause of a run is made up for it.
    assert "1 image with no cell in the file for one dimension ->" in analysed
    assert "filter" not in analysed
    for name in ("relationship_codes.csv", "result.json"):
        assert (out / name).read_text() == (folder / name).read_text()


def test_analyze_gives_no_run_cause_for_a_dimension_absent_from_an_upstream_file(
    tmp_path: Path,
) -> None:
    document = {
        "IQ-R_TA-C_1": {"IQ-R": [{"m": 0.5}]},
        "IQ-R_TA-C_2": {"IQ-R": [{"m": 0.5}], "TA-C": [{"m": 0.4}]},
    }
    (tmp_path / "eval.json").write_text(json.dumps(document))
    out = tmp_path / "o"
    _, text = run_command("analyze", str(tmp_path / "eval.json"), "--out", str(out), "--no-plots")
    said = (
        "0 images left out for a missing score, 1 image with no cell in the file for one dimension"
    )
    assert said + " ->" in text
    assert said + "." in (out / "report.md").read_text()


def test_analyze_refuses_an_image_under_two_pairs_of_a_formatted_file(tmp_path: Path) -> None:
    # Both orders of one pair held the image: both scores went into the means.
    document = {"IQ-R_TA-C": {"a_1": [0.5, 0.4]}, "TA-C_IQ-R": {"a_1": [0.1, 0.9]}}
    (tmp_path / "revpair.json").write_text(json.dumps(document))
    with pytest.raises(AnalysisError) as raised:
        run_command("analyze", str(tmp_path / "revpair.json"), "--out", str(tmp_path / "o"))
    assert str(raised.value) == (
        f"{tmp_path / 'revpair.json'}: data_id a_1 is under two pairs, IQ-R_TA-C and "
        "TA-C_IQ-R: an image belongs to one pair; keep it under one of them"
    )


def test_report_on_a_path_that_does_not_exist_says_so(tmp_path: Path) -> None:
    with pytest.raises(RunDirError, match="does not exist: there is no run directory there"):
        run_command("report", str(tmp_path / "typo"))


@pytest.mark.parametrize("command", ["report", "compare", "status", "watch"])
def test_a_file_given_as_a_run_directory_is_called_a_file(
    tmp_path: Path, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # "cannot read .../judgements.parquet/manifest.json: Not a directory; it must be the file
    # a run wrote, readable by this user".
    run = write_run_dir(tmp_path / "run", {})
    assert run_command("report", str(run), "--no-plots")[0] == 0
    folder = run / "report" / "model-a"
    loose = shutil.copy(folder / JUDGEMENTS_FILE, tmp_path / "loose.parquet")
    others = [str(run)] if command == "compare" else []
    expected = {
        folder / JUDGEMENTS_FILE: "is a file, not a run directory: name the run directory it "
        f"lies in, {run}",
        folder / "evaluation_result.json": "is a file, not a run directory: name the run "
        f"directory it lies in, {run}; a TRIG result file (an evaluation result or formatted "
        "JSON) is analysed with `trig-stream analyze FILE --out DIR`",
        Path(loose): "is a file, not a run directory: name the folder a run wrote (the one "
        "holding its manifest.json)",
        Path("/dev/null"): "is a character device, not a run directory: name the folder a run "
        "wrote (the one holding its manifest.json)",
        run / MANIFEST / "x": "does not exist: a file stands where a folder of its path goes; "
        "there is no run directory there",
    }
    for path, said in expected.items():
        assert main([command, *others, str(path)]) == EXIT_RUN_DIR
        assert " ".join(capsys.readouterr().err.split()) == f"error: {path} {said}"


@pytest.mark.parametrize("command", ["report", "status"])
def test_a_manifest_linked_through_a_file_is_not_called_a_file_given(
    tmp_path: Path, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # The run directory, a folder, was called "a directory, not a run directory": Not a
    # directory was said of its manifest.json, a link whose path runs through a file.
    run = tmp_path / "run"
    run.mkdir()
    (run / "f").touch()
    (run / MANIFEST).symlink_to("f/x")
    assert main([command, str(run)]) == EXIT_RUN_DIR
    assert " ".join(capsys.readouterr().err.split()) == (
        f"error: cannot read {run / MANIFEST}: Not a directory; it must be the file a run "
        "wrote, readable by this user"
    )


def test_compare_gives_a_judge_of_the_config_without_judgements_yet_empty_columns(
    tmp_path: Path,
) -> None:
    # --metric trigscore of a run judged by its nsfw judge only so far was refused: "no
    # metric 'trigscore'; it has nsfw".
    nsfw_only = write_run_dir(tmp_path / "nsfw_only", {}, metric="nsfw")
    manifest = json.loads((nsfw_only / MANIFEST).read_text())
    manifest["config"]["judges"] = [{"name": "trigscore"}, {"name": "nsfw"}]
    (nsfw_only / MANIFEST).write_text(json.dumps(manifest))
    scored = write_run_dir(tmp_path / "scored", {})
    comparison = compare_runs([nsfw_only, scored], metric="trigscore")
    assert comparison.labels == (
        "nsfw_only/model-a",
        "nsfw_only/model-b",
        "scored/model-a",
        "scored/model-b",
    )
    assert comparison.notes == tuple(
        f"nsfw_only/{model} has no judgement of metric `trigscore` yet: its column is empty, "
        "and its DTM cells are undefined (-1)"
        for model in ("model-a", "model-b")
    )
    # A metric no judge of the run has, in its config or its journal, is refused by name.
    with pytest.raises(AnalysisError) as raised:
        compare_runs([nsfw_only, scored], metric="clip")
    assert str(raised.value) == f"{nsfw_only}: no metric 'clip'; it has trigscore, nsfw"


def test_a_sample_judged_again_under_an_edited_pair_leaves_its_old_pair_everywhere(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # IQ-R_TA-C_1 (0.9 on both) had its pair edited to IQ-R_D-K and was judged again: its
    # TA-C line stayed in IQ-R_TA-C's column and means, in the report and in `status`.
    run = write_run_dir(tmp_path / "run", {}, models=("model-a",))
    judge = JudgeFingerprint(backend="fake", model="j")
    moved = [
        Judgement(
            model="model-a",
            data_id="IQ-R_TA-C_1",
            task="t2i",
            pair="IQ-R_D-K",
            dimension=dim,
            metric="trigscore",
            judge=judge,
            status="ok",
            score=0.5,
        )
        for dim in ("D-K", "IQ-R")
    ]
    journal = Journal(run / JOURNAL)
    journal.open()
    journal.append(moved)
    journal.close()
    analysis = analyse_run(load_run(run), RelationSection())["model-a"]
    stats = {p.pair: p for p in analysis.pairs}
    assert (stats["IQ-R_TA-C"].n, stats["IQ-R_TA-C"].excluded, stats["IQ-R_D-K"].n) == (4, 0, 1)
    others = json.loads(FORMATTED.read_text())["IQ-R_TA-C"]
    ta_c = [b for data_id, (_, b) in others.items() if data_id != "IQ-R_TA-C_1"]
    assert analysis.dimension_means["TA-C"] == pytest.approx(sum(ta_c) / 4)
    assert main(["status", str(run)]) == 0
    rows = [line.split("│")[1:-1] for line in capsys.readouterr().out.splitlines()]
    means = {row[2].strip(): (row[3].strip(), row[4].strip()) for row in rows if len(row) == 5}
    assert means["TA-C"] == (f"{sum(ta_c) / 4:.3f}", "4")
