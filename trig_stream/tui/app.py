"""The dashboard as an application: keys, the errors view and the help screen.

Keys (shown in the footer):

* ``p`` pause / resume feeding new samples; ``s`` stop gracefully (the work in flight is
  finished); ``q`` quit: a run still going is stopped hard (resumable), a finished one is
  closed. ``ctrl+c`` stops gracefully the first time and hard the second, as in plain mode.
* ``e`` the errors view, ``m`` the next model in the means and DTM panels, ``?`` help;
  ``e`` in the help view and ``?`` in the errors view switch from one to the other.

A read-only source (``trig-stream watch``) has no pause or stop, and ``q`` only closes the
viewer.
"""

from __future__ import annotations

from typing import ClassVar

from rich.cells import cell_len
from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.geometry import Size
from textual.screen import ModalScreen
from textual.scroll_view import ScrollView
from textual.strip import Strip
from textual.widgets import Footer, Static

from trig_stream.errors import TrigStreamError
from trig_stream.stats import ERRORS_KEPT
from trig_stream.tui import render
from trig_stream.tui.dashboard import REFRESH_EVERY_S, Dashboard
from trig_stream.tui.snapshot import CLEAN_END_STATES, DashboardSnapshot, SnapshotSource

STOPPING_STATES = ("stopping", "cancelling")
"""States of a run being stopped: pause and resume no longer apply."""

HELP_KEYS = """\
[b]Keys[/b]
  p       pause / resume feeding new samples (work already queued goes on;
          not once a stop began)
  s       stop gracefully: finish the work in flight, start none (resumable)
  q       quit: stop a running run now (resumable), or close a finished one
  ctrl+c  first: stop gracefully; second: stop now
  e       errors view (latest first, with their reasons)
  m       next model in the means and DTM panels
  ?       this help; escape closes it

Run the same command again to resume a stopped run: judgements already in the
journal are not asked again.
"""

READ_ONLY_HELP_KEYS = """\
[b]Keys[/b]
  q       close this viewer; the run itself is never disturbed
  ctrl+c  close this viewer, as q
  e       errors view (latest first, with their reasons)
  m       next model in the means and DTM panels
  ?       this help; escape closes it

This view only follows the run: it cannot pause or stop it (that is done in
the terminal of the `trig-stream run` that runs it).
"""
"""The keys of a source that cannot steer its run (``trig-stream watch``): p and s do
nothing there, and q and ctrl+c only close the viewer."""

HELP_PANELS = """\
[b]Panels[/b]
  progress   samples queued and generating, images waiting for a judgement,
             judgements ok / unscorable / error, samples already done earlier
  buffers    fill of the bounded buffers between stages; a full (red) buffer
             is backpressure: the stage after it is the bottleneck
  judges     requests in flight against each judge's current limit
  DTM        relation of the row dimension to the column dimension
"""


class TextScreen(ModalScreen[None]):
    """A full-screen text view closed with escape or its own key."""

    DEFAULT_CSS = """
    /* Opaque: a see-through modal screen redrew the dashboard under it on every refresh. */
    TextScreen { align: center middle; background: $background; }
    TextScreen > .frame {
        width: 100%; height: 100%;
        border: round $accent; border-title-style: bold; padding: 0 1;
    }
    """
    # A modal screen hides the app's bindings: the app's keys are forwarded from here, or q
    # and the others did nothing while a view was open (and the footer showed only escape).
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "close", "Close"),
        Binding("p", "app.toggle_pause", "Pause/resume"),
        Binding("s", "app.stop", "Stop"),
        Binding("q", "app.quit_run", "Quit"),
        Binding("m", "app.next_model", "Model"),
    ]

    def __init__(self, title: str) -> None:
        super().__init__()
        self._title = title

    def compose(self) -> ComposeResult:
        with VerticalScroll(classes="frame") as scroll:
            scroll.border_title = self._title
            yield Static(id="body")
        yield Footer()

    def action_close(self) -> None:
        self.dismiss(None)


class TextLines(ScrollView):
    """Lines of text that draws only the lines in sight.

    A ``Static`` of :data:`~trig_stream.stats.ERRORS_KEPT` lines laid out and styled every
    line on each update: with errors coming in, the open errors view took half a core.
    """

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.text = Text()
        self._starts: list[int] = [0]

    def update(self, text: Text) -> None:
        """Show ``text``, one line of it a row."""
        self.text = text
        plain = text.plain
        self._starts = [0]
        width = 0
        while (end := plain.find("\n", self._starts[-1])) >= 0:
            width = max(width, cell_len(plain[self._starts[-1] : end]))
            self._starts.append(end + 1)
        width = max(width, cell_len(plain[self._starts[-1] :]))
        self.virtual_size = Size(width, len(self._starts))
        self.refresh()

    def line(self, index: int) -> Text:
        """Line ``index`` of the text (cut from it only when drawn)."""
        start = self._starts[index]
        end = self._starts[index + 1] - 1 if index + 1 < len(self._starts) else len(self.text)
        return self.text[start:end]

    def render_line(self, y: int) -> Strip:
        scroll_x, scroll_y = self.scroll_offset
        index = y + scroll_y
        width = self.scrollable_content_region.width
        if index >= len(self._starts):
            return Strip.blank(width, self.rich_style)
        segments = self.line(index).render(self.app.console, end="")
        strip = Strip(segments).crop(scroll_x, scroll_x + width)
        return strip.extend_cell_length(width).apply_style(self.rich_style)


class ErrorsScreen(TextScreen):
    """The latest errors (:data:`~trig_stream.stats.ERRORS_KEPT`) with their reasons, and
    the backends' notes; updates live."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("e", "close", "Close", show=False),
        Binding("question_mark", "app.help", "Help", key_display="?"),
    ]

    def __init__(self) -> None:
        super().__init__(f"errors: the latest {ERRORS_KEPT}, latest first")
        self._shown: tuple[tuple[str, ...], tuple[str, ...]] | None = None

    def compose(self) -> ComposeResult:
        body = TextLines(id="body", classes="frame")
        body.border_title = self._title
        yield body
        yield Footer()

    def show(self, snapshot: DashboardSnapshot) -> None:
        """Draw the errors of a snapshot, unless they and the notes are those already shown.

        The app calls this on every refresh (4 Hz); rebuilding up to
        :data:`~trig_stream.stats.ERRORS_KEPT` lines each time cost a core and slowed the run.
        """
        shown = (snapshot.last_errors, snapshot.notes)
        if shown == self._shown:
            return
        self._shown = shown
        text = render.error_lines(snapshot.last_errors)
        if snapshot.notes:
            text.append("\n\nnotes:\n", style="bold")
            text.append("\n".join(snapshot.notes))
        self.query_one("#body", TextLines).update(text)


class HelpScreen(TextScreen):
    """The keys, the panels and the DTM legend.

    Args:
        read_only: the source cannot steer its run (``trig-stream watch``): only the keys
            that work there are listed.
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("question_mark", "close", "Close", show=False),
        Binding("e", "app.errors", "Errors"),
    ]

    def __init__(self, *, read_only: bool = False) -> None:
        super().__init__("help")
        self.read_only = read_only

    def on_mount(self) -> None:
        body = self.query_one("#body", Static)
        legend = "\n".join(
            f"  {render.RELATION_CELLS[code][0]:<6}{name}" for code, name in render.RELATION_LEGEND
        )
        keys = READ_ONLY_HELP_KEYS if self.read_only else HELP_KEYS
        body.update(f"{keys}\n{HELP_PANELS}\n[b]DTM cells[/b]\n{legend}")


class TrigDashboardApp(App[None]):
    """The dashboard of one run as an app.

    Args:
        source: where snapshots come from (:class:`~trig_stream.tui.sources.EngineSource`,
            :class:`~trig_stream.tui.watch_source.RunDirSource`, or a static one).
        refresh_every_s: how often the dashboard asks the source for a snapshot.
        linger: keep showing a finished run until ``q``; else exit when it finishes.
    """

    TITLE = "trig-stream"
    ENABLE_COMMAND_PALETTE = False
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("p", "toggle_pause", "Pause/resume"),
        Binding("s", "stop", "Stop"),
        Binding("q", "quit_run", "Quit"),
        Binding("e", "errors", "Errors"),
        Binding("m", "next_model", "Model"),
        Binding("question_mark", "help", "Help", key_display="?"),
        Binding("ctrl+c", "interrupt", "Stop", show=False, priority=True),
    ]

    def __init__(
        self,
        source: SnapshotSource,
        *,
        refresh_every_s: float = REFRESH_EVERY_S,
        linger: bool = True,
    ) -> None:
        super().__init__()
        self.source = source
        self.refresh_every_s = refresh_every_s
        self.linger = linger
        self.interrupts = 0
        self.source_error: TrigStreamError | None = None
        """What ended the app when its source failed (the watched run directory is gone):
        the caller reports it."""
        self._stop_asked = False
        self._shown_steering: tuple[bool, bool] = (False, False)

    def compose(self) -> ComposeResult:
        yield Dashboard(self.source, refresh_every_s=self.refresh_every_s, linger=self.linger)
        yield Footer()

    @property
    def dashboard(self) -> Dashboard:
        """The dashboard widget."""
        return self.query_one(Dashboard)

    def _finished(self) -> bool:
        snapshot = self.dashboard.snapshot
        return snapshot is not None and snapshot.finished

    def _stopping(self) -> bool:
        """Whether the run is being stopped or is over: there is nothing to pause or resume.

        The engine keeps its pause flag through a stop, so without this a ``p`` after
        ``p``, ``s`` resumed nothing and said "resumed"."""
        snapshot = self.dashboard.snapshot
        return self._stop_asked or (
            snapshot is not None and (snapshot.finished or snapshot.state in STOPPING_STATES)
        )

    def on_dashboard_updated(self, message: Dashboard.Updated) -> None:
        if isinstance(self.screen, ErrorsScreen):
            self.screen.show(message.snapshot)
        snapshot = message.snapshot
        if snapshot.finished and (not self.linger or snapshot.state not in CLEAN_END_STATES):
            self.exit()
        steering = (snapshot.finished, self._stopping())
        if steering != self._shown_steering:
            # Pause is greyed out once the run stops, stop once it is over; redraw the footer
            # only then.
            self._shown_steering = steering
            self.refresh_bindings()

    def on_dashboard_failed(self, message: Dashboard.Failed) -> None:
        self.source_error = message.error
        self.exit()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # Greyed out (None) when there is nothing to steer.
        if action == "toggle_pause":
            return None if self.source.control is None or self._stopping() else True
        if action == "stop":
            return None if self.source.control is None or self._finished() else True
        return True

    def action_toggle_pause(self) -> None:
        control = self.source.control
        if control is None or self._finished():
            return
        if self._stopping():
            self.notify("stopping: there is nothing to pause or resume", severity="warning")
            return
        # The run's state now, not the last snapshot's: a second p before the next refresh
        # read "running" there and paused again.
        if control.paused:
            control.resume()
            self.notify("resumed")
        else:
            control.pause()
            if not control.paused:  # stopping already: there is nothing to pause
                return
            self.notify("paused: no new samples; work already queued goes on")
        self.call_later(self.dashboard.refresh_snapshot)

    def action_stop(self) -> None:
        if self.source.control is not None and not self._finished():
            self.source.control.stop()
            self._stop_asked = True
            self.refresh_bindings()
            self.notify("stopping: finishing the work in flight (q or ctrl+c to stop now)")
            self.call_later(self.dashboard.refresh_snapshot)

    def action_quit_run(self) -> None:
        if self.source.control is not None and not self._finished():
            self.source.control.cancel()
            self._stop_asked = True
        self.exit()

    def action_interrupt(self) -> None:
        """ctrl+c (or SIGINT / SIGTERM): stop gracefully, and hard the second time."""
        self.interrupts += 1
        if self.source.control is None or self._finished():
            self.exit()
        elif self.interrupts == 1:
            self.action_stop()
        else:
            self.action_quit_run()

    def _close_text_view(self) -> None:
        """Close the errors or help view open, so that the other replaces it."""
        if isinstance(self.screen, TextScreen):
            self.pop_screen()

    def action_errors(self) -> None:
        self._close_text_view()
        screen = ErrorsScreen()
        self.push_screen(screen)
        if self.dashboard.snapshot is not None:
            snapshot = self.dashboard.snapshot
            self.call_after_refresh(screen.show, snapshot)

    def action_next_model(self) -> None:
        self.dashboard.next_model()

    def action_help(self) -> None:
        self._close_text_view()
        # Without a control (watch), p and s do nothing and q only closes the viewer.
        self.push_screen(HelpScreen(read_only=self.source.control is None))
