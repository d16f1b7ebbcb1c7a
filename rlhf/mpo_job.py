"""`mmalign mpo --config RECIPE.yaml`: MPO training from MMPR or TRL-format preference data."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError
from .mpo_config import MPOConfig

logger = logging.getLogger("mmalign.mpo")


@dataclass
class MPOScriptArguments:
    data: str = field(metadata={"help": "MMPR meta.json, or a TRL preference file (.json/.jsonl/.parquet)."})
    eval_data: str | None = field(default=None, metadata={"help": "Held-out data in the same formats."})
    image_root: str | None = field(default=None, metadata={"help": "Root for relative image paths of a TRL file."})
    system_prompt: str | None = field(default=None, metadata={
        "help": "System turn of every sample without one: 'internvl2_5' (InternVL2.5/3's default system message, "
                "what InternVL's MPO training uses; the InternVL recipes set it), any other text as written, or "
                "''/null for none."})
    drop_path: float = field(default=0.0, metadata={
        "help": "Stochastic depth on the vision tower, InternViT's linear ramp up to this rate at the last layer "
                "(rlhf.drop_path); the released InternVL3 MPO runs use 0.1."})
    data_root: str | None = field(default=None, metadata={
        "help": "Folder that relative root/annotation paths of a meta.json resolve against (default: the working "
                "directory as InternVL, then meta.json's folder)."})
    repeat_seed: int = field(default=0, metadata={"help": "Seed of the fractional `repeat_time` subsampling."})


def parse(argv: list[str]):
    from trl import ModelConfig

    from .args import parse_job_args

    return parse_job_args((MPOScriptArguments, MPOConfig, ModelConfig), argv, "mmalign mpo")


def read_records(path: str, args: MPOConfig, script: MPOScriptArguments):
    from .data.mmpr import is_mmpr_meta, read_mmpr
    from .data.trl_format import read_preference_dataset

    if Path(path).name.endswith("meta.json") or is_mmpr_meta(path):
        return read_mmpr(path, default_max_dynamic_patch=args.max_dynamic_patch, seed=script.repeat_seed,
                         data_root=script.data_root)
    return read_preference_dataset(path, image_root=script.image_root)


def prepare_rows(path: str, processing_class, args: MPOConfig, script: MPOScriptArguments, split: str):
    """Read, validate (every record, before the first step), tokenize and length-check one data set."""
    from datasets import Dataset

    from .collator import build_rows
    from .data.validate import split_valid, validate_records
    from .processing import resolve_system_prompt

    records = read_records(path, args, script)
    problems = validate_records(records)
    rejects = Path(args.output_dir) / f"rejects.{split}.jsonl"
    records = split_valid(records, problems, skip_invalid=args.skip_invalid, rejects_path=rejects)
    rows = build_rows(records, processing_class, max_length=args.max_length, on_overflow=args.on_overflow,
                      rejects_path=rejects, default_max_patches=args.max_dynamic_patch,
                      system=resolve_system_prompt(script.system_prompt))
    if not rows:
        raise UserError(f"{path}: no trainable records left after validation")
    logger.info("%s: %d training rows from %s", split, len(rows), path)
    return Dataset.from_list(rows)


def main(argv: list[str]) -> int:
    from trl import get_peft_config, get_quantization_config

    from .models import load_model_and_processor, save_model_and_processor
    from .mpo_trainer import MPOTrainer

    script, args, model_args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    quantization = get_quantization_config(model_args)
    model, processing_class = load_model_and_processor(
        model_args.model_name_or_path,
        dtype=model_args.dtype,
        attn_implementation=model_args.attn_implementation,
        trust_remote_code=args.trust_remote_code,
        seed=args.seed,
        **({"quantization_config": quantization} if quantization is not None else {}),
    )
    if script.drop_path:
        from .drop_path import add_vision_drop_path

        if not add_vision_drop_path(model, script.drop_path):
            logger.info("drop_path %s: the model has no vision tower, nothing to drop", script.drop_path)
    train = prepare_rows(script.data, processing_class, args, script, "train")
    evaluation = prepare_rows(script.eval_data, processing_class, args, script, "eval") if script.eval_data else None
    trainer = MPOTrainer(model, args=args, train_dataset=train, eval_dataset=evaluation,
                         processing_class=processing_class, peft_config=get_peft_config(model_args))
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    final = Path(args.output_dir) / "final"
    model_to_save = trainer.model.merge_and_unload() if hasattr(trainer.model, "merge_and_unload") else trainer.model
    save_model_and_processor(model_to_save, processing_class, final)
    trainer.write_extra_state(final)  # δ's running statistics, mpo_state.json as in every checkpoint
    from .plots import plot_mpo_history

    plot_mpo_history(trainer.state.log_history, Path(args.output_dir) / "mpo_training.png")
    logger.info("saved %s", final)
    return 0
