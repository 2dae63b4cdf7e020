"""P1: a run's wall time against its slower stage's own time (goal: ratio <= 1.10).

Three engine runs over the same N prompts, in this process, with ``simulate-judge`` in its own:

* generation alone: the synthetic generator (``latency_s`` per image, ``workers`` threads,
  batch size 1) with the fake judge at zero latency;
* judging alone: the synthetic generator at zero latency with the ``openai`` judge against
  ``simulate-judge`` (``latency`` per request, ``capacity`` slots, judge concurrency =
  capacity);
* both: the generator's latency and the judge's together.

A perfect pipeline takes as long as its slower stage: ratio = both / max(alone). The default
sizes make the two stages about equally slow (N x latency_s / workers = 2N x latency /
capacity), the case where any stall between them shows most. The bench exits 1 when the
goal is missed or a run did not judge every prompt ok.

    .venv/bin/python bench/pipeline_efficiency.py [--prompts 400] [--gen-latency 0.04]
        [--workers 4] [--judge-latency 0.08] [--capacity 16]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import stop_on_sigterm, write_parquet_prompts
from _goal import Goals
from _server import openai_judge, start_judge, stop_judge, synthetic_generator

from trig_stream.config import parse_config
from trig_stream.engine import Engine


async def timed_run(folder: Path, name: str, data: dict[str, Any]) -> tuple[float, int]:
    config = parse_config(
        {"run": {"name": name, "output_dir": str(folder / "runs")}, **data},
        source=folder / "bench.toml",
    )
    started = time.perf_counter()
    async with Engine(config) as engine:
        summary = await engine.drain()
    return time.perf_counter() - started, summary.ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=400)
    parser.add_argument("--gen-latency", type=float, default=0.04)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--judge-latency", type=float, default=0.08)
    parser.add_argument("--capacity", type=int, default=16)
    args = parser.parse_args()
    stop_on_sigterm()
    n = args.prompts
    process, url = start_judge(
        "--latency", str(args.judge_latency), "--capacity", str(args.capacity)
    )
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            dataset = {"path": str(write_parquet_prompts(folder / "prompts.parquet", n))}
            # Deep enough buffers that neither stage waits on the other's jitter.
            engine = {"image_buffer": 2 * args.capacity, "sample_buffer": 2 * args.workers}
            slow_gen = synthetic_generator(
                workers=args.workers, batch_size=1, size=32, latency_s=args.gen_latency
            )
            fast_gen = synthetic_generator(workers=args.workers, batch_size=1, size=32)
            judge = openai_judge(url, args.capacity)
            fake = {"name": "trigscore", "backend": "fake", "concurrency": 64}
            runs = {
                "generation alone": {"generators": [slow_gen], "judges": [fake]},
                "judging alone": {"generators": [fast_gen], "judges": [judge]},
                "both": {"generators": [slow_gen], "judges": [judge]},
            }
            times: dict[str, float] = {}
            made: dict[str, int] = {}
            for index, (label, parts) in enumerate(runs.items()):
                seconds, ok = anyio.run(
                    timed_run,
                    folder,
                    f"run{index}",
                    {"dataset": dataset, "engine": engine, **parts},
                )
                times[label], made[label] = seconds, ok
    finally:
        stop_judge(process)
    ideal_gen = n * args.gen_latency / args.workers
    ideal_judge = 2 * n * args.judge_latency / args.capacity
    print(
        f"{n} prompts, {2 * n} judgements; generator {args.gen_latency * 1000:g} ms x "
        f"{args.workers} workers (ideal {ideal_gen:.2f} s); judge {args.judge_latency * 1000:g} "
        f"ms x {args.capacity} slots (ideal {ideal_judge:.2f} s)"
    )
    for label, seconds in times.items():
        print(f"  {label:<17} {seconds:6.2f} s")
    slower = max(times["generation alone"], times["judging alone"])
    goals = Goals()
    for label, ok in made.items():
        goals.equal(f"{label}: ok judgements", ok, 2 * n)
    goals.at_most("P1 ratio both / slower stage", times["both"] / slower, 1.10)
    goals.finish()


if __name__ == "__main__":
    main()
