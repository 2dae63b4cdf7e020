"""The identities of a dataset's selected records, read once and kept compact: what a reader of
a run directory (``trig-stream watch``) selects its samples from again, whenever the records
the run refused change, without reading the dataset again."""

from __future__ import annotations

from array import array
from collections.abc import Collection, Container
from dataclasses import dataclass, field

from trig_stream.dimensions import Dimension


@dataclass(slots=True)
class SampleIdentities:
    """Each record the dataset's filters select, the first of its ``data_id``, in dataset
    order: its index among all the records (as ``quarantine.jsonl``'s ``index``), data_id
    and the dimensions judged of it; limit not applied (see :meth:`selected`). Also each
    record whose data_id differs only in case from an earlier one's (the first spelled so):
    never a sample, it counts toward the limit once judged.

    Kept compact for a dataset of millions of records: the indexes in an array, the
    dimensions as a number into the few distinct tuples, and the data_ids as the ``str``
    objects the selected samples hold anyway (each selection shares them rather than
    decoding copies, as a :class:`~trig_stream.string_index.StringIndex` would).
    """

    complete: bool = False
    """Whether the dataset was read to its end; else reading stopped at a number of
    records (:meth:`~trig_stream.dataset.DatasetSource.sample_identities`)."""
    indexes: array[int] = field(default_factory=lambda: array("q"))
    data_ids: list[str] = field(default_factory=list)
    kinds: array[int] = field(default_factory=lambda: array("H"))
    """The number in :attr:`dimensions` of each record's dimensions."""
    dimensions: list[tuple[Dimension, ...]] = field(default_factory=list)
    case_duplicates: set[int] = field(default_factory=set)
    """The indexes of the records added as case duplicates (few)."""
    _numbers: dict[tuple[Dimension, ...], int] = field(default_factory=dict)

    def __len__(self) -> int:
        """How many records were added, case duplicates not counted."""
        return len(self.indexes) - len(self.case_duplicates)

    def add(
        self,
        index: int,
        data_id: str,
        dimensions: tuple[Dimension, ...],
        *,
        case_duplicate: bool = False,
    ) -> None:
        """Add a selected record (after every one added before it)."""
        if case_duplicate:
            self.case_duplicates.add(index)
        number = self._numbers.get(dimensions)
        if number is None:
            number = self._numbers[dimensions] = len(self.dimensions)
            self.dimensions.append(dimensions)
        self.indexes.append(index)
        self.data_ids.append(data_id)
        self.kinds.append(number)

    def selected(
        self, limit: int | None, *, refused: Collection[int] = (), judged: Container[str] = ()
    ) -> dict[str, tuple[Dimension, ...]] | None:
        """Each sample the run selects under ``limit``, as ``data_id`` -> the dimensions
        judged of it (see :meth:`~trig_stream.dataset.DatasetSource.selected_samples`,
        which gives the same); None when the records read end before the limit is filled
        and the dataset holds more (read again, further).

        Args:
            limit: the dataset's ``limit``.
            refused: the indexes of the records the run quarantined: left out, except that
                one whose data_id is in ``judged`` still counts toward ``limit``, as a case
                duplicate does.
            judged: the data_ids the run directory holds judgements of.
        """
        samples: dict[str, tuple[Dimension, ...]] = {}
        dimensions = self.dimensions
        case_duplicates = self.case_duplicates
        taken = 0
        for index, data_id, kind in zip(self.indexes, self.data_ids, self.kinds, strict=True):
            if index in refused or index in case_duplicates:
                if data_id not in judged:
                    continue
            else:
                samples[data_id] = dimensions[kind]
            taken += 1
            if limit is not None and taken >= limit:
                return samples
        if not self.complete:  # the limit not filled: the records past those read count
            return None
        return samples
