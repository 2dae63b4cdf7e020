"""A generator that draws deterministic procedural images, for tests and demos.

Each image is a function of its seed alone (a colour gradient with a few rectangles), so two
runs with the same seeds give byte-identical PNGs. ``latency_s`` makes it spend time like a
real pipeline, in ``steps`` slices that check for cancellation between them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, Field

from trig_stream.backends.base import GenerationRequest, Generator
from trig_stream.config_fields import OPTIONS_CONFIG
from trig_stream.errors import FatalBackendError, ItemError
from trig_stream.hashing import unit_hash

if TYPE_CHECKING:
    from PIL.Image import Image

    from trig_stream.config import GeneratorConfig, RunConfig


MAX_STEPS = 10_000
"""The most slices of ``latency_s``: finer ones only spin, and an unbounded number (a
typo's 2**63 - 1) kept a call busy for ever."""


class SyntheticOptions(BaseModel):
    """``options`` of the ``synthetic`` generator."""

    model_config = OPTIONS_CONFIG

    size: Annotated[int, Field(ge=8, le=4096)] = 64
    latency_s: Annotated[float, Field(ge=0)] = 0.0
    """Time spent per call (one batch, whatever it holds), as a pipeline would."""
    steps: Annotated[int, Field(ge=1, le=MAX_STEPS)] = 4
    """Slices of ``latency_s`` between which cancellation is checked (none without a
    latency: nothing to slice)."""
    failure_rate: Annotated[float, Field(ge=0, le=1)] = 0.0
    """Share of data_ids whose generation fails (the same ones every run)."""
    fail_ids: list[str] = Field(default_factory=list)
    """data_ids whose generation always fails."""
    fatal: bool = False
    """Fail the whole run at the first batch (tests the fatal path)."""


class SyntheticGenerator(Generator):
    """Procedural images from the seed; no model, no dependencies beyond numpy and Pillow."""

    Options = SyntheticOptions
    reads_source_image = False  # drawn from the seed alone

    def __init__(
        self, name: str, options: SyntheticOptions, *, workers: int = 1, batch_size: int = 1
    ) -> None:
        self.name = name
        self.options = options
        self.workers = workers
        self.batch_size = batch_size
        self.calls: list[int] = []
        """Batch sizes of every :meth:`generate` call, for tests of micro-batching."""

    @classmethod
    def from_config(
        cls, entry: GeneratorConfig, options: SyntheticOptions, config: RunConfig
    ) -> SyntheticGenerator:
        return cls(entry.name, options, workers=entry.workers, batch_size=entry.batch_size)

    def fingerprint(self) -> dict[str, Any]:
        return {"backend": "synthetic", "size": self.options.size}

    def generate(
        self, requests: Sequence[GenerationRequest], *, worker: int, cancel: threading.Event
    ) -> list[Image | Exception]:
        if self.options.fatal:
            raise FatalBackendError("synthetic generator configured to fail (fatal = true)")
        self.calls.append(len(requests))
        # Without a latency there is nothing to slice: steps alone kept a call spinning.
        steps = self.options.steps if self.options.latency_s else 1
        for _ in range(steps):
            if cancel.is_set():
                return [ItemError("cancelled") for _ in requests]
            if self.options.latency_s:
                time.sleep(self.options.latency_s / steps)
        return [self._one(request) for request in requests]

    def _one(self, request: GenerationRequest) -> Image | Exception:
        data_id = request.sample.data_id
        if data_id in self.options.fail_ids or (
            unit_hash("synthetic-fail", data_id) < self.options.failure_rate
        ):
            return ItemError(f"synthetic failure for {data_id}")
        return draw(request.seed, self.options.size)


def draw(seed: int, size: int) -> Image:
    """A deterministic picture: a two-colour gradient with three rectangles."""
    import numpy as np
    from PIL import Image as PILImage

    rng = np.random.default_rng(seed)
    # Few calls, each drawing many numbers: numpy's cost here is per call, not per number.
    colours = rng.integers(0, 256, size=(5, 3))  # the gradient's two ends, three rectangles
    corners = rng.integers(0, size - 4, size=(3, 2))
    extents = rng.integers(2, max(3, size // 2), size=(3, 2))
    # The gradient runs down the rows: one pixel per row, made uint8 before it is spread
    # across the row. Spread first, in float64, it took 8 bytes a channel and a uint8 copy
    # (575 MiB at its peak for a 4096² image of 48 MiB); truncated alike, the pixels are the
    # same, bit for bit (a seed's image must not change: resumes compare them).
    ramp = np.linspace(0.0, 1.0, size)[:, None, None]
    column = (colours[0] + (colours[1] - colours[0]) * ramp).astype(np.uint8)
    pixels = np.broadcast_to(column, (size, size, 3)).copy()
    for colour, (x0, y0), (w, h) in zip(colours[2:], corners, extents, strict=True):
        pixels[y0 : y0 + h, x0 : x0 + w] = colour
    return PILImage.fromarray(pixels, mode="RGB")
