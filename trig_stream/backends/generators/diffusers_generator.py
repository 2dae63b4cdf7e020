"""The ``diffusers`` generator: any diffusers pipeline, one copy per device.

``load`` (in a worker thread) builds one pipeline per entry of ``devices``. Each device has
two workers: while one's call runs, the other's prompts wait at the device with their
arguments built, and start the moment it is free. Without that, the device waited each time
for the finished call to travel back through the event loop and for the next batch to reach
a thread, while the writers took the interpreter lock to encode the batch just made: with a
tiny Flux on a 2-core CPU, those gaps were 4-6% of the run (``bench/README.md``). With
``isolation = "process"`` each pipeline lives in a child process of its own instead
(:mod:`~trig_stream.backends.generators.pipeline_process`), which this class drives through
the same methods, and where the next call waits in the child's pipe.

A :meth:`~DiffusersGenerator.generate` call runs its micro-batch as one pipeline call (edit
sources of different sizes, and reference pictures, get calls of their own): a list of
prompts and one ``torch.Generator`` per prompt, seeded with the request's seed, so each image
depends on its own seed (up to rounding when its batch-mates differ). Between denoising steps
the pipeline's step-end callback checks the run's cancel event and abandons the call.

What is checked before a weight loads, and the loading itself, are in
:mod:`~trig_stream.backends.generators.pipeline_loading`; the call's arguments in
:mod:`~trig_stream.backends.generators.pipeline_calls`.

torch and diffusers are imported in ``load`` and ``check_environment`` (with
``isolation = "process"``, only in child processes), never at module import.
"""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from trig_stream.backends.base import (
    EncodedPicture,
    GenerationRequest,
    Generator,
    TimedPicture,
)
from trig_stream.backends.generators.diffusers_options import DiffusersOptions, PipelineSpec
from trig_stream.backends.generators.pipeline_calls import call_arguments
from trig_stream.backends.generators.pipeline_check import check_in_child
from trig_stream.backends.generators.pipeline_loading import (
    LOAD_LOCK,
    check_checkpoint,
    check_classes,
    check_device,
    find_pipeline_class,
    load_pipeline,
)
from trig_stream.backends.generators.pipeline_process import (
    CALLS_IN_FLIGHT,
    PipelineProcess,
    thread_share,
)
from trig_stream.backends.generators.presets import INPUT_TASKS
from trig_stream.backends.generators.source_images import source_image
from trig_stream.errors import (
    BackendError,
    ConfigError,
    FatalBackendError,
    ItemError,
    MissingExtraError,
    require_installed,
)
from trig_stream.pipeline import describe_error

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess

    from PIL.Image import Image

    from trig_stream.config import GeneratorConfig, RunConfig

logger = logging.getLogger(__name__)

_CANCELLED = "cancelled"
_STOPPED_LOADING = "the run stopped while it loaded"


class _Cancelled(Exception):
    """Raised from the step callback to abandon a pipeline call."""


_Prompts = Sequence[tuple[GenerationRequest, "Image | None"]]
"""Requests for one pipeline call, each with its source or reference picture (or None)."""


class _OutOfMemory(Exception):
    """A pipeline call ran out of device memory; its message is torch's, without the
    traceback (whose frames hold the call's tensors)."""


class DiffusersGenerator(Generator):
    """Images from a diffusers pipeline (an upstream preset or any pipeline class).

    Attributes:
        spec: the resolved pipeline, checkpoint and call arguments.
        devices: the devices; worker ``i`` drives device ``i % len(devices)``, each device
            two calls at a time (one running, the next waiting for it).
        calls: the batch size of every pipeline call, in order (micro-batching shows here).
    """

    Options = DiffusersOptions

    def __init__(
        self,
        name: str,
        options: DiffusersOptions,
        *,
        workers: int = 1,
        batch_size: int = 1,
    ) -> None:
        self.name = name
        self.options = options
        self.spec: PipelineSpec = options.spec()
        self.devices = list(options.devices or [f"cuda:{i}" for i in range(workers)])
        # Worker i drives device i % len(devices): while one call runs on a device, the next
        # waits at it (in its process, with isolation = "process").
        self.workers = len(self.devices) * CALLS_IN_FLIGHT
        self.batch_size = batch_size
        # An editing, subject or IP-Adapter pipeline is given the sample's source image.
        self.reads_source_image = self.spec.inputs != "text"
        self.calls: list[int] = []
        self._pipes: list[Any] = []
        self._processes: list[PipelineProcess] = []
        self._accepts: frozenset[str] = frozenset()
        self._output_type = "pil"
        """``"pt"`` when the pipeline can hand its pictures back as a tensor (see
        :func:`_host_pixels`), else ``"pil"``."""
        self._lock = threading.Lock()
        self._device_locks = [threading.Lock() for _ in self.devices]
        """Held by the call running on each device (thread isolation)."""
        self._fits: list[int | None] = [None] * len(self.devices)
        """Per device, the most prompts a call may take, once one ran out of memory."""
        self._notes: list[str] = []
        self._starting = False
        """Whether the child processes are starting and loading (``isolation = "process"``)."""
        self._stopped_starting = False
        """Whether :meth:`stop_loading` came while they were."""
        self._saved_by: str | None = None
        """Which other pipeline class saved the checkpoint, when it is not this one's kin: a
        hint the failure of each call carries."""
        self._check_process: BaseProcess | None = None
        """The child checking the pipeline's classes, while it runs."""
        self._stopped_checking = False
        """Whether :meth:`stop_loading` came: a check child starting after it is killed."""
        self._torch_threads: int | None = None
        """The threads torch computes with on this machine, as the child that checked the
        classes found (``isolation = "process"``: torch is not imported here)."""
        self.call_defaults: dict[str, Any] = {}
        """The defaults of the pipeline call's arguments that JSON holds, once
        :meth:`check_environment` has seen the class (see :meth:`fingerprint_defaults`)."""

    @classmethod
    def from_config(
        cls, entry: GeneratorConfig, options: DiffusersOptions, config: RunConfig
    ) -> DiffusersGenerator:
        """Build from a ``[[generators]]`` entry; checks the devices match ``workers``.

        Raises:
            MissingExtraError: torch or diffusers is not installed.
            ConfigError: ``workers`` disagrees with ``devices``, or the input kind does not
                serve the run's task.
        """
        # Every pipeline runs on torch: without it, diffusers offers placeholders only.
        require_installed(("torch", "diffusers"), "diffusers")
        where = f"generator {entry.name!r}"
        devices = options.devices
        if devices and "workers" in entry.model_fields_set and entry.workers != len(devices):
            raise ConfigError(
                f"{where}: workers = {entry.workers} but {len(devices)} devices are "
                "listed; one worker runs per device, so drop workers or list one device each"
            )
        spec = options.spec()
        task = INPUT_TASKS[spec.inputs]
        if task != config.run.task:
            raise ConfigError(
                f"{where}: inputs {spec.inputs!r} serve the {task} task but the run is "
                f"{config.run.task}; pick a preset or inputs for {config.run.task}"
            )
        return cls(entry.name, options, workers=entry.workers, batch_size=entry.batch_size)

    def fingerprint(self) -> dict[str, Any]:
        spec = self.spec
        return {
            "backend": "diffusers",
            "preset": self.options.preset,
            "pipeline": spec.pipeline,
            "checkpoint": spec.checkpoint,
            "revision": spec.load.get("revision"),
            "variant": spec.load.get("variant"),
            "inputs": spec.inputs,
            # The dtypes used, not one per device: another device of a kind already used
            # changes no image (a manifest's per-device list is read as this: manifest.py).
            "dtype": sorted({spec.dtype_for(device) for device in self.devices}),
            "scheduler": spec.scheduler,
            "call": {key: _jsonable(value) for key, value in sorted(spec.call.items())},
            "ip_adapter": None if spec.ip_adapter is None else repr(spec.ip_adapter),
            "source_size": spec.source_size,
        }

    def fingerprint_defaults(self) -> dict[str, Any]:
        # An argument left to the pipeline's own default draws as one set to it: a resume
        # takes either for the other (flux's max_sequence_length, a tiny pipeline's steps).
        return {"call": self.call_defaults}

    # -- loading ------------------------------------------------------------------------------

    def check_environment(self) -> None:
        """What :meth:`load` needs, seen without loading a weight (devices are checked at load:
        that takes torch's device probing):

        * a checkpoint given as a folder exists, holds a pipeline (``model_index.json``), and
          has the components the pipeline class needs, each in its folder, and each model
          of a class the pipeline takes (a folder saved by an unrelated pipeline class is
          named in a warning, and in each failed call's error);
        * the installed diffusers has the pipeline class (for ``DiffusionPipeline``, the one
          the checkpoint's ``model_index.json`` names, which its loader loads), which is a
          pipeline, and the
          scheduler class the options name; the pipeline's call takes the ``call`` arguments,
          and names those the input kind passes (``image`` for ``edit``...).

        The second part imports diffusers (a few seconds the first time, and torch with it):
        with ``isolation = "process"``, in a child process of its own
        (:mod:`~trig_stream.backends.generators.pipeline_check`), so that the engine's
        process, where no pipeline runs, never imports them.

        Raises:
            MissingExtraError: diffusers is not installed, or a library the pipeline class
                needs (torch, transformers).
            FatalBackendError: something above is missing or wrong.
        """
        with self._lock:
            self._stopped_checking = False  # a stop of an earlier run's load is no stop here
        check_checkpoint(self.name, self.spec)
        if self.options.isolation == "process":
            try:
                checked = check_in_child(self.name, self.options, self._checking)
                self._torch_threads, self.call_defaults = checked
            finally:
                with self._lock:
                    self._check_process = None
            return
        with LOAD_LOCK:  # diffusers resolves its classes lazily, and not thread-safely
            try:
                import diffusers
            except ImportError as exc:
                raise MissingExtraError("diffusers", "diffusers") from exc
            pipeline_class = find_pipeline_class(self.name, self.spec, diffusers)
            self._check_classes(diffusers, pipeline_class)

    def _checking(self, process: BaseProcess) -> None:
        with self._lock:
            self._check_process = process  # from here stop_loading() kills it
            stopped = self._stopped_checking
        if stopped:  # the stop came before the child started
            process.kill()

    def _check_classes(self, diffusers: Any, pipeline_class: Any) -> None:
        self._accepts, self._saved_by, self.call_defaults = check_classes(
            self.name, self.spec, diffusers, pipeline_class
        )

    def load(self) -> None:
        """Load one pipeline per device.

        Raises:
            MissingExtraError: torch or diffusers is not installed.
            FatalBackendError: a device is unavailable, or the pipeline cannot be loaded.
        """
        if self.options.isolation == "process":
            self._start_processes()
            return
        # diffusers resolves its classes lazily, and that is not thread-safe: two models
        # loading at once could see a class as missing. Loads are serialised.
        with LOAD_LOCK:
            try:
                import diffusers
                import huggingface_hub.constants
                import torch
            except ImportError as exc:
                raise MissingExtraError("diffusers", "diffusers") from exc
            check_checkpoint(self.name, self.spec)
            pipeline_class = find_pipeline_class(self.name, self.spec, diffusers)
            self._check_classes(diffusers, pipeline_class)
            for device in self.devices:
                check_device(torch, self.name, device)
            if huggingface_hub.constants.HF_HUB_DISABLE_PROGRESS_BARS:
                # The hub's switch (`trig-stream run` sets it): transformers follows it,
                # diffusers' own bar ("Loading pipeline components") does not.
                diffusers.utils.logging.disable_progress_bar()
            try:
                for device in self.devices:
                    self._pipes.append(self._load_one(torch, diffusers, pipeline_class, device))
            except BaseException:
                self.close()  # a failed load holds nothing: the devices loaded before it free
                raise
        from diffusers.image_processor import VaeImageProcessor

        if isinstance(getattr(self._pipes[0], "image_processor", None), VaeImageProcessor):
            self._output_type = "pt"

    def _start_processes(self) -> None:
        # All children start (and import torch) at once; each then loads its own device.
        threads = thread_share(len(self.devices), self._torch_threads)
        with self._lock:
            self._starting, self._stopped_starting = True, False
        try:
            for device in self.devices:
                process = PipelineProcess(
                    self.name, self.options, device, self.batch_size, threads=threads
                )
                with self._lock:
                    self._processes.append(process)  # from here stop_loading() kills it
                    stopped = self._stopped_starting
                if stopped:
                    raise FatalBackendError(f"generator {self.name!r}: {_STOPPED_LOADING}")
            for process in self._processes:
                process.wait_ready()
        except BaseException:
            self.close()  # the children still loading are killed: the run will not use them
            raise
        finally:
            with self._lock:
                self._starting = False

    def stop_loading(self) -> None:
        """With ``isolation = "process"``, kill the child checking the pipeline's classes
        (:meth:`check_environment`), or those still loading and any the load would start
        after them: their load then fails, and the load releases them.
        A pipeline loading in this process cannot be cut short: its load runs to its end."""
        with self._lock:
            checking, self._stopped_checking = self._check_process, True
            starting = self._starting
            if starting:
                self._stopped_starting = True
            processes = list(self._processes) if starting else []
        if checking is not None:
            checking.kill()
        for process in processes:
            process.kill_now(_STOPPED_LOADING)

    def _load_one(self, torch: Any, diffusers: Any, pipeline_class: Any, device: str) -> Any:
        return load_pipeline(
            torch,
            diffusers,
            pipeline_class,
            device,
            name=self.name,
            spec=self.spec,
            offload=self.options.offload,
        )

    # -- generating ---------------------------------------------------------------------------

    def on_step(self, worker: int, step: int) -> None:
        """Called in the worker thread after each denoising step; does nothing by default.

        Subclasses use it for progress displays or to cancel at a chosen step in tests. With
        ``isolation = "process"`` the steps happen in the child, which does not call it.
        """

    def generate(
        self, requests: Sequence[GenerationRequest], *, worker: int, cancel: threading.Event
    ) -> Sequence[Image | EncodedPicture | TimedPicture | Exception]:
        if self._processes:
            process = self._processes[worker % len(self._processes)]
            made, calls = process.generate(requests, cancel)
            with self._lock:
                self.calls.extend(calls)
            return made
        if cancel.is_set():
            return [ItemError(_CANCELLED) for _ in requests]
        outcomes: list[Image | Exception | None] = [None] * len(requests)
        sources: list[Image | None] = [None] * len(requests)
        if self.spec.inputs != "text":
            for index, request in enumerate(requests):
                try:
                    sources[index] = source_image(request.sample, self._source_size())
                except ItemError as exc:
                    outcomes[index] = exc
        ready = [i for i, outcome in enumerate(outcomes) if outcome is None]
        for group in self._calls_for(ready, sources):
            if not group:
                continue
            if cancel.is_set():
                images: list[Image | Exception] = [ItemError(_CANCELLED) for _ in group]
            else:
                prompts = [(requests[i], sources[i]) for i in group]
                images = self._call_fitting(worker, prompts, cancel)
            for index, image in zip(group, images, strict=True):
                outcomes[index] = image
        return [o if o is not None else ItemError("not generated") for o in outcomes]

    def _calls_for(self, ready: list[int], sources: list[Image | None]) -> list[list[int]]:
        """How the ready requests split into pipeline calls.

        Text prompts share one call. An edit pipeline resizes every source of a call to the
        first one's size, so sources share a call only with sources of their own size: each
        picture is then the same whatever its batch-mates. A subject or IP-Adapter pipeline
        takes one reference picture per call.
        """
        inputs = self.spec.inputs
        if inputs == "text":
            return [ready]
        if inputs == "edit":
            by_size: dict[tuple[int, int], list[int]] = {}
            for index in ready:
                source = sources[index]
                by_size.setdefault(source.size if source else (0, 0), []).append(index)
            return list(by_size.values())
        return [[index] for index in ready]

    def _source_size(self) -> tuple[int, int] | None:
        if self.spec.source_size is not None:
            return self.spec.source_size
        call = self.spec.call
        # An edit pipeline draws at its source's size: resizing the source sets the output.
        if self.spec.inputs == "edit" and "height" in call and "width" in call:
            return (int(call["width"]), int(call["height"]))
        return None

    def _call_fitting(
        self, worker: int, prompts: _Prompts, cancel: threading.Event
    ) -> list[Image | Exception]:
        """:meth:`_call` on ``prompts`` (requests and their pictures), in calls small enough
        for the device's memory.

        A call that runs out of memory is made again as two of half its size, and the
        device takes calls of at most that size from then on: a ``batch_size`` too large for
        the device costs one failed call per halving until a size fits (8 -> 4 -> 2 -> 1:
        three), then none, not every batch of the run.
        """
        device = worker % len(self._pipes)
        images: list[Image | Exception] = []
        start = 0
        while start < len(prompts):
            # Read afresh for each call: a failed call before it (the first half's, the
            # other worker's) may have found a smaller size that fits.
            size = self._fits[device] or len(prompts)
            part = prompts[start : start + size]
            start += len(part)
            batch, pictures = [r for r, _ in part], [p for _, p in part]
            try:
                images += self._call(worker, batch, pictures, cancel)
            except _OutOfMemory as exc:
                if len(part) == 1:
                    # The call's failure, not the item's: before any image, a few of them
                    # stop the run (a model too large for the device fails every sample).
                    images.append(
                        BackendError(
                            f"out of memory on {self.devices[device]} even for one image: "
                            f"{exc}; use a smaller model or image size, offload, or a "
                            "device with more memory"
                        )
                    )
                    continue
                half = (len(part) + 1) // 2
                with self._lock:
                    # Said once per size: the halves of one call, and the calls of the
                    # other worker on the device, come to the same.
                    known = self._fits[device]
                    smaller = known is None or half < known
                    if smaller:
                        self._fits[device] = half
                        message = (
                            f"out of memory on {self.devices[device]} at {len(part)} images "
                            f"per call; calls there take at most {half} from now on (set "
                            f"batch_size to {half} or less to skip the failed call)"
                        )
                        self._notes.append(message)
                if smaller:
                    logger.warning("generator %r: %s", self.name, message)
                images += self._call_fitting(worker, part, cancel)
        return images

    def notes(self) -> list[str]:
        with self._lock:
            return list(self._notes)

    def _call(
        self,
        worker: int,
        batch: Sequence[GenerationRequest],
        pictures: Sequence[Image | None],
        cancel: threading.Event,
    ) -> list[Image | Exception]:
        import torch

        device = worker % len(self._pipes)
        pipe = self._pipes[device]
        kwargs = call_arguments(self.spec, self._accepts, self._output_type, batch, pictures)
        kwargs["generator"] = [torch.Generator("cpu").manual_seed(r.seed) for r in batch]
        kwargs.update(self._cancel_callback(worker, cancel))
        out_of_memory: str | None = None
        with self._device_locks[device]:  # the other worker's call may be running
            if cancel.is_set():
                return [ItemError(_CANCELLED) for _ in batch]
            with self._lock:
                self.calls.append(len(batch))
            try:
                with torch.inference_mode():
                    result = pipe(**kwargs)
                    pixels = _host_pixels(torch, result.images)
            except _Cancelled:
                return [ItemError(_CANCELLED) for _ in batch]
            except _out_of_memory(torch) as exc:
                out_of_memory = describe_error(exc)
            except _device_failure(torch) as exc:
                # Sticky (an illegal memory access, a device-side assert): every later call
                # on this device would fail the same way, so the run stops here, resumable.
                raise FatalBackendError(
                    f"generator {self.name!r}: the device failed and cannot go on: {exc}"
                ) from None
            except Exception as exc:
                logger.warning("generator %r: pipeline call failed: %s", self.name, exc)
                # A new error without the traceback: the caught one holds the call's frames
                # and their tensors, the memory the next call needs. Not an ItemError: the
                # call failed, not its items, and a pipeline whose calls all fail so (an
                # argument it refuses, an offload the device cannot do) stops the run.
                reason = describe_error(exc)
                if self._saved_by is not None:
                    reason += f" ({self._saved_by})"
                error = BackendError(reason)
                return [error for _ in batch]
        if out_of_memory is not None:
            # Out of the except block, the failed call's frames and tensors are gone: what
            # they held is free for the smaller calls that follow.
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise _OutOfMemory(out_of_memory)
        # The device is free again: turning pixels into pictures is the CPU's work alone.
        images: list[Image | Exception] = list(_pictures(pixels))
        if len(images) != len(batch):
            error = BackendError(f"pipeline returned {len(images)} images for {len(batch)} prompts")
            return [error for _ in batch]
        return images

    def _cancel_callback(self, worker: int, cancel: threading.Event) -> dict[str, Any]:
        def stop_if_cancelled(step: int) -> None:
            self.on_step(worker, step)
            if cancel.is_set():
                raise _Cancelled

        if "callback_on_step_end" in self._accepts:

            def on_step_end(
                pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]
            ) -> dict[str, Any]:
                stop_if_cancelled(step)
                return tensors

            return {"callback_on_step_end": on_step_end}
        if "callback" in self._accepts and "callback_steps" in self._accepts:

            def legacy(step: int, timestep: Any, latents: Any) -> None:
                stop_if_cancelled(step)

            return {"callback": legacy, "callback_steps": 1}
        return {}  # the pipeline offers no hook: cancellation waits for the call to end

    def close(self) -> None:
        """Drop the pipelines and free accelerator memory; stop the child processes."""
        processes, self._processes = self._processes, []
        for process in processes:
            process.stop()
        if processes:
            return
        self._pipes.clear()
        # After a call, some pipelines' modules sit in reference cycles (Flux's transformer
        # does): only the cycle collector frees them, and only then can the cache give their
        # memory back.
        gc.collect()
        if any(device.startswith("cuda") for device in self.devices):
            import torch

            torch.cuda.empty_cache()


def _out_of_memory(torch: Any) -> type[BaseException]:
    """torch's out-of-memory error (``torch.OutOfMemoryError`` from 2.5, CUDA's before)."""
    error: type[BaseException] = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    return error


def _device_failure(torch: Any) -> type[BaseException] | tuple[()]:
    """torch's error for a failed device (torch >= 2.8), or nothing to catch."""
    error: type[BaseException] | tuple[()] = getattr(torch, "AcceleratorError", ())
    return error


def _host_pixels(torch: Any, images: Any) -> Any:
    """A pipeline's pictures as 8-bit pixels in the CPU's memory (height, width, channels),
    while the device's lock is held; pictures it made as PIL images are left as they are.

    With ``output_type = "pt"`` a pipeline stops at its pictures as a tensor on the device,
    values in [0, 1]. Rounding them to 8 bits there, as diffusers' PIL conversion does
    (float32, times 255, round half to even: the same pixels), leaves a quarter of the bytes
    to copy; the copy is the one wait for the device. The rest of the conversion (numpy,
    PIL) then happens after the lock is released, while the next call already runs: with
    ``"pil"`` the pipeline did it all on the device's time.
    """
    if not isinstance(images, torch.Tensor):
        return images
    pixels = (images.float() * 255).round_().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def _pictures(pixels: Any) -> list[Image]:
    """The PIL pictures of :func:`_host_pixels`' result (a list of pictures stays one)."""
    from PIL import Image as PILImage

    if not hasattr(pixels, "shape"):
        return list(pixels)
    if pixels.shape[-1] == 1:
        return [PILImage.fromarray(one[..., 0]) for one in pixels]  # greyscale: mode L
    return [PILImage.fromarray(one) for one in pixels]


def _jsonable(value: Any) -> Any:
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)
