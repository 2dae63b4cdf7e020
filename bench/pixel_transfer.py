"""How long a pipeline process's answer takes to reach the engine, pixels included.

With ``isolation = "process"`` the child sends each batch's pictures as raw pixels: eight
512x512 RGB pictures are 6 MB. The engine reads them in a thread of its own, in a process
where the event loop and the image writers also want the interpreter lock. This bench sends
answers of that size from a child process, as ``pipeline_process`` does, and times their
arrival in two ways:

* ``raw``: a small pickled message, then the bytes in one ``sendmsg``, read with one
  ``recv_into`` (``MSG_WAITALL``): what the child and the engine do now;
* ``pickled``: the whole answer, pixels included, through ``Connection.send``, which the
  receiver reads in chunks of the socket's buffer, taking the lock back for each chunk: what
  they did before.

Each way runs with the receiving process idle, and with a thread there busy in Python (a
stand-in for the engine's event loop and writers at work), alternating, ``--rounds`` times;
the lines give the median time per answer.

    .venv/bin/python bench/pixel_transfer.py [--size 512] [--batch 8] [--answers 20]
        [--rounds 3]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import statistics
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

from trig_stream.backends.generators.pipeline_child import (
    _socket_of,
    receive_exactly,
    send_buffers,
)
from trig_stream.backends.generators.pipeline_process import _payload_size


def child(conn: Connection, way: str, size: int, batch: int, answers: int) -> None:
    """Send ``answers`` answers of ``batch`` pictures of ``size`` x ``size`` RGB pixels."""
    pictures = [os.urandom(size * size * 3) for _ in range(batch)]
    outcomes = [("pixels", "RGB", (size, size), len(pixels)) for pixels in pictures]
    channel = _socket_of(conn)
    for _ in range(answers + 1):  # the first one is not timed: it waits for this start
        if way == "raw":
            conn.send(("done", (outcomes, [batch], 0.1)))
            send_buffers(channel, pictures)
        else:
            inline = [("RGB", (size, size), pixels) for pixels in pictures]
            conn.send(("done", (inline, [batch], 0.1)))
    conn.send(None)
    channel.close()


def busy(stop: threading.Event) -> None:
    """Python bytecode without a pause, as the engine's threads run it when busy."""
    count = 0
    while not stop.is_set():
        count += 1


def receive(conn: Connection, channel: socket.socket, way: str) -> Any:
    message = conn.recv()
    if message is not None and way == "raw":
        receive_exactly(channel, _payload_size(message[1][0]))
    return message


def measure(way: str, loaded: bool, size: int, batch: int, answers: int) -> float:
    """Seconds per answer."""
    context = multiprocessing.get_context("spawn")
    parent, child_end = context.Pipe()
    process = context.Process(target=child, args=(child_end, way, size, batch, answers))
    process.start()
    child_end.close()
    channel = _socket_of(parent)
    stop = threading.Event()
    spinner = threading.Thread(target=busy, args=(stop,))
    if loaded:
        spinner.start()
    try:
        receive(parent, channel, way)  # the child is up
        started = time.perf_counter()
        for _ in range(answers):
            receive(parent, channel, way)
        elapsed = time.perf_counter() - started
        assert receive(parent, channel, way) is None
    finally:
        stop.set()
        if loaded:
            spinner.join()
        process.join()
        channel.close()
        parent.close()
    return elapsed / answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512, help="picture side, pixels")
    parser.add_argument("--batch", type=int, default=8, help="pictures per answer")
    parser.add_argument("--answers", type=int, default=20, help="answers timed per run")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    megabytes = args.size * args.size * 3 * args.batch / 1e6
    print(f"answers of {args.batch} pictures of {args.size}x{args.size} RGB ({megabytes:.1f} MB)")
    cases = [(way, loaded) for loaded in (False, True) for way in ("raw", "pickled")]
    times: dict[tuple[str, bool], list[float]] = {case: [] for case in cases}
    for _ in range(args.rounds):
        for way, loaded in cases:
            times[way, loaded].append(measure(way, loaded, args.size, args.batch, args.answers))
    for (way, loaded), runs in times.items():
        where = "a thread busy in Python" if loaded else "the receiver idle"
        print(
            f"  {way:<7} {where:<24} {statistics.median(runs) * 1000:7.1f} ms per answer "
            f"(runs {', '.join(f'{r * 1000:.1f}' for r in runs)})"
        )


if __name__ == "__main__":
    main()
