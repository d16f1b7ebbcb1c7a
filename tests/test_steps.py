"""Step segmentation with Monte Carlo prefixes (`reward.steps`): the published blank-line steps unchanged, and the
finer `step_split` cuts with prefixes that are the policy's own text."""

from __future__ import annotations

import pytest

from reward.steps import (STEP_SEPARATOR, Step, compile_step_split, join_steps, merge_steps, segment_steps,
                          split_steps)
from rlhf.errors import UserError

VALUES_SPLIT = r"(?<=,)(?= )|(?= and )"  # one step per listed value, as the demo's recipe
SOLUTION = "The tiles show 3, 7, 5 and 9.\n\n3 + 7 = 10.\n\n10 + 5 = 15.\n\n15 + 9 = 24.\n\nAnswer: \\boxed{24}"


def test_published_steps_and_prefixes_without_step_split():
    steps = segment_steps(SOLUTION)
    assert [s.text for s in steps] == SOLUTION.split("\n\n") == split_steps(SOLUTION)
    # the published prefix of step i: steps 0..i joined by blank lines, plus the blank line the next step follows
    assert [s.prefix for s in steps] == [join_steps(SOLUTION.split("\n\n")[:i + 1]) + STEP_SEPARATOR
                                         for i in range(5)]
    # odd whitespace is normalised as the published split does: stripped steps, one blank line between them
    messy = "  The tiles show 3.\r\n \r\n\n3 + 0 = 3.  \n\n"
    assert segment_steps(messy) == [Step("The tiles show 3.", "The tiles show 3.\n\n"),
                                    Step("3 + 0 = 3.", "The tiles show 3.\n\n3 + 0 = 3.\n\n")]


def test_step_split_worked_example():
    steps = segment_steps(SOLUTION, step_split=VALUES_SPLIT)
    assert [s.text for s in steps] == ["The tiles show 3,", "7,", "5", "and 9.", "3 + 7 = 10.", "10 + 5 = 15.",
                                       "15 + 9 = 24.", "Answer: \\boxed{24}"]
    # a cut inside a line: the policy continues right after the cut and writes the space itself
    assert [s.prefix for s in steps[:4]] == ["The tiles show 3,", "The tiles show 3, 7,", "The tiles show 3, 7, 5",
                                             "The tiles show 3, 7, 5 and 9.\n\n"]
    assert steps[4].prefix == "The tiles show 3, 7, 5 and 9.\n\n3 + 7 = 10.\n\n"
    assert steps[-1].prefix == SOLUTION + STEP_SEPARATOR
    assert split_steps(SOLUTION, None, VALUES_SPLIT) == [s.text for s in steps]
    # every prefix is the solution's own text (plus the final blank line), so continuations stay in distribution
    assert all((SOLUTION + STEP_SEPARATOR).startswith(s.prefix) for s in steps)


def test_step_split_merge_above_max_steps():
    # 8 steps, max 3: k = ceil(8 / 3) = 3 per merged step; the text is what they span, the prefix the last one's
    steps = segment_steps(SOLUTION, 3, VALUES_SPLIT)
    assert [s.text for s in steps] == ["The tiles show 3, 7, 5", "and 9.\n\n3 + 7 = 10.\n\n10 + 5 = 15.",
                                       "15 + 9 = 24.\n\nAnswer: \\boxed{24}"]
    assert [s.prefix for s in steps] == ["The tiles show 3, 7, 5",
                                         "The tiles show 3, 7, 5 and 9.\n\n3 + 7 = 10.\n\n10 + 5 = 15.\n\n",
                                         SOLUTION + STEP_SEPARATOR]


def test_merge_steps_worked_example():
    """One merge rule for the scorer's split and the PRM job's rows: 7 steps, max 3 -> k = ceil(7 / 3) = 3, groups
    {0, 1, 2}, {3, 4, 5}, {6}; each merged step ends at its last step (index 2, 5, 6), whose label it takes."""
    steps = ["a", "b", "c", "d", "e", "f", "g"]
    assert merge_steps(steps, 3) == (["a\n\nb\n\nc", "d\n\ne\n\nf", "g"], [2, 5, 6])  # default gap: a blank line
    # with the text between the steps in the solution (a step_split cut leaves " "), the merge rejoins it
    gaps = [" ", " ", "\n\n", " ", "\n\n", " "]
    assert merge_steps(steps, 3, gaps) == (["a b c", "d e\n\nf", "g"], [2, 5, 6])
    assert merge_steps(steps, 7) == merge_steps(steps, None) == (steps, list(range(7)))  # n <= max: unchanged
    assert merge_steps([], 3) == ([], [])
    # the scorer's text split is this merge over the solution's own gaps
    assert [s.text for s in segment_steps(SOLUTION, 3, VALUES_SPLIT)] == merge_steps(
        split_steps(SOLUTION, None, VALUES_SPLIT), 3, [" ", " ", " ", "\n\n", "\n\n", "\n\n", "\n\n"])[0]
    # blank-line steps: the PRM job's merge of a record's steps equals the scorer's split of their text
    labels = [1.0] * 9 + [0.5, 0.25, 0.0, 0.0]
    numbered = [f"Step {i}." for i in range(13)]
    merged, last = merge_steps(numbered, 6)  # k = ceil(13 / 6) = 3 -> 5 merged steps
    assert merged == split_steps(join_steps(numbered), 6)
    assert [labels[i] for i in last] == [labels[2], labels[5], labels[8], labels[11], labels[12]]
    with pytest.raises(ValueError, match="gaps"):
        merge_steps(steps, 3, [" "])


def test_step_split_that_consumes_text_and_empty_parts():
    # a pattern that matches text: the match belongs to the prefix, not to a step; empty parts are dropped, and a
    # blank-line piece's last step keeps the published prefix even when the piece ends with a match
    assert segment_steps("a, b,\n\nc", step_split=",") == [Step("a", "a,"), Step("b", "a, b,\n\n"),
                                                         Step("c", "a, b,\n\nc\n\n")]
    assert segment_steps(",,a", step_split=",") == [Step("a", ",,a\n\n")]
    assert segment_steps("no match here", step_split=VALUES_SPLIT) == [Step("no match here", "no match here\n\n")]


def test_compile_step_split_checks():
    assert compile_step_split(None) is None and compile_step_split("") is None
    assert compile_step_split(VALUES_SPLIT).pattern == VALUES_SPLIT
    with pytest.raises(UserError, match=r"step_split: not a regular expression .*'\(\?<=,'"):
        compile_step_split("(?<=,")
    with pytest.raises(UserError, match="matches the empty string"):
        compile_step_split(r"\s*")
    with pytest.raises(UserError, match="expected a regular expression, got int"):
        compile_step_split(3)
    with pytest.raises(UserError, match="matches the empty string"):
        split_steps(SOLUTION, None, "x?")
