"""The loopback judge server itself: routes, stats, queueing, planted relations, shutdown."""

from __future__ import annotations

import base64
import io
import socket
import struct
import zlib
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import anyio.lowlevel
import numpy as np
import pytest
from PIL import Image
from scipy.stats import spearmanr

from trig_stream.backends.base import JudgeRequest, PreparedImage, ServerLoad
from trig_stream.backends.judges.http_errors import parse_retry_after
from trig_stream.backends.judges.openai_judge import OpenAIJudge
from trig_stream.backends.judges.openai_options import OpenAIJudgeOptions
from trig_stream.backends.judges.server_probe import parse_load
from trig_stream.backends.judges.templates import BUILTIN_CRITERIA
from trig_stream.dimensions import DIMENSION_NAMES, Dimension
from trig_stream.errors import RetryableError
from trig_stream.png import encode_png, with_sample_digest
from trig_stream.records import Sample
from trig_stream.scoring import score_top_logprobs
from trig_stream.testing import judge_server
from trig_stream.testing.judge_options import JudgeServerOptions
from trig_stream.testing.judge_questions import dimension_of
from trig_stream.testing.judge_server import JudgeServer
from trig_stream.testing.planted_scores import latent, loadings, rating_logprobs

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def data_url(colour: tuple[int, int, int] = (10, 20, 30)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def bomb_data_url() -> str:
    # A PNG whose header claims 100000 x 100000 pixels: Pillow refuses to open it.
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 10))
        + chunk(b"IEND", b"")
    )
    return "data:image/png;base64," + base64.b64encode(png).decode()


def chat_body(url: str, dimension: str = "IQ-R", prompt: str = "a cat") -> dict[str, Any]:
    return {
        "model": "trig-judge-sim",
        "logprobs": True,
        "top_logprobs": 5,
        "max_tokens": 1,
        "messages": [
            {"role": "system", "content": f"Rate ({dimension}) with one word."},
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": prompt},
                ],
            },
        ],
    }


async def test_answer_has_openai_shape_and_repeats_are_counted() -> None:
    async with JudgeServer() as server, aiohttp.ClientSession() as http:
        url = f"{server.base_url}/chat/completions"
        answers = []
        for body in (chat_body(data_url()), chat_body(data_url()), chat_body(data_url(), "TA-C")):
            async with http.post(url, json=body) as response:
                assert response.status == 200
                answers.append(await response.json())
        async with http.get(f"http://{server.host}:{server.port}/stats") as response:
            stats = await response.json()
    first = answers[0]
    assert first["object"] == "chat.completion" and first["model"] == "trig-judge-sim"
    assert first["id"].startswith("chatcmpl-")
    assert set(first["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    choice = first["choices"][0]
    token = choice["logprobs"]["content"][0]
    assert choice["message"]["content"] == token["token"]
    assert len(token["top_logprobs"]) == 5
    for entry in token["top_logprobs"]:
        assert set(entry) == {"token", "logprob", "bytes"}
        assert entry["bytes"] == list(entry["token"].encode())
    assert answers[1]["choices"] == answers[0]["choices"]  # the same question, the same answer
    assert stats["received"] == 3 and stats["served"] == 3
    assert stats["repeated"] == 1
    assert stats["busy_slot_s"] > 0  # each answer held a slot for a moment


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("data:image/png;base64,bm90IGFuIGltYWdl", "cannot be decoded"),
        ("data:image/png;base64,%%%", "not valid base64"),
        ("http://example.com/cat.png", "data: or file://"),
        ("file:///nonexistent/cat.png", "cannot read the image file"),
        (bomb_data_url(), "the image is too large"),
    ],
)
async def test_bad_images_get_400(url: str, reason: str) -> None:
    async with (
        JudgeServer(JudgeServerOptions(allowed_local_media_path=Path("/"))) as server,
        aiohttp.ClientSession() as http,
        http.post(f"{server.base_url}/chat/completions", json=chat_body(url)) as resp,
    ):
        assert resp.status == 400
        assert reason in (await resp.json())["error"]["message"]
    assert server.stats().rejected == 1


async def test_metrics_escape_the_model_name() -> None:
    # Unescaped, a newline in the model name split the gauge's line and no load was read.
    async with (
        JudgeServer(JudgeServerOptions(model='a"b\\c\nd')) as server,
        aiohttp.ClientSession() as http,
        http.get(f"http://{server.host}:{server.port}/metrics") as response,
    ):
        text = await response.text()
    assert 'vllm:num_requests_running{model_name="a\\"b\\\\c\\nd"} 0.0' in text
    assert parse_load(text) == ServerLoad(running=0, waiting=0)


async def test_an_image_url_given_as_a_string_is_accepted() -> None:
    # vLLM takes {"image_url": "data:..."} as well as {"image_url": {"url": "data:..."}};
    # the string form was a 500 with a traceback.
    body = chat_body(data_url())
    body["messages"][1]["content"][0]["image_url"] = data_url()
    async with (
        JudgeServer() as server,
        aiohttp.ClientSession() as http,
        http.post(f"{server.base_url}/chat/completions", json=body) as resp,
    ):
        assert resp.status == 200
        assert (await resp.json())["choices"][0]["logprobs"] is not None


async def test_an_image_url_of_another_shape_is_400() -> None:
    body = chat_body(data_url())
    body["messages"][1]["content"][0]["image_url"] = [1]
    async with (
        JudgeServer() as server,
        aiohttp.ClientSession() as http,
        http.post(f"{server.base_url}/chat/completions", json=body) as resp,
    ):
        assert resp.status == 400
        assert "needs 'image_url'" in (await resp.json())["error"]["message"]
    assert server.stats().rejected == 1


async def test_a_body_over_the_limit_is_an_openai_shaped_413(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # aiohttp answered it in plain text, which no OpenAI client reads as an error body.
    monkeypatch.setattr(judge_server, "MAX_BODY_BYTES", 1024)
    async with (
        JudgeServer() as server,
        aiohttp.ClientSession() as http,
        http.post(
            f"{server.base_url}/chat/completions", json=chat_body(data_url(), prompt="x" * 4096)
        ) as resp,
    ):
        assert resp.status == 413
        error = (await resp.json())["error"]
        assert "the request body is over" in error["message"]
        assert error["type"] == "invalid_request_error"
    assert server.stats().rejected == 1


async def test_models_health_and_metrics() -> None:
    async with (
        JudgeServer(JudgeServerOptions(model="judge-x")) as server,
        aiohttp.ClientSession() as http,
    ):
        root = f"http://{server.host}:{server.port}"
        async with http.get(f"{root}/health") as response:
            assert response.status == 200
        async with http.get(f"{server.base_url}/models") as response:
            assert [m["id"] for m in (await response.json())["data"]] == ["judge-x"]
        async with http.get(f"{root}/metrics") as response:
            text = await response.text()
    assert 'vllm:num_requests_running{model_name="judge-x"} 0.0' in text
    assert 'vllm:num_requests_waiting{model_name="judge-x"} 0.0' in text
    assert "# TYPE vllm:num_requests_waiting gauge" in text


@pytest.mark.parametrize("served_model_only", [True, False])
async def test_another_model_is_404_when_only_the_served_one_is(served_model_only: bool) -> None:
    # As vLLM answers a model it does not serve; without the option, any name is served.
    options = JudgeServerOptions(model="judge-x", served_model_only=served_model_only)
    async with JudgeServer(options) as server, aiohttp.ClientSession() as http:
        url = f"{server.base_url}/chat/completions"
        async with http.post(url, json=chat_body(data_url())) as response:  # trig-judge-sim
            status, answer = response.status, await response.json()
        async with http.post(url, json={**chat_body(data_url()), "model": "judge-x"}) as right:
            assert right.status == 200
    if served_model_only:
        assert status == 404
        assert answer == {
            "error": {
                "message": "The model `trig-judge-sim` does not exist.",
                "type": "NotFoundError",
                "param": None,
                "code": 404,
            }
        }
        assert server.stats().rejected == 1
    else:
        assert status == 200 and answer["model"] == "judge-x"


async def test_requests_past_capacity_wait() -> None:
    options = JudgeServerOptions(capacity=2, latency_s=0.05)
    async with JudgeServer(options) as server, aiohttp.ClientSession() as http:

        async def one(n: int) -> None:
            async with http.post(
                f"{server.base_url}/chat/completions", json=chat_body(data_url(), prompt=f"p{n}")
            ) as response:
                assert response.status == 200

        async with anyio.create_task_group() as tg:
            for n in range(6):
                tg.start_soon(one, n)
    stats = server.stats()
    assert stats.served == 6
    assert stats.max_running == 2
    assert stats.max_waiting >= 2
    assert stats.running == 0 and stats.waiting == 0


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback to listen on")
async def test_port_0_is_one_port_on_every_address_of_the_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A name with two addresses (dual-stack localhost) listened on a free port per address,
    # and base_url named only one of them.
    real = socket.getaddrinfo

    def dual_stack(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "dual-stack.test":
            return real("::1", *args, **kwargs) + real("127.0.0.1", *args, **kwargs)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", dual_stack)
    async with JudgeServer(host="dual-stack.test", port=0) as server:
        assert server.port != 0
        monkeypatch.setattr(socket, "getaddrinfo", real)
        async with aiohttp.ClientSession() as http:
            for address in ("[::1]", "127.0.0.1"):
                async with http.get(f"http://{address}:{server.port}/health") as response:
                    assert response.status == 200, address


async def test_stop_releases_hung_requests(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(path)
    server = JudgeServer(JudgeServerOptions(hang_rate=1.0))
    await server.__aenter__()
    judge = OpenAIJudge("m", OpenAIJudgeOptions(base_url=server.base_url, model="m", timeout_s=30))
    await judge.open()
    sample = Sample(data_id="IQ-R_TA-C_1", task="t2i", prompt="p", dimensions=("IQ-R", "TA-C"))
    outcome: list[BaseException] = []

    async def hung() -> None:
        try:
            await judge.judge(JudgeRequest("m", sample, "IQ-R", judge.prepare(path), 1))
        except RetryableError as exc:
            outcome.append(exc)

    try:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(hung)
                while server.stats().faults["hang"] == 0:
                    await anyio.lowlevel.checkpoint()  # a yield, not a timed wait
                await server.aclose()
    finally:
        await judge.aclose()
        await server.aclose()  # idempotent
    assert len(outcome) == 1 and "HTTP 503" in str(outcome[0])


def test_fault_rates_must_fit() -> None:
    with pytest.raises(ValueError, match="must not exceed 1"):
        JudgeServerOptions(error_rate=0.6, hang_rate=0.6)
    with pytest.raises(ValueError, match="two planted pairs"):
        JudgeServerOptions(correlations={"IQ-R_TA-C": 0.5, "IQ-R_D-K": 0.5})
    with pytest.raises(ValueError, match="in \\[-1, 1\\]"):
        loadings({"IQ-R_TA-C": 1.5})


def test_dimension_is_read_from_the_instruction() -> None:
    assert dimension_of("Dimension: Realism (IQ-R).") == "IQ-R"
    assert dimension_of("judge R-T here") == "R-T"
    assert dimension_of("nothing to see") is None


def test_only_planted_pairs_correlate() -> None:
    # Every planted pair loaded on one shared factor: planting IQ-R_TA-C = 0.8 and
    # D-K_R-T = -0.8 made IQ-R and D-K correlate by 0.8 as well.
    planted = loadings({"IQ-R_TA-C": 0.8, "D-K_R-T": -0.8})
    keys = [str(n) for n in range(5000)]
    z = {
        d: np.array([latent(key, d, planted.get(d), seed=3) for key in keys])
        for d in ("IQ-R", "TA-C", "D-K", "R-T", "IQ-A")
    }

    def corr(a: str, b: str) -> float:
        return float(np.corrcoef(z[a], z[b])[0, 1])

    assert corr("IQ-R", "TA-C") == pytest.approx(0.8, abs=0.05)
    assert corr("D-K", "R-T") == pytest.approx(-0.8, abs=0.05)
    for a, b in [("IQ-R", "D-K"), ("IQ-R", "R-T"), ("TA-C", "D-K"), ("TA-C", "R-T")]:
        assert abs(corr(a, b)) < 0.06, (a, b)
    assert abs(corr("IQ-R", "IQ-A")) < 0.06


def test_rating_distribution_follows_the_latent() -> None:
    scores = [score_top_logprobs(rating_logprobs(z), scorer="trig") for z in (-2, -0.5, 0.5, 2)]
    assert None not in scores
    known = [score for score in scores if score is not None]
    assert known == sorted(known)
    assert known[0] < 0.25 and known[-1] > 0.75


async def _scores(
    judge: OpenAIJudge, images: list[PreparedImage], dimension: Dimension
) -> list[float]:
    sample = Sample(data_id="IQ-R_TA-C_1", task="t2i", prompt="p", dimensions=("IQ-R", "TA-C"))
    scores: list[float] = [0.0] * len(images)
    limiter = anyio.CapacityLimiter(32)

    async def one(index: int) -> None:
        async with limiter:
            reply = await judge.judge(JudgeRequest("m", sample, dimension, images[index], 1))
        assert reply.top_logprobs is not None
        score = score_top_logprobs(reply.top_logprobs)
        assert score is not None
        scores[index] = score

    async with anyio.create_task_group() as tg:
        for index in range(len(images)):
            tg.start_soon(one, index)
    return scores


async def test_planted_correlations_show_in_scores(tmp_path: Path) -> None:
    images = []
    for n in range(200):
        path = tmp_path / f"{n}.png"
        Image.new("RGB", (8, 8), (n, 255 - n, (7 * n) % 256)).save(path)
        images.append(path)
    options = JudgeServerOptions(correlations={"IQ-R_TA-C": 0.8, "D-K_R-T": -0.8}, seed=3)
    async with JudgeServer(options) as server:
        judge = OpenAIJudge("m", OpenAIJudgeOptions(base_url=server.base_url, model="m"))
        await judge.open()
        try:
            prepared = [judge.prepare(path) for path in images]
            by_dim = {
                d: await _scores(judge, prepared, d) for d in ("IQ-R", "TA-C", "D-K", "R-T", "IQ-A")
            }
        finally:
            await judge.aclose()
    assert spearmanr(by_dim["IQ-R"], by_dim["TA-C"])[0] > 0.5
    assert spearmanr(by_dim["D-K"], by_dim["R-T"])[0] < -0.5
    assert abs(spearmanr(by_dim["IQ-R"], by_dim["IQ-A"])[0]) < 0.3
    assert server.stats().repeated == 0


async def test_planted_correlation_survives_a_user_text_naming_the_dimension(
    tmp_path: Path,
) -> None:
    # The image key took in the user text, which such a template makes differ per dimension:
    # the two questions about an image got independent latents, and no correlation came out.
    template = tmp_path / "template.toml"
    template.write_text(
        'version = "names-it-1"\n[user_prefix]\n'
        't2i = "Judge the {dimension_name} ({dimension}: {criteria}) of this image, made from: "\n'
    )
    images = []
    for n in range(120):
        path = tmp_path / f"{n}.png"
        Image.new("RGB", (8, 8), (n, 255 - n, (7 * n) % 256)).save(path)
        images.append(path)
    options = JudgeServerOptions(correlations={"IQ-R_TA-C": 0.8}, seed=3)
    async with JudgeServer(options) as server:
        judge_options = OpenAIJudgeOptions(base_url=server.base_url, model="m", template=template)
        judge = OpenAIJudge("m", judge_options)
        await judge.open()
        try:
            prepared = [judge.prepare(path) for path in images]
            by_dim = {d: await _scores(judge, prepared, d) for d in ("IQ-R", "TA-C")}
        finally:
            await judge.aclose()
    assert spearmanr(by_dim["IQ-R"], by_dim["TA-C"])[0] > 0.5


@pytest.mark.parametrize("case", ["shrunk for max_pixels", "one source image"])
async def test_two_samples_sent_the_same_bytes_get_their_own_answers(
    tmp_path: Path, case: str
) -> None:
    # The subject was the image bytes alone: an engine PNG shrunk for max_pixels loses the
    # text chunk naming its sample, and a baseline returns one source image for several
    # prompts; either way two samples shared one latent, hence the same answers.
    pixels = Image.new("RGB", (256, 256), (40, 90, 200))
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    for path in paths:
        path.write_bytes(with_sample_digest(encode_png(pixels), f"model/{path.stem}"))
    max_pixels = None
    if case == "one source image":
        paths = [paths[0], paths[0]]
    else:
        max_pixels = 64 * 64
    prompts = ["a blue square on a table", "a red cat asleep"]
    async with JudgeServer() as server:
        options = OpenAIJudgeOptions(base_url=server.base_url, model="m", max_pixels=max_pixels)
        judge = OpenAIJudge("m", options)
        await judge.open()
        try:
            answers = []
            for n, (path, prompt) in enumerate(zip(paths, prompts, strict=True), start=1):
                sample = Sample(
                    data_id=f"IQ-R_TA-C_{n}", task="t2i", prompt=prompt, dimensions=("IQ-R", "TA-C")
                )
                reply = await judge.judge(JudgeRequest("m", sample, "TA-C", judge.prepare(path), 1))
                answers.append(reply.top_logprobs)
        finally:
            await judge.aclose()
    assert answers[0] is not None and answers[0] != answers[1]


async def test_two_images_are_not_read_as_their_concatenation() -> None:
    # The images' bytes were hashed end to end: [P, P+P] and [P+P, P] (Pillow reads a PNG
    # with bytes after its end) were one subject.
    png = base64.b64decode(data_url().split(",", 1)[1])
    urls = ["data:image/png;base64," + base64.b64encode(d).decode() for d in (png, png + png)]
    choices = []
    async with JudgeServer() as server, aiohttp.ClientSession() as http:
        for pair in (urls, urls[::-1]):
            body = chat_body(pair[0])
            body["messages"][1]["content"].insert(
                1, {"type": "image_url", "image_url": {"url": pair[1]}}
            )
            async with http.post(f"{server.base_url}/chat/completions", json=body) as response:
                assert response.status == 200
                choices.append((await response.json())["choices"])
    assert choices[0] != choices[1]


@pytest.mark.parametrize("dimension", list(DIMENSION_NAMES))
def test_dimension_is_read_from_its_name_or_builtin_criterion_alone(dimension: Dimension) -> None:
    # The fallback looked for the first word of each name ("Content", "Relation") anywhere,
    # in dict order, and never for a criterion: R-T's criterion ("harmful content") read as
    # TA-C, and 7 of the 10 criteria as no dimension.
    name, criterion = DIMENSION_NAMES[dimension], BUILTIN_CRITERIA[dimension]
    assert dimension_of(f"Dimension: {name}. What to look for: {criterion} Reply.") == dimension
    assert dimension_of(f"What to look for: {criterion} Reply with one word.") == dimension
    assert dimension_of(f"Judge the {name.lower()} of this picture.") == dimension


def test_a_dimension_named_by_its_placeholders_outweighs_a_word_of_prose() -> None:
    # A name written as {dimension_name} puts it (capital included) or a code outweighs a
    # common word that happens to be a name; two named alike are refused, not guessed.
    assert dimension_of("Dimension: Toxicity. Use your knowledge of the world.") == "R-T"
    assert dimension_of("Rate D-A: is the realism of the scene convincing?") == "D-A"
    assert dimension_of("Rate Realism and Toxicity.") is None
    assert dimension_of("Rate IQ-R and TA-C.") is None
    assert dimension_of("nothing to see; biased or not") is None


@pytest.mark.parametrize(
    ("system", "message"),
    [
        ("Rate this picture with one word.", "names no dimension code"),
        ("Rate its Realism and its Toxicity.", "names IQ-R and R-T equally"),
    ],
)
async def test_a_question_on_no_clear_dimension_is_an_openai_shaped_400(
    system: str, message: str
) -> None:
    # It was scored on a dimension "unknown", shared by every such question: any two
    # dimensions a template named this way came out perfectly correlated.
    body = chat_body(data_url())
    body["messages"][0]["content"] = system
    async with (
        JudgeServer() as server,
        aiohttp.ClientSession() as http,
        http.post(f"{server.base_url}/chat/completions", json=body) as response,
    ):
        status, answer = response.status, await response.json()
    assert status == 400
    assert answer["error"]["type"] == "invalid_request_error"
    assert "cannot tell which dimension this question asks about" in answer["error"]["message"]
    assert message in answer["error"]["message"]
    assert server.stats().rejected == 1 and server.stats().served == 0


async def test_planted_correlation_survives_a_dimension_named_only_in_the_user_text(
    tmp_path: Path,
) -> None:
    # With a system text that names no dimension, the server read the dimension from the
    # system text alone: every question was on "unknown", and every pair correlated by 1.
    template = tmp_path / "template.toml"
    template.write_text(
        'version = "user-names-it-1"\n'
        '[system]\nt2i = "You rate generated pictures. Reply with one word of: {scale}."\n'
        '[user_prefix]\nt2i = "Dimension {dimension} ({dimension_name}). What to look for: '
        '{criteria} Text the image was generated from: "\n'
    )
    images = []
    for n in range(150):
        path = tmp_path / f"{n}.png"
        Image.new("RGB", (8, 8), (n, 255 - n, (7 * n) % 256)).save(path)
        images.append(path)
    options = JudgeServerOptions(correlations={"IQ-R_TA-R": -0.9}, seed=5)
    async with JudgeServer(options) as server:
        judge_options = OpenAIJudgeOptions(base_url=server.base_url, model="m", template=template)
        judge = OpenAIJudge("m", judge_options)
        await judge.open()
        try:
            prepared = [judge.prepare(path) for path in images]
            by_dim = {d: await _scores(judge, prepared, d) for d in ("IQ-R", "TA-R", "IQ-A")}
        finally:
            await judge.aclose()
    assert spearmanr(by_dim["IQ-R"], by_dim["TA-R"])[0] < -0.6
    assert abs(spearmanr(by_dim["IQ-R"], by_dim["IQ-A"])[0]) < 0.3


async def test_wait_until_sees_faults_and_rejections() -> None:
    # Only taking and releasing a slot woke the waiters: a wait for a fault or a
    # rejection hung although the counter had moved.
    async with (
        JudgeServer(JudgeServerOptions(error_rate=1.0)) as server,
        aiohttp.ClientSession() as http,
    ):

        async def post(body: Any) -> None:
            async with http.post(f"{server.base_url}/chat/completions", json=body) as response:
                await response.read()

        with anyio.fail_after(10):  # a safety net: the wait returns as the counter moves
            async with anyio.create_task_group() as tg:
                tg.start_soon(post, chat_body(data_url()))
                stats = await server.wait_until(lambda s: s.faults["error"] >= 1)
            assert stats.faults["error"] == 1
            async with anyio.create_task_group() as tg:
                tg.start_soon(post, [])
                stats = await server.wait_until(lambda s: s.rejected >= 1)
            assert stats.rejected == 1


async def test_wait_until_sees_a_queued_request_given_up() -> None:
    # A queued request whose client went away left the queue without waking the waiters.
    server = JudgeServer(JudgeServerOptions(capacity=1))
    server.hold()
    async with server, aiohttp.ClientSession() as first, aiohttp.ClientSession() as second:

        async def post(http: aiohttp.ClientSession, prompt: str) -> None:
            body = chat_body(data_url(), prompt=prompt)
            async with http.post(f"{server.base_url}/chat/completions", json=body) as response:
                await response.read()

        with anyio.fail_after(10):  # a safety net: each wait returns as its state comes
            async with anyio.create_task_group() as tg:
                tg.start_soon(post, first, "held")
                await server.wait_until(lambda s: s.running == 1)
                queued = anyio.CancelScope()

                async def given_up() -> None:
                    with queued:
                        await post(second, "queued")

                tg.start_soon(given_up)
                await server.wait_until(lambda s: s.waiting == 1)
                queued.cancel()
                await second.close()  # its connection goes, and with it the queued request
                stats = await server.wait_until(lambda s: s.waiting == 0)
                assert stats.running == 1
                server.release()


def test_a_retry_after_in_other_digits_is_refused_and_never_read() -> None:
    # "٣" (Arabic-Indic three) passed \d: the server sent it as UTF-8, which one judge
    # client read as a wait of 3 s and another, reading latin-1, ignored.
    with pytest.raises(ValueError, match="non-ASCII character"):
        JudgeServerOptions(retry_after="\u0663")
    with pytest.raises(ValueError, match="non-ASCII character"):
        JudgeServerOptions(retry_after="1\u0660")
    assert parse_retry_after({"Retry-After": "\u0663"}) is None
    assert parse_retry_after({"retry-after-ms": "\u0663\u0660\u0660"}) is None
    assert parse_retry_after({"Retry-After": "3"}) == 3.0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        # An SDK iterating stream=True got no chunk and no error; n=3 got one choice.
        ({"stream": True}, "'stream': the simulated judge does not stream"),
        ({"n": 3}, "'n': the simulated judge gives one choice"),
        ({"n": True}, "'n'"),
        ({"top_logprobs": True}, "'top_logprobs' must be an integer from 0 to 20"),
        ({"logprobs": False}, "when using 'top_logprobs', 'logprobs' must be set to true"),
        ({"logprobs": "yes"}, "'logprobs' must be true or false, got a string"),
        ({"max_tokens": 0}, "'max_tokens' must be an integer of at least 1, got 0"),
        ({"max_tokens": "1"}, "'max_tokens' must be an integer of at least 1, got '1'"),
        ({"max_completion_tokens": 0}, "'max_completion_tokens' must be an integer"),
        ({"messages": []}, "'messages' must be a non-empty list"),
        ({"model": 3}, "'model' must be a string"),
    ],
)
async def test_options_it_cannot_honour_are_an_openai_shaped_400(
    change: dict[str, Any], message: str
) -> None:
    async with JudgeServer() as server, aiohttp.ClientSession() as http:
        body = {**chat_body(data_url()), **change}
        async with http.post(f"{server.base_url}/chat/completions", json=body) as response:
            status, answer = response.status, await response.json()
    assert status == 400, answer
    assert answer["error"]["type"] == "invalid_request_error"
    assert message in answer["error"]["message"]
    assert server.stats().rejected == 1


async def test_a_text_part_without_a_string_is_400() -> None:
    # {"text": null} was hashed as the text "None" and answered.
    body = chat_body(data_url())
    body["messages"][1]["content"][1]["text"] = None
    async with (
        JudgeServer() as server,
        aiohttp.ClientSession() as http,
        http.post(f"{server.base_url}/chat/completions", json=body) as response,
    ):
        status, answer = response.status, await response.json()
    assert status == 400
    assert "a text part's 'text' must be a string, got null" in answer["error"]["message"]


async def test_the_options_it_honours_are_still_served() -> None:
    change = {"stream": False, "n": 1, "max_tokens": 2, "max_completion_tokens": None}
    async with JudgeServer() as server, aiohttp.ClientSession() as http:
        body = {**chat_body(data_url()), **change}
        async with http.post(f"{server.base_url}/chat/completions", json=body) as response:
            assert response.status == 200
            assert len((await response.json())["choices"]) == 1


async def test_a_request_without_a_model_is_served_by_the_served_model() -> None:
    # With --model, it was a 404 "The model `None` does not exist."; vLLM serves a request
    # naming no model with its served model. A body that is a list is no request: a 400.
    options = JudgeServerOptions(model="judge-x", served_model_only=True)
    body = chat_body(data_url())
    del body["model"]
    async with JudgeServer(options) as server, aiohttp.ClientSession() as http:
        url = f"{server.base_url}/chat/completions"
        async with http.post(url, json=body) as response:
            assert response.status == 200
            assert (await response.json())["model"] == "judge-x"
        async with http.post(url, json=[body]) as response:
            status, answer = response.status, await response.json()
    assert status == 400
    assert "the request body must be a JSON object" in answer["error"]["message"]


async def test_models_needs_the_api_key_when_one_is_set() -> None:
    # It answered 200 without a key; vLLM answers 401 on every /v1 route.
    options = JudgeServerOptions(api_key="sk-right")
    async with JudgeServer(options) as server, aiohttp.ClientSession() as http:
        async with http.get(f"{server.base_url}/models") as response:
            status, answer = response.status, await response.json()
        headers = {"Authorization": "Bearer sk-right"}
        async with http.get(f"{server.base_url}/models", headers=headers) as response:
            assert response.status == 200
    assert status == 401
    assert answer["error"]["code"] == "invalid_api_key"
