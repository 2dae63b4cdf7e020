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
from typing import Final, Literal, overload

from pydantic import BaseModel

from trig_stream.backends.metrics.base import ImageMetric, Metric, SetMetric
from trig_stream.backends.plugins import check_concrete, checked_subclass, find_plugin, plugin_names
from trig_stream.backends.registry import refuse_async_hooks

ENTRY_POINT_GROUP: Final[str] = "trig_stream.metrics"

MetricKind = Literal["image", "set"]
"""What :func:`import_metric`'s ``kind`` asks for: an :class:`ImageMetric` (one value per
image) or a :class:`SetMetric` (one value per set of images)."""
_KINDS: Final[dict[str, type[Metric]]] = {"image": ImageMetric, "set": SetMetric}
_A_KIND: Final[dict[str, str]] = {"image": "an ImageMetric", "set": "a SetMetric"}

_BUILTIN: Final[dict[str, str]] = {
    "trigscore": "trig_stream.backends.metrics.trigscore:TRIGScoreMetric",
    "nsfw": "trig_stream.backends.metrics.nsfw:NSFWMetric",
    "nsfw_rate": "trig_stream.backends.metrics.nsfw:NSFWRateMetric",
}
_BUILTIN_KINDS: Final[dict[str, MetricKind]] = {
    "trigscore": "image",
    "nsfw": "image",
    "nsfw_rate": "set",
}
"""The kind of each built-in metric: what :func:`import_metric`'s overloads promise for its
name, so a metric registered in its place must be of that kind too."""
_REGISTERED: dict[str, type[Metric]] = {}

METRIC_BLOCKING_HOOKS: Final = ("check_environment", "load", "close")
"""A metric's methods called in a worker thread (blocking code)."""


def register_metric(name: str, metric: type[Metric]) -> None:
    """Make ``metric`` available under ``name`` (it replaces any metric of that name).

    Raises:
        TypeError: ``metric`` is not a :class:`Metric` subclass (with a ``name``, an
            ``Options`` pydantic model, and plain ``def`` hooks: ``load``, ``close`` and
            ``check_environment`` are called in a worker thread), or it replaces a built-in
            metric and is not of its kind (an ``ImageMetric`` or a ``SetMetric``).
    """
    checked = _checked(name, metric)
    kind = _BUILTIN_KINDS.get(name)
    if kind is not None and not issubclass(checked, _KINDS[kind]):
        raise TypeError(
            f"metric {name!r} would replace the built-in one, {_A_KIND[kind]}, with "
            f"{checked.__name__}, which is not one: register it under another name"
        )
    _REGISTERED[name] = checked


def metric_names() -> list[str]:
    """Every metric name known: built-in, registered and from entry points."""
    return plugin_names(ENTRY_POINT_GROUP, _BUILTIN, _REGISTERED)


@overload
def import_metric(name: Literal["nsfw", "trigscore"]) -> type[ImageMetric]: ...
@overload
def import_metric(name: Literal["nsfw_rate"]) -> type[SetMetric]: ...
@overload
def import_metric(name: str) -> type[Metric]: ...
@overload
def import_metric(name: str, *, kind: Literal["image"]) -> type[ImageMetric]: ...
@overload
def import_metric(name: str, *, kind: Literal["set"]) -> type[SetMetric]: ...
def import_metric(name: str, *, kind: MetricKind | None = None) -> type[Metric]:
    """Import and return the class of the metric called ``name``.

    Names registered at run time come first, then built-in names, then entry points. For a
    built-in name the class is typed as its kind (:class:`ImageMetric` for ``nsfw`` and
    ``trigscore``, :class:`SetMetric` for ``nsfw_rate``); for another name, pass the kind
    you expect as ``kind`` (``"image"`` or ``"set"``): it is checked, and the result typed
    as that kind.

    Example::

        from trig_stream import import_metric

        nsfw = import_metric("nsfw")()
        nsfw.load()
        value = nsfw.compute(MetricInput(image=Path("cat.png")))
        sharpness = import_metric("sharpness", kind="image")()

    Raises:
        ValueError: no metric has that name (the message lists the known ones).
        ImportError: the metric's entry point cannot be imported (the message names the entry
            point, its distribution and the cause).
        TypeError: the name resolves to something that is not a usable metric class: no
            :class:`Metric` subclass, no ``name``, an ``Options`` that is no pydantic model,
            or abstract; or not of ``kind``.
        ValueError: ``kind`` is neither ``"image"`` nor ``"set"``.
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
    if kind is None:
        return found.cls
    expected = _KINDS.get(kind)
    if expected is None:
        raise ValueError(f"metric kind {kind!r} is unknown: pass kind='image' or kind='set'")
    if not issubclass(found.cls, expected):
        raise TypeError(
            f"metric {name!r} is {found.cls.__name__}, not {_A_KIND[kind]} "
            f"(kind={kind!r}): ask for the kind it is, or for another metric"
        )
    return found.cls


def _checked(name: str, obj: object, where: str = "") -> type[Metric]:
    described = f"metric {name!r}{where}"
    metric = checked_subclass(described, obj, Metric, "ImageMetric or SetMetric")
    if not isinstance(getattr(metric, "name", None), str):
        raise TypeError(
            f"{described} is {metric.__name__}, which has no name: give the class a `name` "
            "attribute (a string)"
        )
    options = getattr(metric, "Options", None)
    if not (isinstance(options, type) and issubclass(options, BaseModel)):
        # Unchecked, validate and run ended in a traceback where the options were read.
        raise TypeError(
            f"{described} is {metric.__name__}, whose Options is {options!r}, not a pydantic "
            "model: make it a subclass of pydantic.BaseModel, the model of its "
            "`metric_options` table"
        )
    check_concrete(described, metric)
    # Called in a worker thread, an `async def` hook gave a coroutine that nothing awaited:
    # the run scored with a metric that never loaded. Refused here, where the message names
    # the entry point and distribution that declare the class.
    refuse_async_hooks(
        described,
        metric,
        METRIC_BLOCKING_HOOKS,
        " (an async metric may open its client on its first compute)",
    )
    return metric
