"""``trig-stream import-config``: turn a TRIG upstream YAML config into a trig-stream TOML config.

Upstream drives one experiment with one YAML file: top-level ``name``, ``task``, where the
prompts come from (``dataset_name`` or a legacy ``prompt_path`` with ``image_path``), the
models to generate with (``generation.models``, upstream aliases), folders of images to judge
(``evaluation.image_dirs``), the metrics of each dimension (``dimensions.<DIM>.metrics``,
usually the ``trig_api`` VLM judge through YAML anchors), and the relation analysis
(``relation``, with its ``thresholds`` and ``insight_thresholds``).

The conversion maps what has a counterpart here:

* aliases with a diffusers preset become ``diffusers`` generators (one GPU each), ``dalle3``
  the ``openai_images`` generator, ``<alias>_dtm_dim`` a ``dtm_rewrite`` generator around the
  alias, and every image folder an ``image_folder`` generator;
* each distinct ``trig_api`` metric (model, endpoint, top logprobs) becomes an ``openai``
  judge with the upstream-exact scorer; an API key is never copied, only the name of the
  variable to export it in;
* the prompt source, the result folder and the DTM thresholds map to ``[dataset]``,
  ``[run] output_dir`` and ``[relation]``.

Everything else is reported, never dropped in silence: each key left out, and each setting
that needs a look before running, is a warning line on the terminal and a comment at the top
of the TOML. The TOML is validated like any config before it is returned.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import re
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from rich.console import Console
from rich.markup import escape

from trig_stream.backends.generators.presets import INPUT_TASKS, PRESETS, preset_names
from trig_stream.config import SAFE_NAME, RunConfig, parse_config
from trig_stream.dimensions import DIMENSIONS, Dimension, Task, normalise_task
from trig_stream.errors import ConfigError

EXIT_OK = 0

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

JUDGE_METRIC = "trig_api"
"""The upstream metric that is a VLM judge over the OpenAI protocol (the TRIGScore)."""
UPSTREAM_ENDPOINT = "http://localhost:8000/v1/"
"""Upstream's endpoint when a ``trig_api`` metric names none."""
UPSTREAM_TOP_LOGPROBS = 5
MAX_TOP_LOGPROBS = 20
KEYLESS = frozenset({"", "EMPTY", "none", "None"})
"""API_KEY values upstream uses for servers without keys."""
DEFAULT_JUDGE_MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"

RELATION_THRESHOLDS = ("synergy", "bottleneck")
INSIGHT_THRESHOLDS = ("synergy_density", "bottleneck_density", "dominance_ratio", "tradeoff_corr")
CORRELATIONS = ("spearman_corr", "pearson_corr", "paretoF")
REPORT_ONLY_RELATION_KEYS = ("plot", "heatmap", "tsne", "tradeoff", "quadrant_analysis")

_DIMENSION_CODES: Mapping[str, Dimension] = {code: code for code in DIMENSIONS}
_WINDOWS_PATH = re.compile(r"^[A-Za-z]:[\\/]")
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


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
        ConfigError: the file is missing, not YAML, or not a mapping at the top.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read upstream config: {exc.strerror or exc}") from None
    yaml: Any = importlib.import_module("yaml")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        # An alias to an anchor the file never defines is the usual culprit in upstream files.
        message = " ".join(str(exc).split())
        raise ConfigError(f"{path}: not valid YAML: {message}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: an upstream config is a mapping of keys at the top level")
    return data


def convert_upstream_config(
    data: Mapping[str, Any], *, source: Path, root: Path, out_dir: Path
) -> Conversion:
    """Convert a parsed upstream config into the text of a trig-stream TOML config.

    Args:
        data: the YAML mapping (see :func:`load_upstream_yaml`).
        source: the YAML file, named in the TOML's header and in messages.
        root: the folder upstream's relative paths start from (its project root).
        out_dir: the folder the TOML will live in; paths are written relative to it.

    Raises:
        ConfigError: the task has no counterpart, no model or folder converts to a
            generator, or the result does not validate.
    """
    return _Converter(data, source=source, root=root, out_dir=out_dir).convert()


def import_config(path: Path, *, out: Path | None = None, root: Path | None = None) -> Conversion:
    """Read an upstream YAML config and convert it (nothing is written).

    Args:
        path: the upstream YAML file.
        out: where the TOML will be written (its folder anchors relative paths); None for the
            current folder.
        root: upstream's project root; None for the current folder.
    """
    cwd = Path.cwd()
    out_dir = (out.parent if out is not None else cwd).resolve()
    return convert_upstream_config(
        load_upstream_yaml(path), source=path, root=(root or cwd).resolve(), out_dir=out_dir
    )


# -- the conversion


@dataclass(slots=True)
class _Judge:
    model: str
    endpoint: str
    top_logprobs: int
    api_key_env: str | None
    dimensions: list[Dimension] = field(default_factory=list)


class _Converter:
    def __init__(self, data: Mapping[str, Any], *, source: Path, root: Path, out_dir: Path) -> None:
        self.data = data
        self.source = source
        self.root = root
        self.out_dir = out_dir
        self.warnings: list[str] = []
        self.task: Task = "t2i"
        self.generators: list[tuple[str, str, dict[str, Any]]] = []
        self.judges: list[tuple[str, _Judge]] = []
        self.run: dict[str, Any] = {}
        self.dataset: dict[str, Any] = {}
        self.relation: dict[str, Any] = {}
        self._devices = 0

    def warn(self, key: str, message: str) -> None:
        self.warnings.append(f"{key}: {message}")

    def convert(self) -> Conversion:
        for key in self.data:
            if key not in TOP_LEVEL_KEYS:
                self._extra_top_level(str(key), self.data[key])
        self._run()
        self._dataset()
        self._generation()
        self._evaluation()
        self._judges()
        self._relation()
        if not self.generators:
            raise ConfigError(
                f"{self.source}: nothing to evaluate: no model of generation.models and no "
                "folder of evaluation.image_dirs converts to a generator"
                + "".join(f"\n  {w}" for w in self.warnings)
            )
        text = self._render()
        virtual = self.out_dir / "imported.toml"
        try:
            config = parse_config(tomllib.loads(text), source=virtual, text=text)
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
        raw_name = self.data.get("name")
        name = str(raw_name) if raw_name not in (None, "") else self.source.stem
        safe = _safe_name(name)
        if safe != name:
            self.warn("name", f"{name!r} is not a valid run name here; using {safe!r}")
        self.run["name"] = safe
        raw_task = self.data.get("task", "t2i")
        task_name = str(raw_task)
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
                    f"{self.source}: task: {task_name!r} has no counterpart here "
                    "(t2i, p2p, s2p or sub; t2i_dtm, p2p_dtm, s2p_dtm)"
                ) from None
        self.run["task"] = self.task
        evaluation = self.data.get("evaluation")
        if isinstance(evaluation, Mapping) and evaluation.get("result_dir"):
            # Read first: a dtm_rewrite generator's report path is under the output folder.
            key = "evaluation.result_dir"
            self.run["output_dir"] = self._path(str(evaluation["result_dir"]), key)

    def _dataset(self) -> None:
        prompt_path = self.data.get("prompt_path")
        dataset_name = self.data.get("dataset_name")
        split = UPSTREAM_SPLITS[self.task]
        if prompt_path:
            self.dataset["path"] = self._path(str(prompt_path), "prompt_path")
            if dataset_name:
                self.warn(
                    "dataset_name",
                    "left out: prompt_path is given, and upstream reads it first",
                )
        else:
            name = str(dataset_name or "RISys-Lab/TRIG")
            folder = f"data/TRIG/{self.task}"
            self.dataset["path"] = self._path(folder, "dataset_name")
            extra = "" if name in UPSTREAM_DATASETS else f" (upstream named {name!r})"
            self.warn(
                "dataset_name",
                f"the {split} split is read from local parquet files{extra}: download them "
                f"with `hf download RISys-Lab/TRIG --repo-type dataset --include "
                f"'data/{split}-*' --local-dir {folder}` in {self.root}, or edit "
                "[dataset] path",
            )
        image_path = self.data.get("image_path")
        if image_path:
            self.dataset["image_root"] = self._path(str(image_path), "image_path")
        if "description_path" in self.data:
            self.warn("description_path", "left out: upstream no longer uses it")
        start = self.data.get("start_idx")
        end = self.data.get("end_idx")
        if start not in (None, 0):
            self.warn(
                "start_idx",
                f"left out ({start!r}): samples cannot be skipped by position here; use "
                "[dataset] pairs or dimensions to select samples",
            )
            if end is not None:
                self.warn("end_idx", "left out with start_idx")
        elif end is not None:
            if isinstance(end, int) and not isinstance(end, bool) and end >= 1:
                self.dataset["limit"] = end
            else:
                self.warn("end_idx", f"left out: {end!r} is not a positive whole number")

    # -- generators

    def _generation(self) -> None:
        generation = self.data.get("generation")
        if generation is None:
            return
        if not isinstance(generation, Mapping):
            self.warn("generation", "left out: expected a mapping with `models`")
            return
        for key in generation:
            if key != "models":
                self.warn(f"generation.{key}", "unknown upstream key, left out")
        models = generation.get("models") or []
        if isinstance(models, str):
            models = [models]
        for alias in models:
            self._model(str(alias))

    def _model(self, alias: str) -> None:
        key = f"generation.models[{alias}]"
        if alias.endswith("_dtm_dim"):
            inner_alias = alias.removesuffix("_dtm_dim")
            inner = self._plain_model(inner_alias, key)
            if inner is None:
                return
            backend, options = inner
            report = f"{self._output_dir_for_report()}/{inner_alias}/report/{inner_alias}"
            self._add_generator(
                alias,
                "dtm_rewrite",
                {
                    "inner": {"backend": backend, "options": options},
                    "model": "gpt-4o",
                    "api_key_env": "OPENAI_API_KEY",
                    "report": f"{report}/relationship_codes.csv",
                },
            )
            self.warn(
                key,
                f"dtm_rewrite around {inner_alias!r}: its DTM is read from an earlier run "
                f"of {inner_alias!r} (options.report; or give options.relations), and "
                "prompts are rewritten by options.model at options.base_url (OpenAI by "
                "default): check all three",
            )
            return
        if alias.endswith("_dtm"):
            self.warn(key, "left out: upstream's DTM-tuned models have no counterpart here")
            return
        converted = self._plain_model(alias, key)
        if converted is not None:
            self._add_generator(alias, *converted)

    def _plain_model(self, alias: str, key: str) -> tuple[str, dict[str, Any]] | None:
        if alias == "dalle3":
            if self.task != "t2i":
                self.warn(key, f"left out: dalle3 makes t2i images, the task is {self.task}")
                return None
            self.warn(key, "openai_images (dall-e-3): export the key as OPENAI_API_KEY")
            return "openai_images", {"model": "dall-e-3"}
        preset = PRESETS.get(alias)
        if preset is None:
            self.warn(
                key,
                "left out: no diffusers preset for this upstream model (known: "
                f"{', '.join(preset_names())}, dalle3, and <preset>_dtm_dim); a diffusers "
                "generator with pipeline and checkpoint, or an image_folder of its images, "
                "can stand in",
            )
            return None
        preset_task = INPUT_TASKS[preset.inputs]
        if preset_task != self.task:
            self.warn(key, f"left out: a {preset_task} model, the task is {self.task}")
            return None
        device = f"cuda:{self._devices}"
        self._devices += 1
        return "diffusers", {"preset": alias, "devices": [device]}

    def _add_generator(self, alias: str, backend: str, options: dict[str, Any]) -> None:
        name = self._unique_generator_name(_safe_name(alias))
        self.generators.append((name, backend, options))

    def _unique_generator_name(self, name: str) -> str:
        taken = {g[0] for g in self.generators}
        candidate, n = name, 1
        while candidate in taken:
            n += 1
            candidate = f"{name}-{n}"
        return candidate

    def _evaluation(self) -> None:
        evaluation = self.data.get("evaluation")
        if evaluation is None:
            return
        if not isinstance(evaluation, Mapping):
            self.warn("evaluation", "left out: expected a mapping with `image_dirs`")
            return
        for key, value in evaluation.items():
            if key in ("image_dirs", "image_dir"):
                dirs = [value] if isinstance(value, str) else list(value or [])
                for folder in dirs:
                    self._image_dir(str(folder), f"evaluation.{key}")
            elif key == "result_dir":
                continue  # read with [run]
            elif key == "result_files":
                self.warn(
                    "evaluation.result_files",
                    "left out: each model's upstream-format results are written to "
                    "<run dir>/report/<model>/evaluation_result.json",
                )
            else:
                self.warn(f"evaluation.{key}", "unknown upstream key, left out")

    def _image_dir(self, folder: str, key: str) -> None:
        posix = folder.replace("\\", "/").rstrip("/")
        alias = PurePosixPath(posix).name or "images"
        name = _safe_name(alias)
        generated = {g[0] for g in self.generators if g[1] != "image_folder"}
        if name in generated:
            self.warn(
                f"{key}[{folder}]",
                f"left out: {name!r} is generated by this run (generation.models) and its "
                "images are judged as they come",
            )
            return
        path = self._path(folder, key)
        self.generators.append((self._unique_generator_name(name), "image_folder", {"path": path}))

    # -- judges

    def _judges(self) -> None:
        dimensions = self.data.get("dimensions")
        found: dict[tuple[str, str, int, str | None], _Judge] = {}
        if isinstance(dimensions, Mapping):
            for dim, spec in dimensions.items():
                self._dimension(str(dim), spec, found)
        elif dimensions is not None:
            self.warn("dimensions", "left out: expected a mapping of dimension codes")
        if not found:
            self.warn(
                "dimensions",
                f"no {JUDGE_METRIC} metric to convert: wrote an openai judge for "
                f"{DEFAULT_JUDGE_MODEL} at {UPSTREAM_ENDPOINT}; check [[judges]]",
            )
            found[("", "", 0, None)] = _Judge(
                model=DEFAULT_JUDGE_MODEL,
                endpoint=UPSTREAM_ENDPOINT,
                top_logprobs=MAX_TOP_LOGPROBS,
                api_key_env=None,
                dimensions=list(DIMENSIONS),
            )
        judges = list(found.values())
        covered = {d for judge in judges for d in judge.dimensions}
        for judge in judges:
            name = "trigscore" if len(judges) == 1 else _safe_name(f"trigscore-{judge.model}")
            taken = {n for n, _ in self.judges}
            unique, n = name, 1
            while unique in taken:
                n += 1
                unique = f"{name}-{n}"
            self.judges.append((unique, judge))
            missing = sorted(covered - set(judge.dimensions), key=DIMENSIONS.index)
            if missing:
                self.warn(
                    f"dimensions ({judge.model})",
                    f"upstream asks it only about {', '.join(judge.dimensions)}; here every "
                    f"judge scores every judged dimension, so also {', '.join(missing)}",
                )
        if covered != set(DIMENSIONS):
            self.dataset["dimensions"] = sorted(covered, key=DIMENSIONS.index)
            absent = [d for d in DIMENSIONS if d not in covered]
            self.warn(
                "dimensions",
                f"no metric for {', '.join(absent)}: [dataset] dimensions keeps the samples "
                "with a judged dimension and judges only those",
            )

    def _dimension(
        self, dim: str, spec: Any, found: dict[tuple[str, str, int, str | None], _Judge]
    ) -> None:
        key = f"dimensions.{dim}"
        if dim not in DIMENSIONS:
            self.warn(key, "left out: not one of TRIG's ten dimensions")
            return
        if not isinstance(spec, Mapping) or "metrics" not in spec:
            self.warn(key, "left out: no `metrics` list (an older upstream layout)")
            return
        for extra in spec:
            if extra != "metrics":
                self.warn(f"{key}.{extra}", "unknown upstream key, left out")
        metrics = spec["metrics"] or []
        if not isinstance(metrics, list):
            metrics = [metrics]
        for index, metric in enumerate(metrics):
            where = f"{key}.metrics[{index}]"
            if isinstance(metric, str):
                metric_name, params = metric, {}
            elif isinstance(metric, Mapping):
                metric_name = str(metric.get("name", ""))
                params = {str(k): v for k, v in metric.items() if k != "name"}
            else:
                self.warn(where, f"left out: {metric!r} is not a metric")
                continue
            if metric_name != JUDGE_METRIC:
                self.warn(
                    where,
                    f"left out: metric {metric_name!r} has no counterpart here (only "
                    f"{JUDGE_METRIC}, the VLM judge, converts)",
                )
                continue
            judge = self._judge_from(params, where)
            ident = (judge.model, judge.endpoint, judge.top_logprobs, judge.api_key_env)
            target = found.setdefault(ident, judge)
            code = _DIMENSION_CODES[dim]
            if code not in target.dimensions:
                target.dimensions.append(code)

    def _judge_from(self, params: Mapping[str, Any], where: str) -> _Judge:
        model = str(params.get("model_name") or "")
        if not model or model == "None":
            model = DEFAULT_JUDGE_MODEL
            self.warn(f"{where}.model_name", f"missing: using {DEFAULT_JUDGE_MODEL!r}")
        endpoint = str(params.get("endpoint") or UPSTREAM_ENDPOINT)
        top = params.get("top_logprobs", UPSTREAM_TOP_LOGPROBS)
        if not isinstance(top, int) or isinstance(top, bool) or top < 1:
            self.warn(f"{where}.top_logprobs", f"{top!r} is not a count: using 5")
            top = UPSTREAM_TOP_LOGPROBS
        elif top > MAX_TOP_LOGPROBS:
            self.warn(f"{where}.top_logprobs", f"{top} is above {MAX_TOP_LOGPROBS}: using 20")
            top = MAX_TOP_LOGPROBS
        api_key_env: str | None = None
        key = params.get("API_KEY")
        if key is not None and str(key) not in KEYLESS:
            api_key_env = "OPENAI_API_KEY"
            self.warn(
                f"{where}.API_KEY",
                "not copied: export the key as OPENAI_API_KEY (options.api_key_env)",
            )
        for extra in params:
            if extra not in ("model_name", "endpoint", "top_logprobs", "API_KEY"):
                self.warn(f"{where}.{extra}", "unknown trig_api parameter, left out")
        return _Judge(model=model, endpoint=endpoint, top_logprobs=top, api_key_env=api_key_env)

    # -- relation

    def _relation(self) -> None:
        relation = self.data.get("relation")
        if relation is None:
            return
        if not isinstance(relation, Mapping):
            self.warn("relation", "left out: expected a mapping")
            return
        for key, value in relation.items():
            where = f"relation.{key}"
            if key == "metric":
                if value in CORRELATIONS:
                    self.relation["correlation"] = value
                else:
                    self.warn(where, f"left out: {value!r} is not one of {', '.join(CORRELATIONS)}")
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
                self.warn(f"{where}.{key}", "unknown threshold, left out")
            elif isinstance(number, int | float) and not isinstance(number, bool):
                self.relation[str(key)] = float(number)
            else:
                self.warn(f"{where}.{key}", f"left out: {number!r} is not a number")

    # -- paths and output

    def _path(self, value: str, key: str) -> str:
        if _WINDOWS_PATH.match(value):
            self.warn(key, f"a Windows path, written as it is: {value}")
            return PureWindowsPath(value).as_posix()
        path = Path(value)
        if path.is_absolute():
            return path.as_posix()
        try:
            return Path(os.path.relpath(self.root / path, self.out_dir)).as_posix()
        except ValueError:  # another drive
            return (self.root / path).as_posix()

    def _output_dir_for_report(self) -> str:
        output_dir = self.run.get("output_dir")
        if output_dir is None:
            return "runs"
        return str(output_dir)

    def _render(self) -> str:
        lines = [
            f"# Converted by `trig-stream import-config` from {_comment(str(self.source))}",
            "# (a TRIG upstream YAML config). Relative paths are relative to this file's folder.",
        ]
        if self.warnings:
            lines.append("#")
            lines.append(f"# Left out or to check ({len(self.warnings)}):")
            lines.extend(f"#   - {_comment(w)}" for w in self.warnings)
        lines += ["", "[run]"]
        lines += _assignments(
            {
                "name": self.run["name"],
                "output_dir": self.run.get("output_dir", "runs"),
                "task": self.run["task"],
            }
        )
        lines += ["", "[dataset]", *_assignments(self.dataset)]
        for name, backend, options in self.generators:
            lines += ["", "[[generators]]", *_assignments({"name": name, "backend": backend})]
            lines += ["[generators.options]", *_assignments(options)]
        for name, judge in self.judges:
            lines += ["", "[[judges]]"]
            lines += _assignments(
                {"name": name, "backend": "openai", "concurrency": 16, "scorer": "trig"}
            )
            lines.append("# upstream scored with its own TRIGScore, reproduced by scorer = trig")
            judge_options: dict[str, Any] = {
                "base_url": judge.endpoint.rstrip("/"),
                "model": judge.model,
                "top_logprobs": judge.top_logprobs,
            }
            if judge.api_key_env is not None:
                judge_options["api_key_env"] = judge.api_key_env
            lines += ["[judges.options]", *_assignments(judge_options)]
        if self.relation:
            lines += ["", "[relation]", *_assignments(self.relation)]
        return "\n".join(lines) + "\n"


def _safe_name(name: str) -> str:
    if SAFE_NAME.match(name):
        return name
    cleaned = _UNSAFE_NAME_CHARS.sub("-", name).strip("-._")[:128]
    return cleaned if cleaned and SAFE_NAME.match(cleaned) else "imported"


def _comment(text: str) -> str:
    return " ".join(text.split())


def _assignments(table: Mapping[str, Any]) -> list[str]:
    return [f"{_key(key)} = {_value(value)}" for key, value in table.items()]


def _key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key, ensure_ascii=False)


def _value(value: Any) -> str:
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
        # JSON's escapes are TOML's, except that TOML also forbids a raw DEL.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, Mapping):
        if not value:
            return "{}"
        return "{ " + ", ".join(f"{_key(str(k))} = {_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


# -- the command


def add_import_config_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``import-config`` to the ``trig-stream`` command's subparsers.

    Args:
        subparsers: what ``ArgumentParser.add_subparsers`` returned.

    Returns:
        The command's parser (its handler is set as the ``handler`` default).
    """
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "import-config",
        help="convert a TRIG upstream YAML config into a trig-stream TOML config",
        description=(
            "Convert a TRIG upstream YAML config (models, image_dirs, trig_api judges, "
            "dataset, relation thresholds) into a trig-stream TOML config. Every upstream key "
            "left out is named in a warning and in a comment at the top of the TOML."
        ),
    )
    parser.add_argument("yaml", type=Path, metavar="UPSTREAM_YAML")
    parser.add_argument(
        "-o", "--out", type=Path, help="write the TOML here (default: standard output)"
    )
    parser.add_argument(
        "--root",
        type=Path,
        help="the folder upstream's relative paths start from, its project root "
        "(default: the current folder)",
    )
    parser.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    parser.set_defaults(handler=run_import_config)
    return parser


def run_import_config(args: argparse.Namespace, console: Console) -> int:
    """Handle ``trig-stream import-config``.

    Raises:
        ConfigError: unreadable or unconvertible input, or an output file that exists.
    """
    out: Path | None = args.out
    if out is not None and out.exists() and not args.force:
        raise ConfigError(f"{out}: exists; pass --force to overwrite it")
    conversion = import_config(args.yaml, out=out, root=args.root)
    for line in conversion.warnings:
        console.print(f"[yellow]warning:[/] {escape(line)}", highlight=False)
    if out is None:
        sys.stdout.write(conversion.text)
        sys.stdout.flush()
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(conversion.text, encoding="utf-8")
        console.print(
            f"wrote {escape(str(out))}: {len(conversion.config.generators)} model(s), "
            f"{len(conversion.config.judges)} judge(s), {len(conversion.warnings)} warning(s)",
            highlight=False,
        )
    return EXIT_OK
