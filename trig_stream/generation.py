"""The generation stage: one model's generator run in worker threads, images written to disk.

Each of the generator's ``workers`` takes a sample from the model's buffer, adds whatever else
is already waiting up to ``batch_size`` (it never waits to fill a batch), and runs one
blocking ``generate`` call in a thread behind the model's own capacity limiter. Every image is
written atomically before its path moves on, so a judgement never points at a partial file. A
valid image left by an earlier run is reused instead of generated again.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from trig_stream.backends.base import GenerationRequest, Generator
from trig_stream.errors import FatalBackendError, TrigStreamError
from trig_stream.pipeline import (
    ImageItem,
    RunContext,
    WorkItem,
    describe_error,
    failed_judgement,
)
from trig_stream.records import GeneratedImage, Judgement
from trig_stream.store import write_atomic


class GenerationStage:
    """Runs one generator over its model's buffer of work items."""

    def __init__(self, context: RunContext, generator: Generator) -> None:
        self._context = context
        self._generator = generator

    async def run(
        self,
        receive: MemoryObjectReceiveStream[WorkItem],
        image_send: MemoryObjectSendStream[ImageItem],
        judgement_send: MemoryObjectSendStream[Judgement],
    ) -> None:
        # One thread per worker: the limiter keeps this model's blocking calls off the shared
        # default thread pool, where they could starve dataset reads and image encoding.
        limiter = anyio.CapacityLimiter(self._generator.workers)
        async with receive, image_send, judgement_send:
            try:
                await anyio.to_thread.run_sync(self._generator.load, limiter=limiter)
            except TrigStreamError:
                raise
            except Exception as exc:
                raise FatalBackendError(
                    f"generator {self._generator.name!r} failed to load: {exc}"
                ) from exc
            try:
                async with anyio.create_task_group() as tg:
                    for worker in range(self._generator.workers):
                        tg.start_soon(
                            self._worker,
                            worker,
                            limiter,
                            receive.clone(),
                            image_send.clone(),
                            judgement_send.clone(),
                        )
            finally:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(self._generator.close, limiter=limiter)

    async def _worker(
        self,
        worker: int,
        limiter: anyio.CapacityLimiter,
        receive: MemoryObjectReceiveStream[WorkItem],
        image_send: MemoryObjectSendStream[ImageItem],
        judgement_send: MemoryObjectSendStream[Judgement],
    ) -> None:
        async with receive, image_send, judgement_send:
            async for first in receive:
                if self._context.is_stopping():
                    continue  # graceful stop: queued samples are new work; drop them
                batch = [first]
                while len(batch) < self._generator.batch_size:
                    try:
                        batch.append(receive.receive_nowait())
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                outcomes = await anyio.to_thread.run_sync(
                    self._generate_batch, worker, batch, limiter=limiter
                )
                counts = self._context.counters.model(self._generator.name)
                now = time.monotonic()
                for work, outcome in zip(batch, outcomes, strict=True):
                    if isinstance(outcome, GeneratedImage):
                        if outcome.reused:
                            counts.reused += 1
                        else:
                            counts.generated += 1
                            self._context.counters.generation_latencies.append(outcome.latency_s)
                            self._context.counters.generated_at.append(now)
                        await image_send.send(ImageItem(work, outcome))
                    else:
                        counts.generation_failed += 1
                        for dimension, judge_name in work.todo:
                            await judgement_send.send(
                                failed_judgement(
                                    self._context, work, dimension, judge_name, outcome, "generate"
                                )
                            )

    def _generate_batch(self, worker: int, batch: list[WorkItem]) -> list[GeneratedImage | str]:
        # Runs in the generator's worker thread: reuse check, generation, PNG encoding, write.
        task = self._context.config.run.task
        outcomes: list[GeneratedImage | str] = []
        missing: list[int] = []
        for index, work in enumerate(batch):
            path = self._context.run_dir.image_path(task, work.model, work.sample.data_id)
            if valid_image(path):
                outcomes.append(
                    GeneratedImage(
                        model=work.model,
                        data_id=work.sample.data_id,
                        path=path,
                        seed=work.seed,
                        reused=True,
                    )
                )
            else:
                outcomes.append("")
                missing.append(index)
        if not missing:
            return outcomes
        requests = [
            GenerationRequest(batch[i].model, batch[i].sample, batch[i].seed) for i in missing
        ]
        started = time.perf_counter()
        try:
            images = self._generator.generate(
                requests, worker=worker, cancel=self._context.cancel_generation
            )
        except FatalBackendError:
            raise
        except Exception as exc:
            images = [exc] * len(requests)
        per_image = (time.perf_counter() - started) / len(requests)
        if len(images) != len(requests):
            message = f"generator returned {len(images)} images for {len(requests)} requests"
            raise FatalBackendError(f"generator {self._generator.name!r} is broken: {message}")
        for index, image in zip(missing, images, strict=True):
            work = batch[index]
            if isinstance(image, Exception):
                outcomes[index] = describe_error(image)
                continue
            path = self._context.run_dir.image_path(task, work.model, work.sample.data_id)
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            write_atomic(path, buffer.getvalue())
            outcomes[index] = GeneratedImage(
                model=work.model,
                data_id=work.sample.data_id,
                path=path,
                seed=work.seed,
                latency_s=per_image,
            )
        return outcomes


def valid_image(path: Path) -> bool:
    """True when ``path`` is a complete, decodable image file."""
    if not path.is_file():
        return False
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.verify()
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError):
        return False
    return True
