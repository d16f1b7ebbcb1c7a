"""Demo stage 1 (data_gen/demo/sft.py) and the accuracy helpers (data_gen/demo/accuracy.py), on the tiny InternVL."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import InternVLForConditionalGeneration, TrainerCallback

from data_gen.demo.accuracy import FirstError, first_error, first_errors, greedy_accuracy, majority_correct
from data_gen.demo.sft import (
    CONFIG_FILE,
    DONE_FILE,
    FINAL_DIR,
    IGNORE_INDEX,
    QUICK,
    RESPONSES_FILE,
    SFTArguments,
    SFTCollator,
    TileSumItems,
    parse,
    train_sft,
)
from data_gen.demo.task import TileSumTask
from rlhf.errors import UserError
from rlhf.processing import IM_END, InternVLChatProcessor
from rlhf.tiny import TinySizes, build_internvl

RECIPE = Path(__file__).resolve().parents[1] / "data_gen" / "recipes" / "demo" / "sft.yaml"
# 6 steps of 8 items, a checkpoint every 3 steps, 4 greedy test items and 2 samples each: a few seconds on a CPU
RUN = dict(steps=6, batch_size=8, learning_rate=2e-3, seed=0, save_steps=3, logging_steps=3, eval_items=4,
           eval_samples=2, eval_batch_size=4, progress=False)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread for this module: on a CPU shared with other jobs, two spinning threads per step make the
    runs several times slower (results are the same up to float rounding)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread) -> Path:
    return train_sft(tmp_path_factory.mktemp("sft") / "run", **RUN)


def fixed_batch(processor):
    """Items 0-7 of the test split, encoded as in training."""
    return SFTCollator(processor)(list(TileSumItems(TileSumTask(), 8, split="test")))


def batch_loss(model, batch) -> float:
    with torch.no_grad():
        return model.eval()(**batch).loss.item()


# -- the collator ------------------------------------------------------------------------------------------------


def test_collator_labels_only_the_answer_and_im_end(tiny_processor):
    """Train items 0 (5 tiles) and 1 (4 tiles). Prompt = 47 tokens for both: `<|im_start|>user\\n` (3) + `<img>`,
    16 image tokens, `</img>` (18) + `\\n{question}<|im_end|>\\n<|im_start|>assistant\\n` (26). Answers =
    solution + `<|im_end|>`: 77 and 60 tokens, so the batch is 47 + 77 = 124 wide and row 1 has 17 pad tokens."""
    items = [TileSumItems(TileSumTask(), 2)[i] for i in range(2)]
    batch = SFTCollator(tiny_processor)(items)
    assert batch["input_ids"].shape == (2, 124)
    assert batch["pixel_values"].shape == (2, 3, 112, 112)  # one 112 px tile per image
    assert batch["attention_mask"].sum(1).tolist() == [124, 107]
    tok = tiny_processor.tokenizer
    for row, (item, n_answer) in enumerate(zip(items, (77, 60))):
        ids, labels = batch["input_ids"][row], batch["labels"][row]
        assert (labels[:47] == IGNORE_INDEX).all() and (labels[47 + n_answer:] == IGNORE_INDEX).all()
        assert labels[47:47 + n_answer].tolist() == ids[47:47 + n_answer].tolist()
        assert tok.decode(labels[47:47 + n_answer]) == item["solution"] + IM_END
        assert labels[47 + n_answer - 1].item() == tiny_processor.im_end_id
        assert tok.decode(ids[:47]).endswith("top to bottom.<|im_end|>\n<|im_start|>assistant\n")
        assert (ids == tiny_processor.image_token_id).sum().item() == 16
    assert (batch["input_ids"][1, 107:] == tok.pad_token_id).all()


def test_collator_cell_labels_give_each_image_token_its_cells_digit(tiny_processor):
    """Train item 0: tiles in cells 0, 2, 4, 13, 15 with values 6, 5, 8, 3, 2; item 1: cells 0, 4, 6, 14 with 5, 2,
    5, 1. Image token k covers cell k (one 28 px cell per token after pixel-unshuffle, both row-major); the digits
    0-9 are tokens 21-30 of the tiny tokenizer, so an empty cell is 21 and a 6 is 27."""
    items = [TileSumItems(TileSumTask(), 2)[i] for i in range(2)]
    batch = SFTCollator(tiny_processor)(items)
    boards = [[6, 0, 5, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 3, 0, 2], [5, 0, 0, 0, 2, 0, 5, 0, 0, 0, 0, 0, 0, 0, 1, 0]]
    assert batch["cell_labels"].tolist() == [[21 + v for v in board] for board in boards]
    assert [tiny_processor.tokenizer.decode([t]) for t in batch["cell_labels"][0, :3]] == ["6", "0", "5"]
    plain = [{k: v for k, v in e.items() if k not in ("cells", "values", "grid")} for e in items]
    assert "cell_labels" not in SFTCollator(tiny_processor)(plain)  # no board, no target


def test_pixel_unshuffle_puts_cell_k_at_image_token_k():
    """The cell target's premise: InternVL's pixel-unshuffle (scale 0.5) of the 8 x 8 patch grid of a 112 px tile
    gives 16 tokens, token k made of the 2 x 2 patches of cell k (row-major, 28 px cells)."""
    from transformers.models.internvl.modeling_internvl import InternVLModel

    patches = torch.arange(64.0).reshape(1, 8, 8, 1)  # patch index row * 8 + col
    tokens = InternVLModel.pixel_shuffle(None, patches, 0.5).reshape(16, 4)
    for k in range(16):
        row, col = divmod(k, 4)
        assert sorted(tokens[k].long().tolist()) == [16 * row + 2 * col, 16 * row + 2 * col + 1,
                                                     16 * row + 2 * col + 8, 16 * row + 2 * col + 9]


def test_reading_target_adds_the_weighted_cell_cross_entropy(tiny_processor, tmp_path):
    """compute_loss with reading_loss_weight w = the model's answer loss + w * cross-entropy of the model's own
    logits at the 16 image tokens against the cell digits, computed here from a plain forward pass."""
    from transformers import TrainingArguments

    from data_gen.demo.sft import _sft_trainer_class

    batch = SFTCollator(tiny_processor)([TileSumItems(TileSumTask(), 2)[i] for i in range(2)])
    model = build_internvl(tiny_processor, TinySizes(), seed=0).eval()
    plain = {k: v for k, v in batch.items() if k != "cell_labels"}
    with torch.no_grad():
        out = model(**plain)
    image = plain["input_ids"] == tiny_processor.image_token_id
    expected = torch.nn.functional.cross_entropy(out.logits[image], batch["cell_labels"].flatten())
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    for weight in (0.0, 0.5):
        trainer = _sft_trainer_class()(model=model, args=args, processing_class=tiny_processor,
                                       reading_loss_weight=weight)
        with torch.no_grad():
            loss = trainer.compute_loss(model, dict(batch))
        assert loss.item() == pytest.approx(out.loss.item() + weight * expected.item(), rel=1e-5)
    assert expected.item() == pytest.approx(6.4312, abs=2e-3)  # the random head: near ln(640) = 6.46


# -- training, saving, resuming ----------------------------------------------------------------------------------


def test_training_lowers_the_loss_on_a_fixed_batch(trained, tiny_processor):
    """Cross-entropy on the answer tokens of 8 test items: the random model starts near ln(640) = 6.46 and six AdamW
    steps (lr 2e-3, cosine) bring it down. The seed fixes the weights and the data order, so the values are exact
    up to float rounding."""
    batch = fixed_batch(tiny_processor)
    before = batch_loss(build_internvl(tiny_processor, TinySizes(), seed=0), batch)
    after = batch_loss(InternVLForConditionalGeneration.from_pretrained(trained), batch)
    assert before == pytest.approx(6.3856, abs=2e-3)
    assert after == pytest.approx(4.4620, abs=2e-3)


def test_saved_model_loads_and_reproduces_the_greedy_responses(trained):
    processor = InternVLChatProcessor.from_pretrained(trained)
    model = InternVLForConditionalGeneration.from_pretrained(trained)
    items = TileSumTask().items("test", 4)
    acc, responses = greedy_accuracy(model, processor, items, batch_size=4)
    stored = [json.loads(line) for line in (trained.parent / RESPONSES_FILE).read_text().splitlines()]
    assert [r["id"] for r in stored] == [it.id for it in items]
    assert [r["response"] for r in stored] == responses
    done = json.loads((trained.parent / DONE_FILE).read_text())
    assert done["model"] == FINAL_DIR and done["metrics"]["steps"] == 6
    assert done["metrics"]["greedy_accuracy"] == acc == 0.0  # six steps do not teach the task
    assert set(done["metrics"]) >= {"pass@2", "majority@2", "s_per_step", "cpu_s_per_step", "train_loss"}
    assert json.loads((trained / "mmalign_tiny.json").read_text()) == vars(TinySizes())


def test_greedy_batched_equals_one_at_a_time(trained):
    """Prompts of different lengths (extra words on some questions) so that the batch is really left-padded."""
    processor = InternVLChatProcessor.from_pretrained(trained)
    model = InternVLForConditionalGeneration.from_pretrained(trained)
    items = TileSumTask().items("test", 5)
    items = [replace(it, question=it.question + " Show your work." * (i % 3)) for i, it in enumerate(items)]
    _, batched = greedy_accuracy(model, processor, items, batch_size=5, max_new_tokens=24)
    alone = [greedy_accuracy(model, processor, [it], batch_size=1, max_new_tokens=24)[1][0] for it in items]
    assert batched == alone
    assert len(set(batched)) > 1  # not one constant string


class _Interrupt(TrainerCallback):
    """Stops the run (as a killed process would) right after the checkpoint of step 3 is written."""

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == 3:
            raise KeyboardInterrupt


def test_resumed_run_equals_uninterrupted_run_and_rerun_is_skipped(trained, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train_sft(out, **RUN, callbacks=[_Interrupt()])
    assert (out / "checkpoint-3").is_dir() and not (out / DONE_FILE).exists()
    final = train_sft(out, **RUN)  # resumes from checkpoint-3
    done = json.loads((out / DONE_FILE).read_text())
    assert done["metrics"]["timed_steps"] == 3  # only steps 4-6 ran in the second call
    resumed, uninterrupted = load_file(final / "model.safetensors"), load_file(trained / "model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)

    stamp = (final / "model.safetensors").stat().st_mtime_ns
    assert train_sft(out, **RUN) == final  # finished: nothing runs
    assert (final / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(UserError, match=r"holds a demo SFT run with other settings \(steps: 6 there, 7 now, "
                       r"num_train_items: 48 there, 56 now\); choose another output_dir or delete that one$"):
        train_sft(out, **(RUN | {"steps": 7}))
    assert json.loads((out / CONFIG_FILE).read_text())["steps"] == 6


def test_bad_settings_are_one_line(tmp_path):
    with pytest.raises(UserError, match=r"^demo SFT: invalid steps=0, learning_rate=-1\.0 "):
        train_sft(tmp_path, steps=0, batch_size=8, learning_rate=-1.0)


# -- the recipe --------------------------------------------------------------------------------------------------


def test_recipe_and_quick_variant():
    args = parse(["--config", str(RECIPE)])
    kwargs = args.train_kwargs()
    assert isinstance(args, SFTArguments) and kwargs["task"] == TileSumTask(min_tiles=4, max_tiles=5)
    assert kwargs["sizes"] == TinySizes() and kwargs["eval_samples"] == 8
    quick = parse(["--config", str(RECIPE), "--quick", "--output_dir", "elsewhere"])
    assert quick.output_dir == "elsewhere"
    assert {k: quick.train_kwargs()[k] for k in QUICK} == QUICK
    assert QUICK["steps"] * QUICK["batch_size"] <= 100  # under a minute on 2 CPU cores


def test_curriculum_by_mixture_trains_on_fewer_tiles_and_validates_on_the_task():
    args = parse(["--config", str(RECIPE), "--train_min_tiles", "1"])
    kwargs = args.train_kwargs()
    assert kwargs["task"] == TileSumTask(min_tiles=4, max_tiles=5)
    assert kwargs["train_task"] == TileSumTask(min_tiles=1, max_tiles=5)
    from data_gen.demo.sft import TileSumItems

    counts = {len(TileSumItems(kwargs["train_task"], 200)[i]["solution"].split("\n\n")) - 1 for i in range(200)}
    assert counts == {1, 2, 3, 4, 5}  # reading + (n - 1) sums + answer = n + 1 steps: 1 to 5 tiles


# -- the accuracy helpers ----------------------------------------------------------------------------------------


def test_majority_vote_and_first_errors():
    # answers 7, 9, 9, none, 7: 7 and 9 both twice -> the tie goes to 7, seen first
    responses = ["\\boxed{7}", "\\boxed{9}", "Answer: \\boxed{9}", "no idea", "\\boxed{7}"]
    assert majority_correct(responses, [True, False, False, False, True]) is True
    assert majority_correct(responses[1:3], [True, True]) is True
    assert majority_correct(["no idea", "none"], [False, False]) is False

    item = TileSumTask().item("test", 0)  # values [a, b, ...]: build responses from its gold solution
    steps = item.solution.split("\n\n")
    wrong_read = steps[0].replace(str(item.values[0]), str(item.values[0] % 9 + 1), 1)
    wrong_sum = steps[1][: steps[1].rindex("=")] + "= 99."
    cases = {
        FirstError.NONE: item.solution,
        FirstError.READING: "\n\n".join([wrong_read, *steps[1:]]),
        FirstError.SUM: "\n\n".join([steps[0], wrong_sum, *steps[2:]]),
        FirstError.ANSWER: "\n\n".join([*steps[:-1], "Answer: \\boxed{1}"]),
        FirstError.INCOMPLETE: "\n\n".join(steps[:-1]),
    }
    assert {kind: first_error(item, text) for kind, text in cases.items()} == {k: k for k in cases}
    assert first_error(item, "\n\n".join(["I see tiles.", *steps[1:]])) == FirstError.READING

    # One reading step per tile (`reading="per_tile"`): a misread at tile 3 is a reading error at step 3, an
    # unparseable step after a partial sum a sum error; in a two-claim step the wrong claim decides.
    tiles = TileSumTask(reading="per_tile").item("test", 0)
    steps = tiles.solution.split("\n\n")
    n = len(tiles.values)  # n readings, n - 1 partial sums, the answer
    wrong_read = f"Tile 3 shows {tiles.values[2] % 9 + 1}."
    wrong_sum = steps[n][: steps[n].rindex("=")] + "= 99."
    assert first_error(tiles, tiles.solution) == FirstError.NONE
    assert first_error(tiles, "\n\n".join([*steps[:2], wrong_read, *steps[3:]])) == FirstError.READING
    assert first_error(tiles, "\n\n".join([*steps[:n], wrong_sum, *steps[n + 1:]])) == FirstError.SUM
    assert first_error(tiles, "\n\n".join([*steps[:-1], "Answer: \\boxed{1}"])) == FirstError.ANSWER
    assert first_error(tiles, "\n\n".join([steps[0], "I see tiles."])) == FirstError.READING
    assert first_error(tiles, "\n\n".join([*steps[: n + 1], "So far so good."])) == FirstError.SUM
    assert first_error(tiles, "\n\n".join([*steps[:2], wrong_read + "\n" + steps[n]])) == FirstError.READING
    assert first_error(tiles, "\n\n".join([*steps[:n - 1], steps[n - 1] + "\n" + wrong_sum])) == FirstError.SUM
    assert first_errors([item] * 3, [cases[FirstError.SUM]] * 2 + [item.solution]) == {
        "none": 1, "reading": 0, "sum": 2, "answer": 0, "incomplete": 0}


@pytest.mark.parametrize("reported, stopped_at, steps, checked", [(0.5, 2, 2, [2]), (0.3, None, 6, [2, 4])])
def test_stop_at_accuracy(tmp_path, monkeypatch, reported, stopped_at, steps, checked):
    """Training stops at the first check whose validation greedy accuracy reaches the threshold (0.4 here); the
    checks run every 2 steps from step 2 on (not at the last step), on validation items of the train split."""
    import data_gen.demo.accuracy as accuracy

    seen = []

    def fake_greedy(model, processor, items, **kwargs):
        seen.append([it.id for it in items])
        return reported, ["" for _ in items]

    monkeypatch.setattr(accuracy, "greedy_accuracy", fake_greedy)
    run = {**RUN, "eval_items": 0}
    final = train_sft(tmp_path / "run", **run, stop_at_accuracy=0.4, stop_check_every=2, stop_check_after=2,
                      stop_check_items=3)
    metrics = json.loads((tmp_path / "run" / DONE_FILE).read_text())["metrics"]
    assert metrics["steps"] == steps and metrics["stopped_at_step"] == stopped_at
    assert [step for step, _ in metrics["validation_history"]] == checked
    assert seen[0] == ["tilesum-train-2000000", "tilesum-train-2000001", "tilesum-train-2000002"]
    assert (final / "model.safetensors").is_file()


@pytest.mark.parametrize("accuracies, kept_step, restored", [
    ([0.2, 0.38, 0.9], 4, True),     # 38% at step 4 is in reach (>= 0.35): the jump to 90% at step 6 is undone
    ([0.2, 0.3, 0.9], 6, False),     # no earlier check at or above 0.35: the overshooting weights stay
    ([0.2, 0.38, 0.6], 6, False)])   # 60% is not above 0.65: an ordinary stop
def test_band_safe_stop_puts_back_the_last_check_below_the_jump(tmp_path, monkeypatch, accuracies, kept_step,
                                                                 restored):
    """With stop_overshoot_above, a check that jumps past the band restores the weights of the last check at or above
    stop_fallback_at_least: the saved policy equals the weights the model had at that check (compared with a run of
    the same seed and schedule stopped plainly at that step)."""
    import data_gen.demo.accuracy as accuracy
    from safetensors.torch import load_file

    answers = iter(accuracies)
    monkeypatch.setattr(accuracy, "greedy_accuracy", lambda model, processor, items, **kw: (next(answers), []))
    # (`answers` is looked up at each call, so the reference run below reads its own list)
    run = {**RUN, "steps": 8, "eval_items": 0, "save_steps": 2}
    final = train_sft(tmp_path / "run", **run, stop_at_accuracy=0.45, stop_check_every=2, stop_check_after=2,
                      stop_check_items=2, stop_overshoot_above=0.65, stop_fallback_at_least=0.35)
    metrics = json.loads((tmp_path / "run" / DONE_FILE).read_text())["metrics"]
    assert metrics["stopped_at_step"] == 6 and metrics["policy_step"] == kept_step
    assert metrics["restored_after_overshoot"] is restored
    assert metrics["policy_validation_accuracy"] == accuracies[kept_step // 2 - 1]
    # the same seed and schedule, stopped plainly at step `kept_step`: its weights are the policy's
    answers = iter([0.0] * (kept_step // 2 - 1) + [0.99])
    ref_final = train_sft(tmp_path / "ref", **run, stop_at_accuracy=0.45, stop_check_every=2, stop_check_after=2,
                          stop_check_items=2)
    ref = load_file(str(ref_final / "model.safetensors"))
    got = load_file(str(final / "model.safetensors"))
    assert set(ref) == set(got) and all(torch.equal(ref[k], got[k]) for k in ref)


def test_band_safe_stop_after_a_resume_puts_back_the_same_weights(tmp_path, monkeypatch):
    """Killed after the in-band check of step 4 (and its checkpoint), resumed: the jump at step 6 puts back step 4's
    weights, read from the run folder, exactly as an uninterrupted run does."""
    import data_gen.demo.accuracy as accuracy
    from safetensors.torch import load_file

    from transformers import TrainerCallback

    from data_gen.demo.sft import FALLBACK_FILE

    class Kill(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 4:
                raise KeyboardInterrupt

    answers = iter([0.2, 0.38, 0.9, 0.2, 0.38, 0.9])  # killed run, then resumed run, then uninterrupted
    monkeypatch.setattr(accuracy, "greedy_accuracy", lambda model, processor, items, **kw: (next(answers), []))
    run = {**RUN, "steps": 8, "eval_items": 0, "save_steps": 2, "stop_at_accuracy": 0.45, "stop_check_every": 2,
           "stop_check_after": 2, "stop_check_items": 2, "stop_overshoot_above": 0.65, "stop_fallback_at_least": 0.35}
    with pytest.raises(KeyboardInterrupt):
        train_sft(tmp_path / "run", **run, callbacks=[Kill()])
    assert (tmp_path / "run" / FALLBACK_FILE).is_file()
    final = train_sft(tmp_path / "run", **run)
    metrics = json.loads((tmp_path / "run" / DONE_FILE).read_text())["metrics"]
    assert metrics["policy_step"] == 4 and metrics["restored_after_overshoot"]
    whole = train_sft(tmp_path / "whole", **run)
    got, ref = load_file(str(final / "model.safetensors")), load_file(str(whole / "model.safetensors"))
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)


def test_band_safe_stop_settings_are_checked(tmp_path):
    with pytest.raises(UserError, match="stop_overshoot_above"):
        train_sft(tmp_path / "run", **{**RUN, "eval_items": 0}, stop_at_accuracy=0.45, stop_overshoot_above=0.3)


def test_stop_at_accuracy_must_be_a_fraction(tmp_path):
    with pytest.raises(UserError, match="stop_at_accuracy"):
        train_sft(tmp_path / "run", **{**RUN, "eval_items": 0}, stop_at_accuracy=1.5)


def test_demo_sft_is_a_registered_job(capsys):
    from rlhf import cli

    assert cli.JOBS["demo-sft"][0] == "data_gen.demo.sft:main"
    assert cli.main(["--help"]) == 0 and "demo-sft" in capsys.readouterr().out
