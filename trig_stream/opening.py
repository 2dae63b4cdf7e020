"""Opening and closing what a run holds: its run directory and its judges.

The :class:`~trig_stream.engine.Engine` opens the run directory first (in a worker thread), so
that a run it refuses is refused before a judge's server takes minutes to start, then opens each
judge; at the end it closes the judges, whatever happened, and then the run directory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, MutableSequence
from dataclasses import dataclass
from pathlib import Path

from trig_stream.backends.base import Judge
from trig_stream.errors import FatalBackendError, TrigStreamError
from trig_stream.journal import JournalState
from trig_stream.manifest import Manifest
from trig_stream.pipeline import describe_error
from trig_stream.store import RunDir, next_free_run_dir


@dataclass(frozen=True, slots=True)
class OpenedRunDir:
    """A run directory, open, and what its journal holds."""

    path: Path
    run_dir: RunDir
    journal_state: JournalState
    made: bool
    """Whether this run made the directory (and may remove it if it ends before it starts)."""


def open_run_dir(configured: Path, manifest: Manifest, *, new_run: bool) -> OpenedRunDir:
    """Open the run directory ``configured`` (with ``new_run``, a new one beside it); blocks.

    Chosen and opened in one go: a stop between the two left an empty directory.
    """
    if new_run:
        path, made = next_free_run_dir(configured), True  # made empty there
    else:
        path = configured
        made = not path.exists()
    run_dir, state = RunDir.open(path, manifest)
    return OpenedRunDir(path, run_dir, state, made)


async def open_judges(judges: Iterable[Judge], opening: Callable[[str], None]) -> None:
    """Open each judge in turn, telling ``opening`` what is opening (for the progress view).

    Raises:
        FatalBackendError: a judge failed to open with an error of its own (not one of ours).
    """
    for judge in judges:
        opening(f"judge {judge.name!r}: {judge.opening()}")
        try:
            await judge.open()
        except TrigStreamError:
            raise
        except Exception as exc:  # a backend's own bug or setup: one clear error
            raise FatalBackendError(
                f"judge {judge.name!r} failed to open: {describe_error(exc)}"
            ) from exc


async def close_judges(
    judges: Iterable[Judge],
    notes: MutableSequence[str],
    closing: Callable[[str | None], None] = lambda what: None,
) -> None:
    """Close each judge; a failure to close one becomes a note in ``notes``, not an error
    (closing must not hide the run's own outcome). ``closing`` is told what closes when it
    may take a while (a judge's :meth:`~trig_stream.backends.base.Judge.closing`), and None
    once it is done."""
    for judge in judges:
        try:
            what = judge.closing()
            closing(None if what is None else f"judge {judge.name!r}: {what}")
            await judge.aclose()
        except Exception as exc:
            notes.append(f"judge {judge.name!r}: closing it failed: {describe_error(exc)}")
        finally:
            closing(None)
