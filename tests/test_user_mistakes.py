"""Every kind of user mistake ends with one line naming file, record and field (exit status 2), or a counted,
reported outcome: one tiny case per kind, run through `mmalign <job>` in-process (`rlhf.cli.main`).

Each case builds its input in a temporary folder and returns (argv, expected exit status, strings the one
error line must hold). docs/reliability.md has the table of every kind and its outcome; keep the two in step.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rlhf import cli

CASES: dict = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


# -- tiny inputs -----------------------------------------------------------------------------------------------------

def png(path: Path, color=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (28, 28), color).save(path)
    return path


def truncated_png(path: Path) -> Path:
    data = png(path).read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def truncated_jpeg(path: Path) -> Path:
    """A JPEG (under any name) missing its last 64 bytes: PIL's verify() passes it, decoding fails. The pixels are
    seeded: with unseeded noise and 2 bytes cut, some draws lost only the end marker and decoded fine."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(0).integers(0, 256, size=(28, 28, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG")
    path.write_bytes(path.read_bytes()[:-64])
    return path


def garbage_png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not an image\n")
    return path


def jsonl(path: Path, *records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def bon_question(**over) -> dict:
    return {"id": "q1", "image": "a.png", "question": "<image>\nAdd the tiles.", "answer": "3",
            "responses": ["1 + 2 = 3.\n\nAnswer: \\boxed{3}", "1 + 2 = 4.\n\nAnswer: \\boxed{4}"]} | over


def bon_argv(tmp: Path, data: Path, *extra: str, model: str = "tiny-internvl") -> list[str]:
    return ["bon", "--model_name_or_path", model, "--data", str(data), "--output_dir", str(tmp / "out"),
            "--device", "cpu", "--max_patches", "1", *extra]


def bon_input(tmp: Path, **over) -> Path:
    png(tmp / "data" / "a.png")
    return jsonl(tmp / "data" / "questions.jsonl", bon_question(**over))


def prm_record(**over) -> dict:
    return {"id": "s1", "images": ["a.png"], "question": "<image>\nAdd the tiles.",
            "steps": ["1 + 2 = 3.", "Answer: \\boxed{3}"], "labels": [True, True]} | over


def prm_argv(tmp: Path, data: Path, *extra: str) -> list[str]:
    return ["prm", "--model_name_or_path", "tiny-internvl", "--data", str(data), "--output_dir", str(tmp / "out"),
            "--max_steps", "1", "--report_to", "none", "--save_strategy", "no", "--max_dynamic_patch", "1",
            "--per_device_train_batch_size", "1", *extra]


def prm_input(tmp: Path, *records) -> Path:
    png(tmp / "data" / "a.png")
    return jsonl(tmp / "data" / "train.jsonl", *(records or [prm_record()]))


def mpo_input(tmp: Path, image=png, **over) -> Path:
    root = tmp / "mmpr"
    image(root / "images" / "a.png")
    jsonl(root / "ann.jsonl", {"image": "a.png", "question": "<image>\nAdd the tiles.",
                               "chosen": "1 + 2 = 3. Answer: \\boxed{3}", "rejected": "1 + 2 = 4. Answer: \\boxed{4}"}
          | over)
    (root / "meta.json").write_text(json.dumps({"tiny": {"root": "images", "annotation": "ann.jsonl",
                                                         "repeat_time": 1, "max_dynamic_patch": 1}}))
    return root / "meta.json"


def mpo_argv(tmp: Path, *extra: str, data: Path | None = None) -> list[str]:
    return ["mpo", "--model_name_or_path", "tiny-internvl", "--data", str(data or mpo_input(tmp)), "--output_dir",
            str(tmp / "out"), "--report_to", "none", "--max_steps", "1", "--save_strategy", "no",
            "--max_dynamic_patch", "1", *extra]


def questions_input(tmp: Path, *records) -> Path:
    png(tmp / "q" / "a.png")
    return jsonl(tmp / "q" / "questions.jsonl",
                 *(records or [{"id": "q1", "image": "a.png", "question": "<image>\nAdd the tiles.", "answer": "3"}]))


def rollout_argv(tmp: Path, questions: Path, *extra: str) -> list[str]:
    return ["rollout", "--questions", str(questions), "--output_dir", str(tmp / "out"), "--backend", "hf",
            "--model", "tiny-internvl", "--backend_kwargs", '{"device": "cpu", "max_patches": 1}',
            "--num_samples", "1", "--max_new_tokens", "2", "--progress", "false", *extra]


def rollout_record(**over) -> dict:
    return {"id": "q1", "question": "What is 1 + 2?", "answer": "3", "prompt_template": "boxed",
            "system_prompt": None, "pass_rate": 0.5,
            "responses": [{"text": "1 + 2 = 3. Answer: \\boxed{3}", "answer": "3", "correct": True},
                          {"text": "1 + 2 = 4. Answer: \\boxed{4}", "answer": "4", "correct": False}]} | over


def pairs_argv(tmp: Path, rollouts: Path, *extra: str) -> list[str]:
    return ["pairs", "--rollouts", str(rollouts), "--output_dir", str(tmp / "pairs"), "--dropout_ntp", "none",
            "--progress", "false", *extra]


def label_argv(tmp: Path, solutions: Path, *extra: str) -> list[str]:
    return ["label-steps", "--solutions", str(solutions), "--output_dir", str(tmp / "labels"), "--backend", "hf",
            "--model", "tiny-internvl", "--backend_kwargs", '{"device": "cpu", "max_patches": 1}',
            "--num_continuations", "1", "--max_new_tokens", "2", "--progress", "false", *extra]


def model_folder(tmp: Path, files: dict[str, bytes | str]) -> Path:
    folder = tmp / "model"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    return folder


QWEN2_CONFIG = json.dumps({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 8,
                           "intermediate_size": 16, "num_attention_heads": 2, "num_hidden_layers": 1,
                           "num_key_value_heads": 1, "vocab_size": 32})


def recipe(tmp: Path, text: str) -> Path:
    path = tmp / "recipe.yaml"
    path.write_text(text)
    return path


# -- tracebacks that became one line -------------------------------------------------------------------------------

@case
def bon_corrupt_image(tmp):
    data = bon_input(tmp)
    garbage_png(tmp / "data" / "a.png")
    return bon_argv(tmp, data), 2, [f"{data}:1", "'image'", "readable image", "cannot identify"]


@case
def bon_truncated_image(tmp):
    data = bon_input(tmp)
    truncated_png(tmp / "data" / "a.png")
    return bon_argv(tmp, data), 2, [f"{data}:1", "'image'", "readable image", "runcated"]


@case
def bon_placeholder_count(tmp):
    data = bon_input(tmp, question="<image>\n<image>\nAdd the tiles.")
    return bon_argv(tmp, data), 2, [f"{data}:1", "'question'", "1 image(s), got 2 placeholder(s)"]


@case
def prm_corrupt_image(tmp):
    data = prm_input(tmp)
    garbage_png(tmp / "data" / "a.png")
    return prm_argv(tmp, data), 2, [f"{data}:1", "'images'", "cannot identify"]


@case
def prm_truncated_image(tmp):
    data = prm_input(tmp)
    truncated_png(tmp / "data" / "a.png")
    return prm_argv(tmp, data), 2, [f"{data}:1", "'images'", "runcated"]


@case
def mpo_corrupt_image(tmp):
    meta = mpo_input(tmp, image=garbage_png)
    return mpo_argv(tmp, data=meta), 2, ["ann.jsonl:1", "image", "cannot identify"]


@case
def mpo_truncated_image(tmp):
    meta = mpo_input(tmp, image=truncated_png)
    return mpo_argv(tmp, data=meta), 2, ["ann.jsonl:1", "image", "runcated"]


@case
def mpo_truncated_jpeg(tmp):
    meta = mpo_input(tmp, image=truncated_jpeg)
    return mpo_argv(tmp, data=meta), 2, ["ann.jsonl:1", "image", "image file is truncated"]


@case
def bon_truncated_jpeg(tmp):
    data = bon_input(tmp)
    truncated_jpeg(tmp / "data" / "a.png")
    return bon_argv(tmp, data), 2, [f"{data}:1", "'image'", "image file is truncated"]


@case
def bon_unknown_flag(tmp):
    return bon_argv(tmp, bon_input(tmp), "--aggregaton", "min"), 2, ["command line", "--aggregaton", "unknown flag",
                                                                      "did you mean --aggregation"]


@case
def prm_unknown_yaml_key(tmp):
    path = recipe(tmp, "model_name_or_path: tiny-internvl\nlearning_rat: 1.0e-3\n")
    return ["prm", "--config", str(path)], 2, [str(path), "learning_rat", "unknown key", "'learning_rate'"]


@case
def missing_recipe(tmp):
    return ["mpo", "--config", str(tmp / "nope.yaml")], 2, [str(tmp / "nope.yaml"), "recipe file not found"]


@case
def malformed_yaml(tmp):
    path = recipe(tmp, "model_name_or_path: tiny-internvl\nbeta: [0.1\n")
    return ["mpo", "--config", str(path)], 2, [str(path), "not valid YAML"]


@case
def yaml_python_tag(tmp):
    path = recipe(tmp, "model_name_or_path: !!python/object/apply:os.system ['true']\n")
    return ["rollout", "--config", str(path)], 2, [f"{path}:1", "python/object/apply", "plain YAML"]


@case
def recipe_not_mapping(tmp):
    path = recipe(tmp, "- model_name_or_path\n- tiny-internvl\n")
    return ["bon", "--config", str(path)], 2, [str(path), "YAML mapping", "list"]


def _output_file(tmp: Path) -> Path:
    path = tmp / "taken"
    path.write_text("a file\n")
    return path


@case
def output_dir_is_file_bon(tmp):
    argv = bon_argv(tmp, bon_input(tmp)) + ["--output_dir", str(_output_file(tmp))]
    return argv, 2, ["command line: --output_dir", "a folder", "not an existing file", "taken'"]


@case
def output_dir_is_file_prm(tmp):
    return prm_argv(tmp, prm_input(tmp), "--output_dir", str(_output_file(tmp))), 2, ["--output_dir", "existing file"]


@case
def output_dir_is_file_mpo(tmp):
    return mpo_argv(tmp, "--output_dir", str(_output_file(tmp))), 2, ["--output_dir", "existing file"]


@case
def output_dir_is_file_rollout(tmp):
    argv = rollout_argv(tmp, questions_input(tmp), "--output_dir", str(_output_file(tmp)))
    return argv, 2, ["--output_dir", "existing file"]


@case
def output_dir_is_file_pairs(tmp):
    argv = pairs_argv(tmp, jsonl(tmp / "r.jsonl", rollout_record()), "--output_dir", str(_output_file(tmp)))
    return argv, 2, ["--output_dir", "existing file"]


@case
def output_dir_is_file_label_steps(tmp):
    solutions = jsonl(tmp / "s.jsonl", {"id": "q1", "question": "1 + 2?", "answer": "3",
                                        "solution": "1 + 2 = 3.\n\nAnswer: \\boxed{3}"})
    return label_argv(tmp, solutions, "--output_dir", str(_output_file(tmp))), 2, ["--output_dir", "existing file"]


@case
def output_dir_is_file_eval_prm(tmp):
    data = jsonl(tmp / "pb.jsonl", {"question": "1 + 2?", "response": {"steps": ["1 + 2 = 3."],
                                                                         "process_correctness": [1]}})
    argv = ["eval-prm", "--model_name_or_path", "tiny-internvl", "--data", str(data), "--output_dir",
            str(_output_file(tmp)), "--device", "cpu"]
    return argv, 2, ["--output_dir", "existing file"]


@case
def model_config_not_json(tmp):
    folder = model_folder(tmp, {"config.json": "{model_type: qwen2", "model.safetensors": b""})
    return bon_argv(tmp, bon_input(tmp), model=str(folder)), 2, [f"{folder}/config.json", "not valid JSON"]


@case
def model_corrupt_safetensors(tmp):
    folder = model_folder(tmp, {"config.json": QWEN2_CONFIG, "model.safetensors": b"\x10\x00\x00\x00garbage"})
    return bon_argv(tmp, bon_input(tmp), model=str(folder)), 2, [f"{folder}/model.safetensors",
                                                                 "not a readable safetensors file"]


@case
def model_no_weights(tmp):
    folder = model_folder(tmp, {"config.json": QWEN2_CONFIG})
    return bon_argv(tmp, bon_input(tmp), model=str(folder)), 2, [str(folder), "no *.safetensors weights"]


@case
def model_pickle_only(tmp):
    folder = model_folder(tmp, {"config.json": QWEN2_CONFIG, "pytorch_model.bin": b"\x80\x04pickle"})
    return bon_argv(tmp, bon_input(tmp), model=str(folder)), 2, [str(folder), "only safetensors weights are loaded",
                                                                 "pytorch_model.bin", "convert"]


@case
def model_path_missing(tmp):
    missing = tmp / "no" / "such" / "model"
    return bon_argv(tmp, bon_input(tmp), model=str(missing)), 2, [str(missing), "model folder not found"]


@case
def corrupt_settings_on_resume(tmp):
    out = tmp / "out"
    out.mkdir()
    (out / "rollout_settings.json").write_text('{"num_samples": 1, ')
    return rollout_argv(tmp, questions_input(tmp)), 2, [str(out / "rollout_settings.json"), "not readable JSON",
                                                        "--resume false"]


@case
def batch_size_zero(tmp):
    return mpo_argv(tmp, "--per_device_train_batch_size", "0"), 2, [
        "command line: --per_device_train_batch_size", "an integer >= 1", "got 0"]


@case
def unknown_loss_type(tmp):
    path = recipe(tmp, "loss_type: [sigmoid, bco_pair, sftt]\n")
    return mpo_argv(tmp, "--config", str(path)), 2, [f"{path}: loss_type", "entry 2", "'sftt'"]


@case
def learning_rate_nan(tmp):
    path = recipe(tmp, "learning_rate: .nan\n")
    return mpo_argv(tmp, "--config", str(path)), 2, [f"{path}: learning_rate", "finite number >= 0", "nan"]


@case
def learning_rate_negative(tmp):
    return prm_argv(tmp, prm_input(tmp), "--learning_rate=-1e-4"), 2, ["command line: --learning_rate",
                                                                          "finite number >= 0"]


@case
def max_length_one(tmp):
    return mpo_argv(tmp, "--max_length", "1"), 2, ["command line: --max_length", "an integer >= 2"]


@case
def resume_true_without_checkpoint(tmp):
    return mpo_argv(tmp, "--resume_from_checkpoint", "true"), 2, [
        "command line: --resume_from_checkpoint", "checkpoint-* folder", "there is none"]


@case
def resume_missing_folder(tmp):
    return prm_argv(tmp, prm_input(tmp), "--resume_from_checkpoint", str(tmp / "ckpt")), 2, [
        "--resume_from_checkpoint", "existing checkpoint folder"]


@case
def pairs_wrong_types(tmp):
    record = rollout_record()
    record["responses"][0]["score"] = "high"
    rollouts = jsonl(tmp / "r.jsonl", record)
    return pairs_argv(tmp, rollouts), 2, [f"{rollouts}:1", "responses[0].score", "a number or null", "'high'"]


@case
def pairs_correct_not_bool(tmp):
    record = rollout_record()
    record["responses"][1]["correct"] = "no"
    rollouts = jsonl(tmp / "r.jsonl", record)
    return pairs_argv(tmp, rollouts), 2, [f"{rollouts}:1", "responses[1].correct", "true, false or null"]


# -- accepted silently before: now an error or a counted outcome ---------------------------------------------------

@case
def bon_image_absolute_outside_root(tmp):
    outside = png(tmp / "elsewhere" / "b.png")
    data = bon_input(tmp, image=str(outside))
    return bon_argv(tmp, data), 2, [f"{data}:1", "'image'", "outside the image root"]


@case
def bon_image_dotdot(tmp):
    data = bon_input(tmp, image="../../../../../../../../etc/passwd")
    return bon_argv(tmp, data), 2, [f"{data}:1", "'image'", "outside the image root"]


@case
def prm_image_absolute_outside_root(tmp):
    outside = png(tmp / "elsewhere" / "b.png")
    data = prm_input(tmp, prm_record(images=[str(outside)]))
    return prm_argv(tmp, data), 2, [f"{data}:1", "'images'", "outside the image root"]


@case
def prm_image_outside_given_root(tmp):
    data = prm_input(tmp, prm_record(images=["../data/a.png"]))
    png(tmp / "root" / "x.png")
    return prm_argv(tmp, data, "--image_root", str(tmp / "root")), 2, [f"{data}:1", "outside the image root"]


@case
def prm_image_dotdot_without_root(tmp):
    """A relative path that climbs out of the data file's folder (an existing image there) is refused as well."""
    png(tmp / "elsewhere" / "b.png")
    data = prm_input(tmp, prm_record(images=["../elsewhere/b.png"]))
    return prm_argv(tmp, data), 2, [f"{data}:1", "'images'", "outside the image root", "meta.json"]


@case
def weight_decay_nan(tmp):
    path = recipe(tmp, "weight_decay: .nan\n")
    return mpo_argv(tmp, "--config", str(path)), 2, [f"{path}: weight_decay", "finite number >= 0"]


@case
def negative_loss_weights(tmp):
    return mpo_argv(tmp, "--loss_weights", "0.8", "-0.2", "1.0"), 2, ["command line: --loss_weights",
                                                                      "finite numbers >= 0", "-0.2"]


@case
def negative_epochs(tmp):
    return prm_argv(tmp, prm_input(tmp), "--num_train_epochs", "-1"), 2, ["command line: --num_train_epochs",
                                                                          "finite number >= 0"]


@case
def save_steps_zero(tmp):
    return mpo_argv(tmp, "--save_strategy", "steps", "--save_steps", "0"), 2, ["command line: --save_steps",
                                                                               "a number > 0"]


@case
def temperature_negative(tmp):
    return rollout_argv(tmp, questions_input(tmp), "--temperature", "-0.5"), 2, ["command line: --temperature",
                                                                                 "a number >= 0"]


@case
def max_new_tokens_zero(tmp):
    path = recipe(tmp, "max_new_tokens: 0\n")
    argv = ["label-steps", "--config", str(path)] + label_argv(tmp, tmp / "s.jsonl")[1:]
    argv.remove("--max_new_tokens")
    argv.remove("2")
    return argv, 2, [f"{path}: max_new_tokens", "an integer >= 1"]


@case
def every_item_fails(tmp):
    questions = questions_input(tmp)
    (tmp / "q" / "a.png").unlink()  # the question's image is gone: the item fails, the job says so and exits 1
    return rollout_argv(tmp, questions), 1, ["rollouts: every item failed", "max_failure_rate", "failures.jsonl"]


@case
def resume_changed_input(tmp):
    questions = questions_input(tmp)
    assert cli.main(rollout_argv(tmp, questions)) == 0
    jsonl(questions, {"id": "q1", "image": "a.png", "question": "<image>\nAdd the tiles.", "answer": "4"})
    return rollout_argv(tmp, questions), 2, ["rollouts.jsonl", "id 'q1'", "input item changed", "answer",
                                             "1 changed item(s)"]


@case
def pairs_resume_changed_input(tmp):
    rollouts = jsonl(tmp / "r.jsonl", rollout_record())
    assert cli.main(pairs_argv(tmp, rollouts)) == 0
    changed = rollout_record()
    changed["responses"][1]["text"] = "1 + 2 = 5. Answer: \\boxed{5}"
    jsonl(rollouts, changed)
    return pairs_argv(tmp, rollouts), 2, ["pair_groups.jsonl", "id 'q1'", "input item changed", "rollout record"]


@case
def label_steps_resume_changed_input(tmp):
    solution = {"id": "q1", "question": "What is 1 + 2?", "answer": "3", "solution": "1 + 2 = 3.\n\nAnswer: \\boxed{3}"}
    solutions = jsonl(tmp / "s.jsonl", solution)
    assert cli.main(label_argv(tmp, solutions)) == 0
    jsonl(solutions, solution | {"answer": "4"})
    return label_argv(tmp, solutions), 2, ["mc.jsonl", "id 'q1#0'", "input item changed", "answer"]


@case
def bon_duplicate_ids(tmp):
    png(tmp / "data" / "a.png")
    data = jsonl(tmp / "data" / "questions.jsonl", bon_question(), bon_question())
    return bon_argv(tmp, data), 2, [f"{data}:2", "'id'", "unique id", "first at"]


@case
def bon_id_not_scalar(tmp):
    data = bon_input(tmp, id=1.5)
    return bon_argv(tmp, data), 2, [f"{data}:1", "'id'", "a non-empty string or an integer", "1.5"]


@case
def bon_resume_other_settings(tmp):
    data = bon_input(tmp)
    assert cli.main(bon_argv(tmp, data)) == 0
    return bon_argv(tmp, data, "--aggregation", "min"), 2, ["bon_settings.json", "other settings (aggregation)",
                                                             "--resume false"]


@case
def bon_resume_changed_input(tmp):
    data = bon_input(tmp)
    assert cli.main(bon_argv(tmp, data)) == 0
    jsonl(data, bon_question(responses=["1 + 2 = 3.\n\nAnswer: \\boxed{3}"]))
    return bon_argv(tmp, data), 2, ["scores.jsonl", "id 'q1'", "input item changed", "responses"]


@case
def bon_question_fails(tmp):
    png(tmp / "data" / "a.png")
    data = jsonl(tmp / "data" / "questions.jsonl", bon_question(),
                 bon_question(id="q2", responses=["1 + 2 = <IMG_CONTEXT>."]))
    return bon_argv(tmp, data), 1, ["scores: 1 of 2 questions have no scores", "id 'q2'", "failures.jsonl"]


@case
def prm_duplicate_ids(tmp):
    data = prm_input(tmp, prm_record(), prm_record())
    return prm_argv(tmp, data), 2, [f"{data}:2", "'id'", "unique id", "first at line 1"]


@case
def pairs_numeric_answer(tmp):
    record = rollout_record(answer=3)
    record["responses"][0]["answer"] = 3
    rollouts = jsonl(tmp / "r.jsonl", record)
    return pairs_argv(tmp, rollouts), 0, []


# -- already one line (kept checked) -------------------------------------------------------------------------------

@case
def unknown_job(tmp):
    return ["trian"], 2, ["unknown job 'trian'"]


@case
def rollout_malformed_json_line(tmp):
    questions = questions_input(tmp, {"id": "q1", "question": "1 + 2?"}, '{"id": "q2", "question": ')
    return rollout_argv(tmp, questions), 2, [f"{questions}:2", "malformed JSON"]


@case
def rollout_duplicate_ids(tmp):
    questions = questions_input(tmp, {"id": "q1", "question": "1 + 2?"}, {"id": "q1", "question": "2 + 2?"})
    return rollout_argv(tmp, questions), 2, [f"{questions}:2", "id", "duplicate 'q1'"]


@case
def rollout_unknown_backend(tmp):
    return rollout_argv(tmp, questions_input(tmp), "--backend", "tgi"), 2, ["backend must be one of", "'tgi'"]


@case
def flag_bad_type(tmp):
    return rollout_argv(tmp, questions_input(tmp), "--num_samples", "many"), 2, ["command line", "num_samples",
                                                                                 "'many'"]


@case
def mpo_missing_field(tmp):
    meta = mpo_input(tmp, rejected=None)
    return mpo_argv(tmp, data=meta), 2, ["ann.jsonl:1", "rejected"]


# -- the test --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(CASES))
def test_user_mistake(kind, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv, status, needles = CASES[kind](tmp_path)
    capsys.readouterr()
    assert cli.main(argv) == status
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if not needles:
        return
    lines = [line for line in err.splitlines() if all(n in line for n in needles)]
    assert len(lines) == 1, f"no single line holds {needles}:\n{err}"
    if status == 2:
        job = argv[0] if argv[0] in cli.JOBS else ""
        assert lines[0].startswith(f"mmalign {job}".strip() + ": "), lines[0]


def test_at_least_forty_kinds():
    assert len(CASES) >= 40
