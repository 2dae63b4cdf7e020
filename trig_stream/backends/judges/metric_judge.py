"""The ``metric`` judge: an image metric scoring the TRIG dimensions it measures.

Any image-level metric that names TRIG ``dimensions`` (see
:mod:`trig_stream.backends.metrics.base`) can stand beside the VLM judge in ``[[judges]]``;
its value becomes the judgement's score through the metric's ``dimension_score`` (in [0, 1],
higher is better, as TRIGScore). Concurrent requests are gathered into batches, like the
``transformers`` judge's, for metrics that are faster in batches. Example::

    [[judges]]
    name = "nsfw"
    backend = "metric"
    options = { metric = "nsfw" }

A metric answers only for the dimensions it measures. The NSFW classifier says nothing about
realism or text alignment, so the judge declares ``dimensions = {"R-T"}`` and is meant to be
asked about those alone; it does not register the others. Asked anyway about another
dimension, it raises :class:`~trig_stream.errors.ItemError` with the reason and never reports
a score: a number made up for a dimension the metric cannot see would enter the dimension's
mean and the DTM as if it were a measurement.

An ``async`` metric (a remote service) is awaited within ``timeout_s`` when it is set: a call
past it is cancelled and raised as an :class:`~trig_stream.errors.AnswerTimeoutError`, which
the engine retries (and, of a judge that has given no value yet, stops the run for), as the
openai judge's timeouts. Without it a hung call holds its judgement and a graceful stop.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import anyio
import anyio.to_thread
from pydantic import BaseModel, Field, ValidationError, model_validator

from trig_stream.backends.base import Judge, JudgeReply, JudgeRequest, PreparedImage
from trig_stream.backends.judges.batching import MicroBatcher
from trig_stream.backends.metrics.base import (
    ImageMetric,
    MetricInput,
    Value,
    checked_values,
    compute_async,
    is_async,
    load_rgb_image,
)
from trig_stream.backends.metrics.registry import import_metric
from trig_stream.backends.plugins import OptionsModelError, validate_plugin_options
from trig_stream.backends.threads import blocking_hook, cancellation_classes, load_in_thread
from trig_stream.config_fields import OPTIONS_CONFIG, CallTimeout
from trig_stream.config_problems import nested_problems
from trig_stream.dimensions import DIMENSIONS, Dimension, is_dimension
from trig_stream.errors import (
    AnswerTimeoutError,
    ConfigError,
    FatalBackendError,
    ItemError,
    RetryableError,
)
from trig_stream.pipeline import describe_error
from trig_stream.records import JudgeFingerprint

if TYPE_CHECKING:
    from trig_stream.config import JudgeConfig, RunConfig

T = TypeVar("T")

SUPPLIED_NEEDS: frozenset[str] = frozenset({"image"})
"""What the judge puts in each :class:`MetricInput` of the metric's ``needs`` (it adds the
sample and the dimension, which no metric declares)."""


class MetricJudgeOptions(BaseModel):
    """``options`` of the ``metric`` judge."""

    model_config = OPTIONS_CONFIG

    metric: str
    """The metric's registry name (``nsfw``, or one from an entry point)."""
    metric_options: dict[str, Any] = Field(default_factory=dict)
    """The metric's own options, checked by its ``Options`` model; a key that is no field of
    the model is refused unless the model takes any (``extra="allow"``)."""
    batch_size: Annotated[int, Field(ge=1, le=256)] = 8
    """The most images in one ``compute_batch`` call (sync metrics)."""
    max_pixels: Annotated[int, Field(ge=64)] | None = None
    """Shrink larger images to this many pixels before the metric sees them."""
    timeout_s: CallTimeout | None = None
    """The most one call of an ``async`` metric (a remote service) may take for an image; one
    past it is a timeout, retried. None: no limit, so such a metric must time out on its own
    (a call that never returns holds its judgement, and a graceful stop, for good). Refused
    for a sync metric, whose worker thread a timeout could not stop."""

    @model_validator(mode="after")
    def _check(self) -> MetricJudgeOptions:
        try:
            metric = import_metric(self.metric)  # ValueError lists the known names
        except (ImportError, TypeError) as exc:  # a third party's metric that is broken
            raise ValueError(str(exc)) from None
        if not issubclass(metric, ImageMetric):
            raise ValueError(
                f"metric {self.metric!r} gives one value for a whole set of images, not a score "
                "per image; a judge needs a per-image metric"
            )
        if "image" not in metric.needs:
            raise ValueError(
                f"metric {self.metric!r} reads a judge's answers, not images; TRIGScore comes "
                'from backend = "openai" or "transformers"'
                if "top_logprobs" in metric.needs
                else f"metric {self.metric!r} does not look at images"
            )
        unsupplied = sorted(str(need) for need in metric.needs if need not in SUPPLIED_NEEDS)
        if unsupplied:
            # Accepted, such a metric ran with those fields None and scored every image on
            # what it could see of it, as if it had read what it asked for.
            raise ValueError(
                f"metric {self.metric!r} needs {', '.join(map(repr, unsupplied))}, which the "
                f"metric judge does not supply: it gives a metric the image alone (with its "
                "sample and dimension); drop that need from the metric's `needs`, or score "
                "judges' answers after the run (the trigscore metric reads top_logprobs)"
            )
        if self.timeout_s is not None and not is_async(metric):
            # Its compute runs in a worker thread, which nothing can stop: the judgement would
            # end while the thread still held the metric (and the batcher) for the next one.
            raise ValueError(
                f"timeout_s applies to async metrics only (a remote service awaited in the "
                f"event loop), and metric {self.metric!r} is sync: its compute runs in a "
                "worker thread, which a timeout cannot stop; remove timeout_s (a sync metric "
                "must end its calls on its own)"
            )
        if not metric.dimensions:
            raise ValueError(f"metric {self.metric!r} measures no TRIG dimension")
        unknown = sorted(str(d) for d in metric.dimensions if not is_dimension(d))
        if unknown:
            raise ValueError(
                f"metric {self.metric!r} names unknown dimensions in its `dimensions`: "
                f"{', '.join(map(repr, unknown))}; TRIG's are {', '.join(DIMENSIONS)}"
            )
        try:
            validate_plugin_options(metric.Options, self.metric_options)
        except ValidationError as exc:
            problems = nested_problems(exc, metric.Options)
            raise ValueError(f"metric_options of {self.metric!r}: {problems}") from None
        except OptionsModelError as exc:  # a third party's validator raised a RuntimeError...
            raise ValueError(f"metric_options of {self.metric!r}: {exc}") from None
        return self

    def build_metric(self) -> ImageMetric:
        """A new instance of the metric with its options."""
        cls = import_metric(self.metric)
        assert issubclass(cls, ImageMetric)
        return cls(cls.Options.model_validate(self.metric_options))


class MetricJudge(Judge):
    """Scores the dimensions an image metric measures, with the metric's own value.

    Attributes:
        dimensions: the dimensions this judge scores; it should be asked about no other.

    Args:
        name: the metric's name in the run.
        options: the backend's options.
        concurrency: the most requests in flight.
    """

    Options = MetricJudgeOptions
    options: MetricJudgeOptions
    unreached_hint = (
        "does its metric answer at all (within the judge's timeout_s, when set), and is "
        "any service it calls running?"
    )

    def __init__(self, name: str, options: MetricJudgeOptions, *, concurrency: int = 16) -> None:
        super().__init__(name, options, concurrency=concurrency)
        try:
            self.metric = options.build_metric()
        except Exception as exc:  # a third party's __init__
            raise ConfigError(
                f"judge {name!r}: the {options.metric} metric cannot be made: {describe_error(exc)}"
            ) from exc
        self.dimensions: frozenset[Dimension] = type(self.metric).dimensions
        self._batcher: MicroBatcher[MetricInput, Value] | None = None
        self._open = False

    @classmethod
    def from_config(
        cls, entry: JudgeConfig, options: MetricJudgeOptions, config: RunConfig
    ) -> MetricJudge:
        """Build the judge a ``[[judges]]`` entry describes (nothing is loaded yet); the
        config refuses its ``scorer`` and ``confidence``, which the metric's scores ignore."""
        return cls(entry.name, options, concurrency=entry.concurrency)

    def __repr__(self) -> str:
        return f"MetricJudge(name={self.name!r}, metric={self.options.metric!r})"

    def fingerprint(self) -> JudgeFingerprint:
        """The metric's fingerprint with the judge's ``max_pixels`` beside its keys, or, when
        the metric has a ``max_pixels`` of its own, beside the whole of it (under
        ``"metric"``): the judge's value would replace the metric's, and a resume with
        another value of the metric's would go unseen. Only then, so that the fingerprints
        of existing runs stay as they were."""
        metric = self.metric.fingerprint()
        max_pixels = self.options.max_pixels
        if "max_pixels" in metric:
            params = {"metric": metric, "max_pixels": max_pixels}
        else:
            params = {**metric, "max_pixels": max_pixels}
        return JudgeFingerprint(backend="metric", model=self.options.metric, params=params)

    def check_environment(self) -> None:
        """What the metric needs from this machine (its optional dependencies).

        Raises:
            MissingExtraError: the metric's optional dependencies are not installed.
            FatalBackendError: the metric's check returned an awaitable, never awaited, or
                raised one (led by the judge and its metric, see :meth:`_named`).
        """
        blocking_hook(
            self._naming_failures(self.metric.check_environment),
            f"judge {self.name!r}: its metric's check_environment()",
        )()

    def opening(self) -> str:
        return f"loading the {self.options.metric} metric"

    def opens_slowly(self) -> bool:
        return True  # a model loaded from disk

    async def open(self) -> None:
        """Load the metric in a worker thread, which a hard stop does not wait for (a model
        loading from disk may take minutes): cancelled, the thread finishes the load and
        then closes the metric.

        Raises:
            MissingExtraError: the metric's optional dependencies are not installed.
            FatalBackendError: the metric's load raised one (led by the judge and its metric,
                see :meth:`_named`).
        """
        await load_in_thread(
            self._naming_failures(self.metric.load),
            self.metric.close,
            backend=f"judge {self.name!r}",
            instance=self,
        )
        if not is_async(self.metric):  # an async one is awaited, not run in a thread
            self._batcher = MicroBatcher(
                self._run_batch,
                batch_size=self.options.batch_size,
                buffer=self.concurrency,
                backend=f"judge {self.name!r}",
                instance=self,
            )
        self._open = True

    def stop_waiting(self) -> None:
        """A graceful stop: the batch running finishes, the requests queued raise
        :class:`~trig_stream.errors.NotAsked` (asked on resume). An async metric's calls
        wait in no queue: each in flight finishes."""
        if self._batcher is not None:
            self._batcher.stop_waiting()

    async def aclose(self) -> None:
        if not self._open:
            return
        self._open = False
        batcher, self._batcher = self._batcher, None
        close = blocking_hook(self.metric.close, f"judge {self.name!r}: its metric's close()")
        if batcher is not None:
            # After a batch a hard stop left running, in its thread: closed now, the metric
            # was freed under it (or, behind a lock, the stop waited for a hung batch).
            await batcher.aclose(close)
        else:
            await anyio.to_thread.run_sync(close)

    def prepare(self, path: Path) -> PreparedImage:
        """Decode the image once (a worker thread).

        Raises:
            ItemError: the file cannot be read or is not an image.
        """
        return PreparedImage(path=path, payload=load_rgb_image(path, self.options.max_pixels))

    async def judge(self, request: JudgeRequest) -> JudgeReply:
        if not self._open:
            raise RuntimeError("the judge is not open: call open() first")
        metric = self.metric
        if request.dimension not in self.dimensions:
            measured = ", ".join(sorted(self.dimensions))
            raise ItemError(
                f"the {metric.name} metric measures only {measured}; it gives no score for "
                f"{request.dimension}"
            )
        image = request.image.payload
        if image is None:
            raise ItemError(f"image {request.image.path} was not prepared by this judge")
        item = MetricInput(image=image, sample=request.sample, dimension=request.dimension)
        try:
            if self._batcher is not None:
                value = await self._batcher.submit(item)
            else:
                value = await self._computed(item)
        except FatalBackendError as exc:
            named = self._named(exc)
            if named is exc:
                raise
            raise named from exc
        if value is None:
            return JudgeReply(
                text=f"{metric.name}=None",
                unscorable=f"the {metric.name} metric found nothing to measure in this image",
            )
        score = metric.dimension_score(value, request.dimension)
        if isinstance(score, bool) or not isinstance(score, numbers.Real):
            # A bool passes the range check below (True <= 1), then no judgement takes it.
            raise ItemError(
                f"the {metric.name} metric's dimension_score gave a {type(score).__name__} "
                f"({score!r:.40}) for {request.dimension} (from its value {value!r}), where a "
                "score, a number in [0, 1], belongs"
            )
        score = float(score)
        if not 0.0 <= score <= 1.0:  # also refuses NaN
            raise ItemError(
                f"the {metric.name} metric gave {score!r} for {request.dimension} (from its "
                f"value {value!r}), outside the score range [0, 1]; a metric whose values lie "
                "elsewhere maps them to scores in its dimension_score"
            )
        return JudgeReply(score=score, text=f"{metric.name}={value:.6g}")

    async def _computed(self, item: MetricInput) -> Value:
        """An async metric's value for ``item``, within ``timeout_s`` when it is set.

        Raises:
            AnswerTimeoutError: the metric gave no value within ``timeout_s``; its call is
                cancelled (as the openai judge's request is), and the engine retries it.
        """
        timeout_s = self.options.timeout_s
        if timeout_s is None:
            return (await compute_async(self.metric, [item]))[0]
        # move_on_after, not fail_after: a TimeoutError the metric raises itself (its own
        # client's) is an image's failure, not this judge's timeout.
        with anyio.move_on_after(timeout_s):
            return (await compute_async(self.metric, [item]))[0]
        raise AnswerTimeoutError(
            f"judge {self.name!r}: the {self.metric.name} metric gave no value within "
            f"{timeout_s:g} s (the judge's timeout_s); raise timeout_s if the metric's service "
            "is only slow"
        )

    def _named(self, exc: FatalBackendError) -> FatalBackendError:
        """``exc``, the metric's error that stops the run, with the judge and its metric
        leading its message unless it names them: the metric's own words ("bad credentials")
        do not say which of a run's judges failed.

        A copy, to raise ``from`` it, so its class and attributes stay the metric's while
        the metric's own object stays as it was (one object a metric raises again, or two
        judges' metrics share, was named by the first judge for all). The copy is made
        without calling the class's ``__init__``, whose arguments are the metric's own; an
        error whose ``__str__`` ignores ``args`` gets a FatalBackendError that names them
        instead.
        """
        name = f"judge {self.name!r} ({self.options.metric} metric)"
        text = str(exc)
        if name in text:
            return exc
        led = f"{name}: {text}"
        try:
            named = FatalBackendError.__new__(type(exc))
            named.__dict__.update(vars(exc))
        except Exception:  # a class of slots, or of a __new__ of its own
            return FatalBackendError(led)
        if "__notes__" in vars(exc):
            named.__notes__ = list(exc.__notes__)  # its own list: a note added goes to one
        named.args = (led,)
        return named if name in str(named) else FatalBackendError(led)

    def _naming_failures(self, hook: Callable[[], T]) -> Callable[[], T]:
        """``hook``, a blocking method of the metric, raising its error that stops the run
        as :meth:`_named` leads it (as a value's is, in :meth:`judge`)."""

        def call() -> T:
            try:
                return hook()
            except FatalBackendError as exc:
                named = self._named(exc)
                if named is exc:
                    raise
                raise named from exc

        return call

    def _run_batch(self, items: Sequence[MetricInput]) -> list[Value | Exception]:
        try:
            # A sync metric (async ones skip the batcher).
            return list(checked_values(self.metric, self.metric.compute_batch(items), len(items)))
        except (RetryableError, FatalBackendError) as exc:
            # The metric's service or device, not one image: every item of the batch shares
            # the failure, which the engine retries (each item again) or stops the run for.
            return [exc] * len(items)
        except Exception as exc:
            if len(items) == 1:
                return [exc if isinstance(exc, ItemError) else ItemError(describe_error(exc))]
        except cancellation_classes() as exc:
            # Nothing cancels the metric's code in this worker thread: the exception is its
            # own (an asyncio.CancelledError of a future of its own), an image's failure as
            # with an async metric, not a reason to stop the run.
            if len(items) == 1:
                return [
                    ItemError(
                        f"the {self.metric.name} metric raised {type(exc).__name__} though "
                        "nothing cancelled it: a bug of the metric (a cancellation is no answer)"
                    )
                ]
        # One bad image must not fail the others: measure them one by one.
        return [value for item in items for value in self._run_batch([item])]
