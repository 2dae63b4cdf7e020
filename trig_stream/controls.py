"""Where an engine's controls run: the event loop the engine belongs to.

:meth:`~trig_stream.engine.Engine.stop`, :meth:`~trig_stream.engine.Engine.cancel`,
:meth:`~trig_stream.engine.Engine.pause` and :meth:`~trig_stream.engine.Engine.resume` may be
called from any thread (a GUI's, a signal handler's), but the engine's events and cancel scopes
may only be touched in its own event loop: a cancel from a thread failed half done, a resume
never woke the run. :class:`EngineLoop` remembers that loop and runs a control there.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import anyio
import anyio.from_thread
import anyio.lowlevel


class EngineLoop:
    """The event loop an engine belongs to; made in it (the running loop is taken)."""

    def __init__(self) -> None:
        self.take()

    def take(self) -> None:
        """Make the running event loop the one that control calls from other threads run in
        (``async with`` takes it again: an engine made in one loop may be run in another)."""
        self._token = anyio.lowlevel.current_token()
        self._thread = threading.get_ident()

    def called_elsewhere(
        self, control: Callable[[], None], *, awaiting_run: Callable[[], bool]
    ) -> bool:
        """Run ``control`` in the engine's event loop when called from another thread, and
        say whether it did. The loop is the one running the engine, once ``async with`` has
        begun; before, the one that made it. Once the engine's loop has ended, there is no run
        left to control.

        Args:
            control: the engine's control method (its name is the error's).
            awaiting_run: says whether the engine has not run yet (nor closed): a control it
                cannot run then would be dropped unnoticed, and the run ran to its end.

        Raises:
            RuntimeError: the loop that made the engine has ended, and none runs it yet.
        """
        if threading.get_ident() == self._thread:
            return False
        try:
            anyio.from_thread.run_sync(control, token=self._token)
        except anyio.RunFinishedError:
            if awaiting_run():
                raise RuntimeError(
                    f"engine.{control.__name__}() came from another thread after the event "
                    "loop that made the engine ended, and before any loop runs it: call it "
                    "once `async with engine` has begun, or before it from the thread of the "
                    "loop that will run it"
                ) from None
        return True
