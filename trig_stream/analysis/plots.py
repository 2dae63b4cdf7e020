"""PNG plots of a relation analysis (needs the ``plots`` extra: matplotlib).

matplotlib is imported only inside these functions, and only through its object API
(:class:`matplotlib.figure.Figure` rendered by the Agg canvas): no pyplot, no global state, so
plots can be drawn from worker threads. Four plots, as TRIG draws them:

* ``dtm.png``: the DTM heatmap, codes above the diagonal, means on and below it;
* ``scatter.png``: one scatter per pair, zones shaded, least-squares line drawn;
* ``dimension_map.png``: a t-SNE map of the dimensions, distance ``1 - |corr|``;
* ``tradeoff_graph.png``: dimensions on a circle, an edge per related pair.
"""

from __future__ import annotations

import importlib.util
import io
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Final, TypeAlias

import numpy as np

from trig_stream.analysis.relations import ModelAnalysis, PairStats
from trig_stream.analysis.stats import MIN_TRADEOFF_POINTS, FittedLine, fitted_line, zones
from trig_stream.analysis.tsne import tsne
from trig_stream.dimensions import Dimension
from trig_stream.errors import MissingExtraError
from trig_stream.files import write_atomic, write_atomic_together

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

CODE_COLOURS: Final[dict[int, str]] = {
    0: "#2e7d32",  # synergy
    3: "#c62828",  # bottleneck
    1: "#ef6c00",  # trade-off
    2: "#1565c0",  # dominance
    -2: "#6a1b9a",  # dominance, the other way
    -1: "#bdbdbd",  # undefined / no data
}
CODE_NAMES: Final[dict[int, str]] = {
    0: "synergy",
    3: "bottleneck",
    1: "trade-off",
    2: "dominance (row)",
    -2: "dominance (column)",
    -1: "undefined",
}
TITLE_COLOURS: Final[dict[int, str]] = {-1: "#616161"}
"""Text colours where the cell colour is too pale to read as text."""
DPI: Final = 100


def matplotlib_available() -> bool:
    """True when matplotlib can be imported."""
    return importlib.util.find_spec("matplotlib") is not None


Target: TypeAlias = Path | BinaryIO
"""Where a plot goes: a file (written whole or not at all), or a binary stream."""


def _save(fig: Figure, target: Target) -> None:
    """Write ``fig`` as PNG to ``target``; a file is rendered first, then written whole:
    a full disk leaves the plot that was there, never a truncated one."""
    if isinstance(target, Path):
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", bbox_inches="tight")
        write_atomic(target, buffer.getvalue())
    else:
        fig.savefig(target, format="png", bbox_inches="tight")


def _figure(width: float, height: float) -> Figure:
    if not matplotlib_available():
        raise MissingExtraError("matplotlib", "plots")
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def plot_dtm(analysis: ModelAnalysis, path: Target) -> Target:
    """Draw the DTM: coloured codes above the diagonal, means (shaded) on and below it."""
    from matplotlib.patches import Rectangle

    dims = analysis.dtm.dimensions
    size = len(dims)
    fig = _figure(9, 8)
    ax = fig.add_subplot()
    for i, row in enumerate(dims):
        for j, column in enumerate(dims):
            code = analysis.dtm.codes[i][j]
            if j > i and code is not None:
                colour, text = CODE_COLOURS[code], str(code)
            else:
                colour, text = _mean_cell(analysis, row, column)
            ax.add_patch(Rectangle((j, i), 1, 1, facecolor=colour, edgecolor="white"))
            ax.text(j + 0.5, i + 0.5, text, ha="center", va="center", fontsize=8)
    ax.set_xlim(0, size)
    ax.set_ylim(size, 0)
    ax.set_xticks([k + 0.5 for k in range(size)], dims, rotation=45)
    ax.set_yticks([k + 0.5 for k in range(size)], dims)
    ax.set_aspect("equal")
    handles = [Rectangle((0, 0), 1, 1, color=CODE_COLOURS[c]) for c in CODE_NAMES]
    ax.legend(
        handles,
        [f"{c}: {n}" for c, n in CODE_NAMES.items()],
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize=8,
    )
    ax.set_title(f"DTM of {analysis.model} ({analysis.thresholds.correlation})")
    _save(fig, path)
    return path


def _mean_cell(analysis: ModelAnalysis, row: Dimension, column: Dimension) -> tuple[str, str]:
    from matplotlib import colormaps

    shade = colormaps["Blues"]
    if row == column:
        mean = analysis.dimension_means.get(row, math.nan)
        return (
            ("#eeeeee", "–") if math.isnan(mean) else (_hex(shade(0.2 + 0.6 * mean)), f"{mean:.3f}")
        )
    stats = analysis.present(column, row)  # the pair the code above the diagonal used
    if stats is None:
        return "#f5f5f5", "NULL"
    means = {stats.first: stats.mean_first, stats.second: stats.mean_second}
    level = float(np.nanmean([means[row], means[column]]))
    return _hex(shade(0.1 + 0.5 * level)), f"{means[row]:.2f}\n{means[column]:.2f}"


def _hex(rgba: tuple[float, float, float, float]) -> str:
    return "#" + "".join(f"{round(min(max(c, 0.0), 1.0) * 255):02x}" for c in rgba[:3])


TRADEOFF_LINE: Final = "trade-off zone fit"
ALL_POINTS_LINE: Final = "all points fit"


def scatter_lines(analysis: ModelAnalysis, stats: PairStats) -> dict[str, FittedLine]:
    """The least-squares lines a pair's scatter shows, by legend label.

    The trade-off zone's line (solid) is the one rule 3 splits the points around (the
    insight's "N of M above the fitted line"); labelled "decides dominance" when the zone
    holds enough points for the rule to apply, and then drawn whatever the X: where every X
    is the same, it is the horizontal line at the zone's mean Y
    (:func:`~trig_stream.analysis.stats.fitted_line`). Any other line needs two points with
    different X. The line over all points (dashed) is shown too when it is another line.
    """
    points = analysis.points[stats.pair]
    t = analysis.thresholds
    lines: dict[str, FittedLine] = {}
    mask = zones(points.x, points.y, t.synergy, t.bottleneck).tradeoff_mask
    zone_x, zone_y = points.x[mask], points.y[mask]
    if zone_x.shape[0] >= MIN_TRADEOFF_POINTS:
        lines[f"{TRADEOFF_LINE} (decides dominance)"] = fitted_line(zone_x, zone_y)
    elif zone_x.shape[0] >= 2 and float(np.ptp(zone_x)) > 0.0:
        lines[TRADEOFF_LINE] = fitted_line(zone_x, zone_y)
    if stats.n >= 2 and float(np.ptp(points.x)) > 0.0 and not bool(mask.all()):
        lines[ALL_POINTS_LINE] = fitted_line(points.x, points.y)
    return lines


def plot_scatter_grid(analysis: ModelAnalysis, path: Target) -> Target:
    """One scatter per pair with the synergy and bottleneck zones shaded and the LS lines
    (:func:`scatter_lines`)."""
    pairs = analysis.pairs
    columns = max(1, math.ceil(math.sqrt(len(pairs))))
    rows = max(1, math.ceil(len(pairs) / columns))
    fig = _figure(2.6 * columns, 2.6 * rows)
    t = analysis.thresholds
    for index, stats in enumerate(pairs):
        ax: Axes = fig.add_subplot(rows, columns, index + 1)
        points = analysis.points[stats.pair]
        low = min(0.0, float(points.x.min(initial=0.0)), float(points.y.min(initial=0.0))) - 0.05
        high = max(1.0, float(points.x.max(initial=1.0)), float(points.y.max(initial=1.0))) + 0.05
        ax.fill_between([t.synergy, high], t.synergy, high, color=CODE_COLOURS[0], alpha=0.15)
        ax.fill_between([low, t.bottleneck], low, t.bottleneck, color=CODE_COLOURS[3], alpha=0.15)
        ax.scatter(points.x, points.y, s=6, alpha=0.5, color="#37474f", linewidths=0)
        lines = scatter_lines(analysis, stats)
        for label, line in lines.items():
            ends = np.array([low, high])
            decides = label.startswith(TRADEOFF_LINE)
            ax.plot(
                ends,
                line.at(ends),
                color="black" if decides else "#90a4ae",
                linestyle="-" if decides else "--",
                linewidth=1,
                label=label,
            )
        if lines:
            ax.legend(fontsize=5, loc="upper left")
        ax.set_xlim(low, high)
        ax.set_ylim(low, high)
        ax.set_xlabel(stats.first, fontsize=8)
        ax.set_ylabel(stats.second, fontsize=8)
        ax.tick_params(labelsize=6)
        ax.set_title(
            f"{stats.pair}  code {stats.code}  N={stats.n}",
            fontsize=8,
            color=TITLE_COLOURS.get(stats.code, CODE_COLOURS[stats.code]),
        )
    fig.suptitle(f"{analysis.model}: scores per pair")
    _save(fig, path)
    return path


def dimension_distances(analysis: ModelAnalysis) -> tuple[list[Dimension], np.ndarray]:
    """The dimensions with data and their distances ``1 - |corr|`` (1 when unknown)."""
    dims = list(analysis.dimension_means)
    distances = np.ones((len(dims), len(dims)))
    np.fill_diagonal(distances, 0.0)
    for i, a in enumerate(dims):
        for j, b in enumerate(dims[i + 1 :], start=i + 1):
            stats = analysis.present(a, b)
            if stats is not None and not math.isnan(stats.correlation):
                distances[i, j] = distances[j, i] = 1.0 - abs(stats.correlation)
    return dims, distances


def plot_dimension_map(analysis: ModelAnalysis, path: Target, *, seed: int = 0) -> Target:
    """A 2-D t-SNE embedding of the dimensions (see :func:`tsne`); close = correlated."""
    dims, distances = dimension_distances(analysis)
    coords = tsne(distances, seed=seed)
    fig = _figure(6, 6)
    ax = fig.add_subplot()
    ax.scatter(coords[:, 0], coords[:, 1], s=60, color="#1565c0")
    for (x, y), dim in zip(coords, dims, strict=True):
        ax.annotate(dim, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=9)
    ax.set_title(f"{analysis.model}: t-SNE of dimensions (distance 1 − |corr|)")
    ax.set_xticks([])
    ax.set_yticks([])
    _save(fig, path)
    return path


def plot_tradeoff_graph(analysis: ModelAnalysis, path: Target) -> Target:
    """Dimensions on a circle; one edge per pair with data, coloured by relation code.

    A dominance edge is an arrow towards the dimension whose scores more often lie on its
    side of the trade-off zone's fitted line.
    """
    dims = list(analysis.dtm.dimensions)
    angles = np.linspace(0.0, 2.0 * math.pi, len(dims), endpoint=False)
    where = {d: (math.cos(a), math.sin(a)) for d, a in zip(dims, angles, strict=True)}
    fig = _figure(7, 7)
    ax = fig.add_subplot()
    for i, a in enumerate(dims):
        for b in dims[i + 1 :]:
            code = analysis.dtm.code(a, b)
            if code is None or analysis.present(a, b) is None:
                continue
            start, end = (where[a], where[b]) if code != 2 else (where[b], where[a])
            style = "-|>" if code in (2, -2) else "-"
            colour = CODE_COLOURS[2] if code in (2, -2) else CODE_COLOURS[code]
            ax.annotate(
                "",
                xy=end,
                xytext=start,
                arrowprops={
                    "arrowstyle": style,
                    "color": colour,
                    "lw": 1.6,
                    "shrinkA": 12,
                    "shrinkB": 12,
                },
            )
    for dim, (x, y) in where.items():
        ax.scatter([x], [y], s=500, color="white", edgecolors="#37474f", zorder=3)
        ax.text(x, y, dim, ha="center", va="center", fontsize=8, zorder=4)
    from matplotlib.lines import Line2D

    handles = [Line2D([0], [0], color=CODE_COLOURS[c], lw=2) for c in (0, 3, 1, 2, -1)]
    ax.legend(
        handles,
        ["synergy", "bottleneck", "trade-off", "dominance →", "undefined"],
        loc="lower right",
        fontsize=8,
    )
    ax.set_xlim(-1.3, 1.3)
    ax.set_ylim(-1.3, 1.3)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(f"{analysis.model}: trade-off graph")
    _save(fig, path)
    return path


PLOT_FILES = ("dtm.png", "scatter.png", "dimension_map.png", "tradeoff_graph.png")
"""The files :func:`write_plots` draws."""


def write_plots(
    analysis: ModelAnalysis, folder: Path, *, before_each: Callable[[], None] = lambda: None
) -> list[Path]:
    """Draw all four plots into ``folder`` (created when missing), calling ``before_each``
    before each (it may raise to stop the drawing: each takes a second or more). They are
    written together once all are drawn (:func:`~trig_stream.files.write_atomic_together`):
    a stop or a full disk leaves the plots that were there.

    Raises:
        MissingExtraError: matplotlib is not installed.
    """
    files = [(folder / name, data) for name, data in render_plots(analysis, before_each)]
    write_atomic_together(files)
    return [path for path, _ in files]


def render_plots(
    analysis: ModelAnalysis, before_each: Callable[[], None] = lambda: None
) -> list[tuple[str, bytes]]:
    """Draw all four plots in memory: each file's name (:data:`PLOT_FILES`) and PNG
    content, calling ``before_each`` before each as :func:`write_plots` does.

    Raises:
        MissingExtraError: matplotlib is not installed.
    """
    if not matplotlib_available():
        raise MissingExtraError("matplotlib", "plots")
    drawings = (plot_dtm, plot_scatter_grid, plot_dimension_map, plot_tradeoff_graph)
    rendered = []
    for draw, name in zip(drawings, PLOT_FILES, strict=True):
        before_each()
        buffer = io.BytesIO()
        draw(analysis, buffer)
        rendered.append((name, buffer.getvalue()))
    return rendered
