"""The folder names `trig-stream make-tiny-models` gives the tiny models it builds, and the
hint an error about a missing model folder adds when the folder bears one of them.

Apart from ``trig_stream.testing``: the backends name it in their errors, and importing the
builders (diffusers and transformers code) for that would make type checkers and readers of
a backend follow them.
"""

from __future__ import annotations

from pathlib import Path

TINY_MODELS = ("flux", "sd", "instruct_pix2pix", "vlm")


def build_hint(folder: Path) -> str:
    """For an error naming ``folder``, a model's folder that is not there: when it bears a
    tiny model's name (the demo's configs name them before they are built), a clause naming
    the command that builds them; else nothing."""
    if folder.name not in TINY_MODELS:
        return ""
    return f" (one of the tiny models? `trig-stream make-tiny-models {folder.parent}` builds them)"
