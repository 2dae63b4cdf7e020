"""How long a run directory's path may be, for the files a run writes in it.

A run writes deep below its run directory: images at ``images/<task>/<model>/<data_id>.png``,
their temporary files in ``images/.partial``. A path longer than the system allows failed a
run half-way ("File name too long"): :func:`refuse_a_path_too_long` refuses the directory as
the run opens it (and ``validate`` before it), :func:`refuse_an_image_path_too_long` an image
whose data_id makes its path too long.
"""

from __future__ import annotations

import errno
import functools
import os
from pathlib import Path

from trig_stream.errors import RunDirError
from trig_stream.files import TEMP_NAME_BYTES
from trig_stream.manifest import IMAGES, Manifest
from trig_stream.records import MAX_NAME_CHARS

PARTIAL = ".partial"
"""Under ``images/``: temporary files of images being written."""


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
    image = image_path_bytes(task, model, data_id)
    limit = _path_limit()
    if length + image < limit:  # the limit counts the final NUL
        return
    raise RunDirError(
        f"{_too_long(path, length, limit, 'write in')}: the image of {data_id} adds {image} "
        f"bytes to it ({IMAGES}/{task}/{model}/<data_id>.png); shorten output_dir, [run] name, "
        "the model's name or the data_id"
    )


def image_path_room(path: Path) -> int:
    """The most bytes an image's part of its path (:func:`image_path_bytes`) may have in the run
    directory ``path``: :func:`refuse_an_image_path_too_long` refuses one of this many or more.
    Asked once, it spares a look at the run directory's path for each image."""
    return _path_limit() - len(os.fsencode(path.absolute()))


def image_path_bytes(task: str, model: str, data_id: str) -> int:
    """The bytes the image of ``data_id`` by ``model`` for ``task`` adds to its run directory's
    path: ``/images/<task>/<model>/<data_id>.png``."""
    return len(os.fsencode(f"/{IMAGES}/{task}/{model}/{data_id}.png"))


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
