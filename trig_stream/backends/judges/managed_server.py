"""A judge server that trig-stream starts, waits for, and stops: ``options.serve``.

The ``openai`` judge can run its own vLLM (or any OpenAI-compatible server) for the length of
a run::

    [[judges]]
    backend = "openai"
    [judges.options]
    model = "Qwen/Qwen2.5-VL-7B-Instruct"
    serve = { command = ["vllm", "serve", "Qwen/Qwen2.5-VL-7B-Instruct",
                         "--host", "{host}", "--port", "{port}"],
              port = 8000, ready_timeout_s = 600 }

``{host}`` and ``{port}`` in the command become ``host`` and the port (``port = 0`` picks a
free one; a port something already listens on is refused, since that server would answer
``/health`` for ours; a literal ``--host`` the probes at ``host`` do not reach is refused). The
command runs in its own process group with the run's environment (less the variables with
which the run quiets its own model libraries) plus ``env``; its output
(stdout and stderr together) goes to a temporary file, of which only the last lines are read
back. The server is ready when ``GET /health`` answers 200. It is stopped as a process group:
SIGTERM, then SIGKILL to whatever of the group still runs after ``stop_timeout_s`` (at once on
a hard stop, :meth:`ManagedServer.stop_now`), whether or not the command's own process is
still there: vLLM's engine processes outlive a crashed API server. A server that exits (the
command's own process: a launcher that leaves its server running in the background exits too),
or is not ready within ``ready_timeout_s``, is a :class:`FatalBackendError` whose message ends
with its last lines of output.

Keep secrets out of ``env``: the config is saved with the run. The child inherits the
environment, so export the key (``VLLM_API_KEY``) instead. With it, it inherits every key the
run's backends read: its output quoted is scrubbed of them all
(:func:`~trig_stream.backends.api_keys.keys_in_environment`), not only of its judge's, but of
another backend's only when it is long enough to be a secret (``SHORT_KEY_CHARS``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import IO, Annotated

import anyio
from anyio.abc import Process
from pydantic import BaseModel, Field, field_validator, model_validator

from trig_stream.backends.api_keys import SHORT_KEY_CHARS, keys_in_environment, scrub, scrub_all
from trig_stream.backends.judges.process_groups import (
    group_running,
    process_running,
    signal_group,
)
from trig_stream.backends.judges.server_addresses import (
    NOT_AN_ADDRESS_HERE,
    free_port,
    hosts_overlap,
    listening_socket,
)
from trig_stream.backends.judges.server_probe import ProbeError, http_get, url_host
from trig_stream.backends.library_logs import environment_unquieted
from trig_stream.config_fields import OPTIONS_CONFIG
from trig_stream.errors import FatalBackendError

logger = logging.getLogger(__name__)

TAIL_LINES = 20
"""Lines of the server's output quoted when it fails."""
LINE_CHARS = 500
"""Longest line kept; longer ones are cut."""
HEALTH_TIMEOUT_S = 5.0
"""How long one ``/health`` probe may take."""
TAIL_BYTES = 64 * 1024
"""Bytes read back from the end of the server's output to find its last lines."""
STOP_POLL_S = 0.05
"""Time between looks at whether the server's processes have all ended, while it stops."""
KILLED_WAIT_S = 10.0
"""How long a stop waits for the server's processes to end after SIGKILL (the kernel ends
them, but one inside a GPU driver call only once the call returns)."""
_LINE_END = re.compile(rb"[\r\n]")
_KEY_FLAG = re.compile(r"--?(?:[^\W_]+[-_])*(?:key|token|apikey)", re.IGNORECASE)
"""A command-line flag whose value is a key: its last ``-``/``_``-separated word is ``key``,
``token`` or ``apikey`` (``--api-key``, ``--token``, ``--hf_token``, ``-key``), so
``--tokenizer-pool-size``, ``--max-tokens``, ``--token-budget`` or ``--api-key-file`` is none."""
_KEY_NAME = re.compile(r"(?:key|token)(?![a-z])", re.IGNORECASE)
"""Found in the name of an environment variable whose value is a key: ``KEY`` or ``TOKEN``
that no letter follows (``VLLM_API_KEY``, ``OPENAI_API_KEY``, ``HF_TOKEN``, ``APIKEY``);
``CUDA_VISIBLE_DEVICES``, ``OMP_NUM_THREADS``, ``MAX_TOKENS`` (a count of tokens) or
``TOKENIZERS_PARALLELISM`` is none."""
_PLACEHOLDER = re.compile(r"\{(host|port)\}")
"""``{host}`` or ``{port}`` in a ``serve`` command's argument."""
_KEY_END = r"""(?=$|[\s"';&|)])"""
"""Where a key given as a word inside a longer text ends: the text, a space, a quote or a shell
separator (``--api-key EMPTY-model`` passes ``EMPTY-model``, not the key ``EMPTY``)."""


def command_line(command: Sequence[str], host: str, port: int | str) -> list[str]:
    """``command`` with ``{host}`` and ``{port}`` in its arguments replaced by ``host`` and
    ``port``."""
    values = {"host": host, "port": str(port)}
    return [_PLACEHOLDER.sub(lambda found: values[found.group(1)], arg) for arg in command]


def _passed_inside(secret: str) -> re.Pattern[str]:
    """Where a longer text passes ``secret`` as a key: a whole word after a flag naming a key
    or token (``--api-key KEY``, ``--api-key=KEY``, ``--token 'KEY'``), after ``Bearer``, or
    assigned to a variable whose name holds ``KEY`` or ``TOKEN`` (``VLLM_API_KEY=KEY``, as
    ``env`` or a shell passes it to the server)."""
    # Case is ignored in the flag, the variable's name and ``Bearer``, not in the key.
    flag = rf"(?<![\w-]){_KEY_FLAG.pattern}(?:=|\s+)"
    variable = rf"(?<![\w-])[A-Za-z0-9_]*(?:{_KEY_NAME.pattern})[A-Za-z0-9_]*="
    before = rf"""(?i:{flag}|\bBearer\s+|{variable})["']?"""
    return re.compile(before + re.escape(secret) + _KEY_END)


class ServeOptions(BaseModel):
    """``options.serve`` of the ``openai`` judge: the server to start for the run."""

    model_config = OPTIONS_CONFIG

    command: Annotated[list[str], Field(min_length=1)]
    """The command line; ``{host}`` and ``{port}`` in any argument become ``host`` and the
    port."""
    host: str = "127.0.0.1"
    """Where the server listens; the judge's base URL is ``http://host:port/v1`` (an IPv6
    address such as ``::1`` is written without brackets here, and gets them in the URL)."""
    port: Annotated[int, Field(ge=0, le=65535)] = 8000
    """0 picks a free port (``{port}`` in ``command`` must pass it on)."""
    ready_timeout_s: Annotated[float, Field(gt=0)] = 600.0
    """Give up when ``GET /health`` has not answered 200 by then (loading a model is slow)."""
    poll_interval_s: Annotated[float, Field(gt=0)] = 1.0
    """Time between ``/health`` probes while it starts."""
    stop_timeout_s: Annotated[float, Field(ge=0)] = 30.0
    """Grace between SIGTERM and SIGKILL when stopping it."""
    env: dict[str, str] = Field(default_factory=dict)
    """Variables added to the inherited environment (no secrets: the config is saved)."""

    @field_validator("host")
    @classmethod
    def _host_alone(cls, host: str) -> str:
        # Each of these became a URL nothing answers (http://:8000/health, polled until
        # ready_timeout_s) or an address that cannot be bound.
        if not host.strip():
            raise ValueError(
                "is empty: set the address the server listens on, e.g. 127.0.0.1 (or ::1)"
            )
        if "[" in host or "]" in host:
            raise ValueError(
                f"{host!r}: write an IPv6 address without brackets ({host.strip('[]')!r}); the "
                "URLs get them"
            )
        if any(char.isspace() or char in "/@?#" for char in host):
            raise ValueError(
                f"{host!r} is not a host name or address: write the host alone (127.0.0.1), "
                "without a scheme, a path or spaces; the port goes in serve.port"
            )
        if host.count(":") == 1:  # host:port (an IPv6 address holds several colons)
            name, port = host.split(":")
            raise ValueError(
                f"{host!r} holds a port: write the host alone ({name!r}) and the port in "
                f"serve.port (port = {port})"
            )
        return host

    @field_validator("env")
    @classmethod
    def _env_names_valid(cls, env: dict[str, str]) -> dict[str, str]:
        # Else validate passed it, and the run failed opening the judge: "illegal environment
        # variable name".
        for name, value in env.items():
            if not name or "=" in name or "\0" in name:
                raise ValueError(
                    f"{name!r} is no environment variable name (it must be non-empty, without "
                    "'=' or NUL): rename it (e.g. CUDA_VISIBLE_DEVICES)"
                )
            if "\0" in value:
                raise ValueError(
                    f"the value of {name!r} holds a NUL character, which no environment "
                    "variable can hold: remove it"
                )
        return env

    @model_validator(mode="after")
    def _port_reaches_the_server(self) -> ServeOptions:
        # Else the server listens where its command says, and /health is polled on a port
        # nothing listens on until ready_timeout_s (10 minutes) runs out.
        if self.port == 0 and not any("{port}" in arg for arg in self.command):
            raise ValueError(
                "port = 0 picks a free port, which the server only learns through {port} in "
                'its command: add it (e.g. "--port", "{port}"), or set a fixed port'
            )
        return self


class ManagedServer:
    """One server process, from start to stop; :meth:`start` then :meth:`aclose`, also when
    :meth:`start` is cancelled (a server being started is left for :meth:`aclose` to stop).

    The server's output goes to an unnamed temporary file, never to a pipe that a full
    buffer could block; only its last lines are ever read back (:meth:`output_tail`).

    Args:
        options: the ``serve`` table.
        name: the judge's name, for messages.
        secrets: texts scrubbed from the output quoted (the judge's API key), besides
            every key of :data:`SHORT_KEY_CHARS` characters or more the run's backends read
            from the environment the server inherits.
        sleep: waits between ``/health`` probes (tests inject it).
        clock: measures ``ready_timeout_s`` (tests inject it).
    """

    def __init__(
        self,
        options: ServeOptions,
        *,
        name: str,
        secrets: Sequence[str] = (),
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.options = options
        self.name = name
        self._secrets = [s for s in secrets if s]
        self._sleep = sleep
        self._clock = clock
        self._process: Process | None = None
        self._output: IO[bytes] | None = None
        # Where the supervisor tells the command's process id, and what it told.
        self._told: int | None = None
        self._command_pid: int | None = None
        self._closed = False
        self._stop_now = False
        self.port = options.port
        self.argv: list[str] = []

    @property
    def base_url(self) -> str:
        """The server's OpenAI base URL."""
        return f"http://{url_host(self.options.host)}:{self.port}/v1"

    @property
    def pid(self) -> int | None:
        """The process id of the server, once started."""
        return self._process.pid if self._process is not None else None

    @property
    def returncode(self) -> int | None:
        """The server's exit status once it has exited, else None."""
        return self._process.returncode if self._process is not None else None

    def output_tail(self) -> list[str]:
        """The server's last lines of output (at most ``TAIL_LINES``), secrets scrubbed."""
        if self._output is None:
            return []
        fd = self._output.fileno()
        start = max(0, os.fstat(fd).st_size - TAIL_BYTES)
        # pread leaves the offset, which the server shares, where it is.
        data = os.pread(fd, TAIL_BYTES, start)
        if start > 0:
            # The read began inside a line, perhaps inside a secret that scrubbing would then
            # miss: that line is left out.
            end = _LINE_END.search(data)
            if end is None:
                return ["(its last line is longer than can be quoted)"]
            data = data[end.end() :]
        lines: deque[str] = deque(maxlen=TAIL_LINES)
        for raw in _LINE_END.split(data):
            text = raw.decode("utf-8", errors="replace").rstrip()
            if text:
                lines.append(text)
        return [self._scrub(line)[:LINE_CHARS] for line in lines]

    async def start(self) -> str:
        """Start the server and wait until it is ready; returns its base URL.

        Raises:
            FatalBackendError: the command cannot start, exits, or is not ready in time.
        """
        if self.options.port == 0:
            self.port = self._free_port()
        else:
            self._check_port_free()
        self.argv = command_line(self.options.command, self.options.host, self.port)
        self.check_command()
        # Held open until aclose(): the server writes into it all along.
        self._output = tempfile.TemporaryFile(prefix="trig-stream-serve-")  # noqa: SIM115
        self._told, tell = os.pipe() if os.name == "posix" else (None, -1)
        try:
            self._process = await anyio.open_process(
                _stopped_with_us(self.argv, self.options.stop_timeout_s, tell),
                pass_fds=() if tell < 0 else (tell,),
                stdin=subprocess.DEVNULL,
                stdout=self._output,
                stderr=subprocess.STDOUT,
                # Without the run's own quieting: the server's warnings explain its failures.
                env={**environment_unquieted(), **self.options.env},
                # Its own group: vLLM starts worker processes, and a stop must reach them.
                start_new_session=True,
            )
        except OSError as exc:
            await self.aclose()
            raise FatalBackendError(
                f"judge {self.name!r}: cannot start the server {self._command()}: "
                f"{exc.strerror or exc}"
            ) from None
        finally:
            if tell >= 0:
                os.close(tell)
        try:
            await self._wait_ready()
        except anyio.get_cancelled_exc_class():
            # A stop while it starts: the server is stopped by aclose(), which its owner
            # calls, and announces (closing()), as after a run: else the run waited out the
            # grace period with nothing on screen.
            raise
        except BaseException:
            await self.aclose()
            raise
        return self.base_url

    def check_command(self) -> None:
        """Refuse a command whose program is not an executable file, here or on PATH."""
        program = self.options.command[0]
        search = self.options.env.get("PATH", os.environ.get("PATH"))  # the server's own PATH
        if shutil.which(program, path=search) is None:
            # Its program alone: before the start, the rest still holds {port}.
            raise FatalBackendError(
                f"judge {self.name!r}: cannot start its server: {self._scrub(program)} is not "
                "an executable file, here or on PATH (options.serve.command[0])"
            )

    def check_host(self) -> None:
        """Refuse a ``serve.host`` that is no address of this machine, as :meth:`start` would,
        and a command whose own ``--host`` makes the server listen where ``serve.host`` does
        not reach it.

        Raises:
            FatalBackendError: the host is no address of this machine (no such host, or
                another machine's), or the command listens elsewhere.
        """
        try:
            free_port(self.options.host)
        except OSError as exc:
            error = self._host_error(exc)
            if error is not None:
                raise error from None
            # Anything else is for the start to report, with its port.
        self._check_command_host()

    def _check_command_host(self) -> None:
        # A literal --host left as it was when serve.host changed (the shipped config's
        # 127.0.0.1 against ::1): the probes never reached the server, and the run waited out
        # ready_timeout_s. A wildcard (0.0.0.0) or another name of the host reaches it.
        command, host = self.options.command, self.options.host
        for index, arg in enumerate(command):
            if arg == "--host" and index + 1 < len(command):
                where, listen = index + 1, command[index + 1]
            elif arg.startswith("--host="):
                where, listen = index, arg.removeprefix("--host=")
            else:
                continue
            # vLLM binds an empty --host as every IPv4 address (0.0.0.0), which serve.host
            # cannot be written as.
            if "{host}" in listen or hosts_overlap(listen or "0.0.0.0", host):
                continue
            at = repr(listen) if listen else "'' (every IPv4 address)"
            raise FatalBackendError(
                f"judge {self.name!r}: options.serve.command[{where}] makes the server listen "
                f"at {at}, where the run does not reach it: it waits for it at "
                f"options.serve.host {host!r} (GET /health) until ready_timeout_s; write "
                f'"--host", "{{host}}" in the command (serve.host then goes in), or set '
                f"serve.host to {listen or '127.0.0.1'!r}"
            )

    def check_port(self) -> None:
        """Refuse a ``serve.port`` something already listens on, as :meth:`start` would: a
        bind, closed at once (nothing listens, nothing starts). Port 0 (a free one, picked at
        the start) passes.

        Raises:
            FatalBackendError: the port is taken, in :meth:`start`'s words.
        """
        if self.options.port != 0:
            self._check_port_free()

    def check_secrets_left_out(self) -> None:
        """Refuse a command argument or an ``env`` value that holds an API key (the judge's, or
        another backend's): the serve table is saved with the run (its manifest) and its
        command shown while it starts.

        Raises:
            FatalBackendError: one holds it; the message names where, never the key.
        """
        command = self.options.command
        where = [
            f"options.serve.command[{index}]"
            for index, arg in enumerate(command)
            if self._carries_key(arg, after=command[index - 1] if index else "")
        ] + [
            f"options.serve.env[{name!r}]"
            for name, value in self.options.env.items()
            if self._carries_key(value, after="", alone=_KEY_NAME.search(name) is not None)
        ]
        if where:
            raise FatalBackendError(
                f"judge {self.name!r}: {' and '.join(where)} "
                f"{'holds' if len(where) == 1 else 'hold'} an API key, which the run "
                "would save in its manifest and show while the server starts: leave it out "
                "and pass it through the environment, which the server inherits (vLLM reads "
                "VLLM_API_KEY: `export VLLM_API_KEY=...` before the run, instead of `--api-key`)"
            )

    def _carries_key(self, text: str, *, after: str, alone: bool = False) -> bool:
        """Whether ``text`` (a command argument following ``after``, or an ``env`` value)
        holds one of the keys; ``alone``: ``text`` is the value of an ``env`` variable whose
        name holds ``KEY`` or ``TOKEN``.

        A key of :data:`SHORT_KEY_CHARS` characters or more counts wherever it appears, as
        :meth:`_scrub` masks it. A shorter one, the judge's own (another backend's is none of
        the keys: :meth:`_keys`), is a dummy (``1``, ``vllm``, ``EMPTY``) and an
        ordinary word too, so only where it is surely passed as the key: as the whole value
        of such a variable (``VLLM_API_KEY``, ``HF_TOKEN``), as the argument after a flag
        naming a key or token (``--api-key KEY``), or, inside any argument or value, as a
        whole word after such a flag (``--api-key=KEY``, ``sh -c "vllm serve --api-key KEY"``),
        after ``Bearer`` or assigned to such a variable (``env VLLM_API_KEY=KEY vllm serve``);
        ``--tensor-parallel-size 1``, ``--token-budget 1`` or ``CUDA_VISIBLE_DEVICES=1``
        beside the key ``1`` does not hold it.
        """
        for secret in self._keys():
            if len(secret) >= SHORT_KEY_CHARS:
                if scrub(text, secret) != text:
                    return True
            else:
                given = text == secret and (alone or _KEY_FLAG.fullmatch(after))
                if given or _passed_inside(secret).search(text):
                    return True
        return False

    def _free_port(self) -> int:
        """A port free now on ``serve.host`` (for ``port = 0``)."""
        host = self.options.host
        try:
            return free_port(host)
        except OSError as exc:
            raise self._host_error(exc) or FatalBackendError(
                f"judge {self.name!r}: cannot find a free port for its server on {host} "
                f"(options.serve.host): {exc.strerror or exc}; set serve.host to an address "
                "of this machine (127.0.0.1, ::1)"
            ) from None

    def _check_port_free(self) -> None:
        """Refuse a port something already listens on: its ``/health`` would pass for ours.

        The child would fail to listen there, but probably not before the first probe, which
        would find the other server ready, and the run would judge through whatever it serves.
        Each address ``serve.host`` names is bound a moment: a host name may name several
        (``localhost``: ::1 and 127.0.0.1), and the probe reaches whichever answers. One that
        is no address of this machine (::1 where IPv6 is off) is passed over while another is.
        """
        host, port = self.options.host, self.port
        try:
            addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise self._host_error(exc) or exc from None
        not_here: OSError | None = None
        bound = False
        for family, _, _, _, address in addresses:
            try:
                with listening_socket(family) as sock:
                    sock.bind(address)
            except OSError as exc:
                if self._host_error(exc) is not None:
                    not_here = exc
                    continue
                at = "" if address[0] == host else f" ({address[0]})"
                raise FatalBackendError(
                    f"judge {self.name!r}: cannot start its server on {host}:{port}{at}: "
                    f"{exc.strerror or exc} (another server listening there?); stop that one, "
                    "or set serve.port to a free port (0 picks one)"
                ) from None
            bound = True
        if not bound and not_here is not None:
            raise self._host_error(not_here) or not_here from None

    def _host_error(self, exc: OSError) -> FatalBackendError | None:
        """The error for a ``serve.host`` that is no address of this machine (no such host, or
        one a bind refuses: :data:`NOT_AN_ADDRESS_HERE`), else None."""
        if not isinstance(exc, socket.gaierror) and exc.errno not in NOT_AN_ADDRESS_HERE:
            return None
        return FatalBackendError(
            f"judge {self.name!r}: options.serve.host {self.options.host!r} is not an address "
            f"of this machine ({exc.strerror or exc}); set it to one, e.g. 127.0.0.1 or ::1"
        )

    def closing(self) -> str | None:
        """What :meth:`aclose` does when it may take a while: the server given its grace
        period; None when it is quick (no server started, or closed; a hard stop kills it at
        once; ``stop_timeout_s = 0``)."""
        if self._process is None or self._closed or self._stop_now:
            return None
        if self.options.stop_timeout_s == 0:
            return None
        return f"stopping its server (up to {self.options.stop_timeout_s:g} s)"

    def stop_now(self) -> None:
        """A hard stop: a stop under way or to come sends SIGKILL at once, with no grace."""
        self._stop_now = True

    async def aclose(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and release everything; idempotent."""
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            if self._process is not None:
                await self._stop(self._process)
                await self._process.aclose()
        if self._output is not None:
            self._output.close()
            self._output = None
        if self._told is not None:
            os.close(self._told)
            self._told = None

    def failure(self) -> FatalBackendError | None:
        """The error to raise when the server has exited during the run; None while it runs."""
        code = self.returncode
        if code is None:
            return None
        return FatalBackendError(self._describe(self._exited(code)))

    async def _wait_ready(self) -> None:
        assert self._process is not None
        deadline = self._clock() + self.options.ready_timeout_s
        url = f"http://{url_host(self.options.host)}:{self.port}/health"
        while True:
            code = self._process.returncode
            if code is not None:
                raise FatalBackendError(self._describe(self._exited(code, " before ready")))
            try:
                status, _ = await http_get(url, timeout_s=HEALTH_TIMEOUT_S)
            except ProbeError:
                status = 0
            if status == 200:
                logger.info("judge %r: server ready at %s", self.name, self.base_url)
                return
            if self._clock() >= deadline:
                await self._stop(self._process)
                raise FatalBackendError(
                    self._describe(
                        f"was not ready (GET /health) within {self.options.ready_timeout_s:g} s; "
                        "stopped it"
                    )
                )
            await self._sleep(self.options.poll_interval_s)

    async def _stop(self, process: Process) -> None:
        # The whole group, whatever the state of the command's own process: it may have
        # exited (a crashed vLLM API server, a launcher) and left the others running (vLLM's
        # engine processes, holding the GPU).
        if not await self._running(process):
            # All ended: the group's id is free again, and is signalled no more (another
            # process may be given it).
            await process.wait()
            return
        if not self._stop_now:
            signal_group(process, signal.SIGTERM)
            await self._until_ended(process, self.options.stop_timeout_s, cut_short=True)
        if await self._running(process):
            signal_group(process, signal.SIGKILL)
            if not await self._until_ended(process, KILLED_WAIT_S):
                logger.warning(
                    "judge %r: processes of its server (group %d) still run %g s after SIGKILL",
                    self.name,
                    process.pid,
                    KILLED_WAIT_S,
                )
        await process.wait()

    async def _until_ended(
        self, process: Process, timeout_s: float, *, cut_short: bool = False
    ) -> bool:
        """Wait until no process of the server's group runs; False if one still does after
        ``timeout_s``, or (with ``cut_short``) once :meth:`stop_now` is called."""
        with anyio.move_on_after(timeout_s):
            while await self._running(process):
                if cut_short and self._stop_now:
                    return False
                await anyio.sleep(STOP_POLL_S)
            return True
        return False

    @staticmethod
    async def _running(process: Process) -> bool:
        """Whether a process of the server's group runs (the command's own, or another)."""
        if process.returncode is None:
            return True
        return await anyio.to_thread.run_sync(group_running, process.pid)

    def _exited(self, code: int, when: str = "") -> str:
        what = f"exited with status {code}{when}" if code >= 0 else f"{_killed_by(-code)}{when}"
        if self._supervisor_died():
            # kill -9 of the supervisor, not of the command: no launcher's fault.
            assert self._process is not None
            return (
                f"still ran, but its supervisor (pid {self._process.pid}, parent_death.py) "
                f"{what}; the server is stopped too"
            )
        if self._process is not None and group_running(self._process.pid, ending=False):
            what += (
                " while processes it started still ran; they are stopped with it (a script "
                "that starts the server must last as long as it: `exec` the server, rather "
                "than start it in the background and exit)"
            )
        return what

    def _supervisor_died(self) -> bool:
        """Whether the process that ended is the supervisor, and the command it started (its
        process id as told, another than its own) still runs (Linux: read in ``/proc``),
        not ending with it: a kill of the whole group is the server's death, however long
        the command's memory takes to free."""
        if self._process is None:
            return False
        if self._command_pid is None and self._told is not None:
            os.set_blocking(self._told, False)
            # Not told (the command could not start): nothing to read.
            with contextlib.suppress(OSError, ValueError):
                self._command_pid = int(os.read(self._told, 32))
        command, group = self._command_pid, self._process.pid
        if command is None or command == group:  # the supervisor became the command
            return False
        return process_running(command, group)

    def _keys(self) -> list[str]:
        """The keys kept out of what is quoted and saved: those given (the judge's), and those
        the run's backends read from the environment, which the server inherits, of
        :data:`SHORT_KEY_CHARS` characters or more.

        Another backend's shorter key is a local server's dummy (``1``, ``vllm``, ``EMPTY``),
        no secret: counted, it refused ``HF_HUB_DISABLE_IMPLICIT_TOKEN=1`` in ``env`` and
        masked the server's ``rank 1 of 2``.
        """
        others = [key for key in keys_in_environment() if len(key) >= SHORT_KEY_CHARS]
        return list(dict.fromkeys([*self._secrets, *others]))

    def _scrub(self, text: str) -> str:
        return scrub_all(text, self._keys())

    def _command(self) -> str:
        return self._scrub(f"`{' '.join(self.argv)}`")

    def _describe(self, what: str) -> str:
        tail = self.output_tail()
        head = f"judge {self.name!r}: the server {self._command()} {what}"
        if not tail:
            return f"{head}; it wrote no output"
        body = "\n".join(f"  | {line}" for line in tail)
        lines = "line" if len(tail) == 1 else f"{len(tail)} lines"
        return f"{head}; its last {lines} of output:\n{body}"


def _killed_by(signum: int) -> str:
    """How a process that ``signum`` ended is described (``was killed by signal 9 (SIGKILL;
    the OOM killer?)``)."""
    try:
        name = signal.Signals(signum).name
    except ValueError:
        return f"was killed by signal {signum}"
    hint = "; the OOM killer?" if signum == signal.SIGKILL else ""
    return f"was killed by signal {signum} ({name}{hint})"


def check_distinct_addresses(judges: Sequence[object]) -> None:
    """Refuse two judges whose ``serve`` tables listen at the same fixed host and port: the
    second would fail to start only once the first had started (its model loaded, minutes).

    ``port = 0`` (a free port each) never clashes; hosts clash when they resolve to a common
    address (``127.1`` and ``127.0.0.1``, ``localhost`` and ``::1``, a host name and its
    address), or when one is the wildcard covering the other (``::`` all, ``0.0.0.0`` every
    IPv4 address).

    Raises:
        ConfigError: two clash; the message names both judges.
    """
    from trig_stream.errors import ConfigError

    fixed: list[tuple[str, ServeOptions]] = []
    for judge in judges:
        serve = getattr(getattr(judge, "options", None), "serve", None)
        if not isinstance(serve, ServeOptions) or serve.port == 0:
            continue
        name = str(getattr(judge, "name", "?"))
        for other_name, other in fixed:
            if other.port == serve.port and hosts_overlap(other.host, serve.host):
                raise ConfigError(
                    f"judges {other_name!r} and {name!r}: both serve tables start a server on "
                    f"port {serve.port} ({other.host} and {serve.host}), and the second could "
                    "not listen there once the first had started: give each its own "
                    "options.serve.port (or 0, a free port each)"
                )
        fixed.append((name, serve))


def _stopped_with_us(argv: list[str], grace_s: float, tell: int) -> list[str]:
    """``argv``, started under a supervisor that stops its whole process group when this
    process dies (Linux only; SIGTERM, then SIGKILL after ``grace_s``), and with SIGINT and
    SIGTERM at their default handling, even if this process ignores them (POSIX: an ignored
    signal is inherited across ``exec``). The supervisor exits as the command does, and
    writes the command's process id to the file descriptor ``tell``."""
    if os.name != "posix":
        return argv
    script = Path(__file__).with_name("parent_death.py")
    grace = f"{grace_s:g}"
    return [sys.executable, "-I", "-S", str(script), str(os.getpid()), grace, str(tell), *argv]
