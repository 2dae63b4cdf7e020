"""A loopback judge server speaking the OpenAI chat protocol, with injectable faults.

It answers ``POST /v1/chat/completions`` as vLLM does: the first token's top logprobs in
``choices[0].logprobs.content[0].top_logprobs``, the message, ``usage``. Images in the request
(``data:`` URLs, or ``file://`` URLs where ``allowed_local_media_path`` allows them, as in
vLLM) are decoded and checked; a bad one is a 400. The answer is a function of the image and
the dimension the system message names, or else the user text (see
:mod:`trig_stream.testing.judge_questions` and :mod:`trig_stream.testing.planted_scores`), so
planted correlations between dimensions show up in the scores; a question on no clear dimension
is a 400, never scored. A question's subject is known by its images' bytes and its user text
with the dimension's own words taken out (every dimension code, name and built-in criterion,
wherever it stands): the prompt tells apart two samples sent the same bytes (an image shrunk
for ``max_pixels`` loses the text chunk naming its sample; a baseline returns one source image
for several prompts), while a template that names the dimension in its user text still asks
both questions about an image with one latent. A template whose user text holds criteria of its
own (a ``[criteria]`` table) gives them independent latents. Each image and text enters the key
with its length, so two images are never read as their concatenation. Like vLLM it has
``capacity`` slots and queues what does not fit, reporting
``vllm:num_requests_running`` / ``vllm:num_requests_waiting`` on ``GET /metrics``.

Use it from tests as an async context manager (asyncio only, as aiohttp is)::

    async with JudgeServer(JudgeServerOptions(latency_s=0.01)) as server:
        client = AsyncOpenAI(base_url=server.base_url, api_key="unused")

``GET /stats`` (and :meth:`JudgeServer.stats`) counts requests, faults, and repeated requests
(the same messages as an earlier request), which a correct client never sends without a fault.
Tests can build a queue without timing: :meth:`JudgeServer.hold` keeps requests in their slots
until :meth:`JudgeServer.release`, and :meth:`JudgeServer.wait_until` waits for a state. Its
options and counters are :mod:`trig_stream.testing.judge_options`'s; its answers are written by
:mod:`trig_stream.testing.judge_answers`.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import random
import socket
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

from aiohttp import web
from pydantic_core import from_json, to_json

from trig_stream.backends.judges.server_probe import url_host
from trig_stream.backends.judges.templates import json_kind
from trig_stream.testing.judge_answers import completion, error, metrics_text
from trig_stream.testing.judge_images import BadRequest, image_bytes, image_url, verify_image
from trig_stream.testing.judge_options import FAULTS, Fault, JudgeServerOptions, ServerStats
from trig_stream.testing.judge_questions import (
    UnclearDimension,
    check_options,
    dimension_named,
    dimensions_named,
    sized,
    without_dimension,
)
from trig_stream.testing.planted_scores import loadings

VERIFIED_IMAGES = 4096
"""Digests of images already verified, kept so the second question about one is cheaper."""
PORT_ATTEMPTS = 8
"""Free ports tried when port 0 must be free on each of a host name's addresses."""
MAX_BODY_BYTES = 64 * 1024**2
"""The largest request body read; a larger one is answered 413."""


class JudgeServer:
    """The loopback judge server; an async context manager serving on ``host:port``.

    Args:
        options: behaviour and faults.
        host: interface to listen on.
        port: port to listen on; 0 picks a free one (see :attr:`base_url`).
    """

    def __init__(
        self, options: JudgeServerOptions | None = None, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.options = options or JudgeServerOptions()
        self.host = host
        self.port = port
        self.received: list[dict[str, Any]] = []
        self._stats = ServerStats(faults=dict.fromkeys(FAULTS, 0))
        self._loadings = loadings(self.options.correlations)
        self._random = random.Random(self.options.seed)
        self._seen: set[bytes] = set()
        self._verified: dict[bytes, None] = {}
        self._runner: web.AppRunner | None = None
        self._slots: asyncio.Semaphore | None = None
        self._stopping: asyncio.Event | None = None
        self._released: asyncio.Event | None = None
        self._held = False
        self._changed: asyncio.Event | None = None
        self.version = 0
        """Counts changes of the running and waiting requests."""

    @property
    def base_url(self) -> str:
        """The OpenAI base URL of the server (ending in ``/v1``)."""
        return f"http://{url_host(self.host)}:{self.port}/v1"

    def stats(self) -> ServerStats:
        """A snapshot of the counters."""
        return self._stats.model_copy(deep=True)

    def hold(self) -> None:
        """Keep every request that gets a slot in it until :meth:`release`; more queue."""
        self._held = True
        if self._released is not None:
            self._released.clear()

    def release(self) -> None:
        """Let held requests finish and stop holding new ones."""
        self._held = False
        if self._released is not None:
            self._released.set()

    async def wait_until(self, predicate: Callable[[ServerStats], bool]) -> ServerStats:
        """Wait until the counters satisfy ``predicate``; returns them then."""
        while True:
            changed = self._changed
            assert changed is not None, "the server is not running"
            if predicate(self._stats):
                return self.stats()
            await changed.wait()

    async def wait_for_change(self, seen: int) -> int:
        """Wait until :attr:`version` is past ``seen``; returns the new version."""
        while self.version <= seen:
            assert self._changed is not None, "the server is not running"
            await self._changed.wait()
        return self.version

    def _notify(self) -> None:
        self.version += 1
        changed, self._changed = self._changed, asyncio.Event()
        if changed is not None:
            changed.set()

    async def __aenter__(self) -> JudgeServer:
        self._slots = asyncio.Semaphore(self.options.capacity)
        self._stopping = asyncio.Event()
        self._released = asyncio.Event()
        if not self._held:
            self._released.set()
        self._changed = asyncio.Event()
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/stats", self._stats_route)
        # Handlers are cancelled when their client goes away, so a hung request ends with
        # its connection; the short shutdown timeout bounds what a stop waits for.
        self._runner = web.AppRunner(
            app, handler_cancellation=True, shutdown_timeout=0.25, access_log=None
        )
        await self._runner.setup()
        await self._listen(self._runner)
        return self

    async def _listen(self, runner: web.AppRunner) -> None:
        # A name may stand for several addresses (localhost: ::1 and 127.0.0.1). Given
        # port 0, each would get its own free port and base_url would name one of them: the
        # first address picks the port, and the others listen on that one.
        if self.port != 0:
            await web.TCPSite(runner, self.host, self.port).start()
            return
        found = await asyncio.get_running_loop().getaddrinfo(
            self.host, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        addresses = list(dict.fromkeys(str(info[4][0]) for info in found))
        for attempt in range(PORT_ATTEMPTS):
            first = web.TCPSite(runner, addresses[0], 0)
            await first.start()
            port = int(runner.addresses[-1][1])
            started = [first]
            try:
                for address in addresses[1:]:
                    site = web.TCPSite(runner, address, port)
                    await site.start()
                    started.append(site)
            except OSError as exc:
                # The port is free on the first address but taken on another: try another.
                for site in started:
                    await site.stop()
                if exc.errno != errno.EADDRINUSE or attempt == PORT_ATTEMPTS - 1:
                    raise
                continue
            self.port = port
            return

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Release hung requests and stop serving; safe to call more than once."""
        if self._stopping is not None:
            self._stopping.set()
        if self._released is not None:
            self._released.set()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    # -- routes -------------------------------------------------------------------------------

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        # Every counter update is followed by _notify(): wait_until() waits on any of them.
        stats = self._stats
        stats.received += 1
        self._notify()
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:  # aiohttp's own answer is plain text
            message = (
                f"the request body is over {MAX_BODY_BYTES // 1024**2} MiB; send smaller "
                "images (the judge's max_pixels shrinks them)"
            )
            return self._rejected(error(413, message, "invalid_request_error"))
        try:
            body = from_json(raw)
        except ValueError:
            return self._rejected(
                error(400, "the request body is not JSON", "invalid_request_error")
            )
        if self.options.record_requests:
            self.received.append(body)
        unauthorised = self._unauthorised(request)
        if unauthorised is not None:
            return self._rejected(unauthorised)
        if not isinstance(body, dict):
            message = "the request body must be a JSON object (a chat completion request)"
            return self._rejected(error(400, message, "invalid_request_error"))
        # As in vLLM, a request naming no model is served by the served model.
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            message = "'model' must be a string naming the model to use"
            return self._rejected(error(400, message, "invalid_request_error"))
        if self.options.served_model_only and model not in (None, self.options.model):
            message = f"The model `{model}` does not exist."
            return self._rejected(error(404, message, "NotFoundError", code=404))
        try:
            digest, image_key, dimension, limit = self._parse(body)
        except BadRequest as exc:
            return self._rejected(error(400, str(exc), "invalid_request_error"))
        if digest in self._seen:
            stats.repeated += 1
        self._seen.add(digest)

        fault: Fault | None = (
            "error" if stats.received <= self.options.fail_first else self._draw_fault()
        )
        if fault is not None:
            stats.faults[fault] += 1
            self._notify()
            early = await self._fault(fault, request)
            if early is not None:
                return early
        await self._occupy_slot()
        stats.served += 1
        self._notify()
        # pydantic_core's encoder: ~4x less CPU than the json module's for an answer, and
        # this one process serves every request of a benchmark.
        answer = completion(
            body,
            image_key,
            dimension,
            limit,
            len(raw),
            options=self.options,
            loadings=self._loadings,
            served=stats.served,
            with_logprobs=fault is None,
        )
        return web.Response(body=to_json(answer), content_type="application/json")

    def _rejected(self, response: web.Response) -> web.Response:
        self._stats.rejected += 1
        self._notify()
        return response

    def _unauthorised(self, request: web.Request) -> web.Response | None:
        # The 401 vLLM answers (every /v1 route) when an API key is set and not sent.
        if self.options.api_key is None:
            return None
        sent = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if sent == self.options.api_key:
            return None
        message = f"Incorrect API key provided: {sent}."
        return error(401, message, "invalid_request_error", code="invalid_api_key")

    async def _models(self, request: web.Request) -> web.Response:
        unauthorised = self._unauthorised(request)
        if unauthorised is not None:
            return unauthorised
        model = {"id": self.options.model, "object": "model", "created": 0, "owned_by": "trig"}
        return web.json_response({"object": "list", "data": [model]})

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="")

    async def _metrics(self, request: web.Request) -> web.Response:
        text = metrics_text(self.options.model, self._stats)
        return web.Response(text=text, content_type="text/plain")

    async def _stats_route(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats().model_dump())

    # -- behaviour ----------------------------------------------------------------------------

    def _parse(self, body: dict[str, Any]) -> tuple[bytes, str, str, int]:
        # The messages' digest (for repeats), the image key, the dimension and top_logprobs.
        limit = check_options(body)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' must be a non-empty list of chat messages")
        subject = hashlib.sha256()
        digest = hashlib.sha256()
        user_texts: list[str] = []
        system = ""
        for message in messages:
            content = message.get("content") if isinstance(message, dict) else None
            parts = [content] if isinstance(content, str) else content
            if not isinstance(parts, list):
                raise BadRequest("every message needs a 'content' string or list of parts")
            for part in parts:
                text = part if isinstance(part, str) else None
                if isinstance(part, dict) and part.get("type") == "text":
                    text = part.get("text")
                    if not isinstance(text, str):
                        raise BadRequest(
                            "a text part's 'text' must be a string, got "
                            f"{json_kind(text)}: {str(part)[:80]}"
                        )
                role = str(message.get("role"))
                if text is not None:
                    if role == "system":
                        system += text
                    else:
                        user_texts.append(text)
                        subject.update(sized(b"text", without_dimension(text).encode()))
                    digest.update(f"\x00{role}\x00text\x00{len(text)}\x00{text}".encode())
                elif isinstance(part, dict) and part.get("type") == "image_url":
                    url = image_url(part.get("image_url"))
                    image, key = self._checked_image(url)
                    subject.update(sized(b"image", image))
                    # A file is named by its URL, a data URL by its content's digest.
                    named = url.encode() if url.startswith("file:") else key
                    digest.update(f"\x00{role}\x00image\x00".encode() + named)
                else:
                    raise BadRequest(f"unsupported content part: {str(part)[:80]}")
        # The images and the user text without the dimension's words (see the module's
        # docstring): both questions about an image share a latent, two prompts do not.
        image_key = subject.hexdigest()
        # The system text names the dimension, or else a user text does (a template may put
        # it in its user_prefix); a question on no clear dimension is refused, not scored.
        asked = system if dimensions_named(system) else " ".join(user_texts)
        try:
            dimension = dimension_named(asked)
        except UnclearDimension as exc:
            raise BadRequest(str(exc)) from None
        return digest.digest(), image_key, dimension, limit

    def _checked_image(self, url: str) -> tuple[bytes, bytes]:
        # The image's bytes and digest. Each image is asked about on two dimensions:
        # it is decoded and verified once.
        data = image_bytes(url, self.options.allowed_local_media_path)
        key = hashlib.sha256(data).digest()
        if key not in self._verified:
            verify_image(data)
            if len(self._verified) >= VERIFIED_IMAGES:
                self._verified.pop(next(iter(self._verified)))
            self._verified[key] = None
        return data, key

    def _draw_fault(self) -> Fault | None:
        draw = self._random.random()
        edge = 0.0
        for fault, rate in self.options.fault_rates().items():
            edge += rate
            if draw < edge:
                return fault
        return None

    async def _fault(self, fault: Fault, request: web.Request) -> web.StreamResponse | None:
        if fault == "error":
            return error(503, "the simulated judge is overloaded", "server_error")
        if fault == "rate_limit":
            response = error(429, "rate limit reached", "rate_limit_error")
            response.headers["Retry-After"] = self.options.retry_after
            return response
        if fault == "malformed":
            return web.Response(
                text='{"id": "chatcmpl-broken", "choices": [{"index": 0, "mess',
                content_type="application/json",
            )
        if fault == "reset":
            if request.transport is not None:
                request.transport.abort()
            raise asyncio.CancelledError  # nothing more can be said on this connection
        if fault == "hang":
            assert self._stopping is not None
            await self._stopping.wait()
            return error(503, "the simulated judge is shutting down", "server_error")
        return None  # missing_logprobs: answered normally, minus the logprobs

    async def _occupy_slot(self) -> None:
        assert self._slots is not None
        stats = self._stats
        if self._slots.locked():  # every slot is taken: this request queues, as in vLLM
            stats.waiting += 1
            stats.max_waiting = max(stats.max_waiting, stats.waiting)
            self._notify()
            try:
                await self._slots.acquire()
            finally:  # acquired, or its client gave up while it queued
                stats.waiting -= 1
                self._notify()
        else:
            await self._slots.acquire()
        stats.running += 1
        stats.max_running = max(stats.max_running, stats.running)
        self._notify()
        taken = time.perf_counter()
        try:
            assert self._released is not None
            await self._released.wait()
            if self.options.latency_s:
                await asyncio.sleep(self.options.latency_s)
        finally:
            stats.busy_slot_s += time.perf_counter() - taken
            stats.running -= 1
            self._slots.release()
            self._notify()
