"""Helpers of the benchmark scripts: ``simulate-judge`` in its own process, and engine configs."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

GRACE_S = "5"
"""Seconds a command started by :func:`stopped_with_us` is given between SIGTERM and SIGKILL
once this process has died."""


def stopped_with_us(argv: list[str]) -> list[str]:
    """``argv``, started so that the kernel sends it SIGTERM when this process ends, even by
    SIGKILL (Linux; elsewhere ``argv`` as it is).

    It goes through trig-stream's own ``parent_death.py`` (``prctl(PR_SET_PDEATHSIG)``), as
    the managed judge server does: a bench that is killed leaves no server running. The
    signal comes when the *thread* that started the child ends, so start it from the main
    thread.
    """
    spec = importlib.util.find_spec("trig_stream")  # found, not imported
    if not sys.platform.startswith("linux") or spec is None or spec.origin is None:
        return argv
    script = Path(spec.origin).parent / "backends" / "judges" / "parent_death.py"
    return [sys.executable, "-I", "-S", str(script), str(os.getpid()), GRACE_S, "-1", *argv]


def run_child(argv: list[str], what: str) -> str:
    """Run ``argv`` to its end, stopped with this process (:func:`stopped_with_us`); its
    standard output.

    Raises:
        SystemExit: it failed; the message names ``what`` and holds what it wrote to stderr,
            and the bench exits 1 without a traceback.
    """
    done = subprocess.run(stopped_with_us(argv), capture_output=True, text=True)
    if done.returncode != 0:
        said = done.stderr.strip() or "no message"
        raise SystemExit(f"{what} failed (exit status {done.returncode}): {said}")
    return done.stdout


def start_judge(*options: str, cpus: set[int] | None = None) -> tuple[subprocess.Popen[str], str]:
    """Start ``trig-stream simulate-judge --port 0 *options``, on ``cpus`` only when given,
    stopped with this process (:func:`stopped_with_us`); returns it and its base URL.

    Raises:
        SystemExit: the server ended before it was ready; the message holds what it wrote
            to stderr (a refused option, say), and the bench exits 1 without a traceback.
    """
    command = [sys.executable, "-m", "trig_stream", "simulate-judge", "--port", "0", *options]
    # A file, not a pipe: nobody reads the server's stderr while it runs, and a full pipe
    # would block it. Read only when it did not start.
    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(
            stopped_with_us(command),
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
        )
        assert process.stdout is not None
        for line in process.stdout:
            if line.startswith("READY "):
                return process, line.split()[1]
        process.kill()
        status = process.wait()
        stderr.seek(0)
        said = stderr.read().decode(errors="replace").strip()
    raise SystemExit(did_not_start(options, status, said))


def did_not_start(options: tuple[str, ...], status: int, stderr: str) -> str:
    """The message of a ``simulate-judge`` that ended before it was ready."""
    reason = stderr or f"no message, exit status {status}"
    return (
        f"simulate-judge did not start: {reason}\n"
        f"(its options: {' '.join(options) or 'none'}; fix the bench option that sets the "
        "one named)"
    )


def stop_judge(process: subprocess.Popen[str]) -> None:
    process.terminate()
    process.wait(timeout=30)


def judge_stats(base_url: str) -> dict[str, Any]:
    """The server's ``GET /stats``: received, served, repeated, faults..."""
    url = base_url.removesuffix("/v1") + "/stats"
    with urllib.request.urlopen(url, timeout=10) as response:
        stats: dict[str, Any] = json.load(response)
    return stats


class StatsSampler:
    """Polls a ``simulate-judge``'s ``GET /stats`` from a process of its own, so that the
    sampling costs the measured process nothing; :meth:`stop` returns the samples, each the
    stats plus ``t`` (``time.monotonic()``, the same clock as ``time.perf_counter()`` here).
    """

    _CODE = (
        "import json, sys, time, urllib.request\n"
        "url, every = sys.argv[1], float(sys.argv[2])\n"
        "while True:\n"
        "    with urllib.request.urlopen(url, timeout=10) as r:\n"
        "        stats = json.load(r)\n"
        "    stats['t'] = time.monotonic()\n"
        "    print(json.dumps(stats), flush=True)\n"
        "    time.sleep(every)\n"
    )

    def __init__(self, base_url: str, every_s: float = 0.05) -> None:
        url = base_url.removesuffix("/v1") + "/stats"
        self._process = subprocess.Popen(
            stopped_with_us([sys.executable, "-c", self._CODE, url, str(every_s)]),
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._process.stdout is not None
        self._process.stdout.readline()  # polling has started

    def stop(self) -> list[dict[str, Any]]:
        self._process.terminate()
        out, _ = self._process.communicate(timeout=30)
        return [json.loads(line) for line in out.splitlines() if line.endswith("}")]


def openai_judge(base_url: str, concurrency: int, **options: Any) -> dict[str, Any]:
    """A ``[[judges]]`` entry of the ``openai`` backend against ``base_url``."""
    return {
        "name": "trigscore",
        "backend": "openai",
        "concurrency": concurrency,
        "options": {"base_url": base_url, "model": "trig-judge-sim", **options},
    }


def synthetic_generator(
    *, workers: int = 1, batch_size: int = 8, size: int = 8, latency_s: float = 0.0
) -> dict[str, Any]:
    """A ``[[generators]]`` entry of the ``synthetic`` backend."""
    options: dict[str, Any] = {"size": size, "steps": 1}
    if latency_s:
        options["latency_s"] = latency_s
    return {
        "name": "synth",
        "backend": "synthetic",
        "workers": workers,
        "batch_size": batch_size,
        "options": options,
    }


def rss_mib() -> float:
    """This process's resident memory now, from /proc."""
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 1024**2
