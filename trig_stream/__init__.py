"""trig-stream: evaluate image generators the TRIG way, as a stream.

The package root is light: each public name is imported on first use (none loads torch,
textual or matplotlib). The engine and everything it needs are importable from here::

    from trig_stream import Engine, load_config

    async with Engine(load_config("config/demo.toml")) as engine:
        async for judgement in engine.results:
            ...
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trig_stream.backends.metrics.registry import import_metric
    from trig_stream.config import RunConfig, load_config
    from trig_stream.engine import Engine
    from trig_stream.errors import (
        AnswerTimeoutError,
        BackendError,
        ConfigError,
        DatasetError,
        FatalBackendError,
        FingerprintMismatch,
        ItemError,
        RateLimitError,
        RetryableError,
        RunDirError,
        RunLockedError,
        TrigStreamError,
        UnreachableError,
    )
    from trig_stream.records import GeneratedImage, JudgeFingerprint, Judgement, Sample
    from trig_stream.scoring import score_top_logprobs
    from trig_stream.snapshots import RunSummary
    from trig_stream.stats import EngineStats

_HOMES = {
    "import_metric": "trig_stream.backends.metrics.registry",
    "RunConfig": "trig_stream.config",
    "load_config": "trig_stream.config",
    "Engine": "trig_stream.engine",
    "RunSummary": "trig_stream.snapshots",
    **dict.fromkeys(
        (
            "AnswerTimeoutError",
            "BackendError",
            "ConfigError",
            "DatasetError",
            "FatalBackendError",
            "FingerprintMismatch",
            "ItemError",
            "RateLimitError",
            "RetryableError",
            "RunDirError",
            "RunLockedError",
            "TrigStreamError",
            "UnreachableError",
        ),
        "trig_stream.errors",
    ),
    **dict.fromkeys(
        ("GeneratedImage", "JudgeFingerprint", "Judgement", "Sample"), "trig_stream.records"
    ),
    "score_top_logprobs": "trig_stream.scoring",
    "EngineStats": "trig_stream.stats",
}
"""Where each public name lives: it is imported on first use, so that importing the package
costs nothing until then (the ``trig-stream`` command sees a Ctrl-C during its imports)."""

__version__ = "0.1.0"

__all__ = [
    "AnswerTimeoutError",
    "BackendError",
    "ConfigError",
    "DatasetError",
    "Engine",
    "EngineStats",
    "FatalBackendError",
    "FingerprintMismatch",
    "GeneratedImage",
    "ItemError",
    "JudgeFingerprint",
    "Judgement",
    "RateLimitError",
    "RetryableError",
    "RunConfig",
    "RunDirError",
    "RunLockedError",
    "RunSummary",
    "Sample",
    "TrigStreamError",
    "UnreachableError",
    "__version__",
    "import_metric",
    "load_config",
    "score_top_logprobs",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'trig_stream' has no attribute {name!r}")
    value = getattr(import_module(home), name)
    globals()[name] = value  # found directly from now on
    return value
