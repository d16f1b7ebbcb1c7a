"""Answer extraction and judging (reward/verify.py): known answers, worked ANLS arithmetic, bounds."""

from __future__ import annotations

import builtins
import logging
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from reward import verify as V
from reward.verify import (
    MATCHERS,
    AnswerMode,
    mode_for_source,
    NO_ANSWER,
    NO_MATCH,
    Verdict,
    anls,
    answer_score,
    extract_answer,
    fix_answer,
    is_correct,
    judge,
    levenshtein,
)

# --------------------------------------------------------------------------------------------------
# extract_answer


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so x = 2. Answer: \boxed{2}", "2"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),  # nested braces
        (r"\boxed{\frac{\sqrt{3}}{2}} done", r"\frac{\sqrt{3}}{2}"),  # two levels
        (r"first \boxed{1}, then \boxed{2}", "2"),  # the last box wins
        (r"\boxed{A} ... \fbox{C}", "C"),  # \fbox counts as a box
        (r"\boxed { 7 }", "7"),  # space before the brace, content stripped
        (r"\boxed{\boxed{3}}", "3"),  # a box holding only a box is unwrapped
        (r"\boxed{\{1,2\}}", r"\{1,2\}"),  # escaped braces do not count
        (r"\boxed{a \\ b}", r"a \\ b"),  # a LaTeX line break is not an escape
        (r"\boxed{x^{2}} then Final answer: 5", "x^{2}"),  # a box beats "Final answer:"
        ("Reasoning...\nFinal answer: 42.\nThanks", "42"),  # first line only, trailing period dropped
        ("answer: 1\nANSWER: (B)", "(B)"),  # the last one, any case
        ("Final Answer: **B**.", "B"),  # markdown bold stripped
        ("The answer is: x", None),  # "answer is:" is not "answer:"
        ("no marker at all", None),
        (r"\boxed{}", None),  # empty box
        (r"\boxed{   }", None),
        (r"\boxed{1} and then \boxed{2", None),  # the last box never closes: truncated, no fallback
        (r"Answer: \boxed{\frac{1}{2}", None),  # unbalanced box beats the "Answer:" fallback
        ("Answer:\n42\nbecause", "42"),  # the first non-blank line after the marker
        ("Answer:\n\n", None),
        ("Answer: ...", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_answer_rejects_non_text():
    with pytest.raises(TypeError, match="expects a str"):
        extract_answer(None)


@pytest.mark.parametrize(
    "text, answer, expected",
    [
        ("x = 24.0\n\nAnswer: \\boxed{24.0}", "24", "x = 24.0\n\nAnswer: \\boxed{24}"),
        # the last box's whole balanced content, nested braces and all; earlier boxes stay
        ("\\boxed{1} then \\boxed{\\frac{1}{2}} done", "0.5", "\\boxed{1} then \\boxed{0.5} done"),
        # escaped braces do not close the box (the scanner of extract_answer)
        ("\\boxed{\\{1, 2\\}}", "{3}", "\\boxed{{3}}"),
        ("\\fbox{ 5 }.", "6", "\\fbox{6}."),
        # a last box that never closes is passed over: the balanced one before it is rewritten
        ("\\boxed{7} and then \\boxed{8", "9", "\\boxed{9} and then \\boxed{8"),
        # no box: the rest of the line after the last "Answer:", any case
        ("Final answer: 24.0\nThanks", "24", "Final answer: 24\nThanks"),
        ("Answer: 5\nanswer : 6 cm\nok", "7", "Answer: 5\nanswer : 7\nok"),
        ("no answer here", "24", "no answer here"),
    ],
)
def test_fix_answer(text, answer, expected):
    assert fix_answer(text, answer) == expected


# --------------------------------------------------------------------------------------------------
# judge: one case per matcher behaviour. (answer, ground truth, expected score, expected matcher)


@pytest.mark.parametrize(
    "answer, gt, score, matcher",
    [
        # exact: case-insensitive, whitespace runs collapsed
        ("New  York", "new york", 1.0, "exact"),
        ("Paris", "Paris", 1.0, "exact"),
        # fractions, decimals, LaTeX forms: 1/2 = 0.5 exactly, so the tight numeric matcher decides
        (r"\frac{1}{2}", "0.5", 1.0, "relative_numeric"),
        (r"\dfrac{1}{2}", "0.5", 1.0, "relative_numeric"),
        ("1/2", r"\frac{1}{2}", 1.0, "relative_numeric"),
        ("1,000", "1000", 1.0, "relative_numeric"),
        ("$12", "12", 1.0, "relative_numeric"),
        ("5 cm", "5", 1.0, "relative_numeric"),  # a unit on one side only
        ("5 cm", "5 m", 0.0, NO_MATCH),  # two different units
        (r"30^\circ", "30", 1.0, "relative_numeric"),
        ("30 degrees", r"30^{\circ}", 1.0, "relative_numeric"),
        ("2e-3", "0.002", 1.0, "relative_numeric"),
        ("-3", "3", 0.0, NO_MATCH),  # the sign matters (VQA stays out of pure numbers)
        ("2x", "2", 0.0, NO_MATCH),  # "x" is algebra, not a unit
        # percentages (decision: "50%" equals both 50 and 0.5)
        (r"50\%", "0.5", 1.0, "relative_numeric"),
        ("50%", "50", 1.0, "relative_numeric"),
        ("50 percent", r"\frac{1}{2}", 1.0, "relative_numeric"),
        ("50%", "0.6", 0.0, NO_MATCH),
        ("50%", "5%", 0.0, NO_MATCH),  # two percentages compare as they are
        # relative numeric 1e-3: |1000.4 - 1000| = 0.4 <= 1.0
        ("1000.4", "1000", 1.0, "relative_numeric"),
        # relaxed numeric 5%: |4.9 - 5| / 5 = 0.02 <= 0.05; 4.75 is exactly at 0.05; 4.7 is 0.06
        ("4.9", "5", 1.0, "relaxed_numeric"),
        ("4.75", "5", 1.0, "relaxed_numeric"),
        ("4.7", "5", 0.0, NO_MATCH),
        ("5.25", "5", 1.0, "relaxed_numeric"),
        ("-4.9", "-5", 1.0, "relaxed_numeric"),
        ("0.01", "0", 0.0, NO_MATCH),  # gt 0 needs pred 0
        ("0.0", "0", 1.0, "relative_numeric"),
        # symbolic (math-verify): forms no numeric parser reads
        (r"\frac{\sqrt{2}}{2}", r"\frac{1}{\sqrt{2}}", 1.0, "symbolic"),
        (r"\pi/2", r"\frac{\pi}{2}", 1.0, "symbolic"),
        ("2x+1", "1+2x", 1.0, "symbolic"),
        ("x^2-1", "(x-1)(x+1)", 1.0, "symbolic"),
        ("[1, 2)", "[1,2)", 1.0, "symbolic"),  # interval
        ("(1,2]", "(1, 2]", 1.0, "symbolic"),
        ("[1,2]", "(1,2)", 0.0, NO_MATCH),  # closed vs open
        (r"\{2,1\}", r"\{1,2\}", 1.0, "symbolic"),  # sets are unordered
        ("x=3", "3", 1.0, "symbolic"),
        ("x+1", "x+2", 0.0, NO_MATCH),
        ("$x^2+1$", "1+x^2", 1.0, "symbolic"),  # math delimiters stripped
        ("cat", "act", 0.0, NO_MATCH),  # words are not products of symbols
        # VQA-normalised
        ("two", "2", 1.0, "vqa"),
        ("Two.", "2", 1.0, "vqa"),
        ("the cat", "cat", 1.0, "vqa"),
        ("A dog.", "dog", 1.0, "vqa"),
        ("Yes.", "yes", 1.0, "vqa"),
        ("twenty-one", "21", 1.0, "vqa"),
        ("two apples", "2 apples", 1.0, "vqa"),
        ("three", "2", 0.0, NO_MATCH),
        # ANLS on text: kitten -> sitting is 3 edits over 7 characters, 1 - 3/7 = 0.5714...
        ("kitten", "sitting", 1 - 3 / 7, "anls"),
        ("helo world", "hello world", 1 - 1 / 11, "anls"),  # 0.909 > 0.9: correct
        ("color", "colour", 1 - 1 / 6, "anls"),  # 0.833: graded, not correct
        ("flaw", "lawn", 0.0, NO_MATCH),  # 2 edits / 4 = 0.5: at tau, scores 0
        ("abc", "xyz", 0.0, NO_MATCH),
        ("Route 66", "Route 67", 0.0, NO_MATCH),  # a different number is not a typo
        ("Route 66.", "Route 66", 1.0, "vqa"),
    ],
)
def test_judge_matchers(answer, gt, score, matcher):
    # the catalogue of matchers: mode "all" tries every one (the per-data-set modes are tested below)
    verdict = judge(answer, gt, extracted=True, mode="all")
    assert verdict.score == pytest.approx(score, abs=1e-12)
    assert verdict.matcher == matcher
    assert verdict.answer == answer
    assert verdict.correct == (score > 0.9)


# --------------------------------------------------------------------------------------------------
# Multiple choice


@pytest.mark.parametrize(
    "answer",
    ["B", "(B)", "B.", "B)", "B:", "b", "option B", "Option (B)", "choice B", "The answer is B",
     "The correct answer is (B).", "the answer is: B", "(B) 42", "B. 42", "B) forty-two",
     "**B**", "$B$", r"\text{B}", "Option B: 42"],
)  # fmt: skip
def test_multiple_choice_spellings_match(answer):
    assert answer_score(answer, "B", extracted=True) == 1.0
    assert answer_score(answer, "(B)", extracted=True) == 1.0


@pytest.mark.parametrize("answer", ["C", "(C) 42", "A and B", "Bob", "option C", "BC"])
def test_multiple_choice_other_answers_do_not_match(answer):
    verdict = judge(answer, "B", extracted=True)
    assert verdict.score == 0.0 and not verdict.correct


OPTIONS = {"A": "41", "B": "42", "C": "blue whale", "D": r"\frac{1}{2}"}


@pytest.mark.parametrize(
    "answer, gt, score",
    [
        ("42", "B", 1.0),  # the option's text for a letter ground truth
        ("Blue whale.", "C", 1.0),  # option text, normalised
        ("The answer is blue whale", "C", 1.0),
        ("0.5", "D", 1.0),  # numerically the option's text
        ("B", "42", 1.0),  # a letter for a text ground truth
        ("(C)", "blue whale", 1.0),
        ("41", "B", 0.0),  # the text of another option
        ("A", "42", 0.0),
        ("blue whale", "B", 0.0),
    ],
)
def test_multiple_choice_with_option_texts(answer, gt, score):
    verdict = judge(answer, gt, extracted=True, options=OPTIONS)
    assert verdict.score == score
    if score:
        assert verdict.matcher in ("multiple_choice", "exact")


def test_option_keys_in_usual_spellings():
    assert answer_score("42", "B", extracted=True, options={"(A)": "41", "B.": "42"}) == 1.0


def test_option_errors():
    with pytest.raises(ValueError, match="not an option letter"):
        judge("A", "A", options={"AB": "x"})
    with pytest.raises(ValueError, match="not among the options A, B"):
        judge("E", "E", options={"A": "1", "B": "2"})


# --------------------------------------------------------------------------------------------------
# ANLS and edit distance


@pytest.mark.parametrize(
    "a, b, distance",
    [("kitten", "sitting", 3), ("flaw", "lawn", 2), ("intention", "execution", 5), ("", "abc", 3), ("abc", "abc", 0)],
)
def test_levenshtein(a, b, distance):
    assert levenshtein(a, b) == distance
    assert levenshtein(b, a) == distance


def test_anls_returns_the_similarity_not_the_distance():
    # The public InternVL code returns the normalised distance 3/7 = 0.4286 here; ANLS is 1 - 3/7.
    assert anls("kitten", "sitting") == pytest.approx(4 / 7)
    assert anls("Kitten ", "  SITTING") == pytest.approx(4 / 7)  # case and outer whitespace ignored
    assert anls("same", "same") == 1.0
    assert anls("ab", "ac") == 0.0  # normalised distance 1/2 = tau: 0
    assert anls("abc", "abd") == pytest.approx(2 / 3)  # 1/3 < tau
    assert anls("a", "abcd") == 0.0  # length difference alone is 3/4 >= tau


def test_threshold_is_strict():
    # 1 edit in 10 characters: ANLS = 1 - 1/10 = 0.9, and correct needs score > 0.9.
    assert answer_score("abcdefghik", "abcdefghij", extracted=True, mode="anls") == pytest.approx(0.9)
    assert not is_correct(r"\boxed{abcdefghik}", "abcdefghij", mode="anls")
    assert is_correct(r"\boxed{abcdefghik}", "abcdefghij", threshold=0.85, mode="anls")
    assert is_correct(r"\boxed{kitten}", "sitting", threshold=0.5, mode="anls")  # 0.571 > 0.5


# --------------------------------------------------------------------------------------------------
# is_correct / answer_score / judge on whole responses


@pytest.mark.parametrize(
    "response, gt, correct",
    [
        (r"1/4 + 1/4 = 1/2. Answer: \boxed{\frac{1}{2}}", "0.5", True),
        (r"Answer: \boxed{0.4}", "0.5", False),
        ("Step 1 ...\nFinal answer: 0.50", r"\frac{1}{2}", True),
        ("The answer is B", "B", False),  # no box and no "Answer:": nothing extracted
        (r"... \boxed{C}", "B", False),
        (r"... \boxed{(B) 42}", "B", True),
        ("I am not sure.", "5", False),
        (r"\boxed{5", "5", False),  # truncated box
        (r"\boxed{4} wait, no: \boxed{5}", "5", True),
    ],
)
def test_is_correct(response, gt, correct):
    assert is_correct(response, gt) is correct


def test_answer_score_extracts_unless_told_otherwise():
    assert answer_score(r"so \boxed{2}", "2") == 1.0
    assert answer_score("2", "2") == 0.0  # no box, no "Answer:"
    assert answer_score("2", "2", extracted=True) == 1.0
    assert answer_score("  2 ", "2", extracted=True) == 1.0


def test_verdict_for_records():
    v = judge(r"Answer: \boxed{\frac{1}{2}}", "0.5")
    assert v == Verdict(answer=r"\frac{1}{2}", score=1.0, correct=True, matcher="relative_numeric")
    v = judge("no final answer", "0.5")
    assert v == Verdict(answer=None, score=0.0, correct=False, matcher=NO_ANSWER)
    v = judge("", "0.5", extracted=True)
    assert v.matcher == NO_ANSWER
    v = judge(r"\boxed{7}", "0.5")
    assert v == Verdict(answer="7", score=0.0, correct=False, matcher=NO_MATCH)


def test_matcher_names_live_in_one_dict():
    assert list(MATCHERS) == [
        "exact", "multiple_choice", "vqa", "relative_numeric", "relaxed_numeric", "symbolic", "anls",
    ]  # fmt: skip
    assert NO_ANSWER not in MATCHERS and NO_MATCH not in MATCHERS


def test_boxed_ground_truth_is_unboxed():
    assert judge("5", r"\boxed{5}", extracted=True).matcher == "exact"
    assert judge("$5$.", "5", extracted=True).matcher == "relative_numeric"  # delimiters, then a period


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"response": "x", "ground_truth": "  "}, ValueError, "empty"),
        ({"response": "x", "ground_truth": "1", "threshold": 1.0}, ValueError, r"\[0, 1\)"),
        ({"response": "x", "ground_truth": "1", "threshold": -0.1}, ValueError, r"\[0, 1\)"),
        ({"response": "x", "ground_truth": 5}, TypeError, "ground_truth: expected a str, got int"),
        ({"response": None, "ground_truth": "5"}, TypeError, "response: expected a str"),
    ],
)
def test_bad_input_is_an_error(kwargs, error, message):
    with pytest.raises(error, match=message):
        judge(**kwargs)


# --------------------------------------------------------------------------------------------------
# Bounded time, threads, never evaluating model text


def test_pathological_huge_strings_return_fast():
    start = time.perf_counter()
    assert extract_answer(r"\boxed{" + "{" * 300_000) is None  # unbalanced, scanned once
    assert extract_answer("answer: " * 100_000) is None
    assert extract_answer("x" * 1_000_000 + r"\boxed{1}") == "1"
    huge = "1" * 1_000_000
    assert judge(huge, "1", extracted=True).score == 0.0  # only the exact matcher for huge strings
    assert judge(huge, huge, extracted=True).matcher == "exact"
    assert judge("(" * 200 + "1" + ")" * 200, "1", extracted=True).score == 0.0  # too long for symbolic
    assert judge("x" * 900, "x" * 899 + "y", extracted=True, mode="all").score == pytest.approx(1 - 1 / 900)
    assert time.perf_counter() - start < 5.0


@pytest.mark.parametrize(
    "expr",
    [r"9^{9^{9^{9}}}", r"10^{10^{10}}", r"9^{99999999}", r"(10^{6})!", r"1000000!!", r"\binom{10^9}{10^5}",
     r"\sum_{i=1}^{10^{9}} i", r"(999^{999})^{999}", r"(x+1)^{999}", "(" * 20 + "1" + ")" * 20],
)  # fmt: skip
def test_explosive_expressions_are_refused_before_parsing(expr):
    assert V._symbolic_refusal(expr) is not None
    start = time.perf_counter()
    assert judge(expr, "1", extracted=True).score == 0.0
    assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize("expr", [r"9^{999}", r"x^{99}", "5!", r"(x+1)^{2}", r"\frac{\sqrt{2}}{2}", r"\sin^2 x"])
def test_ordinary_expressions_are_not_refused(expr):
    assert V._symbolic_refusal(expr) is None


def test_factorial_within_the_screen_is_verified():
    assert judge("5!", "120", extracted=True).matcher == "symbolic"


SLOW = "(a+b)(c+d)(e+f)(g+h)(i+j)(k+l)(m+n)(o+p)(q+r)(s+t)(u+v)(w+x)(y+z)"  # 2^13 terms when expanded


def test_symbolic_deadline_main_thread_and_worker(monkeypatch, caplog):
    monkeypatch.setattr(V, "SYMBOLIC_TIME_LIMIT_S", 0.3)
    assert V._symbolic_refusal(SLOW) is None  # passes the screen; only the deadline stops it
    with caplog.at_level(logging.WARNING, logger="reward.verify"):
        start = time.perf_counter()
        assert judge(SLOW, "1", extracted=True).score == 0.0
        assert time.perf_counter() - start < 2.0
        with ThreadPoolExecutor(1) as pool:
            start = time.perf_counter()
            assert pool.submit(judge, SLOW, "2", extracted=True).result().score == 0.0
            assert time.perf_counter() - start < 2.0
    assert sum("passed its 0.3 s limit" in r.getMessage() for r in caplog.records) == 2


def test_deadline_restores_the_previous_tracer():
    seen = []

    def tracer(frame, event, arg):
        seen.append(event)

    sys.settrace(tracer)
    try:
        judge("2x+1", "1+2x", extracted=True)
        after = sys.gettrace()
    finally:
        sys.settrace(None)
    assert after is tracer
    assert "call" in seen  # the caller's tracer kept running during the symbolic check


SYMBOLIC_CASES = [
    (r"\frac{\sqrt{2}}{2}", r"\frac{1}{\sqrt{2}}", 1.0),
    ("2x+1", "1+2x", 1.0),
    ("[1, 2)", "[1,2)", 1.0),
    ("x^2-1", "(x-1)(x+1)", 1.0),
    ("x+1", "x+2", 0.0),
    (r"\{2,1\}", r"\{1,2\}", 1.0),
]


def test_symbolic_works_from_worker_threads():
    # math-verify's default SIGALRM timeout raises "signal only works in main thread" in a worker.
    def score(case):
        assert threading.current_thread() is not threading.main_thread()
        return answer_score(case[0], case[1], extracted=True)

    with ThreadPoolExecutor(4) as pool:
        scores = list(pool.map(score, SYMBOLIC_CASES * 2))
    assert scores == [c[2] for c in SYMBOLIC_CASES] * 2


MALICIOUS = [
    "__import__('os').system('touch PWNED')",
    "__import__('pathlib').Path('PWNED').touch()",
    "eval(\"__import__('os').system('x')\")",
    r"\boxed{__import__('os').system('x')}",
    "().__class__.__bases__[0].__subclasses__()",
    "1+__import__('os').getpid()",
]


@pytest.mark.parametrize("text", MALICIOUS)
def test_model_text_is_never_executed(text, monkeypatch, tmp_path):
    import math_verify.parser
    import os
    import subprocess

    monkeypatch.chdir(tmp_path)

    def forbidden(*args, **kwargs):
        raise AssertionError("model text reached a code path that executes it")

    monkeypatch.setattr(os, "system", forbidden)
    monkeypatch.setattr(subprocess, "Popen", forbidden)
    monkeypatch.setattr(math_verify.parser, "parse_expr", forbidden)  # sympy's parse_expr calls eval
    code_strings = []
    real_eval, real_exec = builtins.eval, builtins.exec

    def spy_eval(source, *args, **kwargs):
        code_strings.append(source)
        return real_eval(source, *args, **kwargs)

    def spy_exec(source, *args, **kwargs):
        code_strings.append(source)
        return real_exec(source, *args, **kwargs)

    monkeypatch.setattr(builtins, "eval", spy_eval)
    monkeypatch.setattr(builtins, "exec", spy_exec)
    for gt in ("0", "x", "B", "PWNED", text):
        for response in (text, f"Answer: {text}", rf"\boxed{{{text}}}"):
            for extracted in (False, True):
                verdict = judge(response, gt, extracted=extracted, options={"A": text, "B": "1"} if gt == "B" else None)
                assert 0.0 <= verdict.score <= 1.0
    assert not (tmp_path / "PWNED").exists()
    assert not any(isinstance(s, str) and ("__" in s or "PWNED" in s) for s in code_strings)


def test_math_verify_expression_parser_is_never_used(monkeypatch):
    import math_verify.parser

    def forbidden(*args, **kwargs):
        raise AssertionError("sympy parse_expr (eval-based) was called")

    monkeypatch.setattr(math_verify.parser, "parse_expr", forbidden)
    for answer, gt, score in SYMBOLIC_CASES + [("1+1", "2", 1.0), ("3*4", "12", 1.0)]:
        assert answer_score(answer, gt, extracted=True) == score


# --------------------------------------------------------------------------------------------------
# Judging modes per data set (issue: answer judging as InternVL selects it by source)


@pytest.mark.parametrize("answer, gt", [("19", "20"), ("41", "42"), ("96", "100")])
def test_math_mode_has_no_numeric_tolerance(answer, gt):
    # InternVL judges every set that is not chart-, document- or geometry-style with VQA match + multiple choice
    # + its math score (relative change <= 1e-3) + math-verify: 19 is wrong for 20 (5% off), 96 for 100 (4% off).
    # Only its chartqa mode (relaxed accuracy, 5%) accepts them.
    assert not is_correct(rf"\boxed{{{answer}}}", gt)  # default mode: math
    assert not is_correct(rf"\boxed{{{answer}}}", gt, mode="math")
    assert is_correct(rf"\boxed{{{answer}}}", gt, mode="relaxed")
    assert is_correct(rf"\boxed{{{answer}}}", gt, mode="all")  # ours before the modes


def test_math_mode_keeps_exact_and_equivalent_numbers():
    # 1e-3 relative (InternVL's math score): 1000.4 vs 1000 is 4e-4 off, correct; 1/2 vs 0.5 the same number
    assert is_correct(r"\boxed{1000.4}", "1000") and is_correct(r"\boxed{\frac{1}{2}}", "0.5")
    assert is_correct(r"\boxed{20}", "20") and not is_correct(r"\boxed{21}", "20")


@pytest.mark.parametrize("name, mode", [
    # InternVL's get_mode: chartqa -> relaxed accuracy only; docvqa / infographics -> ANLS;
    # SROIE / CLEVR_math / geos / geometry -> relaxed + VQA + multiple choice; anything else -> VQA + MC + math
    ("chartqa_train", AnswerMode.RELAXED), ("docvqa_val.jsonl", AnswerMode.ANLS),
    ("infographics_vqa", AnswerMode.ANLS), ("SROIE", AnswerMode.GEOMETRY), ("CLEVR_math_en", AnswerMode.GEOMETRY),
    ("geos_en", AnswerMode.GEOMETRY), ("geometry3k", AnswerMode.GEOMETRY), ("geoqa_plus", AnswerMode.MATH),
    ("mavis_math", AnswerMode.MATH), ("tile_sum", AnswerMode.MATH), (None, AnswerMode.MATH),
])
def test_mode_for_source(name, mode):
    assert mode_for_source(name) == mode


def test_relaxed_mode_is_numeric_only_and_years_are_exact():
    # InternVL's chartqa mode scores relaxed accuracy only (non-numbers need the exact string), and a ground truth
    # of four characters starting "20" (a year) needs the exact answer: 2019 is not 2020 although 0.05% off.
    assert is_correct(r"\boxed{4.8}", "5", mode="relaxed")
    assert not is_correct(r"\boxed{two}", "2", mode="relaxed")  # the VQA number word is not in this mode
    assert not is_correct(r"\boxed{2019}", "2020", mode="relaxed")
    # (InternVL's math score, 1e-3 relative, does accept 2019 for 2020: 1/2020 = 5e-4; the math mode keeps that)
    assert is_correct(r"\boxed{2019}", "2020", mode="math")
    assert is_correct(r"\boxed{2020}", "2020", mode="relaxed")


def test_anls_and_multiple_choice_and_exact_modes():
    assert is_correct(r"\boxed{helo world}", "hello world", mode="anls")  # 1 - 1/11 = 0.909 > 0.9
    assert not is_correct(r"\boxed{helo world}", "hello world", mode="math")  # no ANLS outside doc sets
    assert is_correct(r"\boxed{(B)}", "B", mode="multiple_choice")
    assert not is_correct(r"\boxed{two}", "2", mode="multiple_choice")
    assert is_correct(r"\boxed{Paris}", "paris", mode="exact") and not is_correct(r"\boxed{Paris.}", "paris",
                                                                               mode="exact")
    with pytest.raises(ValueError, match="answer mode must be one of math, exact, relaxed"):
        is_correct("x", "x", mode="tolerant")


@pytest.mark.parametrize("answer, gt", [("25 km/h", "25"), (r"25\text{ km/h}", "25"), ("3 m/s^2", "3"),
                                        ("dont", "don't"), ("Don’t", "dont"), ("isnt", "isn't")])
def test_units_and_apostrophes_match_as_in_internvl(answer, gt):
    # InternVL: math-verify reads "25 km/h" as 25; its VQA normaliser maps "dont" to "don't" (and so on).
    assert judge(answer, gt, extracted=True).correct
    assert not judge("26 km/h", "25", extracted=True).correct
    assert not judge("25 km/h", "25 m/s", extracted=True).correct  # two different units


def test_chinese_answer_trigger_is_extracted():
    # InternVL's Chinese prompt (INSTRUCTION_ZH) asks for "答案: ..."; its parser reads the text after the last one.
    assert extract_answer("先数一数。\n一共有 7 个。\n答案: 7") == "7"
    assert extract_answer("推理……\n答案：12。") == "12"  # full-width colon; the full-width full stop is dropped
    assert is_correct("推理\n答案: 7", "7")
