"""The run directory: manifest, lock, images, journal and quarantine.

Layout (``<output_dir>/<run name>/``)::

    manifest.json        what made these results: task, generator and judge fingerprints
    journal.jsonl        one judgement per line, appended and fsynced as they land
    quarantine.jsonl     dataset records refused by the latest run that read the dataset
                         through, with reasons (written as quarantine.jsonl.partial until then)
    images/<task>/<model>/<data_id>.png
    run.lock             held while a process runs in the directory

The parts live beside this module: the journal's writer and readers in
:mod:`trig_stream.journal`, the run lock and who holds it in :mod:`trig_stream.locks`,
durable writes in :mod:`trig_stream.files`, and the paths that moved with a moved run
directory in :mod:`trig_stream.moves`. Here: the :class:`Manifest`, the :class:`RunDir` a
run holds, and the checks a resume makes.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from pathlib import Path, PurePath
from typing import IO, Annotated, Any, Literal, Self, TypeAlias, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from trig_stream.errors import (
    FatalBackendError,
    FingerprintMismatch,
    RunDirError,
    RunLockedError,
)
from trig_stream.files import (
    make_dirs,
    open_regular_file,
    storage_error,
    sync_dir,
    write_all,
    write_atomic,
    write_atomic_many,
)
from trig_stream.journal import JOURNAL, Journal, JournalState, journal_state, journal_unreadable
from trig_stream.locks import LOCK, find_writer, journal_in_use, run_in_use
from trig_stream.moves import Move
from trig_stream.records import (
    MAX_NAME_CHARS,
    SCHEMA_VERSION,
    JudgementKey,
    QuarantinedRecord,
    storable_text,
)

MANIFEST = "manifest.json"
QUARANTINE = "quarantine.jsonl"
QUARANTINE_PARTIAL = "quarantine.jsonl.partial"
"""The quarantine list a run is writing: it replaces :data:`QUARANTINE` once the dataset has
been read through (a run stopped before then would leave only the start of its list)."""


def quarantine_lists(run_dir: Path, *, running: bool) -> tuple[Path, Path]:
    """The quarantine files of ``run_dir`` in the order to read them, the first that exists
    being the list to show: while a run writes the directory, its own list so far, else the
    last whole one; with none running, the last whole list, else the start of one that a
    run killed before it read the dataset through left (see :meth:`RunDir.close`)."""
    partial, final = run_dir / QUARANTINE_PARTIAL, run_dir / QUARANTINE
    return (partial, final) if running else (final, partial)


IMAGES = "images"
PARTIAL = ".partial"
"""Under ``images/``: temporary files of images being written."""
EntryKind: TypeAlias = Literal["generators", "judges"]
"""The manifest's two tables of entries, each a name -> fingerprint."""


class Manifest(BaseModel):
    """What produced a run directory's results; compared on every resume."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    run_name: str
    task: str
    generators: dict[str, dict[str, Any]] = Field(default_factory=dict)
    judges: dict[str, dict[str, Any]] = Field(default_factory=dict)
    config: dict[str, Any] = Field(default_factory=dict)
    """The config the latest run used (for ``status``, ``report`` and ``watch``)."""
    retry_errors: bool | None = None
    """Whether the latest run asks again the judgements whose status is ``error``
    (``--retry-errors``): while it runs, ``status`` and ``watch`` count those it found as work
    left (:func:`errors_asked_again`). None: not recorded (an older trig-stream wrote it)."""
    journal_lines: Annotated[int, Field(ge=0)] = 0
    """Lines the journal held when the latest run started, the ``error`` judgements it asks
    again among them."""
    created_at: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)

    @field_validator("generators")
    @classmethod
    def _dtypes_used(cls, generators: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        # A diffusers generator's fingerprint held one dtype per device, so adding a device
        # was refused as a change; it now holds the dtypes used, which an older run
        # directory's list is read as.
        return {
            name: {**fingerprint, "dtype": sorted(set(fingerprint["dtype"]))}
            if fingerprint.get("backend") == "diffusers"
            and isinstance(fingerprint.get("dtype"), list)
            and all(isinstance(dtype, str) for dtype in fingerprint["dtype"])
            else fingerprint
            for name, fingerprint in generators.items()
        }

    @model_validator(mode="after")
    def _judge_dtypes_placed(self) -> Self:
        # A transformers judge's fingerprint held its dtype option as given, so "auto" read
        # the same on the CPU (float32) and on a GPU (bfloat16): a run resumed on the other
        # mixed the two. It now holds the dtype on its device (transformers_judge.dtype_on);
        # an older run directory's "auto" is read with the device its config names.
        from trig_stream.backends.judges.transformers_judge import dtype_on

        entries = self.config.get("judges")
        devices = {
            entry["name"]: (entry.get("options") or {}).get("device", "cpu")
            for entry in (entries if isinstance(entries, list) else [])
            if isinstance(entry, dict)
            and isinstance(entry.get("name"), str)
            and isinstance(entry.get("options") or {}, dict)
        }
        for name, fingerprint in self.judges.items():
            params = fingerprint.get("params")
            device = devices.get(name)
            if (
                fingerprint.get("backend") == "transformers"
                and isinstance(params, dict)
                and params.get("dtype") == "auto"
                and isinstance(device, str)
            ):
                fingerprint["params"] = {**params, "dtype": dtype_on("auto", device)}
        return self

    def differences(
        self,
        other: Manifest,
        holds: Callable[[EntryKind, str], bool] | None = None,
        moved: Move | None = None,
    ) -> list[str]:
        """What in ``other`` would change results already stored under ``self``.

        Args:
            other: the manifest of the config.
            holds: whether an entry (``"generators"`` or ``"judges"``, its name) made
                results here; an entry that made none may change. None: all did.
            moved: how the run directory moved since ``self`` was written: a path of
                ``self`` is also the same as its new place after that move.
        """
        found = []
        if self.task != other.task:
            found.append(f"task: {self.task} in the run dir, {other.task} in the config")
        for kind in get_args(EntryKind):
            mine: dict[str, Any] = getattr(self, kind)
            theirs: dict[str, Any] = getattr(other, kind)
            for name in sorted(mine.keys() & theirs.keys()):
                if holds is not None and not holds(kind, name):
                    continue
                stored_entry = mine[name]
                if kind == "judges":
                    stored_entry = _auto_dtype_as_configured(stored_entry, theirs[name])
                for key, stored, configured in _changed_fields(stored_entry, theirs[name], moved):
                    found.append(
                        f"{kind[:-1]} {name!r}: {key} {stored} in the run dir, {configured} in "
                        "the config"
                    )
        return found

    def merged(self, other: Manifest, moved: Move | None = None) -> Manifest:
        """This manifest with the models and judges ``other`` adds, and what ``other`` says of
        the latest run: its config, whether it retries errors, where its journal started.
        An entry of ``other`` replaces this one's; one ``other`` lacks keeps its settings,
        with the paths that moved with the run directory at their new place (``moved``:
        :meth:`Move.apply`)."""

        def kept(mine: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
            if moved is None:
                return mine
            return {n: e if n in theirs else moved.apply(e) for n, e in mine.items()}

        return self.model_copy(
            update={
                "generators": {**kept(self.generators, other.generators), **other.generators},
                "judges": {**kept(self.judges, other.judges), **other.judges},
                "config": other.config,
                "retry_errors": other.retry_errors,
                "journal_lines": other.journal_lines,
                "updated_at": time.time(),
            }
        )


def _auto_dtype_as_configured(stored: dict[str, Any], configured: dict[str, Any]) -> dict[str, Any]:
    """``stored`` with a transformers judge's ``"auto"`` dtype, from a run directory older
    than the dtype on its device (see :meth:`Manifest._judge_dtypes_placed`) whose config no
    longer names the judge's device, read as ``auto`` on the configured device: as it was
    compared before, rather than refused for a difference no one can tell."""
    params, now = stored.get("params"), configured.get("params")
    if not (
        stored.get("backend") == "transformers"
        and isinstance(params, dict)
        and params.get("dtype") == "auto"
        and isinstance(now, dict)
        and isinstance(now.get("dtype"), str)
        and (now["dtype"] == "float32" or now["dtype"].startswith("auto on "))
    ):
        return stored
    return {**stored, "params": {**params, "dtype": now["dtype"]}}


def as_json(value: Any, what: str) -> Any:
    """``value`` as JSON holds it, for a manifest that is compared with the one read back
    from disk: a tuple becomes a list (``(64, 64)`` was "changed" into ``[64, 64]``, so a
    run could never resume), a set a sorted list, a path its text.

    Raises:
        FatalBackendError: a value JSON cannot hold (named with ``what``): a backend's bug.
    """
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise FatalBackendError(f"{what} holds {value}, which JSON cannot hold")
        return value
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, dict):
        if not all(isinstance(key, str) for key in value):
            raise FatalBackendError(f"{what} has a key that is not a string: {list(value)!r}")
        return {key: as_json(item, what) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [as_json(item, what) for item in value]
    if isinstance(value, set | frozenset):
        items = [as_json(item, what) for item in value]
        return sorted(items, key=lambda item: json.dumps(item, sort_keys=True))
    raise FatalBackendError(
        f"{what} holds a value of type {type(value).__name__}, which JSON cannot hold: {value!r}"
    )


def _moved_since(stored: Manifest, path: Path) -> Move | None:
    """How the run directory ``path`` moved since ``stored``, its manifest, was written: the
    config of the run that wrote it says where its output folder was (None: unknown)."""
    run = stored.config.get("run")
    was = run.get("output_dir") if isinstance(run, dict) else None
    if not isinstance(was, str) or not Path(was).is_absolute():
        return None
    return Move.between(Path(was), path.absolute().parent)


_ABSENT = object()


def _changed_fields(
    stored: Any, configured: Any, moved: Move | None = None, path: str = ""
) -> list[tuple[str, str, str]]:
    """Each field that differs between two fingerprints, as (dotted key, stored value,
    configured value) in JSON; a fingerprint is a JSON object, compared key by key. A stored
    path is the same as the configured one at its new place, after the run directory
    ``moved``."""
    if isinstance(stored, dict) and isinstance(configured, dict):
        changed = []
        for key in sorted(stored.keys() | configured.keys()):
            changed += _changed_fields(
                stored.get(key, _ABSENT), configured.get(key, _ABSENT), moved, f"{path}{key}."
            )
        return changed
    if stored == configured or (moved is not None and moved.same(stored, configured)):
        return []
    before, after = ("not set" if v is _ABSENT else json.dumps(v) for v in (stored, configured))
    return [(path.rstrip(".") or "fingerprint", before, after)]


def errors_asked_again(
    manifest: Manifest, selected: Callable[[JudgementKey], bool] | None = None
) -> Callable[[JudgementKey, int], bool] | None:
    """Which ``error`` judgements the latest run asks again while it runs
    (``--retry-errors``), as a test of a key and the number of the line (from 0) that holds
    its latest judgement: one written before the run started, by a model and a judge of its
    config, of a sample and dimension that the run selects (``selected``: see
    :func:`~trig_stream.tui.watch_source.asked_by_config`; None: not known, taken as
    selected). None when it asks none again, or the manifest does not say.
    """
    if not manifest.retry_errors:
        return None
    models = _entry_names(manifest.config, "generators")
    metrics = _entry_names(manifest.config, "judges")
    start = manifest.journal_lines

    def asked(key: JudgementKey, line: int) -> bool:
        if not (line < start and key[0] in models and key[3] in metrics):
            return False
        return selected is None or selected(key)

    return asked


def _entry_names(config: dict[str, Any], kind: EntryKind) -> frozenset[str]:
    # A manifest is a file: an entry of another shape (edited by hand) names nothing.
    entries = config.get(kind)
    if not isinstance(entries, list):
        return frozenset()
    return frozenset(str(e["name"]) for e in entries if isinstance(e, dict) and "name" in e)


class RunDir:
    """A run directory held by this process: locked, with its journal open.

    Use :meth:`open`; call :meth:`close` (or use it as a context manager) to release it.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.journal = Journal(path / JOURNAL)
        self._lock: IO[bytes] | None = None
        self._quarantine: IO[bytes] | None = None
        self._image_dirs: dict[tuple[str, str], Path] = {}
        self._prefix = f"{path}{os.sep}"

    @classmethod
    def open(cls, path: Path, manifest: Manifest) -> tuple[RunDir, JournalState]:
        """Lock the directory (creating it), check and update its manifest, open the journal.

        Raises:
            RunLockedError: another process is running in it.
            FingerprintMismatch: its results were made with settings that differ.
        """
        run = cls(path)
        try:
            make_dirs(path)
        except OSError as exc:
            raise storage_error(exc, f"create the run directory {path}") from None
        try:
            run._acquire_lock()
        except OSError as exc:  # made, or there already, but not writable (umask 777)
            raise storage_error(exc, f"write in the run directory {path} ({LOCK})") from None
        try:
            # The journal's lock first: a run turned away by it must touch nothing (a running
            # run's temporary images and newest lines look like a crash's leftovers).
            state = run.journal.open()
            # Only now, both locks held: a run the journal's lock turns away (its run.lock
            # deleted by hand, so this one made and locked a new one) must not leave its pid
            # there, naming a process that exits at once instead of the one running.
            run._write_pid()
            run._remove_partial_images()
            run._check_manifest(manifest, state)
            run._quarantine = (path / QUARANTINE_PARTIAL).open("wb", buffering=0)
        except OSError as exc:
            run.close()
            raise storage_error(exc, f"open the run directory {path}") from None
        except BaseException:
            run.close()
            raise
        return run, state

    def write_images(self, images: Sequence[tuple[Path, bytes]]) -> None:
        """Write images atomically; their temporary files live in ``images/.partial``."""
        partial = self.path / IMAGES / PARTIAL
        try:
            make_dirs(partial)
            write_atomic_many(images, temp_dir=partial)
        except OSError as exc:
            raise storage_error(exc, f"write images in {self.path / IMAGES}") from None

    def image_path(self, task: str, model: str, data_id: str) -> Path:
        """Where the image of ``data_id`` by ``model`` lives (names are checked safe upstream)."""
        folder = self._image_dirs.get((task, model))
        if folder is None:  # a path join costs microseconds, and every image needs one
            folder = self._image_dirs[task, model] = self.path / IMAGES / task / model
        return folder / f"{data_id}.png"

    def relative_name(self, path: Path) -> str:
        """``path``, inside the run directory, relative to it with ``/`` separators.

        Raises:
            ValueError: ``path`` is not inside the run directory.
        """
        text = str(path)
        if os.sep == "/" and text.startswith(self._prefix):  # every judgement asks: be quick
            return text[len(self._prefix) :]
        return path.relative_to(self.path).as_posix()

    def quarantine(self, record: QuarantinedRecord) -> None:
        """Add a refused dataset record, with its reason, to the quarantine file.

        A record JSON cannot write (the dataset reader makes every record storable; this is
        the net under it) is written without its fields, saying why: a refused record never
        stops the run.

        Raises:
            RunDirError: the file cannot be written (a full disk).
        """
        if self._quarantine is not None:
            try:
                line = record.model_dump_json()
            except (ValueError, RecursionError) as exc:  # PydanticSerializationError included
                problem = storable_text(str(exc))[:200]
                note = {"unwritable": f"the record's fields cannot be written as JSON: {problem}"}
                data_id = None if record.data_id is None else storable_text(record.data_id)
                line = record.model_copy(
                    update={
                        "record": note,
                        "data_id": data_id,
                        "reason": storable_text(record.reason),
                    }
                ).model_dump_json()
            try:
                write_all(self._quarantine.fileno(), line.encode() + b"\n")
            except OSError as exc:
                raise storage_error(exc, f"write to {self.path / QUARANTINE_PARTIAL}") from None

    def finish_quarantine(self) -> None:
        """The dataset has been read through: the records this run refused replace the list
        of the run before (a resume stopped early keeps that list; see :meth:`close`).

        Raises:
            RunDirError: the list cannot be put in place.
        """
        if self._quarantine is None:
            return
        self._quarantine.close()
        self._quarantine = None
        try:
            os.replace(self.path / QUARANTINE_PARTIAL, self.path / QUARANTINE)
        except OSError as exc:
            raise storage_error(exc, f"replace {self.path / QUARANTINE}") from None

    def close(self) -> None:
        """Close the journal and quarantine files and release the lock; safe to repeat.

        A quarantine list left unfinished (the run stopped before it read the dataset
        through) is only the start of this run's: the list of the run before stays, which
        says more; with none, the start is better than nothing and takes its place.
        """
        self.journal.close()
        if self._quarantine is not None:
            self._quarantine.close()
            self._quarantine = None
            partial, final = self.path / QUARANTINE_PARTIAL, self.path / QUARANTINE
            with suppress(OSError):  # closing must not hide the run's own outcome
                if final.exists():
                    partial.unlink()
                else:
                    os.replace(partial, final)
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def discard(self) -> None:
        """Close the run directory and remove it: for one this process just made, whose run
        ended before it wrote a judgement (stopped, or failed, while its judges opened).

        What opening it wrote goes (the manifest, the empty journal, the quarantine list, the
        lock), the lock last; a file anyone else put there stays, and the folder with it.
        """
        self.journal.close()
        if self._quarantine is not None:
            self._quarantine.close()
            self._quarantine = None
        with suppress(OSError):  # closing must not hide the run's own outcome
            for name in (MANIFEST, JOURNAL, QUARANTINE_PARTIAL, LOCK):
                (self.path / name).unlink(missing_ok=True)
        self.close()
        with suppress(OSError):
            self.path.rmdir()
            sync_dir(self.path.parent)

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _acquire_lock(self) -> None:
        handle = (self.path / LOCK).open("a+b")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # The pid of the run before, gone: a viewer must not name it as this run's until
            # this one writes its own (:meth:`_write_pid`), once the journal is locked too.
            handle.truncate(0)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read(32).decode("ascii", "replace").strip()
            handle.close()
            raise RunLockedError(run_in_use(self.path, holder)) from None
        except BaseException:  # e.g. a file system without locks: the handle must not leak
            handle.close()
            raise
        self._lock = handle

    def _write_pid(self) -> None:
        # Written once the journal's lock is held too (see open): viewers tell who runs here
        # by it (:func:`~trig_stream.locks.find_writer`).
        assert self._lock is not None
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(str(os.getpid()).encode())
        self._lock.flush()

    def _remove_partial_images(self) -> None:
        # A crash between writing an image's temporary file and renaming it leaves the
        # temporary file behind; with the lock held, no writer of ours is using one. They
        # all live in one folder, so this never walks the (large) image folders.
        partial = self.path / IMAGES / PARTIAL
        if partial.is_dir():
            for leftover in partial.iterdir():
                leftover.unlink(missing_ok=True)

    def _check_manifest(self, manifest: Manifest, journal: JournalState) -> None:
        # Where this run's lines start: a viewer tells the errors it asks again by it.
        manifest = manifest.model_copy(update={"journal_lines": journal.lines})
        manifest = resumed_manifest(self.path, manifest, journal)
        write_atomic(self.path / MANIFEST, manifest.model_dump_json(indent=2).encode())


def resumed_manifest(path: Path, manifest: Manifest, journal: JournalState) -> Manifest:
    """The manifest a run with ``manifest`` writes in the run directory ``path``: its own, or,
    when the directory holds results, the stored one with what ``manifest`` adds.

    Results are anything made under the stored manifest: a judgement that is not an
    ``error`` (``journal`` says) or an image. A run that made neither (its generator failed
    to load, or failed every call) protects nothing, so its corrected config starts afresh
    in the same directory; and a generator or judge that made none takes its corrected
    settings beside the others' results (:func:`_results_held`). Nothing is written here.

    Raises:
        RunDirError: the directory holds results but no manifest.
        FingerprintMismatch: its results were made with settings that differ.
    """
    holds_results = bool(journal.models_with_results or journal.skipped_lines)
    holds_results = holds_results or _holds_a_file(path / IMAGES)
    if holds_results and not (path / MANIFEST).exists():
        # The manifest is written before anything else, so it was removed: what the
        # results were made with cannot be checked, and a changed config would mix in.
        raise RunDirError(
            f"{path} holds results but no {MANIFEST}, so the settings they were made "
            "with cannot be checked: restore the file, or use --new-run to start a fresh "
            "run directory beside it"
        )
    if not holds_results:
        return manifest
    stored = read_manifest(path)
    moved = _moved_since(stored, path)
    differences = stored.differences(manifest, _results_held(path, journal), moved)
    if differences:
        where = ""
        if moved is not None:
            old, new = moved.roots[0]
            where = (
                f"\n(The run directory has moved since: a path in {old} that is gone from "
                f"there is compared at its place in {new}, any other path as it was.)"
            )
        raise FingerprintMismatch(
            f"{path} holds results made with other settings:\n  "
            + "\n  ".join(differences)
            + where
            + "\nUse --new-run to start a fresh run directory beside it, or change"
            " [run] name."
        )
    return stored.merged(manifest, moved)


def _results_held(path: Path, journal: JournalState) -> Callable[[EntryKind, str], bool]:
    """Whether each entry made results in the run directory ``path``: a generator an image
    or a judgement of its images, a judge a judgement (``error`` ones judged nothing). An
    entry that made none (a judge whose model name was wrong, a generator that failed every
    call) takes its corrected settings; the others keep theirs. A line that is no judgement
    could be anyone's: then every entry holds results."""
    images = path / IMAGES

    def holds(kind: EntryKind, name: str) -> bool:
        if journal.skipped_lines:
            return True
        if kind == "judges":
            return name in journal.metrics_with_results
        if name in journal.models_with_results:
            return True
        tasks = images.iterdir() if images.is_dir() else ()
        return any(_holds_a_file(task / name) for task in tasks if task.name != PARTIAL)

    return holds


def check_resume(path: Path, manifest: Manifest) -> JournalState:
    """Raise what a run with ``manifest`` would be refused for in the run directory ``path``
    (in use by a running process, made with other settings, or results without a manifest),
    reading it only: no lock is taken, nothing is written or cut (``trig-stream validate``).

    Returns:
        What its journal holds (empty for a new directory), as a run would resume it.

    Raises:
        RunLockedError: a process runs in it (:func:`~trig_stream.locks.find_writer`).
        RunDirError: see :func:`resumed_manifest`; or the journal cannot be read.
    """
    # Seen from the kernel's lock table, never by taking the lock: holding it even for a
    # moment would turn away a run starting then.
    writer = find_writer(path)
    if writer is not None and writer.run_lock_held:
        raise RunLockedError(run_in_use(path, "" if writer.pid is None else str(writer.pid)))
    if writer is not None:
        raise RunLockedError(journal_in_use(path))
    try:
        journal, _ = journal_state(path / JOURNAL)
    except OSError as exc:
        raise journal_unreadable(path / JOURNAL, exc) from None
    resumed_manifest(path, manifest, journal)
    return journal


def _holds_a_file(folder: Path) -> bool:
    """Whether ``folder`` or one below it (temporary images apart) holds a file."""
    if not folder.is_dir():
        return False
    for where, subfolders, files in os.walk(folder):
        if files and Path(where).name != PARTIAL:
            return True
        subfolders[:] = [name for name in subfolders if name != PARTIAL]
    return False


def read_manifest(run_dir: Path) -> Manifest:
    """Read a run directory's manifest.

    Raises:
        RunDirError: there is none, or it cannot be read.
    """
    path = run_dir / MANIFEST
    try:
        with open_regular_file(path) as handle:
            manifest = Manifest.model_validate_json(handle.read())
    except FileNotFoundError:
        raise RunDirError(f"{run_dir} is not a trig-stream run directory (no {MANIFEST})") from None
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(map(str, error["loc"]))
        raise RunDirError(
            f"cannot read {path}: it is damaged ({where + ': ' if where else ''}{error['msg']}); "
            "the run directory cannot be used as it is: start a fresh one with --new-run, or "
            "restore the file"
        ) from None
    except OSError as exc:
        raise RunDirError(
            f"cannot read {path}: {exc.strerror or exc}; it must be the file a run wrote, "
            "readable by this user"
        ) from None
    except ValueError as exc:
        raise RunDirError(f"cannot read {path}: {exc}") from None
    if manifest.schema_version > SCHEMA_VERSION:
        raise RunDirError(
            f"{run_dir} was written by a later trig-stream (record format "
            f"{manifest.schema_version}; this one knows formats up to {SCHEMA_VERSION}): use "
            "that version, or start a fresh run with --new-run"
        )
    return manifest


def next_free_run_dir(path: Path) -> Path:
    """``path`` itself when unused, else the first ``path-2``, ``path-3``... that is, made
    (empty) here so that it is this caller's: two runs asking at once (two engines of one
    process, two ``run --new-run`` processes) each get their own, not the same one.

    Raises:
        RunDirError: that name is longer than a run's name may be: the config that would
            resume it (``[run] name`` set to it) would be refused; or the directory cannot
            be made.
    """
    try:
        make_dirs(path.parent)
    except OSError as exc:
        raise storage_error(exc, f"create the folder of run directories {path.parent}") from None
    candidate, number = path, 1
    while True:
        if number > 1:
            candidate = path.with_name(f"{path.name}-{number}")
            if len(candidate.name) > MAX_NAME_CHARS:
                raise RunDirError(
                    f"--new-run would write {candidate.name!r}, a run name of "
                    f"{len(candidate.name)} characters, which no config can name to resume it "
                    f"(at most {MAX_NAME_CHARS}): shorten [run] name"
                )
        try:
            # Made, not looked at: a check then a later make let a second run take it too.
            candidate.mkdir()
            sync_dir(path.parent)
        except FileExistsError:
            number += 1
            continue
        except OSError as exc:
            raise storage_error(exc, f"create the run directory {candidate}") from None
        return candidate
