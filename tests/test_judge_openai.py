"""The ``openai`` judge against the loopback server: request shape, replies, failure classes.

aiohttp runs on asyncio only, so these tests do too.
"""

from __future__ import annotations

import base64
import email.utils
import io
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import anyio
import pytest
from PIL import Image
from pydantic import TypeAdapter

from trig_stream.backends.base import JudgeRequest
from trig_stream.backends.judges.endpoints import REST_MAX_S, Endpoint
from trig_stream.backends.judges.http_errors import parse_retry_after
from trig_stream.backends.judges.openai_judge import OpenAIJudge
from trig_stream.backends.judges.openai_options import OpenAIJudgeOptions, same_endpoint_key
from trig_stream.backends.judges.payloads import reply_of
from trig_stream.backends.judges.templates import BUILTIN_VERSION, SCALE
from trig_stream.backends.judges.transports import Client, EncodedImage, Transport
from trig_stream.backends.metrics.base import load_rgb_image
from trig_stream.dimensions import Dimension, Task
from trig_stream.errors import (
    AnswerTimeoutError,
    FatalBackendError,
    ItemError,
    NotFoundError,
    RateLimitError,
    RetryableError,
    UnreachableError,
)
from trig_stream.records import Sample, TopLogprobs
from trig_stream.scoring import SCORING_RULES, score_top_logprobs
from trig_stream.testing.judge_images import as_vllm_sees
from trig_stream.testing.judge_options import JudgeServerOptions
from trig_stream.testing.judge_server import JudgeServer

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=["aiohttp", "sdk", "http"])
def client(request: pytest.FixtureRequest) -> Client:
    """Every transport: each request and failure must come out the same through each."""
    name: Client = request.param
    return name


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "image.png"
    Image.new("RGB", (24, 16), (30, 120, 200)).save(path)
    return path


def sample(task: Task = "t2i", item: str | None = None) -> Sample:
    return Sample(
        data_id="IQ-R_TA-C_1",
        task=task,
        prompt="a blue square on a table",
        dimensions=("IQ-R", "TA-C"),
        item=item,
    )


@asynccontextmanager
async def judge_at(server: JudgeServer, **options: Any) -> AsyncIterator[OpenAIJudge]:
    judge = OpenAIJudge(
        "trigscore", OpenAIJudgeOptions(base_url=server.base_url, model="judge", **options)
    )
    await judge.open()
    try:
        yield judge
    finally:
        await judge.aclose()


async def ask(
    judge: OpenAIJudge,
    path: Path,
    task: Task = "t2i",
    dimension: Dimension = "IQ-R",
    item: str | None = None,
) -> Any:
    prepared = judge.prepare(path)
    return await judge.judge(JudgeRequest("model-a", sample(task, item), dimension, prepared, 1))


# -- request shape ------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["t2i", "p2p", "s2p"])
async def test_request_shape_per_task(task: Task, image: Path, client: Client) -> None:
    options = JudgeServerOptions(record_requests=True)
    async with JudgeServer(options) as server, judge_at(server, client=client) as judge:
        item = "corgi" if task == "s2p" else None
        for dimension in ("IQ-R", "TA-C"):
            reply = await ask(judge, image, task, dimension, item)
            assert reply.top_logprobs and len(reply.top_logprobs) == 20
            assert score_top_logprobs(reply.top_logprobs, scorer="trig") is not None
            assert score_top_logprobs(reply.top_logprobs, scorer="robust") is not None
    first, second = server.received
    assert first["model"] == "judge"
    assert first["logprobs"] is True
    assert first["top_logprobs"] == 20
    assert first["max_tokens"] == 1
    assert first["temperature"] == 1.0
    assert "seed" not in first
    system, user = first["messages"]
    assert system["role"] == "system" and user["role"] == "user"
    assert "(IQ-R)" in system["content"] and "(TA-C)" in second["messages"][0]["content"]
    assert SCALE in system["content"] and "one word" in system["content"]
    image_part, text_part = user["content"]
    assert image_part["type"] == "image_url"
    assert image_part["image_url"]["url"].startswith("data:image/png;base64,")
    assert text_part["type"] == "text" and text_part["text"].endswith("a blue square on a table")
    # Both dimension questions about an image carry the same user message (prefix sharing).
    assert second["messages"][1] == user
    if task == "s2p":
        assert '"corgi"' in system["content"] and "corgi" in text_part["text"]
    else:
        assert "corgi" not in str(first)
    assert server.stats().repeated == 0


async def test_file_mode_seed_and_limits(image: Path, client: Client) -> None:
    options = JudgeServerOptions(record_requests=True, allowed_local_media_path=image.parent)
    async with (
        JudgeServer(options) as server,
        judge_at(
            server,
            client=client,
            image_mode="file",
            seed=7,
            top_logprobs=5,
            max_tokens=3,
            temperature=0.0,
        ) as judge,
    ):
        reply = await ask(judge, image)
    body = server.received[0]
    expected_url = image.resolve().as_uri()  # noqa: ASYNC240 - a path computation, no I/O to speak of
    assert body["messages"][1]["content"][0]["image_url"]["url"] == expected_url
    assert (body["seed"], body["top_logprobs"], body["max_tokens"], body["temperature"]) == (
        7,
        5,
        3,
        0.0,
    )
    assert reply.top_logprobs is not None and len(reply.top_logprobs) == 5


@pytest.mark.parametrize("allowed", [None, "elsewhere", "link"])
async def test_file_urls_only_from_the_allowed_folder(
    image: Path, tmp_path: Path, allowed: str | None
) -> None:
    # As vLLM: no file URL without --allowed-local-media-path, none outside that folder (a
    # link out of it included), each a 400 saying why, which the judge reports.
    folder = None if allowed is None else tmp_path / "allowed"
    path = image
    if folder is not None:
        folder.mkdir()
        if allowed == "link":
            path = folder / "link.png"
            path.symlink_to(image)
    options = JudgeServerOptions(allowed_local_media_path=folder)
    async with JudgeServer(options) as server, judge_at(server, image_mode="file") as judge:
        with pytest.raises(ItemError, match="allowed-local-media-path") as raised:
            await ask(judge, path)
    reason = "cannot load local files" if folder is None else "must be a subpath"
    assert reason in str(raised.value)


async def test_file_urls_refused_from_the_start_stop_the_run_naming_the_server_option(
    image: Path,
) -> None:
    from trig_stream.backends.judges.http_errors import REFUSALS_TO_STOP

    async with JudgeServer() as server, judge_at(server, image_mode="file") as judge:
        for _ in range(REFUSALS_TO_STOP - 1):
            with pytest.raises(ItemError):
                await ask(judge, image)
        with pytest.raises(FatalBackendError) as raised:
            await ask(judge, image)
    assert (
        "image_mode = 'file' against --allowed-local-media-path (a folder that holds the run's "
        "images))" in str(raised.value)
    )
    # The last refusal is its request's error too, kept as the others are (the message says so).
    refused = raised.value.request_error
    assert isinstance(refused, ItemError) and "cannot load local files" in str(refused)


@pytest.mark.parametrize(
    ("run_folder", "allowed_folder"),
    [("safety-r7", "elsewhere"), ("runs", "content-policy"), ("run #1 moderation%", "elsewhere")],
)
async def test_file_urls_refused_stop_the_run_whatever_words_their_folders_hold(
    tmp_path: Path, run_folder: str, allowed_folder: str | None
) -> None:
    # vLLM's refusal quotes the file's path and the allowed folder: a run named "safety-r7"
    # read as a content filter's refusal, which never counts, and the run ended exit 0 with
    # every judgement an error.
    from trig_stream.backends.judges.http_errors import REFUSALS_TO_STOP

    path = tmp_path / run_folder / "image.png"
    path.parent.mkdir()
    Image.new("RGB", (24, 16), (30, 120, 200)).save(path)
    allowed = None if allowed_folder is None else tmp_path / allowed_folder
    if allowed is not None:
        allowed.mkdir()
    options = JudgeServerOptions(allowed_local_media_path=allowed)
    async with JudgeServer(options) as server, judge_at(server, image_mode="file") as judge:
        for _ in range(REFUSALS_TO_STOP - 1):
            with pytest.raises(ItemError, match="allowed-local-media-path") as caught:
                await ask(judge, path)
            assert not isinstance(caught.value, FatalBackendError)
        with pytest.raises(FatalBackendError, match="against --allowed-local-media-path"):
            await ask(judge, path)


@pytest.mark.parametrize("run_folder", ["safety-r7", "policy review #1 %20"])
async def test_refusals_quoting_the_image_s_path_stop_the_run_whatever_words_it_holds(
    tmp_path: Path, run_folder: str
) -> None:
    # A server that cannot read the file (a vLLM on another machine) quotes its path: the
    # request's own words, never a content filter's, whatever the run directory is named.
    from trig_stream.backends.judges.http_errors import REFUSALS_TO_STOP, status_error

    path = tmp_path / run_folder / "image.png"
    path.parent.mkdir()
    Image.new("RGB", (24, 16), (30, 120, 200)).save(path)
    async with JudgeServer() as server, judge_at(server, image_mode="file") as judge:

        async def refused(*args: object) -> None:
            said = {"message": f"[Errno 2] No such file or directory: '{path.resolve()}'"}
            raise status_error(400, {}, said, endpoint=server.base_url, secret=None, key_source="")

        judge._endpoints[0].transport.post = refused  # type: ignore[method-assign,assignment]
        for _ in range(REFUSALS_TO_STOP - 1):
            with pytest.raises(ItemError, match="No such file") as caught:
                await ask(judge, path)
            assert not isinstance(caught.value, FatalBackendError)
        with pytest.raises(FatalBackendError, match="none succeeded"):
            await ask(judge, path)


def test_prepare_shrinks_to_max_pixels(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    Image.new("RGB", (200, 100), (1, 2, 3)).save(path)
    judge = OpenAIJudge("m", OpenAIJudgeOptions(base_url="http://x/v1", model="m", max_pixels=5000))
    payload = judge.prepare(path).payload
    data = base64.b64decode(payload.url.partition(",")[2])
    with Image.open(io.BytesIO(data)) as shrunk:
        assert shrunk.width * shrunk.height <= 5000
        assert shrunk.width == 2 * shrunk.height
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(ItemError, match="not a readable image"):
        judge.prepare(tmp_path / "junk.png")


def test_an_image_past_pillows_pixel_limit_is_an_item_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With max_pixels, Pillow's DecompressionBombError came out as it is: no file named, and
    # no ItemError, as load_rgb_image's was.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 32x32 is past twice the limit
    path = tmp_path / "bomb.png"
    Image.new("RGB", (32, 32)).save(path)
    judge = OpenAIJudge("m", OpenAIJudgeOptions(base_url="http://x/v1", model="m", max_pixels=64))
    with pytest.raises(ItemError, match="could be decompression bomb") as caught:
        judge.prepare(path)
    assert str(caught.value).startswith(f"cannot read image {path}: Image size (1024 pixels)")


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "RGB"])
def test_an_image_shrunk_to_max_pixels_looks_to_vllm_as_the_whole_one(
    tmp_path: Path, mode: str
) -> None:
    # Shrinking changes the size only. vLLM flattens an RGBA image onto white and converts
    # any other plainly, showing what lies under its transparent pixels (black here): made
    # RGBA, a shrunk LA, palette or RGB one with a transparent colour looked white instead.
    disc = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    disc.paste((255, 0, 0, 255), (20, 20, 44, 44))
    path = tmp_path / "disc.png"
    if mode == "P":  # a palette whose entry 0 is transparent, as GIFs and small PNGs have
        palette = Image.new("P", (64, 64), 0)
        palette.putpalette([0, 0, 0, 255, 0, 0])
        palette.paste(1, (20, 20, 44, 44))
        palette.save(path, transparency=0)
    elif mode == "RGB":
        disc.convert("RGB").save(path, transparency=(0, 0, 0))
    else:
        disc.convert(mode).save(path)
    judge = OpenAIJudge("m", OpenAIJudgeOptions(base_url="http://x/v1", model="m", max_pixels=4095))
    data = base64.b64decode(judge.prepare(path).payload.url.partition(",")[2])
    with Image.open(path) as whole, Image.open(io.BytesIO(data)) as shrunk:
        assert shrunk.size == (63, 63)
        seen_whole, seen_shrunk = as_vllm_sees(whole), as_vllm_sees(shrunk)
        assert seen_shrunk.getpixel((0, 0)) == seen_whole.getpixel((0, 0))
        assert seen_shrunk.getpixel((31, 31)) == seen_whole.getpixel((32, 32))
        assert shrunk.mode == ("RGBA" if mode == "RGBA" else "RGB")


@pytest.mark.parametrize(("size", "shrunk"), [((1, 10000), (1, 64)), ((5000, 3), (64, 1))])
def test_a_thin_image_is_shrunk_to_max_pixels_too(
    tmp_path: Path, size: tuple[int, int], shrunk: tuple[int, int]
) -> None:
    # Its short side held at one pixel, the long one kept its share of the unclamped scale:
    # 1x10000 became 1x800, 12.5 times the cap. The metric judges' loading shrinks alike.
    path = tmp_path / "thin.png"
    Image.new("RGB", size, (1, 2, 3)).save(path)
    judge = OpenAIJudge("m", OpenAIJudgeOptions(base_url="http://x/v1", model="m", max_pixels=64))
    data = base64.b64decode(judge.prepare(path).payload.url.partition(",")[2])
    with Image.open(io.BytesIO(data)) as image:
        assert image.size == shrunk
    assert load_rgb_image(path, max_pixels=64).size == shrunk


def test_fingerprint_names_what_changes_scores() -> None:
    judge = OpenAIJudge(
        "m",
        OpenAIJudgeOptions(base_urls=["http://a/v1", "http://b/v1"], model="qwen", seed=3),
        scorer="trig",
    )
    fp = judge.fingerprint()
    assert (fp.backend, fp.model, fp.template_version, fp.scorer) == (
        "openai",
        "qwen",
        BUILTIN_VERSION,
        "trig",
    )
    assert fp.params == {
        "scoring_rules": SCORING_RULES,
        "top_logprobs": 20,
        "temperature": 1.0,
        "seed": 3,
        "max_tokens": 1,
        "max_pixels": None,
        "image_mode": "base64",
    }


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://127.0.0.1:99999/v1", "Port out of range"),
        ("http://[::1/v1", "Invalid IPv6 URL"),
        ("127.0.0.1:8000/v1", "not an http:// or https:// URL"),
        ("ftp://files/v1", "not an http:// or https:// URL"),
        ("http:///v1", "with a host"),
        # Refused by run (or sent wrong) but passed by validate, or saved with the run.
        (" http://127.0.0.1:18001/v1 ", "holds spaces"),
        ("http://127.0.0.1:18001/a path/v1", "holds spaces"),
        ("http://user:pw@host/v1", "holds credentials .* api_key_env names"),
        ("http://host/v1?api-version=2024-06-01", "holds a query string"),
        ("http://host/v1#top", "or fragment"),
        # No client could send these: IDNA has no form for the host.
        ("http://a_\u00e9.example/v1", "host IDNA cannot write"),
        ("http://\uff4c\uff4f\uff43\uff41\uff4c/v1", "host IDNA cannot write"),
        # Sent percent-encoded, where nobody sees it in the config.
        ("http://127.0.0.1:18001/ok\u200b/v1", "invisible character"),
        ("http://a\u200bb.example/v1", "invisible character"),
        ("http://127.0.0.1:18001/ok\x00/v1", "invisible character"),
        ("http://127.0.0.1:18001/\ufeffv1", "invisible character"),
        ("http://127.0.0.1:18001/so\u00adft/v1", "invisible character"),
        ("http://127.0.0.1:18001/\u2067v1\u2069", "invisible character"),
        ("http://127.0.0.1:18001/\u202ev1", "invisible character"),
        ("http://127.0.0.1:18001/v\u20601", "invisible character"),
    ],
)
def test_every_base_url_option_refuses_what_is_not_an_http_url(url: str, message: str) -> None:
    # A config error naming the key, not a traceback when the run opens its judge.
    from trig_stream.backends.generators.dtm_rewrite import DTMRewriteOptions
    from trig_stream.backends.generators.openai_images import OpenAIImagesOptions

    inner = {"backend": "synthetic"}
    for build in (
        lambda: OpenAIJudgeOptions(model="m", base_url=url),
        lambda: OpenAIJudgeOptions(model="m", base_urls=["http://ok/v1", url]),
        lambda: OpenAIImagesOptions(base_url=url),
        lambda: DTMRewriteOptions(model="m", base_url=url, inner=inner),
    ):
        with pytest.raises(ValueError, match=message):
            build()


@pytest.mark.parametrize(
    "url",
    [
        # Spelled with a zero-width non-joiner (Persian) and joiner (Devanagari): every
        # client sends them, percent-encoded, as they are written.
        "http://127.0.0.1:18001/\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645/v1",
        "http://127.0.0.1:18001/\u0915\u094d\u200d\u0937/v1",
    ],
)
def test_a_base_url_may_hold_the_joiners_a_script_is_spelled_with(url: str) -> None:
    # Every Unicode format character was refused as invisible, these two among them.
    from trig_stream.backends.generators.dtm_rewrite import DTMRewriteOptions
    from trig_stream.backends.generators.openai_images import OpenAIImagesOptions

    assert OpenAIJudgeOptions(model="m", base_url=url).base_url == url
    assert OpenAIJudgeOptions(model="m", base_urls=["http://ok/v1", url]).base_urls
    assert OpenAIImagesOptions(base_url=url).base_url == url
    inner = {"backend": "synthetic"}
    rewrite = DTMRewriteOptions(model="m", base_url=url, inner=inner, relations={"IQ-R_TA-C": 1})
    assert rewrite.base_url == url


@pytest.mark.parametrize("seed", [2**63, -(2**63) - 1])
def test_validate_refuses_a_seed_past_64_bits_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], seed: int
) -> None:
    # It validated, and vLLM refused every request (400) with it; the run then stopped
    # naming other options.
    from tests.conftest import run_and_dataset_toml
    from trig_stream.cli import main
    from trig_stream.exit_codes import EXIT_CONFIG

    path = tmp_path / "run.toml"
    path.write_text(
        run_and_dataset_toml(tmp_path)
        + '[[generators]]\nname = "s"\nbackend = "synthetic"\n[[judges]]\nbackend = "openai"\n'
        + f'options = {{ model = "m", base_url = "http://127.0.0.1:9/v1", seed = {seed} }}\n'
    )
    assert main(["validate", str(path)]) == EXIT_CONFIG
    assert "judges[0].options.seed:" in capsys.readouterr().err
    for edge in (2**63 - 1, -(2**63)):
        assert OpenAIJudgeOptions(model="m", base_url="http://x/v1", seed=edge).seed == edge


def test_options_refuse_ambiguous_endpoints() -> None:
    with pytest.raises(ValueError, match="exactly one of base_url and base_urls"):
        OpenAIJudgeOptions(model="m")
    with pytest.raises(ValueError, match="exactly one"):
        OpenAIJudgeOptions(model="m", base_url="http://a/v1", base_urls=["http://b/v1"])


@pytest.mark.parametrize(
    "twice",
    ["http://gpu:8000/v1", "http://gpu:8000/v1/", "HTTP://GPU:8000/v1", "http://Gpu:8000/v1//"],
)
def test_options_refuse_a_server_listed_twice_naming_both_entries(twice: str) -> None:
    # Listed twice, its /metrics queue was summed twice: the adaptive limit was cut early.
    with pytest.raises(ValueError, match=r"base_urls\[0\] .* and base_urls\[2\] .* same endpoint"):
        OpenAIJudgeOptions(model="m", base_urls=["http://gpu:8000/v1", "http://gpu:8001/v1", twice])
    # Another path or port of the same host is another endpoint.
    OpenAIJudgeOptions(model="m", base_urls=["http://gpu:8000/v1", "http://gpu:8000/v2"])


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("http://gpu/v1", "http://gpu:80/v1"),
        ("https://gpu:443/v1", "https://GPU/v1/"),
        ("http://[::1]/v1", "http://[::1]:80/v1"),
    ],
)
def test_options_take_a_scheme_s_default_port_for_no_port(first: str, second: str) -> None:
    with pytest.raises(ValueError, match="same endpoint"):
        OpenAIJudgeOptions(model="m", base_urls=[first, second])
    # Another scheme's default port is a port of its own.
    OpenAIJudgeOptions(model="m", base_urls=["http://gpu/v1", "http://gpu:443/v1"])


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("http://v\u00e9.example/v1", "http://xn--v-bga.example/v1"),
        ("http://V\u00c9.example:80/v1", "http://xn--v-bga.example/v1/"),
        ("http://gpu/v\u00e9", "http://gpu/v%C3%A9"),
        ("http://gpu/v%c3%a9", "http://gpu/v%C3%A9"),
    ],
)
def test_options_take_a_server_as_its_requests_write_it(first: str, second: str) -> None:
    # The http client sends the host in IDNA and the path percent-encoded: both spellings
    # reach one server, whose /metrics load was summed twice.
    with pytest.raises(ValueError, match="same endpoint"):
        OpenAIJudgeOptions(model="m", base_urls=[first, second])
    assert same_endpoint_key(first) == same_endpoint_key(second)
    OpenAIJudgeOptions(model="m", base_urls=[first, "http://gpu/v%C3%A8"])


# -- failures -----------------------------------------------------------------------------------

FAULTS = [
    ("error_rate", RetryableError, "HTTP 503"),
    ("rate_limit_rate", RateLimitError, "HTTP 429"),
    ("hang_rate", AnswerTimeoutError, "no answer within"),
    ("malformed_rate", RetryableError, "malformed answer"),
    ("reset_rate", UnreachableError, "connection failed"),
]


@pytest.mark.parametrize(("fault", "expected", "message"), FAULTS)
async def test_each_fault_raises_its_class(
    fault: str, expected: type[Exception], message: str, image: Path, client: Client
) -> None:
    async with (
        JudgeServer(JudgeServerOptions(**{fault: 1.0})) as server,
        judge_at(server, client=client, timeout_s=0.3) as judge,
    ):
        with pytest.raises(RetryableError, match=message) as caught:
            await ask(judge, image)
    assert type(caught.value) is expected
    assert server.stats().faults[fault.removesuffix("_rate")] == 1


async def test_missing_logprobs_gives_a_reply_without_them(image: Path, client: Client) -> None:
    options = JudgeServerOptions(missing_logprobs_rate=1.0)
    async with JudgeServer(options) as server, judge_at(server, client=client) as judge:
        reply = await ask(judge, image)
    assert reply.top_logprobs is None
    assert reply.text in ("Excellent", "Good", "Medium", "Bad", "Terr")


async def test_a_server_that_never_returns_logprobs_stops_the_run_after_a_few_answers(
    image: Path, client: Client
) -> None:
    from trig_stream.backends.judges.http_errors import REFUSALS_TO_STOP

    options = JudgeServerOptions(missing_logprobs_rate=1.0)
    async with JudgeServer(options) as server, judge_at(server, client=client) as judge:
        for _ in range(REFUSALS_TO_STOP - 1):
            assert (await ask(judge, image)).top_logprobs is None
        with pytest.raises(FatalBackendError, match=r"came without logprobs.*does not return them"):
            await ask(judge, image)
    # Once one answer has carried them, an answer without them is that request's alone.
    async with JudgeServer() as server, judge_at(server, client=client) as judge:
        await ask(judge, image)
        server.options = server.options.model_copy(update={"missing_logprobs_rate": 1.0})
        for _ in range(REFUSALS_TO_STOP + 1):
            assert (await ask(judge, image)).top_logprobs is None


async def test_a_token_that_is_half_a_character_is_kept_and_the_reply_scored(
    image: Path, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    # JSON can carry a lone surrogate ("\\ud83d", the first half of an emoji); UTF-8, and so
    # the journal, cannot. The answer must still be read and scored, the token kept escaped.
    from trig_stream.testing import judge_answers, judge_server
    from trig_stream.testing.planted_scores import rating_logprobs as ratings

    def with_half_an_emoji(*args: Any, **kwargs: Any) -> list[tuple[str, float]]:
        top: list[tuple[str, float]] = ratings(*args, **kwargs)
        return [top[0], ("\ud83d", -3.0), *top[1:]]

    monkeypatch.setattr(judge_answers, "rating_logprobs", with_half_an_emoji)
    monkeypatch.setattr(
        judge_answers,
        "_token_entry",
        lambda token, logprob: {"token": token, "logprob": logprob, "bytes": [240, 159]},
    )
    monkeypatch.setattr(judge_server, "to_json", lambda answer: json.dumps(answer).encode())
    async with JudgeServer() as server, judge_at(server, client=client) as judge:
        reply = await ask(judge, image)
    assert reply.top_logprobs is not None
    assert reply.top_logprobs[1] == ("\\ud83d", -3.0)
    assert score_top_logprobs(reply.top_logprobs) is not None
    # A journal line holds them as pydantic writes them, which refuses a lone surrogate.
    assert b"\\\\ud83d" in TypeAdapter(TopLogprobs).dump_json(reply.top_logprobs)


async def test_bad_image_is_an_item_error(image: Path, client: Client) -> None:
    async with JudgeServer() as server, judge_at(server, client=client) as judge:
        broken = judge.prepare(image)
        bad = EncodedImage.of("data:image/png;base64,aGVsbG8=")
        broken = type(broken)(path=image, payload=bad)
        with pytest.raises(ItemError, match="HTTP 400: the image cannot be decoded"):
            await judge.judge(JudgeRequest("m", sample(), "IQ-R", broken, 1))


async def test_refusals_before_any_success_stop_the_run_after_a_few(
    image: Path, client: Client
) -> None:
    # A request the server refuses every time (top_logprobs above its --max-logprobs, say):
    # a few refusals are the images' own errors; that many in a row, and none succeeded, is
    # the config's, and stops the run instead of refusing every image of it.
    from trig_stream.backends.judges.http_errors import REFUSALS_TO_STOP

    bad = EncodedImage.of("data:image/png;base64,aGVsbG8=")
    async with JudgeServer() as server, judge_at(server, client=client) as judge:
        refused = type(judge.prepare(image))(path=image, payload=bad)
        for _ in range(REFUSALS_TO_STOP - 1):
            with pytest.raises(ItemError, match="HTTP 400") as caught:
                await judge.judge(JudgeRequest("m", sample(), "IQ-R", refused, 1))
            assert not isinstance(caught.value, FatalBackendError)
        with pytest.raises(
            FatalBackendError, match=r"HTTP 400.*none succeeded: check the judge"
        ) as stopped:
            await judge.judge(JudgeRequest("m", sample(), "IQ-R", refused, 1))
        assert "max_tokens and max_pixels against the model's context" in str(stopped.value)
    async with JudgeServer() as server, judge_at(server, client=client) as judge:
        await ask(judge, image)  # once one has succeeded, a refusal is its own request's
        for _ in range(REFUSALS_TO_STOP + 1):
            with pytest.raises(ItemError, match="HTTP 400") as caught:
                await judge.judge(JudgeRequest("m", sample(), "IQ-R", refused, 1))
            assert not isinstance(caught.value, FatalBackendError)


@pytest.mark.parametrize(
    "reason",
    [
        "Your input image may contain content that is not allowed by our safety system.",
        "The response was filtered due to the prompt triggering Azure OpenAI's content "
        "management policy (content_filter).",
    ],
)
async def test_content_refusals_never_stop_the_run_however_many(image: Path, reason: str) -> None:
    # A content filter refuses TRIG's toxicity samples one by one, and a run of them may
    # come first: they are those requests' errors, never the config's.
    from trig_stream.backends.judges.http_errors import REFUSALS_TO_STOP, status_error

    async with JudgeServer() as server, judge_at(server) as judge:

        async def refused(*args: object) -> None:
            raise status_error(
                400, {}, {"message": reason}, endpoint=server.base_url, secret=None, key_source=""
            )

        judge._endpoints[0].transport.post = refused  # type: ignore[method-assign,assignment]
        for _ in range(3 * REFUSALS_TO_STOP):
            with pytest.raises(ItemError, match="HTTP 400") as caught:
                await ask(judge, image)
            assert not isinstance(caught.value, FatalBackendError)


@pytest.mark.parametrize(
    "base_url", ["http://127.0.0.1:9/safety/v1", "http://127.0.0.1:9/moderation-proxy/v1"]
)
async def test_refusals_stop_the_run_whatever_words_the_endpoint_s_url_holds(
    image: Path, base_url: str
) -> None:
    # Only what the server said tells a content filter: the message's "judge at <base_url>"
    # once made a proxy path read as one, and refusals of every request never stopped the run.
    from trig_stream.backends.judges.http_errors import REFUSALS_TO_STOP, status_error

    options = OpenAIJudgeOptions(base_url=base_url, model="judge")
    judge = OpenAIJudge("trigscore", options)
    await judge.open()
    try:

        async def refused(*args: object) -> None:
            reason = {
                "message": "Requested sample logprobs of 20, which is greater than max allowed: 5"
            }
            raise status_error(400, {}, reason, endpoint=base_url, secret=None, key_source="")

        judge._endpoints[0].transport.post = refused  # type: ignore[method-assign,assignment]
        for _ in range(REFUSALS_TO_STOP - 1):
            with pytest.raises(ItemError, match="HTTP 400"):
                await ask(judge, image)
        with pytest.raises(FatalBackendError, match=r"none succeeded: check the judge's options"):
            await ask(judge, image)
    finally:
        await judge.aclose()


async def test_a_404_for_a_model_whose_name_reads_like_a_filter_stops_the_run(
    image: Path, client: Client
) -> None:
    # vLLM's 404 quotes the model asked for ("The model `OpenSafetyLab/MD-Judge-VL` does not
    # exist."), which read as a content filter's refusal: the run made every image for an
    # error judgement. A 404 is never a content refusal.
    served = JudgeServerOptions(model="Qwen/Qwen2.5-VL-7B-Instruct", served_model_only=True)
    async with JudgeServer(served) as server:
        options = OpenAIJudgeOptions(
            base_url=server.base_url, model="OpenSafetyLab/MD-Judge-VL", client=client
        )
        judge = OpenAIJudge("trigscore", options)
        await judge.open()
        try:
            with pytest.raises(
                FatalBackendError, match=r"HTTP 404.*check base_url .*'OpenSafetyLab/MD-Judge-VL'"
            ):
                await ask(judge, image)
        finally:
            await judge.aclose()


async def test_answers_a_content_filter_cut_off_never_stop_the_run(image: Path) -> None:
    # Azure's filter answers 200 with finish_reason "content_filter", and maybe no logprobs.
    from trig_stream.backends.judges.http_errors import REFUSALS_TO_STOP

    filtered = {
        "choices": [{"message": {"content": ""}, "finish_reason": "content_filter", "index": 0}]
    }

    async def cut_off(*args: object) -> dict[str, Any]:
        return filtered

    async with JudgeServer() as server, judge_at(server) as judge:
        judge._endpoints[0].transport.post = cut_off  # type: ignore[method-assign,assignment]
        for _ in range(3 * REFUSALS_TO_STOP):
            assert (await ask(judge, image)).top_logprobs is None


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_another_event_loop_is_refused_at_open_with_what_to_do() -> None:
    judge = OpenAIJudge(
        "trigscore", OpenAIJudgeOptions(base_url="http://127.0.0.1:9/v1", model="m")
    )
    with pytest.raises(FatalBackendError, match="runs on asyncio only; run the engine with"):
        await judge.open()


async def test_a_key_with_a_trailing_newline_stops_at_open_without_showing_it(
    monkeypatch: pytest.MonkeyPatch, client: Client
) -> None:
    monkeypatch.setenv("TRIG_TEST_JUDGE_KEY", "sk-made-from-a-file\n")
    options = OpenAIJudgeOptions(
        base_url="http://127.0.0.1:9/v1",
        model="m",
        api_key_env="TRIG_TEST_JUDGE_KEY",
        client=client,
    )
    with pytest.raises(
        FatalBackendError, match=r"TRIG_TEST_JUDGE_KEY .* \(a trailing newline\?"
    ) as e:
        await OpenAIJudge("trigscore", options).open()
    assert "sk-made" not in str(e.value)


async def test_a_404_before_any_success_stops_the_run_with_what_to_check(
    image: Path, client: Client
) -> None:
    # A base URL without its /v1 (or a model the server does not serve): every request would
    # fail the same way, and a run would make all its images for error judgements.
    async with JudgeServer() as server:
        without_v1 = server.base_url.removesuffix("/v1")
        options = OpenAIJudgeOptions(base_url=without_v1, model="judge", client=client)
        judge = OpenAIJudge("trigscore", options)
        await judge.open()
        try:
            with pytest.raises(FatalBackendError, match=r"HTTP 404.*check base_url .*'judge'"):
                await ask(judge, image)
        finally:
            await judge.aclose()


async def test_a_404_after_a_success_is_that_request_s_error(image: Path) -> None:
    from trig_stream.backends.judges.http_errors import status_error

    async with JudgeServer() as server, judge_at(server) as judge:
        await ask(judge, image)  # the path and the model are right

        async def not_found(*args: object) -> None:
            raise status_error(
                404, {}, "gone", endpoint=server.base_url, secret=None, key_source=""
            )

        judge._endpoints[0].transport.post = not_found  # type: ignore[method-assign,assignment]
        with pytest.raises(ItemError, match="HTTP 404: gone") as caught:
            await ask(judge, image)
    assert not isinstance(caught.value, FatalBackendError)


async def test_connection_refused_is_retryable(image: Path, client: Client) -> None:
    async with JudgeServer() as server:
        url = server.base_url
    options = OpenAIJudgeOptions(base_url=url, model="m", timeout_s=2, client=client)
    judge = OpenAIJudge("m", options)
    await judge.open()
    try:
        with pytest.raises(UnreachableError, match="connection failed"):
            await ask(judge, image)
    finally:
        await judge.aclose()


@pytest.mark.parametrize(("header", "expected"), [("7", 7.0), ("0.5", 0.5), (None, 30.0)])
async def test_retry_after_reaches_the_engine(
    header: str | None, expected: float, image: Path, client: Client
) -> None:
    value = header or email.utils.formatdate(time.time() + 30, usegmt=True)
    options = JudgeServerOptions(rate_limit_rate=1.0, retry_after=value)
    async with JudgeServer(options) as server, judge_at(server, client=client) as judge:
        with pytest.raises(RateLimitError) as caught:
            await ask(judge, image)
    assert caught.value.retry_after == pytest.approx(expected, abs=1.5)


def test_parse_retry_after() -> None:
    now = 1_700_000_000.0
    date = email.utils.formatdate(now + 12, usegmt=True)
    assert parse_retry_after({"Retry-After": "3"}) == 3.0
    assert parse_retry_after({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    assert parse_retry_after({"Retry-After": date}, now=lambda: now) == pytest.approx(12.0)
    assert parse_retry_after({"Retry-After": date}, now=lambda: now + 60) == 0.0
    assert parse_retry_after({"Retry-After": "soon"}) is None
    assert parse_retry_after({}) is None


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        # Python's float() takes these; HTTP's delta-seconds are digits.
        ({"Retry-After": "infinity"}, None),
        ({"Retry-After": "nan"}, None),
        ({"Retry-After": "1_000"}, None),
        ({"Retry-After": "1e3"}, None),
        ({"Retry-After": "-1"}, None),
        # A retry-after-ms that is no number leaves Retry-After to say.
        ({"retry-after-ms": "nan", "Retry-After": "5"}, 5.0),
        ({"retry-after-ms": "inf", "Retry-After": "5"}, 5.0),
        ({"retry-after-ms": "-5", "Retry-After": "5"}, 5.0),
        ({"retry-after-ms": "250"}, 0.25),
        # HTTP's three date forms are GMT, asctime's too though it names no zone.
        ({"Retry-After": "Sun Nov  6 08:49:49 1994"}, 12.0),
        ({"Retry-After": "Sun, 06 Nov 1994 08:49:49 GMT"}, 12.0),
        ({"Retry-After": "Sunday, 06-Nov-94 08:49:49 GMT"}, 12.0),
        ({"Retry-After": "Sun, 06 Nov 1994 08:49:49"}, None),  # another form, zone dropped
        ({"Retry-After": "Sun Nov  6 28:49:49 1994"}, None),
        # Past what a date holds: OverflowError, and a 429 became an error judgement.
        ({"Retry-After": "Mon, 01 Jan 99999999999 00:00:00 GMT"}, None),
        ({"Retry-After": "Mon, 01 Jan 2020 99999999999:00:00 GMT"}, None),
        ({"Retry-After": "Mon, 01 Jan 2020 00:00:99999999999 GMT"}, None),
        ({"Retry-After": "Mon, 99999999999 Jan 2020 00:00:00 GMT"}, None),
        ({"Retry-After": "Mon, 01 Jan 2020 00:00:00 +99999999999999999999"}, None),
        ({"Retry-After": "Sun Nov  6 08:49:37 99999999999"}, None),
    ],
)
def test_parse_retry_after_reads_what_http_allows_only(
    headers: dict[str, str], expected: float | None
) -> None:
    now = 784_111_777.0  # Sun, 06 Nov 1994 08:49:37 GMT
    assert parse_retry_after(headers, now=lambda: now) == expected


def _completion(entries: list[dict[str, Any]]) -> dict[str, Any]:
    first = {"token": "good", "logprob": -0.1, "top_logprobs": entries}
    return {"choices": [{"message": {"content": "good"}, "logprobs": {"content": [first]}}]}


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"token": "good", "logprob": True}, "logprob True of token 'good' is not a number"),
        ({"token": "good", "logprob": "-0.1"}, "logprob '-0.1' of token 'good' is not a number"),
        ({"token": "good", "logprob": None}, "logprob None of token 'good' is not a number"),
        ({"token": None, "logprob": -0.1}, "token None is not a string"),
        ({"token": 7, "logprob": -0.1}, "token 7 is not a string"),
        ({"token": "good", "logprob": 10**400}, "int too large"),
    ],
)
def test_a_token_or_logprob_of_another_json_type_is_a_malformed_answer(
    entry: dict[str, Any], message: str
) -> None:
    # float() and str() would read true as 1.0, "-0.1" as -0.1 and a null token as "None".
    good = {"token": "bad", "logprob": -2}
    with pytest.raises(RetryableError, match=f"at http://judge: malformed answer .*{message}"):
        reply_of(_completion([good, entry]), "http://judge")
    assert reply_of(_completion([good]), "http://judge").top_logprobs == [("bad", -2.0)]


def test_an_answer_without_the_top_logprobs_asked_for_has_none() -> None:
    # Scored from the one token sampled (at temperature 1), each image got a confident
    # score, and a server that drops the option never met the stop for it.
    chosen = {"token": "Excellent", "logprob": -1.2}
    for first in ({**chosen, "top_logprobs": []}, chosen):
        completion = {
            "choices": [{"message": {"content": "Excellent"}, "logprobs": {"content": [first]}}]
        }
        assert reply_of(completion, "http://judge").top_logprobs is None
        assert reply_of(completion, "http://judge", top_logprobs=5).top_logprobs is None
        # top_logprobs = 0 asks for the chosen token alone.
        zero = reply_of(completion, "http://judge", top_logprobs=0)
        assert zero.top_logprobs == [("Excellent", -1.2)]


async def test_a_server_that_drops_the_top_logprobs_list_stops_the_run(
    image: Path, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trig_stream.backends.judges.http_errors import REFUSALS_TO_STOP
    from trig_stream.testing import judge_server

    def without_the_list(answer: dict[str, Any]) -> bytes:
        for entry in answer["choices"][0]["logprobs"]["content"]:
            entry["top_logprobs"] = []
        return json.dumps(answer).encode()

    monkeypatch.setattr(judge_server, "to_json", without_the_list)
    async with JudgeServer() as server, judge_at(server, client=client) as judge:
        for _ in range(REFUSALS_TO_STOP - 1):
            assert (await ask(judge, image)).top_logprobs is None
        with pytest.raises(FatalBackendError, match="came without logprobs"):
            await ask(judge, image)


async def test_404s_in_a_row_after_a_success_stop_the_run(image: Path, client: Client) -> None:
    # A server restarted mid-run serving another model answers every request 404: each was
    # its request's error, and the rest of the run became error judgements in seconds. Fewer
    # in a row are requests' own: behind a proxy where one replica lost the model, half the
    # requests are 404s, and the 8 in a row that stopped the run came in almost every run.
    from trig_stream.backends.judges.endpoints import NOT_FOUND_TO_LOSE

    options = JudgeServerOptions(model="judge", served_model_only=True)
    async with JudgeServer(options) as server, judge_at(server, client=client) as judge:
        assert (await ask(judge, image)).top_logprobs
        server.options = options.model_copy(update={"model": "another"})
        for _ in range(NOT_FOUND_TO_LOSE - 1):
            with pytest.raises(NotFoundError, match="HTTP 404"):
                await ask(judge, image)
        # A success between 404s shows they are the requests' own: the count starts over.
        server.options = options
        assert (await ask(judge, image)).top_logprobs
        server.options = options.model_copy(update={"model": "another"})
        for _ in range(NOT_FOUND_TO_LOSE - 1):
            with pytest.raises(NotFoundError, match="HTTP 404"):
                await ask(judge, image)
        with pytest.raises(FatalBackendError) as stopped:
            await ask(judge, image)
    message = str(stopped.value)
    assert message.startswith(f"judge at {server.base_url}: HTTP 404")
    assert f"the last {NOT_FOUND_TO_LOSE} answers of this endpoint were 404s" in message
    assert "it no longer serves model 'judge'" in message
    assert "every other endpoint" not in message
    # Its own 404 is kept as its error judgement, as those before it (the message says so).
    assert isinstance(stopped.value.request_error, NotFoundError)


async def test_an_endpoint_lost_to_404s_leaves_the_others_its_requests(
    image: Path, client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    # One lost endpoint of several stopped the run, though the others served the model.
    from trig_stream.backends.judges.endpoints import NOT_FOUND_TO_LOSE

    options = JudgeServerOptions(model="judge", served_model_only=True)
    async with JudgeServer(options) as first, JudgeServer(options) as second:
        urls = [first.base_url, second.base_url]
        judge = OpenAIJudge(
            "trigscore", OpenAIJudgeOptions(base_urls=urls, model="judge", client=client)
        )
        await judge.open()
        try:
            assert (await ask(judge, image)).top_logprobs  # the first (a tie goes to it)
            assert first.stats().served == 1
            first.options = options.model_copy(update={"model": "another"})
            for _ in range(NOT_FOUND_TO_LOSE):
                with pytest.raises(NotFoundError, match="HTTP 404"):
                    await ask(judge, image)
            # Lost: said once, and the second takes every request.
            (lost,) = [r.getMessage() for r in caplog.records if "gets no more" in r.getMessage()]
            assert lost.startswith(f"judge at {first.base_url}: HTTP 404")
            for _ in range(3):
                assert (await ask(judge, image)).top_logprobs
            assert first.stats().received == NOT_FOUND_TO_LOSE + 1
            assert second.stats().served == 3
            # Every endpoint lost: nothing left to ask.
            second.options = options.model_copy(update={"model": "another"})
            for _ in range(NOT_FOUND_TO_LOSE - 1):
                with pytest.raises(NotFoundError, match="HTTP 404"):
                    await ask(judge, image)
            with pytest.raises(FatalBackendError) as stopped:
                await ask(judge, image)
        finally:
            await judge.aclose()
    message = str(stopped.value)
    assert message.startswith(f"judge at {second.base_url}: HTTP 404")
    assert "every other endpoint of the judge (1) was lost alike" in message
    assert isinstance(stopped.value.request_error, NotFoundError)


@pytest.mark.parametrize("kept", [1, 19])
async def test_an_answer_with_fewer_top_logprobs_than_asked_is_no_score(
    image: Path, client: Client, monkeypatch: pytest.MonkeyPatch, kept: int
) -> None:
    # A server answering 1 of the 20 asked was scored as if nothing were wrong: the ratings
    # it left out counted as improbable (3,000 judgements ok, every score 0.75).
    from trig_stream.backends.judges.http_errors import REFUSALS_TO_STOP
    from trig_stream.testing import judge_server

    cut = [False]

    def cut_short(answer: dict[str, Any]) -> bytes:
        if cut[0]:
            for entry in answer["choices"][0]["logprobs"]["content"]:
                entry["top_logprobs"] = entry["top_logprobs"][:kept]
        return json.dumps(answer).encode()

    monkeypatch.setattr(judge_server, "to_json", cut_short)
    held = f"{kept} top logprob{'s' * (kept != 1)}"
    said = f"answered {held} of the 20 asked"
    async with JudgeServer() as server, judge_at(server, client=client) as judge:
        cut[0] = True
        # Before any full answer: its requests' errors, then the run stops.
        for _ in range(REFUSALS_TO_STOP - 1):
            with pytest.raises(ItemError) as raised:
                await ask(judge, image)
            assert not isinstance(raised.value, FatalBackendError)
            assert str(raised.value).startswith(f"judge at {server.base_url}: {said}: ")
        with pytest.raises(FatalBackendError) as stopped:
            await ask(judge, image)
        assert "fewer top logprobs than the 20 asked" in str(stopped.value)
        assert f"(the latest cut one answered {held})" in str(stopped.value)
        # Not "set top_logprobs to what it returns": one that always returns one fewer than
        # asked (an lmdeploy bug) never returns what it is asked for.
        assert "this server cuts the list (for this model, 'judge')" in str(stopped.value)
        assert "fix or replace the server" in str(stopped.value)
        assert "to what it returns" not in str(stopped.value)
    cut[0] = False
    async with JudgeServer() as server, judge_at(server, client=client) as judge:
        # After a full answer: each cut one is its request's error, however many.
        assert len((await ask(judge, image)).top_logprobs) == 20
        cut[0] = True
        for _ in range(REFUSALS_TO_STOP + 1):
            with pytest.raises(ItemError, match=f": {said}: a cut list is not scored") as raised:
                await ask(judge, image)
            assert not isinstance(raised.value, FatalBackendError)
    async with JudgeServer() as server, judge_at(server, client=client, top_logprobs=kept) as judge:
        # As many as asked for, however few.
        assert len((await ask(judge, image)).top_logprobs) == kept


# -- credentials --------------------------------------------------------------------------------

PLANTED_KEY = "sk-planted-SECRET-7f3c9a1e"


async def test_missing_key_variable_is_fatal_and_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRIG_TEST_JUDGE_KEY", raising=False)
    judge = OpenAIJudge(
        "m",
        OpenAIJudgeOptions(
            base_url="http://127.0.0.1:9/v1", model="m", api_key_env="TRIG_TEST_JUDGE_KEY"
        ),
    )
    with pytest.raises(FatalBackendError, match="TRIG_TEST_JUDGE_KEY"):
        await judge.open()


async def test_rejected_key_is_fatal_and_never_leaks(
    client: Client,
    image: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("TRIG_TEST_JUDGE_KEY", PLANTED_KEY)
    caplog.set_level(logging.DEBUG)
    # The server wants another key, and quotes the one it received in its 401, as some do.
    options = JudgeServerOptions(api_key="sk-the-right-one")
    async with (
        JudgeServer(options) as server,
        judge_at(server, client=client, api_key_env="TRIG_TEST_JUDGE_KEY") as judge,
    ):
        with pytest.raises(FatalBackendError) as caught:
            await ask(judge, image)
        texts = [
            str(caught.value),
            repr(caught.value),
            repr(judge),
            repr(vars(judge)),
            repr(judge._endpoints),
            judge.fingerprint().model_dump_json(),
        ]
    assert "rejected the API key (HTTP 401)" in str(caught.value)
    assert "TRIG_TEST_JUDGE_KEY" in str(caught.value)
    assert caught.value.__cause__ is None
    captured = capsys.readouterr()
    texts += [caplog.text, captured.out, captured.err]
    assert all(PLANTED_KEY not in text for text in texts)
    assert PLANTED_KEY[:12] not in caplog.text


async def test_accepted_key_is_sent(
    image: Path, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRIG_TEST_JUDGE_KEY", PLANTED_KEY)
    async with (
        JudgeServer(JudgeServerOptions(api_key=PLANTED_KEY)) as server,
        judge_at(server, client=client, api_key_env="TRIG_TEST_JUDGE_KEY") as judge,
    ):
        reply = await ask(judge, image)
    assert reply.top_logprobs


def test_a_malformed_answer_quoting_the_key_is_reported_with_the_key_masked() -> None:
    # A logprob that is the Bearer token the server received: the message quoted it.
    entry = {"token": "Good", "logprob": PLANTED_KEY}
    with pytest.raises(RetryableError) as caught:
        reply_of(_completion([entry]), "http://judge", secret=PLANTED_KEY)
    assert "malformed answer (TypeError: logprob '***' of token 'Good' is not a number)" in str(
        caught.value
    )
    assert PLANTED_KEY not in str(caught.value)


@pytest.mark.parametrize(
    ("said", "reason"),
    [
        ({"message": "internal model crash"}, "internal model crash"),
        ({"message": f"crash for {PLANTED_KEY}"}, "crash for ***"),
        ({"message": "crash " + "x" * 300}, "crash " + "x" * 194 + "…"),
        ("model crashed", "model crashed"),
    ],
)
def test_an_error_sent_with_a_200_is_quoted(said: Any, reason: str) -> None:
    # It was "malformed answer (KeyError: 'choices')", the server's own words lost.
    with pytest.raises(RetryableError) as caught:
        reply_of({"error": said}, "http://judge", secret=PLANTED_KEY)
    assert str(caught.value) == f"judge at http://judge: malformed answer (an error: {reason})"


def test_tokens_holding_the_key_are_masked() -> None:
    # Stored in the record's top_logprobs, the report's parquet, and quoted in "no rating
    # word among the top tokens".
    entries = [
        {"token": PLANTED_KEY, "logprob": -0.1},
        {"token": f"x{PLANTED_KEY}y", "logprob": -0.5},
        {"token": "Good", "logprob": -2},
    ]
    completion = _completion(entries)
    completion["choices"][0]["message"]["content"] = f"{PLANTED_KEY} Good"
    reply = reply_of(completion, "http://judge", secret=PLANTED_KEY)
    assert reply.top_logprobs == [("***", -0.1), ("x***y", -0.5), ("Good", -2.0)]
    assert reply.text == "*** Good"
    # top_logprobs = 0: the chosen token alone, masked too.
    chosen = {"choices": [{"message": {}, "logprobs": {"content": [entries[0]]}}]}
    alone = reply_of(chosen, "http://judge", top_logprobs=0, secret=PLANTED_KEY)
    assert alone.top_logprobs == [("***", -0.1)]


def test_a_short_key_that_is_a_rating_word_leaves_the_tokens_as_they_are() -> None:
    # SIMKEY=Good: every "Good" token was stored as "***", and the scores shifted (0.532 to
    # 0.469) with every judgement ok.
    entries = [
        {"token": "Good", "logprob": -0.3},
        {"token": " good", "logprob": -1.5},
        {"token": "Excellent", "logprob": -2.0},
    ]
    completion = _completion(entries)
    completion["choices"][0]["message"]["content"] = "Good"
    keyless = reply_of(completion, "http://judge")
    for key in ("Good", "good", "Exc"):
        reply = reply_of(completion, "http://judge", secret=key)
        assert reply.top_logprobs == keyless.top_logprobs
        assert reply.text == keyless.text == "Good"
        assert reply.top_logprobs is not None and keyless.top_logprobs is not None
        assert score_top_logprobs(reply.top_logprobs) == score_top_logprobs(keyless.top_logprobs)
    # A malformed answer's message still masks it.
    with pytest.raises(RetryableError) as caught:
        reply_of(_completion([{"token": "x", "logprob": "Good"}]), "http://judge", secret="Good")
    assert "logprob '***' of token 'x'" in str(caught.value)


@pytest.mark.parametrize("echoed", ["logprob", "token"])
async def test_a_server_echoing_the_key_in_its_answer_never_shows_it(
    image: Path, client: Client, monkeypatch: pytest.MonkeyPatch, echoed: str
) -> None:
    from trig_stream.testing import judge_server

    def echoing(answer: dict[str, Any]) -> bytes:
        first = answer["choices"][0]["logprobs"]["content"][0]
        first["top_logprobs"][0][echoed] = PLANTED_KEY
        return json.dumps(answer).encode()

    monkeypatch.setenv("TRIG_TEST_JUDGE_KEY", PLANTED_KEY)
    monkeypatch.setattr(judge_server, "to_json", echoing)
    async with (
        JudgeServer(JudgeServerOptions(api_key=PLANTED_KEY)) as server,
        judge_at(server, client=client, api_key_env="TRIG_TEST_JUDGE_KEY") as judge,
    ):
        if echoed == "logprob":
            with pytest.raises(RetryableError, match=r"malformed answer .*logprob '\*\*\*'"):
                await ask(judge, image)
            return
        reply = await ask(judge, image)
    assert reply.top_logprobs is not None and reply.top_logprobs[0][0] == "***"
    assert PLANTED_KEY not in repr(reply)


# -- several endpoints --------------------------------------------------------------------------


async def test_an_endpoint_that_fails_rests_while_another_takes_its_requests(
    image: Path, client: Client
) -> None:
    # A refused connection leaves the dead endpoint the least busy of all: without a rest
    # it would draw nearly every request, and each retry of it (seen: 118 of 128 failed).
    async with JudgeServer() as gone:
        dead = gone.base_url
    now = [100.0]
    async with JudgeServer() as live:
        options = OpenAIJudgeOptions(base_urls=[dead, live.base_url], model="m", client=client)
        judge = OpenAIJudge("m", options, clock=lambda: now[0])
        await judge.open()
        judge._endpoints[1].in_flight += 1  # busier: the least busy rule would pick the dead
        try:
            outcomes = []
            for step in (0.0, 0.0, 0.0, 0.6, 0.0, 0.6, 0.5, 0.0):
                now[0] += step
                try:
                    await ask(judge, image)
                    outcomes.append("ok")
                except RetryableError:
                    outcomes.append("down")
        finally:
            await judge.aclose()
    # Rests of 0.5 s, then 1 s, then 2 s: the dead endpoint is tried once each time one ends.
    assert outcomes == ["down", "ok", "ok", "down", "ok", "ok", "down", "ok"]
    assert live.stats().served == 5


async def test_a_timeout_of_one_endpoint_while_another_is_awake_is_no_sign_of_load(
    image: Path,
) -> None:
    # An AnswerTimeoutError cuts an adaptive limit: one hanging endpoint of several cut the
    # limit that the others served, again each time it woke from its rest.
    now = [100.0]
    hanging = JudgeServerOptions(hang_rate=1.0)
    async with JudgeServer(hanging) as hangs, JudgeServer() as live:
        options = OpenAIJudgeOptions(
            base_urls=[hangs.base_url, live.base_url], model="m", timeout_s=0.3
        )
        judge = OpenAIJudge("m", options, clock=lambda: now[0])
        await judge.open()
        try:
            with pytest.raises(RetryableError, match="no answer within") as caught:
                await ask(judge, image)
            assert type(caught.value) is UnreachableError  # still no answer, but no cut
            await ask(judge, image)  # the live one takes the retry
            # Both resting: the timeout is the judge's as a whole again.
            judge._endpoints[1].failed(now[0])
            now[0] += 0.6
            judge._endpoints[1].failed(now[0])
            with pytest.raises(AnswerTimeoutError):
                await ask(judge, image)
        finally:
            await judge.aclose()
    assert hangs.stats().faults["hang"] == 2


async def test_an_endpoint_that_answers_429_rests_while_another_takes_its_requests(
    image: Path, client: Client
) -> None:
    # A 429 comes back at once, leaving the endpoint the least busy of all: without a rest it
    # drew most requests (seen: 44 of 60, and 667 requests against 62 and 30 in a run).
    now = [100.0]
    limiting = JudgeServerOptions(rate_limit_rate=1.0, retry_after="5")
    async with JudgeServer(limiting) as limited, JudgeServer() as live:
        urls = [limited.base_url, live.base_url]
        options = OpenAIJudgeOptions(base_urls=urls, model="m", client=client)
        judge = OpenAIJudge("m", options, clock=lambda: now[0])
        await judge.open()
        judge._endpoints[1].in_flight += 1  # busier: the least busy rule would pick the other
        try:
            outcomes = []
            # Its first rest would end after 0.5 s; its Retry-After asks for 5.
            for step in (0.0, 0.0, 0.0, 1.0, 3.0, 1.1, 0.0):
                now[0] += step
                try:
                    await ask(judge, image)
                    outcomes.append("ok")
                except RetryableError as exc:
                    outcomes.append("429" if "HTTP 429" in str(exc) else str(exc))
        finally:
            await judge.aclose()
    assert outcomes == ["429", "ok", "ok", "ok", "ok", "429", "ok"]
    assert (limited.stats().received, live.stats().served) == (2, 5)


async def test_a_429_leaves_its_retry_after_to_its_endpoint_while_another_is_awake(
    image: Path, client: Client
) -> None:
    # The engine waited the Retry-After before the retry, by which time the endpoint's rest
    # was over: the retry went back to it, five times, and the judgement was lost while the
    # other endpoint stood idle. With no other endpoint awake the request waits as before.
    now = [100.0]
    limiting = JudgeServerOptions(rate_limit_rate=1.0, retry_after="60")
    async with JudgeServer(limiting) as limited, JudgeServer() as live:
        for urls, passed_on in (
            ([limited.base_url, live.base_url], None),
            ([limited.base_url], 60),
        ):
            options = OpenAIJudgeOptions(base_urls=urls, model="m", client=client)
            judge = OpenAIJudge("m", options, clock=lambda: now[0])
            await judge.open()
            try:
                with pytest.raises(RetryableError, match="HTTP 429") as raised:
                    await ask(judge, image)
                assert raised.value.retry_after == passed_on
                if passed_on is None:
                    now[0] += 1.0  # the engine's own short backoff
                    await ask(judge, image)  # answered by the endpoint awake
            finally:
                await judge.aclose()
    assert live.stats().served == 1


@pytest.mark.parametrize("status", [503, 500, 408, 409])
async def test_a_5xx_leaves_its_retry_after_to_its_endpoint_while_another_is_awake(
    image: Path, status: int
) -> None:
    # As a 429's: the engine waited out the Retry-After (up to 300 s) while the other
    # endpoint stood idle, the failing one rested 0.5 s only, and the retry went back to it:
    # a request spent all its attempts there ("gave up after 5 attempts").
    from trig_stream.backends.judges.http_errors import status_error

    now = [100.0]
    async with JudgeServer() as failing, JudgeServer() as live:
        options = OpenAIJudgeOptions(base_urls=[failing.base_url, live.base_url], model="m")
        judge = OpenAIJudge("m", options, clock=lambda: now[0])
        await judge.open()
        try:

            async def overloaded(*args: object) -> None:
                raise status_error(
                    status,
                    {"Retry-After": "5"},
                    {"message": "overloaded"},
                    endpoint=failing.base_url,
                    secret=None,
                    key_source="",
                )

            judge._endpoints[0].transport.post = overloaded  # type: ignore[method-assign,assignment]
            with pytest.raises(RetryableError, match=f"HTTP {status}") as raised:
                await ask(judge, image)
            assert raised.value.retry_after is None  # the engine's usual backoff, not 5 s
            judge._endpoints[1].in_flight += 1  # busier: least busy would pick the failing one
            now[0] += 4.0  # past its first rest of 0.5 s, not past its Retry-After
            await ask(judge, image)
            judge._endpoints[1].in_flight -= 1
            assert live.stats().served == 1
        finally:
            await judge.aclose()
        only = OpenAIJudgeOptions(base_urls=[failing.base_url], model="m")
        alone = OpenAIJudge("m", only, clock=lambda: now[0])
        await alone.open()
        try:
            alone._endpoints[0].transport.post = overloaded  # type: ignore[method-assign,assignment]
            with pytest.raises(RetryableError) as raised:
                await ask(alone, image)
            assert raised.value.retry_after == 5.0  # no other endpoint: the request waits
        finally:
            await alone.aclose()


async def test_an_endpoint_awake_after_its_rest_loses_a_tie_to_one_that_has_not_failed(
    image: Path, client: Client
) -> None:
    # Sequential requests leave every endpoint idle, a tie: the first endpoint won it, so a
    # retry due after its rest went back to the endpoint that had just failed.
    now = [100.0]
    failing_options = JudgeServerOptions(error_rate=1.0)
    async with JudgeServer(failing_options) as failing, JudgeServer() as live:
        urls = [failing.base_url, live.base_url]
        options = OpenAIJudgeOptions(base_urls=urls, model="m", client=client)
        judge = OpenAIJudge("m", options, clock=lambda: now[0])
        await judge.open()
        try:
            with pytest.raises(RetryableError, match="HTTP 503"):
                await ask(judge, image)
            for _ in range(3):
                now[0] += 1.0  # its rest (0.5 s) is over each time
                await ask(judge, image)
        finally:
            await judge.aclose()
    assert (failing.stats().received, live.stats().served) == (1, 3)


def test_an_endpoint_failing_a_thousand_times_in_a_row_rests_30_s_each_time() -> None:
    # 2 ** (failures - 1) overflowed a float at 1,025 failures in a row (a long outage at
    # concurrency 256 reaches it in seconds): every request then failed at once with a bare
    # OverflowError, and a dead endpoint of several never rested again.
    endpoint = Endpoint(transport=cast(Transport, None), model="m")
    rests = []
    for n in range(1, 1101):
        endpoint.failed(float(n))
        rests.append(endpoint.rests_until - n)
    assert rests[:8] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, REST_MAX_S, REST_MAX_S]
    assert set(rests[6:]) == {REST_MAX_S}


async def test_a_bug_counting_an_endpoints_failures_names_the_endpoint_and_the_failure(
    image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each judgement's error was the bug's bare "OverflowError: int too large to convert to
    # float", naming neither the endpoint nor what had failed.
    def broken(self: Endpoint, now: float) -> None:
        raise OverflowError("int too large to convert to float")

    monkeypatch.setattr(Endpoint, "failed", broken)
    async with (
        JudgeServer(JudgeServerOptions(error_rate=1.0)) as server,
        judge_at(server) as judge,
    ):
        with pytest.raises(RuntimeError) as raised:
            await ask(judge, image)
    message = str(raised.value)
    assert message.startswith(f"judge at {server.base_url}: after its failure (")
    assert "HTTP 503" in message
    assert "raised OverflowError: int too large to convert to float; a bug of trig-stream" in (
        message
    )


async def test_a_429_is_a_rate_limit_of_the_judge_only_while_no_other_endpoint_is_awake(
    image: Path, client: Client
) -> None:
    # Adaptive concurrency cuts the judge's limit on a RateLimitError: one endpoint's 429s,
    # sent on to another endpoint awake, halved the limit that the other served well.
    now = [100.0]
    limiting = JudgeServerOptions(rate_limit_rate=1.0, retry_after="1")
    async with JudgeServer(limiting) as limited, JudgeServer() as live:
        options = OpenAIJudgeOptions(
            base_urls=[limited.base_url, live.base_url], model="m", client=client
        )
        judge = OpenAIJudge("m", options, clock=lambda: now[0])
        await judge.open()
        try:
            with pytest.raises(RetryableError, match="HTTP 429") as raised:
                await ask(judge, image)
            assert not isinstance(raised.value, RateLimitError)
            judge._endpoints[1].rests_until = now[0] + 10.0  # the other one rests too
            now[0] += 2.0
            with pytest.raises(RateLimitError, match="HTTP 429"):
                await ask(judge, image)
        finally:
            await judge.aclose()


async def test_endpoints_share_the_load(image: Path, client: Client) -> None:
    options = JudgeServerOptions(latency_s=0.02)
    async with JudgeServer(options) as one, JudgeServer(options) as two:
        urls = [one.base_url, two.base_url]
        judge = OpenAIJudge("m", OpenAIJudgeOptions(base_urls=urls, model="m", client=client))
        await judge.open()
        prepared = judge.prepare(image)
        try:
            async with anyio.create_task_group() as tg:
                for n in range(20):
                    request = JudgeRequest(f"model-{n}", sample(), "IQ-R", prepared, 1)
                    tg.start_soon(judge.judge, request)
        finally:
            await judge.aclose()
    assert one.stats().served + two.stats().served == 20
    assert min(one.stats().served, two.stats().served) >= 5


async def test_a_seed_of_zero_is_sent(image: Path) -> None:
    # 0 is a seed like any other; only None (not set) leaves the field out.
    options = JudgeServerOptions(record_requests=True)
    async with JudgeServer(options) as server, judge_at(server, seed=0) as judge:
        await ask(judge, image)
    assert server.received[0]["seed"] == 0


def test_an_answer_with_an_empty_logprobs_content_has_no_top_logprobs() -> None:
    # "content": [] is a server that gave no logprobs, as one without the key: a reply
    # without them (counted towards the stop of a server that never sends any), not a
    # malformed answer to retry.
    completion = {"choices": [{"message": {"content": "Good"}, "logprobs": {"content": []}}]}
    reply = reply_of(completion, "http://judge")
    assert (reply.top_logprobs, reply.text) == (None, "Good")


def test_an_answer_with_choices_and_an_error_is_read_for_its_choices() -> None:
    # Only an error *instead* of the answer (a 200 without choices) is a malformed answer.
    completion = _completion([{"token": "bad", "logprob": -0.5}])
    completion["error"] = {"message": "a warning the server attached"}
    assert reply_of(completion, "http://judge").top_logprobs == [("bad", -0.5)]


def test_a_key_of_exactly_the_short_key_length_echoed_as_a_token_is_masked() -> None:
    key = "k3y-8chr"  # SHORT_KEY_CHARS (8) characters: masked wherever it appears
    entries = [{"token": key, "logprob": -0.1}, {"token": f"x{key}", "logprob": -0.5}]
    reply = reply_of(_completion(entries), "http://judge", secret=key)
    assert reply.top_logprobs == [("***", -0.1), ("x***", -0.5)]


def test_an_image_of_exactly_max_pixels_is_sent_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "exact.jpg"
    Image.new("RGB", (32, 16), (30, 120, 200)).save(path)
    judge = OpenAIJudge("m", OpenAIJudgeOptions(base_url="http://x/v1", model="m", max_pixels=512))
    url = judge.prepare(path).payload.url
    assert url.startswith("data:image/jpeg;base64,")
    assert base64.b64decode(url.partition(",")[2]) == path.read_bytes()
