"""What the engine costs a generator: tiny Flux through the engine vs a plain loop.

Both sides load the same tiny random-weight Flux pipeline from a folder, warm it up with one
image, then make ``--images`` images with the same seeds, at two sizes: 64x64 in 2 steps
(~8 ms an image here: the call is almost all Python, so whatever else the process does
competes with it for the interpreter lock) and 128x128 in 4 steps:

* **loop**: ``pipe(...)`` per batch, then PNG encode and write each image (what any script
  must do to keep its images);
* **thread**: ``Engine(config)`` with the ``diffusers`` backend (``isolation = "thread"``, the
  default: the pipeline runs in a worker thread of the engine's process) and the ``fake``
  judge, timed from the end of ``load`` (the warm-up is part of it) to the last durable
  judgement;
* **process**: the same with ``isolation = "process"``: the pipeline runs in a child process,
  which sends its pictures back as raw pixels (a small message, then the bytes); the engine's
  writer encodes them as PNG, as in thread mode.

Prints images per second for batch sizes 1 and 4 and each engine mode's overhead in percent
(the engine should add under 10%).

Each measurement runs in its own process. Run:
``.venv/bin/python bench/generators_overhead.py [--images 256] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import stop_on_sigterm
from _server import run_child

from trig_stream import Engine
from trig_stream.backends.base import GenerationRequest
from trig_stream.backends.generators.diffusers_generator import DiffusersGenerator
from trig_stream.backends.generators.diffusers_options import DiffusersOptions
from trig_stream.config import parse_config
from trig_stream.png import encode_png
from trig_stream.records import Sample
from trig_stream.testing.tiny_pipelines import TINY_CALL, build_tiny_pipeline

SIZES = ((64, 2), (128, 4))
"""(side, steps) measured by default: a Python-bound call (~8 ms an image) and a larger one."""


def options(path: Path, size: int, steps: int, isolation: str = "thread") -> dict[str, Any]:
    return {
        "isolation": isolation,
        "pipeline": "FluxPipeline",
        "checkpoint": str(path),
        "devices": ["cpu"],
        "local_files_only": True,
        "steps": steps,
        "height": size,
        "width": size,
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


def plain_loop(path: Path, images: int, batch: int, out: Path, size: int, steps: int) -> float:
    """Images per second of the pipeline called directly, PNGs written (encoded as the engine
    encodes them, so that only the engine's own work tells the two apart)."""
    import diffusers
    import torch

    pipe = diffusers.FluxPipeline.from_pretrained(str(path), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"height": size, "width": size, "num_inference_steps": steps, **TINY_CALL["flux"]}
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
                (out / f"{i}.png").write_bytes(encode_png(image))  # the engine's encoder
    return images / (time.perf_counter() - started)


async def through_engine(
    path: Path, images: int, batch: int, root: Path, size: int, steps: int, isolation: str
) -> float:
    """Images per second through the engine (fake judge), after load and warm-up."""
    data = {
        "run": {"name": f"bench-{batch}", "output_dir": str(root / "runs")},
        "dataset": {"path": str(write_prompts(root / "prompts.json", images))},
        "generators": [
            {
                "name": "tiny",
                "backend": "diffusers",
                "batch_size": batch,
                "options": options(path, size, steps, isolation),
            }
        ],
        "judges": [{"backend": "fake"}],
    }
    config = parse_config(data, source=root / "config.toml")
    generator = TimedGenerator(
        "tiny",
        DiffusersOptions.model_validate(options(path, size, steps, isolation)),
        batch_size=batch,
    )
    finished = 0.0
    async with Engine(config, generators=[generator]) as engine:
        async for _ in engine.results:
            # The last judgement's arrival, not the run's end: closing the generator (for
            # ``process``, the child's exit) comes after the work and is not part of it.
            finished = time.perf_counter()
    assert engine.stats().models["tiny"].generated == images
    return images / (finished - generator.loaded_at)


def measure(
    mode: str, batch: int, images: int, pipeline: Path, root: Path, size: int, steps: int
) -> float:
    """One measurement, in this process."""
    root.mkdir(parents=True)
    if mode == "loop":
        return plain_loop(pipeline, images, batch, root, size, steps)
    return anyio.run(through_engine, pipeline, images, batch, root, size, steps, mode)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # Enough images that the engine's start and end (first image through every stage, last
    # journal sync) weigh little: at 64 the batch-4 run lasted 0.5 s.
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--one", nargs=6, metavar=("MODE", "BATCH", "SIZE", "STEPS", "PIPE", "DIR"))
    args = parser.parse_args()
    stop_on_sigterm()
    # Refused, not reused: the engine would resume the old run there and make no image. A
    # dangling link too (lexists): making the folder there fails.
    if args.one and os.path.lexists(args.one[5]):
        raise SystemExit(f"--one: {args.one[5]} exists; give a folder that does not")
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    if args.one:
        import torch

        torch.set_num_threads(args.threads)
        mode, batch, size, steps, pipeline, root = args.one
        rate = measure(
            mode, int(batch), args.images, Path(pipeline), Path(root), int(size), int(steps)
        )
        print(rate)
        return
    # Every measurement runs in a fresh process: torch's idle OpenMP threads from one
    # measurement would otherwise spin and steal the CPU from the next.
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        path = build_tiny_pipeline("flux", root / "flux-tiny")
        print(f"tiny Flux, {args.images} images, CPU ({args.threads} torch threads); "
              f"median of {args.repeats} runs, modes alternating")  # fmt: skip
        for size, steps in SIZES:
            for batch in (1, 4):
                rates: dict[str, list[float]] = {"loop": [], "thread": [], "process": []}
                for repeat in range(args.repeats):
                    for mode in rates:
                        where = root / f"{mode}-{size}-{batch}-{repeat}"
                        command = [sys.executable, __file__, "--images", str(args.images)]
                        command += ["--threads", str(args.threads), "--one", mode, str(batch)]
                        command += [str(size), str(steps), str(path), str(where)]
                        printed = run_child(command, f"--one {mode} {batch} {size} {steps}")
                        rates[mode].append(float(printed.strip().splitlines()[-1]))
                loop = statistics.median(rates["loop"])
                line = f"{size}x{size}, {steps} steps, batch {batch}: loop {loop:6.1f} img/s"
                for mode in ("thread", "process"):
                    engine = statistics.median(rates[mode])
                    overhead = (loop / engine - 1.0) * 100.0
                    line += f"   {mode} {engine:6.1f} img/s ({overhead:+.1f}%)"
                print(line, flush=True)


if __name__ == "__main__":
    main()
