"""Loading policies and their processors: real checkpoints and the embedded tiny models, one code path.

`load_model_and_processor("path/to/InternVL3-1B-hf")` loads an `InternVLForConditionalGeneration` from
safetensors with an `InternVLChatProcessor`; a text-only checkpoint gives an `AutoModelForCausalLM` with its
tokenizer. The names in `EMBEDDED` build a tiny random-weight model in-process instead (tests, demos, CI).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, InternVLForConditionalGeneration

from .processing import InternVLChatProcessor

EMBEDDED = {"tiny-internvl": False, "tiny-qwen2": True}  # name -> text only


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    if dtype in (None, "auto"):
        return "auto" if dtype == "auto" else torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def load_model_and_processor(
    name_or_path: str,
    *,
    dtype: str | torch.dtype | None = None,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    seed: int = 0,
    **model_kwargs: Any,
):
    """(model, processing_class) for a checkpoint folder or hub id, or for an embedded tiny model name."""
    if name_or_path in EMBEDDED:
        from .tiny import build_causal_lm, build_internvl, build_processor

        processor = build_processor()
        if EMBEDDED[name_or_path]:
            return build_causal_lm(processor.tokenizer, seed=seed), processor.tokenizer
        return build_internvl(processor, seed=seed), processor
    kwargs = dict(dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code, use_safetensors=True, **model_kwargs)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if model_type(name_or_path) == "internvl":
        model = InternVLForConditionalGeneration.from_pretrained(name_or_path, **kwargs)
        processor = InternVLChatProcessor.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        return model, processor
    model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def model_type(name_or_path: str) -> str | None:
    config = Path(name_or_path) / "config.json"
    if config.is_file():
        return json.loads(config.read_text()).get("model_type")
    from transformers import AutoConfig  # a hub id: only its config is fetched

    return AutoConfig.from_pretrained(name_or_path).model_type


def save_model_and_processor(model, processing_class, path: str | Path) -> None:
    model.save_pretrained(path, safe_serialization=True)
    processing_class.save_pretrained(path)
