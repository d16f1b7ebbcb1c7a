"""Resuming from a checkpoint saved under older weight names.

transformers 5 saves some architectures (InternVL among them) under their legacy key names, and the Trainer's resume
path loads them with `load_state_dict(strict=False)`, which silently drops every renamed weight: the run would go
on from the initial weights. `load_renamed_checkpoint` loads such a checkpoint through `from_pretrained`, which maps
the names back, and says whether it did; MPOTrainer and VisualPRMTrainer call it from `_load_from_checkpoint`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate.utils import is_peft_model
from safetensors import safe_open
from transformers import PreTrainedModel


def load_renamed_checkpoint(target: torch.nn.Module, checkpoint: str | Path, *, fsdp: bool = False) -> bool:
    """Load `checkpoint/model.safetensors` into `target` (unwrapped) when its key names differ from the model's;
    True when it did, False when the Trainer's own loading is right (same names, PEFT adapters, FSDP, sharded or
    non-safetensors weights)."""
    weights = Path(checkpoint) / "model.safetensors"
    if not weights.is_file() or not isinstance(target, PreTrainedModel) or is_peft_model(target) or fsdp:
        return False
    with safe_open(str(weights), "pt") as f:
        saved_keys = set(f.keys())
    if saved_keys == set(target.state_dict()):
        return False
    fresh = type(target).from_pretrained(str(checkpoint), dtype=target.dtype)
    target.load_state_dict(fresh.state_dict(), strict=True)
    return True
