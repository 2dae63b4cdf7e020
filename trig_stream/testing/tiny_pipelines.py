"""Tiny diffusers pipelines with random weights, built in code and saved to a folder.

They stand in for real checkpoints in tests, demos and benchmarks: nothing is downloaded, the
tokenizers are built from in-memory vocabularies, and the folder they are saved to loads
through the same ``from_pretrained(..., local_files_only=True)`` path as a hub checkpoint.
A 64x64 image takes tens of milliseconds on a CPU. The pictures are noise, but a seeded
generator makes them bit-for-bit repeatable.

Example::

    path = build_tiny_pipeline("flux", tmp_path / "flux-tiny")
    # [[generators]] backend = "diffusers", options.pipeline = "FluxPipeline",
    # options.checkpoint = str(path), options.devices = ["cpu"]
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, get_args

from trig_stream.errors import require_installed

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

TinyKind: TypeAlias = Literal["flux", "sd", "instruct_pix2pix"]
"""``flux``: FluxPipeline (t2i); ``sd``: StableDiffusionPipeline (t2i);
``instruct_pix2pix``: StableDiffusionInstructPix2PixPipeline (p2p)."""

TINY_KINDS: tuple[TinyKind, ...] = get_args(TinyKind)

PIPELINE_CLASSES: dict[TinyKind, str] = {
    "flux": "FluxPipeline",
    "sd": "StableDiffusionPipeline",
    "instruct_pix2pix": "StableDiffusionInstructPix2PixPipeline",
}
"""The diffusers class that loads each kind."""

TINY_CALL: dict[TinyKind, dict[str, Any]] = {
    "flux": {"max_sequence_length": 64},
    "sd": {},
    "instruct_pix2pix": {},
}
"""Call arguments that keep each kind fast (Flux pads T5 text to 512 tokens otherwise)."""

PACKAGES: tuple[str, ...] = ("torch", "diffusers", "transformers")
"""What building a tiny pipeline imports (all of the ``diffusers`` extra)."""

_TEXT_WIDTH = 32
_MAX_TOKENS = 77


def require_packages(packages: Iterable[str]) -> None:
    """Check that ``packages`` are installed, without importing them.

    Raises:
        MissingExtraError: the first of them that is not, naming the extra that brings it.
    """
    require_installed(packages, "diffusers")


def build_tiny_pipeline(kind: TinyKind, path: str | Path, *, seed: int = 0) -> Path:
    """Build a random-weight pipeline of ``kind`` and save it to ``path``.

    Args:
        kind: which pipeline (see :data:`TinyKind`).
        path: the folder to write; created when missing.
        seed: seeds the random weights, so two builds with one seed are identical.

    Returns:
        The folder, ready for ``from_pretrained(path, local_files_only=True)``.

    Raises:
        MissingExtraError: diffusers, transformers or torch is not installed.
    """
    # Up front: each is imported only where a part of the pipeline is made, and one found
    # missing there ended in a bare ModuleNotFoundError.
    require_packages(PACKAGES)
    import torch

    path = Path(path)
    torch.manual_seed(seed)
    if kind == "flux":
        pipe = _flux()
    elif kind == "sd":
        pipe = _stable_diffusion(unet_in_channels=4, edit=False)
    elif kind == "instruct_pix2pix":
        pipe = _stable_diffusion(unet_in_channels=8, edit=True)
    else:
        raise ValueError(f"unknown tiny pipeline {kind!r}; expected one of {TINY_KINDS}")
    pipe.save_pretrained(str(path))
    return path


def byte_level_clip_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer over single bytes: 256 byte symbols, the same ending a word, and the
    start / end tokens; no merges, so every word is spelled out byte by byte."""
    from transformers import CLIPTokenizer

    symbols = _byte_symbols()
    vocab = {symbol: i for i, symbol in enumerate(symbols)}
    vocab.update({f"{symbol}</w>": len(symbols) + i for i, symbol in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(
        vocab=vocab,
        merges=[],
        model_max_length=_MAX_TOKENS,
        pad_token="<|endoftext|>",
    )


def _byte_symbols() -> list[str]:
    # The printable stand-in of every byte that byte-level BPE uses: printable Latin-1 bytes
    # stand for themselves, the others are shifted past 255.
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    symbols: dict[int, str] = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + shift)
            shift += 1
    return [symbols[b] for b in range(256)]


def _token_id(tokenizer: CLIPTokenizer, token: str) -> int:
    found = tokenizer.convert_tokens_to_ids(token)
    assert isinstance(found, int)
    return found


def _clip_text_model(tokenizer: CLIPTokenizer, *, with_projection: bool = False) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel

    end = _token_id(tokenizer, "<|endoftext|>")
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=_TEXT_WIDTH,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=_MAX_TOKENS,
        projection_dim=_TEXT_WIDTH,
        bos_token_id=_token_id(tokenizer, "<|startoftext|>"),
        eos_token_id=end,
        pad_token_id=end,
    )
    return CLIPTextModel(config)


def unigram_t5_tokenizer() -> Any:
    from transformers import T5Tokenizer

    # A unigram vocabulary of the special tokens plus single printable characters.
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("▁", -2.0)]
    pieces += [(chr(c), -3.0) for c in range(33, 127)]
    pieces += [(f"▁{chr(c)}", -2.5) for c in range(33, 127)]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def _flux() -> Any:
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import T5Config, T5EncoderModel

    tokenizer = byte_level_clip_tokenizer()
    tokenizer_2 = unigram_t5_tokenizer()
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2),
            d_model=_TEXT_WIDTH,
            d_kv=8,
            d_ff=37,
            num_layers=1,
            num_heads=4,
            pad_token_id=0,
            eos_token_id=1,
        )
    )
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels packed 2x2
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=_TEXT_WIDTH,
        pooled_projection_dim=_TEXT_WIDTH,
        axes_dims_rope=[4, 4, 8],
    )
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_vae(shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=_clip_text_model(tokenizer),
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def _vae(*, shift_factor: float | None = None, scaling_factor: float = 0.18215) -> Any:
    from diffusers import AutoencoderKL

    # Three levels: an 8x downscale, so a 64x64 image is 8x8 latents.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
        shift_factor=shift_factor,
        scaling_factor=scaling_factor,
    )


def _stable_diffusion(*, unet_in_channels: int, edit: bool) -> Any:
    from diffusers import (
        DDIMScheduler,
        EulerAncestralDiscreteScheduler,
        StableDiffusionInstructPix2PixPipeline,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )

    tokenizer = byte_level_clip_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=unet_in_channels,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=_TEXT_WIDTH,
        attention_head_dim=8,
    )
    components: dict[str, Any] = {
        "vae": _vae(),
        "text_encoder": _clip_text_model(tokenizer),
        "tokenizer": tokenizer,
        "unet": unet,
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }
    if edit:
        ancestral = EulerAncestralDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
        )
        return StableDiffusionInstructPix2PixPipeline(scheduler=ancestral, **components)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(scheduler=scheduler, **components)
