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
:class:`~trig_stream.backends.judges.endpoints.Endpoint`).
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
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trig_stream.backends.api_keys import Secret, key_from_env, note_key_variable
from trig_stream.backends.base import (
    Judge,
    JudgeReply,
    JudgeRequest,
    PreparedImage,
    ServerLoad,
)
from trig_stream.backends.judges.endpoints import Endpoint
from trig_stream.backends.judges.managed_server import ManagedServer, command_line
from trig_stream.backends.judges.openai_options import OpenAIJudgeOptions, same_endpoint_key
from trig_stream.backends.judges.payloads import encode_image, reply_of
from trig_stream.backends.judges.server_probe import read_load, server_root
from trig_stream.backends.judges.templates import JudgeTemplate
from trig_stream.backends.judges.transports import (
    IMAGE_SLOT,
    EncodedImage,
    open_transport,
)
from trig_stream.errors import (
    AnswerTimeoutError,
    BackendError,
    FatalBackendError,
    ItemError,
    RateLimitError,
    RetryableError,
    UnreachableError,
)
from trig_stream.files import real_path
from trig_stream.records import JudgeFingerprint
from trig_stream.scoring import SCORING_RULES, Scorer

METRICS_TIMEOUT_S = 5.0
"""How long one read of a server's ``/metrics`` may take."""


logger = logging.getLogger(__name__)


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
        # Before any judge checks or starts its server, which inherits this judge's key too.
        note_key_variable(options.api_key_env)
        self.template = JudgeTemplate.chosen(options.template)
        self._endpoints: list[Endpoint] = []
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
        command = " ".join(command_line(serve.command, serve.host, serve.port or "<free port>"))
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
                Endpoint(
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
                    "was lost alike",
                    request_error=exc,
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

    def _raised_instead(self, endpoint: Endpoint, exc: Exception) -> BackendError | None:
        """The error to raise in place of the transport's failure ``exc``, if any: the
        server we started has died (nothing will work), or :meth:`_after_failure`'s."""
        rerouted = self._after_failure(endpoint, exc)
        failure = self.server.failure() if self.server is not None else None
        return failure if failure is not None else rerouted

    def _after_failure(self, endpoint: Endpoint, exc: Exception) -> RetryableError | None:
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

    def _rest(self, endpoint: Endpoint, exc: RetryableError) -> RetryableError | None:
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

    def _another_awake(self, endpoint: Endpoint) -> bool:
        now = self._clock()
        return any(e is not endpoint and e.awake_at() <= now for e in self._endpoints)

    def _pick(self) -> Endpoint:
        # Of the endpoints not lost (all, when every one is), the least busy of those not
        # resting; when all rest, the one whose rest ends first (a single endpoint is always
        # picked: the engine's backoff paces it).
        endpoints = [e for e in self._endpoints if not e.lost] or self._endpoints
        if len(endpoints) == 1:
            return endpoints[0]
        now = self._clock()
        awake = [e for e in endpoints if e.awake_at() <= now]
        if not awake:
            return min(endpoints, key=Endpoint.awake_at)
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
