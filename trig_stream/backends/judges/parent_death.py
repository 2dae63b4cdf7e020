"""Run a command whose whole process group the kernel's word stops when the process that
started it dies (Linux).

``python -I -S parent_death.py PARENT_PID GRACE_S PID_FD COMMAND...`` is a small supervisor.
It asks the kernel (``prctl(PR_SET_PDEATHSIG)``) to send it SIGTERM when its parent ends,
starts ``COMMAND`` as its child, writes the child's process id to the file descriptor
``PID_FD`` (-1: none) and closes it, waits for it, and exits as the command did (its exit
status, or killed by the same signal), so the run reads the command's own end; the process
id tells the run, should the supervisor itself be killed, that the command still runs. The
managed judge server starts through it, as the leader of a new process group: ``trig-stream
run`` stops its server when it ends, but not when it is killed (SIGKILL, the OOM killer, a
closed terminal), and a vLLM left running holds its GPU and its port.

When its parent dies, the supervisor stops the whole group, not only the command's own
process: a launcher that does not ``exec`` its server (``sh -c "vllm serve ...; echo done"``,
a script that activates a virtualenv and runs vLLM as its child) would else die alone and
leave the server running. It sends the group SIGTERM, then SIGKILL to whatever of it still
runs after ``GRACE_S`` (the serve table's ``stop_timeout_s``). It is made the group's child
subreaper, so that processes whose parent ends are handed to it: it reaps them, and sees
when the last one ends. A SIGTERM while its parent lives is the run stopping the group, which
the command received too: the supervisor waits for the command's end and passes it on.

Started inside another's process group (a bench's helper, which does not start a session),
nothing of that group is the supervisor's to stop: it then runs the command in its own place
(``exec``), with the kernel's signal asked for it, so that what is sent to the process started
(a bench's ``terminate()``, its SIGKILL) reaches the command itself.

The command starts with SIGINT and SIGTERM at their default handling: a run started with one
ignored (SIGINT in a script's background job) leaves it ignored for itself, and an ignored
signal is inherited across ``exec``; a server ignoring SIGTERM outlived a killed run and made
every stop wait out its grace period. SIGHUP stays as it was (under ``nohup`` the server
ignores it too). Where ``prctl`` is not there (not Linux) the supervisor only passes the
command's end on.

It runs as a script, not as part of the package, so that it starts in milliseconds. Only the
standard library is imported here.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time

PR_SET_PDEATHSIG = 1
"""The ``prctl`` option, from ``<linux/prctl.h>``."""
PR_SET_CHILD_SUBREAPER = 36
"""The ``prctl`` option, from ``<linux/prctl.h>``."""
CANNOT_RUN = 127
"""Exit status when the command cannot be run (a shell's)."""
POLL_S = 0.05
"""Time between looks at whether the group has ended, within the grace period."""


class ParentDied(Exception):
    """The process that started the supervisor has ended."""


def main(argv: list[str]) -> int:
    parent, grace_s, pid_fd, command = int(argv[0]), float(argv[1]), int(argv[2]), argv[3:]
    if pid_fd >= 0:
        os.set_inheritable(pid_fd, False)  # the command's own end is not to hold it open
    if os.getpgrp() != os.getpid():
        _tell(pid_fd, os.getpid())
        return _become(parent, command)

    def on_sigterm(signum: int, frame: object) -> None:
        # With the parent alive it is the run stopping the group, the command included.
        if os.getppid() != parent:
            raise ParentDied

    # Before the request: a SIGTERM that comes once it is made must reach us.
    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1)
        if not _ask_for_the_parents_death(libc, parent):
            return 1
    try:
        child = _start(command)
        if child is None:
            return CANNOT_RUN
        _tell(pid_fd, child)
        return _pass_on(_wait_for(child))
    except ParentDied:
        _stop_group(grace_s)
        return 1


def _tell(pid_fd: int, pid: int) -> None:
    """Write the command's process id ``pid`` to ``pid_fd`` and close it (-1: nothing)."""
    if pid_fd < 0:
        return
    try:
        os.write(pid_fd, str(pid).encode())
    except OSError:
        pass  # nobody reads it any more: the run has ended
    finally:
        os.close(pid_fd)


def _ask_for_the_parents_death(libc: ctypes.CDLL, parent: int) -> bool:
    """Ask the kernel for SIGTERM when ``parent`` dies; False when it died already (no one
    would stop us). A request the kernel refuses is warned about."""
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
        print(
            f"warning: prctl(PR_SET_PDEATHSIG) failed ({os.strerror(ctypes.get_errno())}); "
            "the server will outlive a killed trig-stream",
            file=sys.stderr,
        )
        return True
    return os.getppid() == parent


def _become(parent: int, command: list[str]) -> int:
    """Run ``command`` in the supervisor's place, with SIGINT and SIGTERM at their defaults
    and the kernel's SIGTERM asked for on the parent's death; the exit status when it cannot
    be run.

    Started inside another's process group (a bench's, a shell's job), nothing of the group
    is the supervisor's to stop: the command itself gets the kernel's signal, and whatever is
    sent to the process started (a bench's ``terminate()`` or SIGKILL) reaches the command.
    """
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        if not _ask_for_the_parents_death(ctypes.CDLL(None, use_errno=True), parent):
            return 1
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        print(f"cannot run {command[0]}: {exc.strerror or exc}", file=sys.stderr)
    return CANNOT_RUN


def _start(command: list[str]) -> int | None:
    """Start ``command`` as a child, with SIGINT and SIGTERM at their defaults; its pid, or
    None when it cannot be run (said on stderr)."""
    # Told through a pipe closed on exec: an exec failure is the supervisor's to report.
    read_end, write_end = os.pipe()
    os.set_inheritable(write_end, False)
    child = os.fork()
    if child == 0:
        try:
            os.close(read_end)
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, signal.SIG_DFL)
            os.execvp(command[0], command)
        except OSError as exc:
            os.write(write_end, f"{exc.strerror or exc}".encode())
        finally:
            os._exit(CANNOT_RUN)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        error = pipe.read()
    if error:
        os.waitpid(child, 0)
        print(f"cannot run {command[0]}: {error.decode(errors='replace')}", file=sys.stderr)
        return None
    return child


def _wait_for(child: int) -> int:
    """The wait status of ``child``, once it has ended; reaps the orphans handed to us."""
    while True:
        pid, status = os.waitpid(-1, 0)
        if pid == child:
            return status


def _pass_on(status: int) -> int:
    """Exit as the command did: its exit status, or killed by its signal."""
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        try:
            import resource

            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # the command's crash, not ours
        except (ImportError, ValueError, OSError):
            pass
        if signum not in (signal.SIGKILL, signal.SIGSTOP):  # those two take no handler
            signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return 128 + signum  # a signal that does not end a process (SIGCHLD, say)
    return os.waitstatus_to_exitcode(status)


def _stop_group(grace_s: float) -> None:
    """Stop the group the supervisor leads: SIGTERM, then SIGKILL to whatever still runs
    after ``grace_s``."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    group = os.getpgrp()
    os.killpg(group, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            # Every process of the group is our descendant, and so ours to reap.
            while os.waitpid(-1, os.WNOHANG)[0] != 0:
                pass
        except ChildProcessError:
            return  # none is left
        time.sleep(POLL_S)
    os.killpg(group, signal.SIGKILL)  # ourselves included


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
