"""What the dashboard draws: one immutable :class:`DashboardSnapshot`, and where it comes from.

The widgets render snapshots and nothing else. A :class:`SnapshotSource` makes them: from a
live :class:`~trig_stream.engine.Engine` (:class:`~trig_stream.tui.sources.EngineSource`),
from a run directory another process writes (:class:`~trig_stream.tui.sources.RunDirSource`),
or from fixed data (:class:`StaticSource`, for tests and demos). A source that can steer its
run also offers a :class:`RunControl`; a read-only one offers none.

This module imports no textual, so the command line can describe runs without it.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeAlias, TypeGuard

from trig_stream.analysis.relations import DTM
from trig_stream.dimensions import Dimension
from trig_stream.stats import MIN_RATE_WINDOW_S, RATE_WINDOW_S

SourceKind: TypeAlias = Literal["engine", "watch", "static"]

FINISHED_STATES = frozenset(
    ("done", "stopped", "cancelled", "failed", "ended", "finished", "not running")
)
"""States after which a run makes no more progress. ``ended``: the results stream ended
without the engine saying why yet (a fatal error); ``finished``: the watched run's writer is
gone."""
CLEAN_END_STATES = frozenset(("done", "stopped", "finished", "not running"))
"""Finished states worth keeping on screen; after the others the app closes at once."""

HISTORY_POINTS = 60
"""Throughput points kept for the sparklines (one a second: the last minute)."""


@dataclass(frozen=True, slots=True)
class ModelProgress:
    """One model's progress through the stages; None where the source cannot know it.

    Samples (``queued``, ``generating``, ``skipped``) and images (``images``, ``judging``,
    ``left``) are counted per sample; ``ok``, ``unscorable`` and ``error`` count judgements.
    ``images``, like those, counts what the view sees judged: the run's own work live, the
    whole journal in ``watch``.
    """

    name: str
    queued: int | None = None
    """Samples sent to the model's generator."""
    generating: int | None = None
    """Samples queued or being generated, with no image yet."""
    images: int | None = None
    """Images with at least one judgement written (generated or reused)."""
    judging: int | None = None
    """Images made (generated or reused) and waiting for their first judgement."""
    generation_failed: int | None = None
    skipped: int | None = None
    """Samples whose every judgement was already in the journal."""
    ok: int = 0
    unscorable: int = 0
    error: int = 0
    left: int | None = None
    """Images on disk whose judgements a stop left unasked: a resume judges them."""

    @property
    def judged(self) -> int:
        """Judgements of every status."""
        return self.ok + self.unscorable + self.error


@dataclass(frozen=True, slots=True)
class Gauge:
    """How full something bounded is: a buffer between stages."""

    name: str
    used: int
    size: int


@dataclass(frozen=True, slots=True)
class JudgeView:
    """One judge: where it sends requests and how loaded it is (None: not visible)."""

    name: str
    backend: str
    endpoints: tuple[str, ...] = ()
    in_flight: int | None = None
    limit: int | None = None
    waiting: int | None = None
    """Requests queued at the server, when the engine reports it."""
    adaptive: bool = False
    """Whether its limit moves (``[judges.adaptive]``): without a live ``limit``, its
    configured ``concurrency`` is only where the limit started."""
    limit_range: tuple[int, int] | None = None
    """The bounds (``min``, ``max``) of an adaptive limit, when the config says them."""


@dataclass(frozen=True, slots=True)
class RelationView:
    """The live relation analysis of one (model, metric): dimension means and the DTM."""

    model: str
    metric: str
    means: Mapping[Dimension, float]
    counts: Mapping[Dimension, int]
    dtm: DTM


@dataclass(frozen=True, slots=True)
class DashboardSnapshot:
    """Everything the dashboard shows at one moment."""

    kind: SourceKind
    run_name: str
    task: str
    run_dir: str
    state: str
    elapsed_s: float | None = None
    samples_total: int | None = None
    samples_done: int | None = None
    """Samples whose judgements are all written (each model's share of the judgements its
    samples need, averaged over the models): what the ETA counts, the same in ``run`` and
    ``watch``. Reading the dataset runs ahead of it by the buffers."""
    eta_s: float | None = None
    models: tuple[ModelProgress, ...] = ()
    buffers: tuple[Gauge, ...] = ()
    judges: tuple[JudgeView, ...] = ()
    judgements_per_s: float | None = None
    images_per_s: float | None = None
    judgements_history: tuple[float, ...] = ()
    images_history: tuple[float, ...] = ()
    generation_p50: float | None = None
    generation_p95: float | None = None
    judge_p50: float | None = None
    judge_p95: float | None = None
    relations: tuple[RelationView, ...] = ()
    last_errors: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    quarantined: int | None = None
    loading: tuple[str, ...] = ()
    """Models whose generator is loading (its weights): nothing else moves meanwhile."""
    opening: str | None = None
    """What the engine opens while the run is under way (a judge opened late, loading its
    model or starting its server: nothing is judged meanwhile), or None."""
    message: str = ""
    """A line from the source itself (e.g. who writes the run being watched)."""
    alerts: tuple[str, ...] = ()
    """Short forms of the message's warnings (``3 bad journal lines skipped``), for the status
    line: the run panel, where the message is, cuts it on a narrow terminal."""

    @property
    def finished(self) -> bool:
        """True once the run makes no more progress."""
        return self.state in FINISHED_STATES

    @property
    def judged(self) -> int:
        """Judgements of every model and status."""
        return sum(m.judged for m in self.models)


class RunControl(Protocol):
    """Steering a run: what the dashboard's keys call."""

    @property
    def paused(self) -> bool:
        """Whether the run is paused now (not as of the last snapshot)."""

    def pause(self) -> None:
        """Stop feeding new samples."""

    def resume(self) -> None:
        """Feed new samples again."""

    def stop(self) -> None:
        """Finish the work in flight, start none."""

    def cancel(self) -> None:
        """Stop now; what is written stays (resumable)."""


class SnapshotSource(Protocol):
    """Where a dashboard gets its snapshots."""

    @property
    def control(self) -> RunControl | None:
        """How to steer the run, or None when the source is read-only."""
        ...

    async def snapshot(self) -> DashboardSnapshot:
        """The state of the run now (cheap; called a few times a second)."""
        ...


@dataclass
class StaticSource:
    """A source that always returns the same snapshot (tests, demos, screenshots)."""

    fixed: DashboardSnapshot
    control: RunControl | None = None

    async def snapshot(self) -> DashboardSnapshot:
        """The fixed snapshot."""
        return self.fixed


@dataclass
class RateHistory:
    """Throughput points sampled at most once per ``every_s``, for the sparklines."""

    every_s: float = 1.0
    points: int = HISTORY_POINTS
    _values: deque[float] = field(init=False)
    _last: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self._values = deque(maxlen=self.points)

    def add(self, now: float, value: float) -> None:
        """Record ``value`` unless the previous point is more recent than ``every_s``."""
        if self._last is None or now - self._last >= self.every_s:
            self._last = now
            self._values.append(value)

    def values(self) -> tuple[float, ...]:
        """The recorded points, oldest first."""
        return tuple(self._values)


@dataclass
class CountRate:
    """Events per second from a growing count, over a sliding window of samples.

    As :func:`trig_stream.stats.rate`, the span is never taken shorter than
    :data:`~trig_stream.stats.MIN_RATE_WINDOW_S`: one group commit seen 3 ms after the
    previous look is 4 judgements in half a second, not 1333 a second.
    """

    window_s: float = RATE_WINDOW_S
    min_span_s: float = MIN_RATE_WINDOW_S
    _samples: deque[tuple[float, int]] = field(default_factory=deque, init=False)

    def add(self, now: float, count: int) -> float:
        """Record the count at ``now`` and return the rate over the window."""
        self._samples.append((now, count))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window_s:
            self._samples.popleft()
        first_at, first = self._samples[0]
        return (count - first) / max(now - first_at, self.min_span_s)


def estimate_eta(total: int | None, done: int | None, per_s: float) -> float | None:
    """Seconds left at ``per_s`` samples a second; None when it cannot be told."""
    if total is None or done is None:
        return None
    left = max(total - done, 0)
    if left == 0:
        return 0.0
    if per_s <= 0 or math.isnan(per_s):
        return None
    return left / per_s


def judge_views(config: Mapping[str, Any]) -> tuple[JudgeView, ...]:
    """The judges of a run config (as a dict, e.g. from a manifest), endpoints included.

    A manifest is a file: what it holds is checked, and an entry of another shape than a
    config's (edited by hand, say) is shown as far as it can be, or left out, never a crash.
    """
    judges = config.get("judges")
    if not isinstance(judges, list):
        return ()
    views = []
    for judge in judges:
        if not isinstance(judge, Mapping):
            continue
        options = judge.get("options")
        if not isinstance(options, Mapping):
            options = {}
        endpoints: list[str] = []
        if options.get("base_url"):
            endpoints.append(str(options["base_url"]))
        base_urls = options.get("base_urls")
        if isinstance(base_urls, list):
            endpoints.extend(str(url) for url in base_urls)
        if not endpoints and options.get("serve"):
            endpoints.append("managed server")
        limit = judge.get("concurrency")
        adaptive = judge.get("adaptive")
        if not isinstance(adaptive, Mapping):
            adaptive = {}
        moves = adaptive.get("enabled") is True
        low, high = adaptive.get("min"), adaptive.get("max")
        views.append(
            JudgeView(
                name=str(judge.get("name", "?")),
                backend=str(judge.get("backend", "?")),
                endpoints=tuple(endpoints),
                # An adaptive judge's concurrency is only its starting limit: no limit now.
                limit=limit if _count(limit) and not moves else None,
                adaptive=moves,
                limit_range=(low, high) if moves and _count(low) and _count(high) else None,
            )
        )
    return tuple(views)


def _count(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)
