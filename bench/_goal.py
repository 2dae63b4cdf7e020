"""Each benchmark's results against its goals in bench/README.md, and its exit status.

A bench prints one line per goal, ending in ``MET`` or ``NOT MET``, then a verdict, and exits
1 when any goal was missed, so that a script or a device check can tell a miss from a pass
without reading the numbers. A correctness goal (every judgement made, none asked twice) is
checked the same way and always counts: a run that went wrong measured nothing.

    goals = Goals()
    goals.at_most("P6 first new request", seconds, 3.0, "s")
    goals.equal("P6 requests repeated", repeated, 0)
    goals.finish()
"""

from __future__ import annotations

import math
from typing import NoReturn


class Goals:
    """The goals one bench checked, and which of them were missed."""

    def __init__(self) -> None:
        self.missed: list[str] = []
        self.checked = 0

    def check(self, goal: str, met: bool, result: str) -> bool:
        """Print ``goal: result -> MET`` (or ``NOT MET``) and remember a miss; returns ``met``."""
        self.checked += 1
        print(f"{goal}: {result} -> {'MET' if met else 'NOT MET'}", flush=True)
        if not met:
            self.missed.append(f"{goal} ({result})")
        return met

    def at_most(
        self, goal: str, value: float, limit: float, unit: str = "", digits: int = 3
    ) -> bool:
        """``value <= limit``; a NaN (nothing measured) is a miss."""
        met = not math.isnan(value) and value <= limit
        return self.check(f"{goal} <= {limit:g}{unit}", met, f"{value:.{digits}f}{unit}")

    def at_least(
        self, goal: str, value: float, limit: float, unit: str = "", digits: int = 3
    ) -> bool:
        """``value >= limit``; a NaN (nothing measured) is a miss."""
        met = not math.isnan(value) and value >= limit
        return self.check(f"{goal} >= {limit:g}{unit}", met, f"{value:.{digits}f}{unit}")

    def equal(self, what: str, got: object, expected: object) -> bool:
        """A correctness check: ``got == expected``."""
        return self.check(f"{what} == {expected}", got == expected, str(got))

    def not_measured(self, goal: str, why: str) -> None:
        """A goal this run cannot tell (too small a run, say): printed, neither met nor missed."""
        print(f"{goal}: NOT MEASURED ({why})", flush=True)

    def measured_at(self, goal: str, size: int, minimum: int, option: str) -> bool:
        """Whether a run of ``size`` (its ``option``) is large enough to tell ``goal``; when
        it is not (start-up costs not amortised), ``goal`` is printed NOT MEASURED."""
        if size >= minimum:
            return True
        self.not_measured(
            goal,
            f"{option} {size}, under {minimum}: too small a run to tell; run {option} {minimum}",
        )
        return False

    def finish(self) -> NoReturn:
        """Print the verdict and exit: 1 when a goal was missed (or none was checked), else 0."""
        if self.missed:
            print(f"NOT MET: {len(self.missed)} of {self.checked} goals: " + "; ".join(self.missed))
            raise SystemExit(1)
        if not self.checked:
            print("NOT MET: no goal was checked")
            raise SystemExit(1)
        print(f"MET: all {self.checked} goals")
        raise SystemExit(0)
