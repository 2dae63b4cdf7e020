"""The streaming evaluation engine.

One task group runs four stages joined by bounded memory streams::

    source ──samples──▶ generate (threads, per model) ──images──▶ judge (concurrent requests)
                                                                      │
    results ◀──durable judgements── persist (journal, fsync) ◀──judgements

* **source** (:mod:`trig_stream.sourcing`) reads the dataset in a worker thread, sets
  malformed records aside, and queues, for each model, the samples that still have a
  judgement to make (on resume, the journal says which).
* **generate** (:mod:`trig_stream.generation`) runs each model's generator in worker
  threads (``workers`` of them), taking whatever is ready up to ``batch_size`` without
  waiting for a full batch, and writes each image atomically before passing its path on. A
  valid image from an earlier run is reused.
* **judge** (:mod:`trig_stream.judging`) prepares each image once per judge and asks one
  question per dimension, at most ``concurrency`` at a time per judge, retrying transient
  failures under the retry policy.
* **persist** (here) appends whatever judgements have landed to the journal and fsyncs once
  for them all (group commit), shielded from cancellation, and only then hands them to
  ``results``.

Each bound caps memory and work in flight: a full buffer makes the stage before it wait,
all the way back to the dataset reader, so a run of any size holds the same amount in memory.
"""

from __future__ import annotations

import resource
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import anyio
import anyio.from_thread
import anyio.lowlevel
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from trig_stream.analysis.live import RelationTracker
from trig_stream.backends.base import Generator, Judge, call_in_thread, reads_source_images
from trig_stream.backends.registry import build_generator, build_judge, check_backends
from trig_stream.config import RunConfig
from trig_stream.dataset import DatasetSource
from trig_stream.errors import ConfigError, FatalBackendError, TrigStreamError, leaf_errors
from trig_stream.generation import GenerationStage
from trig_stream.journal import JournalState, read_journal
from trig_stream.judging import JudgeStage
from trig_stream.pipeline import (
    ImageItem,
    RunContext,
    WorkItem,
    describe_error,
    send_now,
    take_ready,
)
from trig_stream.records import JudgeFingerprint, Judgement
from trig_stream.retry import RetryPolicy
from trig_stream.sourcing import SourceStage
from trig_stream.stats import (
    BufferFill,
    Counters,
    EngineState,
    EngineStats,
    JudgeLoad,
    latency,
    rate,
)
from trig_stream.store import Manifest, RunDir, as_json, next_free_run_dir

FILES_BESIDE_CONNECTIONS = 256
"""Open files the engine's process may need besides its judges' connections: the journal,
image writes, libraries, a generator's child processes..."""
PERSIST_BATCH = 256
"""Most judgements written with one fsync."""
HISTORY_CHUNK = 2048
"""Earlier judgements parsed per worker-thread call when the live analysis catches up."""

T = TypeVar("T")


_backends_in_use: dict[int, Engine] = {}
"""The generator and judge instances an open engine uses (by id; each alive while in use),
with the engine: one passed to a second engine at once would be loaded (or opened)
twice and closed under the other's feet by the first to end."""
_backends_in_use_lock = threading.Lock()  # engines may run in several threads' event loops


@dataclass(frozen=True, slots=True)
class _Streams:
    """The bounded buffers between the stages, as (send, receive) pairs."""

    samples: dict[str, tuple[MemoryObjectSendStream[WorkItem], MemoryObjectReceiveStream[WorkItem]]]
    images: tuple[MemoryObjectSendStream[ImageItem], MemoryObjectReceiveStream[ImageItem]]
    judgements: tuple[MemoryObjectSendStream[Judgement], MemoryObjectReceiveStream[Judgement]]
    results: tuple[MemoryObjectSendStream[Judgement], MemoryObjectReceiveStream[Judgement]]


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


def run_manifest(
    config: RunConfig,
    generators: Sequence[Generator],
    judges: Mapping[str, JudgeFingerprint],
    *,
    retry_errors: bool = False,
) -> Manifest:
    """The manifest a run of ``config`` with these generators and judges' fingerprints (by
    name) writes in its run directory, and compares with the one stored there;
    ``retry_errors``: whether the run asks again the ``error`` judgements."""
    return Manifest(
        run_name=config.run.name,
        task=config.run.task,
        retry_errors=retry_errors,
        generators={
            g.name: as_json(
                {**_fingerprint(g), "seed": config.run.seed},
                f"the fingerprint of generator {g.name!r}",
            )
            for g in generators
        },
        judges={name: fp.model_dump(mode="json") for name, fp in judges.items()},
        config=config.model_dump(mode="json"),
    )


def ensure_open_files(
    config: RunConfig, judges: Sequence[Judge], *, raise_limit: bool = True
) -> None:
    """Make sure this process may open the files a run of ``config`` with these ``judges``
    needs: each request in flight of an HTTP judge holds a socket, so with a high
    concurrency the soft open-file limit (often 1024) is raised toward what the judges need,
    up to the hard limit; past that the run would fail mid-way ("Too many open files").

    Args:
        raise_limit: False (``validate``): only read the limits, and refuse what the run,
            raising the soft limit as far as the hard one, would refuse.

    Raises:
        ConfigError: the judges may need more files than the hard limit allows.
    """
    adaptive = {entry.name: entry.adaptive for entry in config.judges}
    needs = {}
    for judge in judges:
        policy = adaptive.get(judge.name)
        in_flight = judge.concurrency  # adaptive: the starting limit, or its max if more
        if policy is not None and policy.enabled:
            in_flight = max(in_flight, policy.max)
        needs[judge.name] = judge.connections(in_flight)
    needed = sum(needs.values())
    if not needed:
        return
    wanted = needed + FILES_BESIDE_CONNECTIONS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if wanted <= soft:
        return
    limit = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if raise_limit:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    if limit < wanted:
        detail = ", ".join(f"{name} {count}" for name, count in needs.items() if count)
        raise ConfigError(
            f"the judges may hold {needed} connections at once ({detail}), but this "
            f"process may open only {hard} files (the hard limit, `ulimit -Hn`), and needs "
            f"~{FILES_BESIDE_CONNECTIONS} besides: lower their concurrency (or adaptive "
            "max), or raise the limit"
        )


def _fingerprint(generator: Generator) -> dict[str, Any]:
    """``generator.fingerprint()``, or the error that names it when it has none to give."""
    fingerprint: dict[str, Any] = _checked_fingerprint(
        generator, dict, "a dict of the settings that change its images"
    )
    return fingerprint


def judge_fingerprint(judge: Judge) -> JudgeFingerprint:
    """``judge.fingerprint()``, or the error that names the judge when it has none to give.

    Raises:
        FatalBackendError: it raised (see :func:`check_environment`), or returned no
            :class:`~trig_stream.records.JudgeFingerprint`.
    """
    fingerprint: JudgeFingerprint = _checked_fingerprint(
        judge, JudgeFingerprint, "a JudgeFingerprint"
    )
    return fingerprint


def _checked_fingerprint(backend: Generator | Judge, kind: type, wanted: str) -> Any:
    fingerprint = _backend_call(backend, "fingerprint()", backend.fingerprint)
    if not isinstance(fingerprint, kind):
        raise FatalBackendError(
            f"{backend_label(backend)} is broken: fingerprint() returned an object of type "
            f"{type(fingerprint).__name__}, not {wanted}"
        )
    return fingerprint


def check_environment(backend: Generator | Judge) -> None:
    """``backend.check_environment()``: what it needs from this machine, seen before anything
    loads (``run`` and ``validate`` both make the check).

    Raises:
        TrigStreamError: what the check found missing, as the backend raised it.
        FatalBackendError: it raised another exception (a third-party backend's bug, a file
            it could not read): one error that names the backend and that exception, not a
            traceback.
    """
    _backend_call(backend, "check_environment()", backend.check_environment)


def backend_label(backend: Generator | Judge) -> str:
    """How messages name a backend: ``generator 'flux'``, ``judge 'trigscore'``."""
    kind = "generator" if isinstance(backend, Generator) else "judge"
    return f"{kind} {backend.name!r}"


def _backend_call(backend: Generator | Judge, call: str, method: Callable[[], T]) -> T:
    """``method()``, with an exception it was not meant to raise turned into the error that
    stops the run, named with the backend and ``call`` ("fingerprint()")."""
    try:
        return method()
    except TrigStreamError:
        raise
    except OSError as exc:  # this machine's: a file it cannot read, a folder not there
        raise FatalBackendError(
            f"{backend_label(backend)}: {call} failed: {describe_error(exc)}; fix what it "
            "names, then run the same command again"
        ) from exc
    except Exception as exc:  # a backend's bug: one message, not a traceback
        raise FatalBackendError(
            f"{backend_label(backend)} is broken: {call} raised {describe_error(exc)} (a fault "
            "of its code or a library it uses: fix it, or report it to its authors)"
        ) from exc


class Engine:
    """Evaluates a TRIG run as a stream; an async context manager.

    Example::

        async with Engine(config) as engine:
            async for judgement in engine.results:
                print(judgement.data_id, judgement.dimension, judgement.score)

    Leaving the ``async with`` block before ``results`` is exhausted cancels the work still
    in flight; everything already written stays, and running again resumes from there.

    Args:
        config: the validated run config.
        generators: generator instances to use instead of building them from the config.
        judges: judge instances to use instead of building them from the config.
        retry_errors: ask again the judgements whose status is ``error``.
        new_run: when the run directory already holds results, start a fresh one beside it
            (``<name>-2``, ...) instead of resuming.
        sleep: the sleep used for retry backoff and between a judge's server-load polls
            (tests inject a fake clock).
        retry_policy: overrides the policy from ``[engine]``.
    """

    def __init__(
        self,
        config: RunConfig,
        *,
        generators: Sequence[Generator] | None = None,
        judges: Sequence[Judge] | None = None,
        retry_errors: bool = False,
        new_run: bool = False,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        retry_policy: RetryPolicy | None = None,
    ) -> None:
        self.config = config
        if generators is None:
            generators = [build_generator(g, config) for g in config.generators]
        if judges is None:
            judges = [build_judge(j, config) for j in config.judges]
        check_backends(generators, judges)
        self._generators = list(generators)
        self._judges = list(judges)
        self._retry_errors = retry_errors
        self._new_run = new_run
        self._sleep = sleep
        engine = config.engine
        self._retry = retry_policy or RetryPolicy(
            engine.max_attempts, engine.backoff_initial, engine.backoff_max
        )
        self._counters = Counters()
        self._state: EngineState = "starting"
        try:
            anyio.get_current_task()  # its events and cancel scopes belong to a running loop
        except anyio.NoEventLoopError:
            raise RuntimeError(
                "an Engine is made inside the async code that runs it (under anyio.run or "
                "asyncio.run, e.g. `async with Engine(config) as engine:`), not before it"
            ) from None
        # The loop the engine belongs to (its events and cancel scopes are that loop's):
        # stop(), cancel(), pause() and resume() called from another thread run there.
        self._loop_token = anyio.lowlevel.current_token()
        self._loop_thread = threading.get_ident()
        self._running_gate = anyio.Event()
        self._running_gate.set()
        self._cancel_generation = threading.Event()
        # The stops as events the stages can wait on (their waits end with them).
        self._stop_event = anyio.Event()
        self._cancel_event = anyio.Event()
        self._fingerprints: dict[str, JudgeFingerprint] = {}
        self._limiters: dict[str, anyio.CapacityLimiter] = {}
        self._buffers: dict[str, MemoryObjectSendStream[Any]] = {}
        self._task_group: TaskGroup | None = None
        self._work = anyio.CancelScope()
        """Where the run's tasks run: :meth:`cancel` cancels it, and not the caller's block."""
        self._paused = False
        self._opening = anyio.CancelScope()
        """Where the backends open and the run directory is read: :meth:`cancel` reaches it."""
        self._opening_now: str | None = None
        self._judging: JudgeStage | None = None
        self._run_dir: RunDir | None = None
        self._journal_state = JournalState()
        self.relations = RelationTracker(config.relation)
        """The live relation analysis (pair statistics, DTM) of every judgement in the run,
        earlier runs included; it updates as judgements become durable."""
        self._history_loaded = anyio.Event()
        self._new_while_loading: list[Judgement] = []
        """This run's judgements that landed while earlier runs' were still loading."""
        # Set once this run's first judgement is durable (or the run ends without one): side
        # jobs wait for it, so a resume reaches its first new request before they compete
        # for the interpreter (loading 100k earlier judgements first delayed it by ~1 s).
        self._first_judgement = anyio.Event()
        self._results: MemoryObjectReceiveStream[Judgement] | None = None
        self._closed = False
        self._backends_claimed = False
        self.run_dir_path = config.run_dir

    # -- public API ---------------------------------------------------------------------------

    @property
    def run_dir_opened(self) -> bool:
        """Whether the run opened its run directory (:attr:`run_dir_path`): one stopped while
        its backends opened wrote nothing, anywhere."""
        return self._run_dir is not None

    @property
    def results(self) -> MemoryObjectReceiveStream[Judgement]:
        """Judgements in the order they became durable; ends when the run is over."""
        if self._results is None:
            raise RuntimeError("the engine is not running: use `async with Engine(...)`")
        return self._results

    def stats(self) -> EngineStats:
        """A cheap snapshot of progress, buffers, throughput and latencies."""
        c = self._counters
        now = c.ended_at or time.monotonic()
        buffers = {
            name: BufferFill(
                stream.statistics().current_buffer_used, int(stream.statistics().max_buffer_size)
            )
            for name, stream in self._buffers.items()
        }
        controllers = self._judging.controllers if self._judging else {}
        judges = {
            name: JudgeLoad(
                limiter.borrowed_tokens,
                int(limiter.total_tokens),
                controllers[name].waiting if name in controllers else None,
            )
            for name, limiter in self._limiters.items()
        }
        return EngineStats(
            state=self._state,
            elapsed_s=now - c.started_at,
            samples_total=c.samples_total,
            samples_read=c.samples_read,
            quarantined=c.quarantined,
            records_read=c.records_read,
            unmeasured=c.unmeasured,
            models={name: replace(m) for name, m in c.models.items()},
            buffers=buffers,
            judges=judges,
            judgements_per_s=rate(c.judged_at, now, c.started_at),
            images_per_s=rate(c.generated_at, now, c.started_at),
            generation_latency=latency(c.generation_latencies),
            judge_latency=latency(c.judge_latencies),
            last_errors=tuple(c.last_errors),
            notes=tuple(c.notes),
            opening=self._opening_now if self._state == "starting" else None,
        )

    def stop(self) -> None:
        """Stop gracefully: start no new work, finish what is in flight, then end ``results``.

        While the engine opens, nothing is in flight yet: the opening ends at once (a judge
        server still starting is stopped, a judge model still loading left to finish). A
        generator still loading is no work in flight either: its thread is left to finish
        the load and release it, as :meth:`cancel` leaves it.
        Like :meth:`cancel`, :meth:`pause` and :meth:`resume`, it may be called from any
        thread.
        """
        if self._called_elsewhere(self.stop):
            return
        if self._state in ("starting", "running", "paused"):
            self._state = "stopping"
        self._stop_event.set()
        self._running_gate.set()
        self._opening.cancel()

    def cancel(self) -> None:
        """Stop hard: cancel everything in flight now. Written judgements stay; resume later.

        Nothing waits for a model that is loading, a generation call still running or a
        generator's close: each thread is left to finish on its own, and the last releases
        the generator (see
        :func:`~trig_stream.backends.base.load_in_thread` and
        :class:`~trig_stream.backends.base.ThreadCalls`). Each judge is told
        (:meth:`~trig_stream.backends.base.Judge.stop_now`): a judge server is killed, not
        given its grace period, even if its graceful stop has begun.
        """
        if self._called_elsewhere(self.cancel):
            return
        self._cancel_work()
        # Only while this engine holds its judges: once released, another may be using them.
        for judge in self._judges if self._backends_claimed else ():
            try:
                judge.stop_now()
            except Exception as exc:  # a backend's bug must not keep the run from stopping
                note = f"judge {judge.name!r}: stop_now() failed: {describe_error(exc)}"
                self._counters.notes.append(note)

    def _cancel_work(self) -> None:
        """Cancel everything in flight (what :meth:`cancel` does, the judges left to close
        as at the end of any run)."""
        self._stop_event.set()
        self._cancel_event.set()
        self._opening.cancel()
        self._work.cancel()
        # Only now do generate calls see it: whatever they return from here on reaches
        # tasks already cancelled, and never becomes a "cancelled" error judgement.
        self._cancel_generation.set()
        if self._state in ("starting", "running", "paused", "stopping"):
            self._state = "cancelled"

    def pause(self) -> None:
        """Stop feeding new samples; work already queued continues. Before the engine runs
        (or while it opens), it starts paused."""
        if self._called_elsewhere(self.pause):
            return
        if self._stop_event.is_set() or self._state not in ("starting", "running"):
            return
        self._paused = True
        if self._running_gate.is_set():
            self._running_gate = anyio.Event()
        if self._state == "running":
            self._state = "paused"

    @property
    def paused(self) -> bool:
        """Whether :meth:`pause` is in effect (also when it came before the run started)."""
        return self._paused

    def resume(self) -> None:
        """Undo :meth:`pause`."""
        if self._called_elsewhere(self.resume):
            return
        self._paused = False
        if self._state == "paused":
            self._state = "running"
        self._running_gate.set()

    def _called_elsewhere(self, control: Callable[[], None]) -> bool:
        """Run ``control`` in the engine's event loop when called from another thread (a
        GUI's, a signal handler's), and say whether it did: its events and cancel scopes may
        only be touched there (a cancel from a thread failed half done, a resume never woke
        the run). Once that loop has ended, there is no run left to control."""
        if threading.get_ident() == self._loop_thread:
            return False
        with suppress(anyio.RunFinishedError):
            anyio.from_thread.run_sync(control, token=self._loop_token)
        return True

    async def drain(self) -> RunSummary:
        """Consume ``results`` to the end and summarise the run."""
        async for _ in self.results:
            pass
        return self.summary()

    def summary(self) -> RunSummary:
        """Counts of this run so far."""
        models = self._counters.models.values()
        return RunSummary(
            state=self._state,
            judged=sum(m.judged for m in models),
            ok=sum(m.ok for m in models),
            unscorable=sum(m.unscorable for m in models),
            error=sum(m.error for m in models),
            quarantined=self._counters.quarantined,
            run_dir=self.run_dir_path,
        )

    # -- lifetime -----------------------------------------------------------------------------

    async def __aenter__(self) -> Engine:
        if self._task_group is not None or self._closed:
            raise RuntimeError("an Engine runs once; create a new one to run again")
        try:
            self._claim_backends()
        except ConfigError:
            self._state = "failed"
            self._closed = True  # the backends are another engine's to close
            raise
        self._counters.started_at = time.monotonic()
        try:
            with self._opening:
                await self._open_backends_and_store()
        except BaseException as exc:
            cancelled = isinstance(exc, anyio.get_cancelled_exc_class())
            self._state = "cancelled" if cancelled else "failed"
            await self._close_resources()
            self._counters.ended_at = time.monotonic()
            raise
        streams = self._create_streams()
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        if self._opening.cancel_called:
            # stop() or cancel() while the judges opened (a server starting, a model
            # loading): the run ends before it starts, and ``results`` with it.
            await self._close_resources()
            self._counters.ended_at = time.monotonic()
            streams.results[0].close()
            self._state = "cancelled" if self._cancel_generation.is_set() else "stopped"
            return self
        self._task_group.start_soon(self._run, streams)
        # stop() or pause() while opening
        self._state = (
            "stopping" if self._stop_event.is_set() else "paused" if self._paused else "running"
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._task_group is not None
        # Whatever the block did, nothing of the pipeline may outlive it. A failure or a
        # block left early is no hard stop: the judges close as usual (a server's grace).
        if self._state not in ("done", "stopped", "failed"):
            self._cancel_work()
        try:
            suppress = await self._task_group.__aexit__(exc_type, exc, tb)
        except BaseExceptionGroup as group:
            leaves = list(leaf_errors(group))
            own = {id(leaf) for leaf in _leaves_of(exc)}
            if exc is not None and all(id(leaf) in own for leaf in leaves):
                # The block's own exception (a group of its own too): hand it back as it was
                # raised, not in a group of ours.
                self._state = "cancelled"
                raise exc from None
            self._state = "failed"
            error: BaseException | None = next(
                (e for e in leaves if isinstance(e, TrigStreamError)), None
            )
            if error is None:
                # One failure (an injected sleep that raised, in each task that called it)
                # comes out as itself, not in the groups of every task group it crossed.
                cancelled = anyio.get_cancelled_exc_class()
                failures = [e for e in leaves if not isinstance(e, cancelled)]
                if len({(type(e), str(e)) for e in failures}) != 1:
                    raise
                error = failures[0]
            raise error from None
        except BaseException:
            if self._state not in ("done", "stopped"):
                self._state = "cancelled"
            raise
        finally:
            await self._close_resources()
            if self._counters.ended_at is None:  # else the run ended there, before
                self._counters.ended_at = time.monotonic()
        if self._state not in ("done", "stopped", "failed"):
            self._state = "cancelled"
        return suppress

    def _claim_backends(self) -> None:
        """Mark this engine's generator and judge instances in use until it closes them.

        Raises:
            ConfigError: one is in use by another open engine (the first to end would close
                it: every judgement left to the other would fail, "the judge is not open",
                and a generator would be loaded twice, then used closed).
        """
        backends: list[Generator | Judge] = [*self._generators, *self._judges]
        with _backends_in_use_lock:
            for backend in backends:
                other = _backends_in_use.get(id(backend))
                if other is not None:
                    kind = "generator" if isinstance(backend, Generator) else "judge"
                    raise ConfigError(
                        f"{backend_label(backend)}: this instance is in use by another engine "
                        f"(run directory {other.run_dir_path}); give each engine its own {kind} "
                        "instances"
                    )
            for backend in backends:
                _backends_in_use[id(backend)] = self  # its run dir is known later
        self._backends_claimed = True

    def _release_backends(self) -> None:
        if not self._backends_claimed:
            return
        with _backends_in_use_lock:
            for backend in [*self._generators, *self._judges]:
                _backends_in_use.pop(id(backend), None)
        self._backends_claimed = False

    def _check_environments(self, cancelled: type[BaseException]) -> None:
        # In a worker thread: sys.exit() in a check ends nothing here, and stops the run.
        backends: list[Generator | Judge] = [*self._generators, *self._judges]
        for backend in backends:
            failed = f"{backend_label(backend)}: check_environment() failed"
            call_in_thread(check_environment, backend, failed=failed, cancelled=cancelled)

    async def _open_backends_and_store(self) -> None:
        config = self.config
        self._ensure_open_files()
        # What the backends need from this machine, seen before a run directory is made and
        # before any model loads (a check may import a library: a worker thread's job).
        cancelled = anyio.get_cancelled_exc_class()
        await anyio.to_thread.run_sync(self._check_environments, cancelled)
        for judge in self._judges:
            self._fingerprints[judge.name] = judge_fingerprint(judge)
            self._limiters[judge.name] = anyio.CapacityLimiter(judge.concurrency)
        manifest = run_manifest(
            config, self._generators, self._fingerprints, retry_errors=self._retry_errors
        )
        path = config.run_dir
        if self._new_run:
            path = await anyio.to_thread.run_sync(next_free_run_dir, path)
        self.run_dir_path = path
        self._opening_now = f"the run directory {path}"
        self._run_dir, self._journal_state = await anyio.to_thread.run_sync(
            RunDir.open, path, manifest
        )
        for judge in self._judges:
            self._opening_now = f"judge {judge.name!r}: {judge.opening()}"
            try:
                await judge.open()
            except TrigStreamError:
                raise
            except Exception as exc:  # a backend's own bug or setup: one clear error
                raise FatalBackendError(
                    f"judge {judge.name!r} failed to open: {describe_error(exc)}"
                ) from exc
        self._opening_now = None

    def _ensure_open_files(self) -> None:
        ensure_open_files(self.config, self._judges)

    async def _close_resources(self) -> None:
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            try:
                for judge in self._judges:
                    try:
                        await judge.aclose()
                    except Exception as exc:  # closing must not hide the run's own outcome
                        note = f"judge {judge.name!r}: closing it failed: {describe_error(exc)}"
                        self._counters.notes.append(note)
            finally:
                self._release_backends()
            if self._run_dir is not None:
                await anyio.to_thread.run_sync(self._run_dir.close)

    # -- the pipeline -------------------------------------------------------------------------

    def _create_streams(self) -> _Streams:
        engine = self.config.engine
        # Bounds. Samples are small (a p2p sample holds its encoded source image, ~1.4 MB),
        # so a few per model keep every generator busy without reading far ahead.
        samples = {
            g.name: anyio.create_memory_object_stream[WorkItem](engine.sample_buffer)
            for g in self._generators
        }
        # Images travel as paths on disk; this bound is how far generation may run ahead of
        # judging, and so how much unjudged work a hard stop leaves behind.
        images = anyio.create_memory_object_stream[ImageItem](engine.image_buffer)
        # Judgements are a few hundred bytes; a deep buffer lets one fsync cover many.
        judgements = anyio.create_memory_object_stream[Judgement](engine.judgement_buffer)
        # Durable judgements waiting for the consumer; a slow consumer stalls the run here.
        results = anyio.create_memory_object_stream[Judgement](engine.result_buffer)
        self._buffers = {f"samples:{name}": send for name, (send, _) in samples.items()}
        self._buffers.update(images=images[0], judgements=judgements[0], results=results[0])
        self._results = results[1]
        return _Streams(samples, images, judgements, results)

    async def _run(self, streams: _Streams) -> None:
        try:
            with self._work:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._pipeline, streams)
                    tg.start_soon(self._load_history)
                    tg.start_soon(self._count_samples)
        finally:
            # The run is over, however it ended: the elapsed time and the rates stop when the
            # results end (as _persist ends them), not when the caller leaves its block (a
            # dashboard left on screen, say).
            if self._counters.ended_at is None:
                self._counters.ended_at = time.monotonic()
            streams.results[0].close()  # ``results`` ends, however the run did

    async def _pipeline(self, streams: _Streams) -> None:
        sample_streams = streams.samples
        image_send, image_recv = streams.images
        judgement_send, judgement_recv = streams.judgements
        result_send, _ = streams.results

        context = self._context()
        judging = self._judging = JudgeStage(
            context, self._judges, self._limiters, self._retry, self._sleep
        )
        source = SourceStage(
            context,
            self._generators,
            self._judges,
            self._journal_state,
            retry_errors=self._retry_errors,
            running_gate=lambda: self._running_gate,
        )
        async with anyio.create_task_group() as tg:
            tg.start_soon(source.run, {name: send for name, (send, _) in sample_streams.items()})
            for generator in self._generators:
                _, receive = sample_streams[generator.name]
                tg.start_soon(
                    GenerationStage(
                        context,
                        generator,
                        made_before=self._journal_state.has_results(generator.name),
                    ).run,
                    receive,
                    image_send.clone(),
                    judgement_send.clone(),
                )
            tg.start_soon(judging.run, image_recv, judgement_send.clone())
            tg.start_soon(self._persist, judgement_recv, result_send)
            image_send.close()
            judgement_send.close()

    def _left_work(self) -> bool:
        """Whether a graceful stop left work undone: samples not read, or queued ones dropped.
        A stop that came once the last sample was in flight left none: the run is done."""
        counters = self._counters
        return not counters.dataset_read or any(m.dropped for m in counters.models.values())

    def _context(self) -> RunContext:
        assert self._run_dir is not None
        return RunContext(
            config=self.config,
            run_dir=self._run_dir,
            counters=self._counters,
            fingerprints=self._fingerprints,
            cancel_generation=self._cancel_generation,
            stopping=self._stop_event,
            hard_stopping=self._cancel_event,
        )

    async def _persist(
        self,
        receive: MemoryObjectReceiveStream[Judgement],
        result_send: MemoryObjectSendStream[Judgement],
    ) -> None:
        assert self._run_dir is not None
        journal = self._run_dir.journal
        async with receive, result_send:
            while True:
                batch: list[Judgement] = []
                try:
                    batch.append(await receive.receive())
                    take_ready(receive, batch, PERSIST_BATCH)
                except anyio.EndOfStream:
                    # Every stage before this one has finished: the run is over. Say so
                    # before ``results`` ends, so its consumer sees the final state and a
                    # complete live analysis.
                    self._first_judgement.set()
                    await self._history_loaded.wait()
                    self._state = (
                        "stopped" if self._stop_event.is_set() and self._left_work() else "done"
                    )
                    self._counters.ended_at = time.monotonic()
                    return
                except anyio.get_cancelled_exc_class():
                    # Hard stop: what already landed in the buffer is still written.
                    take_ready(receive, batch, None)
                    with anyio.CancelScope(shield=True):
                        await anyio.to_thread.run_sync(journal.append, batch)
                    self._count(batch)
                    self._counters.ended_at = time.monotonic()
                    raise
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(journal.append, batch)
                self._count(batch)
                self._first_judgement.set()
                for judgement in batch:
                    await send_now(result_send, judgement)

    async def _count_samples(self) -> None:
        # For progress and ETA only; a dataset that cannot be read fails the source itself.
        await self._first_judgement.wait()
        source = DatasetSource(
            self.config.dataset,
            self.config.run.task,
            source_images=reads_source_images(self._generators),
        )
        with suppress(TrigStreamError):
            self._counters.samples_total = await anyio.to_thread.run_sync(source.count)

    async def _load_history(self) -> None:
        # Earlier runs' judgements join the live analysis in the background, so they never
        # delay the first new request. Keys this run may judge again are left out: their
        # new judgement could land first and must not be overwritten by the old one.
        assert self._run_dir is not None
        state = self._journal_state
        lines = iter(read_journal(self._run_dir.journal.path, limit=state.lines))
        try:
            await self._first_judgement.wait()
            # A hard stop before they have joined leaves them out: it does not wait the
            # second or so per 100k judgements their parsing takes (the journal has them all).
            while chunk := await anyio.to_thread.run_sync(_take, lines, HISTORY_CHUNK):
                for judgement in chunk:
                    if state.is_done(judgement.key, retry_errors=self._retry_errors):
                        self.relations.add(judgement)
        finally:
            # This run's judgements join after the earlier ones, as in the journal: the
            # analysis then sees the journal's order, and equals a batch analysis of it to
            # the last bit (its sums do not depend on how the loading and the run overlapped).
            self.relations.extend(self._new_while_loading)
            self._new_while_loading = []
            self._history_loaded.set()

    def _count(self, batch: list[Judgement]) -> None:
        now = time.monotonic()
        if self._history_loaded.is_set():
            self.relations.extend(batch)
        else:
            self._new_while_loading += batch
        for judgement in batch:
            counts = self._counters.model(judgement.model)
            if judgement.status == "ok":
                counts.ok += 1
            elif judgement.status == "unscorable":
                counts.unscorable += 1
            else:
                counts.error += 1
                where = f"{judgement.model} {judgement.data_id} {judgement.dimension}"
                self._counters.last_errors.append(f"{where}: {judgement.error}")
            self._counters.judged_at.append(now)


def _take(items: Iterator[Judgement], count: int) -> list[Judgement]:
    return list(islice(items, count))


def _leaves_of(exc: BaseException | None) -> list[BaseException]:
    if exc is None:
        return []
    if isinstance(exc, BaseExceptionGroup):
        return list(leaf_errors(exc))
    return [exc]
