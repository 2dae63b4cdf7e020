"""The images of a request to the loopback judge: their URLs read, their bytes checked.

A request the server cannot take raises :class:`BadRequest`, which the server answers with an
OpenAI-shaped 400.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage


class BadRequest(Exception):
    """A request the server refuses with a 400."""


def image_url(value: Any) -> str:
    """The URL of an image part's ``image_url``: ``{"url": ...}``, or the URL itself (as vLLM
    accepts)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("url"), str):
        return str(value["url"])
    raise BadRequest(
        'an image_url part needs \'image_url\': {"url": "data:..."} (or the URL as a '
        f"string), got {str(value)[:80]}"
    )


def image_bytes(url: str, allowed_folder: Path | None) -> bytes:
    """The bytes of a ``data:`` or ``file://`` image URL (a file in ``allowed_folder`` only)."""
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if not header.endswith(";base64"):
            raise BadRequest("image data URLs must be base64")
        try:
            data = base64.b64decode(payload, validate=True)
        except ValueError:
            raise BadRequest("the image data URL is not valid base64") from None
    elif url.startswith("file://"):
        path = Path(unquote(urlparse(url).path))
        if allowed_folder is None:
            raise BadRequest("cannot load local files without `--allowed-local-media-path`")
        if allowed_folder.resolve() not in path.resolve().parents:
            raise BadRequest(
                f"the file path {path} must be a subpath of `--allowed-local-media-path` "
                f"{allowed_folder}"
            )
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise BadRequest(f"cannot read the image file: {exc.strerror}") from None
    else:
        raise BadRequest("image URLs must be data: or file:// URLs")
    return data


def verify_image(data: bytes) -> None:
    """Check that ``data`` is an image Pillow decodes and not a decompression bomb."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
    except Image.DecompressionBombError as exc:  # a header claiming billions of pixels
        raise BadRequest(f"the image is too large: {exc}") from None
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError):
        raise BadRequest("the image cannot be decoded") from None


def as_vllm_sees(image: PILImage) -> PILImage:
    """``image`` in RGB as vLLM makes it (``vllm.multimodal.image.convert_image_mode``): an
    RGBA image flattened onto white, any other mode converted plainly, so that what lies
    under a transparent pixel of an LA, palette or RGB image shows."""
    from PIL import Image

    if image.mode == "RGB":
        return image
    if image.mode == "RGBA":
        flat = Image.new("RGB", image.size, (255, 255, 255))
        flat.paste(image, mask=image.getchannel("A"))
        return flat
    return image.convert("RGB")
