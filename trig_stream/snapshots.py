"""Snapshots of a run: what :meth:`Engine.stats <trig_stream.engine.Engine.stats>` and
:meth:`Engine.summary <trig_stream.engine.Engine.summary>` return.

Both are read from the engine's counters, buffers and judge limiters without waiting for
anything: a dashboard asks for them several times a second. Once the run has ended, its
clock has stopped: the elapsed time and the rates stay as they were at the end.

Both may be called from any thread, the event loop's or another (a GUI's): each deque and
dict of the counters is copied in one step before it is walked (see :mod:`trig_stream.stats`).
A snapshot taken from another thread may mix counts a moment apart (a judgement counted,
its latency not yet), never raise.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectSendStream

from trig_stream.concurrency import ConcurrencyController
from trig_stream.records import printable
from trig_stream.stats import (
    BufferFill,
    Counters,
    EngineState,
    EngineStats,
    JudgeLoad,
    latency,
    rate,
)


@dataclass(frozen=True, slots=True)
class RunSummary:
    """What :meth:`Engine.drain` returns: the final state and counts of this run."""

    state: EngineState
    judged: int
    ok: int
    unscorable: int
    error: int
    quarantined: int
    run_dir: Path
    left_to_judge: int = 0
    """Images on disk a stop left with no judgement asked: a resume judges them."""


def engine_stats(
    state: EngineState,
    counters: Counters,
    *,
    buffers: Mapping[str, MemoryObjectSendStream[Any]],
    limiters: Mapping[str, anyio.CapacityLimiter],
    controllers: Mapping[str, ConcurrencyController],
    opening: str | None,
    closing: str | None = None,
) -> EngineStats:
    """A cheap snapshot of progress, buffers, throughput and latencies.

    Args:
        state: the engine's state.
        counters: the run's counters.
        buffers: the send ends of the buffers between the stages, by name.
        limiters: each judge's limit on requests in flight, by judge name.
        controllers: the adaptive limits of the judges that have one, by judge name.
        opening: what the engine is opening (while it starts, or as its judges open late).
        closing: what the engine is closing once the run is over, if that may take a while.
    """
    c = counters
    now = c.ended_at or time.monotonic()
    fills = {
        name: BufferFill(
            stream.statistics().current_buffer_used, int(stream.statistics().max_buffer_size)
        )
        for name, stream in list(buffers.items())
    }
    judges = {
        name: JudgeLoad(
            limiter.borrowed_tokens,
            int(limiter.total_tokens),
            controllers[name].waiting if name in controllers else None,
        )
        for name, limiter in list(limiters.items())
    }
    return EngineStats(
        state=state,
        elapsed_s=now - c.started_at,
        samples_total=c.samples_total,
        samples_read=c.samples_read,
        quarantined=c.quarantined,
        records_read=c.records_read,
        unmeasured=c.unmeasured,
        # Copied in one step before they are walked: the snapshot may come from another
        # thread, and the event loop adds a model's counts as it first meets the model.
        models={name: replace(m) for name, m in list(c.models.items())},
        buffers=fills,
        judges=judges,
        judgements_per_s=rate(c.judged_at, now, c.started_at),
        images_per_s=rate(c.generated_at, now, c.started_at),
        generation_latency=latency(c.generation_latencies),
        judge_latency=latency(c.judge_latencies),
        last_errors=tuple(c.last_errors),
        notes=tuple(printable(note) for note in list(c.notes)),  # exceptions' texts too
        opening=opening,
        closing=closing,
    )


def run_summary(state: EngineState, counters: Counters, run_dir: Path) -> RunSummary:
    """Counts of a run so far: its ``state``, its ``counters``' totals and its ``run_dir``."""
    models = list(counters.models.values())  # one step: it may come from another thread
    return RunSummary(
        state=state,
        judged=sum(m.judged for m in models),
        ok=sum(m.ok for m in models),
        unscorable=sum(m.unscorable for m in models),
        error=sum(m.error for m in models),
        quarantined=counters.quarantined,
        run_dir=run_dir,
        left_to_judge=sum(m.left for m in models),
    )
