"""What a run would be refused in its run directory, looked at without writing anything.

A run and ``trig-stream validate`` ask the same questions here, so that validate says what the
run would: whether the run directory, its own files (lock, journal, manifest, quarantine lists)
and its image folders can be made and written (:func:`refuse_unwritable`,
:func:`check_image_folders`, :class:`ImagesOnDisk`), whether one of them is a symbolic link
(:func:`refuse_links`), and what a crash left in ``images/.partial`` that stays there
(:func:`warn_of_temporaries_kept`, :func:`warn_of_foreign_partials`). Only ``stat``,
``os.access`` and the file attributes are used: nothing is made, written or removed.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path

from trig_stream.files import (
    UnfitFileError,
    broken_link,
    file_kind,
    link_refused,
    refuse_special_file,
    storage_error,
    unchangeable,
)
from trig_stream.journal import JOURNAL, journal_not_a_file
from trig_stream.locks import LOCK
from trig_stream.manifest import IMAGES, MANIFEST
from trig_stream.quarantine_text import QUARANTINE, QUARANTINE_PARTIAL
from trig_stream.run_dir_paths import (
    PARTIAL,
    image_path_bytes,
    image_path_room,
    refuse_an_image_path_too_long,
)

logger = logging.getLogger(__name__)


def refuse_a_file_on_the_way(path: Path, what: str | None = None) -> None:
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


def refuse_unwritable(path: Path) -> None:
    """Raise the error a run gets when it cannot write the run directory ``path``: the
    folder it would make it in, or the directory, is not writable; or one of the files a run
    writes there (its lock, journal, manifest, quarantine list) is read-only, a folder or a
    pipe, or, for the two it replaces, immutable or append-only (``chattr``); or ``images/``
    cannot be read. Looked at only (``os.access``, the attributes), nothing is written."""
    if not path.is_dir():  # made by the run, in the nearest folder that exists
        missing = path
        while not missing.parent.is_dir():
            missing = missing.parent
        if not writable(missing.parent):
            raise storage_error(
                denied(missing, missing.parent),
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
    if not writable(path):
        raise storage_error(denied(path), opening)
    if unchangeable(path / MANIFEST):  # its rename over it fails, once the judges are open
        raise storage_error(denied(path / MANIFEST), opening)
    images = path / IMAGES
    if images.is_dir() and not os.access(images, os.R_OK | os.X_OK):
        raise storage_error(denied(images), opening)
    try:
        refuse_in_place_of_quarantine(path)
    except OSError as exc:
        raise storage_error(exc, opening) from None
    _refuse_unwritable_file(path / QUARANTINE_PARTIAL, opening)


def refuse_in_place_of_quarantine(path: Path) -> None:
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
        raise denied(final)


def _refuse_unwritable_file(file: Path, what: str) -> None:
    # A file of the run directory a run opens for writing, creating it when absent.
    try:
        mode = file.lstat().st_mode
    except FileNotFoundError:
        if not writable(file.parent):
            raise storage_error(denied(file, file.parent), what) from None
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
        raise storage_error(denied(file), what)


def writable(folder: Path) -> bool:
    # What a run needs of a folder it makes files in. An immutable one fails it even for
    # root, whose error is then "Operation not permitted" (see denied).
    return os.access(folder, os.W_OK | os.X_OK)


def denied(path: Path, where: Path | None = None) -> OSError:
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


def image_folder_in_the_way(folder: Path) -> OSError:
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
    ``task``, as :meth:`~trig_stream.store.RunDir.image_path` names it (``trig-stream
    validate``).

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
        self._room = image_path_room(path)
        """The bytes an image's part of its path may have (:func:`image_path_room`)."""
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
        # The run directory's path looked at once, not for each image: only an image whose
        # path can be too long is checked (and refused) with it.
        if image_path_bytes(self.task, model, data_id) >= self._room:
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
                    raise storage_error(image_folder_in_the_way(folder), what) from None
                if not writable(parent):
                    raise storage_error(denied(folder, parent), what) from None
                break
            except OSError as exc:
                raise storage_error(exc, what) from None
            if not stat.S_ISDIR(mode):
                raise storage_error(image_folder_in_the_way(folder), what)
            parent = folder
        else:
            if not writable(parent):  # the last one, written in
                raise storage_error(denied(parent), what)


def warn_of_temporaries_kept(partial: Path, kept: Sequence[tuple[Path, OSError]]) -> None:
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


def temporaries_that_stay(path: Path) -> list[tuple[Path, OSError]]:
    """The temporary images in ``images/.partial`` of the run directory ``path`` that a run
    could not remove, each with its reason: all of them, when the folder cannot be written
    (``validate``: looked at only)."""
    partial = path / IMAGES / PARTIAL
    if partial.is_symlink() or not partial.is_dir() or writable(partial):
        return []
    entries = [e for e in _entries(partial) if e.is_file() and not e.is_symlink()]
    return [(entry, denied(entry, partial)) for entry in entries]


def warn_of_foreign_partials(path: Path) -> None:
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
