"""What the engine's stages share: the items they pass on and the run they belong to."""

from __future__ import annotations

import threading
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

import anyio
import anyio.lowlevel
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from trig_stream.config import RunConfig
from trig_stream.dimensions import Dimension
from trig_stream.errors import TrigStreamError
from trig_stream.records import (
    GeneratedImage,
    JudgeFingerprint,
    Judgement,
    PromptRewrite,
    Sample,
    Stage,
)
from trig_stream.stats import Counters
from trig_stream.store import RunDir

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class WorkItem:
    """A sample queued for one model, with the (dimension, judge name) pairs still to judge."""

    model: str
    sample: Sample
    seed: int
    todo: tuple[tuple[Dimension, str], ...]

    @property
    def image_label(self) -> str:
        """What its image records of what it was made for (see
        :func:`trig_stream.png.with_sample_digest`): the sample's digest, then the model, the
        data_id and the seed, so that no other sample's image (a copy, a file moved by
        hand) is taken for it."""
        return f"{self.sample.digest} {self.model} {self.sample.data_id} {self.seed}"


@dataclass(frozen=True, slots=True)
class ImageItem:
    """A work item whose image is on disk, on its way to the judges."""

    work: WorkItem
    image: GeneratedImage


@dataclass(frozen=True, slots=True)
class RunContext:
    """The run the stages work for: config, directory, counters and the stop signals."""

    config: RunConfig
    run_dir: RunDir
    counters: Counters
    fingerprints: dict[str, JudgeFingerprint]
    cancel_generation: threading.Event
    """Set on a hard stop; generator threads check it between steps."""
    stopping: anyio.Event
    """Set when a graceful or hard stop begins: start no new work; it ends a wait that is no
    work in flight (a generator's load)."""
    hard_stopping: anyio.Event
    """Set on a hard stop: it ends every wait (a generator's close, which may hang)."""
    passed_over: dict[str, set[str]] = field(default_factory=dict)
    """Per model whose generator hears of it (see
    :meth:`~trig_stream.backends.base.Generator.all_requested`), the data_ids of the samples
    the run did not ask it for: finished or quarantined (the source stage, in its thread) or
    reused (the generation stage)."""

    def pass_over(self, model: str, data_id: str) -> None:
        """Note that ``model``'s generator is not asked for ``data_id``."""
        passed_over = self.passed_over.get(model)
        if passed_over is not None:
            passed_over.add(data_id)  # one call, atomic: the set is shared by two threads


def failed_judgement(
    context: RunContext,
    work: WorkItem,
    dimension: Dimension,
    judge_name: str,
    reason: str,
    stage: Stage,
    *,
    prompt_rewrite: PromptRewrite | None = None,
) -> Judgement:
    """The record of a judgement that could not be made: status ``error``, never a score;
    with the sample's ``prompt_rewrite`` when a generator rewrote its prompt (or tried)."""
    sample = work.sample
    return Judgement(
        model=work.model,
        data_id=sample.data_id,
        task=sample.task,
        pair=sample.pair,
        dimension=dimension,
        metric=judge_name,
        judge=context.fingerprints[judge_name],
        status="error",
        sample_digest=sample.digest,
        seed=work.seed,
        error=f"{stage} failed: {reason}",
        error_stage=stage,
        prompt_rewrite=prompt_rewrite,
    )


def describe_error(exc: BaseException) -> str:
    """A one-line reason for a record: our own messages as they are, others with their type."""
    text = str(exc)
    if isinstance(exc, TrigStreamError) and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def take_ready(receive: MemoryObjectReceiveStream[T], batch: list[T], limit: int | None) -> None:
    """Append to ``batch`` what ``receive`` holds already, until it has ``limit`` items."""
    while limit is None or len(batch) < limit:
        try:
            batch.append(receive.receive_nowait())
        except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
            return


async def send_now(send: MemoryObjectSendStream[T], item: T) -> None:
    """Send ``item``, waiting only when the buffer is full.

    ``send`` itself always yields to the event loop first; on the paths every judgement
    takes, that costs more than the rest of the hand-over. The loops that call this wait on
    their own receives, so cancellation is still seen.
    """
    try:
        send.send_nowait(item)
    except anyio.WouldBlock:
        await send.send(item)
    except anyio.BrokenResourceError:
        # The receiver is gone, most often because the run is being cancelled: then the
        # cancellation is what this task must raise, as ``send`` would have.
        await anyio.lowlevel.checkpoint()
        raise


async def unless(event: anyio.Event, waited: Awaitable[None]) -> bool:
    """Await ``waited`` unless ``event`` is set first (or already), which cancels it;
    whether it ended by itself. Its error comes out as itself, not in a group."""
    failure: Exception | None = None
    ended = False
    async with anyio.create_task_group() as tg:

        async def cancel_on_event() -> None:
            await event.wait()
            tg.cancel_scope.cancel()

        tg.start_soon(cancel_on_event)
        try:
            await waited
            ended = True
        except Exception as exc:
            failure = exc
        tg.cancel_scope.cancel()
    if failure is not None:
        raise failure
    return ended
