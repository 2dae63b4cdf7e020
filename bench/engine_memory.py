"""P4: peak RSS of a synthetic run at 100k prompts against 10k prompts (goal: ratio <= 1.2).

Each size runs ``trig-stream run --headless`` in its own child process (synthetic 8x8
images, the fake judge at zero latency, a parquet dataset streamed in batches) and reads
the child's peak resident memory from the kernel: ``VmHWM`` in ``/proc/self/status``, the
high-water mark of the child's own address space. Not ``ru_maxrss``: on Linux it also keeps
the peak of the address space the process had before ``exec``, and ``subprocess`` starts
the child with ``vfork``, so the child's ``ru_maxrss`` starts at this script's own peak
(building the 100k-row dataset here peaks above 200 MiB). The bench exits 1 when the goal is
missed or a run's journal does not hold two judgements per prompt.

    .venv/bin/python bench/engine_memory.py [--small 10000] [--large 100000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import bench_config, stop_on_sigterm, write_parquet_prompts, write_toml
from _goal import Goals
from _server import run_child

PEAK = (
    "import sys\n"
    "from pathlib import Path\n"
    "from trig_stream.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "status = Path('/proc/self/status').read_text().splitlines()\n"
    "print('peak_rss_kib', next(l.split()[1] for l in status if l.startswith('VmHWM:')))\n"
    "sys.exit(code)\n"
)


def one(size: int, folder: Path) -> tuple[float, float, int]:
    dataset = write_parquet_prompts(folder / f"prompts-{size}.parquet", size)
    config = write_toml(folder / f"run-{size}.toml", bench_config(folder / f"runs-{size}", dataset))
    started = time.perf_counter()
    printed = run_child(
        [sys.executable, "-c", PEAK, "run", str(config), "--headless", "--no-report"],
        f"the run of {size} prompts",
    )
    elapsed = time.perf_counter() - started
    peak = next(
        int(line.split()[1]) for line in printed.splitlines() if line.startswith("peak_rss_kib")
    )
    with (folder / f"runs-{size}" / "bench" / "journal.jsonl").open("rb") as journal:
        judged = sum(1 for _ in journal)
    return peak / 1024, elapsed, judged


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--large", type=int, default=100_000)
    args = parser.parse_args()
    stop_on_sigterm()
    goals = Goals()
    with tempfile.TemporaryDirectory() as tmp:
        small_rss, small_s, small_judged = one(args.small, Path(tmp))
        print(f"{args.small:>7} prompts: peak RSS {small_rss:7.1f} MiB, {small_s:6.1f} s")
        large_rss, large_s, large_judged = one(args.large, Path(tmp))
        print(f"{args.large:>7} prompts: peak RSS {large_rss:7.1f} MiB, {large_s:6.1f} s")
    goals.equal(f"{args.small} prompts: judgements in the journal", small_judged, 2 * args.small)
    goals.equal(f"{args.large} prompts: judgements in the journal", large_judged, 2 * args.large)
    goals.at_most("P4 peak RSS ratio", large_rss / small_rss, 1.2)
    goals.finish()


if __name__ == "__main__":
    main()
