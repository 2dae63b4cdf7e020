"""The dashboard widget: every panel of a run, drawn from a :class:`DashboardSnapshot`.

:class:`Dashboard` can be mounted in any Textual app. Given a source it refreshes itself
(``refresh_every_s``, 4 Hz by default); without one, the host calls :meth:`Dashboard.show`.
It renders snapshots only and never touches an engine, so the same widget follows a live
run, a run directory another process writes, or fixed data in a test.
"""

from __future__ import annotations

from collections.abc import Callable

from rich.console import RenderableType
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.reactive import reactive
from textual.widget import Widget
from textual.widgets import Sparkline

from trig_stream.analysis.relations import default_metric
from trig_stream.errors import TrigStreamError
from trig_stream.stats import ERRORS_KEPT
from trig_stream.tui import render
from trig_stream.tui.snapshot import DashboardSnapshot, RelationView, SnapshotSource

REFRESH_EVERY_S = 0.25
"""How often a self-refreshing dashboard asks its source for a snapshot (4 Hz)."""


ROW_HEIGHTS = (8, 8, 15)
"""The progress, buffers and relations rows' heights (borders included) when the terminal
has room: the progress and buffers rows grow to their content (a model, a buffer a line)."""
ROW_MINIMUMS = (5, 6, 5)
"""The heights the rows shrink to, the tallest first, when the terminal is short."""
ERRORS_LINES = (1, 3)
"""The lines of the errors panel: the fewest, and those kept before it shrinks to the fewest
(the other rows shrink first: at 80x24 the panel was off screen)."""


def row_heights(height: int, progress: int, load: int) -> tuple[int, int, int]:
    """The heights of the progress, buffers and relations rows in a dashboard ``height`` rows
    high, whose progress and buffers rows want ``progress`` and ``load`` lines of content.

    The errors panel takes what is left, at least :data:`ERRORS_LINES`'s wish when the other
    rows can shrink to make room. The progress and buffers rows first give back the lines they
    grew by (the taller first), down to :data:`ROW_HEIGHTS`: with ten models at 120x40 the
    relations row gave up lines first and the DTM lost its last rows and its legend. Below
    :data:`ROW_HEIGHTS` the tallest row gives up a line first.
    """
    wanted = [
        max(ROW_HEIGHTS[0], progress + 2),
        max(ROW_HEIGHTS[1], load + 2),
        ROW_HEIGHTS[2],
    ]
    fewest, wished = ERRORS_LINES
    room = height - 1 - (wished + 2)  # the status line, the errors panel and its border
    rows = list(wanted)
    while sum(rows) > room:
        grown = [i for i in range(2) if rows[i] > ROW_HEIGHTS[i]]
        if grown:
            rows[max(grown, key=lambda i: rows[i])] -= 1
            continue
        shrinkable = [i for i in range(3) if rows[i] > ROW_MINIMUMS[i]]
        if not shrinkable:
            if room < height - 1 - (fewest + 2):
                room += 1  # the errors panel gives up its lines last
                continue
            break
        rows[max(shrinkable, key=lambda i: rows[i])] -= 1
    return rows[0], rows[1], rows[2]


INFO_MIN_WIDTH = 24
"""The run panel's least width, beside the progress panel."""
PANEL_FRAME = 4
"""Columns a panel's border and padding take."""


class Panel(Widget):
    """A bordered panel with a title, showing one Rich renderable.

    :meth:`show` repaints only when the content changed, and never asks for a new layout
    (as ``Static.update`` does): the panels keep their size, so a refresh costs one paint.
    A line wider than the panel is cut at its edge, never wrapped: most panels are grids
    (the DTM, the bars), and a wrapped row ran into the next (textual wraps a widget's
    content whatever the ``Text`` says). The run panel's free text wraps.
    """

    DEFAULT_CSS = """
    Panel {
        border: round $primary-darken-1;
        border-title-color: $text;
        border-title-style: bold;
        padding: 0 1;
        height: 1fr;
        width: 1fr;
        text-wrap: nowrap;
        text-overflow: clip;
    }
    """

    def __init__(self, title: str = "", *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.border_title = title
        self._content: RenderableType = ""
        self._key: object = None

    def show(self, key: object, make: Callable[[], RenderableType]) -> None:
        """Show ``make()`` unless ``key`` (what the content is drawn from) is unchanged."""
        if key == self._key and self._key is not None:
            return
        self._key = key
        self._content = make()
        self.refresh()

    def render(self) -> RenderableType:
        return self._content


class Throughput(Vertical):
    """Judgements/s and images/s over time (sparklines) with stage latencies."""

    DEFAULT_CSS = """
    Throughput {
        border: round $primary-darken-1;
        border-title-style: bold;
        padding: 0 1;
        height: 1fr;
        width: 1fr;
    }
    Throughput Sparkline { height: 1; margin-bottom: 1; }
    Throughput Panel { height: 1; border: none; padding: 0; }
    """

    def compose(self) -> ComposeResult:
        yield Panel(id="judge-rate")
        yield Sparkline([], id="judge-spark")
        yield Panel(id="image-rate")
        yield Sparkline([], id="image-spark")

    def on_mount(self) -> None:
        self.border_title = "throughput (last minute)"

    def show(self, snapshot: DashboardSnapshot) -> None:
        """Draw the rates and their history."""
        judge = (snapshot.judgements_per_s, snapshot.judge_p50, snapshot.judge_p95)
        images = (snapshot.images_per_s, snapshot.generation_p50, snapshot.generation_p95)
        self.query_one("#judge-rate", Panel).show(judge, lambda: render.rates_line("judge", *judge))
        self.query_one("#image-rate", Panel).show(
            images, lambda: render.rates_line("images", *images)
        )
        for name, history in (
            ("#judge-spark", snapshot.judgements_history),
            ("#image-spark", snapshot.images_history),
        ):
            spark = self.query_one(name, Sparkline)
            if tuple(spark.data or ()) != history:
                spark.data = list(history)


def ordered_views(snapshot: DashboardSnapshot) -> list[RelationView]:
    """The relation views in the order the dashboard steps through them: by model, and within
    a model the metric a report analyses by default first (see
    :func:`~trig_stream.analysis.relations.default_metric`), then the others in the config's
    order. Alphabetical, a metric judge such as ``nsfw`` came before the VLM judge."""
    rank = {judge.name: index for index, judge in enumerate(snapshot.judges)}
    by_model: dict[str, list[RelationView]] = {}
    for view in snapshot.relations:
        by_model.setdefault(view.model, []).append(view)
    ordered: list[RelationView] = []
    for model in sorted(by_model):
        views = by_model[model]
        views.sort(key=lambda v: (rank.get(v.metric, len(rank)), v.metric))
        first = default_metric([v.metric for v in views], {v.metric: v.counts for v in views})
        ordered += [v for v in views if v.metric == first]
        ordered += [v for v in views if v.metric != first]
    return ordered


class Dashboard(Widget):
    """Every panel of a run: status, progress, buffers, throughput, judges, means, DTM, errors.

    Args:
        source: where snapshots come from; None when the host calls :meth:`show` itself.
        refresh_every_s: how often to ask ``source`` for a snapshot.
        linger: whether the status line invites to close once the run is over.
    """

    DEFAULT_CSS = """
    Dashboard { layout: vertical; height: 1fr; }
    Dashboard #status {
        height: 1; border: none; padding: 0; background: $primary-background;
    }
    /* The rows' heights are set to fit the terminal and their content: see row_heights. */
    Dashboard #row-progress { height: 8; }
    Dashboard #row-load { height: 8; }
    Dashboard #row-relations { height: 15; }
    /* The progress panel's width is set to its table's: see _show_progress. */
    Dashboard #progress { width: auto; }
    Dashboard #info { width: 1fr; min-width: 24; text-wrap: wrap; }
    Dashboard #means { width: 44; }
    Dashboard #dtm { width: 1fr; }
    Dashboard #errors { height: 1fr; min-height: 3; }
    """

    selected: reactive[tuple[str, str | None] | None] = reactive(None)
    """The (model, metric) shown in the means and DTM panels (None before the first); metric
    None until `m` picks one: that model's first view in order, the metric a report analyses.
    A key, not a position: views added as scores arrive (another model's, a metric judge's)
    move the positions, and the panels switched to another model with no key pressed. Nor
    the first metric drawn: a metric judge that answered before the VLM judge kept them."""

    class Updated(Message):
        """Posted after each new snapshot is drawn."""

        def __init__(self, snapshot: DashboardSnapshot) -> None:
            super().__init__()
            self.snapshot = snapshot

    class Failed(Message):
        """Posted once when the source cannot describe the run any more (its run directory
        was deleted, say); the dashboard stops asking it."""

        def __init__(self, error: TrigStreamError) -> None:
            super().__init__()
            self.error = error

    def __init__(
        self,
        source: SnapshotSource | None = None,
        *,
        refresh_every_s: float = REFRESH_EVERY_S,
        linger: bool = True,
        id: str | None = None,
    ) -> None:
        super().__init__(id=id)
        self.source = source
        self.refresh_every_s = refresh_every_s
        self.linger = linger
        self.snapshot: DashboardSnapshot | None = None
        self.error: TrigStreamError | None = None
        """Why the source stopped giving snapshots, once it did."""
        self._busy = False
        self._heights: tuple[int, int, int] = ROW_HEIGHTS
        self._progress_width: tuple[int, int] | None = None
        """The progress panel's width and the terminal's it was set for."""

    def compose(self) -> ComposeResult:
        yield Panel(id="status")
        with Horizontal(id="row-progress"):
            yield Panel("progress per model", id="progress")
            yield Panel("run", id="info")
        with Horizontal(id="row-load"):
            yield Panel("buffers between stages", id="buffers")
            yield Throughput(id="throughput")
            yield Panel("judges: in flight / limit", id="judges")
        with Horizontal(id="row-relations"):
            yield Panel("dimension means", id="means")
            yield Panel("DTM", id="dtm")
        yield Panel(f"last errors (e: the latest {ERRORS_KEPT})", id="errors")

    async def on_mount(self) -> None:
        if self.source is not None:
            await self.refresh_snapshot()
            self.set_interval(self.refresh_every_s, self.refresh_snapshot)

    async def refresh_snapshot(self) -> None:
        """Ask the source for a snapshot and draw it (skipped while the last is pending)."""
        if self.source is None or self._busy or self.error is not None:
            return
        self._busy = True
        try:
            snapshot = await self.source.snapshot()
        except TrigStreamError as exc:
            self.error = exc
            self.post_message(self.Failed(exc))
            return
        finally:
            self._busy = False
        self.show(snapshot)

    def show(self, snapshot: DashboardSnapshot) -> None:
        """Draw a snapshot (panels whose part of it did not change are not repainted)."""
        self.snapshot = snapshot
        self._draw(snapshot)
        self.post_message(self.Updated(snapshot))

    def on_resize(self) -> None:
        if self.snapshot is not None:
            self._draw(self.snapshot)

    def _fit_rows(self, snapshot: DashboardSnapshot) -> tuple[int, int, int]:
        """Size the rows to the terminal and the snapshot; the lines the progress, buffers and
        errors panels have room for."""
        judge_lines = 2 * len(snapshot.judges)
        heights = row_heights(
            self.size.height,
            progress=1 + len(snapshot.models),
            load=max(len(snapshot.buffers), judge_lines),
        )
        if heights != self._heights:
            self._heights = heights
            for row_id, height in zip(
                ("#row-progress", "#row-load", "#row-relations"), heights, strict=True
            ):
                self.query_one(row_id).styles.height = height
        # The errors panel takes what the status line and the rows leave, its border aside.
        errors_lines = max(self.size.height - 1 - sum(heights) - 2, ERRORS_LINES[0])
        return heights[0] - 2, heights[1] - 2, errors_lines

    def _draw(self, snapshot: DashboardSnapshot) -> None:
        progress_lines, load_lines, errors_lines = self._fit_rows(snapshot)
        linger = self.linger
        self.query_one("#status", Panel).show(
            (snapshot, linger), lambda: render.status_line(snapshot, linger=linger)
        )
        self._show_progress(snapshot, progress_lines)
        self.query_one("#info", Panel).show(
            (snapshot.run_dir, snapshot.models, snapshot.judges, snapshot.message),
            lambda: render.run_info(snapshot),
        )
        self.query_one("#buffers", Panel).show(
            (snapshot.buffers, load_lines), lambda: render.gauges(snapshot, limit=load_lines)
        )
        self.query_one(Throughput).show(snapshot)
        self.query_one("#judges", Panel).show(
            (snapshot.judges, load_lines), lambda: render.judge_loads(snapshot, limit=load_lines)
        )
        self._show_relations()
        # Up to ERRORS_KEPT errors are kept, a few lines shown: only those are laid out (all
        # of them made every refresh cost more the more errors there were).
        shown = snapshot.last_errors[-errors_lines:]
        self.query_one("#errors", Panel).show(
            shown, lambda: render.error_lines(shown, limit=errors_lines)
        )

    def _show_progress(self, snapshot: DashboardSnapshot, lines: int) -> None:
        """The progress table, as wide as its header needs, within what the run panel leaves:
        narrower, it cuts its model names and shortens its headers; when its figures still
        do not fit, it takes the run panel's columns, and only past the whole width are its
        lines cut (marked ``›``). At 120 columns, 70% of the width cut the "skipped" and
        "errors" columns of long names."""
        total = self.size.width
        room = max(total - INFO_MIN_WIDTH, 0)
        least = render.progress_least_width(snapshot.models, lines) + PANEL_FRAME
        if least > room:  # the figures before the run panel's width
            room = min(least, total)
        table = render.progress_table(snapshot.models, lines, width=room - PANEL_FRAME)
        want = min(max(map(len, table.plain.splitlines())) + PANEL_FRAME, room)
        panel = self.query_one("#progress", Panel)
        if (want, total) != self._progress_width:
            self._progress_width = (want, total)
            panel.styles.width = want
            info = self.query_one("#info", Panel)
            info.styles.min_width = max(min(INFO_MIN_WIDTH, total - want), 0)
        panel.show((snapshot.models, lines, room), lambda: table)

    def next_model(self) -> None:
        """Show the next (model, metric) in the means and DTM panels (after the last, the
        first)."""
        views, index = self._selection()
        if views:
            following = views[(index + 1) % len(views)]
            self.selected = (following.model, following.metric)

    def watch_selected(self) -> None:
        if self.snapshot is not None:
            self._show_relations()

    def selected_view(self) -> RelationView | None:
        """The relation view the means and DTM panels show."""
        views, index = self._selection()
        return views[index] if views else None

    def _selection(self) -> tuple[list[RelationView], int]:
        """The relation views in their order, and the position of the one shown: the
        selected (model, metric), or the selected model's first when no metric was picked,
        else (none shown yet, or it is gone: the journal read again from its start) the
        first."""
        views = ordered_views(self.snapshot) if self.snapshot is not None else []
        model, metric = self.selected or (None, None)
        shown = (
            i
            for i, view in enumerate(views)
            if view.model == model and metric in (None, view.metric)
        )
        return views, next(shown, 0)

    def _show_relations(self) -> None:
        views, index = self._selection()
        view = views[index] if views else None
        total = len(views)
        suffix = "" if view is None else f": {view.model} ({view.metric})"
        hint = f" [{index + 1}/{total}, m: next]" if total > 1 else ""
        key = (view, index)
        if view is not None:  # the model shown (its metric, once picked) stays, until `m`
            picked = self.selected == (view.model, view.metric)
            self.set_reactive(Dashboard.selected, (view.model, view.metric if picked else None))
        means = self.query_one("#means", Panel)
        means.border_title = f"dimension means{suffix}"
        means.show(key, lambda: render.means_table(view))
        dtm = self.query_one("#dtm", Panel)
        dtm.border_title = f"DTM{suffix}{hint}"
        dtm.show(key, lambda: render.dtm_grid(view))
