"""How a run ends: what a cancel, a failure or a stop leaves behind, and what it waits for."""

from __future__ import annotations

import gc
import json
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import polars as pl
import pytest
from anyio.lowlevel import checkpoint
from PIL import Image

from tests.conftest import ConfigFactory
from trig_stream import DatasetError, Engine, FatalBackendError, sourcing
from trig_stream.backends.base import GenerationRequest, JudgeReply, JudgeRequest
from trig_stream.backends.threads import threads_left_behind
from trig_stream.config import RunConfig
from trig_stream.dataset import DatasetSource
from trig_stream.judging import _Requesters
from trig_stream.testing import FakeJudge, SyntheticGenerator
from trig_stream.testing.fake_judge import FakeJudgeOptions
from trig_stream.testing.synthetic import SyntheticOptions

pytestmark = pytest.mark.anyio


async def test_requests_no_task_started_are_abandoned_once_the_tasks_end() -> None:
    # A request's judge slot is taken before it is handed on, and only the request gives it
    # back: one whose task was cancelled before taking it held its slot for good.
    made: list[int] = []
    abandoned: list[int] = []
    first_made = anyio.Event()

    async def make(number: int) -> None:
        made.append(number)
        first_made.set()
        await anyio.sleep_forever()

    with anyio.fail_after(10):  # a safety net: nothing here waits on time
        with anyio.CancelScope() as scope:
            async with _Requesters(make, abandoned.append) as requesters:
                requesters.hand_on(1)
                await first_made.wait()
                requesters.hand_on(2)  # to a new task, cancelled before it runs
                requesters.hand_on(3)
                scope.cancel()
    assert made == [1]
    assert abandoned == [2, 3]


class CancelsTheRun(FakeJudge):
    """A judge whose first request cancels the run while the others wait for their tasks."""

    engine: Engine | None = None

    async def judge(self, request: JudgeRequest) -> JudgeReply:
        assert self.engine is not None
        self.engine.cancel()
        await checkpoint()
        return await super().judge(request)


async def test_a_cancel_leaves_no_judge_slot_taken(make_config: ConfigFactory) -> None:
    # stats() showed a request in flight for ever after the run was cancelled.
    judge = CancelsTheRun("trigscore", FakeJudgeOptions(), concurrency=4)
    engine = judge.engine = Engine(make_config(samples=4), judges=[judge])
    async with engine:
        await engine.drain()
    stats = engine.stats()
    assert stats.state == "cancelled"
    assert stats.judges["trigscore"].in_flight == 0


class FailsAtOnce(FakeJudge):
    async def judge(self, request: JudgeRequest) -> JudgeReply:
        await checkpoint()
        raise FatalBackendError("the judge broke")


async def test_a_failed_run_leaves_no_judge_slot_taken(make_config: ConfigFactory) -> None:
    engine = Engine(
        make_config(samples=8), judges=[FailsAtOnce("trigscore", FakeJudgeOptions(), concurrency=4)]
    )
    with pytest.raises(FatalBackendError, match="the judge broke"):
        async with engine:
            await engine.drain()
    stats = engine.stats()
    assert stats.state == "failed"
    assert stats.judges["trigscore"].in_flight == 0


def write_far_apart(path: Path, records: int, selected: int) -> Path:
    """A legacy JSON dataset whose last ``selected`` records alone are of IQ-R_TA-C."""
    pairs = ["IQ-A_TA-S"] * (records - selected) + ["IQ-R_TA-C"] * selected
    rows = [
        {
            "data_id": f"{pair}_{index}",
            "prompt": f"prompt {index}",
            "dimension": pair.split("_"),
            "dimension_prompt": ["", ""],
            "parent_dataset": ["test", "Origin"],
            "img_id": "",
            "item": None,
        }
        for index, pair in enumerate(pairs)
    ]
    path.write_text(json.dumps(rows))
    return path


async def test_a_stop_is_seen_between_records_left_out(
    make_config: ConfigFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One worker-thread call read records until it had work, however many the filters left
    # out first (300,000 records: 3 s), and a stop or a cancel waited for it.
    monkeypatch.setattr(sourcing, "SOURCE_SCAN", 16, raising=False)
    dataset = write_far_apart(tmp_path / "far.json", 200, selected=4)
    config = make_config(dataset={"path": str(dataset), "pairs": ["IQ-R_TA-C"]})
    engine = Engine(config)
    read_chunk = sourcing.SourceStage._read_chunk

    def stop_after_the_first_call(*args: object, **kwargs: object) -> object:
        chunk = read_chunk(*args, **kwargs)  # type: ignore[arg-type]
        engine.stop()  # from the worker thread: runs in the engine's loop
        return chunk

    monkeypatch.setattr(sourcing.SourceStage, "_read_chunk", stop_after_the_first_call)
    async with engine:
        judged = [judgement async for judgement in engine.results]
    stats = engine.stats()
    assert judged == []
    assert stats.state == "stopped"
    assert stats.records_read == 16


def write_shards(folder: Path, shards: int) -> Path:
    """A parquet dataset folder of ``shards`` shards, one t2i sample each."""
    folder.mkdir()
    for shard in range(shards):
        pl.DataFrame(
            {"data_id": [f"IQ-R_TA-C_{shard}"], "prompt": ["p"], "dimension": [["IQ-R", "TA-C"]]}
        ).write_parquet(folder / f"part-{shard}.parquet")
    return folder


def cut_short_by_a_sigint(
    monkeypatch: pytest.MonkeyPatch, interrupt: Callable[[], object]
) -> threading.Event:
    """Make each parquet read end before its first row, as polars ends one that a SIGINT
    interrupts (no error, as if its files ended there), calling ``interrupt`` first; the
    event returned is set once a read was cut short."""
    cut = threading.Event()

    def interrupted(self: pl.LazyFrame, **kwargs: Any) -> Iterator[pl.DataFrame]:
        del self, kwargs  # the interrupt comes before the first batch
        interrupt()
        cut.set()
        yield from ()

    monkeypatch.setattr(pl.LazyFrame, "collect_batches", interrupted)
    return cut


@pytest.mark.parametrize("stop", ["before the read ends", "after the read ends"])
async def test_a_parquet_read_a_sigint_cut_short_is_a_stop_not_the_dataset_s_end(
    make_config: ConfigFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stop: str
) -> None:
    # A Ctrl-C while polars read a folder of shards ended its reading as if the dataset ended
    # there: with no record read yet, "the dataset ... holds no records" and a run "done"
    # (exit 0), where it was stopped with its samples unread. The stop the SIGINT brings may
    # come before or after the reading's end reaches the source stage.
    config = make_config(dataset={"path": str(write_shards(tmp_path / "shards", 4))})
    engine = Engine(config)
    cut = cut_short_by_a_sigint(
        monkeypatch, engine.stop if stop == "before the read ends" else lambda: None
    )
    async with engine:
        if stop == "after the read ends":
            await anyio.to_thread.run_sync(cut.wait, 10)  # a safety net: the read ends at once
            engine.stop()
        judged = [judgement async for judgement in engine.results]
    stats = engine.stats()
    assert stats.state == "stopped"
    assert judged == []
    assert not any("holds no records" in note for note in stats.notes)


async def test_a_parquet_read_cut_short_with_no_stop_fails_the_run(
    make_config: ConfigFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Cut short with no stop to come (a SIGINT the run does not listen for reached polars):
    # an error that says so, never a run "done" with the rest of the dataset unread.
    monkeypatch.setattr(sourcing, "STOP_AFTER_INTERRUPTED_READ_S", 0.0, raising=False)
    config = make_config(dataset={"path": str(write_shards(tmp_path / "shards", 4))})
    cut_short_by_a_sigint(monkeypatch, lambda: None)
    with pytest.raises(DatasetError, match="ended after 0 records of the 4 its files hold"):
        async with Engine(config) as engine:
            await engine.drain()
    assert engine.stats().state == "failed"


@pytest.mark.parametrize("end", ["stop", "cancel", "end"])
async def test_the_block_never_waits_for_the_count_of_the_dataset(
    make_config: ConfigFactory, monkeypatch: pytest.MonkeyPatch, end: str
) -> None:
    # The count (for progress and ETA) ran in a thread nothing could abandon: the block
    # exit waited for it after a stop, a cancel, and after the results had ended (3 s and
    # 1.3 s at 300,000 records).
    counting, counted, release = threading.Event(), threading.Event(), threading.Event()

    def slow_count(self: DatasetSource, given_up: threading.Event | None = None) -> int:
        counting.set()
        release.wait(10)  # a safety net: the test releases it
        counted.set()
        return 1

    monkeypatch.setattr(DatasetSource, "count", slow_count)
    try:
        async with Engine(make_config(samples=8)) as engine:
            async for _ in engine.results:
                await anyio.to_thread.run_sync(counting.wait, 10)
                if end == "stop":
                    engine.stop()
                elif end == "cancel":
                    engine.cancel()
        assert not counted.is_set()  # the block ended while the count went on
        assert engine.stats().samples_total != 1
    finally:
        release.set()


class GeneratesUntilReleased(SyntheticGenerator):
    """A generator whose calls block until the test releases them."""

    def __init__(self) -> None:
        super().__init__("synth", SyntheticOptions(size=16))
        self.release = threading.Event()
        self.generating = 0
        """Samples in the calls begun."""

    def generate(
        self, requests: Sequence[GenerationRequest], *, worker: int, cancel: threading.Event
    ) -> list[Image.Image | Exception]:
        self.generating += len(requests)
        self.release.wait(timeout=10)  # a safety net: the test releases it
        return super().generate(requests, worker=worker, cancel=cancel)


async def test_a_cancel_leaves_no_sample_queued_in_the_buffer(make_config: ConfigFactory) -> None:
    # The samples left in a model's buffer stayed there: stats() showed it full (8/8) and
    # counted them queued, the dashboard as generating, after the run had ended.
    generator = GeneratesUntilReleased()
    engine = Engine(make_config(samples=24, engine={"sample_buffer": 8}), generators=[generator])
    try:
        with anyio.fail_after(10):  # a safety net: the loop waits for the source to fill it
            async with engine:
                while engine.stats().buffers["samples:synth"].used < 8 or not generator.generating:
                    await checkpoint()
                engine.cancel()
                await engine.drain()
        stats = engine.stats()
        assert stats.buffers["samples:synth"].used == 0
        counts = stats.models["synth"]
        assert counts.queued == generator.generating  # those the cancel left in a call
        assert counts.dropped == 8
    finally:
        generator.release.set()
    with anyio.fail_after(10):
        while threads_left_behind():  # the call left behind ends, and closes the generator
            await checkpoint()


class SlowToClose(FakeJudge):
    """A judge whose close takes until the test lets it end (a server's grace period)."""

    def __init__(self) -> None:
        super().__init__("trigscore", FakeJudgeOptions(), concurrency=4)
        self.closing_started = anyio.Event()
        self.may_close = anyio.Event()
        self.closes = 0

    def closing(self) -> str:
        return "stopping its server (up to 30 s)"

    async def aclose(self) -> None:
        self.closes += 1
        self.closing_started.set()
        await self.may_close.wait()
        await super().aclose()


async def test_the_judges_close_when_the_results_end_not_when_the_block_does(
    make_config: ConfigFactory,
) -> None:
    # A finished run held its judge's server (and a GPU) for as long as the caller stayed
    # in its block: a dashboard left on screen overnight until someone pressed q.
    judge = SlowToClose()
    engine = Engine(make_config(samples=2), judges=[judge])
    with anyio.fail_after(10):  # a safety net: nothing here waits on time
        async with engine:
            await engine.drain()
            await judge.closing_started.wait()
            assert engine.stats().closing == "judge 'trigscore': stopping its server (up to 30 s)"
            judge.may_close.set()
    assert engine.stats().state == "done"
    assert engine.stats().closing is None
    assert judge.closes == 1


async def run_ending(config: RunConfig, ending: str) -> None:
    """Run ``config``, ended the way ``ending`` names; the engine is gone on return."""
    engine = Engine(config)
    if ending == "stopped before it opened":
        engine.stop()
    with anyio.fail_after(30):
        async with engine:
            async for _ in engine.results:
                if ending == "cancelled":
                    engine.cancel()
                elif ending == "left early":
                    break
    assert (
        engine.stats().state
        == {
            "drained": "done",
            "cancelled": "cancelled",
            "left early": "cancelled",
            "stopped before it opened": "stopped",
        }[ending]
    )


@pytest.mark.parametrize(
    "ending", ["drained", "cancelled", "left early", "stopped before it opened"]
)
async def test_a_run_leaves_none_of_its_streams_unclosed(
    make_config: ConfigFactory, ending: str
) -> None:
    # Every engine left its results stream open: "ResourceWarning: Unclosed
    # <MemoryObjectReceiveStream ...>" once it was collected, however the run ended.
    config = make_config(samples=4)
    gc.collect()  # what earlier tests left is not this run's
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        await run_ending(config, ending)
        gc.collect()
    unclosed = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert unclosed == []


class FailsToLoad(SyntheticGenerator):
    def __init__(self) -> None:
        super().__init__("synth", SyntheticOptions(size=16))

    def load(self) -> None:
        raise OSError("weights missing")


async def test_a_failed_run_says_so_once_its_results_end(make_config: ConfigFactory) -> None:
    # The results ended as the run failed while stats() and summary() still said "running":
    # a loop that printed engine.stats() after the results showed a live run.
    engine = Engine(make_config(samples=4), generators=[FailsToLoad()])
    states: list[str] = []
    with pytest.raises(FatalBackendError, match="weights missing"):
        async with engine:
            async for _ in engine.results:
                pass
            states += [engine.stats().state, engine.summary().state]
    # Checked out here: an assertion failing in the block would leave as the run's error.
    assert states == ["failed", "failed"]
