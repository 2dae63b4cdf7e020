"""A loopback server for the APIs generator backends call: OpenAI images and chat completions.

``POST /v1/images/generations`` answers with a deterministic PNG (a function of the prompt)
as ``b64_json``; ``POST /v1/chat/completions`` answers with a rewrite of the last user
message. Faults are scripted per request (an HTTP status with an optional Retry-After, a
dropped connection, a slow answer, an undecodable image) so every failure class can be
tested. The server runs its own event loop in a thread, so blocking SDK clients (as generator
worker threads use) and async code can both call it.

Example::

    with GenerationAPIServer(api_key="k") as server:
        server.fail_next(Fault(status=503), Fault(status=429, retry_after=2))
        client = openai.OpenAI(base_url=server.base_url, api_key="k", max_retries=0)
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from aiohttp import web

from trig_stream.hashing import unit_hash
from trig_stream.testing.synthetic import draw


@dataclass(frozen=True, slots=True)
class Fault:
    """How to answer one request instead of normally.

    Attributes:
        status: answer with this HTTP status and an OpenAI-style error body.
        retry_after: the Retry-After header (seconds) to send with ``status``.
        location: the Location header to send with ``status`` (a redirect's).
        reset: drop the connection without answering.
        delay_s: wait this long before answering normally (to trip client timeouts).
        bad_image: answer 200 with image data that is not an image.
        message: the error message (``status`` only).
        code: the error's ``code`` (``status`` only), e.g. ``content_policy_violation``;
            None sends the status.
        trickle_s: answer normally, but send a space (JSON's whitespace) every 50 ms
            for this long before the answer, so that no read waits long while the whole
            answer does.
        oversize: answer normally, after 65 MiB of spaces (over the clients' answer cap).
        not_json: answer 200, ``application/json``, with a body that is no JSON.
    """

    status: int | None = None
    retry_after: float | None = None
    location: str | None = None
    reset: bool = False
    delay_s: float = 0.0
    bad_image: bool = False
    message: str = "scripted failure"
    code: str | None = None
    trickle_s: float = 0.0
    oversize: bool = False
    not_json: bool = False


def default_rewrite(user_text: str) -> str:
    """The chat answer: the last line of the user message, marked as rewritten."""
    return "REWRITTEN: " + user_text.strip().splitlines()[-1]


class GenerationAPIServer:
    """The loopback server; a context manager that starts and stops it.

    Args:
        api_key: the bearer token it accepts; a wrong one gets 401 with the token echoed
            back in the message (as real services partly do), to test that it never leaks.
        image_size: side of the square PNGs it returns.
        rewrite: makes the chat answer from the last user message.

    Attributes:
        requests: (path, JSON body) of every request received, in order.
        base_url: ``http://127.0.0.1:<port>/v1`` once started.
    """

    def __init__(
        self,
        *,
        api_key: str = "test-key",
        image_size: int = 16,
        rewrite: Callable[[str], str] = default_rewrite,
    ) -> None:
        self.api_key = api_key
        self.image_size = image_size
        self.rewrite = rewrite
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.base_url = ""
        self._faults: deque[Fault] = deque()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    def fail_next(self, *faults: Fault) -> None:
        """Answer the next requests (either endpoint) with these faults, in order."""
        with self._lock:
            self._faults.extend(faults)

    def _next_fault(self) -> Fault | None:
        with self._lock:
            return self._faults.popleft() if self._faults else None

    # -- lifetime -----------------------------------------------------------------------------

    def __enter__(self) -> GenerationAPIServer:
        ready = threading.Event()
        loop = asyncio.new_event_loop()
        self._loop = loop

        def serve() -> None:
            asyncio.set_event_loop(loop)
            loop.run_until_complete(self._start())
            ready.set()
            loop.run_forever()

        self._thread = threading.Thread(target=serve, name="generation-api-server", daemon=True)
        self._thread.start()
        if not ready.wait(timeout=30):
            raise RuntimeError("the loopback server did not start")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        loop = self._loop
        if loop is None or self._thread is None:
            return
        asyncio.run_coroutine_threadsafe(self._stop(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(timeout=30)
        loop.close()
        self._loop = None

    async def _start(self) -> None:
        app = web.Application(middlewares=[_answers])
        app.router.add_post("/v1/images/generations", self._images)
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.base_url = f"http://127.0.0.1:{port}/v1"

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # -- handlers -----------------------------------------------------------------------------

    async def _common(self, request: web.Request) -> tuple[dict[str, Any], Fault | None]:
        body = await request.json()
        self.requests.append((request.path, body))
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if token != self.api_key:
            raise _error(401, f"Incorrect API key provided: {token}")
        fault = self._next_fault()
        if fault is None:
            return body, None
        if fault.reset:
            assert request.transport is not None
            request.transport.abort()
            raise _Answer(web.Response(status=500))  # never sent: the connection is gone
        if fault.delay_s:
            await asyncio.sleep(fault.delay_s)
        if fault.status is not None:
            headers = {}
            if fault.retry_after is not None:
                headers["Retry-After"] = f"{fault.retry_after:g}"
            if fault.location is not None:
                headers["Location"] = fault.location
            raise _error(fault.status, fault.message, headers, code=fault.code)
        return body, fault

    async def _images(self, request: web.Request) -> web.StreamResponse:
        body, fault = await self._common(request)
        if fault is not None and fault.bad_image:
            encoded = base64.b64encode(b"not an image").decode()
        else:
            seed = int(unit_hash("image", body.get("prompt", "")) * 2**31)
            buffer = io.BytesIO()
            draw(seed, self.image_size).save(buffer, format="PNG")
            encoded = base64.b64encode(buffer.getvalue()).decode()
        answer = {"created": int(time.time()), "data": [{"b64_json": encoded}]}
        return await _respond(request, answer, fault)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body, fault = await self._common(request)
        users = [m for m in body.get("messages", []) if m.get("role") == "user"]
        content = users[-1]["content"] if users else ""
        answer = self.rewrite(content if isinstance(content, str) else str(content))
        return await _respond(
            request,
            {
                "id": "chatcmpl-loopback",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", ""),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": answer},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            },
            fault,
        )


async def _respond(
    request: web.Request, answer: dict[str, Any], fault: Fault | None
) -> web.StreamResponse:
    """``answer`` as JSON, after what ``fault`` puts before it (``trickle_s``, ``oversize``),
    or instead of it (``not_json``)."""
    if fault is not None and fault.not_json:
        return web.Response(body=b"not json", content_type="application/json")
    if fault is None or not (fault.trickle_s or fault.oversize):
        return web.json_response(answer)
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    await response.prepare(request)
    if fault.oversize:
        spaces = b" " * (1 << 20)
        for _ in range(65):
            await response.write(spaces)
    ends = time.monotonic() + fault.trickle_s
    while time.monotonic() < ends:
        try:
            await response.write(b" ")
        except ConnectionResetError:  # the client gave up: the test's point
            return response
        await asyncio.sleep(0.05)
    await response.write(json.dumps(answer).encode())
    await response.write_eof()
    return response


class _Answer(Exception):
    """Ends a handler early with this response."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__(response.status)
        self.response = response


def _error(
    status: int, message: str, headers: dict[str, str] | None = None, *, code: str | None = None
) -> _Answer:
    body = {"error": {"message": message, "type": "loopback", "code": code or status}}
    return _Answer(web.json_response(body, status=status, headers=headers))


@web.middleware
async def _answers(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except _Answer as answer:
        return answer.response
