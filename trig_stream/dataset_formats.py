"""Reading a dataset's files as raw records: legacy TRIG JSON, JSON Lines and parquet.

Each reader yields the records of one file (or a folder of parquet files) as mappings, in
file order, unchecked: :mod:`trig_stream.dataset` checks them. What is no record (a JSON Lines
line that is not an object, a JSON entry that is a string) comes out as an :class:`Unreadable`
with its reason, to be quarantined; what makes the whole file unreadable raises
:class:`~trig_stream.errors.DatasetError`.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trig_stream.errors import DatasetError, DatasetInterrupted
from trig_stream.files import open_regular_file, undecodable_byte
from trig_stream.journal import holds_our_journal
from trig_stream.manifest import MANIFEST, MANIFEST_HEAD_BYTES, manifest_head_is_ours

# Rows per polars batch: small when rows carry images (one p2p row holds a ~1.4 MB source
# image), large for text-only files, where the per-batch cost dominates.
PARQUET_BATCH_ROWS_WITH_IMAGES = 16
PARQUET_BATCH_ROWS_TEXT = 1024
REPORT_FOLDER = "report"
"""``trig-stream report``'s default folder in a run directory (``report/<model>/``)."""

JUDGEMENTS_FILE = "judgements.parquet"
"""The parquet file a report writes per model: ``report/<model>/judgements.parquet`` in a
run directory."""


def read_json(path: Path) -> Iterator[Mapping[str, Any]]:
    try:
        # From bytes, json finds the encoding itself: UTF-8 (with or without a BOM), -16, -32.
        text = path.read_bytes()
        # A list of records keeps every one of them; an object of records would keep only the
        # last of two under one key, without a word: its pairs are read as they stand. (The
        # hook costs ~15% of the parse: a list, the common form, goes without it.)
        listed = text.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"[")
        data = json.loads(text, object_pairs_hook=None if listed else _json_object)
    except OSError as exc:
        raise DatasetError(f"cannot read dataset {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        hint = ""
        if exc.msg == "Extra data":  # a second value after the first: one record per line?
            hint = ' (JSON Lines, one record per line? name it .jsonl or set format = "jsonl")'
        raise DatasetError(f"cannot read dataset {path}: {exc}{hint}") from None
    except UnicodeDecodeError as exc:
        raise DatasetError(
            f"cannot read dataset {path}: byte {undecodable_byte(text, exc)} is not "
            f"{exc.encoding} text"
        ) from None
    except (ValueError, RecursionError) as exc:  # an integer of 5,000 digits; deep nesting
        raise DatasetError(f"cannot read dataset {path}: {_json_limit(exc)}") from None
    if isinstance(data, Mapping):
        # Some TRIG files map data_id -> record.
        if data and not any(isinstance(value, Mapping) for value in data.values()):
            raise DatasetError(
                f"dataset {path}: a JSON object whose values are no records: expected a list "
                "of TRIG records (one record alone? put it in [ ])"
            )
        # A key named twice: both records come out, in order, and the second is quarantined
        # as a duplicate, as in a list (where the first wins).
        for key, value in data.pairs if isinstance(data, _RepeatedKeys) else data.items():
            if not isinstance(value, Mapping):
                reason = f"{key!r} maps to a JSON {_kind(value)}, not a record"
                yield Unreadable(reason, value, key=key)
            elif "data_id" in value and value["data_id"] != key:
                # Which names it? Taking either quietly judges it under a name it may not have
                # (and refuses the record that does have it as a duplicate).
                yield Unreadable(
                    f"key {key!r} maps to a record whose data_id is {value['data_id']!r}: "
                    "make them agree, or drop the record's data_id",
                    value,
                    key=key,
                )
            else:
                yield {"data_id": key, **value}
        return
    if not isinstance(data, list):
        raise DatasetError(
            f"dataset {path}: expected a JSON list of TRIG records, not a JSON {_kind(data)}"
        )
    for index, record in enumerate(data):
        if isinstance(record, Mapping):
            yield record
        else:
            yield Unreadable(f"entry {index} is a JSON {_kind(record)}, not a record", record)


class _RepeatedKeys(dict[str, Any]):
    """A JSON object that names a key more than once: a dict, as JSON readers make it (the
    last value of a key wins), with every pair as written in :attr:`pairs`."""

    def __init__(self, pairs: list[tuple[str, Any]]) -> None:
        super().__init__(pairs)
        self.pairs = pairs


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    record = dict(pairs)
    return record if len(record) == len(pairs) else _RepeatedKeys(pairs)


def _kind(value: object) -> str:
    """A JSON value's type, as JSON names it."""
    if value is None:
        return "null"
    names = {bool: "boolean", int: "number", float: "number", str: "string", list: "array"}
    return names.get(type(value), "object")


LINE_SHOWN = 200
"""Characters of an unreadable JSON Lines line kept in its quarantine record."""


class Unreadable(dict[str, Any]):
    """A JSON Lines line, or a JSON file's entry, that is no record (or a record that names
    itself two ways): quarantined with ``reason`` and the start of what it holds (the record
    itself), the rest read on."""

    def __init__(self, reason: str, line: bytes | object, *, key: str | None = None) -> None:
        if isinstance(line, bytes):
            super().__init__(line=line.decode("utf-8", "replace")[:LINE_SHOWN])
        elif isinstance(line, Mapping):  # a record refused as a whole: kept as it is
            super().__init__(line)
        else:
            super().__init__(value=json.dumps(line)[:LINE_SHOWN])
        if key is not None and "data_id" not in self:
            # A JSON object's key names the entry: its quarantine says so.
            self["data_id"] = key
        self.reason = reason
        self.key = key
        """The JSON object's key the entry is under: the data_id it keeps from a later
        entry of that key, as a refused record keeps its own (None in a list or lines)."""


def read_json_lines(path: Path) -> Iterator[Mapping[str, Any]]:
    # One record per line, read as it goes: a line that is not a JSON object (or not UTF-8)
    # is that record's fault, quarantined; blank lines are skipped.
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise DatasetError(f"cannot read dataset {path}: {exc}") from None
    with handle:
        for number, raw in enumerate(handle, start=1):
            whole = raw.rstrip(b"\r\n")  # what an error's byte counts from, a mark included
            line = whole
            if number == 1:
                line = line.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte order mark
                _refuse_wide_text(path, line)
            if not line.strip():
                continue
            try:
                record = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as exc:
                byte = undecodable_byte(whole, exc)
                yield Unreadable(f"line {number}: byte {byte} is not utf-8 text", line)
            except json.JSONDecodeError as exc:
                yield Unreadable(f"line {number} is not JSON: {exc}", line)
            except (ValueError, RecursionError) as exc:
                yield Unreadable(f"line {number}: {_json_limit(exc)}", line)
            else:
                if isinstance(record, Mapping):
                    yield record
                else:
                    kind = _kind(record)
                    yield Unreadable(f"line {number} is a JSON {kind}, not a record", line)


WIDE_BYTE_ORDER_MARKS = {  # longest first: UTF-32 LE's begins with UTF-16 LE's
    b"\xff\xfe\x00\x00": "UTF-32",
    b"\x00\x00\xfe\xff": "UTF-32",
    b"\xff\xfe": "UTF-16",
    b"\xfe\xff": "UTF-16",
}


def _refuse_wide_text(path: Path, start: bytes) -> None:
    """Refuse JSON Lines in UTF-16 or -32: split at newline bytes, every line would be
    quarantined as not UTF-8, each for a reason that is not its own."""
    for mark, encoding in WIDE_BYTE_ORDER_MARKS.items():
        if start.startswith(mark):
            raise DatasetError(
                f"dataset {path} is {encoding} text (its byte order mark says so): JSON Lines "
                f"are read as UTF-8; convert it (iconv -f {encoding} -t UTF-8), or give the "
                'records as a JSON list (format = "json" reads any Unicode encoding)'
            )


def _json_limit(exc: ValueError | RecursionError) -> str:
    """What JSON within the syntax but past the reader's limits holds."""
    if isinstance(exc, RecursionError):
        return "arrays or objects nested too deep to read"
    if "integer string conversion" in str(exc):
        return f"an integer too long to read (over {sys.get_int_max_str_digits()} digits)"
    return str(exc)


IDENTITY_COLUMNS = ("data_id", "dimensions", "dimension")


def read_parquet(
    path: Path,
    *,
    identity_only: bool = False,
    format_set: bool = False,
    note: Callable[[str], None] | None = None,
) -> Iterator[Mapping[str, Any]]:
    """The records of a parquet file or of a folder of parquet files.

    ``format_set`` says the config set ``[dataset] format = "parquet"`` (rather than ``auto``
    choosing parquet for a name it did not know): an unreadable file's hint names the setting
    that chose the reader. ``note`` is told, in a sentence, of the parquet files of a folder
    left out for lying in a trig-stream run directory inside it.
    """
    import polars as pl

    if path.is_dir():
        try:
            shards = _parquet_shards(path)
        except OSError as exc:
            raise DatasetError(f"cannot list dataset folder {path}: {exc}") from None
        files = shards.files
        if shards.left_out and note is not None:
            note(_left_out_note(path, shards))
        if not files:
            raise DatasetError(f"dataset folder {path} holds no .parquet files{_besides(shards)}")
    else:
        files = [path]
    _refuse_undecodable(files)
    rows_read = 0
    try:
        # glob=False: the names are files to read, not patterns ("p[1].parquet" read p1).
        whole = scan = pl.scan_parquet(files, glob=False)
        schema = scan.collect_schema()
        if identity_only:  # never touch the image column: it is most of the bytes
            scan = scan.select([c for c in IDENTITY_COLUMNS if c in schema])
        rows = (
            PARQUET_BATCH_ROWS_WITH_IMAGES
            if "image" in scan.collect_schema()
            else PARQUET_BATCH_ROWS_TEXT
        )
        batches = scan.collect_batches(chunk_size=rows, lazy=True)
        for batch in batches:
            rows_read += batch.height
            yield from batch.iter_rows(named=True)
        # Polars hooks SIGINT itself (from its import on), and a read it interrupts ends its
        # batches as if the files ended: the rows the footers hold tell a read cut short from
        # a whole one (a read of the footers alone: ~0.06 ms a shard).
        rows_held = whole.select(pl.len()).collect().item()
    except KeyboardInterrupt:
        if threading.current_thread() is threading.main_thread():
            raise  # Python's own Ctrl-C: it ends the command as one
        # In a worker thread only polars raises it: a query it interrupted on a SIGINT.
        raise _interrupted(path, rows_read, None) from None
    except (pl.exceptions.PolarsError, OSError) as exc:
        hint = ""
        if path.is_file() and path.suffix.lower() != ".parquet" and format_set:
            hint = (
                ' (read as parquet, since [dataset] format = "parquet" is set; '
                'set format = "json" or "jsonl" if it is JSON)'
            )
        elif path.is_file() and path.suffix.lower() != ".parquet":
            hint = (
                " (read as parquet, since its name ends in none of .json, .jsonl and .ndjson; "
                "set [dataset] format if it is JSON)"
            )
        elif len(files) > 1 and (damaged := _unreadable_footer(files)) is not None:
            hint = f" (in {damaged}: its footer cannot be read; it is damaged or cut short)"
        elif len(files) > 1 and (misfit := _misfit_shard(files)) is not None:
            # Polars names the file in its own terms, after a hint about its scan options
            # that a config cannot follow.
            raise DatasetError(f"cannot read parquet dataset {path}: {misfit}") from None
        raise DatasetError(f"cannot read parquet dataset {path}: {exc}{hint}") from None
    if rows_read < rows_held:
        raise _interrupted(path, rows_read, rows_held)


def _interrupted(path: Path, rows_read: int, rows_held: int | None) -> DatasetInterrupted:
    held = "" if rows_held is None else f" of the {rows_held} its files hold"
    return DatasetInterrupted(
        f"the reading of parquet dataset {path} ended after {rows_read} records{held}: a "
        "SIGINT (Ctrl-C) interrupted it (polars ends its reading on one), or the files "
        "changed while they were read; read it again (a stopped run resumes where it stopped)"
    )


def refuse_undecodable_shards(path: Path, fmt: str) -> None:
    """Refuse, before a run directory is made, a parquet dataset folder holding a shard
    whose name is not UTF-8 (see :func:`read_parquet`); a folder that cannot be walked is
    left for the read to report.

    Raises:
        DatasetError: a shard's name (or a folder's below ``path``) is not UTF-8.
    """
    if fmt not in ("auto", "parquet"):
        return
    try:  # a path that cannot be looked up (a name too long, a link loop): the read says so
        if not path.is_dir():
            return
        shards = _parquet_shards(path)
    except OSError:
        return
    _refuse_undecodable(shards.files)


def _refuse_undecodable(files: list[Path]) -> None:
    """Refuse a shard whose name is not UTF-8: polars takes paths as text only, and failed
    on one with a traceback ("Object does not have a .read() method")."""
    for file in files:
        try:
            os.fsencode(file).decode("utf-8")
        except UnicodeDecodeError:
            shown = os.fsencode(file).decode("utf-8", "backslashreplace")
            raise DatasetError(
                f"cannot read parquet dataset file {shown}: its name (or a folder's above "
                "it) is not UTF-8, and polars reads UTF-8 names only; rename it "
                "(convmv -f latin1 -t utf-8, or mv) or move it out of the dataset folder"
            ) from None


def _footer_schema(file: Path) -> dict[str, Any]:
    """A parquet file's schema from its footer. Not pl.read_parquet_schema: that reads its
    argument as a glob pattern (the footer of p1.parquet for p[1].parquet)."""
    import polars as pl

    return dict(pl.scan_parquet(file, glob=False).collect_schema())


def _is_run_dir(folder: Path) -> bool:
    """Whether ``folder`` is a trig-stream run directory: its manifest or its journal is one
    trig-stream wrote. Another tool's ``manifest.json`` or ``journal.jsonl`` (a dataset's own
    index) does not make it one; nor does an empty manifest alone, which protects nothing."""
    if holds_our_journal(folder):  # its first bytes only
        return True
    try:
        with open_regular_file(folder / MANIFEST) as handle:
            # Its first bytes only: a dataset's own index of that name (100 MiB of JSON) was
            # read and parsed whole on every walk of the folder.
            head = handle.read(MANIFEST_HEAD_BYTES)
    except OSError:
        return False
    return manifest_head_is_ours(head)


@dataclass(frozen=True, slots=True)
class ParquetShards:
    """The parquet files of a dataset folder, and what its walk left out."""

    files: list[Path]
    """The shards, sorted."""
    left_out: int = 0
    """Parquet files left out for lying in a run directory (its reports)."""
    run_dirs: tuple[Path, ...] = ()
    """The run directories below the folder that hold those files."""
    own_left_out: int = 0
    """Of ``left_out``, those a report wrote into the folder itself, when the folder is a
    run directory (:func:`_own_report_files`)."""


def _parquet_shards(folder: Path) -> ParquetShards:
    """The ``.parquet`` files below ``folder``, sorted, through linked folders too (Path.rglob
    skipped those silently on Python 3.11, while it read a linked shard file); a folder met
    again through a link (a loop, or two links to one folder) is walked once.

    A trig-stream run directory below ``folder`` (one holding a manifest or a journal that
    trig-stream wrote: :func:`_is_run_dir`) is not walked: its reports are parquet files
    too, and a run writing into the folder of its own dataset would read them as shards on
    its next start. Their number is counted. When ``folder`` itself is a run directory (a
    run whose ``output_dir``/``name`` is its dataset folder), only the files its report
    wrote there are left out (:func:`_own_report_files`): the dataset's own shards may lie
    anywhere in it, under ``report/`` or ``images/`` too.

    Raises:
        OSError: a folder below cannot be listed.
    """

    def refuse(exc: OSError) -> None:
        raise exc

    files: list[Path] = []
    left_out = 0
    run_dirs: list[Path] = []
    seen = {os.path.realpath(folder)}
    own_left_out = 0
    own: set[Path] = set()
    root_is_run_dir = _is_run_dir(folder)
    for top, folders, names in os.walk(folder, onerror=refuse, followlinks=True):
        if top == str(folder) and root_is_run_dir:
            # Only what the run writes is left out: the dataset's shards lie beside it.
            own = _own_report_files(folder)
            own_left_out = len(own)
            left_out += own_left_out
        elif top != str(folder) and _is_run_dir(Path(top)):
            folders[:] = []
            found = _count_parquet(Path(top))
            if found:
                left_out += found
                run_dirs.append(Path(top))
            continue
        kept = []
        for name in sorted(folders):
            real = os.path.realpath(Path(top, name))
            if real not in seen:
                seen.add(real)
                kept.append(name)
        folders[:] = kept
        # Regular files only: a pipe named like a shard would be waited on forever.
        files.extend(
            Path(top, name)
            for name in names
            if name.endswith(".parquet")
            and Path(top, name).is_file()
            and (not own or Path(top, name) not in own)
        )
    return ParquetShards(sorted(files), left_out, tuple(sorted(run_dirs)), own_left_out)


def _own_report_files(run_dir: Path) -> set[Path]:
    """The files a report wrote in ``run_dir`` (``report/<model>/judgements.parquet``): the
    only parquet files a run writes into its run directory. Any other parquet file there,
    under ``report/`` or ``images/`` too, is the dataset's when the run directory is its
    dataset folder (a run writes its manifest and journal before it reads the dataset, so
    the folder is a run directory from its first run on)."""
    try:
        models = list(os.scandir(run_dir / REPORT_FOLDER))
    except OSError:  # none, or not listable: the walk says so, if it must
        return set()
    return {
        Path(run_dir, REPORT_FOLDER, model.name, JUDGEMENTS_FILE)
        for model in models
        if model.is_dir() and Path(model.path, JUDGEMENTS_FILE).is_file()
    }


def _count_parquet(run_dir: Path) -> int:
    """The ``.parquet`` files below a run directory (its reports), for the note alone: an
    error listing them counts what could be listed."""
    count = 0
    for _, _, names in os.walk(run_dir):
        count += sum(1 for name in names if name.endswith(".parquet"))
    return count


def _left_out_note(folder: Path, shards: ParquetShards) -> str:
    notes = []
    if shards.own_left_out:
        # The folder itself: a list of the run directories below would show it as ".".
        notes.append(
            f"dataset folder {folder} is itself a trig-stream run directory: left out "
            f"{shards.own_left_out} parquet file(s) its report wrote "
            f"({REPORT_FOLDER}/<model>/{JUDGEMENTS_FILE}): a run's reports are no dataset "
            "records"
        )
    dirs = shards.run_dirs
    if dirs:
        shown = ", ".join(str(d.relative_to(folder)) for d in dirs[:3])
        more = f" and {len(dirs) - 3} more" if len(dirs) > 3 else ""
        notes.append(
            f"dataset folder {folder}: left out {shards.left_out - shards.own_left_out} "
            f"parquet file(s) in {len(dirs)} trig-stream run "
            f"director{'y' if len(dirs) == 1 else 'ies'} inside it "
            f"({shown}{more}): a run's reports are no dataset records"
        )
    return "; ".join(notes)


def _besides(shards: ParquetShards) -> str:
    if not shards.left_out:
        return ""
    return f" outside trig-stream run directories ({shards.left_out} inside them left out)"


def _misfit_shard(files: list[Path]) -> str | None:
    """Which of a folder's parquet files does not have the columns of the first one (and
    how), when their footers tell: a folder is read as the shards of one dataset."""
    import polars as pl

    try:
        first = _footer_schema(files[0])
    except (pl.exceptions.PolarsError, OSError):
        return None
    for file in files[1:]:
        try:
            schema = _footer_schema(file)
        except (pl.exceptions.PolarsError, OSError):
            return None
        extra = [name for name in schema if name not in first]
        missing = [name for name in first if name not in schema]
        retyped = [
            f"{name} is {schema[name]} there, {first[name]} in the first"
            for name in schema
            if name in first and schema[name] != first[name]
        ]
        if not (extra or missing or retyped):
            continue
        how = "; ".join(
            part
            for part in (
                f"it has column(s) {', '.join(extra)} that the first lacks" if extra else "",
                f"it lacks column(s) {', '.join(missing)}" if missing else "",
                *retyped,
            )
            if part
        )
        return (
            f"its parquet files are read as the shards of one dataset, and {file} does not "
            f"fit the first one, {files[0]} ({how}); move the file that is no shard of the "
            "dataset out of the folder, or point [dataset] path at one file"
        )
    return None


def _unreadable_footer(files: list[Path]) -> Path | None:
    """The first of a folder's parquet files whose footer (its schema) cannot be read: which
    shard a folder's error is about, when a read of the footers can tell (damage inside a
    file's data would take reading it all)."""
    import polars as pl

    for file in files:
        try:
            _footer_schema(file)
        except (pl.exceptions.PolarsError, OSError):
            return file
    return None
