"""trig-stream: evaluate image generators the TRIG way, as a stream.

The package root stays light: importing it loads no torch, textual or matplotlib. The engine
and everything it needs are importable from here::

    from trig_stream import Engine, load_config

    async with Engine(load_config("config/demo.toml")) as engine:
        async for judgement in engine.results:
            ...
"""

from typing import TYPE_CHECKING, Any

from trig_stream.config import RunConfig, load_config
from trig_stream.engine import Engine, RunSummary
from trig_stream.errors import (
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
)
from trig_stream.records import GeneratedImage, JudgeFingerprint, Judgement, Sample
from trig_stream.scoring import score_top_logprobs
from trig_stream.stats import EngineStats

if TYPE_CHECKING:
    from trig_stream.backends.metrics.registry import import_metric

__version__ = "0.1.0"

__all__ = [
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
    "__version__",
    "import_metric",
    "load_config",
    "score_top_logprobs",
]


def __getattr__(name: str) -> Any:
    # Resolved on first use, so that importing the package does not import the metrics.
    if name == "import_metric":
        from trig_stream.backends.metrics.registry import import_metric

        return import_metric
    raise AttributeError(f"module 'trig_stream' has no attribute {name!r}")
