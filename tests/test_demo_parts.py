"""The demo's pieces that the quick run cannot check by its numbers: the image ablation, per-kind agreement, the
band and one-class warnings, per-stage seeds and usage, and the recipes shipped inside the package."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from data_gen.demo import pipeline
from data_gen.demo.evaluate import (derangement, mc_agreement_by_kind, prm_fit_by_kind, prm_warnings, reading_piece,
                                    score_test_responses, step_kind)
from data_gen.demo.task import TileSumTask, step_truth
from reward.step_settings import StepSettings
from rlhf.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: tiny models run on one thread


@pytest.mark.parametrize("n, seed", [(2, 0), (3, 1), (10, 0), (300, 0), (300, 4)])
def test_derangement_moves_every_question_and_is_fixed_by_seed(n, seed):
    order = derangement(n, seed)
    assert sorted(order) == list(range(n))
    assert all(order[i] != i for i in range(n))
    assert derangement(n, seed) == order
    assert n == 2 or derangement(n, seed + 1) != order


def test_derangement_needs_two_items():
    with pytest.raises(ValueError, match="n >= 2"):
        derangement(1, 0)


def test_step_kind_of_step_split_pieces():
    assert [step_kind(s) for s in ["The tiles show 3,", "7,", "and 9.", "3 + 7 = 10.", "Answer: \\boxed{10}",
                                   "", "hello"]] == ["reading", "reading", "reading", "sum", "answer", None, None]


def test_reading_piece_names_the_place_in_the_list():
    pieces = ["The tiles show 3,", " 7,", " 5", " and 9.", "The tiles show 3, 7, 5 and 9.", "The tile shows 4.",
              "3 + 7 = 10.", "Answer: \\boxed{10}"]
    assert [reading_piece(s) for s in pieces] == ["first", "middle", "middle", "last", "last", "last", None, None]


def test_prm_fit_by_kind_worked_numbers(tmp_path):
    """Two labelled solutions, a scorer that says P(+) = 0.8 for every step: BCE is -ln 0.8 = 0.2231 on `+` labels
    and -ln 0.2 = 1.6094 on `-` labels. Steps after a `-` label do not count (the second solution's sum). Reading
    pieces: first (+, +), last (+, -); sums: (+); answer: (+)."""
    from PIL import Image

    from reward.scorer import SolutionScore

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    def record(steps, scores):
        return {"id": "q#0", "image": "a.png", "question": "<image>\nq", "steps_with_score": [
            {"step": st, "score": sc, "num_mc_correct": int(sc > 0), "num_mc_total": 1} for st, sc in zip(steps, scores)]}
    rows = [record(["The tiles show 3,", " and 4.", "3 + 4 = 7.", "Answer: \\boxed{7}"], [1, 1, 1, 1]),
            record(["The tiles show 5,", " and 6.", "5 + 6 = 12."], [1, 0, 0])]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    class Flat:
        def score_many(self, question, images, solutions):
            return [SolutionScore(score=0.8, step_scores=[0.8] * len(steps)) for steps in solutions]

    fit = prm_fit_by_kind(Flat(), tmp_path / "mc.jsonl", tmp_path, limit=10)
    plus, minus = 0.2231, 1.6094
    assert fit["reading"] == {"steps": 4, "plus_share": 0.75, "bce": round((3 * plus + minus) / 4, 4)}
    assert fit["reading:first"] == {"steps": 2, "plus_share": 1.0, "bce": plus}
    assert fit["reading:last"] == {"steps": 2, "plus_share": 0.5, "bce": round((plus + minus) / 2, 4)}
    assert fit["reading:middle"] == {"steps": 0, "plus_share": None, "bce": None}
    assert fit["sum"] == {"steps": 1, "plus_share": 1.0, "bce": plus}
    assert fit["answer"] == {"steps": 1, "plus_share": 1.0, "bce": plus}
    assert prm_fit_by_kind(Flat(), tmp_path / "mc.jsonl", tmp_path, limit=1)["sum"]["steps"] == 1


def test_mc_agreement_by_kind_worked_numbers():
    # reading: exact (+, +, -, -), MC (+, -, -, -): 3 of 4 agree; F1(+) = 2/3 (tp 1, fn 1), F1(-) = 0.8 (tn 2, fp 1)
    # -> macro 0.7333; sum: exact (+, +), MC (+, -): one class in the exact labels, no F1; answer: none
    exact = [True, True, False, False, True, True]
    mc = [True, False, False, False, True, False]
    kinds = ["reading"] * 4 + ["sum"] * 2
    out = mc_agreement_by_kind(exact, mc, kinds)
    assert out["reading"] == {"steps": 4, "exact_right": 2, "mc_right": 1, "agreement": 0.75, "macro_f1": 0.7333}
    assert out["sum"] == {"steps": 2, "exact_right": 2, "mc_right": 1, "agreement": 0.5, "macro_f1": None}
    assert out["answer"] == {"steps": 0, "exact_right": 0, "mc_right": 0, "agreement": None, "macro_f1": None}


def test_prm_one_class_warning():
    everything_plus = {"f1_positive": 0.8, "f1_negative": 0.0, "n_positive": 8, "n_negative": 2}
    assert "judged every test step '+' (2 of 10 steps are wrong)" in prm_warnings(everything_plus)[0]
    everything_minus = {"f1_positive": 0.0, "f1_negative": 0.5, "n_positive": 3, "n_negative": 3}
    assert "judged every test step '-'" in prm_warnings(everything_minus)[0]
    assert prm_warnings({"f1_positive": 0.7, "f1_negative": 0.6, "n_positive": 5, "n_negative": 5}) == []


@pytest.mark.parametrize("history, message", [
    ([[400, 0.1], [1000, 0.19]], "did not reach the band where MPO and Best-of-N have room: greedy validation accuracy 19% at step 1000"),
    ([[400, 0.2], [420, 0.9]], "overshot the band: greedy validation accuracy 90% at step 420"),
    ([[400, 0.2], [420, 0.5]], None)])
def test_sft_band_warning(tmp_path, history, message):
    (tmp_path / "sft_done.json").write_text(json.dumps({"metrics": {"validation_history": history}}))
    got = pipeline.sft_warnings(tmp_path, quick=False)
    assert (got == []) if message is None else message in got[0]
    assert pipeline.sft_warnings(tmp_path, quick=True) == []


def _records(task, n):
    items = task.items("test", n)
    records = [{"id": it.id, "question": it.question,
                "responses": [{"text": it.solution, "answer": it.answer, "correct": True},
                              {"text": it.solution.replace(str(it.values[0]), str(it.values[0] % 9 + 1), 1),
                               "answer": "0", "correct": False}]} for it in items]
    return items, records


def test_image_ablation_separates_a_prm_that_reads_pixels_from_one_that_does_not():
    """The same PRM, the same responses, each image swapped for another question's: a tiny PRM (random weights,
    so its scores depend on every input) scores them differently; with the vision tower's output zeroed, the
    language model sees no pixels and the scores are identical to the last bit."""
    from reward.scorer import PRMScorer
    from rlhf.tiny import build_internvl, build_processor

    task = TileSumTask()
    items, records = _records(task, 3)
    values = {it.id: it.values for it in items}
    images = [it.image for it in items]
    swapped = [images[j] for j in derangement(len(images), 0)]
    processor = build_processor()
    model = build_internvl(processor, seed=0).eval()
    scorer = PRMScorer(model, processor, max_patches=1, settings=StepSettings(system_prompt=None))
    real = score_test_responses(scorer, records, images, values, "raw", "real")
    ablated = score_test_responses(scorer, records, swapped, values, "raw", "swapped")
    assert len(real.raw_probs) == len(ablated.raw_probs) > 0
    assert real.image_sensitivity(ablated) > 1e-4
    hook = model.model.multi_modal_projector.register_forward_hook(lambda mod, inp, out: torch.zeros_like(out))
    try:
        blind = score_test_responses(scorer, records, images, values, "raw", "blind")
        blind_swapped = score_test_responses(scorer, records, swapped, values, "raw", "blind, swapped")
    finally:
        hook.remove()
    assert blind.image_sensitivity(blind_swapped) == 0.0
    assert blind.raw_probs != real.raw_probs
    # the exact labels follow the responses, not the images: the gold solution is right, the misread one wrong
    assert real.exact_labels == ablated.exact_labels
    assert real.by_kind["reading"][0] == [True, False] * 3


class _PositionScorer:
    """A PRM stand-in whose P(+) follows the question (its image) and the step index only, never the step's text:
    the prior the demo's PRM learned (measured: "3 + 1 = 4." and "3 + 1 = 5." both 0.60)."""

    def __init__(self, settings: StepSettings):
        self.settings = settings

    def steps_of(self, text: str) -> list[str]:
        return self.settings.split(text)

    def score_many(self, question, images, texts):
        from reward.scorer import SolutionScore

        base = images[0].getpixel((0, 0))[0] / 255  # the image's background grey: one prior per question
        out = []
        for text in texts:
            steps = [round(0.2 + 0.6 * base * (i + 1) / 8, 6) for i in range(len(self.steps_of(text)))]
            out.append(SolutionScore(steps, min(steps)))
        return out


def test_sft_recipe_band_safe_stop_is_the_demo_band():
    """The SFT recipe's band-safe stop puts back weights inside the band the demo warns about, and stops inside it."""
    import yaml

    from data_gen.demo.settings import SFT_BAND

    recipe = yaml.safe_load((pipeline.RECIPES / "sft.yaml").read_text())
    assert (recipe["stop_fallback_at_least"], recipe["stop_overshoot_above"]) == SFT_BAND
    assert SFT_BAND[0] <= recipe["stop_at_accuracy"] <= SFT_BAND[1]


def test_within_question_auc_is_one_half_for_a_prm_that_scores_only_image_and_position():
    """The pooled AUC of a prior by image and position can sit far from 0.5 (here the misread first value and the
    right middle values take different places); the AUC within question and step index is 0.5 exactly, and a PRM
    that does read the step gets 1.0 there."""
    task = TileSumTask(min_tiles=4, max_tiles=4, layout="rows")
    items, records = _records(task, 6)
    values = {it.id: it.values for it in items}
    images = [it.image for it in items]
    settings = StepSettings(step_split="(?<=,)(?= )|(?= and )", system_prompt=None)
    prior = score_test_responses(_PositionScorer(settings), records, images, values, "raw", "prior")
    within = prior.auc_within_by_kind()
    assert within["reading"] == 0.5 and within["sum"] is None  # every sum after a misread is not judged on its own
    assert prior.auc_by_kind()["reading"] != 0.5

    class Reader(_PositionScorer):  # the same prior, minus 0.1 on a step that misreads its value
        def score_many(self, question, images, texts):
            item = next(it for it in items if it.image is images[0])
            scores = super().score_many(question, images, texts)
            for text, score in zip(texts, scores):
                truth = step_truth(item.values, self.steps_of(text))
                score.step_scores = [p - (0.0 if ok else 0.1) for p, ok in zip(score.step_scores, truth)]
            return scores

    reader = score_test_responses(Reader(settings), records, images, values, "raw", "reader")
    assert reader.auc_within_by_kind()["reading"] == 1.0


def test_every_stage_gets_the_demo_seed_and_markers_hold_usage(tmp_path, monkeypatch):
    """--seed S reaches every job's argv and the SFT stage; each finished stage's marker has its CPU seconds and
    the load average at its start and end (fake stages: the wiring only)."""
    seen: dict[str, list[str]] = {}

    def fake(name):
        def main(argv):
            seen.setdefault(name, []).append(argv)
            return 0
        return main

    d = pipeline.Demo(pipeline.parse(["--output_dir", str(tmp_path), "--seed", "3"]))
    calls = []
    d.stage("x", {"a": 1}, lambda folder: calls.append(folder), 1, 1)
    marker = json.loads((tmp_path / "x" / pipeline.STAGE_FILE).read_text())
    assert set(pipeline.USAGE_KEYS) <= set(marker) and marker["cpu_seconds"] >= 0 and marker["load_start"] >= 0
    d.stage("x", {"a": 1}, lambda folder: calls.append(folder), 1, 1)  # done earlier: skipped, usage kept
    assert len(calls) == 1 and d.usage["x"]["cpu_seconds"] == marker["cpu_seconds"]
    monkeypatch.setattr(pipeline.Demo, "stage", lambda self, name, settings, fn, i, n: seen.setdefault(name, settings))
    with pytest.raises(FileNotFoundError):
        d.run()  # the fake stages write nothing for the report to read
    jobs = [k for k, v in seen.items() if isinstance(v, dict) and "argv" in v]
    assert set(jobs) == {"rollout", "pairs", "mpo", "test_rollout", "label_steps", "heldout_labels", "prm"}
    for name in jobs:
        argv = seen[name]["argv"]
        assert argv[argv.index("--seed") + 1] == "3", name
        assert argv[argv.index("--config") + 1].startswith("sha256:"), name  # recipes named by content
    assert seen["sft"]["seed"] == 3
    board = {"min_tiles": d.args.min_tiles, "max_tiles": d.args.max_tiles, "layout": d.args.layout}
    assert {k: seen["questions"][k] for k in board} == board and {k: seen["sft"][k] for k in board} == board


def test_board_settings_reach_questions_sft_and_evaluation(tmp_path, monkeypatch):
    """min_tiles / max_tiles / layout make one task for every stage: the question files, the SFT stage's argv and
    the evaluate stage's settings; a board the task refuses is refused up front with the task's reason."""
    from data_gen.demo import sft
    from data_gen.demo.evaluate import EvalSettings

    args = pipeline.parse(["--output_dir", str(tmp_path), "--min_tiles", "3", "--max_tiles", "3", "--layout", "rows"])
    d = pipeline.Demo(args)
    d.write_questions(tmp_path / "q")
    record = json.loads((tmp_path / "q" / "test.jsonl").read_text().splitlines()[0])
    assert len(record["values"]) == 3
    assert record["values"] == args.task().item("test", 0).values
    captured = {}
    monkeypatch.setattr(sft, "train_sft", lambda out, **kw: captured.update(kw))
    d.train_sft(tmp_path / "sft")
    task = captured["task"]
    assert (task.min_tiles, task.max_tiles, task.layout) == (3, 3, "rows")
    e = EvalSettings.of(args)
    assert (e.min_tiles, e.max_tiles, e.layout) == (3, 3, "rows")
    with pytest.raises(UserError, match="demo: TileSumTask: layout rows puts one tile in a row"):
        pipeline.parse(["--output_dir", str(tmp_path), "--max_tiles", "5", "--layout", "rows"])


def test_wheel_ships_the_demo_recipes(tmp_path):
    """`pip install .` (not editable) must carry the stage recipes: `mmalign demo` reads them from the package."""
    import shutil

    src = tmp_path / "src"  # a copy: the build writes build/ and *.egg-info beside the sources
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for package in ("rlhf", "reward", "data_gen"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("mmalign-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for recipe in ("demo", "sft", "rollout", "pairs", "mpo", "label_steps", "prm"):
        assert f"data_gen/recipes/demo/{recipe}.yaml" in names, recipe
    assert pipeline.RECIPES.is_dir() and (pipeline.RECIPES / "demo.yaml").is_file()


def test_seed_table_min_median_max_and_missed_targets():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import demo_seeds

    base = {"sft_greedy_acc": 0.5, "mpo_greedy_acc": 0.7, "bon_prm_acc@8": 0.7, "majority_acc@8": 0.5,
            "random_acc@8": 0.45, "pass@8": 0.9, "bon_prm_ablated_acc@8": 0.5, "prm_step_f1_exact": 0.85,
            "prm_step_auc": {"reading": 0.9, "sum": 0.95}, "prm_step_auc_image_ablated": {"reading": 0.5},
            "mc_labels_vs_exact_f1": 0.9, "total_minutes": 18.0, "sweep": {"load_start": 0.1, "load_end": 2.0}}
    worse = base | {"mpo_greedy_acc": 0.55, "total_minutes": 21.0}  # MPO +5 points, too slow
    third = base | {"mpo_greedy_acc": 0.8}
    per_seed = {0: base, 1: worse, 2: third}
    text = demo_seeds.table(per_seed, quick=False)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in text.splitlines()[2:]}
    assert rows["**min**"][1] == "55.0%" and rows["**median**"][1] == "70.0%" and rows["**max**"][1] == "80.0%"
    assert rows["**min**"][-3] == "18.0" and rows["**max**"][-3] == "21.0"
    assert rows["0"][-2] == "9 / 9" and rows["1"][-2] == "7 / 9"
    assert demo_seeds.missed(per_seed, quick=False) == [
        "seed 1: MPO greedy >= SFT greedy + 10 points (55.0% vs 50.0%)", "seed 1: full run <= 20 minutes (21.0 min)"]


def test_seed_table_of_finished_runs(tmp_path):
    """--runs tabulates finished demo folders: the seed from each metrics.json, the load at the first stage's start
    and the last stage's end, two runs of one seed refused."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import demo_seeds

    for name, seed, acc in (("a", 3, 0.6), ("b", 1, 0.8)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps({
            "seed": seed, "mpo_greedy_acc": acc, "total_minutes": 19.5,
            "stage_usage": {"questions": {"load_start": 0.5, "load_end": 0.6}, "sft": {"load_start": 0.6,
                                                                                     "load_end": 1.75}}}))
    assert demo_seeds.main(["--runs", str(tmp_path / "a"), str(tmp_path / "b"), "--output_dir",
                            str(tmp_path / "out")]) == 0
    doc = (tmp_path / "out" / "seeds.md").read_text()
    assert doc.startswith("# mmalign demo over seeds 3, 1")
    row = next(line for line in doc.splitlines() if line.startswith("| 3 |"))
    assert "| 60.0% |" in row and row.endswith("| 0.5 -> 1.75 |")
    saved = json.loads((tmp_path / "out" / "seeds.json").read_text())
    assert saved["1"]["mpo_greedy_acc"] == 0.8 and saved["1"]["sweep"]["wall_seconds"] == 1170.0
    with pytest.raises(SystemExit, match="two runs of seed 3"):
        demo_seeds.main(["--runs", str(tmp_path / "a"), str(tmp_path / "a"), "--output_dir", str(tmp_path / "o")])


def test_step_scores_line_up_with_the_steps_they_judge():
    """What the demo's AUCs rest on: the scorer's pieces of a response are `steps_of(text)`, one P(+) per piece, in
    order; scoring the pieces as a list gives the same numbers; `step_truth` judges the same pieces; and the kinds
    follow the reading cut per value ("The tiles show 3," / "7," / "5" / "and 9.")."""
    from reward.scorer import PRMScorer
    from rlhf.tiny import build_internvl, build_processor

    split = pipeline.parse([]).step_split
    processor = build_processor()
    scorer = PRMScorer(build_internvl(processor, seed=0).eval(), processor, max_patches=1,
                       settings=StepSettings(split, 12, None))
    item = TileSumTask().item("test", 0)
    wrong = item.solution.replace(f"show {item.values[0]},", f"show {item.values[0] % 9 + 1},", 1)
    for text in (item.solution, wrong):
        steps = scorer.steps_of(text)
        got = scorer.score_many(item.question, [item.image], [text, steps])
        assert len(got[0].step_scores) == len(steps) == len(step_truth_of(item, steps))
        assert got[0].step_scores == pytest.approx(got[1].step_scores, abs=1e-6)
        n = len(item.values)
        assert [step_kind(s) for s in steps] == ["reading"] * n + ["sum"] * (n - 1) + ["answer"]
    assert step_truth_of(item, scorer.steps_of(wrong)) == [False] * len(scorer.steps_of(wrong))
    assert all(step_truth_of(item, scorer.steps_of(item.solution)))


def step_truth_of(item, steps):
    from data_gen.demo.task import step_truth

    return step_truth(item.values, steps)
