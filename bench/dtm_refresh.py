"""Time a full DTM refresh of the live relation analysis at 100k judgements.

10 dimensions, 42 pairs (as in TRIG's t2i split), 100,000 ok judgements (50,000 images judged
on their pair's two dimensions). Prints the median time of a full refresh
(``RelationTracker.snapshot()``: every pair's correlation, zones, code, means and the DTM), the
cost of one ``add``, and a from-scratch batch analysis for comparison. Goal (bench/README.md,
P5): a median of 50 ms or less at 100,000 judgements; the bench exits 1 when it is missed.
With fewer ``--judgements`` the goal is NOT MEASURED (a smaller analysis refreshes faster).

Run: ``.venv/bin/python bench/dtm_refresh.py [--judgements 100000] [--repeats 30]``
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _goal import Goals

from trig_stream.analysis import RelationTracker, analyse_judgements
from trig_stream.dimensions import SORTED_DIMENSIONS
from trig_stream.records import JudgeFingerprint, Judgement

JUDGEMENTS = 100_000
"""P5's size, the default of ``--judgements``."""
REPEATS = 30
PAIRS = 42
"""Dimension pairs judged, as in TRIG's t2i split."""


def make_judgements(count: int, seed: int = 0) -> list[Judgement]:
    """``count`` ok judgements over 42 pairs with correlated random scores."""
    rng = np.random.default_rng(seed)
    pairs = list(itertools.combinations(SORTED_DIMENSIONS, 2))[:PAIRS]
    judge = JudgeFingerprint(backend="bench", model="bench")
    out = []
    for index in range(count // 2):
        first, second = pairs[index % len(pairs)]
        pair = f"{first}_{second}"
        data_id = f"{pair}_{index // len(pairs) + 1}"
        a = float(rng.random())
        b = float(np.clip(0.6 * a + 0.4 * rng.random(), 0.0, 1.0))
        for dimension, score in ((first, a), (second, b)):
            out.append(
                Judgement.model_construct(
                    model="bench",
                    data_id=data_id,
                    task="t2i",
                    pair=pair,
                    dimension=dimension,
                    metric="trigscore",
                    judge=judge,
                    status="ok",
                    score=round(score, 3),
                )
            )
    return out


def judgement_count(text: str) -> int:
    """``--judgements``: an even count that gives every one of the 42 pairs an image."""
    count = int(text)
    if count < 2 * PAIRS or count % 2:
        raise argparse.ArgumentTypeError(
            f"{count}: give an even count of {2 * PAIRS} or more (two judgements per image, "
            f"an image for each of the {PAIRS} pairs)"
        )
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--judgements",
        type=judgement_count,
        default=JUDGEMENTS,
        help=f"ok judgements, two per image (default {JUDGEMENTS:,}, the goal's size)",
    )
    parser.add_argument(
        "--repeats", type=int, default=REPEATS, help=f"full refreshes timed (default {REPEATS})"
    )
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: time at least one refresh")
    judgements = make_judgements(args.judgements)
    tracker = RelationTracker()
    start = time.perf_counter()
    tracker.extend(judgements)
    add_us = (time.perf_counter() - start) / len(judgements) * 1e6
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        tracker.snapshot()
        times.append(time.perf_counter() - start)
    start = time.perf_counter()
    analyse_judgements(judgements)
    batch_ms = (time.perf_counter() - start) * 1e3
    pairs = len(tracker.analysis("bench").pairs)
    print(f"judgements: {len(judgements)}, pairs: {pairs}")
    print(f"add: {add_us:.2f} us per judgement")
    print(
        f"full DTM refresh (snapshot): median {statistics.median(times) * 1e3:.1f} ms, "
        f"max {max(times) * 1e3:.1f} ms over {args.repeats}"
    )
    print(f"batch analysis from scratch: {batch_ms:.0f} ms")
    goals = Goals()
    goals.equal("pairs in the analysis", pairs, PAIRS)
    goal = "P5 full DTM refresh, median"
    if goals.measured_at(goal, args.judgements, JUDGEMENTS, "--judgements"):
        goals.at_most(goal, statistics.median(times) * 1e3, 50, " ms", 1)
    goals.finish()


if __name__ == "__main__":
    main()
