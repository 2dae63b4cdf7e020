"""Reading TRIG prompts: legacy JSON files and parquet files, streamed and checked.

Both of TRIG's formats are read: the JSON lists of upstream's repository (key ``dimension``,
images in a separate folder named by ``img_id``) and the parquet files of the Hugging Face
dataset (key ``dimensions``, images embedded). Parquet is scanned in small batches with
polars, so the 18.8 GB image-editing split never sits in memory; embedded images stay encoded
bytes until a generator asks for them. The same records as JSON Lines (one object per line,
``.jsonl``) are read a line at a time. (The files are read in :mod:`trig_stream.dataset_formats`;
the records are checked here.)

A malformed record does not stop a run: it comes out as a :class:`QuarantinedRecord` carrying
the reason, and the engine writes it to the run's ``quarantine.jsonl``.
"""

from __future__ import annotations

import io
import re
import stat
import threading
from collections import Counter
from collections.abc import Callable, Collection, Container, Iterator, Mapping
from pathlib import Path
from typing import Any

from trig_stream.config import DatasetSection
from trig_stream.dataset_formats import Unreadable, read_json, read_json_lines, read_parquet
from trig_stream.dataset_identities import SampleIdentities
from trig_stream.dimensions import (
    Dimension,
    Task,
    pair_from_data_id,
    split_pair,
    unordered_pair,
)
from trig_stream.errors import DatasetError
from trig_stream.files import file_kind
from trig_stream.hashing import sample_digest
from trig_stream.pillow_warnings import quiet_pillow
from trig_stream.quarantine_text import storable, without_images
from trig_stream.records import QuarantinedRecord, Sample, is_safe_name, storable_text
from trig_stream.string_index import StringIndex


class Rejected(ValueError):
    """A record is malformed; the message is the quarantine reason."""


class ChangedSinceJudged(Rejected):
    """A record asks something else than when it was judged in the run directory: refused,
    yet still one of the run's samples (its judgements are kept), so it counts toward
    ``limit``."""


class CaseDuplicate(Rejected):
    """A record's data_id differs only in case from an earlier record's, and is the first
    spelled so: a version before the case rule took it as a sample of its own, so one the
    run directory holds judgements of still counts toward ``limit``."""


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
            sample was judged (a resumed run's journal). A sample that asks something else
            now (its prompt, pair, item or source image name edited since) is quarantined:
            its earlier judgements answer the old question, and judging the rest of it
            would mix the two versions in one run.
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
        judged: Mapping[str, str] | None = None,
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
                data_id, dimensions = _identity(raw)
                kept_id = data_id
                if not self._selected(dimensions):
                    self.filtered_out += 1
                    continue
                recorded = self._judged.get(data_id)
                if recorded is not None and recorded != _raw_digest(raw, self.task, dimensions):
                    raise ChangedSinceJudged(
                        f"data_id {data_id!r} changed since it was judged in this run "
                        "directory (its prompt, pair, item or img_id differ): its earlier "
                        "judgements are kept and it is not judged again; use --new-run to "
                        "judge the new version"
                    )
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
            data_id, dimensions = _identity(raw)
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
                _, dimensions = _identity(raw)
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
                data_id, dimensions = _identity(raw)
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
                data_id, dimensions = _identity(raw)
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
        img_id, via = _source_name(raw)
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
        _check_unicode(sample)
        return sample

    def _source_image(
        self, raw: Mapping[str, Any], img_id: str, via: str
    ) -> tuple[Path | None, bytes | None]:
        if self.task == "t2i" or not self.source_images:
            return None, None
        embedded = raw.get("image")
        if isinstance(embedded, Mapping):
            embedded = embedded.get("bytes")
        if isinstance(embedded, bytes | bytearray) and embedded:
            data = bytes(embedded)
            _check_decodable(data, "embedded source image")
            return None, data
        if not img_id:
            raise Rejected(_no_source_image(raw, self.task))
        shown = quoted(img_id)
        inline = _inline_image(img_id)
        if inline is not None:
            field = "img_id" if via != IMAGE_PATH else "image"
            if field == "image" and isinstance(raw.get("image"), Mapping):
                field = "image.path"
            raise Rejected(
                f"{field} holds {inline} ({shown}), not the picture's bytes or a file name: "
                "decode it into the picture's bytes in the dataset (image = {bytes, path}), "
                "or save it as a file under [dataset] image_root and name that file by img_id"
            )
        root = self.section.image_root
        if root is None:
            if via == IMAGE_PATH:
                raise Rejected(
                    f"the image column holds a path, {shown}, not the picture's bytes: set "
                    "[dataset] image_root to the folder it is in (the path is looked up there)"
                )
            raise Rejected(f"img_id {shown} given but [dataset] image_root is not set")
        candidate = root / img_id
        if img_id.endswith(("/", "/.")):
            # Path drops the trailing slash: "a.png/" was looked up, and read, as "a.png".
            raise Rejected(
                f"{via} {shown} ends as a folder's path does, not a file's name: name the "
                "image file itself, without the trailing '/'"
            )
        if Path(img_id).is_absolute() or ".." in Path(img_id).parts or "\0" in img_id:
            raise Rejected(
                f"{via} {shown} is not a plain file name"
                + (" (a path relative to [dataset] image_root is)" if via == IMAGE_PATH else "")
            )
        try:
            mode = candidate.stat().st_mode
        except (FileNotFoundError, NotADirectoryError):
            raise Rejected(f"source image {shown} not found in {root}") from None
        except OSError as exc:  # a name too long for the file system, no permission, EIO
            raise Rejected(
                f"source image {shown} cannot be looked up ({exc.strerror or exc}) in {root}"
            ) from None
        if not stat.S_ISREG(mode):
            raise Rejected(f"source image {shown} in {root} is not a file")
        _check_decodable(candidate, f"source image {shown}")
        return candidate, None


NAME_SHOWN = 80
"""Characters of a source image's name a reason quotes whole; a longer one is cut to its
start and its length (inline image text runs to hundreds of thousands)."""


def quoted(name: str) -> str:
    """``name`` quoted for a quarantine reason, cut short past :data:`NAME_SHOWN` characters."""
    if len(name) <= NAME_SHOWN:
        return repr(name)
    return f"{name[:60]!r}... ({len(name)} characters)"


_BASE64 = re.compile(r"[A-Za-z0-9+/\s]+={0,2}\s*")
"""Text in base64's alphabet (line breaks allowed), padded at its end."""

_BASE64_IMAGE_STARTS = ("iVBORw0KGgo", "/9j/", "R0lGOD", "UklGR")
"""How base64 of a PNG, JPEG, GIF or WebP (RIFF) file begins."""

BASE64_LENGTH = 256
"""Characters from which text in base64's alphabet is taken for inline image data rather than
a name: a file name has 255 bytes at most, and a path that long without a dot (no file
extension) is no name a dataset gives."""


def _inline_image(name: str) -> str | None:
    """What ``name`` is when it is a picture written as text, not a file's name: "a data: URL"
    or "base64 text"; None otherwise."""
    start = name.lstrip()
    if start[:5].lower() == "data:":
        return "a data: URL"
    if _BASE64.fullmatch(start) and (
        len(start) >= BASE64_LENGTH or (len(start) >= 64 and start.startswith(_BASE64_IMAGE_STARTS))
    ):
        return "base64 text"
    return None


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


SOURCE_MIN_SIDE = 8
"""Fewest pixels a source image has on a side. An editing model's VAE shrinks a picture 8
times: a smaller one fails every call of it (height and width must be > 0), which stops the
run as the generator's fault after its first calls, not the sample's."""


def _check_decodable(source: Path | bytes, what: str) -> None:
    """Reject a source image that is truncated, not an image, or too small to edit.

    It is decoded in full (``verify`` checks a PNG's chunks but no other format's data: a
    truncated JPEG, WebP or GIF passed, to fail at every generation and every
    ``--retry-errors``), and a PNG's pixel data is inflated as the generator's decoding
    inflates it (:func:`trig_stream.png.pixel_data_problem`): Pillow's ``load`` takes a zlib
    stream that ends early for a whole picture, its missing rows black, which the generator
    refuses. The pixels are not kept: this runs in the dataset thread, ahead of the
    generators, and a decoded picture in every buffered sample would take several times the
    memory of its file.
    """
    from PIL import Image, UnidentifiedImageError

    # A file is handed to Pillow open, not read first: a large file that is no image is
    # refused from its header, and a picture's bytes are not held beside its pixels.
    try:
        file = source.open("rb") if isinstance(source, Path) else io.BytesIO(source)
    except OSError as exc:
        raise Rejected(f"{what} cannot be read: {exc.strerror or exc}") from None
    # Pillow warns on stderr of a picture of 89-179 megapixels, which it decodes all the same
    # (a larger one raises DecompressionBombError, reported below): such a source picture is
    # resized as any other, and the warning's raw lines said nothing of use.
    quiet_pillow()
    try:
        with file, Image.open(file) as image:
            width, height = image.size
            if min(width, height) < SOURCE_MIN_SIDE:
                raise Rejected(
                    f"{what} is {width}x{height} pixels: under {SOURCE_MIN_SIDE} on a side, "
                    "too small for an image-editing model"
                )
            if image.format == "PNG":
                # After Pillow's size check: a bomb is refused before it is inflated. The
                # file is read through a second handle a piece at a time, leaving Pillow's
                # position in it alone.
                problem = _png_problem(source)
                if problem is not None:
                    raise Rejected(f"{what} is not a readable PNG: {problem}; replace the file")
            image.load()
    except UnidentifiedImageError:
        if _is_empty(source):
            # As the generator's own decoding says it: "no image" hid that nothing is there.
            raise Rejected(f"{what} is empty (0 bytes)") from None
        raise Rejected(f"{what} is no image Pillow can read") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        if isinstance(exc, Rejected):  # a ValueError: the size or the PNG data, said above
            raise
        # DecompressionBombError: more pixels than Pillow agrees to decode (a bomb, or a
        # picture far larger than any model takes).
        raise Rejected(f"{what} cannot be decoded: {exc}") from None


def _is_empty(source: Path | bytes) -> bool:
    if isinstance(source, bytes):
        return not source
    try:
        return source.stat().st_size == 0
    except OSError:
        return False


def _png_problem(source: Path | bytes) -> str | None:
    """Why the PNG ``source`` (a file, or bytes already in memory) has pixel data that does not
    decode whole, or None when it decodes (see :func:`trig_stream.png.pixel_data_problem`)."""
    from trig_stream.png import is_png, pixel_data_problem

    if isinstance(source, bytes):
        return pixel_data_problem(source) if is_png(source) else None
    with source.open("rb") as file:
        return pixel_data_problem(file) if is_png(file.read(16)) else None


IMAGE_PATH = "image path"


def _source_name(raw: Mapping[str, Any]) -> tuple[object, str]:
    """A record's source image name, and what gave it: its ``img_id`` or, with none, the path
    its image column holds in place of the picture's bytes (a Hugging Face ``Image`` not
    embedded, ``{"bytes": None, "path": ...}``; JSON Lines' ``"image": "name.png"``), looked
    up under ``image_root`` as an ``img_id`` is."""
    img_id = raw.get("img_id")
    if img_id is not None and img_id != "":  # 0 or False is an img_id of the wrong type
        return img_id, "img_id"
    image = raw.get("image")
    if isinstance(image, Mapping):
        if image.get("bytes"):
            return "", "img_id"
        image = image.get("path")
    if isinstance(image, str) and image:
        return image, IMAGE_PATH
    return "", "img_id"


def _no_source_image(raw: Mapping[str, Any], task: Task) -> str:
    """Why a record without an ``img_id`` has no source image: an image field of a type that
    holds none is named (said as "no image", it looked absent)."""
    image = raw.get("image")
    field = "image"
    if isinstance(image, Mapping):
        image, field = image.get("bytes"), "image.bytes"
    if image is not None and not isinstance(image, bytes | bytearray | str):
        return (
            f"{task} sample has no source image: {field} is {type(image).__name__} "
            f"{str(image)[:40]!r}, "
            "where the picture's bytes, a {bytes, path} mapping or a path under "
            "[dataset] image_root is expected (or give an img_id)"
        )
    if isinstance(image, bytes | bytearray | str) and not image and field == "image.bytes":
        return (
            f"{task} sample has no source image: image.bytes is empty and image.path names "
            "no file (embed the picture's bytes, or give an img_id)"
        )
    if field == "image.bytes" and isinstance(image, str) and image:
        return (
            f"{task} sample has no source image: image.bytes is text, not the picture's "
            "bytes (or give an img_id)"
        )
    return f"{task} sample has no source image (no image, no img_id)"


def _raw_digest(raw: Mapping[str, Any], task: Task, dimensions: tuple[Dimension, Dimension]) -> str:
    """The :attr:`~trig_stream.records.Sample.digest` the record's sample has, without building
    it (the fields read as :meth:`DatasetSource._sample` reads them)."""
    prompt, item, (img_id, _) = raw.get("prompt"), raw.get("item"), _source_name(raw)
    return sample_digest(
        task,
        prompt if isinstance(prompt, str) else "",
        f"{dimensions[0]}_{dimensions[1]}",
        item if isinstance(item, str) else None,
        img_id if isinstance(img_id, str) else "",
    )


class TakenIds:
    """The data_ids the records read so far took, for the duplicate check.

    A record takes its data_id before anything else of it is checked: the first record
    keeps it also when it is refused (its pair, its prompt or source image; a JSON object's
    entry that is no record keeps its key), so a later record of the same id is a duplicate,
    not judged in its place. Ids are compared as a file system that ignores case (macOS's,
    exFAT) compares them, since each names its sample's image file: ``cat_1`` is a duplicate
    of ``Cat_1``, whose picture it would overwrite there (a data_id is ASCII, so lower case
    is its case-folded form). A run keeps one entry per sample for its whole length, so
    compact indexes rather than a set of str (~60 instead of ~100 bytes).

    Args:
        fold_case: compare ids as a file system that ignores case does; False takes only
            an id spelled alike as a duplicate, for a reader that writes no file per sample
            (``analyze --prompts``).
    """

    def __init__(self, *, fold_case: bool = True) -> None:
        self._fold_case = fold_case
        self._folded = StringIndex()
        self._spelled = StringIndex()
        """Each id as its record spells it, numbered as in ``_folded``: for the reason."""
        self._case_duplicates: set[str] = set()
        """The other spellings met (few): a spelling's first record is a
        :class:`CaseDuplicate`, a later one a duplicate of it as well."""

    def take(self, raw: Mapping[str, Any]) -> None:
        """Take the data_id ``raw`` names, when it is one a sample could have.

        Raises:
            CaseDuplicate: a record read before took it in another case, none in this one.
            Rejected: a record read before took it.
        """
        claimed = raw.key if isinstance(raw, Unreadable) else raw.get("data_id")
        if not isinstance(claimed, str) or not is_safe_name(claimed):
            return  # refused for it by _identity(), and no sample's id
        folded = claimed.lower() if self._fold_case else claimed
        number = self._folded.find(folded)
        if number is None:
            self._folded.add(folded)
            self._spelled.add(claimed)
            return
        first = self._spelled[number]
        if first == claimed:
            raise Rejected(f"duplicate data_id {claimed!r}")
        reason = f"duplicate data_id {claimed!r}: differs only in case from {first!r}"
        if claimed in self._case_duplicates:
            raise Rejected(reason)
        self._case_duplicates.add(claimed)
        raise CaseDuplicate(reason)


def _identity(raw: Mapping[str, Any]) -> tuple[str, tuple[Dimension, Dimension]]:
    """A record's data_id and pair, checked: what every later step relies on."""
    if isinstance(raw, Unreadable):
        raise Rejected(raw.reason)
    data_id = raw.get("data_id")
    if data_id is None or data_id == "":
        raise Rejected("missing data_id")
    if not isinstance(data_id, str):
        raise Rejected(f"data_id must be text, got {type(data_id).__name__} {data_id!r}")
    if not is_safe_name(data_id):
        raise Rejected(
            f"data_id {data_id!r} is not a safe file name (it names the image file): letters, "
            "digits, '.', '_' and '-' only, starting with a letter or digit, at most 128 "
            "characters, no '..'"
        )
    return data_id, _dimensions(raw, data_id)


def _dimensions(raw: Mapping[str, Any], data_id: str) -> tuple[Dimension, Dimension]:
    given = raw.get("dimensions")
    if given is None:  # absent, or null beside the older "dimension" (a parquet's two columns)
        given = raw.get("dimension")
    try:
        if given is None:
            return pair_from_data_id(data_id)
        if isinstance(given, str):
            return split_pair(given)
        values = list(given) if isinstance(given, list | tuple) else []
        if len(values) != 2 or not all(isinstance(v, str) for v in values):
            raise Rejected(f"dimensions must be two dimension codes, got {given!r}")
        return split_pair(f"{values[0]}_{values[1]}")
    except ValueError as exc:
        if isinstance(exc, Rejected):
            raise
        raise Rejected(str(exc)) from None


def _check_unicode(sample: Sample) -> None:
    """Refuse text that cannot be sent or stored as UTF-8: JSON's ``\\ud800`` escapes decode
    to lone surrogates, which every request to a judge or a generator would fail on."""
    fields = {"prompt": sample.prompt, "img_id": sample.img_id, "item": sample.item or ""}
    fields |= {f"dimension_prompt[{i}]": t for i, t in enumerate(sample.dimension_prompt)}
    fields |= {f"parent_dataset[{i}]": t for i, t in enumerate(sample.parent_dataset)}
    for name, text in fields.items():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise Rejected(
                f"{name} is not valid Unicode: a lone surrogate {text[exc.start]!r} "
                f"at character {exc.start}"
            ) from None


def _strings(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list | tuple):
        return tuple("" if v is None else str(v) for v in value)
    return (str(value),)
