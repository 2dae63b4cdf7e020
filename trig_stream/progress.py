"""Plain progress for runs without the TUI: a live line on a terminal, log lines elsewhere."""

from __future__ import annotations

import codecs
import os
import sys
import time

from rich.console import Console
from rich.live import Live
from rich.text import Text

from trig_stream.stats import EngineStats
from trig_stream.terminal import CommandConsole

LOG_EVERY_S = 10.0
"""How often a line is printed when the output is not a terminal (a log file, CI)."""


NO_DASHBOARD = "no dashboard: install it with pip install 'trig-stream[tui]'"
"""What ``run`` and ``watch`` say on a terminal without textual, before the plain lines."""

DUMB_TERMINALS = ("dumb", "unknown")
"""``TERM`` values of terminals that cannot move the cursor (an editor's shell, some CI
logs): no full-screen app nor a line redrawn in place there (rich's list)."""


def full_screen_possible() -> bool:
    """Whether a full-screen app (the dashboard) can be shown: stdin, stdout and stderr are
    a terminal, one that can move the cursor, and stdout and stderr write UTF-8.

    Textual draws on the process's original stderr (``sys.__stderr__``): with it redirected
    (``2>run.log``), the dashboard would fill the log and the terminal stay blank. On a
    terminal of another encoding (``PYTHONIOENCODING=ascii``, a Latin-1 locale) its box
    lines and marks came out as backslash escapes (``\\u2502``), unreadable.
    """
    dumb = os.environ.get("TERM", "").lower() in DUMB_TERMINALS
    streams = (sys.stdin, sys.stdout, sys.__stderr__)
    if dumb or not all(stream is not None and stream.isatty() for stream in streams):
        return False
    return all(_writes_utf8(stream) for stream in (sys.stdout, sys.__stderr__))


def _writes_utf8(stream: object) -> bool:
    encoding = getattr(stream, "encoding", None)
    try:
        return isinstance(encoding, str) and codecs.lookup(encoding).name == "utf-8"
    except LookupError:
        return False


def describe(stats: EngineStats) -> str:
    """One line: state, counts by status, throughput, latency, buffers."""
    models = stats.models.values()
    ok = sum(m.ok for m in models)
    unscorable = sum(m.unscorable for m in models)
    error = sum(m.error for m in models)
    skipped = sum(m.skipped for m in models)
    generated = sum(m.generated for m in models)
    p50 = stats.judge_latency.p50
    parts = [
        f"[{stats.state}] {stats.elapsed_s:6.1f}s",
        f"samples {stats.samples_read}",
        # Images made by this run: "images" means those with a judgement (the dashboard's).
        f"made {generated}",
        f"judged {ok + unscorable + error} (ok {ok}, unscorable {unscorable}, error {error})",
        f"{stats.judgements_per_s:.1f}/s",
    ]
    if p50 is not None:
        parts.append(f"judge p50 {p50 * 1000:.0f} ms")
    if skipped:
        # Per model and sample, as "images" counts: with two models a 32-sample dataset has 64.
        parts.append(f"images already judged {skipped}")
    left = sum(m.left for m in models)
    if left:
        parts.append(f"images left to judge on resume {left}")
    if stats.quarantined:
        parts.append(f"quarantined {stats.quarantined}")
    loading = [name for name, m in stats.models.items() if m.loading]
    if loading:
        parts.append(f"loading {', '.join(loading)}")
    if stats.opening is not None:
        # Judges opened late (a resumed run found no work left as it opened, then its
        # dataset grew): a model loading, a server starting, with nothing else moving.
        parts.append(f"opening {stats.opening}")
    return " | ".join(parts)


class PlainProgress:
    """Shows :func:`describe` lines: refreshed in place on a terminal, else every few seconds.

    Args:
        console: where to print (stderr by default).
    """

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or CommandConsole(stderr=True)
        self._live: Live | None = None
        self._last = 0.0
        self._news: tuple[tuple[str, ...], str | None] = ((), None)
        self._printed: str | None = None

    def __enter__(self) -> PlainProgress:
        if self.console.is_terminal and not self.console.is_dumb_terminal:
            self._live = Live(console=self.console, auto_refresh=False, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)
            self._live = None

    def update(self, stats: EngineStats, *, force: bool = False) -> None:
        """Show the latest stats (rate-limited when not on a terminal)."""
        line = describe(stats)
        if self._live is not None:
            # Folded onto the next lines where wider than the terminal, never cut: the
            # command's console soft-wraps (a log line is never cut), which a Live region
            # answered by cropping the line at the terminal's width.
            self._live.update(Text(line, overflow="fold", no_wrap=False), refresh=True)
            return
        now = time.monotonic()
        # A model starting or ending its load, a judge its opening, is news worth a line of
        # its own: a load takes seconds to minutes, and between two lines 10 s apart it could
        # go unsaid.
        loading = tuple(name for name, counts in stats.models.items() if counts.loading)
        news = (loading, stats.opening)
        changed, self._news = news != self._news, news
        if line == self._printed:
            return  # said already (a forced last line repeated the refresh's: "[stopped]" twice)
        if force or changed or now - self._last >= LOG_EVERY_S:
            self._last = now
            self._printed = line
            # Literally: the state's brackets, ``[running]``, are no markup.
            self.console.print(line, highlight=False, markup=False, soft_wrap=True)
