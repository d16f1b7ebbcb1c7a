"""`mmalign demo --quick`: every stage of the loop runs through the project's own jobs, writes the report, the
metrics and the plots, and a rerun skips the finished stages."""

from __future__ import annotations

import json

import pytest

from data_gen.demo import pipeline
from reward.steps import split_steps
from rlhf.errors import UserError

KEYS = ("sft_greedy_acc", "mpo_greedy_acc", "bon_prm_acc@8", "majority_acc@8", "random_acc@8", "pass@8",
        "prm_step_f1", "prm_step_f1_exact")
STAGES = ("questions", "sft", "rollout", "pairs", "mpo", "test_rollout", "label_subsets", "label_steps",
          "heldout_labels", "prm", "evaluate")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert pipeline.main(["--quick", "--output_dir", str(out)]) == 0
    return out


def test_quick_demo_writes_report_metrics_and_plots(quick_run):
    metrics = json.loads((quick_run / "metrics.json").read_text())
    for key in KEYS:
        assert 0.0 <= metrics[key] <= 1.0, key
    assert list(metrics["stage_seconds"]) == list(STAGES)
    # Best-of-k is reported for k = 1..8 and pass@k bounds every selection method
    bon = metrics["bon"]
    assert sorted(map(int, bon["pass_at_k"])) == list(range(1, 9))
    for k in map(str, range(1, 9)):
        assert bon["pass_at_k"][k] >= max(bon["prm_best_of_k"][k], bon["majority_vote"][k], bon["random"][k]) - 1e-9
    assert bon["prm_best_of_k"]["1"] == pytest.approx(bon["random"]["1"])  # one sample: nothing to choose
    for png in ("bon_curve.png", "mpo_training.png"):
        assert (quick_run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (quick_run / "report.md").read_text()
    assert "## Targets" in report and "PRM step macro-F1" in report and "![Best-of-k](bon_curve.png)" in report
    # each stage used the project's jobs: their outputs are where the next stage read them
    assert (quick_run / "pairs" / "meta.json").is_file()
    assert (quick_run / "mpo" / "final" / "model.safetensors").is_file()
    assert (quick_run / "prm" / "final" / "model.safetensors").is_file()
    assert (quick_run / "label_steps" / "visualprm.jsonl").read_text().strip()
    # the recipe's step settings reached both label stages: each response is labelled in its steps, and each record
    # says how; the PRM took them from its data, saved them beside its weights, and was scored with them
    split, max_steps = pipeline.parse([]).step_split, pipeline.QUICK_SIZES["max_steps_per_solution"]
    for stage in ("label_steps", "heldout_labels"):
        records = [json.loads(line) for line in (quick_run / stage / "mc.jsonl").read_text().splitlines()]
        assert records and all(r["step_settings"] == {"step_split": split, "max_steps_per_solution": max_steps}
                               for r in records)
        for r in records:
            assert [s["step"] for s in r["steps_with_score"]] == split_steps(r["response"], max_steps, split)
    saved = json.loads((quick_run / "prm" / "final" / "step_settings.json").read_text())
    assert saved == {"step_split": split, "max_steps_per_solution": max_steps, "system_prompt": None}
    assert metrics["prm_step_settings"] == saved
    assert metrics["step_scores"] == "running_product"
    assert set(metrics["prm_step_auc"]) == {"reading", "sum", "answer"}
    assert all(v is None or 0.0 <= v <= 1.0 for v in metrics["prm_step_auc"].values())
    assert "prm_step_auc (reading steps)" in report
    assert set(metrics["prm_step_auc_within_question"]) == {"reading", "sum", "answer"}
    assert all(v is None or 0.0 <= v <= 1.0 for v in metrics["prm_step_auc_within_question"].values())
    assert "| steps | AUC | AUC within question | AUC, swapped images |" in report
    # the image ablation ran: the same keys as with the real images, and the trained PRM's scores move with the pixels
    assert set(metrics["prm_step_auc_image_ablated"]) == {"reading", "sum", "answer"}
    assert 0.0 <= metrics["bon_prm_ablated_acc@8"] <= 1.0
    assert metrics["prm_image_sensitivity"] > 0.0
    assert "images swapped" in report and "Best-of-8 with swapped images" in report
    # each stage's CPU seconds and load average are in the metrics and the report
    assert set(metrics["stage_usage"]) == set(STAGES)
    assert all(u["cpu_seconds"] >= 0 and u["load_start"] >= 0 for u in metrics["stage_usage"].values())
    assert "| stage | what | wall s | CPU s | load start -> end |" in report
    assert set(metrics["train_mc_labels_vs_exact_by_kind"]) == {"reading", "sum", "answer"}


def test_rerun_skips_finished_stages(quick_run, caplog):
    before = (quick_run / "metrics.json").read_text()
    caplog.set_level("INFO", logger="mmalign.demo")
    assert pipeline.main(["--quick", "--output_dir", str(quick_run)]) == 0
    skipped = [r.getMessage() for r in caplog.records if "done earlier" in r.getMessage()]
    assert len(skipped) == len(STAGES)
    after = json.loads((quick_run / "metrics.json").read_text())
    assert {k: after[k] for k in KEYS} == {k: json.loads(before)[k] for k in KEYS}
    assert "(done earlier)" in (quick_run / "report.md").read_text()


def test_other_settings_in_the_same_folder_are_refused(quick_run):
    with pytest.raises(UserError, match="other settings"):
        pipeline.main(["--quick", "--output_dir", str(quick_run), "--aggregation", "mean"])


@pytest.mark.parametrize("flag, value, message", [
    ("--bon_policy", "best", "bon_policy"), ("--label_questions", "0", "counts must be >= 1"),
    ("--step_threshold", "1.5", "step_threshold"), ("--prm_init", "base", "prm_init"),
    ("--step_scores", "max", "step_scores"), ("--step_split", "(", "step_split: not a regular expression")])
def test_bad_settings_are_one_line_errors(tmp_path, flag, value, message):
    with pytest.raises(UserError, match=message):
        pipeline.parse(["--output_dir", str(tmp_path), flag, value])
