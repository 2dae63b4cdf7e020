"""What memory a judge's request holds: its image once, and nothing of a failed attempt.

A request waiting out its backoff holds nothing of its failed attempt: the failure's
traceback held the frames of the attempt that raised it, and their locals: an ``openai``
judge's request body with its base64 image, twice (32 MiB for a 2048² PNG), per request
waiting out a Retry-After. These tests plant an object in the failed attempt's frames and
check, from inside the wait, that it is gone: by reference counting, with no garbage
collection asked for, as the memory goes back in a run. And a request on the wire holds its
image once, besides the prepared image it was made of.
"""

from __future__ import annotations

import base64
import threading
import tracemalloc
import weakref
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
from anyio.lowlevel import checkpoint
from pydantic_core import to_json

from tests.conftest import ConfigFactory
from tests.test_judge_engine import run_config
from trig_stream.backends.base import JudgeReply, JudgeRequest
from trig_stream.backends.generators.api_calls import call_with_retries
from trig_stream.backends.judges.http1 import Answer, HttpTransport
from trig_stream.backends.judges.transports import IMAGE_SLOT, EncodedImage, splice_image
from trig_stream.engine import Engine
from trig_stream.errors import RateLimitError, RetryableError
from trig_stream.retry import RetryPolicy
from trig_stream.testing.fake_judge import FakeJudge
from trig_stream.testing.judge_options import JudgeServerOptions
from trig_stream.testing.judge_server import JudgeServer

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


IMAGE_BYTES = bytes(range(256)) * 12 * 1024
"""3 MiB: 4 MiB of base64, far above what the rest of a request or an answer holds."""


def test_an_encoded_image_holds_its_url_once() -> None:
    # It held the URL as a str and again as its JSON literal: 2 of its image's size per
    # image waiting for a judge, besides the requests' own copies.
    tracemalloc.start()
    try:
        image = EncodedImage.data_url("image/png", IMAGE_BYTES)
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    size = len(image.literal)
    assert held < 1.1 * size
    assert peak < 2.1 * size  # the base64 text, then the literal built from it
    assert "url" not in vars(image)  # not stored until asked (the HTTP transport never asks)
    assert image.url == "data:image/png;base64," + base64.b64encode(IMAGE_BYTES).decode()


def test_an_encoded_image_decodes_its_url_once() -> None:
    # The SDK's transport asks for the URL on every request: it was decoded each time (~18 ms
    # and one more copy of a 16 MiB image per request in flight).
    image = EncodedImage.data_url("image/png", IMAGE_BYTES)
    first = image.url
    tracemalloc.start()
    try:
        again = image.url
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert again is first
    assert held < len(image.literal) / 100


@pytest.mark.parametrize(
    "url", ["file:///tmp/a.png", 'file:///tmp/"quoted" \\ back\tslash\u00e9/\U0001f600.png']
)
def test_an_encoded_image_gives_back_the_url_it_was_made_of(url: str) -> None:
    assert EncodedImage.of(url).url == url


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # the transport's only loop
async def test_the_http_transport_holds_one_copy_of_the_image_per_request_on_the_wire(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The body was spliced (a copy of the image), then joined to the head (another), both
    # held while the request was on the wire: 2 image sizes per request in flight.
    transport = HttpTransport("http://127.0.0.1:9/v1", "sk-test", "TEST_KEY", 5)
    image = EncodedImage.data_url("image/png", IMAGE_BYTES)
    body = {"model": "m", "messages": [{"content": [{"image_url": {"url": IMAGE_SLOT}}]}]}
    sent: list[bytes] = []
    held: list[int] = []

    async def exchange(message: bytes) -> Answer:
        held.append(tracemalloc.get_traced_memory()[0])
        sent.append(message)
        return Answer(200, {}, b'{"choices": []}', keep_alive=True)

    monkeypatch.setattr(transport, "_exchange", exchange)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        assert await transport.post(body, image) == {"choices": []}
    finally:
        tracemalloc.stop()
    assert held[0] - before < 1.5 * len(image.literal)
    spliced = splice_image(to_json(body), image)  # the bytes sent: the same as they were
    assert sent == [
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:9\r\n"
        b"Content-Type: application/json\r\nAccept: application/json\r\n"
        b"Authorization: Bearer sk-test\r\nContent-Length: "
        + str(len(spliced)).encode()
        + b"\r\n\r\n"
        + spliced
    ]
