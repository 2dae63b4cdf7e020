"""Paths on the ``trig-stream`` command line, read as a shell would have meant them.

Every command's path arguments go through :func:`path_argument`, so that ``~`` means the home
folder wherever a path is taken, as it does in a config (see :mod:`trig_stream.config`).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def path_argument(text: str) -> Path:
    """An argparse ``type`` for a path: a leading ``~`` is the home folder.

    The shell expands no ``~`` after ``=`` (``--out=~/rep``) nor in quotes: taken as written,
    it named a folder literally called ``~`` in the current folder, which a later
    ``rm -rf ~`` would take for the home folder.

    Raises:
        argparse.ArgumentTypeError: the text is empty (``Path("")`` is the current folder: an
            unset shell variable would have named it), or names a user with no home folder.
    """
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path")
    if text.startswith("~"):
        try:
            return Path(text).expanduser()
        except RuntimeError:  # ~name of an unknown user, or no home folder at all
            raise argparse.ArgumentTypeError(
                f"{text}: no home folder is known for {Path(text).parts[0]}: write the path "
                "out in full"
            ) from None
    return Path(text)
