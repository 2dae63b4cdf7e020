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
until :meth:`JudgeServer.release`, and :meth:`JudgeServer.wait_until` waits for a state.
"""

from __future__ import annotations

import asyncio
import email.utils
import errno
import hashlib
import random
import re
import socket
import time
import unicodedata
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Annotated, Any, Final, Literal, TypeAlias

from aiohttp import web
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic_core import from_json, to_json

from trig_stream.backends.judges.http_errors import RETRY_AFTER_SECONDS, parse_retry_after
from trig_stream.backends.judges.server_probe import url_host
from trig_stream.testing.judge_images import BadRequest, image_bytes, image_url, verify_image
from trig_stream.testing.judge_questions import (
    UnclearDimension,
    dimension_named,
    dimensions_named,
    sized,
    without_dimension,
)
from trig_stream.testing.planted_scores import latent, loadings, rating_logprobs

Fault: TypeAlias = Literal["error", "rate_limit", "hang", "malformed", "missing_logprobs", "reset"]
FAULTS: tuple[Fault, ...] = (
    "error",
    "rate_limit",
    "hang",
    "malformed",
    "missing_logprobs",
    "reset",
)

VERIFIED_IMAGES = 4096
"""Digests of images already verified, kept so the second question about one is cheaper."""
PORT_ATTEMPTS = 8
"""Free ports tried when port 0 must be free on each of a host name's addresses."""
MAX_BODY_BYTES = 64 * 1024**2
"""The largest request body read; a larger one is answered 413."""
Rate = Annotated[float, Field(ge=0, le=1)]


DEFAULT_MODEL: Final = "trig-judge-sim"
"""The model name served when none is given."""


_NEGATIVE_SECONDS: Final = re.compile(r"-\d+(\.\d+)?")
_DAY = "(Mon|Tue|Wed|Thu|Fri|Sat|Sun)"
_WEEKDAY = "(Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday)"
_MONTH = "(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"
_TIME = r"\d\d:\d\d:\d\d"
_HTTP_DATE: Final = re.compile(
    # RFC 9110's three forms: IMF-fixdate and RFC 850, in GMT (a missing or other zone is
    # told apart), and asctime, which has no zone. Four digits of year, but in RFC 850's two.
    rf"(?P<zoned>{_DAY}, \d\d {_MONTH} (?P<year>\d{{4}}) {_TIME}"
    rf"|{_WEEKDAY}, \d\d-{_MONTH}-\d\d {_TIME})"
    rf"(?P<zone> \S+)?|{_DAY} {_MONTH} [ \d]\d {_TIME} (?P<asctime_year>\d{{4}})"
)


def _retry_after(value: str) -> str:
    # What HTTP allows: seconds (not -1, inf or nan), or a date in one of HTTP's three forms;
    # read as the judge reads it, which strips it: the stripped value is what is sent. A
    # control character (a newline pasted in) could not be sent: every 429 dropped its
    # connection instead.
    if any(unicodedata.category(char) == "Cc" for char in value):
        raise ValueError(
            f"{value!r} holds a control character, which no HTTP header may carry; "
            "give seconds (1) or an HTTP date alone"
        )
    if not value.isascii():
        # Sent as UTF-8, which a client reading headers as latin-1 (as HTTP has them) sees
        # as other characters: one judge client waited, another ignored the header.
        raise ValueError(
            f"{value!r} holds a non-ASCII character, which clients read differently; give "
            "seconds in ASCII digits (1) or an HTTP date"
        )
    stripped = value.strip()
    if RETRY_AFTER_SECONDS.fullmatch(stripped):
        return stripped
    if _NEGATIVE_SECONDS.fullmatch(stripped):
        raise ValueError(
            f"{value!r} is negative: Retry-After seconds must be >= 0 (e.g. 1), or give "
            "an HTTP date"
        )
    date = _HTTP_DATE.fullmatch(stripped)
    if date is None:
        if email.utils.parsedate_tz(stripped) is None:
            raise ValueError(f"{value!r} is neither a number of seconds nor an HTTP date")
        # A date the judge may read, which HTTP does not write so (no weekday, one digit
        # for the day): a server sending it is not what a judge is tried against.
        raise ValueError(
            f"{value!r} is not an HTTP date in any of its forms: give seconds (1) or a date "
            "as IMF-fixdate (Sun, 06 Nov 1994 08:49:37 GMT), RFC 850 (Sunday, 06-Nov-94 "
            "08:49:37 GMT) or asctime (Sun Nov  6 08:49:37 1994)"
        )
    if date["zoned"] is not None and date["zone"] != " GMT":
        raise ValueError(
            f"{value!r} has no GMT zone: an HTTP date is in GMT (IMF-fixdate, RFC 850 or "
            "asctime), e.g. Sun, 06 Nov 1994 08:49:37 GMT"
        )
    year = date["year"] or date["asctime_year"]
    read = email.utils.parsedate_tz(stripped)
    if year is not None and read is not None and read[0] != int(year):
        # The judge reads a year below 100 as two digits (0001 as 2001), as email.utils does.
        raise ValueError(
            f"{value!r} has the year {year}, which the judge reads as {read[0]}: give seconds "
            "(1) or an HTTP date in years 0100 to 9999"
        )
    if parse_retry_after({"Retry-After": stripped}) is None:
        raise ValueError(
            f"{value!r} is a date out of range (its day or time): give seconds (1) or an "
            "HTTP date that exists (Sun, 06 Nov 1994 08:49:37 GMT)"
        )
    return stripped


class JudgeServerOptions(BaseModel):
    """How the simulated judge behaves. Fault rates are shares of requests, drawn per request."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    model: str = DEFAULT_MODEL
    """The model name served: in ``/v1/models``, ``/metrics`` and every answer."""
    served_model_only: bool = False
    """Answer a request naming another model with a 404, as vLLM does; else any is served."""
    latency_s: Annotated[float, Field(ge=0)] = 0.0
    """Time each request holds a slot, as inference would."""
    capacity: Annotated[int, Field(ge=1)] = 64
    """Requests processed at once; the rest wait in an unbounded queue, as in vLLM."""
    seed: int = 0
    error_rate: Rate = 0.0
    """Requests answered with a 503."""
    rate_limit_rate: Rate = 0.0
    """Requests answered with a 429 carrying ``Retry-After: retry_after``."""
    retry_after: Annotated[str, AfterValidator(_retry_after)] = "1"
    """The Retry-After header value: seconds, or an HTTP date."""
    hang_rate: Rate = 0.0
    """Requests never answered until the client gives up (or the server stops)."""
    malformed_rate: Rate = 0.0
    """Requests answered 200 with a truncated JSON body."""
    missing_logprobs_rate: Rate = 0.0
    """Requests answered without logprobs."""
    reset_rate: Rate = 0.0
    """Requests whose connection is aborted before any answer."""
    fail_first: Annotated[int, Field(ge=0)] = 0
    """The first this many chat requests are answered with a 503, as by a server that is
    down for a while (an outage counted in requests, not seconds: tests drive it); the fault
    rates apply from the next one on."""
    correlations: dict[str, float] = Field(default_factory=dict)
    """Planted correlations of latent quality by pair, e.g. ``{"IQ-R_TA-C": 0.8}``."""
    api_key: str | None = None
    """When set, requests must carry ``Authorization: Bearer <api_key>``; others get a 401
    whose message quotes the key received, as some providers do."""
    allowed_local_media_path: Path | None = None
    """The folder ``file://`` image URLs must lie in, as vLLM's ``--allowed-local-media-path``;
    without it they are refused with a 400, as vLLM refuses them."""
    record_requests: bool = False
    """Keep every request body in :attr:`JudgeServer.received` (tests)."""

    @model_validator(mode="after")
    def _check(self) -> JudgeServerOptions:
        total = sum(self.fault_rates().values())
        if total > 1.0 + 1e-9:
            raise ValueError(f"fault rates add up to {total:.3f}; they must not exceed 1")
        loadings(self.correlations)
        return self

    def fault_rates(self) -> dict[Fault, float]:
        """The rate of each fault kind."""
        return {
            "error": self.error_rate,
            "rate_limit": self.rate_limit_rate,
            "hang": self.hang_rate,
            "malformed": self.malformed_rate,
            "missing_logprobs": self.missing_logprobs_rate,
            "reset": self.reset_rate,
        }


class ServerStats(BaseModel):
    """What ``GET /stats`` returns."""

    model_config = ConfigDict(extra="forbid")

    received: int = 0
    """Chat requests received, faulty or not."""
    served: int = 0
    """Chat requests answered with a completion."""
    repeated: int = 0
    """Chat requests whose messages equal an earlier request's."""
    rejected: int = 0
    """Chat requests refused as invalid (4xx)."""
    faults: dict[str, int] = Field(default_factory=dict)
    running: int = 0
    waiting: int = 0
    max_running: int = 0
    max_waiting: int = 0
    busy_slot_s: float = 0.0
    """Seconds of slot time taken by requests so far (summed over slots): divided by the
    capacity and a span of time, how full the slots were over it."""


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
            return self._rejected(_error(413, message, "invalid_request_error"))
        try:
            body = from_json(raw)
        except ValueError:
            return self._rejected(
                _error(400, "the request body is not JSON", "invalid_request_error")
            )
        if self.options.record_requests:
            self.received.append(body)
        unauthorised = self._unauthorised(request)
        if unauthorised is not None:
            return self._rejected(unauthorised)
        if not isinstance(body, dict):
            message = "the request body must be a JSON object (a chat completion request)"
            return self._rejected(_error(400, message, "invalid_request_error"))
        # As in vLLM, a request naming no model is served by the served model.
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            message = "'model' must be a string naming the model to use"
            return self._rejected(_error(400, message, "invalid_request_error"))
        if self.options.served_model_only and model not in (None, self.options.model):
            message = f"The model `{model}` does not exist."
            return self._rejected(_error(404, message, "NotFoundError", code=404))
        try:
            digest, image_key, dimension, limit = self._parse(body)
        except BadRequest as exc:
            return self._rejected(_error(400, str(exc), "invalid_request_error"))
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
        answer = self._completion(
            body, image_key, dimension, limit, len(raw), with_logprobs=fault is None
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
        return _error(401, message, "invalid_request_error", code="invalid_api_key")

    async def _models(self, request: web.Request) -> web.Response:
        unauthorised = self._unauthorised(request)
        if unauthorised is not None:
            return unauthorised
        model = {"id": self.options.model, "object": "model", "created": 0, "owned_by": "trig"}
        return web.json_response({"object": "list", "data": [model]})

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="")

    async def _metrics(self, request: web.Request) -> web.Response:
        label = f'{{model_name="{_label_value(self.options.model)}"}}'
        lines = []
        for name, value, meaning in (
            ("running", self._stats.running, "Number of requests currently running."),
            ("waiting", self._stats.waiting, "Number of requests waiting to be processed."),
        ):
            lines += [
                f"# HELP vllm:num_requests_{name} {meaning}",
                f"# TYPE vllm:num_requests_{name} gauge",
                f"vllm:num_requests_{name}{label} {float(value)}",
            ]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    async def _stats_route(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats().model_dump())

    # -- behaviour ----------------------------------------------------------------------------

    def _parse(self, body: dict[str, Any]) -> tuple[bytes, str, str, int]:
        # The messages' digest (for repeats), the image key, the dimension and top_logprobs.
        limit = self._check_options(body)
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
                            f"{_json_kind(text)}: {str(part)[:80]}"
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

    @staticmethod
    def _check_options(body: dict[str, Any]) -> int:
        # The sampling options the answer depends on, checked as vLLM checks them; returns
        # top_logprobs. Accepted and ignored, they gave answers of another shape than asked.
        if body.get("stream") not in (None, False):
            raise BadRequest(
                "'stream': the simulated judge does not stream; send stream false (or leave it out)"
            )
        if body.get("n") not in (None, 1) or isinstance(body.get("n"), bool):
            raise BadRequest(
                "'n': the simulated judge gives one choice; send n 1 (or leave it out)"
            )
        logprobs = body.get("logprobs")
        if logprobs is not None and not isinstance(logprobs, bool):
            raise BadRequest(f"'logprobs' must be true or false, got {_json_kind(logprobs)}")
        limit = body.get("top_logprobs")
        if limit is not None:
            if isinstance(limit, bool) or not isinstance(limit, int) or not 0 <= limit <= 20:
                raise BadRequest("'top_logprobs' must be an integer from 0 to 20")
            if not logprobs:
                raise BadRequest("when using 'top_logprobs', 'logprobs' must be set to true")
        for field in ("max_tokens", "max_completion_tokens"):
            value = body.get(field)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise BadRequest(f"{field!r} must be an integer of at least 1, got {value!r}")
        return limit or 0

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
            return _error(503, "the simulated judge is overloaded", "server_error")
        if fault == "rate_limit":
            response = _error(429, "rate limit reached", "rate_limit_error")
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
            return _error(503, "the simulated judge is shutting down", "server_error")
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

    def _completion(
        self,
        body: dict[str, Any],
        image_key: str,
        dimension: str,
        limit: int,
        size: int,
        *,
        with_logprobs: bool,
    ) -> dict[str, Any]:
        loading = self._loadings.get(dimension)  # type: ignore[call-overload]
        z = latent(image_key, dimension, loading, seed=self.options.seed)
        top = rating_logprobs(z, limit=max(limit, 1))
        token, logprob = top[0]
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
        text = token if max_tokens == 1 else f"{token}."
        logprobs = None
        if with_logprobs and body.get("logprobs"):
            entries = [_token_entry(t, lp) for t, lp in top[:limit]]
            logprobs = {"content": [{**_token_entry(token, logprob), "top_logprobs": entries}]}
        completion_tokens = 1 if max_tokens == 1 else 2
        prompt_tokens = 300 + size // 400  # a stand-in: vLLM would count the real tokens
        return {
            "id": f"chatcmpl-{self._stats.served}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.options.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": logprobs,
                    "finish_reason": "length" if max_tokens == 1 else "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }


def _token_entry(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}


def _error(status: int, message: str, kind: str, *, code: str | int | None = None) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return web.json_response(body, status=status)


def _json_kind(value: object) -> str:
    """What a JSON value is, in JSON's words."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return "a number"


def _label_value(text: str) -> str:
    # Prometheus' text format: a label value escapes backslash, double quote and newline.
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
