"""Run by tests/test_mpo_distributed.py under `torch.distributed.run --nproc_per_node 2` (gloo on CPU):
per-device batch 1 over records that alternate image / text-only, so one rank's batch has an image while the
other's is text-only. Each rank writes its δ after every step."""

import json
import os
import sys
from pathlib import Path

import torch
from datasets import Dataset
from transformers import TrainerCallback

from rlhf.collator import record_to_row
from rlhf.mpo_config import MPOConfig
from rlhf.mpo_trainer import MPOTrainer
from rlhf.tiny import build_internvl, build_processor
from tests.conftest import make_records


class RecordShift(TrainerCallback):
    def __init__(self, trainer_ref):
        self.trainer_ref = trainer_ref
        self.history = []

    def on_step_end(self, args, state, control, **kwargs):
        self.history.append(float(self.trainer_ref[0].reward_shift.mean))


def main(out: str) -> None:
    out_dir = Path(out)
    processor = build_processor()
    rows = Dataset.from_list([record_to_row(r, processor) for r in make_records(out_dir / f"data{os.environ.get('LOCAL_RANK', 0)}", 8)])
    model = build_internvl(processor, seed=0)
    args = MPOConfig(output_dir=str(out_dir / "run"), per_device_train_batch_size=1, max_steps=4, report_to=[],
                     save_strategy="no", logging_steps=1, learning_rate=1e-3, seed=0, max_length=512)
    ref = [None]
    callback = RecordShift(ref)
    trainer = MPOTrainer(model, args=args, train_dataset=rows, processing_class=processor, callbacks=[callback])
    ref[0] = trainer
    trainer.train()
    rank = trainer.accelerator.process_index
    (out_dir / f"rank{rank}.json").write_text(json.dumps({
        "world_size": trainer.accelerator.num_processes,
        "shift": callback.history,
        "count": float(trainer.reward_shift.count),
        "param_sum": float(sum(p.detach().double().sum() for p in trainer.model.parameters())),
    }))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
