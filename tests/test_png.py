"""The PNG files the engine writes: fast encoding that keeps every pixel, the sample chunk."""

from __future__ import annotations

import io
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from trig_stream.png import SAMPLE_KEY, encode_png, is_png, not_png_file, with_sample_digest

MODES = {"L": 1, "RGB": 3, "RGBA": 4}


def decoded(png: bytes) -> Image.Image:
    with Image.open(io.BytesIO(png)) as image:
        image.verify()  # every chunk's CRC, through the end chunk
    image = Image.open(io.BytesIO(png))
    image.load()
    return image


@settings(max_examples=60, deadline=None)
@given(
    mode=st.sampled_from(sorted(MODES)),
    height=st.integers(1, 9),
    width=st.integers(1, 9),
    seed=st.integers(0, 2**32 - 1),
)
def test_every_pixel_survives_the_fast_encoding(
    mode: str, height: int, width: int, seed: int
) -> None:
    # Random bytes put every difference between rows in play, wrap-around included.
    shape = (height, width) if MODES[mode] == 1 else (height, width, MODES[mode])
    pixels = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    image = Image.fromarray(pixels, mode=mode)
    png = encode_png(image)
    back = decoded(png)
    assert back.mode == mode
    assert back.size == (width, height)
    assert np.array_equal(np.asarray(back), pixels)


def test_a_picture_always_gives_the_same_bytes() -> None:
    pixels = np.random.default_rng(3).integers(0, 256, (64, 48, 3), dtype=np.uint8)
    assert encode_png(Image.fromarray(pixels)) == encode_png(Image.fromarray(pixels.copy()))


def test_every_row_carries_the_up_filter() -> None:
    # Pillow picks a filter per row; on random pixels it would not pick "Up" for all 64.
    pixels = np.random.default_rng(5).integers(0, 256, (64, 48, 3), dtype=np.uint8)
    png = encode_png(Image.fromarray(pixels))
    length = int.from_bytes(png[33:37], "big")
    assert png[37:41] == b"IDAT"
    rows = np.frombuffer(zlib.decompress(png[41 : 41 + length]), np.uint8).reshape(64, -1)
    assert rows[:, 0].tolist() == [2] * 64


def test_a_smooth_picture_is_compressed() -> None:
    ramp = np.tile(np.arange(256, dtype=np.uint8), (256, 1))
    image = Image.fromarray(np.stack([ramp, ramp.T, ramp], axis=-1))
    assert len(encode_png(image)) < 256 * 256 * 3 // 20


@pytest.mark.parametrize("mode", ["P", "1", "I;16", "LA"])
def test_other_modes_go_through_pillow(mode: str) -> None:
    image = Image.new(mode, (5, 3))
    image.putpixel((1, 2), 255 if mode == "1" else 1)
    back = decoded(encode_png(image))
    assert back.mode == mode
    assert np.array_equal(np.asarray(back), np.asarray(image))
    assert np.asarray(back).any()


def test_the_sample_chunk_is_read_back_by_pillow() -> None:
    png = with_sample_digest(encode_png(Image.new("RGB", (4, 4), (9, 8, 7))), "0123abcd")
    assert is_png(png)
    assert decoded(png).info[SAMPLE_KEY] == "0123abcd"


def test_bytes_that_are_not_a_png_are_left_alone() -> None:
    jpeg = b"\xff\xd8\xff\xe0" + bytes(40)
    assert not is_png(jpeg)
    assert with_sample_digest(jpeg, "0123abcd") == jpeg


def test_bytes_handed_over_as_a_png_file_are_checked_whole() -> None:
    # A generator's EncodedPicture was written as the image whatever it held: cut short, a
    # JPEG, nothing at all, and then judged.
    png = encode_png(Image.new("RGB", (8, 8), (10, 20, 30)))
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    assert not_png_file(png) is None and not_png_file(buffer.getvalue()) is None
    assert not_png_file(png + b"\0" * 16) is None  # padding after the end, as decoders allow
    assert "cut short (30 bytes" in str(not_png_file(png[:30]))
    assert "not a PNG file (they begin b'\\xff\\xd8" in str(not_png_file(b"\xff\xd8\xff\xe0xx"))
    assert "not a PNG file (they begin b'')" in str(not_png_file(b""))
    assert "an object of type str was handed over" in str(not_png_file("a png"))
