"""Best-of-N metrics (worked numbers) and the `mmalign bon` job on a tiny PRM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reward.bon import (
    BoNMethod,
    QuestionResponses,
    best_index,
    bon_metrics,
    k_values,
    majority_answer,
    markdown_table,
    pass_at_k,
    random_at_k,
)
from rlhf.errors import UserError
from tests.conftest import write_image


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: tiny models run on one thread


def test_k_values():
    assert k_values(1) == [1]
    assert k_values(8) == [1, 2, 4, 8]
    assert k_values(6) == [1, 2, 4, 6]
    with pytest.raises(ValueError):
        k_values(0)


def test_best_index_takes_the_first_k_and_breaks_ties_by_order():
    scores = [0.2, 0.9, 0.5, 0.9, 1.0]
    assert best_index(scores, 1) == 0
    assert best_index(scores, 4) == 1  # 0.9 at 1 and 3: the earlier wins
    assert best_index(scores, 5) == 4


def test_majority_answer_ties_and_missing_answers():
    # k=4: "3" x2 and "5" x2 tie; "3" was seen first -> its first response, index 0
    assert majority_answer(["3", "5", " 3 ", "5"], 4) == 0
    assert majority_answer([None, "8", "7", "7"], 4) == 2  # None does not vote; "7" x2 beats "8"
    assert majority_answer([None, "", None], 3) is None
    assert majority_answer(["1", "2", "2"], 2) == 0  # only the first k count


def test_pass_at_k_worked_numbers():
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)
    assert pass_at_k(5, 2, 3) == pytest.approx(1 - 1 / 10)  # 1 - C(3,3)/C(5,3)
    assert pass_at_k(4, 2, 1) == pytest.approx(0.5)  # pass@1 = c / n
    assert pass_at_k(4, 0, 4) == 0.0
    assert pass_at_k(4, 3, 2) == 1.0  # n - c < k: every k-subset holds a correct one
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def test_random_at_k_is_the_fraction_correct_among_the_first_k():
    assert random_at_k([False, True, True, False], 1) == 0.0
    assert random_at_k([False, True, True, False], 2) == 0.5
    assert random_at_k([False, True, True, False], 4) == 0.5


def test_bon_metrics_worked_example():
    """Two questions, N = 4.

    Q1: scores .2 .9 .5 .9, answers 3 5 3 5, correct F T F T (c = 2)
        k=1: PRM->0 (F); vote "3" (F); pass 2/4; random 0
        k=2: PRM->1 (T); vote tie 3/5 -> "3" (F); pass 1 - C(2,2)/C(4,2) = 5/6; random 1/2
        k=4: PRM tie .9 at 1 and 3 -> 1 (T); vote tie 2-2 -> "3" (F); pass 1; random 2/4
    Q2: scores .7 .1 .3 .6, answers 7 None 8 8, correct T F F F (c = 1)
        k=1: PRM->0 (T); vote "7" (T); pass 1/4; random 1
        k=2: PRM->0 (T); vote "7" (None abstains) (T); pass 1 - C(3,2)/C(4,2) = 1/2; random 1/2
        k=4: PRM->0 (T); vote "8" x2 (F); pass 1; random 1/4
    """
    q1 = QuestionResponses([0.2, 0.9, 0.5, 0.9], ["3", "5", "3", "5"], [False, True, False, True])
    q2 = QuestionResponses([0.7, 0.1, 0.3, 0.6], ["7", None, "8", "8"], [True, False, False, False])
    m = bon_metrics([q1, q2])
    expected = {
        BoNMethod.PRM: {1: 0.5, 2: 1.0, 4: 1.0},
        BoNMethod.MAJORITY: {1: 0.5, 2: 0.5, 4: 0.0},
        BoNMethod.PASS: {1: (0.5 + 0.25) / 2, 2: (5 / 6 + 0.5) / 2, 4: 1.0},
        BoNMethod.RANDOM: {1: 0.5, 2: 0.5, 4: (0.5 + 0.25) / 2},
    }
    for method, values in expected.items():
        assert m[method.value] == pytest.approx(values), method
    table = markdown_table(m)
    assert table.splitlines()[0] == "| k | PRM Best-of-k | Majority vote@k | Pass@k | Random choice@k |"
    assert table.splitlines()[3] == "| 2 | 100.0 | 50.0 | 66.7 | 50.0 |"


def test_bon_metrics_runs_k_up_to_the_smallest_n():
    q_short = QuestionResponses([0.1, 0.2], ["1", "2"], [False, True])
    q_long = QuestionResponses([0.3] * 5, ["1"] * 5, [True] * 5)
    m = bon_metrics([q_short, q_long])
    assert sorted(m["prm_best_of_k"]) == [1, 2]
    assert m["prm_best_of_k"][2] == 1.0  # q_short picks index 1 (0.2 > 0.1)
    with pytest.raises(ValueError, match="every k"):
        bon_metrics([q_short], ks=[4])


# -- the job --------------------------------------------------------------------------------------------------------


def _solution(values, wrong_at=None) -> str:
    steps, total = [f"The tiles show {', '.join(map(str, values))}."], values[0]
    for i, v in enumerate(values[1:]):
        new = total + v + (1 if i == wrong_at else 0)
        steps.append(f"{total} + {v} = {new}.")
        total = new
    return "\n\n".join(steps + [f"Answer: \\boxed{{{total}}}"])


def _write_questions(root: Path, extra_lines: list[str] = ()) -> Path:
    write_image(root / "img" / "a.png")
    rows = [
        {"id": "q1", "image": "img/a.png", "question": "<image>\nAdd the numbers.", "answer": "15",
         "responses": [_solution([3, 7, 5], 0), _solution([3, 7, 5]), "no answer here", _solution([3, 7, 5], 1)]},
        {"id": "q2", "question": "What is 2 + 9?",
         "responses": [{"text": _solution([2, 9]), "answer": "11", "correct": True},
                       {"response": _solution([2, 9], 0), "answer": "12", "correct": False},
                       {"text": _solution([2, 9]), "answer": "11", "correct": True},
                       {"text": "The tiles show 2, 9.", "answer": None, "correct": False}]},
        {"id": "q3", "question": "Unjudged: what is 1 + 1?", "responses": ["1 + 1 = 2.\n\nAnswer: \\boxed{2}"]},
    ]
    path = root / "questions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "".join(line + "\n" for line in extra_lines))
    return path


def _config(root: Path, data: Path, **extra) -> Path:
    lines = ["model_name_or_path: tiny-internvl", f"data: [{data}]", f"output_dir: {root / 'out'}",
             "max_patches: 1", "device: cpu", "batch_size: 3"] + [f"{k}: {v}" for k, v in extra.items()]
    config = root / "bon.yaml"
    config.write_text("\n".join(lines) + "\n")
    return config


def test_bon_job_end_to_end(tmp_path):
    from reward.bon_job import ScorerArguments, load_scorer
    from rlhf.cli import main

    data = _write_questions(tmp_path)
    assert main(["bon", "--config", str(_config(tmp_path, data))]) == 0
    out = tmp_path / "out"
    rows = [json.loads(line) for line in (out / "selected.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["q1", "q2", "q3"]
    # correctness: q1 judged by reward.verify against "15"; q2 taken from the response objects; q3 unknown
    assert rows[0]["correct"] == [False, True, False, False]
    assert rows[0]["answers"] == ["16", "15", None, "16"]
    assert rows[1]["correct"] == [True, False, True, False]
    assert rows[2]["correct"] == [None]
    # the selection is the argmax of the solution scores, which aggregate (mean) the step scores
    scorer = load_scorer(ScorerArguments(model_name_or_path="tiny-internvl", data=[str(data)], output_dir="x",
                                         max_patches=1, device="cpu"))
    for r in rows:
        assert r["selected"] == max(range(len(r["scores"])), key=lambda i: (r["scores"][i], -i))
        for steps, score in zip(r["all_step_scores"], r["scores"]):
            assert score == pytest.approx(sum(steps) / len(steps) if steps else 0.0)
    image = [str(tmp_path / "img" / "a.png")]
    direct = scorer.score_many("<image>\nAdd the numbers.", image, [_solution([3, 7, 5], 0), "no answer here"])
    assert len(rows[0]["all_step_scores"][0]) == 4  # 4 blank-line separated steps
    for got, want in zip([rows[0]["all_step_scores"][0], rows[0]["all_step_scores"][2]], direct):
        assert got == pytest.approx(want.step_scores, abs=1e-6)
    # metrics: the two judged questions, recomputed from selected.jsonl
    summary = json.loads((out / "bon_metrics.json").read_text())
    assert summary["n_questions"] == 3 and summary["n_evaluated"] == 2
    expected = bon_metrics([QuestionResponses(r["scores"], r["answers"], r["correct"]) for r in rows[:2]])
    assert summary["metrics"] == {m: {str(k): v for k, v in ks.items()} for m, ks in expected.items()}
    assert summary["metrics"]["pass_at_k"]["4"] == 1.0
    assert summary["metrics"]["majority_vote"]["4"] == 0.5  # q1: "16" x2 wins (F); q2: "11" x2 wins (T)
    assert markdown_table(expected) in (out / "bon_table.md").read_text()
    assert (out / "bon_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_scorer_arguments_reach_the_scorer(tmp_path):
    from reward.bon_job import ScorerArguments, load_scorer
    from reward.conversation import PRM_SYSTEM_PROMPT

    def scorer(**kw):
        return load_scorer(ScorerArguments(model_name_or_path="tiny-internvl", data=["d"], output_dir="x",
                                           max_patches=1, device="cpu", **kw))

    published, own = scorer(), scorer(system_prompt="", step_split=r"(?<=,)(?= )")  # no step_settings.json
    assert (published.settings.system_prompt, published.settings.step_split) == (PRM_SYSTEM_PROMPT, None)
    assert own.settings.system_prompt is None and own.steps_of("3, 4.\n\n7") == ["3,", "4.", "7"]
    with_prompt = published.score("q", None, ["a", "b"]).step_scores
    without = own.score("q", None, ["a", "b"]).step_scores
    assert len(with_prompt) == len(without) == 2 and with_prompt != pytest.approx(without)
    with pytest.raises(UserError, match="step_split"):
        ScorerArguments(model_name_or_path="m", data=["d"], output_dir="x", step_split="(")


def test_bon_job_bad_records_one_line_or_skipped(tmp_path, capsys):
    from reward.bon_job import read_records
    from rlhf.cli import main
    from rlhf.errors import UserError

    bad = ['{"question": "q", "responses": []}',
           '{"question": "q", "responses": ["a", {"answer": "1"}]}',
           '{"question": "q", "image": "missing.png", "responses": ["a"]}',
           '{"question": "q", "responses": ["a", {"text": "b", "correct": "yes"}]}',
           'not json']
    data = _write_questions(tmp_path, bad)
    with pytest.raises(UserError) as err:
        read_records([str(data)], None, skip_invalid=False, rejects=tmp_path / "rejects.jsonl")
    assert str(err.value).startswith(f"{data}:4: field 'responses': expected a non-empty list of responses "
                                     "(5 bad records in all)")
    assert main(["bon", "--config", str(_config(tmp_path, data))]) == 2
    assert f"{data}:4: field 'responses'" in capsys.readouterr().err
    records = read_records([str(data)], None, skip_invalid=True, rejects=tmp_path / "rejects.jsonl")
    assert [r.id for r in records] == ["q1", "q2", "q3"]
    rejects = [json.loads(line) for line in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["error"].split(": ", 2)[1]) for r in rejects] == [
        (4, "field 'responses'"), (5, "field 'responses[1]'"), (6, "field 'image'"),
        (7, "field 'responses[1].correct'"), (8, "expected one JSON object per line (Expecting value at column 1)"),
    ]


# -- scoring through the runner: the old loop's numbers, resuming ---------------------------------------------------


def _with_unkeyed(root: Path) -> tuple[Path, Path]:
    """The three questions, and a second file whose one record has no id (keyed FILE:LINE in scores.jsonl)."""
    data = _write_questions(root)
    unkeyed = root / "more.jsonl"
    unkeyed.write_text(json.dumps({"question": "What is 4 + 4?", "answer": "8",
                                   "responses": [_solution([4, 4]), _solution([4, 4], 0)]}) + "\n")
    return data, unkeyed


def _old_loop(data: list[Path]) -> tuple[list[dict], dict]:
    """What `mmalign bon` computed before it scored through the runner: selected.jsonl rows and bon_metrics.json
    from one scorer called directly on every question in turn (its settings: _config's)."""
    from dataclasses import asdict

    from reward.bon_job import ScorerArguments, load_scorer, read_records

    args = ScorerArguments(model_name_or_path="tiny-internvl", data=[str(d) for d in data], output_dir="x",
                           max_patches=1, device="cpu", batch_size=3)
    scorer = load_scorer(args)
    rows, evaluated = [], []
    for r in read_records(args.data, None, skip_invalid=False, rejects=Path("unused")):
        scores = scorer.score_many(r.question, r.images, r.texts)
        solution = [s.score for s in scores]
        best = max(range(len(solution)), key=lambda i: (solution[i], -i))
        rows.append({"id": r.id, "question": r.question, "images": r.images, "answer": r.ground_truth,
                     "selected": best, "response": r.texts[best], "selected_answer": r.answers[best],
                     "selected_correct": r.correct[best], "score": solution[best],
                     "step_scores": scores[best].step_scores, "scores": solution,
                     "all_step_scores": [s.step_scores for s in scores], "answers": r.answers, "correct": r.correct})
        if all(c is not None for c in r.correct):
            evaluated.append(QuestionResponses(solution, r.answers, r.correct))
    metrics = bon_metrics(evaluated)
    n = [q.n for q in evaluated]
    summary = {"n_questions": len(rows), "n_evaluated": len(evaluated), "aggregation": "mean",
               "scoring": asdict(scorer.stats), "n_responses_min": min(n), "n_responses_max": max(n),
               "metrics": {m: {str(k): v for k, v in ks.items()} for m, ks in metrics.items()}}
    return json.loads(json.dumps(rows)), summary


def _outputs(out: Path) -> tuple[list[dict], dict]:
    rows = [json.loads(line) for line in (out / "selected.jsonl").read_text().splitlines()]
    return rows, json.loads((out / "bon_metrics.json").read_text())


def _bon_argv(root: Path, data: Path, unkeyed: Path, *extra: str) -> list[str]:
    return ["bon", "--config", str(_config(root, data)), "--data", str(data), str(unkeyed), "--progress", "false",
            *extra]


def test_bon_through_the_runner_gives_the_numbers_of_the_scorer_called_directly(tmp_path):
    from rlhf.cli import main

    data, unkeyed = _with_unkeyed(tmp_path)
    assert main(_bon_argv(tmp_path, data, unkeyed)) == 0
    out = tmp_path / "out"
    rows, summary = _outputs(out)
    want_rows, want_summary = _old_loop([data, unkeyed])
    assert rows == want_rows  # exactly: the same scorer on the same inputs, the floats through JSON unchanged
    assert summary == want_summary
    assert [r["id"] for r in rows] == ["q1", "q2", "q3", 1]  # a record without id keeps its line number here
    scores = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert [s["id"] for s in scores] == ["q1", "q2", "q3", f"{unkeyed}:1"]  # ...and is FILE:LINE in scores.jsonl
    assert [s["scores"] for s in scores] == [r["scores"] for r in rows]
    assert [s["step_scores"] for s in scores] == [r["all_step_scores"] for r in rows]
    assert json.loads((out / "summary.json").read_text())["succeeded"] == 4
    assert json.loads((out / "bon_settings.json").read_text())["model_name_or_path"] == "tiny-internvl"


def test_bon_resumes_a_stopped_run_scoring_each_question_once(tmp_path, monkeypatch):
    from reward import bon_job
    from rlhf.cli import main
    from rlhf.jobs.runner import FatalJobError

    data, unkeyed = _with_unkeyed(tmp_path)
    out = tmp_path / "out"
    scored = []
    original = bon_job.ScoreWorker.__call__

    def stop_after_two(self, items):  # one question per call
        if len(scored) == 2:
            raise FatalJobError("stopped by the test")
        scored.extend(item["id"] for item in items)
        return original(self, items)

    monkeypatch.setattr(bon_job.ScoreWorker, "__call__", stop_after_two)
    assert main(_bon_argv(tmp_path, data, unkeyed)) == 2
    assert scored == ["q1", "q2"]
    assert [json.loads(line)["id"] for line in (out / "scores.jsonl").read_text().splitlines()] == ["q1", "q2"]
    assert not (out / "selected.jsonl").exists() and not (out / "bon_metrics.json").exists()
    with (out / "scores.jsonl").open("a") as f:
        f.write('{"id": "q3", "scores": [0.')  # and a line torn by a kill mid-write: not a record
    monkeypatch.undo()

    assert main(_bon_argv(tmp_path, data, unkeyed)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["skipped_done"], summary["processed"], summary["failed"]) == (2, 2, 0)
    ids = [json.loads(line)["id"] for line in (out / "scores.jsonl").read_text().splitlines()]
    assert ids == ["q1", "q2", "q3", f"{unkeyed}:1"]  # every question once, in input order
    assert _outputs(out) == _old_loop([data, unkeyed])  # the numbers of one uninterrupted pass


def test_plot_curve_writes_a_png_through_the_shared_figure_saver(tmp_path):
    """Best-of-N curves and MPO histories are saved by one helper (rlhf.plots.save_figure): a PNG file, folders
    made, the figure closed."""
    from reward.bon import plot_curve
    from rlhf.plots import plot_mpo_history, pyplot

    before = len(pyplot().get_fignums())
    path = plot_curve({"majority_vote": {1: 0.5, 2: 0.6, 4: 0.7}}, tmp_path / "a" / "bon.png", title="t")
    assert path == tmp_path / "a" / "bon.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    history = [{"step": 1, "rewards/margins": 0.1, "mpo/preference_loss": 0.7},
               {"step": 2, "rewards/margins": 0.3, "mpo/preference_loss": 0.6}]
    assert plot_mpo_history(history, tmp_path / "b" / "mpo.png").read_bytes()[:4] == b"\x89PNG"
    assert plot_mpo_history([{"step": 1, "loss": 1.0}], tmp_path / "c.png") is None  # nothing MPO to draw
    assert len(pyplot().get_fignums()) == before
