"""LoRA through peft: the reference is the adapter-disabled base, and only adapter weights train."""

import copy

import pytest
import torch
from peft import LoraConfig

from rlhf.collator import MPOCollator
from rlhf.mpo_config import MPOConfig
from rlhf.mpo_trainer import MPOTrainer


def test_lora_reference_is_base_model(tmp_path, tiny_internvl, preference_rows, tiny_processor):
    base = copy.deepcopy(tiny_internvl)
    args = MPOConfig(output_dir=str(tmp_path / "lora"), per_device_train_batch_size=2, max_steps=3, report_to=[],
                     save_strategy="no", logging_steps=1, learning_rate=5e-3, seed=0, max_length=512)
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    trainer = MPOTrainer(tiny_internvl, args=args, train_dataset=preference_rows, processing_class=tiny_processor,
                         peft_config=peft_config)
    assert trainer.ref_model is None  # no second copy of the weights
    frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" not in n}
    trainer.train()
    batch = MPOCollator(tiny_processor, 512)([preference_rows[i] for i in range(4)])
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.model, batch)
    # the same log-probs straight from the untouched base model
    kwargs = {k: v for k, v in batch.items() if k != "completion_mask"}
    with torch.no_grad():
        logits = base(**kwargs).logits[:, :-1]
    token = torch.gather(logits.log_softmax(-1), 2, batch["input_ids"][:, 1:, None]).squeeze(-1)
    expected = (token * batch["completion_mask"][:, 1:]).sum(1)
    assert torch.allclose(torch.cat([ref_chosen, ref_rejected]), expected, atol=1e-4)
    for name, param in trainer.model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, frozen[name]), name
    lora_b = [p for n, p in trainer.model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # adapters moved away from their zero init
    assert trainer.state.log_history[0]["mpo/reward_shift"] == pytest.approx(0.0)  # policy == reference at step 1
