"""Which backend names exist, and how to build one from its config entry.

A backend is a class with an ``Options`` pydantic model (its ``options`` table in the config)
and a ``from_config`` classmethod. Classes are named here as ``"module:Class"`` and imported
only when used, so heavy dependencies load only for the backends a run asks for. Third-party
packages add backends through the entry-point groups ``trig_stream.generators`` and
``trig_stream.judges``, or at run time with :func:`register_backend`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from functools import partial
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol, TypeAlias, cast

from pydantic import BaseModel

from trig_stream.backends.plugins import (
    Found,
    OptionsModelError,
    check_concrete,
    checked_subclass,
    find_plugin,
    plugin_names,
    validate_plugin_options,
)

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from trig_stream.backends.base import Generator, Judge
    from trig_stream.config import GeneratorConfig, JudgeConfig, RunConfig

Kind: TypeAlias = Literal["generators", "judges"]

_BUILTIN: Final[dict[Kind, dict[str, str]]] = {
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
_REGISTERED: dict[Kind, dict[str, BackendClass]] = {"generators": {}, "judges": {}}


class BackendClass(Protocol):
    Options: type[BaseModel]

    @classmethod
    def from_config(cls, entry: Any, options: Any, config: RunConfig) -> Any: ...


def register_backend(kind: Kind, name: str, backend: type) -> None:
    """Make ``backend`` available under ``name`` in ``[[generators]]`` or ``[[judges]]`` (it
    replaces any backend of that name).

    Raises:
        ValueError: ``kind`` is neither ``"generators"`` nor ``"judges"``.
        TypeError: ``backend`` is no class that can be used: not a subclass of
            :class:`~trig_stream.backends.base.Generator` (or ``Judge``), no ``Options``
            pydantic model, no ``from_config``, abstract, or a method the engine calls in
            a worker thread defined as ``async def``.
    """
    if kind not in _BUILTIN:
        raise ValueError(f"kind is 'generators' or 'judges', not {kind!r}")
    _REGISTERED[kind][name] = _checked(kind, name, backend)


def backend_names(kind: Kind) -> list[str]:
    """Every backend name known for ``kind``, built-in, registered and from entry points."""
    return plugin_names(f"trig_stream.{kind}", _BUILTIN[kind], _REGISTERED[kind])


def backend_name_of(kind: Kind, backend: object) -> str | None:
    """The name a config gives the class of ``backend`` (an instance) in ``kind``: one
    registered at run time or built in; None for another class (entry points are not
    imported to find out)."""
    cls = type(backend)
    for name, registered in _REGISTERED[kind].items():
        if cast(object, registered) is cls:
            return name
    where = f"{cls.__module__}:{cls.__qualname__}"
    return next((name for name, target in _BUILTIN[kind].items() if target == where), None)


def backend_class(kind: Kind, name: str) -> BackendClass:
    """Import and return the class of a backend, checked.

    Names registered at run time come first, then built-in names, then entry points.

    Raises:
        ValueError: no backend has that name (the message lists the known ones), or a third
            party's cannot be used: its entry point cannot be imported, or it is no class that
            can be used (see :func:`register_backend`); the message names the entry point,
            its distribution and the cause.
    """
    return _find(kind, name).cls


def _find(kind: Kind, name: str) -> Found[BackendClass]:
    from trig_stream.errors import TrigStreamError

    try:
        found = find_plugin(
            name,
            what=_WHAT[kind],
            group=f"trig_stream.{kind}",
            builtin=_BUILTIN[kind],
            registered=_REGISTERED[kind],
            check=partial(_checked, kind, name),
        )
    except (ImportError, TypeError) as exc:
        if isinstance(exc, TrigStreamError):  # a missing extra: its own message and exit code
            raise
        raise ValueError(str(exc)) from None  # a config's problem, on its `backend` line
    if found is None:
        known = ", ".join(backend_names(kind))
        raise ValueError(f"unknown backend {name!r}; known {kind} backends: {known}")
    return found


_WHAT: Final[dict[Kind, str]] = {"generators": "generator backend", "judges": "judge backend"}


def _base(kind: Kind) -> type[Generator | Judge]:
    """The class every backend of ``kind`` subclasses."""
    from trig_stream.backends.base import Generator, Judge

    return Generator if kind == "generators" else Judge


def _checked(kind: Kind, name: str, obj: object, where: str = "") -> BackendClass:
    base = _base(kind)
    described = f"{_WHAT[kind]} {name!r}{where}"
    cls = checked_subclass(described, obj, base, f"{base.__name__} ({base.__module__})")
    options = getattr(cls, "Options", None)
    if options is None:
        raise TypeError(
            f"{described} is {cls.__name__}, which has no Options: give the class an "
            "`Options` attribute, the pydantic model of its `options` table"
        )
    if not (isinstance(options, type) and issubclass(options, BaseModel)):
        raise TypeError(
            f"{described} is {cls.__name__}, whose Options is {options!r}, not a pydantic "
            "model: make it a subclass of pydantic.BaseModel, the model of its `options` table"
        )
    if not callable(getattr(cls, "from_config", None)):
        raise TypeError(
            f"{described} is {cls.__name__}, which has no from_config: give the class a "
            "`from_config(entry, options, config)` classmethod that returns an instance"
        )
    check_concrete(described, cls)
    # Refused here too, not only on the instance, so that the message names the entry point
    # and distribution that declare the class.
    hooks = _GENERATOR_BLOCKING_HOOKS if kind == "generators" else _JUDGE_BLOCKING_HOOKS
    refuse_async_hooks(described, cls, hooks)
    if kind == "judges" and not is_coroutine_function(getattr(cls, "judge", None)):
        # Refused on the instance too; here the message names the entry point.
        raise TypeError(
            f"{described} is {cls.__name__}, whose judge() is no coroutine function, and the "
            "engine awaits it: define it as `async def judge(self, request)`"
        )
    return cast("BackendClass", cls)


def validate_backend_options(kind: Kind, name: str, options: dict[str, Any]) -> BaseModel:
    """Check a backend's ``options`` table against its model, as a config file gives it
    (:func:`~trig_stream.config_values.validate_table`: a value of another type is refused).

    Raises:
        ValueError: unknown backend, or one that cannot be used (see :func:`backend_class`).
        pydantic.ValidationError: the options do not fit the backend's model (a third
            party's: a key that is no field of it too, unless it takes any, ``extra="allow"``).
        OptionsModelError: a third party's model raised something else than a validation
            error (a validator's ``RuntimeError``).
    """
    from trig_stream.config_values import validate_table

    found = _find(kind, name)
    if found.builtin:
        return validate_table(found.cls.Options, options)
    return validate_plugin_options(found.cls.Options, options)


def build_generator(entry: GeneratorConfig, config: RunConfig) -> Generator:
    """Build the generator a ``[[generators]]`` entry describes (nothing is loaded yet).

    Raises:
        ConfigError: its backend cannot be used, or a third party's cannot be made (its
            ``from_config`` or ``__init__`` raised, or returned no generator).
    """
    return cast("Generator", _build("generators", entry, config))


def build_judge(entry: JudgeConfig, config: RunConfig) -> Judge:
    """Build the judge a ``[[judges]]`` entry describes (nothing is connected yet).

    Raises:
        ConfigError: its backend cannot be used, or a third party's cannot be made (its
            ``from_config`` or ``__init__`` raised, or returned no judge).
    """
    return cast("Judge", _build("judges", entry, config))


def _build(kind: Kind, entry: GeneratorConfig | JudgeConfig, config: RunConfig) -> object:
    from trig_stream.errors import ConfigError, TrigStreamError
    from trig_stream.pipeline import describe_error

    described = f"{kind[:-1]} {entry.name!r}"
    try:
        found = _find(kind, entry.backend)
    except ValueError as exc:
        raise ConfigError(f"{described}: {exc}") from None
    registered = " (registered with register_backend)" if not found.builtin else ""
    backend = f"backend {entry.backend!r}{found.where or registered}"
    options = _validated_options(described, found, entry.options)
    try:
        built = found.cls.from_config(entry, options, config)
    except TrigStreamError:  # its own message (a ConfigError, a missing extra)
        raise
    except Exception as exc:
        if found.builtin:  # a bug of trig-stream's: its traceback is what helps
            raise
        raise ConfigError(
            f"{described}: {backend} cannot be made: {describe_error(exc)}; fix its options, "
            "or the package that declares it"
        ) from exc
    base = _base(kind)
    if not isinstance(built, base):
        raise ConfigError(
            f"{described}: {backend}: its from_config returned {built!r}, not a "
            f"{base.__name__}; fix the package that declares it"
        )
    return built


def _validated_options(described: str, found: Found[BackendClass], options: dict[str, Any]) -> Any:
    """``options`` checked against the backend's ``model`` as a config file's are (a value of
    another type refused): a config built in code never went through :func:`parse_config
    <trig_stream.config.parse_config>`, and Python's looser rules let ``"64"`` pass as a size
    and a bare pydantic error name no entry.

    Raises:
        ConfigError: the options do not fit the model (see :func:`validate_backend_options`);
            the message names the entry and each key at fault.
    """
    from pydantic import ValidationError

    from trig_stream.config_problems import nested_problems
    from trig_stream.config_values import validate_table
    from trig_stream.errors import ConfigError

    model = found.cls.Options
    try:
        if found.builtin:
            return validate_table(model, options)
        return validate_plugin_options(model, options)
    except ValidationError as exc:
        raise ConfigError(f"{described}: options: {nested_problems(exc, model)}") from None
    except OptionsModelError as exc:
        raise ConfigError(f"{described}: options: {exc}") from None


def check_backends(generators: Sequence[object], judges: Sequence[object]) -> None:
    """Check backend instances given to the engine as the config checks its own entries.

    Raises:
        ConfigError: none of a kind; an object that is not a backend instance of its kind;
            one without a name (its ``__init__`` set none); a name that is no safe file
            name, is used twice, or (a generator's) differs from another's only in case or
            names a file of the report; a count (workers, batch size, concurrency) outside
            the bounds the config sets; a judge's ``dimensions`` that is not None nor a
            non-empty set of TRIG dimension codes; a judge's ``scorer`` that is no scorer's
            name, or its ``confidence`` no bool; a judge's ``judge`` that is no coroutine
            function (a plain ``def``); a method the engine calls in a worker thread that is
            one (a generator's ``load`` or ``close``, a judge's ``prepare``...); or two
            judges' servers (``options.serve``) at one fixed address.
    """
    from trig_stream.backends.base import Generator, Judge
    from trig_stream.config import GeneratorConfig, JudgeConfig
    from trig_stream.config_values import field_value_problem
    from trig_stream.dimensions import DIMENSIONS
    from trig_stream.errors import ConfigError
    from trig_stream.records import CASE_CLASH, is_reserved_model_name, safe_name_problem
    from trig_stream.scoring import SCORERS

    kinds: tuple[tuple[str, Sequence[object], type[Generator | Judge]], ...] = (
        ("generator", generators, Generator),
        ("judge", judges, Judge),
    )
    for kind, backends, base in kinds:
        if not backends:
            raise ConfigError(
                f"no {kind}: give at least one (or None, to build them from the config)"
            )
        seen: set[str] = set()
        folded: dict[str, str] = {}  # the first name of each casefold()
        for position, backend in enumerate(backends):
            if not isinstance(backend, base):
                what = f"the class {backend.__name__}" if isinstance(backend, type) else "it"
                raise ConfigError(
                    f"{kind}s[{position}] is {backend!r}, not a {base.__name__} "
                    f"({base.__module__}): {what} cannot be used as a {kind}; pass an "
                    f"instance of a {base.__name__} subclass (or None, to build them from "
                    "the config)"
                )
            if not hasattr(backend, "name"):  # a subclass whose __init__ never set it
                how = " (call super().__init__(name, options, ...))" if kind == "judge" else ""
                raise ConfigError(
                    f"{kind}s[{position}] ({type(backend).__name__}) has no name: set "
                    f"`self.name` in its __init__{how}; the name is the {kind}'s in the run "
                    "and in its records"
                )
            problem = (
                safe_name_problem(backend.name) if isinstance(backend.name, str) else "must be text"
            )
            if problem is not None:
                raise ConfigError(
                    f"{kind} name {backend.name!r} is not a safe file name (it names folders of "
                    f"the run directory): it {problem}"
                )
            if kind == "generator" and is_reserved_model_name(backend.name):
                raise ConfigError(
                    f"generator name {backend.name!r} names the report's comparison of the "
                    "models, beside their folders: give the model another name"
                )
            if backend.name in seen:
                raise ConfigError(f"{kind} name {backend.name!r} is used twice")
            seen.add(backend.name)
            other = folded.setdefault(backend.name.casefold(), backend.name)
            if kind == "generator" and other != backend.name:
                raise ConfigError(
                    f"generator names {other!r} and {backend.name!r} differ only in case; "
                    f"{CASE_CLASH}"
                )
    counts: list[tuple[str, type[GeneratorConfig | JudgeConfig], str, object]] = []
    for generator in cast("Sequence[Generator]", generators):
        counts.append(
            (f"generator {generator.name!r}", GeneratorConfig, "workers", generator.workers)
        )
        counts.append(
            (f"generator {generator.name!r}", GeneratorConfig, "batch_size", generator.batch_size)
        )
    for judge in cast("Sequence[Judge]", judges):
        counts.append((f"judge {judge.name!r}", JudgeConfig, "concurrency", judge.concurrency))
    for described, model, what, value in counts:
        if (problem := field_value_problem(model, what, value)) is not None:
            raise ConfigError(
                f"{described}: {what} {problem}: set it within the bounds a config's entry has"
            )
    from trig_stream.backends.judges.managed_server import check_distinct_addresses

    check_distinct_addresses(judges)
    for judge in cast("Sequence[Judge]", judges):
        dimensions: object = judge.dimensions
        if dimensions is None:
            continue
        if (
            not isinstance(dimensions, AbstractSet)
            or not dimensions
            or not all(code in DIMENSIONS for code in dimensions)
        ):
            raise ConfigError(
                f"judge {judge.name!r}: dimensions is {dimensions!r}: make it None (every "
                "dimension) or a non-empty frozenset of TRIG dimension codes "
                f"({', '.join(DIMENSIONS)}); a judge of no dimension would judge nothing"
            )
    for judge in cast("Sequence[Judge]", judges):
        # A plain `def judge` made every request an `error` judgement ("can't be used in
        # 'await' expression"), which --retry-errors asked again forever.
        if not is_coroutine_function(judge.judge):
            raise ConfigError(
                f"judge {judge.name!r} ({type(judge).__name__}): its judge() is no coroutine "
                "function, and the engine awaits it: define it as "
                "`async def judge(self, request)`"
            )
    blocking: tuple[tuple[str, Sequence[object], tuple[str, ...]], ...] = (
        ("generator", generators, _GENERATOR_BLOCKING_HOOKS),
        ("judge", judges, _JUDGE_BLOCKING_HOOKS),
    )
    for kind, backends, hooks in blocking:
        for backend in backends:
            for part, described in _wrapped_chain(kind, backend):
                for hook in hooks:
                    # Called in a worker thread, an `async def` hook gave a coroutine that
                    # nothing awaited: the run went on as if it had loaded (or closed), with a
                    # RuntimeWarning alone. A wrapper (dtm_rewrite) calls its inner
                    # generator's hooks from its own, in the same thread.
                    if is_coroutine_function(getattr(part, hook, None)):
                        raise ConfigError(
                            f"{described}: its {hook}() is a coroutine function (async def), "
                            "and the engine calls it in a worker thread, where nothing would "
                            f"await it: define it as a plain `def {hook}(...)`"
                        )
    for judge in cast("Sequence[Judge]", judges):
        # Unchecked, a scorer of no such name failed the run at its first answer, after the
        # run directory was made and images were generated.
        scorer: object = judge.scorer
        if not (isinstance(scorer, str) and scorer in SCORERS):
            raise ConfigError(
                f"judge {judge.name!r}: scorer is {scorer!r}: make it one of "
                f"{', '.join(map(repr, SCORERS))}, as a config's `scorer` is"
            )
        confidence: object = judge.confidence
        if not isinstance(confidence, bool):
            raise ConfigError(
                f"judge {judge.name!r}: confidence is {confidence!r}: make it True or False, "
                "as a config's `confidence` is"
            )


_GENERATOR_BLOCKING_HOOKS: Final = (
    "check_environment",
    "load",
    "stop_loading",
    "stop_waiting",
    "generate",
    "all_requested",
    "close",
)
"""A generator's methods that the engine calls in worker threads (blocking code)."""
_JUDGE_BLOCKING_HOOKS: Final = ("check_environment", "prepare")
"""A judge's methods that the engine calls in worker threads (its ``open``, ``judge`` and
``aclose`` are awaited)."""


def _wrapped_chain(kind: str, backend: object) -> Iterator[tuple[object, str]]:
    """``backend``, then each generator it wraps (:attr:`Generator.wrapped
    <trig_stream.backends.base.Generator.wrapped>`, ``dtm_rewrite``'s inner one), each with
    how a message names it."""
    described = f"{kind} {getattr(backend, 'name', '?')!r} ({type(backend).__name__})"
    seen: set[int] = set()
    part: object = backend
    while part is not None and id(part) not in seen:  # a wrapper of itself ends the walk
        seen.add(id(part))
        yield part, described
        part = getattr(part, "wrapped", None) if kind == "generator" else None
        described = f"{described}, whose inner generator is {type(part).__name__}"


def refuse_async_hooks(described: str, cls: type, hooks: Iterable[str], advice: str = "") -> None:
    """Refuse ``cls`` (``described`` in the message) if one of its ``hooks``, blocking
    methods the engine calls in a worker thread, is ``async def``: its coroutine would be
    dropped unawaited, the hook never run.

    Raises:
        TypeError: such a hook, named, with ``advice`` after the message.
    """
    for hook in hooks:
        if is_coroutine_function(getattr(cls, hook, None)):
            raise TypeError(
                f"{described} is {cls.__name__}, whose {hook}() is a coroutine function "
                "(async def), and the engine calls it in a worker thread, where nothing would "
                f"await it: define it as a plain `def {hook}(...)`{advice}"
            )


def is_coroutine_function(function: object) -> bool:
    """Whether calling ``function`` gives a coroutine: an ``async def`` function, seen
    through bound methods, :func:`functools.partial` and decorators that keep
    ``__wrapped__`` (a plain wrapper of an ``async def`` function returns its coroutine)."""
    seen: set[int] = set()
    while id(function) not in seen:  # a __wrapped__ that leads back to itself ends the walk
        seen.add(id(function))
        if inspect.iscoroutinefunction(function):
            return True
        if inspect.ismethod(function):
            function = function.__func__
        elif isinstance(function, functools.partial):
            function = function.func
        elif (wrapped := getattr(function, "__wrapped__", None)) is not None:
            function = wrapped
        else:
            return False
    return False
