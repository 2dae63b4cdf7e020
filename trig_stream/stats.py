"""Live counters of a running engine and the cheap snapshot :meth:`Engine.stats` returns.

Counters are plain integers with one writer each (the event loop, or for dataset counts the
source's reader thread); a snapshot copies a few dozen numbers and
sorts at most :data:`LATENCY_WINDOW` latencies, so the TUI can poll it often.

A snapshot may be taken from another thread than the writers': it copies each deque and
dict of the counters in one step (``list(d)``, done in C under the interpreter lock, which no
writer can interleave) before it walks it. Walked live, a step of Python code at a time, a
deque the event loop appended to meanwhile raised "deque mutated during iteration".
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, TypeAlias

if TYPE_CHECKING:
    from trig_stream.records import Judgement

EngineState: TypeAlias = Literal[
    "starting", "running", "paused", "stopping", "stopped", "cancelled", "done", "failed"
]

LATENCY_WINDOW = 1024
"""Recent latencies kept per stage for the p50 / p95."""
RATE_WINDOW_S = 10.0
"""Throughput is measured over this many recent seconds."""
ERRORS_KEPT = 1000
"""Latest errors kept for the dashboard's errors view (a few hundred kB at most)."""


@dataclass(frozen=True, slots=True)
class BufferFill:
    """How full one bounded buffer between two stages is."""

    used: int
    size: int


@dataclass(frozen=True, slots=True)
class Latency:
    """Recent latencies of one stage, in seconds (None until something finished)."""

    p50: float | None
    p95: float | None
    count: int


@dataclass(frozen=True, slots=True)
class JudgeLoad:
    """Requests in flight at one judge, and its current limit."""

    in_flight: int
    limit: int
    waiting: int | None = None
    """Requests waiting at the server (vLLM's gauge), when the judge's load is polled."""


@dataclass(slots=True)
class ModelCounts:
    """Progress of one model (generator) through the stages."""

    queued: int = 0
    """Samples sent to the model's generation buffer."""
    to_judge: int = 0
    """Judgements the queued samples need (each judge asked about the dimensions it
    measures: two for a VLM judge, one or none for a metric's)."""
    skipped: int = 0
    """Samples whose every judgement was already in the journal."""
    dropped: int = 0
    """Queued samples a stop (graceful or hard) or a failure left ungenerated (no longer
    counted in ``queued``), or a stop left with judgements unasked."""
    left: int = 0
    """Images on disk (made or reused) whose every judgement a stop left unasked: still
    counted in ``queued``; a resume reuses them and asks their judgements."""
    generated: int = 0
    reused: int = 0
    """Images found valid on disk from an earlier run."""
    generation_failed: int = 0
    loading: bool = False
    """The model's generator is loading (its weights, for a pipeline)."""
    ok: int = 0
    unscorable: int = 0
    error: int = 0

    @property
    def judged(self) -> int:
        return self.ok + self.unscorable + self.error

    @property
    def samples_finished(self) -> float:
        """Samples with every judgement written: those an earlier run finished, and the
        queued ones' share of the judgements they need (the images a stop left unjudged
        need none in this run)."""
        share = self.judged / self.to_judge if self.to_judge else 0.0
        return self.skipped + (self.queued - self.left) * min(share, 1.0)


@dataclass(frozen=True, slots=True)
class EngineStats:
    """A snapshot of a run: counts per stage and status, buffers, throughput, latencies."""

    state: EngineState
    elapsed_s: float
    samples_total: int | None
    """Samples the run selects from the dataset; None until counted (in the background)."""
    samples_read: int
    quarantined: int
    models: dict[str, ModelCounts]
    buffers: dict[str, BufferFill]
    judges: dict[str, JudgeLoad]
    judgements_per_s: float
    images_per_s: float
    generation_latency: Latency
    judge_latency: Latency
    last_errors: tuple[str, ...]
    notes: tuple[str, ...] = ()
    """What backends reported at the end of their work (e.g. image files left unused)."""
    unmeasured: int = 0
    """Samples none of whose dimensions any judge measures: done, with nothing to do."""
    records_read: int = 0
    """Dataset records read so far, every kind (samples, quarantined, left out by the
    filters)."""
    opening: str | None = None
    """What the engine is opening (the run directory, a judge starting its server or loading
    its model), or None: while it starts, or while the run opens its judges late (it found no
    work left as it opened, and the dataset has grown since)."""
    closing: str | None = None
    """What the engine is closing once the run is over, when it may take a while (a judge
    stopping the server it started, given its grace period), or None."""

    @property
    def judged(self) -> int:
        """Judgements written in this run, every status."""
        return sum(m.judged for m in self.models.values())


@dataclass
class Counters:
    """The mutable side: what the engine's stages update."""

    started_at: float = field(default_factory=time.monotonic)
    """When the engine began to open (entering its ``async with`` block)."""
    ended_at: float | None = None
    """When the run ended (its results did), or the engine closed if it never ran; the
    elapsed time and the rates stop there."""
    samples_total: int | None = None
    samples_read: int = 0
    records_read: int = 0
    """Dataset records read so far, every kind."""
    dataset_read: bool = False
    """Whether the source read the dataset to its end (a stop can leave part of it)."""
    unmeasured: int = 0
    """Samples none of whose dimensions any judge measures (a metric judge's own ones)."""
    quarantined: int = 0
    models: dict[str, ModelCounts] = field(default_factory=dict)
    generation_latencies: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    judge_latencies: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    judged_at: deque[float] = field(default_factory=lambda: deque(maxlen=65536))
    generated_at: deque[float] = field(default_factory=lambda: deque(maxlen=65536))
    last_errors: deque[str] = field(default_factory=lambda: deque(maxlen=ERRORS_KEPT))
    notes: deque[str] = field(default_factory=lambda: deque(maxlen=100))

    def model(self, name: str) -> ModelCounts:
        return self.models.setdefault(name, ModelCounts())


class ErrorLines:
    """The lines of the last errors view, one per error judgement worth telling apart.

    Args:
        several_judges: the run has more than one judge: each line names the judge (the
            judgement's metric), or four judges' failures of one image read the same.

    A failed generation is recorded once per judge and dimension of its sample; only its
    first record makes a line (``flux-dev D-K_IQ-R_7: generation failed: ...``), or one
    failure filled the view with copies.
    """

    def __init__(self, *, several_judges: bool) -> None:
        self.several_judges = several_judges
        self._generations_told: set[tuple[str, str]] = set()
        """(model, data_id) of the failed generations told: a set of the failures only."""

    def line(self, judgement: Judgement) -> str | None:
        """The line telling ``judgement``'s error, or None when it is told already."""
        if judgement.error_stage == "generate":
            image = (judgement.model, judgement.data_id)
            if image in self._generations_told:
                return None
            self._generations_told.add(image)
            return f"{judgement.model} {judgement.data_id}: {judgement.error}"
        where = f"{judgement.model} {judgement.data_id} {judgement.dimension}"
        if self.several_judges:
            where += f" {judgement.metric}"
        return f"{where}: {judgement.error}"


def latency(values: deque[float]) -> Latency:
    """p50 and p95 of recent values (nearest rank)."""
    ordered = sorted(values)  # copied first, in C, in one step: a writer may append meanwhile
    if not ordered:
        return Latency(None, None, 0)
    last = len(ordered) - 1
    return Latency(ordered[round(0.5 * last)], ordered[round(0.95 * last)], len(ordered))


MIN_RATE_WINDOW_S = 0.5
"""The shortest span a rate is taken over (fewer events than that say little)."""


def rate(times: deque[float], now: float, since: float) -> float:
    """Events per second over the last :data:`RATE_WINDOW_S` seconds, or since ``since``
    (the start) when that is shorter."""
    window = max(MIN_RATE_WINDOW_S, min(RATE_WINDOW_S, now - since))
    cutoff = now - window
    count = 0
    for stamp in reversed(list(times)):  # a copy: walked live, an append meanwhile raised
        if stamp < cutoff:
            break
        count += 1
    return count / window
