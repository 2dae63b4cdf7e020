"""``trig-stream watch``: following a run directory that another process writes, read-only."""

from __future__ import annotations

import argparse
import fcntl
import functools
import io
import json
import logging
import os
import pty
import shutil
import signal
import struct
import subprocess
import sys
import termios
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from rich.console import Console

from tests.conftest import ROOT, ConfigFactory, unblocked_after, write_prompts
from tests.test_cli import read_terminal
from tests.test_engine import run_to_end
from trig_stream import Engine
from trig_stream.backends.base import JudgeReply, JudgeRequest
from trig_stream.cli import main
from trig_stream.config import RunConfig, load_config
from trig_stream.dataset import DatasetSource
from trig_stream.errors import RunDirError
from trig_stream.exit_codes import EXIT_INTERRUPTED, EXIT_OK, EXIT_RUN_DIR
from trig_stream.journal import JOURNAL, latest_judgements, read_journal, read_journal_lines
from trig_stream.locks import Writer, find_writer
from trig_stream.manifest import Manifest, read_manifest
from trig_stream.quarantine_text import QUARANTINE, QUARANTINE_PARTIAL
from trig_stream.records import JudgeFingerprint, Judgement, QuarantinedRecord
from trig_stream.signals import terminal_hung_up
from trig_stream.stats import ERRORS_KEPT
from trig_stream.store import RunDir
from trig_stream.testing import FakeJudge
from trig_stream.testing.fake_judge import FakeJudgeOptions
from trig_stream.tui import watch as watch_module
from trig_stream.tui.app import TrigDashboardApp
from trig_stream.tui.dashboard import Panel
from trig_stream.tui.render import judge_loads, progress_table, run_info, status_line
from trig_stream.tui.snapshot import DashboardSnapshot
from trig_stream.tui.watch import add_watch_command, describe, follow
from trig_stream.tui.watch_source import READ_CHUNK, JournalTail, RunDirSource

pytestmark = pytest.mark.anyio

RUN_DIR_FILES = {"manifest.json", "journal.jsonl", "quarantine.jsonl", "run.lock", "images"}


@pytest.fixture
def anyio_backend() -> str:
    """Textual runs on asyncio only."""
    return "asyncio"


def write_config(tmp_path: Path, samples: int) -> Path:
    prompts = write_prompts(tmp_path / "prompts.json", samples)
    config = tmp_path / "watched.toml"
    config.write_text(
        f"""
[run]
name = "watched"
output_dir = "{tmp_path / "runs"}"

[dataset]
path = "{prompts}"

[[generators]]
name = "synth-a"
backend = "synthetic"
options = {{ size = 16 }}

[[generators]]
name = "synth-b"
backend = "synthetic"
options = {{ size = 16, failure_rate = 0.1 }}

[[judges]]
name = "trigscore"
backend = "fake"
concurrency = 2
options = {{ latency_s = 0.02, error_rate = 0.05, unscorable_rate = 0.05 }}
"""
    )
    return config


def expected_counts(run_dir: Path) -> dict[str, tuple[int, int, int]]:
    counts: Counter[tuple[str, str]] = Counter(
        (j.model, j.status) for j in latest_judgements(run_dir / JOURNAL).values()
    )
    models = {model for model, _ in counts}
    return {m: (counts[(m, "ok")], counts[(m, "unscorable")], counts[(m, "error")]) for m in models}


async def wait_until(condition: Callable[[], bool], within_s: float = 30.0) -> None:
    """Poll a real condition (not a fixed delay) until it holds."""
    with anyio.fail_after(within_s):
        while True:
            if condition():
                return
            await anyio.sleep(0.01)


async def test_watch_follows_a_run_written_by_another_process(tmp_path: Path) -> None:
    config = write_config(tmp_path, samples=40)
    run_dir = tmp_path / "runs" / "watched"
    command = [sys.executable, "-m", "trig_stream", "run", str(config), "--headless"]
    process = await anyio.open_process(
        [*command, "--no-report"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        await wait_until(lambda: (run_dir / "manifest.json").exists())
        app = TrigDashboardApp(RunDirSource(run_dir), refresh_every_s=0.02)
        seen: list[int] = []
        states: set[str] = set()
        async with app.run_test(size=(120, 40)):
            dashboard = app.dashboard

            def progressed() -> bool:
                if dashboard.snapshot is not None:
                    seen.append(dashboard.snapshot.judged)
                    states.add(dashboard.snapshot.state)
                return process.returncode is not None

            await wait_until(progressed)
            assert process.returncode == 0
            total = sum(sum(c) for c in expected_counts(run_dir).values())

            def caught_up() -> bool:
                snapshot = dashboard.snapshot
                return snapshot is not None and snapshot.finished and snapshot.judged == total

            await wait_until(caught_up)
            final = dashboard.snapshot
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
    # The counts grew while the run was going, and never went down.
    assert "running" in states
    assert len({n for n in seen if 0 < n < total}) >= 2
    assert seen == sorted(seen)
    assert final is not None
    assert {m.name: (m.ok, m.unscorable, m.error) for m in final.models} == expected_counts(run_dir)
    assert total == 160
    assert final.relations and final.relations[0].dtm is not None
    # Read-only: the writer ran to the end beside the viewer, which left nothing behind.
    assert {p.name for p in run_dir.iterdir()} <= RUN_DIR_FILES
    assert find_writer(run_dir) is None


def judgement(index: int) -> Judgement:
    return Judgement(
        model="m",
        data_id=f"IQ-R_TA-C_{index}",
        task="t2i",
        pair="IQ-R_TA-C",
        dimension="IQ-R",
        metric="trigscore",
        status="ok",
        judge=JudgeFingerprint(backend="fake", model="fake"),
        score=0.5,
    )


def test_journal_tail_waits_for_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / JOURNAL
    tail = JournalTail(path)
    assert tail.read() == []
    first, second = (judgement(i).model_dump_json().encode() + b"\n" for i in (1, 2))
    path.write_bytes(first + second[:25])
    assert [j.data_id for j in tail.read()] == ["IQ-R_TA-C_1"]
    assert tail.read() == []
    with path.open("ab") as handle:
        handle.write(second[25:] + b"not json\n")
    assert [j.data_id for j in tail.read()] == ["IQ-R_TA-C_2"]
    assert tail.bad_lines == 1
    assert tail.first_problem.startswith("line 3: Invalid JSON")
    assert tail.offset == path.stat().st_size


def test_journal_tail_names_the_line_of_its_first_bad_line_as_status_does(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # watch said "(the first: Invalid JSON: expected value at line 1 column 1)" of a journal's
    # ninth line, read as its first; status says "(the first: line 9: ...)".
    path = tmp_path / JOURNAL
    tail = JournalTail(path, chunk=64)  # shorter than a line: each read ends inside one

    def read_on() -> list[str]:
        read = [j.data_id for j in tail.read()]
        while tail.behind:
            read += [j.data_id for j in tail.read()]
        return read

    path.write_bytes(lines_of(*(judgement(i) for i in range(3))))
    assert len(read_on()) == 3
    with path.open("ab") as handle:
        handle.write(lines_of(judgement(3)) + b"garbage line\n" + b"{}\n")
    assert read_on() == ["IQ-R_TA-C_3"]
    assert tail.first_problem.startswith("line 5: Invalid JSON")
    with caplog.at_level(logging.WARNING):
        assert len(list(read_journal(path))) == 4
    assert f"(the first: {tail.first_problem})" in caplog.text
    # Read again from its start (cut by a resume): the lines are counted anew.
    path.write_bytes(b"{}\n")
    tail.read()
    assert tail.restarted and tail.first_problem.startswith("line 1: ")


def test_journal_tail_numbers_lines_as_the_run_and_status_do(tmp_path: Path) -> None:
    # The manifest says where a run's lines start, counted as the run reads the journal
    # (at "\n" alone, lines that are no judgements included): the viewer counts so too.
    path = tmp_path / JOURNAL
    lines = [judgement(i).model_dump_json().encode() for i in range(4)]
    path.write_bytes(
        lines[0] + b"\r\n" + b"no\rjudgement\n\n" + lines[1] + b"\n" + lines[2] + b"\n"
    )
    tail = JournalTail(path)
    assert [(n, j.data_id) for n, j in tail.read_lines()] == [
        (0, "IQ-R_TA-C_0"),
        (3, "IQ-R_TA-C_1"),
        (4, "IQ-R_TA-C_2"),
    ]
    with path.open("ab") as handle:
        handle.write(lines[3] + b"\n")
    assert [(n, j.data_id) for n, j in tail.read_lines()] == [(5, "IQ-R_TA-C_3")]
    assert [(n, j.data_id) for n, j in read_journal_lines(path)] == [
        (0, "IQ-R_TA-C_0"),
        (3, "IQ-R_TA-C_1"),
        (4, "IQ-R_TA-C_2"),
        (5, "IQ-R_TA-C_3"),
    ]


def test_watch_counts_what_the_report_would_count_and_names_lines_it_skips(
    tmp_path: Path,
) -> None:
    # A line whose model is no safe name is skipped by the report: the viewer skips it too,
    # and says so, where before it showed nothing of it.
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "manifest.json").write_text('{"run_name": "r", "task": "t2i"}')
    escaping = judgement(2).model_copy(update={"model": "../x"})
    (run_dir / JOURNAL).write_bytes(
        b"".join(j.model_dump_json().encode() + b"\n" for j in (judgement(1), escaping))
    )
    snapshot = RunDirSource(run_dir).poll()
    assert snapshot.judged == 1
    assert (
        "1 journal line(s) are not judgements and were skipped (the first: line 2: model '../x' "
        "is not a safe file name)"
    ) in snapshot.message


def test_watch_command_without_a_terminal_prints_the_final_counts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "manifest.json").write_text('{"run_name": "r", "task": "t2i"}')
    (run_dir / JOURNAL).write_bytes(judgement(1).model_dump_json().encode() + b"\n")
    parser = argparse.ArgumentParser()
    add_watch_command(parser.add_subparsers())
    args = parser.parse_args(["watch", str(run_dir), "--interval", "0.01"])
    assert args.handler(args, Console(stderr=True)) == 0
    assert "[finished] r (t2i) | m: ok 1, unscorable 0, error 0" in capsys.readouterr().out
    assert sorted(p.name for p in run_dir.iterdir()) == ["journal.jsonl", "manifest.json"]
    for interval in ("0", "nan", "inf", "1e300"):  # the last three crashed its first sleep
        with pytest.raises(SystemExit):
            parser.parse_args(["watch", str(run_dir), "--interval", interval])


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_stop_signal_closes_watch_without_a_terminal_exit_130(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, signum: signal.Signals
) -> None:
    # Without a terminal, SIGTERM and SIGHUP killed watch by the signal (exit 143, 129).
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "manifest.json").write_text('{"run_name": "r", "task": "t2i"}')
    (run_dir / JOURNAL).write_bytes(judgement(1).model_dump_json().encode() + b"\n")

    def signalled(snapshot: Any) -> str:
        os.kill(os.getpid(), signum)  # as it prints its first line
        return "line"

    leaked: list[int] = []
    silenced: list[bool] = []
    monkeypatch.setattr(watch_module, "describe", signalled)
    monkeypatch.setattr(watch_module, "full_screen_possible", lambda: False)
    monkeypatch.setattr("trig_stream.signals.silence_the_terminal", lambda: silenced.append(True))
    # Without the fix, this handler gets the signal (the run is finished: watch exits 0).
    previous = signal.signal(signum, lambda number, _: leaked.append(number))
    try:
        assert main(["watch", str(run_dir)]) == EXIT_INTERRUPTED
    finally:
        signal.signal(signum, previous)
    assert leaked == []
    assert silenced == ([True] if signum == signal.SIGHUP else [])


def test_watch_without_a_terminal_warns_once_of_lines_it_skips(tmp_path: Path) -> None:
    run_dir = write_run_dir(tmp_path)
    with (run_dir / JOURNAL).open("ab") as journal:
        journal.write(b"not json\n" + judgement(2).model_dump_json().encode() + b"\n{}\n")
    out = io.StringIO()
    with (run_dir / "run.lock").open("a+") as lock:  # running: polled more than once
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write(str(os.getpid()))
        lock.flush()
        follow(RunDirSource(run_dir), Console(file=out, width=80), interval_s=0.001, max_polls=3)
    assert out.getvalue().startswith(
        f"warning: {run_dir / JOURNAL}: 2 line(s) are not judgements and were skipped (the "
        "first: line 2: Invalid JSON"
    )
    assert out.getvalue().count("warning") == 1
    assert "[running] r (t2i) | m: ok 2, unscorable 0, error 0" in out.getvalue()


def test_watch_interval_that_is_no_number_is_named_so(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # argparse named the function reading it: "invalid _positive value: 'abc'".
    parser = argparse.ArgumentParser()
    add_watch_command(parser.add_subparsers())
    with pytest.raises(SystemExit):
        parser.parse_args(["watch", "run", "--interval", "abc"])
    assert "argument --interval: not a number of seconds: 'abc'\n" in capsys.readouterr().err


def write_run_dir(tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    first = judgement(1)
    manifest = Manifest(  # one that describes its journal, which a run resuming it checks
        run_name="r",
        task="t2i",
        generators={first.model: {"backend": "synthetic"}},
        judges={first.metric: first.judge.model_dump(mode="json")},
    )
    (run_dir / "manifest.json").write_text(manifest.model_dump_json())
    (run_dir / JOURNAL).write_bytes(first.model_dump_json().encode() + b"\n")
    return run_dir


CONTROLS = ("\x1b", "\x07", "\x9b")


def test_control_characters_of_a_manifest_are_shown_never_sent_to_the_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A manifest edited by hand ("run_name": "syn\u001b]0;PWNED\u0007") retitled the
    # terminal of whoever watched the run or asked its status: its names reached it raw.
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    judge = {"name": "judge\x1b[2J", "backend": "fake\x9b1m", "options": {"base_url": "u\x07"}}
    manifest = Manifest(
        run_name="syn\x1b]0;PWNED\x07",
        task="t2i\x1b[31m",
        generators={"gen\x1b[5m": {}},
        config={"generators": [{"name": "gen\x1b[5m"}], "judges": [judge]},
    )
    (run_dir / "manifest.json").write_text(manifest.model_dump_json())
    (run_dir / JOURNAL).write_bytes(lines_of(judgement(1)))
    snapshot = RunDirSource(run_dir).poll()
    shown = {
        "watch": describe(snapshot),
        "status line": status_line(snapshot, linger=False).plain,
        "run panel": run_info(snapshot).plain,
        "progress": progress_table(snapshot.models).plain,
        "judges": judge_loads(snapshot).plain,
    }
    assert main(["watch", str(run_dir), "--interval", "0.01"]) == EXIT_OK
    shown["watch command"] = capsys.readouterr().out
    assert main(["status", str(run_dir)]) == EXIT_OK
    shown["status command"] = capsys.readouterr().out
    for where, text in shown.items():
        assert not any(c in text for c in CONTROLS), (where, text)
    assert "syn\\x1b]0;PWNED\\x07 (t2i\\x1b[31m)" in shown["watch command"]
    assert "task t2i\\x1b[31m" in shown["status line"]
    assert "gen\\x1b[5m" in shown["progress"]
    assert "judge\\x1b[2J (fake\\x9b1m)" in shown["run panel"]
    assert "(t2i\\x1b[31m)" in shown["status command"]
    assert "gen\\x1b[5m" in shown["status command"]


def test_a_newline_in_a_manifest_s_names_keeps_each_one_line_place_on_one_line(
    tmp_path: Path,
) -> None:
    # "run_name": "quar\nFAKE LINE [finished]\ttab" printed "[finished] quar", then a forged
    # progress line, and left the dashboard's one-row status line showing "quar" alone.
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    model = "synthetic\n[finished] x"
    judge = {"name": "judge\nforged", "backend": "fake"}
    manifest = Manifest(
        run_name="quar\nFAKE LINE [finished]\ttab",
        task="t2i",
        generators={model: {}},
        config={"generators": [{"name": model}], "judges": [judge]},
    )
    (run_dir / "manifest.json").write_text(manifest.model_dump_json())
    (run_dir / JOURNAL).write_bytes(lines_of(judgement(1)))
    snapshot = RunDirSource(run_dir).poll()
    line = describe(snapshot)
    assert "\n" not in line and "\t" not in line
    assert line.startswith("[finished] quar\\nFAKE LINE [finished]\\ttab (t2i) | ")
    assert "synthetic\\n[finished] x: ok 0" in line
    status = status_line(snapshot, linger=True).plain
    assert "\n" not in status and "quar\\nFAKE LINE [finished]\\ttab" in status
    assert status.endswith("finished; press q to close")
    assert len(progress_table(snapshot.models).plain.splitlines()) == 1 + len(snapshot.models)
    assert "judge\\nforged (fake)" in run_info(snapshot).plain.splitlines()[2]
    assert judge_loads(snapshot).plain.splitlines()[0].endswith("forged –/– in flight unknown")


def test_watch_sees_a_run_whose_run_lock_was_deleted(tmp_path: Path) -> None:
    # Only run.lock was looked at: a run going on without it showed as finished.
    run_dir = write_run_dir(tmp_path)
    with (run_dir / JOURNAL).open("ab") as journal:  # as the running run holds it
        fcntl.flock(journal, fcntl.LOCK_EX | fcntl.LOCK_NB)
        snapshot = RunDirSource(run_dir).poll()
    assert snapshot.state == "running"
    assert "run written by pid unknown: its journal is locked" in snapshot.message
    assert RunDirSource(run_dir).poll().state == "finished"


async def test_watch_warnings_show_in_the_status_line_of_a_narrow_terminal(
    tmp_path: Path,
) -> None:
    # "N journal line(s) are not judgements and were skipped" and "run written by pid N" were
    # in the run panel's message alone, cut at 80 columns: a short form now shows in the
    # status line, before what it may cut.
    run_dir = write_run_dir(tmp_path)
    with (run_dir / JOURNAL).open("ab") as journal:  # as the running run holds it
        journal.write(b"not json\n{}\n")
        journal.flush()
        fcntl.flock(journal, fcntl.LOCK_EX | fcntl.LOCK_NB)
        app = TrigDashboardApp(RunDirSource(run_dir))
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_until(lambda: app.dashboard.snapshot is not None)
            await pilot.pause()
            status = "".join(s.text for s in app.query_one("#status", Panel).render_line(0))
    assert "written by an unknown pid  2 bad journal lines skipped" in status
    assert len(status) == 80  # the whole line as the terminal shows it


def test_watch_shows_the_quarantined_records(tmp_path: Path) -> None:
    # The engine's dashboard showed them; watching the same run showed none.
    run_dir = write_run_dir(tmp_path)
    source = RunDirSource(run_dir)
    assert source.poll().quarantined == 0
    refused = [
        QuarantinedRecord(index=i, data_id=None, reason="missing data_id", record={})
        for i in range(3)
    ]
    (run_dir / QUARANTINE).write_text("".join(r.model_dump_json() + "\n" for r in refused[:2]))
    assert source.poll().quarantined == 2
    # A run writing the directory: what it refused so far, not the list of the run before.
    manifest = Manifest.model_validate_json((run_dir / "manifest.json").read_text())
    run, _ = RunDir.open(run_dir, manifest)
    with run:
        assert source.poll().quarantined == 0
        run.quarantine(refused[2])
        snapshot = source.poll()
        assert (snapshot.state, snapshot.quarantined) == ("running", 1)
        run.finish_quarantine()
    snapshot = source.poll()
    assert (snapshot.state, snapshot.quarantined) == ("finished", 1)
    assert "1 dataset records quarantined" in run_info(snapshot).plain
    assert describe(snapshot).endswith(" | quarantined 1")  # the plain lines too


def test_status_and_watch_count_the_list_a_running_or_killed_run_wrote(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Since a run writes its list aside until it has read the dataset through, status showed
    # none of a running run's, and neither showed the list of a run killed before that.
    run_dir = write_run_dir(tmp_path)
    refused = QuarantinedRecord(index=0, data_id=None, reason="missing data_id", record={})
    manifest = Manifest.model_validate_json((run_dir / "manifest.json").read_text())
    run, _ = RunDir.open(run_dir, manifest)
    with run:
        run.quarantine(refused)
        assert main(["status", str(run_dir)]) == EXIT_OK
        assert "1 dataset records quarantined so far by the run" in capsys.readouterr().out
    # Killed before its list was put in place: only the start of it is there.
    (run_dir / QUARANTINE).unlink()
    (run_dir / QUARANTINE_PARTIAL).write_text(refused.model_dump_json() + "\n")
    assert RunDirSource(run_dir).poll().quarantined == 1
    assert main(["status", str(run_dir)]) == EXIT_OK
    out = " ".join(capsys.readouterr().out.split())
    assert "1 dataset records quarantined by a run stopped before it read the dataset" in out


def test_status_and_watch_do_not_count_the_half_line_a_killed_run_left(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A run killed while it wrote a record leaves the start of its line: status and watch
    # counted it as a quarantined record.
    run_dir = write_run_dir(tmp_path)
    refused = QuarantinedRecord(index=3, data_id="x", reason="bad", record={})
    whole = refused.model_dump_json() + "\n"
    (run_dir / QUARANTINE_PARTIAL).write_text(whole + '{"index": 4, "da')
    source = RunDirSource(run_dir)
    assert source.poll().quarantined == 1
    assert main(["status", str(run_dir)]) == EXIT_OK
    out = " ".join(capsys.readouterr().out.split())
    assert "1 dataset records quarantined by a run stopped before it read the dataset" in out
    # Its line written whole, it counts.
    second = refused.model_copy(update={"index": 4}).model_dump_json() + "\n"
    (run_dir / QUARANTINE_PARTIAL).write_text(whole + second)
    assert source.poll().quarantined == 2


async def test_the_dashboard_ends_with_the_error_of_a_run_dir_deleted_while_watched(
    tmp_path: Path,
) -> None:
    run_dir = write_run_dir(tmp_path)
    app = TrigDashboardApp(RunDirSource(run_dir), refresh_every_s=0.01)
    async with app.run_test(size=(120, 40)):
        await wait_until(lambda: app.dashboard.snapshot is not None)
        shutil.rmtree(run_dir)
        await wait_until(lambda: app.source_error is not None)
    assert isinstance(app.source_error, RunDirError)
    assert "does not exist" in str(app.source_error)


def test_watch_on_a_terminal_exits_as_without_one_when_the_run_dir_goes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = write_run_dir(tmp_path)
    run_async = TrigDashboardApp.run_async

    async def deleted_then_shown(app: TrigDashboardApp, **_: Any) -> None:
        shutil.rmtree(run_dir)  # after the command's first look, before the dashboard's
        await run_async(app, headless=True, size=(120, 40))

    monkeypatch.setattr(watch_module, "full_screen_possible", lambda: True)
    monkeypatch.setattr(TrigDashboardApp, "run_async", deleted_then_shown)
    assert main(["watch", str(run_dir)]) == EXIT_RUN_DIR
    assert capsys.readouterr().err == (
        f"error: {run_dir} does not exist: there is no run directory there\n"
    )


def test_watch_counts_a_sample_done_as_the_engine_does(tmp_path: Path) -> None:
    # One model judged every sample, the other none: half the work, not "samples 8/8, ETA 0".
    run_dir, judgements = judged_run_dir(tmp_path, 8)
    (run_dir / JOURNAL).write_bytes(lines_of(*(j for j in judgements if j.model == "synth-a")))
    with held_lock(run_dir):  # as the process running in it holds it
        snapshot = RunDirSource(run_dir).poll()
    assert (snapshot.samples_done, snapshot.samples_total) == (4, 8)
    assert snapshot.eta_s != 0.0


def test_watch_counts_the_samples_no_judge_measures_done_as_the_engine_does(
    tmp_path: Path,
) -> None:
    # The nsfw metric judge measures R-T only: 2 of the 8 samples. The other 6 counted as
    # done only in proportion ("samples 0/8" where the run said 6/8), and its ETA with them.
    run_dir, judgements = judged_run_dir(tmp_path, 8, metric="nsfw")
    manifest = read_manifest(run_dir)
    nsfw = {"name": "nsfw", "backend": "metric", "options": {"metric": "nsfw"}}
    config = {**manifest.config, "judges": [nsfw]}
    (run_dir / "manifest.json").write_text(
        manifest.model_copy(update={"config": config}).model_dump_json()
    )
    measured = [j for j in judgements if j.dimension == "R-T"]
    assert len(measured) == 4  # 2 samples, 2 models
    now = [100.0]
    with held_lock(run_dir):
        source = RunDirSource(run_dir, clock=lambda: now[0])
        first = source.poll()
        assert (first.samples_done, first.samples_total) == (6, 8)
        with (run_dir / JOURNAL).open("ab") as journal:
            journal.write(lines_of(*measured[:2]))  # one model's: half the work
        now[0] += 10.0
        snapshot = source.poll()
    assert snapshot.samples_done == 7
    assert snapshot.eta_s == pytest.approx(10.0)  # a sample in 10 s, one left
    (run_dir / JOURNAL).write_bytes(lines_of(*measured))
    assert RunDirSource(run_dir).poll().samples_done == 8


def write_judgements(run_dir: Path, count: int) -> None:
    lines = (judgement(i).model_dump_json().encode() + b"\n" for i in range(count))
    (run_dir / JOURNAL).write_bytes(b"".join(lines))


def test_watch_without_a_terminal_reads_a_long_journal_to_its_end_before_finishing(
    tmp_path: Path,
) -> None:
    # A journal longer than one read (4 MB) was reported "[finished]" with the counts of its
    # first 4 MB, exit 0.
    run_dir = write_run_dir(tmp_path)
    count = READ_CHUNK // len(judgement(0).model_dump_json()) + 500
    write_judgements(run_dir, count)
    out = io.StringIO()
    assert follow(RunDirSource(run_dir), Console(file=out, width=200), interval_s=0.001) == 0
    last = out.getvalue().splitlines()[-1]
    assert last == f"[finished] r (t2i) | m: ok {count}, unscorable 0, error 0"


def test_watch_without_a_terminal_catches_up_without_waiting(tmp_path: Path) -> None:
    run_dir = write_run_dir(tmp_path)
    write_judgements(run_dir, 50)
    source = RunDirSource(run_dir)
    source.tail.chunk = 1000  # a few lines a read
    out = io.StringIO()
    slept: list[float] = []
    assert follow(source, Console(file=out, width=200), interval_s=60, sleep=slept.append) == 0
    assert out.getvalue().splitlines()[-1] == "[finished] r (t2i) | m: ok 50, unscorable 0, error 0"
    assert slept == []  # nobody writes the run: nothing to wait for, only more to read


def test_a_watched_run_is_finished_only_once_its_journal_is_read(tmp_path: Path) -> None:
    run_dir = write_run_dir(tmp_path)
    write_judgements(run_dir, 50)
    source = RunDirSource(run_dir)
    source.tail.chunk = 1000
    first = source.poll()
    assert (first.state, first.finished) == ("catching up", False)
    while source.tail.behind:
        source.poll()
    last = source.poll()
    assert (last.state, last.judged) == ("finished", 50)


def test_a_line_longer_than_a_read_is_read_whole(tmp_path: Path) -> None:
    path = tmp_path / JOURNAL
    path.write_bytes(b"".join(judgement(i).model_dump_json().encode() + b"\n" for i in (1, 2)))
    tail = JournalTail(path, chunk=64)  # a judgement line is some 400 bytes
    assert [j.data_id for j in tail.read()] == ["IQ-R_TA-C_1"]
    assert [j.data_id for j in tail.read()] == ["IQ-R_TA-C_2"]
    assert (tail.read(), tail.offset) == ([], path.stat().st_size)


def test_the_last_lines_of_a_writer_that_ends_as_it_is_watched_are_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The journal was read, then the writer looked for: one that appended its last lines and
    # exited in between was reported finished without them.
    run_dir = write_run_dir(tmp_path)
    looks = []

    def writer_appends_its_last_line_and_exits(_: Path) -> Writer | None:
        looks.append(1)
        if len(looks) == 1:
            return Writer(pid=os.getpid(), run_lock_held=True)
        with (run_dir / JOURNAL).open("ab") as journal:
            journal.write(judgement(2).model_dump_json().encode() + b"\n")
        return None

    monkeypatch.setattr(
        "trig_stream.tui.watch_source.find_writer", writer_appends_its_last_line_and_exits
    )
    source = RunDirSource(run_dir)
    assert source.poll().state == "running"
    last = source.poll()
    assert (last.state, last.judged) == ("finished", 2)


def lines_of(*judgements: Judgement) -> bytes:
    return b"".join(j.model_dump_json().encode() + b"\n" for j in judgements)


def test_a_run_dir_made_anew_while_watched_is_read_from_its_start(tmp_path: Path) -> None:
    # The viewer kept its offset into the old journal: the new one's first lines were never
    # read, the old counts stayed, and a line read from mid-way was "not a judgement".
    run_dir = write_run_dir(tmp_path)
    (run_dir / JOURNAL).write_bytes(lines_of(*(judgement(i) for i in range(3))))
    source = RunDirSource(run_dir)
    assert source.poll().judged == 3
    shutil.rmtree(run_dir)
    run_dir.mkdir()
    (run_dir / "manifest.json").write_text('{"run_name": "again", "task": "t2i"}')
    assert source.poll().judged == 0  # no journal yet: nothing of the old one counts
    erred = judgement(9).model_copy(
        update={"model": "n", "status": "error", "score": None, "error": "boom"}
    )
    (run_dir / JOURNAL).write_bytes(lines_of(*(judgement(i) for i in range(5)), erred))
    snapshot = source.poll()
    fresh = RunDirSource(run_dir).poll()
    assert snapshot.run_name == "again"
    assert snapshot.models == fresh.models
    assert [(m.name, m.ok, m.error) for m in snapshot.models] == [("m", 5, 0), ("n", 0, 1)]
    assert "not judgements" not in snapshot.message


def test_a_journal_cut_by_a_resume_while_watched_is_read_again(tmp_path: Path) -> None:
    # A resume cuts a damaged last line off and appends after it: the viewer's offset was
    # past the cut, so it read the next line from its middle (one judgement lost, one
    # "line that is not a judgement").
    run_dir = write_run_dir(tmp_path)
    journal = run_dir / JOURNAL
    first = lines_of(judgement(1))
    journal.write_bytes(first + b'{"damaged": "' + b"x" * 200 + b'"}\n')
    source = RunDirSource(run_dir)
    assert (source.poll().judged, source.tail.bad_lines) == (1, 1)
    good_end = len(first)
    with journal.open("r+b") as handle:  # as the resume does, on the same file
        handle.truncate(good_end)
        handle.seek(good_end)
        handle.write(lines_of(judgement(2), judgement(3)))
    assert journal.stat().st_size > source.tail.offset  # only the content tells
    snapshot = source.poll()
    assert (snapshot.judged, source.tail.bad_lines) == (3, 0)
    assert "not judgements" not in snapshot.message


def test_a_journal_shorter_than_what_was_read_is_read_again(tmp_path: Path) -> None:
    path = tmp_path / JOURNAL
    path.write_bytes(lines_of(judgement(1), judgement(2)))
    tail = JournalTail(path)
    assert len(tail.read()) == 2
    path.write_bytes(lines_of(judgement(3)))
    assert [j.data_id for j in tail.read()] == ["IQ-R_TA-C_3"]
    assert tail.restarted
    assert (tail.read(), tail.restarted) == ([], False)


def test_a_resume_that_lifts_a_limit_counts_the_samples_again(tmp_path: Path) -> None:
    # The samples were counted once: after a resume without `limit`, "samples 4/4, ETA 0"
    # while the other 4 were judged.
    config = load_config(write_config(tmp_path, samples=8)).model_dump(mode="json")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    manifest = Manifest(run_name="watched", task="t2i", config=config)
    limited = manifest.model_copy(
        update={"config": {**config, "dataset": {**config["dataset"], "limit": 4}}}
    )
    (run_dir / "manifest.json").write_text(limited.model_dump_json())
    source = RunDirSource(run_dir)
    assert source.poll().samples_total == 4
    (run_dir / "manifest.json").write_text(manifest.model_dump_json())
    assert source.poll().samples_total == 8


def test_a_resume_filtering_other_pairs_counts_none_of_the_earlier_judgements_done(
    tmp_path: Path,
) -> None:
    # Every judgement of the pairs an earlier run filtered was counted as this run's work:
    # resumed with the other pairs, watch said "samples 8/8, ETA 0.0s" while the engine
    # counted 0/8.
    run_dir, judgements = judged_run_dir(tmp_path, 16)
    config = read_manifest(run_dir).config
    earlier, later = ["IQ-R_TA-C", "IQ-A_TA-S"], ["R-T_IQ-A", "D-K_IQ-R"]
    resumed = {**config, "dataset": {**config["dataset"], "pairs": later}}
    manifest = Manifest(run_name="watched", task="t2i", config=resumed)
    (run_dir / "manifest.json").write_text(manifest.model_dump_json())
    (run_dir / JOURNAL).write_bytes(lines_of(*(j for j in judgements if j.pair in earlier)))
    source = RunDirSource(run_dir)
    with held_lock(run_dir):
        snapshot = source.poll()
        assert (snapshot.samples_done, snapshot.samples_total) == (0, 8)
        assert snapshot.eta_s != 0.0
        # Judgements read after the config are counted as they come: half of this run's.
        mine = [j for j in judgements if j.pair in later]
        with (run_dir / JOURNAL).open("ab") as journal:
            journal.write(lines_of(*mine[: len(mine) // 2]))
        assert source.poll().samples_done == 4
    # Its config changed again (no filter): the journal's judgements are counted again.
    everything = Manifest(run_name="watched", task="t2i", config=config)
    (run_dir / "manifest.json").write_text(everything.model_dump_json())
    snapshot = source.poll()
    assert (snapshot.samples_done, snapshot.samples_total) == (12, 16)


def test_a_watcher_counts_the_dataset_again_when_a_new_run_starts_under_the_same_config(
    tmp_path: Path,
) -> None:
    # The dataset grew from 8 to 16 samples between two runs of an unchanged config: a
    # watcher attached before the second run kept "samples 8/8, ETA 0.0s" throughout (a
    # fresh one counted 16).
    run_dir, judgements = judged_run_dir(tmp_path, 8)
    (run_dir / JOURNAL).write_bytes(lines_of(*judgements))
    source = RunDirSource(run_dir)
    assert (source.poll().samples_done, source.poll().samples_total) == (8, 8)
    write_prompts(tmp_path / "prompts.json", 16)
    manifest = read_manifest(run_dir)  # as the second run rewrites it as it starts
    started = manifest.model_copy(update={"updated_at": manifest.updated_at + 1})
    (run_dir / "manifest.json").write_text(started.model_dump_json())
    with held_lock(run_dir):
        snapshot = source.poll()
    assert (snapshot.samples_done, snapshot.samples_total) == (8, 16)
    assert snapshot.eta_s != 0.0


def test_samples_are_counted_without_the_source_images_they_do_not_need(tmp_path: Path) -> None:
    # An image_root that is gone made the count fail (the sources were looked up), and the
    # totals and ETA of a run judging images made elsewhere stayed unknown.
    config = load_config(write_config(tmp_path, samples=4)).model_dump(mode="json")
    config["run"]["task"] = "p2p"
    config["dataset"]["image_root"] = str(tmp_path / "gone")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    manifest = Manifest(run_name="watched", task="p2p", config=config)
    (run_dir / "manifest.json").write_text(manifest.model_dump_json())
    assert RunDirSource(run_dir).poll().samples_total == 4


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_closes_the_watch_dashboard_and_gives_the_terminal_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, signum: signal.Signals
) -> None:
    # SIGTERM killed the viewer in the alternate screen: the terminal stayed raw, with no
    # echo and mouse tracking on. It now closes the app (which restores the terminal), exit
    # 130 as an interrupted run.
    run_dir = write_run_dir(tmp_path)
    run_async = TrigDashboardApp.run_async
    silenced: list[bool] = []
    leaked: list[int] = []

    async def signalled(app: TrigDashboardApp, **_: Any) -> None:
        async def pilot(_: Any) -> None:
            await wait_until(lambda: app.dashboard.snapshot is not None)
            os.kill(os.getpid(), signum)
            try:
                await wait_until(lambda: app.return_code is not None, within_s=10)
            except TimeoutError:
                app.exit()  # not closed by the signal: the assertions below fail, not hang

        await run_async(app, headless=True, size=(120, 40), auto_pilot=pilot)

    monkeypatch.setattr(watch_module, "full_screen_possible", lambda: True)
    monkeypatch.setattr(
        watch_module, "silence_the_terminal", lambda: silenced.append(True), raising=False
    )
    monkeypatch.setattr(TrigDashboardApp, "run_async", signalled)
    previous = signal.signal(signum, lambda number, _: leaked.append(number))
    try:
        assert main(["watch", str(run_dir)]) == 130
    finally:
        signal.signal(signum, previous)
    assert leaked == []
    assert bool(silenced) == (signum == signal.SIGHUP)  # no terminal here: it reads hung up


def test_a_hangup_with_the_terminal_still_there_gives_it_back(tmp_path: Path) -> None:
    # `kill -HUP` with the terminal still open left it in the alternate screen, the cursor
    # hidden and mouse tracking on: the hangup pointed the output at /dev/null before the
    # app's teardown wrote what gives the terminal back.
    run_dir = write_run_dir(tmp_path)
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    process = subprocess.Popen(
        [sys.executable, "-m", "trig_stream", "watch", str(run_dir)],
        stdin=follower,
        stdout=follower,
        stderr=follower,
        env={**os.environ, "TERM": "xterm-256color"},
        cwd=ROOT,
    )
    os.close(follower)
    hung_up: list[bool] = []

    def hang_up_once_shown(output: bytes) -> None:
        if b"\x1b[?1000h" in output and not hung_up:  # the app shows, mouse on
            process.send_signal(signal.SIGHUP)
            hung_up.append(True)

    try:
        output = read_terminal(leader, hang_up_once_shown)
        assert process.wait(timeout=10) == EXIT_INTERRUPTED
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(leader)
    for on, off in [(b"?1049h", b"?1049l"), (b"?25l", b"?25h"), (b"?1000h", b"?1000l")]:
        assert output.rfind(b"\x1b[" + off) > output.rfind(b"\x1b[" + on) >= 0, (on, output[-300:])


def test_a_terminal_reads_as_hung_up_once_it_is_closed() -> None:
    # What the hangup above tells from a terminal closed, whose teardown writes would fail.
    leader, follower = pty.openpty()
    try:
        assert not terminal_hung_up([follower])
        os.close(leader)  # the terminal window closed: the kernel hangs its terminal up
        assert terminal_hung_up([follower])
    finally:
        os.close(follower)


@contextmanager
def held_lock(run_dir: Path) -> Iterator[None]:
    """Hold the run lock as the process running in ``run_dir`` does."""
    with (run_dir / "run.lock").open("a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write(str(os.getpid()))
        lock.flush()
        yield


def judged_run_dir(tmp_path: Path, samples: int, **update: Any) -> tuple[Path, list[Judgement]]:
    """A run directory of ``write_config``'s run, and every judgement its run makes (not
    written): each model's, of both dimensions of each sample, with ``update`` applied."""
    config = load_config(write_config(tmp_path, samples))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    manifest = Manifest(run_name="watched", task="t2i", config=config.model_dump(mode="json"))
    (run_dir / "manifest.json").write_text(manifest.model_dump_json())
    records = json.loads((tmp_path / "prompts.json").read_text())
    judgements = [
        judgement(0).model_copy(
            update={
                "model": generator.name,
                "data_id": record["data_id"],
                "pair": "_".join(record["dimension"]),
                "dimension": dimension,
                **update,
            }
        )
        for generator in config.generators
        for record in records
        for dimension in record["dimension"]
    ]
    return run_dir, judgements


def test_a_retry_of_the_errors_shows_its_rate_and_no_end_of_zero(tmp_path: Path) -> None:
    # Resumed with --retry-errors, every judgement is in the journal already: the viewer
    # counted unique keys for its rate (0.0/s, as a retry replaces a key) and said
    # "ETA 0.0s" while the errors were being asked again. The manifest here is an older
    # trig-stream's, which does not say whether the run asks them again: no ETA.
    run_dir, judgements = judged_run_dir(tmp_path, 8, status="error", score=None, error="boom")
    (run_dir / JOURNAL).write_bytes(lines_of(*judgements))
    now = [100.0]
    with held_lock(run_dir):
        source = RunDirSource(run_dir, clock=lambda: now[0])
        first = source.poll()
        assert (first.samples_done, first.samples_total) == (8, 8)
        with (run_dir / JOURNAL).open("ab") as journal:
            retried = (j.model_copy(update={"status": "ok", "score": 0.5}) for j in judgements)
            journal.write(lines_of(*list(retried)[:10]))
        now[0] += 2.0
        snapshot = source.poll()
    assert snapshot.judgements_per_s == pytest.approx(5.0)
    assert snapshot.eta_s is None
    assert snapshot.models[0].ok == 10


class GatedJudge(FakeJudge):
    """The fake judge, answering ``open_for`` requests and holding the others until
    :attr:`gate` is set."""

    def __init__(self, open_for: int) -> None:
        super().__init__()
        self.open_for = open_for
        self.seen = 0
        self.gate = anyio.Event()

    async def judge(self, request: JudgeRequest) -> JudgeReply:
        self.seen += 1
        if self.seen > self.open_for:
            await self.gate.wait()
        return await super().judge(request)


def table_row(text: str, first: str) -> list[str]:
    """The cells of the row of a table printed by rich that starts with ``first``."""
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.replace("┃", "│").split("│")[1:-1]]
        if cells and cells[0] == first:
            return cells
    raise AssertionError(f"no row {first!r} in:\n{text}")


async def a_run_with_errors(make_config: ConfigFactory) -> tuple[RunConfig, int]:
    """A finished run of 8 samples whose judge failed about half its requests, and how many
    of its 16 judgements are errors (at least 2)."""
    failing = [{"name": "trigscore", "backend": "fake", "options": {"error_rate": 0.5}}]
    config = make_config(samples=8, judges=failing)
    await run_to_end(config)
    journal = latest_judgements(config.run_dir / JOURNAL).values()
    errors = sum(1 for j in journal if j.status == "error")
    assert errors >= 2
    return config, errors


async def test_watch_and_status_count_the_errors_a_retry_asks_again_as_work_left(
    make_config: ConfigFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    # Resumed with --retry-errors, the errors being asked again counted as finished: the
    # viewer said "samples 8/8" (and no ETA), `status` counted them as errors that stand,
    # since nothing in the run directory said that the run asks them again.
    config, errors = await a_run_with_errors(make_config)
    run_dir = config.run_dir
    assert errors < 16
    judge = GatedJudge(open_for=1)
    async with Engine(config, judges=[judge], retry_errors=True) as engine:
        assert (await engine.results.receive()).status == "ok"  # one error asked again
        manifest = read_manifest(run_dir)
        assert (manifest.retry_errors, manifest.journal_lines) == (True, 16)
        snapshot = RunDirSource(run_dir).poll()
        assert snapshot.state == "running"
        left = errors - 1
        assert (snapshot.samples_done, snapshot.samples_total) == (int(8 * (16 - left) / 16), 8)
        assert f"asking again {left} error judgement" in snapshot.message
        assert main(["status", str(run_dir)]) == EXIT_OK
        out = capsys.readouterr().out
        assert "with --retry-errors: the error judgements written before it started" in out
        assert table_row(out, "model")[2:] == ["ok", "unscorable", "error", "asked again", "total"]
        assert table_row(out, "synth")[2:] == [str(17 - errors), "0", "0", str(left), "16"]
        judge.gate.set()
        assert len([j async for j in engine.results]) == left
    finished = RunDirSource(run_dir).poll()
    assert (finished.state, finished.samples_done) == ("finished", 8)
    assert main(["status", str(run_dir)]) == EXIT_OK  # no process asks anything again now
    out = capsys.readouterr().out
    assert "asked again" not in out
    assert table_row(out, "synth")[2:] == ["16", "0", "0", "16"]


async def test_a_run_still_reading_its_journal_is_not_shown_with_the_run_befores_retry(
    make_config: ConfigFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    # A plain resume after an interrupted --retry-errors run: while it read its (long)
    # journal, the manifest was still the run before's, and status and watch showed its
    # errors "asked again" (then, the journal read, as errors: counts went backwards).
    config, errors = await a_run_with_errors(make_config)
    run_dir = config.run_dir
    stale = read_manifest(run_dir).model_copy(update={"retry_errors": True, "journal_lines": 16})
    (run_dir / "manifest.json").write_text(stale.model_dump_json())
    opening = RunDir(run_dir)
    opening._acquire_lock()  # as a run holds it while it reads its journal: no pid yet
    try:
        assert find_writer(run_dir) == Writer(pid=None, run_lock_held=True)
        assert main(["status", str(run_dir)]) == EXIT_OK
        out = capsys.readouterr().out
        assert "starting (pid not yet written in run.lock): reading its journal" in out
        assert "--retry-errors" not in out
        assert table_row(out, "model")[2:] == ["ok", "unscorable", "error", "total"]
        assert table_row(out, "synth")[2:] == [str(16 - errors), "0", str(errors), "16"]
        snapshot = RunDirSource(run_dir).poll()
        assert "asking again" not in snapshot.message
        assert "a run is starting" in snapshot.message
        assert snapshot.samples_done == 8  # its errors are errors, not work left
    finally:
        opening.close()


async def test_errors_of_samples_the_retry_no_longer_selects_are_not_counted_as_asked_again(
    make_config: ConfigFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Resumed with --retry-errors and a dataset limit of 4 of the 8 samples: status and watch
    # counted every error written before as asked again, also those of the samples beyond
    # the limit, which the run never asks.
    failing = [{"name": "trigscore", "backend": "fake", "options": {"error_rate": 0.5}}]
    config = make_config(samples=8, judges=failing)
    await run_to_end(config)
    run_dir = config.run_dir
    kept = {r["data_id"] for r in json.loads((tmp_path / "prompts.json").read_text())[:4]}
    errors = [j for j in latest_judgements(run_dir / JOURNAL).values() if j.status == "error"]
    selected = sum(1 for j in errors if j.data_id in kept)
    assert selected >= 2 and len(errors) > selected  # errors on both sides of the limit
    limited = make_config(
        dataset={"path": str(tmp_path / "prompts.json"), "limit": 4}, judges=failing
    )
    judge = GatedJudge(open_for=1)
    async with Engine(limited, judges=[judge], retry_errors=True) as engine:
        assert (await engine.results.receive()).status == "ok"  # one error asked again
        left = selected - 1
        snapshot = RunDirSource(run_dir).poll()
        assert f"asking again {left} error judgement" in snapshot.message
        assert main(["status", str(run_dir)]) == EXIT_OK
        out = capsys.readouterr().out
        assert "of samples its dataset still selects" not in out
        stand = len(errors) - selected
        assert table_row(out, "synth")[2:] == [
            str(17 - len(errors)),
            "0",
            str(stand),
            str(left),
            "16",
        ]
        judge.gate.set()
        assert len([j async for j in engine.results]) == left


async def test_status_counts_no_error_of_a_record_the_retry_refused_as_asked_again(
    make_config: ConfigFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Every judgement an error, then the first record's prompt emptied: the retry refuses it
    # and asks the other 6 errors again. `status` counted its 2 errors as asked again too
    # ("asked again 8"), where `watch` reads the run's quarantine list and says 6.
    failing = [{"name": "trigscore", "backend": "fake", "options": {"error_rate": 1.0}}]
    config = make_config(samples=4, judges=failing)
    await run_to_end(config)
    run_dir = config.run_dir
    prompts = tmp_path / "prompts.json"
    records = json.loads(prompts.read_text())
    records[0]["prompt"] = ""
    prompts.write_text(json.dumps(records))
    judge = GatedJudge(open_for=0)
    async with Engine(config, judges=[judge], retry_errors=True) as engine:
        await wait_until(lambda: judge.seen > 0)  # the first record, refused, is behind
        assert "asking again 6 error judgements" in RunDirSource(run_dir).poll().message
        assert main(["status", str(run_dir)]) == EXIT_OK
        out = capsys.readouterr().out
        assert table_row(out, "model")[2:] == ["ok", "unscorable", "error", "asked again", "total"]
        assert table_row(out, "synth")[2:] == ["0", "0", "2", "6", "8"]
        judge.gate.set()
        assert len([j async for j in engine.results]) == 6


def test_one_commit_seen_just_after_the_last_look_is_no_spike_in_the_rate(
    tmp_path: Path,
) -> None:
    # Two looks 3 ms apart (the command's first, then follow()'s) with one group commit of
    # 4 lines between them: 1333/s, and an ETA of a second for 300 samples left.
    run_dir, judgements = judged_run_dir(tmp_path, 8)
    (run_dir / JOURNAL).write_bytes(lines_of(*judgements[:8]))
    now = [100.0]
    with held_lock(run_dir):
        source = RunDirSource(run_dir, clock=lambda: now[0])
        source.poll()
        with (run_dir / JOURNAL).open("ab") as journal:
            journal.write(lines_of(*judgements[8:12]))
        now[0] += 0.003
        snapshot = source.poll()
    assert snapshot.judgements_per_s == pytest.approx(4 / 0.5)  # over half a second at least


def test_the_first_watch_line_shows_no_rate_measured_over_milliseconds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The command looked at the run (a bad directory fails before any screen), then
    # follow() looked again 3 ms later: a group commit between read 6.0/s (its count over
    # the half second the span is never taken shorter than) and an ETA, where the run
    # went at 10/s. The first line is the first look's, with no rate yet.
    run_dir, judgements = judged_run_dir(tmp_path, 8)
    (run_dir / JOURNAL).write_bytes(lines_of(*judgements[:8]))
    now = [100.0]
    looks: list[DashboardSnapshot] = []
    poll = RunDirSource.poll

    def look(source: RunDirSource) -> DashboardSnapshot:
        if len(looks) == 2:
            raise KeyboardInterrupt  # as Ctrl-C closes it
        looks.append(poll(source))
        with (run_dir / JOURNAL).open("ab") as journal:  # the run writes on meanwhile
            journal.write(lines_of(*judgements[4 + 4 * len(looks) : 8 + 4 * len(looks)]))
        now[0] += 0.003
        return looks[-1]

    monkeypatch.setattr(RunDirSource, "poll", look)
    monkeypatch.setattr(
        watch_module, "RunDirSource", functools.partial(RunDirSource, clock=lambda: now[0])
    )
    with held_lock(run_dir):
        assert main(["watch", str(run_dir), "--interval", "0.001"]) == EXIT_INTERRUPTED
    first, *_ = capsys.readouterr().out.splitlines()
    assert first.startswith("[running]") and "/s" not in first, first


def test_the_journal_read_on_attaching_is_no_progress(tmp_path: Path) -> None:
    # A journal longer than one read is read over a few looks: what they read was written
    # before the viewer came, and counted as progress (9443/s attaching to a large run).
    run_dir = write_run_dir(tmp_path)
    write_judgements(run_dir, READ_CHUNK // len(judgement(0).model_dump_json()) + 500)
    now = [100.0]
    with held_lock(run_dir):
        source = RunDirSource(run_dir, clock=lambda: now[0])
        rates: list[tuple[float | None, float | None, tuple[float, ...]]] = []
        while not rates or source.tail.behind:
            now[0] += 0.5
            snapshot = source.poll()
            rates.append((snapshot.judgements_per_s, snapshot.eta_s, snapshot.judgements_history))
        assert len(rates) == 2
        assert set(rates) == {(None, None, ())}  # unknown yet, not a spike
        with (run_dir / JOURNAL).open("ab") as journal:
            journal.write(lines_of(*(judgement(i) for i in range(5))))
        now[0] += 1.0
        assert source.poll().judgements_per_s == pytest.approx(5.0)


def test_watch_without_a_terminal_prints_its_lines_to_stdout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # They went to stderr with the errors: `trig-stream watch RUN > log` left the log empty.
    run_dir = write_run_dir(tmp_path)
    with (run_dir / JOURNAL).open("ab") as journal:
        journal.write(b"not json\n")
    assert main(["watch", str(run_dir)]) == 0
    out, err = capsys.readouterr()
    assert out == "[finished] r (t2i) | m: ok 1, unscorable 0, error 0\n"
    assert err.startswith(f"warning: {run_dir / JOURNAL}: 1 line(s) are not judgements")


def test_watch_on_a_terminal_without_textual_prints_its_lines_as_run_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # It ended with "error: textual is not installed", exit 4, where `run` says how to get
    # the dashboard and goes on with the plain lines.
    run_dir = write_run_dir(tmp_path)
    monkeypatch.setattr(watch_module, "full_screen_possible", lambda: True)
    # As without textual: the app's import fails (textual's own modules are imported here).
    monkeypatch.setitem(sys.modules, "trig_stream.tui.app", None)
    assert main(["watch", str(run_dir)]) == EXIT_OK
    out, err = capsys.readouterr()
    assert out == "[finished] r (t2i) | m: ok 1, unscorable 0, error 0\n"
    assert err == "no dashboard: install it with pip install 'trig-stream[tui]'\n"


def test_the_dashboard_names_without_textual_name_the_install() -> None:
    # A bare ModuleNotFoundError ("No module named 'textual'"), where every other extra's
    # error names the pip install.
    code = (
        "import sys\n"
        "sys.modules['textual'] = None  # as if not installed: import fails\n"
        "import trig_stream.tui as tui\n"
        "from trig_stream.errors import MissingExtraError\n"
        "for name in ('Dashboard', 'TrigDashboardApp', 'run_dashboard'):\n"
        "    try:\n"
        "        getattr(tui, name)\n"
        "    except MissingExtraError as exc:\n"
        "        print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    said = "textual is not installed; install it with: pip install 'trig-stream[tui]'"
    assert out.stdout.splitlines() == [said] * 3


def test_watch_keeps_the_latest_errors_for_its_errors_view(tmp_path: Path) -> None:
    run_dir = write_run_dir(tmp_path)
    failed = [
        judgement(i).model_copy(update={"status": "error", "score": None, "error": f"boom {i}"})
        for i in range(ERRORS_KEPT + 5)
    ]
    (run_dir / JOURNAL).write_bytes(lines_of(*failed))
    errors = RunDirSource(run_dir).poll().last_errors
    assert len(errors) == ERRORS_KEPT  # 20 before; bounded all the same
    assert errors[-1] == f"m IQ-R_TA-C_{ERRORS_KEPT + 4} IQ-R: boom {ERRORS_KEPT + 4}"


def test_watch_s_errors_view_drops_an_error_a_retry_replaced(tmp_path: Path) -> None:
    # After a --retry-errors run judged them again, "last errors" still listed the errors
    # the journal's later ok judgements replace, as if they stood.
    run_dir = write_run_dir(tmp_path)
    failed = [
        judgement(i).model_copy(update={"status": "error", "score": None, "error": f"boom {i}"})
        for i in range(3)
    ]
    (run_dir / JOURNAL).write_bytes(lines_of(*failed))
    source = RunDirSource(run_dir)
    assert len(source.poll().last_errors) == 3
    with (run_dir / JOURNAL).open("ab") as journal:
        journal.write(lines_of(judgement(0), judgement(2)))
    assert source.poll().last_errors == ("m IQ-R_TA-C_1 IQ-R: boom 1",)
    assert RunDirSource(run_dir).poll().last_errors == ("m IQ-R_TA-C_1 IQ-R: boom 1",)


@pytest.mark.parametrize(
    ("judges", "shown"),
    [
        ("abc", ()),
        (5, ()),
        ([1, None], ()),
        ([{"name": "x", "options": "y"}], (("x", "?", (), None),)),
        (
            [{"name": "x", "backend": "openai", "options": {"base_urls": 3}, "concurrency": "8"}],
            (("x", "openai", (), None),),
        ),
        (
            [{"name": "x", "options": {"base_urls": ["http://a/v1"]}, "concurrency": 8}],
            (("x", "?", ("http://a/v1",), 8),),
        ),
    ],
)
def test_a_manifest_whose_judges_are_malformed_is_watched_and_its_status_told(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    judges: object,
    shown: tuple[tuple[str, str, tuple[str, ...], int | None], ...],
) -> None:
    # watch (and status, for some) crashed with an AttributeError or a TypeError.
    run_dir = write_run_dir(tmp_path)
    manifest = {"run_name": "r", "task": "t2i", "config": {"judges": judges}}
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    snapshot = RunDirSource(run_dir).poll()
    assert tuple((j.name, j.backend, j.endpoints, j.limit) for j in snapshot.judges) == shown
    assert main(["status", str(run_dir)]) == 0
    assert "trigscore" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["run.lock", "quarantine.jsonl", "manifest.json"])
def test_status_and_watch_do_not_wait_on_a_pipe_in_the_run_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    # Opening a pipe for reading waits for a writer: status hung on a quarantine.jsonl or a
    # run.lock that was one, and watch on the run.lock.
    run_dir = write_run_dir(tmp_path)
    fifo = run_dir / name
    fifo.unlink(missing_ok=True)
    os.mkfifo(fifo)
    with unblocked_after(fifo, 10) as fired:
        status = main(["status", str(run_dir)])
    out, err = capsys.readouterr()
    assert not fired
    if name == "manifest.json":
        assert status == EXIT_RUN_DIR
        assert err == (
            f"error: cannot read {fifo}: it is not a regular file (a pipe, a folder or a "
            "device?); it must be the file a run wrote, readable by this user\n"
        )
        return
    assert status == 0
    assert "not running" in out
    if name == "quarantine.jsonl":
        assert f"cannot read {fifo}: it is not a regular file" in out
    with unblocked_after(fifo, 10) as fired:
        snapshot = RunDirSource(run_dir).poll()
    assert not fired
    assert (snapshot.state, snapshot.judged) == ("finished", 1)


def test_the_watch_dashboard_puts_the_job_control_handlers_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Textual's terminal driver installs SIGTSTP and SIGCONT handlers and leaves them (the
    # headless driver installs none: done here as it does).
    run_dir = write_run_dir(tmp_path)
    run_async = TrigDashboardApp.run_async

    async def as_on_a_terminal(app: TrigDashboardApp, **_: Any) -> None:
        for signum in (signal.SIGTSTP, signal.SIGCONT):
            signal.signal(signum, lambda *_: None)

        async def close(_: Any) -> None:
            await app.action_quit()

        await run_async(app, headless=True, size=(120, 40), auto_pilot=close)

    monkeypatch.setattr(watch_module, "full_screen_possible", lambda: True)
    monkeypatch.setattr(TrigDashboardApp, "run_async", as_on_a_terminal)
    before = [signal.getsignal(s) for s in (signal.SIGTSTP, signal.SIGCONT)]
    try:
        assert main(["watch", str(run_dir)]) == EXIT_OK
        after = [signal.getsignal(s) for s in (signal.SIGTSTP, signal.SIGCONT)]
    finally:
        for signum, handler in zip((signal.SIGTSTP, signal.SIGCONT), before, strict=True):
            signal.signal(signum, handler)
    assert after == before


async def test_a_stored_config_todays_bounds_refuse_keeps_its_thresholds_and_models(
    tmp_path: Path,
) -> None:
    # A manifest written before backoffs were capped at an hour failed validation whole:
    # the live DTM fell back to TRIG's default thresholds, unlike `report`, and lost the models.
    path = write_config(tmp_path, samples=4)
    path.write_text(path.read_text() + "\n[relation]\nsynergy = 0.3\nbottleneck = 0.1\n")
    config = load_config(path)
    await run_to_end(config)
    manifest_path = config.run_dir / "manifest.json"
    stored = json.loads(manifest_path.read_text())
    stored["config"].setdefault("engine", {})["backoff_max"] = 7200.0
    manifest_path.write_text(json.dumps(stored))
    source = RunDirSource(config.run_dir, relations_every_s=0)
    source.poll()
    snapshot = source.poll()
    assert (source._thresholds.synergy, source._thresholds.bottleneck) == (0.3, 0.1)
    assert {model.name for model in snapshot.models} == {"synth-a", "synth-b"}


def test_watch_shows_an_adaptive_judge_s_range_not_its_starting_concurrency(
    tmp_path: Path,
) -> None:
    # The run directory holds no live limit: "in flight: unknown –/32" read the starting
    # concurrency of an adaptive judge as its limit.
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    judges = [
        {"name": "fixed", "backend": "fake", "concurrency": 32},
        {
            "name": "moving",
            "backend": "fake",
            "concurrency": 32,
            "adaptive": {"enabled": True, "min": 1, "max": 64},
        },
        {"name": "bare", "backend": "fake", "concurrency": 32, "adaptive": {"enabled": True}},
        {
            "name": "off",
            "backend": "fake",
            "concurrency": 8,
            "adaptive": {"enabled": False, "min": 1, "max": 64},
        },
    ]
    manifest = Manifest(run_name="r", task="t2i", config={"judges": judges})
    (run_dir / "manifest.json").write_text(manifest.model_dump_json())
    (run_dir / JOURNAL).write_bytes(lines_of(judgement(1)))
    shown = judge_loads(RunDirSource(run_dir).poll()).plain.splitlines()[::2]
    assert [line.split()[1] for line in shown] == ["–/32", "–/1–64", "–/adaptive", "–/8"]


@pytest.mark.anyio
async def test_error_lines_name_the_judge_and_tell_a_failed_generation_once(
    make_config: ConfigFactory,
) -> None:
    # With four judges, each image's failures read "m8-en TA-R_TA-C_1_12 TA-C: fake judge:
    # 400 Bad Request" four times over; a failed generation showed judges x dimensions times.
    failing = {"backend": "fake", "options": {"error_rate": 1.0}}
    config = make_config(
        samples=2,
        generators=[
            {"name": "synth", "backend": "synthetic", "options": {"fail_ids": ["IQ-R_TA-C_1"]}}
        ],
        judges=[{"name": "judge-a", **failing}, {"name": "judge-b", **failing}],
    )
    async with Engine(config) as engine:
        assert len([j async for j in engine.results]) == 8
        live = engine.stats().last_errors
    watched = RunDirSource(engine.run_dir_path).poll().last_errors
    assert watched == live
    assert live[0] == "synth IQ-R_TA-C_1: generate failed: synthetic failure for IQ-R_TA-C_1"
    assert sorted(live[1:]) == [
        f"synth IQ-A_TA-S_1 {dimension} {judge}: fake judge: 400 Bad Request"
        for dimension in ("IQ-A", "TA-S")
        for judge in ("judge-a", "judge-b")
    ]


@pytest.mark.anyio
async def test_error_lines_name_the_judge_when_the_judges_run_are_several_not_the_configs(
    make_config: ConfigFactory,
) -> None:
    # The config's one judge decided: two judges passed to the engine gave each error twice
    # in the same words, in the run and in watch (the manifest's config names one judge).
    config = make_config(samples=1)
    failing = FakeJudgeOptions(error_rate=1.0)
    judges = [FakeJudge("alpha", failing), FakeJudge("beta", failing)]
    async with Engine(config, judges=judges) as engine:
        assert len([j async for j in engine.results]) == 4
        live = engine.stats().last_errors
    watched = RunDirSource(engine.run_dir_path).poll().last_errors
    expected = [
        f"synth IQ-R_TA-C_1 {dimension} {judge}: fake judge: 400 Bad Request"
        for dimension in ("IQ-R", "TA-C")
        for judge in ("alpha", "beta")
    ]
    assert sorted(live) == expected
    assert sorted(watched) == expected


def test_a_watched_run_with_samples_left_is_not_running_not_finished(tmp_path: Path) -> None:
    # A stopped run with 284 of 300 samples left showed "[finished] … samples 16/300 …
    # finished; press q to close": "finished" is for a run with its work done.
    run_dir, judgements = judged_run_dir(tmp_path, 8)
    (run_dir / JOURNAL).write_bytes(lines_of(*(j for j in judgements if j.model == "synth-a")))
    stopped = RunDirSource(run_dir).poll()
    assert (stopped.state, stopped.samples_done, stopped.samples_total) == ("not running", 4, 8)
    line = status_line(stopped, linger=True).plain
    assert "[not running]" in line and "finished" not in line
    assert "not running; 4 samples left: `trig-stream run` resumes it; press q" in line
    # The plain lines (`watch RUN > log`) say it too, as the README has it.
    assert describe(stopped).startswith("[not running] ")
    assert describe(stopped).endswith(" | 4 samples left: `trig-stream run` resumes it")
    (run_dir / JOURNAL).write_bytes(lines_of(*judgements))
    done = RunDirSource(run_dir).poll()
    assert done.state == "finished" and done.samples_done == 8
    assert "finished; press q to close" in status_line(done, linger=True).plain


def finished_run(tmp_path: Path, records: list[dict[str, Any]], limit: int | None) -> Path:
    """The run directory of a finished headless run of ``records`` (synthetic, fake judge)."""
    dataset = tmp_path / "ds.json"
    dataset.write_text(json.dumps(records))
    config = tmp_path / "c.toml"
    config.write_text(
        f"""
[run]
name = "r"
output_dir = "{tmp_path / "out"}"

[dataset]
path = "{dataset}"
{"" if limit is None else f"limit = {limit}"}

[[generators]]
name = "g"
backend = "synthetic"
options = {{ size = 16 }}

[[judges]]
name = "j"
backend = "fake"
"""
    )
    assert main(["run", str(config), "--headless"]) == EXIT_OK
    return tmp_path / "out" / "r"


@pytest.mark.parametrize(
    ("limit", "totals", "read_again"), [(None, [4, 3, 2], 0), (3, [3, 3, 2], 1)]
)
def test_watch_counts_again_after_each_refusal_without_reading_the_dataset_again(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    limit: int | None,
    totals: list[int],
    read_again: int,
) -> None:
    # Each change of the quarantine list read the whole dataset again: on 200k records with a
    # refusal each poll, 2.5 s a poll. Its identity columns are read once now (again only
    # when a limit needs records past those read), the totals as a fresh count gives them.
    records = [
        {"data_id": f"IQ-R_TA-C_{n}", "prompt": f"prompt {n}", "dimension": ["IQ-R", "TA-C"]}
        for n in range(5)
    ]
    run_dir = finished_run(tmp_path, records, limit)
    # Judged so far: the first record only; a refused record judged would still count.
    kept = [j for j in latest_judgements(run_dir / JOURNAL).values() if j.data_id.endswith("_0")]
    (run_dir / JOURNAL).write_bytes(lines_of(*kept))
    source = RunDirSource(run_dir)
    assert source.poll().samples_total == (5 if limit is None else limit)
    read = 0
    raw_records = DatasetSource._raw_records

    def counted(self: DatasetSource, *, identity_only: bool = False) -> Iterator[Any]:
        nonlocal read
        read += 1
        return raw_records(self, identity_only=identity_only)

    for index, total in zip([4, 2, 3], totals, strict=True):
        refused = QuarantinedRecord(
            index=index, data_id=f"IQ-R_TA-C_{index}", reason="missing or empty prompt", record={}
        )
        with (run_dir / QUARANTINE).open("a") as handle:
            handle.write(refused.model_dump_json() + "\n")
        with monkeypatch.context() as patched:
            patched.setattr(DatasetSource, "_raw_records", counted)
            assert source.poll().samples_total == total
        assert RunDirSource(run_dir).poll().samples_total == total  # a fresh count
    # Under the limit, once: the records read first all refused, it reads further.
    assert read == read_again


@pytest.mark.parametrize("limit", [None, 2])
def test_a_finished_run_that_quarantined_records_shows_finished(
    tmp_path: Path, limit: int | None
) -> None:
    # Its total counted every record of a sound identity: one refused for an empty prompt,
    # or repeating a data_id, was a sample left that no resume would ever judge ("not
    # running; 1 sample left"); under a limit the bad record also took a good one's place.
    records = [
        {"data_id": "IQ-R_TA-C_1", "prompt": "", "dimension": ["IQ-R", "TA-C"]},
        {"data_id": "IQ-R_TA-C_2", "prompt": "a cat", "dimension": ["IQ-R", "TA-C"]},
        {"data_id": "IQ-R_TA-C_2", "prompt": "a dog", "dimension": ["IQ-R", "TA-C"]},
        {"data_id": "IQ-R_TA-C_3", "prompt": "a cow", "dimension": ["IQ-R", "TA-C"]},
    ]
    run_dir = finished_run(tmp_path, records, limit)
    snapshot = RunDirSource(run_dir).poll()
    assert snapshot.quarantined == 2
    assert (snapshot.state, snapshot.samples_done, snapshot.samples_total) == ("finished", 2, 2)
    assert "finished; press q to close" in status_line(snapshot, linger=True).plain
    # A run stopped before judging one of them still shows the one left.
    kept = [j for j in latest_judgements(run_dir / JOURNAL).values() if j.data_id != "IQ-R_TA-C_3"]
    (run_dir / JOURNAL).write_bytes(lines_of(*kept))
    stopped = RunDirSource(run_dir).poll()
    assert (stopped.state, stopped.samples_done, stopped.samples_total) == ("not running", 1, 2)


async def test_under_a_limit_a_refused_record_judged_with_errors_only_takes_no_place(
    make_config: ConfigFactory, tmp_path: Path
) -> None:
    # A record whose judgements are all errors is none judged for the limit, as the run
    # has it (its errors judged nothing): refused on a retry, it took a place all the same,
    # and a finished retry of 2 samples showed "samples 1/1".
    failing = [{"name": "trigscore", "backend": "fake", "options": {"error_rate": 1.0}}]
    prompts = write_prompts(tmp_path / "prompts.json", 5)
    config = make_config(dataset={"path": str(prompts), "limit": 2}, judges=failing)
    await run_to_end(config)
    run_dir = config.run_dir
    assert {j.status for j in latest_judgements(run_dir / JOURNAL).values()} == {"error"}
    records = json.loads(prompts.read_text())
    records[0]["prompt"] = ""
    prompts.write_text(json.dumps(records))
    retried = await run_to_end(config, retry_errors=True)
    assert {j.data_id for j in retried} == {records[1]["data_id"], records[2]["data_id"]}
    snapshot = RunDirSource(run_dir).poll()
    assert (snapshot.quarantined, snapshot.samples_total) == (1, 2)
