"""DTM relations for prompt rewriting: where they come from and what each asks of a prompt.

A relation code describes how a model's scores on two dimensions behave together (see the
analysis): 0 synergy, 3 bottleneck, 2 / -2 dominance, 1 trade-off, -1 undefined. For a pair
written ``A_B``, +2 means A dominates (the images favour A at B's expense) and -2 means B
dominates; reading the pair the other way round negates it.

Relations come from the config (``{"IQ-R_TA-C" = 1, ...}``) or from an earlier run's
``relationship_codes.csv`` (the DTM: header ``,`` + the dimensions sorted; upper-triangle
cells are codes for row_column).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Final, Literal, TypeAlias

from trig_stream.dimensions import DIMENSION_NAMES, Dimension, Task, is_dimension, split_pair
from trig_stream.files import read_settings_file, undecodable_byte

RelationCode: TypeAlias = Literal[-2, -1, 0, 1, 2, 3]
RELATION_CODES: Final[frozenset[int]] = frozenset({-2, -1, 0, 1, 2, 3})

INSTRUCTIONS_VERSION = "1"
"""Bump when any instruction text changes: it is part of the generator's fingerprint."""


def oriented(code: int) -> int:
    """The code of the pair read the other way round: dominance flips, the rest stays."""
    return -code if code in (2, -2) else code


class RelationTable:
    """The relation code of each dimension pair, in either order."""

    def __init__(self, codes: Mapping[tuple[Dimension, Dimension], int] | None = None) -> None:
        self._codes: dict[tuple[Dimension, Dimension], int] = {}
        for (first, second), code in (codes or {}).items():
            self.set(first, second, code)

    def set(self, first: Dimension, second: Dimension, code: int) -> None:
        """Record ``code`` for the pair ``first_second`` (and its mirror)."""
        if code not in RELATION_CODES:
            raise ValueError(f"{first}_{second}: relation code {code} is not one of -2..3")
        self._codes[(first, second)] = code
        self._codes[(second, first)] = oriented(code)

    def code(self, first: Dimension, second: Dimension) -> int:
        """The code of ``first_second``; -1 (undefined) when the pair is unknown."""
        return self._codes.get((first, second), -1)

    def as_dict(self) -> dict[str, int]:
        """``A_B`` -> code for each pair once, A before B alphabetically."""
        return {f"{a}_{b}": c for (a, b), c in sorted(self._codes.items()) if a < b}

    def __len__(self) -> int:
        return len(self._codes) // 2

    @classmethod
    def from_mapping(cls, relations: Mapping[str, int]) -> RelationTable:
        """From ``{"A_B": code}``.

        A pair may be named in both orders only with the same relation (``"A_B" = 2`` and
        ``"B_A" = -2``).

        Raises:
            ValueError: a key is not a pair of dimensions, a code is not a relation code, or
                a pair is named in both orders with relations that differ.
        """
        table = cls()
        keys: dict[tuple[Dimension, Dimension], str] = {}
        for pair, code in relations.items():
            first, second = split_pair(pair)
            earlier = keys.get((second, first))
            if earlier is not None and code in RELATION_CODES and table.code(first, second) != code:
                said = relations[earlier]
                raise ValueError(
                    f"relations {earlier!r} = {said} and {pair!r} = {code} set one pair twice, "
                    f"with different relations ({pair} = {code} is {earlier} = "
                    f"{oriented(code)}); keep one of the two keys"
                )
            table.set(first, second, code)
            keys[(first, second)] = pair
        return table

    @classmethod
    def from_report(cls, path: Path) -> RelationTable:
        """From a ``relationship_codes.csv`` written by an earlier analysis.

        Raises:
            ValueError: the file does not have the DTM's layout.
            OSError: the file cannot be read.
        """
        try:
            raw = read_settings_file(path)
            text = raw.decode("utf-8-sig")  # a BOM, as Excel saves
            rows = list(csv.reader(io.StringIO(text, newline="")))
        except UnicodeDecodeError as exc:
            at = undecodable_byte(raw, exc)
            raise ValueError(f"report {path}: byte {at} is not UTF-8 text") from None
        except csv.Error as exc:  # a field past the csv module's limit (131,072 characters)
            raise ValueError(
                f"report {path}: cannot read it as CSV ({exc}); it should be an earlier run's "
                "relationship_codes.csv (trig-stream report writes one per model)"
            ) from None
        except OSError as exc:
            raise OSError(
                f"report {path}: cannot read it ({exc.strerror or exc}); it should be an "
                "earlier run's relationship_codes.csv (trig-stream report writes one per model)"
            ) from None
        if not rows or len(rows[0]) < 3 or rows[0][0].strip():
            raise ValueError(f"{path}: expected a header ',' followed by dimension codes")
        columns = [cell.strip() for cell in rows[0][1:]]
        if not all(is_dimension(c) for c in columns):
            raise ValueError(f"{path}: the header names unknown dimensions: {columns}")
        if len(set(columns)) != len(columns):
            raise ValueError(f"{path}: the header names a dimension twice: {columns}")
        if not any(row and row[0].strip() for row in rows[1:]):
            raise ValueError(f"{path}: holds a header and no row of relation codes")
        table = cls()
        seen: set[str] = set()
        below = 0  # codes below the diagonal, which are never read
        for row in rows[1:]:
            if not row or not row[0].strip():
                continue
            first = row[0].strip()
            if not is_dimension(first) or first not in columns:
                raise ValueError(f"{path}: row {first!r} is not a dimension of the header")
            if first in seen:  # the last one silently won
                raise ValueError(
                    f"{path}: lists row {first} twice; keep one row per dimension (an earlier "
                    "run's relationship_codes.csv, as trig-stream report writes it, has one)"
                )
            seen.add(first)
            start = columns.index(first) + 1
            below += sum(_is_code(cell) for cell in row[1:start])
            for second, cell in zip(columns[start:], row[start + 1 :], strict=False):
                text = cell.strip()
                if not text or text.upper() == "NULL":
                    continue
                try:
                    value = float(text)
                except ValueError:
                    value = math.nan
                # 1.9 read as 1 chose another relation's words; -3 is none, said with the file.
                if not value.is_integer() or int(value) not in RELATION_CODES:
                    raise ValueError(
                        f"{path}: cell {first}_{second} is {text!r}, no relation code (an "
                        "integer from -2 to 3)"
                    )
                code = int(value)
                table.set(first, second, code)  # type: ignore[arg-type]
        if not len(table) and below:
            # Every pair would have read "No clear relation", the rewrites all alike.
            raise ValueError(
                f"{path}: holds relation codes only below the diagonal, and they are read above "
                "it (row dimension before column dimension, as trig-stream report writes "
                "them); move the codes above the diagonal"
            )
        return table


def _is_code(cell: str) -> bool:
    """Whether a report's cell holds a relation code (an integer), not a score or a range."""
    try:
        return float(cell.strip()).is_integer()
    except ValueError:
        return False


_TASK_WORDS: Final[dict[Task, str]] = {
    "t2i": "a text-to-image prompt",
    "p2p": "an image-editing instruction (it is applied to an existing picture)",
    "s2p": "a subject-driven generation prompt (it shows a given subject in a new scene)",
}


def system_message(task: Task) -> str:
    """The rewriter's standing orders for one task."""
    return (
        f"You improve {_TASK_WORDS[task]} for an image generator. The picture will be rated on "
        "two quality dimensions. Follow the guidance about how the generator tends to handle "
        "those two dimensions, keep every object, subject, attribute and relation the "
        "original asks for, add nothing harmful, and keep it under 120 words. Answer with "
        "the rewritten text only: no preamble, no quotes, no explanation."
    )


def instruction(first: Dimension, second: Dimension, code: int) -> str:
    """What to do with a prompt whose pair ``first_second`` has relation ``code``.

    Every code has its own guidance; for dominance the weaker dimension is the one named to
    be strengthened.
    """
    a = f"{first} ({DIMENSION_NAMES[first]})"
    b = f"{second} ({DIMENSION_NAMES[second]})"
    if code == 0:
        return (
            f"Synergy: this generator does well on {a} and {b} together. Keep both "
            "demands, state them plainly, and do not trade either away for new detail."
        )
    if code == 3:
        return (
            f"Bottleneck: this generator does poorly on both {a} and {b} for such prompts. "
            "Simplify: spell out concretely what each of the two dimensions needs, break "
            "complex requests into explicit visual facts, and remove distractions."
        )
    if code in (2, -2):
        strong, weak = (a, b) if code == 2 else (b, a)
        return (
            f"Dominance: this generator favours {strong} at the expense of {weak}. Keep what "
            f"{strong} needs, but make the requirements of {weak} explicit, specific and "
            "prominent (early in the text) so they are not sacrificed."
        )
    if code == 1:
        return (
            f"Trade-off: for this generator, gains on {a} tend to cost {b} and the reverse. "
            "Give both equal weight, describe each explicitly, and reconcile demands that "
            "pull against each other instead of letting one win."
        )
    return (
        f"No clear relation is known between {a} and {b} for this generator. Clarify the "
        "text so that both dimensions are addressed explicitly, changing as little as possible."
    )


def user_message(prompt: str, first: Dimension, second: Dimension, code: int) -> str:
    """The request for one prompt: the guidance for its pair, then the prompt itself."""
    return f"{instruction(first, second, code)}\n\nOriginal:\n{prompt}"
