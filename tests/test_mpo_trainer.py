"""MPOTrainer against TRL 1.16's DPOTrainer and against the MPO formula computed by hand."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset

from rlhf.collator import MPOCollator
from rlhf.mpo_config import MPOConfig
from rlhf.mpo_trainer import MPOTrainer


def make_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, report_to=[], save_strategy="no",
                logging_steps=1, max_length=512, learning_rate=1e-3, seed=0, dataloader_num_workers=0)
    base.update(kw)
    return MPOConfig(**base)


def perturbed(model, seed=1, scale=0.02):
    """A copy of `model` with small random weight changes, so policy != reference and rewards are non-zero."""
    model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def sequence_logps(model, batch):
    """Reference implementation: full logits, log-softmax, gather; per-token log-probs of completion tokens."""
    kwargs = {k: v for k, v in batch.items() if k != "completion_mask"}
    logits = model(**kwargs).logits[:, :-1].float()
    labels = batch["input_ids"][:, 1:]
    mask = batch["completion_mask"][:, 1:]
    token_logps = torch.gather(F.log_softmax(logits, -1), 2, labels.unsqueeze(-1)).squeeze(-1) * mask
    return token_logps, mask


def build_trainers(tmp_path, tiny_internvl, rows, processor, **cfg):
    policy = perturbed(tiny_internvl)
    ref = copy.deepcopy(tiny_internvl)
    args = make_args(tmp_path, **cfg)
    return MPOTrainer(policy, ref_model=ref, args=args, train_dataset=rows, processing_class=processor), policy, ref


@pytest.mark.parametrize("pack_pairs, fused_loss, vocab_tile", [(True, True, None), (True, True, 100),
                                                               (True, False, None), (False, True, None),
                                                               (False, False, None)])
def test_reward_shift_none_equals_trl_dpo(tmp_path, tiny_internvl, preference_rows, tiny_processor, pack_pairs,
                                          fused_loss, vocab_tile):
    """reward_shift='none': loss and every gradient equal TRL 1.16's DPOTrainer with the same loss types/weights,
    with and without packed pairs and the fused loss (also in blocks of 100 of the 640 vocabulary columns)."""
    from trl import DPOConfig, DPOTrainer

    ours, policy, ref = build_trainers(tmp_path, tiny_internvl, preference_rows, tiny_processor, reward_shift="none",
                                       pack_pairs=pack_pairs, fused_loss=fused_loss,
                                       **({"loss_vocab_tile": vocab_tile} if vocab_tile else {}))
    assert ours._head_spec().vocab_tile == (vocab_tile or 8192)
    trl_policy = copy.deepcopy(policy)
    trl_args = DPOConfig(output_dir=str(tmp_path / "trl"), loss_type=["sigmoid", "bco_pair", "sft"],
                         loss_weights=[0.8, 0.2, 1.0], beta=0.1, report_to=[], bf16=False,
                         gradient_checkpointing=False, per_device_train_batch_size=4)
    vision_rows = Dataset.from_list([{"images": [], "prompt": "p", "chosen": "c", "rejected": "r"}])
    theirs = DPOTrainer(trl_policy, ref_model=copy.deepcopy(ref), args=trl_args, train_dataset=vision_rows,
                        processing_class=tiny_processor)
    rows = [preference_rows[i] for i in range(4)]
    batch = MPOCollator(tiny_processor, 512)(rows)
    assert "pixel_values" in batch and batch["pixel_values"].shape[0] == 4  # 2 image rows x (chosen, rejected)
    ours_batch = ours.data_collator(rows)
    assert ours_batch["pixel_values"].shape[0] == (2 if pack_pairs else 4)  # packed: each image once per pair
    loss_ours = ours.compute_loss(ours.model, dict(ours_batch))
    loss_theirs = theirs.compute_loss(theirs.model, dict(batch))
    assert loss_ours.item() == pytest.approx(loss_theirs.item(), abs=1e-5)
    loss_ours.backward()
    loss_theirs.backward()
    for (name, a), (_, b) in zip(policy.named_parameters(), trl_policy.named_parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-4), name
    assert ours._metrics["train"]["mpo/reward_shift"] == [0.0]


def test_running_mean_shift_matches_formula(tmp_path, tiny_internvl, preference_rows, tiny_processor):
    """Published MPO, worked from full logits: δ is updated BEFORE use with the batch's 2B rewards."""
    ours, policy, ref = build_trainers(tmp_path, tiny_internvl, preference_rows, tiny_processor)
    collate = MPOCollator(tiny_processor, 512)
    batches = [collate([preference_rows[i] for i in idx]) for idx in ([0, 1, 2, 3], [4, 5, 6, 7])]
    all_rewards = []
    for step, batch in enumerate(batches):
        loss = ours.compute_loss(ours.model, dict(batch))
        with torch.no_grad():
            pol_tok, mask = sequence_logps(policy, batch)
            ref_tok, _ = sequence_logps(ref, batch)
        rewards = 0.1 * (pol_tok.sum(1) - ref_tok.sum(1))
        rc, rr = rewards.chunk(2)
        all_rewards.append(rewards)
        # published δ: cumulative mean of the per-step batch means, this batch included (equal batch sizes here,
        # so it is also the mean of every reward so far)
        delta = torch.stack([r.mean() for r in all_rewards]).mean()
        pref = -F.logsigmoid(rc - rr).mean()
        qual = (-F.logsigmoid(rc - delta) - F.logsigmoid(-(rr - delta))).mean()
        gen = -pol_tok.chunk(2)[0].sum() / mask.chunk(2)[0].sum()
        assert loss.item() == pytest.approx((0.8 * pref + 0.2 * qual + gen).item(), abs=1e-5)
        assert ours.reward_shift.mean.item() == pytest.approx(delta.item(), abs=1e-6)
        assert ours.reward_shift.count.item() == step + 1
        m = ours._metrics["train"]
        assert m["mpo/preference_loss"][-1] == pytest.approx(pref.item(), abs=1e-5)
        assert m["mpo/quality_loss"][-1] == pytest.approx(qual.item(), abs=1e-5)
        assert m["mpo/generation_loss"][-1] == pytest.approx(gen.item(), abs=1e-5)
        assert m["mpo/reward_shift"][-1] == pytest.approx(delta.item(), abs=1e-6)
    assert abs(ours.reward_shift.mean.item()) > 1e-4  # the perturbation makes δ non-trivial


@pytest.mark.parametrize("rule", ["running_mean", "reward_mean"])
def test_reward_shift_rules_with_unequal_batches(tmp_path, tiny_internvl, preference_rows, tiny_processor, rule):
    """Batches of 3 pairs then 1 pair. InternVL's trainer (running_mean) folds each step's batch mean in as one
    sample: δ_2 = (m_1 + m_2) / 2. reward_mean (ours) weights every reward: δ_2 = (6 m_1 + 2 m_2) / 8."""
    ours, policy, ref = build_trainers(tmp_path, tiny_internvl, preference_rows, tiny_processor, reward_shift=rule)
    collate = MPOCollator(tiny_processor, 512)
    means = []
    for idx in ([0, 1, 2], [3]):
        batch = collate([preference_rows[i] for i in idx])
        ours.compute_loss(ours.model, dict(batch))
        with torch.no_grad():
            rewards = 0.1 * (sequence_logps(policy, batch)[0].sum(1) - sequence_logps(ref, batch)[0].sum(1))
        means.append(rewards.mean().item())
    expected = (means[0] + means[1]) / 2 if rule == "running_mean" else (6 * means[0] + 2 * means[1]) / 8
    assert ours.reward_shift.mean.item() == pytest.approx(expected, abs=1e-6)
    assert ours.reward_shift.count.item() == (2 if rule == "running_mean" else 8)
    assert abs(means[0] - means[1]) > 1e-3  # the two rules really differ on these batches


@pytest.mark.parametrize("loss_type", [["hinge"], ["ipo", "sft"], ["sigmoid"], ["nca_pair"]])
def test_other_loss_types_unchanged(tmp_path, tiny_internvl, preference_rows, tiny_processor, loss_type, caplog):
    """Loss lists beyond MPO's terms take TRL's path, saying once that packed pairs and the fused loss are off
    there; those within use ours with δ = 0 when not in the list."""
    from trl import DPOConfig, DPOTrainer

    with caplog.at_level("WARNING", logger="rlhf.mpo_trainer"):
        ours, policy, ref = build_trainers(tmp_path, tiny_internvl, preference_rows, tiny_processor,
                                           loss_type=loss_type, loss_weights=None)
    warned = [r.getMessage() for r in caplog.records if "runs TRL's own loss" in r.getMessage()]
    if loss_type in (["hinge"], ["nca_pair"], ["ipo", "sft"]):
        assert warned == [f"MPOTrainer: loss_type {loss_type} (or f_divergence_type / ld_alpha / use_weighting) runs "
                          "TRL's own loss, without pack_pairs and fused_loss; set pack_pairs and fused_loss false to "
                          "silence this"]
    else:
        assert warned == []
    theirs = DPOTrainer(copy.deepcopy(policy), ref_model=copy.deepcopy(ref),
                        args=DPOConfig(output_dir=str(tmp_path / "trl"), loss_type=loss_type, report_to=[], bf16=False,
                                       gradient_checkpointing=False),
                        train_dataset=Dataset.from_list([{"images": [], "prompt": "p", "chosen": "c", "rejected": "r"}]),
                        processing_class=tiny_processor)
    batch = MPOCollator(tiny_processor, 512)([preference_rows[i] for i in range(4)])
    a = ours.compute_loss(ours.model, dict(batch)).item()
    b = theirs.compute_loss(theirs.model, dict(batch)).item()
    assert a == pytest.approx(b, abs=1e-5)


def test_config_defaults_and_validation():
    args = MPOConfig(output_dir="x", report_to=[])
    assert args.loss_type == ["sigmoid", "bco_pair", "sft"]
    assert args.loss_weights == [0.8, 0.2, 1.0]
    assert args.beta == 0.1 and args.reward_shift == "running_mean"
    with pytest.raises(ValueError):
        MPOConfig(output_dir="x", reward_shift="ema")
    with pytest.raises(ValueError, match="finite"):
        MPOConfig(output_dir="x", beta=float("nan"))
    with pytest.raises(ValueError):
        MPOConfig(output_dir="x", loss_weights=[1.0])
    with pytest.raises(ValueError, match=r"^loss_vocab_tile: expected an integer >= 1, got 0$"):
        MPOConfig(output_dir="x", loss_vocab_tile=0)


def test_text_only_causal_lm(tmp_path, tiny_processor):
    """A plain Qwen2 causal LM with its tokenizer trains through the same trainer."""
    from rlhf.collator import record_to_row
    from rlhf.tiny import build_causal_lm
    from tests.conftest import make_records

    tok = tiny_processor.tokenizer
    records = [r for r in make_records(tmp_path, 8) if not r.image_paths]
    rows = Dataset.from_list([record_to_row(r, tok) for r in records])
    model = build_causal_lm(tok)
    trainer = MPOTrainer(model, args=make_args(tmp_path, max_steps=2, per_device_train_batch_size=2),
                         train_dataset=rows, processing_class=tok)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert trainer.reward_shift.count.item() == 2  # 2 steps, one batch mean each (published δ)
