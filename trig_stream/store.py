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
:mod:`trig_stream.files`, the paths that moved with a moved run directory in
:mod:`trig_stream.moves`, the quarantine list's names in :mod:`trig_stream.quarantine_text`.
The checks a run directory gets before anything is written there, shared with ``validate``:
how long its path may be in :mod:`trig_stream.run_dir_paths`, whether it can be written in
:mod:`trig_stream.run_dir_access`, whether its results let a run resume in
:mod:`trig_stream.resume_checks`; ``--new-run``'s choice of a directory in
:mod:`trig_stream.new_runs`. Here: the :class:`RunDir` a run holds.
"""

from __future__ import annotations

import fcntl
import os
import re
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path
from typing import IO

from trig_stream.errors import RunDirError, RunLockedError
from trig_stream.files import (
    link_refused,
    make_dirs,
    open_unlinked,
    remove_made_dirs,
    storage_error,
    sync_dir,
    write_all,
    write_atomic,
    write_atomic_many,
)
from trig_stream.journal import (
    JOURNAL,
    Journal,
    JournalState,
    moved_or_replaced,
    warn_of_samples_without_digest,
)
from trig_stream.locks import LOCK, run_in_use
from trig_stream.manifest import IMAGES, MANIFEST, Manifest
from trig_stream.new_runs import take_made_folders
from trig_stream.quarantine_text import QUARANTINE, QUARANTINE_PARTIAL
from trig_stream.records import QuarantinedRecord, storable_text
from trig_stream.resume_checks import resumed_manifest
from trig_stream.run_dir_access import (
    image_folder_in_the_way,
    refuse_in_place_of_quarantine,
    refuse_links,
    warn_of_foreign_partials,
    warn_of_temporaries_kept,
)
from trig_stream.run_dir_paths import (
    PARTIAL,
    refuse_a_path_too_long,
    refuse_an_image_path_too_long,
)

LEFTOVER_TEMPORARY = re.compile(rf"\.{re.escape(MANIFEST)}\.\d+\.\d+\.tmp")
"""The name of the temporary file :func:`~trig_stream.files.write_atomic` writes beside the
manifest, left in the run directory by a crash."""


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

        A directory this run made (here, or :func:`~trig_stream.new_runs.next_free_run_dir`)
        that it then cannot open (a full disk) is removed again, with the folders above it
        that it made.

        Raises:
            RunLockedError: another process is running in it.
            FingerprintMismatch: its results were made with settings that differ.
            RunDirError: it cannot be made or written.
        """
        run = cls(path)
        made = take_made_folders(path)
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
            warn_of_samples_without_digest(run.journal.path, state)  # as validate warns
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
            refuse_in_place_of_quarantine(path)
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
                raise image_folder_in_the_way(made) from None
            sync_dir(made.parent)

    def image_path(self, task: str, model: str, data_id: str) -> Path:
        """Where the image of ``data_id`` by ``model`` lives (names are checked safe upstream;
        :func:`~trig_stream.run_dir_access.image_file` names the same path without a RunDir)."""
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
            warn_of_temporaries_kept(partial, kept)
            warn_of_foreign_partials(self.path)

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
