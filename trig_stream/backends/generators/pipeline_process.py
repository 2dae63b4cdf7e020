"""One device's diffusers pipeline in a child process (``isolation = "process"``).

In the engine's process a pipeline call shares the interpreter lock with everything else the
engine does: the event loop, the image writers, the journal. A pipeline call is hundreds of
small torch operations, each of which gives the lock up and takes it back, and every wake-up
of another thread lands in one of those gaps and makes the pipeline wait (measured on a tiny
CPU pipeline: ~26 such waits per 16 ms call). In a child process the pipeline has an
interpreter of its own, so launching work on the device never waits on the engine.

:class:`PipelineProcess` is the parent's handle on one child: it starts the child, which
builds a thread-isolated :class:`~trig_stream.backends.generators.diffusers_generator.
DiffusersGenerator` for its single device and loads it; then each :meth:`~PipelineProcess.
generate` sends the requests over a pipe and gets the pictures back as pixels, or, for a
failed item, its reason. The run's cancel event is forwarded to the child, whose pipeline
checks it between denoising steps. What runs in the child, and what both sides share of the
transfer, is in :mod:`~trig_stream.backends.generators.pipeline_child`.

The engine, not the child, encodes the PNG files. Beside a pipeline that holds the lock,
any other thread waits for it each time it takes it back (up to the 5 ms switch interval,
``sys.getswitchinterval``), and zlib and numpy give it up and take it back several times per
picture: a 512x512 picture took 22 ms to encode alone and 69 ms beside a thread that holds
the lock. The child only copies each picture's pixels (well under a millisecond) and hands
the answer to a thread that sends it while the next call runs. A picture of another mode
than 8-bit greyscale, RGB or RGBA (a palette, 16-bit grey, 1-bit) is the exception: its raw
pixels leave its palette and transparency behind, so the child encodes it, as the engine
would in a thread (Pillow's encoder, which reads them).

The pixels travel raw, after a small pickled message that says what they are, and each side
moves them in one system call: the child's ``sendmsg`` of all the buffers, the parent's
``recv_into`` with ``MSG_WAITALL``. Each call gives the lock up once and takes it back once.
Pickled whole, an answer was read in chunks of the socket's buffer, and each chunk took the
parent's lock back from the event loop and the writers: eight 512x512 pictures (6 MB) took
157 ms to arrive beside a thread busy in Python, against 9 ms this way
(``bench/pixel_transfer.py``), while a batch of eight takes ~230 ms on an H200.

Messages, parent to child: ``("generate", requests)`` or ``("close", None)``.

Child to parent:

* ``("ready", threads)`` once loaded, with the number of torch threads it computes with;
* ``("done", (outcomes, calls, seconds))`` per call, followed by the items' bytes: an
  outcome is ``("pixels", mode, size, length)`` for a picture, ``("png", pixels_checked,
  length)`` for a PNG file (its :class:`EncodedPicture` flag, kept as under threads; true
  for a picture the child encoded), or a
  failed item's error made afresh from its text (an ``ItemError`` when the item is at fault,
  else a ``BackendError``: its call failed); the bytes of the items that have a
  length follow the message, in order. ``calls`` are the pipeline calls' batch sizes, and
  ``seconds`` is the call's time per request, which the engine records as each image's
  generation time;
* ``("fatal", text)`` when nothing can work.

The child lives no longer than the engine's process, however that ends (a hard stop exits
through ``os._exit``; a crash; SIGKILL): a thread of the child waits on a pipe that only the
parent writes to, and ends the child when that pipe closes, mid-load or mid-call, so that no
orphan keeps the device's memory while the run resumes. The child also runs in a session of
its own: a terminal's Ctrl-C, or a SIGTERM to the run's process group, reaches the engine,
which decides how the child ends (a graceful stop lets its calls finish), and not the child.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from trig_stream.backends.base import (
    EncodedPicture,
    GenerationRequest,
    TimedPicture,
)
from trig_stream.backends.generators.pipeline_child import (
    GROUP_SIGNALS,
    Outcome,
    SharedFlag,
    _socket_of,
    receive_exactly,
    serve,
)
from trig_stream.errors import BackendError, FatalBackendError, ItemError

if TYPE_CHECKING:
    from multiprocessing.context import SpawnProcess

    from trig_stream.backends.generators.diffusers_options import DiffusersOptions

CANCEL_POLL_S = 0.05
"""How often a waiting call looks at the run's cancel event (a reply ends the wait at once)."""

_Answer = tuple[tuple[str, Any], bytearray]
"""A message from the child, and the bytes that followed it."""
CALLS_IN_FLIGHT = 2
"""Calls the engine may have waiting on one device: one running, the next already there (in
the child's pipe with this isolation, at the device's lock with threads)."""

STOP_TIMEOUT_S = 30.0
"""How long :meth:`PipelineProcess.stop` waits for a loaded child to exit before killing it."""

CANCEL_GRACE_S = 5.0
"""How long a call of a cancelled run may go on in the child (its pipeline stops between two
denoising steps) before the child is killed: a hard stop does not wait for a pipeline that
has no step callback, or hangs."""

CRASH_SIGNALS = frozenset(
    {signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL, signal.SIGABRT}
)
"""Signals a process raises on itself when its code fails: faulthandler prints its stack."""


class PipelineProcess:
    """A child process that owns one device's pipeline.

    Up to :data:`CALLS_IN_FLIGHT` calls may be waiting on one child: the next batch is
    already in the pipe when the current one ends, so the device never waits for this
    process to send it. The child answers in order; a reader thread hands each answer to
    its call.

    Args:
        name: the generator's name, for messages.
        options: the generator's options; the child uses them with ``devices = [device]``.
        device: the device the child's pipeline runs on.
        batch_size: the most requests one call sends.
        threads: the torch threads the child computes with (see :func:`thread_share`);
            None keeps torch's default.
    """

    def __init__(
        self,
        name: str,
        options: DiffusersOptions,
        device: str,
        batch_size: int,
        *,
        threads: int | None = None,
    ) -> None:
        self.name = name
        self.device = device
        self.threads: int | None = None
        """The torch threads the child computes with, once it is ready."""
        context = multiprocessing.get_context("spawn")
        self._cancel = SharedFlag(context)
        self._conn, child_conn = context.Pipe()
        # Never written to: the child ends when it closes, as this process ends (see serve).
        lifeline, self._lifeline = context.Pipe(duplex=False)
        child_options = options.model_copy(update={"devices": [device], "isolation": "thread"})
        self._process: SpawnProcess = context.Process(
            target=serve,
            args=(child_conn, lifeline, self._cancel, name, child_options.model_dump_json()),
            kwargs={"batch_size": batch_size, "threads": threads},
            name=f"trig-stream {name} {device}",
            daemon=True,
        )
        _start_in_own_session(self._process)
        child_conn.close()  # the child holds its end: EOF here means the child is gone
        lifeline.close()
        self._ready = False
        self._killed_because: str | None = None
        """Why this process killed the child, when it did."""
        self._channel = _socket_of(self._conn)
        self._send_lock = threading.Lock()
        self._waiting: deque[Future[_Answer]] = deque()
        """One future per call sent and not yet answered, oldest first."""
        self._reader: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        """The child's process id."""
        return self._process.pid

    def wait_ready(self) -> None:
        """Block until the child has loaded its pipeline.

        Raises:
            FatalBackendError: loading failed (the child's reason), or the child died.
        """
        try:
            kind, body = self._conn.recv()
        except (EOFError, OSError):
            raise self._died(" while loading its pipeline") from None
        if kind != "ready":
            self.stop()
            raise FatalBackendError(str(body))
        self._ready = True
        self.threads = body
        self._reader = threading.Thread(
            target=self._read_answers, name=f"{self._process.name} answers", daemon=True
        )
        self._reader.start()

    def generate(
        self, requests: Sequence[GenerationRequest], cancel: threading.Event
    ) -> tuple[list[TimedPicture | EncodedPicture | Exception], list[int]]:
        """The pictures of ``requests`` (in order) and the pipeline calls' batch sizes.

        Once ``cancel`` is set, the child has :data:`CANCEL_GRACE_S` to answer (its pipeline
        stops between two steps); then it is killed, and the call's items are cancelled.

        Raises:
            FatalBackendError: the child died or reported that nothing can work.
        """
        answer: Future[_Answer] = Future()
        with self._send_lock:
            if cancel.is_set():
                self._cancel.set()
            elif not self._waiting:
                self._cancel.clear()  # a new start: an earlier cancel no longer applies
            self._waiting.append(answer)
            try:
                self._send(("generate", list(requests)))
            except FatalBackendError:
                self._waiting.remove(answer)
                raise
        give_up_at: float | None = None
        while True:
            try:
                (kind, body), payload = answer.result(timeout=CANCEL_POLL_S)
                break
            except TimeoutError:
                if not cancel.is_set():
                    continue
                self._cancel.set()
                if give_up_at is None:
                    give_up_at = time.monotonic() + CANCEL_GRACE_S
                elif time.monotonic() >= give_up_at:
                    # The reader then fails every call still waiting, this one included.
                    self._kill(f"the run was cancelled, and a call went on {CANCEL_GRACE_S} s")
            except FatalBackendError:
                if cancel.is_set():  # the run is cancelled: nobody uses these items
                    return [ItemError("cancelled") for _ in requests], []
                raise
        if kind != "done":
            raise FatalBackendError(str(body))
        outcomes, calls, seconds = body
        return _pictures(outcomes, payload, seconds), calls

    def stop(self) -> None:
        """Ask a loaded child to unload and exit, and kill it if it has not within
        :data:`STOP_TIMEOUT_S`; kill a child still loading at once (a load can take minutes,
        and what it holds so far needs no orderly end). Safe to repeat."""
        if self._process.is_alive():
            if self._ready:
                with self._send_lock, contextlib.suppress(OSError):  # OSError: already gone
                    self._conn.send(("close", None))
                self._process.join(STOP_TIMEOUT_S)
            self._kill("it did not exit when asked" if self._ready else "it was still loading")
        if self._reader is not None:
            self._reader.join()  # it ends on the child's end of the pipe closing
        self._channel.close()
        self._conn.close()
        self._lifeline.close()

    def kill_now(self, because: str) -> None:
        """Kill the child without waiting for it (safe from any thread): what waits on it,
        :meth:`wait_ready` or a call, then fails naming ``because``; :meth:`stop` still
        closes this handle, and reaps the child."""
        if self._process.is_alive():
            self._killed_because = because
            self._process.kill()

    def _kill(self, because: str) -> None:
        if self._process.is_alive():
            self._killed_because = because
            self._process.kill()
        self._process.join()

    def _send(self, message: tuple[str, Any]) -> None:
        try:
            self._conn.send(message)
        except OSError:
            raise self._died() from None

    def _read_answers(self) -> None:
        # Runs in the reader thread until the child's end of the pipe closes; then no call
        # is left waiting for an answer that cannot come.
        try:
            while True:
                try:
                    message = self._conn.recv()
                    payload = bytearray()
                    if message[0] == "done":
                        payload = receive_exactly(self._channel, _payload_size(message[1][0]))
                except (EOFError, OSError):
                    return
                self._waiting.popleft().set_result((message, payload))
        finally:
            if self._waiting:
                died = self._died()
                while self._waiting:
                    self._waiting.popleft().set_exception(died)

    def _died(self, doing: str = "") -> FatalBackendError:
        self._process.join(1.0)
        if self._killed_because is not None:
            ending = f"was killed{doing}: {self._killed_because}"
        else:
            ending = _ending(self._process.exitcode, doing)
        return FatalBackendError(
            f"generator {self.name!r}: the pipeline process for {self.device} {ending}"
        )


def _ending(exitcode: int | None, doing: str) -> str:
    """How a child process ended, from its exit code, for a message (``doing``: while what)."""
    if exitcode is None:
        return f"closed its end of the pipe{doing} but still runs"
    if exitcode >= 0:
        return f"exited{doing} (exit code {exitcode}); its output above, if any, says why"
    number = -exitcode
    try:
        name = signal.Signals(number).name
    except ValueError:
        name = f"signal {number}"
    if number == signal.SIGKILL:
        return (
            f"was killed{doing} (SIGKILL), perhaps by the kernel's out-of-memory killer: its "
            "log says (`dmesg` or `journalctl -k`)"
        )
    if number in CRASH_SIGNALS:
        return f"crashed{doing} ({name}); the stack it printed above shows where"
    return f"was killed{doing} by {name}, sent from outside the run"


def _start_in_own_session(process: SpawnProcess) -> None:
    """Start ``process`` with :data:`GROUP_SIGNALS` blocked; :func:`serve` moves it to a
    session of its own, then unblocks them.

    The child's code runs only after spawn's bootstrap has imported the modules it needs
    (seconds, with pydantic): a Ctrl-C then killed it mid-import, and turned the engine's
    graceful stop into a fatal error. The signal mask is inherited across fork and exec.
    """
    from multiprocessing import resource_tracker

    # Starting the tracker (the first child does) unblocks SIGINT and SIGTERM in the thread
    # that starts it, which would undo the mask below: it runs before.
    resource_tracker.ensure_running()
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, GROUP_SIGNALS)
    try:
        process.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def thread_share(children: int, total: int | None = None) -> int | None:
    """The torch threads each of ``children`` pipeline processes gets: the cores this process
    would compute with, shared out, so that N children do not each start a thread per core
    (None for a single child: torch's own default, as in this process).

    Args:
        children: how many pipeline processes run at once (one per device).
        total: the threads torch computes with on this machine, when known without torch
            in this process (the child that checked the pipeline's classes says). Torch's
            own count here wins, if this process imported it: a program that embeds the
            engine may have set it (``torch.set_num_threads``), which a fresh torch in the
            checking child does not know. Else the CPUs this process may run on.
    """
    torch = sys.modules.get("torch")
    if torch is not None:
        total = torch.get_num_threads()
    if children <= 1:
        return total
    if total is None:
        total = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        total = total or os.cpu_count() or 1
    return max(1, total // children)


def _payload_size(outcomes: Sequence[Outcome]) -> int:
    return sum(outcome[-1] for outcome in outcomes if not isinstance(outcome, BackendError))


def _pictures(
    outcomes: Sequence[Outcome], payload: bytearray, seconds: float
) -> list[TimedPicture | EncodedPicture | Exception]:
    """What the parent makes of the items the child sent (see :func:`_portable`)."""
    from PIL import Image

    view = memoryview(payload)
    made: list[TimedPicture | EncodedPicture | Exception] = []
    start = 0
    for outcome in outcomes:
        if isinstance(outcome, BackendError):
            made.append(outcome)
            continue
        end = start + outcome[-1]
        if len(outcome) == 3:  # ("png", pixels_checked, length)
            png = bytes(view[start:end])
            made.append(EncodedPicture(png, seconds, pixels_checked=outcome[1]))
        else:
            _, mode, size, _ = outcome
            made.append(TimedPicture(Image.frombytes(mode, size, view[start:end]), seconds))
        start = end
    return made
