"""The run directory: manifest, lock, images, journal and quarantine.

Layout (``<output_dir>/<run name>/``)::

    manifest.json        what made these results: task, generator and judge fingerprints
    journal.jsonl        one judgement per line, appended and fsynced as they land
    quarantine.jsonl     dataset records refused by the latest run that read the dataset
                         through, with reasons (written as quarantine.jsonl.partial until then)
    images/<task>/<model>/<data_id>.png
    run.lock             held while a process runs in the directory

The parts live beside this module: the manifest's model, comparison and reading in
:mod:`trig_stream.manifest`, the journal's writer and readers in :mod:`trig_stream.journal`,
the run lock and who holds it in :mod:`trig_stream.locks`, durable writes in
:mod:`trig_stream.files`, and the paths that moved with a moved run directory in
:mod:`trig_stream.moves`. Here: the :class:`RunDir` a run holds, and the checks a resume
makes (:func:`resumed_manifest`, :func:`check_resume`).
"""

from __future__ import annotations

import errno
import fcntl
import functools
import logging
import os
import re
import stat
import threading
from collections.abc import Callable, Sequence
from contextlib import suppress
from pathlib import Path
from typing import IO

from trig_stream.errors import FingerprintMismatch, RunDirError, RunLockedError
from trig_stream.files import (
    TEMP_NAME_BYTES,
    UnfitFileError,
    broken_link,
    file_kind,
    link_refused,
    make_dirs,
    open_regular_file,
    open_unlinked,
    refuse_special_file,
    remove_made_dirs,
    storage_error,
    sync_dir,
    unchangeable,
    write_all,
    write_atomic,
    write_atomic_many,
)
from trig_stream.journal import (
    JOURNAL,
    Journal,
    JournalState,
    journal_not_a_file,
    journal_state,
    journal_unreadable,
    moved_or_replaced,
    refuse_a_torn_tail_kept,
    warn_of_skipped_lines,
)
from trig_stream.locks import LOCK, find_writer, journal_in_use, run_in_use
from trig_stream.manifest import IMAGES as IMAGES  # re-exported: store.IMAGES, as ever
from trig_stream.manifest import (
    MANIFEST,
    MANIFEST_HEAD_BYTES,
    MAX_MANIFEST_BYTES,
    EntryKind,
    Manifest,
    checked_scoring_rules,
    manifest_head_is_ours,
    manifest_is_ours,
    not_a_manifest,
    read_manifest,
    read_manifest_text,
    too_large_manifest,
)
from trig_stream.moves import Move
from trig_stream.records import MAX_NAME_CHARS, QuarantinedRecord, storable_text

logger = logging.getLogger(__name__)

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


_made_lock = threading.Lock()
_made_for_runs: dict[Path, list[Path]] = {}
"""The folders :func:`next_free_run_dir` made for a run directory (it first, then its
parents outwards), which :meth:`RunDir.open` takes over: a run that cannot open it, or ends
before writing anything, removes them again (see :meth:`RunDir.discard`)."""


PARTIAL = ".partial"
"""Under ``images/``: temporary files of images being written."""

LEFTOVER_TEMPORARY = re.compile(rf"\.{re.escape(MANIFEST)}\.\d+\.\d+\.tmp")
"""The name of the temporary file :func:`~trig_stream.files.write_atomic` writes beside the
manifest, left in the run directory by a crash."""


ROOM_FOR_TEMPORARY_FILES = (
    len(f"/{IMAGES}/{PARTIAL}/.") + TEMP_NAME_BYTES + len(".4194304.18446744073709551615.tmp")
)
"""The bytes the longest temporary file a run writes in its run directory adds to the
directory's path: an image's, ``images/.partial/.<its name's head>.<pid>.<thread>.tmp`` (the
largest pid and thread id Linux gives)."""


def refuse_a_path_too_long(path: Path, manifest: Manifest, *, made_here: bool) -> None:
    """Raise the error of a run directory ``path`` too long for the files a run with
    ``manifest`` writes in it: made, it failed on the manifest's temporary file ("File name
    too long", naming a file that holds the run's pid), which ``validate`` never looked at,
    or on its images (``images/<task>/<model>/<data_id>.png``, a data_id a safe name of up
    to :data:`~trig_stream.records.MAX_NAME_CHARS`: the longest of its files, a report's
    ``report/<model>/`` ones included, when a model has a name).

    Args:
        made_here: the run makes ``path`` (or made it, for ``--new-run``), rather than
            resuming a directory that was there: the error says what the run cannot do,
            and a directory there is refused for its images' folders alone (a data_id of
            one character), not for data_ids its dataset may not have.

    Raises:
        RunDirError: ``path`` and the longest of those files exceed the system's limit.
    """
    limit = _path_limit()
    length = len(os.fsencode(path.absolute()))
    model = max(manifest.generators, key=len, default=None)
    # A directory the run makes keeps room for any data_id. One that is there (a resume) is
    # refused only for the images' folders: a run begun at its depth writes the data_ids its
    # dataset has, unknown until it is read, and one of 128 characters refused it for good.
    data_id = MAX_NAME_CHARS if made_here else 1
    image = 0 if model is None else len(f"/{IMAGES}/{manifest.task}/{model}/.png") + data_id
    if length + max(image, ROOM_FOR_TEMPORARY_FILES) < limit:  # the limit counts the final NUL
        return
    problem = _too_long(path, length, limit, "create" if made_here else "write in")
    if image > ROOM_FOR_TEMPORARY_FILES:
        ids = f"up to {MAX_NAME_CHARS} characters" if made_here else "one character"
        raise RunDirError(
            f"{problem}: an image adds {'up to' if made_here else 'at least'} {image} bytes to it "
            f"({IMAGES}/{manifest.task}/<model>/<data_id>.png, a data_id of {ids}); shorten "
            "output_dir, [run] name or the model's name"
        )
    raise RunDirError(f"{problem}; shorten output_dir or [run] name")


def refuse_an_image_path_too_long(path: Path, task: str, model: str, data_id: str) -> None:
    """Raise the error of the image of ``data_id`` by ``model`` for ``task`` when its path in
    the run directory ``path`` is longer than the system allows. A directory that was there
    is checked as it opens for a data_id of one character (:func:`refuse_a_path_too_long`);
    its dataset's may be longer, and looking their images up ended in an OSError traceback.

    Raises:
        RunDirError: the image's path exceeds the system's limit.
    """
    length = len(os.fsencode(path.absolute()))
    image = len(os.fsencode(f"/{IMAGES}/{task}/{model}/{data_id}.png"))
    limit = _path_limit()
    if length + image < limit:  # the limit counts the final NUL
        return
    raise RunDirError(
        f"{_too_long(path, length, limit, 'write in')}: the image of {data_id} adds {image} "
        f"bytes to it ({IMAGES}/{task}/{model}/<data_id>.png); shorten output_dir, [run] name, "
        "the model's name or the data_id"
    )


@functools.cache
def _path_limit() -> int:
    """The most bytes a path may have on this system, its final NUL counted."""
    try:
        return os.pathconf("/", "PC_PATH_MAX")
    except (OSError, ValueError):  # no such limit to ask for here: Linux's
        return 4096


def _too_long(path: Path, length: int, limit: int, what: str) -> str:
    # What refuses a run directory too long for the files a run writes in it.
    return (
        f"cannot {what} the run directory {path}: {os.strerror(errno.ENAMETOOLONG)}: its path "
        f"is {length} bytes, and the files a run writes in it would be longer than this system "
        f"allows ({limit} bytes)"
    )


class RunDir:
    """A run directory held by this process: locked, with its journal open.

    Use :meth:`open`; call :meth:`close` (or use it as a context manager) to release it.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.journal = Journal(path / JOURNAL)
        self._lock: IO[bytes] | None = None
        self._quarantine: IO[bytes] | None = None
        self._quarantine_failed = False
        """A write to the quarantine list failed: it is never promoted (see :meth:`close`)."""
        self._image_dirs: dict[tuple[str, str], Path] = {}
        self._prefix = f"{path}{os.sep}"
        self._made: list[Path] = []
        """The folders this run made for the directory: it, then its parents outwards."""
        self._identity: tuple[int, int] | None = None
        """(st_dev, st_ino) of the directory once locked: see :meth:`check_in_place`."""

    @classmethod
    def open(cls, path: Path, manifest: Manifest) -> tuple[RunDir, JournalState]:
        """Lock the directory (creating it), open the journal, check and update its manifest,
        and only then cut the journal's torn tail: a run refused leaves the journal as it was.

        A directory this run made (here, or :func:`next_free_run_dir`) that it then cannot
        open (a full disk) is removed again, with the folders above it that it made.

        Raises:
            RunLockedError: another process is running in it.
            FingerprintMismatch: its results were made with settings that differ.
            RunDirError: it cannot be made or written.
        """
        run = cls(path)
        with _made_lock:
            made = _made_for_runs.pop(path, [])
        fresh = path in made or not os.path.isdir(path)  # else a directory to resume
        try:
            refuse_a_path_too_long(path, manifest, made_here=fresh)
        except RunDirError:
            remove_made_dirs(made)  # a --new-run directory made for it: nothing to resume
            raise
        try:
            run._made = make_dirs(path) or made
        except OSError as exc:
            # make_dirs removed what it made; what next_free_run_dir made goes too.
            remove_made_dirs(made)
            raise storage_error(
                exc, f"create the run directory {path}", nothing_written=True, path=path
            ) from None
        # A directory this run made, then removed when it cannot open it: no run to resume.
        made_here = path in run._made
        refuse_links(path)
        try:
            run._acquire_lock()
        except OSError as exc:  # made, or there already, but not writable (umask 777)
            run._abandon(locked=False)
            raise storage_error(
                exc, f"write in the run directory {path} ({LOCK})", nothing_written=made_here
            ) from None
        except BaseException as exc:
            run._abandon(locked=not isinstance(exc, RunLockedError))
            raise
        try:
            info = os.stat(path)
            run._identity = (info.st_dev, info.st_ino)
            # The journal's lock first: a run turned away by it must touch nothing (a running
            # run's temporary images and newest lines look like a crash's leftovers).
            state = run.journal.open(cut=False)
            # Checked before anything is cut or removed: a run refused (other settings, a
            # later trig-stream's manifest) leaves the journal and images as they were.
            run._check_manifest(manifest, state)
            # Only now, both locks held and the manifest this run's: a run the journal's lock
            # turns away (its run.lock deleted by hand, so this one made and locked a new
            # one) must not leave its pid there, naming a process that exits at once instead
            # of the one running; and a viewer that sees the pid reads this run's manifest
            # (its --retry-errors and where its lines start), not the run before's, which
            # stays there while a long journal is read.
            run._write_pid()
            run.journal.cut_torn_tail()
            run._remove_partial_images()
            run._remove_leftover_temporaries()
            # Refused now, not when the dataset has been read through: a folder there stopped
            # every run at that point, blaming the list being written.
            _refuse_in_place_of_quarantine(path)
            run._quarantine = open_unlinked(
                path / QUARANTINE_PARTIAL, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, "wb", buffering=0
            )
        except OSError as exc:
            run._abandon(locked=True)
            raise storage_error(
                exc, f"open the run directory {path}", nothing_written=made_here
            ) from None
        except BaseException as exc:
            # Turned away by the journal's lock, the files here are another run's.
            run._abandon(locked=not isinstance(exc, RunLockedError))
            raise
        return run, state

    def _abandon(self, *, locked: bool) -> None:
        # A failed open: closed, and, when this run made the directory, removed again (each
        # full-disk --new-run left another empty run behind). What opening wrote goes only
        # when it is this run's own (``locked``: it held the locks); else only empty folders.
        if self.path in self._made and locked:
            self.discard()
            return
        if locked and self.journal.created:
            # Refused where there was no journal (images only): none is left behind.
            with suppress(OSError):
                if (self.path / JOURNAL).stat().st_size == 0:
                    (self.path / JOURNAL).unlink()
        self.close()
        if self.path in self._made:
            self._remove_made_folders()

    def write_images(self, images: Sequence[tuple[Path, bytes]]) -> None:
        """Write images atomically; their temporary files live in ``images/.partial``.

        Raises:
            RunDirError: they cannot be written, or the run directory was moved or replaced
                (:meth:`check_in_place`).
        """
        self.check_in_place()
        partial = self.path / IMAGES / PARTIAL
        try:
            for folder in dict.fromkeys([partial, *(path.parent for path, _ in images)]):
                self._make_image_folder(folder)
            write_atomic_many(images, temp_dir=partial)
        except OSError as exc:
            self.check_in_place()  # moved meanwhile: say so, not "No such file or directory"
            raise storage_error(exc, f"write images in {self.path / IMAGES}") from None

    def check_in_place(self) -> None:
        """Raise when the run directory is no longer the folder this run opened at its path:
        renamed or moved away (``mv runs/big runs/big-moved``), or replaced by another.
        Writing on would split the run: images in a folder made again at the old path, the
        journal's lines at the new one. One ``stat``.

        Raises:
            RunDirError: it was moved or replaced.
        """
        if self._identity is None:
            return
        try:
            info = os.stat(self.path)
        except OSError:
            info = None
        if info is None or (info.st_dev, info.st_ino) != self._identity:
            raise RunDirError(moved_or_replaced(self.path))

    def _make_image_folder(self, folder: Path) -> None:
        # The folders below the run directory only, each without its parents: a run
        # directory gone from its path (moved while the run went on) is never made again.
        missing: list[Path] = []
        current = folder
        while current != self.path and not current.is_dir():
            missing.append(current)
            current = current.parent
        for made in reversed(missing):
            try:
                made.mkdir()
            except FileExistsError:
                if made.is_dir():  # made meanwhile (another thread of this run)
                    continue
                raise _image_folder_in_the_way(made) from None
            sync_dir(made.parent)

    def image_path(self, task: str, model: str, data_id: str) -> Path:
        """Where the image of ``data_id`` by ``model`` lives (names are checked safe upstream;
        :func:`image_file` names the same path without a RunDir)."""
        folder = self._image_dirs.get((task, model))
        if folder is None:  # a path join costs microseconds, and every image needs one
            folder = self._image_dirs[task, model] = self.path / IMAGES / task / model
        refuse_an_image_path_too_long(self.path, task, model, data_id)
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
            RunDirError: the file cannot be written (a full disk), or the run directory was
                moved or replaced (:meth:`check_in_place`).
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
            fd = self._quarantine.fileno()
            start = os.lseek(fd, 0, os.SEEK_CUR)
            try:
                write_all(fd, line.encode() + b"\n")
            except OSError as exc:
                # Unfinished for good: close() must not promote it as a list read through.
                self._quarantine_failed = True
                # Take back what reached the file, so that its last line is whole again (a
                # torn half line was counted as a quarantined record).
                with suppress(OSError):
                    os.ftruncate(fd, start)
                    os.lseek(fd, start, os.SEEK_SET)
                self.check_in_place()  # moved meanwhile: say so, not the system's reason
                raise storage_error(exc, f"write to {self.path / QUARANTINE_PARTIAL}") from None

    def finish_quarantine(self) -> None:
        """The dataset has been read through: the records this run refused replace the list
        of the run before (a resume stopped early keeps that list; see :meth:`close`).

        Raises:
            RunDirError: the list cannot be put in place, or the run directory was moved or
                replaced (:meth:`check_in_place`).
        """
        if self._quarantine is None or self._quarantine_failed:
            return
        self._quarantine.close()
        self._quarantine = None
        final = self.path / QUARANTINE
        try:
            os.replace(self.path / QUARANTINE_PARTIAL, final)
        except IsADirectoryError:
            # The rename names the list it moves; the folder in the way is the destination.
            raise RunDirError(
                f"cannot replace {final} with this run's quarantine list: {final} is a folder; "
                "move or remove it, then run the same command again (the run resumes where "
                "it stopped)"
            ) from None
        except OSError as exc:
            # A run directory moved meanwhile fails the rename with "No such file or
            # directory", which said "cannot replace" where it should say "put it back".
            self.check_in_place()
            # The rename names the list it moves (the .partial); the file it could not
            # replace is the destination (an immutable one: "Operation not permitted").
            named = type(exc)(exc.errno, exc.strerror, str(final))
            raise storage_error(named, f"replace {final}") from None

    def close(self, *, release_lock: bool = True) -> None:
        """Close the journal and quarantine files and release the lock; safe to repeat.

        A quarantine list left unfinished (the run stopped before it read the dataset
        through) is only the start of this run's: the list of the run before stays, which
        says more; with none, the start is better than nothing and takes its place, unless
        writing it failed (a full disk): then it stays ``quarantine.jsonl.partial``, which
        ``status`` names as the list of a run stopped before it read the dataset through.

        Args:
            release_lock: False keeps ``run.lock`` held until :meth:`release_lock` (the
                run's report is written meanwhile, and no other run may start).
        """
        self.journal.close()
        if self._quarantine is not None:
            self._quarantine.close()
            self._quarantine = None
            partial, final = self.path / QUARANTINE_PARTIAL, self.path / QUARANTINE
            with suppress(OSError):  # closing must not hide the run's own outcome
                if final.exists():
                    partial.unlink()
                elif not self._quarantine_failed:
                    os.replace(partial, final)
        if release_lock:
            self.release_lock()

    def release_lock(self) -> None:
        """Release ``run.lock`` (once the files are closed: see :meth:`close`); safe to
        repeat."""
        if self._lock is not None:
            lock, self._lock = self._lock, None
            with suppress(OSError):  # closing must not hide the run's own outcome
                fcntl.flock(lock, fcntl.LOCK_UN)
            with suppress(OSError):
                lock.close()

    def discard(self) -> None:
        """Close the run directory and remove it: for one this process just made, whose run
        ended before it wrote a judgement (stopped, or failed, while its judges opened).

        What opening it wrote goes (the manifest, the empty journal, the quarantine list, the
        lock), the lock last; a file anyone else put there stays, and the folder with it.
        The folders above it that this run made (the output folder, on a first run) go too,
        when nothing else is in them.
        """
        self.journal.close()
        if self._quarantine is not None:
            self._quarantine.close()
            self._quarantine = None
        with suppress(OSError):  # closing must not hide the run's own outcome
            for name in (MANIFEST, JOURNAL, QUARANTINE_PARTIAL, LOCK):
                (self.path / name).unlink(missing_ok=True)
        self.close()
        if self.path not in self._made:
            self._made.insert(0, self.path)
        self._remove_made_folders()

    def _remove_made_folders(self) -> None:
        # Innermost first; one that is not empty (another run's there) keeps those above it.
        remove_made_dirs(self._made)
        self._made = []

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _acquire_lock(self) -> None:
        # A link planted there would have the pid written into the file it points to.
        # Unbuffered: a pid a full disk refused stays in no buffer for close() to write again.
        handle = open_unlinked(
            self.path / LOCK, os.O_RDWR | os.O_CREAT | os.O_APPEND, "a+b", buffering=0
        )
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
        # Written once the journal's lock is held too and the manifest written (see open):
        # viewers tell who runs here by it (:func:`~trig_stream.locks.find_writer`).
        assert self._lock is not None
        self._lock.truncate(0)
        write_all(self._lock.fileno(), str(os.getpid()).encode())  # appends: at 0

    def _remove_partial_images(self) -> None:
        # A crash between writing an image's temporary file and renaming it leaves the
        # temporary file behind; with the lock held, no writer of ours is using one. They
        # all live in one folder, so this never walks the (large) image folders.
        partial = self.path / IMAGES / PARTIAL
        if partial.is_symlink():  # its files are someone else's (refuse_links says so first)
            raise link_refused(partial)
        if partial.is_dir():
            kept: list[tuple[Path, OSError]] = []
            for leftover in sorted(partial.iterdir()):  # the first named as validate names it
                # A plain file only: a folder there (unlink: "Is a directory") stopped every
                # resume, and no writer of ours makes one, nor a link or a pipe.
                if leftover.is_file() and not leftover.is_symlink():
                    try:
                        leftover.unlink(missing_ok=True)
                    except OSError as exc:
                        # Only a leftover (a folder that cannot be written stopped even a
                        # finished run): a new temporary image takes a name of its own, and
                        # a run that writes images there meets the folder's own checks.
                        kept.append((leftover, exc))
            _warn_of_temporaries_kept(partial, kept)
            _warn_of_foreign_partials(self.path)

    def _remove_leftover_temporaries(self) -> None:
        # The manifest is written atomically beside itself: a crash before its rename left
        # its temporary file (``.manifest.json.<pid>.<thread>.tmp``) in the run directory for
        # good. With the lock held, no writer of ours is using one.
        for leftover in self.path.iterdir():
            if not LEFTOVER_TEMPORARY.fullmatch(leftover.name):
                continue
            # A plain file only: a folder or link of the user's named alike is theirs.
            if leftover.is_file() and not leftover.is_symlink():
                leftover.unlink(missing_ok=True)

    def _check_manifest(self, manifest: Manifest, journal: JournalState) -> None:
        # Where this run's lines start: a viewer tells the errors it asks again by it.
        manifest = manifest.model_copy(update={"journal_lines": journal.lines})
        manifest = resumed_manifest(self.path, manifest, journal)
        # write_atomic makes the folder it writes in: a run directory moved away while it
        # opened would be made again at its old path, holding only the manifest.
        self.check_in_place()
        try:
            write_atomic(self.path / MANIFEST, manifest.model_dump_json(indent=2).encode())
        except OSError:
            self.check_in_place()  # moved meanwhile: say so, not "No such file or directory"
            raise


def _warn_of_temporaries_kept(partial: Path, kept: Sequence[tuple[Path, OSError]]) -> None:
    """Warn of the temporary images a crash left in ``partial`` (``images/.partial``) that
    cannot be removed, each with the reason (``kept``)."""
    if kept:
        first, reason = kept[0]
        logger.warning(
            "%s holds %d temporary image(s) left by a crash that cannot be removed (the "
            "first: %s: %s): left in place; new ones take names of their own, so remove them "
            "when you can",
            partial,
            len(kept),
            first.name,
            reason.strerror or reason,
        )


def _temporaries_that_stay(path: Path) -> list[tuple[Path, OSError]]:
    """The temporary images in ``images/.partial`` of the run directory ``path`` that a run
    could not remove, each with its reason: all of them, when the folder cannot be written
    (``validate``: looked at only)."""
    partial = path / IMAGES / PARTIAL
    if partial.is_symlink() or not partial.is_dir() or _writable(partial):
        return []
    entries = [e for e in _entries(partial) if e.is_file() and not e.is_symlink()]
    return [(entry, _denied(entry, partial)) for entry in entries]


def _warn_of_foreign_partials(path: Path) -> None:
    """Warn of what ``images/.partial`` of the run directory ``path`` holds that is no plain
    file: never written by a run, it is left alone (only temporary images are removed)."""
    foreign = [
        entry
        for entry in _entries(path / IMAGES / PARTIAL)
        if entry.is_symlink() or not entry.is_file()
    ]
    if foreign:
        logger.warning(
            "%s holds %d entry(ies) a run never writes there (the first: %s, not a plain "
            "file): left alone; move them away, only temporary images belong there",
            path / IMAGES / PARTIAL,
            len(foreign),
            foreign[0].name,
        )


def refuse_links(path: Path) -> None:
    """Refuse the run directory ``path`` when one of its own files or folders is a symbolic
    link: its journal, lock, manifest and quarantine lists, ``images/.partial``, and the image
    folders ``images/<task>`` and ``images/<task>/<model>``. A run would write (or, for
    ``.partial``, empty) what the link points to. The run directory itself and ``images/``
    may be links: images kept on another disk stay under a folder of their own.

    Raises:
        RunDirError: one is a link (:func:`~trig_stream.files.link_refused`).
    """
    own = [path / name for name in (JOURNAL, LOCK, MANIFEST, QUARANTINE, QUARANTINE_PARTIAL)]
    tasks = _entries(path / IMAGES)
    own += tasks
    for task in tasks:  # each holds a folder per model, never the images themselves
        if task.name != PARTIAL and not task.is_symlink():
            own += _entries(task)
    for entry in own:
        try:
            linked = entry.is_symlink()
        except OSError as exc:  # a folder without search permission: never a traceback
            raise storage_error(exc, f"open the run directory {path}") from None
        if linked:
            raise link_refused(entry)


def _entries(folder: Path) -> list[Path]:
    # What ``folder`` holds; nothing when it is no folder, or cannot be read (the run's own
    # reading or writing there says so, in its words).
    try:
        return sorted(folder.iterdir())
    except OSError:
        return []


def _moved_since(stored: Manifest, path: Path) -> Move | None:
    """How the run directory ``path`` moved since ``stored``, its manifest, was written: the
    config of the run that wrote it says where its output folder was (None: unknown)."""
    run = stored.config.get("run")
    was = run.get("output_dir") if isinstance(run, dict) else None
    if not isinstance(was, str) or not Path(was).is_absolute():
        return None
    return Move.between(Path(was), path.absolute().parent)


def resumed_manifest(path: Path, manifest: Manifest, journal: JournalState) -> Manifest:
    """The manifest a run with ``manifest`` writes in the run directory ``path``: its own, or,
    when the directory holds results, the stored one with what ``manifest`` adds.

    Results are anything made under the stored manifest: a judgement that is not an
    ``error`` (``journal`` says) or an image. A run that made neither (its generator failed
    to load, or failed every call) protects nothing, so its corrected config starts afresh
    in the same directory; and a generator or judge that made none takes its corrected
    settings beside the others' results (:func:`_results_held`). Nothing is written here.

    Raises:
        RunDirError: the directory holds results but no manifest, or its manifest or
            quarantine list is another program's file (:func:`_refuse_files_not_ours`).
        FingerprintMismatch: its results were made with settings that differ, or its journal
            holds results its manifest does not describe (a judge's lines of another
            fingerprint than its entry, lines of images made with another seed, a model or
            judge with results and no entry).
    """
    _refuse_files_not_ours(path)
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
    unaccounted = stored.journal_differences(
        journal.models_with_results, journal.judges, journal.seeds, journal.seed_conflicts
    )
    if unaccounted:
        raise FingerprintMismatch(
            f"{path} holds results its {MANIFEST} does not describe (a journal copied in from "
            "another run, or the manifest edited?):\n  "
            + "\n  ".join(unaccounted)
            + f"\nRestore the run directory's own {JOURNAL} and {MANIFEST}, or use --new-run "
            "to start a fresh run directory beside it."
        )
    stored = checked_scoring_rules(stored, manifest, journal, path)
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


QUARANTINE_START = b'{"schema_version":'
"""How every line of a quarantine list starts (a record's JSON, its version first)."""


def _refuse_files_not_ours(path: Path) -> None:
    """Refuse the run directory ``path`` when its ``manifest.json`` or ``quarantine.jsonl``
    is not one trig-stream wrote: a run writes over both (a folder without results starts
    afresh), and another program's file of that name (a web app's manifest) was lost. A
    damaged manifest of ours (empty, or unparsable beside our journal or images:
    :func:`~trig_stream.manifest.manifest_is_ours`) is
    :func:`~trig_stream.manifest.read_manifest`'s to name;
    one that cannot be read is left to the run's own reading or writing to say so.

    Raises:
        RunDirError: either file is another program's.
    """
    with suppress(OSError):
        with open_regular_file(path / MANIFEST) as handle:
            head = handle.read(MANIFEST_HEAD_BYTES)
            # One that starts as ours is: nothing more to read. Any other is read whole, up
            # to the cap only (a foreign file of a gigabyte was read whole).
            ours = manifest_head_is_ours(head)
            rest = b"" if ours else read_manifest_text(handle)
        if rest is None or len(head) + len(rest) > MAX_MANIFEST_BYTES:
            raise RunDirError(too_large_manifest(path / MANIFEST))
        if not ours and not manifest_is_ours(path, head + rest):
            raise RunDirError(not_a_manifest(path / MANIFEST))
    with suppress(OSError):
        with open_regular_file(path / QUARANTINE) as handle:
            start = handle.read(len(QUARANTINE_START))
        # Empty when nothing was refused; a line cut short by a crash starts alike.
        if not QUARANTINE_START.startswith(start):
            raise RunDirError(
                f"{path / QUARANTINE} is not a trig-stream run directory's quarantine list "
                "(another program's file?), and a run would write over it: move it away, or "
                "use --new-run to start a fresh run directory beside it (or change [run] name)"
            )


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
    # In the run's order: making the directory, then looking into it, then writing there.
    refuse_a_path_too_long(path, manifest, made_here=not os.path.isdir(path))
    _refuse_a_file_on_the_way(path)
    refuse_links(path)
    _refuse_unwritable(path)
    # As a run does.
    _warn_of_temporaries_kept(path / IMAGES / PARTIAL, _temporaries_that_stay(path))
    _warn_of_foreign_partials(path)
    try:
        journal, _ = journal_state(path / JOURNAL)
    except OSError as exc:
        raise journal_unreadable(path / JOURNAL, exc) from None
    refuse_a_torn_tail_kept(path / JOURNAL, journal)  # as the run's opening of it does
    # As the run's reading of the journal warns.
    warn_of_skipped_lines(path / JOURNAL, journal.skipped_lines, journal.skipped_reason)
    resumed_manifest(path, manifest, journal)
    return journal


def _refuse_a_file_on_the_way(path: Path, what: str | None = None) -> None:
    """Raise the error a run gets making the folder ``path`` (the run directory; ``what``
    says what it is making, "create the run directory ``path``" by default) when it, or the
    folder above it that exists, is a file (``output_dir`` naming a file): the journal's own
    "Not a directory" said nothing of where the fault was. A folder on the way that cannot be
    looked up (a name too long, no search permission, a link that loops) gets the run's error
    too, with the system's own reason."""
    what = what or f"create the run directory {path}"
    current = path
    try:
        while not current.is_dir():
            if current.exists() or current.is_symlink():
                code = errno.EEXIST if current == path else errno.ENOTDIR
                if current != path:
                    try:  # a link that loops: "Too many levels of symbolic links", as a run
                        os.stat(current)
                    except OSError as exc:
                        code = exc.errno or code
                raise storage_error(
                    OSError(code, os.strerror(code)), what, nothing_written=True, path=path
                )
            if current.parent == current:
                return
            current = current.parent
    except OSError as exc:
        raise storage_error(exc, what, nothing_written=True, path=path) from None


def _refuse_unwritable(path: Path) -> None:
    """Raise the error a run gets when it cannot write the run directory ``path``: the
    folder it would make it in, or the directory, is not writable; or one of the files a run
    writes there (its lock, journal, manifest, quarantine list) is read-only, a folder or a
    pipe, or, for the two it replaces, immutable or append-only (``chattr``); or ``images/``
    cannot be read. Looked at only (``os.access``, the attributes), nothing is written."""
    if not path.is_dir():  # made by the run, in the nearest folder that exists
        missing = path
        while not missing.parent.is_dir():
            missing = missing.parent
        if not _writable(missing.parent):
            raise storage_error(
                _denied(missing, missing.parent),
                f"create the run directory {path}",
                nothing_written=True,
            )
        return
    # The lock first, then the journal, the manifest (written beside itself, atomically) and
    # the quarantine list, as RunDir.open opens them.
    _refuse_unwritable_file(path / LOCK, f"write in the run directory {path} ({LOCK})")
    opening = f"open the run directory {path}"
    with suppress(OSError):
        if not stat.S_ISREG((path / JOURNAL).lstat().st_mode):  # in the journal's words
            raise journal_not_a_file(path / JOURNAL)
    _refuse_unwritable_file(path / JOURNAL, opening)
    if (path / MANIFEST).is_dir():
        code = errno.EISDIR
        raise storage_error(OSError(code, os.strerror(code), str(path / MANIFEST)), opening)
    if not _writable(path):
        raise storage_error(_denied(path), opening)
    if unchangeable(path / MANIFEST):  # its rename over it fails, once the judges are open
        raise storage_error(_denied(path / MANIFEST), opening)
    images = path / IMAGES
    if images.is_dir() and not os.access(images, os.R_OK | os.X_OK):
        raise storage_error(_denied(images), opening)
    try:
        _refuse_in_place_of_quarantine(path)
    except OSError as exc:
        raise storage_error(exc, opening) from None
    _refuse_unwritable_file(path / QUARANTINE_PARTIAL, opening)


def _refuse_in_place_of_quarantine(path: Path) -> None:
    """Raise when something other than a file stands where the run directory ``path`` keeps
    its quarantine list (a folder, a pipe): this run's list could not replace it once the
    dataset has been read through. A read-only file there is replaced as any file is.

    Nor can it replace one that is immutable or append-only (``chattr +i``): refused too,
    not after every sample was judged.

    Raises:
        OSError: ``IsADirectoryError`` for a folder, ``PermissionError`` (EPERM) for a file
            that cannot be replaced, else :class:`~trig_stream.files.UnfitFileError` naming
            what is there; each names the path.
    """
    final = path / QUARANTINE
    try:
        mode = final.lstat().st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(final))
    refuse_special_file(final, mode)
    if unchangeable(final):
        raise _denied(final)


def _refuse_unwritable_file(file: Path, what: str) -> None:
    # A file of the run directory a run opens for writing, creating it when absent.
    try:
        mode = file.lstat().st_mode
    except FileNotFoundError:
        if not _writable(file.parent):
            raise storage_error(_denied(file, file.parent), what) from None
        return
    except OSError as exc:
        raise storage_error(exc, what) from None
    if stat.S_ISDIR(mode):
        code = errno.EISDIR
        raise storage_error(OSError(code, os.strerror(code), str(file)), what)
    try:
        refuse_special_file(file, mode)
    except OSError as exc:
        raise storage_error(exc, what) from None
    if not os.access(file, os.W_OK):
        raise storage_error(_denied(file), what)


def _writable(folder: Path) -> bool:
    # What a run needs of a folder it makes files in. An immutable one fails it even for
    # root, whose error is then "Operation not permitted" (see _denied).
    return os.access(folder, os.W_OK | os.X_OK)


def _denied(path: Path, where: Path | None = None) -> OSError:
    """The error a run gets writing ``path``, which ``os.access`` (or the attributes) of
    ``where`` (``path`` itself by default) refused, as the system says it: "Read-only file
    system" when that is on a read-only mount, "Operation not permitted" when it is immutable
    or append-only, else "Permission denied"."""
    where = where or path
    if _on_a_read_only_mount(where):  # the system's first look, before the attributes
        return OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
    code = errno.EPERM if unchangeable(where) else errno.EACCES
    return PermissionError(code, os.strerror(code), str(path))


def _on_a_read_only_mount(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:  # not to be looked up: the permissions' refusal stands
        return False


def _image_folder_in_the_way(folder: Path) -> OSError:
    # What stands where a run makes a folder of images: "File exists" said nothing of it. A
    # symbolic link (``images/`` may be one, to another disk) is what it points to, or, when
    # that does not exist (the disk not mounted), says so.
    link = broken_link(folder)
    if link is not None:
        return UnfitFileError(errno.ENOENT, link)
    try:
        mode = folder.stat().st_mode
    except OSError as exc:  # removed meanwhile
        return exc
    kind = "file" if stat.S_ISREG(mode) else file_kind(mode)
    return UnfitFileError(
        errno.EEXIST,
        f"{folder} is a {kind}; it must be a folder of the run's images: move or remove it",
    )


def refuse_a_folder_at_an_image(image: Path) -> None:
    """Raise when a folder stands at ``image``, where a run writes an image file: the write
    of the picture made for it failed with "Is a directory", at every resume. One ``lstat``,
    for an image not found on disk to reuse (a link to a folder is replaced, not refused).

    Raises:
        RunDirError: naming it, and what to do.
    """
    try:
        mode = os.lstat(image).st_mode
    except OSError:  # nothing there; or it cannot be looked up, which the write says
        return
    if stat.S_ISDIR(mode):
        images = image.parents[2]  # images/<task>/<model>/<data_id>.png
        problem = f"{image} is a folder; the run writes an image file there: move or remove it"
        raise storage_error(UnfitFileError(errno.EISDIR, problem), f"write images in {images}")


def image_file(path: Path, task: str, model: str, data_id: str) -> Path:
    """Where the run directory ``path`` holds the image of ``data_id`` by ``model`` for
    ``task``, as :meth:`RunDir.image_path` names it (``trig-stream validate``).

    Raises:
        RunDirError: its path is too long (:func:`refuse_an_image_path_too_long`).
    """
    refuse_an_image_path_too_long(path, task, model, data_id)
    return path / IMAGES / task / model / f"{data_id}.png"


class ImagesOnDisk:
    """Which images a run directory ``path`` holds for ``task`` (``trig-stream validate``):
    each model's image folder listed once, its files and its folders by name, rather than a
    look at each image (one per sample and model doubled validate's time on 60k samples)."""

    def __init__(self, path: Path, task: str) -> None:
        self.path = path
        self.task = task
        self._listed: dict[str, tuple[frozenset[str], frozenset[str]] | None] = {}
        """Each model's image files (links to one included) and folders (not links to one),
        by name; None where its folder cannot be listed (each image is then looked at)."""

    def to_make(self, model: str, data_id: str) -> bool:
        """Whether the run makes the image of ``data_id`` by ``model``: no image file is there
        to reuse (looked up, not decoded as the run decodes it: a damaged image on disk is
        made again, seldom, and not looked for).

        Raises:
            RunDirError: its path is too long (:func:`refuse_an_image_path_too_long`), or a
                folder stands there (:func:`refuse_a_folder_at_an_image`), as the run
                refuses it before making the image.
        """
        refuse_an_image_path_too_long(self.path, self.task, model, data_id)
        if model not in self._listed:
            folder = image_file(self.path, self.task, model, data_id).parent
            self._listed[model] = _image_names(folder)
        listed = self._listed[model]
        if listed is not None:  # by name: a Path for each image took most of the time
            files, folders = listed
            name = f"{data_id}.png"
            if name in files:
                return False
            if name not in folders:
                return True
        image = image_file(self.path, self.task, model, data_id)
        if listed is None and image.is_file():
            return False
        refuse_a_folder_at_an_image(image)
        return True


def _image_names(folder: Path) -> tuple[frozenset[str], frozenset[str]] | None:
    """The names of the files (links to one included) and of the folders (not links) in a
    model's image ``folder``; none where it is missing (or no folder); None where it cannot
    be listed otherwise."""
    files: set[str] = set()
    folders: set[str] = set()
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    folders.add(entry.name)
                elif entry.is_file():
                    files.add(entry.name)
    except (FileNotFoundError, NotADirectoryError):
        return frozenset(), frozenset()
    except OSError:
        return None
    return frozenset(files), frozenset(folders)


def check_image_folders(path: Path, task: str, models: Sequence[str]) -> None:
    """Raise the error a run that writes images of ``models`` for ``task`` in the run
    directory ``path`` gets (``trig-stream validate``, for the models with an image still to
    make; one already on disk is reused, nothing written): a file, or a symbolic link that
    points nowhere, where ``images/``, ``images/.partial``, ``images/<task>`` or
    ``images/<task>/<model>`` goes, or one of them that exists, or the folder a missing one
    is made in, that cannot be written. Looked at only (``os.access`` and the attributes),
    nothing is made.

    Raises:
        RunDirError: the run could not write its images.
    """
    if not path.is_dir():  # made afresh by the run, the images with it
        return
    images = path / IMAGES
    what = f"write images in {images}"
    chains = [[images, images / PARTIAL]]
    chains += [[images, images / task, images / task / model] for model in models]
    for chain in chains:
        parent = path
        for folder in chain:
            try:
                mode = folder.stat().st_mode
            except FileNotFoundError:  # made by the run in ``parent``
                if folder.is_symlink():  # pointing nowhere: the run cannot make it
                    raise storage_error(_image_folder_in_the_way(folder), what) from None
                if not _writable(parent):
                    raise storage_error(_denied(folder, parent), what) from None
                break
            except OSError as exc:
                raise storage_error(exc, what) from None
            if not stat.S_ISDIR(mode):
                raise storage_error(_image_folder_in_the_way(folder), what)
            parent = folder
        else:
            if not _writable(parent):  # the last one, written in
                raise storage_error(_denied(parent), what)


def _holds_a_file(folder: Path) -> bool:
    """Whether ``folder`` or one below it (temporary images apart) holds a file."""
    if not folder.is_dir():
        return False
    for where, subfolders, files in os.walk(folder):
        if files and Path(where).name != PARTIAL:
            return True
        subfolders[:] = [name for name in subfolders if name != PARTIAL]
    return False


def check_new_run(path: Path, manifest: Manifest) -> Path:
    """The run directory ``run --new-run`` would take for ``path``
    (:func:`next_free_run_dir`'s choice), made nothing of, for a run with ``manifest``:
    ``validate --new-run``.

    Raises:
        RunDirError: what :func:`next_free_run_dir` would raise: the folder of run
            directories cannot be made or written, or the name it would take is too long.
    """
    folder = path.parent
    # The lookups make_dirs makes; whatever is at ``path`` itself is passed over, as below.
    _refuse_a_file_on_the_way(folder, f"create the folder of run directories {folder}")
    if not folder.is_dir():
        missing = folder
        while not missing.parent.is_dir():
            missing = missing.parent
        if not _writable(missing.parent):
            what = f"create the folder of run directories {folder}"
            raise storage_error(_denied(missing, missing.parent), what, nothing_written=True)
        refuse_a_path_too_long(path, manifest, made_here=True)
        return path
    candidate, number = path, 1
    while candidate.exists() or candidate.is_symlink():
        number += 1
        candidate = path.with_name(f"{path.name}-{number}")
        if len(candidate.name) > MAX_NAME_CHARS:
            raise _new_run_name_too_long(candidate)
    if not _writable(folder):
        what = f"create the run directory {candidate}"
        raise storage_error(_denied(candidate, folder), what, nothing_written=True)
    refuse_a_path_too_long(candidate, manifest, made_here=True)
    return candidate


def _new_run_name_too_long(candidate: Path) -> RunDirError:
    return RunDirError(
        f"--new-run would write {candidate.name!r}, a run name of {len(candidate.name)} "
        f"characters, which no config can name to resume it (at most {MAX_NAME_CHARS}): "
        "shorten [run] name"
    )


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
        made = make_dirs(path.parent)
    except OSError as exc:
        raise storage_error(
            exc,
            f"create the folder of run directories {path.parent}",
            nothing_written=True,
            path=path.parent,
        ) from None
    candidate, number = path, 1
    while True:
        if number > 1:
            candidate = path.with_name(f"{path.name}-{number}")
            if len(candidate.name) > MAX_NAME_CHARS:
                raise _new_run_name_too_long(candidate)
        made_here: list[Path] = []
        try:
            # Made, not looked at: a check then a later make let a second run take it too.
            candidate.mkdir()
            made_here.append(candidate)
            sync_dir(path.parent)
        except FileExistsError:
            number += 1
            continue
        except OSError as exc:
            # Nothing stays of what this call made: it, and the folders above it.
            remove_made_dirs([*made_here, *made])
            raise storage_error(
                exc, f"create the run directory {candidate}", nothing_written=True, path=candidate
            ) from None
        with _made_lock:
            _made_for_runs[candidate] = [candidate, *made]
        return candidate
