"""A judge's endpoints, one per base URL: the requests each has in flight, how long it rests
after a transient failure or a 429, and what its first answers said (a 404 or refusals in a
row that are the config's fault, a server that cuts or drops the logprobs, one that no longer
serves the model).

:class:`~trig_stream.backends.judges.openai_judge.OpenAIJudge` sends each request to one of
them and raises the error its :class:`Endpoint` says an answer or a failure stands for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from trig_stream.backends.base import JudgeReply
from trig_stream.backends.judges.http_errors import CONTENT_REFUSAL, REFUSALS_TO_STOP
from trig_stream.backends.judges.payloads import cut_by_filter
from trig_stream.backends.judges.transports import EncodedImage, Transport
from trig_stream.errors import FatalBackendError, ItemError, NotFoundError
from trig_stream.retry import RETRY_AFTER_MAX_S

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


@dataclass(slots=True)
class Endpoint:
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
            "the refused ones are kept as errors: resume with --retry-errors to ask again",
            request_error=error,
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
            "the 404s (kept as errors)",
            request_error=error,
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
