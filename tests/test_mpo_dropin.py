"""MPOTrainer as a drop-in for DPOTrainer on TRL's preference data sets, and `evaluate()` with the MPO loss."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from PIL import Image

from rlhf.collator import MPOCollator
from rlhf.mpo_config import MPOConfig
from rlhf.mpo_trainer import MPOTrainer
from tests.test_mpo_trainer import perturbed, sequence_logps

MPO = dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0], beta=0.1)
COMMON = dict(report_to=[], bf16=False, gradient_checkpointing=False, per_device_train_batch_size=4,
              max_length=256, save_strategy="no")

QUESTIONS = [("What is 2 + 3?", "2 + 3 = 5.", "2 + 3 = 6."), ("Name the colour of the tile.", "It is red.", "Blue."),
             ("What is 7 - 4?", "7 - 4 = 3. Answer: 3", "7 - 4 = 2. Answer: 2"), ("Count the tiles.", "4", "5")]


def standard_dataset():
    return Dataset.from_list([{"prompt": q, "chosen": c, "rejected": r} for q, c, r in QUESTIONS])


def conversational_dataset():
    return Dataset.from_list([{"prompt": [{"role": "user", "content": q}],
                               "chosen": [{"role": "assistant", "content": c}],
                               "rejected": [{"role": "assistant", "content": r}]} for q, c, r in QUESTIONS])


def implicit_dataset():
    return Dataset.from_list([{"chosen": [{"role": "user", "content": q}, {"role": "assistant", "content": c}],
                               "rejected": [{"role": "user", "content": q}, {"role": "assistant", "content": r}]}
                              for q, c, r in QUESTIONS])


def pair_of_trainers(tmp_path, tok, dataset, reward_shift):
    from trl import DPOConfig, DPOTrainer

    from rlhf.tiny import build_causal_lm

    base = build_causal_lm(tok, seed=0)
    policy = perturbed(base)
    ours = MPOTrainer(copy.deepcopy(policy), ref_model=copy.deepcopy(base), train_dataset=dataset,
                      args=MPOConfig(output_dir=str(tmp_path / "mpo"), reward_shift=reward_shift, **MPO, **COMMON),
                      processing_class=tok)
    theirs = DPOTrainer(copy.deepcopy(policy), ref_model=copy.deepcopy(base), train_dataset=dataset,
                        args=DPOConfig(output_dir=str(tmp_path / "dpo"), **MPO, **COMMON), processing_class=tok)
    return ours, theirs


def first_batch(trainer):
    return trainer.data_collator([trainer.train_dataset[i] for i in range(4)])


@pytest.mark.parametrize("make", [standard_dataset, conversational_dataset, implicit_dataset])
def test_trl_dataset_with_reward_shift_none_equals_dpo_trainer(tmp_path, tiny_processor, make):
    """The data set DPOTrainer takes, given as it is: same token ids, and with reward_shift 'none' the first
    batch's loss equals DPOTrainer's (0.8 DPO + 0.2 BCO(δ = 0) + 1.0 SFT) to 1e-5."""
    tok = tiny_processor.tokenizer
    ours, theirs = pair_of_trainers(tmp_path, tok, make(), "none")
    for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
        assert ours.train_dataset[key] == theirs.train_dataset[key]
    loss_ours = ours.compute_loss(ours.model, first_batch(ours))
    loss_theirs = theirs.compute_loss(theirs.model, first_batch(theirs))
    assert loss_ours.item() == pytest.approx(loss_theirs.item(), abs=1e-5)


def test_trl_dataset_running_mean_differs_by_the_delta_term(tmp_path, tiny_processor):
    """Published δ: on the first batch δ = mean(cat(r_c, r_r)) of its 8 rewards, so the loss differs from
    DPOTrainer's (δ = 0) by exactly 0.2 * mean(BCO(δ) - BCO(0)), worked here from full logits."""
    tok = tiny_processor.tokenizer
    ours, theirs = pair_of_trainers(tmp_path, tok, standard_dataset(), "running_mean")
    batch = first_batch(theirs)
    loss_ours = ours.compute_loss(ours.model, first_batch(ours))
    loss_theirs = theirs.compute_loss(theirs.model, batch)
    with torch.no_grad():
        rewards = 0.1 * (sequence_logps(theirs.model, batch)[0].sum(1) - sequence_logps(theirs.ref_model, batch)[0].sum(1))
    rc, rr = rewards.chunk(2)
    delta = rewards.mean()

    def bco(d):
        return (-F.logsigmoid(rc - d) - F.logsigmoid(-(rr - d))).mean()

    expected_gap = 0.2 * (bco(delta) - bco(0.0))
    assert ours.reward_shift.mean.item() == pytest.approx(delta.item(), abs=1e-6)
    assert abs(delta.item()) > 1e-3 and abs(expected_gap.item()) > 1e-5  # the term is really there
    assert (loss_ours - loss_theirs).item() == pytest.approx(expected_gap.item(), abs=1e-5)


def test_trl_dataset_with_images_and_internvl(tmp_path, tiny_processor, tiny_internvl):
    """TRL's vision format (in-memory PIL images, conversational prompt with an image part) with an InternVL
    processor: rows are the InternVL ChatML rows `mmalign mpo` builds, the images written once to
    OUTPUT_DIR/images/train/, and a step trains."""
    from rlhf.collator import record_to_row
    from rlhf.data.trl_format import read_preference_dataset

    red = Image.new("RGB", (56, 56), (200, 30, 30))
    rows = [{"images": [red], "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
             "chosen": [{"role": "assistant", "content": c}], "rejected": [{"role": "assistant", "content": r}]}
            for q, c, r in QUESTIONS]
    data = Dataset.from_list(rows)
    args = MPOConfig(output_dir=str(tmp_path / "out"), max_steps=1, max_dynamic_patch=1, **MPO,
                     **{**COMMON, "per_device_train_batch_size": 2})
    trainer = MPOTrainer(tiny_internvl, args=args, train_dataset=data, processing_class=tiny_processor)
    saved = sorted(p.name for p in (tmp_path / "out" / "images" / "train").iterdir())
    assert saved == ["0_0.png", "1_0.png", "2_0.png", "3_0.png"]
    row = trainer.train_dataset[0]
    record = read_preference_dataset(data, name="train")[0]
    record.image_paths, record.images = [str(tmp_path / "out" / "images" / "train" / "0_0.png")], []
    expected = record_to_row(record, tiny_processor, default_max_patches=1)
    assert row["prompt_ids"] == expected["prompt_ids"] and row["chosen_ids"] == expected["chosen_ids"]
    text = tiny_processor.tokenizer.decode(row["prompt_ids"])
    assert text.startswith("<|im_start|>user\n<img><IMG_CONTEXT>") and text.endswith("<|im_start|>assistant\n")
    trainer.train()
    assert trainer.state.global_step == 1


def test_trl_dataset_bad_row_is_one_line(tmp_path, tiny_processor, tiny_internvl):
    from rlhf.data.records import DataValidationError

    data = Dataset.from_list([{"prompt": "<image>\nq", "chosen": "a", "rejected": "b", "images": []}])
    with pytest.raises(DataValidationError, match=r"<train>\[0\]: prompt: has 1 <image> placeholder but the record "
                                                  r"has no images"):
        MPOTrainer(tiny_internvl, args=MPOConfig(output_dir=str(tmp_path / "o"), **MPO, **COMMON),
                   train_dataset=data, processing_class=tiny_processor)


@pytest.mark.parametrize("with_metrics", [False, True])
def test_evaluate_on_packed_pairs_is_the_mpo_loss_with_delta(tmp_path, tiny_internvl, preference_rows,
                                                             tiny_processor, with_metrics):
    """`trainer.evaluate()` on packed pairs (one eval batch of 4 pairs, 2 with an image): eval_loss is the MPO
    loss with δ updated before use from the batch's 8 rewards, worked from full logits of the two-row layout.
    With `compute_metrics`, TRL asks for outputs too; the loss is the same."""
    policy = perturbed(tiny_internvl)
    ref = copy.deepcopy(tiny_internvl)
    rows = preference_rows.select(range(4))
    metrics = (lambda p: {"pairs": float(len(p.predictions))}) if with_metrics else None
    trainer = MPOTrainer(policy, ref_model=ref, train_dataset=rows, eval_dataset=rows, compute_metrics=metrics,
                         args=MPOConfig(output_dir=str(tmp_path / "o"), per_device_eval_batch_size=4,
                                        pack_pairs=True, **{**COMMON, "max_length": 512}),
                         processing_class=tiny_processor)
    assert trainer.args.pack_pairs
    result = trainer.evaluate()
    batch = MPOCollator(tiny_processor, 512)([rows[i] for i in range(4)])
    with torch.no_grad():
        pol_tok, mask = sequence_logps(policy, batch)
        ref_tok, _ = sequence_logps(ref, batch)
    rewards = 0.1 * (pol_tok.sum(1) - ref_tok.sum(1))
    rc, rr = rewards.chunk(2)
    delta = rewards.mean()
    pref = -F.logsigmoid(rc - rr).mean()
    qual = (-F.logsigmoid(rc - delta) - F.logsigmoid(-(rr - delta))).mean()
    gen = -pol_tok.chunk(2)[0].sum() / mask.chunk(2)[0].sum()
    assert result["eval_loss"] == pytest.approx((0.8 * pref + 0.2 * qual + gen).item(), abs=1e-5)
    assert result["eval_mpo/reward_shift"] == pytest.approx(delta.item(), abs=1e-6)
    assert abs(delta.item()) > 1e-4
    if with_metrics:
        assert result["eval_pairs"] == 4.0
