"""A resumed run opens a judge that opens slowly (a model to load, a server to start) only when
the dataset holds work left for it."""

from __future__ import annotations

import asyncio
import io
import json
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from tests.conftest import ConfigFactory, write_prompts
from trig_stream import Engine, opening, resources
from trig_stream.backends.base import JudgeReply, JudgeRequest, ServerLoad
from trig_stream.config import RunConfig
from trig_stream.progress import PlainProgress
from trig_stream.terminal import CommandConsole
from trig_stream.testing import FakeJudge
from trig_stream.testing.fake_judge import FakeJudgeOptions
from trig_stream.testing.synthetic import SyntheticGenerator, SyntheticOptions
from trig_stream.tui.render import status_line
from trig_stream.tui.sources import EngineSource

pytestmark = pytest.mark.anyio


class LoadsSlowly(FakeJudge):
    """A fake judge that says it opens slowly, and counts its opens and closes."""

    def __init__(self, options: FakeJudgeOptions | None = None, *, slowly: bool = True) -> None:
        super().__init__("trigscore", options or FakeJudgeOptions())
        self.slowly = slowly
        self.opens = 0
        self.closes = 0

    def opens_slowly(self) -> bool:
        return self.slowly

    async def open(self) -> None:
        self.opens += 1
        await super().open()

    async def aclose(self) -> None:
        self.closes += 1
        await super().aclose()


async def run(config: RunConfig, judge: LoadsSlowly, *, retry_errors: bool = False) -> int:
    """Run ``config`` to its end with ``judge``; the number of judgements it wrote."""
    async with Engine(config, judges=[judge], retry_errors=retry_errors) as engine:
        summary = await engine.drain()
    assert summary.state == "done"
    return summary.judged


async def test_a_finished_run_resumed_opens_no_judge_that_opens_slowly(
    make_config: ConfigFactory,
) -> None:
    # It loaded its model (a VLM, 8-19 s on a CPU) or started its server (vLLM, minutes on
    # a GPU) to judge nothing.
    config = make_config(samples=4)
    assert await run(config, LoadsSlowly()) == 8
    judge = LoadsSlowly()
    assert await run(config, judge) == 0
    assert (judge.opens, judge.closes) == (0, 0)


async def test_a_judge_that_opens_at_once_is_opened_as_before(make_config: ConfigFactory) -> None:
    # Its resume is not delayed by a scan of the dataset's finished samples.
    config = make_config(samples=4)
    await run(config, LoadsSlowly(slowly=False))
    judge = LoadsSlowly(slowly=False)
    assert await run(config, judge) == 0
    assert (judge.opens, judge.closes) == (1, 1)


async def test_a_resumed_run_with_samples_left_opens_its_judge(
    make_config: ConfigFactory, tmp_path: Path
) -> None:
    config = make_config(samples=4)
    await run(config, LoadsSlowly())
    write_prompts(tmp_path / "prompts.json", 6)  # two samples more
    judge = LoadsSlowly()
    assert await run(config, judge) == 4
    assert (judge.opens, judge.closes) == (1, 1)


async def test_records_that_would_be_quarantined_are_no_work_left(
    make_config: ConfigFactory, tmp_path: Path
) -> None:
    config = make_config(samples=4)
    await run(config, LoadsSlowly())
    prompts = tmp_path / "prompts.json"
    records = json.loads(prompts.read_text())
    prompts.write_text(json.dumps([*records, {"prompt": "a record without its data_id"}]))
    judge = LoadsSlowly()
    async with Engine(config, judges=[judge]) as engine:
        summary = await engine.drain()
    assert (summary.state, summary.judged, summary.quarantined) == ("done", 0, 1)
    assert judge.opens == 0


async def test_errors_to_ask_again_are_work_left(make_config: ConfigFactory) -> None:
    config = make_config(samples=8)
    await run(config, LoadsSlowly(FakeJudgeOptions(error_rate=0.5)))
    resumed = LoadsSlowly()
    assert await run(config, resumed) == 0  # errors are judgements made, not work left
    assert resumed.opens == 0
    retried = LoadsSlowly()
    assert await run(config, retried, retry_errors=True) > 0
    assert retried.opens == 1


async def test_a_judge_left_closed_opens_when_the_source_finds_work_after_all(
    make_config: ConfigFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The dataset edited between the look for work left and the run's reading of it: the
    # judge opens before the first sample is queued rather than be asked unopened.
    config = make_config(samples=4)
    await run(config, LoadsSlowly())
    write_prompts(tmp_path / "prompts.json", 6)
    monkeypatch.setattr(opening, "work_left", lambda *args, **kwargs: False)
    judge = LoadsSlowly()
    assert await run(config, judge) == 4
    assert (judge.opens, judge.closes) == (1, 1)


class OpensWhenLet(LoadsSlowly):
    """A judge server that starts only when the test lets it (``release``), and reports its
    load only once started, as an unopened ``openai`` judge reports none. Each request waits
    until the load has been read since the start."""

    def __init__(self) -> None:
        super().__init__()
        self.open_started = anyio.Event()
        self.release = anyio.Event()
        self.opened = False
        self.load_read = anyio.Event()
        self.loads_unopened = 0

    def opening(self) -> str:
        return "starting its server"

    async def open(self) -> None:
        self.open_started.set()
        await self.release.wait()
        await super().open()
        self.opened = True

    async def server_load(self) -> ServerLoad | None:
        if not self.opened:
            self.loads_unopened += 1
            return None
        self.load_read.set()
        return ServerLoad(running=1, waiting=0)

    async def judge(self, request: JudgeRequest) -> JudgeReply:
        await self.load_read.wait()
        return await super().judge(request)


async def run_opening_late(
    config: RunConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finish ``config``'s run, then grow its dataset behind the look for work left: the
    next run opens its judges only as its source stage finds work."""
    await run(config, LoadsSlowly())
    write_prompts(tmp_path / "prompts.json", 6)
    monkeypatch.setattr(opening, "work_left", lambda *args, **kwargs: False)


async def test_a_stop_while_the_judges_open_late_ends_the_run_before_any_work(
    make_config: ConfigFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The late open ignored stop() (the run waited for the whole server start) and
    # stats().opening said nothing meanwhile.
    config = make_config(samples=4)
    await run_opening_late(config, tmp_path, monkeypatch)
    judge = OpensWhenLet()
    with anyio.fail_after(10):  # a safety net: the fix ends the open at once
        async with Engine(config, judges=[judge]) as engine:
            await judge.open_started.wait()
            assert engine.stats().opening == "judge 'trigscore': starting its server"
            engine.stop()
            summary = await engine.drain()
            assert engine.stats().opening is None
    assert (summary.state, summary.judged) == ("stopped", 0)
    assert not judge.opened and judge.closes == 1
    assert engine.run_dir_opened  # a resume: its results stay
    model = engine.stats().models["synth"]
    assert (model.queued, model.dropped, judge.requests) == (0, 0, 0)  # nothing queued


async def test_an_adaptive_judge_opened_late_has_its_server_load_read(
    make_config: ConfigFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The load watcher started before the late open, heard no load from the unopened judge
    # three times and gave up for the whole run.
    adaptive = {"enabled": True, "poll_interval_s": 0.1}
    config = make_config(
        samples=4, judges=[{"name": "trigscore", "backend": "fake", "adaptive": adaptive}]
    )
    await run_opening_late(config, tmp_path, monkeypatch)

    async def no_wait(seconds: float) -> None:
        await anyio.lowlevel.checkpoint()

    judge = OpensWhenLet()
    with anyio.fail_after(10):  # a safety net: the fix reads the load once the judge opens
        async with Engine(config, judges=[judge], sleep=no_wait) as engine:
            await judge.open_started.wait()
            # A watcher polling the unopened judge now would have given up by the time
            # every other task waits.
            await anyio.wait_all_tasks_blocked()
            judge.release.set()
            summary = await engine.drain()
    assert (summary.state, summary.judged) == ("done", 4)
    assert judge.loads_unopened == 0


async def test_a_judge_opening_late_is_named_by_both_displays(
    make_config: ConfigFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Opened once a display had started, a judge loading its model said nothing: the plain
    # line stayed at "[running] 0.0s | samples 0 ..." and the dashboard silent meanwhile.
    config = make_config(samples=4)
    await run_opening_late(config, tmp_path, monkeypatch)
    judge = OpensWhenLet()
    said = "opening judge 'trigscore': starting its server"
    log = io.StringIO()
    with anyio.fail_after(10):  # a safety net: the judge opens as soon as it is let
        async with Engine(config, judges=[judge]) as engine:
            await judge.open_started.wait()
            stats = engine.stats()
            snapshot = await EngineSource(engine).snapshot()
            assert said in status_line(snapshot, linger=False).plain
            # Not on a terminal: a line when the opening starts, not 10 s later.
            with PlainProgress(CommandConsole(file=log, width=400)) as progress:
                progress.update(replace(stats, opening=None))
                progress.update(stats)
            judge.load_read.set()  # no load to read here: its requests need not wait
            judge.release.set()
            summary = await engine.drain()
    assert summary.judged == 4
    lines = log.getvalue().splitlines()
    assert len(lines) == 2 and said not in lines[0]
    assert lines[1].endswith(f"| {said}")


class ChecksUntilLet(SyntheticGenerator):
    """A generator whose check of this machine runs until the test lets it (``release``),
    as diffusers' import does for seconds."""

    def __init__(self) -> None:
        super().__init__("synth", SyntheticOptions(size=16))
        self.checking = threading.Event()
        self.release = threading.Event()
        self.checked = threading.Event()
        self.stopped = threading.Event()

    def check_environment(self) -> None:
        self.checking.set()
        self.release.wait(timeout=30)  # a safety net: the test releases it
        self.checked.set()

    def stop_loading(self) -> None:
        self.stopped.set()


@pytest.mark.parametrize("hard", [False, True], ids=["stop", "cancel"])
async def test_a_stop_while_a_generator_checks_its_environment_ends_the_opening(
    make_config: ConfigFactory, hard: bool
) -> None:
    # The check ran in a worker thread nothing could cancel: a stop, and a second one, waited
    # for diffusers' import (12 s), with nothing said of what the run waited for.
    config = make_config(samples=4)
    generator = ChecksUntilLet()
    engine = Engine(config, generators=[generator])

    async def stop_while_checking() -> None:
        await anyio.to_thread.run_sync(generator.checking.wait, 10)
        assert engine.stats().opening == (
            "generator 'synth': checking its environment (imports its libraries)"
        )
        if hard:
            engine.cancel()
        else:
            engine.stop()

    try:
        with anyio.fail_after(10):  # a safety net: the fix ends the opening at once
            async with anyio.create_task_group() as tg:
                tg.start_soon(stop_while_checking)
                async with engine:
                    summary = await engine.drain()
            assert not generator.checked.is_set()  # not waited for
    finally:
        generator.release.set()
    assert summary.state == ("cancelled" if hard else "stopped")
    assert engine.stats().opening is None
    assert generator.stopped.is_set()  # a check in a child process is killed
    assert not engine.run_dir_opened and not config.run_dir.exists()
    assert await anyio.to_thread.run_sync(generator.checked.wait, 10)


class StopLoadingRaises(ChecksUntilLet):
    """A :class:`ChecksUntilLet` whose ``stop_loading()`` raises ``error`` (a backend's bug,
    a library calling ``sys.exit()``)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__()
        self.error = error

    def stop_loading(self) -> None:
        super().stop_loading()
        raise self.error


@pytest.mark.parametrize(
    ("error", "said"),
    [(RuntimeError("broken"), "RuntimeError: broken"), (SystemExit(3), "SystemExit: 3")],
    ids=["exception", "system-exit"],
)
async def test_a_stop_loading_that_raises_as_a_stop_ends_the_check_is_a_note(
    make_config: ConfigFactory, error: BaseException, said: str
) -> None:
    # A SystemExit left the engine raw, in a BaseExceptionGroup: `run` exited 3 ("run
    # directory in use"), not a word of the generator; a RuntimeError was only logged.
    config = make_config(samples=4)
    generator = StopLoadingRaises(error)
    engine = Engine(config, generators=[generator])

    async def stop_while_checking() -> None:
        await anyio.to_thread.run_sync(generator.checking.wait, 10)
        engine.stop()

    try:
        with anyio.fail_after(10):  # a safety net: the stop ends the opening at once
            async with anyio.create_task_group() as tg:
                tg.start_soon(stop_while_checking)
                async with engine:
                    summary = await engine.drain()
    finally:
        generator.release.set()
    assert summary.state == "stopped" and generator.stopped.is_set()
    assert f"generator 'synth': stop_loading() failed: {said}" in engine.stats().notes
    assert await anyio.to_thread.run_sync(generator.checked.wait, 10)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # trio has no cancel outside its scopes
@pytest.mark.parametrize("resumed", [False, True], ids=["made", "resumed"])
async def test_a_native_asyncio_cancel_while_the_run_directory_opens_leaves_it_closed(
    make_config: ConfigFactory, monkeypatch: pytest.MonkeyPatch, resumed: bool
) -> None:
    # task.cancel() (asyncio.timeout, asyncio.wait_for) gets past anyio's shield: the run
    # left the directory its thread went on to open open, the next engine refused as "in use
    # by another engine in this process", and one it had made was left behind.
    config = make_config(samples=2)
    if resumed:
        async with Engine(config) as engine:
            assert (await engine.drain()).judged == 4
    opening_now, release, opened = threading.Event(), threading.Event(), threading.Event()
    handed: list[opening.OpenedRunDir] = []  # kept from the garbage collector's closing

    def open_when_let(*args: Any, **kwargs: Any) -> opening.OpenedRunDir:
        opening_now.set()
        release.wait(10)
        try:
            handed.append(opening.open_run_dir(*args, **kwargs))
            return handed[-1]
        finally:
            opened.set()

    monkeypatch.setattr(resources, "open_run_dir", open_when_let)

    async def run() -> None:
        async with Engine(config):
            pytest.fail("the run went on past a cancel while it opened")

    task = asyncio.ensure_future(run())
    try:
        assert await anyio.to_thread.run_sync(opening_now.wait, 10)
        task.cancel()
    finally:
        release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await anyio.to_thread.run_sync(opened.wait, 10)
    assert config.run_dir.exists() == resumed  # one it made is removed, as by a stop
    monkeypatch.undo()
    async with Engine(config) as engine:  # the directory is free for the next engine
        summary = await engine.drain()
    assert summary.state == "done" and summary.judged == (0 if resumed else 4)
