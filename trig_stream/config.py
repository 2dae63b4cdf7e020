"""The run configuration: a validated model of everything ``trig-stream run`` does.

A config is a TOML file (see ``config/`` and the README's config reference). It is checked
completely before any work starts: unknown keys, wrong types and unknown backends are refused
with one message that names the file, the line, the key and what was expected (those
messages are written by :mod:`trig_stream.config_problems`; the field types and their checks
live in :mod:`trig_stream.config_fields`). Relative paths inside a config are taken relative
to the config file's own folder.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import tomllib
from collections.abc import Iterator, Mapping
from contextlib import suppress
from pathlib import Path, PurePath
from typing import Annotated, Any, Final, Literal, TypeVar, cast

import annotated_types
from pydantic import (
    BaseModel,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from trig_stream.config_fields import (
    EMPTY_PATH,
    OPTIONS_CONFIG,
    Backoff,
    ConfigPath,
    ModelName,
    PairName,
    SafeName,
    TaskName,
)
from trig_stream.config_problems import (
    DUPLICATE_NAME,
    MAX_NESTING,
    Loc,
    checkable,
    dotted_key,
    error_locs,
    nested_too_deep,
    problem_line,
    problem_lines,
    problems_message,
    unusable_entries,
)
from trig_stream.dimensions import Dimension
from trig_stream.errors import ConfigError, TrigStreamError
from trig_stream.files import (
    MAX_SETTINGS_BYTES,
    UnfitFileError,
    locale_problem,
    locale_refusal,
    read_settings_file,
    real_path,
)
from trig_stream.records import CASE_CLASH, exact_number
from trig_stream.scoring import Scorer


class _Section(BaseModel):
    model_config = OPTIONS_CONFIG


class RunSection(_Section):
    """``[run]``: what this run is called, where it writes, and which TRIG task it evaluates."""

    name: SafeName
    output_dir: ConfigPath = Path("runs")
    task: TaskName = "t2i"
    seed: int = 42
    """Base seed; each (model, data_id) gets its own seed derived from it."""


class DatasetSection(_Section):
    """``[dataset]``: where the TRIG prompts come from, and which of them to use."""

    path: ConfigPath
    """A legacy TRIG JSON file, the same records as JSON Lines, a TRIG parquet file, or a
    folder of parquet files."""
    format: Literal["auto", "json", "jsonl", "parquet"] = "auto"
    image_root: ConfigPath | None = None
    """Folder holding the source / reference images named by ``img_id`` (p2p, s2p JSON)."""
    pairs: list[PairName] = Field(default_factory=list)
    """Keep only samples of these pairs (either order); empty keeps all."""
    dimensions: list[Dimension] = Field(default_factory=list)
    """Keep only samples whose pair has one of these, and judge only these; empty keeps all."""
    limit: Annotated[int, Field(ge=1)] | None = None
    """Use at most this many valid samples (after the filters)."""


class GeneratorConfig(_Section):
    """``[[generators]]``: one model under evaluation."""

    name: ModelName
    """The model's name in the run: image folder, records, reports."""
    backend: str
    workers: Annotated[int, Field(ge=1, le=64)] = 1
    batch_size: Annotated[int, Field(ge=1, le=256)] = 1
    options: dict[str, Any] = Field(default_factory=dict)
    """Backend-specific settings, checked by the backend's own model."""
    _written_options: tuple[dict[str, Any], dict[str, Any]] | None = PrivateAttr(default=None)
    """``options`` as the config wrote them, and the resolved ``options`` they became."""

    @property
    def written_options(self) -> dict[str, Any]:
        """``options`` as the config wrote them, before :meth:`RunConfig.resolve_paths` made
        their paths absolute: a message names a path as the user wrote it (``imgs``, relative
        to the config's folder), not only as it resolved. Only while ``options`` are those
        they became: a copy with other options (``model_copy(update=...)``) wrote these."""
        if self._written_options is None:
            return self.options
        written, resolved = self._written_options
        return written if resolved == self.options else self.options


class AdaptiveConcurrency(_Section):
    """``[judges.adaptive]``: let a judge's limit on requests in flight follow the server.

    Off by default: the limit is then the judge's fixed ``concurrency``. When on, the limit
    starts at ``concurrency`` (kept between ``min`` and ``max``), grows while answers come
    back in time and the server's waiting queue stays short, and is cut on a 429, on a
    request without an answer in time, when latency blows up, or when the queue that the
    server reports on ``GET /metrics`` (vLLM's ``vllm:num_requests_waiting``) grows past
    ``max_waiting``; at most once per ``poll_interval_s``.
    """

    enabled: bool = False
    min: Annotated[int, Field(ge=1, le=4096)] = 1
    """The limit is never cut below this."""
    max: Annotated[int, Field(ge=1, le=4096)] = 256
    """The limit never grows above this."""
    target_latency_s: Annotated[float, Field(gt=0)] | None = None
    """Cut while the smoothed request latency is above this; unset: see ``latency_factor``."""
    latency_factor: Annotated[float, Field(gt=1)] = 3.0
    """Without ``target_latency_s``: latency has blown up at this multiple of the lowest
    smoothed latency seen."""
    max_waiting: Annotated[int, Field(ge=0)] = 8
    """Requests the server may keep waiting (summed over endpoints) before the limit is cut."""
    poll_interval_s: Annotated[float, Field(gt=0)] = 2.0
    """How often the server's load is read (``GET /metrics``), and the shortest time between
    two cuts of the limit."""
    decrease_factor: Annotated[float, Field(gt=0, lt=1)] = 0.5
    """A cut multiplies the limit by this."""

    @model_validator(mode="after")
    def _check(self) -> AdaptiveConcurrency:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must not exceed max ({self.max})")
        return self


class JudgeConfig(_Section):
    """``[[judges]]``: one metric that scores every image on its pair's dimensions."""

    name: SafeName = "trigscore"
    backend: str
    concurrency: Annotated[int, Field(ge=1, le=4096)] = 16
    """The most requests in flight; with ``adaptive`` on, the starting limit."""
    scorer: Scorer = "robust"
    confidence: bool = False
    adaptive: AdaptiveConcurrency = AdaptiveConcurrency()
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("scorer", "confidence")
    @classmethod
    def _scored_from_logprobs(cls, value: object, info: ValidationInfo) -> object:
        # Ignored, they passed validate and the run's scores were the metric's raw values,
        # though the config asked for another scorer or the confidence weighting. Their
        # defaults are no request: a config read back from a manifest holds every key.
        assert info.field_name is not None
        default = cls.model_fields[info.field_name].default
        if info.data.get("backend") == "metric" and value != default:
            raise ValueError(
                "has no effect on backend 'metric', whose scores are its metric's own, not "
                "made from top logprobs: remove it from this [[judges]] entry"
            )
        return value


Share = Annotated[float, Field(ge=0, le=1)]
"""A score (TRIGScore is a probability) or a share of points."""


class RelationSection(_Section):
    """``[relation]``: the DTM thresholds (defaults are TRIG's).

    Scores and shares lie in [0, 1], correlations in [-1, 1]. A split's ratio is at least 1,
    so a ``dominance_ratio`` above 1 would call even a balanced split a dominance; and a
    bottleneck above the synergy threshold would put points in both zones at once.
    """

    correlation: Literal["spearman_corr", "pearson_corr", "paretoF"] = "spearman_corr"
    synergy: Share = 0.8
    bottleneck: Share = 0.5
    synergy_density: Share = 0.4
    bottleneck_density: Share = 0.4
    dominance_ratio: Annotated[float, Field(gt=0, le=1)] = 0.8
    tradeoff_corr: Annotated[float, Field(ge=-1, le=1)] = 0.6

    @model_validator(mode="after")
    def _check(self) -> RelationSection:
        if self.bottleneck > self.synergy:
            raise ValueError(
                f"bottleneck ({exact_number(self.bottleneck)}) is above synergy "
                f"({exact_number(self.synergy)}): a pair's "
                "scores would be in both zones; keep bottleneck at or below synergy"
            )
        return self


class EngineSection(_Section):
    """``[engine]``: buffer sizes and retry policy. The defaults suit most runs."""

    sample_buffer: Annotated[int, Field(ge=1)] = 8
    image_buffer: Annotated[int, Field(ge=1)] = 32
    judgement_buffer: Annotated[int, Field(ge=1)] = 256
    result_buffer: Annotated[int, Field(ge=1)] = 256
    max_attempts: Annotated[int, Field(ge=1, le=100)] = 5
    backoff_initial: Backoff = 0.5
    backoff_max: Backoff = 30.0


class RunConfig(_Section):
    """A whole run: the root of a config file."""

    run: RunSection
    dataset: DatasetSection
    generators: Annotated[list[GeneratorConfig], Field(min_length=1)]
    judges: Annotated[list[JudgeConfig], Field(min_length=1)]
    relation: RelationSection = RelationSection()
    engine: EngineSection = EngineSection()

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        _unique([g.name for g in self.generators], "generators", folders=True)
        _unique([j.name for j in self.judges], "judges")
        return self

    def resolve_paths(self, base: Path) -> RunConfig:
        """Return a copy whose paths starting with ``~`` start in the home folder, and whose
        relative paths are taken relative to ``base``.

        Raises:
            ConfigError: naming each path that cannot be resolved: one names the home folder
                of a user this machine does not know, or a part of it looks like an
                environment variable (``$HOME``), which is never expanded; or a
                ``dtm_rewrite`` generator's ``report`` lies in the run directory.
        """
        problems: list[_PathProblem] = []
        generators = []
        for i, g in enumerate(self.generators):
            where: Loc = ("generators", i, "options")
            resolved = g.model_copy(
                update={"options": _resolve_options(g.options, base, where, problems)}
            )
            # Kept through a second resolution (the engine resolves a loaded config again).
            resolved._written_options = (g.written_options, resolved.options)
            generators.append(resolved)
        judges = [
            j.model_copy(
                update={
                    "options": _resolve_options(j.options, base, ("judges", i, "options"), problems)
                }
            )
            for i, j in enumerate(self.judges)
        ]
        image_root = self.dataset.image_root
        dataset = self.dataset.model_copy(
            update={
                "path": _resolve_noting(self.dataset.path, base, ("dataset", "path"), problems),
                "image_root": None
                if image_root is None
                else _resolve_noting(image_root, base, ("dataset", "image_root"), problems),
            }
        )
        output_problems = len(problems)
        output_dir = _resolve_noting(self.run.output_dir, base, ("run", "output_dir"), problems)
        run = self.run.model_copy(update={"output_dir": output_dir})
        if len(problems) == output_problems:  # reports are compared with a resolved run dir
            try:
                _refuse_reports_in(run.output_dir / run.name, generators)
            except _PathProblem as exc:
                problems.append(exc)
        if problems:
            raise _PathProblems(problems)
        return self.model_copy(
            update={"dataset": dataset, "run": run, "generators": generators, "judges": judges}
        )

    @property
    def run_dir(self) -> Path:
        """The folder this run writes into."""
        return self.run.output_dir / self.run.name


PATH_OPTIONS = frozenset({"path", "report", "template", "model_path"})
"""Backend options that name a file or folder, resolved like the config's own paths."""
HUB_OR_PATH_OPTIONS = frozenset({"checkpoint"})
"""Options that hold a hub id (``org/model``) or a folder: resolved only when written as an
explicit relative path (``./x``, ``../x``) or from the home folder (``~/x``)."""
PASSED_THROUGH_OPTIONS = frozenset({"call", "load", "extra_body"})
"""Tables handed as they are to a library or an API (a pipeline's call and loading
arguments, an images API's extra body): their keys are not ours, so nothing in them is
resolved. Other nested tables are backends' options (a wrapper's inner generator, a metric)."""


class _PathProblem(ConfigError):
    """A path of a config that cannot be resolved, and where it is: :func:`parse_config`
    names its line; as raised by :meth:`RunConfig.resolve_paths`, its message names the key."""

    def __init__(self, loc: Loc, why: str) -> None:
        super().__init__(f"{dotted_key(loc)}: {why}")
        self.loc = loc
        self.why = why


class _PathProblems(ConfigError):
    """Every path of a config that cannot be resolved (see :class:`_PathProblem`)."""

    def __init__(self, problems: list[_PathProblem]) -> None:
        super().__init__("; ".join(map(str, problems)))
        self.problems = problems


def _path_problems(data: Any, base: Path) -> list[_PathProblem]:
    """The paths of the config mapping ``data`` that cannot be resolved from ``base``, as
    :meth:`RunConfig.resolve_paths` resolves them: found in its tables as written, so that
    they are listed with the config's other problems, which leave no model to resolve."""
    problems: list[_PathProblem] = []
    if not isinstance(data, dict):
        return problems
    for loc in (("run", "output_dir"), ("dataset", "path"), ("dataset", "image_root")):
        table = data.get(loc[0])
        value = table.get(loc[1]) if isinstance(table, dict) else None
        if isinstance(value, str | PurePath) and str(value):  # an empty one is the model's
            _resolve_noting(Path(value), base, loc, problems)
    for kind in ("generators", "judges"):
        entries = data.get(kind)
        for index, entry in enumerate(entries if isinstance(entries, list) else []):
            options = entry.get("options") if isinstance(entry, dict) else None
            if isinstance(options, dict):
                _resolve_options(options, base, (kind, index, "options"), problems)
    return problems


_VARIABLE = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")
"""A shell's ``$NAME``: what it would expand, when ``NAME`` is set."""
_BRACED = re.compile(r"\$\{[^}]*\}?")
"""A shell's ``${...}``."""


def _refuse_variables(path: Path, loc: Loc, base: Path) -> None:
    # ``$HOME/runs`` became a folder literally named "$HOME" beside the config, which a later
    # `rm -rf $HOME/runs` in a shell would not remove, or worse. Refused, set here or not: a
    # part that starts with ``$NAME`` (``$SCRATCH/runs``: unset in cron or CI, it is still
    # meant as a variable, and the same config is refused in a shell that sets it) and any
    # ``${``, a shell's syntax no file name is likely to use; unless the path up to that part
    # exists as written (Windows' ``$RECYCLE.BIN``). A ``$NAME`` inside a name
    # (``runs-$USER``, ``a$b``) is refused only when ``NAME`` is set: a shell would expand it.
    parts = path.parts
    for index, part in enumerate(parts):
        braced = _BRACED.search(part)
        leading = _VARIABLE.match(part)
        named = next((m for m in _VARIABLE.finditer(part) if m.group(1) in os.environ), None)
        if braced is not None:
            found = braced.group()
        elif leading is not None:
            found = leading.group()
        elif named is not None:
            found = named.group()
        else:
            continue
        if (braced is not None or leading is not None) and _exists_as_written(
            Path(*parts[: index + 1]), base
        ):
            continue
        if braced is None and leading is None and named is not None:
            how = f"; a name that really holds {found}: rename it, or unset {named.group(1)}"
        else:
            how = f"; a folder really named {part!r} is taken as written once it exists"
        raise _PathProblem(
            loc,
            f"{path}: {part!r} looks like an environment variable ({found}), and a config's "
            "paths are taken as written (no variable is expanded): write the path out in full "
            f"(a leading ~ is the home folder){how}",
        )


def _exists_as_written(path: Path, base: Path) -> bool:
    """Whether ``path`` (relative ones from ``base``; ``~`` the home folder) names something
    on disk, taken literally."""
    try:
        if str(path).startswith("~"):
            path = path.expanduser()
        return os.path.lexists(path if path.is_absolute() else base / path)
    except (RuntimeError, OSError, ValueError):  # no home folder known; a name too long
        return False


def _resolve(path: Path, base: Path, loc: Loc) -> Path:
    _refuse_variables(path, loc, base)
    # ``~`` as a shell reads it: a folder literally named "~" beside the config, which a
    # later `rm -rf ~` would take for the home folder, is never what was meant.
    if str(path).startswith("~"):
        try:
            path = path.expanduser()
        except RuntimeError:  # ~name of an unknown user, or no home folder at all
            raise _PathProblem(
                loc,
                f"{path}: no home folder is known for {path.parts[0]}: write the path out in full",
            ) from None
    unusable = locale_problem(path if path.is_absolute() else base / path)
    if unusable is not None:
        raise _PathProblem(loc, unusable)
    resolved = path if path.is_absolute() else real_path(base / path)
    try:
        str(resolved).encode("utf-8")
    except UnicodeEncodeError:
        with suppress(UnicodeDecodeError):
            os.fsencode(resolved).decode("utf-8")
            # UTF-8 bytes, read as surrogates: a file-name encoding that is not UTF-8.
            raise _PathProblem(loc, locale_refusal(resolved)) from None
        # A folder named in another encoding (``caf\xe9``, Latin-1): Python holds its bytes
        # as half characters, which the run directory's manifest, written as UTF-8 JSON,
        # cannot record; the run crashed after taking its directory.
        shown = os.fsencode(resolved).decode("utf-8", "backslashreplace")
        raise _PathProblem(
            loc,
            f"{shown}: the path is not UTF-8 text (a folder named in another "
            "encoding), and a run records its paths as UTF-8: rename that folder, or move "
            "the config and its files under a UTF-8 path",
        ) from None
    return resolved


def _resolve_noting(path: Path, base: Path, loc: Loc, problems: list[_PathProblem]) -> Path:
    """``path`` resolved; as written, its problem added to ``problems``, when it has one."""
    try:
        return _resolve(path, base, loc)
    except _PathProblem as exc:
        problems.append(exc)
    except ValueError:  # a NUL ("embedded null byte"), refused with the text that holds it
        pass
    return path


def _refuse_reports_in(run_dir: Path, generators: list[GeneratorConfig]) -> None:
    """Refuse a ``dtm_rewrite`` generator's ``report`` (resolved) inside ``run_dir``.

    The run writes its report again at its end, that file included: the relations read from
    it, and with them the generator's fingerprint, changed, and the run directory refused
    the run's own next command (exit 3). Checked against the configured run directory with
    or without ``--new-run``: the new folder that flag picks beside it holds no file yet (and
    is the configured one when it is resumed, by its ``[run] name``), while a report in the
    configured one is written again by the next run of this config without the flag.
    """
    own = Path(os.path.realpath(run_dir))
    for index, generator in enumerate(generators):
        report = generator.options.get("report")
        if generator.backend != "dtm_rewrite" or not isinstance(report, str):
            continue
        if Path(os.path.realpath(report)).is_relative_to(own):
            raise _PathProblem(
                ("generators", index, "options", "report"),
                f"{report}: lies in this run's own run directory ({run_dir}), whose report "
                "the run writes again at its end: the relations read from it would change, "
                "and the run directory would then refuse the run's next command (exit 3) as "
                "made with other settings; copy the file out of the run directory (next to "
                "the config, say) and point report at the copy",
            )


def _resolve_options(
    options: dict[str, Any], base: Path, where: Loc, problems: list[_PathProblem]
) -> dict[str, Any]:
    """``options`` with their paths resolved; the problem of each that has one added to
    ``problems`` (that path left as written)."""
    resolved = dict(options)
    for key, value in options.items():
        loc = (*where, key)
        if key in PASSED_THROUGH_OPTIONS:
            continue
        if isinstance(value, dict):  # nested backends (e.g. the inner generator of a wrapper)
            resolved[key] = _resolve_options(value, base, loc, problems)
        elif isinstance(value, PurePath) and key in PATH_OPTIONS | HUB_OR_PATH_OPTIONS:
            # A code-built config's Path("imgs"): a path, never a hub id, resolved as its
            # text would be (its "./" is gone by now) and handed on as text.
            resolved[key] = str(_resolve_noting(Path(value), base, loc, problems))
        elif not isinstance(value, str):
            continue
        elif Path(value).is_absolute():
            if key in PATH_OPTIONS:  # left as written, but never with a variable unexpanded
                try:
                    _refuse_variables(Path(value), loc, base)
                except _PathProblem as exc:
                    problems.append(exc)
            continue
        elif not value and key in PATH_OPTIONS | HUB_OR_PATH_OPTIONS:
            problems.append(_PathProblem(loc, EMPTY_PATH))
        elif key in PATH_OPTIONS or (key in HUB_OR_PATH_OPTIONS and value.startswith((".", "~"))):
            resolved[key] = str(_resolve_noting(Path(value), base, loc, problems))
    return resolved


def _unique(names: list[str], section: str, *, folders: bool = False) -> None:
    """Refuse a name used twice in ``section``; with ``folders`` (the names name folders of
    the run directory), also two that differ only in case."""
    first: dict[str, int] = {}
    folded: dict[str, int] = {}
    for index, name in enumerate(names):
        if name in first:
            raise PydanticCustomError(
                DUPLICATE_NAME,
                # A safe name holds no brace, which the template would read as a placeholder.
                f"{section}: the name {name!r} is used twice (also {section}[{first[name]}])",
                {"section": section, "index": index},
            )
        other = folded.get(name.casefold())
        if folders and other is not None:
            raise PydanticCustomError(
                DUPLICATE_NAME,
                f"{section}: the name {name!r} differs from {names[other]!r} ({section}"
                f"[{other}]) only in case; {CASE_CLASH}",
                {"section": section, "index": index},
            )
        first[name] = index
        folded.setdefault(name.casefold(), index)


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
    # The tables _resolve_options leaves alone: its other nested tables are backends' options.
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


MAX_CONFIG_BYTES: Final = MAX_SETTINGS_BYTES
"""The largest config file read: a config is a few kilobytes."""


def load_config(path: str | Path) -> RunConfig:
    """Read, validate and resolve a TOML run config, backend options included.

    Raises:
        ConfigError: the file is missing, no regular file (a device, a pipe), larger than
            :data:`MAX_CONFIG_BYTES`, not TOML, or invalid; the message names the file, the
            line and the key of every problem.
    """
    path = Path(path)
    try:
        raw = read_settings_file(path, MAX_CONFIG_BYTES)
    except UnfitFileError as exc:
        large = ", too large for a config" if exc.errno == errno.EFBIG else ""
        raise ConfigError(
            f"{path}: cannot read config: {exc.strerror}{large}; name a TOML config file"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8-sig")  # a byte order mark (some editors') is skipped
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not a TOML config: byte {exc.start} is not UTF-8 text"
        ) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except RecursionError:  # the TOML reader recurses once per level of an array
        raise ConfigError(
            f"{path}: not a usable config: arrays or tables nested too deep to read (over "
            f"{MAX_NESTING} levels); a config needs a few"
        ) from None
    return parse_config(data, source=path, text=text)


def parse_config(
    data: dict[str, Any], *, source: Path, text: str = "", base: Path | None = None
) -> RunConfig:
    """Validate an already-parsed config mapping (see :func:`load_config`).

    Args:
        data: the parsed TOML.
        source: the config's name in messages; relative paths start from its folder...
        text: its TOML text, whose lines messages name (none without it).
        base: ...unless this folder is given.
    """
    from trig_stream.backends.plugins import OptionsModelError
    from trig_stream.backends.registry import Kind, backend_class, validate_backend_options

    deep = nested_too_deep(data)
    if deep is not None:  # the checks below recurse once per level, as does the validator
        why = (
            f"holds arrays or tables nested more than {MAX_NESTING} levels deep, too deep to "
            "read; a config needs a few"
        )
        raise ConfigError(problems_message(source, [problem_line(source, text, deep, why)]))
    # Every problem is found before one is reported: values no key takes, the config's own
    # tables, then each backend's options (of the entries whose backend exists).
    problems: list[str] = []
    refused: dict[Loc, bool] = {}  # where a value (False) or a key (True) is refused already
    for loc, why, is_key in unusable_entries(data):
        problems.append(problem_line(source, text, loc[:-1] if is_key else loc, why))
        refused[tuple(checkable(part) for part in loc)] = is_key  # as the errors name it
    for loc, why in non_finite_passed_through(data):
        problems.append(problem_line(source, text, loc, why))
        refused[loc] = False
    checked = checkable(data) if refused else data
    named: list[Loc] = list(refused)  # where a problem is told: a path's there is not told
    config: RunConfig | None = None
    try:
        config = validate_table(RunConfig, checked)
    except ValidationError as exc:
        problems.extend(problem_lines(exc, source, text, (), RunConfig, refused))
        named.extend(error_locs(exc))
    # An error of a backend's own (a third party's missing extra: its message and exit code)
    # comes after the config's problems, as when the options were checked only without any.
    own_error: TrigStreamError | None = None
    kinds: tuple[Kind, ...] = ("generators", "judges")
    for kind in kinds:
        entries = checked.get(kind) if isinstance(checked, dict) else None
        for index, entry in enumerate(entries if isinstance(entries, list) else []):
            backend = entry.get("backend") if isinstance(entry, dict) else None
            options = entry.get("options", {}) if isinstance(entry, dict) else None
            if not isinstance(backend, str) or not isinstance(options, dict):
                continue  # refused by the config's own model above
            try:
                validate_backend_options(kind, backend, options)
            except ValidationError as exc:
                prefix: Loc = (kind, index, "options")
                options_model = backend_class(kind, backend).Options
                problems.extend(problem_lines(exc, source, text, prefix, options_model, refused))
                named.extend(error_locs(exc, prefix))
            except OptionsModelError as exc:  # a third party's validator raised a RuntimeError
                problems.append(problem_line(source, text, (kind, index, "options"), str(exc)))
            except ValueError as exc:
                loc = (kind, index, "backend")
                problems.append(problem_line(source, text, loc, str(exc)))
            except TrigStreamError as exc:
                own_error = own_error or exc
    base = source.parent if base is None else base
    for problem in _path_problems(checked, base):  # at the line of its key, as those above
        if not any(problem.loc[: len(loc)] == loc for loc in named if len(loc) > 1):
            problems.append(problem_line(source, text, problem.loc, problem.why))
    if problems or config is None:
        raise ConfigError(problems_message(source, problems))
    if own_error is not None:
        raise own_error
    try:
        return config.resolve_paths(base)
    except _PathProblems as exc:
        lines = [problem_line(source, text, p.loc, p.why) for p in exc.problems]
        raise ConfigError(problems_message(source, lines)) from None
