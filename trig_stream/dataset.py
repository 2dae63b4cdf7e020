"""Reading TRIG prompts: legacy JSON files and parquet files, streamed and checked.

Both of TRIG's formats are read: the JSON lists of upstream's repository (key ``dimension``,
images in a separate folder named by ``img_id``) and the parquet files of the Hugging Face
dataset (key ``dimensions``, images embedded). Parquet is scanned in small batches with
polars, so the 18.8 GB image-editing split never sits in memory; embedded images stay encoded
bytes until a generator asks for them. The same records as JSON Lines (one object per line,
``.jsonl``) are read a line at a time. (The files are read in :mod:`trig_stream.dataset_formats`;
a record's identity and text are checked in :mod:`trig_stream.record_checks`, its source image
in :mod:`trig_stream.source_image_checks`; here the records are selected and made samples.)

A malformed record does not stop a run: it comes out as a :class:`QuarantinedRecord` carrying
the reason, and the engine writes it to the run's ``quarantine.jsonl``.
"""

from __future__ import annotations

import stat
import threading
from collections import Counter
from collections.abc import Callable, Collection, Container, Iterator, Mapping
from pathlib import Path
from typing import Any

from trig_stream.config import DatasetSection
from trig_stream.dataset_formats import read_json, read_json_lines, read_parquet
from trig_stream.dataset_identities import SampleIdentities
from trig_stream.dimensions import Dimension, Task, pair_name, split_pair, unordered_pair
from trig_stream.errors import DatasetError
from trig_stream.files import file_kind
from trig_stream.hashing import sample_digest
from trig_stream.quarantine_text import storable, without_images
from trig_stream.record_checks import (
    CaseDuplicate,
    Rejected,
    TakenIds,
    check_unicode,
    record_identity,
)
from trig_stream.records import (
    QuarantinedRecord,
    RecordedPair,
    Sample,
    SampleAsked,
    storable_text,
)
from trig_stream.source_image_checks import source_image, source_name


class ChangedSinceJudged(Rejected):
    """A record asks something else than when it was judged in the run directory: refused,
    yet still one of the run's samples (its judgements are kept), so it counts toward
    ``limit``."""


class DatasetSource:
    """Iterates the samples a run uses, in dataset order, with malformed records set aside.

    Args:
        section: the ``[dataset]`` config section (paths already resolved).
        task: the run's task; p2p and s2p samples need a source / reference image.
        finished: says whether a selected sample (by data_id and the dimensions of its pair
            that are judged) needs no more work;
            such samples count towards ``limit`` but are passed over without being built,
            and so do samples quarantined that were judged before (in ``judged``: changed
            since, or their source image gone), whose judgements stay.
            On resume most samples are finished, and building them would dominate the
            time to the first new request.
        judged: data_id -> the :attr:`~trig_stream.records.Sample.digest` recorded when the
            sample was judged (a resumed run's journal), or the pair alone for judgements
            older than the digest (:class:`~trig_stream.records.RecordedPair`). A sample
            that asks something else now (its prompt, pair, item or source image name
            edited since; its pair, where only that was recorded) is quarantined: its
            earlier judgements answer the old question, and judging the rest of it would
            mix the two versions in one run.
        source_images: whether a generator of the run reads p2p / s2p source images
            (:attr:`~trig_stream.backends.base.Generator.reads_source_image`). Without one,
            a sample's source image is neither looked up nor decoded, nor is ``image_root``
            needed: judging images already made asks the judge about them alone. The
            sample keeps its ``img_id``, so its digest is the same either way.
    """

    def __init__(
        self,
        section: DatasetSection,
        task: Task,
        *,
        finished: Callable[[str, tuple[Dimension, ...]], bool] | None = None,
        judged: Mapping[str, SampleAsked] | None = None,
        source_images: bool = True,
    ) -> None:
        self.section = section
        self.task = task
        self.source_images = source_images
        self._finished = finished
        self._judged = judged or {}
        self._pairs = {unordered_pair(*split_pair(p)) for p in section.pairs}
        self._dimensions = set(section.dimensions)
        self.records_read = 0
        """Records read so far by the last iteration, every kind included."""
        self.filtered_out = 0
        """Of those, the well-formed ones the ``pairs`` and ``dimensions`` filters left out."""
        self.limit_reached = False
        """Whether the last iteration stopped at ``limit``, with records left unread."""
        self.notes: list[str] = []
        """What the reading left out of the dataset, each said once however often it is
        read: the parquet files of run directories inside a dataset folder."""

    def __iter__(self) -> Iterator[Sample | QuarantinedRecord]:
        """Yield each selected sample, or a quarantine record for each malformed one.

        Raises:
            DatasetError: the dataset cannot be opened or is not in a TRIG format.
        """
        for record in self.scan():
            if record is not None:
                yield record

    def scan(self, pause_every: int | None = None) -> Iterator[Sample | QuarantinedRecord | None]:
        """Iterate as :meth:`__iter__` does, and also yield ``None`` after each
        ``pause_every`` records read in a row without a sample (left out by the filters,
        finished, quarantined): a reader in a worker thread can then return to its caller,
        who sees a stop and the records read, also where selected samples are far apart.

        Raises:
            DatasetError: the dataset cannot be opened or is not in a TRIG format.
        """
        taken = TakenIds()
        produced = 0
        limit = self.section.limit
        self.records_read = self.filtered_out = 0
        self.limit_reached = False
        without_sample = 0
        for index, raw in enumerate(self._raw_records()):
            if limit is not None and produced >= limit:
                self.limit_reached = True
                return
            if pause_every is not None and without_sample >= pause_every:
                without_sample = 0
                yield None
            without_sample += 1
            self.records_read += 1
            kept_id: str | None = None  # set once its identity is sound and not repeated
            try:
                taken.take(raw)
                data_id, dimensions = record_identity(raw)
                kept_id = data_id
                if not self._selected(dimensions):
                    self.filtered_out += 1
                    continue
                recorded = self._judged.get(data_id)
                if recorded is not None:
                    self._refuse_a_change(data_id, recorded, raw, dimensions)
                judged = self.dimensions_to_judge(dimensions)
                if self._finished is not None and self._finished(data_id, judged):
                    produced += 1
                    continue
                sample = self._sample(raw, data_id, dimensions)
            except Rejected as exc:
                if kept_id is not None and kept_id in self._judged:
                    # One of the samples the limit took before (its judgements are kept), as
                    # count() still counts it: changed since, or its source image gone, it is
                    # not replaced by a record past the limit.
                    produced += 1
                elif isinstance(exc, CaseDuplicate):
                    identity = self._selected_identity(raw)
                    if identity is not None and identity[0] in self._judged:
                        produced += 1  # as above: an earlier version judged it as a sample
                raw_id = raw.get("data_id")
                yield QuarantinedRecord(
                    index=index,
                    data_id=storable(raw_id) if isinstance(raw_id, str) else None,
                    reason=storable_text(str(exc)),
                    record=without_images(raw),
                )
                continue
            produced += 1
            without_sample = 0
            yield sample

    def _refuse_a_change(
        self,
        data_id: str,
        recorded: SampleAsked,
        raw: Mapping[str, Any],
        dimensions: tuple[Dimension, Dimension],
    ) -> None:
        """Refuse a record that asks something else than ``recorded``, what its judgements in
        the run directory recorded it asked.

        Raises:
            ChangedSinceJudged: it does.
        """
        if isinstance(recorded, RecordedPair):
            pair = pair_name(*dimensions)
            if recorded.pair == pair:
                return
            what = f"its pair differs: {recorded.pair} when judged, {pair} now"
        elif recorded == _raw_digest(raw, self.task, dimensions):
            return
        else:
            what = "its prompt, pair, item or img_id differ"
        raise ChangedSinceJudged(
            f"data_id {data_id!r} changed since it was judged in this run directory ({what}): "
            "its earlier judgements are kept and it is not judged again; use --new-run to "
            "judge the new version"
        )

    def dimensions_to_judge(self, dimensions: tuple[Dimension, Dimension]) -> tuple[Dimension, ...]:
        """The dimensions of a sample's pair that this run scores (less any filtered out)."""
        if not self._dimensions:
            return dimensions
        return tuple(d for d in dimensions if d in self._dimensions)

    def _selected(self, dimensions: tuple[Dimension, Dimension]) -> bool:
        if self._pairs and unordered_pair(*dimensions) not in self._pairs:
            return False
        return bool(self.dimensions_to_judge(dimensions))

    def _selected_identity(
        self, raw: Mapping[str, Any]
    ) -> tuple[str, tuple[Dimension, ...]] | None:
        """A record's data_id and the dimensions judged of it, when its identity is sound
        and the filters select it (its data_id not checked against those taken)."""
        try:
            data_id, dimensions = record_identity(raw)
        except Rejected:
            return None
        if not self._selected(dimensions):
            return None
        return data_id, self.dimensions_to_judge(dimensions)

    def count(self, given_up: threading.Event | None = None) -> int:
        """About how many samples the run selects (filters and limit applied), reading only
        the identity columns. Records with a bad id or pair are not counted; duplicates are
        (keeping no set of ids keeps this cheap). Meant for progress and ETA.

        Args:
            given_up: once set, the count ends early, its number then meaningless (a count
                in a thread its caller stopped waiting for).

        Raises:
            DatasetError: the dataset cannot be opened.
        """
        return self.selected_pairs(given_up).total()

    def selected_pairs(
        self, given_up: threading.Event | None = None
    ) -> Counter[tuple[Dimension, Dimension]]:
        """How many samples of each pair :meth:`count` counts (what a reader of a run needs
        to know how many judgements it makes: a metric judge measures some pairs only).

        Args:
            given_up: as for :meth:`count`.

        Raises:
            DatasetError: the dataset cannot be opened.
        """
        pairs: Counter[tuple[Dimension, Dimension]] = Counter()
        selected = 0
        limit = self.section.limit
        for raw in self._raw_records(identity_only=True):
            if given_up is not None and given_up.is_set():
                break
            try:
                _, dimensions = record_identity(raw)
            except Rejected:
                continue
            if self._selected(dimensions):
                pairs[dimensions] += 1
                selected += 1
                if limit is not None and selected >= limit:
                    break
        return pairs

    def selected_samples(
        self, *, refused: Collection[int] = (), judged: Container[str] = ()
    ) -> dict[str, tuple[Dimension, ...]]:
        """Each sample the run selects (filters and limit applied, the first of a repeated
        ``data_id``), as ``data_id`` -> the dimensions judged of it, reading only the
        identity columns: what a reader of a run directory needs to tell the judgements a
        run still asks from those its dataset left out since. Records with a bad id or pair
        are left out; one refused for its content cannot be told from the identity columns
        and stays in, unless ``refused`` names it.

        Args:
            refused: the indexes of the records the run quarantined (``quarantine.jsonl``'s
                ``index``): left out, as :meth:`scan` leaves them out. One whose data_id is
                in ``judged`` still counts toward ``limit``, as :meth:`scan` counts it (and
                a case duplicate, refused or not: :class:`CaseDuplicate`).
            judged: the data_ids the run directory holds judgements of.

        Raises:
            DatasetError: the dataset cannot be opened.
        """
        limit = self.section.limit
        # Enough records that the limit is filled whichever of them ``refused`` leaves out.
        at_least = None if limit is None else limit + len(refused)
        samples = self.sample_identities(at_least=at_least).selected(
            limit, refused=refused, judged=judged
        )
        assert samples is not None, "read to the end, or far enough to fill the limit"
        return samples

    def sample_identities(self, *, at_least: int | None = None) -> SampleIdentities:
        """The identities of the records the run's filters select (the first of a repeated
        ``data_id``; limit not applied), reading only the identity columns: what
        :meth:`selected_samples` selects from, kept by a reader that selects again as the
        records refused change (:meth:`SampleIdentities.selected`).

        Args:
            at_least: stop reading once this many are read (None: read them all).

        Raises:
            DatasetError: the dataset cannot be opened.
        """
        identities = SampleIdentities()
        # Every data_id taken, as scan() takes them: a record left out by the filters, or
        # refused for its pair or content, keeps its id from a later record too.
        taken = TakenIds()
        for index, raw in enumerate(self._raw_records(identity_only=True)):
            if at_least is not None and len(identities) >= at_least:
                return identities
            try:
                taken.take(raw)
                data_id, dimensions = record_identity(raw)
            except CaseDuplicate:
                # Never a sample, yet counted toward the limit once judged, as scan() does.
                identity = self._selected_identity(raw)
                if identity is not None:
                    identities.add(index, *identity, case_duplicate=True)
                continue
            except Rejected:
                continue
            if self._selected(dimensions):
                identities.add(index, data_id, self.dimensions_to_judge(dimensions))
        identities.complete = True
        return identities

    def count_records(self) -> int:
        """How many records the dataset holds, every kind included, filters and limit not
        applied; reading only the identity columns.

        Raises:
            DatasetError: the dataset cannot be opened.
        """
        return sum(1 for _ in self._raw_records(identity_only=True))

    def pairs_by_data_id(self) -> tuple[dict[str, tuple[Dimension, Dimension]], list[str]]:
        """Each record's pair by ``data_id`` (the first of a repeated one, as a run keeps),
        filters and limit not applied, reading only the identity columns; and, for each
        record a run would quarantine for its identity (an unreadable line, a bad data_id or
        pair, a repeated data_id), why: ``record N (data_id X): reason``. Only a data_id
        spelled alike is repeated here: a run's case rule is there for its image files, and
        a reader of pairs writes none.

        Raises:
            DatasetError: the dataset cannot be opened.
        """
        pairs: dict[str, tuple[Dimension, Dimension]] = {}
        skipped: list[str] = []
        taken = TakenIds(fold_case=False)
        for index, raw in enumerate(self._raw_records(identity_only=True)):
            try:
                taken.take(raw)
                data_id, dimensions = record_identity(raw)
            except Rejected as exc:
                raw_id = raw.get("data_id")
                named = f" (data_id {storable(raw_id)!r})" if isinstance(raw_id, str) else ""
                skipped.append(f"record {index}{named}: {exc}")
                continue
            pairs[data_id] = dimensions
        return pairs, skipped

    def check_paths(self) -> int:
        """Check that ``[dataset] path`` is a file or a folder, and ``image_root`` a folder
        where source pictures are read from it: before a run makes its run directory, and
        again as the dataset is read.

        Returns:
            The ``st_mode`` of ``[dataset] path``.

        Raises:
            DatasetError: one of them is missing, cannot be looked up, or is of a wrong kind.
        """
        path = self.section.path
        mode = _mode(path, f"dataset {path}", "[dataset] path")
        if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
            # A pipe or a device would be read until its writer stops: a run waiting on it
            # forever, in a thread no stop reaches.
            raise DatasetError(
                f"dataset {path} is a {file_kind(mode)}, not a file or a folder; point "
                "[dataset] path at a TRIG dataset file or a folder of parquet files"
            )
        root = self.section.image_root
        if self.task != "t2i" and self.source_images and root is not None:
            # Every record naming a source would be refused for it: one error says why.
            what = f"[dataset] image_root {root}"
            if not stat.S_ISDIR(_mode(root, what, "[dataset] image_root")):
                raise DatasetError(f"{what} is not a folder")
        return mode

    def _raw_records(self, *, identity_only: bool = False) -> Iterator[Mapping[str, Any]]:
        path = self.section.path
        mode = self.check_paths()
        fmt: str = self.section.format
        format_set = fmt != "auto"
        if fmt == "auto":
            suffix = path.suffix.lower() if stat.S_ISREG(mode) else ""
            fmt = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl"}.get(suffix, "parquet")
        if fmt == "json":
            yield from read_json(path)
        elif fmt == "jsonl":
            yield from read_json_lines(path)
        else:
            yield from read_parquet(
                path, identity_only=identity_only, format_set=format_set, note=self._note
            )

    def _note(self, note: str) -> None:
        if note not in self.notes:
            self.notes.append(note)

    def _sample(
        self, raw: Mapping[str, Any], data_id: str, dimensions: tuple[Dimension, Dimension]
    ) -> Sample:
        prompt = raw.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise Rejected(f"prompt must be text, got {type(prompt).__name__}")
        if prompt is None or not prompt.strip():
            raise Rejected("missing or empty prompt")
        img_id, via = source_name(raw)
        if not isinstance(img_id, str):
            raise Rejected(f"{via} must be a string, got {type(img_id).__name__}")
        source_path, source_bytes = self._source_image(raw, img_id, via)
        item = raw.get("item")
        if self.task == "s2p" and item is not None and not isinstance(item, str):
            # The subject the judge and the generator are told of: a number or a list was
            # dropped without a word, and the sample judged as of "the subject".
            raise Rejected(f"item must be text (the subject's name), got {type(item).__name__}")
        if self.task == "s2p" and (item is None or not item.strip()):
            # The judge was asked about "the subject", the generator (BLIP-Diffusion) given
            # an empty one: every score would judge something the record never named.
            raise Rejected("missing or empty item: an s2p sample names its subject")
        sample = Sample(
            data_id=data_id,
            task=self.task,
            prompt=prompt,
            dimensions=dimensions,
            dimension_prompt=_strings(raw.get("dimension_prompt")),
            parent_dataset=_strings(raw.get("parent_dataset")),
            img_id=img_id,
            item=item if isinstance(item, str) else None,
            source_path=source_path,
            source_bytes=source_bytes,
        )
        check_unicode(sample)
        return sample

    def _source_image(
        self, raw: Mapping[str, Any], img_id: str, via: str
    ) -> tuple[Path | None, bytes | None]:
        if self.task == "t2i" or not self.source_images:
            return None, None
        return source_image(raw, img_id, via, self.task, self.section.image_root)


def _mode(path: Path, what: str, key: str) -> int:
    """The ``st_mode`` of a path the config names.

    Raises:
        DatasetError: it does not exist or cannot be looked up (a name too long for the file
            system, a folder on the way that may not be entered, an I/O error).
    """
    try:
        return path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise DatasetError(f"{what} does not exist; check {key}") from None
    except ValueError:  # a NUL character, which no file name holds
        raise DatasetError(f"{what} does not exist (its name holds a NUL); check {key}") from None
    except OSError as exc:
        raise DatasetError(
            f"{what} cannot be looked up: {exc.strerror or exc}; check {key} and the "
            "permissions of the folders on its way"
        ) from None


def _raw_digest(raw: Mapping[str, Any], task: Task, dimensions: tuple[Dimension, Dimension]) -> str:
    """The :attr:`~trig_stream.records.Sample.digest` the record's sample has, without building
    it (the fields read as :meth:`DatasetSource._sample` reads them)."""
    prompt, item, (img_id, _) = raw.get("prompt"), raw.get("item"), source_name(raw)
    return sample_digest(
        task,
        prompt if isinstance(prompt, str) else "",
        pair_name(*dimensions),
        item if isinstance(item, str) else None,
        img_id if isinstance(img_id, str) else "",
    )


def _strings(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list | tuple):
        return tuple("" if v is None else str(v) for v in value)
    return (str(value),)
