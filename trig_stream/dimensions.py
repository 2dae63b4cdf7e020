"""TRIG's vocabulary: the ten dimensions, the three tasks, and dimension pairs.

Every TRIG sample stresses one unordered pair of dimensions and is judged on those two only.
A pair is written ``A_B`` with the dimensions in the order the sample gives them; that order is
not canonical (some toxicity ids start with ``R-T_``), so code that needs a stable key uses
:func:`unordered_pair`.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Final, Literal, TypeAlias, get_args

Dimension: TypeAlias = Literal[
    "IQ-R", "IQ-O", "IQ-A", "TA-C", "TA-R", "TA-S", "D-K", "D-A", "R-T", "R-B"
]
"""A TRIG dimension code. Codes contain ``-``, never ``_``."""

Task: TypeAlias = Literal["t2i", "p2p", "s2p"]
"""t2i: text to image; p2p: image editing; s2p: subject-driven generation."""

DIMENSIONS: Final[tuple[Dimension, ...]] = get_args(Dimension)
"""The ten dimensions in TRIG's canonical order."""

SORTED_DIMENSIONS: Final[tuple[Dimension, ...]] = tuple(sorted(DIMENSIONS))
"""Alphabetical order, the order of the DTM's rows and columns."""

DIMENSION_NAMES: Final[dict[Dimension, str]] = {
    "IQ-R": "Realism",
    "IQ-O": "Originality",
    "IQ-A": "Aesthetics",
    "TA-C": "Content alignment",
    "TA-R": "Relation alignment",
    "TA-S": "Style alignment",
    "D-K": "Knowledge",
    "D-A": "Ambiguity",
    "R-T": "Toxicity",
    "R-B": "Bias",
}

TASKS: Final[tuple[Task, ...]] = get_args(Task)

_TASK_ALIASES: Final[dict[str, Task]] = {"sub": "s2p"}

_PAIR_SUFFIX = re.compile(r"_[0-9]+\Z")
"""A data_id's number: ASCII digits (``\\d`` takes ``١`` and ``１``, which no safe name holds)
at its very end (``$`` lets a final newline in)."""


def is_dimension(code: object) -> bool:
    """Return True when ``code`` is one of the ten dimension codes."""
    return code in DIMENSIONS


def normalise_task(name: str) -> Task:
    """Map a task name to its code, accepting upstream's ``sub`` for ``s2p``.

    Raises:
        ValueError: the name is not a TRIG task.
    """
    task = _TASK_ALIASES.get(name, name)
    for known in TASKS:
        if task == known:
            return known
    raise ValueError(f"unknown task {name!r}; expected one of t2i, p2p, s2p (or sub)")


def pair_name(first: Dimension, second: Dimension) -> str:
    """Write a pair as ``A_B`` in the order given."""
    return f"{first}_{second}"


@lru_cache(maxsize=4096)  # a run has ~45 pairs; a damaged journal must not grow it without end
def split_pair(pair: str) -> tuple[Dimension, Dimension]:
    """Split ``A_B`` into its two dimensions, checking both are known and distinct; cached
    (a batch analysis splits each of 100k judgements' pairs), a refused text raising anew.

    Raises:
        ValueError: the text is not a pair of two different known dimensions.
    """
    parts = pair.split("_")
    if len(parts) != 2:
        raise ValueError(f"{pair!r} is not a dimension pair of the form A_B")
    first, second = parts
    for code in (first, second):
        if not is_dimension(code):
            raise ValueError(f"unknown dimension {code!r} in pair {pair!r}")
    if first == second:
        raise ValueError(f"pair {pair!r} names the same dimension twice")
    return first, second  # type: ignore[return-value]


@lru_cache(maxsize=4096)  # a run has ~45 pairs; a damaged journal must not grow it without end
def pair_holds(pair: str, dimension: str) -> bool:
    """Whether ``pair`` is a valid pair and ``dimension`` one of its two (as a judgement's
    must be); cached, for journals of 100k lines and a judgement per request."""
    try:
        return dimension in split_pair(pair)
    except ValueError:
        return False


def pair_from_data_id(data_id: str) -> tuple[Dimension, Dimension]:
    """Derive a sample's pair from its ``data_id`` (``<D1>_<D2>_<n>``).

    Raises:
        ValueError: the id does not end in ``_<n>`` or does not start with a valid pair; the
            message names the id and the form.
    """
    form = f"data_id {data_id!r} is not of the form <D1>_<D2>_<n>"
    if not _PAIR_SUFFIX.search(data_id):
        raise ValueError(f"{form}: it does not end in _<number> (digits 0-9)")
    try:
        return split_pair(_PAIR_SUFFIX.sub("", data_id))
    except ValueError as exc:
        raise ValueError(f"{form}: {exc}") from None


def unordered_pair(first: Dimension, second: Dimension) -> tuple[Dimension, Dimension]:
    """The pair in alphabetical order: a key that ignores the order a sample gave."""
    return (first, second) if first <= second else (second, first)
