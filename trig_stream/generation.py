"""The generation stage: one model's generator run in worker threads, images written to disk.

Each of the generator's ``workers`` takes a sample from the model's buffer, adds whatever else
is already waiting up to ``batch_size`` (it never waits to fill a batch), and runs one
blocking ``generate`` call in a thread behind the model's own capacity limiter. A writer per
worker encodes and writes the pictures while the next batch is generated, each atomically
before its path moves on, so a judgement never points at a partial file. A valid image left
by an earlier run is reused instead of generated again.

A failed item is data: an ``error`` judgement per dimension, and the run goes on. One case is
not: a generator that has made no image yet whose calls keep failing as a whole (an option
every call trips over, a pipeline that cannot serve the run, pictures that cannot be written)
would turn the whole dataset into errors, so after :data:`FAILED_CALLS_TO_STOP` such calls
the run stops, as it does for a judge that can never serve it. An item that fails with an
:class:`~trig_stream.errors.ItemError` failed for its own reason (an unreadable source image,
a refusal) and says nothing about the generator.

The generator loads when the first batch needs a new image: a run whose images are all on
disk, or that has nothing left to do, never loads it. A stop, graceful or hard, does not wait
for a load, and a hard stop does not wait for a close either (see
:class:`~trig_stream.backends.threads.ThreadCalls`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from trig_stream.backends.base import (
    EncodedPicture,
    GenerationRequest,
    Generator,
    TimedPicture,
    check_pictures,
    checked_notes,
    tell_all_requested,
)
from trig_stream.backends.threads import ThreadCalls, call_in_thread, load_in_thread
from trig_stream.errors import (
    ConfigError,
    ConfigWriteError,
    FatalBackendError,
    ItemError,
    NotAsked,
    RunDirError,
    TrigStreamError,
)
from trig_stream.pipeline import (
    ImageItem,
    RunContext,
    WorkItem,
    describe_error,
    failed_judgement,
    send_now,
    take_ready,
    unless,
)
from trig_stream.png import (
    encode_png,
    not_png_file,
    with_sample_digest,
)
from trig_stream.records import GeneratedImage, Judgement, PromptRewrite
from trig_stream.reuse import reusable_image
from trig_stream.run_dir_access import refuse_a_folder_at_an_image

if TYPE_CHECKING:
    from PIL.Image import Image


class GenerationStage:
    """Runs one generator over its model's buffer of work items."""

    def __init__(
        self, context: RunContext, generator: Generator, *, made_before: bool = False
    ) -> None:
        """``made_before``: an earlier run in the directory judged this model's images, so
        the generator is known to work (a ``--retry-errors`` run asks it only for the samples
        it failed on, and those may fail again)."""
        self._context = context
        self._generator = generator
        self._name = f"generator {generator.name!r}"
        # A hard stop does not wait for a generate call (an images API may take a minute to
        # answer): the call ends in its thread, and the generator is closed after it.
        self._calls = ThreadCalls(self._name, instance=generator)
        # A batch's large pictures are encoded at once, one per thread: beside a pipeline
        # that holds the interpreter lock, each encoding waits for it several times, and
        # those waits overlap (8 pictures of 512x512: 520 ms one after another, 200 ms at
        # once, on 2 cores). Threads start on first use: small pictures never need them.
        self._encoders = ThreadPoolExecutor(
            max_workers=max(1, min(os.cpu_count() or 1, generator.workers * generator.batch_size)),
            thread_name_prefix=f"{generator.name} png",
        )
        self._loading = anyio.Lock()
        self._loaded = False
        """Whether the generator has loaded: on the first batch that needs a new image, so a
        run with nothing left to make (a finished run directory) never loads it."""
        self._made_picture = made_before
        """Whether the generator is known to work: a picture it made in this run was
        written, or an earlier run's judgements show it made some."""
        self._tried = 0
        """The generate calls made before the first picture."""
        self._failed = 0
        """Those of them that failed as a whole (see :attr:`_Made.failure`)."""
        self._pictures_to_write = 0
        """Calls that returned pictures which are not written yet."""
        self._dropped_any = False
        """Whether a stop dropped a sample of this stage's input, never asked for."""
        self._calling: anyio.CancelScope | None = None
        """The workers' scope (while they run): cancelled when failed calls stop the run
        (see :meth:`_count_call`), while the writers write what the counted calls made."""
        self._failed_calls: FatalBackendError | None = None
        """Why failed calls stop the run, raised once the writers are done."""

    async def run(
        self,
        receive: MemoryObjectReceiveStream[WorkItem],
        image_send: MemoryObjectSendStream[ImageItem],
        judgement_send: MemoryObjectSendStream[Judgement],
    ) -> None:
        generator = self._generator
        # The model's own limiters keep its blocking calls off the shared default thread
        # pool, where they could starve dataset reads and journal writes.
        compute = anyio.CapacityLimiter(generator.workers)
        writing = anyio.CapacityLimiter(generator.workers)
        async with receive, image_send, judgement_send:
            finished = False
            try:
                async with (
                    anyio.create_task_group() as writers,
                    anyio.create_task_group() as workers,
                ):
                    self._calling = workers.cancel_scope
                    for worker in range(generator.workers):
                        # One made batch may wait while the next is generated: PNG encoding
                        # and fsyncs never hold up the pipeline, and at most two batches of
                        # pictures per worker are in memory.
                        made_send, made_receive = anyio.create_memory_object_stream[_Made](1)
                        workers.start_soon(
                            self._worker, worker, compute, receive.clone(), made_send
                        )
                        writers.start_soon(
                            self._writer,
                            writing,
                            made_receive,
                            image_send.clone(),
                            judgement_send.clone(),
                        )
                if self._failed_calls is not None:
                    raise self._failed_calls  # its calls' error judgements are sent by now
                # Every sample was asked for: its input ran out, not cut short by a stop; or
                # a graceful stop came after the whole dataset was queued (its last batch
                # generating) and this stage dropped none of it.
                finished = not self._context.stopping.is_set() or (
                    self._context.counters.dataset_read
                    and not self._dropped_any
                    and not self._context.hard_stopping.is_set()
                )
            finally:
                # A cancel or a failure leaves samples in the buffer (a graceful stop drops
                # them as they come): no longer queued, or the buffer showed full and the
                # dashboard the samples generating for ever.
                left: list[WorkItem] = []
                take_ready(receive, left, None)
                self._drop(left)
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(self._encoders.shutdown)  # writers are done
                    if self._loaded:
                        # A hard stop does not wait for a close that hangs (a device that
                        # no longer answers): it ends in its thread.
                        release = self._calls.close(
                            partial(self._close_generator, finished=finished), limiter=compute
                        )
                        await unless(self._context.hard_stopping, release)
                    self._note_generator_notes()

    async def _load(self, limiter: anyio.CapacityLimiter) -> bool:
        """Load the generator, once for all its workers; False when a stop came first.

        A stop, even a graceful one, does not wait for a load (minutes, for large weights):
        nothing is in flight yet. Its thread finishes the load and closes the generator,
        unless the generator can cut it short (:meth:`~trig_stream.backends.base.Generator.
        stop_loading`: a pipeline loading in a child process is killed).
        """
        generator = self._generator
        async with self._loading:
            if self._loaded:
                return True
            if self._context.stopping.is_set():
                return False
            counts = self._context.counters.model(generator.name)
            counts.loading = True
            try:
                load = load_in_thread(
                    generator.load,
                    generator.close,
                    limiter=limiter,
                    backend=self._name,
                    stop=self._stop_loading,
                    instance=generator,
                )
                if not await unless(self._context.stopping, load):
                    return False
            except TrigStreamError as exc:
                if (named := _name_in(exc, self._name)) is not None:
                    raise named from exc
                raise
            except Exception as exc:
                raise FatalBackendError(f"{self._name} failed to load: {exc}") from exc
            finally:
                counts.loading = False
            self._loaded = True
            return True

    def _stop_loading(self) -> None:
        """Cut the load a stop leaves behind short; what ``stop_loading()`` raises, a
        ``KeyboardInterrupt`` aside, is a note, as when it cuts a check of this machine."""
        try:
            self._generator.stop_loading()
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # the load then runs to its end, left behind
            # A SystemExit left the engine raw; an Exception was only logged.
            self._context.counters.notes.append(
                f"{self._name}: stop_loading() failed: {describe_error(exc)}"
            )

    def _close_generator(self, *, finished: bool) -> None:
        # The run's outcome is written by now: a failing close is worth a note, not the run.
        generator = self._generator
        if finished:
            passed_over: AbstractSet[str] = self._context.passed_over.get(
                generator.name, frozenset()
            )
            self._call_noting(
                "all_requested()", partial(tell_all_requested, generator, passed_over)
            )
        self._call_noting("closing it", generator.close)

    def _call_noting(self, what: str, method: Callable[[], None]) -> None:
        """``method()``, at the run's end: what it raises becomes a note naming ``what``."""
        try:
            method()
        except Exception as exc:
            self._note(f"{what} failed: {describe_error(exc)}")
        except BaseException as exc:
            # SystemExit, or an asyncio.CancelledError of its own: in this thread, which
            # never calls back into the event loop, it would end nothing (as the run's
            # cancellation, it turned a finished run into a cancelled one).
            self._note(f"{what} failed: it raised {describe_error(exc)}")

    def _note_generator_notes(self) -> None:
        try:
            notes = checked_notes(self._generator.notes())
        except Exception as exc:  # a backend's bug: the run's outcome stands
            self._note(f"its notes() failed: {describe_error(exc)}")
            return
        except BaseException as exc:
            # SystemExit or KeyboardInterrupt (a library calling sys.exit()), or a
            # CancelledError of its own: a plain call, it is no cancellation and no Ctrl-C of
            # the caller's (unlike a stop hook's in the caller's own stop(), which lets a
            # KeyboardInterrupt out). Let out, it failed a finished run and lost the
            # judgements still in flight; under asyncio it broke out of the event loop.
            self._note(f"its notes() failed: it raised {describe_error(exc)}")
            return
        for note in notes:
            self._note(note)

    def _note(self, note: str) -> None:
        self._context.counters.notes.append(f"{self._generator.name}: {note}")

    async def _worker(
        self,
        worker: int,
        limiter: anyio.CapacityLimiter,
        receive: MemoryObjectReceiveStream[WorkItem],
        made_send: MemoryObjectSendStream[_Made],
    ) -> None:
        async with receive, made_send:
            async for first in receive:
                if self._context.stopping.is_set():
                    self._drop([first])
                    continue
                batch = [first]
                take_ready(receive, batch, self._generator.batch_size)
                made = await self._calls.run(self._generate_batch, worker, batch, limiter=limiter)
                if made is None:  # it needs the generator, which has not loaded yet
                    if not await self._load(limiter):
                        self._drop(batch)  # a stop came first
                        continue
                    made = await self._calls.run(
                        self._generate_batch, worker, batch, limiter=limiter
                    )
                    assert made is not None
                if made.made_picture:
                    self._pictures_to_write += 1  # counted once written
                elif made.called:
                    self._count_call(made_picture=False, failure=made.failure, written=False)
                # Even as failed calls stop the run (this one's count, say): a counted call's
                # samples get their judgements. A hard stop or a failure ends the writer (and
                # the next receive raises the cancellation).
                with anyio.CancelScope(shield=True), suppress(anyio.BrokenResourceError):
                    await made_send.send(made)

    def _drop(self, batch: list[WorkItem]) -> None:
        # A stop: queued samples are new work; drop them, and take them off the model's
        # count (the dashboard showed them generating forever).
        counts = self._context.counters.model(self._generator.name)
        self._dropped_any = self._dropped_any or bool(batch)
        for work in batch:
            counts.queued -= 1
            counts.to_judge -= len(work.todo)
            counts.dropped += 1

    def _count_call(self, *, made_picture: bool, failure: str | None, written: bool) -> None:
        """Count one generate call towards the stop rule, in the event loop: a call that
        returned no picture when it ends, one that did once its pictures are ``written`` (a
        picture that cannot be written is no sign that the generator works).

        The call that stops the run cancels the workers (their calls still running end in
        their threads, unused); the writers write what the counted calls made, and then the
        stage raises the stop.
        """
        if self._made_picture or self._failed_calls is not None:
            return
        if made_picture:
            self._made_picture = True  # it works: failures from now on are its items'
            return
        self._tried += 1
        if failure is not None:  # else its items failed for their own reasons
            self._failed += 1
        if self._failed < FAILED_CALLS_TO_STOP:
            return
        if self._pictures_to_write and not written:
            return  # an earlier call's pictures, still to write, may show that it works
        calls = (
            f"its first {self._failed} calls all failed"
            if self._failed == self._tried
            else f"{self._failed} of its first {self._tried} calls failed"
        )
        self._failed_calls = FatalBackendError(
            f"{self._name} has made no image yet and {calls} (the last: {failure}); check its "
            "options, then run again with --retry-errors to ask again the samples it failed"
        )
        assert self._calling is not None  # counted while the workers run
        self._calling.cancel()

    async def _writer(
        self,
        limiter: anyio.CapacityLimiter,
        receive: MemoryObjectReceiveStream[_Made],
        image_send: MemoryObjectSendStream[ImageItem],
        judgement_send: MemoryObjectSendStream[Judgement],
    ) -> None:
        counters = self._context.counters
        counts = counters.model(self._generator.name)
        async with receive, image_send, judgement_send:
            async for made in receive:
                outcomes = await anyio.to_thread.run_sync(self._write, made, limiter=limiter)
                now = time.monotonic()
                for work, outcome in zip(made.batch, outcomes, strict=True):
                    if isinstance(outcome, GeneratedImage):
                        if outcome.reused:
                            counts.reused += 1
                        else:
                            counts.generated += 1
                            counters.generation_latencies.append(outcome.latency_s)
                            counters.generated_at.append(now)
                        await send_now(image_send, ImageItem(work, outcome))
                    elif isinstance(outcome, _Unasked):
                        self._drop([work])  # owed to the resume, as a sample a stop dropped
                    else:
                        counts.generation_failed += 1
                        for dimension, judge_name in work.todo:
                            await judgement_send.send(
                                failed_judgement(
                                    self._context,
                                    work,
                                    dimension,
                                    judge_name,
                                    outcome.reason,
                                    "generate",
                                    prompt_rewrite=outcome.prompt_rewrite,
                                )
                            )
                if made.made_picture:
                    self._pictures_to_write -= 1
                    new = [o for p, o in zip(made.pictures, outcomes, strict=True) if _new(p)]
                    unwritten = [o.reason for o in new if isinstance(o, _Failure)]
                    self._count_call(
                        made_picture=len(unwritten) < len(new),
                        failure=unwritten[-1] if unwritten else None,
                        written=True,
                    )

    def _generate_batch(self, worker: int, batch: list[WorkItem]) -> _Made | None:
        # Runs in one of the generator's threads: reuse check, then one generate call; None
        # when a picture must be made and the generator has not loaded yet.
        task = self._context.config.run.task
        pictures: list[_Picture] = []
        missing: list[int] = []
        paths = [self._context.run_dir.image_path(task, w.model, w.sample.data_id) for w in batch]
        for index, (work, path) in enumerate(zip(batch, paths, strict=True)):
            found = reusable_image(path, work.image_label)
            if found is not None:
                self._context.pass_over(work.model, work.sample.data_id)
                pictures.append(
                    GeneratedImage(
                        model=work.model,
                        data_id=work.sample.data_id,
                        path=path,
                        seed=work.seed,
                        reused=True,
                        prompt_rewrite=found.prompt_rewrite,
                    )
                )
            else:
                refuse_a_folder_at_an_image(path)  # not after making a picture it cannot write
                pictures.append(None)
                missing.append(index)
        if not missing:
            return _Made(batch, paths, pictures, 0.0, called=False)
        if not self._loaded:
            return None
        requests = [
            GenerationRequest(batch[i].model, batch[i].sample, batch[i].seed) for i in missing
        ]
        started = time.perf_counter()
        images: Sequence[Image | EncodedPicture | TimedPicture | Exception]
        try:
            images = self._generator.generate(
                requests, worker=worker, cancel=self._context.cancel_generation
            )
        except FatalBackendError as exc:
            if (named := _name_in(exc, self._name)) is not None:
                raise named from exc
            raise
        except Exception as exc:
            images = [exc] * len(requests)
        per_image = (time.perf_counter() - started) / len(requests)
        if not isinstance(images, Sequence) or isinstance(images, str | bytes):
            raise FatalBackendError(
                f"generator {self._generator.name!r} is broken: generate() returned an object "
                f"of type {type(images).__name__}, not a list of its pictures"
            )
        if len(images) != len(requests):
            message = f"generator returned {len(images)} images for {len(requests)} requests"
            raise FatalBackendError(f"generator {self._generator.name!r} is broken: {message}")
        check_pictures(self._generator.name, images)
        failure: str | None = None
        made_picture = False
        for index, image in zip(missing, images, strict=True):
            if isinstance(image, NotAsked) and self._context.stopping.is_set():
                pictures[index] = _Unasked()
            elif isinstance(image, Exception):
                pictures[index] = reason = describe_error(image)
                if not isinstance(image, ItemError):
                    failure = reason
            else:
                pictures[index] = image
                made_picture = True  # counted once written (see _count_call)
        return _Made(
            batch,
            paths,
            pictures,
            per_image,
            called=True,
            made_picture=made_picture,
            failure=None if made_picture else failure,
        )

    def _write(self, made: _Made) -> list[GeneratedImage | _Failure | _Unasked]:
        # Runs in a writer thread: PNG encoding and the atomic write of each new picture.
        outcomes: list[GeneratedImage | _Failure | _Unasked] = []
        files: list[tuple[Path, bytes]] = []
        pngs = self._encode(made.pictures)
        for work, path, picture, png in zip(
            made.batch, made.paths, made.pictures, pngs, strict=True
        ):
            if isinstance(picture, GeneratedImage | _Unasked):
                outcomes.append(picture)
                continue
            # A failed item (the batch's others go on) keeps the rewrite its picture was to be
            # drawn from for its error records, as a picture's judgements do.
            if isinstance(picture, str):
                outcomes.append(_Failure(picture, self._prompt_rewrite(work.sample.data_id)))
                continue
            if isinstance(png, str):
                outcomes.append(_Failure(png, self._prompt_rewrite(work.sample.data_id)))
                continue
            assert png is not None
            latency_s = made.latency_s
            if isinstance(picture, EncodedPicture | TimedPicture) and picture.seconds is not None:
                latency_s = float(picture.seconds)  # timed where it was made
            rewrite = self._prompt_rewrite(work.sample.data_id)
            # In ASCII, as a PNG text chunk holds it: json escapes the rest.
            stored = None if rewrite is None else json.dumps(rewrite.model_dump(mode="json"))
            # Encoded here, or checked by its maker: a resumed run need not inflate it again.
            whole = not isinstance(picture, EncodedPicture) or picture.pixels_checked
            files.append(
                (path, with_sample_digest(png, work.image_label, stored, pixels_whole=whole))
            )
            outcomes.append(
                GeneratedImage(
                    model=work.model,
                    data_id=work.sample.data_id,
                    path=path,
                    seed=work.seed,
                    latency_s=latency_s,
                    prompt_rewrite=rewrite,
                )
            )
        # One write for the batch: its pictures share a folder, synced once for them all.
        self._context.run_dir.write_images(files)
        return outcomes

    def _prompt_rewrite(self, data_id: str) -> PromptRewrite | None:
        # A fault of the backend's code, the same for every picture: said once, as the
        # error that stops the run, not as a traceback.
        call = f"prompt_rewrite({data_id!r})"
        try:
            rewrite = call_in_thread(
                self._generator.prompt_rewrite,
                data_id,
                failed=f"{self._name}: {call} failed",
            )
        except TrigStreamError:
            raise
        except Exception as exc:
            raise FatalBackendError(
                f"{self._name} is broken: {call} raised {describe_error(exc)}"
            ) from exc
        if rewrite is not None and not isinstance(rewrite, PromptRewrite):
            raise FatalBackendError(
                f"{self._name} is broken: {call} returned an object of type "
                f"{type(rewrite).__name__} where a PromptRewrite or None belongs"
            )
        return rewrite

    def _encode(self, pictures: list[_Picture]) -> list[bytes | str | None]:
        # Each new picture's PNG bytes (or why it cannot be written), None where there is
        # nothing to write. Two or more large pictures are encoded at once on the stage's
        # encoder threads.
        pngs: list[bytes | str | None] = []
        todo: dict[int, Image] = {}  # index -> a picture to encode
        for index, picture in enumerate(pictures):
            if isinstance(picture, EncodedPicture):
                # Written as they are: bytes that are no whole PNG file would be judged as
                # a picture, or fail the judge's decoding.
                pngs.append(not_png_file(picture.png) or picture.png)
            else:
                pngs.append(None)
            if isinstance(picture, TimedPicture):
                todo[index] = picture.image
            elif not isinstance(picture, EncodedPicture | GeneratedImage | _Unasked | str | None):
                todo[index] = picture  # a PIL image
        large = [i for i, image in todo.items() if image.width * image.height >= PARALLEL_PIXELS]
        if len(large) >= 2:
            at_once = self._encoders.map(_png_or_reason, [todo[i] for i in large])
            for index, png in zip(large, at_once, strict=True):
                pngs[index] = png
        for index, image in todo.items():
            if pngs[index] is None:
                pngs[index] = _png_or_reason(image)
        return pngs


def _name_in(exc: TrigStreamError, name: str) -> TrigStreamError | None:
    """Lead the message of an error that stops the run with ``name`` ("generator 'x'",
    quoted as a whole), unless it names it already: with several models in a run, a
    backend's own words ("cannot load '/models/sd'") do not say whose they are.

    Changed in place, not wrapped: its type (which picks the command's exit code) and its
    attributes stay as the backend raised them.

    Returns:
        None when ``exc`` names it now; else (an error class whose ``__str__`` is its own,
        built from attributes, which ignores ``args``) an error of the same exit code whose
        message does, to raise ``from`` it.
    """
    text = str(exc)
    if name in text:
        return None
    led = f"{name}: {text}"
    exc.args = (led,)
    if isinstance(exc, ImportError):  # a MissingExtraError: its str() is its msg
        exc.msg = led
    if name in str(exc):
        return None
    kind: type[TrigStreamError] = FatalBackendError
    for exit_kind in (ConfigWriteError, ConfigError, RunDirError):
        if isinstance(exc, exit_kind):
            kind = exit_kind
            break
    return kind(led)


def _png_or_reason(image: Image) -> bytes | str:
    # A picture's PNG bytes, or why it cannot be written (a mode PNG cannot hold, say).
    if not image.width or not image.height:
        return f"the picture is empty ({image.width}x{image.height} pixels)"
    try:
        return encode_png(image)
    except Exception as exc:
        return f"the picture (mode {image.mode}) cannot be written as PNG: {exc}"


@dataclass(frozen=True, slots=True)
class _Failure:
    """Why one item of a generate call has no picture, and the rewrite of its prompt (a
    ``dtm_rewrite`` generator's), if any."""

    reason: str
    prompt_rewrite: PromptRewrite | None


class _Unasked:
    """An item its generator did not ask for as the run stopped (it returned
    :class:`~trig_stream.errors.NotAsked`): no picture and no failure; a resume asks for it."""


_Picture: TypeAlias = (
    "Image | EncodedPicture | TimedPicture | GeneratedImage | _Unasked | str | None"
)
"""Per work item of a :class:`_Made`: a new picture, an image reused from disk, one not
asked for, the reason it failed, or (before the call) None."""


def _new(picture: object) -> bool:
    """Whether a :class:`_Made` picture is one the call made (not an image reused from disk,
    nor the reason an item failed or was not asked)."""
    return not isinstance(picture, GeneratedImage | _Unasked | str | None)


FAILED_CALLS_TO_STOP = 4
"""The run stops when this many of a generator's calls have failed as a whole before any
of its calls made a picture.

Counted in calls, not samples: a call is one try of the model, whatever its ``batch_size``,
so a generator that can never work costs this many batches of ``error`` judgements (up to two
more when calls return pictures that cannot be written: such a call counts once they are
written, and a worker makes up to two more calls meanwhile), all written before the run stops.
More than one: a first call can fail for a passing reason (a server still warming up). With
several workers, the calls of the others still running when the run stops are left to end
in their threads, their results unused. Once a call has made a picture the generator is
known to work, and a failed call fails its own items only."""

PARALLEL_PIXELS = 256 * 256
"""Pictures this large or larger are encoded on the stage's encoder threads (~5 ms each);
smaller ones in the writer's own thread, where a hand-over would cost more than it saves."""


@dataclass(frozen=True, slots=True)
class _Made:
    """One generate call's results, waiting to be written: per work item, a new picture, an
    image reused from disk, one not asked for, or the reason it failed."""

    batch: list[WorkItem]
    paths: list[Path]
    """Where each work item's image lives."""
    pictures: list[_Picture]
    latency_s: float
    """Generation time per new picture."""
    called: bool
    """Whether a generate call was made (not when every image was reused)."""
    made_picture: bool = False
    """Whether the call returned a new picture."""
    failure: str | None = None
    """Why the call failed as a whole, if it did: it made no picture, and an item failed
    with something other than an :class:`~trig_stream.errors.ItemError` (or the whole
    call raised). The last such item's reason."""
