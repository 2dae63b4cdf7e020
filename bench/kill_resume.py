"""kill -9 of ``trig-stream run`` at 20 random moments, resumed each time; then compare.

The run (synthetic generator, two models; the fake judge with some permanent errors and
transient failures; everything deterministic) is killed with SIGKILL at a random time after
each start, until 20 kills have landed after the run judged something (a kill before the
journal grew since that start is printed and not counted; 10 such in a row end the kills),
then run to the end. Checked against an uninterrupted run of the same config: every (model,
data_id, dimension, metric) appears exactly once in the journal, none is missing and none is
extra (the keys are the uninterrupted run's), every status and score is the same, and so is
the DTM (``analyse_judgements(latest_judgements(...))``). Temporary files are counted over
the whole run directory twice: after the last kill, before the final start, none may lie
outside the places a run's opening and closing clear (``images/.partial`` and
``quarantine.jsonl.partial``: those are printed), and after the final run none may be left
at all. Each check is a MET / NOT MET line, and the bench exits 1 when one is missed.

    .venv/bin/python bench/kill_resume.py [--prompts 2500] [--kills 20] [--seed 1]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import stop_on_sigterm, write_parquet_prompts
from _goal import Goals
from _server import stopped_with_us

from trig_stream.analysis import analyse_judgements
from trig_stream.config import load_config
from trig_stream.engine import Engine
from trig_stream.journal import latest_judgements, read_journal
from trig_stream.manifest import IMAGES
from trig_stream.quarantine_text import QUARANTINE_PARTIAL
from trig_stream.run_dir_paths import PARTIAL
from trig_stream.store import LEFTOVER_TEMPORARY

CONFIG = """\
[run]
name = "{name}"
output_dir = "runs"

[dataset]
path = "prompts.parquet"

[[generators]]
name = "a"
backend = "synthetic"
workers = 2
batch_size = 4
options = {{ size = 32 }}

[[generators]]
name = "b"
backend = "synthetic"
options = {{ size = 32 }}

[[judges]]
backend = "fake"
concurrency = 8
options = {{ latency_s = {latency}, error_rate = 0.03, retryable_rate = 0.1 }}

[engine]
backoff_initial = 0.001
backoff_max = 0.002
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # Enough that 20 kills land before the end: at 1,000 a faster machine finished first.
    parser.add_argument("--prompts", type=int, default=2500)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--min-delay", type=float, default=1.0, help="earliest kill after a start")
    parser.add_argument("--max-delay", type=float, default=4.0, help="latest kill after a start")
    args = parser.parse_args()
    stop_on_sigterm()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_parquet_prompts(folder / "prompts.parquet", args.prompts)
        killed = folder / "killed.toml"
        killed.write_text(CONFIG.format(name="killed", latency=0.05))
        command = [sys.executable, "-m", "trig_stream", "run", str(killed), "--headless"]
        command.append("--no-report")
        journal = folder / "runs" / "killed" / "journal.jsonl"
        tally = KillTally(wanted=args.kills)
        lines = journal_lines(journal)
        while not tally.done():
            process = subprocess.Popen(
                stopped_with_us(command), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            delay = rng.uniform(args.min_delay, args.max_delay)
            try:
                process.wait(timeout=delay)
                print(
                    f"start {tally.starts + 1}: the run finished before its kill at {delay:.2f} s"
                )
                break
            except subprocess.TimeoutExpired:
                pass
            finally:
                # The kill -9 this bench is about; also when this bench is stopped meanwhile,
                # so that no run goes on writing into the folder being removed.
                if process.poll() is None:
                    os.kill(process.pid, signal.SIGKILL)
                process.wait()
            before, lines = lines, journal_lines(journal)
            if tally.record(before, lines):
                print(f"kill {tally.effective:2d} after {delay:.2f} s: journal {lines} lines")
            else:
                print(
                    f"kill after {delay:.2f} s: journal {lines} lines, nothing judged since "
                    "its start: not counted"
                )
        if tally.gave_up():
            print(
                f"gave up after {tally.idle} kills in a row that judged nothing: "
                "raise --min-delay / --max-delay"
            )
        run_dir = folder / "runs" / "killed"
        after_kills = Leftovers.of(run_dir)
        print(
            f"after the last kill: {len(after_kills.cleared)} temporary files where the next "
            f"run clears them, {len(after_kills.stray)} elsewhere"
        )
        final = subprocess.run(stopped_with_us(command), capture_output=True)
        if final.returncode != 0:
            raise SystemExit(f"the last, uninterrupted start failed: {final.stderr.decode()}")

        reference = folder / "reference.toml"
        reference.write_text(CONFIG.format(name="reference", latency=0.0))

        async def uninterrupted() -> None:
            async with Engine(load_config(reference)) as engine:
                await engine.drain()

        anyio.run(uninterrupted)
        found = compare(journal, folder / "runs" / "reference" / "journal.jsonl")
        after_final = Leftovers.of(run_dir)
    print(
        f"{tally.starts} kills, {tally.effective} after the run had judged something; "
        f"{found.expected} keys expected"
    )
    goals = Goals()
    goals.equal("kills after new judgements, before the run finished", tally.effective, args.kills)
    goals.equal("R1 keys judged twice", found.doubled, 0)
    goals.equal("R1 keys missing", found.missing, 0)
    goals.equal("R1 keys the uninterrupted run does not have", found.extra, 0)
    goals.equal("R1 outcomes differing", found.differ, 0)
    goals.equal("R1 DTM equal to the uninterrupted run's", found.same_dtm, True)
    goals.equal(
        "R1 temporary files after the kills, outside images/.partial and the quarantine's",
        len(after_kills.stray),
        0,
    )
    goals.equal("R1 temporary files left after the final run", len(after_final.all_files()), 0)
    goals.finish()


def journal_lines(journal: Path) -> int:
    """Complete lines in ``journal`` (0 before the run has made it)."""
    return journal.read_bytes().count(b"\n") if journal.exists() else 0


@dataclass(frozen=True)
class Leftovers:
    """A run directory's temporary files: the hidden ``.NAME.PID.THREAD.tmp`` of an atomic
    write (``trig_stream.files._temporary_name``), anything in ``images/.partial``, and the
    unfinished quarantine list."""

    cleared: list[Path]
    """Where a run clears them: ``images/.partial``'s files (emptied when a run opens), the
    manifest's temporary file in the run directory (removed when a run opens) and
    ``quarantine.jsonl.partial`` (put in place or removed when a run closes). A kill -9 may
    leave these."""
    stray: list[Path]
    """Temporary files anywhere else, which no run removes: never expected."""

    @classmethod
    def of(cls, run_dir: Path) -> Leftovers:
        partial = run_dir / IMAGES / PARTIAL
        cleared = sorted(partial.iterdir()) if partial.is_dir() else []
        cleared += sorted(p for p in run_dir.iterdir() if LEFTOVER_TEMPORARY.fullmatch(p.name))
        if (run_dir / QUARANTINE_PARTIAL).exists():
            cleared.append(run_dir / QUARANTINE_PARTIAL)
        stray = sorted(
            p for p in run_dir.rglob(".*.tmp") if p.parent != partial and p not in cleared
        )
        return cls(cleared=cleared, stray=stray)

    def all_files(self) -> list[Path]:
        return self.cleared + self.stray


@dataclass
class KillTally:
    """The kills so far, and which of them count: a kill counts only when the journal grew
    between the start it ended and the kill, so that a kill that lands while the run still
    loads (nothing judged yet) is not counted as one that interrupted judging."""

    wanted: int
    """Kills to count (``--kills``)."""
    most_idle: int = 10
    """Kills in a row that judged nothing before giving up (delays too short to judge)."""
    starts: int = 0
    """Runs killed."""
    effective: int = 0
    """Runs killed after the journal grew since their start."""
    idle: int = 0
    """Kills in a row, up to now, that found the journal as it was."""

    def record(self, lines_before: int, lines_after: int) -> bool:
        """A run started with ``lines_before`` journal lines was killed with
        ``lines_after``; returns whether the kill counts."""
        self.starts += 1
        if lines_after > lines_before:
            self.effective += 1
            self.idle = 0
            return True
        self.idle += 1
        return False

    def gave_up(self) -> bool:
        return self.idle >= self.most_idle

    def done(self) -> bool:
        """Enough kills counted, or too many in a row judged nothing."""
        return self.effective >= self.wanted or self.gave_up()


@dataclass(frozen=True)
class Comparison:
    """The killed run's journal against the uninterrupted run's."""

    expected: int
    """Keys (model, data_id, dimension, metric) the uninterrupted run judged."""
    doubled: int
    """Keys with more than one line in the killed run's journal."""
    missing: int
    """Keys of the uninterrupted run that the killed run lacks."""
    extra: int
    """Keys of the killed run that the uninterrupted run lacks."""
    differ: int
    """Keys of both whose status or score differ."""
    same_dtm: bool


def compare(killed: Path, reference: Path) -> Comparison:
    """Every key judged exactly once holds when ``doubled``, ``missing`` and ``extra`` are 0:
    the killed run's keys are then the uninterrupted run's, each once."""
    counts = Counter(j.key for j in read_journal(killed))
    got, expected = latest_judgements(killed), latest_judgements(reference)
    differ = sum(
        1
        for key in expected.keys() & got.keys()
        if (got[key].status, got[key].score) != (expected[key].status, expected[key].score)
    )
    ours, theirs = analyse_judgements(got.values()), analyse_judgements(expected.values())
    return Comparison(
        expected=len(expected),
        doubled=sum(1 for n in counts.values() if n > 1),
        missing=len(expected.keys() - got.keys()),
        extra=len(got.keys() - expected.keys()),
        differ=differ,
        same_dtm=ours.keys() == theirs.keys() and all(ours[k].dtm == theirs[k].dtm for k in ours),
    )


if __name__ == "__main__":
    main()
