"""kill -9 of ``trig-stream run`` at random moments, resumed each time: nothing lost or doubled.

The run uses the synthetic generator and the fake judge (with some permanent errors and
transient failures), both deterministic, so the resumed run's journal must end up holding
every (model, data_id, dimension, metric) exactly once, with the same statuses and scores as
an uninterrupted run, and hence the same DTM. ``bench/kill_resume.py`` does the same with 20
kills at random times on a larger run.

The kills are placed by the journal's growth (a bounded poll of its line count), not by time.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio

from tests.conftest import write_prompts
from trig_stream.analysis import analyse_judgements
from trig_stream.analysis.relations import ModelAnalysis
from trig_stream.config import load_config
from trig_stream.engine import Engine
from trig_stream.exit_codes import EXIT_OK
from trig_stream.journal import JOURNAL, latest_judgements
from trig_stream.records import Judgement, JudgementKey

SAMPLES = 80
KILLS = 5
POLL_S = 0.005
DEADLINE_S = 60.0

CONFIG = """\
[run]
name = "{name}"
output_dir = "runs"

[dataset]
path = "prompts.json"

[[generators]]
name = "synth"
backend = "synthetic"
workers = 2
batch_size = 3
options = {{ size = 16 }}

[[generators]]
name = "other"
backend = "synthetic"
options = {{ size = 16 }}

[[judges]]
backend = "fake"
concurrency = 3
options = {{ latency_s = {latency}, error_rate = 0.05, retryable_rate = 0.2 }}

[engine]
sample_buffer = 2
image_buffer = 4
judgement_buffer = 8
backoff_initial = 0.001
backoff_max = 0.002
"""


def journal_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def kill_when_grown(process: subprocess.Popen[bytes], journal: Path, grow_by: int) -> bool:
    """SIGKILL ``process`` once the journal has ``grow_by`` more lines; False if it ended."""
    target = journal_lines(journal) + grow_by
    deadline = time.monotonic() + DEADLINE_S
    while process.poll() is None:
        if journal_lines(journal) >= target:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
            return True
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(POLL_S)  # a bounded poll of a real condition, not a timing assumption
    return False


def comparable(analysis: ModelAnalysis) -> dict[str, Any]:
    """The analysis with pairs keyed by name (their order follows the journal's)."""
    return {
        "dtm": analysis.dtm,
        "pairs": {p.pair: dataclasses.asdict(p) for p in analysis.pairs},
        "means": analysis.dimension_means,
        "counts": analysis.dimension_counts,
    }


def assert_close(left: Any, right: Any, where: str = "") -> None:
    """Equal, except that floats may differ in the last bits (summation order) or be NaN."""
    if isinstance(left, dict) and isinstance(right, dict):
        assert left.keys() == right.keys(), where
        for key in left:
            assert_close(left[key], right[key], f"{where}.{key}")
    elif isinstance(left, float) and isinstance(right, float):
        assert (math.isnan(left) and math.isnan(right)) or math.isclose(
            left, right, rel_tol=1e-9, abs_tol=1e-12
        ), f"{where}: {left} != {right}"
    else:
        assert left == right, where


def test_kill_9_at_random_moments_then_resume_loses_and_doubles_nothing(tmp_path: Path) -> None:
    write_prompts(tmp_path / "prompts.json", SAMPLES)
    killed = tmp_path / "killed.toml"
    killed.write_text(CONFIG.format(name="killed", latency=0.01))
    command = [sys.executable, "-m", "trig_stream", "run", str(killed), "--headless"]
    command.append("--no-report")
    journal = tmp_path / "runs" / "killed" / JOURNAL
    rng = random.Random(7)
    kills = 0
    for _ in range(KILLS):
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if not kill_when_grown(process, journal, rng.randrange(1, 30)):
            break
        kills += 1
    assert kills >= 3, "the run finished before it could be killed: make it longer"
    done = subprocess.run(command, capture_output=True, timeout=120)
    assert done.returncode == EXIT_OK, done.stderr.decode()

    reference = tmp_path / "reference.toml"
    reference.write_text(CONFIG.format(name="reference", latency=0.0))

    async def uninterrupted() -> None:
        async with Engine(load_config(reference)) as engine:
            await engine.drain()

    anyio.run(uninterrupted)

    lines = [
        Judgement.model_validate_json(line) for line in journal.read_text().splitlines() if line
    ]
    counts = Counter(j.key for j in lines)
    doubled = {key: n for key, n in counts.items() if n > 1}
    assert not doubled, f"judged more than once: {doubled}"
    got = latest_judgements(journal)
    expected = latest_judgements(tmp_path / "runs" / "reference" / JOURNAL)
    assert len(expected) == SAMPLES * 2 * 2
    assert got.keys() == expected.keys()

    def outcome(j: Judgement) -> tuple[object, ...]:
        return (j.status, j.score, j.error, j.seed, j.image)

    differ: dict[JudgementKey, tuple[object, object]] = {
        key: (outcome(got[key]), outcome(expected[key]))
        for key in got
        if outcome(got[key]) != outcome(expected[key])
    }
    assert not differ, f"outcomes differ from the uninterrupted run: {list(differ.items())[:3]}"
    assert Counter(j.status for j in got.values())["error"] > 0  # the errors survived resumes

    ours = analyse_judgements(got.values())
    theirs = analyse_judgements(expected.values())
    assert ours.keys() == theirs.keys() == {("synth", "trigscore"), ("other", "trigscore")}
    for key in ours:
        assert_close(comparable(ours[key]), comparable(theirs[key]), str(key))


def test_kill_9_during_start_up_then_resume(tmp_path: Path) -> None:
    """A kill during start-up (manifest and lock written, nothing judged) leaves a resumable
    directory: the lock of the dead process does not refuse the next run."""
    write_prompts(tmp_path / "prompts.json", 8)
    config = tmp_path / "run.toml"
    config.write_text(CONFIG.format(name="early", latency=0.0))
    command = [sys.executable, "-m", "trig_stream", "run", str(config), "--headless"]
    process = subprocess.Popen(
        [*command, "--no-report"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    assert process.stderr is not None
    for line in process.stderr:  # the run directory is open and locked once this is printed
        if line.startswith(b"run directory:"):
            break
    journal = tmp_path / "runs" / "early" / JOURNAL
    if process.poll() is None:
        os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    done = subprocess.run([*command, "--no-report"], capture_output=True, timeout=120)
    assert done.returncode == EXIT_OK, done.stderr.decode()
    keys = Counter(
        Judgement.model_validate_json(line).key for line in journal.read_text().splitlines()
    )
    assert len(keys) == 8 * 2 * 2 and set(keys.values()) == {1}
