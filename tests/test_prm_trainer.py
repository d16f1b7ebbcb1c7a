"""VisualPRM training: loss math and metrics by hand, the position-only LM head against full logits, a short run that
learns an easy rule, data reading/rows, and `mmalign prm` end to end on the tiny recipe."""

from __future__ import annotations

import copy
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from PIL import Image
from transformers import EvalPrediction

from reward.conversation import PRM_SYSTEM_PROMPT
from reward.formats import MCRecord, StepwiseRecord
from reward.prm_data import encode_prm
from rlhf.processing import IM_END
from reward.prm_job import (
    DataFormat,
    PRMDataError,
    build_rows,
    read_prm_records,
)
from reward.prm_collator import PRMCollator, encode_row
from reward.prm_config import PRMConfigError, VisualPRMConfig
from reward.prm_losses import hard_token_losses, plus_margin, plus_probability, soft_token_losses
from reward.prm_metrics import prm_eval_metrics, step_metrics
from reward.prm_trainer import VisualPRMTrainer

REPO = Path(__file__).resolve().parents[1]
TINY_DATA = REPO / "recipes" / "prm" / "tiny_data"
LN = math.log


def config(tmp_path, **kw) -> VisualPRMConfig:
    base = dict(output_dir=str(tmp_path / "out"), report_to="none", save_strategy="no", logging_steps=5, seed=0,
                disable_tqdm=True, max_length=2048, max_dynamic_patch=1, dataloader_pin_memory=False)
    base.update(kw)
    return VisualPRMConfig(**base)


# -- loss math, worked by hand ---------------------------------------------------------------------------------------

# Vocabulary of 3; '-' = 0, '+' = 1, '<|im_end|>' = 2. Two judgements:
#   row 1: judgement logits (0, ln 3, 0) -> softmax (1/5, 3/5, 1/5); end logits (0, 0, ln 2) -> (1/4, 1/4, 1/2)
#   row 2: judgement logits (ln 4, 0, 0) -> (4/6, 1/6, 1/6);          end logits (0, 0, 0)    -> (1/3, 1/3, 1/3)
JUDGE = torch.tensor([[0.0, LN(3), 0.0], [LN(4), 0.0, 0.0]])
END = torch.tensor([[0.0, 0.0, LN(2)], [0.0, 0.0, 0.0]])
MINUS, PLUS, EOT = 0, 1, 2


def test_hard_loss_worked_numbers():
    # row 1 is '+': -ln(3/5) = 0.5108256; row 2 is '-': -ln(4/6) = 0.4054651; ends: ln 2 = 0.6931472, ln 3 = 1.0986123
    losses = hard_token_losses(JUDGE, END, torch.tensor([PLUS, MINUS]), torch.tensor([EOT, EOT]))
    assert losses.tolist() == pytest.approx([0.5108256, 0.4054651, 0.6931472, 1.0986123], abs=1e-6)
    assert losses.mean().item() == pytest.approx(2.7080502 / 4, abs=1e-6)  # mean over the 4 supervised tokens


def test_soft_loss_worked_numbers():
    # P(+) over {+, -}: row 1 e^ln3 / (e^ln3 + e^0) = 3/4; row 2 e^0 / (e^0 + e^ln4) = 1/5.
    assert plus_probability(JUDGE, PLUS, MINUS).tolist() == pytest.approx([0.75, 0.2], abs=1e-7)
    # Monte Carlo scores 0.5 and 0.25:
    #   BCE row 1 = -(0.5 ln 0.75 + 0.5 ln 0.25) = 0.8369882;  row 2 = -(0.25 ln 0.2 + 0.75 ln 0.8) = 0.5697172
    losses = soft_token_losses(JUDGE, END, torch.tensor([0.5, 0.25]), torch.tensor([EOT, EOT]), PLUS, MINUS)
    assert losses.tolist() == pytest.approx([0.8369882, 0.5697172, 0.6931472, 1.0986123], abs=1e-6)
    assert losses.mean().item() == pytest.approx(3.1984649 / 4, abs=1e-6)
    # With 0/1 scores the soft term is the two-way cross-entropy: -ln(3/4) = 0.2876821 and -ln(1 - 1/5) = 0.2231436
    hard_scores = soft_token_losses(JUDGE, END, torch.tensor([1.0, 0.0]), torch.tensor([EOT, EOT]), PLUS, MINUS)
    assert hard_scores[:2].tolist() == pytest.approx([0.2876821, 0.2231436], abs=1e-6)


def test_plus_probability_worked_example():
    """P(+) is the softmax over the '+' and '-' logits alone; the rest of the vocabulary does not count.
    Vocabulary of 4: '-' = 0, '+' = 1. Row 1: logits (0, ln 3, 5, -2) -> e^ln3 / (e^ln3 + e^0) = 3 / 4, whatever
    tokens 2 and 3 hold. Row 2: equal '+'/'-' logits -> 1/2. Row 3: '+' 2 below '-' -> 1 / (1 + e^2) = 0.1192029."""
    logits = torch.tensor([[0.0, LN(3), 5.0, -2.0], [1.5, 1.5, 0.0, 9.0], [2.0, 0.0, 0.0, 0.0]])
    assert plus_probability(logits, 1, 0).tolist() == pytest.approx([0.75, 0.5, 0.1192029], abs=1e-7)
    assert plus_margin(logits, 1, 0).tolist() == pytest.approx([LN(3), 0.0, -2.0], abs=1e-7)  # log-odds of P(+)
    # bf16 logits (a bf16 LM head) give float32 probabilities: ln 3 = 1.0986 rounds to 1.1015625 in bf16 -> 0.7505527
    p = plus_probability(logits.bfloat16(), 1, 0)
    assert p.dtype == torch.float32 and p.tolist() == pytest.approx([0.7505527, 0.5, 0.1192029], abs=1e-6)


# -- metrics, worked by hand -----------------------------------------------------------------------------------------


def test_step_metrics_worked_numbers():
    p = torch.tensor([0.9, 0.2, 0.6, 0.4, 0.05, 0.95])
    positive = torch.tensor([True, False, False, True, False, True])
    m = step_metrics(p, positive, bins=10)
    # predicted '-' (P(+) < 0.5): steps 1, 3, 4; true '-': steps 1, 2, 4 -> right on 0, 1, 4, 5: 4/6
    assert m["step_accuracy"] == pytest.approx(4 / 6)
    # '-' class: TP = {1, 4} = 2, predicted 3, true 3 -> precision 2/3, recall 2/3, F1 2/3
    assert (m["minus_precision"], m["minus_recall"], m["minus_f1"]) == pytest.approx((2 / 3, 2 / 3, 2 / 3))
    # Brier: (0.1^2 + 0.2^2 + 0.6^2 + 0.6^2 + 0.05^2 + 0.05^2) / 6 = 0.775 / 6
    assert m["brier"] == pytest.approx(0.775 / 6)
    # ECE, 10 bins: bin 9 holds 0.9 and 0.95 (both '+'): |0.925 - 1| = 0.075 with weight 2/6; the singletons give
    # |0.2 - 0| + |0.6 - 0| + |0.4 - 1| + |0.05 - 0| = 1.45 with weight 1/6 each -> (0.15 + 1.45) / 6
    assert m["ece"] == pytest.approx(1.6 / 6)
    assert m["num_steps"] == 6


def test_step_metrics_edges():
    # P(+) = 0.5 is a '+' prediction and P(+) = 1 falls in the last bin; no '-' predicted -> precision 0, F1 0.
    m = step_metrics(torch.tensor([0.5, 1.0]), torch.tensor([False, True]), bins=10)
    assert m["step_accuracy"] == 0.5
    assert (m["minus_precision"], m["minus_recall"], m["minus_f1"]) == (0.0, 0.0, 0.0)
    assert m["ece"] == pytest.approx(0.5 * 0.5 + 0.5 * 0.0)
    assert m["brier"] == pytest.approx((0.25 + 0.0) / 2)


def test_eval_metrics_drop_padding_and_threshold_scores():
    # Two rows of P(+) padded with -100; Monte Carlo scores 0.0 / 0.25 / 1.0 -> '+' iff > 0 (published threshold).
    preds = np.array([[0.9, 0.3, -100.0], [0.2, 0.7, 0.6]])
    scores = np.array([[1.0, 0.0, -100.0], [0.0, 0.25, 1.0]])
    m = prm_eval_metrics(EvalPrediction(predictions=preds, label_ids=scores))
    assert m["num_steps"] == 5 and m["step_accuracy"] == 1.0
    assert prm_eval_metrics(EvalPrediction(predictions=preds, label_ids=scores), threshold=0.5)["step_accuracy"] \
        == pytest.approx(4 / 5)  # the 0.25 step becomes '-', predicted '+'


# -- config ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value, message", [
    ("label_mode", "mixed", "VisualPRMConfig.label_mode must be one of 'hard', 'soft', got 'mixed'"),
    ("label_threshold", 1.0, "VisualPRMConfig.label_threshold must be a number in [0, 1), got 1.0"),
    ("max_dynamic_patch", 0, "VisualPRMConfig.max_dynamic_patch must be an integer >= 1, got 0"),
    ("max_steps_per_solution", 0, "VisualPRMConfig.max_steps_per_solution must be an integer >= 1 or None, got 0"),
    ("on_overflow", "cut", "VisualPRMConfig.on_overflow must be one of 'truncate', 'skip', 'error', got 'cut'"),
])
def test_config_rejects_bad_values_in_one_line(tmp_path, field, value, message):
    with pytest.raises(PRMConfigError) as err:
        config(tmp_path, **{field: value})
    assert str(err.value) == message


def test_config_cpu_defaults(tmp_path):
    args = config(tmp_path)
    assert (args.label_mode, args.label_threshold, args.bf16, args.remove_unused_columns) == ("hard", 0.0, False, False)
    assert not args.gradient_checkpointing


# -- the position-only LM head ---------------------------------------------------------------------------------------


def image_rows(tmp_path, processor, soft: bool):
    """Three solutions: two with an image (different sizes), one text-only; mixed labels."""
    paths = []
    for i, size in enumerate([(112, 112), (150, 90)]):
        paths.append(str(tmp_path / f"img{i}.png"))
        Image.new("RGB", size, (40 * i + 30, 200, 90)).save(paths[-1])
    labels = [[1.0, 0.5, 0.0], [0.25, 0.0], [1.0, 1.0, 0.75, 0.0]] if soft else \
        [[True, True, False], [False, False], [True, True, True, False]]
    steps = [["3 + 7 = 10.", "10 + 5 = 15.", "Answer: \\boxed{16}"], ["The tiles show 4 and 2.", "4 + 2 = 7."],
             ["1 + 2 = 3.", "3 + 4 = 7.", "7 + 6 = 13.", "Answer: \\boxed{21}"]]
    images = [[paths[0]], [paths[1]], []]
    return [encode_row(processor, ("<image>\n" if imgs else "") + "Add the numbers.", s, lab, imgs, 1, system=None)
            for s, lab, imgs in zip(steps, labels, images)]


def reference_loss(model, batch, mode: str, plus: int, minus: int) -> torch.Tensor:
    """Full (batch, seq, vocab) logits from the model's own forward, then the same terms at the judgement rows."""
    kwargs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values") if k in batch}
    logits = model(**kwargs).logits.float()
    r, p, ids = batch["judgement_rows"], batch["judgement_positions"], batch["input_ids"]
    judge, end = logits[r, p - 1], logits[r, p]
    end_ce = F.cross_entropy(end, ids[r, p + 1], reduction="none")
    if mode == "hard":
        return torch.cat([F.cross_entropy(judge, ids[r, p], reduction="none"), end_ce]).mean()
    p_plus = torch.softmax(judge[:, [plus, minus]], dim=-1)[:, 0]
    s = batch["judgement_scores"]
    bce = -(s * torch.log(p_plus) + (1 - s) * torch.log(1 - p_plus))
    return torch.cat([bce, end_ce]).mean()


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_position_only_head_equals_full_logits(tmp_path, tiny_internvl, tiny_processor, mode):
    rows = image_rows(tmp_path, tiny_processor, soft=mode == "soft")
    batch = PRMCollator(tiny_processor)(rows)
    assert batch["pixel_values"].shape[0] == 2 and batch["judgement_rows"].tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2]
    ids = batch["input_ids"]
    assert set(ids[batch["judgement_rows"], batch["judgement_positions"] + 1].tolist()) == \
        {tiny_processor.tokenizer.convert_tokens_to_ids(IM_END)}
    reference_model = copy.deepcopy(tiny_internvl)
    trainer = VisualPRMTrainer(tiny_internvl, args=config(tmp_path, label_mode=mode), processing_class=tiny_processor)
    loss = trainer.compute_loss(trainer.model, dict(batch))
    expected = reference_loss(reference_model, batch, mode, trainer.plus_id, trainer.minus_id)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    loss.backward()
    expected.backward()
    for (name, a), (_, b) in zip(tiny_internvl.named_parameters(), reference_model.named_parameters()):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-4), name


def test_lm_head_sees_only_the_supervised_rows(tmp_path, tiny_internvl, tiny_processor):
    rows = image_rows(tmp_path, tiny_processor, soft=False)
    batch = PRMCollator(tiny_processor)(rows)
    trainer = VisualPRMTrainer(tiny_internvl, args=config(tmp_path), processing_class=tiny_processor)
    shapes = []
    handle = tiny_internvl.lm_head.register_forward_hook(lambda mod, args, out: shapes.append(tuple(args[0].shape)))
    trainer.compute_loss(trainer.model, dict(batch))
    n_steps = 3 + 2 + 4
    assert shapes == [(2 * n_steps, tiny_internvl.config.text_config.hidden_size)]  # judgement + <|im_end|> rows
    shapes.clear()
    tiny_internvl(input_ids=batch["input_ids"][:1, :8])  # without judgement rows: the class's own forward
    handle.remove()
    assert shapes == [(1, 8, tiny_internvl.config.text_config.hidden_size)]


# -- a short run learns an easy rule ---------------------------------------------------------------------------------


def rule_rows(tokenizer, seed: int, n: int) -> Dataset:
    """Each step says 'right' ('+') or 'wrong' ('-'); text-only, no system prompt, ~90 tokens per solution."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        labels = [rng.random() < 0.5 for _ in range(3)]
        steps = [f"The value {rng.randint(1, 9)} is {'right' if ok else 'wrong'}." for ok in labels]
        rows.append(encode_row(tokenizer, "Check each step.", steps, labels, [], 0, system=None))
    return Dataset.from_list(rows)


def test_short_training_learns_an_easy_rule(tmp_path):
    from rlhf.tiny import TinySizes, build_causal_lm, build_tokenizer

    # A text-only Qwen2 smaller than the embedded one (64 wide, 2 layers): 40 steps take seconds on a CPU.
    tokenizer = build_tokenizer()
    sizes = TinySizes(text_hidden=64, text_layers=2, text_heads=4, text_kv_heads=2, text_intermediate=128)
    model = build_causal_lm(tokenizer, sizes, seed=0)
    args = config(tmp_path, max_steps=40, per_device_train_batch_size=8, per_device_eval_batch_size=32,
                  learning_rate=3e-3, lr_scheduler_type="constant")
    trainer = VisualPRMTrainer(model, args=args, train_dataset=rule_rows(tokenizer, 0, 64),
                               eval_dataset=rule_rows(tokenizer, 1, 32), processing_class=tokenizer)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert before["eval_num_steps"] == after["eval_num_steps"] == 96
    # The random init (seed 0) answers '-' everywhere: right on the 57 '-' steps of 96; its loss is deterministic.
    assert before["eval_step_accuracy"] == pytest.approx(57 / 96)
    assert before["eval_loss"] == pytest.approx(6.662723, abs=1e-4)
    assert after["eval_step_accuracy"] == 1.0 and after["eval_minus_f1"] == 1.0
    assert after["eval_loss"] < 0.2 and after["eval_brier"] < 0.02 < 0.2 < before["eval_brier"]


# -- data: readers, merge, rows --------------------------------------------------------------------------------------


def test_reader_detects_each_kind(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    lines = [
        {"images": ["a.png"], "question": "<image>\nq", "steps": ["s1", "s2"], "labels": [True, False]},
        {"image": "a.png", "question": "<image>\nq", "steps_with_score": [
            {"step": "s1", "score": 0.5, "num_mc_correct": 8, "num_mc_total": 16},
            {"step": "s2", "score": 0.0, "num_mc_correct": 0, "num_mc_total": 16}]},
        {"conversations": [{"from": "system", "value": PRM_SYSTEM_PROMPT},
                           {"from": "human", "value": "### Question:\nq\n\n### Solution Process:\ns1"},
                           {"from": "gpt", "value": "+"}]},
        {"data_format": "stepwise", "question": "q", "steps": ["s1"], "labels": [0.75]},
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + "\n")
    records = read_prm_records(path)
    assert [line for line, _ in records] == [1, 2, 3, 4]
    assert [type(r).__name__ for _, r in records] == ["StepwiseRecord", "MCRecord", "ConversationRecord",
                                                      "StepwiseRecord"]
    assert isinstance(records[1][1], MCRecord) and records[3][1].labels == [0.75]
    with pytest.raises(PRMDataError) as err:
        read_prm_records(path, DataFormat.MC)
    assert "mixed.jsonl:1: field 'steps_with_score': expected this field" in str(err.value)


def test_reader_reports_every_bad_record(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([
        '{"question": "q", "steps": ["s"], "labels": [true]}',
        '{"question": "q", "steps": ["s"], "labels": [1.5]}',
        '{"question": "q"',
        '{"question": "q", "answer": "1"}',
        '{"data_format": "processbench", "question": "q"}',
        '{"question": "q", "steps": ["s"], "labels": [true], "steps_with_score": []}',
    ]) + "\n")
    with pytest.raises(PRMDataError) as err:
        read_prm_records(path)
    lines = str(err.value).splitlines()
    assert lines[0] == "5 problems in the PRM data:"
    assert lines[1] == f"  {path}:2: field 'labels[0]': expected a number in [0, 1], got 1.5"
    assert lines[2].startswith(f"  {path}:3: expected one JSON object per line")
    assert lines[3].startswith(f"  {path}:4: expected exactly one of the keys 'steps' (stepwise)")
    assert lines[4] == f"  {path}:5: field 'data_format': expected one of stepwise, mc, conversation, " \
                       "got 'processbench'"
    assert lines[5].endswith("got several: steps, steps_with_score")


def test_rows_resolve_images_and_report_missing_ones(tmp_path, tiny_processor):
    Image.new("RGB", (112, 112)).save(tmp_path / "ok.png")
    records = [(1, StepwiseRecord(question="<image>\nq", steps=["a", "b"], labels=[True, False], images=["ok.png"])),
               (2, StepwiseRecord(question="<image>\nq", steps=["a"], labels=[True], images=["gone.png"])),
               (3, StepwiseRecord(question="<image>\n<image>\nq", steps=["a"], labels=[True], images=["ok.png"]))]
    args = config(tmp_path)
    with pytest.raises(PRMDataError) as err:
        build_rows(tmp_path / "d.jsonl", records, tiny_processor, args)
    assert str(err.value).splitlines()[1:] == [
        f"  {tmp_path / 'd.jsonl'}:2: field 'image': expected an existing image file, got "
        f"{str(tmp_path / 'gone.png')!r}",
        f"  {tmp_path / 'd.jsonl'}:3: text has 2 <image> placeholders but 1 images"]
    rows = build_rows(tmp_path / "d.jsonl", records[:1], tiny_processor, args)
    assert rows[0]["image_paths"] == [str(tmp_path / "ok.png")] and rows[0]["scores"] == [1.0, 0.0]


def test_system_prompt_setting_shapes_the_rows(tmp_path, tiny_processor):
    records = [(1, StepwiseRecord(question="q", steps=["1 + 2 = 3.", "Answer: 3"], labels=[True, True]))]
    published = build_rows("d.jsonl", records, tiny_processor, config(tmp_path))[0]
    none = build_rows("d.jsonl", records, tiny_processor, config(tmp_path, system_prompt=""))[0]
    own = build_rows("d.jsonl", records, tiny_processor, config(tmp_path, system_prompt="Judge."))[0]
    for row, system in ((published, PRM_SYSTEM_PROMPT), (none, None), (own, "Judge.")):
        want = encode_prm(tiny_processor, "q", ["1 + 2 = 3.", "Answer: 3"], [True, True], system=system)
        assert row["input_ids"] == want.input_ids and row["judgement_positions"] == want.judgement_positions
    head = tiny_processor.tokenizer.convert_ids_to_tokens(published["input_ids"][:2])
    assert head[0] == "<|im_start|>" and len(none["input_ids"]) < len(own["input_ids"]) < len(published["input_ids"])


def test_overflow_truncates_at_a_step_boundary(tmp_path, tiny_processor):
    records = [(1, StepwiseRecord(question="q", steps=["1 + 2 = 3.", "3 + 4 = 7.", "7 + 6 = 13."],
                                  labels=[1.0, 0.5, 0.0]))]
    full = build_rows("d.jsonl", records, tiny_processor, config(tmp_path))[0]
    second = full["judgement_positions"][1]
    cut = build_rows("d.jsonl", records, tiny_processor, config(tmp_path, max_length=second + 3))[0]
    assert cut["input_ids"] == full["input_ids"][: second + 2] and cut["scores"] == [1.0, 0.5]
    assert cut["input_ids"][-1] == tiny_processor.tokenizer.convert_tokens_to_ids(IM_END)
    assert build_rows("d.jsonl", records, tiny_processor, config(tmp_path, max_length=second, on_overflow="skip")) \
        == []
    with pytest.raises(PRMDataError, match="d.jsonl:1: .* tokens > max_length"):
        build_rows("d.jsonl", records, tiny_processor, config(tmp_path, max_length=second, on_overflow="error"))


def test_meta_json_sources_repeat_and_tile_budget(tmp_path, tiny_processor):
    from reward.prm_job import PRMScriptArguments, prepare_dataset, read_dataset

    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (300, 100)).save(tmp_path / "imgs" / "wide.png")  # 3 x 1 grid + thumbnail with 4 tiles allowed
    line = {"images": ["wide.png"], "question": "<image>\nq", "steps": ["a", "b"], "labels": [True, False]}
    (tmp_path / "a.jsonl").write_text(json.dumps(line) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps(line) + "\n" + json.dumps({**line, "labels": [0.5, 0.0]}) + "\n")
    meta = {"a": {"annotation": "a.jsonl", "root": "imgs", "repeat_time": 2, "max_dynamic_patch": 4},
            "b": {"annotation": "b.jsonl", "root": "imgs", "repeat_time": 0.5, "data_augment": False}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    args = config(tmp_path, max_dynamic_patch=1)
    script = PRMScriptArguments(data="x")
    rows = prepare_dataset(read_dataset(tmp_path / "meta.json", script), tiny_processor, args, script, "train")
    assert len(rows) == 2 + 1  # a twice, a seeded half of b's two records
    assert [r["max_patches"] for r in rows] == [4, 4, 1]
    image_tokens = [r["input_ids"].count(tiny_processor.image_token_id) for r in rows]
    assert image_tokens == [4 * 16, 4 * 16, 16]  # 16 tokens per tile
    bad = {"a": {"annotation": "missing.jsonl", "root": "imgs", "repeat_time": 0}}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(PRMDataError) as err:
        read_dataset(tmp_path / "bad.json", script)
    assert str(err.value).splitlines()[1:] == [
        f"  {tmp_path / 'bad.json'}: field 'a.annotation': expected an existing JSON-lines file, got 'missing.jsonl'",
        f"  {tmp_path / 'bad.json'}: field 'a.repeat_time': expected a number > 0 (2.0 repeats twice, 0.5 takes a "
        "seeded half), got 0"]


def test_shipped_tiny_data_regenerates(tmp_path):
    sys.path.insert(0, str(REPO / "recipes" / "prm"))
    try:
        import make_tiny_data
    finally:
        sys.path.pop(0)
    assert make_tiny_data.make(tmp_path) == {"train": 200, "eval": 50}
    for name in ("train.jsonl", "eval.jsonl"):
        assert (tmp_path / name).read_text() == (TINY_DATA / name).read_text()
    shipped = sorted((TINY_DATA / "images").iterdir())
    assert [p.name for p in shipped] == sorted(p.name for p in (tmp_path / "images").iterdir()) and len(shipped) == 50
    for p in shipped[::7]:
        assert np.array_equal(np.asarray(Image.open(p)), np.asarray(Image.open(tmp_path / "images" / p.name)))
    assert sum(p.stat().st_size for p in TINY_DATA.rglob("*") if p.is_file()) < 1_500_000


def test_import_reward_stays_light():
    code = "import sys, reward; print('torch' in sys.modules, 'transformers' in sys.modules, reward.__all__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert out.split("\n")[0].startswith("False False [")
    assert "'VisualPRMConfig', 'VisualPRMTrainer'" in out


# -- `mmalign prm` end to end ----------------------------------------------------------------------------------------


def test_cli_tiny_recipe_end_to_end(tmp_path, monkeypatch):
    from transformers import InternVLForConditionalGeneration

    from rlhf.cli import main
    from rlhf.processing import InternVLChatProcessor
    from reward.prm_head import judgement_logits

    monkeypatch.chdir(REPO)
    eval_file = tmp_path / "eval10.jsonl"
    eval_file.write_text("".join((TINY_DATA / "eval.jsonl").read_text().splitlines(keepends=True)[:10]))
    out = tmp_path / "run"
    rc = main(["prm", "--config", "recipes/prm/tiny.yaml", "--max_steps", "2", "--per_device_train_batch_size", "2",
               "--output_dir", str(out), "--eval_data", str(eval_file), "--image_root", str(TINY_DATA),
               "--per_device_eval_batch_size", "10"])
    assert rc == 0
    metrics = json.loads((out / "eval_metrics.json").read_text())
    assert metrics["initial"]["eval_initial_num_steps"] == metrics["final"]["eval_num_steps"] == 55
    final = out / "final"
    assert sorted(p.name for p in final.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pkl")) == \
        ["model.safetensors"]
    model = InternVLForConditionalGeneration.from_pretrained(final).eval()
    processor = InternVLChatProcessor.from_pretrained(final)
    # The checkpoint reproduces the final evaluation: P(+) on the same 10 solutions -> the same Brier score.
    args = config(tmp_path, max_dynamic_patch=1, max_length=1024)
    rows = build_rows(eval_file, read_prm_records(eval_file), processor, args, TINY_DATA)
    batch = PRMCollator(processor)(rows)
    with torch.no_grad():
        logits = judgement_logits(model, batch["judgement_rows"], batch["judgement_positions"],
                                  input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  pixel_values=batch["pixel_values"]).judgement_logits
    plus, minus = (processor.tokenizer.convert_tokens_to_ids(t) for t in ("+", "-"))
    m = step_metrics(plus_probability(logits, plus, minus), batch["judgement_scores"] > 0)
    assert m["brier"] == pytest.approx(metrics["final"]["eval_brier"], abs=1e-5)
    assert m["step_accuracy"] == pytest.approx(metrics["final"]["eval_step_accuracy"])


def test_recipes_parse(monkeypatch):
    """Every key of both recipes is a real field (TrlParser rejects unknown ones)."""
    from reward.prm_job import parse

    monkeypatch.chdir(REPO)
    script, args, model_args = parse(["--config", "recipes/prm/tiny.yaml"])
    assert (model_args.model_name_or_path, script.data, args.label_mode, args.bf16) == \
        ("tiny-internvl", "recipes/prm/tiny_data/train.jsonl", "hard", False)
    # the 8B recipe wants CUDA bf16 and a DeepSpeed config: switched off to parse it on a CPU
    script, args, model_args = parse(["--config", "recipes/prm/visualprm_8b.yaml", "--bf16", "false",
                                      "--deepspeed", ""])
    assert model_args.model_name_or_path == "OpenGVLab/InternVL3-8B-hf" and model_args.dtype == "bfloat16"
    assert (args.learning_rate, args.weight_decay, args.num_train_epochs, args.max_dynamic_patch, args.max_length,
            args.max_steps_per_solution, args.label_threshold) == (1e-5, 0.05, 1, 6, 8192, 16, 0.0)
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps * 8 == 512


def test_cli_reports_bad_data_in_one_message(tmp_path, monkeypatch, capsys):
    from rlhf.cli import main

    monkeypatch.chdir(REPO)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "steps": ["s"], "labels": [2]}\n{"question": "q"}\n')
    rc = main(["prm", "--config", "recipes/prm/tiny.yaml", "--data", str(bad), "--output_dir", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("mmalign prm: 2 problems in the PRM data:\n")
    assert f"{bad}:1: field 'labels[0]'" in err and f"{bad}:2: expected exactly one of the keys" in err


def test_plus_context_rows_hold_plus_and_train_on_the_labels(tmp_path, tiny_internvl, tiny_processor):
    """judgement_context 'plus': every judgement token in the row is '+' (what PRMScorer feeds), positions and scores
    are the labelled row's, and the hard loss still targets the labels: equal to the full-logits reference with the
    label tokens as targets on the '+' row."""
    labelled = image_rows(tmp_path, tiny_processor, soft=False)
    plus_id, minus_id = tiny_processor.tokenizer.convert_tokens_to_ids(["+", "-"])
    plus_rows = [dict(r, input_ids=list(r["input_ids"])) for r in labelled]
    for r in plus_rows:
        for q in r["judgement_positions"]:
            r["input_ids"][q] = plus_id
    question, steps = "<image>\nAdd the numbers.", ["3 + 7 = 10.", "10 + 5 = 15.", "Answer: \\boxed{16}"]
    built = encode_row(tiny_processor, question, steps, [True, True, False], [labelled[0]["image_paths"][0]], 1,
                       system=None, plus_context=True)
    assert built["input_ids"] == plus_rows[0]["input_ids"] != labelled[0]["input_ids"]
    assert built["judgement_positions"] == labelled[0]["judgement_positions"]
    assert built["scores"] == labelled[0]["scores"] == [1.0, 1.0, 0.0]

    batch = PRMCollator(tiny_processor)(plus_rows)
    reference_model = copy.deepcopy(tiny_internvl)
    trainer = VisualPRMTrainer(tiny_internvl, args=config(tmp_path, judgement_context="plus"),
                               processing_class=tiny_processor)
    loss = trainer.compute_loss(trainer.model, dict(batch))
    kwargs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values") if k in batch}
    with torch.no_grad():
        logits = reference_model(**kwargs).logits.float()
    r, p, ids = batch["judgement_rows"], batch["judgement_positions"], batch["input_ids"]
    targets = torch.where(batch["judgement_scores"] > 0, plus_id, minus_id)
    expected = torch.cat([F.cross_entropy(logits[r, p - 1], targets, reduction="none"),
                          F.cross_entropy(logits[r, p], ids[r, p + 1], reduction="none")]).mean()
    assert (ids[r, p] == plus_id).all() and (targets == minus_id).any()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)


def test_judgement_context_is_checked(tmp_path):
    with pytest.raises(PRMConfigError, match="judgement_context"):
        config(tmp_path, judgement_context="labels")
