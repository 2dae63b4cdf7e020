"""The openai_images generator against a loopback images server: results, failures, secrecy."""

from __future__ import annotations

import base64
import io
import json
import re
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import anyio
import pytest
from PIL import Image
from pydantic import ValidationError

from tests.conftest import ConfigFactory
from trig_stream import Engine
from trig_stream.backends.base import GenerationRequest
from trig_stream.backends.generators.api_calls import (
    ErrorAnswer,
    RefusalAnswer,
    call_with_retries,
    unless_an_error,
)
from trig_stream.backends.generators.openai_images import (
    OpenAIImagesGenerator,
    OpenAIImagesOptions,
    _decode,
)
from trig_stream.backends.judges.transports import DEADLINE
from trig_stream.errors import (
    BackendError,
    ConfigError,
    FatalBackendError,
    ItemError,
    NotAsked,
    NotFoundError,
    RateLimitError,
    RetryableError,
    UnreachableError,
)
from trig_stream.journal import JOURNAL
from trig_stream.manifest import MANIFEST
from trig_stream.records import Sample
from trig_stream.retry import RETRY_AFTER_MAX_S, RetryPolicy
from trig_stream.testing.generation_api_server import Fault, GenerationAPIServer

SECRET = "sk-test-0123456789-secret"
KEY_ENV = "TRIG_TEST_IMAGES_KEY"


@pytest.fixture
def server() -> Iterator[GenerationAPIServer]:
    with GenerationAPIServer(api_key=SECRET, image_size=24) as running:
        yield running


@pytest.fixture
def key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(KEY_ENV, SECRET)
    return SECRET


class Sleeps:
    """A sleep that records the waits and returns at once (never cancelled)."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    def __call__(self, seconds: float, cancel: threading.Event) -> bool:
        self.waits.append(seconds)
        return False


def make(
    server: GenerationAPIServer, sleeps: Sleeps | None = None, **options: object
) -> OpenAIImagesGenerator:
    validated = OpenAIImagesOptions.model_validate(
        {"base_url": server.base_url, "api_key_env": KEY_ENV, "model": "dall-e-3", **options}
    )
    generator = OpenAIImagesGenerator("dalle3", validated, sleep=sleeps or Sleeps())
    generator.load()
    return generator


def request(prompt: str = "a lighthouse at dusk") -> GenerationRequest:
    sample = Sample(data_id="IQ-R_TA-C_1", task="t2i", prompt=prompt, dimensions=("IQ-R", "TA-C"))
    return GenerationRequest("dalle3", sample, 7)


def one(generator: OpenAIImagesGenerator) -> Image.Image | Exception:
    return generator.generate([request()], worker=0, cancel=threading.Event())[0]


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_images_through_the_engine(
    make_config: ConfigFactory, server: GenerationAPIServer, key: str
) -> None:
    config = make_config(
        samples=4,
        generators=[
            {
                "name": "dalle3",
                "backend": "openai_images",
                "workers": 2,
                "options": {"base_url": server.base_url, "api_key_env": KEY_ENV, "quality": "hd"},
            }
        ],
    )
    async with Engine(config) as engine:
        results = [j async for j in engine.results]
    assert {j.status for j in results} == {"ok"} and len(results) == 8
    bodies = [body for path, body in server.requests if path == "/v1/images/generations"]
    assert len(bodies) == 4
    assert {b["model"] for b in bodies} == {"dall-e-3"}
    assert all(b["response_format"] == "b64_json" and b["quality"] == "hd" for b in bodies)
    for text in (
        (config.run_dir / JOURNAL).read_text(),
        (config.run_dir / MANIFEST).read_text(),
        repr(engine._generators[0]),
        json.dumps(engine._generators[0].fingerprint()),
    ):
        assert key not in text
        assert KEY_ENV not in text or "api_key_env" in text  # the name may appear, never the key


def test_success_decodes_the_png(server: GenerationAPIServer, key: str) -> None:
    image = one(make(server))
    assert isinstance(image, Image.Image) and image.size == (24, 24)


def test_gpt_image_models_get_no_response_format(server: GenerationAPIServer, key: str) -> None:
    assert isinstance(one(make(server, model="gpt-image-1")), Image.Image)
    assert "response_format" not in server.requests[-1][1]


def test_rate_limit_waits_at_least_retry_after_then_succeeds(
    server: GenerationAPIServer, key: str
) -> None:
    sleeps = Sleeps()
    server.fail_next(Fault(status=429, retry_after=7))
    assert isinstance(one(make(server, sleeps, backoff_initial=0.1)), Image.Image)
    assert len(sleeps.waits) == 1 and sleeps.waits[0] >= 7


def test_a_retry_after_of_an_hour_is_waited_for_five_minutes_at_most(
    server: GenerationAPIServer, key: str
) -> None:
    # The worker waited the hour, and a graceful stop with it.
    sleeps = Sleeps()
    server.fail_next(Fault(status=429, retry_after=3600))
    assert isinstance(one(make(server, sleeps, backoff_initial=0.1)), Image.Image)
    assert sleeps.waits == [RETRY_AFTER_MAX_S]


@pytest.mark.parametrize(
    "fault", [Fault(status=500), Fault(status=503), Fault(reset=True)], ids=["500", "503", "reset"]
)
def test_transient_failures_are_retried(
    server: GenerationAPIServer, key: str, fault: Fault
) -> None:
    sleeps = Sleeps()
    server.fail_next(fault, fault)
    assert isinstance(one(make(server, sleeps)), Image.Image)
    assert len(sleeps.waits) == 2
    assert len(server.requests) == 3


@pytest.mark.parametrize("status", [503, 408, 409])
def test_a_retry_after_with_a_transient_status_is_waited_for(
    server: GenerationAPIServer, key: str, status: int
) -> None:
    # Honoured on 429 alone: a 503 asking for 7 seconds was asked again after the backoff's.
    sleeps = Sleeps()
    server.fail_next(Fault(status=status, retry_after=7))
    assert isinstance(one(make(server, sleeps, backoff_initial=0.1)), Image.Image)
    assert len(sleeps.waits) == 1 and sleeps.waits[0] >= 7
    # Up to the backoff the config allows: a graceful stop waits for a call in flight, and a
    # day asked after a 503 held it 5 minutes a retry.
    server.fail_next(Fault(status=status, retry_after=86400))
    assert isinstance(one(make(server, sleeps, backoff_initial=0.1, backoff_max=2)), Image.Image)
    assert len(sleeps.waits) == 2 and sleeps.waits[1] <= 2


def test_a_304_is_a_malformed_answer_retried(server: GenerationAPIServer, key: str) -> None:
    # Was refused at once, as a request the API would refuse every time ("HTTP 304: Error
    # code: 304"); the judge takes it for a malformed answer and retries it.
    sleeps = Sleeps()
    server.fail_next(Fault(status=304))
    assert isinstance(one(make(server, sleeps)), Image.Image)
    assert len(sleeps.waits) == 1
    server.fail_next(Fault(status=304), Fault(status=304))
    outcome = one(make(server, sleeps, max_attempts=2))
    assert type(outcome) is RetryableError
    assert str(outcome) == (
        "the images API of generator 'dalle3' sent a malformed answer (HTTP 304 Not Modified, "
        "which answers no POST) (gave up after 2 attempts)"
    )


@pytest.mark.parametrize("status", [302, 307])
def test_a_redirect_is_not_followed_and_stops_the_run_naming_where_it_points(
    server: GenerationAPIServer, key: str, status: int
) -> None:
    # The SDK's client followed it, sending the prompt on (a 307 with the key, to the same
    # host) to wherever it pointed; the judge never follows one.
    with GenerationAPIServer(api_key=SECRET) as elsewhere:
        where = f"{elsewhere.base_url}/images/generations?token={SECRET}"
        server.fail_next(Fault(status=status, location=where))
        sleeps = Sleeps()
        generator = make(server, sleeps)
        with pytest.raises(FatalBackendError) as caught:
            generator.generate([request()], worker=0, cancel=threading.Event())
        assert elsewhere.requests == []
    assert str(caught.value) == (
        f"the images API of generator 'dalle3' redirects (HTTP {status}) to "
        f"{elsewhere.base_url}/images/generations?token=***: set base_url to where it points"
    )
    assert sleeps.waits == []  # not retried: every call would be redirected alike


def test_an_error_sent_with_http_200_is_quoted_and_retried(
    server: GenerationAPIServer, key: str
) -> None:
    # Was "answered with no JSON images object (a web page ...?); check base_url", the
    # server's words lost, and not retried.
    sleeps = Sleeps()
    overloaded = Fault(status=200, message=f"model overloaded\n(key {SECRET})")
    server.fail_next(overloaded)
    assert isinstance(one(make(server, sleeps)), Image.Image)
    assert len(sleeps.waits) == 1
    server.fail_next(overloaded, overloaded)
    outcome = one(make(server, sleeps, max_attempts=2))
    assert isinstance(outcome, RetryableError)
    assert str(outcome).startswith(
        "the images API of generator 'dalle3' sent a malformed answer (an error: model "
        "overloaded (key "
    )
    assert str(outcome).endswith(") (gave up after 2 attempts)")
    assert SECRET not in str(outcome) and "base_url" not in str(outcome)


def test_a_content_refusal_sent_with_http_200_is_the_prompts_own(
    server: GenerationAPIServer, key: str
) -> None:
    # Retried as the API's failure, where the same refusal with a 400 is the item's.
    sleeps = Sleeps()
    refusal = Fault(
        status=200, message="Your request was rejected", code="content_policy_violation"
    )
    server.fail_next(refusal)
    outcome = one(make(server, sleeps))
    assert isinstance(outcome, ItemError) and not sleeps.waits
    assert "content_policy_violation" in str(outcome) and "rejected" in str(outcome)


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ("content policy service unavailable, try again", "server_error"),
        ("The safety checker is overloaded; please retry", None),
        ("Upstream timed out (retry policy exhausted)", "upstream_error"),
        ("Worker crashed; job flagged for reprocessing", None),
    ],
)
def test_an_error_sent_with_http_200_that_only_mentions_a_policy_is_retried(
    server: GenerationAPIServer, key: str, message: str, code: str | None
) -> None:
    # The judge's broad pattern (safety, policy, flagged) read the message whatever the code:
    # each was the prompt's own failure, never retried.
    sleeps = Sleeps()
    server.fail_next(Fault(status=200, message=message, code=code))
    assert isinstance(one(make(server, sleeps)), Image.Image)
    assert len(sleeps.waits) == 1


def test_a_200_error_refuses_the_content_by_its_code_or_else_its_message() -> None:
    def outcome(error: dict[str, str]) -> Exception:
        answer = SimpleNamespace(error=error, data=None)
        with pytest.raises((ItemError, RetryableError)) as caught:
            unless_an_error(answer, "data", secret=SECRET)
        return caught.value

    by_message = outcome({"message": "Rejected by our moderation system"})
    assert isinstance(by_message, RefusalAnswer)
    # No code: none quoted (was "(None: Rejected ...)").
    assert str(by_message) == (
        "the API refused the request's content (Rejected by our moderation system)"
    )
    by_code = outcome({"message": "Rejected", "code": "contentFilter"})
    assert str(by_code) == "the API refused the request's content (contentFilter: Rejected)"
    for refusal in [
        {"message": AZURE_FILTERED},
        {"message": OPENAI_FLAGGED},
        {"message": OPENAI_FLAGGED, "code": "invalid_prompt"},
    ]:
        assert isinstance(outcome(refusal), RefusalAnswer), refusal
    for error in [
        {"message": "Rejected by our moderation system", "type": "server_error"},
        {"message": "Rejected by our moderation system", "code": "server_error"},
        {"message": "The moderation service is busy; try again"},
        {"message": "Content filter temporarily unavailable; please retry"},
        {"message": "Moderation timed out after 3 retries"},
    ]:
        assert type(outcome(error)) is ErrorAnswer, error


def test_a_400_that_only_mentions_a_policy_is_the_calls_failure(
    server: GenerationAPIServer, key: str
) -> None:
    # Its code says what it refuses: a bad size, whatever the message cites, fails every
    # request alike (was the prompt's own failure, which never stops the run).
    server.fail_next(
        Fault(status=400, code="invalid_value", message="Invalid size; see our usage policies")
    )
    outcome = one(make(server))
    assert isinstance(outcome, BackendError) and not isinstance(outcome, ItemError)


def test_timeout_is_retryable(server: GenerationAPIServer, key: str) -> None:
    sleeps = Sleeps()
    server.fail_next(Fault(delay_s=1.0))
    assert isinstance(one(make(server, sleeps, timeout_s=0.2)), Image.Image)
    assert len(sleeps.waits) == 1


def test_attempts_are_bounded(server: GenerationAPIServer, key: str) -> None:
    sleeps = Sleeps()
    server.fail_next(*[Fault(status=429, retry_after=1)] * 3)
    outcome = one(make(server, sleeps, max_attempts=3))
    assert isinstance(outcome, RateLimitError)
    assert "gave up after 3 attempts" in str(outcome)
    assert outcome.retry_after == 1
    assert len(sleeps.waits) == 2


def test_retryable_error_class_after_5xx(server: GenerationAPIServer, key: str) -> None:
    server.fail_next(Fault(status=502), Fault(status=502))
    outcome = one(make(server, max_attempts=2))
    assert type(outcome) is RetryableError


def test_client_error_is_an_item_error_without_retry(server: GenerationAPIServer, key: str) -> None:
    sleeps = Sleeps()
    server.fail_next(Fault(status=400, message=f"content policy; you sent key {SECRET}"))
    outcome = one(make(server, sleeps))
    assert isinstance(outcome, ItemError)
    assert "HTTP 400" in str(outcome) and "content policy" in str(outcome)
    assert SECRET not in str(outcome)
    assert sleeps.waits == []


@pytest.mark.parametrize("code", ["content_policy_violation", "moderation_blocked"])
def test_a_refusal_by_error_code_is_the_prompts_own_failure(
    server: GenerationAPIServer, key: str, code: str
) -> None:
    server.fail_next(Fault(status=400, code=code, message="Your request was rejected."))
    outcome = one(make(server))
    assert isinstance(outcome, ItemError) and "HTTP 400" in str(outcome)


OPENAI_FLAGGED = (
    "Invalid prompt: your prompt was flagged as potentially violating our usage policy. Please "
    "try again with a different prompt: https://platform.openai.com/docs/guides/reasoning"
)
AZURE_FILTERED = (
    "The response was filtered due to the prompt triggering Azure OpenAI's content management "
    "policy. Please modify your prompt and retry."
)


@pytest.mark.parametrize(
    ("code", "message"),
    [
        ("invalid_prompt", OPENAI_FLAGGED),  # OpenAI's reasoning models
        (None, OPENAI_FLAGGED),
        ("content_filter", AZURE_FILTERED),
        (None, AZURE_FILTERED),
    ],
)
def test_a_refusal_that_says_try_again_or_retry_is_the_prompts_own_failure(
    server: GenerationAPIServer, key: str, code: str | None, message: str
) -> None:
    # invalid_prompt was no refusal code, and without a code "try again" / "retry" read as
    # a passing failure: each was the call's failure, and 8 flagged prompts in a row before
    # any image stopped the run.
    sleeps = Sleeps()
    server.fail_next(Fault(status=400, code=code, message=message))
    outcome = one(make(server, sleeps))
    assert isinstance(outcome, ItemError) and "HTTP 400" in str(outcome)
    assert sleeps.waits == []


@pytest.mark.parametrize("status", [400, 413, 422])
def test_a_refusal_of_the_request_itself_is_the_calls_failure(
    server: GenerationAPIServer, key: str, status: int
) -> None:
    # A bad size or an option the API refuses fails every request alike: not the prompt's
    # fault. As an ItemError it never counted towards stopping the run, which turned the
    # whole dataset into error judgements and exited 0.
    sleeps = Sleeps()
    server.fail_next(
        Fault(status=status, code="invalid_value", message="Invalid value for size: 7x7")
    )
    outcome = one(make(server, sleeps))
    assert isinstance(outcome, BackendError) and not isinstance(outcome, ItemError)
    assert str(outcome) == f"HTTP {status}: Invalid value for size: 7x7"
    assert sleeps.waits == []  # not retried


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_size_every_request_is_refused_for_stops_the_run(
    make_config: ConfigFactory, server: GenerationAPIServer, key: str
) -> None:
    from trig_stream.generation import FAILED_CALLS_TO_STOP

    config = make_config(
        samples=12,
        generators=[
            {
                "name": "dalle3",
                "backend": "openai_images",
                "options": {"base_url": server.base_url, "api_key_env": KEY_ENV, "size": "7x7"},
            }
        ],
    )
    server.fail_next(*[Fault(status=400, message="Invalid value for size: 7x7")] * 12)
    message = (
        f"generator 'dalle3' has made no image yet and its first {FAILED_CALLS_TO_STOP} calls "
        "all failed (the last: HTTP 400: Invalid value for size: 7x7)"
    )
    with pytest.raises(FatalBackendError, match=re.escape(message)):
        async with Engine(config) as engine:
            [j async for j in engine.results]
    assert len(server.requests) == FAILED_CALLS_TO_STOP


def test_a_server_without_key_has_no_secret_to_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    # The placeholder the SDK sends for api_key_env = "" was taken for the key, and every
    # "unused" in a server's message came out as "***".
    with GenerationAPIServer(api_key="unused") as keyless:
        keyless.fail_next(Fault(status=400, message="parameter 'style' is unused by this model"))
        outcome = one(make(keyless, api_key_env=""))
    assert str(outcome) == "HTTP 400: parameter 'style' is unused by this model"


def test_a_404_stops_the_run_until_a_call_has_succeeded(
    server: GenerationAPIServer, key: str
) -> None:
    # Before any success, a 404 is a wrong base_url or model: every image would fail.
    generator = make(server)
    server.fail_next(Fault(status=404, message="The model `dall-e-9` does not exist"))
    with pytest.raises(FatalBackendError, match=r"images API of generator 'dalle3' .*base_url"):
        one(generator)
    assert isinstance(one(generator), Image.Image)
    server.fail_next(Fault(status=404, message="gone"))
    outcome = one(generator)
    assert type(outcome) is NotFoundError and "HTTP 404" in str(outcome)


def test_an_api_never_reached_stops_the_run_and_one_reached_before_does_not(
    server: GenerationAPIServer, key: str
) -> None:
    # Before, every image became an error judgement and the run ended with exit 0, the
    # cause only in the journal; an unreachable judge has always stopped the run.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}/v1"
    nowhere = make(server, max_attempts=2, base_url=closed)
    with pytest.raises(
        FatalBackendError,
        match=r"has answered no request yet, and one gave up after 2 attempts without reaching it",
    ):
        one(nowhere)
    generator = make(server, max_attempts=2)
    assert isinstance(one(generator), Image.Image)
    server.fail_next(Fault(reset=True), Fault(reset=True))
    assert type(one(generator)) is UnreachableError  # that request's failure alone (retryable)


def test_an_api_too_slow_before_any_answer_stops_the_run_saying_it_was_reached(
    server: GenerationAPIServer, key: str
) -> None:
    # A server up but slower than timeout_s was told "... without reaching it (its last
    # failure: the API timed out); is it running, at the address in the config?".
    server.fail_next(Fault(delay_s=1.0), Fault(delay_s=1.0))
    with pytest.raises(FatalBackendError) as caught:
        one(make(server, timeout_s=0.2, max_attempts=2))
    assert str(caught.value) == (
        "the images API of generator 'dalle3' has answered no request yet, and one gave up "
        "after 2 attempts, the last reaching it but too slow (its last failure: the API timed "
        "out: no whole answer within 0.2 s (timeout_s)); it is up, but slower than timeout_s: "
        "raise options.timeout_s if its answers take that long"
    )


def test_a_timeout_while_connecting_is_an_api_not_reached() -> None:
    # Only a call that timed out after connecting is said to have reached the API.
    import openai

    # The SDK's HTTP library: httpx, or a fork of it under another name.
    httpx = sys.modules[openai.DefaultHttpxClient.__bases__[0].__module__.partition(".")[0]]
    request = httpx.Request("POST", "http://10.255.255.1/v1", extensions={DEADLINE: (0.0, 3.0)})

    def connect_times_out() -> None:
        try:
            raise httpx.ConnectTimeout("timed out", request=request)
        except httpx.ConnectTimeout as exc:
            raise openai.APITimeoutError(request=request) from exc

    with pytest.raises(FatalBackendError) as caught:
        call_with_retries(
            connect_times_out,
            policy=RetryPolicy(1, 0.1, 0.1),
            cancel=threading.Event(),
            secret="",
            answered=threading.Event(),
            api="the images API",
            unanswered_is_fatal=True,
        )
    assert str(caught.value) == (
        "the images API has answered no request yet, and one gave up after 1 attempt without "
        "reaching it (its last failure: the API timed out: no connection within 3 s "
        "(timeout_s)); is it running, at the address in the config?"
    )


def test_an_answer_without_an_image_is_the_apis_failure_not_the_items(
    server: GenerationAPIServer, key: str
) -> None:
    # Not an ItemError: a server that never answers with an image (URLs, another format)
    # must stop a run whose generator has made none (generation.FAILED_CALLS_TO_STOP); as
    # an ItemError, every sample of the dataset failed and the run exited 0.
    server.fail_next(Fault(bad_image=True))
    outcome = one(make(server))
    assert isinstance(outcome, BackendError) and not isinstance(outcome, ItemError)
    assert str(outcome) == "the images API returned bytes that are no image"


def test_an_answer_that_is_no_json_is_the_apis_failure_not_the_items(
    server: GenerationAPIServer, key: str
) -> None:
    # The SDK raises JSONDecodeError on such a body: classified as an ItemError, a server
    # that answered so failed every sample of the run, which never stopped.
    sleeps = Sleeps()
    server.fail_next(Fault(not_json=True))
    outcome = one(make(server, sleeps))
    assert isinstance(outcome, BackendError) and not isinstance(outcome, ItemError | RetryableError)
    assert str(outcome).startswith(
        "the answer of the images API of generator 'dalle3' could not be read (JSONDecodeError: "
    )
    assert "base_url" in str(outcome) and SECRET not in str(outcome)
    assert sleeps.waits == []  # not retried: every answer would be alike


def test_an_answer_that_trickles_in_is_held_to_the_timeout_in_all(
    server: GenerationAPIServer, key: str
) -> None:
    # A space every 50 ms keeps each read short of timeout_s: the SDK's own timeout, which
    # holds each read, let the call wait the whole 30 s, and then took the answer.
    sleeps = Sleeps()
    generator = make(server, sleeps, timeout_s=0.3, max_attempts=1)
    assert isinstance(one(generator), Image.Image)  # answered once: a timeout is no longer fatal
    server.fail_next(Fault(trickle_s=30.0))
    outcome = one(generator)
    assert isinstance(outcome, UnreachableError)
    assert "timed out" in str(outcome)


def test_an_answer_over_the_size_cap_is_the_apis_failure_not_read_whole(
    server: GenerationAPIServer, key: str
) -> None:
    # 65 MiB of spaces before a valid answer: read whole, and taken, before the cap.
    sleeps = Sleeps()
    server.fail_next(Fault(oversize=True))
    outcome = one(make(server, sleeps))
    assert isinstance(outcome, BackendError) and not isinstance(outcome, ItemError | RetryableError)
    assert str(outcome) == "the API sent an answer of more than 67,108,864 bytes"
    assert sleeps.waits == []  # not retried: every answer would be as large


@pytest.mark.parametrize("status", [401, 403])
def test_refused_credentials_are_fatal_and_never_echo_the_key(
    server: GenerationAPIServer, monkeypatch: pytest.MonkeyPatch, status: int
) -> None:
    wrong = "sk-wrong-key-that-must-not-leak"
    monkeypatch.setenv(KEY_ENV, wrong)
    if status == 403:
        monkeypatch.setenv(KEY_ENV, SECRET)
        server.fail_next(Fault(status=403, message=f"forbidden for {SECRET}"))
    generator = make(server)
    with pytest.raises(FatalBackendError) as caught:
        generator.generate([request()], worker=0, cancel=threading.Event())
    text = f"{caught.value} {caught.value!r} {generator!r} {generator.fingerprint()}"
    assert f"HTTP {status}" in text
    refused = f"the images API of generator {generator.name!r} refused the credentials (HTTP"
    assert str(caught.value).startswith(refused)
    assert wrong not in text and SECRET not in text


def test_refused_credentials_with_no_key_configured_say_so(
    server: GenerationAPIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With api_key_env = "" the advice was to check "the API key in the environment variable
    # that api_key_env names": no variable, and no key, was there to check.
    with pytest.raises(FatalBackendError) as caught:
        one(make(server, api_key_env=""))
    assert str(caught.value).endswith("; check api_key_env (no key is configured)")
    monkeypatch.setenv(KEY_ENV, "sk-wrong")
    with pytest.raises(FatalBackendError) as caught:
        one(make(server))
    checked = "; check the API key in the environment variable that api_key_env names"
    assert str(caught.value).endswith(checked)


def test_missing_key_variable_is_fatal_and_names_it(
    server: GenerationAPIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(FatalBackendError, match=f"generator 'dalle3': set .* {KEY_ENV} "):
        make(server)


@pytest.mark.parametrize("bad_key", ["sk-\u00e9", "sk-made-from-a-file\n"])
def test_a_key_no_header_can_carry_is_fatal_before_any_call(
    server: GenerationAPIServer, monkeypatch: pytest.MonkeyPatch, bad_key: str
) -> None:
    # It was taken: every image then failed with the encoder's error, which named a character
    # of the key and its position, or as "cannot reach the API" (a newline in the key).
    monkeypatch.setenv(KEY_ENV, bad_key)
    options = OpenAIImagesOptions.model_validate(
        {"base_url": server.base_url, "api_key_env": KEY_ENV}
    )
    problem = f"generator 'dalle3': the environment variable {KEY_ENV} .* HTTP header cannot carry"
    with pytest.raises(FatalBackendError, match=problem) as checked:
        OpenAIImagesGenerator("dalle3", options).check_environment()  # what validate runs
    with pytest.raises(FatalBackendError, match=problem) as loading:
        make(server)
    assert "sk-" not in f"{checked.value} {loading.value}"
    assert server.requests == []


@pytest.mark.parametrize("short_key", ["e", "abc"])
def test_a_short_key_echoed_by_the_server_is_masked(
    monkeypatch: pytest.MonkeyPatch, short_key: str
) -> None:
    # Keys under 4 characters were never masked: "HTTP 400: invalid token abc" went to the
    # journal. Words that hold the key stay readable.
    monkeypatch.setenv(KEY_ENV, short_key)
    with GenerationAPIServer(api_key=short_key) as short:
        short.fail_next(Fault(status=400, message=f"The value is refused: token {short_key}"))
        outcome = one(make(short))
    assert str(outcome) == "HTTP 400: The value is refused: token ***"


def test_cancel_cuts_a_backoff_short(server: GenerationAPIServer, key: str) -> None:
    cancel = threading.Event()
    server.fail_next(Fault(status=503))
    generator = make(server)

    def cancelling_sleep(seconds: float, event: threading.Event) -> bool:
        cancel.set()
        generator.stop_waiting()  # as the engine's cancel does, beside setting cancel
        return event.wait(seconds)

    generator._sleep = cancelling_sleep
    (outcome,) = generator.generate([request()], worker=0, cancel=cancel)
    assert isinstance(outcome, ItemError) and str(outcome) == "cancelled"


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_graceful_stop_ends_a_retry_after_wait_and_leaves_the_image_owed(
    make_config: ConfigFactory, server: GenerationAPIServer, key: str
) -> None:
    # A stop during a 429's Retry-After of 600 s held the whole run until the wait ended (up
    # to RETRY_AFTER_MAX_S): the generator waited on the hard cancel's event alone.
    config = make_config(
        samples=1,
        generators=[
            {
                "name": "dalle3",
                "backend": "openai_images",
                "options": {"base_url": server.base_url, "api_key_env": KEY_ENV},
            }
        ],
    )
    waiting = threading.Event()
    ended_by_the_stop: list[bool] = []

    def sleep(seconds: float, event: threading.Event) -> bool:
        waiting.set()
        # Bounded, so that a wait no stop ends fails the test rather than hanging it.
        ended_by_the_stop.append(event.wait(min(seconds, 30)))
        return ended_by_the_stop[-1]

    options = OpenAIImagesOptions.model_validate(config.generators[0].options)
    generator = OpenAIImagesGenerator("dalle3", options, sleep=sleep)
    server.fail_next(Fault(status=429, retry_after=600))
    async with Engine(config, generators=[generator]) as engine:
        assert await anyio.to_thread.run_sync(waiting.wait, 30)
        engine.stop()
        summary = await engine.drain()
    assert ended_by_the_stop == [True]
    assert summary.state == "stopped" and summary.judged == summary.error == 0
    assert len(server.requests) == 1  # the request the stop came after is not asked again
    assert not (config.run_dir / JOURNAL).exists() or not (config.run_dir / JOURNAL).read_text()
    # The image is owed, not failed: the resume asks for it.
    async with Engine(config) as engine:
        results = [j async for j in engine.results]
    assert [j.status for j in results] == ["ok", "ok"]
    assert len(server.requests) == 2


def test_a_stop_ends_a_backoff_without_asking_again(server: GenerationAPIServer, key: str) -> None:
    server.fail_next(Fault(status=429, retry_after=600))
    generator = make(server)

    def stopping_sleep(seconds: float, event: threading.Event) -> bool:
        generator.stop_waiting()  # as the engine does when a stop begins
        return event.wait(min(seconds, 30))

    generator._sleep = stopping_sleep
    (outcome,) = generator.generate([request()], worker=0, cancel=threading.Event())
    assert isinstance(outcome, NotAsked)
    assert len(server.requests) == 1
    generator.load()  # a later run waits again
    server.fail_next(Fault(status=429, retry_after=1))
    generator._sleep = Sleeps()
    assert isinstance(one(generator), Image.Image)


def test_after_a_stop_the_rest_of_the_batch_is_not_asked(
    server: GenerationAPIServer, key: str
) -> None:
    # Only a hard cancel was checked between requests: after a graceful stop each of the
    # batch's other requests was still asked for, each up to timeout_s.
    server.fail_next(Fault(status=429, retry_after=600))
    generator = make(server)

    def stopping_sleep(seconds: float, event: threading.Event) -> bool:
        generator.stop_waiting()  # as the engine does when a stop begins
        return event.wait(min(seconds, 30))

    generator._sleep = stopping_sleep
    batch = [request("a lighthouse"), request("a harbour"), request("a cliff")]
    outcomes = generator.generate(batch, worker=0, cancel=threading.Event())
    assert [type(outcome) for outcome in outcomes] == [NotAsked] * 3
    assert len(server.requests) == 1


def test_only_t2i_runs(make_config: ConfigFactory, tmp_path: Path) -> None:
    from trig_stream.backends.registry import build_generator

    config = make_config(generators=[{"name": "dalle3", "backend": "openai_images"}])
    p2p = config.model_copy(update={"run": config.run.model_copy(update={"task": "p2p"})})
    with pytest.raises(ConfigError, match="t2i"):
        build_generator(config.generators[0], p2p)


def test_a_16_bit_grey_answer_is_scaled_not_turned_white() -> None:
    # Pillow's own conversion to RGB clipped its values at 255: every image came out white.
    buffer = io.BytesIO()
    Image.new("I;16", (4, 4), 40000).save(buffer, format="PNG")
    picture = _decode(base64.b64encode(buffer.getvalue()).decode())
    assert picture.mode == "RGB" and picture.getpixel((0, 0)) == (156, 156, 156)


def test_base64_wrapped_in_lines_is_decoded_and_other_characters_are_not() -> None:
    # MIME base64, a line break every 76 characters, was refused as undecodable.
    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), "red").save(buffer, format="PNG")
    wrapped = base64.encodebytes(buffer.getvalue()).decode()
    assert wrapped.count("\n") > 1
    for text in (wrapped, wrapped.replace("\n", "\r\n"), f" \t{wrapped}"):
        assert _decode(text).getpixel((0, 0)) == (255, 0, 0)
    with pytest.raises(BackendError, match="undecodable"):
        _decode(wrapped.replace("\n", "!"))


def test_an_answer_past_pillows_pixel_limit_is_undecodable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Pillow's DecompressionBombError came out as it is, not as the API's failure.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 32x32 is past twice the limit
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buffer, format="PNG")
    with pytest.raises(BackendError, match=r"undecodable image: .*could be decompression bomb"):
        _decode(base64.b64encode(buffer.getvalue()).decode())


def test_an_answer_stored_sideways_is_turned_as_its_exif_says() -> None:
    picture = Image.new("RGB", (40, 20), "blue")
    picture.paste(Image.new("RGB", (20, 20), "red"))
    exif = Image.Exif()
    exif[0x0112] = 6  # shown a quarter turn clockwise: 20x40, red on top
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", exif=exif)
    turned = _decode(base64.b64encode(buffer.getvalue()).decode())
    assert turned.size == (20, 40)
    top = turned.getpixel((10, 5))
    assert isinstance(top, tuple) and top[0] > 200 > top[2]


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"size": "banana"}, "size"),
        ({"size": "1024"}, "size"),
        ({"quality": "ultra"}, "quality"),
        ({"style": "pastel"}, "style"),
        ({"model": "gpt-image-1", "style": "vivid"}, "style is a dall-e-3 option"),
        ({"model": "gpt-image-1", "quality": "hd"}, "quality 'hd' is a dall-e option"),
        ({"model": "gpt-image-1", "quality": "standard"}, "quality 'standard' is a dall-e"),
        ({"model": "dall-e-3", "quality": "low"}, "quality 'low' is a gpt-image option"),
        ({"model": "dall-e-2", "quality": "high"}, "dall-e-2 refuses it"),
        ({"model": "dall-e-3", "size": "auto"}, "size 'auto' is a gpt-image option"),
    ],
)
def test_options_no_api_takes_are_refused_before_any_call(
    options: dict[str, str], problem: str
) -> None:
    # Each passed validate, and the run spent 4 calls before stopping.
    with pytest.raises(ValueError, match=problem):
        OpenAIImagesOptions.model_validate(options)
    assert OpenAIImagesOptions(size="1792x1024").size == "1792x1024"
    for model in ("gpt-image-1", "my-diffusion-server"):
        assert OpenAIImagesOptions(model=model, size="auto", quality="high").size == "auto"
    assert OpenAIImagesOptions(model="dall-e-3", quality="hd").quality == "hd"


@pytest.mark.parametrize(
    ("extra_body", "taken", "why"),
    [
        ({"prompt": "a red cube"}, ["prompt"], "each request its own sample's prompt"),
        ({"n": 2}, ["n"], "one image per request"),
        ({"model": "dall-e-2"}, ["model"], "the engine sends options.model"),
        ({"response_format": "url"}, ["response_format"], "b64_json image data"),
        ({"n": 1, "prompt": "a red cube"}, ["n", "prompt"], "one image per request"),
        ({"stream": True}, ["stream"], "the engine reads one JSON answer"),
        ({"partial_images": 2}, ["partial_images"], "the engine reads one JSON answer"),
    ],
)
def test_extra_body_fields_the_engine_sets_itself_are_refused(
    extra_body: dict[str, object], taken: list[str], why: str
) -> None:
    # The SDK lets extra_body replace the request's own fields, and each passed validate: a
    # prompt there drew every image from that one prompt, each judged as its own sample's;
    # n = 2 paid for two images and kept one; a model there was not the manifest's; stream
    # (or partial_images) made the server answer an event stream, each call "no JSON images
    # object (a web page ...)".
    with pytest.raises(ValidationError) as caught:
        OpenAIImagesOptions.model_validate({"extra_body": {"seed": 7, **extra_body}})
    [error] = caught.value.errors()
    assert error["loc"] == ("extra_body",)
    message = str(error["msg"])
    assert f"extra_body sets {', '.join(taken)}, which the engine sets itself" in message
    assert why in message and "from options.extra_body" in message


def test_extra_body_may_ask_for_base64_and_other_fields() -> None:
    # What an answer with URLs is told to send (see _no_image); stream = false and
    # partial_images = 0, the API's defaults, ask for the one JSON answer the engine reads.
    body = {
        "response_format": "b64_json",
        "stream": False,
        "partial_images": 0,
        "seed": 7,
        "quality": "ultra",
    }
    assert OpenAIImagesOptions(extra_body=body).extra_body == body
    with pytest.raises(ValidationError, match="extra_body sets stream"):
        OpenAIImagesOptions(extra_body={"stream": 0})
    with pytest.raises(ValidationError, match="extra_body sets partial_images"):
        OpenAIImagesOptions(extra_body={"partial_images": False})


@pytest.mark.parametrize(
    ("answer", "hint"),
    [
        ("<html><body>Welcome</body></html>", "no JSON images object (a web page"),
        (SimpleNamespace(data=None), "JSON whose data is missing or null, not a list of images"),
        (SimpleNamespace(data={"b64_json": "x"}), "JSON whose data is an object, not a list"),
        (SimpleNamespace(data=[]), "an empty data list: no image"),
        (
            SimpleNamespace(data=[SimpleNamespace(url="https://x/1.png", b64_json=None)]),
            "answered with URLs, not b64_json image data; ask for base64",
        ),
    ],
    ids=["html", "null", "object", "empty", "urls"],
)
def test_an_answer_without_an_image_says_what_it_held(
    server: GenerationAPIServer, key: str, answer: object, hint: str
) -> None:
    # Each was asked "with URLs?", a web page and an empty list alike.
    generator = make(server)
    generator._client.close()
    generator._client = SimpleNamespace(images=SimpleNamespace(generate=lambda **_: answer))
    outcome = one(generator)
    assert isinstance(outcome, BackendError) and not isinstance(outcome, ItemError)
    assert hint in str(outcome)
    assert ("URLs" in str(outcome)) == (hint.startswith("answered with URLs"))
