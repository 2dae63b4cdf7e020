"""The journal of a run directory: one judgement per line, appended and fsynced as they land.

The journal is JSON Lines rather than SQLite: appending one line and fsyncing is all a
durable write needs; a crash can only tear the last line (its line end never written), which
is detected and cut off on open, once the run is sure to go on; any other process can follow
the file while it grows (``trig-stream watch``); and polars, jq and grep read it as it is.
When a key (model, data_id, dimension, metric) occurs more than once, because a failed
judgement was asked again, the last line wins.

Here: :class:`Journal` (the writer, locked), :func:`journal_state` (what it holds, for a
resume), and the readers (:func:`read_journal`, :func:`read_journal_lines`,
:func:`latest_judgements`, :func:`latest_entries`, :func:`parse_journal_line`).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from sys import intern
from typing import IO, BinaryIO, NamedTuple, cast

from pydantic import ValidationError

from trig_stream.dimensions import Dimension
from trig_stream.errors import RunDirError, RunLockedError, validation_problems
from trig_stream.files import (
    open_regular_file,
    open_unlinked,
    storage_error,
    sync_dir,
    unchangeable,
    write_all,
)
from trig_stream.locks import journal_in_use
from trig_stream.records import (
    JudgeFingerprint,
    Judgement,
    JudgementKey,
    RecordedPair,
    SampleAsked,
    Status,
    is_safe_name,
)
from trig_stream.scoring import (
    SCORING_RULES_KEY,
    Scorer,
    may_score_otherwise_than_before_rules,
    score_top_logprobs,
)

logger = logging.getLogger(__name__)

JOURNAL = "journal.jsonl"

JOURNAL_START = b'{"schema_version":'
"""How every line of a journal starts (a judgement's JSON, its version first)."""


def holds_our_journal(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a journal trig-stream wrote a line to: its first bytes are a
    judgement's. Another program's ``journal.jsonl``, an empty one, or none is not."""
    try:
        with open_regular_file(run_dir / JOURNAL) as handle:
            return handle.read(len(JOURNAL_START)) == JOURNAL_START
    except OSError:
        return False


@dataclass
class ScoredOtherwise:
    """The lines of one judge that score otherwise under today's scoring rules."""

    count: int
    line: int
    """The number (from 1) of the first."""
    first: Judgement


def scores_otherwise_now(judgement: Judgement) -> bool:
    """Whether ``judgement``, written by a trig-stream older than the scoring rules in the
    fingerprint, gets another status or score from its stored top logprobs today. Only a list
    holding a logprob the scorers read otherwise since is scored again
    (:func:`~trig_stream.scoring.may_score_otherwise_than_before_rules`); an ``error`` line,
    or one without a list (a judge that gave its own verdict), does not score otherwise.
    """
    top = judgement.top_logprobs
    if judgement.status == "error" or not top or not may_score_otherwise_than_before_rules(top):
        return False
    try:
        score = score_top_logprobs(
            top,
            scorer=cast(Scorer, judgement.judge.scorer or "robust"),
            confidence=judgement.judge.confidence,
        )
    except ValueError:
        return True  # an error now
    status = "unscorable" if score is None else "ok"
    return status != judgement.status or score != judgement.score


@dataclass
class JournalState:
    """What a journal already holds: the latest status of each judged key."""

    lines: int = 0
    """Lines kept in the file, the skipped ones included."""
    torn_bytes: int = 0
    """Bytes cut from the end because the last record was incomplete."""
    skipped_lines: list[int] = field(default_factory=list)
    """Numbers (from 1) of lines left in place that are not judgements: see
    :meth:`Journal.open`."""
    skipped_reason: str = ""
    """Why the first of :attr:`skipped_lines` is no judgement (:func:`line_problem`)."""
    judges: dict[str, list[JudgeFingerprint]] = field(default_factory=dict)
    """metric -> each distinct judge fingerprint its lines that record something judged
    carry: checked against the manifest's entry on resume (lines of another judge, from a
    journal copied in, must not mix with this one's)."""
    models_with_results: set[str] = field(default_factory=set)
    """Models with a line that records something judged (``ok`` or ``unscorable``): their
    generators made images. ``error`` lines alone judged nothing."""
    metrics_with_results: set[str] = field(default_factory=set)
    """Metrics (judges) with a line that records something judged."""
    digests: dict[str, SampleAsked] = field(default_factory=dict)
    """data_id -> the :attr:`~trig_stream.records.Sample.digest` its latest judgement in the
    file recorded: what each sample asked when it was judged (``error`` lines are left out:
    they judged nothing). A sample whose lines are all older than the digest has its
    latest one's pair instead (:class:`~trig_stream.records.RecordedPair`)."""
    seeds: dict[str, dict[str, int]] = field(default_factory=dict)
    """model -> data_id -> the generation seed the first line that judged its image records
    (lines older than seeds record none): checked on resume against the seed the run's
    ``[run] seed`` gives it (a line of a run with another seed, copied in, must not replace
    this run's judgement of another image)."""
    seed_conflicts: list[tuple[int, str, str, int]] = field(default_factory=list)
    """(line number from 1, model, data_id, seed) of each line that judged something whose
    seed differs from the one :attr:`seeds` holds for its image: checked alike."""
    scored_otherwise: dict[str, ScoredOtherwise] = field(default_factory=dict)
    """metric -> its ``ok`` and ``unscorable`` lines written by a trig-stream older than the
    scoring rules in the fingerprint that score otherwise under today's
    (:func:`scores_otherwise_now`): checked on resume when the manifest's entry of the judge
    holds no rules either (:func:`~trig_stream.manifest.checked_scoring_rules`). Gathered in
    this one pass, never by reading the journal again."""
    # (model, dimension, metric) -> data_id -> status. A resumed run holds one entry per
    # judged key for its whole length: grouped so, an entry is a data_id and a dict slot
    # (~100 bytes), not also a 4-tuple (~90 more).
    _groups: dict[tuple[str, str, str], dict[str, Status]] = field(default_factory=dict)

    def record(self, key: JudgementKey, status: Status) -> None:
        """Note the latest status of ``key``."""
        model, data_id, dimension, metric = key
        group = self._groups.get((model, dimension, metric))
        if group is None:
            group = self._groups[model, dimension, metric] = {}
        group[data_id] = status

    def status(self, key: JudgementKey) -> Status | None:
        """The latest status of ``key``; None when it was never judged."""
        model, data_id, dimension, metric = key
        group = self._groups.get((model, dimension, metric))
        return None if group is None else group.get(data_id)

    def __len__(self) -> int:
        """The number of distinct keys judged."""
        return sum(len(group) for group in self._groups.values())

    def has_results(self, model: str) -> bool:
        """Whether a line records a judgement of ``model``'s images (``ok`` or ``unscorable``):
        its generator made images."""
        return model in self.models_with_results

    def is_done(self, key: JudgementKey, *, retry_errors: bool) -> bool:
        status = self.status(key)
        return status is not None and not (retry_errors and status == "error")


def journal_state(path: Path) -> tuple[JournalState, int]:
    """What the journal at ``path`` holds, and where its last whole line ends (past it, a
    torn tail of ``torn_bytes``); reading only. Only a last line without its line end is
    torn, whole JSON or not: :func:`read_journal` stops before it too. A whole line that is
    no judgement, the last one included, is a skipped line (as :func:`read_journal` skips
    it): its line end was written, so no crash cut it short, and cutting it would delete
    what an edit or a later format put there.

    Raises:
        RunDirError: it is a folder or a pipe.
        OSError: it cannot be read.
    """
    state = JournalState()
    good_end = end = 0
    pairs: dict[str, RecordedPair] = {}  # one per pair, not one per sample
    handle = open_journal(path)
    if handle is None:
        return state, 0
    with handle:
        for number, raw in enumerate(handle, start=1):
            end += len(raw)
            if not raw.endswith(b"\n"):
                # The last line, unterminated: torn, even when it parses (the crash came
                # between its text and its "\n"), as the readers hold it. Counted as judged,
                # it would be in no report, and the next append would join it to a new line.
                break
            try:
                # The same check the report's reading makes: a line it would skip must not
                # count as judged, or its judgement is in neither.
                judgement = parse_journal_line(raw)
            except ValueError as exc:
                if not state.skipped_lines:
                    state.skipped_reason = line_problem(exc)
                state.skipped_lines.append(number)
                state.lines = number
                good_end = end
                continue
            key = (
                intern(judgement.model),  # one string each, not one per line
                judgement.data_id,
                intern(judgement.dimension),
                intern(judgement.metric),
            )
            state.record(key, judgement.status)
            if judgement.status != "error":  # judged nothing
                state.models_with_results.add(key[0])
                state.metrics_with_results.add(key[3])
                if judgement.sample_digest is not None:
                    state.digests[key[1]] = judgement.sample_digest
                elif not isinstance(state.digests.get(key[1]), str):
                    # Older than the digest: its pair is what it tells of its sample (a
                    # digest, which holds the pair too, is not replaced by less).
                    recorded = pairs.get(judgement.pair)
                    if recorded is None:
                        recorded = pairs[judgement.pair] = RecordedPair(judgement.pair)
                    state.digests[key[1]] = recorded
                seed = judgement.seed
                if seed is not None:
                    seeds = state.seeds.get(key[0])
                    if seeds is None:
                        seeds = state.seeds[key[0]] = {}
                    known = seeds.setdefault(key[1], seed)
                    if known != seed:
                        state.seed_conflicts.append((number, key[0], key[1], seed))
                # One comparison a line, of the fields (a third of the cost of the model's
                # ==): a journal holds one fingerprint per judge.
                fingerprint = judgement.judge
                seen = state.judges.get(key[3])
                if seen is None:
                    state.judges[key[3]] = [fingerprint]
                elif fingerprint.__dict__ != seen[0].__dict__ and all(
                    fingerprint.__dict__ != other.__dict__ for other in seen
                ):
                    seen.append(fingerprint)
                # Lines of a trig-stream older than the rules in the fingerprint only: the
                # check of their scores costs one pass over the list, a key lookup others.
                if SCORING_RULES_KEY not in fingerprint.params and scores_otherwise_now(judgement):
                    otherwise = state.scored_otherwise.get(key[3])
                    if otherwise is None:
                        state.scored_otherwise[key[3]] = ScoredOtherwise(1, number, judgement)
                    else:
                        otherwise.count += 1
            state.lines = number
            good_end = end
        state.torn_bytes = os.fstat(handle.fileno()).st_size - good_end
    return state, good_end


class Journal:
    """An append-only JSON Lines file of judgements, durable on every :meth:`append`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[bytes] | None = None
        self._good_end: int | None = None
        """Where the last whole line ends, while a torn tail found by :meth:`open` is uncut."""
        self.created = False
        """Whether :meth:`open` made the file (there was no journal)."""

    def open(self, *, cut: bool = True) -> JournalState:
        """Open for appending; return what it holds.

        A last line without its line end is a torn tail (a crash cut its write short) and is
        cut off. A whole line that is not a judgement (the file was edited or damaged, or a
        later trig-stream wrote it), the last one included, stays where it is and is
        skipped, as :func:`read_journal` skips it: cutting there would delete it and every
        judgement after it. A judgement it held is asked again.

        Args:
            cut: cut the torn tail off now. False leaves it to :meth:`cut_torn_tail`, once
                the caller has checked the run directory: a run refused must leave the
                journal as it was.

        Raises:
            RunDirError: it has a torn tail and is append-only (:func:`refuse_a_torn_tail_kept`),
                refused before anything is cut or written.
        """
        handle = open_journal(self.path)  # refuses a folder or a pipe before anything waits
        if handle is not None:
            handle.close()
        created = not self.path.exists()
        # Unbuffered: a write that fails leaves nothing behind in a buffer to be written later.
        # Refusing a link there: the lines would be appended to the file it points to.
        self._file = open_unlinked(
            self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, "ab", buffering=0
        )
        try:
            # The run lock guards the directory, but a run.lock deleted by hand (a "stale"
            # lock, to the eye) would let a second run in beside this one: the journal's own
            # lock still keeps it out, taken before anything here is read or cut.
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.close()
            raise RunLockedError(journal_in_use(self.path.parent)) from None
        except BaseException:
            self.close()
            raise
        self.created = created
        try:
            state, good_end = journal_state(self.path)
            refuse_a_torn_tail_kept(self.path, state)
            self._good_end = good_end if state.torn_bytes else None
            if cut:
                self.cut_torn_tail()
        except BaseException:
            self.close()
            raise
        if created:
            sync_dir(self.path.parent)  # the journal's name, durable like its lines
        return state

    def cut_torn_tail(self) -> None:
        """Cut off the torn tail :meth:`open` found, if any (this process holds the lock).

        Raises:
            RunDirError: the journal is append-only (``chattr +a``, set since :meth:`open`
                looked): its torn tail cannot be cut (:func:`torn_tail_kept`).
        """
        if self._good_end is None:
            return
        if self._file is None:
            raise RunDirError(f"journal {self.path} is not open")
        fd = self._file.fileno()
        try:
            os.ftruncate(fd, self._good_end)
        except PermissionError as exc:
            if exc.errno != errno.EPERM:
                raise
            raise RunDirError(
                torn_tail_kept(self.path, os.fstat(fd).st_size - self._good_end)
            ) from None
        os.fsync(fd)
        self._good_end = None

    def append(self, judgements: Iterable[Judgement]) -> None:
        """Write judgements and fsync once for all of them (group commit)."""
        if self._file is None:
            raise RunDirError(f"journal {self.path} is not open")
        data = b"".join(j.model_dump_json().encode() + b"\n" for j in judgements)
        if not data:
            return
        fd = self._file.fileno()
        info = os.fstat(fd)
        if info.st_nlink == 0:
            # Removed from its folder (the run directory deleted, most likely): each line
            # written now would be lost with the file once the run ends.
            raise RunDirError(
                f"the journal {self.path} was deleted while the run went on (its run "
                "directory removed?): stopping, since nothing written now would be kept"
            )
        try:
            here = os.stat(self.path)
        except OSError:
            here = None
        if here is None or (here.st_dev, here.st_ino) != (info.st_dev, info.st_ino):
            # The run directory renamed (or the journal moved away): the lines would go on
            # in the file at its new place, the images to a folder made again at the old.
            raise RunDirError(moved_or_replaced(self.path.parent))
        start = info.st_size
        try:
            write_all(fd, data)
            os.fsync(fd)
        except OSError as exc:
            error = storage_error(exc, f"write to the journal {self.path}")
            # Take back what reached the file, so that its last line is whole again (if this
            # fails too, the next open cuts the torn tail off).
            try:
                os.ftruncate(fd, start)
            except OSError as cut:
                # Append-only (chattr +a): no run can cut a torn line off it either.
                reached = data[: os.fstat(fd).st_size - start]
                torn = len(reached.rpartition(b"\n")[2])
                if cut.errno == errno.EPERM and torn:
                    kept = torn_tail_kept(self.path, torn)
                    raise RunDirError(f"{error}; but first: {kept}") from None
            raise error from None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def refuse_a_torn_tail_kept(path: Path, state: JournalState) -> None:
    """Refuse the journal at ``path``, which holds ``state``, when it has a torn tail and is
    append-only (``chattr +a``): a run could not cut the tail off. Told from its attributes
    (:func:`~trig_stream.files.unchangeable`), before a run writes anything (``validate``
    asks too).

    Raises:
        RunDirError: it is so (:func:`torn_tail_kept`).
    """
    if state.torn_bytes and unchangeable(path):
        raise RunDirError(torn_tail_kept(path, state.torn_bytes))


def torn_tail_kept(path: Path, torn_bytes: int) -> str:
    """The error of a journal whose torn last line cannot be cut off because it is
    append-only (``chattr +a``): lines may be added to it, none taken back. A run would
    append its first line to the torn one."""
    return (
        f"cannot cut the torn last line ({torn_bytes} bytes without a line end, left by a crash "
        f"or a full disk) off the journal {path}: it is append-only (chattr +a), which lets a "
        "run add lines but take none back; remove the attribute (chattr -a, as root), then "
        "run the same command again: the run resumes where it stopped"
    )


def moved_or_replaced(run_dir: Path) -> str:
    """The error of a run whose directory was renamed, moved, replaced or deleted while it
    ran: with nothing left at its path, the advice fits a move and a deletion both."""
    if not os.path.lexists(run_dir):
        return (
            f"the run directory {run_dir} was moved or deleted while the run went on: "
            "stopping, since what is written now would be split from the results already "
            f"there, or lost. If it was moved, put it back at {run_dir} and run the same "
            "command again to resume (or resume it where it is now, with [run] name and "
            "output_dir naming that place); if it was deleted, the same command starts the "
            "run afresh"
        )
    return (
        f"the run directory {run_dir} was moved or replaced while the run went on: stopping, "
        "since what is written now would be split from the results already there; put it "
        f"back at {run_dir} and run the same command again to resume (or resume it where it "
        "is now, with [run] name and output_dir naming that place)"
    )


def read_journal(path: Path, *, limit: int | None = None) -> Iterator[Judgement]:
    """Every complete judgement in a journal, in order.

    A torn last line ends the reading; any other line that is not a judgement is skipped,
    with one warning for all of them.

    Args:
        path: the journal file.
        limit: read at most this many lines (what was there when a run started).

    Raises:
        RunDirError: the journal exists but cannot be read (no permission, a folder).
    """
    for _, judgement in read_journal_lines(path, limit=limit):
        yield judgement


def read_journal_lines(path: Path, *, limit: int | None = None) -> Iterator[tuple[int, Judgement]]:
    """:func:`read_journal`, each judgement with the number of its line (from 0, the lines
    that are not judgements counted: :attr:`~trig_stream.manifest.Manifest.journal_lines`
    counts them too)."""
    skipped: list[int] = []
    first_reason = ""
    handle = open_journal(path)
    if handle is None:
        return
    # The caller's own errors are never thrown in at the yield: an OSError here is a read's.
    with handle:
        try:
            for number, raw in enumerate(handle):
                if (limit is not None and number >= limit) or not raw.endswith(b"\n"):
                    break
                try:
                    judgement = parse_journal_line(raw)
                except ValueError as exc:
                    skipped.append(number + 1)
                    first_reason = first_reason or line_problem(exc)
                    continue
                yield number, judgement
        except OSError as exc:
            raise journal_unreadable(path, exc) from None
    warn_of_skipped_lines(path, skipped, first_reason)


def warn_of_skipped_lines(path: Path, skipped: Sequence[int], first_reason: str) -> None:
    """Warn that the lines ``skipped`` (numbers from 1) of the journal at ``path`` are no
    judgements, the first for ``first_reason``: the run's reading and ``validate`` alike."""
    if skipped:
        logger.warning(
            "%s: %d line(s) are not judgements and were skipped (the first: line %d: %s)",
            path,
            len(skipped),
            skipped[0],
            first_reason,
        )


def warn_of_samples_without_digest(path: Path, state: JournalState) -> None:
    """Warn that the samples of the journal at ``path`` whose judgements record no sample
    digest (``state``: what it holds), all written by a trig-stream older than it, are
    compared by their pair alone: the run's opening and ``validate`` alike."""
    count = sum(isinstance(asked, RecordedPair) for asked in state.digests.values())
    if count:
        logger.warning(
            "%s: %d sample(s) were judged only by a trig-stream older than sample digests "
            "(before eb40369), whose judgements record their pair alone: an edit of such a "
            "sample's prompt, item or img_id since cannot be detected (one of its pair is, "
            "and quarantines the record); --new-run judges them afresh",
            path,
            count,
        )


def open_journal(path: Path) -> BinaryIO | None:
    """A journal opened for reading, or None when there is none.

    Raises:
        RunDirError: it exists but cannot be read, or is no regular file: a folder, or a
            pipe, whose opening and reading would wait for a writer forever.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # no effect on a regular file
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise journal_unreadable(path, exc) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise journal_not_a_file(path)
    return os.fdopen(fd, "rb")


def journal_not_a_file(path: Path) -> RunDirError:
    """The error of a journal that is no regular file (a folder, a pipe), which a run can
    neither read nor append to."""
    return RunDirError(
        f"cannot read the journal {path}: it is not a regular file (a folder, a pipe or a "
        "device?); it must be the file a run wrote"
    )


def journal_unreadable(path: Path, exc: OSError) -> RunDirError:
    """The error of a journal that exists but cannot be read: which file, and why."""
    return RunDirError(
        f"cannot read the journal {path}: {exc.strerror or exc}; it must be a file this user "
        "can read"
    )


def parse_journal_line(raw: bytes) -> Judgement:
    """The judgement one journal line holds.

    Raises:
        ValueError: the line is not a judgement the engine could have written: not one at
            all, or one whose model, data_id or metric is no safe file name (the engine
            writes only those: they name the images' and the report's folders; another is
            a hand edit that must not lead a report out of its folder).
    """
    judgement = Judgement.model_validate_json(raw)
    for what in ("model", "data_id", "metric"):
        name = getattr(judgement, what)
        if not is_safe_name(name):
            raise ValueError(f"{what} {name!r} is not a safe file name")
    return judgement


def line_problem(exc: ValueError) -> str:
    """What :func:`parse_journal_line` found wrong, in one line."""
    if isinstance(exc, ValidationError):
        return validation_problems(exc)[0]
    return str(exc)


def latest_judgements(path: Path) -> dict[JudgementKey, Judgement]:
    """The journal reduced to the last judgement of each key."""
    return {j.key: j for j in read_journal(path)}


class JournalEntry(NamedTuple):
    """What the read-only commands (``status``, ``report``, ``compare``) keep of a journal
    line: its key, pair, status and score, without the rest of the judgement (its
    ``top_logprobs`` alone make a parsed one some kilobytes: a million of them did not fit
    in memory)."""

    line: int
    """The line's number, from 0 (as :func:`read_journal_lines` numbers it)."""
    model: str
    data_id: str
    pair: str
    dimension: Dimension
    metric: str
    status: Status
    score: float | None

    @property
    def key(self) -> JudgementKey:
        """The identity a run judges exactly once."""
        return (self.model, self.data_id, self.dimension, self.metric)


def journal_entry(line: int, judgement: Judgement) -> JournalEntry:
    """The :class:`JournalEntry` of ``judgement``, read from line ``line``; its names held
    once each (interned), not once per line."""
    return JournalEntry(
        line,
        intern(judgement.model),
        judgement.data_id,
        intern(judgement.pair),
        cast(Dimension, intern(judgement.dimension)),
        intern(judgement.metric),
        cast(Status, intern(judgement.status)),
        judgement.score,
    )


def latest_entries(path: Path) -> dict[JudgementKey, JournalEntry]:
    """:func:`latest_judgements` kept as :class:`JournalEntry` records: the last line of each
    key, in the order each key first appears."""
    latest: dict[JudgementKey, JournalEntry] = {}
    for line, judgement in read_journal_lines(path):
        entry = journal_entry(line, judgement)
        latest[entry.key] = entry
    return latest
