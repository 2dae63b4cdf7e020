"""Throughput of the same synthetic run headless and with the dashboard on screen.

Runs the engine (synthetic generator, fake judge) twice per repeat on fresh run directories:
once consuming ``results`` directly (headless), once under :func:`run_dashboard` in a headless
Textual app at 120x40, which draws at its normal rate (4 Hz, DTM at most 1 Hz) exactly as on a
terminal. Prints judgements/s of each (median over repeats) and their ratio (goal: >= 0.9);
exits 1 when the goal is missed or a run did not end done with every prompt judged ok. Under
``--samples`` 4,000 the dashboard's start-up is not amortised and the ratio is NOT MEASURED
(at 100 it made 0.49); the state checks still count.

Run: ``.venv/bin/python bench/tui_overhead.py [--samples 4000] [--judge-latency 0.0] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import bench_config, stop_on_sigterm, write_parquet_prompts
from _goal import Goals

from trig_stream import Engine
from trig_stream.config import RunConfig, parse_config
from trig_stream.tui.run import run_dashboard


def make_config(folder: Path, samples: int, judge_latency_s: float) -> RunConfig:
    dataset = write_parquet_prompts(folder / "prompts.parquet", samples)
    data = bench_config(folder / "runs", dataset)
    data["judges"][0]["options"] = {"latency_s": judge_latency_s}
    return parse_config(data, source=folder / "bench.toml")


async def run_once(config: RunConfig, *, dashboard: bool) -> tuple[float, int, str]:
    """Judgements per second of one full run, its ok judgements and its final state."""
    started = time.perf_counter()
    async with Engine(config) as engine:
        if dashboard:
            await run_dashboard(engine, headless=True, size=(120, 40), handle_signals=False)
        else:
            async for _ in engine.results:
                pass
    elapsed = time.perf_counter() - started
    summary = engine.summary()
    return summary.judged / elapsed, summary.ok, summary.state


T1_SAMPLES = 4000
"""The least ``--samples`` (the default, the size of bench/README.md's T1 results) that tells
the ratio: at 100 the dashboard's start-up dominated a run and made it 0.49."""


def check_ratio(goals: Goals, samples: int, ratio: float) -> None:
    """T1's goal, when the runs are large enough to tell it."""
    goal = "T1 ratio dashboard / headless"
    if goals.measured_at(goal, samples, T1_SAMPLES, "--samples"):
        goals.at_least(goal, ratio, 0.9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=T1_SAMPLES)
    parser.add_argument("--judge-latency", type=float, default=0.0, help="fake judge latency_s")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    stop_on_sigterm()
    rates: dict[bool, list[float]] = {False: [], True: []}
    goals = Goals()
    for repeat in range(args.repeats):
        # Alternate which mode goes first, so warm-up and caches favour neither.
        for dashboard in (repeat % 2 == 1, repeat % 2 == 0):
            with tempfile.TemporaryDirectory() as folder:
                config = make_config(Path(folder), args.samples, args.judge_latency)
                rate, ok, state = anyio.run(partial(run_once, config, dashboard=dashboard))
            rates[dashboard].append(rate)
            mode = "dashboard" if dashboard else "headless"
            print(f"repeat {repeat + 1} {mode:>9}: {rate:8.0f} judgements/s", flush=True)
            goals.equal(
                f"repeat {repeat + 1} {mode}: state, ok judgements",
                (state, ok),
                ("done", 2 * args.samples),
            )
    headless = statistics.median(rates[False])
    with_tui = statistics.median(rates[True])
    print(
        f"samples {args.samples}, judge latency {args.judge_latency}s: "
        f"headless {headless:.0f}/s, dashboard {with_tui:.0f}/s"
    )
    check_ratio(goals, args.samples, with_tui / headless)
    goals.finish()


if __name__ == "__main__":
    main()
