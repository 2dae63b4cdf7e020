"""P6 against ``simulate-judge``: resume a 100k-judgement run, time to the first new request.

Like ``resume_latency.py``, but the resumed run is the real command, ``trig-stream run
--headless``, with the ``openai`` judge against ``simulate-judge`` in its own process, and
the server's ``GET /stats`` is the witness:

* the finished part (50,000 samples x 2 dimensions = 100,000 judgements) is written by an
  engine run whose judge answers at once but carries the ``openai`` judge's fingerprint, so
  the resumed run accepts the directory as its own (building it through HTTP would take
  minutes and prove nothing more). So the server never sees the finished keys, and its
  ``repeated`` count only catches a request the resumed run repeats itself;
* 1,000 new samples are appended at the end of the dataset (the reader passes every finished
  sample first);
* this script starts the command and polls ``/stats`` until the server has received a
  request: the time from the command's start to then is the resume latency;
* at the end the server must have received exactly 2 x new requests, the journal must hold
  each new sample's two judgements, ok, and no key twice, and exactly 2 x new lines more
  than the finished part. An ok judgement of a new sample took a request of its own, so the
  2 x new requests were all about new samples, the first one included: a resume that asked
  about a finished sample again would add a request beyond them.

The bench exits 1 when the goal (<= 3 s) or any of these checks is missed.

    .venv/bin/python bench/resume_latency_server.py [--done 50000] [--new 1000]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import sample_keys, stop_on_sigterm, write_parquet_prompts, write_toml
from _goal import Goals
from _server import (
    judge_stats,
    openai_judge,
    start_judge,
    stop_judge,
    stopped_with_us,
    synthetic_generator,
)

BUILD = """
import json, sys, anyio
from pathlib import Path
from trig_stream import Engine
from trig_stream.backends.judges.openai_judge import OpenAIJudge
from trig_stream.backends.judges.openai_options import OpenAIJudgeOptions
from trig_stream.config import parse_config
from trig_stream.testing import FakeJudge

config = parse_config(json.loads(sys.argv[1]), source=Path("bench.toml"))
entry = config.judges[0]
real = OpenAIJudge(entry.name, OpenAIJudgeOptions(**entry.options))

class Instant(FakeJudge):
    def fingerprint(self):
        return real.fingerprint()

async def main():
    async with Engine(config, judges=[Instant(entry.name, concurrency=64)]) as engine:
        await engine.drain()

anyio.run(main)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--done", type=int, default=50_000, help="finished samples (x2)")
    parser.add_argument("--new", type=int, default=1_000)
    args = parser.parse_args()
    stop_on_sigterm()
    process, url = start_judge("--latency", "0", "--capacity", "64")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            dataset = write_parquet_prompts(folder / "prompts.parquet", args.done + args.new)
            config = {
                "run": {"name": "bench", "output_dir": str(folder / "runs")},
                "dataset": {"path": str(dataset)},
                "generators": [synthetic_generator()],
                "judges": [openai_judge(url, 64)],
                "engine": {},
            }
            built = time.perf_counter()
            first = dict(config, dataset={"path": str(dataset), "limit": args.done})
            subprocess.run(
                stopped_with_us([sys.executable, "-c", BUILD, json.dumps(first)]), check=True
            )
            journal = folder / "runs" / "bench" / "journal.jsonl"
            lines = sum(1 for _ in journal.open("rb"))
            print(f"built a run dir with {lines} judgements in {time.perf_counter() - built:.0f} s")
            toml = write_toml(folder / "bench.toml", {k: v for k, v in config.items() if v})
            before = judge_stats(url)
            command = [sys.executable, "-m", "trig_stream", "run", str(toml), "--headless"]
            started = time.perf_counter()
            child = subprocess.Popen(
                stopped_with_us([*command, "--no-report"]),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            first_request_s = math.nan  # no request at all
            try:
                while child.poll() is None:
                    if judge_stats(url)["received"] > before["received"]:
                        first_request_s = time.perf_counter() - started
                        break
                    time.sleep(0.005)
                _, err = child.communicate(timeout=600)
            finally:
                if child.poll() is None:  # this bench was stopped meanwhile
                    child.kill()
                    child.wait()
            if child.returncode != 0:
                raise SystemExit(f"the resumed run failed ({child.returncode}): {err.decode()}")
            after = judge_stats(url)
            with journal.open("rb") as handle:
                judged = [json.loads(line) for line in handle]
    finally:
        stop_judge(process)
    received = after["received"] - before["received"]
    times = Counter((line["data_id"], line["dimension"]) for line in judged)
    new = sample_keys(args.done, args.done + args.new)
    new_ok = sum(
        (line["data_id"], line["dimension"]) in new and line["status"] == "ok" for line in judged
    )
    goals = Goals()
    goals.at_most("P6 first request after the command's start", first_request_s, 3.0, " s", 2)
    goals.equal("requests received (server /stats)", received, 2 * args.new)
    goals.equal("requests repeated (server /stats)", after["repeated"] - before["repeated"], 0)
    goals.equal("journal lines after the resume", len(judged), lines + 2 * args.new)
    goals.equal("keys judged more than once in the journal", sum(n > 1 for n in times.values()), 0)
    goals.equal("new samples' ok judgements in the journal", new_ok, 2 * args.new)
    goals.finish()


if __name__ == "__main__":
    main()
