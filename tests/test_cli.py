"""The command line: validate, run, status, exit codes, Ctrl-C and resume."""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio.lowlevel
import anyio.to_thread
import pytest
from PIL import Image
from rich.console import Console

from tests.conftest import ROOT, write_prompts
from trig_stream import cli, run_command, signals
from trig_stream.backends.base import JudgeRequest
from trig_stream.cli import main
from trig_stream.errors import BackendError, FatalBackendError, RunDirError
from trig_stream.exit_codes import EXIT_CONFIG, EXIT_FATAL, EXIT_INTERRUPTED, EXIT_OK, EXIT_RUN_DIR
from trig_stream.locks import LOCK
from trig_stream.manifest import MANIFEST_VERSION, read_manifest
from trig_stream.signals import interrupt_on_stop_signals, stop_signals
from trig_stream.testing import FakeJudge, SyntheticGenerator

CONFIG = """\
[run]
name = "cli"
output_dir = "runs"

[dataset]
path = "prompts.json"

[[generators]]
name = "synth"
backend = "synthetic"
options = {{ size = 16 }}

[[judges]]
backend = "fake"
concurrency = {concurrency}
options = {{ latency_s = {latency}{extra} }}

[engine]
image_buffer = 2
sample_buffer = 2
"""


def write_config(
    tmp_path: Path, *, samples: int = 6, latency: float = 0.0, concurrency: int = 8, extra: str = ""
) -> Path:
    write_prompts(tmp_path / "prompts.json", samples)
    path = tmp_path / "run.toml"
    path.write_text(CONFIG.format(latency=latency, concurrency=concurrency, extra=extra))
    return path


def journal_keys(tmp_path: Path) -> Counter[tuple[str, str]]:
    lines = (tmp_path / "runs" / "cli" / "journal.jsonl").read_text().splitlines()
    return Counter((r["data_id"], r["dimension"]) for r in map(json.loads, lines))


def run_patched(path: Path, patch: str, **popen: Any) -> subprocess.Popen[str]:
    """``trig-stream run PATH --headless`` in a child process, after the Python lines ``patch``
    (``sys`` is imported); its stderr is a pipe."""
    command = (
        f"import sys\n{patch}"
        "from trig_stream.cli import entry_point\n"
        f"sys.argv = ['trig-stream', 'run', {str(path)!r}, '--headless']\n"
        "entry_point()\n"
    )
    return subprocess.Popen(
        [sys.executable, "-c", command], stderr=subprocess.PIPE, text=True, **popen
    )


def signal_after(process: subprocess.Popen[str], prefix: str, signum: int) -> None:
    """Read the process's stderr up to a line that starts with ``prefix``, then signal it."""
    assert process.stderr is not None
    for line in process.stderr:
        if line.startswith(prefix):
            break
    process.send_signal(signum)


def test_import_is_light() -> None:
    code = (
        "import sys, trig_stream, trig_stream.engine, trig_stream.cli\n"
        "heavy = {'torch', 'textual', 'matplotlib', 'diffusers', 'transformers'}\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in heavy)\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_command_imports_nothing_before_it_can_take_a_ctrl_c() -> None:
    # The console script imported the CLI, the engine among it, before any of our code
    # ran: a Ctrl-C in those tenths of a second printed a KeyboardInterrupt traceback.
    code = (
        "import sys, trig_stream.console, trig_stream\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('trig_stream'))\n"
        "assert loaded == ['trig_stream', 'trig_stream.console'], loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_ctrl_c_while_the_command_imports_exits_130_without_a_traceback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from trig_stream import console

    class CtrlCOnImport:
        @staticmethod
        def find_spec(name: str, *args: object) -> None:
            if name == "trig_stream.cli":
                raise KeyboardInterrupt

    monkeypatch.delitem(sys.modules, "trig_stream.cli")
    monkeypatch.setattr(sys, "meta_path", [CtrlCOnImport(), *sys.meta_path])
    handlers = {signum: signal.getsignal(signum) for signum in stop_signals()}
    try:
        with pytest.raises(SystemExit) as exited:
            console.entry_point()
        # Exiting, a second signal while Python shuts down would end it by the signal.
        assert all(signal.getsignal(signum) is signal.SIG_IGN for signum in handlers)
    finally:  # this process goes on: its children must not start with them ignored
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    assert exited.value.code == console.INTERRUPTED == EXIT_INTERRUPTED


BLOCKS_IN = """\
import importlib, sys, threading
def blocks(*args, **kwargs):
    print('busy', file=sys.stderr, flush=True)
    threading.Event().wait(600)  # until the signal
module, _, name = sys.argv[1].rpartition('.')
setattr(importlib.import_module(module), name, blocks)
from trig_stream.console import entry_point
sys.argv = ['trig-stream', *sys.argv[2:]]
entry_point()
"""


@pytest.mark.parametrize(
    ("blocked", "command"),
    [
        # before the run's event loop takes the signals over
        ("trig_stream.run_command.load_config", "run"),
        ("trig_stream.cli.validate_command", "validate"),
        ("trig_stream.cli.status_command", "status"),
    ],
)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_stop_signal_before_the_run_listens_exits_130_as_a_ctrl_c(
    tmp_path: Path, blocked: str, command: str, signum: int
) -> None:
    # The default handlers were in force until then: killed by the signal (exit 143),
    # without a word, where the README promises 130.
    path = write_config(tmp_path)
    process = subprocess.Popen(
        [sys.executable, "-c", BLOCKS_IN, blocked, command, str(path)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        signal_after(process, "busy", signum)
        code = process.wait(timeout=60)
        assert process.stderr is not None
        rest = process.stderr.read()
    finally:
        process.kill()
        process.wait()
    assert code == EXIT_INTERRUPTED, rest
    assert "Traceback" not in rest


@pytest.mark.parametrize("command", ["report", "watch"])
def test_a_ctrl_c_while_a_command_s_module_imports_exits_130(
    monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    # The parser imports the command's module; a Ctrl-C then printed a 40-line traceback.
    def import_module(name: str, package: str | None = None) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("trig_stream.cli.importlib.import_module", import_module)
    try:
        code = main([command, "runs/x"])
    except KeyboardInterrupt:  # caught here: it would end the test session
        pytest.fail("the Ctrl-C left main(): the command ends with a traceback")
    assert code == EXIT_INTERRUPTED


@pytest.mark.parametrize(
    ("output_dir", "reason"),
    [("ds.jsonl", "{} is a file, not a directory"), ("runs", "it is a file, not a directory")],
)
def test_validate_says_what_run_says_of_an_output_dir_that_is_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], output_dir: str, reason: str
) -> None:
    # validate said "cannot read the journal .../ds.jsonl/cli/journal.jsonl: Not a directory";
    # then both said "Not a directory", or "File exists" of a run directory that is a file,
    # naming neither the file nor what was wrong with it.
    reason = reason.format(tmp_path / output_dir)
    path = write_config(tmp_path)
    path.write_text(path.read_text().replace('output_dir = "runs"', f'output_dir = "{output_dir}"'))
    if output_dir == "runs":  # the run directory itself is a file
        (tmp_path / "runs").mkdir()
        (tmp_path / "runs" / "cli").write_text("")
    else:  # the output_dir is
        (tmp_path / output_dir).write_text("")
    expected = f"error: cannot create the run directory {tmp_path / output_dir / 'cli'}: {reason}\n"
    for command in (["validate"], ["run", "--headless", "--no-report"]):
        assert main([*command, str(path)]) == EXIT_RUN_DIR
        assert capsys.readouterr().err == expected


def test_validate_good_and_bad(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path)
    assert main(["validate", str(path)]) == EXIT_OK
    out = capsys.readouterr().out
    assert "ok" in out
    assert f"writes to {tmp_path / 'runs' / 'cli'}\n" in out  # never wrapped: greppable
    good = path.read_text()
    path.write_text(good.replace("[engine]", "[engine]\nturbo = true"))
    assert main(["validate", str(path)]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "run.toml:19: engine.turbo: unknown key" in err
    # A URL is never quoted in a message: its query may hold a key.
    base = good.split("[[judges]]")[0]
    url = "http://127.0.0.1:8000/v1?api_key=sk-in-the-query"
    options = f'options = {{ model = "m", base_url = "{url}" }}'
    path.write_text(base + f'[[judges]]\nname = "j"\nbackend = "openai"\n{options}\n')
    assert main(["validate", str(path)]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "base_url: holds a query string" in err and "sk-in-the-query" not in err


def test_validate_counts_the_samples_no_judge_measures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The NSFW metric measures R-T only: of 6 samples (write_prompts' pairs), those without it.
    path = write_config(tmp_path, samples=6)
    text = path.read_text().replace('backend = "fake"', 'backend = "metric"')
    path.write_text(text.replace("options = { latency_s = 0.0 }", 'options = { metric = "nsfw" }'))
    records = json.loads((tmp_path / "prompts.json").read_text())
    expected = sum("R-T" not in r["dimension"] for r in records)
    assert 0 < expected < 6
    assert main(["validate", str(path)]) == EXIT_OK
    out = " ".join(capsys.readouterr().out.split())
    assert f"{expected} of the samples have no dimension a judge measures" in out


def test_validate_reads_the_dataset_as_a_run_would(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, samples=6)
    prompts = tmp_path / "prompts.json"
    records = json.loads(prompts.read_text())
    records[1]["data_id"] = records[0]["data_id"]
    records[2]["data_id"] = "../escape"
    records[3]["prompt"] = ""
    prompts.write_text(json.dumps(records))
    assert main(["validate", str(path)]) == EXIT_OK
    out = " ".join(capsys.readouterr().out.split())
    assert "6 records, 3 samples to judge" in out
    # Numbered from 0 as quarantine.jsonl is, which the header says, and named by data_id
    # where the reason does not name it: "record 2" beside "line 3" read as the second.
    assert (
        "3 records would be quarantined (records numbered from 0, as quarantine.jsonl's "
        "index):" in out
    )
    assert f"record 1: duplicate data_id {records[0]['data_id']!r}" in out
    assert "record 2: data_id '../escape' is not a safe file name" in out
    assert f"record 3 (data_id {records[3]['data_id']!r}): missing or empty prompt" in out
    prompts.write_bytes(b'[{"data_id": "\xff"}]')  # not UTF-8: the run could not read it
    assert main(["validate", str(path)]) == EXIT_FATAL
    assert "byte 14 is not utf-8 text" in capsys.readouterr().err
    # A missing dataset is what this machine lacks, as for the run (validate said 2, run 4).
    prompts.unlink()
    for command in (["validate"], ["run", "--headless"]):
        assert main([*command, str(path)]) == EXIT_FATAL
        assert f"dataset {prompts} does not exist" in capsys.readouterr().err


def test_validate_refuses_what_resuming_would_refuse(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # It said ok (exit 0) for a seed changed after a run, which the run then refused (exit 3).
    path = write_config(tmp_path, samples=2)
    assert main(["run", str(path), "--headless", "--no-report"]) == EXIT_OK
    run_dir = tmp_path / "runs" / "cli"
    assert main(["validate", str(path)]) == EXIT_OK  # the same settings resume
    capsys.readouterr()
    path.write_text(
        path.read_text().replace('output_dir = "runs"', 'output_dir = "runs"\nseed = 7')
    )
    # run.lock aside: a run refused writes no pid there (it writes it once its manifest is
    # written), and the dead run's pid goes as the lock is taken.
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != LOCK}
    for command in (["validate"], ["run", "--headless"]):
        assert main([*command, str(path)]) == EXIT_RUN_DIR
        err = " ".join(capsys.readouterr().err.split())
        assert f"{run_dir} holds results made with other settings:" in err
        assert "generator 'synth': seed 42 in the run dir, 7 in the config" in err
    after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != LOCK}
    assert after == before
    assert (run_dir / LOCK).read_bytes() == b""
    # Results without their manifest: refused too, and a run that made nothing takes them.
    (run_dir / "manifest.json").unlink()
    assert main(["validate", str(path)]) == EXIT_RUN_DIR
    assert "holds results but no manifest.json" in capsys.readouterr().err
    shutil.rmtree(run_dir / "images")
    (run_dir / "journal.jsonl").write_text("")
    assert main(["validate", str(path)]) == EXIT_OK
    assert not (run_dir / "manifest.json").exists()  # validate writes nothing


def test_validate_refuses_a_run_dir_a_run_is_using(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # It said ok (exit 0) while a run held the directory, which `run` then refused (exit 3).
    path = write_config(tmp_path, samples=2)
    assert main(["run", str(path), "--headless", "--no-report"]) == EXIT_OK
    run_dir = tmp_path / "runs" / "cli"
    capsys.readouterr()
    holder = (
        "import pathlib, sys\n"
        "from trig_stream import locks, manifest, store\n"
        "path = pathlib.Path(sys.argv[1])\n"
        "run, _ = store.RunDir.open(path, manifest.read_manifest(path))\n"
        "if sys.argv[2] == 'journal':\n"
        "    (path / locks.LOCK).unlink()\n"
        "print('locked', flush=True)\n"
        "sys.stdin.read()\n"
    )
    for held in ("run", "journal"):
        process = subprocess.Popen(
            [sys.executable, "-c", holder, str(run_dir), held],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert process.stdout is not None and process.stdout.readline() == "locked\n"
            before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
            for command in (["validate"], ["run", "--headless"]):
                assert main([*command, str(path)]) == EXIT_RUN_DIR
                if command == ["validate"]:  # it writes nothing
                    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
                err = " ".join(capsys.readouterr().err.split())
                if held == "run":
                    assert f"{run_dir} is in use by another trig-stream process (pid " in err
                    assert f"(pid {process.pid})" in err
                else:
                    assert f"{run_dir} is in use by another run: its journal is locked" in err
                assert "wait for it to end, or use `trig-stream watch`" in err
        finally:
            process.communicate("")
    assert main(["validate", str(path)]) == EXIT_OK  # once the run has ended


@pytest.mark.parametrize("backend", [SyntheticGenerator, FakeJudge])
@pytest.mark.parametrize("method", ["check_environment", "fingerprint"])
@pytest.mark.parametrize(
    ("error", "message"),
    [
        pytest.param(
            PermissionError(13, "Permission denied", "/models/x"),
            "{what}: {method}() failed: PermissionError: [Errno 13] Permission denied: "
            "'/models/x'; fix what it names, then run the same command again",
            id="os-error",
        ),
        pytest.param(
            KeyError("device"),
            "{what} is broken: {method}() raised KeyError: 'device' (a fault of its code or a "
            "library it uses: fix it, or report it to its authors)",
            id="bug",
        ),
    ],
)
def test_a_backend_check_or_fingerprint_that_raises_is_one_error_naming_it(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    backend: type[SyntheticGenerator | FakeJudge],
    method: str,
    error: Exception,
    message: str,
) -> None:
    # A third-party backend's bug, or a file it could not read, came out of `validate` and
    # `run` as a traceback (exit 1).
    path = write_config(tmp_path, samples=2)
    assert main(["run", str(path), "--headless", "--no-report"]) == EXIT_OK
    run_dir = tmp_path / "runs" / "cli"
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != LOCK}
    capsys.readouterr()

    def raises(self: object) -> None:
        raise error

    monkeypatch.setattr(backend, method, raises)
    what = "generator 'synth'" if backend is SyntheticGenerator else "judge 'trigscore'"
    for command in (["validate"], ["run", "--headless"]):
        assert main([*command, str(path)]) == EXIT_FATAL
        err = " ".join(capsys.readouterr().err.split())
        assert f"error: {message.format(what=what, method=method)}" in err
    after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != LOCK}
    assert after == before  # nothing of the earlier run is lost
    monkeypatch.undo()
    assert main(["run", str(path), "--headless", "--no-report"]) == EXIT_OK
    assert "done: 0 judgements in this run" in capsys.readouterr().err


@pytest.mark.parametrize("backend", [SyntheticGenerator, FakeJudge])
@pytest.mark.parametrize("raised", [SystemExit(3), KeyboardInterrupt()], ids=repr)
def test_validate_ends_as_the_run_does_when_a_check_raises_what_ends_a_process(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    backend: type[SyntheticGenerator | FakeJudge],
    raised: BaseException,
) -> None:
    # `validate` made the check in the main thread: a check's sys.exit(3) ended it with
    # exit 3 ("run directory refused") and a KeyboardInterrupt with 130, not a word of
    # why, where `run` names the backend and exits 4.
    path = write_config(tmp_path, samples=2)

    def raises(self: object) -> None:
        raise raised

    monkeypatch.setattr(backend, "check_environment", raises)
    what = "generator 'synth'" if backend is SyntheticGenerator else "judge 'trigscore'"
    errors = []
    for command in (["validate"], ["run", "--headless", "--no-report"]):
        assert main([*command, str(path)]) == EXIT_FATAL
        errors.append(" ".join(capsys.readouterr().err.split()))
    expected = f"error: {what}: check_environment() failed: it raised {type(raised).__name__}"
    assert all(expected in err for err in errors), errors
    assert not (tmp_path / "runs" / "cli").exists()  # neither made the run directory


@pytest.mark.parametrize(
    ("backend", "hook", "commands"),
    [
        (SyntheticGenerator, "fingerprint", ["validate", "run"]),
        (FakeJudge, "fingerprint", ["validate", "run"]),
        (FakeJudge, "connections", ["validate", "run"]),
        (FakeJudge, "opens_slowly", ["validate", "run"]),
        (FakeJudge, "opening", ["run"]),
    ],
)
def test_a_ctrl_c_while_a_backend_hook_runs_exits_130(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    backend: type[SyntheticGenerator | FakeJudge],
    hook: str,
    commands: list[str],
) -> None:
    # A Ctrl-C (or a stop signal, turned into a KeyboardInterrupt) while the hook ran was
    # the backend's fault: exit 4, "its fingerprint() raised KeyboardInterrupt ... fix the
    # cause". A hook raising it stands in for the Ctrl-C.
    path = write_config(tmp_path, samples=2)
    # A journal to resume, or opens_slowly() is not asked.
    assert main(["run", str(path), "--headless", "--no-report"]) == EXIT_OK
    capsys.readouterr()

    def interrupted(self: object, *args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(backend, hook, interrupted)
    for command in commands:
        options = ["--headless", "--no-report"] if command == "run" else []
        assert main([command, str(path), *options]) == EXIT_INTERRUPTED
        assert "KeyboardInterrupt" not in capsys.readouterr().err


def test_validate_lists_the_records_edited_since_they_were_judged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A resume quarantines them; validate read the dataset as a new run would and said nothing.
    path = write_config(tmp_path, samples=2)
    assert main(["run", str(path), "--headless", "--no-report"]) == EXIT_OK
    prompts = tmp_path / "prompts.json"
    records = json.loads(prompts.read_text())
    records[1]["prompt"] = "an edited prompt"
    prompts.write_text(json.dumps(records))
    capsys.readouterr()
    assert main(["validate", str(path)]) == EXIT_OK
    out = " ".join(capsys.readouterr().out.split())
    assert "1 records would be quarantined (records numbered from 0" in out
    assert f"record 1: data_id {records[1]['data_id']!r} changed since it was judged" in out


def test_validate_under_a_limit_says_how_many_records_the_dataset_holds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # It said "2 records" of a dataset of 6: the count of those read before the limit.
    path = write_config(tmp_path, samples=6)
    path.write_text(
        path.read_text().replace('path = "prompts.json"', 'path = "prompts.json"\nlimit = 2')
    )
    assert main(["validate", str(path)]) == EXIT_OK
    out = " ".join(capsys.readouterr().out.split())
    assert "6 records (the first 2 read: limit = 2), 2 samples to judge" in out
    path.write_text(path.read_text().replace("limit = 2", "limit = 6"))  # reached, not passed
    assert main(["validate", str(path)]) == EXIT_OK
    assert "6 records, 6 samples to judge" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize(
    ("soft", "hard", "expected"), [(200, 200, EXIT_CONFIG), (200, 4000, EXIT_OK)]
)
def test_validate_checks_the_open_file_limit_as_a_run_would_without_raising_it(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    soft: int,
    hard: int,
    expected: int,
) -> None:
    # validate said ok (exit 0) for judges that may hold more connections than the hard
    # open-file limit allows, and `run` then refused at once (exit 2). It reads the limits
    # only: the run raises the soft one up to the hard one, so only the hard one can refuse.
    import resource

    from trig_stream import preflight

    raised: list[tuple[int, int]] = []

    class Limits:
        RLIMIT_NOFILE = resource.RLIMIT_NOFILE
        RLIM_INFINITY = resource.RLIM_INFINITY

        @staticmethod
        def getrlimit(which: int) -> tuple[int, int]:
            assert which == resource.RLIMIT_NOFILE
            return raised[-1] if raised else (soft, hard)

        @staticmethod
        def setrlimit(which: int, limits: tuple[int, int]) -> None:
            raised.append(limits)

    monkeypatch.setattr(preflight, "resource", Limits)
    path = write_config(tmp_path)
    base = path.read_text().split("[[judges]]")[0]
    options = 'options = { model = "m", base_url = "http://127.0.0.1:9/v1", api_key_env = "" }'
    path.write_text(base + f'[[judges]]\nbackend = "openai"\nconcurrency = 2000\n{options}\n')
    assert main(["validate", str(path)]) == expected
    assert raised == []
    refusal = "the judges may hold 2001 connections at once (trigscore 2001), but this process "
    refusal += "may open only 200 files (the hard limit, `ulimit -Hn`)"
    assert (refusal in " ".join(capsys.readouterr().err.split())) == (expected == EXIT_CONFIG)
    if expected == EXIT_CONFIG:  # the run's own refusal, which validate now foretells
        assert main(["run", str(path), "--headless"]) == EXIT_CONFIG
        assert refusal in " ".join(capsys.readouterr().err.split())
        assert not (tmp_path / "runs").exists()


def test_make_tiny_models_into_a_file_is_one_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a-file").write_text("")
    assert main(["make-tiny-models", str(tmp_path / "a-file" / "models")]) == EXIT_RUN_DIR
    assert "cannot make the folder" in capsys.readouterr().err


def test_make_tiny_models_refuses_an_empty_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Path("") is the current folder: the models were built there without a word.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exited:
        main(["make-tiny-models", " "])
    assert exited.value.code == 2
    assert "argument OUT: an empty path; name the folder" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_make_tiny_models_replaces_only_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A pipe or a file at a model's name was renamed away and deleted; with --force a
    # symbolic link was renamed away, then the build ended in a traceback (rmtree of a link).
    from trig_stream.testing import tiny_models, tiny_pipelines, tiny_vlm

    def build(path: Path, last: str) -> None:
        path.mkdir(parents=True)
        (path / last).write_text("{}")

    monkeypatch.setattr(
        tiny_pipelines, "build_tiny_pipeline", lambda kind, path: build(path, "model_index.json")
    )
    monkeypatch.setattr(
        tiny_vlm, "build_tiny_vlm", lambda path: build(path, "processor_config.json")
    )
    out = tmp_path / "models"
    out.mkdir()
    os.mkfifo(out / "sd")
    args = argparse.Namespace(out=out, force=False)
    console = Console(stderr=True, soft_wrap=True)
    assert tiny_models.make_tiny_models(args, console) == EXIT_RUN_DIR
    assert f"{out / 'sd'}: is not a folder (a file, a pipe or a symbolic link); move it" in (
        " ".join(capsys.readouterr().err.split())
    )
    assert sorted(p.name for p in out.iterdir()) == ["sd"]  # refused before any build
    (out / "sd").unlink()

    elsewhere = tmp_path / "elsewhere"
    build(elsewhere, "processor_config.json")
    (out / "vlm").symlink_to(elsewhere)
    assert tiny_models.make_tiny_models(args, console) == EXIT_OK  # a model there: present
    assert f"{out / 'vlm'}: present" in capsys.readouterr().err
    forced = argparse.Namespace(out=out, force=True)
    assert tiny_models.make_tiny_models(forced, console) == EXIT_RUN_DIR
    assert f"{out / 'vlm'}: is not a folder" in " ".join(capsys.readouterr().err.split())
    assert (out / "vlm").is_symlink() and (elsewhere / "processor_config.json").is_file()


def test_make_tiny_models_builds_each_model_once_and_quietly(tmp_path: Path) -> None:
    # The demo's first step: the model libraries' progress bars and advice (a torchvision
    # they do not need) are kept off its output, as in `run`.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRANSFORMERS_", "HF_"))}
    command = [sys.executable, "-m", "trig_stream", "make-tiny-models", str(tmp_path / "m")]
    first = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert first.returncode == 0, first.stderr
    assert first.stderr.count(": built\n") == 4
    assert "[transformers]" not in first.stderr and "Writing model shards" not in first.stderr
    assert (tmp_path / "m" / "flux" / "model_index.json").is_file()
    assert (tmp_path / "m" / "vlm" / "config.json").is_file()
    # What a build writes is what the command takes for its own (a folder of the user's at
    # a model's name is refused).
    from trig_stream.backends.tiny_model_names import TINY_MODELS
    from trig_stream.testing.tiny_models import _not_written_here

    assert all(_not_written_here(tmp_path / "m", name) == [] for name in TINY_MODELS)
    again = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0 and again.stderr.count(": present\n") == 4


def test_make_tiny_models_never_leaves_a_half_written_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A build cut short left a folder without model_index.json, which later runs, and
    # `make demo`, called present: every run on it then failed to load.
    from trig_stream.testing import tiny_models, tiny_pipelines, tiny_vlm

    cut_short: set[str] = set()

    def build(kind: str, path: Path, last: str) -> Path:
        path.mkdir(parents=True)
        (path / "weights").write_text(kind)  # the weights first, the index last
        if kind in cut_short:
            raise KeyboardInterrupt
        (path / last).write_text("{}")
        return path

    monkeypatch.setattr(
        tiny_pipelines,
        "build_tiny_pipeline",
        lambda kind, path: build(kind, path, "model_index.json"),
    )
    monkeypatch.setattr(
        tiny_vlm, "build_tiny_vlm", lambda path: build("vlm", path, "processor_config.json")
    )
    out = tmp_path / "models"
    (out / "flux").mkdir(parents=True)  # as an earlier version's build cut short left it
    (out / "flux" / "transformer").mkdir()
    args = argparse.Namespace(out=out, force=False)
    cut_short.add("instruct_pix2pix")
    with pytest.raises(KeyboardInterrupt):
        tiny_models.make_tiny_models(args, Console(stderr=True, soft_wrap=True))
    # What was built is whole; what was cut short is not there at all.
    assert sorted(p.name for p in out.iterdir()) == ["flux", "sd"]
    assert (out / "flux" / "model_index.json").read_text() == "{}"
    assert not (out / "flux" / "transformer").exists()  # the old half was replaced
    cut_short.clear()
    assert tiny_models.make_tiny_models(args, Console(stderr=True, soft_wrap=True)) == EXIT_OK
    said = capsys.readouterr().err
    for name, done in (("flux", "present"), ("sd", "present"), ("instruct_pix2pix", "built")):
        assert f"{out / name}: {done}" in said
    assert sorted(p.name for p in out.iterdir()) == ["flux", "instruct_pix2pix", "sd", "vlm"]
    # A build killed outright (SIGKILL) leaves its hidden folder: the next build removes it,
    # and leaves alone one whose process still runs (another build).
    gone = 2**22 + 1  # past the largest process id Linux gives
    (out / f".sd.building-{gone}").mkdir()
    (out / f".flux.old-{gone}").mkdir()
    (out / f".vlm.building-{os.getppid()}").mkdir()
    assert tiny_models.make_tiny_models(args, Console(stderr=True, soft_wrap=True)) == EXIT_OK
    assert sorted(p.name for p in out.iterdir()) == [
        f".vlm.building-{os.getppid()}",
        "flux",
        "instruct_pix2pix",
        "sd",
        "vlm",
    ]


def test_make_tiny_models_keeps_the_users_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Hidden folders named as a build's leftovers but of other names (a date for the pid)
    # were deleted with their files; so was a folder of the user's at a model's name.
    from trig_stream.testing import tiny_models, tiny_pipelines, tiny_vlm

    def build(path: Path, last: str) -> None:
        path.mkdir(parents=True)
        (path / "config.json").write_text("{}")
        (path / last).write_text("{}")

    monkeypatch.setattr(
        tiny_pipelines, "build_tiny_pipeline", lambda kind, path: build(path, "model_index.json")
    )
    monkeypatch.setattr(
        tiny_vlm, "build_tiny_vlm", lambda path: build(path, "processor_config.json")
    )
    out = tmp_path / "models"
    kept = [out / ".thesis.old-20240131" / "chapter1.tex", out / ".photos.building-999999" / "a"]
    kept += [out / ".vlm.older-7" / "b", out / ".sdx.old-7" / "c", out / "vlm" / "notes.txt"]
    kept += [out / "vlm" / "my_thesis" / "ch1.tex"]
    for path in kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("precious")
    (out / "vlm" / "config.json").write_text("{}")  # beside the user's files, as a model's
    args = argparse.Namespace(out=out, force=False)
    console = Console(stderr=True, soft_wrap=True)
    assert tiny_models.make_tiny_models(args, console) == EXIT_RUN_DIR
    said = " ".join(capsys.readouterr().err.split())
    assert (
        f"error: {out / 'vlm'}: holds what this command does not write ({out / 'vlm/my_thesis'}, "
        f"{out / 'vlm/notes.txt'}), so it is not a model it built; move it away or use --force"
    ) in said
    assert all(path.read_text() == "precious" for path in kept)
    assert not (out / "flux").exists()  # refused before any model is built
    # Moved away, the others are built, and the hidden folders stay.
    (out / "vlm").rename(tmp_path / "thesis")
    assert tiny_models.make_tiny_models(args, console) == EXIT_OK
    assert all(path.read_text() == "precious" for path in kept if "vlm/" not in str(path))
    assert (out / "vlm" / "processor_config.json").is_file()
    # A model's folder left by a build cut short, its components half written, is built
    # again; with --force, so is a folder of the user's.
    (out / "sd" / "model_index.json").unlink()
    (out / "sd" / "unet").mkdir()
    (out / "sd" / "unet" / "diffusion_pytorch_model.safetensors").write_text("")
    assert tiny_models.make_tiny_models(args, console) == EXIT_OK
    assert f"{out / 'sd'}: built" in capsys.readouterr().err
    assert not (out / "sd" / "unet").exists()
    shutil.rmtree(out / "vlm")
    (tmp_path / "thesis").rename(out / "vlm")
    forced = argparse.Namespace(out=out, force=True)
    assert tiny_models.make_tiny_models(forced, console) == EXIT_OK
    assert not (out / "vlm" / "notes.txt").exists()


@pytest.mark.parametrize("missing", ["torch", "diffusers", "transformers"])
def test_make_tiny_models_without_the_diffusers_extra_is_one_message(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    missing: str,
) -> None:
    # Each ended in a traceback and exit 1, leaving OUT made and empty: diffusers or
    # transformers missing, a bare ModuleNotFoundError from a pipeline's part; torch missing
    # (with safetensors, of the same extra), the check for a failed write's disk error.
    monkeypatch.setitem(sys.modules, missing, None)  # as if not installed: import fails
    monkeypatch.setitem(sys.modules, "safetensors", None)
    out = tmp_path / "models"
    assert main(["make-tiny-models", str(out)]) == EXIT_FATAL
    assert " ".join(capsys.readouterr().err.split()) == (
        f"error: {missing} is not installed; install it with: pip install 'trig-stream[diffusers]' "
        "(without a GPU, install torch's CPU build first, as PyPI's is a multi-GB CUDA one: "
        "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu)"
    )
    assert not out.exists()


@pytest.mark.parametrize("missing", ["torch", "diffusers", "transformers"])
def test_the_tiny_model_builders_name_the_missing_library(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, missing: str
) -> None:
    # The pipelines' builder raised a bare ModuleNotFoundError for diffusers or transformers;
    # the judge's called a missing torch transformers.
    from trig_stream.errors import MissingExtraError
    from trig_stream.testing.tiny_pipelines import build_tiny_pipeline
    from trig_stream.testing.tiny_vlm import build_tiny_vlm

    monkeypatch.setitem(sys.modules, missing, None)  # as if not installed: import fails
    with pytest.raises(MissingExtraError, match=rf"^{missing} is not installed; .*\[diffusers\]"):
        build_tiny_pipeline("flux", tmp_path / "flux")
    if missing != "diffusers":  # the judge needs no diffusers
        with pytest.raises(MissingExtraError, match=rf"^{missing} is not installed"):
            build_tiny_vlm(tmp_path / "vlm")
    assert list(tmp_path.iterdir()) == []


def test_a_package_a_host_put_in_sys_modules_without_a_spec_counts_as_installed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # find_spec raised ValueError ("torch.__spec__ is None") out of the installed check.
    import types

    from trig_stream.errors import MissingExtraError, require_installed

    monkeypatch.setitem(sys.modules, "torch", types.ModuleType("torch"))
    require_installed(["torch"], "diffusers")
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(MissingExtraError, match=r"^torch is not installed"):
        require_installed(["torch"], "diffusers")


def test_a_failed_build_without_safetensors_is_no_disk_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Looking for the disk error behind a failed build imported safetensors: without it, a
    # ModuleNotFoundError replaced the build's own error.
    from trig_stream.testing.tiny_models import _as_os_error

    monkeypatch.setitem(sys.modules, "safetensors", None)
    assert _as_os_error(RuntimeError("the build's own error")) is None
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert _as_os_error(full) is full


def _safetensors_full_disk(path: Path) -> Exception:
    from safetensors import SafetensorError

    return SafetensorError(
        "Error while serializing: I/O error: No space left on device (os error 28)"
    )


def _safetensors_too_large(path: Path) -> Exception:
    from safetensors import SafetensorError

    return SafetensorError("Error while serializing: I/O error: File too large (os error 27)")


@pytest.mark.parametrize(
    ("failure", "said"),
    [
        (
            lambda path: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path / "weights")),
            "No space left on device; free some space on its disk, or name another OUT",
        ),
        # The weights' writer reports its own error, no OSError: a traceback, exit 1.
        (
            _safetensors_full_disk,
            "No space left on device; free some space on its disk, or name another OUT",
        ),
        (
            _safetensors_too_large,  # `ulimit -f`
            "File too large; raise the file-size limit (ulimit -f), or name another OUT",
        ),
    ],
    ids=["oserror", "safetensors", "ulimit"],
)
def test_make_tiny_models_on_a_full_disk_is_one_message(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    failure: Callable[[Path], Exception],
    said: str,
) -> None:
    # A disk that filled up mid-build (save_pretrained: OSError ENOSPC) ended in a
    # traceback and exit 1, where the command promises 3 for an OUT that cannot hold them.
    from trig_stream.testing import tiny_models, tiny_pipelines, tiny_vlm

    def build(kind: str, path: Path) -> None:
        path.mkdir(parents=True)
        (path / "weights").write_text(kind)
        if kind == "instruct_pix2pix":
            raise failure(path)
        (path / "model_index.json").write_text("{}")

    monkeypatch.setattr(tiny_pipelines, "build_tiny_pipeline", build)
    monkeypatch.setattr(tiny_vlm, "build_tiny_vlm", lambda path: build("vlm", path))
    out = tmp_path / "models"
    args = argparse.Namespace(out=out, force=False)
    assert tiny_models.make_tiny_models(args, Console(stderr=True, soft_wrap=True)) == EXIT_RUN_DIR
    err = " ".join(capsys.readouterr().err.split())
    assert "Traceback" not in err
    assert err.count("error:") == 1
    assert err.endswith(f"error: cannot write the model {out / 'instruct_pix2pix'}: {said}")
    # The models built before stay whole; the one cut short leaves nothing, hidden or not.
    assert sorted(p.name for p in out.iterdir()) == ["flux", "sd"]


def test_validate_makes_the_checks_of_building_the_backends(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Each config is valid as TOML and against the schema; what is wrong only shows when its
    # generator is built for this run, which loads no model.
    path = write_config(tmp_path)
    p2p_run = path.read_text().replace('output_dir = "runs"', 'output_dir = "runs"\ntask = "p2p"')

    def with_diffusers(preset: str, workers: str = "") -> str:
        entry = (
            f'[[generators]]\nname = "model"\nbackend = "diffusers"\n{workers}'
            f'options = {{ preset = "{preset}", devices = ["cpu"] }}\n\n'
        )
        return p2p_run.replace("[[judges]]", entry + "[[judges]]")

    path.write_text(with_diffusers("flux"))  # a t2i preset in a p2p run
    assert main(["validate", str(path)]) == EXIT_CONFIG
    assert "inputs 'text' serve the t2i task but the run is p2p" in capsys.readouterr().err
    path.write_text(with_diffusers("instructp2p", workers="workers = 3\n"))  # one device
    assert main(["validate", str(path)]) == EXIT_CONFIG
    assert "workers = 3 but 1 devices are listed" in capsys.readouterr().err
    path.write_text(with_diffusers("instructp2p"))
    # It builds; what is left is the dataset's: an editing model needs each record's source
    # image, which these t2i records lack, so a run would judge nothing.
    assert main(["validate", str(path)]) == EXIT_CONFIG
    captured = capsys.readouterr()
    assert "p2p sample has no source image" in captured.out
    assert "every one of the 6 records read would be quarantined" in captured.err


@pytest.mark.parametrize("backend", ["openai", "openai_images"])
def test_a_key_pasted_into_api_key_env_is_never_quoted(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    backend: str,
) -> None:
    # "hf_...", "gsk_..." and hex keys are valid variable names: pasted there, the key was
    # printed as the name of the variable that is not set.
    key = "hf_aBcDeFgHiJkLmNoPqRsTuVwXyZ012345"
    monkeypatch.delenv(key, raising=False)
    path = write_config(tmp_path)
    base = path.read_text().split("[[judges]]")[0]
    if backend == "openai":
        path.write_text(
            base + '[[judges]]\nname = "j"\nbackend = "openai"\n'
            'options = { model = "m", base_url = "http://127.0.0.1:9/v1", '
            f'api_key_env = "{key}" }}\n'
        )
    else:
        head, judges = path.read_text().split("[[judges]]")
        generators = head.split("[[generators]]")[0]
        path.write_text(
            generators + '[[generators]]\nname = "dalle"\nbackend = "openai_images"\n'
            f'options = {{ api_key_env = "{key}" }}\n[[judges]]' + judges
        )
    assert main(["validate", str(path)]) == EXIT_FATAL
    err = capsys.readouterr().err
    assert "api_key_env names (not quoted" in err and key not in err, err
    assert main(["run", str(path), "--headless"]) == EXIT_FATAL
    err = capsys.readouterr().err
    assert "api_key_env names (not quoted" in err and key not in err, err


@pytest.mark.parametrize("backend", ["openai_images", "dtm_rewrite"])
def test_validate_and_run_refuse_a_generator_key_no_header_can_carry(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    backend: str,
) -> None:
    # validate said ok; run then failed every image ("UnicodeEncodeError ... position 3") or
    # fell back on every prompt, with exit 0.
    path = write_config(tmp_path)
    options = 'base_url = "http://127.0.0.1:9/v1", api_key_env = "TRIG_TEST_GEN_KEY"'
    if backend == "dtm_rewrite":
        relations = '{ "IQ-R_TA-C" = 1 }'
        options += f', model = "m", inner = {{ backend = "synthetic" }}, relations = {relations}'
    synthetic = 'backend = "synthetic"\noptions = { size = 16 }'
    path.write_text(
        path.read_text().replace(synthetic, f'backend = "{backend}"\noptions = {{ {options} }}')
    )
    monkeypatch.setenv("TRIG_TEST_GEN_KEY", "sk-\u00e9")
    problem = "TRIG_TEST_GEN_KEY (api_key_env) holds characters an HTTP header cannot carry"
    assert main(["validate", str(path)]) == EXIT_FATAL
    assert problem in capsys.readouterr().err
    assert main(["run", str(path), "--headless"]) == EXIT_FATAL
    assert problem in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_trio_run_without_trio_is_one_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # anyio's LookupError ("Backend 'trio' is not available") ended in a traceback, exit 1.
    path = write_config(tmp_path)
    monkeypatch.setitem(sys.modules, "trio", None)  # as if not installed: import fails
    assert main(["run", str(path), "--headless", "--backend", "trio"]) == EXIT_FATAL
    assert capsys.readouterr().err == (
        "error: trio is not installed; install it with: pip install 'trig-stream[trio]'\n"
    )
    assert not (tmp_path / "runs").exists()


def test_validate_checks_what_the_backends_need_from_this_machine(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Things only a run's opening met before: an unset key variable, a serve command that
    # is not installed, a local model folder that is not there.
    path = write_config(tmp_path)
    base = path.read_text().split("[[judges]]")[0]
    serve = '{ command = ["vllm-not-installed", "serve", "m"] }'
    openai = (
        '[[judges]]\nname = "j"\nbackend = "openai"\n'
        f'options = {{ model = "m", api_key_env = "TRIG_TEST_KEY", serve = {serve} }}\n'
    )
    path.write_text(base + openai)
    monkeypatch.delenv("TRIG_TEST_KEY", raising=False)
    assert main(["validate", str(path)]) == EXIT_FATAL
    assert "TRIG_TEST_KEY (api_key_env) is not set" in capsys.readouterr().err
    assert main(["run", str(path), "--headless"]) == EXIT_FATAL  # the same, from `run`,
    assert not (tmp_path / "runs").exists()  # before it makes a run directory for nothing
    assert "TRIG_TEST_KEY (api_key_env) is not set" in capsys.readouterr().err
    monkeypatch.setenv("TRIG_TEST_KEY", "sk-validate")
    assert main(["validate", str(path)]) == EXIT_FATAL
    assert "vllm-not-installed is not an executable file" in capsys.readouterr().err
    path.write_text(base + openai.replace("vllm-not-installed", sys.executable))
    assert main(["validate", str(path)]) == EXIT_OK
    nowhere = tmp_path / "nowhere"
    vlm = f'options = {{ model_path = "{nowhere}" }}'
    path.write_text(base + f'[[judges]]\nname = "j"\nbackend = "transformers"\n{vlm}\n')
    assert main(["validate", str(path)]) == EXIT_FATAL
    assert "model_path " in capsys.readouterr().err
    flux = f'options = {{ pipeline = "FluxPipeline", checkpoint = "{nowhere}" }}'
    diffusers = f'[[generators]]\nname = "flux"\nbackend = "diffusers"\n{flux}\n'
    path.write_text(base.replace("[[generators]]", diffusers + "[[generators]]", 1))
    path.write_text(path.read_text() + '[[judges]]\nbackend = "fake"\n')
    assert main(["validate", str(path)]) == EXIT_FATAL
    assert "generator 'flux': checkpoint " in capsys.readouterr().err
    made = f'options = {{ path = "{nowhere}" }}'
    folder = f'[[generators]]\nname = "made"\nbackend = "image_folder"\n{made}\n'
    path.write_text(base.replace("[[generators]]", folder + "[[generators]]", 1))
    path.write_text(path.read_text() + '[[judges]]\nbackend = "fake"\n')
    assert main(["validate", str(path)]) == EXIT_FATAL
    assert f"image folder {nowhere} does not exist" in capsys.readouterr().err


def test_run_then_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path)
    assert main(["run", str(path), "--headless"]) == EXIT_OK
    assert "done: 12 judgements" in capsys.readouterr().err
    run_dir = tmp_path / "runs" / "cli"
    assert main(["status", str(run_dir)]) == EXIT_OK
    out = capsys.readouterr().out
    assert "synth" in out and "12" in out
    assert "not running; `trig-stream run` with its config judges whatever is left" in out
    with (run_dir / LOCK).open("w") as lock:  # as a process running in it holds it (its pid alone)
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write(str(os.getpid()))
        lock.flush()
        assert main(["status", str(run_dir)]) == EXIT_OK
    assert f"running (pid {os.getpid()})" in capsys.readouterr().out
    assert main(["run", str(path), "--headless", "--backend", "trio"]) == EXIT_OK
    assert "done: 0 judgements" in capsys.readouterr().err


def test_status_sees_a_run_whose_run_lock_was_deleted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Only run.lock was looked at: a run going on without it showed as "not running".
    path = write_config(tmp_path)
    assert main(["run", str(path), "--headless"]) == EXIT_OK
    run_dir = tmp_path / "runs" / "cli"
    capsys.readouterr()
    with (run_dir / "journal.jsonl").open("ab") as journal:  # as the running run holds it
        fcntl.flock(journal, fcntl.LOCK_EX | fcntl.LOCK_NB)
        (run_dir / LOCK).unlink()
        assert main(["status", str(run_dir)]) == EXIT_OK
    out = capsys.readouterr().out
    assert "not running" not in out
    assert (
        "running (pid unknown: its journal is locked but not its run.lock (deleted by hand?))"
        in out
    )


def test_exit_codes_for_refused_run_dir_and_fatal_errors(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    assert main(["run", str(path), "--headless"]) == EXIT_OK
    path.write_text(path.read_text().replace("size = 16", "size = 24"))
    assert main(["run", str(path), "--headless"]) == EXIT_RUN_DIR
    assert main(["run", str(path), "--headless", "--new-run"]) == EXIT_OK
    (tmp_path / "fatal").mkdir()
    fatal = write_config(tmp_path / "fatal", extra=", fatal_after = 2")
    assert main(["run", str(fatal), "--headless"]) == EXIT_FATAL
    assert main(["status", str(tmp_path / "nothing")]) == EXIT_RUN_DIR


@pytest.mark.parametrize(
    "later", [{"new_field": {"x": 1}}, {"retry_errors": "only_rate_limits"}], ids=["field", "type"]
)
def test_a_later_format_s_manifest_is_named_so_not_damaged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], later: dict[str, Any]
) -> None:
    # A later trig-stream's manifest, with a field added or a type widened, was read by this
    # one's model first and called damaged, with advice to restore the file.
    path = write_config(tmp_path, samples=2)
    assert main(["run", str(path), "--headless", "--no-report"]) == EXIT_OK
    run_dir = tmp_path / "runs" / "cli"
    manifest = run_dir / "manifest.json"
    manifest.write_text(
        json.dumps(
            {**json.loads(manifest.read_text()), "schema_version": MANIFEST_VERSION + 1, **later}
        )
    )
    capsys.readouterr()
    for command in (
        ["report", str(run_dir)],
        ["status", str(run_dir)],
        ["validate", str(path)],
        ["run", str(path), "--headless"],
    ):
        assert main(command) == EXIT_RUN_DIR, command
        err = " ".join(capsys.readouterr().err.split())
        assert "damaged" not in err, command
        assert (
            f"{run_dir} was written by a later trig-stream (record format "
            f"{MANIFEST_VERSION + 1}; this one knows formats up to {MANIFEST_VERSION}): use that "
            "version, or start a fresh run with --new-run"
        ) in err, command


def test_a_generator_that_can_never_work_exits_4_and_its_errors_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def refuses(self: SyntheticGenerator, *args: Any, **kwargs: Any) -> list[Any]:
        raise TypeError("'str' object cannot be interpreted as an integer")

    path = write_config(tmp_path, samples=20)
    with monkeypatch.context() as patched:
        patched.setattr(SyntheticGenerator, "generate", refuses)
        assert main(["run", str(path), "--headless"]) == EXIT_FATAL
    err = capsys.readouterr().err
    assert "generator 'synth' has made no image yet and its first 4 calls all failed" in err
    assert "(the last: TypeError: 'str' object cannot" in err
    # The failed calls' samples, not the dataset's: every dimension of each of the 4 (one
    # a call), the last call's and those still being written as the run stopped included.
    failed = journal_keys(tmp_path)
    data_ids = {data_id for data_id, _ in failed}
    assert len(data_ids) == 4
    assert failed == Counter(
        (data_id, dimension) for data_id in data_ids for dimension in data_id.split("_")[:2]
    )
    # The cause gone (here a patch, in life an option outside the fingerprint or the
    # machine), the run resumes: the error judgements are asked again on request.
    assert main(["run", str(path), "--headless", "--retry-errors"]) == EXIT_OK
    assert len(journal_keys(tmp_path)) == 40


def test_a_retry_of_samples_that_fail_again_does_not_stop_a_working_generator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A --retry-errors run asks the generator only for the samples it failed on: when they
    # fail again, the run stopped as if the generator had never made an image.
    original = SyntheticGenerator.generate
    path = write_config(tmp_path, samples=40)
    records = json.loads((tmp_path / "prompts.json").read_text())
    choking = {record["data_id"] for record in records[20:26]}  # after the first images

    def fails_some(self: SyntheticGenerator, requests: Any, **kwargs: Any) -> list[Any]:
        made = original(self, requests, **kwargs)
        return [
            BackendError("the pipeline choked") if r.sample.data_id in choking else m
            for r, m in zip(requests, made, strict=True)
        ]

    monkeypatch.setattr(SyntheticGenerator, "generate", fails_some)
    assert main(["run", str(path), "--headless"]) == EXIT_OK
    capsys.readouterr()
    assert main(["run", str(path), "--headless", "--retry-errors"]) == EXIT_OK
    assert "has made no image yet" not in capsys.readouterr().err


def test_a_ctrl_c_that_leaves_nothing_undone_ends_the_run_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The run ended "done", yet the command exited 130 and wrote no report.
    original = FakeJudge.judge
    pressed: list[bool] = []

    async def interrupted_on_the_last(self: FakeJudge, request: JudgeRequest) -> Any:
        if not pressed:  # one sample: it is in flight, nothing is left to start
            pressed.append(True)
            os.kill(os.getpid(), signal.SIGINT)
        return await original(self, request)

    monkeypatch.setattr(FakeJudge, "judge", interrupted_on_the_last)
    path = write_config(tmp_path, samples=1)
    assert main(["run", str(path), "--headless"]) == EXIT_OK
    assert "done: 2 judgements in this run" in capsys.readouterr().err
    assert (tmp_path / "runs" / "cli" / "report" / "synth" / "report.md").is_file()


def test_an_interrupted_new_run_says_how_to_resume_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # "The same command" with --new-run starts yet another directory: it resumes nothing.
    original = FakeJudge.judge
    pressed: list[bool] = []

    async def interrupted_on_the_first(self: FakeJudge, request: JudgeRequest) -> Any:
        if not pressed:
            pressed.append(True)
            os.kill(os.getpid(), signal.SIGINT)
        return await original(self, request)

    path = write_config(tmp_path, samples=8)
    assert main(["run", str(path), "--headless"]) == EXIT_OK
    monkeypatch.setattr(FakeJudge, "judge", interrupted_on_the_first)
    assert main(["run", str(path), "--headless", "--new-run", "--no-report"]) == EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert 'to resume, set name = "cli-2" in the config\'s [run] table' in err, err
    assert "run the same command" not in err
    # status said "run 'cli' ...; `trig-stream run` with its config judges whatever is
    # left": that resumes runs/cli, not this directory.
    new_dir = tmp_path / "runs" / "cli-2"
    assert main(["status", str(new_dir)]) == EXIT_OK
    out = capsys.readouterr().out
    assert f'set name = "cli-2" and output_dir = "{new_dir.parent}" in' in out, out
    assert "with its config judges whatever is left" not in out
    text = path.read_text()
    assert 'name = "cli"' in text
    path.write_text(text.replace('name = "cli"', 'name = "cli-2"'))
    monkeypatch.setattr(FakeJudge, "judge", original)
    assert main(["run", str(path), "--headless", "--no-report"]) == EXIT_OK
    assert "done: " in capsys.readouterr().err
    assert not (tmp_path / "runs" / "cli-3").exists()
    # The resume's manifest names the run as it was resumed (it kept the first run's name).
    assert read_manifest(new_dir).run_name == "cli-2"
    assert main(["status", str(new_dir)]) == EXIT_OK
    out = capsys.readouterr().out
    assert "run 'cli-2'" in out and "with its config judges whatever is left" in out


def test_status_by_another_path_to_the_run_its_config_resumes_says_to_run_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The name of the path as typed was compared: `status .` said `set name = ""`, and a
    # link `latest -> runs/cli` said `set name = "latest"`, to resume runs/cli itself.
    path = write_config(tmp_path, samples=2)
    assert main(["run", str(path), "--headless", "--no-report"]) == EXIT_OK
    run_dir = tmp_path / "runs" / "cli"
    (tmp_path / "latest").symlink_to(run_dir)
    capsys.readouterr()
    monkeypatch.chdir(run_dir)
    for typed in (".", str(tmp_path / "latest"), "../cli/"):
        assert main(["status", typed]) == EXIT_OK
        out = capsys.readouterr().out
        assert "not running; `trig-stream run` with its config judges whatever is left" in out, (
            typed,
            out,
        )
    # Through a link to a directory `--new-run` made, the hint names that directory.
    (tmp_path / "runs" / "cli-2").mkdir()
    shutil.copy(run_dir / "manifest.json", tmp_path / "runs" / "cli-2")
    (tmp_path / "newest").symlink_to(tmp_path / "runs" / "cli-2")
    assert main(["status", str(tmp_path / "newest")]) == EXIT_OK
    out = capsys.readouterr().out
    assert f'set name = "cli-2" and output_dir = "{tmp_path / "runs"}" in' in out, out


@pytest.mark.parametrize("new_run", [False, True], ids=["resumable", "new-run"])
def test_images_a_stop_left_to_judge_are_promised_to_the_resume_the_summary_names(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    new_run: bool,
) -> None:
    # After --new-run the summary said "the same command judges them", then "to resume, set
    # name = ... and run it without --new-run": the same command starts another directory.
    made_three = threading.Event()
    made: list[int] = []
    original_generate = SyntheticGenerator.generate
    original_judge = FakeJudge.judge
    pressed: list[bool] = []

    def counted(self: SyntheticGenerator, requests: Any, **kwargs: Any) -> Any:
        images = original_generate(self, requests, **kwargs)
        made.append(len(requests))
        if sum(made) >= 3:
            made_three.set()
        return images

    async def interrupted_once_images_wait(self: FakeJudge, request: JudgeRequest) -> Any:
        if not pressed:  # one judge call at a time: the images made meanwhile wait for it
            pressed.append(True)
            assert await anyio.to_thread.run_sync(made_three.wait, 30)
            os.kill(os.getpid(), signal.SIGINT)
        return await original_judge(self, request)

    path = write_config(tmp_path, samples=8, concurrency=1)
    if new_run:
        assert main(["run", str(path), "--headless"]) == EXIT_OK
        capsys.readouterr()
    monkeypatch.setattr(SyntheticGenerator, "generate", counted)
    monkeypatch.setattr(FakeJudge, "judge", interrupted_once_images_wait)
    argv = ["run", str(path), "--headless", "--no-report", *(["--new-run"] if new_run else [])]
    assert main(argv) == EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert "on disk left to judge on resume: the stop asked no judge about them; a resume " in err
    assert "the same command judges" not in err
    if new_run:
        assert 'to resume, set name = "cli-2" in the config\'s [run] table' in err, err
        assert "run the same command" not in err
    else:
        assert "run the same command again to resume" in err, err


def test_a_second_ctrl_c_says_how_to_resume_a_new_run_with_its_brackets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Printed as Rich markup, "[run]" was taken for a style and vanished: "set name = ... in
    # the config's  table".
    print_ = Console.print

    def second_ctrl_c_once_stopping(self: Console, *args: Any, **kwargs: Any) -> None:
        print_(self, *args, **kwargs)
        if args and str(args[0]).startswith("stopping: finishing"):
            os.kill(os.getpid(), signal.SIGINT)

    pressed: list[bool] = []

    async def interrupted_then_waits(self: FakeJudge, request: JudgeRequest) -> Any:
        if not pressed:
            pressed.append(True)
            os.kill(os.getpid(), signal.SIGINT)
        await anyio.sleep_forever()  # until the second Ctrl-C cancels the run

    path = write_config(tmp_path, samples=2)
    assert main(["run", str(path), "--headless", "--no-report"]) == EXIT_OK
    capsys.readouterr()
    monkeypatch.setattr(Console, "print", second_ctrl_c_once_stopping)
    monkeypatch.setattr(FakeJudge, "judge", interrupted_then_waits)
    assert main(["run", str(path), "--headless", "--new-run", "--no-report"]) == EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert 'stopping now; to resume, set name = "cli-2" in the config\'s [run] table' in err, err


def judged_once_then_waiting(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Patches the fake judge to answer its first request and leave the others waiting until
    the run is cancelled; the event is set once the first judgement is given."""
    original = FakeJudge.judge
    answered = threading.Event()

    async def first_only(self: FakeJudge, request: JudgeRequest) -> Any:
        if answered.is_set():
            await anyio.sleep_forever()
        answered.set()
        return await original(self, request)

    monkeypatch.setattr(FakeJudge, "judge", first_only)
    return answered


@pytest.mark.parametrize("keys", [["q"], ["ctrl+c", "ctrl+c"]], ids=["q", "ctrl+c twice"])
@pytest.mark.parametrize("new_run", [False, True], ids=["resumable", "new-run"])
def test_a_run_quit_from_the_dashboard_says_how_to_resume(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    keys: list[str],
    new_run: bool,
) -> None:
    # The dashboard's quit is a key, not a signal: no "stopping now; run the same command
    # again to resume" was printed, and the summary after the dashboard said nothing of it.
    from textual.pilot import Pilot

    from trig_stream.tui.run import run_dashboard

    path = write_config(tmp_path, samples=4)
    if new_run:
        assert main(["run", str(path), "--headless", "--no-report"]) == EXIT_OK
        capsys.readouterr()
    answered = judged_once_then_waiting(monkeypatch)

    async def quit_once_judged(pilot: Pilot[Any]) -> None:
        assert await anyio.to_thread.run_sync(answered.wait, 30)  # a safety net
        await pilot.press(*keys)

    async def dashboard(engine: Any) -> None:
        await run_dashboard(engine, headless=True, auto_pilot=quit_once_judged)

    monkeypatch.setattr(run_command, "_dashboard", lambda args, console: dashboard)
    argv = ["run", str(path), "--no-report", *(["--new-run"] if new_run else [])]
    assert main(argv) == EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert "cancelled: 1 judgements in this run" in err, err
    if new_run:
        hint = 'to resume, set name = "cli-2" in the config\'s [run] table'
    else:
        hint = "run the same command again to resume"
    assert err.count(hint) == 1, err
    assert err.index(hint) > err.index("cancelled: "), err


@pytest.mark.parametrize("new_run", [False, True], ids=["resumable", "new-run"])
def test_a_second_ctrl_c_says_how_to_resume_once(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    new_run: bool,
) -> None:
    # The stop message says how to resume: the summary does not say it again.
    print_ = Console.print

    def second_ctrl_c_once_stopping(self: Console, *args: Any, **kwargs: Any) -> None:
        print_(self, *args, **kwargs)
        if args and str(args[0]).startswith("stopping: finishing"):
            os.kill(os.getpid(), signal.SIGINT)

    answered = threading.Event()

    async def interrupted_then_waits(self: FakeJudge, request: JudgeRequest) -> Any:
        if not answered.is_set():
            answered.set()
            os.kill(os.getpid(), signal.SIGINT)
        await anyio.sleep_forever()  # until the second Ctrl-C cancels the run

    path = write_config(tmp_path, samples=2)
    if new_run:
        assert main(["run", str(path), "--headless", "--no-report"]) == EXIT_OK
        capsys.readouterr()
    monkeypatch.setattr(Console, "print", second_ctrl_c_once_stopping)
    monkeypatch.setattr(FakeJudge, "judge", interrupted_then_waits)
    argv = ["run", str(path), "--headless", "--no-report", *(["--new-run"] if new_run else [])]
    assert main(argv) == EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert "cancelled: 0 judgements in this run" in err, err
    assert err.count("to resume") == 1, err


def test_no_dashboard_names_the_extra_to_install_with_its_brackets(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import builtins

    import_ = builtins.__import__

    def without_the_tui(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("trig_stream.tui"):
            raise ImportError(name)
        return import_(name, *args, **kwargs)

    monkeypatch.setattr("trig_stream.progress.full_screen_possible", lambda: True)
    monkeypatch.setattr(builtins, "__import__", without_the_tui)
    args = argparse.Namespace(backend="asyncio")
    assert run_command._dashboard(args, Console(stderr=True)) is None
    assert "pip install 'trig-stream[tui]'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("when", "code", "says"),
    [
        ("done:", EXIT_INTERRUPTED, "report stopped, incomplete"),  # before the report opens
        ("report:", EXIT_OK, "report: "),  # once it is written
    ],
)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_between_the_run_and_its_report_or_after_is_no_crash(
    tmp_path: Path, when: str, code: int, says: str, signum: int
) -> None:
    # Between the run's signal handling and the report's, and after the report, the default
    # handlers ended the command by the signal (exit 143), the report unwritten without a word.
    patch = (
        "import os, rich.console\n"
        "_print = rich.console.Console.print\n"
        "def print_(self, *args, **kwargs):\n"
        "    _print(self, *args, **kwargs)\n"
        f"    if args and str(args[0]).startswith({when!r}):\n"
        f"        os.kill(os.getpid(), {int(signum)})\n"
        "rich.console.Console.print = print_\n"
    )
    process = run_patched(write_config(tmp_path, samples=2), patch)
    _, err = process.communicate(timeout=120)
    assert process.returncode == code, err
    assert says in err and "Traceback" not in err


SIGNAL_ON_RETURN = """\
import os, rich.console, trig_stream.cli
_main = trig_stream.cli.main
def main(*args, **kwargs):
    code = _main(*args, **kwargs)
    os.kill(os.getpid(), {signum})  # as the command exits
    return code
trig_stream.cli.main = main
_print = rich.console.Console.print
def print_(self, *args, **kwargs):
    _print(self, *args, **kwargs)
    if args and str(args[0]).startswith({stop_on!r}):
        os.kill(os.getpid(), {signum})
rich.console.Console.print = print_
"""


@pytest.mark.parametrize(
    ("stop_on", "code"),
    [(None, EXIT_OK), ("run directory:", EXIT_INTERRUPTED)],
    ids=["finished", "stopped"],
)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_while_the_command_exits_leaves_its_exit_status(
    tmp_path: Path, stop_on: str | None, code: int, signum: int
) -> None:
    # The run put back the default handlers as it returned: a signal in the tenths of a
    # second of teardown that follow ended a finished (or stopped) command by it (exit 143).
    patch = SIGNAL_ON_RETURN.format(signum=int(signum), stop_on=stop_on or "\0never")
    samples, latency = (2, 0.0) if stop_on is None else (40, 0.2)
    process = run_patched(write_config(tmp_path, samples=samples, latency=latency), patch)
    _, err = process.communicate(timeout=120)
    assert process.returncode == code, err
    assert "Traceback" not in err


SIGNAL_AS_THE_RUN_ENDS = """\
import os, signal, trig_stream.analysis.commands as commands, trig_stream.progress as progress
sent = []
def send():
    if not sent:
        sent.append(True)
        os.kill(os.getpid(), {signum})
_update = progress.PlainProgress.update
def update(self, stats, *, force=False):
    _update(self, stats, force=force)
    if force and stats.state == "done":  # the run's last progress: its work is over
        sent.append(False) if {in_the_gap} else send()
_signal = signal.signal
def signal_(signum, handler):
    found = _signal(signum, handler)
    # The run's receiver closing: the default handlers back, before the report's
    default = handler in (signal.SIG_DFL, signal.default_int_handler)
    if sent == [False] and signum == {signum} and default:
        sent.clear()
        send()
    return found
signal.signal = signal_
_write_report = commands.write_report
def write_report(*args, **kwargs):
    if sent == [False]:  # no gap left to signal in: as the report starts
        sent.clear()
        send()
    return _write_report(*args, **kwargs)
commands.write_report = write_report
progress.PlainProgress.update = update
"""


@pytest.mark.parametrize("in_the_gap", [False, True], ids=["last-progress", "receiver-closed"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_as_the_runs_work_ends_stops_its_report(
    tmp_path: Path, in_the_gap: bool, signum: int
) -> None:
    # A signal as the run's work ended was taken by the run for nothing (the whole report
    # written, exit 0), or came once its receiver had closed and before the report's
    # handlers: SIGTERM ended the command by it (exit 143), a Ctrl-C left the event loop
    # with its summary unsaid, or hung the exit for ever on its worker threads.
    patch = SIGNAL_AS_THE_RUN_ENDS.format(signum=int(signum), in_the_gap=in_the_gap)
    process = run_patched(write_config(tmp_path, samples=2), patch)
    try:
        _, err = process.communicate(timeout=60)  # a safety net: a hang fails, not hangs
    finally:
        process.kill()
    assert process.returncode == EXIT_INTERRUPTED, err
    assert "done: 4 judgements in this run" in err, err
    run_dir = tmp_path / "runs" / "cli"
    assert f"report stopped, incomplete: `trig-stream report {run_dir}` writes it" in err, err
    assert "Traceback" not in err, err


def test_the_exit_does_not_wait_for_loop_workers_never_stopped(tmp_path: Path) -> None:
    # A KeyboardInterrupt out of the event loop left its idle worker threads waiting for
    # work no one would give, never told to stop: the interpreter's exit waited for them
    # for ever, the command's exit status decided.
    patch = (
        "import threading, trig_stream.cli\n"
        "def main(*args, **kwargs):\n"
        f"    threading.Thread(target=threading.Event().wait, name={cli.LOOP_WORKER_THREAD!r})"
        ".start()\n"
        f"    return {EXIT_INTERRUPTED}\n"
        "trig_stream.cli.main = main\n"
    )
    process = run_patched(write_config(tmp_path), patch)
    try:
        _, err = process.communicate(timeout=30)  # a safety net: a hang fails, not hangs
    finally:
        process.kill()
    assert process.returncode == EXIT_INTERRUPTED, err


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_while_the_judges_open_stops_before_any_work(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    presses: int,
) -> None:
    # A judge that loads a model opens for minutes; Ctrl-C meanwhile must stop the run,
    # not be lost (the run went on to the end) nor end it in a traceback.
    async def interrupted_while_opening(self: FakeJudge) -> None:
        for _ in range(presses):
            os.kill(os.getpid(), signal.SIGINT)
        for _ in range(100):  # loop turns, as a model load in a thread would give
            await anyio.lowlevel.checkpoint()

    monkeypatch.setattr(FakeJudge, "open", interrupted_while_opening)
    monkeypatch.setattr(run_command, "OPENING_QUIET_S", 0)  # say what opens at once, not after 2 s
    path = write_config(tmp_path)
    assert main(["run", str(path), "--headless"]) == EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert "opening judge 'trigscore': connecting" in err  # what the wait is for
    # Nothing was in flight: no promise of finishing it, nor of a second Ctrl-C's use.
    assert "stopping: the run had not started" in err and "Traceback" not in err
    assert "finishing the work in flight" not in err
    # The run directory it made is gone again: it named it, "[stopped]" twice, and a run
    # with nothing in it to resume.
    assert "before the run opened its run directory: nothing was written" in err, err
    assert "\nrun directory: " not in err and "results in" not in err
    assert err.count("0.0/s") == 1, err
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


@pytest.mark.parametrize(
    ("earlier_run", "new_run", "resumable"),
    [(False, False, False), (True, True, False), (True, False, True)],
    ids=["first-run", "new-run", "resumed"],
)
def test_a_hard_stop_while_the_judges_open_promises_a_resume_only_of_a_directory_kept(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    earlier_run: bool,
    new_run: bool,
    resumable: bool,
) -> None:
    # The directory a run made is removed when it stops while its judges open, yet the hard
    # stop said how to resume it ('set name = "cli-2"'), beside "nothing was written".
    path = write_config(tmp_path, samples=2)
    if earlier_run:
        assert main(["run", str(path), "--headless", "--no-report"]) == EXIT_OK
    capsys.readouterr()

    async def stopped_hard_while_opening(self: FakeJudge) -> None:
        for _ in range(2):
            os.kill(os.getpid(), signal.SIGINT)
        for _ in range(100):  # loop turns, as a model load in a thread would give
            await anyio.lowlevel.checkpoint()

    monkeypatch.setattr(FakeJudge, "open", stopped_hard_while_opening)
    argv = ["run", str(path), "--headless", "--no-report", *(["--new-run"] if new_run else [])]
    assert main(argv) == EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert "stopping now" in err, err
    assert ("resume" in err) == resumable, err
    if not resumable:
        assert "nothing was written" in err, err
    kept = sorted(p.name for p in (tmp_path / "runs").iterdir()) if earlier_run else []
    assert kept == (["cli"] if earlier_run else [])


def test_a_run_stopped_before_its_run_directory_says_nothing_was_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Stopped while the backends were checked, a --new-run said "results in" the earlier
    # run's directory, and how to resume that one; a new name, a directory never made.
    path = write_config(tmp_path, samples=2)
    assert main(["run", str(path), "--headless", "--no-report"]) == EXIT_OK
    capsys.readouterr()

    def interrupted_while_checked(self: FakeJudge) -> None:
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(FakeJudge, "check_environment", interrupted_while_checked)
    assert main(["run", str(path), "--headless", "--new-run"]) == EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert "stopped before the run opened its run directory: nothing was written" in err, err
    assert "results in" not in err and "to resume" not in err
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["cli"]


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_stops_and_the_same_command_resumes(tmp_path: Path, presses: int) -> None:
    path = write_config(tmp_path, samples=40, latency=0.1, concurrency=2)
    command = [sys.executable, "-m", "trig_stream", "run", str(path), "--headless"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    signal_after(process, "run directory:", signal.SIGINT)
    for _ in range(presses - 1):
        process.send_signal(signal.SIGINT)
    rest = process.stderr.read()
    assert process.wait(timeout=60) == EXIT_INTERRUPTED, rest
    assert sum(journal_keys(tmp_path).values()) < 80
    path.write_text(path.read_text().replace("latency_s = 0.1", "latency_s = 0.0"))
    assert subprocess.run(command, capture_output=True, timeout=120).returncode == EXIT_OK
    keys = journal_keys(tmp_path)
    assert len(keys) == 80 and set(keys.values()) == {1}


@pytest.mark.parametrize(
    ("method", "presses", "ends"),
    [
        ("generate", 2, "cancelled: 0 judgements"),
        ("load", 1, "stopped: 0 judgements"),
        ("close", 2, "cancelled: 12 judgements"),
    ],
)
def test_ctrl_c_does_not_wait_for_a_model_loading_generating_or_closing(
    tmp_path: Path, method: str, presses: int, ends: str
) -> None:
    # Weights can take minutes to load, an images API a minute to answer, a close can hang,
    # each in a worker thread that nothing can interrupt: the second Ctrl-C leaves the call
    # behind and the command exits, not when the call ends. Nothing is in flight while the
    # model loads: the first Ctrl-C alone stops it (it waited for the whole load, and then
    # stopped with nothing done). A close that hung after every judgement was written kept
    # the command running through any number of Ctrl-C, until SIGKILL. (A second Ctrl-C
    # during a load is no case of its own: the first has stopped the run, and the second
    # lands before or after that stop ends, as the box's load has it.)
    path = write_config(tmp_path)
    process = run_patched(
        path,
        "import time\n"
        "from trig_stream.testing.synthetic import SyntheticGenerator\n"
        "def busy(self, *args, **kwargs):\n"
        "    print('busy', file=sys.stderr, flush=True)\n"
        "    time.sleep(600)\n"
        f"SyntheticGenerator.{method} = busy\n",
    )
    assert process.stderr is not None
    try:
        signal_after(process, "busy", signal.SIGINT)
        if presses == 2:
            signal_after(process, "stopping:", signal.SIGINT)
        code = process.wait(timeout=60)  # a few lines left to read: the pipe cannot fill
        rest = process.stderr.read()
    finally:
        process.kill()
    assert code == EXIT_INTERRUPTED, rest
    assert ends in rest, rest
    assert "not waiting for a model still loading" in rest
    if method == "generate":
        # One line, as a log holds it (it broke at 80 columns: "... still \nrunning").
        line = (
            "not waiting for a model still loading or closing, a backend's check of this "
            "machine, or a generation call or judge batch still running"
        )
        assert f"{line}\n" in rest
    assert sum(journal_keys(tmp_path).values()) == (12 if method == "close" else 0)


@pytest.mark.parametrize(
    ("method", "raised", "code", "message"),
    [
        ("generate", "SystemExit(3)", EXIT_FATAL, "a call of generator 'synth' failed: it "),
        ("generate", "KeyboardInterrupt", EXIT_FATAL, "a call of generator 'synth' failed: it "),
        ("generate", "GeneratorExit", EXIT_FATAL, "a call of generator 'synth' failed: it "),
        ("load", "SystemExit(3)", EXIT_FATAL, "generator 'synth' failed to load: it "),
        ("load", "KeyboardInterrupt", EXIT_FATAL, "generator 'synth' failed to load: it "),
        ("close", "SystemExit(3)", EXIT_OK, "note: synth: closing it failed: it "),
        ("close", "KeyboardInterrupt", EXIT_OK, "note: synth: closing it failed: it "),
    ],
)
def test_a_generator_raising_what_ends_a_process_is_named_and_never_hangs(
    tmp_path: Path, method: str, raised: str, code: int, message: str
) -> None:
    # Raised in a worker thread, it reached the event loop as a crash of its own: the
    # command hung, silently, until killed (GeneratorExit gave a traceback, exit 1).
    patch = (
        "from trig_stream.testing.synthetic import SyntheticGenerator\n"
        "def ends(self, *args, **kwargs):\n"
        f"    raise {raised}\n"
        f"SyntheticGenerator.{method} = ends\n"
    )
    assert_run_patched_ends(tmp_path, patch, code, f"{message}raised {raised.partition('(')[0]}")


@pytest.mark.parametrize(
    ("method", "raised", "code", "message"),
    [
        ("judge", "SystemExit(3)", EXIT_FATAL, "judge 'trigscore': its judge() "),
        ("judge", "KeyboardInterrupt", EXIT_FATAL, "judge 'trigscore': its judge() "),
        ("open", "SystemExit(3)", EXIT_FATAL, "judge 'trigscore' failed to open: its open() "),
        ("aclose", "SystemExit(3)", EXIT_OK, "note: judge 'trigscore': closing it failed: it "),
    ],
)
def test_a_judge_raising_what_ends_a_process_is_named_and_never_hangs(
    tmp_path: Path, method: str, raised: str, code: int, message: str
) -> None:
    # From judge(), it left the event loop while the run's worker threads waited for work:
    # the process never exited, deaf to SIGTERM and Ctrl-C. From open() or aclose(), the
    # command ended with its exit code (3, "run directory refused") and no word of why.
    patch = (
        "from trig_stream.testing import FakeJudge\n"
        "async def ends(self, *args, **kwargs):\n"
        f"    raise {raised}\n"
        f"FakeJudge.{method} = ends\n"
    )
    assert_run_patched_ends(tmp_path, patch, code, f"{message}raised {raised.partition('(')[0]}")


def assert_run_patched_ends(tmp_path: Path, patch: str, code: int, message: str) -> None:
    """Run the command with ``patch`` applied: it ends, with exit ``code`` and ``message``
    on stderr, without a traceback."""
    process = run_patched(write_config(tmp_path), patch)
    try:
        # A hang never ends; a whole run and its report took up to 63 s on a loaded machine.
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == code, err
    assert message in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_the_report_is_written_stops_it_without_a_traceback(
    tmp_path: Path, signum: int
) -> None:
    # The run is over, its report takes seconds per model: Ctrl-C was ignored until the
    # report's end (a second one gave a traceback), and SIGTERM left it half written.
    path = write_config(tmp_path)
    process = run_patched(
        path,
        "import trig_stream.analysis.plots as plots\n"
        "def plot_dtm(analysis, path):\n"
        "    print('drawing', file=sys.stderr, flush=True)\n"
        "    sys.stdin.readline()  # until the test has seen the stop acknowledged\n"
        "    return path\n"
        "plots.plot_dtm = plot_dtm\n"
        "plots.matplotlib_available = lambda: True\n",
        stdin=subprocess.PIPE,
    )
    assert process.stdin is not None and process.stderr is not None
    watchdog = threading.Timer(60, process.kill)  # a report that never stops fails, not hangs
    watchdog.start()
    try:
        signal_after(process, "drawing", signum)
        seen = next((line for line in process.stderr if "stopping" in line), "")
        assert seen == "stopping the report\n"
        process.stdin.write("go on\n")
        process.stdin.flush()
        code = process.wait(timeout=60)
        rest = process.stderr.read()
    finally:
        watchdog.cancel()
        process.kill()
    assert code == EXIT_INTERRUPTED, rest
    run_dir = tmp_path / "runs" / "cli"
    assert f"report stopped, incomplete: `trig-stream report {run_dir}` writes it" in rest
    assert "Traceback" not in rest
    assert not (run_dir / "report" / "synth" / "plots" / "scatter.png").exists()
    assert sum(journal_keys(tmp_path).values()) == 12  # the judgements were all written


def test_a_hangup_stops_at_once_and_the_same_command_resumes(tmp_path: Path) -> None:
    # The terminal closed: nobody waits for a graceful stop, and writing to it would fail.
    path = write_config(tmp_path, samples=40, latency=0.1, concurrency=2)
    command = [sys.executable, "-m", "trig_stream", "run", str(path), "--headless"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    try:
        signal_after(process, "run directory:", signal.SIGHUP)
        code = process.wait(timeout=60)
        rest = process.stderr.read()
    finally:
        process.kill()
    assert code == EXIT_INTERRUPTED, rest
    assert "cancelled:" not in rest  # its output went nowhere once the terminal was gone
    assert sum(journal_keys(tmp_path).values()) < 80
    path.write_text(path.read_text().replace("latency_s = 0.1", "latency_s = 0.0"))
    assert subprocess.run(command, capture_output=True, timeout=120).returncode == EXIT_OK
    keys = journal_keys(tmp_path)
    assert len(keys) == 80 and set(keys.values()) == {1}


def test_stop_signals_leave_an_ignored_one_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    # Under nohup SIGHUP is ignored, and listening for it would undo that. So is SIGINT in
    # a job a script runs in the background.
    handlers = dict.fromkeys((signal.SIGINT, signal.SIGTERM, signal.SIGHUP), signal.SIG_DFL)
    monkeypatch.setattr(signal, "getsignal", lambda signum: handlers[signum])
    assert stop_signals() == (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    handlers[signal.SIGHUP] = signal.SIG_IGN
    assert stop_signals() == (signal.SIGINT, signal.SIGTERM)
    handlers[signal.SIGINT] = signal.SIG_IGN
    assert stop_signals() == (signal.SIGTERM,)
    handlers[signal.SIGTERM] = signal.SIG_IGN
    assert stop_signals() == ()


def ignoring(*signums: int) -> Any:
    """A ``preexec_fn`` that starts the child with ``signums`` truly ignored, as a shell
    starts a background job (the session's conftest fixture turned an ignored one into a
    handler here, which ``exec`` resets)."""

    def ignore() -> None:
        for signum in signums:
            signal.signal(signum, signal.SIG_IGN)

    return ignore


def test_a_run_started_ignoring_sigint_goes_on_through_one(tmp_path: Path) -> None:
    # A script's background job: the Ctrl-C meant for its foreground job stopped the run
    # behind it (exit 130), once the run listened for signals.
    path = write_config(tmp_path, samples=20, latency=0.05, concurrency=2)
    command = [sys.executable, "-m", "trig_stream", "run", str(path), "--headless"]
    process = subprocess.Popen(
        command, stderr=subprocess.PIPE, text=True, preexec_fn=ignoring(signal.SIGINT)
    )
    assert process.stderr is not None
    try:
        signal_after(process, "run directory:", signal.SIGINT)
        code = process.wait(timeout=120)
        rest = process.stderr.read()
    finally:
        process.kill()
    assert code == EXIT_OK, rest
    assert "stopping" not in rest
    keys = journal_keys(tmp_path)
    assert len(keys) == 40 and set(keys.values()) == {1}


def test_a_run_started_ignoring_sigint_stops_on_sigterm_and_says_so(tmp_path: Path) -> None:
    # With SIGINT ignored, the hint to "press Ctrl-C again" named a key that does nothing.
    path = write_config(tmp_path, samples=40, latency=0.1, concurrency=2)
    command = [sys.executable, "-m", "trig_stream", "run", str(path), "--headless"]
    process = subprocess.Popen(
        command, stderr=subprocess.PIPE, text=True, preexec_fn=ignoring(signal.SIGINT)
    )
    assert process.stderr is not None
    try:
        signal_after(process, "run directory:", signal.SIGINT)  # ignored
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
        rest = process.stderr.read()
    finally:
        process.kill()
    assert code == EXIT_INTERRUPTED, rest
    assert "stopping: finishing the work in flight (send SIGTERM again to stop now)" in rest
    assert "Ctrl-C" not in rest, rest
    assert sum(journal_keys(tmp_path).values()) < 80
    path.write_text(path.read_text().replace("latency_s = 0.1", "latency_s = 0.0"))
    assert subprocess.run(command, capture_output=True, timeout=120).returncode == EXIT_OK
    keys = journal_keys(tmp_path)
    assert len(keys) == 80 and set(keys.values()) == {1}


def test_a_trio_run_started_ignoring_every_stop_signal_runs_through_them(tmp_path: Path) -> None:
    # trio refuses a signal receiver for no signal: the run, then its report, would have
    # failed; and before that, a run listened for the signals it was started ignoring.
    path = write_config(tmp_path, samples=20, latency=0.05, concurrency=2)
    command = [sys.executable, "-m", "trig_stream", "run", str(path), "--headless"]
    process = subprocess.Popen(
        [*command, "--backend", "trio"],
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=ignoring(signal.SIGINT, signal.SIGTERM, signal.SIGHUP),
    )
    assert process.stderr is not None
    try:
        signal_after(process, "run directory:", signal.SIGINT)
        process.send_signal(signal.SIGTERM)
        process.send_signal(signal.SIGHUP)
        code = process.wait(timeout=120)
        rest = process.stderr.read()
    finally:
        process.kill()
    assert code == EXIT_OK, rest
    assert "stopping" not in rest and "Traceback" not in rest, rest
    assert "report: " in rest, rest
    keys = journal_keys(tmp_path)
    assert len(keys) == 40 and set(keys.values()) == {1}


@pytest.mark.anyio
async def test_a_receiver_for_no_stop_signal_opens_and_receives_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(signals, "stop_signals", lambda: ())
    received = []
    with signals.stop_signal_receiver() as receiver, anyio.CancelScope() as scope:
        scope.cancel()  # what ends a receiver: its task's cancellation
        async for signum in receiver:
            received.append(signum)
    assert scope.cancelled_caught and not received


@pytest.mark.parametrize("ignored", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_ignored_stays_ignored_before_the_run_listens(
    ignored: signal.Signals,
) -> None:
    # A script's background job ignores SIGINT: a Ctrl-C meant for the foreground job ended
    # a `report` running behind it (exit 130, no report).
    before = signal.signal(ignored, signal.SIG_IGN)
    try:
        handlers = interrupt_on_stop_signals()
        try:
            assert signal.getsignal(ignored) is signal.SIG_IGN
            assert ignored not in handlers
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
    finally:
        signal.signal(ignored, before)


def test_status_shows_each_metric_apart_and_prints_paths_as_they_are(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path)
    # A second judge, and an output folder whose name rich would read as markup ("[/]"
    # closes a style: it crashed the run before anything was judged).
    text = path.read_text().replace('output_dir = "runs"', 'output_dir = "o[/]"')
    path.write_text(text + '\n[[judges]]\nname = "other"\nbackend = "fake"\n')
    assert main(["run", str(path), "--headless", "--no-report"]) == EXIT_OK
    run_dir = tmp_path / "o[/]" / "cli"
    err = capsys.readouterr().err
    assert f"run directory: {run_dir}\n" in err
    assert "\n[done] " in err  # the state of a progress line, not read as a style
    shutil.copytree(run_dir, tmp_path / "y[bold]")
    for folder in (run_dir, tmp_path / "y[bold]"):
        assert main(["status", str(folder)]) == EXIT_OK
        out = capsys.readouterr().out
        assert f"run 'cli' (t2i) in {folder}\n" in out
    # Each judge's counts and means apart: 6 samples, 2 dimensions each, per metric.
    rows = [line.split("│")[1:-1] for line in out.splitlines() if line.startswith("│ synth")]
    counts = {row[1].strip(): row[-1].strip() for row in rows if len(row) == 6}
    assert counts == {"trigscore": "12", "other": "12"}
    means = [row for row in rows if len(row) == 5]
    assert {row[1].strip() for row in means} == {"trigscore", "other"}
    assert sum(int(row[-1]) for row in means) == 24
    with (run_dir / LOCK).open("w") as lock:  # as a process running in it holds it (its pid alone)
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write(str(os.getpid()))
        lock.flush()
        assert main(["status", str(run_dir)]) == EXIT_OK
    # Not wrapped where it is piped: the command stays whole on its line.
    assert f"follow it live with `trig-stream watch {run_dir}`\n" in capsys.readouterr().out


def test_a_run_dir_gone_before_the_final_report_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from trig_stream.analysis import commands

    write_report = commands.write_report

    def deleted_first(run_dir: Path, *args: Any, **kwargs: Any) -> Path:
        shutil.rmtree(run_dir)  # as a user might, once the judging is done
        return write_report(run_dir, *args, **kwargs)

    monkeypatch.setattr(commands, "write_report", deleted_first)
    assert main(["run", str(write_config(tmp_path)), "--headless"]) == EXIT_OK
    run_dir = tmp_path / "runs" / "cli"
    last = capsys.readouterr().err.splitlines()[-1]
    assert last == (
        f"no report: {run_dir} does not exist: there is no run directory there; the "
        f"run's judgements are done: `trig-stream report {run_dir}` writes the report once "
        "the run directory can be read"
    )


def test_a_final_report_that_cannot_be_written_points_to_another_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from trig_stream.analysis import report

    def read_only(files: list[tuple[Path, bytes]], **kwargs: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(files[0][0]))

    monkeypatch.setattr(
        report, "write_atomic_together", read_only
    )  # a run directory made read-only
    assert main(["run", str(write_config(tmp_path)), "--headless"]) == EXIT_OK
    run_dir = tmp_path / "runs" / "cli"
    last = capsys.readouterr().err.splitlines()[-1]
    assert last == (
        f"no report: cannot write the report in {run_dir / 'report' / 'synth'}: "
        f"{run_dir / 'report' / 'synth' / 'evaluation_result.json'}: Permission denied; it "
        "must be a folder this user can write; the run's judgements are done: `trig-stream "
        f"report {run_dir} --out DIR` writes the report elsewhere"
    )


def test_a_refused_final_report_keeps_the_runs_exit_status_and_report_then_exits_3(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # README: the run's exit status is about its judgements (0: done), its report a step that
    # `trig-stream report RUN_DIR` repeats, which then exits 3 with the error.
    from trig_stream.analysis import commands

    write_report = commands.write_report

    def foreign_comparison_first(run_dir: Path, *args: Any, **kwargs: Any) -> Path:
        (run_dir / "report").mkdir(exist_ok=True)
        (run_dir / "report" / "comparison.md").write_text("my notes\n")
        return write_report(run_dir, *args, **kwargs)

    monkeypatch.setattr(commands, "write_report", foreign_comparison_first)
    assert main(["run", str(write_config(tmp_path)), "--headless"]) == EXIT_OK
    run_dir = tmp_path / "runs" / "cli"
    comparison = run_dir / "report" / "comparison.md"
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if line.startswith("no report:")] == [err[-1]]
    assert err[-1].startswith(f"no report: {comparison} is not a comparison a report wrote")
    assert comparison.read_text() == "my notes\n"
    monkeypatch.setattr(commands, "write_report", write_report)
    assert main(["report", str(run_dir)]) == EXIT_RUN_DIR
    assert f"error: {comparison} is not a comparison a report wrote" in capsys.readouterr().err


def test_the_run_lock_is_held_while_the_final_report_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The lock was released before the report: for its 10-25 s, status said "not running",
    # validate exited 0, and a second run could start and append to the journal it read.
    # run.lock holds the pid alone meanwhile, as ever: a "report" line under it broke older
    # trig-stream versions reading the directory (their int() of it failed). And the run's
    # own report, its lock held by its own process, notes no run "still running".
    from trig_stream.analysis import commands
    from trig_stream.errors import RunLockedError
    from trig_stream.inspect_commands import status_command
    from trig_stream.locks import Writer, find_writer
    from trig_stream.manifest import read_manifest
    from trig_stream.resume_checks import check_resume
    from trig_stream.store import RunDir
    from trig_stream.tui.watch_source import RunDirSource

    write_report = commands.write_report
    seen: list[Writer | None] = []
    pid = os.getpid()

    def look_then_write(run_dir: Path, *args: Any, **kwargs: Any) -> Path:
        seen.append(find_writer(run_dir))
        assert (run_dir / LOCK).read_bytes() == str(pid).encode()
        status_command(argparse.Namespace(run_dir=run_dir), Console())
        assert f"run written by pid {pid}" in RunDirSource(run_dir).poll().message
        with pytest.raises(RunLockedError, match="is in use by"):
            check_resume(run_dir, read_manifest(run_dir))  # what validate asks
        with pytest.raises(RunLockedError, match="in use by another engine in this process"):
            RunDir.open(run_dir, read_manifest(run_dir))  # a second run
        return write_report(run_dir, *args, **kwargs)

    monkeypatch.setattr(commands, "write_report", look_then_write)
    assert main(["run", str(write_config(tmp_path)), "--headless"]) == EXIT_OK
    run_dir = tmp_path / "runs" / "cli"
    assert seen == [Writer(pid=pid, run_lock_held=True)]
    out = capsys.readouterr().out
    assert f"running (pid {pid})" in out
    assert "not running" not in out
    reports = [path.read_text() for path in (run_dir / "report").rglob("*.md")]
    assert reports and not any("still running" in text for text in reports)
    assert find_writer(run_dir) is None  # released once the report is written


def test_a_final_report_stopped_releases_the_run_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A Ctrl-C during the report stops it (exit 130): the lock kept for it goes with it.
    from trig_stream.analysis import commands
    from trig_stream.analysis.report import ReportStopped
    from trig_stream.locks import find_writer

    def stopped(run_dir: Path, *args: Any, **kwargs: Any) -> Path:
        assert find_writer(run_dir) is not None
        raise ReportStopped("stopped")

    monkeypatch.setattr(commands, "write_report", stopped)
    assert main(["run", str(write_config(tmp_path)), "--headless"]) == EXIT_INTERRUPTED
    assert "report stopped, incomplete" in capsys.readouterr().err
    assert find_writer(tmp_path / "runs" / "cli") is None


def test_a_final_report_that_cannot_be_written_shows_its_reason_escaped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The reason reached the terminal raw, where the other "no report" line escapes it.
    from trig_stream.analysis import report

    def read_only(files: list[tuple[Path, bytes]], **kwargs: object) -> None:
        raise PermissionError(errno.EACCES, "Permission\x1b[2J denied", str(files[0][0]))

    monkeypatch.setattr(report, "write_atomic_together", read_only)
    assert main(["run", str(write_config(tmp_path)), "--headless"]) == EXIT_OK
    last = capsys.readouterr().err.splitlines()[-1]
    assert "\x1b" not in last
    assert ": Permission\\x1b[2J denied; it must be a folder" in last


def test_an_unreadable_run_dir_at_the_final_report_shows_its_reason_escaped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # As above, in the branch of a run directory that can no longer be read.
    from trig_stream.analysis import commands

    def unreadable(run_dir: Path, *args: Any, **kwargs: Any) -> Path:
        raise RunDirError("the journal\x1b[2J cannot be read")

    monkeypatch.setattr(commands, "write_report", unreadable)
    assert main(["run", str(write_config(tmp_path)), "--headless"]) == EXIT_OK
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("no report: the journal\\x1b[2J cannot be read; the run's")


def read_terminal(leader: int, seen: Callable[[bytes], None] | None = None) -> bytes:
    """What the children of a pseudo-terminal write to it until they close it (30 s at the
    most: a safety net); ``seen``, if given, is shown the output so far after each read."""
    output = b""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if select.select([leader], [], [], 1.0)[0]:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: no process holds the terminal any more
                break
            if not chunk:
                break
            output += chunk
            if seen is not None:
                seen(output)
    return output


def test_a_dumb_terminal_gets_plain_progress_not_the_dashboard(tmp_path: Path) -> None:
    # TERM=dumb cannot draw a full-screen app: the dashboard started there anyway.
    path = write_config(tmp_path)
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "trig_stream", "run", str(path), "--no-report"],
        stdin=follower,
        stdout=follower,
        stderr=follower,
        env={**os.environ, "TERM": "dumb"},
        cwd=ROOT,
    )
    os.close(follower)
    try:
        output = read_terminal(leader)
        assert process.wait(timeout=10) == EXIT_OK
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(leader)
    text = output.decode(errors="replace")
    assert "\x1b[?1049h" not in text  # the alternate screen of a full-screen app
    assert "[done] " in text and "done: 12 judgements" in text


def test_images_already_made_are_judged_without_the_dataset_s_source_images(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A p2p dataset naming source images, with no image_root: the image folder's edits are
    # judged alone (as upstream judges them), not every record quarantined for the sources.
    records = json.loads(write_prompts(tmp_path / "prompts.json", 4).read_text())
    edits = tmp_path / "edits"
    edits.mkdir()
    for record in records:
        record["img_id"] = f"src-{record['data_id']}.png"
        Image.new("RGB", (16, 16), "red").save(edits / f"{record['data_id']}.png")
    (tmp_path / "prompts.json").write_text(json.dumps(records))
    path = write_config(tmp_path, samples=4)
    text = path.read_text().replace('output_dir = "runs"', 'output_dir = "runs"\ntask = "p2p"')
    folder = f'backend = "image_folder"\noptions = {{ path = "{edits}" }}'
    path.write_text(text.replace('backend = "synthetic"\noptions = { size = 16 }', folder))
    assert main(["validate", str(path)]) == EXIT_OK
    out = capsys.readouterr().out
    assert "4 records, 4 samples to judge" in out and "quarantined" not in out
    assert main(["run", str(path), "--headless"]) == EXIT_OK
    assert "done: 8 judgements" in capsys.readouterr().err


def test_a_run_whose_every_record_is_quarantined_is_no_success(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, samples=2)
    records = json.loads((tmp_path / "prompts.json").read_text())
    (tmp_path / "prompts.json").write_text(json.dumps([{**r, "prompt": " "} for r in records]))
    assert main(["validate", str(path)]) == EXIT_CONFIG
    captured = capsys.readouterr()
    assert captured.out.startswith("nothing to judge: ")
    assert "2 records would be quarantined" in captured.out
    assert "every one of the 2 records read would be quarantined" in captured.err
    assert main(["run", str(path), "--headless"]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "note: nothing was judged: every one of the 2 dataset record(s) read was " in err
    assert "the first for: missing or empty prompt" in err
    assert "error: nothing was judged" in err and "report:" not in err
    # One good record left: a run that judged it succeeds, its refused records noted only.
    (tmp_path / "prompts.json").write_text(json.dumps([records[0], {**records[1], "prompt": ""}]))
    assert main(["validate", str(path)]) == EXIT_OK
    assert main(["run", str(path), "--headless", "--new-run"]) == EXIT_OK
    assert "nothing was judged" not in capsys.readouterr().err


def test_records_left_out_by_the_filters_are_not_taken_for_every_record_quarantined(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A dataset with one record without a data_id and a pairs filter no record matches:
    # validate and run said "every one of the 1 records read would be / was quarantined"
    # and exited 2, though the filters left the 4 others out (without the bad record: a
    # note of the filters, exit 0).
    path = write_config(tmp_path, samples=4)
    records = json.loads((tmp_path / "prompts.json").read_text())
    (tmp_path / "prompts.json").write_text(json.dumps([*records, {"prompt": "no id"}]))
    text = path.read_text()
    path.write_text(text.replace('"prompts.json"', '"prompts.json"\npairs = ["IQ-R_IQ-O"]'))
    assert main(["validate", str(path)]) == EXIT_OK
    captured = capsys.readouterr()
    assert captured.out.startswith("ok: ") and "nothing to judge" not in captured.err
    assert "5 records, 0 samples to judge, 4 left out by its filters" in captured.out
    assert "1 records would be quarantined" in captured.out
    assert main(["run", str(path), "--headless"]) == EXIT_OK
    err = capsys.readouterr().err
    assert "every one" not in err and "error:" not in err
    assert (
        'note: no sample of the dataset matches its filters (pairs = ["IQ-R_IQ-O"]): 5 records '
        "read, 4 left out and 1 quarantined (the first for: missing data_id" in err
    )


class SourceReader(SyntheticGenerator):
    """The synthetic generator as an editing model: it reads the samples' source images."""

    reads_source_image = True


def test_validate_passes_over_samples_already_judged_as_the_run_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A p2p run judged every sample, then its source images were removed: `run` passes the
    # finished samples over (exit 0), but validate built each one, quarantined them all for
    # the missing images and said "nothing to judge" (exit 2).
    from trig_stream.backends import registry

    monkeypatch.setattr(registry, "_REGISTERED", {"generators": {}, "judges": {}})
    registry.register_backend("generators", "reader", SourceReader)
    records = json.loads(write_prompts(tmp_path / "prompts.json", 4).read_text())
    sources = tmp_path / "sources"
    sources.mkdir()
    for record in records:
        record["img_id"] = f"src-{record['data_id']}.png"
        Image.new("RGB", (16, 16), "red").save(sources / record["img_id"])
    (tmp_path / "prompts.json").write_text(json.dumps(records))
    path = tmp_path / "run.toml"
    text = CONFIG.format(latency=0.0, concurrency=8, extra="")
    text = text.replace('output_dir = "runs"', 'output_dir = "runs"\ntask = "p2p"')
    text = text.replace('"prompts.json"', '"prompts.json"\nimage_root = "sources"')
    path.write_text(text.replace('backend = "synthetic"', 'backend = "reader"'))
    assert main(["run", str(path), "--headless", "--no-report"]) == EXIT_OK
    for image in sources.iterdir():
        image.unlink()
    capsys.readouterr()
    assert main(["validate", str(path)]) == EXIT_OK
    out = capsys.readouterr().out
    assert out.startswith("ok: ") and "quarantined" not in out
    assert "4 records, 0 samples to judge, 4 already judged in the run directory" in out
    assert main(["run", str(path), "--headless", "--no-report"]) == EXIT_OK


def test_only_generators_that_edit_or_follow_a_subject_read_source_images(tmp_path: Path) -> None:
    from trig_stream.backends.base import reads_source_images
    from trig_stream.backends.generators.diffusers_generator import DiffusersGenerator
    from trig_stream.backends.generators.diffusers_options import DiffusersOptions
    from trig_stream.backends.generators.dtm_rewrite import DTMRewriteGenerator, DTMRewriteOptions
    from trig_stream.backends.generators.image_folder import (
        ImageFolderGenerator,
        ImageFolderOptions,
    )

    def diffusers(preset: str) -> DiffusersGenerator:
        options = DiffusersOptions(preset=preset, checkpoint=str(tmp_path))
        return DiffusersGenerator(preset, options)

    readers = {name: diffusers(name) for name in ("instructp2p", "blipdiffusion", "flux")}
    assert {name: g.reads_source_image for name, g in readers.items()} == {
        "instructp2p": True,
        "blipdiffusion": True,
        "flux": False,
    }
    rewrite = DTMRewriteOptions.model_validate(
        {"inner": {"backend": "synthetic"}, "model": "m", "relations": {"IQ-R_TA-C": 0}}
    )
    for inner in readers.values():
        wrapped = DTMRewriteGenerator("dtm", rewrite, inner)
        assert wrapped.reads_source_image is inner.reads_source_image
    folder = ImageFolderGenerator("made", ImageFolderOptions(path=str(tmp_path)))
    assert not reads_source_images([folder, readers["flux"]])
    assert reads_source_images([folder, readers["instructp2p"]])


class ClosesSlowly:
    """Patches the fake judge into one whose close is a server given a long grace period:
    it waits until the command says so, sends the command a Ctrl-C, and ends only once the
    engine kills it (``stop_now``)."""

    def __init__(
        self,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
        signum: int = signal.SIGINT,
    ):
        self.capsys = capsys
        self.signum = signum
        self.err = ""
        self.killed = threading.Event()
        monkeypatch.setattr(FakeJudge, "closing", lambda judge: "stopping its server (up to 30 s)")
        monkeypatch.setattr(FakeJudge, "stop_now", lambda judge: self.killed.set())
        monkeypatch.setattr(FakeJudge, "aclose", lambda judge: self.aclose())
        monkeypatch.setattr(run_command, "CLOSING_POLL_S", 0)

    async def until(self, condition: Any) -> None:
        # Polls a condition another task makes true (a line printed, a signal handled).
        with anyio.fail_after(10):  # a safety net: the fix makes each come at once
            while not condition():
                self.err += self.capsys.readouterr().err
                await anyio.sleep(0.01)

    async def aclose(self) -> None:
        await self.until(lambda: "closing judge 'trigscore': stopping its server" in self.err)
        os.kill(os.getpid(), self.signum)
        await self.until(self.killed.is_set)


def test_ctrl_c_while_a_judge_server_stops_after_the_run_kills_it_and_keeps_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # After a finished run, a Ctrl-C during the server's grace said "finishing the work in
    # flight", then "run the same command again to resume": nothing was in flight or left.
    judge = ClosesSlowly(monkeypatch, capsys)
    assert main(["run", str(write_config(tmp_path, samples=2)), "--headless"]) == EXIT_OK
    err = judge.err + capsys.readouterr().err
    assert "closing judge 'trigscore': stopping its server (up to 30 s); Ctrl-C kills" in err
    assert "stopping now: the run's work is done" in err
    assert "finishing the work in flight" not in err and "resume" not in err, err
    assert judge.killed.is_set()
    assert "done: 4 judgements in this run" in err
    assert (tmp_path / "runs" / "cli" / "report" / "synth" / "report.md").is_file()


def test_with_sigint_ignored_the_judge_server_s_grace_names_sigterm_to_kill_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # "Ctrl-C kills it at once" was said to a run that ignores SIGINT (a script's background
    # job), where a Ctrl-C would do nothing.
    judge = ClosesSlowly(monkeypatch, capsys, signal.SIGTERM)
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        code = main(["run", str(write_config(tmp_path, samples=2)), "--headless"])
    finally:
        signal.signal(signal.SIGINT, before)
    err = judge.err + capsys.readouterr().err
    assert code == EXIT_OK, err
    assert "closing judge 'trigscore': stopping its server (up to 30 s); SIGTERM kills" in err
    assert "Ctrl-C" not in err, err
    assert judge.killed.is_set()


@pytest.mark.parametrize("ending", ["stopped", "failed"])
def test_ctrl_c_while_a_judge_server_stops_after_a_stop_or_failure_says_how_to_resume(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    ending: str,
) -> None:
    # After a graceful stop (or a fatal error), a Ctrl-C during the server's grace said
    # "the run's work is done" and never how to resume the work left.
    path = write_config(tmp_path, samples=8, concurrency=1)
    judge = ClosesSlowly(monkeypatch, capsys)
    original = FakeJudge.judge
    pressed: list[bool] = []

    async def ends_on_the_first(self: FakeJudge, request: JudgeRequest) -> Any:
        if not pressed:
            pressed.append(True)
            if ending == "failed":
                raise FatalBackendError("the judge's server went away")
            os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C: a graceful stop
        return await original(self, request)

    monkeypatch.setattr(FakeJudge, "judge", ends_on_the_first)
    expected = EXIT_INTERRUPTED if ending == "stopped" else EXIT_FATAL
    assert main(["run", str(path), "--headless", "--no-report"]) == expected
    err = judge.err + capsys.readouterr().err
    assert "closing judge 'trigscore': stopping its server (up to 30 s); Ctrl-C kills" in err
    assert "stopping now; run the same command again to resume" in err, err
    assert "the run's work is done" not in err, err
    assert judge.killed.is_set()


def test_on_the_dashboard_a_ctrl_c_while_a_judge_server_stops_kills_it_and_keeps_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Once the dashboard closed, nothing received the stop signals while the server was
    # given its grace: a Ctrl-C ended the command at once (exit 130), the server's other
    # processes left running, the summary and the report lost.
    async def dashboard(engine: Any) -> None:  # its app and signal receiver, closed
        await engine.drain()

    monkeypatch.setattr(run_command, "_dashboard", lambda args, console: dashboard)
    judge = ClosesSlowly(monkeypatch, capsys)
    assert main(["run", str(write_config(tmp_path, samples=2))]) == EXIT_OK
    err = judge.err + capsys.readouterr().err
    assert "closing judge 'trigscore': stopping its server (up to 30 s); Ctrl-C kills" in err
    assert judge.killed.is_set()
    assert "done: 4 judgements in this run" in err
    assert (tmp_path / "runs" / "cli" / "report" / "synth" / "report.md").is_file()


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    # `--version` said "the following arguments are required: COMMAND" (exit 2).
    import trig_stream

    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == EXIT_OK
    assert capsys.readouterr().out == f"trig-stream {trig_stream.__version__}\n"


@pytest.mark.parametrize(
    "options", [["--new-run", "--retry-errors"], ["--retry-errors", "--new-run"]]
)
@pytest.mark.parametrize("command", ["run", "validate"])
def test_a_new_run_that_would_retry_errors_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, options: list[str]
) -> None:
    # Accepted silently: --retry-errors did nothing in the fresh directory --new-run starts.
    path = write_config(tmp_path)
    with pytest.raises(SystemExit) as exited:
        main([command, str(path), *options])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: trig-stream {command} ")
    assert err.endswith(
        f"trig-stream {command}: error: argument --retry-errors: not allowed with --new-run: a "
        "new run directory has no errors to ask again; leave one of them out\n"
    )
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("argv", [["--bogus"], ["--bogus", "run", "x.toml"]])
def test_an_unknown_option_before_the_command_is_named_with_the_top_level_usage(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    # `--bogus` said "the following arguments are required: COMMAND", and `--bogus run x`
    # blamed run ("trig-stream run: error: unrecognized arguments: --bogus").
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: trig-stream [-h] [--version] COMMAND ...")
    assert err.endswith("trig-stream: error: unrecognized arguments: --bogus\n")


def test_no_command_is_still_asked_for(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([])
    assert exited.value.code == 2
    assert capsys.readouterr().err.endswith(
        "trig-stream: error: the following arguments are required: COMMAND\n"
    )


@pytest.mark.parametrize("command", ["run", "validate"])
def test_the_usage_shows_retry_errors_and_new_run_as_exclusive(
    capsys: pytest.CaptureFixture[str], command: str
) -> None:
    # README shows `[--retry-errors | --new-run]`; the usage showed two independent options.
    with pytest.raises(SystemExit) as exited:
        main([command, "-h"])
    assert exited.value.code == 0
    assert "[--retry-errors | --new-run]" in capsys.readouterr().out


def test_an_unknown_option_shows_the_usage_of_its_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # `run --hedless x` showed the top-level usage, which says nothing of run's options.
    with pytest.raises(SystemExit) as exited:
        main(["run", "--hedless", str(tmp_path / "x.toml")])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: trig-stream run [-h] [--headless]")
    assert err.endswith("trig-stream run: error: unrecognized arguments: --hedless\n")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stop_signals_while_the_finished_command_exits_change_nothing(
    tmp_path: Path, signum: int
) -> None:
    # Python puts the default handlers back while it shuts down: a signal then ended a
    # finished run by the signal (143 for SIGTERM), where it should exit as it would have.
    path = write_config(tmp_path, samples=2)
    command = [sys.executable, "-m", "trig_stream", "run", str(path), "--headless", "--no-report"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    try:
        for line in process.stderr:
            if line.startswith("done:"):
                break
        while process.poll() is None:  # a signal for every moment of its way out
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signum)
            time.sleep(0.002)
        process.stderr.read()
    finally:
        process.kill()
        process.wait()
    assert process.returncode == EXIT_OK
