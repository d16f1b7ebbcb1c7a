"""reward.formats, reward.conversation, reward.checks: the VisualPRM conversation, record readers/writers and
their field checks, conversions, the judgement-token check; step splitting as the formats use it."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from rlhf.errors import UserError
from reward.checks import FormatError
from reward.conversation import (
    PRM_SYSTEM_PROMPT,
    JudgementTokenError,
    check_judgement_tokens,
    from_visualprm_conversation,
    hard_label,
    to_visualprm_conversation,
)
from reward.formats import (
    MC_COUNT_KEYS,
    ConversationRecord,
    MCRecord,
    MCStep,
    ProcessBenchRecord,
    RecordKind,
    StepwiseRecord,
    conversation_to_stepwise,
    mc_to_stepwise,
    read_jsonl,
    stepwise_to_conversation,
    stepwise_to_mc,
    write_jsonl,
)
from reward.steps import join_steps, split_steps

REFERENCE = Path("/work/shared/reference/internvl3_post_training.md")

# -- the system prompt -----------------------------------------------------------------------------------------------


def test_system_prompt_is_the_published_constant():
    # Pinned: 945 characters, no trailing newline (the InternVL constant is a .strip()ped triple-quoted string).
    assert len(PRM_SYSTEM_PROMPT) == 945
    assert hashlib.sha256(PRM_SYSTEM_PROMPT.encode()).hexdigest() == (
        "18279fe8e6c5f76aebb619b266e665b89b2d0b1cb181b6aa3fded44d24b8fa1e")
    assert PRM_SYSTEM_PROMPT.startswith("You are an advanced AI assistant, designed to serve as a process supervision")
    assert PRM_SYSTEM_PROMPT.endswith("correctness of each step in the given solution process.")
    assert '- Respond with **"+"** if you believe the solution process is correct up to this step.\n' \
        in PRM_SYSTEM_PROMPT


@pytest.mark.skipif(not REFERENCE.exists(), reason="reference document not in this checkout")
def test_system_prompt_matches_reference_document():
    text = REFERENCE.read_text()
    block = re.search(r"reproduced verbatim\s+for compatibility.*?```\n(.*?)\n```", text, re.S).group(1)
    assert PRM_SYSTEM_PROMPT == block


# -- split_steps -----------------------------------------------------------------------------------------------------


def test_split_on_blank_lines_strips_and_drops_empty_pieces():
    text = "\n\n  Step 1: read.\nStill step 1.  \r\n\r\n\r\nStep 2: add.\n \t\n\nStep 3: done.\n\n\n"
    assert split_steps(text) == ["Step 1: read.\nStill step 1.", "Step 2: add.", "Step 3: done."]
    assert split_steps("") == []
    assert split_steps(" \n\n \n") == []
    assert split_steps("one step, no blank line\nsecond line") == ["one step, no blank line\nsecond line"]


def _numbered(n: int) -> str:
    return "\n\n".join(f"s{i}" for i in range(1, n + 1))


@pytest.mark.parametrize(
    ("n", "max_steps", "k", "n_merged"),
    [
        (12, 12, 1, 12),  # not more than max_steps: unchanged
        (13, 12, 2, 7),  # ceil(13/12) = 2 -> ceil(13/2) = 7 merged steps
        (24, 12, 2, 12),  # ceil(24/12) = 2 -> 12
        (25, 12, 3, 9),  # ceil(25/12) = 3 -> ceil(25/3) = 9
        (17, 16, 2, 9),  # InternVL3 data, max 16: ceil(17/16) = 2 -> 9
        (5, 1, 5, 1),  # everything in one step
    ],
)
def test_merge_evenly(n, max_steps, k, n_merged):
    merged = split_steps(_numbered(n), max_steps_per_solution=max_steps)
    assert len(merged) == n_merged
    # merged step j holds original steps j*k+1 .. min((j+1)*k, n), joined by a blank line
    for j, step in enumerate(merged):
        assert step == "\n\n".join(f"s{i}" for i in range(j * k + 1, min((j + 1) * k, n) + 1))
    # joining the merged steps gives back the original text and step sequence
    assert join_steps(merged) == _numbered(n)
    assert split_steps(join_steps(merged)) == [f"s{i}" for i in range(1, n + 1)]


def test_merge_worked_example_13_steps():
    merged = split_steps(_numbered(13), max_steps_per_solution=12)
    assert merged[0] == "s1\n\ns2"
    assert merged[5] == "s11\n\ns12"
    assert merged[6] == "s13"  # the last group is short


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_split_rejects_bad_max_steps(bad):
    with pytest.raises(ValueError, match="max_steps_per_solution must be a positive integer"):
        split_steps("a\n\nb", max_steps_per_solution=bad)


def test_hard_label_is_strictly_above_threshold():
    assert hard_label(0.0) is False  # no continuation out of 16 was correct
    assert hard_label(1 / 16) is True  # one was: "+" (published threshold 0)
    assert hard_label(0.5, threshold=0.5) is False
    assert hard_label(0.5625, threshold=0.5) is True
    assert hard_label(True) is True and hard_label(False) is False


# -- the VisualPRM conversation ------------------------------------------------------------------------------------

QUESTION = "<image>\nWhat is the sum of the tiles?"
STEPS = ["The tiles show 3, 7 and 5.", "3 + 7 = 11.", "11 + 5 = 16. Answer: \\boxed{16}"]


def test_conversation_layout_and_soft_labels():
    conv = to_visualprm_conversation(QUESTION, STEPS, [0.5, 0.0, 0.25])
    assert conv == [
        {"from": "system", "value": PRM_SYSTEM_PROMPT},
        {"from": "human", "value": "### Question:\n<image>\nWhat is the sum of the tiles?\n\n"
                                   "### Solution Process:\nThe tiles show 3, 7 and 5."},
        {"from": "gpt", "value": "+"},  # 0.5 > 0
        {"from": "human", "value": "3 + 7 = 11."},
        {"from": "gpt", "value": "-"},  # 0.0 is not > 0
        {"from": "human", "value": "11 + 5 = 16. Answer: \\boxed{16}"},
        {"from": "gpt", "value": "+"},  # 0.25 > 0
    ]
    stricter = to_visualprm_conversation(QUESTION, STEPS, [0.5, 0.0, 0.25], threshold=0.3)
    assert [t["value"] for t in stricter[2::2]] == ["+", "-", "-"]  # 0.25 <= 0.3
    hard = to_visualprm_conversation(QUESTION, STEPS, [True, False, False])
    assert [t["value"] for t in hard[2::2]] == ["+", "-", "-"]


def test_conversation_parses_back():
    conv = to_visualprm_conversation(QUESTION, STEPS, [True, False, True])
    assert from_visualprm_conversation(conv) == (QUESTION, STEPS, [True, False, True])
    one = to_visualprm_conversation("Text-only question?", ["Only step."], [False])
    assert len(one) == 3
    assert from_visualprm_conversation(one) == ("Text-only question?", ["Only step."], [False])


def _conv():
    return to_visualprm_conversation(QUESTION, STEPS, [True, False, True])


def _broken(edit):
    conv = _conv()
    edit(conv)
    return conv


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.pop(0), "field '[0].from': expected 'system', got 'human'"),
        (lambda c: c.pop(), "expected a list of turns: system, then (human, gpt) pairs"),
        (lambda c: c[3].update({"from": "gpt"}), "field '[3].from': expected 'human', got 'gpt'"),
        (lambda c: c[4].update({"value": "yes"}), "field '[4].value': expected '+' or '-', got 'yes'"),
        (lambda c: c[2].update({"value": " +"}), "field '[2].value': expected '+' or '-', got ' +'"),
        (lambda c: c[0].update({"value": "You are helpful."}),
         "field '[0].value': expected the PRM system prompt (reward.conversation.PRM_SYSTEM_PROMPT)"),
        (lambda c: c[1].update({"value": "What is 2 + 2?\n\nStep one"}),
         "field '[1].value': expected '### Question:\\n'"),
        (lambda c: c[5].update({"value": "  "}), "field '[5].value': expected a non-empty step"),
        (lambda c: c[2].update({"weight": 1}), "field '[2]': expected a turn"),
    ],
)
def test_conversation_structure_errors(edit, message):
    with pytest.raises(FormatError) as err:
        from_visualprm_conversation(_broken(edit))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_conversation_rejects_bad_inputs():
    with pytest.raises(FormatError, match="field 'labels': expected a list of 3 labels"):
        to_visualprm_conversation(QUESTION, STEPS, [True, False])
    with pytest.raises(FormatError, match="not a mix"):
        to_visualprm_conversation(QUESTION, STEPS, [True, 0.5, 1.0])
    with pytest.raises(FormatError, match=r"field 'labels\[1\]': expected a number in \[0, 1\], got 1.5"):
        to_visualprm_conversation(QUESTION, STEPS, [0.5, 1.5, 1.0])
    with pytest.raises(FormatError, match="would not parse back"):
        to_visualprm_conversation("Q\n\n### Solution Process:\nx", STEPS, [True] * 3)


# -- records, files and conversions -------------------------------------------------------------------------------

# A raw Monte Carlo line as the published pipeline writes it, plus our adaptive-mode marker and an int-valued float.
MC_LINE = {
    "image": ["geo/1471/a.png", "geo/1471/b.png"],
    "question": "<image>\n<image>\nFind x.",
    "answer": "52",
    "response": "Angle sum is 180.\n\nx = 52.",
    "question_orig": "Find x.",
    "num_mc_sequences": 16,
    "mc_mode": "adaptive",
    "steps_with_score": [
        {"step": "Angle sum is 180.", "score": 0.75, "num_mc_correct": 12, "num_mc_total": 16},
        {"step": "x = 52.", "score": 0.125, "num_mc_correct": 1, "num_mc_total": 8},
        {"step": "So the answer is 52.", "score": 0.0, "num_mc_correct": 0, "num_mc_total": 0},  # early stop
    ],
}


def _write_lines(path: Path, objs) -> Path:
    path.write_text("".join(json.dumps(o) + "\n" for o in objs))
    return path


def test_mc_record_reads_and_writes_back_unchanged(tmp_path):
    [record] = read_jsonl(_write_lines(tmp_path / "mc.jsonl", [MC_LINE]), RecordKind.MC)
    assert record.images == ["geo/1471/a.png", "geo/1471/b.png"]
    assert record.answer == "52"
    assert record.steps[1] == MCStep("x = 52.", 0.125, 1, 8)
    assert record.meta == {"response": "Angle sum is 180.\n\nx = 52.", "question_orig": "Find x.",
                           "num_mc_sequences": 16, "mc_mode": "adaptive"}
    assert record.to_json() == MC_LINE
    out = tmp_path / "out.jsonl"
    assert write_jsonl(out, [record]) == 1
    assert json.loads(out.read_text()) == MC_LINE


def test_mc_to_stepwise_and_back_is_lossless():
    mc = MCRecord.from_json({**MC_LINE, "id": 7, "source": "geometry3k"})
    step = mc_to_stepwise(mc)
    assert step.labels == [0.75, 0.125, 0.0] and step.soft
    assert step.steps == ["Angle sum is 180.", "x = 52.", "So the answer is 52."]
    assert step.meta[MC_COUNT_KEYS[0]] == [12, 1, 0] and step.meta[MC_COUNT_KEYS[1]] == [16, 8, 0]
    assert step.meta["mc_mode"] == "adaptive"
    assert (step.id, step.answer, step.source) == (7, "52", "geometry3k")
    assert step.hard_labels() == [True, True, False]
    back = stepwise_to_mc(step)
    assert back == mc
    assert back.to_json() == {**MC_LINE, "id": 7, "source": "geometry3k"}


def test_stepwise_to_mc_needs_the_counts():
    hard = StepwiseRecord(question="q", steps=["a", "b"], labels=[True, False])
    with pytest.raises(FormatError, match="field 'labels': expected soft labels"):
        stepwise_to_mc(hard)
    soft = StepwiseRecord(question="q", steps=["a", "b"], labels=[0.5, 0.0], meta={"num_mc_correct": [8, 0]})
    with pytest.raises(FormatError, match="field 'meta.num_mc_total': expected a list of 2 counts"):
        stepwise_to_mc(soft)


def test_stepwise_file_round_trip(tmp_path):
    records = [
        StepwiseRecord(question=QUESTION, steps=STEPS, labels=[True, False, False], images=["tiles/0.png"],
                       id="s0", answer="15", source="synthetic", meta={"policy": "tiny", "seed": 3}),
        StepwiseRecord(question="Text only?", steps=["Only step."], labels=[0.0625]),
    ]
    path = tmp_path / "stepwise.jsonl"
    assert write_jsonl(path, records) == 2
    lines = path.read_text().splitlines()
    assert json.loads(lines[1]) == {"images": [], "question": "Text only?", "steps": ["Only step."],
                                    "labels": [0.0625]}
    assert read_jsonl(path, "stepwise") == records


def test_stepwise_to_conversation_and_back(tmp_path):
    record = StepwiseRecord(question=QUESTION, steps=STEPS, labels=[True, False, False], images=["tiles/0.png"],
                            id="s0", answer="15", source="synthetic", meta={"policy": "tiny"})
    conv = stepwise_to_conversation(record)
    assert conv.to_json() == {
        "id": "s0",
        "image": "tiles/0.png",  # one image is written as a string
        "conversations": to_visualprm_conversation(QUESTION, STEPS, [True, False, False]),
        "policy": "tiny",
        "answer": "15",
        "source": "synthetic",
    }
    path = tmp_path / "prm.jsonl"
    write_jsonl(path, [conv])
    [read] = read_jsonl(path, RecordKind.CONVERSATION)
    assert read == conv
    assert conversation_to_stepwise(read) == record


def test_soft_labels_harden_into_the_conversation():
    record = StepwiseRecord(question=QUESTION, steps=STEPS, labels=[0.5, 0.0625, 0.0])
    conv = stepwise_to_conversation(record)
    assert conv.labels == [True, True, False]
    assert stepwise_to_conversation(record, threshold=0.1).labels == [True, False, False]
    assert conversation_to_stepwise(conv).labels == [True, True, False]  # soft scores are not recoverable


def test_conversation_record_without_image(tmp_path):
    line = {"conversations": to_visualprm_conversation("Q?", ["a", "b"], [True, True]), "id": 3}
    [record] = read_jsonl(_write_lines(tmp_path / "c.jsonl", [line]), "conversation")
    assert (record.images, record.id, record.steps, record.labels) == ([], 3, ["a", "b"], [True, True])
    assert record.to_json() == line


def test_processbench_rows_keep_neutral_steps(tmp_path):
    row = {
        "image": "mathverse/12.png",
        "question": "<image>\nWhat is the area?",
        "answer": "12",
        "response": {"steps": ["Base 4, height 6.", "Area = 4 * 6 / 2.", "= 12."],
                     "process_correctness": [1, 0, -1], "model": "gpt-4o"},
        "data_source": "MathVerse",
    }
    [record] = read_jsonl(_write_lines(tmp_path / "vpb.jsonl", [row]), RecordKind.PROCESSBENCH)
    assert record.correctness == [1, 0, -1]
    assert record.labels == [True, None, False]
    assert record.meta == {"data_source": "MathVerse", "response": {"model": "gpt-4o"}}
    assert record.images == ["mathverse/12.png"] and record.answer == "12"
    assert record.to_json() == row


def test_image_field_forms():
    base = {"question": "q", "conversations": to_visualprm_conversation("q", ["a"], [True])}
    assert ConversationRecord.from_json({**base, "image": "a.png"}).images == ["a.png"]
    assert ConversationRecord.from_json({**base, "image": ["a.png"]}).images == ["a.png"]
    assert ConversationRecord.from_json({**base, "image": None}).images == []
    assert "image" not in ConversationRecord.from_json({**base, "image": []}).to_json()


def test_write_refuses_mixed_kinds(tmp_path):
    a = StepwiseRecord(question="q", steps=["a"], labels=[True])
    b = stepwise_to_conversation(a)
    with pytest.raises(TypeError, match="record 1 is a ConversationRecord"):
        write_jsonl(tmp_path / "mixed.jsonl", [a, b])


# -- errors name file, line, field and what was expected ----------------------------------------------------------


def _mc(**steps_edit):
    line = json.loads(json.dumps(MC_LINE))
    line["steps_with_score"][1].update(steps_edit)
    return line


@pytest.mark.parametrize(
    ("kind", "line", "message"),
    [
        ("mc", _mc(score=1.5), "field 'steps_with_score[1].score': expected a number in [0, 1], got 1.5"),
        ("mc", _mc(score=0.5), "field 'steps_with_score[1].score': expected num_mc_correct / num_mc_total = 0.125"),
        ("mc", _mc(num_mc_correct=9), "field 'steps_with_score[1].num_mc_correct': expected at most num_mc_total (8)"),
        ("mc", _mc(num_mc_total=-8), "field 'steps_with_score[1].num_mc_total': expected a non-negative integer"),
        ("mc", _mc(step=""), "field 'steps_with_score[1].step': expected a non-empty step, got ''"),
        ("mc", {**MC_LINE, "steps_with_score": []}, "field 'steps_with_score': expected a non-empty list"),
        ("mc", {k: v for k, v in MC_LINE.items() if k != "question"}, "field 'question': expected this field"),
        ("mc", {**MC_LINE, "image": 5}, "field 'image': expected an image path or a list of image paths, got 5"),
        ("mc", {**MC_LINE, "id": True}, "field 'id': expected a string or an integer, got True"),
        ("stepwise", {"question": "q", "steps": ["a", "b"], "labels": [True]},
         "field 'labels': expected a list of 2 labels (one per step), got [True]"),
        ("stepwise", {"question": "q", "steps": ["a"], "label": [True]}, "field 'label': expected only the fields"),
        ("stepwise", {"question": "q", "steps": ["a"], "labels": [True], "images": ["a.png", ""]},
         "field 'images[1]': expected a non-empty string, got ''"),
        ("conversation", {"conversations": [{"from": "system", "value": PRM_SYSTEM_PROMPT}]},
         "field 'conversations': expected a list of turns"),
        ("conversation", {"image": "a.png", "conversations": _broken(lambda c: c[2].update({"value": "+1"}))},
         "field 'conversations[2].value': expected '+' or '-', got '+1'"),
        ("processbench", {"question": "q", "response": {"steps": ["a", "b"], "process_correctness": [1, 2]}},
         "field 'response.process_correctness[1]': expected -1 or 0 or 1, got 2"),
        ("processbench", {"question": "q", "response": {"steps": ["a"]}},
         "field 'response.process_correctness': expected this field"),
    ],
)
def test_reader_errors_name_file_line_and_field(tmp_path, kind, line, message):
    good = {"mc": MC_LINE, "stepwise": {"question": "q", "steps": ["a"], "labels": [True]},
            "conversation": {"conversations": _conv()},
            "processbench": {"question": "q", "response": {"steps": ["a"], "process_correctness": [0]}}}[kind]
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(line) + "\n")  # the bad record is on line 3
    with pytest.raises(FormatError) as err:
        read_jsonl(path, kind)
    text = str(err.value)
    assert text.startswith(f"{path}:3: ")
    assert message in text
    assert "\n" not in text
    assert (err.value.path, err.value.line) == (path, 3)


def test_reader_error_exact_message(tmp_path):
    path = _write_lines(tmp_path / "mc.jsonl", [_mc(score=1.5)])
    with pytest.raises(FormatError) as err:
        read_jsonl(path, "mc")
    assert str(err.value) == f"{path}:1: field 'steps_with_score[1].score': expected a number in [0, 1], got 1.5"
    assert err.value.field == "steps_with_score[1].score"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"question": "q",\n', "expected one JSON object per line (Expecting property name enclosed in double quotes"),
        ('[1, 2]\n', "expected a JSON object per line, got [1, 2]"),
        ('{"question": "q", "steps": ["a"], "labels": [NaN]}\n', "expected standard JSON numbers, got NaN"),
    ],
)
def test_reader_rejects_malformed_lines(tmp_path, text, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    with pytest.raises(FormatError) as err:
        read_jsonl(path, "stepwise")
    assert str(err.value).startswith(f"{path}:1: ")
    assert message in str(err.value)


def test_reader_file_level_errors(tmp_path):
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(FormatError) as err:
        read_jsonl(missing, "mc")
    assert str(err.value) == f"{missing}: expected an existing JSON-lines file (not found)"
    assert isinstance(err.value, UserError)  # the CLI prints it as one line, no traceback
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'\xef\xbb\xbf{"question": "q", "steps": ["a"], "labels": [true]}\n{"question": "caf\xe9"}\n')
    # line 1 (after a byte-order mark) is fine; on line 2 the Latin-1 e-acute is byte 18: '{"question": "caf' is 17
    with pytest.raises(FormatError, match=r"latin1.jsonl:2: expected UTF-8 text \(bad byte at column 18\)"):
        read_jsonl(latin1, "stepwise")


def test_unknown_kind_lists_the_choices(tmp_path):
    with pytest.raises(ValueError, match="unknown record kind 'prm'; expected one of stepwise, mc, conversation, "
                                         "processbench"):
        read_jsonl(tmp_path / "x.jsonl", "prm")


def test_constructors_validate_too():
    with pytest.raises(FormatError, match="field 'meta': expected no keys that the record format itself uses"):
        MCRecord(question="q", steps=[MCStep("a", 1.0, 2, 2)], meta={"question": "other"})
    with pytest.raises(FormatError, match="field 'labels': expected a list of 1 true/false labels"):
        ConversationRecord(question="q", steps=["a"], labels=[0.5])
    with pytest.raises(FormatError, match=r"field 'meta.answer': expected no 'answer' key in meta"):
        stepwise_to_conversation(StepwiseRecord(question="q", steps=["a"], labels=[True], answer="1",
                                                meta={"answer": "2"}))
    assert ProcessBenchRecord(question="q", steps=["a"], correctness=[-1]).labels == [False]


# One valid line per kind; the shared fields (question, images, id, answer, meta) are checked alike for all four.
GOOD_LINES = {
    "stepwise": {"question": "q", "steps": ["a"], "labels": [True]},
    "mc": {"question": "q", "steps_with_score": [{"step": "a", "score": 1.0, "num_mc_correct": 2, "num_mc_total": 2}]},
    "conversation": {"conversations": None},  # filled in by _good_line: the conversation of question "q", step "a"
    "processbench": {"question": "q", "response": {"steps": ["a"], "process_correctness": [1]}},
}


def _good_line(kind: str) -> dict:
    line = json.loads(json.dumps(GOOD_LINES[kind]))
    if kind == "conversation":
        line["conversations"] = to_visualprm_conversation("q", ["a"], [True])
    return line


@pytest.mark.parametrize("kind", list(GOOD_LINES))
def test_the_four_kinds_share_their_field_checks(tmp_path, kind):
    images = "images" if kind == "stepwise" else "image"  # mmalign's own key; InternVL's formats say "image"
    cases = [
        ({"id": True}, "field 'id': expected a string or an integer, got True"),
        ({images: [""]}, f"field '{images}[0]': expected a non-empty string, got ''"),
    ]
    if kind == "stepwise":  # meta is its own field; the InternVL kinds keep unknown keys as meta
        cases.append(({"meta": ["a"]}, "field 'meta': expected an object with string keys, got ['a']"))
    if kind != "conversation":  # a VisualPRM400K conversation carries no answer
        cases.append(({"answer": 7}, "field 'answer': expected a string, got 7"))
    for change, message in cases:
        path = _write_lines(tmp_path / f"{kind}.jsonl", [{**_good_line(kind), **change}])
        with pytest.raises(FormatError) as err:
            read_jsonl(path, kind)
        assert str(err.value).startswith(f"{path}:1: {message}")


@pytest.mark.parametrize(
    ("make", "steps_field"),
    [
        (lambda **kw: StepwiseRecord(labels=[True], **kw), "steps"),
        (lambda **kw: MCRecord(**kw), "steps_with_score"),
        (lambda **kw: ConversationRecord(labels=[True], **kw), "steps"),
        (lambda **kw: ProcessBenchRecord(correctness=[1], **kw), "response.steps"),
    ],
)
def test_a_record_reports_its_first_bad_field(make, steps_field):
    """Every kind checks the question, then its own steps, then the shared fields: a record wrong in all three
    names its question; with the question fixed, its steps."""
    with pytest.raises(FormatError, match="^field 'question': expected a non-empty string, got ''$"):
        make(question="", steps=[], id=True)
    with pytest.raises(FormatError, match=f"^field '{re.escape(steps_field)}': expected a non-empty list"):
        make(question="q", steps=[], id=True)
    with pytest.raises(FormatError, match="^field 'id': expected a string or an integer, got True$"):
        make(question="q", steps=[MCStep("a", 1.0, 2, 2)] if steps_field == "steps_with_score" else ["a"], id=True)


# -- judgement tokens -------------------------------------------------------------------------------------------------

CHAT_SPECIALS = ["<|im_start|>", "<|im_end|>"]


def _word_level(vocab: list[str], *, name: str, chat_specials: bool = True) -> PreTrainedTokenizerFast:
    """Whole-word tokenizer, unknown words -> [UNK]; the ChatML markers are special tokens when `chat_specials`."""
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(["[UNK]", *vocab])}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # splits into \w+ and [^\w\s]+ runs
    extra = {"additional_special_tokens": CHAT_SPECIALS} if chat_specials else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", name_or_path=name, **extra)


def _byte_level_no_merges() -> PreTrainedTokenizerFast:
    """Byte-level BPE with the 256 byte symbols and no merges: every byte is its own token."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, additional_special_tokens=CHAT_SPECIALS, name_or_path="bytes")


def test_judgement_tokens_single():
    tok = _word_level(["+", "-", "assistant"], name="tests/words")
    # ids: [UNK]=0, "+"=1, "-"=2, "assistant"=3, then the added specials
    assert check_judgement_tokens(tok) == (1, 2)
    assert tok.encode("<|im_start|>assistant\n+<|im_end|>", add_special_tokens=False) == [4, 3, 1, 5]
    ids = check_judgement_tokens(_byte_level_no_merges())
    assert _byte_level_no_merges().convert_ids_to_tokens(list(ids)) == ["+", "-"]


def test_judgement_token_unknown():
    tok = _word_level(["-", "assistant"], name="tests/no-plus")
    with pytest.raises(JudgementTokenError) as err:
        check_judgement_tokens(tok)
    assert "tokenizer 'tests/no-plus' (" in str(err.value)
    assert "encodes the judgement '+' as the unknown token ['[UNK]']" in str(err.value)


def test_judgement_token_split_into_several():
    # "✓" is 3 UTF-8 bytes (e2 9c 93) and this tokenizer has no merges: 3 tokens.
    with pytest.raises(JudgementTokenError) as err:
        check_judgement_tokens(_byte_level_no_merges(), plus="✓", minus="✗")
    assert "tokenizer 'bytes' (" in str(err.value)
    assert "encodes the judgement '✓' as 3 tokens ['â', 'ľ', 'ĵ']" in str(err.value)


def test_judgement_token_merged_with_the_turn():
    # Without <|im_end|> as a special token, the Whitespace pre-tokenizer glues "+" to "<|": "+<|" is one
    # (unknown) word, so the judgement is no longer its own token inside the assistant turn.
    tok = _word_level(["+", "-", "assistant", "<|", "|>", "im_start", "im_end"], name="tests/no-chat-specials",
                      chat_specials=False)
    assert tok.encode("+", add_special_tokens=False) == [1]  # fine on its own
    with pytest.raises(JudgementTokenError) as err:
        check_judgement_tokens(tok)
    assert "merges the judgement '+' with the assistant turn around it" in str(err.value)
    assert "['<|', 'im_start', '|>', 'assistant', '[UNK]', 'im_end', '|>']" in str(err.value)


def test_judgement_tokens_must_differ():
    with pytest.raises(JudgementTokenError, match="gives '\\+' and '\\+' the same token id 1"):
        check_judgement_tokens(_word_level(["+", "-"], name="t"), plus="+", minus="+")


def test_project_tiny_tokenizer_passes():
    from rlhf.tiny import build_tokenizer

    tok = build_tokenizer()
    plus, minus = check_judgement_tokens(tok)
    assert tok.convert_ids_to_tokens([plus, minus]) == ["+", "-"]
