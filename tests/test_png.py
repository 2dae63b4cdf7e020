"""The PNG files the engine writes: fast encoding that keeps every pixel, the sample chunk."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from trig_stream.png import (
    ADAM7,
    PIXELS_KEY,
    PIXELS_WHOLE,
    REWRITE_KEY,
    SAMPLE_KEY,
    SIGNATURE,
    encode_png,
    is_png,
    not_png_file,
    pixel_data_problem,
    with_sample_digest,
)

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


def text_chunk(kind: bytes, key: str, value: str) -> bytes:
    """A PNG text chunk of ``kind`` (tEXt, zTXt or iTXt) saying ``value`` under ``key``."""
    body = key.encode("latin-1") + b"\0"
    if kind == b"tEXt":
        body += value.encode("latin-1")
    elif kind == b"zTXt":
        body += b"\0" + zlib.compress(value.encode("latin-1"))
    else:  # iTXt: not compressed, no language, no translated keyword
        body += b"\0\0\0\0" + value.encode("utf-8")
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def test_the_engines_text_chunks_a_png_already_holds_are_dropped() -> None:
    # Pillow keeps the last chunk of a key: a `trig-stream pixel data: whole` or `trig-stream
    # sample` chunk in the bytes handed over outvoted the engine's own, so a broken picture
    # was reused unchecked, or taken for another sample.
    png = encode_png(Image.new("RGB", (4, 4), (9, 8, 7)))
    head = len(SIGNATURE) + 25  # after IHDR
    theirs = [
        text_chunk(b"tEXt", PIXELS_KEY, PIXELS_WHOLE),
        text_chunk(b"zTXt", SAMPLE_KEY, "ffff0000 theirs"),
        text_chunk(b"iTXt", REWRITE_KEY, '{"forged": true}'),
        text_chunk(b"tEXt", "Comment", "kept"),
        b"\0\0\0\x16tEXt"
        + PIXELS_KEY.encode()
        + zlib.crc32(b"tEXt" + PIXELS_KEY.encode()).to_bytes(4, "big"),
    ]
    end = png.index(b"IEND") - 4
    # Before the pixel data and after it (where Pillow reads them on loading).
    foreign = png[:head] + b"".join(theirs[:3]) + png[head:end] + b"".join(theirs[3:]) + png[end:]
    assert decoded(foreign).info.keys() >= {PIXELS_KEY, SAMPLE_KEY, REWRITE_KEY}
    stamped = with_sample_digest(foreign, "0123abcd")
    info = decoded(stamped).info
    assert info[SAMPLE_KEY] == "0123abcd"
    assert PIXELS_KEY not in info and REWRITE_KEY not in info
    assert info["Comment"] == "kept"
    assert stamped == with_sample_digest(png[:end] + theirs[3] + png[end:], "0123abcd")
    # The engine's own file, stamped again, comes out as stamped once.
    assert with_sample_digest(with_sample_digest(png, "x", "{}", pixels_whole=True), "y") == (
        with_sample_digest(png, "y")
    )


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


def png_with_image_data(data: bytes | None, size: tuple[int, int] = (32, 32)) -> bytes:
    """An 8-bit RGB PNG file of ``size`` whose only IDAT chunk holds ``data`` (none for None),
    every chunk with its right CRC: damage that Pillow's ``verify`` cannot see."""
    header = struct.pack(">IIBBBBB", *size, 8, 2, 0, 0, 0)
    chunks = [(b"IHDR", header)] + ([] if data is None else [(b"IDAT", data)]) + [(b"IEND", b"")]
    return SIGNATURE + b"".join(
        struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        for kind, body in chunks
    )


def rgb_rows(size: tuple[int, int] = (32, 32), filter_type: int = 0) -> bytes:
    """The filtered rows of a noisy 8-bit RGB picture of ``size``, each led by ``filter_type``."""
    width, height = size
    pixels = np.random.default_rng(7).integers(0, 256, (height, width * 3), dtype=np.uint8)
    return b"".join(bytes([filter_type]) + row.tobytes() for row in pixels)


BROKEN_IMAGE_DATA = {
    "zlib stream cut in half": zlib.compress(rgb_rows())[: len(zlib.compress(rgb_rows())) // 2],
    "random bytes": np.random.default_rng(3).integers(0, 256, 900, dtype=np.uint8).tobytes(),
    "unknown row filter": zlib.compress(rgb_rows(filter_type=9)),
    "half the rows": zlib.compress(rgb_rows()[: len(rgb_rows()) // 2]),
}
"""IDAT payloads with every CRC right and the pixels broken, and a word on what is wrong."""


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("zlib stream cut in half", "inflates to"),
        ("random bytes", "no valid zlib stream"),
        ("unknown row filter", "a row has filter type 9 (PNG has types 0 to 4)"),
        ("half the rows", "inflates to 1552 bytes where its 32x32 pixels need 3104"),
    ],
)
def test_pixel_data_that_does_not_decode_is_named(damage: str, reason: str) -> None:
    broken = png_with_image_data(BROKEN_IMAGE_DATA[damage])
    with Image.open(io.BytesIO(broken)) as image:
        image.verify()  # what Pillow checks passes
    assert reason in str(pixel_data_problem(broken))
    assert pixel_data_problem(io.BytesIO(broken)) == pixel_data_problem(broken)  # as a file


def test_a_png_without_image_data_is_named() -> None:
    assert pixel_data_problem(png_with_image_data(None)) == "it has no image data (no IDAT chunk)"


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "1", "I;16"])
@pytest.mark.parametrize("size", [(1, 1), (3, 2), (37, 53)])
def test_every_kind_of_whole_png_decodes(mode: str, size: tuple[int, int]) -> None:
    width, height = size
    noise = np.random.default_rng(5).integers(0, 256, (height, width, 3), dtype=np.uint8)
    picture = Image.fromarray(noise)
    if mode == "I;16":
        picture = Image.fromarray(noise[..., 0].astype(np.uint16) * 257)
    else:
        picture = picture.convert(mode)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    assert pixel_data_problem(buffer.getvalue()) is None
    assert pixel_data_problem(png_with_image_data(zlib.compress(rgb_rows((9, 4))), (9, 4))) is None


def interlaced_png(size: tuple[int, int], depth: int, colour: int, short: int = 0) -> bytes:
    """An Adam7-interlaced PNG of ``size``, noisy, written byte by byte (Pillow's writer
    ignores ``interlace=`` and writes every PNG progressive), its pixel data ``short`` bytes
    short of whole. Its zlib stream is split over several IDAT chunks, as encoders do."""
    width, height = size
    samples = {0: 1, 2: 3, 3: 1}[colour]
    noise = np.random.default_rng(11)
    rows = b""
    for column, row, column_step, row_step in ADAM7:
        pass_width = (width - column + column_step - 1) // column_step
        pass_height = (height - row + row_step - 1) // row_step
        if pass_width > 0 and pass_height > 0:
            row_size = (pass_width * samples * depth + 7) // 8
            for _ in range(pass_height):
                rows += bytes([int(noise.integers(0, 5))])  # filter types 0 to 4
                rows += noise.integers(0, 256, row_size, dtype=np.uint8).tobytes()
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 1)
    stream = zlib.compress(rows[: len(rows) - short])
    chunks = [(b"IHDR", header)]
    if colour == 3:  # a palette of as many entries as the bit depth can index
        chunks.append((b"PLTE", noise.integers(0, 256, 3 << depth, dtype=np.uint8).tobytes()))
    chunks += [(b"IDAT", stream[i : i + 40]) for i in range(0, len(stream), 40)]
    chunks.append((b"IEND", b""))
    return SIGNATURE + b"".join(
        struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        for kind, body in chunks
    )


@pytest.mark.parametrize(
    ("depth", "colour"),
    [(16, 2), (2, 0), (1, 3)],
    ids=["16-bit RGB", "2-bit grey", "1-bit palette"],
)
@pytest.mark.parametrize("size", [(1, 1), (3, 5), (17, 9)], ids=["1x1", "3x5", "17x9"])
def test_a_whole_interlaced_png_decodes(depth: int, colour: int, size: tuple[int, int]) -> None:
    # Every case Pillow was asked to interlace was written progressive: none of them tested
    # the reading of Adam7's passes.
    data = interlaced_png(size, depth, colour)
    assert data[28] == 1  # the header says Adam7
    with Image.open(io.BytesIO(data)) as image:
        image.load()  # Pillow decodes it in full
        assert image.size == size
    assert pixel_data_problem(data) is None
    assert pixel_data_problem(io.BytesIO(data)) is None  # its 40-byte chunks read from a file
    # One byte short of its seven passes (more bytes than the same picture's rows): refused.
    short = interlaced_png(size, depth, colour, short=1)
    assert "inflates to" in str(pixel_data_problem(short))
    assert pixel_data_problem(io.BytesIO(short)) == pixel_data_problem(short)
