"""The pairs job: the MMPR pair rules on hand-made rollouts (worked examples), DropoutNTP, and the MMPR output."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from PIL import Image

from data_gen.backends import GenerationRequest, GenerationResult, RolloutBackend, SamplingParams
from data_gen.job_common import BackendArguments, JobArguments
from data_gen.pairs import (DropoutSampling, PairsArguments, cap, dropout_prefix, group_responses, run,
                            strip_images, truncate_at_divergence)
from data_gen.prompts import build_prompt
from rlhf.jobs.runner import item_seed
from reward.verify import judge

QUESTION = "<image>\nAdd the numbers shown by the tiles."

# Question A (answer 24): the worked example of the grouping and pairing rules.
A_TEXTS = [
    "3 + 21 = 24.\n\nAnswer: \\boxed{24}",  # 0 correct
    "3 + 21 = 24.\n\nAnswer: \\boxed{24}",  # 1 the same text as 0: a duplicate, left out
    "Maybe 124.\n\nAnswer: \\boxed{124}",  # 2 wrong, but "24" is a substring of "124": no pair with it as rejected
    "3 + 20 = 30.\n\nAnswer: \\boxed{30}",  # 3 wrong
    "I cannot tell.",  # 4 no answer: a format negative
    "It is 24.\n\nFinal answer: 24",  # 5 correct
    "   ",  # 6 empty: invalid
    "<image> shows 30. Answer: \\boxed{30}",  # 7 a placeholder in a response: invalid
    "24.0 in all.\n\nAnswer: \\boxed{24.0}",  # 8 correct (numeric match), "24.0" is not in "124": (8, 2) is a pair
]
# correct = [0, 5, 8], wrong = [2, 3], unparseable = [4]
A_CORRECTNESS = [(0, 3), (5, 3), (8, 2), (8, 3)]  # (0, 2) and (5, 2) dropped by the substring rule
A_FORMAT = [(0, 4), (5, 4), (8, 4)]


def judged(texts: list[str], answer: str | None) -> list[dict]:
    out = []
    for text in texts:
        if answer is None:
            out.append({"text": text, "answer": None, "correct": None, "score": None, "matcher": None})
        else:
            v = judge(text, answer)
            out.append({"text": text, "answer": v.answer, "correct": v.correct, "score": v.score, "matcher": v.matcher})
    return out


def rollout(qid, texts, answer, root, image="images/a.png", question=QUESTION):
    responses = judged(texts, answer)
    record = {"id": qid, "question": question, "answer": answer, "prompt_template": "boxed", "system_prompt": None,
              "responses": responses,
              "pass_rate": None if answer is None else sum(bool(r["correct"]) for r in responses) / len(responses)}
    if image:
        record |= {"image": image, "image_root": str(root)}
    return record


@pytest.fixture
def rollouts(tmp_path) -> Path:
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (112, 112), (200, 30, 30)).save(root / "images" / "a.png")
    b_texts = ([f"Step {i}.\n\nAnswer: \\boxed{{7}}" for i in range(4)]
               + [f"Try {j}. \\boxed{{{50 + j}}}" for j in range(5)])
    records = [
        rollout("A", A_TEXTS, "24", root),
        rollout("B", b_texts, "7", root),  # 4 correct x 5 wrong = 20 pairs, capped at 15
        rollout("C", ["The tiles\n\nshow 3, 7 and 9.", "short"], None, root, question="<image>\nDescribe the tiles."),
        rollout("D", ["So \\boxed{5}", "So \\boxed{6}"], "5", root, image=None, question="What is 2 + 3?"),
    ]
    path = tmp_path / "rollouts" / "rollouts.jsonl"
    path.parent.mkdir()
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


class Continuations(RolloutBackend):
    """Continues every prefix with a fixed text; records the requests."""

    def __init__(self, text=" 4, 7 and 9."):
        self.text, self.requests = text, []

    def generate(self, requests):
        self.requests += requests
        return [GenerationResult(r.id, [self.text], 5) for r in requests]


def pairs_job(rollouts, out, backend, **overrides):
    args = PairsArguments(rollouts=str(rollouts), **overrides)
    return run(args, BackendArguments(model="tiny-internvl"), DropoutSampling(), JobArguments(output_dir=str(out),
               progress=False), backend=backend)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- the rules -----------------------------------------------------------------------------------------------------

def test_grouping_of_the_worked_example():
    correct, wrong, unparseable, dropped = group_responses(judged(A_TEXTS, "24"))
    assert (correct, wrong, unparseable) == ([0, 5, 8], [2, 3], [4])
    assert dropped == {"duplicate": 1, "invalid": 2}


def test_dropout_prefix_keeps_the_first_half_of_the_words():
    # InternVL's DropoutNTP: pieces = chosen.split(' '); prefix = ' '.join(pieces[:int(len(pieces) * 0.5)]).strip()
    assert dropout_prefix("a b c d e") == ("a b", 2, 5)  # floor(0.5 * 5) = 2 words
    # "The tiles\n\nshow 3, 7 and 9." splits on ' ' into 6 pieces ("tiles\n\nshow" is one): 3 kept
    assert dropout_prefix("The tiles\n\nshow 3, 7 and 9.") == ("The tiles\n\nshow 3,", 3, 6)
    # "Step 1: 2.\n\nStep 2: 4." -> ['Step', '1:', '2.\n\nStep', '2:', '4.']: 2 pieces, "Step 1:"
    assert dropout_prefix("Step 1: 2.\n\nStep 2: 4.") == ("Step 1:", 2, 5)
    assert dropout_prefix("a  b c d") == ("a", 2, 5)  # a double space is an empty piece: ['a', '', 'b', 'c', 'd']
    assert dropout_prefix("one two three four", 0.75) == ("one two three", 3, 4)
    assert dropout_prefix("alone") == ("", 0, 1)
    # ours (dropout_words whitespace): any whitespace separates words, the prefix keeps the text verbatim
    assert dropout_prefix("The tiles\n\nshow 3, 7 and 9.", words="whitespace") == ("The tiles\n\nshow", 3, 7)
    assert dropout_prefix("Step 1: 2.\n\nStep 2: 4.", words="whitespace") == ("Step 1: 2.", 3, 6)
    assert strip_images("<image>\n<image>\nCompare them.") == "Compare them."


@pytest.mark.parametrize(
    ("chosen", "rejected", "expected"),
    [
        # Misread at the second step: the rejected response ends there (the arithmetic after it is dropped).
        ("Tile 1 shows 3.\n\nTile 2 shows 7.\n\n3 + 7 = 10.\n\nAnswer: \\boxed{10}",
         "Tile 1 shows 3.\n\nTile 2 shows 6.\n\n3 + 6 = 9.\n\nAnswer: \\boxed{9}",
         ("Tile 1 shows 3.\n\nTile 2 shows 6.", 2, 4)),
        # Differs at the first step: one step kept.
        ("A.\n\nB.", "X.\n\nB.", ("X.", 1, 2)),
        # Extra steps after all the chosen ones: cut after the first extra one.
        ("A.\n\nB.", "A.\n\nB.\n\nZ.\n\nW.", ("A.\n\nB.\n\nZ.", 3, 4)),
        # Steps are compared stripped; the rejected text is kept verbatim up to the cut (whitespace runs included).
        ("A.\n\nB.", "A. \n \n\nB.\n\nZ.", ("A. \n \n\nB.\n\nZ.", 3, 3)),
        # A rejected response that is a step prefix of the chosen one (or equal to it) is kept whole.
        ("A.\n\nB.\n\nC.", "A.\n\nB.", ("A.\n\nB.", 2, 2)),
        # A single line break is not a step break.
        ("A.\nB.\n\nC.", "A.\nX.\n\nC.", ("A.\nX.", 1, 2)),
    ],
)
def test_truncate_at_divergence(chosen, rejected, expected):
    assert truncate_at_divergence(chosen, rejected) == expected


def test_pairs_job_truncates_rejected_responses(tmp_path, rollouts):
    out = tmp_path / "pairs"
    summary = pairs_job(rollouts, out, Continuations(), truncate_rejected=True)
    assert summary["pairs"] == {"correctness": 20, "format_negative": 3, "dropout_ntp": 1}  # the same pairs
    first = read_jsonl(out / "correctness.jsonl")[0]
    assert (first["chosen"], first["rejected"]) == (A_TEXTS[0], "3 + 20 = 30.")
    assert first["rejected_meta"]["steps_kept"] == 1 and first["rejected_meta"]["steps"] == 2
    # DropoutNTP prefix, InternVL's split(' '): ['The', 'tiles\n\nshow', '3,', '7', 'and', '9.'] -> 3 pieces,
    # "The tiles\n\nshow 3," (18 characters); + " 4, 7 and 9." differs from the chosen in step 2: kept whole
    (ntp,) = read_jsonl(out / "dropout_ntp.jsonl")
    assert (ntp["chosen"], ntp["rejected"]) == ("The tiles\n\nshow 3, 7 and 9.", "The tiles\n\nshow 3, 4, 7 and 9.")
    assert ntp["rejected_meta"] == {"prefix_words": 3, "prefix_chars": 18, "continuation_tokens": 5,
                                    "steps_kept": 2, "steps": 2}
    fmt = read_jsonl(out / "format_negative.jsonl")[0]  # a one-step rejected response stays whole
    assert fmt["rejected"] == "I cannot tell."


def test_cap_is_a_seeded_choice_in_order():
    pairs = list(range(20))
    kept = cap(pairs, 15, random.Random(3))
    assert kept == sorted(kept) and len(kept) == 15 and kept == cap(pairs, 15, random.Random(3))
    assert cap(pairs[:4], 15, random.Random(3)) == [0, 1, 2, 3]


# -- the job -------------------------------------------------------------------------------------------------------

class ServerContinuations(Continuations):
    """As a server backend reports: each result says which sampling fields the server was sent."""

    APPLIED = {"temperature": 0.8, "max_tokens": 16, "dropped": ["top_k"], "requests": 1, "n_per_request": 1}

    def generate(self, requests):
        results = super().generate(requests)
        for r in results:
            r.applied = dict(self.APPLIED)
        return results


def test_dropout_pairs_record_the_sampling_a_server_applied(tmp_path, rollouts):
    pairs_job(rollouts, tmp_path / "server", ServerContinuations())
    (pair,) = read_jsonl(tmp_path / "server" / "dropout_ntp.jsonl")
    assert pair["rejected_meta"]["sampling_applied"] == ServerContinuations.APPLIED
    pairs_job(rollouts, tmp_path / "local", Continuations())  # in-process backends report nothing
    (pair,) = read_jsonl(tmp_path / "local" / "dropout_ntp.jsonl")
    assert "sampling_applied" not in pair["rejected_meta"]


def test_pairs_job_worked_example(tmp_path, rollouts):
    from rlhf.data.mmpr import read_mmpr
    from rlhf.data.validate import validate_records

    fake = Continuations()
    out = tmp_path / "pairs"
    summary = pairs_job(rollouts, out, fake)
    root = str((rollouts.parent.parent / "data").resolve())
    meta = json.loads((out / "meta.json").read_text())
    assert {k: (v["root"], v["annotation"], v["length"]) for k, v in meta.items()} == {
        "correctness": (root, "correctness.jsonl", 4 + 15 + 1), "format_negative": (root, "format_negative.jsonl", 3),
        "dropout_ntp": (root, "dropout_ntp.jsonl", 1)}

    correctness = read_jsonl(out / "correctness.jsonl")
    by_q = {q: [(p["chosen_meta"]["response"], p["rejected_meta"]["response"]) for p in correctness
                if p["question_id"] == q] for q in "ABD"}
    assert by_q["A"] == A_CORRECTNESS
    all_b = [(c, w) for c in range(4) for w in range(4, 9)]
    assert by_q["B"] == cap(all_b, 15, random.Random(item_seed(0, "B", "correctness")))
    assert by_q["D"] == [(0, 1)]
    first = correctness[0]
    assert first["image"] == "images/a.png" and first["answer_gt"] == "24"
    assert first["question"] == build_prompt(QUESTION, "boxed")  # the prompt the policy answered
    assert (first["chosen"], first["rejected"]) == (A_TEXTS[0], A_TEXTS[3])
    assert first["chosen_meta"] | {"response": 0} == {"response": 0, "answer": "24", "correct": True, "score": 1.0,
                                                     "matcher": "exact", "answer_fixed": False}
    assert "image" not in correctness[-1]  # D is text only

    fmt = read_jsonl(out / "format_negative.jsonl")
    assert [(p["chosen_meta"]["response"], p["rejected_meta"]["response"]) for p in fmt] == A_FORMAT

    # DropoutNTP: only C (no answer, has an image); its one response with >= 2 words is the chosen one
    (ntp,) = read_jsonl(out / "dropout_ntp.jsonl")
    (req,) = fake.requests
    assert req.images == [] and req.assistant_prefix == "The tiles\n\nshow 3,"  # split(' '): 3 of 6 pieces
    assert req.prompt == build_prompt("Describe the tiles.", "boxed") and "<image>" not in req.prompt
    assert req.seed == item_seed(0, "C", "dropout_ntp", 0)
    assert (req.sampling.temperature, req.sampling.max_new_tokens, req.sampling.n) == (0.7, 2048, 1)
    assert ntp["chosen"] == "The tiles\n\nshow 3, 7 and 9."
    assert ntp["rejected"] == "The tiles\n\nshow 3, 4, 7 and 9."
    assert ntp["question"].startswith("<image>\nDescribe the tiles.") and ntp["image"] == "images/a.png"
    assert ntp["rejected_meta"] == {"prefix_words": 3, "prefix_chars": 18, "continuation_tokens": 5}

    # what `mmalign mpo` reads: no problems at all
    records = read_mmpr(out / "meta.json")
    assert len(records) == 20 + 3 + 1 and validate_records(records) == []
    assert records[0].image_paths == [str(Path(root) / "images" / "a.png")]

    assert summary["questions"] == 4 and summary["questions_with_answer"] == 3
    assert summary["pairs"] == {"correctness": 20, "format_negative": 3, "dropout_ntp": 1}
    assert summary["pairs_per_question"]["correctness"] == 5.0
    assert summary["questions_with_pairs"] == {"correctness": 3, "format_negative": 1, "dropout_ntp": 1}
    assert summary["dropped"] == {"duplicate": 1, "invalid": 2, "substring": 2, "cap": 5, "identical": 0}
    a_rate = 4 / 9  # 0, 1, 5 and 8 of the 9 samples are correct (the pass rate counts duplicates)
    assert summary["mean_pass_rate"] == pytest.approx((a_rate + 4 / 9 + 1 / 2) / 3)
    assert json.loads((out / "summary.json").read_text())["pairs"] == summary["pairs"]

    before = {p.name: p.read_bytes() for p in out.glob("*.jsonl")}
    again = pairs_job(rollouts, out, fake)  # resumes: nothing to do, the same files
    assert again["job"]["skipped_done"] == 4 and len(fake.requests) == 1
    assert {p.name: p.read_bytes() for p in out.glob("*.jsonl")} == before


def test_answer_fix_dedup_and_selection(tmp_path, rollouts):
    fake = Continuations(text=" 7 and 9.")  # continues C's prefix "The tiles\n\nshow 3," as the chosen did: no pair
    out = tmp_path / "fixed"
    summary = pairs_job(rollouts, out, fake, answer_fix=True, format_negatives=False, dropout_ntp="all",
                        max_pairs_per_question=3)
    assert not (out / "format_negative.jsonl").exists() and "format_negative" not in json.loads(
        (out / "meta.json").read_text())
    correctness = read_jsonl(out / "correctness.jsonl")
    a_pairs = [p for p in correctness if p["question_id"] == "A"]
    assert len(a_pairs) == 3  # 4 capped at 3
    fixed = [p for p in a_pairs if p["chosen_meta"]["response"] == 8]
    assert all(p["chosen"] == "24.0 in all.\n\nAnswer: \\boxed{24}" and p["chosen_meta"]["answer_fixed"]
               for p in fixed)
    # "all": A and B (correct responses, an image) and C get a DropoutNTP request; D is text only
    assert sorted(r.id.split("#")[0] for r in fake.requests) == ["A", "B", "C"]
    a_request = next(r for r in fake.requests if r.id.startswith("A"))
    chosen = {0: A_TEXTS[0], 5: A_TEXTS[5], 8: "24.0 in all.\n\nAnswer: \\boxed{24}"}
    assert a_request.assistant_prefix in {dropout_prefix(t)[0] for t in chosen.values()}
    assert summary["dropped"]["identical"] == 1  # C: prefix + continuation == chosen
    assert summary["pairs"]["dropout_ntp"] == 2


def test_dropout_ntp_with_the_tiny_policy(tmp_path, rollouts, tiny_internvl, tiny_processor):
    from data_gen.backends.hf import HFBackend

    hf = HFBackend(model=tiny_internvl, processor=tiny_processor)
    out = tmp_path / "ntp"
    args = PairsArguments(rollouts=str(rollouts))
    sampling = DropoutSampling(max_new_tokens=4, seed=9)
    run(args, BackendArguments(), sampling, JobArguments(output_dir=str(out), progress=False), backend=hf)
    (ntp,) = read_jsonl(out / "dropout_ntp.jsonl")
    request = GenerationRequest("C#ntp0", build_prompt("Describe the tiles.", "boxed"),
                                sampling=SamplingParams(max_new_tokens=4, seed=9),
                                seed=item_seed(9, "C", "dropout_ntp", 0), assistant_prefix="The tiles\n\nshow 3,")
    (expected,) = hf.generate([request])
    assert ntp["rejected"] == "The tiles\n\nshow 3," + expected.texts[0]
    assert ntp["rejected_meta"]["continuation_tokens"] == expected.num_generated_tokens == 4


def test_bad_rollouts_are_one_line(tmp_path):
    from rlhf.jobs.runner import JobInputError

    path = tmp_path / "rollouts.jsonl"
    path.write_text(json.dumps({"id": "x", "question": "q", "prompt_template": "boxed", "responses": ["text"]}) + "\n")
    with pytest.raises(JobInputError, match=r"rollouts.jsonl:1: responses: expected a list of \{text"):
        pairs_job(path, tmp_path / "out", Continuations())
    with pytest.raises(JobInputError, match="rollouts file not found"):
        pairs_job(tmp_path / "nowhere", tmp_path / "out", Continuations())


def test_missing_image_fails_the_question_only(tmp_path, rollouts):
    records = read_jsonl(rollouts)
    records[1]["image"] = "images/gone.png"
    rollouts.write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = pairs_job(rollouts, tmp_path / "out", Continuations())
    failures = read_jsonl(tmp_path / "out" / "failures.jsonl")
    assert [f["id"] for f in failures] == ["B"] and "image not found" in failures[0]["reason"]
    assert summary["questions"] == 3 and summary["pairs"]["correctness"] == 4 + 1


def test_rollouts_reader_names_file_and_line(tmp_path):
    from data_gen.pairs import read_rollouts
    from rlhf.jobs.runner import JobInputError

    good = {"id": "q1", "question": "q", "prompt_template": "plain", "responses": [{"text": "a"}]}
    for bad, message in (("{oops", "rollouts.jsonl:3: malformed JSON"),
                         ("[1, 2]", "rollouts.jsonl:3: expected a JSON object"),
                         (json.dumps({**good, "responses": [{"txt": "a"}]}), "rollouts.jsonl:3: responses: expected")):
        path = tmp_path / "rollouts.jsonl"
        path.write_text(json.dumps(good) + "\n\n" + bad + "\n")
        with pytest.raises(JobInputError, match=message):
            read_rollouts(tmp_path)
    path.write_text(json.dumps(good) + "\n\n")
    assert read_rollouts(path) == [good]


def test_pass_counts_leave_out_references_and_unanswered_questions(tmp_path):
    from data_gen.rollout import pass_counts, pass_rate_line

    records = [
        {"pass_rate": 0.5, "responses": [{"correct": True}, {"correct": False}, {"correct": True, "reference": True}]},
        {"pass_rate": 1.0, "responses": [{"correct": True}]},
        {"pass_rate": None, "responses": [{"correct": None}, {"correct": None}]},  # no ground truth
    ]
    (tmp_path / "rollouts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert pass_counts(tmp_path / "rollouts.jsonl") == (2, 3, 2)
    assert pass_rate_line(tmp_path) == "pass rate 0.667 over 2 questions with an answer (3 samples)"
