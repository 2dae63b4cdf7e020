"""The two kinds of backend the engine drives: generators and judges.

A :class:`Generator` is blocking code (a diffusers pipeline, an image folder reader) that the
engine runs in worker threads, one per ``worker`` index, behind a capacity limiter. A
:class:`Judge` is async code (an HTTP client) that the engine calls concurrently, up to its
``concurrency``. Backends classify their own failures by raising the exceptions in
:mod:`trig_stream.errors`; the engine owns retries, timing and records. The worker threads
that run backends' blocking code, and what a hard stop leaves running in them, are in
:mod:`trig_stream.backends.threads`.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Self

# Named here by the README (what a hard stop leaves running), beside the backends it counts.
from trig_stream.backends.threads import threads_left_behind as threads_left_behind
from trig_stream.dimensions import Dimension
from trig_stream.errors import FatalBackendError
from trig_stream.records import JudgeFingerprint, PromptRewrite, Sample, TopLogprobs
from trig_stream.scoring import Scorer

if TYPE_CHECKING:
    from PIL.Image import Image

    from trig_stream.config import JudgeConfig, RunConfig


@dataclass(frozen=True, slots=True)
class EncodedPicture:
    """A picture already encoded as a PNG file's bytes: the engine writes them as they are.

    A generator whose pictures already are PNG files (an image folder, an image API) returns
    them this way, so the engine never decodes or encodes them again.
    """

    png: bytes
    seconds: float | None = None
    """How long making it took where it was made, when known: the engine records this as
    the image's generation time instead of its own timing of the call, which for a picture
    made elsewhere can include waiting there."""
    pixels_checked: bool = False
    """Whether the maker found ``png``'s pixel data whole (see
    :func:`trig_stream.png.pixel_data_problem`): the stored image then says so, and a resumed
    run reuses it without inflating it again."""


@dataclass(frozen=True, slots=True)
class TimedPicture:
    """A picture made in another process, with how long making it took there (the engine
    records that as the image's generation time, as for :attr:`EncodedPicture.seconds`)."""

    image: Image
    seconds: float


def check_pictures(generator: str, images: Sequence[object]) -> None:
    """Refuse an item of ``images`` (what a generate call returned) that is neither a
    picture nor an exception: a fault of the backend's code, the same for every batch. A
    :class:`TimedPicture` must hold a PIL image, an :class:`EncodedPicture` the PNG file's
    ``bytes``, and the ``seconds`` of either (if given) a finite number, 0 or more.

    Raises:
        FatalBackendError: one is something else, named with the generator's name.
    """
    for image in images:
        problem = _picture_problem(image)
        if problem is not None:
            raise FatalBackendError(f"generator {generator!r} is broken: {problem}")


def _picture_problem(image: object) -> str | None:
    """What is wrong with ``image``, an item a generate call returned; None if nothing."""
    from PIL.Image import Image as Picture

    if isinstance(image, TimedPicture):
        if not isinstance(image.image, Picture):
            return (
                "it returned a TimedPicture whose image is an object of type "
                f"{type(image.image).__name__}, not a PIL image"
            )
        return _seconds_problem("a TimedPicture", image.seconds)
    if isinstance(image, EncodedPicture):
        if not isinstance(image.png, bytes):
            return (
                "it returned an EncodedPicture whose png is an object of type "
                f"{type(image.png).__name__}, not bytes (the PNG file's)"
            )
        return (
            None if image.seconds is None else _seconds_problem("an EncodedPicture", image.seconds)
        )
    if not isinstance(image, Picture | Exception):
        return (
            f"it returned an object of type {type(image).__name__} where a PIL image, an "
            "EncodedPicture, a TimedPicture or an exception belongs"
        )
    return None


def _seconds_problem(kind: str, seconds: object) -> str | None:
    """What is wrong with a picture's ``seconds`` (it becomes the image's generation time,
    in the run's latency statistics); None if nothing."""
    if isinstance(seconds, bool) or not isinstance(seconds, numbers.Real):
        return (
            f"it returned {kind} whose seconds is an object of type "
            f"{type(seconds).__name__}, not a number"
        )
    if not math.isfinite(seconds) or seconds < 0:
        return (
            f"it returned {kind} whose seconds is {seconds!r}: how long making the "
            "picture took is a finite number of seconds, 0 or more"
        )
    return None


def checked_notes(notes: object) -> list[str]:
    """What a generator's :meth:`Generator.notes` returned, as its notes: any iterable of
    ``str`` (a list, a tuple, a set, a generator); a ``str`` alone is taken as one note (not
    one note per character).

    Raises:
        TypeError: they are no ``str`` and no iterable of ``str`` (bytes among them).
    """
    if isinstance(notes, str):
        return [notes]
    try:
        if isinstance(notes, bytes | bytearray):
            raise TypeError  # iterable, of ints: one note per byte is no note
        each = iter(notes)  # type: ignore[call-overload]
    except TypeError:
        raise TypeError(
            f"it returned an object of type {type(notes).__name__}, not a list of str"
        ) from None
    taken = list(each)  # a generator's own failure is told as it is
    wrong = next((note for note in taken if not isinstance(note, str)), None)
    if wrong is not None:
        raise TypeError(
            f"it returned an object of type {type(wrong).__name__} among its notes, where "
            "a str belongs"
        )
    return taken


def shrunk_size(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """The size, of the same shape as ``width`` x ``height`` (to rounding), that an image of
    more than ``max_pixels`` pixels is shrunk to, judges' ``max_pixels``: at most that many
    pixels, however thin the image (a side kept at one pixel does not let the other grow)."""
    scale = (max_pixels / (width * height)) ** 0.5
    new_width, new_height = max(1, int(width * scale)), max(1, int(height * scale))
    if new_width * new_height > max_pixels:  # one side was held at 1
        if new_width == 1:
            new_height = max_pixels
        else:
            new_width = max_pixels
    return new_width, new_height


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One image to make for one sample."""

    model: str
    sample: Sample
    seed: int


class Generator(ABC):
    """Makes images for samples. Every method but ``fingerprint``, ``stop_loading`` and
    ``stop_waiting`` blocks and runs in a thread.

    Attributes:
        name: the model's name in the run (its image folder).
        workers: how many calls the engine makes at once, each from a worker thread (the
            ``diffusers`` generator runs two per device: one running, the next waiting).
        batch_size: the most requests one :meth:`generate` call receives; the engine sends
            what is ready, without waiting to fill a batch.
        draws_from_the_prompt: whether its images are made from the prompt it is given
            (images made elsewhere are not: a prompt rewriter has nothing to wrap).
        reads_source_image: whether :meth:`generate` reads a p2p / s2p sample's source
            image (``source_path`` or ``source_bytes``). The dataset's source images are
            looked up and decoded only when a generator of the run reads them: judging
            images already made (an image folder) needs none. True unless a generator says
            otherwise, so a third party's generator gets the images it may read.
        wrapped: the generator this one wraps (``dtm_rewrite``'s inner one), when its
            :meth:`all_requested` does nothing but pass the call on to it: the run then
            collects the data_ids it passes over only when the wrapped one hears of them
            (see :func:`hears_of_whole_input`). None for a generator that wraps none.
    """

    name: str
    workers: int = 1
    batch_size: int = 1
    draws_from_the_prompt: ClassVar[bool] = True
    reads_source_image: bool = True
    wrapped: Generator | None = None

    @abstractmethod
    def fingerprint(self) -> dict[str, Any]:
        """Everything that changes the images this generator makes (checkpoint, steps...)."""

    def fingerprint_defaults(self) -> dict[str, Any]:
        """What a field :meth:`fingerprint` may leave out stands for, nested as the
        fingerprint is (``{"call": {"num_inference_steps": 28}}``): a resume takes a field
        that one of the stored and the configured fingerprints leaves out and the other sets
        to this value as unchanged. Asked after :meth:`check_environment`, which may be where
        they are learnt. By default none: every field compares as it is.
        """
        return {}

    def check_environment(self) -> None:  # noqa: B027 - optional hook
        """Check what :meth:`load` needs from this machine, without loading or connecting:
        an environment variable, a local folder. ``trig-stream validate`` calls it.

        Raises:
            FatalBackendError: something :meth:`load` needs is missing.
        """

    def load(self) -> None:  # noqa: B027 - optional hook
        """Load weights or open resources; called once, in a worker thread, before use."""

    def stop_loading(self) -> None:  # noqa: B027 - optional hook
        """Cut short a :meth:`load` (or :meth:`check_environment`) that a stop left running
        in its thread, if it can be.

        Called in the event loop's thread, so it must not block. A load that can end early
        (a pipeline loading in a child process, which is killed) then raises, and what it
        raises goes nowhere; :meth:`close` is not called after a load that raised, so the
        load releases what it holds itself. By default nothing happens: the load runs to its
        end in its thread, and :meth:`close` then releases it (see
        :func:`~trig_stream.backends.threads.load_in_thread`).
        """

    def stop_waiting(self) -> None:  # noqa: B027 - optional hook
        """The run is stopping (gracefully or hard): end at once any wait of a :meth:`generate`
        call that is no work in flight, such as the wait for a retry (a server's Retry-After
        may ask for minutes), and ask for nothing more after it. An item a wait held
        is then returned as :class:`~trig_stream.errors.NotAsked`: the run records nothing for
        it, and a resume asks for it.

        Called in the event loop's thread while the generator is in use by the run, so it
        must not block; a later :meth:`load` starts afresh. By default nothing happens: a
        graceful stop lets a call in flight finish, its waits included.
        """

    @abstractmethod
    def generate(
        self, requests: Sequence[GenerationRequest], *, worker: int, cancel: threading.Event
    ) -> Sequence[Image | EncodedPicture | TimedPicture | Exception]:
        """Make one image per request, in order; a failed item is its exception.

        A failed item's exception says whose fault it is: an
        :class:`~trig_stream.errors.ItemError` when the item's own (its source image cannot
        be read, a refusal of its prompt), any other when the call failed (the model's code
        raised). Before the generator has made a picture in the run, a few calls that fail
        so, or that raise, stop the run: every call would likely fail the same way.

        An image is a PIL image, an :class:`EncodedPicture` when it already is a PNG file's
        bytes, or a :class:`TimedPicture` when it was made in another process.

        Args:
            requests: 1 to ``batch_size`` requests.
            worker: index of the calling worker (0 to ``workers - 1``), which tells a
                generator with several devices which one to use.
            cancel: set when the run is being cancelled; long loops should check it between
                steps and return early (the engine discards the results).

        Raises:
            FatalBackendError: nothing can be generated at all (the run stops).
        """

    def all_requested(  # noqa: B027 - optional hook
        self, passed_over: AbstractSet[str] = frozenset()
    ) -> None:
        """Told, in a worker thread just before :meth:`close`, that the run went through its
        whole input: every sample it had for this generator was asked for (a graceful stop
        that came after that, its last calls in flight, included), or passed over. Not called
        after a stop that left samples unreached, a cancellation or a failure: what the run
        never asked for is then no sign of a file or sample in excess (see :meth:`notes`);
        nor when the generator never loaded (nothing to generate: a finished run directory,
        every image on disk), as :meth:`close` is not.

        Args:
            passed_over: the data_ids of the dataset selection's samples that the run did
                not ask this generator for: already judged (by an earlier run in the
                directory, or measured by no judge), or whose image an earlier run left on
                disk (reused); and those of the records the run quarantined. With the
                samples it was asked for, they are the whole selection. Collected only for
                a generator whose class overrides this hook (see
                :func:`hears_of_whole_input`). Optional to accept: an override that takes
                no argument (the hook's first form) is called without it.
        """

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources; called once, in a worker thread, at the end of the run."""

    def notes(self) -> list[str]:
        """What the user should hear about after :meth:`close` (e.g. files left unused).

        Returns:
            A list of ``str``, one per note (any iterable of ``str`` is taken: a tuple, a
            set, a generator). A ``str`` alone is taken as one note; anything else (or a
            note that is no ``str``) is reported as a broken ``notes()``, in the run's
            notes, in place of them: the run's outcome stands.
        """
        return []

    def prompt_rewrite(self, data_id: str) -> PromptRewrite | None:
        """How the prompt of ``data_id`` was rewritten for its latest image, if it was.

        Called once per new image, in a worker thread, after :meth:`generate` returned it.
        """
        return None


def hears_of_whole_input(generator: Generator) -> bool:
    """Whether ``generator`` overrides :meth:`Generator.all_requested` (through the generator
    it wraps, see :attr:`Generator.wrapped`): the run then collects the data_ids it passes
    over for it (a set of the selection's ids, kept for the run)."""
    if type(generator).all_requested is Generator.all_requested:
        return False
    return generator.wrapped is None or hears_of_whole_input(generator.wrapped)


def tell_all_requested(generator: Generator, passed_over: AbstractSet[str]) -> None:
    """Call ``generator``'s :meth:`~Generator.all_requested`, with ``passed_over`` unless its
    override takes no argument (the hook's first form, still met in third parties' code)."""
    if _takes_no_argument(type(generator).all_requested):
        generator.all_requested()
    else:
        generator.all_requested(passed_over)


@functools.cache
def _takes_no_argument(method: Callable[..., None]) -> bool:
    """Whether ``method`` (a generator class's ``all_requested``, unbound) takes no argument
    but ``self``; looked at once per method."""
    try:
        parameters = list(inspect.signature(method).parameters.values())[1:]
    except (TypeError, ValueError):  # no signature to read (a builtin): pass the argument
        return False
    return not any(
        p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL) for p in parameters
    )


def reads_source_images(generators: Iterable[Generator]) -> bool:
    """Whether one of a run's generators reads p2p / s2p source images (see
    :attr:`Generator.reads_source_image`): the dataset's are then looked up and checked."""
    return any(generator.reads_source_image for generator in generators)


@dataclass(frozen=True, slots=True)
class PreparedImage:
    """An image made ready for a judge once and shared by all its dimension requests.

    Attributes:
        path: the image file.
        payload: what the backend sends for it (a data URL, a file URL), or None.
    """

    path: Path
    payload: Any = None


@dataclass(frozen=True, slots=True)
class JudgeRequest:
    """One (image, dimension) question to a judge."""

    model: str
    sample: Sample
    dimension: Dimension
    image: PreparedImage
    attempt: int


@dataclass(frozen=True, slots=True)
class JudgeReply:
    """A judge's answer: the first token's top logprobs, or a score it computed itself.

    Attributes:
        top_logprobs: ``(token, logprob)`` pairs of the first answer token; None when the
            answer came without them.
        score: set by metrics that compute a score directly (not from logprobs).
        text: the answer text, for the record.
        unscorable: why there is nothing to score, when the judge answered but found nothing
            to measure (a metric's None): an ``unscorable`` judgement, as an answer without a
            rating word is, not an ``error`` that ``--retry-errors`` would ask again.
    """

    top_logprobs: TopLogprobs | None = None
    score: float | None = None
    text: str = ""
    unscorable: str | None = None


@dataclass(frozen=True, slots=True)
class ServerLoad:
    """What a judge's server says about its queue (vLLM's ``/metrics`` gauges).

    Attributes:
        running: requests the server is processing now.
        waiting: requests queued at the server, not yet started.
    """

    running: int
    waiting: int


class Judge(ABC):
    """Scores images on dimensions. ``judge`` is called concurrently up to ``concurrency``.

    Attributes:
        name: the metric's name in the run (``trigscore`` by default).
        concurrency: the most requests in flight at once.
        scorer: how top logprobs become a score (see :mod:`trig_stream.scoring`).
        confidence: whether the score is weighted by the top rating's probability.
        dimensions: the dimensions this judge measures; None for all. A judge is never asked
            about another dimension (a toxicity classifier measures only ``R-T``), so no
            judgement, not even an error, is made for it.
        unreached_hint: what to check, said when the run stops because this judge has
            answered no request at all (see :meth:`unreached_everywhere`).
    """

    name: str
    concurrency: int = 16
    scorer: Scorer = "robust"
    confidence: bool = False
    dimensions: frozenset[Dimension] | None = None
    unreached_hint: ClassVar[str] = "is its server running, at the address in the config?"

    def __init__(
        self,
        name: str,
        options: Any,
        *,
        concurrency: int = 16,
        scorer: Scorer = "robust",
        confidence: bool = False,
    ) -> None:
        self.name = name
        self.options = options
        self.concurrency = concurrency
        self.scorer = scorer
        self.confidence = confidence

    @classmethod
    def from_config(cls, entry: JudgeConfig, options: Any, config: RunConfig) -> Self:
        """Build the judge a ``[[judges]]`` entry describes (nothing is connected yet).

        This default suits judges constructed as ``cls(name, options, *, concurrency,
        scorer, confidence)``; others override it.
        """
        build: Any = cls
        judge: Self = build(
            entry.name,
            options,
            concurrency=entry.concurrency,
            scorer=entry.scorer,
            confidence=entry.confidence,
        )
        return judge

    def measures(self, dimension: Dimension) -> bool:
        """Whether this judge is asked about ``dimension`` (see :attr:`dimensions`)."""
        return self.dimensions is None or dimension in self.dimensions

    @abstractmethod
    def fingerprint(self) -> JudgeFingerprint:
        """Everything that changes this judge's scores."""

    def check_environment(self) -> None:  # noqa: B027 - optional hook
        """Check what :meth:`open` needs from this machine, without loading or connecting:
        an environment variable, a command on PATH, a local folder. ``trig-stream validate``
        calls it.

        Raises:
            FatalBackendError: something :meth:`open` needs is missing.
        """

    def opening(self) -> str:
        """What :meth:`open` does, when it can take a while (for progress displays)."""
        return "connecting"

    def opens_slowly(self) -> bool:
        """Whether :meth:`open` takes long: it loads a model or starts a server. A resumed run
        with such a judge first reads its dataset for work left (a sample some model still
        owes a judgement) and, with none, opens no judge. False by default: a judge that
        only connects opens at once, sooner than a large dataset is read."""
        return False

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Connect or load; called once before the first request, or not at all (a resumed
        run with nothing left to judge; see :meth:`opens_slowly`)."""

    def closing(self) -> str | None:
        """What :meth:`aclose` does, when it may take a while (for progress displays): e.g.
        stopping a server given a grace period. None (the default) when it is quick."""
        return None

    def connections(self, in_flight: int) -> int:
        """Open files (sockets) this judge holds with ``in_flight`` requests at once, for the
        engine's check of the process's open-file limit. None by default."""
        return 0

    def prepare(self, path: Path) -> PreparedImage:
        """Read and encode an image once for all its requests; runs in a worker thread."""
        return PreparedImage(path=path)

    @abstractmethod
    async def judge(self, request: JudgeRequest) -> JudgeReply:
        """Ask one question.

        Raises:
            RetryableError: transient failure (the engine retries with backoff).
            UnreachableError: a retryable failure without any answer of the judge's server
                (no connection, none in time): when the judge has answered nothing yet and
                a request spends its retries on one, the run stops.
            AnswerTimeoutError: no answer within the timeout (an ``UnreachableError``, and a
                sign of load that lowers an adaptive limit, as a ``RateLimitError`` does).
            ItemError: this request failed for good.
            FatalBackendError: nothing will work (the run stops).
        """

    def unreached_everywhere(self) -> bool:
        """Whether every server this judge sends requests to has been tried and got no
        answer (a refused, reset or dropped connection, none in time). The engine stops a
        run whose judge has answered nothing yet only then: with several servers, one that
        is down says nothing of the others. True by default: a judge with one server has
        tried it once a request got no answer."""
        return True

    async def server_load(self) -> ServerLoad | None:
        """The load its server reports now, for adaptive concurrency; None when unknown.

        Called from time to time while the run lasts, only when the judge's adaptive
        concurrency is on. Must not raise for an unreachable server: return None.
        """
        return None

    def stop_waiting(self) -> None:  # noqa: B027 - optional hook
        """The run stops gracefully (:meth:`Engine.stop <trig_stream.engine.Engine.stop>`):
        a :meth:`judge` call still waiting for its turn, such as a request queued for an
        in-process model's next batch, should not be asked any more but raise
        :class:`~trig_stream.errors.NotAsked`: the run records nothing for it, and a resume
        asks for it. Work in flight (the batch running, a request on the wire) finishes and
        is recorded.

        Called in the event loop's thread while the judge is in use by the run, so it must
        not block; a later :meth:`open` starts afresh. By default nothing happens: a call
        finishes, however long it waited for its turn.
        """

    def stop_now(self) -> None:  # noqa: B027 - optional hook
        """The run stops hard (:meth:`Engine.cancel <trig_stream.engine.Engine.cancel>`):
        :meth:`aclose`, or an :meth:`open` under way, should wait for nothing it can cut
        short (a server's grace period), even if it is waiting already. Called in the event
        loop's thread, at any time (before :meth:`open`, during :meth:`aclose`); must not
        raise."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections; called once at the end of the run."""
