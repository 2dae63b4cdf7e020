"""TOML text for ``import-config``: names, keys, values and comments written by hand.

The converted config is written line by line rather than by a TOML library so that its
header can carry the conversion's warnings as comments and each table keeps upstream's order.
These helpers give each piece its TOML form; the converter lays out the tables. :func:`shown`
gives an upstream value as a warning (a comment) or an error names it, :func:`key_text` an
upstream key.
"""

from __future__ import annotations

import json
import math
import re
import reprlib
from collections.abc import Mapping
from typing import Any

from trig_stream.records import is_safe_name, printable

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_DOTS = re.compile(r"\.{2,}")

SHOWN_BITS = 2_000
"""Integers longer than this are shown by their length: Python writes no integer of over
640 digits (its least limit; 4,300 by default), and YAML's hexadecimal ones are read
whatever their length."""


class _Shown(reprlib.Repr):
    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > SHOWN_BITS:
            return f"<an integer of {x.bit_length():,} bits>"
        return super().repr_int(x, level)


_SHOWN = _Shown()
# Two levels of a few items each: YAML aliases make a list of 9**9 items in a 1 KB file, whose
# whole repr filled memory.
_SHOWN.maxlevel = 2
_SHOWN.maxlist = _SHOWN.maxdict = _SHOWN.maxtuple = _SHOWN.maxset = 4
_SHOWN.maxstring = _SHOWN.maxother = 100


def safe_name(name: str) -> str:
    """``name`` as a valid run, generator or judge name here (``imported`` if nothing is left)."""
    if is_safe_name(name):
        return name
    cleaned = _UNSAFE_NAME_CHARS.sub("-", name)
    cleaned = _DOTS.sub(".", cleaned).strip("-._")[:128]
    return cleaned if is_safe_name(cleaned) else "imported"


def shown(value: Any) -> str:
    """``value``'s repr as a message shows it: long strings and large or deeply nested lists
    and mappings cut short with ``...``."""
    return _SHOWN.repr(value)


def too_long_to_write(value: Any) -> bool:
    """Whether ``value`` is an integer :func:`shown` gives by its length, and ``str()`` may
    refuse to write."""
    return isinstance(value, int) and value.bit_length() > SHOWN_BITS


def key_text(key: Any) -> str:
    """An upstream mapping key as a message names it: its text, or an integer too long to
    write shown by its length."""
    return shown(key) if too_long_to_write(key) else str(key)


def comment(text: str) -> str:
    """``text`` on one line, to follow a ``#``.

    Whitespace runs become one space; the other control characters, which a TOML comment
    cannot hold (DEL included), are written as ``\\xNN`` escapes, as
    :func:`~trig_stream.records.printable` shows them on a terminal.
    """
    return printable(" ".join(text.split()))


def assignments(table: Mapping[str, Any]) -> list[str]:
    """One ``key = value`` line per entry of ``table``."""
    return [f"{toml_key(key)} = {toml_value(value)}" for key, value in table.items()]


def toml_key(key: str) -> str:
    """``key`` bare when TOML allows it, quoted otherwise."""
    return key if _BARE_KEY.match(key) else _basic_string(key)


def toml_value(value: Any) -> str:
    """The TOML form of a bool, number, string, mapping (inline table) or list.

    Raises:
        TypeError: ``value`` has no TOML form.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _basic_string(value)
    if isinstance(value, Mapping):
        if not value:
            return "{}"
        return (
            "{ "
            + ", ".join(f"{toml_key(str(k))} = {toml_value(v)}" for k, v in value.items())
            + " }"
        )
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def _basic_string(text: str) -> str:
    """``text`` as a TOML basic string (a quoted key or a string value)."""
    # JSON's escapes are TOML's, except that TOML also forbids a raw DEL.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")
