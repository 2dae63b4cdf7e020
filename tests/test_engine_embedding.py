"""An engine embedded in an application: entered twice, made under one event loop library
and run under another, given backends or a config built in code."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from tests.conftest import ConfigFactory, home_and_work_folders, write_prompts
from trig_stream import ConfigError, Engine, RunSummary
from trig_stream.backends.base import Generator, Judge
from trig_stream.config import GeneratorConfig, RunConfig
from trig_stream.testing import FakeJudge, SyntheticGenerator
from trig_stream.testing.fake_judge import FakeJudgeOptions
from trig_stream.testing.synthetic import SyntheticOptions

pytestmark = pytest.mark.anyio


async def test_an_engine_entered_twice_at_once_refuses_the_second_and_keeps_the_first(
    make_config: ConfigFactory,
) -> None:

    config = make_config(samples=2)
    engine = Engine(config)
    outcomes: list[RunSummary | BaseException] = []

    async def enter() -> None:
        try:
            async with engine:
                outcomes.append(await engine.drain())
        except Exception as exc:
            outcomes.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(enter)
        tg.start_soon(enter)
    refused = [o for o in outcomes if isinstance(o, BaseException)]
    ran = [o for o in outcomes if isinstance(o, RunSummary)]
    assert len(refused) == 1 and len(ran) == 1, outcomes
    assert isinstance(refused[0], RuntimeError)
    assert "an Engine runs once" in str(refused[0])
    assert ran[0].state == "done"
    assert engine.summary().state == "done"
    # The first run released its run directory: another engine opens it (and finds it done).
    async with Engine(config) as again:
        assert (await again.drain()).state == "done"


def code_built_config(
    prompts: Path,
    output_dir: str,
    *,
    generator_options: dict[str, Any] | None = None,
    judge_options: dict[str, Any] | None = None,
) -> RunConfig:
    """A config built in code, as an application does: no file, no :func:`parse_config`."""
    return RunConfig.model_validate(
        {
            "run": {"name": "r", "output_dir": output_dir},
            "dataset": {"path": str(prompts)},
            "generators": [
                {"name": "g", "backend": "synthetic", "options": generator_options or {}}
            ],
            "judges": [{"name": "j", "backend": "fake", "options": judge_options or {}}],
        }
    )


@pytest.mark.parametrize(
    ("generator_options", "judge_options", "message"),
    [
        ({"size": 3}, {}, "generator 'g': options: size: Input should be greater than or equal"),
        ({"sizee": 64}, {}, "generator 'g': options: sizee: unknown key; did you mean 'size'?"),
        ({"size": "64"}, {}, "generator 'g': options: size: Input should be a valid integer"),
        ({}, {"latency_s": math.nan}, "judge 'j': options: latency_s: Input should be a finite"),
    ],
)
async def test_a_code_built_config_with_bad_options_names_the_entry(
    tmp_path: Path,
    generator_options: dict[str, Any],
    judge_options: dict[str, Any],
    message: str,
) -> None:
    config = code_built_config(
        write_prompts(tmp_path / "prompts.json", 2),
        str(tmp_path / "runs"),
        generator_options=generator_options,
        judge_options=judge_options,
    )
    with pytest.raises(ConfigError, match=re.escape(message)):
        Engine(config)


async def test_a_code_built_config_resolves_its_paths_as_a_loaded_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home, work = home_and_work_folders(tmp_path, monkeypatch)
    write_prompts(work / "prompts.json", 2)
    config = code_built_config(Path("prompts.json"), "~/runs")
    async with Engine(config) as engine:
        assert (await engine.drain()).state == "done"
    assert engine.config.run.output_dir == home / "runs"
    assert engine.config.dataset.path == work / "prompts.json"
    assert engine.run_dir_path == home / "runs" / "r"
    assert (home / "runs" / "r").is_dir()
    assert not (work / "~").exists()  # no folder literally named "~"


async def test_a_code_built_config_resolves_a_path_object_option_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only str options were resolved against the working folder: Path("imgs") stayed
    # relative, to be read from wherever the process stood when the backend opened it.
    monkeypatch.chdir(tmp_path)
    write_prompts(tmp_path / "prompts.json", 2)
    config = code_built_config(Path("prompts.json"), "runs")
    folder = {"name": "g", "backend": "image_folder", "options": {"path": Path("imgs")}}
    config = config.model_copy(update={"generators": [GeneratorConfig.model_validate(folder)]})
    assert Engine(config).config.generators[0].options == {"path": str(tmp_path / "imgs")}
    # In a nested backend's options, and under a key a hub id may take: a Path is a path.
    inner = {"backend": "diffusers", "options": {"checkpoint": Path("ckpt")}}
    nested = {"name": "h", "backend": "dtm_rewrite", "options": {"inner": inner}}
    config = config.model_copy(update={"generators": [GeneratorConfig.model_validate(nested)]})
    resolved = config.resolve_paths(tmp_path).generators[0].options
    assert resolved["inner"]["options"]["checkpoint"] == str(tmp_path / "ckpt")


async def test_a_code_built_config_of_an_unknown_home_names_the_key(tmp_path: Path) -> None:
    config = code_built_config(write_prompts(tmp_path / "p.json", 2), "~no-such-user-xq/runs")
    with pytest.raises(ConfigError, match=r"run\.output_dir: .*no home folder is known"):
        Engine(config)


class NamelessJudge(FakeJudge):
    """A judge whose ``__init__`` forgot ``super().__init__(name, ...)``: it has no name."""

    def __init__(self) -> None:
        pass


class NamelessGenerator(SyntheticGenerator):
    """A generator whose ``__init__`` never sets ``self.name``."""

    def __init__(self) -> None:
        pass


@pytest.mark.parametrize(
    ("generators", "judges", "message"),
    [
        (
            None,
            [FakeJudge("j", FakeJudgeOptions())],
            "generators[0] (NamelessGenerator) has no name: set `self.name` in its __init__",
        ),
        (
            [SyntheticGenerator("g", SyntheticOptions())],
            None,
            "judges[0] (NamelessJudge) has no name: set `self.name` in its __init__ (call "
            "super().__init__(name, options, ...))",
        ),
    ],
)
async def test_a_backend_instance_without_a_name_is_refused_naming_its_class(
    make_config: ConfigFactory,
    generators: list[Generator] | None,
    judges: list[Judge] | None,
    message: str,
) -> None:
    # It crashed with an AttributeError from the check of the names.
    with pytest.raises(ConfigError, match=re.escape(message)):
        Engine(
            make_config(samples=2),
            generators=generators or [NamelessGenerator()],
            judges=judges or [NamelessJudge()],
        )


@pytest.mark.parametrize(("made_under", "run_under"), [("trio", "asyncio"), ("asyncio", "trio")])
def test_an_engine_run_under_another_async_library_says_so(
    make_config: ConfigFactory, made_under: str, run_under: str
) -> None:
    # It failed deep inside with a bare RuntimeError ("must be called from async context",
    # "no running event loop").
    config = make_config(samples=2)
    engines: list[Engine] = []

    async def make() -> None:
        engines.append(Engine(config))

    async def run() -> str:
        async with engines[0] as engine:
            return (await engine.drain()).state

    anyio.run(make, backend=made_under)
    message = (
        f"this Engine was made under {made_under} and cannot run under {run_under}: its "
        f"events and cancel scopes are {made_under}'s; make it inside the async code that "
        "runs it"
    )
    with pytest.raises(RuntimeError, match=re.escape(message)):
        anyio.run(run, backend=run_under)
    # Refused before it changed anything: a loop of its own library still runs it.
    assert anyio.run(run, backend=made_under) == "done"


async def test_a_block_raising_after_the_run_ended_leaves_it_done(
    make_config: ConfigFactory,
) -> None:
    # The block's own exception, once every judgement was made: the run is over and was
    # not cancelled (stats() and summary() said "cancelled").
    engine = Engine(make_config(samples=2))
    with pytest.raises(ValueError, match="the block's own"):
        async with engine:
            async for _ in engine.results:
                pass
            raise ValueError("the block's own")
    assert engine.stats().state == "done"
    assert engine.summary().state == "done" and engine.summary().judged == 4


CANCEL_WHILE_THE_RUN_DIRECTORY_OPENS = """
import asyncio, json, os, sys
from trig_stream import Engine, RunConfig
from trig_stream.resources import RunResources

# The cancel lands the moment the opening is named, in the engine's own task, before it
# hands the opening to a worker thread. (Polling stats().opening from another task could
# miss an opening that started and ended between two polls.)
cancel_at_opening = []

def opening_now(resources):
    return resources.__dict__.get("_opening_now")

def name_opening(resources, what):
    resources.__dict__["_opening_now"] = what
    if (what or "").startswith("the run directory") and cancel_at_opening:
        cancel_at_opening.pop()()

RunResources.opening_now = property(opening_now, name_opening)

async def main() -> None:
    engine = Engine(RunConfig.model_validate(json.loads(sys.argv[1])))

    async def run() -> None:
        async with engine:
            await engine.drain()

    task = asyncio.create_task(run())
    cancel_at_opening.append(task.cancel)
    done, _ = await asyncio.wait({task}, timeout=20)
    print(json.dumps({"cancelled at its opening": not cancel_at_opening, "ended": bool(done),
                      "cancelled": bool(done) and task.cancelled(),
                      "state": engine.stats().state}), flush=True)
    os._exit(0)  # a run still hanging must not hang this process's end

asyncio.run(main())
"""


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # trio has no cancel outside its scopes
async def test_a_native_asyncio_cancel_as_the_run_directory_starts_opening_ends_the_run(
    make_config: ConfigFactory,
) -> None:
    # Cancelled before a worker thread took the opening up, the job was dropped, and the
    # run waited for the opening's end for good, the process with it (run in a child
    # process: a hang fails the test, after its safety timeout, instead of hanging it).
    config = make_config(samples=2)
    data = {
        "run": {"name": config.run.name, "output_dir": str(config.run.output_dir)},
        "dataset": {"path": str(config.dataset.path)},
        "generators": [{"name": "g", "backend": "synthetic", "options": {"size": 16}}],
        "judges": [{"name": "j", "backend": "fake"}],
    }
    child = await anyio.run_process(
        [sys.executable, "-c", CANCEL_WHILE_THE_RUN_DIRECTORY_OPENS, json.dumps(data)],
        check=False,
    )
    assert child.returncode == 0, child.stderr.decode()
    outcome = json.loads(child.stdout)
    assert outcome == {
        "cancelled at its opening": True,
        "ended": True,
        "cancelled": True,
        "state": "cancelled",
    }
    assert not config.run_dir.exists()  # one it made is removed, as by a stop


def files_open_in(folder: Path) -> list[str]:
    """This process's open descriptors on files in ``folder``."""
    paths = []
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile (the listing's own, say)
            paths.append(os.readlink(f"/proc/self/fd/{name}"))
    return [path for path in paths if path.startswith(f"{folder}{os.sep}")]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # trio has no cancel outside its scopes
async def test_native_asyncio_cancels_again_while_the_engine_closes_still_close_it(
    make_config: ConfigFactory,
) -> None:
    # A second task.cancel() got past anyio's shield as the engine closed: its run directory
    # stayed open for the process's life (its lock and files), and the next engine on it was
    # refused as "in use by another engine in this process".
    config = make_config(
        samples=4, judges=[{"name": "j", "backend": "fake", "options": {"latency_s": 0.01}}]
    )
    engine = Engine(config)

    async def run() -> None:
        async with engine:
            async for _ in engine.results:
                pass

    task = asyncio.ensure_future(run())
    with anyio.fail_after(30):  # a safety net
        while engine.stats().state != "running":
            await anyio.lowlevel.checkpoint()
        while not task.done():  # cancelled again and again until it ends
            task.cancel()
            await asyncio.sleep(0)
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.stats().state == "cancelled"
    assert files_open_in(config.run_dir) == []
    async with Engine(config) as again:  # the directory is free for the next engine
        summary = await again.drain()
    assert summary.state == "done"
