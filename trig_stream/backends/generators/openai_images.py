"""The ``openai_images`` generator: images from an OpenAI-protocol images API (t2i).

``dall-e-3`` (upstream's ``dalle3``), ``gpt-image-1`` or any server speaking
``POST /v1/images/generations``. Each request is one API call made with the synchronous SDK
client inside the worker thread; run more ``workers`` for more calls in flight. The API
takes no seed, so the engine's recorded seed does not make the images repeatable.

Failures are classified (see :mod:`trig_stream.backends.generators.api_calls`) and transient
ones retried here, under a small bounded policy, because the engine does not retry
generators.
"""

from __future__ import annotations

import base64
import binascii
import io
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from trig_stream.backends.api_keys import note_key_variable
from trig_stream.backends.base import GenerationRequest, Generator
from trig_stream.backends.generators.api_calls import (
    Sleep,
    api_key_from_env,
    call_with_retries,
    openai_client,
    unless_an_error,
    wait_on_cancel,
)
from trig_stream.backends.generators.source_images import rgb, upright
from trig_stream.config_fields import (
    OPTIONS_CONFIG,
    Backoff,
    CallTimeout,
    EnvVarName,
    HttpUrl,
    ServedModel,
    set_by_the_engine,
)
from trig_stream.errors import BackendError, ConfigError, FatalBackendError, ItemError, NotAsked
from trig_stream.retry import RetryPolicy

if TYPE_CHECKING:
    from PIL.Image import Image

    from trig_stream.config import GeneratorConfig, RunConfig


ENGINE_FIELDS: Mapping[str, str] = {
    "prompt": "the engine sends each request its own sample's prompt (one here would draw "
    "every image from it, each judged as its own sample's)",
    "n": "the engine asks for one image per request (more are paid for, and dropped)",
    "model": "the engine sends options.model, which the run's manifest and fingerprint record",
    "response_format": 'the engine reads b64_json image data (only "b64_json" may be asked for)',
    "stream": "the engine reads one JSON answer (stream = true makes the server answer an event "
    "stream; only false may be asked for)",
    "partial_images": "the engine reads one JSON answer (partial images come as an event "
    "stream; only 0 may be asked for)",
}
"""Request fields the engine sets itself, each with why: ``extra_body``, which the SDK lets
replace a request's own fields, may not set them, but for the values in
:data:`ENGINE_VALUES`."""

ENGINE_VALUES: Mapping[str, object] = {
    "response_format": "b64_json",
    "stream": False,
    "partial_images": 0,
}
"""The value of an :data:`ENGINE_FIELDS` field that ``extra_body`` may still set, since the
engine reads what it asks for: ``response_format = "b64_json"`` is what a server that
answers with URLs is told to ask for, and ``stream = false`` and ``partial_images = 0`` are
the API's defaults."""


def engine_fields_problem(extra_body: Mapping[str, Any]) -> str | None:
    """Why ``extra_body`` cannot be sent: the request fields among it that the engine sets
    itself, each with its reason; None if none."""
    taken = [
        key
        for key, value in extra_body.items()
        if key in ENGINE_FIELDS and not _engine_value(key, value)
    ]
    return set_by_the_engine("options.extra_body", taken, ENGINE_FIELDS)


def _engine_value(key: str, value: object) -> bool:
    """Whether ``value`` is the one :data:`ENGINE_VALUES` lets ``extra_body`` set for ``key``
    (of its type too: ``stream = 0`` is no false to a server)."""
    if key not in ENGINE_VALUES:
        return False
    allowed = ENGINE_VALUES[key]
    return type(value) is type(allowed) and value == allowed


Family = Literal["dall-e", "gpt-image"]
"""A family of OpenAI's images models, by the start of its name."""

QUALITIES: Mapping[Family, tuple[str, ...]] = {
    "dall-e": ("standard", "hd"),
    "gpt-image": ("low", "medium", "high"),
}
"""The ``quality`` values each family takes, besides ``auto`` (which both do: it is the
API's default)."""


def _family(model: str) -> Family | None:
    """The family of OpenAI's images models ``model`` belongs to; None for another server's."""
    if model.startswith("dall-e"):
        return "dall-e"
    if model.startswith("gpt-image"):
        return "gpt-image"
    return None


class OpenAIImagesOptions(BaseModel):
    """``options`` of the ``openai_images`` generator."""

    model_config = OPTIONS_CONFIG

    model: ServedModel = "dall-e-3"
    base_url: HttpUrl | None = None
    """The API root, e.g. ``https://api.openai.com/v1``; None uses the SDK's default."""
    api_key_env: EnvVarName = "OPENAI_API_KEY"
    """The NAME of the environment variable holding the key (never the key itself)."""
    size: Annotated[str, Field(pattern=r"^([1-9][0-9]*x[1-9][0-9]*|auto)$")] = "1024x1024"
    """``WIDTHxHEIGHT`` or ``auto`` (not with a dall-e model)."""
    quality: Literal["standard", "hd", "low", "medium", "high", "auto"] | None = None
    """``standard`` / ``hd`` (dall-e models), ``low`` / ``medium`` / ``high`` (gpt-image
    models), ``auto`` (either; see :data:`QUALITIES`); another value goes in ``extra_body``."""
    style: Literal["vivid", "natural"] | None = None
    """``vivid`` / ``natural`` (dall-e-3 only)."""
    extra_body: dict[str, Any] = Field(default_factory=dict)
    """Further request fields, sent as they are; none of :data:`ENGINE_FIELDS`."""
    timeout_s: CallTimeout = 180.0
    """Seconds one call may take in all, connecting and reading the whole answer included
    (``api_calls.openai_client``)."""
    max_attempts: Annotated[int, Field(ge=1, le=20)] = 4
    """Attempts per image for transient failures (5xx, timeouts, 429)."""
    backoff_initial: Backoff = 2.0
    backoff_max: Backoff = 60.0

    @field_validator("extra_body")
    @classmethod
    def _extra_body_leaves_the_engine_its_fields(cls, value: dict[str, Any]) -> dict[str, Any]:
        problem = engine_fields_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _style_for_dall_e(self) -> OpenAIImagesOptions:
        if self.style is not None and self.model.startswith("gpt-image"):
            raise ValueError(
                f"style is a dall-e-3 option: {self.model} refuses it; remove style (or pass "
                "it in extra_body for a server that takes it)"
            )
        return self

    @model_validator(mode="after")
    def _quality_and_size_for_the_model(self) -> OpenAIImagesOptions:
        family = _family(self.model)
        if family is None:
            return self  # another server's model: its own options
        if self.quality is not None and self.quality not in QUALITIES[family] + ("auto",):
            other = "gpt-image" if family == "dall-e" else "dall-e"
            raise ValueError(
                f"quality {self.quality!r} is a {other} option: {self.model} refuses it; use "
                f"{', '.join(QUALITIES[family][:-1])} or {QUALITIES[family][-1]} (or pass it in "
                "extra_body for a server that takes it)"
            )
        if self.size == "auto" and family == "dall-e":
            raise ValueError(
                f"size 'auto' is a gpt-image option: {self.model} refuses it; give "
                "WIDTHxHEIGHT, e.g. 1024x1024 (or pass it in extra_body for a server that "
                "takes it)"
            )
        return self


class OpenAIImagesGenerator(Generator):
    """Images from an OpenAI-protocol images endpoint, one call per request.

    Args:
        name: the model's name in the run.
        options: the validated options.
        workers: concurrent calls (one per worker thread).
        batch_size: requests per :meth:`generate` call, made one after another, their
            images handed on when all are done: 1 loses no answered image to a kill, and
            ``workers`` is what puts more calls in flight.
        sleep: waits between retries (tests inject one that records and returns at once),
            on the event :meth:`stop_waiting` sets.
    """

    Options = OpenAIImagesOptions
    reads_source_image = False  # text to image only

    def __init__(
        self,
        name: str,
        options: OpenAIImagesOptions,
        *,
        workers: int = 1,
        batch_size: int = 1,
        sleep: Sleep = wait_on_cancel,
    ) -> None:
        self.name = name
        self.options = options
        note_key_variable(options.api_key_env)  # a judge's server started first inherits it
        self.workers = workers
        self.batch_size = batch_size
        self.policy = RetryPolicy(
            options.max_attempts, options.backoff_initial, options.backoff_max
        )
        self._sleep = sleep
        self._client: Any = None
        self._key = ""
        self._answered = threading.Event()
        """Set once a call to the API has succeeded (see ``call_with_retries``)."""
        self._stopping = threading.Event()
        """Set by :meth:`stop_waiting`: a wait for a retry ends, the request not asked again."""

    @classmethod
    def from_config(
        cls, entry: GeneratorConfig, options: OpenAIImagesOptions, config: RunConfig
    ) -> OpenAIImagesGenerator:
        """Build from a ``[[generators]]`` entry.

        Raises:
            ConfigError: the run's task is not t2i.
        """
        if config.run.task != "t2i":
            raise ConfigError(
                f"generator {entry.name!r}: openai_images makes t2i images only, "
                f"but the run's task is {config.run.task}"
            )
        return cls(entry.name, options, workers=entry.workers, batch_size=entry.batch_size)

    def __repr__(self) -> str:
        return f"OpenAIImagesGenerator(name={self.name!r}, model={self.options.model!r})"

    def fingerprint(self) -> dict[str, Any]:
        o = self.options
        return {
            "backend": "openai_images",
            "model": o.model,
            "size": o.size,
            "quality": o.quality,
            "style": o.style,
            "extra_body": o.extra_body,
        }

    def check_environment(self) -> None:
        api_key_from_env(self.options.api_key_env, owner=f"generator {self.name!r}")

    def load(self) -> None:
        """Read the key and open the client.

        Raises:
            FatalBackendError: the key's environment variable is not set.
        """
        self._key = api_key_from_env(self.options.api_key_env, owner=f"generator {self.name!r}")
        self._client = openai_client(self.options.base_url, self._key, self.options.timeout_s)
        self._stopping.clear()  # an earlier run's stop

    def stop_waiting(self) -> None:
        self._stopping.set()

    def generate(
        self, requests: Sequence[GenerationRequest], *, worker: int, cancel: threading.Event
    ) -> list[Image | Exception]:
        out: list[Image | Exception] = []
        for request in requests:
            if cancel.is_set():
                out.append(ItemError("cancelled"))
                continue
            if self._stopping.is_set():
                # Nothing is asked after a stop (each request may take up to timeout_s): the
                # rest of the batch is owed to the resume.
                out.append(NotAsked("the run stopped before the request was asked"))
                continue
            try:
                out.append(self._one(request.sample.prompt, cancel))
            except FatalBackendError:
                raise
            except ItemError as exc:
                out.append(exc)
            except Exception as exc:  # RetryableError after the last attempt
                out.append(exc)
        return out

    def _one(self, prompt: str, cancel: threading.Event) -> Image:
        o = self.options
        params: dict[str, Any] = {"model": o.model, "prompt": prompt, "n": 1, "size": o.size}
        if o.quality is not None:
            params["quality"] = o.quality
        if o.style is not None:
            params["style"] = o.style
        if o.model.startswith("dall-e"):
            params["response_format"] = "b64_json"  # gpt-image models always answer so
        if o.extra_body:
            params["extra_body"] = o.extra_body
        api = f"the images API of generator {self.name!r}"
        response = call_with_retries(
            lambda: unless_an_error(
                self._client.images.generate(**params), "data", secret=self._key, api=api
            ),
            policy=self.policy,
            cancel=cancel,
            secret=self._key,
            sleep=self._sleep,
            stop=self._stopping,
            answered=self._answered,
            api=api,
            unanswered_is_fatal=True,
        )
        data = getattr(response, "data", None)
        encoded = getattr(data[0], "b64_json", None) if isinstance(data, list) and data else None
        if not encoded or not isinstance(encoded, str):
            # Not this prompt's fault: the server answers in another form (URLs, often), and
            # so every request would fail alike. Not an ItemError, so that a generator that
            # never gets an image stops the run (generation.FAILED_CALLS_TO_STOP).
            raise BackendError(_no_image(response))
        return _decode(encoded)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


_JSON_KINDS = {
    dict: "an object",
    str: "a string",
    bool: "a boolean",
    int: "a number",
    float: "a number",
}
"""What a JSON value of each Python type is called, for messages."""


def _no_image(response: object) -> str:
    """What is wrong with an answer whose ``data`` holds no ``b64_json`` image."""
    if not hasattr(response, "data"):  # the SDK's text of a body that is no JSON object
        return (
            "the images API answered with no JSON images object (a web page, or another "
            "API's answer?); check base_url: the API's root, often ending in /v1"
        )
    data = getattr(response, "data", None)
    if not isinstance(data, list):
        kind = _JSON_KINDS.get(type(data), f"a {type(data).__name__}")
        if data is None:
            kind = "missing or null"  # the SDK reads either as None
        return f"the images API answered with JSON whose data is {kind}, not a list of images"
    if not data:
        return "the images API answered with an empty data list: no image"
    if getattr(data[0], "url", None):
        return (
            "the images API answered with URLs, not b64_json image data; ask for base64: "
            'options.extra_body = { response_format = "b64_json" }'
        )
    return "the images API answered without b64_json image data"


_ASCII_WHITESPACE = str.maketrans("", "", " \t\n\r\f\v")
"""Deletes the characters ``base64.b64decode`` would refuse that only lay base64 out."""


def _decode(encoded: str) -> Image:
    from PIL import Image as PILImage
    from PIL import UnidentifiedImageError

    try:
        # Line breaks and blanks first: some servers wrap base64 as MIME does, every 76
        # characters. Any other character still makes it undecodable.
        raw = base64.b64decode(encoded.translate(_ASCII_WHITESPACE), validate=True)
        with PILImage.open(io.BytesIO(raw)) as opened:
            opened.load()
            image = upright(opened)
            # A 16-bit grey picture would turn white through a plain convert("RGB").
            return image if image.mode in ("RGB", "RGBA") else rgb(image)
    except UnidentifiedImageError:
        raise BackendError("the images API returned bytes that are no image") from None
    except (
        binascii.Error,
        OSError,
        SyntaxError,
        ValueError,
        PILImage.DecompressionBombError,  # more pixels than Pillow decodes
    ) as exc:
        raise BackendError(f"the images API returned an undecodable image: {exc}") from None
