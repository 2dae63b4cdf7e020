"""The ``http`` transport's HTTP/1.1 handling, against a scripted server on loopback.

``test_judge_openai`` runs every judge request and fault through this transport against the
simulated judge (aiohttp's server: Content-Length answers, keep-alive). Here a bare asyncio
server answers with exactly the bytes each test gives, for what that server never sends:
chunked and read-to-close bodies, interim answers, answers in pieces, closed and
out-of-step connections, and broken framing.
"""

from __future__ import annotations

import asyncio
import gzip
import itertools
import json
import shutil
import socket
import ssl
import struct
import subprocess
import zlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote

import anyio
import anyio.lowlevel
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trig_stream.backends.judges import http1, transports
from trig_stream.backends.judges.http1 import HttpTransport
from trig_stream.backends.judges.transports import (
    IMAGE_SLOT,
    Client,
    EncodedImage,
    open_transport,
)
from trig_stream.errors import (
    FatalBackendError,
    ItemError,
    RateLimitError,
    RetryableError,
    UnreachableError,
)

pytestmark = pytest.mark.anyio

BODY = {"model": "m", "messages": [{"role": "user", "content": [{"image_url": IMAGE_SLOT}]}]}
IMAGE = EncodedImage.of("data:image/png;base64,AAAA")
ANSWER = b'{"choices": [{"index": 0}]}'
DECODED = {"choices": [{"index": 0}]}


@pytest.fixture(params=["asyncio", "uvloop"])
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    # The transport is built on asyncio's protocols: on asyncio's own event loop, and on
    # uvloop, which applications that embed the engine often run (its transports are not
    # asyncio.Transport subclasses).
    if request.param == "uvloop":
        pytest.importorskip("uvloop")
    return "asyncio", {"use_uvloop": request.param == "uvloop"}


def with_length(body: bytes = ANSWER, *headers: str) -> bytes:
    head = "".join(f"{h}\r\n" for h in headers)
    return f"HTTP/1.1 200 OK\r\n{head}Content-Length: {len(body)}\r\n\r\n".encode() + body


# What the server does for one request: the bytes to send, in pieces (each written and
# drained on its own), then whether to close the connection; or HANG (never answer).
Reply = tuple[list[bytes], bool]
HANG: Reply = ([], False)
RESET = b"<reset the connection>"
"""A piece that makes the server reset the connection (RST) instead of writing."""


@dataclass
class Scripted:
    """A loopback server answering each request with the next scripted reply."""

    replies: list[Reply]
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    received: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                self.requests.append(head + await reader.readexactly(length))
                self.received.set()
                pieces, close = self.replies.pop(0)
                if not pieces and not close:
                    await reader.read()  # hang until the client gives up and closes
                    break
                for piece in pieces:
                    if piece is RESET:  # linger 0: close with RST, not FIN
                        linger = struct.pack("ii", 1, 0)
                        writer.get_extra_info("socket").setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, linger
                        )
                        writer.transport.abort()
                        return
                    writer.write(piece)
                    await writer.drain()
                if close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@asynccontextmanager
async def scripted(*replies: Reply) -> AsyncIterator[Scripted]:
    script = Scripted(list(replies))
    server = await asyncio.start_server(script.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    script.url = f"http://127.0.0.1:{port}/v1"
    async with server:
        yield script


@asynccontextmanager
async def transport_to(script: Scripted, timeout_s: float = 5) -> AsyncIterator[HttpTransport]:
    transport = HttpTransport(script.url, "sk-test", "TEST_KEY", timeout_s)
    try:
        yield transport
    finally:
        await transport.aclose()


def chunked(*chunks: bytes) -> bytes:
    body = b"".join(f"{len(c):x};ext=1\r\n".encode() + c + b"\r\n" for c in chunks)
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    return head + body + b"0\r\nX-Trailer: 1\r\n\r\n"


@pytest.mark.parametrize(
    "reply",
    [
        ([with_length()], False),
        ([chunked(ANSWER[:5], ANSWER[5:])], False),
        ([b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n" + ANSWER], True),
        ([b"HTTP/1.1 100 Continue\r\n\r\n" + with_length()], False),
    ],
    ids=["content-length", "chunked", "read-to-close", "interim-answer"],
)
async def test_every_framing_gives_the_same_answer(reply: Reply) -> None:
    async with scripted(reply) as script, transport_to(script) as transport:
        assert await transport.post(BODY, IMAGE) == DECODED
    request = script.requests[0]
    assert request.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert b"Authorization: Bearer sk-test\r\n" in request
    assert request.endswith(b'{"image_url":"data:image/png;base64,AAAA"}]}]}')


@pytest.mark.parametrize("whole", [with_length(), chunked(ANSWER[:7], ANSWER[7:])])
async def test_an_answer_arriving_byte_by_byte(whole: bytes) -> None:
    pieces = [whole[i : i + 1] for i in range(len(whole))]
    async with scripted((pieces, False)) as script, transport_to(script) as transport:
        assert await transport.post(BODY, IMAGE) == DECODED


async def test_keep_alive_reuses_one_connection_and_close_does_not() -> None:
    kept = [([with_length()], False)] * 3
    async with scripted(*kept) as script, transport_to(script) as transport:
        for _ in range(3):
            assert await transport.post(BODY, IMAGE) == DECODED
    assert script.connections == 1
    closing = [([with_length(ANSWER, "Connection: close")], True)] * 3
    async with scripted(*closing) as script, transport_to(script) as transport:
        for _ in range(3):
            assert await transport.post(BODY, IMAGE) == DECODED
    assert script.connections == 3


async def test_an_idle_connection_the_server_closed_is_not_reused() -> None:
    replies = [([with_length()], True), ([with_length()], False)]  # closed without saying so
    async with scripted(*replies) as script, transport_to(script) as transport:
        assert await transport.post(BODY, IMAGE) == DECODED
        with anyio.fail_after(5):
            # Until the client's protocol has seen the server's close: nothing to wait on.
            while not all(c.closed for c in transport._idle):
                await anyio.lowlevel.checkpoint()
        assert await transport.post(BODY, IMAGE) == DECODED
    assert script.connections == 2


async def test_a_connection_closing_but_not_yet_closed_is_not_reused() -> None:
    """A closing transport drops what is written: a request there would wait for nothing."""
    async with (
        scripted(*[([with_length()], False)] * 2) as script,
        transport_to(script, timeout_s=1) as transport,
    ):
        assert await transport.post(BODY, IMAGE) == DECODED
        (idle,) = transport._idle
        assert idle._transport is not None
        idle._transport.close()  # closing now; its connection_lost runs on a later turn
        assert await transport.post(BODY, IMAGE) == DECODED
    assert script.connections == 2


async def test_bytes_after_an_answer_drop_the_connection() -> None:
    replies = [([with_length() + b"HTTP/1.1 200 OK\r\n"], False), ([with_length()], False)]
    async with scripted(*replies) as script, transport_to(script) as transport:
        assert await transport.post(BODY, IMAGE) == DECODED
        assert await transport.post(BODY, IMAGE) == DECODED
    assert script.connections == 2


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (b"HELLO\r\n\r\n", "status line"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "header line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -4\r\n\r\n", "Content-Length"),
        # "²" in Latin-1, a digit to str.isdigit() that int() refuses: the parser raised
        # inside the protocol's callback, and the request waited for its timeout.
        (b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\n", "Content-Length"),
        (b"HTTP/1.1 \xb200 OK\r\n\r\n", "status line"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabcd\r\n", "a chunk does not"),
        # What int(text, 16) takes besides hex digits: a negative size lowered the total
        # held to the body limit.
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-2\r\n", "chunk size '-2'"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x1\r\n", "chunk size '0x1'"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1_0\r\n", "chunk size '1_0'"),
    ],
)
async def test_broken_framing_is_a_retryable_malformed_answer(answer: bytes, reason: str) -> None:
    async with scripted(([answer], False)) as script, transport_to(script) as transport:
        with pytest.raises(
            RetryableError, match=f"malformed answer \\(not an HTTP answer: {reason}"
        ):
            await transport.post(BODY, IMAGE)


LONG_KEY = "sk-proj-" + "Zq9Xp7Wk" * 8
"""A key longer than the 40 characters of a head line quoted: cut before it is masked, the
start of it would be left in the message."""


@pytest.mark.parametrize(
    "answer",
    [
        f"HTTP/1.1 Bearer {LONG_KEY}\r\nContent-Length: 2\r\n\r\n{{}}",
        f"HTTP/1.1 200 OK\r\nX-Echo Bearer {LONG_KEY}\r\nContent-Length: 2\r\n\r\n{{}}",
        f"HTTP/1.1 200 OK\r\nContent-Length: {LONG_KEY}\r\n\r\n",
        f"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{LONG_KEY}\r\n",
        f"HTTP/1.1 200 OK\r\nContent-Encoding: {LONG_KEY}\r\nContent-Length: 2\r\n\r\n{{}}",
    ],
    ids=["status-line", "header-line", "content-length", "chunk-size", "content-coding"],
)
async def test_a_malformed_answer_echoing_the_key_is_quoted_without_it(answer: str) -> None:
    # The head line was quoted as it came, into the judgement's error and the journal.
    async with scripted(([answer.encode()], False)) as script:
        transport = HttpTransport(script.url, LONG_KEY, "TEST_KEY", 5)
        try:
            with pytest.raises(RetryableError, match="malformed answer") as caught:
                await transport.post(BODY, IMAGE)
        finally:
            await transport.aclose()
    assert "***" in str(caught.value)
    assert LONG_KEY[:12] not in str(caught.value)


class FindCounting(bytearray):
    """A connection's buffer that counts the searches made in it."""

    finds = 0

    def find(self, *args: Any) -> int:
        self.finds += 1
        return super().find(*args)


def fed(pieces: list[bytes], buffer: bytearray | None = None) -> http1.Answer:
    """The answer a connection reads from ``pieces``, each arriving on its own."""
    loop = asyncio.new_event_loop()
    try:
        connection = http1._Connection()
        if buffer is not None:
            connection._buffer = buffer
        connection._transport = cast(asyncio.Transport, NullTransport())
        waiter: asyncio.Future[http1.Answer] = loop.create_future()
        connection._waiter = waiter
        for piece in pieces:
            assert not waiter.done(), "answered before all of it came"
            connection.data_received(piece)
        return waiter.result()
    finally:
        loop.close()


class NullTransport:
    def abort(self) -> None:
        pass


def test_a_chunked_answer_in_many_reads_is_parsed_once() -> None:
    # Each read parsed every chunk header from the body's start: an answer padded to 1.5 M
    # one-byte chunks held the event loop for seconds at a time.
    count = 2000
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    pieces = [head, *([b"1\r\n \r\n"] * count), b"0\r\n\r\n"]
    buffer = FindCounting()
    answer = fed(pieces, buffer)
    assert answer.body == b" " * count
    assert buffer.finds < 3 * count  # parsed from the start each time: ~count**2 / 2


@settings(max_examples=200, deadline=None)
@given(
    chunks=st.lists(st.binary(min_size=1, max_size=12), max_size=6),
    extensions=st.booleans(),
    trailers=st.lists(st.sampled_from([b"X-A: 1", b"X-Checksum: abc"]), max_size=2),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=8),
)
def test_a_chunked_body_reads_the_same_however_it_is_split(
    chunks: list[bytes], extensions: bool, trailers: list[bytes], cuts: list[int]
) -> None:
    extension = b";name=value" if extensions else b""
    body = b"".join(b"%X%s\r\n%s\r\n" % (len(c), extension, c) for c in chunks)
    whole = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        + body
        + b"0\r\n"
        + b"".join(t + b"\r\n" for t in trailers)
        + b"\r\n"
    )
    bounds = sorted({0, len(whole), *(c for c in cuts if c < len(whole))})
    pieces = [whole[a:b] for a, b in itertools.pairwise(bounds)]
    answer = fed(pieces)
    assert answer.body == b"".join(chunks)
    assert answer.keep_alive


@pytest.mark.parametrize(
    ("pieces", "detail"),
    [
        ([b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + ANSWER], "the answer was cut off"),
        ([], "the server closed the connection"),
        # Framed by the connection's end: a reset is not that end, however much came.
        ([b"HTTP/1.0 200 OK\r\n\r\n" + ANSWER, RESET], "the answer was cut off"),
    ],
)
async def test_a_connection_ending_early_is_a_connection_error(
    pieces: list[bytes], detail: str
) -> None:
    async with scripted((pieces, True)) as script, transport_to(script) as transport:
        with pytest.raises(RetryableError, match=f"connection failed \\({detail}\\)"):
            await transport.post(BODY, IMAGE)


async def test_a_timeout_fails_the_request_and_drops_its_connection() -> None:
    async with (
        scripted(HANG, ([with_length()], False)) as script,
        transport_to(script, timeout_s=0.2) as transport,
    ):
        with pytest.raises(RetryableError, match=r"no answer within 0\.2 s"):
            await transport.post(BODY, IMAGE)
        assert await transport.post(BODY, IMAGE) == DECODED
    assert script.connections == 2


@pytest.mark.parametrize("client", ["http", "aiohttp", "sdk"])
async def test_every_client_holds_a_whole_answer_to_the_timeout(client: Client) -> None:
    # A server that sends its answer a byte at a time never lets a read time out: the sdk
    # client's timeout, which holds each read, let such an answer take minutes.
    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
        try:
            while True:
                writer.write(b" ")
                await writer.drain()
                await asyncio.sleep(0.02)
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(trickle, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"
    async with server:
        transport = open_transport(client, url, secret="k", key_source="TEST_KEY", timeout_s=0.5)
        try:
            with anyio.fail_after(30):  # a safety net: the answer would take 2,000 s
                with pytest.raises(RetryableError, match=r"no answer within 0\.5 s"):
                    await transport.post(BODY, IMAGE)
        finally:
            await transport.aclose()


async def test_a_cancelled_request_drops_its_connection() -> None:
    async with (
        scripted(HANG, ([with_length()], False)) as script,
        transport_to(script) as transport,
        anyio.create_task_group() as group,
    ):
        cancelled = anyio.Event()

        async def ask() -> None:
            with anyio.CancelScope() as scope:
                group.start_soon(cancel_when_received, scope)
                await transport.post(BODY, IMAGE)
            cancelled.set()

        async def cancel_when_received(scope: anyio.CancelScope) -> None:
            await script.received.wait()
            scope.cancel()

        group.start_soon(ask)
        await cancelled.wait()
        assert transport._open == set() and transport._idle == []
        assert await transport.post(BODY, IMAGE) == DECODED
    assert script.connections == 2


@pytest.mark.parametrize(
    "encoded",
    [
        ("gzip", gzip.compress(ANSWER)),
        ("deflate", zlib.compress(ANSWER)),
        ("deflate", zlib.compress(ANSWER)[2:-4]),  # raw deflate, as some servers send it
    ],
)
async def test_compressed_answers_are_decoded(encoded: tuple[str, bytes]) -> None:
    coding, body = encoded
    reply = ([with_length(body, f"Content-Encoding: {coding}")], False)
    async with scripted(reply) as script, transport_to(script) as transport:
        assert await transport.post(BODY, IMAGE) == DECODED


@pytest.mark.parametrize("client", ["http", "aiohttp", "sdk"])
@pytest.mark.parametrize(
    "encoded",
    [
        ("gzip", gzip.compress(ANSWER)),
        ("deflate", zlib.compress(ANSWER)),
        ("deflate", zlib.compress(ANSWER)[2:-4]),
    ],
    ids=["gzip", "deflate", "raw-deflate"],
)
async def test_every_client_decodes_compressed_answers(
    client: Client, encoded: tuple[str, bytes]
) -> None:
    coding, body = encoded
    reply = ([with_length(body, f"Content-Encoding: {coding}")], False)
    async with scripted(reply) as script:
        transport = open_transport(
            client, script.url, secret="sk-test", key_source="TEST_KEY", timeout_s=5
        )
        try:
            assert await transport.post(BODY, IMAGE) == DECODED
        finally:
            await transport.aclose()


@pytest.mark.parametrize("client", ["http", "aiohttp", "sdk"])
@pytest.mark.parametrize(
    ("headers", "answer"),
    [
        ((), ANSWER),
        (("Content-Type: text/plain",), ANSWER),
        (("Content-Type: text/html",), b"<html>busy</html>"),
    ],
    ids=["no-type", "text-plain", "html"],
)
async def test_every_client_reads_the_body_whatever_its_content_type(
    client: Client, headers: tuple[str, ...], answer: bytes
) -> None:
    # The sdk client returned a JSON answer without Content-Type: application/json as a
    # string, which the judge then failed on as a malformed answer of another kind.
    async with scripted(([with_length(answer, *headers)], False)) as script:
        transport = open_transport(
            client, script.url, secret="sk-test", key_source="TEST_KEY", timeout_s=5
        )
        try:
            if answer == ANSWER:
                assert await transport.post(BODY, IMAGE) == DECODED
            else:
                with pytest.raises(
                    RetryableError, match=r"malformed answer \(the body is not JSON\)"
                ):
                    await transport.post(BODY, IMAGE)
        finally:
            await transport.aclose()


@pytest.mark.parametrize("client", ["http", "aiohttp", "sdk"])
async def test_a_429_with_a_date_out_of_range_is_a_rate_limit_without_a_wait(
    client: Client,
) -> None:
    # The date raised OverflowError: the 429 became an error judgement, never retried.
    head = b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: Mon, 01 Jan 99999999999 00:00:00 GMT"
    async with scripted(([head + b"\r\nContent-Length: 2\r\n\r\n{}"], False)) as script:
        transport = open_transport(
            client, script.url, secret="sk-test", key_source="TEST_KEY", timeout_s=5
        )
        try:
            with pytest.raises(RateLimitError, match="HTTP 429 rate limited") as caught:
                await transport.post(BODY, IMAGE)
        finally:
            await transport.aclose()
    assert caught.value.retry_after is None


@pytest.mark.parametrize("client", ["http", "aiohttp", "sdk"])
@pytest.mark.parametrize(
    "answer",
    [
        with_length(ANSWER, "Content-Encoding: gzip"),  # a gzip header over plain JSON
        with_length(ANSWER, "Content-Encoding: br"),
        b"HTTP/1.1 Bearer sk-test\r\nContent-Length: 2\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nX-Echo Bearer sk-test\r\nContent-Length: 2\r\n\r\n{}",
    ],
    ids=["gzip-over-plain", "br", "status-line", "header-line"],
)
async def test_every_client_calls_an_unreadable_answer_malformed(
    client: Client, answer: bytes
) -> None:
    # The aiohttp client called these an unreachable server: a run that had had no answer
    # yet stopped ("is its server running?"), and with several base_urls the endpoint was
    # marked unreached, where the other clients retried a malformed answer.
    async with scripted(([answer], False)) as script:
        transport = open_transport(
            client, script.url, secret="sk-test", key_source="TEST_KEY", timeout_s=5
        )
        try:
            with pytest.raises(RetryableError, match="malformed answer") as caught:
                await transport.post(BODY, IMAGE)
        finally:
            await transport.aclose()
    assert not isinstance(caught.value, UnreachableError)
    assert "sk-test" not in str(caught.value)


LIMIT = 1000
LARGE = b'{"padding": "' + b" " * 2 * LIMIT + b'"}'


@pytest.mark.parametrize("client", ["http", "aiohttp", "sdk"])
@pytest.mark.parametrize(
    "reply",
    [
        ([with_length(LARGE)], False),
        ([chunked(LARGE[:LIMIT], LARGE[LIMIT:])], False),
        ([b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + LARGE], True),
        # Small as it comes, large once decompressed: a gzip bomb, in miniature.
        ([with_length(gzip.compress(LARGE), "Content-Encoding: gzip")], False),
        ([with_length(zlib.compress(LARGE)[2:-4], "Content-Encoding: deflate")], False),
    ],
    ids=["content-length", "chunked", "read-to-close", "gzip", "raw-deflate"],
)
async def test_no_client_reads_an_answer_over_the_size_limit(
    client: Client, reply: Reply, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The aiohttp and sdk clients read any body whole (a gigabyte, into memory), and the
    # http client held the limit to the bytes as they came: a 1 MB gzip body inflated to 1 GB.
    monkeypatch.setattr(transports, "MAX_BODY_BYTES", LIMIT, raising=False)
    async with scripted(reply) as script:
        transport = open_transport(
            client, script.url, secret="sk-test", key_source="TEST_KEY", timeout_s=5
        )
        try:
            with pytest.raises(
                RetryableError, match=r"malformed answer \(an answer of more than 1,000 bytes\)"
            ):
                await transport.post(BODY, IMAGE)
        finally:
            await transport.aclose()


async def test_a_compressed_error_answer_gives_its_reason() -> None:
    body = gzip.compress(b'{"error": {"message": "model not found"}}')
    answer = b"HTTP/1.1 404 Not Found\r\nContent-Encoding: gzip\r\n"
    reply = ([answer + f"Content-Length: {len(body)}\r\n\r\n".encode() + body], False)
    async with scripted(reply) as script, transport_to(script) as transport:
        with pytest.raises(ItemError, match="HTTP 404: model not found"):
            await transport.post(BODY, IMAGE)


async def test_an_unknown_content_coding_is_a_malformed_answer() -> None:
    reply = ([with_length(b"????", "Content-Encoding: br")], False)
    async with scripted(reply) as script, transport_to(script) as transport:
        with pytest.raises(RetryableError, match="malformed answer \\(content coding 'br'\\)"):
            await transport.post(BODY, IMAGE)


async def test_a_redirect_stops_the_run_naming_where_it_points() -> None:
    answer = b"HTTP/1.1 308 Permanent Redirect\r\nLocation: https://elsewhere/v1\r\n"
    reply = ([answer + b"Content-Length: 0\r\n\r\n"], False)
    async with scripted(reply) as script, transport_to(script) as transport:
        with pytest.raises(
            FatalBackendError, match="redirects \\(HTTP 308\\) to https://elsewhere"
        ):
            await transport.post(BODY, IMAGE)


@pytest.mark.parametrize("client", ["http", "aiohttp", "sdk"])
async def test_a_304_is_a_malformed_answer_not_a_redirect(client: Client) -> None:
    # It stopped the run: "redirects (HTTP 304) to elsewhere: set base_url to where it points".
    reply = ([b"HTTP/1.1 304 Not Modified\r\n\r\n"], False)
    async with scripted(reply) as script:
        transport = open_transport(
            client, script.url, secret="sk-test", key_source="TEST_KEY", timeout_s=5
        )
        try:
            with pytest.raises(RetryableError) as caught:
                await transport.post(BODY, IMAGE)
        finally:
            await transport.aclose()
    assert str(caught.value) == (
        f"judge at {script.url}: malformed answer (HTTP 304 Not Modified, which answers no POST)"
    )


@pytest.mark.parametrize("client", ["http", "aiohttp", "sdk"])
async def test_no_client_follows_a_redirect_and_the_key_in_it_is_scrubbed(client: Client) -> None:
    # Followed, the POST would carry the key to wherever it points; quoted, the key the
    # Location echoes (plain or URL-encoded) would be in the message.
    key = "sk-test/+key"
    async with scripted(([], False)) as script:  # the script needs a URL before the reply
        location = f"{script.url}/chat/completions?key={key}&k2={quote(key, safe='')}"
        redirect = f"HTTP/1.1 307 Temporary Redirect\r\nLocation: {location}\r\n"
        script.replies[:] = [
            ([redirect.encode() + b"Content-Length: 0\r\n\r\n"], False),
            ([with_length()], False),  # what following the redirect would get
        ]
        transport = open_transport(
            client, script.url, secret=key, key_source="TEST_KEY", timeout_s=5
        )
        try:
            with pytest.raises(FatalBackendError) as caught:
                await transport.post(BODY, IMAGE)
        finally:
            await transport.aclose()
    assert str(caught.value) == (
        f"judge at {script.url} redirects (HTTP 307) to "
        f"{script.url}/chat/completions?key=***&k2=***: set base_url to where it points"
    )
    assert len(script.requests) == 1


ODD_KEY = "sk-Zq9\\Xp7\"W'k"
"""A key holding a backslash and both quotes: a body quoted as Python shows it escaped."""


@pytest.mark.parametrize("client", ["http", "aiohttp", "sdk"])
@pytest.mark.parametrize(
    ("key", "body", "reason"),
    [
        (ODD_KEY, {"detail": f"invalid token {ODD_KEY}"}, "{'detail': 'invalid token ***'}"),
        (
            ODD_KEY,
            {"error": {"code": "bad", "param": f"token {ODD_KEY}"}},
            "{'code': 'bad', 'param': 'token ***'}",
        ),
        (ODD_KEY, [f"invalid token {ODD_KEY}"], "['invalid token ***']"),
        (
            "e",
            {"error": {"message": "The server is overloaded: e"}},
            "The server is overloaded: ***",
        ),
        ("abc", {"detail": "abcd: invalid token abc"}, "{'detail': 'abcd: invalid token ***'}"),
    ],
    ids=["detail", "error-without-message", "list", "one-letter-key", "three-letter-key"],
)
async def test_a_key_a_server_echoes_is_scrubbed_escaped_or_short(
    client: Client, key: str, body: Any, reason: str
) -> None:
    # A body without a message is quoted as Python shows it, which escapes a key holding a
    # backslash or quotes: only the raw key was scrubbed. A one-letter key garbled every word
    # holding its letter ("Th*** s***rv***r").
    payload = json.dumps(body).encode()
    head = f"HTTP/1.1 500 Internal Server Error\r\nContent-Length: {len(payload)}\r\n"
    reply = ([head.encode() + b"Content-Type: application/json\r\n\r\n" + payload], False)
    async with scripted(reply) as script:
        transport = open_transport(
            client, script.url, secret=key, key_source="TEST_KEY", timeout_s=5
        )
        try:
            with pytest.raises(RetryableError) as caught:
                await transport.post(BODY, IMAGE)
        finally:
            await transport.aclose()
    assert str(caught.value) == f"judge at {script.url}: HTTP 500: {reason}"


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for ``localhost`` and its key."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost"),
            *("-addext", "subjectAltName=DNS:localhost"),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


async def test_https_with_the_systems_certificate_settings(
    certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = certificate
    server_side = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_side.load_cert_chain(cert, key)
    script = Scripted([([with_length()], False)])
    server = await asyncio.start_server(script.handle, "localhost", 0, ssl=server_side)
    port = server.sockets[0].getsockname()[1]
    async with server:
        untrusted = HttpTransport(f"https://localhost:{port}/v1", None, "k", 5)
        with pytest.raises(RetryableError, match="connection failed \\(SSLCertVerificationError"):
            await untrusted.post(BODY, IMAGE)
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # how a user trusts a private CA
        trusted = HttpTransport(f"https://localhost:{port}/v1", None, "k", 5)
        try:
            assert await trusted.post(BODY, IMAGE) == DECODED
        finally:
            await trusted.aclose()
    assert script.requests[0].startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")


async def test_a_refused_connection_is_retryable() -> None:
    async with scripted() as script:
        url = script.url
    transport = HttpTransport(url, None, "no key", 2)
    with pytest.raises(RetryableError, match="connection failed \\(ConnectionRefusedError\\)"):
        await transport.post(BODY, IMAGE)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: HttpTransport("ftp://host/v1", None, "k", 1), "not an http:// or https://"),
        (
            lambda: HttpTransport("http://host/v1", "ключ-секрет", "MY_KEY", 1),
            "the API key from MY_KEY holds characters",
        ),
        (
            lambda: HttpTransport("http://host/v1", "sk-from-a-file\n", "MY_KEY", 1),
            "holds characters an HTTP header cannot carry \\(a trailing newline\\?\\)",
        ),
        (
            lambda: HttpTransport("http://user:ключ@host/v1", None, "k", 1),
            "sends no credentials from the URL",
        ),
        (lambda: HttpTransport("http://a\u200bb/v1", None, "k", 1), "host IDNA cannot write"),
    ],
)
def test_unusable_urls_and_keys_are_refused_up_front(make: Callable[[], Any], message: str) -> None:
    with pytest.raises(FatalBackendError, match=message) as caught:
        make()
    assert "ключ" not in str(caught.value) and "секрет" not in str(caught.value)


@pytest.mark.parametrize("client", ["http", "aiohttp", "sdk"])
async def test_every_client_sends_a_non_ascii_path_percent_encoded(client: Client) -> None:
    # The http client refused the URL ("write its host and path in ASCII") and the run
    # stopped, where the other clients sent the path percent-encoded in UTF-8.
    async with scripted(([with_length()], False)) as script:
        url = script.url.replace("/v1", "/ok/vé/a%2Fb/v1")
        transport = open_transport(client, url, secret="sk-test", key_source="K", timeout_s=5)
        try:
            assert await transport.post(BODY, IMAGE) == DECODED
        finally:
            await transport.aclose()
    line = b"POST /ok/v%C3%A9/a%2Fb/v1/chat/completions HTTP/1.1\r\n"
    assert script.requests[0].startswith(line)


@pytest.mark.parametrize("anyio_backend", [("asyncio", {})])  # resolved by socket's own call
@pytest.mark.parametrize("client", ["http", "aiohttp", "sdk"])
async def test_every_client_sends_a_non_ascii_host_in_its_idna_form(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    resolve = socket.getaddrinfo
    asked: list[object] = []

    def loopback(host: object, *args: Any, **kwargs: Any) -> Any:
        asked.append(host)
        return resolve("127.0.0.1", *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", loopback)
    async with scripted(([with_length()], False)) as script:
        url = script.url.replace("127.0.0.1", "Vé.example")
        transport = open_transport(client, url, secret="sk-test", key_source="K", timeout_s=5)
        try:
            assert await transport.post(BODY, IMAGE) == DECODED
        finally:
            await transport.aclose()
    assert asked == ["xn--v-bga.example"]
    port = url.rsplit(":", 1)[1].removesuffix("/v1")
    assert f"\r\nhost: xn--v-bga.example:{port}\r\n".encode() in script.requests[0].lower()


def test_the_key_is_not_in_the_transports_repr() -> None:
    transport = HttpTransport("https://api.example.com/v1", "sk-secret", "KEY", 1)
    assert "sk-secret" not in repr(transport)


@pytest.mark.parametrize(("no_proxy", "warned"), [("", True), ("api.example.com", False)])
def test_a_proxy_in_the_environment_is_named_as_unused(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    no_proxy: str,
    warned: bool,
) -> None:
    for name in ("HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "http://user:secret@proxy:3128")
    monkeypatch.setenv("NO_PROXY", no_proxy)
    with caplog.at_level("WARNING", logger="trig_stream.backends.judges.http1"):
        HttpTransport("https://api.example.com/v1", None, "k", 1)
    assert ("does not use: it connects directly" in caplog.text) is warned
    assert "secret" not in caplog.text
