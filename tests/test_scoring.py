"""TRIGScore from top logprobs: both scorers on crafted lists, and their invariants."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from decimal import Decimal

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from trig_stream.scoring import (
    LOGPROB_TOLERANCE,
    RATING_WEIGHTS,
    Scorer,
    broken_logprob,
    normalise_token,
    rating_of,
    score_top_logprobs,
)

ln = math.log


def test_trig_matches_hand_computation() -> None:
    top = [("Good", ln(0.6)), ("bad", ln(0.2)), ("Medium", ln(0.1)), ("The", ln(0.05))]
    # kept: 0.6 + 0.2 + 0.1 = 0.9; (0.75*0.6 + 0.25*0.2 + 0.5*0.1) / 0.9 = 0.55 / 0.9
    assert score_top_logprobs(top, scorer="trig") == 0.611
    # confidence: 0.6111 * (0.6 / 0.9) = 0.4074
    assert score_top_logprobs(top, scorer="trig", confidence=True) == 0.407


def test_trig_keeps_upstreams_guard_in_the_denominator() -> None:
    # p = exp(lp) / (sum exp(lp) + 1e-10): a lone rating word of tiny probability is not
    # renormalised to certainty. exp(-25) / (exp(-25) + 1e-10) = 0.1219...
    assert score_top_logprobs([("excellent", -25.0)], scorer="trig") == 0.122


def test_trig_is_exact_and_case_sensitive() -> None:
    # "terrible", " Good", "▁good" and "GOOD" are outside upstream's set; only "good" counts.
    top = [
        ("terrible", ln(0.3)),
        (" Good", ln(0.2)),
        ("▁good", ln(0.2)),
        ("GOOD", ln(0.1)),
        ("good", ln(0.1)),
    ]
    assert score_top_logprobs(top, scorer="trig") == 0.75
    assert score_top_logprobs([("Terr", ln(0.5)), ("ex", ln(0.5))], scorer="trig") == 0.5


def test_robust_reads_markers_spaces_and_case() -> None:
    top = [
        (" Good", -0.1),
        ("\u2581good", -0.5),
        ("\u0120bad", -1.0),
        ("Terrible", -3.0),
        ("I", -0.2),
    ]
    good = math.exp(-0.1) + math.exp(-0.5)
    bad = math.exp(-1.0)
    terrible = math.exp(-3.0)
    expected = (0.75 * good + 0.25 * bad) / (good + bad + terrible)
    assert score_top_logprobs(top, scorer="robust") == pytest.approx(expected)


def test_robust_maps_prefixes() -> None:
    assert rating_of("**Excellent") == "excellent"
    assert rating_of(" med") == "medium"
    assert rating_of("TERR") == "terrible"
    assert rating_of("Overall") is None
    # "med" is a prefix, "me" is not: "mean" or "me" is no rating word.
    assert rating_of("me") is None and rating_of("mean") is None
    assert rating_of("medi") == "medium"
    assert normalise_token(" \u2581Good") == "good"


@pytest.mark.parametrize(
    ("token", "rating"),
    [
        ("ex", "excellent"),
        ("exc", "excellent"),
        ("Excel", "excellent"),
        ("excellent!", "excellent"),
        ("Good.", "good"),
        ("**Bad**", "bad"),
        (" terr", "terrible"),
        ("\u2581Terrible,", "terrible"),
    ],
)
def test_robust_counts_a_piece_of_a_rating_word_or_the_word_before_punctuation(
    token: str, rating: str
) -> None:
    assert rating_of(token) == rating


@pytest.mark.parametrize(
    "token",
    [
        " exactly",
        "Extremely",
        "Except",
        " extra",
        "ext",
        "excellently",
        "media",
        "Medical",
        "badge",
        "Terrain",
        "territory",
        "goodbye",
        "good2",
    ],
)
def test_robust_does_not_count_another_word_that_starts_like_a_rating(token: str) -> None:
    # Any word starting with a rating's prefix counted as that rating: "Extremely" was
    # excellent, "badge" bad, "goodbye" good.
    assert rating_of(token) is None


def test_a_word_that_starts_like_a_rating_does_not_move_the_robust_score() -> None:
    # "Extremely" counted as excellent: 0.832, where the rating words alone give trig's 0.25.
    top = [("Extremely", -0.2), ("bad", -1.8), ("terrible", -3.0)]
    bad, terrible = math.exp(-1.8), math.exp(-3.0)
    assert score_top_logprobs(top, scorer="robust") == pytest.approx(0.25 * bad / (bad + terrible))


@pytest.mark.parametrize("scorer", ["trig", "robust"])
def test_no_rating_is_unscorable_not_zero(scorer: str) -> None:
    assert score_top_logprobs([("I", -0.1), ("Sorry", -1.0)], scorer=scorer) is None  # type: ignore[arg-type]
    assert score_top_logprobs([], scorer=scorer) is None  # type: ignore[arg-type]


@pytest.mark.parametrize("scorer", ["trig", "robust"])
def test_ties_split_evenly(scorer: str) -> None:
    top = [("Excellent", -1.0), ("Terr", -1.0)]
    assert score_top_logprobs(top, scorer=scorer) == pytest.approx(0.5)  # type: ignore[arg-type]
    assert score_top_logprobs(top, scorer=scorer, confidence=True) == pytest.approx(0.25)  # type: ignore[arg-type]


@pytest.mark.parametrize("scorer", ["trig", "robust"])
def test_a_rating_of_probability_zero_is_unscorable(scorer: str) -> None:
    # -inf is a probability of 0: dropped, never upstream's made-up 0.0.
    assert score_top_logprobs([("good", -math.inf)], scorer=scorer) is None  # type: ignore[arg-type]
    top = [("good", -math.inf), ("bad", ln(0.5))]
    assert score_top_logprobs(top, scorer=scorer) == pytest.approx(0.25)  # type: ignore[arg-type]


@pytest.mark.parametrize("scorer", ["trig", "robust"])
@pytest.mark.parametrize("logprob", [math.nan, math.inf, 5.0, 800.0])
@pytest.mark.parametrize("token", ["good", "The"])
def test_a_broken_logprob_is_refused_naming_it(scorer: str, logprob: float, token: str) -> None:
    # Alone or beside finite entries, on a rating word or not: never a score, never a crash.
    for top in ([(token, logprob)], [("bad", -0.5), (token, logprob), ("Good", -1.0)]):
        with pytest.raises(ValueError, match=f"top logprob '{token}': {logprob}"):
            score_top_logprobs(top, scorer=scorer)  # type: ignore[arg-type]


@pytest.mark.parametrize("scorer", ["trig", "robust"])
def test_a_logprob_just_above_zero_is_rounding(scorer: str) -> None:
    top = [("good", 1e-6), ("bad", -20.0)]
    assert score_top_logprobs(top, scorer=scorer) == pytest.approx(0.75, abs=1e-3)  # type: ignore[arg-type]
    assert broken_logprob(top) is None
    assert broken_logprob([("good", -1.0), ("bad", LOGPROB_TOLERANCE * 2)]) == (
        "bad",
        LOGPROB_TOLERANCE * 2,
    )


@pytest.mark.parametrize("scorer", ["trig", "robust"])
@pytest.mark.parametrize("logprob", [-745.2, -800.0, -1000.0, -9998.0])
def test_a_rating_whose_probability_underflows_to_zero_is_unscorable(
    scorer: Scorer, logprob: float
) -> None:
    # exp() of it is 0.0 in a float: upstream's formula made a lone such rating word 0.0
    # ("terrible"), while -9999.0 and -inf were unscorable.
    assert score_top_logprobs([("good", logprob)], scorer=scorer) is None
    assert score_top_logprobs([("good", logprob), ("bad", logprob - 1)], scorer=scorer) is None
    # Beside a rating with a probability, it changes nothing.
    assert score_top_logprobs([("good", logprob), ("bad", -0.5)], scorer=scorer) == 0.25


@pytest.mark.parametrize("scorer", ["trig", "robust"])
@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ((b"good", -0.1), "top logprob entry (b'good', -0.1): the token is of type bytes, not str"),
        ((1, -0.1), "top logprob entry (1, -0.1): the token is of type int, not str"),
        (("good", None), "top logprob entry ('good', None): the logprob None is no real number"),
        (("good", 1j), "top logprob entry ('good', 1j): the logprob 1j is no real number"),
        (("good", "x"), "top logprob entry ('good', 'x'): the logprob 'x' is no real number"),
        (("good", -0.1, 0), "top logprob entry ('good', -0.1, 0) is no (token, logprob) pair"),
        ("ab", "top logprob entry 'ab' is no (token, logprob) pair"),
        # Text that parses as a number, and a bool, are no numbers either: they were scored.
        (("good", "-0.1"), "top logprob entry ('good', '-0.1'): the logprob '-0.1' is no real"),
        (("good", False), "top logprob entry ('good', False): the logprob False is no real"),
        (("good", Decimal("sNaN")), "the logprob Decimal('sNaN') is no real number (it is a "),
        # An int too large for a float raised OverflowError, which named nothing.
        (("good", 10**400), "top logprob entry 'good': the logprob, of type int, is too large"),
        (("good", -(10**400)), "top logprob entry 'good': the logprob, of type int, is too"),
    ],
)
def test_a_malformed_entry_is_refused_naming_it(
    scorer: Scorer, entry: object, message: str
) -> None:
    # A TypeError, or "could not convert string to float", named no entry; bytes tokens were
    # str()-ed into "b'good'": no rating word, so an unscorable answer.
    with pytest.raises(ValueError, match=re.escape(message)):
        score_top_logprobs([("bad", -0.5), entry], scorer=scorer)  # type: ignore[arg-type]


@pytest.mark.parametrize("scorer", ["trig", "robust"])
def test_ints_and_numpy_floats_are_numbers(scorer: Scorer) -> None:
    numpy = pytest.importorskip("numpy")
    expected = score_top_logprobs([("good", -0.5), ("bad", -3.0)], scorer=scorer)
    assert score_top_logprobs([("good", numpy.float32(-0.5)), ("bad", -3)], scorer=scorer) == (
        pytest.approx(expected)
    )


@pytest.mark.parametrize("scorer", ["trig", "robust"])
def test_one_number_float_takes_is_a_logprob(scorer: Scorer) -> None:
    # A torch judge zipping tokens with a row of its tensor gives 0-d tensors; numpy gives
    # 0-d arrays. float() took them, and a Decimal, until the check asked for numbers.Real:
    # then every judgement of such a judge was an error.
    numpy = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    expected = score_top_logprobs([("good", -0.5), ("bad", -3.0)], scorer=scorer)
    values = torch.tensor([[-0.5, -3.0]])
    for good, bad in [
        (torch.tensor(-0.5), -3.0),
        (Decimal("-0.5"), -3.0),
        (numpy.array(-0.5), -3.0),
        tuple(values[0]),
        (numpy.array(-0.5, dtype=numpy.float16), torch.tensor(-3, dtype=torch.int64)),
    ]:
        assert score_top_logprobs([("good", good), ("bad", bad)], scorer=scorer) == (
            pytest.approx(expected)
        ), (good, bad)


@pytest.mark.parametrize("scorer", ["trig", "robust"])
@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("numpy bool", r"the logprob np\.True_ is no real number \(it is a bool of bool\)"),
        ("numpy text", r"is no real number \(it is a ndarray of <U4\)"),
        ("numpy complex", r"is no real number \(it is a complex128 of complex128\)"),
        ("numpy row", r"is no real number \(it is a ndarray of shape \(2,\), not one number\)"),
        ("torch bool", r"is no real number \(it is a Tensor of torch\.bool\)"),
        ("torch row", r"is no real number \(it is a Tensor of shape \(2,\), not one number\)"),
    ],
)
def test_arrays_that_hold_no_one_real_number_are_refused(
    scorer: Scorer, kind: str, message: str
) -> None:
    # float() parses a 0-d array of text, and takes a bool; neither is a logprob.
    numpy = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    logprob = {
        "numpy bool": numpy.True_,
        "numpy text": numpy.array("-0.1"),
        "numpy complex": numpy.complex128(-0.1),
        "numpy row": numpy.array([-0.1, -0.2]),
        "torch bool": torch.tensor(True),
        "torch row": torch.tensor([-0.1, -0.2]),
    }[kind]
    with pytest.raises(ValueError, match=r"^top logprob entry \('good', .*" + message):
        score_top_logprobs([("bad", -0.5), ("good", logprob)], scorer=scorer)


@pytest.mark.parametrize("scorer", ["trig", "robust"])
def test_the_protocols_zero_probability_counts_as_none(scorer: Scorer) -> None:
    # OpenAI and vLLM send -9999.0 for a probability of 0 (JSON has no -inf). Scored as a
    # number, rating words that all carry it gave 0.0 (trig) or a confident 0.5 (robust).
    zero = [("The", -0.0001), ("good", -9999.0), ("bad", -9999.0)]
    assert score_top_logprobs(zero, scorer=scorer) is None
    assert score_top_logprobs([("good", -1e5)], scorer=scorer) is None
    # Beside a rating with a probability, it changes nothing.
    some = [("good", -0.5), ("bad", -9999.0)]
    assert score_top_logprobs(some, scorer=scorer) == score_top_logprobs(
        [("good", -0.5), ("bad", -math.inf)], scorer=scorer
    )


def test_unknown_scorer_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown scorer"):
        score_top_logprobs([("good", 0.0)], scorer="mean")  # type: ignore[arg-type]


# -- properties ---------------------------------------------------------------------------------

WORDS = [
    "excellent",
    "Excellent",
    "ex",
    "good",
    "Good",
    "medium",
    "Medium",
    "med",
    "bad",
    "Bad",
    "terr",
    "Terr",
    "terrible",
    "The",
    "I",
    "**",
    " Good",
    "\u2581bad",
    "\u0120Medium",
    "Good.",
    "**Bad**",
    "Excel",
    " exactly",
    "Extremely",
    "Except",
    " extra",
    "ext",
    "media",
    "Medical",
    "badge",
    "Terrain",
    "territory",
    "goodbye",
]
logprobs = st.floats(min_value=-30.0, max_value=0.0, allow_nan=False)
token_lists = st.lists(
    st.tuples(st.sampled_from(WORDS) | st.text(max_size=6), logprobs), max_size=25
)
CANONICAL = ["excellent", "good", "medium", "bad", "terr"]


@given(token_lists, st.sampled_from(["trig", "robust"]), st.booleans())
def test_score_is_in_unit_interval(
    top: list[tuple[str, float]], scorer: str, confidence: bool
) -> None:
    score = score_top_logprobs(top, scorer=scorer, confidence=confidence)  # type: ignore[arg-type]
    assert score is None or 0.0 <= score <= 1.0


OUTSIDERS = st.text(max_size=8).filter(
    lambda t: (
        t
        not in {
            "ex",
            "excellent",
            "Excellent",
            "good",
            "Good",
            "medium",
            "Medium",
            "bad",
            "Bad",
            "terr",
            "Terr",
        }
    )
)


@given(token_lists, st.lists(st.tuples(OUTSIDERS, logprobs), max_size=10))
def test_trig_ignores_tokens_outside_its_set(
    top: list[tuple[str, float]], extra: list[tuple[str, float]]
) -> None:
    assert score_top_logprobs(top + extra, scorer="trig") == score_top_logprobs(top, scorer="trig")


DECORATIONS = st.sampled_from(
    [
        lambda t: t,
        str.upper,
        str.capitalize,
        lambda t: " " + t,
        lambda t: "\u2581" + t,
        lambda t: "\u0120" + t,
        lambda t: t + "  ",
        lambda t: "*" + t,
    ]
)


@given(
    st.lists(st.tuples(st.sampled_from(CANONICAL), logprobs, DECORATIONS), min_size=1, max_size=10)
)
def test_robust_ignores_case_whitespace_and_markers(
    entries: list[tuple[str, float, object]],
) -> None:
    plain = [(token, lp) for token, lp, _ in entries]
    dressed = [(decorate(token), lp) for token, lp, decorate in entries]  # type: ignore[operator]
    assert score_top_logprobs(dressed) == pytest.approx(score_top_logprobs(plain))


# Each rating word's shortest piece that still names it.
PIECES = {"excellent": "ex", "good": "good", "medium": "med", "bad": "bad", "terrible": "terr"}


@st.composite
def rating_pieces(draw: st.DrawFn) -> tuple[str, str]:
    """A rating word and a piece of it the robust scorer reads as that rating."""
    rating = draw(st.sampled_from(sorted(PIECES)))
    length = draw(st.integers(len(PIECES[rating]), len(rating)))
    return rating, rating[:length]


@given(rating_pieces(), DECORATIONS, st.sampled_from(["", ".", "!", ",", "**", ":", ")"]))
def test_robust_reads_each_piece_of_a_rating_word_as_it(
    piece: tuple[str, str], decorate: Callable[[str], str], after: str
) -> None:
    rating, text = piece
    assert rating_of(decorate(text) + after) == rating


@given(
    rating_pieces(),
    DECORATIONS,
    st.text(alphabet="abcdefghijklmnopqrstuvwxyzEXT0123456789", min_size=1, max_size=4),
)
def test_robust_reads_no_word_that_only_starts_like_a_rating_word(
    piece: tuple[str, str], decorate: Callable[[str], str], more: str
) -> None:
    rating, text = piece
    word = text + more
    assume(not rating.startswith(word.lower()))
    assert rating_of(decorate(word)) is None


@given(
    st.lists(st.floats(min_value=0.01, max_value=1.0), min_size=5, max_size=5),
    st.integers(0, 4),
    st.integers(0, 4),
    st.floats(min_value=0.0, max_value=0.99),
    st.sampled_from(["trig", "robust"]),
)
def test_moving_mass_to_a_better_rating_never_lowers_the_score(
    weights: list[float], source: int, target: int, share: float, scorer: str
) -> None:
    better, worse = min(source, target), max(source, target)  # index 0 is "excellent"
    total = sum(weights)
    before = [w / total for w in weights]
    after = list(before)
    moved = before[worse] * share
    after[worse] -= moved
    after[better] += moved
    score_before = score_top_logprobs(
        [(w, ln(p)) for w, p in zip(CANONICAL, before, strict=True)],
        scorer=scorer,  # type: ignore[arg-type]
    )
    score_after = score_top_logprobs(
        [(w, ln(p)) for w, p in zip(CANONICAL, after, strict=True)],
        scorer=scorer,  # type: ignore[arg-type]
    )
    assert score_before is not None and score_after is not None
    assert score_after >= score_before - 1e-9


def test_weights_are_trigs() -> None:
    assert RATING_WEIGHTS == {
        "excellent": 1.0,
        "good": 0.75,
        "medium": 0.5,
        "bad": 0.25,
        "terrible": 0.0,
    }


@pytest.mark.parametrize(
    ("token", "score"),
    [
        ("ex", 1.0),
        ("excellent", 1.0),
        ("Excellent", 1.0),
        ("good", 0.75),
        ("Good", 0.75),
        ("medium", 0.5),
        ("Medium", 0.5),
        ("bad", 0.25),
        ("Bad", 0.25),
        ("terr", 0.0),
        ("Terr", 0.0),
    ],
)
def test_each_token_of_trigs_set_alone_scores_its_rating(token: str, score: float) -> None:
    # The spec's weights, written out: excellent 1.0, good 0.75, medium 0.5, bad 0.25,
    # terrible 0.0. Alone at probability 1, p = 1 / (1 + 1e-10) rounds to the weight.
    assert score_top_logprobs([(token, 0.0), ("The", -1.0)], scorer="trig") == score


@pytest.mark.parametrize("scorer", ["trig", "robust"])
def test_a_logprob_above_zero_is_refused_beyond_one_ten_thousandth(scorer: Scorer) -> None:
    # Written as literals: the tolerance is part of what an answer scores (1e-4), not
    # whatever the constant says.
    assert score_top_logprobs([("good", 1e-4)], scorer=scorer) == 0.75
    with pytest.raises(ValueError, match=r"top logprob 'good': 0\.001 is no log probability"):
        score_top_logprobs([("good", 1e-3)], scorer=scorer)


def test_robust_scores_a_rating_far_below_the_best_without_overflow() -> None:
    # Each class's mass is exp(logprob - best): shifted by the smallest logprob instead,
    # exp(720) overflows.
    assert score_top_logprobs([("good", 0.0), ("bad", -720.0)], scorer="robust") == 0.75
