"""Keeping the model libraries' own output (progress bars, advice) off the terminal.

transformers, diffusers and the Hugging Face hub print progress bars on every load and
advice on imports (``CLIPImageProcessor requires torchvision ...``) that says nothing about a
run, and the hub's library asks huggingface.co about its User-Agent even for a model it reads
from its cache. Each reads its switch from the environment, so the commands (``run``, ``validate``,
``make-tiny-models``) set these defaults before anything imports them. A variable already set
wins (set ``TRANSFORMERS_VERBOSITY=warning`` to see the advice again): errors are never
hidden. An application embedding the engine keeps its process's environment and its
libraries' logging as it set them: the engine never sets these there. A judge server the run
starts gets its environment without those set here (:func:`environment_unquieted`): its log,
quoted when it fails, keeps its warnings.
"""

from __future__ import annotations

import os
from typing import Final

QUIET_LIBRARIES: Final = {
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    # huggingface_hub 2.x asks huggingface.co for a list of "agent harnesses" once per process
    # to write its User-Agent, local_files_only or not: a load from the cache reached the hub.
    "HF_HUB_DISABLE_TELEMETRY": "1",
}
"""The environment variables that quiet the model libraries, with their quiet values."""


_SET_HERE: set[str] = set()
"""The variables of :data:`QUIET_LIBRARIES` that :func:`quiet_model_libraries` set."""


def quiet_model_libraries() -> None:
    """Set :data:`QUIET_LIBRARIES` where unset; call before importing a model library."""
    for name, value in QUIET_LIBRARIES.items():
        if name not in os.environ:
            os.environ[name] = value
            _SET_HERE.add(name)


def environment_unquieted() -> dict[str, str]:
    """This process's environment without the variables :func:`quiet_model_libraries` set
    (one the user set stays): for a process it starts whose own log is read, a judge server
    (vLLM's warnings are what its failure quotes)."""
    return {
        name: value
        for name, value in os.environ.items()
        if not (name in _SET_HERE and value == QUIET_LIBRARIES[name])
    }
