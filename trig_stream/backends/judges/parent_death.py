"""Run a command that the kernel stops when the process that started it dies (Linux).

``python -I -S parent_death.py PARENT_PID COMMAND...`` asks the kernel
(``prctl(PR_SET_PDEATHSIG)``) to send it SIGTERM when its parent ends, then becomes
``COMMAND``, which keeps that request. The managed judge server starts through it:
``trig-stream run`` stops its server when it ends, but not when it is killed (SIGKILL, the
OOM killer, a closed terminal), and a vLLM left running holds its GPU and its port.

Before that it puts SIGINT and SIGTERM back to their default handling: a run started with
one ignored (SIGINT in a script's background job) leaves it ignored for itself, and an
ignored signal is inherited across ``exec``; a server ignoring SIGTERM outlived a killed run
and made every stop wait out its grace period. SIGHUP stays as it was (under ``nohup`` the
server ignores it too). Where ``prctl`` is not there (not Linux) only that is done.

It runs as a script, not as part of the package, so that it starts in milliseconds. Only the
standard library is imported here.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1
"""The ``prctl`` option, from ``<linux/prctl.h>``."""
CANNOT_RUN = 127
"""Exit status when the command cannot be run (a shell's)."""


def main(argv: list[str]) -> int:
    parent, command = int(argv[0]), argv[1:]
    # Before the request: a SIGTERM that comes once it is made must end us.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
            print(
                f"warning: prctl(PR_SET_PDEATHSIG) failed ({os.strerror(ctypes.get_errno())}); "
                "the server will outlive a killed trig-stream",
                file=sys.stderr,
            )
        elif os.getppid() != parent:
            return 1  # the parent died before the request took effect: no one would stop us
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        print(f"cannot run {command[0]}: {exc.strerror or exc}", file=sys.stderr)
    return CANNOT_RUN


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
