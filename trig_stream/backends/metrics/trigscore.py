"""The ``trigscore`` metric: TRIGScore of a judge's answer, from its first-token top logprobs.

It reads no image: each :class:`~trig_stream.backends.metrics.base.MetricInput` carries the
``top_logprobs`` a judge answered (as kept in every judgement record), so stored judgements
can be scored again with another scorer or with the confidence weighting::

    metric = import_metric("trigscore")(TRIGScoreOptions(scorer="trig"))
    metric.compute(MetricInput(top_logprobs=judgement.top_logprobs))
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel

from trig_stream.backends.metrics.base import (
    ImageMetric,
    MetricInput,
    MetricNeed,
    Value,
    options_of,
)
from trig_stream.config_fields import OPTIONS_CONFIG
from trig_stream.scoring import Scorer, score_top_logprobs


class TRIGScoreOptions(BaseModel):
    """Options of the ``trigscore`` metric."""

    model_config = OPTIONS_CONFIG

    scorer: Scorer = "robust"
    """``trig`` for upstream's exact formula, ``robust`` for the normalising one."""
    confidence: bool = False
    """Multiply by the probability of the most likely rating (the paper's variant)."""


class TRIGScoreMetric(ImageMetric):
    """TRIGScore in [0, 1] of one judge answer; None when no top token names a rating."""

    name: ClassVar[str] = "trigscore"
    needs: ClassVar[frozenset[MetricNeed]] = frozenset({"top_logprobs"})
    Options: ClassVar[type[BaseModel]] = TRIGScoreOptions

    def __init__(self, options: TRIGScoreOptions | None = None) -> None:
        settings = options_of(self, TRIGScoreOptions, options)
        super().__init__(settings)
        self._scorer: Scorer = settings.scorer
        self._confidence = settings.confidence

    def compute(self, item: MetricInput) -> Value:
        """Score one answer; None when it has no logprobs or names no rating.

        Raises:
            ValueError: a logprob is no log probability (see
                :func:`~trig_stream.scoring.score_top_logprobs`).
        """
        if item.top_logprobs is None:
            return None
        return score_top_logprobs(
            item.top_logprobs, scorer=self._scorer, confidence=self._confidence
        )
