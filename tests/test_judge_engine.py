"""End to end: the engine, the synthetic generator and the ``openai`` judge on loopback."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.lowlevel import checkpoint

from trig_stream.config import RunConfig
from trig_stream.engine import Engine
from trig_stream.errors import FatalBackendError
from trig_stream.journal import JOURNAL, read_journal
from trig_stream.judging import _Requesters
from trig_stream.testing.judge_options import JudgeServerOptions
from trig_stream.testing.judge_server import JudgeServer

pytestmark = pytest.mark.anyio

DEMO = Path(__file__).resolve().parent.parent / "data" / "demo" / "t2i_prompts.json"


@pytest.fixture(params=["asyncio", "uvloop"])
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    # The openai judge runs on asyncio only; its event loop may be uvloop's, as in many
    # applications that embed the engine.
    if request.param == "uvloop":
        pytest.importorskip("uvloop")
    return "asyncio", {"use_uvloop": request.param == "uvloop"}


def run_config(
    tmp_path: Path,
    base_url: str | list[str],
    *,
    concurrency: int = 16,
    judge_options: dict[str, Any] | None = None,
    **engine: Any,
) -> RunConfig:
    endpoints = {"base_urls": base_url} if isinstance(base_url, list) else {"base_url": base_url}
    return RunConfig.model_validate(
        {
            "run": {"name": "loopback", "output_dir": str(tmp_path), "task": "t2i"},
            "engine": engine,
            "dataset": {"path": str(DEMO)},
            "generators": [
                {
                    "name": "synthetic-a",
                    "backend": "synthetic",
                    "workers": 2,
                    "options": {"size": 32},
                }
            ],
            "judges": [
                {
                    "name": "trigscore",
                    "backend": "openai",
                    "concurrency": concurrency,
                    "scorer": "trig",
                    "options": {**endpoints, "model": "trig-judge-sim", **(judge_options or {})},
                }
            ],
        }
    )


async def test_engine_judges_every_image_once(tmp_path: Path) -> None:
    samples = len(json.loads(DEMO.read_text()))
    async with JudgeServer(JudgeServerOptions(latency_s=0.001, capacity=8)) as server:
        config = run_config(tmp_path, server.base_url)
        async with Engine(config) as engine:
            judgements = [j async for j in engine.results]
    assert len(judgements) == 2 * samples
    assert all(j.status == "ok" and j.score is not None for j in judgements)
    assert {j.judge.backend for j in judgements} == {"openai"}
    assert all(j.top_logprobs for j in judgements)
    stats = server.stats()
    assert stats.received == stats.served == 2 * samples
    assert stats.repeated == 0
    assert stats.max_running <= 8


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        ({"error_rate": 1.0}, "HTTP 503"),
        ({"rate_limit_rate": 1.0, "retry_after": "0"}, "HTTP 429"),
        ({"malformed_rate": 1.0}, "malformed answer"),
    ],
)
async def test_a_server_that_answers_only_failures_is_reached_and_the_run_goes_on(
    tmp_path: Path, fault: dict[str, Any], error: str
) -> None:
    # Every answer a failure, yet an answer: the server is up and at its address. The run
    # stopped with "is its server running, at the address in the config?".
    samples = len(json.loads(DEMO.read_text()))
    async with JudgeServer(JudgeServerOptions(**fault)) as server:
        config = run_config(tmp_path, server.base_url, max_attempts=1)
        async with Engine(config) as engine:
            judgements = [j async for j in engine.results]
    assert len(judgements) == 2 * samples
    assert all(j.status == "error" and error in str(j.error) for j in judgements)
    assert all(str(j.error).startswith("gave up after 1 attempt: ") for j in judgements)


async def test_a_run_rides_out_an_outage_of_over_a_thousand_failures_in_a_row(
    tmp_path: Path,
) -> None:
    # At 1,025 failures in a row the endpoint's rest, 0.5 s * 2 ** (failures - 1), overflowed
    # a float: every request then ended at once, an error judgement "OverflowError: int too
    # large to convert to float" (attempts: 1), though max_attempts was meant to ride the
    # outage out.
    samples = len(json.loads(DEMO.read_text()))
    outage = 1100
    async with JudgeServer(JudgeServerOptions(fail_first=outage)) as server:
        # 64 requests at once share the outage's 1,100 failures: some 17 attempts each.
        config = run_config(
            tmp_path, server.base_url, concurrency=64, max_attempts=100, backoff_initial=0
        )
        async with Engine(config, sleep=lambda _: checkpoint()) as engine:
            judgements = [j async for j in engine.results]
    assert len(judgements) == 2 * samples
    # The outage is ridden out: a request ready early, while a loaded machine still makes
    # the other images, may spend all its attempts in it (seen: 4 of 136 in a full run), but
    # none ends before its attempts do, and the others are judged.
    given_up = [j for j in judgements if j.status != "ok"]
    assert all(
        j.attempts == 100 and str(j.error).startswith("gave up after 100 attempts: ")
        for j in given_up
    ), given_up[:1]
    assert len(given_up) < samples
    stats = server.stats()
    assert stats.faults["error"] == outage
    judged = 2 * samples - len(given_up)
    assert stats.received == sum(j.attempts for j in judgements) == outage + judged


async def test_a_server_that_is_not_there_stops_the_run(tmp_path: Path) -> None:
    async with JudgeServer() as gone:
        closed = gone.base_url
    config = run_config(tmp_path, closed, max_attempts=1)
    with pytest.raises(FatalBackendError) as caught:
        async with Engine(config) as engine:
            async for _ in engine.results:
                pass
    assert str(caught.value).startswith(
        "judge 'trigscore' has answered no request yet, and a request gave up after 1 "
        f"attempt without reaching it (its last failure: judge at {closed}: connection failed"
    )


async def test_a_server_too_slow_to_answer_stops_the_run_saying_it_may_be_only_slow(
    tmp_path: Path,
) -> None:
    # A server that is up but slower than timeout_s was only asked "is its server running,
    # at the address in the config?", as one not there is.
    async with JudgeServer(JudgeServerOptions(hang_rate=1.0)) as server:
        config = run_config(
            tmp_path, server.base_url, max_attempts=1, judge_options={"timeout_s": 0.3}
        )
        with pytest.raises(FatalBackendError) as caught:
            async with Engine(config) as engine:
                async for _ in engine.results:
                    pass
    assert str(caught.value) == (
        "judge 'trigscore' has answered no request yet, and a request gave up after 1 "
        f"attempt with no answer in time (its last failure: judge at {server.base_url}: no "
        "answer within 0.3 s); a server that is up but slower than the judge's timeout_s "
        "ends so too: raise options.timeout_s if it is only slow; else, is its server "
        "running, at the address in the config?"
    )


async def test_one_endpoint_not_there_leaves_the_run_to_the_others(tmp_path: Path) -> None:
    # With max_attempts = 1 the first request to the closed endpoint stopped the run ("has
    # answered no request yet ... is its server running") though the other endpoint, never
    # asked, was up. Once every endpoint has been tried in vain, the run stops as before.
    samples = len(json.loads(DEMO.read_text()))
    async with JudgeServer() as gone, JudgeServer() as other_gone:
        closed, other_closed = gone.base_url, other_gone.base_url
    async with JudgeServer() as live:
        config = run_config(tmp_path / "one", [closed, live.base_url], max_attempts=1)
        async with Engine(config) as engine:
            judgements = [j async for j in engine.results]
    assert len(judgements) == 2 * samples
    failed = [j for j in judgements if j.status != "ok"]
    assert all(closed in str(j.error) for j in failed)
    assert live.stats().served == 2 * samples - len(failed) > 0
    config = run_config(tmp_path / "none", [closed, other_closed], max_attempts=1)
    with pytest.raises(FatalBackendError, match="has answered no request yet"):
        async with Engine(config) as engine:
            async for _ in engine.results:
                pass


async def test_refusals_that_stop_the_run_are_as_many_in_the_journal_as_the_message_says(
    tmp_path: Path,
) -> None:
    # "the first 8 answers of this endpoint were refusals ...; the refused ones are kept as
    # errors", yet the journal held 7: the 8th, which stopped the run, was written nowhere.
    async with JudgeServer() as server:  # as vLLM without --allowed-local-media-path
        config = run_config(
            tmp_path, server.base_url, concurrency=1, judge_options={"image_mode": "file"}
        )
        with pytest.raises(FatalBackendError) as caught:
            async with Engine(config) as engine:
                async for _ in engine.results:
                    pass
    message = str(caught.value)
    said = re.search(r"the first (\d+) answers of this endpoint were refusals", message)
    assert said is not None, message
    assert "the refused ones are kept as errors" in message
    kept = list(read_journal(config.run_dir / JOURNAL))
    assert len(kept) == int(said[1])
    assert all(j.status == "error" and "cannot load local files" in str(j.error) for j in kept)


async def test_requests_reuse_the_tasks_that_made_earlier_ones() -> None:
    makers: list[list[int]] = [[], []]  # the task ids that made each wave's requests
    started, finished = [0, 0], [0, 0]
    all_started, all_finished = [anyio.Event(), anyio.Event()], [anyio.Event(), anyio.Event()]
    go = anyio.Event()

    async def make(wave: int) -> None:
        makers[wave].append(anyio.get_current_task().id)
        started[wave] += 1
        if started[wave] == 3:
            all_started[wave].set()
        await go.wait()
        finished[wave] += 1
        if finished[wave] == 3:
            all_finished[wave].set()

    with anyio.fail_after(10):  # a requester that never ended would hang the task group
        async with _Requesters(make, abandon=pytest.fail) as requesters:
            for _ in range(3):
                requesters.hand_on(0)
            await all_started[0].wait()  # three requests in flight at once
            go.set()
            await all_finished[0].wait()
            tasks = len(anyio.get_running_tasks())
            for _ in range(3):
                requesters.hand_on(1)
            await all_finished[1].wait()
            assert len(anyio.get_running_tasks()) == tasks  # no task was started
    assert len(set(makers[0])) == 3
    assert len(makers[1]) == 3 and set(makers[1]) <= set(makers[0])


async def test_a_stop_in_a_429_storm_ends_the_retries_waits_and_starts_no_request(
    tmp_path: Path,
) -> None:
    # A stop while every slot's retry waited out a Retry-After of 20 s waited for them all,
    # and then each retry, and more first attempts, went out: one Ctrl-C took minutes. The
    # images are on disk: their judgements are asked on resume.
    samples = len(json.loads(DEMO.read_text()))
    concurrency = 4
    waiting: list[float] = []
    all_waiting = anyio.Event()

    async def sleep(seconds: float) -> None:  # a retry's wait: only a stop ends it
        waiting.append(seconds)
        if len(waiting) == concurrency:
            all_waiting.set()
        await anyio.sleep_forever()

    storm = JudgeServerOptions(rate_limit_rate=1.0, retry_after="20")
    async with JudgeServer(storm) as limited:
        config = run_config(tmp_path, limited.base_url, concurrency=concurrency, max_attempts=3)
        with anyio.fail_after(30):  # a safety net: the stop ends the waits at once
            async with Engine(config, sleep=sleep) as engine:
                async with anyio.create_task_group() as tg:

                    async def stop_once_all_wait() -> None:
                        await all_waiting.wait()
                        assert limited.stats().received == concurrency
                        engine.stop()

                    tg.start_soon(stop_once_all_wait)
                    judgements = [j async for j in engine.results]
                state = engine.stats().state
    assert waiting == [20.0] * concurrency
    assert judgements == []  # no record of a request the stop cut short
    assert limited.stats().received == concurrency  # no first attempt after the stop
    assert state == "stopped"
    async with JudgeServer() as live:
        config = run_config(tmp_path, live.base_url)
        async with Engine(config) as engine:
            judgements = [j async for j in engine.results]
    assert len(judgements) == 2 * samples and all(j.status == "ok" for j in judgements)
    assert live.stats().received == 2 * samples  # exactly the missing ones


@pytest.mark.parametrize(
    ("echoed", "status", "error"),
    [
        ("token", "unscorable", "no rating word among the top tokens: ['***'"),
        ("logprob", "error", "malformed answer (TypeError: logprob '***' of token"),
    ],
)
async def test_a_key_the_server_echoes_in_its_answers_is_stored_nowhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, echoed: str, status: str, error: str
) -> None:
    # A server that puts the Bearer token it received in its answer, as a token or as a
    # logprob: the key was in the journal, the records' top_logprobs, their errors and the
    # report's judgements.parquet.
    from trig_stream.analysis.exports import write_judgements_parquet
    from trig_stream.testing import judge_server

    key = "sk-echoed-by-the-judge-5e1f"

    def echoing(answer: dict[str, Any]) -> bytes:
        first = answer["choices"][0]["logprobs"]["content"][0]
        for entry in first["top_logprobs"]:
            entry[echoed] = key
        return json.dumps(answer).encode()

    monkeypatch.setenv("TRIG_TEST_ECHO_KEY", key)
    monkeypatch.setattr(judge_server, "to_json", echoing)
    async with JudgeServer(JudgeServerOptions(api_key=key)) as server:
        config = run_config(
            tmp_path,
            server.base_url,
            judge_options={"api_key_env": "TRIG_TEST_ECHO_KEY"},
            max_attempts=1,
        )
        async with Engine(config) as engine:
            judgements = [j async for j in engine.results]
    assert judgements and {j.status for j in judgements} == {status}
    assert all(error in str(j.error) for j in judgements)
    write_judgements_parquet(judgements, tmp_path / "report" / "judgements.parquet")
    assert _files_holding(tmp_path, key) == []
    assert key not in repr(judgements)


def _files_holding(folder: Path, text: str) -> list[Path]:
    """The files under ``folder`` (a run directory's journal among them) holding ``text``."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert any(p.name == "journal.jsonl" for p in files)
    return [p for p in files if text.encode() in p.read_bytes()]
