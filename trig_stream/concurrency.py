"""Adaptive judge concurrency: a limit on requests in flight that follows the judge's server.

vLLM never answers 429: whatever it cannot start waits in an unbounded queue, so a fixed
``concurrency`` is either too low (an idle GPU) or too high (requests that time out in the
queue). :class:`ConcurrencyController` moves a judge's :class:`anyio.CapacityLimiter` between
``min`` and ``max`` by additive increase, multiplicative decrease (AIMD):

* **growth**: while answers come back in time, the server's queue is short and the limit is
  what holds requests back, the limit grows: by one per answer until the first cut ("slow
  start", doubling each round trip), then by one per round trip (a whole limit's worth of
  answers).
* **cuts**: the signs of load: a 429, no answer within the timeout, a latency blow-up, or a
  waiting queue on the server (``vllm:num_requests_waiting`` from ``GET /metrics``) above
  ``max_waiting`` that is not draining multiply the limit by ``decrease_factor``. Other
  failures (a 5xx, a reset connection, a malformed answer) are no such sign: a server that
  fails a share of its requests at random would otherwise hold the limit at ``min`` (seen:
  a 10% error rate held 2-3 of 64 for a whole run), and they neither cut nor grow it.

A cut shows its effect only after a while. Requests started before it were sent under the old
limit, and their signals say nothing new: each attempt carries the controller's *epoch* (the
number of cuts so far) and a signal from an older epoch is ignored; after a cut, the queue is
read again only once an attempt of the new epoch has finished. And two cuts are at least
``poll_interval_s`` apart, so that the few random 429s of a round trip, or a latency average
still catching up, cut once. The controller is pure logic (no I/O, no task);
:func:`follow_server_load` is the polling loop that feeds it the server's load.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from trig_stream.backends.base import Judge, ServerLoad
from trig_stream.config import AdaptiveConcurrency

SMOOTHING = 0.2
"""Weight of each new latency in the moving average."""
LATENCY_SAMPLES = 5
"""Latencies seen before the lowest average counts as the baseline of a blow-up."""
SILENT_POLLS = 3
"""Polls without any answer after which a judge is taken to report no load."""
HISTORY = 64
"""Limit changes kept for inspection."""


class Limiter(Protocol):
    """What the controller needs of :class:`anyio.CapacityLimiter`."""

    @property
    def total_tokens(self) -> float: ...

    @total_tokens.setter
    def total_tokens(self, value: float) -> None: ...

    @property
    def borrowed_tokens(self) -> int: ...


@dataclass(frozen=True, slots=True)
class LimitChange:
    """One move of the limit.

    Attributes:
        at: the controller's clock when it happened.
        limit: the new limit.
        reason: why, in words (``"rate limited (429)"``, ``"server queue 12 > 8"``...).
    """

    at: float
    limit: int
    reason: str


class ConcurrencyController:
    """Adjusts one judge's limiter from the outcome of its requests and its server's load.

    Args:
        settings: the judge's ``[judges.adaptive]`` table.
        limiter: the judge's limiter; its current total is the starting limit (kept between
            ``min`` and ``max``).
        clock: the time of each change, for :attr:`changes` (tests inject a fake one).
    """

    def __init__(
        self,
        settings: AdaptiveConcurrency,
        limiter: Limiter,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self._limiter = limiter
        self._clock = clock
        self._limit = max(settings.min, min(settings.max, int(limiter.total_tokens)))
        self._limiter.total_tokens = self._limit
        self._epoch = 0
        self._slow_start = True
        self._answered = 0  # answers in time since the last step, after slow start
        self._latency: float | None = None
        self._best_latency: float | None = None
        self._samples = 0
        self._queue_short = True
        self._last_waiting: int | None = None
        self._settled = True  # an attempt of the current epoch has finished
        self._last_cut = -math.inf  # the clock at the latest cut
        self.changes: deque[LimitChange] = deque(maxlen=HISTORY)
        """The latest limit changes, oldest first."""

    @property
    def waiting(self) -> int | None:
        """The server's waiting queue at the latest poll (None before one answered)."""
        return self._last_waiting

    @property
    def limit(self) -> int:
        """The current limit on requests in flight."""
        return self._limit

    @property
    def epoch(self) -> int:
        """Cuts so far; read when an attempt starts and passed back with its outcome."""
        return self._epoch

    @property
    def latency_s(self) -> float | None:
        """The smoothed latency of successful attempts, None before the first."""
        return self._latency

    def on_success(self, epoch: int, latency_s: float) -> None:
        """An attempt started in ``epoch`` was answered after ``latency_s`` seconds."""
        self._observe_latency(latency_s)
        if epoch != self._epoch:
            return
        self._settled = True
        blown = self._latency_blown()
        if blown is not None:
            self._cut(blown)
            return
        # Growing helps only when the limit is what holds requests back, and only while the
        # server keeps up.
        if not self._queue_short or self._limiter.borrowed_tokens < self._limit:
            return
        if self._slow_start:
            self._set(self._limit + 1, "answered in time (slow start)")
            return
        self._answered += 1
        if self._answered >= self._limit:
            self._answered = 0
            self._set(self._limit + 1, "answered in time")

    def on_rate_limited(self, epoch: int) -> None:
        """An attempt started in ``epoch`` was refused for load (HTTP 429)."""
        if epoch == self._epoch:
            self._cut("rate limited (429)")

    def on_timeout(self, epoch: int) -> None:
        """An attempt started in ``epoch`` got no answer within the judge's timeout."""
        if epoch == self._epoch:
            self._cut("no answer in time")

    def on_server_load(self, load: ServerLoad | None) -> None:
        """The server's queue as last read; None (unknown) changes nothing."""
        if load is None:
            return
        previous, self._last_waiting = self._last_waiting, load.waiting
        limit = self.settings.max_waiting
        self._queue_short = load.waiting <= limit
        # A queue that shrinks since the last reading is draining already: wait for it. One
        # cut per round trip: the next waits until an attempt under the new limit has ended.
        growing = previous is None or load.waiting >= previous
        if not self._queue_short and growing and self._settled:
            self._cut(f"server queue {load.waiting} > {limit}")

    def _observe_latency(self, latency_s: float) -> None:
        if self._latency is None:
            self._latency = latency_s
        else:
            self._latency += SMOOTHING * (latency_s - self._latency)
        self._samples += 1
        if self._samples >= LATENCY_SAMPLES:
            best = self._best_latency
            self._best_latency = self._latency if best is None else min(best, self._latency)

    def _latency_blown(self) -> str | None:
        latency = self._latency
        if latency is None:
            return None
        target = self.settings.target_latency_s
        if target is not None:
            return f"latency {latency:.3g} s > target {target:g} s" if latency > target else None
        best = self._best_latency
        if best is not None and latency > self.settings.latency_factor * best:
            return f"latency {latency:.3g} s > {self.settings.latency_factor:g} x {best:.3g} s"
        return None

    def _cut(self, reason: str) -> None:
        now = self._clock()
        if now - self._last_cut < self.settings.poll_interval_s:
            return  # the latest cut has had no time to show its effect
        self._last_cut = now
        self._slow_start = False
        self._answered = 0
        self._epoch += 1
        self._settled = False
        self._set(math.floor(self._limit * self.settings.decrease_factor), reason)

    def _set(self, limit: int, reason: str) -> None:
        limit = max(self.settings.min, min(self.settings.max, limit))
        if limit == self._limit:
            return
        self._limit = limit
        # Lowering the total below what is borrowed is allowed: no new request starts until
        # enough have finished.
        self._limiter.total_tokens = limit
        self.changes.append(LimitChange(self._clock(), limit, reason))


async def follow_server_load(
    judge: Judge,
    controller: ConcurrencyController,
    sleep: Callable[[float], Awaitable[None]],
) -> None:
    """Read the judge's server load every ``poll_interval_s`` and hand it to the controller.

    Runs until cancelled, or returns early when the judge never reports a load (a backend
    without ``server_load``, a provider without ``/metrics``).

    Args:
        judge: the judge whose :meth:`~trig_stream.backends.base.Judge.server_load` is read.
        controller: the judge's controller.
        sleep: waits between polls (tests inject one they drive).
    """
    silent = 0
    reported = False
    while True:
        try:
            load = await judge.server_load()
        except Exception:  # a probe must never stop the run; the load is just unknown
            load = None
        if load is not None:
            reported = True
        elif not reported:
            silent += 1
            if silent >= SILENT_POLLS:
                return
        controller.on_server_load(load)
        await sleep(controller.settings.poll_interval_s)
