"""The PRM's step settings travel with the model (`reward.step_settings`): label-steps records them, the PRM job
reads them from its data (refusing data that disagree) and saves them beside the weights, and scoring reads them
from the checkpoint (flags may only repeat them; a checkpoint without them scores with the defaults, and says so)."""

from __future__ import annotations

import json
import logging

import pytest

from reward.conversation import PRM_SYSTEM_PROMPT
from rlhf.errors import UserError
from reward.step_settings import (SETTINGS_FILE, StepSettings, StepSettingsError, data_segmentation,
                                  record_segmentation, scoring_settings)

SPLIT = r"(?<=,)(?= )"


def test_settings_normalise_check_and_round_trip(tmp_path):
    s = StepSettings("", None, "")  # '' means none, for the pattern and the system turn alike
    assert (s.step_split, s.max_steps_per_solution, s.system_prompt) == (None, None, None)
    assert StepSettings() == StepSettings(None, None, PRM_SYSTEM_PROMPT)  # the released VisualPRM's
    own = StepSettings(SPLIT, 2, "Judge.")
    assert own.split("a is 3, b is 4.\n\nc.\n\nAnswer: 7") == ["a is 3, b is 4.", "c.\n\nAnswer: 7"]  # 4 -> k = 2
    assert own.segmentation() == {"step_split": SPLIT, "max_steps_per_solution": 2}
    path = own.save(tmp_path)
    assert path == tmp_path / SETTINGS_FILE
    assert json.loads(path.read_text()) == {"step_split": SPLIT, "max_steps_per_solution": 2,
                                            "system_prompt": "Judge."}
    assert StepSettings.load(tmp_path) == own and StepSettings.load(tmp_path / "none") is None
    with pytest.raises(StepSettingsError, match="max_steps_per_solution: expected a positive integer or null"):
        StepSettings(max_steps_per_solution=True)
    with pytest.raises(StepSettingsError, match="got 0"):
        StepSettings(max_steps_per_solution=0)
    with pytest.raises(UserError, match="step_split: not a regular expression"):
        StepSettings(step_split="(")
    path.write_text(json.dumps({"step_split": None, "max_steps_per_solution": "12", "system_prompt": None}))
    with pytest.raises(StepSettingsError) as err:
        StepSettings.load(tmp_path)
    assert str(err.value) == (f"{path}: field 'max_steps_per_solution': expected a positive integer or null, "
                              "got '12'")


def _meta(split, limit):
    return {"step_settings": {"step_split": split, "max_steps_per_solution": limit}}


def test_data_segmentation_agrees_or_names_the_record():
    records = [("a.jsonl:1", _meta(SPLIT, 12)), ("a.jsonl:2", {}), ("b.jsonl:1", _meta(SPLIT, 12))]
    # not given: the data's; a record without settings (hand-made, VisualPRM400K) takes them
    assert data_segmentation(records, {}) == {"step_split": SPLIT, "max_steps_per_solution": 12}
    assert data_segmentation(records, {"max_steps_per_solution": 12, "step_split": SPLIT})["step_split"] == SPLIT
    # no record says: the given values, else none
    assert data_segmentation([("a:1", {})], {"max_steps_per_solution": 16}) == {
        "step_split": None, "max_steps_per_solution": 16}
    with pytest.raises(StepSettingsError) as err:
        data_segmentation([*records, ("b.jsonl:2", _meta(SPLIT, 16))], {})
    assert str(err.value) == ("b.jsonl:2: field 'step_settings.max_steps_per_solution': expected 12 (as at "
                              "a.jsonl:1), got 16: every record of a PRM's data must be cut into steps the same way")
    with pytest.raises(StepSettingsError) as err:
        data_segmentation(records, {"step_split": ""})  # given: no split; the data were cut at commas
    assert str(err.value).startswith(f"a.jsonl:1: field 'step_settings.step_split': expected None (the step_split "
                                     f"given to this job), got {SPLIT!r}")
    with pytest.raises(StepSettingsError, match=r"^a.jsonl:3: field 'step_settings.max_steps_per_solution': "
                                                r"expected a positive integer or null, got -1"):
        data_segmentation([("a.jsonl:3", _meta(None, -1))], {})
    with pytest.raises(StepSettingsError, match="field 'step_settings': expected an object with exactly the keys"):
        data_segmentation([("a.jsonl:4", {"step_settings": {"step_split": None}})], {})
    assert record_segmentation({}) is None and record_segmentation(_meta("", None)) == _meta(None, None)[
        "step_settings"]


def test_scoring_reads_the_checkpoint_and_flags_may_only_repeat_it(tmp_path):
    saved = StepSettings(SPLIT, 12, None)
    saved.save(tmp_path)
    assert scoring_settings(tmp_path) == saved
    assert scoring_settings(tmp_path, step_split=SPLIT, max_steps_per_solution=12, system_prompt="") == saved
    with pytest.raises(StepSettingsError) as err:
        scoring_settings(tmp_path, max_steps_per_solution=16)
    assert str(err.value).startswith(f"max_steps_per_solution: 16 disagrees with the PRM's own 12 "
                                     f"({tmp_path / SETTINGS_FILE}, saved when it was trained)")
    with pytest.raises(StepSettingsError, match="system_prompt: 'Judge.' disagrees with the PRM's own None"):
        scoring_settings(tmp_path, system_prompt="Judge.")


def test_a_checkpoint_without_settings_scores_with_the_flags_and_the_defaults(tiny_checkpoint, caplog):
    """Older checkpoints (and the released VisualPRM) have no step_settings.json: the flags given, the published
    defaults for the rest, and one warning naming the checkpoint."""
    assert not (tiny_checkpoint / SETTINGS_FILE).exists()
    caplog.set_level(logging.WARNING, logger="mmalign.steps")
    assert scoring_settings(tiny_checkpoint) == StepSettings()
    assert f"{tiny_checkpoint}: no {SETTINGS_FILE}" in caplog.text
    assert "step_split None, max_steps_per_solution None, the published system prompt" in caplog.text
    assert scoring_settings(tiny_checkpoint, step_split=SPLIT, system_prompt="") == StepSettings(SPLIT, None, None)
    assert scoring_settings("tiny-internvl") == StepSettings()  # a name, not a folder: the same fallback


def test_label_steps_prm_scorer_round_trip(tmp_path, monkeypatch, capsys):
    """label-steps cuts with a step_split and records it; `mmalign prm` takes the settings from those records and
    saves them with the checkpoint; `mmalign bon`'s scorer reads them from it and splits text as the labels were
    split. A PRM job given another step limit, or data whose records disagree, is refused in one line."""
    from data_gen.label_steps import run
    from reward.bon_job import ScorerArguments, load_scorer
    from rlhf.cli import main
    from tests.test_label_steps import FakeBackend, by_step_probability, job_args, rollout_rows, write_input
    from tests.test_prm_trainer import REPO

    rows = rollout_rows()
    rows[0]["responses"][0]["text"] = "The tiles show 3, 4.\n\n3 + 4 = 7.\n\n\\boxed{7}"
    path = write_input(tmp_path, rows)
    labels = tmp_path / "labels"
    run(*job_args(path, labels, step_split=SPLIT, mode="adaptive"), backend=FakeBackend(by_step_probability([0.5])))
    conversations = [json.loads(line) for line in (labels / "visualprm.jsonl").read_text().splitlines()]
    assert len(conversations) == 6
    assert all(c["step_settings"] == {"step_split": SPLIT, "max_steps_per_solution": 12} for c in conversations)

    monkeypatch.chdir(REPO)
    common = ["prm", "--config", "recipes/prm/tiny.yaml", "--data", str(labels / "meta.json"), "--max_steps", "1",
              "--per_device_train_batch_size", "2", "--eval_data", ""]
    out = tmp_path / "prm"
    assert main([*common, "--output_dir", str(out), "--system_prompt", ""]) == 0  # tiny.yaml's limit is 12 too
    final = out / "final"
    assert json.loads((final / SETTINGS_FILE).read_text()) == {
        "step_split": SPLIT, "max_steps_per_solution": 12, "system_prompt": None}

    scorer = load_scorer(ScorerArguments(model_name_or_path=str(final), data=["d"], output_dir="x", max_patches=1,
                                         device="cpu"))
    assert scorer.settings == StepSettings(SPLIT, 12, None)
    assert scorer.steps_of(rows[0]["responses"][0]["text"]) == ["The tiles show 3,", "4.", "3 + 4 = 7.", "\\boxed{7}"]
    with pytest.raises(StepSettingsError, match="step_split: '' disagrees with the PRM's own"):
        load_scorer(ScorerArguments(model_name_or_path=str(final), data=["d"], output_dir="x", step_split=""))

    # the PRM job refuses a step limit the data were not labelled with, before loading the model
    assert main([*common, "--output_dir", str(tmp_path / "no"), "--max_steps_per_solution", "16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"mmalign prm: {(labels / 'visualprm.jsonl').resolve()}:1: field 'step_settings.max_steps_per_solution': "
        "expected 16 (the max_steps_per_solution given to this job), got 12")
    # ... and data whose records disagree with each other
    lines = (labels / "visualprm.jsonl").read_text().splitlines()
    other = json.loads(lines[3])
    other["step_settings"]["step_split"] = None
    (labels / "visualprm.jsonl").write_text("\n".join([*lines[:3], json.dumps(other), *lines[4:]]) + "\n")
    assert main([*common, "--output_dir", str(tmp_path / "no")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert f"visualprm.jsonl:4: field 'step_settings.step_split': expected {SPLIT!r} (as at " in err[0]
    assert not (tmp_path / "no").exists()


def test_prm_rows_refuse_to_merge_steps_cut_by_a_step_split(tmp_path, tiny_processor):
    """Steps cut at a pattern cannot be rejoined as scoring rejoins them (the text between them is not in the
    data): a record over the limit is refused, naming it; blank-line steps are merged as scoring merges them."""
    from reward.formats import StepwiseRecord
    from reward.prm_job import PRMDataError, build_rows
    from tests.test_prm_trainer import config

    records = [(1, StepwiseRecord(question="q", steps=["a,", "b,", "c."], labels=[True, True, False]))]
    rows = build_rows("d.jsonl", records, tiny_processor, config(tmp_path, max_steps_per_solution=2))
    assert rows[0]["scores"] == [1.0, 0.0]  # k = 2: "a,\n\nb," takes b's label, "c." its own
    with pytest.raises(PRMDataError, match=r"^d.jsonl:1: 3 steps > max_steps_per_solution 2, cut with step_split"):
        build_rows("d.jsonl", records, tiny_processor, config(tmp_path, max_steps_per_solution=2, step_split=SPLIT))
