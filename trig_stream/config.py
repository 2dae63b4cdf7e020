"""The run configuration: a validated model of everything ``trig-stream run`` does.

A config is a TOML file (see ``config/`` and the README's config reference). It is checked
completely before any work starts: unknown keys, wrong types and unknown backends are refused
with one message that names the file, the line, the key and what was expected (those
messages are written by :mod:`trig_stream.config_problems`; the field types and their checks
live in :mod:`trig_stream.config_fields`, how a table's values are held to its model in
:mod:`trig_stream.config_values`). Relative paths inside a config are taken relative to the
config file's own folder (:mod:`trig_stream.config_paths` resolves them).
"""

from __future__ import annotations

import errno
import tomllib
from pathlib import Path
from typing import Annotated, Any, Final, Literal

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
    OPTIONS_CONFIG,
    Backoff,
    ConfigPath,
    ModelName,
    PairName,
    SafeName,
    TaskName,
)
from trig_stream.config_paths import (
    PathProblem,
    PathProblems,
    path_problems,
    refuse_reports_in,
    resolve_noting,
    resolve_options,
)
from trig_stream.config_problems import (
    DUPLICATE_NAME,
    MAX_NESTING,
    Loc,
    checkable,
    error_locs,
    nested_too_deep,
    problem_line,
    problem_lines,
    problems_message,
    unusable_entries,
)
from trig_stream.config_values import non_finite_passed_through, validate_table
from trig_stream.dimensions import Dimension
from trig_stream.errors import ConfigError, TrigStreamError
from trig_stream.files import (
    MAX_SETTINGS_BYTES,
    UnfitFileError,
    read_settings_file,
    undecodable_byte,
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
        problems: list[PathProblem] = []
        generators = []
        for i, g in enumerate(self.generators):
            where: Loc = ("generators", i, "options")
            resolved = g.model_copy(
                update={"options": resolve_options(g.options, base, where, problems)}
            )
            # Kept through a second resolution (the engine resolves a loaded config again).
            resolved._written_options = (g.written_options, resolved.options)
            generators.append(resolved)
        judges = [
            j.model_copy(
                update={
                    "options": resolve_options(j.options, base, ("judges", i, "options"), problems)
                }
            )
            for i, j in enumerate(self.judges)
        ]
        image_root = self.dataset.image_root
        dataset = self.dataset.model_copy(
            update={
                "path": resolve_noting(self.dataset.path, base, ("dataset", "path"), problems),
                "image_root": None
                if image_root is None
                else resolve_noting(image_root, base, ("dataset", "image_root"), problems),
            }
        )
        output_problems = len(problems)
        output_dir = resolve_noting(self.run.output_dir, base, ("run", "output_dir"), problems)
        run = self.run.model_copy(update={"output_dir": output_dir})
        if len(problems) == output_problems:  # reports are compared with a resolved run dir
            try:
                refuse_reports_in(run.output_dir / run.name, generators)
            except PathProblem as exc:
                problems.append(exc)
        if problems:
            raise PathProblems(problems)
        return self.model_copy(
            update={"dataset": dataset, "run": run, "generators": generators, "judges": judges}
        )

    @property
    def run_dir(self) -> Path:
        """The folder this run writes into."""
        return self.run.output_dir / self.run.name


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
    data, text = read_config_file(path)
    return parse_config(data, source=path, text=text)


def read_config_file(path: Path) -> tuple[dict[str, Any], str]:
    """The TOML of the config file ``path``, parsed, and its text; nothing checked.

    Raises:
        ConfigError: as :func:`load_config`, but for an invalid config.
    """
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
            f"{path}: not a TOML config: byte {undecodable_byte(raw, exc)} is not UTF-8 text"
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
    return data, text


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
    for problem in path_problems(checked, base):  # at the line of its key, as those above
        if not any(problem.loc[: len(loc)] == loc for loc in named if len(loc) > 1):
            problems.append(problem_line(source, text, problem.loc, problem.why))
    if problems or config is None:
        raise ConfigError(problems_message(source, problems))
    if own_error is not None:
        raise own_error
    try:
        return config.resolve_paths(base)
    except PathProblems as exc:
        lines = [problem_line(source, text, p.loc, p.why) for p in exc.problems]
        raise ConfigError(problems_message(source, lines)) from None
