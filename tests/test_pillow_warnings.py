"""Pillow's warnings kept off a run's output from worker threads, the process's filters intact."""

from __future__ import annotations

import io
import struct
import threading
import warnings
import zlib
from collections.abc import Mapping
from pathlib import Path

import pytest
from PIL import Image

from trig_stream.backends.generators.source_images import _orientation, decode
from trig_stream.backends.judges.payloads import encode_image
from trig_stream.backends.metrics.base import load_rgb_image
from trig_stream.errors import ItemError
from trig_stream.pillow_warnings import quiet_pillow

TIMEOUT_S = 30
"""A safety net: each wait ends on an event the other thread sets."""


def picture_of(size: tuple[int, int]) -> bytes:
    """A PNG of ``size`` pixels, its header alone: opening it runs Pillow's size check."""
    header = struct.pack(">IIBBBBB", *size, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + b"".join(
        struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        for kind, body in [(b"IHDR", header), (b"IEND", b"")]
    )


def test_threads_reading_pictures_keep_warnings_quiet_and_filters_intact(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Each read used warnings.catch_warnings, which saves and restores the one process-wide
    # filter list: thread A leaving while B was inside showed B's warnings, B's leaving then
    # left an "ignore everything" filter for good, and a filter added meanwhile was lost.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 40x40 = 1600 pixels: a warning
    large = picture_of((40, 40))
    a_in, b_in, added, a_out = (threading.Event() for _ in range(4))
    failures: list[Exception] = []

    def read_a() -> Mapping[int, object]:
        a_in.set()
        assert added.wait(TIMEOUT_S)
        return {}

    def read_b() -> Mapping[int, object]:
        b_in.set()
        assert a_out.wait(TIMEOUT_S)
        # Still reading B's EXIF: a corrupt directory, and a picture past Pillow's limit.
        exif = Image.Exif()
        exif.load(b"MM\x00\x2a\x00\x00\x00\x08\xff\xff")  # "Corrupt EXIF data"
        Image.open(io.BytesIO(large)).close()
        return exif

    def thread_a() -> None:
        try:
            _orientation(read_a)
        except Exception as exc:  # reported by the test's thread
            failures.append(exc)
        a_out.set()

    def thread_b() -> None:
        try:
            assert a_in.wait(TIMEOUT_S)
            _orientation(read_b)
        except Exception as exc:  # reported by the test's thread
            failures.append(exc)

    with warnings.catch_warnings(record=True) as caught:  # as Python shows them by default
        _orientation(dict)  # a first read: what it adds to the filters, it adds once
        before = list(warnings.filters)
        threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
        for thread in threads:
            thread.start()
        assert b_in.wait(TIMEOUT_S)
        warnings.filterwarnings("error", category=DeprecationWarning, module="mylib")
        mine = warnings.filters[0]
        added.set()
        for thread in threads:
            thread.join(TIMEOUT_S)
        after = list(warnings.filters)
    assert not failures
    assert [str(w.message) for w in caught] == []
    assert after == [mine, *before]  # the filter added meanwhile kept, nothing else changed


def test_the_filters_are_added_once_and_bombs_are_still_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with warnings.catch_warnings(record=True) as caught:
        quiet_pillow()
        once = list(warnings.filters)
        quiet_pillow()
        assert warnings.filters == once
        Image.open(io.BytesIO(picture_of((40, 40)))).close()
        assert [str(w.message) for w in caught] == []
        # Past twice the limit Pillow still refuses it, and the engine says why.
        with pytest.raises(ItemError, match="decompression bomb"):
            decode(picture_of((50, 50)), "cannot read image big.png")
        # Only Pillow's: a UserWarning of anyone else's is shown.
        warnings.warn("someone else's", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["someone else's"]


def palette_with_byte_transparency() -> bytes:
    """A palette PNG whose tRNS chunk gives each of its first colours an alpha."""
    image = Image.new("P", (40, 40))
    image.putpalette(list(range(256)) * 3)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", transparency=bytes([0, 128, 255]))
    return buffer.getvalue()


@pytest.mark.parametrize("reader", ["image_folder", "metric", "metric_shrunk", "judge_shrunk"])
def test_a_palette_transparency_dropped_on_purpose_is_not_warned_of(
    tmp_path: Path, reader: str
) -> None:
    # Converting it to RGB, as vLLM does, printed Pillow's raw "Palette images with
    # Transparency expressed in bytes should be converted to RGBA images" on the run's output.
    data = palette_with_byte_transparency()
    path = tmp_path / "palette.png"
    path.write_bytes(data)
    with Image.open(path) as opened:
        assert isinstance(opened.info["transparency"], bytes)
    with warnings.catch_warnings(record=True) as caught:  # as Python shows them by default
        if reader == "image_folder":
            assert decode(data, "cannot read image palette.png").mode == "RGB"
        elif reader.startswith("metric"):
            assert load_rgb_image(path, 400 if reader == "metric_shrunk" else None).mode == "RGB"
        else:
            assert encode_image(path, max_pixels=400).url.startswith("data:image/png")
        # Only that warning: another of the same words is shown.
        warnings.warn("Palette images of someone else's", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["Palette images of someone else's"]
