"""A p2p or s2p sample's source image, found and checked as its record is read: the picture's
bytes embedded in the record, or a file under ``[dataset] image_root`` that its ``img_id`` (or
the path in its image column) names. A record is refused for it (:class:`Rejected`, with the
reason) when it has none, names it with inline image text or a path that leaves the folder,
or when the picture is missing, is no file, does not decode whole or is too small to edit.
"""

from __future__ import annotations

import io
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trig_stream.dimensions import Task
from trig_stream.pillow_warnings import quiet_pillow
from trig_stream.record_checks import Rejected

NAME_SHOWN = 80
"""Characters of a source image's name a reason quotes whole; a longer one is cut to its
start and its length (inline image text runs to hundreds of thousands)."""


def quoted(name: str) -> str:
    """``name`` quoted for a quarantine reason, cut short past :data:`NAME_SHOWN` characters."""
    if len(name) <= NAME_SHOWN:
        return repr(name)
    return f"{name[:60]!r}... ({len(name)} characters)"


_BASE64 = re.compile(r"[A-Za-z0-9+/\s]+={0,2}\s*")
"""Text in base64's alphabet (line breaks allowed), padded at its end."""

_BASE64_IMAGE_STARTS = ("iVBORw0KGgo", "/9j/", "R0lGOD", "UklGR")
"""How base64 of a PNG, JPEG, GIF or WebP (RIFF) file begins."""

BASE64_LENGTH = 256
"""Characters from which text in base64's alphabet is taken for inline image data rather than
a name: a file name has 255 bytes at most, and a path that long without a dot (no file
extension) is no name a dataset gives."""


def _inline_image(name: str) -> str | None:
    """What ``name`` is when it is a picture written as text, not a file's name: "a data: URL"
    or "base64 text"; None otherwise."""
    start = name.lstrip()
    if start[:5].lower() == "data:":
        return "a data: URL"
    if _BASE64.fullmatch(start) and (
        len(start) >= BASE64_LENGTH or (len(start) >= 64 and start.startswith(_BASE64_IMAGE_STARTS))
    ):
        return "base64 text"
    return None


SOURCE_MIN_SIDE = 8
"""Fewest pixels a source image has on a side. An editing model's VAE shrinks a picture 8
times: a smaller one fails every call of it (height and width must be > 0), which stops the
run as the generator's fault after its first calls, not the sample's."""


def _check_decodable(source: Path | bytes, what: str) -> None:
    """Reject a source image that is truncated, not an image, or too small to edit.

    It is decoded in full (``verify`` checks a PNG's chunks but no other format's data: a
    truncated JPEG, WebP or GIF passed, to fail at every generation and every
    ``--retry-errors``), and a PNG's pixel data is inflated as the generator's decoding
    inflates it (:func:`trig_stream.png.pixel_data_problem`): Pillow's ``load`` takes a zlib
    stream that ends early for a whole picture, its missing rows black, which the generator
    refuses. The pixels are not kept: this runs in the dataset thread, ahead of the
    generators, and a decoded picture in every buffered sample would take several times the
    memory of its file.
    """
    from PIL import Image, UnidentifiedImageError

    # A file is handed to Pillow open, not read first: a large file that is no image is
    # refused from its header, and a picture's bytes are not held beside its pixels.
    try:
        file = source.open("rb") if isinstance(source, Path) else io.BytesIO(source)
    except OSError as exc:
        raise Rejected(f"{what} cannot be read: {exc.strerror or exc}") from None
    # Pillow warns on stderr of a picture of 89-179 megapixels, which it decodes all the same
    # (a larger one raises DecompressionBombError, reported below): such a source picture is
    # resized as any other, and the warning's raw lines said nothing of use.
    quiet_pillow()
    try:
        with file, Image.open(file) as image:
            width, height = image.size
            if min(width, height) < SOURCE_MIN_SIDE:
                raise Rejected(
                    f"{what} is {width}x{height} pixels: under {SOURCE_MIN_SIDE} on a side, "
                    "too small for an image-editing model"
                )
            if image.format == "PNG":
                # After Pillow's size check: a bomb is refused before it is inflated. The
                # file is read through a second handle a piece at a time, leaving Pillow's
                # position in it alone.
                problem = _png_problem(source)
                if problem is not None:
                    raise Rejected(f"{what} is not a readable PNG: {problem}; replace the file")
            image.load()
    except UnidentifiedImageError:
        if _is_empty(source):
            # As the generator's own decoding says it: "no image" hid that nothing is there.
            raise Rejected(f"{what} is empty (0 bytes)") from None
        raise Rejected(f"{what} is no image Pillow can read") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        if isinstance(exc, Rejected):  # a ValueError: the size or the PNG data, said above
            raise
        # DecompressionBombError: more pixels than Pillow agrees to decode (a bomb, or a
        # picture far larger than any model takes).
        raise Rejected(f"{what} cannot be decoded: {exc}") from None


def _is_empty(source: Path | bytes) -> bool:
    if isinstance(source, bytes):
        return not source
    try:
        return source.stat().st_size == 0
    except OSError:
        return False


def _png_problem(source: Path | bytes) -> str | None:
    """Why the PNG ``source`` (a file, or bytes already in memory) has pixel data that does not
    decode whole, or None when it decodes (see :func:`trig_stream.png.pixel_data_problem`)."""
    from trig_stream.png import is_png, pixel_data_problem

    if isinstance(source, bytes):
        return pixel_data_problem(source) if is_png(source) else None
    with source.open("rb") as file:
        return pixel_data_problem(file) if is_png(file.read(16)) else None


IMAGE_PATH = "image path"


def source_name(raw: Mapping[str, Any]) -> tuple[object, str]:
    """A record's source image name, and what gave it: its ``img_id`` or, with none, the path
    its image column holds in place of the picture's bytes (a Hugging Face ``Image`` not
    embedded, ``{"bytes": None, "path": ...}``; JSON Lines' ``"image": "name.png"``), looked
    up under ``image_root`` as an ``img_id`` is."""
    img_id = raw.get("img_id")
    if img_id is not None and img_id != "":  # 0 or False is an img_id of the wrong type
        return img_id, "img_id"
    image = raw.get("image")
    if isinstance(image, Mapping):
        if image.get("bytes"):
            return "", "img_id"
        image = image.get("path")
    if isinstance(image, str) and image:
        return image, IMAGE_PATH
    return "", "img_id"


def _no_source_image(raw: Mapping[str, Any], task: Task) -> str:
    """Why a record without an ``img_id`` has no source image: an image field of a type that
    holds none is named (said as "no image", it looked absent)."""
    image = raw.get("image")
    field = "image"
    if isinstance(image, Mapping):
        image, field = image.get("bytes"), "image.bytes"
    if image is not None and not isinstance(image, bytes | bytearray | str):
        return (
            f"{task} sample has no source image: {field} is {type(image).__name__} "
            f"{str(image)[:40]!r}, "
            "where the picture's bytes, a {bytes, path} mapping or a path under "
            "[dataset] image_root is expected (or give an img_id)"
        )
    if isinstance(image, bytes | bytearray | str) and not image and field == "image.bytes":
        return (
            f"{task} sample has no source image: image.bytes is empty and image.path names "
            "no file (embed the picture's bytes, or give an img_id)"
        )
    if field == "image.bytes" and isinstance(image, str) and image:
        return (
            f"{task} sample has no source image: image.bytes is text, not the picture's "
            "bytes (or give an img_id)"
        )
    return f"{task} sample has no source image (no image, no img_id)"


def source_image(
    raw: Mapping[str, Any], img_id: str, via: str, task: Task, root: Path | None
) -> tuple[Path | None, bytes | None]:
    """The source image of a p2p / s2p record: its embedded bytes (checked), else the file its
    name (``img_id``, or the path in its image column: ``via`` says which, as
    :func:`source_name` gives it) names under ``root`` (``[dataset] image_root``), checked.

    Returns:
        The file's path and None, or None and the embedded bytes.

    Raises:
        Rejected: there is none, or it cannot be read or decoded, or is too small to edit.
    """
    embedded = raw.get("image")
    if isinstance(embedded, Mapping):
        embedded = embedded.get("bytes")
    if isinstance(embedded, bytes | bytearray) and embedded:
        data = bytes(embedded)
        _check_decodable(data, "embedded source image")
        return None, data
    if not img_id:
        raise Rejected(_no_source_image(raw, task))
    shown = quoted(img_id)
    inline = _inline_image(img_id)
    if inline is not None:
        field = "img_id" if via != IMAGE_PATH else "image"
        if field == "image" and isinstance(raw.get("image"), Mapping):
            field = "image.path"
        raise Rejected(
            f"{field} holds {inline} ({shown}), not the picture's bytes or a file name: "
            "decode it into the picture's bytes in the dataset (image = {bytes, path}), "
            "or save it as a file under [dataset] image_root and name that file by img_id"
        )
    if root is None:
        if via == IMAGE_PATH:
            raise Rejected(
                f"the image column holds a path, {shown}, not the picture's bytes: set "
                "[dataset] image_root to the folder it is in (the path is looked up there)"
            )
        raise Rejected(f"img_id {shown} given but [dataset] image_root is not set")
    candidate = root / img_id
    if img_id.endswith(("/", "/.")):
        # Path drops the trailing slash: "a.png/" was looked up, and read, as "a.png".
        raise Rejected(
            f"{via} {shown} ends as a folder's path does, not a file's name: name the "
            "image file itself, without the trailing '/'"
        )
    if Path(img_id).is_absolute() or ".." in Path(img_id).parts or "\0" in img_id:
        raise Rejected(
            f"{via} {shown} is not a plain file name"
            + (" (a path relative to [dataset] image_root is)" if via == IMAGE_PATH else "")
        )
    try:
        mode = candidate.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise Rejected(f"source image {shown} not found in {root}") from None
    except OSError as exc:  # a name too long for the file system, no permission, EIO
        raise Rejected(
            f"source image {shown} cannot be looked up ({exc.strerror or exc}) in {root}"
        ) from None
    if not stat.S_ISREG(mode):
        raise Rejected(f"source image {shown} in {root} is not a file")
    _check_decodable(candidate, f"source image {shown}")
    return candidate, None
