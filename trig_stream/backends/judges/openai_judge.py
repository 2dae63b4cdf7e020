"""The ``openai`` judge: TRIGScore from any OpenAI-compatible chat endpoint (vLLM, OpenAI).

One request per (image, dimension): ``logprobs`` on, ``top_logprobs`` alternatives of the
first token, ``max_tokens = 1`` since only that token is read. Each image is read and encoded
once (:meth:`OpenAIJudge.prepare`) and shared by its dimension requests. Requests go out
through trig-stream's own small HTTP/1.1 client (``client = "http"``), a plain aiohttp session
(``"aiohttp"``) or ``openai.AsyncOpenAI`` (``"sdk"``); see
:mod:`~trig_stream.backends.judges.transports` for the difference. None retries on its own:
the engine owns retries, so they never compound.

Several ``base_urls`` serving the same model share the load: each request goes to the endpoint
with the fewest requests in flight, of those not resting after a failure or a 429 (see
``_Endpoint``).
Instead of a URL, ``serve`` starts the server for the run (see
:mod:`~trig_stream.backends.judges.managed_server`). For adaptive concurrency the judge
reads vLLM's queue gauges from ``/metrics`` beside each base URL (:meth:`OpenAIJudge.
server_load`). The API key is read from the environment variable that
``api_key_env`` names; the key itself never appears in the config, the fingerprint, an error
message or a log line.

Example config::

    [[judges]]
    backend = "openai"
    concurrency = 64
    options = { base_url = "http://127.0.0.1:8000/v1", model = "Qwen/Qwen2.5-VL-7B-Instruct" }
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, Field, field_validator, model_validator

from trig_stream.backends.api_keys import key_from_env
from trig_stream.backends.base import (
    Judge,
    JudgeReply,
    JudgeRequest,
    PreparedImage,
    ServerLoad,
)
from trig_stream.backends.judges.http_errors import CONTENT_REFUSAL, REFUSALS_TO_STOP
from trig_stream.backends.judges.managed_server import ManagedServer, ServeOptions
from trig_stream.backends.judges.payloads import cut_by_filter, encode_image, reply_of
from trig_stream.backends.judges.server_probe import (
    read_load,
    request_target,
    server_root,
    url_host,
)
from trig_stream.backends.judges.templates import JudgeTemplate
from trig_stream.backends.judges.transports import (
    IMAGE_SLOT,
    Client,
    EncodedImage,
    Transport,
    open_transport,
)
from trig_stream.config_fields import (
    OPTIONS_CONFIG,
    CallTimeout,
    EnvVarName,
    HttpUrl,
    ServedModel,
    ascii_host,
)
from trig_stream.errors import (
    AnswerTimeoutError,
    BackendError,
    FatalBackendError,
    ItemError,
    NotFoundError,
    RateLimitError,
    RetryableError,
    UnreachableError,
)
from trig_stream.files import real_path
from trig_stream.records import JudgeFingerprint
from trig_stream.retry import RETRY_AFTER_MAX_S
from trig_stream.scoring import SCORING_RULES, Scorer

METRICS_TIMEOUT_S = 5.0
"""How long one read of a server's ``/metrics`` may take."""


logger = logging.getLogger(__name__)

REST_FIRST_S = 0.5
REST_MAX_S = 30.0
"""How long an endpoint rests after a transient failure: the first, and at most."""
REST_DOUBLINGS = math.ceil(math.log2(REST_MAX_S / REST_FIRST_S))
"""Failures in a row after which the rest is :data:`REST_MAX_S`: the doubling stops there (at
1,025 failures in a row, ``2 ** 1024`` overflowed a float, and every request failed)."""

NOT_FOUND_TO_LOSE = 32
"""404s with no success between, once a request to the endpoint has succeeded, after which it
no longer serves the model (a server restarted with another). Far more than
:data:`~trig_stream.backends.judges.http_errors.REFUSALS_TO_STOP`: behind a proxy where one
replica lost the model (a LoRA adapter), about half the requests are 404s, and 8 in a row
somewhere in thousands of requests is near certain; 32 at a 50% rate over 10,000 requests
comes about once in 500,000 runs."""


class OpenAIJudgeOptions(BaseModel):
    """``options`` of the ``openai`` judge."""

    model_config = OPTIONS_CONFIG

    base_url: HttpUrl | None = None
    """The endpoint, e.g. ``http://127.0.0.1:8000/v1``."""
    base_urls: list[HttpUrl] = Field(default_factory=list)
    """Several endpoints of the same model; requests go to the least busy one."""
    model: ServedModel
    """The served model's name (vLLM's ``--served-model-name``)."""
    api_key_env: EnvVarName | None = None
    """NAME of the environment variable holding the key; unset for a keyless local server."""
    top_logprobs: Annotated[int, Field(ge=0, le=20)] = 20
    temperature: Annotated[float, Field(ge=0)] = 1.0
    seed: Annotated[int, Field(ge=-(2**63), le=2**63 - 1)] | None = None
    """Sent when set: a signed 64-bit integer, as vLLM takes (it refuses every request with
    another)."""
    max_tokens: Annotated[int, Field(ge=1)] = 1
    timeout_s: CallTimeout = 60.0
    max_pixels: Annotated[int, Field(ge=64)] | None = None
    """Shrink larger images to this many pixels (keeping their shape) before sending."""
    image_mode: Literal["base64", "file"] = "base64"
    """``file`` sends ``file://`` URLs, for a vLLM started with ``--allowed-local-media-path``."""
    client: Client = "http"
    """How requests are sent: ``http`` (least CPU per request), ``aiohttp`` or ``sdk``
    (``AsyncOpenAI``)."""
    template: Path | None = None
    """A TOML or JSON file replacing some or all of the built-in judging texts."""
    serve: ServeOptions | None = None
    """Start this server for the run and judge with it (instead of a base URL)."""

    @field_validator("base_urls")
    @classmethod
    def _each_endpoint_once(cls, urls: list[str]) -> list[str]:
        seen: dict[str, int] = {}
        for index, url in enumerate(urls):
            first = seen.setdefault(same_endpoint_key(url), index)
            if first != index:
                # Listed twice, its queue was read and counted twice (the adaptive limit cut
                # early) and it drew twice the share of requests.
                raise ValueError(
                    f"base_urls[{first}] ({urls[first]!r}) and base_urls[{index}] ({url!r}) "
                    "are the same endpoint as requests write it (a host in IDNA, a path "
                    "percent-encoded, case and a trailing '/' aside): list each server once"
                )
        return urls

    @model_validator(mode="after")
    def _check(self) -> OpenAIJudgeOptions:
        sources = (self.base_url is not None) + bool(self.base_urls) + (self.serve is not None)
        if sources != 1:
            raise ValueError("set exactly one of base_url and base_urls, or serve instead")
        if self.image_mode == "file" and self.max_pixels is not None:
            raise ValueError("max_pixels needs image_mode = 'base64' (files are sent as they are)")
        return self

    @property
    def endpoints(self) -> list[str]:
        """Every base URL configured (none with ``serve``: its URL is known once started)."""
        return [self.base_url] if self.base_url is not None else list(self.base_urls)


DEFAULT_PORTS = {"http": 80, "https": 443}
"""The port a URL of each scheme names when it names none."""


def same_endpoint_key(url: str) -> str:
    """``url`` as every spelling of its endpoint that a request writes alike shares it: the
    scheme in lower case, the host as a request writes it (in lower case, a name in another
    script in IDNA), the scheme's default port left out, the path percent-encoded in UTF-8
    with upper-case escapes, without a trailing ``/`` (``http://VÉ.example:80/v1/`` is
    ``http://xn--v-bga.example/v1``).

    Raises:
        ValueError: the host is a name that IDNA cannot write.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    netloc = url_host(ascii_host(parts.hostname or ""))
    if parts.port is not None and parts.port != DEFAULT_PORTS.get(scheme):
        netloc += f":{parts.port}"
    # A server decodes %c3 as %C3: one path.
    path = _ESCAPE.sub(lambda escape: escape[0].upper(), request_target(parts.path.rstrip("/")))
    return f"{scheme}://{netloc}{path}"


_ESCAPE = re.compile("%[0-9a-fA-F]{2}")


class Secret:
    """An API key that prints as ``***``, so no repr, log or traceback shows it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The key itself, for the client only."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__


@dataclass(slots=True)
class _Endpoint:
    """One base URL: its transport, its requests in flight, and what its first answers said.

    Until a request to it succeeds, an endpoint's failures may be the config's rather than the
    requests': then every request would fail the same way, and the run stops instead of making
    every image for an error judgement. That is a 404 (no such path or model), eight refusals
    (4xx) in a row, or eight answers in a row without logprobs or with fewer top logprobs than
    asked. After the first success (or the first answer with as many top logprobs as asked)
    each such failure is its own request's: an answer with fewer is an error judgement that
    says how many it held.
    Yet :data:`NOT_FOUND_TO_LOSE` 404s in a row after a success make the endpoint lost: the
    server no longer serves the model (restarted with another). A lost endpoint gets no request
    while another is not lost; when every endpoint is lost, the run stops, since every request
    left would fail alike. A success (of a request in flight) finds it again.

    A transient failure (no connection, a timeout, a 5xx) rests the endpoint for a while: 0.5 s,
    doubling with each failure in a row up to 30 s. A resting endpoint gets no request while
    another does not rest, so one that is down does not draw the requests that the least busy
    rule would give it (a refused connection leaves it the least busy of all); of endpoints as
    busy, the one whose latest failure is oldest gets the request. A 429, or a 5xx, 408 or 409
    with a Retry-After, rests it alike, and at least as long as its Retry-After asks (up to
    :data:`~trig_stream.retry.RETRY_AFTER_MAX_S`), which a success meanwhile does not end: a
    429 is answered at once, so a rate-limited endpoint would be the least busy too.
    """

    transport: Transport
    model: str
    file_urls: bool = False
    """Whether its requests carry ``file://`` URLs (``image_mode = "file"``)."""
    served: bool = False
    """Whether it is the server ``serve`` started (no ``base_url`` to check)."""
    in_flight: int = 0
    failures: int = 0
    """Transient failures in a row."""
    failed_at: float = -math.inf
    """When (the judge's clock) its latest transient failure or 429 came."""
    rests_until: float = 0.0
    """Until when (the judge's clock) it gets no request while another endpoint can take it."""
    limited_until: float = 0.0
    """Until when its latest Retry-After asked for no request (the judge's clock)."""
    unreached: bool = False
    """Whether a request to it has got no answer at all (an UnreachableError)."""
    answered: bool = False
    """Whether a request to it has succeeded: its path and model are right."""
    refused: int = 0
    """Requests it refused (4xx) before any succeeded."""
    not_found: int = 0
    """404s since its latest success, once one has succeeded."""
    lost: bool = False
    """Whether :data:`NOT_FOUND_TO_LOSE` 404s came with no success between: it no longer
    serves the model."""
    scored: bool = False
    """Whether an answer of it has carried logprobs."""
    unscored: int = 0
    """Answers without logprobs, or with fewer top logprobs than asked, before the first
    with as many as asked."""
    cut_to: int | None = None
    """How many top logprobs the latest answer that held fewer than asked held."""

    def refusal(self, error: ItemError, image: EncodedImage) -> FatalBackendError | None:
        """The run-stopping error ``error`` (a 4xx refusing a request about ``image``) stands
        for, or None if it is the request's."""
        if self.answered:
            return self._lost(error) if isinstance(error, NotFoundError) else None
        if isinstance(error, NotFoundError):  # no content filter answers 404
            check = "serve.command's served model name" if self.served else None
            return error.before_any_success(model=self.model, check=check)
        if self._content_refusal(error.server_said, image):
            # A content filter refuses images one by one (a run of TRIG's toxicity samples
            # can set it off many times in a row): never the config's fault.
            return None
        self.refused += 1
        if self.refused < REFUSALS_TO_STOP:
            return None
        # Every answer so far a refusal: the requests, not the images, are at fault.
        limits = (
            "top_logprobs against --max-logprobs, max_tokens and max_pixels against the "
            "model's context"
        )
        if self.file_urls:
            limits += (
                ", image_mode = 'file' against --allowed-local-media-path (a folder "
                "that holds the run's images)"
            )
        return FatalBackendError(
            f"{error}; the first {self.refused} answers of this endpoint were refusals and "
            f"none succeeded: check the judge's options against the server's limits ({limits}); "
            "the refused ones are kept as errors: resume with --retry-errors to ask again"
        )

    def _content_refusal(self, said: str, image: EncodedImage) -> bool:
        """Whether what the server said reads as a content filter's refusal.

        Only the server's own words are read: its message is quoted with the endpoint's URL,
        which may hold "/safety/", and a server may quote the request back (a model
        "...-Judge"; a ``file://`` image's path, in a run directory named "safety-r7").
        A refusal naming ``--allowed-local-media-path`` refuses the URL, whatever its
        folders are called.
        """
        if self.file_urls:
            if "allowed-local-media-path" in said:
                return False
            url = image.url  # a file:// URL, short (a data: URL is left unread: megabytes)
            for quoted in (url, unquote(urlsplit(url).path)):
                said = said.replace(quoted, " ")
        return CONTENT_REFUSAL.search(said) is not None

    def _lost(self, error: NotFoundError) -> FatalBackendError | None:
        # A 404 after a success: its request's, unless 404s now come one after another (the
        # server restarted serving another model, or another took its port): every image
        # left would become an error judgement in seconds.
        self.not_found += 1
        if self.not_found < NOT_FOUND_TO_LOSE:
            return None
        self.lost = True
        return FatalBackendError(
            f"{error}; the last {self.not_found} answers of this endpoint were 404s, though "
            f"requests to it had succeeded: it no longer serves model {self.model!r} at this "
            "path (a server restarted with another model, or another server on its port?): "
            "check the server, then resume the run with --retry-errors to ask again about "
            "the 404s (kept as errors)"
        )

    def failed(self, now: float) -> None:
        """A transient failure: rest a while longer each time in a row."""
        self.failures += 1
        self.failed_at = now
        doublings = min(self.failures - 1, REST_DOUBLINGS)
        self.rests_until = now + min(REST_MAX_S, REST_FIRST_S * 2**doublings)

    def rate_limited(self, now: float, retry_after: float | None) -> None:
        """A 429 (or a 5xx with a Retry-After): rest as after a failure, and until its
        Retry-After has passed."""
        self.failed(now)
        if retry_after is not None:
            until = now + min(retry_after, RETRY_AFTER_MAX_S)
            self.limited_until = max(self.limited_until, until)

    def awake_at(self) -> float:
        """When it may get requests again while another endpoint can take them."""
        return max(self.rests_until, self.limited_until)

    def answer(
        self, reply: JudgeReply, completion: Any, *, asked: int
    ) -> FatalBackendError | ItemError | None:
        """The error a successful answer stands for: one that stops the run, the request's
        own (a list of fewer top logprobs than the ``asked``), or None (the usual)."""
        self.answered = True
        self.not_found = 0
        self.lost = False
        self.failures = 0
        self.rests_until = 0.0
        top = reply.top_logprobs
        if top is not None and len(top) >= asked:
            self.scored = True
            return None
        # A list cut short is no answer to score: the ratings missing from it would count as
        # improbable, a confident score from what the server left out. (vLLM and OpenAI
        # return as many as asked: at most 20, far below any vocabulary's size.)
        cut = None
        if top is not None:
            self.cut_to = len(top)
            cut = ItemError(
                f"judge at {self.transport.url}: answered {_top_logprobs(len(top))} of the "
                f"{asked} asked: a cut list is not scored; resume with --retry-errors to ask "
                "again"
            )
        if self.scored or cut_by_filter(completion):
            return cut
        self.unscored += 1
        if self.unscored < REFUSALS_TO_STOP:
            return cut
        if self.cut_to is not None:
            return FatalBackendError(
                f"judge at {self.transport.url}: its first {self.unscored} answers all came "
                f"with fewer top logprobs than the {asked} asked, or without logprobs (the "
                f"latest cut one answered {_top_logprobs(self.cut_to)}): this server cuts the "
                f"list (for this model, {self.model!r}), and TRIGScore is read from it; fix "
                "or replace the server (some always return one fewer than asked, whatever is "
                "asked: lmdeploy has); asking for fewer with the judge's top_logprobs helps "
                "only if the server then returns as many as asked"
            )
        # A server that drops the option (some OpenAI-compatible ones do).
        return FatalBackendError(
            f"judge at {self.transport.url}: its first {self.unscored} answers all came without "
            f"logprobs: this server does not return them (for this model, {self.model!r}), and "
            "TRIGScore is read from them"
        )


def _top_logprobs(count: int) -> str:
    return f"{count} top logprob{'s' * (count != 1)}"


class OpenAIJudge(Judge):
    """A VLM judge behind OpenAI-compatible chat completion endpoints.

    Args:
        name: the metric's name in the run.
        options: the backend's options.
        concurrency: the most requests in flight, over all endpoints.
        scorer: ``"trig"`` or ``"robust"``.
        confidence: weight scores by the top rating's probability.
    """

    Options = OpenAIJudgeOptions
    options: OpenAIJudgeOptions

    def __init__(
        self,
        name: str,
        options: OpenAIJudgeOptions,
        *,
        concurrency: int = 16,
        scorer: Scorer = "robust",
        confidence: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(
            name, options, concurrency=concurrency, scorer=scorer, confidence=confidence
        )
        self._clock = clock
        self.template = JudgeTemplate.chosen(options.template)
        self._endpoints: list[_Endpoint] = []
        self._secret: Secret | None = None
        self.server: ManagedServer | None = None
        """The server started for ``serve``, while the judge is open."""
        self._key_source = (
            f"the environment variable {options.api_key_env}"
            if options.api_key_env
            else "api_key_env (no key is configured)"
        )

    def __repr__(self) -> str:
        return f"OpenAIJudge(name={self.name!r}, model={self.options.model!r})"

    def fingerprint(self) -> JudgeFingerprint:
        opts = self.options
        return JudgeFingerprint(
            backend="openai",
            model=opts.model,
            template_version=self.template.version,
            scorer=self.scorer,
            confidence=self.confidence,
            params={
                "scoring_rules": SCORING_RULES,
                "top_logprobs": opts.top_logprobs,
                "temperature": opts.temperature,
                "seed": opts.seed,
                "max_tokens": opts.max_tokens,
                "max_pixels": opts.max_pixels,
                "image_mode": opts.image_mode,
            },
        )

    def check_environment(self) -> None:
        """The API key's variable is set (if it names one), the ``serve`` table holds no key
        (it is saved with the run), its command runs, and on an address of this machine.

        Its port is not looked at here: a run checks the environment before it opens its run
        directory, and the server of a run still going there holds the port, which would hide
        the run's own refusal ("in use by another trig-stream process"). The server's start
        checks it; ``validate`` calls :meth:`check_serve_port` once the run directory passed.
        """
        key = self._key()
        if self.options.serve is not None:
            server = ManagedServer(self.options.serve, name=self.name, secrets=[key or ""])
            server.check_secrets_left_out()
            server.check_command()
            server.check_host()

    def check_serve_port(self) -> None:
        """Refuse a fixed ``serve.port`` something already listens on, as the server's start
        would (``trig-stream validate``; nothing listens, nothing starts). No ``serve`` table,
        or port 0, passes.

        Raises:
            FatalBackendError: the port is taken, in the start's words.
        """
        if self.options.serve is not None:
            ManagedServer(self.options.serve, name=self.name).check_port()

    def opening(self) -> str:
        serve = self.options.serve
        if serve is None:
            return "connecting"
        command = " ".join(serve.command).replace("{port}", str(serve.port or "<free port>"))
        return f"starting its server `{command}`, until GET /health answers"

    def closing(self) -> str | None:
        server = self.server
        return None if server is None else server.closing()

    def _key(self) -> str | None:
        return key_from_env(self.options.api_key_env or "", owner=f"judge {self.name!r}")

    def opens_slowly(self) -> bool:
        return self.options.serve is not None  # a server started, a model loaded

    async def open(self) -> None:
        """Start the ``serve`` server if any, then create one transport per endpoint.

        Raises:
            FatalBackendError: the event loop is not asyncio's, ``api_key_env`` names a
                variable that is not set, or the ``serve`` server cannot start or is not
                ready in time.
        """
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # every transport is built on asyncio
            raise FatalBackendError(
                f"judge {self.name!r}: the openai backend runs on asyncio only; run the engine "
                "with anyio's asyncio backend"
            ) from None
        key = self._key()
        if key is not None:
            self._secret = Secret(key)
        urls = self.options.endpoints
        if self.options.serve is not None:
            self.server = ManagedServer(
                self.options.serve,
                name=self.name,
                secrets=[self._secret.reveal()] if self._secret else [],
            )
            urls = [await self.server.start()]
        for url in urls:
            transport = open_transport(
                self.options.client,
                url,
                secret=self._secret.reveal() if self._secret else None,
                key_source=self._key_source,
                timeout_s=self.options.timeout_s,
            )
            self._endpoints.append(
                _Endpoint(
                    transport,
                    self.options.model,
                    self.options.image_mode == "file",
                    served=self.server is not None,
                )
            )

    def stop_now(self) -> None:
        """A hard stop: the server started for ``serve`` is killed at once, not given
        ``stop_timeout_s`` (also while it is being stopped already)."""
        if self.server is not None:
            self.server.stop_now()

    async def aclose(self) -> None:
        endpoints, self._endpoints = self._endpoints, []
        try:
            for endpoint in endpoints:
                await endpoint.transport.aclose()
        finally:
            server = self.server
            if server is not None:
                try:
                    await server.aclose()
                finally:
                    self.server = None  # only now: a stop_now() meanwhile must reach it

    async def server_load(self) -> ServerLoad | None:
        """vLLM's running and waiting requests, summed over the servers that report them.

        Each server is read once, however many base URLs lead to it (``/metrics`` sits at its
        root); one that cannot say its load leaves out its own share only.
        """
        roots = dict.fromkeys(
            same_endpoint_key(server_root(endpoint.transport.url))
            for endpoint in list(self._endpoints)
        )
        known: list[ServerLoad] = []
        for root in roots:
            try:
                load = await read_load(root, timeout_s=METRICS_TIMEOUT_S)
            except Exception:  # a bug of the probe: this server's load is unknown, not all
                load = None
            if load is not None:
                known.append(load)
        if not known:
            return None
        return ServerLoad(
            running=sum(load.running for load in known),
            waiting=sum(load.waiting for load in known),
        )

    def connections(self, in_flight: int) -> int:
        # A connection per request in flight, and one per endpoint for its /metrics.
        return in_flight + max(1, len(self.options.endpoints))

    def prepare(self, path: Path) -> PreparedImage:
        """Read the image once and encode it for every request about it (a worker thread).

        Raises:
            ItemError: the file cannot be read or is not an image.
        """
        if self.options.image_mode == "file":
            if not path.is_file():
                raise ItemError(f"image {path} does not exist")
            return PreparedImage(path=path, payload=EncodedImage.of(real_path(path).as_uri()))
        return PreparedImage(path=path, payload=encode_image(path, self.options.max_pixels))

    def messages(self, request: JudgeRequest, image_url: str) -> list[dict[str, Any]]:
        """The chat messages of one (image, dimension) question."""
        sample = request.sample
        template = self.template
        return [
            {
                "role": "system",
                "content": template.system_text(sample.task, request.dimension, sample.item),
            },
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": image_url}},
                    {
                        "type": "text",
                        "text": template.user_text(
                            sample.task, request.dimension, sample.prompt, sample.item
                        ),
                    },
                ],
            },
        ]

    async def judge(self, request: JudgeRequest) -> JudgeReply:
        if not self._endpoints:
            raise RuntimeError("the judge is not open: call open() first")
        payload = request.image.payload
        if not isinstance(payload, EncodedImage):
            raise ItemError(f"image {request.image.path} was not prepared by this judge")
        if self.server is not None:
            # The command's own process has exited: even if a process it started still
            # answers, it is a server out of our hands (see ManagedServer.failure).
            failure = self.server.failure()
            if failure is not None:
                raise failure
        endpoint = self._pick()
        endpoint.in_flight += 1
        try:
            completion = await endpoint.transport.post(self._body(request), payload)
        except ItemError as exc:  # a 4xx, a 404 (NotFoundError) included
            was_lost = endpoint.lost
            fatal = endpoint.refusal(exc, payload)
            if fatal is None:
                raise
            if not endpoint.lost:  # before any success: the config's fault
                raise fatal from None
            if any(not e.lost for e in self._endpoints):
                if not was_lost:
                    logger.warning(
                        "%s; it gets no more requests while another endpoint serves the model "
                        "(a success of a request in flight to it finds it again)",
                        fatal,
                    )
                raise  # its request's error: the other endpoints take the requests left
            if len(self._endpoints) > 1:
                raise FatalBackendError(
                    f"{fatal}; every other endpoint of the judge ({len(self._endpoints) - 1}) "
                    "was lost alike"
                ) from None
            raise fatal from None
        except Exception as exc:
            instead = self._raised_instead(endpoint, exc)
            if instead is None:
                raise
            try:
                raise instead from None
            finally:
                # Raised, it holds this frame (its traceback): this frame holding it too made
                # a cycle that kept the failed request's body (the transport's frame, in the
                # failure it replaced) until the garbage collector's next pass.
                instead = None
        finally:
            endpoint.in_flight -= 1
        reply = reply_of(
            completion,
            endpoint.transport.url,
            top_logprobs=self.options.top_logprobs,
            secret=self._secret.reveal() if self._secret else None,
        )
        problem = endpoint.answer(reply, completion, asked=self.options.top_logprobs)
        if problem is not None:
            raise problem
        return reply

    def _raised_instead(self, endpoint: _Endpoint, exc: Exception) -> BackendError | None:
        """The error to raise in place of the transport's failure ``exc``, if any: the
        server we started has died (nothing will work), or :meth:`_after_failure`'s."""
        rerouted = self._after_failure(endpoint, exc)
        failure = self.server.failure() if self.server is not None else None
        return failure if failure is not None else rerouted

    def _after_failure(self, endpoint: _Endpoint, exc: Exception) -> RetryableError | None:
        """:meth:`_rest` after a transient failure; a bug in it is named as one, with the
        endpoint and the failure it followed, not passed off as the request's failure (a bare
        ``OverflowError: int too large to convert to float`` in every judgement)."""
        if not isinstance(exc, RetryableError):
            return None
        try:
            return self._rest(endpoint, exc)
        except Exception as bug:
            raise RuntimeError(
                f"judge at {endpoint.transport.url}: after its failure ({exc}), counting "
                f"its failures raised {type(bug).__name__}: {bug}; a bug of trig-stream: "
                "please report it; resume with --retry-errors to ask again"
            ) from bug

    def _rest(self, endpoint: _Endpoint, exc: RetryableError) -> RetryableError | None:
        """Rest ``endpoint`` after ``exc``; the error to raise instead when another endpoint
        is awake to take the retry at once, else None (``exc`` itself).

        A Retry-After (of a 429, or of a 5xx, 408 or 409) is the endpoint's rest, not the
        request's: waited out by the engine, it brought the retry back to this endpoint, awake
        again by then, while another that could have answered at once stood idle (a request
        could spend all its attempts there). And a 429 or a timeout of one endpoint while
        another is awake is no sign that the judge as a whole has too much in flight (one
        endpoint that hangs cut the limit the others served, again each time it woke from its
        rest): it is raised as a plain :class:`~trig_stream.errors.RetryableError` (a timeout
        as a plain :class:`~trig_stream.errors.UnreachableError`: it got no answer), which
        adaptive concurrency does not answer by lowering the judge's limit.
        """
        now = self._clock()
        if isinstance(exc, UnreachableError):
            endpoint.unreached = True
        if not isinstance(exc, RateLimitError) and exc.retry_after is None:
            endpoint.failed(now)
            if isinstance(exc, AnswerTimeoutError) and self._another_awake(endpoint):
                return UnreachableError(str(exc))
            return None
        endpoint.rate_limited(now, exc.retry_after)
        if not self._another_awake(endpoint):
            return None  # the engine's wait (and its concurrency controller) paces it
        return RetryableError(str(exc), retry_after=None)

    def unreached_everywhere(self) -> bool:
        """Whether a request to each endpoint has got no answer at all: one that is down
        (a request to it spent its attempts there) says nothing of the others."""
        return all(endpoint.unreached for endpoint in self._endpoints)

    def _another_awake(self, endpoint: _Endpoint) -> bool:
        now = self._clock()
        return any(e is not endpoint and e.awake_at() <= now for e in self._endpoints)

    def _pick(self) -> _Endpoint:
        # Of the endpoints not lost (all, when every one is), the least busy of those not
        # resting; when all rest, the one whose rest ends first (a single endpoint is always
        # picked: the engine's backoff paces it).
        endpoints = [e for e in self._endpoints if not e.lost] or self._endpoints
        if len(endpoints) == 1:
            return endpoints[0]
        now = self._clock()
        awake = [e for e in endpoints if e.awake_at() <= now]
        if not awake:
            return min(endpoints, key=_Endpoint.awake_at)
        # Of the least busy, the one whose latest failure is oldest: an endpoint just awake
        # after its rest does not win a tie against one that has not failed since.
        return min(awake, key=lambda e: (e.in_flight, e.failed_at))

    def _body(self, request: JudgeRequest) -> dict[str, Any]:
        # The image's URL is put in its slot by the transport (see ``transports``).
        opts = self.options
        body: dict[str, Any] = {
            "model": opts.model,
            "messages": self.messages(request, IMAGE_SLOT),
            "logprobs": True,
            "top_logprobs": opts.top_logprobs,
            "temperature": opts.temperature,
            "max_tokens": opts.max_tokens,
        }
        if opts.seed is not None:
            body["seed"] = opts.seed
        return body
