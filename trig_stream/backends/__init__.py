"""Generator and judge backends, and the registry that builds them from config."""

from trig_stream.backends.base import (
    GenerationRequest,
    Generator,
    Judge,
    JudgeReply,
    JudgeRequest,
    PreparedImage,
)
from trig_stream.backends.registry import build_generator, build_judge, register_backend

__all__ = [
    "GenerationRequest",
    "Generator",
    "Judge",
    "JudgeReply",
    "JudgeRequest",
    "PreparedImage",
    "build_generator",
    "build_judge",
    "register_backend",
]
