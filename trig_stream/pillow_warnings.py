"""Pillow's warnings that the engine keeps off a run's output, by process-wide filters.

Pillow prints a DecompressionBombWarning for a picture of 89-179 megapixels, which it decodes
all the same (a larger one raises DecompressionBombError, which the engine reports), and
UserWarnings from its TIFF reader about EXIF data it skips ("Corrupt EXIF data"; the picture
itself is fine), and a UserWarning each time a palette picture whose transparency is a table
of bytes (a PNG's tRNS chunk) is converted to RGB ("Palette images with Transparency expressed
in bytes should be converted to RGBA images"): the engine drops that transparency on purpose,
as vLLM does (what lies under a transparent pixel shows). Their raw lines say nothing of use
in a run's output.

They are filtered by entries in the process's ``warnings.filters``, added once and never taken
out. ``warnings.catch_warnings`` is no way to do it: it saves and restores that one
process-wide list, so in worker threads a thread leaving it while another is inside showed the
other's warning, left its ``ignore`` in place for good, and undid filters other threads added
meanwhile. An application that embeds the engine and wants these warnings shown adds its own
filter for them after the engine's (``warnings.simplefilter("always")`` shows them again).
"""

from __future__ import annotations

import re
import threading
import warnings

_TIFF_READER = r"PIL\.TiffImagePlugin\Z"
"""The module whose warnings are about metadata Pillow skips (EXIF is a TIFF directory)."""

_PALETTE_TRANSPARENCY = r"Palette images with Transparency expressed in bytes"
"""The start of the warning ``Image.convert`` gives when it drops a palette's transparency."""

_adding = threading.Lock()


def quiet_pillow() -> None:
    """Make sure the process's warning filters ignore Pillow's DecompressionBombWarning, its
    TIFF reader's UserWarnings and its warning of a palette's transparency dropped (see the
    module's docstring).

    Cheap (a look through ``warnings.filters``) and changes nothing when they are there: call
    it before each decoding, as ``warnings.catch_warnings`` around the caller (pytest puts one
    around each test) takes them out again when it ends.
    """
    from PIL import Image

    wanted = (
        (Image.DecompressionBombWarning, "", ""),
        (UserWarning, "", _TIFF_READER),
        (UserWarning, _PALETTE_TRANSPARENCY, ""),
    )
    if all(_present(*filtered) for filtered in wanted):
        return
    with _adding:  # two threads that find one missing add it once
        for category, message, module in wanted:
            if not _present(category, message, module):
                warnings.filterwarnings("ignore", message=message, category=category, module=module)


def _present(category: type[Warning], message: str, module: str) -> bool:
    # The entry warnings.filterwarnings("ignore", ...) makes, as Python 3.11-3.13 write it.
    entry = (
        "ignore",
        re.compile(message, re.IGNORECASE) if message else None,
        category,
        re.compile(module) if module else None,
        0,
    )
    return entry in warnings.filters
