"""`MPOTrainer`: TRL 1.16's `DPOTrainer` with the published Mixed Preference Optimization objective.

What it overrides (pinned to trl 1.16, checked by tests/test_trl_pins.py):
- `_compute_loss` for loss-type lists made of MPO terms: the BCO reward shift δ (dropped by TRL 0.29+) and
  per-term logging. Any other loss-type list goes to TRL's own `_compute_loss` unchanged.
- `_prepare_dataset` / `_set_signature_columns_if_needed`: a drop-in for DPOTrainer's data sets. TRL preference
  data (strings or conversations, with or without images) is converted here: with an InternVL processor through
  `rlhf.data` + `rlhf.collator` (validation, InternVL ChatML, tiling and image-token expansion), text-only with a
  plain tokenizer through DPOTrainer's own tokenization (token-identical rows). Image data sets, which DPOTrainer
  does not prepare up front, are converted before its `__init__`.
- `_compute_loss` also in evaluation: `evaluate()` reports the MPO loss with δ, with or without `compute_metrics`.
- resuming (`rlhf.checkpoint.ResumeMixin`): δ's running statistics are saved in every checkpoint (mpo_state.json)
  and restored on resume; checkpoints under legacy weight names load through `from_pretrained`.

δ is a `rlhf.losses.RewardShiftTracker` the trainer owns (`self.reward_shift`): handed down to the loss through the
MPO head, updated there from each forward's rewards before use, and read back here for the log.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset
from tqdm.auto import tqdm
from trl import DPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import use_adapter

from . import ref_cache
from .checkpoint import ResumeMixin
from .collator import ROW_COLUMNS, MPOCollator
from .losses import TERM_METRIC, MPOTerm, RewardShift, RewardShiftTracker
from .mpo_head import MPOHeadSpec, add_mpo_head
from .errors import UserError
from .packing import PackedPairCollator
from .mpo_config import MPOConfig

logger = logging.getLogger(__name__)
STATE_FILE = "mpo_state.json"


def _is_vision(dataset) -> bool:
    return "image" in dataset.column_names or "images" in dataset.column_names


class MPOTrainer(ResumeMixin, DPOTrainer):
    """DPOTrainer for MPO, a drop-in: `train_dataset` / `eval_dataset` are any data set DPOTrainer accepts (TRL's
    preference formats, with or without images) or token rows of `rlhf.collator.build_rows`; see
    `_prepare_dataset`."""

    _tag_names = ["trl", "mmalign", "mpo"]
    _name = "MPO"
    state_file = STATE_FILE

    def __init__(self, model, ref_model=None, args: MPOConfig | None = None, data_collator=None,
                 train_dataset: Dataset | None = None, eval_dataset: Dataset | None = None,
                 processing_class=None, **kwargs: Any):
        args = args or MPOConfig(output_dir="mpo-output")
        if processing_class is None:
            raise ValueError("MPOTrainer needs `processing_class` (an InternVLChatProcessor or a tokenizer)")
        self._mpo_path = (
            set(args.loss_type) <= {t.value for t in MPOTerm}
            and args.f_divergence_type == "reverse_kl"
            and args.ld_alpha is None
            and not args.use_weighting
        )
        if not self._mpo_path:
            unused = [name for name in ("pack_pairs", "fused_loss") if getattr(args, name)]
            if unused:
                logger.warning("MPOTrainer: loss_type %s (or f_divergence_type / ld_alpha / use_weighting) runs "
                               "TRL's own loss, without %s; set %s false to silence this", list(args.loss_type),
                               " and ".join(unused), " and ".join(unused))
        if data_collator is None:
            packed = self._mpo_path and args.pack_pairs
            data_collator = (PackedPairCollator if packed else MPOCollator)(processing_class, args.max_length)
        if ref_model is None and kwargs.get("peft_config") is None and not is_peft_model(model) \
                and not args.precompute_ref_log_probs:
            # The reference is a frozen copy of the initial policy (TRL would reload it from the model's path).
            ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        # DPOTrainer skips `_prepare_dataset` for image data sets (it tokenizes them per batch); rows are built here.
        if train_dataset is not None and not isinstance(train_dataset, dict) and _is_vision(train_dataset):
            train_dataset = self._prepare_dataset(train_dataset, processing_class, args, "train")
        if isinstance(eval_dataset, dict):
            eval_dataset = {k: self._prepare_dataset(d, processing_class, args, k) if _is_vision(d) else d
                            for k, d in eval_dataset.items()}
        elif eval_dataset is not None and _is_vision(eval_dataset):
            eval_dataset = self._prepare_dataset(eval_dataset, processing_class, args, "eval")
        for target in (model, ref_model):  # before TRL's init, which may already run reference passes
            if target is not None:
                add_mpo_head(target.get_base_model() if is_peft_model(target) else target)
        # δ, summed over ranks so that every rank holds the same (0 throughout without the quality term)
        shifted = self._mpo_path and MPOTerm.QUALITY.value in args.loss_type
        self.reward_shift = RewardShiftTracker(args.reward_shift if shifted else RewardShift.NONE,
                                               reduce=lambda stats: self.accelerator.reduce(stats, reduction="sum"))
        super().__init__(model, ref_model=ref_model, args=args, data_collator=data_collator,
                         train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, **kwargs)
        if args.use_liger_kernels:
            from .liger import apply_liger_kernels

            apply_liger_kernels(self.model)

    # -- data -------------------------------------------------------------------------------------------------
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        """Token rows from any data set DPOTrainer accepts, or the rows themselves (idempotent).

        - rows of `rlhf.collator.build_rows` (prompt_ids / chosen_ids / rejected_ids) are used as they are;
        - a TRL preference data set (`prompt` / `chosen` / `rejected` strings or conversations, implicit prompt,
          with or without `images` / `image`) with an InternVL processor: read, validated (every bad row reported,
          or skipped with `skip_invalid`), formatted as InternVL ChatML with `<image>` expanded to its tiles, as
          `mmalign mpo` does; in-memory images are written once to OUTPUT_DIR/images/<split>/;
        - a text-only TRL data set with a plain tokenizer: tokenized by DPOTrainer's own `_prepare_dataset` (chat
          template for conversations, raw text + EOS otherwise), so rows are token-identical to DPOTrainer's.
        """
        columns = dataset.column_names
        if all(c in columns for c in ("prompt_ids", "chosen_ids", "rejected_ids")):
            for column, default in (("image_paths", []), ("max_patches", 0), ("source", dataset_name), ("line", 0)):
                if column not in columns:
                    dataset = dataset.add_column(column, [default] * len(dataset))
            return dataset
        from .collator import build_rows
        from .data.trl_format import TRLField, read_preference_dataset
        from .data.validate import split_valid, validate_records
        from .processing import InternVLChatProcessor

        vision = TRLField.IMAGES in columns or TRLField.IMAGE in columns
        if not isinstance(processing_class, InternVLChatProcessor) and not vision:
            rows = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            return self._prepare_dataset(rows.remove_columns(
                [c for c in rows.column_names if c not in ("prompt_ids", "chosen_ids", "rejected_ids")]),
                processing_class, args, dataset_name)
        records = read_preference_dataset(dataset, name=dataset_name)
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        rejects = out / f"rejects.{dataset_name}.jsonl"
        records = split_valid(records, validate_records(records), skip_invalid=args.skip_invalid,
                              rejects_path=rejects)
        for record in records:  # the collator reads pixels from files, per batch
            if record.images:
                folder = out / "images" / dataset_name
                folder.mkdir(parents=True, exist_ok=True)
                record.image_paths = []
                for j, image in enumerate(record.images):
                    path = folder / f"{record.line}_{j}.png"
                    image.convert("RGB").save(path)
                    record.image_paths.append(str(path))
                record.images = []
        rows = build_rows(records, processing_class, max_length=args.max_length, on_overflow=args.on_overflow,
                          rejects_path=rejects, default_max_patches=args.max_dynamic_patch)
        if not rows:
            raise UserError(f"{dataset_name} dataset: no trainable rows left after validation")
        return Dataset.from_list(rows)

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
    def _head_spec(self, **overrides) -> MPOHeadSpec:
        return MPOHeadSpec(beta=self.beta, loss_types=list(self.loss_types), loss_weights=list(self.loss_weights),
                           fused=self.args.fused_loss, chunk_tokens=self.args.loss_chunk_tokens,
                           vocab_tile=self.args.loss_vocab_tile, **overrides)

    def compute_ref_log_probs(self, model, inputs):
        """Reference log-prob sums (chosen, rejected) through the MPO head: completion positions only, either
        batch layout, the adapter disabled for a PEFT policy."""
        if not self._mpo_path:
            return super().compute_ref_log_probs(model, inputs)
        batch = {k: v for k, v in inputs.items() if k not in ("ref_chosen_logps", "ref_rejected_logps")}
        adapter = contextlib.nullcontext()
        unwrapped = self.accelerator.unwrap_model(self.model)
        if self.ref_model is None and is_peft_model(unwrapped):
            adapter = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs), \
                adapter, self.accelerator.autocast():
            out = model(**batch, mpo=self._head_spec(reference=True))
        return out["chosen_logps"], out["rejected_logps"]

    def _compute_loss(self, model, inputs, return_outputs):
        """The MPO loss with δ, in training and in evaluation alike (TRL's `prediction_step` asks for
        `return_outputs=True` when `compute_metrics` is set: then the outputs' `logits` are the (chosen, rejected)
        rewards per pair, since neither layout materialises vocabulary logits)."""
        if not self._mpo_path:
            return super()._compute_loss(model, inputs, return_outputs)
        mode = "train" if self.model.training else "eval"
        if self.precompute_ref_logps:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_chosen, ref_rejected = self.compute_ref_log_probs(
                self.ref_model if self.ref_model is not None else self.model, inputs)
        batch = {k: v for k, v in inputs.items() if k not in ("ref_chosen_logps", "ref_rejected_logps")}
        out = model(**batch, mpo=self._head_spec(delta=self.reward_shift, ref_chosen_logps=ref_chosen,
                                                 ref_rejected_logps=ref_rejected))
        terms = {TERM_METRIC[MPOTerm(t)]: out[TERM_METRIC[MPOTerm(t)]] for t in self.loss_types}
        self.log_mpo_metrics(mode, terms, self.reward_shift.delta, out["chosen_rewards"],
                             out["rejected_rewards"], out["chosen_logps"], out["rejected_logps"])
        if return_outputs:
            return out["loss"], SimpleNamespace(logits=torch.stack([out["chosen_rewards"], out["rejected_rewards"]], 1))
        return out["loss"]

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

    # -- state (written and read by ResumeMixin) ---------------------------------------------------------------
    def extra_state(self) -> dict[str, float]:
        return self.reward_shift.state_dict()

    def load_extra_state(self, state: dict[str, float] | None, checkpoint: str | os.PathLike) -> None:
        if state is None:
            logger.warning("%s has no %s: the reward shift starts from 0", checkpoint, STATE_FILE)
            return
        self.reward_shift.load_state_dict(state)
