"""One rule for API keys: which an HTTP header can carry, and masking them in quoted text."""

from __future__ import annotations

import html
import json
import urllib.parse
from collections.abc import Callable

import pytest

from trig_stream.backends.api_keys import check_key, scrub, scrub_all
from trig_stream.errors import FatalBackendError

ODD_KEY = "sk-Zq9\\Xp7\"W'k"
"""A key holding a backslash and both quotes: Python's repr and JSON show it escaped."""

KEYS = ["e", "abc", "sk-proj-4f9A_0123456789abcdef", ODD_KEY]


@pytest.mark.parametrize("key", KEYS)
def test_a_key_echoed_as_it_is_is_masked(key: str) -> None:
    for text, masked in [
        (f"invalid token {key}", "invalid token ***"),
        (f"Bearer {key}.", "Bearer ***."),
        (f"key={key}&then", "key=***&then"),
        (key, "***"),
    ]:
        assert scrub(text, key) == masked


@pytest.mark.parametrize("key", KEYS)
def test_a_key_echoed_inside_a_quoted_body_is_masked(key: str) -> None:
    # A body with no message was quoted as str(body): ODD_KEY showed as sk-Zq9\\Xp7"W\'k.
    quotings: list[Callable[[str], str]] = [
        lambda token: str({"detail": f"invalid token {token}"}),
        lambda token: str({"code": "bad", "param": f"token {token}"}),
        lambda token: str([f"invalid token {token}"]),
        lambda token: json.dumps({"detail": f"invalid token {token}"}),
    ]
    for shown in quotings:
        assert scrub(shown(key), key) == shown("***")
    in_url = f"https://api/v1?key={urllib.parse.quote(key, safe='')}&k2={key}"
    assert scrub(in_url, key) == "https://api/v1?key=***&k2=***"


def test_a_key_with_a_slash_is_masked_as_json_may_escape_it() -> None:
    key = "sk-a/b"
    assert scrub('{"detail": "token sk-a\\/b"}', key) == '{"detail": "token ***"}'


def test_a_key_is_masked_however_a_url_encodes_it() -> None:
    # quote() keeps "/" by default: only quote(key, safe="") was masked, and a key with a
    # "/" showed as AbC/dEf%2BGhIjKlMn0pQr%3D%3D.
    key = "AbC/dEf+GhIjKlMn0pQr=="
    for encoded in [
        urllib.parse.quote(key),
        urllib.parse.quote(key, safe=""),
        urllib.parse.quote_plus(key),
        urllib.parse.quote_plus(key, safe="/"),
        "AbC%2fdEf%2bGhIjKlMn0pQr%3d%3d",  # other encoders write the hex in lower case
        "AbC/dEf%2bGhIjKlMn0pQr%3d%3d",
    ]:
        assert scrub(f"GET /v1?key={encoded}&n=1", key) == "GET /v1?key=***&n=1", encoded


@pytest.mark.parametrize("key", ["sk-a&b<c>d\"e'f", "s&'<"])
@pytest.mark.parametrize("quote", [True, False])
def test_a_key_is_masked_as_html_escapes_it(key: str, quote: bool) -> None:
    # An HTML error page shows a key holding &, < or " escaped: sk-a&amp;b&lt;c&gt;d...
    page = f"<p>invalid key {html.escape(key, quote=quote)}</p>"
    assert scrub(page, key) == "<p>invalid key ***</p>"


def test_a_key_with_one_kind_of_quote_is_masked_however_repr_quotes_it() -> None:
    # repr picks its quotes by the whole string, not by the key in it.
    key = "sk-it's\\"
    assert scrub(repr(f"token {key}"), key) == '"token ***"'
    assert scrub(repr(f'say "{key}"'), key) == "'say \"***\"'"
    assert scrub(str({"api_key": key}), key) == "{'api_key': \"***\"}"


def test_a_short_key_leaves_the_words_that_hold_it_alone() -> None:
    # A one-letter key garbled every message: "Th*** s***rv***r is ov***rload***d".
    assert scrub("The server is overloaded", "e") == "The server is overloaded"
    assert scrub("abcd xabc abc_1 abc-2 2abc", "abc") == "abcd xabc abc_1 abc-2 2abc"
    assert scrub("abc: abcd (abc)", "abc") == "***: abcd (***)"


def test_a_key_of_a_real_length_is_masked_glued_to_other_text_too() -> None:
    # A server may glue the key to a prefix or a suffix ("Bearersk-...", "sk-...1"): no word
    # holds a key that long, so it is masked wherever it appears.
    key = "sk-" + "a1" * 10
    assert scrub(f"token x{key}_2 and Bearer{key}", key) == "token x***_2 and Bearer***"


def test_a_key_edge_that_is_no_token_character_needs_no_boundary() -> None:
    # The key's own quote ends it: what is glued to it cannot make it part of a longer word.
    assert scrub("x'sk-1'x", "'sk-1'") == "x***x"


def test_no_key_masks_nothing_and_several_are_each_masked() -> None:
    assert scrub("unused", "") == "unused"
    assert scrub("unused", None) == "unused"
    assert scrub_all("a b c", ["a", "c"]) == "*** b ***"


@pytest.mark.parametrize("key", ["sk-\u00e9", "sk-made-from-a-file\n", "sk-\tkey", "sk-\u200b"])
def test_a_key_no_header_can_carry_is_refused_without_quoting_it(key: str) -> None:
    with pytest.raises(FatalBackendError) as caught:
        check_key(key, owner="generator 'dalle3'", variable="TRIG_KEY")
    message = str(caught.value)
    assert message.startswith("generator 'dalle3': the environment variable TRIG_KEY ")
    assert "HTTP header cannot carry" in message and "export the key alone" in message
    assert "sk-" not in message and "position" not in message


@pytest.mark.parametrize("key", [" sk-pasted-with-a-space", "sk-pasted-with-a-space ", "  k3y  "])
def test_a_key_with_spaces_around_it_is_refused_without_quoting_it(key: str) -> None:
    # A header carries the spaces, and servers strip them: the key they quoted back was the
    # bare one, which masking the padded key left in plain text.
    with pytest.raises(FatalBackendError) as caught:
        check_key(key, owner="generator 'dalle3'", variable="TRIG_KEY")
    message = str(caught.value)
    assert message.startswith("generator 'dalle3': the environment variable TRIG_KEY ")
    assert "spaces" in message and "export the key alone" in message
    assert key.strip() not in message


@pytest.mark.parametrize("key", KEYS)
def test_a_key_a_header_can_carry_is_taken(key: str) -> None:
    assert check_key(key, owner="judge 'j'", variable="TRIG_KEY") == key
