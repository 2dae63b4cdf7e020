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
* **persist** (:mod:`trig_stream.persisting`) appends whatever judgements have landed to
  the journal and fsyncs once for them all (group commit), shielded from cancellation, and
  only then hands them to ``results``.

Each bound (:mod:`trig_stream.buffers`) caps memory and work in flight: a full buffer makes
the stage before it wait, all the way back to the dataset reader, so a run of any size holds
the same amount in memory.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from trig_stream.analysis.live import RelationTracker
from trig_stream.backends.base import Generator, Judge, hears_of_whole_input
from trig_stream.backends.registry import build_generator, build_judge, check_backends
from trig_stream.buffers import Streams, create_streams
from trig_stream.config import RunConfig
from trig_stream.controls import EngineLoop
from trig_stream.errors import ConfigError, leaf_errors
from trig_stream.generation import GenerationStage
from trig_stream.judging import JudgeStage
from trig_stream.persisting import PersistStage
from trig_stream.pipeline import RunContext, describe_error
from trig_stream.records import Judgement
from trig_stream.resources import RunResources
from trig_stream.retry import RetryPolicy
from trig_stream.run_errors import error_leaving
from trig_stream.snapshots import RunSummary, engine_stats, run_summary
from trig_stream.sourcing import SourceStage, count_samples
from trig_stream.stats import Counters, EngineState, EngineStats


class Engine:
    """Evaluates a TRIG run as a stream; an async context manager.

    Example::

        async with Engine(config) as engine:
            async for judgement in engine.results:
                print(judgement.data_id, judgement.dimension, judgement.score)

    Leaving the ``async with`` block before ``results`` is exhausted cancels the work still
    in flight; everything already written stays, and running again resumes from there.

    Args:
        config: the validated run config. Its paths are resolved as :func:`load_config
            <trig_stream.config.load_config>` resolves a file's (``~`` is the home folder),
            relative ones against the working directory (a config built in code has no
            file); :attr:`config` is that resolved copy.
        generators: generator instances (any iterable) to use instead of building them from
            the config; checked as the config's entries are.
        judges: judge instances (any iterable) to use instead of building them from the
            config; checked as the config's entries are.
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
        generators: Iterable[Generator] | None = None,
        judges: Iterable[Judge] | None = None,
        retry_errors: bool = False,
        new_run: bool = False,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        retry_policy: RetryPolicy | None = None,
    ) -> None:
        # A config built in code (``RunConfig.model_validate``) never went through
        # load_config: its ``~`` made a folder literally named "~", and its relative paths
        # moved with the working directory. A loaded config's paths are absolute already.
        try:
            config = config.resolve_paths(Path.cwd())
        except ConfigError as exc:  # a path of no known home folder: the message names its key
            raise ConfigError(str(exc)) from None
        self.config = config
        # Listed before anything reads them: an iterator checked first was used up by the
        # check, and the run then had no backend and judged nothing.
        self._generators: list[Generator] = (
            [build_generator(g, config) for g in config.generators]
            if generators is None
            else list(generators)
        )
        self._judges: list[Judge] = (
            [build_judge(j, config) for j in config.judges] if judges is None else list(judges)
        )
        check_backends(self._generators, self._judges)
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
        # Its events and cancel scopes are of this async library (asyncio or trio): another
        # library's loop may not run them, and failed with a bare RuntimeError deep inside.
        self._async_library = _async_library()
        # The loop the engine belongs to (its events and cancel scopes are that loop's):
        # stop(), cancel(), pause() and resume() called from another thread run there. Taken
        # again by ``async with``: an engine made in one loop may be run in another.
        self._loop = EngineLoop()
        self._running_gate = anyio.Event()
        self._running_gate.set()
        self._cancel_generation = threading.Event()
        # The stops as events the stages can wait on (their waits end with them).
        self._stop_event = anyio.Event()
        self._cancel_event = anyio.Event()
        self._task_group: TaskGroup | None = None
        self._work = anyio.CancelScope()
        """Where the run's tasks run: :meth:`cancel` cancels it, and not the caller's block."""
        self._paused = False
        self._counting = anyio.CancelScope()
        """Where the dataset is counted for progress: :meth:`stop` and the run's end cancel
        it, and nothing waits for the count's thread."""
        self._judging: JudgeStage | None = None
        self._resources = RunResources(
            config,
            self._generators,
            self._judges,
            owner=self,
            notes=self._counters.notes,
            retry_errors=retry_errors,
            new_run=new_run,
        )
        self._buffers: dict[str, MemoryObjectSendStream[Any]] = {}
        self.relations = RelationTracker(config.relation)
        """The live relation analysis (pair statistics, DTM) of every judgement in the run,
        earlier runs included; it updates as judgements become durable."""
        self._results: MemoryObjectReceiveStream[Judgement] | None = None
        self._entered = False
        """Whether ``async with`` began: set before its first await, so that a second entry
        (two tasks entering one engine at once) is refused before it touches the first's run."""
        self._closed = False

    # -- public API ---------------------------------------------------------------------------

    @property
    def generators(self) -> tuple[Generator, ...]:
        """The generator instances this engine runs: those passed in, else the config's."""
        return tuple(self._generators)

    @property
    def judges(self) -> tuple[Judge, ...]:
        """The judge instances this engine runs: those passed in, else the config's."""
        return tuple(self._judges)

    @property
    def run_dir_path(self) -> Path:
        """The run directory: the configured one, or with ``new_run`` the one made beside it
        once the run opened it."""
        return self._resources.run_dir_path

    @property
    def run_dir_opened(self) -> bool:
        """Whether the run opened its run directory (:attr:`run_dir_path`) and kept it: one
        stopped (or failed) while its judges opened removed a directory it had made, and
        wrote nothing, anywhere; one resumed keeps its results. False while a directory this
        run made may still be removed (its judges open): a stop then leaves nothing to
        resume."""
        return self._resources.run_dir_kept

    @property
    def results(self) -> MemoryObjectReceiveStream[Judgement]:
        """Judgements in the order they became durable; ends when the run is over, and is
        closed when the ``async with`` block ends."""
        if self._results is None:
            raise RuntimeError("the engine is not running: use `async with Engine(...)`")
        return self._results

    def stats(self) -> EngineStats:
        """A cheap snapshot of progress, buffers, throughput and latencies.

        May be called from any thread (a GUI's, beside :meth:`stop` and :meth:`pause`): it
        waits for nothing, and taken from another thread than the event loop's it may mix
        counts a moment apart, but never fails for the counters changing under it.
        """
        return engine_stats(
            self._state,
            self._counters,
            buffers=self._buffers,
            limiters=self._resources.limiters,
            controllers=self._judging.controllers if self._judging else {},
            opening=self._resources.opening_now,
            closing=self._resources.closing_now,
        )

    def stop(self) -> None:
        """Stop gracefully: start no new work, finish what is in flight, then end ``results``.

        While the engine opens, nothing is in flight yet: the opening ends at once (a judge
        server still starting is stopped, a judge model still loading left to finish). So
        does a late opening of the judges (a resumed run that found no work left as it
        opened, and then some): the run ends ``stopped`` before any work, its results kept. A
        generator still loading is no work in flight either: its thread is left to finish
        the load and release it, as :meth:`cancel` leaves it. Nor is a judge request still
        waiting for its turn (:meth:`~trig_stream.backends.base.Judge.stop_waiting`): an
        in-process judge finishes the batch it runs and starts no other, the requests queued
        for the next ones left to the resume.
        Like :meth:`cancel`, :meth:`pause` and :meth:`resume`, it may be called from any
        thread.
        """
        if self._called_elsewhere(self.stop):
            return
        if self._state in ("starting", "running", "paused"):
            self._state = "stopping"
        self._stop_event.set()
        self._running_gate.set()
        self._resources.cancel_opening()
        self._counting.cancel()  # no progress to estimate: a stop never waits for the count
        self._stop_generators_waiting()
        self._stop_judges_waiting()

    def cancel(self) -> None:
        """Stop hard: cancel everything in flight now. Written judgements stay; resume later.

        Nothing waits for a model that is loading, a generation call still running or a
        generator's close: each thread is left to finish on its own, and the last releases
        the generator (see
        :func:`~trig_stream.backends.threads.load_in_thread` and
        :class:`~trig_stream.backends.threads.ThreadCalls`). Each judge is told
        (:meth:`~trig_stream.backends.base.Judge.stop_now`): a judge server is killed, not
        given its grace period, even if its graceful stop has begun.
        """
        if self._called_elsewhere(self.cancel):
            return
        self._cancel_work()
        # Only while this engine holds its judges: once released, another may be using them.
        for judge in self._judges if self._resources.claimed else ():
            self._tell(f"judge {judge.name!r}: stop_now()", judge.stop_now)

    def _cancel_work(self) -> None:
        """Cancel everything in flight (what :meth:`cancel` does, the judges left to close
        as at the end of any run)."""
        self._stop_event.set()
        self._cancel_event.set()
        self._resources.cancel_opening()
        self._work.cancel()
        # Only now do generate calls see it: whatever they return from here on reaches
        # tasks already cancelled, and never becomes a "cancelled" error judgement.
        self._cancel_generation.set()
        # Said before the generators are told: a KeyboardInterrupt out of one's hook leaves.
        if self._state in ("starting", "running", "paused", "stopping"):
            self._state = "cancelled"
        self._stop_generators_waiting()

    def _stop_generators_waiting(self) -> None:
        """Tell each generator that the run stops
        (:meth:`~trig_stream.backends.base.Generator.stop_waiting`): a wait for a retry, a
        Retry-After of minutes say, holds no stop."""
        # Only while this engine holds its generators: once released, another may use them.
        for generator in self._generators if self._resources.claimed else ():
            self._tell(f"generator {generator.name!r}: stop_waiting()", generator.stop_waiting)

    def _stop_judges_waiting(self) -> None:
        """Tell each judge that the run stops gracefully
        (:meth:`~trig_stream.backends.base.Judge.stop_waiting`): requests queued for an
        in-process model's batches are left to the resume, not run one batch after another."""
        # Only while this engine holds its judges: once released, another may use them.
        for judge in self._judges if self._resources.claimed else ():
            self._tell(f"judge {judge.name!r}: stop_waiting()", judge.stop_waiting)

    def _tell(self, what: str, call: Callable[[], None]) -> None:
        """``call()``, a backend's stop hook: what it raises (a KeyboardInterrupt aside)
        becomes a note naming ``what``, and the stop goes on."""
        try:
            call()
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # a backend's bug must not keep the run from stopping
            # A SystemExit, or a CancelledError of its own, left from stop() or cancel(): the
            # engine never closed, and the backends after it were never told.
            self._counters.notes.append(f"{what} failed: {describe_error(exc)}")

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
        """Run ``control`` in the engine's event loop when called from another thread, and
        say whether it did (see :meth:`~trig_stream.controls.EngineLoop.called_elsewhere`)."""
        return self._loop.called_elsewhere(
            control, awaiting_run=lambda: self._task_group is None and not self._closed
        )

    async def drain(self) -> RunSummary:
        """Consume ``results`` to the end and summarise the run."""
        async for _ in self.results:
            pass
        return self.summary()

    def summary(self) -> RunSummary:
        """Counts of this run so far; like :meth:`stats`, from any thread."""
        return run_summary(self._state, self._counters, self.run_dir_path)

    @contextmanager
    def run_lock_kept(self) -> Iterator[None]:
        """Keep the run directory's ``run.lock`` held past the engine's close, until the
        block ends: a report written from the run's results in the block is written while no
        other run can start there and append to the journal, and viewers (``status``,
        ``watch``, ``validate``) see the run still running there (its pid alone in
        ``run.lock``, as ever). Its journal is closed with the engine as ever. Entered
        before the engine runs; however the block ends (a Ctrl-C included), the lock is
        released."""
        self._resources.keep_run_lock = True
        try:
            yield
        finally:
            self._resources.release_run_lock()

    # -- lifetime -----------------------------------------------------------------------------

    async def __aenter__(self) -> Engine:
        if self._entered or self._closed:
            raise RuntimeError("an Engine runs once; create a new one to run again")
        if (running := _async_library()) != self._async_library:
            raise RuntimeError(
                f"this Engine was made under {self._async_library} and cannot run under "
                f"{running}: its events and cancel scopes are {self._async_library}'s; make "
                "it inside the async code that runs it"
            )
        self._entered = True
        # A control call from another thread from now on runs in the loop that runs the
        # engine, not in the one that made it (ended, it dropped a stop() silently).
        self._loop.take()
        try:
            self._resources.claim()
        except ConfigError:
            self._state = "failed"
            self._closed = True  # the backends are another engine's to close
            raise
        self._counters.started_at = time.monotonic()
        try:
            await self._resources.open()
        except BaseException as exc:
            cancelled = isinstance(exc, anyio.get_cancelled_exc_class())
            self._state = "cancelled" if cancelled else "failed"
            await self._close_resources()
            self._counters.ended_at = time.monotonic()
            raise
        streams = self._create_streams()
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        if self._resources.opening_cancelled:
            # stop() or cancel() while the judges opened (a server starting, a model
            # loading): the run ends before it starts, and ``results`` with it.
            await self._close_resources()
            self._counters.ended_at = time.monotonic()
            # No stage runs to close its ends of the buffers: closed here, but for a copy of
            # ``results``, ended, for the block (closed as the block ends).
            self._results = streams.results[1].clone()
            streams.close()
            self._state = "cancelled" if self._cancel_generation.is_set() else "stopped"
            return self
        self._resources.keep_run_dir()  # from here it holds the run's results
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
        interrupt: KeyboardInterrupt | None = None
        if self._state not in ("done", "stopped", "failed"):
            try:
                self._cancel_work()
            except KeyboardInterrupt as raised:  # a generator's stop_waiting(), told to stop
                interrupt = raised  # it leaves once the engine has closed, not before
        try:
            suppress = await self._close_after_block(exc_type, exc, tb)
        except BaseException as leaving:
            if interrupt is not None:  # the block's own exception or the run's error leaves
                self._note_dropped_interrupt(leaving)
            raise
        if interrupt is not None:
            if exc is None:
                raise interrupt
            self._note_dropped_interrupt(exc)
        return suppress

    async def _close_after_block(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        """The end of :meth:`__aexit__`, once the work is cancelled: the task group left,
        then the engine closed; what leaves is the run's error or the block's own."""
        assert self._task_group is not None
        failure: BaseException | None = None  # the run's error, to raise after the handler
        try:
            suppress = await self._task_group.__aexit__(exc_type, exc, tb)
        except BaseExceptionGroup as group:
            leaving = error_leaving(group, exc)
            if leaving.blocks_own and exc is not None:
                # The block's own exception (a group of its own too): hand it back as it was
                # raised, not in a group of ours. A run that ended before stays as it ended.
                if self._state not in ("done", "stopped"):
                    self._state = "cancelled"
                raise exc from exc.__cause__  # its own cause kept, our group left out
            self._state = "failed"
            if leaving.error is None:
                raise
            if not leaving.keeps_context:
                raise leaving.error from leaving.error.__cause__
            failure = leaving.error
        except BaseException:
            if self._state not in ("done", "stopped"):
                self._state = "cancelled"
            raise
        finally:
            await self._close_resources()
            if self._counters.ended_at is None:  # else the run ended there, before
                self._counters.ended_at = time.monotonic()
            if self._results is not None:
                # Whatever the block left in it is durable already (and resumed from).
                self._results.close()
        if failure is not None:
            # Outside the handler of the group, which would become its context instead.
            failure.__context__ = exc
            raise failure
        if self._state not in ("done", "stopped", "failed"):
            self._state = "cancelled"
        return suppress

    def _note_dropped_interrupt(self, leaving: BaseException) -> None:
        """Note a generator's KeyboardInterrupt that ``leaving`` ends the block instead of: one
        exception leaves, and it must not go unseen."""
        self._counters.notes.append(
            "a generator's stop_waiting() raised KeyboardInterrupt as the engine closed: "
            f"dropped, as {describe_error(leaving)} left the block"
        )

    async def _close_resources(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._resources.close()

    # -- the pipeline -------------------------------------------------------------------------

    def _create_streams(self) -> Streams:
        streams = create_streams(self.config, [g.name for g in self._generators])
        self._buffers = streams.send_ends()
        self._results = streams.results[1]
        return streams

    async def _run(self, streams: Streams) -> None:
        try:
            context = self._context()
            persist = PersistStage(
                context,
                self._resources.journal_state,
                self.relations,
                finished=self._finish,
            )
            with self._work:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._pipeline, context, persist, streams)
                    tg.start_soon(persist.load_history)
                    tg.start_soon(self._count_samples, persist.first_judgement)
        except BaseException as exc:
            # Said before ``results`` ends (below), so that its consumer, and stats(),
            # summary() and drain() after it, see the run failed, not still running.
            if _failed(exc):
                self._state = "failed"
            raise
        finally:
            # The run is over, however it ended: the elapsed time and the rates stop when the
            # results end (as the persist stage ends them), not when the caller leaves its block (a
            # dashboard left on screen, say).
            if self._counters.ended_at is None:
                self._counters.ended_at = time.monotonic()
            streams.results[0].close()  # ``results`` ends, however the run did
            # The judges close with the run, not with the caller's block: a server started
            # for the run stops now (its grace shown in stats().closing), not when someone
            # closes a dashboard left on screen.
            await self._resources.close_judges()

    async def _pipeline(self, context: RunContext, persist: PersistStage, streams: Streams) -> None:
        sample_streams = streams.samples
        image_send, image_recv = streams.images
        judgement_send, judgement_recv = streams.judgements
        result_send, _ = streams.results

        judging = self._judging = JudgeStage(
            context,
            self._judges,
            self._resources.limiters,
            self._retry,
            self._sleep,
            judges_open=self._resources.judges_open,
        )
        source = SourceStage(
            context,
            self._generators,
            self._judges,
            self._resources.journal_state,
            retry_errors=self._retry_errors,
            running_gate=lambda: self._running_gate,
            judges_ready=self._resources.judges_ready,
        )
        async with anyio.create_task_group() as tg:
            tg.start_soon(source.run, {name: send for name, (send, _) in sample_streams.items()})
            for generator in self._generators:
                _, receive = sample_streams[generator.name]
                tg.start_soon(
                    GenerationStage(
                        context,
                        generator,
                        made_before=self._resources.journal_state.has_results(generator.name),
                    ).run,
                    receive,
                    image_send.clone(),
                    judgement_send.clone(),
                )
            tg.start_soon(judging.run, image_recv, judgement_send.clone())
            # A copy: persist closes its end as it stops, a failure's cancel included, and
            # ``results`` ends only in _run, once the run's final state is set.
            tg.start_soon(persist.run, judgement_recv, result_send.clone())
            image_send.close()
            judgement_send.close()

    def _finish(self) -> None:
        """The run's final state, once every stage has finished."""
        self._counting.cancel()  # the run is over: its total no longer matters
        self._state = "stopped" if self._stop_event.is_set() and self._left_work() else "done"

    def _left_work(self) -> bool:
        """Whether a graceful stop left work undone: samples not read, or queued ones dropped.
        A stop that came once the last sample was in flight left none: the run is done."""
        counters = self._counters
        return not counters.dataset_read or any(m.dropped for m in counters.models.values())

    def _context(self) -> RunContext:
        run_dir = self._resources.run_dir
        assert run_dir is not None
        return RunContext(
            config=self.config,
            run_dir=run_dir,
            counters=self._counters,
            fingerprints=self._resources.fingerprints,
            cancel_generation=self._cancel_generation,
            stopping=self._stop_event,
            hard_stopping=self._cancel_event,
            passed_over={g.name: set() for g in self._generators if hears_of_whole_input(g)},
        )

    async def _count_samples(self, first_judgement: anyio.Event) -> None:
        # Nothing waits for it: a stop, a cancel or the end of the run cancels it.
        with self._counting:
            await first_judgement.wait()
            if not self._stop_event.is_set():
                await count_samples(self.config, self._generators, self._counters)


def _failed(exc: BaseException) -> bool:
    """Whether ``exc``, out of the run's task groups, holds a failure, not cancellations alone."""
    leaves = leaf_errors(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    return any(not isinstance(leaf, anyio.get_cancelled_exc_class()) for leaf in leaves)


def _async_library() -> str:
    """The async library of the running event loop, as anyio names it (``asyncio``, ``trio``)."""
    backend = anyio.lowlevel.current_token().backend_class  # anyio._backends._trio's
    return backend.__module__.rpartition("._")[2]
