"""No file descriptor growth over a run against the loopback judge.

2,000 judgements with the ``openai`` judge (concurrency 64) against ``simulate-judge`` in its
own process, counting this process's open descriptors (``/proc/self/fd``) at a quarter, half
and all of the judgements: sockets never outnumber the judge's slots (one connection per
request in flight; a run that is not judge-bound opens more of them as it goes, up to the
slots), the other descriptors do not grow from the middle to the end (a leak of one per
request or per image would add hundreds), and all are back near their starting count once
the engine has closed. ``bench/soak.py`` is the long version (100k items, RSS too).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import write_prompts
from trig_stream.config import parse_config
from trig_stream.engine import Engine

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc"),
]

SAMPLES = 1000
CONCURRENCY = 64
SLACK = 8
"""Descriptors that may come and go with the moment of counting (an image being written,
a worker thread's file): far below what any per-request or per-image leak would add."""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def fd_kinds() -> Counter[str]:
    """The open descriptors by kind: ``socket``, ``pipe``, ``anon_inode`` or the file's
    folder (what a failure message needs to name the leak)."""
    kinds: Counter[str] = Counter()
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # closed since the listing
            continue
        kinds[target.split(":")[0] if ":" in target else os.path.dirname(target)] += 1
    return kinds


@pytest.fixture
def judge_url() -> Iterator[str]:
    command = [sys.executable, "-m", "trig_stream", "simulate-judge", "--port", "0"]
    process = subprocess.Popen(
        [*command, "--capacity", "64"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        assert process.stdout is not None
        for line in process.stdout:
            if line.startswith("READY "):
                yield line.split()[1]
                break
        else:
            pytest.fail("simulate-judge did not start")
    finally:
        process.terminate()
        process.wait(timeout=30)


async def test_open_descriptors_do_not_grow_during_a_run(tmp_path: Path, judge_url: str) -> None:
    write_prompts(tmp_path / "prompts.json", SAMPLES)
    config = parse_config(
        {
            "run": {"name": "fds", "output_dir": str(tmp_path / "runs")},
            "dataset": {"path": str(tmp_path / "prompts.json")},
            "generators": [
                {
                    "name": "synth",
                    "backend": "synthetic",
                    "workers": 2,
                    "batch_size": 8,
                    "options": {"size": 16},
                }
            ],
            "judges": [
                {
                    "name": "trigscore",
                    "backend": "openai",
                    "concurrency": CONCURRENCY,
                    "options": {"base_url": judge_url, "model": "trig-judge-sim"},
                }
            ],
            "engine": {"image_buffer": 128},
        },
        source=tmp_path / "config.toml",
    )
    before, sockets_before = open_fds(), fd_kinds()["socket"]
    counts: dict[int, int] = {}
    kinds: dict[int, Counter[str]] = {}
    seen = 0
    async with Engine(config) as engine:
        async for judgement in engine.results:
            seen += 1
            assert judgement.status == "ok", judgement.error
            if seen in (SAMPLES // 2, SAMPLES, 2 * SAMPLES):
                counts[seen], kinds[seen] = open_fds(), fd_kinds()
    after = open_fds()
    assert seen == 2 * SAMPLES
    sockets = {seen: kinds[seen]["socket"] - sockets_before for seen in kinds}
    assert sockets[SAMPLES // 2] > 0, "the run should hold connections while it runs"
    assert max(sockets.values()) <= CONCURRENCY, (sockets_before, kinds)
    others = {seen: counts[seen] - kinds[seen]["socket"] for seen in counts}
    assert others[2 * SAMPLES] <= others[SAMPLES] + SLACK, kinds
    assert after <= before + SLACK, (before, counts, after)
