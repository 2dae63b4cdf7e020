"""P6: from process start to the first new judge request, resuming a 100k-judgement run.

Builds a run directory whose journal holds 100,000 ok judgements (50,000 samples x 2
dimensions, written in the journal's own format), then appends 1,000 new samples at the end
of the dataset (the worst place: the reader must pass every finished sample first) and
resumes it in a fresh Python process with the fake judge. The child reports the time from
its own start to its first judge request, and how many requests repeated a key that was
already in the journal (goal: <= 3 s and 0; with no repeat, the first request was about a
new sample). The bench exits 1 when a goal is missed or the run did not make exactly 2 x new
judgements.

    .venv/bin/python bench/resume_latency.py [--done 50000] [--new 1000]
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import bench_config, stop_on_sigterm, write_parquet_prompts
from _goal import Goals
from _server import stopped_with_us

CHILD = """
import json, sys, time
started = float(sys.argv[1])
import anyio
from trig_stream import Engine
from trig_stream.config import parse_config
from trig_stream.testing import FakeJudge

config = parse_config(json.loads(sys.argv[2]), source=__import__("pathlib").Path("bench.toml"))
journal = config.run_dir / "journal.jsonl"
size_before = journal.stat().st_size
first = []
asked = []

class Probe(FakeJudge):
    async def judge(self, request):
        if not first:
            first.append(time.time())
        asked.append((request.sample.data_id, request.dimension))
        return await super().judge(request)

async def main():
    async with Engine(config, judges=[Probe()]) as engine:
        summary = await engine.drain()
    # Only now, outside the timed part: which asked keys were already in the journal?
    with journal.open("rb") as handle:
        done = {tuple(json.loads(line)[k] for k in ("data_id", "dimension"))
                for line in handle.read(size_before).splitlines()}
    print(json.dumps({"first_request_s": first[0] - started if first else None,
                      "repeated": sum(key in done for key in asked),
                      "new_judgements": summary.judged}))

anyio.run(main)
"""


def build_run(folder: Path, done: int, new: int) -> dict[str, object]:
    dataset = write_parquet_prompts(folder / "prompts.parquet", done + new)
    config = bench_config(folder / "runs", dataset)
    # A first run over the finished part writes the manifest, images and journal for real.
    first = dict(config, dataset={"path": str(dataset), "limit": done})
    code = (
        "import json, sys, anyio\n"
        "from pathlib import Path\n"
        "from trig_stream import Engine\n"
        "from trig_stream.config import parse_config\n"
        "config = parse_config(json.loads(sys.argv[1]), source=Path('bench.toml'))\n"
        "async def main():\n"
        "    async with Engine(config) as engine:\n"
        "        await engine.drain()\n"
        "anyio.run(main)\n"
    )
    import json

    subprocess.run(stopped_with_us([sys.executable, "-c", code, json.dumps(first)]), check=True)
    return config


def main() -> None:
    import json

    parser = argparse.ArgumentParser()
    parser.add_argument("--done", type=int, default=50_000, help="finished samples (x2 judgements)")
    parser.add_argument("--new", type=int, default=1_000)
    args = parser.parse_args()
    stop_on_sigterm()
    with tempfile.TemporaryDirectory() as tmp:
        built = time.perf_counter()
        config = build_run(Path(tmp), args.done, args.new)
        lines = sum(1 for _ in (Path(tmp) / "runs" / "bench" / "journal.jsonl").open())
        print(f"built a run dir with {lines} judgements in {time.perf_counter() - built:.0f} s")
        result = subprocess.run(
            stopped_with_us([sys.executable, "-c", CHILD, str(time.time()), json.dumps(config)]),
            capture_output=True,
            text=True,
            check=True,
        )
        report = json.loads(result.stdout.strip().splitlines()[-1])
    goals = Goals()
    first = report["first_request_s"]  # None: nothing was asked
    goals.at_most("P6 first new request", math.nan if first is None else first, 3.0, " s", 2)
    goals.equal("P6 requests about keys already judged", report["repeated"], 0)
    goals.equal("new judgements", report["new_judgements"], 2 * args.new)
    goals.finish()


if __name__ == "__main__":
    main()
