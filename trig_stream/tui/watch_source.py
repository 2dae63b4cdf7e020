"""Following a run that another process writes, from its run directory alone.

:class:`RunDirSource` reads ``manifest.json`` and tails ``journal.jsonl`` by file offset. It
only ever opens files for reading: it never takes the run lock and never writes in the run
directory, so attaching or closing a viewer cannot disturb the run. Whether a process still
writes it, and its pid, come from :func:`~trig_stream.locks.find_writer`.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Collection, Container
from pathlib import Path
from typing import Any, BinaryIO

import anyio

from trig_stream.analysis.live import RelationTracker
from trig_stream.backends.registry import build_judge
from trig_stream.config import RelationSection, RunConfig
from trig_stream.dataset import DatasetSource
from trig_stream.dataset_identities import SampleIdentities
from trig_stream.dimensions import Dimension
from trig_stream.files import open_regular_file
from trig_stream.journal import (
    JOURNAL,
    journal_unreadable,
    line_problem,
    open_journal,
    parse_journal_line,
)
from trig_stream.locks import Writer, find_writer
from trig_stream.manifest import Manifest, errors_asked_again, read_manifest
from trig_stream.quarantine_text import quarantine_lists, read_quarantine_list
from trig_stream.records import Judgement, JudgementKey, Status
from trig_stream.stats import ERRORS_KEPT, ErrorLines
from trig_stream.tui.snapshot import (
    CountRate,
    DashboardSnapshot,
    ModelProgress,
    RateHistory,
    RelationView,
    estimate_eta,
    judge_views,
)
from trig_stream.tui.sources import RELATIONS_EVERY_S, relation_views

READ_CHUNK = 4 << 20
"""Most journal bytes parsed per refresh, so a long journal is caught up over a few."""
LATENCY_WINDOW = 1024


MARK_BYTES = 64
"""Bytes before the read offset kept and compared on the next read."""


class JournalTail:
    """Reads the judgements appended to a journal since the last call.

    Only complete lines are consumed: a torn last line (the writer is mid-append, or crashed)
    stays unread until it is complete. A line that is complete but not a judgement is
    skipped and counted in :attr:`bad_lines`.

    A journal is appended to, but not only: a resume cuts a damaged last line off before it
    appends, and a run directory deleted and made anew holds another journal (maybe on the
    same inode). Each read checks that the file is the one read so far (device and inode),
    no shorter than what was read, and holds the same last bytes before the read offset;
    when not, it starts over from the beginning and says so in :attr:`restarted`.
    """

    def __init__(self, path: Path, *, chunk: int = READ_CHUNK) -> None:
        self.path = path
        self.chunk = chunk
        """Most bytes one :meth:`read` parses."""
        self.offset = 0
        self.lines = 0
        """Complete lines read so far, those that are not judgements included."""
        self.bad_lines = 0
        self.first_problem = ""
        """What was wrong with the first line that was not a judgement, after its number
        (from 1): ``line 9: Invalid JSON ...``, as ``status`` says it."""
        self.behind = False
        """The last read stopped at :attr:`chunk` bytes: more is waiting."""
        self.restarted = False
        """The last read found the journal rewritten, replaced or gone, and read it from the
        beginning: what the earlier reads returned no longer holds."""
        self._identity: tuple[int, int] | None = None
        self._mark = b""
        """The last bytes read (at most :data:`MARK_BYTES`), ending at :attr:`offset`."""

    def read(self) -> list[Judgement]:
        """The complete judgements written since the previous read, in journal order (from
        the beginning when :attr:`restarted`).

        Raises:
            RunDirError: the journal exists but cannot be read.
        """
        return [judgement for _, judgement in self.read_lines()]

    def read_lines(self) -> list[tuple[int, Judgement]]:
        """:meth:`read`, each judgement with the number of its line (from 0, counted as
        :func:`~trig_stream.journal.read_journal_lines` counts them).

        Raises:
            RunDirError: the journal exists but cannot be read.
        """
        self.restarted = False
        handle = open_journal(self.path)
        if handle is None:
            if self.offset or self.bad_lines:  # it was there: the run directory was emptied
                self._start_over(None)
            return []
        try:
            with handle:
                info = os.fstat(handle.fileno())
                identity = (info.st_dev, info.st_ino)
                if self._identity is None:
                    self._identity = identity
                elif self._rewritten(handle, identity, info.st_size):
                    self._start_over(identity)
                handle.seek(self.offset)
                data = b""
                while True:  # a line longer than a chunk is read whole, not waited on forever
                    part = handle.read(self.chunk)
                    data += part
                    if len(part) < self.chunk or b"\n" in part:
                        break
        except OSError as exc:
            raise journal_unreadable(self.path, exc) from None
        self.behind = len(part) == self.chunk
        end = data.rfind(b"\n") + 1
        judgements = []
        # Split at "\n" alone, as reading the file by lines does: the line numbers are the
        # ones the run counted (a line ending "\r\n" is still one line).
        for raw in data[:end].split(b"\n")[:-1]:  # [:-1]: what follows the last "\n"
            try:
                judgements.append((self.lines, parse_journal_line(raw)))
            except ValueError as exc:
                self.bad_lines += 1
                # Numbered from 1, as `status` names it (without a number, the warning read
                # as if about the journal's first line).
                if not self.first_problem:
                    self.first_problem = f"line {self.lines + 1}: {line_problem(exc)}"
            self.lines += 1
        self.offset += end
        self._mark = (self._mark + data[:end])[-MARK_BYTES:]
        return judgements

    def _rewritten(self, handle: BinaryIO, identity: tuple[int, int], size: int) -> bool:
        if identity != self._identity or size < self.offset:
            return True
        handle.seek(self.offset - len(self._mark))
        return handle.read(len(self._mark)) != self._mark

    def _start_over(self, identity: tuple[int, int] | None) -> None:
        self._identity = identity
        self.offset = 0
        self.lines = 0
        self._mark = b""
        self.bad_lines = 0
        self.first_problem = ""
        self.restarted = True


class RunDirSource:
    """Snapshots of a run directory that another process may still be writing; read-only.

    Args:
        run_dir: the run directory (holding ``manifest.json``).
        relations_every_s: least time between two relation analyses.
        clock: monotonic seconds, for rates.
        wall_clock: seconds since the epoch, for the elapsed time.
    """

    control = None

    def __init__(
        self,
        run_dir: Path,
        *,
        relations_every_s: float = RELATIONS_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.run_dir = run_dir
        self.relations_every_s = relations_every_s
        self._clock = clock
        self._wall_clock = wall_clock
        self.tail = JournalTail(run_dir / JOURNAL)
        self._lock = anyio.Lock()
        self._manifest: Manifest | None = None
        self._manifest_key: tuple[int, int, int, int] | None = None
        self._configured: tuple[dict[str, Any], float] | None = None
        """The config the totals below were counted for, and when the run that wrote it
        started (the manifest's ``updated_at``): a new run counts its dataset again."""
        self._thresholds = RelationSection()
        self._samples_total: int | None = None
        self._config_models: list[str] = []
        self._config: RunConfig | None = None
        self._selected: Callable[[JudgementKey], bool] | None = None
        """Which keys the config's run asks (:func:`asked_by_config`), read from its dataset
        with the totals; None when it cannot be read here (every key then counts)."""
        self._judgements_total = 0
        """The judgements each model makes of the samples, when the dataset is readable."""
        self._unmeasured = 0
        """The samples none of whose dimensions a judge measures: done, with nothing to judge."""
        self._quarantine_key: tuple[str, int, int, int, int] | None = None
        self._quarantined: int | None = None
        self._refused: frozenset[int] = frozenset()
        """The indexes of the dataset records in the quarantine list shown: not the run's
        samples, so not counted in its totals."""
        self._counted: tuple[object, frozenset[int], bool] | None = None
        """The config, refusals and journal state the totals were last counted for."""
        self._identities: SampleIdentities | None = None
        """The identities of the dataset's selected records, read once per config (see
        :meth:`_count_totals`)."""
        self._forget_the_journal()

    def _forget_the_journal(self) -> None:
        # Everything read from the journal: a journal rewritten under the viewer (cut by a
        # resume, or its run directory made anew) is read again from its start.
        self._tracker = RelationTracker(self._thresholds)
        self._status: dict[JudgementKey, Status] = {}
        self._error_lines: dict[JudgementKey, int] = {}
        """The line of each key whose latest judgement is an ``error``: one that a run with
        ``--retry-errors`` asks again, if written before it started."""
        self._appended = 0
        """Judgements read, a key asked again (``--retry-errors``) each time: the rate's."""
        self._counts: dict[str, Counter[Status]] = {}
        self._asked_judged: Counter[str] = Counter()
        """Per model, the keys with a judgement that the latest config asks (each once, its
        latest status any): the work of the run written, as :attr:`_selected` tells it."""
        self._images: dict[str, set[str]] = {}
        self._latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._errors: dict[JudgementKey, str] = {}
        """The lines of the latest errors (at most :data:`ERRORS_KEPT`), oldest first, each
        under the key it tells of: a later judgement of that key replaces the error."""
        self._error_text = ErrorLines(several_judges=False)  # told by each manifest read
        self._last_at: float | None = None
        self._judged_rate = CountRate()
        self._samples_rate = CountRate()
        self._history = RateHistory()
        self._caught_up = False
        """The journal was read to its end once: the rates count from there."""
        self._relations: tuple[RelationView, ...] = ()
        self._relations_at: float | None = None

    async def snapshot(self) -> DashboardSnapshot:
        """Read what was appended since the last call (in a worker thread) and describe it.

        Raises:
            RunDirError: the directory has no readable manifest.
        """
        async with self._lock:
            return await anyio.to_thread.run_sync(self.poll)

    def poll(self) -> DashboardSnapshot:
        """:meth:`snapshot`, blocking: for threads and scripts.

        The state is ``finished`` only once no process writes the run and the journal is read
        to its end; while a long journal is read (:attr:`JournalTail.behind`), a writer gone
        already shows as ``catching up``.
        """
        # Asked before the journal is read: a writer that is gone then has appended its last
        # line, so what follows reads it. Asked after, the lines it appended meanwhile were
        # left unread by a snapshot that said "finished". And before the manifest is read: a
        # run writes its pid once its manifest is written, so a writer seen with its pid has
        # its own manifest read here, not the run before's.
        writer = find_writer(self.run_dir)
        manifest = self._read_manifest()
        judgements = self.tail.read_lines()
        if self.tail.restarted:
            self._forget_the_journal()
            self._configured = None  # a run directory made anew may hold another dataset
            manifest = self._read_manifest()
        for line, judgement in judgements:
            self._add(judgement, line)
        # A run still opening has not begun its quarantine list: one there is the run before's.
        quarantined = self._count_quarantined(running=writer is not None and not writer.starting)
        self._count_totals()
        now = self._clock()
        asked_again = self._asked_again(manifest, writer)
        finished = self._finished_samples(manifest, asked_again)
        per_s: float | None = None
        samples_per_s = 0.0
        if self._caught_up:
            per_s = self._judged_rate.add(now, self._appended)
            samples_per_s = self._samples_rate.add(now, finished - self._unmeasured)
            self._history.add(now, per_s)
        elif not self.tail.behind:
            # What the journal held when the viewer came (read over a few polls when long)
            # was written before it: no progress to measure (9443/s, attaching to a large
            # run). The rates count from the poll that read its end.
            self._caught_up = True
            self._judged_rate.add(now, self._appended)
            self._samples_rate.add(now, finished - self._unmeasured)
        if writer is not None:
            state = "running"
        else:
            state = "catching up" if self.tail.behind else "finished"
            total = self._samples_total
            if state == "finished" and total is not None and finished < total:
                # No process writes it, yet work is left (a stopped run): not "finished".
                state = "not running"
        if self._relations_at is None or now - self._relations_at >= self.relations_every_s:
            self._relations_at = now
            self._relations = relation_views(self._tracker, self._tracker.groups())
        alerts: list[str] = []
        if writer is not None and writer.starting:
            message = f"watching read-only: a run is starting ({writer}): reading its journal"
        elif writer is not None:
            message = f"watching read-only: run written by {writer}"
            pid = "an unknown pid" if writer.pid is None else f"pid {writer.pid}"
            alerts.append(f"written by {pid}")
        else:
            message = "watching read-only: no process is writing this run"
        if asked_again:
            count = asked_again.total()
            message += (
                f"; asking again {count} error judgement{'s' * (count != 1)} (--retry-errors)"
            )
        if self.tail.behind:
            message += " (catching up with the journal)"
        if self.tail.bad_lines:
            message += (
                f"; {self.tail.bad_lines} journal line(s) are not judgements and were skipped "
                f"(the first: {self.tail.first_problem})"
            )
            bad = self.tail.bad_lines
            alerts.append(f"{bad} bad journal line{'s' * (bad != 1)} skipped")
        ordered = sorted(self._latencies)
        models = list(manifest.generators) + sorted(set(self._counts) - set(manifest.generators))
        return DashboardSnapshot(
            kind="watch",
            run_name=manifest.run_name,
            task=manifest.task,
            run_dir=str(self.run_dir),
            state=state,
            elapsed_s=self._elapsed(manifest, running=writer is not None),
            samples_total=self._samples_total,
            samples_done=finished,
            eta_s=self._eta(manifest, finished, samples_per_s, running=writer is not None),
            models=tuple(self._progress(name) for name in models),
            judges=judge_views(manifest.config),
            judgements_per_s=per_s,
            judgements_history=self._history.values(),
            judge_p50=_rank(ordered, 0.5),
            judge_p95=_rank(ordered, 0.95),
            relations=self._relations,
            last_errors=tuple(self._errors.values()),
            quarantined=quarantined,
            message=message,
            alerts=tuple(alerts),
        )

    def _count_quarantined(self, *, running: bool) -> int | None:
        """The dataset records refused: by the run writing the directory so far, or by the
        last one that read the dataset through, else by one killed before it did (see
        :func:`~trig_stream.quarantine_text.quarantine_lists`).
        Counted again only when the file changed; None when it cannot be read."""
        for path in quarantine_lists(self.run_dir, running=running):
            name = path.name
            try:
                with open_regular_file(path) as handle:  # a pipe there would wait forever
                    info = os.fstat(handle.fileno())
                    key = (name, info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
                    if key != self._quarantine_key:
                        self._quarantined, self._refused = read_quarantine_list(handle)
                        self._quarantine_key = key
                    return self._quarantined
            except FileNotFoundError:
                continue
            except OSError:
                return None
        self._refused = frozenset()
        return 0

    def _eta(
        self, manifest: Manifest, finished: int, samples_per_s: float, *, running: bool
    ) -> float | None:
        if not running:
            return 0.0
        total = self._samples_total
        if manifest.retry_errors is None and total is not None and finished >= total:
            # Every judgement is written, yet a process runs: perhaps asking the errors again
            # (--retry-errors), which an older trig-stream did not record in the manifest.
            # No end to foresee, and none is "now".
            return None
        return estimate_eta(total, finished, samples_per_s)

    def _asked_again(self, manifest: Manifest, writer: Writer | None) -> Counter[str]:
        """Per model, the ``error`` judgements the running process asks again: none while it
        opens (the manifest is still the run before's until it writes its pid), nor with no
        process running."""
        if writer is None or writer.starting or not manifest.retry_errors:
            return Counter()
        asked = errors_asked_again(manifest, self._selected)
        if asked is None:
            return Counter()
        return Counter(key[0] for key, line in self._error_lines.items() if asked(key, line))

    def _finished_samples(self, manifest: Manifest, asked_again: Counter[str]) -> int:
        # As the engine's dashboard counts them: the share of each model's judgements that
        # are written, averaged over the models; a sample one model judged and another has
        # still to make is not done, nor is one whose error is being asked again. Only the
        # judgements the latest config asks count: a resume that filters other pairs of the
        # dataset has none of its work done by the earlier run's.
        models = self._config_models or list(manifest.generators)
        if not models or not self._samples_total:
            return 0
        if self._selected is None:
            judged = {model: self._counts.get(model, Counter()).total() for model in models}
        else:
            judged = {model: self._asked_judged[model] for model in models}
        done = sum(judged[model] - asked_again[model] for model in models)
        planned = self._judgements_total * len(models)
        share = min(done / planned, 1.0) if planned else 1.0
        # A sample no judge measures is done, with nothing to judge, as the engine counts it.
        measured = self._samples_total - self._unmeasured
        return self._unmeasured + int(measured * share)

    def _read_manifest(self) -> Manifest:
        # A resume may add models and judges, or lift a limit: read it again whenever it was
        # rewritten, and count the totals again whenever its config changed or a new run
        # wrote it (its dataset may have grown under the same config).
        try:
            info = (self.run_dir / "manifest.json").stat()
            key = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
        except OSError:
            key = None
        if self._manifest is None or key is None or key != self._manifest_key:
            self._manifest = read_manifest(self.run_dir)
            self._manifest_key = key
        # The judges that ran, by name (every run's: the journal holds their lines), not the
        # config's: an engine may be given others.
        self._error_text.several_judges = len(self._manifest.judges) > 1
        configured = (self._manifest.config, self._manifest.updated_at)
        if configured != self._configured:
            self._configured = configured
            self._configure(self._manifest)
        return self._manifest

    def _configure(self, manifest: Manifest) -> None:
        self._samples_total = None
        self._judgements_total = self._unmeasured = 0
        self._config_models = []
        self._config, self._selected = None, None
        self._identities = None
        self._asked_judged = Counter()
        try:
            config = RunConfig.model_validate(manifest.config)
        except ValueError:
            # Stored by an older trig-stream and refused by today's bounds (a backoff over an
            # hour, say): its thresholds and models still hold, as `report` reads them.
            self._configure_from_parts(manifest.config)
            return
        self._config = config
        self._counted = None
        self._thresholds = self._tracker.thresholds = config.relation or RelationSection()
        self._config_models = [generator.name for generator in config.generators]

    def _count_totals(self) -> None:
        """Count the samples and judgements of the latest config's run from its dataset, again
        whenever the quarantine list changed: the records it refused (an empty prompt, a
        source image missing, a repeated data_id) are none of its samples. Counted as the
        run reads its dataset, they stay out of the total (else a finished run showed as
        stopped with samples left, which no resume would ever judge), and a ``limit`` that
        the run filled with other records past them is filled here too.

        The dataset's identity columns are read once per config: a count after another
        refusal selects again from what was read (a quarantine line each poll re-read a
        dataset of 200k records each time, 2.5 s), reading further only when a ``limit``
        needs records past them."""
        config = self._config
        # Again once the journal is read to its end: a refused record judged before (in
        # a line not read yet while catching up) still took its place under the limit.
        counted = (self._configured, self._refused, self.tail.behind)
        if config is None or counted == self._counted:
            return
        self._counted = counted
        self._samples_total = None
        self._judgements_total = self._unmeasured = 0
        self._selected = None
        self._asked_judged = Counter()
        # As the run has it: a record with only errors judged nothing (see journal digests).
        judged = {key[1] for key, status in self._status.items() if status != "error"}
        limit = config.dataset.limit
        identities = self._identities
        samples = None
        if identities is not None:
            samples = identities.selected(limit, refused=self._refused, judged=judged)
        if samples is None:
            # Under a limit, room for as many refusals again before reading further.
            at_least = None if limit is None else limit + 2 * len(self._refused)
            try:
                source = DatasetSource(config.dataset, config.run.task, source_images=False)
                identities = self._identities = source.sample_identities(at_least=at_least)
            except Exception:  # a dataset moved or gone: the ETA stays unknown
                return
            samples = identities.selected(limit, refused=self._refused, judged=judged)
            assert samples is not None, "read to the end, or far enough to fill the limit"
        self._samples_total = len(samples)
        self._judgements_total, self._unmeasured = _work_per_model(config, samples)
        self._selected = asked_by_config(config, samples)
        if self._selected is not None:  # once per count: later keys are counted as read
            asked = self._selected
            self._asked_judged = Counter(key[0] for key in self._status if asked(key))

    def _configure_from_parts(self, stored: dict[str, Any]) -> None:
        """The thresholds and models of a stored config that does not validate whole; the
        sample counts, which need its dataset section as the run read it, stay unknown."""
        with contextlib.suppress(ValueError):
            relation = RelationSection.model_validate(stored.get("relation") or {})
            self._thresholds = self._tracker.thresholds = relation
        generators = stored.get("generators")
        if isinstance(generators, list):
            self._config_models = [
                name
                for entry in generators
                if isinstance(entry, dict) and isinstance(name := entry.get("name"), str)
            ]

    def _add(self, judgement: Judgement, line: int) -> None:
        # The last judgement of a key wins, as in the journal: a retried error is replaced.
        self._appended += 1
        model = judgement.model
        key = judgement.key
        counts = self._counts.setdefault(model, Counter())
        previous = self._status.get(key)
        if previous is not None:
            counts[previous] -= 1
        elif self._selected is not None and self._selected(key):
            self._asked_judged[model] += 1
        self._status[key] = judgement.status
        counts[judgement.status] += 1
        if judgement.status == "error":
            self._error_lines[key] = line
        elif previous == "error":
            del self._error_lines[key]
        if judgement.image is not None:
            self._images.setdefault(model, set()).add(judgement.data_id)
        if judgement.status == "error":
            if (error := self._error_text.line(judgement)) is not None:
                self._errors.pop(key, None)  # told again: among the latest
                self._errors[key] = error
                if len(self._errors) > ERRORS_KEPT:
                    del self._errors[next(iter(self._errors))]
        else:
            # Asked again (--retry-errors) and answered: the error no longer stands.
            self._errors.pop(key, None)
            if judgement.latency_s > 0:
                self._latencies.append(judgement.latency_s)
        self._last_at = judgement.created_at
        self._tracker.add(judgement)

    def _progress(self, name: str) -> ModelProgress:
        counts = self._counts.get(name, Counter())
        return ModelProgress(
            name=name,
            images=len(self._images.get(name, ())),
            ok=counts["ok"],
            unscorable=counts["unscorable"],
            error=counts["error"],
        )

    def _elapsed(self, manifest: Manifest, *, running: bool) -> float | None:
        end = self._wall_clock() if running else self._last_at
        return None if end is None else max(end - manifest.updated_at, 0.0)


def _rank(ordered: list[float], share: float) -> float | None:
    if not ordered:
        return None
    return ordered[round(share * (len(ordered) - 1))]


def asked_by_config(
    config: RunConfig,
    samples: dict[str, tuple[Dimension, ...]] | None = None,
    *,
    refused: Collection[int] = (),
    judged: Container[str] = (),
) -> Callable[[JudgementKey], bool] | None:
    """Whether a run of ``config`` asks about a judgement's key: its sample is one the
    dataset's filters and limit select (read from the identity columns), its dimension one
    judged of it, its judge one of the config that measures that dimension. A key outside
    that (a sample removed from the dataset or filtered out since, a dimension no longer
    measured) is never asked, also by ``--retry-errors``. None when the dataset or a judge
    cannot be read here.

    Args:
        config: the run's config.
        samples: its samples (:meth:`~trig_stream.dataset.DatasetSource.selected_samples`),
            when already read; else they are read from its dataset.
        refused: when ``samples`` are read here, the indexes of the records the run
            quarantined, which are none of them (as ``selected_samples`` takes it).
        judged: when ``samples`` are read here, the data_ids with a judgement other than an
            ``error`` (as ``selected_samples`` takes it).
    """
    try:
        judges = {entry.name: build_judge(entry, config) for entry in config.judges}
        if samples is None:
            source = DatasetSource(config.dataset, config.run.task, source_images=False)
            samples = source.selected_samples(refused=refused, judged=judged)
    except Exception:  # a dataset moved or gone, a backend this machine lacks
        return None
    selected = samples

    def asked(key: JudgementKey) -> bool:
        dimensions = selected.get(key[1])
        judge = judges.get(key[3])
        if dimensions is None or judge is None:
            return False
        return key[2] in dimensions and judge.measures(key[2])

    return asked


def _work_per_model(
    config: RunConfig, samples: dict[str, tuple[Dimension, ...]]
) -> tuple[int, int]:
    """The judgements a model makes of the selected samples (each with the dimensions judged
    of it), and the samples it makes none of: each judge is asked about the dimensions it
    measures (a metric's judge, some only)."""
    dimensions = Counter(d for judged in samples.values() for d in judged)
    try:
        judges = [build_judge(entry, config) for entry in config.judges]  # nothing loads
    except Exception:  # a backend this machine lacks: every judge counted on every dimension
        return len(config.judges) * dimensions.total(), 0
    judgements = sum(
        count * sum(judge.measures(d) for judge in judges) for d, count in dimensions.items()
    )
    unmeasured = sum(
        not any(judge.measures(d) for judge in judges for d in judged)
        for judged in samples.values()
    )
    return judgements, unmeasured
