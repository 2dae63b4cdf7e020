"""The adaptive concurrency controller: pure logic, driven by a fake limiter and clock."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.conftest import ConfigFactory
from trig_stream.backends.base import JudgeReply, JudgeRequest, ServerLoad
from trig_stream.backends.judges.server_probe import parse_load, server_root
from trig_stream.concurrency import SILENT_POLLS, ConcurrencyController, follow_server_load
from trig_stream.config import AdaptiveConcurrency, JudgeConfig, load_config
from trig_stream.engine import Engine
from trig_stream.errors import (
    AnswerTimeoutError,
    ConfigError,
    RateLimitError,
    RetryableError,
    UnreachableError,
)
from trig_stream.testing.fake_judge import FakeJudge


@dataclass
class FakeLimiter:
    total_tokens: float
    borrowed_tokens: int = 0


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def controller(
    start: int = 8, *, busy: bool = True, clock: FakeClock | None = None, **settings: Any
) -> tuple[ConcurrencyController, FakeLimiter]:
    limiter = FakeLimiter(total_tokens=start)
    adaptive = AdaptiveConcurrency(enabled=True, **settings)
    control = ConcurrencyController(adaptive, limiter, clock=clock or FakeClock())
    if busy:
        limiter.borrowed_tokens = control.limit
    return control, limiter


def succeed(control: ConcurrencyController, limiter: FakeLimiter, times: int) -> None:
    """``times`` answers in 0.1 s while every slot is taken."""
    for _ in range(times):
        limiter.borrowed_tokens = control.limit
        control.on_success(control.epoch, 0.1)


def test_start_is_clamped_and_applied() -> None:
    control, limiter = controller(start=500, max=64)
    assert control.limit == 64 == limiter.total_tokens
    control, limiter = controller(start=1, min=4)
    assert control.limit == 4 == limiter.total_tokens


def test_slow_start_then_additive_growth() -> None:
    control, limiter = controller(start=4, max_waiting=2)
    succeed(control, limiter, 4)
    assert control.limit == 8  # one step per answer before the first cut
    control.on_rate_limited(control.epoch)
    assert control.limit == 4
    succeed(control, limiter, 3)
    assert control.limit == 4  # after a cut: one step per round trip (4 answers at 4)
    succeed(control, limiter, 1)
    assert control.limit == 5
    assert limiter.total_tokens == 5


def test_no_growth_while_the_limit_is_not_what_holds_requests_back() -> None:
    control, _ = controller(start=8, busy=False)
    for _ in range(20):
        control.on_success(control.epoch, 0.1)
    assert control.limit == 8


def test_rate_limits_cut_once_per_round_trip() -> None:
    clock = FakeClock()
    control, _ = controller(start=32, min=2, clock=clock)
    sent_before = control.epoch
    control.on_rate_limited(sent_before)
    assert control.limit == 16
    # The other requests sent under the old limit come back refused too: no further cut.
    clock.now += 10.0
    for _ in range(10):
        control.on_rate_limited(sent_before)
        control.on_timeout(sent_before)
    assert control.limit == 16
    # Requests sent under the new limit are refused again: cut again, down to the floor.
    for _ in range(5):
        clock.now += 2.0
        control.on_rate_limited(control.epoch)
    assert control.limit == 2
    assert [c.reason for c in control.changes][-1] == "rate limited (429)"


def test_cuts_are_a_poll_interval_apart_at_least() -> None:
    # A round trip under the new limit can be far shorter than the time a cut takes to show:
    # one 429 of each such round trip cut it again (seen: the limit held at 2 of 64).
    clock = FakeClock()
    control, _ = controller(start=64, min=2, poll_interval_s=0.2, clock=clock)
    control.on_rate_limited(control.epoch)
    assert control.limit == 32
    clock.now += 0.1
    control.on_rate_limited(control.epoch)
    control.on_timeout(control.epoch)
    assert control.limit == 32
    clock.now += 0.15
    control.on_timeout(control.epoch)
    assert control.limit == 16
    assert [c.reason for c in control.changes] == ["rate limited (429)", "no answer in time"]


def test_random_429s_leave_the_limit_near_what_the_server_takes() -> None:
    # 5% of answers a 429 at random, round trips of 20 ms, the load polled every 0.2 s: the
    # limit climbs by one a round trip and is halved at most once a poll interval (10 round
    # trips), so it swings between about 6 and 20 (a cut a round trip: between 2 and 14,
    # about 5 on average).
    clock = FakeClock()
    control, limiter = controller(start=32, min=2, max=64, poll_interval_s=0.2, clock=clock)
    draw = random.Random(7).random
    limits = []
    for _ in range(500):  # 10 s of round trips
        epoch = control.epoch
        limiter.borrowed_tokens = control.limit
        for _ in range(control.limit):
            if draw() < 0.05:
                control.on_rate_limited(epoch)
            else:
                control.on_success(epoch, 0.02)
        clock.now += 0.02
        limits.append(control.limit)
    assert min(limits[100:]) >= 5
    assert sum(limits[100:]) / len(limits[100:]) >= 9


def test_growing_queue_cuts_and_a_drained_queue_lets_it_grow() -> None:
    clock = FakeClock()
    control, limiter = controller(start=16, max_waiting=4, clock=clock)

    def poll(running: int, waiting: int) -> None:  # once a poll interval, as the watcher does
        clock.now += control.settings.poll_interval_s
        control.on_server_load(ServerLoad(running=running, waiting=waiting))

    poll(16, 2)
    assert control.limit == 16  # a short queue is fine
    poll(16, 10)
    assert control.limit == 8
    # Still long, but nothing sent under the new limit has come back yet: hold.
    poll(16, 12)
    assert control.limit == 8
    succeed(control, limiter, 1)  # a round trip under the new limit; the queue is long
    assert control.limit == 8  # ... so no growth either
    poll(16, 14)
    assert control.limit == 4
    # Draining (shorter than at the last reading) while still long: wait for it.
    succeed(control, limiter, 1)
    poll(8, 9)
    assert control.limit == 4
    # Drained: growth resumes, a step per round trip.
    poll(4, 0)
    succeed(control, limiter, 4 + 5 + 6)
    assert control.limit == 7
    reasons = [c.reason for c in control.changes]
    assert reasons[:2] == ["server queue 10 > 4", "server queue 14 > 4"]


def test_unknown_load_changes_nothing() -> None:
    control, limiter = controller(start=8)
    control.on_server_load(None)
    succeed(control, limiter, 2)
    assert control.limit == 10


def test_latency_target() -> None:
    control, limiter = controller(start=8, target_latency_s=1.0)
    limiter.borrowed_tokens = 8
    control.on_success(control.epoch, 0.5)
    assert control.limit == 9
    control.on_success(control.epoch, 10.0)  # the average jumps above the target
    assert control.limit == 4
    assert control.changes[-1].reason.startswith("latency")


def test_latency_blow_up_without_target() -> None:
    control, limiter = controller(start=8, max=8, latency_factor=3.0)
    succeed(control, limiter, 10)  # baseline: 0.1 s
    assert control.limit == 8
    for _ in range(20):
        limiter.borrowed_tokens = control.limit
        control.on_success(control.epoch, 2.0)
    assert control.limit < 8


def test_changes_are_stamped_by_the_clock() -> None:
    limiter = FakeLimiter(total_tokens=4)
    clock = FakeClock()
    control = ConcurrencyController(AdaptiveConcurrency(enabled=True), limiter, clock=clock)
    clock.now = 250.0
    control.on_timeout(control.epoch)
    assert control.changes[-1].at == 250.0
    assert control.changes[-1].limit == 2


def test_config_table() -> None:
    entry = JudgeConfig.model_validate(
        {"backend": "fake", "adaptive": {"enabled": True, "min": 2, "max": 64}}
    )
    assert entry.adaptive.max_waiting == 8 and entry.adaptive.poll_interval_s == 2.0
    with pytest.raises(ValueError, match="min"):
        AdaptiveConcurrency(min=10, max=5)
    with pytest.raises(ValueError, match="Extra inputs"):
        JudgeConfig.model_validate({"backend": "fake", "adaptive": {"burst": 3}})


def test_prometheus_gauges_are_summed() -> None:
    text = (
        "# HELP vllm:num_requests_running Number of requests.\n"
        "# TYPE vllm:num_requests_running gauge\n"
        'vllm:num_requests_running{engine="0",model_name="m"} 3.0\n'
        'vllm:num_requests_running{engine="1",model_name="m"} 4.0\n'
        'vllm:num_requests_waiting{engine="0",model_name="a b}"} 5.0 1700000000\n'
        "vllm:num_requests_waiting_by_reason 99\n"
        "vllm:num_requests_waiting 1\n"
    )
    assert parse_load(text) == ServerLoad(running=7, waiting=6)
    assert parse_load("process_cpu_seconds_total 1.0\n") is None
    assert server_root("http://h:8000/v1/") == "http://h:8000"


def test_prometheus_gauges_apart_by_any_whitespace_are_read_and_negative_ones_are_not() -> None:
    # A tab, or a space before the labels, hid the gauge; a negative count was summed with
    # the others, hiding a real queue.
    text = (
        "vllm:num_requests_waiting\t5\n"
        'vllm:num_requests_waiting {engine="0"} 7\n'
        "vllm:num_requests_running   2  1700000000\n"
        'vllm:num_requests_running{engine="1"}\t-4\n'
        "vllm:num_requests_waiting -4\n"
    )
    assert parse_load(text) == ServerLoad(running=2, waiting=12)
    assert parse_load("vllm:num_requests_waiting -1\n") is None


@pytest.mark.anyio
async def test_polling_stops_for_a_judge_without_load() -> None:
    limiter = FakeLimiter(total_tokens=4)
    control = ConcurrencyController(AdaptiveConcurrency(enabled=True), limiter)
    naps: list[float] = []

    async def sleep(seconds: float) -> None:
        naps.append(seconds)
        await anyio.lowlevel.checkpoint()

    with anyio.fail_after(5):
        await follow_server_load(FakeJudge(), control, sleep)
    assert naps == [2.0] * (SILENT_POLLS - 1)


def test_config_table_in_toml(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text(
        '[run]\nname = "t"\n[dataset]\npath = "p.json"\n'
        '[[generators]]\nname = "g"\nbackend = "synthetic"\n'
        '[[judges]]\nbackend = "fake"\n[judges.adaptive]\nenabled = true\nmax = 64\nburst = 3\n'
    )
    with pytest.raises(ConfigError, match=r"run.toml:13: judges\[0\].adaptive.burst: unknown key"):
        load_config(path)
    path.write_text(path.read_text().replace("burst = 3\n", ""))
    adaptive = load_config(path).judges[0].adaptive
    assert adaptive.enabled and adaptive.max == 64


@pytest.mark.anyio
async def test_engine_cuts_the_limit_on_rate_limits(make_config: ConfigFactory) -> None:
    config = make_config(
        judges=[
            {
                "backend": "fake",
                "concurrency": 16,
                "adaptive": {"enabled": True},
                "options": {"rate_limit_rate": 0.3},
            }
        ]
    )
    naps: list[float] = []

    async def sleep(seconds: float) -> None:
        naps.append(seconds)
        await anyio.lowlevel.checkpoint()

    with anyio.fail_after(30):
        async with Engine(config, sleep=sleep) as engine:
            summary = await engine.drain()
    assert summary.ok == summary.judged == 24  # every 429 was retried
    assert engine.stats().judges["trigscore"].limit < 16
    # The fake judge reports no load: its watcher gave up after a few polls.
    assert naps.count(2.0) == SILENT_POLLS - 1


class FailsFirstAttempts(FakeJudge):
    """Fails the first attempt of every request with ``failure``; the retry is answered."""

    def __init__(self, failure: RetryableError) -> None:
        super().__init__(concurrency=16)
        self.failure = failure

    async def judge(self, request: JudgeRequest) -> JudgeReply:
        if request.attempt == 1:
            raise self.failure
        return await super().judge(request)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("failure", "cut"),
    [
        (RetryableError("judge at http://127.0.0.1:9/v1: HTTP 503: busy"), False),
        (UnreachableError("judge at http://127.0.0.1:9/v1: connection failed (reset)"), False),
        (RetryableError("judge at http://127.0.0.1:9/v1: malformed answer (truncated)"), False),
        (AnswerTimeoutError("judge at http://127.0.0.1:9/v1: no answer within 5 s"), True),
        (RateLimitError("judge at http://127.0.0.1:9/v1: HTTP 429", retry_after=0), True),
    ],
)
async def test_only_signs_of_load_cut_the_limit(
    make_config: ConfigFactory, failure: RetryableError, cut: bool
) -> None:
    # A 5xx, a reset or a malformed answer says nothing of the server's load: each halved the
    # limit, and a server failing 10% of its requests at random held it at the floor.
    # No latency rule: on a loaded machine a slow answer cut the limit too, whatever failed.
    adaptive = {"enabled": True, "latency_factor": 1e9}
    config = make_config(judges=[{"backend": "fake", "concurrency": 16, "adaptive": adaptive}])

    async def sleep(seconds: float) -> None:
        await anyio.lowlevel.checkpoint()

    with anyio.fail_after(30):
        async with Engine(config, judges=[FailsFirstAttempts(failure)], sleep=sleep) as engine:
            summary = await engine.drain()
    assert summary.ok == summary.judged == 24  # every failure was retried
    limit = engine.stats().judges["trigscore"].limit
    assert limit < 16 if cut else limit >= 16
