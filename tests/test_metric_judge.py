"""The ``metric`` judge with third-party metrics: sync and async, odd return values, broken
entry points, loading and closing."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import ClassVar, cast

import anyio
import anyio.lowlevel
import numpy as np
import pytest
from PIL import Image

from trig_stream.backends.base import JudgeReply, JudgeRequest, PreparedImage
from trig_stream.backends.judges.metric_judge import MetricJudge, MetricJudgeOptions
from trig_stream.backends.metrics import registry
from trig_stream.backends.metrics.base import ImageMetric, Metric, MetricInput, Value
from trig_stream.backends.metrics.registry import register_metric
from trig_stream.dimensions import Dimension
from trig_stream.errors import ItemError
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


class Abstains(ImageMetric):
    """Finds nothing to measure in any image."""

    name: ClassVar[str] = "abstains"
    dimensions: ClassVar[frozenset[Dimension]] = frozenset({"IQ-R"})

    def compute(self, item: MetricInput) -> Value:
        return None


async def test_a_metric_finding_nothing_to_measure_gives_that_reason() -> None:
    # The batcher asserted its outcome was not None: the judgement said "AssertionError".
    with pytest.raises(ItemError, match="the abstains metric found nothing to measure"):
        await judge_once(metric_judge(Abstains))


def batch_metric(returned: Callable[[int], object], *, run_async: bool = False) -> type[Metric]:
    """A metric whose compute_batch returns ``returned(number of items)``."""

    class Returns(ImageMetric):
        name: ClassVar[str] = "returns"
        dimensions: ClassVar[frozenset[Dimension]] = frozenset({"IQ-R"})

        def compute(self, item: MetricInput) -> Value:
            raise AssertionError("compute_batch is used")

        def compute_batch(self, items: Sequence[MetricInput]) -> list[Value]:
            return cast("list[Value]", returned(len(items)))

    class ReturnsAsync(Returns):
        async def compute_batch(  # type: ignore[override]
            self, items: Sequence[MetricInput]
        ) -> list[Value]:
            await anyio.lowlevel.checkpoint()
            return cast("list[Value]", returned(len(items)))

    return ReturnsAsync if run_async else Returns


@pytest.mark.parametrize("run_async", [False, True], ids=["sync", "async"])
async def test_compute_batch_may_return_any_sequence_of_numbers(run_async: bool) -> None:
    # A numpy array or a tuple failed the judgement with "AssertionError".
    for returned in (lambda n: np.full(n, 0.25), lambda n: (np.float32(0.25),) * n):
        judge = metric_judge(batch_metric(returned, run_async=run_async))
        reply = await judge_once(judge)
        assert reply.score == 0.25 and type(reply.score) is float


@pytest.mark.parametrize("run_async", [False, True], ids=["sync", "async"])
async def test_compute_batch_returning_the_wrong_values_is_an_item_error(run_async: bool) -> None:
    # An async compute_batch with one value too many was scored ok; with none, IndexError.
    cases: list[tuple[Callable[[int], object], str]] = [
        (lambda n: [0.5] * (n + 1), "compute_batch returned 2 values for 1 image$"),
        (lambda n: [], "compute_batch returned 0 values for 1 image$"),
        (lambda n: 0.5, r"returned a float \(0.5\), not a list of one value per image"),
        (lambda n: ["0.5"] * n, r"gave a str \('0.5'\) where a number"),
        (lambda n: [True] * n, r"gave a bool \(True\) where a number"),
    ]
    for returned, message in cases:
        with pytest.raises(ItemError, match=message):
            await judge_once(metric_judge(batch_metric(returned, run_async=run_async)))
