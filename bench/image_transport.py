"""Judging ~1 MB images: base64 data URLs against file:// URLs, on the same server.

Writes N 512x512 noise PNGs (about 0.8 MB each, incompressible) into a folder, and judges
them on their two dimensions with the ``openai`` judge against ``simulate-judge`` (zero
latency, 64 slots, its own process), once with ``image_mode = "base64"`` and once with
``"file"``. The images come in through the ``image_folder`` generator, as images made
elsewhere do. It copies each into the run directory, a durable write of 0.8 MB; so that the
timed run measures the judging only, an untimed run first brings them in, with an instant
fake judge of another name, and the timed run then finds them in the run directory and
reuses them, reading and verifying each (as an image is reused on resume). The server
decodes and checks every image in both modes, so the difference is the judge side's encoding
and the bytes moved. The engine's own CPU per request is printed beside: the rest of the
wall time is the server's (it parses each megabyte-sized body in one Python process).

J1 has no goal; the bench exits 1 when a timed run did not reuse every image, judge every
image ok on both dimensions, or have each request answered once.

    .venv/bin/python bench/image_transport.py [--images 300] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import sample_id, stop_on_sigterm, write_parquet_prompts
from _goal import Goals
from _server import judge_stats, openai_judge, start_judge, stop_judge

from trig_stream import Engine
from trig_stream.config import parse_config

MODEL = "noise"
PLACER = {"name": "place", "backend": "fake", "concurrency": 64}
"""The untimed run's judge: instant, and named apart from the timed run's, whose judgements
it leaves to be made."""


def config(
    folder: Path, dataset: Path, name: str, judge: dict[str, Any], images: Path
) -> dict[str, Any]:
    return {
        "run": {"name": name, "output_dir": str(folder / "runs")},
        "dataset": {"path": str(dataset)},
        "generators": [
            {"name": MODEL, "backend": "image_folder", "options": {"path": str(images)}}
        ],
        "judges": [judge],
    }


def write_noise_images(folder: Path, count: int) -> int:
    """The dataset's first ``count`` samples' images, ``<data_id>.png`` noise; their total size."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    total = 0
    for index in range(count):
        pixels = rng.integers(0, 256, size=(512, 512, 3), dtype=np.uint8)
        path = folder / f"{sample_id(index)}.png"
        Image.fromarray(pixels).save(path, compress_level=1)
        total += path.stat().st_size
    return total


async def judge_all(data: dict[str, Any]) -> tuple[float, float, int, int]:
    """Wall and CPU seconds of a whole run, its ok judgements and the images it reused."""
    started, cpu = time.perf_counter(), time.process_time()
    async with Engine(parse_config(data, source=Path("bench.toml"))) as engine:
        summary = await engine.drain()
    reused = engine.stats().models[MODEL].reused
    return time.perf_counter() - started, time.process_time() - cpu, summary.ok, reused


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    stop_on_sigterm()
    goals = Goals()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        # As vLLM, the server reads file:// URLs only under the folder it is given.
        process, base_url = start_judge(
            "--latency", "0", "--capacity", "64", "--allowed-local-media-path", str(folder)
        )
        try:
            dataset = write_parquet_prompts(folder / "prompts.parquet", args.images)
            images = folder / "images"
            size = write_noise_images(images, args.images)
            results = {}
            for mode in ("base64", "file"):
                name = f"transport-{mode}"
                anyio.run(judge_all, config(folder, dataset, name, PLACER, images))  # untimed
                judge = openai_judge(base_url, args.concurrency, image_mode=mode)
                before = judge_stats(base_url)["served"]
                seconds, cpu, ok, reused = anyio.run(
                    judge_all, config(folder, dataset, name, judge, images)
                )
                served = judge_stats(base_url)["served"] - before
                results[mode] = seconds
                print(
                    f"{mode:>6}: {ok} ok, {served} requests in {seconds:.2f} s = "
                    f"{served / seconds:.0f} req/s ({size / args.images / 1e6:.2f} MB per image); "
                    f"engine CPU {cpu / max(served, 1) * 1000:.2f} ms per request"
                )
                goals.equal(f"{mode}: images reused from the run directory", reused, args.images)
                goals.equal(f"{mode}: ok judgements", ok, 2 * args.images)
                goals.equal(f"{mode}: requests answered", served, 2 * args.images)
        finally:
            stop_judge(process)
    print(f"file:// is {results['base64'] / results['file']:.2f}x the speed of base64")
    goals.finish()


if __name__ == "__main__":
    main()
