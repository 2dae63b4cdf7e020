"""Finding a class a config names: built in, registered at run time, or declared by a third
party's entry point; and checking it before use.

The metric registry (:mod:`trig_stream.backends.metrics.registry`) and the generator and judge
registry (:mod:`trig_stream.backends.registry`) look names up here, so that a third party's
class that is broken is one message, the same for all of them, naming its entry point, its
distribution and the cause::

    generator backend 'mine' (entry point mine = 'my_package:Mine' of my-package 1.0) cannot
    be imported: ModuleNotFoundError: No module named 'torch'; fix or reinstall the package
    that declares it
"""

from __future__ import annotations

import importlib
import inspect
import logging
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    from pydantic import BaseModel

C = TypeVar("C")
T = TypeVar("T")
M = TypeVar("M", bound="BaseModel")

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Found(Generic[C]):
    """A class found by its name.

    Attributes:
        cls: the class, checked.
        where: where a third party declares it, as messages name it
            (`` (entry point mine = 'my_package:Mine' of my-package 1.0)``); empty for a
            built-in class or one registered at run time.
        builtin: whether it is one of trig-stream's own.
    """

    cls: C
    where: str
    builtin: bool


def plugin_names(
    group: str, builtin: Mapping[str, str], registered: Mapping[str, object]
) -> list[str]:
    """Every name known: built in, registered and from the entry points of ``group``."""
    names = set(builtin) | set(registered)
    names |= {ep.name for ep in entry_points(group=group)}
    return sorted(names)


def find_plugin(
    name: str,
    *,
    what: str,
    group: str,
    builtin: Mapping[str, str],
    registered: Mapping[str, C],
    check: Callable[[object, str], C],
) -> Found[C] | None:
    """Find the class called ``name``: registered at run time first (checked when it was
    registered), then built in (``"module:Class"``, imported now), then from the entry points
    of ``group``. Entry points of ``group`` that declare ``name`` too, left out since an
    earlier one takes it (or a second of two declaring it), are named in a warning (logged
    once per process).

    Args:
        what: what it is, in messages (``metric``, ``generator backend``).
        check: the class from what was imported and its ``where``; raises TypeError, naming
            the class with its ``where``, when it is not one that can be used.

    Returns:
        None when nothing has that name.

    Raises:
        ImportError: the entry point cannot be imported (the message names the entry point,
            its distribution and the cause).
        TypeError: from ``check``.
    """
    declared = list(entry_points(group=group, name=name))
    if name in registered:
        _warn_unused(what, name, declared, "the one registered at run time")
        return Found(registered[name], "", builtin=False)
    target = builtin.get(name)
    if target is not None:
        _warn_unused(what, name, declared, "trig-stream's own")
        module_name, _, attr = target.partition(":")
        return Found(check(getattr(importlib.import_module(module_name), attr), ""), "", True)
    if len(declared) > 1:
        _warn_unused(what, name, declared[1:], f"the first found, {_where(declared[0])},")
    for ep in declared[:1]:
        where = _where(ep)
        try:
            loaded = ep.load()
        except (Exception, SystemExit, KeyboardInterrupt) as exc:
            # A third party's import: whatever it raises is the cause. SystemExit too (a
            # package calling sys.exit() when a dependency is missing): let out, it ended
            # the command with its code (3 reads "run directory refused") and no message.
            from trig_stream.pipeline import describe_error  # the engine's: only when needed

            raise ImportError(
                f"{what} {name!r} ({where}) cannot be imported: {describe_error(exc)}; fix or "
                "reinstall the package that declares it"
            ) from exc
        return Found(check(loaded, f" ({where})"), f" ({where})", builtin=False)
    return None


_warned: set[tuple[str, str, str]] = set()
"""The names :func:`_warn_unused` has warned of (what, name, entry point), once each."""


def _model_in(annotation: object) -> type[BaseModel] | None:
    """The model an annotation names: itself, or the one model of ``Model | None``."""
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(members) == 1:
            return _model_in(members[0])
    return None


def _where(ep: EntryPoint) -> str:
    """An entry point as messages name it: ``entry point mine = 'my_package:Mine' of
    my-package 1.0``."""
    where = f"entry point {ep.name} = {ep.value!r}"
    if ep.dist is not None:
        where += f" of {ep.dist.name} {ep.dist.version}"
    return where


def _warn_unused(what: str, name: str, unused: list[EntryPoint], used: str) -> None:
    """Warn, once per process, of entry points declaring ``name`` that are not used, since
    ``used`` takes the name: unsaid, a third party's class was silently left out (a metric
    called ``nsfw`` scored as trig-stream's own, or as another package's)."""
    for ep in unused:
        where = _where(ep)
        if (what, name, where) in _warned:
            continue
        _warned.add((what, name, where))
        logger.warning(
            "%s %r is also declared by %s, which is not used: %s is (names registered at "
            "run time come first, then trig-stream's own, then entry points); give one of "
            "them another name, or uninstall the package that should not declare it",
            what,
            name,
            where,
            used,
        )


def checked_subclass(described: str, obj: object, base: type[T], bases: str) -> type[T]:
    """``obj`` when it is a subclass of ``base``.

    Args:
        described: what it is and where it comes from, as messages begin.
        bases: the classes to subclass, as messages name them.

    Raises:
        TypeError: it is not.
    """
    if not (isinstance(obj, type) and issubclass(obj, base)):
        raise TypeError(f"{described} is {obj!r}, not a subclass of trig_stream's {bases}")
    return obj


def check_concrete(described: str, cls: type) -> None:
    """Check that ``cls`` defines all its abstract methods.

    Raises:
        TypeError: it is abstract (the message names what it lacks).
    """
    if inspect.isabstract(cls):
        missing = ", ".join(sorted(getattr(cls, "__abstractmethods__", ())))
        raise TypeError(
            f"{described} is {cls.__name__}, an abstract class: it does not define {missing}"
        )


class OptionsModelError(ValueError):
    """A third party's ``Options`` model raised something else than a validation error while
    it checked an options table (a validator's ``RuntimeError``); the message names it."""


def validate_plugin_options(model: type[M], table: Mapping[str, Any]) -> M:
    """A third party's options ``table`` checked against its ``model`` as a config file's
    tables are (:func:`~trig_stream.config_values.validate_table`), its keys included: a key that
    is no field of the model, nor an alias of one, is refused unless the model takes any
    (``extra="allow"``). Pydantic's default ignores such keys, and a misspelt one ran with
    the default value, unnoticed.

    Raises:
        pydantic.ValidationError: the table does not fit ``model``; an unknown key is an
            ``extra_forbidden`` error at that key, as a config's own tables give.
        OptionsModelError: the model's own code raised something else than a validation
            error (a validator's ``RuntimeError``); an error of trig-stream's (a missing
            extra) comes out as it is.
    """
    from pydantic import RootModel, ValidationError

    from trig_stream.config_problems import fields_by_key
    from trig_stream.config_values import validate_table
    from trig_stream.errors import TrigStreamError
    from trig_stream.pipeline import describe_error

    # The model whose fields are the table's keys: a RootModel's root model, if its root is
    # one, or one or None (a RootModel of a dict takes any key, which pydantic's check of the
    # dict's values covers).
    keyed: type[BaseModel] | None = model
    if issubclass(model, RootModel):
        keyed = _model_in(model.model_fields["root"].annotation)
    # "forbid": pydantic's own check.
    if keyed is not None and keyed.model_config.get("extra") not in ("allow", "forbid"):
        taken = fields_by_key(keyed)
        unknown = [key for key in table if key not in taken]
        if unknown:
            raise ValidationError.from_exception_data(
                model.__name__,
                [
                    {"type": "extra_forbidden", "loc": (key,), "input": table[key]}
                    for key in unknown
                ],
            )
    try:
        return validate_table(model, table)
    except (ValidationError, TrigStreamError):  # a missing extra: its own message and exit code
        raise
    except Exception as exc:  # a third party's validator: a bug of theirs, not a traceback
        raise OptionsModelError(
            f"{describe_error(exc)} (raised by its Options model, {model.__name__}, which "
            "should raise ValueError for a value it refuses; fix the package that declares it)"
        ) from exc
