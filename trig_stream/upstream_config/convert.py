"""Convert a TRIG upstream YAML config: the public API and the mapping of its top level.

:func:`import_config` reads a YAML file and returns a :class:`Conversion`: the TOML text, the
config it validates to, and the warnings. :class:`_Converter` reports each unknown top-level
key, then fills the TOML one table at a time: ``[run]`` (name, task, result folder),
``[dataset]`` (the prompt source), the generators (:mod:`.generators`), the judges
(:mod:`.judges`) and ``[relation]`` (the DTM thresholds). It writes the TOML with
:mod:`.toml_writer`'s helpers, warnings first as comments, and validates it like any config.
"""

from __future__ import annotations

import importlib
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath
from typing import Any

from trig_stream.config import MAX_CONFIG_BYTES, RunConfig, parse_config
from trig_stream.config_problems import MAX_NESTING, dotted_key, unusable_values
from trig_stream.dimensions import DIMENSIONS, Task, normalise_task
from trig_stream.errors import ConfigError
from trig_stream.files import read_settings_file
from trig_stream.upstream_config.generators import Generator, GeneratorMapping
from trig_stream.upstream_config.judges import ConvertedJudge, convert_judges
from trig_stream.upstream_config.toml_writer import (
    assignments,
    comment,
    key_text,
    safe_name,
    shown,
    too_long_to_write,
)

TOP_LEVEL_KEYS = frozenset(
    {
        "name",
        "task",
        "dataset_name",
        "prompt_path",
        "image_path",
        "description_path",
        "start_idx",
        "end_idx",
        "generation",
        "evaluation",
        "dimensions",
        "relation",
    }
)
"""Upstream's top-level keys that the conversion reads."""

UPSTREAM_DATASETS = frozenset({"RISys-Lab/TRIG", "TRIG-bench/TRIG"})
UPSTREAM_SPLITS: Mapping[Task, str] = {
    "t2i": "text_to_image",
    "p2p": "image_editing",
    "s2p": "subject_driven",
}
DTM_TASKS: Mapping[str, Task] = {"t2i_dtm": "t2i", "p2p_dtm": "p2p", "s2p_dtm": "s2p"}
"""Upstream's task names for DTM-guided generation: the same task, with the pair passed on."""

RELATION_THRESHOLDS = ("synergy", "bottleneck")
INSIGHT_THRESHOLDS = ("synergy_density", "bottleneck_density", "dominance_ratio", "tradeoff_corr")
CORRELATIONS = ("spearman_corr", "pearson_corr", "paretoF")
REPORT_ONLY_RELATION_KEYS = ("plot", "heatmap", "tsne", "tradeoff", "quadrant_analysis")

MAX_TOML_INTEGER = 2**63 - 1
"""TOML's integers are 64-bit: a larger one is a file other TOML readers refuse."""

_WINDOWS_PATH = re.compile(r"^[A-Za-z]:[\\/]")


@dataclass(frozen=True, slots=True)
class Conversion:
    """The result of converting one upstream YAML config.

    Attributes:
        text: the TOML config, comments included.
        config: ``text`` parsed and validated (paths resolved against the output's folder).
        warnings: one line per upstream key left out or setting to check, in file order.
    """

    text: str
    config: RunConfig
    warnings: tuple[str, ...]


def load_upstream_yaml(path: Path) -> dict[str, Any]:
    """Read an upstream YAML config (anchors and ``<<`` merge keys included).

    Raises:
        ConfigError: the file is missing, no regular file (a device, a pipe), larger than
            :data:`~trig_stream.config.MAX_CONFIG_BYTES`, not YAML, or not a mapping at the top.
    """
    try:
        # Read whole, /dev/zero filled memory and a pipe with no writer waited for ever.
        text = read_settings_file(path, MAX_CONFIG_BYTES).decode("utf-8")
    except OSError as exc:  # UnfitFileError's strerror says what it is instead of a file
        raise ConfigError(f"{path}: cannot read upstream config: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        message = f"not a YAML config: byte {exc.start} is not UTF-8 text"
        raise ConfigError(f"{path}: {message}") from None
    yaml: Any = importlib.import_module("yaml")
    try:
        data = yaml.safe_load(text)
    except (yaml.YAMLError, ValueError) as exc:
        # An alias to an anchor the file never defines is the usual culprit in upstream files;
        # a number of over 4300 digits, which Python refuses to read, a rarer one.
        message = " ".join(str(exc).split())
        raise ConfigError(f"{path}: not valid YAML: {message}") from None
    except RecursionError:  # the YAML reader recurses once per level of a list or mapping
        raise ConfigError(
            f"{path}: not a usable upstream config: lists or mappings nested too deep to read "
            f"(over {MAX_NESTING} levels); a config needs a few"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: an upstream config is a mapping of keys at the top level")
    # Checked before anything is converted: such text reached the TOML, which then could
    # not be written (UTF-8 has no half characters) or named a file no system can open.
    problems = []
    for loc, why in unusable_values(data, dates=False):
        key = dotted_key(
            tuple(
                part if isinstance(part, int) and not too_long_to_write(part) else key_text(part)
                for part in loc
            )
        )
        problems.append(f"{path}: {key}: {why}" if key else f"{path}: {why}")
    if problems:
        raise ConfigError("\n".join(problems))
    return data


def convert_upstream_config(
    data: Mapping[str, Any],
    *,
    source: Path,
    root: Path,
    out_dir: Path | None,
    through_link: bool = False,
) -> Conversion:
    """Convert a parsed upstream config into the text of a trig-stream TOML config.

    Args:
        data: the YAML mapping (see :func:`load_upstream_yaml`).
        source: the YAML file, named in the TOML's header and in messages.
        root: the folder upstream's relative paths start from (its project root).
        out_dir: the folder the TOML will live in; upstream's paths are written relative to
            it, or in full when None (the TOML is printed, and may be saved anywhere).
        through_link: ``out_dir`` is None because the TOML is written through a symbolic
            link to a file in another folder (said in its header).

    Raises:
        ConfigError: the task has no counterpart, no model or folder converts to a
            generator, or the result does not validate.
    """
    converter = _Converter(
        data, source=source, root=root, out_dir=out_dir, through_link=through_link
    )
    return converter.convert()


def import_config(path: Path, *, out: Path | None = None, root: Path | None = None) -> Conversion:
    """Read an upstream YAML config and convert it (nothing is written).

    Args:
        path: the upstream YAML file.
        out: where the TOML will be written (its folder anchors relative paths; a symbolic
            link there to a file in another folder has upstream's paths written in full, so
            that it loads from both); None when it is printed: upstream's paths are then
            written in full.
        root: upstream's project root; None for the current folder.
    """
    cwd = Path.cwd()
    out_dir = None
    through_link = False
    if out is not None:
        # The loader resolves relative paths against the folder of the path it is given:
        # through a link at `out` to a file in another folder, the link's and the file's
        # folders both, so only paths in full hold from either.
        out_dir = Path(os.path.realpath(out.parent))
        if Path(os.path.realpath(out)).parent != out_dir:
            out_dir, through_link = None, True
    return convert_upstream_config(
        load_upstream_yaml(path),
        source=path,
        root=(root or cwd).resolve(),
        out_dir=out_dir,
        through_link=through_link,
    )


# -- the conversion


class _Converter:
    """One conversion: the TOML's tables as they fill, and the warnings in the order met."""

    def __init__(
        self,
        data: Mapping[str, Any],
        *,
        source: Path,
        root: Path,
        out_dir: Path | None,
        through_link: bool,
    ) -> None:
        self.data = data
        self.source = source
        self.root = root
        self.out_dir = out_dir
        self.through_link = through_link
        self.warnings: list[str] = []
        self.task: Task = "t2i"
        self.generators: list[Generator] = []
        self.judges: list[tuple[str, ConvertedJudge]] = []
        self.run: dict[str, Any] = {}
        self.dataset: dict[str, Any] = {}
        self.relation: dict[str, Any] = {}

    def warn(self, key: str, message: str) -> None:
        self.warnings.append(f"{key}: {message}")

    def convert(self) -> Conversion:
        if not self.root.is_dir():
            self.warn(
                "--root",
                f"{self.root} is not a folder: upstream's relative paths start from it all "
                "the same; check that it is the project root",
            )
        for key in self.data:
            if key not in TOP_LEVEL_KEYS:
                self._extra_top_level(key_text(key), self.data[key])
        self._run()
        self._dataset()
        self._generators()
        self._judges()
        self._limit_note()
        self._relation()
        if not self.generators:
            raise ConfigError(
                f"{self.source}: nothing to evaluate: no model of generation.models and no "
                "folder of evaluation.image_dirs converts to a generator"
                + "".join(f"\n  {w}" for w in self.warnings)
            )
        text = self._render()
        # Its problems are named by the converted TOML's keys, under the upstream file's
        # name: the TOML's lines would be those of a file that was never written.
        converted = Path(f"{self.source} (converted)")
        try:
            config = parse_config(
                tomllib.loads(text), source=converted, base=self.out_dir or Path.cwd()
            )
        except (ConfigError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(
                f"{self.source}: the converted config does not validate:\n{exc}"
            ) from None
        return Conversion(text=text, config=config, warnings=tuple(self.warnings))

    # -- top level

    def _extra_top_level(self, key: str, value: Any) -> None:
        if key == "API_KEY":
            self.warn(key, "not copied: secrets never go into a config (judges name a variable)")
        elif isinstance(value, Mapping) and "name" in value:
            self.warn(
                key,
                "left out: a metric definition; only its uses under `dimensions` "
                "(through YAML anchors) are converted",
            )
        else:
            self.warn(key, "unknown upstream key, left out")

    def _run(self) -> None:
        given = self._text("name", self.data.get("name"), "a run name")
        name = given or self.source.stem
        safe = safe_name(name)
        if safe != name:
            # Without a usable name key the file's name stands in: said as the key's own, the
            # warning read as if the key were there.
            given_by = shown(name) if given else f"the file name {shown(name)}, standing in for it,"
            self.warn("name", f"{given_by} is not a valid run name here; using {safe!r}")
        self.run["name"] = safe
        raw_task = self.data.get("task", "t2i")
        # Only text names a task; another value is shown cut short (an alias of a huge list).
        task_name = raw_task if isinstance(raw_task, str) else shown(raw_task)
        if task_name in DTM_TASKS:
            self.task = DTM_TASKS[task_name]
            self.warn(
                "task",
                f"{task_name!r} is {self.task!r} here: dtm_rewrite generators receive each "
                "sample's pair whatever the task",
            )
        else:
            try:
                self.task = normalise_task(task_name)
            except ValueError:
                raise ConfigError(
                    f"{self.source}: task: {shown(raw_task)} has no counterpart here "
                    "(t2i, p2p, s2p or sub; t2i_dtm, p2p_dtm, s2p_dtm)"
                ) from None
        self.run["task"] = self.task
        evaluation = self.data.get("evaluation")
        if isinstance(evaluation, Mapping):
            # Read first: a dtm_rewrite generator's report path is under the output folder.
            key = "evaluation.result_dir"
            result_dir = self._text(key, evaluation.get("result_dir"), "a folder")
            if result_dir is not None:
                self.run["output_dir"] = self._path(result_dir, key)

    def _dataset(self) -> None:
        prompt_path = self.data.get("prompt_path")
        dataset_name = self.data.get("dataset_name")
        split = UPSTREAM_SPLITS[self.task]
        if prompt_path is not None and not isinstance(prompt_path, str):
            # Left out, the dataset would silently become upstream's whole split.
            raise ConfigError(
                f"{self.source}: prompt_path: expected a path, got {shown(prompt_path)}: name one "
                "JSON file of prompts, or leave prompt_path out to read dataset_name"
            )
        if prompt_path and prompt_path.strip():
            self.dataset["path"] = self._path(prompt_path, "prompt_path")
            if dataset_name:
                self.warn(
                    "dataset_name",
                    "left out: prompt_path is given, and upstream reads it first",
                )
        else:
            name = self._text("dataset_name", dataset_name, "a dataset name") or "RISys-Lab/TRIG"
            folder = f"data/TRIG/{self.task}"
            self.dataset["path"] = self._path(folder, "dataset_name")
            extra = "" if name in UPSTREAM_DATASETS else f" (upstream named {shown(name)})"
            self.warn(
                "dataset_name",
                f"the {split} split is read from local parquet files{extra}: download them "
                f"with `hf download RISys-Lab/TRIG --repo-type dataset --include "
                f"'data/{split}-*' --local-dir {folder}` in {self.root}, or edit "
                "[dataset] path",
            )
        image_path = self._text("image_path", self.data.get("image_path"), "a folder")
        if image_path is not None:
            self.dataset["image_root"] = self._path(image_path, "image_path")
        if "description_path" in self.data:
            self.warn("description_path", "left out: upstream no longer uses it")
        start = self.data.get("start_idx")
        end = self.data.get("end_idx")
        if start not in (None, 0):
            self.warn(
                "start_idx",
                f"left out ({shown(start)}): samples cannot be skipped by position here; use "
                "[dataset] pairs or dimensions to select samples",
            )
            if end is not None:
                self.warn("end_idx", "left out with start_idx")
        elif end is not None:
            whole = isinstance(end, int) and not isinstance(end, bool)
            if whole and end > MAX_TOML_INTEGER:
                self.warn(
                    "end_idx",
                    f"left out: {shown(end)} is past the largest TOML integer (2**63 - 1): "
                    "every record is read, as upstream reads them",
                )
            elif whole and end >= 1:
                self.dataset["limit"] = end
            else:
                self.warn("end_idx", f"left out: {shown(end)} is not a positive whole number")

    # -- generators and judges

    def _generators(self) -> None:
        mapping = GeneratorMapping(
            task=self.task,
            output_dir=self._output_dir_for_report(),
            root=self.root,
            warn=self.warn,
            path=self._path,
        )
        mapping.add_generation(self.data.get("generation"))
        mapping.add_evaluation(self.data.get("evaluation"))
        self.generators = mapping.generators
        readers = mapping.source_readers()
        # A JSON dataset names its source images (img_id) without holding them: with no
        # folder to look them up in, every sample would be quarantined.
        if readers and self.data.get("prompt_path") and "image_root" not in self.dataset:
            self.warn(
                "image_path",
                f"absent, but {', '.join(readers)} edit(s) each sample's source image "
                f"({self.task}): add image_path (the folder of the img_id files) or set "
                "[dataset] image_root, or every sample is quarantined",
            )

    def _judges(self) -> None:
        try:
            self.judges = convert_judges(self.data.get("dimensions"), self.warn)
        except ConfigError as exc:
            raise ConfigError(f"{self.source}: {exc}") from None
        covered = {d for _, judge in self.judges for d in judge.dimensions}
        if covered != set(DIMENSIONS):
            self.dataset["dimensions"] = sorted(covered, key=DIMENSIONS.index)
            absent = [d for d in DIMENSIONS if d not in covered]
            self.warn(
                "dimensions",
                f"no metric for {', '.join(absent)}: [dataset] dimensions keeps the samples "
                "with a judged dimension and judges only those",
            )

    def _limit_note(self) -> None:
        """Say what ``end_idx`` became: [dataset] has no positions, and ``limit`` counts the
        valid samples the filters keep, so with a filter (or a record quarantined) the run
        reaches past upstream's ``end_idx`` for other records than upstream judges."""
        limit = self.dataset.get("limit")
        if limit is None:
            return
        filters = [key for key in ("pairs", "dimensions") if key in self.dataset]
        kept = f"that [dataset] {' and '.join(filters)} keeps and " if filters else ""
        self.warn(
            "end_idx",
            f"became [dataset] limit = {limit}, a count of samples, not a position: upstream "
            f"judges records 0 to {limit - 1}, the run the first {limit} records {kept}that "
            "are valid, past upstream's end where one is left out; check the samples "
            f"`trig-stream validate` lists, or cut the dataset to its first {limit} records "
            "and remove limit",
        )

    # -- relation

    def _relation(self) -> None:
        relation = self.data.get("relation")
        if relation is None:
            return
        if not isinstance(relation, Mapping):
            self.warn("relation", "left out: expected a mapping")
            return
        for key, value in relation.items():
            where = f"relation.{key_text(key)}"
            if key == "metric":
                if value in CORRELATIONS:
                    self.relation["correlation"] = value
                else:
                    self.warn(
                        where, f"left out: {shown(value)} is not one of {', '.join(CORRELATIONS)}"
                    )
            elif key == "thresholds":
                self._thresholds(value, where, RELATION_THRESHOLDS)
            elif key == "insight_thresholds":
                self._thresholds(value, where, INSIGHT_THRESHOLDS)
            elif key in ("models", "res"):
                self.warn(
                    where,
                    "left out: the run analyses its own models; `trig-stream analyze FILE` "
                    "analyses an upstream result file",
                )
            elif key in REPORT_ONLY_RELATION_KEYS:
                self.warn(
                    where,
                    "left out: the report always has the DTM, scatter grid, t-SNE map and "
                    "trade-off graph (plots extra)",
                )
            else:
                self.warn(where, "unknown or unsupported upstream key, left out")

    def _thresholds(self, value: Any, where: str, names: tuple[str, ...]) -> None:
        if not isinstance(value, Mapping):
            self.warn(where, "left out: expected a mapping")
            return
        for key, number in value.items():
            if key not in names:
                self.warn(f"{where}.{key_text(key)}", "unknown threshold, left out")
            elif isinstance(number, int | float) and not isinstance(number, bool):
                try:
                    self.relation[str(key)] = float(number)
                except OverflowError:  # an integer past a float's range
                    self.warn(f"{where}.{key}", f"left out: {shown(number)} is too large")
            else:
                self.warn(f"{where}.{key}", f"left out: {shown(number)} is not a number")

    # -- values and paths

    def _text(self, key: str, value: Any, expected: str) -> str | None:
        """An optional upstream string: None when absent or blank, and when of another
        type, which is left out with a warning (written as its text, a list or a mapping
        became a path)."""
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        if isinstance(value, str):
            return value
        self.warn(key, f"left out: expected {expected}, got {shown(value)}")
        return None

    def _path(self, value: str, key: str) -> str:
        if _WINDOWS_PATH.match(value):
            posix = PureWindowsPath(value).as_posix()
            self.warn(
                key,
                f"a Windows path, written with / as {posix}: check where it is on this machine",
            )
            return posix
        path = Path(value)
        if path.is_absolute():
            return path.as_posix()
        if self.out_dir is None:  # printed: the file's folder is not known
            return (self.root / path).as_posix()
        try:
            relative = Path(os.path.relpath(self.root / path, self.out_dir)).as_posix()
        except ValueError:  # another drive
            return (self.root / path).as_posix()
        if relative.startswith("~"):
            # Upstream opened a folder named "~"; the loader reads a leading "~" as the home
            # folder, "./~" included (pathlib drops the "./"), so only the full path holds.
            return (self.root / path).as_posix()
        return relative

    def _output_dir_for_report(self) -> str:
        output_dir = self.run.get("output_dir")
        if output_dir is None:
            return "runs"
        return str(output_dir)

    def _render(self) -> str:
        lines = [
            f"# Converted by `trig-stream import-config` from {comment(str(self.source))}",
            "# (a TRIG upstream YAML config). Relative paths are relative to this file's folder.",
        ]
        if self.through_link:
            lines.append(
                "# Written through a symbolic link to a file in another folder: upstream's "
                "paths are in full,"
            )
            lines.append("# so that it loads from either folder.")
        elif self.out_dir is None:
            lines.append("# It was printed, not written to a file: upstream's paths are in full.")
        if self.warnings:
            lines.append("#")
            lines.append(f"# Left out or to check ({len(self.warnings)}):")
            lines.extend(f"#   - {comment(w)}" for w in self.warnings)
        lines += ["", "[run]"]
        lines += assignments(
            {
                "name": self.run["name"],
                "output_dir": self.run.get("output_dir", "runs"),
                "task": self.run["task"],
            }
        )
        lines += ["", "[dataset]", *assignments(self.dataset)]
        for name, backend, options in self.generators:
            lines += ["", "[[generators]]", *assignments({"name": name, "backend": backend})]
            lines += ["[generators.options]", *assignments(options)]
        for name, judge in self.judges:
            lines += ["", "[[judges]]"]
            lines += assignments(
                {"name": name, "backend": "openai", "concurrency": 16, "scorer": "trig"}
            )
            lines.append("# upstream scored with its own TRIGScore, reproduced by scorer = trig")
            judge_options: dict[str, Any] = {
                "base_url": judge.endpoint,
                "model": judge.model,
                "top_logprobs": judge.top_logprobs,
            }
            if judge.api_key_env is not None:
                judge_options["api_key_env"] = judge.api_key_env
            lines += ["[judges.options]", *assignments(judge_options)]
        if self.relation:
            lines += ["", "[relation]", *assignments(self.relation)]
        return "\n".join(lines) + "\n"
