"""The persist stage: judgements become durable, then reach ``results`` and the live analysis.

It appends whatever judgements have landed to the journal and fsyncs once for them all
(group commit), shielded from cancellation, and only then counts them and hands them to
``results``. Earlier runs' judgements join the live analysis (:class:`RelationTracker`) in
the background, ahead of this run's, so the analysis sees the journal's order.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from itertools import islice

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from trig_stream.analysis.live import RelationTracker
from trig_stream.journal import JournalState, read_journal
from trig_stream.pipeline import RunContext, send_now, take_ready
from trig_stream.records import Judgement
from trig_stream.stats import ErrorLines

PERSIST_BATCH = 256
"""Most judgements written with one fsync."""
HISTORY_CHUNK = 2048
"""Earlier judgements parsed per worker-thread call when the live analysis catches up."""


class PersistStage:
    """Writes judgements to the journal, counts them, and passes them on to ``results``.

    Args:
        context: the run's shared state (its run directory and counters).
        journal_state: what the journal held when the run opened.
        relations: the live analysis this run's and earlier runs' judgements join.
        finished: called once every stage before this one has finished, before ``results``
            ends, so its consumer sees the run's final state.
    """

    def __init__(
        self,
        context: RunContext,
        journal_state: JournalState,
        relations: RelationTracker,
        *,
        finished: Callable[[], None],
    ) -> None:
        self._context = context
        self._journal_state = journal_state
        self._relations = relations
        self._finished = finished
        # The judges this run runs (the engine may be given others than the config's).
        self._error_lines = ErrorLines(several_judges=len(context.fingerprints) > 1)
        self._history_loaded = anyio.Event()
        if journal_state.lines == 0:  # nothing to wait for: this run's join as they land
            self._history_loaded.set()
        self._new_while_loading: list[Judgement] = []
        """This run's judgements that landed while earlier runs' were still loading."""
        self.first_judgement = anyio.Event()
        """Set once this run's first judgement is durable (or the run ends without one): side
        jobs wait for it, so a resume reaches its first new request before they compete for
        the interpreter (loading 100k earlier judgements first delayed it by ~1 s)."""

    async def run(
        self,
        receive: MemoryObjectReceiveStream[Judgement],
        result_send: MemoryObjectSendStream[Judgement],
    ) -> None:
        journal = self._context.run_dir.journal
        counters = self._context.counters
        async with receive, result_send:
            batch: list[Judgement] = []  # landed, not written yet
            try:
                while True:
                    try:
                        batch.append(await receive.receive())
                        take_ready(receive, batch, PERSIST_BATCH)
                    except anyio.EndOfStream:
                        # Every stage before this one has finished: the run is over. Say so
                        # before ``results`` ends, so its consumer sees the final state and a
                        # complete live analysis.
                        self.first_judgement.set()
                        await self._history_loaded.wait()
                        self._finished()
                        counters.ended_at = time.monotonic()
                        return
                    written, batch = batch, []
                    with anyio.CancelScope(shield=True):
                        await anyio.to_thread.run_sync(journal.append, written)
                    self.count(written)
                    self.first_judgement.set()
                    for judgement in written:
                        await send_now(result_send, judgement)
            except anyio.get_cancelled_exc_class():
                # A hard stop or a failure: what already landed in the buffer is still
                # written, whether this stage waited for it or for the consumer of results
                # (a stopped generator's last error judgements, say).
                take_ready(receive, batch, None)
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(journal.append, batch)
                self.count(batch)
                counters.ended_at = time.monotonic()
                raise

    async def load_history(self) -> None:
        """Add earlier runs' judgements to the live analysis, once this run's first has landed.

        They join in the background, so they never delay the first new request. Every line
        joins, those of keys this run asks again included (the ``error`` lines of a
        ``retry_errors`` run): this run's judgements join after them, so a new judgement
        replaces the old one in its slot, and a key this run does not reach (its sample left
        out of the dataset, a stop) keeps its old one, as in the journal.
        """
        state = self._journal_state
        lines = iter(read_journal(self._context.run_dir.journal.path, limit=state.lines))
        try:
            await self.first_judgement.wait()
            # A hard stop before they have joined leaves them out: it does not wait the
            # ~2 s of CPU per 100k judgements their parsing takes (the journal has them all).
            while chunk := await anyio.to_thread.run_sync(_take, lines, HISTORY_CHUNK):
                self._relations.extend(chunk)
        finally:
            # This run's judgements join after the earlier ones, as in the journal: the
            # analysis then sees the journal's order, and equals a batch analysis of it to
            # the last bit (its sums do not depend on how the loading and the run overlapped).
            self._relations.extend(self._new_while_loading)
            self._new_while_loading = []
            self._history_loaded.set()

    def count(self, batch: list[Judgement]) -> None:
        """Count durable judgements and add them to the live analysis."""
        counters = self._context.counters
        now = time.monotonic()
        if self._history_loaded.is_set():
            self._relations.extend(batch)
        else:
            self._new_while_loading += batch
        for judgement in batch:
            counts = counters.model(judgement.model)
            if judgement.status == "ok":
                counts.ok += 1
            elif judgement.status == "unscorable":
                counts.unscorable += 1
            else:
                counts.error += 1
                if (line := self._error_lines.line(judgement)) is not None:
                    counters.last_errors.append(line)
            counters.judged_at.append(now)


def _take(items: Iterator[Judgement], count: int) -> list[Judgement]:
    return list(islice(items, count))
