"""Which metrics exist, and how to get one by name.

Built-in metrics are named here as ``"module:Class"`` and imported only when asked for, so a
metric's heavy dependencies (onnxruntime, torch) load only when it is used. Third-party
packages add metrics through the entry-point group ``trig_stream.metrics``::

    [project.entry-points."trig_stream.metrics"]
    sharpness = "my_package.metrics:Sharpness"

or at run time with :func:`register_metric`. A metric is a subclass of
:class:`~trig_stream.backends.metrics.base.ImageMetric` or
:class:`~trig_stream.backends.metrics.base.SetMetric`.
"""

from __future__ import annotations

import importlib
import inspect
from importlib.metadata import entry_points
from typing import Final

from trig_stream.backends.metrics.base import Metric

ENTRY_POINT_GROUP: Final[str] = "trig_stream.metrics"

_BUILTIN: Final[dict[str, str]] = {
    "trigscore": "trig_stream.backends.metrics.trigscore:TRIGScoreMetric",
    "nsfw": "trig_stream.backends.metrics.nsfw:NSFWMetric",
    "nsfw_rate": "trig_stream.backends.metrics.nsfw:NSFWRateMetric",
}
_REGISTERED: dict[str, type[Metric]] = {}


def register_metric(name: str, metric: type[Metric]) -> None:
    """Make ``metric`` available under ``name`` (it replaces any metric of that name).

    Raises:
        TypeError: ``metric`` is not a :class:`Metric` subclass.
    """
    _REGISTERED[name] = _checked(name, metric)


def metric_names() -> list[str]:
    """Every metric name known: built-in, registered and from entry points."""
    names = set(_BUILTIN) | set(_REGISTERED)
    names |= {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}
    return sorted(names)


def import_metric(name: str) -> type[Metric]:
    """Import and return the class of the metric called ``name``.

    Names registered at run time come first, then built-in names, then entry points.

    Example::

        from trig_stream import import_metric

        nsfw = import_metric("nsfw")()
        nsfw.load()
        value = nsfw.compute(MetricInput(image=Path("cat.png")))

    Raises:
        ValueError: no metric has that name (the message lists the known ones).
        ImportError: the metric's entry point cannot be imported (the message names the entry
            point, its distribution and the cause).
        TypeError: the name resolves to something that is not a usable metric class: no
            :class:`Metric` subclass, no ``name``, or abstract.
    """
    if name in _REGISTERED:
        return _REGISTERED[name]
    target = _BUILTIN.get(name)
    if target is not None:
        module_name, _, attr = target.partition(":")
        return _checked(name, getattr(importlib.import_module(module_name), attr))
    for ep in entry_points(group=ENTRY_POINT_GROUP, name=name):
        where = f"entry point {ep.name} = {ep.value!r}"
        if ep.dist is not None:
            where += f" of {ep.dist.name} {ep.dist.version}"
        try:
            loaded = ep.load()
        except Exception as exc:  # a third party's import: whatever it raises is the cause
            cause = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            raise ImportError(
                f"metric {name!r} ({where}) cannot be imported: {cause}; fix or reinstall "
                "the package that declares it"
            ) from exc
        return _checked(name, loaded, f" ({where})")
    raise ValueError(f"unknown metric {name!r}; known metrics: {', '.join(metric_names())}")


def _checked(name: str, obj: object, where: str = "") -> type[Metric]:
    if not (isinstance(obj, type) and issubclass(obj, Metric)):
        raise TypeError(
            f"metric {name!r}{where} is {obj!r}, not a subclass of trig_stream's ImageMetric "
            "or SetMetric"
        )
    if not isinstance(getattr(obj, "name", None), str):
        raise TypeError(
            f"metric {name!r}{where} is {obj.__name__}, which has no name: give the class a "
            "`name` attribute (a string)"
        )
    if inspect.isabstract(obj):
        missing = ", ".join(sorted(getattr(obj, "__abstractmethods__", ())))
        raise TypeError(
            f"metric {name!r}{where} is {obj.__name__}, an abstract class: it does not define "
            f"{missing}"
        )
    return obj
