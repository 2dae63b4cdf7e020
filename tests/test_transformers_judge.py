"""The ``transformers`` judge on a tiny random LLaVA built in code and reloaded offline."""

from __future__ import annotations

import json
import math
import re
import sys
import threading
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import anyio.lowlevel
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from PIL import Image
from pydantic import ValidationError

from tests.conftest import ConfigFactory, write_prompts
from trig_stream.backends.base import JudgeReply, JudgeRequest, PreparedImage
from trig_stream.backends.generators.diffusers_options import DiffusersOptions
from trig_stream.backends.judges.transformers_judge import (
    TransformersJudge,
    TransformersJudgeOptions,
    context_length,
)
from trig_stream.backends.threads import threads_left_behind
from trig_stream.engine import Engine
from trig_stream.errors import FatalBackendError, ItemError, MissingExtraError
from trig_stream.journal import JOURNAL, read_journal
from trig_stream.manifest import Manifest
from trig_stream.records import Sample
from trig_stream.scoring import score_top_logprobs
from trig_stream.testing.tiny_vlm import RATING_WORDS, build_tiny_vlm, tiny_vlm_options

pytestmark = pytest.mark.anyio

SAMPLE = Sample(
    data_id="IQ-R_TA-C_1",
    task="t2i",
    prompt="a red bicycle leaning on a wall",
    dimensions=("IQ-R", "TA-C"),
)


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_vlm(tmp_path_factory.mktemp("tiny-vlm") / "model")


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("judge-images")
    paths = []
    for index, colour in enumerate([(220, 30, 30), (30, 200, 60), (20, 40, 230), (250, 250, 250)]):
        path = folder / f"{index}.png"
        Image.new("RGB", (64, 64), colour).save(path)
        paths.append(path)
    return paths


def make_judge(path: Path, **options: Any) -> TransformersJudge:
    return TransformersJudge(
        "trigscore", TransformersJudgeOptions(**tiny_vlm_options(path, **options))
    )


def request(
    judge: TransformersJudge, image: Path, dimension: Any = "IQ-R", prompt: str | None = None
) -> JudgeRequest:
    sample = SAMPLE if prompt is None else SAMPLE.model_copy(update={"prompt": prompt})
    return JudgeRequest("synth", sample, dimension, judge.prepare(image), 1)


def test_tiny_vlm_reloads_offline_with_single_token_ratings(tiny_vlm: Path) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    load: Any = AutoProcessor.from_pretrained  # not annotated
    processor = load(tiny_vlm, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(tiny_vlm, local_files_only=True)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    for word in RATING_WORDS:
        assert len(processor.tokenizer(word, add_special_tokens=False)["input_ids"]) == 1


async def test_reply_holds_the_first_tokens_logprobs(tiny_vlm: Path, images: list[Path]) -> None:
    judge = make_judge(tiny_vlm)
    await judge.open()
    try:
        reply = await judge.judge(request(judge, images[0]))
    finally:
        await judge.aclose()
    assert reply.score is None and reply.top_logprobs is not None
    top = reply.top_logprobs
    vocabulary = len(judge_tokenizer(tiny_vlm))
    assert len(top) == vocabulary  # top_logprobs above the vocabulary is capped at it
    values = [lp for _, lp in top]
    assert all(math.isfinite(lp) and lp <= 0 for lp in values)
    assert values == sorted(values, reverse=True)
    assert math.isclose(sum(math.exp(lp) for lp in values), 1.0, rel_tol=1e-4)
    assert set(RATING_WORDS) <= {token for token, _ in top}
    assert reply.text == top[0][0]
    score = score_top_logprobs(top, scorer="trig")
    assert score is not None and 0.0 <= score <= 1.0


def judge_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


async def test_concurrent_requests_are_batched_with_the_same_answers(
    tiny_vlm: Path, images: list[Path]
) -> None:
    batched = make_judge(tiny_vlm, batch_size=8, top_logprobs=20)
    single = make_judge(tiny_vlm, batch_size=1, top_logprobs=20)
    questions = [(image, dimension) for image in images for dimension in ("IQ-R", "TA-C")]
    replies: dict[int, JudgeReply] = {}

    async def ask(index: int) -> None:
        image, dimension = questions[index]
        replies[index] = await batched.judge(request(batched, image, dimension))

    await batched.open()
    await single.open()
    try:
        async with anyio.create_task_group() as tg:
            for index in range(len(questions)):
                tg.start_soon(ask, index)
        alone = [await single.judge(request(single, i, d)) for i, d in questions]
        assert batched.batcher is not None and batched.batcher.largest_batch >= 2
    finally:
        await batched.aclose()
        await single.aclose()
    for index, reply in enumerate(alone):
        together = replies[index]
        assert together.top_logprobs is not None and reply.top_logprobs is not None
        assert [t for t, _ in together.top_logprobs[:5]] == [t for t, _ in reply.top_logprobs[:5]]
        for (_, a), (_, b) in zip(together.top_logprobs, reply.top_logprobs, strict=True):
            assert a == pytest.approx(b, abs=1e-4)


def without_tokens(tiny_vlm: Path, folder: Path, *names: str) -> Path:
    """A copy of the tiny VLM whose tokenizer_config.json names none of ``names``."""
    import shutil

    shutil.copytree(tiny_vlm, folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    assert all(name in config for name in names)
    config_path.write_text(json.dumps({k: v for k, v in config.items() if k not in names}))
    return folder


async def test_a_tokenizer_without_a_pad_token_pads_with_its_eos_token_to_the_same_answers(
    tiny_vlm: Path, images: list[Path], tmp_path: Path
) -> None:
    # Every batch failed ("Asking to pad but the tokenizer does not have a padding token"):
    # each judgement an error, and the run ended done, exit 0.
    no_pad = without_tokens(tiny_vlm, tmp_path / "no-pad", "pad_token")
    batched = make_judge(no_pad, batch_size=8, top_logprobs=20)
    single = make_judge(tiny_vlm, batch_size=1, top_logprobs=20)  # padded by its own pad token
    prompts = ["a cat", "a red bicycle leaning on a wall beside a blue door in the rain"]
    questions = [
        (image, dimension, prompt)
        for image in images[:2]
        for dimension in ("IQ-R", "TA-C")
        for prompt in prompts
    ]
    replies: dict[int, JudgeReply] = {}

    async def ask(index: int) -> None:
        image, dimension, prompt = questions[index]
        replies[index] = await batched.judge(request(batched, image, dimension, prompt))

    await batched.open()
    await single.open()
    try:
        async with anyio.create_task_group() as tg:
            for index in range(len(questions)):
                tg.start_soon(ask, index)
        alone = [await single.judge(request(single, i, d, p)) for i, d, p in questions]
        assert batched.batcher is not None and batched.batcher.largest_batch >= 2
    finally:
        await batched.aclose()
        await single.aclose()
    for index, reply in enumerate(alone):
        together = replies[index]
        assert together.top_logprobs is not None and reply.top_logprobs is not None
        assert [t for t, _ in together.top_logprobs[:5]] == [t for t, _ in reply.top_logprobs[:5]]
        for (_, a), (_, b) in zip(together.top_logprobs, reply.top_logprobs, strict=True):
            assert a == pytest.approx(b, abs=1e-4)


async def test_a_tokenizer_with_nothing_to_pad_with_is_refused_at_load(
    tiny_vlm: Path, tmp_path: Path
) -> None:
    folder = without_tokens(tiny_vlm, tmp_path / "no-pad-eos", "pad_token", "eos_token")
    judge = make_judge(folder)
    with pytest.raises(FatalBackendError) as refused:
        await judge.open()
    message = str(refused.value)
    assert f"judge 'trigscore': the tokenizer in {folder} has no pad_token" in message
    assert "set pad_token in its tokenizer_config.json" in message


def with_chat_template(tiny_vlm: Path, folder: Path, refusal: str) -> Path:
    """A copy of the tiny VLM whose chat template raises first for a message matching the
    Jinja test ``refusal`` (on ``message``)."""
    import shutil

    from trig_stream.testing.tiny_vlm import CHAT_TEMPLATE

    shutil.copytree(tiny_vlm, folder)
    check = (
        "{% for message in messages %}"
        f"{{% if {refusal} %}}{{{{ raise_exception('refused') }}}}{{% endif %}}"
        "{% endfor %}"
    )
    (folder / "chat_template.jinja").write_text(check + CHAT_TEMPLATE)
    return folder


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_request_the_chat_template_refuses_is_its_own_error(
    tiny_vlm: Path, images: list[Path], tmp_path: Path
) -> None:
    # The first template error of any request folded the system text into the user turn for
    # every later request of the run: other prompts, other scores, the same fingerprint.
    refusing = with_chat_template(
        tiny_vlm, tmp_path / "refusing", "'FORBIDDEN' in (message['content'] | string)"
    )
    judge = make_judge(refusing, batch_size=1, top_logprobs=20)
    await judge.open()
    try:
        before = await judge.judge(request(judge, images[0]))
        with pytest.raises(ItemError, match="refused"):
            await judge.judge(request(judge, images[0], prompt="FORBIDDEN words"))
        after = await judge.judge(request(judge, images[0]))
        roles = [message["role"] for message in judge.messages(request(judge, images[0]))]
    finally:
        await judge.aclose()
    assert roles == ["system", "user"]
    assert after == before


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_chat_template_without_a_system_turn_opens_the_user_turn_with_its_text(
    tiny_vlm: Path, images: list[Path], tmp_path: Path
) -> None:
    no_system = with_chat_template(tiny_vlm, tmp_path / "no-system", "message['role'] == 'system'")
    judge = make_judge(no_system, batch_size=1, top_logprobs=20)
    await judge.open()
    try:
        reply = await judge.judge(request(judge, images[0]))
        messages = judge.messages(request(judge, images[0]))
    finally:
        await judge.aclose()
    assert reply.top_logprobs
    assert [message["role"] for message in messages] == ["user"]
    system = judge.template.system_text(SAMPLE.task, "IQ-R", SAMPLE.item)
    assert messages[0]["content"][1]["text"].startswith(system + "\n\n")


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_chat_template_that_refuses_every_conversation_is_refused_at_load(
    tiny_vlm: Path, tmp_path: Path
) -> None:
    refusing = with_chat_template(tiny_vlm, tmp_path / "refusing-all", "true")
    judge = make_judge(refusing)
    with pytest.raises(FatalBackendError) as refused:
        await judge.open()
    assert str(refused.value).startswith(
        f"judge 'trigscore': the chat template in {refusing} refuses a plain conversation"
    )


async def test_batches_take_what_is_waiting(tiny_vlm: Path, images: list[Path]) -> None:
    judge = make_judge(tiny_vlm, batch_size=4, top_logprobs=5)
    await judge.open()
    try:
        batcher = judge.batcher
        assert batcher is not None
        async with anyio.create_task_group() as tg:
            for index in range(6):
                tg.start_soon(judge.judge, request(judge, images[index % len(images)]))
        assert batcher.largest_batch >= 2
        assert batcher.largest_batch <= 4
        assert batcher.batches < 6
    finally:
        await judge.aclose()


def test_check_environment_names_the_model_files_the_folder_lacks(
    tiny_vlm: Path, tmp_path: Path
) -> None:
    # validate said ok for an empty model_path, and for a model without its weights; the
    # run then failed as it loaded them (exit 4).
    make_judge(tiny_vlm).check_environment()  # a whole model passes
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FatalBackendError) as raised:
        make_judge(empty).check_environment()
    message = str(raised.value)
    assert f"model_path {empty} holds no model to load: it lacks its config (config.json)" in (
        message
    )
    assert "its weights (" in message and "its processor or tokenizer (" in message
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    for file in tiny_vlm.iterdir():
        if file.suffix != ".safetensors":
            (weightless / file.name).write_bytes(file.read_bytes())
    with pytest.raises(
        FatalBackendError, match=r"it lacks its weights \(\*\.safetensors"
    ) as raised:
        make_judge(weightless).check_environment()
    assert "config.json" not in str(raised.value)


def test_unreadable_image_is_an_item_error(tiny_vlm: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(ItemError, match="not a readable image"):
        make_judge(tiny_vlm).prepare(broken)


async def test_unprepared_image_is_an_item_error(tiny_vlm: Path, images: list[Path]) -> None:
    judge = make_judge(tiny_vlm)
    await judge.open()
    try:
        with pytest.raises(ItemError, match="not prepared"):
            await judge.judge(
                JudgeRequest("synth", SAMPLE, "IQ-R", PreparedImage(path=images[0]), 1)
            )
    finally:
        await judge.aclose()


async def test_missing_model_or_device_is_fatal(
    tiny_vlm: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(FatalBackendError, match=r"model_path .*nowhere does not exist; set"):
        await make_judge(tmp_path / "nowhere").open()
    # The demo's judge, not built yet: the error says how to build it.
    with pytest.raises(FatalBackendError) as raised:
        await make_judge(tmp_path / "vlm").open()
    assert str(raised.value).endswith(
        f"(one of the tiny models? `trig-stream make-tiny-models {tmp_path}` builds them)"
    )
    (tmp_path / "empty").mkdir()
    with pytest.raises(FatalBackendError, match=r"model_path .*empty holds no model to load"):
        await make_judge(tmp_path / "empty").open()
    broken = tmp_path / "broken"  # every file there, none of them a model's
    broken.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (broken / name).write_text("{}")
    with pytest.raises(FatalBackendError, match=r"cannot load the model in .*broken: "):
        await make_judge(broken).open()
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(
        FatalBackendError,
        match=r"^judge 'trigscore': device cuda:3 is not available \(no such CUDA device: torch ",
    ):
        await make_judge(tiny_vlm, device="cuda:3").open()
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(
        FatalBackendError, match=r"^judge 'trigscore': device mps:0 is not available; set"
    ):
        await make_judge(tiny_vlm, device="mps:0").open()


def test_a_device_name_is_checked_as_a_generator_checks_it(tmp_path: Path) -> None:
    # "cpu:1" was refused with the raw pattern "String should match pattern ..." here, and
    # accepted in a diffusers generator's devices: one rule and one message now serve both.
    # "mps:1" and "cuda:\u0663" (an Arabic-Indic 3) passed it, though its message calls them
    # unknown, and were refused only by the run.
    for device in ("cpu:1", "gpu", "cuda:x", "mps:", "mps:1", "cuda:\u0663"):
        with pytest.raises(
            ValidationError,
            match=r"unknown device; use 'cpu', 'cuda', 'cuda:<n>', 'mps' or 'mps:0'",
        ):
            TransformersJudgeOptions(model_path=tmp_path, device=device)
        with pytest.raises(
            ValidationError,
            match=r"unknown device; use 'cpu', 'cuda', 'cuda:<n>', 'mps' or 'mps:0'",
        ):
            DiffusersOptions(preset="sd15", devices=[device])
    for device in ("cpu", "cuda", "cuda:3", "mps", "mps:0"):
        assert TransformersJudgeOptions(model_path=tmp_path, device=device).device == device
        assert DiffusersOptions(preset="sd15", devices=[device]).devices == [device]


CONTEXT = 2048
"""The tiny model's ``max_position_embeddings``."""


def request_tokens(tiny_vlm: Path, judge: TransformersJudge, question: JudgeRequest) -> int:
    """The request's length as the model's own processor builds it, image tokens included."""
    from transformers import AutoProcessor

    load: Any = AutoProcessor.from_pretrained  # not annotated
    processor = load(tiny_vlm, local_files_only=True)
    text = processor.apply_chat_template(
        judge.messages(question), add_generation_prompt=True, tokenize=False
    )
    return len(processor(text=[text], images=[question.image.payload])["input_ids"][0])


def prompt_of(tiny_vlm: Path, judge: TransformersJudge, image: Path, tokens: int) -> str:
    """A prompt that makes a request of exactly ``tokens`` tokens (one "x" is one token)."""
    base = request_tokens(tiny_vlm, judge, request(judge, image, prompt="x"))
    prompt = "x" * (1 + tokens - base)
    assert request_tokens(tiny_vlm, judge, request(judge, image, prompt=prompt)) == tokens
    return prompt


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("prompt", ["look <image> here", "the end</s> of it"])
async def test_a_prompt_that_spells_a_model_token_is_judged_as_text(
    tiny_vlm: Path, images: list[Path], prompt: str
) -> None:
    # The processor took the prompt's "<image>" for a second image: "Found total 2 <image>
    # tokens and 1 images", an error at any batch size.
    judge = make_judge(tiny_vlm, top_logprobs=20)
    await judge.open()
    try:
        reply = await judge.judge(request(judge, images[0], prompt=prompt))
        text = judge.messages(request(judge, images[0], prompt=prompt))[-1]["content"][1]["text"]
    finally:
        await judge.aclose()
    assert reply.top_logprobs
    assert text.endswith(prompt.replace("<", "<\u2060"))


async def test_request_over_the_context_is_its_own_error_in_its_batch(
    tiny_vlm: Path, images: list[Path]
) -> None:
    judge = make_judge(tiny_vlm, batch_size=4, top_logprobs=20)
    long_prompt = prompt_of(tiny_vlm, judge, images[0], 3000)
    widths: list[int] = []
    outcomes: dict[int, JudgeReply | Exception] = {}

    async def ask(index: int) -> None:
        prompt = long_prompt if index == 1 else None
        try:
            outcomes[index] = await judge.judge(request(judge, images[index], prompt=prompt))
        except ItemError as exc:
            outcomes[index] = exc

    await judge.open()
    try:
        model: Any = judge._model  # the forwards' widths show what was padded together
        model.register_forward_pre_hook(
            lambda _, args, kwargs: widths.append(kwargs["input_ids"].shape[-1]),
            with_kwargs=True,
        )
        async with anyio.create_task_group() as tg:
            for index in range(4):
                tg.start_soon(ask, index)
        batcher = judge.batcher
        assert batcher is not None and batcher.largest_batch == 4  # all four in one batch
        alone = [await judge.judge(request(judge, images[index])) for index in (0, 2, 3)]
    finally:
        await judge.aclose()
    error = outcomes.pop(1)
    assert isinstance(error, ItemError)
    assert str(error).startswith(
        "judge 'trigscore': the request is 3,000 tokens, over the judge model's context of 2,048"
    )
    assert widths and max(widths) < CONTEXT
    for index, reply in zip((0, 2, 3), alone, strict=True):
        together = outcomes[index]
        assert isinstance(together, JudgeReply) and together.top_logprobs is not None
        assert reply.top_logprobs is not None
        for (token, a), (same, b) in zip(together.top_logprobs, reply.top_logprobs, strict=True):
            assert token == same and a == pytest.approx(b, abs=1e-4)


async def test_request_at_the_context_is_judged(tiny_vlm: Path, images: list[Path]) -> None:
    judge = make_judge(tiny_vlm, batch_size=1)
    fitting = prompt_of(tiny_vlm, judge, images[0], CONTEXT)
    await judge.open()
    try:
        reply = await judge.judge(request(judge, images[0], prompt=fitting))
        with pytest.raises(ItemError, match=r"the request is 2,049 tokens, over .* of 2,048"):
            await judge.judge(request(judge, images[0], prompt=fitting + "x"))
    finally:
        await judge.aclose()
    assert reply.top_logprobs is not None and len(reply.top_logprobs) > 0


async def test_max_context_replaces_the_models_context(tiny_vlm: Path, images: list[Path]) -> None:
    # A model run past its declared length (rope scaling) would otherwise be refused there.
    base = make_judge(tiny_vlm, batch_size=1)
    beyond = prompt_of(tiny_vlm, base, images[0], CONTEXT + 100)
    judge = make_judge(tiny_vlm, batch_size=1, max_context=CONTEXT + 100)
    await judge.open()
    try:
        reply = await judge.judge(request(judge, images[0], prompt=beyond))
        with pytest.raises(ItemError, match=r"2,149 tokens, over the judge's max_context of 2,148"):
            await judge.judge(request(judge, images[0], prompt=beyond + "x"))
    finally:
        await judge.aclose()
    assert reply.top_logprobs is not None and len(reply.top_logprobs) > 0


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_requests_over_the_context_before_any_success_stop_the_run_after_a_few(
    tiny_vlm: Path, images: list[Path]
) -> None:
    # With max_context = 1 every request was an error of its own, and the run ended done,
    # exit 0: as the openai judge's refusals, that many in a row before any success is the
    # config's fault.
    from trig_stream.backends.judges.http_errors import REFUSALS_TO_STOP

    judge = make_judge(tiny_vlm, batch_size=1, top_logprobs=5, max_context=1)
    await judge.open()
    try:
        for _ in range(REFUSALS_TO_STOP - 1):
            with pytest.raises(ItemError, match="over the judge's max_context of 1") as caught:
                await judge.judge(request(judge, images[0]))
            assert not isinstance(caught.value, FatalBackendError)
        with pytest.raises(FatalBackendError) as raised:
            await judge.judge(request(judge, images[0]))
    finally:
        await judge.aclose()
    assert (
        f"the first {REFUSALS_TO_STOP} requests were all over the judge's max_context of 1 "
        "and none was judged: raise max_context" in str(raised.value)
    )
    judge = make_judge(tiny_vlm, batch_size=1, top_logprobs=5)
    await judge.open()
    try:
        await judge.judge(request(judge, images[0]))  # once one is judged, each is its own
        for _ in range(REFUSALS_TO_STOP + 1):
            with pytest.raises(ItemError, match="over the judge model's context") as caught:
                await judge.judge(request(judge, images[0], prompt="x" * 3000))
            assert not isinstance(caught.value, FatalBackendError)
    finally:
        await judge.aclose()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_requests_over_the_context_in_a_batch_with_judged_ones_are_their_own_errors(
    tiny_vlm: Path, images: list[Path]
) -> None:
    # They were counted before the batch's fitting rows ran: the 8th of a first batch stopped
    # the run, saying none was judged, though its batch-mates were.
    from trig_stream.backends.judges.http_errors import REFUSALS_TO_STOP

    judge = make_judge(tiny_vlm, batch_size=2 * REFUSALS_TO_STOP, top_logprobs=5)
    outcomes: dict[int, JudgeReply | Exception] = {}

    async def ask(index: int) -> None:
        prompt = "x" * 3000 if index < REFUSALS_TO_STOP else None
        try:
            outcomes[index] = await judge.judge(request(judge, images[index % 4], prompt=prompt))
        except Exception as exc:
            outcomes[index] = exc

    await judge.open()
    try:
        async with anyio.create_task_group() as tg:
            for index in range(2 * REFUSALS_TO_STOP):
                tg.start_soon(ask, index)
        batcher = judge.batcher
        assert batcher is not None and batcher.largest_batch == 2 * REFUSALS_TO_STOP
    finally:
        await judge.aclose()
    for index in range(REFUSALS_TO_STOP):
        error = outcomes[index]
        assert isinstance(error, ItemError) and not isinstance(error, FatalBackendError), error
        assert "over the judge model's context" in str(error)
    for index in range(REFUSALS_TO_STOP, 2 * REFUSALS_TO_STOP):
        assert isinstance(outcomes[index], JudgeReply)


async def test_engine_records_a_prompt_over_the_context_as_an_error(
    tiny_vlm: Path, tmp_path: Path, make_config: ConfigFactory
) -> None:
    prompts = write_prompts(tmp_path / "prompts.json", 6)
    records = json.loads(prompts.read_text())
    records[2]["prompt"] = "x" * 3000
    prompts.write_text(json.dumps(records))
    long_id = records[2]["data_id"]
    config = make_config(
        generators=[{"name": "synth", "backend": "synthetic", "options": {"size": 64}}],
        judges=[
            {
                "name": "trigscore",
                "backend": "transformers",
                "concurrency": 8,
                "options": tiny_vlm_options(tiny_vlm, batch_size=4),
            }
        ],
    )
    async with Engine(config) as engine:
        judgements = [j async for j in engine.results]
    assert len(judgements) == 12
    too_long = [j for j in judgements if j.data_id == long_id]
    assert len(too_long) == 2
    for judgement in too_long:
        assert judgement.status == "error" and judgement.score is None
        assert judgement.error is not None
        assert "over the judge model's context of 2,048" in judgement.error
    assert {j.status for j in judgements if j.data_id != long_id} <= {"ok", "unscorable"}


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_requests_over_the_context_that_stop_the_run_are_all_in_the_journal(
    tiny_vlm: Path, make_config: ConfigFactory
) -> None:
    # "the first 8 requests were all over ...; the refused ones are kept as errors", yet the
    # journal held 7: the 8th, which stopped the run, was written nowhere.
    options = tiny_vlm_options(tiny_vlm, batch_size=1, max_context=1)
    config = make_config(
        samples=6,
        generators=[{"name": "synth", "backend": "synthetic", "options": {"size": 64}}],
        judges=[
            {"name": "trigscore", "backend": "transformers", "concurrency": 1, "options": options}
        ],
    )
    with pytest.raises(FatalBackendError) as caught:
        async with Engine(config) as engine:
            async for _ in engine.results:
                pass
    message = str(caught.value)
    said = re.search(r"the first (\d+) requests were all over", message)
    assert said is not None, message
    assert "the refused ones are kept as errors" in message
    kept = list(read_journal(config.run_dir / JOURNAL))
    assert len(kept) == int(said[1])
    assert all(j.status == "error" and "max_context of 1" in str(j.error) for j in kept)


def test_context_length_comes_from_the_text_config_then_the_tokenizer() -> None:
    from transformers import LlavaConfig, Qwen2VLConfig

    no_limit = SimpleNamespace(model_max_length=int(1e30))
    short = SimpleNamespace(model_max_length=2048)
    llava = LlavaConfig(text_config={"model_type": "llama", "max_position_embeddings": 4096})
    assert context_length(llava, no_limit) == 4096
    assert context_length(llava, short) == 4096  # a tokenizer's setting is not the model's
    flat: Any = Qwen2VLConfig.from_dict  # not annotated
    qwen = flat({"model_type": "qwen2_vl", "max_position_embeddings": 32768})
    assert context_length(qwen, no_limit) == 32768
    assert context_length(SimpleNamespace(), short) == 2048
    assert context_length(SimpleNamespace(), no_limit) is None
    assert context_length(SimpleNamespace(), SimpleNamespace()) is None


async def test_missing_transformers_names_the_extra(
    tiny_vlm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(MissingExtraError, match=r"trig-stream\[diffusers\]"):
        await make_judge(tiny_vlm).open()


@pytest.mark.parametrize("missing", ["torch", "transformers"])
async def test_a_missing_library_is_named_by_the_check_and_the_open(
    tiny_vlm: Path, monkeypatch: pytest.MonkeyPatch, missing: str
) -> None:
    # validate (the check) said ok, and run (the open) said transformers for a missing torch.
    monkeypatch.setitem(sys.modules, missing, None)  # as if not installed: import fails
    named = rf"^{missing} is not installed; install it with: pip install 'trig-stream\[diffusers\]'"
    with pytest.raises(MissingExtraError, match=named):
        make_judge(tiny_vlm).check_environment()
    with pytest.raises(MissingExtraError, match=named):
        await make_judge(tiny_vlm).open()


def test_fingerprint_names_model_and_settings(tiny_vlm: Path) -> None:
    fingerprint = make_judge(tiny_vlm, top_logprobs=20).fingerprint()
    assert fingerprint.backend == "transformers"
    assert fingerprint.model == str(tiny_vlm)
    assert fingerprint.params["top_logprobs"] == 20
    assert len(fingerprint.params["config_sha256"]) == 16


def test_the_fingerprint_holds_the_dtype_auto_means_on_the_device(tiny_vlm: Path) -> None:
    # "auto" was recorded as given, so a run begun on the CPU (float32) resumed on a GPU
    # (bfloat16) without a word, mixing the two precisions' scores.
    def manifest(device: str, **params: Any) -> Manifest:
        fingerprint = make_judge(tiny_vlm, device=device).fingerprint().model_dump()
        fingerprint["params"].update(params)
        entry = {"name": "trigscore", "backend": "transformers", "options": {"device": device}}
        written = Manifest(
            run_name="r", task="t2i", judges={"trigscore": fingerprint}, config={"judges": [entry]}
        )
        return Manifest.model_validate_json(written.model_dump_json())

    on_cpu, on_gpu = manifest("cpu"), manifest("cuda:0")
    assert on_cpu.judges["trigscore"]["params"]["dtype"] == "float32"
    assert on_gpu.judges["trigscore"]["params"]["dtype"] == "auto on cuda"
    assert on_cpu.differences(on_gpu) == [
        'judge \'trigscore\': params.dtype "float32" in the run dir, "auto on cuda" in the config'
    ]
    assert on_gpu.differences(manifest("cuda:1")) == []
    # A run directory that recorded "auto" reads it on the device its config names.
    assert manifest("cpu", dtype="auto").differences(on_cpu) == []
    assert manifest("cpu", dtype="auto").differences(on_gpu) != []
    assert manifest("cuda:0", dtype="auto").differences(on_gpu) == []
    # One whose config no longer names the judge (a run left it out since) cannot tell its
    # device: read as auto on the configured one, as before, not refused.
    fingerprint = make_judge(tiny_vlm).fingerprint().model_dump()
    fingerprint["params"]["dtype"] = "auto"
    written = Manifest(run_name="r", task="t2i", judges={"trigscore": fingerprint})
    dropped = Manifest.model_validate_json(written.model_dump_json())
    assert dropped.judges["trigscore"]["params"]["dtype"] == "auto"
    assert dropped.differences(on_cpu) == dropped.differences(on_gpu) == []


@pytest.mark.parametrize(("top_logprobs", "statuses"), [(None, {"ok"}), (5, {"ok", "unscorable"})])
async def test_engine_runs_the_transformers_judge(
    tiny_vlm: Path, make_config: ConfigFactory, top_logprobs: int | None, statuses: set[str]
) -> None:
    options = tiny_vlm_options(tiny_vlm, batch_size=4)
    if top_logprobs is not None:
        options["top_logprobs"] = top_logprobs
    config = make_config(
        samples=8,
        generators=[{"name": "synth", "backend": "synthetic", "options": {"size": 64}}],
        judges=[
            {"name": "trigscore", "backend": "transformers", "concurrency": 8, "options": options}
        ],
    )
    async with Engine(config) as engine:
        judgements = [j async for j in engine.results]
    assert len(judgements) == 16
    assert {j.status for j in judgements} <= statuses
    assert {j.judge.backend for j in judgements} == {"transformers"}
    for judgement in judgements:
        assert judgement.top_logprobs is not None
        assert all(math.isfinite(lp) for _, lp in judgement.top_logprobs)
        if judgement.status == "ok":
            assert judgement.score is not None and 0.0 <= judgement.score <= 1.0
        else:
            assert judgement.score is None and judgement.error


async def test_a_hard_stop_unloads_the_model_after_the_batch_it_left_running(
    tiny_vlm: Path, images: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # aclose() unloaded the model at once, under the batch a hard stop left computing.
    judge = make_judge(tiny_vlm, batch_size=1)
    computing, release = threading.Event(), threading.Event()
    model_in_batch: list[bool] = []

    def hangs(queries: Sequence[Any]) -> list[JudgeReply | Exception]:
        computing.set()
        release.wait(timeout=20)
        model_in_batch.append(judge._model is not None)
        return [JudgeReply(text="ok") for _ in queries]

    monkeypatch.setattr(judge, "_run_batch", hangs)  # what open() hands the batcher
    await judge.open()
    try:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(judge.judge, request(judge, images[0]))
                assert await anyio.to_thread.run_sync(computing.wait, 10)
                tg.cancel_scope.cancel()
            await judge.aclose()
        assert judge._model is not None  # still in use by the batch
        assert threads_left_behind() == 1 and threads_left_behind(judge) == 1
    finally:
        release.set()
    with anyio.fail_after(10):
        while threads_left_behind():  # counted until the unload has ended
            await anyio.lowlevel.checkpoint()
    assert model_in_batch == [True] and judge._model is None


async def test_a_graceful_stop_starts_no_batch_and_leaves_the_queued_requests_to_the_resume(
    tiny_vlm: Path, make_config: ConfigFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every request queued in the batcher took the device after the stop, one batch after
    # another: 7 more batches here, minutes of them with a 7B model.
    config = make_config(
        samples=4,  # 8 requests, all in flight at once
        generators=[{"name": "synth", "backend": "synthetic", "options": {"size": 64}}],
    )
    options = TransformersJudgeOptions(**tiny_vlm_options(tiny_vlm, batch_size=1))
    judge = TransformersJudge("trigscore", options, concurrency=8)
    computing, release = threading.Event(), threading.Event()
    batches: list[int] = []
    run_batch = judge._run_batch

    def holds_the_first(queries: Sequence[Any]) -> list[JudgeReply | Exception]:
        batches.append(len(queries))
        if len(batches) == 1:
            computing.set()
            release.wait(timeout=20)
        return run_batch(queries)

    monkeypatch.setattr(judge, "_run_batch", holds_the_first)  # what open() hands the batcher
    try:
        with anyio.fail_after(30):
            async with Engine(config, judges=[judge]) as engine:
                assert await anyio.to_thread.run_sync(computing.wait, 20)
                batcher = judge.batcher
                assert batcher is not None
                while batcher.waiting < 7:  # the others queued behind the running batch
                    await anyio.lowlevel.checkpoint()
                engine.stop()
                release.set()
                judged = [j async for j in engine.results]
    finally:
        release.set()
    assert batches == [1]  # no batch started after the stop
    assert len(judged) == 1 and judged[0].status in ("ok", "unscorable")  # the running one
    assert engine.stats().state == "stopped"
    assert engine.stats().models["synth"].to_judge == 1
    with anyio.fail_after(30):
        async with Engine(config, judges=[judge]) as engine:  # opened afresh
            resumed = [j async for j in engine.results]
    assert sum(batches[1:]) == len(resumed) == 7
    keys = Counter((r.data_id, r.dimension) for r in read_journal(config.run_dir / JOURNAL))
    assert len(keys) == 8 and set(keys.values()) == {1}
