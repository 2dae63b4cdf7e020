"""The command's output streams, and what happens when nobody reads them any more.

``trig-stream status RUN | head -1``: ``head`` exits after its line and the next write to
the pipe fails (``EPIPE``). rich's :class:`~rich.console.Console` answers that by raising
``SystemExit(1)`` from whatever printed, which inside a run ends the event loop midway: the
run's results, its report and its worker threads are left as they were (the interpreter then
waits for those threads, for ever). The command's consoles (:class:`CommandConsole`) instead
point the stream at ``/dev/null`` and go on: the work is finished, and the command exits as it
would have with a reader.
"""

from __future__ import annotations

import os

from rich.console import Console

from trig_stream.signals import point_at_devnull

STANDARD_OUTPUTS = (1, 2)


def _same_file(fd: int, other: int) -> bool:
    try:
        a, b = os.fstat(fd), os.fstat(other)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


class CommandConsole(Console):
    """A rich console whose output, once its reader has gone (a broken pipe), is dropped.

    The pipe's file descriptor, and stdout or stderr where they write to that same pipe
    (``2>&1 | head``), are pointed at ``/dev/null``; the command carries on and exits with
    the status it would have had.
    """

    def on_broken_pipe(self) -> None:
        """Drop this console's output from now on, instead of ending the command."""
        self.quiet = True
        try:
            broken = self.file.fileno()
        except (OSError, ValueError):  # not a file (a StringIO in a test): nothing to point
            return
        fds = {broken, *(fd for fd in STANDARD_OUTPUTS if _same_file(fd, broken))}
        point_at_devnull(sorted(fds))
