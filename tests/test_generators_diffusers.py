"""The diffusers generator on tiny random-weight pipelines, end to end through the engine."""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import os
import pickle
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, cast

import anyio
import anyio.from_thread
import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT, ConfigFactory, run_and_dataset_toml, write_prompts
from trig_stream import Engine
from trig_stream.backends.base import EncodedPicture, GenerationRequest, TimedPicture
from trig_stream.backends.library_logs import QUIET_LIBRARIES
from trig_stream.config import RunConfig
from trig_stream.errors import BackendError, FatalBackendError, ItemError
from trig_stream.journal import JOURNAL
from trig_stream.manifest import IMAGES
from trig_stream.records import Judgement, Sample

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

pytest.importorskip("diffusers")

from trig_stream.backends.generators import pipeline_check, pipeline_process
from trig_stream.backends.generators.diffusers_generator import DiffusersGenerator
from trig_stream.backends.generators.diffusers_options import DiffusersOptions
from trig_stream.backends.generators.pipeline_calls import call_arguments
from trig_stream.backends.generators.pipeline_child import receive_exactly, send_buffers
from trig_stream.backends.generators.pipeline_loading import check_classes
from trig_stream.backends.generators.pipeline_process import PipelineProcess, thread_share
from trig_stream.testing.tiny_pipelines import (
    PIPELINE_CLASSES,
    TINY_CALL,
    TinyKind,
    build_tiny_pipeline,
)

SIZE = 32
"""Side of the images the tests ask for (a multiple of the tiny VAEs' 8x downscale x 2)."""


@pytest.fixture
def anyio_backend() -> str:
    # Pipelines dominate the time here; the event-loop matrix is covered by the engine tests.
    return "asyncio"


@pytest.fixture(scope="session")
def tiny_pipelines(tmp_path_factory: pytest.TempPathFactory) -> dict[TinyKind, Path]:
    """Each tiny pipeline built once per session."""
    root = tmp_path_factory.mktemp("tiny-pipelines")
    return {kind: build_tiny_pipeline(kind, root / kind) for kind in PIPELINE_CLASSES}


def tiny_options(path: Path, kind: TinyKind, **extra: Any) -> dict[str, Any]:
    return {
        "pipeline": PIPELINE_CLASSES[kind],
        "checkpoint": str(path),
        "inputs": "edit" if kind == "instruct_pix2pix" else "text",
        "devices": ["cpu"],
        "local_files_only": True,
        "steps": 2,
        "height": SIZE,
        "width": SIZE,
        "call": TINY_CALL[kind],
        **extra,
    }


def uncached_hub_id(tmp_path: Path, *, offline: bool) -> DiffusersOptions:
    """``DiffusionPipeline`` options naming a hub id that is in no cache (an empty one in
    ``tmp_path``): its ``model_index.json`` can be read from nowhere but the hub."""
    return DiffusersOptions(
        pipeline="DiffusionPipeline",
        checkpoint="nobody/no-such-checkpoint",
        devices=["cpu"],
        local_files_only=offline,
        load={"cache_dir": str(tmp_path / "cache")},
    )


UNCACHED_HUB_ID_REFUSED = (
    r"^generator 'x': checkpoint 'nobody/no-such-checkpoint' is a hub id whose "
    r"model_index\.json is not in the Hugging Face cache, and offline "
    r"\(options\.local_files_only or HF_HUB_OFFLINE\) the hub is not asked; "
)
"""How ``check_environment`` refuses :func:`uncached_hub_id`'s options offline."""


def p2p_dataset(root: Path, count: int) -> dict[str, Any]:
    """A legacy p2p JSON dataset with its source images in ``root/sources``."""
    sources = root / "sources"
    sources.mkdir(parents=True, exist_ok=True)
    records = []
    for index in range(count):
        name = f"src_{index}.png"
        Image.new("RGB", (48, 40), (index * 40 % 256, 90, 160)).save(sources / name)
        records.append(
            {
                "data_id": f"IQ-R_TA-C_{index + 1}",
                "prompt": f"make it look like winter {index}",
                "dimension": ["IQ-R", "TA-C"],
                "img_id": name,
            }
        )
    path = root / "p2p.json"
    path.write_text(json.dumps(records))
    return {"path": str(path), "image_root": str(sources)}


def journal(config: RunConfig) -> list[dict[str, Any]]:
    lines = (config.run_dir / JOURNAL).read_text().splitlines()
    return [json.loads(line) for line in lines]


async def run_to_end(config: RunConfig, **kwargs: Any) -> tuple[list[Judgement], Engine]:
    async with Engine(config, **kwargs) as engine:
        results = [j async for j in engine.results]
    return results, engine


def png_bytes(config: RunConfig, model: str) -> dict[str, bytes]:
    folder = config.run_dir / IMAGES / config.run.task / model
    return {path.name: path.read_bytes() for path in sorted(folder.glob("*.png"))}


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["flux", "sd", "instruct_pix2pix"])
async def test_tiny_pipeline_through_the_engine_is_repeatable(
    kind: TinyKind, tiny_pipelines: dict[TinyKind, Path], tmp_path: Path
) -> None:
    from trig_stream.config import parse_config

    samples = 4
    if kind == "instruct_pix2pix":
        dataset = p2p_dataset(tmp_path, samples)
        task = "p2p"
    else:
        dataset = {"path": str(write_prompts(tmp_path / "t2i.json", samples))}
        task = "t2i"
    runs = []
    for run_name in ("first", "second"):
        data = {
            "run": {"name": run_name, "output_dir": str(tmp_path / "runs"), "task": task},
            "dataset": dataset,
            "generators": [
                {
                    "name": "tiny",
                    "backend": "diffusers",
                    "batch_size": 2,
                    "options": tiny_options(tiny_pipelines[kind], kind),
                }
            ],
            "judges": [{"backend": "fake"}],
        }
        config = parse_config(data, source=tmp_path / "config.toml")
        results, _ = await run_to_end(config)
        assert len(results) == 2 * samples
        assert {j.status for j in results} == {"ok"}
        runs.append(png_bytes(config, "tiny"))
        for name, raw in runs[-1].items():
            with Image.open(config.run_dir / IMAGES / task / "tiny" / name) as image:
                image.verify()
            with Image.open(config.run_dir / IMAGES / task / "tiny" / name) as image:
                assert image.format == "PNG"
                assert image.size == (SIZE, SIZE)
            assert raw.startswith(b"\x89PNG")
    first, second = runs
    assert len(first) == samples
    assert first == second  # same seeds, same bytes
    assert len(set(first.values())) == samples  # and each sample its own picture


@pytest.mark.anyio
async def test_ready_prompts_share_one_pipeline_call(
    make_config: ConfigFactory, tiny_pipelines: dict[TinyKind, Path]
) -> None:
    config = make_config(
        samples=8,
        generators=[
            {
                "name": "tiny",
                "backend": "diffusers",
                "batch_size": 4,
                "options": tiny_options(tiny_pipelines["flux"], "flux"),
            }
        ],
    )
    _, engine = await run_to_end(config)
    generator = engine._generators[0]
    assert isinstance(generator, DiffusersGenerator)
    assert sum(generator.calls) == 8
    assert max(generator.calls) <= 4
    # The sample buffer fills while the pipeline loads, so the first call takes a full batch.
    assert generator.calls[0] == 4


@pytest.mark.parametrize(
    ("left_out", "set_to_the_default", "another_value", "key"),
    [
        ({"steps": None}, {"steps": 28}, {"steps": 27}, "num_inference_steps"),
        (
            {"call": {}},
            {"call": {"max_sequence_length": 512}},
            {"call": {"max_sequence_length": 64}},
            "max_sequence_length",
        ),
        ({}, {"guidance_scale": 3.5}, {"guidance_scale": 5.0}, "guidance_scale"),
    ],
    ids=["steps", "call", "guidance"],
)
def test_a_call_argument_set_to_the_pipelines_default_resumes_as_one_left_out(
    make_config: ConfigFactory,
    tiny_pipelines: dict[TinyKind, Path],
    left_out: dict[str, Any],
    set_to_the_default: dict[str, Any],
    another_value: dict[str, Any],
    key: str,
) -> None:
    # A run made without the argument, resumed with it set to FluxPipeline's own default
    # (or the reverse), was refused as made with other settings, its images the same.
    from trig_stream.backends.registry import build_generator
    from trig_stream.manifest import Manifest
    from trig_stream.preflight import run_manifest

    def manifest(options: dict[str, Any]) -> Manifest:
        entry = {
            "name": "tiny",
            "backend": "diffusers",
            "options": {**tiny_options(tiny_pipelines["flux"], "flux"), **options},
        }
        config = make_config(generators=[entry])
        generator = build_generator(config.generators[0], config)
        generator.check_environment()
        return run_manifest(config, [generator], {})

    def stored(written: Manifest) -> Manifest:
        return Manifest.model_validate_json(written.model_dump_json())

    without, explicit = manifest(left_out), manifest(set_to_the_default)
    assert key not in without.generators["tiny"]["call"]  # the fingerprints stay as they were
    assert key in explicit.generators["tiny"]["call"]
    assert stored(without).differences(explicit) == []
    assert stored(explicit).differences(without) == []
    # Another value is a change still, either way.
    other = manifest(another_value)
    value = json.dumps(other.generators["tiny"]["call"][key])
    assert stored(without).differences(other) == [
        f"generator 'tiny': call.{key} not set in the run dir, {value} in the config"
    ]
    assert stored(other).differences(without) == [
        f"generator 'tiny': call.{key} {value} in the run dir, not set in the config"
    ]


def test_a_dtm_rewrite_around_diffusers_resumes_with_a_call_argument_set_to_its_default(
    make_config: ConfigFactory, tiny_pipelines: dict[TinyKind, Path]
) -> None:
    # The wrapper passed its inner generator's fingerprint on but not what its fields left
    # out stand for: `inner.call.num_inference_steps not set in the run dir, 28 in the config`.
    from trig_stream.backends.registry import build_generator
    from trig_stream.manifest import Manifest
    from trig_stream.preflight import run_manifest

    def manifest(steps: int | None) -> Manifest:
        inner = {
            "backend": "diffusers",
            "options": {**tiny_options(tiny_pipelines["flux"], "flux"), "steps": steps},
        }
        options = {
            "inner": inner,
            "model": "rewriter",
            "base_url": "http://127.0.0.1:9/v1",
            "api_key_env": "",
            "relations": {"IQ-R_TA-C": 0},
        }
        entry = {"name": "tiny", "backend": "dtm_rewrite", "options": options}
        config = make_config(generators=[entry])
        generator = build_generator(config.generators[0], config)
        generator.check_environment()
        return run_manifest(config, [generator], {})

    without, explicit = manifest(None), manifest(28)
    assert "num_inference_steps" not in without.generators["tiny"]["inner"]["call"]
    assert Manifest.model_validate_json(without.model_dump_json()).differences(explicit) == []
    assert Manifest.model_validate_json(explicit.model_dump_json()).differences(without) == []
    assert Manifest.model_validate_json(without.model_dump_json()).differences(manifest(27)) == [
        "generator 'tiny': inner.call.num_inference_steps not set in the run dir, 27 in the config"
    ]


def request(data_id: str, seed: int, prompt: str = "a cat") -> GenerationRequest:
    sample = Sample(data_id=data_id, task="t2i", prompt=prompt, dimensions=("IQ-R", "TA-C"))
    return GenerationRequest("tiny", sample, seed)


def make_generator(path: Path, kind: TinyKind = "flux", **extra: Any) -> DiffusersGenerator:
    options = DiffusersOptions.model_validate(tiny_options(path, kind, **extra))
    return DiffusersGenerator("tiny", options, batch_size=4)


def test_a_batch_is_one_call_with_one_seeded_generator_per_prompt(
    tiny_pipelines: dict[TinyKind, Path],
) -> None:
    generator = make_generator(tiny_pipelines["flux"])
    generator.load()
    batch = [request("IQ-R_TA-C_1", 1), request("IQ-R_TA-C_2", 2), request("IQ-R_TA-C_3", 1)]
    images = generator.generate(batch, worker=0, cancel=threading.Event())
    generator.close()
    assert generator.calls == [3]
    assert all(isinstance(image, Image.Image) for image in images)
    pixels = [image.tobytes() for image in images if isinstance(image, Image.Image)]
    assert pixels[0] != pixels[1]  # different seeds
    assert pixels[0] == pixels[2]  # same seed and prompt: same picture, whatever the batch


@pytest.mark.parametrize("kind", ["sd", "instruct_pix2pix"])
def test_a_negative_prompt_goes_with_every_prompt_of_a_batch(
    tiny_pipelines: dict[TinyKind, Path], kind: TinyKind
) -> None:
    # Given as one text, it failed every call: the pipelines want it as the prompt is given,
    # a list, and the README documents the option.
    generator = make_generator(tiny_pipelines[kind], kind, negative_prompt="blurry")
    generator.load()
    batch = [request("IQ-R_TA-C_1", 1), request("IQ-R_TA-C_2", 2)]
    if kind == "instruct_pix2pix":
        source = _png(Image.new("RGB", (SIZE, SIZE), "green"))
        batch = [
            GenerationRequest(r.model, r.sample.model_copy(update={"source_bytes": source}), r.seed)
            for r in batch
        ]
    images = generator.generate(batch, worker=0, cancel=threading.Event())
    generator.close()
    assert all(isinstance(image, Image.Image) for image in images), images


@pytest.mark.parametrize("hidden", [True, False])
def test_loading_bar_follows_the_hubs_progress_bar_switch(
    tiny_pipelines: dict[TinyKind, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    hidden: bool,
) -> None:
    # `trig-stream run` sets HF_HUB_DISABLE_PROGRESS_BARS; diffusers' own bar ignores it.
    import huggingface_hub.constants
    from diffusers.utils import logging as diffusers_logging

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_PROGRESS_BARS", hidden)
    diffusers_logging.enable_progress_bar()
    try:
        generator = make_generator(tiny_pipelines["flux"])
        generator.load()
        generator.close()
    finally:
        diffusers_logging.enable_progress_bar()
    assert ("Loading pipeline components" in capsys.readouterr().err) is not hidden


def test_a_load_that_fails_on_one_device_keeps_none_of_the_others(
    tiny_pipelines: dict[TinyKind, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first device's pipeline must not stay in memory behind a failed load.
    generator = make_generator(tiny_pipelines["flux"], devices=["cpu", "cpu"])
    load_one = generator._load_one
    loaded: list[Any] = []

    def second_fails(*args: Any) -> Any:
        if loaded:
            raise FatalBackendError("the second device failed")
        loaded.append(load_one(*args))
        return loaded[0]

    monkeypatch.setattr(generator, "_load_one", second_fails)
    with pytest.raises(FatalBackendError, match="the second device failed"):
        generator.load()
    assert len(loaded) == 1 and generator._pipes == []


class CancelAtStep(DiffusersGenerator):
    """Asks the engine to cancel, from the step callback, during its ``at_call``-th call."""

    engine: Engine | None = None
    at_call = 2
    cancelled_at: tuple[int, int] | None = None

    def on_step(self, worker: int, step: int) -> None:
        if len(self.calls) == self.at_call and self.cancelled_at is None:
            self.cancelled_at = (len(self.calls), step)
            assert self.engine is not None
            anyio.from_thread.run_sync(self.engine.cancel)


@pytest.mark.anyio
async def test_cancel_mid_generation_then_resume_makes_only_the_missing_images(
    make_config: ConfigFactory, tiny_pipelines: dict[TinyKind, Path]
) -> None:
    config = make_config(
        samples=8,
        generators=[
            {
                "name": "tiny",
                "backend": "diffusers",
                "batch_size": 2,
                "options": tiny_options(tiny_pipelines["flux"], "flux"),
            }
        ],
    )
    options = DiffusersOptions.model_validate(config.generators[0].options)
    cancelling = CancelAtStep("tiny", options, batch_size=2)
    async with Engine(config, generators=[cancelling]) as engine:
        cancelling.engine = engine
        async for _ in engine.results:
            pass
    assert engine.stats().state == "cancelled"
    assert cancelling.cancelled_at == (2, 0)  # stopped after the first step of call 2
    kept = png_bytes(config, "tiny")
    assert len(kept) == 2  # the first call's images; the cancelled call wrote none

    _, resumed = await run_to_end(config)
    counts = resumed.stats().models["tiny"]
    assert counts.generated == 8 - len(kept)
    assert counts.reused + counts.skipped == len(kept)
    final = png_bytes(config, "tiny")
    assert len(final) == 8
    assert all(final[name] == raw for name, raw in kept.items())
    keys = [(r["data_id"], r["dimension"]) for r in journal(config)]
    assert len(keys) == len(set(keys)) == 16


def test_cancel_event_already_set_makes_nothing(tiny_pipelines: dict[TinyKind, Path]) -> None:
    generator = make_generator(tiny_pipelines["flux"])
    generator.load()
    cancel = threading.Event()
    cancel.set()
    outcomes = generator.generate([request("IQ-R_TA-C_1", 1)], worker=0, cancel=cancel)
    assert generator.calls == []
    assert isinstance(outcomes[0], ItemError) and str(outcomes[0]) == "cancelled"


def test_p2p_sample_without_source_fails_alone(tiny_pipelines: dict[TinyKind, Path]) -> None:
    generator = make_generator(tiny_pipelines["instruct_pix2pix"], "instruct_pix2pix")
    generator.load()
    good = Sample(
        data_id="IQ-R_TA-C_1",
        task="p2p",
        prompt="add snow",
        dimensions=("IQ-R", "TA-C"),
        source_bytes=_png(Image.new("RGB", (20, 20), "green")),
    )
    broken = good.model_copy(update={"data_id": "IQ-R_TA-C_2", "source_bytes": b"not a png"})
    missing = good.model_copy(update={"data_id": "IQ-R_TA-C_3", "source_bytes": None})
    requests = [GenerationRequest("tiny", s, 5) for s in (good, broken, missing)]
    outcomes = generator.generate(requests, worker=0, cancel=threading.Event())
    assert isinstance(outcomes[0], Image.Image) and outcomes[0].size == (SIZE, SIZE)
    assert isinstance(outcomes[1], ItemError) and "cannot decode" in str(outcomes[1])
    assert isinstance(outcomes[2], ItemError) and "no source image" in str(outcomes[2])
    assert generator.calls == [1]


def test_edit_sources_of_different_sizes_do_not_share_a_call(
    tiny_pipelines: dict[TinyKind, Path],
) -> None:
    # The edit pipeline resizes a call's sources to the first one's size: batched together,
    # the second picture would take the first one's shape. Each must come out as alone.
    generator = make_generator(
        tiny_pipelines["instruct_pix2pix"], "instruct_pix2pix", height=None, width=None
    )
    generator.load()
    samples = [
        Sample(
            data_id=f"IQ-R_TA-C_{n}",
            task="p2p",
            prompt="add snow",
            dimensions=("IQ-R", "TA-C"),
            source_bytes=_png(Image.new("RGB", size, colour)),
        )
        for n, (size, colour) in enumerate(
            [((48, 32), "green"), ((32, 40), "blue"), ((48, 32), "red")], start=1
        )
    ]
    requests = [GenerationRequest("tiny", sample, 5) for sample in samples]
    together = generator.generate(requests, worker=0, cancel=threading.Event())
    alone = [generator.generate([r], worker=0, cancel=threading.Event())[0] for r in requests]
    generator.close()
    assert generator.calls == [2, 1, 1, 1, 1]  # the two 48x32 sources shared a call
    pictures = [np.asarray(i, dtype=int) for i in [*together, *alone] if isinstance(i, Image.Image)]
    assert [p.shape[:2] for p in pictures] == [(32, 48), (40, 32), (32, 48)] * 2
    batched, single = pictures[:3], pictures[3:]
    assert np.array_equal(batched[1], single[1])  # a call of its own both times
    # Batched kernels round differently: at most one intensity level apart.
    assert all(np.abs(batched[i] - single[i]).max() <= 1 for i in (0, 2))


class FailingPipeline:
    """Stands in for a loaded pipeline whose call raises ``error``."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def __call__(self, **kwargs: Any) -> Any:
        raise self.error


def test_a_failed_call_fails_its_items_and_a_failed_device_stops_the_run(
    tiny_pipelines: dict[TinyKind, Path],
) -> None:
    import torch

    generator = make_generator(tiny_pipelines["flux"])
    generator.load()
    batch = [request("IQ-R_TA-C_1", 1), request("IQ-R_TA-C_2", 2)]
    generator._pipes[0] = FailingPipeline(RuntimeError("Expected all tensors on one device"))
    outcomes = generator.generate(batch, worker=0, cancel=threading.Event())
    assert [str(o) for o in outcomes] == ["RuntimeError: Expected all tensors on one device"] * 2
    # Not the caught error: its traceback would keep the failed call's tensors alive. Not
    # an ItemError either: the call failed, not its items (the engine stops a generator
    # whose first calls all fail so).
    assert all(type(o) is BackendError and o.__traceback__ is None for o in outcomes)
    generator._pipes[0] = FailingPipeline(torch.AcceleratorError("an illegal memory access"))
    with pytest.raises(FatalBackendError, match=r"the device failed.*illegal memory access"):
        generator.generate(batch, worker=0, cancel=threading.Event())


def test_close_frees_the_pipeline_without_waiting_for_the_garbage_collector(
    tiny_pipelines: dict[TinyKind, Path],
) -> None:
    import gc
    import weakref

    generator = make_generator(tiny_pipelines["flux"])
    generator.load()
    generator.generate([request("IQ-R_TA-C_1", 1)], worker=0, cancel=threading.Event())
    transformer = weakref.ref(generator._pipes[0].transformer)
    gc.disable()  # after a call, Flux's transformer sits in a reference cycle
    try:
        generator.close()
        assert transformer() is None
    finally:
        gc.enable()


def _png(image: Image.Image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_unavailable_device_is_fatal_and_says_what_to_set(
    tiny_pipelines: dict[TinyKind, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each message names the generator: with several, whose devices to fix was unsaid.
    generator = make_generator(tiny_pipelines["flux"], devices=["cuda:99"])
    with pytest.raises(
        FatalBackendError,
        match=r"^generator 'tiny': device 'cuda:99' is not available .*set options\.devices",
    ):
        generator.load()
    import torch

    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    generator = make_generator(tiny_pipelines["flux"], devices=["mps"])
    with pytest.raises(
        FatalBackendError,
        match=r"^generator 'tiny': device 'mps' is not available; set options\.devices .*"
        r"e\.g\. devices = \['cpu'\]$",
    ):
        generator.load()
    with pytest.raises(FatalBackendError, match=r"^generator 'tiny': device 'mps:0' is not"):
        make_generator(tiny_pipelines["flux"], devices=["mps:0"]).load()


def test_unknown_call_argument_is_fatal(tiny_pipelines: dict[TinyKind, Path]) -> None:
    generator = make_generator(tiny_pipelines["flux"], call={"no_such_argument": 1})
    with pytest.raises(FatalBackendError, match="no_such_argument"):
        generator.load()


def test_missing_offline_checkpoint_is_fatal(tmp_path: Path) -> None:
    options = DiffusersOptions(
        pipeline="FluxPipeline",
        checkpoint="nobody/no-such-checkpoint",
        devices=["cpu"],
        local_files_only=True,
    )
    with pytest.raises(FatalBackendError, match="offline"):
        DiffusersGenerator("x", options).load()


def test_two_devices_two_pipelines(tiny_pipelines: dict[TinyKind, Path]) -> None:
    generator = make_generator(tiny_pipelines["flux"], devices=["cpu", "cpu"])
    assert generator.workers == 4  # two per device: one call running, the next waiting
    generator.load()
    batch: Sequence[GenerationRequest] = [request("IQ-R_TA-C_1", 3)]
    first = generator.generate(batch, worker=0, cancel=threading.Event())[0]
    second = generator.generate(batch, worker=1, cancel=threading.Event())[0]
    assert isinstance(first, Image.Image) and isinstance(second, Image.Image)
    assert first.tobytes() == second.tobytes()
    assert generator._pipes[0] is not generator._pipes[1]


class SmallMemoryPipe:
    """The real pipeline, on a device whose memory holds at most ``fits`` prompts a call."""

    def __init__(self, pipe: Any, fits: int) -> None:
        self.pipe, self.fits = pipe, fits

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipe, name)

    def __call__(self, prompt: list[str], **kwargs: Any) -> Any:
        import torch

        if len(prompt) > self.fits:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.pipe(prompt=prompt, **kwargs)


def test_a_call_out_of_memory_is_made_again_in_halves_and_later_ones_kept_small(
    tiny_pipelines: dict[TinyKind, Path],
) -> None:
    generator = make_generator(tiny_pipelines["flux"])
    generator.load()
    batch = [request(f"IQ-R_TA-C_{n}", n) for n in range(1, 6)]
    alone = [generator.generate([r], worker=0, cancel=threading.Event())[0] for r in batch]
    generator._pipes = [SmallMemoryPipe(generator._pipes[0], fits=2)]
    generator.calls.clear()
    images = generator.generate(batch, worker=0, cancel=threading.Event())
    # 5 ran out of memory, then 3; the rest went in calls of at most 2.
    assert generator.calls == [5, 3, 2, 1, 2]
    assert all(isinstance(image, Image.Image) for image in images)
    assert [i.size for i in images] == [a.size for a in alone]  # type: ignore[union-attr]
    later = generator.generate(batch[:4], worker=1, cancel=threading.Event())
    assert generator.calls[5:] == [2, 2]  # no call tries more than fitted
    assert all(isinstance(image, Image.Image) for image in later)
    notes = generator.notes()
    assert "out of memory on cpu at 5 images per call; calls there take at most 3" in notes[0]
    assert "at 3 images per call; calls there take at most 2" in notes[1]
    generator._pipes = [SmallMemoryPipe(generator._pipes[0].pipe, fits=0)]
    (alone_too_big,) = generator.generate(batch[:1], worker=0, cancel=threading.Event())
    # The call's failure, not the item's: a model that never fits stops the run.
    assert isinstance(alone_too_big, BackendError) and not isinstance(alone_too_big, ItemError)
    assert "out of memory on cpu even for one image: OutOfMemoryError" in str(alone_too_big)
    generator.close()


def test_each_smaller_call_size_is_noted_once(
    tiny_pipelines: dict[TinyKind, Path], caplog: pytest.LogCaptureFixture
) -> None:
    # Both halves of a call of 4 ran out of memory at 2: "at 2 images per call" came twice,
    # and again for each later call that tried 2.
    generator = make_generator(tiny_pipelines["flux"])
    generator.load()
    generator._pipes = [SmallMemoryPipe(generator._pipes[0], fits=1)]
    batch = [request(f"IQ-R_TA-C_{n}", n) for n in range(1, 5)]
    with caplog.at_level("WARNING"):
        images = generator.generate(batch, worker=0, cancel=threading.Event())
    # Logged as every other message names a generator: quoted.
    assert "generator 'tiny': out of memory on cpu at 4 images per call" in caplog.text
    assert all(isinstance(image, Image.Image) for image in images)
    assert generator.calls == [4, 2, 1, 1, 1, 1]
    notes = generator.notes()
    assert len(notes) == 2, notes
    assert "at 4 images per call; calls there take at most 2" in notes[0]
    assert "at 2 images per call; calls there take at most 1" in notes[1]
    generator.close()


@pytest.mark.parametrize(
    ("batch_size", "failed"), [(4, [4, 2]), (8, [8, 4, 2])], ids=["batch-4", "batch-8"]
)
def test_out_of_memory_fails_one_call_per_halving_then_none(
    tiny_pipelines: dict[TinyKind, Path], batch_size: int, failed: list[int]
) -> None:
    # A device with room for one image a call: the second half of a halved call still went
    # at the size before the halving (batch 4: calls of 4 2 1 1 2 1 1), so the failed calls
    # went on after the size that fits was known.
    generator = make_generator(tiny_pipelines["flux"])
    generator.load()
    generator._pipes = [SmallMemoryPipe(generator._pipes[0], fits=1)]
    prompts = [request(f"IQ-R_TA-C_{n}", n) for n in range(1, 9)]
    for start in range(0, len(prompts), batch_size):
        images = generator.generate(
            prompts[start : start + batch_size], worker=0, cancel=threading.Event()
        )
        assert all(isinstance(image, Image.Image) for image in images)
    assert generator.calls[: len(failed)] == failed
    assert generator.calls[len(failed) :] == [1] * len(prompts)  # none failed after
    generator.close()


class OutOfMemoryAlways(DiffusersGenerator):
    """A model too large for its device: no call fits, however small."""

    def load(self) -> None:
        super().load()
        self._pipes = [SmallMemoryPipe(pipe, fits=0) for pipe in self._pipes]


@pytest.mark.anyio
async def test_a_model_that_never_fits_its_device_stops_the_run(
    make_config: ConfigFactory, tiny_pipelines: dict[TinyKind, Path]
) -> None:
    # Every image failed alone "out of memory even for one image": the whole dataset in
    # error judgements, and exit 0.
    from trig_stream.generation import FAILED_CALLS_TO_STOP

    options = DiffusersOptions.model_validate(tiny_options(tiny_pipelines["flux"], "flux"))
    generator = OutOfMemoryAlways("tiny", options, batch_size=2)
    config = make_config(samples=16)
    message = (
        f"generator 'tiny' has made no image yet and its first {FAILED_CALLS_TO_STOP} calls all "
        "failed (the last: out of memory on cpu even for one image: OutOfMemoryError"
    )
    with pytest.raises(FatalBackendError, match=re.escape(message)):
        await run_to_end(config, generators=[generator])


class HeldPipe:
    """A pipeline whose first call holds the device until the test lets it go."""

    def __init__(self) -> None:
        self.prompts: list[list[str]] = []
        self.running = threading.Event()
        self.release = threading.Event()

    def __call__(self, prompt: list[str], **kwargs: Any) -> SimpleNamespace:
        self.prompts.append(prompt)
        if len(self.prompts) == 1:
            self.running.set()
            assert self.release.wait(timeout=60)
        return SimpleNamespace(images=[Image.new("RGB", (8, 8)) for _ in prompt])


class WatchedLock:
    """A device lock that says when a call starts waiting for it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.waiting = threading.Event()

    def __enter__(self) -> None:
        if not self._lock.acquire(blocking=False):
            self.waiting.set()
            self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


@pytest.mark.parametrize("cancel_the_next", [False, True])
def test_the_next_call_waits_at_its_device_ready_to_start(
    tiny_pipelines: dict[TinyKind, Path], cancel_the_next: bool
) -> None:
    generator = make_generator(tiny_pipelines["flux"])
    assert generator.workers == 2  # one device: one call running, the next waiting
    pipe, lock = HeldPipe(), WatchedLock()
    generator._pipes = [pipe]
    generator._device_locks = [cast("threading.Lock", lock)]
    generator._accepts = frozenset({"prompt", "generator", "callback_on_step_end"})
    cancel = threading.Event()
    with ThreadPoolExecutor(2) as pool:
        one, two = [request("IQ-R_TA-C_1", 1, "one")], [request("IQ-R_TA-C_2", 2, "two")]
        first = pool.submit(generator.generate, one, worker=0, cancel=cancel)
        assert pipe.running.wait(timeout=60)
        second = pool.submit(generator.generate, two, worker=1, cancel=cancel)
        # The second call reached the device while the first ran, and did not start.
        assert lock.waiting.wait(timeout=60)
        assert len(pipe.prompts) == 1 and generator.calls == [1]
        if cancel_the_next:
            cancel.set()  # the first call is past its last step: it ends as it is
        pipe.release.set()
        made = first.result(), second.result()
    assert all(isinstance(image, Image.Image) for image in made[0])
    if cancel_the_next:
        # A cancelled run starts nothing new on the device: the waiting call gives up.
        assert [str(m) for m in made[1]] == ["cancelled"]
        assert pipe.prompts == [["one"]] and generator.calls == [1]
    else:
        assert all(isinstance(image, Image.Image) for image in made[1])
        assert pipe.prompts == [["one"], ["two"]] and generator.calls == [1, 1]


# -- isolation = "process": each device's pipeline in a child process ----------------------


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["flux", "instruct_pix2pix"])
async def test_process_isolation_makes_the_same_images_as_threads(
    kind: TinyKind, tiny_pipelines: dict[TinyKind, Path], tmp_path: Path
) -> None:
    from trig_stream.config import parse_config

    if kind == "instruct_pix2pix":  # source pictures cross to the child with their samples
        dataset, task = p2p_dataset(tmp_path, 4), "p2p"
    else:
        dataset, task = {"path": str(write_prompts(tmp_path / "t2i.json", 4))}, "t2i"
    images = {}
    for isolation in ("thread", "process"):
        options = tiny_options(tiny_pipelines[kind], kind, isolation=isolation)
        data = {
            "run": {"name": isolation, "output_dir": str(tmp_path / "runs"), "task": task},
            "dataset": dataset,
            "generators": [
                {"name": "tiny", "backend": "diffusers", "batch_size": 2, "options": options}
            ],
            "judges": [{"backend": "fake"}],
        }
        config = parse_config(data, source=tmp_path / "config.toml")
        results, engine = await run_to_end(config)
        assert {j.status for j in results} == {"ok"} and len(results) == 8
        assert engine.stats().models["tiny"].generated == 4
        images[isolation] = png_bytes(config, "tiny")
    assert len(images["process"]) == 4
    assert images["process"] == images["thread"]  # the same pictures, byte for byte


@pytest.mark.anyio
async def test_process_isolation_stores_pictures_of_other_modes_as_threads_do(
    make_config: ConfigFactory, tiny_pipelines: dict[TinyKind, Path]
) -> None:
    # A palette picture crossed from the child as its raw indices, its palette left behind:
    # it was stored black, and judged.
    images = {}
    for isolation in ("thread", "process"):
        options = tiny_options(
            tiny_pipelines["flux"],
            "flux",
            pipeline=f"{MISBEHAVING}:PicturesOfManyModes",
            isolation=isolation,
        )
        config = make_config(
            samples=5,
            generators=[
                {"name": "tiny", "backend": "diffusers", "batch_size": 5, "options": options}
            ],
            run={"name": isolation},
        )
        results, _ = await run_to_end(config)
        assert {j.error for j in results} == {None}
        images[isolation] = png_bytes(config, "tiny")
    assert len(images["process"]) == 5
    assert images["process"] == images["thread"]  # byte for byte
    # Not pictures gone black alike: the palette ones are stored with their palettes.
    stored = [Image.open(io.BytesIO(png)) for png in images["thread"].values()]
    palettes = [picture for picture in stored if picture.mode == "P"]
    assert len(palettes) >= 2 and {picture.mode for picture in stored} >= {"LA", "1"}
    for picture in palettes:
        assert picture.convert("RGB").getextrema() != ((0, 0), (0, 0), (0, 0))


@pytest.mark.anyio
@pytest.mark.parametrize("isolation", ["thread", "process"])
async def test_a_pipeline_whose_every_call_fails_stops_the_run(
    make_config: ConfigFactory, tiny_pipelines: dict[TinyKind, Path], isolation: str
) -> None:
    # A call argument the pipeline cannot use fails each call: the run stops after a few,
    # not after failing the whole dataset, in a child process as in a thread.
    from trig_stream.generation import FAILED_CALLS_TO_STOP

    options = tiny_options(tiny_pipelines["flux"], "flux", isolation=isolation)
    options["call"] = {**options["call"], "num_inference_steps": "2"}
    config = make_config(
        samples=12,
        generators=[{"name": "tiny", "backend": "diffusers", "options": options}],
    )
    message = (
        rf"generator 'tiny' has made no image yet and its first {FAILED_CALLS_TO_STOP} calls "
        r"all failed \(the last: TypeError: .*\); check its options"
    )
    with pytest.raises(FatalBackendError, match=message):
        await run_to_end(config)


class AnnouncingProcess(PipelineProcess):
    """Says when it has sent a message to its child."""

    sent: threading.Event

    def _send(self, message: tuple[str, Any]) -> None:
        super()._send(message)
        self.sent.set()


def start_process(path: Path, threads: int | None = None, **extra: Any) -> AnnouncingProcess:
    options = DiffusersOptions.model_validate(tiny_options(path, "flux", **extra))
    process = AnnouncingProcess("tiny", options, "cpu", batch_size=2, threads=threads)
    process.sent = threading.Event()
    process.wait_ready()
    return process


@pytest.mark.parametrize(
    ("parent", "children", "share"), [(16, 1, 16), (16, 8, 2), (16, 3, 5), (4, 8, 1)]
)
def test_pipeline_processes_share_out_the_threads(
    monkeypatch: pytest.MonkeyPatch, parent: int, children: int, share: int
) -> None:
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(get_num_threads=lambda: parent))
    assert thread_share(children) == share
    monkeypatch.delitem(sys.modules, "torch")  # a parent that never imported torch
    # ... and whose check of the pipeline's classes, in a child, found torch's count there
    # (its physical cores, say: fewer than the CPUs below, which count hyperthreads).
    assert thread_share(children, total=parent) == share
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(2 * parent)))
    assert thread_share(children, total=parent) == share
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(parent)))
    assert thread_share(children) == (None if children == 1 else share)


def test_the_torch_threads_set_in_this_process_win_over_the_checking_childs_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A program that set torch.set_num_threads(1) before a process-mode run (the G1 bench)
    # had its children compute with the checking child's count, torch's default: 10-20x
    # slower on a box shared with the engine.
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(get_num_threads=lambda: 1))
    assert thread_share(1, total=16) == 1
    assert thread_share(2, total=16) == 1


def test_pipeline_process_load_failure_is_fatal_with_the_childs_reason() -> None:
    options = DiffusersOptions(
        pipeline="FluxPipeline",
        checkpoint="nobody/no-such-checkpoint",
        devices=["cpu"],
        local_files_only=True,
        isolation="process",
    )
    generator = DiffusersGenerator("x", options)
    with pytest.raises(
        FatalBackendError,
        match=r"checkpoint 'nobody/no-such-checkpoint' is a hub id whose model_index\.json is "
        r"not in the Hugging Face cache",
    ):
        generator.load()


@pytest.mark.parametrize("isolation", ["thread", "process"])
def test_a_truncated_weights_file_is_named_as_such_for_its_generator(
    tiny_pipelines: dict[TinyKind, Path], tmp_path: Path, isolation: str
) -> None:
    # The error named no generator, and asked "is a component of the pipeline missing from
    # it?" of a weights file that was there, but cut short.
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_pipelines["sd"], truncated)
    (weights,) = (truncated / "unet").glob("*.safetensors")
    weights.write_bytes(weights.read_bytes()[:100])
    missing = tmp_path / "missing"
    shutil.copytree(tiny_pipelines["sd"], missing)
    for path in (missing / "text_encoder").glob("*.safetensors"):
        path.unlink()
    cases = [
        (truncated, "a weights file in it is incomplete or damaged"),
        (missing, "a local folder: is a component of the pipeline missing from it?"),
    ]
    for checkpoint, hint in cases:
        options = DiffusersOptions.model_validate(
            {**tiny_options(checkpoint, "sd"), "isolation": isolation}
        )
        generator = DiffusersGenerator("tiny", options)
        with pytest.raises(FatalBackendError) as failed:
            generator.load()
        message = str(failed.value)
        assert f"generator 'tiny': cannot load {str(checkpoint)!r} ({hint}" in message
        assert ("incomplete or damaged" in message) == (checkpoint == truncated)


@pytest.mark.parametrize("kind", list(PIPELINE_CLASSES))
def test_pictures_are_those_of_the_pipelines_own_pil_output(
    tiny_pipelines: dict[TinyKind, Path], kind: TinyKind, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The generator asks for a tensor and makes the pictures after the device's lock: they
    # must be, pixel for pixel, what the pipeline's own PIL conversion gives.
    import torch

    from trig_stream.backends.generators import diffusers_generator

    options = DiffusersOptions.model_validate(tiny_options(tiny_pipelines[kind], kind))
    generator = DiffusersGenerator("tiny", options, batch_size=2)
    generator.load()
    device_held: list[bool] = []
    pictures = diffusers_generator._pictures

    def noting_the_lock(pixels: Any) -> Any:
        device_held.append(generator._device_locks[0].locked())
        return pictures(pixels)

    monkeypatch.setattr(diffusers_generator, "_pictures", noting_the_lock)
    try:
        assert generator._output_type == "pt"
        source = Image.new("RGB", (SIZE, SIZE), (200, 60, 30))
        sources = [source, source] if kind == "instruct_pix2pix" else [None, None]
        samples = [
            Sample(
                data_id=f"IQ-R_TA-C_{n}",
                task="p2p" if kind == "instruct_pix2pix" else "t2i",
                prompt=f"a study of light {n}",
                dimensions=("IQ-R", "TA-C"),
            )
            for n in (1, 2)
        ]
        batch = [GenerationRequest("tiny", sample, 11 + n) for n, sample in enumerate(samples)]
        made = generator._call(0, batch, sources, threading.Event())
        kwargs = call_arguments(
            generator.spec, generator._accepts, generator._output_type, batch, sources
        )
        kwargs["output_type"] = "pil"
        kwargs["generator"] = [torch.Generator("cpu").manual_seed(r.seed) for r in batch]
        with torch.inference_mode():
            expected = generator._pipes[0](**kwargs).images
    finally:
        generator.close()
    assert device_held == [False]  # the next call could use the device meanwhile
    assert len(made) == 2
    for picture, wanted in zip(made, expected, strict=True):
        assert isinstance(picture, Image.Image) and picture.mode == wanted.mode == "RGB"
        assert picture.tobytes() == wanted.tobytes()


def test_a_checkpoint_folder_that_is_not_there_is_named(tmp_path: Path) -> None:
    # A folder not there "is not a folder", naming no key; the demo's, no way to make it.
    options = DiffusersOptions(
        pipeline="FluxPipeline",
        checkpoint=str(tmp_path / "flux"),
        devices=["cpu"],
        local_files_only=True,
    )
    with pytest.raises(FatalBackendError) as raised:
        DiffusersGenerator("x", options).load()
    assert str(raised.value) == (
        f"generator 'x': checkpoint {tmp_path / 'flux'} does not exist; set "
        "options.checkpoint to a diffusers pipeline folder or a hub id (one of the tiny "
        f"models? `trig-stream make-tiny-models {tmp_path}` builds them)"
    )
    (tmp_path / "mine").write_text("")  # no tiny model's name, and no folder
    mine = options.model_copy(update={"checkpoint": str(tmp_path / "mine")})
    with pytest.raises(FatalBackendError) as raised:
        DiffusersGenerator("x", mine).check_environment()
    assert str(raised.value) == (
        f"generator 'x': checkpoint {tmp_path / 'mine'} is not a folder; set "
        "options.checkpoint to a diffusers pipeline folder or a hub id"
    )
    (tmp_path / "flux").mkdir()  # there, but empty: refused by validate, before any load
    with pytest.raises(FatalBackendError, match=r"flux is no diffusers pipeline folder"):
        DiffusersGenerator("x", options).check_environment()


@pytest.mark.parametrize("checkpoint", ["$HOME/models/sd", "a/b/c", "models/my sd"])
def test_a_checkpoint_that_is_no_folder_nor_hub_id_is_refused_by_validate_as_by_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], checkpoint: str
) -> None:
    # Taken as a hub id, it passed validate; run then failed as diffusers refused it.
    from trig_stream.cli import main
    from trig_stream.exit_codes import EXIT_FATAL

    path = tmp_path / "run.toml"
    path.write_text(
        run_and_dataset_toml(tmp_path)
        + '[[generators]]\nname = "sd"\nbackend = "diffusers"\noptions = { pipeline = '
        f'"StableDiffusionPipeline", checkpoint = "{checkpoint}", devices = ["cpu"] }}\n'
        '[[judges]]\nbackend = "fake"\n'
    )
    errors = []
    for command in (["validate"], ["run", "--headless", "--no-report"]):
        assert main([*command, str(path)]) == EXIT_FATAL
        errors.append(capsys.readouterr().err)
    assert errors[0] == errors[1]
    assert errors[0] == (
        f"error: generator 'sd': checkpoint {checkpoint!r} is neither a local folder (write "
        "one as ./..., ../..., ~/... or an absolute path) nor a Hugging Face hub id ('name' "
        "or 'namespace/name' of letters, digits, '-', '_' and '.')\n"
    )


@pytest.mark.parametrize("offline", ["local_files_only", "HF_HUB_OFFLINE"])
def test_an_offline_hub_id_not_in_the_cache_is_refused_before_any_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offline: str
) -> None:
    # validate said ok; the load then found no model_index.json.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    if offline == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    options = DiffusersOptions(
        pipeline="StableDiffusionPipeline",
        checkpoint="nobody/no-such-checkpoint",
        devices=["cpu"],
        local_files_only=offline == "local_files_only",
        load={"cache_dir": str(tmp_path / "cache")},
    )
    with pytest.raises(
        FatalBackendError,
        match=UNCACHED_HUB_ID_REFUSED,
    ):
        DiffusersGenerator("x", options).check_environment()


@pytest.mark.parametrize(
    ("kind", "extra", "message"),
    [
        ("sd", {"pipeline": "NoSuchPipeline"}, "has no pipeline class 'NoSuchPipeline'"),
        ("sd", {"pipeline": "AutoencoderKL"}, "AutoencoderKL is not a diffusers pipeline"),
        (
            "sd",
            {"pipeline": "no_such_module:Pipeline"},
            r"^generator 'tiny': cannot import pipeline 'no_such_module:Pipeline': .*"
            r"check options\.pipeline",
        ),
        ("sd", {"scheduler": "NoSuchScheduler"}, "has no scheduler class 'NoSuchScheduler'"),
        ("sd", {"scheduler": "AutoencoderKL"}, "has no scheduler class 'AutoencoderKL'"),
        ("flux", {"call": {"bogus": 1}}, r"^generator 'tiny': FluxPipeline takes no argument"),
        # Another pipeline's folder: SD's for Flux.
        ("sd", {"pipeline": "FluxPipeline"}, r"has no text_encoder_2, .*FluxPipeline needs"),
        # ... whose components have the names this one takes, and other classes: it loaded,
        # then failed every call on a tensor's shape.
        (
            "flux",
            {"pipeline": "SanaPipeline"},
            r"flux holds FluxPipeline's components, not SanaPipeline's: its text_encoder is "
            r"CLIPTextModel \(SanaPipeline takes Gemma2PreTrainedModel\); its vae is "
            r"AutoencoderKL \(SanaPipeline takes AutoencoderDC\); .*check options\.pipeline",
        ),
        (
            "flux",
            {"pipeline": "PixArtSigmaPipeline"},
            r"its transformer is FluxTransformer2DModel \(PixArtSigmaPipeline takes "
            r"PixArtTransformer2DModel\)",
        ),
    ],
)
def test_validate_sees_what_the_pipeline_would_refuse_before_any_model_loads(
    tiny_pipelines: dict[TinyKind, Path], kind: TinyKind, extra: dict[str, Any], message: str
) -> None:
    # Each was refused only by the load, after the judge (minutes, for a 7B one) had loaded.
    generator = make_generator(tiny_pipelines[kind], kind, **extra)
    with pytest.raises(FatalBackendError, match=message):
        generator.check_environment()


def test_an_unknown_call_argument_a_pipeline_may_ignore_is_warned_about_naming_the_generator(
    tiny_pipelines: dict[TinyKind, Path], caplog: pytest.LogCaptureFixture
) -> None:
    # StableDiffusionPipeline takes **kwargs: the warning said "generator tiny:", where
    # every other check quotes the name.
    generator = make_generator(tiny_pipelines["sd"], "sd", call={"bogus": 1})
    with caplog.at_level("WARNING"):
        generator.check_environment()
    assert "generator 'tiny': StableDiffusionPipeline takes no argument(s) bogus" in caplog.text


@pytest.mark.parametrize("pipeline", [":", ":StableDiffusionPipeline", ".x:Y", "a..b:Y"])
def test_a_pipeline_name_importlib_refuses_is_named_as_the_options_fault(
    tiny_pipelines: dict[TinyKind, Path], pipeline: str
) -> None:
    # Options built around their check (model_construct): importlib's ValueError ("Empty
    # module name") read as a fault of the backend's code.
    valid = DiffusersOptions.model_validate(tiny_options(tiny_pipelines["sd"], "sd"))
    options = valid.model_copy(update={"pipeline": pipeline})
    with pytest.raises(
        FatalBackendError,
        match=rf"^generator 'tiny': cannot import pipeline {re.escape(repr(pipeline))}: .*"
        r"check options\.pipeline",
    ):
        DiffusersGenerator("tiny", options).check_environment()


class CancelAtFirstStep(DiffusersGenerator):
    """Sets the call's cancel event from the step callback, at the first step."""

    cancel: threading.Event
    steps: list[int]

    def on_step(self, worker: int, step: int) -> None:
        self.steps.append(step)
        self.cancel.set()


def test_diffusion_pipeline_is_checked_and_stopped_as_the_class_its_checkpoint_names(
    tiny_pipelines: dict[TinyKind, Path], caplog: pytest.LogCaptureFixture
) -> None:
    # DiffusionPipeline defines no __call__: its "call" was type.__call__'s (*args,
    # **kwargs). Every call argument was warned about as unknown, no step callback was
    # installed (a hard stop waited for whole calls), and no size was checked. It loads the
    # class its checkpoint's model_index.json names, and is seen as that class now.
    options = DiffusersOptions.model_validate(
        tiny_options(tiny_pipelines["sd"], "sd", pipeline="DiffusionPipeline", steps=4)
    )
    generator = CancelAtFirstStep("tiny", options, batch_size=2)
    generator.cancel, generator.steps = threading.Event(), []
    with caplog.at_level("WARNING"):
        generator.check_environment()
    assert "takes no argument" not in caplog.text
    assert "callback_on_step_end" in generator._accepts
    generator.load()
    try:
        made = generator.generate([request("IQ-R_TA-C_1", 1)], worker=0, cancel=generator.cancel)
    finally:
        generator.close()
    assert generator.steps == [0]  # stopped after its first step, not after all four
    assert [str(item) for item in made] == ["cancelled"]
    with pytest.raises(
        FatalBackendError,
        match=r"^generator 'tiny': height 36 is not a multiple of 8, as StableDiffusionPipeline",
    ):
        make_generator(
            tiny_pipelines["sd"], "sd", pipeline="DiffusionPipeline", height=36
        ).check_environment()


def test_a_subclass_given_as_module_class_is_checked_as_the_family_it_derives_from(
    tiny_pipelines: dict[TinyKind, Path],
) -> None:
    # Its size was checked by its own class name, which is of no family: a height of 72
    # passed, and the run made 64x64 pictures.
    generator = make_generator(
        tiny_pipelines["flux"], pipeline="tests.misbehaving_pipelines:LoadFails", height=72
    )
    with pytest.raises(
        FatalBackendError,
        match=r"^generator 'tiny': height 72 is not a multiple of 16, as FluxPipeline needs",
    ):
        generator.check_environment()


@pytest.mark.parametrize("pipeline", ["Kandinsky3Pipeline", "tests.kin:Kandinsky3Kin"])
def test_a_pipeline_of_no_size_family_is_not_sized_as_a_mixin_of_its_mro(pipeline: str) -> None:
    # The MRO search matched diffusers' mixins by name too: Kandinsky 3 (and ~40 others)
    # were refused as StableDiffusionLoraLoaderMixin's, a multiple of 8.
    import diffusers

    class Kandinsky3Kin(diffusers.Kandinsky3Pipeline):  # type: ignore[misc]
        pass

    options = {"pipeline": pipeline, "checkpoint": "org/model", "height": 1020, "width": 1024}
    spec = DiffusersOptions.model_validate(options).spec()
    kin = diffusers.Kandinsky3Pipeline if ":" not in pipeline else Kandinsky3Kin
    checked = check_classes("tiny", spec, diffusers, kin)
    assert "prompt" in checked.accepts


def test_a_pipeline_whose_call_hands_its_arguments_on_takes_its_parents(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A module:Class subclass whose __call__(self, *a, **k) hands everything to Flux's was
    # warned of as taking neither max_sequence_length nor the steps, which reached the
    # pipeline all the same; and its call defaults were not Flux's.
    import diffusers

    class Handing(diffusers.FluxPipeline):  # type: ignore[misc]
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return super().__call__(*args, **kwargs)

    options = {
        "pipeline": "tests.kin:Handing",
        "checkpoint": "org/model",
        "steps": 2,
        "call": {"max_sequence_length": 64},
    }
    spec = DiffusersOptions.model_validate(options).spec()
    with caplog.at_level("WARNING"):
        checked = check_classes("tiny", spec, diffusers, Handing)
    assert "takes no argument" not in caplog.text
    assert {"prompt", "num_inference_steps", "max_sequence_length"} <= checked.accepts
    flux = check_classes("tiny", spec, diffusers, diffusers.FluxPipeline)
    assert checked.defaults == flux.defaults


def test_diffusion_pipeline_whose_class_cannot_be_known_is_refused(
    tiny_pipelines: dict[TinyKind, Path], tmp_path: Path
) -> None:
    unknown = tmp_path / "unknown"
    shutil.copytree(tiny_pipelines["sd"], unknown)
    index = json.loads((unknown / "model_index.json").read_text())
    (unknown / "model_index.json").write_text(json.dumps({**index, "_class_name": "NoSuch"}))
    concrete = r"set options\.pipeline to the concrete class \(e\.g\. StableDiffusionPipeline\)$"
    with pytest.raises(
        FatalBackendError,
        match=r"^generator 'tiny': DiffusionPipeline loads the class .* names, 'NoSuch', .*"
        + concrete,
    ):
        make_generator(unknown, "sd", pipeline="DiffusionPipeline").check_environment()
    # A hub id, offline and not in the cache: refused before its class is looked for.
    options = uncached_hub_id(tmp_path, offline=True)
    with pytest.raises(
        FatalBackendError,
        match=UNCACHED_HUB_ID_REFUSED,
    ):
        DiffusersGenerator("x", options).check_environment()


def cached_diffusion_pipeline(
    tiny_pipelines: dict[TinyKind, Path], tmp_path: Path, *, local_files_only: bool
) -> DiffusersOptions:
    """Options naming ``DiffusionPipeline`` and a hub id whose model_index.json (the tiny SD
    pipeline's) is in a Hugging Face cache under ``tmp_path``."""
    snapshot = tmp_path / "cache" / "models--org--tiny-sd" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    shutil.copy(tiny_pipelines["sd"] / "model_index.json", snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    return DiffusersOptions(
        pipeline="DiffusionPipeline",
        checkpoint="org/tiny-sd",
        devices=["cpu"],
        local_files_only=local_files_only,
        steps=2,
        load={"cache_dir": str(tmp_path / "cache")},
    )


def test_diffusion_pipeline_of_a_cached_hub_checkpoint_is_its_saved_class(
    tiny_pipelines: dict[TinyKind, Path], tmp_path: Path
) -> None:
    # Offline, the model_index.json of a hub id is read from the Hugging Face cache.
    options = cached_diffusion_pipeline(tiny_pipelines, tmp_path, local_files_only=True)
    generator = DiffusersGenerator("x", options)
    generator.check_environment()
    assert "callback_on_step_end" in generator._accepts


def test_diffusion_pipeline_of_a_cached_hub_checkpoint_that_is_no_json_says_so(
    tiny_pipelines: dict[TinyKind, Path], tmp_path: Path
) -> None:
    # Offline, a cached model_index.json that is no JSON was said not to be in the cache.
    options = cached_diffusion_pipeline(tiny_pipelines, tmp_path, local_files_only=True)
    snapshot = tmp_path / "cache" / "models--org--tiny-sd" / "snapshots" / ("0" * 40)
    (snapshot / "model_index.json").write_text("{not json")
    with pytest.raises(
        FatalBackendError,
        match=r"^generator 'x': DiffusionPipeline loads .* cannot be read for 'org/tiny-sd': "
        r"OSError: It looks like the config file at .* is not a valid JSON file\.; set ",
    ):
        DiffusersGenerator("x", options).check_environment()


@pytest.fixture
def unreachable_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[str]:
    """No host name resolves (a machine without network): the hosts asked for, in order, as
    a command (a fresh process) asks them."""
    from huggingface_hub import constants
    from huggingface_hub.utils import _detect_agent

    asked: list[str] = []

    def getaddrinfo(host: str, *args: Any, **kwargs: Any) -> Any:
        asked.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # read once, as it is imported
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", False)
    # The User-Agent of huggingface_hub's first request to the hub in a process names the
    # agent running it, from a list it asks the hub for and keeps in memory (and for a day
    # on disk): forgotten, each test sees that request, not only the first to make one. A
    # test run alone saw a request to huggingface.co that the whole file hid.
    monkeypatch.setattr(_detect_agent, "_registry", None)
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(tmp_path / "agent_harnesses.json"))
    return asked


def test_diffusion_pipeline_of_a_hub_id_reads_the_cache_before_the_hub(
    tiny_pipelines: dict[TinyKind, Path], tmp_path: Path, unreachable_hub: list[str]
) -> None:
    # Online, a cached model_index.json was read only after a request to the hub; then,
    # read through huggingface_hub's download (local_files_only), still after one: a fresh
    # process's request for the agent list its User-Agent names.
    options = cached_diffusion_pipeline(tiny_pipelines, tmp_path, local_files_only=False)
    generator = DiffusersGenerator("x", options)
    generator.check_environment()
    assert "callback_on_step_end" in generator._accepts
    assert unreachable_hub == []


def test_diffusion_pipeline_of_a_hub_id_the_hub_cannot_serve_fails_at_once(
    tmp_path: Path, unreachable_hub: list[str]
) -> None:
    # Online, not cached, no network: huggingface_hub retried the hub five times (25 s),
    # then diffusers said the checkpoint "does not appear to have a file named
    # model_index.json". The hub is asked once for the file (after huggingface_hub's own
    # request for its agent list), and the message says it cannot be reached.
    options = uncached_hub_id(tmp_path, offline=False)
    with pytest.raises(
        FatalBackendError,
        match=r"^generator 'x': DiffusionPipeline loads .* cannot be read for "
        r"'nobody/no-such-checkpoint': the Hugging Face hub could not be reached, and it is "
        r"not in the cache \(ConnectError: .*\); set options\.pipeline to the concrete class",
    ):
        DiffusersGenerator("x", options).check_environment()
    assert unreachable_hub == ["huggingface.co"] * 2


def in_the_project(arguments: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``python ARGUMENTS`` run to its end in the project's folder with ``env``, its output read
    as text (a nonzero exit raises)."""
    return subprocess.run(
        [sys.executable, *arguments],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )


READ_CACHED_MODEL_INDEX = """
import json, socket, sys
from trig_stream.backends.library_logs import quiet_model_libraries
quiet_model_libraries()  # as the commands do, before a model library is imported
asked = []
def getaddrinfo(host, *args, **kwargs):
    asked.append(host)
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
socket.getaddrinfo = getaddrinfo
from huggingface_hub import hf_hub_download
hf_hub_download("org/tiny-sd", "model_index.json", cache_dir=sys.argv[1], local_files_only=True)
print(json.dumps(asked))
"""


def test_a_command_reads_a_hub_id_from_the_cache_without_asking_the_hub(
    tiny_pipelines: dict[TinyKind, Path], tmp_path: Path
) -> None:
    # huggingface_hub 2.x asked huggingface.co for its list of agents once per process, for
    # the User-Agent of a download it then served from the cache: `run` with
    # local_files_only reached the hub (validate no longer downloads at all).
    cached_diffusion_pipeline(tiny_pipelines, tmp_path, local_files_only=True)
    hub_switches = ("HF_HUB_OFFLINE", "HF_HUB_DISABLE_TELEMETRY", *QUIET_LIBRARIES)
    env = {k: v for k, v in os.environ.items() if k not in hub_switches}
    env["HF_HOME"] = str(tmp_path / "hf-home")  # no agent list kept on disk from before
    read = in_the_project(["-c", READ_CACHED_MODEL_INDEX, str(tmp_path / "cache")], env)
    assert json.loads(read.stdout.splitlines()[-1]) == []


def test_a_checkpoint_saved_by_another_pipeline_is_named_when_its_calls_fail(
    tiny_pipelines: dict[TinyKind, Path], caplog: pytest.LogCaptureFixture
) -> None:
    # Stable Diffusion on an InstructPix2Pix folder: the same components, one UNet taking 8
    # channels. Each call failed with "The size of tensor a (8) must match ... (4)", naming
    # nothing to fix. Pipelines of one family share folders, so it is no refusal.
    generator = make_generator(tiny_pipelines["instruct_pix2pix"], "sd", inputs="text")
    saved_by = (
        r"instruct_pix2pix was saved by StableDiffusionInstructPix2PixPipeline, not "
        r"StableDiffusionPipeline: if its calls fail, set options\.checkpoint to one saved for "
        r"StableDiffusionPipeline, or options\.pipeline to StableDiffusionInstructPix2PixPipeline"
    )
    with caplog.at_level("WARNING"):
        generator.check_environment()
    assert re.search(saved_by, caplog.text), caplog.text
    assert "generator 'tiny': checkpoint " in caplog.text
    generator.load()
    try:
        (outcome,) = generator.generate(
            [request("IQ-R_TA-C_1", 1)], worker=0, cancel=threading.Event()
        )
    finally:
        generator.close()
    assert isinstance(outcome, BackendError) and not isinstance(outcome, ItemError)
    assert "size of tensor" in str(outcome) and re.search(saved_by, str(outcome)), outcome
    assert "generator 'tiny': pipeline call failed: " in caplog.text
    # Its own pipeline, or one it was saved for, hears nothing of it.
    for kind in ("instruct_pix2pix", "sd", "flux"):
        generator = make_generator(tiny_pipelines[kind], kind)
        generator.check_environment()
        assert generator._saved_by is None


def test_component_classes_are_compared_as_the_pipeline_annotates_them() -> None:
    from typing import Optional, Union

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.schedulers import KarrasDiffusionSchedulers
    from transformers import CLIPTextModel, PreTrainedModel, T5EncoderModel

    from trig_stream.backends.generators.checkpoint_components import (
        components_of_other_classes,
    )

    def init(self: Any, **components: Any) -> None:
        pass

    annotations = {
        "vae": AutoencoderKL | None,
        "unet": Optional[UNet2DConditionModel],  # noqa: UP045 (older pipelines write so)
        "text_encoder": Union[CLIPTextModel, T5EncoderModel],  # noqa: UP007
        "image_encoder": PreTrainedModel,  # any of its subclasses
        "tokenizer": "CLIPTokenizer",  # a name that does not resolve: not compared
        "scheduler": KarrasDiffusionSchedulers,  # an enum, not a class of models
        "mean": list[float],
    }
    parameters = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    parameters += [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation)
        for name, annotation in annotations.items()
    ]
    init.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    takes = type("Takes", (), {"__init__": init})
    index = {
        "_class_name": "Takes",
        "vae": ["diffusers", "AutoencoderKL"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "T5EncoderModel"],
        "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
        "tokenizer": ["transformers", "T5Tokenizer"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "safety_checker": [None, None],
    }
    assert components_of_other_classes(index, takes, set()) == []
    other = {
        **index,
        "vae": ["diffusers", "AutoencoderDC"],
        "unet": ["diffusers", "FluxTransformer2DModel"],
        "text_encoder": ["transformers", "CLIPVisionModel"],
        "image_encoder": ["diffusers", "AutoencoderKL"],
        "tokenizer": ["transformers", "T5TokenizerFast"],
    }
    assert components_of_other_classes(other, takes, set()) == [
        ("vae", "AutoencoderDC", "AutoencoderKL"),
        ("unet", "FluxTransformer2DModel", "UNet2DConditionModel"),
        ("text_encoder", "CLIPVisionModel", "CLIPTextModel or T5EncoderModel"),
        ("image_encoder", "AutoencoderKL", "PreTrainedModel"),
    ]
    # Passed to from_pretrained in options.load, or of a module of the folder's own: unread.
    assert components_of_other_classes(other, takes, {"vae", "unet", "text_encoder"}) == [
        ("image_encoder", "AutoencoderKL", "PreTrainedModel")
    ]
    custom = {**index, "unet": ["my_unet", "MyUNet"], "vae": ["diffusers", "NoSuchClass"]}
    assert components_of_other_classes(custom, takes, set()) == []


@pytest.mark.parametrize(
    ("inputs", "unnamed"),
    [("edit", "image"), ("subject", "reference_image, source_subject_category, target_subject")],
)
def test_a_pipeline_that_would_drop_the_source_or_reference_picture_is_refused(
    tiny_pipelines: dict[TinyKind, Path], inputs: str, unnamed: str
) -> None:
    # StableDiffusionPipeline takes **kwargs: it swallowed image=, and drew from the prompt
    # alone, which was judged as an edit of the source (the run ended done, exit 0).
    generator = make_generator(tiny_pipelines["sd"], "sd", inputs=inputs)
    message = (
        rf"generator 'tiny': StableDiffusionPipeline's call has no {unnamed}.* argument, which "
        rf"inputs = '{inputs}' passes the .* set options\.pipeline to one whose call takes"
    )
    for check in (generator.check_environment, generator.load):
        with pytest.raises(FatalBackendError, match=message):
            check()
    assert generator._pipes == []
    make_generator(tiny_pipelines["instruct_pix2pix"], "instruct_pix2pix").check_environment()


def test_blip_diffusion_takes_the_negative_prompt_option_by_its_own_name() -> None:
    # Refused at validate ("BlipDiffusionPipeline takes no argument(s) negative_prompt", exit
    # 4), though the call passes it as BLIP-Diffusion's neg_prompt.
    options = DiffusersOptions.model_validate(
        {"preset": "blipdiffusion", "devices": ["cpu"], "negative_prompt": "blurry"}
    )
    generator = DiffusersGenerator("blip", options)
    generator.check_environment()  # the classes only: nothing is downloaded
    sample = Sample(
        data_id="IQ-R_TA-C_1",
        task="s2p",
        prompt="a dog on a beach",
        dimensions=("IQ-R", "TA-C"),
        item="dog",
        source_bytes=_png(Image.new("RGB", (16, 16), "brown")),
    )
    called = call_arguments(
        generator.spec,
        generator._accepts,
        generator._output_type,
        [GenerationRequest("blip", sample, 1)],
        [Image.new("RGB", (16, 16))],
    )
    assert called["neg_prompt"] == "blurry"
    assert "negative_prompt" not in called


def test_height_and_width_size_the_pictures_of_an_edit_preset_with_a_source_size(
    tiny_pipelines: dict[TinyKind, Path],
) -> None:
    # hqedit resizes its sources to 512 x 512: its pictures stayed so whatever height and
    # width said, while the fingerprint recorded them.
    options = DiffusersOptions.model_validate(
        {
            "preset": "hqedit",
            "checkpoint": str(tiny_pipelines["instruct_pix2pix"]),
            "devices": ["cpu"],
            "local_files_only": True,
            "steps": 2,
            "height": 32,
            "width": 48,
        }
    )
    generator = DiffusersGenerator("tiny", options)
    assert generator.fingerprint()["source_size"] is None
    generator.load()
    sample = Sample(
        data_id="IQ-R_TA-C_1",
        task="p2p",
        prompt="add snow",
        dimensions=("IQ-R", "TA-C"),
        source_bytes=_png(Image.new("RGB", (40, 40), "green")),
    )
    try:
        (made,) = generator.generate(
            [GenerationRequest("tiny", sample, 5)], worker=0, cancel=threading.Event()
        )
    finally:
        generator.close()
    assert isinstance(made, Image.Image) and made.size == (48, 32)


@pytest.mark.parametrize(
    "load", [{"local_files_only": True}, {"dtype": "float16"}, {"torch_dtype": "bfloat16"}]
)
def test_load_arguments_win_over_the_typed_options_when_loading(
    tiny_pipelines: dict[TinyKind, Path], load: dict[str, Any]
) -> None:
    # As the README says; from_pretrained got them twice: "got multiple values for keyword
    # argument".
    generator = make_generator(tiny_pipelines["sd"], "sd", load=load)
    dtype = load.get("dtype", load.get("torch_dtype", "float32"))
    assert generator.fingerprint()["dtype"] == [dtype]
    generator.load()
    try:
        assert str(generator._pipes[0].unet.dtype) == f"torch.{dtype}"
    finally:
        generator.close()


CHECK_IN_A_FRESH_PROCESS = """
import json, sys
from trig_stream.backends.generators.diffusers_generator import DiffusersGenerator
from trig_stream.backends.generators.diffusers_options import DiffusersOptions
from trig_stream.errors import FatalBackendError

outcomes = []
for options in json.loads(sys.argv[1]):
    generator = DiffusersGenerator("tiny", DiffusersOptions.model_validate(options))
    try:
        generator.check_environment()
        outcomes.append("ok")
    except FatalBackendError as exc:
        outcomes.append(str(exc))
imported = [name for name in ("diffusers", "torch") if name in sys.modules]
threads = generator._torch_threads  # the last one's, which passed the check
defaults = generator.call_defaults
print(json.dumps({"outcomes": outcomes, "imported": imported, "threads": threads,
                  "defaults": defaults}))
"""


CHECK_AND_TELL_ENVIRONMENT = """
import json, os, sys
from trig_stream.backends.generators.diffusers_generator import DiffusersGenerator
from trig_stream.backends.generators.diffusers_options import DiffusersOptions

options = DiffusersOptions.model_validate(json.loads(sys.argv[1]))
DiffusersGenerator("tiny", options).check_environment()
print(json.dumps(sorted(os.environ)))
"""


def toml_inline(value: Any) -> str:
    """``value`` (a table of strings, numbers, booleans, lists and tables) as TOML."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{key} = {toml_inline(v)}" for key, v in value.items()) + " }"
    return json.dumps(value)


def test_validate_quiets_the_model_libraries_as_run_does_and_embedding_leaves_them(
    tiny_pipelines: dict[TinyKind, Path], tmp_path: Path
) -> None:
    # Only `run` quieted them: `validate` printed transformers' advice ("CLIPImageProcessor
    # requires torchvision ...") while looking up FluxPipeline. An application embedding the
    # engine keeps its environment (and its libraries' logging) as it set them.
    env = {k: v for k, v in os.environ.items() if k not in QUIET_LIBRARIES}
    options = tiny_options(tiny_pipelines["flux"], "flux")
    checked = in_the_project(["-c", CHECK_AND_TELL_ENVIRONMENT, json.dumps(options)], env)
    assert not set(json.loads(checked.stdout.splitlines()[-1])) & set(QUIET_LIBRARIES)
    config = tmp_path / "run.toml"
    config.write_text(
        run_and_dataset_toml(tmp_path)
        + '[[generators]]\nname = "tiny"\nbackend = "diffusers"\n'
        + f"options = {toml_inline(options)}\n"
        + '[[judges]]\nbackend = "fake"\n'
    )
    validated = in_the_project(["-m", "trig_stream", "validate", str(config)], env)
    assert "[transformers]" not in validated.stderr, validated.stderr


# Five checks, each in a fresh process importing torch and diffusers: 74-173 s seen on a
# loaded 2-core machine, near the suite's 300 s; the child's own limit stays below this one.
@pytest.mark.timeout(600)
def test_with_process_isolation_the_check_imports_diffusers_in_a_child_alone(
    tiny_pipelines: dict[TinyKind, Path],
) -> None:
    # The engine's process imported diffusers, and torch with it, to check the classes:
    # seconds of CPU and ~430 MB kept for the whole run, where no pipeline runs. The same
    # checks are made in a child of their own, still before any judge loads.
    flux, sd = tiny_pipelines["flux"], tiny_pipelines["sd"]
    cases = [
        (
            tiny_options(flux, "flux", call={"bogus": 1}),
            r"FluxPipeline takes no argument\(s\) bogus",
        ),
        (tiny_options(sd, "sd", pipeline="FluxPipeline"), r"has no text_encoder_2, .*FluxPipeline"),
        (
            tiny_options(sd, "sd", pipeline="DiffusionPipeline", height=36),
            r"height 36 is not a multiple of 8, as StableDiffusionPipeline needs",
        ),
        (tiny_options(sd, "sd", pipeline="DiffusionPipeline"), "ok"),
        (tiny_options(flux, "flux"), "ok"),
    ]
    options = [{**case, "isolation": "process"} for case, _ in cases]
    checked = subprocess.run(
        [sys.executable, "-c", CHECK_IN_A_FRESH_PROCESS, json.dumps(options)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=540,
        check=True,
    )
    found = json.loads(checked.stdout.splitlines()[-1])
    assert found["imported"] == []
    for outcome, (_, expected) in zip(found["outcomes"], cases, strict=True):
        assert re.search(expected, outcome), outcome
    # What its torch would have shared out among the pipeline children: this one's count.
    import torch

    assert found["threads"] == torch.get_num_threads()
    # And the call's defaults, which a resume compares an argument left out with.
    assert found["defaults"]["num_inference_steps"] == 28
    assert found["defaults"]["guidance_scale"] == 3.5


CHECK_WITHOUT_A_LIBRARY = """
import json, sys
from trig_stream.backends.generators.diffusers_generator import DiffusersGenerator
from trig_stream.backends.generators.diffusers_options import DiffusersOptions
from trig_stream.errors import TrigStreamError

outcomes = []
for options in json.loads(sys.argv[1]):
    try:
        DiffusersGenerator("tiny", DiffusersOptions.model_validate(options)).check_environment()
        outcomes.append("ok")
    except TrigStreamError as exc:
        outcomes.append(str(exc))
print(json.dumps(outcomes))
"""


def test_a_pipeline_class_without_transformers_names_it(
    tiny_pipelines: dict[TinyKind, Path], tmp_path: Path
) -> None:
    # Without transformers (or torch), diffusers exports placeholders for the pipelines that
    # need it, and the check called FluxPipeline "not a diffusers pipeline (a
    # DiffusionPipeline); check options.pipeline", in this process and in a check's child.
    hidden = tmp_path / "site"
    hidden.mkdir()
    # Read by every Python started with it on the path, the check's spawned child included.
    (hidden / "sitecustomize.py").write_text("import sys\nsys.modules['transformers'] = None\n")
    options = tiny_options(tiny_pipelines["flux"], "flux")
    cases = [options, {**options, "isolation": "process"}]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hidden), str(ROOT)])}
    checked = in_the_project(["-c", CHECK_WITHOUT_A_LIBRARY, json.dumps(cases)], env)
    missing = (
        "transformers is not installed; install it with: pip install 'trig-stream[diffusers]' "
        "(without a GPU, install torch's CPU build first, as PyPI's is a multi-GB CUDA one: "
        "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu)"
    )
    assert json.loads(checked.stdout.splitlines()[-1]) == [missing, missing]


def test_a_placeholder_of_a_library_installed_is_no_missing_extra(
    tiny_pipelines: dict[TinyKind, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # diffusers also leaves placeholders where it refuses a library's version: saying it is
    # not installed would be false, and calling the class no pipeline sends the user to the
    # wrong option.
    import diffusers
    from diffusers.utils import DummyObject

    # As diffusers makes them (untyped: built by calling its metaclass).
    placeholder = DummyObject("FluxPipeline", (), {"_backends": ["torch", "transformers"]})
    monkeypatch.setattr(diffusers, "FluxPipeline", placeholder)
    generator = make_generator(tiny_pipelines["flux"], "flux")
    with pytest.raises(FatalBackendError, match=r"cannot use FluxPipeline here: it needs torch, "):
        generator.check_environment()


def test_a_stop_kills_the_child_checking_the_pipeline_classes(
    tiny_pipelines: dict[TinyKind, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The check's child imported diffusers and torch for seconds after the run stopped
    # (12 s on a small machine), and the stop waited for it.
    options = DiffusersOptions.model_validate(
        {**tiny_options(tiny_pipelines["sd"], "sd"), "isolation": "process"}
    )
    generator = DiffusersGenerator("tiny", options, workers=1)
    started = threading.Event()
    start = pipeline_process._start_in_own_session

    def start_then_say_so(process: Any) -> None:
        start(process)
        started.set()

    monkeypatch.setattr(pipeline_check, "_start_in_own_session", start_then_say_so)
    with ThreadPoolExecutor(1) as pool:
        check = pool.submit(generator.check_environment)
        assert started.wait(60)
        generator.stop_loading()
        with pytest.raises(FatalBackendError, match=r"checking its pipeline classes .*SIGKILL"):
            check.result(timeout=60)


@pytest.mark.parametrize(
    ("body", "raised"),
    [
        ("import sys\nsys.exit(3)\n", "SystemExit: 3"),
        ("raise KeyboardInterrupt\n", "KeyboardInterrupt"),
    ],
)
def test_a_pipeline_module_that_ends_the_checking_child_is_named_with_what_it_raised(
    tiny_pipelines: dict[TinyKind, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    body: str,
    raised: str,
) -> None:
    # A pipeline module's sys.exit(3) ended the check's child without a word, and the error
    # said "exited before it answered (exit code 3); its output above says why": above, there
    # was nothing.
    (tmp_path / "ends_the_check.py").write_text(body)
    monkeypatch.syspath_prepend(tmp_path)  # a spawned child is given this sys.path
    options = DiffusersOptions.model_validate(
        {
            **tiny_options(tiny_pipelines["sd"], "sd", pipeline="ends_the_check:X"),
            "isolation": "process",
        }
    )
    with pytest.raises(FatalBackendError) as failed:
        pipeline_check.check_in_child("tiny", options)
    message = str(failed.value)
    assert f"generator 'tiny': checking its pipeline classes failed: it raised {raised}" in message
    assert "output above" not in message


@pytest.mark.anyio
async def test_with_process_isolation_a_wrong_call_argument_stops_the_run_before_the_judge_opens(
    make_config: ConfigFactory, tiny_pipelines: dict[TinyKind, Path]
) -> None:
    from trig_stream.testing import FakeJudge
    from trig_stream.testing.fake_judge import FakeJudgeOptions

    class OpensOnce(FakeJudge):
        opened = False

        async def open(self) -> None:
            self.opened = True

    options = tiny_options(tiny_pipelines["flux"], "flux", call={"bogus": 1}, isolation="process")
    config = make_config(
        samples=1, generators=[{"name": "tiny", "backend": "diffusers", "options": options}]
    )
    judge = OpensOnce("trigscore", FakeJudgeOptions())
    with pytest.raises(FatalBackendError, match=r"FluxPipeline takes no argument\(s\) bogus"):
        await run_to_end(config, judges=[judge])
    assert not judge.opened and not config.run_dir.exists()


def test_a_model_index_that_is_no_json_is_named(
    tiny_pipelines: dict[TinyKind, Path], tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_pipelines["sd"], broken)
    (broken / "model_index.json").write_text("{not json")
    with pytest.raises(FatalBackendError, match=r"cannot read .*broken/model_index\.json"):
        make_generator(broken, "sd").check_environment()


def test_a_pipeline_folder_missing_a_component_says_so(
    tiny_pipelines: dict[TinyKind, Path], tmp_path: Path
) -> None:
    # The message spoke of the Hugging Face cache, for a local folder, then of a config.json;
    # it names the folder now, and validate sees it before any model loads.
    half = tmp_path / "half"
    shutil.copytree(tiny_pipelines["sd"], half)
    shutil.rmtree(half / "unet")
    generator = make_generator(half, "sd")
    for call in (generator.check_environment, generator.load):
        with pytest.raises(FatalBackendError, match=r"half lacks the folder\(s\) unet/ its"):
            call()


def test_a_pipeline_process_serves_pixels_obeys_cancel_and_dies_loudly(
    tiny_pipelines: dict[TinyKind, Path], capfd: pytest.CaptureFixture[str]
) -> None:
    import os
    import signal
    from concurrent.futures import ThreadPoolExecutor

    # One child for the whole story: starting one imports torch and diffusers (~6 s here).
    # Enough steps that a call takes far longer than the cancel event takes to arrive.
    import torch

    # As many threads as this process: the same arithmetic, the same pictures.
    threads = torch.get_num_threads()
    process = start_process(tiny_pipelines["flux"], threads=threads, steps=400)
    assert process.threads == threads  # the share it was given, as the child reports it
    # The child writes to the terminal itself, past the dashboard: no loading bar there.
    assert "Loading pipeline components" not in capfd.readouterr().err
    try:
        batch = [request("IQ-R_TA-C_1", 1), request("IQ-R_TA-C_2", 2)]
        made, calls = process.generate(batch, threading.Event())
        assert calls == [2]
        threaded = make_generator(tiny_pipelines["flux"], steps=400)
        threaded.load()
        expected = threaded.generate(batch, worker=0, cancel=threading.Event())
        # The child sends pixels; the engine's writer encodes them (see pipeline_process).
        pictures = [m for m in made if isinstance(m, TimedPicture)]
        assert len(pictures) == 2 and all(m.seconds > 0 for m in pictures)
        assert [(m.image.mode, m.image.size, m.image.tobytes()) for m in pictures] == [
            (image.mode, image.size, image.tobytes())
            for image in expected
            if isinstance(image, Image.Image)
        ]

        cancel = threading.Event()
        cancel.set()
        made, calls = process.generate(batch[:1], cancel)
        assert calls == [] and [str(m) for m in made] == ["cancelled"]

        cancel = threading.Event()
        process.sent.clear()
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(process.generate, batch[:1], cancel)
            # The request is on its way: the event now arrives mid-call.
            assert process.sent.wait(timeout=120)
            cancel.set()
            made, calls = running.result()
        assert calls == [1]  # the call started, then stopped between two steps
        assert [str(m) for m in made] == ["cancelled"]

        assert process.pid is not None
        os.kill(process.pid, signal.SIGKILL)
        died = (
            r"pipeline process for cpu was killed \(SIGKILL\), perhaps by the kernel's "
            "out-of-memory killer"
        )
        with pytest.raises(FatalBackendError, match=died):
            process.generate(batch, threading.Event())
    finally:
        process.stop()


MISBEHAVING = "tests.misbehaving_pipelines"
"""The module of the pipelines that misbehave on purpose, as a child imports it."""


class Announcements:
    """The lines the pipelines of tests/misbehaving_pipelines.py write on a FIFO."""

    def __init__(self, path: Path) -> None:
        os.mkfifo(path)
        # Opened for writing too, so it never reads as ended while no child has it open.
        self._fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
        self._buffer = b""

    def next(self, timeout: float = 120.0) -> str:
        """The next line; TimeoutError if none comes within ``timeout`` (a safety net)."""
        while b"\n" not in self._buffer:
            readable, _, _ = select.select([self._fd], [], [], timeout)
            if not readable:
                raise TimeoutError(f"no announcement within {timeout} s")
            self._buffer += os.read(self._fd, 4096)
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()

    def close(self) -> None:
        os.close(self._fd)


@pytest.fixture
def announcements(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Announcements]:
    from tests.misbehaving_pipelines import ANNOUNCE

    path = tmp_path / "announcements"
    monkeypatch.setenv(ANNOUNCE, str(path))  # children inherit the environment
    fifo = Announcements(path)
    yield fifo
    fifo.close()


def misbehaving_options(path: Path, pipeline: str, **extra: Any) -> DiffusersOptions:
    options = tiny_options(path, "flux", pipeline=f"{MISBEHAVING}:{pipeline}", **extra)
    return DiffusersOptions.model_validate(options)


def kill_quietly(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


ENGINE_PROCESS = """
import sys
from trig_stream.backends.generators.diffusers_options import DiffusersOptions
from trig_stream.backends.generators.pipeline_process import PipelineProcess

options = DiffusersOptions.model_validate_json(sys.argv[1])
PipelineProcess("tiny", options, "cpu", batch_size=1).wait_ready()
"""


def test_a_pipeline_process_ends_with_the_engines_process(
    tiny_pipelines: dict[TinyKind, Path], announcements: Announcements
) -> None:
    # A hard stop exits through os._exit, and a killed engine not even so: the child, here
    # in a load that never ends, lived on (an orphan holding the device's memory while the
    # run resumed), and printed onto the terminal after the command had ended.
    options = misbehaving_options(tiny_pipelines["flux"], "LoadBlocks")
    # Its output is a pipe that the child and multiprocessing's resource tracker inherit: it
    # ends once they are all gone.
    engine = subprocess.Popen(
        [sys.executable, "-c", ENGINE_PROCESS, options.model_dump_json()],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert engine.stdout is not None
    child: int | None = None
    pool = ThreadPoolExecutor(1)
    try:
        what, pid = announcements.next().split()
        assert what == "loading"
        child = int(pid)
        engine.kill()
        # The end of the output: the child has exited (it never closes it otherwise).
        output = pool.submit(engine.stdout.read).result(timeout=60)
    finally:
        engine.kill()
        if child is not None:
            kill_quietly(child)  # the test failed: it must not outlive the test either
        pool.shutdown()
        engine.wait(timeout=60)
        engine.stdout.close()
    # Nothing onto the terminal after it (a multiprocessing Event's semaphore was reported
    # leaked; the child's late "ready" met a broken pipe).
    assert b"leaked" not in output and b"Traceback" not in output, output.decode()


HARD_STOP_AFTER_A_CALL = """
import os, sys, threading
from trig_stream.backends.base import GenerationRequest
from trig_stream.backends.generators.diffusers_options import DiffusersOptions
from trig_stream.backends.generators.pipeline_process import PipelineProcess
from trig_stream.records import Sample

options = DiffusersOptions.model_validate_json(sys.argv[1])
process = PipelineProcess("tiny", options, "cpu", batch_size=1)
process.wait_ready()
sample = Sample(data_id="IQ-R_TA-C_1", task="t2i", prompt="a cat", dimensions=("IQ-R", "TA-C"))
made, _ = process.generate([GenerationRequest("tiny", sample, 1)], threading.Event())
print("made", type(made[0]).__name__, flush=True)
os._exit(0)  # a hard stop: the child, on its lifeline, ends so too
"""


def test_a_hard_stop_leaves_no_semaphore_of_a_pipeline_process_behind(
    tiny_pipelines: dict[TinyKind, Path],
) -> None:
    # The child's first progress bar (loading weights, a call's, shown or not) made tqdm
    # create a lock for several processes: a named semaphore, which only an orderly exit
    # unlinks. After a hard stop, multiprocessing's resource tracker printed "There appear to
    # be 1 leaked semaphore objects" onto the terminal.
    options = DiffusersOptions.model_validate(tiny_options(tiny_pipelines["flux"], "flux"))
    # The tracker and the child inherit the output: it ends once they have both exited.
    engine = subprocess.Popen(
        [sys.executable, "-c", HARD_STOP_AFTER_A_CALL, options.model_dump_json()],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert engine.stdout is not None
    pool = ThreadPoolExecutor(1)
    try:
        output = pool.submit(engine.stdout.read).result(timeout=300).decode()
    finally:
        engine.kill()
        pool.shutdown()
        engine.wait(timeout=60)
        engine.stdout.close()
    assert "made TimedPicture" in output, output
    assert "leaked" not in output, output


def test_a_pipeline_process_still_loading_is_killed_at_once_when_stopped(
    tiny_pipelines: dict[TinyKind, Path],
    announcements: Announcements,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Another device's load failed, or the run ends: the child was asked to close, which it
    # reads only once loaded (minutes, for large weights), then waited for.
    from trig_stream.backends.generators import pipeline_process

    monkeypatch.setattr(pipeline_process, "STOP_TIMEOUT_S", 600.0)
    options = misbehaving_options(tiny_pipelines["flux"], "LoadBlocks")
    process = PipelineProcess("tiny", options, "cpu", batch_size=1)
    pool = ThreadPoolExecutor(1)
    try:
        assert announcements.next().startswith("loading ")
        pool.submit(process.stop).result(timeout=60)
        assert process._process.exitcode == -signal.SIGKILL
    finally:
        process._process.kill()  # the test failed: it must not outlive the test
        pool.shutdown()
        process.stop()


@pytest.mark.anyio
@pytest.mark.parametrize(("stop", "state"), [("cancel", "cancelled"), ("stop", "stopped")])
async def test_a_stop_kills_a_pipeline_process_still_loading_at_once(
    make_config: ConfigFactory,
    tiny_pipelines: dict[TinyKind, Path],
    announcements: Announcements,
    stop: str,
    state: str,
) -> None:
    # The run did not wait for the load, but its child went on loading to the end (minutes
    # for large weights, holding the device's memory), and was only then closed.
    options = tiny_options(
        tiny_pipelines["flux"], "flux", pipeline=f"{MISBEHAVING}:LoadBlocks", isolation="process"
    )
    config = make_config(
        samples=2, generators=[{"name": "tiny", "backend": "diffusers", "options": options}]
    )
    child: int | None = None
    try:
        async with Engine(config) as engine:
            what, pid = (await anyio.to_thread.run_sync(announcements.next)).split()
            assert what == "loading"
            child = int(pid)
            ended = os.pidfd_open(child)  # readable once the child has exited
            getattr(engine, stop)()
            summary = await engine.drain()
        assert summary.state == state and summary.judged == 0
        exited, _, _ = await anyio.to_thread.run_sync(select.select, [ended], [], [], 60.0)
        os.close(ended)
        assert exited, "the pipeline process went on loading after the stop"
    finally:
        if child is not None:
            kill_quietly(child)  # the test failed: it must not outlive the test


def test_a_cancelled_call_that_does_not_end_ends_its_pipeline_process(
    tiny_pipelines: dict[TinyKind, Path],
    announcements: Announcements,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A hard stop does not wait for a pipeline that ignores its step callback, or hangs: the
    # call's thread is left to end, and it waited for its answer forever, the child with it.
    from trig_stream.backends.generators import pipeline_process

    monkeypatch.setattr(pipeline_process, "CANCEL_GRACE_S", 0.2)
    process = start_process(tiny_pipelines["flux"], pipeline=f"{MISBEHAVING}:CallBlocks")
    pool = ThreadPoolExecutor(1)
    try:
        cancel = threading.Event()
        running = pool.submit(process.generate, [request("IQ-R_TA-C_1", 1)], cancel)
        assert announcements.next().startswith("calling ")
        cancel.set()
        made, calls = running.result(timeout=60)
        assert [str(m) for m in made] == ["cancelled"] and calls == []
        assert process._process.exitcode == -signal.SIGKILL
    finally:
        process._process.kill()  # the test failed: it must not outlive the test
        pool.shutdown()
        process.stop()


def test_a_pipeline_process_is_out_of_reach_of_the_runs_signals_from_its_start(
    tiny_pipelines: dict[TinyKind, Path],
) -> None:
    # A terminal's Ctrl-C reaches the run's whole process group. The child ignored it only
    # once its code ran, after spawn had imported modules for a second or more: a Ctrl-C
    # then killed it, and turned the engine's graceful stop into a fatal error.
    options = DiffusersOptions.model_validate(tiny_options(tiny_pipelines["flux"], "flux"))
    process = PipelineProcess("tiny", options, "cpu", batch_size=1)
    pid = process.pid
    assert pid is not None
    pool = ThreadPoolExecutor(1)
    try:
        loading = pool.submit(process.wait_ready)
        give_up_at = time.monotonic() + 120
        while True:
            os.kill(pid, signal.SIGINT)  # from its start until it is ready, and after
            try:
                loading.result(timeout=0.005)
                break
            except TimeoutError:
                assert time.monotonic() < give_up_at, "the child never got ready"
        os.kill(pid, signal.SIGINT)
        made, _ = process.generate([request("IQ-R_TA-C_1", 1)], threading.Event())
        assert isinstance(made[0], TimedPicture)
        # In a session of its own: what is sent to the run's group does not reach it.
        assert os.getsid(pid) == os.getpgid(pid) == pid != os.getpgid(0)
    finally:
        process.stop()
        pool.shutdown()


def test_a_pipeline_child_hears_sigterm_though_the_run_was_started_ignoring_it() -> None:
    # An ignored signal is inherited: a run started ignoring SIGTERM left its pipeline and
    # check children ignoring it too. SIGINT stays ignored there (the engine ends them), and
    # SIGHUP as it was (under nohup, ignored).
    code = (
        "import signal\n"
        "from trig_stream.backends.generators.pipeline_child import _leave_the_run_group\n"
        "_leave_the_run_group()\n"
        "stops = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)\n"
        "print([signal.getsignal(s).name for s in stops])\n"
    )

    def ignore_all() -> None:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)

    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        preexec_fn=ignore_all,
        timeout=60,
        check=True,
    )
    assert done.stdout.strip() == "['SIG_IGN', 'SIG_DFL', 'SIG_IGN']", done.stdout


@pytest.mark.parametrize(
    ("pipeline", "message", "printed"),
    [
        (
            "LoadFails",
            r"^generator 'tiny' failed to load on cpu: RuntimeError: weights are corrupt$",
            "",
        ),
        (
            "LoadCrashes",
            r"^generator 'tiny': the pipeline process for cpu crashed while loading its pipeline "
            r"\(SIGSEGV\); the stack it printed above shows where$",
            "Fatal Python error: Segmentation fault",
        ),
    ],
)
def test_a_pipeline_process_that_cannot_load_says_whose_load_failed_and_how(
    tiny_pipelines: dict[TinyKind, Path],
    capfd: pytest.CaptureFixture[str],
    pipeline: str,
    message: str,
    printed: str,
) -> None:
    # In a thread the message named the generator; from a child it was the error alone
    # ("error: RuntimeError: weights are corrupt"), and a crash left an exit code, -11.
    options = misbehaving_options(tiny_pipelines["flux"], pipeline, isolation="process")
    generator = DiffusersGenerator("tiny", options)
    with pytest.raises(FatalBackendError, match=message):
        generator.load()
    assert printed in capfd.readouterr().err


def test_a_pipeline_process_that_crashes_mid_call_says_so_and_where(
    tiny_pipelines: dict[TinyKind, Path], capfd: pytest.CaptureFixture[str]
) -> None:
    process = start_process(tiny_pipelines["flux"], pipeline=f"{MISBEHAVING}:CallCrashes")
    try:
        crashed = r"the pipeline process for cpu crashed \(SIGSEGV\); the stack it printed above"
        with pytest.raises(FatalBackendError, match=crashed):
            process.generate([request("IQ-R_TA-C_1", 1)], threading.Event())
    finally:
        process.stop()
    printed = capfd.readouterr().err
    assert "Fatal Python error: Segmentation fault" in printed
    assert "misbehaving_pipelines.py" in printed  # the stack, down to the crash


@pytest.mark.anyio
@pytest.mark.parametrize("isolation", ["thread", "process"])
async def test_a_call_that_raises_fails_its_items_in_a_child_process_as_in_a_thread(
    make_config: ConfigFactory,
    tiny_pipelines: dict[TinyKind, Path],
    monkeypatch: pytest.MonkeyPatch,
    isolation: str,
) -> None:
    # After a good call the pipeline returns float arrays, and the generator's call raises:
    # in a thread each of its items failed, and the run went on; the child crashed, and the
    # run ended as "exited (exit code 1)".
    from tests.misbehaving_pipelines import FloatPicturesAfterOneCall

    monkeypatch.setattr(FloatPicturesAfterOneCall, "calls", 0)  # the thread's, in this process
    options = tiny_options(
        tiny_pipelines["flux"],
        "flux",
        pipeline=f"{MISBEHAVING}:FloatPicturesAfterOneCall",
        isolation=isolation,
    )
    config = make_config(
        samples=6,
        generators=[{"name": "tiny", "backend": "diffusers", "batch_size": 2, "options": options}],
    )
    results, _ = await run_to_end(config)
    assert len(results) == 12
    failures = {j.error for j in results if j.status == "error"}
    assert failures == {"generate failed: TypeError: Cannot handle this data type: (1, 1, 3), <f4"}
    assert any(j.status == "ok" for j in results)


@pytest.mark.anyio
@pytest.mark.parametrize("isolation", ["thread", "process"])
async def test_a_generator_returning_no_pictures_is_broken_in_a_child_process_as_in_a_thread(
    make_config: ConfigFactory, tiny_pipelines: dict[TinyKind, Path], isolation: str
) -> None:
    options = tiny_options(
        tiny_pipelines["flux"],
        "flux",
        pipeline=f"{MISBEHAVING}:TextForPictures",
        isolation=isolation,
    )
    config = make_config(
        samples=2, generators=[{"name": "tiny", "backend": "diffusers", "options": options}]
    )
    broken = r"generator 'tiny' is broken: it returned an object of type str where a PIL image"
    with pytest.raises(FatalBackendError, match=broken):
        await run_to_end(config)


def test_an_answer_the_child_cannot_send_ends_the_child(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Otherwise the call waiting for that answer would wait forever.
    import queue

    from trig_stream.backends.generators import pipeline_child

    class Unpicklable:
        def send(self, message: object) -> None:
            raise TypeError("cannot pickle 'generator' object")

    exits: list[int] = []

    def exit_now(code: int) -> None:
        exits.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(os, "_exit", exit_now)  # the one module, as the child sees it
    answers: queue.SimpleQueue[Any] = queue.SimpleQueue()
    answers.put(lambda: pipeline_child._done([], [1], 0.5))
    left, right = socket.socketpair()
    with left, right, pytest.raises(SystemExit):
        pipeline_child._answer(cast("Connection", Unpicklable()), left, answers)
    assert exits == [1]
    assert "cannot pickle" in capsys.readouterr().err


def test_an_answer_the_child_cannot_make_ends_the_child(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # An OSError making it (a lazily read picture whose file is cut short) was taken for the
    # parent gone: nothing was sent, and the call waiting for that answer waited forever.
    import queue

    from trig_stream.backends.generators import pipeline_child

    def unreadable() -> Any:
        raise OSError("image file is truncated")

    exits: list[int] = []

    def exit_now(code: int) -> None:
        exits.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(os, "_exit", exit_now)
    answers: queue.SimpleQueue[Any] = queue.SimpleQueue()
    answers.put(unreadable)
    left, right = socket.socketpair()
    with left, right, pytest.raises(SystemExit):
        pipeline_child._answer(cast("Connection", None), left, answers)
    assert exits == [1]
    assert "image file is truncated" in capsys.readouterr().err


def test_an_answer_mixes_pictures_png_files_and_failures() -> None:
    from trig_stream.backends.generators import pipeline_child, pipeline_process

    picture = Image.fromarray(np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3))
    grey = Image.new("L", (4, 1), 7)
    items = [picture, ItemError("no face"), EncodedPicture(b"\x89PNG...", 9.0), grey]
    items.append(TypeError("'str' object cannot be interpreted as an integer"))
    portable = [pipeline_child._portable(item) for item in items]
    outcomes = [outcome for outcome, _ in portable]
    assert outcomes[2] == ("png", False, 7)
    outcomes = pickle.loads(pickle.dumps(outcomes))  # as they cross the pipe
    payload = bytearray(b"".join(data for _, data in portable if data))
    assert pipeline_process._payload_size(outcomes) == len(payload) == 18 + 7 + 4
    made = pipeline_process._pictures(outcomes, payload, 0.25)
    assert isinstance(made[0], TimedPicture) and made[0].seconds == 0.25
    assert made[0].image.tobytes() == picture.tobytes() and made[0].image.size == (3, 2)
    assert isinstance(made[1], ItemError) and str(made[1]) == "no face"
    # The item's own failure stays one, and a failed call's stays apart from it.
    assert type(made[4]) is BackendError
    assert str(made[4]) == "TypeError: 'str' object cannot be interpreted as an integer"
    assert made[2] == EncodedPicture(b"\x89PNG...", 0.25)  # timed by the call, as the rest
    assert isinstance(made[3], TimedPicture) and made[3].image.mode == "L"
    assert made[3].image.tobytes() == b"\x07" * 4


def picture_of_mode(mode: str) -> Image.Image:
    """A small picture of many colours in Pillow mode ``mode`` (``"P+transparency"``: a
    palette picture with a transparent index)."""
    rgb = Image.fromarray((np.arange(5 * 6 * 3) * 7 % 256).astype(np.uint8).reshape(5, 6, 3))
    if mode == "I;16":
        return rgb.convert("L").convert("I;16")
    picture = rgb.convert(mode.removesuffix("+transparency"))
    if mode.endswith("+transparency"):
        picture.info["transparency"] = 3
    return picture


@pytest.mark.parametrize(
    "mode",
    ["P", "P+transparency", "PA", "LA", "1", "I;16", "I", "L", "RGB", "RGBA", "F", "CMYK"],
)
def test_a_picture_crosses_from_the_child_to_the_same_png_file_as_in_a_thread(
    mode: str,
) -> None:
    # A palette picture crossed as its raw indices, its palette and transparency left behind:
    # it was stored black. A mode PNG cannot hold (F, CMYK) fails alike either way.
    from trig_stream.backends.generators import pipeline_child
    from trig_stream.generation import _png_or_reason

    picture = picture_of_mode(mode)
    in_a_thread = _png_or_reason(picture)
    outcome, data = pipeline_child._portable(picture)
    outcomes = pickle.loads(pickle.dumps([outcome]))  # as it crosses the pipe
    [made] = pipeline_process._pictures(outcomes, bytearray(data or b""), 0.5)
    if isinstance(made, EncodedPicture):
        assert made.pixels_checked  # encoded from its pixels, as in a thread
        from_the_child: bytes | str = made.png
    else:
        assert isinstance(made, TimedPicture)
        from_the_child = _png_or_reason(made.image)
    assert from_the_child == in_a_thread
    if mode.startswith("P") and isinstance(from_the_child, bytes):
        stored = Image.open(io.BytesIO(from_the_child)).convert("RGBA")
        assert stored.getpixel((1, 0)) != (0, 0, 0, 255)  # not black


@pytest.mark.parametrize("checked", [True, False])
def test_a_png_files_checked_pixels_cross_to_the_parent(checked: bool) -> None:
    # Under isolation = "process" the flag was dropped: the stored image lost its
    # 'trig-stream pixel data' chunk that isolation = "thread" gave it.
    from trig_stream.backends.generators import pipeline_child, pipeline_process

    png = b"\x89PNG checked"
    outcome, data = pipeline_child._portable(EncodedPicture(png, 3.0, pixels_checked=checked))
    assert data is not None
    made = pipeline_process._pictures(pickle.loads(pickle.dumps([outcome])), bytearray(data), 0.5)
    assert made == [EncodedPicture(png, 0.5, pixels_checked=checked)]


def test_an_answers_bytes_cross_in_order_and_whole() -> None:
    # More than the socket holds at once: the sender blocks until the reader takes it all.
    left, right = socket.socketpair()
    buffers = [os.urandom(size) for size in (3_000_000, 0, 17, 1_000_000)]
    with left, right, ThreadPoolExecutor(1) as pool:
        sent = pool.submit(send_buffers, left, buffers)
        assert receive_exactly(right, 4_000_017) == b"".join(buffers)
        sent.result()
        # A child that dies halfway through is an end of the stream, not a short picture.
        left.sendall(b"x" * 10)
        left.close()
        with pytest.raises(EOFError, match="after 10 of 20 bytes"):
            receive_exactly(right, 20)
