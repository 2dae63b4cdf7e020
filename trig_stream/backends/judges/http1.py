"""A small HTTP/1.1 client for the judge's one kind of request (``client = "http"``).

A judge sends JSON POSTs to one endpoint and reads one JSON answer each, by the thousand per
minute. A general client wraps every request in objects that this traffic never uses (request
and response models, header multidicts, cookies, redirects, tracing hooks, a connector task):
aiohttp's measured 0.23-0.30 ms of CPU per request on loopback against 0.13-0.15 ms for this
client, same server, 64 requests in flight (``bench/README.md``, P3). At 1,000 requests per
second that is 10-15% of a core, on the one event loop that also feeds the generators and the
journal.

What it does: persistent connections on asyncio's protocols, one request at a time on each
(no pipelining), ``http`` and ``https`` (the system's certificates; ``SSL_CERT_FILE`` names
another bundle); answers framed by ``Content-Length``, chunked, or the end of the connection;
gzip and deflate bodies, though it asks for none; a deadline per request, the connection
included. What it leaves out: proxies (one set in the environment for the endpoint gets a
warning), redirects (one is an error that names where it points) and HTTP/2. A connection
whose state is in doubt (a timeout, a cancellation, bytes nobody asked for) is closed, never
reused.

Its failures are the same :mod:`~trig_stream.backends.judges.http_errors` classes as the other
transports', so a run's judgements do not depend on the client.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import urllib.request
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlsplit

import anyio
from pydantic_core import to_json

from trig_stream.backends.api_keys import scrub
from trig_stream.backends.judges import transports
from trig_stream.backends.judges.http_errors import (
    REASON_CHARS,
    AnswerTooLarge,
    connection_error,
    malformed_error,
    status_error,
    timeout_error,
)
from trig_stream.backends.judges.server_probe import ascii_netloc, request_target
from trig_stream.backends.judges.transports import (
    EncodedImage,
    error_body,
    inflate,
    parse_json,
    spliced_parts,
)
from trig_stream.config_fields import ascii_host
from trig_stream.errors import FatalBackendError

logger = logging.getLogger(__name__)

MAX_HEAD_BYTES = 64 * 1024
"""Longest answer head (status line and headers) accepted. Bodies are held to
:data:`~trig_stream.backends.judges.transports.MAX_BODY_BYTES`, as they come and once
decompressed."""


@dataclass(frozen=True, slots=True)
class Answer:
    """One HTTP answer, read whole."""

    status: int
    headers: dict[str, str]
    """Header names lowercased; a repeated header keeps its last value."""
    body: bytes
    keep_alive: bool
    """Whether the connection can carry another request."""


class ProtocolError(Exception):
    """The server's bytes are not an HTTP/1.1 answer.

    Args:
        what: what is wrong, in our words.
        quoted: the server's text it is about, whole: :meth:`describe` masks the key in it
            before cutting it short (a server may echo the request's Authorization, and a
            key cut in two is no longer found to be masked).
    """

    QUOTED_CHARS = 40
    """Longest piece of the server's text quoted."""

    def __init__(self, what: str, quoted: str | None = None) -> None:
        super().__init__(what if quoted is None else f"{what} {quoted[: self.QUOTED_CHARS]!r}")
        self.what = what
        self.quoted = quoted

    def describe(self, secret: str | None) -> str:
        """The message with ``secret`` masked in the quoted text."""
        if self.quoted is None:
            return self.what
        return f"{self.what} {scrub(self.quoted, secret)[: self.QUOTED_CHARS]!r}"


class Dropped(Exception):
    """The connection ended before a whole answer came."""

    def __init__(self, partial: bool) -> None:
        super().__init__(
            "the answer was cut off" if partial else "the server closed the connection"
        )


class HttpTransport:
    """Posts chat completion bodies to one endpoint over connections of its own.

    Args:
        url: the endpoint's base URL (``http://`` or ``https://``).
        secret: the API key, or None for a keyless local server.
        key_source: where the key came from, for the credentials message.
        timeout_s: the most a request may take, connecting included.
    """

    def __init__(self, url: str, secret: str | None, key_source: str, timeout_s: float) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise FatalBackendError(f"judge endpoint {url!r} is not an http:// or https:// URL")
        self.url = url
        self._secret = secret
        self._key_source = key_source
        self._timeout_s = timeout_s
        try:
            self._host = ascii_host(parts.hostname)
        except ValueError as exc:
            raise FatalBackendError(f"judge endpoint {url!r} {exc}") from None
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._ssl = ssl.create_default_context() if parts.scheme == "https" else None
        if "@" in parts.netloc:
            raise FatalBackendError(
                f"judge endpoint {parts.scheme}://…@{parts.hostname}: the http client sends no "
                "credentials from the URL; give the key with api_key_env"
            )
        path = request_target(parts.path.rstrip("/") + "/chat/completions")
        netloc = ascii_netloc(parts)
        if not _header_safe(netloc):
            raise FatalBackendError(f"judge endpoint {url!r}: its host holds a control character")
        key = secret or "EMPTY"
        if not _header_safe(key):  # a newline would end the header
            raise FatalBackendError(
                f"judge at {url}: the API key from {key_source} holds characters an HTTP "
                "header cannot carry (a trailing newline?)"
            )
        self._head = (
            f"POST {path} HTTP/1.1\r\nHost: {netloc}\r\n"
            "Content-Type: application/json\r\nAccept: application/json\r\n"
            f"Authorization: Bearer {key}\r\nContent-Length: "
        ).encode("ascii")
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()
        proxy = urllib.request.getproxies().get(parts.scheme)
        if proxy and not urllib.request.proxy_bypass(self._host):
            # The connections would fail, or bypass a proxy the network requires, without
            # a word; the proxy's address is not shown (it may hold credentials).
            logger.warning(
                "judge endpoint %s: the environment sets a proxy for %s, which the judge's "
                "http client does not use: it connects directly",
                url,
                parts.scheme,
            )

    def __repr__(self) -> str:  # the request head holds the key: never show it
        return f"HttpTransport(url={self.url!r})"

    async def post(self, body: dict[str, Any], image: EncodedImage) -> Any:
        try:
            # The request is not bound here: this frame, in the traceback of a failure raised
            # below, would hold it for as long as the failure is kept.
            answer = await self._exchange(self._request(body, image))
        except TimeoutError:
            raise timeout_error(self.url, self._timeout_s) from None
        except Dropped as exc:
            raise connection_error(self.url, str(exc)) from None
        except AnswerTooLarge as exc:
            raise malformed_error(self.url, str(exc)) from None
        except ProtocolError as exc:
            detail = exc.describe(self._secret)
            raise malformed_error(self.url, f"not an HTTP answer: {detail}") from None
        except OSError as exc:  # refused, reset, unreachable, TLS
            raise connection_error(self.url, type(exc).__name__) from None
        if 300 <= answer.status < 400:  # a redirect: every request would go to the wrong place
            raise status_error(
                answer.status,
                answer.headers,
                None,
                endpoint=self.url,
                secret=self._secret,
                key_source=self._key_source,
            )
        if answer.status >= 400:
            try:
                text = _decoded(answer)
            except ValueError:
                text = answer.body  # quoted as it came: the reason is what matters
            raise status_error(
                answer.status,
                answer.headers,
                error_body(text),
                endpoint=self.url,
                secret=self._secret,
                key_source=self._key_source,
            )
        try:
            decoded = _decoded(answer)
        except ValueError as exc:  # it may quote the server's Content-Encoding
            detail = scrub(str(exc), self._secret)[:REASON_CHARS]
            raise malformed_error(self.url, detail) from None
        try:
            return parse_json(decoded)
        except ValueError:
            raise malformed_error(self.url, "the body is not JSON") from None

    def _request(self, body: dict[str, Any], image: EncodedImage) -> bytes:
        """The whole request: head, then ``body`` with ``image`` in its slot, joined at once
        (the body spliced first, then joined to the head, was two copies of the image)."""
        parts = spliced_parts(to_json(body), image)
        length = str(sum(map(len, parts))).encode()
        return b"".join((self._head, length, b"\r\n\r\n", *parts))

    async def aclose(self) -> None:
        for connection in list(self._open):
            connection.abort()
        self._open.clear()
        self._idle.clear()

    async def _exchange(self, message: bytes) -> Answer:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout_s
        connection = self._idle_connection()
        if connection is None:
            with anyio.fail_after(self._timeout_s):
                connection = await self._connect()
        answered = False
        timer: asyncio.TimerHandle | None = None
        try:
            waiter = connection.send(message)
            timer = loop.call_at(deadline, connection.expire)
            answer = await waiter
            answered = True
        finally:
            if timer is not None:
                timer.cancel()
            if not answered:  # failed, timed out or cancelled: its state is unknown
                connection.abort()
                self._open.discard(connection)
        if answer.keep_alive and connection.usable:
            self._idle.append(connection)
        else:
            connection.abort()
            self._open.discard(connection)
        return answer

    def _idle_connection(self) -> _Connection | None:
        while self._idle:
            connection = self._idle.pop()  # the most recent: the least likely to time out
            if connection.usable:
                return connection
            self._open.discard(connection)
        return None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        _, connection = await loop.create_connection(
            _Connection,
            self._host,
            self._port,
            ssl=self._ssl,
            server_hostname=self._host if self._ssl else None,
        )
        self._open.add(connection)
        return connection


class _Connection(asyncio.Protocol):
    """One connection: sends a request, parses the answer as its bytes arrive."""

    def __init__(self) -> None:
        self.closed = False
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[Answer] | None = None
        self._buffer = bytearray()
        self._head: tuple[int, dict[str, str], bool] | None = None
        self._length: int | None = None
        """Body length from Content-Length; None for chunked or read-to-close framing."""
        self._chunks: _Dechunker | None = None
        """Reads the body, when it is chunked."""
        self._eof = False
        """The server ended its side of the connection (not a reset, not our abort)."""

    @property
    def usable(self) -> bool:
        """Open, and not closing: the server's close may have arrived but not been handled."""
        return not self.closed and self._transport is not None and not self._transport.is_closing()

    def send(self, message: bytes) -> asyncio.Future[Answer]:
        """Write a request; the future gets its answer, or the reason there is none.

        Raises:
            Dropped: the connection is closing (a closing transport drops what is written).
        """
        assert self._transport is not None and self._waiter is None
        if not self.usable:
            raise Dropped(partial=False)
        self._waiter = asyncio.get_running_loop().create_future()
        self._transport.write(message)
        return self._waiter

    def expire(self) -> None:
        """The deadline passed: fail the request and drop the connection."""
        self._finish(error=TimeoutError())
        self.abort()

    def abort(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.abort()

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport, only look like one
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._waiter is None:  # bytes nobody asked for: the connection is out of step
            self.abort()
            return
        self._buffer += data
        try:
            answer = self._parse()
        except (ProtocolError, AnswerTooLarge) as exc:
            self._finish(error=exc)
            self.abort()
            return
        if answer is not None:
            self._finish(answer=answer)

    def eof_received(self) -> bool:
        self._eof = True
        return False  # close the transport; connection_lost settles the request

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is None:
            return
        framed_by_close = self._head is not None and self._length is None and self._chunks is None
        if framed_by_close and self._eof:  # the server ended it: the body is whole
            assert self._head is not None
            status, headers, _ = self._head
            self._finish(answer=Answer(status, headers, bytes(self._buffer), keep_alive=False))
        else:  # reset, aborted, or ended before the framing said the answer was complete
            self._finish(error=Dropped(partial=bool(self._buffer) or self._head is not None))

    # -- parsing ----------------------------------------------------------------------------

    def _finish(self, *, answer: Answer | None = None, error: Exception | None = None) -> None:
        waiter, self._waiter = self._waiter, None
        self._head, self._length, self._chunks = None, None, None
        if answer is not None and self._buffer:
            answer = Answer(answer.status, answer.headers, answer.body, keep_alive=False)
        self._buffer.clear()
        if waiter is None or waiter.done():
            return
        if error is not None:
            waiter.set_exception(error)
        else:
            assert answer is not None
            waiter.set_result(answer)

    def _parse(self) -> Answer | None:
        """The answer once all of it is in the buffer (its bytes taken out), else None."""
        buffer = self._buffer
        while self._head is None:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > MAX_HEAD_BYTES:
                    raise ProtocolError("the answer's head is too long")
                return None
            status, headers, keep_alive = _parse_head(bytes(buffer[:end]))
            del buffer[: end + 4]
            if 100 <= status < 200:
                continue  # an interim answer (100 Continue): the real one follows
            self._head = (status, headers, keep_alive)
            self._framing(status, headers)
        status, headers, keep_alive = self._head
        if self._chunks is not None:
            found = self._chunks.read(buffer)
            if found is None:
                return None
            body, used = found
            del buffer[:used]
        elif self._length is not None:
            if len(buffer) < self._length:
                return None
            body = bytes(buffer[: self._length])
            del buffer[: self._length]
        else:  # framed by the end of the connection
            if len(buffer) > transports.MAX_BODY_BYTES:
                raise AnswerTooLarge(transports.MAX_BODY_BYTES)
            return None
        return Answer(status, headers, body, keep_alive)

    def _framing(self, status: int, headers: dict[str, str]) -> None:
        if status in (204, 304):
            self._length = 0
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            self._chunks = _Dechunker()
        elif "content-length" in headers:
            text = headers["content-length"]
            if not (text.isascii() and text.isdigit()):  # "²" is a digit to isdigit()
                raise ProtocolError("Content-Length", text)
            self._length = int(text)
            if self._length > transports.MAX_BODY_BYTES:
                raise AnswerTooLarge(transports.MAX_BODY_BYTES)


def _header_safe(text: str) -> bool:
    """Printable ASCII only: what a request line or header value can carry as it is."""
    return text.isascii() and text.isprintable()


def _decoded(answer: Answer) -> bytes:
    """The body without its content coding: none is asked for, but a server may use one.

    Raises:
        AnswerTooLarge: it decompresses to more than the body limit.
        ValueError: a coding other than gzip or deflate, or a body that does not decode.
    """
    return inflate(answer.body, answer.headers.get("content-encoding", "identity"))


def _parse_head(raw: bytes) -> tuple[int, dict[str, str], bool]:
    """Status, headers and whether the connection stays open, from an answer's head."""
    status_line, *lines = raw.decode("latin-1").split("\r\n")
    version, _, rest = status_line.partition(" ")
    code = rest[:3]
    if not version.startswith("HTTP/1.") or not (code.isascii() and code.isdigit()):
        raise ProtocolError("status line", status_line)
    headers: dict[str, str] = {}
    for line in lines:
        name, colon, value = line.partition(":")
        if not colon:
            raise ProtocolError("header line", line)
        headers[name.strip().lower()] = value.strip()
    tokens = {token.strip() for token in headers.get("connection", "").lower().split(",")}
    keep_alive = "keep-alive" in tokens if version == "HTTP/1.0" else "close" not in tokens
    return int(code), headers, keep_alive


MAX_CHUNK_LINE_BYTES = 4096
"""Longest chunk-size line (its extensions included) or trailer line accepted."""

_HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")


class _Dechunker:
    """Reads one chunked body out of a connection's buffer as its bytes arrive.

    It keeps where it got to between reads, so each byte's framing is parsed once: parsed
    from the start on every read, an answer padded to a million one-byte chunks took
    seconds of the event loop per read. It only notes where the chunks lie, and copies them
    out once all have come.
    """

    def __init__(self) -> None:
        self.lines = 0
        """Chunk-size and trailer lines parsed: what a read costs, for the tests."""
        self._spans: list[tuple[int, int]] = []
        self._size_total = 0
        self._position = 0
        """Where the next chunk-size (or trailer) line starts in the buffer."""
        self._searched = 0
        """Where the search for the end of that line goes on from: it did not end before."""
        self._chunk: int | None = None
        """The size of the chunk whose data comes next, once its size line was read."""
        self._trailers_at: int | None = None
        """Where the trailers start, once the last chunk was read."""

    def read(self, buffer: bytearray) -> tuple[bytes, int] | None:
        """The body and the bytes it spans at the buffer's start, or None until all came.

        The buffer holds what came since the first call, unchanged, plus what came since.

        Raises:
            ProtocolError: the bytes are not a chunked body.
            AnswerTooLarge: its chunks add up to more than the body limit.
        """
        while True:
            if self._chunk is not None:
                size, position = self._chunk, self._position
                if len(buffer) < position + size + 2:
                    return None
                if buffer[position + size : position + size + 2] != b"\r\n":
                    raise ProtocolError("a chunk does not end where its size says")
                self._spans.append((position, size))
                self._position = self._searched = position + size + 2
                self._chunk = None
            line = self._line(buffer)
            if line is None:
                return None
            if self._trailers_at is not None:
                if not line:  # the empty line after the trailers: the body is whole
                    spans = self._spans
                    body = b"".join(bytes(buffer[start : start + n]) for start, n in spans)
                    return body, self._position
                if self._position - self._trailers_at > MAX_HEAD_BYTES:
                    raise ProtocolError("the answer's trailers are too long")
                continue
            size = _chunk_size(line)
            if size == 0:
                self._trailers_at = self._position
                continue
            self._size_total += size
            if self._size_total > transports.MAX_BODY_BYTES:
                raise AnswerTooLarge(transports.MAX_BODY_BYTES)
            self._chunk = size

    def _line(self, buffer: bytearray) -> bytes | None:
        """The next line (taken), or None until its end has come."""
        end = buffer.find(b"\r\n", self._searched)
        if end < 0:
            if len(buffer) - self._position > MAX_CHUNK_LINE_BYTES:
                raise ProtocolError("a chunk-size or trailer line is too long")
            self._searched = max(self._position, len(buffer) - 1)  # "\r" may end it
            return None
        line = bytes(buffer[self._position : end])
        self._position = self._searched = end + 2
        self.lines += 1
        return line


def _chunk_size(line: bytes) -> int:
    """A chunk's size from its size line: hex digits, then any extensions after ``;``."""
    digits = line.split(b";", 1)[0].strip(b" \t")
    if not digits or not _HEX_DIGITS.issuperset(digits):  # int() takes "-2", "0x10", "1_0"
        raise ProtocolError("chunk size", digits.decode("latin-1"))
    return int(digits, 16)
