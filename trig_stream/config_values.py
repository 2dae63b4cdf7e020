"""How a config's values are held to its model, wherever they come from.

A table of a config file is validated as TOML wrote it, a value of another type refused
(:func:`validate_table`); a value made in Python (a backend instance's counts, a retry
policy) is checked against the bounds of the config field it stands for
(:func:`field_value_problem`); and a table passed through to a library or an API, which no
model checks, is searched for the NaN or infinity the run's manifest could not hold
(:func:`non_finite_passed_through`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from typing import Any, TypeVar, cast

import annotated_types
from pydantic import BaseModel

from trig_stream.config_paths import PASSED_THROUGH_OPTIONS
from trig_stream.config_problems import Loc

_Table = TypeVar("_Table", bound=BaseModel)


def validate_table(model: type[_Table], table: Mapping[str, Any]) -> _Table:
    """Validate a table of a config file against ``model``, refusing values of another type.

    A value is taken as the TOML file writes it, never converted: ``true`` is no number,
    ``"2"`` and ``2.0`` are no integer, ``"yes"`` is no boolean; but a string is a path, an
    array a tuple, and an integer a decimal number (pydantic's strict mode, on the JSON the
    table is). A table built in Python, holding values JSON has no form for (a ``Path``), is
    validated by Python's looser rules.

    Raises:
        pydantic.ValidationError: the table does not fit ``model``.
    """
    try:
        # NaN and infinity are written as JSON's extensions, which ``allow_inf_nan`` refuses.
        data = json.dumps(table, ensure_ascii=False).encode()
    except (TypeError, ValueError):  # a Path, a lone surrogate (UnicodeEncodeError)...
        return model.model_validate(table)
    return model.model_validate_json(data, strict=True)


def field_value_problem(model: type[BaseModel], name: str, value: object) -> str | None:
    """What is wrong with ``value`` as ``model``'s field ``name`` (its type, a number, and the
    bounds the config checks it against), or None when it would be accepted.

    Values made in Python (a backend instance's counts, a retry policy) reach the engine
    without the config's validation: they are checked against the same bounds, taken from
    the model so that the two never drift apart.
    """
    field = model.model_fields[name]
    whole = field.annotation is int
    if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)):
        return f"must be {'a whole number' if whole else 'a number'}, not {value!r}"
    # The config's own finiteness comes from its model settings, not from the field: a float
    # is checked here (an int is compared as it is; as a float, a huge one overflowed).
    if isinstance(value, float) and math.isnan(value):
        return "must be a number, not nan"
    if isinstance(value, float) and math.isinf(value):
        return f"must be a finite number, not {value!r}"
    if not whole and isinstance(value, int):
        try:
            float(value)
        except OverflowError:
            return f"must be a finite number, not {_number_shown(value)} (past a float's range)"
    for bound in field.metadata:
        if isinstance(bound, annotated_types.Ge) and not value >= (low := cast("float", bound.ge)):
            return f"must be at least {low}, not {_number_shown(value)}"
        if isinstance(bound, annotated_types.Le) and not value <= (high := cast("float", bound.le)):
            return f"must be at most {high}, not {_number_shown(value)}"
    return None


def _number_shown(value: float) -> str:
    # An int past 4300 digits has no str() at all (ValueError), and one of hundreds of
    # digits buries the message.
    if isinstance(value, int) and value.bit_length() > 64:
        digits = int(value.bit_length() * math.log10(2)) + 1
        return f"a{'' if value > 0 else ' negative'} number of about {digits} digits"
    return repr(value)


def non_finite_passed_through(data: Any) -> Iterator[tuple[Loc, str]]:
    """Where parsed config data holds NaN or an infinity in a table passed through to a
    library or an API (:data:`PASSED_THROUGH_OPTIONS`, in a backend's options or a nested
    backend's), and why it is refused. Elsewhere a number's own type refuses them; there
    nothing does, and the run's manifest, which is JSON, could not hold them."""
    if not isinstance(data, dict):
        return
    for kind in ("generators", "judges"):
        entries = data.get(kind)
        for index, entry in enumerate(entries if isinstance(entries, list) else []):
            options = entry.get("options") if isinstance(entry, dict) else None
            if isinstance(options, dict):
                yield from _passed_through_tables(options, (kind, index, "options"))


def _passed_through_tables(options: dict[Any, Any], loc: Loc) -> Iterator[tuple[Loc, str]]:
    # The tables resolve_options leaves alone: its other nested tables are backends' options.
    for key, value in options.items():
        if key in PASSED_THROUGH_OPTIONS:
            yield from _non_finite(value, (*loc, key))
        elif isinstance(value, dict):
            yield from _passed_through_tables(value, (*loc, key))


def _non_finite(data: Any, loc: Loc) -> Iterator[tuple[Loc, str]]:
    if isinstance(data, float) and not math.isfinite(data):
        yield (
            loc,
            f"not a finite number (got {data}): the run's manifest, which is JSON, cannot "
            "hold it; give a finite number",
        )
    elif isinstance(data, dict | list):
        items = data.items() if isinstance(data, dict) else enumerate(data)
        for key, value in items:
            yield from _non_finite(value, (*loc, key))
