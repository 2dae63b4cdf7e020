"""Decoding the pictures a generator starts from: p2p source images, s2p reference images."""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from trig_stream.backends.base import EncodedPicture
from trig_stream.errors import ItemError
from trig_stream.pillow_warnings import quiet_pillow

if TYPE_CHECKING:
    from PIL.Image import Image

    from trig_stream.records import Sample


def open_image(path: Path) -> Image:
    """Decode an image file completely, as RGB.

    Raises:
        ItemError: the file is missing, truncated or not an image; the message says which.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ItemError(f"image file {path} does not exist") from None
    except OSError as exc:
        raise ItemError(f"cannot read image {path}: {exc.strerror or exc}") from None
    if not data:  # say so, not "cannot identify"
        raise ItemError(f"image file {path} is empty (0 bytes)")
    return decode(data, f"cannot read image {path}")


def decode(data: bytes, unreadable: str) -> Image:
    """Decode an image file's bytes completely, as RGB and upright.

    Raises:
        ItemError: ``data`` is truncated, not an image, or a PNG whose pixel data does not
            decode (see :func:`trig_stream.png.pixel_data_problem`); the message is
            ``unreadable`` ("cannot read image x.png"), then which.
    """
    from PIL import Image as PILImage

    from trig_stream.png import is_png, pixel_data_problem

    quiet_pillow()  # a picture of 89-179 megapixels is decoded as any other
    try:
        with PILImage.open(io.BytesIO(data)) as image:
            # Pillow's own size check has run: a bomb is refused before it is inflated.
            problem = pixel_data_problem(data) if is_png(data) else None
            if problem is None:
                image.load()
                return rgb(upright(image))
    except PILImage.DecompressionBombError as exc:
        raise ItemError(f"{unreadable}: {exc}") from None
    except Exception as exc:
        # OSError, SyntaxError, ValueError, and whatever else Pillow raises on a damaged
        # file (an IndexError for a PNG with no image data): the file's failure, never the
        # generator's.
        raise ItemError(f"{unreadable}: {_reason(exc)}") from None
    raise ItemError(f"{unreadable}: not a readable PNG: {problem}; replace the file")


def _reason(exc: Exception) -> str:
    from PIL import UnidentifiedImageError

    if isinstance(exc, UnidentifiedImageError):  # its text names an io.BytesIO at an address
        return "it is no image Pillow can read"
    if isinstance(exc, OSError | SyntaxError | ValueError):
        return str(exc)
    return f"Pillow cannot decode it ({type(exc).__name__}: {exc})"


def png_as_is(path: Path) -> EncodedPicture | None:
    """The file's bytes, when the engine can store them as they are: a still 8-bit RGB PNG
    whose chunks check out (each CRC, through the end chunk) and whose pixel data decodes
    in full (see :func:`trig_stream.png.pixel_data_problem`), that names no sample of its
    own (an image of an earlier run; see :func:`trig_stream.png.with_sample_digest`) and that
    is shown as stored (no EXIF orientation turns it; one unreadable does not).
    None otherwise, including when the file cannot be read: :func:`open_image` then decodes
    it, or says what is wrong with it.
    """
    from PIL import Image as PILImage

    from trig_stream.png import SAMPLE_KEY, is_png, pixel_data_problem

    try:
        data = path.read_bytes()
    except OSError:
        return None
    if not is_png(data) or data[24:26] != b"\x08\x02":  # bit depth 8, colour type 2 (RGB)
        return None
    if _png_orientation(data) not in (None, 1):
        return None  # shown turned: decoded, to be stored upright
    quiet_pillow()
    try:
        with PILImage.open(io.BytesIO(data)) as image:
            if SAMPLE_KEY in image.info or getattr(image, "is_animated", False):
                return None  # an earlier run's image, or an animated PNG: decode it
            image.verify()  # each chunk's CRC, through IEND; it decompresses nothing
    except Exception:  # whatever Pillow raises on a damaged file (IndexError: no IDAT)
        return None
    if pixel_data_problem(data) is not None:
        return None
    return EncodedPicture(png=data, pixels_checked=True)


ORIENTATION = 0x0112
"""The EXIF tag saying how a picture is turned for display (1: as stored)."""


def upright(image: Image) -> Image:
    """``image`` turned as its EXIF Orientation tag says it is shown (a phone's JPEG is stored
    sideways with Orientation 6): the judge and the generators see what a viewer sees.
    ``image`` itself when it has no such tag, one of 1, or one that cannot be read or is no
    integer from 1 to 8 (viewers show such a picture as stored)."""
    from PIL import Image as PILImage

    orientation = _orientation(image.getexif)
    if orientation is None or orientation == 1:
        return image
    turn = {
        2: PILImage.Transpose.FLIP_LEFT_RIGHT,
        3: PILImage.Transpose.ROTATE_180,
        4: PILImage.Transpose.FLIP_TOP_BOTTOM,
        5: PILImage.Transpose.TRANSPOSE,
        6: PILImage.Transpose.ROTATE_270,
        7: PILImage.Transpose.TRANSVERSE,
        8: PILImage.Transpose.ROTATE_90,
    }
    return image.transpose(turn[orientation])


def _orientation(read_exif: Callable[[], Mapping[int, object]]) -> int | None:
    """The EXIF Orientation that ``read_exif`` finds, an integer from 1 to 8; None without one,
    and for one that cannot be read or is anything else (a rational, 9): the picture is shown
    as stored, as it was copied before orientations were read. Pillow's warnings about the
    EXIF data it skips ("Corrupt EXIF data") are kept off the run's output (see
    :mod:`trig_stream.pillow_warnings`): the picture itself is fine."""
    quiet_pillow()
    try:
        value = read_exif().get(ORIENTATION)
    except Exception:
        # Metadata Pillow cannot parse (SyntaxError "not a TIFF file", struct.error, ...)
        # says nothing of the picture, which decodes fine: its error would be the image's.
        return None
    if type(value) is not int or not 1 <= value <= 8:
        return None
    return value


def _png_orientation(data: bytes) -> int | None:
    """The EXIF Orientation in a PNG's ``eXIf`` chunk, wherever it is (see
    :func:`_orientation`); None without one."""
    from PIL import Image as PILImage

    payload = _exif_chunk(data)
    if payload is None:
        return None
    exif = PILImage.Exif()

    def read() -> Mapping[int, object]:
        exif.load(payload)
        return exif

    return _orientation(read)


def _exif_chunk(data: bytes) -> bytes | None:
    """The data of a PNG's ``eXIf`` chunk, wherever it is; None without one."""
    offset = 8
    while offset + 8 <= len(data):
        length = int.from_bytes(data[offset : offset + 4], "big")
        kind = data[offset + 4 : offset + 8]
        if kind == b"eXIf":
            return data[offset + 8 : offset + 8 + length]
        if kind == b"IEND":
            break
        offset += 12 + length
    return None


def source_image(sample: Sample, size: tuple[int, int] | None = None) -> Image:
    """The sample's source (p2p) or reference (s2p) picture, optionally resized.

    Args:
        sample: a p2p or s2p sample, with ``source_path`` or ``source_bytes``.
        size: (width, height) to resize to, or None to keep the picture's own size.

    Raises:
        ItemError: the sample has no picture, or it cannot be decoded.
    """
    from PIL import Image as PILImage

    if sample.source_path is not None:
        image = open_image(sample.source_path)
    elif sample.source_bytes is not None:
        image = decode(sample.source_bytes, f"cannot decode the embedded image of {sample.data_id}")
    else:
        raise ItemError(
            f"sample {sample.data_id} has no source image (img_id {sample.img_id!r}); "
            "set [dataset].image_root for JSON datasets"
        )
    if size is not None and image.size != size:
        image = image.resize(size, PILImage.Resampling.BICUBIC)
    return image


_DEEP_GREY = frozenset(("I", "I;16", "I;16B", "I;16L", "I;16N", "F"))
"""Grey pictures of more than 8 bits (16-bit PNGs open so, 32-bit integer or float TIFFs):
Pillow's conversion to RGB clips their values to 0-255 instead of scaling them, which turns a
16-bit one almost white and a float one (values 0 to 1) black."""


_NOMINAL_RANGES = {"F": ((0.0, 1.0), (0.0, 255.0))}
"""The ranges a deep grey picture's values are read in when they lie within one (the first
that holds them all), by mode: a float picture holds 0-1, or 8-bit values stored as floats;
every other deep mode (16 or 32-bit integers) 0-65535."""


def rgb(image: Image) -> Image:
    """``image`` as 8-bit RGB, a grey one of more than 8 bits scaled rather than clipped.

    Its values are read in the first of its mode's :data:`_NOMINAL_RANGES` that holds them
    all: 0-65535 for integers (16 bits); 0-1, else 0-255 (taken as they are), for floats.
    Values outside every one are stretched from the lowest to the highest; a picture of one
    such value throughout is clipped to the widest range (a float one's value to 0-255).
    """
    if image.mode == "RGB":
        return image
    if image.mode in _DEEP_GREY:
        import numpy as np
        from PIL import Image as PILImage

        grey = np.asarray(image, dtype=np.float64)
        finite = grey[np.isfinite(grey)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        ranges = _NOMINAL_RANGES.get(image.mode, ((0.0, 65535.0),))
        within = [(0.0, full) for _, full in ranges if low >= 0 and high <= full]
        if within:
            low, high = within[0]
        elif high == low:  # one value throughout: stretched, it would be black
            low, high = ranges[-1]
        grey = np.nan_to_num(grey, nan=low, posinf=high, neginf=low)
        scaled = (grey - low) * (255 / ((high - low) or 1.0))
        eight_bits = np.rint(np.clip(scaled, 0, 255)).astype(np.uint8)
        return PILImage.fromarray(eight_bits, mode="L").convert("RGB")
    return image.convert("RGB")
