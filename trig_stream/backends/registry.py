"""Which backend names exist, and how to build one from its config entry.

A backend is a class with an ``Options`` pydantic model (its ``options`` table in the config)
and a ``from_config`` classmethod. Classes are named here as ``"module:Class"`` and imported
only when used, so heavy dependencies load only for the backends a run asks for. Third-party
packages add backends through the entry-point groups ``trig_stream.generators`` and
``trig_stream.judges``, or at run time with :func:`register_backend`.
"""

from __future__ import annotations

import importlib
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
    """Check a backend's ``options`` table against its model.

    Raises:
        ValueError: unknown backend.
        pydantic.ValidationError: the options do not fit the backend's model.
    """
    return backend_class(kind, name).Options.model_validate(options)


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
