"""An engine embedded in an application: entered twice, made under one event loop library
and run under another, given backends or a config built in code."""

from __future__ import annotations

import anyio
import pytest

from tests.conftest import ConfigFactory
from trig_stream import Engine, RunSummary

pytestmark = pytest.mark.anyio


async def test_an_engine_entered_twice_at_once_refuses_the_second_and_keeps_the_first(
    make_config: ConfigFactory,
) -> None:

    config = make_config(samples=2)
    engine = Engine(config)
    outcomes: list[RunSummary | BaseException] = []

    async def enter() -> None:
        try:
            async with engine:
                outcomes.append(await engine.drain())
        except Exception as exc:
            outcomes.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(enter)
        tg.start_soon(enter)
    refused = [o for o in outcomes if isinstance(o, BaseException)]
    ran = [o for o in outcomes if isinstance(o, RunSummary)]
    assert len(refused) == 1 and len(ran) == 1, outcomes
    assert isinstance(refused[0], RuntimeError)
    assert "an Engine runs once" in str(refused[0])
    assert ran[0].state == "done"
    assert engine.summary().state == "done"
    # The first run released its run directory: another engine opens it (and finds it done).
    async with Engine(config) as again:
        assert (await again.drain()).state == "done"
