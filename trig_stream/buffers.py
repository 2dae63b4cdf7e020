"""The bounded buffers that join the engine's stages, each bound chosen for what it holds.

A full buffer makes the stage before it wait, all the way back to the dataset reader, so
these bounds (``[engine]`` ``*_buffer``) cap the memory and the work in flight of a run of
any size.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from trig_stream.config import RunConfig
from trig_stream.pipeline import ImageItem, WorkItem
from trig_stream.records import Judgement


@dataclass(frozen=True, slots=True)
class Streams:
    """The bounded buffers between the stages, as (send, receive) pairs."""

    samples: dict[str, tuple[MemoryObjectSendStream[WorkItem], MemoryObjectReceiveStream[WorkItem]]]
    """Per model: the source stage's samples for its generator."""
    images: tuple[MemoryObjectSendStream[ImageItem], MemoryObjectReceiveStream[ImageItem]]
    judgements: tuple[MemoryObjectSendStream[Judgement], MemoryObjectReceiveStream[Judgement]]
    results: tuple[MemoryObjectSendStream[Judgement], MemoryObjectReceiveStream[Judgement]]

    def send_ends(self) -> dict[str, MemoryObjectSendStream[Any]]:
        """Each buffer's send end by name (``samples:<model>``, ``images``, ``judgements``,
        ``results``): its statistics say how full the buffer is."""
        ends: dict[str, MemoryObjectSendStream[Any]] = {
            f"samples:{name}": send for name, (send, _) in self.samples.items()
        }
        ends.update(images=self.images[0], judgements=self.judgements[0], results=self.results[0])
        return ends

    def close(self) -> None:
        """Close both ends of every buffer (a run that ended before its stages started,
        which would have closed theirs)."""
        buffers: list[tuple[MemoryObjectSendStream[Any], MemoryObjectReceiveStream[Any]]] = [
            *self.samples.values(),
            self.images,
            self.judgements,
            self.results,
        ]
        for send, receive in buffers:
            send.close()
            receive.close()


def create_streams(config: RunConfig, models: Iterable[str]) -> Streams:
    """The buffers of a run of ``config`` with generators named ``models``."""
    engine = config.engine
    # Bounds. Samples are small (a p2p sample holds its encoded source image, ~1.4 MB),
    # so a few per model keep every generator busy without reading far ahead.
    samples = {
        name: anyio.create_memory_object_stream[WorkItem](engine.sample_buffer) for name in models
    }
    # Images travel as paths on disk; this bound is how far generation may run ahead of
    # judging, and so how much unjudged work a hard stop leaves behind.
    images = anyio.create_memory_object_stream[ImageItem](engine.image_buffer)
    # Judgements are a few hundred bytes; a deep buffer lets one fsync cover many.
    judgements = anyio.create_memory_object_stream[Judgement](engine.judgement_buffer)
    # Durable judgements waiting for the consumer; a slow consumer stalls the run here.
    results = anyio.create_memory_object_stream[Judgement](engine.result_buffer)
    return Streams(samples, images, judgements, results)
