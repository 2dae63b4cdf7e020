"""The problems of a config, as its messages name them: file, line, key and what to do.

:mod:`trig_stream.config` validates; this module finds what no key takes (text with a NUL
or half a character, dates), turns pydantic's errors into one line each naming the file's
line and the dotted key (``generators[0].options.path``), and finds that line in the TOML
text (:func:`locate_key`). It reads no file and knows no config model of its own.
"""

from __future__ import annotations

import datetime
import difflib
import re
import string
import unicodedata
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Final, TypeAlias, get_args

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails, InitErrorDetails, PydanticCustomError

from trig_stream.records import storable_text

Loc: TypeAlias = tuple[str | int, ...]
"""Where a value is in a config: its keys and array indices from the top."""

UNQUOTED_PROBLEM: Final = "unquoted_problem"
"""The error type of a bad URL or variable name, whose input no message quotes (it may hold a
secret)."""

DUPLICATE_NAME: Final = "duplicate_name"
"""The error type of a name used twice; its context says where the second use is, so that
the message names that entry's line rather than the whole config's."""


def key_problem(model: type[BaseModel], loc: Loc, message: str, value: Any) -> ValidationError:
    """The error of ``value`` at ``loc`` of ``model``'s table, for a check of several of its
    keys (a model validator) to raise: pydantic names that key, prefixed with where the table
    is, so that the message names the line of the key at fault, not the table's header. An
    empty ``loc`` is the table itself."""
    error = PydanticCustomError("value_error", "{error}", {"error": message})
    return ValidationError.from_exception_data(
        model.__name__, [InitErrorDetails(type=error, loc=loc, input=value)]
    )


def unusable_values(data: Any, *, dates: bool = True) -> Iterator[tuple[Loc, str]]:
    """Where parsed config data holds a value no key takes, and why: text with a NUL
    character or half a character (a lone surrogate), which no path, name, URL or command can
    carry, a key included; and, with ``dates``, a date or time (TOML has them, a config uses
    none). A table that holds itself (a YAML alias can) is looked through once."""
    for loc, why, is_key in unusable_entries(data, dates=dates):
        yield (loc[:-1] if is_key else loc), why


def unusable_entries(data: Any, *, dates: bool = True) -> Iterator[tuple[Loc, str, bool]]:
    """As :func:`unusable_values`, with where the value is refused; each with whether the
    refused thing is the key its place ends with (True), not the value there."""
    return _unusable(data, (), dates, set())


def _unusable(data: Any, loc: Loc, dates: bool, seen: set[int]) -> Iterator[tuple[Loc, str, bool]]:
    # The last item: whether the refused thing is the key ``loc`` ends with, not its value.
    # A container is walked once, wherever else it is referenced: YAML aliases share one, and
    # nine aliases on each of eight levels walked it 9**8 times; a cycle ends the same way.
    if isinstance(data, dict | list):
        if id(data) in seen:
            return
        seen.add(id(data))
        items = data.items() if isinstance(data, dict) else enumerate(data)
        for key, value in items:
            problem = text_problem(key) if isinstance(key, str) else None
            if problem is not None:
                yield (*loc, key), f"the key {key!r} {problem}", True
            yield from _unusable(value, (*loc, key), dates, seen)
    elif isinstance(data, str):
        problem = text_problem(data)
        if problem is not None:
            yield loc, problem, False
    elif dates and isinstance(data, datetime.date | datetime.time):
        yield loc, "a date or time, which no key takes: quote it if it is text", False


MAX_NESTING: Final = 64
"""The deepest arrays and tables a config may nest, counted from its top: a config needs a
handful of levels; the checks that follow recurse once per level, and the validator's JSON
reader stops at a few hundred."""


def nested_too_deep(data: Any, limit: int = MAX_NESTING) -> Loc | None:
    """Where parsed config data first nests arrays or tables deeper than ``limit`` levels, or
    None: the key whose value reaches that deep through arrays alone (``x`` of
    ``x = [[[...]]]``, not its dozens of indices), else the table one level past the limit.
    Walked without recursion, so that data of any depth is measured."""
    stack: list[tuple[Any, Loc]] = [(data, ())]
    while stack:
        value, loc = stack.pop()
        if not isinstance(value, dict | list):
            continue
        if len(loc) >= limit:
            keys = [index for index, part in enumerate(loc) if isinstance(part, str)]
            return loc[: keys[-1] + 1] if keys else loc
        items = value.items() if isinstance(value, dict) else enumerate(value)
        stack.extend((item, (*loc, key)) for key, item in reversed(list(items)))
    return None


def checkable(data: Any) -> Any:
    """``data`` with its dates as ISO text and its text with half a character escaped, so that
    the rest can still be validated strictly, on the JSON it is (which has neither: with
    them, the table is validated by Python's looser rules, and ``2.0`` would pass as an
    integer), while those values are refused on their own."""
    if isinstance(data, dict):
        return {checkable(key): checkable(value) for key, value in data.items()}
    if isinstance(data, list):
        return [checkable(value) for value in data]
    if isinstance(data, str):
        return storable_text(data)
    if isinstance(data, datetime.date | datetime.time):
        return data.isoformat()
    return data


def text_problem(text: str) -> str | None:
    """What makes ``text`` unfit for a config value (a NUL, half a character), or None."""
    if "\x00" in text:
        return (
            "holds a NUL character (\\u0000), which no path, name, URL or command can carry: "
            "remove it"
        )
    if not text.isascii() and any("\ud800" <= char <= "\udfff" for char in text):
        return "holds half a character (a lone surrogate, \\ud800-\\udfff): remove it"
    return None


def problems_message(source: Path, problems: list[str]) -> str:
    """The message of an invalid config: a head naming ``source`` and the count, then one
    indented line per problem."""
    head = f"{source}: invalid config ({len(problems)} problem{'s' if len(problems) > 1 else ''})"
    return "\n".join([head, *(f"  {p}" for p in problems)])


def problem_lines(
    exc: ValidationError,
    source: Path,
    text: str,
    prefix: tuple[str | int, ...],
    model: type[BaseModel],
    refused: Mapping[Loc, bool] | None = None,
) -> list[str]:
    """One line per error of ``exc``, but none for a value ``refused`` already names (a date
    where a number goes), nor under a key it names: only an unknown key that holds such a
    value is told apart."""
    lines = []
    for error in exc.errors(include_url=False):
        loc = prefix + tuple(error["loc"])
        if error["type"] == DUPLICATE_NAME:  # at the entry that repeats the name
            loc += (error["ctx"]["section"], error["ctx"]["index"], "name")
        if refused and _already_refused(loc, error["type"] == "extra_forbidden", refused):
            continue
        lines.append(problem_line(source, text, loc, _message(error, model)))
    return lines


def error_locs(exc: ValidationError, prefix: Loc = ()) -> list[Loc]:
    """Where each error of ``exc`` is, under ``prefix``: the keys alone, without pydantic's
    validator steps."""
    return [
        tuple(part for part in prefix + tuple(error["loc"]) if not _is_validator_step(part))
        for error in exc.errors(include_url=False)
    ]


def _already_refused(loc: Loc, unknown_key: bool, refused: Mapping[Loc, bool]) -> bool:
    keys = tuple(p for p in loc if not _is_validator_step(p))
    for depth in range(1, len(keys) + 1):
        is_key = refused.get(keys[:depth])
        if is_key is not None and (is_key or depth < len(keys) or not unknown_key):
            return True
    return False


_VALIDATOR_STEP = re.compile(
    r"(?:function-(?:after|before|wrap|plain)|list|dict|set|frozenset|tuple|literal|union"
    r"|tagged-union|nullable|is-instance|is-subclass|json-or-python|lax-or-strict|chain|model"
    r"|dataclass|typed-dict|default|generator|definition-ref|custom-error|enum"
    r"|constrained-[a-z]+)\[.*\]",
    re.DOTALL,
)


_STEP_NAMES: Final = frozenset({"function-after", "function-before", "[key]"})
"""Steps named without brackets: pydantic's ``[key]`` follows a dict key it refuses (its
value's errors end with the key alone)."""


def _is_validator_step(part: str | int) -> bool:
    """Whether a part of an error's location is a validator's name (``function-after[...]``,
    ``list[str]``) or marker (``[key]``), no key: told apart by pydantic's names for them,
    so that a key holding a bracket (``"a[0]"``) is still named."""
    return isinstance(part, str) and (
        part in _STEP_NAMES or _VALIDATOR_STEP.fullmatch(part) is not None
    )


def nested_problems(exc: ValidationError, model: type[BaseModel]) -> str:
    """The problems of a table nested in a backend's options (a wrapper's inner generator's
    options, a metric's), in one line, each named by its key as the config's own are:
    ``sise: unknown key; did you mean 'size'?``."""
    return "; ".join(
        f"{dotted_key(tuple(error['loc'])) or '(the table)'}: {_message(error, model)}"
        for error in exc.errors(include_url=False)
    )


def _message(error: ErrorDetails, model: type[BaseModel]) -> str:
    if error["type"] == "extra_forbidden":
        return "unknown key" + _known_keys_hint(model, tuple(error["loc"]))
    if error["type"] == "missing":
        return "required key is missing"
    if error["type"] in (UNQUOTED_PROBLEM, DUPLICATE_NAME):
        return error["msg"]
    if error["type"] == "value_error":
        # Our own checks: their message says what is wrong, without pydantic's prefix,
        # and a check of a whole table would quote all of it.
        message = str(error.get("ctx", {}).get("error", error["msg"]))
        if not isinstance(error.get("input"), dict):
            message += f" (got {_as_written(error.get('input'))})"
        return message
    return f"{error['msg']} (got {_as_written(error.get('input'))})"


def _as_written(value: Any) -> str:
    """``value`` as TOML writes it (``true``, ``"2"``), so a message shows what the file says."""
    from trig_stream.upstream_config.toml_writer import toml_value

    try:
        return toml_value(value)
    except TypeError:
        return repr(value)


def _known_keys_hint(model: type[BaseModel], loc: tuple[str | int, ...]) -> str:
    """``; did you mean 'x'?`` for an unknown key at ``loc`` in ``model``, or the keys its
    table takes; empty when the table is not a model's (a table passed to a library)."""
    table: type[BaseModel] | None = model
    for part in loc[:-1]:
        if isinstance(part, int) or _is_validator_step(part):
            continue  # a list's index, or a validator's name
        field = fields_by_key(table).get(str(part)) if table else None
        table = _model_in(field.annotation) if field else None
    if table is None:
        return ""
    known = [key for key in fields_by_key(table) if not key.startswith("_")]
    close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {close[0]!r}?"
    return f"; this table takes: {', '.join(known)}"


def fields_by_key(model: type[BaseModel]) -> dict[str, FieldInfo]:
    """The keys ``model`` reads from a table, in its fields' order, each with its field, as
    pydantic validates: a field's validation aliases (an ``alias`` is one, unless a
    ``validation_alias`` replaces it), unless the model validates by name alone, and its
    name where the model reads that too (a field without an alias, or a model that
    validates by name as well). A key it does not read, as a field's name beside its alias,
    runs with the default."""
    from pydantic import AliasChoices, AliasPath

    config = model.model_config
    by_name = bool(config.get("populate_by_name") or config.get("validate_by_name"))
    by_alias = config.get("validate_by_alias", True) is not False
    keys: dict[str, FieldInfo] = {}
    for name, field in model.model_fields.items():
        if by_name or field.validation_alias is None:
            keys.setdefault(name, field)
        aliases = field.validation_alias if by_alias else None
        choices = aliases.choices if isinstance(aliases, AliasChoices) else [aliases]
        for choice in choices:
            if isinstance(choice, str):
                keys.setdefault(choice, field)
            elif isinstance(choice, AliasPath) and isinstance(choice.path[0], str):
                keys.setdefault(choice.path[0], field)
    return keys


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds, itself or in a list, a dict's values or an optional."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in reversed(get_args(annotation)):  # list[M], dict[str, M], M | None, Annotated
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def problem_line(source: Path, text: str, loc: Loc, message: str) -> str:
    """One problem as a message names it: ``FILE:LINE: dotted.key: message`` (the line found
    in ``text``; without one, the file alone)."""
    dotted = dotted_key(loc)
    line = locate_key(text, loc)
    where = f"{source}:{line}" if line else f"{source}"
    return f"{where}: {dotted or '(top level)'}: {message}"


def dotted_key(loc: Loc) -> str:
    """``loc`` written as a config's keys are: ``generators[0].options.path``; a key that is
    no bare TOML key is quoted as TOML quotes it (``run."x.y"``, ``run."a\\nb"``), so that
    it reads as one key, on one line."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _is_validator_step(part):
            out += ("." if out else "") + toml_key(part)
    return out


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_QUOTED = {
    "\\": "\\\\",
    '"': '\\"',
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def toml_key(key: str) -> str:
    """``key`` as TOML writes it: bare when it can be, else a basic string whose control
    characters (and line separators) are escaped."""
    if _BARE_KEY.fullmatch(key):
        return key
    quoted = "".join(
        _QUOTED.get(char)
        or (f"\\u{ord(char):04x}" if unicodedata.category(char) in ("Cc", "Zl", "Zp") else char)
        for char in key
    )
    return f'"{quoted}"'


def locate_key(text: str, loc: tuple[str | int, ...]) -> int | None:
    """Find the 1-based line of a key path in TOML text, or of its nearest enclosing table.

    Only what TRIG configs use is understood: ``[table]``, ``[[array]]`` and ``key = value``
    lines, their keys bare, quoted (escapes included) or dotted. Returns None when nothing
    along the path is found.
    """
    wanted = tuple(p for p in loc if not _is_validator_step(p))
    table: tuple[str | int, ...] = ()
    array_counts: dict[tuple[str | int, ...], int] = {}
    best: tuple[int, int] | None = None  # (matched length, line)
    for number, raw in enumerate(text.splitlines(), start=1):
        header = _header(raw)
        if header:
            names, is_array = header
            table = _expand(names, table, array_counts, is_array=is_array)
            best = _better(best, wanted, table, number)
            continue
        key = _key_before_equals(raw)
        if key:
            best = _better(best, wanted, table + key, number)
    return best[1] if best else None


def _header(line: str) -> tuple[tuple[str, ...], bool] | None:
    """The keys of a ``[table]`` or ``[[array]]`` line, and whether it is an array's."""
    start = len(line) - len(line.lstrip())
    is_array = line.startswith("[[", start)
    if not line.startswith("[", start):
        return None
    parsed = _key_parts(line, start + (2 if is_array else 1))
    if parsed is None:
        return None
    names, end = parsed
    close = "]]" if is_array else "]"
    if not line.startswith(close, end):
        return None
    rest = line[end + len(close) :].strip()
    return (names, is_array) if not rest or rest.startswith("#") else None


def _key_before_equals(line: str) -> tuple[str, ...] | None:
    """The keys of a ``key = value`` line."""
    parsed = _key_parts(line, 0)
    if parsed is None or not line.startswith("=", parsed[1]):
        return None
    return parsed[0]


_ESCAPED = {
    "b": "\b",
    "t": "\t",
    "n": "\n",
    "f": "\f",
    "r": "\r",
    '"': '"',
    "\\": "\\",
}


def _key_parts(line: str, pos: int) -> tuple[tuple[str, ...], int] | None:
    """A TOML key starting at ``pos`` (blanks first allowed): its dotted parts, each bare,
    a basic string (escapes read) or a literal string, and where the blanks after it end."""
    parts: list[str] = []
    while True:
        pos = _after_blanks(line, pos)
        if line.startswith('"', pos):
            found = _basic_string(line, pos + 1)
        elif line.startswith("'", pos):
            end = line.find("'", pos + 1)
            found = None if end < 0 else (line[pos + 1 : end], end + 1)
        else:
            bare = _BARE_KEY.match(line, pos)
            found = None if bare is None else (bare.group(), bare.end())
        if found is None:
            return None
        parts.append(found[0])
        pos = _after_blanks(line, found[1])
        if not line.startswith(".", pos):
            return tuple(parts), pos
        pos += 1


def _basic_string(line: str, pos: int) -> tuple[str, int] | None:
    # The body of a "..." key from ``pos`` (after its quote) to its closing quote.
    out: list[str] = []
    while pos < len(line):
        char = line[pos]
        if char == '"':
            return "".join(out), pos + 1
        if char != "\\":
            out.append(char)
            pos += 1
            continue
        escape = line[pos + 1 : pos + 2]
        if escape in _ESCAPED:
            out.append(_ESCAPED[escape])
            pos += 2
            continue
        width = {"u": 4, "U": 8}.get(escape)
        digits = line[pos + 2 : pos + 2 + width] if width else ""
        if not width or len(digits) != width or not all(c in string.hexdigits for c in digits):
            return None
        try:
            out.append(chr(int(digits, 16)))
        except ValueError:  # past the last code point
            return None
        pos += 2 + width
    return None


def _after_blanks(line: str, pos: int) -> int:
    while pos < len(line) and line[pos] in " \t":
        pos += 1
    return pos


def _expand(
    names: tuple[str, ...],
    current: tuple[str | int, ...],
    array_counts: dict[tuple[str | int, ...], int],
    *,
    is_array: bool,
) -> tuple[str | int, ...]:
    # Rebuild the full path, inserting the index of every array-of-tables we pass through.
    path: tuple[str | int, ...] = ()
    for depth, name in enumerate(names):
        path = (*path, name)
        last = depth == len(names) - 1
        if last and is_array:
            array_counts[path] = array_counts.get(path, -1) + 1
            path = (*path, array_counts[path])
        elif path in array_counts:
            path = (*path, array_counts[path])
    return path


def _better(
    best: tuple[int, int] | None,
    wanted: tuple[str | int, ...],
    path: tuple[str | int, ...],
    line: int,
) -> tuple[int, int] | None:
    # A dotted key's line, or a header's, names the tables it passes through too: the first
    # one found is the line of a table that no line of its own opens (``plain."q.r" = 1``).
    matched = min(len(path), len(wanted))
    if not matched or wanted[:matched] != path[:matched]:
        return best
    if best is None or matched > best[0]:
        return (matched, line)
    return best
