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
checks it between denoising steps.

The engine, not the child, encodes the PNG files. Beside a pipeline that holds the lock,
any other thread waits for it each time it takes it back (up to the 5 ms switch interval,
``sys.getswitchinterval``), and zlib and numpy give it up and take it back several times per
picture: a 512x512 picture took 22 ms to encode alone and 69 ms beside a thread that holds
the lock. The child only copies each picture's pixels (well under a millisecond) and hands
the answer to a thread that sends it while the next call runs.

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
  outcome is ``("pixels", mode, size, length)`` for a picture, ``("png", length)`` for a PNG
  file, or a failed item's error made afresh from its text (an ``ItemError`` when the item
  is at fault, else a ``BackendError``: its call failed); the bytes of the items that have a
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
import ctypes
import faulthandler
import multiprocessing
import os
import queue
import signal
import socket
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any, cast

from trig_stream.backends.base import (
    EncodedPicture,
    GenerationRequest,
    TimedPicture,
    check_pictures,
)
from trig_stream.errors import BackendError, FatalBackendError, ItemError, TrigStreamError
from trig_stream.pipeline import describe_error

if TYPE_CHECKING:
    from multiprocessing.context import SpawnContext, SpawnProcess

    from PIL.Image import Image

    from trig_stream.backends.generators.diffusers_generator import DiffusersGenerator
    from trig_stream.backends.generators.diffusers_options import DiffusersOptions

CANCEL_POLL_S = 0.05
"""How often a waiting call looks at the run's cancel event (a reply ends the wait at once)."""

Outcome = BackendError | tuple[str, int] | tuple[str, str, tuple[int, int], int]
"""One item of an answer: its error, ``("png", length)``, or
``("pixels", mode, size, length)``."""
_Answer = tuple[tuple[str, Any], bytearray]
"""A message from the child, and the bytes that followed it."""
_Outgoing = tuple[tuple[str, Any], list[bytes]]
"""A message the child sends, and the bytes that follow it."""

CALLS_IN_FLIGHT = 2
"""Calls the engine may have waiting on one device: one running, the next already there (in
the child's pipe with this isolation, at the device's lock with threads)."""

STOP_TIMEOUT_S = 30.0
"""How long :meth:`PipelineProcess.stop` waits for a loaded child to exit before killing it."""

CANCEL_GRACE_S = 5.0
"""How long a call of a cancelled run may go on in the child (its pipeline stops between two
denoising steps) before the child is killed: a hard stop does not wait for a pipeline that
has no step callback, or hangs."""

GROUP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""Signals sent to the run's whole process group (a terminal's Ctrl-C and hangup, ``kill``
of the group): the child leaves that group as soon as its code runs, and keeps them blocked
until then (see :func:`_start_in_own_session`)."""

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
        return f"exited{doing} (exit code {exitcode}); its output above says why"
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


class SharedFlag:
    """A flag one process sets and another reads (a byte of shared memory), with the
    ``is_set`` of a ``threading.Event``: the run's cancel, as the child's pipeline sees it.

    Not a multiprocessing ``Event``: its named semaphore is unlinked only by an orderly exit,
    and a hard stop exits through ``os._exit``, after which multiprocessing's resource tracker
    printed a warning about a leaked semaphore onto the terminal.
    """

    def __init__(self, context: SpawnContext) -> None:
        self._value = context.RawValue(ctypes.c_bool, False)

    def is_set(self) -> bool:
        return bool(self._value.value)

    def set(self) -> None:
        self._value.value = True

    def clear(self) -> None:
        self._value.value = False


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
            in this process (the child that checked the pipeline's classes says); else
            torch's own count, if this process imported it, or the CPUs it may run on.
    """
    torch = sys.modules.get("torch")
    if total is None and torch is not None:
        total = torch.get_num_threads()
    if children <= 1:
        return total
    if total is None:
        total = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        total = total or os.cpu_count() or 1
    return max(1, total // children)


def serve(
    conn: Connection,
    lifeline: Connection,
    cancel: SharedFlag,
    name: str,
    options_json: str,
    *,
    batch_size: int,
    threads: int | None = None,
) -> None:
    """The child's main loop: load the pipeline, then answer calls until told to close.

    Its own failures reach the parent as the engine would see them in a thread: a call that
    raises fails its items, a load that fails names the generator and the device, and a
    crash prints the stack where it happened.
    """
    _leave_the_run_group()
    faulthandler.enable()  # a segfault in a pipeline's native code says where
    threading.Thread(
        target=_exit_with_parent, args=(lifeline,), name="lifeline", daemon=True
    ).start()
    _progress_bars_lock_threads_only()
    from trig_stream.backends.generators.diffusers_generator import DiffusersGenerator
    from trig_stream.backends.generators.diffusers_options import DiffusersOptions

    options = DiffusersOptions.model_validate_json(options_json)
    device = (options.devices or ["?"])[0]
    # The generator only asks ``is_set()``, which the shared flag answers alike.
    cancelled = cast("threading.Event", cancel)
    try:
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        generator = DiffusersGenerator(name, options, batch_size=batch_size)
        _hide_progress_bars()
        generator.load()
    except BaseException as exc:
        # A process of its own: no cancellation to let through, and the parent must hear why
        # (SystemExit too). Worded as the engine words a load failing in a thread, plus the
        # device.
        reason = str(exc)
        if not isinstance(exc, TrigStreamError):
            reason = f"generator {name!r} failed to load on {device}: {describe_error(exc)}"
        with contextlib.suppress(OSError):  # the parent may be gone
            conn.send(("fatal", reason))
        return
    torch = sys.modules["torch"]  # loading the pipeline imported it
    try:
        conn.send(("ready", torch.get_num_threads()))
    except OSError:
        generator.close()
        return  # the parent is gone while this loaded (the lifeline ends this process too)
    # From here on a thread of its own sends the answers, in order, while this one starts
    # the next call (already in the pipe): the device never waits for the parent to read.
    answers: queue.SimpleQueue[_Outgoing | None] = queue.SimpleQueue()
    channel = _socket_of(conn)
    answering = threading.Thread(target=_answer, args=(conn, channel, answers), name="answers")
    answering.start()
    try:
        while True:
            kind, requests = conn.recv()
            if kind == "close":
                return
            done = len(generator.calls)
            started = time.perf_counter()
            try:
                images = _generate(generator, requests, cancelled)
            except FatalBackendError as exc:
                answers.put((("fatal", describe_error(exc)), []))
                return
            seconds = (time.perf_counter() - started) / max(len(requests), 1)
            portable = [_portable(image) for image in images]
            outcomes = [outcome for outcome, _ in portable]
            body = (outcomes, generator.calls[done:], seconds)
            answers.put((("done", body), [data for _, data in portable if data]))
    except (EOFError, OSError):
        return  # the parent is gone
    finally:
        answers.put(None)
        answering.join()  # every answer queued is sent before the child exits
        channel.close()
        generator.close()


def _generate(
    generator: DiffusersGenerator, requests: list[GenerationRequest], cancel: threading.Event
) -> Sequence[Image | EncodedPicture | TimedPicture | Exception]:
    """``generator.generate(requests)`` in the child, failing as the engine's stage makes a
    call in a thread fail: a call that raises fails each item with its error (a failure of
    the call, not of the items); an item that is no picture nor error, or an exception that
    is no ``Exception`` (SystemExit), is the generator's fault: fatal.

    Raises:
        FatalBackendError: nothing can work (the generator said so, or it is broken).
    """
    try:
        images = generator.generate(requests, worker=0, cancel=cancel)
    except FatalBackendError:
        raise
    except Exception as exc:
        return [exc] * len(requests)
    except BaseException as exc:  # no cancellation in the child: SystemExit, say
        raise FatalBackendError(
            f"generator {generator.name!r} raised {describe_error(exc)}; the run cannot go on"
        ) from None
    check_pictures(generator.name, images)  # the engine's own check, for the same fault
    return images


def _leave_the_run_group() -> None:
    # In a session of its own, the child no longer gets what is sent to the run's process
    # group. Until now those signals were blocked (see _start_in_own_session): one that came
    # meanwhile waits, and setting SIG_IGN drops it. A Ctrl-C sent to this process alone is
    # ignored too: the parent decides when this ends. SIGTERM and SIGHUP keep their handling.
    os.setsid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for signum in GROUP_SIGNALS:
        if signum != signal.SIGINT:
            kept = signal.signal(signum, signal.SIG_IGN)
            signal.signal(signum, signal.SIG_DFL if kept is None else kept)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, GROUP_SIGNALS)


def _exit_with_parent(lifeline: Connection) -> None:
    # The child's lifeline thread. Nothing is ever sent on this pipe: it closes when the
    # parent process ends, however that ends, and the child, maybe loading or in a call that
    # hangs, ends with it. (A parent-death signal would not do: the kernel sends it when the
    # thread that started the child ends, and a worker thread of the engine starts it.)
    with contextlib.suppress(EOFError, OSError):
        lifeline.recv_bytes()
    os._exit(0)


def _answer(
    conn: Connection, channel: socket.socket, answers: queue.SimpleQueue[_Outgoing | None]
) -> None:
    # The child's answering thread, until None: a small pickled message, then the bytes in
    # one call, so it takes the lock back only a few times while the pipeline holds it.
    while (answer := answers.get()) is not None:
        message, payload = answer
        try:
            conn.send(message)
            send_buffers(channel, payload)
        except OSError:
            return  # the parent is gone
        except Exception:
            # An answer that cannot be sent would leave its call waiting forever: the child
            # exits instead, and the parent reports it with this traceback above.
            traceback.print_exc()
            os._exit(1)


def _progress_bars_lock_threads_only() -> None:
    # tqdm's first bar (a weight-loading bar, a pipeline call's bar, hidden or not) makes a
    # lock for bars of several processes: a named semaphore, which multiprocessing's resource
    # tracker holds until this process unlinks it in an orderly exit. A hard stop ends the
    # child through os._exit (or SIGKILL), and the tracker then printed "There appear to be
    # 1 leaked semaphore objects" onto the terminal. This process's bars only need to keep
    # its own threads apart.
    try:
        import tqdm
    except ImportError:
        return
    tqdm.tqdm.set_lock(threading.RLock())


def _hide_progress_bars() -> None:
    # The child writes to the terminal directly, past any display the engine's process
    # draws there; its pipeline's loading bar would land in the middle of it. Errors still
    # show (a child that dies says why there).
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()


def _portable(image: Any) -> tuple[Outcome, bytes | None]:
    """What the child sends for one item (see the module's docstring), and its bytes."""
    if isinstance(image, Exception):
        # Its text and whether the item itself is at fault (the engine tells the two
        # apart), not the error itself: that may not pickle, and it holds its traceback.
        kind = ItemError if isinstance(image, ItemError) else BackendError
        return kind(describe_error(image)), None
    if isinstance(image, EncodedPicture):
        return ("png", len(image.png)), image.png
    if isinstance(image, TimedPicture):
        image = image.image
    pixels = image.tobytes()
    return ("pixels", image.mode, image.size, len(pixels)), pixels


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
        if len(outcome) == 2:  # ("png", length)
            made.append(EncodedPicture(bytes(view[start:end]), seconds))
        else:
            _, mode, size, _ = outcome
            made.append(TimedPicture(Image.frombytes(mode, size, view[start:end]), seconds))
        start = end
    return made


def send_buffers(channel: socket.socket, buffers: Sequence[bytes]) -> None:
    """Send ``buffers`` one after another, in as few system calls as the kernel allows."""
    views = [memoryview(data) for data in buffers if data]
    while views:
        sent = channel.sendmsg(views)  # a blocking socket sends it all, bar a signal
        while sent and sent >= len(views[0]):
            sent -= len(views.pop(0))
        if sent:
            views[0] = views[0][sent:]


def receive_exactly(channel: socket.socket, size: int) -> bytearray:
    """The next ``size`` bytes from ``channel``, in as few system calls as the kernel allows.

    Raises:
        EOFError: the other end closed first.
    """
    data = bytearray(size)
    view = memoryview(data)
    received = 0
    while received < size:
        count = channel.recv_into(view[received:], size - received, socket.MSG_WAITALL)
        if count == 0:
            raise EOFError(f"the other end closed after {received} of {size} bytes")
        received += count
    return data


def _socket_of(conn: Connection) -> socket.socket:
    # A duplex pipe is a socket pair on POSIX: the raw bytes go over the same stream as the
    # pickled messages, right after the message that describes them.
    return socket.socket(fileno=os.dup(conn.fileno()))
