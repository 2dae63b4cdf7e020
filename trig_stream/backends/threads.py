"""Backend code run in worker threads, and what a cancellation leaves running there.

A generator's load, generate calls and close, a judge's model load, and an in-process
judge's batches are blocking code. They run in worker threads (:func:`load_in_thread`,
:class:`ThreadCalls`, :func:`call_left_behind_on_cancel`) that a hard stop does not wait
for: the thread finishes its work, releases what nothing will use, and until then
:func:`threads_left_behind` counts it, so another engine does not take the backend over
too early. A ``SystemExit``, ``KeyboardInterrupt`` or other ``BaseException`` such code
raises there becomes a :class:`~trig_stream.errors.FatalBackendError`
(:func:`call_in_thread`), and :func:`being_cancelled` tells the caller's own cancellation
from a cancellation exception the code raised. The backends themselves are in
:mod:`trig_stream.backends.base`.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import anyio.to_thread

from trig_stream.errors import FatalBackendError

T = TypeVar("T")

logger = logging.getLogger(__name__)


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


def cancellation_classes() -> tuple[type[BaseException], ...]:
    """The cancellation exceptions a backend's own code may raise (no ``Exception``):
    asyncio's, and Trio's once it is loaded."""
    trio = sys.modules.get("trio")  # only a loaded Trio's: importing it here costs time
    if trio is None:
        return (asyncio.CancelledError,)
    return (asyncio.CancelledError, trio.Cancelled)


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


def exiting_error(exc: SystemExit | KeyboardInterrupt, failed: str) -> FatalBackendError:
    """The error that stops the run for a ``SystemExit`` or ``KeyboardInterrupt`` that a
    backend's code raised in the event loop's thread; ``failed`` says what raised it
    ("judge 'x': its judge()"). A judge's ``judge()`` and ``open()`` bring both here; the
    synchronous hooks (``opening()``, ``fingerprint()``, ...) only a ``SystemExit``: there a
    ``KeyboardInterrupt`` is a Ctrl-C and goes on.

    Let out of the event loop, it left the run's worker threads waiting for work, and the
    process never exited; or it ended the command with its exit code and no word of why.
    """
    text = str(exc)
    raised = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return FatalBackendError(
        f"{failed} raised {raised} (sys.exit() or an interrupt in its code or a "
        "library it uses); the run stops: fix the cause, then run the same command again "
        "to resume"
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


def blocking_hook(hook: Callable[[], object], what: str) -> Callable[[], None]:
    """``hook``, a backend's blocking method called in a worker thread, checked to return
    no awaitable; ``what`` names it in messages ("judge 'x': its load()").

    An ``async def`` hook gives a coroutine there that nothing awaits: its work is never
    done, and only a RuntimeWarning said so. The config check refuses such hooks; this
    catches those it cannot see (a plain ``def`` returning a coroutine).

    Raises:
        FatalBackendError: (from the returned callable) ``hook`` returned an awaitable.
    """

    def call() -> None:
        result = hook()
        if inspect.isawaitable(result):
            if inspect.iscoroutine(result):
                result.close()  # never to run: no "never awaited" warning besides this error
            raise FatalBackendError(
                f"{what} returned {type(result).__name__}, an awaitable that nothing awaits "
                "in the worker thread it is called in, so its work was never done: define "
                "it as a plain `def` that does its work before it returns"
            )

    return call


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
    instance: object = None,
) -> T:
    """``func(*args)``, one blocking call of a backend's code, in a worker thread that a
    cancellation does not wait for.

    A call may hang (a model on a device that no longer answers), and a hard stop must not
    wait for it. Cancelled, this returns at once and the thread finishes the call, whose
    result is dropped; until it ends, :func:`threads_left_behind` counts it (for
    ``instance``, the backend instance the call is of, too: another engine must not use
    that instance while the call still runs on it).

    Raises:
        FatalBackendError: ``func`` raised ``SystemExit``, ``KeyboardInterrupt`` or another
            ``BaseException`` (see :func:`ending_error`).
    """
    state = _Load(instance=instance)

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
        stop: cuts a load left behind short (see
            :meth:`~trig_stream.backends.base.Generator.stop_loading`); called
            here, in the event loop's thread, when the cancellation leaves the load running;
            what it raises, a ``KeyboardInterrupt`` aside, is logged.
        instance: the backend instance that loads, which :func:`threads_left_behind`
            counts the load for.

    Raises:
        FatalBackendError: ``load`` raised ``SystemExit``, ``KeyboardInterrupt`` or another
            ``BaseException`` (see :func:`ending_error`).
    """
    state = _Load(instance=instance)
    load = blocking_hook(load, f"{backend}: its load()")
    unload = blocking_hook(unload, f"{backend}: its close()")

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
            except KeyboardInterrupt:
                raise
            except BaseException:  # the load then runs to its end, as it would without ``stop``
                # A SystemExit (a library calling sys.exit()) left the engine raw.
                logger.warning("%s: stopping its load failed", backend, exc_info=True)
        if release_here:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(unload)
        raise
