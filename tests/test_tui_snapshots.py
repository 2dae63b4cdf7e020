"""Snapshot tests of the dashboard's screens at 120x40 and 80x24, from fixed synthetic data."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import pytest
from rich.text import Text

from trig_stream.analysis.relations import DTM, negate_dominance
from trig_stream.analysis.stats import RelationCode
from trig_stream.dimensions import SORTED_DIMENSIONS, Dimension
from trig_stream.tui.app import TrigDashboardApp
from trig_stream.tui.dashboard import Panel, ordered_views
from trig_stream.tui.render import CUT_MARK, SHORT_HEADERS, progress_table
from trig_stream.tui.snapshot import (
    DashboardSnapshot,
    Gauge,
    JudgeView,
    ModelProgress,
    RelationView,
    StaticSource,
)

SIZE = (120, 40)
SnapCompare = Callable[..., bool]

_CODES: tuple[RelationCode, ...] = (0, 1, 2, -2, 3, -1)


def synthetic_dtm(shift: int) -> DTM:
    """A DTM using every relation code, mirrored as the real one is."""
    size = len(SORTED_DIMENSIONS)
    grid: list[list[RelationCode | None]] = [[None] * size for _ in range(size)]
    for i in range(size):
        for j in range(i + 1, size):
            code = _CODES[(i * 3 + j + shift) % len(_CODES)]
            grid[i][j] = code
            grid[j][i] = negate_dominance(code)
    return DTM(SORTED_DIMENSIONS, tuple(tuple(row) for row in grid))


def synthetic_snapshot() -> DashboardSnapshot:
    """A run midway: two models, one judge on two endpoints, full image buffer, errors."""
    means = {d: round(0.35 + 0.05 * i, 3) for i, d in enumerate(SORTED_DIMENSIONS)}
    counts = {d: 40 + i for i, d in enumerate(SORTED_DIMENSIONS)}
    return DashboardSnapshot(
        kind="static",
        run_name="demo",
        task="t2i",
        run_dir="runs/demo",
        state="running",
        elapsed_s=125.5,
        samples_total=300,
        samples_done=120,
        eta_s=190.0,
        models=(
            ModelProgress("flux-dev", 120, 4, 90, 6, 2, 0, 160, 3, 5),
            ModelProgress("sd3-medium", 118, 8, 80, 10, 0, 12, 140, 1, 0),
        ),
        buffers=(
            Gauge("samples:flux-dev", 4, 8),
            Gauge("samples:sd3-medium", 8, 8),
            Gauge("images", 32, 32),
            Gauge("judgements", 12, 256),
            Gauge("results", 0, 256),
        ),
        judges=(
            JudgeView(
                "trigscore",
                "openai",
                ("http://127.0.0.1:8000/v1", "http://127.0.0.1:8001/v1"),
                24,
                32,
                None,
            ),
        ),
        judgements_per_s=12.5,
        images_per_s=3.2,
        judgements_history=tuple(float(v % 7 + 8) for v in range(60)),
        images_history=tuple(float(v % 4 + 1) for v in range(60)),
        generation_p50=0.21,
        generation_p95=0.48,
        judge_p50=0.74,
        judge_p95=1.9,
        relations=(
            RelationView("flux-dev", "trigscore", means, counts, synthetic_dtm(0)),
            RelationView("sd3-medium", "trigscore", means, counts, synthetic_dtm(2)),
        ),
        last_errors=(
            "flux-dev IQ-R_TA-C_3 IQ-R: fake judge: 400 Bad Request",
            "flux-dev D-K_IQ-R_7 D-K: generation failed: CUDA out of memory",
            "sd3-medium R-T_IQ-A_2 R-T: retries exhausted: 503 Service Unavailable",
        ),
        notes=("flux-dev: 3 files were not used",),
        quarantined=2,
    )


def app() -> TrigDashboardApp:
    return TrigDashboardApp(StaticSource(synthetic_snapshot()))


def test_dashboard(snap_compare: SnapCompare) -> None:
    assert snap_compare(app(), terminal_size=SIZE)


def test_dashboard_next_model(snap_compare: SnapCompare) -> None:
    assert snap_compare(app(), terminal_size=SIZE, press=["m"])


def test_errors_view(snap_compare: SnapCompare) -> None:
    assert snap_compare(app(), terminal_size=SIZE, press=["e"])


class IdleControl:
    """A run control that steers nothing: the dashboard of a run it could steer."""

    paused = False

    def pause(self) -> None:
        pass

    def resume(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def cancel(self) -> None:
        pass


def test_help(snap_compare: SnapCompare) -> None:
    steerable = TrigDashboardApp(StaticSource(synthetic_snapshot(), control=IdleControl()))
    assert snap_compare(steerable, terminal_size=SIZE, press=["question_mark"])


def test_help_of_watch(snap_compare: SnapCompare) -> None:
    # A source that cannot steer its run (`trig-stream watch`): only the keys that work.
    watched = StaticSource(replace(synthetic_snapshot(), kind="watch"))
    assert snap_compare(TrigDashboardApp(watched), terminal_size=SIZE, press=["question_mark"])


@pytest.mark.parametrize("state", ["done", "paused"])
def test_status_line_follows_the_state(snap_compare: SnapCompare, state: str) -> None:
    from dataclasses import replace

    snapshot = replace(
        synthetic_snapshot(), state=state, samples_done=300 if state == "done" else 120
    )
    assert snap_compare(TrigDashboardApp(StaticSource(snapshot)), terminal_size=SIZE)


def test_status_line_says_which_models_are_loading() -> None:
    from dataclasses import replace

    from trig_stream.tui.render import status_line

    loading = replace(synthetic_snapshot(), loading=("flux", "sd35"))
    assert "loading flux, sd35" in status_line(loading, linger=False).plain
    assert "loading" not in status_line(synthetic_snapshot(), linger=False).plain
    done = replace(loading, state="done")
    assert "loading" not in status_line(done, linger=False).plain


def test_status_line_says_how_many_images_a_stop_left_to_judge() -> None:
    # A graceful stop left images on disk unjudged: the dashboard showed them "judging"
    # forever and nothing said that a resume judges them.
    from trig_stream.tui.render import progress_table, status_line, total_progress

    snapshot = synthetic_snapshot()
    stopped = replace(
        snapshot,
        state="stopped",
        models=(replace(snapshot.models[0], judging=0, left=26), snapshot.models[1]),
    )
    line = status_line(stopped, linger=True).plain
    assert "[stopped]  26 images on disk left to judge on resume" in line
    assert "left" not in status_line(snapshot, linger=False).plain
    assert total_progress(stopped.models).left is None  # sd3-medium's is not known
    assert progress_table(stopped.models).plain.splitlines()[1].split()[1:5] == [
        "120",
        "4",
        "0",
        "90",
    ]


def test_the_dashboard_shows_first_the_metric_a_report_analyses() -> None:
    # Views were sorted by name: a metric judge such as nsfw (R-T only) came before the VLM
    # judge, unlike the report. Now each model's default metric comes first, then the
    # config's order.
    snapshot = synthetic_snapshot()
    partial: dict[Dimension, int] = {"R-T": 40}
    relations = tuple(
        RelationView(model, metric, snapshot.relations[0].means, counts, synthetic_dtm(0))
        for model in ("sd3-medium", "flux-dev")
        for metric, counts in (
            ("aesthetic", snapshot.relations[0].counts),
            ("nsfw", partial),
            ("trigscore", snapshot.relations[0].counts),
        )
    )
    judges = tuple(JudgeView(name, "fake") for name in ("nsfw", "trigscore", "aesthetic"))
    ordered = ordered_views(replace(snapshot, judges=judges, relations=relations))
    assert [(v.model, v.metric) for v in ordered] == [
        ("flux-dev", "trigscore"),
        ("flux-dev", "nsfw"),
        ("flux-dev", "aesthetic"),
        ("sd3-medium", "trigscore"),
        ("sd3-medium", "nsfw"),
        ("sd3-medium", "aesthetic"),
    ]


SMALL = (80, 24)


@pytest.fixture
def anyio_backend() -> str:
    """Textual runs on asyncio only."""
    return "asyncio"


def panel_lines(app: TrigDashboardApp, panel_id: str) -> list[str]:
    panel = app.query_one(panel_id, Panel)
    return [
        "".join(segment.text for segment in panel.render_line(y)).rstrip()
        for y in range(panel.size.height)
    ]


@pytest.mark.anyio
async def test_a_small_terminal_cuts_the_grids_rather_than_wrap_them() -> None:
    # At 80x24 the DTM's rows wrapped after four columns into a misaligned grid, and the
    # buffers' and judges' bars went to lines of their own, pushing buffers out of sight.
    dashboard = app()
    async with dashboard.run_test(size=SMALL) as pilot:
        await pilot.pause()
        dtm = panel_lines(dashboard, "#dtm")
        buffers = panel_lines(dashboard, "#buffers")
        judges = panel_lines(dashboard, "#judges")
    # The rows shrink to leave the last errors room (the DTM shows its first dimensions);
    # the shared buffers come first.
    rows = [row.split()[0] for row in dtm[1:] if row.strip()]
    assert rows and rows == list(SORTED_DIMENSIONS[: len(rows)])
    assert [line.split()[0] for line in buffers if line.strip()] == [
        "images",
        "judgements",
        "results",
        "…",
    ]
    assert judges[0].startswith("trigscore") and "█" in judges[0]


def test_dashboard_on_a_small_terminal(snap_compare: SnapCompare) -> None:
    assert snap_compare(app(), terminal_size=SMALL)


def test_models_buffers_and_judges_whose_names_share_a_start_stay_apart() -> None:
    # Names of 11 characters or more were cut at the end to 9 and "…": the shipped example's
    # synthetic-a and synthetic-b both read "synthetic…", in the buffers "samples:synthet…".
    from trig_stream.tui.render import gauges, judge_loads, progress_table

    long = ("stabilityai-sd-3.5-large-turbo-a", "stabilityai-sd-3.5-large-turbo-b")
    for names in (("synthetic-a", "synthetic-b"), long):
        snapshot = replace(
            synthetic_snapshot(),
            models=tuple(ModelProgress(name, 1, 0, 0, 0, 0, 0, 0, 0, 0) for name in names),
            buffers=tuple(Gauge(f"samples:{name}", 1, 8) for name in names),
            judges=tuple(JudgeView(f"judge-{name}", "fake", (), 1, 2) for name in names),
        )
        for table in (progress_table(snapshot.models), gauges(snapshot), judge_loads(snapshot)):
            rows = [line.split()[0] for line in table.plain.splitlines() if line[0] != " "]
            rows = rows[1:] if rows[0] == "model" else rows
            assert len(rows) == 2 and rows[0] != rows[1], table.plain
            assert [row[-1] for row in rows] == ["a", "b"]
    table = progress_table(
        tuple(ModelProgress(name, 1, 0, 0, 0, 0, 0, 0, 0, 0) for name in ("synthetic-a", "x"))
    )
    assert table.plain.splitlines()[1].startswith("synthetic-a ")


@pytest.mark.anyio
async def test_the_run_panel_keeps_a_width_on_a_small_terminal() -> None:
    # The progress panel was 84 columns wide whatever the terminal: below ~100 columns the
    # run panel (directory, models, judges, watch's warnings) got no width at all.
    dashboard = app()
    async with dashboard.run_test(size=SMALL) as pilot:
        await pilot.pause()
        info = panel_lines(dashboard, "#info")
        progress = panel_lines(dashboard, "#progress")
    assert info[0].startswith("dir    runs/demo")
    assert progress[1].startswith("flux-dev")
    wide = app()
    async with wide.run_test(size=SIZE) as pilot:
        await pilot.pause()
        progress = panel_lines(wide, "#progress")
    assert progress[0].endswith("skipped")  # the whole table, as before


def trig_sized(names: Sequence[str]) -> DashboardSnapshot:
    """The synthetic run with TRIG-sized figures (100k samples) for models ``names``."""
    return replace(
        synthetic_snapshot(),
        models=tuple(
            ModelProgress(
                name,
                queued=100000,
                generating=4,
                images=50000,
                judging=8,
                generation_failed=2,
                skipped=0,
                ok=100000,
                unscorable=120,
                error=30,
            )
            for name in names
        ),
    )


@pytest.mark.anyio
@pytest.mark.parametrize("width", [80, 70])
async def test_trig_sized_figures_stay_whole_on_a_small_terminal(width: int) -> None:
    # Names stopped shrinking at 7 characters: at 80 columns the table was 55 wide in 52,
    # the skip column cut, the README's "never a figure" untrue.
    names = ("stabilityai-sd-3.5-large", "flux-dev-guidance")
    dashboard = TrigDashboardApp(StaticSource(trig_sized(names)))
    async with dashboard.run_test(size=(width, 24)) as pilot:
        await pilot.pause()
        progress = on_screen(dashboard, "#progress")
        info = panel_lines(dashboard, "#info")
    assert progress[0].split()[1:] == list(SHORT_HEADERS), progress
    rows = [line.split() for line in progress[1:3]]
    assert [row[1:] for row in rows] == [
        ["100000", "4", "8", "50000", "100000", "120", "30", "(2g)", "0"]
    ] * 2, progress
    assert rows[0][0] != rows[1][0]  # the names, cut, still tell the models apart
    assert not any(CUT_MARK in line for line in progress)
    assert any(line.strip() for line in info)  # the run panel keeps what is left


def test_a_table_too_narrow_for_its_figures_marks_its_cut_lines() -> None:
    table = progress_table(trig_sized(["flux-dev"]).models, width=30).plain.splitlines()
    assert all(len(line) <= 30 and line.endswith(CUT_MARK) for line in table), table
    whole = progress_table(trig_sized(["flux-dev"]).models, width=60).plain
    assert CUT_MARK not in whole


def many_models(count: int) -> DashboardSnapshot:
    """The synthetic run with ``count`` models, each with its own samples buffer."""
    snapshot = synthetic_snapshot()
    names = [f"gen-{index:02d}" for index in range(count)]
    return replace(
        snapshot,
        models=tuple(ModelProgress(name, 3, 1, 2, 1, 4, 1, 1, 0, 0) for name in names),
        buffers=tuple(Gauge(f"samples:{name}", 1, 8) for name in names) + snapshot.buffers[2:],
    )


def on_screen(app: TrigDashboardApp, panel_id: str) -> list[str]:
    """The lines of a panel that the terminal shows (its rows below the screen's are not)."""
    panel = app.query_one(panel_id, Panel)
    visible = app.screen.region.height - 1 - panel.region.y  # the footer takes the last row
    return panel_lines(app, panel_id)[: max(visible, 0)]


@pytest.mark.anyio
async def test_a_tall_terminal_shows_every_model_and_buffer() -> None:
    # The progress and buffers rows were 8 rows high whatever the terminal: with 10 models
    # at 200x60 the progress panel listed gen-00 to gen-04, the buffers panel samples:gen-00
    # to samples:gen-05, and the shared buffers (where backpressure shows) not at all.
    dashboard = TrigDashboardApp(StaticSource(many_models(10)))
    async with dashboard.run_test(size=(200, 60)) as pilot:
        await pilot.pause()
        progress = on_screen(dashboard, "#progress")
        buffers = on_screen(dashboard, "#buffers")
        errors = on_screen(dashboard, "#errors")
    models = [f"gen-{index:02d}" for index in range(10)]
    assert [line.split()[0] for line in progress[1:] if line.strip()] == models
    assert [line.split()[0] for line in buffers if line.strip()] == [
        "images",
        "judgements",
        "results",
        *(f"samples:{model}" for model in models),
    ]
    assert errors[0].startswith("sd3-medium R-T_IQ-A_2")


@pytest.mark.anyio
async def test_rows_cut_on_a_short_terminal_say_how_many_more() -> None:
    dashboard = TrigDashboardApp(StaticSource(many_models(10)))
    async with dashboard.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        progress = on_screen(dashboard, "#progress")
        buffers = on_screen(dashboard, "#buffers")
    shown = [line for line in progress[1:] if line.startswith("gen-")]
    assert 0 < len(shown) < 10
    assert f"… {10 - len(shown)} more models" in progress
    total = next(line for line in progress if line.startswith("total"))
    assert total.split()[1:5] == ["30", "10", "10", "20"]  # queued generating judging images
    assert [line.split()[0] for line in buffers[:3]] == ["images", "judgements", "results"]
    listed = sum(line.startswith("samples:") for line in buffers)
    assert 0 < listed < 10 and f"… {10 - listed} more" in buffers


@pytest.mark.anyio
@pytest.mark.parametrize("size", [SMALL, (100, 30)])
async def test_the_last_errors_stay_on_screen_on_a_small_terminal(size: tuple[int, int]) -> None:
    # Below ~34 rows the last errors panel was under the screen's bottom: the other rows kept
    # their heights. They now shrink first, leaving the errors three lines.
    dashboard = app()
    async with dashboard.run_test(size=size) as pilot:
        await pilot.pause()
        errors = on_screen(dashboard, "#errors")
    assert [line.split()[0] for line in errors[:3]] == ["sd3-medium", "flux-dev", "flux-dev"]


@pytest.mark.anyio
async def test_ten_models_at_120x40_leave_the_whole_dtm_and_its_legend() -> None:
    # The grown progress and buffers rows kept their lines while the relations row gave up
    # its own: with ten models at 120x40 the rows were 11/11/11 and the DTM stopped at TA-C
    # (TA-R, TA-S and the legend gone), the means at TA-C too. The grown rows now give back
    # their extra lines first.
    dashboard = TrigDashboardApp(StaticSource(many_models(10)))
    async with dashboard.run_test(size=SIZE) as pilot:
        await pilot.pause()
        dtm = on_screen(dashboard, "#dtm")
        means = on_screen(dashboard, "#means")
    rows = [line.split()[0] for line in dtm[1:] if line.strip()]
    assert rows[: len(SORTED_DIMENSIONS)] == list(SORTED_DIMENSIONS)
    assert any("synergy" in line for line in dtm) and any("bottleneck" in line for line in dtm)
    dims = [line.split()[0] for line in means[1:] if line.strip()]
    assert dims == list(SORTED_DIMENSIONS)


@pytest.mark.anyio
@pytest.mark.parametrize(("size", "models", "judges"), [(SMALL, 3, 3), ((200, 60), 30, 10)])
async def test_judges_cut_from_their_panel_are_counted(
    size: tuple[int, int], models: int, judges: int
) -> None:
    # The judges panel drew every judge whatever its height: at 80x24 three judges showed as
    # judge-0 and judge-1, the third gone without a word; at 200x60 with ten judges the
    # last one and judge-8's queue line were cut.
    snapshot = replace(
        many_models(models),
        judges=tuple(JudgeView(f"judge-{index}", "openai", (), 1, 4) for index in range(judges)),
    )
    dashboard = TrigDashboardApp(StaticSource(snapshot))
    async with dashboard.run_test(size=size) as pilot:
        await pilot.pause()
        lines = [line for line in on_screen(dashboard, "#judges") if line.strip()]
    shown = [line.split()[0] for line in lines if line.startswith("judge-")]
    queues = [line for line in lines if line.startswith("  server queue")]
    assert shown == [f"judge-{index}" for index in range(len(shown))]
    assert len(queues) == len(shown) and 0 < len(shown) < judges
    hidden = judges - len(shown)
    assert lines[-1] == f"… {hidden} more judge{'s' * (hidden != 1)}"


def test_judge_loads_keeps_to_its_limit() -> None:
    from trig_stream.tui.render import judge_loads

    judges = tuple(JudgeView(f"judge-{index}", "fake", (), 1, 2) for index in range(3))
    snapshot = replace(synthetic_snapshot(), judges=judges)
    assert len(judge_loads(snapshot, limit=6).plain.splitlines()) == 6
    assert "more" not in judge_loads(snapshot, limit=6).plain
    for limit, first in ((5, 2), (4, 1), (2, 0), (1, 0)):
        lines = judge_loads(snapshot, limit=limit).plain.splitlines()
        assert len(lines) <= limit
        assert [line.split()[0] for line in lines if line.startswith("judge-")] == [
            f"judge-{index}" for index in range(first)
        ]
        assert lines[-1] == f"… {3 - first} more judge{'s' * (3 - first != 1)}"


@pytest.mark.anyio
async def test_the_errors_panel_lays_out_only_the_errors_it_shows() -> None:
    # Every refresh built and laid out a Text of all the kept errors (up to 1000) for a panel
    # of a few lines: a refresh cost more the more errors there were.
    errors = tuple(f"gen-00 X_{index} IQ-R: error number {index}" for index in range(1000))
    dashboard = TrigDashboardApp(StaticSource(replace(synthetic_snapshot(), last_errors=errors)))
    async with dashboard.run_test(size=SIZE) as pilot:
        await pilot.pause()
        panel = dashboard.query_one("#errors", Panel)
        content = panel._content
        height = panel.content_region.height
        shown = on_screen(dashboard, "#errors")
    assert isinstance(content, Text)
    lines = content.plain.splitlines()
    assert len(lines) == height  # the panel is full, and no more is laid out
    assert lines == [
        f"gen-00 X_{index} IQ-R: error number {index}" for index in range(999, 999 - len(lines), -1)
    ]
    assert [line.strip() for line in shown[: len(lines)]] == lines


def test_an_overflowing_progress_table_lists_the_models_it_has_room_for() -> None:
    # Once the table overflowed, three lines went to "… N more" and the total whatever the
    # room: at 80x24 (three lines) three models showed as "… 3 more models" and the total,
    # without a single model row.
    from trig_stream.tui.render import progress_table

    models = many_models(3).models
    for limit, listed, total in ((4, 3, False), (3, 1, False), (2, 0, False)):
        lines = progress_table(models, limit).plain.splitlines()
        assert len(lines) <= limit
        assert [line.split()[0] for line in lines[1:] if line.startswith("gen-")] == [
            f"gen-{index:02d}" for index in range(listed)
        ]
        hidden = 3 - listed
        assert (f"… {hidden} more models" in lines) == (hidden > 1)
        assert ("… 1 more model" in lines) == (hidden == 1)
        assert any(line.startswith("total") for line in lines) == total
    table = progress_table(many_models(5).models, 5).plain.splitlines()
    assert table[1:] == [table[1], table[2], "… 3 more models", table[4]]
    assert table[2].startswith("gen-01")
    assert table[4].startswith("total")


@pytest.mark.anyio
async def test_three_models_at_80x24_list_a_model() -> None:
    dashboard = TrigDashboardApp(StaticSource(many_models(3)))
    async with dashboard.run_test(size=SMALL) as pilot:
        await pilot.pause()
        progress = [line for line in on_screen(dashboard, "#progress") if line.strip()]
    assert progress[1].startswith("gen-00") and progress[2] == "… 2 more models"


@pytest.mark.anyio
@pytest.mark.parametrize("size", [SIZE, SMALL])
async def test_the_progress_and_judges_panels_cut_names_never_figures(
    size: tuple[int, int],
) -> None:
    # At 120x40 with names over ~10 characters the "skipped" column was cut, with long ones
    # the "errors" one ("12 (1g)" read "12", a 0-9 cell blank), while the run panel took 36
    # columns; the judges panel cut an adaptive judge's limit ("in flight: unknown" alone).
    snapshot = replace(
        synthetic_snapshot(),
        models=(
            ModelProgress("stabilityai-sd-3.5-large-turbo", 120, 4, 90, 6, 1, 0, 160, 3, 12),
            ModelProgress("synthetic-b", 118, 8, 80, 10, 0, 12, 140, 1, 5),
        ),
        judges=(JudgeView("trigscore-with-a-long-name", "openai", (), limit_range=(1, 64)),),
    )
    dashboard = TrigDashboardApp(StaticSource(snapshot))
    async with dashboard.run_test(size=size) as pilot:
        await pilot.pause()
        progress = on_screen(dashboard, "#progress")
        judges = panel_lines(dashboard, "#judges")
    assert progress[0].split()[-1] == ("skipped" if size == SIZE else "skip")
    assert progress[1].split()[-4:] == ["3", "12", "(1g)", "0"]
    assert progress[2].split()[-3:] == ["1", "5", "12"]
    assert progress[1].startswith("stab") and "…" in progress[1].split()[0]
    assert judges[0].split()[:2] == ["trigs…g-name", "–/1–64"]
