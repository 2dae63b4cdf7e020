"""Micro-batching of concurrent judge requests for in-process models.

An in-process judge (a VLM through transformers, an image classifier) is much faster per item
when it sees several items at once, while the engine calls ``judge()`` once per (image,
dimension), concurrently. :class:`MicroBatcher` turns those calls into batches: every call
puts its item on a queue and waits for the device; whoever gets the device takes everything
waiting (up to ``batch_size``), runs it as one batch in a worker thread and hands each caller
its result. A batch never waits to fill up: under light load it holds one item, under heavy
load the queue fills while the previous batch runs and the next one is full.

There is no background task: the batch runs in the task of one of its callers, so the batcher
needs no task group and cannot outlive the requests that use it. (A batching task in a task
group opened by ``Judge.open()`` and left in ``Judge.aclose()`` would cross the engine's own
scopes: the engine closes judges inside a shielded cancel scope, which anyio and Trio reject
as a corrupted cancel-scope stack.)

Callers are served in arrival order: the device's capacity limiter queues its waiters first
in, first out, and batches are taken from the queue in the same order, so by the time a
caller gets the device its item has either been run by an earlier caller or heads the queue.

A graceful stop (:meth:`MicroBatcher.stop_waiting`) lets a running batch finish and starts
no other: whoever gets the device after it settles every request still queued as
:class:`~trig_stream.errors.NotAsked`, which the run leaves to the resume. A hard stop (a
cancellation of the caller running it) does not wait for it: the thread finishes the batch on
its own, its results dropped, and :func:`~trig_stream.backends.threads.threads_left_behind`
counts it until then (for the judge instance too, which another engine refuses meanwhile); a
later batch of the same batcher waits for it in its own thread, so the device still runs one
batch at a time. Closing the batcher with :meth:`MicroBatcher.aclose` hands it the model's
release, which runs once no batch runs any more: at once, or in the thread of the batch left
running, after it ends (counted by ``threads_left_behind`` until then). Released while that
batch still ran, the model was freed under it, or, guarded by a lock, the release waited for
the hung batch and so did the stop.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar, cast

import anyio

from trig_stream.backends.threads import call_left_behind_on_cancel
from trig_stream.errors import NotAsked, RetryableError

In = TypeVar("In")
Out = TypeVar("Out")

logger = logging.getLogger(__name__)

BatchFunction = Callable[[Sequence[In]], Sequence[Out | Exception]]
"""Blocking: one result per item, in order; a failed item is its exception."""


class _Pending(Generic[In, Out]):
    __slots__ = ("done", "item", "outcome")

    def __init__(self, item: In) -> None:
        self.item = item
        self.done = False
        self.outcome: Out | Exception | None = None

    def settle(self, outcome: Out | Exception) -> None:
        self.outcome = outcome
        self.done = True


class MicroBatcher(Generic[In, Out]):
    """Gathers concurrent :meth:`submit` calls into batches run one at a time in a thread.

    Args:
        run_batch: the blocking batch function (see :data:`BatchFunction`); it should catch
            per-item failures itself, since an exception it raises fails the whole batch.
        batch_size: the most items in one batch.
        buffer: the most items waiting at once; the engine's concurrency limit for the judge
            is the natural value, as it keeps :meth:`submit` from ever blocking on the queue.
        device: the capacity limiter of the device (one token: one batch at a time on it).
            Judges that share a device may share one; by default each batcher has its own.
        backend: what runs the batches, for messages ("judge 'x'").
        instance: the judge instance the batches are of: a batch a hard stop left running
            counts for it in :func:`~trig_stream.backends.threads.threads_left_behind`, so
            another engine refuses the instance until that batch (and the release after
            it) has ended.
    """

    def __init__(
        self,
        run_batch: BatchFunction[In, Out],
        *,
        batch_size: int,
        buffer: int,
        device: anyio.CapacityLimiter | None = None,
        backend: str = "the judge",
        instance: object = None,
    ) -> None:
        if batch_size < 1 or buffer < 1:
            raise ValueError("batch_size and buffer must be at least 1")
        self._run_batch = run_batch
        self.batch_size = batch_size
        # Bounded by the number of callers that may wait at once (see ``buffer`` above).
        self._send, self._receive = anyio.create_memory_object_stream[_Pending[In, Out]](buffer)
        self._device = device or anyio.CapacityLimiter(1)
        self._running = threading.Lock()  # one batch on the device at a time
        # Guards the three below, which worker threads read and change.
        self._state = threading.Lock()
        self._in_threads = 0  # batches handed to a worker thread that have not ended
        self._closed = False
        self._release: Callable[[], None] | None = None  # left to the last batch's thread
        self._backend = backend
        self._instance = instance
        self._stopping = False  # set by stop_waiting(): no batch starts any more
        self.batches = 0
        """Batches run so far."""
        self.largest_batch = 0
        """The size of the largest batch run so far."""

    @property
    def waiting(self) -> int:
        """Requests queued for a batch that no batch has taken yet."""
        return self._receive.statistics().current_buffer_used

    async def submit(self, item: In) -> Out:
        """Run ``item`` in the next batch the device takes, and return its result.

        Raises:
            Exception: whatever the batch function returned or raised for this item.
        """
        pending: _Pending[In, Out] = _Pending(item)
        await self._send.send(pending)
        async with self._device:
            while not pending.done:
                await self._run_waiting()
        # ``done`` says it was settled; the outcome itself may be None (a metric's "nothing
        # to measure").
        outcome = pending.outcome
        if isinstance(outcome, Exception):
            raise outcome
        return cast("Out", outcome)

    def stop_waiting(self) -> None:
        """A graceful stop: the batch running finishes, and no batch starts after it; each
        request still queued for one raises :class:`~trig_stream.errors.NotAsked` from its
        :meth:`submit` instead. Called in the event loop's thread; it does not block."""
        self._stopping = True

    async def _run_waiting(self) -> None:
        if self._stopping:
            self._settle_not_asked()
            return
        batch: list[_Pending[In, Out]] = []
        while len(batch) < self.batch_size:
            try:
                batch.append(self._receive.receive_nowait())
            except anyio.WouldBlock:
                break
        if not batch:  # cannot happen: the caller's own item is still queued
            raise RuntimeError("micro-batcher: a waiting item is missing from the queue")
        try:
            outcomes = await call_left_behind_on_cancel(
                self._run_one_at_a_time,
                [pending.item for pending in batch],
                backend=self._backend,
                instance=self._instance,
            )
            if len(outcomes) != len(batch):
                raise RuntimeError(
                    f"batch function returned {len(outcomes)} results for {len(batch)} items"
                )
        except Exception as exc:
            outcomes = [exc] * len(batch)
        except anyio.get_cancelled_exc_class():
            # A hard stop does not wait for the batch (a hung model would hold it for good):
            # its thread finishes it and its results are dropped. Items taken off the queue
            # must be settled all the same, as the others of the batch wait for them; a
            # caller not cancelled itself tries again.
            abandoned = RetryableError(
                f"{self._backend}: the batch holding this request was abandoned (the request "
                "running it was cancelled)"
            )
            for pending in batch:
                pending.settle(abandoned)
            raise
        for pending, outcome in zip(batch, outcomes, strict=True):
            pending.settle(outcome)
        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(batch))

    def _settle_not_asked(self) -> None:
        """Settle every request queued as not asked: a graceful stop owes them to the resume,
        and their callers, waiting for the device, find them done as they get it."""
        while True:
            try:
                pending = self._receive.receive_nowait()
            except anyio.WouldBlock:
                return
            pending.settle(NotAsked(f"{self._backend}: the run stopped before it was asked"))

    def _run_one_at_a_time(self, items: Sequence[In]) -> Sequence[Out | Exception]:
        with self._state:
            if self._closed:  # its caller was cancelled before a worker thread took it up
                raise RuntimeError(f"{self._backend} was closed before this batch started")
            self._in_threads += 1
        try:
            # A batch left running by a cancelled caller still holds the device: the next
            # one waits for it here, in its own thread.
            with self._running:
                with self._state:
                    closed = self._closed
                if closed:  # left behind too, waiting for the batch before it
                    raise RuntimeError(f"{self._backend} was closed before this batch started")
                return self._run_batch(items)
        finally:
            with self._state:
                self._in_threads -= 1
                release = self._release if self._in_threads == 0 else None
                if release is not None:
                    self._release = None
            if release is not None:
                self._release_left_behind(release)

    def _release_left_behind(self, release: Callable[[], None]) -> None:
        # In the thread of the last batch a hard stop left running: nobody waits to hear
        # of a failure, so it is logged.
        try:
            release()
        except Exception:
            logger.warning(
                "%s: releasing its model after its last batch failed", self._backend, exc_info=True
            )

    def close(self) -> None:
        """Release the queue; later :meth:`submit` calls fail with ``ClosedResourceError``,
        and no batch starts any more (one a cancelled caller left to a worker thread that
        has not started it yet is dropped)."""
        with self._state:
            self._closed = True
        self._send.close()
        self._receive.close()

    async def aclose(self, release: Callable[[], None] | None = None) -> None:
        """:meth:`close`, then ``release`` (what frees the model; blocking) once no batch runs.

        With no batch running it runs here, in a worker thread. A batch a hard stop left
        running (see the module) still uses the model, so ``release`` runs after it, in its
        thread, and this returns at once; ``threads_left_behind`` counts that thread until
        the release has ended.
        """
        self.close()
        with self._state:
            if self._in_threads:
                self._release = release
                return
        if release is not None:
            await anyio.to_thread.run_sync(release)
