"""Whether a run may resume in a run directory: the results there against its settings.

:func:`resumed_manifest` is the manifest a run writes where results were made before it,
refused (:class:`~trig_stream.errors.FingerprintMismatch`) when their settings differ;
:func:`check_resume` is what ``trig-stream validate`` asks of a run directory: everything a run
would be refused for as it opens it, reading it only.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

from trig_stream.errors import FingerprintMismatch, RunDirError, RunLockedError
from trig_stream.files import open_regular_file
from trig_stream.journal import (
    JOURNAL,
    JournalState,
    journal_state,
    journal_unreadable,
    refuse_a_torn_tail_kept,
    warn_of_samples_without_digest,
    warn_of_skipped_lines,
)
from trig_stream.locks import find_writer, journal_in_use, run_in_use
from trig_stream.manifest import (
    IMAGES,
    MANIFEST,
    MANIFEST_HEAD_BYTES,
    MAX_MANIFEST_BYTES,
    EntryKind,
    Manifest,
    checked_scoring_rules,
    manifest_head_is_ours,
    manifest_is_ours,
    not_a_manifest,
    read_manifest,
    read_manifest_text,
    too_large_manifest,
)
from trig_stream.moves import Move
from trig_stream.quarantine_text import QUARANTINE
from trig_stream.run_dir_access import (
    refuse_a_file_on_the_way,
    refuse_links,
    refuse_unwritable,
    temporaries_that_stay,
    warn_of_foreign_partials,
    warn_of_temporaries_kept,
)
from trig_stream.run_dir_paths import PARTIAL, refuse_a_path_too_long


def _moved_since(stored: Manifest, path: Path) -> Move | None:
    """How the run directory ``path`` moved since ``stored``, its manifest, was written: the
    config of the run that wrote it says where its output folder was (None: unknown)."""
    run = stored.config.get("run")
    was = run.get("output_dir") if isinstance(run, dict) else None
    if not isinstance(was, str) or not Path(was).is_absolute():
        return None
    return Move.between(Path(was), path.absolute().parent)


def resumed_manifest(path: Path, manifest: Manifest, journal: JournalState) -> Manifest:
    """The manifest a run with ``manifest`` writes in the run directory ``path``: its own, or,
    when the directory holds results, the stored one with what ``manifest`` adds.

    Results are anything made under the stored manifest: a judgement that is not an
    ``error`` (``journal`` says) or an image. A run that made neither (its generator failed
    to load, or failed every call) protects nothing, so its corrected config starts afresh
    in the same directory; and a generator or judge that made none takes its corrected
    settings beside the others' results (:func:`_results_held`). Nothing is written here.

    Raises:
        RunDirError: the directory holds results but no manifest, or its manifest or
            quarantine list is another program's file (:func:`_refuse_files_not_ours`).
        FingerprintMismatch: its results were made with settings that differ, or its journal
            holds results its manifest does not describe (a judge's lines of another
            fingerprint than its entry, lines of images made with another seed, a model or
            judge with results and no entry).
    """
    _refuse_files_not_ours(path)
    holds_results = bool(journal.models_with_results or journal.skipped_lines)
    holds_results = holds_results or _holds_a_file(path / IMAGES)
    if holds_results and not (path / MANIFEST).exists():
        # The manifest is written before anything else, so it was removed: what the
        # results were made with cannot be checked, and a changed config would mix in.
        raise RunDirError(
            f"{path} holds results but no {MANIFEST}, so the settings they were made "
            "with cannot be checked: restore the file, or use --new-run to start a fresh "
            "run directory beside it"
        )
    if not holds_results:
        return manifest
    stored = read_manifest(path)
    unaccounted = stored.journal_differences(
        journal.models_with_results, journal.judges, journal.seeds, journal.seed_conflicts
    )
    if unaccounted:
        raise FingerprintMismatch(
            f"{path} holds results its {MANIFEST} does not describe (a journal copied in from "
            "another run, or the manifest edited?):\n  "
            + "\n  ".join(unaccounted)
            + f"\nRestore the run directory's own {JOURNAL} and {MANIFEST}, or use --new-run "
            "to start a fresh run directory beside it."
        )
    stored = checked_scoring_rules(stored, manifest, journal, path)
    moved = _moved_since(stored, path)
    differences = stored.differences(manifest, _results_held(path, journal), moved)
    if differences:
        where = ""
        if moved is not None:
            old, new = moved.roots[0]
            where = (
                f"\n(The run directory has moved since: a path in {old} that is gone from "
                f"there is compared at its place in {new}, any other path as it was.)"
            )
        raise FingerprintMismatch(
            f"{path} holds results made with other settings:\n  "
            + "\n  ".join(differences)
            + where
            + "\nUse --new-run to start a fresh run directory beside it, or change"
            " [run] name."
        )
    return stored.merged(manifest, moved)


QUARANTINE_START = b'{"schema_version":'
"""How every line of a quarantine list starts (a record's JSON, its version first)."""


def _refuse_files_not_ours(path: Path) -> None:
    """Refuse the run directory ``path`` when its ``manifest.json`` or ``quarantine.jsonl``
    is not one trig-stream wrote: a run writes over both (a folder without results starts
    afresh), and another program's file of that name (a web app's manifest) was lost. A
    damaged manifest of ours (empty, or unparsable beside our journal or images:
    :func:`~trig_stream.manifest.manifest_is_ours`) is
    :func:`~trig_stream.manifest.read_manifest`'s to name;
    one that cannot be read is left to the run's own reading or writing to say so.

    Raises:
        RunDirError: either file is another program's.
    """
    with suppress(OSError):
        with open_regular_file(path / MANIFEST) as handle:
            head = handle.read(MANIFEST_HEAD_BYTES)
            # One that starts as ours is: nothing more to read. Any other is read whole, up
            # to the cap only (a foreign file of a gigabyte was read whole).
            ours = manifest_head_is_ours(head)
            rest = b"" if ours else read_manifest_text(handle)
        if rest is None or len(head) + len(rest) > MAX_MANIFEST_BYTES:
            raise RunDirError(too_large_manifest(path / MANIFEST))
        if not ours and not manifest_is_ours(path, head + rest):
            raise RunDirError(not_a_manifest(path / MANIFEST))
    with suppress(OSError):
        with open_regular_file(path / QUARANTINE) as handle:
            start = handle.read(len(QUARANTINE_START))
        # Empty when nothing was refused; a line cut short by a crash starts alike.
        if not QUARANTINE_START.startswith(start):
            raise RunDirError(
                f"{path / QUARANTINE} is not a trig-stream run directory's quarantine list "
                "(another program's file?), and a run would write over it: move it away, or "
                "use --new-run to start a fresh run directory beside it (or change [run] name)"
            )


def _results_held(path: Path, journal: JournalState) -> Callable[[EntryKind, str], bool]:
    """Whether each entry made results in the run directory ``path``: a generator an image
    or a judgement of its images, a judge a judgement (``error`` ones judged nothing). An
    entry that made none (a judge whose model name was wrong, a generator that failed every
    call) takes its corrected settings; the others keep theirs. A line that is no judgement
    could be anyone's: then every entry holds results."""
    images = path / IMAGES

    def holds(kind: EntryKind, name: str) -> bool:
        if journal.skipped_lines:
            return True
        if kind == "judges":
            return name in journal.metrics_with_results
        if name in journal.models_with_results:
            return True
        tasks = images.iterdir() if images.is_dir() else ()
        return any(_holds_a_file(task / name) for task in tasks if task.name != PARTIAL)

    return holds


def check_resume(path: Path, manifest: Manifest) -> JournalState:
    """Raise what a run with ``manifest`` would be refused for in the run directory ``path``
    (in use by a running process, made with other settings, or results without a manifest),
    reading it only: no lock is taken, nothing is written or cut (``trig-stream validate``).

    Returns:
        What its journal holds (empty for a new directory), as a run would resume it.

    Raises:
        RunLockedError: a process runs in it (:func:`~trig_stream.locks.find_writer`).
        RunDirError: see :func:`resumed_manifest`; or the journal cannot be read.
    """
    # Seen from the kernel's lock table, never by taking the lock: holding it even for a
    # moment would turn away a run starting then.
    writer = find_writer(path)
    if writer is not None and writer.run_lock_held:
        raise RunLockedError(run_in_use(path, "" if writer.pid is None else str(writer.pid)))
    if writer is not None:
        raise RunLockedError(journal_in_use(path))
    # In the run's order: making the directory, then looking into it, then writing there.
    refuse_a_path_too_long(path, manifest, made_here=not os.path.isdir(path))
    refuse_a_file_on_the_way(path)
    refuse_links(path)
    refuse_unwritable(path)
    # As a run does.
    warn_of_temporaries_kept(path / IMAGES / PARTIAL, temporaries_that_stay(path))
    warn_of_foreign_partials(path)
    try:
        journal, _ = journal_state(path / JOURNAL)
    except OSError as exc:
        raise journal_unreadable(path / JOURNAL, exc) from None
    refuse_a_torn_tail_kept(path / JOURNAL, journal)  # as the run's opening of it does
    # As the run's reading of the journal warns.
    warn_of_skipped_lines(path / JOURNAL, journal.skipped_lines, journal.skipped_reason)
    warn_of_samples_without_digest(path / JOURNAL, journal)  # as the run's opening warns
    resumed_manifest(path, manifest, journal)
    return journal


def _holds_a_file(folder: Path) -> bool:
    """Whether ``folder`` or one below it (temporary images apart) holds a file."""
    if not folder.is_dir():
        return False
    for where, subfolders, files in os.walk(folder):
        if files and Path(where).name != PARTIAL:
            return True
        subfolders[:] = [name for name in subfolders if name != PARTIAL]
    return False
