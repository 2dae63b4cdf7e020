"""Judging ~1 MB images: base64 data URLs against file:// URLs, on the same server.

Writes N 512x512 noise PNGs (about 0.8 MB each, incompressible) straight into a run
directory's image folder, so the engine reuses them and generates nothing; then judges them on
their two dimensions with the ``openai`` judge against ``simulate-judge`` (zero latency, 64
slots, its own process), once with ``image_mode = "base64"`` and once with ``"file"``. The
server decodes and checks every image in both modes, so the difference is the judge side's
encoding and the bytes moved. The engine's own CPU per request is printed beside: the rest
of the wall time is the server's (it parses each megabyte-sized body in one Python process).

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
from _common import stop_on_sigterm, write_parquet_prompts
from _server import judge_stats, openai_judge, start_judge, stop_judge

from trig_stream import Engine
from trig_stream.config import parse_config


def config(folder: Path, dataset: Path, name: str, judge: dict[str, Any]) -> dict[str, Any]:
    return {
        "run": {"name": name, "output_dir": str(folder / "runs")},
        "dataset": {"path": str(dataset)},
        "generators": [{"name": "noise", "backend": "synthetic", "options": {"size": 512}}],
        "judges": [judge],
    }


def place_images(run_dir: Path, dataset: Path, count: int) -> int:
    """Noise PNGs where the engine looks for the model's images; returns their total size."""
    import polars as pl

    folder = run_dir / "images" / "t2i" / "noise"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    total = 0
    for data_id in pl.read_parquet(dataset)["data_id"].head(count):
        pixels = rng.integers(0, 256, size=(512, 512, 3), dtype=np.uint8)
        path = folder / f"{data_id}.png"
        Image.fromarray(pixels).save(path, compress_level=1)
        total += path.stat().st_size
    return total


async def judge_all(data: dict[str, Any]) -> tuple[float, float, int]:
    started, cpu = time.perf_counter(), time.process_time()
    async with Engine(parse_config(data, source=Path("bench.toml"))) as engine:
        summary = await engine.drain()
    return time.perf_counter() - started, time.process_time() - cpu, summary.ok


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    stop_on_sigterm()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        # As vLLM, the server reads file:// URLs only under the folder it is given.
        process, base_url = start_judge(
            "--latency", "0", "--capacity", "64", "--allowed-local-media-path", str(folder)
        )
        try:
            dataset = write_parquet_prompts(folder / "prompts.parquet", args.images)
            results = {}
            for mode in ("base64", "file"):
                judge = openai_judge(base_url, args.concurrency, image_mode=mode)
                data = config(folder, dataset, f"transport-{mode}", judge)
                size = place_images(folder / "runs" / data["run"]["name"], dataset, args.images)
                before = judge_stats(base_url)["served"]
                seconds, cpu, ok = anyio.run(judge_all, data)
                served = judge_stats(base_url)["served"] - before
                results[mode] = seconds
                print(
                    f"{mode:>6}: {ok} ok, {served} requests in {seconds:.2f} s = "
                    f"{served / seconds:.0f} req/s ({size / args.images / 1e6:.2f} MB per image); "
                    f"engine CPU {cpu / served * 1000:.2f} ms per request"
                )
        finally:
            stop_judge(process)
    print(f"file:// is {results['base64'] / results['file']:.2f}x the speed of base64")


if __name__ == "__main__":
    main()
