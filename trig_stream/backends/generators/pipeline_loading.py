"""Finding, checking and loading the pipeline of a ``diffusers`` generator.

:class:`~trig_stream.backends.generators.diffusers_generator.DiffusersGenerator` checks, before
it loads a weight, what its load and calls need (:func:`check_checkpoint`,
:func:`find_pipeline_class`, :func:`check_classes`), and loads one pipeline per device with
:func:`load_pipeline`. Each function takes the modules it uses (``torch``, ``diffusers``) from
its caller, which imports them: importing this module imports neither.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import threading
from pathlib import Path
from typing import Any, NamedTuple

from trig_stream.backends.generators.checkpoint_components import components_of_other_classes
from trig_stream.backends.generators.diffusers_options import (
    Offload,
    PipelineSpec,
    size_multiple,
    size_problem,
)
from trig_stream.backends.generators.pipeline_calls import call_parameters, check_call_arguments
from trig_stream.backends.tiny_model_names import build_hint
from trig_stream.errors import (
    TORCH_ON_THE_CPU,
    FatalBackendError,
    MissingExtraError,
    require_installed,
)
from trig_stream.pipeline import describe_error

logger = logging.getLogger(__name__)

LOAD_LOCK = threading.Lock()
"""Held while diffusers resolves classes: it does so lazily, and not thread-safely (two
models loading at once could see a class as missing)."""


class CheckedClasses(NamedTuple):
    """What :func:`check_classes` found out about a pipeline class."""

    accepts: frozenset[str]
    """The names its call takes."""
    saved_by: str | None
    """Which other pipeline class saved the checkpoint, when it is not this one's kin: a hint
    the failure of each call carries."""
    defaults: dict[str, Any]
    """The defaults of its call's arguments that JSON holds (a number, a string, a boolean):
    an argument set to one draws what leaving it out draws."""


def check_checkpoint(name: str, spec: PipelineSpec) -> None:
    """Check ``spec``'s checkpoint without asking the hub: a folder holds a pipeline; any
    other is a Hugging Face hub id, and, offline, one whose ``model_index.json`` is cached.

    Raises:
        MissingExtraError: huggingface_hub (which the ``diffusers`` extra installs) is not.
        FatalBackendError: the folder is none, or has no ``model_index.json``; the hub id is
            no valid one, or, offline, not in the Hugging Face cache.
    """
    checkpoint = Path(spec.checkpoint)
    if checkpoint.is_absolute():
        _check_checkpoint_folder(name, checkpoint)
    elif not checkpoint.is_dir():  # one diffusers would load as a folder is one
        _check_hub_id(name, spec)


def _check_checkpoint_folder(name: str, checkpoint: Path) -> None:
    if not checkpoint.is_dir():
        there = checkpoint.exists()
        raise FatalBackendError(
            f"generator {name!r}: checkpoint {checkpoint} "
            f"{'is not a folder' if there else 'does not exist'}; set options.checkpoint to a "
            f"diffusers pipeline folder or a hub id{'' if there else build_hint(checkpoint)}"
        )
    if not (checkpoint / "model_index.json").is_file():
        raise FatalBackendError(
            f"generator {name!r}: checkpoint {checkpoint} is no diffusers pipeline "
            "folder (it has no model_index.json: one written by save_pretrained, or a "
            "downloaded snapshot, has)"
        )


def _check_hub_id(name: str, spec: PipelineSpec) -> None:
    # Both failed only as the pipeline loaded, after validate had said ok: diffusers
    # refused the id as "neither a valid local path nor a valid repo id", and, offline,
    # found no model_index.json.
    try:
        from huggingface_hub.errors import HFValidationError
        from huggingface_hub.utils import validate_repo_id  # type: ignore[attr-defined]  # lazy
    except ImportError as exc:
        raise MissingExtraError("huggingface_hub", "diffusers") from exc
    try:
        validate_repo_id(spec.checkpoint)
    except HFValidationError:
        raise FatalBackendError(
            f"generator {name!r}: checkpoint {spec.checkpoint!r} is neither a local folder "
            "(write one as ./..., ../..., ~/... or an absolute path) nor a Hugging Face hub "
            "id ('name' or 'namespace/name' of letters, digits, '-', '_' and '.')"
        ) from None
    if not spec.local_files_only:
        return  # the hub is asked as it loads
    if _cached_model_index(spec) is None:
        raise FatalBackendError(
            f"generator {name!r}: checkpoint {spec.checkpoint!r} is a hub id whose "
            "model_index.json is not in the Hugging Face cache, and offline "
            "(options.local_files_only or HF_HUB_OFFLINE) the hub is not asked; download it "
            "first, or write a local folder as ./..., ../..., ~/... or an absolute path"
        )


def _cached_model_index(spec: PipelineSpec) -> Path | None:
    """The ``model_index.json`` of hub id ``spec.checkpoint`` in the Hugging Face cache (of
    ``options.load``'s ``cache_dir`` and ``revision``), found without asking the hub."""
    import huggingface_hub  # diffusers depends on it

    cached = huggingface_hub.try_to_load_from_cache(
        spec.checkpoint,
        "model_index.json",
        cache_dir=spec.load.get("cache_dir"),
        revision=spec.load.get("revision"),
    )
    return Path(cached) if isinstance(cached, str) else None


def find_pipeline_class(name: str, spec: PipelineSpec, diffusers: Any) -> Any:
    """The pipeline class of generator ``name``: ``spec.pipeline``, a diffusers class or
    ``module:attribute``.

    Raises:
        MissingExtraError: diffusers has only a placeholder for it, as torch or transformers
            is not installed.
        FatalBackendError: there is none of that name.
    """
    pipeline = spec.pipeline
    if ":" in pipeline:
        module_name, _, attr = pipeline.partition(":")
        try:
            found = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError, ValueError, TypeError) as exc:
            # ValueError, TypeError: a name importlib refuses ("Empty module name", or a
            # relative one without a package), which the options' check lets through only
            # when built around it.
            raise FatalBackendError(
                f"generator {name!r}: cannot import pipeline {pipeline!r}: {exc}; check "
                "options.pipeline ('module:Class', the module importable from here)"
            ) from exc
        _check_not_placeholder(name, pipeline, diffusers, found)
        return found
    found = getattr(diffusers, pipeline, None)
    if found is None:
        raise FatalBackendError(
            f"generator {name!r}: diffusers {diffusers.__version__} has no pipeline class "
            f"{pipeline!r}; check options.pipeline or upgrade diffusers"
        )
    _check_not_placeholder(name, pipeline, diffusers, found)
    if pipeline_class_without_call(diffusers, found):
        return _saved_class(name, spec, diffusers, found)
    return found


_EXTRA_BACKENDS = ("torch", "transformers")
"""The libraries diffusers' pipelines need that the ``diffusers`` extra installs."""


def _check_not_placeholder(name: str, pipeline: str, diffusers: Any, found: Any) -> None:
    """Refuse one of diffusers' placeholder classes: without a library its class needs
    (torch, transformers), diffusers exports a stand-in that raises once used, and the class
    was called no pipeline ("check options.pipeline").

    Raises:
        MissingExtraError: the library missing is one the ``diffusers`` extra installs.
        FatalBackendError: diffusers finds another, or one that is installed, unusable.
    """
    placeholder = getattr(getattr(diffusers, "utils", None), "DummyObject", None)
    if not (isinstance(placeholder, type) and isinstance(found, placeholder)):
        return
    needs = [str(backend) for backend in getattr(found, "_backends", ())]
    require_installed([backend for backend in needs if backend in _EXTRA_BACKENDS], "diffusers")
    raise FatalBackendError(
        f"generator {name!r}: diffusers {diffusers.__version__} cannot use {pipeline} here: "
        f"it needs {', '.join(needs) or 'libraries'} and finds one of them missing, or of a "
        "version it does not take; install (or upgrade) them, or the diffusers extra "
        f"(pip install 'trig-stream[diffusers]'; {TORCH_ON_THE_CPU})"
    )


def pipeline_class_without_call(diffusers: Any, pipeline_class: Any) -> bool:
    """Whether ``pipeline_class`` is a diffusers pipeline that defines no call of its own
    (``DiffusionPipeline``, which loads the class its checkpoint names)."""
    return (
        isinstance(pipeline_class, type)
        and issubclass(pipeline_class, diffusers.DiffusionPipeline)
        and not any("__call__" in vars(klass) for klass in pipeline_class.__mro__)
    )


_LOAD_CONFIG_ARGUMENTS = ("revision", "cache_dir", "token")
"""``from_pretrained`` arguments (``options.load``) that say where its model_index.json is."""


def _saved_class(name: str, spec: PipelineSpec, diffusers: Any, pipeline_class: Any) -> Any:
    """The pipeline class that ``DiffusionPipeline.from_pretrained`` loads: the one the
    checkpoint's ``model_index.json`` names.

    Seen as ``DiffusionPipeline``, the call's arguments were those of ``type.__call__``: no
    step callback (a hard stop waited for whole calls), a false warning about every call
    argument, and no check of the image size.

    Raises:
        FatalBackendError: the class cannot be known before loading, or calls nothing.
    """
    what = f"generator {name!r}: {pipeline_class.__name__}"
    concrete = "set options.pipeline to the concrete class (e.g. StableDiffusionPipeline)"
    if pipeline_class is not diffusers.DiffusionPipeline:
        raise FatalBackendError(f"{what} defines no __call__, so it makes no pictures; {concrete}")
    arguments = {k: spec.load[k] for k in _LOAD_CONFIG_ARGUMENTS if k in spec.load}
    unreadable = f"{what} loads the class its checkpoint's model_index.json names, which "
    try:
        # The cache first, read as a folder: a hub id already downloaded needs no request to
        # the hub. Through huggingface_hub's download, even local_files_only, a process's
        # first read asked the hub for the agent list its User-Agent names.
        folder = _model_index_folder(spec)
        index = None
        if folder is not None:
            index = diffusers.DiffusionPipeline.load_config(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        # A folder's file, or a cached one, that is no JSON: diffusers says which.
        raise FatalBackendError(
            f"{unreadable}cannot be read for {spec.checkpoint!r}: {describe_error(exc)}; {concrete}"
        ) from None
    if index is None:
        if spec.local_files_only:
            raise FatalBackendError(
                f"{unreadable}cannot be read for {spec.checkpoint!r}: it is not in the "
                "Hugging Face cache, and offline (options.local_files_only or HF_HUB_OFFLINE) "
                f"the hub is not asked; {concrete}"
            )
        _reach_model_index(what, spec, arguments, concrete)
        try:
            index = diffusers.DiffusionPipeline.load_config(
                spec.checkpoint, local_files_only=False, **arguments
            )
        except (OSError, ValueError) as exc:
            raise FatalBackendError(
                f"{unreadable}could not be downloaded for {spec.checkpoint!r} from the "
                f"Hugging Face hub: {describe_error(exc)}; {concrete}"
            ) from None
    class_name = index.get("_class_name") if isinstance(index, dict) else None
    found = getattr(diffusers, class_name, None) if isinstance(class_name, str) else None
    if not (
        isinstance(found, type)
        and issubclass(found, diffusers.DiffusionPipeline)
        and not pipeline_class_without_call(diffusers, found)
    ):
        raise FatalBackendError(
            f"{what} loads the class the model_index.json of {spec.checkpoint!r} names, "
            f"{class_name!r}, which is no pipeline class of diffusers "
            f"{diffusers.__version__}; {concrete}"
        )
    return found


def _model_index_folder(spec: PipelineSpec) -> Path | None:
    """The folder holding ``spec.checkpoint``'s ``model_index.json``: the checkpoint's own,
    or a hub id's snapshot in the Hugging Face cache; None for a hub id it has not."""
    checkpoint = Path(spec.checkpoint)
    if checkpoint.is_absolute() or checkpoint.is_dir():  # diffusers loads it as a folder
        return checkpoint
    cached = _cached_model_index(spec)
    return None if cached is None else cached.parent


_HUB_PROBE_TIMEOUT_S = 10.0
"""How long the one request that asks the hub for a model_index.json may wait: as long as
huggingface_hub waits for a file's metadata."""


def _reach_model_index(
    what: str, spec: PipelineSpec, arguments: dict[str, Any], concrete: str
) -> None:
    """Ask the hub, once, for the metadata of ``spec.checkpoint``'s model_index.json.

    ``load_config`` retries a hub it cannot reach five times, waiting 23 s in all, and then
    says the checkpoint has no model_index.json; one request says at once which it is.

    Raises:
        FatalBackendError: the hub cannot be reached, or has no such file.
    """
    import huggingface_hub  # diffusers depends on it

    url = huggingface_hub.hf_hub_url(
        spec.checkpoint, "model_index.json", revision=arguments.get("revision")
    )
    try:
        huggingface_hub.get_hf_file_metadata(
            url, token=arguments.get("token"), timeout=_HUB_PROBE_TIMEOUT_S
        )
    except Exception as exc:  # httpx's errors, the hub's own: all say it cannot be read
        if isinstance(exc, huggingface_hub.errors.HfHubHTTPError):
            cause = "the Hugging Face hub has no model_index.json for it"
        else:
            cause = "the Hugging Face hub could not be reached, and it is not in the cache"
        raise FatalBackendError(
            f"{what} loads the class its checkpoint's model_index.json names, which cannot "
            f"be read for {spec.checkpoint!r}: {cause} ({describe_error(exc)}); {concrete}"
        ) from None


def check_classes(
    name: str, spec: PipelineSpec, diffusers: Any, pipeline_class: Any
) -> CheckedClasses:
    """Check the pipeline and scheduler classes, the call's arguments, and a checkpoint
    folder's components, against the installed diffusers.

    Raises:
        FatalBackendError: something is missing or wrong.
    """
    if not (
        isinstance(pipeline_class, type) and issubclass(pipeline_class, diffusers.DiffusionPipeline)
    ):
        raise FatalBackendError(
            f"generator {name!r}: {spec.pipeline} is not a diffusers pipeline (a "
            "DiffusionPipeline); check options.pipeline"
        )
    if spec.scheduler is not None:
        scheduler = getattr(diffusers, spec.scheduler, None)
        if not (isinstance(scheduler, type) and issubclass(scheduler, diffusers.SchedulerMixin)):
            raise FatalBackendError(
                f"generator {name!r}: diffusers {diffusers.__version__} has no scheduler "
                f"class {spec.scheduler!r}; check options.scheduler"
            )
    if size_multiple(spec.pipeline) is None:
        # The options checked the size for the class they name; DiffusionPipeline (or a
        # module:Class) is known only here, resolved. A module:Class is of the family of
        # the first pipeline class in its MRO that has one (class MyFlux(FluxPipeline) is
        # Flux's); diffusers' mixins are skipped: StableDiffusionLoraLoaderMixin is in
        # Kandinsky 3's MRO, and names no size.
        family = next(
            (
                kin.__name__
                for kin in pipeline_class.__mro__
                if issubclass(kin, diffusers.DiffusionPipeline)
                and kin.__name__.endswith("Pipeline")
                and size_multiple(kin.__name__)
            ),
            pipeline_class.__name__,
        )
        problem = size_problem(spec, family)
        if problem is not None:
            raise FatalBackendError(f"generator {name!r}: {problem}")
    parameters = call_parameters(pipeline_class)
    accepts = frozenset(parameters)
    check_call_arguments(name, spec, pipeline_class, accepts)
    defaults = {
        key: parameter.default
        for key, parameter in parameters.items()
        if isinstance(parameter.default, bool | int | float | str)
    }
    checkpoint = Path(spec.checkpoint)
    saved_by = None
    if checkpoint.is_absolute():
        saved_by = _check_components(name, spec, diffusers, checkpoint, pipeline_class)
    return CheckedClasses(accepts, saved_by, defaults)


def _check_components(
    name: str, spec: PipelineSpec, diffusers: Any, checkpoint: Path, pipeline_class: Any
) -> str | None:
    """Check the folder's components; says which other pipeline class saved it, when one
    not of this one's kin did (see :attr:`CheckedClasses.saved_by`)."""
    # A folder of another pipeline (SD's for Flux), or with a component deleted, failed
    # only once from_pretrained ran, after the judge had loaded, with a message that
    # named a config.json rather than what is missing.
    index_path = checkpoint / "model_index.json"
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise FatalBackendError(f"generator {name!r}: cannot read {index_path}: {exc}") from None
    if not isinstance(index, dict):
        raise FatalBackendError(f"generator {name!r}: {index_path} is not a JSON object")
    given = set(spec.load)  # components passed to from_pretrained directly
    required = [
        component
        for component, parameter in inspect.signature(pipeline_class.__init__).parameters.items()
        if component != "self"
        and parameter.default is inspect.Parameter.empty
        and parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)
    ]
    missing = [
        component for component in required if component not in index and component not in given
    ]
    if missing:
        made_for = index.get("_class_name", "another pipeline")
        raise FatalBackendError(
            f"generator {name!r}: checkpoint {checkpoint} has no {', '.join(missing)}, "
            f"which {pipeline_class.__name__} needs (its model_index.json is {made_for}'s); "
            "check options.pipeline and options.checkpoint"
        )
    absent = [
        component
        for component, entry in index.items()
        if not component.startswith("_")
        and component not in given
        and isinstance(entry, list)
        and entry[:1] != [None]
        and not (checkpoint / component).is_dir()
    ]
    if absent:
        raise FatalBackendError(
            f"generator {name!r}: checkpoint {checkpoint} lacks the folder(s) "
            f"{', '.join(n + '/' for n in absent)} its model_index.json names"
        )
    # Another pipeline's folder whose components have the names this one needs (Flux's
    # for Sana) loaded, then failed every call with a tensor's shape.
    wrong = components_of_other_classes(index, pipeline_class, given)
    made_for = index.get("_class_name")
    if wrong:
        saved = f"{made_for}'s" if isinstance(made_for, str) else "another pipeline's"
        raise FatalBackendError(
            f"generator {name!r}: checkpoint {checkpoint} holds {saved} components, "
            f"not {pipeline_class.__name__}'s: "
            + "; ".join(
                f"its {component} is {found} ({pipeline_class.__name__} takes {wanted})"
                for component, found, wanted in wrong
            )
            + "; check options.pipeline and options.checkpoint"
        )
    saved_by = getattr(diffusers, made_for, None) if isinstance(made_for, str) else None
    if isinstance(saved_by, type) and not (
        issubclass(pipeline_class, saved_by) or issubclass(saved_by, pipeline_class)
    ):
        # The components fit, yet their shapes may not (an InstructPix2Pix UNet takes 8
        # channels, Stable Diffusion's 4); pipelines of one family share checkpoints
        # (an image-to-image pipeline loads a text-to-image one's), so it may work.
        hint = (
            f"checkpoint {checkpoint} was saved by {made_for}, not "
            f"{pipeline_class.__name__}: if its calls fail, set options.checkpoint to one "
            f"saved for {pipeline_class.__name__}, or options.pipeline to {made_for}"
        )
        logger.warning("generator %r: %s", name, hint)
        return hint
    return None


def check_device(torch: Any, name: str, device: str) -> None:
    """Check that ``device`` exists on this machine, for generator ``name``.

    Raises:
        FatalBackendError: it does not, or is of no kind torch knows.
    """
    # Each message names the generator: with several, the user must know whose devices.
    where = f"generator {name!r}"
    kind, _, index = device.partition(":")
    if kind == "cpu":
        return
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        wanted = int(index or 0)
        if wanted >= count:
            raise FatalBackendError(
                f"{where}: device {device!r} is not available (torch {torch.__version__} sees "
                f"{count} CUDA device(s)); set options.devices to devices that exist, e.g. "
                "devices = ['cpu']"
            )
        return
    if kind == "mps":
        if not torch.backends.mps.is_available():
            raise FatalBackendError(
                f"{where}: device {device!r} is not available; set options.devices to devices "
                "that exist, e.g. devices = ['cpu']"
            )
        return
    raise FatalBackendError(
        f"{where}: unknown device {device!r}; use 'cpu', 'cuda:<n>' or 'mps' in options.devices"
    )


def load_pipeline(
    torch: Any,
    diffusers: Any,
    pipeline_class: Any,
    device: str,
    *,
    name: str,
    spec: PipelineSpec,
    offload: Offload,
) -> Any:
    """Load ``spec``'s pipeline onto ``device``, its scheduler and IP-Adapter set as the
    spec says, offloaded as ``offload`` says, and without progress bars.

    Raises:
        FatalBackendError: the pipeline cannot be loaded.
    """
    dtype = getattr(torch, spec.dtype_for(device))
    check_checkpoint(name, spec)
    arguments: dict[str, Any] = {
        _dtype_keyword(diffusers): dtype,
        "local_files_only": spec.local_files_only,
    }
    arguments.update(spec.load)  # load wins (its dtype and local_files_only are in spec)
    try:
        pipe = pipeline_class.from_pretrained(spec.checkpoint, **arguments)
    except (OSError, ValueError) as exc:
        raise FatalBackendError(
            f"generator {name!r}: cannot load {spec.checkpoint!r}{_load_hint(spec, exc)}"
        ) from exc
    if spec.scheduler is not None:
        scheduler_class = getattr(diffusers, spec.scheduler)  # checked by check_classes
        pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    if spec.ip_adapter is not None:
        adapter = spec.ip_adapter
        pipe.load_ip_adapter(
            adapter.repo,
            subfolder=adapter.subfolder or None,
            weight_name=adapter.weight_name,
            local_files_only=spec.local_files_only,
        )
        pipe.set_ip_adapter_scale(adapter.scale)
    if offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


UNREADABLE_WEIGHTS = "Unable to load weights from checkpoint file"
"""How diffusers words a weights file it found but could not read (a truncated one)."""


def _load_hint(spec: PipelineSpec, exc: BaseException) -> str:
    """What a failed ``from_pretrained`` of ``spec`` most likely means, then ``exc``'s text
    (with the innermost cause's, which says what is wrong with an unreadable file)."""
    text = str(exc).strip()
    if UNREADABLE_WEIGHTS in text:
        cause = exc
        while cause.__cause__ is not None or cause.__context__ is not None:
            cause = cause.__cause__ or cause.__context__  # type: ignore[assignment]
        detail = f" ({describe_error(cause)})" if cause is not exc else ""
        return (
            " (a weights file in it is incomplete or damaged: a download or copy cut short? "
            f"download or copy it again): {text}{detail}"
        )
    if Path(spec.checkpoint).is_dir():
        return f" (a local folder: is a component of the pipeline missing from it?): {text}"
    if spec.local_files_only:
        return (
            " (offline: the weights must already be in the Hugging Face cache, or "
            f"checkpoint must name a local folder): {text}"
        )
    return f": {text}"


def _dtype_keyword(diffusers: Any) -> str:
    # diffusers renamed ``torch_dtype`` to ``dtype`` and warns about the old name.
    from packaging.version import Version

    return "dtype" if Version(diffusers.__version__) >= Version("0.42") else "torch_dtype"
