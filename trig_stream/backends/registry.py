"""Which backend names exist, and how to build one from its config entry.

A backend is a class with an ``Options`` pydantic model (its ``options`` table in the config)
and a ``from_config`` classmethod. Classes are named here as ``"module:Class"`` and imported
only when used, so heavy dependencies load only for the backends a run asks for. Third-party
packages add backends through the entry-point groups ``trig_stream.generators`` and
``trig_stream.judges``, or at run time with :func:`register_backend`.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeAlias, cast

from pydantic import BaseModel

if TYPE_CHECKING:
    from trig_stream.backends.base import Generator, Judge
    from trig_stream.config import GeneratorConfig, JudgeConfig, RunConfig

Kind: TypeAlias = Literal["generators", "judges"]

_BUILTIN: dict[Kind, dict[str, str]] = {
    "generators": {
        "synthetic": "trig_stream.testing.synthetic:SyntheticGenerator",
        "diffusers": "trig_stream.backends.generators.diffusers_generator:DiffusersGenerator",
        "image_folder": "trig_stream.backends.generators.image_folder:ImageFolderGenerator",
        "openai_images": "trig_stream.backends.generators.openai_images:OpenAIImagesGenerator",
        "dtm_rewrite": "trig_stream.backends.generators.dtm_rewrite:DTMRewriteGenerator",
    },
    "judges": {
        "fake": "trig_stream.testing.fake_judge:FakeJudge",
        "openai": "trig_stream.backends.judges.openai_judge:OpenAIJudge",
        "transformers": "trig_stream.backends.judges.transformers_judge:TransformersJudge",
        "metric": "trig_stream.backends.judges.metric_judge:MetricJudge",
    },
}
_REGISTERED: dict[Kind, dict[str, object]] = {"generators": {}, "judges": {}}


class BackendClass(Protocol):
    Options: type[BaseModel]

    @classmethod
    def from_config(cls, entry: Any, options: Any, config: RunConfig) -> Any: ...


def register_backend(kind: Kind, name: str, backend: type) -> None:
    """Make ``backend`` available under ``name`` in ``[[generators]]`` or ``[[judges]]``."""
    _REGISTERED[kind][name] = backend


def backend_names(kind: Kind) -> list[str]:
    """Every backend name known for ``kind``, built-in, registered and from entry points."""
    names = set(_BUILTIN[kind]) | set(_REGISTERED[kind])
    names |= {ep.name for ep in entry_points(group=f"trig_stream.{kind}")}
    return sorted(names)


def backend_class(kind: Kind, name: str) -> BackendClass:
    """Import and return the class of a backend.

    Raises:
        ValueError: no backend has that name.
    """
    if name in _REGISTERED[kind]:
        return cast("BackendClass", _REGISTERED[kind][name])
    target = _BUILTIN[kind].get(name)
    if target is not None:
        module_name, _, attr = target.partition(":")
        return cast("BackendClass", getattr(importlib.import_module(module_name), attr))
    for ep in entry_points(group=f"trig_stream.{kind}", name=name):
        return cast("BackendClass", ep.load())
    known = ", ".join(backend_names(kind))
    raise ValueError(f"unknown backend {name!r}; known {kind} backends: {known}")


def validate_backend_options(kind: Kind, name: str, options: dict[str, Any]) -> BaseModel:
    """Check a backend's ``options`` table against its model, as a config file gives it
    (:func:`~trig_stream.config.validate_table`: a value of another type is refused).

    Raises:
        ValueError: unknown backend.
        pydantic.ValidationError: the options do not fit the backend's model.
    """
    from trig_stream.config import validate_table

    return validate_table(backend_class(kind, name).Options, options)


def build_generator(entry: GeneratorConfig, config: RunConfig) -> Generator:
    """Build the generator a ``[[generators]]`` entry describes (nothing is loaded yet)."""
    cls = backend_class("generators", entry.backend)
    options = cls.Options.model_validate(entry.options)
    return cast("Generator", cls.from_config(entry, options, config))


def build_judge(entry: JudgeConfig, config: RunConfig) -> Judge:
    """Build the judge a ``[[judges]]`` entry describes (nothing is connected yet)."""
    cls = backend_class("judges", entry.backend)
    options = cls.Options.model_validate(entry.options)
    return cast("Judge", cls.from_config(entry, options, config))


def check_backends(generators: Sequence[Generator], judges: Sequence[Judge]) -> None:
    """Check backend instances given to the engine as the config checks its own entries.

    Raises:
        ConfigError: none of a kind, a name that is no safe file name, is used twice or (a
            generator's) names a file of the report, or
            a count (workers, batch size, concurrency) under 1.
    """
    from trig_stream.errors import ConfigError
    from trig_stream.records import is_reserved_model_name, is_safe_name

    for kind, backends in (("generator", generators), ("judge", judges)):
        if not backends:
            raise ConfigError(
                f"no {kind}: give at least one (or None, to build them from the config)"
            )
        seen: set[str] = set()
        for backend in backends:
            if not isinstance(backend.name, str) or not is_safe_name(backend.name):
                raise ConfigError(
                    f"{kind} name {backend.name!r} is not a safe file name (it names folders of "
                    "the run directory): letters, digits, '.', '_' and '-', without '..'"
                )
            if kind == "generator" and is_reserved_model_name(backend.name):
                raise ConfigError(
                    f"generator name {backend.name!r} names the report's comparison of the "
                    "models, beside their folders: give the model another name"
                )
            if backend.name in seen:
                raise ConfigError(f"{kind} name {backend.name!r} is used twice")
            seen.add(backend.name)
    counts = [(g.name, "workers", g.workers) for g in generators]
    counts += [(g.name, "batch_size", g.batch_size) for g in generators]
    counts += [(j.name, "concurrency", j.concurrency) for j in judges]
    for name, what, value in counts:
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name!r}: {what} must be at least 1, not {value!r}")
