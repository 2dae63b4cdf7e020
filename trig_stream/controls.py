"""Where an engine's controls run: the event loop the engine belongs to.

:meth:`~trig_stream.engine.Engine.stop`, :meth:`~trig_stream.engine.Engine.cancel`,
:meth:`~trig_stream.engine.Engine.pause` and :meth:`~trig_stream.engine.Engine.resume` may be
called from any thread (a GUI's, a signal handler's), but the engine's events and cancel scopes
may only be touched in its own event loop: a cancel from a thread failed half done, a resume
never woke the run. :class:`EngineLoop` remembers that loop and runs a control there.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import logging
import sys
import threading
from collections.abc import Callable

import anyio
import anyio.from_thread
import anyio.lowlevel

logger = logging.getLogger(__name__)

LOOP_LOOK_S = 0.05
"""How often a control waiting for the engine's asyncio loop looks whether that loop still
runs (one that stopped, or is closing, never runs the control: the run is over)."""


class EngineLoop:
    """The event loop an engine belongs to; made in it (the running loop is taken)."""

    def __init__(self) -> None:
        self.take()

    def take(self) -> None:
        """Make the running event loop the one that control calls from other threads run in
        (``async with`` takes it again: an engine made in one loop may be run in another)."""
        self._token = anyio.lowlevel.current_token()
        self._thread = threading.get_ident()
        self._running_scheduled = False  # a control scheduled by _schedule_soon runs now

    def called_elsewhere(
        self, control: Callable[[], None], *, awaiting_run: Callable[[], bool]
    ) -> bool:
        """Run ``control`` in the engine's event loop when called from outside it, and say
        whether it did (else the caller runs it, in the loop it is in). The loop is the one
        running the engine, once ``async with`` has begun; before, the one that made it.

        The rule, for each place a control may come from:

        - the thread of the engine's loop, inside a running loop, in a task: run by the
          caller;
        - that thread inside a running loop, in no task (a callback of the loop, or a raw
          ``signal.signal`` handler that interrupted the loop as it waits): run by the loop
          it is in, scheduled so as to wake it (what the control itself schedules would wait
          for the loop's next wake-up, maybe forever);
        - another thread while the engine's loop runs: run in that loop, and waited for
          from outside any running loop; from inside a running loop, scheduled there and
          not waited for (two engines' loops, each stopping the other's engine at once, each
          waited for the other, blocked, for good: a control never blocks a running loop);
        - inside a running loop after the engine's loop ended, before any loop runs the
          engine: run by the caller, and so recorded for the ``async with`` block to come
          (the loop the caller is in is the one that will run it);
        - outside any running loop (any thread, the one that made the engine too) after the
          engine's loop ended: refused before anything is touched if the engine has not run
          yet (it would be lost, or half done), else nothing to do: the run is over.

        Args:
            control: the engine's control method (its name is the error's).
            awaiting_run: says whether the engine has not run yet (nor closed): a control it
                cannot run then would be dropped unnoticed, and the run ran to its end.

        Raises:
            RuntimeError: the loop that made the engine has ended, none runs it yet, and
                the call came from outside any running event loop.
        """
        in_a_loop = _in_a_running_loop()
        if threading.get_ident() == self._thread:
            if in_a_loop:
                return self._schedule_soon(control)
            # This thread runs no loop, so the one that made (or ran) the engine has ended.
            if awaiting_run():
                raise self._refused(control)
            return True
        try:
            self._run_there(control, from_a_loop=in_a_loop)
        except anyio.RunFinishedError:
            if not awaiting_run():
                return True  # the run is over: nothing left to control
            if in_a_loop:
                return False
            raise self._refused(control) from None
        return True

    def _run_there(self, control: Callable[[], None], *, from_a_loop: bool) -> None:
        """Run ``control`` in the engine's loop: wait for it, or from inside a running loop
        only schedule it (``RunFinishedError`` if the engine's loop has ended)."""
        loop = self._token.native_token
        if from_a_loop:
            _schedule_in(loop, _reported(control))
        elif isinstance(loop, asyncio.AbstractEventLoop):
            # Not anyio.from_thread.run_sync: it gives up only on a closed loop, and waited
            # forever on one that had stopped (a run under asyncio.run as it closes, a loop
            # an application keeps).
            _run_in_asyncio_loop(control, loop)
        else:
            anyio.from_thread.run_sync(control, token=self._token)

    def _schedule_soon(self, control: Callable[[], None]) -> bool:
        """Schedule ``control`` in the running loop of this thread, waking it, when the call
        came from no task of it; say whether it did (else the caller runs it)."""
        if self._running_scheduled:
            return False

        def run() -> None:
            self._running_scheduled = True
            try:
                control()
            finally:
                self._running_scheduled = False

        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            if asyncio.current_task(loop) is not None:
                return False
            loop.call_soon_threadsafe(run)
            return True
        trio = sys.modules.get("trio")  # never imported here: a trio loop has imported it
        if trio is None:
            return False
        try:
            trio.lowlevel.current_task()
        except RuntimeError:  # in no task
            with contextlib.suppress(RuntimeError):
                trio.lowlevel.current_trio_token().run_sync_soon(run)
                return True
        return False

    @staticmethod
    def _refused(control: Callable[[], None]) -> RuntimeError:
        return RuntimeError(
            f"engine.{control.__name__}() came from outside any running event loop after "
            "the loop that made the engine ended, and before any loop runs it, so it would "
            "be lost: call it once `async with engine` has begun, or before it from inside "
            "the event loop that will run it"
        )


def _schedule_in(loop: object, control: Callable[[], None]) -> None:
    """Schedule ``control`` in ``loop`` (an asyncio loop or a trio token of another thread)
    and return at once, or raise ``RunFinishedError`` if that loop no longer runs."""
    if isinstance(loop, asyncio.AbstractEventLoop):
        if loop.is_closed() or not loop.is_running():
            raise anyio.RunFinishedError
        try:
            loop.call_soon_threadsafe(control, context=_asyncio_context())
        except RuntimeError:  # "Event loop is closed"
            if loop.is_closed():
                raise anyio.RunFinishedError from None
            raise
        return
    trio = sys.modules["trio"]  # the engine's loop is trio's: it has imported it
    try:
        # Run in a context of its own, as a plain thread's call would be: none of the
        # caller's loop.
        loop.run_sync_soon(contextvars.Context().run, control)  # type: ignore[attr-defined]
    except trio.RunFinishedError:
        raise anyio.RunFinishedError from None


def _reported(control: Callable[[], None]) -> Callable[[], None]:
    """``control``, for a loop's callback that nobody waits for: what it raises is logged,
    not raised in the engine's loop (trio crashes with it, asyncio's loop stops)."""

    def run() -> None:
        try:
            control()
        except BaseException:  # no caller waits to see it
            logger.exception(
                "engine.%s(), scheduled from another thread's event loop, failed",
                control.__name__,
            )

    return run


def _asyncio_context() -> contextvars.Context:
    """A context for a control run in the engine's asyncio loop, in no task: told that
    asyncio runs it, as anyio.from_thread.run_sync tells it (a judge's stop_now() may ask
    anyio, which asks sniffio if installed)."""
    context = contextvars.copy_context()
    sniffio = sys.modules.get("sniffio")  # imported by anyio if installed
    if sniffio is not None:
        context.run(sniffio.current_async_library_cvar.set, "asyncio")
    return context


def _run_in_asyncio_loop(control: Callable[[], None], loop: asyncio.AbstractEventLoop) -> None:
    """Run ``control`` in ``loop`` (in another thread) and wait for it, or raise
    ``RunFinishedError`` once that loop no longer runs: stopped (its ``run_until_complete``
    returned, ``asyncio.run`` shutting down) or closed. A control given up on never runs,
    should the loop run again later."""
    done: concurrent.futures.Future[None] = concurrent.futures.Future()

    def run() -> None:
        if not done.set_running_or_notify_cancel():
            return  # the caller gave up on it: the loop had stopped
        try:
            control()
        except BaseException as exc:
            done.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        else:
            done.set_result(None)

    try:
        loop.call_soon_threadsafe(run, context=_asyncio_context())
    except RuntimeError:  # "Event loop is closed"
        if loop.is_closed():
            raise anyio.RunFinishedError from None
        raise
    while True:
        try:
            done.result(timeout=LOOP_LOOK_S)
        except concurrent.futures.TimeoutError:
            if (loop.is_closed() or not loop.is_running()) and done.cancel():
                raise anyio.RunFinishedError from None
        else:
            return


def _in_a_running_loop() -> bool:
    """Whether the calling thread is inside a running event loop (asyncio or trio), in a
    task or not. A control may come from a callback of the loop, in no task
    (``loop.call_soon``, a handler of ``loop.add_signal_handler``): there, under
    ``asyncio.run``, anyio's ``current_token()`` says no loop runs (sniffio looks for a task,
    or for the mark only anyio's own runner leaves), and the control was dropped as if the
    run were over."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        return True
    trio = sys.modules.get("trio")  # never imported here: a trio loop has imported it
    if trio is not None:
        try:
            trio.lowlevel.current_trio_token()
        except RuntimeError:
            pass
        else:
            return True
    try:
        anyio.lowlevel.current_token()  # any other loop anyio knows (it asks sniffio)
    except anyio.NoEventLoopError:
        return False
    return True
