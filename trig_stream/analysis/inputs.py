"""Where analyses get their judgements: a run directory, or upstream TRIG files.

Upstream files are turned into :class:`~trig_stream.records.Judgement` records, so one code
path analyses and exports everything. Two layouts are read (spec, section 6):

* an evaluation result, ``{data_id: {dimension: [{metric: score}, ...]}}``; each image's pair
  comes from a prompt file when one is given, else from its ``data_id``;
* a "formatted" relation input, ``{pair: {data_id: [score_A, score_B]}}``.

A ``null`` score becomes an ``unscorable`` judgement: no score is ever made up.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import polars as pl
from pydantic import ValidationError

from trig_stream.analysis.exports import ParquetRows
from trig_stream.analysis.relations import AnalysisError
from trig_stream.config import RelationSection
from trig_stream.dimensions import Dimension, Task, pair_from_data_id, pair_name, split_pair
from trig_stream.errors import DatasetError, RunDirError, validation_problems
from trig_stream.files import read_settings_file, undecodable_byte
from trig_stream.journal import JOURNAL, JournalEntry, journal_entry, read_journal_lines
from trig_stream.manifest import MANIFEST, Manifest, read_manifest
from trig_stream.records import JudgeFingerprint, Judgement, is_finite_number, storable_text

__all__ = [
    "AnalysisError",
    "PromptPairs",
    "RunData",
    "UpstreamData",
    "load_run",
    "read_prompt_pairs",
    "read_upstream",
    "with_overrides",
]


@dataclass(frozen=True, slots=True)
class RunData:
    """A run directory's judgements with what its manifest says about them."""

    path: Path
    manifest: Manifest
    judgements: list[JournalEntry]
    """The latest judgement of each key, in the order the keys first appear in the journal:
    what the analyses read of it (a line replaced by a later one of its key, such as an
    error asked again with ``--retry-errors``, is not here)."""
    metrics: list[str]
    """Metric names: the config's judges in order, then any others found in the journal."""
    relation: RelationSection
    """The thresholds of the run's config, or TRIG's defaults."""
    models: list[str] = field(default_factory=list)
    """Model names: the config's generators in order, then any others found in the journal."""
    judges: dict[tuple[str, str], JudgeFingerprint] = field(default_factory=dict)
    """(model, metric) -> the judge fingerprint of the last line of that model and metric."""
    table: pl.DataFrame | None = None
    """The rows of ``judgements.parquet`` (see :func:`load_run`'s ``rows``), of the same
    judgements as :attr:`judgements`, in journal order."""


def load_run(run_dir: Path, *, rows: bool = True) -> RunData:
    """Read a run directory's manifest and its journal, once, keeping the latest line of each
    key.

    Args:
        run_dir: the run directory.
        rows: keep the rows of ``judgements.parquet`` too (:attr:`RunData.table`): a report
            writes them, a comparison needs only the scores.

    Raises:
        RunDirError: it is not a run directory.
    """
    manifest = read_manifest(run_dir)
    latest: dict[tuple[str, str, str, str], JournalEntry] = {}
    judges: dict[tuple[str, str], JudgeFingerprint] = {}
    table = ParquetRows() if rows else None
    for line, judgement in read_journal_lines(run_dir / JOURNAL):
        entry = journal_entry(line, judgement)
        latest[entry.key] = entry
        judges[entry.model, entry.metric] = judgement.judge
        if table is not None:
            table.add(judgement, line)
    judgements = list(latest.values())
    metrics = _names(manifest.config.get("judges"))
    models = _names(manifest.config.get("generators"))
    for entry in judgements:
        if entry.metric not in metrics:
            metrics.append(entry.metric)
        if entry.model not in models:
            models.append(entry.model)
    try:
        relation = RelationSection.model_validate(manifest.config.get("relation") or {})
    except ValidationError as exc:
        raise RunDirError(
            f"{run_dir}: the manifest's [relation] section is invalid: {_problems(exc)}"
        ) from None
    kept = table.frame(keep=(entry.line for entry in judgements)) if table is not None else None
    return RunData(run_dir, manifest, judgements, metrics, relation, models, judges, kept)


def _names(entries: object) -> list[str]:
    """The names of a manifest's config entries (judges, generators), in order; an entry of
    another shape (edited by hand) names nothing."""
    if not isinstance(entries, list):
        return []
    return [str(e["name"]) for e in entries if isinstance(e, dict) and "name" in e]


def with_overrides(base: RelationSection, overrides: Mapping[str, object]) -> RelationSection:
    """``base`` with the given thresholds replaced (None values are ignored), validated.

    Raises:
        AnalysisError: a value is out of range.
    """
    values = base.model_dump()
    values.update({key: value for key, value in overrides.items() if value is not None})
    try:
        return RelationSection.model_validate(values)
    except ValidationError as exc:
        raise AnalysisError(f"invalid thresholds: {_problems(exc)}") from None


def _problems(exc: ValidationError) -> str:
    return "; ".join(validation_problems(exc))


@dataclass(frozen=True, slots=True)
class PromptPairs:
    """The pairs a ``--prompts`` dataset gives, and the records it had without one."""

    pairs: dict[str, tuple[Dimension, Dimension]]
    """Each data_id's pair: the first record's, for a data_id repeated (as a run keeps)."""
    skipped: list[str]
    """Why each record a run would quarantine for its identity was skipped."""
    notes: tuple[str, ...] = ()
    """What the reading left out of the dataset (run directories inside its folder)."""


def read_prompt_pairs(path: Path) -> PromptPairs:
    """The pair of each ``data_id`` in a TRIG dataset, in any format a run reads: a legacy
    JSON file, JSON Lines (``.jsonl``, ``.ndjson``), a parquet file or a folder of them,
    read as a run reads it (``dimensions`` a list or a pair's name, else the data_id's).

    A record a run would quarantine for its identity (an unreadable line, a bad data_id or
    pair, a data_id repeated) is skipped and said in :attr:`PromptPairs.skipped`: the
    analysis stops only where the result file scores a data_id left without a pair.

    Raises:
        AnalysisError: the dataset cannot be read.
    """
    from trig_stream.config import DatasetSection
    from trig_stream.dataset import DatasetSource

    suffix = path.suffix.lower()
    if path.is_dir() or suffix == ".parquet":
        fmt: Literal["json", "jsonl", "parquet"] = "parquet"
    elif suffix in (".jsonl", ".ndjson"):
        fmt = "jsonl"
    else:
        fmt = "json"
    try:
        source = DatasetSource(DatasetSection(path=path, format=fmt), "t2i", source_images=False)
        pairs, skipped = source.pairs_by_data_id()
    except DatasetError as exc:
        raise AnalysisError(f"--prompts: {exc}") from None
    return PromptPairs(pairs, skipped, tuple(source.notes))


@dataclass(frozen=True, slots=True)
class UpstreamData:
    """Judgements rebuilt from an upstream file, with the metric names it holds in order."""

    judgements: list[Judgement]
    metrics: list[str]
    layout: str
    """``evaluation`` or ``formatted``."""
    skipped: list[str] = field(default_factory=list)
    """The metrics of an evaluation result not read, because another one was asked for."""
    prompts_skipped: tuple[str, ...] = ()
    """Why each record of ``--prompts`` without a usable pair was skipped."""
    prompts_notes: tuple[str, ...] = ()
    """What the reading of ``--prompts`` left out of it (:attr:`PromptPairs.notes`)."""
    pairs: tuple[str, ...] = ()
    """A formatted file's pairs in its order, those without an image (``{}``) included: its
    judgements alone do not name them (see
    :func:`~trig_stream.analysis.relations.analyse_judgements`)."""


def read_upstream(
    path: Path,
    *,
    model: str,
    prompts: Path | None = None,
    metric: str = "trigscore",
    task: Task = "t2i",
    only: str | None = None,
) -> UpstreamData:
    """Read a TRIG evaluation result or formatted JSON file as judgements of ``model``.

    Args:
        path: the file.
        model: the model name the judgements get.
        prompts: a prompt file giving each data_id's pair (evaluation results only).
        metric: the metric name of a formatted file's scores (it names none).
        task: the TRIG task the judgements get.
        only: the one metric of an evaluation result to read; the others' scores are neither
            checked nor kept (upstream holds one cell per metric, some on other scales than
            [0, 1]), their names listed in :attr:`UpstreamData.skipped`. None reads all.

    Raises:
        AnalysisError: the file cannot be read, its layout is neither, or a value is invalid.
    """
    run_dir = path if path.is_dir() else path.parent
    if (run_dir / MANIFEST).is_file() and (path.is_dir() or path.suffix == ".jsonl"):
        raise AnalysisError(
            f"{path} is a trig-stream run's; `analyze` reads upstream TRIG JSON files: run "
            f"`trig-stream report {run_dir}` instead"
        )
    document = _read_json(path)
    if not isinstance(document, dict) or not document:
        raise AnalysisError(f"{path}: expected a non-empty JSON object")
    # A file name of bytes that are not UTF-8 is stored escaped, as the model named after it.
    judge = JudgeFingerprint(backend="upstream-file", model=storable_text(path.name))
    # The first value of the first non-empty entry: a formatted file's first pair may have
    # no image scored on both its dimensions (``{}``).
    sample = next(
        (
            next(iter(value.values()))
            for value in document.values()
            if isinstance(value, dict) and value
        ),
        None,
    )
    try:
        if isinstance(sample, list) and (_is_pair(next(iter(document))) or _scores(sample)):
            return UpstreamData(
                _from_formatted(document, model, metric, task, judge),
                [metric],
                "formatted",
                pairs=tuple(document),
            )
        if isinstance(sample, list):
            given = read_prompt_pairs(prompts) if prompts else None
            judgements, metrics = _from_evaluation(document, model, given, task, judge, only)
            return UpstreamData(
                judgements,
                metrics,
                "evaluation",
                skipped=[m for m in metrics if only is not None and m != only],
                prompts_skipped=tuple(given.skipped) if given is not None else (),
                prompts_notes=given.notes if given is not None else (),
            )
    except ValidationError as exc:
        raise AnalysisError(f"{path}: invalid value: {exc.errors()[0]['msg']}") from None
    except (TypeError, ValueError, AttributeError, IndexError) as exc:
        raise AnalysisError(f"{path}: {exc}") from None
    if all(_is_pair(key) and value == {} for key, value in document.items()):
        # As a report writes it for a model without one image scored on both dimensions.
        raise AnalysisError(
            f"{path}: a formatted file ({{pair: {{data_id: [score_A, score_B]}}}}) with no "
            "scored image: every pair is empty, so there is nothing to analyse; a formatted "
            "file holds only the images scored on both dimensions of their pair, an evaluation "
            "result (a report's evaluation_result.json) every score"
        )
    raise AnalysisError(
        f"{path}: neither a TRIG evaluation result ({{data_id: {{dim: [{{metric: score}}]}}}})"
        " nor a formatted file ({pair: {data_id: [score_A, score_B]}})"
    )


MAX_UPSTREAM_BYTES: Final = 2**30
"""The largest upstream file read: one of 100,000 images is tens of megabytes."""


class _RepeatedKey(ValueError):
    """A JSON object names a key twice (raised while parsing, to be located afterwards)."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document = dict(pairs)
    if len(document) != len(pairs):
        raise _RepeatedKey
    return document


class _Repeated(dict[str, Any]):
    """A JSON object that names :attr:`key` twice (the last value kept)."""

    key: str


def _marking_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document = dict(pairs)
    if len(document) == len(pairs):
        return document
    marked = _Repeated(document)
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            marked.key = key
            break
        seen.add(key)
    return marked


def _repeated_at(value: Any, where: str = "") -> tuple[str, str] | None:
    """Where the first object that names a key twice is (``data_id > dimension[cell]``), and
    that key."""
    if isinstance(value, _Repeated):
        return where, value.key
    if isinstance(value, dict):
        steps = ((f"{where} > {key}" if where else key, child) for key, child in value.items())
    elif isinstance(value, list):
        steps = ((f"{where}[{index}]", child) for index, child in enumerate(value))
    else:
        return None
    for step, child in steps:
        found = _repeated_at(child, step)
        if found is not None:
            return found
    return None


def _read_json(path: Path) -> Any:
    """An upstream file's JSON document, every object's keys distinct.

    Raises:
        AnalysisError: it is no regular file (a pipe is not waited on, a device not read),
            is larger than :data:`MAX_UPSTREAM_BYTES`, is not JSON, nests too deep or names a
            key twice in one object (JSON readers keep the last value: a judgement lost).
    """
    try:
        raw = read_settings_file(path, MAX_UPSTREAM_BYTES)
    except OSError as exc:
        raise AnalysisError(
            f"{path}: cannot read it: {exc.strerror or exc}; name a TRIG JSON file"
        ) from None
    try:
        text = raw.decode("utf-8-sig")
        return json.loads(text, object_pairs_hook=_unique_keys)
    except _RepeatedKey:
        where, key = _repeated_at(json.loads(text, object_pairs_hook=_marking_keys)) or ("", "")
        place = f"under {where}" if where else "at the top level"
        raise AnalysisError(
            f"{path}: key {key!r} appears twice in one object ({place}): a JSON reader keeps "
            "the last value only, so a score would be silently dropped; remove one of them"
        ) from None
    except RecursionError:
        raise AnalysisError(
            f"{path}: cannot read JSON: arrays or objects nested too deep to read; a TRIG "
            "file nests three levels"
        ) from None
    except UnicodeDecodeError as exc:  # a parquet file, an image: no text at all
        raise _not_json(path, f"byte {undecodable_byte(raw, exc)} is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        if text[: exc.pos].strip():  # JSON to begin with: a file cut short, or mistyped
            raise AnalysisError(f"{path}: cannot read JSON: {exc}") from None
        raise _not_json(path, str(exc)) from None
    except ValueError as exc:  # an integer of 5,000 digits
        raise AnalysisError(f"{path}: cannot read JSON: {exc}") from None


def _not_json(path: Path, problem: str) -> AnalysisError:
    """The error for a file that is no JSON at all (a report's parquet or CSV file): what
    ``analyze`` reads, and what reports a run directory's results (the one ``path`` lies in,
    if it does)."""
    home = next((folder for folder in path.parents if (folder / MANIFEST).is_file()), None)
    report = (
        f"`trig-stream report {home}` reports the run it lies in"
        if home is not None
        else "a run directory's results are reported by `trig-stream report RUN_DIR`"
    )
    return AnalysisError(
        f"{path}: not JSON ({problem}); `analyze` reads TRIG result JSON files (an evaluation "
        f"result or a formatted file); {report}"
    )


def _scores(cells: list[Any]) -> bool:
    """Whether a list holds scores (a formatted file's) rather than ``{metric: score}`` cells."""
    return bool(cells) and not any(isinstance(cell, dict) for cell in cells)


def _is_pair(text: str) -> bool:
    try:
        split_pair(text)
    except ValueError:
        return False
    return True


def _judgement(
    model: str,
    data_id: str,
    task: Task,
    pair: str,
    dim: str,
    metric: str,
    score: object,
    judge: JudgeFingerprint,
) -> Judgement:
    if dim not in split_pair(pair):
        raise ValueError(f"{data_id}: dimension {dim!r} is not one of its pair {pair}")
    if score is None:
        value = None
    elif is_finite_number(score):
        value = float(score)
    else:
        raise ValueError(f"{data_id} {dim}: score {score!r} is not a finite number")
    if value is not None and not 0.0 <= value <= 1.0:
        raise ValueError(
            f"{data_id} {dim}: score {score!r} of metric {metric!r} is outside [0, 1], where "
            "TRIG scores lie (the DTM's zone thresholds assume it); --metric names the one "
            "metric to analyse, the others' scores are then not read"
        )
    return Judgement.model_validate(
        {
            "model": model,
            "data_id": data_id,
            "task": task,
            "pair": pair,
            "dimension": dim,
            "metric": metric,
            "judge": judge,
            "status": "ok" if value is not None else "unscorable",
            "score": value,
            "created_at": 0.0,
        }
    )


def _from_formatted(
    document: dict[str, Any], model: str, metric: str, task: Task, judge: JudgeFingerprint
) -> list[Judgement]:
    out = []
    pair_of: dict[str, str] = {}
    for pair, images in document.items():
        first, second = split_pair(pair)
        if not isinstance(images, dict):
            raise ValueError(f"pair {pair}: expected {{data_id: [score_A, score_B]}}")
        for data_id, scores in images.items():
            _refuse_half_characters("data_id", data_id)
            if pair_of.setdefault(data_id, pair) != pair:
                # One image under both orders of a pair would count twice, with two scores.
                raise ValueError(
                    f"data_id {data_id} is under two pairs, {pair_of[data_id]} and {pair}: "
                    "an image belongs to one pair; keep it under one of them"
                )
            if not isinstance(scores, list) or len(scores) != 2:
                raise ValueError(f"{pair} {data_id}: expected two scores, got {scores!r}")
            for dim, score in zip((first, second), scores, strict=True):
                out.append(_judgement(model, data_id, task, pair, dim, metric, score, judge))
    return out


def _refuse_half_characters(what: str, text: str) -> None:
    """Refuse a key of the file holding half a character: JSON's ``\\ud800`` escape reads as a
    lone surrogate, which no output can hold (a run refuses a record holding one).

    Raises:
        ValueError: it holds one; the message names ``what`` and the text, escaped.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"{what} {text!r} is not valid Unicode: a lone surrogate {text[exc.start]!r} at "
            f"character {exc.start} (half a character, which no output can hold)"
        ) from None


def _merge_order(order: list[str], names: list[str]) -> None:
    """Add to ``order`` the names it lacks, each before the first name that follows it in
    ``names`` (one cell list, in config order): a cell missing the first metric (its
    judgement failed) does not make the second one first."""
    for index, name in enumerate(names):
        if name in order:
            continue
        after = next((n for n in names[index + 1 :] if n in order), None)
        order.insert(order.index(after) if after is not None else len(order), name)


def _from_evaluation(
    document: dict[str, Any],
    model: str,
    given: PromptPairs | None,
    task: Task,
    judge: JudgeFingerprint,
    only: str | None = None,
) -> tuple[list[Judgement], list[str]]:
    out: list[Judgement] = []
    metrics: list[str] = []
    pairs = given.pairs if given is not None else None
    for data_id, dims in document.items():
        if given is not None and pairs is not None and data_id not in pairs:
            why = f"data_id {data_id} is not in the prompt file"
            if given.skipped:
                why += (
                    f" with a usable pair ({len(given.skipped)} of its records were skipped, "
                    f"the first: {given.skipped[0]})"
                )
            raise ValueError(why)
        pair = pair_name(*(pairs[data_id] if pairs is not None else _pair_of(data_id)))
        if not isinstance(dims, dict):
            raise ValueError(f"{data_id}: expected {{dimension: [{{metric: score}}, ...]}}")
        for dim, cells in dims.items():
            if not isinstance(cells, list):
                raise ValueError(
                    f"{data_id} {dim}: expected [{{metric: score}}, ...], got {cells!r}"
                )
            _merge_order(metrics, [m for c in cells if isinstance(c, dict) for m in c])
            seen: set[str] = set()
            for cell in cells:
                if not isinstance(cell, dict):
                    raise ValueError(f"{data_id} {dim}: expected {{metric: score}}, got {cell!r}")
                for metric, score in cell.items():
                    _refuse_half_characters(f"{data_id} {dim}: metric", metric)
                    if metric in seen:
                        raise ValueError(f"{data_id} {dim}: metric {metric!r} scored twice")
                    seen.add(metric)
                    if only is not None and metric != only:
                        continue
                    out.append(_judgement(model, data_id, task, pair, dim, metric, score, judge))
    return out, metrics


def _pair_of(data_id: str) -> tuple[Dimension, Dimension]:
    """The pair a data_id gives (``<D1>_<D2>_<n>``), read without ``--prompts``.

    Raises:
        ValueError: it gives none; the message says that ``--prompts`` gives the pairs.
    """
    try:
        return pair_from_data_id(data_id)
    except ValueError as exc:
        raise ValueError(f"{exc}; --prompts with its dataset gives each data_id's pair") from None
