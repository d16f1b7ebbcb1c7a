"""`MPOConfig`: TRL's `DPOConfig` with the published MPO defaults and mmalign's options."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from trl import DPOConfig

from .args import SettingError
from .choices import ROW_OVERFLOW, OverflowAction
from .losses import MPO_LOSS_TYPES, MPO_LOSS_WEIGHTS, RewardShift

# the loss types DPOTrainer.dpo_loss of the pinned TRL series (1.16) computes
TRL_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")


@dataclass
class MPOConfig(DPOConfig):
    """`DPOConfig` for Mixed Preference Optimization. Defaults follow the InternVL3 MPO recipe:
    `loss_type=["sigmoid", "bco_pair", "sft"]`, `loss_weights=[0.8, 0.2, 1.0]`, `beta=0.1`, and the BCO reward
    shift δ as a running mean synchronised across ranks and saved in checkpoints."""

    loss_type: list[str] = field(
        default_factory=lambda: list(MPO_LOSS_TYPES),
        metadata={"help": "Loss terms; MPO is sigmoid (preference) + bco_pair (quality) + sft (generation). Any "
                  "list TRL 1.16 accepts works."},
    )
    loss_weights: list[float] | None = field(
        default_factory=lambda: list(MPO_LOSS_WEIGHTS),
        metadata={"help": "Weights of `loss_type`, in order (MPO: 0.8, 0.2, 1.0)."},
    )
    reward_shift: str = field(
        default=RewardShift.RUNNING_MEAN.value,
        metadata={"help": "BCO reward shift δ: " + ", ".join(f"'{r.value}'" for r in RewardShift)
                  + ". 'running_mean' is the published MPO (cumulative mean of each rank's per-step batch mean of "
                  "rewards); 'reward_mean' (ours) weights every reward instead; 'none' is TRL 1.16's δ = 0.",
                  "choices": [r.value for r in RewardShift]},
    )
    on_overflow: str = field(
        default=OverflowAction.SKIP.value,
        metadata={"help": "A sample whose prompt + image tokens do not fit `max_length`: "
                  + ", ".join(f"'{a.value}'" for a in ROW_OVERFLOW) + ". Never truncated through image tokens.",
                  "choices": [a.value for a in ROW_OVERFLOW]},
    )
    skip_invalid: bool = field(
        default=False,
        metadata={"help": "Write invalid records to `rejects.jsonl` in the output dir and train on the rest, "
                  "instead of stopping with the list of problems."},
    )
    max_dynamic_patch: int = field(
        default=12,
        metadata={"help": "Default tile budget per sample (a data set's meta.json entry may override it)."},
    )
    pack_pairs: bool = field(
        default=True,
        metadata={"help": "Run each pair as one [prompt | chosen | rejected] sequence with a 4-D attention mask, so the "
                  "vision tower and the prompt run once per pair (needs sdpa, eager or flex attention)."},
    )
    fused_loss: bool = field(
        default=True,
        metadata={"help": "Compute the LM head and every MPO term in token chunks (rlhf.fused): no logits are "
                  "materialised, and extra memory does not grow with completion length x vocabulary."},
    )
    loss_chunk_tokens: int = field(default=1024, metadata={"help": "Tokens per chunk of the fused MPO loss."})
    loss_vocab_tile: int = field(default=8192, metadata={
        "help": "Vocabulary columns per block of the fused MPO loss: its largest buffer is loss_chunk_tokens x "
                "this many fp32 values (>= the vocabulary: one block, no recomputation)."})
    ref_logps_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Where `precompute_ref_log_probs` caches reference log-probs (default: OUTPUT_DIR/ref_logps); "
                  "a cache made for other data, weights or settings is recomputed."},
    )
    use_liger_kernels: bool = field(
        default=False,
        metadata={"help": "Apply Liger-Kernel's layer kernels (RMSNorm, SwiGLU, RoPE) on CUDA; GPU-only."},
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "Recompute activations in the backward pass to save memory."},
    )
    bf16: bool | None = field(default=None, metadata={"help": "bf16 mixed precision (default: on when CUDA is there)."})

    def __post_init__(self):
        import torch

        if self.bf16 is None:
            self.bf16 = torch.cuda.is_available()
        if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            self.use_cpu = True  # several CPU processes (torchrun / accelerate launch): DDP over gloo
        loss_types = [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)
        for i, name in enumerate(loss_types):
            if name not in TRL_LOSS_TYPES:
                raise SettingError("loss_type", f"loss types among {', '.join(TRL_LOSS_TYPES)} (entry {i})", name)
        for name in ("loss_chunk_tokens", "loss_vocab_tile"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SettingError(name, "an integer >= 1", value)
        for i, w in enumerate(self.loss_weights or []):
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise SettingError("loss_weights", f"finite numbers >= 0 (entry {i})", w)
        super().__post_init__()
        self.reward_shift = RewardShift(self.reward_shift).value
        if self.on_overflow not in ROW_OVERFLOW:
            raise ValueError(f"{self.on_overflow!r} is not a valid OverflowAction")
        self.on_overflow = OverflowAction(self.on_overflow).value
        if self.loss_weights is None:
            self.loss_weights = [1.0] * len(self.loss_type)
        for name, value in [("beta", self.beta), *[(f"loss_weights[{i}]", w) for i, w in enumerate(self.loss_weights)]]:
            if not math.isfinite(value):
                raise ValueError(f"MPOConfig.{name} must be a finite number, got {value}")
        if self.beta <= 0:
            raise ValueError(f"MPOConfig.beta must be > 0, got {self.beta}")
