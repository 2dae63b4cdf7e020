"""``options.serve``: the judge starts its server, waits for /health, and stops it.

The simulated judge (``python -m trig_stream simulate-judge``) stands in for vLLM. Waits for a
child process poll a real condition under a bound; no step depends on how long anything takes.
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import anyio
import pytest
from PIL import Image

from tests.conftest import ConfigFactory, write_prompts
from trig_stream import Engine
from trig_stream.backends import library_logs
from trig_stream.backends.api_keys import note_key_variable
from trig_stream.backends.base import JudgeRequest
from trig_stream.backends.judges import managed_server, process_groups, server_addresses
from trig_stream.backends.judges.managed_server import (
    TAIL_BYTES,
    TAIL_LINES,
    ManagedServer,
    ServeOptions,
)
from trig_stream.backends.judges.openai_judge import OpenAIJudge
from trig_stream.backends.judges.openai_options import OpenAIJudgeOptions
from trig_stream.cli import main
from trig_stream.config import load_config
from trig_stream.errors import ConfigError, FatalBackendError
from trig_stream.exit_codes import EXIT_CONFIG, EXIT_FATAL, EXIT_OK
from trig_stream.records import Sample

pytestmark = pytest.mark.anyio

SIMULATED = [sys.executable, "-m", "trig_stream", "simulate-judge", "--port", "{port}"]
KEY = "sk-serve-test-0f3c9a51d2e84b7a"


def serve(command: list[str], **options: Any) -> dict[str, Any]:
    return {"command": command, "port": 0, "poll_interval_s": 0.05, **options}


def judge_with(serve_table: dict[str, Any], **options: Any) -> OpenAIJudge:
    return OpenAIJudge(
        "trigscore",
        OpenAIJudgeOptions.model_validate({"model": "m", "serve": serve_table, **options}),
    )


def request(tmp_path: Path, judge: OpenAIJudge) -> JudgeRequest:
    path = tmp_path / "image.png"
    Image.new("RGB", (16, 16), (200, 40, 40)).save(path)
    sample = Sample(
        data_id="IQ-R_TA-C_1",
        task="t2i",
        prompt="a red square",
        dimensions=("IQ-R", "TA-C"),
    )
    return JudgeRequest("model", sample, "IQ-R", judge.prepare(path), 1)


def gone(pid: int) -> bool:
    """Whether process ``pid`` has ended: no such process, or a zombie nobody reaps yet (an
    orphan's new parent may be slow to, or never)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False  # no /proc: alive as far as can be told
    return stat.rpartition(")")[2].split()[0] == "Z"


def _binds_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


IPV6_LOOPBACK = socket.has_ipv6 and _binds_ipv6_loopback()
"""Whether ::1 is an address of this machine (Python built with IPv6 says nothing of a
machine or container where it is turned off)."""


async def wait_for(condition: Any, what: str) -> None:
    """Poll a real condition of a child process (no event tells it), under a bound."""
    with anyio.fail_after(60):
        while not condition():  # noqa: ASYNC110 - the condition lives in another process
            await anyio.sleep(0.02)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_start_judge_stop(tmp_path: Path) -> None:
    judge = judge_with(serve(SIMULATED))
    await judge.open()
    server = judge.server
    assert server is not None and server.pid is not None
    try:
        assert server.port != 0 and server.argv[-1] == str(server.port)
        reply = await judge.judge(request(tmp_path, judge))
        assert reply.top_logprobs
    finally:
        await judge.aclose()
    assert judge.server is None
    assert server.returncode == 0  # it stopped cleanly on SIGTERM
    assert gone(server.pid)


async def start_failure(script: str) -> str:
    """The message of the error a judge gives when its ``serve`` command, ``script`` run by
    Python with the judge's key in SERVE_TEST_KEY, fails to start; closing it after that
    releases nothing and raises nothing."""
    judge = judge_with(
        serve([sys.executable, "-u", "-c", script, "{port}"]), api_key_env="SERVE_TEST_KEY"
    )
    with pytest.raises(FatalBackendError) as caught:
        await judge.open()
    await judge.aclose()
    return str(caught.value)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_server_that_exits_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SERVE_TEST_KEY", KEY)
    script = (
        "import os, sys\n"
        "for i in range(30): print(f'line {i}')\n"
        "print('echoing', os.environ['SERVE_TEST_KEY'])\n"
        "print('CUDA out of memory', file=sys.stderr)\n"
        "sys.exit(3)\n"
    )
    message = await start_failure(script)
    assert "exited with status 3 before ready" in message
    assert f"last {TAIL_LINES} lines" in message
    assert "| CUDA out of memory" in message and "| echoing ***" in message
    assert "| line 29\n" in message and "| line 12\n" in message
    assert "| line 11\n" not in message  # only the last lines
    assert KEY not in message


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_key_cut_by_the_start_of_the_quoted_tail_is_never_shown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Only the last TAIL_BYTES of output are read: here they begin 10 characters into the
    # key, whose rest no scrubbing of the whole key would find.
    monkeypatch.setenv("SERVE_TEST_KEY", KEY)
    script = (
        "import os, sys\n"
        "key = os.environ['SERVE_TEST_KEY']\n"
        f"rest = {TAIL_BYTES} + 10 - len(key) - 1\n"
        "filler = 'x' * (rest - len('last words\\n') - 1) + '\\n'\n"
        "sys.stdout.write('echoing ' + key + '\\n' + filler + 'last words\\n')\n"
        "sys.exit(3)\n"
    )
    message = await start_failure(script)
    assert "exited with status 3 before ready" in message and "| last words" in message
    assert "| xxx" in message
    assert KEY[10:] not in message and KEY[-8:] not in message


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("key", ["e", "abc", KEY, "sk-Zq9\\Xp7\"W'k"])
async def test_a_key_logged_in_its_arguments_is_scrubbed_and_words_are_left_alone(
    monkeypatch: pytest.MonkeyPatch, key: str
) -> None:
    # vLLM logs its arguments as a Python dict, which shows a key holding a backslash or
    # quotes escaped: only the raw key was scrubbed. A one-letter key garbled every word
    # holding its letter, in the output and in the command line quoted.
    monkeypatch.setenv("SERVE_TEST_KEY", key)
    script = (
        "import os, sys\n"
        "key = os.environ['SERVE_TEST_KEY']\n"
        "print('non-default args:', {'api_key': key, 'model': 'm'})\n"
        "print('The server is overloaded: abcd', key)\n"
        "sys.exit(3)\n"
    )
    message = await start_failure(script)
    assert "| non-default args: {'api_key': '***', 'model': 'm'}\n" in message
    assert "| The server is overloaded: abcd ***" in message
    assert "print('The server is overloaded: abcd', key)" in message  # the command line


@pytest.mark.skipif(not IPV6_LOOPBACK, reason="no IPv6 loopback on this machine")
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_an_ipv6_host_is_bracketed_in_the_urls(tmp_path: Path) -> None:
    # http://::1:PORT/health never answers: the run would wait for ready_timeout_s.
    judge = judge_with(serve([*SIMULATED, "--host", "::1"], host="::1", ready_timeout_s=30))
    with anyio.fail_after(60):
        await judge.open()
    try:
        server = judge.server
        assert server is not None
        assert server.base_url == f"http://[::1]:{server.port}/v1"
        assert (await judge.judge(request(tmp_path, judge))).top_logprobs
        assert f"READY http://[::1]:{server.port}/v1" in "\n".join(server.output_tail())
    finally:
        await judge.aclose()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_host_in_the_command_becomes_serve_host(tmp_path: Path) -> None:
    # Only {port} was filled in: a config that changed serve.host kept the literal --host of
    # its command, and the run waited out ready_timeout_s for a server listening elsewhere.
    host = "::1" if IPV6_LOOPBACK else "127.0.0.1"
    judge = judge_with(serve([*SIMULATED, "--host", "{host}"], host=host, ready_timeout_s=30))
    assert f"--port <free port> --host {host}`" in judge.opening()
    with anyio.fail_after(60):
        await judge.open()
    try:
        server = judge.server
        assert server is not None and server.argv[-2:] == ["--host", host]
        assert (await judge.judge(request(tmp_path, judge))).top_logprobs
    finally:
        await judge.aclose()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_command_that_cannot_start() -> None:
    judge = judge_with(serve(["/nonexistent/vllm", "serve", "m", "--port", "{port}"]))
    with pytest.raises(
        FatalBackendError, match="cannot start its server: /nonexistent/vllm is not"
    ):
        await judge.open()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_port_already_listened_on_is_refused_before_starting() -> None:
    # Another server on the port would answer /health for ours; the command never runs (it
    # could not start at all, which would be a different message).
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        judge = judge_with(serve(["/nonexistent/vllm", "serve", "m"], port=port))
        with pytest.raises(FatalBackendError, match=rf"127\.0\.0\.1:{port}: .*another server"):
            await judge.open()
    assert judge.server is None or judge.server.pid is None


def dual_stack_localhost(monkeypatch: pytest.MonkeyPatch) -> None:
    """``localhost`` names ::1 and 127.0.0.1, as on most distributions (this machine's own
    ``/etc/hosts`` may name only one)."""
    lookup = socket.getaddrinfo

    def both(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "localhost":
            return lookup("::1", *args, **kwargs) + lookup("127.0.0.1", *args, **kwargs)
        return lookup(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", both)


@pytest.mark.skipif(not IPV6_LOOPBACK, reason="no IPv6 loopback on this machine")
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_port_listened_on_at_one_address_of_the_host_name_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Only 127.0.0.1 was looked at: the server on ::1 answered /health in ours' place.
    dual_stack_localhost(monkeypatch)
    with socket.socket(socket.AF_INET6) as other:
        other.bind(("::1", 0))
        other.listen()
        port = other.getsockname()[1]
        table = serve(["/nonexistent/vllm", "serve", "m"], host="localhost", port=port)
        taken = rf"localhost:{port} \(::1\): .*another server"
        with pytest.raises(FatalBackendError, match=taken):  # validate
            ManagedServer(ServeOptions.model_validate(table), name="trigscore").check_port()
        judge = judge_with(table)
        with pytest.raises(FatalBackendError, match=taken):
            await judge.open()
    assert judge.server is None or judge.server.pid is None


@pytest.mark.skipif(not IPV6_LOOPBACK, reason="no IPv6 loopback on this machine")
def test_a_host_name_of_an_ipv6_address_alone_is_an_address_of_this_machine(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Debian's /etc/hosts names ::1 "ip6-localhost": the check of the host (and port = 0)
    # bound it as IPv4 for having no ":", and refused it as no address of this machine.
    lookup = socket.getaddrinfo

    def ip6_localhost(host: Any, *args: Any, **kwargs: Any) -> Any:
        return lookup("::1" if host == "ip6-localhost" else host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", ip6_localhost)
    table = serve(["/nonexistent/vllm", "serve", "m", "{port}"], host="ip6-localhost", port=0)
    server = ManagedServer(ServeOptions.model_validate(table), name="trigscore")
    server.check_host()
    port = server_addresses.free_port("ip6-localhost")
    with socket.socket(socket.AF_INET6) as sock:
        sock.bind(("::1", port))


class FirstPick(socket.socket):
    """A socket whose family's first bind to port 0 gets the port ``picks`` holds for the
    family, as the system could have picked it."""

    picks: ClassVar[dict[socket.AddressFamily, int]] = {}

    def bind(self, address: Any) -> None:
        if address[1] == 0 and self.family in self.picks:
            address = (address[0], self.picks.pop(self.family), *address[2:])
        super().bind(address)


@pytest.mark.skipif(not IPV6_LOOPBACK, reason="no IPv6 loopback on this machine")
def test_port_0_picks_a_port_free_at_every_address_of_the_host_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The port picked at 127.0.0.1 was not looked at on ::1, where another server could
    # listen and answer /health in ours' place.
    dual_stack_localhost(monkeypatch)

    def picking(family: socket.AddressFamily) -> socket.socket:
        sock = FirstPick(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        return sock

    monkeypatch.setattr(server_addresses, "listening_socket", picking)
    with socket.socket(socket.AF_INET6) as v6, socket.socket(socket.AF_INET) as v4:
        # Each family's first pick is the port the other family's address has taken.
        v6.bind(("::1", 0))
        v4.bind(("127.0.0.1", 0))
        v6.listen()
        v4.listen()
        picks = {socket.AF_INET6: v4.getsockname()[1], socket.AF_INET: v6.getsockname()[1]}
        taken = set(picks.values())
        monkeypatch.setattr(FirstPick, "picks", picks)
        port = server_addresses.free_port("localhost")
        assert port not in taken and socket.AF_INET6 not in picks  # picked again
        for family, address in ((socket.AF_INET6, "::1"), (socket.AF_INET, "127.0.0.1")):
            with socket.socket(family) as sock:
                sock.bind((address, port))


async def test_server_never_ready_is_stopped() -> None:
    script = "import time; print('loading weights', flush=True); time.sleep(600)"
    now = [0.0]
    server: ManagedServer

    async def sleep(seconds: float) -> None:
        # The first nap lets the child start and say something; then time flies.
        await wait_for(server.output_tail, "the child's first line")
        now[0] += seconds

    options = ServeOptions(
        command=[sys.executable, "-c", script, "{port}"],
        port=0,
        ready_timeout_s=30,
        poll_interval_s=5,
    )
    server = ManagedServer(options, name="trigscore", sleep=sleep, clock=lambda: now[0])
    with pytest.raises(FatalBackendError) as caught:
        await server.start()
    message = str(caught.value)
    assert "was not ready (GET /health) within 30 s; stopped it" in message
    assert "| loading weights" in message
    assert now[0] == 30.0
    assert server.returncode == -signal.SIGTERM
    assert server.pid is not None and gone(server.pid)


async def test_sigkill_after_the_grace_period() -> None:
    script = (
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ignoring SIGTERM', flush=True)\n"
        "time.sleep(600)\n"
    )
    options = ServeOptions(
        command=[sys.executable, "-c", script, "{port}"],
        port=0,
        ready_timeout_s=600,
        stop_timeout_s=0.2,
    )

    async def sleep(seconds: float) -> None:
        await wait_for(server.output_tail, "the child's first line")
        await server.aclose()  # stop it while it is still starting

    server = ManagedServer(options, name="trigscore", sleep=sleep)
    with pytest.raises(FatalBackendError, match=r"was killed by signal 9 \(SIGKILL; the OOM"):
        await server.start()
    assert server.returncode == -signal.SIGKILL


async def test_a_server_the_oom_killer_kills_alone_is_named_killed() -> None:
    # The OOM killer kills the large server, not the supervisor that started it: copying
    # a SIGKILL's end, the supervisor crashed (no handler can be set for SIGKILL).
    options = ServeOptions(
        command=["sh", "-c", "echo loading; kill -9 $$", "{port}"],
        port=0,
        ready_timeout_s=600,
    )
    server = ManagedServer(options, name="trigscore")
    with pytest.raises(FatalBackendError) as caught:
        await server.start()
    message = str(caught.value)
    assert "was killed by signal 9 (SIGKILL; the OOM killer?)" in message
    assert "loading" in message and "Traceback" not in message
    assert server.returncode == -signal.SIGKILL


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_server_dying_during_the_run_is_fatal(tmp_path: Path) -> None:
    judge = judge_with(serve(SIMULATED))
    await judge.open()
    try:
        server = judge.server
        assert server is not None and server.pid is not None
        os.killpg(server.pid, signal.SIGKILL)  # as the OOM killer would
        await wait_for(lambda: server.returncode is not None, "the server's exit")
        with pytest.raises(FatalBackendError) as caught:
            await judge.judge(request(tmp_path, judge))
        # Not "exited with status -9".
        message = str(caught.value)
        assert "was killed by signal 9 (SIGKILL; the OOM killer?); its last" in message
        assert "READY http://127.0.0.1" in message
    finally:
        await judge.aclose()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_server_holding_memory_killed_with_its_group_is_named_killed(
    tmp_path: Path,
) -> None:
    # The kernel frees a large server's memory after SIGKILL for a while, in which it still
    # is in the group and no zombie: the supervisor, reaped first, read as killed alone.
    holding = (
        "import runpy, sys\n"
        "held = bytearray(256 * 2**20)\n"
        "held[::4096] = b'x' * len(held[::4096])  # in memory, not only reserved\n"
        "sys.argv = ['trig_stream', *sys.argv[1:]]\n"
        "runpy.run_module('trig_stream', run_name='__main__')\n"
    )
    command = [sys.executable, "-c", holding, *SIMULATED[3:]]
    judge = judge_with(serve(command))
    await judge.open()
    try:
        server = judge.server
        assert server is not None and server.pid is not None
        os.killpg(server.pid, signal.SIGKILL)
        await wait_for(lambda: server.returncode is not None, "the server's exit")
        with pytest.raises(FatalBackendError) as caught:
            await judge.judge(request(tmp_path, judge))
        message = str(caught.value)
        assert "was killed by signal 9 (SIGKILL; the OOM killer?); its last" in message
        assert "supervisor" not in message
    finally:
        await judge.aclose()


def test_serve_excludes_base_urls() -> None:
    with pytest.raises(ValueError, match="exactly one of base_url and base_urls, or serve"):
        OpenAIJudgeOptions.model_validate(
            {"model": "m", "base_url": "http://x/v1", "serve": {"command": ["vllm"]}}
        )
    with pytest.raises(ValueError, match="exactly one"):
        OpenAIJudgeOptions.model_validate({"model": "m"})
    with pytest.raises(ValueError, match="Extra inputs"):
        OpenAIJudgeOptions.model_validate({"model": "m", "serve": {"command": ["v"], "gpu": 1}})
    options = OpenAIJudgeOptions.model_validate({"model": "m", "serve": {"command": ["vllm"]}})
    assert options.serve is not None and options.serve.port == 8000
    assert options.serve.ready_timeout_s == 600.0 and options.endpoints == []


def test_port_0_needs_the_port_in_the_command() -> None:
    # The server was never told the free port picked: the run polled it for ready_timeout_s.
    with pytest.raises(ValueError, match=r"port = 0 picks a free port, .*\{port\} in its command"):
        OpenAIJudgeOptions.model_validate(
            {"model": "m", "serve": {"command": ["vllm", "serve", "x"], "port": 0}}
        )
    options = OpenAIJudgeOptions.model_validate(
        {"model": "m", "serve": {"command": ["vllm", "--port={port}"], "port": 0}}
    )
    assert options.serve is not None and options.serve.port == 0


def ended(pid: int) -> bool:
    """Whether a process has exited: gone, or a zombie its new parent has not reaped yet."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_the_server_stops_when_the_process_that_started_it_is_killed(tmp_path: Path) -> None:
    # SIGKILL (or the OOM killer, or a closed terminal) gives trig-stream no chance to stop
    # its server, which would go on holding its GPU: the kernel stops it instead.
    pid_file = tmp_path / "server.pid"
    write_pid = f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))"
    server = f"import os, signal\n{write_pid}\nsignal.pause()\n"
    starter = (
        "import anyio, sys\n"
        "from trig_stream.backends.judges.managed_server import ManagedServer, ServeOptions\n"
        f"options = ServeOptions(command=[sys.executable, '-c', {server!r}, '{{port}}'], port=0)\n"
        "anyio.run(ManagedServer(options, name='j').start)\n"  # never ready: waits
    )
    process = subprocess.Popen([sys.executable, "-c", starter])
    try:
        anyio.run(wait_for, lambda: pid_file.exists() and pid_file.read_text(), "the server")
        pid = int(pid_file.read_text())
        assert not ended(pid)
    finally:
        process.kill()
        process.wait()
    anyio.run(wait_for, lambda: ended(pid), "the server's end")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.parametrize("stubborn", [False, True])
def test_a_server_a_launcher_runs_as_its_child_stops_when_the_run_is_killed(
    tmp_path: Path, stubborn: bool
) -> None:
    # The kernel's SIGTERM reached only the command's own process (the shell, which does not
    # `exec` the server), and the server, orphaned, went on holding its port and GPU.
    pid_file = tmp_path / "server.pid"
    ignore = "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" if stubborn else ""
    server = tmp_path / "server.py"
    server.write_text(
        f"import os, signal, sys\n{ignore}"
        "open(sys.argv[1], 'w').write(str(os.getpid()))\n"
        "signal.pause()\n"
    )
    launcher = f"{python(server, pid_file)}; echo server exited"
    starter = (
        "import anyio, sys\n"
        "from trig_stream.backends.judges.managed_server import ManagedServer, ServeOptions\n"
        f"options = ServeOptions(command={shell(launcher)!r}, port=0, stop_timeout_s=0.5)\n"
        "anyio.run(ManagedServer(options, name='j').start)\n"  # never ready: waits
    )
    process = subprocess.Popen([sys.executable, "-c", starter])
    try:
        pid = anyio.run(pid_in, pid_file)
        assert not ended(pid)
    finally:
        process.kill()
        process.wait()
    # A server ignoring SIGTERM is killed after the grace period (stop_timeout_s).
    anyio.run(wait_for, lambda: ended(pid), "the server's end")


def test_a_command_is_looked_up_on_the_path_the_server_gets(tmp_path: Path) -> None:
    # `env` may give the server a PATH of its own, where its command lives.
    program = tmp_path / "bin" / "my-vllm"
    program.parent.mkdir()
    program.write_text("#!/bin/sh\nexit 0\n")
    program.chmod(0o755)
    ManagedServer(
        ServeOptions(command=["my-vllm"], env={"PATH": str(program.parent)}), name="j"
    ).check_command()
    with pytest.raises(FatalBackendError, match="my-vllm is not an executable file"):
        ManagedServer(ServeOptions(command=["my-vllm"]), name="j").check_command()


def test_a_program_written_as_a_relative_path_is_relative_to_the_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # "../bin/vllm" was looked up from the working folder, though every other path of a config
    # is relative to its folder: validated from the repository root, it was "not an
    # executable file", exit 4. A bare name is still looked up on PATH.
    program = tmp_path / "bin" / "serve-judge"
    program.parent.mkdir()
    program.write_text("#!/bin/sh\nexit 0\n")
    program.chmod(0o755)
    (tmp_path / "bin" / "python").symlink_to(sys.executable)
    (tmp_path / "project" / "elsewhere").mkdir(parents=True)
    config = write_serve_config(tmp_path / "project", 'command = ["../bin/serve-judge"]\n')
    monkeypatch.chdir(tmp_path / "project" / "elsewhere")  # no ../bin/serve-judge there
    assert main(["validate", str(config)]) == EXIT_OK, capsys.readouterr().err
    serve = load_config(config).judges[0].options["serve"]
    assert serve["command"] == [str(tmp_path.resolve() / "bin" / "serve-judge")]
    # The program's own name is kept: a venv's python, resolved, runs without its venv.
    config.write_text(config.read_text().replace("serve-judge", "python"))
    serve = load_config(config).judges[0].options["serve"]
    assert serve["command"] == [str(tmp_path.resolve() / "bin" / "python")]
    config.write_text(config.read_text().replace("../bin/python", "vllm"))
    assert load_config(config).judges[0].options["serve"]["command"] == ["vllm"]


@pytest.mark.parametrize(
    ("key", "command"),
    [
        ("1", ["srv.sh", "{port}", "--tensor-parallel-size", "1"]),
        ("vllm", ["vllm", "serve", "m", "--port", "{port}"]),
        ("EMPTY", ["vllm", "serve", "EMPTY-model", "--served-model-name=EMPTY"]),
        ("1", ["vllm", "serve", "m", "--tokenizer-pool-size", "1"]),
        ("1", ["python", "-m", "sglang.launch_server", "--tokenizer-worker-num", "1"]),
        ("1", ["vllm", "serve", "m", "--max-tokens=1"]),
        ("EMPTY", ["sh", "-c", "vllm serve EMPTY-model --api-key-file EMPTY.txt"]),
        ("EMPTY", ["sh", "-c", "vllm serve m --api-key EMPTY-long"]),
        ("1", ["vllm", "serve", "m", "--token-budget", "1"]),
        ("1", ["vllm", "serve", "m", "--api-key-file", "1"]),
        ("1", ["sh", "-c", "CUDA_VISIBLE_DEVICES=1 MAX_TOKENS=1 vllm serve m"]),
        ("1", ["vllm", "serve", "m", "--max-num-batched-tokens=1"]),
    ],
    ids=[
        "a-number",
        "the-program",
        "a-flag-value",
        "after-a-tokenizer-flag",
        "after-another-tokenizer-flag",
        "glued-to-a-tokens-flag",
        "a-word-of-a-file-name",
        "the-start-of-a-longer-key",
        "after-a-flag-whose-first-word-is-token",
        "after-a-flag-naming-a-key-file",
        "assigned-to-ordinary-variables",
        "glued-to-a-flag-ending-in-tokens",
    ],
)
def test_a_short_key_that_is_an_ordinary_word_of_the_command_is_not_refused(
    key: str, command: list[str]
) -> None:
    # A dummy key (`MY_KEY=1`) matched `1` and `vllm` in the command: a config that works
    # was refused, exit 4 from validate and run.
    ManagedServer(
        ServeOptions(command=command, env={"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}),
        name="j",
        secrets=[key],
    ).check_secrets_left_out()


@pytest.mark.parametrize(
    "env",
    [
        {"CUDA_VISIBLE_DEVICES": "1"},
        {"OMP_NUM_THREADS": "1"},
        {"VLLM_MAX_TOKENS": "1"},
        {"TOKENIZERS_PARALLELISM": "1"},
    ],
    ids=["cuda-visible-devices", "omp-num-threads", "a-count-of-tokens", "a-tokenizer-setting"],
)
def test_a_short_key_that_is_an_ordinary_env_value_is_not_refused(env: dict[str, str]) -> None:
    # Any env value equal to a dummy key counted as the key: the most ordinary serve env,
    # CUDA_VISIBLE_DEVICES=1 beside the key `1`, was refused.
    ManagedServer(
        ServeOptions(command=["vllm", "serve", "m"], env=env), name="j", secrets=["1"]
    ).check_secrets_left_out()


@pytest.mark.parametrize(
    ("key", "command", "env", "where"),
    [
        ("1", ["vllm", "serve", "--api-key", "1"], {}, "command[3]"),
        ("vllm", ["vllm", "serve", "--api-key=vllm"], {}, "command[2]"),
        ("x", ["vllm", "serve", "--token", "x"], {}, "command[3]"),
        ("EMPTY", ["vllm", "serve"], {"VLLM_API_KEY": "EMPTY"}, "env['VLLM_API_KEY']"),
        ("sk-long-key", ["sh", "-c", "vllm serve --api-key sk-long-key"], {}, "command[2]"),
        ("EMPTY", ["bash", "-c", "vllm serve m --api-key EMPTY"], {}, "command[2]"),
        ("EMPTY", ["sh", "-c", "exec vllm serve m --api-key=EMPTY"], {}, "command[2]"),
        ("EMPTY", ["sh", "-c", "vllm serve m --api-key 'EMPTY' && x"], {}, "command[2]"),
        ("x", ["sh", "-c", "serve --hf_token x"], {}, "command[2]"),
        ("EMPTY", ["vllm", "serve"], {"VLLM_ARGS": "--api-key EMPTY"}, "env['VLLM_ARGS']"),
        ("EMPTY", ["vllm", "serve"], {"AUTH": "Bearer EMPTY"}, "env['AUTH']"),
        ("1", ["curl", "-H", "Authorization: bearer 1"], {}, "command[2]"),
        ("1", ["sh", "-c", "VLLM_API_KEY=1 vllm serve m"], {}, "command[2]"),
        ("1", ["env", "VLLM_API_KEY=1", "vllm", "serve", "m"], {}, "command[1]"),
        ("x", ["sh", "-c", "export hf_token='x'; vllm serve m"], {}, "command[2]"),
        ("1", ["vllm", "serve"], {"VLLM_ARGS": 'OPENAI_API_KEY="1"'}, "env['VLLM_ARGS']"),
        ("1", ["vllm", "serve", "m", "--hf-token", "1"], {}, "command[4]"),
        ("1", ["vllm", "serve"], {"HF_TOKEN": "1"}, "env['HF_TOKEN']"),
        ("1", ["vllm", "serve"], {"myapikey": "1"}, "env['myapikey']"),
        ("sk-long-key", ["vllm", "serve"], {"X": "sk-long-key"}, "env['X']"),
    ],
    ids=[
        "after-the-flag",
        "glued",
        "after-a-token-flag",
        "env",
        "long-key-inside",
        "short-key-after-the-flag-inside",
        "short-key-glued-inside",
        "short-key-quoted-inside",
        "short-key-after-an-underscored-token-flag-inside",
        "short-key-after-the-flag-in-env",
        "short-key-after-bearer-in-env",
        "short-key-after-bearer-inside",
        "short-key-assigned-inside",
        "short-key-assigned-as-an-argument",
        "short-key-quoted-assigned-to-a-token-inside",
        "short-key-quoted-assigned-in-env",
        "short-key-after-a-flag-ending-in-token",
        "short-key-in-a-token-env",
        "short-key-in-a-lower-case-key-env",
        "long-key-in-any-env",
    ],
)
def test_a_key_passed_to_the_server_is_refused(
    key: str, command: list[str], env: dict[str, str], where: str
) -> None:
    server = ManagedServer(ServeOptions(command=command, env=env), name="j", secrets=[key])
    with pytest.raises(FatalBackendError, match="holds an API key") as caught:
        server.check_secrets_left_out()
    assert f"options.serve.{where}" in str(caught.value)


def shell(script: str) -> list[str]:
    """A ``/bin/sh`` command line whose script reads the port as ``$0``."""
    return ["/bin/sh", "-c", script, "{port}"]


def python(*args: str | Path) -> str:
    """This Python's command line, quoted for a shell."""
    return " ".join(shlex.quote(str(arg)) for arg in (sys.executable, *args))


def stubborn_child(tmp_path: Path) -> tuple[str, Path]:
    """A shell command starting a process that ignores SIGTERM, and the file where it writes
    its process id once it does."""
    pid_file = tmp_path / "stubborn.pid"
    script = tmp_path / "stubborn.py"
    script.write_text(
        "import os, signal, sys\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "open(sys.argv[1], 'w').write(str(os.getpid()))\n"
        "signal.pause()\n"
    )
    return python(script, pid_file), pid_file


async def pid_in(path: Path) -> int:
    """The process id a child writes into ``path``, once it has."""
    found: list[int] = []

    def written() -> bool:
        text = path.read_text() if path.exists() else ""  # empty while it is being written
        if text.strip():
            found.append(int(text))
        return bool(found)

    await wait_for(written, f"a process id in {path}")
    return found[0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_what_a_command_that_exits_started_is_stopped_with_it(tmp_path: Path) -> None:
    # The command's own process had exited, so nothing was signalled: what it started (vLLM's
    # engine processes, beside a crashed API server) went on, holding the GPU.
    pid_file = tmp_path / "child.pid"
    judge = judge_with(
        serve(shell(f"sleep 321 & echo $! > {pid_file}; echo api server crashed; exit 1"))
    )
    with pytest.raises(FatalBackendError) as caught:
        await judge.open()
    await judge.aclose()
    message = str(caught.value)
    assert "exited with status 1 before ready while processes it started still ran" in message
    assert "`exec` the server" in message and "| api server crashed" in message
    assert ended(int(pid_file.read_text()))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_server_process_that_ignores_sigterm_is_killed_after_the_grace_period(
    tmp_path: Path,
) -> None:
    # The command's own process (here a shell, which SIGTERM ends at once) stopped on
    # SIGTERM within the grace period, and its exit was taken for the group's: a process of
    # it that ignored SIGTERM was never sent SIGKILL.
    stubborn, pid_file = stubborn_child(tmp_path)
    simulated = python("-m", "trig_stream", "simulate-judge")
    command = shell(f'{stubborn} & {simulated} --port "$0" & wait')
    judge = judge_with(serve(command, stop_timeout_s=1))
    await judge.open()
    server = judge.server
    assert server is not None
    try:
        assert (await judge.judge(request(tmp_path, judge))).top_logprobs
        pid = await pid_in(pid_file)  # it ignores SIGTERM from now on
    finally:
        await judge.aclose()
    assert server.returncode == -signal.SIGTERM
    assert ended(pid)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_launcher_that_exits_while_its_server_answers_stops_the_run(
    tmp_path: Path,
) -> None:
    # The run went on judging through a server out of its hands, and left it running.
    pid_file, go = tmp_path / "server.pid", tmp_path / "go"
    os.mkfifo(go)
    launcher = (
        f'{python("-m", "trig_stream")} simulate-judge --port "$0" & echo $! > {pid_file}; '
        f"read line < {go}; exit 1"
    )
    judge = judge_with(serve(shell(launcher)))
    await judge.open()
    server = judge.server
    assert server is not None
    try:
        assert (await judge.judge(request(tmp_path, judge))).top_logprobs
        pid = await pid_in(pid_file)
        await wait_for(lambda: opened_for_writing(go), "the launcher reading its fifo")
        await wait_for(lambda: server.returncode is not None, "the launcher's exit")
        with pytest.raises(FatalBackendError) as caught:
            await judge.judge(request(tmp_path, judge))
        assert "exited with status 1 while processes it started still ran" in str(caught.value)
    finally:
        await judge.aclose()
    assert ended(pid)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_killed_supervisor_is_named_and_the_exec_hint_left_out() -> None:
    # kill -9 of the supervisor read as the server's own death, with advice to `exec` the
    # server: wrong for a command the supervisor had started itself, exec'd or not.
    server = ManagedServer(ServeOptions.model_validate(serve(SIMULATED)), name="trigscore")
    await server.start()
    try:
        assert server.pid is not None
        os.kill(server.pid, signal.SIGKILL)
        await wait_for(lambda: server.returncode is not None, "the supervisor's end")
        failure = server.failure()
        assert failure is not None
        message = str(failure)
        assert "`exec` the server" not in message
        assert f"still ran, but its supervisor (pid {server.pid}, parent_death.py)" in message
        assert "was killed by signal 9" in message
    finally:
        await server.aclose()


def child_of(parent: int) -> int:
    """The process id of ``parent``'s one child (read in ``/proc``)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue  # a process of the machine's that ended meanwhile
        if fields[1] == str(parent):
            children.append(int(stat.parent.name))
    (child,) = children
    return child


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("ending", ["exiting", "SigPnd", "ShdPnd", None])
async def test_a_command_killed_with_its_supervisor_is_the_server_killed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ending: str | None
) -> None:
    # kill -9 of the server's whole group (a cgroup's OOM killer): the small supervisor was
    # reaped while the kernel still freed the large command's memory, and the message said
    # the server still ran, its supervisor killed alone. A copy of /proc tells the command
    # as such a process is seen: exiting, or with the SIGKILL not yet taken.
    server = ManagedServer(ServeOptions.model_validate(serve(SIMULATED)), name="trigscore")
    await server.start()
    try:
        assert server.pid is not None
        real = Path(f"/proc/{child_of(server.pid)}")
        copy = tmp_path / "proc" / real.name
        copy.mkdir(parents=True)
        before, comm, after = real.joinpath("stat").read_text().rpartition(")")
        fields = after.split()
        if ending == "exiting":
            fields[6] = str(int(fields[6]) | 0x4)  # PF_EXITING, from the start of its exit
        copy.joinpath("stat").write_text(f"{before}{comm} {' '.join(fields)}\n")
        lines = real.joinpath("status").read_text().splitlines()
        pending = [
            f"{ending}:\t0000000000000100" if line.startswith(f"{ending}:") else line
            for line in lines
        ]
        copy.joinpath("status").write_text("\n".join(pending) + "\n")
        os.kill(server.pid, signal.SIGKILL)  # the supervisor: the command runs on, for real
        await wait_for(lambda: server.returncode is not None, "the supervisor's end")
        monkeypatch.setattr(process_groups, "_PROC", copy.parent)
        failure = server.failure()
        assert failure is not None
        message = str(failure)
        assert "was killed by signal 9 (SIGKILL; the OOM killer?)" in message
        assert "`exec` the server" not in message
        supervisor = f"still ran, but its supervisor (pid {server.pid}, parent_death.py)"
        assert (supervisor in message) == (ending is None)
    finally:
        await server.aclose()


def opened_for_writing(fifo: Path) -> bool:
    """Write a line into ``fifo`` if a reader has it open; whether it did."""
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # nobody reads it yet
            return False
        raise
    try:
        os.write(fd, b"go\n")
    finally:
        os.close(fd)
    return True


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_hard_stop_kills_a_server_that_is_being_stopped_gracefully(
    make_config: ConfigFactory,
) -> None:
    # A second Ctrl-C (or SIGHUP) came while the first one's stop gave the server its grace
    # period, and the run waited all of stop_timeout_s anyway.
    script = (
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: print('got SIGTERM', flush=True))\n"
        "print('loading weights', flush=True)\n"
        "while True: time.sleep(60)\n"
    )
    judge = judge_with(serve([sys.executable, "-c", script, "{port}"], stop_timeout_s=120))
    engine = Engine(make_config(samples=4), judges=[judge])
    output: list[str] = []

    def said(line: str) -> bool:
        server = judge.server
        output[:] = server.output_tail() if server is not None else output
        return f"| {line}" in "\n".join(f"| {text}" for text in output)

    async def stop_then_stop_now() -> None:
        await wait_for(lambda: said("loading weights"), "the server's first line")
        engine.stop()  # while the judge opens: the server is stopped, gracefully
        await wait_for(lambda: said("got SIGTERM"), "the server's SIGTERM")
        engine.cancel()

    server: ManagedServer | None = None

    async def keep_server() -> None:
        nonlocal server
        await wait_for(lambda: judge.server is not None, "the server")
        server = judge.server

    # Safety net: the grace period is 120 s, a hard stop waits for none of it (a loaded
    # machine may take a while to start the child, hence 90 s and not less).
    with anyio.fail_after(90):
        async with anyio.create_task_group() as tg:
            tg.start_soon(keep_server)
            tg.start_soon(stop_then_stop_now)
            async with engine:
                assert [j async for j in engine.results] == []
    assert engine.stats().state == "cancelled"
    assert server is not None and server.returncode == -signal.SIGKILL


@pytest.mark.parametrize("host", ["", " ", "[::1]", "http://127.0.0.1", "127.0.0.1/v1"])
def test_a_host_no_url_can_hold_is_refused(host: str) -> None:
    # "" was polled as http://:PORT/health until ready_timeout_s; "[::1]" failed to open
    # with a bare "gaierror: Name or service not known" naming no key.
    with pytest.raises(ValueError, match=r"serve\.host\n.*(empty|without brackets|the host alone)"):
        OpenAIJudgeOptions.model_validate(
            {"model": "m", "serve": {"command": ["vllm", "{port}"], "host": host, "port": 0}}
        )


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("port", [0, 8000])
# 192.0.2.1: TEST-NET-1; fe80::1, link-local, cannot be bound without an interface
@pytest.mark.parametrize("host", ["no.such.host.invalid", "192.0.2.1", "fe80::1"])
async def test_a_host_that_is_no_address_of_this_machine_is_named(port: int, host: str) -> None:
    # A bare "gaierror: [Errno -2] Name or service not known" named no key; fe80::1 gave
    # "cannot find a free port ... Invalid argument" or "another server listening there?".
    judge = judge_with(serve(["/nonexistent/vllm", "{port}"], host=host, port=port))
    with pytest.raises(FatalBackendError) as caught:
        await judge.open()
    message = str(caught.value)
    assert f"options.serve.host {host!r} is not an address of this machine" in message
    assert "set it to one, e.g. 127.0.0.1" in message
    assert judge.server is None or judge.server.pid is None  # nothing was started


@pytest.mark.parametrize("host", ["127.0.0.1:9000", "localhost:8000"])
def test_a_host_holding_a_port_is_refused_naming_the_key(host: str) -> None:
    # It passed validate; the run then found it no address of this machine.
    with pytest.raises(ValueError, match=r"serve\.host\n.*holds a port: .*serve\.port"):
        OpenAIJudgeOptions.model_validate(
            {"model": "m", "serve": {"command": ["vllm", "{port}"], "host": host, "port": 0}}
        )


@pytest.mark.parametrize("host", ["::1", "fe80::1"])
def test_an_ipv6_host_is_not_taken_for_a_host_and_port(host: str) -> None:
    options = ServeOptions(command=["vllm", "{port}"], host=host, port=0)
    assert options.host == host


def write_serve_config(tmp_path: Path, serve: str, *, judge: str = "") -> Path:
    """A config of 4 prompts, the synthetic generator and an openai judge whose serve table
    holds the TOML lines ``serve`` (``judge``: lines of the judge's own table)."""
    write_prompts(tmp_path / "prompts.json", 4)
    config = tmp_path / "config.toml"
    config.write_text(
        f"""\
[run]
name = "serve"
output_dir = "{tmp_path / "runs"}"

[dataset]
path = "{tmp_path / "prompts.json"}"

[[generators]]
name = "syn"
backend = "synthetic"
options = {{ size = 16 }}

[[judges]]
name = "trigscore"
backend = "openai"
{judge}[judges.options]
model = "trig-judge-sim"
[judges.options.serve]
{serve}"""
    )
    return config


@pytest.mark.parametrize("host", ["10.255.255.1", "192.0.2.1", "fe80::1"])
def test_validate_refuses_a_host_that_is_no_address_of_this_machine_as_the_run_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], host: str
) -> None:
    # validate said ok (exit 0); the run then stopped with exit 4.
    serve = json.dumps([*SIMULATED, "--host", "127.0.0.1"])
    config = write_serve_config(tmp_path, f'command = {serve}\nport = 0\nhost = "{host}"\n')
    for command in (["validate"], ["run", "--headless", "--no-report"]):
        assert main([*command, str(config)]) == EXIT_FATAL
        err = " ".join(capsys.readouterr().err.split())
        assert f"options.serve.host {host!r} is not an address of this machine" in err


@pytest.mark.parametrize("listen", [["--host", "127.0.0.2"], ["--host=127.0.0.2"]])
def test_validate_refuses_a_command_listening_where_serve_host_does_not_reach(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], listen: list[str]
) -> None:
    # validate said ok; the run then polled 127.0.0.1 while the server listened at 127.0.0.2,
    # until ready_timeout_s (20 minutes in the shipped config).
    serve = json.dumps([*SIMULATED, *listen])
    config = write_serve_config(tmp_path, f"command = {serve}\nport = 0\n")
    for command in (["validate"], ["run", "--headless", "--no-report"]):
        assert main([*command, str(config)]) == EXIT_FATAL
        err = " ".join(capsys.readouterr().err.split())
        assert (
            f"options.serve.command[{len(SIMULATED) + len(listen) - 1}] makes the server "
            "listen at '127.0.0.2', "
            "where the run does not reach it: it waits for it at options.serve.host "
            "'127.0.0.1'"
        ) in err
        assert 'write "--host", "{host}" in the command' in err


@pytest.mark.parametrize(
    "listen",
    [
        ["--host", "{host}"],
        ["--host", "0.0.0.0"],
        ["--host=127.1"],
        # vLLM binds an empty host as every IPv4 address: it was refused as reaching nowhere.
        ["--host", ""],
        ["--host="],
    ],
)
def test_validate_takes_a_command_listening_where_serve_host_reaches(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], listen: list[str]
) -> None:
    serve = json.dumps([*SIMULATED, *listen])
    config = write_serve_config(tmp_path, f"command = {serve}\nport = 0\n")
    assert main(["validate", str(config)]) == EXIT_OK, capsys.readouterr().err


@pytest.mark.skipif(not IPV6_LOOPBACK, reason="no IPv6 loopback on this machine")
def test_a_command_listening_at_every_ipv4_address_is_refused_for_an_ipv6_host() -> None:
    # The advice was to set serve.host to '', which serve.host refuses as empty.
    table = serve([*SIMULATED, "--host", ""], host="::1")
    server = ManagedServer(ServeOptions.model_validate(table), name="trigscore")
    with pytest.raises(FatalBackendError) as caught:
        server.check_host()
    message = str(caught.value)
    assert "makes the server listen at '' (every IPv4 address)" in message
    assert message.endswith("or set serve.host to '127.0.0.1'")


TWO_SERVERS = """\
[run]
name = "two"

[dataset]
path = "prompts.json"

[[generators]]
name = "synth"
backend = "synthetic"

[[judges]]
name = "first"
backend = "openai"
options = {{ model = "m", serve = {{ command = ["{python}", "{{port}}"], port = 47330 }} }}

[[judges]]
name = "second"
backend = "openai"
options = {{ model = "m", serve = {{ command = ["{python}", "{{port}}"], port = 47330 }} }}
"""


def test_two_judges_serving_at_one_port_are_refused_before_either_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # validate passed them; run started the first server (a model loading for minutes), then
    # failed on the second: "Address already in use".
    write_prompts(tmp_path / "prompts.json", 1)
    config = tmp_path / "two.toml"
    config.write_text(TWO_SERVERS.format(python=sys.executable))
    for command in (["validate"], ["run", "--headless"]):
        assert main([*command, str(config)]) == EXIT_CONFIG
        err = capsys.readouterr().err
        assert "judges 'first' and 'second': both serve tables start a server on port 47330" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("first", "second", "clash"),
    [
        ({"host": "127.0.0.1"}, {"host": "127.0.0.1"}, True),
        ({"host": "localhost"}, {"host": "127.0.0.1"}, True),
        ({"host": "::1"}, {"host": "localhost"}, True),
        ({"host": "0.0.0.0"}, {"host": "127.0.0.1"}, True),
        ({"host": "::"}, {"host": "127.0.0.1"}, True),
        ({"host": "0.0.0.0"}, {"host": "::1"}, False),
        ({"host": "127.0.0.1"}, {"host": "127.0.0.2"}, False),
        # Spelled otherwise, one address: validate passed them, and the second server failed
        # with "Address already in use" once the first had started.
        ({"host": "127.1"}, {}, True),
        ({"host": "0:0:0:0:0:0:0:1"}, {"host": "::1"}, True),
        ({"host": "0.0.0.0"}, {"host": "localhost"}, True),
        ({"host": "no.such.host.invalid"}, {"host": "127.0.0.1"}, False),
        ({"port": 0}, {"port": 0}, False),
        ({}, {"port": 8001}, False),
    ],
)
async def test_judges_serving_at_one_fixed_address_are_refused(
    make_config: ConfigFactory, first: dict[str, Any], second: dict[str, Any], clash: bool
) -> None:
    tables = [
        serve([sys.executable, "{port}"], **{"port": 8000, **table}) for table in (first, second)
    ]
    judges = [judge_with(table) for table in tables]
    judges[1].name = "other"
    if clash:
        with pytest.raises(ConfigError, match="judges 'trigscore' and 'other': both serve"):
            Engine(make_config(), judges=judges)
    else:
        Engine(make_config(), judges=judges)


SIGNALS_SHIM = """\
import os, signal, sys
log, port, *extra = sys.argv[1:]
def said(signum):
    return "ignored" if signal.getsignal(signum) is signal.SIG_IGN else "heard"
with open(log, "a") as out:
    out.write(f"pid {os.getpid()}: SIGINT {said(signal.SIGINT)}, SIGTERM {said(signal.SIGTERM)}\\n")
os.dup2(os.open(log, os.O_WRONLY | os.O_APPEND), 2)
command = [sys.executable, "-m", "trig_stream", "simulate-judge", "--port", port, *extra]
os.execv(sys.executable, command)
"""
"""A server command that writes, before it becomes the simulated judge, how it started with
SIGINT and SIGTERM, and sends the judge's messages (its "stopped:" line) to the same log."""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("ending", ["finished", "killed"])
def test_a_run_started_ignoring_sigterm_starts_its_server_hearing_it(
    tmp_path: Path, ending: str
) -> None:
    # The server inherited the ignored SIGTERM: it outlived a `kill -9` of the run (its
    # parent-death signal is SIGTERM), and every stop waited out its grace, then SIGKILL.
    shim, log = tmp_path / "server.py", tmp_path / "server.log"
    shim.write_text(SIGNALS_SHIM)
    extra = ["--hang-rate", "1"] if ending == "killed" else ["--latency", "0.1"]
    command = [sys.executable, str(shim), str(log), "{port}", *extra]
    config = write_serve_config(
        tmp_path,
        f"command = {json.dumps(command)}\nport = 0\nstop_timeout_s = 60\n",
        judge="concurrency = 1\n",
    )
    run = [sys.executable, "-m", "trig_stream", "run", str(config), "--headless", "--no-report"]
    process = subprocess.Popen(
        run,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_IGN),
    )
    assert process.stderr is not None
    try:
        for line in process.stderr:
            if line.startswith("run directory:"):
                break
        started = log.read_text().splitlines()[0]
        pid = int(started.split()[1].rstrip(":"))
        if ending == "killed":
            process.kill()
            code = process.wait(timeout=60)
        else:
            process.send_signal(signal.SIGTERM)  # ignored: the run goes on
            code = process.wait(timeout=120)
        rest = process.stderr.read()
    finally:
        process.kill()
        process.wait()
    assert started.endswith("SIGINT heard, SIGTERM heard"), started
    anyio.run(wait_for, lambda: ended(pid), "the server's end")
    # Ended by SIGTERM, which it heard (its "stopped:" line), not by SIGKILL after the grace.
    assert "stopped: " in log.read_text(), log.read_text()
    if ending == "finished":
        assert code == 0, rest
        assert "done: 8 judgements in this run" in rest, rest
    else:
        assert code == -signal.SIGKILL


ENV_CONFIG = """\
[run]
name = "env"

[dataset]
path = "prompts.json"

[[generators]]
name = "synth"
backend = "synthetic"

[[judges]]
name = "trigscore"
backend = "openai"
[judges.options]
model = "m"
[judges.options.serve]
command = ["{python}", "{{port}}"]
port = 0
env = {{ {name} = "x" }}
"""


@pytest.mark.parametrize("name", ['"A=B"', '""', '"A\\u0000B"'])
def test_an_env_name_no_environment_can_hold_is_a_config_error_at_its_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    # validate passed it; run failed opening the judge: "illegal environment variable name".
    write_prompts(tmp_path / "prompts.json", 1)
    config = tmp_path / "env.toml"
    config.write_text(ENV_CONFIG.format(python=sys.executable, name=name))
    for command in (["validate"], ["run", "--headless"]):
        assert main([*command, str(config)]) == EXIT_CONFIG
        err = capsys.readouterr().err
        assert "env.toml:19: judges[0].options.serve.env:" in err, err
        assert "is no environment variable name" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_server_that_said_one_line_is_quoted_in_the_singular(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SERVE_TEST_KEY", KEY)
    message = await start_failure("print('CUDA out of memory'); raise SystemExit(3)")
    assert "; its last line of output:\n  | CUDA out of memory" in message, message


EVERY_KEY = """\
[run]
name = "keys"
output_dir = "{runs}"

[dataset]
path = "{prompts}"

[[generators]]
name = "dalle"
backend = "openai_images"
options = {{ base_url = "http://127.0.0.1:9/v1", api_key_env = "SERVE_TEST_GEN_KEY" }}

[[judges]]
name = "served"
backend = "openai"
[judges.options]
model = "m"
api_key_env = "SERVE_TEST_KEY"
serve = {{ command = {command}, port = 0, poll_interval_s = 0.05 }}

[[judges]]
name = "other"
backend = "openai"
options = {{ model = "m", base_url = "http://127.0.0.1:9/v1", api_key_env = "SERVE_TEST_J2_KEY" }}
"""


def test_a_server_printing_its_environment_shows_no_key_of_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The server inherits every backend's key, and only its own judge's was masked in the
    # output quoted: `env | grep KEY` printed the images API's key in full.
    keys = {
        "SERVE_TEST_KEY": KEY,
        "SERVE_TEST_GEN_KEY": "sk-images-0d6b2e19c4a7f358",
        "SERVE_TEST_J2_KEY": "sk-second-judge-7a1c05e9b3",
    }
    for name, key in keys.items():
        monkeypatch.setenv(name, key)
    script = f"import os; [print(n, os.environ[n]) for n in {sorted(keys)!r}]; raise SystemExit(3)"
    write_prompts(tmp_path / "prompts.json", 1)
    config = tmp_path / "keys.toml"
    config.write_text(
        EVERY_KEY.format(
            runs=tmp_path / "runs",
            prompts=tmp_path / "prompts.json",
            command=json.dumps([sys.executable, "-c", script, "{port}"]),
        )
    )
    assert main(["run", str(config), "--headless", "--no-report"]) == EXIT_FATAL
    err = capsys.readouterr().err
    assert "exited with status 3 before ready" in err, err
    for name in keys:
        assert f"| {name} ***" in err, err
    for key in keys.values():
        assert key not in err


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_another_backends_dummy_key_is_no_secret_of_the_server(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A local images server's dummy key `1` refused HF_HUB_DISABLE_IMPLICIT_TOKEN=1 in
    # serve.env as an API key, and was masked in the command line and every line of output.
    monkeypatch.setenv("SERVE_TEST_DUMMY_KEY", "1")
    note_key_variable("SERVE_TEST_DUMMY_KEY")  # as the openai_images generator is built
    script = "print('rank 1 of 2'); raise SystemExit(3)"
    table = serve(
        [sys.executable, "-c", script, "{port}", "--tensor-parallel-size", "1"],
        env={"HF_HUB_DISABLE_IMPLICIT_TOKEN": "1"},
    )
    server = ManagedServer(ServeOptions.model_validate(table), name="j")
    server.check_secrets_left_out()
    with pytest.raises(FatalBackendError) as caught:
        await server.start()
    await server.aclose()
    message = str(caught.value)
    assert "--tensor-parallel-size 1`" in message and "| rank 1 of 2" in message, message


def test_a_command_not_found_is_named_without_its_unsubstituted_port() -> None:
    # The whole command was quoted before the start, with "{port}" still in it.
    server = ManagedServer(ServeOptions(command=["my-vllm", "--port", "{port}"]), name="j")
    with pytest.raises(FatalBackendError) as caught:
        server.check_command()
    message = str(caught.value)
    assert "{port}" not in message, message
    assert "my-vllm is not an executable file, here or on PATH (options.serve.command[0])" in (
        message
    )


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_model_the_started_server_does_not_serve_names_serve_not_base_url(
    tmp_path: Path,
) -> None:
    # A serve judge has no base_url, and was told to check it.
    judge = judge_with(serve([*SIMULATED, "--model", "served-name"]))
    await judge.open()
    try:
        with pytest.raises(FatalBackendError) as caught:
            await judge.judge(request(tmp_path, judge))
    finally:
        await judge.aclose()
    message = str(caught.value)
    assert "check serve.command's served model name and model ('m')" in message, message
    assert "base_url" not in message


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_server_gets_the_environment_without_the_runs_own_quieting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The server inherited TRANSFORMERS_VERBOSITY=error and the like from the run, which cut
    # warnings from the log quoted when it fails.
    for name in library_logs.QUIET_LIBRARIES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(library_logs, "_SET_HERE", set())
    monkeypatch.setenv("DIFFUSERS_VERBOSITY", "info")  # the user's own: it stays
    library_logs.quiet_model_libraries()  # as the commands do
    assert os.environ["TRANSFORMERS_VERBOSITY"] == "error"
    names = sorted(library_logs.QUIET_LIBRARIES)
    script = f"import os; print([(n, os.environ.get(n)) for n in {names!r}]); raise SystemExit(3)"
    options = ServeOptions(
        command=[sys.executable, "-c", script, "{port}"],
        port=0,
        env={"HF_HUB_DISABLE_PROGRESS_BARS": "1"},
    )
    server = ManagedServer(options, name="trigscore")
    try:
        with pytest.raises(FatalBackendError) as caught:
            await server.start()
    finally:
        await server.aclose()
    seen = dict.fromkeys(names) | {
        "DIFFUSERS_VERBOSITY": "info",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
    assert f"| {sorted(seen.items())!r}" in str(caught.value), str(caught.value)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_hard_stop_says_no_grace_period_for_the_server() -> None:
    # After a hard stop the closing line still promised "up to 30 s" and a Ctrl-C to kill
    # it, though it was killed at once.
    judge = judge_with(serve(SIMULATED))
    assert judge.closing() is None  # nothing started
    await judge.open()
    try:
        assert judge.closing() == "stopping its server (up to 30 s)"
        judge.stop_now()
        assert judge.closing() is None
    finally:
        await judge.aclose()
    assert judge.closing() is None


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_stop_while_the_server_starts_announces_its_grace_period(
    make_config: ConfigFactory,
) -> None:
    # The server being started was stopped inside its start, out of the judges' close: no
    # "closing judge ..." line, and up to stop_timeout_s of silence.
    script = (
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: print('got SIGTERM', flush=True))\n"
        "print('loading weights', flush=True)\n"
        "while True: time.sleep(60)\n"
    )
    judge = judge_with(serve([sys.executable, "-c", script, "{port}"], stop_timeout_s=120))
    engine = Engine(make_config(samples=4), judges=[judge])
    closing: list[str | None] = []

    def said(line: str) -> bool:
        server = judge.server
        return server is not None and line in server.output_tail()

    async def stop_then_stop_now() -> None:
        await wait_for(lambda: said("loading weights"), "the server's first line")
        engine.stop()  # while the judge opens
        await wait_for(lambda: said("got SIGTERM"), "the server's SIGTERM")
        closing.append(engine.stats().closing)
        engine.cancel()

    with anyio.fail_after(90):  # safety net: a hard stop waits for none of the 120 s
        async with anyio.create_task_group() as tg:
            tg.start_soon(stop_then_stop_now)
            async with engine:
                assert [j async for j in engine.results] == []
    assert closing == ["judge 'trigscore': stopping its server (up to 120 s)"]
    assert engine.stats().closing is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal")
def test_a_supervisor_in_another_s_process_group_stops_only_its_command(tmp_path: Path) -> None:
    # A bench starts servers through the supervisor inside its own process group: on the
    # bench's death the supervisor stopped that whole group, its other processes included.
    script = Path(managed_server.__file__).with_name("parent_death.py")
    pid_file = tmp_path / "command.pid"
    told = f"echo $$ > {shlex.quote(str(pid_file))}; exec sleep 600"
    starter = (
        "import os, subprocess, sys, time\n"
        f"command = ['sh', '-c', {told!r}]\n"
        "quiet = {'stdout': subprocess.DEVNULL, 'stderr': subprocess.DEVNULL}\n"
        f"subprocess.Popen([sys.executable, '-I', '-S', {str(script)!r}, str(os.getpid()), "
        "'5', '-1', *command], **quiet)\n"
        "sibling = subprocess.Popen(['sleep', '600'], **quiet)\n"
        f"pid_file = {str(pid_file)!r}\n"
        "while not (os.path.exists(pid_file) and os.path.getsize(pid_file)):\n"
        "    time.sleep(0.01)\n"
        "print(sibling.pid, flush=True)\n"
    )
    # Its own session, so that what it leaves is never in the test's process group.
    done = subprocess.run(
        [sys.executable, "-c", starter],
        capture_output=True,
        text=True,
        timeout=60,
        start_new_session=True,
        check=True,
    )
    sibling = int(done.stdout)
    command = int(pid_file.read_text())
    try:
        anyio.run(wait_for, lambda: gone(command), "the command's end")
        assert not gone(sibling)
    finally:
        for pid in (sibling, command):
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(os.name != "posix", reason="the supervisor is POSIX only")
def test_a_supervisor_in_another_s_process_group_is_its_command() -> None:
    # A bench stops the server it started with terminate(), or kills it: sent to a
    # supervisor that waited for the group's stop, neither reached the command.
    script = Path(managed_server.__file__).with_name("parent_death.py")
    command = ["sh", "-c", "echo started; exec sleep 600"]
    started = subprocess.Popen(
        [sys.executable, "-I", "-S", str(script), str(os.getpid()), "5", "-1", *command],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert started.stdout is not None and started.stdout.readline() == "started\n"
        started.terminate()
        assert started.wait(timeout=30) == -signal.SIGTERM
    finally:
        started.kill()
        started.wait()
        if started.stdout is not None:
            started.stdout.close()
