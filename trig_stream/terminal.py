"""The command's output streams, and what happens when nobody reads them any more.

``trig-stream status RUN | head -1``: ``head`` exits after its line and the next write to
the pipe fails (``EPIPE``). rich's :class:`~rich.console.Console` answers that by raising
``SystemExit(1)`` from whatever printed, which inside a run ends the event loop midway: the
run's results, its report and its worker threads are left as they were (the interpreter then
waits for those threads, for ever). The command's consoles (:class:`CommandConsole`) instead
point the stream at ``/dev/null`` and go on: the work is finished, and the command exits as it
would have with a reader. So does a stream whose writes fail for good (:data:`OUTPUT_LOST`):
``trig-stream run CFG 2>run.log`` on a disk that fills or past ``ulimit -f``, a terminal that
has gone (EIO).
"""

from __future__ import annotations

import errno
import os
import sys
from typing import IO, Final

from rich.console import Console

from trig_stream.files import write_all
from trig_stream.signals import point_at_devnull

STANDARD_OUTPUTS = (1, 2)
OUTPUT_LOST: Final = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO})
"""Write errors that lose the command's output, never its work: a full disk or quota under a
redirected stream, a file grown past the file-size limit (``ulimit -f``: CPython ignores
SIGXFSZ, so the write fails), a terminal that has gone."""


def _same_file(fd: int, other: int) -> bool:
    try:
        a, b = os.fstat(fd), os.fstat(other)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def drop_output(file: IO[str]) -> None:
    """Point ``file``'s file descriptor, and stdout or stderr where they write to that same
    file (``2>&1``), at ``/dev/null``: what is written there from now on is dropped."""
    try:
        broken = file.fileno()
    except (OSError, ValueError):  # not a file (a StringIO in a test): nothing to point
        return
    fds = {broken, *(fd for fd in STANDARD_OUTPUTS if _same_file(fd, broken))}
    point_at_devnull(sorted(fds))


def write_stdout(text: str) -> None:
    """Write ``text`` to standard output, as the command's product (``import-config``).

    The text goes to file descriptor 1 as UTF-8 (a TOML file's encoding, as ``-o`` writes
    it), byte by byte until all is written: through ``sys.stdout``, a write cut short (a disk
    that fills, ``ulimit -f``) dropped the rest unsaid. A ``sys.stdout`` with no file
    descriptor (a test's capture) is written as it is.

    A reader that has gone (a broken pipe) is no failure: the output is dropped as a
    :class:`CommandConsole` drops it.

    Raises:
        OSError: the output was lost otherwise (:data:`OUTPUT_LOST`);
            standard output writes to ``/dev/null`` from then on, so that the error can be
            told.
    """
    try:
        fd: int | None = sys.stdout.fileno()
    except (OSError, ValueError):  # io.UnsupportedOperation is both
        fd = None
    try:
        sys.stdout.flush()  # what was printed before goes first
        if fd is None:
            sys.stdout.write(text)
            sys.stdout.flush()
        else:
            write_all(fd, text.encode("utf-8"))
    except BrokenPipeError:
        drop_output(sys.stdout)
    except OSError:
        drop_output(sys.stdout)
        raise


class CommandConsole(Console):
    """A rich console whose output, once its reader has gone (a broken pipe) or its writes
    fail for good (:data:`OUTPUT_LOST`: a full disk), is dropped.

    The file descriptor, and stdout or stderr where they write to that same file (``2>&1 |
    head``), are pointed at ``/dev/null``; the command carries on and exits with the status
    it would have had.
    """

    def on_broken_pipe(self) -> None:
        """Drop this console's output from now on, instead of ending the command."""
        self.quiet = True
        drop_output(self.file)

    def _check_buffer(self) -> None:
        # rich answers a broken pipe alone (on_broken_pipe): any other failed write raised
        # from whatever printed, and a run logging to a full disk stopped at its next line.
        try:
            super()._check_buffer()
        except OSError as exc:
            if exc.errno not in OUTPUT_LOST:
                raise
            self.on_broken_pipe()
