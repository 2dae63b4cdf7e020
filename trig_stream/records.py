"""Typed, versioned records that cross a pipeline stage or reach disk.

The flow is ``Sample -> GeneratedImage -> Judgement``. Judgements are what the run journal
stores, one JSON line each; :data:`SCHEMA_VERSION` is written into every line so a later
version of trig-stream can read old runs.

A judgement's ``status`` says what happened:

* ``ok``: the judge answered and the answer was scored; ``score`` holds the TRIGScore.
* ``unscorable``: the judge answered, but no rating word could be found in its answer.
* ``error``: generation or judging failed; ``error`` says why and ``error_stage`` where.

Only ``ok`` judgements carry a score: a failure is never written as one.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Final, Literal, Protocol, TypeAlias, TypeGuard

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from trig_stream.dimensions import Dimension, Task, pair_holds, split_pair
from trig_stream.hashing import sample_digest

SCHEMA_VERSION = 1
# The format of journal and quarantine lines. Bump it when a line gains a field, or a field
# widens its type, that an older build would refuse: the older build then skips such a line
# with a warning that a later trig-stream wrote it. The manifest has a format of its own,
# bumped alike (manifest.MANIFEST_VERSION): a bump here would make an older build skip
# every line of a run directory that it reads as well as ever.

Status: TypeAlias = Literal["ok", "unscorable", "error"]
Stage: TypeAlias = Literal["generate", "judge"]
TopLogprobs: TypeAlias = list[tuple[str, float]]
JudgementKey: TypeAlias = tuple[str, str, str, str]
"""(model, data_id, dimension, metric): what a run judges exactly once."""


MAX_NAME_CHARS: Final = 128
"""The longest safe name (:data:`SAFE_NAME`)."""
SAFE_NAME = re.compile(  # \Z: "$" lets a final newline in
    rf"\A[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_NAME_CHARS - 1}}}\Z"
)
"""What a name that becomes a file or folder name may be: a model's, a metric's, a data_id."""
_SAFE_CHARACTERS = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]*\Z")


def is_safe_name(name: str) -> bool:
    """Whether ``name`` can name a file or folder of a run directory (no ``..``, no ``/``)."""
    return bool(SAFE_NAME.match(name)) and ".." not in name


def safe_name_problem(name: str) -> str | None:
    """What keeps ``name`` from being a safe name (``must ...``), or None if it is one."""
    rules = []
    if not _SAFE_CHARACTERS.match(name) or ".." in name:
        rules.append(
            "start with a letter or digit and use only letters, digits, '.', '_' and '-', "
            "without '..'"
        )
    if len(name) > MAX_NAME_CHARS:
        rules.append(f"be at most {MAX_NAME_CHARS} characters long, not {len(name)}")
    return "must " + ", and ".join(rules) if rules else None


COMPARISON_FILE: Final = "comparison.md"
"""The report's file beside its models' folders (``report/<model>/``): no model's name."""


CASE_CLASH: Final = (
    "a model's name names its folders in the run directory (images/<task>/<name>, "
    "report/<name>), and a file system that ignores case (macOS's and Windows' by default) "
    "holds the two as one folder, where one model's judgements would score the other's "
    "pictures: rename one of them (in a run directory made before this rule, by an "
    "earlier version, the renamed model's results stay under its old name, which the run "
    "no longer reads, and it is generated and judged again; or start a new run directory "
    "with --new-run)"
)
"""Why two generators' names may not differ only in case."""


def is_reserved_model_name(name: str) -> bool:
    """Whether ``name`` would name a file the report writes beside the models' folders (in
    any case: a file system may not tell them apart)."""
    return name.lower() == COMPARISON_FILE


def storable_text(text: str) -> str:
    """``text`` as a record can store it: a lone surrogate (half a character, which JSON can
    carry but UTF-8 cannot) written as its escape, ``\\ud83d``; other text unchanged."""
    if text.isascii():  # almost all text, and a check that costs nothing
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
"""C0 controls but tab and newline, DEL and the C1 controls (a lone 0x9b starts a sequence in
some terminals, as ESC [ does)."""


def printable(text: str) -> str:
    """``text`` with each control character but tab and newline written as ``\\xNN``.

    Text from outside (a server's error body, an exception, a hand-edited journal) reaches a
    terminal: an ESC sequence in a judge server's error reply would clear the screen, retitle
    the window or swallow what follows. The reasons records keep, and the messages the command
    prints of exceptions, pass through here, so what is shown is text, never a command.
    """
    return _CONTROLS.sub(lambda found: f"\\x{ord(found.group()):02x}", text)


_LINE_BREAKS: Final = str.maketrans({"\n": "\\n", "\t": "\\t"})


def one_line(text: str) -> str:
    """``text`` as :func:`printable` shows it, with newlines and tabs written as ``\\n`` and
    ``\\t`` too (a carriage return is ``\\x0d`` already): what stays on one line.

    For a name from a file a hand may have edited (a manifest's run name, a model's name)
    shown where one line is all there is (``watch``'s progress line, the dashboard's status
    line): :func:`printable` keeps a newline, which there ends the line and starts one that
    reads as the program's own.
    """
    return printable(text).translate(_LINE_BREAKS)


Reason: TypeAlias = Annotated[str, AfterValidator(printable)]
"""Why something failed, as told from outside (a server, an exception, a hand edit): kept
with its control characters escaped, so showing it never commands a terminal."""


def exact_number(value: float) -> str:
    """``value`` as the shortest text that reads back as it: 0.8 as ``0.8``, 1.0 as ``1``,
    0.8000001 whole. ``:g`` rounds to six significant digits, so a threshold of 0.8000001 was
    shown as 0.8 beside a correlation of exactly 0.8 "below" it."""
    short = f"{value:g}"
    return short if float(short) == value else repr(value)


def is_finite_number(value: object) -> TypeGuard[int | float]:
    """Whether ``value`` can be a score: an int or float (not a bool), neither NaN nor infinite
    (nor an int too large for a float)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Sample(_Record):
    """One TRIG prompt, as read from the dataset.

    The source / reference image of p2p and s2p samples is either a file (``source_path``)
    or bytes embedded in a parquet row (``source_bytes``); both stay encoded until a
    generator asks for the picture.
    """

    schema_version: int = SCHEMA_VERSION
    data_id: str
    task: Task
    prompt: str
    dimensions: tuple[Dimension, Dimension]
    dimension_prompt: tuple[str, ...] = ()
    parent_dataset: tuple[str, ...] = ()
    img_id: str = ""
    item: str | None = None
    source_path: Path | None = None
    source_bytes: bytes | None = Field(default=None, repr=False, exclude=True)

    @property
    def pair(self) -> str:
        """The pair as ``A_B`` in the sample's own order."""
        return f"{self.dimensions[0]}_{self.dimensions[1]}"

    @property
    def digest(self) -> str:
        """What this sample asks, as :func:`~trig_stream.hashing.sample_digest` names it; every
        judgement of the sample records it. Computed on each call (~1.5 us): a cached value
        would travel with ``model_copy`` into a copy with another prompt."""
        return sample_digest(self.task, self.prompt, self.pair, self.item, self.img_id)


@dataclass(frozen=True, slots=True)
class RecordedPair:
    """What a judgement written by a trig-stream older than sample digests (before eb40369)
    tells of what its sample asked: the pair alone (``A_B`` in the record's order), where a
    later one records the :attr:`Sample.digest`. A record whose pair differs from it asks
    something else; an edit of its prompt, item or img_id cannot be told."""

    pair: str


SampleAsked: TypeAlias = str | RecordedPair
"""What the judgements of a sample in a run directory recorded it asked: its
:attr:`Sample.digest`, or, in lines older than the digest, its pair (:class:`RecordedPair`)."""


class PromptRewrite(_Record):
    """How a sample's prompt was rewritten before generation (DTM prompt rewriting).

    Attributes:
        status: ``rewritten``, or ``fallback`` when the rewrite failed and the original prompt
            was used.
        relation: the pair's relation code in the DTM the rewrite followed.
        prompt: the prompt the generator was given.
        error: why the rewrite failed (``fallback`` only).
    """

    status: Literal["rewritten", "fallback"]
    relation: int
    prompt: str
    error: Reason | None = None


class GeneratedImage(_Record):
    """An image on disk, ready to be judged: freshly generated or found from an earlier run."""

    schema_version: int = SCHEMA_VERSION
    model: str
    data_id: str
    path: Path
    seed: int | None = None
    latency_s: float = 0.0
    reused: bool = False
    """True when the file was already on disk and valid, so nothing was generated."""
    prompt_rewrite: PromptRewrite | None = None


def _format_known(version: int) -> int:
    if version > SCHEMA_VERSION:
        raise ValueError(
            f"written by a later trig-stream (record format {version}; this one reads formats "
            f"up to {SCHEMA_VERSION}): read it with that version"
        )
    return version


class JudgeFingerprint(_Record):
    """Everything about a judge that changes its scores."""

    backend: str
    model: str
    template_version: str = ""
    scorer: str = ""
    confidence: bool = False
    params: dict[str, Any] = Field(default_factory=dict)


class Judgement(_Record):
    """The outcome of judging one image on one dimension with one metric."""

    schema_version: Annotated[int, Field(strict=True, ge=1), AfterValidator(_format_known)] = (
        SCHEMA_VERSION
    )
    """A line of a later format is not read as this one: its fields may mean other things."""
    model: str
    data_id: str
    task: Task
    pair: str
    dimension: Dimension
    metric: str
    status: Status
    sample_digest: str | None = None
    """The sample's :attr:`Sample.digest` when it was judged (None in journals older than it)."""
    judge: JudgeFingerprint
    score: Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0.0, le=1.0)] | None = None
    """In [0, 1], as every scorer gives and the DTM's zone thresholds assume. Strict: a score
    written as text or as ``true`` (a hand edit) is no number the engine wrote, and no score."""
    top_logprobs: TopLogprobs | None = None
    image: str | None = None
    """Image path relative to the run directory; None when generation failed."""
    seed: int | None = None
    latency_s: float = 0.0
    attempts: int = 0
    error: Reason | None = None
    error_stage: Stage | None = None
    prompt_rewrite: PromptRewrite | None = None
    """Set when the generator rewrote the prompt (DTM rewriting)."""
    created_at: float = Field(default_factory=time.time)

    @model_validator(mode="after")
    def _score_only_when_ok(self) -> Judgement:
        if not pair_holds(self.pair, self.dimension):
            split_pair(self.pair)  # what is wrong with the pair itself, if anything
            raise ValueError(f"dimension {self.dimension} is not one of pair {self.pair}")
        if self.status == "ok" and self.score is None:
            raise ValueError("an ok judgement needs a score")
        if self.status != "ok" and self.score is not None:
            raise ValueError(f"a judgement with status {self.status!r} cannot carry a score")
        if self.status == "error" and not self.error:
            raise ValueError("an error judgement needs its reason in 'error'")
        return self

    @property
    def key(self) -> JudgementKey:
        """The identity a run judges exactly once."""
        return (self.model, self.data_id, self.dimension, self.metric)


class ScoredJudgement(Protocol):
    """What the analyses read of a judgement: a :class:`Judgement`, or the lighter
    :class:`~trig_stream.journal.JournalEntry` the read-only commands keep of one."""

    @property
    def model(self) -> str: ...
    @property
    def data_id(self) -> str: ...
    @property
    def pair(self) -> str: ...
    @property
    def dimension(self) -> Dimension: ...
    @property
    def metric(self) -> str: ...
    @property
    def status(self) -> Status: ...
    @property
    def score(self) -> float | None: ...


class QuarantinedRecord(_Record):
    """A dataset record that was refused, with the reason; the run goes on without it."""

    schema_version: int = SCHEMA_VERSION
    index: int
    """Position of the record in the dataset (0-based)."""
    data_id: str | None
    reason: Reason
    record: dict[str, Any]
    """The record as read, with bytes at any depth (embedded images) replaced by a note of
    their size, inline picture text in its image fields cut to its start and its length, and
    nesting past 16 levels cut to the start of its text."""
