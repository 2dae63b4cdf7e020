"""Helpers shared by the benchmark scripts: datasets and configs of any size, and a clean
stop on SIGTERM."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from types import FrameType
from typing import Any

PAIRS = [
    "IQ-R_TA-C",
    "IQ-A_TA-S",
    "IQ-O_D-A",
    "TA-R_TA-C",
    "D-K_IQ-R",
    "R-T_IQ-A",
    "R-B_TA-C",
]


def stop_on_sigterm() -> None:
    """Make SIGTERM (``kill``, ``timeout``) stop this bench as Ctrl-C does, so that its
    ``finally`` blocks stop the judge server and its temporary folders are removed: SIGTERM's
    default action ends the process on the spot and leaves both behind. Call it first thing
    in ``main``.

    SIGTERM calls the SIGINT handler in force: outside an event loop Python's own, which
    raises ``KeyboardInterrupt``; while ``anyio.run`` runs, asyncio's, which cancels the run's
    main task, so that the engine stops as on Ctrl-C. An exception raised from a signal
    handler at a random point inside the event loop instead can leave the engine's worker
    threads waiting forever. asyncio installs its handler only where SIGINT has Python's
    default one, so a SIGINT that is ignored (a background job of a shell script) gets it
    back.
    """
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def stop(signum: int, frame: FrameType | None) -> None:
        on_sigint = signal.getsignal(signal.SIGINT)
        if not callable(on_sigint):
            raise KeyboardInterrupt
        on_sigint(signal.SIGINT, frame)

    signal.signal(signal.SIGTERM, stop)


def sample_id(index: int) -> str:
    """The data_id of the dataset writers' sample number ``index`` (from 0)."""
    return f"{PAIRS[index % len(PAIRS)]}_{index // len(PAIRS) + 1}"


def sample_keys(start: int, stop: int) -> set[tuple[str, str]]:
    """The (data_id, dimension) keys of the writers' samples ``start`` to ``stop - 1``: the
    judgements a run of them makes."""
    return {
        (sample_id(i), dimension)
        for i in range(start, stop)
        for dimension in PAIRS[i % len(PAIRS)].split("_")
    }


def write_parquet_prompts(path: Path, count: int) -> Path:
    """A TRIG-shaped t2i parquet file with ``count`` samples over a few pairs."""
    import polars as pl  # here, so that the JSON writer below works without polars

    pairs = [PAIRS[i % len(PAIRS)] for i in range(count)]
    pl.DataFrame(
        {
            "data_id": [sample_id(i) for i in range(count)],
            "prompt": [f"benchmark prompt {i}" for i in range(count)],
            "dimensions": [p.split("_") for p in pairs],
            "dimension_prompt": [["", ""]] * count,
            "parent_dataset": [["bench", "Origin"]] * count,
            "img_id": [""] * count,
            "item": [None] * count,
        }
    ).write_parquet(path, row_group_size=1024)
    return path


def write_json_prompts(path: Path, count: int) -> Path:
    """The samples of :func:`write_parquet_prompts` as a JSON list (no polars needed)."""
    records = []
    for i in range(count):
        pair = PAIRS[i % len(PAIRS)]
        records.append(
            {
                "data_id": sample_id(i),
                "prompt": f"benchmark prompt {i}",
                "dimension": pair.split("_"),
            }
        )
    path.write_text(json.dumps(records))
    return path


def bench_config(out: Path, dataset: Path, **engine: Any) -> dict[str, Any]:
    """A run config dict with the synthetic generator and the fake judge, no latency."""
    return {
        "run": {"name": "bench", "output_dir": str(out)},
        "dataset": {"path": str(dataset)},
        "generators": [
            {
                "name": "synth",
                "backend": "synthetic",
                "workers": 1,
                "batch_size": 8,
                "options": {"size": 8, "steps": 1},
            }
        ],
        "judges": [{"name": "trigscore", "backend": "fake", "concurrency": 64}],
        "engine": engine,
    }


def write_toml(path: Path, data: dict[str, Any]) -> Path:
    """Write a (flat enough) config dict as TOML."""
    lines: list[str] = []
    for section, value in data.items():
        if isinstance(value, list):
            for entry in value:
                lines.append(f"[[{section}]]")
                lines.extend(
                    f"{k} = {json.dumps(v) if not isinstance(v, dict) else _inline(v)}"
                    for k, v in entry.items()
                )
        else:
            lines.append(f"[{section}]")
            lines.extend(f"{k} = {json.dumps(v)}" for k, v in value.items())
    path.write_text("\n".join(lines) + "\n")
    return path


def _inline(table: dict[str, Any]) -> str:
    return "{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in table.items()) + " }"
