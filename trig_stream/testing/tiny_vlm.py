"""A tiny random-weight LLaVA judge, built in code, for tests and the CPU demo.

:func:`build_tiny_vlm` writes a complete model folder (weights, config, processor, chat
template) that loads offline with ``from_pretrained(path, local_files_only=True)``, exactly as
a real judge model does. The model is a CLIP vision tower of two layers under a Llama of two
layers; a forward pass over a 64x64 image and a judging prompt takes a few milliseconds on CPU.

Its tokenizer is a byte-level BPE trained on the fly on the built-in judging texts, so the
prompts are short, with the five rating words added as single tokens: the first answer
token's top logprobs then name ratings whenever ``top_logprobs`` reaches far enough down the
(small) vocabulary, which is what makes a random model's answers scorable. Nothing is
downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from trig_stream.testing.tiny_pipelines import require_packages

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

RATING_WORDS: Final[tuple[str, ...]] = ("excellent", "good", "medium", "bad", "terrible")
IMAGE_TOKEN: Final[str] = "<image>"
IMAGE_SIZE: Final[int] = 32
PATCH_SIZE: Final[int] = 8
_SPECIALS: Final[tuple[str, ...]] = ("<pad>", "<s>", "</s>", IMAGE_TOKEN)
_VOCAB_SIZE: Final[int] = 640

PACKAGES: Final[tuple[str, ...]] = ("torch", "transformers")
"""What building the tiny judge imports (both of the ``diffusers`` extra)."""

CHAT_TEMPLATE: Final[str] = (
    "{% for message in messages %}"
    "{{ message['role'] }}: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
"""Plain ``role: text`` turns; the assistant turn is opened by ``add_generation_prompt``."""


def build_tiny_vlm(path: str | Path, *, seed: int = 0) -> Path:
    """Build a random-weight LLaVA judge and save model and processor to ``path``.

    Args:
        path: the folder to write; created when missing.
        seed: seeds the random weights, so two builds with one seed are identical.

    Returns:
        The folder, ready for ``from_pretrained(path, local_files_only=True)``.

    Raises:
        MissingExtraError: torch or transformers is not installed.
    """
    # Up front, naming the one missing (a missing torch was called transformers).
    require_packages(PACKAGES)
    import torch
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    path = Path(path)
    tokenizer = trained_tokenizer()
    vocab = {token: _token_id(tokenizer, token) for token in _SPECIALS}
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )
    processor_class: Any = LlavaProcessor  # its constructor is not annotated
    processor = processor_class(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's class token, dropped by the "default" strategy
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        pad_token_id=vocab["<pad>"],
        bos_token_id=vocab["<s>"],
        eos_token_id=vocab["</s>"],
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=vocab[IMAGE_TOKEN],
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    model: Any = LlavaForConditionalGeneration(config)
    model.save_pretrained(str(path))
    processor.save_pretrained(str(path))
    return path


def trained_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the built-in judging texts, rating words as single tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from trig_stream.backends.judges.templates import JudgeTemplate

    template = JudgeTemplate.builtin()
    corpus: list[str] = [
        *template.system.values(),
        *template.user_prefix.values(),
        *template.criteria.values(),
    ]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        special_tokens=list(_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer=trainer)
    tokenizer_class: Any = PreTrainedTokenizerFast  # its constructor is not annotated
    tokenizer: PreTrainedTokenizerFast = tokenizer_class(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )
    # Plain (not special) added tokens: they decode as themselves and are never stripped.
    tokenizer.add_tokens(list(RATING_WORDS))
    return tokenizer


def _token_id(tokenizer: PreTrainedTokenizerFast, token: str) -> int:
    found = tokenizer.convert_tokens_to_ids(token)
    assert isinstance(found, int)
    return found


def tiny_vlm_options(path: Path, **overrides: Any) -> dict[str, Any]:
    """``options`` of a ``transformers`` judge on a tiny VLM, reaching every token.

    With ``top_logprobs`` as large as the vocabulary, every rating word is among the top
    tokens, so each answer is scorable.
    """
    return {"model_path": str(path), "top_logprobs": _VOCAB_SIZE + 16, **overrides}
