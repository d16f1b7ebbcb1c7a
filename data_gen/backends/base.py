"""The rollout backend interface: one way to sample chain-of-thought responses from a policy, whatever runs it.

A job turns each question into a `GenerationRequest` (an InternVL user message: text with `<image>` placeholders
plus its images, an optional system prompt, and optionally the start of an answer to continue) and hands a batch
to a backend:

    backend = make_backend("openai", model="OpenGVLab/InternVL3-8B", base_url="http://127.0.0.1:8000/v1")
    backend.check()                        # BackendUnavailable at start when the server or model is missing
    results = backend.generate(requests)   # one GenerationResult per request, in the same order
    backend.close()

`generate` does not raise for a single bad request: that request's result carries `error` (one line), so the job
writes it to failures.jsonl and goes on. `check` is the place for fatal problems.

Backends are named in `BACKENDS` and imported only when made, so naming one costs nothing.
"""

from __future__ import annotations

import base64
import importlib
import io
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from PIL import Image

from rlhf.errors import UserError
from rlhf.processing import IMAGE_PLACEHOLDER, with_placeholders

# backend name -> "module:Class", imported by `make_backend` only when that backend is made.
BACKENDS: dict[str, str] = {
    "hf": "data_gen.backends.hf:HFBackend",
    "vllm": "data_gen.backends.vllm_offline:VLLMBackend",
    "openai": "data_gen.backends.openai_compat:OpenAIBackend",
}


class BackendUnavailable(UserError):
    """The model or server behind a backend cannot be used at all (fatal, reported as one line)."""


class ImageFormat(StrEnum):
    """How images travel inside OpenAI chat messages (as base64 data URLs)."""

    PNG = "png"  # lossless: the server sees the exact pixels
    JPEG = "jpeg"  # smaller requests, lossy


@dataclass
class SamplingParams:
    """Sampling settings shared by every backend. The defaults are the MMPR rollout settings (reference section 2:
    temperature 0.7, top_k 50, up to 4096 new tokens). `top_k=None` means no top-k cut; `seed=None` lets the
    backend pick; `stop` strings end a response early (the end-of-turn token always does)."""

    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int | None = 50
    max_new_tokens: int = 4096
    n: int = 1
    seed: int | None = None
    stop: list[str] | None = None

    def __post_init__(self) -> None:
        checks = {
            "temperature": (self.temperature >= 0, ">= 0"),
            "top_p": (0 < self.top_p <= 1, "in (0, 1]"),
            "top_k": (self.top_k is None or self.top_k >= 1, ">= 1 or None (no top-k cut)"),
            "max_new_tokens": (self.max_new_tokens >= 1, ">= 1"),
            "n": (self.n >= 1, ">= 1"),
        }
        for name, (ok, expected) in checks.items():
            if not ok:
                raise UserError(f"SamplingParams.{name} must be {expected}, got {getattr(self, name)!r}")


@dataclass
class GenerationRequest:
    """One prompt to sample `sampling.n` responses for.

    `prompt` is the user turn in InternVL form: text with one `<image>` placeholder per image, in image order
    (with images and no placeholder, `<image>\\n` per image is put in front, as InternVL does). `system` is an
    optional system prompt. `assistant_prefix`, when set, is the start of the answer that the model continues
    (DropoutNTP, Monte Carlo step rollouts); results then hold the continuations only, without the prefix.
    `seed`, when set, overrides `sampling.seed` for this request (a job derives it from its seed and the id).
    `group` names requests that are useless once one of them failed (the continuations of one solution): a server
    backend does not send the rest of a group of one `generate` call after a failure."""

    id: str
    prompt: str
    images: list[Image.Image] = field(default_factory=list)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None
    system: str | None = None
    assistant_prefix: str | None = None
    group: str | None = None

    @property
    def effective_seed(self) -> int | None:
        return self.seed if self.seed is not None else self.sampling.seed

    def user_text(self) -> str:
        """The user text with exactly one `<image>` placeholder per image; ValueError naming the request when
        placeholders and images disagree."""
        count = self.prompt.count(IMAGE_PLACEHOLDER)
        if count == 0:
            return with_placeholders(self.prompt, len(self.images))
        if count != len(self.images):
            raise ValueError(
                f"request {self.id!r}: prompt has {count} {IMAGE_PLACEHOLDER} placeholder(s) "
                f"but {len(self.images)} image(s)"
            )
        return self.prompt


@dataclass
class GenerationResult:
    """What came back for one request: `texts` (n responses) or `error` (one line saying why there are none).
    `num_generated_tokens` counts the new tokens of all n responses when the backend knows it."""

    id: str
    texts: list[str] = field(default_factory=list)
    num_generated_tokens: int | None = None
    error: str | None = None
    applied: dict | None = None  # server backends: the sampling settings the server was sent and accepted

    @property
    def ok(self) -> bool:
        return self.error is None

    @classmethod
    def failure(cls, id: str, error: str) -> GenerationResult:
        return cls(id=id, texts=[], num_generated_tokens=None, error=" ".join(error.split()))


class RolloutBackend(ABC):
    """A policy that samples responses. Subclasses implement `generate`; `check` and `close` are optional."""

    @abstractmethod
    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """One result per request, in request order. A request that fails gets a result with `error` set; this
        method raises only for problems that concern every request (a programming error, a dead GPU)."""

    def check(self) -> None:
        """Raise `BackendUnavailable` (one line) when the model or server cannot be reached. Called once before a
        job starts; the default does nothing (a backend that loads its model in `__init__` is already checked)."""

    def check_continuation(self) -> None:
        """Raise `BackendUnavailable` (one line) when the backend cannot continue a partial assistant message
        (`GenerationRequest.assistant_prefix`), which label-steps and DropoutNTP need. Called once before such a job
        starts; the in-process backends always can."""

    def close(self) -> None:
        """Release connections, threads or GPU memory. The default does nothing."""

    def __enter__(self) -> RolloutBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def backend_class(name: str) -> type[RolloutBackend]:
    """The class registered under `name` in `BACKENDS`, imported now."""
    if name not in BACKENDS:
        raise UserError(f"unknown rollout backend {name!r}: choose one of {', '.join(BACKENDS)}")
    module_name, class_name = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def make_backend(name: str, **kwargs: Any) -> RolloutBackend:
    """Build the backend registered under `name` with `kwargs` (see each backend's `__init__`)."""
    return backend_class(name)(**kwargs)


# -- OpenAI chat messages -----------------------------------------------------------------------------------------

def image_data_url(image: Image.Image, fmt: ImageFormat | str = ImageFormat.PNG, jpeg_quality: int = 95) -> str:
    """`data:image/...;base64,...` for `image`; PNG keeps the pixels exactly, JPEG is converted to RGB."""
    fmt = ImageFormat(fmt)
    buf = io.BytesIO()
    if fmt is ImageFormat.JPEG:
        image.convert("RGB").save(buf, format="JPEG", quality=jpeg_quality)
    else:
        png_modes = {"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"}
        (image if image.mode in png_modes else image.convert("RGB")).save(buf, format="PNG")
    return f"data:image/{fmt.value};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def openai_messages(request: GenerationRequest, image_format: ImageFormat | str = ImageFormat.PNG) -> list[dict]:
    """OpenAI chat `messages` for `request`: the system prompt (when set), the user turn, and the assistant prefix
    (when set). With images the user content is a list of parts: the text between placeholders as `text` parts and
    each image as an `image_url` part (a data URL) where its `<image>` placeholder was."""
    messages: list[dict] = []
    if request.system:
        messages.append({"role": "system", "content": request.system})
    text = request.user_text()
    if request.images:
        content: str | list[dict] = []
        pieces = text.split(IMAGE_PLACEHOLDER)
        for i, piece in enumerate(pieces):
            if piece:
                content.append({"type": "text", "text": piece})
            if i < len(request.images):
                url = image_data_url(request.images[i], image_format)
                content.append({"type": "image_url", "image_url": {"url": url}})
    else:
        content = text
    messages.append({"role": "user", "content": content})
    if request.assistant_prefix is not None:
        messages.append({"role": "assistant", "content": request.assistant_prefix})
    return messages
