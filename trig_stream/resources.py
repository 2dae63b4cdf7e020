"""What a run holds while it runs: its backends, its run directory and its judges.

:class:`RunResources` opens them in order and closes each once, however the run ends:

* the generator and judge instances are claimed for the run (another engine may not use
  them meanwhile) and released at the end;
* the dataset's path and image_root, then the backends' needs of this machine are checked,
  then the run directory is opened (a run it refuses is refused before a judge's server
  takes minutes to start);
* the judges open, unless a resumed run whose judges open slowly finds nothing left to
  judge; should work turn up later, :meth:`RunResources.judges_ready` opens them then;
* the judges close when the run's results end (:meth:`RunResources.close_judges`), and the
  run directory when the engine closes (its lock kept, when asked, until
  :meth:`RunResources.release_run_lock`: the run's report is written meanwhile); one this
  run made is removed if the run ended before its pipeline started.

Every opening runs in a cancel scope that :meth:`RunResources.cancel_opening` cancels (the
engine's ``stop()`` and ``cancel()``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableSequence, Sequence
from functools import partial

import anyio
import anyio.to_thread

from trig_stream.backends.base import Generator, Judge, reads_source_images
from trig_stream.backends.threads import call_left_behind_on_cancel
from trig_stream.config import RunConfig
from trig_stream.dataset import DatasetSource
from trig_stream.dataset_formats import refuse_undecodable_shards
from trig_stream.journal import JournalState
from trig_stream.opening import (
    OpenedRunDir,
    close_judges,
    judges_open_slowly,
    open_judges,
    open_run_dir,
    work_left_in_thread,
)
from trig_stream.pipeline import describe_error
from trig_stream.preflight import (
    BackendOwner,
    backend_label,
    check_environments,
    claim_backends,
    ensure_open_files,
    judge_fingerprint,
    release_backends,
    run_manifest,
)
from trig_stream.records import JudgeFingerprint
from trig_stream.store import RunDir


class RunResources:
    """The backends, run directory and judges of one run, opened and closed in order.

    Args:
        config: the run's config.
        generators, judges: the run's backend instances.
        owner: the engine claiming them (named when another engine tries to use them).
        notes: where a judge that fails to close, or a generator's ``stop_loading()`` that
            fails as a stop ends its check, is noted (the run's notes).
        retry_errors, new_run: the engine's options of the same names.
    """

    def __init__(
        self,
        config: RunConfig,
        generators: Sequence[Generator],
        judges: Sequence[Judge],
        *,
        owner: BackendOwner,
        notes: MutableSequence[str],
        retry_errors: bool,
        new_run: bool,
    ) -> None:
        self._config = config
        self._generators = generators
        self._judges = judges
        self._owner = owner
        self._notes = notes
        self._retry_errors = retry_errors
        self._new_run = new_run
        self.fingerprints: dict[str, JudgeFingerprint] = {}
        self.limiters: dict[str, anyio.CapacityLimiter] = {}
        """Each judge's concurrency limit, by judge name."""
        self.run_dir: RunDir | None = None
        """The open run directory; None before it opens, and once a run directory this run
        made is removed."""
        self.run_dir_path = config.run_dir
        self.journal_state = JournalState()
        self.opening_now: str | None = None
        """What opens now (:attr:`~trig_stream.stats.EngineStats.opening`)."""
        self.closing_now: str | None = None
        """What closes now (:attr:`~trig_stream.stats.EngineStats.closing`)."""
        self.judges_open = anyio.Event()
        """Set once the judges are open: only then is their servers' load read."""
        self.claimed = False
        """Whether the backends are claimed (this run may tell its judges to stop now)."""
        self._opening = anyio.CancelScope()
        self._judges_opened = False
        """Whether the judges' opening began (they are closed at the end only then)."""
        self._judges_closed = False
        self._discard_run_dir = False
        """Whether the run directory is one this run made, to remove if the run ends before
        its pipeline starts (a stop or a failure while the judges open)."""
        self._closed = False
        self.keep_run_lock = False
        """Whether :meth:`close` leaves ``run.lock`` held, for :meth:`release_run_lock`."""

    @property
    def opening_cancelled(self) -> bool:
        """Whether :meth:`cancel_opening` was called during the run's opening."""
        return self._opening.cancel_called

    def cancel_opening(self) -> None:
        """End the opening under way, if any (a judge server still starting is stopped)."""
        self._opening.cancel()

    def claim(self) -> None:
        """Mark the backends in use until :meth:`close` (see
        :func:`~trig_stream.preflight.claim_backends`).

        Raises:
            ConfigError: another engine holds one of them.
        """
        claim_backends([*self._generators, *self._judges], self._owner)
        self.claimed = True

    async def open(self) -> None:
        """Check the backends' environments, open the run directory, then the judges (unless
        nothing is left for them to judge). :meth:`cancel_opening` ends it early, quietly."""
        with self._opening:
            await self._open()

    async def _open(self) -> None:
        config = self._config
        ensure_open_files(config, self._judges)
        # A dataset or image_root that is not there, and a shard polars cannot name,
        # refused before a run directory is made for nothing (a stat, and a walk of the
        # dataset folder's names: milliseconds, as the check above).
        source_images = reads_source_images(self._generators)
        DatasetSource(config.dataset, config.run.task, source_images=source_images).check_paths()
        refuse_undecodable_shards(config.dataset.path, config.dataset.format)
        # What the backends need from this machine, seen before a run directory is made and
        # before any model loads (a check may import a library: a worker thread's job).
        backends: list[Generator | Judge] = [*self._generators, *self._judges]
        for backend in backends:
            await self._check_environment(backend)
        for judge in self._judges:
            self.fingerprints[judge.name] = judge_fingerprint(judge)
            self.limiters[judge.name] = anyio.CapacityLimiter(judge.concurrency)
        manifest = run_manifest(
            config, self._generators, self.fingerprints, retry_errors=self._retry_errors
        )
        new_run = self._new_run
        where = "a new run directory beside " if new_run else "the run directory "
        self.opening_now = f"{where}{config.run_dir}"
        try:
            # Opened before the judges: a run it refuses (another process in it, results
            # made with other settings) is refused before a judge's server takes minutes to
            # start.
            await self._open_run_dir(
                partial(open_run_dir, config.run_dir, manifest, new_run=new_run)
            )
            if not await self._nothing_left():
                await self._open_judges()
        finally:
            self.opening_now = None  # stats().opening names nothing after the opening

    async def _open_run_dir(self, open_it: Callable[[], OpenedRunDir]) -> None:
        """Open the run directory in a worker thread, and hold it: a cancellation meanwhile
        waits for the thread, and :meth:`close` then closes what it opened.

        A native asyncio cancel (``task.cancel()``, ``asyncio.timeout``,
        ``asyncio.wait_for``) gets past anyio's shield: waited for in the cancelled task, the
        thread went on to open the directory and its result was dropped (the directory left
        open, refused to the next engine of this process as in use); or its job, cancelled
        before a worker thread took it up, never ran, and the wait for it never ended.
        :func:`_to_the_end` runs it where no such cancel reaches.
        """
        opened: list[OpenedRunDir] = []
        try:
            await _to_the_end(partial(anyio.to_thread.run_sync, lambda: opened.append(open_it())))
        finally:
            if opened:
                self._hold(opened[0])  # for close(), which the engine calls next

    def _hold(self, opened: OpenedRunDir) -> None:
        self._discard_run_dir = opened.made
        self.run_dir_path, self.run_dir = opened.path, opened.run_dir
        self.journal_state = opened.journal_state

    @property
    def run_dir_kept(self) -> bool:
        """Whether the run directory is open and stays: a resumed one (it was there before),
        or one this run made once its pipeline started. One made while the run still opens
        is removed if the run ends there."""
        return self.run_dir is not None and not self._discard_run_dir

    async def _check_environment(self, backend: Generator | Judge) -> None:
        """The backend's check of this machine, in a worker thread that a stop does not wait
        for: a check may import a library for seconds (diffusers, torch), in a child process
        with ``isolation = "process"``, which the stop kills (a generator's
        :meth:`~trig_stream.backends.base.Generator.stop_loading`; what that raises, a
        ``KeyboardInterrupt`` aside, is a note)."""
        label = backend_label(backend)
        self.opening_now = f"{label}: checking its environment (imports its libraries)"
        try:
            await call_left_behind_on_cancel(
                check_environments, [backend], backend=label, instance=backend
            )
        except anyio.get_cancelled_exc_class():
            if isinstance(backend, Generator):
                try:
                    backend.stop_loading()
                except KeyboardInterrupt:
                    raise
                except BaseException as exc:  # the check then runs to its end, left behind
                    # A SystemExit left the engine raw: `run` exited 3, "run directory in
                    # use", with no word of the generator.
                    self._notes.append(f"{label}: stop_loading() failed: {describe_error(exc)}")
            raise
        finally:
            self.opening_now = None

    def keep_run_dir(self) -> None:
        """The pipeline starts: from here the run directory holds the run's results."""
        self._discard_run_dir = False

    async def judges_ready(self) -> None:
        """Open the judges before the first work item is queued, if the run's opening left
        them closed: it found nothing left to judge, and the dataset changed since.

        A stop or a hard stop ends this opening as it ends the run's (a judge server still
        starting is stopped): the source stage, seeing the stop, queues nothing.
        """
        if self._judges_opened:
            return
        # The run's opening scope has been left; cancel_opening() reaches this one.
        self._opening = anyio.CancelScope()
        try:
            with self._opening:
                await self._open_judges()
        finally:
            self.opening_now = None

    async def _open_judges(self) -> None:
        self._judges_opened = True  # closed at the end, even if one of them fails to open
        await open_judges(self._judges, self._announce_opening)
        self.judges_open.set()

    async def _nothing_left(self) -> bool:
        """Whether a resumed run whose judges open slowly has nothing left to judge: it then
        opens no judge at all (no model loaded, no server started for 0 judgements)."""
        if not judges_open_slowly(self._judges) or not len(self.journal_state):
            return False
        self.opening_now = "the dataset, for samples left to judge"
        return not await work_left_in_thread(
            self._config, self._generators, self._judges, self.journal_state, self._retry_errors
        )

    def _announce_opening(self, what: str) -> None:
        self.opening_now = what

    async def close_judges(self) -> None:
        """Close the judges, once: when the run's results end (a judge server or model is
        not held while the caller lingers in its block, a dashboard left on screen), else
        when the engine closes. Shielded: a hard stop meanwhile reaches them through the
        engine's ``cancel()`` (a server killed), not by abandoning the close."""
        if self._judges_closed or not self._judges_opened:
            return
        self._judges_closed = True
        with anyio.CancelScope(shield=True):
            await close_judges(self._judges, self._notes, self._announce_closing)

    def _announce_closing(self, what: str | None) -> None:
        self.closing_now = what

    async def close(self) -> None:
        """Close everything, once, to the end whatever cancels the caller (see
        :func:`_to_the_end`): the judges, the backends' claim, then the run directory
        (removed if this run made it and its pipeline never started)."""
        if self._closed:
            return
        self._closed = True
        await _to_the_end(self._close)

    async def _close(self) -> None:
        try:
            await self.close_judges()
        finally:
            self._release()
            if self.run_dir is not None and self._discard_run_dir:
                # Made by this run, which ended while its judges opened: it holds nothing,
                # and left there (each --new-run a new one) it looked like a run to resume.
                await anyio.to_thread.run_sync(self.run_dir.discard)
                self.run_dir = None
                self.run_dir_path = self._config.run_dir
            elif self.run_dir is not None:
                close = partial(self.run_dir.close, release_lock=not self.keep_run_lock)
                await anyio.to_thread.run_sync(close)

    def release_run_lock(self) -> None:
        """Release the ``run.lock`` that :meth:`close` kept (:attr:`keep_run_lock`); nothing
        before :meth:`close`, which then releases it."""
        self.keep_run_lock = False
        if self._closed and self.run_dir is not None:
            self.run_dir.release_lock()

    def _release(self) -> None:
        if not self.claimed:
            return
        release_backends([*self._generators, *self._judges])
        self.claimed = False


async def _to_the_end(work: Callable[[], Awaitable[object]]) -> None:
    """Run ``work`` to its end, however the caller is cancelled meanwhile, then let the
    cancellation go on.

    anyio's shield holds off anyio's (and trio's) cancellation, not asyncio's native one
    (``task.cancel()``, ``asyncio.timeout``, ``asyncio.wait_for``), which ended the work at
    its next await: a run directory left open (refused to the next engine of this process
    as in use, its files open for the process's life), a job for a worker thread dropped
    before the thread took it up. So ``work`` runs in a task of its own, shielded, which no
    native cancel of the caller's task reaches; the task group waits for it through any
    number of them and then raises the first.

    Raises:
        Exception: what ``work`` raised (a cancellation of the caller comes first).
    """
    failures: list[Exception] = []

    async def shielded() -> None:
        with anyio.CancelScope(shield=True):
            try:
                await work()
            except Exception as exc:  # raised below, not in a group of the task group's
                failures.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(shielded)
    if failures:
        raise failures[0]
