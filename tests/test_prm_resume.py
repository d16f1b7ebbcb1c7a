"""VisualPRMTrainer resumes from a checkpoint saved under InternVL's older weight names, as MPOTrainer does."""

from pathlib import Path

import pytest
from datasets import Dataset
from safetensors import safe_open

from reward.prm_config import VisualPRMConfig
from reward.prm_trainer import VisualPRMTrainer
from rlhf.tiny import build_internvl
from tests.test_prm_trainer import image_rows
from tests.conftest import stop_at_step


def run(tmp_path, name, rows, processor, stop_at=None, resume=None):
    args = VisualPRMConfig(output_dir=str(tmp_path / name), per_device_train_batch_size=2, max_steps=4, report_to=[],
                           logging_steps=1, save_strategy="steps", save_steps=2, learning_rate=3e-3, seed=0,
                           max_length=512, lr_scheduler_type="cosine", dataloader_num_workers=0)
    trainer = VisualPRMTrainer(build_internvl(processor, seed=0), args=args, train_dataset=rows,
                               processing_class=processor, callbacks=[stop_at_step(stop_at)] if stop_at else None)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_resume_from_a_checkpoint_with_legacy_weight_names(tmp_path, tiny_processor):
    rows = Dataset.from_list(image_rows(tmp_path, tiny_processor, soft=False) * 3)  # 9 solutions, images and text
    full = run(tmp_path, "full", rows, tiny_processor)
    run(tmp_path, "split", rows, tiny_processor, stop_at=2)
    checkpoint = Path(tmp_path / "split" / "checkpoint-2")
    with safe_open(str(checkpoint / "model.safetensors"), "pt") as f:
        saved = set(f.keys())
    assert saved != set(full.model.state_dict())  # InternVL's checkpoint names differ: the case being tested
    resumed = run(tmp_path, "split", rows, tiny_processor, resume=str(checkpoint))
    expected = {h["step"]: h["loss"] for h in full.state.log_history if "loss" in h}
    got = {h["step"]: h["loss"] for h in resumed.state.log_history if "loss" in h}
    assert sorted(got) == [1, 2, 3, 4]
    for step in (3, 4):  # the resumed run continues from the trained weights, not from the initial ones
        assert got[step] == pytest.approx(expected[step], abs=1e-5)
    for (name, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        assert a.detach().allclose(b.detach(), atol=1e-5), name
