"""The checks of a dataset record that every sample gets, its source image aside: its identity
(a ``data_id`` that is a safe file name, taken by no record before it, and a pair of dimensions)
and its text (UTF-8 that a request can carry). A check that fails raises :class:`Rejected`,
whose message is the reason the record is quarantined for; :mod:`trig_stream.dataset` reads
the records and quarantines them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from trig_stream.dataset_formats import Unreadable
from trig_stream.dimensions import Dimension, pair_from_data_id, split_pair
from trig_stream.records import Sample, is_safe_name
from trig_stream.string_index import StringIndex


class Rejected(ValueError):
    """A record is malformed; the message is the quarantine reason."""


class CaseDuplicate(Rejected):
    """A record's data_id differs only in case from an earlier record's, and is the first
    spelled so: a version before the case rule took it as a sample of its own, so one the
    run directory holds judgements of still counts toward ``limit``."""


class TakenIds:
    """The data_ids the records read so far took, for the duplicate check.

    A record takes its data_id before anything else of it is checked: the first record
    keeps it also when it is refused (its pair, its prompt or source image; a JSON object's
    entry that is no record keeps its key), so a later record of the same id is a duplicate,
    not judged in its place. Ids are compared as a file system that ignores case (macOS's,
    exFAT) compares them, since each names its sample's image file: ``cat_1`` is a duplicate
    of ``Cat_1``, whose picture it would overwrite there (a data_id is ASCII, so lower case
    is its case-folded form). A run keeps one entry per sample for its whole length, so
    compact indexes rather than a set of str (~60 instead of ~100 bytes).

    Args:
        fold_case: compare ids as a file system that ignores case does; False takes only
            an id spelled alike as a duplicate, for a reader that writes no file per sample
            (``analyze --prompts``).
    """

    def __init__(self, *, fold_case: bool = True) -> None:
        self._fold_case = fold_case
        self._folded = StringIndex()
        self._spelled = StringIndex()
        """Each id as its record spells it, numbered as in ``_folded``: for the reason."""
        self._case_duplicates: set[str] = set()
        """The other spellings met (few): a spelling's first record is a
        :class:`CaseDuplicate`, a later one a duplicate of it as well."""

    def take(self, raw: Mapping[str, Any]) -> None:
        """Take the data_id ``raw`` names, when it is one a sample could have.

        Raises:
            CaseDuplicate: a record read before took it in another case, none in this one.
            Rejected: a record read before took it.
        """
        claimed = raw.key if isinstance(raw, Unreadable) else raw.get("data_id")
        if not isinstance(claimed, str) or not is_safe_name(claimed):
            return  # refused for it by record_identity(), and no sample's id
        folded = claimed.lower() if self._fold_case else claimed
        number = self._folded.find(folded)
        if number is None:
            self._folded.add(folded)
            self._spelled.add(claimed)
            return
        first = self._spelled[number]
        if first == claimed:
            raise Rejected(f"duplicate data_id {claimed!r}")
        reason = f"duplicate data_id {claimed!r}: differs only in case from {first!r}"
        if claimed in self._case_duplicates:
            raise Rejected(reason)
        self._case_duplicates.add(claimed)
        raise CaseDuplicate(reason)


def record_identity(raw: Mapping[str, Any]) -> tuple[str, tuple[Dimension, Dimension]]:
    """A record's data_id and pair, checked: what every later step relies on."""
    if isinstance(raw, Unreadable):
        raise Rejected(raw.reason)
    data_id = raw.get("data_id")
    if data_id is None or data_id == "":
        raise Rejected("missing data_id")
    if not isinstance(data_id, str):
        raise Rejected(f"data_id must be text, got {type(data_id).__name__} {data_id!r}")
    if not is_safe_name(data_id):
        raise Rejected(
            f"data_id {data_id!r} is not a safe file name (it names the image file): letters, "
            "digits, '.', '_' and '-' only, starting with a letter or digit, at most 128 "
            "characters, no '..'"
        )
    return data_id, _dimensions(raw, data_id)


def _dimensions(raw: Mapping[str, Any], data_id: str) -> tuple[Dimension, Dimension]:
    given = raw.get("dimensions")
    if given is None:  # absent, or null beside the older "dimension" (a parquet's two columns)
        given = raw.get("dimension")
    try:
        if given is None:
            return pair_from_data_id(data_id)
        if isinstance(given, str):
            return split_pair(given)
        values = list(given) if isinstance(given, list | tuple) else []
        if len(values) != 2 or not all(isinstance(v, str) for v in values):
            raise Rejected(f"dimensions must be two dimension codes, got {given!r}")
        return split_pair(f"{values[0]}_{values[1]}")
    except ValueError as exc:
        if isinstance(exc, Rejected):
            raise
        raise Rejected(str(exc)) from None


def check_unicode(sample: Sample) -> None:
    """Refuse text that cannot be sent or stored as UTF-8: JSON's ``\\ud800`` escapes decode
    to lone surrogates, which every request to a judge or a generator would fail on."""
    fields = {"prompt": sample.prompt, "img_id": sample.img_id, "item": sample.item or ""}
    fields |= {f"dimension_prompt[{i}]": t for i, t in enumerate(sample.dimension_prompt)}
    fields |= {f"parent_dataset[{i}]": t for i, t in enumerate(sample.parent_dataset)}
    for name, text in fields.items():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise Rejected(
                f"{name} is not valid Unicode: a lone surrogate {text[exc.start]!r} "
                f"at character {exc.start}"
            ) from None
