"""Training a VisualPRM-style generative process reward model (reference section 3).

One solution is one multi-turn conversation (`reward.prm_data`): each step is a user turn and the model answers
`+` or `-`. Training is SFT on the assistant turns: the judgement token and its `<|im_end|>`, nothing else.

The PRM side is split as the MPO side is: `reward.prm_config` (`VisualPRMConfig`, the label modes),
`reward.prm_losses` (P(`+`) and the token losses, pure), `reward.prm_head` (the position-only LM head),
`reward.prm_collator` (rows and batches), `reward.prm_metrics` (step metrics, pure) and this module, the trainer.

`VisualPRMTrainer` subclasses `transformers.Trainer` (TRL 1.16 has no PRM trainer) and overrides `compute_loss`
and `prediction_step`; evaluation reports step accuracy, precision/recall/F1 of the `-` class, expected calibration
error and Brier score of P(`+`) through `compute_metrics` (pinned to transformers 5.23's evaluation loop). Its
`save_model` also writes the PRM's step settings (`reward.step_settings`) beside the weights of every checkpoint.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from transformers import Trainer

from rlhf.checkpoint import ResumeMixin

from .prm_collator import ROW_COLUMNS, PRMCollator
from .prm_config import LabelMode, VisualPRMConfig
from .prm_data import judgement_ids
from .prm_head import add_judgement_head
from .prm_losses import hard_token_losses, plus_probability, soft_token_losses
from .prm_metrics import IGNORE, prm_eval_metrics


class VisualPRMTrainer(ResumeMixin, Trainer):
    """`transformers.Trainer` for a generative PRM. `train_dataset` / `eval_dataset` hold rows from `encode_row`
    (see `reward.prm_job.build_rows`)."""

    def __init__(self, model, args: VisualPRMConfig | None = None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, compute_metrics=None, **kwargs: Any):
        args = args or VisualPRMConfig(output_dir="prm-output")
        if processing_class is None:
            raise ValueError("VisualPRMTrainer needs `processing_class` (an InternVLChatProcessor or a tokenizer)")
        self.plus_id, self.minus_id = judgement_ids(processing_class)
        add_judgement_head(model)
        compute_metrics = compute_metrics or functools.partial(
            prm_eval_metrics, threshold=args.label_threshold, bins=args.calibration_bins)
        super().__init__(model=model, args=args, data_collator=data_collator or PRMCollator(processing_class),
                         train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=processing_class,
                         compute_metrics=compute_metrics, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The weights (every checkpoint and a final save), and beside them the PRM's step settings
        (`reward.step_settings`: step_settings.json), which scoring reads."""
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            self.args.step_settings.save(output_dir or self.args.output_dir)

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = list(ROW_COLUMNS)

    def judgement_loss(self, model, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(token-mean loss over the 2N supervised tokens, P(+) per judgement (N,), detached) for one batch."""
        rows, positions = inputs["judgement_rows"], inputs["judgement_positions"]
        model_inputs = {k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values") if k in inputs}
        out = model(**model_inputs, judgement_rows=rows, judgement_positions=positions)
        ids = inputs["input_ids"]
        end_targets = ids[rows, positions + 1]
        if self.args.label_mode == LabelMode.SOFT:
            losses = soft_token_losses(out.judgement_logits, out.end_logits, inputs["judgement_scores"], end_targets,
                                       self.plus_id, self.minus_id)
        else:
            # the label, not the token in the row: with judgement_context 'plus' the row holds '+' everywhere
            plus = torch.full_like(positions, self.plus_id)
            targets = torch.where(inputs["judgement_scores"].to(positions.device) > self.args.label_threshold, plus,
                                  torch.full_like(positions, self.minus_id))
            losses = hard_token_losses(out.judgement_logits, out.end_logits, targets, end_targets)
        return losses.mean(), plus_probability(out.judgement_logits.detach(), self.plus_id, self.minus_id)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, p_plus = self.judgement_loss(model, inputs)
        return (loss, {"p_plus": p_plus}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Loss, then P(+) and the scores as (batch, max steps) tables padded with -100, so the evaluation loop can
        pad, gather across processes (dropping repeated samples) and concatenate them by row."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss, p_plus = self.judgement_loss(model, inputs)
        if prediction_loss_only:
            return loss.detach(), None, None
        rows, steps = inputs["judgement_rows"], inputs["judgement_steps"]
        shape = (inputs["input_ids"].size(0), int(steps.max()) + 1)
        predictions = torch.full(shape, float(IGNORE), device=p_plus.device)
        labels = torch.full(shape, float(IGNORE), device=p_plus.device)
        predictions[rows, steps] = p_plus.float()
        labels[rows, steps] = inputs["judgement_scores"].float()
        return loss.detach(), predictions, labels


__all__ = ["VisualPRMTrainer"]
