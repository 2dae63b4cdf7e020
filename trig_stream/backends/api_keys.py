"""API keys read from the environment: which ones an HTTP header can carry, and keeping
them out of every text quoted from a server or a process.

Judges and generators share one rule, so a key is refused, and masked, the same way
wherever it is used:

- :func:`check_key` refuses a key an ``Authorization`` header cannot carry (a character
  outside printable ASCII, a trailing newline pasted from a file), or one with spaces around
  it, before anything is sent.
- :func:`scrub` replaces the key with ``***`` where it stands as a token of its own, and in
  the escaped forms a server or a log writes it in (Python's ``repr``, JSON, a URL, HTML), since
  a body quoted as ``str(body)`` shows a key holding ``\\`` or quotes only escaped. A key of
  :data:`SHORT_KEY_CHARS` characters or more is masked wherever it appears, glued to other
  text too; a shorter one (``e``, ``abc``) only where it stands as a token of its own (not
  glued to a letter, digit, ``_`` or ``-`` on a side where the key itself ends in one), so
  it is masked where a server echoes it and words that merely contain it (``overloaded``)
  are left readable.

A key held as a :class:`Secret` prints as ``***``.

A process a run starts (an ``openai`` judge's ``serve`` server) inherits the run's
environment, every backend's key in it: :func:`note_key_variable` counts each variable a
backend reads its key from as the backend is built, and :func:`keys_in_environment` gives
the keys they hold, which such a process's output is scrubbed of. The count is the process's,
never cleared: an application that runs several configs has the variables of them all
counted, which only masks more (and a server's check counts another backend's key only when
it is long enough to be a secret: ``ManagedServer``).
"""

from __future__ import annotations

import html
import json
import os
import re
import threading
import urllib.parse
from collections.abc import Iterable
from functools import lru_cache

from trig_stream.errors import FatalBackendError

MASK = "***"
"""What a key is replaced with in a quoted text."""
SHORT_KEY_CHARS = 8
"""Keys shorter than this are masked as tokens of their own only (see the module's docstring):
any real key is longer, and a word holding a key that long is no word anyone reads."""

_TOKEN = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
"""Characters a key's token runs on through: a key glued to one of them is part of a
longer word, not the key."""

_NOT_TOKEN_BEFORE = r"(?<![A-Za-z0-9_-])"
_NOT_TOKEN_AFTER = r"(?![A-Za-z0-9_-])"


_KEY_VARIABLES: set[str] = set()
"""Every variable an API key is read from by a backend built in this process, of every config
it has run: a backend may be built by the application embedding the engine, outside any one
place that could count a run's own."""
_KEY_VARIABLES_LOCK = threading.Lock()  # backends are built, and keys read, in any thread


def note_key_variable(variable: str | None) -> None:
    """Count ``variable`` (an ``api_key_env``) among those API keys are read from.

    A backend calls it as it is built: a run builds them all before it checks or opens any,
    so that a judge's server started (or checked) first knows the keys of the backends
    beside it. :func:`key_from_env` counts the variables it reads too. None or ``""`` (no
    key) counts nothing.
    """
    if variable:
        with _KEY_VARIABLES_LOCK:
            _KEY_VARIABLES.add(variable)


def keys_in_environment() -> list[str]:
    """The keys the variables :func:`note_key_variable` counted hold now (those set and not
    empty), each once: what a process started with this environment may print."""
    with _KEY_VARIABLES_LOCK:
        variables = sorted(_KEY_VARIABLES)
    return list(dict.fromkeys(key for name in variables if (key := os.environ.get(name))))


def header_safe(key: str) -> bool:
    """Whether an HTTP header can carry ``key``: printable ASCII only (a newline would end
    the header, and a non-ASCII character cannot be encoded in it)."""
    return key.isascii() and key.isprintable()


_NAME_IN_CAPITALS = re.compile(r"[A-Z][A-Z0-9_]*")
"""How environment variables are named (``OPENAI_API_KEY``); a key is not written so."""


def unset_variable(variable: str) -> str:
    """How a message names ``variable``, an API key's variable found unset: by its name when
    it reads as one (capitals, digits and ``_``), else not quoted, for it may be the key
    itself pasted into ``api_key_env`` (``hf_...``, ``gsk_...``, hex: all valid names)."""
    if _NAME_IN_CAPITALS.fullmatch(variable):
        return f"the environment variable {variable} (api_key_env)"
    return (
        "the environment variable api_key_env names (not quoted: a name not in capitals may be "
        "a key pasted there, which belongs in the variable, not the config)"
    )


def key_from_env(variable: str, *, owner: str) -> str | None:
    """The API key in the environment variable ``variable``, checked (:func:`check_key`);
    None when ``variable`` is empty (``api_key_env = ""``: a server that takes no key).

    Args:
        variable: the variable's name (``api_key_env``).
        owner: who needs the key, for the message (``judge 'j'``, ``generator 'dalle3'``).

    Raises:
        FatalBackendError: the variable is unset or empty, or its key holds a character an
            HTTP header cannot carry.
    """
    if not variable:
        return None
    note_key_variable(variable)
    key = os.environ.get(variable)
    if not key:
        raise FatalBackendError(
            f"{owner}: set the API key: {unset_variable(variable)} is not set or empty; "
            'export the key in it (or api_key_env = "" for a server that takes no key)'
        )
    return check_key(key, owner=owner, variable=variable)


def check_key(key: str, *, owner: str, variable: str) -> str:
    """``key``, read from the environment variable ``variable``, if a header can carry it.

    Args:
        key: the key as read.
        owner: who needs the key, for the message (``judge 'j'``, ``generator 'dalle3'``).
        variable: the variable's name, for the message.

    Raises:
        FatalBackendError: the key holds a character an HTTP header cannot carry, or
            spaces before or after it. The message never quotes the key, nor says which
            character or where.
    """
    if not header_safe(key):
        raise FatalBackendError(
            f"{owner}: the environment variable {variable} (api_key_env) holds characters an "
            "HTTP header cannot carry (a trailing newline? a character outside printable "
            "ASCII?); export the key alone"
        )
    if key != key.strip():
        # A header carries them, but servers strip them and quote the bare key, which
        # masking the key as read would leave in plain text (the SDK's clients refuse a
        # header ending in one, taken for a server not reached).
        raise FatalBackendError(
            f"{owner}: the environment variable {variable} (api_key_env) holds the key with "
            "spaces before or after it; export the key alone"
        )
    return key


def scrub(text: str, secret: str | None) -> str:
    """``text`` with ``secret`` masked wherever it stands as a token of its own, as it is
    or escaped (see the module's docstring); an empty or missing ``secret`` masks nothing."""
    if not secret:
        return text
    return _pattern(secret).sub(MASK, text)


def scrub_all(text: str, secrets: Iterable[str]) -> str:
    """``text`` with each of ``secrets`` masked, as :func:`scrub` masks one."""
    for secret in secrets:
        text = scrub(text, secret)
    return text


class Secret:
    """An API key that prints as ``***``, so no repr, log or traceback shows it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The key itself, for the client only."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__


def _escaped_forms(secret: str) -> set[str]:
    """``secret`` as a text quoting it may show it: as it is, inside a Python string's
    ``repr`` (``\\`` doubled, either quote escaped or not, as the string around it decides),
    inside a JSON string (``/`` escaped or not), URL-encoded (``/`` kept or not, a space as
    ``+`` or ``%20``, the hex digits in capitals or not) and HTML-escaped (quotes or not)."""
    backslashed = secret.replace("\\", "\\\\")
    forms = {secret, html.escape(secret, quote=True), html.escape(secret, quote=False)}
    for safe in ("", "/"):
        for encoded in (
            urllib.parse.quote(secret, safe=safe),
            urllib.parse.quote_plus(secret, safe=safe),
        ):
            forms.update({encoded, _PERCENT_ESCAPE.sub(lambda escape: escape[0].lower(), encoded)})
    for single in (False, True):
        for double in (False, True):
            form = backslashed
            if single:
                form = form.replace("'", "\\'")
            if double:
                form = form.replace('"', '\\"')
            forms.add(form)
    in_json = json.dumps(secret)[1:-1]
    forms.update({in_json, in_json.replace("/", "\\/")})
    return forms


_PERCENT_ESCAPE = re.compile(r"%[0-9A-F]{2}")
"""A byte as ``quote`` encodes it; other encoders write the hex digits in lower case."""


@lru_cache(maxsize=16)  # a run has a key or two: built once, not at every quoted message
def _pattern(secret: str) -> re.Pattern[str]:
    alternatives = []
    # Longest first: a form that holds another is masked whole.
    short = len(secret) < SHORT_KEY_CHARS
    for form in sorted(_escaped_forms(secret), key=len, reverse=True):
        before = _NOT_TOKEN_BEFORE if short and form[0] in _TOKEN else ""
        after = _NOT_TOKEN_AFTER if short and form[-1] in _TOKEN else ""
        alternatives.append(before + re.escape(form) + after)
    return re.compile("|".join(alternatives))
