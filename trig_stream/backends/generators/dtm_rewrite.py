"""The ``dtm_rewrite`` generator: rewrite each prompt with an LLM, guided by the DTM, then
generate with another generator (upstream's ``*_dtm_dim`` models).

Each sample stresses one dimension pair; the pair's relation code in a DTM (from the config,
or from an earlier run's ``relationship_codes.csv``) picks the rewriting guidance (see
:mod:`trig_stream.backends.generators.dtm_relations`). The rewrite goes through an
OpenAI-protocol chat completion; when it fails, the original prompt is used and the outcome
says so (what an answer holds, a rewrite or a refusal, is read by
:mod:`trig_stream.backends.generators.rewrite_answers`). Outcomes are kept per data_id in
:attr:`DTMRewriteGenerator.rewrites`.

Example::

    [[generators]]
    name = "flux_dtm"
    backend = "dtm_rewrite"
    batch_size = 4
    [generators.options]
    model = "Qwen/Qwen2.5-7B-Instruct"
    base_url = "http://localhost:8000/v1"
    report = "runs/flux/report/flux/relationship_codes.csv"
    inner = { backend = "diffusers", options = { preset = "flux", devices = ["cuda:0"] } }
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from trig_stream.backends.api_keys import SHORT_KEY_CHARS, note_key_variable
from trig_stream.backends.base import (
    EncodedPicture,
    GenerationRequest,
    Generator,
    TimedPicture,
    checked_notes,
    tell_all_requested,
)
from trig_stream.backends.generators.api_calls import (
    Sleep,
    api_key_from_env,
    call_with_retries,
    openai_client,
    redact,
    unless_an_error,
    wait_on_cancel,
)
from trig_stream.backends.generators.dtm_relations import (
    INSTRUCTIONS_VERSION,
    RELATION_CODES,
    RelationTable,
    instruction,
    system_message,
    user_message,
)
from trig_stream.backends.generators.rewrite_answers import RefusedContent, rewritten_prompt
from trig_stream.backends.judges.http_errors import REFUSALS_TO_STOP
from trig_stream.config_fields import (
    OPTIONS_CONFIG,
    Backoff,
    CallTimeout,
    EnvVarName,
    HttpUrl,
    ServedModel,
)
from trig_stream.config_problems import nested_problems
from trig_stream.dimensions import split_pair
from trig_stream.errors import (
    BackendError,
    ConfigError,
    FatalBackendError,
    ItemError,
    NotAsked,
    NotFoundError,
    UnreachableError,
)
from trig_stream.pipeline import describe_error
from trig_stream.records import PromptRewrite, storable_text
from trig_stream.retry import RetryPolicy

if TYPE_CHECKING:
    from PIL.Image import Image

    from trig_stream.config import GeneratorConfig, RunConfig

logger = logging.getLogger(__name__)


class InnerGenerator(BaseModel):
    """``options.inner``: the generator that draws the rewritten prompts."""

    model_config = OPTIONS_CONFIG

    backend: str
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _valid_inner_options(self) -> InnerGenerator:
        from trig_stream.backends.registry import backend_class, validate_backend_options

        try:
            validate_backend_options("generators", self.backend, self.options)
        except ValidationError as exc:
            problems = nested_problems(exc, backend_class("generators", self.backend).Options)
            raise ValueError(f"inner {self.backend} options: {problems}") from None
        return self


def _dimension_pair(pair: str) -> str:
    split_pair(pair)  # raises ValueError naming what is wrong with the key
    return pair


def _relation_code(code: int) -> int:
    if code not in RELATION_CODES:
        raise ValueError(
            f"relation code {code} is not one of -2..3 (0 synergy, 1 trade-off, 2 / -2 "
            "dominance, 3 bottleneck, -1 undefined)"
        )
    return code


class DTMRewriteOptions(BaseModel):
    """``options`` of the ``dtm_rewrite`` generator. Give ``relations``, ``report`` or both
    (``relations`` win for the pairs they name)."""

    model_config = OPTIONS_CONFIG

    inner: InnerGenerator
    model: ServedModel
    """The rewriting LLM's model name on the server."""
    base_url: HttpUrl | None = None
    api_key_env: EnvVarName | None = "OPENAI_API_KEY"
    """The NAME of the environment variable holding the key; None for servers without keys."""
    relations: dict[
        Annotated[str, AfterValidator(_dimension_pair)],
        Annotated[int, AfterValidator(_relation_code)],
    ] = Field(default_factory=dict)
    """``{"IQ-R_TA-C" = 1, ...}``: relation codes by pair. Each key and code is checked where
    it is written, so that an error names its own key and line beside the other options'."""
    report: Path | None = None
    """An earlier run's ``relationship_codes.csv``."""
    temperature: Annotated[float, Field(ge=0, le=2)] = 0.0
    max_tokens: Annotated[int, Field(ge=16)] = 256
    timeout_s: CallTimeout = 60.0
    """Seconds one call may take in all, connecting and reading the whole answer included
    (``api_calls.openai_client``)."""
    max_attempts: Annotated[int, Field(ge=1, le=10)] = 3
    backoff_initial: Backoff = 1.0
    backoff_max: Backoff = 10.0

    @field_validator("relations")
    @classmethod
    def _one_relation_per_pair(cls, relations: dict[str, int]) -> dict[str, int]:
        RelationTable.from_mapping(relations)  # a pair named in both orders, differently
        return relations

    @model_validator(mode="after")
    def _some_relations(self) -> DTMRewriteOptions:
        if not self.relations and self.report is None:
            raise ValueError("give relations (pair -> code) or report (relationship_codes.csv)")
        return self


@dataclass(frozen=True, slots=True)
class RewriteOutcome:
    """What happened to one sample's prompt.

    Attributes:
        status: ``rewritten``, or ``fallback`` when the original prompt was used.
        relation: the pair's relation code, in the sample's dimension order.
        error: why the rewrite failed (``fallback`` only).
        unreached: the rewrite failed without an answer from the LLM (no connection,
            timeouts).
    """

    data_id: str
    pair: str
    relation: int
    original: str
    prompt: str
    status: Literal["rewritten", "fallback"]
    error: str | None = None
    unreached: bool = False


class DTMRewriteGenerator(Generator):
    """Rewrites prompts by their pair's DTM relation, then delegates to an inner generator.

    Attributes:
        inner: the generator that makes the images.
        relations: the relation table in use.
        rewrites: per data_id, the latest :class:`RewriteOutcome`.
    """

    Options = DTMRewriteOptions

    def __init__(
        self,
        name: str,
        options: DTMRewriteOptions,
        inner: Generator,
        *,
        sleep: Sleep = wait_on_cancel,
    ) -> None:
        """Wrap ``inner``, checked as a config's inner entry is.

        Raises:
            ConfigError: ``inner`` is an image folder or another dtm_rewrite.
        """
        _check_inner(name, inner)
        self.name = name
        self.options = options
        note_key_variable(options.api_key_env)  # a judge's server started first inherits it
        self.inner = inner
        self.wrapped = inner  # all_requested only passes the call on
        self.workers = inner.workers
        self.batch_size = inner.batch_size
        self.reads_source_image = inner.reads_source_image  # the sample goes on to it
        self.relations = _relation_table(options)
        self.policy = RetryPolicy(
            options.max_attempts, options.backoff_initial, options.backoff_max
        )
        self.rewrites: dict[str, RewriteOutcome] = {}
        self._sleep = sleep
        self._lock = threading.Lock()
        self._answered = threading.Event()
        """Set once a call to the LLM has succeeded (see ``call_with_retries``)."""
        self._stopping = threading.Event()
        """Set by :meth:`stop_waiting`: a wait for a retry ends, the prompt not rewritten."""
        self._rewrote = False
        """Whether a prompt has been rewritten: the LLM and its options work."""
        self._failed = 0
        """Rewrites that failed (refusals of a prompt's content aside) before any prompt was
        rewritten."""
        self._client: Any = None
        self._key = ""

    @classmethod
    def from_config(
        cls, entry: GeneratorConfig, options: DTMRewriteOptions, config: RunConfig
    ) -> DTMRewriteGenerator:
        """Build the wrapper and its inner generator (which inherits workers and batch_size).

        Raises:
            ConfigError: the relation report cannot be read, or the inner generator is an
                image folder or another dtm_rewrite.
        """
        from trig_stream.backends.registry import build_generator
        from trig_stream.config import GeneratorConfig

        inherited = {k: getattr(entry, k) for k in ("workers", "batch_size")}
        inner_entry = GeneratorConfig.model_validate(
            {
                "name": entry.name,
                "backend": options.inner.backend,
                "options": options.inner.options,
                **{k: v for k, v in inherited.items() if k in entry.model_fields_set},
            }
        )
        try:
            inner = build_generator(inner_entry, config)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"generator {entry.name!r}: {exc}") from None
        _check_inner(entry.name, inner, f"inner backend {options.inner.backend!r}")
        try:
            return cls(entry.name, options, inner)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"generator {entry.name!r}: {exc}") from None

    def __repr__(self) -> str:
        return f"DTMRewriteGenerator(name={self.name!r}, inner={self.inner!r})"

    def fingerprint(self) -> dict[str, Any]:
        o = self.options
        return {
            "backend": "dtm_rewrite",
            "inner": self.inner.fingerprint(),
            "llm": o.model,
            "temperature": o.temperature,
            "max_tokens": o.max_tokens,
            "instructions_version": INSTRUCTIONS_VERSION,
            "relations": self.relations.as_dict(),
        }

    def fingerprint_defaults(self) -> dict[str, Any]:
        # Nested as the fingerprint holds the inner one's: a diffusers call argument left out
        # and one set to the pipeline's default resume as one, wrapped or not.
        return {"inner": self.inner.fingerprint_defaults()}

    def check_environment(self) -> None:
        if self.options.api_key_env is not None:
            api_key_from_env(self.options.api_key_env, owner=f"generator {self.name!r}")
        self.inner.check_environment()

    def load(self) -> None:
        """Open the LLM client, then load the inner generator.

        Raises:
            FatalBackendError: the key's environment variable is not set.
        """
        o = self.options
        if o.api_key_env is not None:
            self._key = api_key_from_env(o.api_key_env, owner=f"generator {self.name!r}")
        self._client = openai_client(o.base_url, self._key, o.timeout_s)
        self._stopping.clear()  # an earlier run's stop
        self.inner.load()

    def stop_loading(self) -> None:
        self.inner.stop_loading()

    def stop_waiting(self) -> None:
        self._stopping.set()
        self.inner.stop_waiting()

    def all_requested(self, passed_over: AbstractSet[str] = frozenset()) -> None:
        tell_all_requested(self.inner, passed_over)

    def generate(
        self, requests: Sequence[GenerationRequest], *, worker: int, cancel: threading.Event
    ) -> Sequence[Image | EncodedPicture | TimedPicture | Exception]:
        outcomes: list[RewriteOutcome] = []
        for request in requests:
            if self._stopping.is_set() and not cancel.is_set():
                # Nothing is asked after a graceful stop (each rewrite may take up to
                # timeout_s): none of the batch is drawn, and its samples are owed to the resume.
                return [
                    NotAsked("the run stopped before the prompt was rewritten") for _ in requests
                ]
            try:
                outcome = None if cancel.is_set() else self.rewrite(request, cancel)
            except NotAsked as exc:  # a graceful stop ended its wait: none of them is drawn
                return [exc for _ in requests]
            if outcome is None:
                # A hard stop: nothing of the batch is drawn, and its samples are asked again
                # on resume, so none of its rewrites is kept or counted at the run's end.
                return [ItemError("cancelled") for _ in requests]
            outcomes.append(outcome)
        rewritten: list[GenerationRequest] = []
        for request, outcome in zip(requests, outcomes, strict=True):
            with self._lock:
                self.rewrites[request.sample.data_id] = outcome
            sample = request.sample.model_copy(update={"prompt": outcome.prompt})
            rewritten.append(GenerationRequest(request.model, sample, request.seed))
        try:
            pictures = self.inner.generate(rewritten, worker=worker, cancel=cancel)
        except Exception:
            if cancel.is_set():  # the hard stop cut the whole batch's drawing
                self._drop_rewrites(requests)
            raise
        if isinstance(pictures, Sequence) and len(pictures) == len(requests):  # else broken
            # The stop cut the drawing of these.
            self._drop_rewrites(
                request
                for request, picture in zip(requests, pictures, strict=True)
                if isinstance(picture, NotAsked)
                or (isinstance(picture, Exception) and cancel.is_set())
            )
        return pictures

    def _drop_rewrites(self, requests: Iterable[GenerationRequest]) -> None:
        # Those of images a stop cut: their samples are asked again on resume, as above.
        with self._lock:
            for request in requests:
                del self.rewrites[request.sample.data_id]

    def prompt_rewrite(self, data_id: str) -> PromptRewrite | None:
        with self._lock:
            outcome = self.rewrites.get(data_id)
        if outcome is None:
            return None
        return PromptRewrite(
            status=outcome.status,
            relation=outcome.relation,
            prompt=outcome.prompt,
            error=outcome.error,
        )

    def rewrite(self, request: GenerationRequest, cancel: threading.Event) -> RewriteOutcome | None:
        """Rewrite one request's prompt; on failure keep the original and say why. None when
        it failed as the run was cancelled (a hard stop): no failure of the LLM's.

        Raises:
            FatalBackendError: the LLM server refused the credentials, answered a 404 or could
                not be reached before any success, or :data:`REFUSALS_TO_STOP` rewrites failed
                before any prompt was rewritten.
            NotAsked: a stop ended the wait for a retry (see :meth:`stop_waiting`).
        """
        sample = request.sample
        first, second = sample.dimensions
        code = self.relations.code(first, second)
        messages = [
            {"role": "system", "content": system_message(sample.task)},
            {"role": "user", "content": user_message(sample.prompt, first, second, code)},
        ]
        o = self.options
        counts = True  # towards stopping the run: a refusal of the prompt's content does not
        api = f"the rewriting LLM of generator {self.name!r}"
        try:
            try:
                response = call_with_retries(
                    lambda: unless_an_error(
                        self._client.chat.completions.create(
                            model=o.model,
                            messages=messages,
                            temperature=o.temperature,
                            max_tokens=o.max_tokens,
                        ),
                        "choices",
                        secret=self._key,
                        api=api,
                    ),
                    policy=self.policy,
                    cancel=cancel,
                    secret=self._key,
                    sleep=self._sleep,
                    stop=self._stopping,
                    answered=self._answered,
                    api=api,
                    # Every rewrite would fall back alike: the run would draw each image from
                    # its original prompt and end as if it had gone well.
                    unanswered_is_fatal=True,
                )
            except ItemError as exc:
                # Only a refusal of the prompt's content, or the run's cancel, ends a call so.
                counts = isinstance(exc, NotFoundError)
                raise
            try:
                text = self._rewrite_in(response.choices[0], instruction(first, second, code))
            except RefusedContent:
                # The LLM answered, and declined this prompt's content (TRIG's toxicity
                # prompts provoke it by design): nothing wrong with its options.
                counts = False
                raise
        except (FatalBackendError, NotAsked):
            raise
        except (BackendError, AttributeError, IndexError, KeyError, TypeError) as exc:
            if cancel.is_set():  # the stop ended its wait or its call
                return None
            # Quoted server text may hold half a character too: kept as its escape.
            reason = storable_text(str(exc) or type(exc).__name__)
            if not isinstance(exc, BackendError):
                # An answer of the wrong shape ("choices": null, or a table) falls back too.
                reason = f"the LLM's answer is malformed ({type(exc).__name__}: {reason})"
            logger.warning(
                "generator %r: rewriting %s failed (%s); the original prompt is used",
                self.name,
                sample.data_id,
                reason,
            )
            if counts:
                self._count_failure(reason)
            return RewriteOutcome(
                sample.data_id,
                sample.pair,
                code,
                sample.prompt,
                sample.prompt,
                "fallback",
                reason,
                unreached=isinstance(exc, UnreachableError),
            )
        with self._lock:
            self._rewrote = True
        return RewriteOutcome(sample.data_id, sample.pair, code, sample.prompt, text, "rewritten")

    def _rewrite_in(self, choice: Any, guidance: str) -> str:
        """The rewrite in the LLM's answer ``choice`` (:func:`rewritten_prompt`), read with
        the API key masked first: every message quoting the answer (a refusal that quotes the
        key, cut at 80 characters) is stored, logged and noted at the run's end, and the mask
        goes in before any cut, so no piece of the key is left at one.

        Raises:
            RefusedContent: the LLM refused in words, or its content filter stopped it.
            ItemError: the answer holds no rewrite (see :func:`rewritten_prompt`), or it holds
                a key of :data:`SHORT_KEY_CHARS` characters or more.
        """
        o = self.options
        answer = choice.message.content
        masked = redact(answer, self._key) if isinstance(answer, str) else answer
        text = rewritten_prompt(
            masked, choice.finish_reason, guidance=guidance, max_tokens=o.max_tokens
        )
        if masked == answer:
            return text
        if len(self._key) >= SHORT_KEY_CHARS:
            # Masked, the prompt would still go on to the inner generator (an API, perhaps)
            # and into every record, a mask where the server put something: no rewrite to
            # take.
            raise ItemError(
                "the LLM's answer holds the API key of the rewriting LLM (not repeated here), "
                "so its rewrite is neither sent on nor stored; check what that server puts in "
                "its answers"
            )
        # A short key is a placeholder (vLLM's EMPTY, "dummy", "token"), and a word of a good
        # rewrite, which keeps it: read again unmasked, with what it says masked.
        try:
            return rewritten_prompt(
                answer, choice.finish_reason, guidance=guidance, max_tokens=o.max_tokens
            )
        except ItemError as exc:
            raise type(exc)(redact(str(exc), self._key)) from None

    def _count_failure(self, reason: str) -> None:
        """Stop the run once :data:`REFUSALS_TO_STOP` rewrites have failed before any prompt
        was rewritten (the server refused the request, the LLM answered nothing usable, could
        not be reached; a refusal of the prompt's content, by a content filter or in words, is
        the prompt's own and not counted): each image
        would be drawn from its original prompt, and the run would end as if it had gone well.

        Raises:
            FatalBackendError: that many failures.
        """
        with self._lock:
            if self._rewrote:
                return
            self._failed += 1
            failed = self._failed
        if failed < REFUSALS_TO_STOP:
            return
        o = self.options
        where = f" at {o.base_url}" if o.base_url else ""
        raise FatalBackendError(
            f"the rewriting LLM of generator {self.name!r} ({o.model!r}{where}) rewrote none "
            f"of the first {failed} prompts it was given (the last failure: {reason}); check "
            "the generator's model, base_url, max_tokens and temperature against what that "
            "server accepts (the images drawn meanwhile from their original prompts stay in "
            "the run: start afresh with --new-run to have them rewritten too)"
        )

    def notes(self) -> list[str]:
        """The inner generator's notes, and how many prompts kept their original text."""
        with self._lock:
            failed = [o for o in self.rewrites.values() if o.status == "fallback"]
            total = len(self.rewrites)
        try:
            notes = checked_notes(self.inner.notes())
        except Exception as exc:  # the inner one's bug: this one's own notes still stand
            notes = [f"its inner generator's notes() failed: {describe_error(exc)}"]
        if failed:
            hint = ""
            if len(failed) == total and any(o.unreached for o in failed):
                hint = ": none was rewritten, is the LLM at its base_url reachable?"
            elif len(failed) == total:  # it answered: what it said is at fault
                hint = (
                    ": none was rewritten, though the LLM answered; check the generator's "
                    "model and options against the failures"
                )
            notes.append(
                f"{len(failed)} of {total} prompts were not rewritten and kept their original "
                f"text (the first failure: {failed[0].error}); each judgement's prompt_rewrite "
                f"says which{hint}"
            )
        return notes

    def close(self) -> None:
        try:
            self.inner.close()
        finally:
            if self._client is not None:
                self._client.close()
                self._client = None


def _relation_table(options: DTMRewriteOptions) -> RelationTable:
    table = RelationTable.from_report(options.report) if options.report else RelationTable()
    for pair, code in RelationTable.from_mapping(options.relations).as_dict().items():
        first, second = pair.split("_")
        table.set(first, second, code)  # type: ignore[arg-type]
    return table


def _check_inner(name: str, inner: Generator, named: str | None = None) -> None:
    """Refuse an inner generator that draws nothing from the prompt, or another rewrite: the
    config's inner entry and an instance passed to the engine alike.

    Args:
        named: what the message calls it (a config's ``inner backend 'image_folder'``);
            None: its class, as an instance passed through the embedding API is known.

    Raises:
        ConfigError: ``inner`` is an image folder or another dtm_rewrite.
    """
    named = named or f"inner generator, {type(inner).__name__},"
    if isinstance(inner, DTMRewriteGenerator):
        # The outer rewrite of its rewrite would be drawn, and the journal would record the
        # inner one's prompt, not the one the image was drawn from.
        raise ConfigError(
            f"generator {name!r}: its {named} is a dtm_rewrite itself: one rewrite is made per "
            "prompt; give the inner one's inner generator here instead"
        )
    if not inner.draws_from_the_prompt:
        # Its images would be recorded as drawn from rewrites they never saw, each one an LLM
        # call paid for nothing.
        raise ConfigError(
            f"generator {name!r}: its {named} serves images made elsewhere, not from the prompt "
            "it is given: there is nothing to rewrite; use it without dtm_rewrite"
        )
