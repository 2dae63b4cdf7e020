"""A compact index of distinct strings, numbered in the order they were first added.

A run keeps a few structures with one entry per data_id for its whole length: the dataset
reader's duplicate check and the live analysis's slot of each image. As a Python ``set`` or
``dict`` of ``str`` an entry costs ~100 bytes (the string object and its table slots), which
made a run's peak memory grow with its dataset by ~20 MiB per 100k samples. Here an entry
costs ~30 bytes: its UTF-8 bytes in one shared buffer, its end offset and hash in typed
arrays, and a 4-byte slot in an open-addressing table. Lookups compare the stored bytes, so
the index is exact (no false matches between strings whose hashes collide).
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator, Sequence
from typing import Final, overload

INITIAL_TABLE: Final = 64
"""Table slots before the first doubling (a power of two)."""
_EMPTY: Final = -1


class StringIndex(Sequence[str]):
    """Distinct strings, each with a number: 0 for the first added, 1 for the next...

    A read-only :class:`~collections.abc.Sequence` of the strings in that order, plus
    :meth:`add` and :meth:`find`. Not thread-safe: one writer, and readers on that thread.

    Example:
        >>> ids = StringIndex()
        >>> ids.add("IQ-R_TA-C_1"), ids.add("IQ-R_TA-C_2"), ids.add("IQ-R_TA-C_1")
        (0, 1, 0)
        >>> "IQ-R_TA-C_2" in ids, ids[1], len(ids)
        (True, 'IQ-R_TA-C_2', 2)
    """

    __slots__ = ("_ends", "_hashes", "_mask", "_table", "_text")

    def __init__(self, values: Iterable[str] = ()) -> None:
        self._text = bytearray()
        self._ends = array("q")
        """End offset in ``_text`` of each string; it starts where the previous one ends."""
        self._hashes = array("q")
        """``hash()`` of each string: probes compare it before the bytes, growth reuses it."""
        self._table = array("i", [_EMPTY]) * INITIAL_TABLE
        """Open addressing with linear probing: the number of a string, or ``_EMPTY``."""
        self._mask = INITIAL_TABLE - 1
        for value in values:
            self.add(value)

    def add(self, value: str) -> int:
        """The number of ``value``, adding it first when it is new."""
        code = hash(value)
        encoded = _encode(value)
        table = self._table
        position = self._slot(code, encoded)
        if (number := table[position]) != _EMPTY:
            return number
        number = len(self._ends)
        self._text += encoded
        self._ends.append(len(self._text))
        self._hashes.append(code)
        table[position] = number
        # At most half full, so a probe ends after ~1.5 slots on average.
        if 2 * (number + 1) > len(table):
            self._grow()
        return number

    def find(self, value: str) -> int | None:
        """The number of ``value``, or None when it was never added."""
        number = self._table[self._slot(hash(value), _encode(value))]
        return None if number == _EMPTY else number

    def _slot(self, code: int, encoded: bytes) -> int:
        """Where the string with this hash and encoding is in the table, or would go."""
        table, mask, hashes = self._table, self._mask, self._hashes
        position = code & mask
        while (number := table[position]) != _EMPTY:
            if hashes[number] == code and self._bytes(number) == encoded:
                return position
            position = (position + 1) & mask
        return position

    def __contains__(self, value: object) -> bool:
        return isinstance(value, str) and self.find(value) is not None

    def __len__(self) -> int:
        return len(self._ends)

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> list[str]: ...

    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        size = len(self._ends)
        if index < 0:
            index += size
        if not 0 <= index < size:
            raise IndexError(f"string number {index} out of range (0..{size - 1})")
        return self._bytes(index).decode("utf-8", "surrogatepass")

    def __iter__(self) -> Iterator[str]:
        for number in range(len(self._ends)):
            yield self[number]

    def nbytes(self) -> int:
        """Bytes held by the index's buffers (what it costs beyond a small fixed overhead)."""
        arrays = (self._ends, self._hashes, self._table)
        return len(self._text) + sum(a.itemsize * len(a) for a in arrays)

    def _bytes(self, number: int) -> bytearray:
        start = self._ends[number - 1] if number else 0
        return self._text[start : self._ends[number]]

    def _grow(self) -> None:
        size = 2 * len(self._table)
        table = array("i", [_EMPTY]) * size
        mask = size - 1
        for number, code in enumerate(self._hashes):
            position = code & mask
            while table[position] != _EMPTY:
                position = (position + 1) & mask
            table[position] = number
        self._table, self._mask = table, mask


def _encode(value: str) -> bytes:
    # surrogatepass: any str round-trips, even one that is not valid Unicode text.
    return value.encode("utf-8", "surrogatepass")
