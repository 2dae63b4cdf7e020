"""The ``trig-stream`` command's entry point, kept apart from everything it imports.

Its imports take a few tenths of a second; a Ctrl-C (or SIGTERM) during them ends the command
as any other Ctrl-C does (exit 130), not with a traceback. Before them, the standard streams
are made fit for any output (:func:`standard_streams`).
"""

import errno
import io
import os
import sys
from typing import Final, NoReturn

INTERRUPTED: Final = 130
"""The exit status of an interrupted command (:data:`trig_stream.exit_codes.EXIT_INTERRUPTED`)."""


STANDARD_STREAMS: Final = (("stdin", 0, "r"), ("stdout", 1, "w"), ("stderr", 2, "w"))


def standard_streams() -> None:
    """Open ``/dev/null`` on each of the standard file descriptors 0-2 that is closed
    (``cmd >&-``), and let the output streams write what their encoding cannot hold.

    A closed one is not left free: the files the command opens would take its number (the
    event loop's wakeup pipe, written to ``/dev/null`` after a hangup: the run then never
    woke up to stop), and Python's ``sys.stdout`` would be ``None``. A character the
    locale's encoding cannot hold (``LC_ALL=C``: a quarantine reason's ``ü``) is written as
    a backslash escape instead of ending the command with a traceback.
    """
    for name, fd, mode in STANDARD_STREAMS:
        try:
            os.fstat(fd)
        except OSError as exc:
            if exc.errno != errno.EBADF:
                raise
            devnull = os.open(os.devnull, os.O_RDONLY if mode == "r" else os.O_WRONLY)
            if devnull != fd:  # the lower ones are open by now: it takes fd unless taken
                os.dup2(devnull, fd)
                os.close(devnull)
            stream = open(fd, mode, errors="backslashreplace", closefd=False)  # noqa: SIM115
            setattr(sys, name, stream)
            setattr(sys, f"__{name}__", stream)
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")


def entry_point() -> NoReturn:
    """Import the CLI, then run it (:func:`trig_stream.cli.entry_point`).

    From the start, SIGTERM and SIGHUP end the command as a Ctrl-C does (exit 130), not by
    the signal (exit 143, without a word): until ``run``'s event loop takes the signals over
    (its first second: imports, the config, the engine made), and all along ``validate``
    and ``status``.
    """
    standard_streams()
    try:
        from trig_stream.signals import interrupt_on_stop_signals

        interrupt_on_stop_signals()
        from trig_stream.cli import entry_point as run
    except KeyboardInterrupt:
        from trig_stream.signals import ignore_stop_signals_to_the_end

        # A second signal while Python shuts down would end it by the signal, without a word.
        ignore_stop_signals_to_the_end()
        sys.exit(INTERRUPTED)
    run()
