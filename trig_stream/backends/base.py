"""The two kinds of backend the engine drives: generators and judges.

A :class:`Generator` is blocking code (a diffusers pipeline, an image folder reader) that the
engine runs in worker threads, one per ``worker`` index, behind a capacity limiter. A
:class:`Judge` is async code (an HTTP client) that the engine calls concurrently, up to its
``concurrency``. Backends classify their own failures by raising the exceptions in
:mod:`trig_stream.errors`; the engine owns retries, timing and records.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Self, TypeVar

import anyio
import anyio.to_thread

from trig_stream.dimensions import Dimension
from trig_stream.errors import FatalBackendError
from trig_stream.records import JudgeFingerprint, PromptRewrite, Sample, TopLogprobs
from trig_stream.scoring import Scorer

if TYPE_CHECKING:
    from PIL.Image import Image

    from trig_stream.config import JudgeConfig, RunConfig


T = TypeVar("T")

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EncodedPicture:
    """A picture already encoded as a PNG file's bytes: the engine writes them as they are.

    A generator whose pictures already are PNG files (an image folder, an image API) returns
    them this way, so the engine never decodes or encodes them again.
    """

    png: bytes
    seconds: float | None = None
    """How long making it took where it was made, when known: the engine records this as
    the image's generation time instead of its own timing of the call, which for a picture
    made elsewhere can include waiting there."""


@dataclass(frozen=True, slots=True)
class TimedPicture:
    """A picture made in another process, with how long making it took there (the engine
    records that as the image's generation time, as for :attr:`EncodedPicture.seconds`)."""

    image: Image
    seconds: float


def check_pictures(generator: str, images: Sequence[object]) -> None:
    """Refuse an item of ``images`` (what a generate call returned) that is neither a
    picture nor an exception: a fault of the backend's code, the same for every batch.

    Raises:
        FatalBackendError: one is something else, named with the generator's name.
    """
    from PIL.Image import Image as Picture

    for image in images:
        if not isinstance(image, Picture | EncodedPicture | TimedPicture | Exception):
            raise FatalBackendError(
                f"generator {generator!r} is broken: it returned an object of type "
                f"{type(image).__name__} where a PIL image, an EncodedPicture, a "
                "TimedPicture or an exception belongs"
            )


def shrunk_size(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """The size, of the same shape as ``width`` x ``height`` (to rounding), that an image of
    more than ``max_pixels`` pixels is shrunk to, judges' ``max_pixels``: at most that many
    pixels, however thin the image (a side kept at one pixel does not let the other grow)."""
    scale = (max_pixels / (width * height)) ** 0.5
    new_width, new_height = max(1, int(width * scale)), max(1, int(height * scale))
    if new_width * new_height > max_pixels:  # one side was held at 1
        if new_width == 1:
            new_height = max_pixels
        else:
            new_width = max_pixels
    return new_width, new_height


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One image to make for one sample."""

    model: str
    sample: Sample
    seed: int


class Generator(ABC):
    """Makes images for samples. Every method but ``fingerprint`` and ``stop_loading`` blocks
    and runs in a thread.

    Attributes:
        name: the model's name in the run (its image folder).
        workers: how many calls the engine makes at once, each from a worker thread (the
            ``diffusers`` generator runs two per device: one running, the next waiting).
        batch_size: the most requests one :meth:`generate` call receives; the engine sends
            what is ready, without waiting to fill a batch.
        draws_from_the_prompt: whether its images are made from the prompt it is given
            (images made elsewhere are not: a prompt rewriter has nothing to wrap).
        reads_source_image: whether :meth:`generate` reads a p2p / s2p sample's source
            image (``source_path`` or ``source_bytes``). The dataset's source images are
            looked up and decoded only when a generator of the run reads them: judging
            images already made (an image folder) needs none. True unless a generator says
            otherwise, so a third party's generator gets the images it may read.
    """

    name: str
    workers: int = 1
    batch_size: int = 1
    draws_from_the_prompt: ClassVar[bool] = True
    reads_source_image: bool = True

    @abstractmethod
    def fingerprint(self) -> dict[str, Any]:
        """Everything that changes the images this generator makes (checkpoint, steps...)."""

    def check_environment(self) -> None:  # noqa: B027 - optional hook
        """Check what :meth:`load` needs from this machine, without loading or connecting:
        an environment variable, a local folder. ``trig-stream validate`` calls it.

        Raises:
            FatalBackendError: something :meth:`load` needs is missing.
        """

    def load(self) -> None:  # noqa: B027 - optional hook
        """Load weights or open resources; called once, in a worker thread, before use."""

    def stop_loading(self) -> None:  # noqa: B027 - optional hook
        """Cut short a :meth:`load` that a stop left running in its thread, if it can be.

        Called in the event loop's thread, so it must not block. A load that can end early
        (a pipeline loading in a child process, which is killed) then raises, and what it
        raises goes nowhere; :meth:`close` is not called after a load that raised, so the
        load releases what it holds itself. By default nothing happens: the load runs to its
        end in its thread, and :meth:`close` then releases it (see :func:`load_in_thread`).
        """

    @abstractmethod
    def generate(
        self, requests: Sequence[GenerationRequest], *, worker: int, cancel: threading.Event
    ) -> Sequence[Image | EncodedPicture | TimedPicture | Exception]:
        """Make one image per request, in order; a failed item is its exception.

        A failed item's exception says whose fault it is: an
        :class:`~trig_stream.errors.ItemError` when the item's own (its source image cannot
        be read, a refusal of its prompt), any other when the call failed (the model's code
        raised). Before the generator has made a picture in the run, a few calls that fail
        so, or that raise, stop the run: every call would likely fail the same way.

        An image is a PIL image, an :class:`EncodedPicture` when it already is a PNG file's
        bytes, or a :class:`TimedPicture` when it was made in another process.

        Args:
            requests: 1 to ``batch_size`` requests.
            worker: index of the calling worker (0 to ``workers - 1``), which tells a
                generator with several devices which one to use.
            cancel: set when the run is being cancelled; long loops should check it between
                steps and return early (the engine discards the results).

        Raises:
            FatalBackendError: nothing can be generated at all (the run stops).
        """

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources; called once, in a worker thread, at the end of the run."""

    def notes(self) -> list[str]:
        """What the user should hear about after :meth:`close` (e.g. files left unused)."""
        return []

    def prompt_rewrite(self, data_id: str) -> PromptRewrite | None:
        """How the prompt of ``data_id`` was rewritten for its latest image, if it was.

        Called once per new image, in a worker thread, after :meth:`generate` returned it.
        """
        return None


def reads_source_images(generators: Iterable[Generator]) -> bool:
    """Whether one of a run's generators reads p2p / s2p source images (see
    :attr:`Generator.reads_source_image`): the dataset's are then looked up and checked."""
    return any(generator.reads_source_image for generator in generators)


@dataclass(frozen=True, slots=True)
class PreparedImage:
    """An image made ready for a judge once and shared by all its dimension requests.

    Attributes:
        path: the image file.
        payload: what the backend sends for it (a data URL, a file URL), or None.
    """

    path: Path
    payload: Any = None


@dataclass(frozen=True, slots=True)
class JudgeRequest:
    """One (image, dimension) question to a judge."""

    model: str
    sample: Sample
    dimension: Dimension
    image: PreparedImage
    attempt: int


@dataclass(frozen=True, slots=True)
class JudgeReply:
    """A judge's answer: the first token's top logprobs, or a score it computed itself.

    Attributes:
        top_logprobs: ``(token, logprob)`` pairs of the first answer token; None when the
            answer came without them.
        score: set by metrics that compute a score directly (not from logprobs).
        text: the answer text, for the record.
        unscorable: why there is nothing to score, when the judge answered but found nothing
            to measure (a metric's None): an ``unscorable`` judgement, as an answer without a
            rating word is, not an ``error`` that ``--retry-errors`` would ask again.
    """

    top_logprobs: TopLogprobs | None = None
    score: float | None = None
    text: str = ""
    unscorable: str | None = None


@dataclass(frozen=True, slots=True)
class ServerLoad:
    """What a judge's server says about its queue (vLLM's ``/metrics`` gauges).

    Attributes:
        running: requests the server is processing now.
        waiting: requests queued at the server, not yet started.
    """

    running: int
    waiting: int


class Judge(ABC):
    """Scores images on dimensions. ``judge`` is called concurrently up to ``concurrency``.

    Attributes:
        name: the metric's name in the run (``trigscore`` by default).
        concurrency: the most requests in flight at once.
        scorer: how top logprobs become a score (see :mod:`trig_stream.scoring`).
        confidence: whether the score is weighted by the top rating's probability.
        dimensions: the dimensions this judge measures; None for all. A judge is never asked
            about another dimension (a toxicity classifier measures only ``R-T``), so no
            judgement, not even an error, is made for it.
    """

    name: str
    concurrency: int = 16
    scorer: Scorer = "robust"
    confidence: bool = False
    dimensions: frozenset[Dimension] | None = None

    def __init__(
        self,
        name: str,
        options: Any,
        *,
        concurrency: int = 16,
        scorer: Scorer = "robust",
        confidence: bool = False,
    ) -> None:
        self.name = name
        self.options = options
        self.concurrency = concurrency
        self.scorer = scorer
        self.confidence = confidence

    @classmethod
    def from_config(cls, entry: JudgeConfig, options: Any, config: RunConfig) -> Self:
        """Build the judge a ``[[judges]]`` entry describes (nothing is connected yet).

        This default suits judges constructed as ``cls(name, options, *, concurrency,
        scorer, confidence)``; others override it.
        """
        build: Any = cls
        judge: Self = build(
            entry.name,
            options,
            concurrency=entry.concurrency,
            scorer=entry.scorer,
            confidence=entry.confidence,
        )
        return judge

    def measures(self, dimension: Dimension) -> bool:
        """Whether this judge is asked about ``dimension`` (see :attr:`dimensions`)."""
        return self.dimensions is None or dimension in self.dimensions

    @abstractmethod
    def fingerprint(self) -> JudgeFingerprint:
        """Everything that changes this judge's scores."""

    def check_environment(self) -> None:  # noqa: B027 - optional hook
        """Check what :meth:`open` needs from this machine, without loading or connecting:
        an environment variable, a command on PATH, a local folder. ``trig-stream validate``
        calls it.

        Raises:
            FatalBackendError: something :meth:`open` needs is missing.
        """

    def opening(self) -> str:
        """What :meth:`open` does, when it can take a while (for progress displays)."""
        return "connecting"

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Connect or load; called once before the first request."""

    def connections(self, in_flight: int) -> int:
        """Open files (sockets) this judge holds with ``in_flight`` requests at once, for the
        engine's check of the process's open-file limit. None by default."""
        return 0

    def prepare(self, path: Path) -> PreparedImage:
        """Read and encode an image once for all its requests; runs in a worker thread."""
        return PreparedImage(path=path)

    @abstractmethod
    async def judge(self, request: JudgeRequest) -> JudgeReply:
        """Ask one question.

        Raises:
            RetryableError: transient failure (the engine retries with backoff).
            UnreachableError: a retryable failure without any answer of the judge's server
                (no connection, none in time): when the judge has answered nothing yet and
                a request spends its retries on one, the run stops.
            AnswerTimeoutError: no answer within the timeout (an ``UnreachableError``, and a
                sign of load that lowers an adaptive limit, as a ``RateLimitError`` does).
            ItemError: this request failed for good.
            FatalBackendError: nothing will work (the run stops).
        """

    async def server_load(self) -> ServerLoad | None:
        """The load its server reports now, for adaptive concurrency; None when unknown.

        Called from time to time while the run lasts, only when the judge's adaptive
        concurrency is on. Must not raise for an unreachable server: return None.
        """
        return None

    def stop_now(self) -> None:  # noqa: B027 - optional hook
        """The run stops hard (:meth:`Engine.cancel <trig_stream.engine.Engine.cancel>`):
        :meth:`aclose`, or an :meth:`open` under way, should wait for nothing it can cut
        short (a server's grace period), even if it is waiting already. Called in the event
        loop's thread, at any time (before :meth:`open`, during :meth:`aclose`); must not
        raise."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections; called once at the end of the run."""


@dataclass(slots=True, eq=False)
class _Load:
    """Where one :func:`load_in_thread` (or :func:`call_left_behind_on_cancel`) stands; its
    fields change under ``_threads_lock``."""

    instance: object = None
    """The backend instance it is of, when known (see :func:`threads_left_behind`)."""
    started: bool = False
    loaded: bool = False
    finished: bool = False
    left_behind: bool = False

    def busy(self) -> bool:
        return self.started and not self.finished


_threads_lock = threading.Lock()
_left_behind: set[_Load | ThreadCalls] = set()
"""Work a cancellation left running in worker threads; each thread removes its own."""


def threads_left_behind(instance: object = None) -> int:
    """How many loads or calls a cancellation left running in worker threads (see
    :func:`load_in_thread` and :class:`ThreadCalls`); of the backend ``instance`` only,
    when given (one that was passed to them): until they have ended, its release (a
    generator's ``close()``) is still to come, and another engine must not use it."""
    with _threads_lock:
        return sum(
            work.busy() for work in _left_behind if instance is None or work.instance is instance
        )


def being_cancelled() -> bool:
    """Whether the current task is being cancelled: a cancel scope around it was, or (on
    asyncio) the task itself, from outside anyio. A cancellation exception caught while
    this is False was raised by the code called (an ``asyncio.CancelledError`` of a future
    of its own), not by a cancellation of the caller."""
    if anyio.current_effective_deadline() == -math.inf:
        return True
    try:
        task = asyncio.current_task()
    except RuntimeError:  # not on asyncio (Trio's Cancelled cannot be raised by hand)
        return False
    return task is not None and task.cancelling() > 0


def ending_error(exc: BaseException, failed: str) -> FatalBackendError:
    """The error that stops the run for a ``SystemExit``, ``KeyboardInterrupt`` or other
    ``BaseException`` (no ``Exception``) that a backend's code raised in a worker thread;
    ``failed`` says what failed ("generator 'x' failed to load").

    Raised there, it would not end the process as it means to: it reached the event loop
    as a crash of its own, and the command hung, silently, for good.
    """
    return FatalBackendError(
        f"{failed}: {raised_in_thread(exc)}; the run stops: fix the cause, then run the same "
        "command again to resume"
    )


def raised_in_thread(exc: BaseException) -> str:
    """What a backend's code did, raising ``exc`` (no ``Exception``) in a worker thread,
    for a message: "it raised KeyboardInterrupt (...), which cannot end the process from a
    worker thread"."""
    text = str(exc)
    raised = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return (
        f"it raised {raised} (sys.exit(), an interrupt or a cancellation in its code or a "
        "library it uses), which cannot end the process from a worker thread"
    )


def call_in_thread(func: Callable[..., T], *args: Any, failed: str) -> T:
    """``func(*args)``, a backend's blocking code called in a worker thread, with what
    :func:`ending_error` describes turned into that error.

    Such code never calls back into the event loop, so nothing can cancel it there: a
    cancellation exception it raises (an ``asyncio.CancelledError`` of a future of its own)
    is its failure too, as ``SystemExit`` is. Let through, it read as the run's own
    cancellation: the pipeline's streams broke, or a finished run ended ``cancelled``.
    """
    try:
        return func(*args)
    except Exception:
        raise
    except BaseException as exc:
        raise ending_error(exc, failed) from exc


class ThreadCalls:
    """A backend's blocking calls, each in a worker thread that a cancellation does not wait
    for, and the backend's release after the last one.

    A call may wait minutes on a network or a device (an images API, a pipeline that hangs),
    and a hard stop must not wait that long. Cancelled, :meth:`run` returns at once and the
    thread finishes the call, whose result is dropped. :meth:`close` ends the backend's use:
    no call starts after it, and ``release`` runs when the last call has ended: at once when
    none runs, else in the thread of the last one to end. A cancelled :meth:`close` does
    not wait for ``release`` either (a device that no longer answers can hang it).
    :func:`threads_left_behind` counts a release that nothing waits for until it ends.

    Args:
        backend: what the calls are of, for messages ("generator 'x'").
        instance: the backend instance the calls are of, which :func:`threads_left_behind`
            counts them for.
    """

    def __init__(self, backend: str = "the backend", *, instance: object = None) -> None:
        self._backend = backend
        self.instance = instance
        self._running = 0
        self._closed = False
        self._release: Callable[[], None] | None = None

    def busy(self) -> bool:
        return self._running > 0 or self._release is not None

    async def run(
        self, func: Callable[..., T], *args: Any, limiter: anyio.CapacityLimiter | None = None
    ) -> T:
        """``func(*args)`` in a worker thread (behind ``limiter``, as ``anyio.to_thread``).

        Raises:
            FatalBackendError: ``func`` raised ``SystemExit``, ``KeyboardInterrupt`` or
                another ``BaseException`` (see :func:`ending_error`).
        """
        failed = f"a call of {self._backend} failed"

        def call() -> T:
            with _threads_lock:
                if self._closed:  # its caller was cancelled before the thread started it
                    raise RuntimeError("the backend was closed before this call started")
                self._running += 1
            try:
                return call_in_thread(func, *args, failed=failed)
            finally:
                with _threads_lock:
                    self._running -= 1
                    last = self._running == 0 and self._release is not None
                if last:
                    self._release_now()

        return await anyio.to_thread.run_sync(call, limiter=limiter, abandon_on_cancel=True)

    async def close(
        self, release: Callable[[], None], *, limiter: anyio.CapacityLimiter | None = None
    ) -> None:
        """No call starts after this; ``release`` runs after the last (see the class).

        ``release`` runs in a thread of its own, and ``limiter`` holds the wait for it.
        """
        with _threads_lock:
            self._closed = True
            self._release = release
            if self._running:
                _left_behind.add(self)
                return
        failures: list[BaseException] = []

        def release_and_keep_failure() -> None:
            try:
                self._release_now()
            except BaseException as exc:  # the waiting task raises it, if it still waits
                failures.append(exc)

        # Its own thread, started here and now: a cancellation from here on cannot keep
        # it from running, as it could keep a worker thread from taking the call up.
        thread = threading.Thread(target=release_and_keep_failure, name=f"{self._backend} release")
        thread.start()
        try:
            await anyio.to_thread.run_sync(thread.join, limiter=limiter, abandon_on_cancel=True)
        except anyio.get_cancelled_exc_class():
            with _threads_lock:
                if self._release is not None:  # still running: nothing waits for it now
                    _left_behind.add(self)
            raise
        if failures:
            raise failures[0]

    def _release_now(self) -> None:
        # In the thread of the last call, or in close's own: the release, once.
        with _threads_lock:
            release = self._release
        try:
            if release is not None:
                release()
        finally:
            with _threads_lock:
                self._release = None
                _left_behind.discard(self)


async def call_left_behind_on_cancel(
    func: Callable[..., T],
    *args: Any,
    limiter: anyio.CapacityLimiter | None = None,
    backend: str = "the backend",
) -> T:
    """``func(*args)``, one blocking call of a backend's code, in a worker thread that a
    cancellation does not wait for.

    A call may hang (a model on a device that no longer answers), and a hard stop must not
    wait for it. Cancelled, this returns at once and the thread finishes the call, whose
    result is dropped; until it ends, :func:`threads_left_behind` counts it.

    Raises:
        FatalBackendError: ``func`` raised ``SystemExit``, ``KeyboardInterrupt`` or another
            ``BaseException`` (see :func:`ending_error`).
    """
    state = _Load()

    def call() -> T:
        with _threads_lock:
            state.started = True
        try:
            return call_in_thread(func, *args, failed=f"a call of {backend} failed")
        finally:
            with _threads_lock:
                state.finished = True
                _left_behind.discard(state)

    try:
        return await anyio.to_thread.run_sync(call, limiter=limiter, abandon_on_cancel=True)
    except anyio.get_cancelled_exc_class():
        with _threads_lock:
            # Counted once it starts (a worker may take it up still); one that never
            # starts stays here, never busy.
            if not state.finished:
                _left_behind.add(state)
        raise


async def load_in_thread(
    load: Callable[[], None],
    unload: Callable[[], None],
    *,
    limiter: anyio.CapacityLimiter | None = None,
    backend: str = "the backend",
    stop: Callable[[], None] | None = None,
    instance: object = None,
) -> None:
    """Run a backend's blocking ``load`` in a worker thread that a cancellation does not wait for.

    Loading weights can take minutes (from disk, or the hub), and a hard stop must not wait
    that long. Cancelled, this returns at once and leaves the thread to finish; what it then
    loaded is released with ``unload`` in that thread, since nothing else will use it. If
    the load ended just as the cancellation came, ``unload`` runs here, before the
    cancellation goes on. A load that fails after it was left behind releases nothing: it
    holds nothing. Until such a thread ends, :func:`threads_left_behind` counts it (a load
    cancelled before its thread started it never runs). A load that can be cut short is,
    with ``stop``: a child process loading is killed rather than left to load to the end.

    Args:
        load: loads the backend; blocking.
        unload: releases what ``load`` loaded; blocking.
        limiter: the capacity limiter of the worker thread, as for ``anyio.to_thread``.
        backend: what loads, for messages ("generator 'x'").
        stop: cuts a load left behind short (see :meth:`Generator.stop_loading`); called
            here, in the event loop's thread, when the cancellation leaves the load running.
        instance: the backend instance that loads, which :func:`threads_left_behind`
            counts the load for.

    Raises:
        FatalBackendError: ``load`` raised ``SystemExit``, ``KeyboardInterrupt`` or another
            ``BaseException`` (see :func:`ending_error`).
    """
    state = _Load(instance=instance)

    def load_then_release_if_left_behind() -> None:
        with _threads_lock:
            if state.left_behind:
                # Cancelled before a thread took it up (Trio's may still start it): nothing
                # waits for the model, and loading it now would race a later engine's load.
                _left_behind.discard(state)
                return
            state.started = True
        try:
            call_in_thread(load, failed=f"{backend} failed to load")
            with _threads_lock:
                state.loaded = True
                release = state.left_behind
            if release:
                unload()
        finally:
            with _threads_lock:
                state.finished = True
                _left_behind.discard(state)

    try:
        await anyio.to_thread.run_sync(
            load_then_release_if_left_behind, limiter=limiter, abandon_on_cancel=True
        )
    except anyio.get_cancelled_exc_class():
        with _threads_lock:
            state.left_behind = True
            release_here = state.loaded  # its thread saw no cancellation: it will not release
            if not state.finished:
                _left_behind.add(state)
            still_loading = not state.loaded and not state.finished
        if stop is not None and still_loading:
            try:
                stop()
            except Exception:  # the load then runs to its end, as it would without ``stop``
                logger.warning("%s: stopping its load failed", backend, exc_info=True)
        if release_here:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(unload)
        raise
