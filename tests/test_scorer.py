"""PRM scoring (three methods agree; prefix reuse; LM head only at judgement positions), the GRPO reward
wrapper called as TRL's GRPOTrainer calls it, and the PRM evaluation metrics and job."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from reward.eval_job import best_threshold, grouped_step_auc, source_macro_f1, split_heldout, step_auc
from reward.prm_metrics import step_f1
from reward.prm_data import encode_prefix, encode_steps, judgement_ids
from reward.scorer import AGGREGATORS, Aggregation, PRMScorer, ScoringMethod, as_grpo_reward
from reward.step_settings import StepSettings
from rlhf.errors import UserError
from tests.conftest import write_image

QUESTION = "<image>\nAdd the numbers shown by the coloured tiles."
SOLUTIONS = [
    "The tiles show 3, 7 and 5.\n\n3 + 7 = 10.\n\n10 + 5 = 15.\n\nAnswer: \\boxed{15}",
    "The tiles show 3 and 7.\n\nAnswer: \\boxed{10}",
    ["First, read the values.", "3 + 7 = 11.", "Then add them one at a time.", "11 + 5 = 16.", "Answer: 16"],
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: tiny models run on one thread


@pytest.fixture(scope="module")
def model_and_processor():
    from rlhf.tiny import build_internvl, build_processor

    processor = build_processor()
    return build_internvl(processor, seed=0).eval(), processor


@pytest.fixture(scope="module")
def image():
    img = Image.new("RGB", (224, 112), (30, 30, 30))
    img.paste((200, 40, 40), (10, 10, 100, 100))
    img.paste((40, 200, 40), (120, 10, 210, 100))
    return img


def _scorers(model, processor, **kwargs):
    return {m: PRMScorer(model, processor, method=m, **kwargs) for m in ScoringMethod}


@pytest.mark.parametrize("with_image", [True, False])
def test_three_methods_agree_and_shared_prefix_does_least_work(model_and_processor, image, with_image):
    model, processor = model_and_processor
    images = [image] if with_image else []
    question = QUESTION if with_image else QUESTION.removeprefix("<image>\n")
    scorers = _scorers(model, processor, batch_size=2, max_patches=4)  # 3 solutions: two chunks of bodies
    results = {m: s.score_many(question, images, SOLUTIONS) for m, s in scorers.items()}
    reference = results[ScoringMethod.PER_STEP]
    assert [len(r.step_scores) for r in reference] == [4, 2, 5]
    for method, result in results.items():
        for got, want in zip(result, reference):
            assert got.step_scores == pytest.approx(want.step_scores, abs=1e-5), method
            assert got.score == pytest.approx(sum(want.step_scores) / len(want.step_scores), abs=1e-5)
    flat = [p for r in reference for p in r.step_scores]
    assert max(flat) - min(flat) > 1e-3  # the scores differ, so a mixed-up row or position would show

    # exact work: P prefix tokens, body lengths B_i, judgement offsets o_ij, T tiles
    tiles = processor.image_processor.num_tiles(*image.size, 4) if with_image else 0
    prefix = len(encode_prefix(processor, question, [tiles] if with_image else []))
    bodies = [encode_steps(processor, scorers[ScoringMethod.PER_STEP].steps_of(s)) for s in SOLUTIONS]
    stats = {m: s.stats for m, s in scorers.items()}
    assert stats[ScoringMethod.SHARED_PREFIX].tokens == prefix + sum(len(ids) for ids, _ in bodies)
    assert stats[ScoringMethod.SHARED_PREFIX].forwards == 1 + 2
    assert stats[ScoringMethod.PER_SOLUTION].tokens == sum(prefix + len(ids) for ids, _ in bodies)
    assert stats[ScoringMethod.PER_STEP].tokens == sum(prefix + o for _, offsets in bodies for o in offsets)
    assert stats[ScoringMethod.PER_STEP].forwards == 4 + 2 + 5
    assert stats[ScoringMethod.SHARED_PREFIX].image_tiles == tiles
    assert stats[ScoringMethod.PER_SOLUTION].image_tiles == 3 * tiles
    assert stats[ScoringMethod.PER_STEP].image_tiles == 11 * tiles


def test_step_score_is_p_plus_from_the_full_model_logits(model_and_processor, image):
    """Reference: the top-level model's full-vocabulary logits, softmax over {+, -} one position before each
    judgement token; the scorer must match while applying the LM head only to the judgement rows."""
    model, processor = model_and_processor
    scorer = PRMScorer(model, processor, max_patches=4)
    seen = []
    hook = scorer.lm_head.register_forward_hook(lambda mod, inp, out: seen.append(tuple(inp[0].shape)))
    try:
        got = scorer.score(QUESTION, [image], SOLUTIONS[0])
    finally:
        hook.remove()
    assert seen == [(4, model.config.text_config.hidden_size)]  # 4 steps -> 4 rows, never (batch, seq, vocab)

    tiles = processor.image_processor.tiles(image, 4)
    prefix = encode_prefix(processor, QUESTION, [len(tiles)])
    body, offsets = encode_steps(processor, scorer.steps_of(SOLUTIONS[0]))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prefix + body]),
                       pixel_values=processor.image_processor.to_tensor(tiles)).logits[0]
    plus, minus = judgement_ids(processor)
    want = [torch.softmax(logits[len(prefix) + o - 1, [plus, minus]], -1)[0].item() for o in offsets]
    assert got.step_scores == pytest.approx(want, abs=1e-5)


def test_training_and_scoring_compute_the_same_p_plus(model_and_processor, tmp_path):
    """P(+) has one home (`reward.prm_losses.plus_probability`): the trainer's evaluation P(+) of a training row whose
    judgements are all written as '+' (`plus_context`, the context the scorer judges in) equals the scorer's step
    scores of the same solution, image included."""
    from reward.prm_collator import PRMCollator, encode_row
    from reward.prm_config import VisualPRMConfig
    from reward.prm_trainer import VisualPRMTrainer

    model, processor = model_and_processor
    path = write_image(tmp_path / "a.png", size=(224, 112))
    steps = ["The tiles show 3 and 7.", "3 + 7 = 11.", "Answer: 11"]
    row = encode_row(processor, QUESTION, steps, [True, False, False], [str(path)], 4, plus_context=True)
    args = VisualPRMConfig(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True)
    trainer = VisualPRMTrainer(model, args=args, processing_class=processor)
    with torch.no_grad():
        _, p_plus = trainer.judgement_loss(model, PRMCollator(processor)([row]))
    scored = PRMScorer(model, processor, max_patches=4).score(QUESTION, [path], steps).step_scores
    assert len(scored) == 3 and max(scored) - min(scored) > 1e-4  # distinct numbers, so a shifted row would show
    assert p_plus.tolist() == pytest.approx(scored, abs=1e-5)


def test_images_change_the_scores(model_and_processor, image):
    model, processor = model_and_processor
    scorer = PRMScorer(model, processor, max_patches=4)
    other = Image.new("RGB", (112, 112), (250, 250, 250))
    a = scorer.score(QUESTION, [image], SOLUTIONS[1]).step_scores
    b = scorer.score(QUESTION, [other], SOLUTIONS[1]).step_scores
    assert max(abs(x - y) for x, y in zip(a, b)) > 1e-5


def test_aggregations_worked_numbers(model_and_processor):
    steps = [0.9, 0.5, 0.7]
    expected = {Aggregation.MEAN: 0.7, Aggregation.MIN: 0.5, Aggregation.PRODUCT: 0.9 * 0.5 * 0.7,
                Aggregation.LAST: 0.7}
    assert set(AGGREGATORS) == set(Aggregation)
    for agg, value in expected.items():
        assert AGGREGATORS[agg](steps) == pytest.approx(value)
    model, processor = model_and_processor
    scorer = PRMScorer(model, processor, aggregation="min")
    result = scorer.score_many("What is 2 + 2?", None, ["2 + 2 = 4.\n\nAnswer: 4", "  \n\n "])
    assert result[0].score == min(result[0].step_scores)
    assert (result[1].step_scores, result[1].score) == ([], 0.0)  # no step: the lowest possible score
    with pytest.raises(ValueError, match="aggregation must be one of mean, min, product, last"):
        PRMScorer(model, processor, aggregation="median")


def test_text_solutions_are_split_with_max_steps_per_solution(model_and_processor):
    model, processor = model_and_processor
    scorer = PRMScorer(model, processor, settings=StepSettings(max_steps_per_solution=2))
    text = "a + b.\n\nc + d.\n\nAnswer: 4"  # 3 steps, max 2 -> k = 2: ["a + b.\n\nc + d.", "Answer: 4"]
    merged = scorer.score("What?", [], text)
    as_list = scorer.score("What?", [], ["a + b.\n\nc + d.", "Answer: 4"])
    assert len(merged.step_scores) == 2 and merged.step_scores == as_list.step_scores


def test_text_solutions_are_split_with_step_split(model_and_processor):
    model, processor = model_and_processor
    scorer = PRMScorer(model, processor, settings=StepSettings(step_split=r"(?<=,)(?= )"))
    text = "a is 3, b is 4.\n\nAnswer: 7"
    assert scorer.steps_of(text) == ["a is 3,", "b is 4.", "Answer: 7"]
    assert scorer.score("What?", [], text).step_scores == scorer.score("What?", [], scorer.steps_of(text)).step_scores
    with pytest.raises(UserError, match="step_split: not a regular expression"):
        StepSettings(step_split="[")


def test_text_only_model_methods_agree():
    from rlhf.models import load_model_and_processor

    model, tokenizer = load_model_and_processor("tiny-qwen2")
    model.eval()
    results = {m: s.score_many("What is 6 + 8?", None, SOLUTIONS) for m, s in _scorers(model, tokenizer).items()}
    for result in results.values():
        for got, want in zip(result, results[ScoringMethod.PER_STEP]):
            assert got.step_scores == pytest.approx(want.step_scores, abs=1e-5)
    with pytest.raises(ValueError, match="text-only"):
        PRMScorer(model, tokenizer).score("q", [Image.new("RGB", (8, 8))], "a")


# -- GRPO ---------------------------------------------------------------------------------------------------------


def test_grpo_reward_called_like_grpo_trainer(model_and_processor, image):
    """TRL 1.16 `GRPOTrainer._calculate_rewards` calls `reward_func(prompts=..., completions=..., completion_ids=...,
    **reward_kwargs)`: every dataset column but prompt/completion as a list, plus trainer_state, log_extra and
    log_metric. With an image column, prompts are conversational with the images put in by
    `prepare_multimodal_messages`; completions are [{"role": "assistant", "content": text}]."""
    from trl.data_utils import prepare_multimodal_messages

    model, processor = model_and_processor
    scorer = PRMScorer(model, processor, max_patches=4)
    other = Image.new("RGB", (112, 112), (250, 250, 250))
    questions = ["Add the numbers.", "Add the numbers."]  # same text, different images: two groups
    dataset_images = [[image], [other]]
    G = 2
    prompts, images, texts = [], [], []
    for q, imgs in zip(questions, dataset_images):
        for g in range(G):  # the trainer repeats each prompt G times, consecutively
            prompts.append(prepare_multimodal_messages([{"role": "user", "content": q}], images=imgs))
            images.append(imgs)
            texts.append(SOLUTIONS[g])
    completions = [[{"role": "assistant", "content": t}] for t in texts]
    reward = as_grpo_reward(scorer)
    assert reward.__name__ == "prm_mean"
    scorer.stats.reset()
    got = reward(prompts=prompts, completions=completions, completion_ids=[[1, 2]] * 4, images=images,
                 answer=["15"] * 4, trainer_state=None, log_extra=lambda *a: None, log_metric=lambda *a: None)
    assert scorer.stats.forwards == 2 * 2  # per question: one prefix pass + one pass over its G bodies
    want = [scorer.score(q, imgs, t).score for q, imgs, t in zip(["Add the numbers."] * 4, images, texts)]
    assert got == pytest.approx(want, abs=1e-6)
    assert got[0] != pytest.approx(got[2], abs=1e-6)  # same completion, different image

    # plain-text prompts and a single-image `image` column; the question from another column
    reward = as_grpo_reward(scorer, question_key="question")
    got2 = reward(prompts=["ignored"] * 4, completions=texts, question=["Add the numbers."] * 4,
                  image=[imgs[0] for imgs in images], trainer_state=None)
    assert got2 == pytest.approx(want, abs=1e-6)


# -- PRM evaluation metrics -----------------------------------------------------------------------------------------


def test_step_f1_worked_numbers():
    """labels + + - (neutral) - +, probs .9 .4 .3 .99 .6 .7, threshold .5 -> predictions + - - (ignored) + +.
    Positive class: tp 2 (steps 1, 6), fn 1 (step 2), fp 1 (step 5): F1 = 4 / 6.
    Negative class: tp 1 (step 3), fn 1 (step 5), fp 1 (step 2): F1 = 2 / 4. Macro = 7 / 12."""
    r = step_f1([True, True, False, None, False, True], [0.9, 0.4, 0.3, 0.99, 0.6, 0.7], 0.5)
    assert r == pytest.approx({"f1_positive": 4 / 6, "f1_negative": 0.5, "macro_f1": 7 / 12,
                               "n_positive": 3, "n_negative": 2})


def test_grouped_step_auc_counts_pairs_inside_a_group_only():
    # group a: right 0.9, 0.5 vs wrong 0.5 -> 1 + 0.5 of 2 pairs; group b: right 0.2 vs wrong 0.3, 0.1 -> 1 of 2;
    # group c has one class only and adds no pair; None labels are ignored. (1.5 + 1) / 4
    labels = [True, True, False, True, False, False, True, None]
    probs = [0.9, 0.5, 0.5, 0.2, 0.3, 0.1, 0.99, 0.0]
    groups = ["a", "a", "a", "b", "b", "b", "c", "b"]
    assert grouped_step_auc(labels, probs, groups) == pytest.approx(2.5 / 4)
    # pooled, the same steps rank differently: group b's low scores count against group a's wrong step
    assert step_auc(labels, probs) != pytest.approx(2.5 / 4)
    # a score that depends on the group alone (the image and the position, not the step) is exactly 0.5 inside it
    by_group = {"a": 0.8, "b": 0.3, "c": 0.6}
    assert grouped_step_auc(labels, [by_group[g] for g in groups], groups) == 0.5
    assert step_auc(labels, [by_group[g] for g in groups]) > 0.5  # while its pooled AUC is not
    assert grouped_step_auc([True, False], [0.4, 0.6], ["a", "b"]) is None
    with pytest.raises(ValueError, match="2 labels, 2 scores and 1 groups"):
        grouped_step_auc([True, False], [0.4, 0.6], ["a"])


def test_step_auc_worked_numbers():
    """Same steps: + scores .9 .4 .7, - scores .3 .6 (the neutral .99 ignored). Of the 3 x 2 pairs, + above - in
    (.9,.3) (.9,.6) (.4,.3) (.7,.3) (.7,.6): 5 / 6. A tie counts half; one class alone gives None."""
    assert step_auc([True, True, False, None, False, True], [0.9, 0.4, 0.3, 0.99, 0.6, 0.7]) == pytest.approx(5 / 6)
    assert step_auc([True, False, True, False], [0.9, 0.1, 0.4, 0.4]) == pytest.approx(3.5 / 4)
    assert step_auc([False, True], [0.8, 0.2]) == 0.0 and step_auc([True, True], [0.1, 0.2]) is None
    with pytest.raises(ValueError, match="2 labels but 1 scores"):
        step_auc([True, False], [0.5])


def test_source_macro_f1_averages_sources():
    """Source b: labels - -, probs .2 .8 -> predictions - +: F1(+) = 0 (tp 0, fp 1), F1(-) = 2/3 -> macro 1/3.
    Mean over sources = (7/12 + 1/3) / 2 = 11/24."""
    by_source = {"a": ([True, True, False, None, False, True], [0.9, 0.4, 0.3, 0.99, 0.6, 0.7]),
                 "b": ([False, False], [0.2, 0.8])}
    r = source_macro_f1(by_source, 0.5)
    assert r["per_source"]["b"]["macro_f1"] == pytest.approx(1 / 3)
    assert r["macro_f1"] == pytest.approx(11 / 24)


def test_best_threshold_worked_numbers():
    """labels + + - -, probs .9 .6 .6 .2. Candidates 0, .2, .6, .9 (predict + iff p > t):
    t=0: all + -> F1(+) 4/6, F1(-) 0 -> 1/3;  t=.2: + + + - -> 4/5, 2/3 -> 11/15;
    t=.6: + - - - -> 2/3, 4/5 -> 11/15;      t=.9: all - -> 0, 4/6 -> 1/3.
    .2 and .6 tie; .6 is closer to .5."""
    by_source = {"s": ([True, True, False, False], [0.9, 0.6, 0.6, 0.2])}
    assert best_threshold(by_source) == 0.6
    assert source_macro_f1(by_source, 0.6)["macro_f1"] == pytest.approx(11 / 15)


def test_split_heldout_per_source_and_seeded():
    sources = ["a"] * 10 + ["b"] * 3 + ["c"]
    held, rest = split_heldout(sources, 0.3, seed=1)
    assert sorted(held + rest) == list(range(14))
    assert [sources[i] for i in held].count("a") == 3 and [sources[i] for i in held].count("b") == 1
    assert "c" not in [sources[i] for i in held]  # a source keeps at least one solution for evaluation
    assert split_heldout(sources, 0.3, seed=1) == (held, rest)
    assert split_heldout(sources, 0.3, seed=2) != (held, rest)


def _write_bench(root: Path) -> Path:
    write_image(root / "a.png")
    rows = [
        {"image": "a.png", "question": "Add.", "source": "tiles",
         "response": {"steps": ["Read 3 and 7.", "3 + 7 = 10.", "Answer: 10"], "process_correctness": [1, 1, 1]}},
        {"image": "a.png", "question": "Add.", "source": "tiles",
         "response": {"steps": ["Read 3 and 7.", "3 + 7 = 11."], "process_correctness": [1, -1]}},
        {"question": "What is 6 + 8?",
         "response": {"steps": ["Read 6 and 8.", "6 + 8 = 15.", "Answer: 15"], "process_correctness": [0, -1, -1]}},
        {"question": "What is 4 + 4?", "response": {"steps": ["4 + 4 = 8."], "process_correctness": [1]}},
    ]
    path = root / "mathbench.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_eval_prm_job(tmp_path):
    from rlhf.cli import main

    data = _write_bench(tmp_path)
    config = tmp_path / "eval.yaml"
    config.write_text(f"model_name_or_path: tiny-internvl\ndata: [{data}]\noutput_dir: {tmp_path / 'out'}\n"
                      "max_patches: 1\ndevice: cpu\nthreshold: 0.53\n")
    assert main(["eval-prm", "--config", str(config)]) == 0
    result = json.loads((tmp_path / "out" / "prm_eval.json").read_text())
    rows = [json.loads(line) for line in (tmp_path / "out" / "prm_scores.jsonl").read_text().splitlines()]
    assert [r["source"] for r in rows] == ["tiles", "tiles", "mathbench", "mathbench"]  # no key: the file name
    assert (result["threshold"], result["threshold_from"]) == (0.53, "fixed")
    assert result["per_source"]["tiles"]["n_positive"] == 4 and result["per_source"]["tiles"]["n_negative"] == 1
    assert result["per_source"]["mathbench"]["n_positive"] == 1  # the neutral step is ignored
    assert result["per_source"]["mathbench"]["n_negative"] == 2
    by_source: dict = {}
    for r in rows:
        labels, probs = by_source.setdefault(r["source"], ([], []))
        labels += [None if c == 0 else c == 1 for c in r["process_correctness"]]
        probs += r["step_scores"]
    assert result["macro_f1"] == pytest.approx(source_macro_f1(by_source, 0.53)["macro_f1"])
    assert result["scoring"]["forwards"] == 2 + 2 + 2  # rows 1-2 share their prefix: 3 questions, 2 passes each
    assert "| **mean over sources** |" in (tmp_path / "out" / "prm_eval.md").read_text()

    # threshold chosen on a held-out file: the best threshold of its scores, then all of `data` evaluated
    assert main(["eval-prm", "--config", str(config), "--threshold_data", str(data),
                 "--output_dir", str(tmp_path / "out2")]) == 0
    chosen = json.loads((tmp_path / "out2" / "prm_eval.json").read_text())
    assert chosen["threshold"] == best_threshold(by_source)
    assert chosen["macro_f1"] == pytest.approx(source_macro_f1(by_source, chosen["threshold"])["macro_f1"])
    assert chosen["macro_f1"] >= result["macro_f1"] - 1e-12 and not math.isnan(chosen["macro_f1"])

    # threshold chosen on half of every source's solutions, evaluated on the other half
    assert main(["eval-prm", "--config", str(config), "--threshold_split_ratio", "0.5",
                 "--output_dir", str(tmp_path / "out3")]) == 0
    split = json.loads((tmp_path / "out3" / "prm_eval.json").read_text())
    held = [r for r in map(json.loads, (tmp_path / "out3" / "prm_scores.jsonl").read_text().splitlines())
            if r["heldout"]]
    assert (split["heldout"]["n_solutions"], split["n_solutions"]) == (2, 2)
    assert sorted(r["source"] for r in held) == ["mathbench", "tiles"]
