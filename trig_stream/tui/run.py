"""Showing the dashboard of a run this process drives (``trig-stream run`` on a terminal).

:func:`run_dashboard` runs the app beside the engine on the same event loop (Textual needs
asyncio). The app only reads :meth:`Engine.stats` and the live relation tracker a few times a
second; the results stream is consumed by a task of its own, so however busy the screen is,
the pipeline never waits for it.

Lifetime: a run that finishes (``done`` or ``stopped``) stays on screen until ``q``, unless
``linger`` is off (the default when headless) or a signal stopped the run (SIGTERM, SIGINT,
SIGHUP: nobody may be watching), in which case the app exits with the run.
``q`` (or a second ``ctrl+c``) cancels the engine and closes the app at once. A run that ends
any other way (a fatal error) closes the app, so the caller can report what happened.
The judges close when the run ends, not when the app does: the engine closes them once
``results`` ends, still inside the caller's ``async with engine``, so a judge server started
for the run stops while a finished run may still be on screen.
"""

from __future__ import annotations

import anyio
from anyio.abc import TaskStatus
from textual.pilot import Pilot

from trig_stream.engine import Engine
from trig_stream.signals import (
    is_hangup,
    job_control_kept,
    silence_the_terminal,
    stop_signal_receiver,
)
from trig_stream.tui.app import TrigDashboardApp
from trig_stream.tui.dashboard import REFRESH_EVERY_S
from trig_stream.tui.sources import EngineSource

try:  # the autopilot type moved between textual versions; only its shape matters here
    from textual.app import AutopilotCallbackType
except ImportError:  # pragma: no cover
    from collections.abc import Awaitable, Callable
    from typing import Any

    AutopilotCallbackType = Callable[[Pilot[Any]], Awaitable[None]]  # type: ignore[misc]


async def run_dashboard(
    engine: Engine,
    *,
    linger: bool | None = None,
    headless: bool = False,
    size: tuple[int, int] | None = None,
    auto_pilot: AutopilotCallbackType | None = None,
    handle_signals: bool = True,
    refresh_every_s: float = REFRESH_EVERY_S,
) -> None:
    """Show the dashboard of a running engine; return when the run is over and the app closed.

    Call it inside ``async with engine``, in place of consuming ``engine.results``; after it
    returns, :meth:`Engine.summary` tells how the run ended.

    Args:
        engine: the entered engine.
        linger: keep a finished run on screen until ``q``; by default, unless ``headless``.
        headless: run the app without a terminal (benchmarks, tests).
        size: the terminal size to assume, as (columns, rows).
        auto_pilot: a coroutine driving the app, as in Textual's :meth:`App.run_async`.
        handle_signals: map SIGINT and SIGTERM (each unless ignored) to ``ctrl+c``: graceful
            stop, then hard; SIGHUP (unless ignored) to a hard stop.
        refresh_every_s: how often the dashboard reads the engine.
    """
    source = EngineSource(engine)
    app = TrigDashboardApp(
        source,
        refresh_every_s=refresh_every_s,
        linger=not headless if linger is None else linger,
    )
    ended = anyio.Event()

    async def consume() -> None:
        try:
            async for judgement in engine.results:
                source.observe(judgement)
        finally:
            source.end()
            ended.set()

    async def on_signals(*, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        with stop_signal_receiver() as signals:
            task_status.started()
            async for signum in signals:
                # A signal comes from outside (ctrl+c here is a key): no one may be watching,
                # so the app closes when the run ends instead of waiting for `q`.
                app.linger = False
                if is_hangup(signum):
                    silence_the_terminal()
                    app.action_quit_run()
                else:
                    app.action_interrupt()

    # Engine.cancel() cancels the scope the caller's ``async with engine`` body runs in, and
    # so this function: the shield lets the app close properly (and give the terminal back)
    # and the results be drained before that cancellation is delivered.
    with anyio.CancelScope(shield=True):
        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            if handle_signals:
                await tg.start(on_signals)
            with job_control_kept():  # Textual's Ctrl-Z handlers end with the app
                await app.run_async(headless=headless, size=size, auto_pilot=auto_pilot)
            if not ended.is_set() and not source.engine_control.cancel_requested:
                # The app closed while the run goes on: nothing would read its results.
                source.engine_control.cancel()
            await ended.wait()
            tg.cancel_scope.cancel()
