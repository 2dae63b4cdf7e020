"""A request waiting out its backoff holds nothing of its failed attempt.

The failure's traceback holds the frames of the attempt that raised it, and their locals: an
``openai`` judge's request body with its base64 image, twice (32 MiB for a 2048² PNG),
per request waiting out a Retry-After. These tests plant an object in the failed attempt's
frames and check, from inside the wait, that it is gone: by reference counting, with no
garbage collection asked for, as the memory goes back in a run.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
from anyio.lowlevel import checkpoint

from tests.conftest import ConfigFactory
from tests.test_judge_engine import run_config
from trig_stream.backends.base import JudgeReply, JudgeRequest
from trig_stream.backends.generators.api_calls import call_with_retries
from trig_stream.backends.judges.http1 import HttpTransport
from trig_stream.backends.judges.transports import EncodedImage
from trig_stream.engine import Engine
from trig_stream.errors import RateLimitError, RetryableError
from trig_stream.retry import RetryPolicy
from trig_stream.testing.fake_judge import FakeJudge
from trig_stream.testing.judge_server import JudgeServer, JudgeServerOptions

pytestmark = pytest.mark.anyio


class Held:
    """Stands for what a failed attempt's frames hold (a request body): weakly referable."""


class Planted:
    """Weak references to the objects planted in failed attempts."""

    def __init__(self) -> None:
        self.refs: list[weakref.ref[Held]] = []
        self.waits = 0

    def plant(self) -> Held:
        held = Held()
        self.refs.append(weakref.ref(held))
        return held

    def alive(self) -> int:
        return sum(ref() is not None for ref in self.refs)


class FailsOnce(FakeJudge):
    """Fails each request's first attempt, a big object in the failing frame."""

    def __init__(self, planted: Planted) -> None:
        super().__init__(concurrency=2)
        self.planted = planted

    async def judge(self, request: JudgeRequest) -> JudgeReply:
        if request.attempt == 1:
            body = self.planted.plant()  # noqa: F841 - held by this frame, as a request is
            raise RateLimitError("fake judge: 429 Too Many Requests", retry_after=20)
        return await super().judge(request)


async def test_a_judge_request_waiting_out_its_backoff_holds_no_frame_of_its_failed_attempt(
    make_config: ConfigFactory,
) -> None:
    planted = Planted()

    async def wait(seconds: float) -> None:
        planted.waits += 1
        assert seconds >= 20  # the Retry-After's wait, not the next attempt's
        assert planted.alive() == 0, "the failed attempt's frames outlive it into the wait"
        await checkpoint()

    config = make_config(samples=3, engine={"max_attempts": 2})
    async with Engine(config, judges=[FailsOnce(planted)], sleep=wait) as engine:
        results = [j async for j in engine.results]
    assert [j.status for j in results] == ["ok"] * 6
    assert planted.waits == len(planted.refs) == 6


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # the openai judge's only loop
@pytest.mark.parametrize("endpoints", [1, 2])
async def test_an_openai_judge_request_waiting_out_a_retry_after_holds_no_request_body(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, endpoints: int
) -> None:
    # Two endpoints: the judge raises another error in place of the transport's (the retry
    # goes to the other endpoint), which held the judge's frame in a reference cycle. One
    # request at a time: another's body, in flight, is alive during the wait, as it should.
    planted = Planted()
    post = HttpTransport.post

    async def planting_post(self: HttpTransport, body: dict[str, Any], image: EncodedImage) -> Any:
        request_body = planted.plant()  # noqa: F841 - as post holds the request's bytes
        return await post(self, body, image)

    monkeypatch.setattr(HttpTransport, "post", planting_post)

    async def wait(seconds: float) -> None:
        planted.waits += 1
        assert planted.alive() == 0, "a failed request's body outlives it into the wait"
        await checkpoint()

    storm = JudgeServerOptions(rate_limit_rate=1.0, retry_after="20")
    async with AsyncExitStack() as servers:
        urls = [
            (await servers.enter_async_context(JudgeServer(storm))).base_url
            for _ in range(endpoints)
        ]
        config = run_config(
            tmp_path, urls if endpoints > 1 else urls[0], concurrency=1, max_attempts=2
        )
        async with Engine(config, sleep=wait) as engine:
            results = [j async for j in engine.results]
    assert {j.status for j in results} == {"error"}
    assert planted.waits > 0
    assert len(planted.refs) == sum(j.attempts for j in results)


def test_an_api_generator_call_waiting_out_its_backoff_holds_no_frame_of_its_failed_attempt() -> (
    None
):
    planted = Planted()

    def call() -> str:
        if not planted.refs:
            body = planted.plant()  # noqa: F841 - held by this frame, as a request is
            raise RetryableError("the API: HTTP 503: busy", retry_after=1)
        return "image"

    def wait(seconds: float, cancel: threading.Event) -> bool:
        planted.waits += 1
        assert planted.alive() == 0, "the failed call's frames outlive it into the wait"
        return False

    policy = RetryPolicy(max_attempts=2)
    sleep: Callable[[float, threading.Event], bool] = wait
    result = call_with_retries(
        call, policy=policy, cancel=threading.Event(), secret="", sleep=sleep
    )
    assert result == "image"
    assert planted.waits == len(planted.refs) == 1
