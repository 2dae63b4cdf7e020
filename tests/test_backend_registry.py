"""Generator and judge backends of one's own: registered through the entry-point groups
``trig_stream.generators`` / ``trig_stream.judges`` or with ``register_backend``, used by a
config's ``backend``, and named with their entry point and distribution when broken."""

from __future__ import annotations

import functools
import re
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import pytest
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, RootModel, ValidationError, field_validator
from pydantic.alias_generators import to_camel

from tests.conftest import ConfigFactory, write_prompts
from trig_stream import cli, exit_codes
from trig_stream.backends import registry
from trig_stream.backends.base import (
    GenerationRequest,
    Generator,
    Judge,
    JudgeReply,
    JudgeRequest,
    PreparedImage,
)
from trig_stream.backends.generators.dtm_rewrite import DTMRewriteGenerator, DTMRewriteOptions
from trig_stream.backends.plugins import validate_plugin_options
from trig_stream.backends.registry import build_generator, register_backend
from trig_stream.config import GeneratorConfig, RunConfig
from trig_stream.engine import Engine
from trig_stream.errors import ConfigError
from trig_stream.records import JudgeFingerprint

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def registered(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test registers its own backends, and leaves none behind."""
    monkeypatch.setattr(registry, "_REGISTERED", {"generators": {}, "judges": {}})


THIRD_PARTY = '''
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator

from trig_stream.backends.base import Generator, Judge, JudgeReply
from trig_stream.records import JudgeFingerprint


class FlatOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grey: int = 128


class Flat(Generator):
    """Every image one grey."""

    Options = FlatOptions

    def __init__(self, name, options):
        self.name = name
        self.options = options

    @classmethod
    def from_config(cls, entry, options, config):
        return cls(entry.name, options)

    def fingerprint(self):
        return {"backend": "tp_flat", "grey": self.options.grey}

    def generate(self, requests, *, worker, cancel):
        return [Image.new("RGB", (16, 16), (self.options.grey,) * 3) for _ in requests]


class ConstantOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    score: float = 0.5


class Constant(Judge):
    """The same score for every image."""

    Options = ConstantOptions

    def fingerprint(self):
        return JudgeFingerprint(
            backend="tp_constant", model="constant", scorer=self.scorer,
            confidence=self.confidence, params={"score": self.options.score},
        )

    async def judge(self, request):
        return JudgeReply(score=self.options.score)


def not_a_class():
    return Flat


class NotAGenerator:
    Options = FlatOptions

    @classmethod
    def from_config(cls, entry, options, config):
        return cls()


class NoOptions(Generator):
    @classmethod
    def from_config(cls, entry, options, config):
        return cls()

    def fingerprint(self):
        return {}

    def generate(self, requests, *, worker, cancel):
        return []


class DictOptions(NoOptions):
    Options = {"grey": int}


class NoFromConfig(Generator):
    Options = FlatOptions

    def fingerprint(self):
        return {}

    def generate(self, requests, *, worker, cancel):
        return []


class Abstract(Generator):
    Options = FlatOptions

    @classmethod
    def from_config(cls, entry, options, config):
        return cls()

    def fingerprint(self):
        return {}


class NoGPU(Flat):
    @classmethod
    def from_config(cls, entry, options, config):
        raise RuntimeError("no GPU")


class ReturnsNothing(Flat):
    @classmethod
    def from_config(cls, entry, options, config):
        return None


class NoKey(Constant):
    def __init__(self, name, options, **kwargs):
        raise KeyError("TP_API_KEY")


class AsyncLoad(Flat):
    async def load(self):
        raise AssertionError("never awaited")


class PlainJudge(Constant):
    def judge(self, request):
        return JudgeReply(score=self.options.score)
'''

GENERATORS = {
    "tp_flat": "thirdparty_backends:Flat",
    "tp_gone": "no_such_module_xyz:Thing",
    "tp_missing": "thirdparty_backends:DoesNotExist",
    "tp_function": "thirdparty_backends:not_a_class",
    "tp_plain_class": "thirdparty_backends:NotAGenerator",
    "tp_judge": "thirdparty_backends:Constant",
    "tp_no_options": "thirdparty_backends:NoOptions",
    "tp_dict_options": "thirdparty_backends:DictOptions",
    "tp_no_from_config": "thirdparty_backends:NoFromConfig",
    "tp_abstract": "thirdparty_backends:Abstract",
    "tp_no_gpu": "thirdparty_backends:NoGPU",
    "tp_returns_nothing": "thirdparty_backends:ReturnsNothing",
    "tp_async_load": "thirdparty_backends:AsyncLoad",
}
JUDGES = {
    "tp_constant": "thirdparty_backends:Constant",
    "tp_generator": "thirdparty_backends:Flat",
    "tp_no_key": "thirdparty_backends:NoKey",
    "tp_exits": "thirdparty_exits:Judge",
    "tp_interrupts": "thirdparty_interrupts:Judge",
    "tp_plain_judge": "thirdparty_backends:PlainJudge",
}


@pytest.fixture
def third_party(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An installed distribution, ``thirdparty-backends 2.0``, declaring backends good and bad."""
    (tmp_path / "thirdparty_backends.py").write_text(THIRD_PARTY)
    (tmp_path / "thirdparty_exits.py").write_text("import sys\nsys.exit(3)\n")
    (tmp_path / "thirdparty_interrupts.py").write_text("raise KeyboardInterrupt\n")
    info = tmp_path / "thirdparty_backends-2.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: thirdparty-backends\nVersion: 2.0\n"
    )
    lines = ["[trig_stream.generators]"]
    lines += [f"{name} = {value}" for name, value in GENERATORS.items()]
    lines += ["", "[trig_stream.judges]"]
    lines += [f"{name} = {value}" for name, value in JUDGES.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for module in ("thirdparty_backends", "thirdparty_exits", "thirdparty_interrupts"):
        monkeypatch.delitem(sys.modules, module, raising=False)


def write_config(tmp_path: Path, generator: str, judge: str) -> Path:
    """A config with one model and one judge of these backends, over four prompts."""
    write_prompts(tmp_path / "prompts.json", 4)
    path = tmp_path / "run.toml"
    path.write_text(
        '[run]\nname = "own"\noutput_dir = "runs"\n\n[dataset]\npath = "prompts.json"\n\n'
        f'[[generators]]\nname = "mine"\nbackend = "{generator}"\n\n'
        f'[[judges]]\nname = "trigscore"\nbackend = "{judge}"\n'
    )
    return path


async def run_all(config: RunConfig) -> list[tuple[str, str, float | None]]:
    async with Engine(config) as engine:
        return [(j.model, j.status, j.score) async for j in engine.results]


async def test_backends_from_entry_points_are_used_by_name(
    third_party: None, make_config: ConfigFactory
) -> None:
    config = make_config(
        samples=3,
        generators=[{"name": "mine", "backend": "tp_flat", "options": {"grey": 40}}],
        judges=[{"name": "trigscore", "backend": "tp_constant", "options": {"score": 0.25}}],
    )
    judged = await run_all(config)
    assert len(judged) == 6  # two dimensions per sample
    assert set(judged) == {("mine", "ok", 0.25)}
    assert set(registry.backend_names("generators")) >= {"synthetic", "tp_flat", "tp_gone"}
    assert "tp_constant" in registry.backend_names("judges")


def test_validate_lists_backends_from_entry_points(
    third_party: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, "tp_flat", "tp_constant")
    assert cli.main(["validate", str(path)]) == exit_codes.EXIT_OK
    out = capsys.readouterr().out
    assert "models: mine (tp_flat)" in out
    assert "judges: trigscore (tp_constant)" in out


class Checkerboard(Generator):
    """Black and white squares, a registered generator."""

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        squares: int = 4

    def __init__(self, name: str, options: Checkerboard.Options) -> None:
        self.name = name
        self.options = options

    @classmethod
    def from_config(
        cls, entry: GeneratorConfig, options: Checkerboard.Options, config: RunConfig
    ) -> Checkerboard:
        return cls(entry.name, options)

    def fingerprint(self) -> dict[str, Any]:
        return {"backend": "checkerboard", "squares": self.options.squares}

    def generate(
        self, requests: Sequence[GenerationRequest], *, worker: int, cancel: threading.Event
    ) -> list[Image.Image]:
        side = self.options.squares * 4
        image = Image.new("L", (side, side))
        image.putdata([255 * ((x // 4 + y // 4) % 2) for y in range(side) for x in range(side)])
        return [image.convert("RGB") for _ in requests]


class Halves(Judge):
    """A score of one half, a registered judge."""

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")

    def fingerprint(self) -> JudgeFingerprint:
        return JudgeFingerprint(
            backend="halves", model="halves", scorer=self.scorer, confidence=self.confidence
        )

    async def judge(self, request: JudgeRequest) -> JudgeReply:
        return JudgeReply(score=0.5)


async def test_registered_backends_are_used_by_name(make_config: ConfigFactory) -> None:
    register_backend("generators", "checkerboard", Checkerboard)
    register_backend("judges", "halves", Halves)
    config = make_config(
        samples=2,
        generators=[{"name": "mine", "backend": "checkerboard", "options": {"squares": 2}}],
        judges=[{"name": "trigscore", "backend": "halves"}],
    )
    assert set(await run_all(config)) == {("mine", "ok", 0.5)}
    assert "checkerboard" in registry.backend_names("generators")


def test_validate_lists_registered_backends(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    register_backend("generators", "checkerboard", Checkerboard)
    register_backend("judges", "halves", Halves)
    assert cli.main(["validate", str(write_config(tmp_path, "checkerboard", "halves"))]) == 0
    out = capsys.readouterr().out
    assert "models: mine (checkerboard)" in out
    assert "judges: trigscore (halves)" in out


def test_an_options_table_a_backend_does_not_take_names_the_key(
    make_config: ConfigFactory,
) -> None:
    register_backend("generators", "checkerboard", Checkerboard)
    with pytest.raises(ConfigError, match=r"generators\[0\]\.options\.sqares: unknown key"):
        make_config(generators=[{"name": "m", "backend": "checkerboard", "options": {"sqares": 2}}])


class LenientBoard(Checkerboard):
    """A registered generator whose Options is a plain BaseModel (pydantic's default: unknown
    keys ignored), with an alias, and a validator that fails with a RuntimeError on 13."""

    class Options(BaseModel):
        squares: int = 4
        border: int = Field(default=0, alias="margin")

        @field_validator("squares")
        @classmethod
        def _unlucky(cls, squares: int) -> int:
            if squares == 13:
                raise RuntimeError("validator boom")
            return squares


def test_a_key_a_plain_pydantic_options_model_does_not_take_is_refused(
    make_config: ConfigFactory,
) -> None:
    # Pydantic ignores it by default: `sqares = 2` passed validate and ran with 4 squares.
    register_backend("generators", "lenient", LenientBoard)
    entry = {"name": "m", "backend": "lenient", "options": {"sqares": 2}}
    with pytest.raises(
        ConfigError,
        match=re.escape("generators[0].options.sqares: unknown key; did you mean 'squares'?"),
    ):
        make_config(generators=[entry])
    config = make_config(generators=[{**entry, "options": {"squares": 2, "margin": 1}}])
    generator = build_generator(config.generators[0], config)
    assert isinstance(generator, LenientBoard)
    assert generator.options.squares == 2
    assert (
        cast("LenientBoard.Options", generator.options).border == 1
    )  # an alias is a key the model takes
    # A config made in code is checked alike when the generator is built.
    made = config.model_copy(
        update={"generators": [config.generators[0].model_copy(update={"options": {"sqares": 2}})]}
    )
    with pytest.raises(ConfigError, match=r"generator 'm': options: sqares: unknown key"):
        build_generator(made.generators[0], made)


class Aliased(BaseModel):
    """Options whose one field is read by its alias only (no validation by name)."""

    squares: int = Field(4, alias="Squares")


class AliasedByName(Aliased):
    model_config = ConfigDict(validate_by_name=True)


class Camel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel)

    square_size: int = 1


class Table(RootModel[dict[str, int]]):
    """Options that are a table of anything (keys of the user's own)."""


class Board(RootModel[Aliased]):
    """Options whose root is a model: its keys are that model's."""


class MaybeBoard(RootModel[Aliased | None]):
    """Options whose root is a model or None."""


class Renamed(BaseModel):
    """A field whose validation alias replaces its alias (which pydantic then ignores)."""

    squares: int = Field(4, alias="serialised", validation_alias="given")


class NamesOnly(BaseModel):
    model_config = ConfigDict(validate_by_alias=False, validate_by_name=True)

    squares: int = Field(4, alias="Squares")


def test_plugin_options_take_the_keys_pydantic_reads_and_no_other() -> None:
    # A field's name beside an alias that pydantic does not read by name passed the check
    # and ran with the default; a RootModel's every key was refused.
    refused = (
        (Aliased, "squares"),
        (Camel, "square_size"),
        (Board, "sqares"),
        (MaybeBoard, "sqares"),
        (Renamed, "serialised"),
        (NamesOnly, "Squares"),
    )
    for model, key in refused:
        with pytest.raises(ValidationError, match="extra_forbidden"):
            validate_plugin_options(model, {key: 2})
    assert validate_plugin_options(Board, {"Squares": 2}).root.squares == 2
    assert validate_plugin_options(Renamed, {"given": 2}).squares == 2
    assert validate_plugin_options(NamesOnly, {"squares": 2}).squares == 2
    assert validate_plugin_options(Aliased, {"Squares": 2}).squares == 2
    assert validate_plugin_options(Camel, {"squareSize": 2}).square_size == 2
    assert validate_plugin_options(AliasedByName, {"squares": 2}).squares == 2
    assert validate_plugin_options(Table, {"a": 1}).root == {"a": 1}
    with pytest.raises(ValidationError):
        validate_plugin_options(Table, {"a": "many"})


def test_an_options_validator_raising_no_value_error_is_a_config_error(
    make_config: ConfigFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A RuntimeError from a third party's validator was a traceback (exit 1).
    register_backend("generators", "lenient", LenientBoard)
    message = (
        "RuntimeError: validator boom (raised by its Options model, Options, which should "
        "raise ValueError for a value it refuses; fix the package that declares it)"
    )
    entry = {"name": "m", "backend": "lenient", "options": {"squares": 13}}
    with pytest.raises(ConfigError, match=re.escape(f"generators[0].options: {message}")):
        make_config(generators=[entry])
    config = make_config(generators=[{**entry, "options": {}}])
    made = config.model_copy(
        update={
            "generators": [config.generators[0].model_copy(update={"options": {"squares": 13}})]
        }
    )
    with pytest.raises(ConfigError, match=re.escape(f"generator 'm': options: {message}")):
        build_generator(made.generators[0], made)


BROKEN = [
    (
        "generators",
        "tp_gone",
        "cannot be imported: ModuleNotFoundError: No module named 'no_such_module_xyz'; fix or "
        "reinstall the package that declares it",
    ),
    (
        "generators",
        "tp_missing",
        "cannot be imported: AttributeError: module 'thirdparty_backends' has no attribute "
        "'DoesNotExist'",
    ),
    ("generators", "tp_function", "is <function not_a_class at"),
    (
        "generators",
        "tp_plain_class",
        "NotAGenerator'>, not a subclass of trig_stream's Generator (trig_stream.backends.base)",
    ),
    ("generators", "tp_judge", "Constant'>, not a subclass of trig_stream's Generator"),
    ("judges", "tp_generator", "Flat'>, not a subclass of trig_stream's Judge"),
    ("generators", "tp_no_options", "is NoOptions, which has no Options: give the class an"),
    ("generators", "tp_dict_options", "is DictOptions, whose Options is {'grey': <class 'int'>}"),
    ("generators", "tp_no_from_config", "is NoFromConfig, which has no from_config: give the"),
    ("generators", "tp_abstract", "is Abstract, an abstract class: it does not define generate"),
    # Was named without its entry point and distribution (only the instance was checked).
    (
        "generators",
        "tp_async_load",
        "is AsyncLoad, whose load() is a coroutine function (async def), and the engine calls "
        "it in a worker thread, where nothing would await it: define it as a plain `def load(",
    ),
    # Was named without its entry point and distribution (only the instance was checked).
    (
        "judges",
        "tp_plain_judge",
        "is PlainJudge, whose judge() is no coroutine function, and the engine awaits it: "
        "define it as `async def judge(self, request)`",
    ),
    # sys.exit() on import ended validate and run with its code (3: "run directory refused")
    # and no message; KeyboardInterrupt as a Ctrl-C (exit 130).
    ("judges", "tp_exits", "cannot be imported: SystemExit: 3; fix or reinstall the package"),
    ("judges", "tp_interrupts", "cannot be imported: KeyboardInterrupt; fix or reinstall"),
]


@pytest.mark.parametrize(("kind", "backend", "message"), BROKEN, ids=[b for _, b, _ in BROKEN])
def test_a_broken_entry_point_is_a_config_error_naming_it(
    third_party: None,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    kind: str,
    backend: str,
    message: str,
) -> None:
    # Each was a traceback (exit 1) from validate and run: ModuleNotFoundError, AttributeError...
    generator, judge = (backend, "fake") if kind == "generators" else ("synthetic", backend)
    path = write_config(tmp_path, generator, judge)
    value = (GENERATORS if kind == "generators" else JUDGES)[backend]
    named = (
        f"{kind}[0].backend: {kind[:-1]} backend {backend!r} (entry point {backend} = "
        f"{value!r} of thirdparty-backends 2.0)"
    )
    for command in (["validate"], ["run", "--headless", "--no-report"]):
        assert cli.main([*command, str(path)]) == exit_codes.EXIT_CONFIG
        err = capsys.readouterr().err
        assert "Traceback" not in err
        assert err.startswith(f"error: {path}: invalid config (1 problem)\n  {path}:")
        assert named in err
        assert message in err
    assert not (tmp_path / "runs").exists()


BROKEN_WHEN_MADE = [
    ("generators", "tp_no_gpu", "cannot be made: RuntimeError: no GPU"),
    ("generators", "tp_returns_nothing", "its from_config returned None, not a Generator"),
    ("judges", "tp_no_key", "cannot be made: KeyError: 'TP_API_KEY'"),
]


@pytest.mark.parametrize(
    ("kind", "backend", "message"), BROKEN_WHEN_MADE, ids=[b for _, b, _ in BROKEN_WHEN_MADE]
)
def test_a_backend_that_cannot_be_made_is_a_config_error_naming_it(
    third_party: None,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    kind: str,
    backend: str,
    message: str,
) -> None:
    # from_config or __init__ raising was a traceback (exit 1) from validate and run.
    generator, judge = (backend, "fake") if kind == "generators" else ("synthetic", backend)
    path = write_config(tmp_path, generator, judge)
    value = (GENERATORS if kind == "generators" else JUDGES)[backend]
    name = "mine" if kind == "generators" else "trigscore"
    named = (
        f"error: {kind[:-1]} {name!r}: backend {backend!r} (entry point {backend} = "
        f"{value!r} of thirdparty-backends 2.0)"
    )
    for command in (["validate"], ["run", "--headless", "--no-report"]):
        assert cli.main([*command, str(path)]) == exit_codes.EXIT_CONFIG
        err = capsys.readouterr().err
        assert "Traceback" not in err
        assert err.startswith(named)
        assert message in err
    assert not (tmp_path / "runs").exists()


def test_register_backend_refuses_what_is_no_backend() -> None:
    with pytest.raises(TypeError, match="generator backend 'x' is <class 'str'>, not a subclass"):
        register_backend("generators", "x", str)
    with pytest.raises(TypeError, match=r"judge backend 'x' is <class '.*Checkerboard'>, not a"):
        register_backend("judges", "x", Checkerboard)
    with pytest.raises(ValueError, match="kind is 'generators' or 'judges', not 'generator'"):
        register_backend("generator", "x", Checkerboard)  # type: ignore[arg-type]
    assert registry._REGISTERED == {"generators": {}, "judges": {}}


def test_a_broken_inner_backend_of_dtm_rewrite_is_a_config_error(
    third_party: None, make_config: ConfigFactory
) -> None:
    # The wrapper checks its inner generator's options: the abstract class passed that check
    # (and was a traceback once built).
    inner = {"backend": "tp_abstract"}
    options = {"inner": inner, "model": "m", "relations": {"IQ-R_TA-C": 0}}
    with pytest.raises(
        ConfigError,
        match=re.escape(
            "generators[0].options.inner: generator backend 'tp_abstract' (entry point "
            "tp_abstract = 'thirdparty_backends:Abstract' of thirdparty-backends 2.0) is "
            "Abstract, an abstract class: it does not define generate"
        ),
    ):
        make_config(generators=[{"name": "m", "backend": "dtm_rewrite", "options": options}])


class Unplugged(Checkerboard):
    @classmethod
    def from_config(
        cls, entry: GeneratorConfig, options: Checkerboard.Options, config: RunConfig
    ) -> Unplugged:
        raise OSError("camera unplugged")


def test_a_registered_backend_that_cannot_be_made_is_a_config_error(
    make_config: ConfigFactory,
) -> None:
    register_backend("generators", "unplugged", Unplugged)
    config = make_config(generators=[{"name": "m", "backend": "unplugged"}])
    with pytest.raises(
        ConfigError,
        match=re.escape(
            "generator 'm': backend 'unplugged' (registered with register_backend) cannot be "
            "made: OSError: camera unplugged"
        ),
    ):
        build_generator(config.generators[0], config)


class PlainHalves(Halves):
    """A registered judge whose ``judge`` is a plain ``def``: the engine cannot await it."""

    def judge(self, request: JudgeRequest) -> JudgeReply:  # type: ignore[override]
        return JudgeReply(score=0.5)


async def test_a_judge_whose_judge_is_no_coroutine_function_is_refused(
    make_config: ConfigFactory,
) -> None:
    # Every request became an `error` judgement ("object JudgeReply can't be used in 'await'
    # expression"), which --retry-errors asked again forever.
    with pytest.raises(
        TypeError,
        match=re.escape(
            "judge backend 'plain_halves' is PlainHalves, whose judge() is no coroutine "
            "function, and the engine awaits it: define it as `async def judge(self, request)`"
        ),
    ):
        register_backend("judges", "plain_halves", PlainHalves)
    message = (
        "judge 'plain' (PlainHalves): its judge() is no coroutine function, and the engine "
        "awaits it: define it as `async def judge(self, request)`"
    )
    with pytest.raises(ConfigError, match=re.escape(message)):
        Engine(make_config(samples=2), judges=[PlainHalves("plain", PlainHalves.Options())])


class AsyncLoadBoard(Checkerboard):
    """A registered generator whose ``load`` is ``async def``: called in a worker thread."""

    async def load(self) -> None:  # type: ignore[override]
        raise AssertionError("never awaited")


class AsyncPrepareHalves(Halves):
    """A registered judge whose ``prepare`` (called in a worker thread) is ``async def``."""

    async def prepare(self, path: Path) -> PreparedImage:  # type: ignore[override]
        raise AssertionError("never awaited")


async def test_a_backend_hook_called_in_a_thread_that_is_async_is_refused(
    make_config: ConfigFactory,
) -> None:
    # Its coroutine was never awaited: the run went on as if the generator had loaded, with
    # a RuntimeWarning alone.
    message = (
        "generator backend 'async_load' is AsyncLoadBoard, whose load() is a coroutine function "
        "(async def), and the engine calls it in a worker thread, where nothing would await "
        "it: define it as a plain `def load(...)`"
    )
    with pytest.raises(TypeError, match=re.escape(message)):
        register_backend("generators", "async_load", AsyncLoadBoard)
    generator = AsyncLoadBoard("g", AsyncLoadBoard.Options())
    with pytest.raises(ConfigError, match=re.escape("generator 'g' (AsyncLoadBoard): its load()")):
        Engine(make_config(samples=2), generators=[generator])
    judge = AsyncPrepareHalves("h", AsyncPrepareHalves.Options())
    with pytest.raises(
        ConfigError, match=re.escape("judge 'h' (AsyncPrepareHalves): its prepare()")
    ):
        Engine(make_config(samples=2), judges=[judge])


class AsyncGenerateBoard(Checkerboard):
    """A generator whose ``generate`` (called in a worker thread) is ``async def``."""

    async def generate(  # type: ignore[override]
        self, requests: Sequence[GenerationRequest], *, worker: int, cancel: threading.Event
    ) -> list[Image.Image]:
        raise AssertionError("never awaited")


@pytest.mark.parametrize(
    ("inner", "hook"), [(AsyncLoadBoard, "load"), (AsyncGenerateBoard, "generate")]
)
async def test_an_async_hook_of_a_wrapped_generator_is_refused(
    make_config: ConfigFactory, tmp_path: Path, inner: type[Checkerboard], hook: str
) -> None:
    # dtm_rewrite calls its inner generator's hooks from its own: an inner `async def load`
    # ran unloaded (every judgement an error, exit 0), an `async def generate` failed the
    # run after its directory was made; the same hook at the top level was refused.
    options = DTMRewriteOptions.model_validate(
        {"inner": {"backend": "synthetic"}, "model": "m", "relations": {"IQ-R_TA-C": 0}}
    )
    wrapper = DTMRewriteGenerator("g", options, inner("g", inner.Options()))
    config = make_config(samples=2)
    message = (
        f"generator 'g' (DTMRewriteGenerator), whose inner generator is {inner.__name__}: its "
        f"{hook}() is a coroutine function (async def), and the engine calls it in a worker "
        f"thread, where nothing would await it: define it as a plain `def {hook}(...)`"
    )
    with pytest.raises(ConfigError, match=re.escape(message)):
        Engine(config, generators=[wrapper])
    assert not (tmp_path / "runs").exists()


def test_an_inner_backend_of_dtm_rewrite_with_an_async_hook_names_its_entry_point(
    third_party: None, make_config: ConfigFactory
) -> None:
    # Built through the registry, its class is refused where the config names it.
    options = {"inner": {"backend": "tp_async_load"}, "model": "m", "relations": {"IQ-R_TA-C": 0}}
    with pytest.raises(
        ConfigError,
        match=re.escape(
            "generators[0].options.inner: generator backend 'tp_async_load' (entry point "
            "tp_async_load = 'thirdparty_backends:AsyncLoad' of thirdparty-backends 2.0) is "
            "AsyncLoad, whose load() is a coroutine function (async def)"
        ),
    ):
        make_config(generators=[{"name": "m", "backend": "dtm_rewrite", "options": options}])


async def answer_with(score: float, request: JudgeRequest) -> JudgeReply:
    return JudgeReply(score=score)


def passing_on(function: Any) -> Any:
    """A plain decorator of an ``async def`` function: calling it gives that coroutine."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return function(*args, **kwargs)

    return wrapper


@pytest.mark.parametrize(
    "judge",
    [
        functools.partial(answer_with, 0.5),
        passing_on(functools.partial(answer_with, 0.5)),
        functools.partial(Halves("h", Halves.Options()).judge),
    ],
    ids=["partial", "decorated-partial", "partial-of-a-bound-method"],
)
async def test_a_judge_whose_judge_gives_a_coroutine_is_accepted(
    make_config: ConfigFactory, judge: Any
) -> None:
    halves = Halves("trigscore", Halves.Options())
    halves.judge = judge  # type: ignore[method-assign]
    async with Engine(make_config(samples=2), judges=[halves]) as engine:
        summary = await engine.drain()
    assert (summary.state, summary.ok, summary.error) == ("done", summary.judged, 0)
    assert summary.judged > 0
