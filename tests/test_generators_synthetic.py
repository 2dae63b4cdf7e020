"""The synthetic generator's options and its calls."""

from __future__ import annotations

import hashlib
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import run_and_dataset_toml
from trig_stream.backends.base import GenerationRequest
from trig_stream.records import Sample
from trig_stream.testing.synthetic import SyntheticGenerator, SyntheticOptions, draw


class CountingEvent(threading.Event):
    """An event that counts the looks at it: each is one pass of a generate call's loop."""

    def __init__(self) -> None:
        super().__init__()
        self.looks = 0

    def is_set(self) -> bool:
        self.looks += 1
        return super().is_set()


def test_a_call_without_latency_does_not_loop_over_its_steps() -> None:
    # With latency_s = 0 the call still went through every step: steps = 2**63 - 1 kept it
    # (and the run, whose graceful stop lets a call finish) busy for ever.
    generator = SyntheticGenerator("g", SyntheticOptions(size=8, steps=10_000))
    sample = Sample(data_id="IQ-R_TA-C_1", task="t2i", prompt="a cat", dimensions=("IQ-R", "TA-C"))
    cancel = CountingEvent()
    (image,) = generator.generate([GenerationRequest("g", sample, 1)], worker=0, cancel=cancel)
    assert not isinstance(image, Exception)
    assert cancel.looks == 1


@pytest.mark.parametrize("steps", ["9223372036854775807", "10001"])
def test_validate_refuses_steps_past_the_bound_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], steps: str
) -> None:
    from trig_stream.cli import main
    from trig_stream.exit_codes import EXIT_CONFIG

    path = tmp_path / "run.toml"
    path.write_text(
        run_and_dataset_toml(tmp_path) + '[[generators]]\nname = "g"\nbackend = "synthetic"\n'
        f"options = {{ size = 16, latency_s = 0.0, steps = {steps} }}\n"
        '[[judges]]\nbackend = "fake"\n'
    )
    assert main(["validate", str(path)]) == EXIT_CONFIG
    err = " ".join(capsys.readouterr().err.split())
    assert "generators[0].options.steps:" in err and "10000" in err


def draw_as_it_was(seed: int, size: int) -> Image.Image:
    """:func:`draw` as it was first written (float64 pixels throughout): the reference its
    images must equal, bit for bit, for a seed's image to stay the image a resume finds."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, size=(5, 3))
    corners = rng.integers(0, size - 4, size=(3, 2))
    extents = rng.integers(2, max(3, size // 2), size=(3, 2))
    ramp = np.linspace(0.0, 1.0, size)[:, None, None]
    row = colours[0] + (colours[1] - colours[0]) * ramp
    pixels = np.broadcast_to(row, (size, size, 3)).copy()
    for colour, (x0, y0), (w, h) in zip(colours[2:], corners, extents, strict=True):
        pixels[y0 : y0 + h, x0 : x0 + w] = colour
    return Image.fromarray(pixels.astype(np.uint8), mode="RGB")


@pytest.mark.parametrize("size", [8, 9, 64, 255, 1000])
@pytest.mark.parametrize("seed", [0, 1, 12345, 2**31 + 7])
def test_a_drawing_is_the_same_image_it_always_was(seed: int, size: int) -> None:
    assert draw(seed, size).tobytes() == draw_as_it_was(seed, size).tobytes()


def test_a_drawing_is_the_image_it_was_in_earlier_releases() -> None:
    # Digests of the pixels the float64 drawing made (at 47133fb): the reference above runs
    # on today's numpy, as draw does; these hold them both to the images of earlier runs.
    digests = {
        (size, seed): hashlib.sha256(draw(seed, size).tobytes()).hexdigest()[:16]
        for size, seed in [(16, 0), (64, 3), (300, 99)]
    }
    assert digests == DIGESTS


DIGESTS = {(16, 0): "4001693e608b537e", (64, 3): "a655fbad2ff16e90", (300, 99): "4ac985000ec65b9b"}


def test_a_drawing_takes_its_pixels_memory_not_eight_times_it() -> None:
    # The gradient was spread over the whole image in float64 (8 bytes a channel), then
    # copied to uint8: 575 MiB at the peak for a 4096² image of 48 MiB.
    size = 512
    tracemalloc.start()
    try:
        draw(1, size)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * size * size * 3
