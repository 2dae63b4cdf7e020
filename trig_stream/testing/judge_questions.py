"""What a judging request asks, as the loopback judge server reads it: the dimension its
instruction names, and the subject of the question (its user text without the dimension's
own words), so that both questions about one image share one latent score; and the answer's
shape it asks for (its sampling options: one choice, not streamed, how many top logprobs).
"""

from __future__ import annotations

import functools
import re
from typing import Any, Final

from trig_stream.backends.judges.templates import BUILTIN_CRITERIA, json_kind
from trig_stream.dimensions import DIMENSION_NAMES, Dimension
from trig_stream.testing.judge_images import BadRequest

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


def _name(name: str, flags: int = 0) -> re.Pattern[str]:
    # The name as a whole phrase: "Bias", not the start of "biased".
    words = r"\s+".join(map(re.escape, name.split()))
    return re.compile(rf"(?<![A-Za-z]){words}(?![A-Za-z])", flags)


_NAMES: Final = {code: _name(name) for code, name in DIMENSION_NAMES.items()}
_NAMES_ANY_CASE: Final = {
    code: _name(name, re.IGNORECASE) for code, name in DIMENSION_NAMES.items()
}

_WEIGHTS: Final = {"code": 4, "name as written": 2, "criterion": 2, "name in any case": 1}
"""How strongly each way of naming a dimension counts. What ``{dimension}`` and
``{dimension_name}`` put in a text (a code; a name as written, capital included) outweighs
an ordinary word of prose (``knowledge``, ``bias``) that happens to be a name."""


class UnclearDimension(ValueError):
    """A judging question whose dimension the server cannot tell: none named, or several
    named as strongly."""


def dimensions_named(text: str) -> dict[Dimension, int]:
    """How strongly ``text`` names each dimension it names: the sum of the
    :data:`_WEIGHTS` of the ways it names it (its code, its name as written or in any case,
    its built-in criterion word for word). Dimensions it does not name are left out."""
    if len(text) > _CACHED_TEXT_CHARS:
        return dict(_strength.__wrapped__(text))
    return dict(_strength(text))


# A server asks this of every question, and its 20 name searches cost ~140 us a text: the
# loopback server, one process on one CPU, became the bound of the engine benches (P3's engine
# CPU per judgement rose by half as answers came in smaller bursts). A template's texts repeat
# from question to question (one system text per task and dimension, or per subject too), so
# each is read once while it keeps coming. Only texts of a template's size are kept: a long
# user text (read when the system text names no dimension) would hold megabytes.
_CACHED_TEXT_CHARS: Final = 4096


@functools.lru_cache(maxsize=1024)
def _strength(text: str) -> tuple[tuple[Dimension, int], ...]:
    # A tuple, as the cache hands the same value to every caller.
    lowered = text.casefold()
    strength: dict[Dimension, int] = {}
    codes = {match.group(1) for match in _CODE.finditer(text)}
    for code, name in _NAMES.items():
        ways = []
        if code in codes:
            ways.append("code")
        if name.search(text):
            ways.append("name as written")
        if _NAMES_ANY_CASE[code].search(text):
            ways.append("name in any case")
        if BUILTIN_CRITERIA[code].casefold() in lowered:
            ways.append("criterion")
        if ways:
            strength[code] = sum(_WEIGHTS[way] for way in ways)
    return tuple(strength.items())


def dimension_named(text: str) -> Dimension:
    """The dimension a judging text names: the one named most strongly (see
    :func:`dimensions_named`), so a template may name it by its code, its name or its
    built-in criterion, in any words around them.

    Raises:
        UnclearDimension: the text names no dimension, or several equally strongly.
    """
    strength = dimensions_named(text)
    if not strength:
        raise UnclearDimension(
            "cannot tell which dimension this question asks about: its text names no "
            "dimension code (IQ-R), name (Realism) or built-in criterion; a judge template "
            "must put {dimension} or {dimension_name} in its system or user_prefix text"
        )
    best = max(strength.values())
    strongest = sorted(code for code, value in strength.items() if value == best)
    if len(strongest) > 1:
        raise UnclearDimension(
            "cannot tell which dimension this question asks about: it names "
            f"{' and '.join(strongest)} equally; a judge template must name one dimension "
            "in its texts, best by {dimension} (its code)"
        )
    return strongest[0]


def dimension_of(text: str) -> Dimension | None:
    """The dimension a judging instruction is about, as the server reads it; None if it
    names none, or several equally."""
    try:
        return dimension_named(text)
    except UnclearDimension:
        return None


def check_options(body: dict[str, Any]) -> int:
    """The sampling options the answer depends on, checked as vLLM checks them; returns
    top_logprobs.

    Raises:
        BadRequest: an option the simulated judge cannot honour.
    """
    # Accepted and ignored, they gave answers of another shape than asked.
    if body.get("stream") not in (None, False):
        raise BadRequest(
            "'stream': the simulated judge does not stream; send stream false (or leave it out)"
        )
    if body.get("n") not in (None, 1) or isinstance(body.get("n"), bool):
        raise BadRequest("'n': the simulated judge gives one choice; send n 1 (or leave it out)")
    logprobs = body.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise BadRequest(f"'logprobs' must be true or false, got {json_kind(logprobs)}")
    limit = body.get("top_logprobs")
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or not 0 <= limit <= 20:
            raise BadRequest("'top_logprobs' must be an integer from 0 to 20")
        if not logprobs:
            raise BadRequest("when using 'top_logprobs', 'logprobs' must be set to true")
    for field in ("max_tokens", "max_completion_tokens"):
        value = body.get(field)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise BadRequest(f"{field!r} must be an integer of at least 1, got {value!r}")
    return limit or 0
