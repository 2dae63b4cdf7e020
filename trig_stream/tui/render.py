"""Rich renderables made from snapshot parts: bars, tables, the DTM grid. No textual here.

Every function is pure: the same snapshot gives the same text, which is what makes the
dashboard's snapshot tests stable. The names and paths a snapshot holds come from files a
hand may have edited (a watched run's ``manifest.json`` and journal): each is drawn through
:func:`~trig_stream.records.one_line`, so a control character shows as ``\\x1b`` and never
commands the terminal, and a newline as ``\\n``: a name on one line never ends it and starts
another, nor pushes the status line's state and ETA out of its one row.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from rich.text import Text

from trig_stream.analysis.stats import RelationCode
from trig_stream.dimensions import DIMENSION_NAMES
from trig_stream.records import one_line
from trig_stream.tui.snapshot import DashboardSnapshot, ModelProgress, RelationView

RELATION_CELLS: dict[RelationCode, tuple[str, str]] = {
    0: ("syn", "bold black on green"),
    1: ("trade", "black on yellow"),
    2: ("dom←", "bold white on blue"),
    -2: ("dom↑", "bold white on magenta"),
    3: ("bneck", "bold white on red"),
    -1: ("·", "grey50"),
}
"""How each relation code is drawn in the DTM: a short name and a colour."""

RELATION_LEGEND: tuple[tuple[RelationCode, str], ...] = (
    (0, "synergy"),
    (1, "trade-off"),
    (2, "dominance of the row"),
    (-2, "dominance of the column"),
    (3, "bottleneck"),
    (-1, "undefined"),
)


def duration(seconds: float | None) -> str:
    """``12.3s``, ``4m05s`` or ``2h03m``; ``unknown`` for None."""
    if seconds is None or math.isnan(seconds):
        return "unknown"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def millis(seconds: float | None) -> str:
    """A latency: ``740 ms``, ``1.9 s``; ``–`` when unknown."""
    if seconds is None:
        return "–"
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.1f} s"


def count(value: int | None) -> str:
    """A count, ``–`` when the source cannot know it."""
    return "–" if value is None else str(value)


def bar(used: int, size: int, width: int) -> Text:
    """A fill bar; red when full, which is where backpressure shows."""
    share = 0.0 if size <= 0 else min(max(used / size, 0.0), 1.0)
    filled = round(share * width)
    style = "red" if share >= 1.0 else "yellow" if share >= 0.75 else "green"
    text = Text("█" * filled, style=style)
    text.append("░" * (width - filled), style="grey37")
    return text


def status_line(snapshot: DashboardSnapshot, *, linger: bool) -> Text:
    """The top line: run, task, state, the source's alerts, elapsed time, samples and ETA."""
    state_style = {
        "running": "bold green",
        "paused": "bold yellow",
        "done": "bold cyan",
    }.get(snapshot.state, "bold red" if snapshot.finished else "bold yellow")
    text = Text.assemble(
        (f" {one_line(snapshot.run_name)} ", "bold"),
        f"task {one_line(snapshot.task)}  ",
        (f"[{snapshot.state}]", state_style),
    )
    # Early in the line: the rest is cut on a narrow terminal, and so is the run panel that
    # says them in full.
    for alert in snapshot.alerts:
        text.append(f"  {one_line(alert)}", style="yellow")
    left = sum(m.left or 0 for m in snapshot.models)
    if left:
        images = f"{left} image{'s' * (left != 1)}"
        text.append(f"  {images} on disk left to judge on resume", style="yellow")
    text.append(f"  elapsed {duration(snapshot.elapsed_s)}")
    total = "?" if snapshot.samples_total is None else str(snapshot.samples_total)
    text.append(f"  samples {count(snapshot.samples_done)}/{total}")
    text.append(f"  judged {snapshot.judged}")
    if snapshot.state == "not running":
        left = max((snapshot.samples_total or 0) - (snapshot.samples_done or 0), 0)
        text.append(
            f"  not running; {left} sample{'s' * (left != 1)} left: `trig-stream run` resumes it"
            + ("; press q to close" if linger else ""),
            style="bold",
        )
    elif snapshot.finished:
        text.append("  finished" + ("; press q to close" if linger else ""), style="bold")
    else:
        text.append(f"  ETA {duration(snapshot.eta_s)}")
    if snapshot.loading and not snapshot.finished:
        loading = one_line(", ".join(snapshot.loading))
        text.append(f"  loading {loading}", style="bold yellow")
    if snapshot.opening is not None and not snapshot.finished:
        text.append(f"  opening {one_line(snapshot.opening)}", style="bold yellow")
    return text


PROGRESS_COLUMNS = (
    ("queued", 7),
    ("generating", 11),
    ("judging", 8),
    ("images", 7),
    ("ok", 7),
    ("unscorable", 11),
    ("errors", 10),
    ("skipped", 8),
)
"""The progress table's columns and their widths when there is room (a wider figure widens
its column)."""
SHORT_HEADERS = ("queue", "gen", "judg", "imgs", "ok", "unsc", "err", "skip")
"""The columns' headers on a terminal too narrow for the full ones; each column then takes
its header's or its widest figure's width and a space."""
MODEL_WIDTH = (11, 24)
"""The model column's width: its longest name and a space, within these bounds."""
MODEL_WIDTH_LEAST = 4
"""The model column's width when the panel is narrow: the names are cut first (``…``), to
three characters (``s…b``), before a figure is."""
CUT_MARK = "›"
"""Ends a progress table line cut short: the panel is too narrow for its figures."""

NAME_WIDTH = 16
"""The longest buffer name the buffers panel shows whole."""
JUDGE_NAME_WIDTH = 12
"""The longest judge name the judges panel shows whole (the run panel names it in full): at
80 columns its limit (``–/1–64``) still shows beside it."""


def fit(name: str, width: int) -> str:
    """``name`` if it has at most ``width`` characters, else cut in the middle (``…``).

    Names of one run often share their start (``synthetic-a``, ``synthetic-b``,
    ``samples:gen-00``): cut at the end they read the same, so the end is kept.
    """
    if len(name) <= width:
        return name
    if width <= 1:
        return "…"[:width]
    head = (width - 1) // 2
    return name[:head] + "…" + name[len(name) - (width - 1 - head) :]


def _total(values: Sequence[int | None]) -> int | None:
    """The sum, or None when a value is unknown."""
    known = [v for v in values if v is not None]
    return sum(known) if len(known) == len(values) else None


def total_progress(models: Sequence[ModelProgress]) -> ModelProgress:
    """Every model's progress added up, as one ``total`` row."""
    return ModelProgress(
        "total",
        queued=_total([m.queued for m in models]),
        generating=_total([m.generating for m in models]),
        images=_total([m.images for m in models]),
        judging=_total([m.judging for m in models]),
        left=_total([m.left for m in models]),
        generation_failed=_total([m.generation_failed for m in models]),
        skipped=_total([m.skipped for m in models]),
        ok=sum(m.ok for m in models),
        unscorable=sum(m.unscorable for m in models),
        error=sum(m.error for m in models),
    )


def progress_table(
    models: Sequence[ModelProgress], limit: int | None = None, width: int | None = None
) -> Text:
    """Per model: samples queued and generating, images judging, judgements by status.

    Args:
        models: the rows.
        limit: the most lines to draw, header included. When the models need more, the
            first ones are drawn, then ``… N more models`` and a ``total`` row of them all;
            with room for two lines under the header, one model and the ``… N more`` line
            (the total row would leave no model at all).
        width: the most columns to draw. The model names are cut first (to
            :data:`MODEL_WIDTH_LEAST`), then the headers get short (:data:`SHORT_HEADERS`);
            narrower than that (:func:`progress_least_width`), each line is cut and ends in
            :data:`CUT_MARK`.
    """
    text = Text(no_wrap=True, overflow="ellipsis")
    drawn, rows, more = _progress_rows(models, limit)
    cells = [_progress_cells(m) for m, _ in drawn]
    shortest, longest = MODEL_WIDTH
    name_width = min(max([shortest - 1, *(len(one_line(m.name)) for m, _ in drawn)]) + 1, longest)
    figures = _figure_widths(cells)
    headers = [column for column, _ in PROGRESS_COLUMNS]
    widths = [max(w, f + 1) for (_, w), f in zip(PROGRESS_COLUMNS, figures, strict=True)]
    if width is not None and name_width + sum(widths) > width:
        if MODEL_WIDTH_LEAST + sum(widths) > width:
            headers = list(SHORT_HEADERS)
            widths = _short_widths(figures)
        name_width = max(min(name_width, width - sum(widths)), MODEL_WIDTH_LEAST)
    header = Text(
        f"{'model'[: name_width - 1]:<{name_width}}"  # "mod" over names cut to 3
        + "".join(f"{c:>{w}}" for c, w in zip(headers, widths, strict=True)),
        style="bold",
    )
    lines = [
        header,
        *(
            _progress_row(m.name, row, name_width, widths, style)
            for (m, style), row in zip(drawn, cells, strict=True)
        ),
    ]
    if more:  # between the models and their total
        hidden = len(models) - len(rows)
        more_line = Text(f"… {hidden} more model{'s' * (hidden != 1)}", style="grey62")
        lines.insert(1 + len(rows), more_line)
    for index, line in enumerate(lines):
        if width is not None and line.cell_len > width:
            # Too narrow for a figure: cut, and say so, rather than show a wrong number.
            line.truncate(max(width - 1, 0), overflow="crop")
            line.append(CUT_MARK, style="bold yellow")
        if index:
            text.append("\n")
        text.append_text(line)
    return text


def progress_least_width(models: Sequence[ModelProgress], limit: int | None = None) -> int:
    """The fewest columns :func:`progress_table` draws ``models`` in without cutting a figure:
    names cut to :data:`MODEL_WIDTH_LEAST`, short headers."""
    drawn, _, _ = _progress_rows(models, limit)
    figures = _figure_widths([_progress_cells(m) for m, _ in drawn])
    return MODEL_WIDTH_LEAST + sum(_short_widths(figures))


def _progress_rows(
    models: Sequence[ModelProgress], limit: int | None
) -> tuple[list[tuple[ModelProgress, str]], list[ModelProgress], bool]:
    """The rows drawn (and their style), the models among them, and whether a ``… N more``
    line goes between them and the total."""
    rows = list(models)
    more = total = False
    if limit is not None and 1 + len(rows) > limit:
        room = max(limit - 1, 0)  # the lines under the header
        # The "more" line, then the total, each when a model row is left beside it (three
        # lines used to go to them whatever the room: at 80x24 no model was listed).
        more = room >= 1
        total = room >= 3
        rows = rows[: room - more - total]
    drawn = [(m, "") for m in rows]
    if total:
        drawn.append((total_progress(models), "bold"))
    return drawn, rows, more


def _figure_widths(cells: list[list[tuple[str, str]]]) -> list[int]:
    return [max([0, *(len(row[i][0]) for row in cells)]) for i in range(len(PROGRESS_COLUMNS))]


def _short_widths(figures: list[int]) -> list[int]:
    return [max(len(h), f) + 1 for h, f in zip(SHORT_HEADERS, figures, strict=True)]


def _progress_cells(m: ModelProgress) -> list[tuple[str, str]]:
    errors = str(m.error) + (f" ({m.generation_failed}g)" if m.generation_failed else "")
    return [
        (count(m.queued), ""),
        (count(m.generating), ""),
        (count(m.judging), ""),
        (count(m.images), ""),
        (str(m.ok), "green"),
        (str(m.unscorable), ""),
        (errors, "red" if m.error or m.generation_failed else ""),
        (count(m.skipped), "grey62"),
    ]


def _progress_row(
    name: str, cells: list[tuple[str, str]], name_width: int, widths: list[int], style: str
) -> Text:
    row = Text(f"{fit(one_line(name), name_width - 1):<{name_width}}", style=style)
    for (value, cell_style), width in zip(cells, widths, strict=True):
        row.append(f"{value:>{width}}", style=cell_style)
    return row


def run_info(snapshot: DashboardSnapshot) -> Text:
    """Run directory, models and judge endpoints."""
    text = Text(no_wrap=True, overflow="ellipsis")
    text.append("dir    ", style="bold")
    text.append(one_line(snapshot.run_dir) + "\n")
    text.append("models ", style="bold")
    text.append(one_line(", ".join(m.name for m in snapshot.models)) or "–")
    for judge in snapshot.judges:
        text.append("\njudge  ", style="bold")
        text.append(one_line(f"{judge.name} ({judge.backend})"))
        if judge.endpoints:
            text.append(" " + one_line(", ".join(judge.endpoints)), style="cyan")
    if snapshot.quarantined:
        text.append(f"\n{snapshot.quarantined} dataset records quarantined", style="yellow")
    if snapshot.message:
        text.append("\n" + one_line(snapshot.message), style="italic grey62")
    return text


def gauges(snapshot: DashboardSnapshot, width: int = 10, limit: int | None = None) -> Text:
    """The buffers between the stages, as fill bars.

    The stages' shared buffers (``images``, ``judgements``, ``results``, where backpressure
    shows) come first, then those per model (``samples:flux-dev``). Given ``limit`` (the most
    lines), the buffers past it are counted in a last ``… N more`` line.
    """
    if not snapshot.buffers:
        return Text("not visible from the run directory", style="grey50")
    # Stable: each group keeps the source's order.
    buffers = sorted(snapshot.buffers, key=lambda gauge: ":" in gauge.name)
    hidden = 0
    if limit is not None and len(buffers) > limit:
        hidden = len(buffers) - max(limit - 1, 0)
        buffers = buffers[: max(limit - 1, 0)]
    text = Text(no_wrap=True)
    for index, gauge in enumerate(buffers):
        # A stage's buffer per model (``samples:flux-dev``): the stage stays whole.
        stage, colon, model = gauge.name.rpartition(":")
        name = one_line(stage + colon) + fit(one_line(model), NAME_WIDTH - len(stage + colon))
        text.append(("\n" if index else "") + f"{name:<{NAME_WIDTH + 1}}")
        text.append_text(bar(gauge.used, gauge.size, width))
        text.append(f" {gauge.used:>3}/{gauge.size}")
    if hidden:
        text.append(("\n" if buffers else "") + f"… {hidden} more", style="grey62")
    return text


def judge_loads(snapshot: DashboardSnapshot, width: int = 10, limit: int | None = None) -> Text:
    """Each judge's requests in flight against its current limit, and the server queue.

    Every judge takes two lines. Given ``limit`` (the most lines), the judges past it are
    counted in a last ``… N more judges`` line.
    """
    if not snapshot.judges:
        return Text("no judges", style="grey50")
    judges = list(snapshot.judges)
    hidden = 0
    if limit is not None and 2 * len(judges) > limit:
        judges = judges[: max(limit - 1, 0) // 2]
        hidden = len(snapshot.judges) - len(judges)
    # The names padded to the longest shown, not to NAME_WIDTH; the figures before the bar
    # and the words: at 120x40 "in flight: unknown –/1–64" lost its limit, at 80x24 the bar
    # its "24/32".
    name_width = min(max([1, *(len(one_line(judge.name)) for judge in judges)]), JUDGE_NAME_WIDTH)
    text = Text(no_wrap=True)
    for index, judge in enumerate(judges):
        name = fit(one_line(judge.name), name_width)
        text.append(("\n" if index else "") + f"{name:<{name_width + 1}}")
        if judge.in_flight is None or judge.limit is None:
            if judge.limit is not None:
                concurrency = str(judge.limit)
            elif judge.limit_range is not None:  # adaptive: where it stands is not known
                concurrency = "{}–{}".format(*judge.limit_range)
            else:
                concurrency = "adaptive" if judge.adaptive else "–"
            text.append(f"–/{concurrency}")
            text.append(" in flight unknown", style="grey50")
        else:
            text.append(f"{judge.in_flight:>3}/{judge.limit} ")
            text.append_text(bar(judge.in_flight, judge.limit, width))
        waiting = "n/a" if judge.waiting is None else str(judge.waiting)
        text.append(f"\n  server queue {waiting}", style="grey62")
    if hidden:
        more = f"… {hidden} more judge{'s' * (hidden != 1)}"
        text.append(("\n" if judges else "") + more, style="grey62")
    return text


def rates_line(label: str, per_s: float | None, p50: float | None, p95: float | None) -> Text:
    """``judgements 12.5/s  p50 40 ms  p95 90 ms``."""
    rate = "–" if per_s is None else f"{per_s:.1f}/s"
    return Text.assemble((f"{label} ", "bold"), rate, f"  p50 {millis(p50)}  p95 {millis(p95)}")


def means_table(view: RelationView | None) -> Text:
    """One model's mean score per dimension, with the number of ok scores and a bar."""
    if view is None:
        return Text("no scores yet", style="grey50")
    text = Text(no_wrap=True)
    text.append(f"{'dim':<5}{'name':<12}{'mean':>6}{'n':>6}", style="bold")
    for dim in sorted(view.means):
        mean = view.means[dim]
        name = DIMENSION_NAMES[dim]
        name = name if len(name) < 12 else name[:10] + "…"
        text.append(f"\n{dim:<5}{name:<12}{mean:>6.3f}{view.counts.get(dim, 0):>6} ")
        text.append_text(bar(round(mean * 100), 100, 8))
    return text


def dtm_grid(view: RelationView | None) -> Text:
    """The DTM as a coloured grid of relation names, with its legend."""
    if view is None:
        return Text("no scores yet", style="grey50")
    dims = view.dtm.dimensions
    text = Text(no_wrap=True)
    text.append(" " * 5 + "".join(f"{d:^6}" for d in dims), style="bold")
    for i, row in enumerate(dims):
        text.append(f"\n{row:<5}", style="bold")
        for code in view.dtm.codes[i]:
            if code is None:
                text.append(f"{'╲':^6}", style="grey37")
            else:
                label, style = RELATION_CELLS[code]
                text.append(f"{label:^5}", style=style)
                text.append(" ")
    for index, (code, name) in enumerate(RELATION_LEGEND):
        label, style = RELATION_CELLS[code]
        text.append("\n" if index in (0, 3) else "  ")
        text.append(f" {label} ", style=style)
        text.append(f" {name}")
    return text


def error_lines(errors: Sequence[str], limit: int | None = None) -> Text:
    """The latest errors first, one a line, with their reasons."""
    if not errors:
        return Text("no errors", style="grey50")
    latest = list(reversed(errors))
    if limit is not None:
        latest = latest[:limit]
    # A reason may hold a newline (a server's error body): one error, one line.
    return Text("\n".join(map(one_line, latest)), style="red", no_wrap=True, overflow="ellipsis")
