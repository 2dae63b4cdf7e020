"""The dashboard's view of an engine run in this process."""

from __future__ import annotations

import json
import time
from pathlib import Path

import anyio
import pytest

from tests.conftest import ConfigFactory, write_prompts
from tests.test_engine import HeldJudge, LoadsUntilReleased
from tests.test_tui_watch import GatedJudge, wait_until
from trig_stream import Engine, snapshots
from trig_stream.progress import describe
from trig_stream.testing import FakeJudge
from trig_stream.testing.fake_judge import FakeJudgeOptions
from trig_stream.testing.synthetic import SyntheticGenerator, SyntheticOptions
from trig_stream.tui.sources import EngineSource

pytestmark = pytest.mark.anyio


async def test_images_waiting_for_a_judgement_are_counted_per_model(
    make_config: ConfigFactory,
) -> None:
    config = make_config(samples=10)
    async with Engine(config) as engine:
        results = [j async for j in engine.results]
        source = EngineSource(engine)
        before = await source.snapshot()
        # Each image has two judgements: seeing one of them counts the image as judged.
        for judgement in results[:7]:
            source.observe(judgement)
        partway = await source.snapshot()
        for judgement in results[7:]:
            source.observe(judgement)
        source.end()
        after = await source.snapshot()
    (model,) = before.models
    assert model.images is None and model.judging is None  # unknown until observed
    judged = {j.data_id for j in results[:7]}
    # "images" counts the images with a judgement, as `watch` does from the journal.
    assert (partway.models[0].images, partway.models[0].judging) == (len(judged), 10 - len(judged))
    assert (after.models[0].images, after.models[0].judging) == (10, 0)


async def test_images_a_stop_leaves_unjudged_are_left_not_judging(
    make_config: ConfigFactory,
) -> None:
    # A graceful stop asks no judge about the images waiting for one: they showed as
    # "judging" forever, and their samples were taken off "queued" (below "images").
    judge = HeldJudge()  # 16 requests at a time: 8 images, two dimensions each
    config = make_config(samples=12, engine={"sample_buffer": 2, "image_buffer": 4})
    async with Engine(config, judges=[judge]) as engine:
        source = EngineSource(engine)
        await wait_until(
            lambda: judge.asked == 16 and engine.stats().models["synth"].generated == 12
        )
        engine.stop()
        judge.release.set()
        async for judgement in engine.results:
            source.observe(judgement)
        source.end()
        snapshot = await source.snapshot()
        summary = engine.summary()
    counts = engine.stats().models["synth"]
    made = counts.generated + counts.reused
    (model,) = snapshot.models
    assert engine.stats().state == "stopped"
    assert counts.queued == made + counts.generation_failed  # every queued sample was made
    assert (made, model.images) == (12, 8)  # 8 images had their requests on the wire
    assert (model.queued, model.generating, model.judging, model.left) == (12, 0, 0, 4)
    assert summary.left_to_judge == 4
    line = describe(engine.stats())  # --headless
    assert "| images left to judge on resume 4" in line
    # The plain line said "images 12" where the dashboard says images 8 (with a judgement).
    assert "| made 12 |" in line and "| images 12" not in line


async def test_a_model_loading_shows_in_the_snapshot(make_config: ConfigFactory) -> None:
    generator = LoadsUntilReleased()
    async with Engine(make_config(samples=2), generators=[generator]) as engine:
        source = EngineSource(engine)
        await anyio.to_thread.run_sync(generator.loading.wait)
        assert (await source.snapshot()).loading == ("synth",)
        generator.release.set()
        async for judgement in engine.results:
            source.observe(judgement)
        source.end()
        assert (await source.snapshot()).loading == ()


async def test_samples_done_counts_judged_samples_not_samples_read(
    make_config: ConfigFactory,
) -> None:
    # The dashboard showed the samples read, which run ahead of judging by the buffers (32
    # of 60 "done" with 12 judged), where watch showed the finished ones.
    judge = HeldJudge()
    async with Engine(make_config(samples=6), judges=[judge]) as engine:
        source = EngineSource(engine)
        await wait_until(lambda: engine.stats().samples_read == 6)
        snapshot = await source.snapshot()
        assert (snapshot.samples_done, engine.stats().judged) == (0, 0)
        judge.release.set()
        async for judgement in engine.results:
            source.observe(judgement)
        source.end()
        assert (await source.snapshot()).samples_done == 6


async def test_a_paused_run_shows_no_eta(make_config: ConfigFactory) -> None:
    # Paused, nothing new starts: the ETA counted down as if the run went on.
    config = make_config(
        samples=30,
        engine={"sample_buffer": 1, "image_buffer": 1},
        judges=[
            {
                "name": "trigscore",
                "backend": "fake",
                "concurrency": 1,  # 60 judgements of 20 ms: time to pause before the end
                "options": {"latency_s": 0.02},
            }
        ],
    )
    async with Engine(config) as engine:
        source = EngineSource(engine)
        await source.snapshot()
        await wait_until(lambda: engine.stats().judged >= 6)
        assert (await source.snapshot()).eta_s is not None  # running, with a rate
        engine.pause()
        assert (await source.snapshot()).eta_s is None
        engine.resume()
        async for judgement in engine.results:
            source.observe(judgement)
        source.end()
        assert (await source.snapshot()).eta_s == 0.0


async def test_a_stopping_run_shows_no_eta(make_config: ConfigFactory) -> None:
    # A graceful stop ends once the work in flight is done: its ETA still counted the rest
    # of the dataset ("[stopping] ... ETA 3m34s" for a run that ended within a second).
    config = make_config(
        samples=30,
        engine={"sample_buffer": 1, "image_buffer": 1},
        judges=[
            {
                "name": "trigscore",
                "backend": "fake",
                "concurrency": 1,
                "options": {"latency_s": 0.02},
            }
        ],
    )
    async with Engine(config) as engine:
        source = EngineSource(engine)
        await source.snapshot()
        await wait_until(lambda: engine.stats().judged >= 6)
        assert (await source.snapshot()).eta_s is not None  # running, with a rate
        engine.stop()
        stopping = await source.snapshot()
        assert (stopping.state, stopping.eta_s) == ("stopping", None)
        async for judgement in engine.results:
            source.observe(judgement)
        source.end()
        assert (await source.snapshot()).eta_s == 0.0


async def test_samples_no_judge_measures_count_as_done(make_config: ConfigFactory) -> None:
    # A judge of IQ-R only: the samples of the pairs without it were never "done", and the
    # finished run showed "samples 4/8" (a watcher of the same run said 8/8).
    judge = FakeJudge("trigscore", FakeJudgeOptions())
    judge.dimensions = frozenset({"IQ-R"})
    async with Engine(make_config(samples=8), judges=[judge]) as engine:
        source = EngineSource(engine)
        async for judgement in engine.results:
            source.observe(judgement)
        source.end()
        snapshot = await source.snapshot()
    assert (snapshot.samples_done, snapshot.samples_total) == (8, 8)
    assert engine.stats().unmeasured == 4


async def test_the_eta_counts_the_rate_of_the_samples_judged_not_of_those_read(
    make_config: ConfigFactory, tmp_path: Path
) -> None:
    # A judge of R-T only: the 200 samples it does not measure are done as they are read, far
    # ahead of the judging. Counted in the rate, they made the ETA ~5x too short.
    measured = json.loads(write_prompts(tmp_path / "a.json", 40, pairs=["R-T_IQ-A"]).read_text())
    others = json.loads(write_prompts(tmp_path / "b.json", 200, pairs=["IQ-R_TA-C"]).read_text())
    (tmp_path / "prompts.json").write_text(json.dumps(measured + others))
    # One sample at a time is queued: the generator, loading, holds the reader at the 40
    # samples the judge measures, short of the others.
    config = make_config(engine={"sample_buffer": 1})
    generator = LoadsUntilReleased()
    judge = GatedJudge(open_for=36)
    judge.dimensions = frozenset({"R-T"})
    clock = Clock()
    async with Engine(config, generators=[generator], judges=[judge]) as engine:
        source = EngineSource(engine, clock=clock)
        await wait_until(generator.loading.is_set)
        assert engine.stats().unmeasured == 0
        assert (await source.snapshot()).samples_done == 0
        generator.release.set()
        await wait_until(lambda: engine.stats().judged == 36 and engine.stats().unmeasured == 200)
        clock.now += 10.0
        snapshot = await source.snapshot()
        judge.gate.set()
        await engine.drain()
    assert (snapshot.samples_done, snapshot.samples_total) == (236, 240)
    assert snapshot.eta_s == pytest.approx(4 / 3.6)  # 4 left, at the 36 judged in 10 s


async def test_the_elapsed_time_and_the_rates_stop_when_the_run_ends(
    make_config: ConfigFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The engine's clock stopped only when its block was left: a finished run left on the
    # dashboard counted the time it was looked at (elapsed 2.6 s, then 7.6 s) and its rates
    # went on, and so did engine.stats() after the block.
    clock = Clock()
    async with Engine(make_config(samples=6)) as engine:
        source = EngineSource(engine, clock=clock)
        async for judgement in engine.results:
            source.observe(judgement)
        source.end()
        ended = engine.stats()
        first = await source.snapshot()
        assert first.elapsed_s == ended.elapsed_s
        monkeypatch.setattr(snapshots, "time", LaterTime(60.0))  # looked at for a minute
        clock.now += 60.0
        later = await source.snapshot()
        assert (later.elapsed_s, later.judgements_per_s) == (
            first.elapsed_s,
            first.judgements_per_s,
        )
        assert later.judgements_history == first.judgements_history
    after = engine.stats()
    assert (after.elapsed_s, after.judgements_per_s) == (ended.elapsed_s, ended.judgements_per_s)
    assert ended.judgements_per_s > 0


class Clock:
    """A monotonic clock that moves when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class LaterTime:
    """The ``time`` module, with its monotonic clock ``ahead_s`` seconds ahead."""

    def __init__(self, ahead_s: float) -> None:
        self.ahead_s = ahead_s

    def monotonic(self) -> float:
        return time.monotonic() + self.ahead_s

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)


async def test_the_errors_view_gets_more_than_the_last_twenty_errors(
    make_config: ConfigFactory,
) -> None:
    # "e: all" showed 20: the engine kept the last 20 errors only.
    config = make_config(
        samples=30,
        judges=[{"name": "trigscore", "backend": "fake", "options": {"error_rate": 1.0}}],
    )
    async with Engine(config) as engine:
        source = EngineSource(engine)
        async for judgement in engine.results:
            source.observe(judgement)
        source.end()
        snapshot = await source.snapshot()
    assert len(snapshot.last_errors) == 60


async def test_the_snapshot_shows_the_backends_the_engine_runs_not_the_configs(
    make_config: ConfigFactory,
) -> None:
    # It listed the config's: its model "synth" at 0 for ever beside the one passed in, and
    # its judge "trigscore" instead of the one that judged.
    config = make_config(samples=3)
    generator = SyntheticGenerator("given", SyntheticOptions(size=16))
    judge = FakeJudge("myjudge", FakeJudgeOptions(), concurrency=3)
    async with Engine(config, generators=[generator], judges=[judge]) as engine:
        assert engine.generators == (generator,) and engine.judges == (judge,)
        source = EngineSource(engine)
        async for judgement in engine.results:
            source.observe(judgement)
        source.end()
        snapshot = await source.snapshot()
    assert [(m.name, m.images, m.ok) for m in snapshot.models] == [("given", 3, 6)]
    assert [(j.name, j.backend, j.limit) for j in snapshot.judges] == [("myjudge", "fake", 3)]


async def test_the_snapshot_shows_the_configs_backends_when_it_built_them(
    make_config: ConfigFactory,
) -> None:
    config = make_config(samples=2, judges=[{"name": "j", "backend": "fake", "concurrency": 5}])
    async with Engine(config) as engine:
        source = EngineSource(engine)
        await engine.drain()
        source.end()
        snapshot = await source.snapshot()
    assert [m.name for m in snapshot.models] == ["synth"]
    assert [(j.name, j.backend, j.limit) for j in snapshot.judges] == [("j", "fake", 5)]
