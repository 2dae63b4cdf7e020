"""The run directory ``run --new-run`` takes: the first of ``<name>``, ``<name>-2``... free.

:func:`next_free_run_dir` makes it, so that two runs asking at once each get their own, and
hands the folders it made to :meth:`~trig_stream.store.RunDir.open`
(:func:`take_made_folders`), which removes them again when the run cannot open it.
:func:`check_new_run` says which one ``validate --new-run`` would get, making nothing.
"""

from __future__ import annotations

import threading
from pathlib import Path

from trig_stream.errors import RunDirError
from trig_stream.files import make_dirs, remove_made_dirs, storage_error, sync_dir
from trig_stream.manifest import Manifest
from trig_stream.records import MAX_NAME_CHARS
from trig_stream.run_dir_access import denied, refuse_a_file_on_the_way, writable
from trig_stream.run_dir_paths import refuse_a_path_too_long

_made_lock = threading.Lock()
_made_for_runs: dict[Path, list[Path]] = {}
"""The folders :func:`next_free_run_dir` made for a run directory (it first, then its
parents outwards), which :meth:`~trig_stream.store.RunDir.open` takes over: a run that
cannot open it, or ends before writing anything, removes them again (see
:meth:`~trig_stream.store.RunDir.discard`)."""


def take_made_folders(path: Path) -> list[Path]:
    """The folders :func:`next_free_run_dir` made for the run directory ``path`` (it first,
    then its parents outwards), handed over once: none when it made none."""
    with _made_lock:
        return _made_for_runs.pop(path, [])


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
    refuse_a_file_on_the_way(folder, f"create the folder of run directories {folder}")
    if not folder.is_dir():
        missing = folder
        while not missing.parent.is_dir():
            missing = missing.parent
        if not writable(missing.parent):
            what = f"create the folder of run directories {folder}"
            raise storage_error(denied(missing, missing.parent), what, nothing_written=True)
        refuse_a_path_too_long(path, manifest, made_here=True)
        return path
    candidate, number = path, 1
    while candidate.exists() or candidate.is_symlink():
        number += 1
        candidate = path.with_name(f"{path.name}-{number}")
        if len(candidate.name) > MAX_NAME_CHARS:
            raise _new_run_name_too_long(candidate)
    if not writable(folder):
        what = f"create the run directory {candidate}"
        raise storage_error(denied(candidate, folder), what, nothing_written=True)
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
