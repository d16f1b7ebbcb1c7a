"""Training a VisualPRM-style generative process reward model (reference section 3).

One solution is one multi-turn conversation (`reward.prm_data`): each step is a user turn and the model answers
`+` or `-`. Training is SFT on the assistant turns: the judgement token and its `<|im_end|>`, nothing else.

The LM head runs on the supervised positions only. For a judgement token at position p the hidden state at p - 1
predicts it and the one at p predicts its `<|im_end|>`; `judgement_logits` runs the backbone (`model.model`),
gathers those 2N rows and applies `model.lm_head` to them alone, so no (batch, seq, vocab) logits exist.
`add_judgement_head` routes that computation through the model's own `forward` (a `judgement_rows=` argument), so
DDP / DeepSpeed wrappers see a normal forward call, as TRL's `add_fused_lm_head` does.

Two label modes (`LabelMode`):
- hard (published): cross-entropy over the full vocabulary for the `+`/`-` token and for `<|im_end|>`, averaged
  over the supervised tokens. `+` iff the Monte Carlo score > `label_threshold` (0: any correct continuation).
- soft (mmalign's own, not in the paper): binary cross-entropy between P(`+`) renormalised over {`+`, `-`} and the
  Monte Carlo score, plus the same `<|im_end|>` cross-entropy, averaged over the supervised tokens.

`VisualPRMTrainer` subclasses `transformers.Trainer` (TRL 1.16 has no PRM trainer) and overrides `compute_loss`
and `prediction_step`; evaluation reports step accuracy, precision/recall/F1 of the `-` class, expected calibration
error and Brier score of P(`+`) through `compute_metrics` (pinned to transformers 5.23's evaluation loop).
"""

from __future__ import annotations

import functools
import math
import os
import types
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import EvalPrediction, Trainer, TrainingArguments
from transformers.utils import ModelOutput

from rlhf.errors import UserError
from rlhf.processing import InternVLChatProcessor

from .conversation import PRM_SYSTEM_PROMPT
from .prm_data import encode_prm, judgement_ids

ROW_COLUMNS = ["input_ids", "judgement_positions", "scores", "image_paths", "max_patches", "source"]
IGNORE = -100  # padding of per-step prediction tables (the value transformers' evaluation loop pads with)


class LabelMode(StrEnum):
    """What the judgement token is trained towards."""

    HARD = "hard"  # published: cross-entropy on `+`/`-` (score > threshold)
    SOFT = "soft"  # mmalign: BCE of P(+) over {+, -} against the Monte Carlo score


class OverflowAction(StrEnum):
    """What happens to a solution longer than `max_length` tokens."""

    TRUNCATE = "truncate"  # keep the steps that fit (a solution whose first step does not fit is skipped, reported)
    SKIP = "skip"  # leave the whole solution out (reported)
    ERROR = "error"  # stop before training


class PRMConfigError(UserError, ValueError):
    """A bad `VisualPRMConfig` value (one line)."""


def _choices(enum: type[StrEnum]) -> str:
    return ", ".join(f"'{e.value}'" for e in enum)


@dataclass
class VisualPRMConfig(TrainingArguments):
    """`TrainingArguments` for the VisualPRM objective, with CPU-friendly defaults (bf16 only with CUDA)."""

    label_mode: str = field(default=LabelMode.HARD.value, metadata={
        "help": f"Judgement target: {_choices(LabelMode)}. 'hard' is the published VisualPRM objective; 'soft' "
                "(mmalign's own) fits P(+) to the Monte Carlo score.", "choices": [m.value for m in LabelMode]})
    label_threshold: float = field(default=0.0, metadata={
        "help": "A step is `+` iff its Monte Carlo score > this (published: 0, any correct continuation)."})
    max_length: int | None = field(default=8192, metadata={
        "help": "Longest conversation in tokens (text + image tokens); see `on_overflow`."})
    on_overflow: str = field(default=OverflowAction.TRUNCATE.value, metadata={
        "help": f"A solution longer than `max_length`: {_choices(OverflowAction)}. Never cut through a step.",
        "choices": [a.value for a in OverflowAction]})
    max_dynamic_patch: int = field(default=12, metadata={
        "help": "Tile budget per sample; a sample with k images gets max(1, max_dynamic_patch // k) per image."})
    max_steps_per_solution: int | None = field(default=None, metadata={
        "help": "Merge the steps of longer solutions evenly, k = ceil(n / max) consecutive steps per merged step "
                "(the rule of reward.steps.split_steps; VisualPRM used 12, 16 for the InternVL3 data)."})
    judgement_context: str = field(default="label", metadata={
        "help": "What earlier judgement tokens hold in a training row: 'label' (published: the true labels, teacher "
                "forcing) or 'plus' (ours: every earlier judgement written as '+', exactly what PRMScorer feeds at "
                "inference; stops the PRM from copying the previous label, a shortcut scoring cannot use)."})
    question_template: str = field(default="auto", metadata={
        "help": "The question in a row's first turn: 'auto' (InternVL's VisualPRM rows hold the instruction-wrapped "
                "prompt the policy saw: a record with 'question_orig' as written, one whose meta names its "
                "'prompt_template' wrapped with it, any other as written), 'none', or a template name "
                "(reward.prompts.PromptTemplate) or format string to wrap every question with."})
    reward_level: str = field(default="process", metadata={
        "help": "'process' (VisualPRM: one judgement per step) or 'outcome' (the outcome-reward variant of "
                "InternVL's pipeline: the whole solution in one turn, judged by its last step's label).",
        "choices": ["process", "outcome"]})
    system_prompt: str = field(default=PRM_SYSTEM_PROMPT, metadata={
        "help": "The system turn of every training row (default: the published PRM prompt, which the released "
                "checkpoint expects); '' for none. Score with the same one (PRMScorer system, bon --system_prompt)."})
    calibration_bins: int = field(default=10, metadata={"help": "Equal-width bins of the expected calibration error."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Rows are pre-tokenized; keep every column."})
    bf16: bool | None = field(default=None, metadata={"help": "bf16 mixed precision (default: on when CUDA is there)."})

    def __post_init__(self):
        if self.bf16 is None:
            self.bf16 = torch.cuda.is_available()
        if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            self.use_cpu = True  # several CPU processes: DDP over gloo
        for name, enum in (("label_mode", LabelMode), ("on_overflow", OverflowAction)):
            value = getattr(self, name)
            if value not in {e.value for e in enum}:
                raise PRMConfigError(f"VisualPRMConfig.{name} must be one of {_choices(enum)}, got {value!r}")
            setattr(self, name, enum(value).value)
        if self.reward_level not in ("process", "outcome"):
            raise PRMConfigError(f"VisualPRMConfig.reward_level must be 'process' or 'outcome', got "
                                 f"{self.reward_level!r}")
        if self.judgement_context not in ("label", "plus"):
            raise PRMConfigError(f"VisualPRMConfig.judgement_context must be 'label' or 'plus', got "
                                 f"{self.judgement_context!r}")
        t = self.label_threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or not 0.0 <= t < 1.0:
            raise PRMConfigError(f"VisualPRMConfig.label_threshold must be a number in [0, 1), got {t!r}")
        for name, low, optional in (("max_length", 8, True), ("max_dynamic_patch", 1, False),
                                    ("max_steps_per_solution", 1, True), ("calibration_bins", 1, False)):
            value = getattr(self, name)
            if value is None and optional:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                extra = " or None" if optional else ""
                raise PRMConfigError(f"VisualPRMConfig.{name} must be an integer >= {low}{extra}, got {value!r}")
        super().__post_init__()


# -- loss math (pure) ------------------------------------------------------------------------------------------------


def plus_probability(judgement_logits: torch.Tensor, plus_id: int, minus_id: int) -> torch.Tensor:
    """P(`+`) renormalised over {`+`, `-`}: softmax of the two logits = sigmoid(logit(+) - logit(-)). (N, V) -> (N,)"""
    logits = judgement_logits.float()
    return torch.sigmoid(logits[:, plus_id] - logits[:, minus_id])


def hard_token_losses(judgement_logits: torch.Tensor, end_logits: torch.Tensor, judgement_targets: torch.Tensor,
                      end_targets: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary cross-entropy of each supervised token: N judgement tokens, then N `<|im_end|>`. -> (2N,)"""
    logits = torch.cat([judgement_logits, end_logits]).float()
    return F.cross_entropy(logits, torch.cat([judgement_targets, end_targets]), reduction="none")


def soft_token_losses(judgement_logits: torch.Tensor, end_logits: torch.Tensor, scores: torch.Tensor,
                      end_targets: torch.Tensor, plus_id: int, minus_id: int) -> torch.Tensor:
    """BCE(P(+) over {+, -}, Monte Carlo score) per judgement, then the `<|im_end|>` cross-entropy. -> (2N,)"""
    logits = judgement_logits.float()
    margin = logits[:, plus_id] - logits[:, minus_id]  # sigmoid(margin) = P(+) renormalised
    bce = F.binary_cross_entropy_with_logits(margin, scores.to(margin.dtype), reduction="none")
    return torch.cat([bce, F.cross_entropy(end_logits.float(), end_targets, reduction="none")])


def gather_rows(hidden: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """`hidden[rows[i], positions[i]]` for each i: (B, T, H) -> (N, H)."""
    return hidden[rows, positions]


# -- evaluation metrics (pure) ---------------------------------------------------------------------------------------


def step_metrics(p_plus: torch.Tensor, positive: torch.Tensor, bins: int = 10) -> dict[str, float]:
    """Step-level metrics of P(`+`) against the true labels (`positive`: True for `+`).

    A step is predicted `-` iff P(+) < 0.5. Precision/recall/F1 are those of the `-` class (the error-finding
    class; 0 when undefined). ECE: P(+) in `bins` equal-width bins ([0, 0.1), ..., [0.9, 1.0]), the count-weighted
    mean of |mean P(+) - fraction of `+`| per bin. Brier: mean (P(+) - y)^2 with y = 1 for `+`.
    """
    p = p_plus.double().flatten()
    y = positive.bool().flatten()
    n = p.numel()
    if n == 0:
        return {"step_accuracy": 0.0, "minus_precision": 0.0, "minus_recall": 0.0, "minus_f1": 0.0, "ece": 0.0,
                "brier": 0.0, "num_steps": 0.0}
    pred_minus, true_minus = p < 0.5, ~y
    tp = (pred_minus & true_minus).sum().item()
    precision = tp / max(pred_minus.sum().item(), 1)
    recall = tp / max(true_minus.sum().item(), 1)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    which = torch.clamp((p * bins).floor().long(), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            ece += in_bin.sum().item() / n * abs(p[in_bin].mean().item() - y[in_bin].double().mean().item())
    return {
        "step_accuracy": (pred_minus == true_minus).double().mean().item(),
        "minus_precision": precision,
        "minus_recall": recall,
        "minus_f1": f1,
        "ece": ece,
        "brier": ((p - y.double()) ** 2).mean().item(),
        "num_steps": float(n),
    }


def prm_eval_metrics(prediction: EvalPrediction, threshold: float = 0.0, bins: int = 10) -> dict[str, float]:
    """`compute_metrics` for the Trainer: predictions are per-row P(+) tables, label_ids the per-row scores, both
    padded with -100 (see `VisualPRMTrainer.prediction_step`)."""
    p, scores = (torch.as_tensor(x) for x in (prediction.predictions, prediction.label_ids))
    keep = scores != IGNORE
    return step_metrics(p[keep], scores[keep] > threshold, bins)


# -- the position-only LM head ---------------------------------------------------------------------------------------


@dataclass
class JudgementOutput(ModelOutput):
    """Logits predicting each judgement token (N, V) and each judgement's `<|im_end|>` (N, V)."""

    judgement_logits: torch.Tensor | None = None
    end_logits: torch.Tensor | None = None


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


# -- rows and batches ------------------------------------------------------------------------------------------------


def encode_row(processing_class, question: str, steps: list[str], labels: list[bool] | list[float],
               image_paths: list[str], max_patches: int, threshold: float = 0.0, source: str = "",
               system: str | None = PRM_SYSTEM_PROMPT, plus_context: bool = False) -> dict[str, Any]:
    """One training row: the conversation ids (`+` iff label > threshold; every judgement `+` with `plus_context`),
    judgement positions, scores (1/0 for hard labels, the Monte Carlo score for soft ones) and what the collator needs
    to load pixels."""
    tiles = []
    if image_paths:
        if not isinstance(processing_class, InternVLChatProcessor):
            raise UserError(f"{source}: a sample with images needs an InternVL model and processor, got a text-only "
                            "tokenizer")
        for path in image_paths:
            with Image.open(path) as img:  # the header only
                tiles.append(processing_class.image_processor.num_tiles(*img.size, max_patches))
    enc = encode_prm(processing_class, question, steps, labels, num_tiles=tiles, system=system, threshold=threshold)
    ids = enc.input_ids
    if plus_context:
        ids = encode_prm(processing_class, question, steps, None, num_tiles=tiles, system=system).input_ids
    return {"input_ids": ids, "judgement_positions": enc.judgement_positions, "scores": enc.labels,
            "image_paths": list(image_paths), "max_patches": max_patches if image_paths else 0, "source": source}


def _tokenizer(processing_class):
    return processing_class.tokenizer if isinstance(processing_class, InternVLChatProcessor) else processing_class


@dataclass
class PRMCollator:
    """Right-pads rows and loads their images as InternVL tiles. Per judgement (N in the batch, row-major):
    `judgement_rows`, `judgement_steps` (index within its row), `judgement_positions`, `judgement_scores`."""

    processing_class: Any

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pad = _tokenizer(self.processing_class).pad_token_id
        width = max(len(r["input_ids"]) for r in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
            attention_mask[i, : len(r["input_ids"])] = 1
        per_step = [(i, s, p, float(score)) for i, r in enumerate(rows)
                    for s, (p, score) in enumerate(zip(r["judgement_positions"], r["scores"], strict=True))]
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}  # input_ids first: the batch size
        for k, key in enumerate(("judgement_rows", "judgement_steps", "judgement_positions")):
            batch[key] = torch.tensor([x[k] for x in per_step], dtype=torch.long)
        batch["judgement_scores"] = torch.tensor([x[3] for x in per_step], dtype=torch.float32)
        tiles = []
        for r in rows:
            for path in r["image_paths"]:
                with Image.open(path) as img:
                    tiles.extend(self.processing_class.image_processor.tiles(img.convert("RGB"), r["max_patches"]))
        if tiles:
            batch["pixel_values"] = self.processing_class.image_processor.to_tensor(tiles)
        return batch


# -- the trainer -----------------------------------------------------------------------------------------------------


class VisualPRMTrainer(Trainer):
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

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = list(ROW_COLUMNS)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """Resume checkpoints saved under legacy weight names (InternVL in transformers 5) through
        `from_pretrained` (`rlhf.checkpoint`); the Trainer's own loading would drop those weights silently."""
        from rlhf.checkpoint import load_renamed_checkpoint

        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        if not load_renamed_checkpoint(target, resume_from_checkpoint, fsdp=self.is_fsdp_enabled):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

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


__all__ = ["LabelMode", "OverflowAction", "VisualPRMConfig", "VisualPRMTrainer", "PRMCollator", "PRMConfigError",
           "encode_row", "judgement_logits", "add_judgement_head", "plus_probability", "hard_token_losses",
           "soft_token_losses", "step_metrics", "prm_eval_metrics", "ROW_COLUMNS"]
