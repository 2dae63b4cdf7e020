"""What the loopback judge server answers: a chat completion whose first token's top logprobs
are the planted rating of the question (:mod:`trig_stream.testing.planted_scores`), an error
shaped as OpenAI's, and its load as vLLM's gauges in Prometheus' text format.
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from trig_stream.dimensions import Dimension
from trig_stream.testing.judge_options import JudgeServerOptions, ServerStats
from trig_stream.testing.planted_scores import Loading, latent, rating_logprobs


def completion(
    body: dict[str, Any],
    image_key: str,
    dimension: str,
    limit: int,
    size: int,
    *,
    options: JudgeServerOptions,
    loadings: dict[Dimension, Loading],
    served: int,
    with_logprobs: bool,
) -> dict[str, Any]:
    """The answer to a question about ``image_key`` on ``dimension``: a chat completion
    whose first token is the planted rating, with its ``limit`` top logprobs unless
    ``with_logprobs`` is false; ``size`` is the request body's, ``served`` the answers
    given so far."""
    loading = loadings.get(dimension)  # type: ignore[call-overload]
    z = latent(image_key, dimension, loading, seed=options.seed)
    top = rating_logprobs(z, limit=max(limit, 1))
    token, logprob = top[0]
    max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
    text = token if max_tokens == 1 else f"{token}."
    logprobs = None
    if with_logprobs and body.get("logprobs"):
        entries = [_token_entry(t, lp) for t, lp in top[:limit]]
        logprobs = {"content": [{**_token_entry(token, logprob), "top_logprobs": entries}]}
    completion_tokens = 1 if max_tokens == 1 else 2
    prompt_tokens = 300 + size // 400  # a stand-in: vLLM would count the real tokens
    return {
        "id": f"chatcmpl-{served}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": options.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": logprobs,
                "finish_reason": "length" if max_tokens == 1 else "stop",
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def _token_entry(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}


def error(status: int, message: str, kind: str, *, code: str | int | None = None) -> web.Response:
    """An error answer with an OpenAI-shaped body."""
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return web.json_response(body, status=status)


def metrics_text(model: str, stats: ServerStats) -> str:
    """``GET /metrics``: the requests running and waiting, as vLLM's gauges name them."""
    label = f'{{model_name="{_label_value(model)}"}}'
    lines = []
    for name, value, meaning in (
        ("running", stats.running, "Number of requests currently running."),
        ("waiting", stats.waiting, "Number of requests waiting to be processed."),
    ):
        lines += [
            f"# HELP vllm:num_requests_{name} {meaning}",
            f"# TYPE vllm:num_requests_{name} gauge",
            f"vllm:num_requests_{name}{label} {float(value)}",
        ]
    return "\n".join(lines) + "\n"


def _label_value(text: str) -> str:
    # Prometheus' text format: a label value escapes backslash, double quote and newline.
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
