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

from functools import partial
from typing import Final

from trig_stream.backends.metrics.base import Metric
from trig_stream.backends.plugins import check_concrete, checked_subclass, find_plugin, plugin_names

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
    return plugin_names(ENTRY_POINT_GROUP, _BUILTIN, _REGISTERED)


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
    found = find_plugin(
        name,
        what="metric",
        group=ENTRY_POINT_GROUP,
        builtin=_BUILTIN,
        registered=_REGISTERED,
        check=partial(_checked, name),
    )
    if found is None:
        raise ValueError(f"unknown metric {name!r}; known metrics: {', '.join(metric_names())}")
    return found.cls


def _checked(name: str, obj: object, where: str = "") -> type[Metric]:
    described = f"metric {name!r}{where}"
    metric = checked_subclass(described, obj, Metric, "ImageMetric or SetMetric")
    if not isinstance(getattr(metric, "name", None), str):
        raise TypeError(
            f"{described} is {metric.__name__}, which has no name: give the class a `name` "
            "attribute (a string)"
        )
    check_concrete(described, metric)
    return metric
