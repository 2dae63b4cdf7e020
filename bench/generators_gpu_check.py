"""A device check for the diffusers generator: batching gain and time to the first judgement.

One prepared script for a machine with a GPU (it also runs on a CPU, at smaller sizes):

1. builds a mid-size random-weight Flux pipeline (no download) and saves it to a folder;
2. measures images per second of the ``diffusers`` generator at batch 1 and batch 8
   (one pipeline call per batch, seeded per image, from a worker thread as the engine
   calls it);
3. runs the engine with that generator and the ``fake`` judge, with the pipeline in a worker
   thread and then in a child process (``isolation``), and reports how long the judge waited
   for its first image, the images per second after it, and that rate over the plain loop's,
   measured again right before the run (the first pipeline stays loaded meanwhile).

Each engine run must make all its images (a run directory of its own each, even for a run
listed twice); the script exits 1 otherwise, after writing its report.

Everything finishes in well under 5 minutes on one H200 (a few minutes on 2 CPU cores with
``--device cpu``, 16 images a run). Results are printed and written as JSON to
``$OUT/generators_gpu_check.json`` when ``OUT`` is set (the folder is made when missing,
before anything is measured).

On a busy CPU, torch's default OpenMP threads slowed the plain loop ~8x and the engine not
(``engine_vs_loop`` 11.5, against 1.35 with ``OMP_NUM_THREADS=1``): ``--threads N``
sets torch's intra-op threads for both alike; compare with ``--threads 1`` there.

Run: ``.venv/bin/python bench/generators_gpu_check.py [--device auto|cpu|cuda:0] [--threads N]``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, get_args

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import stop_on_sigterm
from _goal import Goals

from trig_stream import Engine
from trig_stream.backends.base import GenerationRequest
from trig_stream.backends.generators.diffusers_generator import DiffusersGenerator
from trig_stream.backends.generators.diffusers_options import DiffusersOptions, Isolation
from trig_stream.config import parse_config
from trig_stream.records import Sample
from trig_stream.testing.tiny_pipelines import byte_level_clip_tokenizer, unigram_t5_tokenizer

# (image side, steps, transformer width, double blocks, single blocks, images per batch run).
# At least two batches of the largest default batch size (8): the engine's rate is measured
# from the first batch's last judgement on, so a run of one batch measures none.
SIZES: dict[str, tuple[int, int, int, int, int, int]] = {
    "gpu": (512, 8, 1024, 4, 8, 64),
    "cpu": (128, 2, 128, 1, 2, 16),
}
DEFAULT_RUNS = "thread:1,thread:8,process:1,process:8"
"""The engine runs of ``--runs`` by default, as isolation:batch_size."""


def build_mid_flux(path: Path, width: int, double: int, single: int) -> Path:
    """A Flux pipeline with random weights, ``width`` wide: small text encoders, a 16x VAE."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    tokenizer = byte_level_clip_tokenizer()
    tokenizer_2 = unigram_t5_tokenizer()
    text = 256
    end = int(tokenizer.convert_tokens_to_ids("<|endoftext|>"))  # type: ignore[arg-type]
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=text, intermediate_size=4 * text,
            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
            projection_dim=text, bos_token_id=end - 1, eos_token_id=end, pad_token_id=end,
        )
    )  # fmt: skip
    t5 = T5EncoderModel(
        T5Config(vocab_size=len(tokenizer_2), d_model=text, d_kv=64, d_ff=4 * text,
                 num_layers=2, num_heads=4, pad_token_id=0, eos_token_id=1)
    )  # fmt: skip
    heads = width // 128
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=double, num_single_layers=single,
        attention_head_dim=128, num_attention_heads=heads, joint_attention_dim=text,
        pooled_projection_dim=text, axes_dims_rope=[16, 56, 56],
    )  # fmt: skip
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 64, 64, 64),
        layers_per_block=1, latent_channels=16, norm_num_groups=32,
        shift_factor=0.0609, scaling_factor=1.5035,
    )  # fmt: skip
    FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip,
        tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=tokenizer_2, transformer=transformer,
    ).save_pretrained(str(path))  # fmt: skip
    return path


def generator_options(path: Path, device: str, side: int, steps: int) -> dict[str, Any]:
    return {
        "pipeline": "FluxPipeline",
        "checkpoint": str(path),
        "devices": [device],
        "dtype": "auto" if device == "cpu" else "bfloat16",
        "local_files_only": True,
        "steps": steps,
        "height": side,
        "width": side,
        "call": {"max_sequence_length": 64},
    }


def requests(count: int) -> list[GenerationRequest]:
    return [
        GenerationRequest(
            "mid",
            Sample(
                data_id=f"IQ-R_TA-C_{i + 1}",
                task="t2i",
                prompt=f"a lighthouse on a cliff at dusk, study {i}",
                dimensions=("IQ-R", "TA-C"),
            ),
            i,
        )
        for i in range(count)
    ]


def throughput(generator: DiffusersGenerator, batch: int, count: int, device: str) -> float:
    """Images per second of ``generator`` called directly, ``batch`` images a call.

    The calls run in a worker thread, as the engine makes them (``anyio.to_thread``): on a
    CPU, torch's intra-op threads served calls from the main thread ~10x slower than calls
    from a worker thread (0.46 against 6 images/s; equal with ``OMP_NUM_THREADS=1``), so a
    loop on the main thread made ``engine_vs_loop`` compare unlike with unlike.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="loop") as worker:
        return worker.submit(_throughput, generator, batch, count, device).result()


def _throughput(generator: DiffusersGenerator, batch: int, count: int, device: str) -> float:
    import torch

    todo = requests(count)
    cancel = threading.Event()
    generator.generate(todo[:batch], worker=0, cancel=cancel)  # warm-up (kernels, allocator)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    for first in range(0, count, batch):
        generator.generate(todo[first : first + batch], worker=0, cancel=cancel)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return count / (time.perf_counter() - started)


async def first_judgement(
    root: Path, options: dict[str, Any], batch: int, count: int, isolation: str, index: int
) -> dict[str, Any]:
    """The ``index``-th engine run (from 1). Its name carries the index, so that a run listed
    twice in ``--runs`` makes its images again instead of resuming the first one's."""
    records = [
        {"data_id": r.sample.data_id, "prompt": r.sample.prompt, "dimension": ["IQ-R", "TA-C"]}
        for r in requests(count)
    ]
    (root / "prompts.json").write_text(json.dumps(records))
    config = parse_config(
        {
            "run": {
                "name": f"gpu-check-{index}-{batch}-{isolation}",
                "output_dir": str(root / "runs"),
            },
            "dataset": {"path": str(root / "prompts.json")},
            "generators": [
                {
                    "name": "mid",
                    "backend": "diffusers",
                    "batch_size": batch,
                    "options": {**options, "isolation": isolation},
                }
            ],
            "judges": [{"backend": "fake"}],
        },
        source=root / "config.toml",
    )
    started = time.perf_counter()
    judged: dict[str, float] = {}  # data_id -> when its image's first judgement arrived
    async with Engine(config) as engine:
        async for judgement in engine.results:
            judged.setdefault(judgement.data_id, time.perf_counter() - started)
    total = time.perf_counter() - started
    stats = engine.stats()
    images = stats.models["mid"].generated
    in_calls = stats.generation_latency.p50
    arrivals = sorted(judged.values())
    steady = None
    if images > batch and len(arrivals) == images:
        # From the first batch's last image to the last batch's: each end carries one
        # batch's writing and judging, so what lies between is the rate of the pipeline.
        span = arrivals[-1] - arrivals[batch - 1]
        steady = round((images - batch) / span, 2) if span > 0 else None
    return {
        "batch_size": batch,
        "isolation": isolation,
        # None when nothing was judged: the run's total time is no first judgement.
        "first_judgement_s": round(arrivals[0], 3) if arrivals else None,
        "total_s": round(total, 3),
        "images": images,
        "images_per_s_after_first_batch": steady,
        # The median time per image inside the pipeline's calls (timed in the child with
        # "process"): beside the loop's, it tells calls that slowed down from a device that
        # waited between calls.
        "seconds_per_image_in_calls": round(in_calls, 4) if in_calls is not None else None,
    }


def engine_runs(text: str) -> list[tuple[str, int]]:
    """``--runs``: comma-separated ``isolation:batch_size`` pairs, checked when the arguments
    are read, not after minutes of building and measuring (device time)."""
    runs = []
    for run in text.split(","):
        isolation, colon, batch = run.partition(":")
        if not colon:
            raise argparse.ArgumentTypeError(f"{run!r} is not isolation:batch_size (thread:8, say)")
        if isolation not in get_args(Isolation):
            raise argparse.ArgumentTypeError(
                f"isolation {isolation!r} is not {' or '.join(get_args(Isolation))}"
            )
        try:
            size = int(batch)
        except ValueError:
            size = 0
        if size < 1:
            raise argparse.ArgumentTypeError(f"batch size {batch!r} is not a positive whole number")
        runs.append((isolation, size))
    return runs


def report_file(out: str | None) -> Path | None:
    """Where the JSON report goes: ``$OUT/generators_gpu_check.json``, its folder made now,
    before minutes of measuring, so that a bad ``OUT`` stops the check at once; None when
    ``OUT`` is unset or empty."""
    if not out:
        return None
    try:
        Path(out).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SystemExit(
            f"OUT={out} cannot hold the report ({exc.strerror}): "
            "set OUT to a folder that can be made, or unset it"
        ) from None
    return Path(out, "generators_gpu_check.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--runs",
        type=engine_runs,
        default=DEFAULT_RUNS,
        help="the engine runs to make, as isolation:batch_size (default: all four)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch intra-op threads, for the loop and the engine alike (default: torch's own)",
    )
    args = parser.parse_args()
    stop_on_sigterm()
    if args.threads < 0:
        parser.error("--threads: give a count of threads, or 0 for torch's own")
    report_path = report_file(os.environ.get("OUT"))
    import diffusers
    import torch

    diffusers.utils.logging.set_verbosity_error()
    if args.threads:
        # Process-wide: the loop's worker thread, the engine's, and a "process" child (it
        # takes this process's count) all compute with it.
        torch.set_num_threads(args.threads)
    device = args.device
    if device == "auto":
        device = "cuda:0" if torch.cuda.is_available() else "cpu"
    side, steps, width, double, single, count = SIZES["cpu" if device == "cpu" else "gpu"]
    report: dict[str, Any] = {
        "device": device,
        "device_name": torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "diffusers": diffusers.__version__,
        "image": f"{side}x{side}",
        "steps": steps,
        "transformer": {"width": width, "double_blocks": double, "single_blocks": single},
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        path = build_mid_flux(root / "mid-flux", width, double, single)
        report["build_s"] = round(time.perf_counter() - t, 2)
        options = generator_options(path, device, side, steps)
        generator = DiffusersGenerator("mid", DiffusersOptions.model_validate(options))
        t = time.perf_counter()
        generator.load()
        report["load_s"] = round(time.perf_counter() - t, 2)
        for batch in (1, 8):
            rate = throughput(generator, batch, count, device)
            report[f"images_per_s_batch_{batch}"] = round(rate, 2)
            report[f"seconds_per_image_batch_{batch}"] = round(1 / rate, 4)
            print(f"batch {batch}: {rate:.2f} images/s", flush=True)
        report["batching_gain"] = round(
            report["images_per_s_batch_8"] / report["images_per_s_batch_1"], 2
        )
        report["engine"] = []
        for index, (isolation, batch) in enumerate(args.runs, 1):
            # The loop again right before each engine run, at its batch size: the machine's
            # speed drifts between runs (by ~20% over an hour on the H200), so each ratio
            # compares two measurements a minute apart.
            loop = throughput(generator, batch, count, device)
            run = anyio.run(first_judgement, root, options, batch, count, isolation, index)
            run["loop_images_per_s"] = round(loop, 2)
            steady = run["images_per_s_after_first_batch"]
            run["engine_vs_loop"] = round(steady / loop, 3) if steady else None
            report["engine"].append(run)
            engine_rate = f"{steady} img/s" if steady else "not measured (needs two batches judged)"
            print(f"{isolation} batch {batch}: {engine_rate}, loop {loop:.2f}", flush=True)
        generator.close()
    print(json.dumps(report, indent=2))
    if report_path is not None:
        report_path.write_text(json.dumps(report))
    # After the report is written: a run that made fewer images measured something else.
    goals = Goals()
    for index, run in enumerate(report["engine"], 1):
        what = f"engine run {index} ({run['isolation']}, batch {run['batch_size']})"
        goals.equal(f"{what}: images made", run["images"], count)
    goals.finish()


if __name__ == "__main__":
    main()
