"""`MPOTrainer`: TRL 1.16's `DPOTrainer` with the published Mixed Preference Optimization objective.

What it overrides (pinned to trl 1.16, checked by tests/test_trl_pins.py):
- `_compute_loss` for loss-type lists made of MPO terms: the BCO reward shift δ (dropped by TRL 0.29+) and
  per-term logging. Any other loss-type list goes to TRL's own `_compute_loss` unchanged.
- `_prepare_dataset` / `_set_signature_columns_if_needed`: rows are tokenized by `rlhf.collator` (InternVL tiling
  and image-token expansion), so TRL's text tokenization is skipped.
- `train` / `_save_checkpoint`: δ is saved in every checkpoint and restored on resume.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset
from safetensors import safe_open
from tqdm.auto import tqdm
from transformers import PreTrainedModel
from transformers.trainer_utils import get_last_checkpoint
from trl import DPOTrainer

from . import ref_cache
from .collator import ROW_COLUMNS, MPOCollator
from .losses import MPOTerm, implicit_rewards, mpo_losses, update_running_mean
from .mpo_config import MPOConfig, RewardShift

logger = logging.getLogger(__name__)
STATE_FILE = "mpo_state.json"


class MPOTrainer(DPOTrainer):
    """DPOTrainer for MPO. `train_dataset` is a `datasets.Dataset` of token rows (see `rlhf.data.build_rows`)."""

    _tag_names = ["trl", "mmalign", "mpo"]
    _name = "MPO"

    def __init__(self, model, ref_model=None, args: MPOConfig | None = None, data_collator=None,
                 train_dataset: Dataset | None = None, eval_dataset: Dataset | None = None,
                 processing_class=None, **kwargs: Any):
        args = args or MPOConfig(output_dir="mpo-output")
        if processing_class is None:
            raise ValueError("MPOTrainer needs `processing_class` (an InternVLChatProcessor or a tokenizer)")
        data_collator = data_collator or MPOCollator(processing_class, args.max_length)
        if ref_model is None and kwargs.get("peft_config") is None and not is_peft_model(model) \
                and not args.precompute_ref_log_probs:
            # The reference is a frozen copy of the initial policy (TRL would reload it from the model's path).
            ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        # Running mean and count of all rewards seen so far (float64, identical on every rank).
        self.reward_shift_mean = torch.zeros((), dtype=torch.float64)
        self.reward_shift_count = torch.zeros((), dtype=torch.float64)
        super().__init__(model, ref_model=ref_model, args=args, data_collator=data_collator,
                         train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, **kwargs)
        terms = set(self.loss_types) if hasattr(self, "loss_types") else set(args.loss_type)
        self._mpo_path = (
            terms <= {t.value for t in MPOTerm}
            and args.f_divergence_type == "reverse_kl"
            and args.ld_alpha is None
            and not args.use_weighting
        )
        if args.use_liger_kernels:
            from .liger import apply_liger_kernels

            apply_liger_kernels(self.model)

    # -- data -------------------------------------------------------------------------------------------------
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        missing = [c for c in ("prompt_ids", "chosen_ids", "rejected_ids") if c not in dataset.column_names]
        if missing:
            raise ValueError(f"{dataset_name} dataset lacks columns {missing}: build it with rlhf.data.build_rows")
        return dataset

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = [*ROW_COLUMNS, "ref_chosen_logps", "ref_rejected_logps"]

    def _precompute_ref_logps(self, dataset, name, batch_size):
        """Reference log-probs of every row, computed once and cached on disk (TRL 1.16 refuses this for image
        data); a cache whose data, weights or settings differ is recomputed. The reference model is not kept."""
        settings = {"max_length": self.args.max_length, "ld_alpha": self.args.ld_alpha,
                    "dtype": str(self.model.dtype), "split": name}
        key = ref_cache.cache_key(ref_cache.rows_fingerprint(dataset), self._precompute_model_hash, settings)
        path = ref_cache.cache_path(self.args.ref_logps_cache_dir or Path(self.args.output_dir) / "ref_logps", name, key)
        cached = ref_cache.load(path, key, len(dataset))
        if cached is None:
            chosen, rejected = self._compute_all_ref_logps(dataset, name, batch_size)
            if self.accelerator.is_main_process:
                ref_cache.save(path, key, chosen, rejected, settings)
            self.accelerator.wait_for_everyone()
        else:
            logger.info("%s: reference log-probs read from %s", name, path)
            chosen, rejected = cached
        return dataset.add_column("ref_chosen_logps", chosen.tolist()).add_column(
            "ref_rejected_logps", rejected.tolist())

    def _compute_all_ref_logps(self, dataset, name, batch_size):
        loader = self.accelerator.prepare(torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, collate_fn=self.data_collator, shuffle=False))
        model = self.ref_model if self.ref_model is not None else self.model
        chosen, rejected = [], []
        for batch in tqdm(loader, desc=f"reference log-probs ({name})", disable=not self.accelerator.is_main_process):
            c, r = self.accelerator.gather_for_metrics(self.compute_ref_log_probs(model, batch))
            chosen.append(c.float().cpu())
            rejected.append(r.float().cpu())
        return torch.cat(chosen), torch.cat(rejected)

    def _send_telemetry(self):
        """mmalign sends nothing anywhere."""

    # -- loss -------------------------------------------------------------------------------------------------
    def update_reward_shift(self, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
        """δ before use: fold this step's rewards (summed over all ranks) into the cumulative mean."""
        rewards = torch.cat([chosen_rewards, rejected_rewards]).detach().double()
        stats = torch.stack([rewards.sum(), rewards.new_tensor(rewards.numel())])
        stats = self.accelerator.reduce(stats, reduction="sum").cpu()
        self.reward_shift_mean, self.reward_shift_count = update_running_mean(
            self.reward_shift_mean, self.reward_shift_count, stats[0], stats[1]
        )
        return self.reward_shift_mean.to(chosen_rewards.device, chosen_rewards.dtype)

    def _compute_loss(self, model, inputs, return_outputs):
        if not self._mpo_path or return_outputs:
            return super()._compute_loss(model, inputs, return_outputs)
        mode = "train" if self.model.training else "eval"
        model_kwargs = {k: v for k, v in inputs.items()
                        if k not in ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")}
        model_kwargs["use_cache"] = False
        completion_mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
        shift_mask = completion_mask[:, 1:]
        per_token_logps = outputs.log_probs[:, -shift_mask.size(1):]
        chosen_logps, rejected_logps = per_token_logps.sum(dim=1).chunk(2)
        if self.precompute_ref_logps:
            ref_chosen_logps, ref_rejected_logps = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_model = self.ref_model if self.ref_model is not None else self.model
            ref_chosen_logps, ref_rejected_logps = self.compute_ref_log_probs(ref_model, inputs)
        chosen_rewards = implicit_rewards(chosen_logps, ref_chosen_logps, self.beta)
        rejected_rewards = implicit_rewards(rejected_logps, ref_rejected_logps, self.beta)
        delta = chosen_rewards.new_zeros(())
        if self.args.reward_shift == RewardShift.RUNNING_MEAN and MPOTerm.QUALITY.value in self.loss_types:
            delta = self.update_reward_shift(chosen_rewards, rejected_rewards)
        loss, terms = mpo_losses(
            chosen_rewards, rejected_rewards, delta,
            per_token_logps.chunk(2)[0], shift_mask.chunk(2)[0],
            self.loss_types, self.loss_weights,
        )
        self.log_mpo_metrics(mode, terms, delta, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps)
        return loss

    def log_mpo_metrics(self, mode, terms, delta, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps):
        gather = self.accelerator.gather_for_metrics
        metrics = self._metrics[mode]
        chosen_rewards, rejected_rewards = gather(chosen_rewards.detach()), gather(rejected_rewards.detach())
        metrics["rewards/chosen"].append(chosen_rewards.mean().item())
        metrics["rewards/rejected"].append(rejected_rewards.mean().item())
        metrics["rewards/accuracies"].append((chosen_rewards > rejected_rewards).float().mean().item())
        metrics["rewards/margins"].append((chosen_rewards - rejected_rewards).mean().item())
        metrics["logps/chosen"].append(gather(chosen_logps.detach()).mean().item())
        metrics["logps/rejected"].append(gather(rejected_logps.detach()).mean().item())
        for name, value in terms.items():
            metrics[f"mpo/{name}"].append(self.accelerator.reduce(value.detach(), reduction="mean").item())
        metrics["mpo/reward_shift"].append(float(delta))

    # -- state ------------------------------------------------------------------------------------------------
    def mpo_state(self) -> dict[str, float]:
        return {"reward_shift_mean": float(self.reward_shift_mean), "reward_shift_count": float(self.reward_shift_count)}

    def load_mpo_state(self, checkpoint: str | os.PathLike) -> None:
        path = Path(checkpoint) / STATE_FILE
        if not path.is_file():
            logger.warning("%s has no %s: the reward shift starts from 0", checkpoint, STATE_FILE)
            return
        state = json.loads(path.read_text())
        self.reward_shift_mean = torch.tensor(state["reward_shift_mean"], dtype=torch.float64)
        self.reward_shift_count = torch.tensor(state["reward_shift_count"], dtype=torch.float64)

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = Path(self._get_output_dir(trial)) / f"checkpoint-{self.state.global_step}"
            (folder / STATE_FILE).write_text(json.dumps(self.mpo_state(), indent=2) + "\n")

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """transformers 5 saves some architectures (InternVL among them) under their legacy key names, which the
        Trainer's resume path loads with `load_state_dict(strict=False)` and so silently drops. Load such
        checkpoints through `from_pretrained`, which maps the names back."""
        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        weights = Path(resume_from_checkpoint) / "model.safetensors"
        if weights.is_file() and isinstance(target, PreTrainedModel) and not is_peft_model(target) \
                and not self.is_fsdp_enabled:
            with safe_open(str(weights), "pt") as f:
                saved_keys = set(f.keys())
            if saved_keys != set(target.state_dict()):
                fresh = type(target).from_pretrained(resume_from_checkpoint, dtype=target.dtype)
                target.load_state_dict(fresh.state_dict(), strict=True)
                return
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"no checkpoint found in {self.args.output_dir} to resume from")
        if resume_from_checkpoint:
            self.load_mpo_state(resume_from_checkpoint)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
