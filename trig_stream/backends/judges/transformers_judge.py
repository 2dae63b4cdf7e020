"""The ``transformers`` judge: TRIGScore from a vision-language model loaded in-process.

No server and no generate loop: the judging messages (the same texts as the ``openai`` judge,
see :mod:`trig_stream.backends.judges.templates`) go through the model's chat template with
the assistant turn opened, and one forward pass gives the logits of the last prompt position,
which are the distribution of the first answer token. Its ``top_logprobs`` most likely tokens
become the reply's ``(token, logprob)`` pairs, and the engine scores them as it scores an
endpoint's.

Concurrent requests are gathered into micro-batches (:mod:`.batching`) of up to
``batch_size``, padded on the left so the last position of every row is its prompt's end,
and run one batch at a time in a worker thread. ``concurrency`` in ``[[judges]]`` bounds how
many requests wait; about twice ``batch_size`` keeps the next batch full while one runs.

A request longer than the model's context (see :func:`context_length`) is never run: it is an
``error`` judgement of its own that names both lengths, and the rest of its batch is judged
without it. Run, it would read past the positions the model knows, and padded into a batch it
would stretch every row to its length: one 50k-token prompt grew a run to 23 GB, which the
kernel killed, again on every resume.

Example config::

    [[judges]]
    backend = "transformers"
    concurrency = 16
    options = { model_path = "models/Qwen2-VL-2B-Instruct", device = "cuda:0", batch_size = 8 }
"""

from __future__ import annotations

import fnmatch
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal

from pydantic import BaseModel, Field

from trig_stream.backends.base import Judge, JudgeReply, JudgeRequest, PreparedImage
from trig_stream.backends.judges.batching import MicroBatcher
from trig_stream.backends.judges.http_errors import REFUSALS_TO_STOP
from trig_stream.backends.judges.templates import JudgeTemplate
from trig_stream.backends.metrics.base import load_rgb_image
from trig_stream.backends.threads import load_in_thread
from trig_stream.backends.tiny_model_names import build_hint
from trig_stream.config_fields import OPTIONS_CONFIG, DeviceName
from trig_stream.errors import (
    FatalBackendError,
    ItemError,
    MissingExtraError,
    RetryableError,
    require_installed,
)
from trig_stream.pipeline import describe_error
from trig_stream.records import JudgeFingerprint
from trig_stream.scoring import SCORING_RULES, Scorer

if TYPE_CHECKING:
    from PIL.Image import Image


DType = Literal["auto", "float32", "float16", "bfloat16"]

_NO_LIMIT: Final = 10**12
"""A declared length from here up means "no limit" (transformers writes 1e30)."""


class TransformersJudgeOptions(BaseModel):
    """``options`` of the ``transformers`` judge."""

    model_config = OPTIONS_CONFIG

    model_path: Path
    """A local model folder (weights, config, processor, chat template)."""
    device: DeviceName = "cpu"
    """Where the model runs: ``cpu``, ``cuda``, ``cuda:N`` or ``mps``."""
    dtype: DType = "auto"
    """Weight type; ``auto`` is float32 on CPU and bfloat16 (float16 without it) elsewhere."""
    batch_size: Annotated[int, Field(ge=1, le=256)] = 8
    """The most requests in one forward pass; a batch never waits to fill up."""
    top_logprobs: Annotated[int, Field(ge=1, le=1_000_000)] = 20
    """How many of the first token's most likely tokens to keep (capped at the vocabulary)."""
    max_pixels: Annotated[int, Field(ge=64)] | None = None
    """Shrink larger images to this many pixels (keeping their shape) before processing."""
    template: Path | None = None
    """A TOML or JSON file replacing some or all of the built-in judging texts."""
    local_files_only: bool = True
    """Never reach a model hub: the folder must hold everything."""
    max_context: Annotated[int, Field(ge=1)] | None = None
    """The most tokens one request may hold, instead of what the model declares (see
    :func:`context_length`): for a model run past its declared length (rope scaling), or a
    lower limit to bound the memory of one request."""


@dataclass(frozen=True, slots=True)
class _Query:
    request: JudgeRequest
    image: Image


class TransformersJudge(Judge):
    """A VLM judge run in-process through transformers, batched on one device.

    Args:
        name: the metric's name in the run.
        options: the backend's options.
        concurrency: the most requests in flight (waiting or in a batch).
        scorer: ``"trig"`` or ``"robust"``.
        confidence: weight scores by the top rating's probability.
    """

    Options = TransformersJudgeOptions
    options: TransformersJudgeOptions

    def __init__(
        self,
        name: str,
        options: TransformersJudgeOptions,
        *,
        concurrency: int = 16,
        scorer: Scorer = "robust",
        confidence: bool = False,
    ) -> None:
        super().__init__(
            name, options, concurrency=concurrency, scorer=scorer, confidence=confidence
        )
        self.template = JudgeTemplate.chosen(options.template)
        self._model: Any = None
        self._processor: Any = None
        self._torch: Any = None
        self._token_texts: dict[int, str] = {}
        self._context: int | None = None
        self._system_role = True
        self._judged = False  # whether a forward pass has given replies
        self._over_context_before_judged = 0
        self._own_tokens: tuple[str, ...] = ()  # set at load: see _defused
        self._batcher: MicroBatcher[_Query, JudgeReply] | None = None

    def __repr__(self) -> str:
        return f"TransformersJudge(name={self.name!r}, model_path={str(self.options.model_path)!r})"

    @property
    def batcher(self) -> MicroBatcher[_Query, JudgeReply] | None:
        """The micro-batcher while the judge is open (its counters show the batch sizes)."""
        return self._batcher

    def fingerprint(self) -> JudgeFingerprint:
        opts = self.options
        return JudgeFingerprint(
            backend="transformers",
            model=str(opts.model_path),
            template_version=self.template.version,
            scorer=self.scorer,
            confidence=self.confidence,
            params={
                "scoring_rules": SCORING_RULES,
                "top_logprobs": opts.top_logprobs,
                "max_pixels": opts.max_pixels,
                "dtype": dtype_on(opts.dtype, opts.device),
                "config_sha256": _config_hash(opts.model_path),
            },
        )

    # -- lifetime -----------------------------------------------------------------------------

    def check_environment(self) -> None:
        """torch and transformers are installed, and ``model_path`` is a folder (the device is
        checked at load: it takes torch's device probing).

        Raises:
            MissingExtraError: torch or transformers is not installed.
            FatalBackendError: ``model_path`` holds no model to load.
        """
        # Not imported here (seconds): validate said ok, and run found them missing.
        require_installed(("torch", "transformers"), "diffusers")
        model_path = self.options.model_path
        if not model_path.is_dir():
            there = model_path.exists()
            raise FatalBackendError(
                f"judge {self.name!r}: model_path {model_path} "
                f"{'is not a folder' if there else 'does not exist'}; set options.model_path to "
                "a local copy of the model (its config.json, weights and processor files)"
                f"{'' if there else build_hint(model_path)}"
            )
        missing = _missing_model_files(self.options.model_path)
        if missing:
            raise FatalBackendError(
                f"judge {self.name!r}: model_path {self.options.model_path} holds no model to "
                f"load: it lacks {'; '.join(missing)}. Point model_path at the folder a "
                "download of the model made (huggingface-cli download <model> --local-dir DIR)"
            )

    def opening(self) -> str:
        return f"loading {self.options.model_path} onto {self.options.device}"

    def opens_slowly(self) -> bool:
        return True

    async def open(self) -> None:
        """Load the model and its processor in a worker thread.

        Raises:
            MissingExtraError: torch or transformers is not installed.
            FatalBackendError: the device is unavailable or the model cannot be loaded.
        """
        try:
            import torch
            import transformers
        except ImportError as exc:
            # The one that failed: a missing torch was called transformers.
            missing = (exc.name or "transformers").partition(".")[0]
            raise MissingExtraError(missing, "diffusers") from exc
        self._torch = torch
        # A hard stop does not wait for the load (minutes, for a 7B model).
        await load_in_thread(
            lambda: self._load(torch, transformers),
            self._unload,
            backend=f"judge {self.name!r}",
            instance=self,
        )
        self._batcher = MicroBatcher(
            self._run_batch,
            batch_size=self.options.batch_size,
            buffer=self.concurrency,
            backend=f"judge {self.name!r}",
            instance=self,
        )

    def _load(self, torch: Any, transformers: Any) -> None:
        opts = self.options
        unavailable = _unavailable_device(torch, opts.device)
        if unavailable is not None:
            raise FatalBackendError(f"judge {self.name!r}: {unavailable}")
        dtype = _torch_dtype(torch, opts.dtype, opts.device)
        path = str(opts.model_path)
        self.check_environment()
        try:
            processor = transformers.AutoProcessor.from_pretrained(
                path, local_files_only=opts.local_files_only
            )
            model = transformers.AutoModelForImageTextToText.from_pretrained(
                path, dtype=dtype, local_files_only=opts.local_files_only
            )
        except Exception as exc:
            raise FatalBackendError(
                f"judge {self.name!r}: cannot load the model in {path}: {describe_error(exc)}"
            ) from None
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is None or getattr(processor, "chat_template", None) is None:
            raise FatalBackendError(
                f"judge {self.name!r}: the processor in {path} has no tokenizer or chat template"
            )
        # Left padding puts every prompt's last token at the last position, so one position
        # of logits per row is enough (a real vocabulary is 150k wide).
        tokenizer.padding_side = "left"
        _ensure_pad_token(tokenizer, f"judge {self.name!r}", path)
        self._processor = processor
        self._own_tokens = _own_tokens(processor, tokenizer)
        self._system_role = _takes_system_turn(processor, f"judge {self.name!r}", path)
        self._context = opts.max_context or context_length(model.config, tokenizer)
        self._model = model.to(opts.device).eval()

    def stop_waiting(self) -> None:
        """A graceful stop: the batch running finishes, the requests queued raise
        :class:`~trig_stream.errors.NotAsked` (asked on resume)."""
        if self._batcher is not None:
            self._batcher.stop_waiting()

    def _unload(self) -> None:
        self._model = self._processor = None

    async def aclose(self) -> None:
        batcher, self._batcher = self._batcher, None
        if batcher is not None:
            # After a batch a hard stop left running, in its thread, not under it.
            await batcher.aclose(self._unload)
        else:
            self._unload()

    # -- requests -----------------------------------------------------------------------------

    def prepare(self, path: Path) -> PreparedImage:
        """Decode the image once for its dimension requests (a worker thread).

        Raises:
            ItemError: the file cannot be read or is not an image.
        """
        return PreparedImage(path=path, payload=load_rgb_image(path, self.options.max_pixels))

    async def judge(self, request: JudgeRequest) -> JudgeReply:
        if self._batcher is None:
            raise RuntimeError("the judge is not open: call open() first")
        from PIL.Image import Image

        image = request.image.payload
        if not isinstance(image, Image):
            raise ItemError(f"image {request.image.path} was not prepared by this judge")
        return await self._batcher.submit(_Query(request, image))

    def messages(self, request: JudgeRequest) -> list[dict[str, Any]]:
        """The chat messages of one (image, dimension) question."""
        sample = request.sample
        system = self._defused(
            self.template.system_text(sample.task, request.dimension, sample.item)
        )
        user = self._defused(
            self.template.user_text(sample.task, request.dimension, sample.prompt, sample.item)
        )
        if not self._system_role:
            user = f"{system}\n\n{user}"
        content = [{"type": "image"}, {"type": "text", "text": user}]
        messages: list[dict[str, Any]] = [{"role": "user", "content": content}]
        if self._system_role:
            messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
        return messages

    def _defused(self, text: str) -> str:
        """``text`` with each of the model's own tokens in it (``<image>``, ``<|im_end|>``)
        broken by a word joiner, so that a prompt that spells one is read as text: the
        processor took a prompt's ``<image>`` for a second image, and refused the request."""
        for token in self._own_tokens:
            if token in text:
                text = text.replace(token, token[0] + WORD_JOINER + token[1:])
        return text

    def _prompt(self, request: JudgeRequest) -> str:
        render = self._processor.apply_chat_template
        return str(render(self.messages(request), add_generation_prompt=True, tokenize=False))

    # -- the batch, in a worker thread ----------------------------------------------------------

    def _run_batch(self, queries: Sequence[_Query]) -> list[JudgeReply | Exception]:
        try:
            inputs = self._encode(queries)
            too_long = self._over_context(inputs)
            if not any(too_long):
                return list(self._forward(inputs))
        except Exception as exc:
            if len(queries) == 1:
                return [self._classify(exc)]
            # One bad item must not fail the others: run them one by one.
            return [reply for query in queries for reply in self._run_batch([query])]
        # The others are encoded again without the requests over the context, whose padding
        # would otherwise stretch every row of the batch to their length.
        fitting = [query for query, error in zip(queries, too_long, strict=True) if not error]
        judged = iter(self._run_batch(fitting) if fitting else [])
        # Counted once the fitting rows have run: when one of them was judged, the rows over
        # the context are the prompts' fault, not the config's.
        return [self._refused(error) if error else next(judged) for error in too_long]

    def _encode(self, queries: Sequence[_Query]) -> Any:
        """The batch's model inputs, on the CPU: token ids with image tokens, padded; pixels."""
        return self._processor(
            text=[self._prompt(query.request) for query in queries],
            images=[query.image for query in queries],
            return_tensors="pt",
            padding=True,
        )

    @property
    def _context_name(self) -> str:
        if self.options.max_context is not None:
            return "the judge's max_context"
        return "the judge model's context"

    def _over_context(self, inputs: Any) -> list[ItemError | None]:
        """Each encoded request's error when it is longer than the model's context."""
        ids = inputs["input_ids"]
        if self._context is None:
            return [None] * len(ids)
        mask = inputs.get("attention_mask")
        # The mask counts each row's own tokens under the padding; without one, every row is
        # as long as the batch (exact for a batch of one, which is where a flagged row ends up).
        lengths = mask.sum(dim=-1).tolist() if mask is not None else [ids.shape[-1]] * len(ids)
        return [
            None
            if length <= self._context
            else ItemError(
                f"judge {self.name!r}: the request is {length:,} tokens, over {self._context_name} "
                f"of {self._context:,} (prompt, judging text and image together); "
                "it was not run"
            )
            for length in lengths
        ]

    def _refused(self, error: ItemError) -> ItemError | FatalBackendError:
        """A request's error for being over the context, once its batch-mates have run.

        Until a request is judged, that many over the context may be the config's fault (a
        ``max_context`` of 1, images too large for the model) rather than the prompts': from
        the :data:`~trig_stream.backends.judges.http_errors.REFUSALS_TO_STOP`-th on, as the
        ``openai`` judge does with refusals, the error is a :class:`FatalBackendError` that
        stops the run instead of refusing every request of it.
        """
        if self._judged:
            return error
        self._over_context_before_judged += 1
        if self._over_context_before_judged < REFUSALS_TO_STOP:
            return error
        return self._none_fits(error)

    def _none_fits(self, error: ItemError) -> FatalBackendError:
        if self.options.max_context is not None:
            fix = "raise max_context, or lower max_pixels"
        else:
            fix = (
                "lower max_pixels, or set max_context for a model run past its declared "
                "length (rope scaling)"
            )
        return FatalBackendError(
            f"{error}; the first {self._over_context_before_judged} requests were all over "
            f"{self._context_name} of {self._context:,} and none was judged: {fix}; the "
            "refused ones are kept as errors: resume with --retry-errors to ask again",
            request_error=error,
        )

    def _forward(self, inputs: Any) -> list[JudgeReply]:
        torch = self._torch
        model = self._model
        inputs = inputs.to(self.options.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        with torch.inference_mode():
            logits = model(**inputs, logits_to_keep=1).logits[:, -1, :]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        k = min(self.options.top_logprobs, logprobs.shape[-1])
        values, ids = logprobs.topk(k, dim=-1)
        replies = []
        for row_values, row_ids in zip(values.tolist(), ids.tolist(), strict=True):
            top = [
                (self._token_text(token_id), float(value))
                for token_id, value in zip(row_ids, row_values, strict=True)
            ]
            replies.append(JudgeReply(top_logprobs=top, text=top[0][0]))
        self._judged = True
        return replies

    def _token_text(self, token_id: int) -> str:
        # Decoded one token at a time, as OpenAI-compatible servers report tokens.
        text = self._token_texts.get(token_id)
        if text is None:
            text = str(self._processor.tokenizer.decode([token_id]))
            self._token_texts[token_id] = text
        return text

    def _classify(self, exc: Exception) -> Exception:
        if isinstance(exc, self._torch.OutOfMemoryError):
            return RetryableError(f"judge {self.name!r}: out of memory on {self.options.device}")
        if isinstance(exc, ItemError):
            return exc
        return ItemError(f"judge {self.name!r}: {describe_error(exc)}")


def _ensure_pad_token(tokenizer: Any, judge: str, path: str) -> None:
    """Give ``tokenizer`` a pad token if its files name none (many causal models' do not):
    its end-of-sequence token, else its unknown token. Which token pads changes no score:
    padding is on the left and masked out.

    Without one every batch failed, each judgement an error ("Asking to pad but the
    tokenizer does not have a padding token"), and the run ended ``done``.

    Raises:
        FatalBackendError: the tokenizer has none of the three.
    """
    if tokenizer.pad_token is not None:
        return
    stand_in = tokenizer.eos_token or tokenizer.unk_token
    if stand_in is None:
        raise FatalBackendError(
            f"{judge}: the tokenizer in {path} has no pad_token, nor an eos_token or "
            "unk_token to pad batches with; set pad_token in its tokenizer_config.json "
            '(any token of its vocabulary: padding is masked out), e.g. "pad_token": "</s>"'
        )
    tokenizer.pad_token = stand_in


_PROBE_SYSTEM: Final = "You rate images."
_PROBE_USER: Final = "How good is this image?"


def _takes_system_turn(processor: Any, judge: str, path: str) -> bool:
    """Whether the processor's chat template takes a system turn, tried once on a fixed
    conversation: some refuse one, and the system text then opens the user turn. Decided at
    load for the whole run, so that a request whose own text the template refuses is that
    request's error, not a switch of every later prompt (and score) under one fingerprint.

    Raises:
        FatalBackendError: the template refuses the conversation without a system turn too.
    """
    render = processor.apply_chat_template
    system = {"role": "system", "content": [{"type": "text", "text": _PROBE_SYSTEM}]}
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": _PROBE_USER}]}
    try:
        render([system, user], add_generation_prompt=True, tokenize=False)
        return True
    except Exception:
        pass  # tried again as messages() folds it
    folded = f"{_PROBE_SYSTEM}\n\n{_PROBE_USER}"
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": folded}]}
    try:
        render([user], add_generation_prompt=True, tokenize=False)
    except Exception as exc:
        raise FatalBackendError(
            f"{judge}: the chat template in {path} refuses a plain conversation (an image and "
            f"a question, with or without a system turn): {describe_error(exc)}"
        ) from None
    return False


def context_length(config: Any, tokenizer: Any) -> int | None:
    """The most tokens one request may hold on a model, or ``None`` when it does not say.

    The text model's ``max_position_embeddings`` (``text_config``'s for a LLaVA, the
    config's own for a Qwen2-VL saved flat): the positions the model was built and trained
    for, a hard limit for learned position embeddings and the edge of what rotary ones were
    trained on. Failing that, the tokenizer's ``model_max_length``, unless it is
    transformers' stand-in for "no limit" (1e30, what most VLM tokenizers, LLaVA's among them,
    declare). The tokenizer's value does not override the config's: it may be a fine-tuning
    setting rather than the model's limit.

    Args:
        config: the model's config (``model.config``).
        tokenizer: the processor's tokenizer.
    """
    get_text_config = getattr(config, "get_text_config", None)
    text_config = get_text_config() if callable(get_text_config) else config
    for limit in (
        getattr(text_config, "max_position_embeddings", None),
        getattr(config, "max_position_embeddings", None),
        getattr(tokenizer, "model_max_length", None),
    ):
        if isinstance(limit, int) and 0 < limit < _NO_LIMIT:
            return limit
    return None


def _unavailable_device(torch: Any, device: str) -> str | None:
    """Why ``device`` cannot be used, or ``None`` when it can."""
    if device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if index >= count:
            return (
                f"device {device} is not available (no such CUDA device: torch "
                f"{torch.__version__} sees {count}); set options.device to one that exists, "
                'e.g. device = "cpu"'
            )
    elif device.startswith("mps") and not torch.backends.mps.is_available():
        return f'device {device} is not available; set options.device, e.g. device = "cpu"'
    return None


WORD_JOINER = "\u2060"
"""An invisible character that breaks a model token spelled in a text (see ``_defused``)."""


def _own_tokens(processor: Any, tokenizer: Any) -> tuple[str, ...]:
    """The texts the processor or tokenizer reads as control tokens of their own, wherever they
    stand in a text: the image token and the special tokens (not the added words a model's
    vocabulary may hold). Longest first, so that one holding another is broken whole."""
    found = {getattr(processor, "image_token", None), *tokenizer.all_special_tokens}
    found |= {added.content for added in tokenizer.added_tokens_decoder.values() if added.special}
    return tuple(
        sorted(
            (t for t in found if isinstance(t, str) and len(t.strip()) > 1), key=len, reverse=True
        )
    )


def dtype_on(dtype: str, device: str) -> str:
    """The weights' dtype that ``dtype`` means on ``device``, as far as it is known without
    torch, for the fingerprint: ``auto`` is float32 on the CPU, and on an accelerator the
    half precision it supports (``auto on cuda``: bfloat16, else float16)."""
    if dtype != "auto":
        return dtype
    kind = device.partition(":")[0]
    return "float32" if kind == "cpu" else f"auto on {kind}"


def _torch_dtype(torch: Any, dtype: DType, device: str) -> Any:
    if dtype != "auto":
        return getattr(torch, dtype)
    if device == "cpu":
        return torch.float32
    if device.startswith("cuda") and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def _config_hash(model_path: Path) -> str:
    """A short hash of the model's ``config.json`` ("" when it cannot be read)."""
    try:
        return hashlib.sha256((model_path / "config.json").read_bytes()).hexdigest()[:16]
    except OSError:
        return ""


MODEL_FILES: Final[tuple[tuple[str, tuple[str, ...]], ...]] = (
    ("its config (config.json)", ("config.json",)),
    (
        "its weights (*.safetensors, pytorch_model*.bin, or their *.index.json)",
        ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json", "*.bin.index.json"),
    ),
    (
        "its processor or tokenizer (processor_config.json, preprocessor_config.json, "
        "tokenizer_config.json or tokenizer.json)",
        (
            "processor_config.json",
            "preprocessor_config.json",
            "tokenizer_config.json",
            "tokenizer.json",
        ),
    ),
)
"""What a model folder must hold for ``from_pretrained`` to load it: each part, in words,
and the file names (patterns) any one of which holds it."""


def _missing_model_files(folder: Path) -> list[str]:
    """The parts of :data:`MODEL_FILES` that ``folder`` lacks, in words (a folder that cannot
    be listed lacks them all: the load could not read it either)."""
    try:
        names = [entry.name for entry in folder.iterdir()]
    except OSError:
        names = []
    return [
        what
        for what, patterns in MODEL_FILES
        if not any(fnmatch.fnmatch(name, pattern) for name in names for pattern in patterns)
    ]
