"""A resumed run opens a judge that opens slowly (a model to load, a server to start) only when
the dataset holds work left for it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import ConfigFactory, write_prompts
from trig_stream import Engine, opening
from trig_stream.config import RunConfig
from trig_stream.testing import FakeJudge
from trig_stream.testing.fake_judge import FakeJudgeOptions

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
