"""The child side of a pipeline process (see :mod:`~trig_stream.backends.generators.
pipeline_process`, whose docstring describes the messages), and what both sides share.

:func:`serve` is the child's main loop: it leaves the run's process group, ends with the
parent (a lifeline pipe), loads a thread-isolated :class:`~trig_stream.backends.generators.
diffusers_generator.DiffusersGenerator` for its single device, then answers calls until told
to close, a thread of its own encoding and sending each answer while the next call runs. Each
item of an answer travels as an :data:`Outcome`, and its pixels raw (or a PNG, for a picture
whose raw pixels leave something out) after it (:func:`send_buffers`,
:func:`receive_exactly`); the run's cancel reaches the child's pipeline through a
:class:`SharedFlag`.
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import os
import queue
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from functools import partial
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
from trig_stream.png import encode_png, writes_pixels_alone

if TYPE_CHECKING:
    from multiprocessing.context import SpawnContext

    from PIL.Image import Image

    from trig_stream.backends.generators.diffusers_generator import DiffusersGenerator

Outcome = BackendError | tuple[str, bool, int] | tuple[str, str, tuple[int, int], int]
"""One item of an answer: its error, ``("png", pixels_checked, length)`` (the
:class:`EncodedPicture`'s own flag, which the stored image keeps; a picture of a mode that
Pillow encodes is sent so too, encoded in the child), or ``("pixels", mode, size, length)``
(an 8-bit greyscale, RGB or RGBA picture, whose raw pixels are all of it)."""
_Outgoing = tuple[tuple[str, Any], list[bytes]]
"""A message the child sends, and the bytes that follow it."""

_Answer = Callable[[], _Outgoing]
"""What makes a message to send, in the answering thread: a picture PNG-encoded there
(:func:`_portable`) is encoded while the next call runs, not before it starts."""

GROUP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""Signals sent to the run's whole process group (a terminal's Ctrl-C and hangup, ``kill``
of the group): the child leaves that group as soon as its code runs, and keeps them blocked
until then (see :func:`~trig_stream.backends.generators.pipeline_process.
_start_in_own_session`)."""


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
    answers: queue.SimpleQueue[_Answer | None] = queue.SimpleQueue()
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
                answers.put(partial(_fatal, describe_error(exc)))
                return
            seconds = (time.perf_counter() - started) / max(len(requests), 1)
            answers.put(partial(_done, images, generator.calls[done:], seconds))
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
    # ignored too: the parent decides when this ends. SIGTERM ends it, as by default, even
    # where the run was started ignoring it (an ignored signal is inherited: see
    # signals.RESET_IN_CHILDREN); SIGHUP keeps its handling (ignored under nohup).
    os.setsid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    kept = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_DFL if kept is None else kept)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, GROUP_SIGNALS)


def _exit_with_parent(lifeline: Connection) -> None:
    # The child's lifeline thread. Nothing is ever sent on this pipe: it closes when the
    # parent process ends, however that ends, and the child, maybe loading or in a call that
    # hangs, ends with it. (A parent-death signal would not do: the kernel sends it when the
    # thread that started the child ends, and a worker thread of the engine starts it.)
    with contextlib.suppress(EOFError, OSError):
        lifeline.recv_bytes()
    os._exit(0)


def _fatal(reason: str) -> _Outgoing:
    return ("fatal", reason), []


def _done(
    images: Sequence[Image | EncodedPicture | TimedPicture | Exception],
    calls: list[int],
    seconds: float,
) -> _Outgoing:
    """The answer to a call: each item's outcome, the call sizes it took, the seconds per
    item; then the items' bytes."""
    portable = [_portable(image) for image in images]
    outcomes = [outcome for outcome, _ in portable]
    return ("done", (outcomes, calls, seconds)), [data for _, data in portable if data]


def _answer(
    conn: Connection, channel: socket.socket, answers: queue.SimpleQueue[_Answer | None]
) -> None:
    # The child's answering thread, until None: a small pickled message, then the bytes in
    # one call, so it takes the lock back only a few times while the pipeline holds it.
    while (answer := answers.get()) is not None:
        try:
            # Made here, apart from the sending: an OSError making it (a picture's file that
            # cannot be read) is no parent gone, and left the call waiting forever.
            message, payload = answer()
        except Exception:
            traceback.print_exc()
            os._exit(1)
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
        return ("png", image.pixels_checked, len(image.png)), image.png
    if isinstance(image, TimedPicture):
        image = image.image
    if not writes_pixels_alone(image.mode) and image.width and image.height:
        # Encoded here as the engine would encode it in a thread: its raw pixels leave its
        # palette and transparency behind (a palette picture was stored black).
        try:
            png = encode_png(image)
        except Exception:
            pass  # a mode PNG cannot hold: the parent meets and names the same failure
        else:
            return ("png", True, len(png)), png
    pixels = image.tobytes()
    return ("pixels", image.mode, image.size, len(pixels)), pixels


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
