"""`VisualPRMConfig`: the `TrainingArguments` of VisualPRM training (reference section 3), and its choice lists.

Two label modes (`LabelMode`):
- hard (published): cross-entropy over the full vocabulary for the `+`/`-` token and for `<|im_end|>`, averaged
  over the supervised tokens. `+` iff the Monte Carlo score > `label_threshold` (0: any correct continuation).
- soft (mmalign's own, not in the paper): binary cross-entropy between P(`+`) renormalised over {`+`, `-`} and the
  Monte Carlo score, plus the same `<|im_end|>` cross-entropy, averaged over the supervised tokens.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from enum import StrEnum

import torch
from transformers import TrainingArguments

from rlhf.choices import PRM_OVERFLOW, OverflowAction
from rlhf.errors import UserError

from .conversation import PRM_SYSTEM_PROMPT
from .step_settings import StepSettings
from .steps import compile_step_split


class LabelMode(StrEnum):
    """What the judgement token is trained towards."""

    HARD = "hard"  # published: cross-entropy on `+`/`-` (score > threshold)
    SOFT = "soft"  # mmalign: BCE of P(+) over {+, -} against the Monte Carlo score


class PRMConfigError(UserError, ValueError):
    """A bad `VisualPRMConfig` value (one line)."""


def _choices(members) -> str:
    return ", ".join(f"'{e.value}'" for e in members)


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
        "help": f"A solution longer than `max_length`: {_choices(PRM_OVERFLOW)}. Never cut through a step.",
        "choices": [a.value for a in PRM_OVERFLOW]})
    max_dynamic_patch: int = field(default=12, metadata={
        "help": "Tile budget per sample; a sample with k images gets max(1, max_dynamic_patch // k) per image."})
    max_steps_per_solution: int | None = field(default=None, metadata={
        "help": "Merge the steps of longer solutions evenly, k = ceil(n / max) consecutive steps per merged step "
                "(reward.steps.merge_steps; VisualPRM used 12, 16 for the InternVL3 data). Default: the data's "
                "step_settings (label-steps records them); given, every record that carries them must agree. Saved "
                "with the checkpoint (step_settings.json), so scoring splits as training did."})
    step_split: str | None = field(default=None, metadata={
        "help": "Ours: the pattern label-steps also cut steps with (its --step_split). Default: the data's "
                "step_settings; given ('' for none), every record that carries them must agree. Not applied to the "
                "data (their steps are cut already): saved with the checkpoint, so scoring cuts text the same way."})
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
                "checkpoint expects); '' for none. Saved with the checkpoint (step_settings.json) for scoring."})
    calibration_bins: int = field(default=10, metadata={"help": "Equal-width bins of the expected calibration error."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Rows are pre-tokenized; keep every column."})
    bf16: bool | None = field(default=None, metadata={"help": "bf16 mixed precision (default: on when CUDA is there)."})

    def __post_init__(self):
        if self.bf16 is None:
            self.bf16 = torch.cuda.is_available()
        if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            self.use_cpu = True  # several CPU processes: DDP over gloo
        for name, enum, members in (("label_mode", LabelMode, tuple(LabelMode)),
                                    ("on_overflow", OverflowAction, PRM_OVERFLOW)):
            value = getattr(self, name)
            if value not in {e.value for e in members}:
                raise PRMConfigError(f"VisualPRMConfig.{name} must be one of {_choices(members)}, got {value!r}")
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
        compile_step_split(self.step_split)
        super().__post_init__()

    @property
    def step_settings(self) -> StepSettings:
        """The PRM's step settings (`reward.step_settings`), as saved beside its weights."""
        return StepSettings(self.step_split, self.max_steps_per_solution, self.system_prompt)


__all__ = ["LabelMode", "PRMConfigError", "VisualPRMConfig"]
