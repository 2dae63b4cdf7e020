"""PNG files as the engine writes them: encoded fast, stamped with the sample they were made for.

Encoding is on the way from the device to the judge. Pillow's PNG encoder tries every row
filter on every row, which costs far more than the compression itself (its level 0 is still
20-30 ms for a 512x512 picture): 86 ms for a 512x512 photo and 348 ms for a 1024x1024 one on
a 2-core VM, more than a fast model takes to make it on a GPU. :func:`encode_png` applies one
filter in numpy and deflates at zlib's fastest level: 13 and 45 ms for the same photos, files
7-16% larger, the same pixels. Both steps run without the interpreter lock, beside a pipeline.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

if TYPE_CHECKING:
    from PIL.Image import Image

SIGNATURE = b"\x89PNG\r\n\x1a\n"

SAMPLE_KEY = "trig-stream sample"
"""The PNG text keyword under which an image records the digest of the sample it was made for."""

COMPRESSION_LEVEL = 1
"""zlib's level for :func:`encode_png`: higher levels cost 1.5x (3) to 6x (6) the time for
files 4-15% smaller (measured on a 1024x1024 photo)."""

_COLOUR_TYPES = {"L": 0, "RGB": 2, "RGBA": 6}
"""PNG's colour type for each 8-bit Pillow mode that :func:`encode_png` writes itself."""

_UP = 2
"""PNG's "Up" row filter: each byte minus the one above it."""


def encode_png(image: Image) -> bytes:
    """``image`` as the bytes of a PNG file.

    An 8-bit greyscale, RGB or RGBA picture (what generators make) is written here, with the
    "Up" filter on every row and one compressed data chunk; any other mode goes through
    Pillow. Only the pixels are kept (no text or colour-profile chunks), and the same
    picture always gives the same bytes.
    """
    colour_type = _COLOUR_TYPES.get(image.mode)
    if colour_type is None:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()
    pixels = np.asarray(image)
    height, width = pixels.shape[:2]
    flat = pixels.reshape(height, -1)
    rows = np.empty((height, flat.shape[1] + 1), dtype=np.uint8)
    rows[:, 0] = _UP
    rows[0, 1:] = flat[0]  # the row above the first one counts as zeros
    np.subtract(flat[1:], flat[:-1], out=rows[1:, 1:])  # wraps modulo 256, as PNG's filter does
    compressor = zlib.compressobj(COMPRESSION_LEVEL)
    data = compressor.compress(rows.data) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def writes_pixels_alone(mode: str) -> bool:
    """Whether :func:`encode_png` writes a picture of Pillow mode ``mode`` from its pixels
    alone (8-bit greyscale, RGB, RGBA): its mode, size and raw bytes make the same file.
    Pillow writes any other mode, and with it what the picture holds besides its pixels (a
    palette, the colour or index that is transparent, a colour profile)."""
    return mode in _COLOUR_TYPES


def is_png(data: bytes) -> bool:
    """True when ``data`` starts as a PNG file does: the signature, then the IHDR chunk (its
    fields from byte 16: width, height, bit depth at 24, colour type at 25...)."""
    return data.startswith(SIGNATURE) and data[12:16] == b"IHDR"


_IEND_END = b"IEND\xaeB`\x82"
"""The last chunk of every PNG file, bar its empty length: its type and CRC."""

TRAILING_BYTES = 64
"""Bytes after the IEND chunk that :func:`not_png_file` lets pass, as decoders do (some
writers pad a file)."""


def not_png_file(data: object) -> str | None:
    """Why ``data`` (a generator's :class:`~trig_stream.backends.base.EncodedPicture`) is not
    the bytes of a whole PNG file, or None when it is: the signature and header first, the
    IEND chunk last. A quick look, not a decoding: a file cut short lacks its end."""
    if not isinstance(data, bytes):
        return f"an object of type {type(data).__name__} was handed over where PNG bytes belong"
    if not is_png(data):
        return f"the bytes handed over are not a PNG file (they begin {bytes(data[:8])!r})"
    if _IEND_END not in data[-(len(_IEND_END) + TRAILING_BYTES) :]:
        return f"the PNG file handed over is cut short ({len(data)} bytes, no IEND chunk last)"
    return None


_SAMPLES_PER_PIXEL = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
"""Samples per pixel of each PNG colour type: grey, RGB, palette, grey and alpha, RGBA."""

_BIT_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
"""The bit depths PNG allows for each colour type."""

ADAM7 = (
    (0, 0, 8, 8),
    (4, 0, 8, 8),
    (0, 4, 4, 8),
    (2, 0, 4, 4),
    (0, 2, 2, 4),
    (1, 0, 2, 2),
    (0, 1, 1, 2),
)
"""The passes of an interlaced PNG: (first column, first row, column step, row step)."""

_INFLATE_PIECE = 1 << 20
"""Bytes inflated at a time by :func:`pixel_data_problem`: memory stays bounded whatever size
the header claims."""


def pixel_data_problem(data: bytes | BinaryIO) -> str | None:
    """Why the pixel data of the PNG file ``data`` does not decode into the picture its header
    describes, or None when it does: no IDAT chunk, a zlib stream that is broken or ends early,
    fewer bytes than the rows need, a row filter PNG does not have.

    Pillow's ``verify`` checks the chunks' CRCs but decompresses nothing, and its ``load``
    takes a zlib stream that ends early for a whole picture (the missing rows black). This
    inflates the data, piece by piece, and looks at each row's filter byte: ~3 ms of CPU for
    a 0.8 MB 512x512 PNG (bench/readme_figures.py), half of a decoding with Pillow. ``data``
    is the file's bytes or the file itself, opened for reading and seekable: a file is read a
    piece at a time from its start, so a large one is never held whole. It is assumed to pass
    :func:`is_png`; the chunks' CRCs are not checked here.
    """
    stream = io.BytesIO(data) if isinstance(data, bytes) else data
    stream.seek(0)
    width, height, depth, colour, _, _, interlace = struct.unpack(
        ">IIBBBBB", stream.read(29)[16:29]
    )
    samples = _SAMPLES_PER_PIXEL.get(colour)
    if samples is None or depth not in _BIT_DEPTHS[colour]:
        return f"its header gives colour type {colour} with bit depth {depth}, which PNG has not"
    if width == 0 or height == 0:
        return f"its header gives it {width}x{height} pixels"
    if interlace not in (0, 1):
        return f"its header gives interlace method {interlace}, which PNG has not"
    passes = ((0, 0, 1, 1),) if interlace == 0 else ADAM7
    rows: list[tuple[int, int, int]] = []  # per pass: where its rows start, how many, their size
    expected = 0
    for column, row, column_step, row_step in passes:
        pass_width = (width - column + column_step - 1) // column_step
        pass_height = (height - row + row_step - 1) // row_step
        if pass_width > 0 and pass_height > 0:
            row_size = 1 + (pass_width * samples * depth + 7) // 8  # the filter byte first
            rows.append((expected, pass_height, row_size))
            expected += pass_height * row_size
    inflater = zlib.decompressobj()
    produced, found = 0, False
    for compressed in _chunk_pieces(stream, b"IDAT"):
        found = True
        pending = compressed
        while pending and produced < expected and not inflater.eof:
            try:
                piece = inflater.decompress(pending, min(_INFLATE_PIECE, expected - produced))
            except zlib.error as exc:
                return f"its image data is no valid zlib stream ({exc})"
            if not piece and len(inflater.unconsumed_tail) == len(pending):
                break  # nothing taken, nothing given: zlib waits for the next piece
            pending = inflater.unconsumed_tail
            filters = np.frombuffer(piece, dtype=np.uint8)
            for start, count, size in rows:
                first = max(start, produced)
                first += (start - first) % size  # the next row start at or after it
                last = min(start + count * size, produced + len(piece))
                unknown = filters[first - produced : max(last - produced, 0) : size]
                if first < last and (unknown > 4).any():
                    return f"a row has filter type {int(unknown.max())} (PNG has types 0 to 4)"
            produced += len(piece)
        if produced >= expected or inflater.eof:
            break
    if not found:
        return "it has no image data (no IDAT chunk)"
    if produced < expected:
        ending = "its zlib stream ends there" if inflater.eof else "the file's data is cut short"
        return (
            f"its image data inflates to {produced} bytes where its {width}x{height} pixels "
            f"need {expected} ({ending})"
        )
    return None


def _chunk_pieces(stream: BinaryIO, kind: bytes) -> Iterator[bytes]:
    """The data of the chunks of type ``kind`` in the PNG file ``stream``, in order and in
    pieces of at most :data:`_INFLATE_PIECE` bytes (none empty), up to the IEND chunk or the
    end of the file: a chunk cut short gives the bytes it has."""
    stream.seek(len(SIGNATURE))
    while len(head := stream.read(8)) == 8:
        length, chunk = int.from_bytes(head[:4], "big"), head[4:]
        if chunk == b"IEND":
            return
        if chunk != kind:
            stream.seek(length + 4, os.SEEK_CUR)  # its data and CRC
            continue
        left = length
        while left > 0:
            piece = stream.read(min(left, _INFLATE_PIECE))
            if not piece:
                return
            yield piece
            left -= len(piece)
        stream.seek(4, os.SEEK_CUR)  # its CRC


REWRITE_KEY = "trig-stream prompt rewrite"
"""The text chunk holding how the prompt was rewritten (a PromptRewrite as JSON), when it was:
an image reused by a later run keeps that record."""


PIXELS_KEY = "trig-stream pixel data"
"""The text chunk saying, with :data:`PIXELS_WHOLE`, that the engine wrote this file knowing its
pixel data whole (encoded by it, or checked by :func:`pixel_data_problem`): a resumed run then
reuses it without inflating it again, its chunks' CRCs (Pillow's ``verify``) sufficing, as
the file was written whole by an atomic rename. An image without it (copied as-is before its
pixels were checked, or put into the run directory by hand) is inflated."""

PIXELS_WHOLE = "whole"


def with_sample_digest(
    png: bytes, label: str, rewrite: str | None = None, *, pixels_whole: bool = False
) -> bytes:
    """``png`` with a text chunk naming the sample it was made for (:data:`SAMPLE_KEY`):
    ``label``, its digest and who it was made for (see
    :attr:`trig_stream.pipeline.WorkItem.image_label`), in ASCII.

    A resumed run reuses an image left on disk only for the sample it was made for: one
    written just before a crash, then its record edited, must not be judged against the new
    prompt. The chunk goes right after the header, where a reader meets it on opening.
    ``pixels_whole``: the caller knows the pixel data whole, which :data:`PIXELS_KEY` records.

    Text chunks under the engine's own keys that ``png`` already holds (a generator's bytes,
    an image of another run) are dropped first: Pillow keeps the last chunk of a key, so such
    a chunk would speak for this file in place of the engine's word.
    """
    header_end = len(SIGNATURE) + 25  # IHDR: length, type, 13 bytes, CRC
    if not is_png(png):
        return png  # not a PNG as written here: leave it as it is
    png = _without_engine_text(png)
    text = SAMPLE_KEY.encode("latin-1") + b"\x00" + label.encode("ascii")
    chunks = _chunk(b"tEXt", text)
    if rewrite is not None:  # JSON written in ASCII (escapes for the rest), as tEXt wants
        chunks += _chunk(b"tEXt", REWRITE_KEY.encode("latin-1") + b"\x00" + rewrite.encode("ascii"))
    if pixels_whole:
        chunks += _chunk(b"tEXt", f"{PIXELS_KEY}\x00{PIXELS_WHOLE}".encode("latin-1"))
    return png[:header_end] + chunks + png[header_end:]


_TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")
"""PNG's text chunks: each begins with its keyword, ended by a zero byte."""

_ENGINE_KEYWORDS = frozenset(key.encode("latin-1") for key in (SAMPLE_KEY, REWRITE_KEY, PIXELS_KEY))


def _without_engine_text(png: bytes) -> bytes:
    """``png`` without its text chunks under :data:`SAMPLE_KEY`, :data:`REWRITE_KEY` or
    :data:`PIXELS_KEY`, up to the IEND chunk; the same bytes when it has none. Only the
    chunks' headers are read (a few per file), so the write path stays as fast."""
    kept: list[bytes] = []
    start, offset = 0, len(SIGNATURE)
    while offset + 12 <= len(png):
        length = int.from_bytes(png[offset : offset + 4], "big")
        kind = png[offset + 4 : offset + 8]
        end = offset + 12 + length
        if kind == b"IEND" or end > len(png):
            break  # the rest stays as it is, a cut-short chunk too
        # A keyword has at most 79 bytes; Pillow reads one without its zero byte as the body.
        head = png[offset + 8 : min(end - 4, offset + 88)] if kind in _TEXT_CHUNKS else b""
        keyword = head.split(b"\0", 1)[0]
        if keyword in _ENGINE_KEYWORDS:
            kept.append(png[start:offset])
            start = end
        offset = end
    if not kept:
        return png
    return b"".join(kept) + png[start:]


def _chunk(kind: bytes, body: bytes) -> bytes:
    # A PNG chunk: length, type, body, and the CRC of type and body.
    crc = zlib.crc32(body, zlib.crc32(kind))
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)
