"""Metrics: numbers computed from images or from a judge's answers.

:func:`import_metric` gets a metric class by name; :mod:`.base` says what a metric is. Built-in:

* ``trigscore`` (image level): TRIGScore from a judge's first-token top logprobs;
* ``nsfw`` (image level): the probability that an image is NSFW, from the Open-NSFW classifier
  (the ``nsfw`` extra); it measures TRIG's toxicity dimension ``R-T`` and can run as a judge;
* ``nsfw_rate`` (set level): the share of a set's images the classifier calls NSFW.

Importing this package loads no model runtime; each metric imports its own when used.
"""

from trig_stream.backends.metrics.base import (
    ImageMetric,
    Metric,
    MetricInput,
    MetricLevel,
    SetMetric,
    compute_async,
    compute_set_async,
)
from trig_stream.backends.metrics.registry import import_metric, metric_names, register_metric

__all__ = [
    "ImageMetric",
    "Metric",
    "MetricInput",
    "MetricLevel",
    "SetMetric",
    "compute_async",
    "compute_set_async",
    "import_metric",
    "metric_names",
    "register_metric",
]
