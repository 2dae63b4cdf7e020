"""What a cancelled or failed run leaves behind: no judge slot held, no buffer shown full."""

from __future__ import annotations

import anyio
import pytest
from anyio.lowlevel import checkpoint

from tests.conftest import ConfigFactory
from trig_stream import Engine, FatalBackendError
from trig_stream.backends.base import JudgeReply, JudgeRequest
from trig_stream.judging import _Requesters
from trig_stream.testing import FakeJudge
from trig_stream.testing.fake_judge import FakeJudgeOptions

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
