"""Upstream's models and image folders as trig-stream generators (``import-config``).

``generation.models`` lists upstream aliases: one with a diffusers preset becomes a
``diffusers`` generator on a GPU of its own, ``dalle3`` the ``openai_images`` generator, and
``<alias>_dtm_dim`` a ``dtm_rewrite`` generator around the alias. Each folder of
``evaluation.image_dirs`` becomes an ``image_folder`` generator, unless the run generates that
model itself.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from trig_stream.backends.generators.presets import INPUT_TASKS, PRESETS, preset_names
from trig_stream.dimensions import Task
from trig_stream.upstream_config.toml_writer import key_text, safe_name, shown

Generator = tuple[str, str, dict[str, Any]]
"""A converted generator: its name, its backend and its options table."""


class GeneratorMapping:
    """The generators of one conversion, in upstream's order.

    Args:
        task: the run's task; a model made for another task is left out.
        output_dir: the run's output folder as the TOML writes it (a ``dtm_rewrite``
            generator reads its DTM from an earlier run's report under it).
        root: the folder upstream's relative paths start from: a folder listed relative to
            it and in full is one folder.
        warn: records a warning, ``warn(key, message)``.
        path: an upstream path as the TOML writes it, ``path(value, key)``.
    """

    def __init__(
        self,
        *,
        task: Task,
        output_dir: str,
        root: Path,
        warn: Callable[[str, str], None],
        path: Callable[[str, str], str],
    ) -> None:
        self.task = task
        self.output_dir = output_dir
        self.root = root
        self.warn = warn
        self.path = path
        self.generators: list[Generator] = []
        self._devices = 0
        # The aliases converted to generators (upstream's names, not the generator names,
        # which a clash suffixes): what an image folder is compared with.
        self._generated: dict[str, str] = {}
        # The image folders converted, in full and normalised, and their generators' names.
        self._folders: dict[str, str] = {}

    def add_generation(self, generation: Any) -> None:
        """Convert upstream's ``generation`` (its ``models``); None when the key is absent."""
        if generation is None:
            return
        if not isinstance(generation, Mapping):
            self.warn("generation", "left out: expected a mapping with `models`")
            return
        for key in generation:
            if key != "models":
                self.warn(f"generation.{key_text(key)}", "unknown upstream key, left out")
        models = generation.get("models")
        if models is None:
            return
        if isinstance(models, str):
            models = [models] if models.strip() else []
        if isinstance(models, Mapping):
            # Aliases with upstream's settings for each: the generators call their presets.
            for alias, settings in models.items():
                if settings is not None:
                    self.warn(
                        f"generation.models[{key_text(alias)}]",
                        f"left out: its settings {shown(settings)}: the preset's own are "
                        "used; set a diffusers generator's options by hand",
                    )
            models = list(models)
        if not isinstance(models, list):
            self.warn("generation.models", f"left out: expected model aliases, got {shown(models)}")
            return
        for index, alias in enumerate(models):
            if isinstance(alias, str):
                self._model(alias)
            else:
                self.warn(
                    f"generation.models[{index}]", f"left out: not a model alias: {shown(alias)}"
                )

    def add_evaluation(self, evaluation: Any) -> None:
        """Convert upstream's ``evaluation`` (its ``image_dirs``); None when the key is absent."""
        if evaluation is None:
            return
        if not isinstance(evaluation, Mapping):
            self.warn("evaluation", "left out: expected a mapping with `image_dirs`")
            return
        for key, value in evaluation.items():
            if key in ("image_dirs", "image_dir"):
                dirs = [value] if isinstance(value, str) else value
                if not isinstance(dirs, list):
                    self.warn(
                        f"evaluation.{key}", f"left out: expected folders, got {shown(value)}"
                    )
                    continue
                for index, folder in enumerate(dirs):
                    if isinstance(folder, str) and folder.strip():
                        self._image_dir(folder, f"evaluation.{key}")
                    else:
                        self.warn(
                            f"evaluation.{key}[{index}]", f"left out: not a folder: {shown(folder)}"
                        )
            elif key == "result_dir":
                continue  # read with [run]
            elif key == "result_files":
                self.warn(
                    "evaluation.result_files",
                    "left out: each model's upstream-format results are written to "
                    "<run dir>/report/<model>/evaluation_result.json",
                )
            else:
                self.warn(f"evaluation.{key_text(key)}", "unknown upstream key, left out")

    def _model(self, alias: str) -> None:
        key = f"generation.models[{alias}]"
        if alias in self._generated:
            # Converted again, it was a second, identical generator on a GPU of its own.
            self.warn(
                key,
                f"left out: listed again; the generator {self._generated[alias]!r} makes its "
                "images once",
            )
            return
        if alias.endswith("_dtm_dim"):
            inner_alias = alias.removesuffix("_dtm_dim")
            inner = self._plain_model(inner_alias, key)
            if inner is None:
                return
            backend, options = inner
            report = f"{self.output_dir}/{inner_alias}/report/{inner_alias}"
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

    def source_readers(self) -> list[str]:
        """The generators that are given each sample's source image (an editing or
        subject-driven preset, also inside a ``dtm_rewrite``): those whose run looks the
        images up under ``[dataset] image_root``; an image folder reads none."""
        return [
            name for name, backend, options in self.generators if _reads_sources(backend, options)
        ]

    def _add_generator(self, alias: str, backend: str, options: dict[str, Any]) -> None:
        name = self._unique_generator_name(safe_name(alias))
        self.generators.append((name, backend, options))
        self._generated[alias] = name

    def _unique_generator_name(self, name: str) -> str:
        taken = {g[0] for g in self.generators}
        candidate, n = name, 1
        while candidate in taken:
            n += 1
            candidate = f"{name}-{n}"
        return candidate

    def _image_dir(self, folder: str, key: str) -> None:
        posix = folder.replace("\\", "/").rstrip("/")
        alias = PurePosixPath(posix).name or "images"
        name = safe_name(alias)
        generated = next(
            (made for model, made in self._generated.items() if safe_name(model) == name), None
        )
        if generated is not None:
            self.warn(
                f"{key}[{folder}]",
                f"left out: {name!r} is generated by this run (generation.models, the "
                f"generator {generated!r}) and its images are judged as they come",
            )
            return
        # Compared as written, one relative to the TOML and one in full were two folders.
        where = os.path.normpath(self.root / posix)
        same = self._folders.get(where)
        if same is not None:
            # A second generator over it (imgs, imgs-2) judged every image twice.
            self.warn(
                f"{key}[{folder}]",
                f"left out: the same folder as the generator {same!r}, listed again",
            )
            return
        unique = self._unique_generator_name(name)
        self.generators.append((unique, "image_folder", {"path": self.path(folder, key)}))
        self._folders[where] = unique


def _reads_sources(backend: str, options: Mapping[str, Any]) -> bool:
    """Whether a converted generator reads source images (as its backend's
    ``reads_source_image`` will say once built)."""
    if backend == "dtm_rewrite":
        inner = options["inner"]
        return _reads_sources(inner["backend"], inner["options"])
    if backend == "diffusers":
        return PRESETS[options["preset"]].inputs != "text"
    return False
