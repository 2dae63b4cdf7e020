"""How the loopback judge server behaves, and what it counts.

:class:`JudgeServerOptions` is its behaviour: the model it serves, its latency and capacity,
the rates of its injected faults (drawn per request) and the ``Retry-After`` of its 429s,
checked as HTTP writes the header and as the judge reads it; ``simulate-judge``'s options
become one. :class:`ServerStats` is what ``GET /stats`` returns.
"""

from __future__ import annotations

import email.utils
import re
import unicodedata
from pathlib import Path
from typing import Annotated, Final, Literal, TypeAlias

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from trig_stream.backends.judges.http_errors import RETRY_AFTER_SECONDS, parse_retry_after
from trig_stream.testing.planted_scores import loadings

Fault: TypeAlias = Literal["error", "rate_limit", "hang", "malformed", "missing_logprobs", "reset"]
FAULTS: tuple[Fault, ...] = (
    "error",
    "rate_limit",
    "hang",
    "malformed",
    "missing_logprobs",
    "reset",
)

Rate = Annotated[float, Field(ge=0, le=1)]


DEFAULT_MODEL: Final = "trig-judge-sim"
"""The model name served when none is given."""


_NEGATIVE_SECONDS: Final = re.compile(r"-\d+(\.\d+)?")
_DAY = "(Mon|Tue|Wed|Thu|Fri|Sat|Sun)"
_WEEKDAY = "(Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday)"
_MONTH = "(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"
_TIME = r"\d\d:\d\d:\d\d"
_HTTP_DATE: Final = re.compile(
    # RFC 9110's three forms: IMF-fixdate and RFC 850, in GMT (a missing or other zone is
    # told apart), and asctime, which has no zone. Four digits of year, but in RFC 850's two.
    rf"(?P<zoned>{_DAY}, \d\d {_MONTH} (?P<year>\d{{4}}) {_TIME}"
    rf"|{_WEEKDAY}, \d\d-{_MONTH}-\d\d {_TIME})"
    rf"(?P<zone> \S+)?|{_DAY} {_MONTH} [ \d]\d {_TIME} (?P<asctime_year>\d{{4}})"
)


def _retry_after(value: str) -> str:
    # What HTTP allows: seconds (not -1, inf or nan), or a date in one of HTTP's three forms;
    # read as the judge reads it, which strips it: the stripped value is what is sent. A
    # control character (a newline pasted in) could not be sent: every 429 dropped its
    # connection instead.
    if any(unicodedata.category(char) == "Cc" for char in value):
        raise ValueError(
            f"{value!r} holds a control character, which no HTTP header may carry; "
            "give seconds (1) or an HTTP date alone"
        )
    if not value.isascii():
        # Sent as UTF-8, which a client reading headers as latin-1 (as HTTP has them) sees
        # as other characters: one judge client waited, another ignored the header.
        raise ValueError(
            f"{value!r} holds a non-ASCII character, which clients read differently; give "
            "seconds in ASCII digits (1) or an HTTP date"
        )
    stripped = value.strip()
    if RETRY_AFTER_SECONDS.fullmatch(stripped):
        return stripped
    if _NEGATIVE_SECONDS.fullmatch(stripped):
        raise ValueError(
            f"{value!r} is negative: Retry-After seconds must be >= 0 (e.g. 1), or give "
            "an HTTP date"
        )
    date = _HTTP_DATE.fullmatch(stripped)
    if date is None:
        if email.utils.parsedate_tz(stripped) is None:
            raise ValueError(f"{value!r} is neither a number of seconds nor an HTTP date")
        # A date the judge may read, which HTTP does not write so (no weekday, one digit
        # for the day): a server sending it is not what a judge is tried against.
        raise ValueError(
            f"{value!r} is not an HTTP date in any of its forms: give seconds (1) or a date "
            "as IMF-fixdate (Sun, 06 Nov 1994 08:49:37 GMT), RFC 850 (Sunday, 06-Nov-94 "
            "08:49:37 GMT) or asctime (Sun Nov  6 08:49:37 1994)"
        )
    if date["zoned"] is not None and date["zone"] != " GMT":
        raise ValueError(
            f"{value!r} has no GMT zone: an HTTP date is in GMT (IMF-fixdate, RFC 850 or "
            "asctime), e.g. Sun, 06 Nov 1994 08:49:37 GMT"
        )
    year = date["year"] or date["asctime_year"]
    read = email.utils.parsedate_tz(stripped)
    if year is not None and read is not None and read[0] != int(year):
        # The judge reads a year below 100 as two digits (0001 as 2001), as email.utils does.
        raise ValueError(
            f"{value!r} has the year {year}, which the judge reads as {read[0]}: give seconds "
            "(1) or an HTTP date in years 0100 to 9999"
        )
    if parse_retry_after({"Retry-After": stripped}) is None:
        raise ValueError(
            f"{value!r} is a date out of range (its day or time): give seconds (1) or an "
            "HTTP date that exists (Sun, 06 Nov 1994 08:49:37 GMT)"
        )
    return stripped


class JudgeServerOptions(BaseModel):
    """How the simulated judge behaves. Fault rates are shares of requests, drawn per request."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    model: str = DEFAULT_MODEL
    """The model name served: in ``/v1/models``, ``/metrics`` and every answer."""
    served_model_only: bool = False
    """Answer a request naming another model with a 404, as vLLM does; else any is served."""
    latency_s: Annotated[float, Field(ge=0)] = 0.0
    """Time each request holds a slot, as inference would."""
    capacity: Annotated[int, Field(ge=1)] = 64
    """Requests processed at once; the rest wait in an unbounded queue, as in vLLM."""
    seed: int = 0
    error_rate: Rate = 0.0
    """Requests answered with a 503."""
    rate_limit_rate: Rate = 0.0
    """Requests answered with a 429 carrying ``Retry-After: retry_after``."""
    retry_after: Annotated[str, AfterValidator(_retry_after)] = "1"
    """The Retry-After header value: seconds, or an HTTP date."""
    hang_rate: Rate = 0.0
    """Requests never answered until the client gives up (or the server stops)."""
    malformed_rate: Rate = 0.0
    """Requests answered 200 with a truncated JSON body."""
    missing_logprobs_rate: Rate = 0.0
    """Requests answered without logprobs."""
    reset_rate: Rate = 0.0
    """Requests whose connection is aborted before any answer."""
    fail_first: Annotated[int, Field(ge=0)] = 0
    """The first this many chat requests are answered with a 503, as by a server that is
    down for a while (an outage counted in requests, not seconds: tests drive it); the fault
    rates apply from the next one on."""
    correlations: dict[str, float] = Field(default_factory=dict)
    """Planted correlations of latent quality by pair, e.g. ``{"IQ-R_TA-C": 0.8}``."""
    api_key: str | None = None
    """When set, requests must carry ``Authorization: Bearer <api_key>``; others get a 401
    whose message quotes the key received, as some providers do."""
    allowed_local_media_path: Path | None = None
    """The folder ``file://`` image URLs must lie in, as vLLM's ``--allowed-local-media-path``;
    without it they are refused with a 400, as vLLM refuses them."""
    record_requests: bool = False
    """Keep every request body in :attr:`JudgeServer.received` (tests)."""

    @model_validator(mode="after")
    def _check(self) -> JudgeServerOptions:
        total = sum(self.fault_rates().values())
        if total > 1.0 + 1e-9:
            raise ValueError(f"fault rates add up to {total:.3f}; they must not exceed 1")
        loadings(self.correlations)
        return self

    def fault_rates(self) -> dict[Fault, float]:
        """The rate of each fault kind."""
        return {
            "error": self.error_rate,
            "rate_limit": self.rate_limit_rate,
            "hang": self.hang_rate,
            "malformed": self.malformed_rate,
            "missing_logprobs": self.missing_logprobs_rate,
            "reset": self.reset_rate,
        }


class ServerStats(BaseModel):
    """What ``GET /stats`` returns."""

    model_config = ConfigDict(extra="forbid")

    received: int = 0
    """Chat requests received, faulty or not."""
    served: int = 0
    """Chat requests answered with a completion."""
    repeated: int = 0
    """Chat requests whose messages equal an earlier request's."""
    rejected: int = 0
    """Chat requests refused as invalid (4xx)."""
    faults: dict[str, int] = Field(default_factory=dict)
    running: int = 0
    waiting: int = 0
    max_running: int = 0
    max_waiting: int = 0
    busy_slot_s: float = 0.0
    """Seconds of slot time taken by requests so far (summed over slots): divided by the
    capacity and a span of time, how full the slots were over it."""
