"""The steps of opening and closing what a run holds: its run directory and its judges.

:class:`~trig_stream.resources.RunResources` takes them in order: the run directory first (in
a worker thread), so that a run it refuses is refused before a judge's server takes minutes to
start, then each judge; at the end it closes the judges, whatever happened, and then the run
directory. A resumed run whose judges open slowly (a model to load, a server to start) first
reads its dataset for work left, and with none it opens no judge at all
(:func:`work_left_in_thread`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, MutableSequence, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import anyio.to_thread

from trig_stream.backends.base import Generator, Judge
from trig_stream.backends.threads import being_cancelled, exiting_error
from trig_stream.config import RunConfig
from trig_stream.errors import FatalBackendError, TrigStreamError
from trig_stream.files import storage_error
from trig_stream.journal import JournalState
from trig_stream.manifest import Manifest
from trig_stream.new_runs import next_free_run_dir
from trig_stream.pipeline import describe_error
from trig_stream.sourcing import work_left
from trig_stream.store import RunDir


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
        try:
            made = not path.exists()
        except OSError as exc:  # a name too long, a folder without search permission
            raise storage_error(
                exc, f"create the run directory {path}", nothing_written=True, path=path
            ) from None
    run_dir, state = RunDir.open(path, manifest)
    return OpenedRunDir(path, run_dir, state, made)


async def open_judges(judges: Iterable[Judge], opening: Callable[[str], None]) -> None:
    """Open each judge in turn, telling ``opening`` what is opening (for the progress view).

    Raises:
        FatalBackendError: a judge failed to open with an error of its own (not one of
            ours), ``SystemExit``, ``KeyboardInterrupt`` and a ``CancelledError`` while the
            run is not cancelled included, or its ``opening()`` raised (``SystemExit``
            included; a ``KeyboardInterrupt`` there is a Ctrl-C and goes on).
    """
    for judge in judges:
        try:
            what = judge.opening()
        except Exception as exc:  # a backend's own bug: one clear error, no traceback
            raise FatalBackendError(
                f"judge {judge.name!r} is broken: opening() raised {describe_error(exc)} (a "
                "fault of its code or a library it uses: fix it, or report it to its authors)"
            ) from exc
        except SystemExit as exc:  # a KeyboardInterrupt here is a Ctrl-C: it goes on
            raise exiting_error(exc, f"judge {judge.name!r}: its opening()") from exc
        opening(f"judge {judge.name!r}: {what}")
        try:
            await judge.open()
        except TrigStreamError:
            raise
        except Exception as exc:  # a backend's own bug or setup: one clear error
            raise FatalBackendError(
                f"judge {judge.name!r} failed to open: {describe_error(exc)}"
            ) from exc
        except (SystemExit, KeyboardInterrupt) as exc:
            # Let out, it ended the command with its exit code and no word of the judge.
            raise exiting_error(exc, f"judge {judge.name!r} failed to open: its open()") from exc
        except BaseException as exc:
            if isinstance(exc, anyio.get_cancelled_exc_class()) and being_cancelled():
                raise
            # An asyncio.CancelledError of its own (a future it awaited was cancelled) while
            # nothing cancels the run: let out, it passed for the run's cancellation.
            raise FatalBackendError(
                f"judge {judge.name!r} failed to open: its open() raised {describe_error(exc)} "
                "though the run was not cancelled (a fault of its code or a library it uses)"
            ) from exc


async def close_judges(
    judges: Iterable[Judge],
    notes: MutableSequence[str],
    closing: Callable[[str | None], None] = lambda what: None,
) -> None:
    """Close each judge; a failure to close one becomes a note in ``notes``, not an error
    (closing must not hide the run's own outcome), ``SystemExit`` and ``KeyboardInterrupt``
    included. ``closing`` is told what closes when it may take a while (a judge's
    :meth:`~trig_stream.backends.base.Judge.closing`), and None once it is done."""
    for judge in judges:
        try:
            what = judge.closing()
            closing(None if what is None else f"judge {judge.name!r}: {what}")
            await judge.aclose()
        except Exception as exc:
            notes.append(f"judge {judge.name!r}: closing it failed: {describe_error(exc)}")
        except (SystemExit, KeyboardInterrupt) as exc:
            # A library calling sys.exit(), say: let out, it ended the command with its exit
            # code, the run's outcome unsaid.
            notes.append(
                f"judge {judge.name!r}: closing it failed: it raised {describe_error(exc)}"
            )
        finally:
            closing(None)


def judges_open_slowly(judges: Iterable[Judge]) -> bool:
    """Whether one of ``judges`` opens slowly (:meth:`~trig_stream.backends.base.Judge.
    opens_slowly`).

    Raises:
        FatalBackendError: a judge's ``opens_slowly()`` raised (its own bug), ``SystemExit``
            included (a ``KeyboardInterrupt`` is a Ctrl-C: it goes on).
    """
    for judge in judges:
        try:
            if judge.opens_slowly():
                return True
        except Exception as exc:
            raise FatalBackendError(
                f"judge {judge.name!r} is broken: opens_slowly() raised {describe_error(exc)}"
            ) from exc
        except SystemExit as exc:  # a KeyboardInterrupt here is a Ctrl-C: it goes on
            raise exiting_error(exc, f"judge {judge.name!r}: its opens_slowly()") from exc
    return False


async def work_left_in_thread(
    config: RunConfig,
    generators: Sequence[Generator],
    judges: Sequence[Judge],
    journal: JournalState,
    retry_errors: bool,
) -> bool:
    """:func:`~trig_stream.sourcing.work_left`, in a worker thread that a stop or a cancel
    does not wait for (its reading ends at its next pause, within 4,096 records).

    Raises:
        DatasetError: the dataset cannot be opened or is not in a TRIG format.
    """
    given_up = threading.Event()
    try:
        return await anyio.to_thread.run_sync(
            partial(
                work_left,
                config,
                generators,
                judges,
                journal,
                retry_errors=retry_errors,
                given_up=given_up,
            ),
            abandon_on_cancel=True,
        )
    finally:
        given_up.set()
