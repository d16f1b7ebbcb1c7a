"""The hf rollout backend (seeded per-sample decoding, left padding, assistant prefixes) and the rollout job."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from data_gen.backends import GenerationRequest, GenerationResult, RolloutBackend, SamplingParams
from data_gen.backends.hf import HFBackend, pick_tokens, sample_seed
from data_gen.prompts import build_prompt
from data_gen.job_common import BackendArguments, JobArguments, SamplingArguments, read_questions
from data_gen.rollout import RolloutArguments, run
from rlhf.jobs.runner import item_seed
from rlhf.processing import chat_prompt

QUESTIONS = Path(__file__).resolve().parents[1] / "recipes" / "data" / "tiny_questions"
RED, BLUE = Image.new("RGB", (112, 112), (200, 30, 30)), Image.new("RGB", (80, 140), (30, 30, 200))


@pytest.fixture
def lively(tiny_internvl):
    """The tiny InternVL with its text weights redrawn at std 0.15: at the usual 0.02 a random model repeats one
    token forever, which would make greedy comparisons say little."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in tiny_internvl.model.language_model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.15, generator=generator)
    return tiny_internvl


@pytest.fixture
def backend(lively, tiny_processor):
    return HFBackend(model=lively, processor=tiny_processor, batch_size=8)


def request(rid, prompt, images=(), seed=None, **sampling):
    sampling = {"temperature": 0.7, "max_new_tokens": 6, **sampling}
    return GenerationRequest(rid, prompt, list(images), SamplingParams(**sampling), seed=seed)


# -- sampling arithmetic -------------------------------------------------------------------------------------------

def test_pick_tokens_worked_numbers():
    # logits [2, 1, 0, -1] at temperature 1, top_k 2: p = e^2 / (e^2 + e^1) = 0.7311 for token 0, 0.2689 for token 1.
    # Inverse CDF over [0.7311, 1.0]: u = 0.5 -> token 0, u = 0.8 -> token 1. top_p 0.5: token 0 alone reaches 0.5.
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]] * 4)
    temperature = torch.tensor([1.0, 1.0, 1.0, 0.0])
    top_k = torch.tensor([2, 2, 0, 2])
    top_p = torch.tensor([1.0, 1.0, 0.5, 1.0])
    uniform = torch.tensor([0.5, 0.8, 0.99, 0.99])
    assert pick_tokens(logits, temperature, top_k, top_p, uniform).tolist() == [0, 1, 0, 0]
    # no cut at all, temperature 2: p ∝ e^{1, 0.5, 0, -0.5}; u = 0.9 lands in the last-but-one token's mass
    p = torch.softmax(torch.tensor([1.0, 0.5, 0.0, -0.5]), 0).cumsum(0)  # [0.455, 0.731, 0.899, 1.0]
    assert p[2] < 0.9 < p[3]
    assert pick_tokens(logits[:1], torch.tensor([2.0]), torch.tensor([0]), torch.tensor([1.0]),
                       torch.tensor([0.9])).tolist() == [3]


def test_sample_seed_is_stable():
    assert sample_seed(7, 0) == sample_seed(7, 0) != sample_seed(7, 1) != sample_seed(8, 0)
    assert 0 <= sample_seed(2**62, 31) < 2**63


# -- the hf backend ------------------------------------------------------------------------------------------------

def test_same_seed_same_texts_whatever_the_batch(backend):
    target = request("t", "<image>\nAdd the numbers.", [RED], seed=11, n=2)
    alone = backend.generate([target])[0]
    others = [request("o1", "What is 3 + 4? " * 3, seed=1, n=3),
              request("o2", "<image>\n<image>\nCompare.", [BLUE, RED], seed=2, temperature=1.0, top_k=None)]
    backend.batch_size = 4  # rows 0-2 of o1 + row 0 of target in one batch, row 1 of target with o2
    mixed = backend.generate([others[0], target, others[1]])
    assert mixed[1].texts == alone.texts
    assert len(set(alone.texts)) == 2  # the two samples draw from different generators
    backend.batch_size = 1
    assert backend.generate([target])[0].texts == alone.texts
    other_seed = backend.generate([request("t", "<image>\nAdd the numbers.", [RED], seed=12, n=2)])[0]
    assert other_seed.texts != alone.texts


def test_n_samples_are_a_prefix_of_more_samples(backend):
    two = backend.generate([request("a", "What is 2 + 2?", seed=5, n=2)])[0]
    four = backend.generate([request("a", "What is 2 + 2?", seed=5, n=4)])[0]
    assert len(four.texts) == 4 and four.texts[:2] == two.texts
    # nothing stops a random model early here: 6 tokens per sample
    assert (two.num_generated_tokens, four.num_generated_tokens) == (12, 24)


def test_batched_greedy_equals_one_at_a_time_and_generate(backend, lively, tiny_processor):
    prompts = [("<image>\nWhat is shown?", [RED]), ("Add 3 and 4, then 5. " * 4, []),
               ("<image>\nHow tall is it?", [BLUE]), ("Hi", [])]
    reqs = [request(str(i), p, imgs, temperature=0.0, max_new_tokens=8) for i, (p, imgs) in enumerate(prompts)]
    batched = backend.generate(reqs)
    one_by_one = [backend.generate([r])[0] for r in reqs]
    assert [r.texts for r in batched] == [r.texts for r in one_by_one]
    # the reference: transformers' own greedy generate on the unpadded prompt
    for (prompt, imgs), result in zip(prompts, batched):
        inputs = tiny_processor(text=[chat_prompt(prompt)], images=[imgs])
        inputs.pop("num_patches", None)
        out = lively.generate(**inputs, max_new_tokens=8, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1]:].tolist()
        new = new[:-1] if new[-1] in backend.stop_ids else new
        assert result.texts == [tiny_processor.tokenizer.decode(new, skip_special_tokens=True)]


def test_top_k_one_is_greedy(backend):
    greedy = backend.generate([request("a", "<image>\nCount.", [RED], temperature=0.0, max_new_tokens=8)])[0]
    top1 = backend.generate([request("a", "<image>\nCount.", [RED], seed=3, temperature=1.5, top_k=1,
                                     max_new_tokens=8)])[0]
    assert top1.texts == greedy.texts


def test_assistant_prefix_returns_the_continuation_only(backend, lively, tiny_processor):
    prefix = "The tiles show 3, 7"
    req = GenerationRequest("p", "<image>\nWhat is 3 + 7?", [RED], SamplingParams(temperature=0, max_new_tokens=6),
                            system="Be brief.", assistant_prefix=prefix)
    text = chat_prompt("<image>\nWhat is 3 + 7?", "Be brief.") + prefix
    assert backend.prompt_text(req) == text
    inputs = tiny_processor(text=[text], images=[[RED]])
    inputs.pop("num_patches")
    out = lively.generate(**inputs, max_new_tokens=6, do_sample=False)
    expected = tiny_processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert backend.generate([req])[0].texts == [expected]


def test_stops_at_end_of_turn_and_stop_strings(backend, lively, tiny_processor):
    req = request("s", "<image>\nWhat is shown?", [RED], temperature=0.0, max_new_tokens=8)
    full = backend.generate([req])[0]
    inputs = tiny_processor(text=[chat_prompt(req.prompt)], images=[[RED]])
    inputs.pop("num_patches")
    ids = lively.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    ids = ids.tolist()
    i = next(i for i in range(1, len(ids)) if ids[i] not in ids[:i])
    # pretend greedy token i ends the turn: the row stops there, after i + 1 tokens, and the text leaves it out
    backend.stop_ids = backend.stop_ids | {ids[i]}
    cut = backend.generate([req])[0]
    assert cut.num_generated_tokens == i + 1
    assert cut.texts == [tiny_processor.tokenizer.decode(ids[:i], skip_special_tokens=True)]
    backend.stop_ids -= {ids[i]}
    stop = full.texts[0][3:5]
    stopped = backend.generate([request("s", "<image>\nWhat is shown?", [RED], temperature=0.0, max_new_tokens=8,
                                        stop=[stop])])[0]
    assert stopped.texts == [full.texts[0][:full.texts[0].index(stop)]]


def test_bad_request_fails_alone_and_text_only_model(backend, tiny_processor):
    from rlhf.tiny import build_causal_lm

    results = backend.generate([request("bad", "<image>\nTwo?", [RED, BLUE]), request("ok", "Hi", n=2)])
    assert not results[0].ok and "placeholder" in results[0].error
    assert results[1].ok and len(results[1].texts) == 2
    text_lm = HFBackend(model=build_causal_lm(tiny_processor.tokenizer), processor=tiny_processor.tokenizer)
    assert text_lm.prompt_text(request("t", "Hi")) == chat_prompt("Hi")  # the tokenizer's ChatML template
    out = text_lm.generate([request("t", "Hi", seed=1, n=2), request("i", "<image>\nHi", [RED])])
    assert out[0].ok and len(out[0].texts) == 2 and out[0].num_generated_tokens == 12
    assert "text-only" in out[1].error


def test_loading_errors_are_one_line():
    from data_gen.backends import BackendUnavailable
    from rlhf.errors import UserError

    with pytest.raises(BackendUnavailable, match="cannot load"):
        HFBackend("/nonexistent/checkpoint", device="cpu")
    with pytest.raises(UserError, match="either model_name_or_path"):
        HFBackend()


# -- the rollout job -----------------------------------------------------------------------------------------------

def write_questions(tmp_path: Path, n: int = 3) -> Path:
    """n tiny tile-sum questions + one with a missing image + one whose image escapes the root."""
    root = tmp_path / "q"
    shutil.copytree(QUESTIONS / "images", root / "images")
    lines = (QUESTIONS / "train.jsonl").read_text().splitlines()[:n]
    lines.append(json.dumps({"id": "missing", "image": "images/nope.png", "question": "<image>\nSum?", "answer": 3}))
    lines.append(json.dumps({"id": "escape", "image": "../outside.png", "question": "Sum?", "answer": "3"}))
    Image.new("RGB", (10, 10)).save(tmp_path / "outside.png")
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    return root / "train.jsonl"


def job(tmp_path, questions, backend=None, **overrides):
    args = RolloutArguments(questions=str(questions), **{"num_samples": 2, **overrides})
    sampling = SamplingArguments(max_new_tokens=5, seed=3)
    backend_args = BackendArguments(model="tiny-internvl", backend_kwargs={"device": "cpu", "max_patches": 1})
    return run(args, backend_args, sampling, JobArguments(output_dir=str(tmp_path / "out"), batch_size=2,
                                                          progress=False), backend=backend)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rollout_job_on_the_tiny_model(tmp_path, tiny_internvl, tiny_processor):
    questions = write_questions(tmp_path)
    hf = HFBackend(model=tiny_internvl, processor=tiny_processor, max_patches=1)
    summary = job(tmp_path, questions, backend=hf, reference_key="solution")
    assert (summary.total, summary.succeeded, summary.failed) == (5, 3, 2)
    out = tmp_path / "out"
    failures = {f["id"]: f["reason"] for f in read_jsonl(out / "failures.jsonl")}
    assert "image not found" in failures["missing"] and "outside the image root" in failures["escape"]
    records = read_jsonl(out / "rollouts.jsonl")
    source = read_jsonl(questions)
    assert [r["id"] for r in records] == [q["id"] for q in source[:3]]
    for record, q in zip(records, source):
        assert record["image"] == q["image"] and record["image_root"] == str(questions.parent.resolve())
        assert record["sampling"] == {"temperature": 0.7, "top_p": 1.0, "top_k": 50, "max_new_tokens": 5, "n": 2,
                                      "seed": item_seed(3, q["id"])}
        # the samples are exactly what the backend gives for the same request
        req = GenerationRequest(q["id"], build_prompt(q["question"], "boxed"), [Image.open(questions.parent /
                                q["image"])], SamplingParams(max_new_tokens=5, n=2), seed=item_seed(3, q["id"]))
        expected = hf.generate([req])[0]
        samples, reference = record["responses"][:2], record["responses"][2]
        assert [r["text"] for r in samples] == expected.texts
        assert sum(r["num_tokens"] for r in samples) == record["num_generated_tokens"] == expected.num_generated_tokens
        assert reference == {"text": q["solution"], "answer": q["answer"], "correct": True, "score": 1.0,
                             "matcher": "exact", "num_tokens": 0, "reference": True}
        assert record["pass_rate"] == sum(r["correct"] for r in samples) / 2
        assert record["meta"] == {"solution": q["solution"], "values": q["values"]}
    again = job(tmp_path, questions, backend=hf, reference_key="solution")  # resumes: only the failures again
    assert (again.skipped_done, again.processed, again.failed) == (3, 2, 2)
    with pytest.raises(Exception, match="other settings"):
        job(tmp_path, questions, backend=hf, reference_key=None)


class ScriptedBackend(RolloutBackend):
    """Returns fixed texts (cycled) and records the requests it got."""

    def __init__(self, texts):
        self.texts, self.requests = texts, []

    def generate(self, requests):
        self.requests += requests
        return [GenerationResult(r.id, [self.texts[j % len(self.texts)] for j in range(r.sampling.n)], 7 * r.sampling.n)
                for r in requests]


def test_judging_and_pass_rate_with_a_scripted_backend(tmp_path):
    qfile = tmp_path / "q.jsonl"
    qfile.write_text(json.dumps({"id": 1, "question": "What is 20 + 4?", "answer": "24"}) + "\n"
                     + json.dumps({"id": "open", "question": "Describe it."}) + "\n")
    # 30 is 25% off and shares no character with 24
    fake = ScriptedBackend(["20 + 4 = 24.\n\nAnswer: \\boxed{24}", "Answer: \\boxed{30}", "I am not sure."])
    job(tmp_path, qfile, backend=fake, num_samples=3, system_prompt="Be careful.", unboxed="format_negative")
    first, second = read_jsonl(tmp_path / "out" / "rollouts.jsonl")
    assert [(r["answer"], r["correct"], r["score"], r["matcher"]) for r in first["responses"]] == [
        ("24", True, 1.0, "exact"), ("30", False, 0.0, "no_match"), (None, False, 0.0, "no_answer")]
    assert first["pass_rate"] == pytest.approx(1 / 3) and first["num_generated_tokens"] == 21
    assert [r["num_tokens"] for r in first["responses"]] == [7, 7, 7]
    assert second["answer"] is None and second["pass_rate"] is None
    assert [(r["answer"], r["correct"]) for r in second["responses"]] == [("24", None), ("30", None), (None, None)]
    assert [r.system for r in fake.requests] == ["Be careful."] * 2 and "image" not in first
    assert fake.requests[0].seed == item_seed(3, "1") and fake.requests[0].images == []


def test_unboxed_response_under_the_boxed_prompt_is_judged_whole(tmp_path):
    # InternVL (prompt version en_v2, the boxed prompt): extract_answer_from_box returns the whole response when it
    # has no \boxed{} (or an unclosed one), and that is judged against the answer: a wrong answer, not a format
    # negative. "The answer is 24" is not "24" (no exact, VQA or numeric match); a bare "24" is correct.
    qfile = tmp_path / "q.jsonl"
    qfile.write_text(json.dumps({"id": 1, "question": "What is 20 + 4?", "answer": "24"}) + "\n")
    texts = ["The answer is 24", "24", "Answer: \\boxed{24", "Answer: \\boxed{24}"]
    job(tmp_path, qfile, backend=ScriptedBackend(texts), num_samples=4)
    (record,) = read_jsonl(tmp_path / "out" / "rollouts.jsonl")
    assert [(r["answer"], r["correct"]) for r in record["responses"]] == [
        ("The answer is 24", False), ("24", True), ("Answer: \\boxed{24", False), ("24", True)]
    from data_gen.pairs import group_responses

    correct, wrong, unparseable, _ = group_responses(record["responses"])
    assert (correct, wrong, unparseable) == ([1, 3], [0, 2], [])  # no format negatives under the boxed prompt
    shutil.rmtree(tmp_path / "out")
    job(tmp_path, qfile, backend=ScriptedBackend(texts), num_samples=4, unboxed="format_negative")  # ours
    (record,) = read_jsonl(tmp_path / "out" / "rollouts.jsonl")
    assert [r["answer"] for r in record["responses"]] == [None, None, None, "24"]


def test_prompt_templates_are_internvls_verbatim():
    # InternVL's INSTRUCTION_BOXED_EN / INSTRUCTION_EN / INSTRUCTION_ZH, as its pipeline formats them
    boxed = build_prompt("Q?", "boxed")
    assert boxed.startswith("Q?\nAnswer the preceding question. The last line of your response should follow this "
                            "format: 'Answer: \\boxed{$FINAL_ANSWER}' (without quotes)")
    assert "Avoid repeating steps indefinitely\u2014provide your best guess even if unsure." in boxed
    assert boxed.endswith("considering all relevant information before answering.")
    assert build_prompt("Q?", "final_answer") == (
        "Your task is to answer the question below. Give step by step reasoning before you answer, and when you're "
        "ready to answer, please use the format \"Final answer: ..\"\n\nQuestion:\n\nQ?")
    assert build_prompt("Q?", "final_answer_zh").endswith("\"答案: ...\"\n\n问题:\n\nQ?")
    assert "blank lines" in build_prompt("Q?", "boxed_steps") and "blank lines" not in boxed  # ours, by name


def test_answer_mode_by_data_set_name(tmp_path):
    # InternVL judges by data set: a chartqa question accepts 23 for 24 (relaxed accuracy, 4.2% off), a math
    # question does not (its math score allows 1e-3 relative); answer_mode 'all' (ours before) accepts both.
    qfile = tmp_path / "q.jsonl"
    qfile.write_text(json.dumps({"id": "c", "question": "Bar height?", "answer": "24", "source": "chartqa_train"})
                     + "\n" + json.dumps({"id": "m", "question": "What is 20 + 4?", "answer": "24"}) + "\n")
    fake = ScriptedBackend(["Answer: \\boxed{23}"])
    job(tmp_path, qfile, backend=fake, num_samples=1)
    chart, math_q = read_jsonl(tmp_path / "out" / "rollouts.jsonl")
    assert chart["responses"][0]["correct"] is True and chart["responses"][0]["matcher"] == "relaxed_numeric"
    assert math_q["responses"][0]["correct"] is False
    shutil.rmtree(tmp_path / "out")
    job(tmp_path, qfile, backend=ScriptedBackend(["Answer: \\boxed{23}"]), num_samples=1, answer_mode="all")
    assert [r["responses"][0]["correct"] for r in read_jsonl(tmp_path / "out" / "rollouts.jsonl")] == [True, True]
    from rlhf.errors import UserError

    with pytest.raises(UserError, match="answer_mode: answer mode must be one of"):
        RolloutArguments(questions=str(qfile), answer_mode="lenient")


def test_system_prompt_auto_is_internvls_for_internvl_checkpoints(tmp_path):
    # InternVL's rollouts (lmdeploy, chat template internvl2_5) send its default system message with every request.
    from data_gen.prompts import family_system_prompt, rollout_system_prompt
    from rlhf.processing import INTERNVL_SYSTEM_PROMPT

    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "internvl"}))
    assert family_system_prompt(str(folder)) == INTERNVL_SYSTEM_PROMPT
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    assert family_system_prompt(str(folder)) is None
    assert family_system_prompt("OpenGVLab/InternVL3-8B-Instruct-hf") == INTERNVL_SYSTEM_PROMPT
    assert family_system_prompt("tiny-internvl") is None  # the embedded tiny models have no such default
    assert rollout_system_prompt("", "OpenGVLab/InternVL3-8B") is None
    assert rollout_system_prompt("internvl2_5", None) == INTERNVL_SYSTEM_PROMPT
    assert rollout_system_prompt("Be brief.", None) == "Be brief."
    assert RolloutArguments(questions="q").system_prompt == "auto"


def test_questions_from_mmpr_and_bad_lines(tmp_path):
    from tests.conftest import write_mmpr

    from rlhf.jobs.runner import JobInputError

    questions = read_questions(write_mmpr(tmp_path, n=4))
    assert [(q.id, q.answer, q.image_value) for q in questions] == [
        ("tiny:1", None, "img0.png"), ("tiny:2", None, None), ("tiny:3", None, "img2.png"), ("tiny:4", None, None)]
    bad = tmp_path / "bad.jsonl"
    for line, message in [('{"id": 1, "question": ""}', "bad.jsonl:2: question: expected a non-empty string"),
                          ('{"id": 1, "question": "q", "image": "a.png", "images": ["b.png"]}', "not both"),
                          ('{"id": 1, "question": "<image><image>", "image": "a.png"}', "2 <image> placeholder"),
                          ('{"id": 0, "question": "q"}', "duplicate '0'"), ("{oops", "bad.jsonl:2: malformed JSON")]:
        bad.write_text('{"id": 0, "question": "fine"}\n' + line + "\n")
        with pytest.raises(JobInputError, match=message):
            read_questions(bad)


def test_unreachable_backend_stops_with_one_line(tmp_path, capsys):
    from rlhf.cli import main

    qfile = tmp_path / "q.jsonl"
    qfile.write_text(json.dumps({"id": 1, "question": "What is 2 + 2?", "answer": "4"}) + "\n")
    code = main(["rollout", "--questions", str(qfile), "--output_dir", str(tmp_path / "out"), "--backend", "openai",
                 "--model", "m", "--backend_kwargs", '{"base_url": "http://127.0.0.1:9/v1", "timeout_s": 2}'])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("mmalign rollout:") and "127.0.0.1:9" in err
    assert not (tmp_path / "out" / "rollouts.jsonl").exists()


def test_tiny_recipes_parse():
    from data_gen.pairs import DropoutSampling, PairsArguments
    from rlhf.args import parse_job_args

    recipes = QUESTIONS.parent
    r, b, s, j = parse_job_args((RolloutArguments, BackendArguments, SamplingArguments, JobArguments),
                                ["--config", str(recipes / "tiny_rollout.yaml"), "--output_dir", "x"], "t")
    assert (r.num_samples, b.model, b.backend_kwargs["device"], s.max_new_tokens, j.output_dir) == (
        4, "tiny-internvl", "cpu", 24, "x")
    p, b, s, j = parse_job_args((PairsArguments, BackendArguments, DropoutSampling, JobArguments),
                                ["--config", str(recipes / "tiny_pairs.yaml")], "t")
    assert (p.dropout_ntp, p.max_pairs_per_question, s.temperature, j.output_dir) == ("all", 15, 0.7,
                                                                                      "outputs/tiny_pairs")
    assert math.isclose(p.dropout_ratio, 0.5)
