"""How failures of an OpenAI-protocol request become trig-stream's backend errors.

=====================================  ==========================================
what happened                          raised
=====================================  ==========================================
429                                    :class:`RateLimitError`, with Retry-After
5xx, 408, 409                          :class:`RetryableError`, with Retry-After
refused or reset connection            :class:`UnreachableError` (retryable)
timeout                                :class:`AnswerTimeoutError` (unreachable)
a body that is not a completion        :class:`RetryableError`
a body over the size limit             :class:`RetryableError` (malformed)
401, 403                               :class:`FatalBackendError` (one message)
3xx, a redirect (never followed)       :class:`FatalBackendError` naming where it points
304 (no redirect: nothing to send on)  :class:`RetryableError` (malformed)
404                                    :class:`NotFoundError` (an :class:`ItemError`)
any other 4xx                          :class:`ItemError` with the status and reason
=====================================  ==========================================

:func:`classify` reads what the ``openai`` SDK raised; the http and aiohttp transports call the
functions below it directly with the status, headers and body they got. Messages never quote
the API key: server text is scrubbed of it (some providers echo the key they received; see
:func:`~trig_stream.backends.api_keys.scrub`, which finds it escaped too) and
the client's exception is not chained, since its text and request carry what the server said.
"""

from __future__ import annotations

import datetime
import email.utils
import re
import time
from collections.abc import Callable, Mapping

from trig_stream.backends.api_keys import scrub
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

REASON_CHARS = 200
"""Longest server reason quoted in an error message."""

CONTENT_REFUSAL = re.compile(r"safety|polic(y|ies)|content[ _]?filter|moderation|flagged", re.I)
"""What a refusal of one request's content says, in its error code or message (OpenAI's
safety system: ``content_policy_violation``, ``moderation_blocked``; Azure's content
filter): the request's own failure, never a sign that every request would fail alike."""

REFUSALS_TO_STOP = 8
"""Refusals (HTTP 4xx) an API may answer before its first success, or answers without
logprobs (or with fewer top logprobs than asked) before its first with them, without stopping
the run: that many in a row mean every request would end the same way. A content filter's
refusals (:data:`CONTENT_REFUSAL`) never count. The ``transformers`` judge reads requests over
its context before its first judged one alike. (404s after a success have their own, larger
count: :data:`~trig_stream.backends.judges.endpoints.NOT_FOUND_TO_LOSE`.)"""


class AnswerTooLarge(ValueError):
    """An answer body over the transports' size limit, as it came or once decompressed."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"an answer of more than {limit:,} bytes")


RETRY_AFTER_SECONDS = re.compile(r"[0-9]+(\.[0-9]+)?")
"""A wait in seconds as ``Retry-After`` (or milliseconds as ``retry-after-ms``) gives it:
digits, as HTTP's delta-seconds, or a decimal, as some servers send; never a sign, an
exponent, ``_``, ``inf`` or ``nan``, which Python's ``float`` would take."""

_ASCTIME = re.compile(r"[A-Z][a-z]{2} [A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d \d{4}")
"""C's asctime date (``Sun Nov  6 08:49:37 1994``), an HTTP date without a zone: GMT."""


def parse_retry_after(
    headers: Mapping[str, str], *, now: Callable[[], float] = time.time
) -> float | None:
    """Seconds to wait according to ``retry-after-ms`` or ``Retry-After`` (seconds or a date).

    A ``retry-after-ms`` that is no number of milliseconds leaves ``Retry-After`` to say.
    Dates are read in each of HTTP's three forms (RFC 9110: IMF-fixdate, RFC 850, asctime).

    Returns None when neither header is present or readable (a date out of range included);
    never a negative number.
    """
    lowered = {key.lower(): value.strip() for key, value in headers.items()}
    millis = lowered.get("retry-after-ms")
    if millis is not None and RETRY_AFTER_SECONDS.fullmatch(millis):
        return float(millis) / 1000.0
    value = lowered.get("retry-after")
    if value is None:
        return None
    if RETRY_AFTER_SECONDS.fullmatch(value):
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
        if when.tzinfo is None:
            # No zone: an asctime date is GMT; another form without one is not HTTP's.
            if not _ASCTIME.fullmatch(value):
                return None
            when = when.replace(tzinfo=datetime.UTC)
        timestamp = when.timestamp()
    except (TypeError, ValueError, OverflowError, IndexError):
        # A year, day, time or zone past what a date holds (year 99999999999): no wait
        # the server could mean, so none is taken from it, as from any unreadable one.
        return None
    return max(0.0, timestamp - now())


def classify(
    exc: Exception,
    *,
    endpoint: str,
    secret: str | None,
    key_source: str,
    timeout_s: float,
) -> BackendError:
    """The backend error that ``exc``, raised by the ``openai`` SDK, stands for.

    Args:
        exc: what the SDK raised.
        endpoint: the base URL asked, for the message.
        secret: the API key in use, scrubbed from any text quoted from the server.
        key_source: where the key came from, for the credentials message.
        timeout_s: the request timeout, for the message.
    """
    import openai
    import pydantic

    too_large = next((e for e in exception_chain(exc) if isinstance(e, AnswerTooLarge)), None)
    if too_large is not None:  # raised while the SDK read the body, wrapped or not
        return malformed_error(endpoint, str(too_large))
    if isinstance(exc, openai.APIStatusError):
        return status_error(
            exc.status_code,
            exc.response.headers,
            exc.body,
            endpoint=endpoint,
            secret=secret,
            key_source=key_source,
        )
    if isinstance(exc, openai.APIConnectionError):  # timeouts included
        causes = _cause_names(exc)
        # The aiohttp transport reports a dropped connection as a connect timeout; the
        # underlying aiohttp error tells the two apart.
        dropped = next((name for name in causes if name in _DROPPED), None)
        if dropped is not None or not isinstance(exc, openai.APITimeoutError):
            return connection_error(endpoint, dropped or (causes[-1] if causes else None))
        return timeout_error(endpoint, timeout_s)
    if isinstance(exc, openai.APIResponseValidationError | pydantic.ValidationError | ValueError):
        return malformed_error(endpoint, type(exc).__name__)
    unreadable = aiohttp_malformed(exc)  # what the SDK's aiohttp transport let through
    if unreadable is not None:
        return malformed_error(endpoint, unreadable)
    return RetryableError(f"judge at {endpoint}: {type(exc).__name__}")


def aiohttp_malformed(exc: BaseException) -> str | None:
    """What is wrong with an answer aiohttp could not read (``exc`` raised by it, or from what
    it raised), or None for another failure: a body cut off, a connection lost.

    The server's words are not quoted: aiohttp's message shows the offending line, which may
    echo the key; the name of its parser's error says what kind of fault it was.
    """
    from aiohttp import ClientResponseError, http_exceptions

    chain = exception_chain(exc)
    if any(isinstance(e, http_exceptions.ContentEncodingError) for e in chain):
        return "a body whose Content-Encoding does not decode"
    if any(isinstance(e, ClientResponseError) for e in chain):  # a head that does not parse
        parser_error = next(
            (e for e in reversed(chain) if isinstance(e, http_exceptions.HttpProcessingError)),
            exc,
        )
        return f"not an HTTP answer: {type(parser_error).__name__}"
    return None


def status_error(
    status: int,
    headers: Mapping[str, str],
    body: object,
    *,
    endpoint: str,
    secret: str | None,
    key_source: str,
) -> BackendError:
    """The backend error for an answer with HTTP ``status`` >= 300.

    Args:
        status: the HTTP status.
        headers: the answer's headers (for Retry-After, and a redirect's Location).
        body: the answer's body: its ``error`` object when it has one, else its text.
        endpoint: the base URL asked, for the message.
        secret: the API key in use, scrubbed from any text quoted from the server.
        key_source: where the key came from, for the credentials message.
    """
    if status == 304:  # answers a conditional GET: no redirect, and no completion either
        return malformed_error(endpoint, "HTTP 304 Not Modified, which answers no POST")
    if status < 400:
        return redirect_error(status, headers, endpoint=endpoint, secret=secret)
    if status in (401, 403):
        what = "rejected the API key" if status == 401 else "denied access with this API key"
        return FatalBackendError(f"judge at {endpoint} {what} (HTTP {status}); check {key_source}")
    reason = server_reason(body, secret)
    retry_after = parse_retry_after(headers)
    if status == 429:
        return RateLimitError(
            f"judge at {endpoint}: HTTP 429 rate limited: {reason}", retry_after=retry_after
        )
    if status >= 500 or status in (408, 409):
        return RetryableError(
            f"judge at {endpoint}: HTTP {status}: {reason}", retry_after=retry_after
        )
    # What the server said, apart from our own words around it (the endpoint's URL, which
    # may hold "/safety/"): a content filter is told by that alone.
    said = _server_said(body, secret)
    if status == 404:
        return NotFoundError(f"judge at {endpoint}: HTTP 404: {reason}", server_said=said)
    return ItemError(f"judge at {endpoint}: HTTP {status}: {reason}", server_said=said)


def redirect_error(
    status: int, headers: Mapping[str, str], *, endpoint: str, secret: str | None
) -> FatalBackendError:
    """A redirect (HTTP 3xx): every request would go to the wrong place, so the run stops.

    No transport follows one: a POST sent on to another host would carry the key there.
    Where it points is quoted scrubbed of the key (see :func:`redirect_target`).
    """
    where = redirect_target(headers, secret)
    return FatalBackendError(
        f"judge at {endpoint} redirects (HTTP {status}) to {where}: set base_url to where it points"
    )


def redirect_target(headers: Mapping[str, str], secret: str | None) -> str:
    """Where a redirect's ``Location`` header points, scrubbed of the key (a query may echo
    it, also URL-encoded) and cut short; ``elsewhere`` when it names no place."""
    where = next((value for name, value in headers.items() if name.lower() == "location"), "")
    return scrub(where, secret)[:REASON_CHARS] or "elsewhere"


def connection_error(endpoint: str, detail: str | None) -> UnreachableError:
    """A refused, reset or dropped connection; ``detail`` names what happened."""
    what = detail or "connection error"
    return UnreachableError(f"judge at {endpoint}: connection failed ({what})")


def timeout_error(endpoint: str, timeout_s: float) -> AnswerTimeoutError:
    """No whole answer within the request timeout."""
    return AnswerTimeoutError(f"judge at {endpoint}: no answer within {timeout_s:g} s")


def malformed_error(endpoint: str, detail: str) -> RetryableError:
    """An answer that is not a chat completion."""
    return RetryableError(f"judge at {endpoint}: malformed answer ({detail})")


_DROPPED = frozenset(
    {
        "ServerDisconnectedError",
        "ClientOSError",
        "ClientConnectorError",
        "ConnectionResetError",
        "ConnectionRefusedError",
        "RemoteProtocolError",
    }
)


def _cause_names(exc: BaseException) -> list[str]:
    return [type(cause).__name__ for cause in exception_chain(exc)[1:]]


def exception_chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it was raised from or during, in that order."""
    chain: list[BaseException] = []
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    return chain


def _server_said(body: object, secret: str | None) -> str:
    """The error code (when a string) and message of an error answer's body, as one text."""
    code = body.get("code") if isinstance(body, dict) else None
    message = body.get("message") if isinstance(body, dict) else None
    text = message if isinstance(message, str) and message else str(body or "")
    return scrub(f"{code if isinstance(code, str) else ''} {text}".strip(), secret)


def server_reason(body: object, secret: str | None) -> str:
    """An error body's message (or the body itself), the key masked, on one line, cut short."""
    message = body.get("message") if isinstance(body, dict) else None
    text = message if isinstance(message, str) and message else str(body or "")
    # Scrub before cutting, so that no piece of the key survives at the cut.
    text = " ".join(scrub(text, secret).split())
    return text[:REASON_CHARS] + ("…" if len(text) > REASON_CHARS else "") or "no reason given"
