"""StringIndex: numbers in order of first sight, exact look-ups, a few bytes an entry."""

from __future__ import annotations

import random
import tracemalloc

import pytest

from trig_stream.string_index import INITIAL_TABLE, StringIndex


class SameHash(str):
    """A str whose hash collides with every other one of its kind."""

    def __hash__(self) -> int:
        return 12345


def test_numbers_follow_first_sight_and_repeat_for_a_known_string() -> None:
    index = StringIndex()
    assert [index.add(s) for s in ["b", "a", "b", "c", "a"]] == [0, 1, 0, 2, 1]
    assert list(index) == ["b", "a", "c"]
    assert len(index) == 3
    assert index.find("c") == 2
    assert index.find("d") is None
    assert "a" in index
    assert "d" not in index
    assert object() not in index


def test_many_strings_survive_the_table_growing() -> None:
    rng = random.Random(3)
    values = list(
        dict.fromkeys(f"IQ-R_TA-C_{rng.randrange(10**9)}" for _ in range(50 * INITIAL_TABLE))
    )
    index = StringIndex(values)
    assert len(index) == len(values)
    assert list(index) == values
    assert all(index.find(v) == n for n, v in enumerate(values))
    assert all(index.add(v) == n for n, v in enumerate(values))
    assert len(index) == len(values)
    assert index.find("IQ-R_TA-C_x") is None


def test_strings_whose_hashes_collide_stay_apart() -> None:
    index = StringIndex()
    first, second, third = SameHash("IQ-R_TA-C_1"), SameHash("IQ-R_TA-C_2"), SameHash("x")
    assert [index.add(first), index.add(second), index.add(third)] == [0, 1, 2]
    assert [index.find(first), index.find(second), index.find(third)] == [0, 1, 2]
    assert index.find(SameHash("IQ-R_TA-C_3")) is None
    assert index.add(SameHash("IQ-R_TA-C_2")) == 1


def test_sequence_access_and_any_text() -> None:
    values = ["é_1", "\udcff", "", "IQ-R_TA-C_9"]  # non-ASCII, a lone surrogate, empty
    index = StringIndex(values)
    assert index[0] == "é_1"
    assert index[1] == "\udcff"
    assert index[2] == ""
    assert index[-1] == "IQ-R_TA-C_9"
    assert index[1:3] == ["\udcff", ""]
    assert index.index("IQ-R_TA-C_9") == 3
    with pytest.raises(IndexError):
        index[4]
    with pytest.raises(IndexError):
        index[-5]


def test_an_entry_costs_a_fraction_of_a_set_of_str() -> None:
    index_bytes = _traced_bytes_per_entry(StringIndex(), 20_000)
    set_bytes = _traced_bytes_per_entry(set(), 20_000)
    assert index_bytes < 60
    assert index_bytes < set_bytes / 2


def _traced_bytes_per_entry(target: StringIndex | set[str], count: int) -> float:
    # Each id is a fresh str, as when read from a dataset or a journal line, and is dropped
    # once added: whatever stays allocated is what the structure keeps.
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for number in range(count):
            target.add(f"IQ-R_TA-C_{number}")
        return (tracemalloc.get_traced_memory()[0] - before) / count
    finally:
        tracemalloc.stop()
