"""δ is state: a run stopped after a checkpoint and resumed continues exactly as an uninterrupted one."""

import json

import pytest

from rlhf.mpo_config import MPOConfig
from rlhf.mpo_trainer import STATE_FILE, MPOTrainer
from rlhf.tiny import build_internvl
from tests.conftest import stop_at_step


def run(tmp_path, name, rows, processor, stop_at=None, resume=None):
    args = MPOConfig(output_dir=str(tmp_path / name), per_device_train_batch_size=2, max_steps=6, report_to=[],
                     logging_steps=1, save_strategy="steps", save_steps=3, learning_rate=2e-3, seed=0,
                     max_length=512, lr_scheduler_type="cosine")
    trainer = MPOTrainer(build_internvl(processor, seed=0), args=args, train_dataset=rows,
                         processing_class=processor, callbacks=[stop_at_step(stop_at)] if stop_at else None)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def losses(trainer):
    return {h["step"]: (h["loss"], h["mpo/reward_shift"]) for h in trainer.state.log_history if "loss" in h}


def test_resume_continues_reward_shift_and_loss(tmp_path, preference_rows, tiny_processor):
    full = run(tmp_path, "full", preference_rows, tiny_processor)
    first = run(tmp_path, "split", preference_rows, tiny_processor, stop_at=3)
    checkpoint = tmp_path / "split" / "checkpoint-3"
    saved = json.loads((checkpoint / STATE_FILE).read_text())
    assert saved["reward_shift_count"] == 3  # published δ: one sample (the batch mean of rewards) per step
    assert saved["reward_shift_mean"] == pytest.approx(float(first.reward_shift.mean), abs=0)
    resumed = run(tmp_path, "split", preference_rows, tiny_processor, resume=str(checkpoint))
    expected, got = losses(full), losses(resumed)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]  # steps 1-3 come back from the checkpoint's trainer_state.json
    for step in (4, 5, 6):
        assert got[step][0] == pytest.approx(expected[step][0], abs=1e-5)
        assert got[step][1] == pytest.approx(expected[step][1], abs=1e-6)
    assert float(resumed.reward_shift.mean) == pytest.approx(float(full.reward_shift.mean), abs=1e-9)
    assert float(resumed.reward_shift.count) == float(full.reward_shift.count) == 6


def test_resume_true_finds_last_checkpoint(tmp_path, preference_rows, tiny_processor):
    run(tmp_path, "auto", preference_rows, tiny_processor, stop_at=3)
    resumed = run(tmp_path, "auto", preference_rows, tiny_processor, resume=True)
    assert float(resumed.reward_shift.count) == 6
