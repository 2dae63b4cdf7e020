"""The ``openai`` judge's ``options``, and when two base URLs are the same endpoint
(:func:`same_endpoint_key`: a server is listed once, and its load is read once).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, field_validator, model_validator

from trig_stream.backends.judges.managed_server import ServeOptions
from trig_stream.backends.judges.server_probe import request_target, url_host
from trig_stream.backends.judges.transports import Client
from trig_stream.config_fields import (
    OPTIONS_CONFIG,
    CallTimeout,
    EnvVarName,
    HttpUrl,
    ServedModel,
    ascii_host,
)


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
