"""TRIGScore: a score in [0, 1] from the top logprobs of the judge's first answer token.

The judge is asked for one rating word out of excellent / good / medium / bad / terrible. The
score is the expected rating under the probabilities the model gave those words, weighted
1.0 / 0.75 / 0.5 / 0.25 / 0.0. Two scorers read the token list:

* ``"trig"`` reproduces upstream's formula to the digit: only tokens in an exact, case-sensitive
  set count; probabilities are renormalised with a ``1e-10`` guard and the result is rounded to
  three decimals. Use it to compare with the paper.
* ``"robust"`` normalises each token first (whitespace, SentencePiece ``▁`` and byte-level
  ``Ġ`` markers, case, leading punctuation), maps it to a rating when it is a piece of that
  rating word (``ex``, ``Excel``, ``med``, ``terr``: no shorter than the rating's prefix in
  :data:`_ROBUST_PREFIXES`) or the whole word before punctuation (``Good.``, ``**Bad**``),
  never another word that starts like one (``exactly``, ``media``, ``badge``), sums each
  rating's probability and renormalises over the ratings.

Both return ``None`` when no token names a rating with any probability: upstream's 0.0 in that
case cannot be told apart from "terrible", so we never make one up. A ``-inf`` logprob is a
probability of 0 and counts as absent, as does ``-9999.0`` and below, what the OpenAI
protocol sends for it (:data:`ZERO_PROBABILITY_LOGPROB`), and any logprob whose probability
is 0.0 in a float (below about -745: upstream's formula made a lone such rating word 0.0).
A logprob that is no probability (NaN, ``+inf``, or above 0 by more than
:data:`LOGPROB_TOLERANCE`, a probability above 1) means the judge's numbers are broken: both
scorers refuse it rather than score around it, as they refuse an entry that is no ``(str,
number)`` pair (:func:`checked_top_logprobs`).
"""

from __future__ import annotations

import functools
import math
import operator
import re
from collections.abc import Iterable, Sequence
from typing import Any, Final, Literal, TypeAlias

Scorer: TypeAlias = Literal["trig", "robust"]
SCORERS: Final[tuple[Scorer, ...]] = ("trig", "robust")

RATING_WEIGHTS: Final[dict[str, float]] = {
    "excellent": 1.0,
    "good": 0.75,
    "medium": 0.5,
    "bad": 0.25,
    "terrible": 0.0,
}

_TRIG_TOKENS: Final[dict[str, float]] = {
    "ex": 1.0,
    "excellent": 1.0,
    "Excellent": 1.0,
    "good": 0.75,
    "Good": 0.75,
    "medium": 0.5,
    "Medium": 0.5,
    "bad": 0.25,
    "Bad": 0.25,
    "terr": 0.0,
    "Terr": 0.0,
}

_ROBUST_PREFIXES: Final[dict[str, str]] = {
    "excellent": "ex",
    "good": "good",
    "medium": "med",
    "bad": "bad",
    "terrible": "terr",
}
"""Each rating word's shortest piece that still names it: a token's word names the rating when
it starts with this piece and is itself a start of the rating word ("me" could be "mean")."""

_WORD: Final = re.compile(r"[^\W_]*")
"""The leading letters and digits of a normalised token: its word, without the punctuation
that may follow it (``good.``, ``bad**``)."""

_MARKERS: Final[str] = "\u2581\u0120"  # SentencePiece "▁" and byte-level BPE "Ġ"

ZERO_PROBABILITY_LOGPROB: Final[float] = -9999.0
"""What OpenAI's and vLLM's chat APIs send for a probability of 0 (JSON has no ``-inf``): a
logprob at or below it counts as ``-inf``. Scored as a number, an answer whose rating words
all carry it would get a made-up score (0.0 from ``trig``, a confident one from ``robust``)."""

SCORING_RULES: Final = 2
"""The version of the rules by which a judge's answer gets its score or status, in the
fingerprint of every judge scored from logprobs (``params.scoring_rules``), so a resume under
other rules is refused as a change of settings rather than mixing scores that do not compare.
Bump it with any change to what an answer scores, saying what changed in
:data:`SCORING_RULES_CHANGES`. A run directory older than the field is checked once on resume
(:func:`trig_stream.manifest.checked_scoring_rules`)."""

SCORING_RULES_CHANGES: Final[dict[int, str]] = {
    1: (
        "an answer without the top logprobs asked for is an error (its one sampled token was "
        "scored) and a -9999.0 logprob a probability of 0"
    ),
    2: (
        "the robust scorer counts a token only as a piece of a rating word or the whole word, "
        "no longer any word that starts like one ('exactly' as excellent, 'media' as medium)"
    ),
}
"""What each version of :data:`SCORING_RULES` changed, in words, for the refusal of a resume
across them."""

SCORING_RULES_SCORERS: Final[dict[int, frozenset[Scorer]]] = {
    1: frozenset(SCORERS),
    2: frozenset({"robust"}),
}
"""The scorers whose scores each version of :data:`SCORING_RULES` changed: a judge of another
resumes across it (see :func:`scored_alike`)."""


def scored_alike(scorer: str, rules: int, other: int) -> bool:
    """Whether a judge with ``scorer`` gives every answer the same score and status under
    scoring rules ``rules`` and ``other``: no version from one to the other changed it. Rules
    this trig-stream does not know (an edited manifest's, a later one's) score otherwise."""
    low, high = sorted((rules, other))
    if low < 1 or high > SCORING_RULES:
        return low == high
    return not any(scorer in SCORING_RULES_SCORERS[v] for v in range(low + 1, high + 1))


SCORING_RULES_KEY: Final = "scoring_rules"
"""The key of a judge fingerprint's ``params`` that holds its :data:`SCORING_RULES`."""

LOGPROB_TOLERANCE: Final[float] = 1e-4
"""How far above 0 a logprob may be and still count as a probability: a server's rounding can
put a near-certain token's logprob just above 0; anything beyond is a probability above 1."""


def broken_logprob(top_logprobs: Iterable[tuple[str, float]]) -> tuple[str, float] | None:
    """The first ``(token, logprob)`` entry that is no log probability, or None if all are.

    A broken entry is NaN, ``+inf`` or above :data:`LOGPROB_TOLERANCE`; ``-inf`` (a
    probability of 0) is not broken.
    """
    for token, logprob in top_logprobs:
        if not logprob <= LOGPROB_TOLERANCE:  # NaN fails every comparison
            return token, logprob
    return None


def score_top_logprobs(
    top_logprobs: Iterable[tuple[str, float]] | Sequence[Sequence[object]],
    *,
    scorer: Scorer = "robust",
    confidence: bool = False,
) -> float | None:
    """Compute the TRIGScore of one judge answer from its first token's top logprobs.

    Args:
        top_logprobs: ``(token, logprob)`` pairs, most likely first (order does not matter).
        scorer: ``"trig"`` for upstream's exact formula, ``"robust"`` for the normalising one.
        confidence: multiply the score by the probability of the most likely rating (the
            paper's confidence-weighted variant).

    Returns:
        The score in ``[0, 1]``, or ``None`` when no token names a rating with a probability
        above 0 (unscorable). ``-inf`` entries (a probability of 0), those at or below
        ``-9999.0`` (how the OpenAI protocol writes one) and those whose probability is 0.0
        in a float are left out.

    Raises:
        ValueError: ``scorer`` is not one of ``"trig"`` and ``"robust"``, an entry is
            malformed (see :func:`checked_top_logprobs`), or an entry's logprob is no log
            probability (NaN, ``+inf``, or above 0 by more than :data:`LOGPROB_TOLERANCE`);
            the message names the entry.
    """
    pairs = [(token, _logprob(logprob)) for token, logprob in checked_top_logprobs(top_logprobs)]
    broken = broken_logprob(pairs)
    if broken is not None:
        token, logprob = broken
        raise ValueError(
            f"top logprob {token!r}: {logprob} is no log probability (NaN, +inf, or a "
            "probability above 1); the judge's numbers are broken"
        )
    if scorer == "trig":
        return _score_trig(pairs, confidence=confidence)
    if scorer == "robust":
        return _score_robust(pairs, confidence=confidence)
    raise ValueError(f"unknown scorer {scorer!r}; expected one of {', '.join(SCORERS)}")


def checked_top_logprobs(
    top_logprobs: Iterable[tuple[str, float]] | Sequence[Sequence[object]],
) -> list[tuple[str, float]]:
    """The ``(token, logprob)`` pairs of ``top_logprobs``, each logprob a ``float``.

    Raises:
        ValueError: an entry is no pair, its token no ``str`` (bytes left undecoded: as
            text, ``b'good'`` names no rating, so the answer would pass for unscorable), or
            its logprob no real number (one number ``float()`` takes without parsing
            text: an int, a float, a ``Decimal``, numpy's or torch's scalars and 0-d arrays
            of ints or floats; not None, a bool, a complex, several numbers or text, even
            text such as ``"-0.1"``) or an int too large for a float; the message names the
            entry.
    """
    try:
        entries: list[Any] = list(top_logprobs)
    except TypeError:
        raise ValueError(
            f"top logprobs of type {type(top_logprobs).__name__} are no sequence of "
            "(token, logprob) pairs"
        ) from None
    try:
        # A float is taken as it is, the common case of every answer: the type check of any
        # other logprob costs more than this whole loop does.
        pairs: list[tuple[str, float]] = [
            (token, logprob if type(logprob) is float else _real(logprob))
            for token, logprob in entries
        ]
    except (TypeError, ValueError, OverflowError):
        pairs = [_checked_entry(entry) for entry in entries]  # raises, naming the entry
    for token, logprob in pairs:
        if not isinstance(token, str):
            raise ValueError(
                f"top logprob entry ({token!r}, {logprob}): the token is of type "
                f"{type(token).__name__}, not str; decode it to text first"
            )
    return pairs


def _checked_entry(entry: Any) -> tuple[str, float]:
    if isinstance(entry, str | bytes) or not isinstance(entry, Sequence) or len(entry) != 2:
        raise ValueError(f"top logprob entry {entry!r} is no (token, logprob) pair")
    token, logprob = entry
    try:
        return token, _real(logprob)
    except TypeError as exc:
        raise ValueError(
            f"top logprob entry {entry!r}: the logprob {logprob!r} is no real number "
            f"({exc}); pass a float"
        ) from None
    except OverflowError:  # an int: its digits may be more than str() will write
        raise ValueError(
            f"top logprob entry {token!r}: the logprob, of type {type(logprob).__name__}, "
            "is too large for a float, so it is no log probability; the judge's numbers "
            "are broken"
        ) from None


_NUMBER_DTYPE: Final = re.compile(r"(torch\.)?(u?int|b?float|half|double)")
"""The dtype names (numpy's, torch's) of arrays and scalars whose one value is a real number:
not a bool, a complex or text (``float(np.array("-0.1"))`` would parse it)."""


@functools.lru_cache(maxsize=64)  # numpy's and torch's dtypes are a few dozen
def _number_dtype(dtype: object) -> bool:
    # Cached: str() of a numpy dtype costs more than the rest of the check of a logprob.
    return _NUMBER_DTYPE.match(str(dtype)) is not None


def _real(logprob: object) -> float:
    """``logprob`` as a float, if it is one real number: anything ``float()`` converts
    without parsing text (an int, a float, a ``Decimal``, numpy's scalars, a 0-d numpy array
    or torch tensor of ints or floats), but not a bool, a complex or text, which no judge
    means as one.

    Raises:
        TypeError: it is no real number.
        OverflowError: it is an int too large for a float.
    """
    if isinstance(logprob, bool) or not hasattr(type(logprob), "__float__"):
        # str and bytes have no __float__ (float() parses them); complex has none either.
        raise TypeError(f"it is of type {type(logprob).__name__}")
    dtype = getattr(logprob, "dtype", None)
    if dtype is not None:  # numpy's or torch's: a scalar, or an array or tensor
        if not _number_dtype(dtype):
            raise TypeError(f"it is a {type(logprob).__name__} of {dtype}")
        if getattr(logprob, "ndim", 0) != 0:
            shape = tuple(getattr(logprob, "shape", ()))
            raise TypeError(f"it is a {type(logprob).__name__} of shape {shape}, not one number")
    try:
        return float(logprob)  # type: ignore[arg-type]
    except (ValueError, RuntimeError) as exc:  # a Decimal's signalling NaN; a meta tensor
        raise TypeError(f"it is a {type(logprob).__name__} float() refuses: {exc}") from None


_UNDERFLOW: Final[float] = -745.0
"""Below about -745.13 ``exp`` is 0.0 in a float; above this it never is."""


def may_score_otherwise_than_before_rules(top_logprobs: Sequence[tuple[str, float]]) -> bool:
    """Whether an answer scored before :data:`SCORING_RULES` (an earlier trig-stream, whose
    fingerprints hold no rules) could get another score or status now from the same
    ``top_logprobs``, so that it needs scoring again to tell.

    Besides trig's formula, which stayed, the scorers changed how they read a logprob at or
    below the probability-0 threshold (:data:`ZERO_PROBABILITY_LOGPROB`, and one whose
    ``exp`` underflows to 0.0: both now count as absent, where a lone rating word there
    scored 0.0 or a confident 0.5) and one above 0 beyond :data:`LOGPROB_TOLERANCE` (refused
    now, scored by a trig-stream before 2eff5c6), and the robust scorer no longer counts a
    word that only starts like a rating word (rules 2). A list whose every logprob lies
    between and whose every token reads as it did scores as it did: two passes in C over the
    list and a cached look-up per token tell, where scoring it again costs several times
    that, for each line of a long journal. (The other change, that an answer without the
    list asked for is no longer scored from its one sampled token, left no mark on the
    stored list: no check can find it.)
    """
    if not top_logprobs:
        return False
    logprobs: list[float] = list(map(_SECOND, top_logprobs))
    return (
        min(logprobs) < _UNDERFLOW
        or max(logprobs) > LOGPROB_TOLERANCE
        or any(map(_rated_before_rules_2_only, map(_FIRST, top_logprobs)))
    )


_FIRST: Final = operator.itemgetter(0)
_SECOND: Final = operator.itemgetter(1)


@functools.lru_cache(maxsize=4096)  # as rating_of: a journal's lines share their top tokens
def _rated_before_rules_2_only(token: str) -> bool:
    """Whether the robust scorer before rules 2 read ``token`` as a rating and no longer
    does: it counted every token starting with a rating's prefix (``exactly``, ``badge``)."""
    prefixes = tuple(_ROBUST_PREFIXES.values())
    return rating_of(token) is None and normalise_token(token).startswith(prefixes)


def _logprob(logprob: float) -> float:
    if logprob <= ZERO_PROBABILITY_LOGPROB or (logprob < _UNDERFLOW and math.exp(logprob) == 0.0):
        return -math.inf
    return logprob


def normalise_token(token: str) -> str:
    """Strip whitespace and tokenizer markers, lowercase, and drop leading punctuation."""
    text = token.strip().strip(_MARKERS).strip().lower()
    start = 0
    while start < len(text) and not text[start].isalnum():
        start += 1
    return text[start:]


@functools.lru_cache(maxsize=4096)
def rating_of(token: str) -> str | None:
    """The rating word a token stands for under the robust scorer, or None.

    The token's word (its leading letters and digits once normalised) names a rating when it
    is a piece of that rating word at least as long as its prefix in :data:`_ROBUST_PREFIXES`
    (``ex``, ``exc``, ``Excel``), punctuation after it left out (``Good.``): ``ext`` or
    ``exactly`` is no piece of "excellent", ``goodbye`` more than "good".

    Cached: a judge's answers draw their top tokens from a small part of the vocabulary, so
    almost every token is met again, and each answer has twenty of them.
    """
    match = _WORD.match(normalise_token(token))
    word = "" if match is None else match.group()
    for rating, prefix in _ROBUST_PREFIXES.items():
        if word.startswith(prefix) and rating.startswith(word):
            return rating
    return None


def _score_trig(pairs: list[tuple[str, float]], *, confidence: bool) -> float | None:
    kept = [
        (_TRIG_TOKENS[token], math.exp(logprob))
        for token, logprob in pairs
        if token in _TRIG_TOKENS and logprob > -math.inf
    ]
    if not kept:
        return None
    total = sum(p for _, p in kept) + 1e-10
    probs = [(weight, p / total) for weight, p in kept]
    score = sum(weight * p for weight, p in probs)
    if confidence:
        score *= max(p for _, p in probs)
    return round(score, 3)


def _score_robust(pairs: list[tuple[str, float]], *, confidence: bool) -> float | None:
    kept = [
        (rating, logprob)
        for token, logprob in pairs
        if (rating := rating_of(token)) is not None and logprob > -math.inf
    ]
    if not kept:
        return None
    # Each class's probability is the sum over its tokens, normalised over the classes;
    # shifting by the largest logprob keeps every exp in range.
    peak = max(logprob for _, logprob in kept)
    per_rating: dict[str, float] = {}
    for rating, logprob in kept:
        per_rating[rating] = per_rating.get(rating, 0.0) + math.exp(logprob - peak)
    total = sum(per_rating.values())
    score = sum(RATING_WEIGHTS[rating] * mass for rating, mass in per_rating.items()) / total
    if confidence:
        score *= max(per_rating.values()) / total
    return min(1.0, max(0.0, score))
