"""Pillow's warnings that the engine keeps off a run's output, by process-wide filters.

Pillow prints a DecompressionBombWarning for a picture of 89-179 megapixels, which it decodes
all the same (a larger one raises DecompressionBombError, which the engine reports), and
UserWarnings from its TIFF reader about EXIF data it skips ("Corrupt EXIF data"; the picture
itself is fine). Their raw lines say nothing of use in a run's output.

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

_adding = threading.Lock()


def quiet_pillow() -> None:
    """Make sure the process's warning filters ignore Pillow's DecompressionBombWarning and its
    TIFF reader's UserWarnings (see the module's docstring).

    Cheap (a look through ``warnings.filters``) and changes nothing when they are there: call
    it before each decoding, as ``warnings.catch_warnings`` around the caller (pytest puts one
    around each test) takes them out again when it ends.
    """
    from PIL import Image

    wanted = ((Image.DecompressionBombWarning, ""), (UserWarning, _TIFF_READER))
    if all(_present(category, module) for category, module in wanted):
        return
    with _adding:  # two threads that find one missing add it once
        for category, module in wanted:
            if not _present(category, module):
                warnings.filterwarnings("ignore", category=category, module=module)


def _present(category: type[Warning], module: str) -> bool:
    # The entry warnings.filterwarnings("ignore", ...) makes, as Python 3.11-3.13 write it.
    entry = ("ignore", None, category, re.compile(module) if module else None, 0)
    return entry in warnings.filters
