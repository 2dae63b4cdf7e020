"""Tiny Flux pipelines that misbehave on purpose, for the tests of ``isolation = "process"``.

A pipeline child imports them by name (``options.pipeline =
"tests.misbehaving_pipelines:LoadBlocks"``) and loads them from a tiny Flux folder. One that
blocks first says so, as a line on the FIFO that ``$TRIG_TEST_ANNOUNCE`` names, so that a test
waits for that moment, not for a time.
"""

from __future__ import annotations

import ctypes
import inspect
import os
import resource
import threading
from typing import Any

from diffusers import FluxPipeline

ANNOUNCE = "TRIG_TEST_ANNOUNCE"
"""The environment variable naming the FIFO a pipeline announces itself on."""


def announce(what: str) -> None:
    """Write ``what`` and this process's id as one line on the test's FIFO, if it gave one."""
    path = os.environ.get(ANNOUNCE)
    if path:
        with open(path, "w", encoding="utf-8") as fifo:
            fifo.write(f"{what} {os.getpid()}\n")


def block_forever() -> None:
    threading.Event().wait()


def crash() -> None:
    """A segmentation fault, without a core file."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    ctypes.string_at(0)


class LoadBlocks(FluxPipeline):  # type: ignore[misc]
    """Its load never ends."""

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        announce("loading")
        block_forever()


class LoadFails(FluxPipeline):  # type: ignore[misc]
    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("weights are corrupt")


class LoadCrashes(FluxPipeline):  # type: ignore[misc]
    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        crash()


class CallBlocks(FluxPipeline):  # type: ignore[misc]
    """Its call never ends, and never looks at its step callback."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        announce("calling")
        block_forever()


class CallCrashes(FluxPipeline):  # type: ignore[misc]
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        crash()


class FloatPicturesAfterOneCall(FluxPipeline):  # type: ignore[misc]
    """Its first call is right; from the second on it returns float arrays, which no PIL
    picture is made from: the generator's call raises."""

    calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        FloatPicturesAfterOneCall.calls += 1
        if FloatPicturesAfterOneCall.calls > 1:
            kwargs["output_type"] = "np"
        return super().__call__(*args, **kwargs)


class TextForPictures(FluxPipeline):  # type: ignore[misc]
    """Returns a text where each picture belongs."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        result = super().__call__(*args, **kwargs)
        result.images = ["a picture"] * len(result.images)
        return result


def of_mode(picture: Any, index: int) -> Any:
    """``picture`` in the Pillow mode :class:`PicturesOfManyModes` gives the item at
    ``index`` of a call: a palette (every second one with a transparent index), grey with
    alpha, 1-bit, 16-bit grey."""
    mode = ("P", "P", "LA", "1", "I;16")[index % 5]
    converted = picture.convert("L" if mode == "I;16" else mode)
    if mode == "I;16":
        converted = converted.convert("I;16")
    if mode == "P" and index % 2:
        converted.info["transparency"] = 0
    return converted


class PicturesOfManyModes(FluxPipeline):  # type: ignore[misc]
    """Its pictures are of modes other than RGB (:func:`of_mode`), each as it would keep
    them: a palette picture keeps its palette and transparency."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["output_type"] = "pil"  # PIL pictures, not the tensor the engine asks for
        result = super().__call__(*args, **kwargs)
        result.images = [of_mode(image, index) for index, image in enumerate(result.images)]
        return result


# The generator reads a pipeline's arguments from its call's signature.
for _pipeline in (
    CallBlocks,
    CallCrashes,
    FloatPicturesAfterOneCall,
    TextForPictures,
    PicturesOfManyModes,
):
    _pipeline.__call__.__signature__ = inspect.signature(FluxPipeline.__call__)  # type: ignore[union-attr]
