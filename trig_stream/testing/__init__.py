"""Backends for tests and demos: a synthetic generator and a fake judge.

Both are deterministic functions of their inputs, so runs that use them can be compared
record by record, and both can inject failures at configured rates.
"""

from trig_stream.hashing import unit_hash
from trig_stream.testing.fake_judge import FakeJudge
from trig_stream.testing.synthetic import SyntheticGenerator

__all__ = ["FakeJudge", "SyntheticGenerator", "unit_hash"]
