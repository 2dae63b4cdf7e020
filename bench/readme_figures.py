"""The timings README.md quotes, measured: each printed as the median of several repeats.

* reuse: a resumed run taking an image the engine wrote (``reusable_image``), on its chunks'
  CRCs (the ``trig-stream pixel data`` chunk) or, without that chunk, inflating it in full;
  512x512 and 1024x1024 noise PNGs encoded as the engine encodes them (the noise is mostly
  dark, see :func:`noise`: uniform noise would be stored raw by zlib, and inflate as a copy).
* image_folder: copying a file into the run as that generator does: a Pillow-written noise
  PNG taken byte for byte (``png_as_is``), a 1024x1024 noise JPEG decoded (``open_image``)
  and encoded as PNG (``encode_png``).
* history: earlier runs' judgements joining the live analysis from the journal, as the engine
  does in the background (``read_journal`` in chunks of ``HISTORY_CHUNK`` into a
  ``RelationTracker``), for a journal of 100,000 judgements written here.
* demo: ``trig-stream make-tiny-models`` and ``trig-stream run config/demo.toml`` (the
  report included), each in a fresh folder.

Each line gives the median wall time and the median CPU time of this process (of the
commands, for the demo): on a box shared with other work the CPU time moves less.

    .venv/bin/python bench/readme_figures.py [--repeats 15] [--demo-repeats 2] [--no-demo]

The latest results, and the figures README.md quotes from them, are in bench/README.md,
"Figures quoted in README".
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from itertools import islice
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import stop_on_sigterm
from _server import stopped_with_us

from trig_stream.analysis import RelationTracker
from trig_stream.backends.generators.source_images import open_image, png_as_is
from trig_stream.journal import Journal, read_journal
from trig_stream.persisting import HISTORY_CHUNK
from trig_stream.png import encode_png, with_sample_digest
from trig_stream.records import JudgeFingerprint, Judgement
from trig_stream.reuse import reusable_image

REPO = Path(__file__).resolve().parent.parent
LABEL = "0123456789abcdef noise IQ-R_TA-C_1 7"
"""An image label as the engine writes it: sample digest, model, data_id, seed."""
JOURNAL_JUDGEMENTS = 100_000


def median_ms(repeats: int, call: Callable[..., object], *args: object) -> tuple[float, float]:
    """Median wall and CPU milliseconds of ``call(*args)`` over ``repeats`` runs."""
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        call(*args)
        cpus.append(time.process_time() - cpu)
        walls.append(time.perf_counter() - wall)
    return statistics.median(walls) * 1e3, statistics.median(cpus) * 1e3


def report(what: str, wall_ms: float, cpu_ms: float) -> None:
    print(f"{what:<58} {wall_ms:9.2f} ms wall {cpu_ms:9.2f} ms CPU", flush=True)


def noise(size: int) -> Image.Image:
    """Random pixels, most of them dark (the cube of a uniform draw): zlib codes these as it
    codes a real picture's, where uniform noise would be stored raw and inflate as a copy."""
    cube = np.random.default_rng(size).random((size, size, 3)) ** 3
    return Image.fromarray((cube * 256).astype(np.uint8))


def reuse_figures(folder: Path, repeats: int) -> None:
    for size in (512, 1024):
        png = encode_png(noise(size))
        for whole in (True, False):
            path = folder / f"reuse-{size}-{whole}.png"
            path.write_bytes(with_sample_digest(png, LABEL, pixels_whole=whole))
            assert reusable_image(path, LABEL) is not None
            how = "on its CRCs (pixel data chunk)" if whole else "inflated (no such chunk)"
            mb = path.stat().st_size / 1e6
            report(
                f"reuse {size}x{size} ({mb:.1f} MB), {how}",
                *median_ms(repeats, reusable_image, path, LABEL),
            )


def image_folder_figures(folder: Path, repeats: int) -> None:
    for size in (512, 1024):
        path = folder / f"folder-{size}.png"
        noise(size).save(path, compress_level=1)
        assert png_as_is(path) is not None
        mb = path.stat().st_size / 1e6
        report(
            f"image_folder {size}x{size} PNG ({mb:.1f} MB), as it is",
            *median_ms(repeats, png_as_is, path),
        )
    jpeg = folder / "folder-1024.jpg"
    noise(1024).save(jpeg, quality=90)
    assert png_as_is(jpeg) is None

    def decode_and_encode() -> bytes:
        png_as_is(jpeg)  # refused first, as the generator asks
        return encode_png(open_image(jpeg))

    mb = jpeg.stat().st_size / 1e6
    report(
        f"image_folder 1024x1024 JPEG ({mb:.1f} MB), decoded, encoded",
        *median_ms(repeats, decode_and_encode),
    )


def write_journal(path: Path, count: int) -> None:
    """``count`` ok judgements shaped as the fake judge's lines (two per image)."""
    judge = JudgeFingerprint(backend="fake", model="fake", params={"scoring_rules": 1})
    rng = np.random.default_rng(0)
    pairs = ("IQ-R_TA-C", "IQ-A_TA-S", "IQ-O_D-A", "TA-R_TA-C", "D-K_IQ-R", "R-T_IQ-A")
    logprobs = [("good", -0.6), ("excellent", -1.1), ("medium", -2.2), ("bad", -5.7)]
    judgements = []
    for index in range(count):
        pair = pairs[index // 2 % len(pairs)]
        data_id = f"{pair}_{index // 2 // len(pairs) + 1}"
        judgements.append(
            Judgement(
                model="bench",
                data_id=data_id,
                task="t2i",
                pair=pair,
                dimension=pair.split("_")[index % 2],
                metric="trigscore",
                status="ok",
                sample_digest="0123456789abcdef",
                judge=judge,
                score=float(rng.random()),
                top_logprobs=logprobs,
                image=f"images/t2i/bench/{data_id}.png",
                seed=index // 2,
                latency_s=0.05,
                attempts=1,
            )
        )
    journal = Journal(path)
    journal.open()
    try:
        journal.append(judgements)
    finally:
        journal.close()


def join_history(path: Path) -> RelationTracker:
    """The engine's background join (``Persister.load_history``), without the threads."""
    tracker = RelationTracker()
    lines = iter(read_journal(path))
    while chunk := list(islice(lines, HISTORY_CHUNK)):
        tracker.extend(chunk)
    return tracker


def history_figure(folder: Path, repeats: int) -> None:
    path = folder / "journal.jsonl"
    write_journal(path, JOURNAL_JUDGEMENTS)
    report(
        f"history: {JOURNAL_JUDGEMENTS:,} judgements join the live analysis",
        *median_ms(repeats, join_history, path),
    )


def command_seconds(args: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds (user + system, its children included) of one command, stopped
    with this process (:func:`stopped_with_us`): a bench that is killed leaves none running."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(
        stopped_with_us(args), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return wall, cpu


def demo_figures(folder: Path, repeats: int) -> None:
    """The README's demo, each repeat in a fresh copy of its layout (config/, data/, runs/)."""
    command = str(Path(sys.executable).parent / "trig-stream")
    timings: dict[str, list[tuple[float, float]]] = {"make-tiny-models": [], "demo run": []}
    for repeat in range(repeats):
        root = folder / f"demo-{repeat}"
        (root / "config").mkdir(parents=True)
        shutil.copy(REPO / "config" / "demo.toml", root / "config")
        (root / "data").symlink_to(REPO / "data")
        models = [command, "make-tiny-models", str(root / "runs" / "tiny-models")]
        timings["make-tiny-models"].append(command_seconds(models))
        run = [command, "run", "--headless", str(root / "config" / "demo.toml")]
        timings["demo run"].append(command_seconds(run))
        assert (root / "runs" / "demo" / "report").is_dir(), "the demo wrote no report"
    for what, runs in timings.items():
        walls = ", ".join(f"{wall:.1f}" for wall, _ in runs)
        print(
            f"{what}: median {statistics.median(w for w, _ in runs):.1f} s wall "
            f"({walls}), {statistics.median(c for _, c in runs):.1f} s CPU",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15, help="repeats of each timing")
    parser.add_argument("--demo-repeats", type=int, default=2, help="repeats of the demo")
    parser.add_argument("--no-demo", action="store_true", help="skip the demo's two commands")
    args = parser.parse_args()
    stop_on_sigterm()
    if args.repeats < 1 or args.demo_repeats < 1:
        parser.error("--repeats and --demo-repeats: time at least one run")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        reuse_figures(folder, args.repeats)
        image_folder_figures(folder, args.repeats)
        history_figure(folder, max(3, args.repeats // 3))
        if not args.no_demo:
            demo_figures(folder, args.demo_repeats)


if __name__ == "__main__":
    main()
