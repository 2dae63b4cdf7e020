"""Pilot tests: the dashboard's keys steer a real engine (synthetic generator, fake judge)."""

from __future__ import annotations

import json
import os
import signal
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any

import anyio
import pytest
from rich.text import Text
from textual.pilot import Pilot
from textual.widgets import Static

from tests.conftest import ConfigFactory
from tests.test_tui_snapshots import synthetic_snapshot
from trig_stream import Engine
from trig_stream.config import RunConfig
from trig_stream.dimensions import Dimension
from trig_stream.journal import JOURNAL
from trig_stream.tui import render
from trig_stream.tui import run as tui_run
from trig_stream.tui.app import ErrorsScreen, HelpScreen, TextLines, TrigDashboardApp
from trig_stream.tui.run import run_dashboard
from trig_stream.tui.snapshot import DashboardSnapshot, StaticSource

pytestmark = pytest.mark.anyio

Steps = Callable[[Pilot[Any], Engine], Awaitable[None]]


@pytest.fixture
def anyio_backend() -> str:
    """Textual runs on asyncio only."""
    return "asyncio"


def journal_keys(config: RunConfig) -> Counter[tuple[str, str, str]]:
    lines = (config.run_dir / JOURNAL).read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return Counter((r["model"], r["data_id"], r["dimension"]) for r in records)


async def wait_until(condition: Callable[[], bool], within_s: float = 20.0) -> None:
    """Poll a real condition (not a fixed delay) until it holds."""
    with anyio.fail_after(within_s):
        while True:
            if condition():
                return
            await anyio.sleep(0.005)


async def drive(engine: Engine, steps: Steps) -> None:
    """Run the dashboard of ``engine`` headless while ``steps`` presses keys."""
    failures: list[BaseException] = []

    async def pilot(pilot: Pilot[Any]) -> None:
        try:
            with anyio.fail_after(30):
                await steps(pilot, engine)
        except Exception as exc:  # reported after the app closed
            failures.append(exc)
            pilot.app.exit()

    await run_dashboard(
        engine, headless=True, size=(120, 40), auto_pilot=pilot, handle_signals=False
    )
    if failures:
        raise failures[0]


async def until_done(pilot: Pilot[Any], engine: Engine) -> None:
    await wait_until(lambda: engine.stats().state == "done")


def slow_config(make_config: ConfigFactory, samples: int, latency_s: float) -> RunConfig:
    return make_config(
        samples=samples,
        engine={"sample_buffer": 1, "image_buffer": 1},
        judges=[
            {
                "name": "trigscore",
                "backend": "fake",
                "concurrency": 2,
                "options": {"latency_s": latency_s},
            }
        ],
    )


async def test_p_pressed_twice_fast_pauses_then_resumes(make_config: ConfigFactory) -> None:
    # The second p came before the dashboard's next snapshot, which still read "running":
    # it paused again, and the run stayed paused.
    config = slow_config(make_config, samples=30, latency_s=0.02)

    async def steps(pilot: Pilot[Any], engine: Engine) -> None:
        await wait_until(lambda: engine.stats().judged >= 2)
        app = pilot.app
        assert isinstance(app, TrigDashboardApp)
        app.action_toggle_pause()  # two presses handled before any refresh, as a terminal's
        app.action_toggle_pause()  # input can deliver them
        assert not engine.paused and engine.stats().state in ("running", "done")
        await until_done(pilot, engine)

    async with Engine(config) as engine:
        await drive(engine, steps)
    assert engine.stats().state == "done"


async def test_pause_then_resume(make_config: ConfigFactory) -> None:
    config = slow_config(make_config, samples=30, latency_s=0.02)

    async def steps(pilot: Pilot[Any], engine: Engine) -> None:
        await wait_until(lambda: engine.stats().judged >= 2)
        await pilot.press("p")
        assert engine.stats().state == "paused"
        queued = engine.stats().models["synth"].queued

        def drained() -> bool:
            stats = engine.stats()
            return all(b.used == 0 for n, b in stats.buffers.items() if n != "results") and all(
                j.in_flight == 0 for j in stats.judges.values()
            )

        await wait_until(drained)
        assert engine.stats().models["synth"].queued <= queued + 1
        app = pilot.app
        assert isinstance(app, TrigDashboardApp)
        await app.dashboard.refresh_snapshot()
        assert app.dashboard.snapshot is not None
        assert app.dashboard.snapshot.state == "paused"
        await pilot.press("p")
        # Running again (or, on a fast machine, already done with the rest).
        assert engine.stats().state in ("running", "done")
        await wait_until(lambda: engine.stats().models["synth"].queued > queued + 1)

    async with Engine(config) as engine:
        await drive(engine, steps)
    assert engine.stats().state == "done"
    counts = journal_keys(config)
    assert len(counts) == 60
    assert set(counts.values()) == {1}


async def test_stop_then_resume_judges_each_key_once(make_config: ConfigFactory) -> None:
    config = slow_config(make_config, samples=40, latency_s=0.01)

    async def steps(pilot: Pilot[Any], engine: Engine) -> None:
        await wait_until(lambda: engine.stats().judged >= 4)
        await pilot.press("s")
        assert engine.stats().state in ("stopping", "stopped")
        # The app closes by itself once the run is over, as headless apps do not linger.
        await wait_until(lambda: engine.stats().state == "stopped")

    async with Engine(config) as engine:
        await drive(engine, steps)
    assert engine.stats().state == "stopped"
    assert 4 <= len(journal_keys(config)) < 80
    async with Engine(config) as again:
        await drive(again, until_done)
    assert again.stats().state == "done"
    counts = journal_keys(config)
    assert len(counts) == 80
    assert set(counts.values()) == {1}


async def test_hard_quit_then_resume_judges_each_key_once(make_config: ConfigFactory) -> None:
    config = slow_config(make_config, samples=40, latency_s=0.01)

    async def steps(pilot: Pilot[Any], engine: Engine) -> None:
        await wait_until(lambda: engine.stats().judged >= 4)
        await pilot.press("q")

    async with Engine(config) as engine:
        await drive(engine, steps)
    assert engine.stats().state == "cancelled"
    assert 4 <= len(journal_keys(config)) < 80
    async with Engine(config) as again:
        await drive(again, until_done)
    counts = journal_keys(config)
    assert len(counts) == 80
    assert set(counts.values()) == {1}


async def test_ctrl_c_stops_gracefully_then_hard(make_config: ConfigFactory) -> None:
    # Requests that take long: the graceful stop waits for those in flight, and is still
    # waiting when the second ctrl+c comes (the buffered images it leaves to the resume).
    config = make_config(
        samples=80,
        engine={"image_buffer": 32},
        judges=[
            {
                "name": "trigscore",
                "backend": "fake",
                "concurrency": 2,
                "options": {"latency_s": 600},
            }
        ],
    )

    async def steps(pilot: Pilot[Any], engine: Engine) -> None:
        await wait_until(lambda: engine.stats().buffers["images"].used >= 16)
        await pilot.press("ctrl+c")
        assert engine.stats().state == "stopping"
        await pilot.press("ctrl+c")

    async with Engine(config) as engine:
        await drive(engine, steps)
    assert engine.stats().state == "cancelled"
    assert len(journal_keys(config)) < 64


async def test_model_errors_and_help_keys() -> None:
    app = TrigDashboardApp(StaticSource(synthetic_snapshot()))
    async with app.run_test(size=(120, 40)) as pilot:
        view = app.dashboard.selected_view()
        assert view is not None and view.model == "flux-dev"
        await pilot.press("m")
        view = app.dashboard.selected_view()
        assert view is not None and view.model == "sd3-medium"
        await pilot.press("m")
        view = app.dashboard.selected_view()
        assert view is not None and view.model == "flux-dev"
        await pilot.press("e")
        assert isinstance(app.screen, ErrorsScreen)
        await pilot.press("escape", "question_mark")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("question_mark")
        assert not isinstance(app.screen, HelpScreen | ErrorsScreen)
        # A read-only source: pause and stop are greyed out, q only closes.
        assert app.check_action("stop", ()) is None
        await pilot.press("s", "p")
        await pilot.press("q")
    assert app.return_code == 0


@pytest.mark.parametrize(
    ("signum", "state"), [(signal.SIGTERM, "stopped"), (signal.SIGHUP, "cancelled")]
)
async def test_a_signal_from_outside_closes_the_app_when_the_run_ends(
    make_config: ConfigFactory,
    monkeypatch: pytest.MonkeyPatch,
    signum: signal.Signals,
    state: str,
) -> None:
    # ctrl+c on the dashboard is a key; a signal comes from a process manager or a closed
    # terminal, and nobody may be there to press `q`: SIGTERM stops gracefully, SIGHUP hard,
    # and either way the app closes when the run has ended, though it lingers otherwise.
    silenced: list[bool] = []
    monkeypatch.setattr(tui_run, "silence_the_terminal", lambda: silenced.append(True))
    config = slow_config(make_config, samples=40, latency_s=0.01)

    async def pilot(pilot: Pilot[Any]) -> None:
        await wait_until(lambda: engine.stats().judged >= 4)
        os.kill(os.getpid(), signum)

    with anyio.fail_after(30):
        async with Engine(config) as engine:
            await run_dashboard(engine, headless=True, linger=True, auto_pilot=pilot)
    assert engine.stats().state == state
    assert len(journal_keys(config)) < 80
    assert silenced == ([True] if signum == signal.SIGHUP else [])


async def test_the_dashboard_puts_the_job_control_handlers_back(
    make_config: ConfigFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Textual's terminal driver installs SIGTSTP and SIGCONT handlers and leaves them: a
    # Ctrl-Z and `fg` while the report was written brought the closed app's alternate screen
    # back, in raw mode, waiting for a key. (The headless driver installs none: done here.)
    run_async = TrigDashboardApp.run_async

    async def as_on_a_terminal(app: TrigDashboardApp, **options: Any) -> None:
        for signum in (signal.SIGTSTP, signal.SIGCONT):
            signal.signal(signum, lambda *_: None)
        await run_async(app, **options)

    monkeypatch.setattr(TrigDashboardApp, "run_async", as_on_a_terminal)
    before = [signal.getsignal(s) for s in (signal.SIGTSTP, signal.SIGCONT)]
    try:
        async with Engine(make_config(samples=4)) as engine:
            await drive(engine, until_done)
        after = [signal.getsignal(s) for s in (signal.SIGTSTP, signal.SIGCONT)]
    finally:
        for signum, handler in zip((signal.SIGTSTP, signal.SIGCONT), before, strict=True):
            signal.signal(signum, handler)
    assert engine.stats().state == "done"
    assert after == before


async def test_the_errors_view_is_rebuilt_only_when_the_errors_change(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The app handed every refresh (4 Hz) to the errors view, which rebuilt its text of up
    # to ERRORS_KEPT lines each time even when nothing changed: a run with the view open
    # went 1.6-1.9x slower.
    built: list[tuple[str, ...]] = []
    error_lines = render.error_lines

    def counting(errors: Sequence[str], limit: int | None = None) -> Text:
        built.append(tuple(errors))
        return error_lines(errors, limit)

    monkeypatch.setattr(render, "error_lines", counting)
    source = StaticSource(synthetic_snapshot())
    app = TrigDashboardApp(source, refresh_every_s=3600)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("e")
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, ErrorsScreen)
        body = screen.query_one("#body", TextLines)
        assert "CUDA out of memory" in body.text.plain
        before = len(built)
        for _ in range(5):
            await app.dashboard.refresh_snapshot()
            await pilot.pause()
        assert len(built) == before
        source.fixed = replace(source.fixed, last_errors=(*source.fixed.last_errors, "new one"))
        await app.dashboard.refresh_snapshot()
        await pilot.pause()
        # Once for the dashboard's panel, once for the view.
        assert len(built) == before + 2
        assert body.line(0).plain == "new one"
        source.fixed = replace(source.fixed, notes=("a new note",))
        await app.dashboard.refresh_snapshot()
        await pilot.pause()
        assert body.text.plain.endswith("notes:\na new note")


async def test_the_model_shown_stays_as_other_models_scores_arrive() -> None:
    # The panels kept a position in the views sorted by model: flux-dev's first scores,
    # sorted ahead, switched them from sd3-medium to flux-dev with no key pressed, and a
    # model picked with m was swapped for another as views were added ahead of it.
    base = synthetic_snapshot()
    sd3_only = tuple(v for v in base.relations if v.model == "sd3-medium")
    source = StaticSource(replace(base, relations=sd3_only))
    app = TrigDashboardApp(source)

    def shown() -> tuple[str, str] | None:
        view = app.dashboard.selected_view()
        return None if view is None else (view.model, view.metric)

    async def refresh(pilot: Pilot[Any], snapshot: DashboardSnapshot) -> None:
        source.fixed = snapshot
        await app.dashboard.refresh_snapshot()  # as its interval does, without waiting for it
        await pilot.pause()
        assert app.dashboard.snapshot is snapshot

    async with app.run_test(size=(120, 40)) as pilot:
        assert shown() == ("sd3-medium", "trigscore")
        await refresh(pilot, base)
        assert shown() == ("sd3-medium", "trigscore")
        await pilot.press("m")  # after the last, the first
        assert shown() == ("flux-dev", "trigscore")
        ahead = replace(base.relations[0], model="aura-flow")
        await refresh(pilot, replace(base, relations=(*base.relations, ahead)))
        assert shown() == ("flux-dev", "trigscore")
        title = str(app.query_one("#dtm").border_title)
        assert title.startswith("DTM: flux-dev (trigscore) [2/3,")
        await pilot.press("m")
        assert shown() == ("sd3-medium", "trigscore")
        await pilot.press("m")
        assert shown() == ("aura-flow", "trigscore")


async def test_the_panels_show_the_metric_a_report_analyses_until_m_picks_one() -> None:
    # The panels pinned whichever (model, metric) they drew first: a metric judge (nsfw, on
    # R-T only) that answered before the VLM judge kept them on nsfw, though the views put
    # trigscore first; a viewer attached later showed trigscore for the same data.
    base = synthetic_snapshot()
    vlm = base.relations[0]
    r_t: dict[Dimension, int] = {d: v for d, v in vlm.counts.items() if d == "R-T"}
    nsfw = replace(vlm, metric="nsfw", means={d: vlm.means[d] for d in r_t}, counts=r_t)
    judges = (base.judges[0], replace(base.judges[0], name="nsfw", backend="metric"))
    source = StaticSource(replace(base, relations=(nsfw,), judges=judges))
    app = TrigDashboardApp(source)

    def shown() -> tuple[str, str] | None:
        view = app.dashboard.selected_view()
        return None if view is None else (view.model, view.metric)

    async def refresh(pilot: Pilot[Any], snapshot: DashboardSnapshot) -> None:
        source.fixed = snapshot
        await app.dashboard.refresh_snapshot()
        await pilot.pause()

    both = replace(base, relations=(nsfw, vlm, base.relations[1]), judges=judges)
    async with app.run_test(size=(120, 40)) as pilot:
        assert shown() == ("flux-dev", "nsfw")
        await refresh(pilot, both)
        assert shown() == ("flux-dev", "trigscore")
        assert str(app.query_one("#dtm").border_title).startswith("DTM: flux-dev (trigscore)")
        await pilot.press("m")  # picked: stays as scores arrive
        assert shown() == ("flux-dev", "nsfw")
        await refresh(pilot, replace(both, relations=(*both.relations, replace(nsfw, model="a"))))
        assert shown() == ("flux-dev", "nsfw")


class RecordingControl:
    """A run control that records what the keys asked for."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self._paused = False

    @property
    def paused(self) -> bool:
        return self._paused

    def pause(self) -> None:
        self.calls.append("pause")
        self._paused = True

    def resume(self) -> None:
        self.calls.append("resume")
        self._paused = False

    def stop(self) -> None:
        self.calls.append("stop")

    def cancel(self) -> None:
        self.calls.append("cancel")


@pytest.mark.parametrize(("view", "key"), [(ErrorsScreen, "e"), (HelpScreen, "question_mark")])
async def test_the_app_keys_work_in_the_errors_and_help_views(
    view: type[ErrorsScreen | HelpScreen], key: str
) -> None:
    # The views are modal screens, which hide the app's bindings: q, p, s and m did nothing
    # there, and the footer showed only "esc Close", though the help says q quits.
    control = RecordingControl()
    app = TrigDashboardApp(StaticSource(synthetic_snapshot(), control=control))
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press(key)
        assert isinstance(app.screen, view)
        shown = {k for k, active in app.screen.active_bindings.items() if active.binding.show}
        assert {"p", "s", "q", "m", "escape"} <= shown
        await pilot.press("m")
        view_now = app.dashboard.selected_view()
        assert view_now is not None and view_now.model == "sd3-medium"
        await pilot.press("p", "s")
        assert control.calls == ["pause", "stop"]
        assert isinstance(app.screen, view)
        await pilot.press("q")
    assert control.calls == ["pause", "stop", "cancel"]
    assert app.return_code == 0


@pytest.mark.parametrize("steerable", [True, False], ids=["run", "watch"])
async def test_the_help_lists_only_the_keys_that_work(steerable: bool) -> None:
    # watch's help (a source that cannot steer its run) described p and s, a q and a ctrl+c
    # that stop the run, and resuming it, though there p and s do nothing and q and ctrl+c
    # only close the viewer.
    control = RecordingControl() if steerable else None
    app = TrigDashboardApp(StaticSource(synthetic_snapshot(), control=control))
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        text = str(app.screen.query_one("#body", Static).render())
    steering = (
        "p       pause / resume",
        "s       stop gracefully",
        "stop a running run now",
        "second: stop now",
        "to resume a stopped run",
    )
    viewing = (
        "q       close this viewer; the run itself is never disturbed",
        "cannot pause or stop",
    )
    for words in steering:
        assert (words in text) == steerable, words
    for words in viewing:
        assert (words in text) != steerable, words
    assert "e       errors view" in text and "[b]" not in text
    assert "DTM cells" in text


async def test_e_and_question_mark_switch_between_the_errors_and_help_views() -> None:
    # In the help view e did nothing (the help says e opens the errors view); ? in the
    # errors view did nothing either. Each now replaces the other, and escape goes back to
    # the dashboard, not to the view it replaced.
    app = TrigDashboardApp(StaticSource(synthetic_snapshot()))
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("question_mark", "e")
        assert isinstance(app.screen, ErrorsScreen)
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen | ErrorsScreen)
        assert len(app.screen_stack) == 1


async def test_p_during_a_graceful_stop_neither_resumes_nor_says_so(
    make_config: ConfigFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The engine keeps its pause flag through a stop: p, s, p resumed nothing (the run went
    # on stopping) and the app said "resumed". Slow judgements keep the stop going while the
    # keys come.
    config = slow_config(make_config, samples=10, latency_s=2.0)
    said: list[str] = []

    async def steps(pilot: Pilot[Any], engine: Engine) -> None:
        await wait_until(lambda: engine.stats().judges["trigscore"].in_flight > 0)
        app = pilot.app
        assert isinstance(app, TrigDashboardApp)
        monkeypatch.setattr(app, "notify", lambda message, **_: said.append(str(message)))
        await pilot.press("p", "s")
        assert engine.stats().state == "stopping"
        assert app.check_action("toggle_pause", ()) is None
        await pilot.press("p")
        app.action_toggle_pause()  # called directly, as a host could
        assert engine.stats().state in ("stopping", "stopped")
        assert engine.paused
        await wait_until(lambda: engine.stats().state == "stopped")

    async with Engine(config) as engine:
        await drive(engine, steps)
    assert engine.stats().state == "stopped"
    assert not any(message.startswith("resumed") for message in said)
    assert said[-1] == "stopping: there is nothing to pause or resume"


async def test_the_errors_view_draws_only_the_errors_in_sight(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # With errors coming in the view changes on every refresh: a Static laid out all
    # ERRORS_KEPT lines each time, and the see-through modal screen redrew the dashboard
    # under it; together half a core.
    errors = tuple(f"gen s{i} IQ-R: synthetic failure {i}" for i in range(1000))
    source = StaticSource(replace(synthetic_snapshot(), last_errors=errors, notes=()))
    app = TrigDashboardApp(source, refresh_every_s=3600)
    drawn: list[int] = []
    line = TextLines.line

    def counting(self: TextLines, index: int) -> Text:
        drawn.append(index)
        return line(self, index)

    monkeypatch.setattr(TextLines, "line", counting)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("e")
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, ErrorsScreen)
        assert screen.styles.background.a == 1  # the dashboard is not drawn under it
        drawn.clear()
        source.fixed = replace(source.fixed, last_errors=(*errors[1:], "the latest"))
        await app.dashboard.refresh_snapshot()
        await pilot.pause()
        body = screen.query_one("#body", TextLines)
        assert body.virtual_size.height == 1000
        assert 0 < len(drawn) <= 40 and body.line(0).plain == "the latest"
