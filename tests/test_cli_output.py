"""What the command writes, and where: a reader that goes away, closed or redirected
standard streams, a locale that cannot encode a message, names never cut short."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_cli import write_config
from trig_stream.cli import EXIT_OK

COMMAND = [sys.executable, "-m", "trig_stream"]
SAFETY_S = 120
"""A safety net: these commands take seconds; one that hangs fails the test."""


def gone_reader() -> int:
    """The write end of a pipe whose reader has gone: the first write to it fails (EPIPE)."""
    read, write = os.pipe()
    os.close(read)
    return write


def run_with_gone_reader(args: list[str], *, stream: str, **popen: object) -> int:
    """Run the command with ``stream`` (stdout or stderr) writing to a pipe nobody reads."""
    write = gone_reader()
    try:
        process = subprocess.run([*COMMAND, *args], timeout=SAFETY_S, **{stream: write}, **popen)
    finally:
        os.close(write)
    return process.returncode


def test_a_run_whose_reader_has_gone_finishes_with_its_report(tmp_path: Path) -> None:
    # `trig-stream run cfg 2>&1 | head -2`: the first failed write ended the event loop midway,
    # and the command hung, waiting for the run's worker threads, or exited 1 half done.
    path = write_config(tmp_path, samples=8)
    code = run_with_gone_reader(
        ["run", str(path), "--headless"], stream="stderr", stdout=subprocess.DEVNULL
    )
    assert code == EXIT_OK
    run_dir = tmp_path / "runs" / "cli"
    assert len((run_dir / "journal.jsonl").read_text().splitlines()) == 16
    assert (run_dir / "report" / "synth").is_dir()


@pytest.mark.parametrize("command", ["status", "watch"])
def test_a_command_whose_reader_has_gone_exits_as_it_would_have(
    tmp_path: Path, command: str
) -> None:
    path = write_config(tmp_path, samples=4)
    finished = subprocess.run(
        [*COMMAND, "run", str(path), "--headless", "--no-report"],
        capture_output=True,
        timeout=SAFETY_S,
    )
    assert finished.returncode == EXIT_OK, finished.stderr
    run_dir = str(tmp_path / "runs" / "cli")
    code = run_with_gone_reader([command, run_dir], stream="stdout", stderr=subprocess.PIPE)
    assert code == EXIT_OK


def test_validate_whose_reader_has_gone_exits_as_it_would_have(tmp_path: Path) -> None:
    path = write_config(tmp_path, samples=4)
    code = run_with_gone_reader(["validate", str(path)], stream="stdout")
    assert code == EXIT_OK
