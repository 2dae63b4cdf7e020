"""What a judging request asks, as the loopback judge server reads it: the dimension its
instruction names, and the subject of the question (its user text without the dimension's
own words), so that both questions about one image share one latent score.
"""

from __future__ import annotations

import re
from typing import Final

from trig_stream.backends.judges.templates import BUILTIN_CRITERIA
from trig_stream.dimensions import DIMENSION_NAMES, Dimension

_CODE = re.compile(r"(?<![A-Za-z])(IQ-[ROA]|TA-[CRS]|D-[KA]|R-[TB])(?![A-Za-z])")


def _dimension_words() -> re.Pattern[str]:
    # Codes, then names and built-in criteria longest first: a criterion holding a name is
    # taken out whole, not cut around the name.
    words = sorted({*DIMENSION_NAMES.values(), *BUILTIN_CRITERIA.values()}, key=len, reverse=True)
    return re.compile("|".join([_CODE.pattern, *map(re.escape, words)]), re.IGNORECASE)


_DIMENSION_WORDS: Final = _dimension_words()


def without_dimension(text: str) -> str:
    """``text`` without any dimension's code, name or built-in criterion, spaces collapsed:
    the same for both questions about an image when a template names the dimension in it."""
    return " ".join(_DIMENSION_WORDS.sub(" ", text).split())


def sized(kind: bytes, data: bytes) -> bytes:
    # Each part is hashed with its kind and length: a bare concatenation of two images is
    # also that of another two cut elsewhere.
    return kind + len(data).to_bytes(8, "big") + data


def dimension_named(text: str) -> str:
    match = _CODE.search(text)
    if match:
        return match.group(1)
    for code, name in DIMENSION_NAMES.items():
        if name.split()[0].lower() in text.lower():
            return code
    return "unknown"


def dimension_of(text: str) -> Dimension | None:
    """The dimension a judging instruction is about, as the server reads it; None if none."""
    code = dimension_named(text)
    return None if code == "unknown" else code  # type: ignore[return-value]
