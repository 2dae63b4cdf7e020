"""Upstream's ``trig_api`` metrics as trig-stream ``openai`` judges (``import-config``).

Upstream lists the metrics of each dimension under ``dimensions.<DIM>.metrics``, usually one
``trig_api`` definition (a VLM judge over the OpenAI protocol) merged in through YAML anchors.
Each distinct definition (model, endpoint, top logprobs, whether it needs a key) becomes one
judge, scored with the upstream-exact TRIGScore. An API key is never copied, only the name of
the variable to export it in. Other metrics have no counterpart and are reported.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from trig_stream.dimensions import DIMENSIONS, Dimension
from trig_stream.errors import ConfigError
from trig_stream.upstream_config.toml_writer import key_text, safe_name, shown, too_long_to_write

JUDGE_METRIC = "trig_api"
"""The upstream metric that is a VLM judge over the OpenAI protocol (the TRIGScore)."""
UPSTREAM_ENDPOINT = "http://localhost:8000/v1/"
"""Upstream's endpoint when a ``trig_api`` metric names none."""
UPSTREAM_TOP_LOGPROBS = 5
"""Upstream's top logprobs when a ``trig_api`` metric names none."""
MAX_TOP_LOGPROBS = 20
KEYLESS = frozenset({"", "EMPTY", "none", "None"})
"""API_KEY values upstream uses for servers without keys."""
DEFAULT_JUDGE_MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"

_DIMENSION_CODES: Mapping[str, Dimension] = {code: code for code in DIMENSIONS}

_JudgeIdent = tuple[str, str, int, str | None]
"""What makes two ``trig_api`` metrics the same judge: model, endpoint, top logprobs, key."""


@dataclass(slots=True)
class ConvertedJudge:
    """One ``openai`` judge and the dimensions upstream asked it about.

    ``endpoint`` is its ``base_url``: upstream's endpoint without a trailing ``/``.
    """

    model: str
    endpoint: str
    top_logprobs: int
    api_key_env: str | None
    dimensions: list[Dimension] = field(default_factory=list)


def convert_judges(
    dimensions: Any, warn: Callable[[str, str], None]
) -> list[tuple[str, ConvertedJudge]]:
    """Convert upstream's ``dimensions`` into named judges, in upstream's order.

    Args:
        dimensions: upstream's ``dimensions`` mapping; None when the key is absent.
        warn: records a warning, ``warn(key, message)``.

    Returns:
        One ``(name, judge)`` per distinct ``trig_api`` metric; with none, a judge of
        :data:`DEFAULT_JUDGE_MODEL` at :data:`UPSTREAM_ENDPOINT` for every dimension.

    Raises:
        ConfigError: a metric's ``endpoint`` is not a string (the message names its key,
            not the upstream file).
    """
    found: dict[_JudgeIdent, ConvertedJudge] = {}
    if isinstance(dimensions, Mapping):
        for dim, spec in dimensions.items():
            _dimension(key_text(dim), spec, found, warn)
    elif dimensions is not None:
        warn("dimensions", "left out: expected a mapping of dimension codes")
    if not found:
        warn(
            "dimensions",
            f"no {JUDGE_METRIC} metric to convert: wrote an openai judge for "
            f"{DEFAULT_JUDGE_MODEL} at {UPSTREAM_ENDPOINT}; check [[judges]]",
        )
        # Upstream's trig_api defaults throughout: the TOML says scorer = trig reproduces
        # upstream's scoring, which asks for 5 top tokens.
        found[("", "", 0, None)] = ConvertedJudge(
            model=DEFAULT_JUDGE_MODEL,
            endpoint=UPSTREAM_ENDPOINT.rstrip("/"),
            top_logprobs=UPSTREAM_TOP_LOGPROBS,
            api_key_env=None,
            dimensions=list(DIMENSIONS),
        )
    judges = list(found.values())
    covered = {d for judge in judges for d in judge.dimensions}
    named: list[tuple[str, ConvertedJudge]] = []
    for judge in judges:
        name = "trigscore" if len(judges) == 1 else safe_name(f"trigscore-{judge.model}")
        taken = {n for n, _ in named}
        unique, n = name, 1
        while unique in taken:
            n += 1
            unique = f"{name}-{n}"
        named.append((unique, judge))
        missing = sorted(covered - set(judge.dimensions), key=DIMENSIONS.index)
        if missing:
            warn(
                f"dimensions ({judge.model})",
                f"upstream asks it only about {', '.join(judge.dimensions)}; here every "
                f"judge scores every judged dimension, so also {', '.join(missing)}",
            )
    return named


def _dimension(
    dim: str,
    spec: Any,
    found: dict[_JudgeIdent, ConvertedJudge],
    warn: Callable[[str, str], None],
) -> None:
    key = f"dimensions.{dim}"
    if dim not in DIMENSIONS:
        warn(key, "left out: not one of TRIG's ten dimensions")
        return
    if not isinstance(spec, Mapping) or "metrics" not in spec:
        warn(key, "left out: no `metrics` list (an older upstream layout)")
        return
    for extra in spec:
        if extra != "metrics":
            warn(f"{key}.{key_text(extra)}", "unknown upstream key, left out")
    metrics = spec["metrics"] or []
    if not isinstance(metrics, list):
        metrics = [metrics]
    for index, metric in enumerate(metrics):
        where = f"{key}.metrics[{index}]"
        if isinstance(metric, str):
            metric_name, params = metric, {}
        elif isinstance(metric, Mapping):
            metric_name = metric.get("name", "")
            params = {key_text(k): v for k, v in metric.items() if k != "name"}
        else:
            warn(where, f"left out: {shown(metric)} is not a metric")
            continue
        if metric_name != JUDGE_METRIC:
            warn(
                where,
                f"left out: metric {shown(metric_name)} has no counterpart here (only "
                f"{JUDGE_METRIC}, the VLM judge, converts)",
            )
            continue
        judge = _judge_from(params, where, warn)
        ident = (judge.model, judge.endpoint, judge.top_logprobs, judge.api_key_env)
        target = found.setdefault(ident, judge)
        code = _DIMENSION_CODES[dim]
        if code not in target.dimensions:
            target.dimensions.append(code)


def _judge_from(
    params: Mapping[str, Any], where: str, warn: Callable[[str, str], None]
) -> ConvertedJudge:
    raw_model = params.get("model_name")
    listed = isinstance(raw_model, Collection) and not isinstance(raw_model, str)
    if listed or too_long_to_write(raw_model):
        # A list or a mapping names no model (and an alias bomb's text is gigabytes), nor
        # does an integer of thousands of digits.
        model = DEFAULT_JUDGE_MODEL
        warn(
            f"{where}.model_name",
            f"{shown(raw_model)} is not a model name: using {DEFAULT_JUDGE_MODEL!r}",
        )
    else:
        model = str(raw_model or "")
        if not model or model == "None":
            model = DEFAULT_JUDGE_MODEL
            warn(f"{where}.model_name", f"missing: using {DEFAULT_JUDGE_MODEL!r}")
    raw_endpoint = params.get("endpoint")
    if raw_endpoint is not None and not isinstance(raw_endpoint, str):
        raise ConfigError(
            f"{where}.endpoint: {shown(raw_endpoint)} is not a URL: write one URL as a string "
            f"(a server of several is a {JUDGE_METRIC} metric of its own)"
        )
    # Without the trailing "/" the URL is the judge's base_url; "…/v1/" and "…/v1" are one
    # server, so one judge.
    endpoint = (raw_endpoint or UPSTREAM_ENDPOINT).rstrip("/")
    top = params.get("top_logprobs", UPSTREAM_TOP_LOGPROBS)
    if not isinstance(top, int) or isinstance(top, bool) or top < 1:
        warn(f"{where}.top_logprobs", f"{shown(top)} is not a count: using 5")
        top = UPSTREAM_TOP_LOGPROBS
    elif top > MAX_TOP_LOGPROBS:
        warn(f"{where}.top_logprobs", f"{shown(top)} is above {MAX_TOP_LOGPROBS}: using 20")
        top = MAX_TOP_LOGPROBS
    api_key_env: str | None = None
    key = params.get("API_KEY")
    if key is not None and not (isinstance(key, str) and key in KEYLESS):
        api_key_env = "OPENAI_API_KEY"
        warn(
            f"{where}.API_KEY",
            "not copied: export the key as OPENAI_API_KEY (options.api_key_env)",
        )
    for extra in params:
        if extra not in ("model_name", "endpoint", "top_logprobs", "API_KEY"):
            warn(f"{where}.{extra}", "unknown trig_api parameter, left out")
    return ConvertedJudge(model=model, endpoint=endpoint, top_logprobs=top, api_key_env=api_key_env)
