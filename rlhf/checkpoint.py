"""Resuming a training run without losing anything: `ResumeMixin`, shared by MPOTrainer, VisualPRMTrainer and the
demo's SFT trainer.

Weights: transformers 5 saves some architectures (InternVL among them) under their legacy key names, and the
Trainer's resume path loads them with `load_state_dict(strict=False)`, which silently drops every renamed weight:
the run would go on from the initial weights. `load_renamed_checkpoint` loads such a checkpoint through
`from_pretrained`, which maps the names back, and says whether it did.

State: a trainer with state of its own beyond the Trainer's (MPOTrainer's reward shift δ) names a JSON file in
`state_file`; the mixin writes `extra_state()` into every checkpoint and hands the file back to
`load_extra_state` when a run resumes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import is_peft_model
from safetensors import safe_open
from transformers import PreTrainedModel
from transformers.trainer_utils import get_last_checkpoint


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


class ResumeMixin:
    """Resuming for a `transformers.Trainer` subclass (put it before the Trainer in the bases).

    - `_load_from_checkpoint`: a checkpoint saved under legacy weight names is loaded through `from_pretrained`
      (`load_renamed_checkpoint`), any other by the Trainer's own loading;
    - with `state_file` set: `_save_checkpoint` also writes `extra_state()` (JSON) as that file in the checkpoint
      folder, and `train(resume_from_checkpoint=...)` (True: the last checkpoint of `output_dir`) first calls
      `load_extra_state(state, checkpoint)` with what the file holds, None when the checkpoint has no such file.
      `write_extra_state(folder)` writes the file anywhere (a final model's folder)."""

    state_file: str | None = None

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any] | None, checkpoint: str | os.PathLike) -> None:
        """Restore what `extra_state` returned (None: the checkpoint has no `state_file`)."""

    def write_extra_state(self, folder: str | os.PathLike) -> None:
        (Path(folder) / self.state_file).write_text(json.dumps(self.extra_state(), indent=2) + "\n")

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        if not load_renamed_checkpoint(target, resume_from_checkpoint, fsdp=self.is_fsdp_enabled):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.state_file and self.args.should_save:
            self.write_extra_state(Path(self._get_output_dir(trial)) / f"checkpoint-{self.state.global_step}")

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any):
        if self.state_file and resume_from_checkpoint:
            if resume_from_checkpoint is True:
                resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
                if resume_from_checkpoint is None:
                    raise ValueError(f"no checkpoint found in {self.args.output_dir} to resume from")
            path = Path(resume_from_checkpoint) / self.state_file
            self.load_extra_state(json.loads(path.read_text()) if path.is_file() else None, resume_from_checkpoint)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
