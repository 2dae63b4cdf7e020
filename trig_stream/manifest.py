"""The manifest of a run directory: what made its results, compared on every resume.

``manifest.json`` holds the task, each generator's and judge's fingerprint, the config the
latest run used, and whether it asks ``error`` judgements again. Here: the
:class:`Manifest` model, the comparison that tells a change of settings
(:meth:`Manifest.differences`) and the merge a resume writes (:meth:`Manifest.merged`),
fingerprints as JSON holds them (:func:`as_json`), which ``error`` judgements the latest run
asks again (:func:`errors_asked_again`), and reading the file back
(:func:`read_manifest`). The checks a resume makes with it, which also look at the run
directory's journal and images, live in :mod:`trig_stream.resume_checks`.
"""

from __future__ import annotations

import codecs
import json
import math
import os
import re
import stat
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path, PurePath
from typing import Annotated, Any, BinaryIO, Final, Literal, Self, TypeAlias, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from trig_stream.errors import FatalBackendError, FingerprintMismatch, RunDirError
from trig_stream.files import MAX_SETTINGS_BYTES, file_kind, open_regular_file
from trig_stream.hashing import seeds_for
from trig_stream.journal import JournalState, holds_our_journal
from trig_stream.moves import Move
from trig_stream.records import CASE_CLASH, JudgeFingerprint, JudgementKey
from trig_stream.scoring import SCORING_RULES_CHANGES, SCORING_RULES_KEY, scored_alike

MANIFEST = "manifest.json"
MANIFEST_VERSION: Final = 2
"""The format of the manifests this trig-stream writes; it reads each format up to it. Kept
apart from the format of journal and quarantine lines
(:data:`~trig_stream.records.SCHEMA_VERSION`), which older trig-streams still read.
2: ``retry_errors``, ``journal_lines`` and a judge's ``params.scoring_rules``, which a
trig-stream of format 1 may refuse as damage or as other settings, where it should name a
later version's. A format-1 manifest is read as ever, and a resume writes it again in this
format."""
MAX_MANIFEST_BYTES: Final = MAX_SETTINGS_BYTES
"""The largest ``manifest.json`` read whole. A run writes a few kilobytes; a larger file of
that name is another program's (a dataset's index), and reading it whole cost seconds and
hundreds of megabytes."""
MANIFEST_HEAD_BYTES: Final = 4096
"""How much of a ``manifest.json`` tells at once that trig-stream wrote it
(:func:`manifest_head_is_ours`)."""
_OUR_HEAD = re.compile(rb'\A\s*\{\s*"schema_version"\s*:')
IMAGES = "images"
"""A run directory's folder of generated images."""

EntryKind: TypeAlias = Literal["generators", "judges"]
"""The manifest's two tables of entries, each a name -> fingerprint."""


class Manifest(BaseModel):
    """What produced a run directory's results; compared on every resume."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = MANIFEST_VERSION
    run_name: str
    task: str
    generators: dict[str, dict[str, Any]] = Field(default_factory=dict)
    judges: dict[str, dict[str, Any]] = Field(default_factory=dict)
    config: dict[str, Any] = Field(default_factory=dict)
    """The config the latest run used (for ``status``, ``report`` and ``watch``)."""
    retry_errors: bool | None = None
    """Whether the latest run asks again the judgements whose status is ``error``
    (``--retry-errors``): while it runs, ``status`` and ``watch`` count those it found as work
    left (:func:`errors_asked_again`). None: not recorded (an older trig-stream wrote it)."""
    journal_lines: Annotated[int, Field(ge=0)] = 0
    """Lines the journal held when the latest run started, the ``error`` judgements it asks
    again among them."""
    created_at: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)
    _generator_defaults: dict[str, dict[str, Any]] = PrivateAttr(default_factory=dict)
    """Per generator, what a field its fingerprint leaves out stands for
    (:meth:`~trig_stream.backends.base.Generator.fingerprint_defaults`): known to a config's
    manifest, never written."""

    def set_generator_defaults(self, defaults: Mapping[str, dict[str, Any]]) -> None:
        """Say what a field each generator's fingerprint leaves out stands for (by name), for
        :meth:`differences` made with this manifest as the config's."""
        self._generator_defaults = dict(defaults)

    @field_validator("generators")
    @classmethod
    def _dtypes_used(cls, generators: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        # A diffusers generator's fingerprint held one dtype per device, so adding a device
        # was refused as a change; it now holds the dtypes used, which an older run
        # directory's list is read as.
        return {
            name: {**fingerprint, "dtype": sorted(set(fingerprint["dtype"]))}
            if fingerprint.get("backend") == "diffusers"
            and isinstance(fingerprint.get("dtype"), list)
            and all(isinstance(dtype, str) for dtype in fingerprint["dtype"])
            else fingerprint
            for name, fingerprint in generators.items()
        }

    @model_validator(mode="after")
    def _judge_dtypes_placed(self) -> Self:
        # A transformers judge's fingerprint held its dtype option as given, so "auto" read
        # the same on the CPU (float32) and on a GPU (bfloat16): a run resumed on the other
        # mixed the two. It now holds the dtype on its device (transformers_judge.dtype_on);
        # an older run directory's "auto" is read with the device its config names.
        from trig_stream.backends.judges.transformers_judge import dtype_on

        entries = self.config.get("judges")
        devices = {
            entry["name"]: (entry.get("options") or {}).get("device", "cpu")
            for entry in (entries if isinstance(entries, list) else [])
            if isinstance(entry, dict)
            and isinstance(entry.get("name"), str)
            and isinstance(entry.get("options") or {}, dict)
        }
        for name, fingerprint in self.judges.items():
            params = fingerprint.get("params")
            device = devices.get(name)
            if (
                fingerprint.get("backend") == "transformers"
                and isinstance(params, dict)
                and params.get("dtype") == "auto"
                and isinstance(device, str)
            ):
                fingerprint["params"] = {**params, "dtype": dtype_on("auto", device)}
        return self

    def differences(
        self,
        other: Manifest,
        holds: Callable[[EntryKind, str], bool] | None = None,
        moved: Move | None = None,
    ) -> list[str]:
        """What in ``other`` would change results already stored under ``self``.

        Args:
            other: the manifest of the config.
            holds: whether an entry (``"generators"`` or ``"judges"``, its name) made
                results here; an entry that made none may change. None: all did.
            moved: how the run directory moved since ``self`` was written: a path of
                ``self`` is also the same as its new place after that move.
        """
        found = []
        same = None if moved is None else moved.same
        if self.task != other.task:
            found.append(f"task: {self.task} in the run dir, {other.task} in the config")
        # Every configured name, not only a new one: back to an old name is a rename too,
        # while the stored manifest also holds the name it was renamed to, with results.
        held = [name for name in self.generators if holds is None or holds("generators", name)]
        for name in sorted(other.generators):
            for stored_name in sorted(held):
                if stored_name != name and stored_name.casefold() == name.casefold():
                    found.append(
                        f"generator {name!r}: differs from {stored_name!r}, a model with results "
                        f"in the run dir, only in case; {CASE_CLASH}"
                    )
        for kind in get_args(EntryKind):
            mine: dict[str, Any] = getattr(self, kind)
            theirs: dict[str, Any] = getattr(other, kind)
            for name in sorted(mine.keys() & theirs.keys()):
                if holds is not None and not holds(kind, name):
                    continue
                stored_entry, config_entry = mine[name], theirs[name]
                defaults: Any = _ABSENT
                if kind == "judges":
                    config_entry = _empty_texts_unset(config_entry)
                    stored_entry = _auto_dtype_as_configured(
                        _empty_texts_unset(stored_entry), config_entry
                    )
                else:
                    defaults = other._generator_defaults.get(name, _ABSENT)
                changed = _changed_fields(stored_entry, config_entry, same, defaults=defaults)
                for key, stored, configured in changed:
                    if kind == "judges" and key == f"params.{SCORING_RULES_KEY}":
                        if _rules_that_score_alike(stored_entry, config_entry):
                            continue
                        same_backend = stored_entry.get("backend") == config_entry.get("backend")
                        if said := _other_scoring_rules(name, stored, configured, same_backend):
                            found.append(said)
                            continue
                    found.append(
                        f"{kind[:-1]} {name!r}: {key} {stored} in the run dir, {configured} in "
                        "the config"
                    )
        return found

    def journal_differences(
        self,
        models: Collection[str],
        judges: Mapping[str, Sequence[JudgeFingerprint]],
        seeds: Mapping[str, Mapping[str, int]] | None = None,
        seed_conflicts: Sequence[tuple[int, str, str, int]] = (),
    ) -> list[str]:
        """What the journal's results hold that this manifest, the run directory's own, does
        not describe: lines of another judge (a journal copied in from another run), of
        images made with another seed (lines of a run with another ``[run] seed``), or an
        entry missing (the manifest edited), which a resume would mix with its own.

        Args:
            models: the models with a judgement in the journal that judged something.
            judges: metric -> each fingerprint its lines that judged something carry.
            seeds: model -> data_id -> the seed its first line that judged something
                records (:attr:`~trig_stream.journal.JournalState.seeds`).
            seed_conflicts: (line, model, data_id, seed) of the later lines whose seed
                differs from it (:attr:`~trig_stream.journal.JournalState.seed_conflicts`).
        """
        found = [
            f"model {name!r}: has results in the journal but no entry in {MANIFEST}"
            for name in sorted(set(models) - self.generators.keys())
        ]
        found += self._seed_differences(seeds or {}, seed_conflicts)
        for name in sorted(judges):
            entry = self.judges.get(name)
            if entry is None:
                found.append(
                    f"judge {name!r}: has results in the journal but no entry in {MANIFEST}"
                )
                continue
            for fingerprint in judges[name]:
                # As a resume compares a stored entry with the config's (an older line's
                # "auto" dtype), and with a path kept under its name, as a moved project's
                # manifest entry moved on while the lines stayed.
                compared_entry = _empty_texts_unset(entry)
                line = _empty_texts_unset(fingerprint.model_dump(mode="json"))
                line = _auto_dtype_as_configured(line, compared_entry)
                line = _scoring_rules_as_entry(line, compared_entry)
                if _rules_that_score_alike(line, compared_entry):  # lines judged before a resume
                    rules = compared_entry["params"][SCORING_RULES_KEY]
                    line = {**line, "params": {**line["params"], SCORING_RULES_KEY: rules}}
                for key, stored, written in _changed_fields(line, compared_entry, _same_name_paths):
                    found.append(
                        f"judge {name!r}: {key} {stored} in the journal, {written} in {MANIFEST}"
                    )
        return found

    def _seed_differences(
        self,
        seeds: Mapping[str, Mapping[str, int]],
        conflicts: Sequence[tuple[int, str, str, int]],
        shown: int = 5,
    ) -> list[str]:
        # One hash per image, its common start hashed once per model.
        wrong: list[tuple[str, str, int, int, int | None]] = []
        counted = 0
        for model, by_sample in seeds.items():
            base = self.generators.get(model, {}).get("seed")
            if not isinstance(base, int):
                continue  # no entry (said above), or one older than seeds
            seed_for = seeds_for(base, model)
            for data_id, seed in by_sample.items():
                if seed != (expected := seed_for(data_id)):
                    counted += 1
                    if len(wrong) < shown:
                        wrong.append((model, data_id, seed, expected, None))
            for line, line_model, data_id, seed in conflicts:
                if line_model == model and seed != (expected := seed_for(data_id)):
                    counted += 1
                    if len(wrong) < shown:
                        wrong.append((model, data_id, seed, expected, line))
        found = [
            f"model {model!r}, data_id {data_id!r}: "
            + ("the journal records " if line is None else f"line {line} of the journal records ")
            + f"seed {seed}, where [run] seed {self.generators[model]['seed']} in {MANIFEST} "
            f"gives {expected} (a line of a run with another seed)"
            for model, data_id, seed, expected, line in wrong
        ]
        if counted > len(wrong):
            found.append(f"... and {counted - len(wrong)} more judged image(s) of another seed")
        return found

    def merged(self, other: Manifest, moved: Move | None = None) -> Manifest:
        """This manifest with the models and judges ``other`` adds, and what ``other`` says of
        the latest run: its name, its config, whether it retries errors, where its journal
        started; in this trig-stream's format (:data:`MANIFEST_VERSION`), whose fields it
        holds now.
        An entry of ``other`` replaces this one's; one ``other`` lacks keeps its settings,
        with the paths that moved with the run directory at their new place (``moved``:
        :meth:`Move.apply`)."""

        def kept(mine: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
            if moved is None:
                return mine
            return {n: e if n in theirs else moved.apply(e) for n, e in mine.items()}

        return self.model_copy(
            update={
                "generators": {**kept(self.generators, other.generators), **other.generators},
                "judges": {**kept(self.judges, other.judges), **other.judges},
                "schema_version": MANIFEST_VERSION,
                "run_name": other.run_name,  # --new-run's directory, resumed under its name
                "config": other.config,
                "retry_errors": other.retry_errors,
                "journal_lines": other.journal_lines,
                "updated_at": time.time(),
            }
        )


def _other_scoring_rules(name: str, stored: str, configured: str, same_backend: bool) -> str | None:
    """The difference of a judge's scoring rules, in words (``stored`` and ``configured`` as
    :func:`_changed_fields` gives them: JSON text). None when the rules do not explain it: a
    judge of another backend under the same name, a side that is no rules number (a
    third-party judge's own value, an edited manifest), or rules this judge no longer sets;
    the caller then names the field as it names any other."""
    if not same_backend or not _is_rules(configured):
        return None
    if stored == "not set":
        return (
            f"judge {name!r}: judged under an earlier trig-stream's scoring rules (before "
            f"{configured}), and this one scores by rules {configured}"
        )
    if not _is_rules(stored):
        return None
    when = "later" if int(stored) > int(configured) else "earlier"
    low, high = sorted((int(stored), int(configured)))
    changes = "".join(
        f"; rules {rules}: {change}"
        for rules, change in SCORING_RULES_CHANGES.items()
        if low < rules <= high
    )
    return (
        f"judge {name!r}: judged under trig-stream's {when} scoring rules ({stored}), and this "
        f"one scores by rules {configured}: its scores would not compare with those stored"
        f"{changes}"
    )


def _rules_that_score_alike(stored: dict[str, Any], configured: dict[str, Any]) -> bool:
    """Whether two fingerprints of a judge hold scoring rules that differ but score its
    answers alike (:func:`~trig_stream.scoring.scored_alike`): rules 2 changed the robust
    scorer alone, so a judge scored by ``trig`` resumes across it. Their other fields are
    compared as ever."""
    mine, theirs = ((e.get("params") or {}).get(SCORING_RULES_KEY) for e in (stored, configured))
    scorer = stored.get("scorer")
    if type(mine) is not int or type(theirs) is not int or mine == theirs:
        return False  # no rules number (an edited manifest, a bool), or no difference
    return (
        stored.get("backend") == configured.get("backend")
        and isinstance(scorer, str)
        and scorer == configured.get("scorer")
        and scored_alike(scorer, mine, theirs)
    )


def _is_rules(written: str) -> bool:
    """Whether ``written``, a value in JSON, is a scoring rules number: an int."""
    return re.fullmatch(r"-?[0-9]+", written) is not None


def _scoring_rules_as_entry(line: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
    """A journal line's fingerprint written before fingerprints held their scoring rules,
    read with its manifest entry's: :func:`checked_scoring_rules` found the line scored as
    those rules score it before it wrote them into the entry."""
    params, rules = line.get("params"), (entry.get("params") or {}).get(SCORING_RULES_KEY)
    if not isinstance(params, dict) or SCORING_RULES_KEY in params or rules is None:
        return line
    return {**line, "params": {**params, SCORING_RULES_KEY: rules}}


def checked_scoring_rules(
    stored: Manifest, configured: Manifest, journal: JournalState, run_dir: Path
) -> Manifest:
    """``stored``, the manifest of ``run_dir``, with the scoring rules of ``configured``'s
    judges written into the entries of the same backend that were written before
    fingerprints held them, once every ``ok`` and ``unscorable`` judgement of those judges in
    its journal (``journal``: what the resume's one pass over it found) scores now as it was
    stored: a resume then adds scores that compare with the stored ones.

    A judgement scores otherwise when its stored top logprobs give another status or score
    under today's scorer (:func:`~trig_stream.journal.scores_otherwise_now`). An answer an
    earlier trig-stream scored from the one token a server sampled when it left out the
    list asked for cannot be told from one whose other tokens were at probability 0 (both
    store a short list), so it passes.

    Raises:
        FingerprintMismatch: a judgement scores otherwise now.
    """
    # Only an entry of the same backend: one of another (a judge swapped for a metric under
    # its name) is refused for that, every field of it named, its rules' absence too.
    judges = {
        name: rules
        for name, entry in configured.judges.items()
        if name in stored.judges
        and stored.judges[name].get("backend") == entry.get("backend")
        and (rules := (entry.get("params") or {}).get(SCORING_RULES_KEY)) is not None
        and SCORING_RULES_KEY not in (stored.judges[name].get("params") or {})
    }
    if not judges:
        return stored
    changed = {
        metric: otherwise
        for metric, otherwise in journal.scored_otherwise.items()
        if metric in judges
    }
    if changed:
        first = min(changed.values(), key=lambda otherwise: otherwise.line).first
        raise FingerprintMismatch(
            f"{run_dir} was judged by an earlier trig-stream, under scoring rules "
            f"changed since: {sum(o.count for o in changed.values())} judgement(s) of "
            f"judge(s) {', '.join(sorted(map(repr, changed)))} score otherwise now (the "
            f"first: model {first.model!r}, data_id {first.data_id!r}, dimension "
            f"{first.dimension}), and would stand beside this trig-stream's scores, never asked "
            "again (not even with --retry-errors). Use --new-run to judge afresh in a fresh "
            "run directory beside it (or change [run] name), or finish this run with the "
            "trig-stream version that started it."
        )
    entries = {
        name: {**entry, "params": {**(entry.get("params") or {}), SCORING_RULES_KEY: judges[name]}}
        if name in judges
        else entry
        for name, entry in stored.judges.items()
    }
    return stored.model_copy(update={"judges": entries})


_TEXTS_LEFT_EMPTY: Final = ("template_version", "scorer")
"""The text fields of a :class:`~trig_stream.records.JudgeFingerprint` that a judge without a
template or a scorer (a metric) leaves empty."""


def _empty_texts_unset(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """A judge's fingerprint without the fields of :data:`_TEXTS_LEFT_EMPTY` it leaves empty:
    compared so, an empty one is told as ``not set`` beside another judge's value, as a
    parameter one judge lacks is (not as ``""``)."""
    return {
        key: value
        for key, value in fingerprint.items()
        if not (key in _TEXTS_LEFT_EMPTY and value == "")
    }


def _auto_dtype_as_configured(stored: dict[str, Any], configured: dict[str, Any]) -> dict[str, Any]:
    """``stored`` with a transformers judge's ``"auto"`` dtype, from a run directory older
    than the dtype on its device (see :meth:`Manifest._judge_dtypes_placed`) whose config no
    longer names the judge's device, read as ``auto`` on the configured device: as it was
    compared before, rather than refused for a difference no one can tell."""
    params, now = stored.get("params"), configured.get("params")
    if not (
        stored.get("backend") == "transformers"
        and isinstance(params, dict)
        and params.get("dtype") == "auto"
        and isinstance(now, dict)
        and isinstance(now.get("dtype"), str)
        and (now["dtype"] == "float32" or now["dtype"].startswith("auto on "))
    ):
        return stored
    return {**stored, "params": {**params, "dtype": now["dtype"]}}


def as_json(value: Any, what: str) -> Any:
    """``value`` as JSON holds it, for a manifest that is compared with the one read back
    from disk: a tuple becomes a list (``(64, 64)`` was "changed" into ``[64, 64]``, so a
    run could never resume), a set a sorted list, a path its text.

    Raises:
        FatalBackendError: a value JSON cannot hold (named with ``what``): a backend's bug.
    """
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise FatalBackendError(f"{what} holds {value}, which JSON cannot hold")
        return value
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, dict):
        if not all(isinstance(key, str) for key in value):
            raise FatalBackendError(f"{what} has a key that is not a string: {list(value)!r}")
        return {key: as_json(item, what) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [as_json(item, what) for item in value]
    if isinstance(value, set | frozenset):
        items = [as_json(item, what) for item in value]
        return sorted(items, key=lambda item: json.dumps(item, sort_keys=True))
    raise FatalBackendError(
        f"{what} holds a value of type {type(value).__name__}, which JSON cannot hold: {value!r}"
    )


_ABSENT = object()


def _same_name_paths(stored: Any, configured: Any) -> bool:
    """Whether two values are the same, two absolute paths of one name counted so: a judge's
    path in older journal lines, and in a manifest whose entry moved with the project folder
    since (the moves themselves unknown by then)."""
    if stored == configured:
        return True
    if not (isinstance(stored, str) and isinstance(configured, str)):
        return False
    paths = PurePath(stored), PurePath(configured)
    return all(p.is_absolute() for p in paths) and paths[0].name == paths[1].name


def _changed_fields(
    stored: Any,
    configured: Any,
    same: Callable[[Any, Any], bool] | None = None,
    path: str = "",
    *,
    defaults: Any = _ABSENT,
) -> list[tuple[str, str, str]]:
    """Each field that differs between two fingerprints, as (dotted key, stored value,
    configured value) in JSON; a fingerprint is a JSON object, compared key by key. ``same``
    tells more values the same than equal ones: a stored path and the configured one at its
    new place, after the run directory moved (:meth:`Move.same`). ``defaults``, nested as
    the fingerprints are, says what a field left out of one stands for: the other setting it
    to that value is no change (a pipeline call's argument set to its own default)."""
    if isinstance(stored, dict) and isinstance(configured, dict):
        changed = []
        for key in sorted(stored.keys() | configured.keys()):
            changed += _changed_fields(
                stored.get(key, _ABSENT),
                configured.get(key, _ABSENT),
                same,
                f"{path}{key}.",
                defaults=defaults.get(key, _ABSENT) if isinstance(defaults, dict) else _ABSENT,
            )
        return changed
    if stored == configured or (same is not None and same(stored, configured)):
        return []
    if _ABSENT in (stored, configured) and defaults is not _ABSENT:
        given = configured if stored is _ABSENT else stored
        if given == defaults:
            return []
    before, after = ("not set" if v is _ABSENT else json.dumps(v) for v in (stored, configured))
    return [(path.rstrip(".") or "fingerprint", before, after)]


def errors_asked_again(
    manifest: Manifest, selected: Callable[[JudgementKey], bool] | None = None
) -> Callable[[JudgementKey, int], bool] | None:
    """Which ``error`` judgements the latest run asks again while it runs
    (``--retry-errors``), as a test of a key and the number of the line (from 0) that holds
    its latest judgement: one written before the run started, by a model and a judge of its
    config, of a sample and dimension that the run selects (``selected``: see
    :func:`~trig_stream.tui.watch_source.asked_by_config`; None: not known, taken as
    selected). None when it asks none again, or the manifest does not say.
    """
    if not manifest.retry_errors:
        return None
    models = _entry_names(manifest.config, "generators")
    metrics = _entry_names(manifest.config, "judges")
    start = manifest.journal_lines

    def asked(key: JudgementKey, line: int) -> bool:
        if not (line < start and key[0] in models and key[3] in metrics):
            return False
        return selected is None or selected(key)

    return asked


def _entry_names(config: dict[str, Any], kind: EntryKind) -> frozenset[str]:
    # A manifest is a file: an entry of another shape (edited by hand) names nothing.
    entries = config.get(kind)
    if not isinstance(entries, list):
        return frozenset()
    return frozenset(str(e["name"]) for e in entries if isinstance(e, dict) and "name" in e)


def is_trig_stream_manifest(text: bytes) -> bool:
    """Whether ``text``, a ``manifest.json``, is one trig-stream wrote, whole or damaged:
    a JSON object with its ``schema_version`` or ``run_name`` (or, unparsable, text naming
    ``schema_version``), rather than another program's file of that name (a web app's).
    An empty one (whitespace at most) counts as ours, damaged: a crash or a full disk leaves
    it so, and it holds nothing of anyone's to protect."""
    if not text.strip():
        return True
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):  # a damaged one (cut short, edited) names its fields
        return b'"schema_version"' in text
    return isinstance(data, dict) and bool({"schema_version", "run_name"} & data.keys())


def manifest_head_is_ours(head: bytes) -> bool:
    """Whether ``head``, the first bytes of a ``manifest.json``, start as trig-stream writes
    one: a JSON object whose first key is ``schema_version`` (the model's first field),
    compact or indented, after a byte order mark or not (:func:`without_bom`). A manifest of
    ours cut short starts alike; another program's file (a dataset's index, a JSON array)
    does not. Decided from :data:`MANIFEST_HEAD_BYTES`."""
    return _OUR_HEAD.match(without_bom(head[:MANIFEST_HEAD_BYTES])) is not None


def without_bom(text: bytes) -> bytes:
    """``text``, a ``manifest.json``, without the UTF-8 byte order mark an editor (Notepad)
    puts before it when it saves a hand edit; a run writes none."""
    return text.removeprefix(codecs.BOM_UTF8)


def read_manifest_text(handle: BinaryIO) -> bytes | None:
    """The whole of an open ``manifest.json``, or None when it is larger than
    :data:`MAX_MANIFEST_BYTES` (never one trig-stream wrote), read no further than that."""
    text = handle.read(MAX_MANIFEST_BYTES + 1)
    return None if len(text) > MAX_MANIFEST_BYTES else text


def too_large_manifest(path: Path) -> str:
    """The message for a ``manifest.json`` larger than any a run writes."""
    return (
        f"{path} is larger than {MAX_MANIFEST_BYTES // 2**20} MiB, and a run's manifest is a "
        "few kilobytes: it is not a trig-stream run directory's manifest (another program's "
        "file?); move it away, or use --new-run to start a fresh run directory beside it (or "
        "change [run] name)"
    )


def manifest_is_ours(run_dir: Path, text: bytes) -> bool:
    """Whether ``text``, the ``manifest.json`` of ``run_dir``, is one trig-stream wrote: by
    its content (:func:`is_trig_stream_manifest`), or, when it is no JSON at all, by what
    lies beside it: a journal of ours or generated images make it our manifest, damaged."""
    if is_trig_stream_manifest(text):
        return True
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return holds_our_journal(run_dir) or _holds_a_file(run_dir / IMAGES)
    return False


def _holds_a_file(folder: Path) -> bool:
    return any(files for _, _, files in os.walk(folder))


def not_a_manifest(path: Path) -> str:
    """The message for a ``manifest.json`` that trig-stream did not write, met by a run."""
    return (
        f"{path} is not a trig-stream run directory's manifest (another program's file?), "
        "and a run would write over it: move it away, or use --new-run to start a fresh run "
        "directory beside it (or change [run] name)"
    )


def _not_a_manifest_read_only(path: Path) -> str:
    # A command that only reads (status, report, watch) writes over nothing.
    return (
        f"{path} is not a trig-stream manifest (another program's file?): name a run "
        "directory that trig-stream wrote"
    )


def read_manifest(run_dir: Path) -> Manifest:
    """Read a run directory's manifest.

    A manifest that is not trig-stream's is named as such in words for a command that only
    reads (status, report, watch): a run refuses it before it gets here
    (:func:`trig_stream.resume_checks.resumed_manifest`).

    Raises:
        RunDirError: there is none, or it cannot be read.
    """
    path = run_dir / MANIFEST
    text = b""
    try:
        with open_regular_file(path) as handle:
            whole = read_manifest_text(handle)
        if whole is None:
            raise RunDirError(too_large_manifest(path))
        text = without_bom(whole)
        _refuse_later_format(run_dir, text)
        manifest = Manifest.model_validate_json(text)
    except FileNotFoundError:
        if not run_dir.exists():
            raise RunDirError(
                f"{run_dir} does not exist: there is no run directory there"
            ) from None
        raise RunDirError(f"{run_dir} is not a trig-stream run directory (no {MANIFEST})") from None
    except NotADirectoryError as exc:
        if not run_dir.is_dir():
            raise RunDirError(_no_folder(run_dir)) from None
        # Inside the run directory: its manifest.json is a link through a file.
        raise RunDirError(_unreadable(path, exc)) from None
    except ValidationError as exc:
        if not manifest_is_ours(run_dir, text):
            raise RunDirError(_not_a_manifest_read_only(path)) from None
        error = exc.errors()[0]
        where = ".".join(map(str, error["loc"]))
        raise RunDirError(
            f"cannot read {path}: it is damaged ({where + ': ' if where else ''}{error['msg']}); "
            "the run directory cannot be used as it is: start a fresh one with --new-run, or "
            "restore the file"
        ) from None
    except OSError as exc:
        raise RunDirError(_unreadable(path, exc)) from None
    except ValueError as exc:
        raise RunDirError(f"cannot read {path}: {exc}") from None
    return manifest


def _unreadable(path: Path, exc: OSError) -> str:
    """The message for a manifest at ``path`` that cannot be read, as ``exc`` says."""
    return (
        f"cannot read {path}: {exc.strerror or exc}; it must be the file a run wrote, "
        "readable by this user"
    )


def _no_folder(run_dir: Path) -> str:
    """The message for a run directory given that is no folder (a file, a pipe), or lies below
    a file: its manifest's reading said "Not a directory" of a path no one gave."""
    try:
        mode = os.stat(run_dir).st_mode
    except OSError:  # below a file: `status run/manifest.json/x`
        return (
            f"{run_dir} does not exist: a file stands where a folder of its path goes; there is "
            "no run directory there"
        )
    what = "file" if stat.S_ISREG(mode) else file_kind(mode)
    home = next((folder for folder in run_dir.parents if (folder / MANIFEST).is_file()), None)
    if home is not None:  # one of its files: a report's, or its manifest
        text = (
            f"{run_dir} is a {what}, not a run directory: name the run directory it lies in, {home}"
        )
    else:
        text = (
            f"{run_dir} is a {what}, not a run directory: name the folder a run wrote (the one "
            f"holding its {MANIFEST})"
        )
    if stat.S_ISREG(mode) and run_dir.suffix.lower() == ".json" and run_dir.name != MANIFEST:
        text += (
            "; a TRIG result file (an evaluation result or formatted JSON) is analysed with "
            "`trig-stream analyze FILE --out DIR`"
        )
    return text


def _refuse_later_format(run_dir: Path, text: bytes) -> None:
    """Refuse a manifest a later trig-stream wrote, told by its ``schema_version`` alone:
    a later format may add a field or widen a type, which this one's model would call
    damage.

    Raises:
        RunDirError: its ``schema_version`` is past :data:`MANIFEST_VERSION`.
    """
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return  # damaged: the model's reading names what is wrong
    version = data.get("schema_version") if isinstance(data, dict) else None
    if isinstance(version, int) and not isinstance(version, bool) and version > MANIFEST_VERSION:
        raise RunDirError(
            f"{run_dir} was written by a later trig-stream (record format {version}; this "
            f"one knows formats up to {MANIFEST_VERSION}): use that version, or start a fresh "
            "run with --new-run"
        )
