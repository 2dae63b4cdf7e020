"""Shared fixtures: run configs built in code, and small TRIG datasets written to disk."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import pytest
from hypothesis import settings

from trig_stream.backends.threads import threads_left_behind
from trig_stream.config import RunConfig, parse_config

# Each example takes microseconds; on a loaded 2-core machine a scheduler pause of 200 ms
# (Hypothesis's default deadline) would fail a test that has nothing slow in it.
settings.register_profile("trig-stream", deadline=None)
settings.load_profile("trig-stream")

ROOT = Path(__file__).resolve().parent.parent
DEMO_PROMPTS = ROOT / "data" / "demo" / "t2i_prompts.json"


def home_and_work_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """``tmp_path/home`` as the home folder and ``tmp_path/work`` as the current one, both
    made: where a path with a leading ``~``, and a relative one, are read."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    return home, work


LEFT_BEHIND_GRACE_S = 30.0
"""How long a test's teardown waits for the backend threads a stop left running to end."""


@pytest.fixture(autouse=True)
def threads_left_behind_end() -> Iterator[None]:
    """Each test starts with no backend thread of an earlier one still running: a test that
    counts :func:`threads_left_behind` saw one that a stopped run before it had left to end
    on its own (a pipeline call finishing, then its generator closing)."""
    yield
    deadline = time.monotonic() + LEFT_BEHIND_GRACE_S
    while threads_left_behind() and time.monotonic() < deadline:
        time.sleep(0.01)


@pytest.fixture(autouse=True, scope="session")
def stop_signals_heard_as_on_a_terminal() -> Iterator[None]:
    """Under ``nohup`` (SIGHUP), or started in the background by a script (SIGINT), the
    commands the tests start keep ignoring that signal, as they should, and the tests that
    send it to them failed (4 in test_cli.py for SIGHUP). Each ignored stop signal becomes a
    do-nothing handler for the session: the suite still survives it, and the processes it
    starts (``exec`` resets a handler) and the code it runs in-process hear it as they would
    on a terminal."""
    names = ("SIGINT", "SIGTERM", "SIGHUP")
    ignored = [
        signum
        for signum in (getattr(signal, name) for name in names if hasattr(signal, name))
        if signal.getsignal(signum) is signal.SIG_IGN
    ]
    for signum in ignored:
        signal.signal(signum, lambda *_: None)
    try:
        yield
    finally:
        for signum in ignored:
            signal.signal(signum, signal.SIG_IGN)


PAIRS = ["IQ-R_TA-C", "IQ-A_TA-S", "R-T_IQ-A", "D-K_IQ-R"]


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Core engine tests run on both event loops."""
    return str(request.param)


def write_prompts(
    path: Path, count: int, *, pairs: list[str] = PAIRS, key: str = "dimension"
) -> Path:
    """A legacy TRIG JSON file with ``count`` t2i samples spread over ``pairs``."""
    records = []
    for index in range(count):
        pair = pairs[index % len(pairs)]
        first, second = pair.split("_")
        records.append(
            {
                "data_id": f"{pair}_{index // len(pairs) + 1}",
                "prompt": f"prompt number {index}",
                key: [first, second],
                "dimension_prompt": ["", ""],
                "parent_dataset": ["test", "Origin"],
                "img_id": "",
                "item": None,
            }
        )
    path.write_text(json.dumps(records))
    return path


def run_and_dataset_toml(folder: Path, samples: int = 2) -> str:
    """The ``[run]`` and ``[dataset]`` tables of a config file in ``folder`` (its output
    folder ``runs``, a dataset of ``samples`` prompts written there), for a test to add its
    backends to."""
    prompts = write_prompts(folder / "prompts.json", samples)
    return f'[run]\nname = "r"\noutput_dir = "{folder / "runs"}"\n[dataset]\npath = "{prompts}"\n'


ConfigFactory = Callable[..., RunConfig]


@pytest.fixture
def make_config(tmp_path: Path) -> ConfigFactory:
    """Build a validated RunConfig; keyword arguments replace whole sections."""

    def factory(
        *,
        samples: int = 12,
        dataset: dict[str, Any] | None = None,
        generators: list[dict[str, Any]] | None = None,
        judges: list[dict[str, Any]] | None = None,
        engine: dict[str, Any] | None = None,
        run: dict[str, Any] | None = None,
    ) -> RunConfig:
        prompts = tmp_path / "prompts.json"
        if dataset is None and not prompts.exists():
            write_prompts(prompts, samples)
        data: dict[str, Any] = {
            "run": {"name": "test", "output_dir": str(tmp_path / "runs"), **(run or {})},
            "dataset": dataset or {"path": str(prompts)},
            "generators": generators
            or [{"name": "synth", "backend": "synthetic", "options": {"size": 16}}],
            "judges": judges or [{"name": "trigscore", "backend": "fake"}],
            "engine": engine or {},
        }
        return parse_config(data, source=tmp_path / "config.toml")

    return factory


@contextmanager
def unblocked_after(fifo: Path, seconds: float) -> Iterator[list[bool]]:
    """A safety net: a reader still waiting on ``fifo`` after ``seconds`` is let go (a
    writer opens and closes it), so that a hang fails the test instead of hanging it."""
    fired: list[bool] = []

    def let_go() -> None:
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            fired.append(True)
        except OSError:  # nobody was waiting
            pass

    timer = threading.Timer(seconds, let_go)
    timer.start()
    try:
        yield fired
    finally:
        timer.cancel()


class _CountedReads:
    """A file opened for reading whose reads add their byte counts to ``sizes``."""

    def __init__(self, handle: BinaryIO, sizes: list[int]) -> None:
        self._handle = handle
        self._sizes = sizes

    def read(self, size: int = -1) -> bytes:
        data = self._handle.read(size)
        self._sizes.append(len(data))
        return data

    def __enter__(self) -> _CountedReads:
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.close()


def count_reads(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> list[int]:
    """Spy on the files ``module`` opens with ``open_regular_file`` whose name is ``name``:
    the byte count of each read of them, in order."""
    import trig_stream.files

    sizes: list[int] = []
    opened = trig_stream.files.open_regular_file

    def counting(path: Path) -> object:
        handle = opened(path)
        return _CountedReads(handle, sizes) if Path(path).name == name else handle

    monkeypatch.setattr(module, "open_regular_file", counting)
    return sizes
