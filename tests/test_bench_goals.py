"""The benchmarks' goal checks (``bench/_goal.py``): a missed goal is exit status 1."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def load_goal_module() -> ModuleType:
    # bench/ is scripts, not a package: load the helper from its file.
    spec = importlib.util.spec_from_file_location("bench_goal", BENCH / "_goal.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def finish_status(goals: Any) -> object:
    with pytest.raises(SystemExit) as stopped:
        goals.finish()
    return stopped.value.code


def test_all_goals_met_exit_0(capsys: pytest.CaptureFixture[str]) -> None:
    goals = load_goal_module().Goals()
    assert goals.at_most("P6 first new request", 2.5, 3.0, " s")
    assert goals.at_least("P2 speed-up", 41.0, 40, "x")
    assert goals.equal("requests received", 200, 200)
    assert finish_status(goals) == 0
    out = capsys.readouterr().out
    assert "P6 first new request <= 3 s: 2.500 s -> MET" in out
    assert "MET: all 3 goals" in out


def test_a_missed_goal_exits_1_and_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    goals = load_goal_module().Goals()
    goals.at_most("P3 CPU per judgement", 0.4, 0.5, " ms")
    assert not goals.equal("requests received", 1100, 200)
    assert finish_status(goals) == 1
    out = capsys.readouterr().out
    assert "requests received == 200: 1100 -> NOT MET" in out
    assert "NOT MET: 1 of 2 goals: requests received == 200 (1100)" in out


@pytest.mark.parametrize("check", ["at_most", "at_least"])
def test_nothing_measured_is_a_miss(check: str) -> None:
    goals = load_goal_module().Goals()
    assert not getattr(goals, check)("first request", math.nan, 3.0)
    assert finish_status(goals) == 1


def test_not_measured_is_neither_met_nor_missed(capsys: pytest.CaptureFixture[str]) -> None:
    goals = load_goal_module().Goals()
    goals.not_measured("R2 flat", "4 samples needed")
    goals.equal("judgements made", 10, 10)
    assert finish_status(goals) == 0
    assert "R2 flat: NOT MEASURED (4 samples needed)" in capsys.readouterr().out


def test_no_goal_checked_is_a_miss() -> None:
    assert finish_status(load_goal_module().Goals()) == 1
