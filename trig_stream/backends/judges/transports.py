"""How the ``openai`` judge sends a chat completion request and gets the decoded answer.

Transports behind one small interface (:class:`Transport`):

* :class:`~trig_stream.backends.judges.http1.HttpTransport` (``client = "http"``, the
  default) is a small HTTP/1.1 client of trig-stream's own: about half aiohttp's CPU per
  request (see :mod:`~trig_stream.backends.judges.http1`).
* :class:`AiohttpTransport` (``client = "aiohttp"``) posts the JSON body with one
  ``aiohttp`` session per endpoint.
* :class:`SdkTransport` (``client = "sdk"``) posts through ``openai.AsyncOpenAI`` on its
  aiohttp transport. Each request then also builds the SDK's request models and headers,
  which measured ~1 ms more CPU per request here than the whole aiohttp path
  (``bench/engine_cpu.py``): at a few hundred requests per second, that is a core.

A judge reads one field of each answer, so the first two do no more than post and decode.
They encode bodies and decode answers with ``pydantic_core``'s JSON functions (already a
dependency, through pydantic): for a request body and a 20-logprob answer they measured 2.6
and 11 us here, against 12 and 26 us for the :mod:`json` module's.

All send the same body and headers (bearer key, JSON), never retry (the engine owns
retries) nor follow a redirect (which stops the run), read no answer body over
:data:`MAX_BODY_BYTES` (as sent, or once decompressed: a gzip bomb is refused, not inflated),
and raise the same
:mod:`~trig_stream.backends.judges.http_errors` classes for the same failures, so a run's
judgements do not depend on the transport.

The image goes into a body as an :class:`EncodedImage`: the body holds :data:`IMAGE_SLOT`
where its URL belongs. A base64 image is megabytes of JSON string; encoding it once per
image, in the worker thread that prepares it, instead of once per request on the event loop,
is what keeps the loop free (~4 ms per request for a 1 MB image). The http and aiohttp
transports splice those bytes into each body (:func:`splice_image`); the SDK's puts the URL
itself in the slot.
"""

from __future__ import annotations

import base64
import json
import sys
import time
import zlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal, Protocol

import anyio
from pydantic_core import from_json, to_json

from trig_stream.backends.judges.http_errors import (
    AnswerTooLarge,
    aiohttp_malformed,
    classify,
    connection_error,
    malformed_error,
    status_error,
    timeout_error,
)

if TYPE_CHECKING:
    import aiohttp
    import openai

Client = Literal["aiohttp", "sdk", "http"]
"""The names of the transports, as ``options.client`` gives them."""

MAX_BODY_BYTES = 64 * 1024 * 1024
"""Largest answer body accepted, as it comes and once decompressed; a judge's answer is a few
kilobytes, and a server that sends a gigabyte (or a small gzip bomb) must not take the
process's memory with it."""

IMAGE_SLOT = "\x00image-url\x00"
"""Stands in a request body for the image's URL, which the transport puts there."""
_SLOT_JSON = json.dumps(IMAGE_SLOT).encode()


@dataclass(frozen=True)  # no slots: :attr:`url` is memoized in the instance's __dict__
class EncodedImage:
    """An image's URL (``data:`` or ``file://``) as a JSON string literal.

    Only the literal is kept: a ``data:`` URL is megabytes (16 MiB for a 2048² PNG), and each
    image waiting for or in a request held it twice, as the URL and as its literal, though
    only the SDK's transport reads the URL itself (:attr:`url` derives it, once, when first
    asked: the default HTTP transport never asks).
    """

    literal: bytes
    """The URL JSON-encoded, quotes included: what a request body holds."""

    @classmethod
    def of(cls, url: str) -> EncodedImage:
        """Any URL and its JSON encoding."""
        return cls(json.dumps(url).encode())

    @classmethod
    def data_url(cls, media_type: str, data: bytes) -> EncodedImage:
        """A ``data:`` URL of ``data`` (megabytes for an image: call it in a worker thread).

        Base64 text needs no JSON escaping, so its literal is built without the JSON
        encoder, which would scan every character (~3 ms per megabyte here).
        """
        head = f"data:{media_type};base64,".encode("ascii")
        return cls(b"".join((b'"', head, base64.b64encode(data), b'"')))

    @cached_property
    def url(self) -> str:
        """The URL itself, decoded from :attr:`literal` when first asked and kept (a copy:
        megabytes for a ``data:`` URL). Decoded on every request, a 16 MiB image cost
        ~18 ms per request and one more copy per request in flight."""
        literal = self.literal
        if b"\\" not in literal:  # no escapes (base64, most URLs): the text between quotes
            return literal[1:-1].decode("ascii")
        url: str = json.loads(literal)
        return url


class Transport(Protocol):
    """Posts chat completion bodies to one endpoint."""

    url: str
    """The endpoint's base URL (``.../v1``)."""

    async def post(self, body: dict[str, Any], image: EncodedImage) -> Any:
        """The decoded JSON answer to ``body``, with ``image`` in its :data:`IMAGE_SLOT`.

        Raises:
            BackendError: the request failed; the subclass says how (see ``http_errors``).
        """
        ...

    async def aclose(self) -> None:
        """Close the connections; safe to repeat."""
        ...


class AiohttpTransport:
    """Posts with a plain ``aiohttp`` session: one JSON encode, one decode per request.

    Args:
        url: the endpoint's base URL.
        secret: the API key, or None for a keyless local server.
        key_source: where the key came from, for the credentials message.
        timeout_s: the most a request may take, connection included.
    """

    def __init__(self, url: str, secret: str | None, key_source: str, timeout_s: float) -> None:
        self.url = url
        self._target = url.rstrip("/") + "/chat/completions"
        self._secret = secret
        self._key_source = key_source
        self._headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            "Authorization": f"Bearer {secret or 'EMPTY'}",
        }
        self._timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:  # the headers hold the key: never show them
        return f"AiohttpTransport(url={self.url!r})"

    def _open_session(self) -> aiohttp.ClientSession:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(
                # The judge's limiter bounds requests in flight; the connector adds none.
                connector=aiohttp.TCPConnector(limit=0),
                timeout=aiohttp.ClientTimeout(total=self._timeout_s),
            )
        return self._session

    async def post(self, body: dict[str, Any], image: EncodedImage) -> Any:
        import aiohttp

        session = self._open_session()
        data = splice_image(to_json(body), image)
        try:
            # A redirect is not followed: it would carry the key to wherever it points.
            async with session.post(
                self._target, data=data, headers=self._headers, allow_redirects=False
            ) as response:
                status = response.status
                raw = await _read_capped(response)
                headers = dict(response.headers)
        except TimeoutError:  # asyncio's is the builtin since 3.11
            raise timeout_error(self.url, self._timeout_s) from None
        except AnswerTooLarge as exc:
            raise malformed_error(self.url, str(exc)) from None
        except (aiohttp.ClientPayloadError, aiohttp.ClientResponseError) as exc:
            # The answer came, but is not one: the server is there, and every client calls
            # that a malformed answer (retried), never an unreachable server (which stops a
            # run that has had no answer yet). Only a body cut short is a connection's end.
            detail = aiohttp_malformed(exc)
            if detail is None:
                raise connection_error(self.url, "the answer was cut off") from None
            raise malformed_error(self.url, detail) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise connection_error(self.url, type(exc).__name__) from None
        if status >= 300:
            raise status_error(
                status,
                headers,
                error_body(raw),
                endpoint=self.url,
                secret=self._secret,
                key_source=self._key_source,
            )
        try:
            return parse_json(raw)
        except ValueError:
            raise malformed_error(self.url, "the body is not JSON") from None

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()


class SdkTransport:
    """Posts through ``openai.AsyncOpenAI`` (aiohttp transport, the SDK's retries off).

    The SDK's generic ``post`` with ``cast_to=object`` returns the answer as plain JSON:
    the typed ``ChatCompletion`` path would walk every top logprob of every answer.
    """

    def __init__(self, url: str, secret: str | None, key_source: str, timeout_s: float) -> None:
        import openai

        self.url = url
        self._secret = secret
        self._key_source = key_source
        self._timeout_s = timeout_s
        self._client: openai.AsyncOpenAI | None = openai.AsyncOpenAI(
            base_url=url,
            api_key=secret or "EMPTY",
            max_retries=0,
            timeout=timeout_s,
            # Compressed answers are decoded by cap_answers, which knows these two.
            default_headers={"Accept-Encoding": "gzip, deflate"},
            # A redirect is not followed (the SDK's default): its 3xx is classified instead.
            http_client=openai.DefaultAioHttpClient(
                timeout=timeout_s,
                follow_redirects=False,
                event_hooks={"response": [cap_answers_async]},
            ),
        )

    def __repr__(self) -> str:
        return f"SdkTransport(url={self.url!r})"

    async def post(self, body: dict[str, Any], image: EncodedImage) -> Any:
        if self._client is None:
            raise RuntimeError(f"the transport to {self.url} is closed")
        filled = _filled(body, image.url)
        try:
            # The SDK's timeout holds each read, not the answer: a server that sends a byte
            # now and then would hold the request for as long as it likes.
            with anyio.fail_after(self._timeout_s):
                answer = await self._client.post("/chat/completions", cast_to=object, body=filled)
        except TimeoutError:
            raise timeout_error(self.url, self._timeout_s) from None
        except Exception as exc:
            raise classify(
                exc,
                endpoint=self.url,
                secret=self._secret,
                key_source=self._key_source,
                timeout_s=self._timeout_s,
            ) from None
        if isinstance(answer, str):
            # The SDK decodes JSON only when the answer says it is JSON (Content-Type); the
            # other clients read the body whatever it says, and so must this one.
            try:
                return parse_json(answer.encode("utf-8", "surrogatepass"))
            except ValueError:
                raise malformed_error(self.url, "the body is not JSON") from None
        return answer

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()


def open_transport(
    client: Client, url: str, *, secret: str | None, key_source: str, timeout_s: float
) -> Transport:
    """The transport named ``client`` to the endpoint at ``url``."""
    if client == "http":
        from trig_stream.backends.judges.http1 import HttpTransport

        return HttpTransport(url, secret, key_source, timeout_s)
    kind = AiohttpTransport if client == "aiohttp" else SdkTransport
    return kind(url, secret, key_source, timeout_s)


async def _read_capped(response: aiohttp.ClientResponse) -> bytes:
    """An aiohttp answer's body (decompressed, as aiohttp does by default), read in pieces.

    Raises:
        AnswerTooLarge: it says or proves to be over :data:`MAX_BODY_BYTES`.
    """
    limit = MAX_BODY_BYTES
    if response.content_length is not None and response.content_length > limit:
        raise AnswerTooLarge(limit)
    parts: list[bytes] = []
    size = 0
    async for part in response.content.iter_any():
        size += len(part)
        if size > limit:
            raise AnswerTooLarge(limit)
        parts.append(part)
    return b"".join(parts)


def inflate(body: bytes, coding: str) -> bytes:
    """``body`` without its content coding (gzip or deflate, zlib-wrapped or raw), at most
    :data:`MAX_BODY_BYTES` of it.

    Raises:
        AnswerTooLarge: it decompresses to more than :data:`MAX_BODY_BYTES`.
        ValueError: a coding other than gzip or deflate, or a body that does not decode.
    """
    named, coding = coding.strip(), coding.strip().lower()
    if coding in ("", "identity"):
        return body
    if coding not in ("gzip", "x-gzip", "deflate"):
        # Quoted whole, as the server wrote it: a caller masks the key in it before cutting.
        raise ValueError(f"content coding {named!r}")
    limit = MAX_BODY_BYTES
    # 47 = 32 + 15: gzip or zlib, by its header; then raw deflate, as some servers send it.
    for wbits in (47, -15):
        inflater = zlib.decompressobj(wbits)
        try:
            out = inflater.decompress(body, limit + 1)
        except zlib.error:
            continue
        if len(out) > limit:
            raise AnswerTooLarge(limit)
        if inflater.eof:
            return out
    raise ValueError(f"a {coding} body that does not decode")


def cap_answers(response: Any) -> None:
    """An ``httpx`` response event hook that keeps an SDK client from reading an answer body
    over :data:`MAX_BODY_BYTES`: a Content-Length over it is refused at once, and the body
    is read through a stream that counts it and decompresses it itself (:func:`inflate`:
    ``httpx`` would inflate a gzip bomb whole).

    A request that carries a :data:`DEADLINE` is also held to it: a piece of its answer that
    comes past it raises httpx's read timeout, which the SDK reports as a timeout.

    Raises:
        AnswerTooLarge: the answer says it is larger.
    """
    limit = MAX_BODY_BYTES
    length = response.headers.get("content-length", "")
    if length.isascii() and length.isdigit() and int(length) > limit:
        raise AnswerTooLarge(limit)
    coding = response.headers.get("content-encoding", "identity")
    if "content-encoding" in response.headers:
        del response.headers["content-encoding"]  # decoded by the stream, not again by httpx
    deadline = response.request.extensions.get(DEADLINE)
    stream_type = _capped_stream_type(httpx_of(response))
    response.stream = stream_type(response.stream, coding, deadline)


def httpx_of(response: Any) -> Any:
    """The module of an SDK client's ``response``: httpx, or a fork of it under another name,
    whose stream classes (a response accepts no other) a hook must use."""
    return sys.modules[type(response).__module__.partition(".")[0]]


DEADLINE = "trig_stream.deadline"
"""The request extension that holds its call's deadline, as (a ``time.monotonic`` time, the
timeout it was set from): see :func:`cap_answers`."""


async def cap_answers_async(response: Any) -> None:
    """:func:`cap_answers` for an async client, whose hooks are awaited."""
    cap_answers(response)


_STREAM_TYPES: dict[str, type] = {}


def _capped_stream_type(httpx: Any) -> type:
    """A stream class of ``httpx``'s (a response accepts no other) reading at most
    :data:`MAX_BODY_BYTES` of its inner stream, then yielding the body decoded."""
    made = _STREAM_TYPES.get(httpx.__name__)
    if made is not None:
        return made

    class CappedStream(httpx.AsyncByteStream, httpx.SyncByteStream):  # type: ignore[misc]
        def __init__(
            self, inner: Any, coding: str, deadline: tuple[float, float] | None = None
        ) -> None:
            self._inner = inner
            self._coding = coding
            self._deadline = deadline
            self._parts: list[bytes] = []
            self._size = 0

        def _add(self, part: bytes) -> None:
            if self._deadline is not None and time.monotonic() > self._deadline[0]:
                raise httpx.ReadTimeout(f"no whole answer within {self._deadline[1]:g} s")
            self._size += len(part)
            if self._size > MAX_BODY_BYTES:
                raise AnswerTooLarge(MAX_BODY_BYTES)
            self._parts.append(part)

        def __iter__(self) -> Iterator[bytes]:
            for part in self._inner:
                self._add(part)
            yield inflate(b"".join(self._parts), self._coding)

        async def __aiter__(self) -> AsyncIterator[bytes]:
            async for part in self._inner:
                self._add(part)
            yield inflate(b"".join(self._parts), self._coding)

        def close(self) -> None:
            self._inner.close()

        async def aclose(self) -> None:
            await self._inner.aclose()

    _STREAM_TYPES[httpx.__name__] = CappedStream
    return CappedStream


def splice_image(body: bytes, image: EncodedImage) -> bytes:
    """A JSON-encoded request ``body`` with ``image``'s URL in its :data:`IMAGE_SLOT`."""
    return b"".join(spliced_parts(body, image))


def spliced_parts(body: bytes, image: EncodedImage) -> tuple[bytes, bytes, bytes]:
    """:func:`splice_image`'s body in its three parts (the image's literal in the middle),
    for a caller that joins them with more bytes: one copy of the image, not two.

    Raises:
        ValueError: ``body`` has no :data:`IMAGE_SLOT`.
    """
    head, slot, tail = body.partition(_SLOT_JSON)
    if not slot:
        raise ValueError("the request body has no image slot")
    return head, image.literal, tail


def parse_json(raw: bytes) -> Any:
    """A JSON answer's body, decoded.

    The fast parser refuses a lone surrogate escape (``"\\ud83d"``, half of an emoji), which
    JSON allows and a server may send for a token that is part of a character; the standard
    library's parser takes it, so one odd token does not make a whole answer malformed.

    Raises:
        ValueError: the body is not JSON.
    """
    try:
        return from_json(raw)
    except ValueError:
        return json.loads(raw)


def error_body(raw: bytes) -> object:
    """An error answer's body as the SDK reports it: the ``error`` object when there is one."""
    try:
        body = json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace")
    if isinstance(body, dict) and "error" in body:
        return body["error"]
    return body


def _filled(value: Any, url: str) -> Any:
    """``value`` with :data:`IMAGE_SLOT` replaced by ``url`` wherever it stands."""
    if value == IMAGE_SLOT:
        return url
    if isinstance(value, dict):
        return {key: _filled(item, url) for key, item in value.items()}
    if isinstance(value, list):
        return [_filled(item, url) for item in value]
    return value
