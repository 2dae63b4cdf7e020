"""Keeping the model libraries' own output (progress bars, advice) off the terminal.

transformers, diffusers and the Hugging Face hub print progress bars on every load and
advice on imports (``CLIPImageProcessor requires torchvision ...``) that says nothing about a
run. Each reads its switch from the environment, so the commands (``run``, ``validate``,
``make-tiny-models``) set these defaults before anything imports them. A variable already set
wins (set ``TRANSFORMERS_VERBOSITY=warning`` to see the advice again): errors are never
hidden. An application embedding the engine keeps its process's environment and its
libraries' logging as it set them: the engine never sets these there.
"""

from __future__ import annotations

import os
from typing import Final

QUIET_LIBRARIES: Final = {
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}
"""The environment variables that quiet the model libraries, with their quiet values."""


def quiet_model_libraries() -> None:
    """Set :data:`QUIET_LIBRARIES` where unset; call before importing a model library."""
    for name, value in QUIET_LIBRARIES.items():
        os.environ.setdefault(name, value)
