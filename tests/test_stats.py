"""The snapshots :meth:`Engine.stats` and :meth:`Engine.summary` return, taken while the
counters change under them (from another thread than the event loop's)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import trig_stream.snapshots
import trig_stream.stats
from trig_stream.snapshots import engine_stats, run_summary
from trig_stream.stats import Counters

SNAPSHOT_FILES = frozenset({trig_stream.snapshots.__file__, trig_stream.stats.__file__})


@contextmanager
def between_every_line(mutate: Callable[[], None]) -> Iterator[None]:
    """Run ``mutate`` before every line of the snapshot modules' code: what a writer in
    another thread may do wherever the interpreter switches threads, made certain."""

    def local(frame: FrameType, event: str, arg: Any) -> Any:
        if event == "line":
            mutate()  # a trace function is not traced itself
        return local

    def calls(frame: FrameType, event: str, arg: Any) -> Any:
        return local if frame.f_code.co_filename in SNAPSHOT_FILES else None

    before = sys.gettrace()
    sys.settrace(calls)
    try:
        yield
    finally:
        sys.settrace(before)


def test_a_snapshot_taken_while_the_counters_change_never_walks_them_live() -> None:
    # From another thread, Engine.stats() raised "deque mutated during iteration" now and
    # then (2 calls in ~50k): rate() walked the live deque of times, a line at a time, while
    # the event loop appended to it.
    counters = Counters()
    now = time.monotonic()
    counters.started_at = now - 1.0
    for deque_ in (counters.judged_at, counters.generated_at):
        deque_.extend([now] * 20)
    for deque_ in (counters.generation_latencies, counters.judge_latencies):
        deque_.extend([0.5] * 20)
    counters.last_errors.extend(["an error"] * 5)
    counters.notes.extend(["a note"] * 5)
    for name in ("a", "b", "c"):
        counters.model(name).ok = 2
    added = iter(range(10**9))

    def write() -> None:  # what the engine's stages do to the counters
        counters.judged_at.append(time.monotonic())
        counters.generated_at.append(time.monotonic())
        counters.generation_latencies.append(0.25)
        counters.judge_latencies.append(0.25)
        counters.last_errors.append("another error")
        counters.notes.append("another note")
        counters.model(f"model {next(added)}").ok = 1

    with between_every_line(write):
        stats = engine_stats(
            "running", counters, buffers={}, limiters={}, controllers={}, opening=None
        )
        summary = run_summary("running", counters, Path("run"))
    assert stats.judgements_per_s > 0
    assert stats.judge_latency.count >= 20
    assert {"a", "b", "c"} <= set(stats.models)
    assert summary.ok >= 6
