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

from .errors import UserError
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
    check_model_path(name_or_path)
    kwargs = dict(dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code, use_safetensors=True, **model_kwargs)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        if model_type(name_or_path) == "internvl":
            model = InternVLForConditionalGeneration.from_pretrained(name_or_path, **kwargs)
            processor = InternVLChatProcessor.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
            return model, processor
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except OSError as err:  # a hub id that cannot be fetched, a folder without tokenizer files
        raise UserError(f"{name_or_path}: cannot load the model ({str(err).splitlines()[0]})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


def _looks_local(name_or_path: str) -> bool:
    """A path rather than a hub id (`name` or `org/name`)."""
    return (name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or "\\" in name_or_path
            or Path(name_or_path).exists())


def check_model_path(name_or_path: str) -> None:
    """One UserError line for a model folder that cannot load: missing, config.json not JSON, no safetensors
    weights (pickle weights are refused: they can run code), a safetensors file whose header does not read."""
    path = Path(name_or_path).expanduser()
    if not _looks_local(name_or_path):
        return  # a hub id: from_pretrained fetches it (an OSError there is reported by the caller)
    if not path.is_dir():
        raise UserError(f"{name_or_path}: model folder not found" if not path.exists()
                        else f"{name_or_path}: expected a model folder (config.json + *.safetensors), got a file")
    config = path / "config.json"
    if not config.is_file():
        raise UserError(f"{config}: not found; a model folder holds config.json and *.safetensors weights")
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:
        raise UserError(f"{config}: not valid JSON ({err})") from None
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        pickles = sorted(p.name for pattern in PICKLE_WEIGHTS for p in path.glob(pattern))
        if pickles:
            raise UserError(f"{path}: only safetensors weights are loaded, found {pickles[0]} (pickle, which can run "
                            "code when loaded); convert it once where you trust it: load it with transformers and "
                            "save_pretrained(..., safe_serialization=True)")
        raise UserError(f"{path}: no *.safetensors weights in the model folder")
    from safetensors import safe_open

    for file in weights:
        try:
            with safe_open(str(file), framework="pt") as f:
                f.keys()
        except Exception as err:  # SafetensorError (a Rust type) or OSError: a corrupt or truncated file
            raise UserError(f"{file}: not a readable safetensors file ({str(err).splitlines()[0]})") from None


def model_type(name_or_path: str) -> str | None:
    config = Path(name_or_path) / "config.json"
    if config.is_file():
        try:
            return json.loads(config.read_text()).get("model_type")
        except ValueError as err:
            raise UserError(f"{config}: not valid JSON ({err})") from None
    from transformers import AutoConfig  # a hub id: only its config is fetched

    return AutoConfig.from_pretrained(name_or_path).model_type


def save_model_and_processor(model, processing_class, path: str | Path) -> None:
    model.save_pretrained(path, safe_serialization=True)
    processing_class.save_pretrained(path)
