"""What the command writes, and where: a reader that goes away, closed or redirected
standard streams, a locale that cannot encode a message, names never cut short."""

from __future__ import annotations

import errno
import functools
import io
import json
import os
import pty
import resource
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.test_cli import signal_after, write_config
from trig_stream import inspect_commands
from trig_stream.cli import main
from trig_stream.exit_codes import EXIT_INTERRUPTED, EXIT_OK, EXIT_RUN_DIR
from trig_stream.progress import full_screen_possible
from trig_stream.terminal import CommandConsole

COMMAND = [sys.executable, "-m", "trig_stream"]
SAFETY_S = 120
"""A safety net: these commands take seconds; one that hangs fails the test."""


def gone_reader() -> int:
    """The write end of a pipe whose reader has gone: the first write to it fails (EPIPE)."""
    read, write = os.pipe()
    os.close(read)
    return write


def run_with_gone_reader(
    args: list[str], *, stream: str, stdout: int | None = None, stderr: int | None = None
) -> int:
    """Run the command with ``stream`` (stdout or stderr) writing to a pipe nobody reads."""
    write = gone_reader()
    if stream == "stdout":
        stdout = write
    else:
        stderr = write
    try:
        process = subprocess.run([*COMMAND, *args], stdout=stdout, stderr=stderr, timeout=SAFETY_S)
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


class FullDisk(io.StringIO):
    """A standard stream on a disk that is full after its first ``room`` writes (ENOSPC),
    past the file-size limit (EFBIG), or whose terminal has gone (EIO)."""

    def __init__(self, room: int = 0, error: int = errno.ENOSPC) -> None:
        super().__init__()
        self.room = room
        self.error = error

    def write(self, text: str) -> int:
        if self.room <= 0:
            raise OSError(self.error, os.strerror(self.error))
        self.room -= 1
        return super().write(text)


@pytest.mark.parametrize(
    ("room", "error"),
    [(0, errno.ENOSPC), (1, errno.ENOSPC), (1, errno.EDQUOT), (0, errno.EFBIG), (0, errno.EIO)],
    ids=["full-at-once", "fills-mid-run", "quota", "file-size-limit", "terminal-gone"],
)
def test_a_run_whose_stderr_cannot_be_written_judges_everything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, room: int, error: int
) -> None:
    # `run CFG 2>/dev/full`: the "run directory:" line raised ENOSPC from inside the run, which
    # ended with a traceback, exit 1, nothing judged; a log filling its disk ended it midway.
    # So did `ulimit -f` with `2>>` a log past that size (EFBIG: CPython ignores SIGXFSZ).
    path = write_config(tmp_path, samples=6)
    stderr = FullDisk(room, error)
    monkeypatch.setattr(sys, "stderr", stderr)
    assert main(["run", str(path), "--headless"]) == EXIT_OK
    run_dir = tmp_path / "runs" / "cli"
    assert len((run_dir / "journal.jsonl").read_text().splitlines()) == 12
    assert (run_dir / "report" / "synth").is_dir()
    assert stderr.getvalue().startswith("run directory:") == (room > 0)


def test_status_and_validate_on_a_full_disk_do_their_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_config(tmp_path, samples=4)
    assert main(["run", str(path), "--headless", "--no-report"]) == EXIT_OK
    monkeypatch.setattr(sys, "stdout", FullDisk())
    assert main(["status", str(tmp_path / "runs" / "cli")]) == EXIT_OK
    assert main(["validate", str(path)]) == EXIT_OK


def test_import_config_to_a_full_disk_says_the_config_was_not_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Its converted config is all it makes: lost, that is an error (as with -o), not a
    # traceback; an output that cannot be written, it exits 3 (it exited 2, as for a bad input).
    upstream = tmp_path / "generation.yaml"
    upstream.write_text('name: "gen"\ntask: "t2i"\ngeneration:\n  models: ["flux"]\n')
    with monkeypatch.context() as patched:
        patched.setattr(sys, "stdout", FullDisk())
        code = main(["import-config", str(upstream)])
    err = capsys.readouterr().err
    assert code == EXIT_RUN_DIR, err
    assert "error: standard output: cannot write the config: No space left on device; pass " in err
    assert "-o FILE" in err and "Traceback" not in err


def capped_file_size(size: int) -> Callable[[], None]:
    """What a child runs before the command: files it writes stop at ``size`` bytes
    (``ulimit -f``), a write past it failing with EFBIG rather than killing it (SIGXFSZ)."""

    def cap() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))

    return cap


def test_import_config_cut_short_under_stdout_says_the_config_was_not_written(
    tmp_path: Path,
) -> None:
    # `import-config many.yaml > out.toml` on a disk that fills: the write stopped at the
    # disk's end, and the rest was dropped unsaid, exit 0, half a config in out.toml.
    upstream = tmp_path / "generation.yaml"
    upstream.write_text('name: "gen"\ntask: "t2i"\ngeneration:\n  models: ["flux"]\n')
    out = tmp_path / "out.toml"
    with out.open("wb") as stdout:
        converted = subprocess.run(
            [*COMMAND, "import-config", str(upstream)],
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=capped_file_size(1024),
            timeout=SAFETY_S,
        )
    assert converted.returncode == EXIT_RUN_DIR, converted.stderr
    assert "error: standard output: cannot write the config: File too large" in converted.stderr
    assert out.stat().st_size == 1024


def test_import_config_whose_reader_has_gone_exits_as_it_would_have(tmp_path: Path) -> None:
    upstream = tmp_path / "generation.yaml"
    upstream.write_text('name: "gen"\ntask: "t2i"\ngeneration:\n  models: ["flux"]\n')
    code = run_with_gone_reader(
        ["import-config", str(upstream)], stream="stdout", stderr=subprocess.DEVNULL
    )
    assert code == EXIT_OK


def with_closed(fds: str, args: list[str]) -> list[str]:
    """The command run by a shell that closes ``fds`` first (``"1"``, ``"0 2"``...)."""
    closing = " ".join(f"{fd}>&-" if fd != "0" else "<&-" for fd in fds.split())
    return ["sh", "-c", f'exec "$@" {closing}', "sh", *COMMAND, *args]


def test_a_hangup_stops_a_run_whose_stdout_is_closed(tmp_path: Path) -> None:
    # The event loop's files took the free numbers 0-2; after SIGHUP, /dev/null was put over
    # its wakeup pipe and the run never stopped.
    path = write_config(tmp_path, samples=40, latency=0.2, concurrency=2)
    command = with_closed("1", ["run", str(path), "--headless"])
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        signal_after(process, "run directory:", signal.SIGHUP)
        assert process.wait(timeout=SAFETY_S) == EXIT_INTERRUPTED
    finally:
        process.kill()
        process.wait()


BUSY_GENERATOR = """\
import sys, time
from trig_stream.testing.synthetic import SyntheticGenerator
def busy(self, *args, **kwargs):
    print('busy', file=sys.stderr, flush=True)
    time.sleep(600)
SyntheticGenerator.generate = busy
from trig_stream.console import entry_point
sys.argv = ['trig-stream', *sys.argv[1:]]
entry_point()
"""


def test_a_hard_stop_of_a_run_whose_stdout_is_closed_exits_130(tmp_path: Path) -> None:
    # A hard stop leaves the generation call running, and the command flushed sys.stdout
    # (None: fd 1 was closed) before exiting without it: a traceback, exit 1.
    path = write_config(tmp_path)
    command = ["sh", "-c", 'exec "$@" >&-', "sh", sys.executable, "-c", BUSY_GENERATOR]
    process = subprocess.Popen(
        [*command, "run", str(path), "--headless"], stderr=subprocess.PIPE, text=True
    )
    assert process.stderr is not None
    try:
        signal_after(process, "busy", signal.SIGINT)
        signal_after(process, "stopping:", signal.SIGINT)
        code = process.wait(timeout=SAFETY_S)
        rest = process.stderr.read()
    finally:
        process.kill()
        process.wait()
    assert code == EXIT_INTERRUPTED, rest
    assert "not waiting for a model still loading" in rest and "Traceback" not in rest


@pytest.mark.parametrize("headless", [[], ["--headless"]])
def test_a_run_with_its_standard_streams_closed_finishes(
    tmp_path: Path, headless: list[str]
) -> None:
    path = write_config(tmp_path, samples=4)
    command = with_closed("0 1 2", ["run", str(path), *headless])
    assert subprocess.run(command, timeout=SAFETY_S).returncode == EXIT_OK
    assert (tmp_path / "runs" / "cli" / "report" / "synth").is_dir()


def test_commands_with_stdin_or_stdout_closed_do_their_work(tmp_path: Path) -> None:
    path = write_config(tmp_path, samples=4)
    run = subprocess.run(with_closed("0", ["run", str(path)]), capture_output=True, text=True)
    assert (run.returncode, run.stderr.count("Traceback")) == (EXIT_OK, 0), run.stderr
    watch = subprocess.run(
        with_closed("0", ["watch", str(tmp_path / "runs" / "cli")]),
        capture_output=True,
        text=True,
        timeout=SAFETY_S,
    )
    assert (watch.returncode, watch.stderr) == (EXIT_OK, "")
    upstream = tmp_path / "generation.yaml"
    upstream.write_text('name: "gen"\ntask: "t2i"\ngeneration:\n  models: ["flux"]\n')
    converted = subprocess.run(
        with_closed("1", ["import-config", str(upstream)]),
        capture_output=True,
        text=True,
        timeout=SAFETY_S,
    )
    assert (converted.returncode, converted.stderr.count("Traceback")) == (EXIT_OK, 0), (
        converted.stderr
    )


def test_what_the_locale_cannot_encode_is_escaped_not_a_traceback(tmp_path: Path) -> None:
    path = write_config(tmp_path, samples=4)
    prompts = tmp_path / "prompts.json"
    records = json.loads(prompts.read_text())
    records[0]["dimension"] = ["IQ-R", "Tü"]  # quarantined: the reason quotes the code
    prompts.write_text(json.dumps(records))
    ascii_locale = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    validated = subprocess.run(
        [*COMMAND, "validate", str(path)],
        capture_output=True,
        text=True,
        encoding="ascii",
        env=ascii_locale,
        timeout=SAFETY_S,
    )
    assert validated.returncode == EXIT_OK, validated.stderr
    assert "T\\xfc" in validated.stdout


def test_no_dashboard_when_stderr_is_not_the_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `trig-stream run cfg 2>run.log` on a terminal: Textual draws on sys.__stderr__, so the
    # dashboard filled the log and the terminal showed nothing.
    leader, follower = pty.openpty()
    with (
        os.fdopen(leader, "wb", buffering=0),
        os.fdopen(follower, "w") as terminal,
        (tmp_path / "run.log").open("w") as log,
    ):
        monkeypatch.setenv("TERM", "xterm")
        monkeypatch.setattr(sys, "stdin", terminal)
        monkeypatch.setattr(sys, "stdout", terminal)
        monkeypatch.setattr(sys, "__stderr__", terminal)
        assert full_screen_possible()
        monkeypatch.setattr(sys, "__stderr__", log)
        assert not full_screen_possible()


@pytest.mark.parametrize("encoding", ["ascii", "latin-1", "cp1252"])
def test_no_dashboard_on_a_terminal_that_does_not_write_utf8(
    monkeypatch: pytest.MonkeyPatch, encoding: str
) -> None:
    # PYTHONIOENCODING=ascii, or a Latin-1 locale: the dashboard's box lines were drawn
    # as backslash escapes (\u2502), unreadable; plain progress lines are shown instead.
    leader, follower = pty.openpty()
    with (
        os.fdopen(leader, "wb", buffering=0),
        os.fdopen(follower, "w", encoding="UTF8") as terminal,
        os.fdopen(os.dup(follower), "w", encoding=encoding) as other,
    ):
        monkeypatch.setenv("TERM", "xterm")
        monkeypatch.setattr(sys, "stdin", terminal)
        monkeypatch.setattr(sys, "stdout", terminal)
        monkeypatch.setattr(sys, "__stderr__", terminal)
        assert full_screen_possible()
        for name in ("stdout", "__stderr__"):
            with monkeypatch.context() as patch:
                patch.setattr(sys, name, other)
                assert not full_screen_possible(), name


def test_status_never_cuts_a_name_short(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Off a terminal the tables were 80 columns wide: two models whose names begin alike
    # both showed as 'stabilityai-stable-diffusion-…'.
    path = write_config(tmp_path, samples=4)
    names = [f"stabilityai-stable-diffusion-3.5-large-turbo-{n}" for n in ("first", "second")]
    second = '[[generators]]\nname = "{}"\nbackend = "synthetic"\n'
    text = path.read_text().replace('name = "synth"', f'name = "{names[0]}"')
    path.write_text(text + second.format(names[1]))
    assert main(["run", str(path), "--headless", "--no-report"]) == EXIT_OK
    capsys.readouterr()
    assert main(["status", str(tmp_path / "runs" / "cli")]) == EXIT_OK
    out = capsys.readouterr().out
    assert "…" not in out, out
    for name in names:  # its counts, and its means: one line each
        assert sum(f" {name} " in line for line in out.splitlines()) >= 2, out


@pytest.mark.parametrize("columns", [30, 40])
def test_status_on_a_narrow_terminal_never_cuts_a_count(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    columns: int,
) -> None:
    # On a terminal the counts took rich's ellipsis: at 30 columns a total of 60 read '…',
    # at 40 with long names the headers read 'uns…'. Only the names fold, and never to nothing.
    path = write_config(tmp_path, samples=30)
    name = "stabilityai-stable-diffusion-3.5-large-turbo"
    path.write_text(path.read_text().replace('name = "synth"', f'name = "{name}"'))
    assert main(["run", str(path), "--headless", "--no-report"]) == EXIT_OK
    capsys.readouterr()
    terminal = functools.partial(
        CommandConsole, force_terminal=True, width=columns, color_system=None
    )
    monkeypatch.setattr(inspect_commands, "CommandConsole", terminal)
    assert main(["status", str(tmp_path / "runs" / "cli")]) == EXIT_OK
    out = capsys.readouterr().out
    assert "…" not in out, out
    words = out.split()
    assert "60" in words and "unscorable" in words, out
    folded = "".join(line.split("│")[1].strip() for line in out.splitlines() if "│" in line)
    assert folded.startswith(name + name), out  # its counts, then its first mean


def test_an_error_message_never_sends_its_control_characters_to_the_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # An exception's text may quote what came from outside (a file name, a server's body).
    assert main(["validate", str(tmp_path / "x\x1b[2J\x9by.toml")]) != EXIT_OK
    err = capsys.readouterr().err
    assert "x\\x1b[2J\\x9by.toml" in err
    assert "\x1b" not in err and "\x9b" not in err
