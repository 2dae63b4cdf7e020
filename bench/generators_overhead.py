"""What the engine costs a generator: tiny Flux through the engine vs a plain loop.

Both sides load the same tiny random-weight Flux pipeline (64x64, 2 steps) from a folder,
warm it up with one image, then make ``--images`` images with the same seeds:

* **loop**: ``pipe(...)`` per batch, then PNG encode and write each image (what any script
  must do to keep its images);
* **engine**: ``Engine(config)`` with the ``diffusers`` backend and the ``fake`` judge, timed
  from the end of ``load`` (the warm-up is part of it) to the last durable judgement.

Prints images per second for batch sizes 1 and 4 and the engine's overhead in percent.

Each measurement runs in its own process. Run:
``.venv/bin/python bench/generators_overhead.py [--images 64] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import anyio

from trig_stream import Engine
from trig_stream.backends.base import GenerationRequest
from trig_stream.backends.generators.diffusers_generator import DiffusersGenerator
from trig_stream.backends.generators.diffusers_options import DiffusersOptions
from trig_stream.config import parse_config
from trig_stream.records import Sample
from trig_stream.testing.tiny_pipelines import TINY_CALL, build_tiny_pipeline

SIZE = 64
STEPS = 2


def options(path: Path) -> dict[str, Any]:
    return {
        "pipeline": "FluxPipeline",
        "checkpoint": str(path),
        "devices": ["cpu"],
        "local_files_only": True,
        "steps": STEPS,
        "height": SIZE,
        "width": SIZE,
        "call": TINY_CALL["flux"],
    }


def write_prompts(path: Path, count: int) -> Path:
    pairs = ["IQ-R_TA-C", "IQ-A_TA-S", "R-T_IQ-A", "D-K_IQ-R"]
    records = [
        {
            "data_id": f"{pairs[i % 4]}_{i // 4 + 1}",
            "prompt": f"a small study of light number {i}",
            "dimension": pairs[i % 4].split("_"),
        }
        for i in range(count)
    ]
    path.write_text(json.dumps(records))
    return path


class TimedGenerator(DiffusersGenerator):
    """Warms up in ``load`` and notes when loading ended."""

    loaded_at = 0.0

    def load(self) -> None:
        super().load()
        warm = Sample(data_id="IQ-R_TA-C_0", task="t2i", prompt="warm", dimensions=("IQ-R", "TA-C"))
        self.generate([GenerationRequest(self.name, warm, 0)], worker=0, cancel=threading.Event())
        self.calls.clear()
        self.loaded_at = time.perf_counter()


def plain_loop(path: Path, images: int, batch: int, out: Path) -> float:
    """Images per second of the pipeline called directly, PNGs written."""
    import diffusers
    import torch

    pipe = diffusers.FluxPipeline.from_pretrained(str(path), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"height": SIZE, "width": SIZE, "num_inference_steps": STEPS, **TINY_CALL["flux"]}
    with torch.inference_mode():
        pipe("warm", generator=torch.Generator().manual_seed(0), **kwargs)
        started = time.perf_counter()
        for first in range(0, images, batch):
            indices = range(first, min(images, first + batch))
            result = pipe(
                [f"a small study of light number {i}" for i in indices],
                generator=[torch.Generator().manual_seed(i) for i in indices],
                **kwargs,
            )
            for i, image in zip(indices, result.images, strict=True):
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                (out / f"{i}.png").write_bytes(buffer.getvalue())
    return images / (time.perf_counter() - started)


async def through_engine(path: Path, images: int, batch: int, root: Path) -> float:
    """Images per second through the engine (fake judge), after load and warm-up."""
    data = {
        "run": {"name": f"bench-{batch}", "output_dir": str(root / "runs")},
        "dataset": {"path": str(write_prompts(root / "prompts.json", images))},
        "generators": [
            {"name": "tiny", "backend": "diffusers", "batch_size": batch, "options": options(path)}
        ],
        "judges": [{"backend": "fake"}],
    }
    config = parse_config(data, source=root / "config.toml")
    generator = TimedGenerator(
        "tiny", DiffusersOptions.model_validate(options(path)), batch_size=batch
    )
    async with Engine(config, generators=[generator]) as engine:
        async for _ in engine.results:
            pass
    finished = time.perf_counter()
    assert engine.stats().models["tiny"].generated == images
    return images / (finished - generator.loaded_at)


def measure(mode: str, batch: int, images: int, pipeline: Path, root: Path) -> float:
    """One measurement, in this process."""
    root.mkdir(parents=True)
    if mode == "loop":
        return plain_loop(pipeline, images, batch, root)
    return anyio.run(through_engine, pipeline, images, batch, root)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--one", nargs=4, metavar=("MODE", "BATCH", "PIPELINE", "ROOT"))
    args = parser.parse_args()
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    if args.one:
        import torch

        torch.set_num_threads(args.threads)
        mode, batch, pipeline, root = args.one
        print(measure(mode, int(batch), args.images, Path(pipeline), Path(root)))
        return
    # Every measurement runs in a fresh process: torch's idle OpenMP threads from one
    # measurement would otherwise spin and steal the CPU from the next.
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        path = build_tiny_pipeline("flux", root / "flux-tiny")
        threads = args.threads
        print(f"tiny Flux, {SIZE}x{SIZE}, {STEPS} steps, {args.images} images, CPU "
              f"({threads} torch threads); median of {args.repeats} runs")  # fmt: skip
        for batch in (1, 4):
            rates: dict[str, list[float]] = {"loop": [], "engine": []}
            for repeat in range(args.repeats):
                for mode in rates:
                    where = root / f"{mode}-{batch}-{repeat}"
                    command = [sys.executable, __file__, "--images", str(args.images)]
                    command += ["--threads", str(args.threads)]
                    command += ["--one", mode, str(batch), str(path), str(where)]
                    done = subprocess.run(command, capture_output=True, text=True, check=True)
                    rates[mode].append(float(done.stdout.strip().splitlines()[-1]))
            loop, engine = statistics.median(rates["loop"]), statistics.median(rates["engine"])
            overhead = (loop / engine - 1.0) * 100.0
            print(f"batch {batch}: loop {loop:6.1f} img/s   engine {engine:6.1f} img/s   "
                  f"engine overhead {overhead:+.1f}%", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
