"""End to end: the engine, the synthetic generator and the ``openai`` judge on loopback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trig_stream.config import RunConfig
from trig_stream.engine import Engine
from trig_stream.testing.judge_server import JudgeServer, JudgeServerOptions

pytestmark = pytest.mark.anyio

DEMO = Path(__file__).resolve().parent.parent / "data" / "demo" / "t2i_prompts.json"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiohttp, under the openai client, runs on asyncio only


def run_config(tmp_path: Path, base_url: str) -> RunConfig:
    return RunConfig.model_validate(
        {
            "run": {"name": "loopback", "output_dir": str(tmp_path), "task": "t2i"},
            "dataset": {"path": str(DEMO)},
            "generators": [
                {
                    "name": "synthetic-a",
                    "backend": "synthetic",
                    "workers": 2,
                    "options": {"size": 32},
                }
            ],
            "judges": [
                {
                    "name": "trigscore",
                    "backend": "openai",
                    "concurrency": 16,
                    "scorer": "trig",
                    "options": {"base_url": base_url, "model": "trig-judge-sim"},
                }
            ],
        }
    )


async def test_engine_judges_every_image_once(tmp_path: Path) -> None:
    samples = len(json.loads(DEMO.read_text()))
    async with JudgeServer(JudgeServerOptions(latency_s=0.001, capacity=8)) as server:
        config = run_config(tmp_path, server.base_url)
        async with Engine(config) as engine:
            judgements = [j async for j in engine.results]
    assert len(judgements) == 2 * samples
    assert all(j.status == "ok" and j.score is not None for j in judgements)
    assert {j.judge.backend for j in judgements} == {"openai"}
    assert all(j.top_logprobs for j in judgements)
    stats = server.stats()
    assert stats.received == stats.served == 2 * samples
    assert stats.repeated == 0
    assert stats.max_running <= 8
