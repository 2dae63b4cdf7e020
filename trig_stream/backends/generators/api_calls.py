"""What generator backends that call an OpenAI-protocol API share: the key, error classes,
and a small bounded retry loop.

The engine retries judges, not generators: a generator's transient failure would otherwise
be recorded as a failed image at once. So API-backed generators retry inside their worker
thread, under a :class:`~trig_stream.retry.RetryPolicy`, waiting on an event a stop sets so
that no stop, graceful or hard, waits out a backoff or a Retry-After.

The API key is read from an environment variable named in the config; it never enters the
config, a record, a log line, a repr or an exception message (messages pass through
:func:`redact` before they leave).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any, TypeGuard, TypeVar

from trig_stream.backends.api_keys import key_from_env, scrub
from trig_stream.backends.judges.http_errors import (
    AnswerTooLarge,
    exception_chain,
    parse_retry_after,
    redirect_target,
    server_reason,
)
from trig_stream.backends.judges.transports import DEADLINE, cap_answers
from trig_stream.errors import (
    AnswerTimeoutError,
    BackendError,
    FatalBackendError,
    ItemError,
    NotAsked,
    NotFoundError,
    RateLimitError,
    RetryableError,
    UnreachableError,
)
from trig_stream.retry import RetryPolicy

T = TypeVar("T")

Sleep = Callable[[float, threading.Event], bool]
"""Waits up to the given seconds; returns True when the event (a stop's) fired meanwhile."""

CONTENT_REFUSAL_CODES = frozenset(
    {"contentpolicyviolation", "moderationblocked", "contentfilter", "invalidprompt"}
)
"""The error codes of a refusal of one request's content, in lower case without ``_`` or
``-`` (OpenAI's ``content_policy_violation`` and ``moderation_blocked``, and
``invalid_prompt``, its reasoning models' "your prompt was flagged as potentially violating
our usage policy"; Azure's ``content_filter`` or ``contentFilter``). An error with any other
code is no refusal, whatever its message says: ``server_error`` "content policy service
unavailable, try again" is the API's failure, retried."""

CONTENT_REFUSAL_MESSAGE = re.compile(
    r"content[ _-]?(management[ _-]?)?polic(y|ies)|moderation|content[ _-]?filter|safety system"
    r"|violat(e|es|ing) (our |the )?usage polic(y|ies)",
    re.I,
)
"""What the message of a refusal of the content says, read only for an error with no code
and of no ``server_error`` type. Narrower than the judge's
:data:`~trig_stream.backends.judges.http_errors.CONTENT_REFUSAL`: a generator's refusal is an
item failure never retried, so "The safety checker ...", "retry policy" or "flagged for
reprocessing" is no refusal."""

NOT_A_REFUSAL = re.compile(
    r"unavailable|overload|temporar|timed? ?out|busy|capacity|crash|reprocess|retry polic|retries",
    re.I,
)
"""Words of the service's own state: a message holding them is a passing failure, no refusal
("the moderation service is overloaded; please retry"). Not "try again" or "retry" alone:
refusals say them too (Azure's "... content management policy. Please modify your prompt and
retry", OpenAI's "... usage policy. Please try again with a different prompt")."""


class Refused(BackendError):
    """The API refused the request itself (a 4xx other than 404, 429 or a refusal of its
    content): an option or value every request carries, most likely."""


class ErrorAnswer(RetryableError):
    """The API answered with an error object in place of its data, under HTTP 200 (some
    servers do, when overloaded): retried as the judge retries such a malformed answer."""


class RefusalAnswer(ItemError):
    """An error object sent with HTTP 200 that refuses the request's content: the prompt's
    own failure, as the same refusal with a 4xx is."""


def wait_on_cancel(seconds: float, cancel: threading.Event) -> bool:
    """The default :data:`Sleep`: a backoff the run's stop (or cancel) event cuts short."""
    return cancel.wait(seconds)


def api_key_from_env(variable: str, *, owner: str) -> str:
    """The API key in the environment variable ``variable``
    (:func:`~trig_stream.backends.api_keys.key_from_env`), or ``""`` when ``api_key_env = ""``
    names none, for a server that takes no key (:func:`openai_client` then sends a
    placeholder, which is no secret: :func:`redact` leaves server text alone).

    Raises:
        FatalBackendError: the variable is unset or empty, or its key holds a character an
            HTTP header cannot carry.
    """
    return key_from_env(variable, owner=owner) or ""


def openai_client(base_url: str | None, key: str, timeout_s: float) -> Any:
    """A synchronous OpenAI client that never retries by itself (we do, under a policy), never
    follows a redirect (a POST sent on would carry the prompt, and the key, wherever it
    points; :func:`classify` names where instead), and that holds each call, connecting and
    reading the answer included, to ``timeout_s`` in all, and reads no answer body over
    :data:`~trig_stream.backends.judges.transports.MAX_BODY_BYTES`.

    The SDK's own timeout holds the connection and each read, not the whole answer: an
    answer that trickles in would keep its worker thread for as long as the server likes.
    The answer's stream (:func:`~trig_stream.backends.judges.transports.cap_answers`) checks
    the call's deadline between two of its pieces instead, so a call ends at most one read
    (``timeout_s``) after its deadline.
    """
    import openai

    return openai.OpenAI(
        # The SDK insists on a key: a keyless server gets (and ignores) a placeholder.
        base_url=base_url,
        api_key=key or "unused",
        max_retries=0,
        timeout=timeout_s,
        http_client=openai.DefaultHttpxClient(
            timeout=timeout_s,
            follow_redirects=False,  # the SDK's default follows them
            event_hooks={
                "request": [partial(_start_deadline, timeout_s=timeout_s)],
                "response": [cap_answers],
            },
        ),
    )


def _start_deadline(request: Any, *, timeout_s: float) -> None:
    request.extensions[DEADLINE] = (time.monotonic() + timeout_s, timeout_s)


def redact(text: str, secret: str) -> str:
    """``text`` with ``secret`` masked, by the judges' rule
    (:func:`~trig_stream.backends.api_keys.scrub`)."""
    return scrub(text, secret)


def classify(exc: Exception, secret: str, api: str = "the API") -> BackendError:
    """Map an ``openai`` SDK exception to trig-stream's error classes; ``api`` names what
    answered, for the messages that stop the run (``the images API of generator 'x'``).

    429 -> RateLimitError; 5xx, 408, 409 -> RetryableError (each with the server's
    Retry-After); 304 (which answers no POST) -> RetryableError, a malformed answer, as the
    judge takes it; another 3xx (a redirect, never followed) -> FatalBackendError naming where
    it points, as the judge's; timeouts and connection failures -> UnreachableError (retryable);
    401 / 403 -> FatalBackendError (saying that no key is configured when ``secret`` is
    empty);
    404 -> NotFoundError; a refusal of the request's content (a safety system's code or
    message, see :func:`refuses_content`) -> ItemError: the prompt's own failure. Any other
    4xx (an option the API refuses, a bad size) is :class:`Refused`, a failure of the call as
    a whole: every request would be refused alike, so before a generator's first image it
    counts towards stopping the run.
    Any other exception the call raises (an answer that is no JSON, a timeout the client
    cannot hold) is a plain :class:`BackendError`, the API's failure too: only a refusal of
    the content (and a cancelled backoff, in :func:`call_with_retries`) is an ItemError.
    """
    import openai

    if isinstance(exc, BackendError):
        return exc
    too_large = next((e for e in exception_chain(exc) if isinstance(e, AnswerTooLarge)), None)
    if too_large is not None:  # raised while the SDK read the body, and wrapped by it
        # Every call would most likely be answered alike: the API's failure, not the item's.
        return BackendError(f"the API sent {too_large}")
    if isinstance(exc, openai.APITimeoutError):
        return AnswerTimeoutError(_timed_out(exc))
    if isinstance(exc, openai.APIConnectionError):
        return UnreachableError(redact(f"cannot reach the API: {exc}", secret))
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        if status == 304:  # answers a conditional GET: no redirect, and no answer either
            return RetryableError(
                f"{api} sent a malformed answer (HTTP 304 Not Modified, which answers no POST)"
            )
        if status < 400:  # every call would go to the wrong place
            where = redirect_target(exc.response.headers, secret)
            return FatalBackendError(
                f"{api} redirects (HTTP {status}) to {where}: set base_url to where it points"
            )
        detail = redact(f"HTTP {status}: {_message(exc)}", secret)
        retry_after = parse_retry_after(exc.response.headers)
        if status == 429:
            return RateLimitError(detail, retry_after=retry_after)
        if status in (401, 403):
            # No key is sent where api_key_env = "" (see api_key_from_env): no variable to check.
            key = (
                "the API key in the environment variable that api_key_env names"
                if secret
                else "api_key_env (no key is configured)"
            )
            return FatalBackendError(f"{api} refused the credentials ({detail}); check {key}")
        if status >= 500 or status in (408, 409):
            return RetryableError(detail, retry_after=retry_after)
        if status == 404:
            return NotFoundError(detail)
        if is_content_refusal(exc):
            return ItemError(detail)
        return Refused(detail)
    # Anything else the call raised (a body that is no JSON, a timeout the client cannot
    # hold, an answer the SDK cannot read): not the prompt's fault, and every call would most
    # likely fail alike, so the API's failure, counting towards stopping the run.
    reason = redact(f"{type(exc).__name__}: {exc}", secret)
    if isinstance(exc, ValueError):  # json.JSONDecodeError among them
        return BackendError(
            f"the answer of {api} could not be read ({reason}): is base_url the root of an "
            "OpenAI-protocol API (often ending in /v1)?"
        )
    return BackendError(f"the call to {api} failed ({reason})")


def unless_an_error(answer: T, field: str, *, secret: str, api: str = "the API") -> T:
    """``answer`` (the SDK's object), unless it holds an ``error`` object and no ``field``
    (``data``, ``choices``): an error sent with HTTP 200, whose message (the key masked, on
    one line, cut short: :func:`~trig_stream.backends.judges.http_errors.server_reason`) is
    the reason, not the field the answer lacks.

    Raises:
        ErrorAnswer: the answer is such an error (retryable).
        RefusalAnswer: the error refuses the request's content (see :func:`is_content_refusal`).
    """
    said = getattr(answer, "error", None)
    if said and getattr(answer, field, None) is None:
        reason = server_reason(said, secret or None)
        code = said.get("code") if isinstance(said, dict) else None
        kind = said.get("type") if isinstance(said, dict) else None
        if refuses_content(code, kind, reason):
            coded = f"{code}: " if _named(code) else ""
            raise RefusalAnswer(f"{api} refused the request's content ({coded}{reason})")
        raise ErrorAnswer(f"{api} sent a malformed answer (an error: {reason})")
    return answer


def call_with_retries(
    call: Callable[[], T],
    *,
    policy: RetryPolicy,
    cancel: threading.Event,
    secret: str,
    sleep: Sleep = wait_on_cancel,
    stop: threading.Event | None = None,
    answered: threading.Event | None = None,
    api: str = "the API",
    unanswered_is_fatal: bool = False,
) -> T:
    """Run ``call``, retrying retryable failures under ``policy``.

    ``stop``, when given, is set as the run begins to stop, gracefully or hard (see
    :meth:`~trig_stream.backends.base.Generator.stop_waiting`): a wait for a retry waits on it
    instead of ``cancel``, and ends when it is set, the call not made again.

    ``answered``, shared by every call to one API, is set by the first call that succeeds
    or that the API refuses by itself (a 4xx); until then an HTTP 404 means a wrong base URL
    or model, and stops the run with a message that names ``api``. With
    ``unanswered_is_fatal``, so does a call that spends its retries then without reaching
    the API at all (no connection, timeouts): it is down, or at another address, and every
    call would end the same way; one whose last attempt reached the API but got no whole
    answer within the call's timeout stops it with its own message (a server up but slower
    than ``timeout_s``).

    Raises:
        NotAsked: a stop ended a wait for a retry (or came before it): the run records
            nothing, and a resume asks again.
        ItemError: cancelled during a backoff, or a refusal of the request's content.
        Refused: the API refused the request itself (see :func:`classify`).
        BackendError: the call failed otherwise (an answer that is no JSON, say).
        RetryableError: still failing after ``policy.max_attempts`` attempts.
        FatalBackendError: the credentials were refused, or a 404 came before any answer
            (or, with ``unanswered_is_fatal``, an unreachable API).
    """
    attempts = 0
    while True:
        attempts += 1
        try:
            result = call()
        except Exception as exc:
            delay = _retry_delay(
                exc,
                attempts,
                policy=policy,
                secret=secret,
                answered=answered,
                api=api,
                unanswered_is_fatal=unanswered_is_fatal,
            )
        else:
            if answered is not None:
                answered.set()
            return result
        # Waited out of the except block, where the failure's traceback held the frames of
        # the failed call, and with them its request, for the whole backoff.
        stopped = sleep(delay, cancel if stop is None else stop)
        if cancel.is_set():
            raise ItemError("cancelled")
        if stopped or (stop is not None and stop.is_set()):
            # A graceful stop: a Retry-After may ask for minutes, which the stop would wait
            # out with the whole run behind it. Nothing is asked, nothing recorded.
            raise NotAsked("the run stopped before the request was asked again")


def _retry_delay(
    exc: Exception,
    attempts: int,
    *,
    policy: RetryPolicy,
    secret: str,
    answered: threading.Event | None,
    api: str,
    unanswered_is_fatal: bool,
) -> float:
    """How long to wait before retrying after the ``attempts``-th call failed with ``exc``
    (see :func:`call_with_retries`).

    Raises:
        BackendError: ``exc`` is not to be retried, as its classified error (or a fatal one).
    """
    error = classify(exc, secret, api)
    unanswered = answered is not None and not answered.is_set()
    if isinstance(error, NotFoundError) and unanswered:
        raise error.before_any_success(api) from None
    if not isinstance(error, RetryableError):
        if answered is not None and _http_answer(exc):
            answered.set()
        raise error from None
    if not policy.should_retry(attempts):
        if unanswered and unanswered_is_fatal and _reached_but_too_slow(exc):
            # As likely to fail every call, but no sign of a server that is down.
            raise FatalBackendError(
                f"{api} has answered no request yet, and one {policy.gave_up(attempts)}, "
                f"the last reaching it but too slow (its last failure: {error}); it is up, "
                "but slower than timeout_s: raise options.timeout_s if its answers take that "
                "long"
            ) from None
        if unanswered and unanswered_is_fatal and not _http_answer(exc):
            raise FatalBackendError(
                f"{api} has answered no request yet, and one {policy.gave_up(attempts)} "
                f"without reaching it (its last failure: {error}); is it running, at "
                "the address in the config?"
            ) from None
        raise type(error)(
            f"{error} ({policy.gave_up(attempts)})", retry_after=error.retry_after
        ) from None
    retry_after = error.retry_after
    if retry_after is not None and not isinstance(error, RateLimitError):
        # After a 5xx, 408 or 409, no longer than the backoff the config allows (a 429's
        # Retry-After is honoured up to RETRY_AFTER_MAX_S).
        retry_after = min(retry_after, policy.backoff_max)
    return policy.delay(attempts, retry_after)


def is_content_refusal(exc: Any) -> bool:
    """Whether the API error ``exc`` refuses its request's content
    (:func:`refuses_content`, by its error code, type and message)."""
    return refuses_content(getattr(exc, "code", None), getattr(exc, "type", None), _message(exc))


def refuses_content(code: object, kind: object, message: str) -> bool:
    """Whether an API error with this ``code``, ``type`` (``kind``) and ``message`` refuses its
    request's content: by its code (:data:`CONTENT_REFUSAL_CODES`) when it has one; with none,
    by its message (:data:`CONTENT_REFUSAL_MESSAGE`, without :data:`NOT_A_REFUSAL`'s words),
    unless its type is ``server_error``. A code of digits (vLLM's, the HTTP status again) is
    none."""
    if _named(code):
        return re.sub(r"[_-]", "", code.lower()) in CONTENT_REFUSAL_CODES
    if kind == "server_error":
        return False
    return (
        CONTENT_REFUSAL_MESSAGE.search(message) is not None
        and NOT_A_REFUSAL.search(message) is None
    )


def _named(code: object) -> TypeGuard[str]:
    """Whether an error's ``code`` names the error (``content_filter``), not just its HTTP
    status again (vLLM sends ``"code": 400``; the SDK makes that ``"400"``)."""
    return isinstance(code, str) and code != "" and not code.isdigit()


def _http_answer(exc: Exception) -> bool:
    """Whether ``exc`` is an answer of the API's own (an HTTP status, or an error it sent
    with HTTP 200), not a failure to reach it."""
    import openai

    return isinstance(exc, openai.APIStatusError | ErrorAnswer | RefusalAnswer)


def _timed_out(exc: Any) -> str:
    """What the SDK's timeout ``exc`` was: the connection or the answer, not made within the
    call's ``timeout_s`` (which its request's :data:`DEADLINE` holds)."""
    deadline = getattr(exc, "request", None)
    deadline = deadline.extensions.get(DEADLINE) if deadline is not None else None
    within = f"within {deadline[1]:g} s (timeout_s)" if deadline is not None else "within timeout_s"
    if _reached_but_too_slow(exc):
        return f"the API timed out: no whole answer {within}"
    return f"the API timed out: no connection {within}"


def _reached_but_too_slow(exc: Exception) -> bool:
    """Whether ``exc`` is a timeout of a call that reached the API: one that timed out after
    connecting, not while connecting (or waiting for a connection). Read by the class names
    of its causes: the SDK's HTTP client may be a fork of ``httpx`` under another name."""
    import openai

    return isinstance(exc, openai.APITimeoutError) and not any(
        type(e).__name__ in ("ConnectTimeout", "PoolTimeout") for e in exception_chain(exc)
    )


def _message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return str(inner["message"])
    return str(getattr(exc, "message", "")) or type(exc).__name__
