"""A judge that answers at once with deterministic logprobs, for tests and demos.

The rating distribution of each (model, data_id, dimension) is a function of those names, so
runs can be compared record by record. Failures of every class can be injected at rates.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Annotated

import anyio
from pydantic import BaseModel, Field

from trig_stream.backends.base import Judge, JudgeReply, JudgeRequest
from trig_stream.config_fields import OPTIONS_CONFIG
from trig_stream.errors import FatalBackendError, ItemError, RateLimitError, RetryableError
from trig_stream.hashing import unit_hash
from trig_stream.records import JudgeFingerprint
from trig_stream.scoring import SCORING_RULES, Scorer

if TYPE_CHECKING:
    pass

_WORDS = ("excellent", "good", "medium", "bad", "terrible")


class FakeJudgeOptions(BaseModel):
    """``options`` of the ``fake`` judge. Rates are shares of requests, chosen by hash."""

    model_config = OPTIONS_CONFIG

    latency_s: Annotated[float, Field(ge=0)] = 0.0
    seed: int = 0
    error_rate: Annotated[float, Field(ge=0, le=1)] = 0.0
    """Requests that fail for good (an ItemError)."""
    retryable_rate: Annotated[float, Field(ge=0, le=1)] = 0.0
    """Attempts that fail transiently; each attempt draws anew, so retries can succeed."""
    rate_limit_rate: Annotated[float, Field(ge=0, le=1)] = 0.0
    """Attempts refused with a 429 carrying ``retry_after_s``."""
    retry_after_s: Annotated[float, Field(ge=0)] = 0.0
    unscorable_rate: Annotated[float, Field(ge=0, le=1)] = 0.0
    """Answers whose top tokens name no rating."""
    missing_logprobs_rate: Annotated[float, Field(ge=0, le=1)] = 0.0
    fatal_after: Annotated[int, Field(ge=0)] | None = None
    """Fail the whole run (as bad credentials would) after this many requests."""


class FakeJudge(Judge):
    """Deterministic answers with injectable failures; no server, no model."""

    Options = FakeJudgeOptions
    options: FakeJudgeOptions

    def __init__(
        self,
        name: str = "trigscore",
        options: FakeJudgeOptions | None = None,
        *,
        concurrency: int = 16,
        scorer: Scorer = "robust",
        confidence: bool = False,
    ) -> None:
        super().__init__(
            name,
            options or FakeJudgeOptions(),
            concurrency=concurrency,
            scorer=scorer,
            confidence=confidence,
        )
        self.requests = 0

    def fingerprint(self) -> JudgeFingerprint:
        return JudgeFingerprint(
            backend="fake",
            model="fake",
            scorer=self.scorer,
            confidence=self.confidence,
            params={"scoring_rules": SCORING_RULES, "seed": self.options.seed},
        )

    async def judge(self, request: JudgeRequest) -> JudgeReply:
        self.requests += 1
        opts = self.options
        if opts.fatal_after is not None and self.requests > opts.fatal_after:
            raise FatalBackendError("fake judge: authentication failed (fatal_after reached)")
        if opts.latency_s:
            await anyio.sleep(opts.latency_s)
        key = (opts.seed, request.model, request.sample.data_id, request.dimension)
        attempt_key = (*key, request.attempt)
        if unit_hash("429", *attempt_key) < opts.rate_limit_rate:
            raise RateLimitError(
                "fake judge: 429 Too Many Requests", retry_after=opts.retry_after_s
            )
        if unit_hash("5xx", *attempt_key) < opts.retryable_rate:
            raise RetryableError("fake judge: 503 Service Unavailable")
        if unit_hash("error", *key) < opts.error_rate:
            raise ItemError("fake judge: 400 Bad Request")
        if unit_hash("nologprobs", *key) < opts.missing_logprobs_rate:
            return JudgeReply(top_logprobs=None, text="good")
        if unit_hash("unscorable", *key) < opts.unscorable_rate:
            return JudgeReply(top_logprobs=[("I", -0.1), ("Sorry", -2.5)], text="I cannot")
        return JudgeReply(top_logprobs=fake_logprobs(*key), text="")


def fake_logprobs(*key: object) -> list[tuple[str, float]]:
    """A rating distribution peaked at a rating chosen by hash, as top logprobs."""
    centre = unit_hash("centre", *key) * 4
    weights = [math.exp(-((i - centre) ** 2)) for i in range(len(_WORDS))]
    total = sum(weights)
    pairs = [(word, math.log(w / total)) for word, w in zip(_WORDS, weights, strict=True)]
    return sorted(pairs, key=lambda p: -p[1])
