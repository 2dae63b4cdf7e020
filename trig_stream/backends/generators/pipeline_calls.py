"""The arguments of a ``diffusers`` generator's pipeline calls: checked against the pipeline
class's call before any weight loads (:func:`check_call_arguments`), and built for each
batch (:func:`call_arguments`)."""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from trig_stream.backends.generators.presets import INPUT_ARGUMENTS, InputKind
from trig_stream.config_fields import set_by_the_engine
from trig_stream.errors import FatalBackendError

if TYPE_CHECKING:
    from PIL.Image import Image

    from trig_stream.backends.base import GenerationRequest
    from trig_stream.backends.generators.diffusers_options import PipelineSpec

logger = logging.getLogger(__name__)

PIPELINE_NAMES = {"negative_prompt": "neg_prompt"}
"""Typed options a pipeline takes under a name of its own (BLIP-Diffusion's ``neg_prompt``)."""

_INPUT_PICTURE = {
    "text": "prompt",
    "edit": "source image",
    "subject": "reference image and subject",
    "ip_adapter": "reference image",
}
"""What each input kind's call arguments carry, for messages."""


_STEP_CALLBACK = (
    "the engine's step callback goes there: it counts the steps and stops a call when the run stops"
)

ENGINE_ARGUMENTS: Mapping[str, str] = {
    "prompt": "the engine passes each call its samples' prompts",
    "generator": "the engine passes a generator per image, seeded from the run's seed",
    "output_type": "the engine chooses the form the pictures come back in",
    "return_dict": (
        "the engine reads the pictures from the pipeline's output object (false returns a "
        "tuple, and every call fails)"
    ),
    "num_images_per_prompt": ("the engine makes one picture per prompt (more fails every call)"),
    "callback_on_step_end": _STEP_CALLBACK,
    "callback": _STEP_CALLBACK,
    "callback_steps": _STEP_CALLBACK,
}
"""Call arguments the engine sets itself, each with why: ``call`` may not set them (its
value was overwritten unread, or made every call fail). The arguments an input kind passes
its pictures in (:data:`~trig_stream.backends.generators.presets.INPUT_ARGUMENTS`) are the
engine's too."""


def engine_arguments_problem(call: Mapping[str, Any], inputs: InputKind) -> str | None:
    """Why ``call`` (``options.call``, with ``inputs = inputs``) cannot be used: the call
    arguments among it that the engine sets itself, each with its reason; None if none."""
    reasons = dict(ENGINE_ARGUMENTS)
    for argument in INPUT_ARGUMENTS[inputs]:
        reasons[argument] = f"the engine passes each sample's {_INPUT_PICTURE[inputs]} there"
    return set_by_the_engine("options.call", [key for key in call if key in reasons], reasons)


_PER_PROMPT = re.compile(r"^(negative_prompt|prompt)(_\d)?$")
"""Call arguments a pipeline takes one per prompt (``negative_prompt``, SDXL's
``prompt_2``, SD 3's ``negative_prompt_3``...), which a config gives as one text for all."""


def pipeline_names(call: dict[str, Any], accepts: frozenset[str]) -> dict[str, Any]:
    """``call`` with each of :data:`PIPELINE_NAMES` under the name the pipeline takes it by."""
    named = dict(call)
    for ours, theirs in PIPELINE_NAMES.items():
        if ours in named and ours not in accepts and theirs in accepts:
            named[theirs] = named.pop(ours)
    return named


def call_parameters(pipeline_class: Any) -> dict[str, inspect.Parameter]:
    """The parameters of ``pipeline_class``'s call, by name: its ``__call__``'s and, while
    the one found takes ``**kwargs``, those of the next ``__call__`` up its MRO, to which it
    may hand them on (``class MyFlux(FluxPipeline)`` with ``__call__(self, *a, **k)`` takes
    what FluxPipeline's takes). The nearest class's parameter of a name wins."""
    found: dict[str, inspect.Parameter] = {}
    for kin in pipeline_class.__mro__:
        call = vars(kin).get("__call__")
        if call is None:
            continue
        parameters = inspect.signature(call).parameters
        for key, parameter in parameters.items():
            found.setdefault(key, parameter)
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            break
    return found


def check_call_arguments(
    name: str, spec: PipelineSpec, pipeline_class: Any, accepts: frozenset[str]
) -> None:
    """Check that the pipeline's call names the arguments ``spec.inputs`` passes, and
    takes those of ``spec.call`` (of which ``accepts`` names those it takes).

    Raises:
        FatalBackendError: it does not (an unknown call argument is only warned about when
            the call takes ``**kwargs``).
    """
    parameters = call_parameters(pipeline_class).values()
    named = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    inputs = spec.inputs
    # A pipeline that takes these only through **kwargs (StableDiffusionPipeline takes
    # image= so) drops them unread: its pictures came from the prompt alone, and were
    # judged as edits of the source.
    unnamed = [argument for argument in INPUT_ARGUMENTS[inputs] if argument not in named]
    if unnamed:
        raise FatalBackendError(
            f"generator {name!r}: {pipeline_class.__name__}'s call has no "
            f"{', '.join(unnamed)} argument, which inputs = {inputs!r} passes the "
            f"{_INPUT_PICTURE[inputs]} in (it would draw from the prompt alone); set "
            f"options.pipeline to one whose call takes {', '.join(INPUT_ARGUMENTS[inputs])}, "
            "or options.inputs to what this one takes"
        )
    called = pipeline_names(spec.call, accepts)
    unknown = sorted(set(called) - accepts - {"height", "width"})
    if not unknown:
        return
    message = (
        f"generator {name!r}: {pipeline_class.__name__} takes no argument(s) "
        f"{', '.join(unknown)}; fix options.call or the typed options"
    )
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        # It takes **kwargs, often only for deprecated names: it may ignore them.
        logger.warning("%s", message)
        return
    raise FatalBackendError(message)


def call_arguments(
    spec: PipelineSpec,
    accepts: frozenset[str],
    output_type: str,
    batch: Sequence[GenerationRequest],
    pictures: Sequence[Image | None],
) -> dict[str, Any]:
    """The arguments of the pipeline call that makes ``batch``, each request with its
    source or reference picture in ``pictures`` (but the seeded generators and the step
    callback): ``spec``'s call arguments under the names the pipeline ``accepts``, the
    prompts, and the pictures under the names ``spec.inputs`` passes them by."""
    kwargs = pipeline_names(spec.call, accepts)
    if spec.inputs == "edit" and "height" not in accepts:
        kwargs.pop("height", None)
        kwargs.pop("width", None)
    kwargs["prompt"] = [r.sample.prompt for r in batch]
    for key, value in kwargs.items():
        if isinstance(value, str) and _PER_PROMPT.match(key):
            # The pipelines want these as the prompt is given: one per prompt of the list.
            kwargs[key] = [value] * len(batch)
    inputs = spec.inputs
    if inputs == "edit":
        kwargs["image"] = list(pictures)
    elif inputs == "ip_adapter":
        kwargs["ip_adapter_image"] = pictures[0]
    elif inputs == "subject":
        item = batch[0].sample.item or ""
        kwargs["reference_image"] = pictures[0]
        kwargs["source_subject_category"] = [item]
        kwargs["target_subject_category"] = [item]
    kwargs["output_type"] = output_type
    return kwargs
