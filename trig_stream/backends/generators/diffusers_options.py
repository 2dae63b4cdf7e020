"""The ``options`` of the ``diffusers`` generator, and how they combine with a preset.

Two forms::

    # an upstream alias, with any default overridden
    options = { preset = "flux", devices = ["cuda:0", "cuda:1"], steps = 28 }

    # anything else: a pipeline class, a checkpoint (hub id or folder) and call arguments
    options = { pipeline = "FluxPipeline", checkpoint = "/models/flux-tiny",
                devices = ["cpu"], call = { max_sequence_length = 16 } }

Validating these options imports nothing heavier than pydantic.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Annotated, Any, Literal, cast, get_args

from pydantic import BaseModel, Field, ValidationInfo, field_validator, model_validator

from trig_stream.backends.generators.pipeline_calls import engine_arguments_problem
from trig_stream.backends.generators.presets import (
    PRESETS,
    DType,
    InputKind,
    IPAdapterSpec,
    preset_names,
)
from trig_stream.config_fields import OPTIONS_CONFIG, DeviceName
from trig_stream.config_problems import Loc, key_problem

Offload = Literal["none", "model", "sequential"]
Isolation = Literal["thread", "process"]

_OFFLINE_VALUES = {"1", "true", "yes", "on"}

SMALLEST_SIDE, LARGEST_SIDE = 8, 8192
Side = Annotated[int, Field(ge=SMALLEST_SIDE, le=LARGEST_SIDE)]
"""A picture's width or height in pixels: at most 8192 (a source picture resized past it
took gigabytes, and past 2**31 Pillow's resize failed each call with an OverflowError)."""


class IPAdapterOptions(BaseModel):
    """``options.ip_adapter``: IP-Adapter weights for ``ip_adapter`` inputs."""

    model_config = OPTIONS_CONFIG

    repo: str
    weight_name: str
    subfolder: str = ""
    scale: float = 0.6


_SIZE_MULTIPLES = (("Flux", 16), ("StableDiffusion3", 16), ("Sana", 32), ("StableDiffusion", 8))
"""What a pipeline family's height and width must be multiples of (the first prefix that
matches its class name wins): others fail each call, or round the size down unasked."""


def size_multiple(pipeline: str) -> int | None:
    """What ``pipeline``'s height and width must be multiples of, when known (``pipeline`` a
    class name, or ``module:Class``)."""
    name = pipeline.rpartition(":")[2]
    return next((n for prefix, n in _SIZE_MULTIPLES if name.startswith(prefix)), None)


class DiffusersOptions(BaseModel):
    """``options`` of the ``diffusers`` generator.

    Either ``preset`` (an upstream alias, see :mod:`trig_stream.backends.generators.presets`)
    or both ``pipeline`` and ``checkpoint``; every other field overrides the preset.
    """

    model_config = OPTIONS_CONFIG

    preset: str | None = None
    pipeline: str | None = None
    """A diffusers pipeline class name (``FluxPipeline``) or ``module:Class``."""
    checkpoint: str | None = None
    """A hub id or a local folder written by ``save_pretrained``."""
    inputs: InputKind | None = None
    """How samples reach the pipeline; the preset's, else ``text``."""
    revision: str | None = None
    variant: str | None = None
    devices: list[DeviceName] | None = None
    """One pipeline per device, used by the worker of the same index (``["cuda:0",
    "cuda:1"]``, ``["cpu"]``). Default: ``cuda:0`` .. ``cuda:<workers-1>``."""
    dtype: DType = "auto"
    """``auto``: the preset's dtype on an accelerator, float32 on a CPU."""
    offload: Offload = "none"
    """Keep weights in CPU memory and move them to the device per model (``model``) or per
    layer (``sequential``): slower, for cards too small for the pipeline."""
    isolation: Isolation = "thread"
    """Where each device's pipeline runs: a worker thread of the engine's process
    (``thread``), or a child process of its own (``process``), where it never waits on the
    engine's other threads for the interpreter lock."""
    local_files_only: bool = False
    """Never reach the hub; always on when the environment sets HF_HUB_OFFLINE."""
    scheduler: str | None = None
    """A diffusers scheduler class to use instead of the checkpoint's."""
    steps: Annotated[int, Field(ge=1)] | None = None
    guidance_scale: float | None = None
    image_guidance_scale: float | None = None
    height: Side | None = None
    width: Side | None = None
    negative_prompt: str | None = None
    source_size: tuple[Side, Side] | None = None
    """(width, height) the source / reference image is resized to before use: for an edit
    pipeline, the picture's size (height and width, which would set it too, stay unset)."""
    call: dict[str, Any] = Field(default_factory=dict)
    """Further pipeline call arguments; they win over everything else."""
    load: dict[str, Any] = Field(default_factory=dict)
    """Further ``from_pretrained`` arguments; they win over the typed options (``dtype``,
    ``local_files_only``, ``revision``, ``variant``)."""
    ip_adapter: IPAdapterOptions | None = None

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str | None) -> str | None:
        if value is not None and value not in PRESETS:
            raise ValueError(f"unknown preset {value!r}; known: {', '.join(preset_names())}")
        return value

    @field_validator("pipeline")
    @classmethod
    def _importable_pipeline(cls, value: str | None) -> str | None:
        # ":" or ".x:Y" reached importlib, whose ValueError ("Empty module name") read as a
        # fault of the backend's code.
        if value is not None and ":" in value:
            module, _, attribute = value.partition(":")
            if not all(part.isidentifier() for part in module.split(".")):
                raise ValueError(
                    "the module of 'module:Class' must be an absolute module path (names "
                    "joined by dots, e.g. 'my_pipelines:MyPipeline'): set it, or give a "
                    "diffusers class name alone"
                )
            if not attribute.isidentifier():
                raise ValueError(
                    "the class of 'module:Class' must be a name (e.g. "
                    "'my_pipelines:MyPipeline'): set it after the ':'"
                )
        return value

    @field_validator("devices")
    @classmethod
    def _some_devices(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:
            raise ValueError("list at least one device, e.g. ['cuda:0'] or ['cpu']")
        return value

    @field_validator("source_size", mode="before")
    @classmethod
    def _width_and_height(cls, value: object) -> object:
        # [512] was "source_size[1]: required key is missing", saying nothing of what goes
        # there; the values themselves are checked by the field's type. A before-validator's
        # value meets that type in Python's strict mode, where only a tuple is one.
        if value is None:
            return None
        if not isinstance(value, list | tuple) or len(value) != 2:
            raise ValueError(
                "source_size takes two values, [width, height] (e.g. [512, 512]): give both"
            )
        return tuple(value)

    @field_validator("call")
    @classmethod
    def _call_leaves_the_engine_its_arguments(
        cls, value: dict[str, Any], info: ValidationInfo
    ) -> dict[str, Any]:
        # They passed validate, then were overwritten unread (prompt, output_type) or made
        # every call fail (return_dict = false, num_images_per_prompt = 2).
        preset = PRESETS.get(info.data.get("preset") or "")
        inputs = info.data.get("inputs") or (preset.inputs if preset else "text")
        problem = engine_arguments_problem(value, inputs)
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("load")
    @classmethod
    def _load_arguments_the_spec_reads(cls, value: dict[str, Any]) -> dict[str, Any]:
        # These replace a typed option (see spec()), which must then be one it can be.
        names = [n for n in get_args(DType) if n != "auto"]
        dtypes = [key for key in ("dtype", "torch_dtype") if key in value]
        if len(dtypes) == 2:
            raise ValueError("load sets both dtype and torch_dtype; keep one (or use dtype)")
        for key in dtypes:
            if value[key] not in names:
                raise ValueError(
                    f"load.{key} {value[key]!r} is no dtype; use one of "
                    f"{', '.join(map(repr, names))}"
                )
        if "local_files_only" in value and not isinstance(value["local_files_only"], bool):
            raise ValueError(
                f"load.local_files_only {value['local_files_only']!r} is no boolean; use "
                "true or false"
            )
        return value

    @model_validator(mode="after")
    def _preset_or_pipeline(self) -> DiffusersOptions:
        if self.preset is None and (self.pipeline is None or self.checkpoint is None):
            raise ValueError(
                "set either preset (one of: "
                f"{', '.join(preset_names())}) or both pipeline and checkpoint"
            )
        return self

    # The checks of several keys below name the key at fault (key_problem), so that a
    # message names its line rather than the options' header; the table itself where the
    # fault is the preset's.

    @model_validator(mode="after")
    def _what_the_inputs_need(self) -> DiffusersOptions:
        spec = self.spec()
        if spec.inputs == "ip_adapter" and spec.ip_adapter is None:
            # Without the weights the pipeline has no image projection: every call failed.
            message = (
                "inputs 'ip_adapter' need the IP-Adapter weights: set options.ip_adapter = "
                '{ repo = "...", weight_name = "..." } (or use the preset ip_adapter_sdxl)'
            )
            if self.inputs is None:
                raise ValueError(message)
            raise key_problem(type(self), ("inputs",), message, self.inputs)
        return self

    @model_validator(mode="after")
    def _offload_the_devices_can_do(self) -> DiffusersOptions:
        cpus = [d for d in self.devices or () if d.partition(":")[0] == "cpu"]
        if self.offload == "sequential" and cpus:
            # Every call failed with a TypeError from torch; "model" works there (uselessly).
            raise key_problem(
                type(self),
                ("offload",),
                f"offload 'sequential' cannot run on the device {cpus[0]!r}: it moves each "
                "layer to an accelerator as it runs, and every call on a CPU fails; use "
                'offload = "none" on a CPU, or list accelerators in devices',
                self.offload,
            )
        return self

    @model_validator(mode="after")
    def _sizes_the_pipeline_makes(self) -> DiffusersOptions:
        for key in ("height", "width"):
            # call's win over the typed ones, and are bounded alike (see Side).
            value = self.call.get(key)
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue  # not a number: the pipeline's own to refuse
            if not SMALLEST_SIDE <= value <= LARGEST_SIDE:
                raise key_problem(
                    type(self),
                    ("call", key),
                    f"{key} {value} is no picture's side: a side is {SMALLEST_SIDE} to "
                    f"{LARGEST_SIDE} pixels, as for the typed {key}",
                    value,
                )
        spec = self.spec()
        problem = _size_problem(spec, spec.pipeline)
        if problem is not None:
            key, message = problem
            loc = self._size_key(key)
            if not loc:  # the preset's own size
                raise ValueError(message)
            value = list(spec.source_size or ()) if key == "source_size" else spec.call[key]
            raise key_problem(type(self), loc, message, value)
        if spec.inputs != "edit":
            return self
        explicit = self._explicit_sizes()
        if self.source_size is not None and explicit:
            raise key_problem(
                type(self),
                ("source_size",),
                f"source_size and {'/'.join(explicit)} both set the size of an edit "
                "pipeline's picture (it draws at its source image's size, resized to "
                "source_size, else to width x height); set one of them",
                list(self.source_size),
            )
        given = [key for key in ("height", "width") if key in spec.call]
        if spec.source_size is None and len(given) == 1:
            # An edit pipeline draws at its source's size, which only both set together.
            key = given[0]
            message = (
                f"{key} without {'width' if key == 'height' else 'height'}: an edit "
                "pipeline draws at its source image's size, resized to width x height; set "
                "both (or source_size instead)"
            )
            loc = self._size_key(key)
            if not loc:  # the preset's own size
                raise ValueError(message)
            raise key_problem(type(self), loc, message, spec.call[key])
        return self

    def _size_key(self, key: str) -> Loc:
        """Where these options set ``height``, ``width`` or ``source_size``: ``call``'s,
        which wins, the typed option, or nowhere (empty: the preset's)."""
        if key != "source_size" and key in self.call:
            return ("call", key)
        return (key,) if getattr(self, key) is not None else ()

    def _explicit_sizes(self) -> list[str]:
        """``height`` and ``width``, those these options set (typed, or in ``call``)."""
        return [k for k in ("height", "width") if getattr(self, k) is not None or k in self.call]

    def spec(self) -> PipelineSpec:
        """The pipeline to build and how to call it: the preset with these options applied."""
        preset = PRESETS[self.preset] if self.preset is not None else None
        call: dict[str, Any] = dict(preset.call) if preset else {}
        overrides = {
            "num_inference_steps": self.steps,
            "guidance_scale": self.guidance_scale,
            "image_guidance_scale": self.image_guidance_scale,
            "height": self.height,
            "width": self.width,
            "negative_prompt": self.negative_prompt,
        }
        call.update({key: value for key, value in overrides.items() if value is not None})
        call.update(self.call)
        ip_adapter = preset.ip_adapter if preset else None
        if self.ip_adapter is not None:
            ip_adapter = IPAdapterSpec(**self.ip_adapter.model_dump())
        load = dict(preset.load) if preset else {}
        if self.revision is not None:
            load["revision"] = self.revision
        if self.variant is not None:
            load["variant"] = self.variant
        load.update(self.load)  # it wins, as the README says
        # from_pretrained's dtype and local_files_only come from the typed options, replaced
        # by load's where it sets them: the fingerprint then records the dtype loaded.
        dtype = cast("DType", load.pop("dtype", load.pop("torch_dtype", self.dtype)))
        local_files_only = bool(load.pop("local_files_only", self.local_files_only))
        inputs = self.inputs or (preset.inputs if preset else "text")
        source_size = self.source_size
        # An edit pipeline draws at its source's size: a width x height given here replaces
        # the size the preset resizes sources to (hqedit's 512 x 512).
        if source_size is None and preset and (inputs != "edit" or not self._explicit_sizes()):
            source_size = preset.source_size
        return PipelineSpec(
            pipeline=self.pipeline or (preset.pipeline if preset else ""),
            checkpoint=self.checkpoint or (preset.checkpoint if preset else ""),
            inputs=inputs,
            call=call,
            accelerator_dtype=preset.dtype if preset else "float16",
            dtype=dtype,
            scheduler=self.scheduler or (preset.scheduler if preset else None),
            load=load,
            ip_adapter=ip_adapter,
            source_size=source_size,
            local_files_only=local_files_only or hub_offline(),
        )


def size_problem(spec: PipelineSpec, pipeline: str) -> str | None:
    """What is wrong with the size of ``spec``'s pictures for the pipeline class named
    ``pipeline`` (see :func:`size_multiple`), or None."""
    problem = _size_problem(spec, pipeline)
    return None if problem is None else problem[1]


def _size_problem(spec: PipelineSpec, pipeline: str) -> tuple[str, str] | None:
    """As :func:`size_problem`, with the key at fault: ``height``, ``width`` or
    ``source_size``."""
    multiple = size_multiple(pipeline)
    if multiple is None:
        return None
    for key in ("height", "width"):
        value = spec.call.get(key)
        if isinstance(value, int) and value % multiple:
            return key, (
                f"{key} {value} is not a multiple of {multiple}, as {pipeline} needs (it "
                f"fails, or makes a smaller picture than asked); use {_nearest(value, multiple)}"
            )
    if spec.inputs != "edit":
        return None
    # An edit pipeline draws at its source's size: source_size, or width x height, sets
    # the picture's size, and must be one the pipeline can make.
    source_size = spec.source_size or ()
    for key, value in zip(("width", "height"), source_size, strict=False):
        if value % multiple:
            return "source_size", (
                f"source_size {list(source_size)}: its {key} {value} is not a multiple of "
                f"{multiple}, as {pipeline} needs (an edit pipeline draws at its source's "
                f"size: it makes a smaller picture than asked); use {_nearest(value, multiple)}"
            )
    return None


def _nearest(value: int, multiple: int) -> str:
    """The multiples of ``multiple`` next to ``value``, for a message (``56 or 64``)."""
    lower = value // multiple * multiple
    return f"{lower} or {lower + multiple}" if lower else f"{multiple}"


@dataclass(frozen=True, slots=True)
class PipelineSpec:
    """Everything needed to load a pipeline and call it, resolved from the options."""

    pipeline: str
    checkpoint: str
    inputs: InputKind
    call: dict[str, Any]
    accelerator_dtype: DType
    dtype: DType
    scheduler: str | None
    load: dict[str, Any]
    ip_adapter: IPAdapterSpec | None
    source_size: tuple[int, int] | None
    local_files_only: bool

    def dtype_for(self, device: str) -> str:
        """The dtype name to load with on ``device``."""
        if self.dtype != "auto":
            return self.dtype
        return "float32" if device.partition(":")[0] == "cpu" else self.accelerator_dtype


def hub_offline() -> bool:
    """Whether the environment forbids the Hugging Face hub (HF_HUB_OFFLINE)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _OFFLINE_VALUES
