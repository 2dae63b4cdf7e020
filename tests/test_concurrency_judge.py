"""Adaptive concurrency end to end: the engine's ``openai`` judge against a small loopback server.

The server's queue is built by holding its requests, not by timing; the load polls run when
the server's state has changed (the engine's injected sleep waits for that), so no test step
depends on how long anything takes.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import anyio
import pytest
from aiohttp import web

from trig_stream.backends.base import ServerLoad
from trig_stream.backends.judges.openai_judge import OpenAIJudge
from trig_stream.backends.judges.openai_options import OpenAIJudgeOptions
from trig_stream.backends.judges.server_probe import parse_load, read_load, server_root
from trig_stream.concurrency import ConcurrencyController
from trig_stream.config import RunConfig
from trig_stream.engine import Engine
from trig_stream.errors import FatalBackendError
from trig_stream.judging import JudgeStage
from trig_stream.testing.judge_options import JudgeServerOptions
from trig_stream.testing.judge_server import JudgeServer

pytestmark = pytest.mark.anyio

DEMO = Path(__file__).resolve().parent.parent / "data" / "demo" / "t2i_prompts.json"
START = 8
CAPACITY = 2
MAX_WAITING = 2


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiohttp, under the openai client, runs on asyncio only


class PollOnChange:
    """The engine's sleep here: returns once the server has changed since the last poll."""

    def __init__(self, server: JudgeServer) -> None:
        self.server = server
        self.seen = -1
        self.naps: list[float] = []
        self._slept = anyio.Event()

    async def sleep(self, seconds: float) -> None:
        self.naps.append(seconds)
        slept, self._slept = self._slept, anyio.Event()
        slept.set()
        self.seen = await self.server.wait_for_change(self.seen)

    async def next_poll_done(self) -> None:
        """Wait until the poll running now (or the next one) is over."""
        await self._slept.wait()


def run_config(
    tmp_path: Path,
    base_url: str,
    *,
    more_urls: tuple[str, ...] = (),
    poll_interval_s: float = 0.5,
    timeout_s: float = 60.0,
) -> RunConfig:
    endpoints: dict[str, Any] = (
        {"base_urls": [base_url, *more_urls]} if more_urls else {"base_url": base_url}
    )
    endpoints["timeout_s"] = timeout_s
    return RunConfig.model_validate(
        {
            "run": {"name": "adaptive", "output_dir": str(tmp_path), "task": "t2i"},
            "dataset": {"path": str(DEMO)},
            "generators": [
                {"name": "synthetic-a", "backend": "synthetic", "options": {"size": 16}}
            ],
            "judges": [
                {
                    "name": "trigscore",
                    "backend": "openai",
                    "concurrency": START,
                    "adaptive": {
                        "enabled": True,
                        "min": 1,
                        "max": 32,
                        "max_waiting": MAX_WAITING,
                        "poll_interval_s": poll_interval_s,
                    },
                    "options": {**endpoints, "model": "trig-judge-sim"},
                }
            ],
        }
    )


def record_controllers(monkeypatch: pytest.MonkeyPatch) -> list[ConcurrencyController]:
    """The adaptive controllers of the judge stages the engine makes from now on."""
    controllers: list[ConcurrencyController] = []

    class RecordingStage(JudgeStage):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            controllers.extend(self.controllers.values())

    monkeypatch.setattr("trig_stream.engine.JudgeStage", RecordingStage)
    return controllers


async def test_limit_falls_with_the_server_queue_and_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    controllers = record_controllers(monkeypatch)
    samples = len(json.loads(DEMO.read_text()))
    # Service time keeps the server, not the dispatcher, the bottleneck (no timing is read).
    options = JudgeServerOptions(capacity=CAPACITY, latency_s=0.02)
    async with JudgeServer(options) as server:
        server.hold()
        polls = PollOnChange(server)
        config = run_config(tmp_path, server.base_url)
        with anyio.fail_after(60):
            async with Engine(config, sleep=polls.sleep) as engine:
                # The starting limit lets more in than the server runs: its queue grows
                # until a poll sees it and the limit is cut.
                while engine.stats().judges["trigscore"].limit >= START:
                    await polls.next_poll_done()
                queued = server.stats()
                server.release()
                judgements = [judgement async for judgement in engine.results]
    assert len(judgements) == 2 * samples
    assert all(j.status == "ok" for j in judgements)
    assert queued.waiting > MAX_WAITING
    (controller,) = controllers
    changes = list(controller.changes)
    assert changes[0].reason.startswith("server queue") and changes[0].limit < START
    # Once released, the queue stays short at the lowered limit, and the limit grows again.
    assert changes[1].limit > changes[0].limit and changes[1].reason == "answered in time"
    assert set(polls.naps) == {0.5}
    assert server.stats().repeated == 0


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        (JudgeServerOptions(rate_limit_rate=1.0, retry_after="1"), "rate limited (429)"),
        (JudgeServerOptions(hang_rate=1.0), "no answer in time"),
    ],
    ids=["429", "timeout"],
)
async def test_a_lone_endpoint_s_429s_and_timeouts_cut_the_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: JudgeServerOptions, reason: str
) -> None:
    # No other endpoint takes the requests: each such answer says the server is overloaded.
    controllers = record_controllers(monkeypatch)
    poll_interval_s = 7.25

    async def sleep(seconds: float) -> None:
        if seconds == poll_interval_s:
            await anyio.sleep_forever()  # no load poll after the first: the faults alone cut
        await anyio.lowlevel.checkpoint()  # a retry's backoff, not waited for

    async with JudgeServer(fault) as server:
        config = run_config(
            tmp_path, server.base_url, poll_interval_s=poll_interval_s, timeout_s=0.3
        )
        # A server that never answers is taken for one that is not there: the run stops.
        never_answers = fault.hang_rate == 1.0
        with (
            anyio.fail_after(60),
            pytest.raises(FatalBackendError, match="has answered no request yet")
            if never_answers
            else nullcontext(),
        ):
            async with Engine(config, sleep=sleep) as engine:
                async for _ in engine.results:
                    break  # one judgement failed for good: the cut came before it
                engine.stop()
    (controller,) = controllers
    cuts = [c for c in controller.changes if c.reason == reason]
    assert cuts and cuts[0].limit < START


async def test_one_endpoint_s_429s_leave_the_limit_the_others_serve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One endpoint answering 429 (it then rests) while another is awake and answers well:
    # each 429 cut the judge's limit all the same (seen: 31 -> 16, 47 -> 24), though the
    # request was sent on to the other endpoint.
    controllers = record_controllers(monkeypatch)
    poll_interval_s = 7.25  # told apart from the retries' backoff by the sleep below

    async def sleep(seconds: float) -> None:
        if seconds == poll_interval_s:
            await anyio.sleep_forever()  # no load poll after the first: 429s alone may cut
        await anyio.lowlevel.checkpoint()  # a retry's backoff, not waited for

    limiting = JudgeServerOptions(rate_limit_rate=1.0, retry_after="60")
    async with JudgeServer(limiting) as limited, JudgeServer() as live:
        config = run_config(
            tmp_path,
            limited.base_url,
            more_urls=(live.base_url,),
            poll_interval_s=poll_interval_s,
        )
        with anyio.fail_after(60):
            async with Engine(config, sleep=sleep) as engine:
                judgements = [judgement async for judgement in engine.results]
    assert judgements and all(j.status == "ok" for j in judgements)
    assert limited.stats().received >= 1
    (controller,) = controllers
    # (Latency may move it: timing is not this test's concern.)
    assert [c for c in controller.changes if "429" in c.reason] == []


async def test_one_endpoint_s_timeouts_leave_the_limit_the_others_serve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One endpoint that never answers (it then rests) while another answers well: each
    # timeout cut the judge's limit ("no answer in time"), again each time it woke.
    controllers = record_controllers(monkeypatch)
    poll_interval_s = 7.25

    async def sleep(seconds: float) -> None:
        if seconds == poll_interval_s:
            await anyio.sleep_forever()  # no load poll after the first: timeouts alone may cut
        await anyio.lowlevel.checkpoint()  # a retry's backoff, not waited for

    async with JudgeServer(JudgeServerOptions(hang_rate=1.0)) as hangs, JudgeServer() as live:
        config = run_config(
            tmp_path,
            hangs.base_url,
            more_urls=(live.base_url,),
            poll_interval_s=poll_interval_s,
            timeout_s=0.3,
        )
        with anyio.fail_after(60):
            async with Engine(config, sleep=sleep) as engine:
                judgements = [judgement async for judgement in engine.results]
    assert judgements and all(j.status == "ok" for j in judgements)
    assert hangs.stats().faults["hang"] >= 1
    (controller,) = controllers
    assert [c for c in controller.changes if c.reason == "no answer in time"] == []


async def test_openai_judge_reads_the_server_load() -> None:
    async with JudgeServer(JudgeServerOptions(capacity=1)) as server:
        server.hold()
        judge = OpenAIJudge(
            "trigscore",
            # Two base URLs of one server (its /metrics is at their shared root).
            OpenAIJudgeOptions(
                base_urls=[server.base_url, server_root(server.base_url)], model="m"
            ),
        )
        await judge.open()
        try:
            assert await judge.server_load() == ServerLoad(running=0, waiting=0)
            async with anyio.create_task_group() as tg:
                for _ in range(3):
                    tg.start_soon(_chat, server.base_url)
                await server.wait_until(lambda s: s.waiting == 2)
                # Both endpoints are the same server: its queue is counted once.
                assert await judge.server_load() == ServerLoad(running=1, waiting=2)
                server.release()
        finally:
            await judge.aclose()
    closed = OpenAIJudge("trigscore", OpenAIJudgeOptions(base_url=server.base_url, model="m"))
    await closed.open()
    try:
        assert await closed.server_load() is None  # the server is gone: unknown, no error
    finally:
        await closed.aclose()


class UnknownLoad(JudgeServer):
    """A vLLM-like server whose gauges say it does not know its load (valid Prometheus)."""

    def __init__(self, value: str) -> None:
        super().__init__()
        self.value = value

    async def _metrics(self, request: web.Request) -> web.Response:
        text = (
            f'vllm:num_requests_running{{model_name="m"}} {self.value}\n'
            f'vllm:num_requests_waiting{{model_name="m"}} {self.value}\n'
        )
        return web.Response(text=text, content_type="text/plain")


@pytest.mark.parametrize("value", ["NaN", "+Inf", "-Inf", "1e400"])
async def test_a_server_that_does_not_know_its_load_leaves_the_others_loads(value: str) -> None:
    # round() of NaN or +Inf raised out of server_load: the healthy server's load was lost
    # too, and after three such polls the run stopped reading loads, silently.
    assert parse_load(f"vllm:num_requests_waiting {value}\n") is None
    assert parse_load(
        f"vllm:num_requests_running 3\nvllm:num_requests_waiting {value}\n"
    ) == ServerLoad(running=3, waiting=0)
    async with (
        UnknownLoad(value) as unknown,
        JudgeServer(JudgeServerOptions(capacity=1)) as server,
    ):
        server.hold()
        judge = OpenAIJudge(
            "trigscore",
            OpenAIJudgeOptions(base_urls=[unknown.base_url, server.base_url], model="m"),
        )
        await judge.open()
        try:
            async with anyio.create_task_group() as tg:
                for _ in range(2):
                    tg.start_soon(_chat, server.base_url)
                await server.wait_until(lambda s: s.waiting == 1)
                assert await judge.server_load() == ServerLoad(running=1, waiting=1)
                server.release()
        finally:
            await judge.aclose()


async def test_one_server_whose_load_read_fails_never_hides_the_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def read_load(base_url: str, *, timeout_s: float) -> ServerLoad | None:
        if "broken" in base_url:
            raise ValueError("a probe's bug")
        return ServerLoad(running=2, waiting=3)

    monkeypatch.setattr("trig_stream.backends.judges.openai_judge.read_load", read_load)
    judge = OpenAIJudge(
        "trigscore",
        OpenAIJudgeOptions(base_urls=["http://broken:1/v1", "http://127.0.0.1:1/v1"], model="m"),
    )
    await judge.open()
    try:
        assert await judge.server_load() == ServerLoad(running=2, waiting=3)
    finally:
        await judge.aclose()


async def test_the_load_of_a_server_under_a_non_ascii_path_is_read() -> None:
    # The probe wrote its request in ASCII: a base URL whose path the clients send
    # percent-encoded had no load, ever.
    lines: list[bytes] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        lines.append(await reader.readline())
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.0 200 OK\r\n\r\nvllm:num_requests_running 2\n")
        writer.close()

    async with await asyncio.start_server(answer, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        load = await read_load(f"http://127.0.0.1:{port}/ok/vé/v1", timeout_s=5)
    assert load == ServerLoad(running=2, waiting=0)
    assert lines == [b"GET /ok/v%C3%A9/metrics HTTP/1.0\r\n"]


async def _chat(base_url: str) -> None:
    import openai
    from openai.types.chat import ChatCompletion

    client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0)
    async with client:
        await client.post(
            "/chat/completions",
            cast_to=ChatCompletion,
            body={"model": "m", "messages": [{"role": "user", "content": "IQ-R"}]},
        )
