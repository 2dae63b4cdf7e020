"""The judging stage: every image asked about each of its dimensions, under retry policy.

Each judge prepares an image once (reading and encoding it in a worker thread) and then asks
one question per dimension, at most ``concurrency`` at a time. A request holds its slot until
its judgement is handed on, so a slow journal or consumer slows the requests, and through the
image buffer the generators. Transient failures are retried with backoff; a reply becomes a
judgement here, scored from its top logprobs with the judge's scorer.

A judge whose ``[judges.adaptive]`` is on gets a :class:`~trig_stream.concurrency.
ConcurrencyController` that moves its limit: every answer's latency and every sign of load (a
429, no answer in time) is reported to it, and a task of this stage polls the judge's server
load for it while the stage runs.

A stop (graceful or hard) starts no request: every image handed to this stage is on disk in
the run directory (written there, or reused from it), so its judgements not yet asked are asked
when the run resumes, which reuses the image. A retry waiting out its backoff or Retry-After
ends at the stop without a record; only a request on the wire is waited for.
"""

from __future__ import annotations

import itertools
import math
import operator
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from trig_stream.backends.base import Judge, JudgeReply, JudgeRequest, PreparedImage
from trig_stream.backends.threads import being_cancelled, exiting_error, raised_in_thread
from trig_stream.concurrency import ConcurrencyController, follow_server_load
from trig_stream.dimensions import Dimension
from trig_stream.errors import (
    AnswerTimeoutError,
    FatalBackendError,
    ItemError,
    NotAsked,
    RateLimitError,
    RetryableError,
    UnreachableError,
)
from trig_stream.pipeline import (
    ImageItem,
    RunContext,
    describe_error,
    failed_judgement,
    send_now,
    take_ready,
    unless,
)
from trig_stream.records import Judgement, Status, TopLogprobs
from trig_stream.retry import RetryPolicy
from trig_stream.scoring import (
    LOGPROB_TOLERANCE,
    ZERO_PROBABILITY_LOGPROB,
    Scorer,
    broken_logprob,
    checked_top_logprobs,
    score_top_logprobs,
)

UNSCORABLE_TO_NOTE = 16
"""Unscorable answers of a judge that scored none, from which the run ends with a note."""
NO_REASON = "the judge found nothing to score in its answer, and gave no reason"
"""The error of an unscorable judgement whose judge's reply gave an empty reason."""
PREPARE_BATCH = 8
"""Images prepared per worker-thread call, of those already waiting: amortises the thread
hop; at most this many prepared images (e.g. base64 payloads) wait for a judge slot."""


class JudgeStage:
    """Sends every image's questions to every judge and turns the replies into judgements.

    Args:
        context: the run's shared state.
        judges: the judges, each with a limiter in ``limiters`` under its name.
        limiters: the limit on requests in flight of each judge.
        retry: the retry policy.
        sleep: waits for retry backoff and between server load polls (tests inject it).
        judges_open: set once the judges are open, when their servers' load begins to be
            read (None: they are open already).
    """

    def __init__(
        self,
        context: RunContext,
        judges: Sequence[Judge],
        limiters: dict[str, anyio.CapacityLimiter],
        retry: RetryPolicy,
        sleep: Callable[[float], Awaitable[None]],
        *,
        judges_open: anyio.Event | None = None,
    ) -> None:
        self._context = context
        self._judges_open = judges_open
        self._judges = list(judges)
        self._limiters = limiters
        self._retry = retry
        self._sleep = sleep
        adaptive = {entry.name: entry.adaptive for entry in context.config.judges}
        self.controllers: dict[str, ConcurrencyController] = {
            judge.name: ConcurrencyController(adaptive[judge.name], limiters[judge.name])
            for judge in self._judges
            if judge.name in adaptive and adaptive[judge.name].enabled
        }
        """The controller of each judge whose concurrency is adaptive."""
        self._answered: set[str] = set()
        """The judges that have answered a request: a reply, a refusal, or any failure but
        an :class:`~trig_stream.errors.UnreachableError` (a 5xx, a 429, a malformed body
        came from their server)."""
        self._scored: set[str] = set()
        """The judges that have scored an answer."""
        self._unscorable: Counter[str] = Counter()
        self._unasked: dict[int, tuple[ImageItem, int]] = {}
        """By the item's id: the images whose judgements a stop left unasked, and how many
        (some may have been made); counted as left work once the stage ends."""

    async def run(
        self,
        receive: MemoryObjectReceiveStream[ImageItem],
        judgement_send: MemoryObjectSendStream[Judgement],
    ) -> None:
        async with receive, judgement_send, anyio.create_task_group() as watchers:
            if self.controllers:
                watchers.start_soon(self._follow_server_loads)
            async with _Requesters(self._judge_one, self._give_back_slot) as requesters:
                async for first in receive:
                    items = [first]
                    take_ready(receive, items, PREPARE_BATCH)
                    for judge in self._judges:
                        await self._dispatch(requesters, judge, items, judgement_send)
            # Every request has ended: the load watchers have nothing left to steer.
            watchers.cancel_scope.cancel()
        self._count_unasked()
        self._note_judges_that_scored_nothing()

    def _leave_unasked(self, item: ImageItem, count: int = 1) -> None:
        # A stop: the image is on disk, and a resume asks these judgements.
        _, before = self._unasked.get(id(item), (item, 0))
        self._unasked[id(item)] = (item, before + count)

    def _count_unasked(self) -> None:
        """Take the judgements a stop left unasked off their models' counts: the run has work
        left (it ends ``stopped``), and the dashboard waits for none of them. An image none
        of whose judgements was made is counted ``left``: it stays queued (it was made), and
        the dashboard says it waits on disk for the resume instead of "judging" forever."""
        for item, count in self._unasked.values():
            counts = self._context.counters.model(item.work.model)
            counts.to_judge -= count
            counts.dropped += 1
            if count == len(item.work.todo):  # none of its judgements was made
                counts.left += 1
        self._unasked.clear()

    async def _follow_server_loads(self) -> None:
        """Read each adaptive judge's server load, once the judges are open: an unopened
        judge reports none, and a watcher that hears none
        :data:`~trig_stream.concurrency.SILENT_POLLS` times gives up for the run (the judges
        open late when the run found no work left as it opened and the dataset grew since)."""
        if self._judges_open is not None:
            await self._judges_open.wait()
        judges = {judge.name: judge for judge in self._judges}
        async with anyio.create_task_group() as watchers:
            for name, controller in self.controllers.items():
                watchers.start_soon(follow_server_load, judges[name], controller, self._sleep)

    def _note_judges_that_scored_nothing(self) -> None:
        # Each such answer is an unscorable judgement, as it should be, but when no answer
        # of a judge could be scored the cause is likelier its setup than its images.
        for name, count in self._unscorable.items():
            if count >= UNSCORABLE_TO_NOTE and name not in self._scored:
                self._context.counters.notes.append(
                    f"judge {name!r}: none of its {count} answers had a rating word among "
                    "the top tokens it returned, so none was scored; a model that does not "
                    "answer with TRIG's rating words, a template that does not ask for one, "
                    "or too few top_logprobs? (each judgement's error lists the tokens)"
                )

    async def _dispatch(
        self,
        requesters: _Requesters,
        judge: Judge,
        items: list[ImageItem],
        judgement_send: MemoryObjectSendStream[Judgement],
    ) -> None:
        jobs = [
            (item, dimensions)
            for item in items
            if (dimensions := [d for d, name in item.work.todo if name == judge.name])
        ]
        if not jobs:
            return
        if self._context.stopping.is_set():
            for item, dimensions in jobs:
                self._leave_unasked(item, len(dimensions))
            return
        paths = [item.image.path for item, _ in jobs]
        prepared = await anyio.to_thread.run_sync(_prepare_all, judge, paths)
        limiter = self._limiters[judge.name]
        for (item, dimensions), image in zip(jobs, prepared, strict=True):
            if isinstance(image, Exception):
                for dimension in dimensions:
                    await judgement_send.send(
                        failed_judgement(
                            self._context,
                            item.work,
                            dimension,
                            judge.name,
                            describe_error(image),
                            "judge",
                            prompt_rewrite=item.image.prompt_rewrite,
                        )
                    )
                continue
            for index, dimension in enumerate(dimensions):
                # Taking the slot here, before starting the request, is the backpressure:
                # when the judge is saturated, images wait in their buffer and generation
                # slows.
                token = object()
                try:
                    limiter.acquire_on_behalf_of_nowait(token)
                except anyio.WouldBlock:
                    await limiter.acquire_on_behalf_of(token)
                if self._context.stopping.is_set():  # came while the slot was awaited
                    limiter.release_on_behalf_of(token)
                    self._leave_unasked(item, len(dimensions) - index)
                    break
                request = JudgeRequest(item.work.model, item.work.sample, dimension, image, 1)
                requesters.hand_on(judge, item, request, token, judgement_send)

    def _give_back_slot(
        self,
        judge: Judge,
        item: ImageItem,
        request: JudgeRequest,
        token: object,
        judgement_send: MemoryObjectSendStream[Judgement],
    ) -> None:
        # A request handed on that never started (the run ended first): its slot, taken in
        # _dispatch, is given back here, as _judge_one gives back the slot of one that did.
        self._limiters[judge.name].release_on_behalf_of(token)

    async def _judge_one(
        self,
        judge: Judge,
        item: ImageItem,
        request: JudgeRequest,
        token: object,
        judgement_send: MemoryObjectSendStream[Judgement],
    ) -> None:
        started = time.perf_counter()
        attempts = 0
        reply: JudgeReply | None = None
        failure = ""
        stop: FatalBackendError | None = None  # raised once this request's judgement is on
        controller = self.controllers.get(judge.name)
        try:
            while True:
                if self._context.stopping.is_set():
                    # Handed on before the stop, or a retry: not on the wire yet, so asked
                    # on resume instead (its image is on disk).
                    self._leave_unasked(item)
                    return
                attempts += 1
                epoch = controller.epoch if controller else 0
                attempt_started = time.perf_counter()
                try:
                    reply = await judge.judge(
                        JudgeRequest(
                            request.model,
                            request.sample,
                            request.dimension,
                            request.image,
                            attempts,
                        )
                    )
                    if not isinstance(reply, JudgeReply):  # the backend's code is at fault
                        raise FatalBackendError(
                            f"judge {judge.name!r} is broken: judge() returned an object of "
                            f"type {type(reply).__name__}, not a JudgeReply"
                        )
                    if controller:
                        controller.on_success(epoch, time.perf_counter() - attempt_started)
                    self._answered.add(judge.name)
                    break
                except FatalBackendError as exc:
                    if exc.request_error is None:
                        raise
                    # This request's refusal is what showed that none will work: it is kept
                    # as an error, as the refusals before it were, before the run stops.
                    self._answered.add(judge.name)
                    failure = str(exc.request_error) or type(exc.request_error).__name__
                    stop = exc
                    break
                except RetryableError as exc:
                    unreached = isinstance(exc, UnreachableError)
                    if not unreached:
                        self._answered.add(judge.name)
                    if controller and isinstance(exc, RateLimitError):
                        controller.on_rate_limited(epoch)
                    elif controller and isinstance(exc, AnswerTimeoutError):
                        controller.on_timeout(epoch)
                    if not self._retry.should_retry(attempts):
                        gave_up = self._retry.gave_up(attempts)
                        failure = f"{gave_up}: {exc}"
                        if (
                            unreached
                            and judge.name not in self._answered
                            and judge.unreached_everywhere()
                        ):
                            # Nothing has ever come back, from any of its servers: every
                            # request would end the same way (a server that is down, or at
                            # another address). One of several down leaves the others.
                            raise FatalBackendError(
                                f"judge {judge.name!r} has answered no request yet, and a "
                                f"request {gave_up} {_unreached(exc, judge.unreached_hint)}"
                            ) from None
                        break
                    delay = self._retry.delay(attempts, exc.retry_after)
                except ItemError as exc:
                    if isinstance(exc, NotAsked) and self._context.stopping.is_set():
                        # A stop came while it waited for its turn (queued for a batch of an
                        # in-process model): never asked, so asked on resume, as above.
                        self._leave_unasked(item)
                        return
                    self._answered.add(judge.name)
                    failure = str(exc) or type(exc).__name__
                    break
                except Exception as exc:
                    failure = describe_error(exc)
                    break
                except anyio.get_cancelled_exc_class() as exc:
                    if being_cancelled():
                        raise
                    # Raised by the judge's own code (an asyncio.CancelledError of a future
                    # it awaited): this request's failure, not the run's end. Let through, it
                    # broke the pipeline's streams and never named the judge.
                    failure = (
                        f"the judge raised {type(exc).__name__} though the run was not "
                        "cancelled: a bug of the judge backend (a cancellation is no answer)"
                    )
                    break
                except (SystemExit, KeyboardInterrupt) as exc:
                    # A library calling sys.exit(), say. Let out of the event loop, it left
                    # the run's worker threads waiting for work: the process never exited.
                    raise exiting_error(exc, f"judge {judge.name!r}: its judge()") from exc
                # Only a retryable failure gets here. Its wait is out of the except block:
                # there the failure's traceback held the frames of the failed attempt, and
                # with them its request (a base64 image, twice: 32 MiB for a 2048² PNG) for
                # as long as a Retry-After asked. A stop ends the wait (a Retry-After may ask
                # for minutes): the loop's check then leaves the request to the resume.
                await unless(self._context.stopping, self._sleep(delay))
            elapsed = time.perf_counter() - started
            self._context.counters.judge_latencies.append(elapsed)
            try:
                judgement = self._judgement(
                    item, request.dimension, judge, reply, failure, attempts, elapsed
                )
            except (TypeError, ValueError) as exc:  # a reply of the wrong shape, every time
                raise FatalBackendError(
                    f"judge {judge.name!r} is broken: its reply makes no judgement "
                    f"({describe_error(exc)})"
                ) from exc
            await send_now(judgement_send, judgement)
            if stop is not None:
                raise stop
        finally:
            # The slot is held until the judgement is handed on: a full judgement buffer
            # must stop new requests, or blocked senders would pile up without bound.
            self._limiters[judge.name].release_on_behalf_of(token)

    def _judgement(
        self,
        item: ImageItem,
        dimension: Dimension,
        judge: Judge,
        reply: JudgeReply | None,
        failure: str,
        attempts: int,
        elapsed: float,
    ) -> Judgement:
        status: Status = "error"
        score: float | None = None
        top = reply.top_logprobs if reply else None
        broken: tuple[str, float] | None = None
        answered: TopLogprobs = []
        """The entries as the judge gave them, before those a journal cannot hold go."""
        malformed = ""
        if top is not None:
            try:
                # What is stored is what is scored: bytes tokens were scored as "b'good'"
                # (unscorable) and stored as "good".
                top = checked_top_logprobs(top)
            except ValueError as exc:
                top, malformed = None, str(exc)
            else:
                answered = top
                top, broken = _storable_entries(top)
        if reply is not None:
            if malformed:
                failure = f"the judge's answer has a malformed top logprob: {malformed}"
            elif reply.score is not None and not math.isfinite(reply.score):
                failure = f"the judge returned a non-finite score ({reply.score})"
            elif reply.score is not None and not 0.0 <= reply.score <= 1.0:
                failure = f"the judge returned a score outside [0, 1] ({reply.score})"
            elif reply.score is not None:
                status, score = "ok", reply.score
            elif reply.unscorable is not None:
                # Every unscorable judgement says why in its error: an empty reason was
                # recorded as none at all.
                reason = reply.unscorable
                status, failure = "unscorable", reason if str(reason).strip() else NO_REASON
            elif top is None:
                failure = "the judge's answer has no logprobs"
            elif broken is not None:
                token, logprob = broken
                failure = (
                    f"the judge's answer has an impossible logprob ({token!r}: {logprob}; "
                    "NaN, +inf or a probability above 1)"
                )
            else:
                score = score_top_logprobs(
                    top,
                    scorer=judge.scorer,
                    confidence=judge.confidence,
                )
                if score is None:
                    status = "unscorable"
                    failure = _unscorable_reason(answered, top, judge.scorer)
                    self._unscorable[judge.name] += 1
                else:
                    status = "ok"
        if status == "ok":
            self._scored.add(judge.name)
        sample = item.work.sample
        return Judgement(
            model=item.work.model,
            data_id=sample.data_id,
            task=sample.task,
            pair=sample.pair,
            dimension=dimension,
            metric=judge.name,
            judge=self._context.fingerprints[judge.name],
            status=status,
            sample_digest=sample.digest,
            score=score,
            top_logprobs=top,
            image=self._context.run_dir.relative_name(item.image.path),
            seed=item.work.seed,
            latency_s=elapsed,
            attempts=attempts,
            error=failure or None,
            error_stage="judge" if status == "error" else None,
            prompt_rewrite=item.image.prompt_rewrite,
        )


_LOGPROB = operator.itemgetter(1)


class _Requesters:
    """The tasks that make a stage's requests, in a task group of their own: each calls
    ``make`` with one request's arguments after another.

    A request goes to a task that waits for one, or to a new task when none waits: starting
    an anyio task costs about twice what handing a request to a waiting one does (~25 us
    against ~12 here), and a run makes one request per judgement. So there are as many
    tasks as requests were ever in flight at once, which the judges' slots bound. Leaving
    the ``async with`` block closes the queue: each task ends once the queue is empty.

    A request that no task started, because the run was cancelled or failed first (its task
    cancelled while it waited for it, or before it ever ran), is handed to ``abandon`` once
    every task has ended: what the caller took for it (a judge slot) would never be given
    back by ``make``.
    """

    def __init__(self, make: Callable[..., Awaitable[None]], abandon: Callable[..., None]) -> None:
        self._make = make
        self._abandon = abandon
        self._tg = anyio.create_task_group()
        # Unbounded, yet never long: a request waits here with its judge slot already taken.
        self._send, self._receive = anyio.create_memory_object_stream[int](math.inf)
        self._unstarted: dict[int, tuple[Any, ...]] = {}
        """The requests handed on that no task has taken yet, by key. Kept here, not in the
        queue: an item handed to a receiver that is cancelled before it resumes is lost."""
        self._keys = itertools.count()
        self._idle = 0

    def hand_on(self, *request: Any) -> None:
        if self._idle:
            self._idle -= 1
        else:
            self._tg.start_soon(self._work)
        key = next(self._keys)
        self._unstarted[key] = request
        self._send.send_nowait(key)

    async def _work(self) -> None:
        async for key in self._receive:
            await self._make(*self._unstarted.pop(key))
            self._idle += 1

    async def __aenter__(self) -> _Requesters:
        await self._tg.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        self._send.close()
        try:
            return await self._tg.__aexit__(exc_type, exc, tb)
        finally:
            self._receive.close()
            for request in self._unstarted.values():
                self._abandon(*request)
            self._unstarted.clear()


def _unreached(failure: RetryableError, hint: str) -> str:
    """How a request to a judge that has answered nothing yet ended, after ``gave up after
    N attempts``, with what to check (``hint``, the judge's ``unreached_hint``).

    A timeout is no sign that the server is not there: one that is up but slower than the
    judge's ``timeout_s`` ends every request so too (the transports cannot tell whether a
    timeout came while connecting).
    """
    if isinstance(failure, AnswerTimeoutError):
        return (
            f"with no answer in time (its last failure: {failure}); a server that is up but "
            "slower than the judge's timeout_s ends so too: raise options.timeout_s if it "
            f"is only slow; else, {hint}"
        )
    return f"without reaching it (its last failure: {failure}); {hint}"


def _unscorable_reason(answered: TopLogprobs, stored: TopLogprobs, scorer: Scorer) -> str:
    """Why top logprobs with no rating word at a probability above 0 give no score.

    The journal drops the entries at a probability of 0 (:func:`_storable_entries`): when
    rating words stood there, the reason names them, since the stored tokens no longer show
    that the judge answered in rating words it gave no weight.
    """
    at_zero = [
        (token, logprob)
        for token, logprob in answered
        # A rating word that counts with a probability, and not with its own: one at 0.
        if score_top_logprobs([(token, 0.0)], scorer=scorer) is not None
        and score_top_logprobs([(token, logprob)], scorer=scorer) is None
    ]
    tokens = [token for token, logprob in stored if (token, logprob) not in at_zero][:10]
    if not at_zero:
        return f"no rating word among the top tokens: {tokens}"
    quoted = ", ".join(f"{token!r}: {logprob}" for token, logprob in at_zero[:10])
    return (
        f"rating words only at probability 0 ({quoted}), which count for nothing; "
        f"the other top tokens: {tokens}"
    )


def _storable_entries(top: TopLogprobs) -> tuple[TopLogprobs, tuple[str, float] | None]:
    """The pairs a journal line can hold, and the first that is no log probability, if any.

    A journal line must read back: JSON has no infinities or NaN, and pydantic would write
    them as null, which no judgement validates against. A -inf logprob is a probability of
    0 and counts for nothing in either scorer, so it is dropped, as is one at or below
    :data:`~trig_stream.scoring.ZERO_PROBABILITY_LOGPROB` (how the OpenAI protocol writes
    a probability of 0; the scorers read it as -inf). NaN, +inf or a logprob above
    0 beyond rounding (:func:`~trig_stream.scoring.broken_logprob`) means the judge's numbers
    are broken, which the caller reports as an error, not a score; the scorers would refuse
    it, and ``exp`` of a logprob above ~709 overflows.
    """
    # The common case in three passes in C: a finite sum means no NaN or infinity, and then
    # the largest entry says whether any is above 0, the smallest whether any is a zero.
    if (
        math.isfinite(sum(map(_LOGPROB, top)))
        and max(map(_LOGPROB, top), default=0.0) <= LOGPROB_TOLERANCE
        and min(map(_LOGPROB, top), default=0.0) > ZERO_PROBABILITY_LOGPROB
    ):
        return top, None
    kept = [
        (token, logprob)
        for token, logprob in top
        if math.isfinite(logprob) and logprob > ZERO_PROBABILITY_LOGPROB
    ]
    return kept, broken_logprob(top)


def _prepare_all(judge: Judge, paths: list[Path]) -> list[PreparedImage | Exception]:
    # Runs in a worker thread: one image's failure is its own judgements' error only.
    prepared: list[PreparedImage | Exception] = []
    for path in paths:
        try:
            prepared.append(judge.prepare(path))
        except Exception as exc:
            prepared.append(exc)
        except BaseException as exc:
            # SystemExit, KeyboardInterrupt, or a cancellation of the judge's own (this
            # thread never calls back into the event loop): here it ends nothing, so it is
            # that image's failure too. Let out, it ended the run as a Ctrl-C would, with
            # no word of the judge, or as a cancellation with nothing judged.
            prepared.append(ItemError(f"prepare() failed: {raised_in_thread(exc)}"))
    return prepared
