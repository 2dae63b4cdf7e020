"""P3: the engine process's own CPU time per judgement at zero server latency (goal <= 0.5 ms).

The engine runs in this process; ``simulate-judge`` (zero latency) runs in its own, so its
CPU is not counted. ``os.times()`` (user and system time of every thread of this process: the
event loop, the generator's and the writers' threads, the client) is read around three runs
over the same prompts (synthetic 8x8 images), in this order:

* ``fake``: the fake judge: the engine alone (dataset, generation, PNG writes, journal fsyncs,
  live DTM), without any HTTP;
* ``aiohttp`` and ``http``: the ``openai`` judge against ``simulate-judge``, one run with each
  of its two plain clients (``options.client``): what a real run costs per judgement on the
  judging machine's side.

A warm-up run with each client comes first, outside the measure: it pays the imports.

The goal is checked on the ``http`` runs (the default client; their median over
``--rounds``) and every run must judge all its prompts ok; the bench exits 1 otherwise.

A second line per run splits the CPU by thread: the event loop's own, and that of each
function the engine runs in a worker thread (writing images, the generator, the journal...).

Each line splits the CPU into user time (Python: ours, aiohttp's, the event loop's) and
system time (the kernel: sockets, and creating, syncing and renaming the image files). On
this box creating a small file cost anywhere from 6 to 600 us of system time, from one
minute to the next, in the same folder (see bench/README.md, P3), so read the two apart.

The server runs on a CPU of its own (the last one) and the engine on the others, where the
machine has two or more and allows it (Linux): in production the judge server runs
elsewhere, on the GPU machine, and sharing cores with it costs the engine CPU time that is
not its own (on this 2-vCPU box, 0.1-0.3 ms per judgement: cache and migration churn).
``--no-pin`` lets both run anywhere (the server on every CPU this bench may use, also when
``--engine-cpus`` keeps the engine to fewer: it used to inherit the engine's). ``--engine-cpus
N`` keeps the engine to the first N of its CPUs; past them it takes the server's too (on this
box, ``--engine-cpus 2`` spreads the engine over both CPUs, one of them shared with the
server). The output names the CPUs each may use, as the kernel reports them. On a machine
with many cores its threads spread out, and a hand-over between two of them may wake another
core: on the 16-core GPU machine, with 15 CPUs for the engine, P3 was ~0.62 ms on a tmpfs,
against ~0.42 here with one (untested there with one). Here, two CPUs instead of one
doubled it, the fake judge's runs included (bench/README.md, P3).

``--dir`` puts the run folders there (e.g. ``/dev/shm``, a tmpfs) instead of the default
temporary folder: the image files' kernel cost is the disk's, and on some disks it is most
of the bill (see bench/README.md, P3).

``--rounds N`` repeats the three runs N times, alternating, and ends with each one's median:
this box's speed drifts by the minute, so one run says little.

``--batch N`` and ``--latency S`` change the synthetic generator (P3: batches of 8, no
wait): with ``--batch 1 --latency 0.001`` each image makes its own trip through the engine's
hand-overs, as from a real model at batch 1, and costs ~2.5x the CPU it does in P3.

``--profile`` adds a cProfile of one ``openai`` run (``--client``; the event loop's thread
only, timed by its CPU time, ``time.thread_time``: a wall-clock profile charged a socket call
its waits for the interpreter lock, 90 us a ``recv``) and prints the top functions by own
time. The profiler's own cost per call inflates small functions called often.

    .venv/bin/python bench/engine_cpu.py [--prompts 2000] [--concurrency 64] [--json]
        [--no-pin] [--engine-cpus N] [--dir FOLDER] [--rounds 1] [--profile [--client http]]
        [--batch 8] [--latency 0]
"""

from __future__ import annotations

import argparse
import cProfile
import math
import os
import pstats
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import stop_on_sigterm, write_json_prompts, write_parquet_prompts
from _goal import Goals
from _server import judge_stats, openai_judge, start_judge, stop_judge, synthetic_generator

from trig_stream.config import parse_config
from trig_stream.engine import Engine
from trig_stream.files import write_atomic_many


class ThreadTimes:
    """CPU time by where it was spent: the event loop's thread, and each function the engine
    hands to a worker thread (``anyio.to_thread.run_sync``, patched while it is measured)."""

    def __init__(self) -> None:
        self.loop_s = 0.0
        self.calls: defaultdict[str, float] = defaultdict(float)  # seconds by function
        self._run_sync = anyio.to_thread.run_sync

    async def run_sync(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        def timed(*inner: Any) -> Any:
            started = time.thread_time()
            try:
                return func(*inner)
            finally:
                self.calls[getattr(func, "__qualname__", repr(func))] += (
                    time.thread_time() - started
                )

        return await self._run_sync(timed, *args, **kwargs)

    def line(self, judgements: int) -> str:
        if not judgements:
            return "ms per judgement by thread: none judged"
        parts = [f"event loop {ms_per_judgement(self.loop_s, judgements):.3f}"]
        most = sorted(self.calls.items(), key=lambda item: item[1], reverse=True)[:4]
        parts += [f"{name} {ms_per_judgement(s, judgements):.3f}" for name, s in most]
        return "ms per judgement by thread: " + ", ".join(parts)


def ms_per_judgement(seconds: float, judgements: int) -> float:
    """``seconds`` of CPU per judgement, in ms; NaN (nothing measured, a missed goal) when
    the run judged nothing."""
    return seconds / judgements * 1000 if judgements else math.nan


P3_GENERATOR = synthetic_generator(workers=1, batch_size=8, size=8)
"""P3's images: 8x8, made at once, in batches of 8."""


async def run(
    folder: Path,
    name: str,
    dataset: Path,
    judge: dict[str, Any],
    times: ThreadTimes,
    generator: dict[str, Any],
) -> tuple[int, float]:
    started = time.thread_time()
    config = parse_config(
        {
            "run": {"name": name, "output_dir": str(folder / "runs")},
            "dataset": {"path": str(dataset)},
            "generators": [generator],
            "judges": [judge],
            "engine": {"image_buffer": 2 * judge["concurrency"]},
        },
        source=folder / "bench.toml",
    )
    async with Engine(config) as engine:
        summary = await engine.drain()
    times.loop_s = time.thread_time() - started
    return summary.ok, time.perf_counter()


Measured = tuple[int, float, float, float, ThreadTimes, cProfile.Profile | None]


def measure(
    folder: Path,
    name: str,
    dataset: Path,
    judge: dict[str, Any],
    profile: bool = False,
    generator: dict[str, Any] = P3_GENERATOR,
) -> Measured:
    """Judgements made, user and system CPU seconds, wall seconds, the CPU by thread, and
    the profile if any."""
    profiler = cProfile.Profile(time.thread_time) if profile else None
    by_thread = ThreadTimes()
    anyio.to_thread.run_sync = by_thread.run_sync  # type: ignore[assignment]
    times, wall = os.times(), time.perf_counter()
    if profiler:
        profiler.enable()
    try:
        ok, end = anyio.run(run, folder, name, dataset, judge, by_thread, generator)
    finally:
        anyio.to_thread.run_sync = by_thread._run_sync
    if profiler:
        profiler.disable()
    after = os.times()
    user, system = after.user - times.user, after.system - times.system
    return ok, user, system, end - wall, by_thread, profiler


def file_write_floor(folder: Path, files: int = 2000) -> float:
    """CPU seconds (user + system) per file that writing small files durably costs in
    ``folder``, done as the engine writes its images (8 at a time: temporary file, data
    sync, rename, one folder sync), without the engine: the disk's share of the bill."""
    data = os.urandom(160)  # an 8x8 PNG's size
    target, partial = folder / "floor", folder / "floor" / ".partial"
    partial.mkdir(parents=True)
    before = os.times()
    for batch in range(files // 8):
        write_atomic_many([(target / f"{batch}-{i}.png", data) for i in range(8)], temp_dir=partial)
    after = os.times()
    return (after.user - before.user + after.system - before.system) / (files // 8 * 8)


CLIENTS = ("aiohttp", "http")
"""The ``openai`` judge's clients measured, each in its own run."""


def warm_up(folder: Path, dataset: Path, url: str) -> None:
    """One run per client measured, before the measure: each pays its own imports (aiohttp
    for its client; the judge's and PIL's modules) there, not in its first measured run."""
    for client in CLIENTS:
        measure(folder, f"warmup-{client}", dataset, openai_judge(url, 8, client=client))


def split_cpus() -> tuple[set[int], set[int]]:
    """The server's CPU (the last usable one) and the engine's (the rest); both empty where
    that cannot be done (one CPU, or no ``sched_setaffinity``)."""
    if not hasattr(os, "sched_setaffinity"):
        return set(), set()
    usable = sorted(os.sched_getaffinity(0))
    if len(usable) < 2:
        return set(), set()
    return {usable[-1]}, set(usable[:-1])


def on_cpus(pid: int) -> str:
    """The CPUs process ``pid`` (0: this one) may run on, as the kernel has them now."""
    if not hasattr(os, "sched_getaffinity"):
        return "any CPU"
    return str(sorted(os.sched_getaffinity(pid)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument(
        "--client", choices=["aiohttp", "http"], default="http", help="the run --profile profiles"
    )
    parser.add_argument(
        "--json", action="store_true", help="a JSON dataset instead of parquet (no polars needed)"
    )
    parser.add_argument(
        "--no-pin", action="store_true", help="do not give the server a CPU of its own"
    )
    parser.add_argument(
        "--engine-cpus",
        type=int,
        help="keep the engine to this many CPUs (default: all others; more than the others "
        "adds the server's own)",
    )
    parser.add_argument("--dir", type=Path, help="where the run folders go (default: temp)")
    parser.add_argument("--batch", type=int, default=8, help="the generator's batch size (P3: 8)")
    parser.add_argument(
        "--latency",
        type=float,
        default=0.0,
        help="the generator's seconds per image, spent asleep (P3: 0): images that come "
        "slowly, as from a real model",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="rounds of the three runs, alternating (this box's speed drifts by the minute)",
    )
    args = parser.parse_args()
    stop_on_sigterm()
    usable = set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else set()
    server_cpus, engine_cpus = (set(), set()) if args.no_pin else split_cpus()
    if args.engine_cpus is not None:
        # The others first; past them, the server's own CPU (then shared with it).
        available = sorted(engine_cpus) + sorted(server_cpus) or sorted(usable)
        engine_cpus = set(available[: max(1, args.engine_cpus)])
    if engine_cpus:
        os.sched_setaffinity(0, engine_cpus)
    # Unpinned (--no-pin), the server gets every CPU this bench had, not the engine's
    # (a child inherits its parent's affinity).
    process, url = start_judge(
        "--latency", "0", "--capacity", str(args.concurrency), cpus=server_cpus or usable
    )
    placed = f"engine on CPUs {on_cpus(0)}, server on {on_cpus(process.pid)}"
    try:
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            folder = Path(tmp)
            if args.json:
                dataset = write_json_prompts(folder / "prompts.json", args.prompts)
            else:
                dataset = write_parquet_prompts(folder / "prompts.parquet", args.prompts)
            fake = {"name": "trigscore", "backend": "fake", "concurrency": args.concurrency}
            generator = synthetic_generator(
                workers=1, batch_size=args.batch, size=8, latency_s=args.latency
            )
            warm_up(folder, dataset, url)
            floors: list[float] = []
            results: dict[str, list[Measured]] = {"fake": [], "aiohttp": [], "http": []}
            for round_ in range(args.rounds):
                floors.append(file_write_floor(folder / f"floor-{round_}"))
                results["fake"].append(
                    measure(folder, f"fake-{round_}", dataset, fake, generator=generator)
                )
                for client in CLIENTS:
                    judge = openai_judge(url, args.concurrency, client=client)
                    profile = args.profile and client == args.client and round_ == 0
                    run = measure(folder, f"{client}-{round_}", dataset, judge, profile, generator)
                    results[client].append(run)
            served = judge_stats(url)["served"]
    finally:
        stop_judge(process)
    print(f"{args.prompts} prompts, {2 * args.prompts} judgements, concurrency {args.concurrency}")
    if (args.batch, args.latency) != (8, 0.0):
        print(f"  images in batches of {args.batch}, {args.latency * 1000:g} ms each (not P3's)")
    where = f"run folders under {args.dir or tempfile.gettempdir()}"
    print(f"  {placed}; {where}")
    for round_, floor in enumerate(floors):
        if args.rounds > 1:
            print(f" round {round_ + 1}")
        for label, runs in results.items():
            ok, user, system, wall, by_thread, _ = runs[round_]
            cpu = user + system
            if not ok:
                print(f"  {label:<7} judge: none judged in {wall:.2f} s wall, {cpu:.2f} s CPU")
                continue
            print(
                f"  {label:<7} judge: {ok} ok in {wall:.2f} s wall, {cpu:.2f} s CPU "
                f"= {ms_per_judgement(cpu, ok):.3f} ms CPU per judgement "
                f"({ok / wall:.0f} judgements/s); user {ms_per_judgement(user, ok):.3f} "
                f"+ system {ms_per_judgement(system, ok):.3f} ms"
            )
            print(f"          {by_thread.line(ok)}")
        print(
            f"  writing one small image file durably here costs {floor * 1e6:.0f} us CPU "
            f"without the engine: {floor / 2 * 1000:.3f} ms per judgement (each image has two)"
        )
    if args.rounds > 1:
        for label, runs in results.items():
            per = sorted(ms_per_judgement(r[1] + r[2], r[0]) for r in runs if r[0])
            if len(per) < len(runs):
                print(f"{label:<7} over {args.rounds} rounds: none judged in some rounds")
                continue
            print(
                f"{label:<7} over {args.rounds} rounds: median {statistics.median(per):.3f} ms "
                f"per judgement ({per[0]:.3f}-{per[-1]:.3f})"
            )
    print(f"server answered {served} requests (warm-ups included)")
    profiler = results[args.client][0][5]
    if profiler is not None:
        stats = pstats.Stats(profiler)
        stats.sort_stats("tottime").print_stats(30)
        stats.sort_stats("cumulative").print_stats(40)
    goals = Goals()
    for label, runs in results.items():
        made = [r[0] for r in runs]
        goals.equal(f"{label} judge: ok judgements per run", made, [2 * args.prompts] * len(runs))
    goal = "P3 CPU per judgement, client http (median over the rounds)"
    if args.profile:
        goals.not_measured(goal, "--profile: the profiler's own cost is in a run")
    elif (args.batch, args.latency) != (8, 0.0):
        goals.not_measured(goal, "--batch or --latency: these are not P3's images")
    else:
        per = [ms_per_judgement(r[1] + r[2], r[0]) for r in results["http"]]
        # A run that judged nothing measured nothing: the goal is missed, not the median of
        # the other runs.
        median = math.nan if any(math.isnan(ms) for ms in per) else statistics.median(per)
        goals.at_most(goal, median, 0.5, " ms")
    goals.finish()


if __name__ == "__main__":
    main()
