"""The position-only LM head of PRM training.

The LM head runs on the supervised positions only. For a judgement token at position p the hidden state at p - 1
predicts it and the one at p predicts its `<|im_end|>`; `judgement_logits` runs the backbone (`model.model`),
gathers those 2N rows and applies `model.lm_head` to them alone, so no (batch, seq, vocab) logits exist.
`add_judgement_head` routes that computation through the model's own `forward` (a `judgement_rows=` argument), so
DDP / DeepSpeed wrappers see a normal forward call, as TRL's `add_fused_lm_head` does.
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass
from typing import Any

import torch
from transformers.utils import ModelOutput


@dataclass
class JudgementOutput(ModelOutput):
    """Logits predicting each judgement token (N, V) and each judgement's `<|im_end|>` (N, V)."""

    judgement_logits: torch.Tensor | None = None
    end_logits: torch.Tensor | None = None


def gather_rows(hidden: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """`hidden[rows[i], positions[i]]` for each i: (B, T, H) -> (N, H)."""
    return hidden[rows, positions]


def judgement_logits(model, judgement_rows: torch.Tensor, judgement_positions: torch.Tensor, *,
                     input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     pixel_values: torch.Tensor | None = None, **kwargs: Any) -> JudgementOutput:
    """Backbone (`model.model`: InternVLModel or Qwen2Model), then `model.lm_head` on 2N gathered rows only."""
    backbone_kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
    if pixel_values is not None:
        backbone_kwargs["pixel_values"] = pixel_values.to(model.dtype)
    hidden = model.model(**backbone_kwargs).last_hidden_state
    rows = torch.cat([judgement_rows, judgement_rows])
    positions = torch.cat([judgement_positions - 1, judgement_positions])  # predict p and p + 1
    logits = model.lm_head(gather_rows(hidden, rows, positions))
    judge, end = logits.split(judgement_rows.numel())
    return JudgementOutput(judgement_logits=judge, end_logits=end)


def add_judgement_head(model) -> None:
    """Let `model(..., judgement_rows=r, judgement_positions=p)` return `judgement_logits(model, r, p, ...)`;
    without them the class's own forward runs (generation unchanged). Idempotent."""
    if getattr(model, "_mmalign_judgement_head", False):
        return

    @functools.wraps(type(model).forward)
    def forward(self, *args, judgement_rows=None, judgement_positions=None, **kwargs):
        if judgement_rows is None:
            return type(self).forward(self, *args, **kwargs)
        return judgement_logits(self, judgement_rows, judgement_positions, **kwargs)

    model.forward = types.MethodType(forward, model)
    model._mmalign_judgement_head = True


__all__ = ["JudgementOutput", "gather_rows", "judgement_logits", "add_judgement_head"]
