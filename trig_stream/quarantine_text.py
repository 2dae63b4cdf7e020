"""The run's quarantine list: where it lies, and a malformed dataset record as it can hold it.

A quarantined record is kept so a user can see what was wrong with it, but a record is
whatever the dataset file held: embedded images, lone surrogates, values of types JSON has
no form for, nesting hundreds deep. :func:`without_images` makes any of them a JSON object of
bounded size that still shows what the record said. :func:`read_quarantine_list` counts
the records such a list holds; :func:`quarantine_lists` says which of a run directory's
lists (:data:`QUARANTINE`, :data:`QUARANTINE_PARTIAL`) to read.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Mapping
from datetime import date, time
from pathlib import Path
from typing import Any

from trig_stream.records import storable_text

QUARANTINE = "quarantine.jsonl"
QUARANTINE_PARTIAL = "quarantine.jsonl.partial"
"""The quarantine list a run is writing: it replaces :data:`QUARANTINE` once the dataset has
been read through (a run stopped before then would leave only the start of its list)."""

RECORD_DEPTH = 16
"""Levels of arrays and objects a quarantined record keeps; what lies deeper is kept as the
start of its text (a record nested hundreds deep is no TRIG record, and JSON writers have a
depth limit)."""
VALUE_SHOWN = 200
"""Characters kept of a value that a quarantined record holds as text, cut short."""
IMAGE_TEXT_LIMIT = 4096
"""Characters from which text in a record's image fields (``image``, ``image.path``,
``image.bytes``, ``img_id``) is kept as its start and its length: a path is at most 4096
bytes, and longer text is a picture written inline (a data: URL, base64), as large as the
bytes that are left out."""
_IMAGE_FIELDS = frozenset(("image", "img_id"))


def quarantine_lists(run_dir: Path, *, running: bool) -> tuple[Path, Path]:
    """The quarantine files of ``run_dir`` in the order to read them, the first that exists
    being the list to show: while a run writes the directory, its own list so far, else the
    last whole one; with none running, the last whole list, else the start of one that a
    run killed before it read the dataset through left (see
    :meth:`~trig_stream.store.RunDir.close`)."""
    partial, final = run_dir / QUARANTINE_PARTIAL, run_dir / QUARANTINE
    return (partial, final) if running else (final, partial)


def read_quarantine_list(lines: Iterable[bytes]) -> tuple[int, frozenset[int]]:
    """How many records a quarantine list's ``lines`` hold, and the dataset indexes of those
    that name one.

    A record counts when its line is whole (it ends in a newline) and reads as a JSON object:
    a run killed while it wrote a line leaves its start, which is no record.
    """
    records = 0
    indexes: set[int] = set()
    for line in lines:
        if not line.endswith(b"\n"):
            continue
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if not isinstance(record, dict):
                continue
            records += 1
            index = record.get("index")
            if isinstance(index, int) and not isinstance(index, bool):
                indexes.add(index)
    return records, frozenset(indexes)


def without_images(raw: Mapping[str, Any]) -> dict[str, Any]:
    """``raw`` as the quarantine file can hold it: bytes (embedded images) at any depth left
    out, text in its image fields past :data:`IMAGE_TEXT_LIMIT` cut short, text made
    storable, nesting cut at :data:`RECORD_DEPTH`."""
    return {
        _storable_key(key): storable(
            _without_inline_text(value) if key in _IMAGE_FIELDS else value, 1
        )
        for key, value in raw.items()
    }


def _without_inline_text(value: Any) -> Any:
    """An image field with its text (or, in a ``{bytes, path}`` mapping, its values' text)
    past :data:`IMAGE_TEXT_LIMIT` characters cut to its start and a note of its length."""
    if isinstance(value, str) and len(value) > IMAGE_TEXT_LIMIT:
        return f"{value[:VALUE_SHOWN]}... <{len(value)} characters, the rest omitted>"
    if isinstance(value, Mapping):
        return {k: _without_inline_text(v) if isinstance(v, str) else v for k, v in value.items()}
    return value


def storable(value: Any, depth: int = 0) -> Any:
    """``value`` as JSON can write it: every lone surrogate in its text written as an escape
    (``\\ud800``), bytes at any depth (an image, as ``{"bytes": ..., "path": ...}`` or a list of
    them) replaced by a note of their size, nesting past :data:`RECORD_DEPTH` and values
    of other types kept as the start of their text."""
    if isinstance(value, str):
        return storable_text(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(value)} bytes omitted>"
    if isinstance(value, Mapping | list | tuple):
        if depth >= RECORD_DEPTH:
            return _abridged(value)
        if isinstance(value, Mapping):
            return {_storable_key(k): storable(v, depth + 1) for k, v in value.items()}
        return [storable(v, depth + 1) for v in value]
    return _scalar_text(value)


def _scalar_text(value: object) -> str:
    """A value of another type (a parquet timestamp, decimal, duration) as text."""
    try:
        text = value.isoformat() if isinstance(value, date | time) else str(value)
    except Exception:  # an object whose str fails still leaves a trace
        text = f"<{type(value).__name__}>"
    return storable_text(text[:VALUE_SHOWN])


def _storable_key(key: object) -> str:
    return storable_text(key if isinstance(key, str) else str(key))[:VALUE_SHOWN]


def _abridged(value: object) -> str:
    """The start of ``value``'s text, at most :data:`VALUE_SHOWN` characters. Written with a
    budget rather than ``repr``: each level of nesting costs a character, so the walk stays
    shallow however deep the value goes."""
    parts: list[str] = []
    budget = VALUE_SHOWN

    def put(text: str) -> bool:
        nonlocal budget
        parts.append(text[:budget])
        budget -= len(text)
        return budget > 0

    def walk(item: object) -> bool:
        if isinstance(item, Mapping):
            if not put("{"):
                return False
            for n, (k, v) in enumerate(item.items()):
                if not (
                    put(", " if n else "") and put(f"{json.dumps(_storable_key(k))}: ") and walk(v)
                ):
                    return False
            return put("}")
        if isinstance(item, list | tuple):
            if not put("["):
                return False
            for n, v in enumerate(item):
                if not (put(", " if n else "") and walk(v)):
                    return False
            return put("]")
        if isinstance(item, bytes | bytearray | memoryview):
            return put(f"<{len(item)} bytes omitted>")
        if isinstance(item, str):
            return put(json.dumps(item[:VALUE_SHOWN]))
        if item is None or isinstance(item, bool | float):
            return put(json.dumps(item))
        return put(_scalar_text(item))

    if not walk(value):
        parts.append("...")
    return storable_text("".join(parts))
