"""Soak: a long run at concurrency 256 against the loopback judge; memory and descriptors.

The engine runs in this process with the ``openai`` judge at concurrency 256 against
``simulate-judge`` (256 slots, ``--latency`` 0.25 s per request, so that ~256 requests are
in flight at ~1,000 per second; at zero latency each answer comes back before the next
request is sent and only a few connections are ever open) in its own process, and the
server's slots must have been full at some point (its ``max_running`` 256; at ``--latency``
under 0.25 s the engine need not keep 256 in flight, and this is not measured), over
``--items`` judgements (half as many prompts, two dimensions each, so an odd ``--items`` is
refused). Every ``--every`` judgements it prints the resident memory and the open file
descriptors (``/proc/self/fd``) of this process; at the end it compares the last sample taken
while requests were still due (before the last judgement, when the judge may have closed its
connections already) with that of the first quarter: both should be flat (goal,
bench/README.md R2: RSS grows by at most 8 MiB and the descriptors by at most 4 between the
two; with fewer than four such samples, ``--items`` at most 4 x ``--every``, flatness is not
measured). Every judgement must be ok,
all ``--items`` of them made, none asked twice; the bench exits 1 otherwise.

    .venv/bin/python bench/soak.py [--items 100000] [--every 10000] [--latency 0.25]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import stop_on_sigterm, write_parquet_prompts
from _goal import Goals
from _server import judge_stats, openai_judge, rss_mib, start_judge, stop_judge, synthetic_generator

from trig_stream.config import parse_config
from trig_stream.engine import Engine

Sample = tuple[int, float, float, int]
"""Judgements made, seconds since the start, RSS in MiB, open file descriptors."""
CONCURRENCY = 256
"""The judge's concurrency and the server's slots."""
FILLS_SLOTS_S = 0.25
"""The least ``--latency`` at which the engine must fill the server's slots: 256 requests in
flight at 0.25 s each is ~1,000 requests a second, what the engine reaches on a small box.
At 0.05 s it would take ~5,000 a second (a run reached 152)."""


def check_slots(goals: Goals, latency_s: float, max_running: int) -> None:
    """R2's concurrency goal: the server ran ``CONCURRENCY`` requests at once, when the
    latency lets the engine keep that many in flight."""
    goal = "R2 server slots full: max running (server /stats)"
    if latency_s < FILLS_SLOTS_S:
        goals.not_measured(goal, f"--latency {latency_s:g} s, under {FILLS_SLOTS_S:g} s")
    else:
        goals.equal(goal, max_running, CONCURRENCY)


def check_flat(goals: Goals, samples: list[Sample], items: int) -> None:
    """R2's flatness goals: RSS and open descriptors from the first quarter's sample to the
    last of :func:`running_samples`."""
    running = running_samples(samples, items)
    if len(running) >= 4:
        early, late = running[len(running) // 4], running[-1]
        span = f" from {early[0]} to {late[0]} judgements"
        goals.at_most("R2 RSS growth" + span, late[2] - early[2], 8, " MiB", digits=1)
        goals.at_most("R2 open descriptors' growth" + span, late[3] - early[3], 4, digits=0)
    else:
        why = f"{len(running)} samples, 4 needed: --items > 4 x --every"
        goals.not_measured("R2 RSS and descriptors flat", why)


def running_samples(samples: list[Sample], items: int) -> list[Sample]:
    """The samples taken while requests were still due: not the one before the run or the
    one after it, nor one at the last judgement, which may come after the judge closed its
    ~256 connections and so hide a leak of as many descriptors (a run gave "fds 274 -> 15")."""
    return [sample for sample in samples[1:-1] if sample[0] < items]


def judgements(text: str) -> int:
    """``--items``: a positive even count, since each prompt makes two judgements."""
    items = int(text)
    if items < 2 or items % 2:
        raise argparse.ArgumentTypeError(
            f"{items} judgements cannot be made: each prompt makes two, "
            "so give an even count of 2 or more"
        )
    return items


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def soak(folder: Path, url: str, items: int, every: int) -> list[Sample]:
    dataset = write_parquet_prompts(folder / "prompts.parquet", items // 2)
    config = parse_config(
        {
            "run": {"name": "soak", "output_dir": str(folder / "runs")},
            "dataset": {"path": str(dataset)},
            "generators": [synthetic_generator(workers=2, batch_size=16, size=16)],
            "judges": [openai_judge(url, CONCURRENCY)],
            "engine": {"image_buffer": 256},
        },
        source=folder / "bench.toml",
    )
    samples = [(0, 0.0, rss_mib(), fds())]
    started = time.perf_counter()
    seen = 0
    async with Engine(config) as engine:
        async for judgement in engine.results:
            seen += 1
            if judgement.status != "ok":
                raise SystemExit(f"not ok: {judgement.error}")
            if seen % every == 0:
                samples.append((seen, time.perf_counter() - started, rss_mib(), fds()))
                print(
                    f"{seen:>8} judgements {samples[-1][1]:7.1f} s  RSS {samples[-1][2]:7.1f} "
                    f"MiB  fds {samples[-1][3]}",
                    flush=True,
                )
    samples.append((seen, time.perf_counter() - started, rss_mib(), fds()))
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--items", type=judgements, default=100_000, help="judgements (even: two per prompt)"
    )
    parser.add_argument("--every", type=int, default=10_000)
    parser.add_argument(
        "--latency", type=float, default=0.25, help="server seconds per request: fills its slots"
    )
    args = parser.parse_args()
    stop_on_sigterm()
    process, url = start_judge("--latency", str(args.latency), "--capacity", str(CONCURRENCY))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            samples = anyio.run(soak, Path(tmp), url, args.items, args.every)
        stats = judge_stats(url)
    finally:
        stop_judge(process)
    seen, elapsed, rss, open_fds = samples[-1]
    print(
        f"after the run: RSS {rss:.1f} MiB, fds {open_fds} (before it: {samples[0][2]:.1f} MiB, "
        f"{samples[0][3]} fds)"
    )
    print(
        f"{seen} judgements in {elapsed:.0f} s ({seen / elapsed:.0f}/s); server: "
        f"{stats['served']} served, {stats['repeated']} repeated, max running "
        f"{stats['max_running']}"
    )
    goals = Goals()
    goals.equal("judgements made (all ok)", seen, args.items)
    goals.equal("requests repeated (server /stats)", stats["repeated"], 0)
    check_slots(goals, args.latency, stats["max_running"])
    check_flat(goals, samples, args.items)
    goals.finish()


if __name__ == "__main__":
    main()
