"""The engine's retry policy: exponential backoff with jitter, honouring Retry-After."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

RETRY_AFTER_MAX_S = 300.0
"""The longest a server's Retry-After is waited for: one asking for an hour (or for ever)
held a worker, and a graceful stop behind it, that long; the attempt after it counts."""

MAX_DOUBLINGS = 64
"""The most times a backoff doubles: from a ``backoff_initial`` of a microsecond, far past any
``backoff_max``; far below a float's overflow."""


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to wait before asking again after a transient failure.

    The n-th retry waits a random time between half and all of
    ``min(backoff_max, backoff_initial * 2**(n-1))`` ("equal jitter"), and never less than the
    server's Retry-After, up to :data:`RETRY_AFTER_MAX_S`.
    """

    max_attempts: int = 5
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    random: Callable[[], float] = field(default=random.random, compare=False)

    def __post_init__(self) -> None:
        """Check the values against the bounds ``[engine]`` has for them: a policy made in
        Python skips the config's checks, and a NaN backoff waited for ever.

        Raises:
            ConfigError: a value the config would refuse, naming the field.
        """
        from trig_stream.config import EngineSection
        from trig_stream.config_values import field_value_problem
        from trig_stream.errors import ConfigError

        for name in ("max_attempts", "backoff_initial", "backoff_max"):
            problem = field_value_problem(EngineSection, name, getattr(self, name))
            if problem is not None:
                raise ConfigError(
                    f"RetryPolicy: {name} {problem}: give a value [engine] {name} would accept"
                )

    def should_retry(self, attempts: int) -> bool:
        """Whether another attempt is allowed after ``attempts`` have been made."""
        return attempts < self.max_attempts

    @staticmethod
    def gave_up(attempts: int) -> str:
        """How a failure that ran out of attempts says so: ``gave up after 3 attempts``."""
        return f"gave up after {attempts} attempt{'s' * (attempts != 1)}"

    def delay(self, attempts: int, retry_after: float | None = None) -> float:
        """Seconds to wait after the ``attempts``-th failed attempt."""
        # max_attempts is at most 100, but a caller may count its own attempts past it:
        # 2 ** 1024 overflows a float.
        doublings = min(attempts - 1, MAX_DOUBLINGS)
        ceiling = min(self.backoff_max, self.backoff_initial * 2**doublings)
        wait: float = ceiling * (0.5 + 0.5 * self.random())
        if retry_after is not None:
            wait = max(wait, min(retry_after, RETRY_AFTER_MAX_S))
        return wait
