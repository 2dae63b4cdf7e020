"""Files of a run directory on disk: written so that a crash leaves all of a file or none
of it, with durable names, and read without waiting on a pipe.

The store, the journal and the config importer write through here; a write that fails
becomes the :func:`storage_error` that says what to do (a full disk loses nothing durable).
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import stat
import sys
import threading
from collections.abc import Iterable, Sequence
from contextlib import suppress
from pathlib import Path, PurePath
from typing import IO, BinaryIO, Final

from trig_stream.errors import RunDirError


def locale_problem(path: PurePath | str) -> str | None:
    """Why ``path`` cannot be used in this locale: this process's file-name encoding cannot
    hold the path's characters, which a look-up or a write then failed on with a traceback
    (UnicodeEncodeError). None when it can.

    A config's text ``données`` under ``LC_ALL=C`` with ``PYTHONUTF8=0`` (ASCII) is such a
    path. A path from the command line never is: its bytes the encoding could not read come
    as surrogates, which give the same bytes back; nor is ``café`` in a Latin-1 locale.
    """
    encoding = sys.getfilesystemencoding()
    try:
        # As os.fsencode encodes a file name (surrogateescape on POSIX).
        str(path).encode(encoding, sys.getfilesystemencodeerrors())
    except UnicodeEncodeError:
        return locale_refusal(path)
    return None


def locale_refusal(path: PurePath | str) -> str:
    """The error of a path this process's file-name encoding cannot hold, or whose UTF-8
    bytes it reads only as surrogates (which a run, recording its paths as UTF-8 text,
    cannot record): run in a UTF-8 locale."""
    encoding = sys.getfilesystemencoding()
    text = str(path)
    # The command line's bytes come as surrogates, a config's text as characters: both shown.
    try:
        shown = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate no byte stands for
        shown = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return (
        f"{shown}: this path cannot be used in this locale, whose file-name encoding is "
        f"{encoding}, not UTF-8; run in a UTF-8 locale (LC_ALL=C.UTF-8, or PYTHONUTF8=1)"
    )


def real_path(path: Path) -> Path:
    """``path`` made absolute, its symbolic links and ``..`` resolved as far as they lead.

    Unlike :meth:`Path.resolve`, which raised ``RuntimeError("Symlink loop ...")`` (a
    traceback) for a link that loops, such a link is left as written: what uses the path
    then says it "cannot be looked up: Too many levels of symbolic links", naming it, as it
    does for an absolute path through that link.
    """
    return Path(os.path.realpath(path))


def open_regular_file(path: Path) -> BinaryIO:
    """A file of a run directory opened for reading, without waiting on it.

    Opening or reading a pipe (or some devices) waits for a writer that may never come: a
    viewer of the run hung there. Only a regular file is read.

    Raises:
        OSError: it cannot be opened (FileNotFoundError when there is none), or it is no
            regular file.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # no effect on a regular file
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "it is not a regular file (a pipe, a folder or a device?)")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


MAX_SETTINGS_BYTES: Final = 16 * 2**20
"""The largest settings file read whole (a config, a judge template, a relation report): each
is a few kilobytes."""


class UnfitFileError(OSError):
    """A path that names no regular file (a pipe, a device), or a file past the size limit:
    what it is, in words, is the error's ``strerror``."""


def read_settings_file(path: Path, limit: int = MAX_SETTINGS_BYTES) -> bytes:
    """The whole content of a small settings file (a config, a judge template, a relation
    report), read without waiting on a pipe and without reading a device for ever.

    A named pipe would be waited on until a writer comes, ``/dev/zero`` read until memory
    runs out: only a regular file is read, and at most ``limit`` bytes of it.

    Raises:
        UnfitFileError: ``path`` is no regular file, nor a folder, or is larger than ``limit``;
            its ``strerror`` says which (``it is a named pipe (FIFO), not a file``).
        OSError: it cannot be opened or read (``IsADirectoryError`` for a folder).
    """
    _refuse_unfit(os.stat(path).st_mode)  # a socket cannot even be opened (ENXIO)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # no wait on a pipe
    with os.fdopen(fd, "rb") as file:
        _refuse_unfit(os.fstat(fd).st_mode)  # what was opened, if it was replaced meanwhile
        data = file.read(limit + 1)
    if len(data) > limit:
        size = f"{limit // 2**20} MiB" if limit % 2**20 == 0 else f"{limit} bytes"
        raise UnfitFileError(errno.EFBIG, f"it is larger than {size}")
    return data


def undecodable_byte(raw: bytes, exc: UnicodeDecodeError) -> int:
    """Where in ``raw`` the byte lies that ``exc``, raised decoding it, could not decode,
    counted from its start: a codec that skipped a byte order mark (``utf-8-sig``, the
    ``json`` module's) counts from after the mark."""
    return exc.start + len(raw) - len(exc.object)


def _refuse_unfit(mode: int) -> None:
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
    if not stat.S_ISREG(mode):
        raise UnfitFileError(errno.EINVAL, f"it is a {file_kind(mode)}, not a file")


def link_refused(path: Path) -> RunDirError:
    """The error of a run directory's own file or folder found to be a symbolic link.

    A run writes, and removes, files only inside its run directory: written through a link
    planted there, they would land on, or wipe, whatever the link points to.
    """
    try:
        target = os.readlink(path)
    except OSError:
        target = "somewhere else"
    return RunDirError(
        f"{path} is a symbolic link (to {target}): a run writes and removes files only inside "
        "its run directory, never through a link there; replace the link with the file or "
        "folder itself (moved into the run directory), or remove it"
    )


def open_unlinked(path: Path, flags: int, mode: str, *, buffering: int = -1) -> IO[bytes]:
    """A file of a run directory opened with ``flags`` (``O_CREAT`` makes it), refusing a
    symbolic link in its place rather than writing what it points to.

    Raises:
        RunDirError: ``path`` is a symbolic link (:func:`link_refused`).
        OSError: it cannot be opened.
    """
    try:
        # Not blocking: opened for writing, a named pipe there waited for a reader for ever.
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP and path.is_symlink():
            raise link_refused(path) from None
        if exc.errno == errno.ENXIO:  # a pipe with no reader, or a socket
            refuse_special_file(path, os.stat(path).st_mode)
        raise
    try:
        refuse_special_file(path, os.fstat(fd).st_mode)
        os.set_blocking(fd, True)
        return os.fdopen(fd, mode, buffering=buffering)
    except BaseException:
        os.close(fd)
        raise


def refuse_special_file(path: Path, mode: int) -> None:
    """Raise when ``mode`` (of ``path``) is no regular file nor folder: a run's own file
    that is a pipe or a device cannot be written as a file.

    Raises:
        UnfitFileError: it is not, naming ``path`` and what it is.
    """
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise UnfitFileError(errno.EINVAL, f"it is a {file_kind(mode)}, not a file", str(path))


def file_kind(mode: int) -> str:
    """What a path that is neither a regular file nor a folder is, in words."""
    kinds = {
        stat.S_ISFIFO: "named pipe (FIFO)",
        stat.S_ISSOCK: "socket",
        stat.S_ISCHR: "character device",
        stat.S_ISBLK: "block device",
    }
    return next((kind for test, kind in kinds.items() if test(mode)), "special file")


def write_atomic(path: Path, data: bytes, *, temp_dir: Path | None = None) -> None:
    """Write a file so that readers see either nothing or all of it, even after a crash.

    The file is written beside its name and renamed over it: one that was there is replaced,
    not written into. It keeps its permissions (the new file takes them), not its other names
    (a hard link to it keeps the old content) nor, unless root writes it, its owner.

    Args:
        path: the file to write.
        data: its whole content.
        temp_dir: where the temporary file goes before its rename (same file system);
            beside ``path`` by default.

    The folders it makes for ``path`` are removed again when the write fails: nothing of
    it is left.
    """
    made = make_dirs(path.parent)
    try:
        write_atomic_many([(path, data)], temp_dir=temp_dir)
    except BaseException:
        remove_made_dirs(made)
        raise


def write_atomic_many(files: Sequence[tuple[Path, bytes]], *, temp_dir: Path | None = None) -> None:
    """Write files as :func:`write_atomic` does, syncing each folder once for all of them.

    Each file's data is synced before its rename, and each folder after its renames: when
    this returns, every file is durable under its name.
    """
    folders: dict[Path, None] = {}
    for path, data in files:
        folder = path.parent
        if folder not in folders:
            make_dirs(folder)
            folders[folder] = None
        temp = (temp_dir or folder) / _temporary_name(path.name)
        try:
            try:
                handle = temp.open("wb")
            except OSError as exc:  # the folder cannot be written: named, not the temporary
                raise type(exc)(exc.errno, exc.strerror, str(temp.parent)) from None
            with handle:
                _take_mode(handle.fileno(), path)
                handle.write(data)
                handle.flush()
                _sync_data(handle.fileno())
            try:
                os.replace(temp, path)
            except OSError as exc:  # named by the file it was to replace, not the temporary
                raise type(exc)(exc.errno, exc.strerror, str(path)) from None
        except BaseException:
            temp.unlink(missing_ok=True)  # a full disk leaves no partial file taking space
            raise
    for folder in folders:
        sync_dir(folder)


def write_atomic_together(
    files: Sequence[tuple[Path, bytes]], *, temp_dir: Path | None = None
) -> None:
    """Write files so that a failure leaves every one of them as it was: all are written
    (and synced) to temporary files first, then renamed into place one after the other.

    A disk that fills up part way (a report of many files) leaves the earlier version of
    each file whole, not some new files beside old ones, and no temporary file. The renames
    take no space; only a crash, or a failing disk, between two of them leaves some files
    new, each whole (:class:`PartlyReplacedError` says so). A
    folder (or a pipe, a device) where one of the files goes is refused before the first
    rename; a symbolic link there is replaced by the file, as :func:`write_atomic` replaces
    a file (keeping its permissions).

    Raises:
        UnfitFileError: something other than a file stands where one goes; its ``strerror``
            names the path and what is there.
        PartlyReplacedError: a rename failed after others were done: some files are new,
            the others as they were.
        OSError: a file cannot be written.

    Args:
        files: each file's path and whole content.
        temp_dir: where the temporary files go (same file system); beside each file by
            default.
    """
    folders: dict[Path, None] = {}
    temps: list[tuple[Path, Path]] = []
    try:
        for path, data in files:
            folder = path.parent
            if folder not in folders:
                make_dirs(folder)
                folders[folder] = None
            temp = (temp_dir or folder) / _temporary_name(path.name)
            try:
                handle = temp.open("wb")
            except OSError as exc:  # the folder cannot be written: named, not the temporary
                raise type(exc)(exc.errno, exc.strerror, str(temp.parent)) from None
            temps.append((temp, path))
            with handle:
                _take_mode(handle.fileno(), path)
                handle.write(data)
                handle.flush()
                _sync_data(handle.fileno())
        for _, path in temps:  # no rename may fail once one is done
            refuse_in_the_way(path)
        for index, (temp, path) in enumerate(temps):
            try:
                os.replace(temp, path)
            except OSError as exc:  # named by the file it was to replace, not the temporary
                if index:
                    raise PartlyReplacedError(
                        exc.errno,
                        f"{exc.strerror or exc} (after {index} of the {len(temps)} files were "
                        "replaced)",
                        str(path),
                    ) from None
                raise type(exc)(exc.errno, exc.strerror, str(path)) from None
            temps[index] = (path, path)  # renamed: no temporary left to remove
    except BaseException:
        for temp, path in temps:
            if temp != path:
                temp.unlink(missing_ok=True)  # a full disk leaves no partial file taking space
        raise
    for folder in folders:
        sync_dir(folder)


class PartlyReplacedError(OSError):
    """A rename of :func:`write_atomic_together` failed after others were done (a failing
    disk): the files renamed before it are new, the others as they were. Its ``filename``
    is the file that kept its earlier content, its ``strerror`` says how many were replaced."""


def _take_mode(fd: int, path: Path) -> None:
    """Give the temporary file ``fd`` the permissions of the file ``path`` it is to replace,
    if there is one: replaced, a private file (0600) took the umask's (0644)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:  # none yet; or it cannot be looked up, which its rename reports
        return
    if stat.S_ISREG(mode):
        with suppress(OSError):  # a file system without permissions (FAT): the write goes on
            os.fchmod(fd, stat.S_IMODE(mode))


def refuse_in_the_way(path: Path) -> None:
    """Raise :class:`UnfitFileError` when something other than a file or a symbolic link
    (replaced by the rename, not written through) stands at ``path``."""
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):  # none, or its folder not made yet
        return
    if stat.S_ISREG(mode) or stat.S_ISLNK(mode):
        return
    folder = stat.S_ISDIR(mode)
    raise UnfitFileError(
        errno.EISDIR if folder else errno.EEXIST,
        f"{path} is a {'folder' if folder else file_kind(mode)}, where a file of that name is "
        "to be written; move or remove it",
        str(path),
    )


TEMP_NAME_BYTES: Final = 64
"""How much of a file's name its temporary file's name keeps: a name near the file system's
limit (255 bytes) plus the suffix was too long, and a valid ``-o`` name failed."""


def _temporary_name(name: str) -> str:
    """The name of ``name``'s temporary file: hidden, a short head of ``name`` (whole
    characters) to tell whose it is, and the process and thread that write it."""
    return f".{_temporary_head(name)}.{os.getpid()}.{threading.get_ident()}.tmp"


def _temporary_head(name: str) -> str:
    """The head of ``name`` its temporary file's name starts with (see
    :func:`_temporary_name`)."""
    # Bytes that are no whole UTF-8 character (the one cut in two) are dropped.
    short = os.fsencode(name)[:TEMP_NAME_BYTES].decode("utf-8", "ignore").encode("utf-8")
    # Back to a name in this process's file-name encoding (an ASCII locale's: surrogates).
    return os.fsdecode(short)


def remove_leftover_temporaries(folder: Path, names: Iterable[str]) -> None:
    """Remove from ``folder`` the temporary files :func:`write_atomic` and
    :func:`write_atomic_together` wrote there for the files ``names`` and a killed process
    left behind (``kill -9`` between the write and the rename): nothing else removes them.

    Only plain files named as those temporaries are, of a process that is gone: a user's
    file of another name stays, and so does a temporary another process still writes.
    """
    heads = {_temporary_head(name) for name in names}
    try:
        entries = list(os.scandir(folder))
    except OSError:  # none there; or unreadable, which the write says
        return
    for entry in entries:
        match = _LEFTOVER.fullmatch(entry.name)
        if match is None or match["head"] not in heads:
            continue
        if not entry.is_file(follow_symlinks=False) or _process_alive(int(match["pid"])):
            continue
        with suppress(OSError):  # gone meanwhile; or kept, which is no worse
            os.unlink(entry.path)


_LEFTOVER = re.compile(r"\.(?P<head>.*)\.(?P<pid>\d+)\.\d+\.tmp", re.DOTALL)


def _process_alive(pid: int) -> bool:
    """Whether a process ``pid`` is running (this one included)."""
    if pid <= 0:
        return True  # no pid of a writer: never its temporary to remove
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


LINK_ERRNOS: Final = frozenset({errno.EEXIST, errno.ENOTDIR, errno.ENOENT, errno.ELOOP})
"""What making a folder through a link that loops or points nowhere fails with."""


def broken_link(path: Path) -> str | None:
    """Why ``path`` or a folder on its way, a symbolic link, leads nowhere: it loops, or its
    target does not exist; None when no link on the way is broken. Making a folder there
    failed with "File exists" or "Not a directory", which hid the link."""
    for current in (path, *path.parents):
        try:
            target = os.readlink(current)
        except OSError:  # no link (or not to be looked at: the next folder up says)
            continue
        try:
            os.stat(current)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return (
                    f"{current} is a symbolic link (to {target}) that loops back to itself; "
                    "point it at a folder or remove it"
                )
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                return (
                    f"{current} is a symbolic link to {target}, which does not exist: it "
                    "points nowhere; make its target, point it at a folder, or remove it"
                )
    return None


def not_a_folder(path: Path) -> str | None:
    """Why the folder ``path`` cannot be made: it, or the nearest folder on its way that
    exists, is a file (or a pipe, a device); None when that is a folder. Making it failed
    with "File exists" or "Not a directory", which named neither the file nor what it is."""
    for current in (path, *path.parents):
        try:
            mode = os.stat(current).st_mode
        except OSError:  # not there (or below a file): the next folder up says
            continue
        if stat.S_ISDIR(mode):
            return None
        what = "file" if stat.S_ISREG(mode) else file_kind(mode)
        link = " a symbolic link to" if os.path.islink(current) else ""
        return f"{'it' if current == path else current} is{link} a {what}, not a directory"
    return None


def storage_error(
    exc: OSError, what: str, *, nothing_written: bool = False, path: Path | None = None
) -> RunDirError:
    """The error that stops a run when the run directory cannot be written: what failed,
    the system's reason, and, for a full disk or a file past the file-size limit, what to do
    (nothing durable is lost).

    Args:
        exc: the system's error.
        what: what could not be done, after "cannot".
        nothing_written: the run had not started: the run directory it made (and the
            folders above it that it made) are removed again, so there is nothing to resume.
        path: the folder being made: a symbolic link on its way that loops or points
            nowhere (:func:`broken_link`), or a file there or on its way
            (:func:`not_a_folder`), is the reason given, not "File exists".
    """
    reason = exc.strerror or str(exc)
    in_the_way = None
    if path is not None and exc.errno in LINK_ERRNOS:
        in_the_way = broken_link(path) or not_a_folder(path)
    if in_the_way is not None:
        reason = in_the_way
    elif isinstance(exc.filename, str | bytes):
        # The file at fault, unless ``what`` names it already: "cannot open the run directory
        # X: Permission denied" said nothing of which of its files it was.
        named = os.fsdecode(exc.filename)
        if named not in what and f"({Path(named).name})" not in what:
            reason = f"{named}: {reason}"
    message = f"cannot {what}: {reason}"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        if exc.errno == errno.EFBIG:  # past the process's file-size limit (ulimit -f)
            message += "; the file-size limit was reached: raise it (ulimit -f)"
        else:
            message += "; free some space"
        message += ", then run the same command again: " + (
            "nothing was written, and the run starts from the beginning"
            if nothing_written
            else "the run resumes where it stopped, and every judgement already written is kept"
        )
    return RunDirError(message)


def write_all(fd: int, data: bytes) -> None:
    # ``os.write`` may write part of ``data`` (a disk filling up does): write the rest, until
    # the system refuses with an error.
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def make_dirs(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents durably: each new entry's parent is synced.

    A file's fsync makes its data durable, not its name: that lives in its folder, and a
    new folder's own name in the folder above it.

    Returns:
        The folders it created, ``folder`` first, then outwards: the order to remove them in.
    """
    missing: list[Path] = []
    current = folder
    while not current.exists():
        missing.append(current)
        current = current.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)  # FileExistsError if a file has the name
        for created in reversed(missing):
            sync_dir(created.parent)
    except BaseException:
        # A full disk may refuse ``folder`` once its parents are made: none of them stays.
        remove_made_dirs(missing)
        raise
    return missing


def remove_made_dirs(folders: Sequence[Path]) -> None:
    """Remove the empty folders a run made, ``folders`` innermost first, as
    :func:`make_dirs` returns them; each removal is synced in the folder above.

    A folder that is gone already is passed over; one that is not empty (another run's
    files are there) stays, and so do those above it. Never raises: removing them must not
    hide the error that ended the run.
    """
    for folder in folders:
        try:
            folder.rmdir()
        except FileNotFoundError:
            continue
        except OSError:
            return
        try:
            sync_dir(folder.parent)
        except OSError:
            return


def sync_dir(folder: Path) -> None:
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


# A new file's data and size are all a reader needs; fdatasync skips the other metadata
# (times), which measured ~2.5x less CPU than fsync here. macOS has no fdatasync.
_sync_data = getattr(os, "fdatasync", os.fsync)


FS_IOC_GETFLAGS: Final = 0x80086601
"""Linux's ioctl that reads a file's attributes (``lsattr``): ``_IOR('f', 1, long)``."""
UNCHANGEABLE_FLAGS: Final = 0x10 | 0x20
"""``FS_IMMUTABLE_FL`` and ``FS_APPEND_FL`` (``chattr +i``, ``chattr +a``): a file with
either can be neither replaced nor removed, not even by root (EPERM)."""


def unchangeable(path: Path) -> bool:
    """Whether ``path``, a file or folder, is immutable or append-only (``chattr +i`` or
    ``+a``): a rename over it fails with "Operation not permitted", as does a write into
    an immutable one. False where that cannot be told (no such file, a pipe or a device,
    which is never opened, a file system without attributes, or not Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mode = os.lstat(path).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            return False
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        flags = bytearray(8)
        fcntl.ioctl(fd, FS_IOC_GETFLAGS, flags)
    except OSError:  # ENOTTY: the file system keeps no attributes
        return False
    finally:
        os.close(fd)
    return bool(int.from_bytes(flags[:4], sys.byteorder) & UNCHANGEABLE_FLAGS)
