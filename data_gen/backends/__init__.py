"""Rollout backends: `make_backend(name, **kwargs)` with a name from `BACKENDS` ("hf", "vllm", "openai").

The interface lives in `base`; each backend module is imported only when that backend is made.
"""

from .base import (
    BACKENDS,
    BackendUnavailable,
    GenerationRequest,
    GenerationResult,
    ImageFormat,
    RolloutBackend,
    SamplingParams,
    backend_class,
    image_data_url,
    make_backend,
    openai_messages,
)

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "GenerationRequest",
    "GenerationResult",
    "ImageFormat",
    "RolloutBackend",
    "SamplingParams",
    "backend_class",
    "image_data_url",
    "make_backend",
    "openai_messages",
]
