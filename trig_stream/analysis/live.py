"""The relation analysis kept up to date while a run streams judgements in.

:meth:`RelationTracker.add` costs the same whatever has been added before: a dictionary
look-up, a look-up in the (model, metric)'s :class:`~trig_stream.string_index.StringIndex` of
data_ids and one store into a growable array (capacities double, so appends are amortised O(1)).
Re-judging a key overwrites its slot, so the last judgement of a key wins, as in the journal;
a sample judged anew under another pair (its pair changed in the dataset) leaves its old
pair's slot whole, as a from-scratch analysis of the journal's last lines has it there no more.
:meth:`RelationTracker.snapshot` runs the same :func:`analyse_model` as the batch path over
the arrays, so a snapshot always equals a from-scratch analysis of the same judgements (a
test checks it at random points of a stream).

The engine calls :meth:`~RelationTracker.add` from its event loop for every durable judgement;
the TUI or a reporter calls :meth:`~RelationTracker.snapshot` when it wants to draw.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterable, Sequence
from typing import Final, overload

import numpy as np

from trig_stream.analysis.relations import (
    DTM,
    AnalysisKey,
    ModelAnalysis,
    PairColumns,
    analyse_model,
)
from trig_stream.config import RelationSection
from trig_stream.dimensions import split_pair
from trig_stream.records import Judgement
from trig_stream.string_index import StringIndex

INITIAL_CAPACITY: Final = 256
"""Slots per pair before the first doubling (a TRIG pair holds 300 images)."""


class _SlotIds(Sequence[str]):
    """A pair's data_ids, slot by slot: numbers into its group's :class:`StringIndex`."""

    __slots__ = ("_ids", "_numbers")

    def __init__(self, ids: StringIndex, numbers: array[int]) -> None:
        self._ids = ids
        self._numbers = numbers

    def __len__(self) -> int:
        return len(self._numbers)

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> list[str]: ...

    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, slice):
            return [self._ids[number] for number in self._numbers[index]]
        return self._ids[self._numbers[index]]


class _PairBuffer:
    """One pair's growing columns; slot ``i`` is the image ``data_ids[i]``.

    The data_ids live once per (model, metric) in a :class:`StringIndex` rather than a list
    and a dict of ``str``: a run keeps one slot per image for its whole length, and at ~30
    bytes a slot instead of ~120 the tracker no longer makes a run's memory grow with its
    dataset. A slot holds the number of its data_id there.
    """

    __slots__ = (
        "data_ids",
        "first",
        "judged_x",
        "judged_y",
        "moved",
        "numbers",
        "pair",
        "position",
        "second",
        "x",
        "y",
    )

    def __init__(self, pair: str, position: int, ids: StringIndex) -> None:
        self.pair = pair
        self.position = position
        """Its index in its group's list of buffers."""
        self.first, self.second = split_pair(pair)
        self.numbers = array("i")
        self.data_ids = _SlotIds(ids, self.numbers)
        self.x = np.full(INITIAL_CAPACITY, math.nan)
        self.y = np.full(INITIAL_CAPACITY, math.nan)
        # A judgement of any status on each dimension: a failed one is not one never asked for.
        self.judged_x = np.zeros(INITIAL_CAPACITY, bool)
        self.judged_y = np.zeros(INITIAL_CAPACITY, bool)
        # Its data_id was judged under another pair since: the slot is of no image here. Its
        # lines are kept, not cleared: judged again under this pair, the sample has them back
        # (the last line of each key, as in the journal).
        self.moved = np.zeros(INITIAL_CAPACITY, bool)

    def new_slot(self, number: int) -> int:
        """A slot for the data_id of group number ``number``."""
        slot = len(self.numbers)
        self.numbers.append(number)
        if slot == self.x.shape[0]:
            self.x = _grown(self.x)
            self.y = _grown(self.y)
            self.judged_x = _grown(self.judged_x)
            self.judged_y = _grown(self.judged_y)
            self.moved = _grown(self.moved)
        return slot

    def clear(self, slot: int, dimension: str) -> None:
        """Forget the judgement of ``dimension`` in ``slot`` (its key moved to another pair)."""
        if dimension == self.first:
            self.x[slot] = math.nan
            self.judged_x[slot] = False
        elif dimension == self.second:
            self.y[slot] = math.nan
            self.judged_y[slot] = False

    def judged(self) -> bool:
        """Whether a slot holds a judgement (every one may have moved to another pair)."""
        size = len(self.numbers)
        here = ~self.moved[:size]
        return bool((self.judged_x[:size] & here).any() or (self.judged_y[:size] & here).any())

    def columns(self) -> PairColumns:
        # Copies: the analysis must not change if judgements keep arriving while it is read.
        size = len(self.numbers)
        moved = self.moved[:size]
        return PairColumns(
            self.pair,
            self.first,
            self.second,
            self.data_ids,
            np.where(moved, math.nan, self.x[:size]),
            np.where(moved, math.nan, self.y[:size]),
            self.judged_x[:size] & ~moved,
            self.judged_y[:size] & ~moved,
        )


def _grown(values: np.ndarray) -> np.ndarray:
    # New slots are NaN (no score) in a score column, False (not judged) in a judged one.
    fill = math.nan if values.dtype.kind == "f" else False
    grown = np.full(values.shape[0] * 2, fill, values.dtype)
    grown[: values.shape[0]] = values
    return grown


_NOWHERE: Final = -1
_SEVERAL: Final = -2


class _Group:
    """The buffers of one (model, metric), and where each of its data_ids has its slots.

    An image has its slot in the buffer of its pair. A data_id judged under another pair
    since (a dataset whose sample changed pair, as a resume finds it) has slots in several:
    those are looked up in ``elsewhere``. It is of the pair it was judged under last (see
    :func:`~trig_stream.analysis.relations.current_pairs`): its slots in the others are
    marked moved, and a key (data_id, dimension) judged anew under another pair is cleared
    from the one it was in, as the journal keeps its last line.
    """

    __slots__ = ("buffers", "elsewhere", "home", "home_slot", "ids")

    def __init__(self) -> None:
        self.buffers: list[_PairBuffer] = []
        self.ids = StringIndex()
        self.home = array("h")
        """Per data_id: the position of the only buffer it has a slot in, or _SEVERAL."""
        self.home_slot = array("i")
        self.elsewhere: dict[tuple[int, int], int] = {}
        """(data_id number, buffer position) -> slot, for the data_ids of _SEVERAL."""

    def slot(self, data_id: str, buffer: _PairBuffer, dimension: str) -> int:
        """The slot of ``data_id`` in ``buffer``, made if needed, after clearing the key
        (``data_id``, ``dimension``) from every other buffer and marking the data_id's
        slots there moved."""
        number = self.ids.add(data_id)
        if number == len(self.home):
            self.home.append(_NOWHERE)
            self.home_slot.append(0)
        home = self.home[number]
        if home == buffer.position:  # the common case: an image judged under one pair
            return self.home_slot[number]
        if home == _NOWHERE:
            slot = buffer.new_slot(number)
            self.home[number], self.home_slot[number] = buffer.position, slot
            return slot
        if home != _SEVERAL:
            self.elsewhere[(number, home)] = self.home_slot[number]
            self.home[number] = _SEVERAL
        there = self.elsewhere.get((number, buffer.position))
        slot = buffer.new_slot(number) if there is None else there
        self.elsewhere[(number, buffer.position)] = slot
        buffer.moved[slot] = False
        for other in self.buffers:
            found = self.elsewhere.get((number, other.position))
            if other is not buffer and found is not None:
                other.clear(found, dimension)
                other.moved[found] = True
        return slot


class RelationTracker:
    """A live relation analysis per (model, metric), fed one judgement at a time.

    Args:
        thresholds: the relation thresholds (TRIG's defaults when omitted); they are applied
            at snapshot time, so :attr:`thresholds` may be replaced between snapshots.
        metric: track only judgements of this metric; all metrics (separately) when None.

    Example:
        >>> tracker = RelationTracker()
        >>> for judgement in judgements:  # doctest: +SKIP
        ...     tracker.add(judgement)
        >>> tracker.dtm("flux").code("IQ-R", "TA-C")  # doctest: +SKIP
    """

    def __init__(self, thresholds: RelationSection | None = None, *, metric: str | None = None):
        self.thresholds = thresholds or RelationSection()
        self.metric = metric
        self._buffers: dict[tuple[str, str, str], _PairBuffer] = {}
        self._groups: dict[AnalysisKey, _Group] = {}
        self.added = 0
        """Judgements taken into account."""
        self.ignored = 0
        """Judgements of another metric, or whose dimension is not in their pair."""

    def add(self, judgement: Judgement) -> None:
        """Take one judgement into account; a later one of the same key replaces it, under
        the same pair or another (a sample whose pair changed in the dataset).

        Raises:
            ValueError: the judgement's ``pair`` is not of the form ``A_B`` (only checked the
                first time a pair is seen).
        """
        if self.metric is not None and judgement.metric != self.metric:
            self.ignored += 1
            return
        buffer_key = (judgement.model, judgement.metric, judgement.pair)
        buffer = self._buffers.get(buffer_key)
        dimension = judgement.dimension
        if buffer is None:
            if dimension not in split_pair(judgement.pair):
                self.ignored += 1
                return
            buffer = self._new_buffer(buffer_key)
        if dimension == buffer.first:
            on_x = True
        elif dimension == buffer.second:
            on_x = False
        else:
            self.ignored += 1
            return
        group = self._groups[(judgement.model, judgement.metric)]
        slot = group.slot(judgement.data_id, buffer, dimension)
        score = judgement.score
        value = score if judgement.status == "ok" and score is not None else math.nan
        # Index the buffer's arrays only now: finding the slot may have grown them.
        if on_x:
            buffer.x[slot] = value
            buffer.judged_x[slot] = True
        else:
            buffer.y[slot] = value
            buffer.judged_y[slot] = True
        self.added += 1

    def extend(self, judgements: Iterable[Judgement]) -> None:
        """:meth:`add` every judgement, in order."""
        for judgement in judgements:
            self.add(judgement)

    def groups(self) -> list[AnalysisKey]:
        """The (model, metric) groups seen so far, in order of appearance."""
        return list(self._groups)

    def analysis(self, model: str, metric: str | None = None) -> ModelAnalysis:
        """The full analysis of one model now (``metric`` may be omitted when it has one).

        Raises:
            KeyError: no judgement of that model (and metric) was added.
        """
        key = self._key(model, metric)
        # A pair whose every image has moved to another pair is gone, as from the journal.
        columns = [b.columns() for b in self._groups[key].buffers if b.judged()]
        return analyse_model(key[0], key[1], columns, self.thresholds)

    def dtm(self, model: str, metric: str | None = None) -> DTM:
        """The DTM of one model now; see :meth:`analysis`."""
        return self.analysis(model, metric).dtm

    def snapshot(self) -> dict[AnalysisKey, ModelAnalysis]:
        """The full analysis of every (model, metric) seen so far.

        It may be taken from another thread than the one adding judgements (the engine's
        event loop): it holds the groups seen as it began, and the judgements of a moment,
        a key added meanwhile in or out. Its other readers are for the adding thread.
        """
        # A copy: a group the adding thread makes meanwhile broke the loop over the dict
        # ("dictionary changed size during iteration").
        return {key: self.analysis(*key) for key in list(self._groups)}

    def _new_buffer(self, key: tuple[str, str, str]) -> _PairBuffer:
        group = self._groups.setdefault((key[0], key[1]), _Group())
        buffer = _PairBuffer(key[2], len(group.buffers), group.ids)
        self._buffers[key] = buffer
        group.buffers.append(buffer)
        return buffer

    def _key(self, model: str, metric: str | None) -> AnalysisKey:
        if metric is not None:
            return (model, metric)
        metrics = [m for (name, m) in self._groups if name == model]
        if len(metrics) != 1:
            raise KeyError(
                f"model {model!r} has {len(metrics)} metrics here; name one of {metrics}"
                if metrics
                else f"no judgement of model {model!r} was added"
            )
        return (model, metrics[0])
