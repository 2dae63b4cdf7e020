"""An image an earlier run left in the run directory, taken again rather than made again.

A resumed run (or one that adds a judge) finds most of its images on disk. One is taken when
it is whole and was made for the same work item: its PNG chunks name the model, data_id and
seed it was made for, and say whether the engine wrote it knowing its pixels whole.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from trig_stream.png import (
    PIXELS_KEY,
    PIXELS_WHOLE,
    REWRITE_KEY,
    SAMPLE_KEY,
    is_png,
    pixel_data_problem,
)
from trig_stream.records import PromptRewrite


@dataclass(frozen=True, slots=True)
class Reusable:
    """An image on disk a work item can take, and how its prompt was rewritten, if it was."""

    prompt_rewrite: PromptRewrite | None


def reusable_image(path: Path, label: str | None = None) -> Reusable | None:
    """What ``path`` holds when it is a complete image file, whose pixel data decodes in full
    (see :func:`~trig_stream.png.pixel_data_problem`; one the engine wrote knowing it whole,
    see :data:`~trig_stream.png.PIXELS_KEY`, is taken on its chunks' CRCs), made for the work item
    whose :attr:`~trig_stream.pipeline.WorkItem.image_label` is ``label``; else None.

    With a ``label``, an image that records none (no ``trig-stream sample`` chunk) is not
    taken: every image a run writes records one, so it was put there by hand (another
    sample's image re-saved by an editor, which drops the chunk) and is made again. An image
    that records its sample's digest alone was written before labels named the model, data_id
    and seed; it is taken when the digest matches, so that a run begun then resumes without
    making its images again.
    """
    if not path.is_file():
        return None
    from PIL import Image

    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            made_for: str | None = image.info.get(SAMPLE_KEY)
            rewrite: str | None = image.info.get(REWRITE_KEY)
            whole = made_for is not None and image.info.get(PIXELS_KEY) == PIXELS_WHOLE
            image.verify()  # each chunk's CRC; it decompresses nothing
    except Exception:  # whatever Pillow raises on a damaged file (IndexError: no IDAT)
        return None
    if label is not None and (made_for is None or made_for not in (label, label.partition(" ")[0])):
        return None
    # Inflating costs ~15 ms for a 1024x1024 image, verify ~1 ms: an image the engine wrote
    # knowing its pixels whole (written whole, by an atomic rename) is taken on its CRCs.
    if not whole and is_png(data) and pixel_data_problem(data) is not None:
        return None  # copied before its pixels were checked, or put here by hand: made again
    try:
        return Reusable(None if rewrite is None else PromptRewrite.model_validate_json(rewrite))
    except ValueError:  # a chunk edited by hand: the image stands, its rewrite is unknown
        return Reusable(None)
