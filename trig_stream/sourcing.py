"""The source stage: the dataset read once, each sample queued for the models that owe it work.

A worker thread reads the dataset a chunk at a time (reading and decoding block). A malformed
record is set aside in the run directory's quarantine with its reason. A sample is queued
for each model that still owes it a judgement, with the (dimension, judge) pairs it owes: on
resume the journal says which are done, and a sample done for every model is counted and
passed over in the thread, without a trip through the event loop. Each model's buffer is
bounded, so reading stays a few samples ahead of generation however large the dataset.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import suppress

import anyio
import anyio.to_thread
from anyio.streams.memory import MemoryObjectSendStream

from trig_stream.backends.base import Generator, Judge, reads_source_images
from trig_stream.config import RunConfig
from trig_stream.dataset import DatasetSource
from trig_stream.dimensions import DIMENSIONS, Dimension
from trig_stream.errors import DatasetInterrupted, TrigStreamError
from trig_stream.hashing import seed_for
from trig_stream.journal import JournalState
from trig_stream.pipeline import RunContext, WorkItem, send_now
from trig_stream.quarantine_text import QUARANTINE
from trig_stream.records import QuarantinedRecord, Sample
from trig_stream.stats import Counters

SOURCE_CHUNK = 16
"""Work items read per worker-thread call: amortises the thread hop, bounds the read-ahead."""
SOURCE_SCAN = 4096
"""Records read in a row without a sample (left out, finished, quarantined) after which a
worker-thread call returns, with its work items so far: a stop or a cancel waits for one such
call at most, not for a scan of the dataset up to its next selected sample (a thread is not
cancelled), and ``records_read`` advances. ~4 ms of reading a call, where the hop is ~0.1 ms."""
STOP_AFTER_INTERRUPTED_READ_S = 10.0
"""How long a reading that a SIGINT cut short (:class:`~trig_stream.errors.DatasetInterrupted`)
waits for the stop that signal brings: the reading may end before the event loop has turned
the signal into the stop. A safety net: with none by then, the run fails with the error."""


class Owed:
    """What a run still owes each sample, from what its journal holds: the run's source
    stage asks it, and so does ``validate``, so that both count a finished sample alike.

    Args:
        models: the names of the run's models.
        judges: the run's judges, whose ``dimensions`` say which questions each one is asked.
        journal: what the journal held when the run opened.
        retry_errors: ask again the judgements whose status is ``error``.
    """

    def __init__(
        self,
        models: Sequence[str],
        judges: Sequence[Judge],
        journal: JournalState,
        *,
        retry_errors: bool,
    ) -> None:
        self._models = list(models)
        self._judges = list(judges)
        self._journal = journal
        self._retry_errors = retry_errors
        self._measured_pairs: dict[tuple[Dimension, ...], bool] = {}

    def todo(
        self, model: str, data_id: str, dimensions: tuple[Dimension, ...]
    ) -> tuple[tuple[Dimension, str], ...]:
        """The (dimension, judge) pairs of one sample and model not yet in the journal."""
        return tuple(
            (dimension, judge.name)
            for dimension in dimensions
            for judge in self._judges
            if judge.measures(dimension)
            and not self._journal.is_done(
                (model, data_id, dimension, judge.name), retry_errors=self._retry_errors
            )
        )

    def finished(self, data_id: str, dimensions: tuple[Dimension, ...]) -> bool:
        """Whether no model owes the sample a judgement (also when no judge measures its
        dimensions: see :meth:`measured`)."""
        return not any(self.todo(model, data_id, dimensions) for model in self._models)

    def measured(self, dimensions: tuple[Dimension, ...]) -> bool:
        """Whether a judge asks about one of these dimensions (asked once per pair: a resume
        asks it of every finished sample)."""
        measured = self._measured_pairs.get(dimensions)
        if measured is None:
            measured = self._measured_pairs[dimensions] = any(
                judge.measures(dimension) for judge in self._judges for dimension in dimensions
            )
        return measured


def work_left(
    config: RunConfig,
    generators: Sequence[Generator],
    judges: Sequence[Judge],
    journal: JournalState,
    *,
    retry_errors: bool,
    given_up: threading.Event,
) -> bool:
    """Whether the dataset holds a sample that a model still owes a judgement: the sample the
    source stage would queue first, looked for as it looks (a record it would quarantine is no
    work). Blocks: it reads the dataset up to that sample, to its end on a finished run.

    Args:
        config: the run's config.
        generators: the models.
        judges: the judges, whose ``dimensions`` say which questions each one is asked.
        journal: what the journal held when the run opened.
        retry_errors: ask again the judgements whose status is ``error``.
        given_up: once set, the reading ends early, its answer then meaningless (a thread
            its caller stopped waiting for).

    Raises:
        DatasetError: the dataset cannot be opened or is not in a TRIG format.
    """
    owed = Owed([g.name for g in generators], judges, journal, retry_errors=retry_errors)
    source = DatasetSource(
        config.dataset,
        config.run.task,
        finished=owed.finished,
        judged=journal.digests,
        source_images=reads_source_images(generators),
    )
    try:
        for record in source.scan(pause_every=SOURCE_SCAN):
            if isinstance(record, Sample):
                return True
            if record is None and given_up.is_set():
                break
    except DatasetInterrupted:
        return True  # not read to its end: the run's source stage reads it, or sees the stop
    return False


async def count_samples(
    config: RunConfig, generators: Sequence[Generator], counters: Counters
) -> None:
    """Count the samples the run selects into ``counters.samples_total``, for progress and
    the ETA only (a dataset that cannot be read fails the source stage itself). Cancelled, it
    leaves its worker thread behind, told to end: the thread only reads the dataset, and its
    number is dropped."""
    source = DatasetSource(
        config.dataset, config.run.task, source_images=reads_source_images(generators)
    )
    given_up = threading.Event()
    try:
        with suppress(TrigStreamError):
            counters.samples_total = await anyio.to_thread.run_sync(
                source.count, given_up, abandon_on_cancel=True
            )
    finally:
        given_up.set()


class SourceStage:
    """Reads the dataset and queues each model's work items.

    Args:
        context: the run's shared state.
        generators: the models, each with a buffer in the ``sends`` given to :meth:`run`.
        judges: the judges, whose ``dimensions`` say which questions each one is asked.
        journal: what the journal held when the run opened.
        retry_errors: ask again the judgements whose status is ``error``.
        running_gate: the event that is set while the run is not paused (a pause replaces
            it with a new one, hence a callable).
        judges_ready: awaited before the first work item is queued: opens the judges if the
            run left them closed (it found no work left when it opened).
    """

    def __init__(
        self,
        context: RunContext,
        generators: Sequence[Generator],
        judges: Sequence[Judge],
        journal: JournalState,
        *,
        retry_errors: bool,
        running_gate: Callable[[], anyio.Event],
        judges_ready: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._context = context
        self._models = [generator.name for generator in generators]
        self._source_images = reads_source_images(generators)
        self._judges = list(judges)
        self._journal = journal
        self._owed = Owed(self._models, judges, journal, retry_errors=retry_errors)
        self._running_gate = running_gate
        self._judges_ready = judges_ready
        self._first_refusal: str | None = None
        """Why the first quarantined record was refused (said when every one was)."""

    async def run(self, sends: dict[str, MemoryObjectSendStream[WorkItem]]) -> None:
        """Queue every model's work, then close its buffer (also on a stop or an error)."""
        context = self._context
        source = DatasetSource(
            context.config.dataset,
            context.config.run.task,
            finished=self._sample_finished,
            judged=self._journal.digests,
            source_images=self._source_images,
        )
        records = source.scan(pause_every=SOURCE_SCAN)
        try:
            while not context.stopping.is_set():
                try:
                    chunk = await anyio.to_thread.run_sync(self._read_chunk, source, records)
                except DatasetInterrupted:
                    # The SIGINT that cut the reading short is the run's stop: the dataset is
                    # not read (nor empty), its samples left are judged on resume.
                    with anyio.move_on_after(STOP_AFTER_INTERRUPTED_READ_S):
                        await context.stopping.wait()
                    if not context.stopping.is_set():
                        raise
                    break
                if chunk is None:
                    await anyio.to_thread.run_sync(context.run_dir.finish_quarantine)
                    context.counters.notes.extend(source.notes)
                    self._note_an_empty_selection(source)
                    self._note_unmeasured_samples()
                    context.counters.dataset_read = True
                    break
                for work in chunk:
                    gate = self._running_gate()
                    if not gate.is_set():
                        await gate.wait()
                    if context.stopping.is_set():
                        break
                    if self._judges_ready is not None:
                        await self._judges_ready()
                        self._judges_ready = None
                        if context.stopping.is_set():  # stopped while the judges opened
                            break
                    await send_now(sends[work.model], work)
                    counts = context.counters.model(work.model)
                    counts.queued += 1
                    counts.to_judge += len(work.todo)
        finally:
            for send in sends.values():
                send.close()

    def _read_chunk(
        self, source: DatasetSource, records: Iterator[Sample | QuarantinedRecord | None]
    ) -> list[WorkItem] | None:
        """The next work items, or None once the dataset is read to its end.

        Runs in a worker thread. At most SOURCE_CHUNK work items are read ahead of the
        buffers, and at most SOURCE_SCAN records without a sample are read per call.
        """
        counters = self._context.counters
        items: list[WorkItem] = []
        for record in records:
            if record is None:  # a pause: many records read, no sample among them
                break
            if isinstance(record, QuarantinedRecord):
                self._context.run_dir.quarantine(record)
                counters.quarantined += 1
                if record.data_id is not None:
                    # Its file, in an image folder, is no excess: quarantine.jsonl says why
                    # the record was set aside.
                    for model in self._models:
                        self._context.pass_over(model, record.data_id)
                if self._first_refusal is None:
                    self._first_refusal = record.reason
                continue
            counters.samples_read += 1
            items.extend(self._work_for(source, record))
            if len(items) >= SOURCE_CHUNK:
                break
        else:
            counters.records_read = source.records_read
            return items or None
        counters.records_read = source.records_read
        return items

    def _sample_finished(self, data_id: str, dimensions: tuple[Dimension, ...]) -> bool:
        # Called by the dataset reader (in its thread) before it builds a sample.
        if not self._owed.finished(data_id, dimensions):
            return False
        context = self._context
        counters = context.counters
        counters.samples_read += 1
        for model in self._models:  # a sample of the selection all the same
            context.pass_over(model, data_id)
        if not self._owed.measured(dimensions):
            counters.unmeasured += 1  # nothing to do, not something done
            return True
        for model in self._models:
            counters.model(model).skipped += 1
        return True

    def _note_unmeasured_samples(self) -> None:
        count = self._context.counters.unmeasured
        if not count:
            return
        # In TRIG's order of the dimensions: a frozenset's own order changes from run to run.
        measures = "; ".join(
            f"{judge.name}: {', '.join(sorted(judge.dimensions, key=DIMENSIONS.index))}"
            for judge in self._judges
            if judge.dimensions is not None
        )
        self._context.counters.notes.append(
            f"{count} sample(s) were not judged: no judge measures a dimension of their pair "
            f"({measures}); [dataset] dimensions or pairs can leave them out"
        )

    def _work_for(self, source: DatasetSource, sample: Sample) -> list[WorkItem]:
        dimensions = source.dimensions_to_judge(sample.dimensions)
        base_seed = self._context.config.run.seed
        items = []
        for model in self._models:
            todo = self._owed.todo(model, sample.data_id, dimensions)
            if todo:
                seed = seed_for(base_seed, model, sample.data_id)
                items.append(WorkItem(model, sample, seed, todo))
            else:
                self._context.counters.model(model).skipped += 1
                self._context.pass_over(model, sample.data_id)
        return items

    def _note_an_empty_selection(self, source: DatasetSource) -> None:
        # A run with nothing to do says why, when the reason is the dataset's filters or the
        # dataset itself, rather than ending as if it had judged everything.
        counters = self._context.counters
        if counters.samples_read:
            return
        if counters.quarantined and counters.quarantined == source.records_read:
            # Not a run that judged what there was: a run that was given nothing it could use.
            counters.notes.append(
                f"nothing was judged: every one of the {counters.quarantined} dataset "
                f"record(s) read was quarantined; the first for: {self._first_refusal}; all "
                f"the reasons are in {self._context.run_dir.path / QUARANTINE} "
                "(`trig-stream validate CONFIG` lists them without running)"
            )
            return
        section = self._context.config.dataset
        if not source.records_read:
            counters.notes.append(f"the dataset {section.path} holds no records")
        elif source.filtered_out + counters.quarantined == source.records_read:
            filters = ", ".join(
                f"{name} = {json.dumps(values)}"
                for name, values in (("pairs", section.pairs), ("dimensions", section.dimensions))
                if values
            )
            counts = f"{source.records_read} records read, all left out"
            if counters.quarantined:
                # Those the filters kept out would not have been judged anyway: the filters,
                # not the quarantined records, are why nothing was.
                counts = (
                    f"{source.records_read} records read, {source.filtered_out} left out and "
                    f"{counters.quarantined} quarantined (the first for: "
                    f"{self._first_refusal}; see {self._context.run_dir.path / QUARANTINE})"
                )
            counters.notes.append(
                f"no sample of the dataset matches its filters ({filters}): {counts}"
            )
