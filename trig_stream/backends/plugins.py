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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Generic, TypeVar

C = TypeVar("C")
T = TypeVar("T")


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
    of ``group``.

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
    if name in registered:
        return Found(registered[name], "", builtin=False)
    target = builtin.get(name)
    if target is not None:
        module_name, _, attr = target.partition(":")
        return Found(check(getattr(importlib.import_module(module_name), attr), ""), "", True)
    for ep in entry_points(group=group, name=name):
        where = f"entry point {ep.name} = {ep.value!r}"
        if ep.dist is not None:
            where += f" of {ep.dist.name} {ep.dist.version}"
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
