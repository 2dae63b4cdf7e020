"""A run against a misbehaving judge server completes, and only exhausted retries fail.

``simulate-judge`` runs in its own process with 10 % 503s, 5 % 429s carrying a Retry-After,
2 % hung requests, 2 % malformed bodies and 1 % connection resets. The engine judges with the
``openai`` backend, a one-second request timeout and an injected sleep (so backoff and
Retry-After cost no time, and every wait is recorded). Afterwards:

* every key was judged, once;
* each non-ok judgement gave up after ``max_attempts`` transient failures, and has no score;
* the server answered exactly one completion per ok judgement, and received exactly as many
  requests as the judgements report attempts: no attempt was lost or sent twice;
* every retry waited once, and every retried 429 waited at least its Retry-After.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from anyio.lowlevel import checkpoint

from tests.conftest import write_prompts
from trig_stream.config import parse_config
from trig_stream.engine import Engine
from trig_stream.journal import JOURNAL, read_journal
from trig_stream.records import Judgement

pytestmark = pytest.mark.anyio

SAMPLES = 400
MAX_ATTEMPTS = 3
RETRY_AFTER_S = 30.0
"""Far longer than the backoff ceiling: only a 429's Retry-After can make a wait this long."""
FAULTS = {
    "--error-rate": 0.10,
    "--rate-limit-rate": 0.05,
    "--hang-rate": 0.02,
    "--malformed-rate": 0.02,
    "--reset-rate": 0.01,
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the openai client's aiohttp transport runs on asyncio only


def start_judge(*options: str) -> tuple[subprocess.Popen[str], str]:
    """``trig-stream simulate-judge`` in its own process; returns it and its base URL."""
    command = [sys.executable, "-m", "trig_stream", "simulate-judge", "--port", "0", *options]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    assert process.stdout is not None
    for line in process.stdout:  # ends if the server dies before it is ready
        if line.startswith("READY "):
            return process, line.split()[1]
    process.kill()
    raise AssertionError("simulate-judge did not start")


def server_stats(base_url: str) -> dict[str, Any]:
    url = base_url.removesuffix("/v1") + "/stats"
    with urllib.request.urlopen(url, timeout=10) as response:
        stats: dict[str, Any] = json.load(response)
    return stats


@pytest.fixture
def faulty_judge() -> Iterator[str]:
    flags = [str(part) for flag, rate in FAULTS.items() for part in (flag, rate)]
    process, base_url = start_judge(
        "--seed", "3", "--capacity", "64", "--retry-after", f"{RETRY_AFTER_S:g}", *flags
    )
    try:
        yield base_url
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.parametrize("client", ["aiohttp", "http"])
async def test_faulty_server_run_completes_and_only_exhausted_retries_fail(
    tmp_path: Path, faulty_judge: str, client: str
) -> None:
    write_prompts(tmp_path / "prompts.json", SAMPLES)
    config = parse_config(
        {
            "run": {"name": "faults", "output_dir": str(tmp_path / "runs")},
            "dataset": {"path": str(tmp_path / "prompts.json")},
            "generators": [
                {"name": "synth", "backend": "synthetic", "workers": 2, "options": {"size": 16}}
            ],
            "judges": [
                {
                    "name": "trigscore",
                    "backend": "openai",
                    "concurrency": 32,
                    "options": {
                        "base_url": faulty_judge,
                        "model": "trig-judge-sim",
                        "timeout_s": 1,
                        "client": client,
                    },
                }
            ],
            "engine": {
                "max_attempts": MAX_ATTEMPTS,
                "backoff_initial": 0.01,
                "backoff_max": 0.05,
                "image_buffer": 64,
            },
        },
        source=tmp_path / "config.toml",
    )
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        await checkpoint()

    async with Engine(config, sleep=sleep) as engine:
        summary = await engine.drain()
    assert engine.stats().state == "done"

    records: list[Judgement] = list(read_journal(config.run_dir / JOURNAL))
    keys = Counter(j.key for j in records)
    assert len(keys) == 2 * SAMPLES and set(keys.values()) == {1}
    assert summary.judged == 2 * SAMPLES

    failed = [j for j in records if j.status != "ok"]
    assert failed, "with these rates some requests should exhaust their attempts"
    for judgement in failed:
        assert judgement.status == "error", judgement
        assert judgement.score is None, judgement
        assert judgement.attempts == MAX_ATTEMPTS, judgement
        assert judgement.error is not None
        assert judgement.error.startswith(f"gave up after {MAX_ATTEMPTS} attempts"), judgement
    ok = [j for j in records if j.status == "ok"]
    assert all(j.score is not None and j.top_logprobs for j in ok)
    assert any(j.attempts > 1 for j in ok), "some requests should have succeeded on a retry"

    stats = server_stats(faulty_judge)
    assert all(stats["faults"][name] > 0 for name in ("error", "rate_limit", "hang")), stats
    assert stats["faults"]["malformed"] + stats["faults"]["reset"] > 0, stats
    assert stats["served"] == len(ok), stats
    assert stats["received"] == sum(j.attempts for j in records), stats
    assert stats["rejected"] == 0, stats

    assert len(waits) == sum(j.attempts - 1 for j in records)
    long_waits = sum(1 for w in waits if w >= RETRY_AFTER_S)
    # Every 429 was retried after its Retry-After, except those on a last attempt.
    # (The status as the message gives it: the endpoint's port may hold the digits 429.)
    exhausted_on_429 = sum(1 for j in failed if "HTTP 429 rate limited" in (j.error or ""))
    assert stats["faults"]["rate_limit"] - exhausted_on_429 == long_waits
    assert all(w <= 0.05 or w >= RETRY_AFTER_S for w in waits)
