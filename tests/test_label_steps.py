"""label-steps: Monte Carlo step labels (faithful, adaptive, search), VisualPRM400K output, resuming, bad input.

Most tests use `FakeBackend`: a continuation answers `\\boxed{7}` (the right answer) or `\\boxed{8}`, decided by its
request's seed and prefix alone, so every count below can be worked out by hand or recomputed exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from data_gen.backends.base import GenerationResult, RolloutBackend
from data_gen.label_steps import (MCMode, LabelStepsArguments, MCPrefix, MCSettings, MCTask, continuation_seed,
                                  monte_carlo, read_solutions, run, search_split, step_prefix)
from data_gen.prompts import build_prompt
from data_gen.job_common import BackendArguments, JobArguments, SamplingArguments
from rlhf.jobs.runner import FatalJobError, JobInputError
from rlhf.errors import UserError
from reward.conversation import from_visualprm_conversation, hard_label
from reward.formats import read_jsonl
from reward.steps import join_steps, split_steps

ANSWER, WRONG = "7", "8"
QUESTION = "<image>\nWhat is the total?"


class FakeBackend(RolloutBackend):
    """Continuation correct iff `correct(seed, prefix)`; 3 generated tokens each. Records every call; raises
    FatalJobError on call number `fail_on_call` (1-based) to stand for a killed run."""

    def __init__(self, correct, fail_on_call: int | None = None):
        self.correct, self.fail_on_call, self.calls = correct, fail_on_call, []

    def generate(self, requests):
        self.calls.append(list(requests))
        if self.fail_on_call is not None and len(self.calls) == self.fail_on_call:
            raise FatalJobError("the backend went away")
        answers = [ANSWER if self.correct(r.seed, r.assistant_prefix) else WRONG for r in requests]
        return [GenerationResult(r.id, [f"So the sum is \\boxed{{{a}}}"], 3) for r, a in zip(requests, answers)]

    @property
    def requests(self):
        return [r for call in self.calls for r in call]


def by_step_probability(probabilities):
    """Correct with probability p[k] for a prefix of k + 1 steps (blank-line separators, with or without one after
    the last step), decided by the seed."""
    def correct(seed, prefix):
        k = min(prefix.rstrip("\n").count("\n\n"), len(probabilities) - 1)
        return (seed % 10_000) / 10_000 < probabilities[k]
    return correct


def settings(mode, **kw):
    return MCSettings(num_continuations=16, mode=MCMode(mode), sampling=SamplingArguments(seed=0), **kw)


# -- the estimate, worked by hand --------------------------------------------------------------------------------------

# One solution "A\n\nB\n\nC" (id s#0). Correct continuations: step 0 -> j in {5, 9}; step 1 -> none; step 2 -> all.
SID, STEPS = "s#0", ["A", "B", "C"]
PATTERN = {0: {5, 9}, 1: set(), 2: set(range(16))}
SEEDS = {continuation_seed(0, SID, i, j): (i, j) for i in range(3) for j in range(16)}


def pattern_backend(**kw):
    return FakeBackend(lambda seed, prefix: SEEDS[seed][1] in PATTERN[SEEDS[seed][0]], **kw)


def task():
    return MCTask(SID, "What?", [], None, list(STEPS), ANSWER)


def test_faithful_scores_and_labels_worked_numbers():
    backend = pattern_backend()
    [result] = monte_carlo([task()], backend, settings("faithful"))
    # mc = correct / 16: step 0 2/16 = 0.125 (+), step 1 0/16 (-), step 2 16/16 (+); all 48 asked in one call
    assert (result.correct, result.sampled) == ([2, 0, 16], [16, 16, 16])
    assert result.scores == [0.125, 0.0, 1.0] and result.labels == [True, False, True]
    assert [len(c) for c in backend.calls] == [48] and result.num_generated_tokens == 48 * 3
    # InternVL's pipeline continues step i from "\n\n".join(steps[:i + 1]) with nothing after it (the default);
    # mmalign's earlier prefix adds the blank line before the next step (mc_prefix "blank_line")
    prefixes = sorted({r.assistant_prefix for r in backend.requests})
    assert prefixes == ["A", "A\n\nB", "A\n\nB\n\nC"] == [step_prefix(STEPS, i) for i in range(3)]
    assert [step_prefix(STEPS, i, "blank_line") for i in range(3)] == ["A\n\n", "A\n\nB\n\n", "A\n\nB\n\nC\n\n"]
    assert all(r.sampling.n == 1 and r.prompt == "What?" for r in backend.requests)
    assert sorted(r.seed for r in backend.requests) == sorted(SEEDS)  # one seed per (step, continuation)


def test_adaptive_same_labels_fewer_continuations_worked_numbers():
    backend = pattern_backend()
    [result] = monte_carlo([task()], backend, settings("adaptive", first_round=2))
    # step 0: rounds of 2, 2, 4 -> j = 0..7, j = 5 is correct: 1 of 8 (score 0.125, +)
    # step 1: rounds of 2, 2, 4, 8 -> all 16 wrong (-);  step 2: j = 0, 1 both correct, 2 of 2 (+)
    assert (result.correct, result.sampled) == ([1, 0, 2], [8, 16, 2]) and result.num_continuations == 26
    assert result.labels == [True, False, True] and result.scores == [0.125, 0.0, 1.0]
    # round 1: 2 per step (6); round 2: steps 0, 1 (2 + 2); round 3: steps 0, 1 (4 + 4); round 4: step 1 (8)
    assert [len(c) for c in backend.calls] == [6, 4, 8, 8]
    # continuation j is the same request in both modes: adaptive's are those of faithful's with j < sampled
    assert sorted(SEEDS[r.seed] for r in backend.requests) == sorted(
        (i, j) for i, k in enumerate([8, 16, 2]) for j in range(k))


def test_early_stop_faithful_and_adaptive():
    faithful = monte_carlo([task()], pattern_backend(), settings("faithful", early_stop=True))[0]
    # steps run one after the other; step 1 has mc = 0, so step 2 gets score 0 without continuations
    assert (faithful.correct, faithful.sampled, faithful.labels) == ([2, 0, 0], [16, 16, 0], [True, False, False])
    backend = pattern_backend()
    adaptive = monte_carlo([task()], backend, settings("adaptive", early_stop=True))[0]
    assert (adaptive.correct, adaptive.sampled, adaptive.labels) == ([1, 0, 0], [8, 16, 0], [True, False, False])
    assert [len(c) for c in backend.calls] == [2, 2, 4, 2, 2, 4, 8]  # step 0 in 3 rounds, then step 1 in 4


@pytest.mark.parametrize("early_stop", [False, True])
@pytest.mark.parametrize("threshold", [0.0, 0.25])
def test_adaptive_reproduces_faithful_exactly(early_stop, threshold):
    """20 solutions of 1..14 steps, continuation correct with probability 0.6, 0.3, 0.1, 0.02, 0 by step."""
    correct = by_step_probability([0.6, 0.3, 0.1, 0.02, 0.0])
    tasks = [MCTask(f"q{i}#0", "Q", [], None, split_steps(join_steps([f"s{k}" for k in range(1 + i % 14)]), 12),
                    ANSWER) for i in range(20)]
    runs = {}
    for mode in (MCMode.FAITHFUL, MCMode.ADAPTIVE):
        backend = FakeBackend(correct)
        runs[mode] = monte_carlo(tasks, backend, settings(mode, early_stop=early_stop, label_threshold=threshold))
    for t, f, a in zip(tasks, runs[MCMode.FAITHFUL], runs[MCMode.ADAPTIVE]):
        assert a.labels == f.labels, t.id
        assert [hard_label(s, threshold) for s in a.scores] == a.labels  # the written score gives the label
        for i, (k_f, k_a, c_f, c_a) in enumerate(zip(f.sampled, a.sampled, f.correct, a.correct)):
            seeds = [continuation_seed(0, t.id, i, j) for j in range(16)]
            reference = [correct(s, step_prefix(t.steps, i)) for s in seeds]
            assert (c_f, k_f) == ((sum(reference), 16) if k_f else (0, 0))  # faithful: all 16 (or early-stopped)
            assert k_a <= k_f and c_a == sum(reference[:k_a])  # adaptive: honest counts of what it sampled
    total = {mode: sum(r.num_continuations for r in results) for mode, results in runs.items()}
    assert total[MCMode.ADAPTIVE] < total[MCMode.FAITHFUL]
    if threshold == 0.0 and not early_stop:
        labels = [label for r in runs[MCMode.FAITHFUL] for label in r.labels]
        assert 0 < sum(labels) < len(labels)  # both labels occur, so the comparison means something


# -- search --------------------------------------------------------------------------------------------------------

# A wrong solution of five steps "A".."E" (no \boxed{} anywhere, so the whole solution is judged wrong without
# sampling). Correct continuations: step 0 -> j = 3; step 1 -> j = 1; steps 2, 3, 4 -> none (monotone).
SEARCH_ID, SEARCH_STEPS = "w#0", ["A", "B", "C", "D", "E"]
SEARCH_PATTERN = {0: {3}, 1: {1}, 2: set(), 3: set(), 4: set()}
SEARCH_SEEDS = {continuation_seed(0, SEARCH_ID, i, j): (i, j) for i in range(5) for j in range(16)}


def search_backend():
    return FakeBackend(lambda seed, prefix: SEARCH_SEEDS[seed][1] in SEARCH_PATTERN[SEARCH_SEEDS[seed][0]])


def test_search_split_worked_numbers():
    # z^a + z^b = 1: a = b gives z^b = 1/2 (bisection); a = 2, b = 16: z = 0.9045, z^16 = 0.1883 (0.8181 + 0.1883 = 1)
    assert search_split(16, 16) == pytest.approx(0.5, abs=1e-9)
    assert search_split(2, 16) == pytest.approx(0.18835, abs=1e-4)
    # a = 2, b = 4: z^2 = y with y + y^2 = 1, y = (sqrt(5) - 1) / 2 = 0.618, z^4 = y^2 = 0.381966 (golden section)
    assert search_split(2, 4) == pytest.approx((3 - 5 ** 0.5) / 2, abs=1e-9)


def test_search_worked_numbers():
    backend = search_backend()
    [result] = monte_carlo([MCTask(SEARCH_ID, "What?", [], None, list(SEARCH_STEPS), ANSWER)], backend,
                           settings("search", first_round=2))
    # The whole solution is wrong, so step 4 is `-` unsampled and the first `-` step f is one of 0..4 (5 candidates).
    # split 0.188 (first_round 2, 16 continuations): probe lo + max(1, round(0.188 x candidates)) - 1
    #   candidates 0..4: round(0.94) = 1 -> probe step 0: rounds 2 (j 0, 1 wrong), 2 (j 3 correct) -> +, 1 of 4
    #   candidates 1..4: round(0.75) = 1 -> probe step 1: round 2 (j 1 correct) -> +, 1 of 2
    #   candidates 2..4: round(0.56) = 1 -> probe step 2: rounds 2, 2, 4, 8 all wrong -> -, f = 2
    # labels + + - - -, 4 + 2 + 16 = 22 continuations (faithful: 80; adaptive 4 + 2 + 16 x 3 = 54)
    assert result.searched == [0, 1, 2]
    assert (result.correct, result.sampled) == ([1, 1, 0, 0, 0], [4, 2, 16, 0, 0]) and result.num_continuations == 22
    assert result.labels == [True, True, False, False, False]
    assert result.scores == [0.25, 0.5, 0.0, 0.0, 0.0]
    assert [len(c) for c in backend.calls] == [2, 2, 2, 2, 2, 4, 8]
    # the same requests (seeds) as faithful's for the probed steps
    assert sorted(SEARCH_SEEDS[r.seed] for r in backend.requests) == sorted(
        (i, j) for i, k in enumerate([4, 2, 16]) for j in range(k))
    faithful = monte_carlo([MCTask(SEARCH_ID, "What?", [], None, list(SEARCH_STEPS), ANSWER)], search_backend(),
                           settings("faithful"))[0]
    assert faithful.labels == result.labels and faithful.num_continuations == 80


def test_search_correct_solution_is_positive_without_sampling():
    # the last prefix is the whole solution; its \boxed{7} is judged correct as it stands, so under the monotone
    # assumption every step is `+`: no request at all, each step scores its label 1.0 with num_mc_total 0
    backend = FakeBackend(lambda seed, prefix: False)
    steps = ["A", "B", f"\\boxed{{{ANSWER}}}"]
    [result] = monte_carlo([MCTask("c#0", "Q", [], None, steps, ANSWER)], backend, settings("search"))
    assert backend.calls == [] and result.sampled == [0, 0, 0] and result.searched == []
    assert result.labels == [True, True, True] and result.scores == [1.0, 1.0, 1.0]
    # a one-step wrong solution: f = 0 is known, nothing is sampled either
    [one] = monte_carlo([MCTask("o#0", "Q", [], None, ["\\boxed{8}"], ANSWER)], backend, settings("search"))
    assert backend.calls == [] and one.labels == [False] and one.scores == [0.0]


def test_search_equals_faithful_on_monotone_solutions():
    """40 wrong solutions of 1..14 steps (the last holds a wrong \\boxed{8}, so a continuation after it is wrong),
    continuations correct with probability 0.9, 0.6, 0.3, 0.1, 0.02, 0 by step. Where faithful's labels are
    monotone (+ ... + - ... -), search gives them exactly, from the same seeds; it samples far fewer."""
    base = by_step_probability([0.9, 0.6, 0.3, 0.1, 0.02, 0.0])

    def correct(seed, prefix):
        return "boxed" not in prefix and base(seed, prefix)

    tasks = [MCTask(f"m{i}#0", "Q", [], None, [f"s{k}" for k in range(i % 14)] + ["\\boxed{8}"], ANSWER)
             for i in range(40)]
    faithful = monte_carlo(tasks, FakeBackend(correct), settings("faithful"))
    adaptive = monte_carlo(tasks, FakeBackend(correct), settings("adaptive"))
    search = monte_carlo(tasks, FakeBackend(correct), settings("search"))
    monotone = 0
    for t, f, s in zip(tasks, faithful, search):
        if True not in f.labels[f.labels.index(False):]:
            monotone += 1
            assert s.labels == f.labels, t.id
        for i in s.searched:  # a probed step's counts are adaptive's honest counts of the same seeds
            reference = [correct(continuation_seed(0, t.id, i, j), t.prefix(i)) for j in range(16)]
            assert s.correct[i] == sum(reference[:s.sampled[i]])
    assert monotone >= 38  # a non-monotone estimate needs all 16 wrong at p = 0.3 (0.7^16 = 0.3%) or similar
    total = {name: sum(r.num_continuations for r in runs)
             for name, runs in (("faithful", faithful), ("adaptive", adaptive), ("search", search))}
    assert total["search"] * 3 <= total["adaptive"] < total["faithful"]


def test_backend_failure_fails_that_solution_only():
    class Flaky(FakeBackend):
        def generate(self, requests):
            return [GenerationResult.failure(r.id, "out of memory") if r.id.startswith("bad") else res
                    for r, res in zip(requests, super().generate(requests))]

    results = monte_carlo([MCTask("bad#0", "Q", [], None, ["A"], ANSWER), task()], Flaky(lambda s, p: True),
                          settings("faithful"))
    assert results[0] == "backend: out of memory" and results[1].labels == [True, True, True]


# -- the job ---------------------------------------------------------------------------------------------------------


def write_input(root: Path, rows: list[dict]) -> Path:
    (root / "img").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (28, 28), (200, 30, 30)).save(root / "img" / "a.png")
    path = root / "solutions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def rollout_rows(n_questions=3):
    """Rollout-format rows: 3 responses each (the job takes 2); question q1's first response has 13 steps."""
    rows = []
    for q in range(n_questions):
        responses = [{"text": join_steps([f"q{q} r{r} step {k}" for k in range(2 + r)] + [f"\\boxed{{{ANSWER}}}"]),
                      "correct": r == 0} for r in range(3)]
        rows.append({"id": f"q{q}", "image": "img/a.png", "question": QUESTION, "answer": ANSWER,
                     "prompt_template": "plain", "responses": responses})
    rows[1]["responses"][0]["text"] = join_steps([f"line {k}" for k in range(13)])
    return rows


def job_args(solutions, out, **kw):
    args = LabelStepsArguments(solutions=str(solutions), solutions_per_question=2, **kw)
    return args, BackendArguments(), SamplingArguments(seed=0), JobArguments(output_dir=str(out), batch_size=2,
                                                                              progress=False)


def test_records_carry_the_sampling_a_server_applied(tmp_path):
    """A server backend's results say which sampling fields it was sent (after adapting to the server); each MC
    record keeps its first continuation's, as rollout records keep theirs."""
    applied = {"temperature": 1.0, "top_p": 1.0, "max_tokens": 96, "dropped": ["top_k"]}

    class Server(FakeBackend):
        def generate(self, requests):
            results = super().generate(requests)
            for r in results:
                r.applied = dict(applied)
            return results

    path = write_input(tmp_path, rollout_rows())
    run(*job_args(path, tmp_path / "server", mode="adaptive"), backend=Server(by_step_probability([0.7, 0.4])))
    assert [r.meta["sampling_applied"] for r in read_jsonl(tmp_path / "server" / "mc.jsonl", "mc")] == [applied] * 6
    run(*job_args(path, tmp_path / "local", mode="adaptive"), backend=FakeBackend(by_step_probability([0.7, 0.4])))
    assert all("sampling_applied" not in r.meta for r in read_jsonl(tmp_path / "local" / "mc.jsonl", "mc"))


def test_job_outputs_parse_back_and_match(tmp_path):
    path = write_input(tmp_path, rollout_rows())
    backend = FakeBackend(by_step_probability([0.7, 0.4, 0.1, 0.0]))
    out = tmp_path / "out"
    summary, labels = run(*job_args(path, out, mode="adaptive"), backend=backend)
    assert summary.succeeded == 6 and summary.failed == 0
    mc = read_jsonl(out / "mc.jsonl", "mc")
    assert [r.id for r in mc] == ["q0#0", "q0#1", "q1#0", "q1#1", "q2#0", "q2#1"]  # 2 of 3 responses, in order
    assert all(r.meta["mc_mode"] == "adaptive" for r in mc)
    assert labels.continuations_sampled == sum(s.num_mc_total for r in mc for s in r.steps) == len(backend.requests)
    assert labels.generated_tokens == 3 * len(backend.requests) == summary.generated_tokens
    raw = [json.loads(line) for line in (out / "visualprm.jsonl").read_text().splitlines()]
    conversations = read_jsonl(out / "visualprm.jsonl", "conversation")
    for r, c, obj in zip(mc, conversations, raw):
        question, steps, hard = from_visualprm_conversation(obj["conversations"])
        assert (question, steps, c.id) == (QUESTION, [s.step for s in r.steps], r.id)
        assert hard == c.labels == [s.score > 0 for s in r.steps]
        assert (out / r.images[0]).resolve() == (tmp_path / "img" / "a.png").resolve()  # mc: from output_dir
        assert obj["image"] == "a.png"  # visualprm.jsonl: from meta.json's root, the images' folder
    meta = json.loads((out / "meta.json").read_text())
    assert meta == {"out": {"annotation": "visualprm.jsonl", "root": "../img", "repeat_time": 1}}
    from reward.prm_job import read_sources

    (source,) = read_sources(out / "meta.json")
    assert source.annotation == out.resolve() / "visualprm.jsonl" and source.image_root.resolve() == tmp_path / "img"
    assert all(r.meta["num_continuations_sampled"] == sum(s.num_mc_total for s in r.steps) for r in mc)
    # q1#0 had 13 steps: max_steps 12 merges k = ceil(13 / 12) = 2 per step, 7 steps
    merged = next(r for r in mc if r.id == "q1#0")
    assert [s.step for s in merged.steps] == split_steps(rollout_rows()[1]["responses"][0]["text"], 12)
    assert len(merged.steps) == 7 and merged.steps[0].step == "line 0\n\nline 1" and merged.steps[6].step == "line 12"
    assert {r.assistant_prefix for r in backend.requests if r.id.startswith("q1#0/step0/")} == {"line 0\n\nline 1"}
    assert all(r.meta["mc_prefix"] == "internvl" for r in mc)
    assert all(r.prompt == build_prompt(QUESTION, "plain") and len(r.images) == 1 for r in backend.requests)
    # the template the policy saw travels with both outputs: PRM rows wrap the question with it (InternVL's rows)
    assert all(r.meta["prompt_template"] == "plain" for r in mc)
    assert all(obj["prompt_template"] == "plain" for obj in raw)
    from reward.prompts import prm_question

    assert prm_question(QUESTION, conversations[0].meta, "auto", 1) == build_prompt(QUESTION, "plain")
    assert prm_question("What is 2 + 3?", {"prompt_template": "boxed"}, "auto", 0) == build_prompt(
        "What is 2 + 3?", "boxed") != "What is 2 + 3?"
    saved = json.loads((out / "label_summary.json").read_text())
    assert saved["steps"] == sum(len(r.steps) for r in mc) and saved["faithful_continuations"] == 16 * saved["steps"]


@pytest.mark.parametrize("mc_prefix", ["internvl", "blank_line"])
def test_step_split_labels_each_cut_from_the_policys_own_text(tmp_path, mc_prefix):
    text = "The tiles show 3, 4.\n\n3 + 4 = 7.\n\nAnswer: \\boxed{7}"
    rows = [{"id": "q0", "image": "img/a.png", "question": QUESTION, "answer": ANSWER, "prompt_template": "plain",
             "responses": [{"text": text, "correct": True}]}]
    path = write_input(tmp_path, rows)
    # a continuation is correct iff its prefix does not end inside the first line: the cut step is `-`, the rest `+`
    backend = FakeBackend(lambda seed, prefix: not prefix.endswith(","))
    run(*job_args(path, tmp_path / "out", step_split="(?<=,)(?= )", mc_prefix=mc_prefix), backend=backend)
    [record] = read_jsonl(tmp_path / "out" / "mc.jsonl", "mc")
    assert [s.step for s in record.steps] == ["The tiles show 3,", "4.", "3 + 4 = 7.", "Answer: \\boxed{7}"]
    assert [s.score for s in record.steps] == [0.0, 1.0, 1.0, 1.0]
    assert record.meta["step_settings"] == {"step_split": "(?<=,)(?= )", "max_steps_per_solution": 12}
    prefixes = {int(r.id.split("/step")[1].split("/")[0]): r.assistant_prefix for r in backend.requests}
    # a cut step continues from the cut in both styles; a step that ends a blank-line piece continues right after
    # its text (internvl) or after one more blank line (blank_line, what the demo's recipes had before)
    end = "\n\n" if mc_prefix == "blank_line" else ""
    assert prefixes == {0: "The tiles show 3,", 1: "The tiles show 3, 4." + end,
                        2: "The tiles show 3, 4.\n\n3 + 4 = 7." + end, 3: text + end}
    assert record.meta["mc_prefix"] == mc_prefix
    with pytest.raises(JobInputError, match="other settings.*step_split"):  # not resumed with another split
        run(*job_args(path, tmp_path / "out", mc_prefix=mc_prefix), backend=FakeBackend(lambda seed, prefix: True))
    with pytest.raises(UserError, match="step_split: not a regular expression"):
        job_args(path, tmp_path / "bad", step_split="(")
    with pytest.raises(UserError, match="mc_prefix must be one of internvl, blank_line"):
        job_args(path, tmp_path / "bad", mc_prefix="newline")


def test_resume_skips_finished_solutions(tmp_path):
    path = write_input(tmp_path, rollout_rows())
    correct = by_step_probability([0.5, 0.2, 0.0])
    # faithful, no early stop: one generate call per batch; batch_size 2 -> the third call (q2) dies
    dying = FakeBackend(correct, fail_on_call=3)
    with pytest.raises(FatalJobError):
        run(*job_args(path, tmp_path / "out"), backend=dying)
    done = read_jsonl(tmp_path / "out" / "mc.jsonl", "mc")
    assert [r.id for r in done] == ["q0#0", "q0#1", "q1#0", "q1#1"]
    again = FakeBackend(correct)
    summary, _ = run(*job_args(path, tmp_path / "out"), backend=again)
    assert summary.skipped_done == 4 and {r.id.split("/")[0] for r in again.requests} == {"q2#0", "q2#1"}
    whole = FakeBackend(correct)
    run(*job_args(path, tmp_path / "fresh"), backend=whole)
    assert (tmp_path / "out" / "mc.jsonl").read_text() == (tmp_path / "fresh" / "mc.jsonl").read_text()
    with pytest.raises(JobInputError, match="other settings.*mode"):  # a folder is not resumed with other settings
        run(*job_args(path, tmp_path / "out", mode="adaptive"), backend=FakeBackend(correct))


def test_plain_solution_input_and_bad_input(tmp_path):
    rows = [{"id": 1, "question": "What is 3 + 4?", "answer": 7, "solution": "3 + 4 = 7.\n\n\\boxed{7}"}]
    [item] = read_solutions(write_input(tmp_path, rows))
    assert (item.id, item.text, item.prompt_template) == ("1#0", rows[0]["solution"], "boxed")
    assert item.question.answer == "7"
    bad = [({"id": 1, "question": "Q", "solution": "x"}, r"solutions.jsonl:1: answer: missing"),
           ({"id": 1, "question": "Q", "answer": "7"}, "either 'responses'"),
           ({"id": 1, "question": "Q", "answer": "7", "responses": [{"txt": "a"}]}, r"responses\[0\]"),
           ({"id": 1, "question": "Q", "answer": "7", "solution": "x", "prompt_template": "{nope}"},
            "prompt_template")]
    for row, message in bad:
        with pytest.raises(JobInputError, match=message):
            read_solutions(write_input(tmp_path, [row]))


def test_cli_one_line_error_and_tiny_recipe_parses(tmp_path, capsys):
    from rlhf.args import parse_job_args
    from rlhf.cli import main

    path = write_input(tmp_path, [{"id": "a", "question": "Q", "solution": "x"}])
    assert main(["label-steps", "--solutions", str(path), "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("mmalign label-steps:") and "answer: missing" in err
    root = Path(__file__).resolve().parents[1]
    args, backend, sampling, job = parse_job_args(
        (LabelStepsArguments, BackendArguments, SamplingArguments, JobArguments),
        ["--config", str(root / "recipes/data/tiny_label_steps.yaml"), "--output_dir", str(tmp_path / "t")],
        "mmalign label-steps")
    assert (args.mode, backend.model, job.output_dir) == ("adaptive", "tiny-internvl", str(tmp_path / "t"))
    items = read_solutions(root / args.solutions, image_root=root / args.image_root, per_question=2)
    assert len(items) == 16 and all(item.question.answer for item in items)


def test_hf_backend_adaptive_equals_faithful(tiny_internvl, tiny_processor):
    """The real in-process backend (tiny InternVL, random weights): same labels, and adaptive's continuations
    are a subset of faithful's."""
    from data_gen.backends.hf import HFBackend

    backend = HFBackend(model=tiny_internvl, processor=tiny_processor, batch_size=16, max_patches=1)
    image = Image.new("RGB", (28, 28), (30, 200, 30))
    t = MCTask("h#0", build_prompt(QUESTION, "plain"), [image], None, ["3 + 4 = 7.", f"Answer: \\boxed{{{ANSWER}}}"],
               ANSWER)
    sampling = SamplingArguments(temperature=1.0, top_k=None, max_new_tokens=4, seed=0)
    results = {mode: monte_carlo([t], backend, MCSettings(num_continuations=4, mode=mode, sampling=sampling))[0]
               for mode in MCMode}
    f, a = results[MCMode.FAITHFUL], results[MCMode.ADAPTIVE]
    assert a.labels == f.labels and all(k_a <= k_f for k_a, k_f in zip(a.sampled, f.sampled))
    assert f.labels[1] and a.sampled[1] == 2  # the last prefix already holds the answer: + from the first round


def test_search_job_records_and_summary(tmp_path):
    # rollout_rows: r0 of each question ends with \boxed{7} (correct: all `+`, nothing sampled); q1's r0 is 13 plain
    # lines (no answer: wrong) and r1 responses also end with \boxed{7}
    path = write_input(tmp_path, rollout_rows())
    backend = FakeBackend(by_step_probability([0.7, 0.4, 0.1, 0.0]))
    summary, labels = run(*job_args(path, tmp_path / "out", mode="search"), backend=backend)
    assert summary.succeeded == 6
    mc = read_jsonl(tmp_path / "out" / "mc.jsonl", "mc")
    assert all(r.meta["mc_mode"] == "search" and "searched_steps" in r.meta for r in mc)
    for r in mc:
        # a probed step has its real counts; an unprobed `+` step is 1 of 1 (its witness), an unprobed `-` one 0 of 0
        unprobed = [s for i, s in enumerate(r.steps) if i not in r.meta["searched_steps"]]
        assert all((s.num_mc_correct, s.num_mc_total) in ((1, 1), (0, 0)) for s in unprobed)
        assert r.meta["num_continuations_sampled"] == sum(r.steps[i].num_mc_total for i in r.meta["searched_steps"])
        hard = [s.score > 0 for s in r.steps]
        assert hard == sorted(hard, reverse=True)  # + ... + - ... -
    wrong = next(r for r in mc if r.id == "q1#0")  # 7 merged steps, first `-` among steps 0..6
    assert wrong.meta["searched_steps"] and not wrong.steps[-1].score
    assert all(not r.meta["searched_steps"] and all(s.score == 1.0 for s in r.steps) for r in mc if r.id != "q1#0")
    # faithful would sample all 16 continuations of every step
    saved = json.loads((tmp_path / "out" / "label_summary.json").read_text())
    assert saved["faithful_continuations"] == 16 * saved["steps"]
    assert saved["continuations_sampled"] == len(backend.requests) < saved["faithful_continuations"]
    assert "fewer than faithful's" in labels.line()
