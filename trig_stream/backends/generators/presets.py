"""The diffusers checkpoints TRIG evaluates, under their upstream aliases, with their defaults.

A preset names the pipeline class, the hub checkpoint, how a sample's inputs reach the
pipeline, and the call arguments upstream used. Every field can be overridden in the
generator's ``options``; anything without a preset uses the generic form (``pipeline`` +
``checkpoint`` + ``call``). Nothing here imports torch or diffusers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

from trig_stream.dimensions import Task

InputKind: TypeAlias = Literal["text", "edit", "subject", "ip_adapter"]
"""How a sample reaches the pipeline:

* ``text``: a batch of prompts (t2i).
* ``edit``: prompts plus the source images as ``image`` (p2p, InstructPix2Pix style).
* ``subject``: one call per sample with ``reference_image`` and the subject ``item`` as
  source and target category (BLIP-Diffusion style; it takes one reference per call).
* ``ip_adapter``: prompts plus the reference images as ``ip_adapter_image`` (s2p).
"""

DType: TypeAlias = Literal["auto", "float32", "float16", "bfloat16"]

INPUT_TASKS: Mapping[InputKind, Task] = {
    "text": "t2i",
    "edit": "p2p",
    "subject": "s2p",
    "ip_adapter": "s2p",
}
"""The TRIG task each input kind serves."""

INPUT_ARGUMENTS: Mapping[InputKind, tuple[str, ...]] = {
    "text": (),
    "edit": ("image",),
    "subject": ("reference_image", "source_subject_category", "target_subject_category"),
    "ip_adapter": ("ip_adapter_image",),
}
"""The call arguments each input kind adds to the prompt: a pipeline must name each of them
in its call (one that takes them only through ``**kwargs`` ignores them)."""


@dataclass(frozen=True, slots=True)
class IPAdapterSpec:
    """Where IP-Adapter weights live and how strongly they steer the image."""

    repo: str
    weight_name: str
    subfolder: str = ""
    scale: float = 0.6


@dataclass(frozen=True, slots=True)
class Preset:
    """One upstream generator.

    Attributes:
        pipeline: the diffusers pipeline class name.
        checkpoint: the hub id (or a local folder) of the weights.
        inputs: how a sample's inputs reach the pipeline.
        call: the call arguments upstream used (steps, guidance, size...).
        dtype: the dtype on an accelerator; CPUs always run float32 under ``auto``.
        scheduler: a diffusers scheduler class to swap in, built from the checkpoint's config.
        load: extra ``from_pretrained`` arguments.
        ip_adapter: IP-Adapter weights to load after the pipeline, for ``ip_adapter`` inputs.
        source_size: (width, height) the source / reference image is resized to first.
    """

    pipeline: str
    checkpoint: str
    inputs: InputKind
    call: Mapping[str, Any]
    dtype: DType = "float16"
    scheduler: str | None = None
    load: Mapping[str, Any] = field(default_factory=dict)
    ip_adapter: IPAdapterSpec | None = None
    source_size: tuple[int, int] | None = None


_SQUARE_1024 = {"height": 1024, "width": 1024}
_NO_SAFETY_CHECKER = {"safety_checker": None, "requires_safety_checker": False}
# The safety checker blacks out images it flags, which would distort the toxicity and bias
# dimensions; TRIG judges what the model itself draws.

PRESETS: Mapping[str, Preset] = {
    # -- t2i
    "flux": Preset(
        pipeline="FluxPipeline",
        checkpoint="black-forest-labs/FLUX.1-dev",
        inputs="text",
        call={**_SQUARE_1024, "num_inference_steps": 50, "guidance_scale": 3.5},
        dtype="bfloat16",
    ),
    "sd35": Preset(
        pipeline="StableDiffusion3Pipeline",
        checkpoint="stabilityai/stable-diffusion-3.5-large",
        inputs="text",
        call={**_SQUARE_1024, "num_inference_steps": 28, "guidance_scale": 4.5},
        dtype="bfloat16",
    ),
    "sana": Preset(
        pipeline="SanaPipeline",
        checkpoint="Efficient-Large-Model/SANA1.5_4.8B_1024px_diffusers",
        inputs="text",
        call={**_SQUARE_1024, "num_inference_steps": 20, "guidance_scale": 4.5},
        dtype="bfloat16",
    ),
    "sdxl": Preset(
        pipeline="StableDiffusionXLPipeline",
        checkpoint="stabilityai/stable-diffusion-xl-base-1.0",
        inputs="text",
        call={**_SQUARE_1024, "num_inference_steps": 50, "guidance_scale": 5.0},
    ),
    "sd15": Preset(
        pipeline="StableDiffusionPipeline",
        # The community mirror of the original runwayml checkpoint, which was taken down.
        checkpoint="stable-diffusion-v1-5/stable-diffusion-v1-5",
        inputs="text",
        call={"height": 512, "width": 512, "num_inference_steps": 50, "guidance_scale": 7.5},
        load=_NO_SAFETY_CHECKER,
    ),
    "pixart_sigma": Preset(
        pipeline="PixArtSigmaPipeline",
        checkpoint="PixArt-alpha/PixArt-Sigma-XL-2-1024-MS",
        inputs="text",
        call={**_SQUARE_1024, "num_inference_steps": 20, "guidance_scale": 4.5},
    ),
    # -- p2p
    "instructp2p": Preset(
        pipeline="StableDiffusionInstructPix2PixPipeline",
        checkpoint="timbrooks/instruct-pix2pix",
        inputs="edit",
        call={"num_inference_steps": 100, "guidance_scale": 7.5, "image_guidance_scale": 1.5},
        scheduler="EulerAncestralDiscreteScheduler",
        load=_NO_SAFETY_CHECKER,
    ),
    "hqedit": Preset(
        pipeline="StableDiffusionInstructPix2PixPipeline",
        checkpoint="MudeHui/HQ-Edit",
        inputs="edit",
        call={"num_inference_steps": 30, "guidance_scale": 7.0, "image_guidance_scale": 1.5},
        scheduler="EulerAncestralDiscreteScheduler",
        load=_NO_SAFETY_CHECKER,
        source_size=(512, 512),
    ),
    # -- s2p
    "blipdiffusion": Preset(
        pipeline="BlipDiffusionPipeline",
        checkpoint="Salesforce/blipdiffusion",
        inputs="subject",
        call={"height": 512, "width": 512, "num_inference_steps": 25, "guidance_scale": 7.5},
    ),
    "ip_adapter_sdxl": Preset(
        pipeline="StableDiffusionXLPipeline",
        checkpoint="stabilityai/stable-diffusion-xl-base-1.0",
        inputs="ip_adapter",
        call={**_SQUARE_1024, "num_inference_steps": 50, "guidance_scale": 5.0},
        ip_adapter=IPAdapterSpec(
            repo="h94/IP-Adapter", subfolder="sdxl_models", weight_name="ip-adapter_sdxl.bin"
        ),
    ),
}
"""Upstream aliases. Upstream also fixes seed 42 for every image; here the engine derives
one seed per (model, data_id) from ``[run].seed`` and records it."""


def preset_names() -> list[str]:
    """The known aliases, sorted."""
    return sorted(PRESETS)
