"""The ``image_folder`` generator: judge images that were made elsewhere.

The folder holds one file per sample, named ``<data_id>.<ext>`` (upstream's ``image_dirs``
layout, one folder per model). Nothing is generated: each requested sample's file is handed
to the engine, which writes it into the run like any generated image. An 8-bit RGB PNG goes
as it is, once its chunks check out (CRCs, the end chunk: a truncated file is refused) and its
pixel data inflates in full (:func:`trig_stream.png.pixel_data_problem`); any other file is
decoded completely (a broken one is an item error, not a crash) and the engine encodes it as
PNG. For a 0.7 MB 512x512 PNG that is ~4 ms of CPU (~17 ms at 1024x1024) instead of decoding and
encoding again (~80 ms for a 1024x1024 JPEG with the engine's encoder).

Files that match no sample of the run's dataset selection (neither asked for nor passed over
by the run: see :meth:`ImageFolderGenerator.all_requested`) are counted at
:meth:`ImageFolderGenerator.close`, kept in :attr:`ImageFolderGenerator.unmatched` and listed
in the end-of-run notes: they usually mean a folder from another task, a renamed dataset, a
filter, or ids with a typo.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field, field_validator

from trig_stream.backends.base import EncodedPicture, GenerationRequest, Generator
from trig_stream.backends.generators.source_images import open_image, png_as_is
from trig_stream.config_fields import OPTIONS_CONFIG
from trig_stream.errors import FatalBackendError, ItemError
from trig_stream.files import real_path

if TYPE_CHECKING:
    from PIL.Image import Image

    from trig_stream.config import GeneratorConfig, RunConfig

logger = logging.getLogger(__name__)


class ImageFolderOptions(BaseModel):
    """``options`` of the ``image_folder`` generator."""

    model_config = OPTIONS_CONFIG

    path: Path
    """The folder of ``<data_id>.<ext>`` files for this model."""
    extensions: list[str] = Field(default_factory=lambda: ["png", "jpg", "jpeg", "webp"])
    """File extensions to accept, in order of preference when a data_id has several."""

    @field_validator("extensions")
    @classmethod
    def _normalise(cls, value: list[str]) -> list[str]:
        cleaned = [ext.strip().lstrip(".").lower() for ext in value]
        if not cleaned or not all(cleaned):
            raise ValueError("list at least one non-empty extension, e.g. ['png']")
        return cleaned


class ImageFolderGenerator(Generator):
    """Serves images from a folder, one ``<data_id>.<ext>`` file per sample.

    Attributes:
        unmatched: after :meth:`close`, the names of image files that match no sample of the
            run's dataset selection, sorted; known only after a run that went through its
            whole input (see :meth:`all_requested`): a stopped one never asked for the samples
            it left. A run that never loaded the generator (nothing to generate) closes it
            neither, and names none.
        ignored: after :meth:`close`, the names of files whose extension is not accepted.
    """

    Options = ImageFolderOptions
    draws_from_the_prompt = False  # the images were made elsewhere
    reads_source_image = False  # it serves images already made

    def __init__(
        self,
        name: str,
        options: ImageFolderOptions,
        *,
        workers: int = 1,
        batch_size: int = 1,
        written: str | None = None,
    ) -> None:
        self.name = name
        self.options = options
        self.workers = workers
        self.batch_size = batch_size
        self.folder = options.path
        self.written = written
        """``options.path`` as the config wrote it (relative to the config's folder, or
        starting with ``~``), which the refusals of the folder name."""
        self.unmatched: list[str] = []
        self.ignored: list[str] = []
        self.shadowed: list[str] = []
        """Files of a requested sample that another file of it, of a preferred extension, won
        over (known after :meth:`close`)."""
        self.twins: list[tuple[str, str]] = []
        """(used, ignored): files of a requested sample whose extensions differ in case alone
        (``x.png`` and ``x.PNG``), known after :meth:`close`; see :func:`_preference`."""
        self._files: dict[str, list[Path]] = {}
        self._others: dict[str, list[Path]] = {}
        self._requested: set[str] = set()
        self._all_requested = False
        self._passed_over: AbstractSet[str] = frozenset()
        """The samples of the selection the run did not ask for (see :meth:`all_requested`)."""
        self._lock = threading.Lock()

    @classmethod
    def from_config(
        cls, entry: GeneratorConfig, options: ImageFolderOptions, config: RunConfig
    ) -> ImageFolderGenerator:
        written = entry.written_options.get("path")
        return cls(
            entry.name,
            options,
            workers=entry.workers,
            batch_size=entry.batch_size,
            written=written if isinstance(written, str) else None,
        )

    def fingerprint(self) -> dict[str, Any]:
        return {
            "backend": "image_folder",
            "path": str(real_path(self.folder)),
            "extensions": self.options.extensions,
        }

    def check_environment(self) -> None:
        """The folder exists and can be listed (``validate`` says so before a run does)."""
        if not self.folder.is_dir():
            raise FatalBackendError(
                f"generator {self.name!r}: image folder {self._named()} does not exist or is "
                "not a folder; set options.path to the folder of <data_id>.<ext> files"
            )
        try:
            with os.scandir(self.folder):  # opened only: the run lists it when it loads
                pass
        except OSError as exc:
            raise FatalBackendError(
                f"generator {self.name!r}: image folder {self._named()} cannot be read: "
                f"{exc.strerror or exc}; give this user permission to list it (chmod +r), or "
                "set options.path to a readable copy"
            ) from None

    def _named(self) -> str:
        """The folder as the config wrote it, and what that resolved to where they differ."""
        if self.written is None or Path(self.written) == self.folder:
            return str(self.folder)
        return f"{self.written} (that is {self.folder})"

    def load(self) -> None:
        """Index the folder once: data_id -> files.

        Raises:
            FatalBackendError: the folder does not exist.
        """
        self.check_environment()
        # Loaded again (a second run of this instance): indexed afresh, not added to the
        # first index, whose files the unused-files note then listed twice.
        self._files = {}
        self._others = {}
        with self._lock:
            self._requested = set()
        self._all_requested = False
        self._passed_over = frozenset()
        accepted = self.options.extensions
        for entry in sorted(self.folder.iterdir()):
            if not entry.is_file() or entry.name.startswith("."):
                continue
            ext = entry.suffix.lstrip(".").lower()
            index = self._files if ext in accepted else self._others
            index.setdefault(entry.stem, []).append(entry)
        for paths in self._files.values():
            paths.sort(key=lambda p: _preference(p, accepted))
        logger.info(
            "image folder %s: %d images, %d other files",
            self.folder,
            sum(map(len, self._files.values())),
            sum(map(len, self._others.values())),
        )

    def generate(
        self, requests: Sequence[GenerationRequest], *, worker: int, cancel: threading.Event
    ) -> list[Image | EncodedPicture | Exception]:
        out: list[Image | EncodedPicture | Exception] = []
        for request in requests:
            if cancel.is_set():
                out.append(ItemError("cancelled"))
                continue
            out.append(self._one(request.sample.data_id))
        return out

    def _one(self, data_id: str) -> Image | EncodedPicture | Exception:
        with self._lock:
            self._requested.add(data_id)
        paths = self._files.get(data_id)
        if not paths:
            message = f"no image for {data_id} in {self.folder}"
            others = self._others.get(data_id)
            if others:
                names = ", ".join(p.name for p in others)
                accepted = ", ".join(self.options.extensions)
                message += f" (found {names}, whose extension is not one of: {accepted})"
            elif cased := self._differing_in_case(data_id):
                names = ", ".join(p.name for p in cased)
                message += (
                    f" (found {names}, whose name differs from the data_id in case alone: "
                    f"rename it to {data_id}{cased[0].suffix})"
                )
            return ItemError(message)
        picture = png_as_is(paths[0])
        if picture is not None:
            return picture
        try:
            return open_image(paths[0])  # says what is wrong with a file png_as_is refused
        except ItemError as exc:
            return exc

    def _differing_in_case(self, data_id: str) -> list[Path]:
        """Files whose stem is ``data_id`` but for its case: ids are matched exactly."""
        wanted = data_id.casefold()
        return sorted(
            path
            for index in (self._files, self._others)
            for stem, paths in index.items()
            if stem.casefold() == wanted
            for path in paths
        )

    def notes(self) -> list[str]:
        found = []
        if self.unmatched:
            shown = ", ".join(self.unmatched[:5]) + (", ..." if len(self.unmatched) > 5 else "")
            found.append(
                f"{len(self.unmatched)} image file(s) in {self.folder} match no sample of the "
                f"run's dataset selection (no such sample, or filtered out): {shown}"
            )
        if self.ignored:
            found.append(
                f"{len(self.ignored)} file(s) in {self.folder} skipped for their extension"
            )
        if self.shadowed:
            shown = ", ".join(self.shadowed[:5]) + (", ..." if len(self.shadowed) > 5 else "")
            found.append(
                f"{len(self.shadowed)} file(s) in {self.folder} not used: their sample has a file "
                f"of an extension earlier in `extensions` ({', '.join(self.options.extensions)})"
                f": {shown}"
            )
        if self.twins:
            shown = "; ".join(f"{used} used, {ignored} ignored" for used, ignored in self.twins[:5])
            found.append(
                f"{len(self.twins)} sample(s) in {self.folder} have two files whose extensions "
                "differ in case alone (the one with the lower-case extension is used, else the "
                f"first by name): {shown}" + ("; ..." if len(self.twins) > 5 else "")
            )
        return found

    def all_requested(self, passed_over: AbstractSet[str] = frozenset()) -> None:
        """The run went through its whole input; ``passed_over``, the samples it did not ask
        for (already judged, or their images reused): their files are no excess."""
        self._all_requested = True
        self._passed_over = passed_over

    def close(self) -> None:
        """Report the files that match no sample of the selection."""
        with self._lock:
            requested = set(self._requested)
        # After a stop, the files of samples the run had not reached yet are no excess: they
        # are left unnamed rather than told as unused.
        self.unmatched = sorted(
            path.name
            for stem, paths in self._files.items()
            if self._all_requested and stem not in requested and stem not in self._passed_over
            for path in paths
        )
        self.ignored = sorted(path.name for paths in self._others.values() for path in paths)
        self.shadowed = sorted(
            path.name
            for stem, paths in self._files.items()
            if stem in requested
            for path in paths[1:]
            if _extension(path) != _extension(paths[0])
        )
        self.twins = sorted(
            (paths[0].name, path.name)
            for stem, paths in self._files.items()
            if stem in requested
            for path in paths[1:]
            if _extension(path) == _extension(paths[0])
        )
        # The unmatched files are told once, in notes().
        if self.ignored:
            logger.info(
                "image folder %s: %d file(s) skipped for their extension",
                self.folder,
                len(self.ignored),
            )


def _extension(path: Path) -> str:
    return path.suffix.lstrip(".").lower()


def _preference(path: Path, accepted: list[str]) -> tuple[int, bool, str]:
    """The order of a sample's files, the first one used: by the extension's place in
    ``extensions``; for extensions that differ in case alone (``x.png``, ``x.PNG``), the
    lower-case one first, then by name."""
    return accepted.index(_extension(path)), path.suffix != path.suffix.lower(), path.name
