"""VisualPRM400K as InternVL's pipeline reads and writes it: empty steps skipped as rejects, the outcome variant."""

import json
import logging

import pytest

from reward.conversation import PRM_SYSTEM_PROMPT, outcome_example, to_visualprm_conversation
from reward.prm_job import PRMDataError, build_rows, read_prm_records
from tests.test_prm_trainer import config


def mc(step_texts, scores, question="<image>\nHow many?"):
    return {"image": "a.png", "question": question, "steps_with_score": [
        {"step": t, "score": s, "num_mc_correct": int(s * 4), "num_mc_total": 4} for t, s in zip(step_texts, scores)]}


def test_a_record_with_an_empty_step_is_a_counted_reject(tmp_path, caplog):
    # VisualPRM400K's raw files hold a few solutions with an empty step (a response with three blank lines in a row
    # splits into an empty piece). One such record used to stop the whole file; it is skipped and counted instead.
    path = tmp_path / "mc.jsonl"
    lines = [mc(["a", "b"], [1.0, 0.5]), mc(["a", "  "], [1.0, 0.0]), mc(["c"], [0.25]),
             {"conversations": [{"from": "system", "value": PRM_SYSTEM_PROMPT},
                                {"from": "human", "value": "### Question:\nq\n\n### Solution Process:\n"},
                                {"from": "gpt", "value": "+"}]}]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    rejects = []
    with caplog.at_level(logging.WARNING, logger="mmalign.prm"):
        records = read_prm_records(path, rejects=rejects)
    assert [line for line, _ in records] == [1, 3]
    assert rejects == [f"{path}:2: field 'steps_with_score[1].step': expected a non-empty step, got '  '",
                       f"{path}:4: field 'conversations[1].value': expected a non-empty step, got ''"]
    assert "2 records with an empty step skipped (rejects)" in caplog.text
    path.write_text(json.dumps(mc(["a"], [1.5])) + "\n" + json.dumps(mc(["a", ""], [1.0, 0.0])) + "\n")
    with pytest.raises(PRMDataError, match=r"mc.jsonl:1: field 'steps_with_score\[0\].score'"):
        read_prm_records(path)  # any other bad field still stops the job, with every problem listed


def test_outcome_variant_is_internvls_orm_conversation():
    # InternVL's item2conv_orm: [system PRM prompt, human "### Question:\n{q}\n\n### Solution Process:\n{response}",
    # gpt '+' iff the LAST step's score > threshold]; response = item['response'], else '\n\n'.join(steps).strip()
    steps, labels = outcome_example(["3 + 4 = 7.", "7 + 2 = 10.", "Answer: \\boxed{10}"], [1.0, 0.0, 0.0])
    assert steps == ["3 + 4 = 7.\n\n7 + 2 = 10.\n\nAnswer: \\boxed{10}"] and labels == [0.0]
    assert to_visualprm_conversation("<image>\nAdd.", steps, labels) == [
        {"from": "system", "value": PRM_SYSTEM_PROMPT},
        {"from": "human", "value": "### Question:\n<image>\nAdd.\n\n### Solution Process:\n3 + 4 = 7.\n\n7 + 2 = 10."
                                   "\n\nAnswer: \\boxed{10}"},
        {"from": "gpt", "value": "-"}]
    assert outcome_example(["a", "b"], [0.0, 0.5], response="  a\n\nb  \n") == (["a\n\nb"], [0.5])


def test_outcome_rows_have_one_judgement_per_solution(tmp_path, tiny_processor):
    from PIL import Image

    Image.new("RGB", (28, 28)).save(tmp_path / "a.png")
    path = tmp_path / "mc.jsonl"
    path.write_text(json.dumps(mc(["a", "b", "c"], [1.0, 1.0, 0.5])) + "\n" + json.dumps(mc(["a", "b"], [1.0, 0.0]))
                    + "\n")
    records = read_prm_records(path)
    process = build_rows(path, records, tiny_processor, config(tmp_path))
    outcome = build_rows(path, records, tiny_processor, config(tmp_path, reward_level="outcome"))
    assert [len(r["judgement_positions"]) for r in process] == [3, 2]
    assert [len(r["judgement_positions"]) for r in outcome] == [1, 1]
    assert [r["scores"] for r in outcome] == [[0.5], [0.0]]  # the last step's Monte Carlo score
    text = tiny_processor.tokenizer.decode(outcome[0]["input_ids"])
    assert "### Solution Process:\na\n\nb\n\nc<|im_end|>" in text


def test_first_turn_holds_the_instruction_wrapped_prompt(tmp_path, tiny_processor):
    # InternVL's VisualPRM pipeline: output['question'] = INSTRUCTION.replace('{question}', question) with a single
    # <image> moved to the front ("<image>\n" + prompt), and the raw question kept as output['question_orig'].
    from PIL import Image

    from reward.prompts import build_prompt, prm_question

    raw = "<image>\nHow many tiles?"
    wrapped = prm_question(raw, {"prompt_template": "boxed"}, n_images=1)
    assert wrapped == "<image>\n" + build_prompt("How many tiles?", "boxed")
    assert wrapped.startswith("<image>\nHow many tiles?\nAnswer the preceding question.")
    assert prm_question(wrapped, {"question_orig": raw}, n_images=1) == wrapped  # InternVL's files: already wrapped
    assert prm_question(raw, {}, n_images=1) == raw  # nothing says how the policy was asked: as written
    assert prm_question(raw, {"prompt_template": "boxed"}, "none", 1) == raw
    assert prm_question("Q?", {}, "final_answer") == build_prompt("Q?", "final_answer")

    Image.new("RGB", (28, 28)).save(tmp_path / "a.png")
    path = tmp_path / "mc.jsonl"
    path.write_text(json.dumps({**mc(["a"], [1.0], question=raw), "prompt_template": "boxed"}) + "\n")
    (row,) = build_rows(path, read_prm_records(path), tiny_processor, config(tmp_path, system_prompt=""))
    text = tiny_processor.tokenizer.decode(row["input_ids"])
    assert "<|im_start|>user\n### Question:\n<img>" in text
    assert "</img>\nHow many tiles?\nAnswer the preceding question." in text
