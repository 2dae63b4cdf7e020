"""The snapshot source of a live engine, and the relation views both live sources share.

:class:`EngineSource` reads :meth:`Engine.stats` (a cheap copy of a few dozen counters) on
every refresh, and the engine's :class:`~trig_stream.analysis.live.RelationTracker` at most
once per ``relations_every_s``: a DTM snapshot of 100k judgements costs ~15 ms, so it runs in
a worker thread and never holds the event loop the pipeline runs on.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field

import anyio
from pydantic import BaseModel

from trig_stream.analysis.live import RelationTracker
from trig_stream.analysis.relations import AnalysisKey
from trig_stream.backends.registry import backend_name_of
from trig_stream.engine import Engine
from trig_stream.records import Judgement
from trig_stream.stats import EngineStats, ModelCounts
from trig_stream.string_index import StringIndex
from trig_stream.tui.snapshot import (
    FINISHED_STATES,
    CountRate,
    DashboardSnapshot,
    Gauge,
    JudgeView,
    ModelProgress,
    RateHistory,
    RelationView,
    estimate_eta,
    judge_views,
)

RELATIONS_EVERY_S = 1.0
"""Least time between two relation analyses (DTM and means) of a live run."""


def relation_views(
    tracker: RelationTracker, groups: Sequence[AnalysisKey]
) -> tuple[RelationView, ...]:
    """Analyse each (model, metric) group of ``tracker``; may run in a worker thread.

    Judgements keep arriving meanwhile: the tracker copies each pair's columns before it
    analyses them, and a group that cannot be read this time is simply left for the next.
    """
    views = []
    for model, metric in groups:
        try:
            analysis = tracker.analysis(model, metric)
        except Exception:  # a group caught mid-update: the next refresh draws it
            continue
        views.append(
            RelationView(
                model, metric, analysis.dimension_means, analysis.dimension_counts, analysis.dtm
            )
        )
    return tuple(views)


def engine_judge_views(engine: Engine) -> tuple[JudgeView, ...]:
    """The views of the judges ``engine`` runs, in its order.

    A judge the config describes (same name, same backend) is shown as its entry is; one
    passed in otherwise is shown from the instance: its backend's name (else its class's),
    the endpoints its options name, and its concurrency.
    """
    entries = {view.name: view for view in judge_views(engine.config.model_dump(mode="json"))}
    views = []
    for judge in engine.judges:
        backend = backend_name_of("judges", judge) or type(judge).__name__
        entry = entries.get(judge.name)
        if entry is not None and entry.backend == backend:
            views.append(entry)
            continue
        options = getattr(judge, "options", None)  # set by Judge.__init__, if called
        table: dict[str, object] = {}
        if isinstance(options, BaseModel):
            with suppress(ValueError):  # an option JSON has no form for: no endpoints shown
                table = options.model_dump(mode="json")
        described = {
            "name": judge.name,
            "backend": backend,
            "concurrency": judge.concurrency,
            "options": table,
        }
        views.extend(judge_views({"judges": [described]}))
    return tuple(views)


@dataclass
class EngineControl:
    """Steers an engine for the dashboard, remembering a hard stop was asked for."""

    engine: Engine
    cancel_requested: bool = field(default=False, init=False)

    @property
    def paused(self) -> bool:
        """Whether the engine is paused now."""
        return self.engine.paused

    def pause(self) -> None:
        """Stop feeding new samples."""
        self.engine.pause()

    def resume(self) -> None:
        """Feed new samples again."""
        self.engine.resume()

    def stop(self) -> None:
        """Finish the work in flight, start none."""
        self.engine.stop()

    def cancel(self) -> None:
        """Stop now (resumable)."""
        self.cancel_requested = True
        self.engine.cancel()


class EngineSource:
    """Snapshots of an engine this process runs.

    Call :meth:`observe` with each judgement read from ``engine.results`` (as
    :func:`~trig_stream.tui.run.run_dashboard` does) to get the per-model count of images
    waiting for a judgement; without it that column shows as unknown. Call :meth:`end` once
    ``results`` is exhausted.

    Args:
        engine: the engine, entered (``async with``) by its owner.
        relations_every_s: least time between two relation analyses.
        clock: monotonic seconds (tests pass a fake one).
    """

    def __init__(
        self,
        engine: Engine,
        *,
        relations_every_s: float = RELATIONS_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = engine
        self.engine_control = EngineControl(engine)
        self.control: EngineControl | None = self.engine_control
        self.relations_every_s = relations_every_s
        self._clock = clock
        # The engine's own backends, which may be instances passed in rather than the
        # config's entries (those showed as a model at 0 for ever and a judge never used).
        self._models = [generator.name for generator in engine.generators]
        self._judges = engine_judge_views(engine)
        self._judgements = RateHistory()
        self._images = RateHistory()
        self._samples = CountRate()
        self._relations: tuple[RelationView, ...] = ()
        self._relations_at: float | None = None
        self._relations_final = False
        # Per model, the images with a judgement: compact, as a run may have 100k of them.
        self._images_judged: dict[str, StringIndex] | None = None
        self.ended = False
        """``results`` has been exhausted."""

    def observe(self, judgement: Judgement) -> None:
        """Take note of a judgement from ``results`` (for the per-model judging count)."""
        if self._images_judged is None:
            self._images_judged = {}
        if judgement.error_stage != "generate":
            judged = self._images_judged.get(judgement.model)
            if judged is None:
                judged = self._images_judged[judgement.model] = StringIndex()
            judged.add(judgement.data_id)

    def end(self) -> None:
        """Say that ``results`` is exhausted: the run makes no more progress."""
        self.ended = True

    @staticmethod
    def _measured_samples_done(stats: EngineStats) -> int:
        # Reading runs ahead of judging by the buffers, so the ETA counts samples whose
        # judgements are written, or that an earlier run finished, averaged over the models.
        models = stats.models.values()
        return int(sum(m.samples_finished for m in models) / len(models)) if models else 0

    @staticmethod
    def _eta(
        state: str, finished: bool, total: int | None, done: int, per_s: float
    ) -> float | None:
        if finished:
            return 0.0
        if state in ("paused", "stopping", "cancelling"):
            # Nothing new starts: no end to foresee from the dataset (a pause counted down, a
            # graceful stop said minutes where it ended within a second).
            return None
        return estimate_eta(total, done, per_s)

    async def snapshot(self) -> DashboardSnapshot:
        """The engine's state now; the relation views are at most ``relations_every_s`` old."""
        stats = self.engine.stats()
        now = self._clock()
        state = self._state(stats)
        finished = state in FINISHED_STATES or self.ended
        if not finished:  # the rates of an ended run stay as they were: no more points
            self._judgements.add(now, stats.judgements_per_s)
            self._images.add(now, stats.images_per_s)
        measured = self._measured_samples_done(stats)
        # The samples no judge measures are done too, with nothing to wait for (as a watcher
        # counts them), but not in the rate: they are done as they are read, far ahead of the
        # judging (the ETA was 5x too short).
        finished_samples = measured + stats.unmeasured
        samples_per_s = self._samples.add(now, measured)
        await self._refresh_relations(now, final=finished)
        config = self.engine.config
        return DashboardSnapshot(
            kind="engine",
            run_name=config.run.name,
            task=config.run.task,
            run_dir=str(self.engine.run_dir_path),
            state=state,
            elapsed_s=stats.elapsed_s,
            samples_total=stats.samples_total,
            samples_done=finished_samples,
            eta_s=self._eta(state, finished, stats.samples_total, finished_samples, samples_per_s),
            models=tuple(self._progress(name, stats) for name in self._model_names(stats)),
            buffers=tuple(Gauge(n, b.used, b.size) for n, b in stats.buffers.items()),
            judges=self._judge_views(stats),
            judgements_per_s=stats.judgements_per_s,
            images_per_s=stats.images_per_s,
            judgements_history=self._judgements.values(),
            images_history=self._images.values(),
            generation_p50=stats.generation_latency.p50,
            generation_p95=stats.generation_latency.p95,
            judge_p50=stats.judge_latency.p50,
            judge_p95=stats.judge_latency.p95,
            relations=self._relations,
            last_errors=stats.last_errors,
            notes=stats.notes,
            loading=tuple(name for name, m in stats.models.items() if m.loading),
            opening=stats.opening,
            quarantined=stats.quarantined,
        )

    def _state(self, stats: EngineStats) -> str:
        if stats.state in FINISHED_STATES:
            return stats.state
        if self.engine_control.cancel_requested:
            return "cancelling"
        return "ended" if self.ended else stats.state

    async def _refresh_relations(self, now: float, *, final: bool) -> None:
        due = self._relations_at is None or now - self._relations_at >= self.relations_every_s
        if not (due or (final and not self._relations_final)):
            return
        self._relations_at = now
        self._relations_final = final
        tracker = self.engine.relations
        groups = tracker.groups()
        if groups:
            self._relations = await anyio.to_thread.run_sync(relation_views, tracker, groups)

    def _model_names(self, stats: EngineStats) -> list[str]:
        return self._models + [name for name in stats.models if name not in self._models]

    def _progress(self, name: str, stats: EngineStats) -> ModelProgress:
        counts = stats.models.get(name) or ModelCounts()
        made = counts.generated + counts.reused
        # "images" counts the images with a judgement, as `watch` does from the journal; the
        # made ones wait in "judging", or, a stop having left them unasked, in "left".
        images = judging = None
        if self._images_judged is not None:
            images = len(self._images_judged.get(name, ()))
            judging = max(made - images - counts.left, 0)
        return ModelProgress(
            name=name,
            queued=counts.queued,
            generating=max(counts.queued - made - counts.generation_failed, 0),
            images=images,
            judging=judging,
            left=counts.left,
            generation_failed=counts.generation_failed,
            skipped=counts.skipped,
            ok=counts.ok,
            unscorable=counts.unscorable,
            error=counts.error,
        )

    def _judge_views(self, stats: EngineStats) -> tuple[JudgeView, ...]:
        views = []
        for view in self._judges:
            load = stats.judges.get(view.name)
            if load is None:
                views.append(view)
                continue
            waiting = getattr(load, "waiting", None)
            views.append(
                JudgeView(
                    view.name,
                    view.backend,
                    view.endpoints,
                    load.in_flight,
                    load.limit,
                    waiting if isinstance(waiting, int) else None,
                )
            )
        return tuple(views)
