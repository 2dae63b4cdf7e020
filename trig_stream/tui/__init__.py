"""The live dashboard of a run (needs the ``tui`` extra: textual).

Data flows one way: a :class:`SnapshotSource` turns a run into immutable
:class:`DashboardSnapshot` values, and the widgets draw those. The engine never imports this
package.

* :func:`run_dashboard`: show the dashboard of an engine this process runs (``trig-stream
  run`` on a terminal).
* :class:`TrigDashboardApp` / :class:`Dashboard`: the app, and the widget a host app mounts.
* :class:`EngineSource`, :class:`RunDirSource`, :class:`StaticSource`: snapshots of a live
  engine, of a run directory another process writes, of fixed data.
* :func:`add_watch_command`: the ``trig-stream watch RUN_DIR`` subcommand.

Names that need textual are imported on first use, so ``trig_stream.tui.watch`` and the
snapshot types stay usable (and cheap) without it; without it, those names raise
:class:`~trig_stream.errors.MissingExtraError`, naming the ``pip install``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from trig_stream.errors import MissingExtraError
from trig_stream.tui.snapshot import (
    DashboardSnapshot,
    Gauge,
    JudgeView,
    ModelProgress,
    RelationView,
    RunControl,
    SnapshotSource,
    StaticSource,
)

if TYPE_CHECKING:
    from trig_stream.tui.app import TrigDashboardApp
    from trig_stream.tui.dashboard import Dashboard
    from trig_stream.tui.run import run_dashboard
    from trig_stream.tui.sources import EngineSource
    from trig_stream.tui.watch import add_watch_command
    from trig_stream.tui.watch_source import RunDirSource

_LAZY = {
    "TrigDashboardApp": "trig_stream.tui.app",
    "Dashboard": "trig_stream.tui.dashboard",
    "run_dashboard": "trig_stream.tui.run",
    "EngineSource": "trig_stream.tui.sources",
    "RunDirSource": "trig_stream.tui.watch_source",
    "add_watch_command": "trig_stream.tui.watch",
}

__all__ = [
    "Dashboard",
    "DashboardSnapshot",
    "EngineSource",
    "Gauge",
    "JudgeView",
    "ModelProgress",
    "RelationView",
    "RunControl",
    "RunDirSource",
    "SnapshotSource",
    "StaticSource",
    "TrigDashboardApp",
    "add_watch_command",
    "run_dashboard",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'trig_stream.tui' has no attribute {name!r}")
    from importlib import import_module

    try:
        loaded = import_module(module)
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] != "textual":
            raise
        # As every other extra: the error names the install (it was a bare ModuleNotFoundError).
        raise MissingExtraError("textual", "tui") from exc
    return getattr(loaded, name)
