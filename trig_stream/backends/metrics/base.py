"""What a metric is: something that turns images (or a judge's answers) into numbers.

Two levels, declared by the class:

* an :class:`ImageMetric` (``level = "image"``) gives one value per item, with
  :meth:`~ImageMetric.compute` for one and :meth:`~ImageMetric.compute_batch` for many (the
  default loops over ``compute``; a metric that is faster in batches overrides it);
* a :class:`SetMetric` (``level = "set"``) gives one value for a whole set of items, with
  :meth:`~SetMetric.compute_set`.

Either may be written sync (blocking code: a model on a device) or ``async`` (a remote
service): :func:`compute_async` runs both from async code, blocking ones in a worker thread.

An item is a :class:`MetricInput`: the image (a path or a PIL image), the TRIG sample it was
made for, and, for metrics that read a judge's answer, the dimension and top logprobs. A
metric declares what it reads in ``needs``. A value of ``None`` means that the input holds
nothing the metric can measure; a metric never puts a made-up number in its place.

An image metric that measures some TRIG dimensions names them in ``dimensions`` and maps its
value to a TRIG-oriented score (in [0, 1], higher is better) with
:meth:`~ImageMetric.dimension_score` (by default the value itself, or ``1 - value`` when
``higher_is_better`` is False); such a metric can run as a judge (``backend = "metric"``).
"""

from __future__ import annotations

import inspect
import numbers
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeAlias, TypeVar, cast

import anyio
import anyio.to_thread
from pydantic import BaseModel, ConfigDict

from trig_stream.backends.base import shrunk_size
from trig_stream.backends.threads import being_cancelled, cancellation_classes
from trig_stream.dimensions import Dimension
from trig_stream.errors import ItemError
from trig_stream.pillow_warnings import quiet_pillow
from trig_stream.records import Sample, TopLogprobs

if TYPE_CHECKING:
    from PIL.Image import Image

MetricLevel: TypeAlias = Literal["image", "set"]
MetricNeed: TypeAlias = Literal["image", "top_logprobs"]
Value: TypeAlias = float | None
OptionsT = TypeVar("OptionsT", bound=BaseModel)


@dataclass(frozen=True, slots=True)
class MetricInput:
    """One item a metric looks at.

    Attributes:
        image: the image, as a file or already decoded.
        sample: the TRIG sample the image was made for, when known.
        dimension: the dimension a judge was asked about (for metrics of judge answers).
        top_logprobs: the judge's first-token ``(token, logprob)`` pairs.
    """

    image: Path | str | Image | None = None
    sample: Sample | None = None
    dimension: Dimension | None = None
    top_logprobs: TopLogprobs | None = None

    def rgb_image(self) -> Image:
        """The image, decoded and in RGB (an RGBA one flattened onto white, as vLLM does).

        Raises:
            ItemError: there is no image, or it cannot be read.
        """
        if self.image is None:
            raise ItemError("this metric needs an image and the input has none")
        return load_rgb_image(self.image)


class NoOptions(BaseModel):
    """The options of a metric that has none."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def options_of(metric: Metric, expected: type[OptionsT], options: object) -> OptionsT:
    """``options`` (or the defaults, for None), checked to be an instance of ``expected``:
    a metric's ``__init__`` takes its options as its ``Options`` model, never a dict.

    Raises:
        TypeError: they are something else (a dict, another metric's options).
    """
    if options is None:
        return expected()
    if not isinstance(options, expected):
        raise TypeError(
            f"the {metric.name} metric takes its options as an instance of "
            f"{expected.__name__}, not of {type(options).__name__}: pass {expected.__name__}(...) "
            f"(from a dict: "
            f"{expected.__name__}.model_validate(the_dict))"
        )
    return options


class Metric(ABC):
    """The common ground of image-level and set-level metrics.

    Attributes:
        name: the metric's registry name.
        level: ``"image"`` (one value per item) or ``"set"`` (one value per set).
        needs: what it reads from each :class:`MetricInput`.
        higher_is_better: the direction of its values.
        Options: the pydantic model of its options (``metric_options`` in a config).
    """

    name: ClassVar[str]
    level: ClassVar[MetricLevel]
    needs: ClassVar[frozenset[MetricNeed]] = frozenset({"image"})
    higher_is_better: ClassVar[bool] = True
    Options: ClassVar[type[BaseModel]] = NoOptions

    def __init__(self, options: BaseModel | None = None) -> None:
        self.options = options if options is not None else self.Options()

    def fingerprint(self) -> dict[str, Any]:
        """Everything that changes the values: the metric's name and, by default, its
        options beside it, or under ``"options"`` when one of them is called ``metric``."""
        options = self.options.model_dump(mode="json")
        if "metric" in options:  # beside the name, it would replace it
            return {"metric": self.name, "options": options}
        return {"metric": self.name, **options}

    def check_environment(self) -> None:  # noqa: B027 - optional hook
        """Check what :meth:`load` needs from this machine without loading anything (an
        optional package, found with ``importlib.util.find_spec``); ``trig-stream validate``
        and the engine call it, through the ``metric`` judge, before a run starts.

        Raises:
            MissingExtraError: an optional dependency is not installed.
        """

    def load(self) -> None:  # noqa: B027 - optional hook
        """Load weights or open resources; blocking, called once before use."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources; blocking. The ``metric`` judge calls it once no batch
        computes any more: after a hard stop, in the thread of the batch it left running."""


class ImageMetric(Metric):
    """A metric with one value per item.

    Attributes:
        dimensions: the TRIG dimensions it measures (empty: none; it cannot be a judge).
    """

    level: ClassVar[MetricLevel] = "image"
    dimensions: ClassVar[frozenset[Dimension]] = frozenset()

    @abstractmethod
    def compute(self, item: MetricInput) -> Value | Awaitable[Value]:
        """The value of one item, or None when the item holds nothing to measure.

        Raises:
            ItemError: the item cannot be measured (an unreadable image...).
        """

    def compute_batch(self, items: Sequence[MetricInput]) -> list[Value] | Awaitable[list[Value]]:
        """The values of several items, in order (a sync ``compute`` called in a loop).

        An override may return any sequence of one value per item (a list, a tuple, a 1-D
        numpy array); each value is a real number, or None when its item holds nothing to
        measure.
        """
        return [cast("Value", self.compute(item)) for item in items]

    def dimension_score(self, value: float, dimension: Dimension) -> float:
        """The TRIG score (in [0, 1], higher is better) of a value on one of ``dimensions``.

        By default the value is taken to lie in [0, 1]: it is the score as it is when
        ``higher_is_better``, else ``1 - value`` (a blur of 0.9 is a realism of 0.1). A metric
        whose values lie elsewhere, or that maps them otherwise, overrides this.
        """
        return value if self.higher_is_better else 1.0 - value


class SetMetric(Metric):
    """A metric with one value for a whole set of items."""

    level: ClassVar[MetricLevel] = "set"

    @abstractmethod
    def compute_set(self, items: Sequence[MetricInput]) -> Value | Awaitable[Value]:
        """The value of the set, or None when it holds nothing to measure."""


async def compute_async(
    metric: ImageMetric,
    items: Sequence[MetricInput],
    *,
    limiter: anyio.CapacityLimiter | None = None,
) -> list[Value]:
    """Compute an image metric on ``items`` from async code.

    An ``async`` metric is awaited; a sync one runs in a worker thread behind ``limiter``.
    An async ``compute`` runs for all items at once; what one raises comes out as it is (the
    first, when several fail), so a :class:`~trig_stream.errors.RetryableError` or a
    :class:`~trig_stream.errors.FatalBackendError` keeps its meaning.

    Raises:
        ItemError: an item cannot be measured, the metric gave something else than one
            value (a number or None) per item, or it raised a cancellation exception though
            nothing cancelled it.
        BackendError: what the metric raised to classify its failure (retryable, fatal).
    """
    if inspect.iscoroutinefunction(metric.compute_batch):
        batch = await _awaited(metric, cast("Awaitable[object]", metric.compute_batch(items)))
        return checked_values(metric, batch, len(items))
    if is_async(metric):
        if len(items) == 1:  # no task group: nothing to gather
            return checked_values(metric, [await _computed(metric, items[0])], 1)
        values: list[object] = [None] * len(items)
        failures: list[Exception] = []

        async def one(index: int) -> None:
            # Each failure is kept as it is: a task group would wrap it in an exception
            # group (its class, which tells the engine to retry or stop, lost), and a
            # cancellation exception raised by a child would end that child silently.
            try:
                values[index] = await _computed(metric, items[index])
            except Exception as exc:
                failures.append(exc)

        async with anyio.create_task_group() as tg:
            for index in range(len(items)):
                tg.start_soon(one, index)
        if failures:
            raise failures[0]
        return checked_values(metric, values, len(items))
    in_thread = anyio.to_thread.run_sync(metric.compute_batch, items, limiter=limiter)
    return checked_values(metric, await _awaited(metric, in_thread), len(items))


async def _computed(metric: ImageMetric, item: MetricInput) -> object:
    """An async metric's ``compute`` of one item.

    Raises:
        ItemError: the metric raised a cancellation exception (an ``asyncio.CancelledError``
            of a future of its own) though nothing cancelled its caller.
    """
    return await _awaited(metric, cast("Awaitable[object]", metric.compute(item)))


async def _awaited(metric: Metric, computed: Awaitable[object]) -> object:
    """What ``computed`` gives: an async metric's call, or a sync one's in a worker thread.

    Raises:
        ItemError: the metric raised a cancellation exception (an ``asyncio.CancelledError``
            of a future of its own) though nothing cancelled its caller: let out, it read as
            the caller's cancellation (on Trio, asyncio's is a ``BaseException`` nothing
            expects).
    """
    try:
        return await computed
    except cancellation_classes() as exc:
        if isinstance(exc, anyio.get_cancelled_exc_class()) and being_cancelled():
            raise
        raise ItemError(
            f"the {metric.name} metric raised {type(exc).__name__} though nothing cancelled "
            "it: a bug of the metric (a cancellation is no answer)"
        ) from None


def checked_values(metric: Metric, values: object, count: int) -> list[Value]:
    """What ``compute_batch`` returned for ``count`` items, as a list of floats and Nones.

    Any sequence of the right length is taken (a list, a tuple, a 1-D numpy array).

    Raises:
        ItemError: it is no sequence, has another length, or holds something else than a
            real number or None (a string, a bool, a row of an array).
    """
    if hasattr(values, "tolist") and not isinstance(values, Sequence):
        values = values.tolist()  # a numpy array: its numbers become Python floats
    if not isinstance(values, Sequence) or isinstance(values, str | bytes):
        raise ItemError(
            f"the {metric.name} metric's compute_batch returned {_shown(values)}, not a list "
            "of one value per image"
        )
    if len(values) != count:
        raise ItemError(
            f"the {metric.name} metric's compute_batch returned {len(values)} values for "
            f"{count} image{'' if count == 1 else 's'}"
        )
    return [checked_value(metric, value) for value in values]


def checked_value(metric: Metric, value: object) -> Value:
    """One value a metric gave, as a float or None.

    Raises:
        ItemError: it is neither a real number nor None, or too large for a float.
    """
    if value is None:
        return None
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # an int (or a Fraction) past the largest float
            raise ItemError(
                f"the {metric.name} metric gave {_shown(value)}, too large for a float "
                "(past 1.8e308): a metric's value is a float; fix the metric"
            ) from None
    raise ItemError(
        f"the {metric.name} metric gave {_shown(value)} where a number (or None: nothing to "
        "measure) belongs"
    )


def _shown(value: object) -> str:
    text = repr(value)
    return f"a {type(value).__name__} ({text if len(text) <= 40 else text[:37] + '...'})"


async def compute_set_async(
    metric: SetMetric, items: Sequence[MetricInput], *, limiter: anyio.CapacityLimiter | None = None
) -> Value:
    """Compute a set metric on ``items`` from async code (sync ones in a worker thread).

    Raises:
        ItemError: the metric gave something else than a number or None, or it raised a
            cancellation exception though nothing cancelled it.
    """
    if inspect.iscoroutinefunction(metric.compute_set):
        return checked_value(metric, await _awaited(metric, metric.compute_set(items)))
    in_thread = anyio.to_thread.run_sync(metric.compute_set, items, limiter=limiter)
    return checked_value(metric, await _awaited(metric, in_thread))


def is_async(metric: ImageMetric | type[ImageMetric]) -> bool:
    """Whether the metric (an instance or its class) is ``async``: its ``compute_batch`` is,
    or its ``compute`` is and it inherits ``compute_batch`` (whose loop then awaits nothing:
    :func:`compute_async` runs the items' ``compute`` calls concurrently instead)."""
    if inspect.iscoroutinefunction(metric.compute_batch):
        return True
    cls = metric if isinstance(metric, type) else type(metric)
    inherits_batch = cls.compute_batch is ImageMetric.compute_batch
    return inherits_batch and inspect.iscoroutinefunction(metric.compute)


def load_rgb_image(image: Path | str | Image, max_pixels: int | None = None) -> Image:
    """Decode an image file (or take a PIL image) as RGB, shrunk to ``max_pixels`` if given.

    The image is made RGB as vLLM makes an image it is sent, so that it looks the same to
    every judge: an RGBA one is flattened onto white, any other mode converted plainly (what
    lies under a transparent pixel of an LA, palette or RGB image shows, as in vLLM).

    Raises:
        ItemError: the file cannot be read, is not an image, or has more pixels than Pillow
            agrees to decode (a decompression bomb).
    """
    from PIL import Image as PILImage
    from PIL import UnidentifiedImageError

    quiet_pillow()  # a palette's transparency is dropped on purpose, as vLLM drops it
    if isinstance(image, str | Path):
        try:
            with PILImage.open(image) as opened:
                rgb = _as_vllm_makes_rgb(opened)
        except (UnidentifiedImageError, ValueError, SyntaxError):  # before OSError, its base
            raise ItemError(f"{image} is not a readable image") from None
        except OSError as exc:
            raise ItemError(f"cannot read image {image}: {exc.strerror or exc}") from None
        except PILImage.DecompressionBombError as exc:  # more pixels than Pillow decodes
            raise ItemError(f"cannot read image {image}: {exc}") from None
    else:
        rgb = image if image.mode == "RGB" else _as_vllm_makes_rgb(image)
    if max_pixels is not None and rgb.width * rgb.height > max_pixels:
        size = shrunk_size(rgb.width, rgb.height, max_pixels)
        rgb = rgb.resize(size, PILImage.Resampling.LANCZOS)
    return rgb


def _as_vllm_makes_rgb(image: Image) -> Image:
    """A copy of ``image`` in RGB as vLLM's ``convert_image_mode`` makes it: an RGBA one
    flattened onto white, any other mode converted plainly."""
    from PIL import Image as PILImage

    if image.mode != "RGBA":
        return image.convert("RGB")
    # As vLLM's rgba_to_rgb: an opaque pixel is pasted as it is, a transparent one left white.
    flat = PILImage.new("RGB", image.size, (255, 255, 255))
    flat.paste(image, mask=image.getchannel("A"))
    return flat
