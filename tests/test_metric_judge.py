"""The ``metric`` judge with third-party metrics: sync and async, odd return values, broken
entry points, loading and closing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import anyio
import anyio.lowlevel
import pytest
from PIL import Image

from trig_stream.backends.base import JudgeReply, JudgeRequest, PreparedImage
from trig_stream.backends.judges.metric_judge import MetricJudge, MetricJudgeOptions
from trig_stream.backends.metrics import registry
from trig_stream.backends.metrics.base import ImageMetric, Metric, MetricInput, Value
from trig_stream.backends.metrics.registry import register_metric
from trig_stream.dimensions import Dimension
from trig_stream.records import Sample

pytestmark = pytest.mark.anyio

SAMPLE = Sample(data_id="IQ-R_TA-C_1", task="t2i", prompt="p", dimensions=("IQ-R", "TA-C"))


@pytest.fixture(autouse=True)
def registered(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test registers its own metrics, and leaves none behind."""
    monkeypatch.setattr(registry, "_REGISTERED", {})
    yield


def request(dimension: Dimension = "IQ-R") -> JudgeRequest:
    image = PreparedImage(path=Path("image.png"), payload=Image.new("RGB", (8, 8), (200, 10, 10)))
    return JudgeRequest("model", SAMPLE, dimension, image, 1)


def metric_judge(metric: type[Metric], **options: object) -> MetricJudge:
    register_metric(metric.name, metric)
    return MetricJudge("m", MetricJudgeOptions.model_validate({"metric": metric.name, **options}))


async def judge_once(judge: MetricJudge, dimension: Dimension = "IQ-R") -> JudgeReply:
    await judge.open()
    try:
        return await judge.judge(request(dimension))
    finally:
        await judge.aclose()


class AsyncSharpness(ImageMetric):
    """An async metric (a remote service) that inherits ``compute_batch``."""

    name: ClassVar[str] = "async_sharpness"
    dimensions: ClassVar[frozenset[Dimension]] = frozenset({"IQ-R"})

    async def compute(self, item: MetricInput) -> Value:
        await anyio.lowlevel.checkpoint()
        return 0.75


async def test_an_async_metric_inheriting_compute_batch_is_awaited() -> None:
    # The judge ran it in the thread batcher, whose loop got coroutines, not values: every
    # judgement was an error.
    reply = await judge_once(metric_judge(AsyncSharpness))
    assert reply.score == 0.75
