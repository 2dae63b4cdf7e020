"""Small reads of an inference server beside its chat API: ``/health`` and ``/metrics``.

vLLM serves ``GET /health`` (200 once the model is loaded) and Prometheus text on
``GET /metrics``, where ``vllm:num_requests_running`` and ``vllm:num_requests_waiting`` say
how busy it is. These probes are one plain GET each, made with anyio's own sockets so that
they work on any event loop and never carry the API key.
"""

from __future__ import annotations

import math
import string
from urllib.parse import SplitResult, quote, urlsplit

import anyio
from anyio.abc import ByteStream

from trig_stream.backends.base import ServerLoad
from trig_stream.config_fields import ascii_host

MAX_BYTES = 4 * 1024**2
"""Longest answer read from a probe; a metrics page is a few tens of kilobytes."""
RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"


def url_host(host: str) -> str:
    """``host`` as a URL writes it: an IPv6 address in brackets (``[::1]``), others as they are."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def request_target(path: str) -> str:
    """``path`` as a request line carries it: what is not printable ASCII percent-encoded in
    UTF-8, as aiohttp and httpx send it (``/vé`` -> ``/v%C3%A9``); an ``%XX`` is kept as is."""
    return quote(path, safe=string.punctuation)


def ascii_netloc(parts: SplitResult) -> str:
    """A URL's host and port as a ``Host`` header carries them: the host in its IDNA form.

    Raises:
        ValueError: the host is a name that IDNA cannot write.
    """
    if parts.netloc.isascii():
        return parts.netloc
    host = url_host(ascii_host(parts.hostname or ""))
    return host if parts.port is None else f"{host}:{parts.port}"


class ProbeError(Exception):
    """A probe got no usable HTTP answer."""


async def http_get(url: str, *, timeout_s: float) -> tuple[int, str]:
    """GET ``url`` (``http`` or ``https``) and return the status code and the body's text.

    Raises:
        ProbeError: no connection, no answer within ``timeout_s``, or not an HTTP answer.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ProbeError(f"not an http(s) URL: {url}")
    try:
        host, netloc = ascii_host(parts.hostname), ascii_netloc(parts)
    except ValueError as exc:
        raise ProbeError(f"{url}: {exc}") from None
    tls = parts.scheme == "https"
    port = parts.port or (443 if tls else 80)
    path = request_target(parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    # HTTP/1.0 asks for a plain body ended by the connection's close (never chunked).
    request = f"GET {path} HTTP/1.0\r\nHost: {netloc}\r\nAccept: */*\r\n\r\n"
    data = bytearray()
    try:
        with anyio.fail_after(timeout_s):
            stream: ByteStream
            if tls:
                stream = await anyio.connect_tcp(host, port, tls=True)
            else:
                stream = await anyio.connect_tcp(host, port)
            async with stream:
                await stream.send(request.encode("ascii"))
                while len(data) <= MAX_BYTES:
                    try:
                        data += await stream.receive()
                    except (anyio.EndOfStream, anyio.BrokenResourceError):
                        break
    except TimeoutError:
        raise ProbeError(f"no answer from {url} within {timeout_s:g} s") from None
    except OSError as exc:
        raise ProbeError(f"cannot connect to {url}: {exc.strerror or exc}") from None
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split()
    if len(status_line) < 2 or not status_line[0].startswith(b"HTTP/"):
        raise ProbeError(f"{url} did not answer in HTTP")
    try:
        status = int(status_line[1])
    except ValueError:
        raise ProbeError(f"{url} answered a malformed status line") from None
    return status, body.decode("utf-8", errors="replace")


def server_root(base_url: str) -> str:
    """The server's root of an OpenAI base URL: ``http://h:8000/v1`` -> ``http://h:8000``."""
    root = base_url.rstrip("/")
    return root.removesuffix("/v1")


def parse_load(text: str) -> ServerLoad | None:
    """The running and waiting requests in a Prometheus page, summed over label sets.

    Returns None when the page has neither gauge with a finite value of 0 or more (not a
    vLLM server, or one that does not know its load: ``NaN``, ``+Inf``, a count below 0).
    """
    totals = {RUNNING: 0.0, WAITING: 0.0}
    found = False
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        # Any whitespace parts the name, its labels, the value and a timestamp.
        if "{" in line:
            name = line.split("{", 1)[0].rstrip()
            fields = line.rsplit("}", 1)[-1].split()
        else:
            name, *fields = line.split()
        if name not in totals or not fields:
            continue
        try:
            value = float(fields[0])
        except ValueError:
            continue
        if not math.isfinite(value) or value < 0:
            # NaN or +Inf is valid Prometheus, and says nothing of the queue; nor does a
            # count below 0, which summed with the others would hide a real queue.
            continue
        totals[name] += value
        found = True
    if not found or not all(map(math.isfinite, totals.values())):
        return None  # (a sum of huge gauges overflowed: no count of requests)
    return ServerLoad(running=round(totals[RUNNING]), waiting=round(totals[WAITING]))


async def read_load(base_url: str, *, timeout_s: float) -> ServerLoad | None:
    """The load that the server behind ``base_url`` reports; None when it reports none.

    Never raises for an unreachable or non-vLLM server: the load is then unknown (None).
    """
    try:
        status, text = await http_get(server_root(base_url) + "/metrics", timeout_s=timeout_s)
    except ProbeError:
        return None
    return parse_load(text) if status == 200 else None
