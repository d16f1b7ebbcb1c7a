"""precompute_ref_log_probs on image data: cached on disk, reused, stale caches recomputed, same training."""

import pytest
import torch

from rlhf import ref_cache
from rlhf.mpo_config import MPOConfig
from rlhf.mpo_trainer import MPOTrainer
from rlhf.tiny import build_internvl


def make(tmp_path, rows, processor, precompute, name="run"):
    args = MPOConfig(output_dir=str(tmp_path / name), per_device_train_batch_size=2, max_steps=4, report_to=[],
                     logging_steps=1, save_strategy="no", learning_rate=2e-3, seed=0, max_length=512,
                     precompute_ref_log_probs=precompute, ref_logps_cache_dir=str(tmp_path / "cache"))
    return MPOTrainer(build_internvl(processor, seed=0), args=args, train_dataset=rows, processing_class=processor)


def history(trainer):
    return [(h["loss"], h["mpo/reward_shift"]) for h in trainer.state.log_history if "loss" in h]


def test_precomputed_matches_live_reference(tmp_path, preference_rows, tiny_processor):
    live = make(tmp_path, preference_rows, tiny_processor, precompute=False, name="live")
    live.train()
    cached = make(tmp_path, preference_rows, tiny_processor, precompute=True, name="cached")
    assert cached.ref_model is None  # no reference weights kept during training
    assert "ref_chosen_logps" in cached.train_dataset.column_names
    cached.train()
    for (a, da), (b, db) in zip(history(live), history(cached), strict=True):
        assert b == pytest.approx(a, abs=1e-5)
        assert db == pytest.approx(da, abs=1e-6)


def test_cache_reused_and_stale_cache_recomputed(tmp_path, preference_rows, tiny_processor, monkeypatch):
    first = make(tmp_path, preference_rows, tiny_processor, precompute=True)
    files = list((tmp_path / "cache").glob("ref_logps.train.*.safetensors"))
    assert len(files) == 1
    expected = torch.tensor(first.train_dataset["ref_chosen_logps"])

    calls = []
    original = MPOTrainer._compute_all_ref_logps
    monkeypatch.setattr(MPOTrainer, "_compute_all_ref_logps",
                        lambda self, *a: calls.append(1) or original(self, *a))
    again = make(tmp_path, preference_rows, tiny_processor, precompute=True)
    assert calls == []  # read from disk
    assert torch.equal(torch.tensor(again.train_dataset["ref_chosen_logps"]), expected)

    # same path, wrong content: written for another key -> detected and recomputed
    ref_cache.save(files[0], "another-key", expected + 1, expected + 1, {})
    fixed = make(tmp_path, preference_rows, tiny_processor, precompute=True)
    assert calls == [1]
    assert torch.allclose(torch.tensor(fixed.train_dataset["ref_chosen_logps"]), expected)

    # different data -> a different key and file
    fewer = preference_rows.select(range(6))
    make(tmp_path, fewer, tiny_processor, precompute=True)
    assert calls == [1, 1]
    assert len(list((tmp_path / "cache").glob("ref_logps.train.*.safetensors"))) == 2


def test_changed_image_changes_key(tmp_path, preference_rows):
    before = ref_cache.rows_fingerprint(preference_rows)
    path = next(p for row in preference_rows for p in row["image_paths"])
    with open(path, "ab") as f:
        f.write(b"\0")  # same path, different file
    assert ref_cache.rows_fingerprint(preference_rows) != before
