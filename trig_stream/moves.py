"""A run directory moved with its project folder: which of the paths its manifest stored
moved with it (:class:`Move`), so that a resume compares them at their new place."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

from trig_stream.files import real_path


@dataclass(frozen=True)
class Move:
    """How a run directory moved since its manifest was written, as the folder that moved
    with it: where it was and where it is, literally and with symbolic links resolved.

    A project folder moved whole (``mv ~/proj ~/proj2``: its config, dataset, checkpoints
    and ``runs/`` together) took the run directory ``~/proj/runs/name`` to
    ``~/proj2/runs/name``: what its paths share at their end (``runs/name``) stayed, and
    what came before it (``~/proj``) is the folder that moved. A path the manifest holds
    inside that folder is taken to have moved with it; a path elsewhere did not.
    """

    roots: tuple[tuple[PurePath, PurePath], ...]
    """(where it was, where it is): the folder that moved."""

    @classmethod
    def between(cls, was: Path, now: Path) -> Move | None:
        """How the folder ``was`` became ``now`` (both absolute); None when it did not move."""
        roots: dict[tuple[PurePath, PurePath], None] = {}
        for before, after in ((was, now), (real_path(was), real_path(now))):
            if before.is_absolute() and after.is_absolute():
                old, new = before.parts, after.parts
                shared = 0  # the last parts they share; never the root ("/") itself
                while shared < min(len(old), len(new)) - 1 and old[-1 - shared] == new[-1 - shared]:
                    shared += 1
                pair = (PurePath(*old[: len(old) - shared]), PurePath(*new[: len(new) - shared]))
                if pair[0] != pair[1]:
                    roots[pair] = None
        return cls(tuple(roots)) if roots else None

    def places(self, value: Any) -> list[str]:
        """Where a stored JSON value, an absolute path's text, would be after the move: one
        place for each way of it whose folder holds the path (none: a path elsewhere, or a
        value that is no path)."""
        if not isinstance(value, str) or not PurePath(value).is_absolute():
            return []
        path = PurePath(value)
        return [
            str(new / path.relative_to(old)) for old, new in self.roots if path.is_relative_to(old)
        ]

    def same(self, stored: Any, configured: Any) -> bool:
        """Whether a stored JSON value is the configured one, its paths in the folder that
        moved taken at their new place. A stored path still at its old place did not move
        (as in :meth:`apply`): only the folder that moved knows which of its parts went with
        it, and one left behind (``A/imgs`` beside a moved ``A/proj``) is compared as it
        was, so that ``B/imgs`` is another folder."""
        if isinstance(stored, list) and isinstance(configured, list):
            return len(stored) == len(configured) and all(
                self.same(a, b) for a, b in zip(stored, configured, strict=True)
            )
        if isinstance(stored, dict) and isinstance(configured, dict):
            return stored.keys() == configured.keys() and all(
                self.same(stored[key], configured[key]) for key in stored
            )
        if stored == configured:
            return True
        return not (isinstance(stored, str) and os.path.lexists(stored)) and (
            configured in self.places(stored)
        )

    def apply(self, value: Any) -> Any:
        """A stored JSON value with each path that moved at its new place: a path in the
        folder that moved which is gone from its old place and found at the new one (a
        folder left behind, or a value that only looks like a path, stays as it was)."""
        if isinstance(value, dict):
            return {key: self.apply(item) for key, item in value.items()}
        if isinstance(value, list):
            return [self.apply(item) for item in value]
        places = self.places(value)
        if not places or os.path.lexists(value):
            return value
        return next((place for place in places if os.path.lexists(place)), value)
