"""The ``simulate-judge`` command: arguments, and a real process serving until SIGINT."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from rich.console import Console

from trig_stream.testing.simulate_judge import add_simulate_judge_command, options_from_args


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_simulate_judge_command(parser.add_subparsers(dest="command"))
    return parser.parse_args(["simulate-judge", *argv])


def test_arguments_become_options(tmp_path: Path) -> None:
    args = parse(
        "--latency",
        "0.05",
        "--capacity",
        "64",
        "--seed",
        "3",
        "--error-rate",
        "0.1",
        "--rate-limit-rate",
        "0.05",
        "--retry-after",
        "2",
        "--hang-rate",
        "0.01",
        "--malformed-rate",
        "0.01",
        "--missing-logprobs-rate",
        "0.02",
        "--reset-rate",
        "0.01",
        "--correlation",
        "IQ-R_TA-C=0.8",
        "--allowed-local-media-path",
        str(tmp_path),
    )
    options = options_from_args(args)
    assert (options.latency_s, options.capacity, options.seed) == (0.05, 64, 3)
    assert options.allowed_local_media_path == tmp_path
    assert options_from_args(parse()).allowed_local_media_path is None
    assert options.fault_rates() == {
        "error": 0.1,
        "rate_limit": 0.05,
        "hang": 0.01,
        "malformed": 0.01,
        "missing_logprobs": 0.02,
        "reset": 0.01,
    }
    assert options.retry_after == "2"
    assert options.correlations == {"IQ-R_TA-C": 0.8}
    # A correlation is symmetric: a pair is kept in canonical order, however given.
    turned = options_from_args(parse("--correlation", "TA-C_IQ-R=0.8"))
    assert turned.correlations == {"IQ-R_TA-C": 0.8}
    assert callable(args.handler)
    # A model named is the only one served, as vLLM serves one; none named serves any.
    assert (options.model, options.served_model_only) == ("trig-judge-sim", False)
    named = options_from_args(parse("--model", "judge-x"))
    assert (named.model, named.served_model_only) == ("judge-x", True)
    date = "Wed, 21 Oct 2015 07:28:00 GMT"
    assert options_from_args(parse("--retry-after", date)).retry_after == date
    # The value as the judge reads it (stripped) is the value sent.
    assert options_from_args(parse("--retry-after", " 2 ")).retry_after == "2"
    assert options_from_args(parse("--retry-after", "0.5")).retry_after == "0.5"
    asctime = "Wed Oct 21 07:28:00 2015"  # RFC 9110 has recipients accept it
    assert options_from_args(parse("--retry-after", asctime)).retry_after == asctime
    rfc_850 = "Wednesday, 21-Oct-15 07:28:00 GMT"
    assert options_from_args(parse("--retry-after", rfc_850)).retry_after == rfc_850
    long_ago = "Sat, 21 Oct 0100 07:28:00 GMT"  # the first year not read as two digits
    assert options_from_args(parse("--retry-after", long_ago)).retry_after == long_ago


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--correlation", "IQ-R_TA-C"), "expected A_B=R"),
        # It said only "could not convert string to float: 'abc'", naming no option.
        (("--correlation", "IQ-R_TA-C=abc"), "--correlation 'IQ-R_TA-C=abc': 'abc' is not a"),
        # The second value silently replaced the first.
        (
            ("--correlation", "IQ-R_TA-C=0.5", "--correlation", "IQ-R_TA-C=0.8"),
            "the pair IQ-R_TA-C is given twice \\(in either order\\); give each pair once",
        ),
        # The pair in the other order read as "dimension TA-C appears in two planted pairs".
        (
            ("--correlation", "IQ-R_TA-C=0.5", "--correlation", "TA-C_IQ-R=0.5"),
            "^--correlation 'TA-C_IQ-R=0.5': the pair IQ-R_TA-C is given twice",
        ),
        # Sent as UTF-8, one judge client read it and another ignored it.
        (("--retry-after", "\u0663"), "^--retry-after: '\u0663' holds a non-ASCII character"),
        (("--error-rate", "0.7", "--reset-rate", "0.7"), "must not exceed 1"),
        # These named "options" and kept pydantic's "Value error, " prefix.
        (
            ("--hang-rate", "1", "--error-rate", "1"),
            "^--error-rate, --hang-rate: fault rates add up to 2.000; they must not exceed 1$",
        ),
        (
            ("--correlation", "IQ-R_TA-C=2"),
            r"^--correlation 'IQ-R_TA-C=2': planted correlation of IQ-R_TA-C must be in \[-1, 1\]",
        ),
        (
            ("--correlation", "XX_TA-C=0.5"),
            "^--correlation 'XX_TA-C=0.5': unknown dimension 'XX' in pair 'XX_TA-C'$",
        ),
        (("--correlation", "=0.5"), "^--correlation '=0.5': no pair before '='"),
        (
            ("--correlation", "IQ-R_IQ-R=0.5"),
            "^--correlation 'IQ-R_IQ-R=0.5': pair 'IQ-R_IQ-R' names the same dimension twice$",
        ),
        (
            ("--correlation", "IQ-R_TA-C=0.5", "--correlation", "IQ-R_TA-S=0.5"),
            "^--correlation: dimension IQ-R appears in two planted pairs",
        ),
        # The errors named the field (latency_s, capacity), not the option typed.
        (("--latency", "inf"), "^--latency: Input should be a finite number"),
        (("--latency", "nan"), "^--latency: Input should be a finite number"),
        (("--latency", "-1"), "^--latency: Input should be greater than or equal to 0"),
        (("--retry-after", "soon"), "'soon' is neither a number of seconds nor an HTTP date"),
        (
            ("--retry-after", "-1"),
            "^--retry-after: '-1' is negative: Retry-After seconds must be >= 0",
        ),
        (("--retry-after", "inf"), "'inf' is neither"),
        (("--retry-after", "infinity"), "'infinity' is neither"),
        (("--retry-after", "nan"), "'nan' is neither"),
        (("--retry-after", "1_000"), "'1_000' is neither"),
        # A date past what a datetime holds raised OverflowError: a traceback, exit 1.
        (
            ("--retry-after", "Mon, 01 Jan 99999999999 00:00:00 GMT"),
            "^--retry-after: 'Mon, 01 Jan 99999999999 00:00:00 GMT' is not an HTTP date in",
        ),
        (
            ("--retry-after", "Mon, 01 Jan 2020 00:00:00 +99999999999999999999"),
            "an HTTP date is in GMT",
        ),
        (("--retry-after", "Sun Nov  6 08:49:37 99999999999"), "not an HTTP date in any"),
        # A date without its zone was called out of range; dates in forms HTTP has not
        # (another zone, no weekday) were accepted.
        (
            ("--retry-after", "Sun, 06 Nov 2094 08:49:37"),
            "^--retry-after: 'Sun, 06 Nov 2094 08:49:37' has no GMT zone: an HTTP date is in "
            "GMT \\(IMF-fixdate, RFC 850 or asctime\\)",
        ),
        (("--retry-after", "Sun, 06 Nov 2094 08:49:37 +0200"), "has no GMT zone"),
        (("--retry-after", "Sunday, 06-Nov-94 08:49:37 UTC"), "has no GMT zone"),
        (
            ("--retry-after", "06 Nov 2094 08:49:37 GMT"),
            "is not an HTTP date in any of its forms",
        ),
        (("--retry-after", "Sun, 6 Nov 2094 08:49:37 GMT"), "not an HTTP date in any of"),
        # A year of any digits was taken: two (RFC 850's only) were accepted, and asctime's
        # called out of range.
        (("--retry-after", "Sun, 06 Nov 94 08:49:37 GMT"), "not an HTTP date in any of"),
        (("--retry-after", "Sun Nov  6 08:49:37 94"), "not an HTTP date in any of"),
        # Read by the judge as a two-digit year: 0050 waited until 2050.
        (
            ("--retry-after", "Sun, 06 Nov 0001 08:49:37 GMT"),
            "^--retry-after: 'Sun, 06 Nov 0001 08:49:37 GMT' has the year 0001, which the "
            "judge reads as 2001",
        ),
        (("--retry-after", "Sun Nov  6 08:49:37 0050"), "the year 0050, which the judge reads"),
        (("--retry-after", "Sun, 31 Feb 2026 08:49:37 GMT"), "is a date out of range"),
        (("--retry-after", "Sun Nov  6 08:49:37 2094 GMT"), "not an HTTP date in any of"),
        # Accepted, it made every 429 drop its connection (a newline cannot be sent).
        (("--retry-after", "1\n"), "'1\\\\n' holds a control character"),
        (
            ("--retry-after", "Wed, 21 Oct 2015\t07:28:00 GMT"),
            "holds a control character, which no HTTP header may carry",
        ),
        (
            ("--allowed-local-media-path", "/nonexistent/trig-stream"),
            "--allowed-local-media-path /nonexistent/trig-stream: no such folder; name the",
        ),
        (("--capacity", "0"), "^--capacity: Input should be greater than or equal to 1"),
        (("--retry-after", "soon"), "^--retry-after: "),
        # An empty name served the default one, with every other name answered 404.
        (("--model", ""), "^--model: empty; name the model to serve"),
        (("--model", "  "), "^--model: empty"),
    ],
)
def test_bad_arguments_are_explained(argv: tuple[str, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        options_from_args(parse(*argv))


def test_a_media_path_that_is_a_file_is_not_a_folder(tmp_path: Path) -> None:
    # It said "no such folder" of a file that is there.
    media = tmp_path / "images.png"
    media.write_bytes(b"")
    message = f"--allowed-local-media-path {media}: is not a folder; name the folder"
    with pytest.raises(ValueError, match=re.escape(message)):
        options_from_args(parse("--allowed-local-media-path", str(media)))


def test_a_key_given_as_its_variable_name_is_refused_unquoted() -> None:
    with pytest.raises(ValueError, match="--api-key-env: not the name of an environment") as raised:
        options_from_args(parse("--api-key-env", "sk-proj-SECRET123"))
    assert "SECRET123" not in str(raised.value)


def test_an_error_shows_the_control_characters_of_an_argument_escaped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The argument, quoted raw, sent its ESC sequence to the terminal.
    args = parse("--allowed-local-media-path", str(tmp_path / "bad\x1b[31mname"))
    assert args.handler(args, Console(stderr=True, width=200)) == 2
    err = capsys.readouterr().err
    assert "bad\\x1b[31mname: no such folder" in err and "\x1b" not in err


def test_a_bad_option_is_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    # An impossible port too: were the latency accepted, the command would stop there
    # (with another message) instead of serving until interrupted.
    args = parse("--latency", "inf", "--port", "70000")
    assert args.handler(args, Console(stderr=True, width=200)) == 2
    assert "error: --latency: Input should be a finite number" in capsys.readouterr().err
    args = parse("--model", "", "--port", "70000")
    assert args.handler(args, Console(stderr=True, width=200)) == 2
    assert "error: --model: empty" in capsys.readouterr().err


def test_a_retry_after_date_out_of_range_is_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    date = "Mon, 01 Jan 2024 24:00:00 GMT"
    args = parse("--retry-after", date, "--rate-limit-rate", "0.5", "--port", "70000")
    assert args.handler(args, Console(stderr=True, width=200)) == 2
    assert "is a date out of range" in capsys.readouterr().err


def test_a_retry_after_with_a_newline_is_exit_2_at_start(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The impossible port stops the command, were the value accepted, before it serves.
    args = parse("--retry-after", "1\n", "--rate-limit-rate", "1", "--port", "70000")
    assert args.handler(args, Console(stderr=True, width=200)) == 2
    assert "holds a control character" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("host", "code", "message"),
    [
        ("..", 4, "cannot listen on ..:0: not a valid host name"),  # was a traceback
        ("a" * 64, 4, "not a valid host name"),
        ("", 2, "--host: empty"),  # it served at http://:PORT/v1
        ("h\x1b", 4, "cannot listen on h\\x1b:0"),  # the ESC was printed raw
    ],
)
def test_a_host_that_cannot_be_listened_on_is_one_message(
    capsys: pytest.CaptureFixture[str], host: str, code: int, message: str
) -> None:
    args = parse("--port", "0", "--host", host)
    assert args.handler(args, Console(stderr=True, width=200)) == code
    err = capsys.readouterr().err
    assert message in err and "\x1b" not in err and "Traceback" not in err, err


def test_a_port_that_cannot_be_listened_on_is_one_message(
    capsys: pytest.CaptureFixture[str],
) -> None:
    console = Console(stderr=True, width=200)
    args = parse("--port", "70000")
    assert args.handler(args, console) == 2
    assert "--port 70000: a port is 0 to 65535" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        args = parse("--port", str(taken.getsockname()[1]))
        assert args.handler(args, console) == 4
    assert "Address already in use" in capsys.readouterr().err


def test_serves_until_interrupted() -> None:
    code = (
        "import argparse, sys\n"
        "from rich.console import Console\n"
        "from trig_stream.testing.simulate_judge import add_simulate_judge_command\n"
        "p = argparse.ArgumentParser(); add_simulate_judge_command(p.add_subparsers())\n"
        "a = p.parse_args(['simulate-judge', '--port', '0'])\n"
        "sys.exit(a.handler(a, Console(stderr=True)))\n"
    )
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("READY http://127.0.0.1:")
        base_url = line.split()[1]
        with urllib.request.urlopen(f"{base_url}/models", timeout=10) as response:
            assert json.load(response)["data"][0]["id"] == "trig-judge-sim"
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


def signal_mask(pid: int, field: str) -> int:
    """The mask ``field`` (``SigIgn``, ``SigCgt``) of process ``pid``, from ``/proc``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1], 16)
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def has(mask: int, signum: int) -> bool:
    return bool(mask >> (signum - 1) & 1)


@contextmanager
def serving_with_ignored(*ignored: signal.Signals) -> Iterator[subprocess.Popen[str]]:
    """``trig-stream simulate-judge --port 0`` started with ``ignored`` ignored, once it is
    ready (its READY line read); killed on the way out if still running."""
    code = (
        "import signal, sys\n"
        f"for signum in {[int(signum) for signum in ignored]!r}:\n"
        "    signal.signal(signum, signal.SIG_IGN)\n"
        "from trig_stream.console import entry_point\n"
        "sys.argv = ['trig-stream', 'simulate-judge', '--port', '0']\n"
        "entry_point()\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None and process.stderr is not None
        assert process.stdout.readline().startswith("READY http://127.0.0.1:")
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def stops_with_its_counts(process: subprocess.Popen[str], signum: signal.Signals) -> None:
    assert process.stderr is not None
    process.send_signal(signum)
    rest = process.stderr.read()
    assert process.wait(timeout=10) == 0, rest
    assert "stopped: 0 served" in rest


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_a_sigint_it_was_started_ignoring_stays_ignored_and_sighup_stops_it() -> None:
    # A script's background job starts with SIGINT ignored; the server took it over all the
    # same (the user's Ctrl-C for the script's foreground job stopped it), and SIGHUP ended
    # it with exit 130 and no counts, where SIGINT and SIGTERM gave 0 and the counts.
    with serving_with_ignored(signal.SIGINT) as process:
        assert has(signal_mask(process.pid, "SigIgn"), signal.SIGINT)
        caught = signal_mask(process.pid, "SigCgt")
        assert has(caught, signal.SIGTERM) and has(caught, signal.SIGHUP)
        stops_with_its_counts(process, signal.SIGHUP)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_sigterm_stops_it_even_when_every_stop_signal_was_ignored() -> None:
    # Started with SIGINT, SIGTERM and SIGHUP all ignored, it listened for none of them and
    # only SIGKILL stopped it (without its counts); a SIGTERM is sent to a server on purpose.
    with serving_with_ignored(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as process:
        ignored = signal_mask(process.pid, "SigIgn")
        assert has(ignored, signal.SIGINT) and has(ignored, signal.SIGHUP)
        assert has(signal_mask(process.pid, "SigCgt"), signal.SIGTERM)
        stops_with_its_counts(process, signal.SIGTERM)


def test_serves_when_nobody_reads_its_ready_line() -> None:
    # `simulate-judge --port 0 | true`: the READY line's broken pipe was taken for a failed
    # bind: "cannot listen on 127.0.0.1:0: Broken pipe", exit 4.
    read, write = os.pipe()
    os.close(read)  # the reader has gone: the READY line's write fails
    command = [sys.executable, "-m", "trig_stream", "simulate-judge", "--port", "0"]
    try:
        process = subprocess.Popen(command, stdout=write, stderr=subprocess.PIPE, text=True)
    finally:
        os.close(write)
    try:
        assert process.stderr is not None
        serving = process.stderr.readline()
        assert serving.startswith("simulated judge serving 'trig-judge-sim' at http://")
        base_url = serving.split()[-1]
        with urllib.request.urlopen(f"{base_url}/models", timeout=10) as response:
            assert json.load(response)["data"][0]["id"] == "trig-judge-sim"
        process.send_signal(signal.SIGINT)
        rest = process.stderr.read()
        assert process.wait(timeout=10) == 0, rest
        assert "cannot listen" not in rest and "stopped:" in rest
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()
